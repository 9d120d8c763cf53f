use super::*;

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
