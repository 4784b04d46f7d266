//! Crash safety and concurrency with the real binary: pulls killed with
//! SIGKILL mid-download and between writes, conversions killed
//! mid-way and between the image and its digest file, and eight processes
//! pulling one reference at once.

mod store_common;

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cocoon_host::store::{
    ConvertBackend, ConverterId, Digest, Layout, Quiet, Store, StoreError, VerifiedBlob,
};
use store_common::{bytes, local_pull, sha256, Cli, Fault, NoSources, Resource, Server};

fn kill9(child: &mut Child) {
    let _ = Command::new("kill")
        .arg("-KILL")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
}

/// The store's invariants after any crash: every blob hashes to its
/// name, every record names only present blobs, and nothing unverified
/// is outside `tmp/`.
fn assert_consistent(images: &Path) {
    let layout = Layout::create(images.to_path_buf()).unwrap();
    for e in fs::read_dir(layout.blobs_dir()).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with('.'), "a temp file in blobs/: {name}");
        assert_eq!(
            sha256(&fs::read(e.path()).unwrap()),
            format!("sha256:{name}"),
            "blob {name} does not hash to its name"
        );
    }
    for r in layout.list_refs().unwrap() {
        for a in &r.artifacts {
            assert!(
                layout.present(&a.digest, Some(a.size)).is_some(),
                "{} names missing blob {}",
                r.reference,
                a.digest
            );
        }
    }
}

/// Bytes in the partial download files of `tmp/`.
fn partial_len(images: &Path) -> u64 {
    fs::read_dir(images.join("tmp"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn slow(body: Vec<u8>) -> Resource {
    Resource::new(body).etag("\"slow\"").fault(Fault::Slow {
        chunk: 32 << 10,
        delay: Duration::from_millis(10),
    })
}

#[test]
fn eight_processes_pull_one_reference_and_download_once() {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(dir.path());
    let s = Server::start();
    let body = bytes(1, 1 << 20);
    // Slow enough that all eight are running while the first downloads.
    s.set("/shared.img", slow(body.clone()));
    let url = s.url("/shared.img");
    let children: Vec<Child> = (0..8)
        .map(|_| {
            cli.command(&["image", "pull", &url, "-o", "json"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["digest"], sha256(&body));
    }
    assert_eq!(s.hits("/shared.img"), 1, "exactly one download");
    assert_consistent(&dir.path().join("images"));
}

#[test]
fn a_pull_killed_mid_download_never_serves_partial_data_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(dir.path());
    let s = Server::start();
    let body = bytes(2, 4 << 20);
    s.set("/big.img", slow(body.clone()));
    let url = s.url("/big.img");
    let images = dir.path().join("images");
    let mut killed = 0;
    for round in 1..=3u64 {
        let mut child = cli
            .command(&["image", "pull", &url])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Kill once this round's transfer has put more on disk than the
        // last one: a different point of the body every round.
        let started = Instant::now();
        while partial_len(&images) < round * (768 << 10)
            && started.elapsed() < Duration::from_secs(20)
            && child.try_wait().unwrap().is_none()
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        if child.try_wait().unwrap().is_none() {
            kill9(&mut child);
            killed += 1;
        }
        assert_consistent(&images);
        // Nothing is served: offline, the reference is not in the store.
        let out = cli.run(&["image", "pull", "--pull", "never", &url]);
        assert!(!out.status.success(), "a killed pull left a usable image");
        let list = cli.json(&["image", "list"]);
        assert_eq!(list.as_array().unwrap().len(), 0);
    }
    assert_eq!(killed, 3, "the pulls were killed mid-download");
    let v = cli.json(&["image", "pull", &url]);
    assert_eq!(v["digest"], sha256(&body));
    assert_consistent(&images);
    // Later attempts resumed what earlier ones had written.
    let seen = s.seen("/big.img");
    assert!(
        seen.iter()
            .any(|r| r.status == 206 && r.header("if-range") == Some("\"slow\"")),
        "no resumed request: {seen:?}"
    );
    assert!(
        fs::read_dir(images.join("tmp")).unwrap().next().is_none(),
        "partial files left after success"
    );
}

#[test]
fn a_pull_killed_between_blob_and_record_completes_next_time() {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(dir.path());
    let s = Server::start();
    let body = bytes(3, 100_000);
    s.set("/r.img", Resource::new(body.clone()));
    let url = s.url("/r.img");
    let images = dir.path().join("images");
    for point in ["before-blob-rename", "before-record"] {
        let out = cli
            .command(&["image", "pull", "--digest", &sha256(&body), &url])
            .env("COCOON_CRASH_AT", point)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{point}: the process was not killed");
        assert_consistent(&images);
        let out = cli.run(&["image", "pull", "--pull", "never", &url]);
        assert!(
            !out.status.success(),
            "{point}: an image without its record was served"
        );
    }
    // The blob committed before the kill is reused (re-hashed, pinned).
    let hits = s.hits("/r.img");
    let v = cli.json(&["image", "pull", "--digest", &sha256(&body), &url]);
    assert_eq!(v["digest"], sha256(&body));
    assert_eq!(v["downloaded"], 0);
    assert_eq!(s.hits("/r.img"), hits);
    let v = cli.json(&["image", "inspect", "--verify", &url]);
    assert_eq!(v["blobs"][0]["verified"], true);
}

/// A converter that writes slowly, so a kill lands mid-conversion.
struct SlowCopy;

fn slow_copy_id() -> ConverterId {
    ConverterId {
        name: "slow-copy".into(),
        sha256: Digest::of(b"slow-copy").hex().to_string(),
    }
}

impl ConvertBackend for SlowCopy {
    fn installed(&self) -> Vec<ConverterId> {
        vec![slow_copy_id()]
    }
    fn convert(
        &self,
        source: &VerifiedBlob,
        dest: &Path,
        _target: &str,
    ) -> Result<ConverterId, StoreError> {
        use std::io::Write;
        let data = fs::read(source.path()).unwrap();
        let mut f = fs::File::create(dest).unwrap();
        for chunk in data.chunks(64 << 10) {
            f.write_all(chunk).unwrap();
            f.flush().unwrap();
            if std::env::var_os("SLOW_COPY_DELAY").is_some() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(slow_copy_id())
    }
}

/// Not a test on its own: the child process of the conversion crash test
/// (re-executed with `STORE_CHILD` set).
#[test]
fn child_convert() {
    let Some(root) = std::env::var_os("STORE_CHILD") else {
        return;
    };
    let store = Store::at(root.into()).unwrap();
    let digest: Digest = std::env::var("STORE_SOURCE").unwrap().parse().unwrap();
    store.converted(&digest, "raw", &SlowCopy).unwrap();
}

fn spawn_child(root: &Path, source: &Digest, envs: &[(&str, &str)]) -> Child {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "child_convert", "--test-threads=1"])
        .env("STORE_CHILD", root)
        .env("STORE_SOURCE", source.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in envs {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

#[test]
fn a_conversion_killed_midway_or_before_its_digest_file_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("images");
    let store = Store::at(root.clone()).unwrap();
    let file = dir.path().join("src.raw");
    let data = bytes(4, 2 << 20);
    fs::write(&file, &data).unwrap();
    let source = store
        .pull(&NoSources, &local_pull(&file), &Quiet)
        .unwrap()
        .digest;
    let want = sha256(&data);

    // 1. Killed mid-conversion (by the test, at some point of the copy).
    let mut child = spawn_child(&root, &source, &[("SLOW_COPY_DELAY", "1")]);
    let started = Instant::now();
    let work_dir = root.join("converted").join(source.hex()).join("raw");
    while !work_dir.exists() && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(150));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the conversion finished before it could be killed"
    );
    kill9(&mut child);
    let cache = work_dir.join(slow_copy_id().sha256);
    assert!(!cache.join("image.digest").exists());
    let c = store.converted(&source, "raw", &SlowCopy).unwrap();
    assert!(c.converted_now, "a half-written conversion was served");
    assert_eq!(c.digest.to_string(), want);
    assert!(fs::read_dir(&work_dir).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with(".work-")));

    // 2. Killed between the image and its digest file.
    fs::remove_dir_all(&cache).unwrap();
    let mut child = spawn_child(&root, &source, &[("COCOON_CRASH_AT", "before-digest-file")]);
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(
        cache.join("image").exists() && !cache.join("image.digest").exists(),
        "the kill landed between the two writes"
    );
    let c = store.converted(&source, "raw", &SlowCopy).unwrap();
    assert!(
        c.converted_now,
        "an image without its digest file was served"
    );
    assert!(c.verify().unwrap());
    assert!(
        !store
            .converted(&source, "raw", &SlowCopy)
            .unwrap()
            .converted_now
    );
}

/// Entries of `dir` whose names start with a dot (work and temp files).
fn dot_files(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_real_engine_killed_mid_conversion_and_before_the_digest_file() {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(dir.path());
    let file = dir.path().join("disk.raw");
    let data = bytes(5, 256 << 20);
    fs::write(&file, &data).unwrap();
    let want = sha256(&data);
    drop(data);
    let reference = file.to_str().unwrap();
    cli.json(&["image", "pull", reference]);
    let work_dir = dir
        .path()
        .join("images/converted")
        .join(&want["sha256:".len()..])
        .join("raw");

    // 1. SIGKILL while the engine writes.
    let mut child = cli
        .command(&["image", "pull", "--convert", "raw", reference])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while dot_files(&work_dir).is_empty()
        && started.elapsed() < Duration::from_secs(30)
        && child.try_wait().unwrap().is_none()
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the conversion ended before it could be killed"
    );
    kill9(&mut child);
    let digest_files: Vec<_> = fs::read_dir(&work_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("image.digest").exists())
        .collect();
    assert!(
        digest_files.is_empty(),
        "a digest file exists for a killed conversion"
    );
    let v = cli.json(&["image", "pull", "--convert", "raw", reference]);
    assert_eq!(v["converted"]["converted_now"], true);
    assert_eq!(
        v["converted"]["digest"],
        want.as_str(),
        "raw to raw keeps the bytes"
    );
    assert!(
        dot_files(&work_dir).is_empty(),
        "work files left: {:?}",
        dot_files(&work_dir)
    );
    let v = cli.json(&["image", "pull", "--convert", "raw", reference]);
    assert_eq!(v["converted"]["converted_now"], false);

    // 2. SIGKILL between the image and its digest file.
    let image = std::path::PathBuf::from(v["converted"]["path"].as_str().unwrap());
    fs::remove_dir_all(image.parent().unwrap()).unwrap();
    let out = cli
        .command(&["image", "pull", "--convert", "raw", reference])
        .env("COCOON_CRASH_AT", "before-digest-file")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(image.exists() && !image.with_file_name("image.digest").exists());
    let v = cli.json(&["image", "pull", "--convert", "raw", reference]);
    assert_eq!(
        v["converted"]["converted_now"], true,
        "an image without its digest file was served"
    );
    assert_eq!(v["converted"]["digest"], want.as_str());
}

/// Bytes allocated to `path` (what removing it gives back).
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

#[test]
fn gc_frees_the_partial_conversion_and_the_staged_download_a_kill_left() {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(dir.path());
    let images = dir.path().join("images");
    // A local image, converted by a child that is killed mid-way.
    let file = dir.path().join("src.raw");
    fs::write(&file, bytes(6, 8 << 20)).unwrap();
    let v = cli.json(&["image", "pull", file.to_str().unwrap()]);
    let source: Digest = v["digest"].as_str().unwrap().parse().unwrap();
    let mut child = spawn_child(&images, &source, &[("SLOW_COPY_DELAY", "1")]);
    let work_dir = images.join("converted").join(source.hex()).join("raw");
    let work = |d: &Path| {
        fs::read_dir(d)
            .into_iter()
            .flatten()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with(".work-"))
            .map(|e| e.path())
    };
    let started = Instant::now();
    while work(&work_dir).is_none_or(|w| allocated(&w) < 1 << 20)
        && started.elapsed() < Duration::from_secs(20)
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    kill9(&mut child);
    let partial_conversion = work(&work_dir).expect("a partial conversion");
    // A download killed mid-way.
    let s = Server::start();
    s.set("/big.img", slow(bytes(7, 4 << 20)));
    let mut pull = cli
        .command(&["image", "pull", &s.url("/big.img")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while partial_len(&images) < 512 << 10 && started.elapsed() < Duration::from_secs(40) {
        std::thread::sleep(Duration::from_millis(5));
    }
    kill9(&mut pull);
    let staged: Vec<_> = fs::read_dir(images.join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!staged.is_empty());
    let want = allocated(&partial_conversion) + staged.iter().map(|p| allocated(p)).sum::<u64>();
    assert!(want >= (1 << 20) + (512 << 10), "{want}");

    let v = cli.json(&["image", "gc"]);
    assert!(
        v["freed_bytes"].as_u64().unwrap() >= want,
        "freed {} of at least {want}",
        v["freed_bytes"]
    );
    assert_eq!(
        v["removed_partials"].as_u64().unwrap(),
        1 + staged.len() as u64
    );
    assert!(!partial_conversion.exists());
    assert_eq!(fs::read_dir(images.join("tmp")).unwrap().count(), 0);
    // The pulled image itself is referenced and stays.
    assert_eq!(v["kept_blobs"], 1);
}

#[test]
fn gc_leaves_a_staged_download_that_a_live_process_holds() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::at(dir.path().join("images")).unwrap();
    let layout = store.layout();
    let partial = layout.tmp_dir().join("u-held.partial");
    fs::write(&partial, vec![7u8; 100_000]).unwrap();
    // Held the way a downloading process holds it.
    let held = cocoon_host::store::lock::exclusive(&layout.lock_path("1-stage-u-held")).unwrap();
    let r = store.gc(&cocoon_host::store::NoRoots, false).unwrap();
    assert_eq!((r.removed_partials, r.busy_partials), (0, 1));
    assert!(partial.exists());
    drop(held);
    let r = store.gc(&cocoon_host::store::NoRoots, false).unwrap();
    assert_eq!((r.removed_partials, r.busy_partials), (1, 0));
    assert!(r.freed_bytes >= 100_000, "{}", r.freed_bytes);
    assert!(!partial.exists());
}
