//! Transparent mode: traffic to peers' ordinary (underlay) addresses is encrypted with no
//! change to applications.
//!
//! For every peer that runs in transparent mode too, this host
//! - routes the peer's underlay addresses into the TUN (policy routing: a table meshd owns,
//!   looked up by everything *not* carrying meshd's firewall mark; the tunnel socket and the
//!   control connection carry the mark and keep using the main table), with this host's own
//!   underlay address as the preferred source, so inner packets keep the real addresses;
//! - adds those addresses to the peer's allowed IPs (cryptokey routing then accepts inner
//!   packets from the peer's real address, and only from that peer);
//! - drops plaintext to the ports the policy covers for this host unless it came through the
//!   TUN (nftables), and reports each drop in the block log.
//!
//! [`plan`] decides all of that from the network map (pure, tested here); [`Transparent`]
//! applies it through [`meshd_hostnet`].

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use meshd_hostnet::{Blocked, Covered, HostNet, Route};
use meshd_policy::{BlockEvent, DenyReason, Direction, PeerGrants, Proto};

/// The firewall mark on meshd's own sockets in transparent mode (ASCII "MSH").
pub const FWMARK: u32 = meshd_hostnet::DEFAULT_FWMARK;

/// What one peer contributes to the plan.
pub struct PeerUnderlay<'a> {
    /// Peer name (for status and logs).
    pub name: &'a str,
    /// Whether the peer runs in transparent mode.
    pub transparent: bool,
    /// The peer's underlay addresses (its endpoints' IPs).
    pub addrs: Vec<IpAddr>,
    /// What the peer may open to this host (covered ports come from these).
    pub grants: &'a PeerGrants,
}

/// What transparent mode installs for one network map.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Extra allowed IPs per peer (index-aligned with the input).
    pub extra_allowed: Vec<Vec<IpNet>>,
    /// Host routes into the TUN.
    pub routes: Vec<Route>,
    /// Ports where only tunnelled traffic is accepted.
    pub covered: Covered,
    /// (address, peer name) pairs now protected.
    pub protected: Vec<(IpAddr, String)>,
    /// Addresses claimed by more than one peer (left unprotected, logged).
    pub conflicts: Vec<IpAddr>,
}

fn usable(ip: IpAddr) -> bool {
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || matches!(ip, IpAddr::V4(v4) if v4.is_link_local() || v4.is_broadcast())
        || matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80))
}

/// The source to prefer towards `dst`: an own address whose network holds `dst`, else the
/// first own address of the same family.
fn source_for(dst: IpAddr, own: &[IpNet]) -> Option<IpAddr> {
    own.iter()
        .find(|n| n.contains(&dst))
        .or_else(|| own.iter().find(|n| n.addr().is_ipv4() == dst.is_ipv4()))
        .map(IpNet::addr)
}

fn add_range(v: &mut Vec<(u16, u16)>, r: (u16, u16)) {
    let r = (r.0.max(1), r.1);
    if r.0 <= r.1 && !v.contains(&r) {
        v.push(r);
    }
}

/// Plans transparent mode for a map. `own` are this host's underlay addresses (with their
/// prefix lengths), `overlay` its overlay networks; `now` is Unix seconds (expired grants
/// cover nothing).
pub fn plan(
    self_transparent: bool,
    peers: &[PeerUnderlay<'_>],
    own: &[IpNet],
    overlay: &[IpNet],
    now: u64,
) -> Plan {
    let mut plan = Plan {
        extra_allowed: vec![Vec::new(); peers.len()],
        ..Plan::default()
    };
    if !self_transparent {
        return plan;
    }
    // Who claims which address (only transparent peers' addresses are routed).
    let mut claims: BTreeMap<IpAddr, Vec<usize>> = BTreeMap::new();
    for (i, p) in peers.iter().enumerate().filter(|(_, p)| p.transparent) {
        for &ip in &p.addrs {
            let ours = own.iter().any(|n| n.addr() == ip);
            let in_overlay = overlay.iter().any(|n| n.contains(&ip));
            if usable(ip) && !ours && !in_overlay {
                let c = claims.entry(ip).or_default();
                if !c.contains(&i) {
                    c.push(i);
                }
            }
        }
    }
    for (ip, who) in claims {
        if let [i] = who[..] {
            plan.extra_allowed[i].push(IpNet::from(ip));
            plan.routes.push(Route {
                dst: ip,
                src: source_for(ip, own),
            });
            plan.protected.push((ip, peers[i].name.to_string()));
        } else {
            plan.conflicts.push(ip);
        }
    }
    // Covered ports: whatever any peer may open to this host.
    for p in peers {
        for g in &p.grants.inbound {
            if g.expires_at.is_some_and(|t| now >= t) {
                continue;
            }
            match g.proto {
                Proto::Tcp => add_range(&mut plan.covered.tcp, g.ports),
                Proto::Udp => add_range(&mut plan.covered.udp, g.ports),
                Proto::Any => {
                    add_range(&mut plan.covered.tcp, (1, u16::MAX));
                    add_range(&mut plan.covered.udp, (1, u16::MAX));
                }
                Proto::Icmp | Proto::Other => {}
            }
        }
    }
    plan.covered.tcp.sort_unstable();
    plan.covered.udp.sort_unstable();
    plan
}

/// Transparent mode's host state (routes, rules, nftables), applied from plans.
pub struct Transparent {
    net: HostNet,
    covered: Option<Covered>,
}

impl Transparent {
    /// Cleans up what a crashed meshd may have left and installs the rules and the filter.
    pub async fn start(
        if_index: u32,
        if_name: &str,
        listen_port: u16,
        fwmark: u32,
    ) -> anyhow::Result<Self> {
        let mut cfg = meshd_hostnet::Config::with_defaults(if_index, if_name, listen_port);
        cfg.fwmark = fwmark;
        let net = HostNet::start(cfg).await?;
        Ok(Transparent { net, covered: None })
    }

    /// Makes routes and covered ports match `plan`.
    pub async fn apply(&mut self, plan: &Plan) -> anyhow::Result<()> {
        self.net.set_routes(&plan.routes).await?;
        if self.covered.as_ref() != Some(&plan.covered) {
            self.net.set_covered(&plan.covered).await?;
            tracing::info!(tcp = ?plan.covered.tcp, udp = ?plan.covered.udp, "transparent mode: covered ports");
            self.covered = Some(plan.covered.clone());
        }
        Ok(())
    }

    /// Plaintext drops since the last call.
    pub async fn take_blocked(&mut self) -> anyhow::Result<Vec<Blocked>> {
        Ok(self.net.take_blocked().await?)
    }

    /// Removes every rule, route and filter it added.
    pub async fn stop(self) {
        if let Err(e) = self.net.stop().await {
            tracing::warn!(error = %format!("{:#}", anyhow::Error::new(e)), "removing transparent-mode state");
        }
    }
}

/// Plaintext drops as block events (reason `plaintext`, inbound, towards `host`). `peer_of`
/// names the mesh peer an address belongs to (plaintext from a peer that bypassed meshd), if
/// any; other sources are `outside-mesh`. `now` is Unix seconds.
pub fn plaintext_events(
    drops: Vec<Blocked>,
    host: &str,
    host_labels: &BTreeMap<String, String>,
    peer_of: impl Fn(IpAddr) -> Option<(String, BTreeMap<String, String>)>,
    now: u64,
) -> Vec<BlockEvent> {
    drops
        .into_iter()
        .map(|b| {
            let (peer, peer_labels) =
                peer_of(b.src).unwrap_or_else(|| ("outside-mesh".into(), BTreeMap::new()));
            let unspecified: IpAddr = if b.src.is_ipv4() {
                IpAddr::from([0, 0, 0, 0])
            } else {
                IpAddr::from([0u16; 8])
            };
            BlockEvent {
                at: now,
                host: host.to_string(),
                host_labels: host_labels.clone(),
                peer,
                peer_labels,
                direction: Direction::Inbound,
                proto: match b.proto {
                    meshd_hostnet::Proto::Tcp => meshd_policy::ip_proto::TCP,
                    meshd_hostnet::Proto::Udp => meshd_policy::ip_proto::UDP,
                },
                src: SocketAddr::new(b.src, 0),
                dst: SocketAddr::new(unspecified, b.port),
                reason: DenyReason::Plaintext,
                count: b.packets,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshd_policy::Grant;

    fn grants(inbound: &[(Proto, u16, u16, Option<u64>)]) -> PeerGrants {
        PeerGrants {
            deny: Default::default(),
            learn: false,
            outbound: vec![],
            inbound: inbound
                .iter()
                .map(|&(proto, lo, hi, exp)| Grant {
                    proto,
                    ports: (lo, hi),
                    expires_at: exp,
                    rule: "r".into(),
                })
                .collect(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn routes_allowed_ips_and_sources() {
        let db = grants(&[(Proto::Tcp, 1521, 1521, None), (Proto::Icmp, 0, 0, None)]);
        let none = PeerGrants::default();
        let peers = [
            PeerUnderlay {
                name: "db",
                transparent: true,
                addrs: vec![ip("198.18.0.2"), ip("fd00:18::2"), ip("198.18.0.2")],
                grants: &db,
            },
            PeerUnderlay {
                name: "overlay-only",
                transparent: false,
                addrs: vec![ip("198.18.0.3")],
                grants: &none,
            },
            PeerUnderlay {
                name: "far",
                transparent: true,
                addrs: vec![ip("198.19.5.5"), ip("127.0.0.1"), ip("100.64.0.9")],
                grants: &none,
            },
        ];
        let own = [
            net("198.18.0.1/24"),
            net("198.19.0.1/16"),
            net("fd00:18::1/64"),
        ];
        let p = plan(true, &peers, &own, &[net("100.64.0.0/10")], 0);
        assert_eq!(
            p.routes,
            vec![
                Route {
                    dst: ip("198.18.0.2"),
                    src: Some(ip("198.18.0.1"))
                },
                Route {
                    dst: ip("198.19.5.5"),
                    src: Some(ip("198.19.0.1"))
                },
                Route {
                    dst: ip("fd00:18::2"),
                    src: Some(ip("fd00:18::1"))
                },
            ]
        );
        assert_eq!(
            p.extra_allowed,
            vec![
                vec![net("198.18.0.2/32"), net("fd00:18::2/128")],
                vec![],
                vec![net("198.19.5.5/32")]
            ]
        );
        assert_eq!(p.covered.tcp, vec![(1521, 1521)]);
        assert!(p.covered.udp.is_empty());
        assert!(p.conflicts.is_empty());
        assert_eq!(p.protected.len(), 3);
    }

    #[test]
    fn overlay_host_plans_nothing() {
        let g = grants(&[(Proto::Tcp, 22, 22, None)]);
        let peers = [PeerUnderlay {
            name: "a",
            transparent: true,
            addrs: vec![ip("198.18.0.2")],
            grants: &g,
        }];
        let p = plan(false, &peers, &[net("198.18.0.1/24")], &[], 0);
        assert!(p.routes.is_empty() && p.covered == Covered::default());
        assert_eq!(p.extra_allowed, vec![Vec::<IpNet>::new()]);
    }

    #[test]
    fn shared_and_own_addresses_are_not_routed() {
        let none = PeerGrants::default();
        let peers = [
            PeerUnderlay {
                name: "a",
                transparent: true,
                addrs: vec![ip("198.18.0.9"), ip("198.18.0.1")],
                grants: &none,
            },
            PeerUnderlay {
                name: "b",
                transparent: true,
                addrs: vec![ip("198.18.0.9"), ip("198.18.0.4")],
                grants: &none,
            },
        ];
        let p = plan(true, &peers, &[net("198.18.0.1/24")], &[], 0);
        assert_eq!(p.conflicts, vec![ip("198.18.0.9")]);
        assert_eq!(p.routes.len(), 1);
        assert_eq!(p.routes[0].dst, ip("198.18.0.4"));
        assert_eq!(p.extra_allowed[0], vec![]);
    }

    #[test]
    fn covered_ports_follow_grants_and_expiry() {
        let g1 = grants(&[
            (Proto::Tcp, 8000, 8080, None),
            (Proto::Udp, 53, 53, Some(100)),
            (Proto::Tcp, 22, 22, Some(10)),
        ]);
        let g2 = grants(&[(Proto::Tcp, 8000, 8080, None), (Proto::Udp, 0, 0, None)]);
        let peers = [
            PeerUnderlay {
                name: "a",
                transparent: false,
                addrs: vec![],
                grants: &g1,
            },
            PeerUnderlay {
                name: "b",
                transparent: true,
                addrs: vec![],
                grants: &g2,
            },
        ];
        let p = plan(true, &peers, &[], &[], 50);
        assert_eq!(p.covered.tcp, vec![(8000, 8080)]);
        assert_eq!(p.covered.udp, vec![(53, 53)], "port 0 covers nothing");
        let any = grants(&[(Proto::Any, 0, u16::MAX, None)]);
        let p = plan(
            true,
            &[PeerUnderlay {
                name: "x",
                transparent: true,
                addrs: vec![],
                grants: &any,
            }],
            &[],
            &[],
            0,
        );
        assert_eq!(p.covered.tcp, vec![(1, u16::MAX)]);
        assert_eq!(p.covered.udp, vec![(1, u16::MAX)]);
    }

    #[test]
    fn plaintext_drops_name_the_peer_or_outside_mesh() {
        let drops = vec![
            Blocked {
                src: ip("198.18.0.2"),
                proto: meshd_hostnet::Proto::Tcp,
                port: 1521,
                packets: 3,
            },
            Blocked {
                src: ip("fd00:18::9"),
                proto: meshd_hostnet::Proto::Udp,
                port: 53,
                packets: 1,
            },
        ];
        let labels: BTreeMap<String, String> = [("app".to_string(), "db1".to_string())].into();
        let peer_of = |a: IpAddr| {
            (a == ip("198.18.0.2")).then(|| {
                let l = [("app".to_string(), "app1".to_string())].into();
                ("app1".to_string(), l)
            })
        };
        let ev = plaintext_events(drops, "db1", &labels, peer_of, 77);
        assert_eq!(ev.len(), 2);
        assert_eq!(
            (ev[0].peer.as_str(), ev[0].peer_labels["app"].as_str()),
            ("app1", "app1")
        );
        assert_eq!(ev[0].dst, "0.0.0.0:1521".parse().unwrap());
        assert_eq!(ev[0].proto, meshd_policy::ip_proto::TCP);
        assert_eq!((ev[0].count, ev[0].at), (3, 77));
        assert_eq!(ev[0].reason, DenyReason::Plaintext);
        assert_eq!(ev[0].host_labels, labels);
        assert_eq!(ev[1].peer, "outside-mesh");
        assert!(ev[1].peer_labels.is_empty());
        assert_eq!(ev[1].dst, "[::]:53".parse().unwrap());
        assert_eq!(ev[1].src, "[fd00:18::9]:0".parse().unwrap());
    }
}
