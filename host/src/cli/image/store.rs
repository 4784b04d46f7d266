//! `cocoon-host image pull|list|inspect|rm|gc`.

use clap::Args;

use cocoon_host::config::HostConfig;

#[derive(Debug, Args)]
pub struct PullArgs {}
#[derive(Debug, Args)]
pub struct ListArgs {}
#[derive(Debug, Args)]
pub struct InspectArgs {}
#[derive(Debug, Args)]
pub struct RmArgs {}
#[derive(Debug, Args)]
pub struct GcArgs {}

pub fn pull(_a: PullArgs, _c: &HostConfig) -> anyhow::Result<i32> {
    anyhow::bail!("not implemented yet: image pull")
}
pub fn list(_a: ListArgs, _c: &HostConfig) -> anyhow::Result<i32> {
    anyhow::bail!("not implemented yet: image list")
}
pub fn inspect(_a: InspectArgs, _c: &HostConfig) -> anyhow::Result<i32> {
    anyhow::bail!("not implemented yet: image inspect")
}
pub fn rm(_a: RmArgs, _c: &HostConfig) -> anyhow::Result<i32> {
    anyhow::bail!("not implemented yet: image rm")
}
pub fn gc(_a: GcArgs, _c: &HostConfig) -> anyhow::Result<i32> {
    anyhow::bail!("not implemented yet: image gc")
}
