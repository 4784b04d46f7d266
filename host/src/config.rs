//! The host's config file: where state lives, where third-party plugins
//! live, and what the operator grants each plugin.
//!
//! ```toml
//! state_dir = "/var/lib/cocoon-host"
//! plugin_dir = "/var/lib/cocoon-host/plugins"
//!
//! [plugins.site-source]
//! grant_fetch = ["catalog.example.com"]
//! config = { catalog = "https://catalog.example.com/images.json" }
//! limits = { deadline_ms = 5000, memory_mib = 128 }
//!
//! [store]   # see crate::store::settings
//! max_download_bytes = 137438953472
//! [vm]
//! policy = "default-policy"        # the disk-policy plugin for new VMs
//! settings = { cow_size = "20G", max_data_disks = 4 }   # passed to it
//! kernel = "/root/.cache/cocoon-host/linux/vmlinuz"  # default Linux kernel
//! # initrd, modules, busybox: see VmSettings
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::fsutil::input;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: TomlSyntax,
    },
    #[error("config file {path}: {field} = {value:?}: {reason}")]
    Invalid {
        path: PathBuf,
        field: String,
        value: String,
        reason: &'static str,
    },
    #[error("no state directory: set --state-dir, COCOON_STATE_DIR, or HOME")]
    NoStateDir,
}

/// Per-plugin limit overrides, in the config file and in manifests.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LimitOverrides {
    /// Wall-clock budget of one call, in milliseconds.
    pub deadline_ms: Option<u64>,
    /// Linear memory cap of one instance, in MiB.
    pub memory_mib: Option<u64>,
}

/// What the operator says about one plugin.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PluginSettings {
    /// Hosts (host or host:port) this plugin may fetch from, if it also
    /// declares them.
    #[serde(default)]
    pub grant_fetch: Vec<String>,
    /// Key/values the plugin reads with `config-get`.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    #[serde(default)]
    pub limits: LimitOverrides,
    /// Refuse to load this plugin.
    #[serde(default)]
    pub disabled: bool,
}

/// The disk-policy plugin that plans new VMs' disks, unless a VM names
/// another (`--policy`).
pub const DEFAULT_POLICY: &str = "default-policy";

/// `[vm]`: how new VMs are planned.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmSettings {
    /// The disk-policy plugin's name.
    #[serde(default = "default_policy")]
    pub policy: String,
    /// Site settings handed to the policy in every request. Strings,
    /// integers and booleans; the policy sees them as strings.
    #[serde(default, deserialize_with = "scalar_strings")]
    pub settings: BTreeMap<String, String>,
    /// The default Linux kernel (bzImage or vmlinux) when neither
    /// `--kernel` nor the image gives one (`scripts/fetch-linux-kernel`
    /// installs Debian's cloud kernel for it).
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// The initrd for `kernel`; without one, the host builds the cocoon
    /// initramfs ([`crate::guest::initramfs`]).
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// The kernel's `lib/modules/RELEASE` directory, when it is neither
    /// `modules/RELEASE` beside the kernel nor `/lib/modules/RELEASE`.
    #[serde(default)]
    pub modules: Option<PathBuf>,
    /// The static busybox for the cocoon initramfs (default: `/bin/busybox`
    /// from busybox-static).
    #[serde(default)]
    pub busybox: Option<PathBuf>,
}

impl Default for VmSettings {
    fn default() -> Self {
        VmSettings {
            policy: default_policy(),
            settings: BTreeMap::new(),
            kernel: None,
            initrd: None,
            modules: None,
            busybox: None,
        }
    }
}

fn default_policy() -> String {
    DEFAULT_POLICY.to_string()
}

/// A TOML table of scalars as strings (`4` and `"4"` alike).
fn scalar_strings<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        String(String),
        Integer(i64),
        Bool(bool),
    }
    let table = BTreeMap::<String, Scalar>::deserialize(d)?;
    Ok(table
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                Scalar::String(s) => s,
                Scalar::Integer(i) => i.to_string(),
                Scalar::Bool(b) => b.to_string(),
            };
            (k, v)
        })
        .collect())
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    state_dir: Option<PathBuf>,
    plugin_dir: Option<PathBuf>,
    #[serde(default)]
    plugins: BTreeMap<String, PluginSettings>,
    #[serde(default)]
    store: crate::store::StoreSettings,
    #[serde(default)]
    vm: VmSettings,
}

/// The resolved host configuration.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// The file it came from, if any.
    pub path: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub plugin_dir: PathBuf,
    pub plugins: BTreeMap<String, PluginSettings>,
    /// The `[store]` table: bounds of network work.
    pub store: crate::store::StoreSettings,
    pub vm: VmSettings,
}

/// Command-line and environment overrides, highest priority first.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub plugin_dir: Option<PathBuf>,
}

impl HostConfig {
    /// Loads the config file named by `overrides.config`, or the default
    /// one if it exists (`/etc/cocoon-host/config.toml` for root, the XDG
    /// config dir otherwise). A missing default file is an empty config; a
    /// missing named file is an error.
    pub fn load(overrides: &Overrides) -> Result<Self, ConfigError> {
        let (path, file) = match &overrides.config {
            Some(p) => (Some(p.clone()), Some(read(p)?)),
            None => match default_config_path() {
                Some(p) if p.is_file() => (Some(p.clone()), Some(read(&p)?)),
                _ => (None, None),
            },
        };
        let file = file.unwrap_or_default();
        let state_dir = match overrides.state_dir.clone().or(file.state_dir) {
            Some(d) => d,
            None => default_state_dir().ok_or(ConfigError::NoStateDir)?,
        };
        let plugin_dir = overrides
            .plugin_dir
            .clone()
            .or(file.plugin_dir)
            .unwrap_or_else(|| state_dir.join("plugins"));
        let config = HostConfig {
            path,
            state_dir,
            plugin_dir,
            plugins: file.plugins,
            store: file.store,
            vm: file.vm,
        };
        config.check()?;
        Ok(config)
    }

    /// A config rooted at `state_dir` with nothing granted (tests, tools).
    pub fn at(state_dir: &Path) -> Self {
        HostConfig {
            path: None,
            state_dir: state_dir.to_path_buf(),
            plugin_dir: state_dir.join("plugins"),
            plugins: BTreeMap::new(),
            store: Default::default(),
            vm: VmSettings::default(),
        }
    }

    /// The operator's settings for plugin `name` (empty when none).
    pub fn plugin(&self, name: &str) -> PluginSettings {
        self.plugins.get(name).cloned().unwrap_or_default()
    }

    /// The `[plugins.NAME]` sections that name none of `known`: settings
    /// for a plugin that does not exist (a typo, an uninstalled plugin)
    /// would otherwise be ignored without a word.
    pub fn unknown_plugin_sections<'a>(
        &'a self,
        known: impl IntoIterator<Item = &'a str>,
    ) -> Vec<&'a str> {
        let known: std::collections::BTreeSet<&str> = known.into_iter().collect();
        self.plugins
            .keys()
            .map(String::as_str)
            .filter(|name| !known.contains(name))
            .collect()
    }

    /// Logs a warning for each of [`Self::unknown_plugin_sections`].
    pub fn warn_unknown_plugin_sections<'a>(&'a self, known: impl IntoIterator<Item = &'a str>) {
        let file = self
            .path
            .as_deref()
            .map_or_else(String::new, |p| p.display().to_string());
        for name in self.unknown_plugin_sections(known) {
            tracing::warn!(
                "config file {file}: [plugins.{name}] configures a plugin that does not exist; ignored"
            );
        }
    }

    fn check(&self) -> Result<(), ConfigError> {
        let path = self.path.clone().unwrap_or_default();
        if let Err(bad) = self.store.check() {
            return Err(ConfigError::Invalid {
                path,
                field: bad.field.into(),
                value: bad.value.to_string(),
                reason: bad.reason,
            });
        }
        for (name, settings) in &self.plugins {
            for host in &settings.grant_fetch {
                if host.contains('*') {
                    return Err(ConfigError::Invalid {
                        path,
                        field: format!("plugins.{name}.grant_fetch"),
                        value: host.clone(),
                        reason: "wildcards are not grants: name each host (or host:port) the plugin may fetch from",
                    });
                }
                if crate::plugin::fetch::HostPattern::parse(host).is_none() {
                    return Err(ConfigError::Invalid {
                        path,
                        field: format!("plugins.{name}.grant_fetch"),
                        value: host.clone(),
                        reason: "not a host or host:port",
                    });
                }
            }
            if settings.limits.deadline_ms == Some(0) {
                return Err(ConfigError::Invalid {
                    path,
                    field: format!("plugins.{name}.limits.deadline_ms"),
                    value: "0".into(),
                    reason: "must be at least 1",
                });
            }
        }
        Ok(())
    }
}

fn read(path: &Path) -> Result<ConfigFile, ConfigError> {
    // `--config /dev/null`: the usual way to say "no config file"; every
    // other config is a regular file.
    if path == Path::new("/dev/null") {
        return Ok(ConfigFile::default());
    }
    let text = input::read_to_string_bounded(path, input::limits::TOML).map_err(|source| {
        ConfigError::Read {
            path: path.to_path_buf(),
            source,
        }
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        source: TomlSyntax::new(&text, &e),
    })
}

/// A TOML error told without echoing the input: toml's own message quotes
/// the whole offending line, and a hostile file (one 400 KB line of `[`,
/// a nesting bomb) would come back as a 400 KB message. This keeps the
/// position, toml's message cut to a line, and an excerpt of at most
/// [`TomlSyntax::EXCERPT`] characters around the error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message} (near {excerpt:?})")]
pub struct TomlSyntax {
    pub line: usize,
    pub column: usize,
    pub message: String,
    pub excerpt: String,
}

impl TomlSyntax {
    /// Characters of input shown around the error, at most.
    pub const EXCERPT: usize = 40;
    /// Characters of toml's message kept, at most.
    const MESSAGE: usize = 200;

    pub fn new(text: &str, e: &toml::de::Error) -> Self {
        let mut at = e.span().map_or(0, |s| s.start).min(text.len());
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
        let line_end = text[at..].find('\n').map_or(text.len(), |i| at + i);
        let before: Vec<char> = text[line_start..at].chars().collect();
        let after = text[at..line_end].chars();
        let half = Self::EXCERPT / 2;
        let mut excerpt: String = before[before.len().saturating_sub(half)..].iter().collect();
        excerpt.extend(after.take(Self::EXCERPT - excerpt.chars().count()));
        let message = e.message().lines().next().unwrap_or("").trim();
        TomlSyntax {
            line: text[..at].matches('\n').count() + 1,
            column: before.len() + 1,
            message: message.chars().take(Self::MESSAGE).collect(),
            excerpt,
        }
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn default_config_path() -> Option<PathBuf> {
    if is_root() {
        return Some(PathBuf::from("/etc/cocoon-host/config.toml"));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("cocoon-host/config.toml"))
}

/// `/var/lib/cocoon-host` for root, the XDG data dir otherwise.
pub fn default_state_dir() -> Option<PathBuf> {
    if is_root() {
        return Some(PathBuf::from("/var/lib/cocoon-host"));
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))?;
    Some(base.join("cocoon-host"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<HostConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        HostConfig::load(&Overrides {
            config: Some(path),
            state_dir: Some(dir.path().join("state")),
            plugin_dir: None,
        })
    }

    #[test]
    fn parses_grants_config_and_limits() {
        let c = load_text(
            r#"
            [plugins.site-source]
            grant_fetch = ["127.0.0.1:8080", "catalog.example.com"]
            config = { catalog = "http://127.0.0.1:8080/c.json" }
            limits = { deadline_ms = 250, memory_mib = 32 }
            "#,
        )
        .unwrap();
        let s = c.plugin("site-source");
        assert_eq!(s.grant_fetch.len(), 2);
        assert_eq!(s.config["catalog"], "http://127.0.0.1:8080/c.json");
        assert_eq!(s.limits.deadline_ms, Some(250));
        assert_eq!(c.plugin("other"), PluginSettings::default());
        assert!(c.plugin_dir.ends_with("state/plugins"));
        assert_eq!(c.store, crate::store::StoreSettings::default());
    }

    #[test]
    fn parses_the_store_table() {
        let c = load_text("[store]\nmax_download_bytes = 4096\nrate_window_secs = 2\n").unwrap();
        assert_eq!(c.store.max_download_bytes, 4096);
        assert_eq!(c.store.rate_window_secs, 2);
        assert_eq!(
            c.store.download_deadline_secs,
            crate::store::StoreSettings::default().download_deadline_secs
        );
    }

    #[test]
    fn rejects_bad_input_naming_field_and_value() {
        let cases = [
            (
                "[plugins.x]\ngrant_fetch = [\"http://a/b\"]\n",
                "plugins.x.grant_fetch",
            ),
            (
                "[plugins.x]\nlimits = { deadline_ms = 0 }\n",
                "plugins.x.limits.deadline_ms",
            ),
            ("[store]\nrate_window_secs = 0\n", "store.rate_window_secs"),
        ];
        for (text, field) in cases {
            let err = load_text(text).unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
        let err = load_text("[plugins.x]\ngrant = 1\n").unwrap_err();
        let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(chain.contains("unknown field `grant`"), "{chain}");
    }

    #[test]
    fn vm_policy_and_site_settings() {
        let c = load_text("").unwrap();
        assert_eq!(c.vm.policy, "default-policy");
        assert!(c.vm.settings.is_empty());
        let c = load_text(
            "[vm]\npolicy = \"quota-policy\"\nsettings = { max_data_disks = 4, max_data_bytes = \"100G\", force_direct_io = true }\n",
        )
        .unwrap();
        assert_eq!(c.vm.policy, "quota-policy");
        let want = [
            ("force_direct_io", "true"),
            ("max_data_bytes", "100G"),
            ("max_data_disks", "4"),
        ];
        let got: Vec<(&str, &str)> =
            c.vm.settings
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
        assert_eq!(got, want);
        for bad in [
            "[vm]\nsettings = { a = [1] }\n",
            "[vm]\nsettings = { a = 1.5 }\n",
            "[vm]\npolcy = \"x\"\n",
        ] {
            assert!(load_text(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_named_missing_file_is_an_error() {
        let err = HostConfig::load(&Overrides {
            config: Some("/nonexistent/cocoon.toml".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
    }

    #[test]
    fn a_nesting_bomb_is_refused_without_echoing_it() {
        let bomb = format!("a = {}", "[".repeat(400_000));
        let err = load_text(&bomb).unwrap_err();
        let chain = crate::error_chain(&err);
        assert!(
            chain.len() < 600,
            "{} bytes: {}",
            chain.len(),
            &chain[..600]
        );
        assert!(chain.contains("line 1, column"), "{chain}");
        match &err {
            ConfigError::Parse { source, .. } => {
                assert!(source.excerpt.chars().count() <= TomlSyntax::EXCERPT)
            }
            other => panic!("{other:?}"),
        }
        // A plain error keeps toml's message and the position.
        let err = load_text("state_dir = 1\n\n[plugins.x\n").unwrap_err();
        let chain = crate::error_chain(&err);
        assert!(chain.contains("line 3"), "{chain}");
    }

    #[test]
    fn wildcard_grants_are_refused_and_named() {
        for grant in ["*", "*.example.com", "*:443"] {
            let err = load_text(&format!("[plugins.x]\ngrant_fetch = [\"{grant}\"]\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("plugins.x.grant_fetch")
                    && err.contains(grant)
                    && err.contains("wildcards"),
                "{err}"
            );
        }
        assert!(load_text("[plugins.x]\ngrant_fetch = [\"a.example.com\"]\n").is_ok());
    }

    #[test]
    fn sections_for_plugins_that_do_not_exist_are_found() {
        let c = load_text("[plugins.url-source]\n[plugins.site-sorce]\n").unwrap();
        assert_eq!(
            c.unknown_plugin_sections(["url-source", "site-source"]),
            vec!["site-sorce"]
        );
        assert!(c
            .unknown_plugin_sections(["url-source", "site-sorce"])
            .is_empty());
    }

    #[test]
    fn dev_null_is_no_config_and_other_special_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let load = |p: &Path| {
            HostConfig::load(&Overrides {
                config: Some(p.to_path_buf()),
                state_dir: Some(dir.path().join("state")),
                plugin_dir: None,
            })
        };
        assert!(load(Path::new("/dev/null")).unwrap().plugins.is_empty());
        let fifo = dir.path().join("fifo");
        rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::from(0o600)).unwrap();
        for p in [fifo.as_path(), Path::new("/dev/zero")] {
            let err = crate::error_chain(&load(p).unwrap_err());
            assert!(
                err.contains(&p.display().to_string()) && err.contains("not a regular file"),
                "{err}"
            );
        }
    }
}
