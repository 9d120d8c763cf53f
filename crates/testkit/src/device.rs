//! One host's data plane, in memory: meshd's [`Device`] (keys, peer table, cryptokey routing,
//! sealing and opening) and identity [`Firewall`] fed the peers' grants from the network map,
//! wired the way meshd's data path wires them (`meshd/src/dataplane`): route → firewall
//! (outbound) → encapsulate on the way out; decapsulate → firewall (inbound) → deliver on the
//! way in, grants loaded from the peer and versioned by the peer table's version.
//!
//! This is the one type to swap for a pump of meshd's real data path over fake TUN/UDP edges:
//! the harness only calls [`SimDevice::apply_map`], [`SimDevice::send`],
//! [`SimDevice::receive`] and [`SimDevice::tick`].
//!
//! Timers: boringtun's `Tunn` reads the monotonic clock itself, so virtual time cannot move its
//! timers (its `mock-instant` feature is one process-wide clock and, unified into a workspace
//! build, would freeze every other test's tunnels). The device therefore does not run them; it
//! drives the two that matter in virtual time itself, as boringtun's would fire: a handshake
//! initiation not answered within [`REKEY_TIMEOUT`] is resent, and a session this side
//! initiated is re-keyed once it is [`REKEY_AFTER_TIME`] old (a fresh initiation on the live
//! session; the old keys still open packets in flight until the new ones are confirmed).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use boringtun::noise::TunnResult;
use meshd_control::NetworkMap;
use meshd_firewall::{Firewall, Stats, Verdict};
use meshd_policy::Direction;
use meshd_tunnel::{
    Decap, Destinations, Device, DropReason, Encap, PeerDiff, PeerSpec, PrivateKey, PublicKey,
    TableError,
};

/// WireGuard's REKEY_AFTER_TIME: a session this old is replaced by its initiator.
pub const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
/// WireGuard's REKEY_TIMEOUT: an unanswered handshake initiation is resent after this.
pub const REKEY_TIMEOUT: Duration = Duration::from_secs(5);

/// WireGuard message types (first byte of every datagram).
pub mod msg {
    /// Handshake initiation.
    pub const INITIATION: u8 = 1;
    /// Handshake response.
    pub const RESPONSE: u8 = 2;
    /// Cookie reply.
    pub const COOKIE: u8 = 3;
    /// Transport data (also keepalives).
    pub const DATA: u8 = 4;
}

/// A datagram the device wants sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Destination endpoint.
    pub to: SocketAddr,
    /// The WireGuard message.
    pub datagram: Vec<u8>,
}

/// Why an outbound packet went nowhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// The tunnel dropped it (no route, no endpoint, malformed).
    Tunnel(DropReason),
    /// The firewall denied or dropped it.
    Firewall(Verdict),
}

/// What one received datagram produced.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Received {
    /// The decrypted inner packet, if one was delivered (after the firewall), with its peer.
    pub delivered: Option<(PublicKey, Vec<u8>)>,
    /// Datagrams to send back (handshake responses, keepalives, queued packets).
    pub transmits: Vec<Transmit>,
    /// Why the tunnel dropped the datagram, if it did.
    pub tunnel_drop: Option<DropReason>,
    /// The firewall's verdict on a decrypted packet it did not allow.
    pub firewall_drop: Option<Verdict>,
}

#[derive(Debug, Default, Clone, Copy)]
struct HandshakeClock {
    /// When we last sent an initiation that is not answered yet.
    pending_since: Option<Instant>,
    /// When the current session this side initiated was confirmed.
    initiated_at: Option<Instant>,
}

/// One host's device and firewall. See the module docs.
pub struct SimDevice {
    device: Device,
    firewall: Firewall<u32>,
    clocks: BTreeMap<PublicKey, HandshakeClock>,
    scratch: Vec<u8>,
    last_second: Option<Instant>,
}

impl std::fmt::Debug for SimDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimDevice")
            .field("public_key", &self.device.public_key())
            .finish_non_exhaustive()
    }
}

const SCRATCH: usize = 65_536 + 148;

impl SimDevice {
    /// A device with no peers; `seed` makes its peer indices and flow hash deterministic.
    pub fn new(key: PrivateKey, seed: u32) -> Self {
        SimDevice {
            device: Device::new(key, seed),
            firewall: Firewall::new(meshd_firewall::Config {
                hash_seed: Some(u64::from(seed)),
                ..meshd_firewall::Config::default()
            }),
            clocks: BTreeMap::new(),
            scratch: vec![0; SCRATCH],
            last_second: None,
        }
    }

    /// Our public key.
    pub fn public_key(&self) -> PublicKey {
        self.device.public_key()
    }

    /// The inner destinations peers may send to: this host's overlay addresses.
    pub fn set_addresses(&self, overlay: &[IpAddr]) {
        self.device
            .set_destinations(Destinations::new(overlay.iter().copied(), &[]));
    }

    /// Programs the peer table from a map (build, diff, swap: unchanged peers keep sessions).
    pub fn apply_map(&mut self, map: &NetworkMap) -> Result<PeerDiff, TableError> {
        let diff = self
            .device
            .set_peers(&meshd_control::specs::peer_specs(map))?;
        let table = self.device.table();
        self.clocks
            .retain(|k, _| table.peers().iter().any(|p| p.public_key == *k));
        Ok(diff)
    }

    /// Removes every peer (a refused host drops its tunnels).
    pub fn clear(&mut self) {
        // An empty spec list cannot clash.
        let _empty = self.device.set_peers(&[]);
        self.clocks.clear();
    }

    /// The peers now in the table: key → (spec, current endpoint).
    pub fn peers(&self) -> BTreeMap<PublicKey, (PeerSpec, Option<SocketAddr>)> {
        self.device
            .table()
            .peers()
            .iter()
            .map(|p| (p.public_key, (p.spec(), p.endpoint())))
            .collect()
    }

    /// The tunnel's drop counters that are not zero.
    pub fn tunnel_drops(&self) -> Vec<(&'static str, u64)> {
        let mut v = self.device.counters.snapshot();
        v.retain(|c| c.1 > 0);
        v
    }

    /// The firewall's counters.
    pub fn firewall_stats(&self) -> Stats {
        self.firewall.stats()
    }

    /// Sends one inner IP packet from this host's stack: route, firewall (outbound), seal.
    pub fn send(
        &mut self,
        now: Instant,
        unix_ms: u64,
        packet: &[u8],
    ) -> Result<Vec<Transmit>, SendError> {
        let table = self.device.table();
        let peer = self
            .device
            .route(&table, packet)
            .map_err(SendError::Tunnel)?;
        let grants = peer.grants();
        let v = self.firewall.check(
            peer.index,
            &grants,
            table.version,
            Direction::Outbound,
            packet,
            unix_ms,
        );
        if !v.is_allow() {
            return Err(SendError::Firewall(v));
        }
        let mut tunn = peer.lock();
        let mut out = vec![0u8; (packet.len() + 32).max(148)];
        match self.device.encapsulate(peer, &mut tunn, packet, &mut out) {
            Encap::Send { to, datagram } => {
                if datagram.first() == Some(&msg::INITIATION) {
                    self.clocks
                        .entry(peer.public_key)
                        .or_default()
                        .pending_since = Some(now);
                }
                Ok(vec![Transmit {
                    to,
                    datagram: datagram.to_vec(),
                }])
            }
            Encap::Queued => Ok(Vec::new()),
            Encap::Drop(r) => Err(SendError::Tunnel(r)),
        }
    }

    /// Handles one datagram from `from`: decapsulate, firewall (inbound), deliver.
    pub fn receive(
        &mut self,
        now: Instant,
        unix_ms: u64,
        from: SocketAddr,
        datagram: &[u8],
    ) -> Received {
        let table = self.device.table();
        let mut out = vec![0u8; datagram.len().max(148)];
        let mut r = Received::default();
        let kind = datagram.first().copied();
        match self.device.decapsulate(&table, from, datagram, &mut out) {
            Decap::Deliver { peer, packet } => {
                let grants = peer.grants();
                let v = self.firewall.check(
                    peer.index,
                    &grants,
                    table.version,
                    Direction::Inbound,
                    packet,
                    unix_ms,
                );
                if v.is_allow() {
                    r.delivered = Some((peer.public_key, packet.to_vec()));
                } else {
                    r.firewall_drop = Some(v);
                }
            }
            Decap::Reply { peer, datagram: d } => {
                r.transmits.push(Transmit {
                    to: from,
                    datagram: d.to_vec(),
                });
                if let Some(peer) = peer {
                    if kind == Some(msg::RESPONSE) {
                        // Our initiation was answered: the session is ours and fresh.
                        let c = self.clocks.entry(peer.public_key).or_default();
                        c.pending_since = None;
                        c.initiated_at = Some(now);
                    }
                    let transmits = &mut r.transmits;
                    self.device.flush(peer, &mut self.scratch, |to, d| {
                        transmits.push(Transmit {
                            to,
                            datagram: d.to_vec(),
                        });
                    });
                }
            }
            Decap::Done => {}
            Decap::Drop(reason) => r.tunnel_drop = Some(reason),
        }
        r
    }

    /// Runs the device's timers at `now` (call every 100 ms of virtual time): handshake
    /// retries and rekeying (see the module docs), the handshake rate limiter's second, and
    /// the firewall's sweep.
    pub fn tick(&mut self, now: Instant, unix_ms: u64) -> Vec<Transmit> {
        if self
            .last_second
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
        {
            self.device.tick_second();
            self.firewall.sweep_all(unix_ms);
            self.last_second = Some(now);
        }
        let mut out = Vec::new();
        let table = self.device.table();
        for peer in table.peers() {
            let c = self.clocks.entry(peer.public_key).or_default();
            let retry = c
                .pending_since
                .is_some_and(|t| now.saturating_duration_since(t) >= REKEY_TIMEOUT);
            let rekey = c.pending_since.is_none()
                && c.initiated_at
                    .is_some_and(|t| now.saturating_duration_since(t) >= REKEY_AFTER_TIME);
            if !(retry || rekey) {
                continue;
            }
            let Some(to) = peer.endpoint() else { continue };
            let mut tunn = peer.lock();
            if let TunnResult::WriteToNetwork(d) =
                tunn.format_handshake_initiation(&mut self.scratch, retry)
            {
                out.push(Transmit {
                    to,
                    datagram: d.to_vec(),
                });
                c.pending_since = Some(now);
            }
        }
        out
    }
}
