//! `cocoon-host plugin …`: list, inspect, verify, install and call plugins.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;

use super::output::{emit, Format};
use cocoon_host::config::HostConfig;
use cocoon_host::error_chain;
use cocoon_host::fsutil::input;
use cocoon_host::plugin::calls::Platform;
use cocoon_host::plugin::policy::{Policy, PolicyRequest};
use cocoon_host::plugin::registry::{self, PluginInfo, Registry};
use cocoon_host::plugin::template;
use cocoon_host::plugin::{LoadedPlugin, PluginKind, PluginOrigin, Runtime};

#[derive(Debug, Args)]
pub struct PluginArgs {
    #[command(subcommand)]
    command: PluginCommand,
}

/// The plugin kinds, as `plugin new --kind` takes them.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum KindArg {
    ImageSource,
    FormatConverter,
    DiskPolicy,
}

impl From<KindArg> for PluginKind {
    fn from(k: KindArg) -> Self {
        match k {
            KindArg::ImageSource => PluginKind::ImageSource,
            KindArg::FormatConverter => PluginKind::FormatConverter,
            KindArg::DiskPolicy => PluginKind::DiskPolicy,
        }
    }
}

#[derive(Debug, Subcommand)]
enum PluginCommand {
    /// Write a new plugin crate to start from: Cargo.toml (the SDK by
    /// path), src/lib.rs implementing the kind's trait, plugin.toml. It
    /// builds as written (`cargo build --release --target wasm32-wasip2`)
    /// and passes `plugin verify`.
    New {
        /// The plugin's name, also the crate's: ^[a-z][a-z0-9-]{0,62}$.
        name: String,
        #[arg(long, value_enum)]
        kind: KindArg,
        /// The directory to create [default: ./NAME]; it may exist only
        /// if empty.
        #[arg(long)]
        path: Option<PathBuf>,
        /// The plugin SDK to depend on [default: the one of the checkout
        /// this binary was built from].
        #[arg(long)]
        sdk: Option<PathBuf>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// List the built-in plugins and those in the plugin directory.
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// Show one plugin: manifest, digest, grants, limits, imports, exports.
    Inspect {
        /// The plugin's name (see `plugin list`).
        name: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// Check a plugin as the host would load it, without installing it:
    /// manifest, pinned sha256, compilation, import allowlist, exports, and
    /// one harmless call. PATH is a directory with plugin.toml, a
    /// plugin.toml, or a .wasm (with --manifest, or plugin.toml beside it).
    Verify {
        /// A plugin directory, a plugin.toml, or a .wasm.
        path: PathBuf,
        /// The manifest, when PATH is a .wasm without plugin.toml beside it.
        #[arg(long)]
        manifest: Option<PathBuf>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// Verify a plugin, then copy it into the plugin directory with its
    /// sha256 pinned in the installed manifest.
    Install {
        /// A plugin directory, a plugin.toml, or a .wasm.
        path: PathBuf,
        /// The manifest, when PATH is a .wasm without plugin.toml beside it.
        #[arg(long)]
        manifest: Option<PathBuf>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// Call one function of a plugin, for authors and operators.
    Call {
        /// The plugin's name (see `plugin list`).
        name: String,
        #[command(subcommand)]
        call: Call,
        #[arg(short, long, value_enum, default_value_t, global = true)]
        output: Format,
    },
}

#[derive(Debug, Subcommand)]
enum Call {
    /// image-source: the URL schemes it resolves.
    Schemes,
    /// image-source: resolve a reference into artifacts (linux/amd64).
    Resolve {
        /// e.g. https://example.com/disk.qcow2@sha256:<hex>
        reference: String,
    },
    /// format-converter: probe a file's first and last 64 KiB.
    Probe {
        /// The image file.
        file: PathBuf,
    },
    /// format-converter: open a file and print its extent map.
    Map {
        /// The image file.
        file: PathBuf,
        /// The format to open it as.
        #[arg(long, default_value = "raw")]
        format: String,
    },
    /// disk-policy: the checked disk plan for a VM request (JSON file, -
    /// for stdin): the policy's validate, then its plan, checked as the
    /// host checks it when it creates a VM.
    Plan {
        /// A VM request as JSON: {"name", "image": {"layered": {"layers":
        /// [DIGEST…]}} or {"disk": {"digest", "virtual_size"}}, "cow_size",
        /// "data_disks": [{"name", "size_bytes", "fstype": "ext4"|"none",
        /// "mount_point", "direct_io"}], "cidata", "settings": {}}.
        request: PathBuf,
    },
    /// disk-policy: the site rules a VM request (JSON) breaks; exits 1 when
    /// there are any.
    Validate {
        /// A VM request as JSON, or - for stdin.
        request: PathBuf,
    },
}

pub fn run(args: PluginArgs, config: &HostConfig) -> anyhow::Result<i32> {
    if let PluginCommand::New {
        name,
        kind,
        path,
        sdk,
        output,
    } = args.command
    {
        return new(&name, kind.into(), path, sdk, output);
    }
    let runtime = Runtime::new(Some(config.state_dir.join("plugin-cache")))?;
    match args.command {
        PluginCommand::New { .. } => unreachable!("handled above"),
        PluginCommand::List { output } => list(config, output),
        PluginCommand::Inspect { name, output } => inspect(config, &runtime, &name, output),
        PluginCommand::Verify {
            path,
            manifest,
            output,
        } => {
            let (report, _) = registry::verify(&runtime, &path, manifest.as_deref())?;
            emit(output, &report, |r| {
                println!(
                    "ok: {} {} ({})",
                    r.manifest.name, r.manifest.version, r.manifest.kind
                );
                println!("  manifest  {}", r.manifest_path.display());
                println!(
                    "  wasm      {} ({} bytes)",
                    r.wasm_path.display(),
                    r.wasm_size
                );
                println!("  sha256    {}", r.sha256);
                match &r.sha256_pinned {
                    Some(_) => println!("  pinned    yes, matches"),
                    None => println!("  pinned    no (plugin install pins it)"),
                }
                println!("  imports   {}", r.imports.join(", "));
                println!("  exports   {}", r.exports.join(", "));
                println!("  smoke     {}", r.smoke_call);
            })?;
            Ok(0)
        }
        PluginCommand::Install {
            path,
            manifest,
            output,
        } => {
            let (report, _) = registry::verify(&runtime, &path, manifest.as_deref())?;
            let dir = registry::install(config, &report)?;
            #[derive(Serialize)]
            struct Installed<'a> {
                name: &'a str,
                sha256: &'a str,
                path: &'a Path,
            }
            let out = Installed {
                name: &report.manifest.name,
                sha256: &report.sha256,
                path: &dir,
            };
            emit(output, &out, |o| {
                println!(
                    "installed {} ({}) in {}",
                    o.name,
                    o.sha256,
                    o.path.display()
                )
            })?;
            Ok(0)
        }
        PluginCommand::Call { name, call, output } => {
            let registry = Registry::discover(config);
            let plugin = registry.load(&runtime, &name)?;
            call_plugin(&plugin, call, output)
        }
    }
}

fn new(
    name: &str,
    kind: PluginKind,
    path: Option<PathBuf>,
    sdk: Option<PathBuf>,
    output: Format,
) -> anyhow::Result<i32> {
    let dir = path.unwrap_or_else(|| PathBuf::from(name));
    let sdk = sdk.unwrap_or_else(template::default_sdk);
    let files = template::create(&dir, name, kind, &sdk)?;
    let wasm = format!(
        "target/wasm32-wasip2/release/{}.wasm",
        name.replace('-', "_")
    );
    #[derive(Serialize)]
    struct Created<'a> {
        name: &'a str,
        kind: PluginKind,
        path: &'a Path,
        files: &'a [PathBuf],
        wasm: &'a str,
    }
    let out = Created {
        name,
        kind,
        path: &dir,
        files: &files,
        wasm: &wasm,
    };
    emit(output, &out, |o| {
        println!(
            "created {} plugin {} in {}",
            o.kind,
            o.name,
            o.path.display()
        );
        for f in o.files {
            println!("  {}", f.display());
        }
        println!("next:");
        println!("  cd {}", o.path.display());
        println!("  cargo build --release --target wasm32-wasip2");
        println!(
            "  cocoon-host plugin verify {} --manifest plugin.toml",
            o.wasm
        );
        println!(
            "  cocoon-host plugin install {} --manifest plugin.toml",
            o.wasm
        );
    })?;
    Ok(0)
}

#[derive(Serialize)]
struct ListEntry<'a> {
    name: &'a str,
    version: &'a str,
    kind: &'a str,
    api: &'a str,
    origin: &'a PluginOrigin,
    sha256: &'a str,
    fetch: &'a [String],
    disabled: bool,
}

#[derive(Serialize)]
struct ListOutput<'a> {
    plugins: Vec<ListEntry<'a>>,
    problems: Vec<ProblemEntry>,
}

#[derive(Serialize)]
struct ProblemEntry {
    path: PathBuf,
    error: String,
}

fn list(config: &HostConfig, output: Format) -> anyhow::Result<i32> {
    let registry = Registry::discover(config);
    let out = ListOutput {
        plugins: registry
            .list()
            .map(|p| ListEntry {
                name: p.name(),
                version: &p.manifest.version,
                kind: p.manifest.kind.as_str(),
                api: &p.manifest.api,
                origin: &p.origin,
                sha256: &p.sha256,
                fetch: &p.effective_fetch,
                disabled: p.disabled,
            })
            .collect(),
        problems: registry
            .problems()
            .iter()
            .map(|p| ProblemEntry {
                path: p.path.clone(),
                error: error_chain(&p.error),
            })
            .collect(),
    };
    emit(output, &out, |o| {
        println!(
            "{:<18} {:<8} {:<17} {:<9} {:<14} FETCH",
            "NAME", "VERSION", "KIND", "ORIGIN", "SHA256"
        );
        for p in &o.plugins {
            let origin = match p.origin {
                PluginOrigin::Builtin => "builtin",
                PluginOrigin::Directory(_) => "directory",
            };
            let fetch = if p.fetch.is_empty() {
                "-".to_string()
            } else {
                p.fetch.join(",")
            };
            let name = if p.disabled {
                format!("{} (disabled)", p.name)
            } else {
                p.name.to_string()
            };
            println!(
                "{:<18} {:<8} {:<17} {:<9} {:<14} {}",
                name,
                p.version,
                p.kind,
                origin,
                &p.sha256[..12],
                fetch
            );
        }
        for p in &o.problems {
            eprintln!("unusable: {}: {}", p.path.display(), p.error);
        }
    })?;
    Ok(0)
}

#[derive(Serialize)]
struct InspectOutput<'a> {
    #[serde(flatten)]
    info: &'a PluginInfo,
    imports: &'a [String],
    exports: &'a [String],
    /// Where the compiled code came from: embedded, cache or compiled.
    compiled: &'static str,
}

fn inspect(
    config: &HostConfig,
    runtime: &Runtime,
    name: &str,
    output: Format,
) -> anyhow::Result<i32> {
    let registry = Registry::discover(config);
    let info = registry.get(name)?;
    let loaded = registry.load(runtime, name)?;
    let out = InspectOutput {
        info,
        imports: loaded.imports(),
        exports: loaded.exports(),
        compiled: if loaded.from_embedded() {
            "embedded"
        } else if loaded.from_cache() {
            "cache"
        } else {
            "compiled"
        },
    };
    emit(output, &out, |o| {
        let m = &o.info.manifest;
        println!("name          {}", m.name);
        println!("version       {}", m.version);
        println!("kind          {}", m.kind);
        println!("api           cocoon:plugin@{}", m.api);
        println!("description   {}", m.description);
        match &o.info.origin {
            PluginOrigin::Builtin => println!("origin        builtin"),
            PluginOrigin::Directory(d) => println!("origin        {}", d.display()),
        }
        println!("sha256        {}", o.info.sha256);
        println!("size          {} bytes", o.info.wasm_size);
        println!(
            "fetch         declared [{}] granted [{}] effective [{}]",
            m.capabilities.fetch.join(", "),
            o.info.granted_fetch.join(", "),
            o.info.effective_fetch.join(", ")
        );
        println!(
            "limits        deadline {} ms, memory {} MiB",
            o.info.limits.deadline.as_millis(),
            o.info.limits.memory_mib()
        );
        let config: Vec<String> = o
            .info
            .config
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("config        {}", config.join(" "));
        println!("imports       {}", o.imports.join("\n              "));
        println!("exports       {}", o.exports.join(", "));
        println!(
            "compiled      {}",
            match o.compiled {
                "embedded" => "embedded in the binary at build time",
                "cache" => "from the compiled cache",
                _ => "compiled now",
            }
        );
    })?;
    Ok(0)
}

fn read_request(path: &Path) -> anyhow::Result<PolicyRequest> {
    let text = if path == Path::new("-") {
        // Bounded like a request file: a pipe that never ends must not
        // grow this process without limit.
        let bytes = input::read_stream_bounded(std::io::stdin().lock(), input::limits::REQUEST)
            .context("reading the VM request from stdin")?;
        String::from_utf8(bytes).context("the VM request on stdin is not UTF-8")?
    } else {
        input::read_to_string_bounded(path, input::limits::REQUEST)
            .with_context(|| format!("reading VM request {}", path.display()))?
    };
    serde_json::from_str(&text).with_context(|| format!("VM request {}", path.display()))
}

/// The first and last `n` bytes of a file.
fn head_tail(file: &Path, n: u64) -> anyhow::Result<(Vec<u8>, Vec<u8>, u64)> {
    use std::os::unix::fs::FileExt;
    let input::Input { file: f, size, .. } = input::open(file, input::Accept::RegularOrBlock)
        .with_context(|| format!("opening {}", file.display()))?;
    let read = |off: u64, len: u64| -> anyhow::Result<Vec<u8>> {
        let mut buf = vec![0; cocoon_host::cast::usize_from(len)];
        f.read_exact_at(&mut buf, off)
            .with_context(|| format!("reading {}", file.display()))?;
        Ok(buf)
    };
    let head = read(0, size.min(n))?;
    let tail = read(size - size.min(n), size.min(n))?;
    Ok((head, tail, size))
}

fn call_plugin(plugin: &LoadedPlugin, call: Call, output: Format) -> anyhow::Result<i32> {
    match call {
        Call::Schemes => emit(output, &plugin.schemes()?, |s| println!("{}", s.join("\n")))?,
        Call::Resolve { reference } => {
            let artifacts = plugin.resolve(&reference, &Platform::host())?;
            emit(output, &artifacts, |a| {
                for a in a {
                    println!(
                        "{} {} {}",
                        a.url,
                        a.digest.as_deref().unwrap_or("-"),
                        a.format_hint.as_deref().unwrap_or("-")
                    );
                }
            })?
        }
        Call::Probe { file } => {
            let (head, tail, size) = head_tail(&file, 64 << 10)?;
            let r = plugin.probe(&head, &tail, size)?;
            emit(output, &r, |r| match r {
                Some(p) => println!("{} (confidence {})", p.format, p.confidence),
                None => println!("not recognised"),
            })?
        }
        Call::Map { file, format } => {
            let mut session = plugin.open_image(&file, &format)?;
            let virtual_size = session.virtual_size();
            let backing = session.backing()?;
            let mut extents = Vec::new();
            let mut at = 0;
            while at < virtual_size {
                let page = session.map(at, 1024)?;
                at = page.last().map_or(virtual_size, |e| e.offset + e.length);
                extents.extend(page);
            }
            #[derive(Serialize)]
            struct MapOutput<T> {
                virtual_size: u64,
                backing: Option<String>,
                extents: Vec<T>,
            }
            let out = MapOutput {
                virtual_size,
                backing,
                extents,
            };
            emit(output, &out, |o| {
                println!(
                    "virtual size {} bytes, backing {}",
                    o.virtual_size,
                    o.backing.as_deref().unwrap_or("-")
                );
                for e in &o.extents {
                    println!("{:>16} {:>16} {:?}", e.offset, e.length, e.kind);
                }
            })?
        }
        Call::Plan { request } => {
            let policy = Policy::from_plugin(plugin.clone())?;
            let disks = policy.plan(&read_request(&request)?)?;
            emit(output, &disks, |d| {
                for d in d {
                    println!(
                        "{:<20} {:<7} ro={} size={} file={}",
                        d.name,
                        d.role,
                        d.read_only,
                        d.size_bytes.map_or("-".into(), |s| s.to_string()),
                        d.file.as_deref().unwrap_or("-"),
                    );
                }
            })?
        }
        Call::Validate { request } => {
            let policy = Policy::from_plugin(plugin.clone())?;
            let violations = policy.validate(&read_request(&request)?)?;
            emit(output, &violations, |v| {
                for v in v {
                    println!("{v}");
                }
            })?;
            if !violations.is_empty() {
                return Ok(1);
            }
        }
    }
    Ok(0)
}
