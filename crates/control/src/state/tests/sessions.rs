use super::*;

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
    assert_eq!(n[0].kind().as_str(), "pool_exhausted");
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
    assert_eq!(n[0].kind().as_str(), "host_renamed_on_enrol");
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
fn a_first_message_opens_a_hello_or_is_refused_with_the_reason() {
    use crate::proto::{AgentMessage, ErrorCode, PROTOCOL_VERSION};
    let endpoints = EndpointReport::default();
    let resume = |protocol| AgentMessage::Resume {
        protocol,
        endpoints: endpoints.clone(),
    };
    assert!(matches!(
        Hello::from_first(resume(PROTOCOL_VERSION)),
        Ok(Hello::Resume { .. })
    ));
    let old = Hello::from_first(resume(PROTOCOL_VERSION + 1)).unwrap_err();
    assert_eq!(old.code, ErrorCode::ProtocolVersion);
    assert!(old.message.contains("not supported"), "{}", old.message);
    let odd = Hello::from_first(AgentMessage::Resync).unwrap_err();
    assert_eq!(odd.code, ErrorCode::Malformed);
    assert_eq!(odd.message, "first message must be enrol or resume");
}
