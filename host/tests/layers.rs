//! OCI images as read-only layers: a two-layer image built here from
//! busybox-static, pushed to Debian's docker-registry on loopback, pulled
//! and prepared; the built squashfs images are read back with
//! `unsquashfs`. Then the cache (a hit, a tampered layer rebuilt) and
//! hostile layer tars, each refused naming its entry and leaving nothing
//! in the cache.

mod store_common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use cocoon_host::config::HostConfig;
use cocoon_host::layer::{self, LayerError, PreparedImage};
use cocoon_host::plugin::{Registry as Plugins, Runtime};
use cocoon_host::store::index::{ArtifactRecord, RefRecord};
use cocoon_host::store::{PluginSources, PullPolicy, PullRequest, Quiet, Store};
use store_common::registry::Registry;
use store_common::require_tool;

struct Env {
    dir: tempfile::TempDir,
    store: Store,
    runtime: Runtime,
    plugins: Plugins,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let config = HostConfig::at(dir.path());
    Env {
        store: Store::open(&config).unwrap(),
        runtime: Runtime::new(Some(dir.path().join("plugin-cache"))).unwrap(),
        plugins: Plugins::discover(&config),
        dir,
    }
}

impl Env {
    fn prepare(&self, image: &RefRecord) -> Result<PreparedImage, LayerError> {
        layer::prepare(&self.store, image, &self.runtime, &self.plugins)
    }

    fn converted(&self) -> PathBuf {
        self.dir.path().join("images/converted")
    }

    /// Pulls a local file into the store and returns it as an artifact of
    /// `media_type`.
    fn blob(&self, name: &str, bytes: &[u8], media_type: &str) -> ArtifactRecord {
        let path = self.dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        self.blob_file(&path, media_type)
    }

    fn blob_file(&self, path: &Path, media_type: &str) -> ArtifactRecord {
        let sources = PluginSources {
            runtime: &self.runtime,
            registry: &self.plugins,
        };
        let req = PullRequest {
            reference: path.display().to_string(),
            digest: None,
            policy: PullPolicy::Missing,
            force: false,
        };
        let r = self.store.pull(&sources, &req, &Quiet).unwrap();
        let mut a = r.record.artifacts[0].clone();
        a.media_type = media_type.into();
        a
    }

    /// An image record of one layer tar (plain) with an empty config.
    fn image_of(&self, tar: &[u8]) -> RefRecord {
        let config = self.blob("config.json", b"{}", CONFIG);
        let layer = self.blob("layer.tar", tar, LAYER);
        RefRecord {
            reference: "oci://127.0.0.1/hostile:latest".into(),
            source: "test".into(),
            pulled_at: 0,
            artifacts: vec![config, layer],
        }
    }
}

const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

fn tools() -> bool {
    ["busybox", "mksquashfs", "unsquashfs"]
        .iter()
        .all(|t| require_tool(t))
}

fn header(kind: tar::EntryType, mode: u32, uid: u64, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(uid);
    h.set_mtime(1_700_000_000);
    h.set_size(size);
    h
}

fn add_file(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, uid: u64, data: &[u8]) {
    let mut h = header(tar::EntryType::Regular, mode, uid, data.len() as u64);
    b.append_data(&mut h, path, data).unwrap();
}

fn add_dir(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32) {
    let mut h = header(tar::EntryType::Directory, mode, 0, 0);
    b.append_data(&mut h, path, std::io::empty()).unwrap();
}

fn add_link(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, path: &str, target: &str) {
    let mut h = header(kind, 0o777, 0, 0);
    b.append_link(&mut h, path, target).unwrap();
}

const LONG: &str = "a-file-whose-name-is-longer-than-the-hundred-bytes-an-old-ustar-header-holds-so-the-writer-needs-gnu-or-pax.txt";

/// The base layer: busybox with a few applet links, /etc, a file that the
/// top layer deletes, a directory the top layer makes opaque.
fn base_layer() -> Vec<u8> {
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let mut b = tar::Builder::new(Vec::new());
    add_dir(&mut b, "./", 0o755);
    add_dir(&mut b, "./bin", 0o755);
    add_file(&mut b, "./bin/busybox", 0o755, 0, &busybox);
    for applet in ["sh", "ls", "cat"] {
        add_link(
            &mut b,
            tar::EntryType::Symlink,
            &format!("./bin/{applet}"),
            "busybox",
        );
    }
    add_link(
        &mut b,
        tar::EntryType::Link,
        "./bin/busybox.hard",
        "./bin/busybox",
    );
    add_dir(&mut b, "./etc", 0o755);
    add_file(
        &mut b,
        "./etc/passwd",
        0o644,
        0,
        b"root:x:0:0:root:/root:/bin/sh\n",
    );
    add_file(
        &mut b,
        "./etc/motd",
        0o644,
        0,
        b"deleted by the top layer\n",
    );
    add_file(&mut b, "./etc/secret", 0o600, 1000, b"s3cret\n");
    add_dir(&mut b, "./opt/app", 0o750);
    add_file(
        &mut b,
        "./opt/app/old.txt",
        0o644,
        0,
        b"hidden by the opaque dir\n",
    );
    add_file(
        &mut b,
        &format!("./usr/share/doc/{LONG}"),
        0o444,
        0,
        b"long\n",
    );
    b.into_inner().unwrap()
}

/// The top layer: deletes /etc/motd, replaces /opt/app, adds a file.
fn top_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    add_dir(&mut b, "etc", 0o755);
    add_file(&mut b, "etc/.wh.motd", 0o644, 0, b"");
    add_file(&mut b, "etc/hostname", 0o644, 0, b"cocoon\n");
    add_dir(&mut b, "opt/app", 0o755);
    add_file(&mut b, "opt/app/.wh..wh..opq", 0o644, 0, b"");
    add_file(&mut b, "opt/app/new.txt", 0o640, 0, b"the new app\n");
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// `unsquashfs -lln` as (mode string, owner, path without the root).
fn listing(image: &Path) -> Vec<(String, String, String)> {
    let out = Command::new("unsquashfs")
        .arg("-lln")
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let path_at = f.iter().position(|p| p.starts_with("squashfs-root"))?;
            let path = f[path_at]
                .strip_prefix("squashfs-root")
                .unwrap()
                .to_string();
            Some((f[0].to_string(), f[1].to_string(), path))
        })
        .collect()
}

fn entry<'a>(l: &'a [(String, String, String)], path: &str) -> &'a (String, String, String) {
    l.iter()
        .find(|e| e.2 == path)
        .unwrap_or_else(|| panic!("{path} not in {l:#?}"))
}

fn extract(image: &Path, into: &Path) {
    let st = Command::new("unsquashfs")
        .args(["-q", "-n", "-d"])
        .arg(into)
        .arg(image)
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn an_image_from_a_registry_becomes_checked_squashfs_layers() {
    if !tools() {
        return;
    }
    let Some(reg) = Registry::start() else { return };
    let e = env();
    let repo = "test/busybox";
    let base = base_layer();
    let top = gzip(&top_layer());
    let l1 = reg.push_blob(repo, "application/vnd.oci.image.layer.v1.tar", &base);
    let l2 = reg.push_blob(repo, "application/vnd.oci.image.layer.v1.tar+gzip", &top);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo hello from $GREETING"],
            "Env": ["PATH=/bin", "GREETING=cocoon"],
            "WorkingDir": "/opt/app",
            "User": "0:0",
        },
        "rootfs": {"type": "layers", "diff_ids": [l1.digest, store_common::sha256(&top_layer())]},
    });
    let config = reg.push_blob(repo, CONFIG, &serde_json::to_vec(&config).unwrap());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config.json(),
        "layers": [l1.json(), l2.json()],
    });
    reg.push_manifest(
        repo,
        "v1",
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&manifest).unwrap(),
    );
    let sources = PluginSources {
        runtime: &e.runtime,
        registry: &e.plugins,
    };
    let pulled = e
        .store
        .pull(
            &sources,
            &PullRequest {
                reference: format!("oci://127.0.0.1:{}/{repo}:v1", reg.port),
                digest: None,
                policy: PullPolicy::Missing,
                force: false,
            },
            &Quiet,
        )
        .unwrap();

    let p = e.prepare(&pulled.record).unwrap();
    assert_eq!(p.layers.len(), 2);
    assert!(p.built.iter().all(|b| b.image.converted_now));
    assert_eq!(p.built[0].source.to_string(), l1.digest);
    assert_eq!(p.built[1].source.to_string(), l2.digest);
    assert_eq!(
        p.config.argv(),
        ["/bin/sh", "-c", "echo hello from $GREETING"]
    );
    assert_eq!(p.config.env, ["PATH=/bin", "GREETING=cocoon"]);
    assert_eq!(
        (p.config.working_dir.as_str(), p.config.user.as_str()),
        ("/opt/app", "0:0")
    );
    for l in &p.layers {
        assert!(l.path.starts_with(e.dir.path().join("images/converted")));
        assert_eq!(
            l.digest.to_string(),
            store_common::sha256(&std::fs::read(&l.path).unwrap())
        );
    }

    // The root's time is the tree's, not the build's clock: the base's
    // own `./` entry (1_700_000_000), the top's implied root (0).
    for (l, when) in p
        .layers
        .iter()
        .zip([" 2023-11-14 22:13 ", " 1970-01-01 00:00 "])
    {
        let out = Command::new("unsquashfs")
            .arg("-lln")
            .arg(&l.path)
            .env("TZ", "UTC")
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let root = text
            .lines()
            .find(|l| l.ends_with(" squashfs-root"))
            .unwrap();
        assert!(root.contains(when), "{root}");
    }

    // The base, as unsquashfs lists it.
    let base = listing(&p.layers[0].path);
    assert_eq!(entry(&base, "").0, "drwxr-xr-x");
    assert_eq!(entry(&base, "/bin/busybox").0, "-rwxr-xr-x");
    assert!(entry(&base, "/bin/sh").0.starts_with('l'));
    assert_eq!(entry(&base, "/etc/secret").0, "-rw-------");
    assert_eq!(entry(&base, "/etc/secret").1, "1000/1000");
    assert_eq!(entry(&base, "/opt/app").0, "drwxr-x---");
    assert_eq!(entry(&base, "/usr/share/doc").0, "drwxr-xr-x", "implied");
    entry(&base, &format!("/usr/share/doc/{LONG}"));
    entry(&base, "/etc/motd");
    // The top: a whiteout (0/0 character device) for the deleted file.
    let top = listing(&p.layers[1].path);
    let motd = entry(&top, "/etc/motd");
    assert_eq!((motd.0.as_str(), motd.1.as_str()), ("c---------", "0/0"));
    entry(&top, "/etc/hostname");
    assert!(!top.iter().any(|t| t.2.contains(".wh.")), "{top:#?}");

    // Contents, hard links and the opaque xattr, extracted.
    let out = tempfile::tempdir().unwrap();
    extract(&p.layers[0].path, &out.path().join("base"));
    extract(&p.layers[1].path, &out.path().join("top"));
    let busybox = std::fs::read("/bin/busybox").unwrap();
    assert_eq!(
        std::fs::read(out.path().join("base/bin/busybox")).unwrap(),
        busybox
    );
    use std::os::unix::fs::MetadataExt;
    let ino = |p: &str| std::fs::metadata(out.path().join(p)).unwrap().ino();
    assert_eq!(ino("base/bin/busybox"), ino("base/bin/busybox.hard"));
    let mut value = [0u8; 8];
    let n = rustix::fs::getxattr(
        out.path().join("top/opt/app"),
        "trusted.overlay.opaque",
        &mut value,
    )
    .expect("the opaque directory carries trusted.overlay.opaque");
    assert_eq!(&value[..n], b"y");
    assert!(rustix::fs::getxattr(
        out.path().join("top/etc"),
        "trusted.overlay.opaque",
        &mut value
    )
    .is_err());
    assert_eq!(
        std::fs::read(out.path().join("top/opt/app/new.txt")).unwrap(),
        b"the new app\n"
    );

    // A second prepare is served by the cache.
    let again = e.prepare(&pulled.record).unwrap();
    assert!(again.built.iter().all(|b| !b.image.converted_now));
    assert_eq!(again.layers, p.layers);

    // A tampered cached layer (same size) is rebuilt, to the same bytes.
    let victim = &p.layers[1].path;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut bytes = std::fs::read(victim).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(victim, &bytes).unwrap();
    let rebuilt = e.prepare(&pulled.record).unwrap();
    assert!(!rebuilt.built[0].image.converted_now);
    assert!(
        rebuilt.built[1].image.converted_now,
        "the tampered layer was rebuilt"
    );
    assert_eq!(rebuilt.layers, p.layers, "a rebuild makes the same bytes");
}

/// A raw tar header with `name` written as is (the tar crate's builder
/// refuses `..` and absolute names, which is the point here).
fn raw_entry(out: &mut Vec<u8>, name: &[u8], kind: tar::EntryType, link: &[u8], data: &[u8]) {
    let mut h = header(kind, 0o644, 0, data.len() as u64);
    let gnu = h.as_gnu_mut().unwrap();
    gnu.name[..name.len()].copy_from_slice(name);
    gnu.linkname[..link.len()].copy_from_slice(link);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

fn end(mut tar: Vec<u8>) -> Vec<u8> {
    tar.extend_from_slice(&[0; 1024]);
    tar
}

/// The layer is refused with a message naming `entry` and `why`, and the
/// cache holds nothing for it (not even a temp).
fn assert_refused(e: &Env, tar: &[u8], entry: &str, why: &str) {
    let image = e.image_of(tar);
    let err = e.prepare(&image).unwrap_err();
    let msg = cocoon_host::error_chain(&err);
    eprintln!("refused: {msg}");
    assert!(
        msg.contains(entry) && msg.contains(why),
        "{entry}, {why}: {msg}"
    );
    let layer = &image.artifacts[1].digest;
    assert!(msg.contains(&layer.to_string()), "names the layer: {msg}");
    let leftovers: Vec<_> = walk(&e.converted());
    assert!(leftovers.is_empty(), "{entry}: left {leftovers:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        out.push(e.path());
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        }
    }
    out
}

#[test]
fn hostile_layers_are_refused_naming_the_entry_and_leave_nothing() {
    if !tools() {
        return;
    }
    let e = env();
    let t = tar::EntryType::Regular;

    let mut tar = Vec::new();
    raw_entry(&mut tar, b"../escape", t, b"", b"x");
    assert_refused(&e, &end(tar), "\"../escape\"", "has a `..` component");

    let mut tar = Vec::new();
    raw_entry(&mut tar, b"/etc/passwd", t, b"", b"root::0:0::/:/bin/sh\n");
    assert_refused(&e, &end(tar), "\"/etc/passwd\"", "is absolute");

    let mut tar = Vec::new();
    raw_entry(&mut tar, b"etc", tar::EntryType::Symlink, b"/etc", b"");
    raw_entry(&mut tar, b"etc/passwd", t, b"", b"x");
    assert_refused(
        &e,
        &end(tar),
        "\"etc/passwd\"",
        "its parent \"etc\" is a symlink",
    );

    let mut tar = Vec::new();
    raw_entry(
        &mut tar,
        b"shadow",
        tar::EntryType::Link,
        b"/etc/shadow",
        b"",
    );
    assert_refused(&e, &end(tar), "\"shadow\"", "its link target is absolute");
    let mut tar = Vec::new();
    raw_entry(
        &mut tar,
        b"shadow",
        tar::EntryType::Link,
        b"../../etc/shadow",
        b"",
    );
    assert_refused(&e, &end(tar), "\"shadow\"", "its link target has a `..`");
    let mut tar = Vec::new();
    raw_entry(&mut tar, b"early", tar::EntryType::Link, b"late", b"");
    raw_entry(&mut tar, b"late", t, b"", b"x");
    assert_refused(
        &e,
        &end(tar),
        "\"early\"",
        "not an earlier entry of this layer",
    );

    // A name of 64 KiB (a GNU long-name record).
    let long = format!("{}x", "d/".repeat(32 * 1024 - 1));
    assert_eq!(long.len(), 64 * 1024 - 1);
    let mut b = tar::Builder::new(Vec::new());
    add_file(&mut b, &long, 0o644, 0, b"x");
    assert_refused(
        &e,
        &b.into_inner().unwrap(),
        "(65535 bytes)",
        "bytes long (at most 4095)",
    );

    // Truncated: inside a file's contents, and inside a header.
    let mut b = tar::Builder::new(Vec::new());
    add_file(&mut b, "small", 0o644, 0, b"x");
    add_file(&mut b, "big", 0o644, 0, &vec![7u8; 100_000]);
    let whole = b.into_inner().unwrap();
    assert_refused(&e, &whole[..50_000], "\"big\"", "past the end of the tar");
    assert_refused(
        &e,
        &whole[..1024 + 300],
        "after entry \"small\"",
        "tar header",
    );

    // The runtime and the cache go on: a good layer (zstd) builds.
    let mut b = tar::Builder::new(Vec::new());
    add_file(&mut b, "fine", 0o644, 0, b"fine\n");
    let zstd = zstd::encode_all(&b.into_inner().unwrap()[..], 3).unwrap();
    let p = e.prepare(&e.image_of(&zstd)).unwrap();
    entry(&listing(&p.layers[0].path), "/fine");
}

#[test]
fn a_layer_of_a_million_entries_is_refused() {
    if !tools() {
        return;
    }
    let e = env();
    let path = e.dir.path().join("million.tar");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    for i in 0..1_000_000u32 {
        let mut h = header(tar::EntryType::Regular, 0o644, 0, 0);
        h.set_path(format!("f{i}")).unwrap();
        h.set_cksum();
        out.write_all(h.as_bytes()).unwrap();
    }
    out.write_all(&[0; 1024]).unwrap();
    out.into_inner().unwrap().sync_all().unwrap();
    let image = RefRecord {
        reference: "oci://127.0.0.1/million:latest".into(),
        source: "test".into(),
        pulled_at: 0,
        artifacts: vec![
            e.blob("config.json", b"{}", CONFIG),
            e.blob_file(&path, LAYER),
        ],
    };
    let err = e.prepare(&image).unwrap_err();
    let msg = cocoon_host::error_chain(&err);
    let first_refused = format!("\"f{}\"", layer::check::MAX_ENTRIES);
    assert!(
        msg.contains(&first_refused) && msg.contains("more than 524288 entries"),
        "{msg}"
    );
    assert!(walk(&e.converted()).is_empty());
}
