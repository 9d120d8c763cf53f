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
        assert_eq!(*spec.grants, p.grants, "{}: grants towards {}", host.name, p.name);
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
    assert!(m.net().log().iter().all(|r| !fixtures::contains_marker(&r.payload)));
}
