//! The default disk plan: every layer read-only, base first; one writable
//! cow root; the requested data disks in the order given; cidata last.
//! Site settings: `cow_size` (bytes, default 10 GiB) and `max_data_disks`
//! (default 8).

use cocoon_plugin_sdk::disk_policy::*;

struct DefaultPolicy;

const DEFAULT_COW_SIZE: u64 = 10 << 30;
const DEFAULT_MAX_DATA_DISKS: usize = 8;

fn setting_u64(request: &VmRequest, key: &str) -> Result<Option<u64>, Error> {
    request
        .setting(key)
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                Error::invalid_input(format!("setting {key}={v:?} is not a number of bytes"))
            })
        })
        .transpose()
}

impl DiskPolicy for DefaultPolicy {
    fn plan(request: VmRequest) -> Result<Vec<Disk>, Error> {
        let violations = Self::validate(&request);
        if let Some(v) = violations.first() {
            return Err(Error::invalid_input(format!("{}: {}", v.field, v.message)));
        }
        let cow_size = setting_u64(&request, "cow_size")?.unwrap_or(DEFAULT_COW_SIZE);
        let mut disks = Vec::new();
        for (i, _) in request.layers.iter().enumerate() {
            disks.push(Disk {
                name: format!("layer{i}"),
                role: DiskRole::Layer,
                read_only: true,
                size_bytes: None,
                mount_point: None,
                fstype: None,
                direct_io: false,
            });
        }
        disks.push(Disk {
            name: "root".into(),
            role: DiskRole::Cow,
            read_only: false,
            size_bytes: Some(cow_size),
            mount_point: None,
            fstype: None,
            direct_io: false,
        });
        for d in request.data_disks {
            disks.push(Disk {
                name: d.name,
                role: DiskRole::Data,
                read_only: false,
                size_bytes: Some(d.size_bytes),
                mount_point: d.mount_point,
                fstype: d.fstype,
                direct_io: d.direct_io,
            });
        }
        if request.cidata {
            disks.push(Disk {
                name: "cidata".into(),
                role: DiskRole::Cidata,
                read_only: true,
                size_bytes: None,
                mount_point: None,
                fstype: None,
                direct_io: false,
            });
        }
        Ok(disks)
    }

    fn validate(request: &VmRequest) -> Vec<Violation> {
        let mut out = Vec::new();
        let max = match setting_u64(request, "max_data_disks") {
            Ok(v) => v.map_or(DEFAULT_MAX_DATA_DISKS, |v| v as usize),
            Err(e) => {
                out.push(Violation {
                    field: "settings.max_data_disks".into(),
                    message: e.message,
                });
                DEFAULT_MAX_DATA_DISKS
            }
        };
        if request.data_disks.len() > max {
            out.push(Violation {
                field: "data_disks".into(),
                message: format!(
                    "{} data disks requested, this site allows {max}",
                    request.data_disks.len()
                ),
            });
        }
        if let Err(e) = setting_u64(request, "cow_size") {
            out.push(Violation {
                field: "settings.cow_size".into(),
                message: e.message,
            });
        }
        out
    }
}

cocoon_plugin_sdk::export_disk_policy!(DefaultPolicy);
