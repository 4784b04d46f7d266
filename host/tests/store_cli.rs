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
