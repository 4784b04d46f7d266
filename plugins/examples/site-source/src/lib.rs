//! The template for a site's own image source. `site://NAME` is looked up
//! in a JSON catalog that the plugin fetches, through the host, from the
//! URL in its `catalog` setting:
//!
//! ```json
//! { "images": { "alpine": { "url": "https://…/alpine.qcow2",
//!                           "digest": "sha256:…", "format": "qcow2" } } }
//! ```

use std::collections::BTreeMap;

use cocoon_plugin_sdk::image_source::*;
use serde::Deserialize;

struct SiteSource;

#[derive(Deserialize)]
struct Catalog {
    images: BTreeMap<String, Entry>,
}

#[derive(Deserialize)]
struct Entry {
    url: String,
    digest: Option<String>,
    size: Option<u64>,
    format: Option<String>,
}

/// Catalogs are small; anything bigger is a misconfiguration.
const MAX_CATALOG: u64 = 1 << 20;

impl ImageSource for SiteSource {
    fn schemes() -> Vec<String> {
        vec!["site".into()]
    }

    fn resolve(reference: &str, _platform: Platform) -> Result<Vec<Artifact>, Error> {
        let name = reference
            .strip_prefix("site://")
            .ok_or_else(|| Error::unsupported(format!("{reference:?} is not site://NAME")))?;
        let catalog_url = config_get("catalog").ok_or_else(|| {
            Error::invalid_input("setting `catalog` (the catalog URL) is not set")
        })?;
        let response = get(&catalog_url, &[("accept", "application/json")], MAX_CATALOG)?;
        if response.status != 200 {
            return Err(Error::io(format!(
                "catalog {catalog_url} answered HTTP {}",
                response.status
            )));
        }
        let catalog: Catalog = serde_json::from_slice(&response.body)
            .map_err(|e| Error::invalid_input(format!("catalog {catalog_url}: {e}")))?;
        let entry = catalog.images.get(name).ok_or_else(|| {
            Error::invalid_input(format!("{name:?} is not in catalog {catalog_url}"))
        })?;
        log(
            LogLevel::Debug,
            "resolved",
            &[("name", name), ("url", &entry.url)],
        );
        Ok(vec![Artifact {
            url: entry.url.clone(),
            digest: entry.digest.clone(),
            size: entry.size,
            media_type: "application/octet-stream".into(),
            format_hint: entry.format.clone(),
            headers: Vec::new(),
        }])
    }
}

cocoon_plugin_sdk::export_image_source!(SiteSource);
