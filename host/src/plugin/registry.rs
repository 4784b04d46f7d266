//! Where plugins come from: first-party plugins embedded in the binary,
//! and third-party plugins in the plugin directory, one subdirectory each
//! with a `plugin.toml` and the wasm it pins by sha256. The operator's
//! config decides what each plugin is granted and its limits.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::api::ApiVersion;
use super::cache::Embedded;
use super::error::PluginError;
use super::fetch::{effective_hosts, HostPattern};
use super::limits::Limits;
use super::manifest::{Manifest, ManifestError};
use super::runtime::{LoadedPlugin, PluginSpec, Runtime};
use crate::config::HostConfig;
use crate::fsutil;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/builtin_plugins.rs"));
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "type", content = "path")]
pub enum PluginOrigin {
    /// Embedded in this binary.
    Builtin,
    /// From this directory of the plugin directory.
    Directory(PathBuf),
}

/// One discovered plugin and what the host grants it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PluginInfo {
    pub manifest: Manifest,
    pub origin: PluginOrigin,
    /// sha256 of the wasm as found (builtin) or as pinned (directory).
    pub sha256: String,
    pub wasm_size: u64,
    /// Hosts granted by the operator for this plugin.
    pub granted_fetch: Vec<String>,
    /// Declared AND granted.
    pub effective_fetch: Vec<String>,
    pub limits: Limits,
    pub config: BTreeMap<String, String>,
    pub disabled: bool,
    #[serde(skip)]
    wasm: WasmSource,
    #[serde(skip)]
    hosts: Vec<HostPattern>,
}

#[derive(Debug, Clone)]
enum WasmSource {
    /// Built in: the wasm, and the code the build compiled from it.
    Embedded(&'static [u8], Embedded),
    File(PathBuf),
}

/// A plugin directory entry that could not be used, and why.
#[derive(Debug)]
pub struct Problem {
    pub path: PathBuf,
    pub error: PluginError,
}

/// All plugins this host knows.
pub struct Registry {
    plugins: BTreeMap<String, PluginInfo>,
    problems: Vec<Problem>,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl PluginInfo {
    fn new(
        manifest: Manifest,
        origin: PluginOrigin,
        sha256: String,
        wasm_size: u64,
        wasm: WasmSource,
        config: &HostConfig,
    ) -> Self {
        let settings = config.plugin(&manifest.name);
        let hosts = effective_hosts(&manifest.capabilities.fetch, &settings.grant_fetch);
        let limits = Limits::for_kind(manifest.kind)
            .apply(&manifest.limits)
            .apply(&settings.limits);
        PluginInfo {
            origin,
            sha256,
            wasm_size,
            granted_fetch: settings.grant_fetch.clone(),
            effective_fetch: hosts.iter().map(|h| h.to_string()).collect(),
            limits,
            config: settings.config.clone(),
            disabled: settings.disabled,
            wasm,
            hosts,
            manifest,
        }
    }

    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    /// What the runtime needs to load this plugin.
    pub fn spec(&self) -> PluginSpec {
        PluginSpec {
            name: self.manifest.name.clone(),
            kind: self.manifest.kind,
            limits: self.limits,
            config: self.config.clone(),
            fetch_hosts: self.hosts.clone(),
        }
    }

    /// The wasm bytes, re-verified against the pinned digest: the file may
    /// have changed since discovery.
    pub fn wasm(&self) -> Result<Vec<u8>, PluginError> {
        match &self.wasm {
            WasmSource::Embedded(b, _) => Ok(b.to_vec()),
            WasmSource::File(path) => {
                let bytes = read_wasm(path)?;
                let actual = sha256_hex(&bytes);
                if actual != self.sha256 {
                    return Err(PluginError::DigestMismatch {
                        plugin: self.manifest.name.clone(),
                        expected: self.sha256.clone(),
                        actual,
                    });
                }
                Ok(bytes)
            }
        }
    }
}

impl Registry {
    /// The embedded plugins plus every usable entry of the plugin directory.
    /// Entries that cannot be used are kept as [`Problem`]s, not errors:
    /// one broken third-party plugin must not take the host down.
    pub fn discover(config: &HostConfig) -> Self {
        let mut plugins = BTreeMap::new();
        for (manifest_text, wasm, code, sha256) in embedded::BUILTIN {
            let manifest = Manifest::parse(manifest_text, Path::new("<builtin>"))
                .expect("first-party manifests are checked by the test suite");
            let info = PluginInfo::new(
                manifest,
                PluginOrigin::Builtin,
                sha256.to_string(),
                wasm.len() as u64,
                WasmSource::Embedded(
                    wasm,
                    Embedded {
                        engine_key: embedded::PRECOMPILED_ENGINE_KEY,
                        code,
                    },
                ),
                config,
            );
            plugins.insert(info.name().to_string(), info);
        }
        let mut problems = Vec::new();
        let mut dirs: Vec<PathBuf> = match std::fs::read_dir(&config.plugin_dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect(),
            Err(_) => Vec::new(),
        };
        dirs.sort();
        for dir in dirs {
            match Self::from_dir(&dir, config) {
                Ok(info) if plugins.contains_key(info.name()) => problems.push(Problem {
                    path: dir,
                    error: PluginError::ShadowsBuiltin(info.name().to_string()),
                }),
                Ok(info) => {
                    plugins.insert(info.name().to_string(), info);
                }
                Err(error) => problems.push(Problem { path: dir, error }),
            }
        }
        let known = plugins.keys().map(String::as_str).chain(
            problems
                .iter()
                .filter_map(|p| p.path.file_name().and_then(|n| n.to_str())),
        );
        config.warn_unknown_plugin_sections(known);
        Registry { plugins, problems }
    }

    fn from_dir(dir: &Path, config: &HostConfig) -> Result<PluginInfo, PluginError> {
        let manifest_path = dir.join("plugin.toml");
        let manifest = Manifest::load(&manifest_path)?;
        let (wasm_path, pinned) = check_pinned(&manifest, &manifest_path)?;
        let bytes = read_wasm(&wasm_path)?;
        let actual = sha256_hex(&bytes);
        if actual != pinned {
            return Err(PluginError::DigestMismatch {
                plugin: manifest.name,
                expected: pinned,
                actual,
            });
        }
        Ok(PluginInfo::new(
            manifest,
            PluginOrigin::Directory(dir.to_path_buf()),
            actual,
            bytes.len() as u64,
            WasmSource::File(wasm_path),
            config,
        ))
    }

    pub fn list(&self) -> impl Iterator<Item = &PluginInfo> {
        self.plugins.values()
    }

    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    pub fn get(&self, name: &str) -> Result<&PluginInfo, PluginError> {
        self.plugins
            .get(name)
            .ok_or_else(|| PluginError::NotFound(name.to_string()))
    }

    /// Loads plugin `name` into `runtime`.
    pub fn load(&self, runtime: &Runtime, name: &str) -> Result<LoadedPlugin, PluginError> {
        let info = match self.plugins.get(name) {
            Some(info) => info,
            None => {
                // A plugin that failed discovery reports why, not "not found".
                if let Some(i) = self
                    .problems
                    .iter()
                    .position(|p| p.path.file_name().is_some_and(|f| f == name))
                {
                    let p = &self.problems[i];
                    return Err(PluginError::Instantiate {
                        plugin: name.to_string(),
                        detail: format!("{} is unusable: {}", p.path.display(), p.error),
                    });
                }
                return Err(PluginError::NotFound(name.to_string()));
            }
        };
        if info.disabled {
            return Err(PluginError::Disabled(name.to_string()));
        }
        match &info.wasm {
            // No copy of the wasm: the embedded code is used when it can be.
            WasmSource::Embedded(wasm, code) => {
                runtime.load_with(info.spec(), wasm, &info.sha256, Some(*code))
            }
            WasmSource::File(_) => runtime.load(info.spec(), &info.wasm()?, &info.sha256),
        }
    }
}

/// A plugin's wasm: a regular file (never a FIFO or /dev/zero behind a
/// symlink) of at most [`limits::WASM`](crate::fsutil::input::limits::WASM) bytes.
fn read_wasm(path: &Path) -> Result<Vec<u8>, PluginError> {
    fsutil::input::read_bounded(path, fsutil::input::limits::WASM)
        .map_err(PluginError::io("reading plugin wasm", path))
}

/// The wasm path and pinned digest a directory manifest must carry.
fn check_pinned(
    manifest: &Manifest,
    manifest_path: &Path,
) -> Result<(PathBuf, String), PluginError> {
    let missing = |field: &'static str| {
        PluginError::Manifest(ManifestError::Invalid {
            path: manifest_path.to_path_buf(),
            field,
            value: String::new(),
            reason: "required for an installed plugin (`cocoon-host plugin install` fills it)"
                .into(),
        })
    };
    let wasm = manifest.wasm.as_ref().ok_or_else(|| missing("wasm"))?;
    let pinned = manifest.sha256.clone().ok_or_else(|| missing("sha256"))?;
    let dir = manifest_path.parent().unwrap_or(Path::new("."));
    Ok((dir.join(wasm), pinned))
}

/// What `plugin verify` found out about a candidate plugin.
#[derive(Debug, serde::Serialize)]
pub struct VerifyReport {
    pub manifest: Manifest,
    pub manifest_path: PathBuf,
    pub wasm_path: PathBuf,
    pub sha256: String,
    pub sha256_pinned: Option<String>,
    pub wasm_size: u64,
    pub imports: Vec<String>,
    pub exports: Vec<String>,
    /// The smoke call made, and what it answered.
    pub smoke_call: String,
}

/// Locates the manifest and wasm of a candidate plugin: a directory with
/// `plugin.toml`, a `plugin.toml`, or a `.wasm` with `manifest` given.
pub fn locate(
    path: &Path,
    manifest: Option<&Path>,
) -> Result<(PathBuf, Option<PathBuf>), PluginError> {
    if let Some(m) = manifest {
        return Ok((m.to_path_buf(), Some(path.to_path_buf())));
    }
    if path.is_dir() {
        return Ok((path.join("plugin.toml"), None));
    }
    if path.extension().is_some_and(|e| e == "wasm") {
        let beside = path.with_file_name("plugin.toml");
        return Ok((beside, Some(path.to_path_buf())));
    }
    Ok((path.to_path_buf(), None))
}

/// Checks a candidate plugin end to end, as the host would load it: the
/// manifest, the pinned digest (when pinned), compilation, the import
/// allowlist, the exports of its kind, and one harmless call.
pub fn verify(
    runtime: &Runtime,
    path: &Path,
    manifest: Option<&Path>,
) -> Result<(VerifyReport, LoadedPlugin), PluginError> {
    let (manifest_path, wasm_override) = locate(path, manifest)?;
    let manifest = Manifest::load(&manifest_path)?;
    let wasm_path = match wasm_override {
        Some(w) => w,
        None => check_pinned(&manifest, &manifest_path)
            .map(|(w, _)| w)
            .or_else(|e| {
                manifest
                    .wasm
                    .as_ref()
                    .map(|w| manifest_path.parent().unwrap_or(Path::new(".")).join(w))
                    .ok_or(e)
            })?,
    };
    let bytes = read_wasm(&wasm_path)?;
    let sha256 = sha256_hex(&bytes);
    if let Some(pinned) = &manifest.sha256 {
        if *pinned != sha256 {
            return Err(PluginError::DigestMismatch {
                plugin: manifest.name.clone(),
                expected: pinned.clone(),
                actual: sha256,
            });
        }
    }
    let spec = PluginSpec {
        name: manifest.name.clone(),
        kind: manifest.kind,
        limits: Limits::for_kind(manifest.kind).apply(&manifest.limits),
        config: BTreeMap::new(),
        fetch_hosts: Vec::new(),
    };
    let loaded = runtime.load(spec, &bytes, &sha256)?;
    let declared = ApiVersion::parse(&manifest.api).expect("checked by Manifest::parse");
    if (declared.0, declared.1) != (loaded.api().0, loaded.api().1) {
        return Err(PluginError::Manifest(ManifestError::Invalid {
            path: manifest_path,
            field: "api",
            value: manifest.api.clone(),
            reason: format!(
                "the component is built against cocoon:plugin@{}",
                loaded.api()
            ),
        }));
    }
    let smoke_call = smoke(&loaded)?;
    let report = VerifyReport {
        sha256_pinned: manifest.sha256.clone(),
        manifest,
        manifest_path,
        wasm_path,
        sha256,
        wasm_size: bytes.len() as u64,
        imports: loaded.imports().to_vec(),
        exports: loaded.exports().to_vec(),
        smoke_call,
    };
    Ok((report, loaded))
}

/// One call every plugin of a kind must answer without side effects.
fn smoke(plugin: &LoadedPlugin) -> Result<String, PluginError> {
    use super::manifest::PluginKind;
    use super::policy::{ImageKind, PolicyRequest};
    Ok(match plugin.kind() {
        PluginKind::ImageSource => format!("schemes() = {:?}", plugin.schemes()?),
        PluginKind::FormatConverter => format!("probe(empty) = {:?}", plugin.probe(&[], &[], 0)?),
        PluginKind::DiskPolicy => {
            let req = PolicyRequest {
                name: "verify".into(),
                image: ImageKind::Disk {
                    digest: format!("sha256:{}", "0".repeat(64)),
                    virtual_size: 1 << 30,
                },
                cow_size: None,
                data_disks: Vec::new(),
                cidata: false,
                settings: BTreeMap::new(),
            };
            let violations = plugin.policy_instance()?.validate(&req)?;
            format!("validate(a bare disk image) = {violations:?}")
        }
        PluginKind::LayerReader => {
            // An empty tar: no entries, and nothing read but its size.
            let dir =
                tempfile::tempdir().map_err(PluginError::io("creating a temp dir", "/tmp"))?;
            let empty = dir.path().join("empty.tar");
            std::fs::write(&empty, [0u8; 1024])
                .map_err(PluginError::io("writing", empty.clone()))?;
            let entries = plugin.open_layer(&empty)?.next(16)?;
            format!("next(an empty tar) = {} entries", entries.len())
        }
    })
}

/// Installs a verified plugin into the plugin directory as
/// `<dir>/<name>/{plugin.toml,<name>.wasm}`, pinning its sha256. Files are
/// written atomically; the manifest last, so a crash leaves either no
/// plugin or a complete one.
pub fn install(config: &HostConfig, report: &VerifyReport) -> Result<PathBuf, PluginError> {
    let name = &report.manifest.name;
    if embedded::BUILTIN
        .iter()
        .any(|(m, ..)| Manifest::parse(m, Path::new("<builtin>")).is_ok_and(|m| m.name == *name))
    {
        return Err(PluginError::ShadowsBuiltin(name.clone()));
    }
    let dir = config.plugin_dir.join(name);
    std::fs::create_dir_all(&dir).map_err(PluginError::io("creating plugin directory", &dir))?;
    let wasm_name = format!("{}.wasm", name.replace('-', "_"));
    let bytes = read_wasm(&report.wasm_path)?;
    if sha256_hex(&bytes) != report.sha256 {
        return Err(PluginError::DigestMismatch {
            plugin: name.clone(),
            expected: report.sha256.clone(),
            actual: sha256_hex(&bytes),
        });
    }
    let wasm_path = dir.join(&wasm_name);
    fsutil::write_atomic(&wasm_path, &bytes, 0o644)
        .map_err(PluginError::io("writing", &wasm_path))?;
    let mut manifest = report.manifest.clone();
    manifest.wasm = Some(wasm_name);
    manifest.sha256 = Some(report.sha256.clone());
    let manifest_path = dir.join("plugin.toml");
    fsutil::write_atomic(&manifest_path, manifest.to_toml().as_bytes(), 0o644)
        .map_err(PluginError::io("writing", &manifest_path))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The digests the build computed are those of the wasm it embedded
    /// (the registry no longer hashes built-ins at start-up).
    #[test]
    fn embedded_digests_are_the_wasm_digests() {
        assert!(!embedded::BUILTIN.is_empty());
        for (manifest, wasm, _, sha256) in embedded::BUILTIN {
            assert_eq!(sha256_hex(wasm), *sha256, "{manifest}");
        }
    }
}
