//! The Linux side of `run` and `create`: a container image's layers built
//! (or found in the cache) as the VM's read-only disks, and what the VM
//! boots (kernel, initramfs, command line), as steps for people and for
//! `-o json`.

use cocoon_host::disk::plan::ImageDisks;
use cocoon_host::guest::{ExecConfig, KernelSource, RootPartition};
use cocoon_host::plugin::registry::Registry;
use cocoon_host::plugin::runtime::Runtime;
use cocoon_host::store::{PullReport, Store};
use cocoon_host::vm::guest_boot::{Booted, GuestImage};
use cocoon_host::vm::record::ImageInfo;

use super::output::human;
use super::vm::{ImageStep, Prepared, Say};

/// One layer as `run` reports it.
#[derive(Debug, serde::Serialize)]
pub struct LayerStep {
    /// The layer blob, as pulled.
    pub source: String,
    /// The built squashfs (its digest file's digest).
    pub digest: String,
    pub size: u64,
    /// `built` or `cached`.
    pub build: &'static str,
}

/// What the VM boots, as `run` reports it.
#[derive(Debug, serde::Serialize)]
pub struct BootStep {
    /// `flag`, `image` or `config`.
    pub kernel_source: &'static str,
    /// None: not a Linux kernel, booted as given.
    pub release: Option<String>,
    /// The cocoon initramfs the VM's initrd was made from.
    pub initramfs: Option<String>,
    /// `built` or `cached`.
    pub initramfs_build: Option<&'static str>,
    pub root_partition: Option<String>,
}

/// A container image pulled as `report`: its layers as squashfs disks,
/// its config as the process the guest runs.
pub(super) fn prepare_layered(
    store: &Store,
    report: &PullReport,
    pulled: &'static str,
    runtime: &Runtime,
    registry: &Registry,
    say: &Say,
) -> anyhow::Result<Prepared> {
    let prepared = cocoon_host::layer::prepare(store, &report.record, runtime, registry)?;
    let mut layers = Vec::new();
    for (k, b) in prepared.built.iter().enumerate() {
        let build = if b.image.converted_now {
            "built"
        } else {
            "cached"
        };
        say.line(format!(
            "layer {k}: {} to squashfs ({}, {build}) {}",
            b.source,
            human(b.image.size),
            b.image.digest
        ));
        layers.push(LayerStep {
            source: b.source.to_string(),
            digest: b.image.digest.to_string(),
            size: b.image.size,
            build,
        });
    }
    let reference = cocoon_host::http::redact(&report.reference).into_owned();
    Ok(Prepared {
        info: Some(ImageInfo {
            reference: reference.clone(),
            digest: report.digest.clone(),
            base: None,
            layers: prepared.layers.iter().map(|l| l.digest.clone()).collect(),
        }),
        step: Some(ImageStep {
            reference,
            digest: report.digest.to_string(),
            pull: pulled,
            base: None,
            conversion: None,
            format: None,
            layers,
        }),
        disks: ImageDisks::Layered {
            layers: prepared.layers,
        },
        demo: None,
        guest: Some(GuestImage::Layered {
            exec: ExecConfig::from(&prepared.config),
        }),
    })
}

/// Says what the VM boots; the step for `-o json`.
pub(super) fn report_boot(booted: &Booted, say: &Say) -> BootStep {
    let from = match booted.source {
        KernelSource::Flag => "--kernel",
        KernelSource::Image => "the image",
        KernelSource::Config => "[vm] kernel",
    };
    match &booted.release {
        Some(r) => say.line(format!(
            "kernel: Linux {r} from {from} {}",
            booted.kernel.display()
        )),
        None => say.line(format!(
            "kernel: {} from {from} (not Linux: booted as given)",
            booted.kernel.display()
        )),
    }
    if let Some(i) = &booted.initramfs {
        say.line(format!(
            "initramfs: the cocoon initramfs {} ({}), the VM's initrd {}",
            i.digest,
            if i.built { "built" } else { "cached" },
            booted
                .initrd
                .as_deref()
                .unwrap_or(i.path.as_path())
                .display()
        ));
    }
    let root_partition = booted.root_partition.as_ref().map(|p| match p {
        RootPartition::PartUuid(u) => format!("PARTUUID={u}"),
        RootPartition::Label(l) => format!("LABEL={l}"),
        RootPartition::Number(n) => n.to_string(),
    });
    if let Some(p) = &root_partition {
        say.line(format!("root: partition {p}"));
    }
    BootStep {
        kernel_source: match booted.source {
            KernelSource::Flag => "flag",
            KernelSource::Image => "image",
            KernelSource::Config => "config",
        },
        release: booted.release.clone(),
        initramfs: booted.initramfs.as_ref().map(|i| i.digest.to_string()),
        initramfs_build: booted
            .initramfs
            .as_ref()
            .map(|i| if i.built { "built" } else { "cached" }),
        root_partition,
    }
}
