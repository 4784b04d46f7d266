//! Builds the first-party plugins (plugins/) and the test fixture plugins
//! (tests/plugins/) for wasm32-wasip2 with a nested cargo, and generates the
//! table that embeds the first-party ones in the binary, so a fresh install
//! works without any plugin directory.
//!
//! Set `COCOON_PLUGINS_WASM_DIR` to a directory of prebuilt `.wasm` files to
//! skip the nested build (packaging, offline builds).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const WASM_TARGET: &str = "wasm32-wasip2";

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    for watched in [
        "plugins/sdk",
        "plugins/builtin",
        "plugins/examples",
        "plugins/formats",
        "plugins/Cargo.toml",
        "tests/plugins",
        "wit",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=COCOON_PLUGINS_WASM_DIR");

    let wasm_dir = match env::var_os("COCOON_PLUGINS_WASM_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let target = wasm_target_dir(&out_dir);
            build_wasm_workspace(&root.join("plugins/Cargo.toml"), &target);
            build_wasm_workspace(&root.join("tests/plugins/Cargo.toml"), &target);
            target.join(WASM_TARGET).join("release")
        }
    };
    println!(
        "cargo:rustc-env=COCOON_PLUGIN_WASM_DIR={}",
        wasm_dir.display()
    );

    let mut table = String::from(
        "/// First-party plugins embedded at build time: (manifest, wasm).\n\
         pub static BUILTIN: &[(&str, &[u8])] = &[\n",
    );
    let mut dirs: Vec<PathBuf> = fs::read_dir(root.join("plugins/builtin"))
        .expect("plugins/builtin")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("plugin.toml").is_file())
        .collect();
    dirs.sort();
    for dir in dirs {
        let crate_name = dir.file_name().unwrap().to_str().unwrap().replace('-', "_");
        let wasm = wasm_dir.join(format!("{crate_name}.wasm"));
        assert!(wasm.is_file(), "built plugin {} is missing", wasm.display());
        table.push_str(&format!(
            "    (include_str!({:?}), include_bytes!({:?})),\n",
            dir.join("plugin.toml"),
            wasm
        ));
    }
    table.push_str("];\n");
    fs::write(out_dir.join("builtin_plugins.rs"), table).unwrap();
}

/// A stable directory beside the host's own target dir, so plugin builds
/// are reused across profiles and clippy runs. OUT_DIR is
/// `<target>/<profile>/build/<package>-<hash>/out`.
fn wasm_target_dir(out_dir: &Path) -> PathBuf {
    out_dir
        .ancestors()
        .nth(4)
        .unwrap_or(out_dir)
        .join("wasm-plugins")
}

fn build_wasm_workspace(manifest: &Path, target_dir: &Path) {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--release",
        "--target",
        WASM_TARGET,
        "--manifest-path",
    ])
    .arg(manifest)
    .arg("--target-dir")
    .arg(target_dir);
    // Variables cargo sets for this build script would leak the host
    // build's flags and wrappers (clippy's driver, coverage flags) into the
    // wasm build.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("running cargo for the wasm plugins");
    assert!(
        status.success(),
        "building {} for {WASM_TARGET} failed (is the target installed? run scripts/install-deps)",
        manifest.display()
    );
}
