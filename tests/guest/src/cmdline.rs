//! The command line: virtio-mmio devices and the actions to run on disks.
//!
//! Pure parsing, no I/O: errors are handed to a callback so the caller
//! prints them and carries on with the parameters that did parse.

use core::fmt;

use crate::netcmd::{self, NetAction};

/// At most this many `virtio_mmio.device=` entries are used.
pub const MAX_DEVICES: usize = 32;
/// At most this many `cocoon.*` actions are run.
pub const MAX_ACTIONS: usize = 64;

/// One `virtio_mmio.device=SIZE@ADDR:IRQ[:ID]` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    pub size: u64,
    pub addr: u64,
    pub irq: u32,
}

/// One `cocoon.*` parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// `cocoon.hash=IDX:SECTOR:COUNT`
    Hash {
        disk: usize,
        sector: u64,
        count: u64,
    },
    /// `cocoon.write=IDX:SECTOR:BYTE`
    Write { disk: usize, sector: u64, byte: u8 },
    /// `cocoon.seqread=IDX:BYTES`
    SeqRead { disk: usize, bytes: u64 },
    /// `cocoon.count=PERIOD_MS:TICKS` (TICKS 0: for ever)
    Count { period_ms: u64, ticks: u64 },
    /// `cocoon.hang=0`: stop answering (interrupts off, halted for ever),
    /// as a hung guest does.
    Hang,
    /// `cocoon.net.*`: see [`NetAction`].
    Net(NetAction),
}

impl Action {
    /// The disk index the action names, if it works on a disk.
    pub fn disk(&self) -> Option<usize> {
        match *self {
            Action::Hash { disk, .. }
            | Action::Write { disk, .. }
            | Action::SeqRead { disk, .. } => Some(disk),
            Action::Count { .. } | Action::Hang | Action::Net(_) => None,
        }
    }
}

/// The action as its command-line parameter (a token without spaces).
impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Action::Hash {
                disk,
                sector,
                count,
            } => write!(f, "cocoon.hash={disk}:{sector}:{count}"),
            Action::Write { disk, sector, byte } => {
                write!(f, "cocoon.write={disk}:{sector}:{byte:02x}")
            }
            Action::SeqRead { disk, bytes } => write!(f, "cocoon.seqread={disk}:{bytes}"),
            Action::Count { period_ms, ticks } => write!(f, "cocoon.count={period_ms}:{ticks}"),
            Action::Hang => f.write_str("cocoon.hang=0"),
            Action::Net(net) => net.fmt(f),
        }
    }
}

/// Everything the guest takes from its command line, in command-line order.
pub struct Cmdline {
    devices: [MmioDevice; MAX_DEVICES],
    n_devices: usize,
    actions: [Action; MAX_ACTIONS],
    n_actions: usize,
}

impl Cmdline {
    pub fn devices(&self) -> &[MmioDevice] {
        &self.devices[..self.n_devices]
    }

    pub fn actions(&self) -> &[Action] {
        &self.actions[..self.n_actions]
    }
}

/// A parameter that was not understood.
#[derive(Debug, PartialEq, Eq)]
pub struct ParseError<'a> {
    pub param: &'a [u8],
    pub reason: &'static str,
}

impl fmt::Display for ParseError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad parameter {}: {}", Escaped(self.param), self.reason)
    }
}

/// Parses `line`; every parameter that fails goes to `on_error` and is left out.
pub fn parse<'a>(line: &'a [u8], mut on_error: impl FnMut(ParseError<'a>)) -> Cmdline {
    let mut out = Cmdline {
        devices: [MmioDevice {
            size: 0,
            addr: 0,
            irq: 0,
        }; MAX_DEVICES],
        n_devices: 0,
        actions: [Action::SeqRead { disk: 0, bytes: 0 }; MAX_ACTIONS],
        n_actions: 0,
    };
    for param in line
        .split(|b| b.is_ascii_whitespace())
        .filter(|p| !p.is_empty())
    {
        let fail = |reason| ParseError { param, reason };
        if let Some(value) = param.strip_prefix(b"virtio_mmio.device=") {
            match parse_device(value) {
                Ok(_) if out.n_devices == MAX_DEVICES => on_error(fail("too many devices")),
                Ok(device) => {
                    out.devices[out.n_devices] = device;
                    out.n_devices += 1;
                }
                Err(reason) => on_error(fail(reason)),
            }
        } else if param.starts_with(b"cocoon.") {
            match parse_action(param) {
                Ok(_) if out.n_actions == MAX_ACTIONS => on_error(fail("too many actions")),
                Ok(action) => {
                    out.actions[out.n_actions] = action;
                    out.n_actions += 1;
                }
                Err(reason) => on_error(fail(reason)),
            }
        }
    }
    out
}

fn parse_device(value: &[u8]) -> Result<MmioDevice, &'static str> {
    let (size, rest) = split_once(value, b'@').ok_or("expected SIZE@ADDR:IRQ")?;
    let mut fields = rest.split(|&b| b == b':');
    let addr = fields.next().ok_or("expected SIZE@ADDR:IRQ")?;
    let irq = fields.next().ok_or("expected SIZE@ADDR:IRQ")?;
    // Linux accepts an optional `:ID` (the platform device id); unused here.
    let _id = fields.next();
    if fields.next().is_some() {
        return Err("too many fields");
    }
    let size = parse_size(size).ok_or("bad size")?;
    let addr = parse_number(addr).ok_or("bad address")?;
    let irq = parse_number(irq)
        .and_then(|irq| u32::try_from(irq).ok())
        .ok_or("bad irq")?;
    if size == 0 {
        return Err("zero size");
    }
    Ok(MmioDevice { size, addr, irq })
}

fn parse_action(param: &[u8]) -> Result<Action, &'static str> {
    let (name, value) = split_once(param, b'=').ok_or("expected NAME=VALUE")?;
    if let Some(net) = name.strip_prefix(b"cocoon.net.") {
        return netcmd::parse(net, value).map(Action::Net);
    }
    let mut fields = value.split(|&b| b == b':');
    let mut next = |what| fields.next().ok_or(what);
    let action = match name {
        b"cocoon.hash" => {
            let disk = parse_index(next("expected IDX:SECTOR:COUNT")?)?;
            let sector = parse_number(next("expected IDX:SECTOR:COUNT")?).ok_or("bad sector")?;
            let count = parse_number(next("expected IDX:SECTOR:COUNT")?).ok_or("bad count")?;
            if count == 0 {
                return Err("zero count");
            }
            Action::Hash {
                disk,
                sector,
                count,
            }
        }
        b"cocoon.write" => {
            let disk = parse_index(next("expected IDX:SECTOR:BYTE")?)?;
            let sector = parse_number(next("expected IDX:SECTOR:BYTE")?).ok_or("bad sector")?;
            let byte = parse_hex_byte(next("expected IDX:SECTOR:BYTE")?).ok_or("bad byte")?;
            Action::Write { disk, sector, byte }
        }
        b"cocoon.seqread" => {
            let disk = parse_index(next("expected IDX:BYTES")?)?;
            let bytes = parse_size(next("expected IDX:BYTES")?).ok_or("bad byte count")?;
            if bytes == 0 || !bytes.is_multiple_of(512) {
                return Err("byte count must be a non-zero multiple of 512");
            }
            Action::SeqRead { disk, bytes }
        }
        b"cocoon.count" => {
            let period_ms = parse_number(next("expected PERIOD_MS:TICKS")?).ok_or("bad period")?;
            let ticks = parse_number(next("expected PERIOD_MS:TICKS")?).ok_or("bad tick count")?;
            if period_ms == 0 {
                return Err("zero period");
            }
            Action::Count { period_ms, ticks }
        }
        // A value, so that the parameter has the NAME=VALUE form of the
        // others; 0 is the one there is (for ever).
        b"cocoon.hang" => match next("expected 0")? {
            b"0" => Action::Hang,
            _ => return Err("expected 0"),
        },
        _ => return Err("unknown parameter"),
    };
    if fields.next().is_some() {
        return Err("too many fields");
    }
    Ok(action)
}

fn split_once(s: &[u8], sep: u8) -> Option<(&[u8], &[u8])> {
    let at = s.iter().position(|&b| b == sep)?;
    Some((&s[..at], &s[at + 1..]))
}

fn parse_index(s: &[u8]) -> Result<usize, &'static str> {
    parse_number(s)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or("bad disk index")
}

/// Decimal, or hex with a `0x` prefix.
fn parse_number(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s {
        [b'0', b'x' | b'X', hex @ ..] => (hex, 16),
        _ => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        let digit = (b as char).to_digit(radix)?;
        acc.checked_mul(radix.into())?.checked_add(digit.into())
    })
}

/// A number with an optional `K`, `M` or `G` suffix (binary multiples), as
/// Linux's memparse takes them.
fn parse_size(s: &[u8]) -> Option<u64> {
    let (number, shift) = match s {
        [n @ .., b'k' | b'K'] => (n, 10),
        [n @ .., b'm' | b'M'] => (n, 20),
        [n @ .., b'g' | b'G'] => (n, 30),
        _ => (s, 0),
    };
    let n = parse_number(number)?;
    n.checked_mul(1 << shift)
}

/// One or two hex digits, `0x` prefix optional.
fn parse_hex_byte(s: &[u8]) -> Option<u8> {
    let digits = s
        .strip_prefix(b"0x")
        .or_else(|| s.strip_prefix(b"0X"))
        .unwrap_or(s);
    if digits.is_empty() || digits.len() > 2 {
        return None;
    }
    digits.iter().try_fold(0u8, |acc, &b| {
        let digit = (b as char).to_digit(16)? as u8;
        Some(acc * 16 + digit)
    })
}

/// Prints bytes as ASCII, with anything that is not printable as `\xNN`.
pub struct Escaped<'a>(pub &'a [u8]);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0 {
            if b == b' ' || b.is_ascii_graphic() && b != b'\\' {
                write!(f, "{}", b as char)?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(line: &str) -> Cmdline {
        parse(line.as_bytes(), |e| panic!("{e}"))
    }

    #[test]
    fn device_forms() {
        let c = parse_ok(
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 \
             virtio_mmio.device=512@0xfeb00e00:12 virtio_mmio.device=0x1000@0xd0001000:6:3",
        );
        assert_eq!(
            c.devices(),
            &[
                MmioDevice {
                    size: 4096,
                    addr: 0xd000_0000,
                    irq: 5
                },
                MmioDevice {
                    size: 512,
                    addr: 0xfeb0_0e00,
                    irq: 12
                },
                MmioDevice {
                    size: 4096,
                    addr: 0xd000_1000,
                    irq: 6
                },
            ]
        );
    }

    #[test]
    fn actions_in_order() {
        let c = parse_ok(
            "cocoon.write=1:4:5a cocoon.hash=0:0:8 cocoon.seqread=0:256M cocoon.count=50:0 cocoon.hang=0",
        );
        assert_eq!(
            c.actions(),
            &[
                Action::Write {
                    disk: 1,
                    sector: 4,
                    byte: 0x5a
                },
                Action::Hash {
                    disk: 0,
                    sector: 0,
                    count: 8
                },
                Action::SeqRead {
                    disk: 0,
                    bytes: 256 << 20
                },
                Action::Count {
                    period_ms: 50,
                    ticks: 0
                },
                Action::Hang,
            ]
        );
        assert_eq!(c.actions()[3].disk(), None);
        assert_eq!(c.actions()[3].to_string(), "cocoon.count=50:0");
        assert_eq!(c.actions()[4].disk(), None);
        assert_eq!(c.actions()[4].to_string(), "cocoon.hang=0");
    }

    #[test]
    fn net_actions_take_their_place_in_order() {
        let c = parse_ok("cocoon.net.recv=0:1:100 cocoon.hash=0:0:8");
        assert_eq!(
            c.actions(),
            &[
                Action::Net(NetAction::Recv {
                    nic: 0,
                    count: 1,
                    ms: 100
                }),
                Action::Hash {
                    disk: 0,
                    sector: 0,
                    count: 8
                },
            ]
        );
        assert_eq!(c.actions()[0].disk(), None);
        let mut got = None;
        parse(b"cocoon.net.recv=0:0:1", |e| got = Some(e.reason));
        assert_eq!(got, Some("zero count"));
    }

    #[test]
    fn bad_parameters_are_reported_and_skipped() {
        let cases: &[(&str, &str)] = &[
            (
                "virtio_mmio.device=4K0xd0000000:5",
                "expected SIZE@ADDR:IRQ",
            ),
            ("virtio_mmio.device=4Q@0xd0000000:5", "bad size"),
            ("virtio_mmio.device=4K@0xzz:5", "bad address"),
            ("virtio_mmio.device=4K@0xd0000000", "expected SIZE@ADDR:IRQ"),
            ("virtio_mmio.device=99999999999999999999@0x0:5", "bad size"),
            ("cocoon.hash=0:0:0", "zero count"),
            ("cocoon.hash=0:0", "expected IDX:SECTOR:COUNT"),
            ("cocoon.write=0:0:100", "bad byte"),
            (
                "cocoon.seqread=0:100",
                "byte count must be a non-zero multiple of 512",
            ),
            ("cocoon.frobnicate=1", "unknown parameter"),
            ("cocoon.hash=0:0:1:2", "too many fields"),
            ("cocoon.count=0:5", "zero period"),
            ("cocoon.count=10", "expected PERIOD_MS:TICKS"),
            ("cocoon.count=10:x", "bad tick count"),
            ("cocoon.hang=5", "expected 0"),
            ("cocoon.hang=0:1", "too many fields"),
        ];
        for (line, want) in cases {
            let mut got = None;
            let c = parse(line.as_bytes(), |e| got = Some(e.reason));
            assert_eq!(got, Some(*want), "{line}");
            assert!(c.devices().is_empty() && c.actions().is_empty(), "{line}");
        }
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_number(b"0x10"), Some(16));
        assert_eq!(parse_number(b"10"), Some(10));
        assert_eq!(parse_number(b"0x"), None);
        assert_eq!(parse_size(b"4K"), Some(4096));
        assert_eq!(parse_size(b"1g"), Some(1 << 30));
        assert_eq!(parse_hex_byte(b"ff"), Some(0xff));
        assert_eq!(parse_hex_byte(b"0x5A"), Some(0x5a));
    }
}
