//! The first-run scripts, run as a new machine would meet them:
//! `scripts/install-deps` (one apt transaction that removes nothing, then
//! every needed command checked), `scripts/test --summary` (skips counted
//! apart from passes) and `scripts/fetch-linux-kernel --extract` (lz4's
//! status and the result checked). apt, apt-cache and dpkg-query are
//! stand-ins here: the tests never install anything.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::{skip, test_name};

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts")
        .join(name)
}

fn stub(dir: &Path, name: &str, body: &str) {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A PATH holding every command of this machine's PATH but `hidden`.
fn path_without(dir: &Path, hidden: &str) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for d in std::env::split_paths(&std::env::var_os("PATH").unwrap()) {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let name = e.file_name();
            if name == hidden || bin.join(&name).symlink_metadata().is_ok() {
                continue;
            }
            std::os::unix::fs::symlink(e.path(), bin.join(&name)).unwrap();
        }
    }
    bin
}

#[test]
fn install_deps_check_names_the_missing_command_and_its_package() {
    let dir = tempfile::tempdir().unwrap();
    let bin = path_without(dir.path(), "qemu-img");
    let o = Command::new("bash")
        .arg(script("install-deps"))
        .arg("--check")
        .env("PATH", &bin)
        .output()
        .unwrap();
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("missing command qemu-img (Debian package qemu-utils)"),
        "{}",
        text(&o)
    );
}

#[test]
fn install_deps_check_passes_where_everything_is_installed() {
    let o = Command::new("bash")
        .arg(script("install-deps"))
        .arg("--check")
        .output()
        .unwrap();
    if !o.status.success() {
        // CI runs install-deps first, so there it must pass.
        assert!(std::env::var_os("CI").is_none(), "{}", text(&o));
        skip(
            &test_name(),
            &format!("not everything is installed here: {}", text(&o)),
        );
    }
}

/// Stand-ins for apt-get (logs its arguments; refuses any transaction
/// that would need a removal unless the qemu packages are pinned), apt-cache
/// and dpkg-query (qemu-system-x86 not installed, the rest installed).
fn fake_apt(dir: &Path, refuse_always: bool) -> Vec<(&'static str, PathBuf)> {
    let log = dir.join("apt.log");
    let refuse = if refuse_always {
        "exit 100"
    } else {
        "case \"$*\" in *--allow-downgrades*) exit 0;; esac; exit 100"
    };
    stub(
        dir,
        "apt-get",
        &format!(
            "echo \"$*\" >> {log}\ncase \"$*\" in *update*) exit 0;; esac\necho 'E: Packages need to be removed but remove is disabled.' >&2\n{refuse}",
            log = log.display()
        ),
    );
    stub(
        dir,
        "apt-cache",
        "printf 'qemu-system-x86:\\n  Installed: (none)\\n  Candidate: 1:7.2+dfsg-7+deb12u18\\n'",
    );
    stub(
        dir,
        "dpkg-query",
        "case \"$*\" in *qemu-system-x86*) exit 1;; esac; printf 'install ok installed'",
    );
    vec![
        ("COCOON_APT_GET", dir.join("apt-get")),
        ("COCOON_APT_CACHE", dir.join("apt-cache")),
        ("COCOON_DPKG_QUERY", dir.join("dpkg-query")),
        ("COCOON_SKIP_RUST_TOOLS", PathBuf::from("1")),
    ]
}

#[test]
fn install_deps_asks_for_qemu_together_and_pins_it_when_apt_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new("bash")
        .arg(script("install-deps"))
        .envs(fake_apt(dir.path(), false))
        .output()
        .unwrap();
    let log = std::fs::read_to_string(dir.path().join("apt.log")).unwrap();
    let installs: Vec<&str> = log.lines().filter(|l| l.starts_with("install")).collect();
    assert_eq!(installs.len(), 2, "{log}\n{}", text(&o));
    // One transaction, removing nothing, with qemu-utils in it.
    assert!(
        installs[0].contains("--no-remove") && installs[0].ends_with("qemu-system-x86 qemu-utils"),
        "{}",
        installs[0]
    );
    // Refused: the same transaction with both pinned to one version.
    assert!(
        installs[1].contains("--no-remove --allow-downgrades")
            && installs[1].contains("qemu-system-x86=1:7.2+dfsg-7+deb12u18")
            && installs[1].contains("qemu-utils=1:7.2+dfsg-7+deb12u18"),
        "{}",
        installs[1]
    );
}

#[test]
fn install_deps_fails_clearly_when_apt_refuses_twice() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new("bash")
        .arg(script("install-deps"))
        .envs(fake_apt(dir.path(), true))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("nothing was removed"), "{}", text(&o));
}

#[test]
fn the_test_summary_counts_skips_apart_from_passes() {
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results");
    std::fs::write(
        &results,
        "test result: ok. 5 passed; 0 failed; 0 ignored; 0 measured\n\
         test result: FAILED. 3 passed; 1 failed; 0 ignored; 0 measured\n",
    )
    .unwrap();
    let skips = dir.path().join("skips");
    // What support::skip appends.
    std::fs::write(&skips, "SKIPPED a: no /dev/kvm\nSKIPPED b: no lz4\n").unwrap();
    let o = Command::new("bash")
        .arg(script("test"))
        .args(["--summary".as_ref(), results.as_os_str(), skips.as_os_str()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "summary: 6 passed, 1 failed, 2 skipped"
    );
}

/// A bzImage-shaped file: a setup header (HdrS) whose payload is `data`
/// compressed as an LZ4 legacy frame followed by `claimed` (the
/// uncompressed size the kernel build appends).
fn bzimage(dir: &Path, data: &[u8], claimed: u32) -> Vec<u8> {
    let raw = dir.join("payload");
    std::fs::write(&raw, data).unwrap();
    let lz = dir.join("payload.lz4");
    let o = Command::new("lz4")
        .args(["-l", "-q", "-f"])
        .arg(&raw)
        .arg(&lz)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let mut payload = std::fs::read(&lz).unwrap();
    payload.extend_from_slice(&claimed.to_le_bytes());
    let setup_sects = 3u8;
    let mut image = vec![0u8; (setup_sects as usize + 1) * 512];
    image[0x1f1] = setup_sects;
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x248..0x24c].copy_from_slice(&100u32.to_le_bytes());
    image[0x24c..0x250].copy_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
    image.resize(image.len() + 100, 0xcc);
    image.extend_from_slice(&payload);
    // What follows the payload in a real bzImage.
    image.extend_from_slice(&[0xee; 700]);
    image
}

#[test]
fn fetch_linux_kernel_checks_lz4_and_the_size() {
    if Command::new("lz4").arg("--version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "lz4 is required in CI");
        skip(
            &test_name(),
            "lz4 is not installed (scripts/install-deps installs it)",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut elf = b"\x7fELF".to_vec();
    elf.extend(support::Rng::new(3).bytes(300_000));
    let extract = |image: &[u8]| {
        let p = d.join("vmlinuz");
        std::fs::write(&p, image).unwrap();
        let out = d.join("vmlinux");
        let _ = std::fs::remove_file(&out);
        let o = Command::new("bash")
            .arg(script("fetch-linux-kernel"))
            .arg("--extract")
            .arg(&p)
            .arg(&out)
            .output()
            .unwrap();
        (o.status.success(), text(&o), std::fs::read(&out).ok())
    };
    let elf_len = u32::try_from(elf.len()).unwrap();
    let good = bzimage(d, &elf, elf_len);
    let (ok, log, out) = extract(&good);
    assert!(ok, "{log}");
    assert_eq!(out.unwrap(), elf);

    // Truncated inside the payload.
    let (ok, log, _) = extract(&good[..good.len() - 2000]);
    assert!(!ok && log.contains("truncated"), "{log}");

    // A corrupt LZ4 stream (its first block's length): lz4 fails, and
    // that is not ignored.
    let mut corrupt = good.clone();
    let block_len = 2048 + 100 + 4;
    corrupt[block_len..block_len + 4].copy_from_slice(&200_000u32.to_le_bytes());
    let (ok, log, _) = extract(&corrupt);
    assert!(!ok && log.contains("lz4 failed"), "{log}");

    // A whole stream of the wrong size.
    let short = bzimage(d, &elf, elf_len + 4096);
    let (ok, log, _) = extract(&short);
    assert!(!ok && log.contains("the bzImage says"), "{log}");
}
