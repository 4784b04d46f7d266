//! Plugin API versions: the host implements cocoon:plugin@0.2.1, loads
//! 0.2.0 plugins unchanged (0.2.1 only added the layer-reader world),
//! still loads image sources and converters built against 0.1.x (their
//! interfaces did not change), and refuses a 0.1 disk policy or an unknown
//! version with an error naming both versions.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use cocoon_host::config::HostConfig;
use cocoon_host::convert::{self, ConvertRequest, NoBacking, Silent};
use cocoon_host::plugin::bindings::ErrorKind;
use cocoon_host::plugin::calls::{ExtentKind, Platform};
use cocoon_host::plugin::registry::{self, sha256_hex, Registry};
use cocoon_host::plugin::runtime::PluginSpec;
use cocoon_host::plugin::{ApiVersion, Limits, LoadedPlugin, PluginError, PluginKind, Runtime};
use support::{capture_logs, fixture};

fn spec(name: &str, kind: PluginKind) -> PluginSpec {
    PluginSpec {
        name: name.into(),
        kind,
        limits: Limits {
            deadline: Duration::from_secs(5),
            ..Limits::for_kind(kind)
        },
        config: BTreeMap::from([("base".to_string(), "https://old.example".to_string())]),
        fetch_hosts: Vec::new(),
    }
}

fn load(rt: &Runtime, name: &str, kind: PluginKind) -> Result<LoadedPlugin, PluginError> {
    let bytes = std::fs::read(fixture(name)).unwrap();
    rt.load(spec(name, kind), &bytes, &sha256_hex(&bytes))
}

#[test]
fn a_0_1_image_source_keeps_loading_with_its_host_imports() {
    let rt = Runtime::new(None).unwrap();
    let p = load(&rt, "legacy-source", PluginKind::ImageSource).unwrap();
    assert_eq!(p.api(), ApiVersion(0, 1, 0));
    assert!(p.imports().iter().any(|i| i == "cocoon:plugin/host@0.1.0"));
    assert_eq!(p.schemes().unwrap(), ["legacy"]);
    // config-get and log of 0.1 reach the host.
    let (a, logs) = capture_logs(|| p.resolve("legacy://alpine", &Platform::host()));
    let a = a.unwrap();
    assert_eq!(a[0].url, "https://old.example/alpine.raw");
    assert_eq!(a[0].media_type, "linux/amd64");
    assert!(
        logs.contains("legacy source resolving") && logs.contains("legacy-source"),
        "{logs}"
    );
    // Its errors keep their kind across the version boundary.
    let err = p.resolve("other://x", &Platform::host()).unwrap_err();
    assert!(
        matches!(
            &err,
            PluginError::Returned {
                kind: ErrorKind::Unsupported,
                ..
            }
        ),
        "{err}"
    );
    // 0.1's fetch goes through the same policy: nothing granted, denied.
    let err = p
        .resolve("fetch:https://example.com/", &Platform::host())
        .unwrap_err();
    assert!(
        matches!(&err, PluginError::Returned { kind: ErrorKind::InvalidInput, message, .. } if message.contains("denied")),
        "{err}"
    );
}

#[test]
fn a_0_1_converter_maps_decodes_and_converts() {
    let rt = Runtime::new(None).unwrap();
    let p = load(&rt, "legacy-converter", PluginKind::FormatConverter).unwrap();
    assert_eq!(p.api(), ApiVersion(0, 1, 0));
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("disk.legacy");
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let virtual_size = 1u64 << 20;
    let mut file = b"LEGACY01".to_vec();
    file.extend_from_slice(&virtual_size.to_le_bytes());
    file.extend_from_slice(&data);
    std::fs::write(&img, &file).unwrap();

    let probe = p
        .probe(&file[..512], &[], file.len() as u64)
        .unwrap()
        .unwrap();
    assert_eq!((probe.format.as_str(), probe.confidence), ("legacy", 100));
    let mut s = p.open_image(&img, "legacy").unwrap();
    assert_eq!(s.virtual_size(), virtual_size);
    let page = s.map(0, 16).unwrap();
    assert_eq!(page.len(), 2);
    assert!(matches!(page[0].kind, ExtentKind::Data(16)));
    assert_eq!(page[0].length, data.len() as u64);
    assert!(matches!(page[1].kind, ExtentKind::Zero));
    drop(s);
    let c = cocoon_host::plugin::calls::Compressed {
        source_offset: 16,
        source_length: 4,
        codec: 0,
    };
    assert_eq!(p.decode(c, &[1, 2, 3, 4], 4).unwrap(), [1, 2, 3, 4]);

    // Installed in the plugin directory, it takes part in a real
    // conversion beside the built-in converters.
    let config = HostConfig::at(&tmp.path().join("state"));
    let manifest = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/plugins/legacy-converter/plugin.toml"
    );
    let fixture_path = fixture("legacy-converter");
    let (report, _) =
        registry::verify(&rt, &fixture_path, Some(std::path::Path::new(manifest))).unwrap();
    registry::install(&config, &report).unwrap();
    let registry = Registry::discover(&config);
    let out = tmp.path().join("out.raw");
    let r = convert::convert(
        &rt,
        &registry,
        &ConvertRequest {
            source: &img,
            dest: &out,
            format: None,
            backing: &NoBacking,
            jobs: 1,
        },
        &Silent,
    )
    .unwrap();
    assert_eq!(
        (r.format.as_str(), r.converter.as_str()),
        ("legacy", "legacy-converter")
    );
    let converted = std::fs::read(&out).unwrap();
    assert_eq!(converted.len() as u64, virtual_size);
    assert_eq!(&converted[..data.len()], &data[..]);
    assert!(converted[data.len()..].iter().all(|&b| b == 0));
}

fn assert_version_refused(err: PluginError, plugin_api: &str) {
    let msg = err.to_string();
    match &err {
        PluginError::ApiVersion {
            plugin_api: v,
            host_api,
            ..
        } => {
            assert_eq!(v, plugin_api);
            assert_eq!(host_api, "0.2.1");
        }
        other => panic!("expected a version refusal, got {other}"),
    }
    assert!(
        msg.contains(&format!("cocoon:plugin@{plugin_api}")) && msg.contains("cocoon:plugin@0.2.1"),
        "{msg}"
    );
}

#[test]
fn a_0_2_0_disk_policy_loads_and_answers_on_the_0_2_1_host() {
    use cocoon_host::plugin::policy::{ImageKind, PolicyRequest};
    let rt = Runtime::new(None).unwrap();
    let p = load(&rt, "v020-policy", PluginKind::DiskPolicy).unwrap();
    assert_eq!(p.api(), ApiVersion(0, 2, 0));
    assert!(p.imports().iter().any(|i| i == "cocoon:plugin/host@0.2.0"));
    let request = |name: &str| PolicyRequest {
        name: name.into(),
        image: ImageKind::Disk {
            digest: format!("sha256:{}", "0".repeat(64)),
            virtual_size: 1 << 30,
        },
        cow_size: None,
        data_disks: Vec::new(),
        cidata: false,
        settings: BTreeMap::new(),
    };
    let mut policy = p.policy_instance().unwrap();
    let (v, logs) = capture_logs(|| policy.validate(&request("refused")));
    let v = v.unwrap();
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].message, "refused by the 0.2.0 policy");
    assert!(policy.validate(&request("fine")).unwrap().is_empty());
    let _ = logs;
    let (plan, logs) = capture_logs(|| p.policy_instance().unwrap().plan(&request("fine")));
    assert!(logs.contains("v0.2.0 policy planning"), "{logs}");
    let plan = plan.unwrap();
    assert_eq!(plan.len(), 1);
    assert_eq!(plan[0].name, "cocoon-root");
}

#[test]
fn a_layer_reader_needs_0_2_1() {
    // The built-in tar-layer is one, built against this host's version.
    let config = HostConfig::at(tempfile::tempdir().unwrap().path());
    let rt = Runtime::new(None).unwrap();
    let p = Registry::discover(&config).load(&rt, "tar-layer").unwrap();
    assert_eq!(
        (p.kind(), p.api()),
        (PluginKind::LayerReader, ApiVersion(0, 2, 1))
    );
    // A 0.2.0 component cannot be one: the world is new in 0.2.1.
    let err = load(&rt, "v020-policy", PluginKind::LayerReader)
        .err()
        .unwrap();
    assert!(
        matches!(&err, PluginError::ApiVersion { plugin_api, .. } if plugin_api == "0.2.0")
            && err
                .to_string()
                .contains("layer-reader plugins of 0.2.x from 0.2.1"),
        "{err}"
    );
}

#[test]
fn a_0_1_disk_policy_is_refused_naming_both_versions() {
    let rt = Runtime::new(None).unwrap();
    let err = load(&rt, "legacy-policy", PluginKind::DiskPolicy)
        .err()
        .unwrap();
    assert_version_refused(err, "0.1.0");
    let msg = load(&rt, "legacy-policy", PluginKind::DiskPolicy)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("plugin legacy-policy") && msg.contains("disk-policy plugins of 0.2.x"),
        "{msg}"
    );
}

#[test]
fn an_unknown_version_is_refused_naming_both_versions() {
    let rt = Runtime::new(None).unwrap();
    let err = load(&rt, "future-source", PluginKind::ImageSource)
        .err()
        .unwrap();
    assert_version_refused(err, "0.3.0");
    assert!(err_text(&rt).contains("image-source plugins of 0.1.x and 0.2.x"));
}

fn err_text(rt: &Runtime) -> String {
    load(rt, "future-source", PluginKind::ImageSource)
        .err()
        .unwrap()
        .to_string()
}

#[test]
fn a_manifest_that_disagrees_with_its_component_is_refused() {
    let rt = Runtime::new(None).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let manifest = tmp.path().join("plugin.toml");
    std::fs::write(
        &manifest,
        "name = \"liar\"\nversion = \"1.0.0\"\nkind = \"format-converter\"\napi = \"0.2.0\"\n",
    )
    .unwrap();
    let err = registry::verify(&rt, &fixture("legacy-converter"), Some(&manifest))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("api = \"0.2.0\"") && err.contains("built against cocoon:plugin@0.1.0"),
        "{err}"
    );
}
