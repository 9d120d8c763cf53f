use super::*;
use meshd_policy::{DenyReason, Direction};

fn cfg(max_pairs: usize, max_ports: usize) -> ScanConfig {
    ScanConfig {
        max_pairs,
        max_ports_per_peer: max_ports,
        window_secs: 60,
        ..Default::default()
    }
}

/// `host` reports a denial towards/from `peer` on tcp/`port`.
fn denial(host: &str, peer: &str, dir: Direction, port: u16) -> BlockEvent {
    BlockEvent {
        at: 0,
        host: host.into(),
        host_labels: Default::default(),
        peer: peer.into(),
        peer_labels: Default::default(),
        direction: dir,
        proto: 6,
        src: "100.64.0.2:40000".parse().unwrap(),
        dst: SocketAddr::from(([100, 64, 0, 3], port)),
        reason: DenyReason::DefaultDeny,
        count: 1,
    }
}

fn never(_: &CoordinatorState, _: HostId) -> bool {
    false
}

fn feed(
    s: &mut CoordinatorState,
    d: &mut ScanDetector,
    now: u64,
    reporter: u64,
    events: &[BlockEvent],
) -> Vec<ScanAlert> {
    s.detect_scans(now, d, HostId(reporter), events, never)
}

#[test]
fn more_than_n_distinct_pairs_quarantines_exactly_at_the_edge() {
    let mut s = three();
    let mut d = ScanDetector::new(cfg(5, 100));
    // Five distinct pairs over two peers (and repeats): not more than N.
    let mut ev: Vec<BlockEvent> = (1..=3)
        .map(|p| denial("h1", "h2", Direction::Outbound, p))
        .collect();
    ev.extend((1..=2).map(|p| denial("h1", "h3", Direction::Outbound, p)));
    ev.push(denial("h1", "h2", Direction::Outbound, 1));
    assert!(feed(&mut s, &mut d, 100, 1, &ev).is_empty());
    assert!(!s.host(HostId(1)).unwrap().quarantined);
    assert_eq!(d.pairs_of(HostId(1)), 5);
    // The sixth distinct pair.
    let a = feed(
        &mut s,
        &mut d,
        101,
        1,
        &[denial("h1", "h3", Direction::Outbound, 9)],
    );
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!(
        (a[0].host.as_str(), a[0].action.as_str()),
        ("h1", "quarantine")
    );
    assert_eq!(a[0].distinct_pairs, 6);
    assert!(
        a[0].reason
            .contains("6 distinct denied (peer, port) pairs in 60 s"),
        "{}",
        a[0].reason
    );
    assert!(s.host(HostId(1)).unwrap().quarantined);
    assert_eq!(d.pairs_of(HostId(1)), 0, "the window ends with the action");
    // Acted on: further denials do not alert again.
    let more: Vec<BlockEvent> = (20..40)
        .map(|p| denial("h1", "h2", Direction::Outbound, p))
        .collect();
    assert!(feed(&mut s, &mut d, 102, 1, &more).is_empty());
}

#[test]
fn more_than_m_ports_of_one_peer() {
    let mut s = three();
    let mut d = ScanDetector::new(cfg(100, 3));
    // Three ports each of two peers: no peer has more than M.
    let mut ev: Vec<BlockEvent> = (1..=3)
        .map(|p| denial("h1", "h2", Direction::Outbound, p))
        .collect();
    ev.extend((1..=3).map(|p| denial("h1", "h3", Direction::Outbound, p)));
    assert!(feed(&mut s, &mut d, 10, 1, &ev).is_empty());
    let a = feed(
        &mut s,
        &mut d,
        11,
        1,
        &[denial("h1", "h3", Direction::Outbound, 4)],
    );
    assert_eq!(a.len(), 1);
    assert_eq!((a[0].top_peer.as_str(), a[0].top_peer_ports), ("h3", 4));
    assert!(
        a[0].reason.contains("4 distinct denied ports of h3"),
        "{}",
        a[0].reason
    );
}

#[test]
fn the_victims_reports_catch_a_scanner_that_reports_nothing() {
    let mut s = three();
    let mut d = ScanDetector::new(cfg(4, 100));
    // h2 and h3 report inbound denials from h1; h1 itself says nothing.
    let from2: Vec<BlockEvent> = (1..=3)
        .map(|p| denial("h2", "h1", Direction::Inbound, p))
        .collect();
    let from3: Vec<BlockEvent> = (1..=2)
        .map(|p| denial("h3", "h1", Direction::Inbound, p))
        .collect();
    assert!(feed(&mut s, &mut d, 10, 2, &from2).is_empty());
    let a = feed(&mut s, &mut d, 11, 3, &from3);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].host, "h1");
    assert!(s.host(HostId(1)).unwrap().quarantined);
    assert!(!s.host(HostId(2)).unwrap().quarantined);
}

#[test]
fn pairs_older_than_the_window_expire() {
    let mut s = three();
    let mut d = ScanDetector::new(cfg(3, 100));
    for (t, p) in [(100, 1), (110, 2), (120, 3)] {
        assert!(feed(
            &mut s,
            &mut d,
            t,
            1,
            &[denial("h1", "h2", Direction::Outbound, p)]
        )
        .is_empty());
    }
    // At 160 the first (100) is exactly T old: expired, so three pairs again.
    assert!(feed(
        &mut s,
        &mut d,
        160,
        1,
        &[denial("h1", "h2", Direction::Outbound, 4)]
    )
    .is_empty());
    assert_eq!(d.pairs_of(HostId(1)), 3);
    // A repeat refreshes its pair; one more new pair within the window crosses N.
    let a = feed(
        &mut s,
        &mut d,
        161,
        1,
        &[denial("h1", "h2", Direction::Outbound, 5)],
    );
    assert_eq!(a.len(), 1);
}

#[test]
fn a_learning_host_is_never_acted_on() {
    let mut s = three();
    let mut d = ScanDetector::new(cfg(2, 2));
    let learning = |_: &CoordinatorState, id: HostId| id == HostId(1);
    let ev: Vec<BlockEvent> = (1..=50)
        .map(|p| denial("h1", "h2", Direction::Outbound, p))
        .collect();
    assert!(s
        .detect_scans(10, &mut d, HostId(1), &ev, learning)
        .is_empty());
    let inbound: Vec<BlockEvent> = (1..=50)
        .map(|p| denial("h2", "h1", Direction::Inbound, p))
        .collect();
    assert!(s
        .detect_scans(11, &mut d, HostId(2), &inbound, learning)
        .is_empty());
    // Nor is anyone for denials towards a learning host (would-denies of its pairs).
    let towards: Vec<BlockEvent> = (1..=50)
        .map(|p| denial("h3", "h1", Direction::Outbound, p))
        .collect();
    assert!(s
        .detect_scans(12, &mut d, HostId(3), &towards, learning)
        .is_empty());
    assert!(s.hosts().all(|h| !h.quarantined));
    assert_eq!(d.tracked(), 0);
    // The same events without learning mode quarantine h1.
    assert_eq!(s.detect_scans(13, &mut d, HostId(1), &ev, never).len(), 1);
}

#[test]
fn other_denials_and_strangers_do_not_count() {
    let mut s = three();
    let mut d = ScanDetector::new(cfg(1, 1));
    let mut ev = Vec::new();
    for (i, reason) in [
        DenyReason::Quarantined,
        DenyReason::NoFlow,
        DenyReason::Plaintext,
    ]
    .into_iter()
    .enumerate()
    {
        for p in 0..5 {
            let mut e = denial("h1", "h2", Direction::Outbound, 100 * i as u16 + p);
            e.reason = reason.clone();
            ev.push(e);
        }
    }
    ev.extend((1..=5).map(|p| denial("h1", "nobody", Direction::Outbound, p)));
    assert!(feed(&mut s, &mut d, 10, 1, &ev).is_empty());
    let mut d = ScanDetector::new(ScanConfig {
        enabled: false,
        ..cfg(1, 1)
    });
    let ev: Vec<BlockEvent> = (1..=5)
        .map(|p| denial("h1", "h2", Direction::Outbound, p))
        .collect();
    assert!(feed(&mut s, &mut d, 10, 1, &ev).is_empty());
}

#[test]
fn memory_is_bounded() {
    let mut s = st();
    s.create_token(0, TokenSpec::default(), hash_secret(b"t"))
        .unwrap();
    for k in 1..=10 {
        enrol(&mut s, k, b"t").unwrap();
    }
    let mut d = ScanDetector::new(ScanConfig {
        max_actors: 4,
        ..cfg(30, 30)
    });
    for round in 0..20u16 {
        for k in 1..=10u64 {
            let peer = format!("h{}", k % 10 + 1);
            let ev = [denial(&format!("h{k}"), &peer, Direction::Outbound, round)];
            // One pair per actor per 7 s: never more than ~9 in a 60 s window.
            assert!(feed(&mut s, &mut d, u64::from(round) * 7, k, &ev).is_empty());
            assert!(d.tracked() <= 4);
        }
    }
    assert!(d.forgotten() > 0);
    for k in 1..=10 {
        assert!(d.pairs_of(HostId(k)) <= 31);
    }
}

#[test]
fn a_label_group_moves_the_host_and_release_removes_the_label() {
    let mut s = three();
    s.set_labels("h1", [("env".into(), "dev".into())].into())
        .unwrap();
    let c = ScanConfig {
        groups: vec![ScanGroup {
            labels: [("env".to_string(), "dev".to_string())].into(),
            action: "label:zone=restricted".parse().unwrap(),
        }],
        ..cfg(2, 100)
    };
    assert_eq!(
        c.restricted_labels(),
        [("zone".to_string(), "restricted".to_string())]
    );
    let mut d = ScanDetector::new(c.clone());
    let ev: Vec<BlockEvent> = (1..=3)
        .map(|p| denial("h1", "h2", Direction::Outbound, p))
        .collect();
    let a = feed(&mut s, &mut d, 5, 1, &ev);
    assert_eq!(a[0].action, "label:zone=restricted");
    let h = s.host(HostId(1)).unwrap();
    assert_eq!(h.labels["zone"], "restricted");
    assert!(!h.quarantined, "the group's action, not the default");
    // h2 (no group) gets the default.
    let ev: Vec<BlockEvent> = (1..=3)
        .map(|p| denial("h2", "h3", Direction::Outbound, p))
        .collect();
    assert_eq!(feed(&mut s, &mut d, 6, 2, &ev)[0].action, "quarantine");
    let h = s.release_scan("h1", &c.restricted_labels()).unwrap();
    assert!(!h.labels.contains_key("zone"));
    assert_eq!(h.labels["env"], "dev");
    let h = s.release_scan("h2", &c.restricted_labels()).unwrap();
    assert!(!h.quarantined);
}

#[test]
fn actions_and_settings_parse_and_validate() {
    assert_eq!(
        "quarantine".parse::<ScanAction>(),
        Ok(ScanAction::Quarantine)
    );
    assert!("label:zone".parse::<ScanAction>().is_err());
    assert!("label:z one=x".parse::<ScanAction>().is_err());
    assert!("drop".parse::<ScanAction>().is_err());
    assert!(ScanConfig::default().validate().is_ok());
    assert_eq!(
        cfg(0, 1).validate(),
        Err(ScanConfigError::Zero("max_pairs"))
    );
}
