//! The rate-limited block log: folds repeated denials of the same flow into one event with a
//! count, holds a bounded number of pending events, and releases at most K per second.
//!
//! Call order: [`BlockLog::record`] for each [`Verdict::Deny`](crate::Verdict::Deny) (from any
//! worker); [`BlockLog::drain`] from a timer (e.g. every second) to get the events to log as
//! JSON lines and send to the coordinator.

use std::collections::BTreeMap;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};

use foldhash::fast::RandomState;
use meshd_policy::{BlockEvent, DenyReason, Direction};
use parking_lot::Mutex;

use crate::firewall::{Denied, Millis};

/// Block-log settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLogConfig {
    /// Denials of one flow within this long after its first are folded into one event.
    pub window: Millis,
    /// Most events released per second (per `now / 1000`); the rest wait, still folding.
    pub max_per_second: usize,
    /// Most pending events; denials of new flows beyond it are only counted in
    /// [`BlockLog::dropped`].
    pub max_pending: usize,
}

impl Default for BlockLogConfig {
    fn default() -> Self {
        BlockLogConfig {
            window: 1000,
            max_per_second: 100,
            max_pending: 4096,
        }
    }
}

/// One logged denial: `count` denied packets of the same flow folded together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial<P> {
    /// The peer the packet came from or was meant for.
    pub peer: P,
    /// Direction of the denied packets.
    pub direction: Direction,
    /// IP protocol number.
    pub proto: u8,
    /// Source of the first folded packet (later ones may differ in source port only).
    pub src: SocketAddr,
    /// Destination.
    pub dst: SocketAddr,
    /// Why.
    pub reason: DenyReason,
    /// When the first folded packet was denied.
    pub first_at: Millis,
    /// When the last folded packet was denied.
    pub last_at: Millis,
    /// Packets folded in.
    pub count: u64,
}

impl<P> Denial<P> {
    /// The wire event, given the names and labels the firewall does not know.
    pub fn to_block_event(
        &self,
        host: &str,
        host_labels: &BTreeMap<String, String>,
        peer: &str,
        peer_labels: &BTreeMap<String, String>,
    ) -> BlockEvent {
        BlockEvent {
            at: self.first_at / 1000,
            host: host.to_string(),
            host_labels: host_labels.clone(),
            peer: peer.to_string(),
            peer_labels: peer_labels.clone(),
            direction: self.direction,
            proto: self.proto,
            src: self.src,
            dst: self.dst,
            reason: self.reason.clone(),
            count: self.count,
        }
    }
}

/// What folds together: same peer, direction, protocol, addresses, destination port and
/// reason. The source port is left out so a client retrying with fresh ports folds too.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FoldKey<P> {
    peer: P,
    direction: Direction,
    proto: u8,
    src: IpAddr,
    dst: SocketAddr,
    reason: DenyReason,
}

struct Pending {
    src_port: u16,
    first_at: Millis,
    last_at: Millis,
    count: u64,
}

struct Inner<P> {
    pending: std::collections::HashMap<FoldKey<P>, Pending, RandomState>,
    /// The second (`now / 1000`) `released` counts for.
    second: u64,
    released: usize,
    dropped: u64,
}

/// Rate-limited, folding block log; shared by the workers (`&self`).
pub struct BlockLog<P> {
    config: BlockLogConfig,
    inner: Mutex<Inner<P>>,
}

impl<P: Copy + Eq + Hash> BlockLog<P> {
    /// An empty log.
    pub fn new(config: BlockLogConfig) -> Self {
        BlockLog {
            config,
            inner: Mutex::new(Inner {
                pending: std::collections::HashMap::with_hasher(RandomState::default()),
                second: 0,
                released: 0,
                dropped: 0,
            }),
        }
    }

    /// Records one denied packet of `peer` at `now`.
    pub fn record(&self, peer: P, denied: &Denied, now: Millis) {
        let key = FoldKey {
            peer,
            direction: denied.direction,
            proto: denied.flow.proto,
            src: denied.flow.src.ip(),
            dst: denied.flow.dst,
            reason: denied.reason.clone(),
        };
        let mut g = self.inner.lock();
        if let Some(p) = g.pending.get_mut(&key) {
            p.count += 1;
            p.last_at = p.last_at.max(now);
            return;
        }
        if g.pending.len() >= self.config.max_pending {
            g.dropped += 1;
            return;
        }
        g.pending.insert(
            key,
            Pending {
                src_port: denied.flow.src.port(),
                first_at: now,
                last_at: now,
                count: 1,
            },
        );
    }

    /// Events whose fold window has closed, oldest first, at most
    /// [`max_per_second`](BlockLogConfig::max_per_second) per second; the others stay
    /// pending (and keep folding) until a later call.
    pub fn drain(&self, now: Millis) -> Vec<Denial<P>> {
        let mut g = self.inner.lock();
        let second = now / 1000;
        if second != g.second {
            g.second = second;
            g.released = 0;
        }
        let budget = self.config.max_per_second.saturating_sub(g.released);
        if budget == 0 {
            return Vec::new();
        }
        let window = self.config.window;
        let mut ready: Vec<(Millis, FoldKey<P>)> = g
            .pending
            .iter()
            .filter(|(_, p)| now >= p.first_at.saturating_add(window))
            .map(|(k, p)| (p.first_at, k.clone()))
            .collect();
        ready.sort_by_key(|r| r.0);
        ready.truncate(budget);
        g.released += ready.len();
        ready
            .into_iter()
            .filter_map(|(_, k)| {
                let p = g.pending.remove(&k)?;
                Some(Denial {
                    peer: k.peer,
                    direction: k.direction,
                    proto: k.proto,
                    src: SocketAddr::new(k.src, p.src_port),
                    dst: k.dst,
                    reason: k.reason,
                    first_at: p.first_at,
                    last_at: p.last_at,
                    count: p.count,
                })
            })
            .collect()
    }

    /// Denied packets not represented in any event because the pending set was full.
    pub fn dropped(&self) -> u64 {
        self.inner.lock().dropped
    }

    /// Events waiting (window still open, or over the per-second budget).
    pub fn pending(&self) -> usize {
        self.inner.lock().pending.len()
    }
}
