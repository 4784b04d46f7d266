//! `cocoon-host run` and the lifecycle commands end to end, with the test
//! guest as the kernel and a disk image the test makes: records, the
//! detached monitor and its API, pause/resume seen in the guest's clock
//! output, dead monitors, killed creates, concurrent starts, a hostile API
//! client, 16 VMs at once, gc roots, which binary the monitor is, the
//! console and `logs -f`, and graceful and timed-out stops.

mod vm_common;
#[path = "../../vmm/tests/support/mod.rs"]
mod vmm_support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vm_common::Host;
use vmm_support::{kvm_or_skip, test_guest};

impl Host {
    /// `run -d` of the test image with `cmdline`; the VM's name.
    fn run_detached(&self, name: &str, cmdline: &str) -> String {
        self.run_detached_with(&test_guest(), name, cmdline)
    }

    fn logs(&self, name: &str) -> String {
        self.ok(&["logs", name])
    }

    /// `run -d` of the ticking guest, then waits for its count `n`.
    fn counting(&self, name: &str, n: u64) {
        self.run_detached(name, TICKING);
        eventually("the guest's clock output", Duration::from_secs(20), || {
            last_count(&self.logs(name)).is_some_and(|c| c >= n)
        });
    }

    /// `run` of `image` as `name`, booting the test guest with `cmdline`
    /// in 32 MiB, `extra` flags before the image; not started.
    fn run_cmd(&self, name: &str, image: &Path, cmdline: &str, extra: &[&str]) -> Command {
        let mut c = self.cmd();
        c.args(["run", "--name", name, "--memory", "32M", "--kernel"])
            .arg(test_guest())
            .args(["--cmdline", cmdline])
            .args(extra)
            .arg(image);
        c
    }
}

/// Waits until `f` holds, up to `timeout`.
fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last `count n=N` the guest printed.
fn last_count(log: &str) -> Option<u64> {
    log.lines()
        .filter_map(|l| l.trim_end().strip_prefix("cocoon-guest: count n="))
        .filter_map(|r| r.split(' ').next()?.parse().ok())
        .next_back()
}

const TICKING: &str = "console=ttyS0 cocoon.count=50:0";

#[test]
fn run_detached_then_list_inspect_pause_resume_stop_and_rm() {
    if !kvm_or_skip("run_detached_then_list_inspect_pause_resume_stop_and_rm") {
        return;
    }
    let h = Host::new();
    assert_eq!(h.run_detached("web", TICKING), "web");
    assert_eq!(h.state_of("web"), "running");

    let inspect = h.json(&["inspect", "web", "-o", "json"]);
    let disks = inspect["record"]["storage"].as_array().unwrap();
    let roles: Vec<&str> = disks.iter().map(|d| d["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["cow", "data", "cidata"], "{inspect}");
    assert_eq!(disks[1]["serial"], "scratch");
    assert_eq!(inspect["monitor"]["state"], "running");
    assert_eq!(inspect["monitor"]["disks"], inspect["record"]["storage"]);
    let dir = PathBuf::from(inspect["dir"].as_str().unwrap());
    for d in disks {
        assert!(
            Path::new(d["path"].as_str().unwrap()).starts_with(&dir),
            "{d}"
        );
    }
    let mode = std::fs::metadata(dir.join("run/api.sock")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::metadata(dir.join("run"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );

    eventually("the guest's clock output", Duration::from_secs(20), || {
        last_count(&h.logs("web")).is_some_and(|n| n >= 3)
    });
    assert!(h.ok(&["pause", "web"]).contains("paused"));
    assert_eq!(h.state_of("web"), "paused");
    std::thread::sleep(Duration::from_millis(300));
    let at_pause = last_count(&h.logs("web")).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        last_count(&h.logs("web")),
        Some(at_pause),
        "counting while paused"
    );
    assert!(h.ok(&["resume", "web"]).contains("running"));
    eventually("counting after resume", Duration::from_secs(10), || {
        last_count(&h.logs("web")).is_some_and(|n| n > at_pause + 2)
    });

    // A hard stop (the guest is never asked).
    let out = h.ok(&["stop", "--force", "web"]);
    assert!(out.contains("stopped"), "{out}");
    let vm = h.vm("web");
    assert_eq!(vm["state"], "stopped");
    assert!(
        vm["exit"].as_str().unwrap().contains("stopped by the host"),
        "{vm}"
    );
    assert!(!dir.join("run/api.sock").exists());

    let e = h.run(&["pause", "web"]);
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("VM web is stopped"));

    h.ok(&["rm", "web"]);
    assert!(!dir.exists());
    assert!(h.vm_dirs().is_empty());
    let e = h.run(&["inspect", "web"]);
    assert!(String::from_utf8_lossy(&e.stderr).contains("no VM named web"));
}

#[test]
fn a_foreground_run_exits_with_the_guests_outcome_and_rm_removes_it() {
    if !kvm_or_skip("a_foreground_run_exits_with_the_guests_outcome_and_rm_removes_it") {
        return;
    }
    let h = Host::new();
    let guest = test_guest();
    let o = h.run(&[
        "run",
        "--rm",
        "--memory",
        "64M",
        "--kernel",
        guest.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 cocoon.hash=0:0:8",
        h.image.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{stdout}\n{stderr}");
    // The console was attached: the guest's report is on stdout.
    let bytes = std::fs::read(&h.image).unwrap();
    use sha2::Digest;
    let want = hex::encode(sha2::Sha256::digest(&bytes[..8 * 512]));
    assert!(
        stdout.contains(&format!("hash index=0 sector=0 count=8 sha256={want}")),
        "{stdout}"
    );
    // It said what it did.
    for step in [
        "pull:", "convert:", "plan:", "cow", "start:", "stop:", "rm:",
    ] {
        assert!(stderr.contains(step), "no {step:?} in: {stderr}");
    }
    assert!(h.vm_dirs().is_empty(), "{:?}", h.vm_dirs());
}

#[test]
fn the_demo_runs_from_the_binary_alone_and_checks_the_guests_report() {
    if !kvm_or_skip("the_demo_runs_from_the_binary_alone_and_checks_the_guests_report") {
        return;
    }
    let h = Host::new();
    let o = h.run(&["run"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{stdout}\n{stderr}");
    for step in [
        "image: the built-in demo disk",
        "pull:",
        "convert:",
        "qcow2",
        "plan: 3 disks by default-policy",
        "scratch",
        "check: the guest read the root",
        "check: the guest's write landed",
        "rm: VM",
    ] {
        assert!(stderr.contains(step), "no {step:?} in: {stderr}");
    }
    assert!(stdout.contains("cocoon-guest: hash index=0"), "{stdout}");
    assert!(h.vm_dirs().is_empty());
    // A second run finds the image and its conversion cached.
    let o = h.run(&["run"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("cached)"), "{stderr}");
}

#[test]
fn a_killed_monitor_is_seen_as_stopped_and_the_vm_starts_again() {
    if !kvm_or_skip("a_killed_monitor_is_seen_as_stopped_and_the_vm_starts_again") {
        return;
    }
    let h = Host::new();
    h.run_detached("k", TICKING);
    // The first boot's line in the log before the kill: what the killed
    // monitor had not written yet is lost with it, and the count of boots
    // below reads the log.
    eventually("the first boot's output", Duration::from_secs(20), || {
        h.logs("k").contains("cocoon-guest: start")
    });
    let pid = h.vm("k")["pid"].as_u64().unwrap();
    let disks_before = h.json(&["inspect", "k", "-o", "json"])["record"]["storage"].clone();
    let status = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    eventually("the dead monitor noticed", Duration::from_secs(10), || {
        h.state_of("k") == "stopped"
    });
    let vm = h.vm("k");
    assert!(
        vm["exit"].as_str().unwrap().contains(&format!("pid {pid}")),
        "{vm}"
    );
    // Nothing hangs on the dead socket.
    let t = Instant::now();
    let e = h.run(&["pause", "k"]);
    assert!(!e.status.success());
    assert!(t.elapsed() < Duration::from_secs(5));

    h.ok(&["start", "k"]);
    assert_eq!(h.state_of("k"), "running");
    let again = h.json(&["inspect", "k", "-o", "json"]);
    assert_eq!(again["record"]["storage"], disks_before);
    eventually(
        "the restarted guest's output",
        Duration::from_secs(20),
        || h.logs("k").matches("cocoon-guest: start").count() >= 2,
    );
    h.ok(&["rm", "--force", "k"]);
    assert!(h.vm_dirs().is_empty());
}

#[test]
fn a_create_killed_at_any_point_leaves_nothing_after_the_next_command() {
    let h = Host::new();
    // A kernel is only recorded at create; it need not boot.
    let kernel = h.state.path().join("kernel");
    std::fs::write(&kernel, b"never booted").unwrap();
    let mut finished = 0;
    for delay_ms in [0u64, 5, 20, 40, 80, 150, 300, 600] {
        let mut child = h
            .cmd()
            .args([
                "create",
                "--kernel",
                kernel.to_str().unwrap(),
                "--data-disk",
                "size=64M,name=a,fstype=ext4",
                "--data-disk",
                "size=64M,name=b,fstype=ext4",
                h.image.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let status = child.wait().unwrap();
        // The next command sweeps.
        let list = h.json(&["list", "-o", "json"]);
        let listed: Vec<String> = list["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["id"].as_str().unwrap().to_string())
            .collect();
        for v in list["vms"].as_array().unwrap() {
            assert_eq!(v["state"], "created", "{v}");
        }
        // Every directory left is a finished VM's.
        assert_eq!(
            h.vm_dirs(),
            listed,
            "after a kill at {delay_ms} ms ({status})"
        );
        finished += listed.len();
        for id in listed {
            h.ok(&["rm", &id]);
        }
        assert!(h.vm_dirs().is_empty());
    }
    // Some kills came too late to interrupt anything; not all did.
    assert!(finished < 8, "no kill interrupted a create");
}

#[test]
fn two_concurrent_starts_one_wins_and_the_other_is_busy() {
    if !kvm_or_skip("two_concurrent_starts_one_wins_and_the_other_is_busy") {
        return;
    }
    let h = Host::new();
    let guest = test_guest();
    h.ok(&[
        "create",
        "--name",
        "c",
        "--memory",
        "64M",
        "--kernel",
        guest.to_str().unwrap(),
        "--cmdline",
        TICKING,
        h.image.to_str().unwrap(),
    ]);
    assert_eq!(h.state_of("c"), "created");
    let spawn = || {
        h.cmd()
            .args(["start", "c"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let ok = [&a, &b].iter().filter(|o| o.status.success()).count();
    assert_eq!(ok, 1, "a: {a:?}\nb: {b:?}");
    let loser = if a.status.success() { &b } else { &a };
    let e = String::from_utf8_lossy(&loser.stderr);
    assert!(
        e.contains("VM c is busy") || e.contains("VM c is running"),
        "{e}"
    );
    assert_eq!(h.state_of("c"), "running");
    h.ok(&["rm", "-f", "c"]);
}

fn raw_request(socket: &Path, request: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn the_api_refuses_bad_requests_and_a_stalled_client_stalls_nothing() {
    if !kvm_or_skip("the_api_refuses_bad_requests_and_a_stalled_client_stalls_nothing") {
        return;
    }
    let h = Host::new();
    h.run_detached("api", TICKING);
    let dir = PathBuf::from(
        h.json(&["inspect", "api", "-o", "json"])["dir"]
            .as_str()
            .unwrap(),
    );
    let socket = dir.join("run/api.sock");

    // A client that sends half a request and waits.
    let mut stalled = UnixStream::connect(&socket).unwrap();
    stalled
        .write_all(b"GET /v1/vm HTTP/1.1\r\nHost: x\r\n")
        .unwrap();

    let big = format!(
        "PUT /v1/console/input HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        10 << 20
    );
    let r = raw_request(&socket, big.as_bytes());
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    let r = raw_request(&socket, b"GARBAGE\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    let r = raw_request(
        &socket,
        b"GET /v1/console?from=x HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(
        r.starts_with("HTTP/1.1 400") && r.contains("not a number"),
        "{r}"
    );
    let r = raw_request(&socket, b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    let r = raw_request(&socket, b"DELETE /v1/vm HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 405"), "{r}");
    let r = raw_request(
        &socket,
        b"PUT /v1/vm/pause HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
    );
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    let long_header = format!(
        "GET /v1/vm HTTP/1.1\r\nHost: x\r\nX: {}\r\n\r\n",
        "a".repeat(64 << 10)
    );
    let r = raw_request(&socket, long_header.as_bytes());
    assert!(r.starts_with("HTTP/1.1 431") || r.is_empty(), "{r}");

    // Meanwhile the VM ran and the API serves.
    let n = last_count(&h.logs("api")).unwrap_or(0);
    eventually("the guest still counting", Duration::from_secs(10), || {
        last_count(&h.logs("api")).is_some_and(|m| m > n)
    });
    assert_eq!(
        h.json(&["inspect", "api", "-o", "json"])["monitor"]["state"],
        "running"
    );
    // The stalled client is dropped after the header deadline.
    stalled
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut rest = String::new();
    let t = Instant::now();
    let _ = stalled.read_to_string(&mut rest);
    assert!(
        t.elapsed() < Duration::from_secs(14),
        "a stalled client kept its connection"
    );
    h.ok(&["rm", "-f", "api"]);
}

#[test]
fn sixteen_vms_start_at_once_and_all_stop_cleanly() {
    if !kvm_or_skip("sixteen_vms_start_at_once_and_all_stop_cleanly") {
        return;
    }
    let h = Host::new();
    let guest = test_guest();
    // One create first, so the pull and conversion are cached and the 16
    // runs race on the VMs, not on the store.
    h.ok(&[
        "image",
        "pull",
        h.image.to_str().unwrap(),
        "--convert",
        "raw",
    ]);
    let children: Vec<_> = (0..16)
        .map(|i| {
            h.cmd()
                .args([
                    "run",
                    "-d",
                    "--name",
                    &format!("vm{i}"),
                    "--memory",
                    "32M",
                    "--kernel",
                    guest.to_str().unwrap(),
                    "--cmdline",
                    "console=ttyS0 cocoon.count=100:0",
                    "--no-cidata",
                    h.image.to_str().unwrap(),
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    for i in 0..16 {
        let name = format!("vm{i}");
        eventually("every guest's first line", Duration::from_secs(60), || {
            h.logs(&name).contains("cocoon-guest: start")
        });
    }
    let stops: Vec<_> = (0..16)
        .map(|i| {
            h.cmd()
                .args(["stop", "--force", &format!("vm{i}")])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for s in stops {
        let o = s.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    for i in 0..16 {
        assert_eq!(h.state_of(&format!("vm{i}")), "stopped");
        h.ok(&["rm", &format!("vm{i}")]);
    }
    assert!(h.vm_dirs().is_empty());
}

#[test]
fn a_vms_image_survives_gc_until_the_vm_is_removed() {
    let h = Host::new();
    let kernel = h.state.path().join("kernel");
    std::fs::write(&kernel, b"never booted").unwrap();
    h.ok(&[
        "create",
        "--name",
        "g",
        "--kernel",
        kernel.to_str().unwrap(),
        h.image.to_str().unwrap(),
    ]);
    let image = h.json(&["inspect", "g", "-o", "json"])["record"]["image"].clone();
    let digest = image["digest"].as_str().unwrap().to_string();
    let base = image["base"].as_str().unwrap().to_string();
    // The reference is dropped, so only the VM keeps the image.
    h.ok(&["image", "rm", h.image.to_str().unwrap()]);
    let gc = h.json(&["image", "gc", "-o", "json"]);
    assert!(gc["removed_blobs"].as_array().unwrap().is_empty(), "{gc}");
    assert!(
        gc["removed_conversions"].as_array().unwrap().is_empty(),
        "{gc}"
    );
    h.ok(&["rm", "g"]);
    let gc = h.json(&["image", "gc", "-o", "json"]);
    let removed = gc.to_string();
    assert!(removed.contains(&digest), "{gc}");
    let _ = base;
}

#[test]
fn bad_names_and_unknown_vms_are_named_in_the_error() {
    let h = Host::new();
    let kernel = h.state.path().join("kernel");
    std::fs::write(&kernel, b"never booted").unwrap();
    let e = h.run(&[
        "create",
        "--name=-bad",
        "--kernel",
        kernel.to_str().unwrap(),
        h.image.to_str().unwrap(),
    ]);
    assert!(!e.status.success());
    let msg = String::from_utf8_lossy(&e.stderr);
    assert!(
        msg.contains("\"-bad\"") && msg.contains("must start"),
        "{msg}"
    );
    assert!(h.vm_dirs().is_empty());
    h.ok(&[
        "create",
        "--name",
        "x",
        "--kernel",
        kernel.to_str().unwrap(),
        h.image.to_str().unwrap(),
    ]);
    let e = h.run(&[
        "create",
        "--name",
        "x",
        "--kernel",
        kernel.to_str().unwrap(),
        h.image.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&e.stderr).contains("a VM named x exists already"));
    for cmd in ["start", "stop", "rm", "inspect", "logs", "console"] {
        let e = h.run(&[cmd, "nosuch"]);
        assert!(!e.status.success());
        assert!(
            String::from_utf8_lossy(&e.stderr).contains("no VM named nosuch"),
            "{cmd}"
        );
    }
}

/// The program a process runs.
fn exe_of(pid: u64) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).unwrap()
}

#[test]
fn the_monitor_is_its_own_binary_and_the_cli_alone_still_runs_vms() {
    if !kvm_or_skip("the_monitor_is_its_own_binary_and_the_cli_alone_still_runs_vms") {
        return;
    }
    let h = Host::new();
    h.run_detached("own", TICKING);
    let pid = h.vm("own")["pid"].as_u64().unwrap();
    assert_eq!(
        exe_of(pid),
        Path::new(env!("CARGO_BIN_EXE_cocoon-monitor"))
            .canonicalize()
            .unwrap()
    );
    // Installed without it, the CLI runs the same monitor code itself.
    let alone = h.state.path().join("bin-alone");
    std::fs::create_dir(&alone).unwrap();
    let cli = alone.join("cocoon-host");
    std::fs::copy(env!("CARGO_BIN_EXE_cocoon-host"), &cli).unwrap();
    let o = h
        .cmd_of(&cli)
        .args(["run", "-d", "--name", "solo", "--memory", "64M", "--kernel"])
        .arg(test_guest())
        .args(["--cmdline", TICKING])
        .arg(&h.image)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let solo = h.vm("solo")["pid"].as_u64().unwrap();
    assert_eq!(exe_of(solo), cli.canonicalize().unwrap());
    let cmdline = std::fs::read(format!("/proc/{solo}/cmdline")).unwrap();
    assert!(
        cmdline.split(|&b| b == 0).any(|a| a == b"__monitor"),
        "{}",
        String::from_utf8_lossy(&cmdline)
    );
    for vm in ["own", "solo"] {
        eventually(&format!("{vm} counting"), Duration::from_secs(20), || {
            last_count(&h.logs(vm)).is_some_and(|n| n >= 2)
        });
    }
    h.ok(&["rm", "--force", "own"]);
    h.ok(&["rm", "--force", "solo"]);
    assert!(h.vm_dirs().is_empty());
}

#[test]
fn a_monitor_of_another_build_refuses_to_start() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let (mut answer, ready) = std::io::pipe().unwrap();
    let fd = ready.as_raw_fd();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cocoon-monitor"));
    cmd.arg(dir.path())
        .arg(fd.to_string())
        .arg(fd.to_string())
        .env("COCOON_BUILD", "0.0.1-elsewhere")
        .stderr(Stdio::piped());
    // SAFETY: fcntl on a descriptor this process owns; async-signal-safe,
    // and only in the child, so no other child inherits the pipe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop(ready);
    let mut said = String::new();
    answer.read_to_string(&mut said).unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{said}");
    assert!(said.contains("the CLI 0.0.1-elsewhere"), "{said}");
    assert!(said.contains("install both from one build"), "{said}");
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "it wrote in the VM dir"
    );
}

/// What a child wrote to a pipe so far, read on a thread of its own.
fn collect(mut pipe: impl Read + Send + 'static) -> std::sync::Arc<std::sync::Mutex<Vec<u8>>> {
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = got.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    got
}

fn text(got: &std::sync::Mutex<Vec<u8>>) -> String {
    String::from_utf8_lossy(&got.lock().unwrap()).into_owned()
}

/// Waits (10 s at most) for `child` to exit.
fn exits(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "{what} did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn console_shows_the_guest_forwards_input_and_detaches_and_logs_follow_to_the_end() {
    if !kvm_or_skip(
        "console_shows_the_guest_forwards_input_and_detaches_and_logs_follow_to_the_end",
    ) {
        return;
    }
    let h = Host::new();
    h.counting("con", 2);

    // `logs -f` from here to the VM's end, beside the console.
    let mut follow = h
        .cmd()
        .args(["logs", "-f", "con"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let followed = collect(follow.stdout.take().unwrap());

    let mut console = h
        .cmd()
        .args(["console", "con"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let shown = collect(console.stdout.take().unwrap());
    let said = collect(console.stderr.take().unwrap());
    let attached_at = last_count(&h.logs("con")).unwrap();
    eventually(
        "the console showing new counts",
        Duration::from_secs(10),
        || last_count(&text(&shown)).is_some_and(|n| n > attached_at + 1),
    );
    let mut stdin = console.stdin.take().unwrap();
    stdin.write_all(b"hello from the console\n").unwrap();
    eventually(
        "the guest echoing the input",
        Duration::from_secs(10),
        || text(&shown).contains("cocoon-guest: input: hello from the console"),
    );
    // Ctrl-] detaches; what follows it is not sent.
    stdin.write_all(b"\x1dnot sent\n").unwrap();
    let status = exits(&mut console, "console after Ctrl-]");
    assert!(status.success(), "{status}: {}", text(&said));
    assert!(text(&said).contains("detached from con"), "{}", text(&said));
    drop(stdin);
    assert_eq!(h.state_of("con"), "running", "detaching stops nothing");
    let now = last_count(&h.logs("con")).unwrap();
    eventually("counting after the detach", Duration::from_secs(10), || {
        last_count(&h.logs("con")).is_some_and(|n| n > now)
    });
    assert!(!h.logs("con").contains("not sent"));

    h.ok(&["stop", "--force", "con"]);
    let status = exits(&mut follow, "logs -f after the VM stopped");
    assert!(status.success(), "{status}");
    // What `logs -f` printed is the log as it ended: every count once, in
    // order, none lost at the point where it went from the file so far to
    // the output still coming.
    let log = h.logs("con");
    let got = text(&followed);
    assert!(
        log.starts_with(&got),
        "logs -f printed what the log lacks:\n{got}"
    );
    let counts: Vec<&str> = got.lines().filter(|l| l.contains("count n=")).collect();
    let all: Vec<&str> = log.lines().filter(|l| l.contains("count n=")).collect();
    assert_eq!(counts, all, "logs -f missed counts");
    assert!(got.contains("cocoon-guest: input: hello from the console"));
    h.ok(&["rm", "con"]);
}

#[test]
fn stop_asks_the_guest_first_and_stops_a_guest_that_does_not_answer_after_the_timeout() {
    if !kvm_or_skip(
        "stop_asks_the_guest_first_and_stops_a_guest_that_does_not_answer_after_the_timeout",
    ) {
        return;
    }
    let h = Host::new();
    // A guest that answers: Ctrl-Alt-Del on its i8042, and it powers off.
    h.counting("kind", 1);
    assert_eq!(h.ok(&["stop", "kind"]).trim(), "kind powered off");
    assert!(
        h.logs("kind")
            .contains("cocoon-guest: ctrl-alt-del: powering off"),
        "{}",
        h.logs("kind")
    );
    let vm = h.vm("kind");
    assert_eq!(vm["state"], "stopped");
    assert!(
        vm["exit"]
            .as_str()
            .unwrap()
            .contains("the guest powered off"),
        "{vm}"
    );

    // A guest that does not answer (the test guest's `cocoon.hang`:
    // interrupts off, halted) is stopped hard once the timeout has passed,
    // and not before.
    h.run_detached("hung", "console=ttyS0 cocoon.hang=0");
    eventually("the guest hanging", Duration::from_secs(20), || {
        h.logs("hung").contains("cocoon-guest: hang")
    });
    let t = Instant::now();
    assert_eq!(
        h.ok(&["stop", "--timeout", "1", "hung"]).trim(),
        "hung stopped after the timeout"
    );
    assert!(t.elapsed() >= Duration::from_secs(1), "{:?}", t.elapsed());
    let vm = h.vm("hung");
    assert_eq!(vm["state"], "stopped");
    assert!(
        vm["exit"].as_str().unwrap().contains("stopped by the host"),
        "{vm}"
    );
    assert!(!h.logs("hung").contains("ctrl-alt-del"));
    h.ok(&["rm", "kind"]);
    h.ok(&["rm", "hung"]);
    assert!(h.vm_dirs().is_empty());
}

/// `run -d -o json` of `image` as `name`, with `extra` flags before it.
fn run_json(h: &Host, name: &str, image: &Path, extra: &[&str]) -> serde_json::Value {
    let o = h
        .run_cmd(
            name,
            image,
            TICKING,
            &[&["-d", "-o", "json"], extra].concat(),
        )
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn create_keeps_the_flags_and_starts_nothing_and_run_says_what_was_pulled_and_converted() {
    if !kvm_or_skip(
        "create_keeps_the_flags_and_starts_nothing_and_run_says_what_was_pulled_and_converted",
    ) {
        return;
    }
    let h = Host::new();
    let qcow2 = h.state.path().join("disk.qcow2");
    let made = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&h.image)
        .arg(&qcow2)
        .status()
        .unwrap();
    assert!(made.success());
    let guest = test_guest();
    let create = |pull: &str| {
        h.run(&[
            "create",
            "--pull",
            pull,
            "--cpus",
            "2",
            "--memory",
            "48M",
            "--cow-size",
            "32M",
            "--data-disk",
            "size=16M,name=d1,fstype=none",
            "--kernel",
            guest.to_str().unwrap(),
            "--cmdline",
            TICKING,
            qcow2.to_str().unwrap(),
        ])
    };

    // --pull never, before anything is in the store: refused, nothing made.
    let o = create("never");
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("disk.qcow2 is not in the store and the pull policy is `never`"),
        "{e}"
    );
    assert!(h.vm_dirs().is_empty(), "{:?}", h.vm_dirs());

    // create without --name: a generated name, the flags in the record,
    // and no monitor.
    let o = create("missing");
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{said}");
    let name = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(
        name.len() <= 63
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
        "generated name {name:?}"
    );
    assert!(said.contains(", pulled)"), "{said}");
    assert!(said.contains(", converted)"), "{said}");
    let vm = h.vm(&name);
    assert_eq!(vm["state"], "created", "{vm}");
    assert!(vm["pid"].is_null(), "{vm}");
    let record = &h.json(&["inspect", &name, "-o", "json"])["record"];
    assert_eq!(record["machine"]["cpus"], 2);
    assert_eq!(record["machine"]["memory"], 48 << 20);
    assert_eq!(record["machine"]["cmdline"], TICKING);
    let disks: Vec<(String, u64)> = record["storage"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["serial"].as_str().unwrap().to_string(),
                std::fs::metadata(d["path"].as_str().unwrap())
                    .unwrap()
                    .len(),
            )
        })
        .collect();
    assert_eq!(
        disks,
        [
            ("cocoon-root".to_string(), 32 << 20),
            ("d1".to_string(), 16 << 20),
            ("cocoon-cidata".to_string(), 1 << 20),
        ]
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        h.logs(&name).is_empty(),
        "a created VM ran: {}",
        h.logs(&name)
    );

    // start boots it with those files.
    h.ok(&["start", &name]);
    assert_eq!(h.state_of(&name), "running");
    eventually("the created VM counting", Duration::from_secs(20), || {
        last_count(&h.logs(&name)).is_some_and(|n| n >= 1)
    });
    assert_eq!(
        h.json(&["inspect", &name, "-o", "json"])["record"]["storage"],
        record["storage"]
    );

    // run -o json: the image and its conversion come from the caches now,
    // and --pull never is content with the store.
    for (vm, pull) in [("second", "missing"), ("third", "never")] {
        let steps = run_json(&h, vm, &qcow2, &["--pull", pull]);
        assert_eq!(steps["name"], vm, "{steps}");
        assert_eq!(steps["state"], "running", "{steps}");
        assert_eq!(steps["image"]["pull"], "cached", "{steps}");
        assert_eq!(steps["image"]["conversion"], "cached", "{steps}");
        assert_eq!(steps["image"]["format"], "qcow2", "{steps}");
        let roles: Vec<&str> = steps["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["cow", "cidata"], "{steps}");
    }
    for vm in [name.as_str(), "second", "third"] {
        h.ok(&["rm", "--force", vm]);
    }
    assert!(h.vm_dirs().is_empty());
}

#[test]
fn a_foreground_run_interrupted_stops_its_guest_and_exits_130_with_json_saying_so() {
    if !kvm_or_skip(
        "a_foreground_run_interrupted_stops_its_guest_and_exits_130_with_json_saying_so",
    ) {
        return;
    }
    let h = Host::new();
    // A guest that never ends by itself: only the host can stop it.
    let mut child = h
        .run_cmd(
            "fg",
            &h.image,
            "console=ttyS0 cocoon.hang=0",
            &["--rm", "-o", "json"],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually("the guest hanging", Duration::from_secs(20), || {
        h.vm("fg")["state"] == "running" && h.logs("fg").contains("cocoon-guest: hang")
    });
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    // Its output is small (-o json keeps the console off stdout), so the
    // pipes need no reader until it has exited.
    exits(&mut child, "run after SIGINT");
    let o = child.wait_with_output().unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert_eq!(o.status.code(), Some(130), "{out}\n{err}");
    let steps: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
    assert_eq!(steps["name"], "fg", "{steps}");
    assert_eq!(steps["state"], "stopped", "{steps}");
    assert_eq!(steps["exit"]["kind"], "stopped", "{steps}");
    assert!(
        !out.contains("cocoon-guest:"),
        "-o json keeps the console off stdout"
    );
    assert!(h.vm_dirs().is_empty(), "--rm: {:?}", h.vm_dirs());
}

/// Reads `reader` until `want` has come, then drops it: the writer's
/// next write finds the pipe closed, as under `| head`.
fn read_until_then_close(mut reader: std::io::PipeReader, want: &str) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(want) {
        let n = reader.read(&mut buf).unwrap();
        assert!(n > 0, "the output ended before {want:?}");
        got.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn a_closed_stdout_stops_a_foreground_run_and_ends_logs_follow_quietly() {
    if !kvm_or_skip("a_closed_stdout_stops_a_foreground_run_and_ends_logs_follow_quietly") {
        return;
    }
    let h = Host::new();
    // `run IMAGE | head`: the console's reader goes; the VM does not stay
    // behind unseen, --rm still removes it.
    let (reader, writer) = std::io::pipe().unwrap();
    let mut run = h
        .run_cmd("fg", &h.image, TICKING, &["--rm"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    read_until_then_close(reader, "cocoon-guest: count n=2");
    exits(&mut run, "run after its stdout closed");
    let o = run.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("rm: VM fg removed"), "{err}");
    assert!(h.vm_dirs().is_empty(), "--rm: {:?}", h.vm_dirs());

    // `logs -f | head`: it ends at once, quietly; the VM runs on.
    h.run_detached("bg", TICKING);
    let (reader, writer) = std::io::pipe().unwrap();
    let mut logs = h
        .cmd()
        .args(["logs", "-f", "bg"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    read_until_then_close(reader, "cocoon-guest: count n=2");
    exits(&mut logs, "logs -f after its stdout closed");
    let o = logs.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(141), "{err}");
    assert_eq!(err, "");
    assert_eq!(h.state_of("bg"), "running");
    h.ok(&["rm", "--force", "bg"]);
}
