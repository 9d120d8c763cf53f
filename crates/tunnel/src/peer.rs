//! One remote peer: its identity, its WireGuard session state and its counters.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::Tunn;
use ipnet::IpNet;
use meshd_policy::PeerGrants;
use parking_lot::{Mutex, MutexGuard};

use crate::keys::{PrivateKey, PublicKey};

/// What the operator (or the coordinator) says about a peer. The input to [`crate::PeerTable`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    /// Human name, unique in the table (shown by `meshd status`).
    pub name: String,
    /// The peer's identity.
    pub public_key: PublicKey,
    /// Where to send until the peer's authenticated packets say otherwise.
    pub endpoint: Option<SocketAddr>,
    /// Inner source addresses this peer may use; also our routes towards it.
    pub allowed_ips: Vec<IpNet>,
    /// Keepalive interval in seconds.
    pub persistent_keepalive: Option<u16>,
    /// Optional pre-shared key (the "psk" of Noise_IKpsk2).
    pub preshared_key: Option<[u8; 32]>,
    /// What this host and the peer may open to each other (default deny when empty).
    pub grants: Arc<PeerGrants>,
    /// The peer is rotating its key (issue 17): its next public key. The table keeps a second
    /// entry for it (same allowed IPs, grants and name) so the peer is accepted under both
    /// keys; traffic moves to the new key once it authenticated a packet.
    pub next_key: Option<PublicKey>,
}

impl PeerSpec {
    /// True if a change from `self` to `other` needs a new session (the handshake inputs differ).
    pub(crate) fn needs_new_session(&self, other: &PeerSpec) -> bool {
        self.public_key != other.public_key
            || self.preshared_key != other.preshared_key
            || self.persistent_keepalive != other.persistent_keepalive
    }
}

/// Per-peer traffic counters, updated lock-free by the workers.
#[derive(Debug, Default)]
pub struct PeerCounters {
    /// Decrypted bytes delivered to the TUN.
    pub rx_bytes: AtomicU64,
    /// Plaintext bytes sent through the tunnel.
    pub tx_bytes: AtomicU64,
    /// Decrypted packets whose inner source is not in this peer's allowed IPs.
    pub rx_not_allowed: AtomicU64,
}

/// A peer with live session state. Shared by the workers through the [`crate::PeerTable`].
pub struct Peer {
    /// The peer's identity.
    pub public_key: PublicKey,
    /// Our local 24-bit index: the upper bits of every receiver index the peer sends us.
    pub index: u32,
    spec: Mutex<PeerSpec>,
    endpoint: Mutex<Option<SocketAddr>>,
    tunn: Mutex<Tunn>,
    grants: ArcSwap<PeerGrants>,
    /// Set once a packet from this peer authenticated (a rotating peer's next key: the peer
    /// switched, so traffic goes to this entry).
    heard: AtomicBool,
    /// Traffic counters.
    pub counters: PeerCounters,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("public_key", &self.public_key)
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Peer {
    pub(crate) fn new(
        own: &PrivateKey,
        spec: PeerSpec,
        index: u32,
        limiter: Arc<RateLimiter>,
    ) -> Peer {
        let tunn = Tunn::new(
            own.secret().clone(),
            x25519_dalek::PublicKey::from(*spec.public_key.as_bytes()),
            spec.preshared_key,
            spec.persistent_keepalive,
            index,
            Some(limiter),
        );
        Peer {
            public_key: spec.public_key,
            index,
            endpoint: Mutex::new(spec.endpoint),
            grants: ArcSwap::new(Arc::clone(&spec.grants)),
            spec: Mutex::new(spec),
            tunn: Mutex::new(tunn),
            heard: AtomicBool::new(false),
            counters: PeerCounters::default(),
        }
    }

    /// This host's key changed: the session restarts under `own` (boringtun drops its
    /// sessions; the next handshake uses the new static key).
    pub(crate) fn set_own_key(&self, own: &PrivateKey, limiter: Arc<RateLimiter>) {
        let public = x25519_dalek::PublicKey::from(own.secret());
        self.tunn
            .lock()
            .set_static_private(own.secret().clone(), public, Some(limiter));
    }

    /// A copy of the current spec.
    pub fn spec(&self) -> PeerSpec {
        self.spec.lock().clone()
    }

    pub(crate) fn update_spec(&self, new: PeerSpec) {
        let mut spec = self.spec.lock();
        if spec.endpoint != new.endpoint && new.endpoint.is_some() {
            // The operator moved the peer: that wins over a roamed address.
            *self.endpoint.lock() = new.endpoint;
        }
        if spec.grants != new.grants {
            self.grants.store(Arc::clone(&new.grants));
        }
        *spec = new;
    }

    /// The current grants (load once per run of packets).
    pub fn grants(&self) -> arc_swap::Guard<Arc<PeerGrants>> {
        self.grants.load()
    }

    /// Where we currently send to this peer.
    pub fn endpoint(&self) -> Option<SocketAddr> {
        *self.endpoint.lock()
    }

    /// Roaming: an authenticated packet came from `addr`. Returns true if the endpoint changed.
    pub fn set_endpoint(&self, addr: SocketAddr) -> bool {
        let mut ep = self.endpoint.lock();
        if *ep == Some(addr) {
            return false;
        }
        *ep = Some(addr);
        true
    }

    /// Locks the session state. Hold it for a run of packets, not across IO waits.
    pub fn lock(&self) -> MutexGuard<'_, Tunn> {
        self.tunn.lock()
    }

    /// Whether a packet from this peer ever authenticated.
    pub fn heard(&self) -> bool {
        self.heard.load(Ordering::Relaxed)
    }

    /// Marks the peer as heard (checked first, so the hot path writes the line once).
    #[inline]
    pub(crate) fn mark_heard(&self) {
        if !self.heard.load(Ordering::Relaxed) {
            self.heard.store(true, Ordering::Relaxed);
        }
    }

    /// Time since the last completed handshake, if any.
    pub fn last_handshake(&self) -> Option<Duration> {
        self.tunn.lock().time_since_last_handshake()
    }
}
