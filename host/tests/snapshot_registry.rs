//! Push to and pull from a real registry (Debian's docker-registry on
//! loopback): the artifact has the snapshot's artifact type, the empty
//! config and one titled layer per file (memory and disks compressed); a
//! pull onto another host's store and snapshots directory gives the same
//! files; a blob changed in the registry's storage is refused on pull and
//! nothing of the pull is kept.

mod snapshot_fixture;
mod store_common;

use cocoon_host::snapshot::registry::{self, RegistryError, ARTIFACT_TYPE, MEMORY_TYPE};
use cocoon_host::snapshot::store::{self, SnapshotDir};
use cocoon_host::store::{Layout, StoreError};
use snapshot_fixture::{make_snapshot, same_files, NAMES};
use store_common::registry::Registry;

#[test]
fn push_then_pull_and_a_tampered_blob_is_refused() {
    let Some(reg) = Registry::start() else { return };
    let src = tempfile::tempdir().unwrap();
    let snaps = src.path().join("snapshots");
    let dir = make_snapshot(&snaps, "s1");
    let reference = format!("oci://127.0.0.1:{}/snaps/web:v1", reg.port);
    let snap = SnapshotDir::open(&snaps, "s1").unwrap();
    let pushed = registry::push(&snap, &reference).unwrap();
    let titles: Vec<&str> = pushed.layers.iter().map(|l| l.0.as_str()).collect();
    assert_eq!(titles[0], "snapshot.json");
    assert_eq!(&titles[1..], NAMES);
    let memory = pushed.layers.iter().find(|l| l.0 == "memory").unwrap();
    assert_eq!(memory.1, MEMORY_TYPE);
    assert!(
        memory.3 < 1 << 20,
        "memory is compressed: {} bytes",
        memory.3
    );

    // The manifest as the registry serves it.
    let body = cocoon_host::http::block_on(async {
        cocoon_host::http::client()
            .get(format!("{}/v2/snaps/web/manifests/v1", reg.base()))
            .header("Accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
    });
    let m: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(m["artifactType"], ARTIFACT_TYPE);
    assert_eq!(
        m["config"]["mediaType"],
        "application/vnd.oci.empty.v1+json"
    );
    assert_eq!(m["config"]["size"], 2);
    assert_eq!(
        m["layers"][1]["annotations"]["org.opencontainers.image.title"],
        "state"
    );

    // Another host pulls it.
    let other = tempfile::tempdir().unwrap();
    let layout = Layout::create(other.path().join("images")).unwrap();
    let other_snaps = other.path().join("snapshots");
    let got = registry::pull(&reference, &layout, &other_snaps, None).unwrap();
    assert_eq!(got.name, "s1");
    same_files(&dir, &got.dir, &NAMES);
    assert_eq!(got.sidecar.files, snap.sidecar.files);
    // By the manifest's digest too, under another name.
    let pinned = format!(
        "oci://127.0.0.1:{}/snaps/web@{}",
        reg.port, pushed.manifest_digest
    );
    registry::pull(&pinned, &layout, &other_snaps, Some("s2")).unwrap();

    // Change one byte of the state's blob in the registry's storage.
    let state = pushed.layers.iter().find(|l| l.0 == "state").unwrap();
    let hex = state.2.hex();
    let blob = reg
        .storage()
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data");
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&blob, bytes).unwrap();
    let third = tempfile::tempdir().unwrap();
    let layout = Layout::create(third.path().join("images")).unwrap();
    let third_snaps = third.path().join("snapshots");
    let e = registry::pull(&reference, &layout, &third_snaps, None).unwrap_err();
    assert!(
        matches!(
            &e,
            RegistryError::Store {
                source: StoreError::DigestMismatch { .. },
                ..
            }
        ),
        "{}",
        cocoon_host::error_chain(&e)
    );
    assert!(store::list(&third_snaps).unwrap().is_empty());
    assert_eq!(
        std::fs::read_dir(&third_snaps).unwrap().count(),
        0,
        "no temp directory left"
    );
    assert!(
        layout.present(&state.2, None).is_none(),
        "the bad blob was not kept"
    );
}
