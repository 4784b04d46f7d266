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
//! It also builds the test guest (`tests/guest`, a no_std PVH ELF for
//! x86_64-unknown-none), which the binary embeds as the built-in demo's
//! kernel (`src/demo_kernel.rs`).
//!
//! Environment:
//! - `COCOON_PREBUILT_WASM_DIR`: a directory of prebuilt first-party `.wasm`
//!   files to embed instead of building them (packaging, offline builds).
//! - `COCOON_PREBUILT_GUEST`: a prebuilt test guest ELF to embed instead of
//!   building it (an absolute path: build scripts run in `host/`).
//!
//! Sets for the crate's code and tests:
//! - `COCOON_FIRST_PARTY_WASM_DIR`: where the first-party `.wasm` files are
//!   (the built-in ones and the examples).
//! - `COCOON_DEMO_KERNEL`: the test guest's copy in OUT_DIR, and
//!   `COCOON_DEMO_KERNEL_SHA256`: its sha256, in hex.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

#[path = "src/plugin/engine_settings.rs"]
mod engine_settings;

const WASM_TARGET: &str = "wasm32-wasip2";
const GUEST_TARGET: &str = "x86_64-unknown-none";

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
        "tests/guest/src",
        "tests/guest/Cargo.toml",
        "tests/guest/Cargo.lock",
        "tests/guest/build.rs",
        "tests/guest/linker.ld",
        "tests/guest/.cargo/config.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    // RELR relocations (glibc 2.36, binutils 2.38): the dynamic loader of
    // every process reads a few KiB of relocations instead of the RELA
    // entries (about 1 MiB in the CLI, 230 KiB in the monitor), which stayed
    // resident in every VM's monitor. Both binaries: a new one needs its
    // own line.
    for bin in ["cocoon-host", "cocoon-monitor"] {
        println!("cargo:rustc-link-arg-bin={bin}=-Wl,-z,pack-relative-relocs");
    }
    println!("cargo:rerun-if-env-changed=COCOON_PREBUILT_WASM_DIR");
    println!("cargo:rerun-if-env-changed=COCOON_PREBUILT_GUEST");

    embed_test_guest(&root, &out_dir);

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

/// Builds (or takes, with COCOON_PREBUILT_GUEST) the test guest, copies it
/// into OUT_DIR and tells the crate where it is and its digest.
fn embed_test_guest(root: &Path, out_dir: &Path) {
    let elf = match env::var_os("COCOON_PREBUILT_GUEST") {
        Some(path) => PathBuf::from(path),
        None => {
            check_target_installed(GUEST_TARGET);
            let target = nested_target_dir(out_dir, "test-guest");
            let mut cmd = nested_cargo();
            // From inside tests/guest, so that its .cargo/config.toml (static
            // relocation model) applies.
            cmd.current_dir(root.join("tests/guest"))
                .args(["build", "--release", "--target", GUEST_TARGET])
                .arg("--manifest-path")
                .arg(root.join("tests/guest/Cargo.toml"))
                .arg("--target-dir")
                .arg(&target);
            let status = cmd.status().expect("running cargo for the test guest");
            assert!(
                status.success(),
                "building tests/guest for {GUEST_TARGET} failed"
            );
            target.join(GUEST_TARGET).join("release/cocoon-test-guest")
        }
    };
    let bytes =
        fs::read(&elf).unwrap_or_else(|e| panic!("reading the test guest {}: {e}", elf.display()));
    assert!(
        bytes.starts_with(b"\x7fELF"),
        "the test guest {} is not an ELF",
        elf.display()
    );
    let copy = out_dir.join("cocoon-test-guest");
    fs::write(&copy, &bytes).unwrap();
    println!("cargo:rustc-env=COCOON_DEMO_KERNEL={}", copy.display());
    println!(
        "cargo:rustc-env=COCOON_DEMO_KERNEL_SHA256={}",
        hex::encode(Sha256::digest(&bytes))
    );
}

/// Fails the build with the command that fixes it when `target`'s standard
/// library is not installed (cargo's own error would not say).
fn check_target_installed(target: &str) {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let Some(sysroot) = sysroot else {
        return; // let cargo say what is wrong
    };
    let lib = sysroot.join("lib/rustlib").join(target).join("lib");
    let has_core = fs::read_dir(&lib).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("libcore-"))
    });
    assert!(
        has_core,
        "the Rust target {target} is not installed (the test guest embedded as the demo kernel \
         is built for it): run `rustup target add {target}` (scripts/install-deps does), or set \
         COCOON_PREBUILT_GUEST to a prebuilt guest"
    );
}

/// A stable directory beside the host's own target dir, so plugin builds
/// are reused across profiles and clippy runs. OUT_DIR is
/// `<target>/<profile>/build/<package>-<hash>/out`.
fn wasm_target_dir(out_dir: &Path) -> PathBuf {
    nested_target_dir(out_dir, "wasm-plugins")
}

fn nested_target_dir(out_dir: &Path, name: &str) -> PathBuf {
    out_dir.ancestors().nth(4).unwrap_or(out_dir).join(name)
}

fn build_wasm_workspace(manifest: &Path, target_dir: &Path) {
    let mut cmd = nested_cargo();
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
    let status = cmd.status().expect("running cargo for the wasm plugins");
    assert!(
        status.success(),
        "building {} for {WASM_TARGET} failed (is the target installed? run scripts/install-deps)",
        manifest.display()
    );
}

/// A cargo for another workspace and target.
fn nested_cargo() -> Command {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    // Variables cargo sets for this build script would leak the host
    // build's flags and wrappers (clippy's driver, coverage flags) into the
    // nested build.
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
    cmd
}
