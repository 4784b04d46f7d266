//! OCI sources: the builtin oci-source plugin against a real registry
//! (Debian's docker-registry, started here) and against a fake registry
//! that demands a bearer token.

mod store_common;

use cocoon_host::config::HostConfig;
use cocoon_host::plugin::{Registry as Plugins, Runtime};
use cocoon_host::store::{
    PluginSources, PullPolicy, PullReport, PullRequest, Quiet, Store, StoreError,
};
use store_common::registry::Registry;
use store_common::{bytes, sha256, Cli, Resource, Server};

struct Env {
    dir: tempfile::TempDir,
    store: Store,
    runtime: Runtime,
    plugins: Plugins,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let config = HostConfig::at(dir.path());
    Env {
        store: Store::open(&config).unwrap(),
        runtime: Runtime::new(Some(dir.path().join("plugin-cache"))).unwrap(),
        plugins: Plugins::discover(&config),
        dir,
    }
}

impl Env {
    fn pull(&self, reference: &str, policy: PullPolicy) -> Result<PullReport, StoreError> {
        let sources = PluginSources {
            runtime: &self.runtime,
            registry: &self.plugins,
        };
        let req = PullRequest {
            reference: reference.into(),
            digest: None,
            policy,
            force: false,
        };
        self.store.pull(&sources, &req, &Quiet)
    }
}

#[test]
fn pulls_from_a_real_registry_by_tag_digest_and_index() {
    let Some(reg) = Registry::start() else { return };
    let e = env();
    let layer = bytes(1, 300_000);
    let (m, config, l) = reg.push_image("test/disk", "v1", "amd64", &layer);

    // By tag, through the real binary.
    let cli = Cli::new(e.dir.path());
    let tag_ref = format!("oci://127.0.0.1:{}/test/disk:v1", reg.port);
    let v = cli.json(&["image", "pull", &tag_ref]);
    assert_eq!(v["digest"], m.digest.as_str());
    assert_eq!(v["record"]["source"], "oci-source");
    let arts = v["record"]["artifacts"].as_array().unwrap();
    let digests: Vec<&str> = arts.iter().map(|a| a["digest"].as_str().unwrap()).collect();
    assert_eq!(
        digests,
        [m.digest.as_str(), config.digest.as_str(), l.digest.as_str()]
    );
    assert_eq!(
        arts[2]["media_type"],
        "application/vnd.oci.image.layer.v1.tar"
    );
    // Tokens or other headers are never stored.
    let text = std::fs::read_to_string(
        e.dir
            .path()
            .join("images/refs")
            .read_dir()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path(),
    )
    .unwrap();
    assert!(!text.to_ascii_lowercase().contains("authorization"));

    // By digest.
    let digest_ref = format!("oci://127.0.0.1:{}/test/disk@{}", reg.port, m.digest);
    let r = e.pull(&digest_ref, PullPolicy::Missing).unwrap();
    assert_eq!(r.digest.to_string(), m.digest);
    assert_eq!(std::fs::read(r.blobs[2].path()).unwrap(), layer);

    // A moved tag: missing keeps the old image, always picks up the new.
    let layer2 = bytes(2, 200_000);
    let (m2, _, _) = reg.push_image("test/disk", "v1", "amd64", &layer2);
    let r = e.pull(&tag_ref, PullPolicy::Missing).unwrap();
    assert_eq!((r.digest.to_string(), r.network), (m.digest.clone(), false));
    let r = e.pull(&tag_ref, PullPolicy::Always).unwrap();
    assert_eq!(r.digest.to_string(), m2.digest);
    assert_eq!(std::fs::read(r.blobs[2].path()).unwrap(), layer2);

    // A multi-platform index: linux/amd64 is selected.
    let arm = bytes(3, 1000);
    let amd = bytes(4, 2000);
    let (marm, _, _) = reg.push_image("test/multi", "arm64-only", "arm64", &arm);
    let (mamd, _, lamd) = reg.push_image("test/multi", "amd64-only", "amd64", &amd);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": marm.media_type, "digest": marm.digest, "size": marm.size, "platform": {"os": "linux", "architecture": "arm64"}},
            {"mediaType": mamd.media_type, "digest": mamd.digest, "size": mamd.size, "platform": {"os": "linux", "architecture": "amd64"}},
        ],
    });
    let idx = reg.push_manifest(
        "test/multi",
        "latest",
        "application/vnd.oci.image.index.v1+json",
        &serde_json::to_vec(&index).unwrap(),
    );
    let r = e
        .pull(
            &format!("oci://127.0.0.1:{}/test/multi", reg.port),
            PullPolicy::Missing,
        )
        .unwrap();
    let digests: Vec<String> = r
        .record
        .artifacts
        .iter()
        .map(|a| a.digest.to_string())
        .collect();
    assert_eq!(
        digests[0], idx.digest,
        "the index the reference names comes first"
    );
    assert_eq!(digests[1], mamd.digest, "then the linux/amd64 manifest");
    assert_eq!(digests.last().unwrap(), &lamd.digest);
    assert_eq!(std::fs::read(r.blobs.last().unwrap().path()).unwrap(), amd);

    // Pinned and complete: no network even when the registry is gone.
    drop(reg);
    let r = e.pull(&digest_ref, PullPolicy::Always).unwrap();
    assert!(!r.network);
    // Unpinned with always and the registry gone: reused with a warning.
    let r = e.pull(&tag_ref, PullPolicy::Always).unwrap();
    assert_eq!(r.digest.to_string(), m2.digest);
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
}

#[test]
fn a_wrong_pinned_manifest_digest_is_refused() {
    let Some(reg) = Registry::start() else { return };
    let e = env();
    reg.push_image("test/pin", "v1", "amd64", &bytes(5, 100));
    let wrong = sha256(b"something else");
    let err = e
        .pull(
            &format!("oci://127.0.0.1:{}/test/pin@{wrong}", reg.port),
            PullPolicy::Missing,
        )
        .unwrap_err();
    assert!(err.to_string().contains("resolving"), "{err}");
    assert_eq!(
        std::fs::read_dir(e.dir.path().join("images/blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
}

/// A fake registry that wants a bearer token from its realm, built on the
/// test HTTP server.
fn token_registry(s: &Server, realm: &str) -> (String, Vec<u8>) {
    let layer = bytes(6, 50_000);
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": sha256(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": sha256(&layer), "size": layer.len()}],
    }))
    .unwrap();
    let challenge =
        format!(r#"Bearer realm="{realm}",service="fake",scope="repository:team/app:pull""#);
    let need = |r: Resource| Resource {
        require: Some((
            "authorization".into(),
            "Bearer s3cret".into(),
            challenge.clone(),
        )),
        ..r
    };
    s.set(
        "/v2/team/app/manifests/1.0",
        need(Resource::new(manifest.clone()).header(
            "Content-Type",
            "application/vnd.docker.distribution.manifest.v2+json",
        )),
    );
    s.set(
        &format!("/v2/team/app/manifests/{}", sha256(&manifest)),
        need(Resource::new(manifest.clone())),
    );
    s.set(
        &format!("/v2/team/app/blobs/{}", sha256(&config)),
        need(Resource::new(config)),
    );
    s.set(
        &format!("/v2/team/app/blobs/{}", sha256(&layer)),
        need(Resource::new(layer.clone())),
    );
    (sha256(&manifest), layer)
}

#[test]
fn bearer_token_auth_through_the_mediated_fetch() {
    let e = env();
    let s = Server::start();
    let (manifest, layer) = token_registry(&s, &s.url("/token"));
    s.set(
        "/token?service=fake&scope=repository%3Ateam%2Fapp%3Apull",
        Resource::new(br#"{"token":"s3cret"}"#.to_vec()),
    );
    let r = e
        .pull(
            &format!("oci://127.0.0.1:{}/team/app:1.0", s.port),
            PullPolicy::Missing,
        )
        .unwrap();
    assert_eq!(r.digest.to_string(), manifest);
    assert_eq!(
        std::fs::read(r.blobs.last().unwrap().path()).unwrap(),
        layer
    );
    // The host's blob downloads carried the token the plugin obtained.
    let blob = s.seen(&format!("/v2/team/app/blobs/{}", sha256(&layer)));
    assert_eq!(
        blob.last().unwrap().header("authorization"),
        Some("Bearer s3cret")
    );
}

#[test]
fn the_plugin_reaches_only_the_registry_the_reference_names() {
    let e = env();
    let s = Server::start();
    let elsewhere = Server::start();
    elsewhere.set(
        "/token?service=fake&scope=repository%3Ateam%2Fapp%3Apull",
        Resource::new(br#"{"token":"s3cret"}"#.to_vec()),
    );
    token_registry(&s, &elsewhere.url("/token"));
    let err = e
        .pull(
            &format!("oci://127.0.0.1:{}/team/app:1.0", s.port),
            PullPolicy::Missing,
        )
        .unwrap_err();
    let msg = cocoon_host::error_chain(&err);
    assert!(msg.contains("denied"), "{msg}");
    assert_eq!(
        elsewhere.hits("/token?service=fake&scope=repository%3Ateam%2Fapp%3Apull"),
        0
    );
}

#[test]
fn a_docker_manifest_list_selects_linux_amd64() {
    let e = env();
    let s = Server::start();
    const LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    const MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    let mut entries = Vec::new();
    let mut layers = Vec::new();
    for (i, (arch, variant)) in [("arm", Some("v7")), ("amd64", None), ("arm64", Some("v8"))]
        .into_iter()
        .enumerate()
    {
        let layer = bytes(10 + i as u64, 1000 + i);
        let config = format!(r#"{{"architecture":"{arch}","os":"linux"}}"#).into_bytes();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": MANIFEST,
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": sha256(&config), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": sha256(&layer), "size": layer.len()}],
        }))
        .unwrap();
        s.set(
            &format!("/v2/lib/os/manifests/{}", sha256(&manifest)),
            Resource::new(manifest.clone()),
        );
        s.set(
            &format!("/v2/lib/os/blobs/{}", sha256(&config)),
            Resource::new(config),
        );
        s.set(
            &format!("/v2/lib/os/blobs/{}", sha256(&layer)),
            Resource::new(layer.clone()),
        );
        let mut platform = serde_json::json!({"os": "linux", "architecture": arch});
        if let Some(v) = variant {
            platform["variant"] = v.into();
        }
        entries.push(serde_json::json!({"mediaType": MANIFEST, "digest": sha256(&manifest), "size": manifest.len(), "platform": platform}));
        layers.push((sha256(&manifest), layer));
    }
    let list = serde_json::to_vec(
        &serde_json::json!({"schemaVersion": 2, "mediaType": LIST, "manifests": entries}),
    )
    .unwrap();
    for at in ["12".to_string(), sha256(&list)] {
        s.set(
            &format!("/v2/lib/os/manifests/{at}"),
            Resource::new(list.clone()).header("Content-Type", LIST),
        );
    }
    let r = e
        .pull(
            &format!("oci://127.0.0.1:{}/lib/os:12", s.port),
            PullPolicy::Missing,
        )
        .unwrap();
    assert_eq!(r.digest.to_string(), sha256(&list));
    assert_eq!(r.record.artifacts[1].digest.to_string(), layers[1].0);
    assert_eq!(r.record.artifacts[1].media_type, MANIFEST);
    assert_eq!(
        std::fs::read(r.blobs.last().unwrap().path()).unwrap(),
        layers[1].1
    );
}

#[test]
fn a_disk_layer_is_what_gets_converted() {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(dir.path());
    let s = Server::start();
    let disk = bytes(20, 1 << 20);
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.cocoon.disk.raw", "digest": sha256(&disk), "size": disk.len()}],
    }))
    .unwrap();
    for at in ["1".to_string(), sha256(&manifest)] {
        s.set(
            &format!("/v2/vm/disk/manifests/{at}"),
            Resource::new(manifest.clone()),
        );
    }
    s.set(
        &format!("/v2/vm/disk/blobs/{}", sha256(&config)),
        Resource::new(config),
    );
    s.set(
        &format!("/v2/vm/disk/blobs/{}", sha256(&disk)),
        Resource::new(disk.clone()),
    );
    let reference = format!("oci://127.0.0.1:{}/vm/disk:1", s.port);
    let v = cli.json(&["image", "pull", "--convert", "raw", &reference]);
    assert_eq!(v["digest"], sha256(&manifest));
    assert_eq!(v["record"]["artifacts"][2]["format_hint"], "raw");
    assert_eq!(
        v["converted"]["source"],
        sha256(&disk),
        "the disk layer, not the manifest"
    );
    assert_eq!(v["converted"]["digest"], sha256(&disk));
}
