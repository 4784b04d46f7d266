//! An image source built against the frozen 0.1.0 contract (wit/v0.1.0),
//! without the SDK, as a plugin from before 0.2 was. The host must keep
//! loading it, with every 0.1 host import it uses (log, config, fetch).

wit_bindgen::generate!({
    world: "image-source",
    path: "../../../wit/v0.1.0",
});

use cocoon::plugin::host::{config_get, log, LogLevel};
use cocoon::plugin::types::Error;
use exports::cocoon::plugin::resolver::{Artifact, Guest, Platform};

struct LegacySource;

impl Guest for LegacySource {
    fn schemes() -> Vec<String> {
        vec!["legacy".into()]
    }

    fn resolve(reference: String, platform: Platform) -> Result<Vec<Artifact>, Error> {
        log(LogLevel::Info, "legacy source resolving", &[]);
        if let Some(url) = reference.strip_prefix("fetch:") {
            let r = cocoon::plugin::fetch::fetch(&cocoon::plugin::fetch::Request {
                method: cocoon::plugin::fetch::Method::Get,
                url: url.into(),
                headers: Vec::new(),
                max_bytes: 1 << 20,
                follow_redirects: true,
            })?;
            return Ok(vec![artifact(
                format!("https://legacy.example/{}", r.status),
                String::from_utf8_lossy(&r.body).into_owned(),
            )]);
        }
        let name = reference.strip_prefix("legacy://").ok_or_else(|| Error {
            kind: cocoon::plugin::types::ErrorKind::Unsupported,
            message: format!("{reference:?} is not legacy://NAME"),
        })?;
        let base = config_get("base").unwrap_or_else(|| "https://legacy.example".into());
        Ok(vec![artifact(
            format!("{base}/{name}.raw"),
            format!("{}/{}", platform.os, platform.architecture),
        )])
    }
}

fn artifact(url: String, media_type: String) -> Artifact {
    Artifact {
        url,
        digest: None,
        size: None,
        media_type,
        format_hint: Some("raw".into()),
        headers: Vec::new(),
    }
}

export!(LegacySource);
