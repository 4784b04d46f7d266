//! Snapshot save and restore of a 256 MiB test guest, beside QEMU's microvm
//! (`migrate` to a file, `-incoming` from it) in the same run. Prints each
//! ours/QEMU ratio and a Markdown table on stdout (between BEGIN/END
//! markers) for `scripts/bench-snapshot` to record.
//!
//! `cargo bench -p cocoon-vmm --bench snapshot [-- --runs N]`
//!
//! The guest runs `cocoon.count=20:0` (a counter in guest memory, printed
//! every 20 ms): a restore is "running" when the restored guest prints its
//! next count. Our restore-to-output side is this binary re-executed as a
//! VMM process (env COCOON_BENCH_RESTORE=DIR), so both sides pay a process
//! start there.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cocoon_vmm::snapshot::{RestoreConfig, VmShell, MEMORY_FILE, STATE_FILE};
use cocoon_vmm::{SerialOutput, Vm, VmConfig};
use common::{build_guest, median, preflight, runs_arg};

mod common;

const GUEST_RAM: u64 = 256 << 20;
const CMDLINE: &str = "cocoon.count=20:0";
const TIMEOUT: Duration = Duration::from_secs(60);

fn restore_config(dir: &Path, serial: SerialOutput) -> RestoreConfig {
    RestoreConfig {
        state: dir.join(STATE_FILE),
        memory: dir.join(MEMORY_FILE),
        disks: Vec::new(),
        nets: Vec::new(),
        serial,
    }
}

/// Our VMM as a restore process: the snapshot in DIR, COM1 on stdout.
fn restore_main(dir: &str) -> ! {
    match Vm::restore(restore_config(Path::new(dir), SerialOutput::Stdout)) {
        Ok(mut vm) => {
            vm.wait();
            std::process::exit(0)
        }
        Err(e) => {
            eprintln!("restore: {e}");
            std::process::exit(2)
        }
    }
}

/// The highest `count n=` in `text`.
fn last_count(text: &str) -> Option<u64> {
    text.lines()
        .filter_map(|l| l.split("count n=").nth(1))
        .filter_map(|r| r.split(' ').next()?.parse().ok())
        .max()
}

fn wait_count(log: &Path, at_least: u64) {
    let t0 = Instant::now();
    while last_count(&std::fs::read_to_string(log).unwrap_or_default()).unwrap_or(0) < at_least {
        assert!(
            t0.elapsed() < TIMEOUT,
            "no count {at_least} in {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Spawns `cmd` with stdout piped and returns the time to the first full
/// `count` line above `after`.
fn time_to_count(mut cmd: Command, after: u64) -> Result<Duration, String> {
    let t0 = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn: {e}"))?;
    let out = BufReader::new(child.stdout.take().unwrap());
    let mut found = None;
    for line in out.lines() {
        let Ok(line) = line else { break };
        if line.starts_with("cocoon-guest: count") && last_count(&line).is_some_and(|n| n > after) {
            found = Some(t0.elapsed());
            break;
        }
        if t0.elapsed() > TIMEOUT {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    found.ok_or_else(|| "no count line after restore".into())
}

#[derive(Debug, Default, Clone, Copy)]
struct Ours {
    pause_ms: f64,
    save_ms: f64,
    cold_restore_ms: f64,
    shell_ms: f64,
    warm_restore_ms: f64,
    to_output_ms: f64,
    memory_data_mib: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn ours_run(guest: &Path, dir: &Path) -> Ours {
    let log = dir.join("source.log");
    let snap = dir.join("snap");
    let _ = std::fs::remove_dir_all(&snap);
    std::fs::create_dir_all(&snap).unwrap();
    let mut config = VmConfig::new(guest);
    config.memory = GUEST_RAM;
    config.cmdline = CMDLINE.into();
    config.serial = SerialOutput::File(log.clone());
    let _ = std::fs::remove_file(&log);
    let mut vm = Vm::start(config).expect("boot");
    wait_count(&log, 3);
    let t = Instant::now();
    vm.pause();
    let pause = t.elapsed();
    let t = Instant::now();
    let info = vm.snapshot(&snap).expect("snapshot");
    let save = t.elapsed();
    vm.stop();
    vm.wait();
    let last = last_count(&std::fs::read_to_string(&log).unwrap()).unwrap();

    let rlog = dir.join("restored.log");
    let _ = std::fs::remove_file(&rlog);
    let t = Instant::now();
    let mut r =
        Vm::restore(restore_config(&snap, SerialOutput::File(rlog.clone()))).expect("restore");
    let cold = t.elapsed();
    wait_count(&rlog, last + 1);
    r.stop();
    r.wait();

    let t = Instant::now();
    let shell = VmShell::new(GUEST_RAM).expect("shell");
    let shell_time = t.elapsed();
    let t = Instant::now();
    let mut w = Vm::restore_with_shell(shell, restore_config(&snap, SerialOutput::Sink))
        .expect("restore into a shell");
    let warm = t.elapsed();
    w.stop();
    w.wait();

    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.env("COCOON_BENCH_RESTORE", &snap);
    let to_output = time_to_count(cmd, last).expect("our restore process");
    Ours {
        pause_ms: ms(pause),
        save_ms: ms(save),
        cold_restore_ms: ms(cold),
        shell_ms: ms(shell_time),
        warm_restore_ms: ms(warm),
        to_output_ms: ms(to_output),
        memory_data_mib: info.memory_data_bytes as f64 / f64::from(1u32 << 20),
    }
}

/// A line-oriented QMP client.
struct Qmp {
    out: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let t0 = Instant::now();
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if t0.elapsed() < TIMEOUT => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => panic!("QMP {}: {e}", path.display()),
            }
        };
        let mut q = Qmp {
            out: s.try_clone().unwrap(),
            reader: BufReader::new(s),
        };
        let mut greeting = String::new();
        q.reader.read_line(&mut greeting).unwrap();
        q.cmd(serde_json::json!({"execute": "qmp_capabilities"}));
        q
    }

    fn cmd(&mut self, c: serde_json::Value) -> serde_json::Value {
        writeln!(self.out, "{c}").unwrap();
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v.get("event").is_none() {
                return v;
            }
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Qemu {
    save_ms: f64,
    downtime_ms: f64,
    to_output_ms: f64,
    stream_mib: f64,
}

fn qemu_base(guest: &Path) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-M", "microvm,acpi=off", "-enable-kvm", "-m"])
        .arg(format!("{}M", GUEST_RAM >> 20))
        .args(["-smp", "1", "-nodefaults", "-no-user-config", "-nographic"])
        .args(["-no-reboot", "-kernel"])
        .arg(guest)
        .args(["-append", CMDLINE])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"]);
    c
}

fn qemu_run(guest: &Path, dir: &Path) -> Qemu {
    let log = dir.join("qemu.log");
    let sock = dir.join("qmp.sock");
    let stream = dir.join("qemu.mig");
    for p in [&log, &sock, &stream] {
        let _ = std::fs::remove_file(p);
    }
    let mut src: Child = qemu_base(guest)
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("qemu.err")).unwrap())
        .spawn()
        .expect("spawn qemu");
    let mut qmp = Qmp::connect(&sock);
    wait_count(&log, 3);
    // QEMU's snapshot to a file: a migration; it stops the guest for the
    // last pass and leaves it stopped.
    let t = Instant::now();
    qmp.cmd(serde_json::json!({"execute": "migrate", "arguments": {
        "uri": format!("exec:cat > {}", stream.display())}}));
    let done = loop {
        let r = qmp.cmd(serde_json::json!({"execute": "query-migrate"}));
        match r["return"]["status"].as_str() {
            Some("completed") => break r,
            Some("failed") | Some("cancelled") => panic!("qemu migrate: {r}"),
            _ => std::thread::sleep(Duration::from_micros(500)),
        }
    };
    let wall = t.elapsed();
    // QEMU may close the socket before it answers.
    let _ = writeln!(qmp.out, "{}", serde_json::json!({"execute": "quit"}));
    let _ = src.wait();
    let last = last_count(&std::fs::read_to_string(&log).unwrap()).unwrap();
    let mut dst = qemu_base(guest);
    dst.args(["-serial", "stdio", "-incoming"])
        .arg(format!("exec:cat {}", stream.display()));
    let to_output = time_to_count(dst, last).expect("qemu -incoming");
    Qemu {
        save_ms: done["return"]["total-time"].as_f64().unwrap_or(ms(wall)),
        downtime_ms: done["return"]["downtime"].as_f64().unwrap_or(0.0),
        to_output_ms: ms(to_output),
        stream_mib: std::fs::metadata(&stream).map(|m| m.len()).unwrap_or(0) as f64
            / f64::from(1u32 << 20),
    }
}

fn main() {
    if let Ok(dir) = std::env::var("COCOON_BENCH_RESTORE") {
        restore_main(&dir);
    }
    let runs = runs_arg(5);
    let Some(have_qemu) = preflight() else {
        return;
    };
    let guest = build_guest();
    let dir = tempfile::tempdir().unwrap();
    // One warm-up each, then alternate.
    let _ = ours_run(&guest, dir.path());
    if have_qemu {
        let _ = qemu_run(&guest, dir.path());
    }
    let (mut o, mut q) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let s = ours_run(&guest, dir.path());
        eprintln!("ours run {i}: {s:?}");
        o.push(s);
        if have_qemu {
            let s = qemu_run(&guest, dir.path());
            eprintln!("qemu run {i}: {s:?}");
            q.push(s);
        }
    }
    let med = |f: fn(&Ours) -> f64| median(o.iter().map(f).collect());
    let qmed = |f: fn(&Qemu) -> f64| (!q.is_empty()).then(|| median(q.iter().map(f).collect()));
    let mut rows: Vec<(String, f64, Option<f64>, &str)> = vec![
        (
            "snapshot save: ours pause + state + memory files fsynced; QEMU `migrate` to a file (ms)".into(),
            med(|s| s.pause_ms + s.save_ms),
            qmed(|s| s.save_ms),
            "lower is better",
        ),
        (
            "restore process start → restored guest's next output (ms)".into(),
            med(|s| s.to_output_ms),
            qmed(|s| s.to_output_ms),
            "lower is better",
        ),
    ];
    rows.push((
        "ours: Vm::pause of a running guest (vCPUs and disk threads parked) (ms)".into(),
        med(|s| s.pause_ms),
        None,
        "",
    ));
    rows.push((
        "ours: Vm::restore, cold (VMM time, KVM VM created inside) (ms)".into(),
        med(|s| s.cold_restore_ms),
        None,
        "anchor: the KVM VM alone, next row",
    ));
    rows.push((
        "ours: VmShell::new, the KVM VM + irqchip + PIT + memory slots alone (ms)".into(),
        med(|s| s.shell_ms),
        None,
        "what this host's KVM costs",
    ));
    rows.push((
        "ours: Vm::restore_with_shell, warm (VMM time) (ms)".into(),
        med(|s| s.warm_restore_ms),
        None,
        "goal < 10 ms",
    ));
    println!("BEGIN-SNAPSHOT-BENCH");
    println!("| metric (median of {runs}) | cocoon-vmm | QEMU microvm | ours/QEMU | |");
    println!("|---|---:|---:|---:|---|");
    for (name, ours, qemu, note) in rows {
        match qemu {
            Some(qv) => println!(
                "| {name} | {ours:.2} | {qv:.2} | {:.2} | {note} |",
                ours / qv
            ),
            None => println!("| {name} | {ours:.2} | | | {note} |"),
        }
    }
    println!(
        "| data written: ours memory file (non-zero pages); QEMU migration stream (MiB) | {:.2} | {} | | |",
        med(|s| s.memory_data_mib),
        qmed(|s| s.stream_mib).map_or("".into(), |v| format!("{v:.2}"))
    );
    if let Some(d) = qmed(|s| s.downtime_ms) {
        println!("| QEMU's own downtime figure for the migration (ms) | | {d:.2} | | |");
    }
    println!("END-SNAPSHOT-BENCH");
}
