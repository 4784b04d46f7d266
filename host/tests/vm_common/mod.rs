//! The CLI driver the VM end-to-end tests share (vm_lifecycle, vm_net,
//! cli_snapshot): a state dir and a disk image of their own, the binary run
//! with them (inside a network namespace for vm_net), and every VM removed
//! when the test ends, passed or failed: monitors are detached and would
//! outlive it.
#![allow(dead_code)] // each test uses its part

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// `G` is what must outlive the VMs (vm_net's namespace): it is dropped
/// after [`Drop`] has removed them.
pub struct Host<G = ()> {
    pub state: tempfile::TempDir,
    pub image: PathBuf,
    /// Words run before the binary (`ip netns exec NS`).
    prefix: Vec<String>,
    pub guard: G,
}

impl Host<()> {
    pub fn new() -> Self {
        Host::with(Vec::new(), ())
    }
}

impl<G> Host<G> {
    /// A 4 MiB raw image whose first MiB counts modulo 251, and commands
    /// run after `prefix`.
    pub fn with(prefix: Vec<String>, guard: G) -> Self {
        let state = tempfile::tempdir().unwrap();
        let image = state.path().join("disk.raw");
        let mut bytes = vec![0u8; 4 << 20];
        for (i, b) in bytes.iter_mut().enumerate().take(1 << 20) {
            *b = u8::try_from(i % 251).expect("below 251");
        }
        std::fs::write(&image, bytes).unwrap();
        Host {
            state,
            image,
            prefix,
            guard,
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state.path().join("state")
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.state_dir().join("vms")
    }

    pub fn cmd(&self) -> Command {
        self.cmd_of(Path::new(env!("CARGO_BIN_EXE_cocoon-host")))
    }

    /// [`Self::cmd`] with another copy of the binary.
    pub fn cmd_of(&self, bin: &Path) -> Command {
        let mut c = match self.prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        c.env("COCOON_STATE_DIR", self.state_dir())
            .env("COCOON_CONFIG", "/dev/null")
            .env_remove("RUST_LOG");
        c
    }

    pub fn try_run(&self, args: &[&str]) -> std::io::Result<Output> {
        self.cmd().args(args).output()
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.try_run(args).unwrap()
    }

    /// The command succeeds; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "cocoon-host {args:?}: {:?}\nstdout: {}\nstderr: {}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// The command fails; its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            !o.status.success(),
            "cocoon-host {args:?} succeeded: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    /// The command fails and its stderr holds `want`; the stderr.
    pub fn fails_with(&self, args: &[&str], want: &str) -> String {
        let e = self.fails(args);
        assert!(e.contains(want), "cocoon-host {args:?}: {e}");
        e
    }

    pub fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }

    /// `run -d` of the image with a 16 MiB data disk `scratch`, booting
    /// `kernel` (the test guest) with `cmdline`; the VM's name as printed.
    pub fn run_detached_with(&self, kernel: &Path, name: &str, cmdline: &str) -> String {
        let out = self.ok(&[
            "run",
            "-d",
            "--name",
            name,
            "--memory",
            "64M",
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            cmdline,
            "--data-disk",
            "size=16M,name=scratch,fstype=none",
            self.image.to_str().unwrap(),
        ]);
        out.trim().to_string()
    }

    /// `name`'s entry of `list -o json`, or null.
    pub fn vm(&self, name: &str) -> Value {
        self.json(&["list", "-o", "json"])["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    }

    pub fn state_of(&self, name: &str) -> String {
        self.vm(name)["state"]
            .as_str()
            .unwrap_or("absent")
            .to_string()
    }

    /// Entries of `vms/` other than the lock file, sorted.
    pub fn vm_dirs(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.vms_dir())
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

impl<G> Drop for Host<G> {
    fn drop(&mut self) {
        if let Ok(o) = self.try_run(&["list", "-o", "json"]) {
            if let Ok(v) = serde_json::from_slice::<Value>(&o.stdout) {
                for vm in v["vms"].as_array().into_iter().flatten() {
                    if let Some(id) = vm["id"].as_str() {
                        let _ = self.try_run(&["rm", "-f", id]);
                    }
                }
            }
        }
    }
}
