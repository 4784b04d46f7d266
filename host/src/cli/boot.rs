//! `cocoon-host boot`: boot a kernel directly on the cocoon VMM.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use cocoon_host::disk::lock::{DiskLocks, Wait};
use cocoon_vmm::{DiskConfig, ExitReason, SerialOutput, Vm, VmConfig};

use cocoon_host::net::{self, Addressing, Netlink};

/// Boot a kernel directly on the built-in VMM.
///
/// COM1 is this terminal (or --serial-log). SIGINT/SIGTERM stop the VM.
/// Every writable disk is locked for as long as the VM runs: a disk that
/// another VM or operation holds, or one given twice, is refused.
/// Exit status: 0 guest power-off, 3 guest reset, 130 stopped by a signal,
/// 1 error.
#[derive(Debug, Args)]
pub struct BootArgs {
    /// Kernel: an ELF with a PVH entry note (vmlinux, the test guest) or a bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; `virtio_mmio.device=` entries for the disks are appended.
    #[arg(long, default_value = "console=ttyS0")]
    pub cmdline: String,
    /// A virtio-blk disk, in order; repeatable.
    #[arg(
        long = "disk",
        value_name = "PATH[,ro][,serial=S][,direct]",
        value_parser = DiskConfig::parse_spec
    )]
    pub disks: Vec<DiskConfig>,
    /// Number of vCPUs (1 to 254).
    #[arg(
        long,
        default_value_t = 1,
        value_parser = clap::value_parser!(u8).range(1..=i64::from(cocoon_vmm::vm::MAX_VCPUS))
    )]
    pub cpus: u8,
    /// Guest RAM: 512 (MiB), 512M, 2G.
    #[arg(long, default_value = "256M", value_parser = cocoon_vmm::parse_memory_size)]
    pub memory: u64,
    #[command(flatten)]
    pub net: super::net::NetArgs,
    /// Append COM1 output to this file instead of the terminal.
    #[arg(long, value_name = "FILE")]
    pub serial_log: Option<PathBuf>,
}

/// Locks the writable disks (exclusive, beside each disk, sorted) and
/// refuses a file attached twice when either attachment writes it: two
/// writers, or a reader that sees another device's writes half-done.
pub fn lock_disks(disks: &[DiskConfig]) -> anyhow::Result<DiskLocks> {
    let mut seen: Vec<((u64, u64), &DiskConfig)> = Vec::new();
    for d in disks {
        let m = std::fs::metadata(&d.path).with_context(|| format!("disk {}", d.path.display()))?;
        let id = (m.dev(), m.ino());
        if let Some((_, other)) = seen
            .iter()
            .find(|(i, o)| *i == id && !(o.read_only && d.read_only))
        {
            anyhow::bail!(
                "disk {} is the same file as disk {}, and one of them is writable; a writable disk can be attached once",
                d.path.display(),
                other.path.display()
            );
        }
        seen.push((id, d));
    }
    let writable: Vec<PathBuf> = disks
        .iter()
        .filter(|d| !d.read_only)
        .map(|d| d.path.clone())
        .collect();
    Ok(DiskLocks::acquire(&writable, "boot", Wait::No)?)
}

pub fn run(args: BootArgs) -> anyhow::Result<i32> {
    let specs = net::spec::plan(&args.net.nics, &args.net.networks)?;
    if let Some(s) = specs.iter().find(|s| s.addressing != Addressing::Dhcp) {
        anyhow::bail!(
            "NIC {s}: boot writes no cloud-init seed, so ip= and gw= have nothing to configure"
        );
    }
    let nics = net::resolve(specs, &Default::default())?;
    let netlink = if nics.is_empty() {
        None
    } else {
        Some(Netlink::new()?)
    };
    let attached = match &netlink {
        Some(nl) => net::attach(nl, &nics, "cctap%d")?,
        None => Vec::new(),
    };
    for (i, a) in attached.iter().enumerate() {
        eprintln!("cocoon-host boot: nic{i} tap {} mac {}", a.tap, a.nic.mac);
    }
    let result = boot(args, attached.iter().map(|a| a.vmm_config()).collect());
    if let Some(nl) = &netlink {
        net::release(nl, &attached).context("delete the taps created for the VM")?;
    }
    result
}

fn boot(args: BootArgs, nets: Vec<cocoon_vmm::NetConfig>) -> anyhow::Result<i32> {
    // Held until the VM has stopped.
    let _locks = lock_disks(&args.disks)?;
    let config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        cpus: args.cpus,
        memory: args.memory,
        disks: args.disks,
        nets,
        serial: match args.serial_log {
            Some(path) => SerialOutput::File(path),
            None => SerialOutput::Stdout,
        },
    };
    // Before any VM thread exists, so that all of them inherit the mask and
    // only the watcher thread receives the signals.
    cocoon_vmm::signals::block_termination_signals().context("block SIGINT/SIGTERM")?;
    let mut vm = Vm::start(config).context("start the VM")?;
    cocoon_vmm::signals::stop_on_termination_signals(vm.stop_handle())
        .context("watch SIGINT/SIGTERM")?;
    let reason = vm.wait();
    eprintln!("cocoon-host boot: VM stopped: {reason}");
    Ok(match reason {
        ExitReason::PowerOff => 0,
        ExitReason::Reset => 3,
        ExitReason::HostRequest => 130,
        ExitReason::Error(_) => 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        boot: BootArgs,
    }

    #[test]
    fn cpus_accepts_exactly_what_the_vmm_runs() {
        let parse = |cpus: &str| Cli::try_parse_from(["boot", "--kernel", "k", "--cpus", cpus]);
        assert_eq!(parse("1").unwrap().boot.cpus, 1);
        assert_eq!(parse("254").unwrap().boot.cpus, 254);
        for bad in ["0", "255", "300"] {
            let e = parse(bad).err().unwrap().to_string();
            assert!(e.contains("1..=254"), "--cpus {bad}: {e}");
        }
    }
}
