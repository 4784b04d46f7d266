//! `plugin new`: a buildable plugin crate of each kind, to start from. The
//! templates live in `host/templates/plugin`; each implements its kind's
//! trait minimally but for real (an image source resolving `NAME://…`
//! through a setting, a converter for a small headered format, a policy
//! with one site rule), so the crate builds, verifies and answers calls as
//! generated.

use std::path::{Path, PathBuf};

use super::api::HOST_API;
use super::manifest::{valid_name, PluginKind};
use crate::fsutil;

const CARGO_TOML: &str = include_str!("../../templates/plugin/Cargo.toml.in");
const PLUGIN_TOML: &str = include_str!("../../templates/plugin/plugin.toml.in");
const IMAGE_SOURCE: &str = include_str!("../../templates/plugin/image-source.rs.in");
const FORMAT_CONVERTER: &str = include_str!("../../templates/plugin/format-converter.rs.in");
const DISK_POLICY: &str = include_str!("../../templates/plugin/disk-policy.rs.in");

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("plugin name {0:?}: must match ^[a-z][a-z0-9-]{{0,62}}$ (it names the crate and the plugin)")]
    BadName(String),
    #[error("{}: exists and is not an empty directory", .0.display())]
    Exists(PathBuf),
    #[error("the plugin SDK is not at {} (give its path with --sdk)", .0.display())]
    NoSdk(PathBuf),
    #[error("there is no template for {0} plugins; start from plugins/builtin/tar-layer")]
    NoTemplate(PluginKind),
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TemplateError + 'a {
    move |source| TemplateError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The SDK of the checkout this binary was built from.
pub fn default_sdk() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/sdk")
}

/// The files of a new plugin crate, relative to its directory.
pub fn render(
    name: &str,
    kind: PluginKind,
    sdk: &Path,
) -> Result<Vec<(PathBuf, String)>, TemplateError> {
    if !valid_name(name) {
        return Err(TemplateError::BadName(name.to_string()));
    }
    let (code, description, capabilities) = match kind {
        PluginKind::ImageSource => (
            IMAGE_SOURCE,
            format!("{} references", scheme(name)),
            "\n[capabilities]\nfetch = []                      # hosts it may ask the host to fetch from\n",
        ),
        PluginKind::FormatConverter => (FORMAT_CONVERTER, format!("{name} disk images"), ""),
        PluginKind::DiskPolicy => (DISK_POLICY, "the standard disk plan, at most max_data_disks data disks".into(), ""),
        PluginKind::LayerReader => return Err(TemplateError::NoTemplate(kind)),
    };
    let fill = |template: &str| {
        template
            .replace("{{name}}", name)
            .replace("{{kind}}", kind.as_str())
            .replace("{{sdk}}", &sdk.display().to_string())
            .replace("{{scheme}}", &scheme(name))
            .replace("{{magic}}", &magic(name))
            .replace("{{api}}", &HOST_API.to_string())
            .replace("{{description}}", &description)
            .replace("{{capabilities}}", capabilities)
    };
    Ok(vec![
        ("Cargo.toml".into(), fill(CARGO_TOML)),
        ("plugin.toml".into(), fill(PLUGIN_TOML)),
        ("src/lib.rs".into(), fill(code)),
        (".gitignore".into(), "/target\n".into()),
    ])
}

/// Writes a new plugin crate into `dir` (created; it may exist only as an
/// empty directory). The files are written under a temp name beside it and
/// renamed into place, so a failure leaves nothing behind. The SDK
/// workspace's Cargo.lock is copied along, so the crate builds with the
/// dependency versions the SDK is tested with.
pub fn create(
    dir: &Path,
    name: &str,
    kind: PluginKind,
    sdk: &Path,
) -> Result<Vec<PathBuf>, TemplateError> {
    let sdk = sdk
        .canonicalize()
        .ok()
        .filter(|s| s.join("Cargo.toml").is_file())
        .ok_or_else(|| TemplateError::NoSdk(sdk.to_path_buf()))?;
    let files = render(name, kind, &sdk)?;
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(TemplateError::Exists(dir.to_path_buf()));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(_) => return Err(TemplateError::Exists(dir.to_path_buf())),
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io("creating", &parent))?;
    let staging = tempfile::Builder::new()
        .prefix(".cocoon-plugin-new.")
        .tempdir_in(&parent)
        .map_err(io("creating a temp directory in", &parent))?;
    let mut written = Vec::new();
    for (rel, text) in &files {
        let path = staging.path().join(rel);
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p).map_err(io("creating", p))?;
        }
        fsutil::write_atomic(&path, text.as_bytes(), 0o644).map_err(io("writing", &path))?;
        written.push(dir.join(rel));
    }
    let lock = sdk.parent().map(|p| p.join("Cargo.lock"));
    if let Some(lock) = lock.filter(|l| l.is_file()) {
        let to = staging.path().join("Cargo.lock");
        std::fs::copy(&lock, &to).map_err(io("copying", &lock))?;
        written.push(dir.join("Cargo.lock"));
    }
    // tempfile makes it 0700; a source tree is the user's to share.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(staging.path(), std::fs::Permissions::from_mode(0o755))
        .map_err(io("setting permissions of", staging.path()))?;
    // An empty directory in the way is replaced by the rename.
    std::fs::rename(staging.path(), dir).map_err(io("creating", dir))?;
    // The staging directory is now `dir`: keep it.
    let _ = staging.keep();
    Ok(written)
}

/// The URL scheme of an image source: its name, cut to 32 characters.
fn scheme(name: &str) -> String {
    name.chars()
        .take(32)
        .collect::<String>()
        .trim_end_matches('-')
        .to_string()
}

/// An 8-byte magic for a converter's format, from its name.
fn magic(name: &str) -> String {
    let mut m: String = name
        .chars()
        .map(|c| {
            if c == '-' {
                '_'
            } else {
                c.to_ascii_uppercase()
            }
        })
        .take(8)
        .collect();
    while m.len() < 8 {
        m.push('_');
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_schemes_and_magics() {
        assert_eq!(scheme("my-source"), "my-source");
        assert_eq!(scheme(&format!("{}-x", "a".repeat(31))), "a".repeat(31));
        assert_eq!(magic("qed"), "QED_____");
        assert_eq!(magic("my-format-2"), "MY_FORMA");
        for bad in ["", "My", "1x", "a/b", "a_b", &"a".repeat(64)] {
            assert!(matches!(
                render(bad, PluginKind::DiskPolicy, Path::new("/sdk")),
                Err(TemplateError::BadName(_))
            ));
        }
    }

    #[test]
    fn every_kind_renders_its_trait_and_manifest() {
        for (kind, export) in [
            (PluginKind::ImageSource, "export_image_source!"),
            (PluginKind::FormatConverter, "export_format_converter!"),
            (PluginKind::DiskPolicy, "export_disk_policy!"),
        ] {
            let files = render("demo", kind, Path::new("/sdk")).unwrap();
            let text = |name: &str| &files.iter().find(|(p, _)| p == Path::new(name)).unwrap().1;
            assert!(text("src/lib.rs").contains(export), "{kind}");
            assert!(
                !files.iter().any(|(_, t)| t.contains("{{")),
                "{kind}: unfilled"
            );
            let cargo = text("Cargo.toml");
            assert!(
                cargo.contains(r#"path = "/sdk", features = [""#) && cargo.contains(kind.as_str()),
                "{cargo}"
            );
            let m = crate::plugin::Manifest::parse(text("plugin.toml"), Path::new("plugin.toml"))
                .unwrap();
            assert_eq!(
                (m.name.as_str(), m.kind, m.api.as_str()),
                ("demo", kind, HOST_API.to_string().as_str())
            );
        }
    }

    #[test]
    fn create_refuses_a_non_empty_directory_and_leaves_nothing_half_written() {
        let tmp = tempfile::tempdir().unwrap();
        let sdk = default_sdk();
        let dir = tmp.path().join("p");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("keep"), "mine").unwrap();
        let err = create(&dir, "p", PluginKind::DiskPolicy, &sdk).unwrap_err();
        assert!(matches!(err, TemplateError::Exists(_)), "{err}");
        assert_eq!(std::fs::read_to_string(dir.join("keep")).unwrap(), "mine");
        let err = create(
            &tmp.path().join("q"),
            "q",
            PluginKind::DiskPolicy,
            &tmp.path().join("nosdk"),
        )
        .unwrap_err();
        assert!(matches!(err, TemplateError::NoSdk(_)), "{err}");
        // Nothing but the one directory we made is left in the parent.
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["p"]);
        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let files = create(&empty, "empty", PluginKind::ImageSource, &sdk).unwrap();
        assert!(files.iter().all(|f| f.is_file()), "{files:?}");
    }
}
