//! The peer table: immutable once built, replaced whole (build, diff, swap) on every change.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use boringtun::noise::rate_limiter::RateLimiter;

use crate::allowed_ips::AllowedIps;
use crate::keys::{PrivateKey, PublicKey};
use crate::peer::{Peer, PeerSpec};

/// Why a peer set was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// Two specs carry the same public key.
    #[error("peer {0:?} listed twice")]
    DuplicateKey(String),
    /// A spec carries our own key.
    #[error("peer {0:?} has this host's own public key")]
    OwnKey(String),
}

/// A snapshot of all peers with the lookups the packet path needs.
#[derive(Default)]
pub struct PeerTable {
    peers: Vec<Arc<Peer>>,
    by_key: HashMap<PublicKey, usize>,
    by_index: HashMap<u32, usize>,
    routes: AllowedIps<usize>,
    /// Per slot, the slot of the peer's next-key entry while it rotates (empty when no peer
    /// rotates: the common case costs one length check).
    successor: Vec<Option<usize>>,
    /// Bumped on every rebuild.
    pub version: u64,
}

/// What a rebuild changed, for logs (`Display` prints one line per change).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PeerDiff {
    /// Names of new peers.
    pub added: Vec<String>,
    /// Names of peers that are gone.
    pub removed: Vec<String>,
    /// Peers whose handshake inputs changed: their session restarts.
    pub restarted: Vec<String>,
    /// Peers updated in place (endpoint, name, allowed IPs): sessions kept.
    pub updated: Vec<String>,
}

impl PeerDiff {
    /// True if nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.restarted.is_empty()
            && self.updated.is_empty()
    }
}

impl fmt::Display for PeerDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (sign, names) in [
            ("+", &self.added),
            ("-", &self.removed),
            ("!", &self.restarted),
            ("~", &self.updated),
        ] {
            for n in names {
                writeln!(f, "{sign} {n}")?;
            }
        }
        Ok(())
    }
}

/// Hands out the 24-bit local indices that route incoming packets to peers.
#[derive(Debug)]
pub struct IndexAllocator {
    next: u32,
}

impl IndexAllocator {
    /// Starts at `seed` (use a random value so restarts do not reuse indices).
    pub fn new(seed: u32) -> Self {
        IndexAllocator {
            next: seed & 0x00ff_ffff,
        }
    }

    fn allocate(&mut self, in_use: &HashMap<u32, usize>) -> u32 {
        loop {
            let idx = self.next;
            self.next = (self.next + 1) & 0x00ff_ffff;
            if !in_use.contains_key(&idx) {
                return idx;
            }
        }
    }
}

impl PeerTable {
    /// Builds the table for `specs`, keeping the live sessions of peers present in `prev`
    /// whose handshake inputs are unchanged.
    pub fn build(
        own: &PrivateKey,
        limiter: &Arc<RateLimiter>,
        specs: &[PeerSpec],
        prev: &PeerTable,
        alloc: &mut IndexAllocator,
    ) -> Result<(PeerTable, PeerDiff), TableError> {
        let own_pub = own.public_key();
        let mut table = PeerTable {
            version: prev.version + 1,
            ..PeerTable::default()
        };
        let mut diff = PeerDiff::default();
        // Indices of kept peers stay reserved, so never hand them to a new peer.
        let mut reserved: HashMap<u32, usize> = prev.by_index.clone();
        // A rotating peer's next key is a second entry right after its primary one.
        let mut expanded: Vec<(PeerSpec, Option<usize>)> = Vec::with_capacity(specs.len());
        for spec in specs {
            let primary = expanded.len();
            expanded.push((spec.clone(), None));
            if let Some(next) = spec.next_key.filter(|k| *k != spec.public_key) {
                let alias = PeerSpec {
                    public_key: next,
                    next_key: None,
                    ..spec.clone()
                };
                expanded.push((alias, Some(primary)));
            }
        }
        for (spec, alias_of) in &expanded {
            if spec.public_key == own_pub {
                return Err(TableError::OwnKey(spec.name.clone()));
            }
            if table.by_key.contains_key(&spec.public_key) {
                return Err(TableError::DuplicateKey(spec.name.clone()));
            }
            let peer = match prev.get(&spec.public_key) {
                Some(old) if !old.spec().needs_new_session(spec) => {
                    if old.spec() != *spec && alias_of.is_none() {
                        diff.updated.push(spec.name.clone());
                    }
                    old.update_spec(spec.clone());
                    Arc::clone(old)
                }
                Some(_) => {
                    if alias_of.is_none() {
                        diff.restarted.push(spec.name.clone());
                    }
                    let idx = alloc.allocate(&reserved);
                    reserved.insert(idx, usize::MAX);
                    Arc::new(Peer::new(own, spec.clone(), idx, Arc::clone(limiter)))
                }
                None => {
                    if alias_of.is_none() && !prev.has_name_rotated_from(spec) {
                        diff.added.push(spec.name.clone());
                    }
                    let idx = alloc.allocate(&reserved);
                    reserved.insert(idx, usize::MAX);
                    Arc::new(Peer::new(own, spec.clone(), idx, Arc::clone(limiter)))
                }
            };
            let slot = table.peers.len();
            match alias_of {
                // Only the primary entry routes; the next key is reached through it.
                Some(primary) => {
                    table.successor.resize(slot + 1, None);
                    table.successor[*primary] = Some(slot);
                }
                None => {
                    for net in &spec.allowed_ips {
                        table.routes.insert(net, slot);
                    }
                }
            }
            table.by_key.insert(peer.public_key, slot);
            table.by_index.insert(peer.index, slot);
            table.peers.push(peer);
        }
        for (i, old) in prev.peers.iter().enumerate() {
            if !table.by_key.contains_key(&old.public_key) && !prev.is_alias_slot(i) {
                let name = old.spec().name;
                // A rotation that completed: the peer's next key is now its key.
                let rotated = prev
                    .successor(i)
                    .is_some_and(|n| table.by_key.contains_key(&n.public_key));
                if rotated {
                    diff.updated.push(name);
                } else {
                    diff.removed.push(name);
                }
            }
        }
        Ok((table, diff))
    }

    /// Whether the new primary `spec` was the next key of a rotating peer in this table.
    fn has_name_rotated_from(&self, spec: &PeerSpec) -> bool {
        self.by_key
            .get(&spec.public_key)
            .is_some_and(|&i| self.is_alias_slot(i))
    }

    fn is_alias_slot(&self, slot: usize) -> bool {
        self.successor.contains(&Some(slot))
    }

    /// The next-key entry of the peer in `slot`, while it rotates.
    fn successor(&self, slot: usize) -> Option<&Arc<Peer>> {
        let s = (*self.successor.get(slot)?)?;
        self.peers.get(s)
    }

    /// The entry traffic for the peer in `slot` goes to: its next key once that key has
    /// authenticated a packet (the peer switched), else the slot's own.
    #[inline]
    fn resolve(&self, slot: usize) -> Option<&Arc<Peer>> {
        if let Some(next) = self.successor(slot) {
            if next.heard() {
                return Some(next);
            }
        }
        self.peers.get(slot)
    }

    /// Whether `a` and `b` are the same peer: one entry, or a rotating peer's two keys.
    #[inline]
    pub fn same_identity(&self, a: &Arc<Peer>, b: &Arc<Peer>) -> bool {
        if Arc::ptr_eq(a, b) {
            return true;
        }
        let (Some(&ia), Some(&ib)) = (
            self.by_key.get(&a.public_key),
            self.by_key.get(&b.public_key),
        ) else {
            return false;
        };
        self.successor.get(ia) == Some(&Some(ib)) || self.successor.get(ib) == Some(&Some(ia))
    }

    /// All peers, in spec order.
    pub fn peers(&self) -> &[Arc<Peer>] {
        &self.peers
    }

    /// The peer with this public key.
    pub fn get(&self, key: &PublicKey) -> Option<&Arc<Peer>> {
        self.by_key.get(key).map(|&i| &self.peers[i])
    }

    /// The peer that owns local index `receiver_idx >> 8`.
    pub fn by_receiver_index(&self, receiver_idx: u32) -> Option<&Arc<Peer>> {
        self.by_index
            .get(&(receiver_idx >> 8))
            .map(|&i| &self.peers[i])
    }

    /// Cryptokey routing: the peer whose allowed IPs hold `ip` most specifically.
    pub fn route(&self, ip: IpAddr) -> Option<&Arc<Peer>> {
        self.routes.lookup(ip).and_then(|&i| self.resolve(i))
    }

    /// [`route`](Self::route) through a worker's one-entry memo: packets to the address the
    /// worker routed last (a flow's run, a ping) skip the prefix-tree walk, whose nodes are
    /// cache misses once the path has been idle for a few milliseconds.
    pub fn route_memo(&self, memo: &mut RouteMemo, ip: IpAddr) -> Option<&Arc<Peer>> {
        if let Some((version, addr, i)) = memo.last {
            if version == self.version && addr == ip {
                return self.resolve(i);
            }
        }
        let i = *self.routes.lookup(ip)?;
        memo.last = Some((self.version, ip, i));
        self.resolve(i)
    }
}

/// One worker's memo for [`PeerTable::route_memo`]: the last address it routed, to which
/// peer, in which table version (every rebuild bumps the version, so a memo never outlives
/// the table it was taken from).
#[derive(Debug, Default, Clone, Copy)]
pub struct RouteMemo {
    last: Option<(u64, IpAddr, usize)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, key: &PrivateKey, ip: &str) -> PeerSpec {
        PeerSpec {
            next_key: None,
            name: name.into(),
            public_key: key.public_key(),
            endpoint: None,
            allowed_ips: vec![ip.parse().unwrap()],
            persistent_keepalive: None,
            preshared_key: None,
            grants: Default::default(),
        }
    }

    #[test]
    fn route_memo_answers_as_the_tree_and_forgets_on_rebuild() {
        let own = PrivateKey::generate();
        let limiter = Arc::new(RateLimiter::new(
            &x25519_dalek::PublicKey::from(own.secret()),
            100,
        ));
        let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
        let mut alloc = IndexAllocator::new(7);
        let specs = vec![
            spec("a", &ka, "100.64.0.0/24"),
            spec("b", &kb, "100.64.0.7/32"),
        ];
        let (t1, _) =
            PeerTable::build(&own, &limiter, &specs, &PeerTable::default(), &mut alloc).unwrap();
        let mut memo = RouteMemo::default();
        for ip in [
            "100.64.0.7",
            "100.64.0.7",
            "100.64.0.8",
            "100.64.0.7",
            "100.65.0.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let via_memo = t1.route_memo(&mut memo, ip).map(|p| p.public_key);
            let via_tree = t1.route(ip).map(|p| p.public_key);
            assert_eq!(via_memo, via_tree, "{ip}");
        }
        // The next table routes 100.64.0.7 to `a`: a memo from the old table is not used.
        let ip: IpAddr = "100.64.0.7".parse().unwrap();
        assert_eq!(
            t1.route_memo(&mut memo, ip).map(|p| p.public_key),
            Some(kb.public_key())
        );
        let (t2, _) = PeerTable::build(&own, &limiter, &specs[..1], &t1, &mut alloc).unwrap();
        assert_eq!(
            t2.route_memo(&mut memo, ip).map(|p| p.public_key),
            Some(ka.public_key())
        );
    }

    #[test]
    fn rebuild_keeps_unchanged_sessions() {
        let own = PrivateKey::generate();
        let limiter = Arc::new(RateLimiter::new(
            &x25519_dalek::PublicKey::from(own.secret()),
            100,
        ));
        let (ka, kb, kc) = (
            PrivateKey::generate(),
            PrivateKey::generate(),
            PrivateKey::generate(),
        );
        let mut alloc = IndexAllocator::new(7);
        let v1 = vec![
            spec("a", &ka, "100.64.0.2/32"),
            spec("b", &kb, "100.64.0.3/32"),
        ];
        let (t1, d1) =
            PeerTable::build(&own, &limiter, &v1, &PeerTable::default(), &mut alloc).unwrap();
        assert_eq!(d1.added, vec!["a", "b"]);

        let mut b2 = spec("b", &kb, "100.64.0.9/32");
        b2.persistent_keepalive = Some(25);
        let v2 = vec![
            spec("a", &ka, "100.64.0.2/32"),
            b2,
            spec("c", &kc, "100.64.0.4/32"),
        ];
        let (t2, d2) = PeerTable::build(&own, &limiter, &v2, &t1, &mut alloc).unwrap();
        assert_eq!(d2.added, vec!["c"]);
        assert_eq!(d2.restarted, vec!["b"]);
        assert!(d2.removed.is_empty());
        let a1 = t1.get(&ka.public_key()).unwrap();
        let a2 = t2.get(&ka.public_key()).unwrap();
        assert!(Arc::ptr_eq(a1, a2), "unchanged peer keeps its session");
        assert!(!Arc::ptr_eq(
            t1.get(&kb.public_key()).unwrap(),
            t2.get(&kb.public_key()).unwrap()
        ));
        // Routes follow the new spec; indices stay unique.
        assert_eq!(
            t2.route("100.64.0.9".parse().unwrap()).unwrap().public_key,
            kb.public_key()
        );
        assert!(t2.route("100.64.0.3".parse().unwrap()).is_none());
        let mut idx: Vec<u32> = t2.peers().iter().map(|p| p.index).collect();
        idx.sort();
        idx.dedup();
        assert_eq!(idx.len(), 3);
        assert_eq!(
            t2.by_receiver_index(a2.index << 8 | 3).unwrap().public_key,
            ka.public_key()
        );

        let (_t3, d3) = PeerTable::build(&own, &limiter, &v2[..1], &t2, &mut alloc).unwrap();
        assert_eq!(d3.removed, vec!["b", "c"]);
    }

    #[test]
    fn grant_changes_keep_the_session() {
        let own = PrivateKey::generate();
        let limiter = Arc::new(RateLimiter::new(
            &x25519_dalek::PublicKey::from(own.secret()),
            100,
        ));
        let k = PrivateKey::generate();
        let mut alloc = IndexAllocator::new(0);
        let v1 = vec![spec("a", &k, "100.64.0.2/32")];
        let (t1, _) =
            PeerTable::build(&own, &limiter, &v1, &PeerTable::default(), &mut alloc).unwrap();
        assert!(t1.peers()[0].grants().is_empty());
        let mut v2 = v1.clone();
        v2[0].grants = Arc::new(meshd_policy::PeerGrants::allow_all("r"));
        let (t2, d) = PeerTable::build(&own, &limiter, &v2, &t1, &mut alloc).unwrap();
        assert_eq!(d.updated, vec!["a"]);
        assert!(Arc::ptr_eq(&t1.peers()[0], &t2.peers()[0]));
        assert!(!t2.peers()[0].grants().is_empty());
    }

    #[test]
    fn refuses_duplicates_and_own_key() {
        let own = PrivateKey::generate();
        let limiter = Arc::new(RateLimiter::new(
            &x25519_dalek::PublicKey::from(own.secret()),
            100,
        ));
        let k = PrivateKey::generate();
        let mut alloc = IndexAllocator::new(0);
        let dup = vec![
            spec("a", &k, "100.64.0.2/32"),
            spec("b", &k, "100.64.0.3/32"),
        ];
        assert!(matches!(
            PeerTable::build(&own, &limiter, &dup, &PeerTable::default(), &mut alloc),
            Err(TableError::DuplicateKey(_))
        ));
        let me = vec![spec("me", &own, "100.64.0.2/32")];
        assert!(matches!(
            PeerTable::build(&own, &limiter, &me, &PeerTable::default(), &mut alloc),
            Err(TableError::OwnKey(_))
        ));
    }
}
