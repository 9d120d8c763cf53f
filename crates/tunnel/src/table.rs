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
        for spec in specs {
            if spec.public_key == own_pub {
                return Err(TableError::OwnKey(spec.name.clone()));
            }
            if table.by_key.contains_key(&spec.public_key) {
                return Err(TableError::DuplicateKey(spec.name.clone()));
            }
            let peer = match prev.get(&spec.public_key) {
                Some(old) if !old.spec().needs_new_session(spec) => {
                    if old.spec() != *spec {
                        diff.updated.push(spec.name.clone());
                    }
                    old.update_spec(spec.clone());
                    Arc::clone(old)
                }
                Some(_) => {
                    diff.restarted.push(spec.name.clone());
                    let idx = alloc.allocate(&reserved);
                    reserved.insert(idx, usize::MAX);
                    Arc::new(Peer::new(own, spec.clone(), idx, Arc::clone(limiter)))
                }
                None => {
                    diff.added.push(spec.name.clone());
                    let idx = alloc.allocate(&reserved);
                    reserved.insert(idx, usize::MAX);
                    Arc::new(Peer::new(own, spec.clone(), idx, Arc::clone(limiter)))
                }
            };
            let slot = table.peers.len();
            for net in &spec.allowed_ips {
                table.routes.insert(net, slot);
            }
            table.by_key.insert(peer.public_key, slot);
            table.by_index.insert(peer.index, slot);
            table.peers.push(peer);
        }
        for old in &prev.peers {
            if !table.by_key.contains_key(&old.public_key) {
                diff.removed.push(old.spec().name);
            }
        }
        Ok((table, diff))
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
        self.routes.lookup(ip).map(|&i| &self.peers[i])
    }

    /// [`route`](Self::route) through a worker's one-entry memo: packets to the address the
    /// worker routed last (a flow's run, a ping) skip the prefix-tree walk, whose nodes are
    /// cache misses once the path has been idle for a few milliseconds.
    pub fn route_memo(&self, memo: &mut RouteMemo, ip: IpAddr) -> Option<&Arc<Peer>> {
        if let Some((version, addr, i)) = memo.last {
            if version == self.version && addr == ip {
                return self.peers.get(i);
            }
        }
        let i = *self.routes.lookup(ip)?;
        memo.last = Some((self.version, ip, i));
        self.peers.get(i)
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
