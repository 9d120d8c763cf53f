//! Routes towards peers' allowed IPs, kept in sync over rtnetlink. We remember exactly what we
//! added so that stopping removes it and nothing else.

use std::collections::BTreeSet;
use std::net::IpAddr;

use anyhow::Context as _;
use ipnet::IpNet;
use rtnetlink::{Handle, RouteMessageBuilder};

/// Routes via the TUN that this process installed.
pub struct Routes {
    handle: Handle,
    if_index: u32,
    /// Prefixes the interface addresses already cover (the kernel's connected routes).
    connected: Vec<IpNet>,
    installed: BTreeSet<IpNet>,
}

impl Routes {
    /// Opens a netlink connection (spawned on the current tokio runtime).
    pub fn new(if_index: u32, addresses: &[IpNet]) -> anyhow::Result<Routes> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
        tokio::spawn(conn);
        Ok(Routes {
            handle,
            if_index,
            connected: addresses.iter().map(IpNet::trunc).collect(),
            installed: BTreeSet::new(),
        })
    }

    /// Makes the installed routes equal to `wanted` (minus what connected routes cover).
    pub async fn sync(&mut self, wanted: impl IntoIterator<Item = IpNet>) {
        let wanted: BTreeSet<IpNet> = wanted
            .into_iter()
            .map(|n| n.trunc())
            .filter(|n| !self.connected.iter().any(|c| c.contains(n)))
            .collect();
        let stale: Vec<IpNet> = self.installed.difference(&wanted).copied().collect();
        for net in stale {
            if let Err(e) = self.del(net).await {
                tracing::warn!(route = %net, error = %e, "removing route failed");
            }
            self.installed.remove(&net);
        }
        for net in wanted {
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
    }

    /// Removes every route this process added.
    pub async fn clear(&mut self) {
        self.sync(std::iter::empty()).await;
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
