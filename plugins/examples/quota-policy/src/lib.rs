//! A site quota on data disks, over the default disk plan (layers,
//! `cocoon-root`, the data disks, `cocoon-cidata` last).
//!
//! Site settings (`[vm] settings` in the host config):
//! - `max_data_disks`: at most this many data disks (default: no limit);
//! - `max_data_bytes`: at most this many bytes of data disks in total,
//!   bytes or with a K/M/G/T suffix (default: no limit);
//! - `force_direct_io`: `true` (the default) or `false`. When true, every
//!   data disk is planned with direct I/O on, and a request that turns it
//!   off explicitly is refused;
//! - `cow_size`: the root's size for layered images (default 10 GiB).
//!
//! A request over the quota is refused by `validate`, with every broken
//! rule, before any disk is planned.

use cocoon_plugin_sdk::disk_policy::*;

struct QuotaPolicy;

const DEFAULT_COW_SIZE: u64 = 10 << 30;

/// The quota, read from the site settings.
struct Quota {
    max_disks: Option<u64>,
    max_bytes: Option<u64>,
    force_direct_io: bool,
    cow_size: u64,
}

impl Quota {
    fn read(request: &VmRequest) -> Result<Quota, Vec<Violation>> {
        let mut bad = Vec::new();
        let mut get = |key: &str, what: &str, parse: &dyn Fn(&str) -> Option<u64>| {
            let v = request.setting(key)?;
            let parsed = parse(v);
            if parsed.is_none() {
                bad.push(Violation::new(
                    format!("settings.{key}"),
                    format!("{v:?} is not {what}"),
                ));
            }
            parsed
        };
        let max_disks = get("max_data_disks", "a number", &|v| v.parse().ok());
        let max_bytes = get(
            "max_data_bytes",
            "a size (bytes, or with K/M/G/T)",
            &parse_size,
        );
        let cow_size = get("cow_size", "a size (bytes, or with K/M/G/T)", &parse_size);
        let force_direct_io = get("force_direct_io", "true or false", &|v| match v {
            "true" => Some(1),
            "false" => Some(0),
            _ => None,
        })
        .is_none_or(|v| v == 1);
        if !bad.is_empty() {
            return Err(bad);
        }
        Ok(Quota {
            max_disks,
            max_bytes,
            force_direct_io,
            cow_size: cow_size.unwrap_or(DEFAULT_COW_SIZE),
        })
    }

    /// Every rule of the quota `request` breaks.
    fn check(&self, request: &VmRequest) -> Vec<Violation> {
        let mut out = Vec::new();
        let disks = &request.data_disks;
        if let Some(max) = self.max_disks.filter(|&m| disks.len() as u64 > m) {
            out.push(Violation::new(
                "data_disks",
                format!(
                    "{} data disks asked for, the site quota is {max}",
                    disks.len()
                ),
            ));
        }
        let total = disks
            .iter()
            .fold(0u64, |t, d| t.saturating_add(d.size_bytes));
        if let Some(max) = self.max_bytes.filter(|&m| total > m) {
            out.push(Violation::new(
                "data_disks",
                format!("{total} bytes of data disks asked for, the site quota is {max}"),
            ));
        }
        if self.force_direct_io {
            for (i, d) in disks.iter().enumerate() {
                if d.direct_io == Some(false) {
                    out.push(Violation::new(
                        format!("data_disks[{i}].direct_io"),
                        format!(
                            "{:?} asks for direct I/O off; this site forces it on data disks",
                            d.name
                        ),
                    ));
                }
            }
        }
        out
    }
}

impl DiskPolicy for QuotaPolicy {
    fn plan(request: VmRequest) -> Result<Vec<Disk>, Error> {
        let quota = Quota::read(&request)
            .map_err(|v| Error::invalid_input(format!("{}: {}", v[0].field, v[0].message)))?;
        if let Some(v) = quota.check(&request).first() {
            return Err(Error::limit_exceeded(format!("{}: {}", v.field, v.message)));
        }
        let root = match &request.image {
            ImageKind::Layered(_) => Some(request.cow_size.unwrap_or(quota.cow_size)),
            ImageKind::Disk(_) => request.cow_size,
        };
        let mut plan = standard_plan(&request, root);
        if quota.force_direct_io {
            for d in plan.iter_mut().filter(|d| d.role == DiskRole::Data) {
                d.direct_io = Some(true);
            }
        }
        Ok(plan)
    }

    fn validate(request: &VmRequest) -> Vec<Violation> {
        match Quota::read(request) {
            Ok(quota) => quota.check(request),
            Err(bad) => bad,
        }
    }
}

cocoon_plugin_sdk::export_disk_policy!(QuotaPolicy);
