//! The sandbox against hostile plugins. After each misbehaviour the same
//! runtime must still serve a good plugin correctly.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cocoon_host::config::HostConfig;
use cocoon_host::plugin::bindings::ErrorKind;
use cocoon_host::plugin::calls::Platform;
use cocoon_host::plugin::fetch::HostPattern;
use cocoon_host::plugin::registry::{self, sha256_hex, Registry};
use cocoon_host::plugin::runtime::PluginSpec;
use cocoon_host::plugin::{Limits, LoadedPlugin, PluginError, PluginKind, Runtime};
use support::{capture_logs, fixture, wasm, Reply, TestServer};

fn spec(name: &str, limits: Limits, fetch: &[&str]) -> PluginSpec {
    PluginSpec {
        name: name.into(),
        kind: PluginKind::ImageSource,
        limits,
        config: BTreeMap::from([("site".to_string(), "test".to_string())]),
        fetch_hosts: fetch
            .iter()
            .map(|h| HostPattern::parse(h).unwrap())
            .collect(),
    }
}

fn load(
    rt: &Runtime,
    crate_name: &str,
    limits: Limits,
    fetch: &[&str],
) -> Result<LoadedPlugin, PluginError> {
    let bytes = std::fs::read(fixture(crate_name)).unwrap();
    rt.load(spec(crate_name, limits, fetch), &bytes, &sha256_hex(&bytes))
}

fn hostile(rt: &Runtime) -> LoadedPlugin {
    let limits = Limits {
        deadline: Duration::from_millis(300),
        memory_bytes: 32 << 20,
    };
    load(rt, "hostile", limits, &[]).unwrap()
}

/// The same runtime still loads and runs well-behaved plugins.
fn assert_still_serves(rt: &Runtime) {
    let p = hostile(rt);
    let a = p.resolve("ok", &Platform::host()).unwrap();
    assert_eq!(a[0].media_type, "ok");
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::discover(&HostConfig::at(tmp.path()));
    let url = registry.load(rt, "url-source").unwrap();
    let a = url
        .resolve("https://example.com/x.qcow2", &Platform::host())
        .unwrap();
    assert_eq!(a[0].format_hint.as_deref(), Some("qcow2"));
}

fn runtime() -> Runtime {
    Runtime::new(None).unwrap()
}

#[test]
fn infinite_loop_hits_the_deadline() {
    let rt = runtime();
    let p = hostile(&rt);
    let start = Instant::now();
    let err = p.resolve("loop", &Platform::host()).unwrap_err();
    let took = start.elapsed();
    assert!(matches!(err, PluginError::Deadline { .. }), "{err}");
    assert!(err.to_string().contains("plugin hostile"), "{err}");
    assert!(
        took < Duration::from_millis(300) + Duration::from_secs(1),
        "took {took:?}"
    );
    assert!(
        took >= Duration::from_millis(300),
        "returned before the deadline: {took:?}"
    );
    assert_still_serves(&rt);
}

#[test]
fn memory_bomb_hits_the_limit() {
    let rt = runtime();
    let err = hostile(&rt).resolve("bomb", &Platform::host()).unwrap_err();
    assert!(
        matches!(err, PluginError::MemoryLimit { limit_mib: 32, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("plugin hostile"), "{err}");
    assert_still_serves(&rt);
}

#[test]
fn panic_is_a_trap_naming_the_plugin_and_its_message() {
    let rt = runtime();
    let (err, logs) = capture_logs(|| {
        hostile(&rt)
            .resolve("panic", &Platform::host())
            .unwrap_err()
    });
    let msg = err.to_string();
    assert!(matches!(err, PluginError::Trap { .. }), "{msg}");
    assert!(
        msg.contains("plugin hostile") && msg.contains("resolve"),
        "{msg}"
    );
    assert!(msg.contains("panics on purpose"), "{msg}");
    assert!(
        logs.contains("hostile") && logs.contains("panics on purpose"),
        "{logs}"
    );
    assert_still_serves(&rt);
}

#[test]
fn trap_is_reported() {
    let rt = runtime();
    let err = hostile(&rt).resolve("trap", &Platform::host()).unwrap_err();
    assert!(
        matches!(&err, PluginError::Trap { detail, .. } if detail.contains("unreachable")),
        "{err}"
    );
    assert_still_serves(&rt);
}

#[test]
fn filesystem_and_environment_are_empty() {
    let rt = runtime();
    let p = hostile(&rt);
    let err = p.resolve("passwd", &Platform::host()).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            &err,
            PluginError::Returned {
                kind: ErrorKind::Io,
                ..
            }
        ),
        "{msg}"
    );
    assert!(!msg.contains("root:"), "{msg}");
    // The test process has an environment; the plugin must see none of it.
    assert!(std::env::vars().count() > 0);
    let env = p.resolve("env", &Platform::host()).unwrap();
    assert_eq!(env[0].media_type, "[]");
    assert_still_serves(&rt);
}

#[test]
fn sockets_import_is_refused_at_load() {
    let rt = runtime();
    let err = load(
        &rt,
        "sockets",
        Limits::for_kind(PluginKind::ImageSource),
        &[],
    )
    .err()
    .unwrap();
    match &err {
        PluginError::ImportRefused { plugin, import, .. } => {
            assert_eq!(plugin, "sockets");
            assert!(import.starts_with("wasi:sockets/"), "{import}");
        }
        other => panic!("expected an import refusal, got {other}"),
    }
    assert_still_serves(&rt);
}

#[test]
fn a_plugin_of_the_wrong_kind_is_refused() {
    let rt = runtime();
    let bytes = std::fs::read(fixture("hostile")).unwrap();
    let mut s = spec("hostile", Limits::for_kind(PluginKind::DiskPolicy), &[]);
    s.kind = PluginKind::DiskPolicy;
    // An image source imports fetch, which a disk policy may not.
    let err = rt.load(s, &bytes, &sha256_hex(&bytes)).err().unwrap();
    assert!(matches!(err, PluginError::ImportRefused { .. }), "{err}");
    let bytes = std::fs::read(wasm("default-policy")).unwrap();
    let mut s = spec(
        "default-policy",
        Limits::for_kind(PluginKind::ImageSource),
        &[],
    );
    s.kind = PluginKind::ImageSource;
    let err = rt.load(s, &bytes, &sha256_hex(&bytes)).err().unwrap();
    assert!(matches!(err, PluginError::WrongExports { .. }), "{err}");
}

fn write_plugin_dir(root: &Path, name: &str, crate_name: &str, sha: &str, extra: &str) {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let wasm_name = format!("{crate_name}.wasm");
    std::fs::copy(fixture(crate_name), dir.join(&wasm_name)).unwrap();
    std::fs::write(
        dir.join("plugin.toml"),
        format!(
            "name = \"{name}\"\nversion = \"1.0.0\"\nkind = \"image-source\"\napi = \"0.1.0\"\nwasm = \"{wasm_name}\"\nsha256 = \"{sha}\"\n{extra}"
        ),
    )
    .unwrap();
}

#[test]
fn wrong_sha256_in_manifest_is_refused() {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let config = HostConfig::at(tmp.path());
    write_plugin_dir(&config.plugin_dir, "liar", "hostile", &"0".repeat(64), "");
    let registry = Registry::discover(&config);
    assert!(registry.get("liar").is_err());
    let problem = &registry.problems()[0];
    assert!(
        matches!(problem.error, PluginError::DigestMismatch { .. }),
        "{}",
        problem.error
    );
    let err = registry.load(&rt, "liar").err().unwrap();
    assert!(err.to_string().contains("liar"), "{err}");
    let err = registry::verify(&rt, &config.plugin_dir.join("liar"), None)
        .err()
        .unwrap();
    assert!(matches!(err, PluginError::DigestMismatch { .. }), "{err}");

    // Swapping the wasm after discovery is caught at load time too.
    let real = sha256_hex(&std::fs::read(fixture("hostile")).unwrap());
    write_plugin_dir(&config.plugin_dir, "swapped", "hostile", &real, "");
    let registry = Registry::discover(&config);
    std::fs::copy(
        fixture("sockets"),
        config.plugin_dir.join("swapped/hostile.wasm"),
    )
    .unwrap();
    let err = registry.load(&rt, "swapped").err().unwrap();
    assert!(matches!(err, PluginError::DigestMismatch { .. }), "{err}");
    assert_still_serves(&rt);
}

#[test]
fn fetch_is_limited_to_granted_hosts() {
    let other = TestServer::start(vec![("/secret", Reply::ok("secret"))]);
    let server = TestServer::start(vec![
        ("/hello", Reply::ok("hello")),
        ("/away", Reply::redirect(&other.url("/secret"))),
        ("/here", Reply::redirect("/hello")),
    ]);
    let rt = runtime();
    let limits = Limits::for_kind(PluginKind::ImageSource);

    // Nothing granted: denied, and the server never sees a request.
    let p = load(&rt, "hostile", limits, &[]).unwrap();
    let err = p
        .resolve(
            &format!("fetch:{}", server.url("/hello")),
            &Platform::host(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("denied"), "{err}");
    assert_eq!(server.hits("/hello"), 0);

    // Granted this server: allowed; a redirect within it is followed.
    let granted = format!("127.0.0.1:{}", server.port);
    let p = load(&rt, "hostile", limits, &[&granted]).unwrap();
    let a = p
        .resolve(
            &format!("fetch:{}", server.url("/hello")),
            &Platform::host(),
        )
        .unwrap();
    assert_eq!(a[0].media_type, "200 hello");
    let a = p
        .resolve(&format!("fetch:{}", server.url("/here")), &Platform::host())
        .unwrap();
    assert_eq!(a[0].media_type, "200 hello");

    // Another port on the same address is another host.
    let err = p
        .resolve(
            &format!("fetch:{}", other.url("/secret")),
            &Platform::host(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("denied"), "{err}");
    // A redirect to a host not granted is re-checked and denied.
    let err = p
        .resolve(&format!("fetch:{}", server.url("/away")), &Platform::host())
        .unwrap_err();
    assert!(err.to_string().contains("denied"), "{err}");
    assert_eq!(other.hits("/secret"), 0);
    // A body over the plugin's cap (1 MiB for this fixture) is refused.
    let big = TestServer::start(vec![("/big", Reply::ok(vec![b'x'; 2 << 20]))]);
    let big_host = format!("127.0.0.1:{}", big.port);
    let p2 = load(&rt, "hostile", limits, &[&big_host]).unwrap();
    let err = p2
        .resolve(&format!("fetch:{}", big.url("/big")), &Platform::host())
        .unwrap_err();
    assert!(
        err.to_string().contains("larger than 1048576 bytes"),
        "{err}"
    );
    // Plain http to a non-loopback host is refused before any connection.
    let err = p
        .resolve("fetch:http://example.com/", &Platform::host())
        .unwrap_err();
    assert!(err.to_string().contains("only to loopback"), "{err}");
    assert_still_serves(&rt);
}

#[test]
fn declared_and_granted_are_both_required() {
    let server = TestServer::start(vec![("/hello", Reply::ok("hello"))]);
    let host = format!("127.0.0.1:{}", server.port);
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let sha = sha256_hex(&std::fs::read(fixture("hostile")).unwrap());
    let declared = format!("[capabilities]\nfetch = [\"{host}\"]\n");
    let cases = [
        ("declared-only", declared.as_str(), false, false),
        ("granted-only", "", true, false),
        ("both", declared.as_str(), true, true),
    ];
    let mut config = HostConfig::at(tmp.path());
    for (name, extra, grant, _) in &cases {
        write_plugin_dir(&config.plugin_dir, name, "hostile", &sha, extra);
        if *grant {
            let mut s = config.plugin(name);
            s.grant_fetch = vec![host.clone()];
            config.plugins.insert(name.to_string(), s);
        }
    }
    let registry = Registry::discover(&config);
    for (name, _, _, allowed) in cases {
        let p = registry.load(&rt, name).unwrap();
        let r = p.resolve(
            &format!("fetch:{}", server.url("/hello")),
            &Platform::host(),
        );
        assert_eq!(r.is_ok(), allowed, "{name}: {r:?}");
    }
}

#[test]
fn stderr_and_logs_reach_the_host_log_under_the_plugin_name() {
    let rt = runtime();
    let p = hostile(&rt);
    let (r, logs) = capture_logs(|| p.resolve("stderr", &Platform::host()));
    r.unwrap();
    let line = logs
        .lines()
        .find(|l| l.contains("hostile says hello on stderr"))
        .expect(&logs);
    assert!(
        line.contains("plugin=hostile") && line.contains("stderr"),
        "{line}"
    );

    // A plugin that logs without end is cut off at its budget.
    let (r, logs) = capture_logs(|| p.resolve("log:5000", &Platform::host()));
    r.unwrap();
    let spam = logs.lines().filter(|l| l.contains("spam")).count();
    assert_eq!(spam, 1000, "budget");
    assert!(logs.contains("log budget"), "{logs}");

    let cfg = p.resolve("config", &Platform::host()).unwrap();
    assert_eq!(cfg[0].media_type, "site=test");
}

#[test]
fn second_load_deserialises_from_the_compiled_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let limits = Limits::for_kind(PluginKind::ImageSource);
    let rt = Runtime::new(Some(cache.clone())).unwrap();
    let p = load(&rt, "hostile", limits, &[]).unwrap();
    assert!(!p.from_cache());
    assert_eq!(rt.stats().compiled.load(Ordering::Relaxed), 1);
    assert_eq!(rt.stats().cache_hits.load(Ordering::Relaxed), 0);
    drop(rt);

    let rt = Runtime::new(Some(cache.clone())).unwrap();
    let p = load(&rt, "hostile", limits, &[]).unwrap();
    assert!(p.from_cache());
    assert_eq!(rt.stats().compiled.load(Ordering::Relaxed), 0);
    assert_eq!(rt.stats().cache_hits.load(Ordering::Relaxed), 1);
    assert_eq!(p.resolve("ok", &Platform::host()).unwrap().len(), 1);

    let files: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let file = &files[0];
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // A cache file others could have written is never deserialised.
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let rt = Runtime::new(Some(cache.clone())).unwrap();
    load(&rt, "hostile", limits, &[]).unwrap();
    assert_eq!(rt.stats().cache_hits.load(Ordering::Relaxed), 0);
    assert_eq!(rt.stats().compiled.load(Ordering::Relaxed), 1);
    assert_eq!(
        std::fs::metadata(file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // A corrupt one is recompiled and replaced.
    std::fs::write(file, b"not a compiled component").unwrap();
    let rt = Runtime::new(Some(cache.clone())).unwrap();
    let p = load(&rt, "hostile", limits, &[]).unwrap();
    assert_eq!(rt.stats().compiled.load(Ordering::Relaxed), 1);
    assert_eq!(p.resolve("ok", &Platform::host()).unwrap().len(), 1);
    let rt = Runtime::new(Some(cache)).unwrap();
    load(&rt, "hostile", limits, &[]).unwrap();
    assert_eq!(rt.stats().cache_hits.load(Ordering::Relaxed), 1);
}

#[test]
fn converter_and_policy_round_trips() {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::discover(&HostConfig::at(tmp.path()));
    let raw = registry.load(&rt, "raw-converter").unwrap();
    let img = tmp.path().join("disk.raw");
    std::fs::write(&img, vec![7u8; 3 << 20]).unwrap();
    let probe = raw.probe(&[7; 512], &[7; 512], 3 << 20).unwrap().unwrap();
    assert_eq!(probe.format, "raw");
    let mut s = raw.open_image(&img, "raw").unwrap();
    assert_eq!(s.virtual_size(), 3 << 20);
    assert_eq!(s.backing().unwrap(), None);
    let page = s.map(1 << 20, 16).unwrap();
    assert_eq!((page[0].offset, page[0].length), (1 << 20, 2 << 20));
    assert!(s.map(3 << 20, 16).unwrap().is_empty());
    drop(s);
    let err = raw.open_image(&img, "qcow2").err().unwrap();
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
    let data: Vec<u8> = (0..65536u32).map(|i| i.to_le_bytes()[0]).collect();
    let c = cocoon_host::plugin::calls::Compressed {
        source_offset: 0,
        source_length: 65536,
        codec: 0,
    };
    assert_eq!(raw.decode(c, &data, 65536).unwrap(), data);
    let err = raw.decode(c, &data, 100).unwrap_err();
    assert!(matches!(err, PluginError::Returned { .. }), "{err}");
    // The kind is checked before any call.
    let err = raw.schemes().unwrap_err();
    assert!(matches!(err, PluginError::WrongKind { .. }), "{err}");
}

#[test]
fn source_reader_is_read_and_seek_over_the_host_handle() {
    let rt = runtime();
    let bytes = std::fs::read(fixture("reader")).unwrap();
    let mut s = spec("reader", Limits::for_kind(PluginKind::FormatConverter), &[]);
    s.kind = PluginKind::FormatConverter;
    let p = rt.load(s, &bytes, &sha256_hex(&bytes)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("data");
    // Bigger than one host read, and not a multiple of anything.
    let data: Vec<u8> = (0..(9u64 << 20) + 777)
        .map(|i| ((i * 2654435761) >> 13).to_le_bytes()[0])
        .collect();
    std::fs::write(&img, &data).unwrap();
    let mut hash = 0xcbf29ce484222325u64;
    for b in &data {
        hash ^= *b as u64;
        hash = hash.wrapping_mul(0x100000001b3);
    }
    let mut session = p.open_image(&img, "any").unwrap();
    assert_eq!(session.virtual_size(), data.len() as u64);
    let summary = session.backing().unwrap().unwrap();
    assert_eq!(
        summary,
        format!("{hash:016x} oversized-refused=true negative-seek-refused=true")
    );
}

#[test]
fn cold_and_warm_calls_check_answers_alike() {
    let rt = runtime();
    let bytes = std::fs::read(fixture("hostile")).unwrap();
    let mut s = spec("hostile", Limits::for_kind(PluginKind::ImageSource), &[]);
    s.config.insert("schemes".into(), "ok,Not A Scheme".into());
    let p = rt.load(s, &bytes, &sha256_hex(&bytes)).unwrap();
    let cold = p.schemes().unwrap_err();
    let warm = p.source_instance().unwrap().schemes().unwrap_err();
    for err in [cold, warm] {
        assert!(
            matches!(&err, PluginError::InvalidAnswer { call, detail, .. }
                if call == "schemes" && detail.contains("\"Not A Scheme\" is not a URL scheme")),
            "{err}"
        );
    }

    // decode's bound holds on a kept instance as on a fresh one: the host
    // never asks a plugin for more than MAX_DECODED bytes.
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::discover(&HostConfig::at(tmp.path()));
    let raw = registry.load(&rt, "raw-converter").unwrap();
    let c = cocoon_host::plugin::calls::Compressed {
        source_offset: 0,
        source_length: 4,
        codec: 0,
    };
    let too_long = cocoon_host::plugin::calls::MAX_DECODED + 1;
    let mut warm = raw.converter_instance().unwrap();
    for err in [
        raw.decode(c, &[0; 4], too_long).unwrap_err(),
        warm.decode(c, &[0; 4], too_long).unwrap_err(),
    ] {
        assert!(
            matches!(&err, PluginError::InvalidAnswer { call, detail, .. }
                if call == "decode" && detail.contains("over")),
            "{err}"
        );
    }
    // The kept instance still serves after a refused request.
    assert_eq!(warm.decode(c, &[1, 2, 3, 4], 4).unwrap(), [1, 2, 3, 4]);
}

#[test]
fn built_in_plugins_load_from_code_compiled_at_build_time() {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::discover(&HostConfig::at(tmp.path()));
    let builtins: Vec<String> = registry
        .list()
        .filter(|p| p.origin == cocoon_host::plugin::PluginOrigin::Builtin)
        .map(|p| p.name().to_string())
        .collect();
    assert!(builtins.len() >= 9, "{builtins:?}");
    for name in &builtins {
        let p = registry.load(&rt, name).unwrap();
        assert!(
            p.from_embedded(),
            "{name} was not loaded from embedded code"
        );
    }
    assert_eq!(rt.stats().compiled.load(Ordering::Relaxed), 0);
    assert_eq!(
        rt.stats().embedded.load(Ordering::Relaxed),
        builtins.len() as u64
    );
    // It runs: the embedded qcow2 converter probes a qcow2 header.
    let qcow2 = registry.load(&rt, "qcow2").unwrap();
    let mut head = b"QFI\xfb\0\0\0\x03".to_vec();
    head.resize(512, 0);
    let probe = qcow2.probe(&head, &[], 1 << 20).unwrap();
    assert_eq!(probe.map(|p| p.format), Some("qcow2".to_string()));
    // A plugin from anywhere else is compiled (never trusted pre-built).
    load(
        &rt,
        "hostile",
        Limits::for_kind(PluginKind::ImageSource),
        &[],
    )
    .unwrap();
    assert_eq!(rt.stats().compiled.load(Ordering::Relaxed), 1);
}
