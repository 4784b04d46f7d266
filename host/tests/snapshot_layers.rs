//! A snapshot of a layered VM whose layers the image store lost: `clone`
//! (and `restore`) build them again from the image, through the same path
//! `run` uses, and require the digests the sidecar pins. A two-layer image
//! is pushed to Debian's docker-registry on loopback and run with the test
//! guest as the kernel (it does not mount the layers, it sees disks and
//! counts in its memory, so a clone that goes on counting runs from the
//! snapshot). Cases: the layer squashfs files gone (rebuilt by a
//! mksquashfs of another version line that makes the same bytes: filed at
//! the snapshot's path too); the whole image gone (pulled by digest, then
//! rebuilt); a layer file overwritten in place with other bytes of its
//! size (hashed, removed and rebuilt: the tampered bytes never reach a
//! VM); a mksquashfs that makes other bytes, and a sidecar whose layer
//! digest was edited: both refused before anything changes.

mod store_common;
mod vm_common;
#[path = "../../vmm/tests/support/mod.rs"]
mod vmm_support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use store_common::registry::{Desc, Registry};
use vm_common::Host;
use vmm_support::{kvm_or_skip, test_guest};

/// Counts every 50 ms for ever (no disk write: disk 1 is a read-only
/// layer here).
const GUEST: &str = "console=ttyS0 cocoon.count=50:0";

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn counts(h: &Host, vm: &str) -> Vec<u64> {
    h.ok(&["logs", vm])
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix("cocoon-guest: count n="))
        .filter_map(|r| r.split(' ').next()?.parse().ok())
        .collect()
}

fn wait_counts(h: &Host, vm: &str, n: u64) {
    eventually(&format!("{vm} counting to {n}"), || {
        counts(h, vm).last().is_some_and(|&c| c >= n)
    });
}

fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Pushes a two-layer image (a plain tar, then a gzipped one with a
/// whiteout); its `oci://` reference.
fn push_image(reg: &Registry) -> String {
    let repo = "test/layered";
    let base = tar_of(&[
        ("etc/base", b"from-base\n"),
        ("etc/gone", b"deleted by the top layer\n"),
        ("srv/data.bin", &[7u8; 300_000]),
    ]);
    let top = tar_of(&[("etc/.wh.gone", b""), ("etc/top", b"from-top\n")]);
    let l0 = reg.push_blob(repo, "application/vnd.oci.image.layer.v1.tar", &base);
    let l1 = reg.push_blob(
        repo,
        "application/vnd.oci.image.layer.v1.tar+gzip",
        &gzip(&top),
    );
    let layers: [(&Desc, String); 2] = [
        (&l0, store_common::sha256(&base)),
        (&l1, store_common::sha256(&top)),
    ];
    reg.push_config_and_manifest(
        repo,
        "v1",
        serde_json::json!({"architecture": "amd64", "os": "linux",
            "config": {"Cmd": ["/bin/true"]}}),
        &layers,
    );
    format!("oci://127.0.0.1:{}/{repo}:v1", reg.port)
}

/// A layer disk of the sidecar: (disk index, path under the store's
/// root, pinned digest).
type LayerDisk = (usize, PathBuf, String);

fn layer_disks(h: &Host, snap: &str) -> Vec<LayerDisk> {
    let inspect = h.json(&["snapshot", "inspect", snap, "-o", "json"]);
    inspect["sidecar"]["disks"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .filter(|(_, d)| d["config"]["role"] == "layer")
        .map(|(i, d)| {
            (
                i,
                h.state_dir()
                    .join("images")
                    .join(d["config"]["path"].as_str().unwrap()),
                d["layer"]["digest"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn sha256_file(p: &Path) -> String {
    store_common::sha256(&std::fs::read(p).unwrap())
}

/// Removes the layers' conversion directories (`converted/<tar>/`), as
/// gc or a host that never built them would have it.
fn remove_layers(layers: &[LayerDisk]) {
    for (_, path, _) in layers {
        // converted/<tar>/squashfs/<builder>/image
        let by_tar = path.ancestors().nth(3).unwrap();
        let _ = std::fs::remove_dir_all(by_tar);
        assert!(!path.exists());
    }
}

/// A directory with a `mksquashfs` that prints `version` and runs the
/// real one with `extra` arguments added.
fn fake_mksquashfs(dir: &Path, version: &str, extra: &str) -> PathBuf {
    let real = String::from_utf8(
        std::process::Command::new("sh")
            .args(["-c", "command -v mksquashfs"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let bin = dir.join(format!("bin-{}", extra.len()));
    std::fs::create_dir_all(&bin).unwrap();
    let tool = bin.join("mksquashfs");
    std::fs::write(
        &tool,
        format!(
            "#!/bin/sh\nif [ \"$1\" = -version ]; then echo 'mksquashfs version {version}'; exit 0; fi\nexec {} \"$@\" {extra}\n",
            real.trim()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

fn with_path(h: &Host, bin: &Path) -> std::process::Command {
    let mut c = h.cmd();
    let path = std::env::var("PATH").unwrap_or_default();
    c.env("PATH", format!("{}:{path}", bin.display()));
    c
}

/// Overwrites the layer file at `path` in place with other bytes of the
/// same size (its inode and size kept); their sha256.
fn tamper_in_place(path: &Path) -> String {
    use std::os::unix::fs::FileExt;
    let mode = std::fs::metadata(path).unwrap().permissions();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let len = std::fs::metadata(path).unwrap().len();
    let mut head = std::fs::read(path).unwrap();
    head.truncate(4096);
    for b in &mut head {
        *b ^= 0x5a;
    }
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&head, 0).unwrap();
    drop(f);
    std::fs::set_permissions(path, mode).unwrap();
    assert_eq!(std::fs::metadata(path).unwrap().len(), len);
    sha256_file(path)
}

fn stderr_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_clone_rebuilds_the_snapshots_missing_layers_to_their_pinned_digests_or_changes_nothing() {
    if !kvm_or_skip(
        "a_clone_rebuilds_the_snapshots_missing_layers_to_their_pinned_digests_or_changes_nothing",
    ) {
        return;
    }
    if !store_common::require_tool("mksquashfs") {
        return;
    }
    let Some(reg) = Registry::start() else { return };
    let reference = push_image(&reg);
    let h = Host::new();
    let out = h.ok(&[
        "run",
        "-d",
        "--name",
        "src",
        "--memory",
        "64M",
        "--cow-size",
        "16M",
        "--kernel",
        test_guest().to_str().unwrap(),
        "--cmdline",
        GUEST,
        &reference,
    ]);
    assert_eq!(out.trim(), "src");
    wait_counts(&h, "src", 3);
    h.ok(&["snapshot", "save", "src", "--name", "s1"]);
    let layers = layer_disks(&h, "s1");
    assert_eq!(
        layers.iter().map(|l| l.0).collect::<Vec<_>>(),
        [0, 1],
        "{layers:?}"
    );
    for (_, path, digest) in &layers {
        assert_eq!(&sha256_file(path), digest, "{}", path.display());
    }
    let inspect = h.json(&["snapshot", "inspect", "s1", "--check", "-o", "json"]);
    assert_eq!(inspect["preflight"]["ok"], true, "{inspect}");

    // 1. The layer files gone. The preflight alone reports it; a clone
    // builds them again, here by a mksquashfs with another version line
    // (another cache key) that makes the same bytes, and with
    // SOURCE_DATE_EPOCH set, which the build must ignore.
    remove_layers(&layers);
    let o = h.run(&["snapshot", "inspect", "s1", "--check", "-o", "json"]);
    assert_eq!(o.status.code(), Some(1), "a failed preflight exits 1");
    let inspect: Value = serde_json::from_slice(&o.stdout).unwrap();
    let e = inspect["preflight"]["error"].as_str().unwrap_or_default();
    assert!(e.contains("is not in the image store"), "{inspect}");
    assert!(e.contains(&layers[0].2), "{inspect}");
    let same_bytes = fake_mksquashfs(h.state.path(), "4.5.1-other (a rebuild)", "");
    let o = with_path(&h, &same_bytes)
        .env("SOURCE_DATE_EPOCH", "1")
        .args(["clone", "s1", "--name", "c1", "-d", "-o", "json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    let c: Value = serde_json::from_slice(&o.stdout).unwrap();
    let rebuilt = c["rebuilt_layers"].as_array().unwrap();
    assert_eq!(rebuilt.len(), 2, "{c}");
    for ((index, path, digest), r) in layers.iter().zip(rebuilt) {
        assert_eq!(r["index"], *index, "{c}");
        assert_eq!(r["digest"], digest.as_str(), "{c}");
        assert_eq!(r["built"], true, "{c}");
        assert_eq!(&sha256_file(path), digest, "filed at the snapshot's path");
    }
    assert!(c.get("pulled_image").is_none(), "the image was there: {c}");
    assert_eq!(c["state"], "running", "{c}");
    wait_counts(&h, "c1", 3);
    let inspect = h.json(&["snapshot", "inspect", "s1", "--check", "-o", "json"]);
    assert_eq!(inspect["preflight"]["ok"], true, "{inspect}");

    // 2. The whole image gone (blobs, records, conversions), as on a host
    // the snapshot was imported to: pulled by digest, then rebuilt, each
    // step said.
    for sub in ["blobs/sha256", "refs", "converted"] {
        let dir = h.state_dir().join("images").join(sub);
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                std::fs::remove_dir_all(&p).unwrap();
            } else {
                std::fs::remove_file(&p).unwrap();
            }
        }
    }
    let o = h.run(&["clone", "s1", "--name", "c2", "-d"]);
    let err = stderr_of(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("pulled it by digest from"), "{err}");
    for (index, path, digest) in &layers {
        assert!(
            err.contains(&format!("rebuilt layer {digest} (disk {index})")),
            "{err}"
        );
        assert_eq!(&sha256_file(path), digest);
    }
    assert_eq!(h.state_of("c2"), "running");
    wait_counts(&h, "c2", 3);
    // Present now: nothing to say.
    let o = h.run(&["clone", "s1", "--name", "c3", "-d"]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(
        !stderr_of(&o).contains("rebuilt layer"),
        "{}",
        stderr_of(&o)
    );

    // 2b. A layer file overwritten in place with other bytes of its size:
    // the size check passes, the hash does not. The preflight alone
    // refuses it, naming the disk, the path and both digests; a clone
    // hashes it, removes it from the store as `run` removes a corrupt
    // cached layer, builds it again and runs on the pinned bytes.
    let tampered = tamper_in_place(&layers[0].1);
    assert_ne!(tampered, layers[0].2);
    let o = h.run(&["snapshot", "inspect", "s1", "--check", "-o", "json"]);
    assert_eq!(o.status.code(), Some(1), "a failed preflight exits 1");
    let inspect: Value = serde_json::from_slice(&o.stdout).unwrap();
    let e = inspect["preflight"]["error"].as_str().unwrap_or_default();
    assert!(e.contains("layer disk 0 at "), "{inspect}");
    assert!(e.contains(&layers[0].1.display().to_string()), "{inspect}");
    assert!(
        e.contains(&format!(
            "its sha256 is {tampered}, the sidecar records {}",
            layers[0].2
        )),
        "{inspect}"
    );
    assert!(e.contains("nothing was changed"), "{inspect}");
    let o = h.run(&["clone", "s1", "--name", "c3b", "-d", "-o", "json"]);
    let err = stderr_of(&o);
    assert!(o.status.success(), "{err}");
    let c: Value = serde_json::from_slice(&o.stdout).unwrap();
    let rebuilt = c["rebuilt_layers"].as_array().unwrap();
    assert_eq!(rebuilt.len(), 1, "only the tampered layer: {c}");
    assert_eq!(rebuilt[0]["index"], 0, "{c}");
    assert_eq!(rebuilt[0]["digest"], layers[0].2.as_str(), "{c}");
    assert_eq!(rebuilt[0]["corrupt"], tampered.as_str(), "{c}");
    assert_eq!(rebuilt[0]["built"], true, "{c}");
    assert!(
        err.contains(&format!(
            "rebuilt layer {} (disk 0) of snapshot s1 from {}: it was rebuilt because its bytes \
             in the store did not match (sha256 {tampered})",
            layers[0].2,
            rebuilt[0]["source"].as_str().unwrap()
        )),
        "{err}"
    );
    // The clone's disk 0 is the store's file, which has the pinned bytes
    // again: the tampered ones were never given to its VM.
    assert_eq!(sha256_file(&layers[0].1), layers[0].2);
    let disk0 = h.json(&["inspect", "c3b", "-o", "json"])["record"]["storage"][0]["path"]
        .as_str()
        .map(PathBuf::from)
        .unwrap();
    assert_eq!(
        std::fs::canonicalize(&disk0).unwrap(),
        std::fs::canonicalize(&layers[0].1).unwrap()
    );
    assert_eq!(c["state"], "running", "{c}");
    wait_counts(&h, "c3b", 3);

    // 3. A mksquashfs that makes other bytes, for a tampered layer 0 and
    // a missing layer 1: refused, naming the layer and both digests;
    // nothing made, and nothing of another digest left where the
    // snapshot's layers go (the tampered file removed too).
    remove_layers(&layers[1..]);
    tamper_in_place(&layers[0].1);
    let other_bytes = fake_mksquashfs(h.state.path(), "4.5.1-smallblocks", "-b 4096");
    let before = h.vm_dirs();
    let o = with_path(&h, &other_bytes)
        .args(["clone", "s1", "--name", "c4", "-d"])
        .output()
        .unwrap();
    let err = stderr_of(&o);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("disk 0"), "{err}");
    assert!(
        err.contains(&format!("sidecar pins {}", layers[0].2)),
        "{err}"
    );
    assert!(err.contains("was rebuilt as sha256:"), "{err}");
    assert!(err.contains("4.5.1-smallblocks"), "{err}");
    assert!(err.contains("nothing was changed"), "{err}");
    assert_eq!(h.state_of("c4"), "absent");
    assert_eq!(h.vm_dirs(), before);
    for (_, path, _) in &layers {
        assert!(!path.exists(), "{}", path.display());
    }
    // The other builder's squashfs was removed again, too.
    let conv_images: Vec<PathBuf> = walk(&h.state_dir().join("images/converted"))
        .into_iter()
        .filter(|p| p.ends_with("image"))
        .collect();
    assert!(conv_images.is_empty(), "{conv_images:?}");

    // 4. A sidecar whose layer digest was edited: the honest rebuild does
    // not match it; a clone and a restore refuse, the restore before it
    // touches the running VM.
    let sidecar_path = h.state_dir().join("snapshots/s1/snapshot.json");
    let text = std::fs::read_to_string(&sidecar_path).unwrap();
    let forged = format!("sha256:{}", "ab".repeat(32));
    assert_eq!(text.matches(&layers[1].2).count(), 1, "{text}");
    std::fs::write(&sidecar_path, text.replace(&layers[1].2, &forged)).unwrap();
    let e = h.fails(&["clone", "s1", "--name", "c5", "-d"]);
    assert!(e.contains("disk 1"), "{e}");
    assert!(e.contains(&format!("sidecar pins {forged}")), "{e}");
    assert!(
        e.contains(&format!("was rebuilt as {}", layers[1].2)),
        "{e}"
    );
    assert!(e.contains("nothing was changed"), "{e}");
    assert_eq!(h.state_of("c5"), "absent");
    assert_eq!(h.vm_dirs(), before);
    assert!(!layers[1].1.exists(), "no layer of another digest left");
    let pid = h.vm("src")["pid"].as_u64().unwrap();
    let e = h.fails(&["restore", "src", "s1"]);
    assert!(e.contains(&format!("sidecar pins {forged}")), "{e}");
    assert_eq!(h.vm("src")["pid"].as_u64().unwrap(), pid);
    assert_eq!(h.state_of("src"), "running");

    // The sidecar put back: a restore rebuilds and goes on counting.
    std::fs::write(&sidecar_path, &text).unwrap();
    let seen = counts(&h, "src").len();
    let o = h.run(&["restore", "src", "s1"]);
    let err = stderr_of(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains(&format!("rebuilt layer {} (disk 1)", layers[1].2)),
        "{err}"
    );
    assert_eq!(h.state_of("src"), "running");
    eventually("the restored src counting", || {
        counts(&h, "src").len() > seen + 2
    });

    // Layer 0 tampered in place under the running VM: a restore hashes
    // it, rebuilds it and only then replaces the running VM.
    let tampered = tamper_in_place(&layers[0].1);
    let seen = counts(&h, "src").len();
    let o = h.run(&["restore", "src", "s1"]);
    let err = stderr_of(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains(&format!("rebuilt layer {} (disk 0)", layers[0].2))
            && err.contains(&format!("did not match (sha256 {tampered})")),
        "{err}"
    );
    assert!(!err.contains("(disk 1)"), "layer 1 was whole: {err}");
    for (_, path, digest) in &layers {
        assert_eq!(&sha256_file(path), digest);
    }
    assert_eq!(h.state_of("src"), "running");
    eventually("the restored src counting", || {
        counts(&h, "src").len() > seen + 2
    });
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
