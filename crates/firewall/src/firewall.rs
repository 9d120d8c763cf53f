//! The stateful per-peer firewall: sharded conntrack, admission against [`PeerGrants`], lazy
//! re-check of flows admitted under older grants, and counters per drop reason.

use std::hash::{BuildHasher, Hash};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use foldhash::fast::SeedableRandomState;
use foldhash::SharedSeed;
use hashbrown::{HashMap, HashTable};
use meshd_policy::{ip_proto, DenyReason, Direction, PeerGrants, UnixTime};
use parking_lot::Mutex;

use crate::packet::{self, tcp_flags, Frag, Kind, Malformed, Parsed, Tuple};

/// Milliseconds of wall-clock Unix time, read once per batch by the caller. Grants expire on
/// `now / 1000` (their `expires_at` is Unix seconds); conntrack timeouts use it directly.
pub type Millis = u64;

/// Idle timeouts of tracked flows, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP flow that has seen only the opener's packets (SYN sent, no answer yet).
    pub tcp_opening: Millis,
    /// TCP flow the responder has answered.
    pub tcp_established: Millis,
    /// TCP flow after a FIN or RST from either side.
    pub tcp_closing: Millis,
    /// UDP (or another protocol) seen one way only.
    pub udp: Millis,
    /// UDP (or another protocol) seen both ways.
    pub udp_replied: Millis,
    /// ICMP echo.
    pub icmp: Millis,
    /// How long after an admitted first fragment the later fragments of that datagram pass.
    pub fragment: Millis,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_opening: 30_000,
            tcp_established: 2 * 3600 * 1000,
            tcp_closing: 10_000,
            udp: 60_000,
            udp_replied: 180_000,
            icmp: 30_000,
            fragment: 5_000,
        }
    }
}

/// Firewall settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Most tracked entries (flows and fragment trains) over all shards; new flows beyond it
    /// are dropped with [`DropReason::TableFull`]. Split evenly over the shards.
    pub max_flows: usize,
    /// Most entries one peer may hold, so that one admitted peer cannot fill the table and
    /// starve the others; beyond it its new flows are dropped with
    /// [`DropReason::PeerLimit`]. Enforced per shard (`max_flows_per_peer / shards`, rounded
    /// up); the flow hash is seeded randomly, so a peer cannot aim its flows at one shard.
    pub max_flows_per_peer: usize,
    /// Number of shards (rounded up to a power of two, at least 1).
    pub shards: usize,
    /// Idle timeouts.
    pub timeouts: Timeouts,
    /// Seed for the flow hash (give a random one: peers choose ports); `None` derives one
    /// from address-space randomisation.
    pub hash_seed: Option<u64>,
    /// Count packets and bytes per tracked flow for [`Firewall::collect_flows`] (flow
    /// records). Off: nothing is counted and collections report nothing.
    pub count_flows: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_flows: 65_536,
            max_flows_per_peer: 16_384,
            shards: 64,
            timeouts: Timeouts::default(),
            hash_seed: None,
            count_flows: true,
        }
    }
}

/// Addresses, ports and protocol of a denied packet, as the caller logs it
/// (see [`crate::BlockLog`] and [`meshd_policy::BlockEvent`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowTuple {
    /// IP protocol number.
    pub proto: u8,
    /// Source address and port (port 0 for ICMP and port-less protocols).
    pub src: SocketAddr,
    /// Destination address and port (port 0 for ICMP and port-less protocols).
    pub dst: SocketAddr,
}

/// A policy denial: enough to count, log and report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// Why.
    pub reason: DenyReason,
    /// Direction of the denied packet.
    pub direction: Direction,
    /// The packet's addresses, ports and protocol.
    pub flow: FlowTuple,
}

/// A drop that is not a policy decision (nothing to put in a block log).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The packet could not be read.
    Malformed(Malformed),
    /// A new flow was admitted but the flow table is full.
    TableFull,
    /// A new flow was admitted but its peer holds its share of the table already.
    PeerLimit,
    /// A non-first fragment whose first fragment was not admitted recently.
    UntrackedFragment,
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DropReason::Malformed(m) => write!(f, "malformed packet ({m})"),
            DropReason::TableFull => f.write_str("flow table full"),
            DropReason::PeerLimit => f.write_str("peer's flow limit reached"),
            DropReason::UntrackedFragment => f.write_str("fragment of no admitted datagram"),
        }
    }
}

/// What to do with one packet.
#[must_use = "a packet must be dropped unless the verdict is Allow"]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Pass it on (encrypt it, or write it to the TUN).
    Allow,
    /// Policy denies it: drop it and feed the denial to the block log.
    Deny(Denied),
    /// Drop it without a policy decision (counted in [`Stats`]).
    Drop(DropReason),
}

impl Verdict {
    /// True for [`Verdict::Allow`].
    #[inline]
    pub fn is_allow(&self) -> bool {
        matches!(self, Verdict::Allow)
    }
}

/// Counter snapshot: every packet not allowed is counted once here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Denied: no grant admits the new flow (including flows a deny rule forbids).
    pub default_deny: u64,
    /// Denied: the only matching grant has expired.
    pub expired: u64,
    /// Denied by the caller as quarantined (via [`Firewall::reject`]).
    pub quarantined: u64,
    /// Denied: not a connection start and no tracked flow.
    pub no_flow: u64,
    /// Dropped: unreadable, per [`Malformed`] variant in [`Malformed::ALL`] order.
    pub malformed: [u64; 6],
    /// Dropped: the flow table was full.
    pub table_full: u64,
    /// Dropped: the peer held its share of the flow table (`max_flows_per_peer`).
    pub peer_limit: u64,
    /// Dropped: later fragment of no admitted datagram.
    pub untracked_fragment: u64,
    /// Flows opened.
    pub flows_opened: u64,
    /// Established TCP connections taken up mid-stream (no SYN seen: they predate this table,
    /// e.g. meshd restarted under them) because a grant admits them.
    pub flows_picked_up: u64,
    /// Tracked flows removed because re-checking them against newer or expired grants failed.
    pub flows_revoked: u64,
    /// Passed only because of learning mode ([`PeerGrants::learn`]): new flows no grant
    /// admits, tracked as would-deny, plus stateless ICMP packets no grant admits.
    pub would_deny: u64,
}

impl Stats {
    /// All malformed drops.
    pub fn malformed_total(&self) -> u64 {
        self.malformed.iter().sum()
    }
}

#[derive(Default)]
struct Counters {
    default_deny: AtomicU64,
    expired: AtomicU64,
    quarantined: AtomicU64,
    no_flow: AtomicU64,
    malformed: [AtomicU64; 6],
    table_full: AtomicU64,
    peer_limit: AtomicU64,
    untracked_fragment: AtomicU64,
    flows_opened: AtomicU64,
    flows_picked_up: AtomicU64,
    flows_revoked: AtomicU64,
    would_deny: AtomicU64,
}

/// Direction-normalised flow key: the two ends sorted, so both directions hash alike.
/// Fragment trains use the `FRAG` bit with unsorted ends and the identification as ports.
/// The small fields are packed into one word (`meta`) so building, hashing and comparing the
/// key stays in registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FlowKey<P> {
    peer: P,
    lo: u128,
    hi: u128,
    /// lo port | hi port << 16 | proto << 32 | v6 << 40 | frag << 41.
    meta: u64,
}

const META_V6: u64 = 1 << 40;
const META_FRAG: u64 = 1 << 41;

impl<P: Hash> Hash for FlowKey<P> {
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.peer.hash(h);
        h.write_u128(self.lo);
        h.write_u128(self.hi);
        h.write_u64(self.meta);
    }
}

#[inline]
fn meta(lo_port: u16, hi_port: u16, t: &Tuple) -> u64 {
    u64::from(lo_port)
        | u64::from(hi_port) << 16
        | u64::from(t.proto) << 32
        | if t.v6 { META_V6 } else { 0 }
}

impl<P> FlowKey<P> {
    /// The key and whether the packet's source is the `lo` end.
    #[inline]
    fn of(peer: P, t: &Tuple) -> (FlowKey<P>, bool) {
        let src_lo = (t.src, t.sport) <= (t.dst, t.dport);
        let key = if src_lo {
            FlowKey {
                peer,
                lo: t.src,
                hi: t.dst,
                meta: meta(t.sport, t.dport, t),
            }
        } else {
            FlowKey {
                peer,
                lo: t.dst,
                hi: t.src,
                meta: meta(t.dport, t.sport, t),
            }
        };
        (key, src_lo)
    }

    #[inline]
    fn fragment(peer: P, t: &Tuple, id: u32) -> FlowKey<P> {
        FlowKey {
            peer,
            lo: t.src,
            hi: t.dst,
            meta: meta(id as u16, (id >> 16) as u16, t) | META_FRAG,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    TcpOpening,
    TcpEstablished,
    TcpClosing,
    Unreplied,
    Replied,
    Echo,
    Fragment,
}

#[derive(Debug, Clone, Copy)]
struct Flow {
    last_seen: Millis,
    /// Unix seconds when the admitting grant expires (`u64::MAX`: never).
    expires_at: UnixTime,
    /// `grants_version` the flow was last admitted under.
    version: u64,
    /// Index of the admitting grant in that version's list for `dir`.
    grant: u32,
    /// Responder's port (what the grant was checked against).
    port: u16,
    dir: Direction,
    opener_lo: bool,
    state: State,
    /// Learning mode let it through although no grant admits it (`grant` is meaningless).
    would_deny: bool,
    /// Packets (both ways) since the last [`Firewall::collect_flows`].
    packets: u64,
    /// Bytes of inner IP packets (both ways) since the last collection.
    bytes: u64,
    /// The first of those packets.
    first_seen: Millis,
}

impl Flow {
    /// Counts one packet of `len` bytes (the caller checked `count_flows`).
    #[inline]
    fn count(&mut self, len: usize, now: Millis) {
        if self.packets == 0 {
            self.first_seen = now;
        }
        self.packets += 1;
        self.bytes += len as u64;
    }
}

/// How a collected flow was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlowAdmission {
    /// Admitted by grant number `grant` of the opener's direction in the grants at
    /// `grants_version` (resolve it with [`FlowSample::rule`]).
    Allowed {
        /// The grants version the flow was last admitted under.
        grants_version: u64,
        /// Index into that version's `outbound` or `inbound` list (the flow's direction).
        grant: u32,
    },
    /// Learning mode let it through; no grant admits it.
    WouldDeny,
}

/// One flow's (or, for flows that left the table, one group's) traffic since the previous
/// [`Firewall::collect_flows`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowSample<P> {
    /// The peer.
    pub peer: P,
    /// Who opened it: `Outbound` this host, `Inbound` the peer.
    pub direction: Direction,
    /// IP protocol number.
    pub proto: u8,
    /// The responder's port (0 for protocols without ports).
    pub port: u16,
    /// How it was decided.
    pub admission: FlowAdmission,
    /// Packets, both ways.
    pub packets: u64,
    /// Bytes of inner IP packets, both ways.
    pub bytes: u64,
    /// Connections (flow-table entries) folded in: 1 for a live flow.
    pub flows: u64,
    /// First packet counted (Unix milliseconds).
    pub first_seen: Millis,
    /// Last packet counted (Unix milliseconds).
    pub last_seen: Millis,
}

impl<P: Eq> FlowSample<P> {
    /// The name of the admitting rule in `grants` (the peer's grants at `grants_version`,
    /// now `now` in Unix seconds): the recorded grant if the version is still current, else
    /// the grant that would admit the flow now (re-admission). `None` for would-deny flows
    /// or if no grant admits it any more.
    pub fn rule<'g>(
        &self,
        grants: &'g PeerGrants,
        grants_version: u64,
        now: UnixTime,
    ) -> Option<&'g str> {
        let FlowAdmission::Allowed {
            grants_version: v,
            grant,
        } = self.admission
        else {
            return None;
        };
        let list = match self.direction {
            Direction::Outbound => &grants.outbound,
            Direction::Inbound => &grants.inbound,
        };
        if v == grants_version {
            if let Some(g) = list.get(grant as usize) {
                return Some(&g.rule);
            }
        }
        grants
            .find(self.direction, self.proto, self.port, now)
            .map(|g| g.rule.as_str())
    }

    /// Same group: everything but the counts and times.
    fn same_group(&self, o: &FlowSample<P>) -> bool {
        self.peer == o.peer
            && self.direction == o.direction
            && self.proto == o.proto
            && self.port == o.port
            && self.admission == o.admission
    }

    fn fold(&mut self, o: &FlowSample<P>) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.flows += o.flows;
        self.first_seen = self.first_seen.min(o.first_seen);
        self.last_seen = self.last_seen.max(o.last_seen);
    }
}

/// Groups of retired flows (evicted, revoked, timed out, restarted, forgotten) each shard
/// keeps until the next collection; flows of further groups are counted as overflow.
pub const RETIRED_PER_SHARD: usize = 16;

/// What one [`Firewall::collect_flows`] found besides the samples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Collected {
    /// Samples handed to the sink.
    pub samples: usize,
    /// Retired flows whose counts were lost (their shard's retired groups were full).
    pub overflow: u64,
    /// Packets of those flows.
    pub overflow_packets: u64,
}

struct Entry<P> {
    key: FlowKey<P>,
    flow: Flow,
}

struct ShardInner<P> {
    table: HashTable<Entry<P>>,
    /// Entries per peer in this shard (peers with none are absent).
    per_peer: HashMap<P, u32, SeedableRandomState>,
    /// Earliest time the shard may be scanned for idle entries again when full.
    next_evict: Millis,
    /// Uncollected counts of flows that left the table, by group (at most
    /// [`RETIRED_PER_SHARD`]; the capacity is reserved once, on first use).
    retired: Vec<FlowSample<P>>,
    /// Retired flows (and their packets) that found no room in `retired`.
    retired_overflow: (u64, u64),
}

/// The sample of one table entry.
#[inline]
fn sample<P: Copy>(key: &FlowKey<P>, f: &Flow) -> FlowSample<P> {
    let proto = (key.meta >> 32) as u8;
    FlowSample {
        peer: key.peer,
        direction: f.dir,
        proto,
        port: if matches!(proto, ip_proto::TCP | ip_proto::UDP) {
            f.port
        } else {
            0
        },
        admission: if f.would_deny {
            FlowAdmission::WouldDeny
        } else {
            FlowAdmission::Allowed {
                grants_version: f.version,
                grant: f.grant,
            }
        },
        packets: f.packets,
        bytes: f.bytes,
        flows: 1,
        first_seen: f.first_seen,
        last_seen: f.last_seen,
    }
}

/// Keeps the uncollected counts of a flow leaving the table (cold: once per flow at most).
fn retire<P: Copy + Eq>(
    retired: &mut Vec<FlowSample<P>>,
    overflow: &mut (u64, u64),
    key: &FlowKey<P>,
    f: &Flow,
) {
    if f.packets == 0 {
        return;
    }
    let s = sample(key, f);
    if let Some(r) = retired.iter_mut().find(|r| r.same_group(&s)) {
        r.fold(&s);
    } else if retired.len() < RETIRED_PER_SHARD {
        if retired.capacity() == 0 {
            retired.reserve_exact(RETIRED_PER_SHARD);
        }
        retired.push(s);
    } else {
        overflow.0 += 1;
        overflow.1 += s.packets;
    }
}

/// One lock's worth of flows, on its own cache line(s) so the tx and rx workers only contend
/// when they touch the same shard.
#[repr(align(128))]
struct Shard<P> {
    inner: Mutex<ShardInner<P>>,
}

/// The identity firewall for all peers of this host. Shared by the tx worker (egress, before
/// encrypting: `Direction::Outbound` for packets to the peer) and the rx worker (ingress, after
/// decrypting and after checking the inner source belongs to the peer: `Direction::Inbound`).
///
/// Call order: [`check`](Self::check) per packet; [`sweep`](Self::sweep) from a timer (e.g.
/// every second) to reclaim idle entries; [`forget_peer`](Self::forget_peer) when a peer is
/// removed or quarantined. Timeouts and grant changes take effect on the next packet even
/// without a sweep.
pub struct Firewall<P> {
    shards: Box<[Shard<P>]>,
    mask: usize,
    per_shard: usize,
    per_peer_per_shard: u32,
    timeouts: Timeouts,
    hasher: SeedableRandomState,
    sweep_cursor: AtomicUsize,
    counters: Counters,
    count_flows: bool,
}

/// Outcome of admission against the grants: (grant index, expires_at) or why not.
type Admission = Result<(u32, UnixTime), DenyReason>;

/// Admission of a new flow in `dir` to `port` at `now` (Unix seconds): the first grant that
/// admits it (as [`PeerGrants::find`]); else `Denied(rule)` of the first deny rule forbidding
/// it ([`PeerGrants::deny`], never learnt); else `Expired(rule)` of the first grant that
/// matches but has expired; else `DefaultDeny`.
#[inline]
pub(crate) fn admit(
    grants: &PeerGrants,
    dir: Direction,
    proto: u8,
    port: u16,
    now: UnixTime,
) -> Admission {
    let list = match dir {
        Direction::Outbound => &grants.outbound,
        Direction::Inbound => &grants.inbound,
    };
    if let Some(i) = list.iter().position(|g| g.admits(proto, port, now)) {
        return Ok((i as u32, list[i].expires_at.unwrap_or(u64::MAX)));
    }
    Err(refusal(grants, dir, list, proto, port, now))
}

#[cold]
fn refusal(
    grants: &PeerGrants,
    dir: Direction,
    list: &[meshd_policy::Grant],
    proto: u8,
    port: u16,
    now: UnixTime,
) -> DenyReason {
    match grants.deny.find(dir, proto, port) {
        Some(d) => DenyReason::Denied(d.rule.clone()),
        None => expired_reason(list, proto, port, now),
    }
}

#[cold]
fn expired_reason(list: &[meshd_policy::Grant], proto: u8, port: u16, now: UnixTime) -> DenyReason {
    list.iter()
        .find(|g| {
            g.expires_at
                .is_some_and(|t| t <= now && g.admits(proto, port, t.saturating_sub(1)))
        })
        .map_or(DenyReason::DefaultDeny, |g| {
            DenyReason::Expired(g.rule.clone())
        })
}

impl<P: Copy + Eq + Hash + Send + Sync> Firewall<P> {
    /// An empty firewall.
    pub fn new(config: Config) -> Self {
        let n = config.shards.max(1).next_power_of_two();
        let per_shard = config.max_flows.div_ceil(n).max(1);
        let per_peer_per_shard =
            u32::try_from(config.max_flows_per_peer.div_ceil(n).max(1)).unwrap_or(u32::MAX);
        let hasher = match config.hash_seed {
            Some(s) => SeedableRandomState::with_seed(s, SharedSeed::global_fixed()),
            None => SeedableRandomState::random(),
        };
        let shards = (0..n)
            .map(|_| Shard {
                inner: Mutex::new(ShardInner {
                    table: HashTable::new(),
                    per_peer: HashMap::with_hasher(hasher.clone()),
                    next_evict: 0,
                    retired: Vec::new(),
                    retired_overflow: (0, 0),
                }),
            })
            .collect();
        Firewall {
            shards,
            mask: n - 1,
            per_shard,
            per_peer_per_shard,
            timeouts: config.timeouts,
            hasher,
            sweep_cursor: AtomicUsize::new(0),
            counters: Counters::default(),
            count_flows: config.count_flows,
        }
    }

    /// Decides one packet exchanged with `peer`, whose current grants are `grants` at
    /// `grants_version` (bump it whenever the grants change: flows admitted under another
    /// version are re-checked on their next packet). `dir` is the packet's direction.
    #[inline]
    pub fn check(
        &self,
        peer: P,
        grants: &PeerGrants,
        grants_version: u64,
        dir: Direction,
        packet: &[u8],
        now: Millis,
    ) -> Verdict {
        let p = match packet::parse(packet) {
            Ok(p) => p,
            Err(m) => return self.drop(DropReason::Malformed(m)),
        };
        match p.kind {
            Kind::LaterFragment => return self.later_fragment(peer, &p, now),
            Kind::IcmpError { at, end } => {
                let q = packet
                    .get(at as usize..end as usize)
                    .and_then(|b| packet::parse_quoted(b, p.t.v6));
                return self.icmp_error(peer, grants, dir, &p, q, now);
            }
            Kind::IcmpOther => {
                // Stateless: informational ICMP passes iff an ICMP grant admits it.
                return match admit(grants, dir, p.t.proto, 0, now / 1000) {
                    Ok(_) => Verdict::Allow,
                    Err(r) => self.learn_or_deny(grants, r, dir, &p.t),
                };
            }
            Kind::Tcp(_) | Kind::Udp | Kind::EchoRequest | Kind::EchoReply | Kind::Other => {}
        }
        let v = self.tracked(peer, grants, grants_version, dir, &p, packet.len(), now);
        if let (Verdict::Allow, Frag::First(id)) = (&v, p.frag) {
            self.note_first_fragment(peer, &p.t, id, now);
        }
        v
    }

    /// Counts and describes a denial the caller decided before the flow table (e.g.
    /// [`DenyReason::Quarantined`] for a quarantined peer); forwards to the block log the same
    /// way as [`check`](Self::check)'s denials.
    pub fn reject(&self, reason: DenyReason, dir: Direction, packet: &[u8]) -> Verdict {
        match packet::parse(packet) {
            Ok(p) => self.deny(reason, dir, &p.t),
            Err(m) => self.drop(DropReason::Malformed(m)),
        }
    }

    /// Drops every tracked entry of `peer` (on quarantine, revocation or removal); returns how
    /// many. O(table size): for control events, not per packet.
    pub fn forget_peer(&self, peer: P) -> usize {
        let mut removed = 0;
        for s in self.shards.iter() {
            let mut g = s.inner.lock();
            let ShardInner {
                table,
                per_peer,
                retired,
                retired_overflow,
                ..
            } = &mut *g;
            let before = table.len();
            table.retain(|e| {
                let keep = e.key.peer != peer;
                if !keep {
                    retire(retired, retired_overflow, &e.key, &e.flow);
                }
                keep
            });
            per_peer.remove(&peer);
            removed += before - table.len();
        }
        removed
    }

    /// Hands `sink` every flow's counts since the previous collection: each tracked flow
    /// that saw packets (then zeroed), and the folded groups of flows that left the table
    /// meanwhile (evicted, revoked, timed out, restarted, forgotten). For a timer, off the
    /// packet path: each shard is locked while its entries are visited (bounded by the
    /// table size), so keep `sink` quick (no IO). Nothing is reported with
    /// [`Config::count_flows`] off.
    pub fn collect_flows(&self, sink: &mut impl FnMut(FlowSample<P>)) -> Collected {
        let mut out = Collected::default();
        for s in self.shards.iter() {
            let mut g = s.inner.lock();
            let ShardInner {
                table,
                retired,
                retired_overflow,
                ..
            } = &mut *g;
            for r in retired.drain(..) {
                sink(r);
                out.samples += 1;
            }
            let (n, packets) = std::mem::take(retired_overflow);
            out.overflow += n;
            out.overflow_packets += packets;
            for e in table.iter_mut() {
                if e.flow.packets == 0 {
                    continue;
                }
                sink(sample(&e.key, &e.flow));
                out.samples += 1;
                e.flow.packets = 0;
                e.flow.bytes = 0;
            }
        }
        out
    }

    /// Removes idle entries from the next `shards` shards (round robin) and returns how many.
    /// Bounded work: at most `shards * max_flows / shard_count` entries are visited.
    pub fn sweep(&self, now: Millis, shards: usize) -> usize {
        let n = self.shards.len();
        let mut removed = 0;
        for _ in 0..shards.min(n) {
            let i = self.sweep_cursor.fetch_add(1, Relaxed) & self.mask;
            removed += self.evict_idle(&mut self.shards[i].inner.lock(), now);
        }
        removed
    }

    /// Sweeps every shard.
    pub fn sweep_all(&self, now: Millis) -> usize {
        self.sweep(now, self.shards.len())
    }

    /// Number of shards (a full sweep is `sweep(now, shard_count())`).
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Tracked entries (flows and fragment trains), including idle ones not yet swept.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.inner.lock().table.len()).sum()
    }

    /// True if nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Most entries the table holds.
    pub fn capacity(&self) -> usize {
        self.per_shard * self.shards.len()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        Stats {
            default_deny: c.default_deny.load(Relaxed),
            expired: c.expired.load(Relaxed),
            quarantined: c.quarantined.load(Relaxed),
            no_flow: c.no_flow.load(Relaxed),
            malformed: std::array::from_fn(|i| c.malformed[i].load(Relaxed)),
            table_full: c.table_full.load(Relaxed),
            peer_limit: c.peer_limit.load(Relaxed),
            untracked_fragment: c.untracked_fragment.load(Relaxed),
            flows_opened: c.flows_opened.load(Relaxed),
            flows_picked_up: c.flows_picked_up.load(Relaxed),
            flows_revoked: c.flows_revoked.load(Relaxed),
            would_deny: c.would_deny.load(Relaxed),
        }
    }

    // ---- internals ----

    #[inline]
    fn shard_of(&self, hash: u64) -> &Shard<P> {
        // hashbrown uses the low bits (bucket) and the top 7 (tag); shard on the middle.
        &self.shards[(hash >> 32) as usize & self.mask]
    }

    fn timeout(&self, s: State) -> Millis {
        let t = &self.timeouts;
        match s {
            State::TcpOpening => t.tcp_opening,
            State::TcpEstablished => t.tcp_established,
            State::TcpClosing => t.tcp_closing,
            State::Unreplied => t.udp,
            State::Replied => t.udp_replied,
            State::Echo => t.icmp,
            State::Fragment => t.fragment,
        }
    }

    #[inline]
    fn idle(&self, f: &Flow, now: Millis) -> bool {
        now >= f.last_seen.saturating_add(self.timeout(f.state))
    }

    fn evict_idle(&self, g: &mut ShardInner<P>, now: Millis) -> usize {
        let ShardInner {
            table,
            per_peer,
            retired,
            retired_overflow,
            ..
        } = g;
        let before = table.len();
        table.retain(|e| {
            let keep = !self.idle(&e.flow, now);
            if !keep {
                retire(retired, retired_overflow, &e.key, &e.flow);
                release(per_peer, e.key.peer);
            }
            keep
        });
        before - table.len()
    }

    /// The flow-table path for TCP, UDP, ICMP echo and other protocols. `len` is the packet's
    /// length (counted per flow).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn tracked(
        &self,
        peer: P,
        grants: &PeerGrants,
        version: u64,
        dir: Direction,
        p: &Parsed,
        len: usize,
        now: Millis,
    ) -> Verdict {
        let (key, src_lo) = FlowKey::of(peer, &p.t);
        let hash = self.hasher.hash_one(key);
        let now_s = now / 1000;
        let mut g = self.shard_of(hash).inner.lock();
        if let Ok(mut entry) = g.table.find_entry(hash, |e| e.key == key) {
            let f = &mut entry.get_mut().flow;
            let forward = src_lo == f.opener_lo;
            let restart = self.idle(f, now)
                || match p.kind {
                    // A fresh SYN from the opener on a closing flow: port reuse, a new connection.
                    Kind::Tcp(fl) => {
                        forward
                            && f.state == State::TcpClosing
                            && fl & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN
                    }
                    _ => false,
                };
            if restart {
                let old = entry.remove().0;
                let g = &mut *g;
                retire(&mut g.retired, &mut g.retired_overflow, &old.key, &old.flow);
                release(&mut g.per_peer, peer);
            } else {
                if forward != (dir == f.dir) {
                    // The opener's end sent it the wrong way through the tunnel (spoofed).
                    drop(g);
                    return self.deny(DenyReason::NoFlow, dir, &p.t);
                }
                if !forward
                    && matches!(p.kind, Kind::Tcp(fl) if fl & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN)
                {
                    // A connection attempt from the responder's end is a new connection the
                    // other way, never part of this flow (simultaneous open is not carried).
                    drop(g);
                    return self.deny(DenyReason::NoFlow, dir, &p.t);
                }
                if matches!(
                    (p.kind, forward),
                    (Kind::EchoRequest, false) | (Kind::EchoReply, true)
                ) {
                    // The responder pinging back with the same id is its own, new exchange:
                    // judge it by the grants without tracking it (its key is taken).
                    drop(g);
                    return match admit(grants, dir, p.t.proto, p.t.dport, now_s) {
                        Ok(_) if p.kind == Kind::EchoRequest => Verdict::Allow,
                        Ok(_) => self.deny(DenyReason::NoFlow, dir, &p.t),
                        Err(r) if p.kind == Kind::EchoRequest => {
                            self.learn_or_deny(grants, r, dir, &p.t)
                        }
                        Err(r) => self.deny(r, dir, &p.t),
                    };
                }
                if f.version != version || now_s >= f.expires_at {
                    match admit(grants, f.dir, p.t.proto, f.port, now_s) {
                        Ok((i, exp)) => {
                            f.version = version;
                            f.grant = i;
                            f.expires_at = exp;
                            f.would_deny = false;
                        }
                        Err(r) if learns(grants, &r) => {
                            // Learning mode: it keeps flowing, as would-deny from now on.
                            f.version = version;
                            f.expires_at = u64::MAX;
                            f.would_deny = true;
                        }
                        Err(r) => {
                            let old = entry.remove().0;
                            let g2 = &mut *g;
                            retire(
                                &mut g2.retired,
                                &mut g2.retired_overflow,
                                &old.key,
                                &old.flow,
                            );
                            release(&mut g2.per_peer, peer);
                            drop(g);
                            self.counters.flows_revoked.fetch_add(1, Relaxed);
                            return self.deny(r, dir, &p.t);
                        }
                    }
                }
                f.last_seen = now;
                f.state = next_state(f.state, p.kind, forward);
                if self.count_flows {
                    f.count(len, now);
                }
                return Verdict::Allow;
            }
        }
        // A new flow.
        let mut opener = (dir, p.t.dport, src_lo);
        let state = match p.kind {
            Kind::Tcp(fl)
                if fl & (tcp_flags::SYN | tcp_flags::ACK | tcp_flags::RST) == tcp_flags::SYN =>
            {
                State::TcpOpening
            }
            Kind::Tcp(fl) if fl & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::ACK => {
                // Mid-stream, no flow: a connection older than this table (meshd restarted
                // under it). Take it up if a grant would have admitted its SYN: from this
                // packet's sender to its destination port, or from the receiver to its
                // source port (this is the responder's side). Any other segment is denied.
                let as_sent = admit(grants, dir, p.t.proto, p.t.dport, now_s);
                // A deny rule on either guess of the opener: learning takes nothing up.
                let mut denied = match &as_sent {
                    Err(r @ DenyReason::Denied(_)) => Some(r.clone()),
                    _ => None,
                };
                let picked = match as_sent {
                    Ok(a) => Some(Some(a)),
                    Err(_) => {
                        let back = dir.reverse();
                        match admit(grants, back, p.t.proto, p.t.sport, now_s) {
                            Ok(a) => {
                                opener = (back, p.t.sport, !src_lo);
                                Some(Some(a))
                            }
                            Err(r @ DenyReason::Denied(_)) => {
                                denied = Some(r);
                                None
                            }
                            Err(r) if denied.is_none() && learns(grants, &r) => {
                                // Learning mode: take it up as would-deny; guess the
                                // responder is the end with the lower port (the service).
                                if p.t.sport < p.t.dport {
                                    opener = (back, p.t.sport, !src_lo);
                                }
                                Some(None)
                            }
                            Err(_) => None,
                        }
                    }
                };
                let Some(admitted) = picked else {
                    drop(g);
                    return self.deny(denied.unwrap_or(DenyReason::NoFlow), dir, &p.t);
                };
                if let Err(full) = self.make_room(&mut g, peer, now) {
                    drop(g);
                    return self.drop(full);
                }
                let state = if fl & (tcp_flags::FIN | tcp_flags::RST) != 0 {
                    State::TcpClosing
                } else {
                    State::TcpEstablished
                };
                self.insert(
                    g,
                    hash,
                    key,
                    peer,
                    (now, len),
                    admitted,
                    version,
                    opener,
                    state,
                );
                self.counters.flows_picked_up.fetch_add(1, Relaxed);
                if admitted.is_none() {
                    self.counters.would_deny.fetch_add(1, Relaxed);
                }
                return Verdict::Allow;
            }
            Kind::Tcp(_) | Kind::EchoReply => {
                drop(g);
                return self.deny(DenyReason::NoFlow, dir, &p.t);
            }
            Kind::EchoRequest => State::Echo,
            _ => State::Unreplied,
        };
        let admitted = match admit(grants, dir, p.t.proto, p.t.dport, now_s) {
            Ok(a) => Some(a),
            Err(r) if learns(grants, &r) => None,
            Err(r) => {
                drop(g);
                return self.deny(r, dir, &p.t);
            }
        };
        if let Err(full) = self.make_room(&mut g, peer, now) {
            drop(g);
            return self.drop(full);
        }
        self.insert(
            g,
            hash,
            key,
            peer,
            (now, len),
            admitted,
            version,
            opener,
            state,
        );
        self.counters.flows_opened.fetch_add(1, Relaxed);
        if admitted.is_none() {
            self.counters.would_deny.fetch_add(1, Relaxed);
        }
        Verdict::Allow
    }

    /// Adds a flow (room already made) and releases the shard. `first` is the first packet's
    /// time and length; `admitted` the grant index and its expiry (`None`: would-deny, let
    /// through by learning mode); `opener` the opener's direction, the responder's port and
    /// whether the opener is the key's low end.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn insert(
        &self,
        mut g: parking_lot::MutexGuard<'_, ShardInner<P>>,
        hash: u64,
        key: FlowKey<P>,
        peer: P,
        first: (Millis, usize),
        admitted: Option<(u32, UnixTime)>,
        version: u64,
        opener: (Direction, u16, bool),
        state: State,
    ) {
        let (now, len) = first;
        let (grant, expires_at) = admitted.unwrap_or((0, u64::MAX));
        let (dir, port, opener_lo) = opener;
        let mut flow = Flow {
            last_seen: now,
            expires_at,
            version,
            grant,
            port,
            dir,
            opener_lo,
            state,
            would_deny: admitted.is_none(),
            packets: 0,
            bytes: 0,
            first_seen: now,
        };
        if self.count_flows {
            flow.count(len, now);
        }
        g.table
            .insert_unique(hash, Entry { key, flow }, |e| self.hasher.hash_one(e.key));
        *g.per_peer.entry(peer).or_insert(0) += 1;
    }

    /// Whether the shard may take one more entry of `peer` (evicting idle ones at most once
    /// a second); if not, why.
    fn make_room(&self, g: &mut ShardInner<P>, peer: P, now: Millis) -> Result<(), DropReason> {
        let peer_full = |g: &ShardInner<P>| {
            g.per_peer.get(&peer).copied().unwrap_or(0) >= self.per_peer_per_shard
        };
        if g.table.len() < self.per_shard && !peer_full(g) {
            return Ok(());
        }
        if now >= g.next_evict {
            g.next_evict = now.saturating_add(1000);
            self.evict_idle(g, now);
        }
        if g.table.len() >= self.per_shard {
            Err(DropReason::TableFull)
        } else if peer_full(g) {
            Err(DropReason::PeerLimit)
        } else {
            Ok(())
        }
    }

    /// Remembers an admitted first fragment so the rest of its datagram may follow.
    fn note_first_fragment(&self, peer: P, t: &Tuple, id: u32, now: Millis) {
        let key = FlowKey::fragment(peer, t, id);
        let hash = self.hasher.hash_one(key);
        let mut g = self.shard_of(hash).inner.lock();
        if let Some(e) = g.table.find_mut(hash, |e| e.key == key) {
            e.flow.last_seen = now;
            return;
        }
        if self.make_room(&mut g, peer, now).is_err() {
            return; // Its later fragments will count as untracked.
        }
        let flow = Flow {
            last_seen: now,
            expires_at: u64::MAX,
            version: 0,
            grant: 0,
            port: 0,
            dir: Direction::Outbound,
            opener_lo: true,
            state: State::Fragment,
            would_deny: false,
            packets: 0,
            bytes: 0,
            first_seen: now,
        };
        g.table
            .insert_unique(hash, Entry { key, flow }, |e| self.hasher.hash_one(e.key));
        *g.per_peer.entry(peer).or_insert(0) += 1;
    }

    fn later_fragment(&self, peer: P, p: &Parsed, now: Millis) -> Verdict {
        let Frag::Later(id) = p.frag else {
            return self.drop(DropReason::UntrackedFragment);
        };
        let key = FlowKey::fragment(peer, &p.t, id);
        let hash = self.hasher.hash_one(key);
        let g = self.shard_of(hash).inner.lock();
        match g.table.find(hash, |e| e.key == key) {
            Some(e) if !self.idle(&e.flow, now) => Verdict::Allow,
            _ => {
                drop(g);
                self.drop(DropReason::UntrackedFragment)
            }
        }
    }

    /// An ICMP error passes if it quotes a packet of a tracked flow (sent to the quoted
    /// packet's source); otherwise only if an ICMP grant admits it.
    fn icmp_error(
        &self,
        peer: P,
        grants: &PeerGrants,
        dir: Direction,
        p: &Parsed,
        q: Option<Tuple>,
        now: Millis,
    ) -> Verdict {
        if let Some(q) = q.filter(|q| q.src == p.t.dst) {
            let (key, _) = FlowKey::of(peer, &q);
            let hash = self.hasher.hash_one(key);
            let g = self.shard_of(hash).inner.lock();
            if let Some(e) = g.table.find(hash, |e| e.key == key) {
                if !self.idle(&e.flow, now) {
                    return Verdict::Allow;
                }
            }
        }
        match admit(grants, dir, p.t.proto, 0, now / 1000) {
            Ok(_) => Verdict::Allow,
            Err(r) => self.learn_or_deny(grants, r, dir, &p.t),
        }
    }

    /// A stateless packet no grant admits: passes (counted as would-deny) in learning mode,
    /// else denied.
    #[cold]
    fn learn_or_deny(
        &self,
        grants: &PeerGrants,
        reason: DenyReason,
        dir: Direction,
        t: &Tuple,
    ) -> Verdict {
        if learns(grants, &reason) {
            self.counters.would_deny.fetch_add(1, Relaxed);
            return Verdict::Allow;
        }
        self.deny(reason, dir, t)
    }

    #[cold]
    fn deny(&self, reason: DenyReason, dir: Direction, t: &Tuple) -> Verdict {
        let c = &self.counters;
        match reason {
            // A deny rule's drop counts as default deny (the block log names the rule).
            DenyReason::DefaultDeny | DenyReason::Denied(_) => &c.default_deny,
            DenyReason::Expired(_) => &c.expired,
            DenyReason::Quarantined => &c.quarantined,
            // Not a firewall verdict (transparent mode's nftables drops); counted as no flow.
            DenyReason::NoFlow | DenyReason::Plaintext => &c.no_flow,
        }
        .fetch_add(1, Relaxed);
        let ports = matches!(t.proto, ip_proto::TCP | ip_proto::UDP);
        let (sp, dp) = if ports { (t.sport, t.dport) } else { (0, 0) };
        Verdict::Deny(Denied {
            reason,
            direction: dir,
            flow: FlowTuple {
                proto: t.proto,
                src: SocketAddr::new(t.ip(t.src), sp),
                dst: SocketAddr::new(t.ip(t.dst), dp),
            },
        })
    }

    #[cold]
    fn drop(&self, reason: DropReason) -> Verdict {
        let c = &self.counters;
        match reason {
            DropReason::Malformed(m) => &c.malformed[m as usize],
            DropReason::TableFull => &c.table_full,
            DropReason::PeerLimit => &c.peer_limit,
            DropReason::UntrackedFragment => &c.untracked_fragment,
        }
        .fetch_add(1, Relaxed);
        Verdict::Drop(reason)
    }
}

/// Whether learning mode lets a flow through that `reason` would deny: only for want of a
/// grant (never for quarantine or a packet that starts nothing).
#[inline]
fn learns(grants: &PeerGrants, reason: &DenyReason) -> bool {
    grants.learn && matches!(reason, DenyReason::DefaultDeny | DenyReason::Expired(_))
}

/// One entry of `peer` left its shard.
#[inline]
fn release<P: Eq + Hash>(per_peer: &mut HashMap<P, u32, SeedableRandomState>, peer: P) {
    if let Some(n) = per_peer.get_mut(&peer) {
        *n -= 1;
        if *n == 0 {
            per_peer.remove(&peer);
        }
    }
}

/// TCP and UDP state after a packet of a tracked flow; `forward`: sent by the opener.
#[inline]
fn next_state(s: State, kind: Kind, forward: bool) -> State {
    match (s, kind) {
        (_, Kind::Tcp(fl)) if fl & (tcp_flags::FIN | tcp_flags::RST) != 0 => State::TcpClosing,
        (State::TcpOpening, Kind::Tcp(_)) if !forward => State::TcpEstablished,
        (State::Unreplied, _) if !forward => State::Replied,
        (s, _) => s,
    }
}
