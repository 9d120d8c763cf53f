//! Hostile datagrams at meshd's tunnel port (issue 17, point 5): replays of captured valid
//! packets (from a stranger's address and from the peer's own address on another port),
//! truncated and oversized datagrams, handshake-type messages with bad MACs and data packets
//! for unknown receiver indices, sent with a plain UDP socket while a TCP stream between the
//! two meshd hosts keeps flowing. The daemon drops them all (counted), never answers them,
//! never moves the peer's endpoint, and keeps serving.

mod common;

use std::net::{IpAddr, UdpSocket};
use std::time::Duration;

use common::*;
use meshd_lab::{wait_for, Lab};

fn counter(host: &meshd_lab::Host, name: &str) -> u64 {
    status_json(host)
        .and_then(|s| s["counters"][name].as_u64())
        .unwrap_or(0)
}

fn drops(host: &meshd_lab::Host) -> u64 {
    [
        "drop_malformed",
        "drop_unknown_peer",
        "drop_refused",
        "drop_decrypt",
        "drop_replayed_initiation",
    ]
    .iter()
    .map(|c| counter(host, c))
    .sum()
}

/// The hostile set: every captured datagram as is (a replay), each truncated, each with a
/// flipped byte; oversized datagrams; handshake-sized messages with junk MACs; data packets
/// for random receiver indices.
fn hostile(captured: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let junk = pattern(65_000, 17);
    let mut v: Vec<Vec<u8>> = Vec::new();
    for d in captured {
        v.push(d.clone());
        v.push(d[..d.len() / 2].to_vec());
        let mut flipped = d.clone();
        let i = flipped.len() - 1;
        flipped[i] ^= 0x55;
        v.push(flipped);
    }
    for len in [1500, 2000, 9000, 65_000] {
        let mut d = junk[..len].to_vec();
        d[0] = 4;
        d[1..4].fill(0);
        v.push(d);
    }
    // Initiation (148), response (92), cookie reply (64): right sizes, junk MACs.
    for (ty, len) in [(1u8, 148usize), (2, 92), (3, 64)] {
        for k in 0..20 {
            let mut d = pattern(len, 100 + k);
            d[0] = ty;
            d[1..4].fill(0);
            v.push(d);
        }
    }
    // Transport data for receiver indices nobody handed out.
    for k in 0..50u64 {
        let mut d = pattern(32 + (k as usize * 7) % 200, 300 + k);
        d[0] = 4;
        d[1..4].fill(0);
        v.push(d);
    }
    v
}

fn send_all(ns: &str, to: (IpAddr, u16), datagrams: Vec<Vec<u8>>) {
    in_netns(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        for d in &datagrams {
            // Oversized ones may be refused locally (EMSGSIZE): that is not the test.
            let _ = s.send_to(d, to);
            std::thread::sleep(Duration::from_micros(200));
        }
    });
}

#[test]
fn hostile_datagrams_never_stop_a_flowing_stream() {
    meshd_lab::require_root!();
    let lab = Lab::new("hostile", 3).unwrap();
    let (a, b) = (Node::new(&lab, 0), Node::new(&lab, 1));
    a.write_config(&lab, &[(&b, true)], "");
    b.write_config(&lab, &[(&a, true)], "");
    let procs = [a.start(&lab), b.start(&lab)];
    let (ha, hb, hc) = (lab.host(0), lab.host(1), lab.host(2));
    assert!(
        wait_ping(ha, overlay(1).into(), Duration::from_secs(10)),
        "tunnel never came up: {}",
        procs[1].stderr().unwrap_or_default()
    );
    let (a_ip, b_ip, c_ip) = (
        IpAddr::from(ha.underlay_ip()),
        IpAddr::from(hb.underlay_ip()),
        IpAddr::from(hc.underlay_ip()),
    );

    // A legitimate stream A -> B over the overlay; capture its datagrams at B.
    let cap = lab.capture(1, "eth0", "udp port 51820").unwrap();
    let stream = Stream::start(ha.netns(), hb.netns(), overlay(1).into(), 7100);
    assert!(
        stream.flowing(Duration::from_secs(1)),
        "stream never started"
    );
    let pcap = cap.stop_parsed().unwrap();
    let captured: Vec<Vec<u8>> = pcap
        .summaries()
        .into_iter()
        .filter(|s| s.is_udp() && s.src == a_ip && s.dst == b_ip)
        .map(|s| s.payload)
        .filter(|p| !p.is_empty())
        .take(200)
        .collect();
    assert!(captured.len() >= 20, "captured only {}", captured.len());
    let before = drops(hb);

    // From the stranger C, and from A's own address on another port, while capturing what
    // B sends to C.
    let back = lab.capture(1, "eth0", "udp").unwrap();
    let set = hostile(&captured);
    let n = set.len() as u64;
    send_all(hc.netns(), (b_ip, 51820), set.clone());
    send_all(ha.netns(), (b_ip, 51820), captured.clone());
    assert!(
        stream.flowing(Duration::from_millis(500)),
        "stream stalled under attack"
    );
    let expected = n + captured.len() as u64 - 4; // oversized ones may never leave C
    assert!(
        wait_for(Duration::from_secs(5), Duration::from_millis(100), || {
            drops(hb) - before >= expected
        }),
        "only {} of {} hostile datagrams counted as drops",
        drops(hb) - before,
        expected
    );
    let pcap = back.stop_parsed().unwrap();
    let answers = pcap
        .summaries()
        .iter()
        .filter(|s| s.src == b_ip && s.dst == c_ip)
        .count();
    assert_eq!(answers, 0, "B answered hostile datagrams");

    // B still serves A: the stream flows, pings pass, A's endpoint did not move.
    assert!(stream.flowing(Duration::from_secs(1)), "stream stopped");
    assert!(wait_ping(ha, overlay(1).into(), Duration::from_secs(3)));
    assert!(wait_ping(hb, overlay(0).into(), Duration::from_secs(3)));
    let s = status_json(hb).unwrap();
    assert_eq!(
        s["peers"][0]["endpoint"],
        format!("{a_ip}:51820"),
        "a replay moved the peer's endpoint"
    );
}
