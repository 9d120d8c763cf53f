use super::*;

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

/// 30 hosts in 10 groups of 3; group g reaches group g+1 (mod 10), so each host has 6 peers.
fn ring() -> CoordinatorState {
    let mut s = st();
    s.create_token(0, TokenSpec::default(), hash_secret(b"t"))
        .unwrap();
    let mut yaml = String::from("rules:\n");
    for g in 0..10 {
        yaml += &format!(
            "  - {{name: g{g}, from: {{app: g{g}}}, to: {{app: g{}}}, ports: [tcp/80]}}\n",
            (g + 1) % 10
        );
    }
    s.apply_policy(0, &yaml, "test").unwrap();
    for k in 1..=30u8 {
        enrol(&mut s, k, b"t").unwrap();
        let g = (k - 1) / 3;
        s.set_labels(&format!("h{k}"), [("app".into(), format!("g{g}"))].into())
            .unwrap();
    }
    let _ = maps(&mut s);
    s
}

#[test]
fn label_change_recomputes_only_the_affected_hosts() {
    let mut s = ring();
    for k in 1..=30u64 {
        assert_eq!(s.full_map_for(HostId(k), 0).peers.len(), 6, "h{k}");
    }
    // h1 moves from g0 to g5: it leaves g9's and g1's maps and joins g4's and g6's.
    let before = s.push_work();
    s.set_labels("h1", [("app".into(), "g5".into())].into())
        .unwrap();
    let got = maps(&mut s);
    let work = s.push_work();
    let mut told: Vec<u64> = got.keys().map(|h| h.0).collect();
    told.sort();
    // g1 = h4..h6, g4 = h13..h15, g6 = h19..h21, g9 = h28..h30, and h1 itself.
    let affected = [1, 4, 5, 6, 13, 14, 15, 19, 20, 21, 28, 29, 30];
    assert_eq!(told, affected, "only the hosts whose maps changed are told");
    assert_eq!(
        work.sessions - before.sessions,
        affected.len() as u64,
        "only the sessions the change concerns are looked at"
    );
    assert_eq!(
        work.peer_sets - before.peer_sets,
        1,
        "only h1's own peer set is recomputed"
    );
    assert_eq!(
        work.pairs - before.pairs,
        12,
        "one pair for each host whose grants towards h1 may have moved"
    );
    assert_eq!(work.messages - before.messages, 13);
    // h1 lost 6 peers and got 6 others; the other 12 each gained or lost h1.
    assert_eq!(work.peers_sent - before.peers_sent, 12 + 12);
    assert_eq!(work.full_maps, before.full_maps);
    for k in 1..=30u64 {
        assert_eq!(
            s.full_map_for(HostId(k), 0).peers.len(),
            if [5, 6, 28, 29, 30, 4].contains(&k) {
                5
            } else if [13, 14, 15, 19, 20, 21].contains(&k) {
                7
            } else {
                6
            },
            "h{k}"
        );
    }
}

#[test]
fn an_endpoint_change_looks_only_at_the_hosts_peers() {
    let mut s = ring();
    let before = s.push_work();
    // h1 (g0) is held by g9 (h28..h30) and g1 (h4..h6).
    s.report_endpoints(5, HostId(1), ConnId(1), ep(7));
    let got = maps(&mut s);
    let work = s.push_work();
    let mut told: Vec<u64> = got.keys().map(|h| h.0).collect();
    told.sort();
    assert_eq!(told, [4, 5, 6, 28, 29, 30]);
    assert_eq!(
        work.sessions - before.sessions,
        7,
        "h1 and its six peers, not all 30 sessions"
    );
    assert_eq!(work.peers_sent - before.peers_sent, 6);
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
    /// Another replica committed: the state is reloaded from what is stored and the live
    /// sessions go on from what they were sent (`carry_from`, `resume_carried`).
    Reload,
    Poll,
}

/// Policies the property test switches between: deny all, allow all, label- and name-based,
/// and one whose denies take peers out of what its allow rule grants.
const POLICIES: [&str; 4] = [
    "",
    ALLOW_ALL,
    "rules:
  - {name: all, from: {}, to: {}, ports: [tcp/1-99]}
deny:
  - {name: r2-never-r3, from: {role: r2}, to: {role: r3}, ports: [any]}
  - {name: quiet, isolate: {role: r5}}
  - {name: half, from: {role: r1}, to: {}, ports: [tcp/1-50]}
",
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
        Just(Op::Reload),
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
                Op::Reload => {
                    let _ = s.take_dirty();
                    let mut r = CoordinatorState::restore(
                        IpPool::new("100.64.0.0/24".parse().unwrap(), None).unwrap(),
                        s.hosts().cloned().collect(),
                        s.tokens().cloned().collect(),
                        s.map_version(),
                    ).unwrap();
                    r.restore_policies(now, s.policy_history().to_vec()).unwrap();
                    let old = std::mem::replace(&mut s, r);
                    let mut carried = s.carry_from(old);
                    let mut gone = Vec::new();
                    for (id, (conn, _)) in &agents {
                        let k = s.host(*id).unwrap().public_key;
                        match s.attach_session(now, *id, &k, *conn) {
                            Ok(()) => { s.resume_carried(*id, &mut carried); }
                            Err(_) => gone.push(*id),
                        }
                    }
                    for id in gone {
                        agents.remove(&id);
                    }
                }
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

/// Following another replica: the reloaded state goes on from what each live session was
/// sent, so the agents get a delta of what the other replica changed, not full maps.
#[test]
fn a_reloaded_state_sends_deltas_of_what_changed_not_full_maps() {
    let mut s = three();
    allow_all(&mut s);
    let mut agents: BTreeMap<HostId, NetworkMap> = BTreeMap::new();
    for (id, m) in maps(&mut s) {
        let CoordinatorMessage::FullMap { map } = m else {
            panic!("{m:?}")
        };
        agents.insert(id, map);
    }
    // What the other replica committed: h3's labels changed.
    let mut hosts: Vec<Host> = s.hosts().cloned().collect();
    for h in &mut hosts {
        if h.name == "h3" {
            h.labels.insert("tier".into(), "x".into());
        }
    }
    let mut r = CoordinatorState::restore(
        IpPool::new("100.64.0.0/24".parse().unwrap(), None).unwrap(),
        hosts,
        s.tokens().cloned().collect(),
        s.map_version(),
    )
    .unwrap();
    r.restore_policies(0, s.policy_history().to_vec()).unwrap();
    let mut carried = r.carry_from(s);
    for k in 1..=3u8 {
        let id = HostId(u64::from(k));
        r.attach_session(0, id, &key(k), ConnId(u64::from(k)))
            .unwrap();
        assert!(r.resume_carried(id, &mut carried));
    }
    let pushes = maps(&mut r);
    for (id, m) in &pushes {
        let CoordinatorMessage::Delta { delta } = m else {
            panic!("{id:?} got {m:?}, not a delta")
        };
        // Only h3's record changed: h1 and h2 get it, h3 gets nothing.
        assert_ne!(*id, HostId(3));
        assert_eq!(delta.upserts.len(), 1, "{delta:?}");
        assert_eq!(delta.upserts[0].name, "h3");
        assert!(delta.removals.is_empty());
        let map = agents.get_mut(id).unwrap();
        map.apply(delta).unwrap();
        assert_eq!(*map, r.full_map_for(*id, map.version));
    }
    assert_eq!(pushes.len(), 2);
    assert_eq!(r.push_work().full_maps, 0);
}
