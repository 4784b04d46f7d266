//! The default disk plan.
//!
//! - Layered images: `cocoon-layer0…` (read-only, base first), then the
//!   writable root `cocoon-root` (cow) of the requested size, else the site
//!   setting `cow_size`, else 10 GiB; then the data disks as asked; then
//!   `cocoon-cidata` when a seed is wanted.
//! - Disk images: the converted base copied as the writable root
//!   `cocoon-root` (grown to the requested size, if any), then the data
//!   disks, then `cocoon-cidata`.
//!
//! Site settings (`[vm] settings` in the host config): `cow_size` (bytes or
//! with a K/M/G/T suffix) and `max_data_disks` (default 8).

use cocoon_plugin_sdk::disk_policy::*;

struct DefaultPolicy;

const DEFAULT_COW_SIZE: u64 = 10 << 30;
const DEFAULT_MAX_DATA_DISKS: u64 = 8;

/// A setting parsed by `parse`, with a violation naming it when it does
/// not parse.
fn setting<T>(
    request: &VmRequest,
    key: &str,
    what: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Option<T>, Violation> {
    match request.setting(key) {
        None => Ok(None),
        Some(v) => parse(v).map(Some).ok_or_else(|| {
            Violation::new(format!("settings.{key}"), format!("{v:?} is not {what}"))
        }),
    }
}

fn cow_size(request: &VmRequest) -> Result<Option<u64>, Violation> {
    setting(
        request,
        "cow_size",
        "a size (bytes, or with K/M/G/T)",
        parse_size,
    )
}

fn max_data_disks(request: &VmRequest) -> Result<u64, Violation> {
    setting(request, "max_data_disks", "a number", |v| v.parse().ok())
        .map(|v| v.unwrap_or(DEFAULT_MAX_DATA_DISKS))
}

impl DiskPolicy for DefaultPolicy {
    fn plan(request: VmRequest) -> Result<Vec<Disk>, Error> {
        if let Some(v) = Self::validate(&request).first() {
            return Err(Error::invalid_input(format!("{}: {}", v.field, v.message)));
        }
        let root = match &request.image {
            ImageKind::Layered(_) => Some(
                request
                    .cow_size
                    .or(cow_size(&request).ok().flatten())
                    .unwrap_or(DEFAULT_COW_SIZE),
            ),
            // The copy of the image keeps its size unless asked to grow.
            ImageKind::Disk(_) => request.cow_size,
        };
        Ok(standard_plan(&request, root))
    }

    fn validate(request: &VmRequest) -> Vec<Violation> {
        let mut out = Vec::new();
        if let Err(v) = cow_size(request) {
            out.push(v);
        }
        match max_data_disks(request) {
            Ok(max) if request.data_disks.len() as u64 > max => out.push(Violation::new(
                "data_disks",
                format!(
                    "{} data disks requested, this site allows {max}",
                    request.data_disks.len()
                ),
            )),
            Ok(_) => {}
            Err(v) => out.push(v),
        }
        if let (ImageKind::Disk(image), Some(size)) = (&request.image, request.cow_size) {
            if size < image.virtual_size {
                out.push(Violation::new(
                    "cow_size",
                    format!(
                        "{size} bytes is smaller than the image's {} bytes",
                        image.virtual_size
                    ),
                ));
            }
        }
        out
    }
}

cocoon_plugin_sdk::export_disk_policy!(DefaultPolicy);
