//! The plugin CLI as an author and an operator use it: verify, install,
//! list, inspect, call; grants from the config file; clear failures.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::{fixture, wasm, Reply, TestServer};

struct Host {
    dir: tempfile::TempDir,
}

impl Host {
    fn new() -> Self {
        let host = Host {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::write(host.config(), "").unwrap();
        host
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_cocoon-host"))
            .args(args)
            .env("COCOON_STATE_DIR", self.dir.path().join("state"))
            .env("COCOON_CONFIG", self.config())
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    }

    fn ok_json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

fn example_manifest() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/examples/site-source/plugin.toml")
}

#[test]
fn author_flow_verify_install_call() {
    let host = Host::new();
    std::fs::write(host.config(), "").unwrap();
    let wasm = wasm("site-source");
    let manifest = example_manifest();
    let (w, m) = (wasm.to_str().unwrap(), manifest.to_str().unwrap());

    let report = host.ok_json(&["plugin", "verify", w, "--manifest", m, "-o", "json"]);
    let sha = cocoon_host::plugin::registry::sha256_hex(&std::fs::read(&wasm).unwrap());
    assert_eq!(report["sha256"], sha);
    assert_eq!(report["sha256_pinned"], serde_json::Value::Null);
    let imports = report["imports"].to_string();
    assert!(imports.contains("cocoon:plugin/fetch"), "{imports}");
    assert!(report["smoke_call"].as_str().unwrap().contains("site"));

    let installed = host.ok_json(&["plugin", "install", w, "--manifest", m, "-o", "json"]);
    assert_eq!(installed["sha256"], sha);
    let pinned = std::fs::read_to_string(
        host.dir
            .path()
            .join("state/plugins/site-source/plugin.toml"),
    )
    .unwrap();
    assert!(pinned.contains(&sha), "{pinned}");

    let list = host.ok_json(&["plugin", "list", "-o", "json"]);
    let names: Vec<&str> = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for n in [
        "default-policy",
        "raw-converter",
        "site-source",
        "url-source",
    ] {
        assert!(names.contains(&n), "{names:?}");
    }

    // Declared but not granted: the call is denied and the server untouched.
    let catalog = r#"{"images":{"alpine":{"url":"https://images.example/alpine.qcow2","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","format":"qcow2"}}}"#;
    let server = TestServer::start(vec![("/catalog.json", Reply::ok(catalog))]);
    let settings = format!(
        "config = {{ catalog = \"{}\" }}\n",
        server.url("/catalog.json")
    );
    std::fs::write(host.config(), format!("[plugins.site-source]\n{settings}")).unwrap();
    let out = host.run(&["plugin", "call", "site-source", "resolve", "site://alpine"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("site-source") && err.contains("denied"),
        "{err}"
    );
    assert_eq!(server.hits("/catalog.json"), 0);

    // Granted: resolved through the host's fetch.
    std::fs::write(
        host.config(),
        format!(
            "[plugins.site-source]\ngrant_fetch = [\"127.0.0.1:{}\"]\n{settings}",
            server.port
        ),
    )
    .unwrap();
    let artifacts = host.ok_json(&[
        "plugin",
        "call",
        "site-source",
        "resolve",
        "site://alpine",
        "-o",
        "json",
    ]);
    assert_eq!(artifacts[0]["url"], "https://images.example/alpine.qcow2");
    assert_eq!(artifacts[0]["format_hint"], "qcow2");
    assert_eq!(server.hits("/catalog.json"), 1);
    let out = host.run(&["plugin", "call", "site-source", "resolve", "site://nope"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"nope\" is not in catalog"));

    let inspect = host.ok_json(&["plugin", "inspect", "site-source", "-o", "json"]);
    assert_eq!(
        inspect["effective_fetch"][0],
        format!("127.0.0.1:{}", server.port)
    );
    assert_eq!(inspect["limits"]["deadline_ms"], 30000);
}

#[test]
fn refusals_are_clear_and_exit_nonzero() {
    let host = Host::new();
    let dir = host.dir.path();
    let manifest = dir.join("sockets.toml");
    std::fs::write(
        &manifest,
        "name = \"sockets\"\nversion = \"0.1.0\"\nkind = \"image-source\"\napi = \"0.1.0\"\n",
    )
    .unwrap();
    let w = fixture("sockets");
    let out = host.run(&[
        "plugin",
        "verify",
        w.to_str().unwrap(),
        "--manifest",
        manifest.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("plugin sockets: import wasi:sockets/"),
        "{err}"
    );

    std::fs::write(
        &manifest,
        "name = \"x\"\nversion = \"0.1\"\nkind = \"image-source\"\napi = \"0.1.0\"\n",
    )
    .unwrap();
    let out = host.run(&[
        "plugin",
        "verify",
        w.to_str().unwrap(),
        "--manifest",
        manifest.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sockets.toml: version = \"0.1\""), "{err}");

    std::fs::write(host.config(), "[plugins.x]\nbogus = 1\n").unwrap();
    let out = host.run(&["plugin", "list"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("config.toml") && err.contains("bogus"),
        "{err}"
    );
    std::fs::write(host.config(), "").unwrap();

    let out = host.run(&["plugin", "call", "nosuch", "schemes"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no plugin named \"nosuch\""));
    let out = host.run(&["plugin", "call", "default-policy", "schemes"]);
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("is a disk-policy plugin, not a image-source one"));

    // An image reference no source resolves is refused, naming it.
    let out = host.run(&["run", "no-such-image"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-image"));
}

#[test]
fn policy_calls_read_a_request_file() {
    let host = Host::new();
    let req = host.dir.path().join("req.json");
    let r = req.to_str().unwrap();
    std::fs::write(
        &req,
        r#"{"name":"vm","image":{"layered":{"layers":["sha256:a"]}},"cidata":true,"settings":{"cow_size":"1073741824"}}"#,
    )
    .unwrap();
    let plan = host.ok_json(&["plugin", "call", "default-policy", "plan", r, "-o", "json"]);
    let roles: Vec<&str> = plan
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["layer", "cow", "cidata"]);
    assert_eq!(plan[1]["size_bytes"], 1073741824u64);

    // Violations: validate lists them and exits 1; plan refuses.
    std::fs::write(
        &req,
        r#"{"name":"vm","image":{"layered":{"layers":[]}},"settings":{"cow_size":"big"}}"#,
    )
    .unwrap();
    let out = host.run(&[
        "plugin",
        "call",
        "default-policy",
        "validate",
        r,
        "-o",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["field"], "settings.cow_size");
    let out = host.run(&["plugin", "call", "default-policy", "plan", r]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("breaks site rules: settings.cow_size: \"big\" is not a size"),
        "{err}"
    );

    std::fs::write(&req, "{").unwrap();
    let out = host.run(&["plugin", "call", "default-policy", "plan", r]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("VM request") && err.contains("req.json"),
        "{err}"
    );
}

/// `-` reads the request from stdin, bounded like a request file: a
/// writer that never stops is cut off at the limit with a clear error,
/// not read into memory without end.
#[test]
fn policy_calls_read_stdin_up_to_the_limit() {
    use std::io::Write;
    use std::process::Stdio;
    let host = Host::new();
    let call = |stdin: &mut dyn FnMut(&mut std::process::ChildStdin)| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cocoon-host"))
            .args([
                "plugin",
                "call",
                "default-policy",
                "plan",
                "-",
                "-o",
                "json",
            ])
            .env("COCOON_STATE_DIR", host.dir.path().join("state"))
            .env("COCOON_CONFIG", host.config())
            .env_remove("RUST_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut pipe = child.stdin.take().unwrap();
        stdin(&mut pipe);
        drop(pipe);
        child.wait_with_output().unwrap()
    };

    let out = call(&mut |p| {
        p.write_all(br#"{"name":"vm","image":{"layered":{"layers":["sha256:a"]}}}"#)
            .unwrap()
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan[0]["role"], "layer");

    // Whitespace is valid JSON padding, so only the bound can refuse this:
    // 4 MiB of it, written until the reader stops reading (a broken pipe
    // once it has refused, which is what this test wants).
    let out = call(&mut |p| {
        let chunk = [b' '; 64 << 10];
        for _ in 0..64 {
            if p.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("reading the VM request from stdin")
            && err.contains("over the 1048576-byte limit"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

/// The code blocks of the README's "Writing a plugin" section, in order.
fn readme_blocks() -> Vec<(String, String)> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let start = readme
        .find("## Writing a plugin")
        .expect("README has the section");
    let section = &readme[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let mut blocks = Vec::new();
    let mut lines = section.lines();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if let Some(lang) = t.strip_prefix("```") {
            let indent = line.len() - t.len();
            let mut body = String::new();
            for l in lines.by_ref() {
                if l.trim_start().starts_with("```") {
                    break;
                }
                body.push_str(l.get(indent..).unwrap_or(""));
                body.push('\n');
            }
            blocks.push((lang.to_string(), body));
        }
    }
    blocks
}

/// Follows the README walk-through: the crate, the code and the manifest
/// it shows are built, verified, installed and called.
#[test]
fn readme_plugin_walkthrough_works() {
    let blocks = readme_blocks();
    let find = |lang: &str, needle: &str| {
        blocks
            .iter()
            .find(|(l, b)| l == lang && b.contains(needle))
            .unwrap_or_else(|| panic!("README block {lang} with {needle:?}"))
            .1
            .clone()
    };
    let cargo_toml = find("toml", "crate-type");
    let lib_rs = find("rust", "export_image_source!");
    let manifest = find("toml", "kind = \"image-source\"");

    let host = Host::new();
    let krate = host.dir.path().join("my-source");
    std::fs::create_dir_all(krate.join("src")).unwrap();
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/sdk");
    let cargo_toml = cargo_toml.replace("/path/to/cocoon-host/plugins/sdk", sdk.to_str().unwrap());
    std::fs::write(
        krate.join("Cargo.toml"),
        format!("[package]\nname = \"my-source\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n\n{cargo_toml}"),
    )
    .unwrap();
    std::fs::write(krate.join("src/lib.rs"), lib_rs).unwrap();
    std::fs::write(krate.join("plugin.toml"), manifest).unwrap();

    // Share the wasm build directory of the host's own plugins, so the SDK
    // and wit-bindgen are not rebuilt.
    let target = PathBuf::from(env!("COCOON_FIRST_PARTY_WASM_DIR"))
        .ancestors()
        .nth(2)
        .unwrap()
        .to_path_buf();
    let status = Command::new("cargo")
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .current_dir(&krate)
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .unwrap();
    assert!(status.success());
    let wasm = target.join("wasm32-wasip2/release/my_source.wasm");
    let (w, m) = (wasm.to_str().unwrap(), krate.join("plugin.toml"));
    let m = m.to_str().unwrap();
    host.ok_json(&["plugin", "verify", w, "--manifest", m, "-o", "json"]);
    host.ok_json(&["plugin", "install", w, "--manifest", m, "-o", "json"]);
    std::fs::write(
        host.config(),
        "[plugins.my-source]\nconfig = { base = \"https://images.example.com\" }\n",
    )
    .unwrap();
    let a = host.ok_json(&[
        "plugin",
        "call",
        "my-source",
        "resolve",
        "my://alpine",
        "-o",
        "json",
    ]);
    assert_eq!(a[0]["url"], "https://images.example.com/alpine.qcow2");
    let out = host.run(&["plugin", "call", "my-source", "resolve", "other://x"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not my://NAME"));
}

#[test]
fn a_reader_that_closes_stdout_early_ends_the_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let host = Host::new();
    // A pipe whose reader is gone before the command writes, as in
    // `cocoon-host plugin list | head -0`.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_cocoon-host"))
        .args(["plugin", "list", "-o", "json"])
        .env("COCOON_STATE_DIR", host.dir.path().join("state"))
        .env("COCOON_CONFIG", host.config())
        .env_remove("RUST_LOG")
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
    assert_eq!(out.status.code(), Some(141), "{:?}", out.status.signal());
}
