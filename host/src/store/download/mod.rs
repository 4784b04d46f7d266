//! The host's downloader: every blob of every source comes through here.
//! Bytes are hashed as they are written to a staged file in `tmp/`; the
//! file becomes a blob only through [`Layout::commit`].
//!
//! Bounds, all from [`Limits`]: a download brings at most the size the
//! source announced, or the configured maximum when nobody announced one
//! (a `Content-Length` over the cap is refused before the body); free
//! space is checked before a download of known size; a transfer slower
//! than the minimum rate over the rate window is abandoned; one
//! artifact's download, retries included, ends at the deadline.
//!
//! Only what can succeed on a second try is retried (5xx, 408, 429,
//! timeouts, resets, a server closing early), with backoff; an
//! interrupted transfer resumes with `Range` + `If-Range` when the server
//! gave a validator (or the digest is pinned, which checks the result
//! anyway). Redirects are followed here, hop by hop: a loop, `file://` or
//! any scheme but http(s) is refused, and credentials never follow a hop
//! to another origin.

use std::path::Path;
use std::time::{Duration, Instant};

use url::Url;

mod bounds;
mod failure;

pub use bounds::{check_space, enough_space, Limits, RateGuard, SPACE_RESERVE};
pub use failure::{retryable_status, transient, Failure};

use crate::fsutil;
use crate::http::{self, RedirectError};
use crate::store::blob::{Layout, Staged, VerifiedBlob};
use crate::store::digest::Digest;
use crate::store::StoreError;

const ATTEMPTS: u32 = 6;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const MAX_REDIRECTS: usize = 10;
/// Attempts in a row that may end without a single new byte before the
/// server is taken for dead: a server that accepts and never answers
/// costs two rate windows, not six.
const MAX_BARREN_ATTEMPTS: u32 = 2;
pub(super) const CHUNK: usize = 1 << 20;

/// Progress of transfers; the CLI draws bars or prints lines.
pub trait Progress: Sync {
    /// A transfer of `what` starts (or resumes at `already` bytes).
    fn start(&self, _what: &str, _total: Option<u64>, _already: u64) {}
    fn advance(&self, _bytes: u64) {}
    /// The transfer `start` announced is over, complete or not.
    fn stop(&self) {}
    /// `what` is in the store: its bytes were verified and committed.
    fn stored(&self, _what: &str, _blob: &VerifiedBlob) {}
    /// Something the user should know that does not stop the pull.
    fn warn(&self, message: &str) {
        tracing::warn!("{message}");
    }
    /// A step that needs no transfer (cache hit, 304, a retry).
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

impl Request<'_> {
    /// The URL as it may be printed and stored.
    fn shown(&self) -> String {
        http::redact(self.url).into_owned()
    }
}

pub enum Outcome {
    NotModified,
    Fetched {
        blob: VerifiedBlob,
        validators: Validators,
    },
}

/// Downloads under one set of limits, over the host's shared client.
pub struct Downloader {
    limits: Limits,
}

enum Attempt {
    /// 304 to a conditional request: keep the copy we hold.
    NotModified,
    /// The whole body is in the staged file; the caller commits it.
    Complete,
    /// The exchange failed; [`transient`] says whether to try again.
    Failed(StoreError),
}

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

impl Downloader {
    pub fn new(limits: Limits) -> Self {
        Downloader { limits }
    }

    /// Downloads `req.url` into the store.
    pub fn download(
        &self,
        layout: &Layout,
        req: &Request<'_>,
        progress: &dyn Progress,
    ) -> Result<Outcome, StoreError> {
        if let Some(size) = req.expected_size.filter(|s| *s > self.limits.max_bytes) {
            return Err(StoreError::TooLarge {
                url: req.shown(),
                limit: self.limits.max_bytes,
                announced: Some(size),
            });
        }
        let deadline = Instant::now() + self.limits.deadline;
        let key = match req.expected {
            Some(d) => format!("d-{}", d.hex()),
            None => format!("u-{}", crate::store::index::key(&req.shown())),
        };
        // Two references may lead to one URL: the staged file is theirs to
        // share only one at a time, or one's hash would describe a file
        // the other also wrote to.
        let _stage_lock = layout.lock(&format!("1-stage-{key}"))?;
        let meta_rel = Path::new("tmp").join(format!("{key}.partial.json"));
        let earlier: Option<PartialMeta> = layout
            .read_file(&meta_rel)?
            .and_then(|t| serde_json::from_slice(&t).ok());
        let resumable = earlier.as_ref().is_some_and(|m| {
            m.url == req.shown() && (m.validators.if_range().is_some() || req.expected.is_some())
        });
        let mut validators = earlier
            .filter(|_| resumable)
            .map(|m| m.validators)
            .unwrap_or_default();
        let mut staged = Staged::open(layout, &key, resumable)?;
        let mut from_scratch_once = false;
        let mut barren = 0;
        let mut attempt = 0;
        let last_err = loop {
            attempt += 1;
            let resumed = !staged.is_empty();
            let before = staged.len();
            let outcome = match http::block_on(self.attempt(
                layout,
                req,
                &mut staged,
                &mut validators,
                progress,
                deadline,
            )) {
                Ok(o) => o,
                Err(e) => {
                    // Refused before or during the body (too large, no
                    // space): nothing of it is kept.
                    if staged.is_empty() {
                        staged.discard();
                    }
                    return Err(e);
                }
            };
            let e = match outcome {
                Attempt::NotModified => {
                    staged.discard();
                    return Ok(Outcome::NotModified);
                }
                Attempt::Complete => {
                    match layout.commit(staged, &req.shown(), req.expected, req.expected_size) {
                        Ok(blob) => {
                            progress.stored(&req.shown(), &blob);
                            return Ok(Outcome::Fetched { blob, validators });
                        }
                        Err(StoreError::DigestMismatch { .. }) if resumed && !from_scratch_once => {
                            // The part kept from before may be what was wrong
                            // (a server without validators changed the file):
                            // once more from the start.
                            tracing::warn!(
                                url = %req.shown(),
                                "digest mismatch after a resumed download; retrying from the start"
                            );
                            from_scratch_once = true;
                            validators = Validators::default();
                            staged = Staged::open(layout, &key, false)?;
                            attempt = 0;
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                }
                Attempt::Failed(e) => e,
            };
            if !transient(&e) {
                if matches!(
                    &e,
                    StoreError::Transport {
                        failure: Failure::Deadline { .. },
                        ..
                    }
                ) {
                    // What arrived is good for a resume by a later pull.
                    staged.flush()?;
                } else {
                    staged.discard();
                }
                return Err(e);
            }
            // Only silence counts: a server that answers (even 503) is
            // alive, and one that sends bytes makes progress.
            let silent = matches!(
                &e,
                StoreError::Transport {
                    failure: Failure::NoAnswer { .. } | Failure::Stalled { .. },
                    ..
                }
            );
            barren = if silent && staged.len() == before {
                barren + 1
            } else {
                0
            };
            if attempt >= ATTEMPTS || barren >= MAX_BARREN_ATTEMPTS {
                break e;
            }
            let pause = FIRST_BACKOFF
                .saturating_mul(1 << (attempt - 1))
                .min(MAX_BACKOFF);
            if Instant::now() + pause >= deadline {
                break e;
            }
            let why = match &e {
                StoreError::Transport { failure, .. } => crate::store::chain(failure),
                StoreError::Http { status, .. } => format!("HTTP {status}"),
                other => crate::store::chain(other),
            };
            progress.note(&format!(
                "{}: attempt {attempt} of {ATTEMPTS} failed: {why}; retrying in {} ms",
                req.shown(),
                pause.as_millis()
            ));
            std::thread::sleep(pause);
        };
        // Keep the partial file: a later run resumes it.
        staged.flush()?;
        Err(last_err)
    }

    /// Sends one GET, following redirects hop by hop.
    async fn send(
        &self,
        req: &Request<'_>,
        extra: &[(&str, String)],
        deadline: Instant,
    ) -> Result<reqwest::Response, Failure> {
        let first = Url::parse(req.url).map_err(|_| {
            Failure::Redirect(RedirectError::BadLocation {
                location: req.shown(),
            })
        })?;
        let mut headers: Vec<(String, String)> = req
            .headers
            .iter()
            .cloned()
            .chain(extra.iter().map(|(k, v)| (k.to_string(), v.clone())))
            .collect();
        let mut url = first;
        let mut visited = vec![url.clone()];
        loop {
            let mut builder = http::client().get(url.clone());
            for (k, v) in &headers {
                builder = builder.header(k.as_str(), v.as_str());
            }
            let wait_until = (Instant::now() + self.limits.window).min(deadline);
            let resp = match tokio::time::timeout_at(wait_until.into(), builder.send()).await {
                Err(_) if Instant::now() >= deadline => {
                    return Err(Failure::Deadline {
                        secs: self.limits.deadline.as_secs(),
                    })
                }
                Err(_) => {
                    return Err(Failure::NoAnswer {
                        secs: self.limits.window.as_secs(),
                    })
                }
                Ok(r) => r.map_err(Failure::of)?,
            };
            let location = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok());
            let (true, Some(location)) = (http::is_redirect(resp.status().as_u16()), location)
            else {
                return Ok(resp);
            };
            let next = http::next_hop(&url, location, &visited, MAX_REDIRECTS)
                .map_err(Failure::Redirect)?;
            headers.retain(|(k, _)| !http::drop_on_hop(k, &url, &next));
            tracing::debug!(from = %http::redact(url.as_str()), to = %http::redact(next.as_str()), "redirect");
            visited.push(next.clone());
            url = next;
        }
    }

    /// One HTTP exchange (with its redirects).
    async fn attempt(
        &self,
        layout: &Layout,
        req: &Request<'_>,
        staged: &mut Staged,
        validators: &mut Validators,
        progress: &dyn Progress,
        deadline: Instant,
    ) -> Result<Attempt, StoreError> {
        let failed = |failure: Failure| {
            Ok(Attempt::Failed(StoreError::Transport {
                url: req.shown(),
                failure,
            }))
        };
        let if_range = validators.if_range().map(str::to_string);
        if !staged.is_empty() && if_range.is_none() && req.expected.is_none() {
            // Without a validator a resumed body could belong to a newer
            // version of the file, and nothing would catch the splice.
            staged.restart()?;
        }
        let resuming = !staged.is_empty();
        let mut conditional = false;
        let mut extra: Vec<(&str, String)> = Vec::new();
        if resuming {
            extra.push(("Range", format!("bytes={}-", staged.len())));
            if let Some(v) = &if_range {
                extra.push(("If-Range", v.clone()));
            }
        } else if let Some(c) = req.conditional {
            if let Some(e) = &c.etag {
                extra.push(("If-None-Match", e.clone()));
                conditional = true;
            }
            if let Some(lm) = &c.last_modified {
                extra.push(("If-Modified-Since", lm.clone()));
                conditional = true;
            }
        }
        let mut resp = match self.send(req, &extra, deadline).await {
            Ok(r) => r,
            Err(f) => return failed(f),
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
                    let expected = staged.len();
                    staged.restart()?;
                    return failed(Failure::BadRange { start, expected });
                }
            }
            416 => {
                staged.restart()?;
                return failed(Failure::RangeNotSatisfiable);
            }
            _ => {
                return Ok(Attempt::Failed(StoreError::Http {
                    url: req.shown(),
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
        let cap = req.expected_size.unwrap_or(self.limits.max_bytes);
        let remaining = header(&resp, "content-length").and_then(|l| l.parse::<u64>().ok());
        let total = remaining.map(|r| r.saturating_add(staged.len()));
        if let Some(t) = total.filter(|t| *t > cap) {
            staged.restart()?;
            return Err(StoreError::TooLarge {
                url: req.shown(),
                limit: cap,
                announced: Some(t),
            });
        }
        if let Some(needed) = total.or(req.expected_size) {
            check_space(&layout.tmp_dir(), needed.saturating_sub(staged.len()))?;
        }
        // The validators go to disk before the first byte, so that a crash
        // mid-body leaves a partial file a later run can resume safely.
        let meta = PartialMeta {
            url: req.shown(),
            validators: validators.clone(),
        };
        let meta_path = staged.meta_path();
        fsutil::write_atomic(
            &meta_path,
            &serde_json::to_vec(&meta).expect("plain struct"),
            0o600,
        )
        .map_err(StoreError::io("writing", &meta_path))?;
        progress.start(&req.shown(), total.or(req.expected_size), staged.len());
        let result = self
            .body(req, &mut resp, staged, progress, deadline, cap)
            .await;
        progress.stop();
        match result {
            Ok(()) => Ok(Attempt::Complete),
            Err(BodyEnd::Failed(f)) => {
                staged.flush()?;
                failed(f)
            }
            Err(BodyEnd::Store(e)) => Err(e),
        }
    }

    /// Streams the body into `staged` under the rate rule, the deadline
    /// and the size cap.
    async fn body(
        &self,
        req: &Request<'_>,
        resp: &mut reqwest::Response,
        staged: &mut Staged,
        progress: &dyn Progress,
        deadline: Instant,
        cap: u64,
    ) -> Result<(), BodyEnd> {
        let mut guard = RateGuard::new(
            self.limits.min_rate,
            self.limits.window,
            Instant::now(),
            staged.len(),
        );
        loop {
            let wake = guard.window_end().min(deadline);
            let next = tokio::time::timeout_at(wake.into(), resp.chunk()).await;
            let now = Instant::now();
            if now >= deadline {
                return Err(BodyEnd::Failed(Failure::Deadline {
                    secs: self.limits.deadline.as_secs(),
                }));
            }
            match next {
                // The window ended with nothing new: judged below.
                Err(_) => {}
                Ok(Ok(Some(c))) => {
                    if staged.len() + c.len() as u64 > cap {
                        staged.restart().map_err(BodyEnd::Store)?;
                        return Err(BodyEnd::Store(StoreError::TooLarge {
                            url: req.shown(),
                            limit: cap,
                            announced: None,
                        }));
                    }
                    staged.write_all(&c).map_err(BodyEnd::Store)?;
                    progress.advance(c.len() as u64);
                }
                Ok(Ok(None)) => return Ok(()),
                Ok(Err(e)) => return Err(BodyEnd::Failed(Failure::of(e))),
            }
            guard.check(now, staged.len()).map_err(BodyEnd::Failed)?;
        }
    }
}

/// How a body transfer ended early: a network failure (maybe retried) or
/// a store error (never).
enum BodyEnd {
    Failed(Failure),
    Store(StoreError),
}
