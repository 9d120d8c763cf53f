use super::*;
use crate::map::Peer;
use std::net::IpAddr;
use std::sync::Arc;

fn key(n: u8) -> AdminSigningKey {
    AdminSigningKey::from_seed([n; 32])
}

fn wg(n: u8) -> PublicKey {
    PublicKey([n; 32])
}

fn set(seq: u64, keys: &[&AdminSigningKey], quorum: u32, prev: Hash32) -> Statement {
    let mut ks: Vec<AdminKey> = keys.iter().map(|k| k.public()).collect();
    ks.sort();
    Statement::KeySet(KeySetStatement {
        seq,
        keys: ks,
        quorum,
        prev,
        at_ms: 1000 + seq,
    })
}

fn host(n: u8, name: &str, labels: &[(&str, &str)], at_ms: u64) -> Statement {
    Statement::Host(HostStatement {
        key: wg(n),
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        at_ms,
    })
}

fn policy(seq: u64, yaml: &str, prev: Hash32) -> Statement {
    Statement::Policy(PolicyStatement {
        seq,
        sha256: Hash32::of(yaml.as_bytes()),
        prev,
        at_ms: seq,
    })
}

const POLICY: &str =
    "rules:\n  - name: web-db\n    from: {role: web}\n    to: {role: db}\n    ports: [tcp/5432]\n";
const WIDER: &str = "rules:\n  - name: web-db\n    from: {role: web}\n    to: {role: db}\n    ports: [tcp/5432]\n  - name: all\n    from: {}\n    to: {}\n    ports: [any]\n";

#[test]
fn sign_verify_and_tamper() {
    let a = key(1);
    let g = set(1, &[&a], 1, Hash32::ZERO);
    let s = Signed::sign(host(5, "db", &[("role", "db")], 7), &[&a]);
    let ks = match &g {
        Statement::KeySet(k) => k.clone(),
        _ => unreachable!(),
    };
    assert_eq!(s.verify(&ks), Ok(()));
    // Any change to what is signed breaks it.
    let mut t = s.clone();
    if let Statement::Host(h) = &mut t.statement {
        h.labels.insert("role".into(), "web".into());
    }
    assert_eq!(
        t.verify(&ks),
        Err(SignError::Quorum {
            valid: 0,
            quorum: 1
        })
    );
    let mut t = s.clone();
    t.sigs[0].sig.0[3] ^= 1;
    assert!(t.verify(&ks).is_err());
    // A key outside the set does not count.
    let other = Signed::sign(host(5, "db", &[], 7), &[&key(2)]);
    assert!(other.verify(&ks).is_err());
    // JSON round trip keeps the signature valid (signatures cover canonical bytes).
    let back: Signed = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    assert_eq!(back.verify(&ks), Ok(()));
}

#[test]
fn canonical_encoding_separates_fields() {
    // "ab"+"c" and "a"+"bc" must not collide (length prefixes).
    let a = host(1, "x", &[("ab", "c")], 1).canonical();
    let b = host(1, "x", &[("a", "bc")], 1).canonical();
    assert_ne!(a, b);
    assert_ne!(
        policy(1, "x", Hash32::ZERO).hash(),
        policy(2, "x", Hash32::ZERO).hash()
    );
}

#[test]
fn quorum_counts_distinct_keys_of_the_set() {
    let (a, b, c) = (key(1), key(2), key(3));
    let Statement::KeySet(ks) = set(1, &[&a, &b, &c], 2, Hash32::ZERO) else {
        unreachable!()
    };
    let st = policy(1, POLICY, Hash32::ZERO);
    assert!(Signed::sign(st.clone(), &[&a]).verify(&ks).is_err());
    // The same key twice is one signature.
    assert_eq!(
        Signed::sign(st.clone(), &[&a, &a]).verify(&ks),
        Err(SignError::Quorum {
            valid: 1,
            quorum: 2
        })
    );
    assert_eq!(Signed::sign(st.clone(), &[&a, &c]).verify(&ks), Ok(()));
    assert_eq!(Signed::sign(st, &[&a, &key(9), &b]).valid_signers(&ks), 2);
}

#[test]
fn key_set_chain() {
    let (a, b, c) = (key(1), key(2), key(3));
    let g = Signed::sign(set(1, &[&a], 1, Hash32::ZERO), &[&a]);
    assert_eq!(check_genesis(&g), Ok(()));
    // A genesis not signed by its own key proves nothing.
    assert!(check_genesis(&Signed::sign(set(1, &[&a], 1, Hash32::ZERO), &[&b])).is_err());
    // Add b with quorum 2: signed by a (the current set's quorum is 1).
    let s2 = Signed::sign(set(2, &[&a, &b], 2, g.statement.hash()), &[&a]);
    assert_eq!(check_successor(&g, &s2), Ok(()));
    // Signed by the new key only: refused.
    let bad = Signed::sign(set(2, &[&a, &b], 2, g.statement.hash()), &[&b]);
    assert!(matches!(
        check_successor(&g, &bad),
        Err(SignError::Quorum { .. })
    ));
    // Wrong prev or seq.
    let bad = Signed::sign(set(2, &[&a, &b], 1, Hash32::ZERO), &[&a]);
    assert!(matches!(
        check_successor(&g, &bad),
        Err(SignError::NotNext { .. })
    ));
    // Now quorum 2: adding c needs a and b.
    let s3 = set(3, &[&a, &b, &c], 2, s2.statement.hash());
    assert!(check_successor(&s2, &Signed::sign(s3.clone(), &[&a])).is_err());
    assert_eq!(check_successor(&s2, &Signed::sign(s3, &[&a, &b])), Ok(()));
    // Structure.
    assert!(check_successor(
        &g,
        &Signed::sign(set(2, &[&a], 2, g.statement.hash()), &[&a])
    )
    .is_err());
}

fn bundle(chain: &[Signed], pol: Option<(&str, Signed)>, hosts: Vec<Signed>) -> TrustBundle {
    TrustBundle {
        key_sets: chain.to_vec(),
        policy: pol.map(|(y, s)| SignedPolicy {
            yaml: y.into(),
            signed: s,
        }),
        hosts,
        mode: None,
    }
}

#[test]
fn store_follows_the_chain_from_its_pin_only() {
    let (a, b, evil) = (key(1), key(2), key(66));
    let g = Signed::sign(set(1, &[&a], 1, Hash32::ZERO), &[&a]);
    let s2 = Signed::sign(set(2, &[&a, &b], 1, g.statement.hash()), &[&a]);
    // Pinned to g: a coordinator offering its own genesis is refused.
    let mut st = TrustStore::pinned(g.statement.hash());
    let fake = Signed::sign(set(1, &[&evil], 1, Hash32::ZERO), &[&evil]);
    let r = st.absorb(&bundle(std::slice::from_ref(&fake), None, vec![]));
    assert_eq!(r.refused, vec![Refusal::PinNotOffered(g.statement.hash())]);
    assert!(st.key_set().is_none());
    // The real chain is followed to its end.
    let r = st.absorb(&bundle(&[g.clone(), s2.clone()], None, vec![]));
    assert!(r.refused.is_empty(), "{:?}", r.refused);
    assert_eq!(st.key_set().unwrap().seq, 2);
    // A forged successor (signed by a key not in the set) stops the walk.
    let s3 = Signed::sign(set(3, &[&evil], 1, s2.statement.hash()), &[&evil]);
    let r = st.absorb(&bundle(&[g.clone(), s2.clone(), s3], None, vec![]));
    assert!(matches!(
        r.refused[..],
        [Refusal::KeySet(SignError::Quorum { .. })]
    ));
    assert_eq!(st.key_set().unwrap().seq, 2);
    // Dropping the chain altogether is refused too.
    let r = st.absorb(&bundle(&[], None, vec![]));
    assert!(matches!(r.refused[..], [Refusal::NoKeySet(_)]));
    // Trust on first use: an unpinned store pins the genesis it is first sent.
    let mut tofu = TrustStore::default();
    assert!(!tofu.is_active());
    let r = tofu.absorb(&bundle(&[g.clone(), s2], None, vec![]));
    assert_eq!(r.pinned_first, Some(g.statement.hash()));
    assert!(tofu.is_active());
}

fn peer(n: u8, name: &str, grants: PeerGrants) -> Peer {
    Peer {
        name: name.into(),
        public_key: wg(n),
        addresses: vec![IpAddr::from([100, 64, 0, n])],
        endpoints: vec![],
        labels: Labels::new(),
        grants,
        transparent: false,
        next_public_key: None,
    }
}

fn compiled(yaml: &str, me: (&str, &str), them: (&str, &str)) -> PeerGrants {
    let p = Policy::parse(yaml).unwrap();
    let h = |id, (n, r): (&str, &str)| meshd_policy::HostRef {
        id,
        name: n.into(),
        labels: [("role".to_string(), r.to_string())].into(),
    };
    meshd_policy::compile(&p, &[h(1, me), h(2, them)], 0).grants_between(1, 2)
}

#[test]
fn filter_cuts_unsigned_grants_and_keeps_signed_ones() {
    let a = key(1);
    let g = Signed::sign(set(1, &[&a], 1, Hash32::ZERO), &[&a]);
    let mut st = TrustStore::pinned(g.statement.hash());
    let p1 = Signed::sign(policy(1, POLICY, Hash32::ZERO), &[&a]);
    let web = Signed::sign(host(1, "web", &[("role", "web")], 1), &[&a]);
    let db = Signed::sign(host(2, "db", &[("role", "db")], 1), &[&a]);
    let other = Signed::sign(host(3, "other", &[("role", "other")], 1), &[&a]);
    let r = st.absorb(&bundle(
        std::slice::from_ref(&g),
        Some((POLICY, p1.clone())),
        vec![web, db, other],
    ));
    assert!(r.refused.is_empty(), "{:?}", r.refused);
    assert_eq!(st.policy_version(), Some(1));

    let signed = compiled(POLICY, ("web", "web"), ("db", "db"));
    assert!(!signed.outbound.is_empty());
    // Forged: the coordinator compiled a wider policy (or other labels) for web ↔ other.
    let forged = compiled(WIDER, ("web", "web"), ("other", "other"));
    let wide_db = compiled(WIDER, ("web", "web"), ("db", "db"));
    let map = NetworkMap {
        version: 4,
        peers: [peer(2, "db", wide_db), peer(3, "other", forged)]
            .map(Arc::new)
            .into(),
    };
    let (out, refused) = st.filter(&wg(1), &map);
    assert_eq!(refused.len(), 2, "{refused:?}");
    // db keeps exactly the signed grants; other is dropped (nothing signed).
    assert_eq!(out.peers.len(), 1);
    assert_eq!(out.peers[0].grants, signed);
    // The honest map passes untouched.
    let honest = NetworkMap {
        version: 5,
        peers: vec![Arc::new(peer(2, "db", signed.clone()))],
    };
    let (out, refused) = st.filter(&wg(1), &honest);
    assert!(refused.is_empty());
    assert_eq!(out, honest);
    // A next key (key rotation) nobody signed is not accepted as db: the coordinator cannot
    // slip a key of its own in as db's, nor another host's (other's) key.
    let mut rotating = honest.clone();
    for next in [9, 3] {
        Arc::make_mut(&mut rotating.peers[0]).next_public_key = Some(wg(next));
        let (out, refused) = st.filter(&wg(1), &rotating);
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(out.peers[0].next_public_key, None);
        assert_eq!(out.peers[0].grants, signed);
    }
    // A next key an admin signed as db (`meshctl host label` after the rotation) is kept.
    let db9 = Signed::sign(host(9, "db", &[("role", "db")], 2), &[&a]);
    let r = st.absorb(&bundle(std::slice::from_ref(&g), None, vec![db9]));
    assert!(r.refused.is_empty(), "{:?}", r.refused);
    Arc::make_mut(&mut rotating.peers[0]).next_public_key = Some(wg(9));
    let (out, refused) = st.filter(&wg(1), &rotating);
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(out.peers[0].next_public_key, Some(wg(9)));
    // Narrowing passes unsigned: fewer grants, or the peer removed.
    let narrowed = NetworkMap {
        version: 6,
        peers: vec![],
    };
    assert_eq!(st.filter(&wg(1), &narrowed), (narrowed.clone(), vec![]));

    // A forged policy (hash mismatch) and a replayed older one are refused; the held one stays.
    let p2 = Signed::sign(policy(2, WIDER, p1.statement.hash()), &[&a]);
    let r = st.absorb(&bundle(
        std::slice::from_ref(&g),
        Some((POLICY, p2.clone())),
        vec![],
    ));
    assert_eq!(r.refused, vec![Refusal::Policy(SignError::ContentMismatch)]);
    let r = st.absorb(&bundle(std::slice::from_ref(&g), Some((WIDER, p2)), vec![]));
    assert!(r.refused.is_empty());
    assert_eq!(st.policy_version(), Some(2));
    let r = st.absorb(&bundle(
        std::slice::from_ref(&g),
        Some((POLICY, p1)),
        vec![],
    ));
    assert_eq!(r.refused, vec![Refusal::Policy(SignError::Stale)]);
    // Host statements only move forward too.
    let old = Signed::sign(host(2, "db", &[("role", "web")], 0), &[&a]);
    let r = st.absorb(&bundle(&[g], None, vec![old]));
    assert!(matches!(
        r.refused[..],
        [Refusal::Host {
            why: SignError::Stale,
            ..
        }]
    ));
}

#[test]
fn inactive_store_passes_maps_through() {
    let mut st = TrustStore::default();
    let map = NetworkMap {
        version: 1,
        peers: vec![Arc::new(peer(2, "db", PeerGrants::allow_all("x")))],
    };
    assert_eq!(st.filter(&wg(1), &map), (map.clone(), vec![]));
}

#[test]
fn text_forms_round_trip() {
    let k = key(4);
    let t = k.to_text();
    assert_eq!(AdminSigningKey::from_text(&t).unwrap().public(), k.public());
    assert_eq!(k.public().to_string().parse::<AdminKey>(), Ok(k.public()));
    let h = Hash32::of(b"x");
    assert_eq!(h.to_string().parse::<Hash32>(), Ok(h));
    assert!("zz".parse::<Hash32>().is_err());
    assert!("AAAA".parse::<AdminKey>().is_err());
}

fn x(n: u8) -> meshd_tunnel::PrivateKey {
    meshd_tunnel::PrivateKey::from_bytes([n; 32])
}

fn host_on(key: PublicKey, name: &str, role: &str, at_ms: u64) -> Statement {
    Statement::Host(HostStatement {
        key,
        name: name.into(),
        labels: [("role".to_string(), role.to_string())].into(),
        at_ms,
    })
}

fn peer_on(key: PublicKey, next: Option<PublicKey>, name: &str, grants: PeerGrants) -> Peer {
    Peer {
        public_key: key,
        next_public_key: next,
        ..peer(2, name, grants)
    }
}

#[test]
fn succession_signatures_bind_both_keys() {
    let (k1, k2) = (x(11), x(12));
    let s = Succession::sign(&k1, k2.public_key(), rand_core::OsRng);
    assert!(s.verify(&k1.public_key()));
    // Another key did not sign it; it names no other successor; no bit may change.
    assert!(!s.verify(&k2.public_key()));
    assert!(!Succession {
        new_key: x(13).public_key(),
        ..s
    }
    .verify(&k1.public_key()));
    let mut bad = s;
    bad.sig.0[5] ^= 1;
    assert!(!bad.verify(&k1.public_key()));
    // A key handing on to itself, and the all-zero (small-order) key, never verify.
    let me = Succession::sign(&k1, k1.public_key(), rand_core::OsRng);
    assert!(!me.verify(&k1.public_key()));
    assert!(!s.verify(&PublicKey([0; 32])));
    // JSON round trip.
    let j = serde_json::to_string(&s).unwrap();
    assert_eq!(serde_json::from_str::<Succession>(&j).unwrap(), s);
}

#[test]
fn a_rotated_peer_keeps_its_signed_identity_through_its_own_succession_only() {
    let a = key(1);
    let g = Signed::sign(set(1, &[&a], 1, Hash32::ZERO), &[&a]);
    let p1 = Signed::sign(policy(1, POLICY, Hash32::ZERO), &[&a]);
    let (old, new, evil) = (x(21), x(22), x(66));
    let web = Signed::sign(host(1, "web", &[("role", "web")], 1), &[&a]);
    let db = Signed::sign(host_on(old.public_key(), "db", "db", 1), &[&a]);
    let mut st = TrustStore::pinned(g.statement.hash());
    let r = st.absorb(&bundle(
        std::slice::from_ref(&g),
        Some((POLICY, p1)),
        vec![web.clone(), db.clone()],
    ));
    assert!(r.refused.is_empty(), "{:?}", r.refused);
    let signed = compiled(POLICY, ("web", "web"), ("db", "db"));
    let rotating = |next| NetworkMap {
        version: 7,
        peers: vec![Arc::new(peer_on(
            old.public_key(),
            next,
            "db",
            signed.clone(),
        ))],
    };

    // db's next key with db's own signature over it: kept, nothing refused.
    let mut db_next = db.clone();
    db_next
        .successions
        .push(Succession::sign(&old, new.public_key(), rand_core::OsRng));
    let r = st.absorb(&bundle(
        std::slice::from_ref(&g),
        None,
        vec![db_next.clone()],
    ));
    assert!(r.refused.is_empty(), "{:?}", r.refused);
    let (out, refused) = st.filter(&wg(1), &rotating(Some(new.public_key())));
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(out.peers[0].next_public_key, Some(new.public_key()));
    // After the switch db is known by its new key alone, with its signed grants.
    let switched = NetworkMap {
        version: 8,
        peers: vec![Arc::new(peer_on(
            new.public_key(),
            None,
            "db",
            signed.clone(),
        ))],
    };
    st.retain_hosts(&wg(1), &switched);
    let (out, refused) = st.filter(&wg(1), &switched);
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(out.peers[0].grants, signed);

    // A succession the previous key did not sign (the coordinator's own key) is refused, and
    // that key is not accepted as db.
    let mut forged = db.clone();
    forged.successions = vec![Succession::sign(&evil, evil.public_key(), rand_core::OsRng)];
    forged.successions[0].new_key = evil.public_key();
    let mut st2 = TrustStore::pinned(g.statement.hash());
    let r = st2.absorb(&bundle(
        std::slice::from_ref(&g),
        Some((POLICY, Signed::sign(policy(1, POLICY, Hash32::ZERO), &[&a]))),
        vec![web.clone(), forged],
    ));
    assert_eq!(
        r.refused,
        vec![Refusal::Host {
            name: "db".into(),
            why: SignError::Succession(evil.public_key())
        }]
    );
    let (out, refused) = st2.filter(&wg(1), &rotating(Some(evil.public_key())));
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(out.peers[0].next_public_key, None);
    let evil_map = NetworkMap {
        version: 9,
        peers: vec![Arc::new(peer_on(
            evil.public_key(),
            None,
            "db",
            signed.clone(),
        ))],
    };
    assert!(st2.filter(&wg(1), &evil_map).0.peers.is_empty());

    // db's key cannot hand on to web's: an admin's statement for a key wins over any chain.
    let mut grab = db.clone();
    grab.successions = vec![Succession::sign(&old, wg(1), rand_core::OsRng)];
    let r = st2.absorb(&bundle(std::slice::from_ref(&g), None, vec![grab]));
    assert!(r.refused.is_empty(), "{:?}", r.refused);
    assert_eq!(st2.identity(&wg(1)).map(|h| h.name.as_str()), Some("web"));

    // A retired key's chain does not outlive a newer admin statement for the same name: once
    // an admin signed db on its new key, a succession from the old key (stolen, say) to
    // another key gives that key nothing.
    let db_new = Signed::sign(host_on(new.public_key(), "db", "db", 2), &[&a]);
    let mut stolen = db.clone();
    stolen.successions = vec![Succession::sign(&old, evil.public_key(), rand_core::OsRng)];
    let r = st.absorb(&bundle(
        std::slice::from_ref(&g),
        None,
        vec![db_new, stolen],
    ));
    assert!(r.refused.is_empty(), "{:?}", r.refused);
    let thief = NetworkMap {
        version: 10,
        peers: vec![
            Arc::new(peer_on(new.public_key(), None, "db", signed.clone())),
            Arc::new(peer_on(evil.public_key(), None, "db2", signed.clone())),
        ],
    };
    let (out, refused) = st.filter(&wg(1), &thief);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(out.peers.len(), 1);
    assert_eq!(out.peers[0].public_key, new.public_key());
}

#[test]
fn succession_chains_are_bounded() {
    let a = key(1);
    let keys: Vec<_> = (0..=MAX_SUCCESSIONS as u8 + 1)
        .map(|i| x(100 + i))
        .collect();
    let mut s = Signed::sign(host_on(keys[0].public_key(), "db", "db", 1), &[&a]);
    for w in keys.windows(2) {
        s.successions
            .push(Succession::sign(&w[0], w[1].public_key(), rand_core::OsRng));
    }
    let (held, why) = s.host_keys();
    assert_eq!(held.len(), MAX_SUCCESSIONS + 1);
    assert_eq!(why, Some(SignError::TooManySuccessions));
}
