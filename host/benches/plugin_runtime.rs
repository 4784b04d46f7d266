//! Plugin runtime costs: cold compile, cached load, instantiate, a warm
//! no-op call and a 64 KiB list<u8> round trip. Each line prints the
//! measurement, the goal from the foundation issue, and the ratio to an
//! anchor measured in the same run (the same work done natively).
//!
//! Run: cargo bench -p cocoon-host --bench plugin_runtime

use std::hint::black_box;
use std::time::{Duration, Instant};

use cocoon_host::config::HostConfig;
use cocoon_host::plugin::calls::Compressed;
use cocoon_host::plugin::registry::{sha256_hex, Registry};
use cocoon_host::plugin::Runtime;

/// Median time per iteration over `rounds` rounds of `iters` iterations.
fn per_iter(rounds: usize, iters: u32, mut f: impl FnMut()) -> Duration {
    let mut samples: Vec<Duration> = (0..rounds)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..iters {
                f();
            }
            start.elapsed() / iters
        })
        .collect();
    samples.sort();
    samples[rounds / 2]
}

fn show(name: &str, took: Duration, goal: Option<Duration>, anchor: (&str, Duration)) {
    let goal = match goal {
        Some(g) => format!(
            "goal < {:>9.3?}  {}",
            g,
            if took < g { "met" } else { "MISSED" }
        ),
        None => "no goal".to_string(),
    };
    let ratio = took.as_secs_f64() / anchor.1.as_secs_f64().max(1e-12);
    println!(
        "{name:<28} {took:>11.3?}   {goal:<26} {ratio:>10.3}x {} ({:.3?})",
        anchor.0, anchor.1
    );
}

fn main() {
    let tmp = tempfile::tempdir().unwrap();
    let config = HostConfig::at(tmp.path());
    let registry = Registry::discover(&config);
    let info = registry.get("raw-converter").unwrap();
    let wasm = info.wasm().unwrap();
    let sha = sha256_hex(&wasm);
    let spec = info.spec();
    println!("plugin raw-converter: {} bytes of wasm", wasm.len());

    // Anchor for loading: hashing the wasm, which every load does anyway.
    let hash = per_iter(9, 100, || {
        black_box(sha256_hex(black_box(&wasm)));
    });

    let rt = Runtime::new(None).unwrap();
    let cold = per_iter(5, 1, || {
        black_box(rt.load(spec.clone(), &wasm, &sha).unwrap());
    });
    show("cold compile", cold, None, ("sha256 of the wasm", hash));

    let cache = tmp.path().join("cache");
    let rt = Runtime::new(Some(cache)).unwrap();
    rt.load(spec.clone(), &wasm, &sha).unwrap();
    let cached = per_iter(9, 20, || {
        black_box(rt.load(spec.clone(), &wasm, &sha).unwrap());
    });
    show("cached load", cached, None, ("cold compile", cold));

    let plugin = rt.load(spec.clone(), &wasm, &sha).unwrap();
    let inst = per_iter(9, 500, || {
        black_box(plugin.converter_instance().unwrap());
    });
    show(
        "instantiate (store+drop)",
        inst,
        None,
        ("cached load", cached),
    );
    show(
        "cached load + instantiate",
        cached + inst,
        Some(Duration::from_millis(5)),
        ("cold compile", cold),
    );

    // Anchor for calls: a native function call that cannot be inlined.
    let native_call = per_iter(9, 1_000_000, || {
        black_box(black_box(u64::checked_add as fn(u64, u64) -> Option<u64>)(
            1, 2,
        ));
    });
    let img = tmp.path().join("disk.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let mut session = plugin.open_image(&img, "raw").unwrap();
    let warm = per_iter(9, 100_000, || {
        black_box(session.backing().unwrap());
    });
    show(
        "warm no-op call",
        warm,
        Some(Duration::from_micros(2)),
        ("native call", native_call),
    );

    let data: Vec<u8> = (0..65536u32).map(|i| (i * 7).to_le_bytes()[0]).collect();
    let native_copy = per_iter(9, 10_000, || {
        black_box(black_box(&data).to_vec());
    });
    let mut warm_conv = plugin.converter_instance().unwrap();
    let extent = Compressed {
        source_offset: 0,
        source_length: 65536,
        codec: 0,
    };
    let rt64 = per_iter(9, 5_000, || {
        black_box(warm_conv.decode(extent, &data, 65536).unwrap());
    });
    show(
        "64 KiB list<u8> round trip",
        rt64,
        Some(Duration::from_micros(20)),
        ("native 64 KiB copy", native_copy),
    );
}
