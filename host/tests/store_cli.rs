//! `cocoon-host image pull|list|inspect|rm|gc` end to end with the real
//! binary: JSON output, plain progress lines off a terminal, exit codes.

mod store_common;

use store_common::{bytes, sha256, Cli, Resource, Server};

#[test]
fn pull_list_inspect_rm_gc() {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(dir.path());
    let s = Server::start();
    let (a, b) = (bytes(1, 5000), bytes(2, 7000));
    s.set("/a.qcow2", Resource::new(a.clone()).etag("\"a\""));
    s.set("/b.raw", Resource::new(b.clone()));

    // Progress off a terminal: plain lines on stderr.
    let out = cli.run(&["image", "pull", &s.url("/a.qcow2")]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("downloading") && err.contains("5000 bytes"),
        "{err}"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&sha256(&a)), "{text}");

    let v = cli.json(&["image", "pull", "--digest", &sha256(&b), &s.url("/b.raw")]);
    assert_eq!(v["downloaded"], 1);
    assert_eq!(v["record"]["artifacts"][0]["pinned"], true);

    let list = cli.json(&["image", "list"]);
    let refs: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["reference"].as_str().unwrap())
        .collect();
    assert_eq!(refs, [s.url("/a.qcow2"), s.url("/b.raw")]);

    let v = cli.json(&["image", "inspect", "--verify", &s.url("/a.qcow2")]);
    assert_eq!(v["artifacts"][0]["etag"], "\"a\"");
    assert_eq!(v["artifacts"][0]["format_hint"], "qcow2");
    assert_eq!(v["artifacts"][0]["size"], 5000);
    assert_eq!(v["blobs"][0]["verified"], true);

    // Offline, an unknown reference is an error naming the policy.
    let out = cli.run(&["image", "pull", "--pull", "never", &s.url("/c")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("never"));

    let v = cli.json(&["image", "rm", &s.url("/a.qcow2")]);
    assert_eq!(v["removed"][0], s.url("/a.qcow2"));
    assert!(!cli
        .run(&["image", "rm", &s.url("/a.qcow2")])
        .status
        .success());
    assert!(!cli
        .run(&["image", "inspect", &s.url("/a.qcow2")])
        .status
        .success());

    let v = cli.json(&["image", "gc", "--dry-run"]);
    assert_eq!(v["removed_blobs"][0], sha256(&a));
    let v = cli.json(&["image", "gc"]);
    assert_eq!(v["removed_blobs"].as_array().unwrap().len(), 1);
    assert_eq!(v["kept_blobs"], 1);
    let v = cli.json(&["image", "pull", "--pull", "never", &s.url("/b.raw")]);
    assert_eq!(v["digest"], sha256(&b));

    // A mismatch names both digests and exits non-zero.
    let wrong = sha256(b"x");
    let out = cli.run(&["image", "pull", "--digest", &wrong, &s.url("/a.qcow2")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(&wrong) && err.contains(&sha256(&a)),
        "{err}"
    );
}

#[test]
fn digests_name_images_wherever_a_reference_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(dir.path());
    let s = Server::start();
    let body = bytes(3, 6000);
    s.set("/d.raw", Resource::new(body.clone()));
    let url = s.url("/d.raw");
    cli.json(&["image", "pull", &url]);
    let full = sha256(&body);
    let hex = &full["sha256:".len()..];
    for name in [
        full.clone(),
        format!("sha256:{}", &hex[..12]),
        hex[..16].to_string(),
    ] {
        let v = cli.json(&["image", "inspect", "--verify", &name]);
        assert_eq!(v["digest"], full.as_str(), "{name}");
        assert_eq!(v["references"][0], url.as_str(), "{name}");
        assert_eq!(v["verified"], true, "{name}");
    }
    // Too short to be taken for a digest, and a clear error.
    let out = cli.run(&["image", "inspect", &format!("sha256:{}", &hex[..11])]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("12 to 64 hex digits"),
        "{err}"
    );
    // Pulled by digest from the store, offline.
    s.set_down(true);
    let v = cli.json(&["image", "pull", "--pull", "never", &hex[..12]]);
    assert_eq!(
        (v["digest"].as_str(), v["network"].as_bool()),
        (Some(full.as_str()), Some(false))
    );
    let out = cli.run(&["image", "pull", &sha256(b"unknown")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no image in the store"),
        "{err}"
    );
    // Two blobs sharing the prefix: ambiguous, both named.
    let twin = format!("{}{}", &hex[..12], "0".repeat(52));
    std::fs::write(dir.path().join("images/blobs/sha256").join(&twin), b"x").unwrap();
    let out = cli.run(&["image", "inspect", &hex[..12]]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("ambiguous")
            && err.contains(&twin)
            && err.contains(hex),
        "{err}"
    );
    std::fs::remove_file(dir.path().join("images/blobs/sha256").join(&twin)).unwrap();
    // rm by digest forgets the references naming it.
    let v = cli.json(&["image", "rm", &full]);
    assert_eq!(v["removed"][0], url.as_str());
    assert_eq!(cli.json(&["image", "list"]).as_array().unwrap().len(), 0);
}

#[test]
fn times_are_dates_for_people_and_numbers_in_json() {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(dir.path());
    let file = dir.path().join("t.img");
    std::fs::write(&file, b"t").unwrap();
    let v = cli.json(&["image", "pull", file.to_str().unwrap()]);
    assert!(v["record"]["pulled_at"].as_u64().unwrap() > 1_700_000_000);
    for args in [
        vec!["image", "inspect", file.to_str().unwrap()],
        vec!["image", "list"],
    ] {
        let out = cli.run(&args);
        let text = String::from_utf8_lossy(&out.stdout);
        // 2026-12-01T20:10:18Z
        let date = text
            .split_whitespace()
            .find(|w| w.len() == 20 && w.ends_with('Z') && w.as_bytes()[10] == b'T');
        assert!(date.is_some(), "{args:?}: no RFC 3339 date in {text}");
        assert!(!text.contains("(unix)"), "{text}");
    }
}

#[test]
fn a_relative_path_that_exists_is_pulled_and_one_that_does_not_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(&dir.path().join("state"));
    std::fs::write(dir.path().join("disk.img"), b"relative").unwrap();
    let out = cli
        .command(&["image", "pull", "-o", "json", "disk.img"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["digest"], sha256(b"relative"));
    assert_eq!(v["record"]["source"], "file");
    let out = cli
        .command(&["image", "pull", "nosuch.img"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("no such file")
            && err.contains(&dir.path().join("nosuch.img").display().to_string()),
        "{err}"
    );
}

#[test]
fn downloaded_is_printed_once_and_only_for_what_was_stored() {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(dir.path());
    let s = Server::start();
    let body = bytes(4, 300_000);
    // Two cut transfers (no ranges: each starts over), then a whole one.
    s.set(
        "/cut.raw",
        Resource::new(body.clone())
            .no_ranges()
            .fault(store_common::Fault::DisconnectAfter {
                bytes: 100_000,
                times: 2,
            }),
    );
    let out = cli.run(&["image", "pull", &s.url("/cut.raw")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let downloaded: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("downloaded"))
        .collect();
    assert_eq!(downloaded.len(), 1, "{err}");
    assert!(downloaded[0].contains(&sha256(&body)), "{err}");
    let retries = err
        .lines()
        .filter(|l| l.contains(": attempt ") && l.contains("retrying"))
        .count();
    assert_eq!(retries, 2, "each retry is said: {err}");
    // A pull that fails prints no "downloaded" at all.
    let out = cli.run(&["image", "pull", &s.url("/missing.raw")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && !err.contains("downloaded"),
        "{err}"
    );
}
