//! One host's data plane, in memory: meshd's REAL packet path — its [`Pump`] over the fake
//! edges ([`FakeTun`](meshd::dataplane::FakeTun), [`FakeBind`](meshd::dataplane::FakeBind)),
//! running the tx, rx and timer code the daemon's worker threads run, with meshd's [`Device`]
//! and [`Enforcement`] (identity firewall and block log) — adapted to the harness's fake
//! links:
//!
//! - [`SimDevice::send`]: the packet goes into the host's fake TUN (as the host's stack
//!   would write it); a tx pass routes it, checks it against the firewall and seals it; what
//!   the fake bind emitted comes back as [`Transmit`]s for the harness's
//!   [`Network`](crate::link::Network) to carry (latency, loss, reordering, MTU, partitions,
//!   the wire log).
//! - [`SimDevice::receive`]: a datagram the link delivered goes into the fake bind with its
//!   source address; an rx pass opens it, checks it and writes it to the fake TUN, whose
//!   delivery is the received packet; answers (handshake responses, keepalives, queued
//!   packets) come back as [`Transmit`]s.
//! - [`SimDevice::apply_map`]: maps become peer tables as meshd's host applies them
//!   (`meshd_control::peer_specs`, then `Device::set_peers`: build, diff, swap; grants travel
//!   with each peer and the firewall re-checks flows against the table version lazily), and
//!   [`SimDevice::set_addresses`] the local destinations through meshd's
//!   `local_destinations`.
//! - [`SimDevice::tick`]: the data path's timer pass, the host's once-a-second firewall sweep,
//!   and the virtual-time handshake timers below.
//!
//! Each host has a [`FakeNet`] of its own with nobody else on it: the fake bind records what
//! the path sends there (taken out after each pass) and never delivers it itself; the
//! harness's links do.
//!
//! # Time
//!
//! Virtual time (the harness [`Clock`](crate::time::Clock)) is what the pump is given: the
//! firewall's verdicts and flow expiry, grant expiry, the block log's stamps, the paths'
//! activity stamps, the once-a-second handshake rate-limit reset and the timer pass's
//! schedule all follow it. boringtun's session state does not: its `Tunn` reads the
//! monotonic clock itself (its `mock-instant` feature is one process-wide clock and, unified
//! into a workspace build, would freeze every other test's tunnels), so the WireGuard timers
//! the pump's timer pass runs (`update_timers`: retries, rekey, keepalives, session expiry)
//! see only the few real milliseconds a test lasts and in practice never fire. The two that
//! matter are driven here in virtual time instead, as boringtun's would fire: a handshake
//! initiation not answered within [`REKEY_TIMEOUT`] is resent, and a session this side
//! initiated is re-keyed once it is [`REKEY_AFTER_TIME`] old (a fresh initiation on the live
//! session; the old keys still open packets in flight until the new ones are confirmed), and
//! data sent with nothing heard back from the peer for [`UNANSWERED_TIMEOUT`] starts a new
//! handshake (the peer may have dropped and re-added us, losing the session we still use).
//! Persistent keepalives (the map's `persistent_keepalive`, 25 s) are sent here too, on a live
//! session to which nothing was sent for that long: without them a peer that roamed while
//! its last packet from the old address was still in flight would never be followed (meshd
//! relies on them for exactly that). All of these leave through the fake bind like
//! everything else. Session expiry (`REJECT_AFTER_TIME`) and boringtun's cookie timers do
//! not run in virtual time.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::TunnResult;
use ipnet::IpNet;
use meshd::dataplane::{
    local_destinations, Bind as _, Enforcement, Fake, FakeHost, FakeNet, Now, Pump,
};
use meshd_control::NetworkMap;
use meshd_firewall::{BlockLog, BlockLogConfig, Firewall, Stats};
use meshd_tunnel::{Device, DropReason, PeerDiff, PeerSpec, PrivateKey, PublicKey, TableError};

/// WireGuard's REKEY_AFTER_TIME: a session this old is replaced by its initiator.
pub const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
/// WireGuard's REKEY_TIMEOUT: an unanswered handshake initiation is resent after this.
pub const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
/// WireGuard's KEEPALIVE_TIMEOUT + REKEY_TIMEOUT: data sent and nothing heard back for this
/// long starts a new handshake (the peer may have lost the session).
pub const UNANSWERED_TIMEOUT: Duration = Duration::from_secs(15);
/// The TUN MTU of every simulated host (meshd's default).
pub const TUN_MTU: u16 = 1420;

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

/// Why the firewall did not let a packet through: the [`Stats`] counter its verdict moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirewallDrop {
    /// No grant admits the new flow.
    DefaultDeny,
    /// The only matching grant has expired.
    Expired,
    /// Quarantined.
    Quarantined,
    /// Not a connection start and no tracked flow.
    NoFlow,
    /// Unreadable, the flow table full, the peer's share used up or an untracked fragment.
    Dropped,
}

impl FirewallDrop {
    /// What moved between two snapshots of the firewall's counters, if anything did.
    fn between(before: &Stats, after: &Stats) -> Option<FirewallDrop> {
        let moved = |a: u64, b: u64| b > a;
        if moved(before.default_deny, after.default_deny) {
            Some(FirewallDrop::DefaultDeny)
        } else if moved(before.expired, after.expired) {
            Some(FirewallDrop::Expired)
        } else if moved(before.quarantined, after.quarantined) {
            Some(FirewallDrop::Quarantined)
        } else if moved(before.no_flow, after.no_flow) {
            Some(FirewallDrop::NoFlow)
        } else if moved(
            before.malformed_total()
                + before.table_full
                + before.peer_limit
                + before.untracked_fragment,
            after.malformed_total()
                + after.table_full
                + after.peer_limit
                + after.untracked_fragment,
        ) {
            Some(FirewallDrop::Dropped)
        } else {
            None
        }
    }
}

/// Why an outbound packet went nowhere (read from the data path's drop counters, as an
/// operator reads them in `meshd status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// The tunnel dropped it (no route, no endpoint, malformed).
    Tunnel(DropReason),
    /// The firewall denied or dropped it.
    Firewall(FirewallDrop),
    /// The fake TUN could not be read (a bug in the harness or the path).
    Io(std::io::ErrorKind),
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
    /// Why the firewall did not let the decrypted packet through, if it did not.
    pub firewall_drop: Option<FirewallDrop>,
}

#[derive(Debug, Default, Clone, Copy)]
struct HandshakeClock {
    /// When we last sent an initiation that is not answered yet.
    pending_since: Option<Instant>,
    /// When the current session this side initiated was confirmed.
    initiated_at: Option<Instant>,
    /// When we last sent anything to the peer's endpoint (persistent keepalive).
    last_sent: Option<Instant>,
    /// When we sent the first data packet the peer has not answered anything to since.
    unanswered_since: Option<Instant>,
}

/// One host's packet path over fake edges. See the module docs.
pub struct SimDevice {
    device: Arc<Device>,
    enforcement: Arc<Enforcement>,
    /// The host's fake TUN and bind (clones of the pump's).
    edges: FakeHost,
    /// Its own fake link: records what the bind sends, delivers nothing.
    net: FakeNet,
    pump: Pump<Fake>,
    /// When virtual time started for this device (the pump's `micros` count from here).
    started: Option<Instant>,
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

/// The fake bind's own address on its private link (never seen by the harness: datagrams
/// leave with the host's current underlay address as their source).
const BIND_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// A drop counter that moved between two snapshots of the device's counters.
fn tunnel_drop(
    before: &[(&'static str, u64)],
    after: &[(&'static str, u64)],
) -> Option<DropReason> {
    let name = before
        .iter()
        .zip(after)
        .find(|(b, a)| a.1 > b.1)
        .map(|(b, _)| b.0)?;
    Some(match name {
        "malformed" => DropReason::Malformed,
        "unknown_peer" => DropReason::UnknownPeer,
        "refused" => DropReason::Refused,
        "decrypt" => DropReason::Decrypt,
        "replayed_initiation" => DropReason::ReplayedInitiation,
        "malformed_inner" => DropReason::MalformedInner,
        "source_not_allowed" => DropReason::SourceNotAllowed,
        "inner_destination" => DropReason::InnerDestination,
        "no_route" => DropReason::NoRoute,
        _ => DropReason::NoEndpoint,
    })
}

/// The local index in a WireGuard message's sender (initiation) or receiver (response) field.
fn index_at(datagram: &[u8], at: usize) -> Option<u32> {
    let b = datagram.get(at..at + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

impl SimDevice {
    /// A device with no peers; `seed` makes its peer indices and flow hash deterministic.
    pub fn new(key: PrivateKey, seed: u32) -> Self {
        let device = Arc::new(Device::new(key, seed));
        let enforcement = Arc::new(Enforcement {
            firewall: Firewall::new(meshd_firewall::Config {
                hash_seed: Some(u64::from(seed)),
                ..meshd_firewall::Config::default()
            }),
            blocks: BlockLog::new(BlockLogConfig::default()),
        });
        let net = FakeNet::new();
        let edges = net.host(BIND_ADDR, false);
        // Pump::new only fails if the buffers cannot be mapped: nothing a test can go on from.
        let pump = Pump::new(device.clone(), enforcement.clone(), edges.edges(), TUN_MTU)
            .unwrap_or_else(|e| panic!("mapping the data path's buffers: {e}"));
        SimDevice {
            device,
            enforcement,
            edges,
            net,
            pump,
            started: None,
            clocks: BTreeMap::new(),
            scratch: vec![0; 2048],
            last_second: None,
        }
    }

    /// Our public key.
    pub fn public_key(&self) -> PublicKey {
        self.device.public_key()
    }

    /// The inner destinations peers may send to: this host's overlay addresses.
    pub fn set_addresses(&self, overlay: &[IpAddr]) {
        let own: Vec<IpNet> = overlay.iter().copied().map(IpNet::from).collect();
        self.device
            .set_destinations(local_destinations(&own, &[], &[]));
    }

    /// Programs the peer table from a map as meshd's host does (build, diff, swap: unchanged
    /// peers keep their sessions).
    pub fn apply_map(&mut self, map: &NetworkMap) -> Result<PeerDiff, TableError> {
        let diff = self.device.set_peers(&meshd_control::peer_specs(map))?;
        let table = self.device.table();
        self.clocks.retain(|k, _| table.get(k).is_some());
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
        self.enforcement.firewall.stats()
    }

    /// The firewall and block log the data path checks every packet against.
    pub fn enforcement(&self) -> &Enforcement {
        &self.enforcement
    }

    /// The data path's IO counters.
    pub fn io_stats(&self) -> &meshd::dataplane::IoStats {
        self.pump.stats()
    }

    /// The pump's reading of virtual time `now` (`unix_ms`: the same instant in Unix ms).
    fn now(&mut self, now: Instant, unix_ms: u64) -> Now {
        let start = *self.started.get_or_insert(now);
        Now {
            micros: u64::try_from(now.saturating_duration_since(start).as_micros())
                .unwrap_or(u64::MAX),
            unix_ms,
        }
    }

    /// What the path sent since the last call, noting the handshake initiations among it.
    fn sent(&mut self, now: Instant) -> Vec<Transmit> {
        let wire = self.net.take_wire();
        let table = self.device.table();
        for w in &wire {
            // A data message (not a keepalive) is longer than its 32-byte header and tag.
            let data = w.datagram.first() == Some(&msg::DATA) && w.datagram.len() > 32;
            for peer in table.peers().iter().filter(|p| p.endpoint() == Some(w.to)) {
                let c = self.clocks.entry(peer.public_key).or_default();
                c.last_sent = Some(now);
                if data && c.unanswered_since.is_none() {
                    c.unanswered_since = Some(now);
                }
            }
            if w.datagram.first() != Some(&msg::INITIATION) {
                continue;
            }
            if let Some(peer) = index_at(&w.datagram, 4).and_then(|i| table.by_receiver_index(i)) {
                self.clocks
                    .entry(peer.public_key)
                    .or_default()
                    .pending_since = Some(now);
            }
        }
        wire.into_iter()
            .map(|w| Transmit {
                to: w.to,
                datagram: w.datagram,
            })
            .collect()
    }

    /// Sends one inner IP packet from this host's stack: into the TUN, then one tx pass
    /// (route, firewall outbound, seal, send).
    pub fn send(
        &mut self,
        now: Instant,
        unix_ms: u64,
        packet: &[u8],
    ) -> Result<Vec<Transmit>, SendError> {
        let at = self.now(now, unix_ms);
        let (tunnel, firewall) = (self.device.counters.snapshot(), self.firewall_stats());
        self.edges.tun.inject(packet);
        let pass = self.pump.tx_pass(at);
        let sent = self.sent(now);
        pass.map_err(|e| SendError::Io(e.kind()))?;
        if let Some(r) = tunnel_drop(&tunnel, &self.device.counters.snapshot()) {
            return Err(SendError::Tunnel(r));
        }
        if let Some(f) = FirewallDrop::between(&firewall, &self.firewall_stats()) {
            return Err(SendError::Firewall(f));
        }
        Ok(sent)
    }

    /// Handles one datagram from `from`: into the bind, then one rx pass (decapsulate,
    /// firewall inbound, TUN write, answers).
    pub fn receive(
        &mut self,
        now: Instant,
        unix_ms: u64,
        from: SocketAddr,
        datagram: &[u8],
    ) -> Received {
        let at = self.now(now, unix_ms);
        let (tunnel, firewall) = (self.device.counters.snapshot(), self.firewall_stats());
        self.edges.bind.inject(from, datagram);
        self.pump.rx_pass(at);
        let mut r = Received {
            transmits: self.sent(now),
            tunnel_drop: tunnel_drop(&tunnel, &self.device.counters.snapshot()),
            firewall_drop: FirewallDrop::between(&firewall, &self.firewall_stats()),
            ..Received::default()
        };
        let table = self.device.table();
        // One datagram opens into at most one packet. Its peer is the one whose allowed IPs
        // hold the inner source: the path delivered it only after checking exactly that.
        if let Some(packet) = self.edges.tun.take_delivered().pop() {
            let peer = meshd_tunnel::packet::src_addr(&packet)
                .and_then(|src| table.route(src))
                .map(|p| p.public_key);
            if let Some(key) = peer {
                r.delivered = Some((key, packet));
            }
        }
        // Authenticated traffic from the peer: its data and responses name our index, our
        // response to its initiation names it as the sender.
        let from_peer = match datagram.first().copied() {
            _ if r.tunnel_drop.is_some() => None,
            Some(msg::DATA) => index_at(datagram, 4),
            Some(msg::RESPONSE) => index_at(datagram, 8),
            Some(msg::INITIATION) => r
                .transmits
                .iter()
                .find(|t| t.datagram.first() == Some(&msg::RESPONSE))
                .and_then(|t| index_at(&t.datagram, 4)),
            _ => None,
        };
        if let Some(peer) = from_peer.and_then(|i| table.by_receiver_index(i)) {
            self.clocks
                .entry(peer.public_key)
                .or_default()
                .unanswered_since = None;
        }
        if datagram.first() == Some(&msg::RESPONSE)
            && r.tunnel_drop.is_none()
            && !r.transmits.is_empty()
        {
            // Our initiation was answered (the path confirmed the session with a keepalive
            // or the packets it queued): the session is ours and fresh.
            if let Some(peer) = index_at(datagram, 8).and_then(|i| table.by_receiver_index(i)) {
                let c = self.clocks.entry(peer.public_key).or_default();
                c.pending_since = None;
                c.initiated_at = Some(now);
            }
        }
        r
    }

    /// Runs the timers at `now` (call every 100 ms of virtual time): the data path's timer
    /// pass, the host's once-a-second firewall sweep, and the handshake retries, rekeying and
    /// persistent keepalives of the module docs.
    pub fn tick(&mut self, now: Instant, unix_ms: u64) -> Vec<Transmit> {
        let at = self.now(now, unix_ms);
        self.pump.timers(at);
        if self
            .last_second
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
        {
            self.enforcement.firewall.sweep_all(unix_ms);
            self.last_second = Some(now);
        }
        let table = self.device.table();
        for peer in table.peers() {
            let c = self.clocks.entry(peer.public_key).or_default();
            let retry = c
                .pending_since
                .is_some_and(|t| now.saturating_duration_since(t) >= REKEY_TIMEOUT);
            let rekey = c.pending_since.is_none()
                && (c
                    .initiated_at
                    .is_some_and(|t| now.saturating_duration_since(t) >= REKEY_AFTER_TIME)
                    || c.unanswered_since
                        .is_some_and(|t| now.saturating_duration_since(t) >= UNANSWERED_TIMEOUT));
            let Some(to) = peer.endpoint() else { continue };
            let mut tunn = peer.lock();
            if !(retry || rekey) {
                // Persistent keepalive: nothing sent for its interval on a live session.
                let interval = peer.spec().persistent_keepalive.map(u64::from);
                let due = interval.is_some_and(|k| {
                    c.last_sent
                        .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(k))
                });
                if due && tunn.time_since_last_handshake().is_some() {
                    if let TunnResult::WriteToNetwork(d) = tunn.encapsulate(&[], &mut self.scratch)
                    {
                        if self.edges.bind.send_to_peer(to, d, None).is_ok() {
                            c.last_sent = Some(now);
                        }
                    }
                }
                continue;
            }
            if let TunnResult::WriteToNetwork(d) =
                tunn.format_handshake_initiation(&mut self.scratch, retry)
            {
                // Out through the data path's own socket (its send counters see it too).
                if self.edges.bind.send_to_peer(to, d, None).is_err() {
                    continue;
                }
                c.pending_since = Some(now);
                c.unanswered_since = None;
            }
        }
        self.sent(now)
    }
}
