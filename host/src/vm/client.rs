//! The CLI's side of the monitor API: one HTTP/1.1 request per connection
//! on the VM's unix socket, every step under a deadline, so a monitor that
//! died or hangs is an error, never a hang.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

use super::api::{self, ApiError, InputAccepted, SnapshotRequest, SnapshotTaken, VmInfo};
use super::monitor::console::Chunk;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Beyond a console read's own wait.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A snapshot copies the memory and disks: minutes for a big guest.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(1800);
/// An answer bigger than this is not from our monitor.
const MAX_ANSWER_BYTES: usize = api::MAX_CONSOLE_READ + (64 << 10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the monitor at {socket}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the monitor at {socket} did not answer in time")]
    Timeout { socket: PathBuf },
    #[error("talking to the monitor at {socket}")]
    Http {
        socket: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the monitor refused {what} ({status}): {message}")]
    Refused {
        what: String,
        status: u16,
        message: String,
    },
    #[error("the monitor's answer to {what} is not valid")]
    Answer {
        what: String,
        #[source]
        source: serde_json::Error,
    },
}

/// A client of one VM's monitor.
pub struct Client {
    socket: PathBuf,
    rt: tokio::runtime::Runtime,
}

impl Client {
    pub fn new(socket: &Path) -> Result<Client, ClientError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| ClientError::Connect {
                socket: socket.to_path_buf(),
                source,
            })?;
        Ok(Client {
            socket: socket.to_path_buf(),
            rt,
        })
    }

    fn http(&self, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> ClientError {
        ClientError::Http {
            socket: self.socket.clone(),
            source: e.into(),
        }
    }

    /// One request; the status, headers and body.
    fn request(
        &self,
        method: Method,
        path_and_query: &str,
        body: Bytes,
        wait: Duration,
    ) -> Result<(StatusCode, hyper::HeaderMap, Bytes), ClientError> {
        let socket = self.socket.clone();
        self.rt.block_on(async {
            let stream =
                tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::UnixStream::connect(&socket))
                    .await
                    .map_err(|_| ClientError::Timeout {
                        socket: socket.clone(),
                    })?
                    .map_err(|source| ClientError::Connect {
                        socket: socket.clone(),
                        source,
                    })?;
            let exchange = async {
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .map_err(|e| self.http(e))?;
                tokio::spawn(conn);
                let req = Request::builder()
                    .method(method)
                    .uri(path_and_query)
                    .header(hyper::header::HOST, "localhost")
                    .body(Full::new(body))
                    .map_err(|e| self.http(e))?;
                let resp = sender.send_request(req).await.map_err(|e| self.http(e))?;
                let status = resp.status();
                let headers = resp.headers().clone();
                let body = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
                    .collect()
                    .await
                    .map_err(|e| self.http(e))?
                    .to_bytes();
                Ok::<_, ClientError>((status, headers, body))
            };
            tokio::time::timeout(REQUEST_TIMEOUT + wait, exchange)
                .await
                .map_err(|_| ClientError::Timeout {
                    socket: socket.clone(),
                })?
        })
    }

    fn checked(
        &self,
        what: &str,
        (status, headers, body): (StatusCode, hyper::HeaderMap, Bytes),
    ) -> Result<(hyper::HeaderMap, Bytes), ClientError> {
        if status.is_success() {
            return Ok((headers, body));
        }
        let message = serde_json::from_slice::<ApiError>(&body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
        Err(ClientError::Refused {
            what: what.to_string(),
            status: status.as_u16(),
            message,
        })
    }

    fn json<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        body: &[u8],
    ) -> Result<T, ClientError> {
        serde_json::from_slice(body).map_err(|source| ClientError::Answer {
            what: what.to_string(),
            source,
        })
    }

    pub fn info(&self) -> Result<VmInfo, ClientError> {
        let r = self.request(Method::GET, api::PATH_VM, Bytes::new(), Duration::ZERO)?;
        let (_, body) = self.checked("info", r)?;
        self.json("info", &body)
    }

    /// `pause`, `resume`, `shutdown` or `stop` (an `api::PATH_*`).
    pub fn act(&self, path: &str) -> Result<VmInfo, ClientError> {
        let r = self.request(Method::PUT, path, Bytes::new(), Duration::ZERO)?;
        let (_, body) = self.checked(path, r)?;
        self.json(path, &body)
    }

    /// Takes snapshot `name` (`STATE/snapshots/NAME`); returns once it is
    /// whole and listed.
    pub fn snapshot(&self, name: &str) -> Result<SnapshotTaken, ClientError> {
        let body = serde_json::to_vec(&SnapshotRequest { name: name.into() })
            .expect("a request serialises");
        let r = self.request(
            Method::PUT,
            api::PATH_SNAPSHOT,
            Bytes::from(body),
            SNAPSHOT_TIMEOUT,
        )?;
        let (_, body) = self.checked("snapshot", r)?;
        self.json("snapshot", &body)
    }

    /// Console output from `from`, waiting up to `wait` for some.
    pub fn console(&self, from: u64, wait: Duration) -> Result<Chunk, ClientError> {
        let wait_ms = wait.as_millis().min(u128::from(api::MAX_WAIT_MS));
        let path = format!("{}?from={from}&wait_ms={wait_ms}", api::PATH_CONSOLE);
        let r = self.request(Method::GET, &path, Bytes::new(), wait)?;
        let (headers, body) = self.checked("console", r)?;
        let start = headers
            .get(api::HEADER_CONSOLE_START)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(from);
        Ok(Chunk {
            start,
            data: body.to_vec(),
        })
    }

    pub fn input(&self, bytes: &[u8]) -> Result<usize, ClientError> {
        let r = self.request(
            Method::PUT,
            api::PATH_CONSOLE_INPUT,
            Bytes::copy_from_slice(bytes),
            Duration::ZERO,
        )?;
        let (_, body) = self.checked("console input", r)?;
        Ok(self.json::<InputAccepted>("console input", &body)?.accepted)
    }
}
