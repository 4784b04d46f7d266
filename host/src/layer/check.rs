//! The rules every entry of a layer must satisfy, and the checked tree the
//! builder is given. A layer reader's answers are untrusted: each page has
//! passed [`crate::plugin::calls::check_entries`] (its shape, extents
//! inside the tar); here the entries are checked as names in a tree:
//!
//! - names are relative (a leading `./` is allowed), with no NUL, no `..`,
//!   `.` or empty component, components of at most [`MAX_COMPONENT`] bytes,
//!   at most [`MAX_PATH`] bytes and [`MAX_DEPTH`] components;
//! - at most [`MAX_ENTRIES`] entries;
//! - every parent of an entry is a directory in this layer (or implied by
//!   it): a symlink, then a file through the symlink, is refused;
//! - a name appears once (a directory may be repeated: the last one's
//!   attributes win);
//! - hard links name a file earlier in the same layer;
//! - OCI whiteouts become overlayfs ones: `.wh.NAME` a 0/0 character
//!   device NAME, `.wh..wh..opq` the `trusted.overlay.opaque=y` xattr on
//!   its directory. A whited-out name the layer also has is refused. The
//!   layer's own `trusted.overlay.*` xattrs are dropped: only whiteouts
//!   say what overlayfs does.
//!
//! The builder writes the filesystem from the [`Tree`] alone.

use std::collections::BTreeMap;

use crate::plugin::calls::{EntryKind, LayerEntry, TarExtent};

/// Most entries of one layer (a large distribution image has about 10^5).
pub const MAX_ENTRIES: usize = 512 * 1024;
/// Most components of a name.
pub const MAX_DEPTH: usize = 128;
/// Longest name, in bytes (Linux's PATH_MAX less the NUL).
pub const MAX_PATH: usize = 4095;
/// Longest component, in bytes (NAME_MAX).
pub const MAX_COMPONENT: usize = 255;

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
/// The xattr overlayfs reads to make a directory opaque.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Owner, mode, time and xattrs of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attrs {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl Attrs {
    /// Directories a layer implies without an entry of their own.
    fn implied_dir() -> Self {
        Attrs {
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            xattrs: Vec::new(),
        }
    }

    fn of(e: &LayerEntry) -> Self {
        Attrs {
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            mtime: e.mtime,
            xattrs: e
                .xattrs
                .iter()
                .filter(|x| !x.name.starts_with("trusted.overlay."))
                .map(|x| (x.name.clone(), x.value.clone()))
                .collect(),
        }
    }
}

/// What a node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir {
        opaque: bool,
    },
    /// Contents: the extents of the (decompressed) tar, in order.
    File {
        size: u64,
        extents: Vec<TarExtent>,
    },
    Symlink(String),
    /// Another name of the file at this (checked) path.
    Hardlink(String),
    Device {
        char: bool,
        major: u32,
        minor: u32,
    },
    Fifo,
    /// An overlayfs whiteout (a 0/0 character device).
    Whiteout,
}

impl Kind {
    fn what(&self) -> &'static str {
        match self {
            Kind::Dir { .. } => "directory",
            Kind::File { .. } => "file",
            Kind::Symlink(_) => "symlink",
            Kind::Hardlink(_) => "hard link",
            Kind::Device { .. } => "device",
            Kind::Fifo => "fifo",
            Kind::Whiteout => "whiteout",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: Kind,
    pub attrs: Attrs,
}

/// A layer's checked entries, by path (relative, no leading `./`).
#[derive(Debug, Clone)]
pub struct Tree {
    pub root: Attrs,
    pub nodes: BTreeMap<String, Node>,
    entries: usize,
}

impl Default for Tree {
    fn default() -> Self {
        Tree {
            root: Attrs::implied_dir(),
            nodes: BTreeMap::new(),
            entries: 0,
        }
    }
}

/// `name` checked and normalized; `None` is the layer's root.
pub fn normalize(name: &str) -> Result<Option<String>, String> {
    if name.len() > MAX_PATH {
        return Err(format!("is {} bytes long (at most {MAX_PATH})", name.len()));
    }
    if name.contains('\0') {
        return Err("contains NUL".into());
    }
    if name.starts_with('/') {
        return Err("is absolute".into());
    }
    let mut rest = name;
    while let Some(r) = rest.strip_prefix("./") {
        rest = r;
    }
    if rest == "." {
        rest = "";
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() {
        return Ok(None);
    }
    let mut depth = 0;
    for c in rest.split('/') {
        depth += 1;
        match c {
            "" => return Err("has an empty component (//)".into()),
            "." => return Err("has a `.` component".into()),
            ".." => return Err("has a `..` component".into()),
            c if c.len() > MAX_COMPONENT => {
                return Err(format!(
                    "has a component of {} bytes (at most {MAX_COMPONENT})",
                    c.len()
                ))
            }
            _ => {}
        }
    }
    if depth > MAX_DEPTH {
        return Err(format!("is {depth} levels deep (at most {MAX_DEPTH})"));
    }
    Ok(Some(rest.to_string()))
}

fn split(path: &str) -> (Option<&str>, &str) {
    match path.rsplit_once('/') {
        Some((parent, base)) => (Some(parent), base),
        None => (None, path),
    }
}

fn join(parent: Option<&str>, base: &str) -> String {
    match parent {
        Some(p) => format!("{p}/{base}"),
        None => base.to_string(),
    }
}

impl Tree {
    /// Entries added so far.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Adds one entry, in tar order; the error says why it is refused (the
    /// caller names the entry and the layer).
    pub fn add(&mut self, e: &LayerEntry) -> Result<(), String> {
        self.entries += 1;
        if self.entries > MAX_ENTRIES {
            return Err(format!("the layer has more than {MAX_ENTRIES} entries"));
        }
        let Some(path) = normalize(&e.name)? else {
            if e.kind != EntryKind::Directory {
                return Err("the layer's root is not a directory".into());
            }
            self.root = Attrs::of(e);
            return Ok(());
        };
        let (parent, base) = split(&path);
        if base == OPAQUE {
            if let Some(p) = parent {
                self.dir(p)?;
                if let Some(Node {
                    kind: Kind::Dir { opaque },
                    ..
                }) = self.nodes.get_mut(p)
                {
                    *opaque = true;
                }
            }
            // An opaque root hides nothing: it is the bottom of its layer.
            return Ok(());
        }
        if base.starts_with(".wh..wh.") {
            return Err("is an AUFS special whiteout, which no OCI layer needs".into());
        }
        if let Some(hidden) = base.strip_prefix(WHITEOUT) {
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err("whites out no name".into());
            }
            if e.kind == EntryKind::Directory {
                return Err("a whiteout that is a directory".into());
            }
            if let Some(p) = parent {
                self.dir(p)?;
            }
            let target = join(parent, hidden);
            if let Some(n) = self.nodes.get(&target) {
                return Err(format!(
                    "whites out {target:?}, which this layer also has (a {})",
                    n.kind.what()
                ));
            }
            self.nodes.insert(
                target,
                Node {
                    kind: Kind::Whiteout,
                    attrs: Attrs {
                        mode: 0,
                        uid: 0,
                        gid: 0,
                        mtime: e.mtime,
                        xattrs: Vec::new(),
                    },
                },
            );
            return Ok(());
        }
        if let Some(p) = parent {
            self.dir(p)?;
        }
        let kind = match e.kind {
            EntryKind::Directory => Kind::Dir { opaque: false },
            EntryKind::File => Kind::File {
                size: e.size,
                extents: e.extents.clone(),
            },
            EntryKind::Symlink => {
                let t = e.link_target.clone().unwrap_or_default();
                if t.contains('\0') || t.len() > MAX_PATH {
                    return Err(format!("a symlink target of {} bytes or with NUL", t.len()));
                }
                Kind::Symlink(t)
            }
            EntryKind::Hardlink => {
                let t = e.link_target.as_deref().unwrap_or_default();
                let target = normalize(t)
                    .map_err(|why| format!("its link target {why}"))?
                    .ok_or("is a hard link to the layer's root")?;
                match self.nodes.get(&target).map(|n| &n.kind) {
                    Some(Kind::File { .. }) => Kind::Hardlink(target),
                    Some(Kind::Hardlink(to)) => Kind::Hardlink(to.clone()),
                    Some(other) => {
                        return Err(format!(
                            "is a hard link to {target:?}, a {} (only files are linked)",
                            other.what()
                        ))
                    }
                    None => {
                        return Err(format!(
                        "is a hard link to {target:?}, which is not an earlier entry of this layer"
                    ))
                    }
                }
            }
            EntryKind::CharDevice | EntryKind::BlockDevice => {
                let d = e
                    .device
                    .unwrap_or(crate::plugin::calls::Device { major: 0, minor: 0 });
                Kind::Device {
                    char: e.kind == EntryKind::CharDevice,
                    major: d.major,
                    minor: d.minor,
                }
            }
            EntryKind::Fifo => Kind::Fifo,
        };
        match self.nodes.get_mut(&path) {
            None => {
                self.nodes.insert(
                    path,
                    Node {
                        kind,
                        attrs: Attrs::of(e),
                    },
                );
                Ok(())
            }
            Some(n) => match (&n.kind, &kind) {
                (Kind::Dir { .. }, Kind::Dir { .. }) => {
                    n.attrs = Attrs::of(e);
                    Ok(())
                }
                (Kind::Whiteout, _) => Err("was whited out earlier in this layer".into()),
                (old, _) => Err(format!(
                    "appears twice in the layer (first as a {})",
                    old.what()
                )),
            },
        }
    }

    /// Makes `path` and its parents directories, implied when absent;
    /// refused when one of them is something else in this layer.
    fn dir(&mut self, path: &str) -> Result<(), String> {
        let mut end = 0;
        loop {
            let next = path[end..].find('/').map(|i| end + i);
            let prefix = &path[..next.unwrap_or(path.len())];
            match self.nodes.get(prefix) {
                Some(Node {
                    kind: Kind::Dir { .. },
                    ..
                }) => {}
                Some(n) => {
                    return Err(format!(
                        "its parent {prefix:?} is a {} in this layer",
                        n.kind.what()
                    ))
                }
                None => {
                    self.nodes.insert(
                        prefix.to_string(),
                        Node {
                            kind: Kind::Dir { opaque: false },
                            attrs: Attrs::implied_dir(),
                        },
                    );
                }
            }
            match next {
                Some(i) => end = i + 1,
                None => return Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: EntryKind, name: &str, target: Option<&str>) -> LayerEntry {
        LayerEntry {
            kind,
            name: name.into(),
            mode: 0o644,
            uid: 1,
            gid: 2,
            mtime: 3,
            link_target: target.map(Into::into),
            size: 0,
            extents: Vec::new(),
            device: None,
            xattrs: Vec::new(),
        }
    }

    fn file(name: &str) -> LayerEntry {
        entry(EntryKind::File, name, None)
    }

    #[test]
    fn names() {
        let ok = [
            ("etc/passwd", Some("etc/passwd")),
            ("./etc/passwd", Some("etc/passwd")),
            ("././a/", Some("a")),
            ("./", None),
            (".", None),
            ("a..b/.c", Some("a..b/.c")),
        ];
        for (name, want) in ok {
            assert_eq!(normalize(name).unwrap().as_deref(), want, "{name}");
        }
        let long_component = format!("a/{}", "x".repeat(256));
        let deep = vec!["d"; MAX_DEPTH + 1].join("/");
        let long = "x/".repeat(2100);
        let bad = [
            ("../etc/passwd", "`..`"),
            ("a/../../b", "`..`"),
            ("/etc/passwd", "absolute"),
            ("a\0b", "NUL"),
            ("a//b", "empty component"),
            ("a/./b", "`.` component"),
            (long_component.as_str(), "component of 256 bytes"),
            (deep.as_str(), "levels deep"),
            (long.as_str(), "bytes long"),
        ];
        for (name, want) in bad {
            let err = normalize(name).unwrap_err();
            assert!(err.contains(want), "{name:?}: {err}");
        }
    }

    #[test]
    fn trees_refuse_what_a_layer_must_not_do() {
        let symlink = entry(EntryKind::Symlink, "etc", Some("/host/etc"));
        let link_out = entry(EntryKind::Hardlink, "a", Some("../../etc/shadow"));
        let link_later = entry(EntryKind::Hardlink, "a", Some("b"));
        let dir = entry(EntryKind::Directory, "d", None);
        let cases: Vec<(Vec<LayerEntry>, &str)> = vec![
            (
                vec![symlink.clone(), file("etc/passwd")],
                "its parent \"etc\" is a symlink",
            ),
            (vec![link_out], "its link target has a `..`"),
            (vec![link_later.clone()], "not an earlier entry"),
            (
                vec![dir.clone(), entry(EntryKind::Hardlink, "x", Some("d"))],
                "a directory (only files",
            ),
            (vec![file("a"), file("a")], "appears twice"),
            (vec![file("d/x"), file("d")], "appears twice"),
            (vec![file("f"), file("f/x")], "its parent \"f\" is a file"),
            (vec![file("x"), file(".wh.x")], "which this layer also has"),
            (vec![file(".wh.x"), file("x")], "whited out earlier"),
            (vec![file(".wh..wh.plnk")], "AUFS"),
            (vec![file("./")], "root is not a directory"),
        ];
        for (entries, want) in cases {
            let mut t = Tree::default();
            let err = entries
                .iter()
                .map(|e| t.add(e))
                .find_map(Result::err)
                .unwrap_or_else(|| panic!("{want}: accepted"));
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn whiteouts_links_and_implied_dirs() {
        let mut t = Tree::default();
        let mut opaque_attr = entry(EntryKind::Directory, "keep", None);
        opaque_attr.xattrs = vec![
            crate::plugin::calls::Xattr {
                name: "trusted.overlay.opaque".into(),
                value: b"y".to_vec(),
            },
            crate::plugin::calls::Xattr {
                name: "user.note".into(),
                value: b"hi".to_vec(),
            },
        ];
        for e in [
            entry(EntryKind::Directory, "./", None),
            file("usr/bin/x"),
            entry(EntryKind::Hardlink, "usr/bin/y", Some("./usr/bin/x")),
            entry(EntryKind::Hardlink, "usr/bin/z", Some("usr/bin/y")),
            file("etc/.wh.gone"),
            file("opt/.wh..wh..opq"),
            opaque_attr,
            entry(EntryKind::Directory, "usr", None),
        ] {
            t.add(&e).unwrap();
        }
        assert_eq!(t.root.mode, 0o644);
        let kind = |p: &str| t.nodes.get(p).map(|n| n.kind.clone());
        assert_eq!(kind("usr/bin"), Some(Kind::Dir { opaque: false }));
        assert_eq!(t.nodes["usr/bin"].attrs, Attrs::implied_dir());
        // The repeated directory took the later entry's attributes.
        assert_eq!(t.nodes["usr"].attrs.uid, 1);
        assert_eq!(kind("usr/bin/z"), Some(Kind::Hardlink("usr/bin/x".into())));
        assert_eq!(kind("etc/gone"), Some(Kind::Whiteout));
        assert_eq!(kind("opt"), Some(Kind::Dir { opaque: true }));
        assert!(!t.nodes.contains_key("opt/.wh..wh..opq"));
        // The layer's own overlay xattr is dropped; others stay.
        assert_eq!(kind("keep"), Some(Kind::Dir { opaque: false }));
        assert_eq!(
            t.nodes["keep"].attrs.xattrs,
            [("user.note".to_string(), b"hi".to_vec())]
        );
        assert_eq!(t.entries(), 8);
    }
}
