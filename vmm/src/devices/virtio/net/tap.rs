//! Tap devices: opening an existing one for a VM, creating persistent
//! ones for the host to hand out, and the frame I/O the device does on it.
//!
//! A tap is opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and a 12-byte
//! vnet header (`TUNSETVNETHDRSZ`), so every frame read or written carries
//! the same `virtio_net_hdr_v1` the guest uses. The file is non-blocking:
//! reads say `WouldBlock` when nothing is queued, and the device waits on
//! the descriptor with epoll.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use super::header::HDR_LEN;
use super::Backend;

/// Linux's IFNAMSIZ, with the NUL.
const IFNAMSIZ: usize = 16;
const TUN_PATH: &str = "/dev/net/tun";
/// The offloads probed at open: if the tap takes these, the device offers
/// checksum offload and TSO both ways.
const PROBE_OFFLOAD: u32 =
    libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("{0:?} is not a valid interface name (1 to 15 bytes; no '/', ':', whitespace or NUL; not . or ..)")]
    BadName(String),
    #[error("there is no network interface named {0}")]
    NotFound(String),
    #[error("network interface {0} is not a tap device")]
    NotATap(String),
    #[error("tap {0} is busy: another process has it open")]
    Busy(String),
    #[error("a network interface named {0} already exists")]
    Exists(String),
    #[error("cannot open {TUN_PATH}")]
    OpenTun(#[source] io::Error),
    #[error("cannot attach to tap {0}")]
    Attach(String, #[source] io::Error),
    #[error("cannot {what} on tap {name}")]
    Ioctl {
        what: &'static str,
        name: String,
        #[source]
        source: io::Error,
    },
}

/// Checks an interface name as the kernel's `dev_valid_name` does.
/// `pattern` also allows one `%d`, which the kernel replaces with a number.
pub fn validate_name(name: &str, pattern: bool) -> Result<CString, TapError> {
    let bad = || TapError::BadName(name.to_string());
    let ok = !name.is_empty()
        && name.len() < IFNAMSIZ
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b != b'/' && b != b':' && b != 0 && !b.is_ascii_whitespace())
        && (pattern || !name.contains('%'))
        && name.matches('%').count() <= 1
        && (!name.contains('%') || name.contains("%d"));
    if !ok {
        return Err(bad());
    }
    CString::new(name).map_err(|_| bad())
}

/// The interface index of `name` in the calling thread's network
/// namespace, if there is such an interface.
pub fn interface_index(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: a NUL-terminated string that lives across the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}

fn ifreq(name: &CString, flags: libc::c_int) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    // The kernel's ifr_flags is a 16-bit field of bits (IFF_TUN_EXCL is
    // 0x8000): the bits are kept, not the signed value.
    let bits = u16::try_from(flags).expect("IFF_ flags are defined in 16 bits");
    req.ifr_ifru.ifru_flags = libc::c_short::from_ne_bytes(bits.to_ne_bytes());
    req
}

fn name_of(req: &libc::ifreq) -> String {
    let bytes: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn open_tun() -> Result<File, TapError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(TUN_PATH)
        .map_err(TapError::OpenTun)
}

/// TUNSETIFF on a fresh /dev/net/tun file.
fn set_iff(file: &File, req: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is, on a
    // file we own.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, req as *mut libc::ifreq) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// An ioctl whose argument is an int passed by value.
fn ioctl_val(file: &File, request: libc::Ioctl, value: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the tun ioctls used here take a plain integer argument and
    // touch no memory of ours.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), request, value) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// An ioctl whose argument is a pointer to an int.
fn ioctl_int_ref(file: &File, request: libc::Ioctl, value: &libc::c_int) -> io::Result<()> {
    // SAFETY: the kernel reads one int through the pointer, which points at
    // `value` for the duration of the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), request, value as *const libc::c_int) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Creates a persistent tap and returns its name. `name` may be a pattern
/// with `%d` (`cctap%d`), which the kernel numbers; an exact name that is
/// already taken is refused rather than reused. The tap outlives this
/// process until it is deleted (the host deletes it with netlink).
pub fn create_persistent(name: &str) -> Result<String, TapError> {
    let cname = validate_name(name, true)?;
    let file = open_tun()?;
    let mut req = ifreq(
        &cname,
        libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_TUN_EXCL,
    );
    set_iff(&file, &mut req).map_err(|e| match e.raw_os_error() {
        Some(libc::EBUSY) | Some(libc::EEXIST) => TapError::Exists(name.to_string()),
        _ => TapError::Attach(name.to_string(), e),
    })?;
    let created = name_of(&req);
    ioctl_val(&file, libc::TUNSETPERSIST, 1).map_err(|source| TapError::Ioctl {
        what: "make it persistent",
        name: created.clone(),
        source,
    })?;
    Ok(created)
}

/// An open tap: the backend of one virtio-net device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    offload: bool,
}

impl Tap {
    /// Opens the existing tap `name` (in the calling thread's network
    /// namespace) for one VM. It never creates one: a missing interface,
    /// one that is not a tap, and a tap another process holds are errors
    /// that say so.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let cname = validate_name(name, false)?;
        let before = interface_index(name).ok_or_else(|| TapError::NotFound(name.to_string()))?;
        let file = open_tun()?;
        let mut req = ifreq(&cname, libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR);
        set_iff(&file, &mut req).map_err(|e| match e.raw_os_error() {
            // tun_set_iff: another queue is attached to a single-queue tap.
            Some(libc::EBUSY) => TapError::Busy(name.to_string()),
            // An existing device that is not a tap (or a tun, or a
            // multi-queue tap).
            Some(libc::EINVAL) => TapError::NotATap(name.to_string()),
            _ => TapError::Attach(name.to_string(), e),
        })?;
        // If the interface vanished between the look-up and TUNSETIFF, the
        // kernel made a new tap that dies with this file: not what was asked.
        if interface_index(name) != Some(before) {
            return Err(TapError::NotFound(name.to_string()));
        }
        let tap = Tap {
            file,
            name: name.to_string(),
            offload: false,
        };
        let hdr_len = libc::c_int::try_from(HDR_LEN).expect("a 12-byte header");
        ioctl_int_ref(&tap.file, libc::TUNSETVNETHDRSZ, &hdr_len)
            .map_err(|e| tap.ioctl_error("set the vnet header size", e))?;
        let offload = tap.set_offload_flags(PROBE_OFFLOAD).is_ok();
        tap.set_offload_flags(0)
            .map_err(|e| tap.ioctl_error("clear offloads", e))?;
        Ok(Tap { offload, ..tap })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the tap takes checksum and TSO offloads.
    pub fn supports_offload(&self) -> bool {
        self.offload
    }

    /// A second descriptor of the same open tap, for waiting on it.
    pub fn poll_fd(&self) -> io::Result<OwnedFd> {
        self.file.as_fd().try_clone_to_owned()
    }

    fn set_offload_flags(&self, flags: u32) -> io::Result<()> {
        ioctl_val(&self.file, libc::TUNSETOFFLOAD, libc::c_ulong::from(flags))
    }

    fn ioctl_error(&self, what: &'static str, source: io::Error) -> TapError {
        TapError::Ioctl {
            what,
            name: self.name.clone(),
            source,
        }
    }
}

impl Backend for Tap {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.file.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<usize> {
        loop {
            match self.file.write(frame) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.set_offload_flags(flags)
    }

    fn supports_offload(&self) -> bool {
        self.offload
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        for ok in ["tap0", "a", "cocoon-tap-0123", "tap.1_x-y"] {
            assert!(validate_name(ok, false).is_ok(), "{ok}");
        }
        for ok in ["cctap%d", "%d"] {
            assert!(validate_name(ok, true).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "0123456789abcdef",
            "a/b",
            "a:b",
            "a b",
            "a\tb",
            "a\0b",
            "tap%d",
        ] {
            assert!(
                matches!(validate_name(bad, false), Err(TapError::BadName(ref n)) if n == bad),
                "{bad:?}"
            );
        }
        for bad in ["tap%s", "t%d%d", "tap%"] {
            assert!(validate_name(bad, true).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn missing_interface_is_not_found_and_nothing_is_created() {
        let name = "cocoon-nx-7f3a";
        assert!(interface_index(name).is_none());
        match Tap::open(name) {
            Err(TapError::NotFound(n)) => assert_eq!(n, name),
            other => panic!("expected NotFound, got {other:?}"),
        }
        assert!(interface_index(name).is_none());
    }

    #[test]
    fn loopback_is_not_a_tap() {
        // The VMM's tests run as root, where /dev/net/tun is usable.
        match Tap::open("lo") {
            Err(TapError::NotATap(n)) => assert_eq!(n, "lo"),
            other => panic!("expected NotATap, got {other:?}"),
        }
    }
}
