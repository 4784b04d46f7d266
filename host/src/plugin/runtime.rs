//! The wasm engine: configuration, the epoch ticker that enforces call
//! deadlines, loading (cache, import allowlist, export check) and fresh
//! stores per invocation.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::Linker;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap};

use super::api::{self, ApiVersion, KindPre, HOST_API};
use super::cache::{CompiledCache, Embedded, Origin};
use super::engine_settings;
use super::error::PluginError;
use super::fetch::{Fetcher, HostPattern};
use super::imports;
use super::limits::Limits;
use super::manifest::PluginKind;
use super::state::State;

/// Epoch granularity: deadlines are enforced to within one tick.
const TICK: Duration = Duration::from_millis(5);

/// Counters the runtime exposes (tests and `plugin inspect` read them).
#[derive(Debug, Default)]
pub struct RuntimeStats {
    /// Components compiled from wasm.
    pub compiled: AtomicU64,
    /// Components deserialised from the compiled cache.
    pub cache_hits: AtomicU64,
    /// Components deserialised from the code embedded in the binary.
    pub embedded: AtomicU64,
    /// Stores created (one per invocation or session).
    pub instantiations: AtomicU64,
}

/// Everything the host decided about one plugin before loading it.
#[derive(Debug, Clone)]
pub struct PluginSpec {
    pub name: String,
    pub kind: PluginKind,
    pub limits: Limits,
    /// The operator's key/values for this plugin.
    pub config: BTreeMap<String, String>,
    /// Hosts the plugin may fetch from (declared AND granted).
    pub fetch_hosts: Vec<HostPattern>,
}

/// Increments the engine's epoch every tick until dropped.
///
/// Dropping it wakes the thread at once (its channel closes) and does not
/// wait for it to exit: a sleeping thread that must first be scheduled
/// again cost every short command 5 to 20 ms at exit on a busy machine
/// (`scripts/bench-convert`'s 1 MiB row). The thread holds only an engine
/// handle and stops within one wake-up.
struct EpochTicker {
    _stop: mpsc::Sender<()>,
}

impl EpochTicker {
    fn start(engine: Engine) -> Result<Self, PluginError> {
        let (stop, stopped) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("cocoon-epoch".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(TICK) {
                    engine.increment_epoch();
                }
            })
            .map_err(|e| PluginError::Engine(format!("spawning the epoch ticker: {e}")))?;
        Ok(EpochTicker { _stop: stop })
    }
}

/// The plugin runtime. One per process; cheap to share by reference.
pub struct Runtime {
    engine: Engine,
    linker: Linker<State>,
    cache: CompiledCache,
    stats: Arc<RuntimeStats>,
    _ticker: EpochTicker,
}

fn engine_err(e: impl std::fmt::Debug) -> PluginError {
    PluginError::Engine(format!("{e:?}"))
}

/// How a runtime is set up.
#[derive(Debug, Clone, Default)]
pub struct RuntimeOptions {
    /// Where compiled components are cached (none: compiled on every load,
    /// unless embedded).
    pub cache_dir: Option<PathBuf>,
    /// Plugin instances the caller keeps alive at once (a conversion: one
    /// per decode worker and image of the chain); the instance pool is
    /// sized for it. 0: one per core.
    pub concurrency: usize,
}

/// Instances beyond the caller's concurrency: image sessions, probes and
/// the calls of whatever else runs in the process.
const SPARE_INSTANCES: u32 = 32;
/// Core instances, memories and tables per component instance. A Rust
/// wasip2 component has its module, the WASI adapter and the component
/// model's shims: four core instances, two memories and two tables.
const CORE_INSTANCES_PER_COMPONENT: u32 = 4;
const MEMORIES_PER_COMPONENT: u32 = 2;
const TABLES_PER_COMPONENT: u32 = 2;

/// The component instances a pool holds for `concurrency` live instances.
pub fn pool_size(concurrency: usize) -> u32 {
    let concurrency = match concurrency {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    u32::try_from(concurrency)
        .unwrap_or(u32::MAX)
        .saturating_add(SPARE_INSTANCES)
}

impl Runtime {
    /// A runtime caching compiled components in `cache_dir` (none: always
    /// compile), with a pool for one instance per core.
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Self, PluginError> {
        Self::with_options(RuntimeOptions {
            cache_dir,
            concurrency: 0,
        })
    }

    pub fn with_options(options: RuntimeOptions) -> Result<Self, PluginError> {
        let mut config = Config::new();
        engine_settings::apply(&mut config);
        let instances = pool_size(options.concurrency);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(instances)
            .total_core_instances(instances.saturating_mul(CORE_INSTANCES_PER_COMPONENT))
            .total_memories(instances.saturating_mul(MEMORIES_PER_COMPONENT))
            .total_tables(instances.saturating_mul(TABLES_PER_COMPONENT))
            // Execution stacks are for async calls, which plugins never
            // make (concurrency support is off). The default of 1000
            // reserves 2 GiB and makes 1000 guard pages, one mprotect
            // each: the largest fixed cost of a short command (15% of the
            // CPU time of converting a 1 MiB image).
            .total_stacks(0)
            .max_memory_size(4 << 30);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(engine_err)?;
        let mut linker = Linker::new(&engine);
        api::add_to_linker(&mut linker).map_err(engine_err)?;
        let cache = CompiledCache::new(&engine, options.cache_dir);
        Ok(Runtime {
            _ticker: EpochTicker::start(engine.clone())?,
            engine,
            linker,
            cache,
            stats: Arc::default(),
        })
    }

    /// The key compiled artifacts of this runtime's engine go by.
    pub fn engine_key(&self) -> &str {
        self.cache.engine_key()
    }

    pub fn stats(&self) -> &RuntimeStats {
        &self.stats
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Compiles (or loads from the cache) `wasm`, checks its imports
    /// against the allowlist of `spec.kind` and its exports against the
    /// kind's world, and prepares it for instantiation.
    pub fn load(
        &self,
        spec: PluginSpec,
        wasm: &[u8],
        sha256: &str,
    ) -> Result<LoadedPlugin, PluginError> {
        self.load_with(spec, wasm, sha256, None)
    }

    /// [`Self::load`], using `embedded` compiled code when this engine can.
    pub fn load_with(
        &self,
        spec: PluginSpec,
        wasm: &[u8],
        sha256: &str,
        embedded: Option<Embedded>,
    ) -> Result<LoadedPlugin, PluginError> {
        let name = spec.name.clone();
        let (component, origin) = self
            .cache
            .load(&self.engine, sha256, wasm, embedded)
            .map_err(|detail| PluginError::Compile {
                plugin: name.clone(),
                detail,
            })?;
        match origin {
            Origin::Compiled => self.stats.compiled.fetch_add(1, Ordering::Relaxed),
            Origin::Cached => self.stats.cache_hits.fetch_add(1, Ordering::Relaxed),
            Origin::Embedded => self.stats.embedded.fetch_add(1, Ordering::Relaxed),
        };
        let ty = component.component_type();
        let import_names: Vec<String> = ty
            .imports(&self.engine)
            .map(|(n, _)| n.to_string())
            .collect();
        let export_names: Vec<String> = ty
            .exports(&self.engine)
            .map(|(n, _)| n.to_string())
            .collect();
        let api = plugin_api(&name, spec.kind, &import_names, &export_names)?;
        for import in &import_names {
            if let Some(reason) = imports::refusal(spec.kind, api, import) {
                return Err(PluginError::ImportRefused {
                    plugin: name,
                    import: import.clone(),
                    reason,
                });
            }
        }
        let pre =
            self.linker
                .instantiate_pre(&component)
                .map_err(|e| PluginError::Instantiate {
                    plugin: name.clone(),
                    detail: format!("{e:#}"),
                })?;
        let pre = KindPre::new(spec.kind, api, pre).map_err(|e| PluginError::WrongExports {
            plugin: name.clone(),
            kind: spec.kind.as_str(),
            detail: format!("{e:#}"),
        })?;
        Ok(LoadedPlugin {
            name: name.as_str().into(),
            config: Arc::new(spec.config.clone()),
            spec,
            pre,
            origin,
            api,
            imports: import_names,
            exports: export_names,
            engine: self.engine.clone(),
            stats: self.stats.clone(),
        })
    }
}

/// The plugin API version a component was built against: that of the
/// interface its kind exports (or, when it exports none, of its first
/// cocoon:plugin import), refused unless this host loads that version for
/// the kind.
fn plugin_api(
    plugin: &str,
    kind: PluginKind,
    imports: &[String],
    exports: &[String],
) -> Result<ApiVersion, PluginError> {
    let wanted = api::export_interface(kind);
    let found = exports
        .iter()
        .find(|e| e.split('@').next() == Some(wanted))
        .or_else(|| imports.iter().find(|i| i.starts_with("cocoon:plugin/")));
    let Some(name) = found else {
        return Err(PluginError::WrongExports {
            plugin: plugin.to_string(),
            kind: kind.as_str(),
            detail: format!("no export of {wanted}"),
        });
    };
    let version = ApiVersion::of_wit_name(name);
    match version {
        Some(v) if v.supported_for(kind) => Ok(v),
        _ => Err(PluginError::ApiVersion {
            plugin: plugin.to_string(),
            kind: kind.as_str(),
            plugin_api: name
                .split_once('@')
                .map_or("(unversioned)", |(_, v)| v)
                .to_string(),
            host_api: HOST_API.to_string(),
            supported: ApiVersion::supported_text(kind),
        }),
    }
}

/// A compiled, checked plugin, ready for invocations. Cloning is cheap: the
/// compiled code is shared.
#[derive(Clone)]
pub struct LoadedPlugin {
    pub(crate) name: Arc<str>,
    pub(crate) spec: PluginSpec,
    config: Arc<BTreeMap<String, String>>,
    pub(crate) pre: KindPre,
    origin: Origin,
    api: ApiVersion,
    imports: Vec<String>,
    exports: Vec<String>,
    engine: Engine,
    stats: Arc<RuntimeStats>,
}

impl LoadedPlugin {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn kind(&self) -> PluginKind {
        self.spec.kind
    }

    pub fn limits(&self) -> Limits {
        self.spec.limits
    }

    /// The plugin API version the component was built against.
    pub fn api(&self) -> ApiVersion {
        self.api
    }

    /// Whether this load deserialised a cached component.
    pub fn from_cache(&self) -> bool {
        self.origin == Origin::Cached
    }

    /// Whether this load used the compiled code embedded in the binary.
    pub fn from_embedded(&self) -> bool {
        self.origin == Origin::Embedded
    }

    pub fn imports(&self) -> &[String] {
        &self.imports
    }

    pub fn exports(&self) -> &[String] {
        &self.exports
    }

    /// The same compiled plugin, allowed to fetch from `hosts` as well as
    /// from its declared-and-granted hosts. The image store uses it to let
    /// a first-party source reach exactly the server a reference names
    /// (`oci://HOST[:PORT]/…`) for the one resolve of that reference.
    pub fn with_fetch_hosts(&self, hosts: &[HostPattern]) -> LoadedPlugin {
        let mut plugin = self.clone();
        for h in hosts {
            if !plugin.spec.fetch_hosts.contains(h) {
                plugin.spec.fetch_hosts.push(h.clone());
            }
        }
        plugin
    }

    pub(crate) fn expect_kind(&self, wanted: PluginKind) -> Result<(), PluginError> {
        if self.spec.kind == wanted {
            Ok(())
        } else {
            Err(PluginError::WrongKind {
                plugin: self.name.to_string(),
                wanted: wanted.as_str(),
                actual: self.spec.kind.as_str(),
            })
        }
    }

    /// A fresh store for one invocation: nothing survives from the last
    /// one, so a trap never leaves state behind.
    pub(crate) fn new_store(&self) -> Store<State> {
        self.stats.instantiations.fetch_add(1, Ordering::Relaxed);
        let fetcher = (self.spec.kind == PluginKind::ImageSource
            && !self.spec.fetch_hosts.is_empty())
        .then(|| {
            Fetcher::new(
                &self.name,
                self.spec.fetch_hosts.clone(),
                Instant::now() + self.spec.limits.deadline,
            )
        });
        let state = State::new(
            self.name.clone(),
            self.spec.limits.memory_bytes,
            self.config.clone(),
            fetcher,
        );
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        self.arm_deadline(&mut store);
        store
    }

    /// Gives the next call a full deadline.
    pub(crate) fn arm_deadline(&self, store: &mut Store<State>) {
        let ticks = u64::try_from(
            self.spec
                .limits
                .deadline
                .as_micros()
                .div_ceil(TICK.as_micros()),
        )
        .unwrap_or(u64::MAX)
        .saturating_add(1);
        store.set_epoch_deadline(ticks);
    }

    /// Runs one call into the plugin under its deadline and turns a failure
    /// into an error that names the plugin and the call.
    pub(crate) fn call<T>(
        &self,
        store: &mut Store<State>,
        call: &str,
        f: impl FnOnce(&mut Store<State>) -> wasmtime::Result<T>,
    ) -> Result<T, PluginError> {
        self.arm_deadline(store);
        let result = f(store);
        store.data().flush_stdio();
        result.map_err(|e| self.classify(store, call, e))
    }

    fn classify(&self, store: &Store<State>, call: &str, e: wasmtime::Error) -> PluginError {
        let plugin = self.name.to_string();
        let call = call.to_string();
        if store.data().limiter.exceeded {
            return PluginError::MemoryLimit {
                plugin,
                call,
                limit_mib: self.spec.limits.memory_mib(),
            };
        }
        if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            return PluginError::Deadline {
                plugin,
                call,
                deadline_ms: u64::try_from(self.spec.limits.deadline.as_millis())
                    .unwrap_or(u64::MAX),
            };
        }
        let mut detail = match e.downcast_ref::<Trap>() {
            Some(trap) => trap.to_string(),
            None => format!("{e:#}"),
        };
        if let Some(last) = store.data().last_stderr() {
            detail.push_str(&format!(" (stderr: {last})"));
        }
        PluginError::Trap {
            plugin,
            call,
            detail,
        }
    }
}
