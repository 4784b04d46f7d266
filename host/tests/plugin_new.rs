//! `plugin new` for each kind: the crate it writes builds for
//! wasm32-wasip2 as written, passes `plugin verify`, installs, and answers
//! real calls through the CLI (a resolve, a conversion, a disk plan).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn ok_json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }

    /// `plugin new NAME --kind KIND`, then build, verify and install it.
    fn new_plugin(&self, name: &str, kind: &str) -> PathBuf {
        let dir = self.dir.path().join(name);
        let created = self.ok_json(&[
            "plugin",
            "new",
            name,
            "--kind",
            kind,
            "--path",
            dir.to_str().unwrap(),
            "-o",
            "json",
        ]);
        for f in ["Cargo.toml", "plugin.toml", "src/lib.rs", "Cargo.lock"] {
            assert!(dir.join(f).is_file(), "{kind}: {f} missing");
        }
        // Shared by the three crates so their common dependencies build once.
        let target = support::target_dir().join("wasm-plugin-new");
        support::build_wasm(&dir.join("Cargo.toml"), &target, &[]);
        let wasm = target
            .join("wasm32-wasip2/release")
            .join(format!("{}.wasm", name.replace('-', "_")));
        assert_eq!(
            created["wasm"],
            format!(
                "target/wasm32-wasip2/release/{}.wasm",
                name.replace('-', "_")
            )
        );
        let (w, m) = (wasm.to_str().unwrap(), dir.join("plugin.toml"));
        let m = m.to_str().unwrap();
        let report = self.ok_json(&["plugin", "verify", w, "--manifest", m, "-o", "json"]);
        assert_eq!(report["manifest"]["kind"], kind);
        self.ok_json(&["plugin", "install", w, "--manifest", m, "-o", "json"]);
        wasm
    }
}

#[test]
fn a_new_image_source_builds_verifies_and_resolves() {
    let host = Host::new();
    host.new_plugin("my-source", "image-source");
    std::fs::write(
        host.config(),
        "[plugins.my-source]\nconfig = { base = \"https://images.example.com/\" }\n",
    )
    .unwrap();
    assert_eq!(
        host.ok(&["plugin", "call", "my-source", "schemes"]),
        "my-source\n"
    );
    let a = host.ok_json(&[
        "plugin",
        "call",
        "my-source",
        "resolve",
        "my-source://alpine",
        "-o",
        "json",
    ]);
    assert_eq!(a[0]["url"], "https://images.example.com/alpine.qcow2");
    assert_eq!(a[0]["format_hint"], "qcow2");
    let out = host.run(&["plugin", "call", "my-source", "resolve", "other://x"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("is not my-source://NAME"),
        "{err}"
    );
}

#[test]
fn a_new_format_converter_builds_verifies_and_converts() {
    let host = Host::new();
    host.new_plugin("toy-format", "format-converter");
    // An image of the template's format: header, data at 1024, the rest zeros.
    let img = host.dir.path().join("disk.toy");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let virtual_size = 4u64 << 20;
    let mut file = vec![0u8; 1024];
    file[..8].copy_from_slice(b"TOY_FORM");
    file[8..16].copy_from_slice(&virtual_size.to_le_bytes());
    file[16..24].copy_from_slice(&1024u64.to_le_bytes());
    file.extend_from_slice(&data);
    std::fs::write(&img, &file).unwrap();
    let i = img.to_str().unwrap();

    let probe = host.ok_json(&["plugin", "call", "toy-format", "probe", i, "-o", "json"]);
    assert_eq!(probe["format"], "toy-format");
    let map = host.ok_json(&[
        "plugin",
        "call",
        "toy-format",
        "map",
        i,
        "--format",
        "toy-format",
        "-o",
        "json",
    ]);
    assert_eq!(map["virtual_size"], virtual_size);
    assert_eq!(map["extents"][0]["kind"]["Data"], 1024);

    let out = host.dir.path().join("disk.raw");
    let report = host.ok_json(&["image", "convert", i, out.to_str().unwrap(), "-o", "json"]);
    assert_eq!(report["converter"], "toy-format");
    let raw = std::fs::read(&out).unwrap();
    assert_eq!(raw.len() as u64, virtual_size);
    assert_eq!(&raw[..data.len()], &data[..]);
    assert!(raw[data.len()..].iter().all(|&b| b == 0));
}

#[test]
fn a_new_disk_policy_builds_verifies_and_plans() {
    let host = Host::new();
    host.new_plugin("site-policy", "disk-policy");
    let req = host.dir.path().join("req.json");
    let r = req.to_str().unwrap();
    let disk = |name: &str| {
        format!(
            r#"{{"name":"{name}","size_bytes":1073741824,"fstype":"ext4","mount_point":"/mnt/{name}"}}"#
        )
    };
    std::fs::write(
        &req,
        format!(
            r#"{{"name":"vm","image":{{"layered":{{"layers":["sha256:{}"]}}}},"data_disks":[{}],"cidata":true,"settings":{{"cow_size":"2G"}}}}"#,
            "a".repeat(64),
            disk("logs")
        ),
    )
    .unwrap();
    let plan = host.ok_json(&["plugin", "call", "site-policy", "plan", r, "-o", "json"]);
    let names: Vec<&str> = plan
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["cocoon-layer0", "cocoon-root", "logs", "cocoon-cidata"]
    );
    assert_eq!(plan[1]["size_bytes"], 2u64 << 30);

    // Its one site rule: at most max_data_disks data disks.
    let five: Vec<String> = (0..5).map(|i| disk(&format!("d{i}"))).collect();
    std::fs::write(
        &req,
        format!(
            r#"{{"name":"vm","image":{{"disk":{{"digest":"sha256:{}","virtual_size":1073741824}}}},"data_disks":[{}]}}"#,
            "b".repeat(64),
            five.join(",")
        ),
    )
    .unwrap();
    let out = host.run(&["plugin", "call", "site-policy", "validate", r]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("this site allows 4"));
}

#[test]
fn plugin_new_refuses_bad_names_and_occupied_directories() {
    let host = Host::new();
    let out = host.run(&["plugin", "new", "Bad_Name", "--kind", "disk-policy"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("\"Bad_Name\""),
        "{err}"
    );
    let dir = host.dir.path().join("taken");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("notes"), "mine").unwrap();
    let out = host.run(&[
        "plugin",
        "new",
        "taken",
        "--kind",
        "image-source",
        "--path",
        dir.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("exists and is not an empty directory"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(dir.join("notes")).unwrap(), "mine");
    assert!(!Path::new(&dir.join("Cargo.toml")).exists());
}
