//! Key rotation in the state: request, proof, next key in peers' maps, the switch on
//! reconnect, old key gone, time-outs, the automatic period.

use super::*;
use crate::rotation::{Nonce, RotationGroup, RotationSchedule, SWITCH_GRACE};

/// h1 and h2 connected, allow-all, maps drained; h2's map as the agent holds it.
fn two() -> (CoordinatorState, NetworkMap) {
    let mut s = st();
    s.create_token(0, TokenSpec::default(), hash_secret(b"t"))
        .unwrap();
    enrol(&mut s, 1, b"t").unwrap();
    enrol(&mut s, 2, b"t").unwrap();
    allow_all(&mut s);
    let m = maps(&mut s);
    let CoordinatorMessage::FullMap { map } = m[&HostId(2)].clone() else {
        panic!("full map first")
    };
    (s, map)
}

fn apply(map: &mut NetworkMap, m: Option<&CoordinatorMessage>) {
    match m {
        Some(CoordinatorMessage::Delta { delta }) => map.apply(delta).unwrap(),
        Some(CoordinatorMessage::FullMap { map: full }) => *map = full.clone(),
        _ => {}
    }
}

fn kinds(s: &mut CoordinatorState) -> Vec<String> {
    s.poll_rotation_events()
        .into_iter()
        .map(|e| e.kind.to_string())
        .collect()
}

#[test]
fn rotation_request_proof_switch_and_old_key_gone() {
    let (mut s, mut m2) = two();
    let nonce = Nonce([1; 32]);
    s.start_key_rotation(10, "h1", nonce).unwrap();
    assert!(matches!(
        s.start_key_rotation(10, "h1", nonce),
        Err(AdminError::KeyRotation(_))
    ));
    let out = maps(&mut s);
    assert_eq!(
        out.get(&HostId(1)),
        Some(&CoordinatorMessage::RotateKey { nonce })
    );
    // A wrong nonce is a protocol error; a bad proof ends the rotation.
    assert_eq!(
        s.key_proposal(
            11,
            HostId(1),
            ConnId(1),
            prop(Nonce([2; 32]), key(9), true, None)
        ),
        Err(ErrorCode::Malformed)
    );
    s.key_proposal(11, HostId(1), ConnId(1), prop(nonce, key(9), true, None))
        .unwrap();
    let pushes = s.poll_pushes();
    let dirty = s.take_dirty();
    // Store first: the pending key is in this batch's records.
    assert_eq!(
        dirty
            .hosts
            .iter()
            .find(|h| h.id == HostId(1))
            .unwrap()
            .pending_key,
        Some(key(9))
    );
    // h2 learns h1's next key before h1 is told to switch (same batch, maps first).
    let order: Vec<(HostId, &'static str)> = pushes
        .iter()
        .map(|p| {
            let k = match &p.message {
                CoordinatorMessage::Delta { .. } => "delta",
                CoordinatorMessage::KeyAccepted { .. } => "accepted",
                _ => "other",
            };
            (p.host, k)
        })
        .collect();
    let accepted = order.iter().position(|o| o.1 == "accepted").unwrap();
    let delta2 = order
        .iter()
        .position(|o| *o == (HostId(2), "delta"))
        .unwrap();
    assert!(delta2 < accepted, "{order:?}");
    let to2 = pushes
        .iter()
        .find(|p| p.host == HostId(2))
        .map(|p| &p.message);
    apply(&mut m2, to2);
    let p1 = m2.peer(&key(1)).unwrap();
    assert_eq!(p1.next_public_key, Some(key(9)));
    assert_eq!(
        crate::specs::peer_specs(&m2)
            .iter()
            .find(|sp| sp.public_key == key(1))
            .unwrap()
            .next_key,
        Some(key(9))
    );

    // h1 switches: closes, reconnects with the new key.
    s.disconnect(12, HostId(1), ConnId(1));
    let info = s
        .connect(
            12,
            key(9),
            ConnId(91),
            IpAddr::from([198, 51, 100, 1]),
            Hello::Resume { endpoints: ep(1) },
        )
        .unwrap();
    assert_eq!((info.id, info.public_key), (HostId(1), key(9)));
    let out = maps(&mut s);
    apply(&mut m2, out.get(&HostId(2)));
    assert!(
        m2.peer(&key(1)).is_none(),
        "old key gone from the peer's map"
    );
    let p1 = m2.peer(&key(9)).unwrap();
    assert_eq!((p1.name.as_str(), p1.next_public_key), ("h1", None));
    assert_eq!(m2.peers.len(), 1);
    let h1 = s.host(HostId(1)).unwrap();
    assert_eq!(
        (h1.public_key, h1.pending_key, h1.key_rotated_at),
        (key(9), None, Some(12))
    );
    assert_eq!(
        kinds(&mut s),
        [
            "key_rotation_started",
            "key_rotation_proved",
            "host_key_rotated"
        ]
    );
    // The old key is nobody now.
    s.disconnect(13, HostId(1), ConnId(91));
    assert_eq!(
        s.connect(
            13,
            key(1),
            ConnId(92),
            IpAddr::from([198, 51, 100, 1]),
            Hello::Resume { endpoints: ep(1) }
        ),
        Err(ErrorCode::UnknownHost)
    );
}

#[test]
fn rotation_of_an_offline_host_is_refused_and_a_stuck_one_aborts() {
    let (mut s, mut m2) = two();
    s.disconnect(5, HostId(1), ConnId(1));
    assert!(matches!(
        s.start_key_rotation(5, "h1", Nonce([1; 32])),
        Err(AdminError::KeyRotation(m)) if m.contains("not connected")
    ));
    // h2 rotates but never comes back with its key: after the grace, h1 drops it.
    let mut s2 = s;
    let _ = maps(&mut s2);
    s2.start_key_rotation(10, "h2", Nonce([3; 32])).unwrap();
    s2.key_proposal(
        10,
        HostId(2),
        ConnId(2),
        prop(Nonce([3; 32]), key(8), true, None),
    )
    .unwrap();
    let _ = maps(&mut s2);
    assert_eq!(s2.rotation_timeout(), Some(10 + SWITCH_GRACE + 1));
    s2.handle_rotation_timeout(10 + SWITCH_GRACE + 1, || Nonce([0; 32]));
    assert_eq!(s2.host(HostId(2)).unwrap().pending_key, None);
    let m1 = s2.full_map_for(HostId(1), 0);
    assert_eq!(m1.peers.len(), 1);
    assert_eq!(
        (m1.peers[0].public_key, m1.peers[0].next_public_key),
        (key(2), None)
    );
    assert!(kinds(&mut s2).contains(&"key_rotation_aborted".to_string()));
    // The new key was never made valid.
    s2.disconnect(11, HostId(2), ConnId(2));
    assert_eq!(
        s2.connect(
            11,
            key(8),
            ConnId(80),
            IpAddr::from([1, 1, 1, 1]),
            Hello::Resume { endpoints: ep(1) }
        ),
        Err(ErrorCode::UnknownHost)
    );
    let _ = &mut m2;
}

#[test]
fn the_period_starts_rotations_of_due_connected_hosts() {
    let (mut s, _) = two();
    s.set_labels("h1", [("env".into(), "prod".into())].into())
        .unwrap();
    let _ = maps(&mut s);
    s.set_rotation_schedule(RotationSchedule {
        default: None,
        groups: vec![RotationGroup {
            selector: [("env".to_string(), "prod".to_string())].into(),
            period: 3600,
        }],
    });
    // Enrolled at 100: not due at 3699, due at 3700; only h1 is in the group.
    s.handle_rotation_timeout(3699, || Nonce([1; 32]));
    assert!(maps(&mut s).is_empty());
    s.handle_rotation_timeout(3700, || Nonce([1; 32]));
    let out = maps(&mut s);
    assert_eq!(out.len(), 1);
    assert!(matches!(
        out.get(&HostId(1)),
        Some(CoordinatorMessage::RotateKey { .. })
    ));
}
