//! `cocoon-monitor`: the process that runs one VM, started by
//! `cocoon-host run|start|clone|restore` from beside itself.
//!
//! It is built from the same crate and sources as `cocoon-host`, and is
//! what `cocoon-host __monitor` runs, but as a binary of its own it links
//! only what a monitor runs: the VMM, the API server and the record. No
//! wasmtime, no HTTP client, no CLI parser. That is a tenth of the code
//! to exec and to page in for every VM; the monitor's resident memory
//! beyond guest RAM is mostly its mapped code (see docs/benchmarks.md).

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let [vm_dir, lock_fd, ready_fd] = args.as_slice() else {
        eprintln!(
            "usage: cocoon-monitor VM_DIR LOCK_FD READY_FD (started by cocoon-host; not for people)"
        );
        return ExitCode::from(2);
    };
    cocoon_host::vm::monitor::init_logging();
    // SAFETY: `spawn::start` passed these descriptors to this process, which
    // has not opened anything else yet, so nothing else in it owns them.
    let code = unsafe {
        cocoon_host::vm::monitor::main_from_args(
            std::path::Path::new(vm_dir),
            &lock_fd.to_string_lossy(),
            &ready_fd.to_string_lossy(),
        )
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
