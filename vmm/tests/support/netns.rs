//! Network namespaces that a test makes and removes, with `ip` (iproute2),
//! and raw Ethernet on their interfaces through packet sockets. Nothing a
//! test does here touches the host's own network: every interface lives
//! and dies inside the namespace.

#![allow(dead_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Prints `SKIPPED test: reason` and appends it to `$COCOON_SKIP_LOG`.
pub fn skip(test: &str, reason: &str) {
    let line = format!("SKIPPED {test}: {reason}");
    eprintln!("{line}");
    if let Ok(path) = std::env::var("COCOON_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// A network namespace, deleted (with every interface in it) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A fresh namespace with loopback up and IPv6 off (so the kernel adds
    /// no router solicitations or MLD reports to what the test counts),
    /// named `PREFIX-TAG-PID-N` (PREFIX from `$COCOON_NETNS_PREFIX`,
    /// `cocoon` by default, so that concurrent runs can tell theirs apart).
    /// `Err` says why one cannot be made here.
    pub fn new(tag: &str) -> Result<Netns, String> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let prefix = std::env::var("COCOON_NETNS_PREFIX").unwrap_or_else(|_| "cocoon".into());
        let name = format!(
            "{prefix}-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .map_err(|e| format!("cannot run ip (iproute2): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "ip netns add failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let ns = Netns { name };
        for key in ["all", "default"] {
            // Best effort: a kernel without IPv6 has nothing to turn off.
            let _ = ns.exec(&[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{key}.disable_ipv6=1"),
            ]);
        }
        ns.ip("link set lo up");
        Ok(ns)
    }

    /// `ip -n NS ARGS`, which must succeed.
    pub fn ip(&self, args: &str) {
        let out = Command::new("ip")
            .args(["-n", &self.name])
            .args(args.split_whitespace())
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip -n {} {args}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, argv: &[&str]) -> io::Result<std::process::Output> {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .output()
    }

    /// A bridge, up, without multicast snooping: a snooping bridge joins
    /// 224.0.0.106 (all-snoopers) and sends an IGMPv3 report for it (to
    /// 01:00:5e:00:00:16) about a second after it comes up, which would
    /// land in the tests' frame counts.
    pub fn bridge(&self, name: &str) {
        self.ip(&format!("link add {name} type bridge mcast_snooping 0"));
        self.ip(&format!("link set {name} up"));
    }

    /// A persistent tap on `bridge`, up.
    pub fn tap_on(&self, tap: &str, bridge: &str) {
        self.ip(&format!("tuntap add dev {tap} mode tap"));
        self.ip(&format!("link set {tap} master {bridge} up"));
    }

    /// A veth pair with `port` on `bridge` and `end` left for the test.
    pub fn veth_on(&self, end: &str, port: &str, bridge: &str) {
        self.ip(&format!("link add {end} type veth peer name {port}"));
        self.ip(&format!("link set {port} master {bridge} up"));
        self.ip(&format!("link set {end} up"));
    }

    /// Runs `f` on a thread inside the namespace; threads it starts (a
    /// VM's) are inside too.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = std::fs::File::open(&path).expect("open the netns file");
                // SAFETY: setns on a namespace descriptor we own; it changes
                // only this thread's network namespace.
                let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns: {}", io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A raw socket on one interface: every frame in and out, whole.
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

/// sizeof(sockaddr_ll), as the socklen_t the calls take.
#[allow(clippy::cast_possible_truncation, reason = "sockaddr_ll is 20 bytes")]
const SOCKADDR_LL_LEN: libc::socklen_t =
    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
impl PacketSocket {
    /// Opens one on `ifname` in the calling thread's namespace.
    pub fn open(ifname: &str) -> io::Result<PacketSocket> {
        let proto = u16::try_from(libc::ETH_P_ALL).unwrap().to_be();
        // SAFETY: plain socket(2); the descriptor is owned right after.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let c = CString::new(ifname).unwrap();
        // SAFETY: a NUL-terminated name for the duration of the call.
        let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) } as i32;
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: sockaddr_ll is plain data; zero is a valid start.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex;
        // SAFETY: binds our socket to a sockaddr_ll of the stated size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                SOCKADDR_LL_LEN,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(PacketSocket { fd, ifindex })
    }

    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: sends from a live buffer of the given length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The next frame that arrives on the interface (not ones it sends),
    /// waiting at most until `deadline`.
    pub fn recv_incoming(&self, deadline: Instant) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, 1000) as i32;
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
                continue;
            }
            // SAFETY: sockaddr_ll is plain data.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut from_len = SOCKADDR_LL_LEN;
            // SAFETY: receives into a live buffer and sockaddr of the
            // stated sizes.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut from_len,
                )
            };
            if n < 0 || from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            return Some(buf[..n as usize].to_vec());
        }
    }
}

/// Waits for `pred`, polling, for at most `limit`.
pub fn wait_until(limit: Duration, mut pred: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if pred() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    pred()
}
