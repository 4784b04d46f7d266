//! Helpers of the store tests: a controllable loopback HTTP server, the
//! real binary, and a Debian `docker-registry` started on a free port.
#![allow(dead_code)]

pub mod registry;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[allow(unused_imports)]
pub use cocoon_format_common::test_support::{skip, test_name, Rng};

/// Sources for a test that pulls only local files: any other reference
/// is a bug in the test.
pub struct NoSources;

impl cocoon_host::store::Sources for NoSources {
    fn resolve(
        &self,
        r: &str,
    ) -> Result<cocoon_host::store::Resolved, cocoon_host::store::StoreError> {
        panic!("no network for {r}")
    }
}

/// A pull of the local file `file`, unpinned, policy `missing`.
pub fn local_pull(file: &Path) -> cocoon_host::store::PullRequest {
    cocoon_host::store::PullRequest {
        reference: file.to_str().expect("a UTF-8 path").into(),
        digest: None,
        policy: cocoon_host::store::PullPolicy::Missing,
        force: false,
    }
}

/// How the server misbehaves for one resource.
#[derive(Clone, Debug, Default)]
pub enum Fault {
    #[default]
    None,
    /// Close the connection after this many body bytes, the next `times`
    /// requests (Content-Length still announces the whole body).
    DisconnectAfter { bytes: usize, times: usize },
    /// Announce this many more bytes than are sent, then close.
    ShortBody { missing: usize, times: usize },
    /// Send the body in `chunk`-byte pieces with `delay` between them.
    Slow { chunk: usize, delay: Duration },
    /// Refuse with this status the next `times` requests.
    Status { status: u16, times: usize },
    /// Send one byte of the body every `every` (Content-Length announces
    /// all of it).
    Drip { every: Duration },
    /// Read the request and never answer; the connection stays open until
    /// the client leaves (at most a minute).
    Silent,
    /// Answer `status` with this `Location`.
    Redirect { status: u16, location: String },
    /// Answer with exactly these bytes, then close (a malformed answer).
    Raw(Vec<u8>),
    /// Send the body without a Content-Length, ending it by closing.
    Unannounced,
    /// Announce this Content-Length, send the body, close.
    Announce(u64),
}

#[derive(Clone, Debug)]
pub struct Resource {
    pub body: Arc<Vec<u8>>,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    /// Whether Range requests are honoured.
    pub ranges: bool,
    pub fault: Fault,
    /// Extra response headers.
    pub headers: Vec<(String, String)>,
    /// A header the request must carry (name, value), else 401 with
    /// `challenge` as WWW-Authenticate.
    pub require: Option<(String, String, String)>,
}

impl Resource {
    pub fn new(body: impl Into<Vec<u8>>) -> Self {
        Resource {
            body: Arc::new(body.into()),
            etag: None,
            last_modified: None,
            ranges: true,
            fault: Fault::None,
            headers: Vec::new(),
            require: None,
        }
    }
    pub fn etag(mut self, e: &str) -> Self {
        self.etag = Some(e.to_string());
        self
    }
    pub fn last_modified(mut self, lm: &str) -> Self {
        self.last_modified = Some(lm.to_string());
        self
    }
    pub fn fault(mut self, f: Fault) -> Self {
        self.fault = f;
        self
    }
    pub fn no_ranges(mut self) -> Self {
        self.ranges = false;
        self
    }
    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }
    /// Requests without this header value get a 401.
    pub fn require(mut self, name: &str, value: &str) -> Self {
        self.require = Some((name.into(), value.into(), "Basic realm=\"test\"".into()));
        self
    }
}

/// One request the server saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub status: u16,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct State {
    routes: HashMap<String, Resource>,
    log: Vec<Seen>,
}

/// A loopback HTTP/1.1 server whose resources tests change while it runs.
#[derive(Clone)]
pub struct Server {
    pub port: u16,
    state: Arc<Mutex<State>>,
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl Server {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state: Arc<Mutex<State>> = Arc::default();
        let down: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let s = state.clone();
        let d = down.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                if d.load(std::sync::atomic::Ordering::SeqCst) {
                    // Unreachable: the connection is reset at once.
                    drop(stream);
                    continue;
                }
                let s = s.clone();
                let d = d.clone();
                std::thread::spawn(move || serve(stream, &s, &d));
            }
        });
        Server { port, state, down }
    }

    /// Resets every connection from now on (`false`: serve again).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn set(&self, path: &str, r: Resource) {
        self.state
            .lock()
            .unwrap()
            .routes
            .insert(path.to_string(), r);
    }

    pub fn remove(&self, path: &str) {
        self.state.lock().unwrap().routes.remove(path);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Requests seen for `path`.
    pub fn seen(&self, path: &str) -> Vec<Seen> {
        self.state
            .lock()
            .unwrap()
            .log
            .iter()
            .filter(|s| s.path == path)
            .cloned()
            .collect()
    }

    /// Full (200) bodies sent for `path`: the number of downloads.
    pub fn downloads(&self, path: &str) -> usize {
        self.seen(path).iter().filter(|s| s.status == 200).count()
    }

    pub fn hits(&self, path: &str) -> usize {
        self.seen(path).len()
    }
}

fn serve(stream: TcpStream, state: &Mutex<State>, down: &std::sync::atomic::AtomicBool) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut stream = stream;
    // Keep-alive: serve requests until the client closes.
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        if down.load(std::sync::atomic::Ordering::SeqCst) {
            // A server that went down closes kept-alive connections too.
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("GET").to_string();
        let path = parts.next().unwrap_or("/").to_string();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                break;
            }
            if let Some((k, v)) = h.trim_end().split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let content_length: usize = get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if content_length > 0 {
            let mut sink = vec![0u8; content_length];
            let _ = reader.read_exact(&mut sink);
        }
        let (resource, fault) = {
            let mut st = state.lock().unwrap();
            let fault = st
                .routes
                .get_mut(&path)
                .map(|r| take_fault(&mut r.fault))
                .unwrap_or_default();
            (st.routes.get(&path).cloned(), fault)
        };
        let record = |status: u16| {
            state.lock().unwrap().log.push(Seen {
                path: path.clone(),
                headers: headers.clone(),
                status,
            });
        };
        let Some(r) = resource else {
            record(404);
            let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
            continue;
        };
        if let Some((name, value, challenge)) = &r.require {
            if get(name).as_deref() != Some(value.as_str()) {
                record(401);
                let _ = stream.write_all(format!("HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: {challenge}\r\nContent-Length: 0\r\n\r\n").as_bytes());
                continue;
            }
        }
        if let Fault::Status { status, .. } = fault {
            record(status);
            let _ = stream
                .write_all(format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n").as_bytes());
            continue;
        }
        match &fault {
            Fault::Silent => {
                record(0);
                // Held open, unanswered, until the client gives up.
                let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
                let mut sink = [0u8; 64];
                while reader.read(&mut sink).is_ok_and(|n| n > 0) {}
                return;
            }
            Fault::Redirect { status, location } => {
                record(*status);
                let _ = stream.write_all(
                    format!("HTTP/1.1 {status} Moved\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n")
                        .as_bytes(),
                );
                continue;
            }
            Fault::Raw(bytes) => {
                record(0);
                let _ = stream.write_all(bytes);
                let _ = stream.shutdown(std::net::Shutdown::Both);
                return;
            }
            Fault::Unannounced => {
                record(200);
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
                if method != "HEAD" {
                    let _ = stream.write_all(&r.body);
                }
                let _ = stream.shutdown(std::net::Shutdown::Both);
                return;
            }
            Fault::Announce(n) => {
                record(200);
                let _ = stream.write_all(
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                );
                if method != "HEAD" {
                    let _ = stream.write_all(&r.body);
                }
                let _ = stream.shutdown(std::net::Shutdown::Both);
                return;
            }
            _ => {}
        }
        let mut validators = String::new();
        if let Some(e) = &r.etag {
            validators.push_str(&format!("ETag: {e}\r\n"));
        }
        if let Some(lm) = &r.last_modified {
            validators.push_str(&format!("Last-Modified: {lm}\r\n"));
        }
        for (k, v) in &r.headers {
            validators.push_str(&format!("{k}: {v}\r\n"));
        }
        let not_modified = match (get("if-none-match"), get("if-modified-since")) {
            (Some(inm), _) => r.etag.as_deref() == Some(inm.as_str()),
            (None, Some(ims)) => r.last_modified.as_deref() == Some(ims.as_str()),
            _ => false,
        };
        if not_modified {
            record(304);
            let _ = stream
                .write_all(format!("HTTP/1.1 304 Not Modified\r\n{validators}\r\n").as_bytes());
            continue;
        }
        let body = r.body.clone();
        let mut start = 0usize;
        let mut status = 200;
        if let (true, Some(range)) = (r.ranges, get("range")) {
            let if_range_ok = match get("if-range") {
                None => true,
                Some(v) => {
                    r.etag.as_deref() == Some(v.as_str())
                        || r.last_modified.as_deref() == Some(v.as_str())
                }
            };
            let from = range
                .strip_prefix("bytes=")
                .and_then(|s| s.strip_suffix('-'))
                .and_then(|s| s.parse::<usize>().ok());
            if let (true, Some(from)) = (if_range_ok, from) {
                if from < body.len() {
                    start = from;
                    status = 206;
                }
            }
        }
        record(status);
        let len = body.len() - start;
        let mut head = if status == 206 {
            format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{}/{}\r\n",
                body.len() - 1,
                body.len()
            )
        } else {
            "HTTP/1.1 200 OK\r\n".to_string()
        };
        let announced = match fault {
            Fault::ShortBody { missing, .. } => len + missing,
            _ => len,
        };
        head.push_str(&format!("Content-Length: {announced}\r\n{validators}"));
        if r.ranges {
            head.push_str("Accept-Ranges: bytes\r\n");
        }
        head.push_str("\r\n");
        if stream.write_all(head.as_bytes()).is_err() {
            return;
        }
        if method == "HEAD" {
            continue;
        }
        let payload = &body[start..];
        match fault {
            Fault::DisconnectAfter { bytes, .. } => {
                let _ = stream.write_all(&payload[..bytes.min(payload.len())]);
                let _ = stream.shutdown(std::net::Shutdown::Both);
                return;
            }
            Fault::ShortBody { .. } => {
                let _ = stream.write_all(payload);
                let _ = stream.shutdown(std::net::Shutdown::Both);
                return;
            }
            Fault::Drip { every } => {
                for byte in payload.chunks(1) {
                    if stream
                        .write_all(byte)
                        .and_then(|()| stream.flush())
                        .is_err()
                    {
                        return;
                    }
                    std::thread::sleep(every);
                }
            }
            Fault::Slow { chunk, delay } => {
                for piece in payload.chunks(chunk) {
                    if stream.write_all(piece).is_err() {
                        return;
                    }
                    let _ = stream.flush();
                    std::thread::sleep(delay);
                }
            }
            _ => {
                if stream.write_all(payload).is_err() {
                    return;
                }
            }
        }
    }
}

/// The fault to apply to this request; counted faults are used up.
fn take_fault(f: &mut Fault) -> Fault {
    match f {
        Fault::DisconnectAfter { times, .. }
        | Fault::ShortBody { times, .. }
        | Fault::Status { times, .. } => {
            if *times == 0 {
                return Fault::None;
            }
            *times -= 1;
            f.clone()
        }
        other => other.clone(),
    }
}

/// Deterministic pseudo-random bytes.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    Rng::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)).bytes(len)
}

pub fn sha256(b: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

/// The real binary, with a state dir (and an optional config file).
pub struct Cli {
    pub state: PathBuf,
    pub config: Option<PathBuf>,
}

impl Cli {
    pub fn new(state: &Path) -> Self {
        Cli {
            state: state.to_path_buf(),
            config: None,
        }
    }

    pub fn command(&self, args: &[&str]) -> Command {
        // COCOON_HOST_BIN runs the tests against another build (to show
        // that a test fails without the fix it covers).
        let bin = std::env::var_os("COCOON_HOST_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_cocoon-host").into());
        let mut c = Command::new(bin);
        c.arg("--state-dir").arg(&self.state);
        match &self.config {
            Some(p) => c.arg("--config").arg(p),
            None => c.arg("--config").arg("/dev/null"),
        };
        c.args(args);
        c.env_remove("RUST_LOG");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs and parses `-o json` output; panics with stderr on failure.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let out = self.run(&a);
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
    }
}

/// Whether a test needing an external tool runs: in CI (`CI` set) a
/// missing tool is a failure; elsewhere the test is skipped with a reason.
pub fn require_tool(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{tool} is required in CI (scripts/install-deps installs it)");
    }
    skip(
        &test_name(),
        &format!("{tool} is not installed (scripts/install-deps installs it)"),
    );
    false
}

/// An error and its causes on one line, as the CLI prints them.
#[allow(unused_imports)]
pub use cocoon_host::store::chain;
