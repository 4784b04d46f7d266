//! Real Linux guests booted from the very files `cocoon-host create`
//! prepared: the kernel it chose (Debian's cloud kernel from
//! `scripts/fetch-linux-kernel`, as `[vm] kernel`), the VM's initrd (the
//! cocoon initramfs with the image's OCI process), the command line in the
//! VM's record, and the VM's disks in plan order with their serials, the
//! cidata seed included.
//!
//! The VMM is ours when /dev/kvm has EPT or NPT; otherwise (this
//! machine's nested KVM has neither, and Linux cannot boot on it) QEMU's
//! microvm with `-accel tcg`, on the recipe in DESIGN.md ("VMM facts").
//! Each test prints which it used.
//!
//! - a disk image (GPT made with sfdisk, an ext4 root made with
//!   `mkfs.ext4 -d` from a busybox tree), as qcow2 by qemu-img, converted
//!   by `create`, booted to its own /sbin/init by the PARTUUID the host
//!   found, and by the init's first-ext4 fallback;
//! - a container image (two layer tars, the top one deleting a file of the
//!   base through an OCI whiteout) pushed to docker-registry, created with
//!   two ext4 data disks: the OCI process reports the overlay root, the
//!   layers' files, the deleted file absent, the cow writable, the data
//!   disks where the plan mounts them, the seed readable; after power-off
//!   the host reads back with debugfs the file the guest wrote on a data
//!   disk and the one it wrote on the cow's upper dir. A second VM of the
//!   same layers (cached) runs the process as a named user and group; gc
//!   keeps the layers while the VMs exist.

mod disk_common;
mod store_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cocoon_host::config::VmSettings;
use cocoon_host::disk::StorageConfig;
use cocoon_host::guest::initramfs::{self, Initramfs};
use cocoon_host::guest::{kernel, BootPlan, ExecConfig, KernelChoice, KernelSource, RootKind};
use cocoon_host::store::digest::Digest;
use disk_common::{require, run};
use store_common::registry::{Desc, Registry};
use store_common::Cli;

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

/// The real binary with a state dir under `dir` and a config whose `[vm]
/// kernel` is the fetched Linux kernel.
fn host(dir: &Path, kernel: &KernelChoice) -> Cli {
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[vm]\nkernel = {}\n",
            serde_json::to_string(&kernel.kernel).unwrap()
        ),
    )
    .unwrap();
    Cli {
        state: dir.join("state"),
        config: Some(config),
    }
}

/// What `create` recorded for VM `name`: the files the test boots.
struct Recorded {
    dir: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    cmdline: String,
    disks: Vec<StorageConfig>,
    layers: Vec<String>,
}

fn recorded(cli: &Cli, name: &str) -> Recorded {
    let doc = cli.json(&["inspect", name]);
    let r = &doc["record"];
    let m = &r["machine"];
    Recorded {
        dir: PathBuf::from(doc["dir"].as_str().unwrap()),
        kernel: PathBuf::from(m["kernel"].as_str().unwrap()),
        initrd: PathBuf::from(m["initrd"].as_str().expect("an initrd")),
        cmdline: m["cmdline"].as_str().unwrap().to_string(),
        disks: serde_json::from_value(r["storage"].clone()).unwrap(),
        layers: serde_json::from_value(r["image"]["layers"].clone()).unwrap(),
    }
}

impl Recorded {
    /// Boots the very files create prepared, in plan order.
    fn boot(&self, vmm: Vmm, cmdline: &str, work: &Path) -> String {
        assert!(
            self.initrd.starts_with(&self.dir),
            "the VM's own initrd: {}",
            self.initrd.display()
        );
        boot(vmm, &self.kernel, &self.initrd, cmdline, &self.disks, work)
    }

    fn disk(&self, serial: &str) -> &Path {
        &self.disks.iter().find(|d| d.serial == serial).unwrap().path
    }
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
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();

    // The image: an ESP-typed blank partition first (not ext4, so the
    // host's root search and the init's fallback must pass it), then the
    // ext4 root from a busybox tree.
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
    let qcow2 = work.join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2));

    // `create` pulls it, converts it back to raw with the qcow2 plugin,
    // copies it as the VM's cow, finds no kernel in it (so `[vm] kernel`),
    // builds the cocoon initramfs and finds the root partition.
    let cli = host(dir.path(), &kernel);
    let out = cli.json(&[
        "create",
        "--name",
        "gpt",
        "--cmdline",
        "quiet",
        qcow2.to_str().unwrap(),
    ]);
    assert_eq!(out["image"]["format"], "qcow2", "{out}");
    assert_eq!(out["image"]["conversion"], "converted", "{out}");
    assert_eq!(out["boot"]["kernel_source"], "config", "{out}");
    assert_eq!(out["boot"]["release"], kernel.release.as_str(), "{out}");
    assert_eq!(
        out["boot"]["root_partition"],
        format!("PARTUUID={ROOT_PARTUUID}"),
        "{out}"
    );
    let vm = recorded(&cli, "gpt");
    assert_eq!(vm.kernel, kernel.kernel.canonicalize().unwrap());
    let roles: Vec<&str> = vm.disks.iter().map(|d| d.role.as_str()).collect();
    assert_eq!(roles, ["cow", "cidata"]);
    assert!(
        vm.cmdline
            .starts_with("console=ttyS0 panic=-1 quiet cocoon.root=disk cocoon.rootpart=PARTUUID="),
        "{}",
        vm.cmdline
    );

    // By the partition the host found, then by the init's own fallback.
    let fallback = BootPlan::new(RootKind::Disk { part: None }, &vm.disks)
        .unwrap()
        .kernel_cmdline("quiet")
        .unwrap();
    for (how, cmdline) in [
        ("by the recorded PARTUUID", vm.cmdline.as_str()),
        ("the first ext4", fallback.as_str()),
    ] {
        let serial = vm.boot(vmm, cmdline, &work);
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

/// A layer tar of the tree at `dir` (symlinks stay links; the root has
/// no entry of its own).
fn layer_tar(dir: &Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all("", dir).unwrap();
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// The guest's report of a layered root (run as the OCI process).
const REPORT_SCRIPT: &str = r#"#!/bin/sh
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
"#;

/// The issue's end-to-end case, driven through the CLI: a busybox image
/// of two layers (the top one deleting a base file by a whiteout) pushed
/// to docker-registry, `cocoon-host create` with two data disks, and the
/// files it prepared booted.
#[test]
fn a_container_image_from_a_registry_boots_on_its_layers_with_data_disks() {
    let t = "a_container_image_from_a_registry_boots_on_its_layers_with_data_disks";
    if !tools(t, &[("command -v mksquashfs", "squashfs-tools")]) {
        return;
    }
    let Some(reg) = Registry::start() else {
        return;
    };
    let Some(kernel) = linux_kernel(t) else {
        return;
    };
    let vmm = pick_vmm(t);
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
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
    std::fs::write(l1.join("etc/.wh.gone"), "").unwrap();
    write_exec(&l1.join("report.sh"), REPORT_SCRIPT);
    let repo = "test/busybox";
    let base = layer_tar(&l0);
    let top = layer_tar(&l1);
    let layers = [
        (
            reg.push_blob(repo, "application/vnd.oci.image.layer.v1.tar", &base),
            store_common::sha256(&base),
        ),
        (
            reg.push_blob(
                repo,
                "application/vnd.oci.image.layer.v1.tar+gzip",
                &gzip(&top),
            ),
            store_common::sha256(&top),
        ),
    ];
    let process = serde_json::json!({
        "Entrypoint": ["/bin/sh"], "Cmd": ["/report.sh"],
        "Env": ["PATH=/bin", "GREETING=hello layers"], "WorkingDir": "/etc",
    });
    let layer_refs: Vec<(&Desc, String)> = layers.iter().map(|(d, id)| (d, id.clone())).collect();
    let config = |process: serde_json::Value| serde_json::json!({"architecture": "amd64", "os": "linux", "config": process});
    reg.push_config_and_manifest(repo, "v1", config(process.clone()), &layer_refs);
    let mut as_app = process;
    as_app["User"] = "app:staff".into();
    reg.push_config_and_manifest(repo, "app", config(as_app), &layer_refs);
    let reference = |tag: &str| format!("oci://127.0.0.1:{}/{repo}:{tag}", reg.port);

    let cli = host(dir.path(), &kernel);
    let out = cli.json(&[
        "create",
        "--name",
        "layered",
        "--cow-size",
        "64M",
        "--data-disk",
        "size=32M,name=logs,mount=/var/log",
        "--data-disk",
        "size=32M,name=store,mount=/srv/data",
        "--cmdline",
        "quiet",
        &reference("v1"),
    ]);
    let steps = out["image"]["layers"].as_array().unwrap();
    let built: Vec<(&str, &str)> = steps
        .iter()
        .map(|l| (l["source"].as_str().unwrap(), l["build"].as_str().unwrap()))
        .collect();
    assert_eq!(
        built,
        [
            (layers[0].0.digest.as_str(), "built"),
            (layers[1].0.digest.as_str(), "built")
        ],
        "{out}"
    );
    assert_eq!(out["boot"]["kernel_source"], "config", "{out}");
    assert_eq!(out["boot"]["initramfs_build"], "built", "{out}");
    let vm = recorded(&cli, "layered");
    let squashfs: Vec<&str> = steps
        .iter()
        .map(|l| l["digest"].as_str().unwrap())
        .collect();
    assert_eq!(vm.layers, squashfs, "the record keeps the built layers");
    assert!(vm.cmdline.contains("cocoon.root=layered"), "{}", vm.cmdline);
    let serials: Vec<&str> = vm.disks.iter().map(|d| d.serial.as_str()).collect();
    let plan_order = [
        "cocoon-layer0",
        "cocoon-layer1",
        "cocoon-root",
        "logs",
        "store",
        "cocoon-cidata",
    ];
    assert_eq!(serials, plan_order);

    let serial = vm.boot(vmm, &vm.cmdline, &work);
    let init = lines(&serial, "cocoon-init: ");
    assert!(init.iter().all(|l| !l.starts_with("fatal")), "{serial}");
    let found: Vec<&str> = init
        .iter()
        .filter_map(|l| l.strip_prefix("disk "))
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert_eq!(
        found, plan_order,
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
    assert_eq!(
        lines(&serial, "report: "),
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
    assert_eq!(
        debugfs_cat(vm.disk("store"), "/hello.txt"),
        "from the guest\n"
    );
    assert_eq!(
        debugfs_cat(vm.disk("cocoon-root"), "/upper/cow-test"),
        "written-on-the-cow\n"
    );
    for data in ["logs", "store"] {
        run(Command::new(cocoon_tool("e2fsck"))
            .arg("-fn")
            .arg(vm.disk(data)));
    }

    // The same layers with another config: a second VM finds them (and
    // the initramfs) in the cache, and its process runs as a named user
    // and group.
    let out = cli.json(&[
        "create",
        "--name",
        "app",
        "--cmdline",
        "quiet",
        &reference("app"),
    ]);
    let cached: Vec<&str> = out["image"]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["build"].as_str().unwrap())
        .collect();
    assert_eq!(cached, ["cached", "cached"], "{out}");
    assert_eq!(out["boot"]["initramfs_build"], "cached", "{out}");
    let app = recorded(&cli, "app");
    assert_eq!(app.layers, vm.layers);
    let serial = app.boot(vmm, &app.cmdline, &work);
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

    // Without a kernel anywhere (its layers carry none), a container image
    // is refused, and no VM is left.
    let bare = Cli {
        state: cli.state.clone(),
        config: None,
    };
    let out = bare.run(&["create", "--name", "none", &reference("v1")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("no kernel: give --kernel"),
        "{stderr}"
    );
    assert_eq!(cli.json(&["list"])["vms"].as_array().unwrap().len(), 2);

    // The VMs keep their layers through gc once the image is forgotten;
    // removed, they let them go.
    let conversions = |gc: &serde_json::Value| gc["removed_conversions"].to_string();
    assert!(cli.run(&["image", "rm", &reference("v1")]).status.success());
    assert!(cli
        .run(&["image", "rm", &reference("app")])
        .status
        .success());
    let gc = cli.json(&["image", "gc"]);
    assert!(!conversions(&gc).contains("squashfs"), "{gc}");
    for name in ["layered", "app"] {
        assert!(cli.run(&["rm", name]).status.success());
    }
    let gc = cli.json(&["image", "gc"]);
    assert_eq!(
        gc["removed_conversions"].as_array().unwrap().len(),
        2,
        "{gc}"
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
