//! End-to-end: overlay traffic fails closed. With meshd dead (SIGKILL) the TUN and its routes
//! are gone; the `unreachable` guards meshd keeps in the main table stop traffic to the overlay
//! from following the default route out in plaintext. A clean stop removes them.

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use common::*;
use meshd_lab::{wait_for, Lab, Signal};

const MARKER: &[u8] = b"MESHD-OVERLAY-FAILCLOSED-7d20";

/// Overlay guards (`unreachable`, meshd's metric) in the main table of `host`.
fn guards(host: &meshd_lab::Host) -> usize {
    let out = host
        .exec("ip", ["-4", "route", "show", "type", "unreachable"])
        .unwrap();
    let metric = format!("metric {}", meshd_hostnet::GUARD_METRIC);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&metric))
        .count()
}

/// Sends the marker from `ns` to `to` a few times; true if `rx` got any of it.
fn udp_through(ns: &str, to: SocketAddr, rx: &UdpSocket) -> bool {
    let mut buf = [0u8; 64];
    // Forget what earlier rounds left queued.
    rx.set_nonblocking(true).unwrap();
    while rx.recv_from(&mut buf).is_ok() {}
    rx.set_nonblocking(false).unwrap();
    in_netns(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..5 {
            // Refused on this host while meshd is down: that is the point.
            let _ = s.send_to(MARKER, to);
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    rx.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    rx.recv_from(&mut buf).is_ok()
}

#[test]
fn overlay_traffic_never_follows_the_default_route_when_meshd_dies() {
    meshd_lab::require_root!();
    let lab = Lab::new("fc-overlay", 2).unwrap();
    let (n0, n1) = (Node::new(&lab, 0), Node::new(&lab, 1));
    n0.write_config(&lab, &[(&n1, true)], "");
    n1.write_config(&lab, &[(&n0, true)], "");
    let (h0, h1) = (lab.host(0), lab.host(1));
    // h0's default route leads to h1: without a guard, overlay packets that find no TUN go
    // there in plaintext (h1 would even deliver them: the overlay address is its own).
    h0.exec_ok(
        "ip",
        [
            "route",
            "add",
            "default",
            "via",
            &h1.underlay_ip().to_string(),
        ],
    )
    .unwrap();
    let p0 = n0.start(&lab);
    let p1 = n1.start(&lab);
    assert_eq!(guards(h0), 1, "the overlay network is guarded while up");
    let to = SocketAddr::new(IpAddr::V4(overlay(1)), 5353);
    let rx = in_netns(h1.netns(), move || UdpSocket::bind(to).unwrap());
    assert!(
        wait_for(Duration::from_secs(10), Duration::from_millis(100), || {
            udp_through(h0.netns(), to, &rx)
        }),
        "no overlay traffic: {}",
        p0.stderr().unwrap_or_default()
    );
    let cap = lab
        .capture(1, "eth0", &format!("src host {}", h0.underlay_ip()))
        .unwrap();

    p0.kill(Signal::Kill).unwrap();
    let _ = p0.wait_timeout(Duration::from_secs(5));
    assert_eq!(guards(h0), 1, "the guard went with the process");
    assert!(
        !udp_through(h0.netns(), to, &rx),
        "overlay traffic reached the peer with meshd dead"
    );
    let out = h0
        .exec("ip", ["route", "get", &overlay(1).to_string()])
        .unwrap();
    assert!(
        !out.status.success(),
        "a route to the overlay without meshd: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Restart: the guard is adopted (not doubled), traffic flows again.
    let p0 = n0.start(&lab);
    assert_eq!(guards(h0), 1);
    assert!(wait_for(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || udp_through(h0.netns(), to, &rx)
    ));
    let pcap = cap.stop_parsed().unwrap();
    assert!(
        !pcap.any_contains(MARKER),
        "the marker crossed the underlay in plaintext"
    );

    // A clean stop removes the guard.
    for p in [p0, p1] {
        stop_cleanly(p);
    }
    assert_eq!(guards(h0), 0, "a guard left after a clean stop");
}
