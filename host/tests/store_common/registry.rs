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
    agent: ureq::Agent,
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
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .build()
            .into();
        let reg = Registry {
            port,
            child,
            _dir: dir,
            agent,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = reg
                .agent
                .get(&format!("http://127.0.0.1:{port}/v2/"))
                .call()
            {
                if r.status() == 200 {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not come up on port {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(reg)
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn push_blob(&self, repo: &str, media_type: &str, data: &[u8]) -> Desc {
        let digest = sha256(data);
        let r = self
            .agent
            .post(&format!("{}/v2/{repo}/blobs/uploads/", self.base()))
            .send_empty()
            .unwrap();
        assert_eq!(r.status(), 202, "starting an upload");
        let location = r
            .headers()
            .get("location")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let location = if location.starts_with('/') {
            format!("{}{location}", self.base())
        } else {
            location
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let r = self
            .agent
            .put(&format!("{location}{sep}digest={digest}"))
            .header("Content-Type", "application/octet-stream")
            .send(data)
            .unwrap();
        assert_eq!(r.status(), 201, "finishing the upload of {digest}");
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
        let r = self
            .agent
            .put(&format!("{}/v2/{repo}/manifests/{reference}", self.base()))
            .header("Content-Type", media_type)
            .send(body)
            .unwrap();
        let status = r.status();
        let text = r.into_body().read_to_string().unwrap_or_default();
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
        let config = serde_json::json!({
            "architecture": arch, "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
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
            "layers": [layer.json()],
        });
        let m = self.push_manifest(
            repo,
            tag,
            "application/vnd.oci.image.manifest.v1+json",
            &serde_json::to_vec(&manifest).unwrap(),
        );
        (m, config, layer)
    }
}
