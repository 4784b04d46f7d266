//! The state file: a fixed header, the serde state, a checksum.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "COCOONVM"
//!      8     2  format major (little-endian)
//!     10     2  format minor
//!     12     2  format patch
//!     14     2  zero
//!     16     8  payload length N
//!     24     N  payload: the state, postcard-encoded
//!   24+N    32  sha256 of bytes 0 .. 24+N
//! ```
//!
//! The payload of 1.0 is the [`MachineState`] fields up to `devices`; 1.1
//! appends the i8042's state ([`MachineState::i8042`]); 1.2 adds network
//! devices ([`DeviceState::Net`](crate::devices::virtio::DeviceState::Net),
//! a new variant at the end, so its files without a NIC are byte for byte
//! what 1.1 wrote, and a 1.1 reader refuses a file with a NIC as one that
//! does not decode; this reader names a newer minor version when that is
//! what it cannot decode).
//!
//! The magic and version come first and never move, so any reader can say
//! which version a file has before anything else. A reader takes every
//! minor version of its major: a minor version only appends to the payload
//! (fields after the last one, new enum variants at the end), and postcard
//! leaves trailing bytes it does not know unread. Another major is refused
//! naming both versions. Everything is checked (size, checksum, decoding,
//! then [`MachineState::validate`]) before a restore touches KVM.

use std::fmt;
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::state::MachineState;

pub const MAGIC: [u8; 8] = *b"COCOONVM";
/// The version this VMM writes.
pub const CURRENT: FormatVersion = FormatVersion {
    major: 1,
    minor: 2,
    patch: 0,
};
pub const HEADER_LEN: usize = 24;
pub const CHECKSUM_LEN: usize = 32;
/// No state is anywhere near this (it is some KiB per vCPU); a header that
/// claims more is corrupt, and is refused before anything is allocated.
pub const MAX_PAYLOAD: u64 = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FormatVersion {
    pub major: u16,
    pub minor: u16,
    pub patch: u16,
}

impl fmt::Display for FormatVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("cannot read the snapshot state {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot state {path} is truncated: {found} bytes, {need} needed")]
    Truncated { path: String, found: u64, need: u64 },
    #[error("snapshot state {path} has {extra} bytes after its checksum")]
    TrailingData { path: String, extra: u64 },
    #[error("{path} is not a cocoon snapshot state (magic {found})")]
    NotAState { path: String, found: String },
    #[error("snapshot state {path} has format version {found}; this VMM reads {supported_major}.x (it writes {current})", supported_major = CURRENT.major, current = CURRENT)]
    UnsupportedVersion { path: String, found: FormatVersion },
    #[error("snapshot state {path} claims a payload of {len} bytes, more than the {MAX_PAYLOAD} allowed")]
    PayloadTooLarge { path: String, len: u64 },
    #[error(
        "snapshot state {path} is corrupt: its sha256 is {computed}, the file records {recorded}"
    )]
    Checksum {
        path: String,
        recorded: String,
        computed: String,
    },
    #[error(
        "snapshot state {path} was written by a newer VMM (format {found}) and holds what this \
         VMM (format {current}) does not know, such as a new kind of device",
        current = CURRENT
    )]
    Newer {
        path: String,
        found: FormatVersion,
        #[source]
        source: postcard::Error,
    },
    #[error("snapshot state {path} does not decode")]
    Decode {
        path: String,
        #[source]
        source: postcard::Error,
    },
    #[error("snapshot state {path}: {what}")]
    Invalid { path: String, what: String },
}

/// The whole file for `state`.
pub fn encode(state: &MachineState) -> Result<Vec<u8>, postcard::Error> {
    let mut payload = postcard::to_allocvec(state)?;
    // 1.1's field, after 1.0's.
    payload.extend_from_slice(&postcard::to_allocvec(&state.i8042)?);
    encode_payload(CURRENT, &payload)
}

/// A file of `version` around an encoded payload. Public for tests that
/// make files of other versions.
pub fn encode_payload(version: FormatVersion, payload: &[u8]) -> Result<Vec<u8>, postcard::Error> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + CHECKSUM_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.major.to_le_bytes());
    out.extend_from_slice(&version.minor.to_le_bytes());
    out.extend_from_slice(&version.patch.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    Ok(out)
}

/// The version of a state file, from its header alone (no checksum, no
/// decoding): what a host can show for any file, readable or not.
pub fn read_version(path: &Path) -> Result<FormatVersion, StateFileError> {
    let name = path.display().to_string();
    let mut header = Vec::with_capacity(HEADER_LEN);
    std::fs::File::open(path)
        .and_then(|f| f.take(HEADER_LEN as u64).read_to_end(&mut header))
        .map_err(|source| StateFileError::Read {
            path: name.clone(),
            source,
        })?;
    let (version, _) = parse_header(&name, &header)?;
    Ok(version)
}

/// Reads and checks a whole state file, then decodes and validates it.
/// The header is read and checked first, so a file that is not a state (or
/// claims an absurd size) is refused without reading it all.
pub fn read(path: &Path) -> Result<(FormatVersion, MachineState), StateFileError> {
    let name = path.display().to_string();
    let read_err = |source| StateFileError::Read {
        path: name.clone(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::with_capacity(HEADER_LEN);
    (&mut file)
        .take(HEADER_LEN as u64)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    let (_, len) = parse_header(&name, &bytes)?;
    if len > MAX_PAYLOAD {
        return Err(StateFileError::PayloadTooLarge { path: name, len });
    }
    let need = HEADER_LEN as u64 + len + CHECKSUM_LEN as u64;
    let size = file.metadata().map_err(read_err)?.len();
    if size > need {
        return Err(StateFileError::TrailingData {
            path: name,
            extra: size - need,
        });
    }
    file.take(need - HEADER_LEN as u64)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    decode(&name, &bytes)
}

/// Checks and decodes the bytes of a state file named `name`.
pub fn decode(name: &str, bytes: &[u8]) -> Result<(FormatVersion, MachineState), StateFileError> {
    let (version, len) = parse_header(name, bytes)?;
    if len > MAX_PAYLOAD {
        return Err(StateFileError::PayloadTooLarge {
            path: name.into(),
            len,
        });
    }
    let body_end = HEADER_LEN + crate::cast::usize_from(len);
    let need = (body_end + CHECKSUM_LEN) as u64;
    let found = bytes.len() as u64;
    if found < need {
        return Err(StateFileError::Truncated {
            path: name.into(),
            found,
            need,
        });
    }
    if found > need {
        return Err(StateFileError::TrailingData {
            path: name.into(),
            extra: found - need,
        });
    }
    let computed = Sha256::digest(&bytes[..body_end]);
    let recorded = &bytes[body_end..];
    if computed.as_slice() != recorded {
        return Err(StateFileError::Checksum {
            path: name.into(),
            recorded: hex::encode(recorded),
            computed: hex::encode(computed),
        });
    }
    let decode_err = |source| {
        if (version.major, version.minor) > (CURRENT.major, CURRENT.minor) {
            StateFileError::Newer {
                path: name.into(),
                found: version,
                source,
            }
        } else {
            StateFileError::Decode {
                path: name.into(),
                source,
            }
        }
    };
    // take_from_bytes: what a newer minor version appended stays unread.
    let (mut state, rest) = postcard::take_from_bytes::<MachineState>(&bytes[HEADER_LEN..body_end])
        .map_err(decode_err)?;
    if version.minor >= 1 {
        let (i8042, _newer) = postcard::take_from_bytes(rest).map_err(decode_err)?;
        state.i8042 = i8042;
    }
    let invalid = |what| StateFileError::Invalid {
        path: name.into(),
        what,
    };
    if version.minor < 2 && state.nics().next().is_some() {
        return Err(invalid(format!(
            "format {version} has no network devices, and this file holds one"
        )));
    }
    state.validate().map_err(invalid)?;
    Ok((version, state))
}

/// Magic, version (refusing another major) and payload length.
fn parse_header(name: &str, bytes: &[u8]) -> Result<(FormatVersion, u64), StateFileError> {
    let found = bytes.len() as u64;
    if found < 8 || bytes[..8] != MAGIC {
        if found < 8 && MAGIC.starts_with(bytes) {
            return Err(StateFileError::Truncated {
                path: name.into(),
                found,
                need: HEADER_LEN as u64,
            });
        }
        return Err(StateFileError::NotAState {
            path: name.into(),
            found: hex::encode(&bytes[..bytes.len().min(8)]),
        });
    }
    if bytes.len() < HEADER_LEN {
        return Err(StateFileError::Truncated {
            path: name.into(),
            found,
            need: HEADER_LEN as u64,
        });
    }
    let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
    let version = FormatVersion {
        major: u16_at(8),
        minor: u16_at(10),
        patch: u16_at(12),
    };
    if version.major != CURRENT.major {
        return Err(StateFileError::UnsupportedVersion {
            path: name.into(),
            found: version,
        });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[16..24]);
    Ok((version, u64::from_le_bytes(len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::state::tests::{sample_state, sample_state_with_nic};

    fn decode_err(bytes: &[u8]) -> StateFileError {
        decode("state", bytes).expect_err("should be refused")
    }

    #[test]
    fn a_state_round_trips() {
        let state = sample_state();
        let bytes = encode(&state).unwrap();
        let (version, back) = decode("state", &bytes).unwrap();
        assert_eq!(version, CURRENT);
        assert_eq!(
            postcard::to_allocvec(&back).unwrap(),
            postcard::to_allocvec(&state).unwrap()
        );
        assert_eq!(back.i8042, state.i8042);
    }

    #[test]
    fn every_kind_of_damage_has_its_own_error() {
        let good = encode(&sample_state()).unwrap();
        let payload = &good[HEADER_LEN..good.len() - CHECKSUM_LEN];

        // Truncated anywhere: in the magic, the header, the payload, the sum.
        for cut in [3, 20, HEADER_LEN + 5, good.len() - 1] {
            assert!(
                matches!(decode_err(&good[..cut]), StateFileError::Truncated { .. }),
                "cut at {cut}"
            );
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(matches!(
            decode_err(&longer),
            StateFileError::TrailingData { extra: 1, .. }
        ));
        let mut magic = good.clone();
        magic[0] = b'X';
        assert!(matches!(
            decode_err(&magic),
            StateFileError::NotAState { .. }
        ));
        // A flipped byte in the payload or in the checksum itself.
        for at in [HEADER_LEN + payload.len() / 2, good.len() - 3] {
            let mut flipped = good.clone();
            flipped[at] ^= 0x40;
            assert!(
                matches!(decode_err(&flipped), StateFileError::Checksum { .. }),
                "flip at {at}"
            );
        }
        // A length that claims more than any state.
        let mut huge = good.clone();
        huge[16..24].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert!(matches!(
            decode_err(&huge),
            StateFileError::PayloadTooLarge { .. }
        ));
        // A valid checksum over a payload that is not a state.
        let junk = encode_payload(CURRENT, &[0xff; 40]).unwrap();
        assert!(matches!(decode_err(&junk), StateFileError::Decode { .. }));
    }

    #[test]
    fn versions_another_major_is_refused_a_newer_minor_loads() {
        let payload = postcard::to_allocvec(&sample_state()).unwrap();
        let v = |major, minor, patch| FormatVersion {
            major,
            minor,
            patch,
        };
        for other in [v(2, 0, 0), v(0, 9, 0)] {
            let file = encode_payload(other, &payload).unwrap();
            let e = decode_err(&file);
            assert!(
                matches!(e, StateFileError::UnsupportedVersion { found, .. } if found == other)
            );
            let text = e.to_string();
            assert!(
                text.contains(&other.to_string()) && text.contains(&CURRENT.to_string()),
                "{text}"
            );
        }
        // A newer minor appended something this reader does not know.
        let current = encode(&sample_state()).unwrap();
        let mut newer_payload = current[HEADER_LEN..current.len() - CHECKSUM_LEN].to_vec();
        newer_payload.extend_from_slice(b"fields of 1.3");
        let file = encode_payload(v(1, 3, 1), &newer_payload).unwrap();
        let (version, back) = decode("state", &file).unwrap();
        assert_eq!(version, v(1, 3, 1));
        assert_eq!(back.i8042, sample_state().i8042);
    }

    #[test]
    fn a_nic_needs_1_2_and_a_newer_device_kind_is_named_as_newer() {
        let with_nic = sample_state_with_nic();
        let file = encode(&with_nic).unwrap();
        let (version, back) = decode("state", &file).unwrap();
        assert_eq!(version, CURRENT);
        assert_eq!(back.nic_summaries(), with_nic.nic_summaries());
        assert_eq!(back.devices, with_nic.devices);
        // Without a NIC, 1.2's payload is 1.1's: a 1.1 reader loads it.
        let plain = encode(&sample_state()).unwrap();
        let payload = &plain[HEADER_LEN..plain.len() - CHECKSUM_LEN];
        let v1_1 = FormatVersion {
            major: 1,
            minor: 1,
            patch: 0,
        };
        decode("state", &encode_payload(v1_1, payload).unwrap()).unwrap();
        // A file that claims 1.1 cannot hold a NIC.
        let nic_payload = &file[HEADER_LEN..file.len() - CHECKSUM_LEN];
        let e = decode_err(&encode_payload(v1_1, nic_payload).unwrap());
        assert!(
            e.to_string()
                .contains("format 1.1.0 has no network devices"),
            "{e}"
        );
        // A device kind after Net (what 1.3 could add) is refused naming
        // both versions, not as mere corruption.
        let mut newer = postcard::to_allocvec(&with_nic).unwrap();
        let net = postcard::to_allocvec(&with_nic.devices[1].device).unwrap();
        let at = newer
            .windows(net.len())
            .position(|w| w == net.as_slice())
            .unwrap();
        newer[at] = 7;
        newer.extend_from_slice(&postcard::to_allocvec(&with_nic.i8042).unwrap());
        let v1_3 = FormatVersion { minor: 3, ..v1_1 };
        let e = decode_err(&encode_payload(v1_3, &newer).unwrap());
        assert!(matches!(e, StateFileError::Newer { found, .. } if found == v1_3));
        let text = e.to_string();
        assert!(
            text.contains("1.3.0") && text.contains(&CURRENT.to_string()),
            "{text}"
        );
        // The same damage in a file of this version is corruption.
        assert!(matches!(
            decode_err(&encode_payload(CURRENT, &newer).unwrap()),
            StateFileError::Decode { .. }
        ));
    }

    #[test]
    fn a_1_0_state_loads_with_the_power_on_i8042() {
        // 1.0's payload: the state without the i8042 after it.
        let payload = postcard::to_allocvec(&sample_state()).unwrap();
        let v1_0 = FormatVersion {
            major: 1,
            minor: 0,
            patch: 0,
        };
        let (version, back) = decode("state", &encode_payload(v1_0, &payload).unwrap()).unwrap();
        assert_eq!(version, v1_0);
        assert_eq!(back.i8042, Default::default());
        // The same payload claiming 1.1 lacks its i8042: refused.
        let v1_1 = FormatVersion { minor: 1, ..v1_0 };
        assert!(matches!(
            decode_err(&encode_payload(v1_1, &payload).unwrap()),
            StateFileError::Decode { .. }
        ));
    }

    #[test]
    fn files_are_read_header_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let good = encode(&sample_state()).unwrap();
        std::fs::write(&path, &good).unwrap();
        read(&path).unwrap();
        // A big file that is not a state is refused by its first bytes.
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 40)
            .unwrap();
        assert!(matches!(read(&path), Err(StateFileError::NotAState { .. })));
        let mut long = good.clone();
        long.extend_from_slice(&[0; 1000]);
        std::fs::write(&path, &long).unwrap();
        assert!(matches!(
            read(&path),
            Err(StateFileError::TrailingData { extra: 1000, .. })
        ));
        std::fs::write(&path, &good[..good.len() - 7]).unwrap();
        assert!(matches!(read(&path), Err(StateFileError::Truncated { .. })));
    }

    #[test]
    fn the_version_reads_from_the_header_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let mut file = encode(&sample_state()).unwrap();
        // Damage after the header does not matter to read_version.
        let n = file.len();
        file[n - 1] ^= 1;
        std::fs::write(&path, &file).unwrap();
        assert_eq!(read_version(&path).unwrap(), CURRENT);
        assert!(matches!(read(&path), Err(StateFileError::Checksum { .. })));
        let e = read_version(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(e, StateFileError::Read { .. }));
        assert!(e.to_string().contains("missing"));
    }
}
