//! `cocoon-host image …`: convert, pull, list, inspect, remove and
//! garbage-collect images.

use clap::{Args, Subcommand};

use cocoon_host::config::HostConfig;

pub mod convert;
pub mod store;

#[derive(Debug, Args)]
pub struct ImageArgs {
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Convert a disk image to raw through the format-converter plugins.
    Convert(convert::ConvertArgs),
    /// Pull an image into the store.
    Pull(store::PullArgs),
    /// List images in the store.
    List(store::ListArgs),
    /// Show one image of the store.
    Inspect(store::InspectArgs),
    /// Remove an image reference from the store.
    Rm(store::RmArgs),
    /// Delete blobs nothing references.
    Gc(store::GcArgs),
}

pub fn run(args: ImageArgs, config: &HostConfig) -> anyhow::Result<i32> {
    match args.command {
        ImageCommand::Convert(a) => convert::run(a, config),
        ImageCommand::Pull(a) => store::pull(a, config),
        ImageCommand::List(a) => store::list(a, config),
        ImageCommand::Inspect(a) => store::inspect(a, config),
        ImageCommand::Rm(a) => store::rm(a, config),
        ImageCommand::Gc(a) => store::gc(a, config),
    }
}
