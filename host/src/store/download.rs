//! The host's downloader: every blob of every source comes through here.
//! Bytes are hashed as they are written to a staged file in `tmp/`; the
//! file becomes a blob only through [`Layout::commit`]. Transient failures
//! are retried with backoff, and an interrupted transfer resumes with
//! `Range` + `If-Range` when the server gave a validator (or the digest is
//! pinned, which checks the result anyway).

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use super::blob::{Layout, Staged, VerifiedBlob};
use super::digest::Digest;
use super::StoreError;
use crate::fsutil;

const ATTEMPTS: u32 = 6;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const CHUNK: usize = 1 << 20;

/// Progress of transfers; the CLI draws bars or prints lines.
pub trait Progress: Sync {
    /// A transfer of `what` starts (or resumes at `already` bytes).
    fn start(&self, _what: &str, _total: Option<u64>, _already: u64) {}
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {}
    /// Something the user should know that does not stop the pull.
    fn warn(&self, message: &str) {
        tracing::warn!("{message}");
    }
    /// A step that needs no transfer (cache hit, 304).
    fn note(&self, _message: &str) {}
}

/// Reports nothing (warnings still go to the log).
pub struct Quiet;
impl Progress for Quiet {}

/// Freshness data of a response.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Validators {
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

impl Validators {
    fn is_empty(&self) -> bool {
        self.etag.is_none() && self.last_modified.is_none()
    }

    /// What `If-Range` may carry: a strong ETag or a date, never a weak
    /// ETag.
    fn if_range(&self) -> Option<&str> {
        let strong = self.etag.as_deref().filter(|e| !e.starts_with("W/"));
        strong.or(self.last_modified.as_deref())
    }
}

/// A resumable partial download's record: what it is a part of.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct PartialMeta {
    url: String,
    validators: Validators,
}

pub struct Request<'a> {
    pub url: &'a str,
    pub headers: &'a [(String, String)],
    pub expected: Option<&'a Digest>,
    pub expected_size: Option<u64>,
    /// Validators of the copy we hold: sent as If-None-Match /
    /// If-Modified-Since, so a 304 means "keep it".
    pub conditional: Option<&'a Validators>,
}

pub enum Outcome {
    NotModified,
    Fetched {
        blob: VerifiedBlob,
        validators: Validators,
    },
}

/// One HTTP agent per process; connections are reused across blobs.
pub struct Downloader {
    agent: ureq::Agent,
}

impl Default for Downloader {
    fn default() -> Self {
        Self::new()
    }
}

fn header(resp: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

enum Attempt {
    /// 304 to a conditional request: keep the copy we hold.
    NotModified,
    /// The whole body is in the staged file; the caller commits it.
    Complete,
    /// Try again after a pause; the error is what to report if it was the
    /// last attempt.
    Retry(StoreError),
}

fn transient(e: &StoreError) -> bool {
    matches!(e, StoreError::Transport { .. })
        || matches!(e, StoreError::Http { status, .. } if *status >= 500 || *status == 408 || *status == 429)
}

impl Downloader {
    pub fn new() -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(10)
            // Registries send blobs to storage on other hosts; the
            // bearer token must not follow them there.
            .redirect_auth_headers(ureq::config::RedirectAuthHeaders::Never)
            .proxy(None)
            .timeout_connect(Some(Duration::from_secs(15)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .user_agent(concat!("cocoon-host/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Downloader { agent }
    }

    /// Downloads `req.url` into the store.
    pub fn download(
        &self,
        layout: &Layout,
        req: &Request<'_>,
        progress: &dyn Progress,
    ) -> Result<Outcome, StoreError> {
        let key = match req.expected {
            Some(d) => format!("d-{}", d.hex()),
            None => format!("u-{}", super::index::key(req.url)),
        };
        // Two references may lead to one URL: the staged file is theirs to
        // share only one at a time, or one's hash would describe a file
        // the other also wrote to.
        let _stage_lock = layout.lock(&format!("1-stage-{key}"))?;
        let meta_path = layout.tmp_dir().join(format!("{key}.partial.json"));
        let earlier: Option<PartialMeta> = fs::read(&meta_path)
            .ok()
            .and_then(|t| serde_json::from_slice(&t).ok());
        let resumable = earlier.as_ref().is_some_and(|m| {
            m.url == req.url && (m.validators.if_range().is_some() || req.expected.is_some())
        });
        let mut validators = earlier
            .filter(|_| resumable)
            .map(|m| m.validators)
            .unwrap_or_default();
        let mut staged = Staged::open(layout, &key, resumable)?;
        let mut from_scratch_once = false;
        let mut last_err = None;
        let mut attempt = 0;
        while attempt < ATTEMPTS {
            if attempt > 0 {
                let pause = FIRST_BACKOFF
                    .saturating_mul(1 << (attempt - 1))
                    .min(MAX_BACKOFF);
                std::thread::sleep(pause);
            }
            attempt += 1;
            let resumed = !staged.is_empty();
            match self.attempt(req, &mut staged, &mut validators, progress)? {
                Attempt::NotModified => {
                    staged.discard();
                    return Ok(Outcome::NotModified);
                }
                Attempt::Complete => {
                    match layout.commit(staged, req.url, req.expected, req.expected_size) {
                        Ok(blob) => return Ok(Outcome::Fetched { blob, validators }),
                        Err(StoreError::DigestMismatch { .. }) if resumed && !from_scratch_once => {
                            // The part kept from before may be what was wrong
                            // (a server without validators changed the file):
                            // once more from the start.
                            tracing::warn!(
                                url = req.url,
                                "digest mismatch after a resumed download; retrying from the start"
                            );
                            from_scratch_once = true;
                            validators = Validators::default();
                            staged = Staged::open(layout, &key, false)?;
                            attempt = 0;
                        }
                        Err(e) => return Err(e),
                    }
                }
                Attempt::Retry(e) if transient(&e) => {
                    tracing::info!(url = req.url, attempt, error = %e, "transient download failure; retrying");
                    last_err = Some(e);
                }
                Attempt::Retry(e) => {
                    staged.discard();
                    return Err(e);
                }
            }
        }
        // Keep the partial file: a later run resumes it.
        staged.flush()?;
        Err(last_err.expect("at least one attempt"))
    }

    /// One HTTP exchange.
    fn attempt(
        &self,
        req: &Request<'_>,
        staged: &mut Staged,
        validators: &mut Validators,
        progress: &dyn Progress,
    ) -> Result<Attempt, StoreError> {
        let mut builder = self.agent.get(req.url);
        for (k, v) in req.headers {
            builder = builder.header(k.as_str(), v.as_str());
        }
        let if_range = validators.if_range().map(str::to_string);
        if !staged.is_empty() && if_range.is_none() && req.expected.is_none() {
            // Without a validator a resumed body could belong to a newer
            // version of the file, and nothing would catch the splice.
            staged.restart()?;
        }
        let resuming = !staged.is_empty();
        let mut conditional = false;
        if resuming {
            builder = builder.header("Range", format!("bytes={}-", staged.len()));
            if let Some(v) = &if_range {
                builder = builder.header("If-Range", v.as_str());
            }
        } else if let Some(c) = req.conditional {
            if let Some(e) = &c.etag {
                builder = builder.header("If-None-Match", e.as_str());
                conditional = true;
            }
            if let Some(lm) = &c.last_modified {
                builder = builder.header("If-Modified-Since", lm.as_str());
                conditional = true;
            }
        }
        let transport = |e: ureq::Error| StoreError::Transport {
            url: req.url.to_string(),
            detail: e.to_string(),
        };
        let mut resp = match builder.call() {
            Ok(r) => r,
            Err(e) => return Ok(Attempt::Retry(transport(e))),
        };
        let status = resp.status().as_u16();
        match status {
            304 if conditional => return Ok(Attempt::NotModified),
            200 => {
                if resuming {
                    staged.restart()?;
                }
            }
            206 if resuming => {
                let start = header(&resp, "content-range").and_then(|r| {
                    r.strip_prefix("bytes ")?
                        .split('-')
                        .next()?
                        .parse::<u64>()
                        .ok()
                });
                if start != Some(staged.len()) {
                    staged.restart()?;
                    return Ok(Attempt::Retry(StoreError::Transport {
                        url: req.url.to_string(),
                        detail: format!("range answer starts at {start:?}, not {}", staged.len()),
                    }));
                }
            }
            416 => {
                staged.restart()?;
                return Ok(Attempt::Retry(StoreError::Transport {
                    url: req.url.to_string(),
                    detail: "range not satisfiable; restarting".into(),
                }));
            }
            _ => {
                return Ok(Attempt::Retry(StoreError::Http {
                    url: req.url.to_string(),
                    status,
                }))
            }
        }
        let fresh = Validators {
            etag: header(&resp, "etag"),
            last_modified: header(&resp, "last-modified"),
        };
        if status == 200 || !fresh.is_empty() {
            *validators = fresh;
        }
        // The validators go to disk before the first byte, so that a crash
        // mid-body leaves a partial file a later run can resume safely.
        let meta = PartialMeta {
            url: req.url.to_string(),
            validators: validators.clone(),
        };
        let meta_path = staged.meta_path();
        fsutil::write_atomic(
            &meta_path,
            &serde_json::to_vec(&meta).expect("plain struct"),
            0o600,
        )
        .map_err(StoreError::io("writing", &meta_path))?;
        let remaining = header(&resp, "content-length").and_then(|l| l.parse::<u64>().ok());
        let total = remaining.map(|r| r + staged.len()).or(req.expected_size);
        progress.start(req.url, total, staged.len());
        let mut reader = resp.body_mut().as_reader();
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    staged.flush()?;
                    progress.finish();
                    return Ok(Attempt::Retry(StoreError::Transport {
                        url: req.url.to_string(),
                        detail: format!("reading the body: {e}"),
                    }));
                }
            };
            staged.write_all(&buf[..n])?;
            progress.advance(n as u64);
            if let Some(max) = req.expected_size {
                if staged.len() > max {
                    progress.finish();
                    staged.restart()?;
                    return Err(StoreError::TooLong {
                        url: req.url.to_string(),
                        expected: max,
                    });
                }
            }
        }
        progress.finish();
        Ok(Attempt::Complete)
    }
}

/// The validator of a local file: it changed if any of these did.
pub fn local_validator(meta: &fs::Metadata) -> String {
    format!(
        "local:{}:{}.{}:{}",
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ino()
    )
}

/// Copies a local file into the store, hashing it on the way. `known` is
/// the validator of the copy we hold: when the file still matches it,
/// nothing is read.
pub fn copy_local(
    layout: &Layout,
    path: &Path,
    expected: Option<&Digest>,
    known: Option<&str>,
    progress: &dyn Progress,
) -> Result<(Outcome, String), StoreError> {
    // A regular file or a block device, never a FIFO or /dev/zero.
    let input = crate::fsutil::input::open(path, crate::fsutil::input::Accept::RegularOrBlock)
        .map_err(StoreError::io("opening", path))?;
    let mut file = input.file;
    let meta = file
        .metadata()
        .map_err(StoreError::io("reading metadata of", path))?;
    let validator = local_validator(&meta);
    if known == Some(validator.as_str()) {
        return Ok((Outcome::NotModified, validator));
    }
    let key = format!("l-{}", super::index::key(&path.to_string_lossy()));
    let _stage_lock = layout.lock(&format!("1-stage-{key}"))?;
    let mut staged = Staged::open(layout, &key, false)?;
    progress.start(&path.display().to_string(), Some(input.size), 0);
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(StoreError::io("reading", path))?;
        if n == 0 {
            break;
        }
        staged.write_all(&buf[..n])?;
        progress.advance(n as u64);
    }
    progress.finish();
    let blob = layout.commit(staged, &path.display().to_string(), expected, None)?;
    let validators = Validators {
        etag: Some(validator.clone()),
        last_modified: None,
    };
    Ok((Outcome::Fetched { blob, validators }, validator))
}
