//! `cocoon-host boot`: boot a kernel directly on the cocoon VMM.

use clap::Args;

/// Boot a kernel directly on the built-in VMM.
#[derive(Debug, Args)]
pub struct BootArgs {}

pub fn run(_args: BootArgs) -> anyhow::Result<i32> {
    anyhow::bail!("not implemented yet: boot")
}
