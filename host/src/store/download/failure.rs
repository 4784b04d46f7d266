//! Why one HTTP exchange of a download failed, and whether trying again
//! can help.

use std::error::Error as StdError;
use std::io;

use crate::http::RedirectError;
use crate::store::StoreError;

/// Why one HTTP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("could not connect")]
    Connect(#[source] reqwest::Error),
    #[error("the connection failed")]
    Reset(#[source] reqwest::Error),
    #[error("the request timed out")]
    Timeout(#[source] reqwest::Error),
    #[error("the server's answer is not valid HTTP")]
    Malformed(#[source] reqwest::Error),
    #[error("invalid data on the connection (TLS)")]
    Invalid(#[source] reqwest::Error),
    #[error("the request failed")]
    Other(#[source] reqwest::Error),
    #[error("no answer within {secs} s")]
    NoAnswer { secs: u64 },
    #[error("{bytes} bytes in {secs} s, below the minimum of {min_rate} bytes/s")]
    Stalled {
        bytes: u64,
        secs: u64,
        min_rate: u64,
    },
    #[error("the download took longer than its deadline of {secs} s")]
    Deadline { secs: u64 },
    #[error("not following the redirect")]
    Redirect(#[source] RedirectError),
    #[error("the range answer starts at {start:?}, not {expected}")]
    BadRange { start: Option<u64>, expected: u64 },
    #[error("the range asked for is not satisfiable")]
    RangeNotSatisfiable,
}

impl Failure {
    /// Whether the same request can succeed if sent again.
    pub fn retryable(&self) -> bool {
        match self {
            Failure::Connect(_)
            | Failure::Reset(_)
            | Failure::Timeout(_)
            | Failure::NoAnswer { .. }
            | Failure::Stalled { .. }
            | Failure::BadRange { .. }
            | Failure::RangeNotSatisfiable => true,
            Failure::Malformed(_)
            | Failure::Invalid(_)
            | Failure::Other(_)
            | Failure::Deadline { .. }
            | Failure::Redirect(_) => false,
        }
    }

    /// Whether the server was not reached at all (rather than answering
    /// wrongly): then a held copy may be used with a warning.
    pub fn unreachable(&self) -> bool {
        matches!(
            self,
            Failure::Connect(_)
                | Failure::Reset(_)
                | Failure::Timeout(_)
                | Failure::NoAnswer { .. }
                | Failure::Stalled { .. }
                | Failure::Deadline { .. }
        )
    }

    /// Sorts a client error by what caused it.
    pub(super) fn of(e: reqwest::Error) -> Failure {
        let e = e.without_url();
        if let Some(h) = find::<hyper::Error>(&e) {
            if h.is_parse() || h.is_parse_status() {
                return Failure::Malformed(e);
            }
            if h.is_incomplete_message() || h.is_closed() || h.is_canceled() {
                return Failure::Reset(e);
            }
        }
        if let Some(io) = find::<io::Error>(&e) {
            use io::ErrorKind as K;
            match io.kind() {
                K::InvalidData => return Failure::Invalid(e),
                K::TimedOut => return Failure::Timeout(e),
                K::ConnectionRefused | K::HostUnreachable | K::NetworkUnreachable => {
                    return Failure::Connect(e)
                }
                K::ConnectionReset
                | K::ConnectionAborted
                | K::BrokenPipe
                | K::UnexpectedEof
                | K::NotConnected => return Failure::Reset(e),
                _ => {}
            }
        }
        if e.is_timeout() {
            Failure::Timeout(e)
        } else if e.is_connect() {
            Failure::Connect(e)
        } else if e.is_body() {
            Failure::Reset(e)
        } else {
            Failure::Other(e)
        }
    }
}

fn find<'a, T: StdError + 'static>(e: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(t) = c.downcast_ref::<T>() {
            return Some(t);
        }
        cur = c.source();
    }
    None
}

/// Whether a failed download is worth another attempt.
pub fn transient(e: &StoreError) -> bool {
    match e {
        StoreError::Transport { failure, .. } => failure.retryable(),
        StoreError::Http { status, .. } => retryable_status(*status),
        _ => false,
    }
}

/// 5xx, 408 (request timeout) and 429 (too many requests) can succeed
/// later; every other status says the same thing every time.
pub fn retryable_status(status: u16) -> bool {
    status >= 500 || status == 408 || status == 429
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_statuses_are_retried() {
        let cases = [
            (500, true),
            (502, true),
            (503, true),
            (408, true),
            (429, true),
            (400, false),
            (401, false),
            (403, false),
            (404, false),
            (410, false),
            (416, false),
            (301, false),
        ];
        for (status, want) in cases {
            assert_eq!(retryable_status(status), want, "{status}");
        }
    }

    #[test]
    fn which_failures_are_retried() {
        let cases = [
            (Failure::NoAnswer { secs: 1 }, true),
            (
                Failure::Stalled {
                    bytes: 1,
                    secs: 1,
                    min_rate: 2,
                },
                true,
            ),
            (
                Failure::BadRange {
                    start: None,
                    expected: 3,
                },
                true,
            ),
            (Failure::RangeNotSatisfiable, true),
            (Failure::Deadline { secs: 1 }, false),
            (Failure::Redirect(RedirectError::TooMany { max: 1 }), false),
            (
                Failure::Redirect(RedirectError::ToFile {
                    location: "file:///x".into(),
                }),
                false,
            ),
            (
                Failure::Redirect(RedirectError::Loop {
                    location: "http://a/".into(),
                }),
                false,
            ),
        ];
        for (f, want) in cases {
            assert_eq!(f.retryable(), want, "{f}");
        }
    }
}
