//! What one store holds: a WASI context with nothing granted, the resource
//! table, the memory limiter, the plugin's config, its fetch policy, and
//! the sinks that turn its log records and stderr into host log lines.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use wasmtime::component::{Resource, ResourceTable};
use wasmtime::ResourceLimiter;
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::image_source::cocoon::plugin::{fetch, host};
use super::bindings::{format_converter, ErrorKind, WitError};
use super::fetch::Fetcher;
use super::source::{SourceFile, MAX_READ};

/// Log records one store may write before the rest are dropped.
const LOG_BUDGET: u32 = 1000;
/// Bytes of one log message or stderr line kept.
const MAX_LOG_LINE: usize = 4096;
/// Bytes of stdout/stderr one store may write into the host log.
const STDIO_BUDGET: usize = 64 << 10;
/// Resources (sources, streams) one store may hold at once.
const MAX_RESOURCES: usize = 256;
/// Table elements one instance may grow to.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Caps linear memory and remembers whether the cap was hit, so the trap
/// that follows is reported as a memory limit, not a crash.
pub struct MemoryCap {
    limit: usize,
    pub exceeded: bool,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.exceeded = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// The data of one store.
pub struct State {
    plugin: Arc<str>,
    wasi: WasiCtx,
    table: ResourceTable,
    pub limiter: MemoryCap,
    config: Arc<BTreeMap<String, String>>,
    fetcher: Option<Fetcher>,
    log_budget: u32,
    stdio: Vec<StdioSink>,
}

impl State {
    pub fn new(
        plugin: Arc<str>,
        memory_bytes: u64,
        config: Arc<BTreeMap<String, String>>,
        fetcher: Option<Fetcher>,
    ) -> Self {
        let stdout = StdioSink::new(plugin.clone(), "stdout");
        let stderr = StdioSink::new(plugin.clone(), "stderr");
        // Nothing is granted: no preopens, no environment, no arguments, no
        // network (the default socket check denies every address, and the
        // import allowlist refuses wasi:sockets before we get here), stdin
        // closed. Output goes to the host log under the plugin's name.
        let wasi = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_ip_name_lookup(false)
            .allow_tcp(false)
            .allow_udp(false)
            .build();
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCES);
        State {
            plugin,
            wasi,
            table,
            limiter: MemoryCap {
                limit: usize::try_from(memory_bytes).unwrap_or(usize::MAX),
                exceeded: false,
            },
            config,
            fetcher,
            log_budget: LOG_BUDGET,
            stdio: vec![stdout, stderr],
        }
    }

    /// Hands a source file to the plugin as a `source` resource.
    pub fn push_source(&mut self, src: SourceFile) -> wasmtime::Result<Resource<SourceFile>> {
        Ok(self.table.push(src)?)
    }

    /// The last lines the plugin wrote to stderr.
    pub fn last_stderr(&self) -> Option<String> {
        self.stdio[1].last()
    }

    /// Writes out any partial line the plugin left on stdout/stderr.
    pub fn flush_stdio(&self) {
        for s in &self.stdio {
            s.flush();
        }
    }
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl host::Host for State {
    fn log(&mut self, level: host::LogLevel, message: String, fields: Vec<(String, String)>) {
        if self.log_budget == 0 {
            return;
        }
        self.log_budget -= 1;
        let plugin = &*self.plugin;
        let message = truncate(&message, MAX_LOG_LINE);
        let fields: Vec<(&str, &str)> = fields
            .iter()
            .take(32)
            .map(|(k, v)| (truncate(k, 64), truncate(v, 512)))
            .collect();
        match level {
            host::LogLevel::Trace => tracing::trace!(plugin, ?fields, "{message}"),
            host::LogLevel::Debug => tracing::debug!(plugin, ?fields, "{message}"),
            host::LogLevel::Info => tracing::info!(plugin, ?fields, "{message}"),
            host::LogLevel::Warn => tracing::warn!(plugin, ?fields, "{message}"),
            host::LogLevel::Error => tracing::error!(plugin, ?fields, "{message}"),
        }
        if self.log_budget == 0 {
            tracing::warn!(
                plugin,
                "log budget of {LOG_BUDGET} records spent; dropping the rest"
            );
        }
    }

    fn config(&mut self) -> Vec<(String, String)> {
        self.config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn config_get(&mut self, key: String) -> Option<String> {
        self.config.get(&key).cloned()
    }
}

impl super::bindings::image_source::cocoon::plugin::types::Host for State {}

impl fetch::Host for State {
    fn fetch(&mut self, req: fetch::Request) -> Result<fetch::Response, WitError> {
        match &self.fetcher {
            Some(f) => f.fetch(req),
            None => Err(WitError::new(
                ErrorKind::InvalidInput,
                format!(
                    "fetch of {} denied: this plugin was granted no hosts",
                    req.url
                ),
            )),
        }
    }
}

impl format_converter::cocoon::plugin::source::Host for State {
    fn max_read(&mut self) -> u32 {
        MAX_READ
    }
}

impl format_converter::cocoon::plugin::source::HostSource for State {
    fn size(&mut self, this: Resource<SourceFile>) -> u64 {
        self.table.get(&this).map(|s| s.size()).unwrap_or(0)
    }

    fn read_at(
        &mut self,
        this: Resource<SourceFile>,
        offset: u64,
        len: u32,
    ) -> Result<Vec<u8>, WitError> {
        match self.table.get(&this) {
            Ok(s) => s.read_at(offset, len),
            Err(e) => Err(WitError::new(ErrorKind::Internal, e.to_string())),
        }
    }

    fn drop(&mut self, this: Resource<SourceFile>) -> wasmtime::Result<()> {
        self.table.delete(this)?;
        Ok(())
    }
}

/// A plugin's stdout or stderr: complete lines go to the host log under
/// the plugin's name, within a byte budget; the rest is dropped silently so
/// a chatty plugin cannot fill the host's log or make writes fail.
#[derive(Clone)]
struct StdioSink {
    inner: Arc<Mutex<SinkInner>>,
}

struct SinkInner {
    plugin: Arc<str>,
    stream: &'static str,
    line: Vec<u8>,
    budget: usize,
    /// The last lines written, for trap messages (a panic prints there).
    last: std::collections::VecDeque<String>,
}

impl StdioSink {
    fn new(plugin: Arc<str>, stream: &'static str) -> Self {
        StdioSink {
            inner: Arc::new(Mutex::new(SinkInner {
                plugin,
                stream,
                line: Vec::new(),
                budget: STDIO_BUDGET,
                last: Default::default(),
            })),
        }
    }

    fn last(&self) -> Option<String> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        (!g.last.is_empty()).then(|| Vec::from(g.last.clone()).join(" / "))
    }

    fn flush(&self) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.emit();
    }
}

impl SinkInner {
    fn write(&mut self, bytes: &[u8]) {
        let take = bytes.len().min(self.budget);
        self.budget -= take;
        for &b in &bytes[..take] {
            if b == b'\n' {
                self.emit();
            } else if self.line.len() < MAX_LOG_LINE {
                self.line.push(b);
            }
        }
    }

    fn emit(&mut self) {
        if self.line.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(&self.line);
        tracing::warn!(plugin = %self.plugin, stream = self.stream, "{text}");
        // Rust's hint about RUST_BACKTRACE says nothing about the failure.
        if !text.starts_with("note: run with `RUST_BACKTRACE") {
            if self.last.len() == 2 {
                self.last.pop_front();
            }
            self.last.push_back(text.into_owned());
        }
        self.line.clear();
    }
}

impl wasmtime_wasi::cli::IsTerminal for StdioSink {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for StdioSink {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        // Only WASI 0.3 components use this; they are refused at load.
        Box::new(tokio::io::sink())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for StdioSink {
    async fn ready(&mut self) {}
}

impl OutputStream for StdioSink {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 << 10)
    }
}
