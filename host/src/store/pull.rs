//! `pull`: the rules of DESIGN.md's image store, in one place, as named
//! steps (the pin, the store's answer, resolving, fetching each artifact,
//! the record; conversion is [`Store::converted`], after the pull).
//!
//! - A pinned digest (`--digest`, or an `@sha256:` suffix) applies to the
//!   reference's first artifact. It is satisfied only by a blob of that
//!   digest, re-hashed now; the reference index is consulted for a pinned
//!   reference only to learn the *other* artifacts of a record whose first
//!   digest is the pin, never to map a URL to a digest.
//! - An unpinned reference follows the pull policy: `missing` reuses a
//!   complete record, `never` never touches the network, `always`
//!   revalidates each URL-addressed artifact with a conditional GET.
//! - Every blob a pull hands out is re-hashed now, pinned or not; a blob
//!   that no longer matches its digest is removed and fetched again.
//! - An unreachable server with a complete record: reuse, with a warning.
//! - The record is written after every blob it names is in the store.
//! - Credentials in a reference (`user:password@`) are used for the
//!   request and never stored or reported.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use super::blob::VerifiedBlob;
use super::digest::Digest;
use super::download::{Downloader, Limits, Outcome, Request, Validators};
pub use super::download::{Progress as PullProgress, Quiet};
use super::index::{ArtifactRecord, RefRecord};
use super::local::copy_local;
pub use super::local::local_path;
use super::lookup::{DigestQuery, Found};
use super::sources::{ArtifactSpec, Resolved, Sources};
use super::{Store, StoreError};
use crate::http::redact;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    /// Revalidate with the server (conditional GET).
    Always,
    /// Use what the store holds; download only what is missing.
    #[default]
    Missing,
    /// Never use the network; fail if the image is not in the store.
    Never,
}

#[derive(Debug, Clone)]
pub struct PullRequest {
    pub reference: String,
    /// `--digest`: pins the first artifact.
    pub digest: Option<Digest>,
    pub policy: PullPolicy,
    /// Download again even what is present and fresh.
    pub force: bool,
}

/// How a pull checks the blobs it finds already in the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HeldBlobs {
    /// Each is re-hashed now; one that no longer matches its digest is
    /// removed and fetched again (`image pull`).
    #[default]
    Rehash,
    /// Each is taken as the store committed it (hashed as it was written,
    /// renamed into place only then), so a pull of a cached image reads
    /// nothing. Only for callers whose every use of a blob re-hashes the
    /// bytes it reads: `run` and `create`, where a conversion re-hashes its
    /// source, a layer build its layer and the VM's base copy the
    /// converted file, so a blob that rotted still never boots; it is
    /// removed there, and the next pull fetches it again.
    AtUse,
}

/// What one pull did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PullReport {
    pub reference: String,
    pub digest: Digest,
    pub size: u64,
    /// Artifacts downloaded by this pull (the rest came from the store).
    pub downloaded: usize,
    /// Whether the network was used at all.
    pub network: bool,
    pub record: RefRecord,
    #[serde(skip)]
    pub blobs: Vec<VerifiedBlob>,
    pub warnings: Vec<String>,
}

/// The `@sha256:<hex>` suffix of a reference, if any.
pub fn suffix_pin(reference: &str) -> Result<Option<Digest>, StoreError> {
    match reference.rsplit_once("@sha256:") {
        None => Ok(None),
        Some((_, hex)) => {
            format!("sha256:{hex}")
                .parse()
                .map(Some)
                .map_err(|_| StoreError::BadReference {
                    reference: redact(reference).into_owned(),
                    reason: "the @sha256: suffix is not 64 lower-case hex digits".into(),
                })
        }
    }
}

/// The pin of a request: `--digest` and the suffix must agree.
fn pin_of(req: &PullRequest) -> Result<Option<Digest>, StoreError> {
    match (req.digest.clone(), suffix_pin(&req.reference)?) {
        (Some(a), Some(b)) if a != b => Err(StoreError::PinConflict {
            reference: redact(&req.reference).into_owned(),
            pinned: a,
            resolved: b,
        }),
        (a, b) => Ok(a.or(b)),
    }
}

/// Whether what the store holds may answer without asking anyone: the
/// pull policy says so, or the content is named by digest. A local file
/// is always looked at again (a stat is free).
pub fn offline_ok(policy: PullPolicy, pinned: bool, local: bool) -> bool {
    match (policy, pinned, local) {
        (PullPolicy::Never, _, _) => true,
        (_, true, _) => true,
        (_, false, true) => false,
        (PullPolicy::Missing, false, false) => true,
        (PullPolicy::Always, false, false) => false,
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Whether every blob of a record is in the store, re-hashed now.
enum Held {
    All(Vec<VerifiedBlob>),
    /// This blob is missing, or was corrupt and has been removed.
    Lacks(Digest),
}

/// One pull in progress: the request and what the store knew before.
struct Pull<'a> {
    store: &'a Store,
    sources: &'a dyn Sources,
    req: &'a PullRequest,
    progress: &'a dyn PullProgress,
    pin: Option<Digest>,
    /// The reference as it may be stored and shown.
    shown: String,
    previous: Option<RefRecord>,
    local: Option<PathBuf>,
    check: HeldBlobs,
}

/// One artifact in the store, and how it got there.
struct Fetched {
    blob: VerifiedBlob,
    validators: Validators,
    downloaded: bool,
    network: bool,
    warning: Option<String>,
}

impl Fetched {
    fn held(blob: VerifiedBlob, validators: Validators) -> Self {
        Fetched {
            blob,
            validators,
            downloaded: false,
            network: false,
            warning: None,
        }
    }
}

impl Store {
    /// Pulls `req.reference` into the store. A digest (`sha256:HEX`, or 12
    /// or more hex digits of one) pulls the image the store knows by it.
    pub fn pull(
        &self,
        sources: &dyn Sources,
        req: &PullRequest,
        progress: &dyn PullProgress,
    ) -> Result<PullReport, StoreError> {
        self.pull_checking(sources, req, progress, HeldBlobs::Rehash)
    }

    /// [`Store::pull`], with the blobs already in the store checked as
    /// `check` says.
    pub fn pull_checking(
        &self,
        sources: &dyn Sources,
        req: &PullRequest,
        progress: &dyn PullProgress,
        check: HeldBlobs,
    ) -> Result<PullReport, StoreError> {
        if local_path(&req.reference).is_none() {
            if let Some(query) = DigestQuery::parse(&req.reference)? {
                return self.pull_by_digest(sources, req, &query, progress, check);
            }
        }
        self.pull_reference(sources, req, progress, check)
    }

    /// Pulls a reference (not a digest): the steps in order.
    fn pull_reference(
        &self,
        sources: &dyn Sources,
        req: &PullRequest,
        progress: &dyn PullProgress,
        check: HeldBlobs,
    ) -> Result<PullReport, StoreError> {
        let pin = pin_of(req)?;
        let layout = self.layout();
        let _writer = layout.writer_lock()?;
        // One pull of a reference at a time, across processes: the others
        // wait here and then find the record the first one wrote.
        let _ref_lock = layout.lock(&super::index::ref_lock_name(&req.reference))?;
        let pull = Pull {
            store: self,
            sources,
            req,
            progress,
            pin,
            shown: redact(&req.reference).into_owned(),
            previous: layout.read_ref(&req.reference)?,
            local: local_path(&req.reference),
            check,
        };
        if let Some(report) = pull.answer_from_store()? {
            return Ok(report);
        }
        let resolved = match pull.resolve()? {
            Ok(resolved) => resolved,
            Err(fallback) => return Ok(fallback),
        };
        let artifacts = pull.check(resolved.artifacts, &resolved.source)?;
        let fetched = artifacts
            .iter()
            .map(|a| pull.fetch(a))
            .collect::<Result<Vec<_>, _>>()?;
        pull.record(resolved.source, &artifacts, fetched)
    }

    /// `pull sha256:…`: the image of a record naming that digest, from
    /// the store; fetched again through its reference when a blob is
    /// missing or corrupt.
    fn pull_by_digest(
        &self,
        sources: &dyn Sources,
        req: &PullRequest,
        query: &DigestQuery,
        progress: &dyn PullProgress,
        check: HeldBlobs,
    ) -> Result<PullReport, StoreError> {
        let found = self.layout().lookup_digest(query)?;
        let Some(Found::Digest {
            digest, records, ..
        }) = found
        else {
            return Err(StoreError::UnknownDigest {
                query: query.to_string(),
            });
        };
        if req.digest.as_ref().is_some_and(|d| *d != digest) {
            return Err(StoreError::PinConflict {
                reference: query.to_string(),
                pinned: req.digest.clone().expect("checked"),
                resolved: digest,
            });
        }
        let Some(record) = records.into_iter().next() else {
            return Err(StoreError::UnknownDigest {
                query: query.to_string(),
            });
        };
        // Through the record's reference, pinned when the digest is the
        // one the reference is known by: the usual rules then decide
        // whether the store's copy serves or a fetch is needed.
        let again = PullRequest {
            reference: record.reference.clone(),
            digest: (record.digest() == &digest).then_some(digest),
            policy: req.policy,
            force: req.force,
        };
        self.pull_reference(sources, &again, progress, check)
    }

    /// Every blob of `record`, each checked as `check` says.
    fn held(&self, record: &RefRecord, check: HeldBlobs) -> Result<Held, StoreError> {
        let mut out = Vec::new();
        for a in &record.artifacts {
            match self.held_blob(&a.digest, Some(a.size), check)? {
                Some(b) => out.push(b),
                None => return Ok(Held::Lacks(a.digest.clone())),
            }
        }
        Ok(Held::All(out))
    }
}

impl Store {
    /// The blob of `digest` if the store holds it, checked as `check` says.
    fn held_blob(
        &self,
        digest: &Digest,
        size: Option<u64>,
        check: HeldBlobs,
    ) -> Result<Option<VerifiedBlob>, StoreError> {
        match check {
            HeldBlobs::Rehash => self.layout().verified(digest),
            HeldBlobs::AtUse => Ok(self.layout().present(digest, size)),
        }
    }
}

impl Pull<'_> {
    /// Step 1: the store's own answer, when the pin and the policy let it
    /// give one. `Ok(None)`: go on to resolve.
    fn answer_from_store(&self) -> Result<Option<PullReport>, StoreError> {
        let never = self.req.policy == PullPolicy::Never;
        let mut lacks = None;
        if let Some(prev) = self.previous.as_ref().filter(|_| !self.req.force) {
            let matches_pin = self.pin.as_ref().is_none_or(|p| prev.digest() == p);
            let offline = offline_ok(self.req.policy, self.pin.is_some(), self.local.is_some());
            if matches_pin && offline {
                match self.store.held(prev, self.check)? {
                    Held::All(blobs) => {
                        self.progress.note(&format!(
                            "{}: in the store ({})",
                            self.shown,
                            prev.digest()
                        ));
                        return Ok(Some(self.report(prev.clone(), blobs, 0, false, Vec::new())));
                    }
                    Held::Lacks(d) => lacks = Some(d),
                }
            }
        }
        if never {
            return Err(match lacks {
                Some(digest) => StoreError::LacksBlob {
                    reference: self.shown.clone(),
                    digest,
                },
                None => StoreError::NotPresent {
                    reference: self.shown.clone(),
                },
            });
        }
        Ok(None)
    }

    /// Step 2: what the reference names now. A local file is its own
    /// artifact; anything else asks the sources. `Err(report)`: the source
    /// is unreachable and the store's copy serves instead.
    fn resolve(&self) -> Result<Result<Resolved, PullReport>, StoreError> {
        if let Some(path) = &self.local {
            return Ok(Ok(Resolved {
                source: "file".into(),
                artifacts: vec![ArtifactSpec {
                    url: format!("file://{}", path.display()),
                    digest: None,
                    size: None,
                    media_type: "application/octet-stream".into(),
                    format_hint: None,
                    headers: Vec::new(),
                }],
            }));
        }
        let e = match resolve_with_retries(self.sources, &self.req.reference, &self.shown) {
            Ok(r) => return Ok(Ok(r)),
            Err(e) if e.is_unreachable() => e,
            Err(e) => return Err(e),
        };
        // The registry is down: what we hold is better than nothing, as
        // long as it satisfies the pin.
        let prev = self
            .previous
            .as_ref()
            .filter(|p| self.pin.as_ref().is_none_or(|d| p.digest() == d));
        if let Some(prev) = prev {
            if let Held::All(blobs) = self.store.held(prev, self.check)? {
                let w = format!(
                    "{}: source unreachable ({}); using the copy in the store ({})",
                    self.shown,
                    super::chain(&e),
                    prev.digest()
                );
                self.progress.warn(&w);
                return Ok(Err(self.report(prev.clone(), blobs, 0, true, vec![w])));
            }
        }
        Err(e)
    }

    /// Step 3: the resolved artifacts, checked: at least one, only http(s)
    /// from a source, and the pin applied to the first.
    fn check(
        &self,
        mut artifacts: Vec<ArtifactSpec>,
        source: &str,
    ) -> Result<Vec<ArtifactSpec>, StoreError> {
        let bad = |reason: String| StoreError::BadReference {
            reference: self.shown.clone(),
            reason,
        };
        if self.local.is_none() {
            // A source says where to download from, never what the host
            // reads locally: only http(s) URLs are downloaded.
            if let Some(a) = artifacts
                .iter()
                .find(|a| !(a.url.starts_with("https://") || a.url.starts_with("http://")))
            {
                return Err(bad(format!(
                    "source {source} returned artifact URL {:?}; only http(s) is downloaded",
                    redact(&a.url)
                )));
            }
        }
        let Some(first) = artifacts.first_mut() else {
            return Err(StoreError::NoArtifacts {
                reference: self.shown.clone(),
            });
        };
        if let Some(pin) = &self.pin {
            match &first.digest {
                Some(d) if d != pin => {
                    return Err(StoreError::PinConflict {
                        reference: self.shown.clone(),
                        pinned: pin.clone(),
                        resolved: d.clone(),
                    })
                }
                _ => first.digest = Some(pin.clone()),
            }
        }
        Ok(artifacts)
    }

    /// Step 4: one artifact into the store, downloaded and verified or
    /// found there (re-hashed).
    fn fetch(&self, a: &ArtifactSpec) -> Result<Fetched, StoreError> {
        let fetched = match &a.digest {
            Some(d) => self.fetch_pinned(a, d)?,
            None => self.revalidate(a)?,
        };
        if let Some(size) = a.size.filter(|s| *s != fetched.blob.size()) {
            return Err(StoreError::SizeMismatch {
                url: redact(&a.url).into_owned(),
                expected: size,
                actual: fetched.blob.size(),
            });
        }
        Ok(fetched)
    }

    /// What the previous record says about the artifact at `url`.
    fn previous_artifact(&self, url: &str) -> Option<&ArtifactRecord> {
        let shown = redact(url);
        self.previous
            .as_ref()?
            .artifacts
            .iter()
            .find(|r| r.url == shown)
    }

    /// An artifact named by digest: the blob of that digest if it is
    /// present and still hashes to it, else a download.
    fn fetch_pinned(&self, a: &ArtifactSpec, digest: &Digest) -> Result<Fetched, StoreError> {
        let layout = self.store.layout();
        let _blob_lock = layout.lock(&format!("1-blob-{}", digest.hex()))?;
        let have = if self.req.force {
            None
        } else {
            self.store.held_blob(digest, a.size, self.check)?
        };
        if let Some(blob) = have {
            let validators = self
                .previous_artifact(&a.url)
                .map(validators_of)
                .unwrap_or_default();
            return Ok(Fetched::held(blob, validators));
        }
        match self.transfer(a, None)? {
            Outcome::Fetched { blob, validators } => Ok(self.fetched(blob, validators)),
            Outcome::NotModified => unreachable!("no conditional request was made"),
        }
    }

    /// An artifact named by URL only: a conditional request when the
    /// store holds a verified copy (304 keeps it), else a download.
    fn revalidate(&self, a: &ArtifactSpec) -> Result<Fetched, StoreError> {
        let held = match self.previous_artifact(&a.url).filter(|_| !self.req.force) {
            Some(p) => self
                .store
                .held_blob(&p.digest, Some(p.size), self.check)?
                .map(|b| (p, b)),
            None => None,
        };
        let conditional = held.as_ref().map(|(p, _)| validators_of(p));
        match self.transfer(a, conditional.as_ref()) {
            Ok(Outcome::Fetched { blob, validators }) => Ok(self.fetched(blob, validators)),
            Ok(Outcome::NotModified) => {
                let (p, b) = held.expect("conditional only with a held copy");
                self.progress
                    .note(&format!("{}: not modified", redact(&a.url)));
                Ok(Fetched {
                    network: self.local.is_none(),
                    ..Fetched::held(b, validators_of(p))
                })
            }
            Err(e) if e.is_unreachable() && held.is_some() => {
                let (p, b) = held.expect("checked");
                let w = format!(
                    "{}: server unreachable ({}); using the copy in the store ({})",
                    redact(&a.url),
                    super::chain(&e),
                    p.digest
                );
                self.progress.warn(&w);
                Ok(Fetched {
                    network: true,
                    warning: Some(w),
                    ..Fetched::held(b, validators_of(p))
                })
            }
            Err(e) => Err(e),
        }
    }

    fn fetched(&self, blob: VerifiedBlob, validators: Validators) -> Fetched {
        Fetched {
            blob,
            validators,
            downloaded: true,
            network: self.local.is_none(),
            warning: None,
        }
    }

    /// The transfer itself: a local copy or a download.
    fn transfer(
        &self,
        a: &ArtifactSpec,
        conditional: Option<&Validators>,
    ) -> Result<Outcome, StoreError> {
        let layout = self.store.layout();
        if let Some(path) = &self.local {
            let known = conditional.and_then(|c| c.etag.as_deref());
            return copy_local(layout, path, a.digest.as_ref(), known, self.progress)
                .map(|(o, _)| o);
        }
        let req = Request {
            url: &a.url,
            headers: &a.headers,
            expected: a.digest.as_ref(),
            expected_size: a.size,
            conditional,
        };
        Downloader::new(Limits::from(self.store.settings())).download(layout, &req, self.progress)
    }

    /// Step 5: the record, written after every blob it names is in the
    /// store.
    fn record(
        &self,
        source: String,
        artifacts: &[ArtifactSpec],
        fetched: Vec<Fetched>,
    ) -> Result<PullReport, StoreError> {
        let mut records = Vec::new();
        let mut blobs = Vec::new();
        let (mut downloaded, mut network, mut warnings) = (0, false, Vec::new());
        for (a, f) in artifacts.iter().zip(fetched) {
            downloaded += usize::from(f.downloaded);
            network |= f.network;
            warnings.extend(f.warning);
            records.push(ArtifactRecord {
                url: redact(&a.url).into_owned(),
                digest: f.blob.digest().clone(),
                size: f.blob.size(),
                media_type: a.media_type.clone(),
                format_hint: a.format_hint.clone(),
                pinned: a.digest.is_some(),
                etag: f.validators.etag,
                last_modified: f.validators.last_modified,
            });
            blobs.push(f.blob);
        }
        let record = RefRecord {
            reference: self.shown.clone(),
            source,
            pulled_at: now(),
            artifacts: records,
        };
        // A pull that confirmed the record (a cached image, a 304) leaves
        // it as it is: rewriting it would cost two fsyncs on every `run`
        // for nothing but a newer `pulled_at`.
        if let Some(prev) = self.previous.as_ref().filter(|p| {
            downloaded == 0 && p.source == record.source && p.artifacts == record.artifacts
        }) {
            return Ok(self.report(prev.clone(), blobs, downloaded, network, warnings));
        }
        // After the data it describes: a crash before this line leaves
        // blobs without a record (gc reclaims them), never the reverse.
        super::crash_point("before-record");
        self.store.layout().write_ref(&record)?;
        Ok(self.report(record, blobs, downloaded, network, warnings))
    }

    fn report(
        &self,
        record: RefRecord,
        blobs: Vec<VerifiedBlob>,
        downloaded: usize,
        network: bool,
        warnings: Vec<String>,
    ) -> PullReport {
        PullReport {
            reference: self.shown.clone(),
            digest: record.digest().clone(),
            size: record.size(),
            downloaded,
            network,
            record,
            blobs,
            warnings,
        }
    }
}

fn validators_of(a: &ArtifactRecord) -> Validators {
    Validators {
        etag: a.etag.clone(),
        last_modified: a.last_modified.clone(),
    }
}

/// Resolves, retrying a source that could not reach its server: a
/// registry blip should not fail a pull, nor fall back to an old copy.
fn resolve_with_retries(
    sources: &dyn Sources,
    reference: &str,
    shown: &str,
) -> Result<Resolved, StoreError> {
    let mut pause = std::time::Duration::from_millis(250);
    for _ in 0..2 {
        match sources.resolve(reference) {
            Err(e) if e.is_unreachable() => {
                tracing::info!(reference = shown, error = %e, "source unreachable; retrying");
                std::thread::sleep(pause);
                pause *= 2;
            }
            other => return other,
        }
    }
    sources.resolve(reference)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins() {
        let hex = "a".repeat(64);
        assert_eq!(
            suffix_pin(&format!("https://x/y@sha256:{hex}"))
                .unwrap()
                .unwrap()
                .hex(),
            hex
        );
        assert!(suffix_pin("https://x/y").unwrap().is_none());
        assert!(suffix_pin("https://x/y@sha256:zz").is_err());
        let req = |digest: Option<&str>, reference: String| PullRequest {
            reference,
            digest: digest.map(|d| d.parse().unwrap()),
            policy: PullPolicy::Missing,
            force: false,
        };
        let a = format!("sha256:{hex}");
        let b = format!("sha256:{}", "b".repeat(64));
        assert_eq!(
            pin_of(&req(Some(&a), "https://x/y".into())).unwrap(),
            Some(a.parse().unwrap())
        );
        assert_eq!(
            pin_of(&req(Some(&a), format!("https://x/y@{a}"))).unwrap(),
            Some(a.parse().unwrap())
        );
        assert!(matches!(
            pin_of(&req(Some(&b), format!("https://u:secret@x/y@{a}"))),
            Err(StoreError::PinConflict { reference, .. }) if !reference.contains("secret")
        ));
    }

    #[test]
    fn when_the_store_answers_alone() {
        use PullPolicy::*;
        let cases = [
            // (policy, pinned, local) -> offline
            ((Never, false, false), true),
            ((Never, false, true), true),
            ((Missing, true, false), true),
            ((Always, true, false), true),
            ((Always, true, true), true),
            ((Missing, false, true), false),
            ((Always, false, true), false),
            ((Missing, false, false), true),
            ((Always, false, false), false),
        ];
        for ((policy, pinned, local), want) in cases {
            assert_eq!(
                offline_ok(policy, pinned, local),
                want,
                "{policy:?} pinned={pinned} local={local}"
            );
        }
    }
}
