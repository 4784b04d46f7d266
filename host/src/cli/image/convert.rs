//! `cocoon-host image convert`.

use clap::Args;

use cocoon_host::config::HostConfig;

#[derive(Debug, Args)]
pub struct ConvertArgs {}

pub fn run(_args: ConvertArgs, _config: &HostConfig) -> anyhow::Result<i32> {
    anyhow::bail!("not implemented yet: image convert")
}
