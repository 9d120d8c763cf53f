use super::*;
use crate::api::FlowView;
use crate::flow::{FlowRecord, FlowVerdict, PlaintextFlow};
use meshd_policy::Direction;

/// `record_flows` with the batch's fields as arguments.
#[allow(clippy::too_many_arguments)]
fn flows(
    s: &mut CoordinatorState,
    now: u64,
    host: HostId,
    conn: ConnId,
    interval_start: u64,
    records: Vec<FlowRecord>,
    plaintext: Vec<PlaintextFlow>,
    overflow: u64,
) -> FlowsRecorded {
    s.record_flows(
        now,
        host,
        conn,
        FlowBatch {
            interval_start,
            records,
            plaintext,
            overflow,
        },
    )
}

fn rec(peer: u8, port: u16) -> FlowRecord {
    FlowRecord {
        peer: key(peer),
        direction: Direction::Outbound,
        proto: 6,
        port,
        packets: 3,
        bytes: 300,
        flows: 1,
        first_seen: 100,
        last_seen: 105,
        verdict: FlowVerdict::Allowed,
        rule: Some("app-to-db".into()),
    }
}

fn plain(port: u16) -> PlaintextFlow {
    PlaintextFlow {
        src: "198.18.0.9".parse().unwrap(),
        proto: 6,
        port,
        packets: 2,
        first_seen: 100,
        last_seen: 101,
    }
}

#[test]
fn flows_are_resolved_stamped_and_persisted() {
    let mut s = three();
    let _ = s.take_dirty();
    let mut unknown = rec(9, 5432);
    unknown.peer = key(99);
    let mut denied = rec(3, 22);
    denied.verdict = FlowVerdict::Denied;
    let r = flows(
        &mut s,
        110,
        HostId(1),
        ConnId(1),
        100,
        vec![rec(2, 5432), unknown, denied],
        vec![plain(80)],
        7,
    );
    assert_eq!((r.stored, r.dropped), (3, 1));
    let st = s.flow_stats();
    assert_eq!((st.stored, st.unknown_peer, st.agent_overflow), (3, 1, 7));
    let rows: Vec<FlowView> = s.take_dirty().flows;
    assert_eq!(rows.len(), 3);
    let r0 = &rows[0];
    assert_eq!((r0.host.as_str(), r0.host_id), ("h1", HostId(1)));
    assert_eq!(r0.host_labels.get("app").map(String::as_str), Some("app"));
    assert_eq!(r0.peer.as_deref(), Some("h2"));
    assert_eq!(r0.peer_id, Some(HostId(2)));
    assert_eq!(r0.peer_labels.get("app").map(String::as_str), Some("db"));
    assert_eq!(
        (r0.interval_start, r0.packets, r0.rule.as_deref()),
        (100, 3, Some("app-to-db"))
    );
    assert_eq!(rows[1].rule, None, "only allowed flows keep a rule");
    assert_eq!(rows[2].src, "198.18.0.9".parse().ok());
    assert_eq!(
        (rows[2].peer.clone(), rows[2].verdict),
        (None, FlowVerdict::Denied)
    );
    assert!(s.take_dirty().flows.is_empty(), "taken once");
    // A stale connection's rows are ignored.
    let r = flows(
        &mut s,
        110,
        HostId(1),
        ConnId(77),
        100,
        vec![rec(2, 1)],
        vec![],
        0,
    );
    assert_eq!(r.stored, 0);
    assert!(s.take_dirty().is_empty());
}

#[test]
fn rows_are_bounded_per_host_per_interval_and_per_message() {
    let mut s = three();
    s.set_flow_limits(FlowLimits { rows_per_host: 200 });
    let _ = s.take_dirty();
    let max = crate::flow::MAX_FLOWS_PER_MESSAGE;
    let many = |n: usize| (0..n).map(|i| rec(2, i as u16)).collect::<Vec<_>>();
    // One message: at most MAX_FLOWS_PER_MESSAGE rows.
    let r = flows(
        &mut s,
        110,
        HostId(1),
        ConnId(1),
        100,
        many(max + 5),
        vec![],
        0,
    );
    assert_eq!((r.stored, r.dropped), (max, 5));
    // A second message of the same interval: only up to the per-interval bound.
    let r = flows(
        &mut s,
        110,
        HostId(1),
        ConnId(1),
        100,
        many(max),
        vec![plain(1)],
        0,
    );
    assert_eq!(r.stored, 200 - max);
    // Another host has its own bound; the next interval starts afresh.
    let r = flows(
        &mut s,
        110,
        HostId(2),
        ConnId(2),
        100,
        vec![rec(1, 1)],
        vec![],
        0,
    );
    assert_eq!(r.stored, 1);
    let r = flows(&mut s, 120, HostId(1), ConnId(1), 110, many(10), vec![], 0);
    assert_eq!(r.stored, 10);
    assert_eq!(s.take_dirty().flows.len(), 200 + 1 + 10);
    let over = s.flow_stats().over_limit;
    assert_eq!(over, 5 + (max as u64 + 1 - (200 - max) as u64));
    // Intervals far in the future, or older than every remembered one, are dropped.
    let r = flows(
        &mut s,
        120,
        HostId(1),
        ConnId(1),
        120 + 301,
        many(1),
        vec![],
        0,
    );
    assert_eq!(r.stored, 0);
    for i in 0..FLOW_INTERVALS_REMEMBERED as u64 {
        let r = flows(
            &mut s,
            500,
            HostId(1),
            ConnId(1),
            200 + 10 * i,
            many(1),
            vec![],
            0,
        );
        assert_eq!(r.stored, 1);
    }
    let r = flows(&mut s, 500, HostId(1), ConnId(1), 100, many(1), vec![], 0);
    assert_eq!(r.stored, 0, "older than the 16 remembered intervals");
    assert_eq!(s.flow_stats().late, 1);
    assert_eq!(s.flow_stats().invalid, 1);
    // Values the store cannot hold are dropped or clamped, never a failed commit.
    let mut huge = rec(2, 9);
    huge.packets = u64::MAX;
    let mut bad_time = rec(2, 10);
    bad_time.last_seen = u64::MAX;
    let _ = s.take_dirty();
    let r = flows(
        &mut s,
        500,
        HostId(1),
        ConnId(1),
        350,
        vec![huge, bad_time],
        vec![],
        0,
    );
    assert_eq!(r.stored, 1);
    assert_eq!(s.take_dirty().flows[0].packets, i64::MAX as u64);
}

#[test]
fn the_interval_bound_survives_a_restart() {
    let mut s = three();
    s.set_flow_limits(FlowLimits { rows_per_host: 10 });
    s.restore_flow_intervals(vec![FlowInterval {
        host: HostId(1),
        interval_start: 100,
        rows: 8,
    }]);
    let rows = (0..5).map(|i| rec(2, i)).collect();
    let r = flows(&mut s, 110, HostId(1), ConnId(1), 100, rows, vec![], 0);
    assert_eq!(
        (r.stored, r.dropped),
        (2, 3),
        "8 were stored before the restart"
    );
}
