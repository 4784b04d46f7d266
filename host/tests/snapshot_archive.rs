//! Export and import of snapshots as tar streams: a snapshot directory
//! with sparse files (a 64 MiB memory file of mostly holes, disks with
//! holes and a dense tail) goes out plain and zstd-compressed and comes
//! back whole under another name; GNU tar reads the stream and restores
//! the same bytes; a stream with one changed byte, a missing file, an
//! extra entry or a link is refused with nothing imported.

mod snapshot_fixture;
mod support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use cocoon_host::snapshot::archive::{self, ArchiveError, Compression};
use cocoon_host::snapshot::store::{self, SnapshotDir};
use snapshot_fixture::{allocated, make_snapshot, same_files, NAMES};

fn export(snaps: &Path, name: &str, c: Compression) -> Vec<u8> {
    let snap = SnapshotDir::open(snaps, name).unwrap();
    let mut out = Vec::new();
    archive::export(&snap, &mut out, c).unwrap();
    out
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
            .len();
        let s = usize::try_from(s).unwrap();
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
