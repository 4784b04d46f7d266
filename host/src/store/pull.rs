//! `pull`: the image store's rules (README, "Images"), in one place.
//!
//! - A pinned digest (`--digest`, or an `@sha256:` suffix) applies to the
//!   reference's first artifact. It is satisfied only by a blob of that
//!   digest, re-hashed now; the reference index is consulted for a pinned
//!   reference only to learn the *other* artifacts of a record whose first
//!   digest is the pin, never to map a URL to a digest.
//! - An unpinned reference follows the pull policy: `missing` reuses a
//!   complete record, `never` never touches the network, `always`
//!   revalidates each URL-addressed artifact with a conditional GET.
//! - An unreachable server with a complete record: reuse, with a warning.
//! - The record is written after every blob it names is in the store.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::blob::VerifiedBlob;
use super::digest::Digest;
use super::download::{copy_local, Downloader, Outcome, Request, Validators};
pub use super::download::{Progress as PullProgress, Quiet};
use super::index::{ArtifactRecord, RefRecord};
use super::sources::{ArtifactSpec, Resolved, Sources};
use super::{Store, StoreError};

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
                    reference: reference.into(),
                    reason: "the @sha256: suffix is not 64 lower-case hex digits".into(),
                })
        }
    }
}

/// A local file reference: `file:///abs` or a path (absolute, or starting
/// with `.`), made absolute.
pub fn local_path(reference: &str) -> Option<PathBuf> {
    let p = if let Some(rest) = reference.strip_prefix("file://") {
        PathBuf::from(rest)
    } else if reference.contains("://") {
        return None;
    } else if reference.starts_with('/') || reference.starts_with('.') {
        PathBuf::from(reference)
    } else {
        return None;
    };
    std::path::absolute(p).ok()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Store {
    /// Pulls `req.reference` into the store.
    pub fn pull(
        &self,
        sources: &dyn Sources,
        req: &PullRequest,
        progress: &dyn PullProgress,
    ) -> Result<PullReport, StoreError> {
        let reference = req.reference.as_str();
        let pin = match (req.digest.clone(), suffix_pin(reference)?) {
            (Some(a), Some(b)) if a != b => {
                return Err(StoreError::PinConflict {
                    reference: reference.into(),
                    pinned: a,
                    resolved: b,
                })
            }
            (a, b) => a.or(b),
        };
        let layout = self.layout();
        let _writer = layout.writer_lock()?;
        // One pull of a reference at a time, across processes: the others
        // wait here and then find the record the first one wrote.
        let _ref_lock = layout.lock(&format!("0-ref-{}", super::index::key(reference)))?;
        let previous = layout.read_ref(reference)?;
        let local = local_path(reference);

        if !req.force {
            if let Some(prev) = &previous {
                let matches_pin = pin.as_ref().is_none_or(|p| prev.digest() == p);
                let offline_ok = match (req.policy, &pin, &local) {
                    (PullPolicy::Never, _, _) => true,
                    // Content named by digest cannot go stale.
                    (_, Some(_), _) => true,
                    // A local file is revalidated by stat, which is free.
                    (_, None, Some(_)) => false,
                    (PullPolicy::Missing, None, None) => true,
                    (PullPolicy::Always, None, None) => false,
                };
                if matches_pin && offline_ok {
                    if let Some(blobs) = self.complete(prev, pin.is_some())? {
                        progress.note(&format!("{reference}: in the store ({})", prev.digest()));
                        return Ok(report(reference, prev.clone(), blobs, 0, false, Vec::new()));
                    }
                }
            }
            if req.policy == PullPolicy::Never {
                return Err(StoreError::NotPresent {
                    reference: reference.into(),
                });
            }
        } else if req.policy == PullPolicy::Never {
            return Err(StoreError::NotPresent {
                reference: reference.into(),
            });
        }

        let mut warnings = Vec::new();
        let resolved = match &local {
            Some(path) => Resolved {
                source: "file".into(),
                artifacts: vec![ArtifactSpec {
                    url: format!("file://{}", path.display()),
                    digest: None,
                    size: None,
                    media_type: "application/octet-stream".into(),
                    format_hint: None,
                    headers: Vec::new(),
                }],
            },
            None => match resolve_with_retries(sources, reference) {
                Ok(r) => r,
                Err(e) if e.is_unreachable() => {
                    // The registry is down: what we hold is better than
                    // nothing, as long as it satisfies the pin.
                    if let Some(prev) = previous
                        .as_ref()
                        .filter(|p| pin.as_ref().is_none_or(|d| p.digest() == d))
                    {
                        if let Some(blobs) = self.complete(prev, pin.is_some())? {
                            let w = format!("{reference}: source unreachable ({}); using the copy in the store ({})", super::chain(&e), prev.digest());
                            progress.warn(&w);
                            return Ok(report(reference, prev.clone(), blobs, 0, true, vec![w]));
                        }
                    }
                    return Err(e);
                }
                Err(e) => return Err(e),
            },
        };
        let mut artifacts = resolved.artifacts;
        if local.is_none() {
            // A source says where to download from, never what the host
            // reads locally: only http(s) URLs are downloaded.
            if let Some(a) = artifacts
                .iter()
                .find(|a| !(a.url.starts_with("https://") || a.url.starts_with("http://")))
            {
                return Err(StoreError::BadReference {
                    reference: reference.into(),
                    reason: format!(
                        "source {} returned artifact URL {:?}; only http(s) is downloaded",
                        resolved.source, a.url
                    ),
                });
            }
        }
        let Some(first) = artifacts.first_mut() else {
            return Err(StoreError::NoArtifacts {
                reference: reference.into(),
            });
        };
        if let Some(pin) = &pin {
            match &first.digest {
                Some(d) if d != pin => {
                    return Err(StoreError::PinConflict {
                        reference: reference.into(),
                        pinned: pin.clone(),
                        resolved: d.clone(),
                    })
                }
                _ => first.digest = Some(pin.clone()),
            }
        }

        let downloader = Downloader::new();
        let mut records = Vec::new();
        let mut blobs = Vec::new();
        let mut downloaded = 0;
        let mut network = false;
        for a in &artifacts {
            let prev = previous
                .as_ref()
                .and_then(|p| p.artifacts.iter().find(|r| r.url == a.url));
            let (blob, validators) = match &a.digest {
                Some(d) => {
                    let _blob_lock = layout.lock(&format!("1-blob-{}", d.hex()))?;
                    let have = if req.force { None } else { layout.verified(d)? };
                    match have {
                        Some(b) => (
                            b,
                            prev.map(|p| Validators {
                                etag: p.etag.clone(),
                                last_modified: p.last_modified.clone(),
                            })
                            .unwrap_or_default(),
                        ),
                        None => {
                            network |= local.is_none();
                            let (outcome, _) =
                                self.fetch(&downloader, a, local.as_deref(), None, progress)?;
                            match outcome {
                                Outcome::Fetched { blob, validators } => {
                                    downloaded += 1;
                                    (blob, validators)
                                }
                                Outcome::NotModified => {
                                    unreachable!("no conditional request was made")
                                }
                            }
                        }
                    }
                }
                None => {
                    // What we hold for this URL, if its blob is still here.
                    let held = prev
                        .filter(|_| !req.force)
                        .and_then(|p| layout.present(&p.digest, Some(p.size)).map(|b| (p, b)));
                    let conditional = held.as_ref().map(|(p, _)| Validators {
                        etag: p.etag.clone(),
                        last_modified: p.last_modified.clone(),
                    });
                    network |= local.is_none();
                    match self.fetch(
                        &downloader,
                        a,
                        local.as_deref(),
                        conditional.as_ref(),
                        progress,
                    ) {
                        Ok((Outcome::Fetched { blob, validators }, _)) => {
                            downloaded += 1;
                            (blob, validators)
                        }
                        Ok((Outcome::NotModified, _)) => {
                            let (p, b) = held.expect("conditional only with a held copy");
                            progress.note(&format!("{}: not modified", a.url));
                            (
                                b,
                                Validators {
                                    etag: p.etag.clone(),
                                    last_modified: p.last_modified.clone(),
                                },
                            )
                        }
                        Err(e) if e.is_unreachable() && held.is_some() => {
                            let (p, b) = held.expect("checked");
                            let w = format!(
                                "{}: server unreachable ({}); using the copy in the store ({})",
                                a.url,
                                super::chain(&e),
                                p.digest
                            );
                            progress.warn(&w);
                            warnings.push(w);
                            (
                                b,
                                Validators {
                                    etag: p.etag.clone(),
                                    last_modified: p.last_modified.clone(),
                                },
                            )
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
            if let Some(size) = a.size {
                if size != blob.size() {
                    return Err(StoreError::SizeMismatch {
                        url: a.url.clone(),
                        expected: size,
                        actual: blob.size(),
                    });
                }
            }
            records.push(ArtifactRecord {
                url: a.url.clone(),
                digest: blob.digest().clone(),
                size: blob.size(),
                media_type: a.media_type.clone(),
                format_hint: a.format_hint.clone(),
                pinned: a.digest.is_some(),
                etag: validators.etag,
                last_modified: validators.last_modified,
            });
            blobs.push(blob);
        }
        let record = RefRecord {
            reference: reference.into(),
            source: resolved.source,
            pulled_at: now(),
            artifacts: records,
        };
        // After the data it describes: a crash before this line leaves
        // blobs without a record (gc reclaims them), never the reverse.
        super::crash_point("before-record");
        layout.write_ref(&record)?;
        Ok(report(
            reference, record, blobs, downloaded, network, warnings,
        ))
    }

    fn fetch(
        &self,
        downloader: &Downloader,
        a: &ArtifactSpec,
        local: Option<&Path>,
        conditional: Option<&Validators>,
        progress: &dyn PullProgress,
    ) -> Result<(Outcome, Option<String>), StoreError> {
        match local {
            Some(path) => {
                let known = conditional.and_then(|c| c.etag.as_deref());
                let (o, v) = copy_local(self.layout(), path, a.digest.as_ref(), known, progress)?;
                Ok((o, Some(v)))
            }
            None => {
                let req = Request {
                    url: &a.url,
                    headers: &a.headers,
                    expected: a.digest.as_ref(),
                    expected_size: a.size,
                    conditional,
                };
                Ok((downloader.download(self.layout(), &req, progress)?, None))
            }
        }
    }

    /// The blobs of every artifact of `record`, if all are present;
    /// re-hashed when `rehash` (a pinned pull promises verified data).
    fn complete(
        &self,
        record: &RefRecord,
        rehash: bool,
    ) -> Result<Option<Vec<VerifiedBlob>>, StoreError> {
        let mut out = Vec::new();
        for a in &record.artifacts {
            let blob = if rehash {
                self.layout().verified(&a.digest)?
            } else {
                self.layout().present(&a.digest, Some(a.size))
            };
            match blob {
                Some(b) => out.push(b),
                None => return Ok(None),
            }
        }
        Ok(Some(out))
    }
}

/// Resolves, retrying a source that could not reach its server: a
/// registry blip should not fail a pull, nor fall back to an old copy.
fn resolve_with_retries(sources: &dyn Sources, reference: &str) -> Result<Resolved, StoreError> {
    let mut pause = std::time::Duration::from_millis(250);
    for _ in 0..2 {
        match sources.resolve(reference) {
            Err(e) if e.is_unreachable() => {
                tracing::info!(reference, error = %e, "source unreachable; retrying");
                std::thread::sleep(pause);
                pause *= 2;
            }
            other => return other,
        }
    }
    sources.resolve(reference)
}

fn report(
    reference: &str,
    record: RefRecord,
    blobs: Vec<VerifiedBlob>,
    downloaded: usize,
    network: bool,
    warnings: Vec<String>,
) -> PullReport {
    PullReport {
        reference: reference.into(),
        digest: record.digest().clone(),
        size: record.size(),
        downloaded,
        network,
        record,
        blobs,
        warnings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_and_local_paths() {
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
        assert_eq!(local_path("file:///a/b"), Some(PathBuf::from("/a/b")));
        assert_eq!(local_path("/a/b"), Some(PathBuf::from("/a/b")));
        assert!(local_path("https://a/b").is_none());
        assert!(local_path("site://x").is_none());
    }
}
