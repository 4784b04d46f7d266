//! The plan the cocoon initramfs's `/init` reads from the kernel command
//! line: what kind of root to build, and every disk by its virtio serial
//! (the guest finds them in `/sys/block/vd*/serial`), in plan order.
//!
//! ```text
//! cocoon.root=layered                      overlay of the layers + the cow
//! cocoon.root=disk                         a disk image: the cow is the disk
//! cocoon.rootpart=PARTUUID=U | LABEL=L | N the root partition of a disk image
//!                                          (else the first ext4 partition,
//!                                          else the whole disk)
//! cocoon.disk=SERIAL:ROLE                  layer, cow, cidata
//! cocoon.disk=SERIAL:data:MOUNT:FSTYPE     MOUNT empty when not mounted
//! ```
//!
//! One `cocoon.disk=` per disk, in plan order; layers are base first (the
//! init stacks them in that order under the cow). Every value is
//! percent-encoded outside `[A-Za-z0-9/._-]`, so mount points with
//! spaces, colons or quotes pass through the kernel's command-line
//! splitting unchanged (the init decodes `%XX`).
//!
//! The OCI process (Entrypoint, Cmd, Env, WorkingDir, User) is not here:
//! it can be longer than a command line, so it travels as a file in the
//! VM's initrd ([`super::exec`]).

use std::fmt::Write as _;

use crate::disk::model::{DiskRole, FsType, StorageConfig};

/// x86's `COMMAND_LINE_SIZE`: the kernel truncates a longer one.
pub const MAX_CMDLINE: usize = 2048;

/// The arguments every cocoon Linux guest gets besides the plan: the
/// console the init prints to, and a panic that ends the VM instead of
/// hanging it.
pub const BASE_ARGS: &str = "console=ttyS0 panic=-1";

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CmdlineError {
    #[error("a layered root needs at least one layer disk and one cow disk; the plan has {layers} layers and {cows} cows")]
    Layered { layers: usize, cows: usize },
    #[error("a disk-image root needs exactly one cow disk (the image's copy) and no layers; the plan has {layers} layers and {cows} cows")]
    Disk { layers: usize, cows: usize },
    #[error("the kernel command line would be {len} bytes; the kernel keeps {MAX_CMDLINE}")]
    TooLong { len: usize },
    #[error("cocoon command line: {arg:?}: {reason}")]
    Parse { arg: String, reason: &'static str },
}

/// How the root is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootKind {
    /// Read-only layers under an overlayfs whose upper is the cow.
    Layered,
    /// A disk image's per-VM copy; `part` names its root partition when
    /// the host knows it.
    Disk { part: Option<RootPartition> },
}

/// A disk image's root partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootPartition {
    /// The GPT partition's unique GUID (any case; the init compares
    /// lower-case).
    PartUuid(String),
    /// The filesystem label.
    Label(String),
    /// The partition number (1-based).
    Number(u32),
}

/// One disk as the guest's init sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestDisk {
    pub serial: String,
    pub role: DiskRole,
    pub mount_point: Option<String>,
    pub fstype: Option<FsType>,
}

/// Everything the init reads from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootPlan {
    pub root: RootKind,
    pub disks: Vec<GuestDisk>,
}

impl BootPlan {
    /// The plan for a VM's disks (in plan order, as
    /// [`crate::disk::Plan::storage`] gives them).
    pub fn new(root: RootKind, storage: &[StorageConfig]) -> Result<Self, CmdlineError> {
        let count = |role| storage.iter().filter(|d| d.role == role).count();
        let (layers, cows) = (count(DiskRole::Layer), count(DiskRole::Cow));
        match root {
            RootKind::Layered if layers == 0 || cows != 1 => {
                return Err(CmdlineError::Layered { layers, cows })
            }
            RootKind::Disk { .. } if layers != 0 || cows != 1 => {
                return Err(CmdlineError::Disk { layers, cows })
            }
            _ => {}
        }
        let disks = storage
            .iter()
            .map(|d| GuestDisk {
                serial: d.serial.clone(),
                role: d.role,
                mount_point: d.mount_point.clone(),
                fstype: d.fstype,
            })
            .collect();
        Ok(BootPlan { root, disks })
    }

    /// The `cocoon.*` arguments.
    pub fn render(&self) -> String {
        let mut out = String::new();
        match &self.root {
            RootKind::Layered => out.push_str("cocoon.root=layered"),
            RootKind::Disk { part } => {
                out.push_str("cocoon.root=disk");
                match part {
                    None => {}
                    Some(RootPartition::PartUuid(u)) => {
                        let _ = write!(out, " cocoon.rootpart=PARTUUID={}", encode(u));
                    }
                    Some(RootPartition::Label(l)) => {
                        let _ = write!(out, " cocoon.rootpart=LABEL={}", encode(l));
                    }
                    Some(RootPartition::Number(n)) => {
                        let _ = write!(out, " cocoon.rootpart={n}");
                    }
                }
            }
        }
        for d in &self.disks {
            let _ = write!(out, " cocoon.disk={}:{}", encode(&d.serial), d.role);
            if d.role == DiskRole::Data {
                let _ = write!(
                    out,
                    ":{}:{}",
                    d.mount_point.as_deref().map(encode).unwrap_or_default(),
                    d.fstype.map(FsType::as_str).unwrap_or("")
                );
            }
        }
        out
    }

    /// The whole kernel command line: [`BASE_ARGS`], `extra` (the site's
    /// or the test's), then the plan; refused when the kernel would cut it.
    pub fn kernel_cmdline(&self, extra: &str) -> Result<String, CmdlineError> {
        let mut line = BASE_ARGS.to_string();
        if !extra.trim().is_empty() {
            line.push(' ');
            line.push_str(extra.trim());
        }
        line.push(' ');
        line.push_str(&self.render());
        if line.len() >= MAX_CMDLINE {
            return Err(CmdlineError::TooLong { len: line.len() });
        }
        Ok(line)
    }

    /// Reads the plan back from a kernel command line (what the init does,
    /// in Rust: the round-trip tests hold the two to one format).
    pub fn parse(cmdline: &str) -> Result<Self, CmdlineError> {
        let bad = |arg: &str, reason| CmdlineError::Parse {
            arg: arg.to_string(),
            reason,
        };
        let mut root = None;
        let mut part = None;
        let mut disks = Vec::new();
        for arg in cmdline.split_ascii_whitespace() {
            if let Some(v) = arg.strip_prefix("cocoon.root=") {
                root = Some(match v {
                    "layered" => false,
                    "disk" => true,
                    _ => return Err(bad(arg, "not layered or disk")),
                });
            } else if let Some(v) = arg.strip_prefix("cocoon.rootpart=") {
                part = Some(if let Some(u) = v.strip_prefix("PARTUUID=") {
                    RootPartition::PartUuid(decode(u).ok_or_else(|| bad(arg, "bad %-escape"))?)
                } else if let Some(l) = v.strip_prefix("LABEL=") {
                    RootPartition::Label(decode(l).ok_or_else(|| bad(arg, "bad %-escape"))?)
                } else {
                    RootPartition::Number(
                        v.parse()
                            .map_err(|_| bad(arg, "not PARTUUID=, LABEL= or a number"))?,
                    )
                });
            } else if let Some(v) = arg.strip_prefix("cocoon.disk=") {
                let fields: Vec<&str> = v.split(':').collect();
                let role = match fields.get(1).copied() {
                    Some("layer") => DiskRole::Layer,
                    Some("cow") => DiskRole::Cow,
                    Some("data") => DiskRole::Data,
                    Some("cidata") => DiskRole::Cidata,
                    _ => return Err(bad(arg, "no known role")),
                };
                let want = if role == DiskRole::Data { 4 } else { 2 };
                if fields.len() != want {
                    return Err(bad(arg, "wrong number of fields for its role"));
                }
                let serial = decode(fields[0]).ok_or_else(|| bad(arg, "bad %-escape"))?;
                let (mount_point, fstype) = if role == DiskRole::Data {
                    let m = decode(fields[2]).ok_or_else(|| bad(arg, "bad %-escape"))?;
                    let f = match fields[3] {
                        "" => None,
                        "ext4" => Some(FsType::Ext4),
                        "none" => Some(FsType::None),
                        _ => return Err(bad(arg, "fstype not ext4 or none")),
                    };
                    (Some(m).filter(|m| !m.is_empty()), f)
                } else {
                    (None, None)
                };
                disks.push(GuestDisk {
                    serial,
                    role,
                    mount_point,
                    fstype,
                });
            }
        }
        let root = match (root, part) {
            (None, _) => return Err(bad(cmdline, "no cocoon.root=")),
            (Some(false), Some(_)) => {
                return Err(bad(cmdline, "cocoon.rootpart= on a layered root"))
            }
            (Some(false), None) => RootKind::Layered,
            (Some(true), part) => RootKind::Disk { part },
        };
        Ok(BootPlan { root, disks })
    }
}

fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"/._-".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(
        serial: &str,
        role: DiskRole,
        mount: Option<&str>,
        fstype: Option<FsType>,
    ) -> StorageConfig {
        StorageConfig {
            path: format!("/s/{serial}").into(),
            read_only: role.read_only(),
            serial: serial.into(),
            role,
            mount_point: mount.map(str::to_string),
            fstype,
            direct_io: None,
        }
    }

    fn layered() -> Vec<StorageConfig> {
        vec![
            disk("cocoon-layer0", DiskRole::Layer, None, None),
            disk("cocoon-layer1", DiskRole::Layer, None, None),
            disk("cocoon-root", DiskRole::Cow, None, None),
            disk("logs", DiskRole::Data, Some("/var/log"), Some(FsType::Ext4)),
            disk(
                "odd",
                DiskRole::Data,
                Some("/mnt/a b:c%d'\"é"),
                Some(FsType::Ext4),
            ),
            disk("scratch", DiskRole::Data, None, Some(FsType::None)),
            disk("cocoon-cidata", DiskRole::Cidata, None, None),
        ]
    }

    #[test]
    fn renders_the_documented_format() {
        let plan = BootPlan::new(RootKind::Layered, &layered()).unwrap();
        assert_eq!(
            plan.render(),
            "cocoon.root=layered cocoon.disk=cocoon-layer0:layer cocoon.disk=cocoon-layer1:layer \
             cocoon.disk=cocoon-root:cow cocoon.disk=logs:data:/var/log:ext4 \
             cocoon.disk=odd:data:/mnt/a%20b%3Ac%25d%27%22%C3%A9:ext4 cocoon.disk=scratch:data::none \
             cocoon.disk=cocoon-cidata:cidata"
        );
        let line = plan.kernel_cmdline("lpj=555008").unwrap();
        assert!(
            line.starts_with("console=ttyS0 panic=-1 lpj=555008 cocoon.root=layered "),
            "{line}"
        );
    }

    #[test]
    fn round_trips_through_parse() {
        let storage = layered();
        let plans = [
            BootPlan::new(RootKind::Layered, &storage).unwrap(),
            BootPlan::new(RootKind::Disk { part: None }, &storage[2..]).unwrap(),
            BootPlan::new(
                RootKind::Disk {
                    part: Some(RootPartition::PartUuid(
                        "0FC63DAF-8483-4772-8E79-3D69D8477DE4".into(),
                    )),
                },
                &storage[2..3],
            )
            .unwrap(),
            BootPlan::new(
                RootKind::Disk {
                    part: Some(RootPartition::Label("my root:1".into())),
                },
                &storage[2..3],
            )
            .unwrap(),
            BootPlan::new(
                RootKind::Disk {
                    part: Some(RootPartition::Number(3)),
                },
                &storage[2..3],
            )
            .unwrap(),
        ];
        for plan in plans {
            let line = plan.kernel_cmdline("quiet").unwrap();
            assert_eq!(BootPlan::parse(&line).unwrap(), plan, "{line}");
            assert!(!plan.render().contains("  "));
        }
    }

    #[test]
    fn plans_that_cannot_boot_are_refused() {
        let storage = layered();
        assert_eq!(
            BootPlan::new(RootKind::Layered, &storage[2..]).unwrap_err(),
            CmdlineError::Layered { layers: 0, cows: 1 }
        );
        assert_eq!(
            BootPlan::new(RootKind::Disk { part: None }, &storage).unwrap_err(),
            CmdlineError::Disk { layers: 2, cows: 1 }
        );
        assert_eq!(
            BootPlan::new(RootKind::Disk { part: None }, &storage[3..]).unwrap_err(),
            CmdlineError::Disk { layers: 0, cows: 0 }
        );
        let many: Vec<StorageConfig> = (0..200)
            .map(|i| {
                disk(
                    &format!("data{i:03}"),
                    DiskRole::Data,
                    Some("/mnt/some/long/path"),
                    Some(FsType::Ext4),
                )
            })
            .chain([disk("cocoon-root", DiskRole::Cow, None, None)])
            .collect();
        let plan = BootPlan::new(RootKind::Disk { part: None }, &many).unwrap();
        assert!(matches!(
            plan.kernel_cmdline(""),
            Err(CmdlineError::TooLong { .. })
        ));
    }

    #[test]
    fn bad_lines_are_refused_naming_the_argument() {
        for (line, what) in [
            ("console=ttyS0", "no cocoon.root="),
            ("cocoon.root=zfs", "not layered or disk"),
            ("cocoon.root=disk cocoon.disk=a:swap", "no known role"),
            (
                "cocoon.root=disk cocoon.disk=a:data:/x",
                "wrong number of fields",
            ),
            (
                "cocoon.root=disk cocoon.disk=a:cow:/x",
                "wrong number of fields",
            ),
            (
                "cocoon.root=disk cocoon.disk=a:data:%zz:ext4",
                "bad %-escape",
            ),
            ("cocoon.root=disk cocoon.disk=a:data:/x:xfs", "fstype"),
            ("cocoon.root=disk cocoon.rootpart=first", "not PARTUUID="),
            ("cocoon.root=layered cocoon.rootpart=1", "on a layered root"),
        ] {
            let err = BootPlan::parse(line).unwrap_err().to_string();
            assert!(err.contains(what), "{line}: {err}");
        }
    }
}
