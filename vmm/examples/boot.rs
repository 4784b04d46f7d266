//! A minimal VMM process over the library, for manual runs and for the
//! benchmark script (which must time a whole process, as it does QEMU):
//!
//! `boot KERNEL [--cmdline S] [--disk PATH[:ro]]... [--cpus N] [--memory MIB]`
//!
//! COM1 goes to stdout. The process exits 0 on guest power-off, 1 on reset,
//! 2 on error.

use cocoon_vmm::{DiskConfig, ExitReason, SerialOutput, Vm, VmConfig};

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(kernel) = args.next() else {
        eprintln!(
            "usage: boot KERNEL [--cmdline S] [--disk PATH[:ro]]... [--cpus N] [--memory MIB]"
        );
        std::process::exit(2);
    };
    let mut config = VmConfig::new(kernel);
    config.serial = SerialOutput::Stdout;
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_default();
        match flag.as_str() {
            "--cmdline" => config.cmdline = value,
            "--cpus" => config.cpus = value.parse().unwrap_or(1),
            "--memory" => config.memory = value.parse::<u64>().unwrap_or(256) << 20,
            "--disk" => {
                let (path, ro) = match value.strip_suffix(":ro") {
                    Some(p) => (p.to_string(), true),
                    None => (value, false),
                };
                let mut d = DiskConfig::new(path);
                d.read_only = ro;
                config.disks.push(d);
            }
            other => {
                eprintln!("unknown flag {other}");
                std::process::exit(2);
            }
        }
    }
    let mut vm = match Vm::start(config) {
        Ok(vm) => vm,
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            eprintln!("boot: {msg}");
            std::process::exit(2);
        }
    };
    let reason = vm.wait();
    eprintln!("boot: {reason}");
    std::process::exit(match reason {
        ExitReason::PowerOff => 0,
        ExitReason::Reset => 1,
        _ => 2,
    });
}
