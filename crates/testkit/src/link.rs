//! Fake links between hosts: latency, jitter, loss, reordering, MTU and partitions, all
//! deterministic from a seed, with every datagram that crosses recorded.
//!
//! A [`Network`] carries UDP datagrams between nodes. Nodes own underlay addresses
//! ([`Network::attach`]); a datagram goes to whichever node owns its destination address when
//! it arrives (an address nobody owns any more swallows it: [`Fate::NoRoute`]). Faults are
//! decided when a datagram is sent, in this order: partition, MTU, loss; a datagram that
//! survives is delayed by the link's latency plus jitter, plus an extra delay when it is picked
//! for reordering. Every send lands in [`Network::log`] and is shown to the hook, if one is set
//! ([`Network::set_hook`]), so a test can assert what was on the wire.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::rng::SimRng;
use crate::time::Schedule;

/// A node on the fake network (a host, or the coordinator).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub usize);

/// How a link treats datagrams.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkConfig {
    /// One-way delay.
    pub latency: Duration,
    /// Extra random delay, uniform in `0..=jitter` (a jitter above the gap between two
    /// datagrams reorders them too).
    pub jitter: Duration,
    /// Probability a datagram is lost.
    pub loss: f64,
    /// Probability a datagram is held back by `reorder_delay` (later ones overtake it).
    pub reorder: f64,
    /// Extra delay of a reordered datagram.
    pub reorder_delay: Duration,
    /// Largest datagram (UDP payload bytes) the link carries; bigger ones are dropped.
    pub mtu: usize,
}

impl Default for LinkConfig {
    /// 1 ms, no jitter, no loss, no reordering, 1420-byte MTU (a WireGuard data message of a
    /// 1380-byte inner packet fits).
    fn default() -> Self {
        LinkConfig {
            latency: Duration::from_millis(1),
            jitter: Duration::ZERO,
            loss: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::from_millis(5),
            mtu: 1420,
        }
    }
}

/// What became of a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Still on its way.
    InFlight,
    /// Handed to the node owning the destination address.
    Delivered(NodeId),
    /// Lost (the link's loss probability).
    Lost,
    /// Dropped by a partition between the two nodes (or one way).
    Partitioned,
    /// Bigger than the link's MTU.
    TooBig,
    /// No node owned the source address when it was sent, or the destination when it arrived.
    NoRoute,
}

/// One datagram sent on the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireRecord {
    /// When it was sent.
    pub sent_at: Instant,
    /// Source address.
    pub from: SocketAddr,
    /// Destination address.
    pub to: SocketAddr,
    /// The UDP payload.
    pub payload: Vec<u8>,
    /// What became of it.
    pub fate: Fate,
}

/// A datagram arriving at a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The receiving node.
    pub node: NodeId,
    /// Source address.
    pub from: SocketAddr,
    /// Destination address.
    pub to: SocketAddr,
    /// The UDP payload.
    pub payload: Vec<u8>,
}

type Hook = Box<dyn FnMut(&WireRecord)>;

/// The fake underlay. See the module docs.
pub struct Network {
    rng: SimRng,
    default: LinkConfig,
    links: BTreeMap<(NodeId, NodeId), LinkConfig>,
    owners: BTreeMap<IpAddr, NodeId>,
    /// (from, to) pairs that drop everything.
    cut: BTreeSet<(NodeId, NodeId)>,
    in_flight: Schedule<usize>,
    log: Vec<WireRecord>,
    hook: Option<Hook>,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("owners", &self.owners)
            .field("cut", &self.cut)
            .field("in_flight", &self.in_flight.len())
            .field("sent", &self.log.len())
            .finish_non_exhaustive()
    }
}

impl Network {
    /// An empty network whose faults follow from `seed`; links use `default` unless set.
    pub fn new(seed: u64, default: LinkConfig) -> Self {
        Network {
            rng: SimRng::new(seed),
            default,
            links: BTreeMap::new(),
            owners: BTreeMap::new(),
            cut: BTreeSet::new(),
            in_flight: Schedule::new(),
            log: Vec::new(),
            hook: None,
        }
    }

    /// `node` now owns `ip` (taking it from any previous owner).
    pub fn attach(&mut self, node: NodeId, ip: IpAddr) {
        self.owners.insert(ip, node);
    }

    /// Nobody owns `ip` any more.
    pub fn detach(&mut self, ip: IpAddr) {
        self.owners.remove(&ip);
    }

    /// Who owns `ip`.
    pub fn owner(&self, ip: IpAddr) -> Option<NodeId> {
        self.owners.get(&ip).copied()
    }

    /// The link between `a` and `b` (both ways) behaves as `cfg`.
    pub fn set_link(&mut self, a: NodeId, b: NodeId, cfg: LinkConfig) {
        self.links.insert((a, b), cfg.clone());
        self.links.insert((b, a), cfg);
    }

    /// Every link without its own config behaves as `cfg`.
    pub fn set_default_link(&mut self, cfg: LinkConfig) {
        self.default = cfg;
    }

    /// Cuts `a` and `b` apart both ways.
    pub fn partition(&mut self, a: NodeId, b: NodeId) {
        self.cut.insert((a, b));
        self.cut.insert((b, a));
    }

    /// Cuts datagrams from `from` to `to` only (the other way still works).
    pub fn partition_one_way(&mut self, from: NodeId, to: NodeId) {
        self.cut.insert((from, to));
    }

    /// Undoes every partition between `a` and `b`.
    pub fn heal(&mut self, a: NodeId, b: NodeId) {
        self.cut.remove(&(a, b));
        self.cut.remove(&(b, a));
    }

    /// Undoes every partition.
    pub fn heal_all(&mut self) {
        self.cut.clear();
    }

    /// Whether datagrams from `from` to `to` are cut.
    pub fn is_cut(&self, from: NodeId, to: NodeId) -> bool {
        self.cut.contains(&(from, to))
    }

    /// Shows every datagram sent from now on to `hook` (with its send-time fate).
    pub fn set_hook(&mut self, hook: impl FnMut(&WireRecord) + 'static) {
        self.hook = Some(Box::new(hook));
    }

    /// Every datagram sent so far, in send order.
    pub fn log(&self) -> &[WireRecord] {
        &self.log
    }

    /// Sends a datagram at `now`. Returns its fate as decided now (`InFlight` if it is on its
    /// way).
    pub fn send(
        &mut self,
        now: Instant,
        from: SocketAddr,
        to: SocketAddr,
        payload: Vec<u8>,
    ) -> Fate {
        let src = self.owner(from.ip());
        let dst = self.owner(to.ip());
        let cfg = match (src, dst) {
            (Some(s), Some(d)) => self.links.get(&(s, d)).unwrap_or(&self.default).clone(),
            _ => self.default.clone(),
        };
        let fate = match (src, dst) {
            (None, _) => Fate::NoRoute,
            (Some(s), Some(d)) if self.is_cut(s, d) => Fate::Partitioned,
            _ if payload.len() > cfg.mtu => Fate::TooBig,
            _ if self.rng.chance(cfg.loss) => Fate::Lost,
            _ => Fate::InFlight,
        };
        let rec = WireRecord {
            sent_at: now,
            from,
            to,
            payload,
            fate,
        };
        if let Some(h) = self.hook.as_mut() {
            h(&rec);
        }
        let idx = self.log.len();
        self.log.push(rec);
        if fate == Fate::InFlight {
            let jitter_ns = u64::try_from(cfg.jitter.as_nanos()).unwrap_or(u64::MAX);
            let mut delay = cfg.latency + Duration::from_nanos(self.rng.below(jitter_ns + 1));
            if self.rng.chance(cfg.reorder) {
                delay += cfg.reorder_delay;
            }
            self.in_flight.push(now + delay, idx);
        }
        fate
    }

    /// When the next datagram arrives.
    pub fn next_at(&self) -> Option<Instant> {
        self.in_flight.next_at()
    }

    /// The next datagram due at or before `now`, if any. A datagram whose destination nobody
    /// owns any more, or whose path was cut while it flew, is dropped (and so recorded).
    pub fn poll(&mut self, now: Instant) -> Option<Delivery> {
        while let Some((_, idx)) = self.in_flight.pop_due(now) {
            let Some(rec) = self.log.get_mut(idx) else {
                continue;
            };
            let src = self.owners.get(&rec.from.ip()).copied();
            let Some(node) = self.owners.get(&rec.to.ip()).copied() else {
                rec.fate = Fate::NoRoute;
                continue;
            };
            if src.is_some_and(|s| self.cut.contains(&(s, node))) {
                rec.fate = Fate::Partitioned;
                continue;
            }
            rec.fate = Fate::Delivered(node);
            return Some(Delivery {
                node,
                from: rec.from,
                to: rec.to,
                payload: rec.payload.clone(),
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::from(([198, 18, 0, last], 51820))
    }

    fn net(cfg: LinkConfig) -> (Network, Instant) {
        let mut n = Network::new(1, cfg);
        for i in 1..=3 {
            n.attach(NodeId(i as usize), addr(i).ip());
        }
        (n, Instant::now())
    }

    fn drain(n: &mut Network, at: Instant) -> Vec<Delivery> {
        std::iter::from_fn(|| n.poll(at)).collect()
    }

    #[test]
    fn latency_mtu_and_recording() {
        let (mut n, t) = net(LinkConfig {
            latency: Duration::from_millis(10),
            mtu: 100,
            ..LinkConfig::default()
        });
        assert_eq!(n.send(t, addr(1), addr(2), vec![1; 100]), Fate::InFlight);
        assert_eq!(n.send(t, addr(1), addr(2), vec![2; 101]), Fate::TooBig);
        assert!(drain(&mut n, t + Duration::from_millis(9)).is_empty());
        let d = drain(&mut n, t + Duration::from_millis(10));
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].node, d[0].payload.len()), (NodeId(2), 100));
        let fates: Vec<Fate> = n.log().iter().map(|r| r.fate).collect();
        assert_eq!(fates, [Fate::Delivered(NodeId(2)), Fate::TooBig]);
    }

    #[test]
    fn partitions_both_ways_one_way_and_mid_flight() {
        let (mut n, t) = net(LinkConfig::default());
        n.partition_one_way(NodeId(1), NodeId(2));
        assert_eq!(n.send(t, addr(1), addr(2), vec![1]), Fate::Partitioned);
        assert_eq!(n.send(t, addr(2), addr(1), vec![2]), Fate::InFlight);
        n.heal(NodeId(1), NodeId(2));
        n.send(t, addr(1), addr(3), vec![3]);
        n.partition(NodeId(3), NodeId(1));
        assert_eq!(n.send(t, addr(3), addr(1), vec![4]), Fate::Partitioned);
        let d = drain(&mut n, t + Duration::from_secs(1));
        assert_eq!(d.len(), 1, "the datagram to 3 was cut while it flew");
        assert_eq!(d[0].payload, [2]);
        assert_eq!(n.log()[2].fate, Fate::Partitioned);
    }

    #[test]
    fn moved_address_swallows_late_datagrams_and_new_owner_gets_new_ones() {
        let (mut n, t) = net(LinkConfig::default());
        n.send(t, addr(1), addr(2), vec![1]);
        n.detach(addr(2).ip());
        assert!(drain(&mut n, t + Duration::from_secs(1)).is_empty());
        assert_eq!(n.log()[0].fate, Fate::NoRoute);
        n.attach(NodeId(3), addr(2).ip());
        n.send(t, addr(1), addr(2), vec![2]);
        assert_eq!(drain(&mut n, t + Duration::from_secs(1))[0].node, NodeId(3));
        assert_eq!(n.send(t, addr(9), addr(2), vec![3]), Fate::NoRoute);
    }

    #[test]
    fn loss_and_reordering_are_deterministic_from_the_seed() {
        let cfg = LinkConfig {
            loss: 0.3,
            reorder: 0.3,
            jitter: Duration::from_millis(2),
            ..LinkConfig::default()
        };
        let run = |seed| {
            let mut n = Network::new(seed, cfg.clone());
            n.attach(NodeId(1), addr(1).ip());
            n.attach(NodeId(2), addr(2).ip());
            let t = Instant::now();
            for i in 0..200u8 {
                n.send(
                    t + Duration::from_micros(u64::from(i) * 100),
                    addr(1),
                    addr(2),
                    vec![i],
                );
            }
            drain(&mut n, t + Duration::from_secs(1))
                .into_iter()
                .map(|d| d.payload[0])
                .collect::<Vec<u8>>()
        };
        let a = run(5);
        assert_eq!(a, run(5));
        assert_ne!(a, run(6));
        assert!(a.len() > 100 && a.len() < 180, "lost some: {}", a.len());
        assert!(a.windows(2).any(|w| w[0] > w[1]), "reordered some");
    }

    #[test]
    fn hook_sees_every_send() {
        let (mut n, t) = net(LinkConfig::default());
        let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let s = seen.clone();
        n.set_hook(move |r| s.borrow_mut().push((r.to, r.fate)));
        n.partition(NodeId(1), NodeId(2));
        n.send(t, addr(1), addr(2), vec![0]);
        n.send(t, addr(1), addr(3), vec![0]);
        assert_eq!(
            *seen.borrow(),
            [(addr(2), Fate::Partitioned), (addr(3), Fate::InFlight)]
        );
    }
}
