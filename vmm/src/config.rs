//! What a VM is made of: the input of [`crate::Vm::start`].

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

/// One virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    /// Offer VIRTIO_BLK_F_RO and fail every write with an I/O error.
    pub read_only: bool,
    /// The GET_ID string, at most 20 bytes.
    pub serial: Option<String>,
    /// Open the file with O_DIRECT (bypass the host page cache).
    pub direct: bool,
}

impl DiskConfig {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DiskConfig {
            path: path.into(),
            read_only: false,
            serial: None,
            direct: false,
        }
    }
}

/// One virtio-net device over an existing tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The tap's interface name, in the VMM's network namespace.
    pub tap: String,
    /// The MAC address in the device's config space.
    pub mac: [u8; 6],
}

/// Where COM1's output goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SerialOutput {
    /// Discard it.
    #[default]
    Sink,
    /// The VMM process's standard output (and its stdin feeds COM1).
    Stdout,
    /// Append to a file (created if missing).
    File(PathBuf),
    /// Pass to a callback (a monitor's ring buffer and log).
    Handler(OutputHandler),
}

/// A callback that gets every byte the guest writes to COM1, in order. It
/// runs on the vCPU thread that wrote them, inside the guest's I/O exit,
/// so it must be quick and must not block: the guest waits for it.
#[derive(Clone)]
pub struct OutputHandler(Arc<OutputFn>);

type OutputFn = dyn Fn(&[u8]) + Send + Sync;

impl OutputHandler {
    pub fn new(f: impl Fn(&[u8]) + Send + Sync + 'static) -> Self {
        OutputHandler(Arc::new(f))
    }

    /// Passes `bytes` to the callback.
    pub fn call(&self, bytes: &[u8]) {
        (self.0)(bytes)
    }
}

impl fmt::Debug for OutputHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OutputHandler({:p})", Arc::as_ptr(&self.0).cast::<()>())
    }
}

/// Two handlers are equal when they are clones of one callback.
impl PartialEq for OutputHandler {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for OutputHandler {}

/// A VM to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// A bzImage, or an ELF (vmlinux or any PVH kernel) with a PVH entry note.
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The command line; the VMM appends its `virtio_mmio.device=` entries.
    pub cmdline: String,
    pub cpus: u8,
    /// Guest RAM in bytes.
    pub memory: u64,
    pub disks: Vec<DiskConfig>,
    /// Network devices, after the disks in the virtio-mmio slots.
    pub nets: Vec<NetConfig>,
    pub serial: SerialOutput,
}

impl VmConfig {
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            cpus: 1,
            memory: 256 << 20,
            disks: Vec::new(),
            nets: Vec::new(),
            serial: SerialOutput::Sink,
        }
    }
}

/// Why a `--disk` spec or a memory size was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("disk spec {spec:?}: the path is empty")]
    EmptyPath { spec: String },
    #[error("disk spec {spec:?}: unknown option {option:?} (expected ro, serial=S or direct)")]
    UnknownOption { spec: String, option: String },
    #[error("disk spec {spec:?}: option {option:?} given twice")]
    Duplicate { spec: String, option: String },
    #[error("disk spec {spec:?}: serial {serial:?} is {len} bytes; at most {max} are allowed", max = crate::devices::virtio::block::SERIAL_LEN)]
    SerialTooLong {
        spec: String,
        serial: String,
        len: usize,
    },
    #[error("disk spec {spec:?}: serial {serial:?} must be non-empty printable ASCII without spaces or commas")]
    BadSerial { spec: String, serial: String },
    #[error("memory {value:?}: expected a number with an optional K, M, G or T suffix (plain numbers are MiB)")]
    BadMemory { value: String },
    #[error("memory {value:?} is too large")]
    MemoryOverflow { value: String },
}

impl DiskConfig {
    /// Parses `PATH[,ro][,serial=S][,direct]`. The path cannot contain a
    /// comma.
    pub fn parse_spec(spec: &str) -> Result<DiskConfig, SpecError> {
        let mut parts = spec.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(SpecError::EmptyPath { spec: spec.into() });
        }
        let mut disk = DiskConfig::new(path);
        let mut seen: Vec<&str> = Vec::new();
        for option in parts {
            let (name, value) = match option.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (option, None),
            };
            if seen.contains(&name) {
                return Err(SpecError::Duplicate {
                    spec: spec.into(),
                    option: name.into(),
                });
            }
            match (name, value) {
                ("ro", None) => disk.read_only = true,
                ("direct", None) => disk.direct = true,
                ("serial", Some(serial)) => {
                    let max = crate::devices::virtio::block::SERIAL_LEN;
                    if serial.len() > max {
                        return Err(SpecError::SerialTooLong {
                            spec: spec.into(),
                            serial: serial.into(),
                            len: serial.len(),
                        });
                    }
                    if serial.is_empty() || !serial.bytes().all(|b| b.is_ascii_graphic()) {
                        return Err(SpecError::BadSerial {
                            spec: spec.into(),
                            serial: serial.into(),
                        });
                    }
                    disk.serial = Some(serial.into());
                }
                _ => {
                    return Err(SpecError::UnknownOption {
                        spec: spec.into(),
                        option: option.into(),
                    });
                }
            }
            seen.push(name);
        }
        Ok(disk)
    }
}

/// Parses a memory size: `512` (MiB, as QEMU's -m), `512M`, `2G`, `65536K`,
/// with an optional `iB`/`B` after the suffix.
pub fn parse_memory_size(value: &str) -> Result<u64, SpecError> {
    let bad = || SpecError::BadMemory {
        value: value.into(),
    };
    let v = value.trim();
    let v = v
        .strip_suffix("iB")
        .or_else(|| v.strip_suffix('B'))
        .unwrap_or(v);
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (digits, suffix) = v.split_at(split);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let shift = match suffix {
        "" | "M" | "m" => 20,
        "K" | "k" => 10,
        "G" | "g" => 30,
        "T" | "t" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| SpecError::MemoryOverflow {
            value: value.into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(path: &str, ro: bool, serial: Option<&str>, direct: bool) -> DiskConfig {
        DiskConfig {
            path: path.into(),
            read_only: ro,
            serial: serial.map(Into::into),
            direct,
        }
    }

    #[test]
    fn disk_specs() {
        let ok: &[(&str, DiskConfig)] = &[
            ("a.img", disk("a.img", false, None, false)),
            ("/x/a.img,ro", disk("/x/a.img", true, None, false)),
            (
                "a.img,serial=data0",
                disk("a.img", false, Some("data0"), false),
            ),
            (
                "a.img,direct,ro,serial=abc",
                disk("a.img", true, Some("abc"), true),
            ),
            (
                "a.img,serial=12345678901234567890",
                disk("a.img", false, Some("12345678901234567890"), false),
            ),
        ];
        for (spec, want) in ok {
            assert_eq!(&DiskConfig::parse_spec(spec).unwrap(), want, "{spec}");
        }
        let bad: &[(&str, &str)] = &[
            ("", "the path is empty"),
            (",ro", "the path is empty"),
            ("a.img,rw", "unknown option \"rw\""),
            ("a.img,ro=1", "unknown option \"ro=1\""),
            ("a.img,serial", "unknown option \"serial\""),
            ("a.img,ro,ro", "option \"ro\" given twice"),
            ("a.img,serial=a,serial=b", "option \"serial\" given twice"),
            (
                "a.img,serial=123456789012345678901",
                "serial \"123456789012345678901\" is 21 bytes; at most 20",
            ),
            ("a.img,serial=", "serial \"\" must be non-empty"),
            ("a.img,serial=a b", "serial \"a b\" must be"),
            ("a.img,", "unknown option \"\""),
        ];
        for (spec, want) in bad {
            let e = DiskConfig::parse_spec(spec).unwrap_err().to_string();
            assert!(e.contains(want), "{spec}: {e}");
            assert!(
                e.contains(&format!("{spec:?}")),
                "error does not name the spec: {e}"
            );
        }
    }

    #[test]
    fn output_handlers_are_equal_only_to_their_clones() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        let a = OutputHandler::new(move |b| s.lock().unwrap().extend_from_slice(b));
        let b = OutputHandler::new(|_| {});
        assert_eq!(a, a.clone());
        assert_ne!(a, b);
        assert_eq!(
            SerialOutput::Handler(a.clone()),
            SerialOutput::Handler(a.clone())
        );
        assert_ne!(SerialOutput::Handler(a.clone()), SerialOutput::Sink);
        a.clone().call(b"hi");
        a.call(b"!");
        assert_eq!(*seen.lock().unwrap(), b"hi!");
        assert!(format!("{a:?}").starts_with("OutputHandler(0x"));
    }

    #[test]
    fn memory_sizes() {
        let ok: &[(&str, u64)] = &[
            ("256", 256 << 20),
            ("256M", 256 << 20),
            ("256MiB", 256 << 20),
            ("1G", 1 << 30),
            ("2GB", 2 << 30),
            ("65536K", 64 << 20),
            ("1T", 1 << 40),
        ];
        for (v, want) in ok {
            assert_eq!(parse_memory_size(v).unwrap(), *want, "{v}");
        }
        for v in ["", "M", "1X", "-1", "1.5G", "G1"] {
            assert_eq!(
                parse_memory_size(v),
                Err(SpecError::BadMemory { value: v.into() }),
                "{v}"
            );
        }
        assert!(matches!(
            parse_memory_size("99999999999T"),
            Err(SpecError::MemoryOverflow { .. })
        ));
    }
}
