use super::*;

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
