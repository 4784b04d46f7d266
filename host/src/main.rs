//! `cocoon-host`: run microVMs from images, extended by sandboxed plugins.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cocoon_host::config::{HostConfig, Overrides};

/// A microVM runtime with sandboxed WebAssembly plugins.
///
/// Images are pulled, converted and planned by the trusted host, which does
/// all I/O and verifies every digest; site-specific logic runs in WASM
/// component plugins (image sources, format converters, disk policies).
#[derive(Debug, Parser)]
#[command(name = "cocoon-host", version, propagate_version = true)]
struct Cli {
    /// Host config file [default: /etc/cocoon-host/config.toml for root,
    /// $XDG_CONFIG_HOME/cocoon-host/config.toml otherwise].
    #[arg(long, global = true, env = "COCOON_CONFIG")]
    config: Option<PathBuf>,
    /// State directory [default: /var/lib/cocoon-host for root, the XDG
    /// data dir otherwise].
    #[arg(long, global = true, env = "COCOON_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Directory of third-party plugins [default: STATE_DIR/plugins].
    #[arg(long, global = true, env = "COCOON_PLUGIN_DIR")]
    plugin_dir: Option<PathBuf>,
    /// More log output (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage and call plugins.
    Plugin(cli::plugin::PluginArgs),
    /// Convert, pull and manage images.
    Image(cli::image::ImageArgs),
    /// Boot a kernel directly on the built-in VMM.
    Boot(cli::boot::BootArgs),
    /// Run a VM from an image (pull, convert, plan, boot). Not implemented
    /// yet: use `boot` for now.
    Run {
        /// The image reference.
        image: String,
    },
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    let overrides = Overrides {
        config: cli.config,
        state_dir: cli.state_dir,
        plugin_dir: cli.plugin_dir,
    };
    match cli.command {
        Command::Plugin(args) => {
            let config = HostConfig::load(&overrides)?;
            cli::plugin::run(args, &config)
        }
        Command::Image(args) => {
            let config = HostConfig::load(&overrides)?;
            cli::image::run(args, &config)
        }
        Command::Boot(args) => cli::boot::run(args),
        Command::Run { image } => {
            anyhow::bail!("not implemented yet: run {image} (pull, convert and plan land in later releases; use `cocoon-host boot`)")
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match run(cli) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("error: {}", cocoon_host::error_chain(e.as_ref()));
            ExitCode::from(1)
        }
    }
}
