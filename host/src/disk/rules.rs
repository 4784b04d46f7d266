//! The role invariants of a VM's disks, in one pure function. Every place
//! that accepts a disk list (create, start, snapshot, clone, restore, a
//! policy plugin's plan) calls [`validate`], so no path can skip a rule.
//!
//! It reports every broken rule, each with the disk's index and the field,
//! so a user (or a plugin author) fixes them all in one go.

use std::collections::HashSet;
use std::fmt;
use std::path::{Component, Path, PathBuf};

use super::model::{DiskRole, FsType, StorageConfig};

/// The smallest data disk: ext4 needs room for its journal, and smaller
/// disks are almost always a unit mistake (`size=16` meaning bytes).
pub const MIN_DATA_DISK_BYTES: u64 = 16 << 20;

/// Serials (and data-disk names) are at most this long: the guest's
/// `/dev/disk/by-id/virtio-<serial>` keeps 20 characters.
pub const MAX_SERIAL_LEN: usize = 20;

/// Data-disk names may not start with this: the host names its own disks
/// (layers, the cow, the seed) with it, so they never collide.
pub const RESERVED_PREFIX: &str = "cocoon-";

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The disk's index in the plan; `None` for rules about the whole plan.
    pub index: Option<usize>,
    /// The field concerned, as named in [`StorageConfig`] (`serial`,
    /// `mount_point`…), or `order`/`count` for plan-wide rules.
    pub field: &'static str,
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.index {
            Some(i) => write!(f, "disk {i} {}: {}", self.field, self.message),
            None => write!(f, "{}: {}", self.field, self.message),
        }
    }
}

/// Every rule a disk list breaks, in disk order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Violations(pub Vec<Violation>);

impl fmt::Display for Violations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(f, "{n} disk rule{} broken", if n == 1 { "" } else { "s" })?;
        for v in &self.0 {
            write!(f, "; {v}")?;
        }
        Ok(())
    }
}

impl Violations {
    /// Whether some violation concerns this disk and field.
    pub fn has(&self, index: Option<usize>, field: &str) -> bool {
        self.0.iter().any(|v| v.index == index && v.field == field)
    }
}

/// What the rules need to know beyond the list itself.
pub struct Context<'a> {
    /// Directories a disk path may be under: the VM's directory and the
    /// image store. Compared lexically; callers that read paths from
    /// untrusted files also resolve symlinks (see `confine`).
    pub roots: &'a [PathBuf],
    /// The size in bytes of disk `i`, when known (the plan's requested
    /// size at create, the file's length afterwards).
    pub size_of: &'a dyn Fn(usize, &StorageConfig) -> Option<u64>,
}

/// Checks every invariant of "Disks and roles" in DESIGN.md.
pub fn validate(disks: &[StorageConfig], ctx: &Context<'_>) -> Result<(), Violations> {
    let mut out = Vec::new();
    let mut v = |index: Option<usize>, field: &'static str, message: String| {
        out.push(Violation {
            index,
            field,
            message,
        })
    };

    let mut serials = HashSet::new();
    for (i, d) in disks.iter().enumerate() {
        let at = Some(i);
        let want_ro = d.role.read_only();
        if d.read_only != want_ro {
            v(
                at,
                "read_only",
                format!(
                    "a {} disk must be {}",
                    d.role,
                    if want_ro { "read-only" } else { "writable" }
                ),
            );
        }
        if let Err(e) = check_name(&d.serial) {
            v(at, "serial", e);
        } else if d.role == DiskRole::Data && d.serial.starts_with(RESERVED_PREFIX) {
            v(
                at,
                "serial",
                format!(
                    "{:?}: the prefix {RESERVED_PREFIX:?} is reserved for the host's own disks",
                    d.serial
                ),
            );
        }
        if !serials.insert(d.serial.as_str()) {
            v(
                at,
                "serial",
                format!("{:?} is used by an earlier disk", d.serial),
            );
        }
        if let Err(e) = check_path(&d.path, ctx.roots) {
            v(at, "path", e);
        }
        if d.role == DiskRole::Data {
            check_data_options(d, &mut v, at);
            match (ctx.size_of)(i, d) {
                Some(size) if size < MIN_DATA_DISK_BYTES => v(
                    at,
                    "size",
                    format!("{size} bytes; a data disk needs at least 16 MiB"),
                ),
                Some(_) => {}
                None => v(at, "size", "unknown; a data disk needs a size".into()),
            }
        } else {
            for (set, field) in [
                (d.mount_point.is_some(), "mount_point"),
                (d.fstype.is_some(), "fstype"),
                (d.direct_io.is_some(), "direct_io"),
            ] {
                if set {
                    v(
                        at,
                        field,
                        format!("only data disks take it, not a {} disk", d.role),
                    );
                }
            }
        }
    }

    check_order(disks, &mut v);
    if out.is_empty() {
        Ok(())
    } else {
        Err(Violations(out))
    }
}

fn check_data_options(
    d: &StorageConfig,
    v: &mut impl FnMut(Option<usize>, &'static str, String),
    at: Option<usize>,
) {
    match (d.fstype, &d.mount_point) {
        (None, _) => v(at, "fstype", "a data disk needs one (ext4 or none)".into()),
        (Some(FsType::None), Some(m)) => v(
            at,
            "mount_point",
            format!("{m:?}: a disk with fstype none is not mounted"),
        ),
        (Some(FsType::Ext4), Some(m)) => {
            if let Err(e) = check_mount_point(m) {
                v(at, "mount_point", e);
            }
        }
        (Some(_), None) => {}
    }
}

/// Layers, then at most one cow, then data disks, then at most one cidata,
/// last.
fn check_order(disks: &[StorageConfig], v: &mut impl FnMut(Option<usize>, &'static str, String)) {
    let mut highest = DiskRole::Layer;
    for (i, d) in disks.iter().enumerate() {
        if d.role < highest {
            v(
                Some(i),
                "role",
                format!(
                    "a {} disk after a {highest} disk; the order is layers, cow, data, cidata",
                    d.role
                ),
            );
        } else {
            highest = d.role;
        }
    }
    for role in [DiskRole::Cow, DiskRole::Cidata] {
        let n = disks.iter().filter(|d| d.role == role).count();
        if n > 1 {
            v(
                None,
                "role",
                format!("{n} {role} disks; a VM has at most one"),
            );
        }
    }
}

/// `^[a-z][a-z0-9_-]{0,19}$`: the rule for data-disk names and serials.
pub fn check_name(name: &str) -> Result<(), String> {
    let mut bytes = name.bytes();
    match bytes.next() {
        None => return Err("empty; expected a lowercase letter then [a-z0-9_-]".into()),
        Some(b) if !b.is_ascii_lowercase() => {
            return Err(format!("{name:?} must start with a lowercase letter"))
        }
        Some(_) => {}
    }
    if name.len() > MAX_SERIAL_LEN {
        return Err(format!(
            "{name:?} is {} characters; at most {MAX_SERIAL_LEN}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == '-'))
    {
        return Err(format!(
            "{name:?} contains {c:?}; only a-z, 0-9, _ and - are allowed"
        ));
    }
    Ok(())
}

/// A guest mount point: absolute, not `/`, no `.`/`..` components, no
/// control characters or whitespace (fstab separates fields by whitespace
/// and cannot hold a newline).
pub fn check_mount_point(m: &str) -> Result<(), String> {
    if !m.starts_with('/') {
        return Err(format!("{m:?} is not absolute"));
    }
    if let Some(c) = m.chars().find(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!("{m:?} contains {c:?}"));
    }
    if m.split('/').any(|c| c == ".." || c == ".") {
        return Err(format!("{m:?} contains a . or .. component"));
    }
    if m.trim_end_matches('/').is_empty() {
        return Err("\"/\" is the root; mount a data disk below it".into());
    }
    Ok(())
}

/// A disk path: absolute, without `.` or `..` components, under one of
/// `roots`.
pub fn check_path(path: &Path, roots: &[PathBuf]) -> Result<(), String> {
    if !path.is_absolute() {
        return Err(format!("{} is not absolute", path.display()));
    }
    if path
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(format!("{} contains a . or .. component", path.display()));
    }
    if !roots.iter().any(|r| path.starts_with(r) && path != r) {
        return Err(format!(
            "{} is outside the VM's directory and the image store",
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const VM: &str = "/state/vms/v1";
    const STORE: &str = "/state/images";

    fn disk(role: DiskRole, serial: &str) -> StorageConfig {
        let path = match role {
            DiskRole::Layer => format!("{STORE}/sha256/{serial}"),
            _ => format!("{VM}/{serial}.raw"),
        };
        StorageConfig {
            path: path.into(),
            read_only: role.read_only(),
            serial: serial.into(),
            role,
            mount_point: None,
            fstype: (role == DiskRole::Data).then_some(FsType::Ext4),
            direct_io: None,
        }
    }

    fn good_plan() -> Vec<StorageConfig> {
        vec![
            disk(DiskRole::Layer, "cocoon-layer0"),
            disk(DiskRole::Layer, "cocoon-layer1"),
            disk(DiskRole::Cow, "cocoon-root"),
            StorageConfig {
                mount_point: Some("/mnt/logs".into()),
                direct_io: Some(true),
                ..disk(DiskRole::Data, "logs")
            },
            StorageConfig {
                fstype: Some(FsType::None),
                ..disk(DiskRole::Data, "scratch")
            },
            disk(DiskRole::Cidata, "cocoon-cidata"),
        ]
    }

    fn check(disks: &[StorageConfig]) -> Result<(), Violations> {
        let roots = [PathBuf::from(VM), PathBuf::from(STORE)];
        let size_of = |_: usize, d: &StorageConfig| {
            if d.serial == "tiny" {
                Some(MIN_DATA_DISK_BYTES - 1)
            } else if d.serial == "nosize" {
                None
            } else {
                Some(MIN_DATA_DISK_BYTES)
            }
        };
        validate(
            disks,
            &Context {
                roots: &roots,
                size_of: &size_of,
            },
        )
    }

    #[test]
    fn a_good_plan_passes() {
        check(&good_plan()).unwrap();
        // A disk-image VM: no layers.
        check(&good_plan()[2..]).unwrap();
        check(&[]).unwrap();
    }

    /// Each case breaks one rule of a good plan; the violation names the
    /// disk and field.
    #[test]
    fn each_broken_rule_is_named() {
        type Edit = fn(&mut Vec<StorageConfig>);
        let cases: &[(&str, Edit, Option<usize>, &str, &str)] = &[
            (
                "read-only cow",
                |p| p[2].read_only = true,
                Some(2),
                "read_only",
                "must be writable",
            ),
            (
                "writable layer",
                |p| p[0].read_only = false,
                Some(0),
                "read_only",
                "must be read-only",
            ),
            (
                "writable cidata",
                |p| p[5].read_only = false,
                Some(5),
                "read_only",
                "read-only",
            ),
            (
                "read-only data",
                |p| p[3].read_only = true,
                Some(3),
                "read_only",
                "writable",
            ),
            (
                "mount on a layer",
                |p| p[0].mount_point = Some("/x".into()),
                Some(0),
                "mount_point",
                "only data disks",
            ),
            (
                "fstype on the cow",
                |p| p[2].fstype = Some(FsType::Ext4),
                Some(2),
                "fstype",
                "only data disks",
            ),
            (
                "direct_io on cidata",
                |p| p[5].direct_io = Some(false),
                Some(5),
                "direct_io",
                "only data disks",
            ),
            (
                "data without fstype",
                |p| p[3].fstype = None,
                Some(3),
                "fstype",
                "needs one",
            ),
            (
                "fstype none mounted",
                |p| p[4].mount_point = Some("/m".into()),
                Some(4),
                "mount_point",
                "fstype none",
            ),
            (
                "relative mount",
                |p| p[3].mount_point = Some("mnt/x".into()),
                Some(3),
                "mount_point",
                "not absolute",
            ),
            (
                "mount with NUL",
                |p| p[3].mount_point = Some("/mnt/\0x".into()),
                Some(3),
                "mount_point",
                "contains",
            ),
            (
                "mount with newline",
                |p| p[3].mount_point = Some("/mnt/a\nb".into()),
                Some(3),
                "mount_point",
                "contains",
            ),
            (
                "mount with ..",
                |p| p[3].mount_point = Some("/mnt/../etc".into()),
                Some(3),
                "mount_point",
                ".. component",
            ),
            (
                "mount at /",
                |p| p[3].mount_point = Some("/".into()),
                Some(3),
                "mount_point",
                "the root",
            ),
            (
                "uppercase serial",
                |p| p[3].serial = "Logs".into(),
                Some(3),
                "serial",
                "lowercase letter",
            ),
            (
                "digit first",
                |p| p[3].serial = "1logs".into(),
                Some(3),
                "serial",
                "lowercase letter",
            ),
            (
                "21 characters",
                |p| p[3].serial = "a".repeat(21),
                Some(3),
                "serial",
                "at most 20",
            ),
            (
                "dot in serial",
                |p| p[3].serial = "lo.gs".into(),
                Some(3),
                "serial",
                "contains '.'",
            ),
            (
                "empty serial",
                |p| p[3].serial = String::new(),
                Some(3),
                "serial",
                "empty",
            ),
            (
                "reserved prefix",
                |p| p[3].serial = "cocoon-logs".into(),
                Some(3),
                "serial",
                "reserved",
            ),
            (
                "duplicate serial",
                |p| p[4].serial = "logs".into(),
                Some(4),
                "serial",
                "earlier disk",
            ),
            (
                "tiny data disk",
                |p| p[3].serial = "tiny".into(),
                Some(3),
                "size",
                "at least 16 MiB",
            ),
            (
                "data disk of no size",
                |p| p[3].serial = "nosize".into(),
                Some(3),
                "size",
                "needs a size",
            ),
            (
                "path outside",
                |p| p[3].path = "/etc/passwd".into(),
                Some(3),
                "path",
                "outside",
            ),
            (
                "relative path",
                |p| p[3].path = "data.raw".into(),
                Some(3),
                "path",
                "not absolute",
            ),
            (
                "path with ..",
                |p| p[3].path = format!("{VM}/../v2/x.raw").into(),
                Some(3),
                "path",
                ".. component",
            ),
            (
                "the root itself",
                |p| p[3].path = VM.into(),
                Some(3),
                "path",
                "outside",
            ),
            (
                "sibling prefix",
                |p| p[3].path = format!("{VM}x/d.raw").into(),
                Some(3),
                "path",
                "outside",
            ),
            (
                "cidata not last",
                |p| p.swap(4, 5),
                Some(5),
                "role",
                "after a cidata disk",
            ),
            (
                "layer after cow",
                |p| p.swap(1, 2),
                Some(2),
                "role",
                "layer disk after a cow",
            ),
            (
                "two cows",
                |p| p[1] = disk(DiskRole::Cow, "cocoon-root2"),
                None,
                "role",
                "2 cow disks",
            ),
            (
                "two seeds",
                |p| p.push(disk(DiskRole::Cidata, "cocoon-seed2")),
                None,
                "role",
                "2 cidata disks",
            ),
        ];
        for (name, edit, index, field, want) in cases {
            let mut plan = good_plan();
            edit(&mut plan);
            let e = check(&plan).expect_err(name);
            assert!(e.has(*index, field), "{name}: {e}");
            let text = e.to_string();
            assert!(text.contains(want), "{name}: {text}");
        }
    }

    #[test]
    fn every_violation_is_reported_not_just_the_first() {
        let mut plan = good_plan();
        plan[0].read_only = false;
        plan[3].serial = "BAD".into();
        plan[4].mount_point = Some("/m".into());
        plan.swap(2, 5);
        let e = check(&plan).unwrap_err();
        assert!(e.has(Some(0), "read_only"), "{e}");
        assert!(e.has(Some(3), "serial"), "{e}");
        assert!(e.has(Some(4), "mount_point"), "{e}");
        assert!(e.has(Some(3), "role"), "{e}");
        assert!(e
            .to_string()
            .starts_with(&format!("{} disk rules broken", e.0.len())));
    }

    #[test]
    fn names() {
        for ok in ["a", "data1", "my_disk-2", "abcdefghijklmnopqrst"] {
            check_name(ok).unwrap();
        }
        for bad in [
            "",
            "A",
            "_a",
            "-a",
            "a b",
            "a/b",
            "é",
            "abcdefghijklmnopqrstu",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
