//! The network flags every VM command shares (`boot`, `run`, `create`):
//! one clap type, so they parse and read alike everywhere.

use clap::Args;
use cocoon_host::net::{NetworkSpec, NicSpec};

/// `--nic` and `--network`, as given (see [`cocoon_host::net::spec`]).
#[derive(Debug, Clone, Default, Args)]
pub struct NetArgs {
    /// A virtio-net NIC on an existing tap (repeatable); the MAC is random
    /// (locally administered) unless given. ip=/gw= give the guest a static
    /// address through the cloud-init seed (DHCP otherwise), so they are
    /// refused where there is no seed.
    #[arg(
        long = "nic",
        value_name = "tap=NAME[,mac=MAC][,ip=CIDR,gw=ADDR]",
        value_parser = with_causes::<NicSpec>
    )]
    pub nics: Vec<NicSpec>,
    /// `bridge=BR[,mac=MAC][,ip=CIDR,gw=ADDR]`: a NIC on a tap that is
    /// created on the existing bridge BR when the VM starts and deleted
    /// when it stops (repeatable); `none` (the default) for no NIC.
    #[arg(
        long = "network",
        value_name = "bridge=BR[,mac=MAC]|none",
        value_parser = with_causes::<NetworkSpec>
    )]
    pub networks: Vec<NetworkSpec>,
}

/// A `--nic` value (for commands that take it outside [`NetArgs`]).
pub fn parse_nic(s: &str) -> Result<NicSpec, String> {
    with_causes(s)
}

/// Parses a value, its error with the whole cause chain (clap prints only
/// the error's own message).
fn with_causes<T>(s: &str) -> Result<T, String>
where
    T: std::str::FromStr,
    T::Err: std::error::Error,
{
    s.parse().map_err(|e: T::Err| cocoon_host::error_chain(&e))
}
