use super::*;

#[test]
fn blocks_are_bounded_and_filtered() {
    let mut s = three();
    let max = crate::proto::MAX_BLOCKS_PER_MESSAGE;
    s.record_blocks(
        HostId(1),
        ConnId(1),
        (0..max as u64 + 10).map(|t| block(t, "h2")).collect(),
    );
    assert_eq!(s.blocks_dropped(), 10);
    s.record_blocks(HostId(3), ConnId(3), vec![block(500, "h1")]);
    // A stale connection's events are ignored.
    s.record_blocks(HostId(3), ConnId(99), vec![block(600, "h1")]);
    let all = s.blocks(None, 0);
    assert_eq!(all.len(), max + 1);
    assert_eq!(all[0].host, "h1", "the sender's name, not what it claims");
    assert_eq!(s.blocks(Some("h3"), 0).len(), 1);
    assert_eq!(s.blocks(Some("h1"), 0).len(), max + 1, "either end");
    assert_eq!(s.blocks(None, 500).len(), 1);
    assert_eq!(s.take_dirty().blocks.len(), max + 1);
    for _ in 0..(BLOCKS_KEPT / max + 1) {
        s.record_blocks(
            HostId(2),
            ConnId(2),
            (0..max as u64).map(|t| block(1000 + t, "h1")).collect(),
        );
    }
    assert_eq!(s.blocks(None, 0).len(), BLOCKS_KEPT);
}

#[test]
fn agent_input_that_the_store_cannot_hold_is_dropped() {
    let mut s = st();
    s.create_token(0, TokenSpec::default(), hash_secret(b"t"))
        .unwrap();
    enrol_named(&mut s, 1, "a").unwrap();
    let _ = s.take_dirty();
    let ev = |at: u64| BlockEvent {
        at,
        host: String::new(),
        host_labels: Default::default(),
        peer: "p".into(),
        peer_labels: Default::default(),
        direction: meshd_policy::Direction::Inbound,
        proto: 6,
        src: "100.64.0.3:4000".parse().unwrap(),
        dst: "100.64.0.2:22".parse().unwrap(),
        reason: meshd_policy::DenyReason::DefaultDeny,
        count: 1,
    };
    s.record_blocks(HostId(1), ConnId(1), vec![ev(5), ev(u64::MAX)]);
    let d = s.take_dirty();
    assert_eq!(d.blocks.len(), 1);
    assert_eq!(d.blocks[0].at, 5);
    assert_eq!(s.blocks_dropped(), 1);

    let many = EndpointReport {
        addrs: (0..1000u16)
            .map(|p| SocketAddr::from(([192, 0, 2, 1], p)))
            .collect(),
        listen_port: Some(1),
        transparent: false,
    };
    s.report_endpoints(1, HostId(1), ConnId(1), many);
    assert_eq!(
        s.host(HostId(1)).unwrap().reported_endpoints.len(),
        MAX_REPORTED_ENDPOINTS
    );
}
