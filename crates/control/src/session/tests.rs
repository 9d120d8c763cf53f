use super::*;
use crate::flow::{FlowRecord, PlaintextFlow};
use crate::map::{MapDelta, Peer};
use crate::model::HostId;
use meshd_policy::{DenyReason, Direction};
use meshd_tunnel::PublicKey;
use proptest::prelude::*;
use std::net::SocketAddr;

/// Coordinator replicas' control addresses.
const A: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 10)),
    7443,
);
const B: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 11)),
    7443,
);
const C: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 12)),
    7443,
);

fn ep(port: u16) -> EndpointReport {
    EndpointReport {
        addrs: vec![SocketAddr::from(([192, 0, 2, 1], port))],
        listen_port: Some(51820),
        transparent: false,
    }
}

fn host() -> HostInfo {
    HostInfo {
        id: HostId(1),
        name: "a".into(),
        public_key: PublicKey([1; 32]),
        addresses: vec!["100.64.0.1".parse().unwrap()],
        networks: vec!["100.64.0.0/10".parse().unwrap()],
        labels: Default::default(),
    }
}

fn peer(k: u8, port: u16) -> Peer {
    Peer {
        name: format!("p{k}"),
        public_key: PublicKey([k; 32]),
        addresses: vec![format!("100.64.0.{k}").parse().unwrap()],
        endpoints: vec![SocketAddr::from(([198, 51, 100, k], port))],
        labels: Default::default(),
        grants: Default::default(),
        transparent: false,
        next_public_key: None,
    }
}

fn map(version: u64, peers: &[u8]) -> NetworkMap {
    NetworkMap::new(version, peers.iter().map(|&k| peer(k, 51820)))
}

fn block(n: u16) -> BlockEvent {
    BlockEvent {
        at: 100,
        host: "a".into(),
        host_labels: Default::default(),
        peer: "p2".into(),
        peer_labels: Default::default(),
        direction: Direction::Inbound,
        proto: 6,
        src: SocketAddr::from(([100, 64, 0, 2], n)),
        dst: SocketAddr::from(([100, 64, 0, 1], 22)),
        reason: DenyReason::DefaultDeny,
        count: 1,
    }
}

fn record(port: u16) -> FlowRecord {
    FlowRecord {
        peer: PublicKey([2; 32]),
        direction: Direction::Outbound,
        proto: 6,
        port,
        packets: 3,
        bytes: 180,
        flows: 1,
        first_seen: 100,
        last_seen: 101,
        verdict: crate::flow::FlowVerdict::Allowed,
        rule: Some("r".into()),
    }
}

fn plain(port: u16) -> PlaintextFlow {
    PlaintextFlow {
        src: "198.18.0.9".parse().unwrap(),
        proto: 17,
        port,
        packets: 1,
        first_seen: 100,
        last_seen: 100,
    }
}

fn batch(start: u64, records: u16, plaintext: u16, overflow: u64) -> FlowBatch {
    FlowBatch {
        interval_start: start,
        records: (0..records).map(record).collect(),
        plaintext: (0..plaintext).map(plain).collect(),
        overflow,
    }
}

/// The `Flows` messages among `msgs`: (interval start, records, plaintext, overflow).
fn flow_msgs(msgs: &[AgentMessage]) -> Vec<(u64, usize, usize, u64)> {
    msgs.iter()
        .filter_map(|m| match m {
            AgentMessage::Flows {
                interval_start,
                records,
                plaintext,
                overflow,
            } => Some((*interval_start, records.len(), plaintext.len(), *overflow)),
            _ => None,
        })
        .collect()
}

fn params() -> SessionParams {
    SessionParams {
        coordinator: A,
        fallbacks: vec![],
        endpoints: ep(1),
        initial_map: None,
        jitter_seed: 7,
    }
}

fn drain(s: &mut AgentSession) -> Vec<Action> {
    std::iter::from_fn(|| s.poll_action()).collect()
}

fn sends(actions: &[Action]) -> Vec<AgentMessage> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

fn welcome() -> Input {
    Input::Frame(CoordinatorMessage::Welcome {
        protocol: PROTOCOL_VERSION,
        host: host(),
        replicas: vec![],
    })
}

/// A session past `Welcome`, its actions drained.
fn connected(t0: Instant) -> AgentSession {
    let mut s = AgentSession::new(params(), t0);
    assert_eq!(drain(&mut s), vec![Action::Connect(A)]);
    s.handle_input(Input::TransportUp, t0);
    assert_eq!(
        drain(&mut s),
        vec![Action::Send(AgentMessage::Resume {
            protocol: PROTOCOL_VERSION,
            endpoints: ep(1),
        })]
    );
    s.handle_input(welcome(), t0);
    assert_eq!(
        drain(&mut s),
        vec![Action::State(SessionState::Connected { host: host() })]
    );
    s
}

fn full_map(s: &mut AgentSession, m: NetworkMap, now: Instant) -> Vec<Action> {
    s.handle_input(Input::Frame(CoordinatorMessage::FullMap { map: m }), now);
    drain(s)
}

/// Runs a failure at `now` and returns the reconnect delay the session chose.
fn fail_and_delay(s: &mut AgentSession, now: Instant) -> Duration {
    s.handle_input(
        Input::TransportDown {
            error: "gone".into(),
        },
        now,
    );
    let _ = drain(s);
    let at = s.poll_timeout().unwrap();
    s.handle_timeout(at);
    assert_eq!(drain(s), vec![Action::Connect(A)]);
    at - now
}

#[test]
fn full_map_is_applied_and_acked() {
    let t0 = Instant::now();
    let mut s = connected(t0);
    let m = map(3, &[2, 3]);
    let a = full_map(&mut s, m.clone(), t0);
    assert_eq!(
        a,
        vec![
            Action::ApplyMap(Arc::new(m.clone())),
            Action::Send(AgentMessage::Ack { version: 3 })
        ]
    );
    assert_eq!(s.map(), Some(&m));
}

#[test]
fn matching_delta_is_applied_and_acked() {
    let t0 = Instant::now();
    let mut s = connected(t0);
    let _ = full_map(&mut s, map(3, &[2, 3]), t0);
    let new = map(4, &[2, 4]);
    let delta = s.map().unwrap().diff(&new);
    assert_eq!(delta.from_version, 3);
    s.handle_input(Input::Frame(CoordinatorMessage::Delta { delta }), t0);
    assert_eq!(
        drain(&mut s),
        vec![
            Action::ApplyMap(Arc::new(new.clone())),
            Action::Send(AgentMessage::Ack { version: 4 })
        ]
    );
    assert_eq!(s.map(), Some(&new));
}

#[test]
fn mismatched_delta_asks_for_resync_and_applies_nothing() {
    let t0 = Instant::now();
    let mut s = connected(t0);
    let _ = full_map(&mut s, map(3, &[2, 3]), t0);
    let delta = MapDelta {
        from_version: 9,
        to_version: 10,
        upserts: vec![peer(5, 1)],
        removals: vec![],
    };
    s.handle_input(Input::Frame(CoordinatorMessage::Delta { delta }), t0);
    assert_eq!(drain(&mut s), vec![Action::Send(AgentMessage::Resync)]);
    assert_eq!(s.map(), Some(&map(3, &[2, 3])));
    // Until a full map comes, even a delta that would fit is not trusted.
    let delta = s.map().unwrap().diff(&map(4, &[2]));
    s.handle_input(Input::Frame(CoordinatorMessage::Delta { delta }), t0);
    assert_eq!(drain(&mut s), vec![Action::Send(AgentMessage::Resync)]);
    assert_eq!(s.map().unwrap().version, 3);
    let a = full_map(&mut s, map(5, &[2]), t0);
    assert_eq!(sends(&a), vec![AgentMessage::Ack { version: 5 }]);
}

#[test]
fn delta_before_a_full_map_of_this_connection_resyncs() {
    // A persisted map may be stale: the first map of every connection must be a full one.
    let t0 = Instant::now();
    let mut s = AgentSession::new(
        SessionParams {
            initial_map: Some(map(3, &[2])),
            ..params()
        },
        t0,
    );
    let _ = drain(&mut s);
    s.handle_input(Input::TransportUp, t0);
    s.handle_input(welcome(), t0);
    let _ = drain(&mut s);
    let delta = map(3, &[2]).diff(&map(4, &[2, 3]));
    s.handle_input(Input::Frame(CoordinatorMessage::Delta { delta }), t0);
    assert_eq!(drain(&mut s), vec![Action::Send(AgentMessage::Resync)]);
    assert_eq!(s.map().unwrap().version, 3);
}

#[test]
fn initial_map_is_published_before_connecting() {
    let t0 = Instant::now();
    let m = map(7, &[2, 3]);
    let mut s = AgentSession::new(
        SessionParams {
            initial_map: Some(m.clone()),
            ..params()
        },
        t0,
    );
    assert_eq!(s.map(), Some(&m));
    assert_eq!(
        drain(&mut s),
        vec![Action::ApplyMap(Arc::new(m)), Action::Connect(A)]
    );
    assert_eq!(
        s.state(),
        &SessionState::Connecting {
            attempt: 0,
            last_error: None
        }
    );
}

#[test]
fn non_retryable_error_refuses_for_good() {
    for during_hello in [true, false] {
        let t0 = Instant::now();
        let mut s = if during_hello {
            let mut s = AgentSession::new(params(), t0);
            let _ = drain(&mut s);
            s.handle_input(Input::TransportUp, t0);
            let _ = drain(&mut s);
            s
        } else {
            connected(t0)
        };
        s.handle_input(
            Input::Frame(CoordinatorMessage::Error {
                code: ErrorCode::HostRemoved,
                message: "bye".into(),
            }),
            t0,
        );
        let refused = SessionState::Refused {
            code: ErrorCode::HostRemoved,
            message: "bye".into(),
        };
        assert_eq!(
            drain(&mut s),
            vec![Action::Close, Action::State(refused.clone())]
        );
        assert_eq!(s.state(), &refused);
        assert!(s.is_finished());
        assert_eq!(s.poll_timeout(), None);
        // Nothing brings it back.
        let later = t0 + Duration::from_secs(3600);
        s.handle_timeout(later);
        s.handle_input(Input::TransportUp, later);
        s.handle_input(welcome(), later);
        s.handle_input(Input::Endpoints(ep(9)), later);
        s.handle_input(Input::Blocks(vec![block(1)]), later);
        s.handle_input(Input::TransportDown { error: "x".into() }, later);
        s.shutdown();
        assert_eq!(drain(&mut s), vec![]);
        assert_eq!(s.state(), &refused);
        assert_eq!(s.queue_blocks(vec![block(2)]), Err(vec![block(2)]));
    }
}

#[test]
fn retryable_error_reconnects_with_the_refusal_as_last_error() {
    let t0 = Instant::now();
    let mut s = AgentSession::new(params(), t0);
    let _ = drain(&mut s);
    s.handle_input(Input::TransportUp, t0);
    let _ = drain(&mut s);
    s.handle_input(
        Input::Frame(CoordinatorMessage::Error {
            code: ErrorCode::AlreadyConnected,
            message: "dup".into(),
        }),
        t0,
    );
    let a = drain(&mut s);
    assert_eq!(a[0], Action::Close);
    let Action::State(SessionState::Connecting {
        attempt: 1,
        last_error: Some(e),
    }) = &a[1]
    else {
        panic!("{a:?}")
    };
    assert!(
        e.contains(&ErrorCode::AlreadyConnected.to_string()) && e.contains("dup"),
        "{e}"
    );
    let at = s.poll_timeout().unwrap();
    assert!(at > t0 && at <= t0 + BASE_BACKOFF);
    s.handle_timeout(at - Duration::from_nanos(1));
    assert_eq!(drain(&mut s), vec![]);
    s.handle_timeout(at);
    assert_eq!(drain(&mut s), vec![Action::Connect(A)]);
}

#[test]
fn backoff_grows_caps_at_five_seconds_and_jitters() {
    // The schedule itself (any random input).
    for a in 1..40 {
        for r in [0, 1, 499, 999, 1000, u32::MAX] {
            let d = backoff(a, r);
            assert!(d <= MAX_BACKOFF, "{a}: {d:?}");
            assert!(d >= BASE_BACKOFF / 2);
        }
    }
    assert_eq!(backoff(1, 0), BASE_BACKOFF / 2);
    assert_eq!(backoff(3, 0), BASE_BACKOFF * 2);
    assert!(backoff(20, 0) >= MAX_BACKOFF / 2);
    assert!(backoff(1, 999) <= BASE_BACKOFF);
    // In the session: consecutive failures wait longer, up to the cap, each within 50–100 %.
    let t0 = Instant::now();
    let mut s = AgentSession::new(params(), t0);
    let _ = drain(&mut s);
    let mut now = t0;
    let mut delays = Vec::new();
    for attempt in 1..=12u32 {
        let d = fail_and_delay(&mut s, now);
        let full = (BASE_BACKOFF * (1 << (attempt - 1).min(10))).min(MAX_BACKOFF);
        assert!(
            d <= full && d >= full / 2,
            "attempt {attempt}: {d:?} of {full:?}"
        );
        assert_eq!(
            s.state(),
            &SessionState::Connecting {
                attempt,
                last_error: Some("gone".into())
            }
        );
        delays.push(d);
        now += d;
    }
    assert!(delays[6] > delays[0] * 4, "{delays:?}");
    // Jitter: at the cap the delays are not all equal.
    assert!(delays[8..].windows(2).any(|w| w[0] != w[1]), "{delays:?}");
    // A welcome resets the count.
    s.handle_input(Input::TransportUp, now);
    s.handle_input(welcome(), now);
    let d = fail_and_delay(&mut s, now);
    assert!(d <= BASE_BACKOFF, "{d:?}");
}

#[test]
fn transport_down_reconnects_without_close() {
    let t0 = Instant::now();
    let mut s = connected(t0);
    s.handle_input(
        Input::TransportDown {
            error: "connection lost".into(),
        },
        t0,
    );
    assert_eq!(
        drain(&mut s),
        vec![Action::State(SessionState::Connecting {
            attempt: 1,
            last_error: Some("connection lost".into())
        })]
    );
    // Frames of the dead connection are ignored.
    let _ = full_map(&mut s, map(3, &[2]), t0);
    assert_eq!(s.map(), None);
    assert!(s.poll_timeout().is_some());
}

#[test]
fn same_seed_same_schedule_other_seed_other_schedule() {
    let run = |seed| {
        let t0 = Instant::now();
        let mut s = AgentSession::new(
            SessionParams {
                jitter_seed: seed,
                ..params()
            },
            t0,
        );
        let _ = drain(&mut s);
        (0..8)
            .map(|_| fail_and_delay(&mut s, t0))
            .collect::<Vec<_>>()
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}

#[test]
fn jitter_covers_the_range_even_from_seed_zero() {
    for seed in [0, 1, u64::MAX] {
        let mut j = Jitter::new(seed);
        let v: Vec<u32> = (0..1000).map(|_| j.next_u32() % 1000).collect();
        let (lo, hi) = (v.iter().min().unwrap(), v.iter().max().unwrap());
        assert!(*lo < 50 && *hi > 950, "seed {seed}: {lo}..{hi}");
    }
}

#[test]
fn connect_that_never_comes_up_times_out() {
    let t0 = Instant::now();
    let mut s = AgentSession::new(params(), t0);
    let _ = drain(&mut s);
    assert_eq!(s.poll_timeout(), Some(t0 + CONNECT_TIMEOUT));
    s.handle_timeout(t0 + CONNECT_TIMEOUT);
    assert_eq!(
        drain(&mut s),
        vec![
            Action::Close,
            Action::State(SessionState::Connecting {
                attempt: 1,
                last_error: Some("timed out waiting for the coordinator".into())
            })
        ]
    );
    // The late answer to the abandoned connect is ignored: no Resume.
    s.handle_input(Input::TransportUp, t0 + CONNECT_TIMEOUT);
    assert_eq!(drain(&mut s), vec![]);
}

#[test]
fn welcome_that_never_comes_times_out() {
    let t0 = Instant::now();
    let mut s = AgentSession::new(params(), t0);
    let _ = drain(&mut s);
    let t1 = t0 + Duration::from_secs(1);
    s.handle_input(Input::TransportUp, t1);
    let _ = drain(&mut s);
    assert_eq!(s.poll_timeout(), Some(t1 + HELLO_TIMEOUT));
    s.handle_timeout(t1 + HELLO_TIMEOUT);
    let a = drain(&mut s);
    assert_eq!(a[0], Action::Close);
    assert!(matches!(
        &a[1],
        Action::State(SessionState::Connecting { attempt: 1, last_error: Some(e) }) if e.contains("timed out")
    ));
}

#[test]
fn second_welcome_is_a_protocol_error() {
    let t0 = Instant::now();
    let mut s = connected(t0);
    s.handle_input(welcome(), t0);
    let a = drain(&mut s);
    assert_eq!(
        a,
        vec![
            Action::Close,
            Action::State(SessionState::Connecting {
                attempt: 1,
                last_error: Some("protocol error: second welcome".into())
            })
        ]
    );
    assert!(s.poll_timeout().is_some());
}

#[test]
fn anything_but_welcome_first_is_a_protocol_error() {
    let t0 = Instant::now();
    let mut s = AgentSession::new(params(), t0);
    let _ = drain(&mut s);
    s.handle_input(Input::TransportUp, t0);
    let _ = drain(&mut s);
    let a = full_map(&mut s, map(1, &[2]), t0);
    assert_eq!(a[0], Action::Close);
    assert!(matches!(
        &a[1],
        Action::State(SessionState::Connecting { last_error: Some(e), .. }) if e == "protocol error: expected welcome, got full_map"
    ));
    assert_eq!(s.map(), None);
}

#[test]
fn endpoints_changed_while_down_go_in_the_next_resume() {
    let t0 = Instant::now();
    let mut s = AgentSession::new(params(), t0);
    let _ = drain(&mut s);
    s.handle_input(Input::Endpoints(ep(2)), t0);
    assert_eq!(drain(&mut s), vec![]);
    s.handle_input(Input::TransportUp, t0);
    assert_eq!(
        drain(&mut s),
        vec![Action::Send(AgentMessage::Resume {
            protocol: PROTOCOL_VERSION,
            endpoints: ep(2),
        })]
    );
    s.handle_input(welcome(), t0);
    // Already in the Resume: no report after the welcome.
    assert_eq!(sends(&drain(&mut s)), vec![]);
}

#[test]
fn endpoints_changed_while_connected_are_reported() {
    let t0 = Instant::now();
    let mut s = connected(t0);
    s.handle_input(Input::Endpoints(ep(3)), t0);
    s.handle_input(Input::Endpoints(ep(4)), t0);
    // Coalesced: the latest report, once.
    assert_eq!(
        drain(&mut s),
        vec![Action::Send(AgentMessage::ReportEndpoints {
            endpoints: ep(4)
        })]
    );
    s.handle_input(Input::Endpoints(ep(4)), t0);
    assert_eq!(drain(&mut s), vec![]);
    assert_eq!(s.endpoints(), &ep(4));
}

#[test]
fn endpoints_changed_while_waiting_for_welcome_are_reported_after_it() {
    let t0 = Instant::now();
    let mut s = AgentSession::new(params(), t0);
    let _ = drain(&mut s);
    s.handle_input(Input::TransportUp, t0);
    let _ = drain(&mut s);
    s.handle_input(Input::Endpoints(ep(5)), t0);
    assert_eq!(drain(&mut s), vec![]);
    s.handle_input(welcome(), t0);
    assert_eq!(
        sends(&drain(&mut s)),
        vec![AgentMessage::ReportEndpoints { endpoints: ep(5) }]
    );
}

#[test]
fn blocks_queue_while_down_and_go_out_after_welcome_in_chunks() {
    let t0 = Instant::now();
    let mut s = AgentSession::new(params(), t0);
    let _ = drain(&mut s);
    let big: Vec<BlockEvent> = (0..150).map(block).collect();
    s.handle_input(Input::Blocks(big.clone()), t0);
    for i in 1..BLOCK_BATCHES_QUEUED {
        assert_eq!(s.queue_blocks(vec![block(1000 + i as u16)]), Ok(()));
    }
    assert_eq!(s.blocks_queued(), BLOCK_BATCHES_QUEUED);
    // Full: handed back, or counted.
    assert_eq!(s.queue_blocks(vec![block(1)]), Err(vec![block(1)]));
    s.handle_input(Input::Blocks(vec![block(2)]), t0);
    assert_eq!(s.blocks_dropped(), 1);
    assert_eq!(s.queue_blocks(vec![]), Ok(()));
    // Nothing goes out before the welcome.
    s.handle_input(Input::TransportUp, t0);
    let a = drain(&mut s);
    assert_eq!(sends(&a).len(), 1, "{a:?}");
    s.handle_input(welcome(), t0);
    let msgs = sends(&drain(&mut s));
    let chunks: Vec<&Vec<BlockEvent>> = msgs
        .iter()
        .map(|m| match m {
            AgentMessage::Blocks { events } => events,
            other => panic!("{other:?}"),
        })
        .collect();
    let sizes: Vec<usize> = chunks.iter().map(|c| c.len()).collect();
    let mut want = vec![MAX_BLOCKS_PER_MESSAGE, MAX_BLOCKS_PER_MESSAGE, 150 - 128];
    want.extend(std::iter::repeat_n(1, BLOCK_BATCHES_QUEUED - 1));
    assert_eq!(sizes, want);
    let first: Vec<BlockEvent> = chunks[..3].iter().flat_map(|c| c.iter().cloned()).collect();
    assert_eq!(first, big);
    assert_eq!(s.blocks_queued(), 0);
}

#[test]
fn blocks_while_connected_are_sent_at_once() {
    let t0 = Instant::now();
    let mut s = connected(t0);
    s.handle_input(Input::Blocks(vec![block(1), block(2)]), t0);
    assert_eq!(
        drain(&mut s),
        vec![Action::Send(AgentMessage::Blocks {
            events: vec![block(1), block(2)]
        })]
    );
}

#[test]
fn unsent_frames_are_dropped_when_the_transport_goes() {
    let t0 = Instant::now();
    let mut s = connected(t0);
    s.handle_input(
        Input::Frame(CoordinatorMessage::FullMap { map: map(2, &[2]) }),
        t0,
    );
    s.handle_input(
        Input::TransportDown {
            error: "reset".into(),
        },
        t0,
    );
    let a = drain(&mut s);
    assert!(sends(&a).is_empty(), "{a:?}");
    assert!(a.contains(&Action::ApplyMap(Arc::new(map(2, &[2])))));
}

#[test]
fn shutdown_closes_and_stops() {
    let t0 = Instant::now();
    let mut s = connected(t0);
    s.handle_input(Input::Blocks(vec![block(1)]), t0);
    s.shutdown();
    assert_eq!(
        drain(&mut s),
        vec![Action::Close, Action::State(SessionState::Stopped)]
    );
    assert_eq!(s.poll_timeout(), None);
    // While waiting for the reconnect timer there is no transport to close.
    let mut s = AgentSession::new(params(), t0);
    let _ = drain(&mut s);
    let _ = fail_and_delay(&mut s, t0);
    s.handle_input(
        Input::TransportDown {
            error: "again".into(),
        },
        t0,
    );
    let _ = drain(&mut s);
    s.shutdown();
    assert_eq!(drain(&mut s), vec![Action::State(SessionState::Stopped)]);
    s.handle_timeout(t0 + Duration::from_secs(60));
    assert_eq!(drain(&mut s), vec![]);
}

#[test]
fn pong_is_ignored() {
    let t0 = Instant::now();
    let mut s = connected(t0);
    s.handle_input(Input::Frame(CoordinatorMessage::Pong { nonce: 1 }), t0);
    assert_eq!(drain(&mut s), vec![]);
    assert!(matches!(s.state(), SessionState::Connected { .. }));
}

fn arb_frame() -> impl Strategy<Value = CoordinatorMessage> {
    prop_oneof![
        Just(CoordinatorMessage::Welcome {
            protocol: PROTOCOL_VERSION,
            host: host(),
            replicas: vec![],
        }),
        (0u64..6, proptest::collection::vec(2u8..6, 0..4))
            .prop_map(|(v, p)| CoordinatorMessage::FullMap { map: map(v, &p) }),
        (
            0u64..6,
            proptest::collection::vec(2u8..6, 0..3),
            proptest::collection::vec(2u8..6, 0..2)
        )
            .prop_map(|(v, up, rm)| CoordinatorMessage::Delta {
                delta: MapDelta {
                    from_version: v,
                    to_version: v + 1,
                    upserts: up.iter().map(|&k| peer(k, 1)).collect(),
                    removals: rm.iter().map(|&k| PublicKey([k; 32])).collect(),
                }
            }),
        any::<u64>().prop_map(|nonce| CoordinatorMessage::Pong { nonce }),
        Just(CoordinatorMessage::RotateKey {
            nonce: crate::rotation::Nonce([5; 32])
        }),
        (0u64..3000).prop_map(|ms| CoordinatorMessage::KeyAccepted {
            new_key: PublicKey([9; 32]),
            switch_after_ms: ms
        }),
        prop_oneof![
            Just(ErrorCode::AlreadyConnected),
            Just(ErrorCode::Internal),
            Just(ErrorCode::HostRemoved),
            Just(ErrorCode::UnknownHost),
        ]
        .prop_map(|code| CoordinatorMessage::Error {
            code,
            message: "m".into()
        }),
    ]
}

#[derive(Debug, Clone)]
enum Step {
    Input(Input),
    /// Advance time by this many milliseconds, then handle the timeout.
    Wait(u64),
    Shutdown,
}

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => Just(Step::Input(Input::TransportUp)),
        2 => Just(Step::Input(Input::TransportDown { error: "e".into() })),
        8 => arb_frame().prop_map(|f| Step::Input(Input::Frame(f))),
        1 => (1u16..4).prop_map(|p| Step::Input(Input::Endpoints(ep(p)))),
        1 => (0u16..150).prop_map(|n| Step::Input(Input::Blocks((0..n).map(block).collect()))),
        1 => (0u16..300, 0u16..40, 0u64..3).prop_map(|(r, p, o)| Step::Input(Input::Flows(batch(1, r, p, o)))),
        3 => (0u64..12_000).prop_map(Step::Wait),
        1 => (0u64..100).prop_map(|_| Step::Shutdown),
    ]
}

/// What the driver knows of the transport, to check the session's actions against.
#[derive(Default)]
struct Model {
    connect_pending: bool,
    up: bool,
    sent_since_up: usize,
    finished: bool,
}

impl Model {
    fn drain(&mut self, s: &mut AgentSession, now: Instant) -> Result<(), TestCaseError> {
        while let Some(a) = s.poll_action() {
            match a {
                Action::Connect(_) => {
                    prop_assert!(!self.finished, "connect after refusal or shutdown");
                    prop_assert!(!self.up && !self.connect_pending, "connect while connected");
                    self.connect_pending = true;
                }
                Action::Close => {
                    self.up = false;
                    self.connect_pending = false;
                }
                Action::Send(m) => {
                    prop_assert!(self.up, "send without a transport: {m:?}");
                    if self.sent_since_up == 0 {
                        prop_assert!(
                            matches!(m, AgentMessage::Resume { .. }),
                            "first frame {m:?}"
                        );
                    }
                    if let AgentMessage::Blocks { events } = &m {
                        prop_assert!(!events.is_empty() && events.len() <= MAX_BLOCKS_PER_MESSAGE);
                    }
                    if let AgentMessage::Flows {
                        records,
                        plaintext,
                        overflow,
                        ..
                    } = &m
                    {
                        let n = records.len() + plaintext.len();
                        prop_assert!(n <= MAX_FLOWS_PER_MESSAGE);
                        prop_assert!(n > 0 || *overflow > 0, "an empty Flows message");
                    }
                    self.sent_since_up += 1;
                }
                Action::State(SessionState::Refused { .. } | SessionState::Stopped) => {
                    self.finished = true
                }
                Action::State(_)
                | Action::ApplyMap(_)
                | Action::PrepareKey { .. }
                | Action::SwitchKey { .. }
                | Action::TrustRefused(_) => {}
            }
        }
        if let Some(t) = s.poll_timeout() {
            prop_assert!(!self.finished);
            prop_assert!(t <= now + CONNECT_TIMEOUT.max(HELLO_TIMEOUT).max(MAX_BACKOFF));
        }
        Ok(())
    }
}

proptest! {
    /// Random inputs never panic; frames go out only on a transport that is up (the first
    /// being `Resume`), never more than 64 block events in one, and a refused or stopped
    /// session never connects again.
    #[test]
    fn random_inputs_keep_the_rules(steps in proptest::collection::vec(arb_step(), 0..80)) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut s = AgentSession::new(params(), t0);
        let mut m = Model::default();
        m.drain(&mut s, now)?;
        for step in steps {
            match step {
                Step::Input(Input::TransportUp) => {
                    // The driver answers only a Connect it was given.
                    if !m.connect_pending { continue; }
                    m.connect_pending = false;
                    m.up = true;
                    m.sent_since_up = 0;
                    s.handle_input(Input::TransportUp, now);
                }
                Step::Input(Input::TransportDown { error }) => {
                    if !m.up && !m.connect_pending { continue; }
                    m.up = false;
                    m.connect_pending = false;
                    s.handle_input(Input::TransportDown { error }, now);
                }
                Step::Input(i @ Input::Frame(_)) => {
                    if !m.up { continue; }
                    s.handle_input(i, now);
                }
                Step::Input(i) => s.handle_input(i, now),
                Step::Wait(ms) => {
                    now += Duration::from_millis(ms);
                    s.handle_timeout(now);
                }
                Step::Shutdown => s.shutdown(),
            }
            m.drain(&mut s, now)?;
        }
    }
}

#[test]
fn flows_are_chunked_and_sent_only_once_established() {
    let t0 = Instant::now();
    let mut s = AgentSession::new(params(), t0);
    let _ = drain(&mut s);
    s.queue_flows(batch(10, 300, 20, 7));
    s.handle_input(Input::Flows(batch(20, 1, 0, 0)), t0);
    s.queue_flows(FlowBatch::default());
    assert_eq!(s.flows_queued(), 2, "an empty batch is not queued");
    // Transport up, no welcome yet: only the Resume.
    s.handle_input(Input::TransportUp, t0);
    let a = sends(&drain(&mut s));
    assert_eq!(flow_msgs(&a), vec![]);
    s.handle_input(welcome(), t0);
    // Blocks queued meanwhile go first.
    s.handle_input(Input::Blocks(vec![block(1)]), t0);
    let msgs = sends(&drain(&mut s));
    assert!(matches!(msgs[0], AgentMessage::Blocks { .. }), "{msgs:?}");
    let m = MAX_FLOWS_PER_MESSAGE;
    assert_eq!(
        flow_msgs(&msgs),
        vec![
            (10, m, 0, 7),
            (10, m, 0, 0),
            (10, 300 - 2 * m, 20, 0),
            (20, 1, 0, 0)
        ]
    );
    let sent: Vec<FlowRecord> = msgs
        .iter()
        .filter_map(|m| match m {
            AgentMessage::Flows {
                interval_start: 10,
                records,
                ..
            } => Some(records.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(
        sent,
        batch(10, 300, 0, 0).records,
        "every record once, in order"
    );
    assert_eq!(s.flows_queued(), 0);
    // Connected: a new interval goes out at once; an overflow-only one too.
    s.queue_flows(batch(30, 0, 0, 5));
    assert_eq!(flow_msgs(&sends(&drain(&mut s))), vec![(30, 0, 0, 5)]);
}

#[test]
fn flows_keep_the_newest_intervals_while_down() {
    let t0 = Instant::now();
    let mut s = AgentSession::new(params(), t0);
    let _ = drain(&mut s);
    let _ = fail_and_delay(&mut s, t0);
    for i in 0..FLOW_INTERVALS_QUEUED as u64 + 3 {
        s.queue_flows(batch(i * 10, 1, 0, 0));
    }
    assert_eq!(s.flows_queued(), FLOW_INTERVALS_QUEUED);
    assert_eq!(s.flows_dropped(), 3);
    s.handle_input(Input::TransportUp, t0);
    s.handle_input(welcome(), t0);
    let starts: Vec<u64> = flow_msgs(&sends(&drain(&mut s)))
        .iter()
        .map(|m| m.0)
        .collect();
    let want: Vec<u64> = (3..FLOW_INTERVALS_QUEUED as u64 + 3)
        .map(|i| i * 10)
        .collect();
    assert_eq!(starts, want, "the oldest were dropped");
}

#[test]
fn flows_left_when_the_transport_goes_are_sent_after_the_next_welcome() {
    let t0 = Instant::now();
    let mut s = AgentSession::new(params(), t0);
    let _ = drain(&mut s);
    s.queue_flows(batch(10, 2, 0, 0));
    s.handle_input(Input::TransportUp, t0);
    // The transport fails before the welcome: the interval stays queued.
    s.handle_input(
        Input::TransportDown {
            error: "reset".into(),
        },
        t0,
    );
    let _ = drain(&mut s);
    assert_eq!(s.flows_queued(), 1);
    let at = s.poll_timeout().unwrap();
    s.handle_timeout(at);
    let _ = drain(&mut s);
    s.handle_input(Input::TransportUp, at);
    s.handle_input(welcome(), at);
    assert_eq!(flow_msgs(&sends(&drain(&mut s))), vec![(10, 2, 0, 0)]);
    // Refused or stopped: nothing is kept.
    s.shutdown();
    s.queue_flows(batch(20, 1, 0, 0));
    assert_eq!((s.flows_queued(), s.flows_dropped()), (0, 1));
}

/// Key rotation: `RotateKey` asks the driver for a key, the prepared key is proposed,
/// `KeyAccepted` switches after the delay it gives — switch, close, reconnect at once — and
/// a connection lost before the switch forgets it.
#[test]
fn key_rotation_prepare_propose_switch_reconnect() {
    use crate::rotation::{Nonce, Proof};
    let t0 = Instant::now();
    let mut s = connected(t0);
    let nonce = Nonce([3; 32]);
    s.handle_input(Input::Frame(CoordinatorMessage::RotateKey { nonce }), t0);
    assert_eq!(drain(&mut s), vec![Action::PrepareKey { nonce }]);
    let new_key = PublicKey([8; 32]);
    let proof = Proof([4; 32]);
    let succession = crate::signed::Sig([5; 64]);
    s.handle_input(
        Input::KeyPrepared {
            nonce,
            new_key,
            proof,
            succession,
        },
        t0,
    );
    assert_eq!(
        sends(&drain(&mut s)),
        vec![AgentMessage::KeyProposal {
            nonce,
            new_key,
            proof,
            succession: Some(succession),
        }]
    );
    s.handle_input(
        Input::Frame(CoordinatorMessage::KeyAccepted {
            new_key,
            switch_after_ms: 1500,
        }),
        t0,
    );
    assert!(drain(&mut s).is_empty());
    let at = s.poll_timeout().expect("a switch deadline");
    assert_eq!(at - t0, Duration::from_millis(1500));
    s.handle_timeout(t0 + Duration::from_millis(1499));
    assert!(drain(&mut s).is_empty(), "not before the deadline");
    s.handle_timeout(at);
    let a = drain(&mut s);
    assert_eq!(a[0], Action::SwitchKey { new_key });
    assert_eq!(a[1], Action::Close);
    // Reconnects at once (no backoff: nothing failed).
    assert_eq!(s.poll_timeout(), Some(at));
    s.handle_timeout(at);
    assert_eq!(drain(&mut s), vec![Action::Connect(A)]);

    // A lost connection before the switch: no switch later.
    let mut s = connected(t0);
    s.handle_input(
        Input::Frame(CoordinatorMessage::KeyAccepted {
            new_key,
            switch_after_ms: 10,
        }),
        t0,
    );
    let _ = fail_and_delay(&mut s, t0);
    s.handle_input(Input::TransportUp, t0);
    s.handle_input(welcome(), t0);
    let _ = drain(&mut s);
    s.handle_timeout(t0 + Duration::from_secs(5));
    assert!(!drain(&mut s)
        .iter()
        .any(|a| matches!(a, Action::SwitchKey { .. })));
    // A prepared key while not connected is not proposed.
    let mut s = AgentSession::new(params(), t0);
    let _ = drain(&mut s);
    s.handle_input(
        Input::KeyPrepared {
            nonce,
            new_key,
            proof,
            succession,
        },
        t0,
    );
    assert!(sends(&drain(&mut s)).is_empty());
}

// ---- Fail-over between coordinator replicas -------------------------------------------

fn replicated(fallbacks: &[SocketAddr], seed: u64) -> SessionParams {
    SessionParams {
        fallbacks: fallbacks.to_vec(),
        jitter_seed: seed,
        ..params()
    }
}

/// Fails the attempt in progress (connect or connection) at `now`; returns the address of
/// the next `Connect` and how long the session waited before it.
fn fail_next(s: &mut AgentSession, now: Instant) -> (SocketAddr, Duration) {
    s.handle_input(
        Input::TransportDown {
            error: "gone".into(),
        },
        now,
    );
    let a = drain(s);
    assert!(a.iter().all(|a| !matches!(a, Action::ApplyMap(_))), "{a:?}");
    let at = s.poll_timeout().unwrap();
    s.handle_timeout(at);
    let a = drain(s);
    let [Action::Connect(to)] = a[..] else {
        panic!("{a:?}")
    };
    (to, at - now)
}

fn welcome_with(replicas: &[SocketAddr]) -> Input {
    Input::Frame(CoordinatorMessage::Welcome {
        protocol: PROTOCOL_VERSION,
        host: host(),
        replicas: replicas.to_vec(),
    })
}

/// Comes up on the address being tried and takes the `Welcome`.
fn up(s: &mut AgentSession, now: Instant, replicas: &[SocketAddr]) {
    s.handle_input(Input::TransportUp, now);
    s.handle_input(welcome_with(replicas), now);
    let _ = drain(s);
    assert!(matches!(s.state(), SessionState::Connected { .. }));
}

#[test]
fn failover_rotates_through_every_address_in_order() {
    let t0 = Instant::now();
    let mut s = AgentSession::new(replicated(&[B, C, B, A], 3), t0);
    // Duplicates are left out; the first address is tried first.
    assert_eq!(s.coordinators(), &[A, B, C]);
    assert_eq!(drain(&mut s), vec![Action::Connect(A)]);
    let mut now = t0;
    let mut order = vec![A];
    for _ in 0..8 {
        let (to, d) = fail_next(&mut s, now);
        order.push(to);
        now += d;
    }
    assert_eq!(order, vec![A, B, C, A, B, C, A, B, C]);
    assert_eq!(s.coordinator(), C);
}

#[test]
fn failover_backs_off_per_round_with_bounded_jitter() {
    for seed in 1..20 {
        let t0 = Instant::now();
        let mut s = AgentSession::new(replicated(&[B, C], seed), t0);
        let _ = drain(&mut s);
        let mut now = t0;
        for round in 1..=10u32 {
            // Within a round: the short step pause, 50–100 % of it.
            for _ in 0..2 {
                let (_, d) = fail_next(&mut s, now);
                assert!(d >= STEP_PAUSE / 2 && d <= STEP_PAUSE, "step {d:?}");
                now += d;
            }
            // The round's last address failed: one step of the exponential backoff.
            let (to, d) = fail_next(&mut s, now);
            assert_eq!(to, A, "every round starts at the first address");
            let full = (BASE_BACKOFF * (1 << (round - 1).min(10))).min(MAX_BACKOFF);
            assert!(
                d <= full && d >= full / 2,
                "round {round}: {d:?} of {full:?}"
            );
            now += d;
        }
        // The state counts attempts, not rounds.
        assert!(matches!(
            s.state(),
            SessionState::Connecting { attempt: 30, .. }
        ));
    }
}

#[test]
fn one_address_backs_off_as_before() {
    // A lone coordinator: every failure is a whole round.
    let t0 = Instant::now();
    let mut s = AgentSession::new(params(), t0);
    let _ = drain(&mut s);
    let mut now = t0;
    for attempt in 1..=6u32 {
        let (to, d) = fail_next(&mut s, now);
        assert_eq!(to, A);
        let full = (BASE_BACKOFF * (1 << (attempt - 1))).min(MAX_BACKOFF);
        assert!(d <= full && d >= full / 2, "{attempt}: {d:?}");
        now += d;
    }
}

#[test]
fn failover_prefers_the_address_that_worked_last() {
    let t0 = Instant::now();
    let mut s = AgentSession::new(replicated(&[B, C], 5), t0);
    let _ = drain(&mut s);
    // A is down: B next, and B works.
    let (to, d) = fail_next(&mut s, t0);
    assert_eq!(to, B);
    let mut now = t0 + d;
    up(&mut s, now, &[]);
    assert_eq!(s.coordinators(), &[B, A, C], "the one that worked is first");
    // B goes away: the next one (A) at once, then C, then a new round from B.
    let mut order = Vec::new();
    for _ in 0..3 {
        let (to, d) = fail_next(&mut s, now);
        order.push(to);
        now += d;
    }
    assert_eq!(order, vec![A, C, B]);
    // And the backoff restarted after the success: the round ended with one short backoff.
    up(&mut s, now, &[]);
    let (to, d) = fail_next(&mut s, now);
    assert_eq!(to, A);
    assert!(d <= STEP_PAUSE, "{d:?}");
}

#[test]
fn welcome_replaces_the_list_and_keeps_the_address_in_use() {
    let t0 = Instant::now();
    let mut s = AgentSession::new(replicated(&[B], 5), t0);
    let _ = drain(&mut s);
    let d: SocketAddr = "[2001:db8::4]:7443".parse().unwrap();
    let wildcard: SocketAddr = "0.0.0.0:7443".parse().unwrap();
    // The coordinator names itself by another address and lists C and D, not B; a wildcard
    // or port 0 is left out.
    up(
        &mut s,
        t0,
        &[C, wildcard, d, "192.0.2.9:0".parse().unwrap(), C],
    );
    assert_eq!(s.coordinators(), &[A, C, d]);
    // A Welcome without a list (an older coordinator) keeps what the session knows.
    let (to, _) = fail_next(&mut s, t0);
    assert_eq!(to, C);
    up(&mut s, t0, &[]);
    assert_eq!(s.coordinators(), &[C, A, d]);
    // The list is bounded.
    let many: Vec<SocketAddr> = (1..100u16)
        .map(|p| SocketAddr::from(([192, 0, 2, 1], p)))
        .collect();
    let _ = fail_next(&mut s, t0);
    up(&mut s, t0, &many);
    assert_eq!(s.coordinators().len(), MAX_COORDINATORS);
}

#[test]
fn failover_keeps_the_map_until_the_next_coordinator_sends_one() {
    let t0 = Instant::now();
    let mut s = AgentSession::new(
        SessionParams {
            initial_map: Some(map(2, &[2])),
            ..replicated(&[B], 5)
        },
        t0,
    );
    let _ = drain(&mut s);
    up(&mut s, t0, &[A, B]);
    let _ = full_map(&mut s, map(3, &[2, 3]), t0);
    // A fails; so does B's first connect, and A again: the map stays, nothing is applied.
    let mut now = t0;
    for _ in 0..5 {
        let (_, d) = fail_next(&mut s, now);
        now += d;
        assert_eq!(s.map(), Some(&map(3, &[2, 3])));
    }
    // Connect timeouts and a Welcome timeout do not drop it either.
    for _ in 0..3 {
        let deadline = s.poll_timeout().unwrap();
        s.handle_timeout(deadline);
        let a = drain(&mut s);
        assert!(a.iter().all(|a| !matches!(a, Action::ApplyMap(_))), "{a:?}");
        let at = s.poll_timeout().unwrap();
        s.handle_timeout(at);
        let _ = drain(&mut s);
    }
    assert_eq!(s.map(), Some(&map(3, &[2, 3])));
    // The next coordinator resumes and sends its full map: that one is applied.
    let to = s.coordinator();
    s.handle_input(Input::TransportUp, now);
    let a = drain(&mut s);
    assert!(
        matches!(&a[..], [Action::Send(AgentMessage::Resume { .. })]),
        "{to} {a:?}"
    );
    s.handle_input(welcome_with(&[A, B]), now);
    let _ = drain(&mut s);
    assert_eq!(
        s.map(),
        Some(&map(3, &[2, 3])),
        "welcome alone changes nothing"
    );
    let a = full_map(&mut s, map(7, &[3]), now);
    assert_eq!(a[0], Action::ApplyMap(Arc::new(map(7, &[3]))));
}

/// A replica that has not followed this host's enrolment yet answers `unknown host`: the
/// session tries the other replicas, and stops only when every one has said so in a row.
/// With one address, `unknown host` stays final at once.
#[test]
fn unknown_host_from_one_replica_is_not_final_while_others_remain() {
    let t0 = Instant::now();
    let unknown = || {
        Input::Frame(CoordinatorMessage::Error {
            code: ErrorCode::UnknownHost,
            message: "unknown host".into(),
        })
    };
    let mut s = AgentSession::new(replicated(&[B], 7), t0);
    assert_eq!(drain(&mut s), vec![Action::Connect(A)]);
    s.handle_input(Input::TransportUp, t0);
    s.handle_input(unknown(), t0);
    let _ = drain(&mut s);
    assert!(
        matches!(s.state(), SessionState::Connecting { .. }),
        "{:?}",
        s.state()
    );
    let at = s.poll_timeout().unwrap();
    s.handle_timeout(at);
    assert_eq!(drain(&mut s), vec![Action::Connect(B)]);
    // B knows the host: connected.
    up(&mut s, at, &[]);
    // Later every replica says so (the host was removed): final.
    let (to, d) = fail_next(&mut s, at);
    assert_eq!(to, A);
    let now = at + d;
    s.handle_input(Input::TransportUp, now);
    s.handle_input(unknown(), now);
    let _ = drain(&mut s);
    let at = s.poll_timeout().unwrap();
    s.handle_timeout(at);
    assert_eq!(drain(&mut s), vec![Action::Connect(B)]);
    s.handle_input(Input::TransportUp, at);
    s.handle_input(unknown(), at);
    let _ = drain(&mut s);
    assert!(
        matches!(
            s.state(),
            SessionState::Refused {
                code: ErrorCode::UnknownHost,
                ..
            }
        ),
        "{:?}",
        s.state()
    );
    // One address: final at once, as before.
    let mut one = AgentSession::new(params(), t0);
    let _ = drain(&mut one);
    one.handle_input(Input::TransportUp, t0);
    one.handle_input(unknown(), t0);
    let _ = drain(&mut one);
    assert!(matches!(one.state(), SessionState::Refused { .. }));
}
