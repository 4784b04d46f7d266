//! `cocoon-host`: run microVMs from images, extended by sandboxed plugins.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cocoon_host::config::{HostConfig, Overrides};
use cocoon_host::vm::api;

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
    /// Run a VM from an image: pull, convert, plan the disks, create them,
    /// start the VM's monitor and boot. In the foreground the console is
    /// attached and the exit status is the guest's outcome (0 power-off,
    /// 3 reset, 130 stopped, 1 error); -d leaves it running. With no image:
    /// the built-in demo.
    Run(cli::vm::RunArgs),
    /// Create a VM (as run does) without starting it.
    Create {
        #[command(flatten)]
        args: cli::vm::CreateArgs,
        #[arg(short, long, value_enum, default_value_t = cli::output::Format::Text)]
        output: cli::output::Format,
    },
    /// Start a created or stopped VM (its monitor runs detached).
    Start(cli::vm::VmArg),
    /// Stop a VM: ask the guest (Ctrl-Alt-Del), then stop it hard after
    /// the timeout.
    Stop(cli::vm::StopArgs),
    /// Pause a running VM (no guest instruction runs, no disk I/O).
    Pause(cli::vm::VmArg),
    /// Resume a paused VM.
    Resume(cli::vm::VmArg),
    /// Remove a stopped VM and every file it owns.
    Rm(cli::vm::RmArgs),
    /// List VMs.
    #[command(alias = "ls")]
    List(cli::vm::ListArgs),
    /// Show a VM's record (and its monitor's view when it runs).
    Inspect(cli::vm::InspectArgs),
    /// Attach this terminal to a running VM's serial console (Ctrl-] detaches).
    Console(cli::vm::VmArg),
    /// Print a VM's console log.
    Logs(cli::vm::LogsArgs),
    /// Snapshots of running VMs: save, list, inspect, rm, export, import,
    /// push, pull.
    Snapshot(cli::snapshot::SnapshotArgs),
    /// A new VM from a snapshot, started from the snapshot's state (its
    /// own disks, a new identity): no boot. The snapshot's image is pulled
    /// by digest first when the store lacks it.
    #[command(name = "clone")]
    CloneVm(cli::snapshot::CloneArgs),
    /// Put a VM back to a snapshot: checked, and its disks copied beside
    /// the VM's, while the VM runs (a bad snapshot or a failed copy leaves
    /// it running), then the VM is stopped, its disks replaced (all or
    /// none) and it is started from the snapshot's state.
    Restore(cli::snapshot::RestoreArgs),
    /// The monitor of one VM (started by `start`; not for people).
    #[command(name = "__monitor", hide = true)]
    Monitor {
        vm_dir: PathBuf,
        lock_fd: String,
        ready_fd: String,
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
        Command::Monitor {
            vm_dir,
            lock_fd,
            ready_fd,
        } => {
            // SAFETY: `spawn::start` passed these two descriptors to this
            // process and nothing else in it uses them.
            Ok(unsafe { cocoon_host::vm::monitor::main_from_args(&vm_dir, &lock_fd, &ready_fd) })
        }
        command => {
            let config = HostConfig::load(&overrides)?;
            match command {
                Command::Run(args) => cli::vm::run(args, &config),
                Command::Create { args, output } => cli::vm::create_cmd(args, output, &config),
                Command::Start(a) => cli::vm::start(a, &config),
                Command::Stop(a) => cli::vm::stop(a, &config),
                Command::Pause(a) => cli::vm::act(a, api::PATH_PAUSE, &config),
                Command::Resume(a) => cli::vm::act(a, api::PATH_RESUME, &config),
                Command::Rm(a) => cli::vm::rm(a, &config),
                Command::List(a) => cli::vm::list(a, &config),
                Command::Inspect(a) => cli::vm::inspect(a, &config),
                Command::Console(a) => cli::vm::console(a, &config),
                Command::Logs(a) => cli::vm::logs(a, &config),
                Command::Snapshot(a) => cli::snapshot::run(a, &config),
                Command::CloneVm(a) => cli::snapshot::clone(a, &config),
                Command::Restore(a) => cli::snapshot::restore(a, &config),
                Command::Plugin(_)
                | Command::Image(_)
                | Command::Boot(_)
                | Command::Monitor { .. } => {
                    unreachable!("matched above")
                }
            }
        }
    }
}

/// `cocoon-host list | head`: a reader that closes stdout early chose to
/// stop reading; that is no crash. Rust leaves SIGPIPE ignored (so that a
/// monitor gone from under an API request is an error the command names,
/// not a silent death), and then `println!` panics on EPIPE; this ends
/// the process quietly instead, with the status a shell gives a SIGPIPE.
fn exit_quietly_when_stdout_closes() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info)
    }));
}

fn main() -> ExitCode {
    exit_quietly_when_stdout_closes();
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match run(cli) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) if e.is::<cli::vm_console::StdoutClosed>() => ExitCode::from(141),
        Err(e) => {
            eprintln!("error: {}", cocoon_host::error_chain(e.as_ref()));
            ExitCode::from(1)
        }
    }
}
