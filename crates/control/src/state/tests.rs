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

const ALLOW_ALL: &str = "rules:\n  - {name: all, from: {}, to: {}, ports: [any]}\n";

fn allow_all(s: &mut CoordinatorState) {
    s.apply_policy(0, ALLOW_ALL, "test").unwrap();
}

fn ep(port: u16) -> EndpointReport {
    EndpointReport {
        addrs: vec![SocketAddr::from(([192, 0, 2, 1], port))],
        listen_port: Some(51820),
        transparent: false,
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
    allow_all(&mut s);
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
    Quarantine(u8, bool),
    Revoke(u8),
    Policy(usize),
    Poll,
}

/// Policies the property test switches between: deny all, allow all, label- and name-based.
const POLICIES: [&str; 3] = [
    "",
    ALLOW_ALL,
    "rules:
  - {name: ssh, from: {role: {exists: true}}, to: {}, ports: [tcp/22]}
  - {name: dns, from: n1, to: {role: {in: [r2, r3]}}, ports: [udp/53, icmp]}
  - {name: x, from: {role: {'!=': r4}}, to: x1, ports: [tcp/1-9]}
",
];

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
        k.clone().prop_map(Op::Resync),
        (k.clone(), any::<bool>()).prop_map(|(k, q)| Op::Quarantine(k, q)),
        k.prop_map(Op::Revoke),
        (0..POLICIES.len()).prop_map(Op::Policy),
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
        s.apply_policy(0, POLICIES[2], "test").unwrap();
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
                Op::Quarantine(k, q) => {
                    let name = format!("n{k}");
                    let _ = if q { s.quarantine(&name) } else { s.release(&name) };
                }
                Op::Revoke(k) => if let Some(i) = id_of(&s, k) {
                    let name = s.host(i).unwrap().name.clone();
                    s.revoke_host(&name).unwrap();
                    for kick in s.poll_kicks() {
                        prop_assert_eq!(kick.code, ErrorCode::HostRevoked);
                        agents.remove(&kick.host);
                    }
                },
                Op::Policy(i) => { s.apply_policy(now, POLICIES[i], "test").unwrap(); }
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
                        let me = s.host(*id).unwrap();
                        prop_assert!(m.peer(&me.public_key).is_none());
                        if me.quarantined {
                            prop_assert!(m.peers.is_empty());
                        }
                        let grants = s.grants_for(*id);
                        prop_assert_eq!(m.peers.len(), grants.len());
                        for p in &m.peers {
                            let h = s.host_by_key(&p.public_key).unwrap();
                            prop_assert!(!h.quarantined && !h.removed);
                            prop_assert_eq!(Some(&p.grants), grants.get(&h.id.0));
                            prop_assert!(!p.grants.is_empty());
                        }
                    }
                }
            }
        }
    }
}

const POLICY: &str = "\
rules:
  - name: app-to-db
    from: { app: app }
    to:   { app: db }
    ports: [tcp/5432]
tests:
  - { from: { app: app }, to: { app: db }, port: tcp/5432, expect: allow }
  - { from: { app: db }, to: { app: app }, port: tcp/5432, expect: deny }
";

/// Three connected hosts: h1 app=app, h2 app=db, h3 app=web; maps drained.
fn three() -> CoordinatorState {
    let mut s = st();
    s.create_token(0, TokenSpec::default(), hash_secret(b"t"))
        .unwrap();
    for k in 1..=3 {
        enrol(&mut s, k, b"t").unwrap();
    }
    for (h, app) in [("h1", "app"), ("h2", "db"), ("h3", "web")] {
        s.set_labels(h, [("app".into(), app.into())].into())
            .unwrap();
    }
    s
}

fn maps(s: &mut CoordinatorState) -> BTreeMap<HostId, CoordinatorMessage> {
    let out = s
        .poll_pushes()
        .into_iter()
        .map(|p| (p.host, p.message))
        .collect();
    let _ = s.take_dirty();
    out
}

fn peer_names(s: &CoordinatorState, id: u64) -> Vec<String> {
    let m = s.full_map_for(HostId(id), 0);
    let mut v: Vec<String> = m.peers.iter().map(|p| p.name.clone()).collect();
    v.sort();
    v
}

#[test]
fn default_deny_then_policy_then_label_change() {
    let mut s = three();
    // No policy: every map is empty.
    for (_, m) in maps(&mut s) {
        let CoordinatorMessage::FullMap { map } = m else {
            panic!()
        };
        assert!(map.peers.is_empty());
    }
    assert!(s.policy().is_none());
    let (rec, tests) = s.apply_policy(10, POLICY, "apply").unwrap();
    assert_eq!(rec.version, 1);
    assert!(tests.iter().all(|t| t.passed()));
    let pushed = maps(&mut s);
    assert_eq!(pushed.len(), 2, "web gets nothing");
    let CoordinatorMessage::Delta { delta } = &pushed[&HostId(1)] else {
        panic!()
    };
    assert_eq!(delta.upserts.len(), 1);
    let g = &delta.upserts[0].grants;
    assert_eq!(delta.upserts[0].name, "h2");
    assert_eq!(g.outbound.len(), 1);
    assert!(g.inbound.is_empty());
    assert!(g
        .find(meshd_policy::Direction::Outbound, 6, 5432, 10)
        .is_some());
    let CoordinatorMessage::Delta { delta } = &pushed[&HostId(2)] else {
        panic!()
    };
    assert_eq!(delta.upserts[0].grants.inbound[0].rule, "app-to-db");
    assert_eq!(s.take_dirty().policy, None, "already taken");
    // web becomes an app: it and db get a delta; h1 does not.
    s.set_labels("h3", [("app".into(), "app".into())].into())
        .unwrap();
    let pushed = maps(&mut s);
    assert_eq!(
        pushed.keys().copied().collect::<Vec<_>>(),
        vec![HostId(2), HostId(3)]
    );
    assert_eq!(peer_names(&s, 2), vec!["h1", "h3"]);
    // explain
    let e = s.explain(10, "h3", "h2", "tcp/5432").unwrap();
    assert!(e.allowed);
    assert_eq!(e.rule.as_deref(), Some("app-to-db"));
    assert!(!s.explain(10, "h2", "h3", "tcp/5432").unwrap().allowed);
    assert!(matches!(
        s.explain(10, "h2", "h3", "tcp/1-2"),
        Err(AdminError::Port(_))
    ));
    assert!(matches!(
        s.explain(10, "nope", "h3", "tcp/1"),
        Err(AdminError::NoSuchHost(_))
    ));
}

#[test]
fn apply_refused_check_diff_history_rollback() {
    let mut s = three();
    let _ = maps(&mut s);
    // Does not parse: line and column.
    let Err(PolicyError::Parse(e)) = s.apply_policy(1, "rules:\n  - name: a\n    frm: {}\n", "")
    else {
        panic!()
    };
    assert_eq!(e.line, 3);
    // Tests fail (a host-name test resolved against the inventory).
    let bad = format!("{POLICY}  - {{ from: h3, to: h2, port: tcp/5432, expect: allow }}\n");
    let Err(PolicyError::TestsFailed(t)) = s.apply_policy(1, &bad, "") else {
        panic!()
    };
    assert_eq!(t.iter().filter(|t| !t.passed()).count(), 1);
    let unknown = format!("{POLICY}  - {{ from: ghost, to: h2, port: tcp/5432, expect: deny }}\n");
    assert!(matches!(
        s.apply_policy(1, &unknown, ""),
        Err(PolicyError::TestsFailed(_))
    ));
    assert!(s.policy().is_none());
    assert!(s.take_dirty().policy.is_none());
    assert!(maps(&mut s).is_empty(), "nothing changed");
    // check reports without applying.
    let checked = s.check_policy(1, &bad).unwrap();
    assert_eq!(checked.len(), 3);
    assert!(!checked[2].passed());
    // diff against the (empty) current policy.
    let d = s.diff_policy(1, POLICY).unwrap();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].to_string(), "+ h1 -> h2 tcp/5432");
    // Apply, apply allow-all, roll back to 1.
    s.apply_policy(2, POLICY, "apply").unwrap();
    assert_eq!(s.take_dirty().policy.unwrap().version, 1);
    s.apply_policy(3, ALLOW_ALL, "apply").unwrap();
    let _ = maps(&mut s);
    assert_eq!(peer_names(&s, 3), vec!["h1", "h2"]);
    let rec = s.rollback_policy(4, 1).unwrap();
    assert_eq!((rec.version, rec.comment.as_str()), (3, "rollback to 1"));
    assert_eq!(rec.yaml, POLICY);
    assert_eq!(s.take_dirty().policy, Some(rec));
    assert!(peer_names(&s, 3).is_empty());
    assert_eq!(s.policy_history().len(), 3);
    assert_eq!(
        s.rollback_policy(5, 9).unwrap_err(),
        PolicyError::NoSuchVersion(9)
    );
    // Restore: the last version is current.
    let hosts: Vec<Host> = s.hosts().cloned().collect();
    let mut r = CoordinatorState::restore(
        IpPool::new("100.64.0.0/24".parse().unwrap(), None).unwrap(),
        hosts,
        vec![],
        s.map_version(),
    )
    .unwrap();
    r.restore_policies(5, s.policy_history().to_vec()).unwrap();
    assert_eq!(r.policy().unwrap().version, 3);
    assert_eq!(peer_names(&r, 1), vec!["h2"]);
}

#[test]
fn quarantine_and_release() {
    let mut s = three();
    allow_all(&mut s);
    let _ = maps(&mut s);
    let h = s.quarantine("h1").unwrap();
    assert!(h.quarantined);
    // Persisted as a host change.
    assert!(s.take_dirty().hosts.iter().any(|h| h.quarantined));
    let pushed = maps(&mut s);
    assert_eq!(pushed.len(), 3, "everyone hears at once");
    let CoordinatorMessage::Delta { delta } = &pushed[&HostId(1)] else {
        panic!()
    };
    assert_eq!(delta.removals.len(), 2);
    let CoordinatorMessage::Delta { delta } = &pushed[&HostId(2)] else {
        panic!()
    };
    assert_eq!(delta.removals, vec![key(1)]);
    assert!(!s.explain(0, "h1", "h2", "icmp").unwrap().allowed);
    // A policy change keeps it out.
    s.apply_policy(1, ALLOW_ALL, "again").unwrap();
    assert!(peer_names(&s, 1).is_empty());
    assert_eq!(peer_names(&s, 2), vec!["h3"]);
    s.release("h1").unwrap();
    let pushed = maps(&mut s);
    assert_eq!(pushed.len(), 3);
    assert_eq!(peer_names(&s, 1), vec!["h2", "h3"]);
    // Idempotent.
    s.release("h1").unwrap();
    assert!(maps(&mut s).is_empty());
}

#[test]
fn revoked_key_is_refused_for_good() {
    let mut s = three();
    allow_all(&mut s);
    let _ = maps(&mut s);
    let h = s.revoke_host("h2").unwrap();
    assert!(h.revoked && h.removed);
    assert!(s.take_dirty().hosts.iter().any(|h| h.revoked));
    let kicks = s.poll_kicks();
    assert_eq!(kicks.len(), 1);
    assert_eq!(kicks[0].code, ErrorCode::HostRevoked);
    let pushed = maps(&mut s);
    assert_eq!(pushed.len(), 2);
    assert_eq!(peer_names(&s, 1), vec!["h3"]);
    // Neither resume nor a fresh enrolment with a valid token gets in.
    assert_eq!(enrol(&mut s, 2, b"t").unwrap_err(), ErrorCode::HostRevoked);
    assert_eq!(
        s.connect(
            0,
            key(2),
            ConnId(9),
            [1, 1, 1, 1].into(),
            Hello::Resume { endpoints: ep(1) }
        )
        .unwrap_err(),
        ErrorCode::HostRevoked
    );
    // Survives a restart.
    let hosts: Vec<Host> = s.hosts().cloned().collect();
    let tokens: Vec<Token> = s.tokens().cloned().collect();
    let mut r = CoordinatorState::restore(
        IpPool::new("100.64.0.0/24".parse().unwrap(), None).unwrap(),
        hosts,
        tokens,
        0,
    )
    .unwrap();
    assert_eq!(enrol(&mut r, 2, b"t").unwrap_err(), ErrorCode::HostRevoked);
}

fn block(at: u64, peer: &str) -> BlockEvent {
    BlockEvent {
        at,
        host: "spoofed".into(),
        host_labels: Default::default(),
        peer: peer.into(),
        peer_labels: Default::default(),
        direction: meshd_policy::Direction::Inbound,
        proto: 6,
        src: "100.64.0.2:40000".parse().unwrap(),
        dst: "100.64.0.1:22".parse().unwrap(),
        reason: meshd_policy::DenyReason::DefaultDeny,
        count: 3,
    }
}

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
fn expired_rules_leave_the_maps() {
    let mut s = three();
    let yaml = "rules:\n  - {name: tmp, from: {app: app}, to: {app: db}, ports: [icmp], expires: 1970-01-01T00:01:40Z}\n";
    s.apply_policy(10, yaml, "apply").unwrap();
    let _ = maps(&mut s);
    let g = &s.full_map_for(HostId(1), 0).peers[0].grants;
    assert_eq!(
        g.outbound[0].expires_at,
        Some(100),
        "agents enforce it themselves"
    );
    assert_eq!(s.policy_timeout(), Some(100));
    s.handle_policy_timeout(99);
    assert!(maps(&mut s).is_empty());
    s.handle_policy_timeout(100);
    assert_eq!(maps(&mut s).len(), 2, "both ends lose the peer");
    assert!(peer_names(&s, 1).is_empty());
    assert_eq!(s.policy_timeout(), None);
}

fn enrol_named(s: &mut CoordinatorState, k: u8, name: &str) -> Result<HostInfo, ErrorCode> {
    s.connect(
        0,
        key(k),
        ConnId(u64::from(k)),
        [1, 1, 1, k].into(),
        Hello::Enrol {
            secret_hash: hash_secret(b"t"),
            name: name.into(),
            endpoints: ep(1),
        },
    )
}

#[test]
fn a_rename_on_enrol_is_a_notice() {
    let mut s = st();
    s.create_token(0, TokenSpec::default(), hash_secret(b"t"))
        .unwrap();
    enrol_named(&mut s, 1, "a").unwrap();
    assert_eq!(s.poll_notices(), vec![], "a free name is no news");
    let b = enrol_named(&mut s, 2, "a").unwrap();
    assert_eq!(b.name, "a-2");
    let n = s.poll_notices();
    assert_eq!(
        n,
        vec![Notice::HostRenamedOnEnrol {
            id: HostId(2),
            requested: "a".into(),
            assigned: "a-2".into(),
        }]
    );
    assert_eq!(n[0].kind(), "host_renamed_on_enrol");
    assert_eq!(
        n[0].to_string(),
        "requested name a taken; enrolled as a-2 (2)"
    );
    assert_eq!(s.poll_notices(), vec![], "drained");

    // The suffixed name is taken too (an operator named a host so): another one is found.
    s.rename("a-2", "b").unwrap();
    s.rename("a", "a-3").unwrap();
    enrol_named(&mut s, 9, "a-3").unwrap();
    let c = enrol_named(&mut s, 3, "a-3").unwrap();
    assert!(s.find_host("a-3").is_ok());
    assert_ne!(c.name, "a-3");
    assert_eq!(
        s.hosts().filter(|h| h.name == c.name).count(),
        1,
        "{c:?}: names stay unique"
    );

    // A long name stays a valid name with its suffix.
    let long = "x".repeat(63);
    enrol_named(&mut s, 4, &long).unwrap();
    let d = enrol_named(&mut s, 5, &long).unwrap();
    validate_name(&d.name).unwrap();
    assert!(d.name.ends_with("-6"), "{}", d.name);
}

#[test]
fn pool_exhaustion_is_refused_and_a_notice() {
    // A /30 has one allocatable address (network, .1, broadcast are kept).
    let mut s = CoordinatorState::new("100.64.0.0/30".parse().unwrap(), None).unwrap();
    s.create_token(0, TokenSpec::default(), hash_secret(b"t"))
        .unwrap();
    enrol_named(&mut s, 1, "a").unwrap();
    let _ = s.poll_notices();
    let _ = s.take_dirty();
    assert_eq!(
        enrol_named(&mut s, 2, "b").unwrap_err(),
        ErrorCode::PoolExhausted
    );
    let n = s.poll_notices();
    assert_eq!(n.len(), 1, "{n:?}");
    assert_eq!(n[0].kind(), "pool_exhausted");
    assert_eq!(
        n[0].to_string(),
        "address pool 100.64.0.0/30 exhausted (1 addresses in use); refused to enrol b"
    );
    // Nothing changed: the token's use is not spent, no host added.
    let d = s.take_dirty();
    assert!(d.hosts.is_empty() && d.tokens.is_empty(), "{d:?}");
    assert_eq!(s.hosts().count(), 1);
}

#[test]
fn admin_inputs_are_bounded_before_they_reach_the_store() {
    let mut s = st();
    let spec = |ttl: Option<u64>, uses: Option<u32>| TokenSpec {
        ttl_secs: ttl,
        uses,
        ..Default::default()
    };
    for ttl in [MAX_TOKEN_TTL_SECS + 1, u64::MAX, i64::MAX as u64] {
        let e = s
            .create_token(1_700_000_000, spec(Some(ttl), None), hash_secret(b"x"))
            .unwrap_err();
        assert_eq!(e, AdminError::InvalidTtl(ttl));
        assert!(e.to_string().contains("10 years"), "{e}");
    }
    for uses in [MAX_TOKEN_USES + 1, u32::MAX] {
        let e = s
            .create_token(0, spec(None, Some(uses)), hash_secret(b"x"))
            .unwrap_err();
        assert_eq!(e, AdminError::InvalidUses(uses));
    }
    assert!(s.take_dirty().is_empty(), "refusals change nothing");
    let t = s
        .create_token(
            1_700_000_000,
            spec(Some(MAX_TOKEN_TTL_SECS), Some(MAX_TOKEN_USES)),
            hash_secret(b"t"),
        )
        .unwrap();
    assert_eq!(t.expires_at, Some(1_700_000_000 + MAX_TOKEN_TTL_SECS));

    let many: Labels = (0..=MAX_LABELS)
        .map(|i| (format!("k{i}"), "v".to_string()))
        .collect();
    let e = s
        .create_token(
            0,
            TokenSpec {
                labels: many.clone(),
                ..Default::default()
            },
            hash_secret(b"y"),
        )
        .unwrap_err();
    assert_eq!(e, AdminError::TooManyLabels(MAX_LABELS + 1));
    enrol_named(&mut s, 1, "a").unwrap();
    assert_eq!(
        s.set_labels("a", many).unwrap_err(),
        AdminError::TooManyLabels(MAX_LABELS + 1)
    );
    // Adding to existing labels counts them all.
    let half = |from: usize| -> Labels {
        (from..from + MAX_LABELS / 2 + 1)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect()
    };
    s.set_labels("a", half(0)).unwrap();
    assert!(matches!(
        s.set_labels("a", half(1000)),
        Err(AdminError::TooManyLabels(_))
    ));
    assert_eq!(s.find_host("a").unwrap().labels.len(), MAX_LABELS / 2 + 1);

    assert!(check_policy_size(ALLOW_ALL).is_ok());
    let huge = format!("{ALLOW_ALL}#{}\n", "x".repeat(MAX_POLICY_BYTES));
    assert!(matches!(
        check_policy_size(&huge),
        Err(AdminError::PolicyTooLarge(_))
    ));
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
