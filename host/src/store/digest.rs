//! `sha256:<hex>` digests and the hashing writer that computes them while
//! bytes stream to disk.

use std::fmt;
use std::io::{self, Write};
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// A well-formed sha256 digest: `sha256:` and 64 lower-case hex digits.
/// Holding one says nothing about any file; [`super::blob::VerifiedBlob`]
/// is what says "these bytes hash to this".
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

#[derive(Debug, thiserror::Error)]
#[error("digest {0:?} is not sha256:<64 lower-case hex digits>")]
pub struct BadDigest(pub String);

impl Digest {
    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    pub fn of(bytes: &[u8]) -> Digest {
        Digest(format!("sha256:{}", hex::encode(Sha256::digest(bytes))))
    }

    fn from_hash(h: Sha256) -> Digest {
        Digest(format!("sha256:{}", hex::encode(h.finalize())))
    }
}

impl FromStr for Digest {
    type Err = BadDigest;
    fn from_str(s: &str) -> Result<Self, BadDigest> {
        let ok = s.strip_prefix("sha256:").is_some_and(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
        if ok {
            Ok(Digest(s.to_string()))
        } else {
            Err(BadDigest(s.to_string()))
        }
    }
}

impl TryFrom<String> for Digest {
    type Error = BadDigest;
    fn try_from(s: String) -> Result<Self, BadDigest> {
        s.parse()
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Writes through to `inner` and hashes every byte written.
pub struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
    written: u64,
}

impl<W> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hash: Sha256::new(),
            written: 0,
        }
    }

    /// Hashes bytes already in the file (a resumed download) without
    /// writing them again.
    pub fn absorb(&mut self, bytes: &[u8]) {
        self.hash.update(bytes);
        self.written += bytes.len() as u64;
    }

    /// Takes over the hash state of `seed` (bytes hashed but not written
    /// through this writer).
    pub fn adopt<V>(&mut self, seed: HashingWriter<V>) {
        self.hash = seed.hash;
        self.written = seed.written;
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    pub fn finish(self) -> (W, Digest, u64) {
        (self.inner, Digest::from_hash(self.hash), self.written)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Hashes a whole reader.
pub fn hash_reader(mut r: impl io::Read) -> io::Result<(Digest, u64)> {
    let mut w = HashingWriter::new(io::sink());
    // Small enough to stay in the CPU's L2 cache between the read and the
    // hash. Pass a file, not a BufReader: reads of this size bypass a
    // BufReader's buffer only when it is no larger.
    let mut buf = vec![0u8; 128 << 10];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        w.write_all(&buf[..n])?;
    }
    let (_, d, n) = w.finish();
    Ok((d, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_hash() {
        let d = Digest::of(b"abc");
        assert_eq!(
            d.hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        for bad in [
            "",
            "sha256:abc",
            "sha512:ba78",
            &format!("sha256:{}", "A".repeat(64)),
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad}");
        }
        let mut w = HashingWriter::new(Vec::new());
        w.absorb(b"a");
        w.write_all(b"bc").unwrap();
        let (buf, d2, n) = w.finish();
        assert_eq!((buf, d2, n), (b"bc".to_vec(), d, 3));
    }
}
