//! Bounded network work, against a misbehaving loopback server this test
//! runs: a slow drip, a server that never answers, a download past its
//! deadline, redirect loops, a redirect to `file://`, unknown schemes,
//! malformed headers, bodies over the cap, a size no disk can hold. Each
//! failure is asserted by kind, by the requests the server saw (what was
//! retried and what was not) and by time.

mod store_common;

use std::fs;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cocoon_host::config::HostConfig;
use cocoon_host::http::RedirectError;
use cocoon_host::store::download::Failure;
use cocoon_host::store::sources::ArtifactSpec;
use cocoon_host::store::{
    PullPolicy, PullReport, PullRequest, Quiet, Resolved, Sources, Store, StoreError, StoreSettings,
};
use store_common::{bytes, sha256, Fault, Resource, Server};

/// Resolves a URL to itself, as the built-in url-source does, without
/// the plugin runtime: the timings below are the download's alone.
struct Url;

impl Sources for Url {
    fn resolve(&self, reference: &str) -> Result<Resolved, StoreError> {
        Ok(Resolved {
            source: "test".into(),
            artifacts: vec![ArtifactSpec {
                url: reference.into(),
                digest: None,
                size: None,
                media_type: "application/octet-stream".into(),
                format_hint: None,
                headers: Vec::new(),
            }],
        })
    }
}

/// A store with `settings`, pulling in a thread so that a pull that
/// hangs fails the test after `limit` instead of hanging it. The time
/// returned is the pull's.
fn pull_within(
    settings: StoreSettings,
    reference: &str,
    digest: Option<&str>,
    limit: Duration,
) -> (Result<PullReport, StoreError>, Duration, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = HostConfig::at(dir.path());
    config.store = settings;
    let req = PullRequest {
        reference: reference.to_string(),
        digest: digest.map(|d| d.parse().unwrap()),
        policy: PullPolicy::Missing,
        force: false,
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let store = Store::open(&config).unwrap();
        let started = Instant::now();
        let r = store.pull(&Url, &req, &Quiet);
        let _ = tx.send((r, started.elapsed()));
    });
    let (r, took) = rx
        .recv_timeout(limit)
        .unwrap_or_else(|_| panic!("the pull was still running after {limit:?}"));
    (r, took, dir)
}

fn fast_limits() -> StoreSettings {
    StoreSettings {
        min_rate_bytes_per_sec: 1000,
        rate_window_secs: 1,
        download_deadline_secs: 10,
        ..Default::default()
    }
}

fn failure(r: &Result<PullReport, StoreError>) -> &Failure {
    match r {
        Err(StoreError::Transport { failure, .. }) => failure,
        other => panic!(
            "not a transport failure: {:?}",
            other.as_ref().map(|r| &r.digest)
        ),
    }
}

fn tmp_bytes(dir: &tempfile::TempDir) -> u64 {
    fs::read_dir(dir.path().join("images/tmp"))
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

#[test]
fn a_slow_drip_is_abandoned_at_the_minimum_rate() {
    let s = Server::start();
    s.set(
        "/drip",
        Resource::new(bytes(1, 100_000)).fault(Fault::Drip {
            every: Duration::from_millis(200),
        }),
    );
    let settings = StoreSettings {
        download_deadline_secs: 3,
        ..fast_limits()
    };
    let (r, took, _dir) = pull_within(settings, &s.url("/drip"), None, Duration::from_secs(15));
    // Each attempt stalls after a window; the last one ends at a stall
    // or at the deadline, whichever comes first.
    let f = failure(&r);
    assert!(
        matches!(f, Failure::Stalled { min_rate: 1000, secs: 1, bytes } if *bytes < 1000)
            || matches!(f, Failure::Deadline { secs: 3 }),
        "{f:?}"
    );
    assert!(
        took < Duration::from_secs(5),
        "took {took:?} with a 3 s deadline"
    );
    // Stalls are retried (each attempt got a few bytes further).
    assert!(s.hits("/drip") >= 2, "{}", s.hits("/drip"));
}

#[test]
fn a_server_that_never_answers_costs_two_windows() {
    let s = Server::start();
    s.set("/silent", Resource::new(b"x".to_vec()).fault(Fault::Silent));
    let (r, took, _dir) = pull_within(
        fast_limits(),
        &s.url("/silent"),
        None,
        Duration::from_secs(15),
    );
    assert!(
        matches!(failure(&r), Failure::NoAnswer { secs: 1 }),
        "{:?}",
        failure(&r)
    );
    assert_eq!(s.hits("/silent"), 2, "retried once, then taken for dead");
    // Two 1 s windows and a 0.2 s pause; slack for a loaded machine.
    assert!(
        (Duration::from_secs(2)..Duration::from_secs(5)).contains(&took),
        "took {took:?}"
    );
    let msg = store_common::chain(r.as_ref().unwrap_err());
    assert!(msg.contains("no answer within 1 s"), "{msg}");
}

#[test]
fn the_deadline_bounds_the_whole_download_and_keeps_what_arrived() {
    let s = Server::start();
    // About 400 KB/s: far above the minimum rate, but 2.5 s for 1 MiB.
    s.set(
        "/long",
        Resource::new(bytes(2, 1 << 20))
            .etag("\"l\"")
            .fault(Fault::Slow {
                chunk: 4096,
                delay: Duration::from_millis(10),
            }),
    );
    let settings = StoreSettings {
        download_deadline_secs: 1,
        ..fast_limits()
    };
    let (r, took, dir) = pull_within(settings, &s.url("/long"), None, Duration::from_secs(15));
    assert!(
        matches!(failure(&r), Failure::Deadline { secs: 1 }),
        "{:?}",
        failure(&r)
    );
    assert!(
        (Duration::from_millis(990)..Duration::from_secs(3)).contains(&took),
        "took {took:?}"
    );
    assert_eq!(s.hits("/long"), 1, "a deadline is not retried");
    // What arrived stays for a later pull to resume.
    assert!(tmp_bytes(&dir) > 0);
}

#[test]
fn redirect_loops_are_refused_and_not_retried() {
    let s = Server::start();
    let redirect = |to: &str| {
        Resource::new(Vec::new()).fault(Fault::Redirect {
            status: 302,
            location: to.into(),
        })
    };
    s.set("/a", redirect("/b"));
    s.set("/b", redirect(&s.url("/a")));
    let (r, _, dir) = pull_within(fast_limits(), &s.url("/a"), None, Duration::from_secs(15));
    assert!(
        matches!(failure(&r), Failure::Redirect(RedirectError::Loop { .. })),
        "{:?}",
        failure(&r)
    );
    assert_eq!((s.hits("/a"), s.hits("/b")), (1, 1));
    assert_eq!(tmp_bytes(&dir), 0);
}

#[test]
fn a_redirect_to_a_local_file_is_refused_as_such() {
    let s = Server::start();
    s.set(
        "/r",
        Resource::new(Vec::new()).fault(Fault::Redirect {
            status: 301,
            location: "file:///etc/passwd".into(),
        }),
    );
    let (r, _, dir) = pull_within(fast_limits(), &s.url("/r"), None, Duration::from_secs(15));
    match failure(&r) {
        Failure::Redirect(RedirectError::ToFile { location }) => {
            assert_eq!(location, "file:///etc/passwd")
        }
        other => panic!("{other:?}"),
    }
    let msg = store_common::chain(r.as_ref().unwrap_err());
    assert!(
        msg.contains("redirect to the local file file:///etc/passwd"),
        "{msg}"
    );
    assert_eq!(s.hits("/r"), 1);
    assert_eq!(
        fs::read_dir(dir.path().join("images/blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn unknown_schemes_malformed_answers_and_client_errors_are_not_retried() {
    let s = Server::start();
    s.set(
        "/ftp",
        Resource::new(Vec::new()).fault(Fault::Redirect {
            status: 307,
            location: "ftp://127.0.0.1/x".into(),
        }),
    );
    s.set(
        "/bad",
        Resource::new(Vec::new()).fault(Fault::Raw(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nthis is not a header\r\n\r\nhello".to_vec(),
        )),
    );
    s.set(
        "/forbidden",
        Resource::new(Vec::new()).fault(Fault::Status {
            status: 403,
            times: 100,
        }),
    );
    let (r, _, _d) = pull_within(fast_limits(), &s.url("/ftp"), None, Duration::from_secs(15));
    assert!(
        matches!(
            failure(&r),
            Failure::Redirect(RedirectError::UnsupportedScheme { scheme, .. }) if scheme == "ftp"
        ),
        "{:?}",
        failure(&r)
    );
    let (r, _, _d) = pull_within(fast_limits(), &s.url("/bad"), None, Duration::from_secs(15));
    assert!(
        matches!(failure(&r), Failure::Malformed(_)),
        "{:?}",
        failure(&r)
    );
    let (r, _, _d) = pull_within(
        fast_limits(),
        &s.url("/forbidden"),
        None,
        Duration::from_secs(15),
    );
    assert!(matches!(r, Err(StoreError::Http { status: 403, .. })));
    assert_eq!(
        (s.hits("/ftp"), s.hits("/bad"), s.hits("/forbidden")),
        (1, 1, 1)
    );
    // 429 and 408 are worth another try.
    for status in [429, 408] {
        let path = format!("/busy{status}");
        s.set(
            &path,
            Resource::new(b"ok".to_vec()).fault(Fault::Status { status, times: 1 }),
        );
        let (r, _, _d) = pull_within(fast_limits(), &s.url(&path), None, Duration::from_secs(15));
        assert_eq!(r.unwrap().digest.to_string(), sha256(b"ok"));
        assert_eq!(s.hits(&path), 2);
    }
}

#[test]
fn a_pinned_pull_without_a_size_is_capped_by_the_configured_maximum() {
    let s = Server::start();
    let big = bytes(3, 1 << 20);
    s.set(
        "/unannounced",
        Resource::new(big.clone()).fault(Fault::Unannounced),
    );
    s.set("/announced", Resource::new(big.clone()));
    let settings = StoreSettings {
        max_download_bytes: 64 << 10,
        ..fast_limits()
    };
    // The pin names other bytes: without a cap the whole body would be
    // staged before the mismatch showed.
    let pin = sha256(b"something else");
    for path in ["/unannounced", "/announced"] {
        let (r, _, dir) = pull_within(
            settings.clone(),
            &s.url(path),
            Some(&pin),
            Duration::from_secs(15),
        );
        match &r {
            Err(StoreError::TooLarge {
                limit: 65536,
                announced,
                ..
            }) => assert_eq!(announced.is_some(), path == "/announced", "{path}"),
            other => panic!("{path}: {:?}", other.as_ref().map(|r| &r.digest)),
        }
        assert_eq!(s.hits(path), 1, "{path}: not retried");
        assert_eq!(tmp_bytes(&dir), 0, "{path}: nothing staged is kept");
    }
}

/// A source that announces a size for its one artifact.
struct Sized {
    url: String,
    size: u64,
}

impl Sources for Sized {
    fn resolve(&self, _: &str) -> Result<Resolved, StoreError> {
        Ok(Resolved {
            source: "sized".into(),
            artifacts: vec![ArtifactSpec {
                url: self.url.clone(),
                digest: Some(sha256(b"pinned").parse().unwrap()),
                size: Some(self.size),
                media_type: "application/octet-stream".into(),
                format_hint: None,
                headers: Vec::new(),
            }],
        })
    }
}

#[test]
fn a_pinned_pull_is_capped_by_the_size_the_source_announced() {
    let s = Server::start();
    s.set(
        "/grows",
        Resource::new(bytes(4, 1 << 20)).fault(Fault::Unannounced),
    );
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&HostConfig::at(dir.path())).unwrap();
    let req = PullRequest {
        reference: "sized://x".into(),
        digest: None,
        policy: PullPolicy::Missing,
        force: false,
    };
    let sources = Sized {
        url: s.url("/grows"),
        size: 1000,
    };
    match store.pull(&sources, &req, &Quiet) {
        Err(StoreError::TooLarge {
            limit: 1000,
            announced: None,
            ..
        }) => {}
        other => panic!("{:?}", other.map(|r| r.digest)),
    }
    assert_eq!(s.hits("/grows"), 1);
    assert_eq!(tmp_bytes(&dir), 0);
}

#[test]
fn free_space_is_checked_before_a_download() {
    let s = Server::start();
    // A Content-Length of 1 PiB: no disk here holds it.
    s.set(
        "/huge",
        Resource::new(b"tiny".to_vec()).fault(Fault::Announce(1 << 50)),
    );
    let settings = StoreSettings {
        max_download_bytes: u64::MAX,
        ..fast_limits()
    };
    let (r, _, dir) = pull_within(settings, &s.url("/huge"), None, Duration::from_secs(15));
    match &r {
        Err(StoreError::NoSpace {
            needed, available, ..
        }) => {
            assert_eq!(*needed, 1 << 50);
            assert!(*available < *needed);
        }
        other => panic!("{:?}", other.as_ref().map(|r| &r.digest)),
    }
    assert_eq!(s.hits("/huge"), 1);
    assert_eq!(tmp_bytes(&dir), 0);
}
