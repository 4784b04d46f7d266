//! An image source that misbehaves on request: the reference names the
//! misbehaviour. The sandbox tests call it and check the host survives.

use cocoon_plugin_sdk::image_source::*;

struct Hostile;

/// The report travels in media_type: the host checks that URLs parse.
fn artifact(report: String) -> Vec<Artifact> {
    vec![Artifact {
        url: "https://example.com/report".into(),
        digest: None,
        size: None,
        media_type: report,
        format_hint: None,
        headers: Vec::new(),
    }]
}

impl ImageSource for Hostile {
    fn schemes() -> Vec<String> {
        // The `schemes` setting, comma-separated, lets a test make it claim
        // schemes the host must refuse.
        match config_get("schemes") {
            Some(list) => list.split(',').map(Into::into).collect(),
            None => vec!["hostile".into()],
        }
    }

    fn resolve(reference: &str, _platform: Platform) -> Result<Vec<Artifact>, Error> {
        match reference {
            "ok" => Ok(artifact("ok".into())),
            "loop" => {
                // Volatile so the optimiser keeps a loop that never ends.
                let mut n = 0u64;
                loop {
                    // SAFETY: `n` is a live, aligned local read through a
                    // reference; volatile only keeps the read.
                    n = unsafe { core::ptr::read_volatile(&n) }.wrapping_add(1);
                }
            }
            "bomb" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![0xa5; 1 << 20]);
                }
            }
            "panic" => panic!("hostile plugin panics on purpose"),
            "trap" => core::arch::wasm32::unreachable(),
            "passwd" => match std::fs::read_to_string("/etc/passwd") {
                Ok(text) => Ok(artifact(text)),
                Err(e) => Err(Error::io(format!("reading /etc/passwd: {e}"))),
            },
            "env" => Ok(artifact(format!(
                "{:?}",
                std::env::vars().collect::<Vec<_>>()
            ))),
            "stderr" => {
                eprintln!("hostile says hello on stderr");
                Ok(artifact("stderr".into()))
            }
            "config" => Ok(config()
                .into_iter()
                .flat_map(|(k, v)| artifact(format!("{k}={v}")))
                .collect()),
            other => {
                if let Some(url) = other.strip_prefix("fetch:") {
                    let response = get(url, &[], 1 << 20)?;
                    Ok(artifact(format!(
                        "{} {}",
                        response.status,
                        String::from_utf8_lossy(&response.body)
                    )))
                } else if let Some(n) = other.strip_prefix("log:") {
                    let n: u32 = n.parse().map_err(|_| Error::invalid_input("log:N"))?;
                    for i in 0..n {
                        log(LogLevel::Info, "spam", &[("i", &i.to_string())]);
                    }
                    Ok(Vec::new())
                } else {
                    Err(Error::unsupported(format!(
                        "unknown misbehaviour {other:?}"
                    )))
                }
            }
        }
    }
}

cocoon_plugin_sdk::export_image_source!(Hostile);
