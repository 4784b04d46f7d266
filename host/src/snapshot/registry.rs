//! Snapshots as OCI artifacts: [`push`] to and [`pull`] from any registry
//! that speaks the distribution API, over the host's one HTTP stack
//! ([`crate::http`]).
//!
//! The artifact: an OCI image manifest with `artifactType`
//! [`ARTIFACT_TYPE`], the empty config descriptor, and one layer per file
//! of the snapshot, titled (`org.opencontainers.image.title`) with its
//! name in the snapshot directory: the sidecar and the state as they are,
//! memory and disks zstd-compressed (their holes compress to nearly
//! nothing).
//!
//! Pull trusts nothing: the manifest is bounded and must be of this
//! artifact type; every blob is downloaded into the image store's staging
//! area and committed only if it hashes to its descriptor's digest and
//! size ([`crate::store::Layout::commit`]), so a tampered blob is refused
//! and never kept; each file is then unpacked into a temp snapshot
//! directory and checked against the sidecar's size and sha256; the
//! snapshot is renamed into place only when all of it checked out.
//!
//! Anonymous access only (a loopback or site registry); `http` for
//! loopback hosts, `https` otherwise.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde_json::json;

use super::archive::copy_sparse;
use super::preflight;
use super::sidecar::{Sidecar, SidecarError, MAX_SIDECAR_BYTES, SIDECAR_FILE};
use super::store::{SnapshotDir, StoreError, TempSnapshot};
use crate::store::blob::{Layout, Staged};
use crate::store::digest::{Digest, HashingWriter};

/// The artifact type of a cocoon snapshot.
pub const ARTIFACT_TYPE: &str = "application/vnd.cocoon.snapshot.v1";
pub const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const EMPTY_CONFIG_TYPE: &str = "application/vnd.oci.empty.v1+json";
pub const SIDECAR_TYPE: &str = "application/vnd.cocoon.snapshot.sidecar.v1+json";
pub const STATE_TYPE: &str = "application/vnd.cocoon.snapshot.state.v1";
pub const MEMORY_TYPE: &str = "application/vnd.cocoon.snapshot.memory.v1+zstd";
pub const DISK_TYPE: &str = "application/vnd.cocoon.snapshot.disk.v1+zstd";
const TITLE: &str = "org.opencontainers.image.title";
const MAX_MANIFEST: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{reference}: {reason}")]
    BadReference { reference: String, reason: String },
    #[error("{url}: HTTP {status}: {body}")]
    Http {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{url}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{reference}: the manifest {reason}")]
    BadManifest { reference: String, reason: String },
    #[error("{reference}: the artifact has no layer titled {name}")]
    MissingLayer { reference: String, name: String },
    #[error("{what}: {source}")]
    Store {
        what: String,
        #[source]
        source: crate::store::StoreError,
    },
    #[error("{name} is {found} bytes once unpacked; the sidecar records {recorded}")]
    Size {
        name: String,
        recorded: u64,
        found: u64,
    },
    #[error("{name} is corrupt once unpacked: its sha256 is {computed}, the sidecar records {recorded}; nothing was kept")]
    Hash {
        name: String,
        recorded: Digest,
        computed: Digest,
    },
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Snapshots(#[from] StoreError),
    #[error(transparent)]
    Sidecar(#[from] SidecarError),
    #[error(transparent)]
    Name(#[from] preflight::PreflightError),
    #[error(transparent)]
    Archive(#[from] super::archive::ArchiveError),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> RegistryError {
    let path = path.to_path_buf();
    move |source| RegistryError::Io { what, path, source }
}

/// `oci://HOST[:PORT]/REPO[:TAG|@DIGEST]`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub base: String,
    pub repo: String,
    /// The tag or digest.
    pub reference: String,
    pub text: String,
}

impl Reference {
    pub fn parse(text: &str) -> Result<Reference, RegistryError> {
        let bad = |reason: &str| RegistryError::BadReference {
            reference: text.into(),
            reason: reason.into(),
        };
        let rest = text
            .strip_prefix("oci://")
            .ok_or_else(|| bad("expected oci://HOST/REPO:TAG"))?;
        let (host, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("no repository after the host"))?;
        if host.is_empty() || host.contains(['@', '?', '#']) {
            return Err(bad("bad host"));
        }
        let (repo, reference) = if let Some((r, d)) = path.split_once('@') {
            d.parse::<Digest>().map_err(|e| bad(&e.to_string()))?;
            (r, d.to_string())
        } else {
            match path.rsplit_once(':') {
                Some((r, t)) if !t.contains('/') => (r, t.to_string()),
                _ => (path, "latest".to_string()),
            }
        };
        let repo_ok = !repo.is_empty()
            && repo.split('/').all(|c| {
                // The distribution grammar: components start and end with
                // a letter or digit (so never `.` or `..`).
                c.starts_with(|ch: char| ch.is_ascii_alphanumeric())
                    && c.ends_with(|ch: char| ch.is_ascii_alphanumeric())
                    && c.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
            });
        if !repo_ok {
            return Err(bad(
                "repository names are lowercase [a-z0-9._-] path components",
            ));
        }
        let tag_ok = reference.starts_with("sha256:")
            || (!reference.is_empty()
                && reference.len() <= 128
                && reference
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
        if !tag_ok {
            return Err(bad("bad tag"));
        }
        let name = host.split(':').next().unwrap_or(host);
        let scheme = if matches!(name, "127.0.0.1" | "localhost" | "[::1]") {
            "http"
        } else {
            "https"
        };
        Ok(Reference {
            base: format!("{scheme}://{host}"),
            repo: repo.into(),
            reference,
            text: text.into(),
        })
    }

    fn url(&self, tail: &str) -> String {
        format!("{}/v2/{}/{tail}", self.base, self.repo)
    }
}

async fn send(req: reqwest::RequestBuilder, url: &str) -> Result<reqwest::Response, RegistryError> {
    req.send().await.map_err(|source| RegistryError::Transport {
        url: url.into(),
        source,
    })
}

async fn expect(
    r: reqwest::Response,
    url: &str,
    ok: &[u16],
) -> Result<reqwest::Response, RegistryError> {
    let status = r.status().as_u16();
    if ok.contains(&status) {
        return Ok(r);
    }
    let body = r.text().await.unwrap_or_default();
    Err(RegistryError::Http {
        url: url.into(),
        status,
        body: body.chars().take(300).collect(),
    })
}

/// One blob, uploaded unless the registry has it (monolithic upload).
async fn upload(r: &Reference, digest: &Digest, body: Vec<u8>) -> Result<(), RegistryError> {
    let client = crate::http::client();
    let head = r.url(&format!("blobs/{digest}"));
    let resp = send(client.head(&head), &head).await?;
    if resp.status().as_u16() == 200 {
        return Ok(());
    }
    let start = r.url("blobs/uploads/");
    let resp = expect(send(client.post(&start), &start).await?, &start, &[202]).await?;
    let location = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| RegistryError::Http {
            url: start.clone(),
            status: 202,
            body: "no Location for the upload".into(),
        })?;
    let mut put = url::Url::parse(&start)
        .and_then(|u| u.join(location))
        .map_err(|_| RegistryError::Http {
            url: start.clone(),
            status: 202,
            body: format!("bad upload Location {location:?}"),
        })?;
    put.query_pairs_mut()
        .append_pair("digest", &digest.to_string());
    let put = put.to_string();
    let req = client
        .put(&put)
        .header("Content-Type", "application/octet-stream")
        .body(body);
    expect(send(req, &put).await?, &put, &[201]).await?;
    Ok(())
}

/// What [`push`] sent.
#[derive(Debug, Clone)]
pub struct Pushed {
    pub manifest_digest: Digest,
    /// (title, media type, digest, bytes sent) per layer.
    pub layers: Vec<(String, String, Digest, u64)>,
}

/// A file's blob: as it is, or zstd-compressed, with its digest.
fn blob_of(path: &Path, compress: bool) -> Result<(Vec<u8>, Digest), RegistryError> {
    let mut file = File::open(path).map_err(io_err("open", path))?;
    let mut w = HashingWriter::new(Vec::new());
    if compress {
        let mut enc = zstd::Encoder::new(&mut w, 3).map_err(io_err("compress", path))?;
        io::copy(&mut file, &mut enc).map_err(io_err("compress", path))?;
        enc.finish().map_err(io_err("compress", path))?;
    } else {
        io::copy(&mut file, &mut w).map_err(io_err("read", path))?;
    }
    w.flush().map_err(io_err("read", path))?;
    let (bytes, digest, _) = w.finish();
    Ok((bytes, digest))
}

/// Pushes `snapshot` as an artifact to `reference` (`oci://HOST/REPO:TAG`).
pub fn push(snapshot: &SnapshotDir, reference: &str) -> Result<Pushed, RegistryError> {
    let r = Reference::parse(reference)?;
    let mut files = vec![(SIDECAR_FILE.to_string(), SIDECAR_TYPE)];
    for f in &snapshot.sidecar.files {
        preflight::check_name(&f.name)?;
        let t = match f.name.as_str() {
            cocoon_vmm::snapshot::STATE_FILE => STATE_TYPE,
            cocoon_vmm::snapshot::MEMORY_FILE => MEMORY_TYPE,
            _ => DISK_TYPE,
        };
        files.push((f.name.clone(), t));
    }
    crate::http::block_on(async {
        let mut layers = Vec::new();
        let mut descs = Vec::new();
        for (name, media_type) in files {
            let path = snapshot.dir.join(&name);
            let (bytes, digest) = blob_of(&path, media_type.ends_with("+zstd"))?;
            let size = bytes.len() as u64;
            upload(&r, &digest, bytes).await?;
            descs.push(json!({
                "mediaType": media_type,
                "digest": digest.to_string(),
                "size": size,
                "annotations": {TITLE: name},
            }));
            layers.push((name, media_type.to_string(), digest, size));
        }
        let config = b"{}".to_vec();
        let config_digest = Digest::of(&config);
        upload(&r, &config_digest, config).await?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "artifactType": ARTIFACT_TYPE,
            "config": {"mediaType": EMPTY_CONFIG_TYPE, "digest": config_digest.to_string(), "size": 2},
            "layers": descs,
        });
        let body = serde_json::to_vec(&manifest).expect("a manifest serialises");
        let manifest_digest = Digest::of(&body);
        let url = r.url(&format!("manifests/{}", r.reference));
        let req = crate::http::client()
            .put(&url)
            .header("Content-Type", MANIFEST_TYPE)
            .body(body);
        expect(send(req, &url).await?, &url, &[201]).await?;
        Ok(Pushed {
            manifest_digest,
            layers,
        })
    })
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: String,
    digest: Digest,
    size: u64,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    #[serde(default)]
    artifact_type: Option<String>,
    layers: Vec<Descriptor>,
}

/// Reads a whole response body, at most `max` bytes.
async fn body_bounded(
    mut r: reqwest::Response,
    url: &str,
    max: usize,
) -> Result<Vec<u8>, RegistryError> {
    let mut out = Vec::new();
    while let Some(chunk) = r.chunk().await.map_err(|source| RegistryError::Transport {
        url: url.into(),
        source,
    })? {
        out.extend_from_slice(&chunk);
        if out.len() > max {
            return Err(RegistryError::BadManifest {
                reference: url.into(),
                reason: format!("is larger than {max} bytes"),
            });
        }
    }
    Ok(out)
}

/// Downloads one blob into the store, verified by its digest and size.
async fn fetch_blob(
    r: &Reference,
    layout: &Layout,
    d: &Descriptor,
) -> Result<crate::store::VerifiedBlob, RegistryError> {
    let store_err = |what: String| {
        move |source: crate::store::StoreError| RegistryError::Store { what, source }
    };
    let what = format!("{}: blob {}", r.text, d.digest);
    let mut url = r.url(&format!("blobs/{}", d.digest));
    let mut resp = send(crate::http::client().get(&url), &url).await?;
    // Registries may send blobs from elsewhere (a CDN, object storage).
    for _ in 0..5 {
        if !resp.status().is_redirection() {
            break;
        }
        let Some(loc) = resp.headers().get("location").and_then(|v| v.to_str().ok()) else {
            break;
        };
        url = url::Url::parse(&url)
            .and_then(|u| u.join(loc))
            .map(|u| u.to_string())
            .unwrap_or_else(|_| loc.to_string());
        resp = send(crate::http::client().get(&url), &url).await?;
    }
    let mut resp = expect(resp, &url, &[200]).await?;
    let mut staged = Staged::open(layout, &format!("snap-{}", d.digest.hex()), false)
        .map_err(store_err(what.clone()))?;
    let mut got = 0u64;
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|source| RegistryError::Transport {
            url: url.clone(),
            source,
        })?
    {
        got += chunk.len() as u64;
        if got > d.size {
            staged.discard();
            return Err(RegistryError::Store {
                what,
                source: crate::store::StoreError::SizeMismatch {
                    url,
                    expected: d.size,
                    actual: got,
                },
            });
        }
        staged.write_all(&chunk).map_err(store_err(what.clone()))?;
    }
    layout
        .commit(staged, &what, Some(&d.digest), Some(d.size))
        .map_err(store_err(what))
}

/// Pulls the artifact at `reference` into `snapshots_dir` (as `name`, or
/// the name its sidecar records), every blob through the image store at
/// `layout`.
pub fn pull(
    reference: &str,
    layout: &Layout,
    snapshots_dir: &Path,
    name: Option<&str>,
) -> Result<super::archive::Imported, RegistryError> {
    let r = Reference::parse(reference)?;
    let bad = |reason: String| RegistryError::BadManifest {
        reference: reference.into(),
        reason,
    };
    crate::http::block_on(async {
        let url = r.url(&format!("manifests/{}", r.reference));
        let req = crate::http::client()
            .get(&url)
            .header("Accept", MANIFEST_TYPE);
        let resp = expect(send(req, &url).await?, &url, &[200]).await?;
        let body = body_bounded(resp, &url, MAX_MANIFEST).await?;
        if let Ok(pinned) = r.reference.parse::<Digest>() {
            let got = Digest::of(&body);
            if got != pinned {
                return Err(bad(format!("hashes to {got}, not the pinned {pinned}")));
            }
        }
        let m: Manifest =
            serde_json::from_slice(&body).map_err(|e| bad(format!("does not parse: {e}")))?;
        if m.artifact_type.as_deref() != Some(ARTIFACT_TYPE) {
            return Err(bad(format!(
                "has artifactType {:?}, not {ARTIFACT_TYPE}",
                m.artifact_type
            )));
        }
        let titled = |n: &str| {
            m.layers
                .iter()
                .find(|l| l.annotations.get(TITLE).map(String::as_str) == Some(n))
        };
        let side = titled(SIDECAR_FILE).ok_or_else(|| RegistryError::MissingLayer {
            reference: reference.into(),
            name: SIDECAR_FILE.into(),
        })?;
        if side.size > MAX_SIDECAR_BYTES {
            return Err(bad(format!("lists a {}-byte sidecar", side.size)));
        }
        let blob = fetch_blob(&r, layout, side).await?;
        let bytes = std::fs::read(blob.path()).map_err(io_err("read", blob.path()))?;
        let mut sidecar = Sidecar::parse(Path::new(SIDECAR_FILE), &bytes)?;
        let name = name.unwrap_or(&sidecar.name).to_string();
        let (temp, disks_dir) = TempSnapshot::for_import(snapshots_dir, &name)?;
        for f in &sidecar.files {
            preflight::check_name(&f.name)?;
            let d = titled(&f.name).ok_or_else(|| RegistryError::MissingLayer {
                reference: reference.into(),
                name: f.name.clone(),
            })?;
            let blob = fetch_blob(&r, layout, d).await?;
            let src = File::open(blob.path()).map_err(io_err("open", blob.path()))?;
            let mut reader: Box<dyn Read + Send> = if d.media_type.ends_with("+zstd") {
                Box::new(zstd::Decoder::new(src).map_err(io_err("decompress", blob.path()))?)
            } else {
                Box::new(src)
            };
            let dest = temp.path().join(&f.name);
            let out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&dest)
                .map_err(io_err("create", &dest))?;
            let mut limited = (&mut reader).take(f.size + 1);
            let (found, computed) = copy_sparse(&mut limited, &out, &dest)?;
            if found != f.size {
                return Err(RegistryError::Size {
                    name: f.name.clone(),
                    recorded: f.size,
                    found,
                });
            }
            if computed != f.sha256 {
                return Err(RegistryError::Hash {
                    name: f.name.clone(),
                    recorded: f.sha256.clone(),
                    computed,
                });
            }
            out.sync_all().map_err(io_err("fsync", &dest))?;
        }
        crate::fsutil::sync_dir(&disks_dir).map_err(io_err("fsync", &disks_dir))?;
        sidecar.name = name.clone();
        sidecar.write(temp.path())?;
        let dir = temp.commit(&name)?;
        Ok(super::archive::Imported { name, dir, sidecar })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let r = Reference::parse("oci://127.0.0.1:5000/snaps/web:v1").unwrap();
        assert_eq!(
            (r.base.as_str(), r.repo.as_str(), r.reference.as_str()),
            ("http://127.0.0.1:5000", "snaps/web", "v1")
        );
        let r = Reference::parse("oci://registry.example/a/b").unwrap();
        assert_eq!(
            (r.base.as_str(), r.reference.as_str()),
            ("https://registry.example", "latest")
        );
        let d = Digest::of(b"x");
        let r = Reference::parse(&format!("oci://h/a@{d}")).unwrap();
        assert_eq!(r.reference, d.to_string());
        for bad in [
            "http://h/a:1",
            "oci://h",
            "oci:///a",
            "oci://h/A:1",
            "oci://h/a:b c",
            "oci://h/a@sha256:zz",
            "oci://h/../x:1",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }
}
