//! Where references are resolved: image-source plugins, chosen by the
//! reference's scheme. Local files are not here: the host reads them
//! itself and there is nothing untrusted to parse.

use super::digest::Digest;
use super::StoreError;
use crate::plugin::calls::Platform;
use crate::plugin::fetch::HostPattern;
use crate::plugin::{PluginKind, PluginOrigin, Registry, Runtime};

/// One artifact to download, as a source described it (unchecked but
/// well-formed: the plugin runtime validated the digest syntax and URL).
#[derive(Debug, Clone)]
pub struct ArtifactSpec {
    pub url: String,
    pub digest: Option<Digest>,
    pub size: Option<u64>,
    pub media_type: String,
    pub format_hint: Option<String>,
    /// Sent with the download only; never stored (may hold a token).
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct Resolved {
    /// The plugin that answered.
    pub source: String,
    pub artifacts: Vec<ArtifactSpec>,
}

/// Resolves references. The store calls it only when it must go to the
/// network.
pub trait Sources {
    fn resolve(&self, reference: &str) -> Result<Resolved, StoreError>;
}

/// The image-source plugins of a registry.
pub struct PluginSources<'a> {
    pub runtime: &'a Runtime,
    pub registry: &'a Registry,
}

/// The server a reference names, for schemes whose reference is
/// `SCHEME://HOST[:PORT]/…` by definition (an OCI registry). A first-party
/// source resolving such a reference is granted exactly that server for
/// that one call: the user asked for an image from that registry, so the
/// registry is what the plugin may talk to, and nothing else. Third-party
/// plugins get only what the operator granted.
pub fn reference_host(scheme: &str, reference: &str) -> Option<HostPattern> {
    if scheme != "oci" {
        return None;
    }
    let rest = reference.strip_prefix("oci://")?;
    let authority = rest.split('/').next()?;
    HostPattern::parse(authority)
}

impl Sources for PluginSources<'_> {
    fn resolve(&self, reference: &str) -> Result<Resolved, StoreError> {
        let scheme = reference
            .split_once("://")
            .map(|(s, _)| s.to_ascii_lowercase())
            .ok_or_else(|| StoreError::BadReference {
                reference: reference.into(),
                reason: match std::path::absolute(reference) {
                    Ok(p) => format!(
                        "no such file ({}), and not a URL (no scheme://) or a digest",
                        p.display()
                    ),
                    Err(_) => "not a file, a URL (no scheme://) or a digest".into(),
                },
            })?;
        let wrap = |source| StoreError::Resolve {
            reference: crate::http::redact(reference).into_owned(),
            source: Box::new(source),
        };
        for info in self.registry.list() {
            if info.manifest.kind != PluginKind::ImageSource || info.disabled {
                continue;
            }
            let plugin = match self.registry.load(self.runtime, info.name()) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(plugin = info.name(), error = %e, "image source unusable; skipped");
                    continue;
                }
            };
            if !plugin.schemes().map_err(wrap)?.contains(&scheme) {
                continue;
            }
            let plugin = match (reference_host(&scheme, reference), &info.origin) {
                (Some(host), PluginOrigin::Builtin) => plugin.with_fetch_hosts(&[host]),
                _ => plugin,
            };
            let artifacts = plugin.resolve(reference, &Platform::host()).map_err(wrap)?;
            let artifacts = artifacts
                .into_iter()
                .map(|a| {
                    Ok(ArtifactSpec {
                        digest: a.digest.map(|d| d.parse()).transpose()?,
                        url: a.url,
                        size: a.size,
                        media_type: a.media_type,
                        format_hint: a.format_hint,
                        headers: a.headers,
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            return Ok(Resolved {
                source: info.name().to_string(),
                artifacts,
            });
        }
        Err(StoreError::NoSource {
            reference: reference.into(),
            scheme,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_hosts() {
        let h = |r: &str| reference_host("oci", r).map(|h| h.to_string());
        assert_eq!(
            h("oci://127.0.0.1:5000/a/b:latest").as_deref(),
            Some("127.0.0.1:5000")
        );
        assert_eq!(
            h("oci://registry.example.com/a@sha256:00").as_deref(),
            Some("registry.example.com")
        );
        assert_eq!(h("oci://user@evil/a"), None);
        assert_eq!(reference_host("https", "https://a.com/x"), None);
    }
}
