//! What the host decides, in process: no root, no sockets, time passed in.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt as _;

use meshd_config::{Config, Mode};
use meshd_control::map::Peer as MapPeer;
use meshd_control::NetworkMap;
use meshd_hostnet::Blocked;
use meshd_policy::{Grant, PeerGrants, Proto};
use meshd_tunnel::{PrivateKey, PublicKey, TableError};

use super::fake::{host, table};
use crate::source::coordinator::map_update;
use crate::source::static_file::{update_from, StaticFile};
use crate::source::PeerSource as _;

fn key(n: u8) -> PublicKey {
    PrivateKey::from_bytes([n; 32]).public_key()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A static config with db1 (one endpoint) and web (IPv4 and IPv6 overlay addresses).
fn config_text(mode: &str, extra_peer: &str) -> String {
    format!(
        r#"
[interface]
name = "mesh0"
private_key_file = "host.key"
address = "100.64.0.1/10"
mode = "{mode}"

[[peer]]
name = "db1"
public_key = "{k2}"
endpoint = "198.18.0.2:51820"
allowed_ips = "100.64.0.2/32"
persistent_keepalive = 25
labels = {{ app = "db1" }}

[[peer]]
name = "web"
public_key = "{k3}"
endpoint = "198.18.0.3:51820"
allowed_ips = ["100.64.0.3/32", "fd7a::3/128"]
persistent_keepalive = 25
labels = {{ app = "web" }}
{extra_peer}"#,
        k2 = key(2).to_base64(),
        k3 = key(3).to_base64(),
    )
}

fn config(mode: &str) -> Config {
    Config::parse(&config_text(mode, ""), "/etc/meshd/meshd.toml").unwrap()
}

/// The network map a coordinator would send for the same two peers.
fn map(version: u64) -> NetworkMap {
    let peer = |name: &str, k: u8, addrs: &[&str], ep: &str| MapPeer {
        name: name.into(),
        public_key: key(k),
        addresses: addrs.iter().map(|a| ip(a)).collect(),
        endpoints: vec![ep.parse().unwrap()],
        labels: [("app".to_string(), name.to_string())].into(),
        grants: PeerGrants::allow_all("static-peer"),
        transparent: true,
        next_public_key: None,
    };
    NetworkMap {
        version,
        peers: [
            peer("db1", 2, &["100.64.0.2"], "198.18.0.2:51820"),
            peer("web", 3, &["100.64.0.3", "fd7a::3"], "198.18.0.3:51820"),
        ]
        .map(std::sync::Arc::new)
        .into(),
    }
}

fn host_info() -> meshd_control::proto::HostInfo {
    meshd_control::proto::HostInfo {
        id: meshd_control::model::HostId(1),
        name: "self".into(),
        public_key: key(1),
        addresses: vec![ip("100.64.0.1")],
        networks: vec!["100.64.0.0/10".parse().unwrap()],
        labels: Default::default(),
    }
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[tokio::test]
async fn a_static_source_and_a_map_give_the_same_host_state() {
    let own = ["198.18.0.1/24"];
    let mut from_file = host(Mode::Transparent, &own);
    let mut from_map = host(Mode::Transparent, &own);
    from_file
        .host
        .apply(update_from(&config("transparent"), 0).unwrap(), 0)
        .await
        .unwrap();
    from_map
        .host
        .apply(map_update(&map(1), &host_info()), 0)
        .await
        .unwrap();
    let t = sorted(table(&from_file.device));
    assert_eq!(t, sorted(table(&from_map.device)));
    // The underlay addresses joined the overlay ones in the allowed IPs.
    assert!(t[0].contains("[100.64.0.2/32 198.18.0.2/32]"), "{t:?}");
    assert!(
        t[1].contains("[100.64.0.3/32 198.18.0.3/32 fd7a::3/128]"),
        "{t:?}"
    );
    let (a, b) = (from_file.seen.borrow(), from_map.seen.borrow());
    assert_eq!(a.plans, b.plans);
    assert_eq!(a.plans.len(), 1);
    assert_eq!(
        a.plans[0].0.len(),
        2,
        "two underlay routes: {:?}",
        a.plans[0]
    );
    assert_eq!(a.route_syncs, b.route_syncs);
    let want: Vec<ipnet::IpNet> = ["100.64.0.2/32", "100.64.0.3/32", "fd7a::3/128"]
        .iter()
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(a.route_syncs, vec![want], "overlay routes only");
    let protected = from_file.protected.lock().unwrap().clone();
    assert_eq!(protected, ["198.18.0.2 (db1)", "198.18.0.3 (web)"]);
    assert_eq!(protected, *from_map.protected.lock().unwrap());
    // Our own underlay address is a local destination now.
    assert!(from_file.device.destinations().accepts(ip("198.18.0.1")));
    assert!(from_map.device.destinations().accepts(ip("198.18.0.1")));
    assert_eq!(
        from_file.host.sink.directory.peers[&key(2)],
        from_map.host.sink.directory.peers[&key(2)]
    );
}

#[tokio::test]
async fn overlay_mode_plans_nothing_transparent() {
    let mut h = host(Mode::Overlay, &["198.18.0.1/24"]);
    h.host
        .apply(update_from(&config("overlay"), 0).unwrap(), 0)
        .await
        .unwrap();
    let t = sorted(table(&h.device));
    assert!(t[0].contains("[100.64.0.2/32]"), "{t:?}");
    assert!(h.seen.borrow().plans.is_empty());
    assert!(!h.device.destinations().accepts(ip("198.18.0.1")));
    assert!(h.protected.lock().unwrap().is_empty());
    assert_eq!(h.seen.borrow().route_syncs.len(), 1);
}

#[tokio::test]
async fn a_refused_table_keeps_the_running_peers_routes_and_plan() {
    let mut h = host(Mode::Transparent, &["198.18.0.1/24"]);
    h.host
        .apply(map_update(&map(1), &host_info()), 0)
        .await
        .unwrap();
    let before = table(&h.device);
    let protected = h.protected.lock().unwrap().clone();
    let mut bad = map(2);
    std::sync::Arc::make_mut(&mut bad.peers[1]).public_key = key(2);
    std::sync::Arc::make_mut(&mut bad.peers[1]).name = "impostor".into();
    let e = h
        .host
        .apply(map_update(&bad, &host_info()), 0)
        .await
        .unwrap_err();
    assert_eq!(e, TableError::DuplicateKey("impostor".into()));
    assert_eq!(table(&h.device), before);
    assert_eq!(*h.protected.lock().unwrap(), protected);
    let counts = |h: &super::fake::TestHost| {
        let seen = h.seen.borrow();
        (seen.route_syncs.len(), seen.plans.len())
    };
    assert_eq!(counts(&h), (1, 1));
    assert_eq!(h.host.sink.directory.peers[&key(2)].0, "db1");
    // The re-plan of the next tick still works from the accepted update.
    h.host.tick(1_000).await;
    assert_eq!(table(&h.device), before);
    assert_eq!(counts(&h), (2, 2));
}

#[tokio::test]
async fn grant_expiry_uncovers_ports_on_the_tick() {
    let mut h = host(Mode::Transparent, &["198.18.0.1/24"]);
    let mut m = map(1);
    std::sync::Arc::make_mut(&mut m.peers[0]).grants = PeerGrants {
        deny: Default::default(),
        learn: false,
        outbound: vec![],
        inbound: vec![Grant {
            proto: Proto::Tcp,
            ports: (1521, 1521),
            expires_at: Some(1_000),
            rule: "r".into(),
        }],
    };
    std::sync::Arc::make_mut(&mut m.peers[1]).grants = PeerGrants::default();
    h.host
        .apply(map_update(&m, &host_info()), 999)
        .await
        .unwrap();
    let covered = |h: &super::fake::TestHost| h.seen.borrow().plans.last().unwrap().1.clone();
    assert_eq!(covered(&h).tcp, vec![(1521, 1521)]);
    h.host.tick(999_500).await;
    assert_eq!(covered(&h).tcp, vec![(1521, 1521)]);
    h.host.tick(1_000_000).await;
    assert!(covered(&h).tcp.is_empty(), "{:?}", covered(&h));
}

#[tokio::test]
async fn own_address_changes_re_plan() {
    let mut h = host(Mode::Transparent, &["198.18.0.1/24"]);
    h.host
        .apply(map_update(&map(1), &host_info()), 0)
        .await
        .unwrap();
    assert!(
        !h.host
            .set_own_addresses(vec!["198.18.0.1/24".parse().unwrap()], 0)
            .await
    );
    assert_eq!(
        h.seen.borrow().plans.len(),
        1,
        "same addresses: nothing to do"
    );
    // db1's address is ours now: no longer routed or protected, and a local destination.
    assert!(
        h.host
            .set_own_addresses(vec!["198.18.0.2/24".parse().unwrap()], 0)
            .await
    );
    assert_eq!(h.host.own_addresses(), ["198.18.0.2/24".parse().unwrap()]);
    assert_eq!(*h.protected.lock().unwrap(), ["198.18.0.3 (web)"]);
    assert!(h.device.destinations().accepts(ip("198.18.0.2")));
    assert!(!h.device.destinations().accepts(ip("198.18.0.1")));
    let t = sorted(table(&h.device));
    assert!(t[0].contains("[100.64.0.2/32]"), "{t:?}");
}

#[tokio::test]
async fn plaintext_drops_become_block_events_naming_the_peer() {
    let mut h = host(Mode::Transparent, &["198.18.0.1/24"]);
    h.host
        .apply(update_from(&config("transparent"), 0).unwrap(), 0)
        .await
        .unwrap();
    h.seen.borrow_mut().drops = vec![
        Blocked {
            src: ip("198.18.0.3"),
            proto: meshd_hostnet::Proto::Tcp,
            port: 5432,
            packets: 2,
        },
        Blocked {
            src: ip("198.18.0.77"),
            proto: meshd_hostnet::Proto::Udp,
            port: 53,
            packets: 1,
        },
    ];
    let events = h.host.tick(5_000).await;
    assert_eq!(events.len(), 2);
    assert_eq!(
        (events[0].host.as_str(), events[0].peer.as_str()),
        ("self", "web")
    );
    assert_eq!(events[0].peer_labels["app"], "web");
    assert_eq!(events[0].at, 5);
    assert_eq!(events[1].peer, "outside-mesh");
    let log = std::fs::read_to_string(h.dir.path().join("blocks.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 2, "{log}");
    assert!(log.contains("\"peer\":\"web\""), "{log}");
}

#[tokio::test]
async fn refusal_clears_the_peers_and_stop_removes_host_state() {
    let mut h = host(Mode::Transparent, &[]);
    h.host
        .apply(map_update(&map(1), &host_info()), 0)
        .await
        .unwrap();
    assert_eq!(table(&h.device).len(), 2);
    h.host.clear_peers();
    assert!(table(&h.device).is_empty());
    let seen = h.seen.clone();
    h.host.stop().await;
    assert!(seen.borrow().routes_cleared && seen.borrow().guard_stopped);
}

/// Writes a static config (and its key) into `dir`.
fn write_config(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("meshd.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn a_refused_reload_keeps_the_running_peers() {
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("host.key");
    meshd_config::write_private_key(&key_path, &PrivateKey::from_bytes([1; 32])).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let path = write_config(dir.path(), &config_text("overlay", ""));
    let (mut source, setup, first) =
        StaticFile::open(&path, &state, false, std::time::Duration::ZERO).unwrap();
    assert_eq!(setup.mode, Mode::Overlay);
    assert_eq!(setup.host, "self");
    let mut h = host(Mode::Overlay, &[]);
    let outcome = h.host.apply(first, 0).await;
    source.applied(outcome.as_ref()).unwrap();
    let running = table(&h.device);
    assert_eq!(running.len(), 2);

    // Policy tests that fail: refused, nothing to apply.
    let failing = "policy = '''\nrules: []\ntests:\n  - { from: { app: web }, to: { app: db1 }, port: tcp/1, expect: allow }\n'''\n";
    let text = config_text("overlay", "").replace(
        "mode = \"overlay\"\n",
        &format!("mode = \"overlay\"\n{failing}"),
    );
    write_config(dir.path(), &text);
    assert!(source.reload().is_none());
    // Not TOML: refused too.
    write_config(dir.path(), "[interface\n");
    assert!(source.reload().is_none());
    assert_eq!(table(&h.device), running);

    // A good file with a third peer goes through.
    let third = format!(
        "\n[[peer]]\nname = \"cache\"\npublic_key = \"{}\"\nallowed_ips = \"100.64.0.4/32\"\n",
        key(4).to_base64()
    );
    write_config(dir.path(), &config_text("overlay", &third));
    let update = source.reload().expect("a valid reload");
    let outcome = h.host.apply(update, 0).await;
    source.applied(outcome.as_ref()).unwrap();
    assert_eq!(table(&h.device).len(), 3);
    assert_eq!(h.host.sink.directory.host, "self");
}

#[test]
fn a_refused_first_table_stops_a_static_host_but_a_refused_reload_does_not() {
    let dir = tempfile::tempdir().unwrap();
    meshd_config::write_private_key(
        dir.path().join("host.key"),
        &PrivateKey::from_bytes([1; 32]),
    )
    .unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let path = write_config(dir.path(), &config_text("overlay", ""));
    let (mut source, ..) =
        StaticFile::open(&path, &state, true, std::time::Duration::ZERO).unwrap();
    let refused = TableError::DuplicateKey("db1".into());
    assert!(source.applied(Err(&refused)).is_err());
    assert!(source.reload().is_some());
    assert!(source.applied(Err(&refused)).is_ok());
}

#[tokio::test]
async fn a_wg_set_reaches_the_device_through_the_static_source_like_a_reload() {
    use crate::uapi::proto::{parse_request, to_hex, Request};
    use crate::uapi::{DeviceFacts, Errno};
    let dir = tempfile::tempdir().unwrap();
    let private = PrivateKey::from_bytes([1; 32]);
    meshd_config::write_private_key(dir.path().join("host.key"), &private).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let path = write_config(dir.path(), &config_text("overlay", ""));
    let (mut source, setup, first) =
        StaticFile::open(&path, &state, false, std::time::Duration::ZERO).unwrap();
    assert_eq!(
        setup.uapi_dir,
        std::path::PathBuf::from("/var/run/wireguard")
    );
    let mut h = host(Mode::Overlay, &[]);
    let outcome = h.host.apply(first, 0).await;
    source.applied(outcome.as_ref()).unwrap();
    let facts = DeviceFacts {
        private_key: private.to_bytes(),
        public_key: private.public_key(),
        listen_port: 51820,
        fwmark: None,
    };
    let set = |text: String| match parse_request(&format!("set=1\n{text}\n")) {
        Ok(Request::Set(s)) => s,
        other => panic!("{other:?}"),
    };
    // `wg set mesh0 peer K4 allowed-ips 100.64.0.4/32 endpoint 198.18.0.4:51820`
    let add = set(format!(
        "public_key={}\nendpoint=198.18.0.4:51820\nreplace_allowed_ips=true\nallowed_ip=100.64.0.4/32\n",
        to_hex(&key(4).0)
    ));
    let e = super::uapi_set(&mut h.host, &mut source, &add, &facts, 0)
        .await
        .unwrap();
    assert_eq!(e, Errno::OK);
    let t = table(&h.device);
    assert_eq!(t.len(), 3, "{t:?}");
    assert!(
        t[2].starts_with(&format!(
            "{} {} Some(198.18.0.4:51820) [100.64.0.4/32]",
            key(4).to_base64(),
            key(4)
        )),
        "{t:?}"
    );
    // Static mode without a policy: the new peer is allowed both ways, like a listed one.
    assert_eq!(
        h.device.table().peers()[2].spec().grants,
        h.device.table().peers()[0].spec().grants
    );
    let last_routes = h.seen.borrow().route_syncs.last().cloned().unwrap();
    assert!(
        last_routes.contains(&"100.64.0.4/32".parse().unwrap()),
        "{last_routes:?}"
    );
    // A later set starts from the running peers (the added one stays).
    let rm = set(format!("public_key={}\nremove=true\n", to_hex(&key(2).0)));
    assert_eq!(
        super::uapi_set(&mut h.host, &mut source, &rm, &facts, 0)
            .await
            .unwrap(),
        Errno::OK
    );
    let names: Vec<String> = h
        .device
        .table()
        .peers()
        .iter()
        .map(|p| p.spec().name)
        .collect();
    assert_eq!(names, vec!["web".to_string(), key(4).to_base64()]);
    // Another private key or port: refused, nothing changes.
    let before = table(&h.device);
    let port = set(format!("listen_port=1\npublic_key={}\n", to_hex(&key(5).0)));
    assert_eq!(
        super::uapi_set(&mut h.host, &mut source, &port, &facts, 0)
            .await
            .unwrap(),
        Errno::EOPNOTSUPP
    );
    assert_eq!(table(&h.device), before);
    // A reload goes back to the file.
    let update = source.reload().unwrap();
    let outcome = h.host.apply(update, 0).await;
    source.applied(outcome.as_ref()).unwrap();
    assert_eq!(table(&h.device).len(), 2);
}

#[tokio::test]
async fn a_collected_interval_gives_flow_records_by_peer_key_verdict_and_rule() {
    use meshd_control::flow::FlowVerdict;
    use meshd_firewall::build;
    use meshd_firewall::tcp_flags::{ACK, SYN};
    use meshd_policy::Direction;
    let mut h = host(Mode::Overlay, &["198.18.0.1/24"]);
    let mut m = map(1);
    // db1: we may open tcp/5432. web: nothing granted, but learning mode.
    std::sync::Arc::make_mut(&mut m.peers[0]).grants = PeerGrants {
        deny: Default::default(),
        learn: false,
        outbound: vec![Grant {
            proto: Proto::Tcp,
            ports: (5432, 5432),
            expires_at: None,
            rule: "app-db".into(),
        }],
        inbound: vec![],
    };
    std::sync::Arc::make_mut(&mut m.peers[1]).grants = PeerGrants {
        learn: true,
        ..PeerGrants::default()
    };
    h.host.apply(map_update(&m, &host_info()), 0).await.unwrap();
    let table = h.device.table();
    let (db1, web) = (table.get(&key(2)).unwrap(), table.get(&key(3)).unwrap());
    let fw = h.host.enforcement.clone();
    let v = table.version;
    // Real time: the block log drains denials by the wall clock.
    let t = meshd_time::unix_millis() - 5_000;
    assert!(
        h.host.collect_flows(t).is_none(),
        "the first call starts the interval"
    );
    let (me, d, w) = (ip("100.64.0.1"), ip("100.64.0.2"), ip("100.64.0.3"));
    let out = Direction::Outbound;
    let syn = build::tcp(me, 40000, d, 5432, SYN);
    let back = build::tcp(d, 5432, me, 40000, SYN | ACK);
    assert!(fw.allow(db1, &db1.grants(), v, out, &syn, t));
    assert!(fw.allow(db1, &db1.grants(), v, Direction::Inbound, &back, t + 1));
    // Denied: db1 has no ssh grant (twice, folded).
    let ssh = build::tcp(me, 40001, d, 22, SYN);
    assert!(!fw.allow(db1, &db1.grants(), v, out, &ssh, t + 2));
    assert!(!fw.allow(db1, &db1.grants(), v, out, &ssh, t + 3));
    // Learning mode: web's inbound ssh passes, as would-deny.
    let in_ssh = build::tcp(w, 50000, me, 22, SYN);
    assert!(fw.allow(web, &web.grants(), v, Direction::Inbound, &in_ssh, t + 4));
    assert_eq!(fw.firewall.stats().would_deny, 1);
    h.host.tick(t + 1_000).await;
    assert!(
        h.host.collect_flows(t + 9_999).is_none(),
        "interval not over"
    );
    let batch = h.host.collect_flows(t + 10_000).expect("an interval");
    assert_eq!(batch.interval_start, t / 1000);
    assert_eq!(batch.overflow, 0);
    let r = &batch.records;
    assert_eq!(r.len(), 3, "{r:#?}");
    let allowed = r
        .iter()
        .find(|r| r.verdict == FlowVerdict::Allowed)
        .unwrap();
    assert_eq!(
        (allowed.peer, allowed.direction, allowed.proto, allowed.port),
        (key(2), out, 6, 5432)
    );
    assert_eq!(allowed.rule.as_deref(), Some("app-db"));
    assert_eq!((allowed.packets, allowed.flows), (2, 1));
    assert_eq!(allowed.bytes, (syn.len() + back.len()) as u64);
    assert_eq!(
        (allowed.first_seen, allowed.last_seen),
        (t / 1000, (t + 1) / 1000)
    );
    let denied = r.iter().find(|r| r.verdict == FlowVerdict::Denied).unwrap();
    assert_eq!((denied.peer, denied.port, denied.packets), (key(2), 22, 2));
    assert_eq!(denied.rule, None);
    let learned = r
        .iter()
        .find(|r| r.verdict == FlowVerdict::WouldDeny)
        .unwrap();
    assert_eq!(
        (
            learned.peer,
            learned.direction,
            learned.port,
            learned.packets
        ),
        (key(3), Direction::Inbound, 22, 1)
    );
    // `meshd status` shows the interval's counts.
    let st = h.host.flow_status();
    assert_eq!(st.records.load(std::sync::atomic::Ordering::Relaxed), 3);
    assert_eq!(st.intervals.load(std::sync::atomic::Ordering::Relaxed), 1);
    // The next interval has only what is new.
    assert!(fw.allow(db1, &db1.grants(), v, out, &syn, t + 10_001));
    let next = h.host.collect_flows(t + 20_000).unwrap();
    assert_eq!(next.records.len(), 1);
    assert_eq!(next.records[0].packets, 1);
}

#[tokio::test]
async fn flow_records_are_capped_with_an_overflow_count_and_plaintext_drops_count() {
    let mut h = host(Mode::Transparent, &["198.18.0.1/24"]);
    h.host.flows = Some(crate::flows::FlowCollector::new(
        meshd_config::FlowSettings {
            max_records: 2,
            ..Default::default()
        },
    ));
    h.host
        .apply(update_from(&config("transparent"), 0).unwrap(), 0)
        .await
        .unwrap();
    let t = 1_000_000;
    assert!(h.host.collect_flows(t).is_none());
    let drop = |src: &str, port: u16| Blocked {
        src: ip(src),
        proto: meshd_hostnet::Proto::Tcp,
        port,
        packets: 2,
    };
    h.seen.borrow_mut().drops = vec![drop("198.18.0.77", 5432), drop("198.18.0.77", 5432)];
    h.host.tick(t + 1_000).await;
    h.seen.borrow_mut().drops = vec![drop("198.18.0.78", 22), drop("198.18.0.79", 22)];
    h.host.tick(t + 2_000).await;
    let batch = h.host.collect_flows(t + 10_000).unwrap();
    assert_eq!(batch.plaintext.len(), 2);
    assert_eq!(batch.plaintext[0].src, ip("198.18.0.77"));
    assert_eq!(batch.plaintext[0].packets, 4);
    assert_eq!(batch.overflow, 1);
    // Off: nothing is collected.
    h.host.flows = None;
    assert!(h.host.collect_flows(t + 100_000).is_none());
}
