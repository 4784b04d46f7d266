//! The host's taps over netlink, in network namespaces the tests make and
//! remove: a tap created per bridge NIC is persistent, up and enslaved to
//! the bridge, and released (deleted) on stop while a user's tap is left
//! alone; attaching is all or nothing; each refusal (no bridge, not a
//! bridge, no tap, not a tap, busy tap) says which.

#[path = "../../vmm/tests/support/netns.rs"]
mod netns;

use std::collections::HashSet;

use cocoon_host::net::{self, Netlink, NetworkSpec, NicSpec, TapError};
use cocoon_vmm::devices::virtio::net::tap::{Tap, TapError as VmmTapError};
use netns::{skip, Netns};

fn netns_or_skip(test: &str) -> Option<Netns> {
    match Netns::new("taps") {
        Ok(ns) => Some(ns),
        Err(reason) if std::env::var_os("CI").is_none() => {
            skip(test, &reason);
            None
        }
        Err(reason) => panic!("{test}: {reason} (and CI is set)"),
    }
}

/// `ip -d link show NAME` inside the namespace, or None if it is gone.
fn show(ns: &Netns, name: &str) -> Option<String> {
    let out = ns.exec(&["ip", "-d", "link", "show", name]).unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn bridge_nics_get_taps_that_release_deletes() {
    let test = "bridge_nics_get_taps_that_release_deletes";
    let Some(ns) = netns_or_skip(test) else {
        return;
    };
    ns.bridge("br0");
    ns.ip("tuntap add dev mine0 mode tap");
    let specs = net::spec::plan(
        &["tap=mine0".parse::<NicSpec>().unwrap()],
        &[
            "bridge=br0".parse::<NetworkSpec>().unwrap(),
            "bridge=br0,mac=02:00:00:00:00:42,ip=10.5.0.2/24,gw=10.5.0.1"
                .parse()
                .unwrap(),
        ],
    )
    .unwrap();
    let nics = net::resolve(specs, &HashSet::new()).unwrap();
    let macs: HashSet<_> = nics.iter().map(|n| n.mac).collect();
    assert_eq!(macs.len(), 3, "every NIC has its own MAC");
    assert_eq!(nics[2].mac.to_string(), "02:00:00:00:00:42");

    let attached = ns.enter(|| {
        let nl = Netlink::new().unwrap();
        net::attach(&nl, &nics, "cctap%d").unwrap()
    });
    assert_eq!(attached[0].tap, "mine0");
    assert!(!attached[0].created);
    for a in &attached[1..] {
        assert!(a.created);
        let link = show(&ns, &a.tap).expect("the created tap exists");
        assert!(link.contains("master br0"), "{link}");
        assert!(link.contains("tun type tap"), "{link}");
        assert!(link.contains("persist on"), "{link}");
        assert!(link.contains(",UP"), "brought up: {link}");
    }
    assert_ne!(attached[1].tap, attached[2].tap);
    assert_eq!(attached[2].vmm_config().mac, [2, 0, 0, 0, 0, 0x42]);

    // A VM can open the created taps (the VMM side of the hand-over).
    ns.enter(|| {
        for a in &attached {
            Tap::open(&a.tap).unwrap_or_else(|e| panic!("{}: {e}", a.tap));
        }
    });

    ns.enter(|| {
        let nl = Netlink::new().unwrap();
        net::release(&nl, &attached).unwrap();
        // Idempotent: a second stop finds them gone and is fine.
        net::release(&nl, &attached).unwrap();
        assert!(!nl.delete_tap(&attached[1].tap).unwrap());
    });
    assert!(show(&ns, &attached[1].tap).is_none());
    assert!(show(&ns, &attached[2].tap).is_none());
    assert!(show(&ns, "mine0").is_some(), "the user's tap is left alone");
}

#[test]
fn attach_is_all_or_nothing() {
    let test = "attach_is_all_or_nothing";
    let Some(ns) = netns_or_skip(test) else {
        return;
    };
    ns.bridge("br0");
    let specs = net::spec::plan(
        &["tap=absent0".parse::<NicSpec>().unwrap()],
        &["bridge=br0".parse().unwrap()],
    )
    .unwrap();
    // Bridge NICs come after taps in a plan; put the bridge first so a tap
    // is created before the failure.
    let mut nics = net::resolve(specs, &HashSet::new()).unwrap();
    nics.reverse();
    let err = ns.enter(|| {
        let nl = Netlink::new().unwrap();
        net::attach(&nl, &nics, "ccfail%d").unwrap_err()
    });
    assert!(
        matches!(&err, TapError::Tap(VmmTapError::NotFound(n)) if n == "absent0"),
        "{err}"
    );
    let out = ns.exec(&["ip", "-o", "link", "show"]).unwrap();
    let links = String::from_utf8_lossy(&out.stdout);
    assert!(
        !links.contains("ccfail"),
        "the created tap was deleted again: {links}"
    );
}

#[test]
fn refusals_name_the_interface_and_the_reason() {
    let test = "refusals_name_the_interface_and_the_reason";
    let Some(ns) = netns_or_skip(test) else {
        return;
    };
    ns.bridge("br0");
    ns.ip("link add dum0 type veth peer name dum0p");
    ns.ip("tuntap add dev held0 mode tap");
    ns.ip("tuntap add dev free0 mode tap");
    ns.ip("tuntap add dev tun0 mode tun");
    ns.enter(|| {
        let nl = Netlink::new().unwrap();
        let _holder = Tap::open("held0").unwrap();
        let cases: Vec<(Result<(), TapError>, &str)> = vec![
            (
                nl.check_tap("nosuch"),
                "there is no network interface named nosuch",
            ),
            (
                nl.check_tap("br0"),
                "network interface br0 is not a tap device",
            ),
            (
                nl.check_tap("tun0"),
                "network interface tun0 is not a tap device",
            ),
            (
                nl.check_tap("held0"),
                "tap held0 is busy: another process has it open",
            ),
            (
                nl.create_on_bridge("nobr", "x%d").map(drop),
                "there is no bridge named nobr",
            ),
            (
                nl.create_on_bridge("dum0", "x%d").map(drop),
                "network interface dum0 is not a bridge",
            ),
            (
                nl.delete_tap("dum0").map(drop),
                "network interface dum0 is not a tap device",
            ),
        ];
        for (got, want) in cases {
            assert_eq!(got.unwrap_err().to_string(), want);
        }
        nl.check_tap("free0").unwrap();
        // An exact name already taken is refused, not reused.
        let e = nl.create_on_bridge("br0", "free0").unwrap_err();
        let cause = std::error::Error::source(&e).unwrap().to_string();
        assert_eq!(cause, "a network interface named free0 already exists");
    });
    assert!(show(&ns, "dum0").is_some(), "nothing was deleted");
}
