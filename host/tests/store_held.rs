//! How a pull treats what the store already holds: a pull that only
//! confirms a record leaves it alone, and an `AtUse` pull (`run`,
//! `create`) trusts committed blobs, because every use re-hashes them.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use cocoon_host::store::{
    ConvertBackend, ConverterId, Digest, HeldBlobs, Quiet, Store, StoreError, VerifiedBlob,
};
use store_common::{local_pull, NoSources};

mod store_common;

/// A converter that must never run: the conversion's own source check
/// comes first.
struct NeverConverts;
impl ConvertBackend for NeverConverts {
    fn installed(&self) -> Vec<ConverterId> {
        vec![ConverterId {
            name: "never".into(),
            sha256: Digest::of(b"never").hex().to_string(),
        }]
    }
    fn convert(&self, _: &VerifiedBlob, _: &Path, _: &str) -> Result<ConverterId, StoreError> {
        panic!("a rotten source reached the converter")
    }
}

/// The one file of the store's `refs/` directory.
fn ref_file(root: &Path) -> fs::Metadata {
    let mut files: Vec<_> = fs::read_dir(root.join("refs"))
        .unwrap()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert_eq!(files.len(), 1, "one record");
    files.pop().unwrap().metadata().unwrap()
}

/// Flips the first byte of a blob, as disk rot or tampering would.
fn rot(blob: &Path) {
    fs::set_permissions(blob, fs::Permissions::from_mode(0o600)).unwrap();
    let mut bytes = fs::read(blob).unwrap();
    bytes[0] ^= 0xff;
    fs::write(blob, bytes).unwrap();
}

#[test]
fn a_pull_that_confirms_the_record_does_not_rewrite_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("images");
    let store = Store::at(root.clone()).unwrap();
    let file = dir.path().join("disk.raw");
    fs::write(&file, vec![7u8; 1 << 20]).unwrap();

    let first = store.pull(&NoSources, &local_pull(&file), &Quiet).unwrap();
    assert_eq!(first.downloaded, 1);
    let before = ref_file(&root);
    // A second pull finds the same file: the record (written by rename,
    // so a rewrite would be a new inode) stays, pulled_at with it.
    let again = store.pull(&NoSources, &local_pull(&file), &Quiet).unwrap();
    assert_eq!(again.downloaded, 0);
    assert_eq!(again.record, first.record);
    assert_eq!(
        ref_file(&root).ino(),
        before.ino(),
        "the record was rewritten"
    );

    // A changed file is a new record.
    fs::write(&file, vec![8u8; 1 << 20]).unwrap();
    let changed = store.pull(&NoSources, &local_pull(&file), &Quiet).unwrap();
    assert_eq!(changed.downloaded, 1);
    assert_ne!(changed.digest, first.digest);
    assert_ne!(
        ref_file(&root).ino(),
        before.ino(),
        "a new record was not written"
    );
}

#[test]
fn an_at_use_pull_trusts_held_blobs_and_their_use_still_catches_rot() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("images");
    let store = Store::at(root.clone()).unwrap();
    let file = dir.path().join("disk.raw");
    fs::write(&file, vec![7u8; 1 << 20]).unwrap();
    let digest = store
        .pull(&NoSources, &local_pull(&file), &Quiet)
        .unwrap()
        .digest;
    let blob = store.layout().blob_path(&digest);
    rot(&blob);

    // AtUse: nothing is read, the blob is handed out as committed.
    let trusted = store
        .pull_checking(&NoSources, &local_pull(&file), &Quiet, HeldBlobs::AtUse)
        .unwrap();
    assert_eq!(trusted.downloaded, 0);
    assert_eq!(trusted.blobs[0].path(), blob);

    // Its use re-hashes it: a conversion refuses the rotten source before
    // any converter sees it, and removes it.
    match store.converted(&digest, "raw", &NeverConverts) {
        Err(StoreError::SourceGone { digest: d }) => assert_eq!(d, digest),
        other => panic!("a rotten source was converted: {other:?}"),
    }
    assert!(!blob.exists(), "the rotten blob was kept");

    // The next pull, AtUse or not, fetches it again, whole.
    let healed = store
        .pull_checking(&NoSources, &local_pull(&file), &Quiet, HeldBlobs::AtUse)
        .unwrap();
    assert_eq!(healed.downloaded, 1);
    assert_eq!(Digest::of(&fs::read(&blob).unwrap()), digest);

    // A Rehash pull (`image pull`) finds rot itself.
    rot(&blob);
    let rehashed = store.pull(&NoSources, &local_pull(&file), &Quiet).unwrap();
    assert_eq!(rehashed.downloaded, 1);
    assert_eq!(Digest::of(&fs::read(&blob).unwrap()), digest);
}
