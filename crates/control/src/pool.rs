//! Overlay address allocation from a configurable CIDR.
//!
//! Rules (deterministic): the network address and the first host address (`.1` of the pool,
//! kept free for a future coordinator/DNS service address) are never handed out, nor is the
//! broadcast address. Allocation returns the lowest free address, so addresses freed by removed
//! hosts are reused first. With an IPv6 prefix (at most /96), a host's v6 address is the prefix
//! with the v4 address in its low 32 bits.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// The default pool: the CGNAT range, as Tailscale and others use.
pub const DEFAULT_POOL: &str = "100.64.0.0/10";

/// Why the pool could not be built or could not allocate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// Prefix longer than /30 leaves no usable address after the reserved ones.
    #[error("pool {0} is too small (use a prefix of /30 or shorter)")]
    TooSmall(Ipv4Net),
    /// IPv6 prefix longer than /96 cannot embed a v4 address.
    #[error("IPv6 pool {0} must be /96 or shorter")]
    V6TooSmall(Ipv6Net),
    /// All addresses are in use.
    #[error("address pool {0} is exhausted")]
    Exhausted(Ipv4Net),
    /// An address being restored lies outside the pool or is reserved.
    #[error("address {0} is not allocatable from pool {1}")]
    OutOfPool(Ipv4Addr, Ipv4Net),
    /// An address being restored is already taken.
    #[error("address {0} is already allocated")]
    Duplicate(Ipv4Addr),
}

/// The overlay address pool.
#[derive(Debug, Clone)]
pub struct IpPool {
    v4: Ipv4Net,
    v6: Option<Ipv6Net>,
    used: BTreeSet<u32>,
}

impl IpPool {
    /// A pool over `v4` (and optionally `v6`), nothing allocated.
    pub fn new(v4: Ipv4Net, v6: Option<Ipv6Net>) -> Result<Self, PoolError> {
        let v4 = v4.trunc();
        if v4.prefix_len() > 30 {
            return Err(PoolError::TooSmall(v4));
        }
        if let Some(n) = v6 {
            if n.prefix_len() > 96 {
                return Err(PoolError::V6TooSmall(n));
            }
        }
        Ok(IpPool {
            v4,
            v6: v6.map(|n| n.trunc()),
            used: BTreeSet::new(),
        })
    }

    /// The v4 network.
    pub fn network(&self) -> Ipv4Net {
        self.v4
    }

    /// The v6 prefix, if any.
    pub fn network_v6(&self) -> Option<Ipv6Net> {
        self.v6
    }

    fn first(&self) -> u32 {
        u32::from(self.v4.network()) + 2
    }

    fn last(&self) -> u32 {
        u32::from(self.v4.broadcast()) - 1
    }

    /// The v6 address paired with a v4 address, if the pool has a v6 prefix.
    pub fn v6_for(&self, v4: Ipv4Addr) -> Option<Ipv6Addr> {
        self.v6
            .map(|n| Ipv6Addr::from(u128::from(n.network()) | u128::from(u32::from(v4))))
    }

    /// Allocates the lowest free address.
    pub fn allocate(&mut self) -> Result<(Ipv4Addr, Option<Ipv6Addr>), PoolError> {
        let mut candidate = self.first();
        for &u in self.used.range(candidate..) {
            if u != candidate {
                break;
            }
            candidate = match candidate.checked_add(1) {
                Some(c) => c,
                None => return Err(PoolError::Exhausted(self.v4)),
            };
        }
        if candidate > self.last() {
            return Err(PoolError::Exhausted(self.v4));
        }
        self.used.insert(candidate);
        let a = Ipv4Addr::from(candidate);
        Ok((a, self.v6_for(a)))
    }

    /// Marks an existing host's address as used (when restoring from storage).
    pub fn reserve(&mut self, a: Ipv4Addr) -> Result<(), PoolError> {
        let u = u32::from(a);
        if u < self.first() || u > self.last() {
            return Err(PoolError::OutOfPool(a, self.v4));
        }
        if !self.used.insert(u) {
            return Err(PoolError::Duplicate(a));
        }
        Ok(())
    }

    /// Frees an address (its host was removed). Freeing an unknown address does nothing.
    pub fn release(&mut self, a: Ipv4Addr) {
        self.used.remove(&u32::from(a));
    }

    /// Number of allocated addresses.
    pub fn allocated(&self) -> usize {
        self.used.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pool(s: &str) -> IpPool {
        IpPool::new(s.parse().unwrap(), None).unwrap()
    }

    #[test]
    fn skips_reserved_and_reuses() {
        let mut p = pool("10.0.0.0/29");
        let got: Vec<_> = (0..5)
            .map(|_| p.allocate().unwrap().0.to_string())
            .collect();
        assert_eq!(
            got,
            ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
        );
        assert_eq!(
            p.allocate(),
            Err(PoolError::Exhausted("10.0.0.0/29".parse().unwrap()))
        );
        p.release("10.0.0.4".parse().unwrap());
        assert_eq!(p.allocate().unwrap().0.to_string(), "10.0.0.4");
    }

    #[test]
    fn v6_and_restore() {
        let mut p = IpPool::new(
            DEFAULT_POOL.parse().unwrap(),
            Some("fd00:6d65:7368::/96".parse().unwrap()),
        )
        .unwrap();
        p.reserve("100.64.0.2".parse().unwrap()).unwrap();
        assert_eq!(
            p.reserve("100.64.0.2".parse().unwrap()),
            Err(PoolError::Duplicate("100.64.0.2".parse().unwrap()))
        );
        assert!(p.reserve("100.64.0.1".parse().unwrap()).is_err());
        let (a, b) = p.allocate().unwrap();
        assert_eq!(a.to_string(), "100.64.0.3");
        assert_eq!(b.unwrap().to_string(), "fd00:6d65:7368::6440:3");
        assert!(IpPool::new("10.0.0.0/31".parse().unwrap(), None).is_err());
    }

    proptest! {
        #[test]
        fn never_duplicates_and_lowest_first(ops in proptest::collection::vec(any::<Option<u8>>(), 1..200)) {
            let mut p = pool("10.1.0.0/24");
            let mut held: BTreeSet<Ipv4Addr> = BTreeSet::new();
            for op in ops {
                match op {
                    None => if let Ok((a, _)) = p.allocate() {
                        prop_assert!(held.insert(a));
                        // Lowest free: every lower allocatable address is held.
                        for u in (u32::from(Ipv4Addr::new(10,1,0,2)))..u32::from(a) {
                            prop_assert!(held.contains(&Ipv4Addr::from(u)));
                        }
                        prop_assert!(a != Ipv4Addr::new(10,1,0,255) && a != Ipv4Addr::new(10,1,0,1));
                    },
                    Some(i) => if let Some(&a) = held.iter().nth(usize::from(i) % held.len().max(1)) {
                        held.remove(&a);
                        p.release(a);
                    },
                }
            }
            prop_assert_eq!(p.allocated(), held.len());
        }
    }
}
