//! Finding what a user names: a reference the index knows, or a digest
//! (`sha256:HEX`, or 12 or more hex digits of one, with or without the
//! `sha256:` prefix) of a blob the store holds.

use std::collections::BTreeSet;
use std::fmt;
use std::fs;

use super::blob::Layout;
use super::digest::Digest;
use super::index::RefRecord;
use super::StoreError;

/// A digest or a unique prefix of one, as a user typed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestQuery {
    hex: String,
}

impl DigestQuery {
    /// The shortest prefix taken for a digest (as `git` and `docker` do,
    /// short enough to type, long enough to be unique in practice).
    pub const MIN_HEX: usize = 12;

    /// `Ok(None)`: `s` does not look like a digest (a reference then).
    /// A `sha256:` prefix with anything but 12 to 64 hex digits is an
    /// error, since nothing else starts that way.
    pub fn parse(s: &str) -> Result<Option<DigestQuery>, StoreError> {
        let is_hex = |h: &str| h.bytes().all(|b| b.is_ascii_hexdigit());
        let fits = |h: &str| (Self::MIN_HEX..=64).contains(&h.len()) && is_hex(h);
        if let Some(h) = s.strip_prefix("sha256:") {
            if !fits(h) {
                return Err(StoreError::BadReference {
                    reference: s.into(),
                    reason: format!("a digest is sha256: and {} to 64 hex digits", Self::MIN_HEX),
                });
            }
            return Ok(Some(DigestQuery {
                hex: h.to_ascii_lowercase(),
            }));
        }
        Ok(fits(s).then(|| DigestQuery {
            hex: s.to_ascii_lowercase(),
        }))
    }

    pub fn matches(&self, d: &Digest) -> bool {
        d.hex().starts_with(&self.hex)
    }
}

impl fmt::Display for DigestQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

/// What a name led to.
#[derive(Debug, Clone)]
pub enum Found {
    /// A reference of the index.
    Reference(RefRecord),
    /// A digest: the records naming it (sorted by reference; possibly
    /// none, for a blob that only gc still has to remove).
    Digest {
        digest: Digest,
        records: Vec<RefRecord>,
    },
}

impl Layout {
    /// A reference the index knows, else a digest the store knows.
    pub fn lookup(&self, name: &str) -> Result<Option<Found>, StoreError> {
        if let Some(r) = self.read_ref(name)? {
            return Ok(Some(Found::Reference(r)));
        }
        match DigestQuery::parse(name)? {
            Some(q) => self.lookup_digest(&q),
            None => Ok(None),
        }
    }

    /// The one digest among the index's artifacts and the blobs present
    /// that `query` matches; two or more is an error listing them.
    pub fn lookup_digest(&self, query: &DigestQuery) -> Result<Option<Found>, StoreError> {
        let records = self.list_refs()?;
        let mut matching: BTreeSet<Digest> = records
            .iter()
            .flat_map(|r| r.artifacts.iter().map(|a| &a.digest))
            .filter(|d| query.matches(d))
            .cloned()
            .collect();
        let dir = self.blobs_dir();
        for e in fs::read_dir(&dir)
            .map_err(StoreError::io("listing", &dir))?
            .flatten()
        {
            if let Ok(d) = format!("sha256:{}", e.file_name().to_string_lossy()).parse::<Digest>() {
                if query.matches(&d) {
                    matching.insert(d);
                }
            }
        }
        if matching.len() > 1 {
            return Err(StoreError::Ambiguous {
                query: query.to_string(),
                candidates: matching.into_iter().collect(),
            });
        }
        let Some(digest) = matching.pop_first() else {
            return Ok(None);
        };
        let records = records
            .into_iter()
            .filter(|r| r.artifacts.iter().any(|a| a.digest == digest))
            .collect();
        Ok(Some(Found::Digest { digest, records }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_a_digest() {
        let full = "ab".repeat(32);
        let cases: [(&str, Result<Option<&str>, ()>); 10] = [
            (&full, Ok(Some(full.as_str()))),
            ("sha256:0123456789ab", Ok(Some("0123456789ab"))),
            ("0123456789AB", Ok(Some("0123456789ab"))),
            ("0123456789a", Ok(None)),
            ("sha256:0123456789a", Err(())),
            ("sha256:", Err(())),
            ("sha256:0123456789zz", Err(())),
            ("https://x/0123456789ab", Ok(None)),
            ("disk.img", Ok(None)),
            ("0123456789abcdefg", Ok(None)),
        ];
        for (s, want) in cases {
            let got = DigestQuery::parse(s)
                .map(|q| q.map(|q| q.hex))
                .map_err(|_| ());
            assert_eq!(got, want.map(|o| o.map(str::to_string)), "{s}");
        }
        let q = DigestQuery::parse("sha256:0123456789ab").unwrap().unwrap();
        let d: Digest = format!("sha256:0123456789ab{}", "0".repeat(52))
            .parse()
            .unwrap();
        assert!(q.matches(&d));
        assert!(!q.matches(&Digest::of(b"x")));
        assert_eq!(q.to_string(), "sha256:0123456789ab");
    }
}
