//! A container image's own kernel (an OS image built as OCI layers):
//! the newest `/boot/vmlinuz-RELEASE` that the overlay root shows, with
//! its `/lib/modules/RELEASE`, read from the built squashfs layers with
//! `unsquashfs` (squashfs-tools, which builds them). The topmost layer
//! that names a path decides it: a file there is the one the guest sees,
//! a whiteout (a 0/0 character device) hides every lower one. Opaque
//! directories are not looked at (their xattr is not in `unsquashfs`'s
//! listing): a kernel under a `/boot` made opaque above it is still found.
//!
//! The kernel is copied to `OUT/vmlinuz` and its modules to
//! `OUT/modules/RELEASE`, where [`super::kernel::find_modules`] looks
//! beside a kernel: it boots the cocoon initramfs, since a distribution's
//! initrd cannot build the layered root.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::kernel::{release_key, KernelError};

/// What the topmost layer that names a path says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    File(usize),
    Dir(usize),
    /// A whiteout, a symlink or anything else: not a kernel or modules
    /// directory to use.
    Other,
}

/// Runs `unsquashfs BEFORE… LAYER AFTER…`, its stdout to `stdout` if
/// given.
fn unsquashfs(
    before: &[&std::ffi::OsStr],
    layer: &Path,
    after: &[&str],
    stdout: Option<std::fs::File>,
) -> Result<std::process::Output, KernelError> {
    let mut cmd = Command::new(crate::disk::create::find_tool("unsquashfs"));
    cmd.args(before).arg(layer).args(after).env("LC_ALL", "C");
    if let Some(f) = stdout {
        cmd.stdout(f);
    }
    cmd.output().map_err(|source| KernelError::Unsquashfs {
        path: layer.to_path_buf(),
        source,
    })
}

fn failed(layer: &Path, file: String, out: &std::process::Output) -> KernelError {
    KernelError::Extract {
        path: layer.to_path_buf(),
        file,
        stderr: String::from_utf8_lossy(&out.stderr)
            .trim()
            .chars()
            .take(400)
            .collect(),
    }
}

/// The paths under `/boot` and `/lib/modules` of each layer (base first),
/// decided by the topmost layer naming each.
fn visible(layers: &[PathBuf]) -> Result<BTreeMap<String, Seen>, KernelError> {
    let mut seen = BTreeMap::new();
    for (k, layer) in layers.iter().enumerate().rev() {
        // `-lln -d ""`: `MODE OWNER SIZE DATE TIME /PATH`, the path after
        // the first " /".
        let out = unsquashfs(
            &["-lln".as_ref(), "-d".as_ref(), "".as_ref()],
            layer,
            &["boot", "lib/modules"],
            None,
        )?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(at) = line.find(" /") else { continue };
            let path = line[at + 1..].to_string();
            let what = match line.as_bytes().first() {
                Some(b'-') => Seen::File(k),
                Some(b'd') => Seen::Dir(k),
                _ => Seen::Other,
            };
            seen.entry(path).or_insert(what);
        }
    }
    Ok(seen)
}

/// The image's kernel, copied into `out_dir` (see the module docs), or
/// `None` when no release has both a visible kernel and its modules.
pub fn from_layers(layers: &[PathBuf], out_dir: &Path) -> Result<Option<PathBuf>, KernelError> {
    let seen = visible(layers)?;
    let mut found: Vec<(String, usize, usize)> = seen
        .iter()
        .filter_map(|(path, what)| {
            let release = path.strip_prefix("/boot/vmlinuz-")?;
            let Seen::File(k) = what else { return None };
            let Some(Seen::Dir(m)) = seen.get(&format!("/lib/modules/{release}")) else {
                return None;
            };
            Some((release.to_string(), *k, *m))
        })
        .filter(|(r, _, _)| super::kernel::good_name(r))
        .collect();
    found.sort_by_key(|(r, _, _)| release_key(r));
    let Some((release, k, m)) = found.pop() else {
        return Ok(None);
    };
    let kernel = out_dir.join("vmlinuz");
    let file = std::fs::File::create(&kernel).map_err(|source| KernelError::Io {
        what: "creating",
        path: kernel.clone(),
        source,
    })?;
    let name = format!("boot/vmlinuz-{release}");
    let out = unsquashfs(&["-cat".as_ref()], &layers[k], &[&name], Some(file))?;
    if !out.status.success() {
        return Err(failed(&layers[k], format!("/{name}"), &out));
    }
    let scratch = out_dir.join("modules.unpack");
    let _ = std::fs::remove_dir_all(&scratch);
    let name = format!("lib/modules/{release}");
    let out = unsquashfs(
        &[
            "-q".as_ref(),
            "-n".as_ref(),
            "-d".as_ref(),
            scratch.as_os_str(),
        ],
        &layers[m],
        &[&name],
        None,
    )?;
    let unpacked = scratch.join(&name);
    if !out.status.success() || !unpacked.is_dir() {
        return Err(failed(&layers[m], format!("/{name}"), &out));
    }
    let modules = out_dir.join("modules");
    std::fs::create_dir_all(&modules).map_err(|source| KernelError::Io {
        what: "creating",
        path: modules.clone(),
        source,
    })?;
    std::fs::rename(&unpacked, modules.join(&release)).map_err(|source| KernelError::Io {
        what: "moving the image's modules to",
        path: modules.clone(),
        source,
    })?;
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(Some(kernel))
}

/// Squashfs layers for tests, made by mksquashfs.
#[cfg(test)]
pub(crate) mod fixture {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// One squashfs per `(tree, pseudo)`, in `dir` (`pseudo` a mksquashfs
    /// pseudo definition, e.g. a whiteout `NAME c 0 0 0 0 0`); `None` (the
    /// test skips) without mksquashfs.
    pub fn layers(dir: &Path, trees: &[(&Path, Option<&str>)]) -> Option<Vec<PathBuf>> {
        let mut layers = Vec::new();
        for (tree, pseudo) in trees {
            let out = dir.join(format!("{}.sqfs", layers.len()));
            let mut cmd = Command::new(crate::disk::create::find_tool("mksquashfs"));
            cmd.arg(tree)
                .arg(&out)
                .args(["-quiet", "-noappend", "-all-root", "-no-progress"]);
            if let Some(p) = pseudo {
                cmd.args(["-p", p]);
            }
            let Ok(s) = cmd.status() else {
                eprintln!("SKIPPED: no mksquashfs");
                return None;
            };
            assert!(s.success());
            layers.push(out);
        }
        Some(layers)
    }
}

#[cfg(test)]
mod tests {
    use super::super::gpt::fixture::bzimage;
    use super::*;

    /// Layers made by mksquashfs: the base has two kernels with their
    /// modules, the top one deletes the newer by a whiteout and adds a
    /// newest one without modules; the visible kernel with modules wins.
    #[test]
    fn the_newest_visible_kernel_with_its_modules_is_copied_out() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base");
        for rel in ["6.1.0-9-amd64", "6.1.0-10-amd64"] {
            std::fs::create_dir_all(base.join("boot")).unwrap();
            std::fs::write(base.join(format!("boot/vmlinuz-{rel}")), bzimage(rel)).unwrap();
            let m = base.join(format!("lib/modules/{rel}/kernel"));
            std::fs::create_dir_all(&m).unwrap();
            std::fs::write(m.join("../modules.order"), rel).unwrap();
        }
        let top = d.path().join("top");
        std::fs::create_dir_all(top.join("boot")).unwrap();
        std::fs::write(
            top.join("boot/vmlinuz-6.2.0-1-amd64"),
            bzimage("6.2.0-1-amd64"),
        )
        .unwrap();
        let Some(layers) = fixture::layers(
            d.path(),
            &[
                (&base, None),
                (&top, Some("boot/vmlinuz-6.1.0-10-amd64 c 0 0 0 0 0")),
            ],
        ) else {
            return;
        };
        let out = d.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let k = from_layers(&layers, &out).unwrap().expect("a kernel");
        assert_eq!(k, out.join("vmlinuz"));
        assert_eq!(std::fs::read(&k).unwrap(), bzimage("6.1.0-9-amd64"));
        assert_eq!(
            std::fs::read_to_string(out.join("modules/6.1.0-9-amd64/modules.order")).unwrap(),
            "6.1.0-9-amd64"
        );
        assert!(!out.join("modules.unpack").exists(), "no scratch left");
        // The base alone: the newer kernel is visible.
        let out = d.path().join("out2");
        std::fs::create_dir(&out).unwrap();
        from_layers(&layers[..1], &out).unwrap().unwrap();
        assert_eq!(
            std::fs::read(out.join("vmlinuz")).unwrap(),
            bzimage("6.1.0-10-amd64")
        );
        // The top alone: a kernel without modules is no kernel.
        assert_eq!(from_layers(&layers[1..], &out).unwrap(), None);
    }
}
