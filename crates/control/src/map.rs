//! Network maps (what one agent needs to know about its peers) and deltas between versions.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use meshd_tunnel::PublicKey;
use serde::{Deserialize, Serialize};

use crate::model::{Host, Labels};

/// One peer as an agent sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// Host name.
    pub name: String,
    /// WireGuard public key.
    pub public_key: PublicKey,
    /// Overlay addresses (v4 first); the peer's allowed IPs as /32 and /128.
    pub addresses: Vec<IpAddr>,
    /// Underlay endpoints to try, observed first, then reported.
    pub endpoints: Vec<SocketAddr>,
    /// Labels (for policy).
    pub labels: Labels,
    /// What this agent may open to the peer and the peer to it (default deny: empty).
    #[serde(default)]
    pub grants: meshd_policy::PeerGrants,
    /// The peer runs in transparent mode: its underlay addresses are reached through the tunnel
    /// by peers that run in transparent mode too.
    #[serde(default)]
    pub transparent: bool,
    /// The peer is rotating its key: its proved next key, accepted as the same peer until
    /// the rotation completes (then it is `public_key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_public_key: Option<PublicKey>,
}

impl Peer {
    /// The peer record of a host.
    pub fn from_host(h: &Host) -> Peer {
        Peer {
            name: h.name.clone(),
            public_key: h.public_key,
            addresses: h.addresses(),
            endpoints: h.endpoints(),
            labels: h.labels.clone(),
            grants: meshd_policy::PeerGrants::default(),
            transparent: h.transparent,
            next_public_key: h.pending_key,
        }
    }

    /// The peer record of a host with the grants between the agent and it.
    pub fn with_grants(h: &Host, grants: meshd_policy::PeerGrants) -> Peer {
        Peer {
            grants,
            ..Peer::from_host(h)
        }
    }
}

/// A versioned peer list for one agent. Serde-able so the daemon can persist it (fail-static).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetworkMap {
    /// Version; strictly increases for a given agent.
    pub version: u64,
    /// Peers sorted by public key, no duplicates. Shared (`Arc`): a copy of the map, which an
    /// agent makes for every delta it applies (one for the session, one published), copies
    /// pointers, not peer records (the records of 600 peers were most of a 10,000-agent
    /// simulation's CPU). On the wire a peer is its record (serde's `rc`).
    pub peers: Vec<Arc<Peer>>,
}

/// The changes that turn the map at `from_version` into the map at `to_version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapDelta {
    /// The version this applies to.
    pub from_version: u64,
    /// The version after applying.
    pub to_version: u64,
    /// Peers added or changed (full records).
    pub upserts: Vec<Peer>,
    /// Peers gone (by key).
    pub removals: Vec<PublicKey>,
}

impl MapDelta {
    /// Nothing changes.
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removals.is_empty()
    }
}

/// Why a delta could not be applied (the agent should ask for a full map).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// The delta was made against another version.
    #[error("delta is from version {delta_from} but the map is at version {have}")]
    VersionMismatch {
        /// The map's version.
        have: u64,
        /// The delta's base.
        delta_from: u64,
    },
}

impl NetworkMap {
    /// Builds a map from peers in any order (sorted and deduplicated by key, last wins).
    pub fn new(version: u64, peers: impl IntoIterator<Item = Peer>) -> Self {
        let m: BTreeMap<PublicKey, Peer> = peers.into_iter().map(|p| (p.public_key, p)).collect();
        NetworkMap {
            version,
            peers: m.into_values().map(Arc::new).collect(),
        }
    }

    /// The peer with this key.
    pub fn peer(&self, key: &PublicKey) -> Option<&Peer> {
        self.peers
            .binary_search_by(|p| p.public_key.cmp(key))
            .ok()
            .map(|i| &*self.peers[i])
    }

    /// Applies a delta in place; on error the map is unchanged.
    pub fn apply(&mut self, d: &MapDelta) -> Result<(), DeltaError> {
        if d.from_version != self.version {
            return Err(DeltaError::VersionMismatch {
                have: self.version,
                delta_from: d.from_version,
            });
        }
        for k in &d.removals {
            if let Ok(i) = self.peers.binary_search_by(|p| p.public_key.cmp(k)) {
                self.peers.remove(i);
            }
        }
        for p in &d.upserts {
            match self
                .peers
                .binary_search_by(|x| x.public_key.cmp(&p.public_key))
            {
                Ok(i) => self.peers[i] = Arc::new(p.clone()),
                Err(i) => self.peers.insert(i, Arc::new(p.clone())),
            }
        }
        self.version = d.to_version;
        Ok(())
    }

    /// The delta from `self` to `new`.
    pub fn diff(&self, new: &NetworkMap) -> MapDelta {
        let mut upserts = Vec::new();
        let mut removals = Vec::new();
        let (mut i, mut j) = (0, 0);
        let (a, b) = (&self.peers, &new.peers);
        while i < a.len() || j < b.len() {
            match (a.get(i), b.get(j)) {
                (Some(x), Some(y)) if x.public_key == y.public_key => {
                    if x != y {
                        upserts.push(Peer::clone(y));
                    }
                    i += 1;
                    j += 1;
                }
                (Some(x), Some(y)) if x.public_key < y.public_key => {
                    removals.push(x.public_key);
                    i += 1;
                }
                (Some(_), Some(y)) => {
                    upserts.push(Peer::clone(y));
                    j += 1;
                }
                (Some(x), None) => {
                    removals.push(x.public_key);
                    i += 1;
                }
                (None, Some(y)) => {
                    upserts.push(Peer::clone(y));
                    j += 1;
                }
                (None, None) => break,
            }
        }
        MapDelta {
            from_version: self.version,
            to_version: new.version,
            upserts,
            removals,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn peer(k: u8, ep: u16) -> Peer {
        Peer {
            name: format!("h{k}"),
            public_key: PublicKey([k; 32]),
            addresses: vec![IpAddr::from([100, 64, 0, k])],
            endpoints: vec![SocketAddr::from(([192, 0, 2, k], ep))],
            labels: Labels::new(),
            grants: Default::default(),
            transparent: k % 2 == 0,
            next_public_key: None,
        }
    }

    fn arb_map(version: u64) -> impl Strategy<Value = NetworkMap> {
        proptest::collection::vec((0u8..12, 0u16..3), 0..12)
            .prop_map(move |v| NetworkMap::new(version, v.into_iter().map(|(k, e)| peer(k, e))))
    }

    proptest! {
        #[test]
        fn diff_then_apply_is_identity(a in arb_map(1), b in arb_map(2)) {
            let d = a.diff(&b);
            let mut c = a.clone();
            c.apply(&d).unwrap();
            prop_assert_eq!(c, b);
        }
    }

    #[test]
    fn version_mismatch_leaves_map() {
        let mut a = NetworkMap::new(3, [peer(1, 1)]);
        let d = MapDelta {
            from_version: 2,
            to_version: 4,
            upserts: vec![],
            removals: vec![PublicKey([1; 32])],
        };
        assert_eq!(
            a.apply(&d),
            Err(DeltaError::VersionMismatch {
                have: 3,
                delta_from: 2
            })
        );
        assert_eq!(a.peers.len(), 1);
        assert!(a.peer(&PublicKey([1; 32])).is_some());
    }

    #[test]
    fn serde_roundtrip() {
        let a = NetworkMap::new(3, [peer(1, 1), peer(2, 2)]);
        let s = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<NetworkMap>(&s).unwrap(), a);
    }
}
