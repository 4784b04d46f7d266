//! The API server: HTTP/1.1 on the VM's unix socket, one task per
//! connection. A client cannot stall the VM: the VM runs on its own
//! threads, every connection has read deadlines, bodies are capped before
//! they are buffered, and connections beyond a small limit are closed.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::UnixListener;
use tokio::sync::Semaphore;

use super::Monitor;
use crate::vm::api::{self, ApiError, InputAccepted};

/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 32;
/// A client must send its headers, and its body, within this.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Header bytes per request.
const MAX_HEADER_BYTES: usize = 16 << 10;

type Body = Full<Bytes>;

pub async fn serve(listener: UnixListener, monitor: Arc<Monitor>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // EMFILE and friends: back off rather than spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let monitor = monitor.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let monitor = monitor.clone();
                async move { Ok::<_, Infallible>(handle(&monitor, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(READ_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(permit);
        });
    }
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

/// A refusal, made into a response at the end.
struct Fail(StatusCode, String);

fn error(status: StatusCode, message: impl Into<String>) -> Fail {
    Fail(status, message.into())
}

impl Fail {
    fn response(self) -> Response<Body> {
        json(self.0, &ApiError { error: self.1 })
    }
}

/// The body, whole, if it fits and arrives in time.
async fn body(req: Request<Incoming>, max: usize) -> Result<Bytes, Fail> {
    if let Some(len) = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > max as u64 {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is {len} bytes; at most {max} are accepted"),
            ));
        }
    }
    match tokio::time::timeout(READ_TIMEOUT, Limited::new(req.into_body(), max).collect()).await {
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            "the body did not arrive in time",
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is over {max} bytes"),
        )),
        Ok(Err(e)) => Err(error(
            StatusCode::BAD_REQUEST,
            format!("reading the body: {e}"),
        )),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

fn query(req: &Request<Incoming>) -> Result<HashMap<String, String>, Fail> {
    let mut out = HashMap::new();
    for pair in req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if !matches!(k, "from" | "wait_ms" | "max") {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("unknown query parameter {k:?}"),
            ));
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

fn number(q: &HashMap<String, String>, key: &str, default: u64) -> Result<u64, Fail> {
    match q.get(key) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| {
            error(
                StatusCode::BAD_REQUEST,
                format!("query parameter {key}={v:?} is not a number"),
            )
        }),
    }
}

async fn handle(monitor: &Arc<Monitor>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let result = match (method.clone(), path.as_str()) {
        (Method::GET, api::PATH_VM) => Ok(json(StatusCode::OK, &monitor.info())),
        (
            Method::PUT,
            p @ (api::PATH_PAUSE | api::PATH_RESUME | api::PATH_SHUTDOWN | api::PATH_STOP),
        ) => {
            // Actions take no body; one that comes anyway is refused.
            match body(req, 0).await {
                Err(r) => Err(r),
                Ok(_) => monitor
                    .act(p)
                    .map(|info| json(StatusCode::OK, &info))
                    .map_err(|e| error(StatusCode::CONFLICT, e)),
            }
        }
        (Method::PUT, api::PATH_SNAPSHOT) => snapshot(monitor, req).await,
        (Method::GET, api::PATH_CONSOLE) => console(monitor, &req).await,
        (Method::PUT, api::PATH_CONSOLE_INPUT) => match body(req, api::MAX_INPUT_BYTES).await {
            Err(r) => Err(r),
            Ok(bytes) => Ok(json(
                StatusCode::OK,
                &InputAccepted {
                    accepted: monitor.vm.console_input(&bytes),
                },
            )),
        },
        (
            _,
            api::PATH_VM
            | api::PATH_PAUSE
            | api::PATH_RESUME
            | api::PATH_SHUTDOWN
            | api::PATH_STOP
            | api::PATH_SNAPSHOT
            | api::PATH_CONSOLE
            | api::PATH_CONSOLE_INPUT,
        ) => Err(error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {path}"),
        )),
        _ => Err(error(
            StatusCode::NOT_FOUND,
            format!("no such endpoint: {path}"),
        )),
    };
    result.unwrap_or_else(Fail::response)
}

/// `PUT /v1/vm/snapshot`: the work (disk copies, hashing) runs on the
/// blocking pool, so the API's thread keeps serving the console.
async fn snapshot(monitor: &Arc<Monitor>, req: Request<Incoming>) -> Result<Response<Body>, Fail> {
    let bytes = body(req, api::MAX_BODY_BYTES).await?;
    let request: api::SnapshotRequest = serde_json::from_slice(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("the request body: {e}")))?;
    let m = monitor.clone();
    let taken = tokio::task::spawn_blocking(move || super::snapshot::take(&m, &request.name))
        .await
        .map_err(|e| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the snapshot task: {e}"),
            )
        })?;
    use super::snapshot::Refused;
    match taken {
        Ok(t) => Ok(json(StatusCode::CREATED, &t)),
        Err(Refused::Bad(e)) => Err(error(StatusCode::BAD_REQUEST, e)),
        Err(Refused::Conflict(e)) => Err(error(StatusCode::CONFLICT, e)),
        Err(Refused::Failed(e)) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e)),
    }
}

async fn console(monitor: &Monitor, req: &Request<Incoming>) -> Result<Response<Body>, Fail> {
    let q = query(req)?;
    let from = number(&q, "from", 0)?;
    let wait = number(&q, "wait_ms", 0)?.min(api::MAX_WAIT_MS);
    let max = number(&q, "max", api::MAX_CONSOLE_READ as u64)?.min(api::MAX_CONSOLE_READ as u64);
    let console = &monitor.console;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait);
    let chunk = loop {
        // Registered before the read, so output between the read and the
        // wait is not missed.
        let mut notified = std::pin::pin!(console.notify.notified());
        notified.as_mut().enable();
        let chunk = console.read(from, crate::cast::usize_from(max));
        if !chunk.data.is_empty() || wait == 0 || monitor.stopped() {
            break chunk;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            break console.read(from, crate::cast::usize_from(max));
        }
    };
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/octet-stream")
        .header(api::HEADER_CONSOLE_START, chunk.start)
        .header(api::HEADER_CONSOLE_NEXT, chunk.next())
        .body(Full::new(Bytes::from(chunk.data)))
        .unwrap_or_default())
}
