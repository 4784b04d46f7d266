//! Resolves `http://` and `https://` URLs into one artifact. A digest is
//! pinned with an `@sha256:<hex>` suffix; the host refuses any other bytes.

use cocoon_plugin_sdk::image_source::*;

struct UrlSource;

/// Splits a trailing `@sha256:<64 hex>` off a URL.
fn split_digest(reference: &str) -> Result<(&str, Option<String>), Error> {
    let Some((url, digest)) = reference.rsplit_once("@sha256:") else {
        return Ok((reference, None));
    };
    if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::invalid_input(format!(
            "digest in {reference:?} is not sha256:<64 hex digits>"
        )));
    }
    Ok((url, Some(format!("sha256:{}", digest.to_ascii_lowercase()))))
}

/// A disk-format hint from the file name; compression suffixes are peeled
/// off first because the host decompresses before probing.
fn format_hint(url: &str) -> Option<String> {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let mut name = path.rsplit('/').next().unwrap_or(path);
    for suffix in [".xz", ".gz", ".zst"] {
        name = name.strip_suffix(suffix).unwrap_or(name);
    }
    let ext = name.rsplit_once('.')?.1.to_ascii_lowercase();
    let hint = match ext.as_str() {
        "qcow2" | "qcow" => "qcow2",
        "vmdk" => "vmdk",
        "vhdx" => "vhdx",
        "vhd" | "vpc" => "vpc",
        "vdi" => "vdi",
        "raw" | "img" => "raw",
        _ => return None,
    };
    Some(hint.to_string())
}

impl ImageSource for UrlSource {
    fn schemes() -> Vec<String> {
        vec!["http".into(), "https".into()]
    }

    fn resolve(reference: &str, _platform: Platform) -> Result<Vec<Artifact>, Error> {
        let (url, digest) = split_digest(reference)?;
        let rest = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"))
            .ok_or_else(|| Error::unsupported(format!("{reference:?} is not an http(s) URL")))?;
        if rest.is_empty() || rest.starts_with('/') {
            return Err(Error::invalid_input(format!("{reference:?} has no host")));
        }
        Ok(vec![Artifact {
            url: url.to_string(),
            digest,
            size: None,
            media_type: "application/octet-stream".into(),
            format_hint: format_hint(url),
            headers: Vec::new(),
        }])
    }
}

cocoon_plugin_sdk::export_image_source!(UrlSource);
