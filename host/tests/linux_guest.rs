//! Real Linux guests booted from the very files the host prepares: the
//! kernel chosen by `guest::kernel::select` (Debian's cloud kernel from
//! `scripts/fetch-linux-kernel`, as `[vm] kernel`), the cocoon initramfs
//! built by `guest::initramfs::build`, and the disks of a
//! `disk::plan::Plan` made by `disk::create`, in plan order with their
//! serials, with the cidata seed; the plan reaches the init through
//! `guest::cmdline::BootPlan`.
//!
//! The VMM is ours when /dev/kvm has EPT or NPT; otherwise (this
//! machine's nested KVM has neither, and Linux cannot boot on it) QEMU's
//! microvm with `-accel tcg`, on the recipe in DESIGN.md ("VMM facts").
//! Each test prints which it used.
//!
//! - a disk image (GPT made with sfdisk, an ext4 root made with
//!   `mkfs.ext4 -d` from a busybox tree), as qcow2 by qemu-img, converted
//!   back by the host's conversion engine, booted to its own /sbin/init,
//!   by PARTUUID and by the first-ext4 fallback;
//! - a layered root (two squashfs layers by mksquashfs, the top one
//!   deleting a file of the base through an overlayfs whiteout), the cow
//!   and two ext4 data disks: the OCI process reports the overlay root,
//!   the layers' files, the deleted file absent, the cow writable, the data
//!   disks where the plan mounts them, the seed readable; after power-off
//!   the host reads back with debugfs the file the guest wrote on a data
//!   disk and the one it wrote on the cow's upper dir. A second boot runs
//!   the process as a named user and group.

mod disk_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cocoon_host::config::{HostConfig, VmSettings};
use cocoon_host::convert::{self, ConvertRequest, Converters, NoBacking, Silent};
use cocoon_host::disk::cidata::SeedInput;
use cocoon_host::disk::lock::{DiskLocks, Wait};
use cocoon_host::disk::plan::{BaseImage, ImageDisks, Plan};
use cocoon_host::disk::spec::{resolve, DataDiskSpec};
use cocoon_host::disk::{create, plan, StorageConfig};
use cocoon_host::guest::initramfs::{self, Initramfs};
use cocoon_host::guest::{
    kernel, BootPlan, ExecConfig, KernelChoice, KernelSource, RootKind, RootPartition,
};
use cocoon_host::plugin::{Registry, Runtime};
use cocoon_host::store::digest::{hash_reader, Digest};
use disk_common::{require, run, DefaultShape, State};

/// One boot under TCG takes 5 to 15 s here; a generous bound.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const MEMORY_MIB: u64 = 512;
/// The root partition's unique GUID in the disk-image test.
const ROOT_PARTUUID: &str = "4c7f2b1e-93d5-4a86-b0e2-6f1d8a9c3e57";

fn skip(test: &str, reason: &str) {
    cocoon_format_common::test_support::skip(test, reason);
}

fn require_kvm() -> bool {
    std::env::var("COCOON_REQUIRE_KVM").as_deref() == Ok("1")
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Where `scripts/fetch-linux-kernel` keeps Debian's cloud kernel.
fn linux_cache_dir() -> PathBuf {
    if let Ok(d) = std::env::var("COCOON_LINUX_CACHE") {
        return PathBuf::from(d);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    PathBuf::from(home).join(".cache/cocoon-host/linux")
}

/// Debian's cloud kernel as `[vm] kernel`, chosen by the host's own
/// selection, with its modules; fetched once (idempotent). Like the Linux
/// early-log test: skipped when it cannot be had, failed under
/// COCOON_REQUIRE_KVM=1.
fn linux_kernel(test: &str) -> Option<KernelChoice> {
    static FETCH: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let fetched = FETCH.get_or_init(|| {
        let dir = linux_cache_dir();
        let out = Command::new("bash")
            .arg(repo_root().join("scripts/fetch-linux-kernel"))
            .arg(&dir)
            .output()
            .map_err(|e| format!("cannot run scripts/fetch-linux-kernel: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "scripts/fetch-linux-kernel failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(dir.join("vmlinux"))
    });
    let vmlinux = match fetched {
        Ok(p) => p.clone(),
        Err(e) if !require_kvm() => {
            skip(test, e);
            return None;
        }
        Err(e) => panic!("{test}: {e}"),
    };
    let vm = VmSettings {
        kernel: Some(vmlinux.clone()),
        ..Default::default()
    };
    let choice = kernel::select(None, None, None, &vm).expect("select the configured kernel");
    assert_eq!(choice.source, KernelSource::Config);
    assert!(choice.uses_cocoon_initramfs());
    let release = std::fs::read_to_string(linux_cache_dir().join("release")).unwrap();
    assert_eq!(
        choice.release,
        release.trim(),
        "the release read from the vmlinux"
    );
    assert!(
        choice.modules.is_some(),
        "modules/RELEASE beside the kernel"
    );
    Some(choice)
}

fn tools(test: &str, extra: &[(&str, &str)]) -> bool {
    let base = [
        ("command -v qemu-system-x86_64", "qemu-system-x86"),
        (
            "test -x /bin/busybox && ! ldd /bin/busybox",
            "busybox-static",
        ),
        (
            "command -v mkfs.ext4 || test -x /usr/sbin/mkfs.ext4",
            "e2fsprogs",
        ),
        (
            "command -v debugfs || test -x /usr/sbin/debugfs",
            "e2fsprogs",
        ),
    ];
    base.iter()
        .chain(extra)
        .all(|(check, pkg)| require(test, check, pkg))
}

/// Which VMM boots Linux here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vmm {
    /// cocoon-vmm on KVM with hardware-assisted paging.
    Ours,
    /// QEMU microvm, `-accel tcg`.
    QemuTcg,
}

fn pick_vmm(test: &str) -> Vmm {
    let on = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| matches!(s.trim(), "Y" | "y" | "1"))
            .unwrap_or(false)
    };
    let paging =
        on("/sys/module/kvm_intel/parameters/ept") || on("/sys/module/kvm_amd/parameters/npt");
    let vmm = if paging && cocoon_vmm::check_kvm().is_ok() {
        Vmm::Ours
    } else {
        Vmm::QemuTcg
    };
    eprintln!(
        "{test}: booting Linux on {}",
        match vmm {
            Vmm::Ours => "cocoon-vmm (KVM with EPT/NPT)",
            Vmm::QemuTcg => "QEMU microvm -accel tcg (/dev/kvm has no EPT/NPT here)",
        }
    );
    vmm
}

/// Boots `kernel` + `initrd` with `disks` in order, returns the serial log
/// once the guest ends (it powers off through `reboot -f`).
fn boot(
    vmm: Vmm,
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    disks: &[StorageConfig],
    dir: &Path,
) -> String {
    let log = dir.join("serial.log");
    let _ = std::fs::remove_file(&log);
    let t0 = Instant::now();
    match vmm {
        Vmm::Ours => {
            let mut config = cocoon_vmm::VmConfig::new(kernel);
            config.initrd = Some(initrd.to_path_buf());
            config.cmdline = cmdline.to_string();
            config.memory = MEMORY_MIB << 20;
            config.disks = disks.iter().map(StorageConfig::to_vmm_disk).collect();
            config.serial = cocoon_vmm::SerialOutput::File(log.clone());
            let mut vm = cocoon_vmm::Vm::start(config).expect("start the VM");
            if vm.wait_timeout(BOOT_TIMEOUT).is_none() {
                vm.stop();
            }
            let reason = vm.wait();
            let out = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(
                matches!(
                    reason,
                    cocoon_vmm::ExitReason::PowerOff | cocoon_vmm::ExitReason::Reset
                ),
                "{reason}: {out}"
            );
        }
        Vmm::QemuTcg => {
            // The kernel finds virtio-mmio devices only through ACPI (on
            // by default in microvm); lpj and tsc_early_khz skip the TSC
            // calibration that hangs under TCG.
            let cmdline = format!("{cmdline} lpj=555008 tsc_early_khz=2400000");
            let mut cmd = Command::new("qemu-system-x86_64");
            cmd.args(["-M", "microvm", "-accel", "tcg", "-cpu", "max", "-smp", "1"])
                .args(["-m", &MEMORY_MIB.to_string()])
                .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
                .arg("-serial")
                .arg(format!("file:{}", log.display()))
                .arg("-kernel")
                .arg(kernel)
                .arg("-initrd")
                .arg(initrd)
                .args(["-append", &cmdline]);
            for (i, d) in disks.iter().enumerate() {
                cmd.arg("-drive").arg(format!(
                    "id=d{i},file={},format=raw,if=none,readonly={}",
                    d.path.display(),
                    if d.read_only { "on" } else { "off" }
                ));
                cmd.arg("-device")
                    .arg(format!("virtio-blk-device,drive=d{i},serial={}", d.serial));
            }
            let mut child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("run qemu-system-x86_64");
            let status = loop {
                if let Some(s) = child.try_wait().unwrap() {
                    break Some(s);
                }
                if t0.elapsed() > BOOT_TIMEOUT {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            let out = std::fs::read_to_string(&log).unwrap_or_default();
            let status = status
                .unwrap_or_else(|| panic!("the guest did not end within {BOOT_TIMEOUT:?}:\n{out}"));
            let mut stderr = String::new();
            use std::io::Read;
            let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
            assert!(status.success(), "qemu: {status}: {stderr}\n{out}");
        }
    }
    eprintln!("boot took {:.1} s", t0.elapsed().as_secs_f64());
    std::fs::read_to_string(&log).unwrap()
}

/// The lines after `prefix` (`cocoon-init: `, `report: `).
fn lines<'a>(serial: &'a str, prefix: &str) -> Vec<&'a str> {
    serial
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter_map(|l| l.strip_prefix(prefix))
        .collect()
}

/// A busybox tree: /bin/busybox and every applet beside it in /bin.
fn busybox_tree(root: &Path) {
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
    let list = run(Command::new("/bin/busybox").arg("--list"));
    for applet in String::from_utf8(list).unwrap().lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
    }
}

fn write_exec(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn seed() -> SeedInput {
    SeedInput {
        instance_id: "iid-linux".into(),
        hostname: "linux-guest".into(),
        ssh_authorized_keys: vec![],
        network: Default::default(),
    }
}

fn created(req: &cocoon_host::disk::DiskRequest) -> Plan {
    let plan = plan(req, &DefaultShape).unwrap();
    let locks = DiskLocks::acquire(&plan.writable(), "create", Wait::No).unwrap();
    create(&plan, &locks, Some(&seed())).unwrap();
    plan
}

fn the_initramfs(state_dir: &Path, kernel: &KernelChoice) -> Initramfs {
    let busybox = initramfs::find_busybox(None).unwrap();
    initramfs::build(state_dir, kernel, &busybox).unwrap()
}

fn debugfs_cat(image: &Path, file: &str) -> String {
    let out = run(Command::new(cocoon_tool("debugfs"))
        .args(["-R", &format!("cat {file}")])
        .arg(image));
    String::from_utf8(out).unwrap()
}

fn cocoon_tool(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn converters(state: &Path) -> &'static Converters {
    static C: OnceLock<Converters> = OnceLock::new();
    C.get_or_init(|| {
        let runtime = Box::leak(Box::new(Runtime::new(None).unwrap()));
        let registry = Registry::discover(&HostConfig::at(state));
        Converters::load(runtime, &registry).unwrap()
    })
}

#[test]
fn a_gpt_disk_image_from_qcow2_boots_to_its_own_init() {
    let t = "a_gpt_disk_image_from_qcow2_boots_to_its_own_init";
    if !tools(
        t,
        &[
            ("command -v sfdisk || test -x /usr/sbin/sfdisk", "fdisk"),
            ("command -v qemu-img", "qemu-utils"),
        ],
    ) {
        return;
    }
    let Some(kernel) = linux_kernel(t) else {
        return;
    };
    let vmm = pick_vmm(t);
    let state = State::new();
    let work = state.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();

    // The image: an ESP-typed blank partition first (not ext4, so the
    // fallback must pass it), then the ext4 root from a busybox tree.
    let root = work.join("root");
    busybox_tree(&root);
    std::fs::create_dir_all(root.join("sbin")).unwrap();
    write_exec(
        &root.join("sbin/init"),
        "#!/bin/sh\n\
         echo \"report: image-init pid=$$ root=$(grep ' / ' /proc/mounts | cut -d' ' -f1,3)\"\n\
         echo \"report: marker $(cat /etc/marker)\"\n\
         sync\nreboot -f\n",
    );
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/marker"), "from-the-disk-image\n").unwrap();
    let part = work.join("root.ext4");
    std::fs::File::create(&part)
        .unwrap()
        .set_len(40 << 20)
        .unwrap();
    run(Command::new(cocoon_tool("mkfs.ext4"))
        .args(["-q", "-F", "-L", "imgroot", "-d"])
        .arg(&root)
        .arg(&part));
    let raw = work.join("disk.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(48 << 20)
        .unwrap();
    let mut sfdisk = Command::new(cocoon_tool("sfdisk"))
        .arg("-q")
        .arg(&raw)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    write!(
        sfdisk.stdin.take().unwrap(),
        "label: gpt\n\
         start=2048, size=4096, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n\
         start=6144, size=81920, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid={}\n",
        ROOT_PARTUUID.to_uppercase()
    )
    .unwrap();
    assert!(sfdisk.wait().unwrap().success());
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&raw)
        .unwrap()
        .write_all_at(&std::fs::read(&part).unwrap(), 6144 * 512)
        .unwrap();
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(work.join("disk.qcow2")));

    // Back through the host's conversion engine, then planned and
    // created like any disk-image VM (the cow is the per-VM copy).
    let converted = work.join("converted.raw");
    let report = convert::convert_with(
        converters(state.dir.path()),
        &ConvertRequest {
            source: &work.join("disk.qcow2"),
            dest: &converted,
            format: None,
            backing: &NoBacking,
            jobs: 2,
        },
        &Silent,
    )
    .unwrap();
    assert_eq!(report.format, "qcow2");
    let digest: Digest = hash_reader(std::fs::File::open(&converted).unwrap())
        .unwrap()
        .0;
    let mut req = state.request(ImageDisks::Disk {
        base: BaseImage {
            path: converted.clone(),
            digest,
            size: report.virtual_size,
            verify: true,
        },
    });
    req.cow_size = None;
    req.cidata = true;
    let plan = created(&req);
    let disks = plan.storage();
    let initrd = the_initramfs(state.dir.path(), &kernel);

    for (how, part) in [
        (
            "by PARTUUID",
            Some(RootPartition::PartUuid(ROOT_PARTUUID.to_uppercase())),
        ),
        ("the first ext4", None),
    ] {
        let cmdline = BootPlan::new(RootKind::Disk { part }, &disks)
            .unwrap()
            .kernel_cmdline("quiet")
            .unwrap();
        let serial = boot(vmm, &kernel.kernel, &initrd.path, &cmdline, &disks, &work);
        let init = lines(&serial, "cocoon-init: ");
        assert!(
            init.iter().all(|l| !l.starts_with("fatal")),
            "{how}:\n{serial}"
        );
        assert!(init.contains(&"root disk /dev/vda2"), "{how}:\n{serial}");
        assert!(init.contains(&"exec /sbin/init"), "{how}:\n{serial}");
        let report = lines(&serial, "report: ");
        assert_eq!(
            report,
            [
                "image-init pid=1 root=/dev/vda2 ext4",
                "marker from-the-disk-image"
            ],
            "{how}:\n{serial}"
        );
    }
}

#[test]
fn a_layered_root_with_a_whiteout_a_cow_and_data_disks() {
    let t = "a_layered_root_with_a_whiteout_a_cow_and_data_disks";
    if !tools(t, &[("command -v mksquashfs", "squashfs-tools")]) {
        return;
    }
    let Some(kernel) = linux_kernel(t) else {
        return;
    };
    let vmm = pick_vmm(t);
    let state = State::new();
    let work = state.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();

    // Base layer: busybox, files, a user; top layer: a new file, a
    // replaced one, the report script, and a whiteout of /etc/gone.
    let l0 = work.join("l0");
    busybox_tree(&l0);
    std::fs::create_dir_all(l0.join("etc")).unwrap();
    std::fs::write(l0.join("etc/base"), "from-base\n").unwrap();
    std::fs::write(l0.join("etc/gone"), "deleted-by-the-top-layer\n").unwrap();
    std::fs::write(l0.join("etc/motd"), "old\n").unwrap();
    std::fs::write(
        l0.join("etc/passwd"),
        "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        l0.join("etc/group"),
        "root:x:0:\napp:x:1000:\nstaff:x:50:\n",
    )
    .unwrap();
    let l1 = work.join("l1");
    std::fs::create_dir_all(l1.join("etc")).unwrap();
    std::fs::write(l1.join("etc/top"), "from-top\n").unwrap();
    std::fs::write(l1.join("etc/motd"), "new\n").unwrap();
    write_exec(
        &l1.join("report.sh"),
        r#"#!/bin/sh
echo "report: greeting=$GREETING pwd=$(pwd) id=$(id -u):$(id -g) home=$HOME"
echo "report: root=$(grep ' / ' /proc/mounts | cut -d' ' -f1,3)"
echo "report: base=$(cat /etc/base) top=$(cat /etc/top) motd=$(cat /etc/motd)"
if [ -e /etc/gone ]; then echo "report: gone=present"; else echo "report: gone=absent"; fi
[ "$(id -u)" = 0 ] || exit 0
echo written-on-the-cow > /cow-test && echo "report: cow=$(cat /cow-test)"
grep ' ext4 ' /proc/mounts | while read -r dev mp fs rest; do echo "report: mount $mp $fs"; done
echo "from the guest" > /srv/data/hello.txt && echo "report: wrote"
for s in /sys/block/vd*/serial; do
    if [ "$(cat "$s")" = cocoon-cidata ]; then d=${s%/serial}; dev=/dev/${d##*/}; fi
done
mkdir -p /mnt/seed && mount -t vfat -o ro "$dev" /mnt/seed && echo "report: cidata $(ls /mnt/seed | tr '\n' ' ')"
umount /mnt/seed
"#,
    );
    let mut layers = Vec::new();
    for (dir, pseudo) in [(&l0, None), (&l1, Some("etc/gone c 0 0 0 0 0"))] {
        let out = work.join(format!(
            "{}.sqfs",
            dir.file_name().unwrap().to_string_lossy()
        ));
        let mut cmd = Command::new("mksquashfs");
        cmd.arg(dir)
            .arg(&out)
            .args(["-quiet", "-noappend", "-all-root", "-no-progress"]);
        if let Some(p) = pseudo {
            // An overlayfs whiteout: a 0/0 character device (a pseudo
            // file, so the test needs no mknod privilege).
            cmd.args(["-p", p]);
        }
        run(&mut cmd);
        layers.push(state.layer(&std::fs::read(&out).unwrap()));
    }

    let mut req = state.request(ImageDisks::Layered { layers });
    req.cow_size = Some(64 << 20);
    let specs: Vec<DataDiskSpec> = [
        "size=32M,name=logs,mount=/var/log",
        "size=32M,name=store,mount=/srv/data",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    req.data_disks = resolve(&specs, &[]).unwrap();
    req.cidata = true;
    let plan = created(&req);
    let disks = plan.storage();
    let base = the_initramfs(state.dir.path(), &kernel);
    let exec = ExecConfig {
        entrypoint: Some(vec!["/bin/sh".into()]),
        cmd: Some(vec!["/report.sh".into()]),
        env: Some(vec!["PATH=/bin".into(), "GREETING=hello layers".into()]),
        working_dir: Some("/etc".into()),
        user: None,
    };
    let initrd = state.vm_dir.join("initrd.img");
    initramfs::write_vm_initrd(&base, Some(&exec), &initrd).unwrap();
    let cmdline = BootPlan::new(RootKind::Layered, &disks)
        .unwrap()
        .kernel_cmdline("quiet")
        .unwrap();
    let serial = boot(vmm, &kernel.kernel, &initrd, &cmdline, &disks, &work);

    let init = lines(&serial, "cocoon-init: ");
    assert!(init.iter().all(|l| !l.starts_with("fatal")), "{serial}");
    let serials: Vec<&str> = init
        .iter()
        .filter_map(|l| l.strip_prefix("disk "))
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert_eq!(
        serials,
        [
            "cocoon-layer0",
            "cocoon-layer1",
            "cocoon-root",
            "logs",
            "store",
            "cocoon-cidata"
        ],
        "every disk found by serial, in plan order:\n{serial}"
    );
    assert!(
        init.iter().any(|l| l.starts_with("root overlay layers=2")),
        "{serial}"
    );
    assert!(
        init.contains(&"the OCI process exited with status 0"),
        "{serial}"
    );
    let report = lines(&serial, "report: ");
    assert_eq!(
        report,
        [
            "greeting=hello layers pwd=/etc id=0:0 home=/",
            "root=overlay overlay",
            "base=from-base top=from-top motd=new",
            "gone=absent",
            "cow=written-on-the-cow",
            "mount /var/log ext4",
            "mount /srv/data ext4",
            "wrote",
            "cidata meta-data network-config user-data ",
        ],
        "{serial}"
    );

    // After power-off: the data disk holds the guest's file, and the
    // cow's upper dir the file written on the root.
    let store = disks.iter().find(|d| d.serial == "store").unwrap();
    assert_eq!(debugfs_cat(&store.path, "/hello.txt"), "from the guest\n");
    let cow = disks.iter().find(|d| d.serial == "cocoon-root").unwrap();
    assert_eq!(
        debugfs_cat(&cow.path, "/upper/cow-test"),
        "written-on-the-cow\n"
    );
    let logs = disks.iter().find(|d| d.serial == "logs").unwrap();
    run(Command::new(cocoon_tool("e2fsck"))
        .arg("-fn")
        .arg(&logs.path));
    run(Command::new(cocoon_tool("e2fsck"))
        .arg("-fn")
        .arg(&store.path));

    // The same VM again, its process as a named user and group: the cow
    // keeps what the first boot wrote.
    let exec = ExecConfig {
        user: Some("app:staff".into()),
        ..exec
    };
    initramfs::write_vm_initrd(&base, Some(&exec), &initrd).unwrap();
    let serial = boot(vmm, &kernel.kernel, &initrd, &cmdline, &disks, &work);
    assert!(
        lines(&serial, "cocoon-init: ").contains(&"running the OCI process as 1000:50"),
        "{serial}"
    );
    assert_eq!(
        lines(&serial, "report: ")[..2],
        [
            "greeting=hello layers pwd=/etc id=1000:50 home=/home/app",
            "root=overlay overlay"
        ],
        "{serial}"
    );
}

/// The initramfs: what it holds, and its cache (reused while its digest
/// file matches, rebuilt when the digest file is missing or wrong).
#[test]
fn the_initramfs_holds_busybox_the_modules_in_order_and_is_cached() {
    let t = "the_initramfs_holds_busybox_the_modules_in_order_and_is_cached";
    if !require(
        t,
        "test -x /bin/busybox && ! ldd /bin/busybox",
        "busybox-static",
    ) {
        return;
    }
    let Some(kernel) = linux_kernel(t) else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let first = the_initramfs(state.path(), &kernel);
    assert!(first.built);
    assert!(first.path.starts_with(state.path().join("initramfs")));
    let digest_file = first.path.with_file_name(initramfs::DIGEST_FILE);
    assert_eq!(
        std::fs::read_to_string(&digest_file).unwrap(),
        format!("{}\n", first.digest)
    );

    // Its contents, as busybox's cpio lists them.
    let gz = std::fs::read(&first.path).unwrap();
    let mut cpio = Vec::new();
    use std::io::Read;
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut cpio)
        .unwrap();
    let mut child = Command::new("/bin/busybox")
        .args(["cpio", "-t"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&cpio).unwrap();
    let names = String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap();
    for want in [
        "init",
        "bin/busybox",
        "dev/console",
        "lib/modules/load",
        "lib/modules/virtio_blk.ko",
        "lib/modules/erofs.ko",
    ] {
        assert!(names.lines().any(|l| l == want), "{want} missing: {names}");
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new("/bin/busybox")
        .args(["cpio", "-i", "-d", "lib/modules/load", "init"])
        .current_dir(dir.path())
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&cpio).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("init")).unwrap(),
        initramfs::INIT_SCRIPT
    );
    let load = std::fs::read_to_string(dir.path().join("lib/modules/load")).unwrap();
    let order: Vec<&str> = load.lines().collect();
    let at = |m: &str| {
        order
            .iter()
            .position(|x| *x == m)
            .unwrap_or_else(|| panic!("{m} not in {order:?}"))
    };
    assert!(at("virtio_ring") < at("virtio") && at("virtio") < at("virtio_mmio"));
    assert!(
        at("virtio") < at("virtio_blk") && at("fat") < at("vfat") && at("libcrc32c") < at("erofs")
    );
    for m in ["overlay", "squashfs", "virtio_net", "nls_cp437"] {
        at(m);
    }
    assert!(
        !order.contains(&"ext4"),
        "ext4 is built into Debian's cloud kernel"
    );

    // Cached: the same file, not rebuilt.
    let again = the_initramfs(state.path(), &kernel);
    assert_eq!(
        (again.built, &again.path, &again.digest),
        (false, &first.path, &first.digest)
    );
    // Rebuilt when the digest file is missing, wrong, or the image was
    // damaged.
    std::fs::remove_file(&digest_file).unwrap();
    assert!(the_initramfs(state.path(), &kernel).built);
    std::fs::write(&digest_file, format!("{}\n", Digest::of(b"other"))).unwrap();
    assert!(the_initramfs(state.path(), &kernel).built);
    std::fs::write(&digest_file, "garbage").unwrap();
    assert!(the_initramfs(state.path(), &kernel).built);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&first.path)
        .unwrap();
    f.set_len(1000).unwrap();
    let rebuilt = the_initramfs(state.path(), &kernel);
    assert!(rebuilt.built);
    assert_eq!(rebuilt.digest, first.digest, "the build is reproducible");
    assert_eq!(std::fs::read(&rebuilt.path).unwrap(), gz);
    let entries: Vec<String> = std::fs::read_dir(rebuilt.path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut entries = entries;
    entries.sort();
    assert_eq!(
        entries,
        [initramfs::IMAGE_FILE, initramfs::DIGEST_FILE],
        "no temp left"
    );

    // A VM's initrd: the cached one with /cocoon/exec appended.
    let exec = ExecConfig {
        cmd: Some(vec!["/bin/true".into()]),
        ..Default::default()
    };
    let vm_initrd = state.path().join("vm-initrd.img");
    initramfs::write_vm_initrd(&rebuilt, Some(&exec), &vm_initrd).unwrap();
    let bytes = std::fs::read(&vm_initrd).unwrap();
    assert_eq!(bytes[..gz.len()], gz[..]);
    assert_eq!(
        bytes[gz.len()..],
        initramfs::exec_archive(&exec).unwrap()[..]
    );
}
