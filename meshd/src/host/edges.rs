//! The host's kernel-facing parts behind small traits, so that what the [`Host`](super::Host)
//! decides can be tested with fakes: overlay routes ([`OverlayRoutes`], real:
//! [`Routes`]), transparent mode's routes and filter ([`UnderlayGuard`], real:
//! [`Transparent`]) and local-address discovery ([`LocalAddresses`], real:
//! [`NetlinkAddresses`]), plus [`AddressWatch`], which says when to look again.
//!
//! Everything runs on meshd's one current-thread runtime and is never spawned, so the
//! futures need not be `Send`.
#![allow(async_fn_in_trait)]

use std::net::IpAddr;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::{Stream, StreamExt as _, TryStreamExt as _};
use ipnet::IpNet;
use meshd_hostnet::Blocked;

use crate::routes::Routes;
use crate::transparent::{Plan, Transparent};

/// How often the host looks at its own addresses without being told (a safety net: address
/// changes arrive at once as netlink notifications).
const ADDRESS_POLL: Duration = Duration::from_secs(5);
/// Address notifications are gathered until none came for this long ...
const ADDRESS_SETTLE: Duration = Duration::from_millis(50);
/// ... but for no longer than this.
const ADDRESS_SETTLE_MAX: Duration = Duration::from_millis(300);

/// Routes into the TUN towards peers' overlay prefixes.
pub trait OverlayRoutes {
    /// Makes the installed routes equal to `wanted` (failures are logged).
    async fn sync(&mut self, wanted: Vec<IpNet>);
    /// Removes everything installed (a clean stop).
    async fn clear(&mut self);
}

impl OverlayRoutes for Routes {
    async fn sync(&mut self, wanted: Vec<IpNet>) {
        Routes::sync(self, wanted).await;
    }

    async fn clear(&mut self) {
        Routes::clear(self).await;
    }
}

/// Transparent mode's host state: routes to peers' underlay addresses, covered ports, the
/// plaintext-drop counters.
pub trait UnderlayGuard {
    /// Makes routes and covered ports match `plan`.
    async fn apply(&mut self, plan: &Plan) -> anyhow::Result<()>;
    /// Plaintext drops since the last call.
    async fn take_blocked(&mut self) -> anyhow::Result<Vec<Blocked>>;
    /// Removes every rule, route and filter it added.
    async fn stop(self);
}

impl UnderlayGuard for Transparent {
    async fn apply(&mut self, plan: &Plan) -> anyhow::Result<()> {
        Transparent::apply(self, plan).await
    }

    async fn take_blocked(&mut self) -> anyhow::Result<Vec<Blocked>> {
        Transparent::take_blocked(self).await
    }

    async fn stop(self) {
        Transparent::stop(self).await;
    }
}

/// This host's underlay addresses.
pub trait LocalAddresses {
    /// Local addresses worth reporting and protecting (not loopback, link-local or in
    /// `overlay`), with their prefix lengths, sorted.
    async fn local_addresses(&self, overlay: &[IpNet]) -> Vec<IpNet>;
}

/// [`LocalAddresses`] from an rtnetlink address dump.
pub struct NetlinkAddresses {
    handle: rtnetlink::Handle,
}

impl NetlinkAddresses {
    /// Opens a netlink connection (spawned on the current tokio runtime).
    pub fn new() -> anyhow::Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
        tokio::spawn(conn);
        Ok(NetlinkAddresses { handle })
    }
}

impl LocalAddresses for NetlinkAddresses {
    async fn local_addresses(&self, overlay: &[IpNet]) -> Vec<IpNet> {
        use rtnetlink::packet_route::address::AddressAttribute;
        let mut out: Vec<IpNet> = Vec::new();
        let mut stream = self.handle.address().get().execute();
        while let Ok(Some(msg)) = stream.try_next().await {
            for attr in &msg.attributes {
                let AddressAttribute::Address(ip) = attr else {
                    continue;
                };
                let net =
                    IpNet::new(*ip, msg.header.prefix_len).unwrap_or_else(|_| IpNet::from(*ip));
                if worth_reporting(*ip, overlay) && !out.iter().any(|n| n.addr() == *ip) {
                    out.push(net);
                }
            }
        }
        out.sort();
        out
    }
}

/// Not loopback, unspecified, link-local or one of `overlay`'s addresses.
fn worth_reporting(ip: IpAddr, overlay: &[IpNet]) -> bool {
    !(ip.is_loopback()
        || ip.is_unspecified()
        || matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
        || matches!(ip, IpAddr::V4(v4) if v4.is_link_local())
        || overlay.iter().any(|n| n.addr() == ip))
}

/// Says when the local addresses may have changed: an rtnetlink address notification (like
/// `ip monitor address`, IPv4 and IPv6; a burst is let settle) or the safety-net poll.
pub struct AddressWatch {
    events: Box<dyn Stream<Item = ()> + Unpin>,
    poll: tokio::time::Interval,
    /// A burst is settling until then.
    settle_until: Option<tokio::time::Instant>,
}

impl AddressWatch {
    /// Subscribes to address notifications (the connection is spawned on the current runtime).
    pub fn new() -> anyhow::Result<Self> {
        let (conn, _, events) = rtnetlink::new_multicast_connection(&[
            rtnetlink::MulticastGroup::Ipv4Ifaddr,
            rtnetlink::MulticastGroup::Ipv6Ifaddr,
        ])
        .context("subscribing to address changes over rtnetlink")?;
        tokio::spawn(conn);
        let mut poll = tokio::time::interval(ADDRESS_POLL);
        poll.reset();
        Ok(AddressWatch {
            events: Box::new(events.map(|_| ())),
            poll,
            settle_until: None,
        })
    }

    /// Waits for a notification (draining any that queued up behind it) or the next poll.
    /// Cancel-safe: a burst cut short is resumed by the next call.
    pub async fn changed(&mut self) {
        use futures_util::FutureExt as _;
        if self.settle_until.is_none() {
            tokio::select! {
                Some(()) = self.events.next() => {
                    self.settle_until = Some(tokio::time::Instant::now() + ADDRESS_SETTLE_MAX);
                }
                _ = self.poll.tick() => return,
            }
        }
        // One change often comes as several notifications (`ip addr flush` then `add`): wait
        // until they stop for a moment, so peers get one consistent report.
        let deadline = self.settle_until.unwrap_or_else(tokio::time::Instant::now);
        loop {
            while let Some(Some(())) = self.events.next().now_or_never() {}
            let quiet = tokio::time::timeout(ADDRESS_SETTLE, self.events.next()).await;
            // Quiet for a moment, the stream gone, or settled long enough.
            if !matches!(quiet, Ok(Some(()))) || tokio::time::Instant::now() >= deadline {
                break;
            }
        }
        self.settle_until = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reportable_addresses() {
        let overlay: Vec<IpNet> = vec!["100.64.0.1/10".parse().unwrap()];
        for (ip, want) in [
            ("198.18.0.1", true),
            ("fd00:18::1", true),
            ("127.0.0.1", false),
            ("::1", false),
            ("0.0.0.0", false),
            ("169.254.1.1", false),
            ("fe80::1", false),
            ("100.64.0.1", false),
            ("100.64.0.2", true),
        ] {
            assert_eq!(worth_reporting(ip.parse().unwrap(), &overlay), want, "{ip}");
        }
    }
}
