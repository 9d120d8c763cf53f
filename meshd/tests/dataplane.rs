//! End-to-end tests of the packet path: two meshd hosts in network namespaces.

mod common;

use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use meshd_lab::pcap::ip_proto;
use meshd_lab::{wait_for, Cmd, Lab, Signal};

#[test]
fn tcp_and_udp_both_ways() {
    meshd_lab::require_root!();
    let lab = Lab::new("tcp-udp", 2).unwrap();
    let (a, b) = (Node::new(&lab, 0), Node::new(&lab, 1));
    a.write_config(&lab, &[(&b, true)], "");
    b.write_config(&lab, &[(&a, true)], "");
    // One side busy-polls, the other sleeps: both packet-path variants carry the traffic.
    let _pa = a.start_with(&lab, &["--busy-poll-us", "200"]);
    let _pb = b.start(&lab);
    let (ha, hb) = (lab.host(0), lab.host(1));
    assert!(
        wait_ping(ha, overlay(1).into(), Duration::from_secs(10)),
        "tunnel never came up"
    );
    // Sparse traffic is carried by the rx thread alone: pings never wake the tx thread.
    for _ in 0..20 {
        assert!(wait_ping(ha, overlay(1).into(), Duration::from_secs(2)));
    }
    assert_eq!(counter(ha, "tx_thread_wakeups"), 0);
    assert_eq!(counter(hb, "tx_thread_wakeups"), 0);
    // A lone packet after a quiet spell ends its TUN pass early: whatever followed it must
    // still be picked up (the TUN stays watched), not left until the next packet comes.
    for (from, to, to_idx) in [(ha, hb, 1), (hb, ha, 0)] {
        let port = 5003 + to_idx as u16;
        let missing =
            udp_bursts_after_quiet(from.netns(), to.netns(), overlay(to_idx).into(), port);
        assert_eq!(
            missing,
            Vec::<String>::new(),
            "{} -> {}",
            from.name(),
            to.name()
        );
    }

    for (from, to, to_idx) in [(ha, hb, 1), (hb, ha, 0)] {
        let (sent, got, secs) = tcp_transfer(
            from.netns(),
            to.netns(),
            overlay(to_idx).into(),
            5001,
            16 << 20,
        );
        assert_eq!(sent, got, "16 MiB digest differs");
        eprintln!("16 MiB {} -> {} in {secs:.2}s", from.name(), to.name());
        let n = udp_exchange(from.netns(), to.netns(), overlay(to_idx).into(), 5002, 200);
        assert!(n >= 195, "only {n}/200 UDP datagrams arrived");
    }
    // A bulk transfer does wake it (each side sent 16 MiB).
    assert!(counter(ha, "tx_thread_wakeups") > 0);
    assert!(counter(hb, "tx_thread_wakeups") > 0);
    let s = status_json(ha).unwrap();
    let peer = &s["peers"][0];
    assert_eq!(peer["name"], "h1");
    assert!(peer["latest_handshake"].as_u64().is_some());
    assert!(peer["tx_bytes"].as_u64().unwrap() > 16 << 20);
    assert!(peer["rx_bytes"].as_u64().unwrap() > 16 << 20);
}

/// Sends bursts of 2-5 back-to-back datagrams, each after 30 ms of silence, and returns the
/// ones that did not arrive within a second of their burst.
fn udp_bursts_after_quiet(from: &str, to_ns: &str, to_addr: IpAddr, port: u16) -> Vec<String> {
    let (tx, rx) = udp_pair(from, to_ns, port, Duration::from_millis(100));
    let mut missing = Vec::new();
    let mut buf = [0u8; 256];
    for burst in 0..8 {
        std::thread::sleep(Duration::from_millis(30));
        let mut want: std::collections::BTreeSet<String> = (0..2 + burst % 4)
            .map(|i| format!("burst-{burst}-{i}"))
            .collect();
        for msg in &want {
            tx.send_to(msg.as_bytes(), (to_addr, port)).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        while !want.is_empty() && Instant::now() < deadline {
            if let Ok(n) = rx.recv(&mut buf) {
                want.remove(std::str::from_utf8(&buf[..n]).unwrap_or(""));
            }
        }
        missing.extend(want);
    }
    missing
}

fn counter(host: &meshd_lab::Host, name: &str) -> u64 {
    status_json(host)
        .and_then(|s| s["counters"][name].as_u64())
        .unwrap_or(0)
}

/// Two hosts with a tunnel up, ready for traffic.
fn two_hosts(tag: &str, n: usize) -> (Lab, Vec<Node>, Vec<meshd_lab::ProcHandle>) {
    let lab = Lab::new(tag, n).unwrap();
    let (a, b) = (Node::new(&lab, 0), Node::new(&lab, 1));
    a.write_config(&lab, &[(&b, true)], "");
    b.write_config(&lab, &[(&a, true)], "");
    let procs = vec![a.start(&lab), b.start(&lab)];
    assert!(wait_ping(
        lab.host(0),
        overlay(1).into(),
        Duration::from_secs(10)
    ));
    (lab, vec![a, b], procs)
}

#[test]
fn underlay_shows_only_tunnel_udp_never_the_marker() {
    meshd_lab::require_root!();
    let (lab, _nodes, _procs) = two_hosts("marker", 2);
    let (ha, hb) = (lab.host(0), lab.host(1));
    // IPv6 multicast (MLD, neighbour discovery) is background noise of the lab, not ours.
    let cap = lab
        .capture(0, "eth0", "ip or (ip6 and not dst net ff00::/8)")
        .unwrap();
    let marker = b"MESHD-SECRET-MARKER-7f3a9c";
    let m = marker.to_vec();
    let to: IpAddr = overlay(1).into();
    let rx = in_netns(hb.netns(), || UdpSocket::bind("0.0.0.0:6000").unwrap());
    rx.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    in_netns(ha.netns(), move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..20 {
            s.send_to(&m, (to, 6000)).unwrap();
        }
    });
    let mut buf = [0u8; 256];
    let n = rx
        .recv(&mut buf)
        .expect("marker datagram through the tunnel");
    assert_eq!(&buf[..n], marker);
    // And over TCP.
    let (sent, got, _) = tcp_transfer(ha.netns(), hb.netns(), to, 6001, 64 << 10);
    assert_eq!(sent, got);
    std::thread::sleep(Duration::from_millis(300));
    let pcap = cap.stop_parsed().unwrap();
    assert!(!pcap.packets.is_empty(), "capture saw nothing");
    assert!(!pcap.any_contains(marker), "marker visible on the underlay");
    let (a_ip, b_ip) = (
        IpAddr::from(ha.underlay_ip()),
        IpAddr::from(hb.underlay_ip()),
    );
    let mut udp = 0;
    for s in pcap.summaries() {
        assert_eq!(
            s.ip_proto,
            ip_proto::UDP,
            "non-UDP packet on the underlay: {s:?}"
        );
        let ends = (s.src, s.dst);
        assert!(
            ends == (a_ip, b_ip) || ends == (b_ip, a_ip),
            "unexpected hosts: {s:?}"
        );
        assert_eq!(
            (s.src_port, s.dst_port),
            (Some(51820), Some(51820)),
            "{s:?}"
        );
        udp += 1;
    }
    // GSO trains show up as one large packet on the veth, so count loosely.
    assert!(udp >= 5, "only {udp} tunnel packets captured");
}

#[test]
fn restarted_peer_comes_back_by_itself() {
    meshd_lab::require_root!();
    let (lab, nodes, mut procs) = two_hosts("restart", 2);
    let (ha, hb) = (lab.host(0), lab.host(1));
    let old = procs.pop().unwrap();
    old.kill(Signal::Term).unwrap();
    let status = old
        .wait_timeout(Duration::from_secs(5))
        .unwrap()
        .expect("meshd exits on SIGTERM");
    assert!(status.success(), "SIGTERM exit status {status:?}");
    // Stopped: interface and its routes are gone.
    assert!(!hb
        .exec("ip", ["link", "show", "mesh0"])
        .unwrap()
        .status
        .success());
    let _new = nodes[1].start(&lab);
    let start = Instant::now();
    assert!(
        wait_ping(ha, overlay(1).into(), Duration::from_secs(40)),
        "A never reached the restarted B"
    );
    eprintln!(
        "tunnel back {:.1}s after restart",
        start.elapsed().as_secs_f64()
    );
    assert!(wait_ping(hb, overlay(0).into(), Duration::from_secs(5)));
}

#[test]
fn roaming_follows_a_changed_underlay_ip() {
    meshd_lab::require_root!();
    let (lab, _nodes, _procs) = two_hosts("roam", 2);
    let (ha, hb) = (lab.host(0), lab.host(1));
    let new_ip = Ipv4Addr::new(198, 18, 0, 77);
    ha.set_underlay_ip(new_ip).unwrap();
    let start = Instant::now();
    assert!(
        wait_ping(ha, overlay(1).into(), Duration::from_secs(10)),
        "no traffic after A moved"
    );
    eprintln!(
        "traffic resumed {:.2}s after the IP change",
        start.elapsed().as_secs_f64()
    );
    let s = status_json(hb).unwrap();
    assert_eq!(s["peers"][0]["endpoint"], format!("{new_ip}:51820"));
    // B can start traffic towards A's new address too.
    assert!(wait_ping(hb, overlay(0).into(), Duration::from_secs(5)));
}

#[test]
fn unknown_key_gets_no_answer() {
    meshd_lab::require_root!();
    let (lab, nodes, _procs) = two_hosts("stranger", 3);
    let (hb, hc) = (lab.host(1), lab.host(2));
    // C knows B, but B does not know C.
    let c = Node::new(&lab, 2);
    c.write_config(&lab, &[(&nodes[1], true)], "");
    let cap = lab.capture(2, "eth0", "udp").unwrap();
    let _pc = c.start(&lab);
    assert!(!hc.ping(overlay(1).into()).unwrap());
    std::thread::sleep(Duration::from_secs(2));
    let pcap = cap.stop_parsed().unwrap();
    let (b_ip, c_ip) = (
        IpAddr::from(hb.underlay_ip()),
        IpAddr::from(hc.underlay_ip()),
    );
    let sums = pcap.summaries();
    let to_b = sums
        .iter()
        .filter(|s| s.src == c_ip && s.dst == b_ip)
        .count();
    let from_b = sums
        .iter()
        .filter(|s| s.src == b_ip && s.dst == c_ip)
        .count();
    assert!(to_b >= 1, "C never tried");
    assert_eq!(from_b, 0, "B answered a stranger");
    assert!(counter(hb, "drop_unknown_peer") >= 1);
}

#[test]
fn garbage_datagrams_are_dropped_and_counted() {
    meshd_lab::require_root!();
    let (lab, _nodes, _procs) = two_hosts("garbage", 3);
    let (ha, hb, hc) = (lab.host(0), lab.host(1), lab.host(2));
    let b_ip = hb.underlay_ip();
    in_netns(hc.netns(), move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        let junk = pattern(4096, 9);
        for i in 0..300usize {
            // Every size from empty to oversized, and each WireGuard type byte with junk.
            let len = (i * 13) % 1600;
            let mut d = junk[..len].to_vec();
            if let Some(t) = d.first_mut() {
                *t = (i % 6) as u8;
            }
            s.send_to(&d, (b_ip, 51820)).unwrap();
        }
    });
    assert!(wait_for(
        Duration::from_secs(3),
        Duration::from_millis(100),
        || {
            counter(hb, "drop_malformed")
                + counter(hb, "drop_unknown_peer")
                + counter(hb, "drop_refused")
                + counter(hb, "drop_decrypt")
                >= 250
        }
    ));
    assert!(
        wait_ping(ha, overlay(1).into(), Duration::from_secs(3)),
        "B broke"
    );
}

#[test]
fn sighup_adds_a_peer_without_dropping_others() {
    meshd_lab::require_root!();
    let lab = Lab::new("reload", 3).unwrap();
    let (a, b, c) = (Node::new(&lab, 0), Node::new(&lab, 1), Node::new(&lab, 2));
    a.write_config(&lab, &[(&b, true)], "");
    b.write_config(&lab, &[(&a, true)], "");
    c.write_config(&lab, &[(&a, true)], "");
    let pa = a.start(&lab);
    let _pb = b.start(&lab);
    let _pc = c.start(&lab);
    let ha = lab.host(0);
    assert!(wait_ping(ha, overlay(1).into(), Duration::from_secs(10)));
    let before = status_json(ha).unwrap()["peers"][0]["latest_handshake"].clone();
    assert!(
        !ha.ping(overlay(2).into()).unwrap(),
        "C reachable before it was added"
    );
    a.write_config(&lab, &[(&b, true), (&c, true)], "");
    std::thread::sleep(Duration::from_millis(1100));
    pa.kill(Signal::Hup).unwrap();
    assert!(
        wait_ping(ha, overlay(2).into(), Duration::from_secs(10)),
        "C not reachable after SIGHUP"
    );
    let s = status_json(ha).unwrap();
    assert_eq!(s["peers"].as_array().unwrap().len(), 2);
    assert_eq!(
        s["peers"][0]["latest_handshake"], before,
        "B's session was restarted"
    );
    assert!(ha.ping(overlay(1).into()).unwrap());
    // A reload with a broken file keeps the running peers.
    std::fs::write(a.config_path(), "[interface\nbroken").unwrap();
    pa.kill(Signal::Hup).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(ha.ping(overlay(2).into()).unwrap());
    assert!(
        pa.try_wait().unwrap().is_none(),
        "meshd died on a bad reload"
    );
}

#[test]
fn interop_with_wireguard_go() {
    meshd_lab::require_root!();
    let lab = Lab::new("wg-interop", 2).unwrap();
    let a = Node::new(&lab, 0);
    let hb = lab.host(1);
    // B runs stock wireguard-go + wg, with a unique name (its UAPI socket is on the shared fs).
    let wg_key = meshd_tunnel::PrivateKey::generate();
    let wg_if = format!("wgi{}", std::process::id() % 100_000);
    let b_key_path = lab.dir().join("wg.key");
    std::fs::write(&b_key_path, wg_key.to_base64()).unwrap();
    let b_pub = wg_key.public_key();
    let mut conf = format!(
        "[interface]\nname = \"mesh0\"\nprivate_key_file = \"host.key\"\nlisten_port = 51820\naddress = \"{}/24\"\nuapi_dir = \"uapi\"\n",
        overlay(0)
    );
    conf += &format!(
        "[[peer]]\nname = \"wg\"\npublic_key = \"{b_pub}\"\nendpoint = \"{}:51820\"\nallowed_ips = [\"{}/32\"]\n",
        hb.underlay_ip(),
        overlay(1)
    );
    std::fs::write(a.config_path(), conf).unwrap();
    let _wg = hb
        .spawn(
            Cmd::new("wireguard-go")
                .args(["-f", &wg_if])
                .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
                .label("wireguard-go"),
        )
        .unwrap();
    assert!(wait_for(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || {
            hb.exec("ip", ["link", "show", &wg_if])
                .map(|o| o.status.success())
                .unwrap_or(false)
        }
    ));
    let ha_ip = lab.host(0).underlay_ip().to_string();
    hb.exec_ok(
        "wg",
        [
            "set",
            &wg_if,
            "private-key",
            b_key_path.to_str().unwrap(),
            "listen-port",
            "51820",
            "peer",
            &a.key.public_key().to_base64(),
            "allowed-ips",
            &format!("{}/32", overlay(0)),
            "endpoint",
            &format!("{ha_ip}:51820"),
        ],
    )
    .unwrap();
    hb.exec_ok(
        "ip",
        ["addr", "add", &format!("{}/24", overlay(1)), "dev", &wg_if],
    )
    .unwrap();
    hb.exec_ok("ip", ["link", "set", &wg_if, "mtu", "1420", "up"])
        .unwrap();
    let _pa = a.start(&lab);
    let ha = lab.host(0);
    assert!(
        wait_ping(ha, overlay(1).into(), Duration::from_secs(10)),
        "no tunnel with wireguard-go"
    );
    for (from, to, to_idx) in [(ha, hb, 1), (hb, ha, 0)] {
        let (sent, got, _) = tcp_transfer(
            from.netns(),
            to.netns(),
            overlay(to_idx).into(),
            5101,
            4 << 20,
        );
        assert_eq!(sent, got);
        let n = udp_exchange(from.netns(), to.netns(), overlay(to_idx).into(), 5102, 100);
        assert!(n >= 95, "{n}/100 datagrams");
    }
    let wg_show = hb
        .exec_ok("wg", ["show", &wg_if, "latest-handshakes"])
        .unwrap();
    assert!(!String::from_utf8_lossy(&wg_show.stdout).contains("\t0\n"));
}

/// Static mode with a policy file: labels in the config, rules in YAML, enforced both ends.
#[test]
fn static_policy_allows_only_granted_ports_and_logs_denials() {
    meshd_lab::require_root!();
    let lab = Lab::new("static-policy", 2).unwrap();
    let (a, b) = (Node::new(&lab, 0), Node::new(&lab, 1));
    let policy = "rules:\n  - name: app1-to-db1\n    from: { app: app1 }\n    to: { app: db1 }\n    ports: [tcp/1521]\ntests:\n  - { from: { app: app1 }, to: { app: db1 }, port: tcp/1521, expect: allow }\n  - { from: { app: db1 }, to: { app: app1 }, port: tcp/1521, expect: deny }\n";
    for (node, me, peer, peer_app) in [(&a, "app1", &b, "db1"), (&b, "db1", &a, "app1")] {
        node.write_config(&lab, &[(peer, true)], "");
        // a keeps its rules in a YAML file, b inline in its TOML: same syntax either way.
        let policy_line = if node.idx == 0 {
            std::fs::write(node.dir.join("policy.yaml"), policy).unwrap();
            "policy_file = \"policy.yaml\"".to_string()
        } else {
            format!("policy = '''\n{policy}'''")
        };
        let text = std::fs::read_to_string(node.config_path()).unwrap();
        let text = text
            .replace(
                "mtu = 1420\n",
                &format!("mtu = 1420\nlabels = {{ app = \"{me}\" }}\n{policy_line}\n"),
            )
            .replace(
                &format!("name = \"h{}\"\n", peer.idx),
                &format!(
                    "name = \"h{}\"\nlabels = {{ app = \"{peer_app}\" }}\n",
                    peer.idx
                ),
            );
        std::fs::write(node.config_path(), text).unwrap();
    }
    let _pa = a.start(&lab);
    let _pb = b.start(&lab);
    let (ha, hb) = (lab.host(0), lab.host(1));
    // Allowed: app1 -> db1 on tcp/1521, both the connection and its replies.
    let (s, g, _) = tcp_transfer(ha.netns(), hb.netns(), overlay(1).into(), 1521, 1 << 20);
    assert_eq!(s, g);
    // Denied: other ports, the other direction, and ICMP (no rule).
    let denied = |from: &meshd_lab::Host, to_ns: &str, to: IpAddr, port: u16| {
        let _l = in_netns(to_ns, move || {
            std::net::TcpListener::bind(("0.0.0.0", port)).unwrap()
        });
        in_netns(from.netns(), move || {
            std::net::TcpStream::connect_timeout(&(to, port).into(), Duration::from_millis(1500))
                .is_err()
        })
    };
    assert!(
        denied(ha, hb.netns(), overlay(1).into(), 22),
        "app1 reached db1:22"
    );
    assert!(
        denied(hb, ha.netns(), overlay(0).into(), 1521),
        "db1 opened to app1"
    );
    assert!(
        !ha.ping(overlay(1).into()).unwrap(),
        "ICMP passed without a rule"
    );
    // The denial is counted and logged naming the peer.
    assert!(counter(ha, "policy_default_deny") >= 1);
    let log = a.dir.join("state").join("blocks.jsonl");
    assert!(
        wait_for(Duration::from_secs(3), Duration::from_millis(100), || read(
            &log
        )
        .contains("\"peer\":\"h1\"")),
        "no block log entry: {}",
        read(&log)
    );
    assert!(read(&log).contains("\"app\":\"db1\""), "{}", read(&log));
}

#[test]
fn static_policy_with_failing_tests_is_refused() {
    meshd_lab::require_root!();
    let lab = Lab::new("static-policy-bad", 1).unwrap();
    let a = Node::new(&lab, 0);
    a.write_config(&lab, &[], "");
    std::fs::write(
        a.dir.join("policy.yaml"),
        "rules: []\ntests:\n  - { from: { app: x }, to: { app: y }, port: tcp/1, expect: allow }\n",
    )
    .unwrap();
    let text = std::fs::read_to_string(a.config_path()).unwrap();
    std::fs::write(
        a.config_path(),
        text.replace(
            "mtu = 1420\n",
            "mtu = 1420\npolicy_file = \"policy.yaml\"\n",
        ),
    )
    .unwrap();
    let out = lab
        .host(0)
        .exec(
            meshd_bin(),
            [
                "up",
                "--config",
                a.config_path().to_str().unwrap(),
                "--state-dir",
                a.dir.join("s").to_str().unwrap(),
            ],
        )
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("policy tests failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
