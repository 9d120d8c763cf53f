//! Whole-mesh scenarios on the in-process harness: coordinator state, agent sessions and
//! devices over fake links, virtual time, no root.

use std::time::Duration;

use meshd_testkit::fixtures::{self, labels, marked, policy};
use meshd_testkit::mesh::{HostIdx, Mesh, MeshConfig};

/// A mesh of `names` with `policy`, run until every agent follows its map.
fn mesh(names: &[(&str, &[(&str, &str)])], yaml: &str) -> (Mesh, Vec<HostIdx>) {
    let mut m = Mesh::new(MeshConfig::default()).unwrap();
    let idx: Vec<HostIdx> = names
        .iter()
        .map(|(n, l)| m.add_host(n, labels(l)).unwrap())
        .collect();
    m.apply_policy(yaml).unwrap();
    m.run_for(Duration::from_secs(1));
    for &h in &idx {
        assert!(m.host(h).is_connected(), "{} connected", m.host(h).name);
        assert_maps_current(&m, h);
    }
    (m, idx)
}

/// The host's session map and device peers are what the coordinator compiles for it now.
fn assert_maps_current(m: &Mesh, h: HostIdx) {
    let host = m.host(h);
    let want = m.expected_map(h);
    let have = host.session().map().cloned().unwrap_or_default();
    assert_eq!(have.peers, want.peers, "{}: session map", host.name);
    let peers = host.device().peers();
    assert_eq!(peers.len(), want.peers.len(), "{}: device peers", host.name);
    for p in &want.peers {
        let (spec, _) = &peers[&p.public_key];
        assert_eq!(
            *spec.grants, p.grants,
            "{}: grants towards {}",
            host.name, p.name
        );
        assert_eq!(spec.endpoint, p.endpoints.first().copied());
    }
}

#[test]
fn hosts_enrol_follow_maps_and_talk() {
    let (mut m, h) = mesh(&[("a", &[]), ("b", &[]), ("c", &[])], policy::ALLOW_ALL);
    let msg = marked(b"a->b");
    m.send_udp(h[0], h[1], 5000, &msg).unwrap();
    m.run_for(Duration::from_millis(50));
    let ka = m.host(h[0]).public_key();
    assert_eq!(m.host(h[1]).received(&ka, &msg), 1);
    assert_eq!(m.host(h[2]).inbox.len(), 0);
    assert!(m
        .net()
        .log()
        .iter()
        .all(|r| !fixtures::contains_marker(&r.payload)));
}

/// Sends `payload` from `a` to `b` and runs until it could have arrived.
fn ping(m: &mut Mesh, a: HostIdx, b: HostIdx, payload: &[u8]) -> usize {
    let before = m.host(b).received(&m.host(a).public_key(), payload);
    m.send_udp(a, b, 5000, payload).unwrap();
    m.run_for(Duration::from_millis(20));
    m.host(b).received(&m.host(a).public_key(), payload) - before
}

#[test]
fn ip_change_propagates_to_every_affected_host_and_traffic_follows() {
    let (mut m, h) = mesh(
        &[("a", &[]), ("b", &[]), ("c", &[]), ("d", &[("app", "db")])],
        // d peers with nobody: a's move is none of its business.
        "rules:\n  - {name: abc, from: {app: {exists: false}}, to: {app: {exists: false}}, ports: [any]}\n",
    );
    let (a, b, c, d) = (h[0], h[1], h[2], h[3]);
    for (x, y) in [(b, a), (c, a)] {
        assert_eq!(ping(&mut m, x, y, &marked(b"before")), 1);
    }
    let d_map = m.host(d).session().map().cloned();
    let start = m.now();
    let new = m.move_host(a);
    m.run_for(Duration::from_millis(100));
    for x in [b, c] {
        let peers = m.host(x).device().peers();
        let (spec, endpoint) = &peers[&m.host(a).public_key()];
        assert_eq!(
            spec.endpoint,
            Some(new),
            "{}'s map has a's new endpoint",
            m.host(x).name
        );
        assert_eq!(*endpoint, Some(new));
        assert_maps_current(&m, x);
    }
    assert_eq!(m.host(d).session().map().cloned(), d_map, "d got nothing");
    // a has sent nothing since it moved: b and c reach it at the new address from the map.
    for x in [b, c] {
        assert_eq!(ping(&mut m, x, a, &marked(b"after")), 1);
    }
    let old_seen = m
        .net()
        .log()
        .iter()
        .filter(|r| r.sent_at > start + Duration::from_millis(50) && r.to.ip() != new.ip())
        .filter(|r| r.to.ip() == "198.18.0.1".parse::<std::net::IpAddr>().unwrap())
        .count();
    assert_eq!(
        old_seen, 0,
        "nothing went to the old address once the maps moved"
    );
}

#[test]
fn quarantine_cuts_a_flow() {
    let (mut m, h) = mesh(&[("a", &[]), ("b", &[])], policy::ALLOW_ALL);
    let (a, b) = (h[0], h[1]);
    for i in 0..5u8 {
        assert_eq!(ping(&mut m, a, b, &marked(&[i])), 1);
        assert_eq!(ping(&mut m, b, a, &marked(&[i])), 1);
    }
    m.admin(|s, _| s.quarantine("b")).unwrap().unwrap();
    m.run_for(Duration::from_millis(50));
    assert!(m.host(a).device().peers().is_empty(), "b left a's table");
    assert!(m.host(b).device().peers().is_empty(), "b's own map emptied");
    let ka = m.host(a).public_key();
    let kb = m.host(b).public_key();
    let (to_b, to_a) = (m.host(b).inbox.len(), m.host(a).inbox.len());
    for i in 0..5u8 {
        assert!(m.send_udp(a, b, 5000, &marked(&[9, i])).is_err());
        assert!(m.send_udp(b, a, 5000, &marked(&[9, i])).is_err());
        m.run_for(Duration::from_millis(100));
    }
    assert_eq!(m.host(b).inbox.len(), to_b, "nothing more reached b");
    assert_eq!(m.host(a).inbox.len(), to_a, "nothing more reached a");
    m.admin(|s, _| s.release("b")).unwrap().unwrap();
    m.run_for(Duration::from_millis(50));
    assert_eq!(ping(&mut m, a, b, &marked(b"released")), 1);
    assert_eq!(m.host(b).received(&ka, &marked(b"released")), 1);
    assert_eq!(ping(&mut m, b, a, &marked(b"released")), 1);
    assert_eq!(m.host(a).received(&kb, &marked(b"released")), 1);
}

#[test]
fn an_expiring_grant_expires_while_the_coordinator_is_partitioned() {
    // The clock starts at 2023-11-14T22:13:20Z; the rule ends 100 s later.
    let expires = m_unix(100);
    let (mut m, h) = mesh(
        &[("a", &[]), ("b", &[])],
        &policy::allow_udp_until("2023-11-14T22:15:00Z"),
    );
    let (a, b) = (h[0], h[1]);
    assert_eq!(ping(&mut m, a, b, &marked(b"early")), 1);
    m.partition_coordinator();
    let deadline = m.clock().instant_of_unix_secs(expires);
    m.run_until(deadline - Duration::from_secs(1));
    assert_eq!(ping(&mut m, a, b, &marked(b"just before")), 1);
    m.run_until(deadline);
    assert!(!m.host(a).is_connected(), "the coordinator is out of reach");
    // The agents still hold the grant in their maps: enforcement expires it on its own.
    let grants = &m.host(a).session().map().unwrap().peers[0].grants;
    assert_eq!(grants.outbound[0].expires_at, Some(expires));
    let err = m.send_udp(a, b, 5000, &marked(b"late")).unwrap_err();
    assert!(format!("{err:?}").contains("Expired"), "{err:?}");
    m.run_for(Duration::from_millis(20));
    assert_eq!(
        m.host(b)
            .received(&m.host(a).public_key(), &marked(b"late")),
        0
    );
    assert_eq!(m.host(a).device().firewall_stats().expired, 1);
    // Healed: the agents reconnect and get maps without the expired peer.
    m.heal_coordinator();
    m.run_for(Duration::from_secs(15));
    for x in [a, b] {
        assert!(m.host(x).is_connected());
        assert!(m.expected_map(x).peers.is_empty());
        assert_maps_current(&m, x);
    }
}

/// The Unix seconds `s` after the harness clock's start.
fn m_unix(s: u64) -> u64 {
    meshd_testkit::time::UNIX_BASE_MS / 1000 + s
}

/// Receiver indices of data messages sent to `to` (bytes 4..8 of a type-4 message).
fn data_indices(m: &Mesh, to: std::net::SocketAddr) -> Vec<u32> {
    let mut v: Vec<u32> = m
        .net()
        .log()
        .iter()
        .filter(|r| r.to == to && r.payload.first() == Some(&4) && r.payload.len() > 32)
        .map(|r| u32::from_le_bytes(r.payload[4..8].try_into().unwrap()))
        .collect();
    v.dedup();
    v
}

#[test]
fn rekey_after_time_keeps_traffic_flowing() {
    let (mut m, h) = mesh(&[("a", &[]), ("b", &[])], policy::ALLOW_ALL);
    let (a, b) = (h[0], h[1]);
    let start = m.now();
    for i in 0..130u32 {
        let p = marked(&i.to_be_bytes());
        assert_eq!(ping(&mut m, a, b, &p), 1, "packet {i}");
        assert_eq!(ping(&mut m, b, a, &p), 1, "reply {i}");
        m.run_until(start + Duration::from_secs(u64::from(i) + 1));
    }
    let inits: Vec<_> = m
        .net()
        .log()
        .iter()
        .filter(|r| r.payload.first() == Some(&1))
        .map(|r| r.sent_at - start)
        .collect();
    assert_eq!(
        inits.len(),
        2,
        "the first handshake and one rekey: {inits:?}"
    );
    assert!(inits[1] >= Duration::from_secs(120), "{inits:?}");
    let to_b = data_indices(&m, m.host(b).addr());
    assert_eq!(to_b.len(), 2, "a's data moved to the new session: {to_b:?}");
    let to_a = data_indices(&m, m.host(a).addr());
    assert_eq!(to_a.len(), 2, "so did b's: {to_a:?}");
}

#[test]
fn roaming_peer_is_followed_without_the_coordinator() {
    let (mut m, h) = mesh(&[("a", &[]), ("b", &[])], policy::ALLOW_ALL);
    let (a, b) = (h[0], h[1]);
    assert_eq!(ping(&mut m, a, b, &marked(b"1")), 1);
    m.partition_coordinator();
    let old = m.host(a).addr();
    let new = m.move_host(a);
    m.run_for(Duration::from_millis(50));
    let ka = m.host(a).public_key();
    let spec_ep = |m: &Mesh| m.host(b).device().peers()[&ka].clone();
    assert_eq!(spec_ep(&m).1, Some(old), "b has not heard of the move");
    // b's packets to the old address are lost; a's authenticated packet from its new
    // address moves b's endpoint, and b's answers follow.
    assert_eq!(ping(&mut m, b, a, &marked(b"lost")), 0);
    assert_eq!(ping(&mut m, a, b, &marked(b"from new")), 1);
    assert_eq!(spec_ep(&m).1, Some(new));
    assert_eq!(spec_ep(&m).0.endpoint, Some(old), "the map still says old");
    assert_eq!(ping(&mut m, b, a, &marked(b"followed")), 1);
}

#[test]
fn coordinator_restart_restores_state_and_agents_resync_while_tunnels_run() {
    let (mut m, h) = mesh(
        &[
            ("a", &[("app", "app")]),
            ("b", &[("app", "db")]),
            ("c", &[("role", "ops")]),
        ],
        policy::APP_DB_UDP,
    );
    let (a, b, c) = (h[0], h[1], h[2]);
    assert_eq!(ping(&mut m, a, b, &marked(b"before")), 1);
    let hosts_before: Vec<_> = m.state().hosts().cloned().collect();
    m.stop_coordinator();
    m.run_for(Duration::from_millis(50));
    assert!(h.iter().all(|&x| !m.host(x).is_connected()));
    for i in 0..20u8 {
        assert_eq!(
            ping(&mut m, a, b, &marked(&[b'd', i])),
            1,
            "tunnels keep running"
        );
        m.run_for(Duration::from_millis(500));
    }
    m.start_coordinator().unwrap();
    assert_eq!(m.coordinator().restarts(), 1);
    let ids =
        |v: &[meshd_control::Host]| v.iter().map(|h| (h.id, h.name.clone())).collect::<Vec<_>>();
    let hosts_after: Vec<_> = m.state().hosts().cloned().collect();
    assert_eq!(ids(&hosts_after), ids(&hosts_before));
    assert!(m.state().policy().is_some(), "policy restored");
    m.run_for(Duration::from_secs(15));
    for &x in &h {
        let host = m.host(x);
        assert!(host.is_connected(), "{} reconnected", host.name);
        assert!(
            host.states
                .iter()
                .filter(|s| matches!(s, meshd_control::session::SessionState::Connected { .. }))
                .count()
                >= 2
        );
        assert_maps_current(&m, x);
    }
    // The restarted coordinator pushes changes again.
    m.admin(|s, _| s.set_labels("c", labels(&[("app", "app")])))
        .unwrap()
        .unwrap();
    m.run_for(Duration::from_millis(50));
    for &x in &h {
        assert_maps_current(&m, x);
    }
    assert_eq!(ping(&mut m, c, b, &marked(b"c is an app now")), 1);
    assert_eq!(ping(&mut m, a, b, &marked(b"after")), 1);
}

#[test]
fn the_receiver_enforces_its_own_map_against_a_peer_with_a_stale_one() {
    let (mut m, h) = mesh(&[("a", &[]), ("b", &[])], policy::ALLOW_ALL);
    let (a, b) = (h[0], h[1]);
    assert_eq!(ping(&mut m, a, b, &marked(b"open")), 1, "the flow is open");
    // a's control path is cut: it keeps its old map (any port) while b gets the new one.
    m.partition_control(a);
    m.apply_policy("rules:\n  - {name: dns, from: {}, to: {}, ports: [udp/53]}\n")
        .unwrap();
    m.run_for(Duration::from_millis(50));
    let ka = m.host(a).public_key();
    let kb = m.host(b).public_key();
    let rule = |m: &Mesh, x: HostIdx, peer| {
        m.host(x).device().peers()[&peer].0.grants.outbound[0]
            .rule
            .clone()
    };
    assert_eq!(rule(&m, a, kb), "all", "a still has the old map");
    assert_eq!(rule(&m, b, ka), "dns", "b has the new one");
    // a's outbound check passes on its stale map; b's inbound check on its own map refuses
    // the open flow (re-checked against the new table) and a new one alike.
    let denied = m.host(b).device().firewall_stats().default_deny;
    let revoked = m.host(b).device().firewall_stats().flows_revoked;
    for payload in [marked(b"open"), marked(b"stale")] {
        let before = m.host(b).received(&ka, &payload);
        m.send_udp(a, b, 5000, &payload).unwrap();
        m.run_for(Duration::from_millis(20));
        assert_eq!(m.host(b).received(&ka, &payload), before, "refused by b");
    }
    let stats = m.host(b).device().firewall_stats();
    assert_eq!(stats.default_deny, denied + 2);
    assert_eq!(
        stats.flows_revoked,
        revoked + 1,
        "the open flow was revoked"
    );
    // What both maps grant still passes.
    let before = m.host(b).received(&ka, &marked(b"dns"));
    m.send_udp(a, b, 53, &marked(b"dns")).unwrap();
    m.run_for(Duration::from_millis(20));
    assert_eq!(m.host(b).received(&ka, &marked(b"dns")), before + 1);
    m.heal_control(a);
    m.run_for(Duration::from_millis(50));
    assert_eq!(rule(&m, a, kb), "dns", "a caught up");
    assert!(
        m.send_udp(a, b, 5000, &marked(b"late")).is_err(),
        "now a refuses it itself"
    );
}
