//! What a host enforces per peer: the compiled grants, as sent in network maps and checked on
//! the packet path. Everything not granted is denied.

use serde::{Deserialize, Serialize};

/// Seconds since the Unix epoch (defined once, in `meshd-time`).
pub use meshd_time::UnixTime;

/// IP protocol numbers the policy knows.
pub mod ip_proto {
    /// ICMP (IPv4).
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
}

/// The protocol part of a port spec (`tcp/…`, `udp/…`, `icmp`, `any`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP, with a port range.
    Tcp,
    /// UDP, with a port range.
    Udp,
    /// ICMP and ICMPv6 (no ports).
    Icmp,
    /// Every protocol and port.
    Any,
    /// Every IP protocol other than TCP, UDP, ICMP and ICMPv6 (what is left of `any` once a
    /// deny rule took some of it away; also written `other`).
    Other,
}

/// Which way a connection is opened, seen from the enforcing host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// This host opens a connection to the peer (checked before encrypting).
    Outbound,
    /// The peer opens a connection to this host (checked after decrypting).
    Inbound,
}

impl Direction {
    /// The other direction.
    pub fn reverse(self) -> Direction {
        match self {
            Direction::Outbound => Direction::Inbound,
            Direction::Inbound => Direction::Outbound,
        }
    }
}

/// Permission to open connections with `proto` to destination ports `ports.0..=ports.1`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Grant {
    /// Protocol.
    pub proto: Proto,
    /// Inclusive destination port range (ignored for `icmp` and `any`).
    pub ports: (u16, u16),
    /// When the grant stops working (agents enforce it themselves).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<UnixTime>,
    /// The rule that granted it (for block logs and `explain`).
    pub rule: String,
}

impl Grant {
    /// True if this grant admits a new flow of IP protocol `ip_proto` to `dst_port` at `now`.
    #[inline]
    pub fn admits(&self, ip_proto: u8, dst_port: u16, now: UnixTime) -> bool {
        if self.expires_at.is_some_and(|t| now >= t) {
            return false;
        }
        match self.proto {
            Proto::Any => true,
            Proto::Icmp => ip_proto == ip_proto::ICMP || ip_proto == ip_proto::ICMPV6,
            Proto::Tcp => ip_proto == ip_proto::TCP && self.in_range(dst_port),
            Proto::Udp => ip_proto == ip_proto::UDP && self.in_range(dst_port),
            Proto::Other => !matches!(
                ip_proto,
                ip_proto::TCP | ip_proto::UDP | ip_proto::ICMP | ip_proto::ICMPV6
            ),
        }
    }

    /// This grant without what any of `denied` admits (their expiry and rule are ignored): the
    /// pieces left, in port order, each with this grant's rule and expiry. `any` minus part of
    /// it splits into `tcp/…`, `udp/…`, `icmp` and `other` pieces.
    pub fn subtract(&self, denied: &[Grant]) -> Vec<Grant> {
        if denied.is_empty() {
            return vec![self.clone()];
        }
        if denied.iter().any(|d| d.proto == Proto::Any) {
            return Vec::new();
        }
        let piece = |proto, ports| Grant {
            proto,
            ports,
            expires_at: self.expires_at,
            rule: self.rule.clone(),
        };
        let hit = |proto| denied.iter().any(|d| d.proto == proto);
        let mut out = Vec::new();
        let ranges = |out: &mut Vec<Grant>, proto, (lo, hi): (u16, u16)| {
            let mut cut: Vec<(u16, u16)> = denied
                .iter()
                .filter(|d| d.proto == proto)
                .map(|d| d.ports)
                .collect();
            cut.sort_unstable();
            // `next`: the first port not yet covered or cut (u32 so 65536 means done).
            let mut next = u32::from(lo);
            for (a, b) in cut {
                if u32::from(b) < next {
                    continue;
                }
                if u32::from(a) > u32::from(hi) {
                    break;
                }
                if u32::from(a) > next {
                    out.push(piece(proto, (next as u16, a - 1)));
                }
                next = u32::from(b) + 1;
            }
            if next <= u32::from(hi) {
                out.push(piece(proto, (next as u16, hi)));
            }
        };
        match self.proto {
            Proto::Tcp | Proto::Udp => ranges(&mut out, self.proto, self.ports),
            Proto::Icmp | Proto::Other => {
                if !hit(self.proto) {
                    out.push(self.clone());
                }
            }
            Proto::Any => {
                ranges(&mut out, Proto::Tcp, (0, u16::MAX));
                ranges(&mut out, Proto::Udp, (0, u16::MAX));
                for p in [Proto::Icmp, Proto::Other] {
                    if !hit(p) {
                        out.push(piece(p, (0, 0)));
                    }
                }
            }
        }
        out
    }

    #[inline]
    fn in_range(&self, port: u16) -> bool {
        self.ports.0 <= port && port <= self.ports.1
    }
}

/// The grants between this host and one peer, both ways.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PeerGrants {
    /// Connections this host may open to the peer.
    #[serde(default)]
    pub outbound: Vec<Grant>,
    /// Connections the peer may open to this host.
    #[serde(default)]
    pub inbound: Vec<Grant>,
    /// Learning mode for this pair (this host or the peer is in a `learn` group): a new flow
    /// no grant admits still passes, and is tracked and reported as would-deny
    /// (`FlowVerdict::WouldDeny`) instead of being denied. Quarantine still denies.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub learn: bool,
    /// What deny rules forbid between the two (already taken out of `outbound` and `inbound`):
    /// the firewall names the deny rule when it drops such a flow, and learning mode never lets
    /// one through.
    #[serde(default, skip_serializing_if = "PeerDenies::is_empty")]
    pub deny: PeerDenies,
}

/// The deny rules between a host and one peer, both ways, as grants whose `rule` is the deny
/// rule's name (`expires_at` is always `None`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PeerDenies {
    /// Connections this host must never open to the peer.
    #[serde(default)]
    pub outbound: Vec<Grant>,
    /// Connections the peer must never open to this host.
    #[serde(default)]
    pub inbound: Vec<Grant>,
}

impl PeerDenies {
    /// True if no deny rule applies either way.
    pub fn is_empty(&self) -> bool {
        self.outbound.is_empty() && self.inbound.is_empty()
    }

    /// The first deny forbidding a new flow in `dir` of `ip_proto` to `dst_port`.
    #[inline]
    pub fn find(&self, dir: Direction, ip_proto: u8, dst_port: u16) -> Option<&Grant> {
        let list = match dir {
            Direction::Outbound => &self.outbound,
            Direction::Inbound => &self.inbound,
        };
        list.iter().find(|g| g.admits(ip_proto, dst_port, 0))
    }
}

impl PeerGrants {
    /// Everything both ways (static mode without rules: "the peers it lists are allowed").
    pub fn allow_all(rule: &str) -> PeerGrants {
        let any = Grant {
            proto: Proto::Any,
            ports: (0, u16::MAX),
            expires_at: None,
            rule: rule.to_string(),
        };
        PeerGrants {
            learn: false,
            outbound: vec![any.clone()],
            inbound: vec![any],
            deny: PeerDenies::default(),
        }
    }

    /// The first grant admitting a new flow in `dir`, if any.
    #[inline]
    pub fn find(
        &self,
        dir: Direction,
        ip_proto: u8,
        dst_port: u16,
        now: UnixTime,
    ) -> Option<&Grant> {
        let list = match dir {
            Direction::Outbound => &self.outbound,
            Direction::Inbound => &self.inbound,
        };
        list.iter().find(|g| g.admits(ip_proto, dst_port, now))
    }

    /// True if nothing is granted either way (deny lists do not make a peer).
    pub fn is_empty(&self) -> bool {
        self.outbound.is_empty() && self.inbound.is_empty()
    }

    /// The earliest expiry among the grants (when the agent must re-check open flows).
    pub fn next_expiry(&self, now: UnixTime) -> Option<UnixTime> {
        self.outbound
            .iter()
            .chain(&self.inbound)
            .filter_map(|g| g.expires_at)
            .filter(|&t| t > now)
            .min()
    }
}

/// Why a packet was denied.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "rule")]
pub enum DenyReason {
    /// No grant admits it (including a fresh mesh with no policy).
    DefaultDeny,
    /// The grant that admitted it has expired.
    Expired(String),
    /// The host or the peer is quarantined.
    Quarantined,
    /// Not the start of a connection and no tracked flow (e.g. a TCP segment without SYN).
    NoFlow,
    /// Transparent mode: plaintext to a port the policy covers, not through the tunnel.
    Plaintext,
    /// A deny rule (named) forbids it, whatever the allow rules and learning mode say.
    Denied(String),
}

impl std::fmt::Display for DenyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DenyReason::DefaultDeny => f.write_str("default deny"),
            DenyReason::Expired(r) => write!(f, "rule {r} expired"),
            DenyReason::Quarantined => f.write_str("quarantined"),
            DenyReason::NoFlow => f.write_str("no tracked flow"),
            DenyReason::Plaintext => {
                f.write_str("plaintext to a covered port (encryption required)")
            }
            DenyReason::Denied(r) => write!(f, "deny rule {r}"),
        }
    }
}

/// One denied flow as logged by the enforcing host and sent to the coordinator
/// (`meshctl blocks`). Rate-limited: `count` packets of the same flow were folded in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockEvent {
    /// When the first folded packet was denied.
    pub at: UnixTime,
    /// The enforcing host's name.
    pub host: String,
    /// Its labels.
    #[serde(default)]
    pub host_labels: std::collections::BTreeMap<String, String>,
    /// The other end's name (the peer whose key sent or would receive it).
    pub peer: String,
    /// Its labels.
    #[serde(default)]
    pub peer_labels: std::collections::BTreeMap<String, String>,
    /// Outbound: this host tried to open; inbound: the peer tried.
    pub direction: Direction,
    /// IP protocol number.
    pub proto: u8,
    /// Source address and port of the denied packet.
    pub src: std::net::SocketAddr,
    /// Destination address and port (port 0 for ICMP).
    pub dst: std::net::SocketAddr,
    /// Why.
    pub reason: DenyReason,
    /// Packets folded into this event.
    pub count: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(proto: Proto, lo: u16, hi: u16, exp: Option<u64>) -> Grant {
        Grant {
            proto,
            ports: (lo, hi),
            expires_at: exp,
            rule: "r".into(),
        }
    }

    #[test]
    fn protocols_ports_and_expiry() {
        let pg = PeerGrants {
            learn: false,
            outbound: vec![
                g(Proto::Tcp, 1521, 1521, None),
                g(Proto::Icmp, 0, 0, Some(100)),
            ],
            inbound: vec![g(Proto::Udp, 53, 53, None)],
            deny: PeerDenies::default(),
        };
        let out = Direction::Outbound;
        assert!(pg.find(out, ip_proto::TCP, 1521, 0).is_some());
        assert!(pg.find(out, ip_proto::TCP, 1522, 0).is_none());
        assert!(pg.find(out, ip_proto::UDP, 1521, 0).is_none());
        assert!(pg.find(out, ip_proto::ICMP, 0, 99).is_some());
        assert!(pg.find(out, ip_proto::ICMP, 0, 100).is_none(), "expired");
        assert!(pg.find(Direction::Inbound, ip_proto::UDP, 53, 0).is_some());
        assert!(pg.find(Direction::Inbound, ip_proto::TCP, 53, 0).is_none());
        assert_eq!(pg.next_expiry(50), Some(100));
        assert!(PeerGrants::allow_all("static")
            .find(Direction::Inbound, 132, 9, u64::MAX - 1)
            .is_some());
    }

    #[test]
    fn subtract_matches_a_port_by_port_model() {
        let protos = [
            Proto::Tcp,
            Proto::Udp,
            Proto::Icmp,
            Proto::Any,
            Proto::Other,
        ];
        let probes: Vec<(u8, u16)> = [ip_proto::TCP, ip_proto::UDP]
            .iter()
            .flat_map(|&p| (0..12u16).chain([65534, 65535]).map(move |port| (p, port)))
            .chain([
                (ip_proto::ICMP, 0),
                (ip_proto::ICMPV6, 0),
                (132, 0),
                (47, 0),
            ])
            .collect();
        let spec = |i: usize| {
            let proto = protos[i % 5];
            let lo = (i / 5 % 6) as u16;
            let hi = if i % 7 == 0 {
                u16::MAX
            } else {
                lo + (i / 30 % 4) as u16
            };
            match proto {
                Proto::Any => g(Proto::Any, 0, u16::MAX, Some(9)),
                Proto::Icmp | Proto::Other => g(proto, 0, 0, Some(9)),
                _ => g(proto, lo, hi, Some(9)),
            }
        };
        for a in 0..120 {
            let grant = spec(a);
            for n in 0..3 {
                let denied: Vec<Grant> = (0..n).map(|k| spec((a * 7 + k * 13 + 3) % 120)).collect();
                let left = grant.subtract(&denied);
                for &(p, port) in &probes {
                    let want =
                        grant.admits(p, port, 0) && !denied.iter().any(|d| d.admits(p, port, 0));
                    let got = left.iter().filter(|x| x.admits(p, port, 0)).count();
                    assert_eq!(
                        got,
                        usize::from(want),
                        "{grant:?} - {denied:?} at {p}/{port}: {left:?}"
                    );
                }
                assert!(left
                    .iter()
                    .all(|x| x.rule == "r" && x.expires_at == Some(9)));
            }
        }
        assert_eq!(
            g(Proto::Tcp, 1, 9, None).subtract(&[]),
            vec![g(Proto::Tcp, 1, 9, None)]
        );
        assert_eq!(
            g(Proto::Tcp, 1, 9, None).subtract(&[g(Proto::Tcp, 3, 4, None)]),
            vec![g(Proto::Tcp, 1, 2, None), g(Proto::Tcp, 5, 9, None)]
        );
    }
}
