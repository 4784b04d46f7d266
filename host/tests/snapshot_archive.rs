//! Export and import of snapshots as tar streams: a snapshot directory
//! with sparse files (a 64 MiB memory file of mostly holes, disks with
//! holes and a dense tail) goes out plain and zstd-compressed and comes
//! back whole under another name; GNU tar reads the stream and restores
//! the same bytes; a stream with one changed byte, a missing file, an
//! extra entry or a link is refused with nothing imported.

mod support;

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cocoon_host::disk::copy::sha256_file;
use cocoon_host::disk::{DiskRole, FsType, StorageConfig};
use cocoon_host::snapshot::archive::{self, ArchiveError, Compression};
use cocoon_host::snapshot::sidecar::{
    ImageInfo, ResidentFile, Sidecar, SnapshotDisk, StateVersion, SIDECAR_VERSION,
};
use cocoon_host::snapshot::store::{self, SnapshotDir, TempSnapshot};
use cocoon_host::store::digest::Digest;

/// A committed snapshot `name` with real files and a sidecar that records
/// them.
fn make_snapshot(snaps: &Path, name: &str) -> PathBuf {
    let t = TempSnapshot::create(snaps, name).unwrap();
    let d = t.path();
    std::fs::create_dir(d.join("disks")).unwrap();
    std::fs::write(d.join("state"), support::Rng::new(1).bytes(5000)).unwrap();
    let mem = std::fs::File::create(d.join("memory")).unwrap();
    mem.set_len(64 << 20).unwrap();
    // Pages here and there, far more runs than one GNU header holds.
    for i in 0..40u64 {
        mem.write_all_at(&support::Rng::new(i).bytes(4096), i * (1 << 20) + 8192)
            .unwrap();
    }
    let cow = std::fs::File::create(d.join("disks/cow.raw")).unwrap();
    cow.set_len(32 << 20).unwrap();
    cow.write_all_at(b"cow data", 1 << 20).unwrap();
    // A data disk that ends in data, with an odd size.
    let data = std::fs::File::create(d.join("disks/data-logs.raw")).unwrap();
    data.set_len((16 << 20) + 1000).unwrap();
    data.write_all_at(&[0x5a; 512], 4 * 512).unwrap();
    data.write_all_at(&[7; 1000], 16 << 20).unwrap();
    let names = ["state", "memory", "disks/cow.raw", "disks/data-logs.raw"];
    let files = names
        .iter()
        .map(|n| {
            let (size, digest) = sha256_file(&d.join(n)).unwrap();
            (n.to_string(), size, digest)
        })
        .collect();
    let s = sidecar(name, files);
    s.write(d).unwrap();
    t.commit(name).unwrap()
}

fn sidecar(name: &str, files: Vec<(String, u64, Digest)>) -> Sidecar {
    let disk = |role: DiskRole, serial: &str, path: &str| SnapshotDisk {
        config: StorageConfig {
            path: path.into(),
            read_only: role.read_only(),
            serial: serial.into(),
            role,
            mount_point: None,
            fstype: (role == DiskRole::Data).then_some(FsType::None),
            direct_io: None,
        },
        layer: None,
    };
    Sidecar {
        version: SIDECAR_VERSION,
        name: name.into(),
        created: "2026-12-02T01:00:00Z".into(),
        source_vm: "v1".into(),
        image: ImageInfo {
            digest: Digest::of(b"image"),
            reference: None,
        },
        vmm_state_version: StateVersion(cocoon_vmm::snapshot::FORMAT_VERSION),
        cpus: 1,
        memory_bytes: 64 << 20,
        disks: vec![
            disk(DiskRole::Cow, "cocoon-root", "disks/cow.raw"),
            disk(DiskRole::Data, "logs", "disks/data-logs.raw"),
        ],
        files: files
            .into_iter()
            .map(|(name, size, sha256)| ResidentFile { name, size, sha256 })
            .collect(),
    }
}

fn export(snaps: &Path, name: &str, c: Compression) -> Vec<u8> {
    let snap = SnapshotDir::open(snaps, name).unwrap();
    let mut out = Vec::new();
    archive::export(&snap, &mut out, c).unwrap();
    out
}

fn same_files(a: &Path, b: &Path, names: &[&str]) {
    for n in names {
        assert_eq!(
            sha256_file(&a.join(n)).unwrap(),
            sha256_file(&b.join(n)).unwrap(),
            "{n}"
        );
    }
}

const NAMES: [&str; 4] = ["state", "memory", "disks/cow.raw", "disks/data-logs.raw"];

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn export_and_import_round_trip_plain_and_zstd_keeping_holes() {
    let root = tempfile::tempdir().unwrap();
    let snaps = root.path().join("snapshots");
    let src = make_snapshot(&snaps, "s1");
    for (c, name) in [(Compression::None, "plain"), (Compression::Zstd(3), "zst")] {
        let stream = export(&snaps, "s1", c);
        assert!(
            stream.len() < 4 << 20,
            "{name}: holes are not in the stream ({} bytes)",
            stream.len()
        );
        let imported = archive::import(&stream[..], &snaps, Some(name)).unwrap();
        assert_eq!(imported.name, name);
        assert_eq!(imported.sidecar.name, name);
        same_files(&src, &imported.dir, &NAMES);
        assert!(
            allocated(&imported.dir.join("memory")) < 2 << 20,
            "{name}: the imported memory file stays sparse"
        );
        let back = SnapshotDir::open(&snaps, name).unwrap();
        assert_eq!(back.sidecar.files, imported.sidecar.files);
    }
    // Without a name, the sidecar's; that one exists.
    let stream = export(&snaps, "s1", Compression::None);
    let e = archive::import(&stream[..], &snaps, None).unwrap_err();
    assert!(
        matches!(e, ArchiveError::Store(store::StoreError::Exists { .. })),
        "{e}"
    );
}

#[test]
fn gnu_tar_reads_the_stream() {
    let t = "gnu_tar_reads_the_stream";
    if Command::new("tar").arg("--version").output().is_err() {
        support::skip(t, "no tar");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let snaps = root.path().join("snapshots");
    let src = make_snapshot(&snaps, "s1");
    let stream = export(&snaps, "s1", Compression::None);
    let out = root.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let mut child = Command::new("tar")
        .args(["-xSf", "-", "-C"])
        .arg(&out)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&stream).unwrap();
    assert!(child.wait().unwrap().success());
    same_files(&src, &out, &NAMES);
    assert!(out.join("snapshot.json").is_file());
}

#[test]
fn a_bad_stream_imports_nothing() {
    let root = tempfile::tempdir().unwrap();
    let snaps = root.path().join("snapshots");
    make_snapshot(&snaps, "s1");
    let stream = export(&snaps, "s1", Compression::None);
    let sidecar_len = {
        let s = std::fs::metadata(snaps.join("s1/snapshot.json"))
            .unwrap()
            .len() as usize;
        512 + s.div_ceil(512) * 512
    };
    // The state file's data starts one header after the sidecar entry.
    let state_data = sidecar_len + 512;

    let flipped = {
        let mut s = stream.clone();
        s[state_data + 100] ^= 1;
        s
    };
    let e = archive::import(&flipped[..], &snaps, Some("x")).unwrap_err();
    assert!(
        matches!(&e, ArchiveError::Hash { path, .. } if path == "state"),
        "{e}"
    );

    // Cut after the state entry: memory and disks missing.
    let state_entry_end = state_data + 5000usize.div_ceil(512) * 512;
    let mut cut = stream[..state_entry_end].to_vec();
    cut.extend_from_slice(&[0u8; 1024]);
    let e = archive::import(&cut[..], &snaps, Some("x")).unwrap_err();
    assert!(
        matches!(&e, ArchiveError::Missing { path } if path == "memory"),
        "{e}"
    );

    // Truncated mid-file.
    let e = archive::import(&stream[..state_data + 1000], &snaps, Some("x")).unwrap_err();
    assert!(
        matches!(&e, ArchiveError::Read(_) | ArchiveError::Size { .. }),
        "{e}"
    );

    // Not starting with the sidecar.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(4);
    h.set_mode(0o600);
    h.set_cksum();
    b.append_data(&mut h, "state", &b"abcd"[..]).unwrap();
    let other = b.into_inner().unwrap();
    let e = archive::import(&other[..], &snaps, Some("x")).unwrap_err();
    assert!(
        matches!(&e, ArchiveError::NoSidecar { found } if found == "state"),
        "{e}"
    );

    // The real sidecar, then a symlink and an unlisted file.
    let sidecar = std::fs::read(snaps.join("s1/snapshot.json")).unwrap();
    let with = |f: &dyn Fn(&mut tar::Builder<Vec<u8>>)| {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(sidecar.len() as u64);
        h.set_mode(0o600);
        h.set_cksum();
        b.append_data(&mut h, "snapshot.json", &sidecar[..])
            .unwrap();
        f(&mut b);
        b.into_inner().unwrap()
    };
    let link = with(&|b| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_cksum();
        b.append_link(&mut h, "memory", "/etc/passwd").unwrap();
    });
    let e = archive::import(&link[..], &snaps, Some("x")).unwrap_err();
    assert!(
        matches!(&e, ArchiveError::NotAFile { path, .. } if path == "memory"),
        "{e}"
    );
    let extra = with(&|b| {
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o600);
        h.set_cksum();
        b.append_data(&mut h, "disks/../../evil", &b"x"[..])
            .unwrap_or(());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o600);
        h.set_cksum();
        b.append_data(&mut h, "extra", &b"x"[..]).unwrap();
    });
    let e = archive::import(&extra[..], &snaps, Some("x")).unwrap_err();
    assert!(matches!(&e, ArchiveError::Unexpected { .. }), "{e}");

    // Nothing of any of it is left: only s1, no temp directories.
    let names: Vec<String> = std::fs::read_dir(&snaps)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["s1"]);
}
