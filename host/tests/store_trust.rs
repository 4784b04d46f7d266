//! The store's trust and permissions, with the real binary: a private
//! state dir, credentials in URLs never kept or printed, symlinks and
//! FIFOs planted under the store refused, blobs and conversions re-verified
//! where their bytes are used, corrupt ones fetched or built again.
//!
//! `COCOON_HOST_BIN=/path/to/old/cocoon-host` runs these against another
//! build.

mod store_common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use store_common::{bytes, sha256, Cli, Resource, Server};

fn hex(digest: &str) -> &str {
    &digest["sha256:".len()..]
}

/// Every path under `dir`, not following symlinks.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap().flatten() {
        out.push(e.path());
        if e.file_type().unwrap().is_dir() {
            walk(&e.path(), out);
        }
    }
}

/// Runs `cli args`, killing it (and failing) if it takes over `limit`.
fn run_within(cli: &Cli, args: &[&str], limit: Duration) -> Output {
    let mut child = cli
        .command(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn mkfifo(path: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
}

fn flip_byte(path: &Path) {
    let mut data = fs::read(path).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0x40;
    // Root writes a 0400 file all the same.
    fs::write(path, data).unwrap();
}

#[test]
fn the_state_dir_and_everything_in_it_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cli = Cli::new(&state);
    let secret = dir.path().join("secret.img");
    fs::write(&secret, b"not for others").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o644)).unwrap();
    let s = Server::start();
    s.set("/a.raw", Resource::new(bytes(1, 4096)));
    cli.json(&["image", "pull", secret.to_str().unwrap()]);
    cli.json(&["image", "pull", "--convert", "raw", &s.url("/a.raw")]);
    // `everything`: every file and directory; otherwise the store's own
    // directories, which are what keeps others out of an older store's
    // looser files below them.
    let check = |label: &str, everything: bool| {
        if everything {
            // Made by the store; an existing one the operator named is
            // left as it is (it may be shared), with a warning.
            assert_eq!(
                fs::metadata(&state).unwrap().mode() & 0o777,
                0o700,
                "{label}: state dir"
            );
        }
        let mut all = vec![state.join("images")];
        if everything {
            walk(&state.join("images"), &mut all);
        } else {
            all.extend(
                fs::read_dir(state.join("images"))
                    .unwrap()
                    .map(|e| e.unwrap().path()),
            );
            all.push(state.join("images/blobs/sha256"));
        }
        for p in &all {
            let m = fs::symlink_metadata(p).unwrap();
            assert_eq!(
                m.mode() & 0o077,
                0,
                "{label}: {} is {:o}",
                p.display(),
                m.mode()
            );
        }
        let blob = state
            .join("images/blobs/sha256")
            .join(hex(&sha256(b"not for others")));
        assert_eq!(
            fs::metadata(&blob).unwrap().mode() & 0o777,
            0o400,
            "{label}"
        );
    };
    check("new store", true);
    // A store made by an older version (0755 dirs, 0444 blobs) is
    // tightened when it is next used.
    let mut all = vec![state.clone(), state.join("images")];
    walk(&state.join("images"), &mut all);
    for p in &all {
        let mode = if p.is_dir() { 0o755 } else { 0o444 };
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    }
    cli.json(&["image", "pull", secret.to_str().unwrap()]);
    check("old store", false);
}

#[test]
fn credentials_in_a_url_are_used_and_never_kept_or_printed() {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(dir.path());
    let s = Server::start();
    let body = bytes(2, 5000);
    // base64("user:hunter2")
    s.set(
        "/private.raw",
        Resource::new(body.clone()).require("authorization", "Basic dXNlcjpodW50ZXIy"),
    );
    let port = s.port;
    let with_creds = format!("http://user:hunter2@127.0.0.1:{port}/private.raw");
    let out = cli.run(&["image", "pull", "-o", "json", &with_creds]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("hunter2"), "printed: {text}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["digest"], sha256(&body));
    let shown = format!("http://***@127.0.0.1:{port}/private.raw");
    assert_eq!(v["reference"], shown.as_str());
    // Nothing under the state dir holds the password, in content or name.
    let mut all = Vec::new();
    walk(dir.path(), &mut all);
    for p in &all {
        assert!(!p.to_string_lossy().contains("hunter2"), "{}", p.display());
        if p.is_file() {
            let data = fs::read(p).unwrap();
            assert!(
                !data.windows(7).any(|w| w == b"hunter2"),
                "{} holds the password",
                p.display()
            );
        }
    }
    // The reference finds its record with or without the credentials.
    for r in [&with_creds, &shown] {
        let v = cli.json(&["image", "inspect", r]);
        assert_eq!(v["reference"], shown.as_str());
    }
    let list = cli.json(&["image", "list"]);
    assert_eq!(list[0]["reference"], shown.as_str());
    // Failures do not print it either: a wrong password (401), an
    // unreachable port.
    for bad in [
        format!("http://user:hunter2x@127.0.0.1:{port}/private.raw"),
        "http://user:hunter2@127.0.0.1:1/x.raw".to_string(),
    ] {
        let out = cli.run(&["image", "pull", "--pull", "always", &bad]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(!err.contains("hunter2"), "printed: {err}");
    }
}

#[test]
fn a_symlink_or_fifo_planted_in_tmp_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(dir.path());
    let s = Server::start();
    let body = bytes(3, 10_000);
    s.set("/x.raw", Resource::new(body.clone()));
    // Make the store, then plant the entries where the pinned download of
    // this digest stages its bytes.
    cli.json(&["image", "list"]);
    let staged = dir
        .path()
        .join(format!("images/tmp/d-{}.partial", hex(&sha256(&body))));
    let outside = dir.path().join("precious");
    fs::write(&outside, b"precious data").unwrap();
    std::os::unix::fs::symlink(&outside, &staged).unwrap();
    let pin = sha256(&body);
    let url = s.url("/x.raw");
    let pull = || {
        let out = run_within(
            &cli,
            &["image", "pull", "--digest", &pin, &url],
            Duration::from_secs(20),
        );
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = pull();
    assert!(!ok, "{err}");
    assert!(
        err.contains(&staged.display().to_string()) && err.contains("a symbolic link"),
        "{err}"
    );
    assert_eq!(fs::read(&outside).unwrap(), b"precious data");
    assert!(fs::symlink_metadata(&staged)
        .unwrap()
        .file_type()
        .is_symlink());

    fs::remove_file(&staged).unwrap();
    mkfifo(&staged);
    let (ok, err) = pull();
    assert!(!ok && err.contains("a FIFO"), "{err}");
    // Once the planted entry is gone, the pull works.
    fs::remove_file(&staged).unwrap();
    let v = cli.json(&[
        "image",
        "pull",
        "--digest",
        &sha256(&body),
        &s.url("/x.raw"),
    ]);
    assert_eq!(v["downloaded"], 1);
}

#[test]
fn a_symlink_or_fifo_in_place_of_a_blob_is_replaced_by_the_real_blob() {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(dir.path());
    let s = Server::start();
    let body = bytes(4, 10_000);
    s.set("/y.raw", Resource::new(body.clone()));
    let pin = sha256(&body);
    cli.json(&["image", "pull", "--digest", &pin, &s.url("/y.raw")]);
    let blob = dir.path().join("images/blobs/sha256").join(hex(&pin));
    // A symlink to a file outside with the very same bytes: following it
    // would "verify", and the store would serve a file it does not own.
    let outside = dir.path().join("outside.raw");
    fs::write(&outside, &body).unwrap();
    fs::remove_file(&blob).unwrap();
    std::os::unix::fs::symlink(&outside, &blob).unwrap();
    let v = cli.json(&["image", "pull", "--digest", &pin, &s.url("/y.raw")]);
    assert_eq!(v["downloaded"], 1, "the symlink was not taken for the blob");
    assert!(fs::symlink_metadata(&blob).unwrap().file_type().is_file());
    assert_eq!(fs::read(&outside).unwrap(), body);

    fs::remove_file(&blob).unwrap();
    mkfifo(&blob);
    let out = run_within(
        &cli,
        &[
            "image",
            "pull",
            "-o",
            "json",
            "--digest",
            &pin,
            &s.url("/y.raw"),
        ],
        Duration::from_secs(20),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(fs::symlink_metadata(&blob).unwrap().file_type().is_file());
}

#[test]
fn a_flipped_byte_is_caught_by_an_unpinned_pull_and_fetched_again() {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(dir.path());
    let s = Server::start();
    let body = bytes(5, 50_000);
    s.set("/z.raw", Resource::new(body.clone()).etag("\"z\""));
    let v = cli.json(&["image", "pull", &s.url("/z.raw")]);
    let blob = dir
        .path()
        .join("images/blobs/sha256")
        .join(hex(v["digest"].as_str().unwrap()));
    flip_byte(&blob);
    let v = cli.json(&["image", "pull", &s.url("/z.raw")]);
    assert_eq!(
        v["downloaded"], 1,
        "a corrupt blob was served as in the store"
    );
    assert_eq!(fs::read(&blob).unwrap(), body);
    // Not a conditional request: the store no longer has a copy to keep.
    let seen = s.seen("/z.raw");
    assert_eq!(seen.len(), 2);
    assert!(seen[1].header("if-none-match").is_none());
    // Offline, a corrupt blob is an error that says so.
    flip_byte(&blob);
    let out = cli.run(&["image", "pull", "--pull", "never", &s.url("/z.raw")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("corrupt"), "{err}");
}

#[test]
fn verify_covers_conversions_and_a_corrupt_source_is_fetched_again_to_convert() {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(dir.path());
    let s = Server::start();
    let body = bytes(6, 1 << 20);
    s.set("/disk.raw", Resource::new(body.clone()));
    let url = s.url("/disk.raw");
    let v = cli.json(&["image", "pull", "--convert", "raw", &url]);
    let image = PathBuf::from(v["converted"]["path"].as_str().unwrap());
    let v = cli.json(&["image", "inspect", "--verify", &url]);
    assert_eq!(v["conversions"][0]["verified"], true);
    assert_eq!(v["conversions"][0]["target"], "raw");

    flip_byte(&image);
    let out = cli.run(&["image", "inspect", "--verify", "-o", "json", &url]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a corrupt conversion must fail --verify"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["conversions"][0]["verified"], false);
    assert!(!image.exists(), "the corrupt conversion was removed");
    let v = cli.json(&["image", "pull", "--convert", "raw", &url]);
    assert_eq!(v["converted"]["converted_now"], true);
    assert_eq!(v["converted"]["digest"], sha256(&body).as_str());

    // A corrupt source: fetched again, then converted.
    let blob = dir
        .path()
        .join("images/blobs/sha256")
        .join(hex(&sha256(&body)));
    flip_byte(&blob);
    fs::remove_dir_all(image.parent().unwrap()).unwrap();
    let v = cli.json(&["image", "pull", "--convert", "raw", &url]);
    assert_eq!(v["downloaded"], 1);
    assert_eq!(v["converted"]["digest"], sha256(&body).as_str());
}
