//! End to end: a peer allowed to reach this host cannot use it as a relay. Inner packets to
//! a destination that is not this host are dropped (and counted) even with IP forwarding on,
//! unless the operator routes that destination (`routed_prefixes`).

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use meshd_lab::{Lab, Signal};

fn counter(host: &meshd_lab::Host, name: &str) -> u64 {
    status_json(host)
        .and_then(|s| s["counters"][name].as_u64())
        .unwrap_or(0)
}

/// Sends `count` datagrams from namespace `from` to `to` (a receiver in `to_ns`) and returns
/// how many arrived within a second of the last one.
fn relay_attempt(from: &str, to_ns: &str, to: SocketAddr, count: usize) -> usize {
    let (tx, rx) = udp_pair(from, to_ns, to.port(), Duration::from_millis(100));
    for i in 0..count {
        tx.send_to(format!("relay-{i}").as_bytes(), to).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut got = 0;
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        if let Ok(n) = rx.recv(&mut buf) {
            if buf[..n].starts_with(b"relay-") {
                got += 1;
            }
        }
    }
    got
}

#[test]
fn peer_cannot_relay_through_a_forwarding_host() {
    meshd_lab::require_root!();
    // h0 = A (forwards IP), h1 = B (the peer), h2 = C (a third host behind A, no meshd).
    let lab = Lab::new("relay", 3).unwrap();
    let (ha, hb, hc) = (lab.host(0), lab.host(1), lab.host(2));
    ha.exec_ok("sysctl", ["-qw", "net.ipv4.ip_forward=1"])
        .unwrap();
    let c_ip = hc.underlay_ip();
    // C answers overlay sources through A, as a host behind a router would.
    hc.exec_ok(
        "ip",
        [
            "route",
            "add",
            "100.64.0.0/24",
            "via",
            &ha.underlay_ip().to_string(),
        ],
    )
    .unwrap();
    let (a, b) = (Node::new(&lab, 0), Node::new(&lab, 1));
    a.write_config(&lab, &[(&b, true)], "");
    // B routes C's address into the tunnel to A (its allowed IPs for A cover it, and meshd
    // adds the route): A grants B everything on its own address, nothing for C.
    b.write_config(&lab, &[(&a, true)], "");
    let text = read(&b.config_path()).replace(
        &format!("allowed_ips = [\"{}/32\"]", overlay(0)),
        &format!("allowed_ips = [\"{}/32\", \"{c_ip}/32\"]", overlay(0)),
    );
    assert!(text.contains(&c_ip.to_string()), "{text}");
    std::fs::write(b.config_path(), text).unwrap();
    let pa = a.start(&lab);
    let _pb = b.start(&lab);
    assert!(
        wait_ping(hb, overlay(0).into(), Duration::from_secs(10)),
        "tunnel never came up"
    );
    let to_c = SocketAddr::new(IpAddr::V4(c_ip), 7100);

    let got = relay_attempt(hb.netns(), hc.netns(), to_c, 20);
    assert_eq!(got, 0, "C received {got} datagrams B relayed through A");
    let dropped = counter(ha, "drop_inner_destination");
    assert!(dropped >= 20, "A counted {dropped} inner_destination drops");
    // A's own address still works through the same tunnel.
    assert!(wait_ping(hb, overlay(0).into(), Duration::from_secs(5)));
    let n = udp_exchange(hb.netns(), ha.netns(), overlay(0).into(), 7101, 20);
    assert!(n >= 19, "only {n}/20 datagrams to A's own address");

    // The operator routes C's address through A on purpose: then it is forwarded.
    pa.kill(Signal::Term).unwrap();
    pa.wait_timeout(Duration::from_secs(5))
        .unwrap()
        .expect("meshd exits on SIGTERM");
    let text = read(&a.config_path()).replace(
        "[interface]\n",
        &format!("[interface]\nrouted_prefixes = [\"{c_ip}/32\"]\n"),
    );
    std::fs::write(a.config_path(), text).unwrap();
    let _pa = a.start(&lab);
    assert!(
        wait_ping(hb, overlay(0).into(), Duration::from_secs(40)),
        "tunnel never came back"
    );
    let s = status_json(ha).unwrap();
    assert_eq!(s["routed_prefixes"][0], format!("{c_ip}/32"));
    let got = relay_attempt(hb.netns(), hc.netns(), to_c, 20);
    assert!(got >= 19, "routed: only {got}/20 datagrams reached C");
    assert_eq!(counter(ha, "drop_inner_destination"), 0);
}
