//! The host's taps, over rtnetlink: checking an existing tap before a VM
//! is given it, creating a tap on an existing bridge, and deleting the
//! taps the host created.
//!
//! The kernel refuses to create tun/tap devices over rtnetlink ("tun/tap
//! creation via rtnetlink is not supported"), so creation alone is the
//! TUNSETIFF + TUNSETPERSIST ioctl pair
//! ([`cocoon_vmm::devices::virtio::net::tap::create_persistent`]); the
//! look-ups, the enslaving to the bridge, bringing it up and the deletion
//! are netlink. Everything happens in the calling thread's network
//! namespace (the netlink socket is opened there).

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{InfoData, InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::{Handle, LinkUnspec};

use cocoon_vmm::devices::virtio::net::tap as vmm_tap;

/// IFLA_TUN_* attribute numbers (linux/if_link.h).
const IFLA_TUN_TYPE: u16 = 3;
const IFLA_TUN_MULTI_QUEUE: u16 = 7;
const IFLA_TUN_NUM_QUEUES: u16 = 8;
const IFF_TAP: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("cannot start netlink")]
    Start(#[source] std::io::Error),
    /// Missing, not a tap, busy: as the VMM says when it opens one.
    #[error(transparent)]
    Tap(#[from] vmm_tap::TapError),
    #[error("there is no bridge named {0}")]
    NoBridge(String),
    #[error("network interface {0} is not a bridge")]
    NotABridge(String),
    #[error("cannot create a tap for bridge {0}")]
    Create(String, #[source] vmm_tap::TapError),
    #[error("netlink: cannot {what} {name}")]
    Netlink {
        what: &'static str,
        name: String,
        #[source]
        source: rtnetlink::Error,
    },
}

/// What netlink says of an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// A tap with this many queues attached (0: no process holds it).
    Tap {
        queues: u32,
        multi_queue: bool,
    },
    Tun,
    Bridge,
    Other,
}

/// A netlink connection and the small runtime it needs.
pub struct Netlink {
    rt: tokio::runtime::Runtime,
    handle: Handle,
}

impl Netlink {
    /// Opens a netlink socket in the calling thread's network namespace.
    pub fn new() -> Result<Netlink, TapError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(TapError::Start)?;
        let handle = rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection().map_err(TapError::Start)?;
            tokio::spawn(conn);
            Ok::<_, TapError>(handle)
        })?;
        Ok(Netlink { rt, handle })
    }

    fn nl_error(what: &'static str, name: &str) -> impl FnOnce(rtnetlink::Error) -> TapError {
        let name = name.to_string();
        move |source| TapError::Netlink { what, name, source }
    }

    /// The interface named `name`, if there is one.
    fn link(&self, name: &str) -> Result<Option<LinkMessage>, TapError> {
        let request = self.handle.link().get().match_name(name.to_string());
        let found = self
            .rt
            .block_on(async { request.execute().try_next().await });
        match found {
            Ok(link) => Ok(link),
            Err(rtnetlink::Error::NetlinkError(e))
                if e.code.map(|c| c.get()) == Some(-libc::ENODEV) =>
            {
                Ok(None)
            }
            Err(e) => Err(Self::nl_error("look up", name)(e)),
        }
    }

    /// The index and kind of `name`, or `None` if it does not exist.
    pub fn kind(&self, name: &str) -> Result<Option<(u32, LinkKind)>, TapError> {
        Ok(self.link(name)?.map(|l| (l.header.index, link_kind(&l))))
    }

    /// Checks that `name` is a tap that no process holds (so a VM can
    /// open it).
    pub fn check_tap(&self, name: &str) -> Result<(), TapError> {
        match self.kind(name)? {
            None => Err(vmm_tap::TapError::NotFound(name.into()).into()),
            Some((
                _,
                LinkKind::Tap {
                    queues,
                    multi_queue,
                },
            )) => {
                if queues > 0 && !multi_queue {
                    Err(vmm_tap::TapError::Busy(name.into()).into())
                } else {
                    Ok(())
                }
            }
            Some(_) => Err(vmm_tap::TapError::NotATap(name.into()).into()),
        }
    }

    /// Creates a persistent tap named from `pattern` (`cctap%d`, or an exact
    /// name), enslaves it to the existing `bridge` and brings it up; returns
    /// its name. Nothing is left behind on failure.
    pub fn create_on_bridge(&self, bridge: &str, pattern: &str) -> Result<String, TapError> {
        let bridge_index = match self.kind(bridge)? {
            None => return Err(TapError::NoBridge(bridge.into())),
            Some((index, LinkKind::Bridge)) => index,
            Some(_) => return Err(TapError::NotABridge(bridge.into())),
        };
        let name =
            vmm_tap::create_persistent(pattern).map_err(|e| TapError::Create(bridge.into(), e))?;
        let enslaved = self.kind(&name).and_then(|k| {
            let (index, _) =
                k.ok_or_else(|| TapError::from(vmm_tap::TapError::NotFound(name.clone())))?;
            let message = LinkUnspec::new_with_index(index)
                .controller(bridge_index)
                .up()
                .build();
            let request = self.handle.link().change(message);
            self.rt
                .block_on(request.execute())
                .map_err(Self::nl_error("enslave to its bridge", &name))
        });
        if let Err(e) = enslaved {
            let _ = self.delete_tap(&name);
            return Err(e);
        }
        Ok(name)
    }

    /// Deletes the tap `name`; false if there was none. Refuses to delete
    /// an interface that is not a tap.
    pub fn delete_tap(&self, name: &str) -> Result<bool, TapError> {
        let index = match self.kind(name)? {
            None => return Ok(false),
            Some((index, LinkKind::Tap { .. })) => index,
            Some(_) => return Err(vmm_tap::TapError::NotATap(name.into()).into()),
        };
        let request = self.handle.link().del(index);
        match self.rt.block_on(request.execute()) {
            Ok(()) => Ok(true),
            // Gone in the meantime: what was wanted.
            Err(rtnetlink::Error::NetlinkError(e))
                if e.code.map(|c| c.get()) == Some(-libc::ENODEV) =>
            {
                Ok(false)
            }
            Err(e) => Err(Self::nl_error("delete", name)(e)),
        }
    }
}

/// Reads the kind out of a link's IFLA_LINKINFO.
fn link_kind(link: &LinkMessage) -> LinkKind {
    let mut kind = None;
    let mut tun = Vec::new();
    let mut carrier = false;
    for attr in &link.attributes {
        match attr {
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(k) => kind = Some(k.clone()),
                        LinkInfo::Data(InfoData::Tun(nlas)) => tun = nlas.clone(),
                        _ => {}
                    }
                }
            }
            LinkAttribute::Carrier(c) => carrier = *c != 0,
            _ => {}
        }
    }
    match kind {
        Some(InfoKind::Bridge) => LinkKind::Bridge,
        Some(InfoKind::Tun) => {
            use rtnetlink::packet_core::Nla;
            let value = |kind: u16| -> Option<Vec<u8>> {
                tun.iter().find(|n| n.kind() == kind).map(|n| {
                    let mut v = vec![0u8; n.value_len()];
                    n.emit_value(&mut v);
                    v
                })
            };
            let tun_type = value(IFLA_TUN_TYPE).and_then(|v| v.first().copied());
            // The kernel reports the queue count of multi-queue taps only; a
            // single-queue tap has carrier exactly while a file holds it
            // (tun_attach / tun_detach).
            let queues = value(IFLA_TUN_NUM_QUEUES)
                .and_then(|v| {
                    v.get(..4)
                        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                })
                .unwrap_or(u32::from(carrier));
            let multi_queue =
                value(IFLA_TUN_MULTI_QUEUE).and_then(|v| v.first().copied()) == Some(1);
            if tun_type == Some(IFF_TAP) {
                LinkKind::Tap {
                    queues,
                    multi_queue,
                }
            } else {
                LinkKind::Tun
            }
        }
        _ => LinkKind::Other,
    }
}
