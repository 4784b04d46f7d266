//! Shared test helpers: plugin paths (first-party, and the fixtures of
//! tests/plugins, built here on first use), a loopback HTTP server, log
//! capture.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

#[allow(unused_imports)]
pub use cocoon_format_common::test_support::{skip, test_name, Rng};

/// A first-party plugin (built-in or example) by crate name, as the host's
/// build made it.
pub fn wasm(crate_name: &str) -> PathBuf {
    PathBuf::from(env!("COCOON_FIRST_PARTY_WASM_DIR"))
        .join(format!("{}.wasm", crate_name.replace('-', "_")))
}

/// The cargo target directory this test binary was built in
/// (`<target>/release/deps/<test>`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors().nth(3).unwrap().to_path_buf()
}

/// A fixture plugin of tests/plugins (hostile plugins, plugins of other
/// API versions, bad policies) by crate name. The fixture workspace is
/// built for wasm32-wasip2 once per test process into
/// `<target>/wasm-fixtures`, where cargo keeps it between runs.
pub fn fixture(crate_name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let target = target_dir().join("wasm-fixtures");
            let manifest =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/plugins/Cargo.toml");
            build_wasm(&manifest, &target, &[]);
            target.join("wasm32-wasip2/release")
        })
        .join(format!("{}.wasm", crate_name.replace('-', "_")))
}

/// `cargo build --release --target wasm32-wasip2` of `manifest` into
/// `target`, with none of this process's cargo flags leaking in.
pub fn build_wasm(manifest: &Path, target: &Path, extra: &[&str]) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--release",
        "--quiet",
        "--target",
        "wasm32-wasip2",
        "--manifest-path",
    ])
    .arg(manifest)
    .arg("--target-dir")
    .arg(target)
    .args(extra);
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("running cargo");
    assert!(status.success(), "building {} failed", manifest.display());
}

/// One canned answer of the test server.
#[derive(Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn ok(body: impl Into<Vec<u8>>) -> Self {
        Reply {
            status: 200,
            headers: Vec::new(),
            body: body.into(),
        }
    }
    pub fn redirect(to: &str) -> Self {
        Reply {
            status: 302,
            headers: vec![("Location".into(), to.into())],
            body: Vec::new(),
        }
    }
}

/// A loopback HTTP/1.1 server answering GETs by path from a table, and
/// counting requests per path.
pub struct TestServer {
    pub port: u16,
    pub hits: Arc<Mutex<HashMap<String, usize>>>,
}

impl TestServer {
    pub fn start(routes: Vec<(&str, Reply)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let routes: HashMap<String, Reply> = routes
            .into_iter()
            .map(|(p, r)| (p.to_string(), r))
            .collect();
        let hits: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let h = hits.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let routes = routes.clone();
                let h = h.clone();
                std::thread::spawn(move || serve(stream, &routes, &h));
            }
        });
        TestServer { port, hits }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

fn serve(stream: TcpStream, routes: &HashMap<String, Reply>, hits: &Mutex<HashMap<String, usize>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
    }
    *hits.lock().unwrap().entry(path.clone()).or_default() += 1;
    let reply = routes.get(&path).cloned().unwrap_or(Reply {
        status: 404,
        headers: Vec::new(),
        body: b"not found".to_vec(),
    });
    let mut out = format!(
        "HTTP/1.1 {} X\r\nContent-Length: {}\r\nConnection: close\r\n",
        reply.status,
        reply.body.len()
    );
    for (k, v) in &reply.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut stream = stream;
    let _ = stream.write_all(out.as_bytes());
    let _ = stream.write_all(&reply.body);
}

/// Runs `f` and returns what it logged on this thread. One global
/// subscriber writes every record into the buffer of the thread that made
/// it: scoped subscribers (`with_default`) race with each other over
/// tracing's global interest cache when tests run in parallel.
pub fn capture_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
    thread_local! {
        static BUF: std::cell::RefCell<Option<Vec<u8>>> = const { std::cell::RefCell::new(None) };
    }
    struct ThreadBuf;
    impl Write for ThreadBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            BUF.with(|buf| {
                if let Some(buf) = buf.borrow_mut().as_mut() {
                    buf.extend_from_slice(b);
                }
            });
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    static GLOBAL: OnceLock<()> = OnceLock::new();
    GLOBAL.get_or_init(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(|| ThreadBuf)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
    });
    BUF.with(|b| *b.borrow_mut() = Some(Vec::new()));
    let out = f();
    let bytes = BUF.with(|b| b.borrow_mut().take()).unwrap_or_default();
    (out, String::from_utf8(bytes).unwrap())
}
