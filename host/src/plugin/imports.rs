//! Which imports a component of each kind may have. Checked when a plugin
//! is loaded or installed, before it is ever instantiated.

use super::api::ApiVersion;
use super::manifest::PluginKind;

/// Interfaces every plugin may import. Rust's std for wasm32-wasip2 imports
/// the CLI, clock, random and filesystem interfaces even when the plugin
/// never uses them; they are linked to a WASI context with nothing granted
/// (no preopens, no environment, stdin closed).
const COMMON: &[&str] = &[
    "cocoon:plugin/types",
    "cocoon:plugin/host",
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:clocks/monotonic-clock",
    "wasi:clocks/wall-clock",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
    "wasi:filesystem/types",
    "wasi:filesystem/preopens",
];

/// Why an import of a plugin of `kind` built against `api` is refused.
pub fn refusal(kind: PluginKind, api: ApiVersion, import: &str) -> Option<&'static str> {
    let (name, version) = import.split_once('@').unwrap_or((import, ""));
    if name.starts_with("wasi:sockets/") {
        return Some("plugins never get sockets; image sources fetch through the host");
    }
    if name.starts_with("wasi:http/") {
        return Some("plugins never get wasi:http; image sources fetch through the host");
    }
    if name.starts_with("cocoon:plugin/")
        && ApiVersion::parse(version).is_none_or(|v| (v.0, v.1) != (api.0, api.1))
    {
        return Some("another plugin API version than the interface the plugin exports");
    }
    if name.starts_with("wasi:") && !version.starts_with("0.2.") {
        return Some("only WASI 0.2 is linked");
    }
    let kind_specific = match kind {
        PluginKind::ImageSource => "cocoon:plugin/fetch",
        PluginKind::FormatConverter | PluginKind::LayerReader => "cocoon:plugin/source",
        PluginKind::DiskPolicy => "",
    };
    if COMMON.contains(&name) || name == kind_specific {
        return None;
    }
    Some(match name {
        "cocoon:plugin/fetch" => "only image-source plugins may fetch",
        "cocoon:plugin/source" => "only format converters and layer readers read sources",
        _ => "not in the allowlist of this plugin kind",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use PluginKind::*;

    #[test]
    fn allowlist_table() {
        let v1 = ApiVersion(0, 1, 0);
        let cases: &[(PluginKind, &str, bool)] = &[
            (ImageSource, "cocoon:plugin/host@0.1.0", true),
            (ImageSource, "cocoon:plugin/fetch@0.1.0", true),
            (ImageSource, "cocoon:plugin/fetch@0.2.0", false),
            (ImageSource, "cocoon:plugin/source@0.1.0", false),
            (FormatConverter, "cocoon:plugin/source@0.1.3", true),
            (FormatConverter, "cocoon:plugin/fetch@0.1.0", false),
            (DiskPolicy, "cocoon:plugin/fetch@0.1.0", false),
            (LayerReader, "cocoon:plugin/source@0.1.0", true),
            (LayerReader, "cocoon:plugin/fetch@0.1.0", false),
            (DiskPolicy, "cocoon:plugin/source@0.1.0", false),
            (DiskPolicy, "wasi:io/streams@0.2.6", true),
            (DiskPolicy, "wasi:filesystem/preopens@0.2.0", true),
            (ImageSource, "wasi:sockets/tcp@0.2.6", false),
            (ImageSource, "wasi:sockets/ip-name-lookup@0.2.6", false),
            (ImageSource, "wasi:http/outgoing-handler@0.2.6", false),
            (ImageSource, "wasi:io/streams@0.3.0", false),
            (ImageSource, "example:evil/thing@1.0.0", false),
        ];
        for (kind, import, ok) in cases {
            assert_eq!(refusal(*kind, v1, import).is_none(), *ok, "{kind} {import}");
        }
        assert!(refusal(ImageSource, v1, "wasi:sockets/tcp@0.2.6")
            .unwrap()
            .contains("sockets"));
        let v2 = ApiVersion(0, 2, 0);
        assert!(refusal(DiskPolicy, v2, "cocoon:plugin/host@0.2.1").is_none());
        assert!(refusal(DiskPolicy, v2, "cocoon:plugin/host@0.1.0").is_some());
        assert!(refusal(DiskPolicy, v2, "cocoon:plugin/host").is_some());
    }
}
