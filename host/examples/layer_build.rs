//! Builds the read-only layer of one layer tar, as `run` does, and prints
//! how long it took: the benchmark's driver (scripts/bench-layers).
//!
//!     layer_build STATE_DIR LAYER_FILE [ROUNDS]
//!
//! The layer file (plain, gzip or zstd tar) is put in the store of
//! STATE_DIR once; each round removes the built layer (untimed) and times
//! `cocoon_host::layer::prepare` from the verified blob to the squashfs
//! renamed into the cache. Prints one line per round: `seconds bytes`.

use std::path::PathBuf;
use std::time::Instant;

use cocoon_host::config::HostConfig;
use cocoon_host::plugin::{Registry, Runtime};
use cocoon_host::store::index::RefRecord;
use cocoon_host::store::{PluginSources, PullPolicy, PullRequest, Quiet, Store};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, state, layer, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: layer_build STATE_DIR LAYER_FILE [ROUNDS]");
    };
    let rounds: usize = rest.first().map_or(Ok(1), |r| r.parse())?;
    let config = HostConfig::at(&PathBuf::from(state));
    let store = Store::open(&config)?;
    let runtime = Runtime::new(Some(config.state_dir.join("plugin-cache")))?;
    let registry = Registry::discover(&config);
    let sources = PluginSources {
        runtime: &runtime,
        registry: &registry,
    };
    let pull = |reference: &str| {
        store.pull(
            &sources,
            &PullRequest {
                reference: reference.into(),
                digest: None,
                policy: PullPolicy::Missing,
                force: false,
            },
            &Quiet,
        )
    };
    let config_file = config.state_dir.join("config.json");
    std::fs::write(&config_file, b"{}")?;
    let mut config_art = pull(&config_file.display().to_string())?.record.artifacts[0].clone();
    config_art.media_type = "application/vnd.oci.image.config.v1+json".into();
    let mut layer_art = pull(layer)?.record.artifacts[0].clone();
    layer_art.media_type = "application/vnd.oci.image.layer.v1.tar".into();
    let image = RefRecord {
        reference: format!("bench:{layer}"),
        source: "bench".into(),
        pulled_at: 0,
        artifacts: vec![config_art, layer_art.clone()],
    };
    let built_dir = store.layout().converted_dir().join(layer_art.digest.hex());
    for _ in 0..rounds {
        let _ = std::fs::remove_dir_all(&built_dir);
        let start = Instant::now();
        let p = cocoon_host::layer::prepare(&store, &image, &runtime, &registry)
            .map_err(|e| anyhow::anyhow!(cocoon_host::error_chain(&e)))?;
        let secs = start.elapsed().as_secs_f64();
        println!("{secs:.3} {}", p.built[0].image.size);
    }
    Ok(())
}
