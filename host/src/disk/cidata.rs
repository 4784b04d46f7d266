//! The cloud-init NoCloud seed: a 1 MiB FAT12 image labelled `CIDATA`
//! holding `meta-data`, `user-data` and `network-config`, written with
//! the `fatfs` crate.
//!
//! Every file is JSON (which YAML parsers read as YAML) made by a
//! serializer, never by pasting strings: names, mount points, hostnames
//! and keys arrive exactly as given. The one thing JSON cannot carry into
//! a YAML reader is a character YAML forbids in a stream (C0/C1 controls
//! and U+FFFE/U+FFFF); those are refused, naming the field.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Cursor, Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::model::FsType;
use crate::fsutil;

/// The seed image's size: plenty for three small files, and FAT12.
pub const SEED_IMAGE_BYTES: usize = 1 << 20;
/// The largest `--ssh-key` file read.
pub const MAX_SSH_KEY_FILE: u64 = 64 << 10;
/// The largest rendered file (the image has 1 MiB in all).
const MAX_SEED_FILE: usize = 256 << 10;

#[derive(Debug, thiserror::Error)]
pub enum CidataError {
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cloud-init seed: {field} {value:?}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("--ssh-key {path}: {reason}")]
    SshKey { path: PathBuf, reason: String },
    #[error("cloud-init seed: {file} is {len} bytes; at most {MAX_SEED_FILE}")]
    TooLarge { file: &'static str, len: usize },
    #[error("writing the FAT image")]
    Fat(#[source] io::Error),
}

/// What the seed says about the VM, apart from its disks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedInput {
    /// cloud-init runs its once-per-instance modules again when it changes.
    pub instance_id: String,
    pub hostname: String,
    /// `ssh_authorized_keys` of the default user ([`read_ssh_keys`]).
    pub ssh_authorized_keys: Vec<String>,
    pub network: NetworkConfig,
}

/// A data disk the guest mounts: a `mounts:` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedMount {
    pub serial: String,
    pub mount_point: String,
    pub fstype: FsType,
}

/// `network-config`, version 2 (netplan's format). Empty means cloud-init
/// configures no interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NetworkConfig {
    /// Interfaces by the name cloud-init gives them (`set-name`).
    pub ethernets: BTreeMap<String, Ethernet>,
}

/// One NIC, matched by MAC address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Ethernet {
    #[serde(rename = "match")]
    pub matches: MacMatch,
    #[serde(rename = "set-name", skip_serializing_if = "Option::is_none")]
    pub set_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dhcp4: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dhcp6: Option<bool>,
    /// `10.0.0.2/24`, `fd00::2/64`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nameservers: Option<Nameservers>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MacMatch {
    /// `52:54:00:12:34:56`.
    pub macaddress: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    /// `default` or a CIDR.
    pub to: String,
    pub via: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Nameservers {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
}

/// The three files of the seed, rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedFiles {
    pub meta_data: String,
    pub user_data: String,
    pub network_config: String,
}

#[derive(Serialize)]
struct MetaData<'a> {
    #[serde(rename = "instance-id")]
    instance_id: &'a str,
    #[serde(rename = "local-hostname")]
    local_hostname: &'a str,
}

#[derive(Serialize)]
struct UserData<'a> {
    hostname: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    mounts: Vec<[String; 6]>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    ssh_authorized_keys: &'a [String],
}

#[derive(Serialize)]
struct Network<'a> {
    version: u8,
    ethernets: &'a BTreeMap<String, Ethernet>,
}

/// Characters a YAML stream may not contain even inside a quoted scalar
/// (YAML 1.1 and 1.2 printable sets): a JSON writer would pass them raw.
fn check_text(field: &'static str, value: &str) -> Result<(), CidataError> {
    let bad = value
        .chars()
        .find(|&c| (c.is_control() && c != '\t') || c == '\u{fffe}' || c == '\u{ffff}');
    match bad {
        Some(c) => Err(CidataError::Invalid {
            field,
            value: value.to_string(),
            reason: format!("contains {c:?}, which a YAML file cannot hold"),
        }),
        None => Ok(()),
    }
}

fn check_non_empty(field: &'static str, value: &str) -> Result<(), CidataError> {
    check_text(field, value)?;
    if value.is_empty() {
        return Err(CidataError::Invalid {
            field,
            value: String::new(),
            reason: "is empty".into(),
        });
    }
    Ok(())
}

fn json(value: &impl Serialize, file: &'static str) -> Result<String, CidataError> {
    let mut s = serde_json::to_string_pretty(value).expect("seed records serialise");
    s.push('\n');
    if s.len() > MAX_SEED_FILE {
        return Err(CidataError::TooLarge { file, len: s.len() });
    }
    Ok(s)
}

/// Renders the seed's files. `mounts` are the VM's mounted data disks.
pub fn render(input: &SeedInput, mounts: &[SeedMount]) -> Result<SeedFiles, CidataError> {
    check_non_empty("instance-id", &input.instance_id)?;
    check_non_empty("hostname", &input.hostname)?;
    for k in &input.ssh_authorized_keys {
        check_non_empty("ssh_authorized_keys", k)?;
    }
    for m in mounts {
        check_non_empty("mount serial", &m.serial)?;
        check_non_empty("mount point", &m.mount_point)?;
    }
    for (name, e) in &input.network.ethernets {
        check_non_empty("ethernet name", name)?;
        let strings = [&e.matches.macaddress]
            .into_iter()
            .chain(&e.set_name)
            .chain(&e.addresses)
            .chain(e.routes.iter().flat_map(|r| [&r.to, &r.via]))
            .chain(
                e.nameservers
                    .iter()
                    .flat_map(|n| n.addresses.iter().chain(&n.search)),
            );
        for s in strings {
            check_text("network-config", s)?;
        }
    }
    let meta_data = json(
        &MetaData {
            instance_id: &input.instance_id,
            local_hostname: &input.hostname,
        },
        "meta-data",
    )?;
    let user = UserData {
        hostname: &input.hostname,
        mounts: mounts
            .iter()
            .map(|m| {
                [
                    format!("/dev/disk/by-id/virtio-{}", m.serial),
                    m.mount_point.clone(),
                    m.fstype.to_string(),
                    "defaults,nofail".into(),
                    "0".into(),
                    "2".into(),
                ]
            })
            .collect(),
        ssh_authorized_keys: &input.ssh_authorized_keys,
    };
    // The header line is what makes cloud-init read the rest as
    // cloud-config; to a YAML reader it is a comment.
    let user_data = format!("#cloud-config\n{}", json(&user, "user-data")?);
    let network_config = json(
        &Network {
            version: 2,
            ethernets: &input.network.ethernets,
        },
        "network-config",
    )?;
    Ok(SeedFiles {
        meta_data,
        user_data,
        network_config,
    })
}

/// The FAT12 image with the three files, in memory.
pub fn image(files: &SeedFiles) -> Result<Vec<u8>, CidataError> {
    let mut buf = vec![0u8; SEED_IMAGE_BYTES];
    {
        let mut disk = Cursor::new(&mut buf[..]);
        let options = fatfs::FormatVolumeOptions::new()
            .fat_type(fatfs::FatType::Fat12)
            .volume_label(*b"CIDATA     ")
            // Fixed, so one input always makes the same image.
            .volume_id(0x6369_6461);
        fatfs::format_volume(&mut disk, options).map_err(CidataError::Fat)?;
        let fs =
            fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).map_err(CidataError::Fat)?;
        {
            let root = fs.root_dir();
            for (name, text) in [
                ("meta-data", &files.meta_data),
                ("user-data", &files.user_data),
                ("network-config", &files.network_config),
            ] {
                let mut f = root.create_file(name).map_err(CidataError::Fat)?;
                f.truncate().map_err(CidataError::Fat)?;
                f.write_all(text.as_bytes()).map_err(CidataError::Fat)?;
                f.flush().map_err(CidataError::Fat)?;
            }
        }
        fs.unmount().map_err(CidataError::Fat)?;
    }
    Ok(buf)
}

/// Writes the seed image at `path` (temp name, fsync, rename), mode 0600
/// (it may hold keys and is only for the VMM to read).
pub fn write_image(path: &Path, files: &SeedFiles) -> Result<(), CidataError> {
    let bytes = image(files)?;
    fsutil::write_atomic(path, &bytes, 0o600).map_err(|source| CidataError::Io {
        what: "writing the cloud-init seed",
        path: path.to_path_buf(),
        source,
    })
}

/// Reads an `authorized_keys`-style file (`--ssh-key FILE`): one public
/// key a line, blank lines and `#` comments skipped, at most
/// [`MAX_SSH_KEY_FILE`] bytes. A private key is refused, not copied into
/// the seed.
pub fn read_ssh_keys(path: &Path) -> Result<Vec<String>, CidataError> {
    let bad = |reason: String| CidataError::SshKey {
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(|source| CidataError::Io {
        what: "opening",
        path: path.to_path_buf(),
        source,
    })?;
    let mut bytes = Vec::new();
    file.take(MAX_SSH_KEY_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| CidataError::Io {
            what: "reading",
            path: path.to_path_buf(),
            source,
        })?;
    if bytes.len() as u64 > MAX_SSH_KEY_FILE {
        return Err(bad(format!(
            "larger than {MAX_SSH_KEY_FILE} bytes; expected public keys"
        )));
    }
    let text = String::from_utf8(bytes).map_err(|_| bad("is not UTF-8 text".into()))?;
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.contains("PRIVATE KEY") {
            return Err(bad(format!(
                "line {}: a private key; give the public key (.pub)",
                n + 1
            )));
        }
        let kind = line.split_whitespace().next().unwrap_or("");
        let known = ["ssh-", "ecdsa-", "sk-ssh-", "sk-ecdsa-"]
            .iter()
            .any(|p| kind.starts_with(p));
        if !known || line.split_whitespace().count() < 2 {
            return Err(bad(format!(
                "line {}: {:?} is not a public key (expected e.g. \"ssh-ed25519 AAAA… comment\")",
                n + 1,
                truncate(line, 40)
            )));
        }
        check_text("ssh_authorized_keys", line)
            .map_err(|_| bad(format!("line {}: contains a control character", n + 1)))?;
        keys.push(line.to_string());
    }
    if keys.is_empty() {
        return Err(bad("holds no public key".into()));
    }
    Ok(keys)
}

fn truncate(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// The files inside a seed image, by name (for tests and `inspect`).
pub fn read_image(bytes: &[u8]) -> Result<BTreeMap<String, Vec<u8>>, CidataError> {
    let fs = fatfs::FileSystem::new(Cursor::new(bytes.to_vec()), fatfs::FsOptions::new())
        .map_err(CidataError::Fat)?;
    let mut out = BTreeMap::new();
    for entry in fs.root_dir().iter() {
        let entry = entry.map_err(CidataError::Fat)?;
        if entry.is_file() {
            let mut data = Vec::new();
            entry
                .to_file()
                .read_to_end(&mut data)
                .map_err(CidataError::Fat)?;
            out.insert(entry.file_name(), data);
        }
    }
    Ok(out)
}

/// The seed image `bytes` (one this module wrote) with a new identity: its
/// `instance-id` and hostname replaced, everything else (keys, mounts,
/// network) kept. A clone gets its snapshot's seed this way, so
/// cloud-init on the clone runs its once-per-instance modules again.
pub fn with_identity(
    bytes: &[u8],
    instance_id: &str,
    hostname: &str,
) -> Result<Vec<u8>, CidataError> {
    with_identity_and_macs(bytes, instance_id, hostname, &[])
}

/// [`with_identity`], and in `network-config` every `match: macaddress`
/// that is the first of a pair of `macs` (`aa:bb:…`, as cocoon writes
/// them) becomes the second: a clone's NICs get new MACs, and its next
/// cold boot must match them.
pub fn with_identity_and_macs(
    bytes: &[u8],
    instance_id: &str,
    hostname: &str,
    macs: &[(String, String)],
) -> Result<Vec<u8>, CidataError> {
    check_non_empty("instance-id", instance_id)?;
    check_non_empty("hostname", hostname)?;
    let mut files = read_image(bytes)?;
    let mut take = |name: &'static str| -> Result<String, CidataError> {
        let data = files.remove(name).ok_or_else(|| CidataError::Invalid {
            field: name,
            value: String::new(),
            reason: "is missing from the seed image".into(),
        })?;
        String::from_utf8(data).map_err(|_| CidataError::Invalid {
            field: name,
            value: String::new(),
            reason: "is not UTF-8".into(),
        })
    };
    let (meta, user, network_config) = (
        take("meta-data")?,
        take("user-data")?,
        take("network-config")?,
    );
    let not_ours = |field: &'static str, value: &str| CidataError::Invalid {
        field,
        value: truncate(value, 40),
        reason: "is not a JSON object as cocoon writes it".into(),
    };
    let mut meta_v: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&meta).map_err(|_| not_ours("meta-data", &meta))?;
    meta_v.insert("instance-id".into(), instance_id.into());
    meta_v.insert("local-hostname".into(), hostname.into());
    let body = user
        .strip_prefix("#cloud-config\n")
        .ok_or_else(|| not_ours("user-data", &user))?;
    let mut user_v: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(body).map_err(|_| not_ours("user-data", &user))?;
    user_v.insert("hostname".into(), hostname.into());
    let network_config = if macs.is_empty() {
        network_config
    } else {
        let mut net_v: serde_json::Value = serde_json::from_str(&network_config)
            .map_err(|_| not_ours("network-config", &network_config))?;
        if let Some(ethernets) = net_v
            .get_mut("ethernets")
            .and_then(serde_json::Value::as_object_mut)
        {
            for e in ethernets.values_mut() {
                let Some(mac) = e.pointer_mut("/match/macaddress") else {
                    continue;
                };
                let old = mac.as_str().map(str::to_ascii_lowercase);
                if let Some((_, new)) = macs
                    .iter()
                    .find(|(o, _)| Some(o.to_ascii_lowercase()) == old)
                {
                    *mac = new.clone().into();
                }
            }
        }
        json(&net_v, "network-config")?
    };
    let files = SeedFiles {
        meta_data: json(&meta_v, "meta-data")?,
        user_data: format!("#cloud-config\n{}", json(&user_v, "user-data")?),
        network_config,
    };
    image(&files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn input() -> SeedInput {
        SeedInput {
            instance_id: "i-0123".into(),
            hostname: "web1".into(),
            ssh_authorized_keys: vec!["ssh-ed25519 AAAAC3Nza me@host".into()],
            network: NetworkConfig::default(),
        }
    }

    fn mounts() -> Vec<SeedMount> {
        vec![SeedMount {
            serial: "logs".into(),
            mount_point: "/var/log".into(),
            fstype: FsType::Ext4,
        }]
    }

    #[test]
    fn a_clone_seed_matches_its_new_macs() {
        let eth = |mac: &str| Ethernet {
            matches: MacMatch {
                macaddress: mac.into(),
            },
            dhcp4: Some(true),
            ..Default::default()
        };
        let with_macs = |a: &str, b: &str| SeedInput {
            network: NetworkConfig {
                ethernets: [("nic0".to_string(), eth(a)), ("nic1".to_string(), eth(b))].into(),
            },
            ..input()
        };
        let old =
            image(&render(&with_macs("02:00:00:00:00:0a", "02:00:00:00:00:0b"), &[]).unwrap())
                .unwrap();
        let new = with_identity_and_macs(
            &old,
            "i-clone",
            "web2",
            &[
                ("02:00:00:00:00:0A".into(), "02:00:00:00:00:1a".into()),
                ("02:00:00:00:00:99".into(), "02:00:00:00:00:98".into()),
            ],
        )
        .unwrap();
        assert_eq!(new.len(), old.len());
        let files = read_image(&new).unwrap();
        let want = render(&with_macs("02:00:00:00:00:1a", "02:00:00:00:00:0b"), &[]).unwrap();
        let got: serde_json::Value = serde_json::from_slice(&files["network-config"]).unwrap();
        let want: serde_json::Value = serde_json::from_str(&want.network_config).unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn a_new_identity_keeps_everything_else() {
        let f = render(&input(), &mounts()).unwrap();
        let old = image(&f).unwrap();
        let new = with_identity(&old, "i-clone", "web2").unwrap();
        assert_eq!(new.len(), old.len(), "the disk keeps its size");
        let files = read_image(&new).unwrap();
        let meta: serde_json::Value = serde_json::from_slice(&files["meta-data"]).unwrap();
        assert_eq!(
            meta,
            serde_json::json!({"instance-id": "i-clone", "local-hostname": "web2"})
        );
        let user = String::from_utf8(files["user-data"].clone()).unwrap();
        let want = render(
            &SeedInput {
                instance_id: "i-clone".into(),
                hostname: "web2".into(),
                ..input()
            },
            &mounts(),
        )
        .unwrap();
        assert_eq!(user, want.user_data, "keys and mounts kept");
        assert_eq!(files["network-config"], f.network_config.as_bytes());
        assert!(matches!(
            with_identity(&new, "bad\u{1}", "web2"),
            Err(CidataError::Invalid {
                field: "instance-id",
                ..
            })
        ));
        assert!(with_identity(&[0u8; 4096], "i", "h").is_err());
    }

    #[test]
    fn renders_json_that_says_what_was_asked() {
        let f = render(&input(), &mounts()).unwrap();
        let meta: serde_json::Value = serde_json::from_str(&f.meta_data).unwrap();
        assert_eq!(
            meta,
            serde_json::json!({"instance-id": "i-0123", "local-hostname": "web1"})
        );
        let (header, body) = f.user_data.split_once('\n').unwrap();
        assert_eq!(header, "#cloud-config");
        let user: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            user,
            serde_json::json!({
                "hostname": "web1",
                "mounts": [["/dev/disk/by-id/virtio-logs", "/var/log", "ext4", "defaults,nofail", "0", "2"]],
                "ssh_authorized_keys": ["ssh-ed25519 AAAAC3Nza me@host"],
            })
        );
        let net: serde_json::Value = serde_json::from_str(&f.network_config).unwrap();
        assert_eq!(net, serde_json::json!({"version": 2, "ethernets": {}}));
    }

    #[test]
    fn without_mounts_or_keys_the_keys_are_left_out() {
        let mut i = input();
        i.ssh_authorized_keys.clear();
        let f = render(&i, &[]).unwrap();
        let user: serde_json::Value =
            serde_json::from_str(f.user_data.split_once('\n').unwrap().1).unwrap();
        assert_eq!(user, serde_json::json!({"hostname": "web1"}));
    }

    #[test]
    fn network_config_takes_typed_nics() {
        let mut i = input();
        i.network.ethernets.insert(
            "eth0".into(),
            Ethernet {
                matches: MacMatch {
                    macaddress: "52:54:00:12:34:56".into(),
                },
                set_name: Some("eth0".into()),
                addresses: vec!["10.0.0.2/24".into()],
                routes: vec![Route {
                    to: "default".into(),
                    via: "10.0.0.1".into(),
                }],
                nameservers: Some(Nameservers {
                    addresses: vec!["10.0.0.1".into()],
                    search: vec![],
                }),
                ..Ethernet::default()
            },
        );
        let f = render(&i, &[]).unwrap();
        let net: serde_json::Value = serde_json::from_str(&f.network_config).unwrap();
        assert_eq!(
            net,
            serde_json::json!({"version": 2, "ethernets": {"eth0": {
                "match": {"macaddress": "52:54:00:12:34:56"},
                "set-name": "eth0",
                "addresses": ["10.0.0.2/24"],
                "routes": [{"to": "default", "via": "10.0.0.1"}],
                "nameservers": {"addresses": ["10.0.0.1"]},
            }}})
        );
    }

    #[test]
    fn text_yaml_cannot_hold_is_refused_naming_the_field() {
        type Edit = fn(&mut SeedInput);
        let cases: &[(Edit, &str)] = &[
            (|i| i.hostname = "a\nb".into(), "hostname"),
            (|i| i.hostname = String::new(), "hostname"),
            (|i| i.instance_id = "x\u{0}".into(), "instance-id"),
            (|i| i.instance_id = "x\u{85}".into(), "instance-id"),
            (|i| i.hostname = "x\u{fffe}".into(), "hostname"),
            (
                |i| i.ssh_authorized_keys = vec!["ssh-rsa A\u{1b}[31m".into()],
                "ssh_authorized_keys",
            ),
        ];
        for (edit, field) in cases {
            let mut i = input();
            edit(&mut i);
            let e = render(&i, &[]).unwrap_err();
            assert!(
                matches!(&e, CidataError::Invalid { field: f, .. } if f == field),
                "{field}: {e}"
            );
        }
    }

    #[test]
    fn the_image_is_fat12_labelled_cidata_with_the_three_files() {
        let f = render(&input(), &mounts()).unwrap();
        let img = image(&f).unwrap();
        assert_eq!(img.len(), SEED_IMAGE_BYTES);
        let fs = fatfs::FileSystem::new(Cursor::new(img.clone()), fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.fat_type(), fatfs::FatType::Fat12);
        assert_eq!(fs.volume_label(), "CIDATA");
        drop(fs);
        let files = read_image(&img).unwrap();
        assert_eq!(files.len(), 3, "{:?}", files.keys());
        assert_eq!(files["meta-data"], f.meta_data.as_bytes());
        assert_eq!(files["user-data"], f.user_data.as_bytes());
        assert_eq!(files["network-config"], f.network_config.as_bytes());
        assert_eq!(
            image(&f).unwrap(),
            img,
            "the same input makes the same image"
        );
    }

    #[test]
    fn ssh_key_files() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &[u8]| {
            let p = dir.path().join(name);
            fs::write(&p, text).unwrap();
            p
        };
        let p = write(
            "ok",
            b"# mine\n\nssh-ed25519 AAAAC3 me@a\r\necdsa-sha2-nistp256 AAAAE2 \"quoted\" #x\n",
        );
        assert_eq!(
            read_ssh_keys(&p).unwrap(),
            vec![
                "ssh-ed25519 AAAAC3 me@a".to_string(),
                "ecdsa-sha2-nistp256 AAAAE2 \"quoted\" #x".to_string()
            ]
        );
        let cases: &[(&str, &[u8], &str)] = &[
            (
                "private",
                b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n",
                "private key",
            ),
            (
                "garbage",
                b"hello world\n",
                "line 1: \"hello world\" is not a public key",
            ),
            ("bare", b"ssh-rsa\n", "not a public key"),
            ("empty", b"# nothing\n\n", "no public key"),
            ("binary", b"ssh-rsa \xff\xfe\n", "not UTF-8"),
            ("control", b"ssh-rsa AAAA\x07 x\n", "control character"),
        ];
        for (name, text, want) in cases {
            let e = read_ssh_keys(&write(name, text)).unwrap_err().to_string();
            assert!(e.contains(want), "{name}: {e}");
            assert!(e.contains(name), "{name}: the error names the file: {e}");
        }
        let big = write(
            "big",
            &vec![b'#'; crate::cast::usize_from(MAX_SSH_KEY_FILE) + 1],
        );
        assert!(read_ssh_keys(&big)
            .unwrap_err()
            .to_string()
            .contains("larger than"));
        let e = read_ssh_keys(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(e, CidataError::Io { .. }), "{e}");
    }
}
