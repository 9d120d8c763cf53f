//! Who talks to whom: stored flow rows folded into a graph of hosts or label groups
//! ([`topology`], behind `GET /v1/topology`, `meshctl topology` and `/ui`).
//!
//! Both ends of a flow between two mesh hosts report it: the opener as `outbound`, the
//! responder as `inbound`. Each flow is counted once: per (opener, responder, protocol, port,
//! verdict) the opener's report is used when the opener sent one in the window, and the
//! responder's only otherwise (an opener that is not running meshd's flow records, or whose
//! report was dropped). A denial seen only by the responder therefore still shows, and a flow
//! that one end allowed and the other denied shows as two edges, one per verdict.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::api::{FlowView, TopologyEdge, TopologyNode, TopologyView};
use crate::flow::FlowVerdict;
use crate::model::{HostId, Labels, UnixTime};

/// `group_by` value that makes every host its own node.
pub const GROUP_BY_HOST: &str = "host";

/// A host as the topology groups it (the live inventory: current names and labels win over
/// the ones stored with the rows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InventoryHost {
    /// Id.
    pub id: HostId,
    /// Current name.
    pub name: String,
    /// Current labels.
    pub labels: Labels,
}

/// The node id of a host with `labels` named `name` under `group_by`: the name for `host`,
/// else `KEY=VALUE` (`KEY=(none)` when the host lacks the key).
pub fn node_id(group_by: &str, name: &str, labels: &Labels) -> String {
    if group_by == GROUP_BY_HOST {
        return name.to_string();
    }
    match labels.get(group_by) {
        Some(v) => format!("{group_by}={v}"),
        None => format!("{group_by}=(none)"),
    }
}

/// The node id of plaintext sources outside the mesh.
pub fn outside_id(src: std::net::IpAddr) -> String {
    format!("outside:{src}")
}

#[derive(Default)]
struct Sum {
    packets: u64,
    bytes: u64,
    flows: u64,
    first: Option<UnixTime>,
    last: UnixTime,
    rules: BTreeSet<String>,
}

impl Sum {
    fn add(&mut self, r: &FlowView) {
        self.packets = self.packets.saturating_add(r.packets);
        self.bytes = self.bytes.saturating_add(r.bytes);
        self.flows = self.flows.saturating_add(r.flows);
        self.first = Some(self.first.map_or(r.first_seen, |f| f.min(r.first_seen)));
        self.last = self.last.max(r.last_seen);
        self.rules.extend(r.rule.iter().cloned());
    }
}

/// One end of a flow, resolved: node id, host name.
struct End {
    node: String,
    name: String,
}

/// Folds `rows` (raw rows or per-window sums, as the store returns them) into a graph.
/// Every inventory host is a node even without flows; hosts only in the rows (since removed)
/// are grouped by their stored labels. Nodes are sorted by id, edges by (from, to, proto,
/// port, verdict); a node's `learning` counts its hosts that reported `would_deny` flows.
pub fn topology(
    rows: &[FlowView],
    inventory: &[InventoryHost],
    group_by: &str,
    since: UnixTime,
) -> TopologyView {
    let inv: HashMap<HostId, &InventoryHost> = inventory.iter().map(|h| (h.id, h)).collect();
    let mut nodes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut learning: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for h in inventory {
        nodes
            .entry(node_id(group_by, &h.name, &h.labels))
            .or_default()
            .insert(h.name.clone());
    }
    let resolve = |id: Option<HostId>, name: &str, labels: &Labels| -> End {
        match id.and_then(|i| inv.get(&i)) {
            Some(h) => End {
                node: node_id(group_by, &h.name, &h.labels),
                name: h.name.clone(),
            },
            None => End {
                node: node_id(group_by, name, labels),
                name: name.to_string(),
            },
        }
    };
    // (opener, responder, proto, port, verdict) → (opener's report, responder's report).
    type PairKey = (String, String, u8, u16, FlowVerdict);
    let mut pairs: BTreeMap<PairKey, (Option<Sum>, Option<Sum>, String, String)> = BTreeMap::new();
    for r in rows {
        let me = resolve(Some(r.host_id), &r.host, &r.host_labels);
        nodes
            .entry(me.node.clone())
            .or_default()
            .insert(me.name.clone());
        if r.verdict == FlowVerdict::WouldDeny {
            learning
                .entry(me.node.clone())
                .or_default()
                .insert(me.name.clone());
        }
        let (other, by_opener) = if let Some(src) = r.src {
            let node = outside_id(src);
            nodes
                .entry(node.clone())
                .or_default()
                .insert(src.to_string());
            (
                End {
                    node,
                    name: src.to_string(),
                },
                false,
            )
        } else if let Some(peer) = &r.peer {
            let p = resolve(r.peer_id, peer, &r.peer_labels);
            nodes
                .entry(p.node.clone())
                .or_default()
                .insert(p.name.clone());
            (p, r.direction == meshd_policy::Direction::Outbound)
        } else {
            continue;
        };
        let (opener, responder) = if by_opener { (me, other) } else { (other, me) };
        let e = pairs
            .entry((
                opener.name.clone(),
                responder.name.clone(),
                r.proto,
                r.port,
                r.verdict,
            ))
            .or_insert_with(|| (None, None, opener.node.clone(), responder.node.clone()));
        let side = if by_opener { &mut e.0 } else { &mut e.1 };
        side.get_or_insert_with(Sum::default).add(r);
    }
    type EdgeKey = (String, String, u8, u16, FlowVerdict);
    let mut edges: BTreeMap<EdgeKey, (Sum, BTreeSet<String>)> = BTreeMap::new();
    for ((opener, responder, proto, port, verdict), (by_opener, by_responder, from, to)) in pairs {
        let Some(s) = by_opener.or(by_responder) else {
            continue;
        };
        let e = edges
            .entry((from, to, proto, port, verdict))
            .or_insert_with(|| (Sum::default(), BTreeSet::new()));
        e.0.packets = e.0.packets.saturating_add(s.packets);
        e.0.bytes = e.0.bytes.saturating_add(s.bytes);
        e.0.flows = e.0.flows.saturating_add(s.flows);
        if let Some(f) = s.first {
            e.0.first = Some(e.0.first.map_or(f, |x| x.min(f)));
        }
        e.0.last = e.0.last.max(s.last);
        e.0.rules.extend(s.rules);
        e.1.insert(format!("{opener}>{responder}"));
    }
    TopologyView {
        group_by: group_by.to_string(),
        since,
        nodes: nodes
            .into_iter()
            .map(|(id, hosts)| TopologyNode {
                learning: learning.get(&id).map_or(0, BTreeSet::len),
                id,
                hosts: hosts.into_iter().collect(),
            })
            .collect(),
        edges: edges
            .into_iter()
            .map(
                |((from, to, proto, port, verdict), (s, pairs))| TopologyEdge {
                    from,
                    to,
                    proto,
                    port,
                    verdict,
                    rules: s.rules.into_iter().collect(),
                    packets: s.packets,
                    bytes: s.bytes,
                    flows: s.flows,
                    first_seen: s.first.unwrap_or(0),
                    last_seen: s.last,
                    pairs: pairs.into_iter().collect(),
                },
            )
            .collect(),
    }
}

/// The protocol as the CLI and policy files name it: `tcp`, `udp`, `icmp` (1 and 58), else
/// the number.
pub fn proto_name(proto: u8) -> String {
    match proto {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 | 58 => "icmp".into(),
        n => n.to_string(),
    }
}

/// `tcp/443`, `udp/53`, `icmp`, or `proto-47` for others.
pub fn port_name(proto: u8, port: u16) -> String {
    match proto {
        6 | 17 => format!("{}/{port}", proto_name(proto)),
        1 | 58 => "icmp".into(),
        n => format!("proto-{n}"),
    }
}

/// Seconds since the epoch as RFC 3339 UTC, e.g. `2026-12-31T18:00:00Z`.
pub fn rfc3339(t: UnixTime) -> String {
    let (days, secs) = (t / 86_400, t % 86_400);
    // Civil from days (Howard Hinnant), for days since 1970-01-01 (never negative here).
    let z = (days as i64).saturating_add(719_468);
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
pub(crate) mod tests;
