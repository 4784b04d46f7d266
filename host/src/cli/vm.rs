//! The VM lifecycle commands: `run`, `create`, `start`, `stop`, `pause`,
//! `resume`, `rm`, `list`, `inspect`, `console`, `logs`. Each is a client
//! of the VM's records and of its monitor's API.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use cocoon_host::config::HostConfig;
use cocoon_host::disk::plan::{BaseImage, ImageDisks};
use cocoon_host::disk::spec::DataDiskSpec;
use cocoon_host::plugin::policy::Policy;
use cocoon_host::plugin::registry::Registry;
use cocoon_host::plugin::runtime::Runtime;
use cocoon_host::store::{HeldBlobs, PluginSources, PullPolicy, PullRequest, Store, StoreError};
use cocoon_host::vm::api;
use cocoon_host::vm::client::Client;
use cocoon_host::vm::create::{create, CreateRequest};
use cocoon_host::vm::guest_boot::{BootRequest, GuestImage};
use cocoon_host::vm::nics::{self, NicView};
use cocoon_host::vm::record::{ImageInfo, Machine};
use cocoon_host::vm::{spawn, ExitKind, VmEntry, VmError, VmState, Vms};

use super::output::{emit, human, Format};
use super::vm_console;

/// How a new VM is made (`run` and `create`).
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The image: a URL, `oci://…`, a local file, a digest, or a site
    /// scheme of an image-source plugin. Omitted: the built-in demo (the
    /// test guest booting a demo disk image; no network needed).
    pub image: Option<String>,
    /// The VM's name (letters, digits, `.`, `_`, `-`; up to 63); generated
    /// when omitted.
    #[arg(long)]
    pub name: Option<String>,
    /// Number of vCPUs (1 to 254).
    #[arg(long, default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=i64::from(cocoon_vmm::vm::MAX_VCPUS)))]
    pub cpus: u8,
    /// Guest RAM: 512 (MiB), 512M, 2G.
    #[arg(long, default_value = "256M", value_parser = cocoon_vmm::parse_memory_size)]
    pub memory: u64,
    /// Size of the writable root (cow) disk; default: the policy's.
    #[arg(long, value_name = "SIZE", value_parser = cocoon_host::disk::spec::parse_size)]
    pub cow_size: Option<u64>,
    /// A data disk, in order (repeatable):
    /// `size=SIZE[,name=NAME][,fstype=ext4|none][,mount=/PATH][,directio=on|off|auto]`.
    #[arg(long = "data-disk", value_name = "SPEC")]
    pub data_disks: Vec<DataDiskSpec>,
    /// Kernel to boot (an ELF with a PVH note, or a bzImage); default: a
    /// disk image's own `/boot/vmlinuz-*`, else the config's `[vm] kernel`
    /// (the test guest for the demo). A Linux kernel without `--initrd`
    /// boots the cocoon initramfs.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line: for a Linux kernel, arguments put before the
    /// disk plan the host adds; for any other kernel, the whole line.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// The disk-policy plugin [default: `[vm] policy`, else default-policy].
    #[arg(long)]
    pub policy: Option<String>,
    /// When to contact the image's server.
    #[arg(long, value_enum, default_value_t = PullPolicy::Missing)]
    pub pull: PullPolicy,
    /// No cloud-init seed disk.
    #[arg(long)]
    pub no_cidata: bool,
    /// A file of SSH public keys for the seed's default user.
    #[arg(long, value_name = "FILE")]
    pub ssh_authorized_keys: Option<PathBuf>,
    #[command(flatten)]
    pub net: super::net::NetArgs,
}

/// Pull, convert, plan, create and start a VM.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub create: CreateArgs,
    /// Start it in the background and print its name.
    #[arg(short, long)]
    pub detach: bool,
    /// Remove the VM when it stops (foreground only).
    #[arg(long)]
    pub rm: bool,
    #[arg(short, long, value_enum, default_value_t = Format::Text)]
    pub output: Format,
}

#[derive(Debug, Args)]
pub struct VmArg {
    /// The VM's name or id (a unique id prefix of 4 or more digits).
    pub vm: String,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    pub vm: String,
    /// Stop at once, without asking the guest.
    #[arg(long)]
    pub force: bool,
    /// Seconds the guest gets to power off before it is stopped hard.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    pub vm: String,
    /// Stop it first if it runs.
    #[arg(long, short)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[arg(short, long, value_enum, default_value_t = Format::Text)]
    pub output: Format,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    pub vm: String,
    #[arg(short, long, value_enum, default_value_t = Format::Text)]
    pub output: Format,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    pub vm: String,
    /// Keep printing output as the guest writes it.
    #[arg(short, long)]
    pub follow: bool,
}

/// What `run` and `create` did, step by step (`-o json`).
#[derive(Debug, Default, serde::Serialize)]
pub struct Steps {
    pub name: String,
    pub id: String,
    pub image: Option<ImageStep>,
    pub disks: Vec<DiskStep>,
    pub kernel: PathBuf,
    /// What a Linux guest boots (kernel, initramfs, root).
    pub boot: Option<super::vm_guest::BootStep>,
    pub policy: String,
    pub nics: Vec<NicView>,
    pub state: String,
    /// The guest's outcome, for a foreground run.
    pub exit: Option<cocoon_host::vm::record::ExitInfo>,
}

#[derive(Debug, serde::Serialize)]
pub struct ImageStep {
    pub reference: String,
    pub digest: String,
    /// `pulled` or `cached`.
    pub pull: &'static str,
    pub base: Option<String>,
    /// `converted` or `cached`.
    pub conversion: Option<&'static str>,
    pub format: Option<String>,
    /// A container image's layers, base first.
    pub layers: Vec<super::vm_guest::LayerStep>,
}

#[derive(Debug, serde::Serialize)]
pub struct DiskStep {
    pub role: String,
    pub serial: String,
    pub path: PathBuf,
    pub read_only: bool,
    pub size: u64,
    pub mount_point: Option<String>,
}

/// Progress lines for people, on stderr, unless the output is JSON.
pub(super) struct Say(bool);

impl Say {
    pub(super) fn line(&self, s: impl AsRef<str>) {
        if self.0 {
            eprintln!("{}", s.as_ref());
        }
    }
}

fn vms(config: &HostConfig) -> anyhow::Result<Vms> {
    Ok(Vms::open(&config.state_dir)?)
}

/// The image as disks, pulled and converted (or built as layers) through
/// the store.
pub(super) struct Prepared {
    pub(super) disks: ImageDisks,
    pub(super) info: Option<ImageInfo>,
    pub(super) step: Option<ImageStep>,
    /// The demo's kernel and command line.
    pub(super) demo: Option<super::demo::Demo>,
    /// What the guest boots from (not the demo).
    pub(super) guest: Option<GuestImage>,
}

fn prepare_image(
    args: &CreateArgs,
    config: &HostConfig,
    runtime: &Runtime,
    registry: &Registry,
    say: &Say,
) -> anyhow::Result<Prepared> {
    let store = Store::open(config)?;
    let sources = PluginSources { runtime, registry };
    let (reference, digest, demo) = match &args.image {
        Some(r) => (r.clone(), None, None),
        None => {
            let demo = super::demo::Demo::materialize(&config.state_dir)?;
            say.line(format!(
                "image: the built-in demo disk ({} bytes of qcow2, embedded)",
                demo.image_bytes
            ));
            (
                demo.image_path.display().to_string(),
                Some(demo.image_digest.clone()),
                Some(demo),
            )
        }
    };
    let req = PullRequest {
        reference: reference.clone(),
        digest,
        policy: args.pull,
        force: false,
    };
    let quiet = cocoon_host::store::Quiet;
    let scrub = |e: &dyn std::error::Error| {
        anyhow::anyhow!(
            "{}",
            cocoon_host::http::redact_text(&cocoon_host::error_chain(e))
        )
    };
    // Every use below re-hashes what it reads (the conversion its source,
    // the base copy the converted file), so the pull need not re-hash
    // what the store holds: a cached `run` reads each byte once.
    let mut report = store
        .pull_checking(&sources, &req, &quiet, HeldBlobs::AtUse)
        .map_err(|e| scrub(&e))?;
    if demo.is_none() && cocoon_host::layer::is_layered(&report.record) {
        // Layer builds re-hash their blobs too, but a rotten one is only
        // fetched again by a pull that re-hashes: this one.
        report = store.pull(&sources, &req, &quiet).map_err(|e| scrub(&e))?;
    }
    let pulled = if report.downloaded > 0 {
        "pulled"
    } else {
        "cached"
    };
    say.line(format!(
        "pull: {} {} ({} bytes, {pulled})",
        cocoon_host::http::redact(&report.reference),
        report.digest,
        report.size
    ));
    if demo.is_none() && cocoon_host::layer::is_layered(&report.record) {
        return super::vm_guest::prepare_layered(&store, &report, pulled, runtime, registry, say);
    }
    let disk_digest = |r: &cocoon_host::store::PullReport| {
        r.record
            .disk()
            .map(|d| d.digest.clone())
            .ok_or_else(|| anyhow::anyhow!("{}: no artifact is a disk image", r.reference))
    };
    let backend = cocoon_host::store::EngineBackend { runtime, registry };
    let converted = match store.converted(&disk_digest(&report)?, "raw", &backend) {
        Err(StoreError::SourceGone { .. }) => {
            report = store
                .pull_checking(&sources, &req, &quiet, HeldBlobs::AtUse)
                .map_err(|e| scrub(&e))?;
            store.converted(&disk_digest(&report)?, "raw", &backend)?
        }
        other => other?,
    };
    let how = if converted.converted_now {
        "converted"
    } else {
        "cached"
    };
    say.line(format!(
        "convert: {} to raw by {} ({} bytes virtual, {how}) {}",
        converted.source, converted.converter.name, converted.size, converted.digest
    ));
    let base = BaseImage::from_converted(&converted, true);
    Ok(Prepared {
        info: Some(ImageInfo {
            reference: cocoon_host::http::redact(&report.reference).into_owned(),
            digest: report.digest.clone(),
            base: Some(converted.digest.clone()),
            layers: Vec::new(),
        }),
        step: Some(ImageStep {
            reference: cocoon_host::http::redact(&report.reference).into_owned(),
            digest: report.digest.to_string(),
            pull: pulled,
            base: Some(converted.digest.to_string()),
            conversion: Some(how),
            format: Some(converted.converter.name.clone()),
            layers: Vec::new(),
        }),
        disks: ImageDisks::Disk { base },
        guest: demo.is_none().then_some(GuestImage::Disk),
        demo,
    })
}

/// Creates the VM (`run` and `create`); `starting` when it starts right
/// after (its taps must be free now, not only exist).
fn create_vm(
    args: &CreateArgs,
    config: &HostConfig,
    say: &Say,
    starting: bool,
) -> anyhow::Result<(VmEntry, Steps)> {
    // The network first: a wrong flag or a missing tap or bridge fails
    // before anything is pulled or made.
    // Other VMs' MACs matter only to a VM with NICs; without any, `run`
    // does not read every record for them.
    let wants_nics = !args.net.nics.is_empty() || !args.net.networks.is_empty();
    let taken = if wants_nics {
        nics::taken_macs(&vms(config)?)?
    } else {
        Default::default()
    };
    let planned = nics::plan(&args.net.nics, &args.net.networks, !args.no_cidata, &taken)?;
    nics::check(&planned, starting)?;
    let runtime = Runtime::new(Some(config.state_dir.join("plugin-cache")))?;
    let registry = Registry::discover(config);
    let prepared = prepare_image(args, config, &runtime, &registry, say)?;
    let (kernel, initrd, cmdline, data_disks, boot) = match &prepared.demo {
        Some(demo) => {
            let kernel = args
                .kernel
                .clone()
                .unwrap_or_else(|| demo.kernel_path.clone());
            let kernel = std::fs::canonicalize(&kernel)
                .with_context(|| format!("the kernel {}", kernel.display()))?;
            let initrd = match &args.initrd {
                Some(p) => Some(
                    std::fs::canonicalize(p)
                        .with_context(|| format!("the initrd {}", p.display()))?,
                ),
                None => None,
            };
            (
                kernel,
                initrd,
                args.cmdline.clone().unwrap_or_else(|| demo.cmdline()),
                if args.data_disks.is_empty() {
                    vec![demo.data_disk()]
                } else {
                    args.data_disks.clone()
                },
                None,
            )
        }
        None => {
            let image = prepared
                .guest
                .clone()
                .context("the image has no boot kind")?;
            let boot = BootRequest {
                kernel: args.kernel.clone(),
                initrd: args.initrd.clone(),
                cmdline: args.cmdline.clone(),
                vm: config.vm.clone(),
                state_dir: config.state_dir.clone(),
                image,
            };
            // The placeholder's machine; create writes the chosen one.
            let kernel = args
                .kernel
                .clone()
                .or_else(|| config.vm.kernel.clone())
                .unwrap_or_default();
            (
                kernel,
                None,
                String::new(),
                args.data_disks.clone(),
                Some(boot),
            )
        }
    };
    let policy_name = args
        .policy
        .clone()
        .unwrap_or_else(|| config.vm.policy.clone());
    let policy = Policy::load(&runtime, &registry, &policy_name)
        .with_context(|| format!("the disk policy {policy_name}"))?;
    let ssh_authorized_keys = match &args.ssh_authorized_keys {
        Some(p) => cocoon_host::disk::cidata::read_ssh_keys(p)?,
        None => Vec::new(),
    };
    let report = create(
        &vms(config)?,
        CreateRequest {
            name: args.name.as_deref(),
            machine: Machine {
                cpus: args.cpus,
                memory: args.memory,
                kernel,
                initrd,
                cmdline,
            },
            image: prepared.disks,
            image_info: prepared.info,
            cow_size: args.cow_size,
            data_disks: &data_disks,
            cidata: !args.no_cidata,
            ssh_authorized_keys,
            settings: config.vm.settings.clone(),
            nics: planned,
            boot,
        },
        &policy,
    )?;
    let vm = report.vm;
    let mut steps = Steps {
        name: vm.record.name.clone(),
        id: vm.record.id.clone(),
        image: prepared.step,
        kernel: vm.record.machine.kernel.clone(),
        boot: report
            .boot
            .as_ref()
            .map(|b| super::vm_guest::report_boot(b, say)),
        policy: report.plan.policy.clone(),
        nics: nics::views(&vm.record.id, &vm.record.nics),
        state: vm.record.state.to_string(),
        ..Steps::default()
    };
    say.line(format!(
        "plan: {} disks by {}",
        report.plan.disks.len(),
        report.plan.policy
    ));
    for d in &vm.record.storage {
        let size = std::fs::metadata(&d.path).map(|m| m.len()).unwrap_or(0);
        say.line(format!(
            "  {:<6} {:<14} {:>10} {} {}{}",
            d.role.as_str(),
            d.serial,
            human(size),
            if d.read_only { "ro" } else { "rw" },
            d.path.display(),
            d.mount_point
                .as_deref()
                .map(|m| format!(" mount {m}"))
                .unwrap_or_default()
        ));
        steps.disks.push(DiskStep {
            role: d.role.to_string(),
            serial: d.serial.clone(),
            path: d.path.clone(),
            read_only: d.read_only,
            size,
            mount_point: d.mount_point.clone(),
        });
    }
    if let Some(c) = &report.created.base_copy {
        say.line(format!("  root copied from the base by {:?}", c.method));
    }
    for n in &steps.nics {
        say.line(format!("  {n}"));
    }
    Ok((vm, steps))
}

pub fn run(args: RunArgs, config: &HostConfig) -> anyhow::Result<i32> {
    if args.detach && args.rm {
        anyhow::bail!(
            "--rm needs a foreground run: it removes the VM when the foreground run ends"
        );
    }
    let say = Say(args.output == Format::Text);
    let demo = args.create.image.is_none();
    let (mut vm, mut steps) = create_vm(&args.create, config, &say, true)?;
    let log_base = vm_console::log_len(&vm);
    // In the foreground, SIGINT/SIGTERM stop the VM rather than leave it
    // running without its console.
    let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    if !args.detach {
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(sig, interrupted.clone())
                .context("watching SIGINT/SIGTERM")?;
        }
    }
    let pid = match spawn::start(&vm) {
        Ok(pid) => pid,
        Err(e) => {
            if args.rm || (demo && !args.detach) {
                let _ = remove(&vm);
            }
            return Err(e.into());
        }
    };
    say.line(format!(
        "start: VM {} running (monitor pid {pid})",
        vm.record.name
    ));
    if args.detach {
        steps.state = VmState::Running.to_string();
        emit(args.output, &steps, |s| println!("{}", s.name))?;
        return Ok(0);
    }
    // The foreground: the console until the VM stops.
    let console_out = if args.output == Format::Text {
        vm_console::Out::Stdout
    } else {
        vm_console::Out::Discard
    };
    let transcript = vm_console::follow(&vm, 0, Some(log_base), console_out, Some(&interrupted))?;
    vm.reload()?;
    let exit = vm.record.exit.clone();
    steps.state = vm.record.state.to_string();
    steps.exit = exit.clone();
    let code = exit_code(exit.as_ref().map(|e| e.kind));
    if let Some(e) = &exit {
        say.line(format!("stop: VM {} {}", vm.record.name, e.reason));
    }
    if demo && args.create.cmdline.is_none() {
        super::demo::summarize(&vm, &transcript, &say_fn(&say))?;
    }
    // The demo leaves nothing behind but the cached image.
    if args.rm || demo {
        remove(&vm)?;
        say.line(format!("rm: VM {} removed", vm.record.name));
    }
    if args.output == Format::Json {
        emit(args.output, &steps, |_| {})?;
    }
    Ok(code)
}

fn say_fn(say: &Say) -> impl Fn(&str) + '_ {
    move |s| say.line(s)
}

/// The guest's outcome as an exit status: 0 power-off, 3 reset, 130
/// stopped by the host, 1 an error or a dead monitor.
pub fn exit_code(kind: Option<ExitKind>) -> i32 {
    match kind {
        Some(ExitKind::PowerOff) => 0,
        Some(ExitKind::Reset) => 3,
        Some(ExitKind::Stopped) => 130,
        Some(ExitKind::Error) | Some(ExitKind::MonitorDied) | None => 1,
    }
}

pub fn create_cmd(args: CreateArgs, output: Format, config: &HostConfig) -> anyhow::Result<i32> {
    let say = Say(output == Format::Text);
    let (_, steps) = create_vm(&args, config, &say, false)?;
    emit(output, &steps, |s| println!("{}", s.name))?;
    Ok(0)
}

pub fn start(a: VmArg, config: &HostConfig) -> anyhow::Result<i32> {
    let vm = vms(config)?.find(&a.vm)?;
    let pid = spawn::start(&vm)?;
    println!("{} running (monitor pid {pid})", vm.record.name);
    Ok(0)
}

/// A client of a VM whose monitor runs.
fn client(vm: &VmEntry) -> anyhow::Result<Client> {
    if !vm.record.state.has_monitor() {
        return Err(VmError::WrongState {
            vm: vm.record.name.clone(),
            state: vm.record.state,
            what: "it has no monitor to ask",
        }
        .into());
    }
    Ok(Client::new(&vm.api_socket())?)
}

fn api_err(vm: &VmEntry) -> impl FnOnce(cocoon_host::vm::client::ClientError) -> VmError + '_ {
    move |source| VmError::Api {
        vm: vm.record.name.clone(),
        source,
    }
}

pub fn act(a: VmArg, path: &'static str, config: &HostConfig) -> anyhow::Result<i32> {
    let vm = vms(config)?.find(&a.vm)?;
    let info = client(&vm)?.act(path).map_err(api_err(&vm))?;
    println!("{} {}", info.name, info.state);
    Ok(0)
}

/// Waits until the VM's monitor is gone.
fn wait_stopped(vm: &VmEntry, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match cocoon_host::vm::monitor_lock::MonitorLock::probe(&vm.dir) {
            Ok(cocoon_host::vm::monitor_lock::Liveness::Dead) | Err(_) => return true,
            Ok(_) if Instant::now() >= deadline => return false,
            Ok(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

pub(crate) fn stop_vm(
    vm: &VmEntry,
    force: bool,
    timeout: Duration,
) -> anyhow::Result<&'static str> {
    let c = client(vm)?;
    if !force {
        match c.act(api::PATH_SHUTDOWN) {
            Ok(_) if wait_stopped(vm, timeout) => return Ok("powered off"),
            Ok(_) => {}
            // Gone meanwhile: stopped is what was asked.
            Err(_) if wait_stopped(vm, Duration::ZERO) => return Ok("stopped"),
            Err(e) => tracing::warn!(
                "asking the guest to shut down: {}",
                cocoon_host::error_chain(&e)
            ),
        }
    }
    match c.act(api::PATH_STOP) {
        Ok(_) => {}
        Err(_) if wait_stopped(vm, Duration::ZERO) => return Ok("stopped"),
        Err(e) => return Err(api_err(vm)(e).into()),
    }
    if !wait_stopped(vm, Duration::from_secs(10)) {
        anyhow::bail!(
            "VM {}: its monitor did not exit after a hard stop",
            vm.record.name
        );
    }
    Ok(if force {
        "stopped"
    } else {
        "stopped after the timeout"
    })
}

pub fn stop(a: StopArgs, config: &HostConfig) -> anyhow::Result<i32> {
    let vm = vms(config)?.find(&a.vm)?;
    let how = stop_vm(&vm, a.force, Duration::from_secs(a.timeout))?;
    println!("{} {how}", vm.record.name);
    Ok(0)
}

/// Removes a VM that has no monitor: its directory, every file in it.
fn remove(vm: &VmEntry) -> anyhow::Result<()> {
    let _lock = vm.lock("rm")?;
    let mut now = vm.clone();
    now.reload()?;
    if now.record.state.has_monitor() {
        return Err(VmError::WrongState {
            vm: now.record.name.clone(),
            state: now.record.state,
            what: "stop it first, or use rm --force",
        }
        .into());
    }
    // The disks' locks: no snapshot or copy of them is in progress.
    let writable: Vec<PathBuf> = now
        .record
        .storage
        .iter()
        .filter(|d| !d.read_only)
        .map(|d| d.path.clone())
        .filter(|p| p.exists())
        .collect();
    let locks = cocoon_host::disk::lock::DiskLocks::acquire(
        &writable,
        "rm",
        cocoon_host::disk::lock::Wait::No,
    )?;
    // The taps a killed monitor left (a monitor that exited deleted its
    // own); before anything is removed, so a failure leaves the VM whole.
    nics::release_leftovers(&now.record.id, &now.record.nics).with_context(|| {
        format!(
            "VM {}: deleting the taps the host made for it",
            now.record.name
        )
    })?;
    locks.remove()?;
    std::fs::remove_dir_all(&vm.dir).with_context(|| format!("removing {}", vm.dir.display()))?;
    Ok(())
}

pub fn rm(a: RmArgs, config: &HostConfig) -> anyhow::Result<i32> {
    let vm = vms(config)?.find(&a.vm)?;
    if vm.record.state.has_monitor() {
        if !a.force {
            return Err(VmError::WrongState {
                vm: vm.record.name.clone(),
                state: vm.record.state,
                what: "stop it first, or use rm --force",
            }
            .into());
        }
        stop_vm(&vm, true, Duration::ZERO)?;
    }
    remove(&vm)?;
    println!("{} removed", vm.record.name);
    Ok(0)
}

#[derive(serde::Serialize)]
struct ListRow<'a> {
    name: &'a str,
    id: &'a str,
    state: VmState,
    pid: Option<u32>,
    image: Option<&'a str>,
    cpus: u8,
    memory: u64,
    disks: usize,
    created_at: String,
    exit: Option<&'a str>,
}

fn date(unix: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

pub fn list(a: ListArgs, config: &HostConfig) -> anyhow::Result<i32> {
    let all = vms(config)?.list()?;
    let rows: Vec<ListRow> = all
        .iter()
        .map(|e| ListRow {
            name: &e.record.name,
            id: &e.record.id,
            state: e.record.state,
            pid: e.record.pid,
            image: e.record.image.as_ref().map(|i| i.reference.as_str()),
            cpus: e.record.machine.cpus,
            memory: e.record.machine.memory,
            disks: e.record.storage.len(),
            created_at: date(e.record.created_at),
            exit: e.record.exit.as_ref().map(|x| x.reason.as_str()),
        })
        .collect();
    emit(a.output, &serde_json::json!({ "vms": rows }), |_| {
        println!(
            "{:<24} {:<16} {:<8} {:>4} {:>9} {:>5}  CREATED",
            "NAME", "ID", "STATE", "CPUS", "MEMORY", "DISKS"
        );
        for r in &rows {
            println!(
                "{:<24} {:<16} {:<8} {:>4} {:>9} {:>5}  {}{}",
                r.name,
                r.id,
                r.state.as_str(),
                r.cpus,
                human(r.memory),
                r.disks,
                r.created_at,
                r.exit.map(|x| format!("  ({x})")).unwrap_or_default()
            );
        }
    })?;
    Ok(0)
}

pub fn inspect(a: InspectArgs, config: &HostConfig) -> anyhow::Result<i32> {
    let vm = vms(config)?.find(&a.vm)?;
    // A running VM's monitor is asked too: it is the authority on state.
    let live = if vm.record.state.has_monitor() {
        client(&vm)?.info().ok()
    } else {
        None
    };
    let nic_views = nics::views(&vm.record.id, &vm.record.nics);
    let doc = serde_json::json!({
        "record": vm.record,
        "dir": vm.dir,
        "nics": nic_views,
        "monitor": live,
    });
    emit(a.output, &doc, |_| {
        let r = &vm.record;
        println!("name:     {}", r.name);
        println!("id:       {}", r.id);
        println!("state:    {}", live.as_ref().map_or(r.state, |l| l.state));
        if let Some(p) = r.pid {
            println!("monitor:  pid {p}");
        }
        println!("cpus:     {}", r.machine.cpus);
        println!("memory:   {}", human(r.machine.memory));
        println!("kernel:   {}", r.machine.kernel.display());
        if let Some(i) = &r.machine.initrd {
            println!("initrd:   {}", i.display());
        }
        println!("cmdline:  {}", r.machine.cmdline);
        if let Some(i) = &r.image {
            println!("image:    {} {}", i.reference, i.digest);
            for (k, l) in i.layers.iter().enumerate() {
                println!("  layer {k}: {l}");
            }
        }
        println!("policy:   {}", r.policy);
        println!("created:  {}", date(r.created_at));
        if let Some(t) = r.started_at {
            println!("started:  {}", date(t));
        }
        if let Some(x) = &r.exit {
            println!("exit:     {} ({})", x.reason, date(x.at));
        }
        println!("disks:");
        for d in &r.storage {
            println!(
                "  {:<6} {:<14} {} {}{}",
                d.role.as_str(),
                d.serial,
                if d.read_only { "ro" } else { "rw" },
                d.path.display(),
                d.mount_point
                    .as_deref()
                    .map(|m| format!(" mount {m}"))
                    .unwrap_or_default()
            );
        }
        if !nic_views.is_empty() {
            println!("nics:");
            for n in &nic_views {
                println!("  {n}");
            }
        }
    })?;
    Ok(0)
}

pub fn console(a: VmArg, config: &HostConfig) -> anyhow::Result<i32> {
    let vm = vms(config)?.find(&a.vm)?;
    client(&vm)?;
    vm_console::interactive(&vm)?;
    Ok(0)
}

pub fn logs(a: LogsArgs, config: &HostConfig) -> anyhow::Result<i32> {
    let vm = vms(config)?.find(&a.vm)?;
    vm_console::tail(&vm, a.follow)?;
    Ok(0)
}
