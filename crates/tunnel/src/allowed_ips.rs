//! Longest-prefix match from an overlay address to a peer (cryptokey routing).

use std::net::IpAddr;

use ip_network::IpNetwork;
use ip_network_table::IpNetworkTable;
use ipnet::IpNet;

/// A longest-prefix-match table from IP prefixes to values.
pub struct AllowedIps<T> {
    table: IpNetworkTable<T>,
}

impl<T> Default for AllowedIps<T> {
    fn default() -> Self {
        AllowedIps {
            table: IpNetworkTable::new(),
        }
    }
}

/// Converts an `ipnet` prefix (host bits may be set) into the table's network type.
fn to_network(net: &IpNet) -> IpNetwork {
    let net = net.trunc();
    match IpNetwork::new(net.addr(), net.prefix_len()) {
        Ok(n) => n,
        // Unreachable for a truncated IpNet (prefix length is validated by ipnet); fall back
        // to a host route rather than panic.
        Err(_) => IpNetwork::from(net.addr()),
    }
}

impl<T> AllowedIps<T> {
    /// Inserts `net`, returning the value it replaced.
    pub fn insert(&mut self, net: &IpNet, value: T) -> Option<T> {
        self.table.insert(to_network(net), value)
    }

    /// The value of the most specific prefix containing `ip`.
    pub fn lookup(&self, ip: IpAddr) -> Option<&T> {
        self.table.longest_match(ip).map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn longest_prefix_wins() {
        let mut t = AllowedIps::default();
        t.insert(&"100.64.0.0/10".parse().unwrap(), 1);
        t.insert(&"100.64.0.2/32".parse().unwrap(), 2);
        t.insert(&"fd00::/8".parse().unwrap(), 3);
        assert_eq!(t.lookup("100.64.0.2".parse().unwrap()), Some(&2));
        assert_eq!(t.lookup("100.64.0.3".parse().unwrap()), Some(&1));
        assert_eq!(t.lookup("198.18.0.1".parse().unwrap()), None);
        assert_eq!(t.lookup("fd00::5".parse().unwrap()), Some(&3));
    }

    /// Naive model: scan every prefix, keep the longest one that contains the address.
    fn naive(nets: &[(IpNet, usize)], ip: IpAddr) -> Option<usize> {
        let mut best: Option<(u8, usize)> = None;
        for (n, v) in nets {
            if n.contains(&ip) && best.is_none_or(|(len, _)| n.prefix_len() >= len) {
                best = Some((n.prefix_len(), *v));
            }
        }
        best.map(|(_, v)| v)
    }

    proptest! {
        #[test]
        fn agrees_with_naive_model(
            nets in proptest::collection::vec((any::<u32>(), 0u8..=32), 0..40),
            probes in proptest::collection::vec(any::<u32>(), 1..60),
        ) {
            // Keep only the last value for duplicate prefixes, as insert replaces.
            let mut model: Vec<(IpNet, usize)> = Vec::new();
            let mut table = AllowedIps::default();
            for (i, (addr, len)) in nets.iter().enumerate() {
                let net = IpNet::new(IpAddr::from(addr.to_be_bytes()), *len).unwrap().trunc();
                model.retain(|(n, _)| *n != net);
                model.push((net, i));
                table.insert(&net, i);
            }
            for p in probes {
                let ip = IpAddr::from(p.to_be_bytes());
                prop_assert_eq!(table.lookup(ip).copied(), naive(&model, ip));
            }
        }
    }
}
