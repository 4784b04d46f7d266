//! `plugin.toml`: what a plugin says about itself. Every field is checked
//! here, and every error names the file, the field and the value.
//!
//! ```toml
//! name = "site-source"
//! version = "0.1.0"
//! kind = "image-source"            # or format-converter, disk-policy, layer-reader
//! api = "0.2.0"                    # the cocoon:plugin WIT version built against
//! description = "…"
//! wasm = "site_source.wasm"        # beside the manifest
//! sha256 = "<64 hex>"              # of the wasm; a mismatch is refused
//!
//! [capabilities]
//! fetch = ["catalog.example.com"]  # image sources only
//!
//! [limits]                         # optional; the operator may override
//! deadline_ms = 5000
//! memory_mib = 64
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::api::{ApiVersion, HOST_API};
use super::fetch::HostPattern;
use crate::config::LimitOverrides;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum PluginKind {
    ImageSource,
    FormatConverter,
    DiskPolicy,
    LayerReader,
}

impl PluginKind {
    pub const ALL: [PluginKind; 4] = [
        PluginKind::ImageSource,
        PluginKind::FormatConverter,
        PluginKind::DiskPolicy,
        PluginKind::LayerReader,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::ImageSource => "image-source",
            PluginKind::FormatConverter => "format-converter",
            PluginKind::DiskPolicy => "disk-policy",
            PluginKind::LayerReader => "layer-reader",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for PluginKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("reading plugin manifest {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("plugin manifest {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: crate::config::TomlSyntax,
    },
    #[error("plugin manifest {path}: {field} = {value:?}: {reason}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        value: String,
        reason: String,
    },
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    /// Hosts an image source may ask the host to fetch from.
    #[serde(default)]
    pub fetch: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    name: String,
    version: String,
    kind: String,
    api: String,
    #[serde(default)]
    description: String,
    wasm: Option<String>,
    sha256: Option<String>,
    #[serde(default)]
    capabilities: Capabilities,
    #[serde(default)]
    limits: LimitOverrides,
}

/// A checked manifest.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    pub kind: PluginKind,
    pub api: String,
    pub description: String,
    /// The wasm file name, relative to the manifest's directory.
    pub wasm: Option<String>,
    /// The pinned sha256 of the wasm (lower-case hex), if pinned.
    pub sha256: Option<String>,
    pub capabilities: Capabilities,
    pub limits: LimitOverrides,
}

impl Manifest {
    /// Reads and checks the manifest at `path`.
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let text =
            crate::fsutil::input::read_to_string_bounded(path, crate::fsutil::input::limits::TOML)
                .map_err(|source| ManifestError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
        Self::parse(&text, path)
    }

    /// Checks manifest text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ManifestError> {
        let raw: RawManifest = toml::from_str(text).map_err(|e| ManifestError::Parse {
            path: path.to_path_buf(),
            source: crate::config::TomlSyntax::new(text, &e),
        })?;
        let invalid = |field: &'static str, value: &str, reason: String| ManifestError::Invalid {
            path: path.to_path_buf(),
            field,
            value: value.to_string(),
            reason,
        };
        if !valid_name(&raw.name) {
            return Err(invalid(
                "name",
                &raw.name,
                "must match ^[a-z][a-z0-9-]{0,62}$".into(),
            ));
        }
        if ApiVersion::parse(&raw.version).is_none() {
            return Err(invalid(
                "version",
                &raw.version,
                "not a MAJOR.MINOR.PATCH version".into(),
            ));
        }
        let kind = PluginKind::parse(&raw.kind).ok_or_else(|| {
            invalid(
                "kind",
                &raw.kind,
                "must be image-source, format-converter, disk-policy or layer-reader".into(),
            )
        })?;
        let api = ApiVersion::parse(&raw.api)
            .ok_or_else(|| invalid("api", &raw.api, "not a MAJOR.MINOR.PATCH version".into()))?;
        if !api.supported_for(kind) {
            return Err(invalid(
                "api",
                &raw.api,
                format!(
                    "this host implements cocoon:plugin@{HOST_API} and loads {kind} plugins of {}",
                    ApiVersion::supported_text(kind)
                ),
            ));
        }
        if let Some(wasm) = &raw.wasm {
            if wasm.is_empty() || wasm.contains('/') || wasm.contains('\0') || wasm.starts_with('.')
            {
                return Err(invalid(
                    "wasm",
                    wasm,
                    "must be a plain file name beside the manifest".into(),
                ));
            }
        }
        let sha256 = match &raw.sha256 {
            Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Some(h.to_ascii_lowercase())
            }
            Some(h) => return Err(invalid("sha256", h, "must be 64 hex digits".into())),
            None => None,
        };
        if !raw.capabilities.fetch.is_empty() && kind != PluginKind::ImageSource {
            return Err(invalid(
                "capabilities.fetch",
                &raw.capabilities.fetch.join(","),
                "only image-source plugins may fetch".into(),
            ));
        }
        for host in &raw.capabilities.fetch {
            if HostPattern::parse(host).is_none() {
                return Err(invalid(
                    "capabilities.fetch",
                    host,
                    "not a host or host:port".into(),
                ));
            }
        }
        if raw.limits.deadline_ms == Some(0) {
            return Err(invalid(
                "limits.deadline_ms",
                "0",
                "must be at least 1".into(),
            ));
        }
        if raw.limits.memory_mib == Some(0) {
            return Err(invalid(
                "limits.memory_mib",
                "0",
                "must be at least 1".into(),
            ));
        }
        Ok(Manifest {
            name: raw.name,
            version: raw.version,
            kind,
            api: raw.api,
            description: raw.description,
            wasm: raw.wasm,
            sha256,
            capabilities: raw.capabilities,
            limits: raw.limits,
        })
    }

    /// The manifest as TOML, for `plugin install`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a manifest always serialises")
    }
}

pub(crate) fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        name = "site-source"
        version = "0.1.0"
        kind = "image-source"
        api = "0.2.0"
        wasm = "site_source.wasm"
        sha256 = "ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789"
        [capabilities]
        fetch = ["127.0.0.1:8080", "catalog.example.com"]
        [limits]
        deadline_ms = 100
    "#;

    #[test]
    fn a_good_manifest_parses() {
        let m = Manifest::parse(GOOD, Path::new("p.toml")).unwrap();
        assert_eq!(m.kind, PluginKind::ImageSource);
        assert_eq!(
            m.sha256.as_deref(),
            Some("abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789")
        );
        assert_eq!(m.limits.deadline_ms, Some(100));
        let again = Manifest::parse(&m.to_toml(), Path::new("p.toml")).unwrap();
        assert_eq!(again, m);
    }

    #[test]
    fn bad_fields_are_named() {
        let cases: &[(&str, &str, &str)] = &[
            ("name = \"site-source\"", "name = \"Site\"", "name"),
            ("name = \"site-source\"", "name = \"a/b\"", "name"),
            ("version = \"0.1.0\"", "version = \"1.0\"", "version"),
            ("kind = \"image-source\"", "kind = \"sorcerer\"", "kind"),
            ("api = \"0.2.0\"", "api = \"0.3.0\"", "api"),
            ("api = \"0.2.0\"", "api = \"1.1.0\"", "api"),
            (
                "wasm = \"site_source.wasm\"",
                "wasm = \"../x.wasm\"",
                "wasm",
            ),
            (
                "wasm = \"site_source.wasm\"",
                "wasm = \"/etc/x.wasm\"",
                "wasm",
            ),
            ("sha256 = \"ABCDEF", "sha256 = \"XYZDEF", "sha256"),
            (
                "kind = \"image-source\"",
                "kind = \"disk-policy\"",
                "capabilities.fetch",
            ),
            (
                "\"127.0.0.1:8080\"",
                "\"http://127.0.0.1/\"",
                "capabilities.fetch",
            ),
            ("deadline_ms = 100", "deadline_ms = 0", "limits.deadline_ms"),
        ];
        for (from, to, field) in cases {
            let text = GOOD.replacen(from, to, 1);
            assert_ne!(text, GOOD, "case {to} did not apply");
            let err = Manifest::parse(&text, Path::new("/x/plugin.toml")).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains("/x/plugin.toml") && msg.contains(&format!(": {field} = ")),
                "{to}: {msg}"
            );
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err =
            Manifest::parse(&format!("{GOOD}\n[extra]\na = 1\n"), Path::new("p")).unwrap_err();
        assert!(matches!(err, ManifestError::Parse { .. }));
    }

    #[test]
    fn api_versions_per_kind() {
        let policy = GOOD
            .replacen("kind = \"image-source\"", "kind = \"disk-policy\"", 1)
            .replacen(
                "fetch = [\"127.0.0.1:8080\", \"catalog.example.com\"]",
                "",
                1,
            );
        let layer = policy.replacen("kind = \"disk-policy\"", "kind = \"layer-reader\"", 1);
        let cases = [
            (GOOD, "0.1.0", true),
            (GOOD, "0.2.0", true),
            (GOOD, "0.2.7", true),
            (GOOD, "0.3.0", false),
            (policy.as_str(), "0.2.0", true),
            (policy.as_str(), "0.1.0", false),
            (layer.as_str(), "0.2.1", true),
            (layer.as_str(), "0.2.0", false),
            (layer.as_str(), "0.1.0", false),
        ];
        for (text, api, ok) in cases {
            let text = text.replacen("api = \"0.2.0\"", &format!("api = \"{api}\""), 1);
            let r = Manifest::parse(&text, Path::new("/x/plugin.toml"));
            assert_eq!(r.is_ok(), ok, "{api}: {r:?}");
            if let Err(e) = r {
                let msg = e.to_string();
                assert!(
                    msg.contains(&format!("api = \"{api}\""))
                        && msg.contains("cocoon:plugin@0.2.1"),
                    "{msg}"
                );
            }
        }
    }
}
