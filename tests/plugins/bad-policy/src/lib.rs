//! A disk policy that returns the bad plan its site setting `bad` names,
//! for the tests of the host's plan checks and disk rules. Without `bad`
//! it returns the standard plan (layers, `cocoon-root`, the data disks,
//! `cocoon-cidata` when asked for). `root_file` sets the root's file name.
//!
//! `bad =`
//! - `ro-cow`: the root is read-only
//! - `rw-layer`: the first layer is writable
//! - `dup-serial`: two data disks named `dup`
//! - `cidata-not-last`: the seed right after the root, a data disk after it
//!   (ask for a seed)
//! - `file-dotdot`, `file-abs`: the root's file is `../x`, `/etc/passwd`
//! - `data-no-size`: a data disk `nosize` without a size
//! - `reserved-data`: a data disk named `cocoon-data`
//! - `mount-on-none`: a data disk of fstype none with a mount point
//! - `error`: plan fails with invalid-input; `panic`: plan panics;
//!   `loop`: plan never returns
//! - `refuse`: validate reports one violation (`settings.bad`)

use cocoon_plugin_sdk::disk_policy::*;

struct BadPolicy;

fn extra_data(name: &str) -> Disk {
    Disk::data(&DataDiskSpec {
        name: name.into(),
        size_bytes: 1 << 30,
        fstype: FsType::None,
        mount_point: None,
        direct_io: None,
    })
}

impl DiskPolicy for BadPolicy {
    fn plan(request: VmRequest) -> Result<Vec<Disk>, Error> {
        let mut plan = standard_plan(&request, request.cow_size.or(Some(1 << 30)));
        let root = request.layers().len();
        if let Some(file) = request.setting("root_file") {
            plan[root].file = Some(file.into());
        }
        // Where data disks go: before the seed, if there is one.
        let data_at = plan.len() - usize::from(request.cidata);
        match request.setting("bad").unwrap_or("") {
            "" => {}
            "ro-cow" => plan[root].read_only = true,
            "rw-layer" => plan[0].read_only = false,
            "dup-serial" => {
                plan.insert(data_at, extra_data("dup"));
                plan.insert(data_at, extra_data("dup"));
            }
            "cidata-not-last" => {
                plan.retain(|d| d.role != DiskRole::Cidata);
                plan.insert(root + 1, Disk::cidata());
                plan.push(extra_data("after-seed"));
            }
            "file-dotdot" => plan[root].file = Some("../x".into()),
            "file-abs" => plan[root].file = Some("/etc/passwd".into()),
            "data-no-size" => {
                let mut d = extra_data("nosize");
                d.size_bytes = None;
                plan.insert(data_at, d);
            }
            "reserved-data" => plan.insert(data_at, extra_data("cocoon-data")),
            "mount-on-none" => {
                let mut d = extra_data("nomount");
                d.mount_point = Some("/mnt/x".into());
                plan.insert(data_at, d);
            }
            "error" => return Err(Error::invalid_input("asked to fail")),
            "panic" => panic!("bad-policy panics on purpose"),
            "loop" => {
                // Volatile so the optimiser keeps a loop that never ends.
                let mut n = 0u64;
                loop {
                    // SAFETY: `n` is a live, aligned local read through a
                    // reference; volatile only keeps the read.
                    n = unsafe { core::ptr::read_volatile(&n) }.wrapping_add(1);
                }
            }
            "refuse" => {}
            other => return Err(Error::unsupported(format!("unknown bad plan {other:?}"))),
        }
        Ok(plan)
    }

    fn validate(request: &VmRequest) -> Vec<Violation> {
        match request.setting("bad") {
            Some("refuse") => vec![Violation::new("settings.bad", "asked to refuse")],
            _ => Vec::new(),
        }
    }
}

cocoon_plugin_sdk::export_disk_policy!(BadPolicy);
