//! `cocoon-host boot` locks its writable disks: a disk given twice or held
//! by another VM is refused before any VM starts (so no KVM is needed to
//! see the refusal).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cocoon_host::disk::lock::{DiskLocks, Wait};

fn boot(dir: &Path, disks: &[String]) -> Output {
    // Never loaded: the refusals come first.
    let kernel = dir.join("kernel");
    std::fs::write(&kernel, b"not a kernel").unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cocoon-host"));
    cmd.arg("boot").arg("--kernel").arg(&kernel);
    for d in disks {
        cmd.arg("--disk").arg(d);
    }
    cmd.output().unwrap()
}

fn disk(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, vec![0u8; 4096]).unwrap();
    p
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn the_same_file_twice_with_a_writer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = disk(dir.path(), "a.raw");
    std::os::unix::fs::symlink(&a, dir.path().join("alias.raw")).unwrap();
    let a_s = a.display().to_string();
    let alias = dir.path().join("alias.raw").display().to_string();
    for (disks, want) in [
        (vec![a_s.clone(), a_s.clone()], "same file"),
        (vec![a_s.clone(), format!("{alias},serial=x")], "same file"),
        (vec![format!("{a_s},ro"), a_s.clone()], "same file"),
        (vec![a_s.clone(), format!("{alias},ro")], "same file"),
    ] {
        let o = boot(dir.path(), &disks);
        assert_eq!(o.status.code(), Some(1), "{disks:?}");
        let e = stderr(&o);
        assert!(e.contains(want) && e.contains("writable"), "{disks:?}: {e}");
    }
    // Twice read-only is fine as far as locking goes: the run fails later,
    // starting the VM (the fake kernel), not on the disks.
    let o = boot(dir.path(), &[format!("{a_s},ro"), format!("{alias},ro")]);
    let e = stderr(&o);
    assert!(!e.contains("same file") && !e.contains("in use"), "{e}");
    assert!(e.contains("start the VM"), "{e}");
}

#[test]
fn a_disk_another_vm_holds_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = disk(dir.path(), "a.raw");
    let b = disk(dir.path(), "b.raw");
    let held = DiskLocks::acquire(std::slice::from_ref(&b), "start", Wait::No).unwrap();
    let o = boot(
        dir.path(),
        &[a.display().to_string(), b.display().to_string()],
    );
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("b.raw") && e.contains("in use"), "{e}");
    assert!(
        e.contains(&format!("start by pid {}", std::process::id())),
        "{e}"
    );
    // Read-only, the held disk is not locked.
    let o = boot(dir.path(), &[format!("{},ro", b.display())]);
    assert!(!stderr(&o).contains("in use"), "{}", stderr(&o));
    drop(held);
    // Released, the same command gets past the locks (and fails starting the VM on the
    // fake kernel), and leaves the disks unlocked again.
    let o = boot(
        dir.path(),
        &[a.display().to_string(), b.display().to_string()],
    );
    let e = stderr(&o);
    assert!(!e.contains("in use") && e.contains("start the VM"), "{e}");
    DiskLocks::acquire(&[a, b], "check", Wait::No).unwrap();
}
