//! The decoder pool: compressed pieces are read from their source and
//! decoded by warm plugin instances on worker threads, one instance per
//! plugin per worker, and written straight into the output. The queue is
//! short, so memory stays at a few extents per worker whatever the image.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Mutex, PoisonError};

use crate::cast::usize_from;
use crate::plugin::calls::{Compressed, MAX_DECODED};
use crate::plugin::LoadedPlugin;

use super::output::Output;
use super::{ConvertError, Progress};

/// Compressed pieces queued per worker.
const QUEUE_PER_WORKER: usize = 4;
/// Most compressed bytes read for one extent: a compressed extent is
/// never much larger than what it decodes to, and a plugin saying
/// otherwise must not make the host allocate gigabytes.
pub const MAX_COMPRESSED: u32 = 2 * MAX_DECODED;

/// One compressed piece to decode and write.
#[derive(Debug, Clone)]
pub struct Job {
    /// The image of the chain it comes from.
    pub layer: usize,
    pub extent: Compressed,
    /// Bytes the extent decodes to.
    pub decoded: u64,
    /// Where the wanted bytes start in the decoded extent.
    pub skip: u64,
    /// Where they go in the output, and how many.
    pub offset: u64,
    pub length: u64,
}

/// The sending end the walk submits jobs to.
pub struct Pool<'a> {
    tx: SyncSender<Job>,
    failure: &'a Mutex<Option<ConvertError>>,
}

impl Pool<'_> {
    /// Queues `job`; fails with the first worker error, if any.
    pub fn submit(&self, job: Job) -> Result<(), ConvertError> {
        if let Some(e) = self
            .failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            return Err(e);
        }
        // The workers outlive the sender; a send fails only if they all
        // panicked, and the scope re-raises that panic.
        let _ = self.tx.send(job);
        Ok(())
    }
}

/// Runs `walk` with a pool of `jobs` workers decoding what it submits.
/// `plugins[i]` and `sources[i]` are the converter and file of image `i`
/// of the chain.
pub fn run(
    jobs: usize,
    plugins: &[&LoadedPlugin],
    sources: &[(PathBuf, File)],
    out: &Output,
    progress: &dyn Progress,
    walk: impl FnOnce(&Pool<'_>) -> Result<(), ConvertError>,
) -> Result<(), ConvertError> {
    run_with_stack(jobs, None, plugins, sources, out, progress, walk)
}

/// [`run`] with worker threads of `stack` bytes of stack (the default
/// when None). A worker that cannot be started (no memory for its stack,
/// a thread limit) is an error, after the ones already started stop.
fn run_with_stack(
    jobs: usize,
    stack: Option<usize>,
    plugins: &[&LoadedPlugin],
    sources: &[(PathBuf, File)],
    out: &Output,
    progress: &dyn Progress,
    walk: impl FnOnce(&Pool<'_>) -> Result<(), ConvertError>,
) -> Result<(), ConvertError> {
    let workers = jobs.max(1);
    let failure = Mutex::new(None);
    let (tx, rx) = sync_channel::<Job>(workers * QUEUE_PER_WORKER);
    let rx = Mutex::new(rx);
    let walked = std::thread::scope(|scope| {
        for index in 0..workers {
            let mut builder = std::thread::Builder::new().name(format!("cocoon-decode-{index}"));
            if let Some(bytes) = stack {
                builder = builder.stack_size(bytes);
            }
            let started = builder.spawn_scoped(scope, || {
                worker(&rx, plugins, sources, out, progress, &failure)
            });
            if let Err(source) = started {
                // Returning drops the sender: the workers started so far
                // see the queue closed and stop before the scope ends.
                return Err(ConvertError::Spawn {
                    index,
                    workers,
                    source,
                });
            }
        }
        let pool = Pool {
            tx,
            failure: &failure,
        };
        // Dropping the pool closes the queue, so the workers drain it and
        // stop before the scope ends.
        walk(&pool)
    });
    let failed = failure.into_inner().unwrap_or_else(PoisonError::into_inner);
    walked?;
    failed.map_or(Ok(()), Err)
}

fn worker(
    rx: &Mutex<Receiver<Job>>,
    plugins: &[&LoadedPlugin],
    sources: &[(PathBuf, File)],
    out: &Output,
    progress: &dyn Progress,
    failure: &Mutex<Option<ConvertError>>,
) {
    let mut warm = HashMap::new();
    let mut failed = false;
    loop {
        let job = match rx.lock().unwrap_or_else(PoisonError::into_inner).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        // After a failure, keep draining so the walk never blocks on a
        // full queue; it sees the error at its next submit.
        if failed {
            continue;
        }
        if let Err(e) = decode_one(&job, plugins, sources, out, &mut warm) {
            failed = true;
            failure
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_or_insert(e);
            continue;
        }
        progress.advance(job.length);
    }
}

fn decode_one<'p>(
    job: &Job,
    plugins: &[&'p LoadedPlugin],
    sources: &[(PathBuf, File)],
    out: &Output,
    warm: &mut HashMap<usize, crate::plugin::ConverterInstance<'p>>,
) -> Result<(), ConvertError> {
    let (path, file) = &sources[job.layer];
    let invalid = |detail: String| ConvertError::Invalid {
        image: path.clone(),
        detail,
    };
    // The runtime bounds compressed extents; these guard the arithmetic.
    let decoded_len = match u32::try_from(job.decoded) {
        Ok(d) if d <= MAX_DECODED && job.skip + job.length <= job.decoded => d,
        _ => {
            return Err(invalid(format!(
                "compressed piece {}+{} of a {}-byte extent",
                job.skip, job.length, job.decoded
            )))
        }
    };
    if job.extent.source_length > MAX_COMPRESSED {
        return Err(invalid(format!(
            "compressed extent at {} claims {} bytes, over the {MAX_COMPRESSED}-byte limit",
            job.extent.source_offset, job.extent.source_length
        )));
    }
    let mut input = vec![0u8; job.extent.source_length as usize];
    file.read_exact_at(&mut input, job.extent.source_offset)
        .map_err(ConvertError::io("reading compressed data from", path))?;
    let plugin = plugins[job.layer];
    let session = match warm.entry(job.layer) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(v) => v.insert(plugin.converter_instance()?),
    };
    let decoded = session.decode(job.extent, &input, decoded_len)?;
    let wanted = &decoded[usize_from(job.skip)..usize_from(job.skip + job.length)];
    out.write_at(wanted, job.offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_that_cannot_start_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let out = Output::create(&dir.path().join("out.raw"), 0).unwrap();
        // No address space holds a 1 PiB stack: the second spawn fails.
        let r = run_with_stack(
            2,
            Some(1 << 50),
            &[],
            &[],
            &out,
            &super::super::Silent,
            |_| panic!("the walk runs only with every worker started"),
        );
        match r {
            Err(ConvertError::Spawn {
                index: 0,
                workers: 2,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
    }
}
