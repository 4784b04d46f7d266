//! Resolves `oci://HOST[:PORT]/REPO[:TAG|@sha256:HEX]` through the OCI
//! distribution API v2 into the blobs that make up the image: the manifest
//! (or index) the reference names, the platform manifest an index selects,
//! the config and the layers, each with its digest. The host downloads and
//! verifies them; this plugin only reads manifests.
//!
//! Every request goes through the host's mediated fetch, which lets this
//! plugin reach exactly the registry the reference names. Anonymous pulls
//! and bearer tokens (a `401` with `WWW-Authenticate: Bearer realm=…` and
//! an anonymous token request to the realm) are supported.

use cocoon_plugin_sdk::image_source::*;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

struct OciSource;

const MAX_MANIFEST: u64 = 4 << 20;
const MAX_TOKEN: u64 = 64 << 10;
const MAX_LAYERS: usize = 512;

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

#[derive(Debug, PartialEq)]
struct Reference {
    /// host or host:port
    registry: String,
    repo: String,
    /// A tag or a `sha256:` digest.
    target: String,
    pinned: Option<String>,
}

fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn parse(reference: &str) -> Result<Reference, Error> {
    let bad = |why: &str| {
        Error::invalid_input(format!(
            "{reference:?}: {why} (want oci://HOST[:PORT]/REPO[:TAG|@sha256:HEX])"
        ))
    };
    let rest = reference
        .strip_prefix("oci://")
        .ok_or_else(|| Error::unsupported(format!("{reference:?} is not an oci:// reference")))?;
    let (registry, path) = rest.split_once('/').ok_or_else(|| bad("no repository"))?;
    if registry.is_empty() || registry.contains('@') {
        return Err(bad("bad registry host"));
    }
    let (repo, target, pinned) = if let Some((repo, digest)) = path.split_once('@') {
        if !valid_digest(digest) {
            return Err(bad("the digest is not sha256:<64 lower-case hex>"));
        }
        (repo, digest.to_string(), Some(digest.to_string()))
    } else {
        let last = path.rsplit('/').next().unwrap_or(path);
        match last.split_once(':') {
            Some((_, tag)) => (&path[..path.len() - tag.len() - 1], tag.to_string(), None),
            None => (path, "latest".to_string(), None),
        }
    };
    let repo_ok = !repo.is_empty()
        && repo.split('/').all(|c| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        });
    if !repo_ok {
        return Err(bad(
            "the repository name is not lower-case [a-z0-9._-] components",
        ));
    }
    if pinned.is_none()
        && (target.is_empty()
            || target.len() > 128
            || !target
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)))
    {
        return Err(bad("bad tag"));
    }
    Ok(Reference {
        registry: registry.to_ascii_lowercase(),
        repo: repo.to_string(),
        target,
        pinned,
    })
}

/// Plain http only to loopback (the host refuses it elsewhere anyway).
fn base_url(registry: &str) -> String {
    let host = registry.rsplit_once(':').map_or(registry, |(h, p)| {
        if p.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            registry
        }
    });
    let loopback = host == "localhost" || host.starts_with("127.") || host == "[::1]";
    format!("{}://{registry}", if loopback { "http" } else { "https" })
}

/// The parameters of a `Bearer` challenge.
fn bearer_challenge(header: &str) -> Option<Vec<(String, String)>> {
    let rest = header
        .trim()
        .strip_prefix("Bearer ")
        .or_else(|| header.trim().strip_prefix("bearer "))?;
    let mut params = Vec::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (key, after) = s.split_once('=')?;
        let after = after.trim_start();
        let (value, tail) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (q[..end].to_string(), &q[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        params.push((key.trim().to_ascii_lowercase(), value));
        s = tail.trim_start().trim_start_matches(',').trim_start();
    }
    Some(params)
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

struct Session {
    base: String,
    repo: String,
    token: Option<String>,
}

fn header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

impl Session {
    fn auth_headers(&self) -> Vec<(String, String)> {
        self.token
            .iter()
            .map(|t| ("authorization".to_string(), format!("Bearer {t}")))
            .collect()
    }

    fn get(&mut self, url: &str, accept: &str, max: u64) -> Result<Response, Error> {
        let mut headers = vec![("accept".to_string(), accept.to_string())];
        headers.extend(self.auth_headers());
        let req = |headers: Vec<(String, String)>| Request {
            method: Method::Get,
            url: url.to_string(),
            headers,
            max_bytes: max,
            follow_redirects: true,
        };
        let resp = fetch(&req(headers))?;
        if resp.status != 401 || self.token.is_some() {
            return Ok(resp);
        }
        let challenge = header(&resp, "www-authenticate").unwrap_or("");
        let params = bearer_challenge(challenge)
            .ok_or_else(|| Error::unsupported(format!("{url}: HTTP 401 with challenge {challenge:?}; only anonymous bearer tokens are supported")))?;
        let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let realm = param("realm").ok_or_else(|| {
            Error::invalid_input(format!("{url}: bearer challenge without realm"))
        })?;
        let mut token_url = realm.to_string();
        let mut sep = if realm.contains('?') { '&' } else { '?' };
        if let Some(service) = param("service") {
            token_url.push_str(&format!("{sep}service={}", percent_encode(service)));
            sep = '&';
        }
        let scope = param("scope")
            .map(str::to_string)
            .unwrap_or_else(|| format!("repository:{}:pull", self.repo));
        token_url.push_str(&format!("{sep}scope={}", percent_encode(&scope)));
        let t = get(&token_url, &[("accept", "application/json")], MAX_TOKEN)?;
        if t.status != 200 {
            return Err(Error::io(format!(
                "token endpoint {realm} answered HTTP {}",
                t.status
            )));
        }
        #[derive(Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let tok: Token = serde_json::from_slice(&t.body)
            .map_err(|e| Error::invalid_input(format!("token from {realm}: {e}")))?;
        let token = tok
            .token
            .or(tok.access_token)
            .ok_or_else(|| Error::invalid_input(format!("token from {realm}: no token field")))?;
        if token.is_empty()
            || token.len() > 16384
            || token.bytes().any(|b| b.is_ascii_control() || b == b' ')
        {
            return Err(Error::invalid_input(format!(
                "token from {realm}: malformed"
            )));
        }
        self.token = Some(token);
        let mut headers = vec![("accept".to_string(), accept.to_string())];
        headers.extend(self.auth_headers());
        fetch(&req(headers))
    }

    fn manifest_url(&self, target: &str) -> String {
        format!("{}/v2/{}/manifests/{target}", self.base, self.repo)
    }

    fn blob_url(&self, digest: &str) -> String {
        format!("{}/v2/{}/blobs/{digest}", self.base, self.repo)
    }

    /// Fetches a manifest or index; checks it against `digest` when given.
    fn manifest(
        &mut self,
        target: &str,
        digest: Option<&str>,
    ) -> Result<(Vec<u8>, String, String), Error> {
        let url = self.manifest_url(target);
        let accept = [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST].join(", ");
        let r = self.get(&url, &accept, MAX_MANIFEST)?;
        match r.status {
            200 => {}
            404 => {
                return Err(Error::invalid_input(format!(
                    "{url}: no such manifest (HTTP 404)"
                )))
            }
            401 | 403 => {
                return Err(Error::invalid_input(format!(
                    "{url}: access denied (HTTP {})",
                    r.status
                )))
            }
            s => return Err(Error::io(format!("{url}: HTTP {s}"))),
        }
        let actual = format!("sha256:{:x}", Sha256::digest(&r.body));
        if let Some(want) = digest {
            if want != actual {
                return Err(Error::invalid_input(format!(
                    "{url}: manifest digest is {actual}, expected {want}"
                )));
            }
        }
        #[derive(Deserialize)]
        struct Peek {
            #[serde(rename = "mediaType")]
            media_type: Option<String>,
        }
        let peek: Peek = serde_json::from_slice(&r.body)
            .map_err(|e| Error::invalid_input(format!("{url}: {e}")))?;
        let media_type = peek
            .media_type
            .or_else(|| {
                header(&r, "content-type")
                    .map(|c| c.split(';').next().unwrap_or(c).trim().to_string())
            })
            .ok_or_else(|| Error::invalid_input(format!("{url}: manifest without a media type")))?;
        Ok((r.body, media_type, actual))
    }

    fn artifact(
        &self,
        url: String,
        digest: &str,
        size: u64,
        media_type: &str,
        accept: bool,
    ) -> Artifact {
        let mut headers = self.auth_headers();
        if accept {
            headers.push(("accept".into(), media_type.to_string()));
        }
        Artifact {
            url,
            digest: Some(digest.to_string()),
            size: Some(size),
            media_type: media_type.to_string(),
            format_hint: format_hint(media_type),
            headers,
        }
    }
}

/// Disk images pushed as OCI artifacts name their format in the media
/// type (e.g. `application/vnd.cocoon.disk.qcow2`).
fn format_hint(media_type: &str) -> Option<String> {
    let tail = media_type.rsplit(['.', '/', '+']).next()?;
    ["qcow2", "raw", "vmdk", "vhdx", "vpc", "vdi"]
        .contains(&tail)
        .then(|| tail.to_string())
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType")]
    media_type: String,
    digest: String,
    size: u64,
    platform: Option<PlatformDesc>,
}

#[derive(Deserialize)]
struct PlatformDesc {
    os: String,
    architecture: String,
    variant: Option<String>,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct ImageManifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

fn check_descriptor(d: &Descriptor) -> Result<(), Error> {
    if !valid_digest(&d.digest) {
        return Err(Error::unsupported(format!(
            "descriptor digest {:?} is not sha256",
            d.digest
        )));
    }
    Ok(())
}

fn is_index(mt: &str) -> bool {
    mt == OCI_INDEX || mt == DOCKER_LIST
}

impl ImageSource for OciSource {
    fn schemes() -> Vec<String> {
        vec!["oci".into()]
    }

    fn resolve(reference: &str, platform: Platform) -> Result<Vec<Artifact>, Error> {
        let r = parse(reference)?;
        let mut s = Session {
            base: base_url(&r.registry),
            repo: r.repo.clone(),
            token: None,
        };
        let (body, media_type, digest) = s.manifest(&r.target, r.pinned.as_deref())?;
        let mut out = vec![s.artifact(
            s.manifest_url(&digest),
            &digest,
            body.len() as u64,
            &media_type,
            true,
        )];
        let manifest_body = if is_index(&media_type) {
            let index: Index = serde_json::from_slice(&body)
                .map_err(|e| Error::invalid_input(format!("index of {reference}: {e}")))?;
            let chosen = index
                .manifests
                .iter()
                .find(|m| {
                    m.platform.as_ref().is_some_and(|p| {
                        p.os == platform.os
                            && p.architecture == platform.architecture
                            && (platform.variant.is_none() || p.variant == platform.variant)
                    })
                })
                .ok_or_else(|| {
                    Error::unsupported(format!(
                        "{reference}: no manifest for {}/{} in the index",
                        platform.os, platform.architecture
                    ))
                })?;
            check_descriptor(chosen)?;
            let (mbody, mtype, mdigest) = s.manifest(&chosen.digest, Some(&chosen.digest))?;
            if is_index(&mtype) {
                return Err(Error::unsupported(format!(
                    "{reference}: nested indexes are not supported"
                )));
            }
            out.push(s.artifact(
                s.manifest_url(&mdigest),
                &mdigest,
                mbody.len() as u64,
                &mtype,
                true,
            ));
            mbody
        } else if media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST {
            body
        } else {
            return Err(Error::unsupported(format!(
                "{reference}: manifest media type {media_type:?}"
            )));
        };
        let m: ImageManifest = serde_json::from_slice(&manifest_body)
            .map_err(|e| Error::invalid_input(format!("manifest of {reference}: {e}")))?;
        if m.layers.len() > MAX_LAYERS {
            return Err(Error::limit_exceeded(format!(
                "{reference}: {} layers, at most {MAX_LAYERS}",
                m.layers.len()
            )));
        }
        for d in std::iter::once(&m.config).chain(&m.layers) {
            check_descriptor(d)?;
            out.push(s.artifact(
                s.blob_url(&d.digest),
                &d.digest,
                d.size,
                &d.media_type,
                false,
            ));
        }
        log(
            LogLevel::Debug,
            "resolved",
            &[("reference", reference), ("manifest", &digest)],
        );
        Ok(out)
    }
}

cocoon_plugin_sdk::export_image_source!(OciSource);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let r = parse("oci://127.0.0.1:5000/a/b:v1").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repo.as_str(), r.target.as_str()),
            ("127.0.0.1:5000", "a/b", "v1")
        );
        let r = parse("oci://reg.example.com/a").unwrap();
        assert_eq!(r.target, "latest");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = parse(&format!("oci://reg/a@{d}")).unwrap();
        assert_eq!(r.pinned.as_deref(), Some(d.as_str()));
        for bad in [
            "oci://reg",
            "oci://reg/A",
            "oci://reg/a@sha256:12",
            "oci://u@reg/a",
            "oci://reg/a:b c",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(base_url("127.0.0.1:5000"), "http://127.0.0.1:5000");
        assert_eq!(base_url("reg.example.com"), "https://reg.example.com");
    }

    #[test]
    fn challenges() {
        let p = bearer_challenge(r#"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a:pull""#).unwrap();
        assert_eq!(
            p[0],
            ("realm".into(), "https://auth.example.com/token".into())
        );
        assert_eq!(p[2].1, "repository:a:pull");
        assert!(bearer_challenge("Basic realm=x").is_none());
    }
}
