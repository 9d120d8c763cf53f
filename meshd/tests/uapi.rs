//! End-to-end tests of the WireGuard userspace API: the real `wg` (wireguard-tools) against
//! meshd in lab namespaces. Every lab host has its own `uapi_dir` (the directory is shared by
//! all namespaces); `wg` only looks in /var/run/wireguard, so it runs in a private mount
//! namespace with the host's directory bound there.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::*;
use meshd_lab::{wait_for, Host, Lab};

/// Runs `wg ARGS` in `host`'s namespace, seeing `dir` as /var/run/wireguard.
fn wg(host: &Host, dir: &Path, args: &[&str]) -> Output {
    let script = format!(
        "mount --bind '{}' /run/wireguard && exec wg \"$@\"",
        dir.display()
    );
    let mut all = vec!["-m", "sh", "-c", &script, "wg"];
    all.extend_from_slice(args);
    host.exec("unshare", all).unwrap()
}

fn wg_ok(host: &Host, dir: &Path, args: &[&str]) -> String {
    let out = wg(host, dir, args);
    assert!(
        out.status.success(),
        "wg {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// One peer line of `wg show IF dump`.
#[derive(Debug)]
struct DumpPeer {
    public_key: String,
    endpoint: Option<String>,
    allowed_ips: Vec<String>,
    latest_handshake: u64,
    rx: u64,
    tx: u64,
    keepalive: Option<u16>,
}

/// `wg show IF dump`: (private key, public key, listen port, fwmark) and the peers.
fn parse_dump(text: &str) -> ((String, String, u16, String), Vec<DumpPeer>) {
    let mut lines = text.lines();
    let f: Vec<&str> = lines.next().unwrap().split('\t').collect();
    assert_eq!(f.len(), 4, "{text}");
    let iface = (
        f[0].to_string(),
        f[1].to_string(),
        f[2].parse().unwrap(),
        f[3].to_string(),
    );
    let peers = lines
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 8, "{l}");
            let mut ips: Vec<String> = match f[3] {
                "(none)" => vec![],
                s => s.split(',').map(String::from).collect(),
            };
            ips.sort();
            DumpPeer {
                public_key: f[0].into(),
                endpoint: (f[2] != "(none)").then(|| f[2].to_string()),
                allowed_ips: ips,
                latest_handshake: f[4].parse().unwrap(),
                rx: f[5].parse().unwrap(),
                tx: f[6].parse().unwrap(),
                keepalive: (f[7] != "off").then(|| f[7].parse().unwrap()),
            }
        })
        .collect();
    (iface, peers)
}

fn status_peer<'a>(s: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    s["peers"]
        .as_array()?
        .iter()
        .find(|p| p["public_key"] == key)
}

#[test]
fn wg_show_matches_meshd_status_and_wg_set_adds_a_peer() {
    meshd_lab::require_root!();
    let lab = Lab::new("uapi-static", 3).unwrap();
    let (a, b) = (Node::new(&lab, 0), Node::new(&lab, 1));
    a.write_config(&lab, &[(&b, true)], "persistent_keepalive = 25\n");
    b.write_config(&lab, &[(&a, true)], "");
    let pa = a.start(&lab);
    let _pb = b.start(&lab);
    let (ha, hb) = (lab.host(0), lab.host(1));
    assert!(
        wait_ping(ha, overlay(1).into(), Duration::from_secs(10)),
        "tunnel never came up"
    );
    assert!(wait_ping(hb, overlay(0).into(), Duration::from_secs(5)));
    let sock = a.uapi_dir().join("mesh0.sock");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&sock), 0o600);
    assert_eq!(mode(&a.uapi_dir()), 0o755);

    // `wg show mesh0 dump` against `meshd status --json`.
    let dump = wg_ok(ha, &a.uapi_dir(), &["show", "mesh0", "dump"]);
    let status = status_json(ha).unwrap();
    let ((private, public, port, fwmark), peers) = parse_dump(&dump);
    assert_eq!(private, a.key.to_base64());
    assert_eq!(public, status["public_key"]);
    assert_eq!(u64::from(port), status["listen_port"].as_u64().unwrap());
    assert_eq!(fwmark, "off");
    assert_eq!(peers.len(), status["peers"].as_array().unwrap().len());
    assert_eq!(peers.len(), 1);
    let p = &peers[0];
    assert_eq!(p.public_key, b.key.public_key().to_base64());
    let s = status_peer(&status, &p.public_key).expect("the same peer in status");
    assert_eq!(p.endpoint.as_deref(), s["endpoint"].as_str());
    assert_eq!(
        p.endpoint.as_deref(),
        Some(format!("{}:51820", hb.underlay_ip()).as_str())
    );
    let mut want_ips: Vec<String> = s["allowed_ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    want_ips.sort();
    assert_eq!(p.allowed_ips, want_ips);
    assert_eq!(p.allowed_ips, vec![format!("{}/32", overlay(1))]);
    assert_eq!(p.keepalive, Some(25));
    assert_eq!(s["persistent_keepalive"], 25);
    // A handshake, within a second of what status says; counters read before status, so no
    // larger than its, and not zero after the pings.
    let hs = s["latest_handshake"]
        .as_u64()
        .expect("status has a handshake");
    assert!(p.latest_handshake > 0);
    assert!(
        p.latest_handshake.abs_diff(hs) <= 1,
        "{} vs {hs}",
        p.latest_handshake
    );
    assert!(p.rx > 0 && p.tx > 0, "{p:?}");
    assert!(p.rx <= s["rx_bytes"].as_u64().unwrap(), "{p:?} {s}");
    assert!(p.tx <= s["tx_bytes"].as_u64().unwrap(), "{p:?} {s}");

    // `wg show` and `wg showconf` read it too.
    let show = wg_ok(ha, &a.uapi_dir(), &["show", "mesh0"]);
    assert!(show.contains(&format!("peer: {}", p.public_key)), "{show}");
    assert!(show.contains("latest handshake:"), "{show}");
    let conf = wg_ok(ha, &a.uapi_dir(), &["showconf", "mesh0"]);
    assert!(
        conf.contains(&format!("PrivateKey = {}", a.key.to_base64())),
        "{conf}"
    );
    assert!(
        conf.contains(&format!("PublicKey = {}", p.public_key)),
        "{conf}"
    );

    // `wg set` adds a peer (static mode: applied like a reload).
    let new_key = meshd_tunnel::PrivateKey::generate()
        .public_key()
        .to_base64();
    wg_ok(
        ha,
        &a.uapi_dir(),
        &[
            "set",
            "mesh0",
            "peer",
            &new_key,
            "allowed-ips",
            "100.64.0.9/32",
            "endpoint",
            "198.18.0.9:51820",
            "persistent-keepalive",
            "15",
        ],
    );
    let status = status_json(ha).unwrap();
    let added = status_peer(&status, &new_key).expect("meshd status shows the new peer");
    assert_eq!(added["allowed_ips"], serde_json::json!(["100.64.0.9/32"]));
    assert_eq!(added["endpoint"], "198.18.0.9:51820");
    assert_eq!(added["persistent_keepalive"], 15);
    assert_eq!(added["name"], new_key.as_str());
    // The route to it is in place, through the TUN.
    let route = ha.exec_ok("ip", ["route", "get", "100.64.0.9"]).unwrap();
    assert!(
        String::from_utf8_lossy(&route.stdout).contains("dev mesh0"),
        "{}",
        String::from_utf8_lossy(&route.stdout)
    );
    // And the old peer still carries traffic.
    assert!(wait_ping(ha, overlay(1).into(), Duration::from_secs(5)));
    // `wg set peer … remove` takes it away again.
    wg_ok(
        ha,
        &a.uapi_dir(),
        &["set", "mesh0", "peer", &new_key, "remove"],
    );
    assert!(status_peer(&status_json(ha).unwrap(), &new_key).is_none());
    // Another listen port needs a restart: refused with EOPNOTSUPP.
    let out = wg(ha, &a.uapi_dir(), &["set", "mesh0", "listen-port", "51999"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Operation not supported"), "{err}");
    assert_eq!(status_json(ha).unwrap()["listen_port"], 51820);

    // A second meshd whose socket path is taken by a live one refuses to start, naming it.
    let c = Node::new(&lab, 2);
    c.write_config(&lab, &[], "");
    let text = read(&c.config_path()).replace(
        "uapi_dir = \"uapi\"",
        &format!("uapi_dir = \"{}\"", a.uapi_dir().display()),
    );
    std::fs::write(c.config_path(), text).unwrap();
    let out = lab
        .host(2)
        .exec(
            meshd_bin(),
            [
                "up",
                "--config",
                c.config_path().to_str().unwrap(),
                "--state-dir",
                c.dir.join("state").to_str().unwrap(),
            ],
        )
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&sock.display().to_string()), "{err}");
    assert!(err.contains("in use"), "{err}");
    // The live socket is untouched and still answers.
    wg_ok(ha, &a.uapi_dir(), &["show", "mesh0", "dump"]);

    // A clean stop removes the socket.
    stop_cleanly(pa);
    assert!(!sock.exists(), "the UAPI socket outlived a clean stop");
}

#[test]
fn a_stale_socket_is_replaced() {
    meshd_lab::require_root!();
    let lab = Lab::new("uapi-stale", 1).unwrap();
    let a = Node::new(&lab, 0);
    a.write_config(&lab, &[], "");
    // What a SIGKILLed meshd leaves: a socket file nobody listens on.
    std::fs::create_dir_all(a.uapi_dir()).unwrap();
    let sock = a.uapi_dir().join("mesh0.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let _pa = a.start(&lab);
    let dump = wg_ok(lab.host(0), &a.uapi_dir(), &["show", "mesh0", "dump"]);
    assert!(dump.starts_with(&a.key.to_base64()), "{dump}");
}

#[test]
fn coordinator_mode_serves_wg_show_and_refuses_wg_set() {
    meshd_lab::require_root!();
    let lab = Lab::new("uapi-coord", 3).unwrap();
    let coord = Coord::start(&lab, 0);
    let (code, v) = coord.apply_policy(
        &lab,
        "rules:\n  - name: all\n    from: {}\n    to: {}\n    ports: [any]\n",
    );
    assert!((200..300).contains(&code), "policy apply: {code} {v}");
    let mut procs = Vec::new();
    for i in 1..=2 {
        let token = coord.token(&lab, &[("app", &format!("app{i}"))], Some(3600), Some(1));
        procs.push(join(&lab, i, &token, &format!("host{i}")));
    }
    let h1 = lab.host(1);
    assert!(
        wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
            peer_names(h1) == ["host2"]
        }),
        "host1 never got host2: {:?}",
        peer_names(h1)
    );
    let dir = agent_uapi_dir(&lab, 1);
    let dump = wg_ok(h1, &dir, &["show", "mesh0", "dump"]);
    let status = status_json(h1).unwrap();
    let ((_, public, _, _), peers) = parse_dump(&dump);
    assert_eq!(public, status["public_key"]);
    assert_eq!(peers.len(), 1);
    let s = status_peer(&status, &peers[0].public_key).expect("the same peer in status");
    assert_eq!(s["name"], "host2");
    // The coordinator owns the peers: `wg set` is refused with EPERM and changes nothing.
    let new_key = meshd_tunnel::PrivateKey::generate()
        .public_key()
        .to_base64();
    let out = wg(
        h1,
        &dir,
        &[
            "set",
            "mesh0",
            "peer",
            &new_key,
            "allowed-ips",
            "100.64.9.9/32",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Operation not permitted"), "{err}");
    assert_eq!(peer_names(h1), ["host2"]);
    // `wg show` still works after the refusal.
    let again = wg_ok(h1, &dir, &["show", "mesh0", "dump"]);
    assert_eq!(parse_dump(&again).1.len(), 1);
}
