//! Flow records on the host: every `flow_interval` the firewall's per-flow counts
//! ([`meshd_firewall::Firewall::collect_flows`]), the denials the block log drained and
//! transparent mode's plaintext drops are aggregated by (peer key, direction, protocol,
//! responder port, verdict, rule) into [`FlowRecord`]s and [`PlaintextFlow`]s, at most
//! `flow_max_records` per interval (the rest counted as `overflow`), and handed out as one
//! [`FlowBatch`] for the source to report (coordinator mode) and for `meshd status`.
//!
//! Runs on the host loop, never on the packet path: the workers only bump counters in the
//! conntrack entries they already hold locked.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use meshd_config::FlowSettings;
use meshd_control::flow::{FlowRecord, FlowVerdict, PlaintextFlow};
use meshd_control::session::FlowBatch;
use meshd_firewall::{Denial, Firewall, FlowAdmission, FlowSample};
use meshd_hostnet::Blocked;
use meshd_policy::{DenyReason, Direction};
use meshd_tunnel::{PeerTable, PublicKey};

/// The latest interval's counts, for `meshd status` (shared with the status thread).
#[derive(Debug, Default)]
pub struct FlowStatus {
    /// Intervals collected since start.
    pub intervals: AtomicU64,
    /// Start of the latest interval (Unix seconds).
    pub interval_start: AtomicU64,
    /// Flow records in the latest interval.
    pub records: AtomicU64,
    /// Plaintext flows in the latest interval.
    pub plaintext: AtomicU64,
    /// Flows not kept in the latest interval (cap reached, or lost by the firewall).
    pub overflow: AtomicU64,
}

type GroupKey = (PublicKey, Direction, u8, u16, FlowVerdict, Option<String>);

/// One interval's aggregation (see the module docs).
pub struct FlowCollector {
    settings: FlowSettings,
    /// Unix milliseconds the current interval started at (`None`: not yet started).
    started: Option<u64>,
    records: HashMap<GroupKey, FlowRecord>,
    plaintext: HashMap<(IpAddr, u8, u16), PlaintextFlow>,
    overflow: u64,
    /// Reused between collections (the firewall's shard locks are held only while copying).
    scratch: Vec<FlowSample<u32>>,
}

impl FlowCollector {
    /// A collector whose first interval starts at the first [`due`](Self::due) call.
    pub fn new(settings: FlowSettings) -> Self {
        FlowCollector {
            settings,
            started: None,
            records: HashMap::new(),
            plaintext: HashMap::new(),
            overflow: 0,
            scratch: Vec::new(),
        }
    }

    /// Whether the interval is over at `now_ms` (Unix milliseconds; the first call starts
    /// the first interval).
    pub fn due(&mut self, now_ms: u64) -> bool {
        let started = *self.started.get_or_insert(now_ms);
        now_ms >= started.saturating_add(self.settings.interval.as_millis() as u64)
    }

    fn room(&self) -> bool {
        self.records.len() + self.plaintext.len() < self.settings.max_records
    }

    fn add(&mut self, key: GroupKey, packets: u64, bytes: u64, flows: u64, seen: (u64, u64)) {
        let (first, last) = (seen.0 / 1000, seen.1 / 1000);
        if let Some(r) = self.records.get_mut(&key) {
            r.packets += packets;
            r.bytes += bytes;
            r.flows += flows;
            r.first_seen = r.first_seen.min(first);
            r.last_seen = r.last_seen.max(last);
            return;
        }
        if !self.room() {
            self.overflow += flows.max(1);
            return;
        }
        let (peer, direction, proto, port, verdict, rule) = key.clone();
        self.records.insert(
            key,
            FlowRecord {
                peer,
                direction,
                proto,
                port,
                packets,
                bytes,
                flows,
                first_seen: first,
                last_seen: last,
                verdict,
                rule,
            },
        );
    }

    /// Takes the firewall's counts since the last collection. Peers are named through
    /// `table` (the device's current peer table; a peer removed since is counted as overflow)
    /// and the admitting rule is resolved from the peer's current grants.
    pub fn collect_firewall(&mut self, fw: &Firewall<u32>, table: &PeerTable, now_ms: u64) {
        let mut samples = std::mem::take(&mut self.scratch);
        samples.clear();
        let lost = fw.collect_flows(&mut |s| samples.push(s));
        self.overflow += lost.overflow;
        for s in &samples {
            let Some(peer) = table.by_receiver_index(s.peer << 8) else {
                self.overflow += s.flows;
                continue;
            };
            let (verdict, rule) = match s.admission {
                FlowAdmission::WouldDeny => (FlowVerdict::WouldDeny, None),
                FlowAdmission::Allowed { .. } => {
                    let grants = peer.grants();
                    let rule = s.rule(&grants, table.version, now_ms / 1000);
                    (FlowVerdict::Allowed, rule.map(str::to_string))
                }
            };
            let key = (peer.public_key, s.direction, s.proto, s.port, verdict, rule);
            self.add(
                key,
                s.packets,
                s.bytes,
                s.flows,
                (s.first_seen, s.last_seen),
            );
        }
        self.scratch = samples;
    }

    /// Folds in denials the block log drained (`key`: the peer's key, if still known).
    /// Denials never enter conntrack: each folded denial counts its packets, with no bytes.
    pub fn add_denial(&mut self, d: &Denial<u32>, key: Option<PublicKey>) {
        if matches!(d.reason, DenyReason::Plaintext) {
            return;
        }
        let Some(peer) = key else {
            self.overflow += 1;
            return;
        };
        let group = (
            peer,
            d.direction,
            d.proto,
            d.dst.port(),
            FlowVerdict::Denied,
            None,
        );
        self.add(group, d.count, 0, 1, (d.first_at, d.last_at));
    }

    /// Folds in transparent mode's plaintext drops read at `now_ms`.
    pub fn add_plaintext(&mut self, drops: &[Blocked], now_ms: u64) {
        let now = now_ms / 1000;
        for b in drops {
            let proto = match b.proto {
                meshd_hostnet::Proto::Tcp => meshd_policy::ip_proto::TCP,
                meshd_hostnet::Proto::Udp => meshd_policy::ip_proto::UDP,
            };
            let key = (b.src, proto, b.port);
            if let Some(p) = self.plaintext.get_mut(&key) {
                p.packets += b.packets;
                p.last_seen = now;
                continue;
            }
            if !self.room() {
                self.overflow += 1;
                continue;
            }
            self.plaintext.insert(
                key,
                PlaintextFlow {
                    src: b.src,
                    proto,
                    port: b.port,
                    packets: b.packets,
                    first_seen: now,
                    last_seen: now,
                },
            );
        }
    }

    /// Ends the interval at `now_ms`: the batch (records sorted by peer, direction,
    /// protocol and port), also published in `status`. The next interval starts now.
    pub fn finish(&mut self, now_ms: u64, status: &FlowStatus) -> FlowBatch {
        let mut records: Vec<FlowRecord> = self.records.drain().map(|(_, r)| r).collect();
        records.sort_by(|a, b| {
            (
                a.peer.0,
                a.direction as u8,
                a.proto,
                a.port,
                a.verdict,
                &a.rule,
            )
                .cmp(&(
                    b.peer.0,
                    b.direction as u8,
                    b.proto,
                    b.port,
                    b.verdict,
                    &b.rule,
                ))
        });
        let mut plaintext: Vec<PlaintextFlow> = self.plaintext.drain().map(|(_, p)| p).collect();
        plaintext.sort_by_key(|p| (p.src, p.proto, p.port));
        let batch = FlowBatch {
            interval_start: self.started.unwrap_or(now_ms) / 1000,
            records,
            plaintext,
            overflow: std::mem::take(&mut self.overflow),
        };
        self.started = Some(now_ms);
        status.intervals.fetch_add(1, Relaxed);
        status.interval_start.store(batch.interval_start, Relaxed);
        status.records.store(batch.records.len() as u64, Relaxed);
        status
            .plaintext
            .store(batch.plaintext.len() as u64, Relaxed);
        status.overflow.store(batch.overflow, Relaxed);
        if batch.overflow > 0 {
            tracing::debug!(
                records = batch.records.len(),
                overflow = batch.overflow,
                "flow records over the cap this interval"
            );
        }
        batch
    }
}
