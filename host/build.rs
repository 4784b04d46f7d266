//! Builds the first-party plugins (the `plugins/` workspace) for
//! wasm32-wasip2 with a nested cargo, precompiles the built-in ones with
//! the runtime's own engine settings, and generates the table that embeds
//! both the wasm and the compiled code in the binary: a fresh install needs
//! no plugin directory and compiles nothing on its first command.
//!
//! The compiled code is used at run time only when the running engine's
//! key (wasmtime version and compatibility hash, which covers the CPU
//! features found) equals the one it was compiled under; otherwise the host
//! compiles and caches as it would for any plugin.
//!
//! The hostile fixture plugins of `tests/plugins` are not built here: the
//! tests build them (see `host/tests/support`).
//!
//! Environment:
//! - `COCOON_PREBUILT_WASM_DIR`: a directory of prebuilt first-party `.wasm`
//!   files to embed instead of building them (packaging, offline builds).
//!
//! Sets for the crate's code and tests:
//! - `COCOON_FIRST_PARTY_WASM_DIR`: where the first-party `.wasm` files are
//!   (the built-in ones and the examples).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::Digest as _;

#[path = "src/plugin/engine_settings.rs"]
mod engine_settings;

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
        "plugins/Cargo.lock",
        "wit",
        "host/src/plugin/engine_settings.rs",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=COCOON_PREBUILT_WASM_DIR");

    let wasm_dir = match env::var_os("COCOON_PREBUILT_WASM_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let target = wasm_target_dir(&out_dir);
            build_wasm_workspace(&root.join("plugins/Cargo.toml"), &target);
            target.join(WASM_TARGET).join("release")
        }
    };
    println!(
        "cargo:rustc-env=COCOON_FIRST_PARTY_WASM_DIR={}",
        wasm_dir.display()
    );

    let mut config = wasmtime::Config::new();
    engine_settings::apply(&mut config);
    let engine = wasmtime::Engine::new(&config).expect("a wasm engine for precompiling");
    let engine_key = engine_settings::engine_key(&engine);

    let mut table = format!(
        "/// The engine key the embedded compiled code was made under.\n\
         pub static PRECOMPILED_ENGINE_KEY: &str = {engine_key:?};\n\
         /// First-party plugins embedded at build time: (manifest, wasm,\n\
         /// compiled component, sha256 of the wasm in hex).\n\
         pub static BUILTIN: &[(&str, &[u8], &[u8], &str)] = &[\n"
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
        let bytes = fs::read(&wasm).unwrap();
        let compiled = engine
            .precompile_component(&bytes)
            .unwrap_or_else(|e| panic!("precompiling {}: {e:?}", wasm.display()));
        let cwasm = out_dir.join(format!("{crate_name}.cwasm"));
        fs::write(&cwasm, compiled).unwrap();
        // Hashed here, not at every start (the registry lists every
        // built-in, so each command would hash them all).
        let sha256 = hex::encode(sha2::Sha256::digest(&bytes));
        table.push_str(&format!(
            "    (include_str!({:?}), include_bytes!({:?}), include_bytes!({:?}), {sha256:?}),\n",
            dir.join("plugin.toml"),
            wasm,
            cwasm
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
