//! Guest-to-host network throughput beside QEMU's microvm, in the same run:
//! the test guest blasts frames through its virtio-net device into a tap
//! (`cocoon.net.blast`: 1514-byte UDP frames, and 64 KiB TCP frames with
//! TSO that the tap takes whole), and reports its own timing from the
//! first send to the last completion. The host checks that the tap counted
//! every frame. Prints ours/QEMU ratios and a Markdown table on stdout
//! (between BEGIN/END markers) for `scripts/bench-net` to record.
//!
//! `cargo bench -p cocoon-vmm --bench net [-- --runs N]`
//!
//! Both VMMs run inside a network namespace the benchmark makes (and
//! removes), on one persistent tap that is up and has no address, so the
//! host stack drops the frames after counting them. Our side is this same
//! binary re-executed as a VMM process (env COCOON_BENCH_NET_VMM=1).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cocoon_vmm::{NetConfig, SerialOutput, VmConfig};

mod common;
use common::{build_guest, median, preflight, run_vmm_process, runs_arg};

const GUEST_RAM_MIB: u64 = 128;
const TAP: &str = "cbench0";
const MAC: [u8; 6] = [0x02, 0xcb, 0, 0, 0, 1];
const PLAIN_LEN: u32 = 1514;
const PLAIN_COUNT: u32 = 3000;
const TSO_LEN: u32 = 65549;
const TSO_COUNT: u32 = 300;
const TIMEOUT: Duration = Duration::from_secs(180);

fn cmdline() -> String {
    format!(
        "cocoon.net.blast=0:{PLAIN_LEN}:{PLAIN_COUNT} cocoon.net.blast=0:{TSO_LEN}:{TSO_COUNT}:tso"
    )
}

/// Our VMM as a process: `KERNEL` in argv, COM1 on stdout.
fn vmm_main() -> ! {
    let args: Vec<String> = std::env::args().collect();
    let mut config = VmConfig::new(&args[1]);
    config.memory = GUEST_RAM_MIB << 20;
    config.cmdline = cmdline();
    config.nets.push(NetConfig {
        tap: TAP.into(),
        mac: MAC,
    });
    config.serial = SerialOutput::Stdout;
    run_vmm_process(config)
}

/// One blast as the guest timed it.
#[derive(Debug, Clone, Copy)]
struct Blast {
    len: u32,
    count: u32,
    ns: f64,
}

impl Blast {
    fn mib_s(&self) -> f64 {
        f64::from(self.len) * f64::from(self.count) / (1 << 20) as f64 / (self.ns / 1e9)
    }
    fn pps(&self) -> f64 {
        f64::from(self.count) / (self.ns / 1e9)
    }
}

#[derive(Debug)]
struct Sample {
    plain: Blast,
    tso: Blast,
    /// Frames the tap counted as received from the VM during the run.
    tap_frames: u64,
}

struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let ns = Netns(format!("cocoon-bench-net-{}", std::process::id()));
        run(&["ip", "netns", "add", &ns.0]);
        ns.ip(&format!("tuntap add dev {TAP} mode tap"));
        ns.ip(&format!("link set {TAP} up"));
        ns.ip("link set lo up");
        ns
    }

    fn ip(&self, args: &str) {
        let mut argv = vec!["ip", "-n", &self.0];
        argv.extend(args.split_whitespace());
        run(&argv);
    }

    /// `ip netns exec NS PROGRAM…`
    fn wrap(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).arg(program);
        c
    }

    fn tap_rx_packets(&self) -> u64 {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "cat"])
            .arg(format!("/sys/class/net/{TAP}/statistics/rx_packets"))
            .output()
            .expect("read the tap's counters");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("a packet count")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(argv: &[&str]) {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .expect("run a set-up command");
    assert!(
        out.status.success(),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run_one(ns: &Netns, mut cmd: Command) -> Result<Sample, String> {
    let before = ns.tap_rx_packets();
    let t0 = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn: {e}"))?;
    let stdout = child.stdout.take().unwrap();
    let mut blasts = Vec::new();
    let mut errors = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if let Some(rest) = line.strip_prefix("cocoon-guest: net-blast ") {
            let field = |k: &str| rest.split(' ').find_map(|kv| kv.strip_prefix(k));
            if let (Some(len), Some(count), Some(ns)) = (
                field("len=").and_then(|v| v.parse().ok()),
                field("count=").and_then(|v| v.parse().ok()),
                field("ns=").and_then(|v| v.parse().ok()),
            ) {
                blasts.push(Blast { len, count, ns });
            }
        }
        if line.starts_with("cocoon-guest: error") {
            errors.push(line.clone());
        }
        if t0.elapsed() > TIMEOUT {
            let _ = child.kill();
            break;
        }
    }
    let _ = child.wait();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    let tap_frames = ns.tap_rx_packets() - before;
    match blasts[..] {
        [plain, tso] if errors.is_empty() => Ok(Sample {
            plain,
            tso,
            tap_frames,
        }),
        _ => Err(format!(
            "blasts {blasts:?}, guest errors {errors:?}; stderr: {err}"
        )),
    }
}

fn ours(ns: &Netns, guest: &Path) -> Command {
    let mut c = ns.wrap(&std::env::current_exe().unwrap());
    c.env("COCOON_BENCH_NET_VMM", "1").arg(guest);
    c
}

fn qemu(ns: &Netns, guest: &Path) -> Command {
    let mac = MAC
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let mut c = ns.wrap(Path::new("qemu-system-x86_64"));
    c.args(["-M", "microvm,acpi=off", "-enable-kvm", "-m"])
        .arg(format!("{GUEST_RAM_MIB}M"))
        .args([
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
        ])
        .args(["-serial", "stdio", "-kernel"])
        .arg(guest)
        .args(["-append", &cmdline()])
        .arg("-netdev")
        .arg(format!(
            "tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off"
        ))
        .arg("-device")
        .arg(format!("virtio-net-device,netdev=n0,mac={mac}"))
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"]);
    c
}

fn main() {
    if std::env::var("COCOON_BENCH_NET_VMM").is_ok() {
        vmm_main();
    }
    let runs = runs_arg(3);
    let Some(have_qemu) = preflight() else {
        return;
    };
    let guest = build_guest();
    let ns = Netns::new();
    let want_frames = u64::from(PLAIN_COUNT + TSO_COUNT);
    let mut o = Vec::new();
    let mut q = Vec::new();
    let _ = run_one(&ns, ours(&ns, &guest));
    if have_qemu {
        let _ = run_one(&ns, qemu(&ns, &guest));
    }
    for i in 0..runs {
        let s = run_one(&ns, ours(&ns, &guest)).unwrap_or_else(|e| panic!("ours, run {i}: {e}"));
        eprintln!("ours  run {i}: {s:?}");
        assert_eq!(s.tap_frames, want_frames, "the tap counted every frame");
        o.push(s);
        if have_qemu {
            let s =
                run_one(&ns, qemu(&ns, &guest)).unwrap_or_else(|e| panic!("qemu, run {i}: {e}"));
            eprintln!("qemu  run {i}: {s:?}");
            assert_eq!(s.tap_frames, want_frames, "the tap counted every frame");
            q.push(s);
        }
    }
    type Metric = fn(&Sample) -> f64;
    let rows: [(&str, Metric); 4] = [
        ("1514-byte UDP frames, MiB/s", |s| s.plain.mib_s()),
        ("1514-byte UDP frames, packets/s", |s| s.plain.pps()),
        ("64 KiB TSO frames, MiB/s", |s| s.tso.mib_s()),
        ("64 KiB TSO frames, frames/s", |s| s.tso.pps()),
    ];
    println!("BEGIN-NET-BENCH");
    println!(
        "| metric (median of {runs}, higher is better) | cocoon-vmm | QEMU microvm | ours/QEMU |"
    );
    println!("|---|---:|---:|---:|");
    for (name, f) in rows {
        let ours = median(o.iter().map(f).collect());
        if have_qemu {
            let theirs = median(q.iter().map(f).collect());
            println!(
                "| {name} | {ours:.1} | {theirs:.1} | {:.2} |",
                ours / theirs
            );
            eprintln!(
                "{name}: ours {ours:.1}, qemu {theirs:.1}, ratio {:.2}",
                ours / theirs
            );
        } else {
            println!("| {name} | {ours:.1} | - | - |");
        }
    }
    println!("END-NET-BENCH");
}
