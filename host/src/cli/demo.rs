//! The built-in demo of `cocoon-host run` with no image: the test guest
//! (embedded) as the kernel, a small qcow2 disk image (embedded) pulled
//! into the store, converted by the qcow2 plugin, planned by the policy
//! with a data disk, booted; then the guest's report checked against the
//! host's own reading of the same disks.

use std::path::{Path, PathBuf};

use anyhow::Context;
use cocoon_host::disk::model::DiskRole;
use cocoon_host::disk::spec::DataDiskSpec;
use cocoon_host::store::Digest;
use cocoon_host::vm::VmEntry;
use sha2::{Digest as _, Sha256};

pub static DEMO_IMAGE: &[u8] = include_bytes!("../../assets/demo.qcow2");

/// Sectors of the root the guest hashes.
const HASHED_SECTORS: u64 = 8;
/// The sector the guest writes on the data disk, and its byte.
const WRITE_SECTOR: u64 = 4;
const WRITE_BYTE: u8 = 0x5a;

pub struct Demo {
    pub kernel_path: PathBuf,
    pub image_path: PathBuf,
    pub image_digest: Digest,
    pub image_bytes: usize,
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Writes `bytes` to `dir/name` unless a file with those bytes is there.
fn materialize_file(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    if let Ok(old) = cocoon_host::fsutil::input::read_bounded(&path, bytes.len() as u64 + 1) {
        if old == bytes {
            return Ok(path);
        }
    }
    cocoon_host::fsutil::write_atomic(&path, bytes, 0o600)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

impl Demo {
    /// The embedded files under `STATE/demo/`, named by their digests.
    pub fn materialize(state_dir: &Path) -> anyhow::Result<Demo> {
        let dir = state_dir.join("demo");
        cocoon_host::fsutil::create_private_dir(&dir, 0o700)
            .with_context(|| format!("creating {}", dir.display()))?;
        let kernel = cocoon_host::demo_kernel::TEST_GUEST;
        let kernel_path = materialize_file(
            &dir,
            &format!(
                "test-guest-{}.elf",
                &cocoon_host::demo_kernel::digest()[..12]
            ),
            kernel,
        )?;
        let hex = sha256_hex(DEMO_IMAGE);
        let image_path = materialize_file(&dir, &format!("demo-{}.qcow2", &hex[..12]), DEMO_IMAGE)?;
        Ok(Demo {
            kernel_path,
            image_path,
            image_digest: format!("sha256:{hex}").parse()?,
            image_bytes: DEMO_IMAGE.len(),
        })
    }

    /// The guest's work: hash the root's first sectors, write a sector of
    /// the data disk and read it back.
    pub fn cmdline(&self) -> String {
        format!(
            "console=ttyS0 cocoon.hash=0:0:{HASHED_SECTORS} cocoon.write=1:{WRITE_SECTOR}:{WRITE_BYTE:02x} cocoon.hash=1:{WRITE_SECTOR}:1"
        )
    }

    pub fn data_disk(&self) -> DataDiskSpec {
        "size=16M,name=scratch,fstype=none"
            .parse()
            .expect("the demo's data-disk spec parses")
    }
}

fn read_sectors(path: &Path, sector: u64, count: u64) -> anyhow::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; usize::try_from(count * 512)?];
    f.read_exact_at(&mut buf, sector * 512)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(buf)
}

/// Checks the guest's report against the disks, and says so.
pub fn summarize(vm: &VmEntry, transcript: &[u8], say: &dyn Fn(&str)) -> anyhow::Result<()> {
    let text = String::from_utf8_lossy(transcript);
    let disk = |role: DiskRole| {
        vm.record
            .storage
            .iter()
            .find(|d| d.role == role)
            .map(|d| d.path.clone())
            .with_context(|| format!("the demo VM has no {role} disk"))
    };
    let root = disk(DiskRole::Cow)?;
    let data = disk(DiskRole::Data)?;
    let want_root = sha256_hex(&read_sectors(&root, 0, HASHED_SECTORS)?);
    let line = format!("hash index=0 sector=0 count={HASHED_SECTORS} sha256={want_root}");
    anyhow::ensure!(
        text.contains(&line),
        "the guest's hash of the root differs from the host's ({want_root})"
    );
    say(&format!(
        "check: the guest read the root the host converted (sha256 of {HASHED_SECTORS} sectors {})",
        &want_root[..16]
    ));
    let written = read_sectors(&data, WRITE_SECTOR, 1)?;
    anyhow::ensure!(
        text.contains(&format!(
            "write index=1 sector={WRITE_SECTOR} byte={WRITE_BYTE:02x} outcome=ok"
        )) && written.iter().all(|b| *b == WRITE_BYTE),
        "the guest's write to the data disk is not in {}",
        data.display()
    );
    say(&format!(
        "check: the guest's write landed in sector {WRITE_SECTOR} of {}",
        data.display()
    ));
    Ok(())
}
