//! The image store against a local HTTP server: the pull rules, the seed
//! regressions, resume and retry, local files, the conversion cache, gc.

mod store_common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use cocoon_host::config::HostConfig;
use cocoon_host::plugin::{Registry, Runtime};
use cocoon_host::store::{
    ConvertBackend, ConverterId, Digest, NoRoots, PluginSources, PullPolicy, PullReport,
    PullRequest, Quiet, RootSet, Store, StoreError, VerifiedBlob,
};
use store_common::{bytes, sha256, Fault, Resource, Server};

struct Env {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    store: Store,
    runtime: Runtime,
    registry: Registry,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let config = HostConfig::at(&root);
    Env {
        store: Store::open(&config).unwrap(),
        runtime: Runtime::new(Some(root.join("plugin-cache"))).unwrap(),
        registry: Registry::discover(&config),
        root,
        _dir: dir,
    }
}

impl Env {
    fn pull(
        &self,
        reference: &str,
        digest: Option<&str>,
        policy: PullPolicy,
    ) -> Result<PullReport, StoreError> {
        let sources = PluginSources {
            runtime: &self.runtime,
            registry: &self.registry,
        };
        let req = PullRequest {
            reference: reference.into(),
            digest: digest.map(|d| d.parse().unwrap()),
            policy,
            force: false,
        };
        self.store.pull(&sources, &req, &Quiet)
    }

    fn blob_count(&self) -> usize {
        fs::read_dir(self.store.layout().blobs_dir())
            .unwrap()
            .count()
    }

    fn tmp_is_empty(&self) -> bool {
        fs::read_dir(self.store.layout().tmp_dir())
            .unwrap()
            .next()
            .is_none()
    }
}

fn d(s: &str) -> Digest {
    s.parse().unwrap()
}

#[test]
fn pinned_and_present_needs_no_network() {
    let e = env();
    let s = Server::start();
    let a = bytes(1, 300_000);
    s.set("/a.img", Resource::new(a.clone()));
    let r = e
        .pull(&s.url("/a.img"), Some(&sha256(&a)), PullPolicy::Missing)
        .unwrap();
    assert_eq!((r.downloaded, r.digest.to_string()), (1, sha256(&a)));
    assert_eq!(fs::read(r.blobs[0].path()).unwrap(), a);
    s.set_down(true);
    for policy in [PullPolicy::Always, PullPolicy::Missing, PullPolicy::Never] {
        let r = e.pull(&s.url("/a.img"), Some(&sha256(&a)), policy).unwrap();
        assert!(!r.network && r.downloaded == 0, "{policy:?}");
    }
    // The suffix form is the same pin.
    let r = e
        .pull(
            &format!("{}@{}", s.url("/a.img"), sha256(&a)),
            None,
            PullPolicy::Always,
        )
        .unwrap();
    assert_eq!(r.downloaded, 0);
    assert_eq!(s.hits("/a.img"), 1);
}

/// Seed regression: the index maps the URL to an older digest; a pull
/// pinned to another digest must download, not trust the index.
#[test]
fn pinned_digest_with_a_stale_url_entry_downloads() {
    let e = env();
    let s = Server::start();
    let (a, b) = (bytes(1, 100_000), bytes(2, 120_000));
    s.set("/img", Resource::new(a.clone()).etag("\"a\""));
    let r = e.pull(&s.url("/img"), None, PullPolicy::Missing).unwrap();
    assert_eq!(r.digest.to_string(), sha256(&a));
    s.set("/img", Resource::new(b.clone()).etag("\"b\""));
    let r = e
        .pull(&s.url("/img"), Some(&sha256(&b)), PullPolicy::Missing)
        .unwrap();
    assert_eq!((r.digest.to_string(), r.downloaded), (sha256(&b), 1));
    assert_eq!(fs::read(r.blobs[0].path()).unwrap(), b);
    assert_eq!(s.downloads("/img"), 2);
    // No conditional request was made for the pinned pull: a 304 must
    // never stand in for a digest.
    assert!(s.seen("/img")[1].header("if-none-match").is_none());
    // The index now says what the URL served last.
    assert_eq!(
        e.store
            .layout()
            .read_ref(&s.url("/img"))
            .unwrap()
            .unwrap()
            .digest()
            .to_string(),
        sha256(&b)
    );
}

/// Seed regression: an upstream change behind an unpinned URL is picked
/// up with `always` (200 replaces), and a 304 reuses.
#[test]
fn upstream_change_is_picked_up_with_always() {
    let e = env();
    let s = Server::start();
    let (a, b) = (bytes(3, 50_000), bytes(4, 60_000));
    let url = s.url("/disk.raw");
    s.set(
        "/disk.raw",
        Resource::new(a.clone())
            .etag("\"v1\"")
            .last_modified("Mon, 02 Nov 2026 10:00:00 GMT"),
    );
    assert_eq!(
        e.pull(&url, None, PullPolicy::Missing)
            .unwrap()
            .digest
            .to_string(),
        sha256(&a)
    );
    s.set(
        "/disk.raw",
        Resource::new(b.clone())
            .etag("\"v2\"")
            .last_modified("Tue, 03 Nov 2026 10:00:00 GMT"),
    );
    // missing: what the store holds, no request at all.
    let r = e.pull(&url, None, PullPolicy::Missing).unwrap();
    assert_eq!((r.digest.to_string(), r.network), (sha256(&a), false));
    assert_eq!(s.hits("/disk.raw"), 1);
    // always: a conditional GET with the held validators; 200 replaces.
    let r = e.pull(&url, None, PullPolicy::Always).unwrap();
    assert_eq!((r.digest.to_string(), r.downloaded), (sha256(&b), 1));
    let seen = s.seen("/disk.raw");
    assert_eq!(seen[1].header("if-none-match"), Some("\"v1\""));
    assert_eq!(
        seen[1].header("if-modified-since"),
        Some("Mon, 02 Nov 2026 10:00:00 GMT")
    );
    // always again: 304, reused.
    let r = e.pull(&url, None, PullPolicy::Always).unwrap();
    assert_eq!(
        (r.digest.to_string(), r.downloaded, r.network),
        (sha256(&b), 0, true)
    );
    assert_eq!(s.seen("/disk.raw")[2].status, 304);
    let rec = e.store.layout().read_ref(&url).unwrap().unwrap();
    assert_eq!(rec.artifacts[0].etag.as_deref(), Some("\"v2\""));
    assert_eq!(
        rec.artifacts[0].last_modified.as_deref(),
        Some("Tue, 03 Nov 2026 10:00:00 GMT")
    );
}

/// Seed regression: a changed expected digest is never satisfied by an
/// older cached source, and a mismatch keeps nothing.
#[test]
fn changed_expected_digest_is_never_satisfied_by_an_older_source() {
    let e = env();
    let s = Server::start();
    let (a, b) = (bytes(5, 70_000), bytes(6, 70_000));
    s.set("/img", Resource::new(a.clone()));
    e.pull(&s.url("/img"), Some(&sha256(&a)), PullPolicy::Missing)
        .unwrap();
    // The publisher announces B, but the mirror still serves A.
    for policy in [PullPolicy::Missing, PullPolicy::Always] {
        let err = e
            .pull(&s.url("/img"), Some(&sha256(&b)), policy)
            .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{msg}");
        assert!(
            msg.contains(&sha256(&b)) && msg.contains(&sha256(&a)),
            "expected and actual named: {msg}"
        );
    }
    assert!(e.store.layout().present(&d(&sha256(&b)), None).is_none());
    assert_eq!(e.blob_count(), 1);
    assert!(e.tmp_is_empty(), "nothing kept of the mismatching download");
    // never: no network, and still not satisfied by A.
    let err = e
        .pull(&s.url("/img"), Some(&sha256(&b)), PullPolicy::Never)
        .unwrap_err();
    assert!(matches!(err, StoreError::NotPresent { .. }), "{err}");
    // The suffix form too, and a conflicting --digest is refused.
    let err = e
        .pull(
            &format!("{}@{}", s.url("/img"), sha256(&b)),
            None,
            PullPolicy::Missing,
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
    let err = e
        .pull(
            &format!("{}@{}", s.url("/img"), sha256(&b)),
            Some(&sha256(&a)),
            PullPolicy::Missing,
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::PinConflict { .. }), "{err}");
    // The record of the URL still names A.
    assert_eq!(
        e.store
            .layout()
            .read_ref(&s.url("/img"))
            .unwrap()
            .unwrap()
            .digest()
            .to_string(),
        sha256(&a)
    );
}

#[test]
fn never_is_offline() {
    let e = env();
    let s = Server::start();
    let a = bytes(7, 10_000);
    s.set("/x", Resource::new(a.clone()));
    let err = e.pull(&s.url("/x"), None, PullPolicy::Never).unwrap_err();
    assert!(matches!(err, StoreError::NotPresent { .. }), "{err}");
    assert_eq!(s.hits("/x"), 0);
    e.pull(&s.url("/x"), None, PullPolicy::Missing).unwrap();
    let r = e.pull(&s.url("/x"), None, PullPolicy::Never).unwrap();
    assert!(!r.network);
    assert_eq!(s.hits("/x"), 1);
    // A blob deleted behind the store's back: never fails, missing fetches.
    fs::remove_file(r.blobs[0].path()).unwrap();
    assert!(e.pull(&s.url("/x"), None, PullPolicy::Never).is_err());
    assert_eq!(
        e.pull(&s.url("/x"), None, PullPolicy::Missing)
            .unwrap()
            .downloaded,
        1
    );
}

#[test]
fn unreachable_server_reuses_the_held_copy_with_a_warning() {
    let e = env();
    let s = Server::start();
    let a = bytes(8, 20_000);
    s.set("/x", Resource::new(a.clone()).etag("\"1\""));
    e.pull(&s.url("/x"), None, PullPolicy::Missing).unwrap();
    s.set_down(true);
    let r = e.pull(&s.url("/x"), None, PullPolicy::Always).unwrap();
    assert_eq!(r.digest.to_string(), sha256(&a));
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    assert!(r.warnings[0].contains("unreachable"), "{}", r.warnings[0]);
    // Without a held copy it is an error.
    let err = e
        .pull(&s.url("/other"), None, PullPolicy::Always)
        .unwrap_err();
    assert!(err.is_unreachable(), "{err}");
}

#[test]
fn a_disconnect_mid_stream_resumes_with_range_and_if_range() {
    let e = env();
    let s = Server::start();
    let a = bytes(9, 3 << 20);
    s.set(
        "/big",
        Resource::new(a.clone())
            .etag("\"big\"")
            .fault(Fault::DisconnectAfter {
                bytes: 1 << 20,
                times: 2,
            }),
    );
    let r = e.pull(&s.url("/big"), None, PullPolicy::Missing).unwrap();
    assert_eq!(r.digest.to_string(), sha256(&a));
    let seen = s.seen("/big");
    assert_eq!(seen.len(), 3, "two cut transfers and a final one");
    assert!(seen[0].header("range").is_none());
    let range = seen[1].header("range").expect("the retry resumes");
    assert!(
        range.starts_with("bytes=") && range != "bytes=0-",
        "{range}"
    );
    assert_eq!(seen[1].header("if-range"), Some("\"big\""));
    assert_eq!(seen[2].status, 206);
    assert!(e.tmp_is_empty());
}

#[test]
fn a_resume_is_refused_when_the_file_changed_and_restarts() {
    let e = env();
    let s = Server::start();
    let (a, b) = (bytes(10, 2 << 20), bytes(11, 2 << 20));
    s.set(
        "/f",
        Resource::new(a)
            .etag("\"a\"")
            .fault(Fault::DisconnectAfter {
                bytes: 1 << 20,
                times: 1,
            }),
    );
    let s2 = s.clone();
    // Change the file while the client backs off: If-Range no longer
    // matches, the server answers 200 with the whole new file.
    let t = std::thread::spawn(move || {
        while s2.hits("/f") == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        s2.set("/f", Resource::new(b).etag("\"b\""));
    });
    let r = e.pull(&s.url("/f"), None, PullPolicy::Missing).unwrap();
    t.join().unwrap();
    let seen = s.seen("/f");
    assert_eq!(seen.last().unwrap().status, 200);
    assert_eq!(
        r.digest.to_string(),
        sha256(&bytes(11, 2 << 20)),
        "never a splice of two versions"
    );
}

#[test]
fn wrong_content_length_and_server_errors_are_retried() {
    let e = env();
    let s = Server::start();
    let a = bytes(12, 200_000);
    s.set(
        "/short",
        Resource::new(a.clone())
            .no_ranges()
            .fault(Fault::ShortBody {
                missing: 1000,
                times: 1,
            }),
    );
    let r = e.pull(&s.url("/short"), None, PullPolicy::Missing).unwrap();
    assert_eq!(r.digest.to_string(), sha256(&a));
    assert_eq!(s.hits("/short"), 2);
    s.set(
        "/flaky",
        Resource::new(a.clone()).fault(Fault::Status {
            status: 503,
            times: 2,
        }),
    );
    let r = e.pull(&s.url("/flaky"), None, PullPolicy::Missing).unwrap();
    assert_eq!(r.digest.to_string(), sha256(&a));
    assert_eq!(s.hits("/flaky"), 3);
    // A 404 is not retried, and keeps nothing.
    let err = e
        .pull(&s.url("/none"), None, PullPolicy::Missing)
        .unwrap_err();
    assert!(matches!(err, StoreError::Http { status: 404, .. }), "{err}");
    assert_eq!(s.hits("/none"), 1);
    assert!(e.tmp_is_empty());
}

#[test]
fn slow_responses_complete() {
    let e = env();
    let s = Server::start();
    let a = bytes(13, 64 << 10);
    s.set(
        "/slow",
        Resource::new(a.clone()).fault(Fault::Slow {
            chunk: 4096,
            delay: Duration::from_millis(10),
        }),
    );
    let r = e
        .pull(&s.url("/slow"), Some(&sha256(&a)), PullPolicy::Missing)
        .unwrap();
    assert_eq!(r.blobs[0].size(), a.len() as u64);
}

#[test]
fn local_files_are_hashed_and_revalidated() {
    let e = env();
    let file = e.root.join("disk.img");
    fs::write(&file, b"first version").unwrap();
    let reference = file.to_str().unwrap().to_string();
    let r = e.pull(&reference, None, PullPolicy::Missing).unwrap();
    assert_eq!(r.digest.to_string(), sha256(b"first version"));
    assert_eq!(r.record.source, "file");
    fs::write(&file, b"second version!").unwrap();
    let r = e
        .pull(&format!("file://{reference}"), None, PullPolicy::Missing)
        .unwrap();
    assert_eq!(r.digest.to_string(), sha256(b"second version!"));
    let r = e.pull(&reference, None, PullPolicy::Missing).unwrap();
    assert_eq!(
        (r.digest.to_string(), r.downloaded),
        (sha256(b"second version!"), 1)
    );
    // Unchanged: stat says so, nothing is read.
    let r = e.pull(&reference, None, PullPolicy::Missing).unwrap();
    assert_eq!(r.downloaded, 0);
    let err = e
        .pull(&reference, Some(&sha256(b"other")), PullPolicy::Missing)
        .unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
}

#[test]
fn a_corrupt_blob_is_detected_by_a_pinned_pull_and_fetched_again() {
    let e = env();
    let s = Server::start();
    let a = bytes(14, 10_000);
    s.set("/c", Resource::new(a.clone()));
    let r = e
        .pull(&s.url("/c"), Some(&sha256(&a)), PullPolicy::Missing)
        .unwrap();
    let p = r.blobs[0].path().to_path_buf();
    fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    fs::write(&p, bytes(15, 10_000)).unwrap();
    let r = e
        .pull(&s.url("/c"), Some(&sha256(&a)), PullPolicy::Missing)
        .unwrap();
    assert_eq!(r.downloaded, 1);
    assert_eq!(fs::read(&p).unwrap(), a);
}

/// A stand-in converter: copies the source and appends a marker, so a
/// result is recognisably "converted"; counts its runs.
struct CopyConverter {
    id: ConverterId,
    runs: std::cell::Cell<usize>,
}

impl CopyConverter {
    fn new(tag: &str) -> Self {
        CopyConverter {
            id: ConverterId {
                name: "raw-converter".into(),
                sha256: Digest::of(tag.as_bytes()).hex().to_string(),
            },
            runs: Default::default(),
        }
    }
}

impl ConvertBackend for CopyConverter {
    fn installed(&self) -> Vec<ConverterId> {
        vec![self.id.clone()]
    }
    fn convert(
        &self,
        source: &VerifiedBlob,
        dest: &Path,
        _target: &str,
    ) -> Result<ConverterId, StoreError> {
        self.runs.set(self.runs.get() + 1);
        let mut data = fs::read(source.path()).unwrap();
        data.extend_from_slice(b"+converted");
        fs::write(dest, data).unwrap();
        Ok(self.id.clone())
    }
}

#[test]
fn conversion_cache_rules() {
    let e = env();
    let s = Server::start();
    let a = bytes(16, 40_000);
    s.set("/src.raw", Resource::new(a.clone()).etag("\"e1\""));
    let url = s.url("/src.raw");
    let r = e.pull(&url, None, PullPolicy::Missing).unwrap();
    let record_before = fs::read_dir(e.store.layout().refs_dir())
        .unwrap()
        .map(|f| fs::read(f.unwrap().path()).unwrap())
        .collect::<Vec<_>>();
    let conv = CopyConverter::new("v1");
    let c = e.store.converted(&r.digest, "raw", &conv).unwrap();
    assert!(c.converted_now);
    assert_eq!(
        c.digest.to_string(),
        sha256(&[a.as_slice(), b"+converted"].concat())
    );
    assert_eq!(c.source, r.digest);
    // Cached: same key, valid digest file.
    let c2 = e.store.converted(&r.digest, "raw", &conv).unwrap();
    assert!(!c2.converted_now && conv.runs.get() == 1);
    assert!(c2.verify().unwrap());
    // Seed regression: a converted image whose digest file is missing is
    // incomplete, and is rebuilt.
    fs::remove_file(c.path.with_file_name("image.digest")).unwrap();
    let c3 = e.store.converted(&r.digest, "raw", &conv).unwrap();
    assert!(c3.converted_now && conv.runs.get() == 2);
    // A digest file that does not match the image (truncated image) too.
    fs::write(&c.path, b"short").unwrap();
    assert!(
        e.store
            .converted(&r.digest, "raw", &conv)
            .unwrap()
            .converted_now
    );
    // Another converter build: its own key, rebuilt.
    let conv2 = CopyConverter::new("v2");
    let c4 = e.store.converted(&r.digest, "raw", &conv2).unwrap();
    assert!(c4.converted_now && c4.path != c.path);
    // Conversion never wrote the reference index, so freshness checks of
    // the source are what they were: always still revalidates with the
    // source's own ETag.
    let record_after = fs::read_dir(e.store.layout().refs_dir())
        .unwrap()
        .map(|f| fs::read(f.unwrap().path()).unwrap())
        .collect::<Vec<_>>();
    assert_eq!(record_before, record_after);
    e.pull(&url, None, PullPolicy::Always).unwrap();
    assert_eq!(
        s.seen("/src.raw")[1].header("if-none-match"),
        Some("\"e1\"")
    );
    assert_eq!(s.seen("/src.raw")[1].status, 304);
    // The source is verified before converting: a corrupted source is not
    // converted.
    let p = e.store.layout().blob_path(&r.digest);
    fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    fs::write(&p, b"tampered").unwrap();
    let conv3 = CopyConverter::new("v3");
    assert!(e.store.converted(&r.digest, "raw", &conv3).is_err());
    assert_eq!(conv3.runs.get(), 0);
}

struct Keep(Vec<Digest>);
impl RootSet for Keep {
    fn roots(&self) -> Result<Vec<Digest>, StoreError> {
        Ok(self.0.clone())
    }
}

#[test]
fn rm_and_gc_keep_what_is_referenced() {
    let e = env();
    let s = Server::start();
    let (a, b, c) = (bytes(17, 1000), bytes(18, 2000), bytes(19, 3000));
    for (p, body) in [("/a", &a), ("/b", &b), ("/c", &c)] {
        s.set(p, Resource::new(body.clone()));
        e.pull(&s.url(p), None, PullPolicy::Missing).unwrap();
    }
    let conv = CopyConverter::new("gc");
    let ca = e.store.converted(&d(&sha256(&a)), "raw", &conv).unwrap();
    let cb = e.store.converted(&d(&sha256(&b)), "raw", &conv).unwrap();
    assert!(e.store.remove(&s.url("/a")).unwrap());
    assert!(e.store.remove(&s.url("/b")).unwrap());
    assert!(!e.store.remove(&s.url("/b")).unwrap());
    // /b's converted image is named by a (future) VM record: it stays.
    let dry = e.store.gc(&Keep(vec![cb.digest.clone()]), true).unwrap();
    assert_eq!(dry.removed_blobs.len(), 2);
    assert_eq!(e.blob_count(), 3, "dry run deletes nothing");
    let report = e.store.gc(&Keep(vec![cb.digest.clone()]), false).unwrap();
    let mut removed: Vec<String> = report.removed_blobs.iter().map(|d| d.to_string()).collect();
    removed.sort();
    let mut want = vec![sha256(&a), sha256(&b)];
    want.sort();
    assert_eq!(removed, want);
    assert_eq!(report.removed_conversions.len(), 1);
    assert!(!ca.path.exists() && cb.path.exists());
    assert!(e.store.layout().present(&d(&sha256(&c)), None).is_some());
    // Nothing referenced any more once the root is gone too.
    e.store.gc(&NoRoots, false).unwrap();
    assert!(!cb.path.exists());
    assert_eq!(e.blob_count(), 1);
}
