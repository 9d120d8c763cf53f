//! Routes towards peers' allowed IPs, kept in sync over rtnetlink. We remember exactly what we
//! added so that stopping removes it and nothing else.
//!
//! Fail closed: every overlay prefix (the interface's own networks and each routed allowed IP)
//! also gets an `unreachable` route in the main table at [`GUARD_METRIC`], below the TUN's
//! routes. When meshd dies the kernel removes the TUN and its routes; the guards stay, so
//! traffic to the overlay fails on this host instead of following the default route out in
//! plaintext. A restart adopts them; a clean stop ([`Routes::clear`]) or `meshd down`
//! ([`remove_guards`]) removes them.

use std::collections::BTreeSet;
use std::net::IpAddr;

use anyhow::Context as _;
use futures_util::TryStreamExt as _;
use ipnet::IpNet;
use meshd_hostnet::GUARD_METRIC;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

/// Routes via the TUN that this process installed.
pub struct Routes {
    handle: Handle,
    if_index: u32,
    /// Prefixes the interface addresses already cover (the kernel's connected routes).
    connected: Vec<IpNet>,
    installed: BTreeSet<IpNet>,
    /// Overlay prefixes with an `unreachable` guard in the main table.
    guards: BTreeSet<IpNet>,
}

impl Routes {
    /// Opens a netlink connection (spawned on the current tokio runtime), adopts the guards an
    /// earlier run left and guards the interface's own networks.
    pub async fn new(if_index: u32, addresses: &[IpNet]) -> anyhow::Result<Routes> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
        tokio::spawn(conn);
        let guards = guard_routes(&handle)
            .await?
            .into_iter()
            .filter_map(|r| guard_prefix(&r))
            .collect();
        let mut routes = Routes {
            handle,
            if_index,
            connected: addresses.iter().map(IpNet::trunc).collect(),
            installed: BTreeSet::new(),
            guards,
        };
        let own: Vec<IpNet> = routes.connected.clone();
        routes.add_guards(&own).await;
        Ok(routes)
    }

    /// Adds the guards of `nets` that are missing (failures are logged).
    async fn add_guards(&mut self, nets: &[IpNet]) {
        for &net in nets {
            if self.guards.contains(&net) {
                continue;
            }
            let res = match guard_message(net) {
                Ok(msg) => self
                    .handle
                    .route()
                    .add(msg)
                    .replace()
                    .execute()
                    .await
                    .map_err(anyhow::Error::from),
                Err(e) => Err(e),
            };
            match res {
                Ok(()) => {
                    self.guards.insert(net);
                }
                Err(e) => {
                    tracing::warn!(route = %net, error = %e, "adding the unreachable guard failed")
                }
            }
        }
    }

    /// Makes the installed routes equal to `wanted` (minus what connected routes cover), each
    /// guarded; guards of prefixes no longer wanted go last.
    pub async fn sync(&mut self, wanted: impl IntoIterator<Item = IpNet>) {
        let wanted: BTreeSet<IpNet> = wanted
            .into_iter()
            .map(|n| n.trunc())
            .filter(|n| !self.connected.iter().any(|c| c.contains(n)))
            .collect();
        let to_guard: Vec<IpNet> = wanted.iter().copied().collect();
        self.add_guards(&to_guard).await;
        let stale: Vec<IpNet> = self.installed.difference(&wanted).copied().collect();
        for net in stale {
            if let Err(e) = self.del(net).await {
                tracing::warn!(route = %net, error = %e, "removing route failed");
            }
            self.installed.remove(&net);
        }
        for &net in &wanted {
            if self.installed.contains(&net) {
                continue;
            }
            match self.add(net).await {
                Ok(()) => {
                    self.installed.insert(net);
                }
                Err(e) => tracing::warn!(route = %net, error = %e, "adding route failed"),
            }
        }
        let unguard: Vec<IpNet> = self
            .guards
            .iter()
            .filter(|n| !wanted.contains(n) && !self.connected.contains(n))
            .copied()
            .collect();
        self.remove_guards(&unguard).await;
    }

    async fn remove_guards(&mut self, nets: &[IpNet]) {
        for &net in nets {
            let res = match guard_message(net) {
                Ok(msg) => self.handle.route().del(msg).execute().await,
                Err(e) => {
                    tracing::warn!(route = %net, error = %e, "removing the guard failed");
                    continue;
                }
            };
            match res {
                Ok(()) => {
                    self.guards.remove(&net);
                }
                Err(e) if is_esrch(&e) => {
                    self.guards.remove(&net);
                }
                Err(e) => tracing::warn!(route = %net, error = %e, "removing the guard failed"),
            }
        }
    }

    /// Removes every route this process added, and the guards (a clean stop).
    pub async fn clear(&mut self) {
        self.sync(std::iter::empty()).await;
        let all: Vec<IpNet> = self.guards.iter().copied().collect();
        self.remove_guards(&all).await;
    }

    fn message(&self, net: IpNet) -> anyhow::Result<rtnetlink::packet_route::route::RouteMessage> {
        let addr: IpAddr = net.addr();
        Ok(RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(addr, net.prefix_len())
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .output_interface(self.if_index)
            .build())
    }

    async fn add(&self, net: IpNet) -> anyhow::Result<()> {
        let msg = self.message(net)?;
        self.handle.route().add(msg).replace().execute().await?;
        Ok(())
    }

    async fn del(&self, net: IpNet) -> anyhow::Result<()> {
        let msg = self.message(net)?;
        self.handle.route().del(msg).execute().await?;
        Ok(())
    }
}

/// The `unreachable` guard route for `net` in the main table.
fn guard_message(net: IpNet) -> anyhow::Result<RouteMessage> {
    Ok(RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(net.addr(), net.prefix_len())
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .kind(RouteType::Unreachable)
        .priority(GUARD_METRIC)
        .build())
}

/// The overlay guards in the main table (`unreachable` at [`GUARD_METRIC`]), both families.
async fn guard_routes(handle: &Handle) -> anyhow::Result<Vec<RouteMessage>> {
    let mut out = Vec::new();
    for ver in [IpVersion::V4, IpVersion::V6] {
        let msg = match ver {
            IpVersion::V4 => RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            IpVersion::V6 => RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        };
        let routes: Vec<RouteMessage> = handle
            .route()
            .get(msg)
            .execute()
            .try_collect()
            .await
            .context("dumping routes")?;
        out.extend(routes.into_iter().filter(|r| {
            r.header.kind == RouteType::Unreachable
                && meshd_hostnet::route_table(r) == u32::from(libc::RT_TABLE_MAIN)
                && r.attributes
                    .contains(&RouteAttribute::Priority(GUARD_METRIC))
        }));
    }
    Ok(out)
}

/// The prefix a guard route covers.
fn guard_prefix(r: &RouteMessage) -> Option<IpNet> {
    let len = r.header.destination_prefix_length;
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(a)) => {
            ipnet::Ipv4Net::new(*a, len).ok().map(IpNet::V4)
        }
        RouteAttribute::Destination(RouteAddress::Inet6(a)) => {
            ipnet::Ipv6Net::new(*a, len).ok().map(IpNet::V6)
        }
        _ => None,
    })
}

fn is_esrch(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.code.is_some_and(|c| c.get().abs() == libc::ESRCH))
}

/// What `meshd down` runs for the overlay: removes every overlay guard meshd left in the main
/// table. Needs a tokio runtime.
pub async fn remove_guards() -> anyhow::Result<usize> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    let conn = tokio::spawn(conn);
    let mut n = 0;
    let res = async {
        for r in guard_routes(&handle).await? {
            match handle.route().del(r).execute().await {
                Ok(()) => n += 1,
                Err(e) if is_esrch(&e) => {}
                Err(e) => return Err(anyhow::Error::from(e).context("deleting an overlay guard")),
            }
        }
        Ok(n)
    }
    .await;
    conn.abort();
    res
}
