use super::*;
use crate::token::hash_secret;
use proptest::prelude::*;
use std::net::SocketAddr;

fn key(k: u8) -> PublicKey {
    PublicKey([k; 32])
}

fn st() -> CoordinatorState {
    CoordinatorState::new("100.64.0.0/24".parse().unwrap(), None).unwrap()
}

fn ep(port: u16) -> EndpointReport {
    EndpointReport {
        addrs: vec![SocketAddr::from(([192, 0, 2, 1], port))],
        listen_port: Some(51820),
    }
}

fn enrol(s: &mut CoordinatorState, k: u8, secret: &[u8]) -> Result<HostInfo, ErrorCode> {
    s.connect(
        100,
        key(k),
        ConnId(u64::from(k)),
        IpAddr::from([198, 51, 100, k]),
        Hello::Enrol {
            secret_hash: hash_secret(secret),
            name: format!("h{k}"),
            endpoints: ep(1),
        },
    )
}

#[test]
fn token_errors_are_distinct() {
    let mut s = st();
    s.create_token(
        0,
        TokenSpec {
            ttl_secs: Some(50),
            ..Default::default()
        },
        hash_secret(b"exp"),
    )
    .unwrap();
    let r = s
        .create_token(0, TokenSpec::default(), hash_secret(b"rev"))
        .unwrap();
    s.revoke_token(r.id).unwrap();
    s.create_token(
        0,
        TokenSpec {
            uses: Some(1),
            ..Default::default()
        },
        hash_secret(b"one"),
    )
    .unwrap();
    assert_eq!(
        enrol(&mut s, 1, b"nope").unwrap_err(),
        ErrorCode::TokenUnknown
    );
    assert_eq!(
        enrol(&mut s, 1, b"exp").unwrap_err(),
        ErrorCode::TokenExpired
    );
    assert_eq!(
        enrol(&mut s, 1, b"rev").unwrap_err(),
        ErrorCode::TokenRevoked
    );
    assert!(enrol(&mut s, 1, b"one").is_ok());
    assert_eq!(
        enrol(&mut s, 2, b"one").unwrap_err(),
        ErrorCode::TokenUsedUp
    );
    // The already-enrolled key re-enrolling does not need the token any more (Welcome lost).
    s.disconnect(101, HostId(1), ConnId(1));
    assert!(enrol(&mut s, 1, b"one").is_ok());
    assert_eq!(
        enrol(&mut s, 1, b"one").unwrap_err(),
        ErrorCode::AlreadyConnected
    );
}

#[test]
fn resume_errors() {
    let mut s = st();
    let hello = || Hello::Resume { endpoints: ep(1) };
    assert_eq!(
        s.connect(0, key(1), ConnId(1), [1, 1, 1, 1].into(), hello())
            .unwrap_err(),
        ErrorCode::UnknownHost
    );
    s.create_token(0, TokenSpec::default(), hash_secret(b"t"))
        .unwrap();
    enrol(&mut s, 1, b"t").unwrap();
    s.remove_host("h1").unwrap();
    let kicks = s.poll_kicks();
    assert_eq!(kicks.len(), 1);
    assert_eq!(kicks[0].code, ErrorCode::HostRemoved);
    assert_eq!(
        s.connect(0, key(1), ConnId(2), [1, 1, 1, 1].into(), hello())
            .unwrap_err(),
        ErrorCode::HostRemoved
    );
    // A removed key may enrol again with a token: new host, same address reused.
    let info = enrol(&mut s, 1, b"t").unwrap();
    assert_eq!(info.id, HostId(2));
    assert_eq!(info.addresses[0].to_string(), "100.64.0.2");
}

#[test]
fn labels_from_token_and_name_clash() {
    let mut s = st();
    let labels: Labels = [("app".to_string(), "db".to_string())].into();
    s.create_token(
        0,
        TokenSpec {
            labels,
            ..Default::default()
        },
        hash_secret(b"t"),
    )
    .unwrap();
    let a = enrol(&mut s, 1, b"t").unwrap();
    assert_eq!(a.labels.get("app").map(String::as_str), Some("db"));
    let b = s
        .connect(
            0,
            key(2),
            ConnId(2),
            [1, 1, 1, 1].into(),
            Hello::Enrol {
                secret_hash: hash_secret(b"t"),
                name: "h1".into(),
                endpoints: ep(1),
            },
        )
        .unwrap();
    assert_eq!(b.name, "h1-2");
    assert_eq!(
        s.rename("h1-2", "h1"),
        Err(AdminError::NameTaken("h1".into()))
    );
    assert!(s.rename("2", "web").is_ok());
    assert_eq!(s.find_host("web").unwrap().id, HostId(2));
}

#[test]
fn endpoint_change_pushes_one_peer_delta() {
    let mut s = st();
    s.create_token(0, TokenSpec::default(), hash_secret(b"t"))
        .unwrap();
    for k in 1..=3 {
        enrol(&mut s, k, b"t").unwrap();
    }
    let p = s.poll_pushes();
    assert_eq!(p.len(), 3);
    for push in &p {
        match &push.message {
            CoordinatorMessage::FullMap { map } => assert_eq!(map.peers.len(), 2),
            m => panic!("unexpected {m:?}"),
        }
    }
    let _ = s.take_dirty();
    s.report_endpoints(5, HostId(3), ConnId(3), ep(2));
    let p = s.poll_pushes();
    assert_eq!(p.len(), 2, "only the two peers of host 3");
    for push in &p {
        let CoordinatorMessage::Delta { delta } = &push.message else {
            panic!()
        };
        assert_eq!(delta.upserts.len(), 1);
        assert_eq!(delta.upserts[0].public_key, key(3));
        assert!(delta.upserts[0]
            .endpoints
            .contains(&SocketAddr::from(([192, 0, 2, 1], 2))));
    }
    let d = s.take_dirty();
    assert_eq!(d.hosts.len(), 1);
    assert_eq!(d.map_version, Some(2));
    // A report that changes nothing pushes nothing.
    s.report_endpoints(6, HostId(3), ConnId(3), ep(2));
    assert!(s.poll_pushes().is_empty());
}

#[test]
fn restore_keeps_everything() {
    let mut s = st();
    s.create_token(
        0,
        TokenSpec {
            uses: Some(5),
            ..Default::default()
        },
        hash_secret(b"t"),
    )
    .unwrap();
    for k in 1..=3 {
        enrol(&mut s, k, b"t").unwrap();
    }
    s.remove_host("h2").unwrap();
    let _ = s.poll_pushes();
    let hosts: Vec<Host> = s.hosts().cloned().collect();
    let tokens: Vec<Token> = s.tokens().cloned().collect();
    let mut r = CoordinatorState::restore(
        IpPool::new("100.64.0.0/24".parse().unwrap(), None).unwrap(),
        hosts.clone(),
        tokens.clone(),
        s.map_version(),
    )
    .unwrap();
    assert_eq!(r.hosts().cloned().collect::<Vec<_>>(), hosts);
    assert_eq!(r.tokens().next().unwrap().uses_left, Some(2));
    // Next enrol gets a fresh id and reuses the freed address.
    let info = enrol(&mut r, 9, b"t").unwrap();
    assert_eq!(info.id, HostId(4));
    assert_eq!(info.addresses[0].to_string(), "100.64.0.3");
}

#[derive(Debug, Clone)]
enum Op {
    Enrol(u8),
    Resume(u8),
    Disconnect(u8),
    Report(u8, u16),
    Observed(u8, u8),
    Label(u8, bool),
    Rename(u8, u8),
    Remove(u8),
    Resync(u8),
    Poll,
}

fn op() -> impl Strategy<Value = Op> {
    let k = 1u8..7;
    prop_oneof![
        k.clone().prop_map(Op::Enrol),
        k.clone().prop_map(Op::Resume),
        k.clone().prop_map(Op::Disconnect),
        (k.clone(), 1u16..4).prop_map(|(k, p)| Op::Report(k, p)),
        (k.clone(), 1u8..4).prop_map(|(k, p)| Op::Observed(k, p)),
        (k.clone(), any::<bool>()).prop_map(|(k, b)| Op::Label(k, b)),
        (k.clone(), 1u8..4).prop_map(|(k, n)| Op::Rename(k, n)),
        k.clone().prop_map(Op::Remove),
        k.prop_map(Op::Resync),
        Just(Op::Poll),
        Just(Op::Poll),
    ]
}

proptest! {
    /// Agents that apply every full map and delta they are sent always hold exactly the map
    /// the coordinator would compute from scratch.
    #[test]
    fn deltas_track_full_maps(ops in proptest::collection::vec(op(), 1..80)) {
        let mut s = st();
        s.create_token(0, TokenSpec::default(), hash_secret(b"t")).unwrap();
        let mut agents: HashMap<HostId, (ConnId, Option<NetworkMap>)> = HashMap::new();
        let mut next_conn = 0u64;
        let id_of = |s: &CoordinatorState, k: u8| s.host_by_key(&key(k)).map(|h| h.id);
        for (now, op) in ops.into_iter().enumerate() {
            let now = now as u64;
            let conn_of = |agents: &HashMap<HostId, (ConnId, Option<NetworkMap>)>, id: Option<HostId>| {
                id.and_then(|i| agents.get(&i).map(|a| (i, a.0)))
            };
            match op {
                Op::Enrol(k) | Op::Resume(k) => {
                    next_conn += 1;
                    let hello = if matches!(op, Op::Enrol(_)) {
                        Hello::Enrol { secret_hash: hash_secret(b"t"), name: format!("n{k}"), endpoints: ep(1) }
                    } else {
                        Hello::Resume { endpoints: ep(1) }
                    };
                    if let Ok(info) = s.connect(now, key(k), ConnId(next_conn), [10, 0, 0, k].into(), hello) {
                        prop_assert!(!agents.contains_key(&info.id));
                        agents.insert(info.id, (ConnId(next_conn), None));
                    }
                }
                Op::Disconnect(k) => if let Some((i, c)) = conn_of(&agents, id_of(&s, k)) {
                    s.disconnect(now, i, c);
                    agents.remove(&i);
                },
                Op::Report(k, p) => if let Some((i, c)) = conn_of(&agents, id_of(&s, k)) {
                    s.report_endpoints(now, i, c, ep(p));
                },
                Op::Observed(k, o) => if let Some((i, c)) = conn_of(&agents, id_of(&s, k)) {
                    s.observed_changed(now, i, c, [203, 0, 113, o].into());
                },
                Op::Label(k, add) => {
                    let name = format!("n{k}");
                    if add {
                        let _ = s.set_labels(&name, [("role".into(), format!("r{k}"))].into());
                    } else {
                        let _ = s.remove_labels(&name, &["role".into()]);
                    }
                }
                Op::Rename(k, n) => { let _ = s.rename(&format!("n{k}"), &format!("x{n}")); }
                Op::Remove(k) => if let Some(i) = id_of(&s, k) {
                    let name = s.host(i).unwrap().name.clone();
                    s.remove_host(&name).unwrap();
                    for kick in s.poll_kicks() {
                        agents.remove(&kick.host);
                    }
                },
                Op::Resync(k) => if let Some((i, c)) = conn_of(&agents, id_of(&s, k)) {
                    s.resync(i, c);
                    if let Some(a) = agents.get_mut(&i) { a.1 = None; }
                },
                Op::Poll => {
                    for p in s.poll_pushes() {
                        let a = agents.get_mut(&p.host).expect("push to a connected agent");
                        prop_assert_eq!(a.0, p.conn);
                        match p.message {
                            CoordinatorMessage::FullMap { map } => a.1 = Some(map),
                            CoordinatorMessage::Delta { delta } => {
                                let m = a.1.as_mut().expect("delta before full map");
                                prop_assert!(delta.to_version > m.version);
                                m.apply(&delta).unwrap();
                            }
                            other => prop_assert!(false, "unexpected {:?}", other),
                        }
                    }
                    let _ = s.take_dirty();
                    for (id, (_, m)) in &agents {
                        let m = m.as_ref().expect("every agent has a map after a poll");
                        let fresh = s.full_map_for(*id, m.version);
                        prop_assert_eq!(m, &fresh);
                        let me = s.host(*id).unwrap().public_key;
                        prop_assert!(m.peer(&me).is_none());
                    }
                }
            }
        }
    }
}
