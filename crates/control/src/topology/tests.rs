use super::*;
use meshd_policy::Direction;

pub(crate) fn labels(app: Option<&str>) -> Labels {
    app.map(|a| [("app".to_string(), a.to_string())].into())
        .unwrap_or_default()
}

pub(crate) fn inv(id: u64, name: &str, app: Option<&str>) -> InventoryHost {
    InventoryHost {
        id: HostId(id),
        name: name.into(),
        labels: labels(app),
    }
}

/// A row reported by `host` about `peer`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn row(
    host: &InventoryHost,
    peer: &InventoryHost,
    direction: Direction,
    proto: u8,
    port: u16,
    verdict: FlowVerdict,
    packets: u64,
    at: UnixTime,
) -> FlowView {
    FlowView {
        interval_start: at,
        host: host.name.clone(),
        host_id: host.id,
        host_labels: host.labels.clone(),
        peer: Some(peer.name.clone()),
        peer_id: Some(peer.id),
        peer_labels: peer.labels.clone(),
        src: None,
        direction,
        proto,
        port,
        packets,
        bytes: packets * 100,
        flows: 1,
        first_seen: at,
        last_seen: at + 5,
        verdict,
        rule: (verdict == FlowVerdict::Allowed).then(|| "web-db".to_string()),
    }
}

#[test]
fn both_ends_of_a_flow_count_once_preferring_the_opener() {
    let (w1, d1) = (inv(1, "w1", Some("web")), inv(2, "d1", Some("db")));
    let a = FlowVerdict::Allowed;
    let rows = vec![
        // w1 opened to d1: both ends report it; the responder counted a few packets less.
        row(&w1, &d1, Direction::Outbound, 6, 5432, a, 10, 100),
        row(&d1, &w1, Direction::Inbound, 6, 5432, a, 9, 100),
        row(&w1, &d1, Direction::Outbound, 6, 5432, a, 4, 110),
        row(&d1, &w1, Direction::Inbound, 6, 5432, a, 4, 110),
    ];
    let t = topology(&rows, &[w1.clone(), d1.clone()], "host", 50);
    assert_eq!(t.edges.len(), 1, "{t:#?}");
    let e = &t.edges[0];
    assert_eq!((e.from.as_str(), e.to.as_str()), ("w1", "d1"));
    assert_eq!((e.packets, e.bytes, e.flows), (14, 1400, 2));
    assert_eq!((e.first_seen, e.last_seen), (100, 115));
    assert_eq!(e.pairs, vec!["w1>d1"]);
    assert_eq!(e.rules, vec!["web-db"]);
    // Only the responder reported (the opener's records were lost): its report counts.
    let t = topology(&rows[1..2], &[w1, d1], "host", 50);
    assert_eq!(t.edges[0].from, "w1", "still opener -> responder");
    assert_eq!(t.edges[0].packets, 9);
}

#[test]
fn label_groups_none_outside_and_learning() {
    let w1 = inv(1, "w1", Some("web"));
    let w2 = inv(2, "w2", Some("web"));
    let d1 = inv(3, "d1", Some("db"));
    let n1 = inv(4, "n1", None);
    let idle = inv(5, "idle", Some("cache"));
    let (a, wd, den) = (
        FlowVerdict::Allowed,
        FlowVerdict::WouldDeny,
        FlowVerdict::Denied,
    );
    let mut rows = vec![
        row(&w1, &d1, Direction::Outbound, 6, 5432, a, 10, 100),
        row(&w2, &d1, Direction::Outbound, 6, 5432, a, 5, 200),
        row(&n1, &d1, Direction::Outbound, 1, 0, wd, 2, 300),
        row(&d1, &w1, Direction::Outbound, 6, 22, den, 1, 400),
    ];
    let mut plain = row(&d1, &d1, Direction::Inbound, 6, 5432, den, 3, 500);
    plain.peer = None;
    plain.peer_id = None;
    plain.src = Some("198.18.0.9".parse().unwrap());
    rows.push(plain);
    let t = topology(&rows, &[w1, w2, d1, n1.clone(), idle], "app", 0);
    let ids: Vec<&str> = t.nodes.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "app=(none)",
            "app=cache",
            "app=db",
            "app=web",
            "outside:198.18.0.9"
        ]
    );
    let web = t.nodes.iter().find(|n| n.id == "app=web").unwrap();
    assert_eq!(web.hosts, ["w1", "w2"]);
    let none = t.nodes.iter().find(|n| n.id == "app=(none)").unwrap();
    assert_eq!(
        (none.hosts.len(), none.learning),
        (1, 1),
        "n1 reported would_deny"
    );
    let key = |e: &TopologyEdge| (e.from.clone(), e.to.clone(), e.port, e.verdict);
    let edges: Vec<_> = t.edges.iter().map(key).collect();
    assert_eq!(
        edges,
        [
            ("app=(none)".into(), "app=db".into(), 0, wd),
            ("app=db".into(), "app=web".into(), 22, den),
            ("app=web".into(), "app=db".into(), 5432, a),
            ("outside:198.18.0.9".into(), "app=db".into(), 5432, den),
        ]
    );
    let web_db = &t.edges[2];
    assert_eq!(web_db.packets, 15);
    assert_eq!(web_db.pairs, ["w1>d1", "w2>d1"]);
    // A renamed or relabelled host is grouped as it is now; a removed one by its stored labels.
    let mut moved = n1.clone();
    moved.labels = labels(Some("web"));
    let t = topology(&rows[2..3], &[moved], "app", 0);
    assert_eq!(t.edges[0].from, "app=web");
    assert_eq!(
        t.edges[0].to, "app=db",
        "d1 not in the inventory: its stored labels"
    );
}

#[test]
fn times_format_as_rfc3339() {
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(rfc3339(1_798_740_000), "2026-12-31T18:00:00Z");
    assert_eq!(port_name(6, 443), "tcp/443");
    assert_eq!(port_name(58, 0), "icmp");
    assert_eq!(port_name(47, 0), "proto-47");
}
