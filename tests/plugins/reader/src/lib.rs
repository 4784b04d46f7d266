//! A converter that reads its whole source through `SourceReader` (Read +
//! Seek over the host's read-at handle) in uneven chunks with seeks, and
//! reports an FNV-1a hash of the bytes as its backing name, so a test can
//! compare it with the host's own view of the file. Also asks for a read
//! larger than the host allows, which must fail cleanly.

use std::io::{Read, Seek, SeekFrom};

use cocoon_plugin_sdk::format_converter::*;

struct Reader;

struct Opened {
    size: u64,
    summary: String,
}

fn fnv(hash: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *hash ^= *b as u64;
        *hash = hash.wrapping_mul(0x100000001b3);
    }
}

fn io(e: std::io::Error) -> Error {
    Error::io(e.to_string())
}

impl FormatConverter for Reader {
    type Image = Opened;

    fn probe(_head: &[u8], _tail: &[u8], _size: u64) -> Option<ProbeResult> {
        None
    }

    fn open(src: Source, _format: &str) -> Result<Opened, Error> {
        let oversized = src.read_at(0, max_read() + 1).is_err();
        let mut r = SourceReader::new(src);
        let size = r.len();
        // Read the second half first, then the first, in odd-sized chunks.
        let half = size / 2;
        let mut tail = Vec::new();
        r.seek(SeekFrom::End(-((size - half) as i64))).map_err(io)?;
        r.read_to_end(&mut tail).map_err(io)?;
        r.seek(SeekFrom::Start(0)).map_err(io)?;
        let mut head = vec![0u8; half as usize];
        let mut done = 0;
        while done < head.len() {
            let n = (head.len() - done).min(12_345);
            r.read_exact(&mut head[done..done + n]).map_err(io)?;
            done += n;
        }
        let mut hash = 0xcbf29ce484222325u64;
        fnv(&mut hash, &head);
        fnv(&mut hash, &tail);
        let past = r.seek(SeekFrom::Current(-1 - size as i64)).is_err();
        Ok(Opened {
            size,
            summary: format!(
                "{hash:016x} oversized-refused={oversized} negative-seek-refused={past}"
            ),
        })
    }

    fn decode(_extent: Compressed, _input: Vec<u8>, _length: u32) -> Result<Vec<u8>, Error> {
        Err(Error::unsupported("no codecs"))
    }
}

impl ConverterImage for Opened {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn backing(&self) -> Option<String> {
        Some(self.summary.clone())
    }

    fn map(&self, offset: u64, _max: u32) -> Result<Vec<Extent>, Error> {
        if offset >= self.size {
            return Ok(Vec::new());
        }
        Ok(vec![Extent {
            offset,
            length: self.size - offset,
            kind: ExtentKind::Data(offset),
        }])
    }
}

cocoon_plugin_sdk::export_format_converter!(Reader);
