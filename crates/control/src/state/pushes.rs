//! What goes out: full maps and deltas for connected agents, connections to close, and the
//! records to persist.

use std::collections::BTreeSet;

use super::{ConnId, CoordinatorState};
use crate::map::{MapDelta, NetworkMap, Peer};
use crate::model::HostId;
use crate::model::{Host, Token};
use crate::policy::PolicyRecord;
use crate::proto::{CoordinatorMessage, ErrorCode};
use meshd_policy::BlockEvent;

/// A message for one connected agent.
#[derive(Debug, Clone)]
#[must_use]
pub struct Push {
    /// Recipient host.
    pub host: HostId,
    /// Recipient connection.
    pub conn: ConnId,
    /// `FullMap` or `Delta`.
    pub message: CoordinatorMessage,
}

/// A connection to close, with the error to send first.
#[derive(Debug, Clone)]
#[must_use]
pub struct Kick {
    /// Host.
    pub host: HostId,
    /// Connection.
    pub conn: ConnId,
    /// Why.
    pub code: ErrorCode,
}

/// Records changed since the last `take_dirty` (persist all in one transaction).
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct Dirty {
    /// Changed hosts (full records).
    pub hosts: Vec<Host>,
    /// Changed tokens (full records).
    pub tokens: Vec<Token>,
    /// New map version, if it moved.
    pub map_version: Option<u64>,
    /// A newly applied policy version.
    pub policy: Option<PolicyRecord>,
    /// Block events received since the last call (the store keeps a bounded number).
    pub blocks: Vec<BlockEvent>,
    /// Flow rows received since the last call (the store prunes them by age).
    pub flows: Vec<crate::api::FlowView>,
    /// The runtime learning setting, when it changed (`meshctl policy mode`).
    pub mode: Option<super::RuntimeMode>,
    /// Changed CMDB host records (full records; upserted by id).
    pub records: Vec<crate::cmdb::HostRecord>,
    /// New admin-signed statements (upserted by kind and id).
    pub signed: Vec<super::SignedRecord>,
    /// Created or revoked admin tokens (full records; upserted by name).
    pub admin_tokens: Vec<super::AdminToken>,
}

impl Dirty {
    /// Whether the batch changes state every coordinator replica holds (hosts, tokens, policy,
    /// mode, CMDB records, signed statements, admin tokens): such a batch is fenced by the
    /// store's generation and makes the other replicas follow. Blocks, flows and events are
    /// appended and need neither; the map version alone neither (each replica numbers the
    /// maps it sends, and the store keeps the highest: a replica's full maps after following
    /// another must not make that one follow back, for ever).
    pub fn shared(&self) -> bool {
        !(self.hosts.is_empty()
            && self.tokens.is_empty()
            && self.policy.is_none()
            && self.mode.is_none()
            && self.records.is_empty()
            && self.signed.is_empty()
            && self.admin_tokens.is_empty())
    }

    /// Nothing to persist.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
            && self.tokens.is_empty()
            && self.map_version.is_none()
            && self.policy.is_none()
            && self.blocks.is_empty()
            && self.flows.is_empty()
            && self.mode.is_none()
            && self.records.is_empty()
            && self.signed.is_empty()
            && self.admin_tokens.is_empty()
    }
}

/// One peer as a session was last sent it (a session keeps them sorted by host id): a peer
/// whose revision or grants moved on since is sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SentPeer {
    /// The peer.
    pub(super) host: HostId,
    /// The revision of its record that was sent.
    pub(super) rev: u64,
    /// Fingerprint of the grants it was sent with.
    pub(super) grants: u64,
}

impl SentPeer {
    fn new(host: HostId, rev: u64, grants: u64) -> Self {
        SentPeer { host, rev, grants }
    }
}

/// What the live sessions of a replaced state were sent, for the state reloaded in its place
/// (following another replica's commit), so that each goes on with a delta of what changed
/// rather than a full map: see [`CoordinatorState::carry_from`].
pub struct Carried {
    sessions: std::collections::BTreeMap<HostId, super::Session>,
    /// Hosts whose peer-visible record is the same in both states: (revision in the old
    /// state, revision in the new one).
    same: std::collections::HashMap<HostId, (u64, u64)>,
}

/// Revision standing for "changed": never a real one, so the peer is sent again.
const CHANGED: u64 = u64::MAX;

/// A fingerprint of a host's peer-visible record (what [`Peer::from_host`] carries): equal
/// records have equal fingerprints in this process.
fn record_fingerprint(h: &Host) -> u64 {
    use std::hash::{Hash, Hasher};
    let p = Peer::from_host(h);
    let mut s = std::collections::hash_map::DefaultHasher::new();
    (
        &p.name,
        &p.public_key,
        &p.addresses,
        &p.endpoints,
        &p.labels,
        p.transparent,
        &p.next_public_key,
    )
        .hash(&mut s);
    s.finish()
}

/// What computing pushes has cost so far (monotonic counters): the work a change causes,
/// reported per change by the scale benchmark and as metrics. A change to one host should
/// touch the hosts it affects, not every session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PushWork {
    /// Calls of [`CoordinatorState::poll_pushes`] that had something to compute.
    pub rounds: u64,
    /// Sessions looked at (those a round may concern: new, rechecked, or holding a changed record).
    pub sessions: u64,
    /// Full maps built (new sessions).
    pub full_maps: u64,
    /// Sessions whose whole peer set was recomputed (their own record or the policy changed).
    pub peer_sets: u64,
    /// Single (host, peer) grants recomputed (one host's labels or state changed).
    pub pairs: u64,
    /// Peer records put into messages (full maps, upserts, removals).
    pub peers_sent: u64,
    /// Messages pushed.
    pub messages: u64,
}

impl CoordinatorState {
    /// Takes over what `old`'s live sessions were sent, this state having been reloaded from
    /// the store in `old`'s place. Record revisions are per state, so they are translated:
    /// a peer whose record is the same in both keeps its place (no upsert), any other is
    /// sent again. Map versions go on above every version `old` sent. Then
    /// [`resume_carried`](Self::resume_carried) each session once it is attached.
    pub fn carry_from(&mut self, old: CoordinatorState) -> Carried {
        let same = self
            .hosts
            .iter()
            .filter_map(|(id, h)| {
                let o = old.hosts.get(id)?;
                (record_fingerprint(o) == record_fingerprint(h))
                    .then(|| (*id, (old.rev(*id), self.rev(*id))))
            })
            .collect();
        self.map_version = self.map_version.max(old.map_version);
        Carried {
            sessions: old.sessions,
            same,
        }
    }

    /// The session of `id`, just attached to this reloaded state, goes on from what it was
    /// sent before the reload: its next push is a delta (its peer set rechecked against this
    /// state), not a full map. False if there is nothing to go on from (it gets a full map).
    pub fn resume_carried(&mut self, id: HostId, carried: &mut Carried) -> bool {
        let Some(old) = carried.sessions.remove(&id) else {
            return false;
        };
        let (Some(mut sent), Some(s)) = (old.sent, self.sessions.get_mut(&id)) else {
            return false;
        };
        for p in &mut sent {
            p.rev = match carried.same.get(&p.host) {
                Some(&(was, now)) if was == p.rev => now,
                _ => CHANGED,
            };
        }
        s.sent = Some(sent);
        s.sent_version = old.sent_version;
        s.acked = old.acked;
        self.map_version = self.map_version.max(old.sent_version);
        self.recheck.insert(id);
        true
    }

    /// The full map `id` should have now, at `version`.
    pub fn full_map_for(&self, id: HostId, version: u64) -> NetworkMap {
        let mut peers: Vec<std::sync::Arc<Peer>> = self
            .peer_grants(id)
            .into_iter()
            .filter_map(|(p, g)| {
                self.hosts
                    .get(&HostId(p))
                    .map(|h| std::sync::Arc::new(Peer::with_grants(h, g)))
            })
            .collect();
        peers.sort_by_key(|p| p.public_key);
        NetworkMap { version, peers }
    }

    fn rev(&self, id: HostId) -> u64 {
        self.revs.get(&id).copied().unwrap_or(0)
    }

    /// Maps and deltas for connected agents since the last call.
    pub fn poll_pushes(&mut self) -> Vec<Push> {
        let changed = std::mem::take(&mut self.changed);
        let membership = std::mem::take(&mut self.membership_dirty);
        let recheck = std::mem::take(&mut self.recheck);
        let recheck_all = std::mem::take(&mut self.recheck_all);
        let recheck_pairs = std::mem::take(&mut self.recheck_pairs);
        let need_any = self.sessions.values().any(|s| s.sent.is_none())
            || (!self.sessions.is_empty() && (membership || !changed.is_empty()));
        if !need_any {
            let mut out = Vec::new();
            self.finish_rotation_pushes(&mut out);
            return out;
        }
        let version = self.map_version + 1;
        self.push_work.rounds += 1;
        let ids = self.sessions_to_visit(recheck_all, &recheck, &recheck_pairs, &changed);
        let mut out = Vec::new();
        for id in ids {
            // The sent list is taken out and updated in place (never copied): with thousands
            // of sessions of hundreds of peers, copying them all for every change was most of
            // a change's cost.
            let Some((sent, conn, from)) = self
                .sessions
                .get_mut(&id)
                .map(|s| (s.sent.take(), s.conn, s.sent_version))
            else {
                continue;
            };
            self.push_work.sessions += 1;
            let (new_sent, message) = match sent {
                None => {
                    let map = self.full_map_for(id, version);
                    self.push_work.full_maps += 1;
                    self.push_work.peers_sent += map.peers.len() as u64;
                    let ns = self
                        .compiled
                        .peer_fingerprints(id.0)
                        .into_iter()
                        .map(|(p, grants)| SentPeer::new(HostId(p), self.rev(HostId(p)), grants))
                        .collect();
                    (ns, Some(CoordinatorMessage::FullMap { map }))
                }
                Some(mut sent) => {
                    let delta = if recheck_all || recheck.contains(&id) {
                        self.push_work.peer_sets += 1;
                        let (ns, delta) = self.delta_membership(id, &sent, from, version);
                        sent = ns;
                        delta
                    } else if let Some(pairs) = recheck_pairs.get(&id) {
                        self.push_work.pairs += pairs.len() as u64;
                        self.delta_pairs(id, &mut sent, pairs, &changed, from, version)
                    } else {
                        self.delta_changed(id, &mut sent, &changed, from, version)
                    };
                    self.push_work.peers_sent +=
                        (delta.upserts.len() + delta.removals.len()) as u64;
                    // An empty delta still carries new signed statements to the agent.
                    let msg = (!delta.is_empty() || self.trust_pending(id))
                        .then_some(CoordinatorMessage::Delta { delta });
                    (sent, msg)
                }
            };
            let Some(s) = self.sessions.get_mut(&id) else {
                continue;
            };
            s.sent = Some(new_sent);
            if let Some(message) = message {
                s.sent_version = version;
                if let Some(trust) = self.trust_for(id, &message) {
                    out.push(Push {
                        host: id,
                        conn,
                        message: trust,
                    });
                }
                self.push_work.messages += 1;
                out.push(Push {
                    host: id,
                    conn,
                    message,
                });
            }
        }
        if !out.is_empty() {
            self.map_version = version;
            self.version_dirty = true;
        }
        self.finish_rotation_pushes(&mut out);
        out
    }

    /// The sessions a round must look at: new ones (no map yet), those whose own peer set or
    /// some pair may have moved, and every holder of a changed record — found from the compiled
    /// policy (who may peer with the changed host), not by searching every session's list. In
    /// an enrolment storm of 10,000 hosts of a few hundred peers each this is what keeps a
    /// round's cost to the newcomers' neighbourhoods.
    fn sessions_to_visit(
        &self,
        all: bool,
        recheck: &BTreeSet<HostId>,
        recheck_pairs: &std::collections::BTreeMap<HostId, BTreeSet<HostId>>,
        changed: &BTreeSet<HostId>,
    ) -> Vec<HostId> {
        if all {
            return self.sessions.keys().copied().collect();
        }
        let mut v: Vec<HostId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.sent.is_none())
            .map(|(id, _)| *id)
            .collect();
        v.extend(recheck.iter().copied());
        v.extend(recheck_pairs.keys().copied());
        for &c in changed {
            // Its own session too: signed statements about it go to it.
            v.push(c);
            v.extend(self.compiled.may_peer(c.0).into_iter().map(HostId));
        }
        v.sort_unstable();
        v.dedup();
        v.retain(|id| self.sessions.contains_key(id));
        v
    }

    /// What computing pushes has cost since start-up.
    pub fn push_work(&self) -> PushWork {
        self.push_work
    }

    /// The peer record of `peer` as `me` gets it, with the grants between them.
    fn peer_of(&self, me: HostId, peer: HostId) -> Option<Peer> {
        let h = self.hosts.get(&peer)?;
        Some(Peer::with_grants(
            h,
            self.compiled.grants_between(me.0, peer.0),
        ))
    }

    fn delta_membership(
        &self,
        id: HostId,
        old: &[SentPeer],
        from: u64,
        to: u64,
    ) -> (Vec<SentPeer>, MapDelta) {
        // Fingerprints first (no allocation per peer); grants only for new or changed peers.
        let new = self.compiled.peer_fingerprints(id.0);
        let new_ids: Vec<HostId> = new.iter().map(|&(p, _)| HostId(p)).collect();
        let hash_of = |n: HostId| {
            new.binary_search_by_key(&n.0, |x| x.0)
                .map_or(0, |i| new[i].1)
        };
        let with = |n: HostId| self.peer_of(id, n);
        let mut upserts = Vec::new();
        let mut removals = Vec::new();
        let mut ns = Vec::with_capacity(new_ids.len());
        let (mut i, mut j) = (0, 0);
        while i < old.len() || j < new_ids.len() {
            match (old.get(i), new_ids.get(j)) {
                (Some(o), Some(&n)) if o.host == n => {
                    let sent = SentPeer::new(n, self.rev(n), hash_of(n));
                    if sent != *o {
                        upserts.extend(with(n));
                    }
                    ns.push(sent);
                    i += 1;
                    j += 1;
                }
                (Some(o), Some(&n)) if o.host < n => {
                    removals.extend(self.hosts.get(&o.host).map(|h| h.public_key));
                    i += 1;
                }
                (_, Some(&n)) => {
                    upserts.extend(with(n));
                    ns.push(SentPeer::new(n, self.rev(n), hash_of(n)));
                    j += 1;
                }
                (Some(o), None) => {
                    removals.extend(self.hosts.get(&o.host).map(|h| h.public_key));
                    i += 1;
                }
                (None, None) => break,
            }
        }
        (
            ns,
            MapDelta {
                from_version: from,
                to_version: to,
                upserts,
                removals,
            },
        )
    }

    /// Only the pairs (`id`, p ∈ `pairs`) may have changed grants, plus the records in `changed`;
    /// `sent` is updated in place.
    fn delta_pairs(
        &self,
        id: HostId,
        sent: &mut Vec<SentPeer>,
        pairs: &BTreeSet<HostId>,
        changed: &BTreeSet<HostId>,
        from: u64,
        to: u64,
    ) -> MapDelta {
        let mut upserts = Vec::new();
        let mut removals = Vec::new();
        for &p in pairs {
            let fp = self.compiled.pair_fingerprint(id.0, p.0);
            let at = sent.binary_search_by(|s| s.host.cmp(&p));
            match (at, fp) {
                (Ok(i), 0) => {
                    sent.remove(i);
                    removals.extend(self.hosts.get(&p).map(|h| h.public_key));
                }
                (Err(_), 0) => {}
                (Ok(i), fp) => {
                    let new = SentPeer::new(p, self.rev(p), fp);
                    if sent[i] != new {
                        sent[i] = new;
                        upserts.extend(self.peer_of(id, p));
                    }
                }
                (Err(i), fp) => {
                    sent.insert(i, SentPeer::new(p, self.rev(p), fp));
                    upserts.extend(self.peer_of(id, p));
                }
            }
        }
        let rest = self.delta_changed(id, sent, changed, from, to);
        upserts.extend(rest.upserts);
        MapDelta {
            from_version: from,
            to_version: to,
            upserts,
            removals,
        }
    }

    /// The records in `changed` that `id` has as peers and whose revision moved on; `sent` is
    /// updated in place.
    fn delta_changed(
        &self,
        id: HostId,
        sent: &mut [SentPeer],
        changed: &BTreeSet<HostId>,
        from: u64,
        to: u64,
    ) -> MapDelta {
        let mut upserts = Vec::new();
        for c in changed {
            if let Ok(i) = sent.binary_search_by(|s| s.host.cmp(c)) {
                let r = self.rev(*c);
                if sent[i].rev != r {
                    sent[i].rev = r;
                    upserts.extend(self.peer_of(id, *c));
                }
            }
        }
        MapDelta {
            from_version: from,
            to_version: to,
            upserts,
            removals: Vec::new(),
        }
    }

    /// Connections to close since the last call.
    pub fn poll_kicks(&mut self) -> Vec<Kick> {
        std::mem::take(&mut self.kicks)
    }

    /// Records to persist since the last call.
    pub fn take_dirty(&mut self) -> Dirty {
        let hosts = std::mem::take(&mut self.dirty_hosts)
            .into_iter()
            .filter_map(|id| self.hosts.get(&id).cloned())
            .collect();
        let tokens = std::mem::take(&mut self.dirty_tokens)
            .into_iter()
            .filter_map(|id| self.tokens.get(&id).cloned())
            .collect();
        let map_version = std::mem::take(&mut self.version_dirty).then_some(self.map_version);
        Dirty {
            hosts,
            tokens,
            map_version,
            policy: self.dirty_policy.take(),
            blocks: std::mem::take(&mut self.dirty_blocks),
            flows: std::mem::take(&mut self.dirty_flows),
            mode: std::mem::take(&mut self.dirty_mode).then(|| self.runtime_mode.clone()),
            records: std::mem::take(&mut self.dirty_records)
                .into_iter()
                .filter_map(|id| self.records.get(&id).cloned())
                .collect(),
            signed: std::mem::take(&mut self.signed.dirty),
            admin_tokens: std::mem::take(&mut self.dirty_admin_tokens)
                .into_iter()
                .filter_map(|n| self.admin_tokens.get(&n).cloned())
                .collect(),
        }
    }
}
