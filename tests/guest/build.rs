//! Links the guest with its own linker script, at a fixed address.

use std::env;

fn main() {
    let dir = env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rerun-if-changed=linker.ld");
    println!("cargo:rerun-if-changed=build.rs");
    // Host builds (clippy or tests for the host triple) link normally.
    if env::var("TARGET").as_deref() == Ok("x86_64-unknown-none") {
        println!("cargo:rustc-link-arg-bins=-T{dir}/linker.ld");
        // The target defaults to a static PIE, whose relocations nobody here
        // would apply: the PVH loaders put segments at their link addresses
        // and jump in. `--no-pie` comes after rustc's `-pie`, so it wins even
        // when the build did not pick up .cargo/config.toml.
        println!("cargo:rustc-link-arg-bins=--no-pie");
    }
}
