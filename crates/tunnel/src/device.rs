//! The device: our identity, the swappable peer table, and per-datagram decisions shared by
//! every worker. No IO: callers bring the bytes and send what comes back.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use parking_lot::Mutex;

use crate::destinations::Destinations;
use crate::keys::{PrivateKey, PublicKey};
use crate::packet;
use crate::peer::{Peer, PeerSpec};
use crate::table::{IndexAllocator, PeerDiff, PeerTable, RouteMemo, TableError};

/// Why a packet was dropped. Each reason has its own counter in [`DeviceCounters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Not a WireGuard message (bad type, size or reserved bits), or (outbound) not an IP
    /// packet.
    Malformed,
    /// No peer with that key or receiver index: the sender is not in our mesh.
    UnknownPeer,
    /// Handshake MAC wrong, or refused because we are under load without a valid cookie.
    Refused,
    /// Authentication failed, replayed data counter, or no session for the index.
    Decrypt,
    /// A handshake initiation whose timestamp is not newer than the last one accepted from
    /// that peer (a replay; WireGuard answers none), or unreadable.
    ReplayedInitiation,
    /// Decrypted, but not a valid IPv4 or IPv6 packet (bad version, or a header or length
    /// that does not fit the payload).
    MalformedInner,
    /// The decrypted packet's inner source is not in the sending peer's allowed IPs.
    SourceNotAllowed,
    /// The decrypted packet's inner destination is not this host (none of its own addresses,
    /// no routed prefix; see [`Destinations`]): a peer trying to use this host as a relay,
    /// or a broadcast or multicast address.
    InnerDestination,
    /// Outbound: no peer's allowed IPs hold the destination.
    NoRoute,
    /// Outbound: the peer has no known endpoint yet.
    NoEndpoint,
}

/// Device-wide drop counters (per-peer traffic counters live on [`Peer`]).
#[derive(Debug, Default)]
pub struct DeviceCounters {
    /// See [`DropReason::Malformed`].
    pub malformed: AtomicU64,
    /// See [`DropReason::UnknownPeer`].
    pub unknown_peer: AtomicU64,
    /// See [`DropReason::Refused`].
    pub refused: AtomicU64,
    /// See [`DropReason::Decrypt`].
    pub decrypt: AtomicU64,
    /// See [`DropReason::ReplayedInitiation`].
    pub replayed_initiation: AtomicU64,
    /// See [`DropReason::MalformedInner`].
    pub malformed_inner: AtomicU64,
    /// See [`DropReason::SourceNotAllowed`].
    pub source_not_allowed: AtomicU64,
    /// See [`DropReason::InnerDestination`].
    pub inner_destination: AtomicU64,
    /// See [`DropReason::NoRoute`].
    pub no_route: AtomicU64,
    /// See [`DropReason::NoEndpoint`].
    pub no_endpoint: AtomicU64,
    /// Cookie replies sent to handshake initiations that came while under load without a
    /// valid cookie MAC (not a drop: the initiator retries with the cookie).
    pub cookie_replies: AtomicU64,
}

impl DeviceCounters {
    /// Counts one drop.
    pub fn count(&self, reason: DropReason) {
        let c = match reason {
            DropReason::Malformed => &self.malformed,
            DropReason::UnknownPeer => &self.unknown_peer,
            DropReason::Refused => &self.refused,
            DropReason::Decrypt => &self.decrypt,
            DropReason::ReplayedInitiation => &self.replayed_initiation,
            DropReason::MalformedInner => &self.malformed_inner,
            DropReason::SourceNotAllowed => &self.source_not_allowed,
            DropReason::InnerDestination => &self.inner_destination,
            DropReason::NoRoute => &self.no_route,
            DropReason::NoEndpoint => &self.no_endpoint,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// `(name, value)` pairs of the drop counters, one per [`DropReason`], for status output
    /// ([`cookie_replies`](Self::cookie_replies) is not a drop and not listed).
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        [
            ("malformed", &self.malformed),
            ("unknown_peer", &self.unknown_peer),
            ("refused", &self.refused),
            ("decrypt", &self.decrypt),
            ("replayed_initiation", &self.replayed_initiation),
            ("malformed_inner", &self.malformed_inner),
            ("source_not_allowed", &self.source_not_allowed),
            ("inner_destination", &self.inner_destination),
            ("no_route", &self.no_route),
            ("no_endpoint", &self.no_endpoint),
        ]
        .into_iter()
        .map(|(n, c)| (n, c.load(Ordering::Relaxed)))
        .collect()
    }
}

/// The outcome of one received datagram.
#[must_use]
#[derive(Debug)]
pub enum Decap<'t, 'a> {
    /// Write this IP packet to the TUN; it came from `peer`, passed cryptokey routing and is
    /// addressed to this host (or a routed prefix).
    Deliver {
        /// The sending peer.
        peer: &'t Arc<Peer>,
        /// The decrypted IP packet.
        packet: &'a [u8],
    },
    /// Send `datagram` back to the sender (handshake response, keepalive, cookie reply).
    /// If `peer` is set, call [`Device::flush`] for it afterwards: packets queued during the
    /// handshake can go now.
    Reply {
        /// The peer whose handshake progressed, if any.
        peer: Option<&'t Arc<Peer>>,
        /// What to send.
        datagram: &'a [u8],
    },
    /// Consumed (keepalive, cookie); nothing to send.
    Done,
    /// Dropped and counted.
    Drop(DropReason),
}

/// The outcome of sealing one IP packet from the TUN.
#[must_use]
#[derive(Debug)]
pub enum Encap<'a> {
    /// Send `datagram` to `to` (a data message or, without a session yet, a handshake).
    Send {
        /// The peer's endpoint.
        to: SocketAddr,
        /// What to send.
        datagram: &'a [u8],
    },
    /// Queued inside the session until a handshake completes; nothing to send now.
    Queued,
    /// Dropped and counted.
    Drop(DropReason),
}

/// A worker's cached view of the peer table (see [`Device::table_cache`]).
pub type TableCache = arc_swap::Cache<Arc<ArcSwap<PeerTable>>, Arc<PeerTable>>;

/// A worker's cached view of the accepted inner destinations (see
/// [`Device::destinations_cache`]).
pub type DestinationsCache = arc_swap::Cache<Arc<ArcSwap<Destinations>>, Arc<Destinations>>;

/// Our side of the mesh: identity, peers and counters.
pub struct Device {
    identity: ArcSwap<Identity>,
    table: Arc<ArcSwap<PeerTable>>,
    destinations: Arc<ArcSwap<Destinations>>,
    alloc: Mutex<IndexAllocator>,
    /// Set by [`Device::set_private_key`]: the timers should start a handshake with every
    /// peer now (under the new key).
    initiate: AtomicBool,
    limit: u64,
    /// Drop counters.
    pub counters: DeviceCounters,
}

/// This host's static key and the handshake rate limiter keyed by its public half (MAC1).
struct Identity {
    private: PrivateKey,
    public: x25519_dalek::PublicKey,
    limiter: Arc<RateLimiter>,
}

impl Identity {
    fn new(private: PrivateKey, limit: u64) -> Self {
        let public = x25519_dalek::PublicKey::from(private.secret());
        Identity {
            limiter: Arc::new(RateLimiter::new(&public, limit)),
            private,
            public,
        }
    }
}

/// Handshakes per second above which we answer with cookies (WireGuard's "under load").
pub const HANDSHAKE_LOAD_LIMIT: u64 = 1000;

impl Device {
    /// A device with no peers that accepts no inner destination until
    /// [`set_destinations`](Self::set_destinations). `index_seed` should be random.
    pub fn new(private: PrivateKey, index_seed: u32) -> Self {
        Self::with_load_limit(private, index_seed, HANDSHAKE_LOAD_LIMIT)
    }

    /// As [`Device::new`], with a custom handshakes-per-second threshold for cookie replies.
    pub fn with_load_limit(private: PrivateKey, index_seed: u32, limit: u64) -> Self {
        Device {
            identity: ArcSwap::from_pointee(Identity::new(private, limit)),
            initiate: AtomicBool::new(false),
            limit,
            table: Arc::new(ArcSwap::from_pointee(PeerTable::default())),
            destinations: Arc::new(ArcSwap::from_pointee(Destinations::default())),
            alloc: Mutex::new(IndexAllocator::new(index_seed)),
            counters: DeviceCounters::default(),
        }
    }

    /// Our public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.identity.load().public.to_bytes())
    }

    /// Replaces the peer set while running: build, diff, swap. Unchanged peers keep sessions.
    pub fn set_peers(&self, specs: &[PeerSpec]) -> Result<PeerDiff, TableError> {
        let mut alloc = self.alloc.lock();
        let id = self.identity.load();
        let prev = self.table.load();
        let (table, diff) = PeerTable::build(&id.private, &id.limiter, specs, &prev, &mut alloc)?;
        self.table.store(Arc::new(table));
        Ok(diff)
    }

    /// Key rotation: this host's static key becomes `private`. Every peer's session restarts
    /// under it (peers that know the new key accept it at once; they keep the old one until
    /// the rotation completes) and the timers start a handshake with every peer on their next
    /// run ([`take_initiate_request`](Self::take_initiate_request)).
    pub fn set_private_key(&self, private: PrivateKey) {
        // Hold the table lock so no rebuild mixes the two keys.
        let _alloc = self.alloc.lock();
        let id = Arc::new(Identity::new(private, self.limit));
        self.identity.store(Arc::clone(&id));
        for peer in self.table.load().peers() {
            peer.set_own_key(&id.private, Arc::clone(&id.limiter));
        }
        self.initiate.store(true, Ordering::Release);
    }

    /// True once after [`set_private_key`](Self::set_private_key): send a handshake to every
    /// peer now.
    pub fn take_initiate_request(&self) -> bool {
        self.initiate.swap(false, Ordering::AcqRel)
    }

    /// The current peer table. Load once per batch.
    pub fn table(&self) -> Guard<Arc<PeerTable>> {
        self.table.load()
    }

    /// A view of the peer table for one worker thread: [`TableCache::load`] returns the
    /// current table after a single atomic read (no reference counting) while it is unchanged.
    pub fn table_cache(&self) -> TableCache {
        arc_swap::Cache::new(Arc::clone(&self.table))
    }

    /// Replaces the set of inner destinations peers may send to (this host's own addresses
    /// and routed prefixes) while running: built by the caller, swapped atomically. Returns
    /// false (and swaps nothing) if the set is unchanged.
    pub fn set_destinations(&self, destinations: Destinations) -> bool {
        if **self.destinations.load() == destinations {
            return false;
        }
        self.destinations.store(Arc::new(destinations));
        true
    }

    /// The current inner-destination set. Load once per batch.
    pub fn destinations(&self) -> Guard<Arc<Destinations>> {
        self.destinations.load()
    }

    /// A view of the destination set for one worker thread (see [`table_cache`](Self::table_cache)).
    pub fn destinations_cache(&self) -> DestinationsCache {
        arc_swap::Cache::new(Arc::clone(&self.destinations))
    }

    /// Call once a second: resets the handshake rate counter.
    pub fn tick_second(&self) {
        self.identity.load().limiter.reset_count();
    }

    /// Runs every peer's timers (rekey, retries, keepalives; call about every 100 ms) and
    /// hands each datagram to send to `send`.
    pub fn update_timers(&self, scratch: &mut [u8], mut send: impl FnMut(SocketAddr, &[u8])) {
        let table = self.table();
        for peer in table.peers() {
            let mut tunn = peer.lock();
            if let TunnResult::WriteToNetwork(d) = tunn.update_timers(scratch) {
                if let Some(ep) = peer.endpoint() {
                    send(ep, d);
                }
            }
        }
    }

    /// Starts a handshake with every peer that has an endpoint (at start-up: a restarted host
    /// re-establishes its tunnels at once instead of waiting for peers' rekey timers).
    pub fn initiate_all(&self, scratch: &mut [u8], mut send: impl FnMut(SocketAddr, &[u8])) {
        let table = self.table();
        for peer in table.peers() {
            let Some(ep) = peer.endpoint() else { continue };
            if let TunnResult::WriteToNetwork(d) =
                peer.lock().format_handshake_initiation(scratch, false)
            {
                send(ep, d);
            }
        }
    }

    /// Seals one IP packet for `peer` into `out` (at least `packet.len() + 32` and 148 bytes).
    pub fn encapsulate<'a>(
        &self,
        peer: &Peer,
        tunn: &mut Tunn,
        packet: &[u8],
        out: &'a mut [u8],
    ) -> Encap<'a> {
        let Some(to) = peer.endpoint() else {
            self.counters.count(DropReason::NoEndpoint);
            return Encap::Drop(DropReason::NoEndpoint);
        };
        if out.len() < (packet.len() + 32).max(148) {
            self.counters.count(DropReason::Malformed);
            return Encap::Drop(DropReason::Malformed);
        }
        match tunn.encapsulate(packet, out) {
            TunnResult::WriteToNetwork(d) => {
                peer.counters
                    .tx_bytes
                    .fetch_add(packet.len() as u64, Ordering::Relaxed);
                Encap::Send { to, datagram: d }
            }
            _ => Encap::Queued,
        }
    }

    /// Handles one datagram received from `from`, decrypting into `out` (≥ datagram length),
    /// against the current destination set (the packet path uses
    /// [`decapsulate_memo`](Self::decapsulate_memo) with the set it loaded for the batch).
    pub fn decapsulate<'t, 'a>(
        &self,
        table: &'t PeerTable,
        from: SocketAddr,
        datagram: &[u8],
        out: &'a mut [u8],
    ) -> Decap<'t, 'a> {
        let local = self.destinations.load();
        self.decapsulate_memo(
            table,
            &mut RouteMemo::default(),
            &local,
            from,
            datagram,
            out,
        )
    }

    /// [`decapsulate`](Self::decapsulate), checking the inner source through a worker's
    /// [`RouteMemo`] and the inner destination against `local`.
    pub fn decapsulate_memo<'t, 'a>(
        &self,
        table: &'t PeerTable,
        memo: &mut RouteMemo,
        local: &Destinations,
        from: SocketAddr,
        datagram: &[u8],
        out: &'a mut [u8],
    ) -> Decap<'t, 'a> {
        let drop = |reason| {
            self.counters.count(reason);
            Decap::Drop(reason)
        };
        let parsed = match Tunn::parse_incoming_packet(datagram) {
            Ok(p) => p,
            Err(_) => return drop(DropReason::Malformed),
        };
        let is_data = matches!(parsed, Packet::PacketData(_));
        let peer = match parsed {
            Packet::HandshakeInit(init) => {
                // Check MAC1 and load before the expensive DH that identifies the sender.
                let mut cookie = [0u8; 64];
                let id = self.identity.load();
                match id
                    .limiter
                    .verify_packet(Some(from.ip()), datagram, &mut cookie)
                {
                    Ok(_) => {}
                    Err(TunnResult::WriteToNetwork(c)) => {
                        let n = c.len();
                        out[..n].copy_from_slice(&cookie[..n]);
                        self.counters.cookie_replies.fetch_add(1, Ordering::Relaxed);
                        return Decap::Reply {
                            peer: None,
                            datagram: &out[..n],
                        };
                    }
                    Err(_) => return drop(DropReason::Refused),
                }
                match parse_handshake_anon(id.private.secret(), &id.public, &init) {
                    Ok(half) => table.get(&PublicKey(half.peer_static_public)),
                    Err(_) => None,
                }
            }
            Packet::HandshakeResponse(p) => table.by_receiver_index(p.receiver_idx),
            Packet::PacketCookieReply(p) => table.by_receiver_index(p.receiver_idx),
            Packet::PacketData(p) => table.by_receiver_index(p.receiver_idx),
        };
        let Some(peer) = peer else {
            return drop(DropReason::UnknownPeer);
        };
        let mut tunn = peer.lock();
        match tunn.decapsulate(Some(from.ip()), datagram, out) {
            TunnResult::Done => {
                peer.set_endpoint(from);
                peer.mark_heard();
                Decap::Done
            }
            // The session's own load check (the limiter counts each initiation twice) can
            // answer with a cookie too: not an authenticated packet, the endpoint stays.
            TunnResult::WriteToNetwork(d) if is_cookie_reply(d) => {
                self.counters.cookie_replies.fetch_add(1, Ordering::Relaxed);
                Decap::Reply {
                    peer: None,
                    datagram: d,
                }
            }
            TunnResult::WriteToNetwork(d) => {
                peer.set_endpoint(from);
                peer.mark_heard();
                Decap::Reply {
                    peer: Some(peer),
                    datagram: d,
                }
            }
            TunnResult::WriteToTunnelV4(p, src) => {
                self.admit(table, memo, local, peer, from, p, src.into())
            }
            TunnResult::WriteToTunnelV6(p, src) => {
                self.admit(table, memo, local, peer, from, p, src.into())
            }
            TunnResult::Err(WireGuardError::InvalidMac | WireGuardError::UnderLoad) => {
                drop(DropReason::Refused)
            }
            TunnResult::Err(
                WireGuardError::WrongTai64nTimestamp | WireGuardError::InvalidTai64nTimestamp,
            ) => drop(DropReason::ReplayedInitiation),
            // Only a data message's decrypted payload is checked for being an IP packet.
            TunnResult::Err(WireGuardError::InvalidPacket) if is_data => {
                drop(DropReason::MalformedInner)
            }
            TunnResult::Err(_) => drop(DropReason::Decrypt),
        }
    }

    /// Cryptokey routing on receive: the inner source must belong to the sending peer, and
    /// the inner destination must be this host (or a routed prefix).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn admit<'t, 'a>(
        &self,
        table: &'t PeerTable,
        memo: &mut RouteMemo,
        local: &Destinations,
        peer: &'t Arc<Peer>,
        from: SocketAddr,
        packet: &'a mut [u8],
        src: std::net::IpAddr,
    ) -> Decap<'t, 'a> {
        peer.set_endpoint(from);
        peer.mark_heard();
        match table.route_memo(memo, src) {
            // A rotating peer is one identity under both its keys.
            Some(owner) if Arc::ptr_eq(owner, peer) || table.same_identity(owner, peer) => {}
            _ => {
                peer.counters.rx_not_allowed.fetch_add(1, Ordering::Relaxed);
                self.counters.count(DropReason::SourceNotAllowed);
                return Decap::Drop(DropReason::SourceNotAllowed);
            }
        }
        // boringtun checked the version and that the length field fits; a length field
        // shorter than the fixed header still gets here.
        let reason = match packet::dst_addr(packet) {
            Some(dst) if local.accepts(dst) => {
                peer.counters
                    .rx_bytes
                    .fetch_add(packet.len() as u64, Ordering::Relaxed);
                return Decap::Deliver { peer, packet };
            }
            Some(_) => DropReason::InnerDestination,
            None => DropReason::MalformedInner,
        };
        self.counters.count(reason);
        Decap::Drop(reason)
    }

    /// After a [`Decap::Reply`] for `peer`: sends the packets queued during the handshake.
    pub fn flush(&self, peer: &Peer, out: &mut [u8], mut send: impl FnMut(SocketAddr, &[u8])) {
        let Some(to) = peer.endpoint() else { return };
        let mut tunn = peer.lock();
        // Bounded: boringtun's queue holds at most 256 packets.
        for _ in 0..1024 {
            match tunn.decapsulate(None, &[], out) {
                TunnResult::WriteToNetwork(d) => send(to, d),
                _ => break,
            }
        }
    }

    /// The destination peer for an outbound IP packet, or why there is none.
    pub fn route<'t>(
        &self,
        table: &'t PeerTable,
        packet: &[u8],
    ) -> Result<&'t Arc<Peer>, DropReason> {
        self.route_memo(table, &mut RouteMemo::default(), packet)
    }

    /// [`route`](Self::route) through a worker's [`RouteMemo`].
    pub fn route_memo<'t>(
        &self,
        table: &'t PeerTable,
        memo: &mut RouteMemo,
        packet: &[u8],
    ) -> Result<&'t Arc<Peer>, DropReason> {
        let reason = match packet::dst_addr(packet) {
            None => DropReason::Malformed,
            Some(dst) => match table.route_memo(memo, dst) {
                Some(p) => return Ok(p),
                None => DropReason::NoRoute,
            },
        };
        self.counters.count(reason);
        Err(reason)
    }
}

/// Whether a datagram the session wants sent is a cookie reply (message type 3).
fn is_cookie_reply(d: &[u8]) -> bool {
    d.len() == COOKIE_REPLY_LEN && d.first() == Some(&3)
}

/// Size of a WireGuard cookie reply message.
const COOKIE_REPLY_LEN: usize = 64;
