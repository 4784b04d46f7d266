//! `--data-disk size=20G[,name=N][,fstype=ext4|none][,mount=/mnt/x][,directio=on|off|auto]`.
//!
//! Parsing is two steps, both pure: [`DataDiskSpec`] is one flag as
//! written (its `FromStr` is what clap calls), and [`resolve`] turns the
//! whole list into [`DataDisk`]s: names given to the disks that have none
//! (`data1`, `data2`… skipping names in use), mount points filled in
//! (`/mnt/NAME` for ext4), duplicates refused. Every error quotes the part
//! of the flag it is about.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use super::model::FsType;
use super::rules::{check_mount_point, check_name, MIN_DATA_DISK_BYTES, RESERVED_PREFIX};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("--data-disk {spec:?}: {part:?}: {reason}")]
    Part {
        spec: String,
        part: String,
        reason: String,
    },
    #[error("--data-disk {spec:?}: no size; add size=N (K, M, G or T suffix)")]
    NoSize { spec: String },
    #[error("--data-disk {spec:?}: name {name:?} is already used by another data disk")]
    DuplicateName { spec: String, name: String },
    #[error("more than {max} data disks")]
    TooMany { max: usize },
}

/// Where a disk is mounted, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountSpec {
    /// No `mount=`: `/mnt/NAME` for ext4, nothing for none.
    Default,
    /// `mount=` with nothing after it: not mounted.
    Unmounted,
    /// `mount=/path`.
    At(String),
}

/// One `--data-disk` flag as written; [`resolve`] completes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDiskSpec {
    /// The flag's text, quoted in errors.
    pub text: String,
    pub size_bytes: u64,
    pub name: Option<String>,
    pub fstype: FsType,
    pub mount: MountSpec,
    /// `on` Some(true), `off` Some(false), `auto` (the default) None.
    pub direct_io: Option<bool>,
}

/// A data disk with every choice made: what the policy is asked for and
/// what the host creates. The name is also the serial: the guest sees
/// `/dev/disk/by-id/virtio-NAME`.
pub type DataDisk = crate::plugin::policy::DataDiskRequest;

/// The most data disks one VM may have (the guest's virtio-mmio slots are
/// shared with layers, the cow, cidata and NICs).
pub const MAX_DATA_DISKS: usize = 16;

impl FromStr for DataDiskSpec {
    type Err = SpecError;

    fn from_str(text: &str) -> Result<Self, SpecError> {
        let bad = |part: &str, reason: String| SpecError::Part {
            spec: text.to_string(),
            part: part.to_string(),
            reason,
        };
        let mut seen = BTreeSet::new();
        let mut size = None;
        let mut name = None;
        let mut fstype = FsType::Ext4;
        let mut mount = MountSpec::Default;
        let mut direct_io = None;
        for part in text.split(',') {
            let Some((key, value)) = part.split_once('=') else {
                return Err(bad(
                    part,
                    "expected key=value (keys: size, name, fstype, mount, directio)".into(),
                ));
            };
            if !seen.insert(key) {
                return Err(bad(part, format!("{key} is given twice")));
            }
            match key {
                "size" => size = Some(parse_size(value).map_err(|r| bad(part, r))?),
                "name" => {
                    check_name(value).map_err(|r| bad(part, r))?;
                    if value.starts_with(RESERVED_PREFIX) {
                        return Err(bad(
                            part,
                            format!("the prefix {RESERVED_PREFIX:?} is reserved for the host's own disks"),
                        ));
                    }
                    name = Some(value.to_string());
                }
                "fstype" => {
                    fstype = match value {
                        "ext4" => FsType::Ext4,
                        "none" => FsType::None,
                        _ => return Err(bad(part, "expected ext4 or none".into())),
                    }
                }
                "mount" if value.is_empty() => mount = MountSpec::Unmounted,
                "mount" => {
                    check_mount_point(value).map_err(|r| bad(part, r))?;
                    mount = MountSpec::At(value.to_string());
                }
                "directio" => {
                    direct_io = match value {
                        "on" => Some(true),
                        "off" => Some(false),
                        "auto" => None,
                        _ => return Err(bad(part, "expected on, off or auto".into())),
                    }
                }
                _ => {
                    return Err(bad(
                        part,
                        format!("unknown key {key:?} (keys: size, name, fstype, mount, directio)"),
                    ))
                }
            }
        }
        if let (FsType::None, MountSpec::At(_)) = (fstype, &mount) {
            let part = text
                .split(',')
                .find(|p| p.starts_with("mount="))
                .unwrap_or(text);
            return Err(bad(
                part,
                "a disk with fstype=none has no filesystem to mount".into(),
            ));
        }
        Ok(DataDiskSpec {
            text: text.to_string(),
            size_bytes: size.ok_or_else(|| SpecError::NoSize {
                spec: text.to_string(),
            })?,
            name,
            fstype,
            mount,
            direct_io,
        })
    }
}

impl fmt::Display for DataDiskSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// `20G`, `512M`, `1T`, `16777216`: binary multiples (K = 1024), at least
/// [`MIN_DATA_DISK_BYTES`].
pub fn parse_size(value: &str) -> Result<u64, String> {
    let (digits, shift) = match value.as_bytes().last() {
        Some(b'K' | b'k') => (&value[..value.len() - 1], 10),
        Some(b'M' | b'm') => (&value[..value.len() - 1], 20),
        Some(b'G' | b'g') => (&value[..value.len() - 1], 30),
        Some(b'T' | b't') => (&value[..value.len() - 1], 40),
        _ => (value, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err("expected a whole number with an optional K, M, G or T suffix".into());
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| "the number is too large".to_string())?;
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| "the size does not fit in 64 bits".to_string())?;
    if bytes < MIN_DATA_DISK_BYTES {
        return Err(format!(
            "{bytes} bytes; a data disk needs at least 16M (16777216 bytes)"
        ));
    }
    Ok(bytes)
}

/// Completes a VM's data-disk flags, in order. `in_use` are names the VM
/// already has (they are neither reused by a generated name nor accepted
/// twice).
pub fn resolve(specs: &[DataDiskSpec], in_use: &[&str]) -> Result<Vec<DataDisk>, SpecError> {
    if specs.len() > MAX_DATA_DISKS {
        return Err(SpecError::TooMany {
            max: MAX_DATA_DISKS,
        });
    }
    let mut taken: BTreeSet<String> = in_use.iter().map(|s| s.to_string()).collect();
    for s in specs {
        if let Some(n) = &s.name {
            if !taken.insert(n.clone()) {
                return Err(SpecError::DuplicateName {
                    spec: s.text.clone(),
                    name: n.clone(),
                });
            }
        }
    }
    let mut next = 1usize;
    let mut out = Vec::with_capacity(specs.len());
    for s in specs {
        let name = match &s.name {
            Some(n) => n.clone(),
            None => loop {
                let candidate = format!("data{next}");
                next += 1;
                if taken.insert(candidate.clone()) {
                    break candidate;
                }
            },
        };
        let mount_point = match (&s.mount, s.fstype) {
            (MountSpec::At(m), _) => Some(m.clone()),
            (MountSpec::Default, FsType::Ext4) => Some(format!("/mnt/{name}")),
            (MountSpec::Default, FsType::None) | (MountSpec::Unmounted, _) => None,
        };
        out.push(DataDisk {
            name,
            size_bytes: s.size_bytes,
            fstype: s.fstype,
            mount_point,
            direct_io: s.direct_io,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const M16: u64 = 16 << 20;

    fn parse(s: &str) -> Result<DataDiskSpec, SpecError> {
        s.parse()
    }

    #[test]
    fn sizes() {
        let cases: &[(&str, Result<u64, &str>)] = &[
            ("16M", Ok(M16)),
            ("16m", Ok(M16)),
            ("16777216", Ok(M16)),
            ("16384K", Ok(M16)),
            ("20G", Ok(20 << 30)),
            ("2T", Ok(2 << 40)),
            ("15M", Err("at least 16M")),
            ("16777215", Err("at least 16M")),
            ("0", Err("at least 16M")),
            ("", Err("whole number")),
            ("G", Err("whole number")),
            ("1.5G", Err("whole number")),
            ("-1G", Err("whole number")),
            ("20GB", Err("whole number")),
            ("20 G", Err("whole number")),
            ("0x100M", Err("whole number")),
            ("99999999999999999999", Err("too large")),
            ("16777216T", Err("64 bits")),
        ];
        for (input, want) in cases {
            match (parse_size(input), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, *want, "{input:?}"),
                (Err(e), Err(want)) => assert!(e.contains(want), "{input:?}: {e}"),
                (got, want) => panic!("{input:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn flags_that_parse() {
        let s = parse("size=20G").unwrap();
        assert_eq!(
            (s.size_bytes, &s.name, s.fstype, &s.mount, s.direct_io),
            (20 << 30, &None, FsType::Ext4, &MountSpec::Default, None)
        );
        let s = parse("size=1G,name=logs,fstype=ext4,mount=/var/log,directio=on").unwrap();
        assert_eq!(s.name.as_deref(), Some("logs"));
        assert_eq!(s.mount, MountSpec::At("/var/log".into()));
        assert_eq!(s.direct_io, Some(true));
        // Order does not matter.
        let s = parse("directio=off,fstype=none,size=64M").unwrap();
        assert_eq!((s.fstype, s.direct_io), (FsType::None, Some(false)));
        assert_eq!(parse("size=64M,directio=auto").unwrap().direct_io, None);
        assert_eq!(
            parse("size=64M,mount=").unwrap().mount,
            MountSpec::Unmounted
        );
        // fstype none with an empty mount is fine: nothing is mounted.
        parse("size=64M,fstype=none,mount=").unwrap();
        assert_eq!(parse("size=64M").unwrap().to_string(), "size=64M");
    }

    /// Each bad flag fails, quoting the offending part.
    #[test]
    fn flags_that_fail_quote_the_part() {
        let cases: &[(&str, &str, &str)] = &[
            ("size=8M", "\"size=8M\"", "at least 16M"),
            ("size=abc", "\"size=abc\"", "whole number"),
            ("size=", "\"size=\"", "whole number"),
            ("name=x", "", "no size"),
            ("", "\"\"", "key=value"),
            ("size=1G,", "\"\"", "key=value"),
            ("size=1G,ro", "\"ro\"", "key=value"),
            (
                "size=1G,color=red",
                "\"color=red\"",
                "unknown key \"color\"",
            ),
            ("size=1G,Size=2G", "\"Size=2G\"", "unknown key"),
            ("size=1G,size=2G", "\"size=2G\"", "size is given twice"),
            ("size=1G,name=a,name=b", "\"name=b\"", "given twice"),
            ("size=1G,fstype=xfs", "\"fstype=xfs\"", "ext4 or none"),
            ("size=1G,fstype=", "\"fstype=\"", "ext4 or none"),
            (
                "size=1G,directio=yes",
                "\"directio=yes\"",
                "on, off or auto",
            ),
            ("size=1G,name=Logs", "\"name=Logs\"", "lowercase letter"),
            ("size=1G,name=9x", "\"name=9x\"", "lowercase letter"),
            ("size=1G,name=a.b", "\"name=a.b\"", "contains '.'"),
            ("size=1G,name=", "\"name=\"", "empty"),
            (
                "size=1G,name=abcdefghijklmnopqrstu",
                "\"name=abcdefghijklmnopqrstu\"",
                "at most 20",
            ),
            ("size=1G,name=cocoon-x", "\"name=cocoon-x\"", "reserved"),
            ("size=1G,mount=mnt/x", "\"mount=mnt/x\"", "not absolute"),
            ("size=1G,mount=/", "\"mount=/\"", "the root"),
            ("size=1G,mount=/a/../b", "\"mount=/a/../b\"", ".. component"),
            ("size=1G,mount=/a\tb", "\"mount=/a\\tb\"", "contains"),
            (
                "size=1G,fstype=none,mount=/mnt/x",
                "\"mount=/mnt/x\"",
                "fstype=none",
            ),
            (
                "mount=/mnt/x,fstype=none,size=1G",
                "\"mount=/mnt/x\"",
                "fstype=none",
            ),
        ];
        for (flag, part, reason) in cases {
            let e = parse(flag).expect_err(flag).to_string();
            assert!(e.contains(&format!("{flag:?}")), "{flag}: {e}");
            assert!(e.contains(part), "{flag}: want part {part} in {e}");
            assert!(e.contains(reason), "{flag}: want {reason:?} in {e}");
        }
    }

    fn specs(flags: &[&str]) -> Vec<DataDiskSpec> {
        flags.iter().map(|f| parse(f).unwrap()).collect()
    }

    #[test]
    fn resolve_names_and_mounts() {
        let got = resolve(
            &specs(&[
                "size=1G",
                "size=1G,name=data2",
                "size=1G,fstype=none",
                "size=1G,mount=",
                "size=1G,name=logs,mount=/var/log,directio=on",
            ]),
            &["data3"],
        )
        .unwrap();
        let summary: Vec<(&str, Option<&str>, FsType)> = got
            .iter()
            .map(|d| (d.name.as_str(), d.mount_point.as_deref(), d.fstype))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("data1", Some("/mnt/data1"), FsType::Ext4),
                ("data2", Some("/mnt/data2"), FsType::Ext4),
                // data2 is named and data3 in use: skipped.
                ("data4", None, FsType::None),
                ("data5", None, FsType::Ext4),
                ("logs", Some("/var/log"), FsType::Ext4),
            ]
        );
        assert_eq!(got[4].direct_io, Some(true));
        assert_eq!(got[0].size_bytes, 1 << 30);
        assert_eq!(resolve(&[], &[]).unwrap(), vec![]);
    }

    #[test]
    fn resolve_refuses_duplicates_and_too_many() {
        let e = resolve(&specs(&["size=1G,name=a", "size=2G,name=a"]), &[]).unwrap_err();
        assert_eq!(
            e,
            SpecError::DuplicateName {
                spec: "size=2G,name=a".into(),
                name: "a".into()
            }
        );
        assert!(e.to_string().contains("\"size=2G,name=a\""), "{e}");
        let e = resolve(&specs(&["size=1G,name=data1"]), &["data1"]).unwrap_err();
        assert!(matches!(e, SpecError::DuplicateName { .. }), "{e}");
        let many: Vec<&str> = vec!["size=1G"; MAX_DATA_DISKS + 1];
        assert!(matches!(
            resolve(&specs(&many), &[]),
            Err(SpecError::TooMany { .. })
        ));
        assert_eq!(
            resolve(&specs(&many[1..]), &[]).unwrap().len(),
            MAX_DATA_DISKS
        );
    }

    /// The lifecycle's `--data-disk` is a clap arg of this type: repeated
    /// flags parse in order and a bad one fails with the quoted part.
    #[test]
    fn works_as_a_clap_arg() {
        use clap::Parser;
        #[derive(Parser)]
        struct Args {
            #[arg(long = "data-disk")]
            data_disks: Vec<DataDiskSpec>,
        }
        let a = Args::try_parse_from([
            "run",
            "--data-disk",
            "size=1G",
            "--data-disk",
            "size=2G,name=logs",
        ])
        .unwrap();
        assert_eq!(a.data_disks.len(), 2);
        assert_eq!(a.data_disks[1].name.as_deref(), Some("logs"));
        let e = Args::try_parse_from(["run", "--data-disk", "size=1G,fstype=xfs"])
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("\"fstype=xfs\"") && e.contains("ext4 or none"),
            "{e}"
        );
    }
}
