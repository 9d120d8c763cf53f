//! Two devices wired back to back in memory: handshake, data both ways, cryptokey routing,
//! inner destinations, unknown peers, garbage, replays, cookies. No sockets, no TUN.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;

use ipnet::IpNet;
use meshd_testkit::fixtures::{self, ip4};
use meshd_tunnel::{Decap, Destinations, Device, DropReason, Encap, PeerSpec, PrivateKey};

const A_ADDR: &str = "198.18.0.1:51820";
const B_ADDR: &str = "198.18.0.2:51820";

fn spec(name: &str, key: &PrivateKey, ep: &str, ip: &str) -> PeerSpec {
    fixtures::peer_spec(name, &key.public_key(), Some(ep.parse().unwrap()), ip)
}

struct Net {
    /// (from, to, datagram)
    wire: VecDeque<(SocketAddr, SocketAddr, Vec<u8>)>,
    /// (device name, delivered packet)
    delivered: Vec<(&'static str, Vec<u8>)>,
}

impl Net {
    fn new() -> Net {
        Net {
            wire: VecDeque::new(),
            delivered: Vec::new(),
        }
    }

    /// Seals `packet` for the device's first peer whatever its destination (what a peer
    /// that routes anything into the tunnel would send).
    fn seal_to_first_peer(&mut self, dev: &Device, me: &str, packet: &[u8]) {
        let table = dev.table();
        let peer = &table.peers()[0];
        let mut tunn = peer.lock();
        let mut out = vec![0u8; packet.len() + 148];
        if let Encap::Send { to, datagram } = dev.encapsulate(peer, &mut tunn, packet, &mut out) {
            self.wire
                .push_back((me.parse().unwrap(), to, datagram.to_vec()));
        }
    }

    fn send(&mut self, dev: &Device, me: &str, packet: &[u8]) {
        let table = dev.table();
        let peer = dev.route(&table, packet).expect("route");
        let mut tunn = peer.lock();
        let mut out = vec![0u8; packet.len() + 148];
        if let Encap::Send { to, datagram } = dev.encapsulate(peer, &mut tunn, packet, &mut out) {
            self.wire
                .push_back((me.parse().unwrap(), to, datagram.to_vec()));
        }
    }

    /// Delivers everything on the wire until it is quiet (bounded).
    fn run(&mut self, a: &Device, b: &Device) {
        for _ in 0..100 {
            let Some((from, to, d)) = self.wire.pop_front() else {
                return;
            };
            let (dev, name, me) = if to == B_ADDR.parse().unwrap() {
                (b, "b", B_ADDR)
            } else {
                (a, "a", A_ADDR)
            };
            let table = dev.table();
            let mut out = vec![0u8; 2048];
            let mut replies = Vec::new();
            let mut flush_peer = None;
            match dev.decapsulate(&table, from, &d, &mut out) {
                Decap::Deliver { packet, .. } => self.delivered.push((name, packet.to_vec())),
                Decap::Reply { peer, datagram } => {
                    replies.push((from, datagram.to_vec()));
                    flush_peer = peer.cloned();
                }
                Decap::Done | Decap::Drop(_) => {}
            }
            if let Some(p) = flush_peer {
                let mut scratch = vec![0u8; 2048];
                dev.flush(&p, &mut scratch, |to, d| replies.push((to, d.to_vec())));
            }
            for (to, d) in replies {
                self.wire.push_back((me.parse().unwrap(), to, d));
            }
        }
        panic!("wire never went quiet");
    }
}

fn pair() -> (Device, Device, PrivateKey, PrivateKey) {
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let a = Device::new(ka.clone(), 1);
    let b = Device::new(kb.clone(), 2);
    a.set_peers(&[spec("b", &kb, B_ADDR, "100.64.0.2/32")])
        .unwrap();
    b.set_peers(&[spec("a", &ka, A_ADDR, "100.64.0.1/32")])
        .unwrap();
    a.set_destinations(own(&["100.64.0.1"], &[]));
    b.set_destinations(own(&["100.64.0.2"], &[]));
    (a, b, ka, kb)
}

fn own(addrs: &[&str], routed: &[&str]) -> Destinations {
    let routed: Vec<IpNet> = routed.iter().map(|s| s.parse().unwrap()).collect();
    Destinations::new(addrs.iter().map(|s| s.parse::<IpAddr>().unwrap()), &routed)
}

/// The device's counters that are not zero, by name (cookie replies as `cookie_replies`).
fn nonzero(dev: &Device) -> Vec<(&'static str, u64)> {
    let mut v: Vec<_> = dev
        .counters
        .snapshot()
        .into_iter()
        .filter(|c| c.1 > 0)
        .collect();
    let cookies = dev.counters.cookie_replies.load(Ordering::Relaxed);
    if cookies > 0 {
        v.push(("cookie_replies", cookies));
    }
    v
}

fn ip6(src: &str, dst: &str, payload: &[u8]) -> Vec<u8> {
    fixtures::ip6(src.parse().unwrap(), dst.parse().unwrap(), payload)
}

/// a and b with a session up (one packet delivered to b).
fn connected() -> (Device, Device, Net) {
    let (a, b, _, _) = pair();
    let mut net = Net::new();
    net.send(&a, A_ADDR, &ip4([100, 64, 0, 1], [100, 64, 0, 2], b"hi"));
    net.run(&a, &b);
    assert_eq!(net.delivered.len(), 1, "session up");
    (a, b, net)
}

#[test]
fn handshake_then_data_both_ways() {
    let (a, b, _, _) = pair();
    let mut net = Net {
        wire: VecDeque::new(),
        delivered: Vec::new(),
    };
    let p1 = ip4([100, 64, 0, 1], [100, 64, 0, 2], b"hello b");
    net.send(&a, A_ADDR, &p1);
    net.run(&a, &b);
    assert_eq!(
        net.delivered,
        vec![("b", p1.clone())],
        "queued packet flushed after handshake"
    );

    let p2 = ip4([100, 64, 0, 2], [100, 64, 0, 1], b"hello a");
    net.send(&b, B_ADDR, &p2);
    net.run(&a, &b);
    assert_eq!(net.delivered.last(), Some(&("a", p2)));
    let tb = b.table();
    assert!(tb.peers()[0].last_handshake().is_some());
}

#[test]
fn spoofed_inner_source_is_dropped_and_counted() {
    let (a, b, _, _) = pair();
    let mut net = Net {
        wire: VecDeque::new(),
        delivered: Vec::new(),
    };
    net.send(&a, A_ADDR, &ip4([100, 64, 0, 1], [100, 64, 0, 2], b"ok"));
    net.run(&a, &b);
    let before = net.delivered.len();
    // a claims to be 100.64.0.9, which is not in its allowed IPs on b.
    net.send(&a, A_ADDR, &ip4([100, 64, 0, 9], [100, 64, 0, 2], b"spoof"));
    net.run(&a, &b);
    assert_eq!(net.delivered.len(), before);
    assert_eq!(
        b.counters
            .snapshot()
            .iter()
            .find(|c| c.0 == "source_not_allowed")
            .unwrap()
            .1,
        1
    );
}

#[test]
fn unknown_key_gets_no_answer() {
    let (_a, b, _, kb) = pair();
    let stranger_key = PrivateKey::generate();
    let stranger = Device::new(stranger_key, 3);
    stranger
        .set_peers(&[spec("b", &kb, B_ADDR, "100.64.0.2/32")])
        .unwrap();
    let mut net = Net {
        wire: VecDeque::new(),
        delivered: Vec::new(),
    };
    net.send(
        &stranger,
        A_ADDR,
        &ip4([100, 64, 0, 1], [100, 64, 0, 2], b"let me in"),
    );
    let (from, _to, init) = net.wire.pop_front().unwrap();
    let table = b.table();
    let mut out = vec![0u8; 2048];
    let r = b.decapsulate(&table, from, &init, &mut out);
    assert!(matches!(r, Decap::Drop(DropReason::UnknownPeer)), "{r:?}");
}

#[test]
fn garbage_is_dropped_and_counted() {
    let (_a, b, _, _) = pair();
    let table = b.table();
    let mut out = vec![0u8; 2048];
    let from: SocketAddr = A_ADDR.parse().unwrap();
    for junk in [
        &b""[..],
        b"\x01",
        b"\x04\0\0\0garbage-data-message",
        &[0xffu8; 148][..],
    ] {
        let r = b.decapsulate(&table, from, junk, &mut out);
        assert!(matches!(r, Decap::Drop(_)), "{r:?}");
    }
    let dropped: u64 = b.counters.snapshot().iter().map(|c| c.1).sum();
    assert_eq!(dropped, 4);
}

#[test]
fn roaming_follows_authenticated_packets() {
    let (a, b, _, _) = pair();
    let mut net = Net {
        wire: VecDeque::new(),
        delivered: Vec::new(),
    };
    net.send(&a, A_ADDR, &ip4([100, 64, 0, 1], [100, 64, 0, 2], b"x"));
    net.run(&a, &b);
    // a moves: its next data packet arrives from a new address.
    let moved: SocketAddr = "198.18.0.77:51820".parse().unwrap();
    let p = ip4([100, 64, 0, 1], [100, 64, 0, 2], b"moved");
    net.send(&a, A_ADDR, &p);
    let (_, _, d) = net.wire.pop_front().unwrap();
    let table = b.table();
    let mut out = vec![0u8; 2048];
    assert!(matches!(
        b.decapsulate(&table, moved, &d, &mut out),
        Decap::Deliver { .. }
    ));
    assert_eq!(table.peers()[0].endpoint(), Some(moved));
    // A forged (unauthenticated) datagram from elsewhere does not move it.
    let mut forged = d.clone();
    forged[20] ^= 1;
    let evil: SocketAddr = "198.18.0.99:1".parse().unwrap();
    assert!(matches!(
        b.decapsulate(&table, evil, &forged, &mut out),
        Decap::Drop(_)
    ));
    assert_eq!(table.peers()[0].endpoint(), Some(moved));
}

#[test]
fn cookie_reply_under_load() {
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let a = Device::new(ka.clone(), 1);
    // b considers itself under load after 2 handshakes per second.
    let b = Device::with_load_limit(kb.clone(), 2, 2);
    a.set_peers(&[spec("b", &kb, B_ADDR, "100.64.0.2/32")])
        .unwrap();
    b.set_peers(&[spec("a", &ka, A_ADDR, "100.64.0.1/32")])
        .unwrap();
    let mut out = vec![0u8; 2048];
    let from: SocketAddr = A_ADDR.parse().unwrap();
    let mut cookies = 0;
    for _ in 0..6 {
        let table = a.table();
        let peer = &table.peers()[0];
        let init = peer.lock().format_handshake_initiation(&mut out, true);
        let init = match init {
            meshd_tunnel::TunnResult::WriteToNetwork(d) => d.to_vec(),
            _ => continue,
        };
        let tb = b.table();
        let mut o2 = vec![0u8; 2048];
        if let Decap::Reply {
            peer: None,
            datagram,
        } = b.decapsulate(&tb, from, &init, &mut o2)
        {
            assert_eq!(datagram.len(), 64, "cookie reply");
            cookies += 1;
        }
    }
    assert!(cookies > 0, "under load, handshakes get cookie replies");
    // Each is counted as sent, and as nothing else.
    assert_eq!(nonzero(&b), vec![("cookie_replies", cookies)]);
}

#[test]
fn inner_destination_other_than_ours_is_dropped_and_counted() {
    let (a, b, mut net) = connected();
    // a (allowed to reach b) sends through b to a third host, b's broadcast and multicast.
    for dst in [
        [198, 18, 0, 3],
        [10, 1, 2, 3],
        [100, 64, 0, 3],
        [255, 255, 255, 255],
        [100, 64, 0, 255],
        [224, 0, 0, 1],
    ] {
        net.seal_to_first_peer(&a, A_ADDR, &ip4([100, 64, 0, 1], dst, b"relay me"));
    }
    net.run(&a, &b);
    assert_eq!(
        net.delivered.len(),
        1,
        "nothing but the first packet delivered"
    );
    assert_eq!(nonzero(&b), vec![("inner_destination", 6)]);
    // To b's own address it passes.
    let mine = ip4([100, 64, 0, 1], [100, 64, 0, 2], b"for b");
    net.seal_to_first_peer(&a, A_ADDR, &mine);
    net.run(&a, &b);
    assert_eq!(net.delivered.last(), Some(&("b", mine)));
    assert_eq!(nonzero(&b), vec![("inner_destination", 6)]);
}

#[test]
fn routed_prefix_and_runtime_swap() {
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let a = Device::new(ka.clone(), 1);
    let b = Device::new(kb.clone(), 2);
    let mut sa = spec("b", &kb, B_ADDR, "100.64.0.2/32");
    sa.allowed_ips.push("fd00::2/128".parse().unwrap());
    a.set_peers(&[sa]).unwrap();
    let mut sb = spec("a", &ka, A_ADDR, "100.64.0.1/32");
    sb.allowed_ips.push("fd00::1/128".parse().unwrap());
    b.set_peers(&[sb]).unwrap();
    b.set_destinations(own(&["100.64.0.2", "fd00::2"], &[]));
    let mut net = Net::new();
    let relayed = ip4([100, 64, 0, 1], [10, 1, 2, 3], b"to the subnet behind b");
    let relayed6 = ip6("fd00::1", "fd10::3", b"v6 subnet");
    let mine6 = ip6("fd00::1", "fd00::2", b"v6 for b");
    for p in [&relayed, &relayed6, &mine6] {
        net.seal_to_first_peer(&a, A_ADDR, p);
    }
    net.run(&a, &b);
    assert_eq!(net.delivered, vec![("b", mine6.clone())]);
    assert_eq!(nonzero(&b), vec![("inner_destination", 2)]);
    // The operator routes 10.1.0.0/16 and fd10::/64 through b: swapped in while running.
    assert!(b.set_destinations(own(
        &["100.64.0.2", "fd00::2"],
        &["10.1.0.0/16", "fd10::/64"]
    )));
    assert!(!b.set_destinations(own(
        &["100.64.0.2", "fd00::2"],
        &["10.1.0.0/16", "fd10::/64"]
    )));
    net.seal_to_first_peer(&a, A_ADDR, &relayed);
    net.seal_to_first_peer(&a, A_ADDR, &relayed6);
    // Outside the routed prefix: still dropped.
    net.seal_to_first_peer(&a, A_ADDR, &ip4([100, 64, 0, 1], [10, 2, 0, 1], b"x"));
    net.run(&a, &b);
    assert_eq!(
        net.delivered,
        vec![("b", mine6), ("b", relayed), ("b", relayed6)]
    );
    assert_eq!(nonzero(&b), vec![("inner_destination", 3)]);
}

#[test]
fn replayed_initiation_is_counted_as_such() {
    let (a, b, _, _) = pair();
    let mut net = Net::new();
    net.send(&a, A_ADDR, &ip4([100, 64, 0, 1], [100, 64, 0, 2], b"x"));
    let (from, _to, init) = net.wire.pop_front().unwrap();
    let table = b.table();
    let mut out = vec![0u8; 2048];
    assert!(matches!(
        b.decapsulate(&table, from, &init, &mut out),
        Decap::Reply { peer: Some(_), .. }
    ));
    assert_eq!(nonzero(&b), vec![]);
    // An attacker replays the captured initiation (from anywhere): refused, counted as a
    // replay, no answer, and the peer's endpoint does not move.
    let evil: SocketAddr = "198.18.0.99:4444".parse().unwrap();
    for _ in 0..3 {
        let r = b.decapsulate(&table, evil, &init, &mut out);
        assert!(
            matches!(r, Decap::Drop(DropReason::ReplayedInitiation)),
            "{r:?}"
        );
    }
    assert_eq!(nonzero(&b), vec![("replayed_initiation", 3)]);
    assert_eq!(table.peers()[0].endpoint(), Some(from));
}

#[test]
fn malformed_inner_packet_is_counted_as_such() {
    let (a, b, mut net) = connected();
    // Authenticated, but the payload is not an IP packet: a bad version nibble, an IPv4
    // header cut short, a total length beyond the payload, and one shorter than a header.
    let mut short_len = ip4([100, 64, 0, 1], [100, 64, 0, 2], b"payload");
    short_len[2..4].copy_from_slice(&8u16.to_be_bytes());
    let mut long_len = ip4([100, 64, 0, 1], [100, 64, 0, 2], b"payload");
    long_len[2..4].copy_from_slice(&1400u16.to_be_bytes());
    for junk in [
        b"\x99 definitely not an IP packet".to_vec(),
        vec![0x45, 0, 0, 19, 0, 0, 0, 0, 64, 17, 0, 0, 100, 64, 0],
        long_len,
        short_len,
    ] {
        net.seal_to_first_peer(&a, A_ADDR, &junk);
    }
    net.run(&a, &b);
    assert_eq!(net.delivered.len(), 1, "none of it delivered");
    assert_eq!(nonzero(&b), vec![("malformed_inner", 4)]);
}

/// Sends one packet each way and returns how many of the two arrived.
fn exchange(net: &mut Net, a: &Device, b: &Device, tag: &[u8]) -> usize {
    let before = net.delivered.len();
    net.send(a, A_ADDR, &ip4([100, 64, 0, 1], [100, 64, 0, 2], tag));
    net.run(a, b);
    net.send(b, B_ADDR, &ip4([100, 64, 0, 2], [100, 64, 0, 1], tag));
    net.run(a, b);
    net.delivered.len() - before
}

/// Issue 17 key rotation: b learns a's next key (a second entry, same allowed IPs), a
/// switches its static key, both directions keep flowing (the packet that triggers the new
/// handshake is queued and flushed, not lost), and once the rotation completes (a's new key
/// is its only key) the session made under the new key is kept.
#[test]
fn key_rotation_keeps_traffic_flowing() {
    let (a, b, ka, kb) = pair();
    let mut net = Net::new();
    assert_eq!(exchange(&mut net, &a, &b, b"before"), 2);

    // Phase 1: b accepts a's old and next key.
    let next = PrivateKey::generate();
    let mut sa = spec("a", &ka, A_ADDR, "100.64.0.1/32");
    sa.next_key = Some(next.public_key());
    let diff = b.set_peers(std::slice::from_ref(&sa)).unwrap();
    assert!(diff.added.is_empty() && diff.restarted.is_empty(), "{diff}");
    assert_eq!(b.table().peers().len(), 2);
    // Nothing changed for traffic yet: the old session still carries it.
    assert_eq!(exchange(&mut net, &a, &b, b"during"), 2);

    // Phase 2: a switches; its re-handshake under the new key is what the timers send.
    a.set_private_key(next.clone());
    assert_eq!(a.public_key(), next.public_key());
    assert!(a.take_initiate_request() && !a.take_initiate_request());
    let mut scratch = vec![0u8; 2048];
    let mut sends = Vec::new();
    a.initiate_all(&mut scratch, |to, d| sends.push((to, d.to_vec())));
    assert_eq!(sends.len(), 1);
    for (to, d) in sends {
        net.wire.push_back((A_ADDR.parse().unwrap(), to, d));
    }
    net.run(&a, &b);
    // b heard the new key: traffic to a goes to that entry, and a's packets are admitted.
    let table = b.table();
    let via = b
        .route(&table, &ip4([100, 64, 0, 2], [100, 64, 0, 1], b"x"))
        .unwrap();
    assert_eq!(via.public_key, next.public_key());
    drop(table);
    assert_eq!(exchange(&mut net, &a, &b, b"switched"), 2);
    assert_eq!(b.counters.source_not_allowed.load(Ordering::Relaxed), 0);

    // Phase 3: the rotation completes: only the new key; its session is kept.
    let done = spec("a", &next, A_ADDR, "100.64.0.1/32");
    let diff = b.set_peers(&[done]).unwrap();
    assert!(
        diff.removed.is_empty() && diff.restarted.is_empty() && diff.added.is_empty(),
        "{diff}"
    );
    assert_eq!(b.table().peers().len(), 1);
    let kept = b.table().peers()[0].last_handshake();
    assert!(kept.is_some(), "session under the new key kept");
    assert_eq!(exchange(&mut net, &a, &b, b"after"), 2);
    let _ = kb;
}

/// A peer that only knows a rotating host's old key refuses the new one (so a stolen next
/// key is useless until the coordinator distributes it), and the old key keeps working
/// while the next key is merely announced.
#[test]
fn next_key_is_accepted_only_where_announced() {
    let (a, b, _ka, _kb) = pair();
    let mut net = Net::new();
    assert_eq!(exchange(&mut net, &a, &b, b"before"), 2);
    a.set_private_key(PrivateKey::generate());
    let mut scratch = vec![0u8; 2048];
    let mut sends = Vec::new();
    a.initiate_all(&mut scratch, |to, d| sends.push((to, d.to_vec())));
    for (to, d) in sends {
        net.wire.push_back((A_ADDR.parse().unwrap(), to, d));
    }
    net.run(&a, &b);
    assert!(b.counters.unknown_peer.load(Ordering::Relaxed) >= 1);
    assert_eq!(b.table().peers().len(), 1);
}
