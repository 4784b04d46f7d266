//! `cocoon-host image pull|list|inspect|rm|gc`.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::cli::output::{emit, Format};
use cocoon_host::config::HostConfig;
use cocoon_host::error_chain;
use cocoon_host::http::{redact, redact_text};
use cocoon_host::plugin::{Registry, Runtime};
use cocoon_host::store::{
    ConvertedImage, Digest, Found, PluginSources, PullPolicy, PullProgress, PullRequest, RefRecord,
    Store, StoreError,
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
    fn stop(&self) {
        if let Some(b) = self.bar.lock().unwrap().take() {
            b.finish_and_clear();
        }
    }
    fn stored(&self, what: &str, blob: &cocoon_host::store::VerifiedBlob) {
        eprintln!(
            "downloaded {what}: {} bytes, {}",
            blob.size(),
            blob.digest()
        );
    }
    fn warn(&self, message: &str) {
        eprintln!("warning: {}", redact_text(message));
    }
    fn note(&self, message: &str) {
        eprintln!("{}", redact_text(message));
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
    // A source's error may quote the reference, credentials and all.
    let scrub = |e: &dyn std::error::Error| anyhow::anyhow!("{}", redact_text(&error_chain(e)));
    let mut report = store
        .pull(&sources, &req, &progress)
        .map_err(|e| scrub(&e))?;
    let converted = match &a.convert {
        Some(target) => {
            let backend = cocoon_host::store::EngineBackend {
                runtime: &runtime,
                registry: &registry,
            };
            let disk_of = |r: &cocoon_host::store::PullReport| match r.record.disk() {
                Some(d) => Ok(d.digest.clone()),
                None => Err(anyhow::anyhow!(
                    "{}: no artifact is a disk image (none has a format hint); nothing to convert",
                    r.reference
                )),
            };
            match store.converted(&disk_of(&report)?, target, &backend) {
                // The source went bad since the pull verified it: the pull
                // fetches it again, then it is converted.
                Err(StoreError::SourceGone { .. }) => {
                    report = store
                        .pull(&sources, &req, &progress)
                        .map_err(|e| scrub(&e))?;
                    Some(store.converted(&disk_of(&report)?, target, &backend)?)
                }
                other => Some(other?),
            }
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

/// A unix time as people read it: RFC 3339 in UTC, to the second.
fn date(unix: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(unix);
    humantime::format_rfc3339_seconds(t).to_string()
}

pub fn list(a: ListArgs, config: &HostConfig) -> anyhow::Result<i32> {
    let store = Store::open(config)?;
    let refs = store.layout().list_refs()?;
    emit(a.output, &refs, |refs| {
        println!(
            "{:<60} {:<20} {:>12} {:<20} SOURCE",
            "REFERENCE", "DIGEST", "SIZE", "PULLED"
        );
        for r in refs {
            println!(
                "{:<60} {:<20} {:>12} {:<20} {}",
                r.reference,
                &r.digest().to_string()[..19],
                r.size(),
                date(r.pulled_at),
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
    /// Whether the kernel checks its reads (null: it cannot say).
    fsverity: Option<bool>,
}

#[derive(Serialize)]
struct ConversionState {
    #[serde(flatten)]
    image: ConvertedImage,
    /// Only with --verify; false means it was corrupt and is removed.
    verified: Option<bool>,
}

#[derive(Serialize)]
struct Inspected {
    #[serde(flatten)]
    record: RefRecord,
    blobs: Vec<BlobState>,
    conversions: Vec<ConversionState>,
}

/// `image inspect sha256:…`: one blob and who names it.
#[derive(Serialize)]
struct InspectedBlob {
    digest: Digest,
    size: Option<u64>,
    present: bool,
    verified: Option<bool>,
    fsverity: Option<bool>,
    /// The references whose records name this blob.
    references: Vec<String>,
    conversions: Vec<ConversionState>,
}

fn blob_state(
    store: &Store,
    digest: &Digest,
    size: Option<u64>,
    verify: bool,
) -> anyhow::Result<BlobState> {
    let layout = store.layout();
    let present = layout.present(digest, size).is_some();
    let verified = match verify {
        true => Some(layout.verified(digest)?.is_some()),
        false => None,
    };
    Ok(BlobState {
        digest: digest.clone(),
        present,
        verified,
        fsverity: cocoon_host::store::verity::is_enabled(&layout.blob_path(digest)),
    })
}

fn conversions(
    store: &Store,
    source: &Digest,
    verify: bool,
) -> anyhow::Result<Vec<ConversionState>> {
    store
        .layout()
        .conversions_of(source)
        .into_iter()
        .map(|image| {
            let verified = match verify {
                true => Some(store.verify_conversion(&image)?),
                false => None,
            };
            Ok(ConversionState { image, verified })
        })
        .collect()
}

fn state_word(present: bool, verified: Option<bool>) -> &'static str {
    match (present, verified) {
        (false, _) => "missing",
        (true, Some(false)) => "CORRUPT (removed)",
        (true, Some(true)) => "verified",
        (true, None) => "present",
    }
}

fn verity_word(on: Option<bool>) -> &'static str {
    match on {
        Some(true) => ", fs-verity on",
        Some(false) => ", fs-verity off",
        None => "",
    }
}

fn print_conversions(list: &[ConversionState]) {
    for c in list {
        let state = state_word(true, c.verified);
        println!(
            "  converted to {} by {} {}: {} {}",
            c.image.target,
            c.image.converter.name,
            &c.image.converter.sha256[..12],
            c.image.digest,
            state
        );
        println!("    path {}", c.image.path.display());
    }
}

pub fn inspect(a: InspectArgs, config: &HostConfig) -> anyhow::Result<i32> {
    let store = Store::open(config)?;
    let Some(found) = store.layout().lookup(&a.reference)? else {
        anyhow::bail!("{} is not in the store", redact(&a.reference));
    };
    let record = match found {
        Found::Reference(record) => record,
        Found::Digest { digest, records } => return inspect_blob(&store, &a, digest, records),
    };
    let mut blobs = Vec::new();
    let mut convs = Vec::new();
    for art in &record.artifacts {
        blobs.push(blob_state(&store, &art.digest, Some(art.size), a.verify)?);
        convs.extend(conversions(&store, &art.digest, a.verify)?);
    }
    let ok = blobs.iter().all(|b| b.present && b.verified != Some(false))
        && convs.iter().all(|c| c.verified != Some(false));
    let out = Inspected {
        record,
        blobs,
        conversions: convs,
    };
    emit(a.output, &out, |i| {
        println!("reference  {}", i.record.reference);
        println!("source     {}", i.record.source);
        println!("digest     {}", i.record.digest());
        println!("pulled at  {}", date(i.record.pulled_at));
        for (art, b) in i.record.artifacts.iter().zip(&i.blobs) {
            println!(
                "  {} {:>12} {} {}{}",
                art.digest,
                art.size,
                art.media_type,
                state_word(b.present, b.verified),
                verity_word(b.fsverity)
            );
            println!("    url {}", art.url);
            if let Some(e) = &art.etag {
                println!("    etag {e}");
            }
            if let Some(lm) = &art.last_modified {
                println!("    last-modified {lm}");
            }
        }
        print_conversions(&i.conversions);
    })?;
    Ok(if ok { 0 } else { 1 })
}

fn inspect_blob(
    store: &Store,
    a: &InspectArgs,
    digest: Digest,
    records: Vec<RefRecord>,
) -> anyhow::Result<i32> {
    let size = records
        .iter()
        .flat_map(|r| &r.artifacts)
        .find(|x| x.digest == digest)
        .map(|x| x.size);
    let b = blob_state(store, &digest, size, a.verify)?;
    let size = size.or_else(|| store.layout().present(&digest, None).map(|p| p.size()));
    let convs = conversions(store, &digest, a.verify)?;
    let ok =
        b.present && b.verified != Some(false) && convs.iter().all(|c| c.verified != Some(false));
    let out = InspectedBlob {
        digest,
        size,
        present: b.present,
        verified: b.verified,
        fsverity: b.fsverity,
        references: records.into_iter().map(|r| r.reference).collect(),
        conversions: convs,
    };
    emit(a.output, &out, |i| {
        println!("digest     {}", i.digest);
        if let Some(s) = i.size {
            println!("size       {s}");
        }
        println!(
            "state      {}{}",
            state_word(i.present, i.verified),
            verity_word(i.fsverity)
        );
        if i.references.is_empty() {
            println!("references none (image gc removes it)");
        }
        for r in &i.references {
            println!("reference  {r}");
        }
        print_conversions(&i.conversions);
    })?;
    Ok(if ok { 0 } else { 1 })
}

pub fn rm(a: RmArgs, config: &HostConfig) -> anyhow::Result<i32> {
    let store = Store::open(config)?;
    let mut removed = Vec::new();
    let mut missing = Vec::new();
    for name in &a.references {
        // A digest forgets every reference that names it.
        let references = match store.layout().lookup(name)? {
            Some(Found::Reference(r)) => vec![r.reference],
            Some(Found::Digest { records, .. }) => {
                records.into_iter().map(|r| r.reference).collect()
            }
            None => Vec::new(),
        };
        let mut any = false;
        for r in references {
            if store.remove(&r)? {
                removed.push(r);
                any = true;
            }
        }
        if !any {
            missing.push(redact(name).into_owned());
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
    // VMs and snapshots keep their images.
    let vms = cocoon_host::vm::Vms::open(&config.state_dir)?;
    let snapshots = cocoon_host::snapshot::SnapshotRoots {
        snapshots_dir: cocoon_host::snapshot::snapshots_dir(&config.state_dir),
    };
    let roots = cocoon_host::vm::roots::HostRoots {
        vms: cocoon_host::vm::roots::VmRoots(&vms),
        snapshots,
    };
    let report = store.gc(&roots, a.dry_run)?;
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
