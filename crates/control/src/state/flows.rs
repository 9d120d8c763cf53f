//! Flow records from agents: resolved to host ids, names and labels, bounded per host per
//! interval, and handed to the store with the batch's other records ([`super::Dirty::flows`]).
//!
//! The coordinator keeps no window of flows in memory (a thousand hosts reporting a hundred
//! rows every ten seconds is 36 million rows an hour): queries go to the store. What the state
//! keeps is small and bounded: per host, the row counts of its last
//! [`FLOW_INTERVALS_REMEMBERED`] intervals (so the per-interval bound holds across the several
//! messages of one interval, and across a restart: [`CoordinatorState::restore_flow_intervals`]),
//! and counters of what was dropped.

use std::collections::VecDeque;

use super::{ConnId, CoordinatorState};
use crate::api::FlowView;
use crate::flow::{FlowVerdict, MAX_FLOWS_PER_MESSAGE};
use crate::model::{HostId, Labels, UnixTime};

/// Intervals per host whose row counts are remembered. A row for an interval older than all
/// of them (with the memory full) is dropped as late.
pub const FLOW_INTERVALS_REMEMBERED: usize = 16;

/// An interval may start at most this far (seconds) after the coordinator's clock (agents'
/// clocks drift); later ones are dropped as invalid.
pub const FLOW_CLOCK_AHEAD_SECS: u64 = 300;

/// Default bound on stored rows per host per interval (`flow_rows_per_host`).
pub const DEFAULT_FLOW_ROWS_PER_HOST: usize = 1000;

/// Latest time the store can hold (its integers are signed 64-bit).
const MAX_STORED: u64 = i64::MAX as u64;

/// Settings of the flow ingest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowLimits {
    /// Rows kept per host per interval (records and plaintext flows together); the rest are
    /// dropped and counted.
    pub rows_per_host: usize,
}

impl Default for FlowLimits {
    fn default() -> Self {
        FlowLimits {
            rows_per_host: DEFAULT_FLOW_ROWS_PER_HOST,
        }
    }
}

/// What the coordinator did with flow rows since start (counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Rows accepted for the store.
    pub stored: u64,
    /// Records whose peer key is no live host (dropped).
    pub unknown_peer: u64,
    /// Rows beyond `rows_per_host` in one interval or [`MAX_FLOWS_PER_MESSAGE`] in one message.
    pub over_limit: u64,
    /// Rows for an interval older than every remembered one.
    pub late: u64,
    /// Rows with a time the store cannot hold or an interval too far in the future.
    pub invalid: u64,
    /// Flows the agents themselves could not keep (their `overflow` counters, summed).
    pub agent_overflow: u64,
}

/// The outcome of one [`CoordinatorState::record_flows`] call (for the log).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[must_use]
pub struct FlowsRecorded {
    /// Rows accepted.
    pub stored: usize,
    /// Rows dropped (any reason).
    pub dropped: usize,
}

/// One host's stored row count for one interval (what start-up restores).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowInterval {
    /// Reporting host.
    pub host: HostId,
    /// Interval start.
    pub interval_start: UnixTime,
    /// Rows stored for it.
    pub rows: usize,
}

pub use crate::flow::FlowBatch;

/// The per-host memory of interval row counts, oldest first.
pub(super) type IntervalCounts = VecDeque<(UnixTime, usize)>;

fn clamp(v: u64) -> u64 {
    v.min(MAX_STORED)
}

impl CoordinatorState {
    /// Sets the ingest bounds (the coordinator's config).
    pub fn set_flow_limits(&mut self, limits: FlowLimits) {
        self.flow_limits = limits;
    }

    /// The ingest counters since start.
    pub fn flow_stats(&self) -> FlowStats {
        self.flow_stats
    }

    /// Flow records of one interval from the agent of `id`: each record's peer key is resolved
    /// to a live host (unknown keys are dropped and counted), every row is stamped with the
    /// reporting host's id, name and labels and the peer's, and at most `rows_per_host` rows
    /// per host per interval are kept. The rows go to the store with the next
    /// [`CoordinatorState::take_dirty`].
    pub fn record_flows(
        &mut self,
        now: UnixTime,
        id: HostId,
        conn: ConnId,
        batch: FlowBatch,
    ) -> FlowsRecorded {
        let FlowBatch {
            interval_start,
            records,
            plaintext,
            overflow,
        } = batch;
        let mut out = FlowsRecorded::default();
        if !self.session_ok(id, conn) {
            return out;
        }
        let Some((name, labels)) = self
            .hosts
            .get(&id)
            .map(|h| (h.name.clone(), h.labels.clone()))
        else {
            return out;
        };
        self.flow_stats.agent_overflow = self.flow_stats.agent_overflow.saturating_add(overflow);
        let total = records.len() + plaintext.len();
        if interval_start > now.saturating_add(FLOW_CLOCK_AHEAD_SECS) || interval_start > MAX_STORED
        {
            self.flow_stats.invalid += total as u64;
            out.dropped = total;
            return out;
        }
        let Some(mut room) = self.interval_room(id, interval_start) else {
            self.flow_stats.late += total as u64;
            out.dropped = total;
            return out;
        };
        let mut budget = MAX_FLOWS_PER_MESSAGE;
        let base = |direction, proto, port, verdict| FlowView {
            interval_start,
            host: name.clone(),
            host_id: id,
            host_labels: labels.clone(),
            peer: None,
            peer_id: None,
            peer_labels: Labels::new(),
            src: None,
            direction,
            proto,
            port,
            packets: 0,
            bytes: 0,
            flows: 0,
            first_seen: 0,
            last_seen: 0,
            verdict,
            rule: None,
        };
        let mut rows = Vec::new();
        for r in records {
            if r.first_seen > MAX_STORED || r.last_seen > MAX_STORED {
                self.flow_stats.invalid += 1;
                continue;
            }
            let Some(peer) = self.host_by_key(&r.peer) else {
                self.flow_stats.unknown_peer += 1;
                continue;
            };
            if budget == 0 || room == 0 {
                self.flow_stats.over_limit += 1;
                continue;
            }
            budget -= 1;
            room -= 1;
            let mut v = base(r.direction, r.proto, r.port, r.verdict);
            v.peer = Some(peer.name.clone());
            v.peer_id = Some(peer.id);
            v.peer_labels = peer.labels.clone();
            v.packets = clamp(r.packets);
            v.bytes = clamp(r.bytes);
            v.flows = clamp(r.flows);
            v.first_seen = r.first_seen;
            v.last_seen = r.last_seen;
            v.rule = r.rule.filter(|_| r.verdict == FlowVerdict::Allowed);
            rows.push(v);
        }
        for p in plaintext {
            if p.first_seen > MAX_STORED || p.last_seen > MAX_STORED {
                self.flow_stats.invalid += 1;
                continue;
            }
            if budget == 0 || room == 0 {
                self.flow_stats.over_limit += 1;
                continue;
            }
            budget -= 1;
            room -= 1;
            let mut v = base(
                meshd_policy::Direction::Inbound,
                p.proto,
                p.port,
                FlowVerdict::Denied,
            );
            v.src = Some(p.src);
            v.packets = clamp(p.packets);
            v.flows = 1;
            v.first_seen = p.first_seen;
            v.last_seen = p.last_seen;
            rows.push(v);
        }
        out.stored = rows.len();
        out.dropped = total - rows.len();
        self.count_rows(id, interval_start, rows.len());
        self.flow_stats.stored += rows.len() as u64;
        self.dirty_flows.extend(rows);
        out
    }

    /// How many more rows `id` may store for `interval_start` (`None`: the interval is older
    /// than every remembered one).
    fn interval_room(&self, id: HostId, interval_start: UnixTime) -> Option<usize> {
        let max = self.flow_limits.rows_per_host;
        let Some(q) = self.flow_counts.get(&id) else {
            return Some(max);
        };
        if let Some((_, n)) = q.iter().find(|(t, _)| *t == interval_start) {
            return Some(max.saturating_sub(*n));
        }
        let oldest = q.front().map(|(t, _)| *t);
        if q.len() >= FLOW_INTERVALS_REMEMBERED && oldest.is_some_and(|t| interval_start < t) {
            return None;
        }
        Some(max)
    }

    fn count_rows(&mut self, id: HostId, interval_start: UnixTime, rows: usize) {
        let q = self.flow_counts.entry(id).or_default();
        if let Some(e) = q.iter_mut().find(|(t, _)| *t == interval_start) {
            e.1 += rows;
            return;
        }
        let at = q.partition_point(|(t, _)| *t < interval_start);
        q.insert(at, (interval_start, rows));
        while q.len() > FLOW_INTERVALS_REMEMBERED {
            q.pop_front();
        }
    }

    /// Loads the stored row counts of recent intervals at start-up (so a restart does not
    /// reset the per-interval bound).
    pub fn restore_flow_intervals(&mut self, intervals: Vec<FlowInterval>) {
        for i in intervals {
            self.count_rows(i.host, i.interval_start, i.rows);
        }
    }
}
