//! Two hosts over the fake link, driven by [`Pump`]s in one thread: no root, no sockets,
//! no sleeping. Each test runs in milliseconds.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use meshd_firewall::build;
use meshd_policy::{Grant, PeerGrants, Proto};
use meshd_tunnel::{Device, PeerSpec, PrivateKey};

use crate::dataplane::{
    local_destinations, Dataplane, Enforcement, Fake, FakeHost, FakeNet, Now, Pump,
};

const UNDERLAY: [&str; 2] = ["198.18.0.1:51820", "198.18.0.2:51820"];
const OVERLAY: [&str; 2] = ["100.64.0.1", "100.64.0.2"];
/// Bytes that mark an inner payload (must never be seen on the link).
const MARKER: &[u8; 16] = b"inner-payload-42";

fn under(i: usize) -> SocketAddr {
    UNDERLAY[i].parse().unwrap()
}

fn over(i: usize) -> IpAddr {
    OVERLAY[i].parse().unwrap()
}

/// A TCP segment with `flags`, sequence number `seq` and `payload`.
fn tcp(src: IpAddr, dst: IpAddr, dport: u16, flags: u8, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut l4 = vec![0u8; 20];
    l4[0..2].copy_from_slice(&40000u16.to_be_bytes());
    l4[2..4].copy_from_slice(&dport.to_be_bytes());
    l4[4..8].copy_from_slice(&seq.to_be_bytes());
    l4[12] = 5 << 4;
    l4[13] = flags;
    l4.extend_from_slice(payload);
    build::ip(src, dst, meshd_policy::ip_proto::TCP, &l4)
}

fn udp_with_marker(src: IpAddr, dst: IpAddr) -> Vec<u8> {
    let mut l4 = vec![0u8; 8];
    l4[0..2].copy_from_slice(&40000u16.to_be_bytes());
    l4[2..4].copy_from_slice(&53u16.to_be_bytes());
    l4[4..6].copy_from_slice(&((8 + MARKER.len()) as u16).to_be_bytes());
    l4.extend_from_slice(MARKER);
    build::ip(src, dst, meshd_policy::ip_proto::UDP, &l4)
}

struct Node {
    host: FakeHost,
    pump: Pump<Fake>,
    policy: Arc<Enforcement>,
    device: Arc<Device>,
}

/// Two hosts that list each other; `grants[i]` is what host `i` grants its peer.
struct Pair {
    net: FakeNet,
    nodes: Vec<Node>,
    micros: u64,
}

const T0_UNIX_MS: u64 = 1_800_000_000_000;

impl Pair {
    fn new(offload: [bool; 2], grants: [PeerGrants; 2]) -> Pair {
        let net = FakeNet::new();
        let keys = [PrivateKey::generate(), PrivateKey::generate()];
        let mut nodes = Vec::new();
        for i in 0..2 {
            let other = 1 - i;
            let device = Arc::new(Device::new(keys[i].clone(), i as u32 + 1));
            device
                .set_peers(&[PeerSpec {
                    next_key: None,
                    name: format!("host{other}"),
                    public_key: keys[other].public_key(),
                    endpoint: Some(under(other)),
                    allowed_ips: vec![IpNet::from(over(other))],
                    persistent_keepalive: None,
                    preshared_key: None,
                    grants: Arc::new(grants[i].clone()),
                }])
                .unwrap();
            let own = [IpNet::new(over(i), 10).unwrap()];
            device.set_destinations(local_destinations(&own, &[], &[]));
            let host = net.host(under(i), offload[i]);
            let policy = Arc::new(Enforcement::new());
            let pump = Pump::new(device.clone(), policy.clone(), host.edges(), 1420).unwrap();
            nodes.push(Node {
                host,
                pump,
                policy,
                device,
            });
        }
        Pair {
            net,
            nodes,
            micros: 0,
        }
    }

    fn allow_all() -> Pair {
        Pair::new(
            [false, false],
            [PeerGrants::allow_all("all"), PeerGrants::allow_all("all")],
        )
    }

    fn now(&self) -> Now {
        Now {
            micros: self.micros,
            unix_ms: T0_UNIX_MS + self.micros / 1000,
        }
    }

    /// Runs every host's passes until nothing is queued anywhere (bounded).
    fn settle(&mut self) {
        for _ in 0..50 {
            self.micros += 100;
            let now = self.now();
            for n in &mut self.nodes {
                n.pump.tx_pass(now).unwrap();
                n.pump.rx_pass(now);
            }
            let queued: usize = self.nodes.iter().map(|n| n.host.tun.pending()).sum();
            if queued == 0 && self.net.in_flight() == 0 {
                return;
            }
        }
        panic!("the fake mesh did not settle");
    }

    /// Every datagram on the link so far is a WireGuard message and hides the marker.
    fn assert_wire_is_wireguard(&self) {
        let wire = self.net.wire();
        assert!(!wire.is_empty());
        for w in &wire {
            let d = &w.datagram;
            assert!(
                d.len() >= 32 && (1..=4).contains(&d[0]) && d[1..4] == [0, 0, 0],
                "not a WireGuard message: {:02x?}",
                &d[..d.len().min(8)]
            );
            assert!(
                !d.windows(MARKER.len()).any(|x| x == MARKER),
                "inner payload visible on the link"
            );
        }
    }
}

#[test]
fn a_packet_crosses_the_fake_link_unchanged_and_encrypted() {
    let mut p = Pair::allow_all();
    let packet = udp_with_marker(over(0), over(1));
    p.nodes[0].host.tun.inject(&packet);
    p.settle();
    assert_eq!(p.nodes[1].host.tun.take_delivered(), vec![packet.clone()]);
    assert!(p.nodes[0].host.tun.take_delivered().is_empty());
    // A handshake (initiation, response) went first; the link saw no plaintext.
    let wire = p.net.wire();
    assert_eq!(wire[0].datagram[0], 1, "handshake initiation first");
    assert!(wire.iter().any(|w| w.datagram[0] == 4), "a data message");
    p.assert_wire_is_wireguard();
    // And back, now over the established session.
    let back = udp_with_marker(over(1), over(0));
    p.nodes[1].host.tun.inject(&back);
    p.settle();
    assert_eq!(p.nodes[0].host.tun.take_delivered(), vec![back]);
    p.assert_wire_is_wireguard();
    assert!(
        p.nodes[1]
            .pump
            .stats()
            .datagrams_received
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
}

#[test]
fn a_packet_the_firewall_denies_is_not_delivered_and_counted() {
    // Host 1 admits only tcp/22 from host 0.
    let ssh = PeerGrants {
        deny: Default::default(),
        learn: false,
        outbound: vec![],
        inbound: vec![Grant {
            proto: Proto::Tcp,
            ports: (22, 22),
            expires_at: None,
            rule: "ssh".into(),
        }],
    };
    let mut p = Pair::new([false, false], [PeerGrants::allow_all("all"), ssh]);
    p.nodes[0]
        .host
        .tun
        .inject(&udp_with_marker(over(0), over(1)));
    p.settle();
    assert!(p.nodes[1].host.tun.take_delivered().is_empty(), "denied");
    assert_eq!(p.nodes[1].policy.firewall.stats().default_deny, 1);
    let denied = p.nodes[1].policy.blocks.drain(T0_UNIX_MS + 10_000);
    assert_eq!(denied.len(), 1, "one block event for the flow");
    // The path itself works: what the grant admits arrives.
    let syn = tcp(over(0), over(1), 22, 0x02, 1, &[]);
    p.nodes[0].host.tun.inject(&syn);
    p.settle();
    assert_eq!(p.nodes[1].host.tun.take_delivered(), vec![syn]);
    // Outbound too: host 1 may open nothing to host 0.
    p.nodes[1]
        .host
        .tun
        .inject(&tcp(over(1), over(0), 80, 0x02, 1, &[]));
    p.settle();
    assert!(p.nodes[0].host.tun.take_delivered().is_empty());
    assert_eq!(p.nodes[1].policy.firewall.stats().default_deny, 2);
    p.assert_wire_is_wireguard();
}

#[test]
fn a_tso_super_packet_is_split_sent_in_one_gso_run_and_delivered() {
    let mut p = Pair::new(
        [true, false],
        [PeerGrants::allow_all("all"), PeerGrants::allow_all("all")],
    );
    // Open the flow: SYN out, SYN-ACK back (the handshake happens on the way).
    p.nodes[0]
        .host
        .tun
        .inject(&tcp(over(0), over(1), 5001, 0x02, 99, &[]));
    p.settle();
    assert_eq!(p.nodes[1].host.tun.take_delivered().len(), 1);
    // (the SYN-ACK's ports are the reverse of the SYN's)
    let synack = {
        let mut s = tcp(over(1), over(0), 40000, 0x12, 7, &[]);
        s[20..22].copy_from_slice(&5001u16.to_be_bytes());
        s
    };
    p.nodes[1].host.tun.inject(&synack);
    p.settle();
    assert!(p.nodes[0].host.tun.take_delivered().contains(&synack));
    let sends_before = p.net.sends().len();

    // One 24,000-byte super-packet, 20 segments of 1,200.
    const MSS: usize = 1200;
    let payload: Vec<u8> = (0..20 * MSS).map(|i| (i % 251) as u8).collect();
    let sup = tcp(over(0), over(1), 5001, 0x18, 100, &payload);
    p.nodes[0].host.tun.inject_tso(&sup, MSS as u16).unwrap();
    let writes_before = p.nodes[1].host.tun.writes();
    p.micros += 100;
    let now = p.now();
    assert_eq!(
        p.nodes[0].pump.tx_pass(now).unwrap(),
        20,
        "split into 20 packets"
    );
    let sends = p.net.sends()[sends_before..].to_vec();
    let seg = 40 + MSS + 32;
    assert_eq!(sends, vec![(under(1), 20 * seg, Some(seg))], "one GSO send");
    assert_eq!(p.nodes[1].pump.rx_pass(now), 20);
    assert_eq!(
        p.nodes[1].host.tun.writes(),
        writes_before + 1,
        "one TUN write"
    );
    let got = p.nodes[1].host.tun.take_delivered();
    assert_eq!(got.len(), 20);
    let mut joined = Vec::new();
    for (k, g) in got.iter().enumerate() {
        assert_eq!(g.len(), 40 + MSS);
        let seq = u32::from_be_bytes(g[24..28].try_into().unwrap());
        assert_eq!(seq, 100 + (k * MSS) as u32);
        joined.extend_from_slice(&g[40..]);
    }
    assert_eq!(joined, payload);
    p.assert_wire_is_wireguard();
}

#[test]
fn timers_send_the_start_up_handshake() {
    let mut p = Pair::allow_all();
    let now = p.now();
    p.nodes[0].pump.timers(now);
    let wire = p.net.wire();
    assert_eq!(wire.len(), 1);
    assert_eq!((wire[0].to, wire[0].datagram[0]), (under(1), 1));
    p.settle();
    // Initiation, response and the initiator's keepalive that confirms the session;
    // nothing delivered.
    let types: Vec<u8> = p.net.wire().iter().map(|w| w.datagram[0]).collect();
    assert_eq!(types, [1, 2, 4]);
    assert!(p.nodes[1].host.tun.take_delivered().is_empty());
    // Later ticks run the WireGuard timers (boringtun's own clock decides what is due):
    // whatever they send is WireGuard, goes to the peer and delivers nothing.
    p.micros += 1_100_000;
    let now = p.now();
    p.nodes[0].pump.timers(now);
    p.nodes[1].pump.timers(now);
    p.settle();
    assert!(p
        .net
        .wire()
        .iter()
        .all(|w| w.to == under(0) || w.to == under(1)));
    assert!(p.nodes[0].host.tun.take_delivered().is_empty());
    assert!(p.nodes[1].host.tun.take_delivered().is_empty());
    p.assert_wire_is_wireguard();
    assert_eq!(p.nodes[0].device.table().peers().len(), 1);
}

#[test]
fn the_worker_threads_carry_packets_over_the_fakes() {
    let net = FakeNet::new();
    let keys = [PrivateKey::generate(), PrivateKey::generate()];
    let mut hosts = Vec::new();
    let mut planes = Vec::new();
    for i in 0..2 {
        let other = 1 - i;
        let device = Arc::new(Device::new(keys[i].clone(), i as u32 + 1));
        device
            .set_peers(&[PeerSpec {
                next_key: None,
                name: format!("host{other}"),
                public_key: keys[other].public_key(),
                endpoint: Some(under(other)),
                allowed_ips: vec![IpNet::from(over(other))],
                persistent_keepalive: None,
                preshared_key: None,
                grants: Arc::new(PeerGrants::allow_all("all")),
            }])
            .unwrap();
        device.set_destinations(local_destinations(
            &[IpNet::new(over(i), 10).unwrap()],
            &[],
            &[],
        ));
        let host = net.host(under(i), false);
        let dp = Dataplane::<Fake>::start_with(
            device,
            Arc::new(Enforcement::new()),
            host.edges(),
            1420,
            Duration::ZERO,
        )
        .unwrap();
        hosts.push(host);
        planes.push(dp);
    }
    // Request and answer, 20 times, through the real tx/rx/timer threads.
    for k in 0..20u8 {
        let mut req = udp_with_marker(over(0), over(1));
        req[5] = k; // IP identification: each request differs
        hosts[0].tun.inject(&req);
        let got = wait_delivered(&hosts[1]);
        assert_eq!(got, vec![req]);
        let mut answer = udp_with_marker(over(1), over(0));
        answer[5] = k;
        hosts[1].tun.inject(&answer);
        assert_eq!(wait_delivered(&hosts[0]), vec![answer]);
    }
    for dp in planes {
        dp.stop();
    }
    let wire = net.wire();
    assert!(wire.iter().all(|w| (1..=4).contains(&w.datagram[0])
        && !w.datagram.windows(MARKER.len()).any(|x| x == MARKER)));
}

/// What `host`'s TUN got, waiting up to 10 s for the first packet (liveness only).
fn wait_delivered(host: &FakeHost) -> Vec<Vec<u8>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = host.tun.take_delivered();
        if !got.is_empty() {
            return got;
        }
        assert!(std::time::Instant::now() < deadline, "nothing delivered");
        std::thread::sleep(Duration::from_millis(1));
    }
}
