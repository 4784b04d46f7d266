//! `cocoon-host image pull|list|inspect|rm|gc`.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::cli::output::{emit, Format};
use cocoon_host::config::HostConfig;
use cocoon_host::plugin::{Registry, Runtime};
use cocoon_host::store::{
    Digest, NoRoots, PluginSources, PullPolicy, PullProgress, PullRequest, RefRecord, Store,
};

#[derive(Debug, Args)]
pub struct PullArgs {
    /// The image: an http(s) URL (optionally `@sha256:<hex>`), a local
    /// file (`file:///…` or a path), `oci://HOST[:PORT]/REPO:TAG|@sha256:…`,
    /// or a scheme of an installed image-source plugin.
    reference: String,
    /// Download again even when the store holds a fresh copy.
    #[arg(long)]
    force: bool,
    /// The expected digest of the reference's first artifact
    /// (`sha256:<hex>`): any other bytes are refused.
    #[arg(long)]
    digest: Option<Digest>,
    /// When to go to the network for a reference without a digest.
    #[arg(long = "pull", value_enum, default_value_t)]
    policy: PullPolicy,
    /// Convert the pulled image to this format through the converter
    /// plugins (cached by source digest, format and converter digest).
    #[arg(long)]
    convert: Option<String>,
    #[arg(short, long, value_enum, default_value_t)]
    output: Format,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[arg(short, long, value_enum, default_value_t)]
    output: Format,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    reference: String,
    /// Re-hash every blob of the image.
    #[arg(long)]
    verify: bool,
    #[arg(short, long, value_enum, default_value_t)]
    output: Format,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// References to forget (their blobs go at the next `image gc`).
    #[arg(required = true)]
    references: Vec<String>,
    #[arg(short, long, value_enum, default_value_t)]
    output: Format,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Report what would be deleted, delete nothing.
    #[arg(long)]
    dry_run: bool,
    #[arg(short, long, value_enum, default_value_t)]
    output: Format,
}

/// Bars with bytes, rate and ETA on a terminal; plain lines otherwise.
struct Bars {
    tty: bool,
    bar: Mutex<Option<ProgressBar>>,
}

impl Bars {
    fn new() -> Self {
        Bars {
            tty: std::io::stderr().is_terminal(),
            bar: Mutex::new(None),
        }
    }
}

impl PullProgress for Bars {
    fn start(&self, what: &str, total: Option<u64>, already: u64) {
        let resumed = if already > 0 {
            format!(" (resuming at {already} bytes)")
        } else {
            String::new()
        };
        if !self.tty {
            match total {
                Some(t) => eprintln!("downloading {what}: {t} bytes{resumed}"),
                None => eprintln!("downloading {what}{resumed}"),
            }
            return;
        }
        let bar = match total {
            Some(t) => ProgressBar::new(t).with_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("static template")
                .progress_chars("=> "),
            ),
            None => ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template("{spinner} {msg} {bytes} {bytes_per_sec}")
                    .expect("static template"),
            ),
        };
        let name = what.rsplit('/').next().unwrap_or(what);
        bar.set_message(name.chars().take(40).collect::<String>());
        bar.set_position(already);
        bar.enable_steady_tick(Duration::from_millis(200));
        *self.bar.lock().unwrap() = Some(bar);
    }
    fn advance(&self, bytes: u64) {
        if let Some(b) = &*self.bar.lock().unwrap() {
            b.inc(bytes);
        }
    }
    fn finish(&self) {
        if let Some(b) = self.bar.lock().unwrap().take() {
            b.finish_and_clear();
        } else if !self.tty {
            eprintln!("downloaded");
        }
    }
    fn warn(&self, message: &str) {
        eprintln!("warning: {message}");
    }
    fn note(&self, message: &str) {
        eprintln!("{message}");
    }
}

#[derive(Serialize)]
struct PullOutput {
    #[serde(flatten)]
    report: cocoon_host::store::PullReport,
    converted: Option<cocoon_host::store::ConvertedImage>,
}

pub fn pull(a: PullArgs, config: &HostConfig) -> anyhow::Result<i32> {
    let store = Store::open(config)?;
    let runtime = Runtime::new(Some(config.state_dir.join("plugin-cache")))?;
    let registry = Registry::discover(config);
    let sources = PluginSources {
        runtime: &runtime,
        registry: &registry,
    };
    let req = PullRequest {
        reference: a.reference,
        digest: a.digest,
        policy: a.policy,
        force: a.force,
    };
    let progress = Bars::new();
    let report = store.pull(&sources, &req, &progress)?;
    let converted = match &a.convert {
        Some(target) => {
            let backend = cocoon_host::store::EngineBackend {
                runtime: &runtime,
                registry: &registry,
            };
            let Some(disk) = report.record.disk() else {
                anyhow::bail!(
                    "{}: no artifact is a disk image (none has a format hint); nothing to convert",
                    report.reference
                );
            };
            Some(store.converted(&disk.digest, target, &backend)?)
        }
        None => None,
    };
    emit(a.output, &PullOutput { report, converted }, |o| {
        let r = &o.report;
        println!(
            "{} {} ({} bytes, {} downloaded)",
            r.reference, r.digest, r.size, r.downloaded
        );
        if let Some(c) = &o.converted {
            println!("{} {} {}", c.target, c.digest, c.path.display());
        }
    })?;
    Ok(0)
}

pub fn list(a: ListArgs, config: &HostConfig) -> anyhow::Result<i32> {
    let store = Store::open(config)?;
    let refs = store.layout().list_refs()?;
    emit(a.output, &refs, |refs| {
        println!("{:<60} {:<20} {:>12} SOURCE", "REFERENCE", "DIGEST", "SIZE");
        for r in refs {
            println!(
                "{:<60} {:<20} {:>12} {}",
                r.reference,
                &r.digest().to_string()[..19],
                r.size(),
                r.source
            );
        }
    })?;
    Ok(0)
}

#[derive(Serialize)]
struct BlobState {
    digest: Digest,
    present: bool,
    /// Only with --verify.
    verified: Option<bool>,
}

#[derive(Serialize)]
struct Inspected {
    #[serde(flatten)]
    record: RefRecord,
    blobs: Vec<BlobState>,
}

pub fn inspect(a: InspectArgs, config: &HostConfig) -> anyhow::Result<i32> {
    let store = Store::open(config)?;
    let layout = store.layout();
    let Some(record) = layout.read_ref(&a.reference)? else {
        anyhow::bail!("{} is not in the store", a.reference);
    };
    let mut blobs = Vec::new();
    for art in &record.artifacts {
        let present = layout.present(&art.digest, Some(art.size)).is_some();
        let verified = if a.verify {
            Some(layout.verified(&art.digest)?.is_some())
        } else {
            None
        };
        blobs.push(BlobState {
            digest: art.digest.clone(),
            present,
            verified,
        });
    }
    let ok = blobs.iter().all(|b| b.present && b.verified != Some(false));
    emit(a.output, &Inspected { record, blobs }, |i| {
        println!("reference  {}", i.record.reference);
        println!("source     {}", i.record.source);
        println!("digest     {}", i.record.digest());
        println!("pulled at  {} (unix)", i.record.pulled_at);
        for (art, b) in i.record.artifacts.iter().zip(&i.blobs) {
            let state = match (b.present, b.verified) {
                (false, _) => "missing",
                (true, Some(false)) => "CORRUPT (removed)",
                (true, Some(true)) => "verified",
                (true, None) => "present",
            };
            println!(
                "  {} {:>12} {} {}",
                art.digest, art.size, art.media_type, state
            );
            println!("    url {}", art.url);
            if let Some(e) = &art.etag {
                println!("    etag {e}");
            }
            if let Some(lm) = &art.last_modified {
                println!("    last-modified {lm}");
            }
        }
    })?;
    Ok(if ok { 0 } else { 1 })
}

pub fn rm(a: RmArgs, config: &HostConfig) -> anyhow::Result<i32> {
    let store = Store::open(config)?;
    let mut removed = Vec::new();
    let mut missing = Vec::new();
    for r in &a.references {
        if store.remove(r)? {
            removed.push(r.clone());
        } else {
            missing.push(r.clone());
        }
    }
    #[derive(Serialize)]
    struct Out {
        removed: Vec<String>,
        not_found: Vec<String>,
    }
    emit(
        a.output,
        &Out {
            removed,
            not_found: missing.clone(),
        },
        |o| {
            for r in &o.removed {
                println!("removed {r}");
            }
            for r in &o.not_found {
                eprintln!("not in the store: {r}");
            }
        },
    )?;
    Ok(if missing.is_empty() { 0 } else { 1 })
}

pub fn gc(a: GcArgs, config: &HostConfig) -> anyhow::Result<i32> {
    let store = Store::open(config)?;
    let report = store.gc(&NoRoots, a.dry_run)?;
    emit(a.output, &report, |r| {
        let verb = if r.dry_run { "would remove" } else { "removed" };
        for d in &r.removed_blobs {
            println!("{verb} blob {d}");
        }
        for c in &r.removed_conversions {
            println!("{verb} conversion {c}");
        }
        println!(
            "{verb} {} blobs, {} conversions, {} partial files; {} bytes; kept {} blobs",
            r.removed_blobs.len(),
            r.removed_conversions.len(),
            r.removed_partials,
            r.freed_bytes,
            r.kept_blobs
        );
    })?;
    Ok(0)
}
