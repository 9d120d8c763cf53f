//! Which inner destinations this host accepts from peers: its own addresses, plus the
//! prefixes the operator routes through it. Checked on every decrypted packet, so it is a
//! pair of small sorted arrays (a binary search per packet, no allocation, no lock); the set
//! is replaced whole ([`crate::Device::set_destinations`]) and loaded once per batch.

use std::net::IpAddr;

use ipnet::IpNet;

/// The inner destinations a peer may send to through this host.
///
/// A decrypted packet is delivered only if its destination is one of this host's own
/// addresses (overlay addresses; in transparent mode also the underlay addresses peers reach
/// through the tunnel) or lies in a routed prefix. Everything else, in particular another
/// host's address (using this host as a relay), broadcast and multicast, is refused unless a
/// routed prefix explicitly covers it. The default accepts nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Destinations {
    /// Own IPv4 addresses, sorted, unique.
    v4: Vec<u32>,
    /// Own IPv6 addresses, sorted, unique.
    v6: Vec<u128>,
    /// Routed IPv4 prefixes as (network, mask).
    routed_v4: Vec<(u32, u32)>,
    /// Routed IPv6 prefixes as (network, mask).
    routed_v6: Vec<(u128, u128)>,
    /// The routed prefixes as given (truncated), for status output.
    routed: Vec<IpNet>,
}

/// Whether `ip` can be a unicast address of this host that a peer may reach.
fn own_unicast(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_unspecified() || v4.is_loopback() || v4.is_multicast() || v4.is_broadcast())
        }
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_loopback() || v6.is_multicast()),
    }
}

fn mask_v4(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

fn mask_v6(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

impl Destinations {
    /// This host's own addresses `own` (loopback, unspecified, multicast and the limited
    /// broadcast address are left out: no peer may target them) and the operator's `routed`
    /// prefixes (accepted whole, whatever they contain).
    pub fn new(own: impl IntoIterator<Item = IpAddr>, routed: &[IpNet]) -> Self {
        let mut d = Destinations::default();
        for ip in own.into_iter().filter(|ip| own_unicast(*ip)) {
            match ip {
                IpAddr::V4(v4) => d.v4.push(u32::from(v4)),
                IpAddr::V6(v6) => d.v6.push(u128::from(v6)),
            }
        }
        d.v4.sort_unstable();
        d.v4.dedup();
        d.v6.sort_unstable();
        d.v6.dedup();
        let mut routed: Vec<IpNet> = routed.iter().map(IpNet::trunc).collect();
        routed.sort();
        routed.dedup();
        for net in &routed {
            match net {
                IpNet::V4(n) => {
                    let m = mask_v4(n.prefix_len());
                    d.routed_v4.push((u32::from(n.network()) & m, m));
                }
                IpNet::V6(n) => {
                    let m = mask_v6(n.prefix_len());
                    d.routed_v6.push((u128::from(n.network()) & m, m));
                }
            }
        }
        d.routed = routed;
        d
    }

    /// Whether a decrypted packet to `dst` may be delivered.
    #[inline]
    pub fn accepts(&self, dst: IpAddr) -> bool {
        match dst {
            IpAddr::V4(v4) => {
                let a = u32::from(v4);
                self.v4.binary_search(&a).is_ok()
                    || self.routed_v4.iter().any(|&(net, m)| a & m == net)
            }
            IpAddr::V6(v6) => {
                let a = u128::from(v6);
                self.v6.binary_search(&a).is_ok()
                    || self.routed_v6.iter().any(|&(net, m)| a & m == net)
            }
        }
    }

    /// This host's own addresses in the set.
    pub fn own(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let v4 = self.v4.iter().map(|&a| IpAddr::from(a.to_be_bytes()));
        let v6 = self.v6.iter().map(|&a| IpAddr::from(a.to_be_bytes()));
        v4.chain(v6)
    }

    /// The routed prefixes (host bits cleared, sorted).
    pub fn routed(&self) -> &[IpNet] {
        &self.routed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn own_addresses_only_by_default() {
        let d = Destinations::new([ip("100.64.0.1"), ip("fd00::1"), ip("198.18.0.1")], &[]);
        assert!(d.accepts(ip("100.64.0.1")));
        assert!(d.accepts(ip("fd00::1")));
        assert!(d.accepts(ip("198.18.0.1")));
        for other in [
            "100.64.0.2",
            "100.127.255.255",
            "255.255.255.255",
            "224.0.0.1",
            "0.0.0.0",
            "fd00::2",
            "ff02::1",
        ] {
            assert!(!d.accepts(ip(other)), "{other}");
        }
        assert!(!Destinations::default().accepts(ip("100.64.0.1")));
    }

    #[test]
    fn loopback_multicast_and_broadcast_never_count_as_own() {
        let d = Destinations::new(
            [
                ip("127.0.0.1"),
                ip("224.0.0.1"),
                ip("255.255.255.255"),
                ip("0.0.0.0"),
                ip("::1"),
                ip("ff02::1"),
            ],
            &[],
        );
        assert_eq!(d.own().count(), 0);
        assert!(!d.accepts(ip("224.0.0.1")));
        assert!(!d.accepts(ip("ff02::1")));
    }

    #[test]
    fn routed_prefixes_are_accepted_whole() {
        let d = Destinations::new(
            [ip("100.64.0.1")],
            &[net("10.1.2.3/16"), net("fd10::/64"), net("224.0.0.0/4")],
        );
        assert!(d.accepts(ip("10.1.0.0")));
        assert!(d.accepts(ip("10.1.255.255")));
        assert!(!d.accepts(ip("10.2.0.1")));
        assert!(d.accepts(ip("fd10::77")));
        assert!(!d.accepts(ip("fd11::77")));
        // Multicast only because a routed prefix names it.
        assert!(d.accepts(ip("239.1.1.1")));
        assert_eq!(
            d.routed(),
            &[net("10.1.0.0/16"), net("224.0.0.0/4"), net("fd10::/64")]
        );
        let all = Destinations::new([], &[net("0.0.0.0/0"), net("::/0")]);
        assert!(all.accepts(ip("203.0.113.9")));
        assert!(all.accepts(ip("2001:db8::1")));
    }

    /// Naive model: the address is one of ours (and unicast) or in a routed prefix.
    fn naive(own: &[IpAddr], routed: &[IpNet], dst: IpAddr) -> bool {
        (own.contains(&dst) && own_unicast(dst)) || routed.iter().any(|n| n.contains(&dst))
    }

    proptest! {
        #[test]
        fn agrees_with_naive_model(
            own in proptest::collection::vec(any::<u32>(), 0..8),
            routed in proptest::collection::vec((any::<u32>(), 0u8..=32), 0..5),
            probes in proptest::collection::vec(any::<u32>(), 1..40),
        ) {
            let own: Vec<IpAddr> = own.iter().map(|a| IpAddr::from(a.to_be_bytes())).collect();
            let routed: Vec<IpNet> = routed
                .iter()
                .map(|(a, l)| IpNet::new(IpAddr::from(a.to_be_bytes()), *l).unwrap())
                .collect();
            let d = Destinations::new(own.iter().copied(), &routed);
            // Probe our own addresses, their neighbours and random ones.
            let extra = own.iter().filter_map(|a| match a {
                IpAddr::V4(v) => Some(u32::from(*v).wrapping_add(1)),
                IpAddr::V6(_) => None,
            });
            for p in probes.into_iter().chain(extra) {
                let dst = IpAddr::from(p.to_be_bytes());
                prop_assert_eq!(d.accepts(dst), naive(&own, &routed, dst));
            }
            for a in &own {
                prop_assert_eq!(d.accepts(*a), naive(&own, &routed, *a));
            }
        }
    }
}
