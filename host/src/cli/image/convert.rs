//! `cocoon-host image convert`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};

use crate::cli::output::{emit, human, Format};
use cocoon_host::config::HostConfig;
use cocoon_host::convert::{
    self, BackingResolver, ConvertRequest, DirResolver, NoBacking, Progress,
};
use cocoon_host::plugin::{Registry, Runtime};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SourceFormat {
    /// Detect by magic and plugin probes.
    Auto,
    /// Read the file as it is, whatever magic it starts with.
    Raw,
    Qcow2,
    Vmdk,
    Vhdx,
    /// VHD.
    Vpc,
    Vdi,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TargetFormat {
    Raw,
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The image to convert (xz, gzip and zstd wrappers are unpacked first).
    src: PathBuf,
    /// The raw file to write; replaced atomically, and only if it is a
    /// regular file (or absent).
    dst: PathBuf,
    /// The source format; a forced format must agree with the probe.
    #[arg(short = 'f', long, value_enum, default_value = "auto")]
    format: SourceFormat,
    /// The output format.
    #[arg(long, value_enum, default_value = "raw")]
    to: TargetFormat,
    /// Directory whose images backing file names may name (plain relative
    /// names only); without it, an image with a backing file is refused.
    #[arg(long)]
    backing_dir: Option<PathBuf>,
    /// Parallel decoders [default: one per core].
    #[arg(short, long, default_value_t = 0)]
    jobs: usize,
    #[arg(short, long, value_enum, default_value_t)]
    output: Format,
}

pub fn run(args: ConvertArgs, config: &HostConfig) -> anyhow::Result<i32> {
    let TargetFormat::Raw = args.to;
    // SIGINT/SIGTERM/SIGHUP remove the temp files and exit 128 + the
    // signal.
    cocoon_host::fsutil::cleanup::remove_temps_on_termination()
        .context("handling SIGINT, SIGTERM and SIGHUP")?;
    // The instance pool holds one instance per decoder and image of the
    // chain (two per job covers a base and one overlay; the pool's spare
    // instances the rest), so `--jobs 80` works on any host.
    let runtime = Runtime::with_options(cocoon_host::plugin::runtime::RuntimeOptions {
        cache_dir: Some(config.state_dir.join("plugin-cache")),
        concurrency: args.jobs.saturating_mul(2),
    })?;
    let registry = Registry::discover(config);
    let resolver: Box<dyn BackingResolver> = match &args.backing_dir {
        Some(dir) => Box::new(
            DirResolver::new(dir).with_context(|| format!("--backing-dir {}", dir.display()))?,
        ),
        None => Box::new(NoBacking),
    };
    let format = match args.format {
        SourceFormat::Auto => None,
        f => Some(
            f.to_possible_value()
                .expect("no skipped variants")
                .get_name()
                .to_string(),
        ),
    };
    let req = ConvertRequest {
        source: &args.src,
        dest: &args.dst,
        format: format.as_deref(),
        backing: resolver.as_ref(),
        jobs: args.jobs,
    };
    let progress = Bar::new(args.output == Format::Text);
    let report = convert::convert(&runtime, &registry, &req, &progress)?;
    if let Some(kib) = peak_rss_kib() {
        tracing::info!("peak resident memory: {kib} KiB");
    }
    emit(args.output, &report, |r| {
        println!(
            "{} -> {}: {} {}, {} allocated, {:.2}s",
            args.src.display(),
            args.dst.display(),
            r.format,
            human(r.virtual_size),
            human(r.allocated_bytes),
            r.duration.as_secs_f64()
        );
    })?;
    Ok(0)
}

/// This process's peak resident set (VmHWM), in KiB. Unlike getrusage's
/// ru_maxrss, it starts afresh at exec, so it is this command's own.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A progress bar on a terminal; otherwise a plain line every few seconds
/// (logs and CI keep readable output). Nothing at all when `enabled` is
/// false (JSON output keeps stderr quiet too).
struct Bar {
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
    done: AtomicU64,
    total: AtomicU64,
    last_line: Mutex<Instant>,
}

impl Bar {
    fn new(enabled: bool) -> Self {
        let tty = std::io::stderr().is_terminal();
        let bar = (enabled && tty).then(|| {
            let b = indicatif::ProgressBar::hidden();
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("a valid template"),
            );
            b.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            b
        });
        Bar {
            bar,
            plain: enabled && !tty,
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
            last_line: Mutex::new(Instant::now()),
        }
    }
}

impl Progress for Bar {
    fn start(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        if let Some(b) = &self.bar {
            b.set_length(total);
        }
    }

    fn advance(&self, bytes: u64) {
        let done = self.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if let Some(b) = &self.bar {
            b.inc(bytes);
        } else if self.plain {
            let mut last = self.last_line.lock().unwrap_or_else(|e| e.into_inner());
            if last.elapsed() >= Duration::from_secs(5) {
                *last = Instant::now();
                let total = self.total.load(Ordering::Relaxed).max(1);
                eprintln!(
                    "converted {} of {} ({}%)",
                    human(done),
                    human(total),
                    done * 100 / total
                );
            }
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
