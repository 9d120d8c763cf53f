//! `meshctl policy suggest`: the smallest policy file that allows exactly the observed flows.
//!
//! Input is a [`TopologyView`] (hosts or label groups as nodes, edges opener → responder per
//! protocol/port/verdict). Every `allowed` or `would_deny` edge between two mesh nodes becomes
//! an allowed port; the ports of one (from, to) pair form one rule (`from: {app: web}`, `to:
//! {app: db}`, `ports: [tcp/5432, icmp]`; a node `app=(none)` is `{app: {exists: false}}`; with
//! `group_by: host` a node is the host's name). `denied` edges are left out (nobody allowed
//! them), as are plaintext sources outside the mesh and protocols a policy cannot name. Each
//! rule carries comments citing its evidence (host pairs, flows, packets, first/last seen) and
//! the `tests:` block has one `expect: allow` test per (from, to, port), with label-set
//! endpoints, so `policy check` runs it offline.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::api::{TopologyEdge, TopologyView};
use crate::flow::FlowVerdict;
use crate::model::UnixTime;
use crate::topology::{port_name, rfc3339, GROUP_BY_HOST};

/// Most host pairs a comment lists by name (the rest are counted).
const PAIRS_SHOWN: usize = 5;

/// A suggested policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suggestion {
    /// The YAML file (rules with evidence comments, and tests).
    pub yaml: String,
    /// Rules in it.
    pub rules: usize,
    /// Tests in it.
    pub tests: usize,
    /// Edges left out, each with why (`outside:198.18.0.9 -> app=web tcp/22: …`).
    pub skipped: Vec<String>,
}

/// A YAML scalar: bare when it is a plain word, else JSON-quoted (JSON strings are YAML).
fn scalar(s: &str) -> String {
    let plain = s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "true" | "false" | "yes" | "no" | "on" | "off" | "null" | "y" | "n"
        );
    if plain {
        s.to_string()
    } else {
        serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
    }
}

/// A node as a rule selector and as a test endpoint; `None` for nodes a policy cannot name.
fn node_yaml(group_by: &str, id: &str) -> Option<(String, String, String)> {
    if id.starts_with("outside:") {
        return None;
    }
    if group_by == GROUP_BY_HOST {
        let s = scalar(id);
        return Some((s.clone(), s, id.to_string()));
    }
    let (k, v) = id.split_once('=')?;
    let k = scalar(k);
    if v == "(none)" {
        Some((
            format!("{{ {k}: {{ exists: false }} }}"),
            "{}".to_string(),
            format!("no-{k}"),
        ))
    } else {
        let raw = v.to_string();
        let v = scalar(v);
        Some((format!("{{ {k}: {v} }}"), format!("{{ {k}: {v} }}"), raw))
    }
}

fn rule_name(from: &str, to: &str, taken: &mut BTreeSet<String>) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .collect()
    };
    let base = format!("{}-to-{}", clean(from), clean(to));
    let mut name = base.clone();
    let mut n = 2;
    while !taken.insert(name.clone()) {
        name = format!("{base}-{n}");
        n += 1;
    }
    name
}

fn pairs_text(pairs: &BTreeSet<&str>) -> String {
    let shown: Vec<&str> = pairs.iter().take(PAIRS_SHOWN).copied().collect();
    let mut s = shown.join(", ");
    if pairs.len() > PAIRS_SHOWN {
        let _ = write!(s, " and {} more", pairs.len() - PAIRS_SHOWN);
    }
    s
}

/// The policy file allowing exactly `t`'s allowed and would-deny edges (see the module docs).
/// `now` is only cited in the header.
pub fn suggest(t: &TopologyView, now: UnixTime) -> Suggestion {
    let mut skipped = Vec::new();
    // (from, to) → port → edges.
    let mut by_pair: BTreeMap<(&str, &str), BTreeMap<String, Vec<&TopologyEdge>>> = BTreeMap::new();
    for e in &t.edges {
        let why = if e.verdict == FlowVerdict::Denied {
            Some("not allowed now")
        } else if e.from.starts_with("outside:") || e.to.starts_with("outside:") {
            Some("from outside the mesh")
        } else if !matches!(e.proto, 1 | 6 | 17 | 58) {
            Some("a protocol a policy cannot name")
        } else if node_yaml(&t.group_by, &e.from).is_none()
            || node_yaml(&t.group_by, &e.to).is_none()
        {
            Some("a node a policy cannot name")
        } else {
            None
        };
        let port = port_name(e.proto, e.port);
        if let Some(why) = why {
            skipped.push(format!(
                "{} -> {} {port} {}: {why}",
                e.from, e.to, e.verdict
            ));
            continue;
        }
        by_pair
            .entry((e.from.as_str(), e.to.as_str()))
            .or_default()
            .entry(port)
            .or_default()
            .push(e);
    }
    let mut y = String::new();
    let _ = writeln!(
        y,
        "# Suggested by `meshctl policy suggest` at {} from the flows seen since {}",
        rfc3339(now),
        rfc3339(t.since)
    );
    let _ = writeln!(
        y,
        "# (nodes grouped by {}). It allows exactly the observed allowed and would-deny flows:",
        t.group_by
    );
    let _ = writeln!(
        y,
        "# review it, then `meshctl policy check FILE` and `meshctl policy apply FILE`."
    );
    for s in &skipped {
        let _ = writeln!(y, "# left out: {s}");
    }
    let mut taken = BTreeSet::new();
    let mut tests = Vec::new();
    if by_pair.is_empty() {
        y.push_str("rules: []\n");
    } else {
        y.push_str("rules:\n");
    }
    let rules = by_pair.len();
    for ((from, to), ports) in &by_pair {
        let Some((fsel, fend, fname)) = node_yaml(&t.group_by, from) else {
            continue;
        };
        let Some((tsel, tend, tname)) = node_yaml(&t.group_by, to) else {
            continue;
        };
        let all: Vec<&&TopologyEdge> = ports.values().flatten().collect();
        let pairs: BTreeSet<&str> = all
            .iter()
            .flat_map(|e| e.pairs.iter().map(String::as_str))
            .collect();
        let flows: u64 = all.iter().map(|e| e.flows).sum();
        let packets: u64 = all.iter().map(|e| e.packets).sum();
        let first = all.iter().map(|e| e.first_seen).min().unwrap_or(0);
        let last = all.iter().map(|e| e.last_seen).max().unwrap_or(0);
        let _ = writeln!(
            y,
            "  # {from} -> {to}: {} host pair(s) ({}), {flows} flow(s), {packets} packet(s), \
             first seen {}, last seen {}",
            pairs.len(),
            pairs_text(&pairs),
            rfc3339(first),
            rfc3339(last)
        );
        for (port, edges) in ports {
            for e in edges {
                let how = match (e.verdict, e.rules.is_empty()) {
                    (FlowVerdict::Allowed, false) => format!("allowed by {}", e.rules.join(", ")),
                    (FlowVerdict::Allowed, true) => "allowed".to_string(),
                    _ => "would be denied (learning)".to_string(),
                };
                let p: BTreeSet<&str> = e.pairs.iter().map(String::as_str).collect();
                let _ = writeln!(
                    y,
                    "  #   {port}: {how}; {} flow(s), {} packet(s), {} byte(s) ({}), {} .. {}",
                    e.flows,
                    e.packets,
                    e.bytes,
                    pairs_text(&p),
                    rfc3339(e.first_seen),
                    rfc3339(e.last_seen)
                );
            }
        }
        let name = rule_name(&fname, &tname, &mut taken);
        let list: Vec<&str> = ports.keys().map(String::as_str).collect();
        let _ = writeln!(y, "  - name: {}", scalar(&name));
        let _ = writeln!(y, "    from: {fsel}");
        let _ = writeln!(y, "    to: {tsel}");
        let _ = writeln!(y, "    ports: [{}]", list.join(", "));
        for port in ports.keys() {
            tests.push(format!(
                "  - {{ from: {fend}, to: {tend}, port: {port}, expect: allow }}"
            ));
        }
    }
    if tests.is_empty() {
        y.push_str("tests: []\n");
    } else {
        y.push_str("tests:\n");
        for t in &tests {
            y.push_str(t);
            y.push('\n');
        }
    }
    Suggestion {
        yaml: y,
        rules,
        tests: tests.len(),
        skipped,
    }
}

#[cfg(test)]
mod tests;
