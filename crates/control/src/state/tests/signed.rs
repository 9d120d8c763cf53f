//! Signed policy through the coordinator state and a real agent session: what a compromised
//! coordinator (here: the state changed behind the admin API's back, as an edited database
//! would) sends is cut down by the agent; signed changes apply; narrowing applies unsigned.

use std::sync::Arc;
use std::time::Instant;

use super::*;
use crate::session::{Action, AgentSession, Input, SessionParams};
use crate::signed::{
    AdminSigningKey, Hash32, HostStatement, KeySetStatement, PolicyStatement, Refusal, Signed,
    Statement,
};

const WIDER: &str = "\
rules:
  - name: app-to-db
    from: { app: app }
    to:   { app: db }
    ports: [tcp/5432]
  - name: app-to-web
    from: { app: app }
    to:   { app: web }
    ports: [tcp/80]
";

fn admin() -> AdminSigningKey {
    AdminSigningKey::from_seed([42; 32])
}

fn genesis(a: &AdminSigningKey) -> Signed {
    Signed::sign(
        Statement::KeySet(KeySetStatement {
            seq: 1,
            keys: vec![a.public()],
            quorum: 1,
            prev: Hash32::ZERO,
            at_ms: 1,
        }),
        &[a],
    )
}

fn sign_policy(s: &CoordinatorState, yaml: &str, a: &AdminSigningKey) -> Signed {
    let v = s.signed_view();
    Signed::sign(
        Statement::Policy(PolicyStatement {
            seq: v.policy_version + 1,
            sha256: Hash32::of(yaml.as_bytes()),
            prev: v.policy.map_or(Hash32::ZERO, |p| p.statement.hash()),
            at_ms: 10 + v.policy_version,
        }),
        &[a],
    )
}

fn sign_host(
    s: &CoordinatorState,
    name: &str,
    app: &str,
    at_ms: u64,
    a: &AdminSigningKey,
) -> Signed {
    let h = s.find_host(name).unwrap();
    Signed::sign(
        Statement::Host(HostStatement {
            key: h.public_key,
            name: name.into(),
            labels: [("app".to_string(), app.to_string())].into(),
            at_ms,
        }),
        &[a],
    )
}

/// The three hosts of `three()` with the admin key registered, POLICY signed and applied, and
/// every host's labels signed.
fn signed_three() -> (CoordinatorState, AdminSigningKey) {
    let mut s = three();
    let a = admin();
    s.add_key_set(genesis(&a)).unwrap();
    let p = sign_policy(&s, POLICY, &a);
    s.apply_signed_policy(1, POLICY, p).unwrap();
    for (h, app) in [("h1", "app"), ("h2", "db"), ("h3", "web")] {
        let st = sign_host(&s, h, app, 5, &a);
        s.set_host_signed(h, st, false).unwrap();
    }
    (s, a)
}

/// h1's agent session, fed its `Welcome`.
fn agent(s: &CoordinatorState, t0: Instant) -> AgentSession {
    let mut a = AgentSession::new(
        SessionParams {
            coordinator: "127.0.0.1:7443".parse().unwrap(),
            fallbacks: vec![],
            endpoints: ep(1),
            initial_map: None,
            jitter_seed: 1,
        },
        t0,
    );
    a.handle_input(Input::TransportUp, t0);
    let h = s.find_host("h1").unwrap();
    a.handle_input(
        Input::Frame(CoordinatorMessage::Welcome {
            protocol: crate::proto::PROTOCOL_VERSION,
            host: HostInfo::from_host(h, s.networks()),
            replicas: vec![],
        }),
        t0,
    );
    while a.poll_action().is_some() {}
    a
}

/// Feeds h1's pushes to its session; returns the last applied map and the refusals.
fn deliver(
    s: &mut CoordinatorState,
    a: &mut AgentSession,
    now: Instant,
) -> (Option<Arc<NetworkMap>>, Vec<Vec<Refusal>>) {
    for p in s.poll_pushes() {
        if p.host == HostId(1) {
            a.handle_input(Input::Frame(p.message), now);
        }
    }
    let _ = s.take_dirty();
    let (mut map, mut refused) = (None, Vec::new());
    while let Some(act) = a.poll_action() {
        match act {
            Action::ApplyMap(m) => map = Some(m),
            Action::TrustRefused(r) => refused.push(r.reasons),
            _ => {}
        }
    }
    (map, refused)
}

fn names(m: &NetworkMap) -> Vec<&str> {
    m.peers.iter().map(|p| p.name.as_str()).collect()
}

#[test]
fn forged_rule_is_refused_by_the_agent_signed_change_applies_narrowing_applies_unsigned() {
    let t0 = Instant::now();
    let (mut s, a) = signed_three();
    let _ = maps(&mut s);
    s.disconnect(100, HostId(1), ConnId(1));
    // h1 reconnects (a fresh agent, pinned to the admin key set by its join token).
    let mut ag = agent(&s, t0).with_trust(crate::signed::TrustStore::pinned(
        s.admin_fingerprint().unwrap(),
    ));
    s.connect(
        100,
        key(1),
        ConnId(11),
        IpAddr::from([198, 51, 100, 1]),
        Hello::Resume { endpoints: ep(1) },
    )
    .unwrap();
    let (m, refused) = deliver(&mut s, &mut ag, t0);
    let m = m.expect("full map");
    assert_eq!(names(&m), ["h2"]);
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(ag.trust_status().policy_version, Some(1));

    // Forged: a wider policy installed behind the API's back (no statement for it).
    s.apply_policy(2, WIDER, "forged").unwrap();
    let (m, refused) = deliver(&mut s, &mut ag, t0);
    let m = m.expect("a delta was applied");
    assert_eq!(names(&m), ["h2"], "the forged grant to h3 must not apply");
    assert_eq!(refused.len(), 1);
    assert!(matches!(&refused[0][..], [Refusal::Grants { peer }] if peer == "h3"));
    assert_eq!(ag.trust_status().refused, 1);
    assert_eq!(ag.trust_status().refused_since, Some(t0));
    // The coordinator's own map did include it: the agent is what stopped it.
    assert_eq!(peer_names(&s, 1), ["h2", "h3"]);

    // Forged labels (an edited hosts row): h3 made a db; refused as well.
    let t1 = t0 + std::time::Duration::from_secs(1);
    s.remove_labels("h3", &["app".into()]).unwrap();
    s.set_labels("h3", [("app".into(), "db".into())].into())
        .unwrap();
    let (_, refused) = deliver(&mut s, &mut ag, t1);
    assert!(!refused.is_empty());
    assert_eq!(
        ag.trust_status().refused_since,
        Some(t0),
        "stale since the first refusal"
    );
    s.remove_labels("h3", &["app".into()]).unwrap();
    s.set_labels("h3", [("app".into(), "web".into())].into())
        .unwrap();
    let _ = deliver(&mut s, &mut ag, t1);

    // Signed: the same wider policy, signed by the admin, applies.
    let p = sign_policy(&s, WIDER, &a);
    s.apply_signed_policy(3, WIDER, p).unwrap();
    let (m, refused) = deliver(&mut s, &mut ag, t1);
    assert!(refused.is_empty(), "{refused:?}");
    let m = m.expect("delta");
    assert_eq!(names(&m), ["h2", "h3"]);
    assert_eq!(ag.trust_status().refused_since, None, "no longer stale");
    assert_eq!(
        ag.trust_status().policy_version,
        Some(s.policy().unwrap().version)
    );

    // Narrowing, unsigned: quarantine h3; it leaves the map with no refusal.
    s.quarantine("h3").unwrap();
    let (m, refused) = deliver(&mut s, &mut ag, t1);
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(names(&m.expect("delta")), ["h2"]);
    // Lifting it needs a signature at the API …
    assert!(matches!(
        s.require_unsigned("host release"),
        Err(AdminError::SignatureRequired(_))
    ));
    let st = sign_host(&s, "h3", "web", 9, &a);
    s.set_host_signed("h3", st, true).unwrap();
    let (m, refused) = deliver(&mut s, &mut ag, t1);
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(names(&m.expect("delta")), ["h2", "h3"]);
}

#[test]
fn the_coordinator_checks_signed_changes() {
    let (mut s, a) = signed_three();
    let evil = AdminSigningKey::from_seed([66; 32]);
    // A key set not signed by the current one.
    let cur = s.signed_view().chain.last().unwrap().statement.hash();
    let mut keys = vec![a.public(), evil.public()];
    keys.sort();
    let next = Statement::KeySet(KeySetStatement {
        seq: 2,
        keys,
        quorum: 1,
        prev: cur,
        at_ms: 2,
    });
    assert!(matches!(
        s.add_key_set(Signed::sign(next.clone(), &[&evil])),
        Err(AdminError::BadSignature(_))
    ));
    s.add_key_set(Signed::sign(next, &[&a])).unwrap();
    // A policy whose statement names another file; one signed by an unknown key.
    let p = sign_policy(&s, POLICY, &a);
    assert!(matches!(
        s.apply_signed_policy(4, WIDER, p),
        Err(AdminError::BadSignature(
            crate::signed::SignError::ContentMismatch
        ))
    ));
    let p = sign_policy(&s, WIDER, &AdminSigningKey::from_seed([7; 32]));
    assert!(s.apply_signed_policy(4, WIDER, p).is_err());
    // A host statement for another host's key, or an older one.
    let st = sign_host(&s, "h2", "web", 50, &a);
    assert!(matches!(
        s.set_host_signed("h3", st, false),
        Err(AdminError::BadSignature(
            crate::signed::SignError::WrongHost
        ))
    ));
    let st = sign_host(&s, "h2", "web", 1, &a);
    assert!(matches!(
        s.set_host_signed("h2", st, false),
        Err(AdminError::BadSignature(crate::signed::SignError::Stale))
    ));
    // Nothing changed on refusal.
    assert_eq!(s.find_host("h2").unwrap().labels.get("app").unwrap(), "db");
    // A signed rename + relabel.
    let h = s.find_host("h2").unwrap();
    let st = Signed::sign(
        Statement::Host(HostStatement {
            key: h.public_key,
            name: "db1".into(),
            labels: [
                ("app".to_string(), "db".to_string()),
                ("env".to_string(), "prod".to_string()),
            ]
            .into(),
            at_ms: 60,
        }),
        &[&evil],
    );
    let h = s.set_host_signed("h2", st, false).unwrap();
    assert_eq!(h.name, "db1");
    assert_eq!(h.labels.len(), 2);
}

#[test]
fn signed_statements_survive_a_restore() {
    let (mut s, _a) = signed_three();
    let d = s.take_dirty();
    assert_eq!(d.signed.len(), 1 + 1 + 3);
    let mut r = CoordinatorState::restore(
        IpPool::new("100.64.0.0/24".parse().unwrap(), None).unwrap(),
        s.hosts().cloned().collect(),
        s.tokens().cloned().collect(),
        s.map_version(),
    )
    .unwrap();
    r.restore_policies(0, s.policy_history().to_vec()).unwrap();
    r.restore_signed(d.signed);
    assert_eq!(r.signed_view(), s.signed_view());
    assert!(r.host_statement(HostId(2)).is_some());
    assert!(r.require_unsigned("x").is_err());
}

/// h1 (app), h2 (db, with the real X25519 key `db`, so it can sign its own succession) and h3
/// (web), the admin key registered, POLICY signed and applied, every host's labels signed.
fn signed_three_with_db_key(db: &meshd_tunnel::PrivateKey) -> (CoordinatorState, AdminSigningKey) {
    let mut s = st();
    s.create_token(0, TokenSpec::default(), hash_secret(b"t"))
        .unwrap();
    enrol(&mut s, 1, b"t").unwrap();
    s.connect(
        100,
        db.public_key(),
        ConnId(2),
        IpAddr::from([198, 51, 100, 2]),
        Hello::Enrol {
            secret_hash: hash_secret(b"t"),
            name: "h2".into(),
            endpoints: ep(1),
        },
    )
    .unwrap();
    enrol(&mut s, 3, b"t").unwrap();
    let a = admin();
    s.add_key_set(genesis(&a)).unwrap();
    let p = sign_policy(&s, POLICY, &a);
    s.apply_signed_policy(1, POLICY, p).unwrap();
    for (h, app) in [("h1", "app"), ("h2", "db"), ("h3", "web")] {
        let st = sign_host(&s, h, app, 5, &a);
        s.set_host_signed(h, st, false).unwrap();
    }
    (s, a)
}

fn rotation_events(s: &mut CoordinatorState) -> Vec<String> {
    s.poll_rotation_events()
        .into_iter()
        .map(|e| format!("{}: {}", e.kind, e.detail))
        .collect()
}

#[test]
fn a_rotation_in_a_signed_mesh_carries_the_hosts_own_succession_to_its_peers() {
    use crate::rotation::Nonce;
    use crate::signed::Succession;
    use meshd_tunnel::PrivateKey;
    let (old, new) = (
        PrivateKey::from_bytes([21; 32]),
        PrivateKey::from_bytes([22; 32]),
    );
    let (mut s, _admin) = signed_three_with_db_key(&old);
    let t0 = Instant::now();
    let mut a = agent(&s, t0);
    let (m, refused) = deliver(&mut s, &mut a, t0);
    assert!(refused.is_empty(), "{refused:?}");
    let before = m.unwrap().peer(&old.public_key()).unwrap().grants.clone();
    assert!(!before.outbound.is_empty(), "app reaches db");

    // h2 proposes its new key with its old key's signature over it: the coordinator keeps the
    // succession with h2's statement (durably) and h1's agent accepts the next key as h2.
    let nonce = Nonce([7; 32]);
    s.start_key_rotation(10, "h2", nonce).unwrap();
    let succ = Succession::sign(&old, new.public_key(), rand_core::OsRng);
    s.key_proposal(
        11,
        HostId(2),
        ConnId(2),
        prop(nonce, new.public_key(), true, Some(succ.sig)),
    )
    .unwrap();
    let dirty = s.take_dirty();
    assert!(
        dirty.signed.iter().any(|r| matches!(r,
            SignedRecord::Host { host, signed } if *host == HostId(2) && signed.successions == [succ])),
        "the succession is stored with the batch"
    );
    let (m, refused) = deliver(&mut s, &mut a, t0);
    assert!(refused.is_empty(), "{refused:?}");
    let p2 = m.unwrap().peer(&old.public_key()).unwrap().clone();
    assert_eq!(p2.next_public_key, Some(new.public_key()));
    assert_eq!(p2.grants, before);

    // h2 switches and reconnects with the new key: h1 keeps its signed grants with it, no
    // admin involved.
    s.disconnect(12, HostId(2), ConnId(2));
    s.connect(
        12,
        new.public_key(),
        ConnId(22),
        IpAddr::from([198, 51, 100, 2]),
        Hello::Resume { endpoints: ep(1) },
    )
    .unwrap();
    let (m, refused) = deliver(&mut s, &mut a, t0);
    assert!(refused.is_empty(), "{refused:?}");
    let m = m.unwrap();
    assert!(m.peer(&old.public_key()).is_none());
    assert_eq!(m.peer(&new.public_key()).unwrap().grants, before);

    // A proposal without a succession (an old agent), or with one the key did not sign (the
    // coordinator's own key slipped in), aborts the rotation: no next key reaches any peer.
    let third = PrivateKey::from_bytes([23; 32]);
    let forged = Succession::sign(&third, third.public_key(), rand_core::OsRng);
    let _ = rotation_events(&mut s);
    for (i, sig) in [None, Some(forged.sig)].into_iter().enumerate() {
        let nonce = Nonce([8 + i as u8; 32]);
        let at = 20 + 10 * i as u64;
        s.start_key_rotation(at, "h2", nonce).unwrap();
        s.key_proposal(
            at + 1,
            HostId(2),
            ConnId(22),
            prop(nonce, third.public_key(), true, sig),
        )
        .unwrap();
        let ev = rotation_events(&mut s);
        assert!(
            ev.iter().any(|e| e.starts_with("key_rotation_aborted")),
            "{ev:?}"
        );
        assert_eq!(s.host(HostId(2)).unwrap().pending_key, None);
        let (m, refused) = deliver(&mut s, &mut a, t0);
        assert!(refused.is_empty(), "{refused:?}");
        if let Some(m) = m {
            assert_eq!(m.peer(&new.public_key()).unwrap().next_public_key, None);
        }
    }
    assert_eq!(s.host_statement(HostId(2)).unwrap().successions, [succ]);
}

fn host_st(
    s: &CoordinatorState,
    host: &str,
    name: &str,
    labels: &[(&str, &str)],
    at_ms: u64,
    by: &[&AdminSigningKey],
) -> Signed {
    let h = s.find_host(host).unwrap();
    Signed::sign(
        Statement::Host(HostStatement {
            key: h.public_key,
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            at_ms,
        }),
        by,
    )
}

#[test]
fn a_signed_batch_applies_all_or_nothing_and_agents_accept_it() {
    let t0 = Instant::now();
    let (mut s, a) = signed_three();
    let evil = AdminSigningKey::from_seed([66; 32]);
    let _ = maps(&mut s);
    s.disconnect(100, HostId(1), ConnId(1));
    let mut ag = agent(&s, t0).with_trust(crate::signed::TrustStore::pinned(
        s.admin_fingerprint().unwrap(),
    ));
    s.connect(
        100,
        key(1),
        ConnId(11),
        IpAddr::from([198, 51, 100, 1]),
        Hello::Resume { endpoints: ep(1) },
    )
    .unwrap();
    let (m, _) = deliver(&mut s, &mut ag, t0);
    assert_eq!(names(&m.expect("full map")), ["h2"]);

    let good_h2 = host_st(&s, "h2", "h2", &[("app", "db"), ("env", "prod")], 20, &[&a]);
    let good_h3 = host_st(&s, "h3", "h3", &[("app", "db")], 20, &[&a]);
    let refused = |r: Result<SignedBatchApplied, AdminError>| match r {
        Err(AdminError::SignedBatch { host, why }) => (host, why.to_string()),
        other => panic!("expected a refused batch, got {other:?}"),
    };
    let unchanged = |s: &mut CoordinatorState| {
        assert_eq!(s.find_host("h2").unwrap().labels.len(), 1);
        assert_eq!(s.find_host("h3").unwrap().labels["app"], "web");
        assert_eq!(peer_names(s, 1), ["h2"]);
        let d = s.take_dirty();
        assert!(d.signed.is_empty() && d.hosts.is_empty(), "{d:?}");
    };
    let _ = s.take_dirty();
    // One statement signed by a key outside the set: nothing applies, and it is named.
    let bad = host_st(&s, "h3", "h3", &[("app", "db")], 20, &[&evil]);
    let (host, why) = refused(s.set_hosts_signed(200, vec![good_h2.clone(), bad], None));
    assert_eq!(host, "h3");
    assert!(why.contains("1 needed"), "{why}");
    unchanged(&mut s);
    // A stale one (older than h2's held statement) or two for one host: the same.
    let old = host_st(&s, "h2", "h2", &[("app", "db")], 1, &[&a]);
    let (host, why) = refused(s.set_hosts_signed(200, vec![good_h3.clone(), old], None));
    assert_eq!(host, "h2");
    assert!(why.contains("not newer"), "{why}");
    let (host, _) = refused(s.set_hosts_signed(
        200,
        vec![good_h3.clone(), good_h2.clone(), good_h3.clone()],
        None,
    ));
    assert_eq!(host, "h3");
    // Two hosts ending with one name.
    let clash = host_st(&s, "h3", "h2", &[("app", "db")], 20, &[&a]);
    let (_, why) = refused(s.set_hosts_signed(200, vec![clash], None));
    assert!(why.contains("taken"), "{why}");
    // With a signed policy whose tests fail: the labels are put back too.
    let failing = "\
rules:
  - name: app-to-db
    from: { app: app }
    to:   { app: db }
    ports: [tcp/5432]
tests:
  - { from: { app: app }, to: { app: db }, port: tcp/5432, expect: deny }
";
    let p = sign_policy(&s, failing, &a);
    let r = s.set_hosts_signed(
        200,
        vec![good_h2.clone(), good_h3.clone()],
        Some((failing, p)),
    );
    assert!(matches!(r, Err(AdminError::Policy(_))), "{r:?}");
    assert_eq!(s.find_host("h3").unwrap().labels["app"], "web");
    assert_eq!(peer_names(&s, 1), ["h2"]);
    assert!(s.take_dirty().signed.is_empty());

    // The whole batch, verified: applied, and h1's agent accepts the new peer h3 (its
    // statement verifies against the pinned key set).
    let r = s
        .set_hosts_signed(200, vec![good_h2, good_h3], None)
        .unwrap();
    assert_eq!(r.hosts.len(), 2);
    assert_eq!(s.find_host("h3").unwrap().labels["app"], "db");
    assert_eq!(s.find_host("h2").unwrap().labels["env"], "prod");
    let (m, refused) = deliver(&mut s, &mut ag, t0);
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(names(&m.expect("delta")), ["h2", "h3"]);
    assert_eq!(ag.trust_status().refused, 0);
}

fn sign_mode(s: &CoordinatorState, all: bool, groups: Vec<Labels>, a: &AdminSigningKey) -> Signed {
    let v = s.signed_view();
    let cur = v
        .mode
        .as_ref()
        .map(|m| (m.mode().unwrap().seq, m.statement.hash()));
    Signed::sign(
        Statement::Mode(crate::signed::ModeStatement {
            seq: cur.map_or(1, |c| c.0 + 1),
            all,
            groups,
            prev: cur.map_or(Hash32::ZERO, |c| c.1),
            at_ms: 50,
        }),
        &[a],
    )
}

/// Learning widens access (would-deny flows pass), so in a signed mesh the runtime switch
/// is signed: one set behind the API's back is cut by the agent, a signed one applies, an
/// old one cannot be replayed.
#[test]
fn runtime_learning_is_signed_in_a_signed_mesh() {
    let t0 = Instant::now();
    let (mut s, a) = signed_three();
    let _ = maps(&mut s);
    s.disconnect(100, HostId(1), ConnId(1));
    let mut ag = agent(&s, t0).with_trust(crate::signed::TrustStore::pinned(
        s.admin_fingerprint().unwrap(),
    ));
    s.connect(
        100,
        key(1),
        ConnId(11),
        IpAddr::from([198, 51, 100, 1]),
        Hello::Resume { endpoints: ep(1) },
    )
    .unwrap();
    let (m, refused) = deliver(&mut s, &mut ag, t0);
    assert_eq!(names(&m.expect("full map")), ["h2"]);
    assert!(refused.is_empty(), "{refused:?}");

    // Forged: the whole mesh set learning behind the API's back (an edited database).
    s.set_mode(1, meshd_policy::PolicyMode::Learn, None)
        .unwrap();
    assert_eq!(
        peer_names(&s, 1),
        ["h2", "h3"],
        "the coordinator's map learns"
    );
    let (m, refused) = deliver(&mut s, &mut ag, t0);
    let m = m.expect("a delta was applied");
    assert_eq!(
        names(&m),
        ["h2"],
        "learning with h3 must not apply unsigned"
    );
    assert!(!refused.is_empty());
    assert!(m.peers.iter().all(|p| !p.grants.learn));
    s.set_mode(2, meshd_policy::PolicyMode::Enforce, None)
        .unwrap();
    let _ = deliver(&mut s, &mut ag, t0);

    // Signed: the admin puts the whole mesh in learning mode; it applies, nothing refused.
    let m1 = sign_mode(&s, true, vec![], &a);
    let v = s.set_mode_signed(3, m1.clone()).unwrap();
    assert!(v.changed);
    let (m, refused) = deliver(&mut s, &mut ag, t0);
    assert!(refused.is_empty(), "{refused:?}");
    let m = m.expect("delta");
    assert_eq!(names(&m), ["h2", "h3"]);
    assert!(m.peers.iter().all(|p| p.grants.learn));
    assert_eq!(ag.trust_status().refused_since, None);
    // Replaying it, or one not signed by the set, is refused by the coordinator.
    assert!(matches!(
        s.set_mode_signed(4, m1),
        Err(AdminError::BadSignature(_))
    ));
    let evil = AdminSigningKey::from_seed([66; 32]);
    assert!(s
        .set_mode_signed(4, sign_mode(&s, false, vec![], &evil))
        .is_err());
    // Signed back to enforcing: h3 leaves, unsigned narrowing would have done as much.
    s.set_mode_signed(5, sign_mode(&s, false, vec![], &a))
        .unwrap();
    let (m, refused) = deliver(&mut s, &mut ag, t0);
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(names(&m.expect("delta")), ["h2"]);
    // The statements survive a restart of the coordinator's state.
    assert!(s.signed_view().mode.is_some());
}
