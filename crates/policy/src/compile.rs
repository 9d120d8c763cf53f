//! Compilation: which hosts each rule's selectors match, kept as one bitset per distinct
//! selector, and the per-host grants materialised lazily from them.
//!
//! Cost model (H hosts, R rules, S ≤ 2R distinct selectors, W = H/64 words):
//! - [`compile`]: an inverted index label → hosts, then each selector is evaluated once as a few
//!   bitset operations over that index: O(H·labels + S·(W + matching hosts)).
//! - [`Compiled::update_host`] / [`Compiled::remove_host`]: each selector is evaluated once for
//!   that one host, then the affected peers are one OR per rule whose selector flipped: O(S + R·W).
//! - [`Compiled::grants_for`]: O(R + granted pairs); [`Compiled::peers_of`]: O(R·W).
//!
//! A host never gets grants to itself. Rules expired at the compile time are dropped; the others
//! give grants carrying `expires_at`, which agents enforce themselves.
//!
//! Deny rules: one more entry per rule over the same selector bitsets. The pairs a deny touches
//! (one end in `from`, the other in `to`) get their grants recomputed with the denied ports
//! subtracted ([`Grant::subtract`]) and the deny list attached ([`PeerGrants::deny`]); a pair
//! left with nothing (and not learning) is no longer a pair of peers. Every other pair costs
//! one bitset pass more per query (O(D·W) for D deny rules), and a host update touches only the
//! peers on the other side of the deny selectors it flipped.
//!
//! Learning mode: the hosts that learn (`mode: learn`, the `learn:` selectors, and the
//! coordinator's runtime [`Learning`]) are one more bitset, kept up to date with the others. A
//! pair where either end learns is a pair of peers whatever the rules say, and its
//! [`PeerGrants::learn`] is set (the rules' grants stay, so allowed flows still name their
//! rule). A learning host is thus a peer of every host: its map holds the whole mesh. The cost
//! of every query grows by one bitset pass (O(W)); a host update by one bit check.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::file::{Policy, PolicyMode, Rule};
use crate::grant::{Grant, PeerDenies, PeerGrants, UnixTime};
use crate::port::Probe;
use crate::selector::{HostRef, Match, Selector};

/// A fixed-width set of host slots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(words: usize) -> Bits {
        Bits(vec![0; words])
    }
    #[inline]
    fn get(&self, i: u32) -> bool {
        let i = i as usize;
        self.0[i / 64] >> (i % 64) & 1 == 1
    }
    #[inline]
    fn set(&mut self, i: u32, v: bool) {
        let i = i as usize;
        let m = 1u64 << (i % 64);
        if v {
            self.0[i / 64] |= m;
        } else {
            self.0[i / 64] &= !m;
        }
    }
    fn and(&mut self, o: &Bits) {
        self.0.iter_mut().zip(&o.0).for_each(|(a, b)| *a &= b);
    }
    fn or(&mut self, o: &Bits) {
        self.0.iter_mut().zip(&o.0).for_each(|(a, b)| *a |= b);
    }
    fn and_not(&mut self, o: &Bits) {
        self.0.iter_mut().zip(&o.0).for_each(|(a, b)| *a &= !b);
    }
    fn ones(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros();
                w &= w - 1;
                Some(wi as u32 * 64 + b)
            })
        })
    }
    fn from_slots(words: usize, slots: &[u32]) -> Bits {
        let mut b = Bits::new(words);
        for &s in slots {
            b.set(s, true);
        }
        b
    }
}

/// Learning added to the policy file's own (`mode: learn`, `learn:`): the coordinator's runtime
/// setting (`meshctl policy mode learn [--group …]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Learning {
    /// The whole mesh learns.
    pub all: bool,
    /// Hosts matching any of these learn.
    pub groups: Vec<Selector>,
}

/// One active rule.
#[derive(Debug, Clone)]
struct CRule {
    name: String,
    /// Index into `selectors` of `from`.
    from: usize,
    /// Index into `selectors` of `to`.
    to: usize,
    /// The grants it gives (one per port spec), with the rule name and expiry.
    grants: Vec<Grant>,
    expires: Option<UnixTime>,
}

/// One deny rule.
#[derive(Debug, Clone)]
struct CDeny {
    name: String,
    /// Index into `selectors` of `from`.
    from: usize,
    /// Index into `selectors` of `to`.
    to: usize,
    /// Also `to` → `from`.
    both: bool,
    /// The denied port specs as grants named after the rule.
    grants: Vec<Grant>,
}

/// A policy compiled against an inventory. Cheap per-host queries; incremental host changes.
#[derive(Debug, Clone)]
pub struct Compiled {
    compiled_at: UnixTime,
    rules: Vec<CRule>,
    /// Distinct selectors of the active rules.
    selectors: Vec<Selector>,
    /// Per selector, the slots of the hosts it matches.
    members: Vec<Bits>,
    /// Per selector, the rules using it as `from` and as `to`.
    used_from: Vec<Vec<usize>>,
    used_to: Vec<Vec<usize>>,
    /// Deny rules, in file order.
    denies: Vec<CDeny>,
    /// Per selector, the deny rules using it as `from` and as `to`.
    deny_from: Vec<Vec<usize>>,
    deny_to: Vec<Vec<usize>>,
    /// Per rule, a hash of its name and grants (for [`Compiled::peer_fingerprints`]).
    rule_sigs: Vec<u64>,
    /// Every host learns (`mode: learn` or the runtime switch).
    learn_all: bool,
    /// Indices into `selectors` of the learning selectors (file, then runtime).
    learn_sels: Vec<usize>,
    /// The live slots.
    live: Bits,
    /// The live slots that learn.
    learning: Bits,
    /// Slot → host.
    slots: Vec<Option<HostRef>>,
    by_id: HashMap<u64, u32>,
    free: Vec<u32>,
    words: usize,
}

/// Whether a connection is allowed, and by which rule.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Explanation {
    /// Allowed.
    pub allowed: bool,
    /// The first rule (in file order) that allows it; `None` when denied.
    pub rule: Option<String>,
    /// The deny rule that forbids it (first in file order): it wins over every allow rule and
    /// over learning mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny: Option<String>,
    /// With `deny`: the allow rule it overrides (the first that would have allowed it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overrides: Option<String>,
    /// Denied by the rules, but one end learns: the flow passes and is recorded as would-deny
    /// (never set when allowed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub learning: bool,
}

impl Explanation {
    /// Denied by default.
    pub const DENY: Explanation = Explanation {
        allowed: false,
        rule: None,
        learning: false,
        deny: None,
        overrides: None,
    };
}

/// Compiles `policy` for `hosts` at `now`. Hosts with the same id: the last one counts.
pub fn compile(policy: &Policy, hosts: &[HostRef], now: UnixTime) -> Compiled {
    compile_with(policy, &Learning::default(), hosts, now)
}

/// [`compile`], with `extra` learning on top of the file's (the hosts that learn are those
/// the file or `extra` names).
pub fn compile_with<'p>(
    policy: &'p Policy,
    extra: &'p Learning,
    hosts: &[HostRef],
    now: UnixTime,
) -> Compiled {
    let mut c = Compiled::empty(now);
    let mut interned: HashMap<&'p Selector, usize> = HashMap::new();
    let mut intern = |c: &mut Compiled, s: &'p Selector| {
        *interned.entry(s).or_insert_with(|| {
            c.selectors.push(s.clone());
            c.selectors.len() - 1
        })
    };
    for r in policy.rules.iter().filter(|r| !r.expired(now)) {
        let (from, to) = (intern(&mut c, &r.from), intern(&mut c, &r.to));
        c.rules.push(CRule {
            name: r.name.clone(),
            from,
            to,
            grants: grants_of(r),
            expires: r.expires,
        });
    }
    for d in &policy.deny {
        let (from, to) = (intern(&mut c, &d.from), intern(&mut c, &d.to));
        let mut grants: Vec<Grant> = d.ports.iter().map(|p| p.grant(&d.name, None)).collect();
        grants.dedup();
        c.denies.push(CDeny {
            name: d.name.clone(),
            from,
            to,
            both: d.both_ways,
            grants,
        });
    }
    c.learn_all = policy.mode == PolicyMode::Learn || extra.all;
    if !c.learn_all {
        for s in policy.learn.iter().chain(&extra.groups) {
            let i = intern(&mut c, s);
            if !c.learn_sels.contains(&i) {
                c.learn_sels.push(i);
            }
        }
    }
    c.rule_sigs = c
        .rules
        .iter()
        .map(|r| {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (&r.name, &r.grants).hash(&mut h);
            h.finish()
        })
        .collect();
    let ns = c.selectors.len();
    c.used_from = vec![Vec::new(); ns];
    c.used_to = vec![Vec::new(); ns];
    for (i, r) in c.rules.iter().enumerate() {
        c.used_from[r.from].push(i);
        c.used_to[r.to].push(i);
    }
    c.deny_from = vec![Vec::new(); ns];
    c.deny_to = vec![Vec::new(); ns];
    for (i, d) in c.denies.iter().enumerate() {
        c.deny_from[d.from].push(i);
        c.deny_to[d.to].push(i);
    }

    for h in hosts {
        match c.by_id.get(&h.id) {
            Some(&s) => c.slots[s as usize] = Some(h.clone()),
            None => {
                c.by_id.insert(h.id, c.slots.len() as u32);
                c.slots.push(Some(h.clone()));
            }
        }
    }
    c.words = c.slots.len().div_ceil(64).max(1);

    // Inverted index: label → value → slots, label → slots, name → slot.
    let mut by_value: HashMap<&str, HashMap<&str, Vec<u32>>> = HashMap::new();
    let mut by_key: HashMap<&str, Vec<u32>> = HashMap::new();
    let mut by_name: HashMap<&str, u32> = HashMap::new();
    let mut live = Bits::new(c.words);
    for (s, h) in c.slots.iter().enumerate() {
        let (s, h) = (s as u32, h.as_ref().expect("all slots filled"));
        live.set(s, true);
        by_name.insert(&h.name, s);
        for (k, v) in &h.labels {
            by_value.entry(k).or_default().entry(v).or_default().push(s);
            by_key.entry(k).or_default().push(s);
        }
    }
    let words = c.words;
    let value = |k: &str, v: &str| {
        let slots = by_value.get(k).and_then(|m| m.get(v));
        Bits::from_slots(words, slots.map_or(&[][..], Vec::as_slice))
    };
    let key = |k: &str| Bits::from_slots(words, by_key.get(k).map_or(&[][..], Vec::as_slice));
    c.members = c
        .selectors
        .iter()
        .map(|sel| {
            let mut b = live.clone();
            if let Some(n) = &sel.host {
                let mut one = Bits::new(words);
                if let Some(&s) = by_name.get(n.as_str()) {
                    one.set(s, true);
                }
                b.and(&one);
            }
            for (k, m) in &sel.labels {
                match m {
                    Match::Eq(v) => b.and(&value(k, v)),
                    Match::In(vs) => {
                        let mut u = Bits::new(words);
                        vs.iter().for_each(|v| u.or(&value(k, v)));
                        b.and(&u);
                    }
                    Match::Ne(v) => b.and_not(&value(k, v)),
                    Match::Exists(true) => b.and(&key(k)),
                    Match::Exists(false) => b.and_not(&key(k)),
                }
            }
            b
        })
        .collect();
    c.learning = if c.learn_all {
        live.clone()
    } else {
        let mut l = Bits::new(words);
        c.learn_sels.iter().for_each(|&i| l.or(&c.members[i]));
        l
    };
    c.live = live;
    c
}

const OUT: u64 = 0x6f75_7462_6f75_6e64;
const IN: u64 = 0x696e_626f_756e_6421;
const LEARN: u64 = 0x6c65_6172_6e69_6e67;
const DENY: u64 = 0x6465_6e79_7061_6972;

/// Order-sensitive fingerprint step (never 0, so 0 means "no grants").
#[inline]
fn mix(a: u64, x: u64) -> u64 {
    ((a ^ x).wrapping_mul(0x9e37_79b9_7f4a_7c15)).rotate_left(29) | 1
}

fn grants_of(r: &Rule) -> Vec<Grant> {
    let mut g: Vec<Grant> = r
        .ports
        .iter()
        .map(|p| p.grant(&r.name, r.expires))
        .collect();
    g.dedup();
    g
}

impl Compiled {
    fn empty(now: UnixTime) -> Compiled {
        Compiled {
            compiled_at: now,
            rules: Vec::new(),
            rule_sigs: Vec::new(),
            denies: Vec::new(),
            deny_from: Vec::new(),
            deny_to: Vec::new(),
            selectors: Vec::new(),
            members: Vec::new(),
            used_from: Vec::new(),
            used_to: Vec::new(),
            slots: Vec::new(),
            by_id: HashMap::new(),
            free: Vec::new(),
            words: 1,
            learn_all: false,
            learn_sels: Vec::new(),
            live: Bits::new(1),
            learning: Bits::new(1),
        }
    }

    /// Whether `host_id` learns (false for unknown hosts). One bit test: cheap enough for a
    /// detector's every event.
    pub fn is_learning(&self, host_id: u64) -> bool {
        self.by_id
            .get(&host_id)
            .is_some_and(|&s| self.learning.get(s))
    }

    /// Whether every host learns (`mode: learn` or the runtime switch).
    pub fn learns_all(&self) -> bool {
        self.learn_all
    }

    /// The hosts that learn, in no particular order.
    pub fn learning_hosts(&self) -> impl Iterator<Item = &HostRef> {
        self.learning
            .ones()
            .filter_map(|s| self.slots[s as usize].as_ref())
    }

    /// The slots that pair with slot `s` in learning mode: everyone if `s` learns, else the
    /// learning hosts (`s` itself included; callers skip it).
    fn learn_peers(&self, s: u32) -> &Bits {
        if self.learning.get(s) {
            &self.live
        } else {
            &self.learning
        }
    }

    /// The time passed to [`compile`].
    pub fn compiled_at(&self) -> UnixTime {
        self.compiled_at
    }

    /// Number of hosts.
    pub fn host_count(&self) -> usize {
        self.by_id.len()
    }

    /// Number of active (not expired at compile time) rules.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Number of deny rules.
    pub fn deny_count(&self) -> usize {
        self.denies.len()
    }

    /// Whether deny rule `d` forbids slot `a` opening connections to slot `b` (on its ports).
    #[inline]
    fn deny_applies(&self, d: &CDeny, a: u32, b: u32) -> bool {
        let (f, t) = (&self.members[d.from], &self.members[d.to]);
        (f.get(a) && t.get(b)) || (d.both && f.get(b) && t.get(a))
    }

    /// The deny grants for slot `a` opening connections to slot `b`, in deny rule order.
    fn deny_list(&self, a: u32, b: u32) -> Vec<Grant> {
        let mut v = Vec::new();
        for d in self.denies.iter().filter(|d| self.deny_applies(d, a, b)) {
            v.extend(d.grants.iter().cloned());
        }
        v
    }

    /// The slots some deny rule puts on the other side of slot `s` (either way), `s` excluded:
    /// exactly the pairs whose [`PeerGrants::deny`] is not empty.
    fn deny_touched(&self, s: u32) -> Option<Bits> {
        if self.denies.is_empty() {
            return None;
        }
        let mut b = Bits::new(self.words);
        for d in &self.denies {
            if self.members[d.from].get(s) {
                b.or(&self.members[d.to]);
            }
            if self.members[d.to].get(s) {
                b.or(&self.members[d.from]);
            }
        }
        b.set(s, false);
        Some(b)
    }

    /// The grants between slots `s` and `p` seen from `s`, denies subtracted and attached;
    /// empty (default) when they are not peers.
    fn pair_grants(&self, s: u32, p: u32) -> PeerGrants {
        let mut pg = PeerGrants::default();
        if s == p {
            return pg;
        }
        let (out_d, in_d) = (self.deny_list(s, p), self.deny_list(p, s));
        for r in &self.rules {
            if self.members[r.from].get(s) && self.members[r.to].get(p) {
                for g in &r.grants {
                    pg.outbound.extend(g.subtract(&out_d));
                }
            }
            if self.members[r.from].get(p) && self.members[r.to].get(s) {
                for g in &r.grants {
                    pg.inbound.extend(g.subtract(&in_d));
                }
            }
        }
        pg.learn = self.learning.get(s) || self.learning.get(p);
        if pg.is_empty() && !pg.learn {
            return PeerGrants::default();
        }
        pg.deny = PeerDenies {
            outbound: out_d,
            inbound: in_d,
        };
        pg
    }

    /// The fingerprint of a pair some deny touches: a hash of its actual grants.
    fn denied_fingerprint(&self, s: u32, p: u32) -> u64 {
        use std::hash::{Hash, Hasher};
        let pg = self.pair_grants(s, p);
        if pg == PeerGrants::default() {
            return 0;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        pg.hash(&mut h);
        mix(h.finish(), DENY)
    }

    /// The host with this id.
    pub fn host(&self, id: u64) -> Option<&HostRef> {
        let s = *self.by_id.get(&id)?;
        self.slots[s as usize].as_ref()
    }

    /// The host with this name (linear scan; for admin queries).
    pub fn host_by_name(&self, name: &str) -> Option<&HostRef> {
        self.slots.iter().flatten().find(|h| h.name == name)
    }

    /// The earliest rule expiry after `now`: recompile then so expired peers are dropped
    /// (agents stop using expired grants on their own before that).
    pub fn next_expiry(&self, now: UnixTime) -> Option<UnixTime> {
        self.rules
            .iter()
            .filter_map(|r| r.expires)
            .filter(|&t| t > now)
            .min()
    }

    fn peer_slots(&self, s: u32) -> Bits {
        let mut b = Bits::new(self.words);
        for r in &self.rules {
            if self.members[r.from].get(s) {
                b.or(&self.members[r.to]);
            }
            if self.members[r.to].get(s) {
                b.or(&self.members[r.from]);
            }
        }
        b.or(self.learn_peers(s));
        b.set(s, false);
        b
    }

    fn ids(&self, b: &Bits) -> BTreeSet<u64> {
        b.ones()
            .filter_map(|s| self.slots[s as usize].as_ref().map(|h| h.id))
            .collect()
    }

    /// The hosts `host_id` may open connections to or be reached from (the peers in its map).
    pub fn peers_of(&self, host_id: u64) -> BTreeSet<u64> {
        let Some(&s) = self.by_id.get(&host_id) else {
            return BTreeSet::new();
        };
        let mut b = self.peer_slots(s);
        if let Some(touched) = self.deny_touched(s) {
            for p in touched.ones() {
                if b.get(p) && self.pair_grants(s, p) == PeerGrants::default() {
                    b.set(p, false);
                }
            }
        }
        self.ids(&b)
    }

    /// Every host that may be a peer of `host_id` — a superset of [`Compiled::peers_of`]
    /// (denies not subtracted), unsorted and without allocation per host: which sessions a
    /// change to `host_id` can concern. The relation is symmetric (rules count both ways).
    pub fn may_peer(&self, host_id: u64) -> Vec<u64> {
        let Some(&s) = self.by_id.get(&host_id) else {
            return Vec::new();
        };
        let b = self.peer_slots(s);
        b.ones()
            .filter_map(|p| self.slots[p as usize].as_ref().map(|h| h.id))
            .collect()
    }

    /// The grants of `host_id` towards each of its peers (none for unknown hosts). Outbound:
    /// rules with the host in `from` and the peer in `to`; inbound: the peer in `from` and the
    /// host in `to`. Grants are in rule order.
    pub fn grants_for(&self, host_id: u64) -> BTreeMap<u64, PeerGrants> {
        let mut out: BTreeMap<u64, PeerGrants> = BTreeMap::new();
        let Some(&s) = self.by_id.get(&host_id) else {
            return out;
        };
        for r in &self.rules {
            let (is_from, is_to) = (self.members[r.from].get(s), self.members[r.to].get(s));
            if is_from {
                for p in self.members[r.to].ones().filter(|&p| p != s) {
                    let id = self.slots[p as usize].as_ref().expect("member is live").id;
                    out.entry(id)
                        .or_default()
                        .outbound
                        .extend(r.grants.iter().cloned());
                }
            }
            if is_to {
                for p in self.members[r.from].ones().filter(|&p| p != s) {
                    let id = self.slots[p as usize].as_ref().expect("member is live").id;
                    out.entry(id)
                        .or_default()
                        .inbound
                        .extend(r.grants.iter().cloned());
                }
            }
        }
        for p in self.learn_peers(s).ones().filter(|&p| p != s) {
            if let Some(h) = &self.slots[p as usize] {
                out.entry(h.id).or_default().learn = true;
            }
        }
        if let Some(touched) = self.deny_touched(s) {
            for p in touched.ones() {
                let Some(h) = &self.slots[p as usize] else {
                    continue;
                };
                if let std::collections::btree_map::Entry::Occupied(mut e) = out.entry(h.id) {
                    let pg = self.pair_grants(s, p);
                    if pg == PeerGrants::default() {
                        e.remove();
                    } else {
                        e.insert(pg);
                    }
                }
            }
        }
        out
    }

    /// Per peer of `host_id`, sorted by peer id: a fingerprint of the grants between them (equal
    /// grants give equal fingerprints; different grants differ up to 64-bit hash collisions).
    /// No allocation per peer: for checking many maps for changes, then fetching only the
    /// changed peers with [`Compiled::grants_between`].
    pub fn peer_fingerprints(&self, host_id: u64) -> Vec<(u64, u64)> {
        let Some(&s) = self.by_id.get(&host_id) else {
            return Vec::new();
        };
        let mut acc = vec![0u64; self.slots.len()];
        for (r, &sig) in self.rules.iter().zip(&self.rule_sigs) {
            if self.members[r.from].get(s) {
                for p in self.members[r.to].ones().filter(|&p| p != s) {
                    acc[p as usize] = mix(acc[p as usize], sig ^ OUT);
                }
            }
            if self.members[r.to].get(s) {
                for p in self.members[r.from].ones().filter(|&p| p != s) {
                    acc[p as usize] = mix(acc[p as usize], sig ^ IN);
                }
            }
        }
        for p in self.learn_peers(s).ones().filter(|&p| p != s) {
            acc[p as usize] = mix(acc[p as usize], LEARN);
        }
        if let Some(touched) = self.deny_touched(s) {
            for p in touched.ones() {
                if acc[p as usize] != 0 {
                    acc[p as usize] = self.denied_fingerprint(s, p);
                }
            }
        }
        let mut v: Vec<(u64, u64)> = acc
            .iter()
            .enumerate()
            .filter(|(_, &a)| a != 0)
            .filter_map(|(p, &a)| self.slots[p].as_ref().map(|h| (h.id, a)))
            .collect();
        v.sort_unstable();
        v
    }

    /// The fingerprint [`Compiled::peer_fingerprints`] gives `peer_id` (0: no grants).
    pub fn pair_fingerprint(&self, host_id: u64, peer_id: u64) -> u64 {
        let (Some(&s), Some(&p)) = (self.by_id.get(&host_id), self.by_id.get(&peer_id)) else {
            return 0;
        };
        if s == p {
            return 0;
        }
        if self.deny_touched(s).is_some_and(|t| t.get(p)) {
            return self.denied_fingerprint(s, p);
        }
        let mut acc = 0;
        for (r, &sig) in self.rules.iter().zip(&self.rule_sigs) {
            let (f, t) = (&self.members[r.from], &self.members[r.to]);
            if f.get(s) && t.get(p) {
                acc = mix(acc, sig ^ OUT);
            }
            if t.get(s) && f.get(p) {
                acc = mix(acc, sig ^ IN);
            }
        }
        if self.learning.get(s) || self.learning.get(p) {
            acc = mix(acc, LEARN);
        }
        acc
    }

    /// The grants between `host_id` and one peer, seen from `host_id` (denies subtracted and
    /// listed in [`PeerGrants::deny`]; empty when they are not peers).
    pub fn grants_between(&self, host_id: u64, peer_id: u64) -> PeerGrants {
        let (Some(&s), Some(&p)) = (self.by_id.get(&host_id), self.by_id.get(&peer_id)) else {
            return PeerGrants::default();
        };
        if self.denies.is_empty() {
            // No deny: the same as pair_grants, without the deny lists' allocations.
            let mut pg = PeerGrants::default();
            if s == p {
                return pg;
            }
            for r in &self.rules {
                if self.members[r.from].get(s) && self.members[r.to].get(p) {
                    pg.outbound.extend(r.grants.iter().cloned());
                }
                if self.members[r.from].get(p) && self.members[r.to].get(s) {
                    pg.inbound.extend(r.grants.iter().cloned());
                }
            }
            pg.learn = self.learning.get(s) || self.learning.get(p);
            return pg;
        }
        self.pair_grants(s, p)
    }

    /// The deny rules forbidding `from` opening connections to `to` on some port, whether or
    /// not the two are peers (for `policy diff`): grants named after the deny rules.
    pub fn denies_between(&self, from: u64, to: u64) -> Vec<Grant> {
        match (self.by_id.get(&from), self.by_id.get(&to)) {
            (Some(&f), Some(&t)) if f != t => self.deny_list(f, t),
            _ => Vec::new(),
        }
    }

    /// Whether `from` may open a connection to `to` matching `probe` at `now`, and by which rule;
    /// when denied, whether it passes anyway as would-deny because one end learns.
    pub fn explain(&self, from: u64, to: u64, probe: Probe, now: UnixTime) -> Explanation {
        let (Some(&f), Some(&t)) = (self.by_id.get(&from), self.by_id.get(&to)) else {
            return Explanation::DENY;
        };
        if f == t {
            return Explanation::DENY;
        }
        let allow = self.rules.iter().find(|r| {
            self.members[r.from].get(f)
                && self.members[r.to].get(t)
                && r.grants
                    .iter()
                    .any(|g| g.admits(probe.ip_proto, probe.port, now))
        });
        let deny = self.denies.iter().find(|d| {
            self.deny_applies(d, f, t)
                && d.grants
                    .iter()
                    .any(|g| g.admits(probe.ip_proto, probe.port, now))
        });
        if let Some(d) = deny {
            return Explanation {
                deny: Some(d.name.clone()),
                overrides: allow.map(|r| r.name.clone()),
                ..Explanation::DENY
            };
        }
        allow.map_or(
            Explanation {
                learning: self.learning.get(f) || self.learning.get(t),
                ..Explanation::DENY
            },
            |r| Explanation {
                allowed: true,
                rule: Some(r.name.clone()),
                ..Explanation::DENY
            },
        )
    }

    /// The peers whose grants towards the host in `slot` change when its membership of the
    /// selectors in `flipped` changes (the other hosts' memberships being what they are now).
    fn affected_by(&self, slot: u32, flipped: &[usize]) -> BTreeSet<u64> {
        let mut b = Bits::new(self.words);
        for &sel in flipped {
            for &r in &self.used_from[sel] {
                b.or(&self.members[self.rules[r].to]);
            }
            for &r in &self.used_to[sel] {
                b.or(&self.members[self.rules[r].from]);
            }
            for &d in &self.deny_from[sel] {
                b.or(&self.members[self.denies[d].to]);
            }
            for &d in &self.deny_to[sel] {
                b.or(&self.members[self.denies[d].from]);
            }
        }
        b.set(slot, false);
        self.ids(&b)
    }

    /// Adds or changes one host. Returns the hosts whose grants changed: the host itself (when
    /// new or when its grants changed) and every peer whose grants towards it changed.
    pub fn update_host(&mut self, h: &HostRef) -> BTreeSet<u64> {
        let (slot, is_new) = match self.by_id.get(&h.id) {
            Some(&s) => (s, false),
            None => {
                let s = match self.free.pop() {
                    Some(s) => s,
                    None => {
                        self.slots.push(None);
                        (self.slots.len() - 1) as u32
                    }
                };
                let words = self.slots.len().div_ceil(64).max(1);
                if words > self.words {
                    // Grow by doubling so a run of additions stays linear.
                    let words = words.max(self.words * 2);
                    self.members.iter_mut().for_each(|m| m.0.resize(words, 0));
                    self.live.0.resize(words, 0);
                    self.learning.0.resize(words, 0);
                    self.words = words;
                }
                self.by_id.insert(h.id, s);
                (s, true)
            }
        };
        self.slots[slot as usize] = Some(h.clone());
        let mut flipped = Vec::new();
        for (i, sel) in self.selectors.iter().enumerate() {
            let now_in = sel.matches(h);
            if self.members[i].get(slot) != now_in {
                flipped.push(i);
                self.members[i].set(slot, now_in);
            }
        }
        let was_learning = !is_new && self.learning.get(slot);
        let learns = self.learn_all || self.learn_sels.iter().any(|&i| self.members[i].get(slot));
        self.live.set(slot, true);
        self.learning.set(slot, learns);
        let mut affected = self.affected_by(slot, &flipped);
        if is_new {
            // Everyone it now pairs with in learning mode gains it as a peer.
            affected.extend(self.ids(self.learn_peers(slot)));
            affected.remove(&h.id);
        } else if was_learning != learns {
            // Its pairs with hosts that do not learn themselves flip their learn flag.
            let mut b = self.live.clone();
            b.and_not(&self.learning);
            b.set(slot, false);
            affected.extend(self.ids(&b));
        }
        if is_new || !affected.is_empty() {
            affected.insert(h.id);
        }
        affected
    }

    /// Removes one host. Returns the hosts that had grants towards it (not the host itself).
    pub fn remove_host(&mut self, id: u64) -> BTreeSet<u64> {
        let Some(slot) = self.by_id.remove(&id) else {
            return BTreeSet::new();
        };
        let flipped: Vec<usize> = (0..self.selectors.len())
            .filter(|&i| self.members[i].get(slot))
            .collect();
        for &i in &flipped {
            self.members[i].set(slot, false);
        }
        let mut affected = self.affected_by(slot, &flipped);
        affected.extend(self.ids(self.learn_peers(slot)));
        affected.remove(&id);
        self.live.set(slot, false);
        self.learning.set(slot, false);
        self.slots[slot as usize] = None;
        self.free.push(slot);
        affected
    }

    /// Every host, in no particular order.
    pub fn hosts(&self) -> impl Iterator<Item = &HostRef> {
        self.slots.iter().flatten()
    }
}

impl crate::eval::Resolve for Compiled {
    fn resolve(&self, name: &str) -> Option<HostRef> {
        self.host_by_name(name).cloned()
    }
}
