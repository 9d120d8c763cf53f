//! `meshctl topology`, `meshctl export flows` and the printing of `meshctl policy suggest`:
//! tables, Graphviz and CSV renderings of the coordinator's flow views.

use meshd_control::api::{FlowView, TopologyView};
use meshd_control::flow::FlowVerdict;
use meshd_control::topology::{port_name, rfc3339};

use crate::output::Table;

/// Graphviz colour of an edge's verdict.
fn colour(v: FlowVerdict) -> &'static str {
    match v {
        FlowVerdict::Allowed => "darkgreen",
        FlowVerdict::Denied => "red",
        FlowVerdict::WouldDeny => "orange",
    }
}

/// A Graphviz ID, quoted and escaped.
fn dot_id(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `1.2 MB`, `340 B`.
fn volume(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The topology as a table: one line per edge, then nodes without edges.
pub fn topology_table(t: &TopologyView) -> String {
    let mut tb = Table::new(&[
        "FROM",
        "TO",
        "PORT",
        "VERDICT",
        "FLOWS",
        "PACKETS",
        "BYTES",
        "RULES",
        "LAST SEEN",
    ]);
    for e in &t.edges {
        tb.row(vec![
            e.from.clone(),
            e.to.clone(),
            port_name(e.proto, e.port),
            e.verdict.to_string(),
            e.flows.to_string(),
            e.packets.to_string(),
            volume(e.bytes),
            if e.rules.is_empty() {
                "-".into()
            } else {
                e.rules.join(",")
            },
            rfc3339(e.last_seen),
        ]);
    }
    let mut s = format!(
        "{} node(s), {} edge(s) since {} (grouped by {})\n",
        t.nodes.len(),
        t.edges.len(),
        rfc3339(t.since),
        t.group_by
    );
    s.push_str(&tb.render());
    let learning: Vec<String> = t
        .nodes
        .iter()
        .filter(|n| n.learning > 0)
        .map(|n| format!("{} ({} of {})", n.id, n.learning, n.hosts.len()))
        .collect();
    if !learning.is_empty() {
        s.push_str(&format!(
            "not enforcing (would-deny flows seen): {}\n",
            learning.join(", ")
        ));
    }
    s
}

/// The topology as a Graphviz digraph: nodes labelled with their hosts, edges opener →
/// responder labelled `tcp/5432 (3)` and coloured by verdict (green allowed, red denied,
/// orange would-deny).
pub fn topology_dot(t: &TopologyView) -> String {
    let mut s = String::from("digraph meshd {\n  rankdir=LR;\n  node [shape=box];\n");
    for n in &t.nodes {
        let mut label = n.id.clone();
        if t.group_by != "host" && !n.hosts.is_empty() {
            label.push('\n');
            label.push_str(&n.hosts.join(", "));
        }
        let style = if n.learning > 0 { ", style=dashed" } else { "" };
        s.push_str(&format!(
            "  {} [label={}{style}];\n",
            dot_id(&n.id),
            dot_id(&label)
        ));
    }
    for e in &t.edges {
        let label = format!("{} ({})", port_name(e.proto, e.port), e.flows);
        s.push_str(&format!(
            "  {} -> {} [label={}, color={}, fontcolor={}, tooltip={}];\n",
            dot_id(&e.from),
            dot_id(&e.to),
            dot_id(&label),
            colour(e.verdict),
            colour(e.verdict),
            dot_id(&format!("{} {}", e.verdict, e.pairs.join(" "))),
        ));
    }
    s.push_str("}\n");
    s
}

/// The CSV columns of `export flows` (one row per stored flow row).
pub const CSV_HEADER: [&str; 19] = [
    "interval_start",
    "host",
    "host_id",
    "host_labels",
    "peer",
    "peer_id",
    "peer_labels",
    "src",
    "direction",
    "proto",
    "port",
    "packets",
    "bytes",
    "flows",
    "first_seen",
    "last_seen",
    "verdict",
    "rule",
    "service",
];

fn labels_text(l: &meshd_control::Labels) -> String {
    l.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Flow rows as CSV with a header row (times RFC 3339, labels `k=v,k=v`, `service` the
/// `tcp/5432` form).
pub fn flows_csv(rows: &[FlowView]) -> anyhow::Result<String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(CSV_HEADER)?;
    for r in rows {
        w.write_record([
            rfc3339(r.interval_start),
            r.host.clone(),
            r.host_id.to_string(),
            labels_text(&r.host_labels),
            r.peer.clone().unwrap_or_default(),
            r.peer_id.map(|p| p.to_string()).unwrap_or_default(),
            labels_text(&r.peer_labels),
            r.src.map(|s| s.to_string()).unwrap_or_default(),
            match r.direction {
                meshd_policy::Direction::Outbound => "outbound".into(),
                meshd_policy::Direction::Inbound => "inbound".into(),
            },
            r.proto.to_string(),
            r.port.to_string(),
            r.packets.to_string(),
            r.bytes.to_string(),
            r.flows.to_string(),
            rfc3339(r.first_seen),
            rfc3339(r.last_seen),
            r.verdict.to_string(),
            r.rule.clone().unwrap_or_default(),
            port_name(r.proto, r.port),
        ])?;
    }
    let bytes = w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(String::from_utf8(bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshd_control::api::{TopologyEdge, TopologyNode};
    use meshd_control::HostId;

    fn view() -> TopologyView {
        TopologyView {
            group_by: "app".into(),
            since: 0,
            nodes: vec![
                TopologyNode {
                    id: "app=db".into(),
                    hosts: vec!["d1".into()],
                    learning: 0,
                },
                TopologyNode {
                    id: "app=web".into(),
                    hosts: vec!["w1".into(), "w2".into()],
                    learning: 1,
                },
            ],
            edges: vec![TopologyEdge {
                from: "app=web".into(),
                to: "app=db".into(),
                proto: 6,
                port: 5432,
                verdict: FlowVerdict::WouldDeny,
                rules: vec![],
                packets: 10,
                bytes: 1_500_000,
                flows: 3,
                first_seen: 0,
                last_seen: 60,
                pairs: vec!["w1>d1".into()],
            }],
        }
    }

    #[test]
    fn dot_is_a_digraph_coloured_by_verdict() {
        let d = topology_dot(&view());
        assert!(d.starts_with("digraph meshd {"), "{d}");
        assert!(d.contains("\"app=web\" -> \"app=db\" [label=\"tcp/5432 (3)\", color=orange"));
        assert!(
            d.contains("label=\"app=web\\nw1, w2\", style=dashed"),
            "{d}"
        );
        assert!(d.trim_end().ends_with('}'));
        assert_eq!(dot_id("a\"b"), "\"a\\\"b\"");
    }

    #[test]
    fn table_lists_edges_and_learning_nodes() {
        let t = topology_table(&view());
        assert!(t.contains("app=web") && t.contains("tcp/5432") && t.contains("would_deny"));
        assert!(t.contains("1.5 MB"), "{t}");
        assert!(
            t.contains("not enforcing (would-deny flows seen): app=web (1 of 2)"),
            "{t}"
        );
    }

    #[test]
    fn csv_has_a_header_and_quotes_label_lists() {
        let row = FlowView {
            interval_start: 60,
            host: "w1".into(),
            host_id: HostId(1),
            host_labels: [("app".into(), "web".into()), ("env".into(), "prod".into())].into(),
            peer: Some("d1".into()),
            peer_id: Some(HostId(2)),
            peer_labels: [("app".into(), "db".into())].into(),
            src: None,
            direction: meshd_policy::Direction::Outbound,
            proto: 6,
            port: 5432,
            packets: 3,
            bytes: 300,
            flows: 1,
            first_seen: 61,
            last_seen: 62,
            verdict: FlowVerdict::Allowed,
            rule: Some("web-to-db".into()),
        };
        let text = flows_csv(&[row]).unwrap();
        let mut r = csv::Reader::from_reader(text.as_bytes());
        let header: Vec<String> = r.headers().unwrap().iter().map(String::from).collect();
        assert_eq!(header, CSV_HEADER);
        let rec = r.records().next().unwrap().unwrap();
        assert_eq!(&rec[1], "w1");
        assert_eq!(&rec[3], "app=web,env=prod");
        assert_eq!(&rec[16], "allowed");
        assert_eq!(&rec[18], "tcp/5432");
        assert!(text.contains("\"app=web,env=prod\""), "quoted: {text}");
    }
}
