//! The VM's console: COM1's output kept in a bounded ring (what the API
//! serves, by absolute byte offset) and appended to `console.log` by a
//! writer thread, so the vCPU that writes a byte never waits for a disk.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

/// Bytes of output the API can serve from memory.
pub const RING_BYTES: usize = 1 << 20;
/// `console.log` is rotated to `console.log.1` beyond this.
pub const LOG_BYTES: u64 = 16 << 20;

#[derive(Debug, Default)]
struct Ring {
    buf: VecDeque<u8>,
    /// Absolute offset of `buf[0]` since the monitor started.
    start: u64,
    /// Absolute offset up to which the log writer has taken output.
    logged: u64,
    /// Output the ring dropped before the log writer took it (bounded).
    spill: Vec<u8>,
    closed: bool,
}

/// Output kept for a log writer that fell behind the ring.
const SPILL_BYTES: usize = 8 << 20;

impl Ring {
    fn end(&self) -> u64 {
        self.start + self.buf.len() as u64
    }
}

/// A slice of output, by absolute offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Where `data` starts: the offset asked for, or later if the ring
    /// dropped what was asked for.
    pub start: u64,
    pub data: Vec<u8>,
}

impl Chunk {
    pub fn next(&self) -> u64 {
        self.start + self.data.len() as u64
    }
}

#[derive(Debug)]
pub struct Console {
    ring: Mutex<Ring>,
    /// Wakes the log writer.
    wrote: Condvar,
    /// Wakes API readers waiting for output.
    pub notify: tokio::sync::Notify,
    cap: usize,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Console {
    /// A console whose log is `log_path` (appended; rotated when large).
    pub fn open(log_path: &Path) -> std::io::Result<Arc<Console>> {
        let log = open_log(log_path)?;
        let console = Arc::new(Console {
            ring: Mutex::new(Ring::default()),
            wrote: Condvar::new(),
            notify: tokio::sync::Notify::new(),
            cap: RING_BYTES,
            writer: Mutex::new(None),
        });
        let c = console.clone();
        let path = log_path.to_path_buf();
        let handle = std::thread::Builder::new()
            .name("console-log".into())
            .spawn(move || c.write_log(log, &path))?;
        *console.writer.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        Ok(console)
    }

    /// The guest wrote `bytes` (called on a vCPU thread).
    pub fn push(&self, bytes: &[u8]) {
        {
            let mut r = self.ring.lock().unwrap_or_else(|e| e.into_inner());
            r.buf.extend(bytes);
            let over = r.buf.len().saturating_sub(self.cap);
            if over > 0 {
                let unlogged = (r.start + over as u64).saturating_sub(r.logged.max(r.start));
                let keep = crate::cast::usize_from(unlogged)
                    .min(SPILL_BYTES.saturating_sub(r.spill.len()));
                let skip = over - crate::cast::usize_from(unlogged);
                let dropped: Vec<u8> = r.buf.drain(..over).skip(skip).take(keep).collect();
                r.spill.extend(dropped);
                r.start += over as u64;
                r.logged = r.logged.max(r.start);
            }
        }
        self.wrote.notify_one();
        self.notify.notify_waiters();
    }

    /// Output from `from` on, at most `max` bytes.
    pub fn read(&self, from: u64, max: usize) -> Chunk {
        let r = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let start = from.clamp(r.start, r.end());
        let skip = crate::cast::usize_from(start - r.start);
        let data: Vec<u8> = r.buf.iter().skip(skip).take(max).copied().collect();
        Chunk { start, data }
    }

    /// The offset the next byte will have.
    pub fn end(&self) -> u64 {
        self.ring.lock().unwrap_or_else(|e| e.into_inner()).end()
    }

    /// Writes out what the log has not got yet, then stops its writer
    /// (the VM stopped).
    pub fn close(&self) {
        self.ring.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.wrote.notify_all();
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = writer {
            let _ = w.join();
        }
    }

    fn write_log(&self, mut log: File, path: &Path) {
        let mut written: u64 = log.metadata().map(|m| m.len()).unwrap_or(0);
        loop {
            let (bytes, closed) = {
                let mut r = self.ring.lock().unwrap_or_else(|e| e.into_inner());
                while r.logged >= r.end() && r.spill.is_empty() && !r.closed {
                    r = self.wrote.wait(r).unwrap_or_else(|e| e.into_inner());
                }
                let mut bytes = std::mem::take(&mut r.spill);
                let skip = crate::cast::usize_from(r.logged.max(r.start) - r.start);
                bytes.extend(r.buf.iter().skip(skip));
                r.logged = r.end();
                // Everything taken: a close seen now ends the writer.
                (bytes, r.closed)
            };
            if !bytes.is_empty() {
                if written + bytes.len() as u64 > LOG_BYTES {
                    let _ = std::fs::rename(path, path.with_extension("log.1"));
                    if let Ok(f) = open_log(path) {
                        log = f;
                        written = 0;
                    }
                }
                if log.write_all(&bytes).is_ok() {
                    written += bytes.len() as u64;
                }
            }
            if closed {
                let _ = log.sync_data();
                return;
            }
        }
    }
}

fn open_log(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_serves_by_offset_and_the_log_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let c = Console::open(&log).unwrap();
        c.push(b"hello ");
        c.push(b"world\n");
        assert_eq!(c.read(0, 100).data, b"hello world\n");
        assert_eq!(
            c.read(6, 3),
            Chunk {
                start: 6,
                data: b"wor".to_vec()
            }
        );
        assert_eq!(
            c.read(999, 10),
            Chunk {
                start: 12,
                data: vec![]
            }
        );
        // More than the ring holds: old output is dropped, offsets go on.
        let big = vec![b'x'; RING_BYTES + 10];
        c.push(&big);
        let chunk = c.read(0, 16);
        assert_eq!(chunk.start, 22);
        assert_eq!(c.end(), 12 + big.len() as u64);
        c.close();
        let on_disk = std::fs::read(&log).unwrap();
        assert_eq!(on_disk.len() as u64, c.end());
        assert!(on_disk.starts_with(b"hello world\nxxx"));
    }
}
