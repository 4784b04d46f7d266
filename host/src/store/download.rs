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

use std::error::Error as StdError;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use url::Url;

use super::blob::{Layout, Staged, VerifiedBlob};
use super::digest::Digest;
use super::settings::StoreSettings;
use super::StoreError;
use crate::fsutil;
use crate::http::{self, RedirectError};

const ATTEMPTS: u32 = 6;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const MAX_REDIRECTS: usize = 10;
/// Attempts in a row that may end without a single new byte before the
/// server is taken for dead: a server that accepts and never answers
/// costs two rate windows, not six.
const MAX_BARREN_ATTEMPTS: u32 = 2;
/// Free space left over after a download, so the store never fills the
/// filesystem to the last block.
pub const SPACE_RESERVE: u64 = 64 << 20;
const CHUNK: usize = 1 << 20;

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

/// The bounds of one download.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_bytes: u64,
    pub min_rate: u64,
    pub window: Duration,
    pub deadline: Duration,
}

impl From<&StoreSettings> for Limits {
    fn from(s: &StoreSettings) -> Self {
        Limits {
            max_bytes: s.max_download_bytes,
            min_rate: s.min_rate_bytes_per_sec,
            window: s.rate_window(),
            deadline: s.download_deadline(),
        }
    }
}

/// Why one HTTP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("could not connect")]
    Connect(#[source] reqwest::Error),
    #[error("the connection failed")]
    Reset(#[source] reqwest::Error),
    #[error("the request timed out")]
    Timeout(#[source] reqwest::Error),
    #[error("the server's answer is not valid HTTP")]
    Malformed(#[source] reqwest::Error),
    #[error("invalid data on the connection (TLS)")]
    Invalid(#[source] reqwest::Error),
    #[error("the request failed")]
    Other(#[source] reqwest::Error),
    #[error("no answer within {secs} s")]
    NoAnswer { secs: u64 },
    #[error("{bytes} bytes in {secs} s, below the minimum of {min_rate} bytes/s")]
    Stalled {
        bytes: u64,
        secs: u64,
        min_rate: u64,
    },
    #[error("the download took longer than its deadline of {secs} s")]
    Deadline { secs: u64 },
    #[error("not following the redirect")]
    Redirect(#[source] RedirectError),
    #[error("the range answer starts at {start:?}, not {expected}")]
    BadRange { start: Option<u64>, expected: u64 },
    #[error("the range asked for is not satisfiable")]
    RangeNotSatisfiable,
}

impl Failure {
    /// Whether the same request can succeed if sent again.
    pub fn retryable(&self) -> bool {
        match self {
            Failure::Connect(_)
            | Failure::Reset(_)
            | Failure::Timeout(_)
            | Failure::NoAnswer { .. }
            | Failure::Stalled { .. }
            | Failure::BadRange { .. }
            | Failure::RangeNotSatisfiable => true,
            Failure::Malformed(_)
            | Failure::Invalid(_)
            | Failure::Other(_)
            | Failure::Deadline { .. }
            | Failure::Redirect(_) => false,
        }
    }

    /// Whether the server was not reached at all (rather than answering
    /// wrongly): then a held copy may be used with a warning.
    pub fn unreachable(&self) -> bool {
        matches!(
            self,
            Failure::Connect(_)
                | Failure::Reset(_)
                | Failure::Timeout(_)
                | Failure::NoAnswer { .. }
                | Failure::Stalled { .. }
                | Failure::Deadline { .. }
        )
    }

    /// Sorts a client error by what caused it.
    fn of(e: reqwest::Error) -> Failure {
        let e = e.without_url();
        if let Some(h) = find::<hyper::Error>(&e) {
            if h.is_parse() || h.is_parse_status() {
                return Failure::Malformed(e);
            }
            if h.is_incomplete_message() || h.is_closed() || h.is_canceled() {
                return Failure::Reset(e);
            }
        }
        if let Some(io) = find::<io::Error>(&e) {
            use io::ErrorKind as K;
            match io.kind() {
                K::InvalidData => return Failure::Invalid(e),
                K::TimedOut => return Failure::Timeout(e),
                K::ConnectionRefused | K::HostUnreachable | K::NetworkUnreachable => {
                    return Failure::Connect(e)
                }
                K::ConnectionReset
                | K::ConnectionAborted
                | K::BrokenPipe
                | K::UnexpectedEof
                | K::NotConnected => return Failure::Reset(e),
                _ => {}
            }
        }
        if e.is_timeout() {
            Failure::Timeout(e)
        } else if e.is_connect() {
            Failure::Connect(e)
        } else if e.is_body() {
            Failure::Reset(e)
        } else {
            Failure::Other(e)
        }
    }
}

fn find<'a, T: StdError + 'static>(e: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(t) = c.downcast_ref::<T>() {
            return Some(t);
        }
        cur = c.source();
    }
    None
}

/// Whether a failed download is worth another attempt.
pub fn transient(e: &StoreError) -> bool {
    match e {
        StoreError::Transport { failure, .. } => failure.retryable(),
        StoreError::Http { status, .. } => retryable_status(*status),
        _ => false,
    }
}

/// 5xx, 408 (request timeout) and 429 (too many requests) can succeed
/// later; every other status says the same thing every time.
pub fn retryable_status(status: u16) -> bool {
    status >= 500 || status == 408 || status == 429
}

/// The minimum-rate rule: every `window`, at least `min_rate × window`
/// bytes must have arrived since the window began. Pure, so the rule is
/// tested without a clock.
#[derive(Debug, Clone)]
pub struct RateGuard {
    min_rate: u64,
    window: Duration,
    since: Instant,
    bytes_then: u64,
}

impl RateGuard {
    pub fn new(min_rate: u64, window: Duration, now: Instant, bytes: u64) -> Self {
        RateGuard {
            min_rate,
            window,
            since: now,
            bytes_then: bytes,
        }
    }

    /// When the current window ends.
    pub fn window_end(&self) -> Instant {
        self.since + self.window
    }

    /// Checks the rule at `now` with `bytes` received in all; a window
    /// that ended opens the next one.
    pub fn check(&mut self, now: Instant, bytes: u64) -> Result<(), Failure> {
        if now < self.window_end() {
            return Ok(());
        }
        let got = bytes - self.bytes_then;
        let secs = self.window.as_secs().max(1);
        if got < self.min_rate.saturating_mul(secs) {
            return Err(Failure::Stalled {
                bytes: got,
                secs,
                min_rate: self.min_rate,
            });
        }
        self.since = now;
        self.bytes_then = bytes;
        Ok(())
    }
}

/// Whether `available` bytes of free space hold `needed` more with the
/// reserve left over.
pub fn enough_space(available: u64, needed: u64) -> bool {
    needed
        .checked_add(SPACE_RESERVE)
        .is_some_and(|n| available >= n)
}

/// Fails with [`StoreError::NoSpace`] when the filesystem of `dir` cannot
/// take `needed` more bytes.
pub fn check_space(dir: &Path, needed: u64) -> Result<(), StoreError> {
    let st = rustix::fs::statvfs(dir)
        .map_err(|e| StoreError::io("checking free space of", dir)(e.into()))?;
    let available = st.f_bavail.saturating_mul(st.f_frsize);
    if enough_space(available, needed) {
        Ok(())
    } else {
        Err(StoreError::NoSpace {
            path: dir.to_path_buf(),
            needed,
            available,
        })
    }
}

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
            None => format!("u-{}", super::index::key(&req.shown())),
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
                StoreError::Transport { failure, .. } => super::chain(failure),
                StoreError::Http { status, .. } => format!("HTTP {status}"),
                other => super::chain(other),
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

/// The validator of a local file: it changed if any of these did.
pub fn local_validator(meta: &rustix::fs::Stat) -> String {
    format!(
        "local:{}:{}.{}:{}",
        meta.st_size, meta.st_mtime, meta.st_mtime_nsec, meta.st_ino
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
    let input = super::local::open_input(path)?;
    let validator = local_validator(&input.stat);
    if known == Some(validator.as_str()) {
        return Ok((Outcome::NotModified, validator));
    }
    check_space(&layout.tmp_dir(), input.size)?;
    let key = format!("l-{}", super::index::key(&path.to_string_lossy()));
    let _stage_lock = layout.lock(&format!("1-stage-{key}"))?;
    let mut staged = Staged::open(layout, &key, false)?;
    let what = path.display().to_string();
    progress.start(&what, Some(input.size), 0);
    let mut file = input.file;
    let mut buf = vec![0u8; CHUNK];
    let copied = loop {
        let n = match io::Read::read(&mut file, &mut buf) {
            Ok(n) => n,
            Err(e) => break Err(StoreError::io("reading", path)(e)),
        };
        if n == 0 {
            break Ok(());
        }
        if let Err(e) = staged.write_all(&buf[..n]) {
            break Err(e);
        }
        progress.advance(n as u64);
    };
    progress.stop();
    if let Err(e) = copied {
        staged.discard();
        return Err(e);
    }
    let blob = layout.commit(staged, &what, expected, None)?;
    progress.stored(&what, &blob);
    let validators = Validators {
        etag: Some(validator.clone()),
        last_modified: None,
    };
    Ok((Outcome::Fetched { blob, validators }, validator))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_statuses_are_retried() {
        let cases = [
            (500, true),
            (502, true),
            (503, true),
            (408, true),
            (429, true),
            (400, false),
            (401, false),
            (403, false),
            (404, false),
            (410, false),
            (416, false),
            (301, false),
        ];
        for (status, want) in cases {
            assert_eq!(retryable_status(status), want, "{status}");
        }
    }

    #[test]
    fn which_failures_are_retried() {
        let cases = [
            (Failure::NoAnswer { secs: 1 }, true),
            (
                Failure::Stalled {
                    bytes: 1,
                    secs: 1,
                    min_rate: 2,
                },
                true,
            ),
            (
                Failure::BadRange {
                    start: None,
                    expected: 3,
                },
                true,
            ),
            (Failure::RangeNotSatisfiable, true),
            (Failure::Deadline { secs: 1 }, false),
            (Failure::Redirect(RedirectError::TooMany { max: 1 }), false),
            (
                Failure::Redirect(RedirectError::ToFile {
                    location: "file:///x".into(),
                }),
                false,
            ),
            (
                Failure::Redirect(RedirectError::Loop {
                    location: "http://a/".into(),
                }),
                false,
            ),
        ];
        for (f, want) in cases {
            assert_eq!(f.retryable(), want, "{f}");
        }
    }

    #[test]
    fn the_rate_rule() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut g = RateGuard::new(100, s(2), t0, 0);
        // Inside the window nothing is judged.
        assert!(g.check(t0 + Duration::from_millis(1999), 0).is_ok());
        // 200 bytes in 2 s is the minimum: passes, and opens a new window.
        assert!(g.check(t0 + s(2), 200).is_ok());
        assert_eq!(g.window_end(), t0 + s(4));
        // 199 more in the next window is too slow.
        match g.check(t0 + s(4), 399) {
            Err(Failure::Stalled {
                bytes: 199,
                secs: 2,
                min_rate: 100,
            }) => {}
            other => panic!("{other:?}"),
        }
        // A rate of 0 never stalls (but the deadline still holds).
        let mut g = RateGuard::new(0, s(1), t0, 5);
        assert!(g.check(t0 + s(10), 5).is_ok());
        // Bytes resumed from an earlier attempt do not count as progress.
        let mut g = RateGuard::new(10, s(1), t0, 1000);
        assert!(g.check(t0 + s(1), 1005).is_err());
    }

    #[test]
    fn free_space_keeps_the_reserve() {
        assert!(enough_space(SPACE_RESERVE + 10, 10));
        assert!(!enough_space(SPACE_RESERVE + 9, 10));
        assert!(!enough_space(u64::MAX, u64::MAX));
        assert!(enough_space(u64::MAX, 0));
    }
}
