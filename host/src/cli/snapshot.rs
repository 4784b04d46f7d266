//! `snapshot save|list|inspect|rm|export|import|push|pull`, `clone` and
//! `restore`: the CLI over `cocoon_host::snapshot` (the snapshots under
//! `STATE/snapshots/`) and `cocoon_host::vm::snapshot` (VMs made from
//! them). A save is the running VM's monitor's work (it owns the VMM and
//! the disk locks): this side asks its API.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use cocoon_host::config::HostConfig;
use cocoon_host::plugin::registry::Registry;
use cocoon_host::plugin::runtime::Runtime;
use cocoon_host::snapshot::archive::{self, Compression};
use cocoon_host::snapshot::base_image::{self, PulledImage};
use cocoon_host::snapshot::clone_disks::DataDiskFile;
use cocoon_host::snapshot::layers::{self, RebuiltLayer};
use cocoon_host::snapshot::preflight::{self, HashedLayer, DEFAULT_HASH_LIMIT};
use cocoon_host::snapshot::store::{self, SnapshotDir};
use cocoon_host::snapshot::{registry, snapshots_dir, Sidecar};
use cocoon_host::store::{PluginSources, Store};
use cocoon_host::vm::client::Client;
use cocoon_host::vm::snapshot::{clone_vm, commit_restore, prepare_restore, Boot};
use cocoon_host::vm::{spawn, VmError, VmState, Vms};

use super::output::{emit, human, Format};
use super::vm_console;

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub command: SnapshotCommand,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Snapshot a running (or paused) VM: the guest is paused while its
    /// state, memory and writable disks are copied, then resumed.
    Save(SaveArgs),
    /// List snapshots.
    #[command(alias = "ls")]
    List(ListArgs),
    /// Show a snapshot's sidecar (disks, image, sizes, digests).
    Inspect(InspectArgs),
    /// Remove snapshots (refused while a clone, restore, export or push
    /// reads one).
    Rm(RmArgs),
    /// Write a snapshot as a tar stream (GNU sparse entries for files with
    /// holes), plain or zstd.
    Export(ExportArgs),
    /// Read a snapshot from a tar stream (plain or zstd), checking every
    /// file against its sidecar.
    Import(ImportArgs),
    /// Push a snapshot to an OCI registry as an artifact.
    Push(PushArgs),
    /// Pull a snapshot artifact from an OCI registry, every blob verified.
    Pull(PullArgs),
}

#[derive(Debug, Args)]
pub struct SaveArgs {
    /// The VM's name or id.
    pub vm: String,
    /// The snapshot's name [default: VM-DATE, e.g. web-20261202T051018Z].
    #[arg(long)]
    pub name: Option<String>,
    #[arg(short, long, value_enum, default_value_t = Format::Text)]
    pub output: Format,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[arg(short, long, value_enum, default_value_t = Format::Text)]
    pub output: Format,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The snapshot's name (as `snapshot list` shows it).
    pub snapshot: String,
    /// Also run the preflight a clone runs (every rule, the small files
    /// hashed); exits 1 when it fails.
    #[arg(long)]
    pub check: bool,
    #[arg(short, long, value_enum, default_value_t = Format::Text)]
    pub output: Format,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// The snapshots' names.
    #[arg(required = true)]
    pub snapshots: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The snapshot's name (as `snapshot list` shows it).
    pub snapshot: String,
    /// The file to write [default: stdout, which must not be a terminal].
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Compress the stream with zstd.
    #[arg(long)]
    pub zstd: bool,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The stream: a file, or `-` for stdin.
    pub file: String,
    /// The snapshot's name here [default: the name its sidecar records].
    #[arg(long)]
    pub name: Option<String>,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// The snapshot's name (as `snapshot list` shows it).
    pub snapshot: String,
    /// `oci://HOST[:PORT]/REPO:TAG`.
    pub reference: String,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// `oci://HOST[:PORT]/REPO:TAG` or `…@sha256:…`.
    pub reference: String,
    /// The snapshot's name here [default: the name its sidecar records].
    #[arg(long)]
    pub name: Option<String>,
}

/// `clone SNAP`.
#[derive(Debug, Args)]
pub struct CloneArgs {
    /// The snapshot's name (as `snapshot list` shows it).
    pub snapshot: String,
    /// The new VM's name (generated when omitted).
    #[arg(long)]
    pub name: Option<String>,
    /// The clone's own tap for a NIC the snapshot's VM had on a user's tap
    /// (`--nic tap=`), one per such NIC in order (repeatable); the MAC is
    /// new (random) unless given. Bridge NICs need none: the clone gets its
    /// own tap on the same bridge. Every NIC of a clone has a new MAC.
    #[arg(
        long = "nic",
        value_name = "tap=NAME[,mac=MAC]",
        value_parser = super::net::parse_nic
    )]
    pub nics: Vec<cocoon_host::net::NicSpec>,
    /// A file in place of one of the snapshot's data disks (repeatable):
    /// `name=NAME,path=FILE` or `index=N,path=FILE` (N counts every disk
    /// as `snapshot inspect` lists them, from 0). The file must be a
    /// regular file of that disk's size; the clone gets a copy of it
    /// (reflink where the filesystem can), taken under the file's lock.
    /// No new disk can be added: this VMM has no hotplug, and a restored
    /// guest's disk set is fixed by its memory.
    #[arg(long = "data-disk", value_name = "SPEC")]
    pub data_disks: Vec<DataDiskFile>,
    /// Leave it running in the background and print its name.
    #[arg(short, long)]
    pub detach: bool,
    #[arg(short, long, value_enum, default_value_t = Format::Text)]
    pub output: Format,
}

/// `restore VM SNAP`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The VM's name or id.
    pub vm: String,
    /// The snapshot's name (as `snapshot list` shows it).
    pub snapshot: String,
}

pub fn run(args: SnapshotArgs, config: &HostConfig) -> anyhow::Result<i32> {
    match args.command {
        SnapshotCommand::Save(a) => save(a, config),
        SnapshotCommand::List(a) => list(a, config),
        SnapshotCommand::Inspect(a) => inspect(a, config),
        SnapshotCommand::Rm(a) => rm(a, config),
        SnapshotCommand::Export(a) => export(a, config),
        SnapshotCommand::Import(a) => import(a, config),
        SnapshotCommand::Push(a) => push(a, config),
        SnapshotCommand::Pull(a) => pull(a, config),
    }
}

fn snaps(config: &HostConfig) -> PathBuf {
    snapshots_dir(&config.state_dir)
}

/// `VM-20261202T051018Z`, within the name limit.
fn default_name(vm: &str) -> String {
    let date = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace([':', '-'], "");
    let keep = store::MAX_NAME_LEN - date.len() - 1;
    let vm: String = vm.chars().take(keep).collect();
    format!("{vm}-{date}")
}

fn save(a: SaveArgs, config: &HostConfig) -> anyhow::Result<i32> {
    let vm = Vms::open(&config.state_dir)?.find(&a.vm)?;
    if !vm.record.state.has_monitor() {
        return Err(VmError::WrongState {
            vm: vm.record.name.clone(),
            state: vm.record.state,
            what: "a snapshot holds a running guest's state (its vCPUs and memory): start it \
                   first",
        }
        .into());
    }
    let name = a.name.unwrap_or_else(|| default_name(&vm.record.name));
    store::check_name(&name)?;
    let taken = Client::new(&vm.api_socket())?
        .snapshot(&name)
        .map_err(|source| VmError::Api {
            vm: vm.record.name.clone(),
            source,
        })?;
    emit(a.output, &taken, |t| {
        println!("{}", t.name);
        eprintln!(
            "snapshot {} of VM {}: guest paused {:.1} ms, memory {} ({} data), finished in {:.1} ms",
            t.name,
            vm.record.name,
            t.paused_ms,
            human(t.memory_bytes),
            human(t.memory_data_bytes),
            t.finish_ms
        );
    })?;
    Ok(0)
}

/// The bytes of a snapshot's files as its sidecar records them.
fn logical_bytes(s: &Sidecar) -> u64 {
    s.files.iter().map(|f| f.size).sum()
}

fn date(rfc3339: &str) -> Option<u64> {
    humantime::parse_rfc3339(rfc3339)
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

fn list(a: ListArgs, config: &HostConfig) -> anyhow::Result<i32> {
    let listed = store::list(&snaps(config))?;
    let rows: Vec<serde_json::Value> = listed
        .iter()
        .map(|l| match &l.sidecar {
            Ok(s) => serde_json::json!({
                "name": l.name,
                "source_vm": s.source_vm,
                "created": s.created,
                "created_at": date(&s.created),
                "cpus": s.cpus,
                "memory_bytes": s.memory_bytes,
                "disks": s.disks.len(),
                "image": s.image.reference.clone().unwrap_or_else(|| s.image.digest.to_string()),
                "bytes": logical_bytes(s),
                "error": null,
            }),
            Err(e) => serde_json::json!({
                "name": l.name,
                "error": cocoon_host::error_chain(e),
            }),
        })
        .collect();
    emit(a.output, &serde_json::json!({ "snapshots": rows }), |_| {
        println!(
            "{:<32} {:<20} {:>4} {:>9} {:>5} {:>10}  CREATED",
            "NAME", "SOURCE VM", "CPUS", "MEMORY", "DISKS", "SIZE"
        );
        for l in &listed {
            match &l.sidecar {
                Ok(s) => println!(
                    "{:<32} {:<20} {:>4} {:>9} {:>5} {:>10}  {}",
                    l.name,
                    s.source_vm,
                    s.cpus,
                    human(s.memory_bytes),
                    s.disks.len(),
                    human(logical_bytes(s)),
                    s.created
                ),
                Err(e) => println!(
                    "{:<32} (unreadable: {})",
                    l.name,
                    cocoon_host::error_chain(e)
                ),
            }
        }
    })?;
    Ok(0)
}

fn inspect(a: InspectArgs, config: &HostConfig) -> anyhow::Result<i32> {
    let snap = SnapshotDir::open(&snaps(config), &a.snapshot)?;
    let check = if a.check {
        let store = Store::open(config)?;
        let layout = store.layout();
        let present = |d: &cocoon_host::store::Digest| layout.present(d, None).is_some();
        let opts = preflight::Options {
            store_root: layout.root(),
            target: None,
            image_present: &present,
            hash_limit: DEFAULT_HASH_LIMIT,
            hashed_layers: &[],
        };
        Some(
            preflight::preflight(&snap.dir, &snap.sidecar, &opts)
                .map(|_| ())
                .map_err(|e| cocoon_host::error_chain(&e)),
        )
    } else {
        None
    };
    let doc = serde_json::json!({
        "name": snap.name,
        "dir": snap.dir,
        "sidecar": snap.sidecar,
        "preflight": check.as_ref().map(|c| match c {
            Ok(()) => serde_json::json!({ "ok": true }),
            Err(e) => serde_json::json!({ "ok": false, "error": e }),
        }),
    });
    emit(a.output, &doc, |_| {
        let s = &snap.sidecar;
        println!("name:      {}", snap.name);
        println!("dir:       {}", snap.dir.display());
        println!("created:   {}", s.created);
        println!("source vm: {}", s.source_vm);
        println!(
            "image:     {}{}",
            s.image.digest,
            s.image
                .reference
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        );
        println!("vmm state: {}", s.vmm_state_version.0);
        if let Some(b) = &s.boot {
            let initrd = b
                .initrd
                .as_deref()
                .map(|i| format!(", initrd {i}"))
                .unwrap_or_default();
            println!(
                "boot:      kernel {}{initrd}, cmdline {:?}",
                b.kernel, b.cmdline
            );
        }
        println!("cpus:      {}", s.cpus);
        println!("memory:    {}", human(s.memory_bytes));
        println!("disks:");
        for d in &s.disks {
            println!(
                "  {:<6} {:<14} {} {}",
                d.config.role.as_str(),
                d.config.serial,
                if d.config.read_only { "ro" } else { "rw" },
                match &d.layer {
                    Some(l) => format!("layer {}", l.digest),
                    None => d.config.path.display().to_string(),
                }
            );
        }
        if !s.nics.is_empty() {
            println!("nics:");
            for (i, n) in s.nics.iter().enumerate() {
                let attach = match &n.attach {
                    cocoon_host::net::Attachment::Tap(t) => format!("tap={t}"),
                    cocoon_host::net::Attachment::Bridge(b) => format!("bridge={b}"),
                };
                println!("  nic{i} {attach} mac {}", n.mac);
            }
        }
        println!("files:");
        for f in &s.files {
            println!("  {:<20} {:>10} {}", f.name, human(f.size), f.sha256);
        }
        match &check {
            Some(Ok(())) => println!("preflight: ok"),
            Some(Err(e)) => println!("preflight: FAILED: {e}"),
            None => {}
        }
    })?;
    Ok(i32::from(matches!(check, Some(Err(_)))))
}

fn rm(a: RmArgs, config: &HostConfig) -> anyhow::Result<i32> {
    let dir = snaps(config);
    for name in &a.snapshots {
        store::remove(&dir, name)?;
        println!("{name} removed");
    }
    Ok(0)
}

fn export(a: ExportArgs, config: &HostConfig) -> anyhow::Result<i32> {
    let snap = SnapshotDir::open(&snaps(config), &a.snapshot)?;
    let compression = if a.zstd {
        Compression::Zstd(3)
    } else {
        Compression::None
    };
    match &a.output {
        None => {
            let stdout = std::io::stdout();
            if stdout.is_terminal() {
                anyhow::bail!(
                    "refusing to write a tar stream to a terminal: give -o FILE or redirect stdout"
                );
            }
            archive::export(&snap, stdout.lock(), compression)?;
        }
        Some(path) => {
            // Temp, fsync, rename: a failed export leaves no partial file.
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            let mut tmp = tempfile::Builder::new()
                .prefix(".cocoon-export-")
                .tempfile_in(dir)
                .with_context(|| format!("creating a temp file in {}", dir.display()))?;
            let report = archive::export(&snap, tmp.as_file_mut(), compression)?;
            tmp.as_file()
                .sync_all()
                .with_context(|| format!("fsync of {}", tmp.path().display()))?;
            tmp.persist(path)
                .with_context(|| format!("renaming the export to {}", path.display()))?;
            eprintln!(
                "exported {} to {}: {} of data, {} in all",
                snap.name,
                path.display(),
                human(report.data_bytes),
                human(report.logical_bytes)
            );
        }
    }
    Ok(0)
}

fn import(a: ImportArgs, config: &HostConfig) -> anyhow::Result<i32> {
    let dir = snaps(config);
    let imported = if a.file == "-" {
        archive::import(std::io::stdin().lock(), &dir, a.name.as_deref())?
    } else {
        let f = std::fs::File::open(&a.file).with_context(|| format!("opening {}", a.file))?;
        archive::import(f, &dir, a.name.as_deref())?
    };
    println!("{}", imported.name);
    Ok(0)
}

fn push(a: PushArgs, config: &HostConfig) -> anyhow::Result<i32> {
    let snap = SnapshotDir::open(&snaps(config), &a.snapshot)?;
    let pushed = registry::push(&snap, &a.reference)?;
    println!("{}", pushed.manifest_digest);
    Ok(0)
}

fn pull(a: PullArgs, config: &HostConfig) -> anyhow::Result<i32> {
    let store = Store::open(config)?;
    let pulled = registry::pull(
        &a.reference,
        store.layout(),
        &snaps(config),
        a.name.as_deref(),
    )?;
    println!("{}", pulled.name);
    Ok(0)
}

/// What a clone's record names for its later cold boots: the snapshot's
/// boot files when it carries them, else the source VM's kernel when that
/// VM is here, else the config's `[vm] kernel`.
fn clone_boot(vms: &Vms, snapshot: &str, config: &HostConfig) -> anyhow::Result<Boot> {
    let snap = SnapshotDir::open(&snaps(config), snapshot)?;
    // The snapshot's own (sidecar 1.1): the clone links them in.
    if let Some(b) = &snap.sidecar.boot {
        return Ok(Boot {
            kernel: snap.dir.join(&b.kernel),
            initrd: b.initrd.as_ref().map(|i| snap.dir.join(i)),
            cmdline: b.cmdline.clone(),
        });
    }
    if let Ok(src) = vms.find(&snap.sidecar.source_vm) {
        let m = src.record.machine;
        return Ok(Boot {
            kernel: m.kernel,
            initrd: m.initrd,
            cmdline: m.cmdline,
        });
    }
    let kernel = config.vm.kernel.clone().with_context(|| {
        format!(
            "the clone needs a kernel for its later cold boots: VM {} (the snapshot's source) is \
             not on this host, and the config's [vm] table sets no `kernel`",
            snap.sidecar.source_vm
        )
    })?;
    Ok(Boot {
        kernel,
        initrd: config.vm.initrd.clone(),
        cmdline: "console=ttyS0".into(),
    })
}

/// What the store lacked of a snapshot's image and got back, and the
/// layers hashed on the way.
struct BroughtBack {
    pulled: Option<PulledImage>,
    rebuilt: Vec<RebuiltLayer>,
    /// For the preflight: not hashed twice.
    hashed: Vec<HashedLayer>,
}

/// The snapshot's layers in the store hashed against the digests its
/// sidecar pins; its image pulled by digest from the reference its
/// sidecar records when the store lacks it; then its layers the store
/// lacks, or whose bytes did not match (their cache entries removed),
/// built again and held to the digests the sidecar pins: before anything
/// else changes, so a failure leaves the VMs as they were. The plugin
/// runtime is made only then (a clone of a present image stays fast).
fn bring_back_image(config: &HostConfig, snapshot: &str) -> anyhow::Result<BroughtBack> {
    let snap = SnapshotDir::open(&snaps(config), snapshot)?;
    let store = Store::open(config)?;
    let mut checked = layers::check(store.layout(), &snap);
    if base_image::present(store.layout(), &snap) && !checked.needs_rebuild() {
        return Ok(BroughtBack {
            pulled: None,
            rebuilt: Vec::new(),
            hashed: checked.hashed,
        });
    }
    let scrub = |e: &dyn std::error::Error| {
        anyhow::anyhow!(
            "{}",
            cocoon_host::http::redact_text(&cocoon_host::error_chain(e))
        )
    };
    let runtime = Runtime::new(Some(config.state_dir.join("plugin-cache")))?;
    let registry = Registry::discover(config);
    let sources = PluginSources {
        runtime: &runtime,
        registry: &registry,
    };
    let pulled = base_image::pull_missing(&store, &sources, &snap).map_err(|e| scrub(&e))?;
    if let Some(p) = &pulled {
        eprintln!(
            "image {} of snapshot {} was not in the store: pulled it by digest from {}",
            p.digest, snap.name, p.reference
        );
    }
    for c in &checked.corrupt {
        eprintln!(
            "layer disk {} of snapshot {} at {}: its bytes did not match (sha256 {}, the snapshot \
             pins {}): removed from the store, to be built again",
            c.index,
            snap.name,
            c.path.display(),
            c.found,
            c.recorded
        );
    }
    let rebuilt = layers::rebuild_missing(&store, &runtime, &registry, &snap, &checked)
        .map_err(|e| scrub(&e))?;
    for l in &rebuilt {
        eprintln!(
            "rebuilt layer {} (disk {}) of snapshot {} from {}{}: {}; the digest is the one the \
             snapshot pins",
            l.digest,
            l.index,
            snap.name,
            l.source,
            if l.built {
                ""
            } else {
                " (this host's cache had it under its own builder)"
            },
            match &l.corrupt {
                None => "it was not in the store".to_string(),
                Some(found) => format!(
                    "it was rebuilt because its bytes in the store did not match (sha256 {found})"
                ),
            }
        );
    }
    checked.rebuilt(store.layout(), &snap, &rebuilt);
    Ok(BroughtBack {
        pulled,
        rebuilt,
        hashed: checked.hashed,
    })
}

#[derive(serde::Serialize)]
struct CloneReport {
    name: String,
    id: String,
    snapshot: String,
    /// The snapshot's image, when the clone had to pull it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pulled_image: Option<serde_json::Value>,
    /// The snapshot's layers the clone had to build again.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    rebuilt_layers: Vec<RebuiltLayer>,
    state: String,
    /// From the start of the command until the monitor said the VM runs.
    ms_to_running: f64,
    copies: Vec<serde_json::Value>,
    exit: Option<cocoon_host::vm::record::ExitInfo>,
}

pub fn clone(a: CloneArgs, config: &HostConfig) -> anyhow::Result<i32> {
    let t0 = Instant::now();
    let vms = Vms::open(&config.state_dir)?;
    let back = bring_back_image(config, &a.snapshot)?;
    let boot = clone_boot(&vms, &a.snapshot, config)?;
    let made = clone_vm(
        &vms,
        &config.state_dir,
        &a.snapshot,
        a.name.as_deref(),
        &a.nics,
        boot,
        &a.data_disks,
        &back.hashed,
    )?;
    let mut vm = made.vm;
    let log_base = vm_console::log_len(&vm);
    let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    if !a.detach {
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(sig, interrupted.clone())
                .context("watching SIGINT/SIGTERM")?;
        }
    }
    let pid = spawn::start(&vm)?;
    let mut report = CloneReport {
        name: vm.record.name.clone(),
        id: vm.record.id.clone(),
        snapshot: made.snapshot.clone(),
        rebuilt_layers: back.rebuilt,
        pulled_image: back.pulled.map(|p| {
            serde_json::json!({
                "digest": p.digest,
                "reference": p.reference,
                "downloaded": p.downloaded,
            })
        }),
        state: VmState::Running.to_string(),
        ms_to_running: t0.elapsed().as_secs_f64() * 1000.0,
        copies: made
            .copies
            .iter()
            .map(|(s, m)| serde_json::json!({ "serial": s, "method": m }))
            .collect(),
        exit: None,
    };
    if a.output == Format::Text {
        eprintln!(
            "clone: VM {} from snapshot {} running (monitor pid {pid}) in {:.1} ms",
            vm.record.name, made.snapshot, report.ms_to_running
        );
    }
    if a.detach {
        emit(a.output, &report, |r| println!("{}", r.name))?;
        return Ok(0);
    }
    let out = if a.output == Format::Text {
        vm_console::Out::Stdout
    } else {
        vm_console::Out::Discard
    };
    vm_console::follow(&vm, 0, Some(log_base), out, Some(&interrupted))?;
    vm.reload()?;
    report.state = vm.record.state.to_string();
    report.exit = vm.record.exit.clone();
    if a.output == Format::Json {
        emit(a.output, &report, |_| {})?;
    }
    Ok(super::vm::exit_code(report.exit.as_ref().map(|e| e.kind)))
}

pub fn restore(a: RestoreArgs, config: &HostConfig) -> anyhow::Result<i32> {
    let vm = Vms::open(&config.state_dir)?.find(&a.vm)?;
    // Every check first: a snapshot that fails them never costs the VM.
    let back = bring_back_image(config, &a.snapshot)?;
    let plan = prepare_restore(&vm, &config.state_dir, &a.snapshot, &back.hashed)?;
    // The copies next, while the VM runs: the long part, and the one that
    // can fail (space, I/O, a disk changed since the snapshot) without
    // costing the VM anything. SIGINT/SIGTERM remove the staged files;
    // after a SIGKILL the next command's sweep does.
    cocoon_host::fsutil::cleanup::remove_temps_on_termination()
        .context("watching SIGINT/SIGTERM")?;
    let staged = plan.stage().with_context(|| {
        format!(
            "staging snapshot {} for VM {} (the VM was not touched)",
            a.snapshot, vm.record.name
        )
    })?;
    if vm.record.state.has_monitor() {
        // Its running state is about to be replaced: nothing to ask the
        // guest.
        super::vm::stop_vm(&vm, true, Duration::ZERO)?;
    }
    let snapshot = staged.snapshot().to_string();
    let vm = commit_restore(&vm, staged).with_context(|| {
        format!(
            "restoring snapshot {snapshot} into VM {} (the VM is stopped)",
            vm.record.name
        )
    })?;
    let pid = spawn::start(&vm)?;
    println!(
        "{} restored from {snapshot}, running (monitor pid {pid})",
        vm.record.name
    );
    Ok(0)
}
