//! A real OCI registry for tests: Debian's `docker-registry` on a free
//! loopback port with a temp storage dir and a config file written here,
//! and a small client that pushes blobs and manifests to it (the
//! distribution API's monolithic upload: POST, then PUT with the digest).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::sha256;

pub struct Registry {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

/// One request over the host's own client: (status, Location, body).
fn call(req: reqwest::RequestBuilder) -> Result<(u16, Option<String>, String), reqwest::Error> {
    cocoon_host::http::block_on(async {
        let r = req.send().await?;
        let status = r.status().as_u16();
        let location = r
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok((status, location, r.text().await.unwrap_or_default()))
    })
}

fn client() -> &'static reqwest::Client {
    cocoon_host::http::client()
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A descriptor as it goes into a manifest.
pub struct Desc {
    pub media_type: String,
    pub digest: String,
    pub size: usize,
}

impl Desc {
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
    }
}

impl Registry {
    /// Starts the registry, or None (test skipped) when it is not
    /// installed and `CI` is unset.
    pub fn start() -> Option<Registry> {
        if !super::require_tool("docker-registry") {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("config.yml");
        let storage = dir.path().join("storage");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                storage.display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting docker-registry");
        let reg = Registry {
            port,
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _, _)) = call(client().get(format!("http://127.0.0.1:{port}/v2/"))) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not come up on port {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(reg)
    }

    /// The registry's storage directory (for tests that tamper with a
    /// stored blob).
    pub fn storage(&self) -> std::path::PathBuf {
        self._dir.path().join("storage")
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn push_blob(&self, repo: &str, media_type: &str, data: &[u8]) -> Desc {
        let digest = sha256(data);
        let (status, location, _) =
            call(client().post(format!("{}/v2/{repo}/blobs/uploads/", self.base()))).unwrap();
        assert_eq!(status, 202, "starting an upload");
        let location = location.expect("an upload location");
        let location = if location.starts_with('/') {
            format!("{}{location}", self.base())
        } else {
            location
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let (status, _, _) = call(
            client()
                .put(format!("{location}{sep}digest={digest}"))
                .header("Content-Type", "application/octet-stream")
                .body(data.to_vec()),
        )
        .unwrap();
        assert_eq!(status, 201, "finishing the upload of {digest}");
        Desc {
            media_type: media_type.into(),
            digest,
            size: data.len(),
        }
    }

    pub fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> Desc {
        let (status, _, text) = call(
            client()
                .put(format!("{}/v2/{repo}/manifests/{reference}", self.base()))
                .header("Content-Type", media_type)
                .body(body.to_vec()),
        )
        .unwrap();
        assert_eq!(status, 201, "pushing manifest {repo}:{reference}: {text}");
        Desc {
            media_type: media_type.into(),
            digest: sha256(body),
            size: body.len(),
        }
    }

    /// Pushes a one-layer image (config + layer); returns (manifest,
    /// config, layer).
    pub fn push_image(
        &self,
        repo: &str,
        tag: &str,
        arch: &str,
        layer: &[u8],
    ) -> (Desc, Desc, Desc) {
        let layer = self.push_blob(repo, "application/vnd.oci.image.layer.v1.tar", layer);
        let diff_id = layer.digest.clone();
        let (m, config) = self.push_config_and_manifest(
            repo,
            tag,
            serde_json::json!({"architecture": arch, "os": "linux"}),
            &[(&layer, diff_id)],
        );
        (m, config, layer)
    }

    /// Pushes the image config `config` (its `rootfs` added: the layers'
    /// `diff_ids`, the digests of their uncompressed tars) and the manifest
    /// of `layers` (pushed already, base first) under `repo:tag`; returns
    /// (manifest, config).
    pub fn push_config_and_manifest(
        &self,
        repo: &str,
        tag: &str,
        mut config: serde_json::Value,
        layers: &[(&Desc, String)],
    ) -> (Desc, Desc) {
        config["rootfs"] = serde_json::json!({
            "type": "layers",
            "diff_ids": layers.iter().map(|l| &l.1).collect::<Vec<_>>(),
        });
        let config = self.push_blob(
            repo,
            "application/vnd.oci.image.config.v1+json",
            &serde_json::to_vec(&config).unwrap(),
        );
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config.json(),
            "layers": layers.iter().map(|l| l.0.json()).collect::<Vec<_>>(),
        });
        let m = self.push_manifest(
            repo,
            tag,
            "application/vnd.oci.image.manifest.v1+json",
            &serde_json::to_vec(&manifest).unwrap(),
        );
        (m, config)
    }
}
