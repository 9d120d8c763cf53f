//! Data-path micro-benchmarks: seal and open of a 1420-byte packet (ns/packet), the route
//! lookup, and complete handshakes per second. Run: `cargo bench -p meshd-tunnel`.

use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use meshd_tunnel::{Decap, Destinations, Device, Encap, PeerSpec, PrivateKey, TunnResult};

fn spec(name: &str, key: &PrivateKey, ep: &str, ip: &str) -> PeerSpec {
    PeerSpec {
        next_key: None,
        name: name.into(),
        public_key: key.public_key(),
        endpoint: Some(ep.parse().expect("endpoint")),
        allowed_ips: vec![ip.parse().expect("prefix")],
        persistent_keepalive: None,
        preshared_key: None,
        grants: Default::default(),
    }
}

fn ip4(len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[12..16].copy_from_slice(&[100, 64, 0, 1]);
    p[16..20].copy_from_slice(&[100, 64, 0, 2]);
    p
}

const A: &str = "198.18.0.1:51820";
const B: &str = "198.18.0.2:51820";

/// Two devices that know each other, no session yet.
fn fresh_pair() -> (Device, Device) {
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let a = Device::new(ka.clone(), 1);
    let b = Device::new(kb.clone(), 2);
    a.set_peers(&[spec("b", &kb, B, "100.64.0.2/32")])
        .expect("peers");
    b.set_peers(&[spec("a", &ka, A, "100.64.0.1/32")])
        .expect("peers");
    let own = |ip: [u8; 4]| Destinations::new([ip.into()], &[]);
    a.set_destinations(own([100, 64, 0, 1]));
    b.set_destinations(own([100, 64, 0, 2]));
    (a, b)
}

/// Two devices with an established session.
fn pair() -> (Device, Device) {
    let (a, b) = fresh_pair();
    handshake(&a, &b);
    (a, b)
}

/// Runs one full handshake a -> b -> a and confirms it with a data packet.
fn handshake(a: &Device, b: &Device) {
    let (from_a, from_b): (SocketAddr, SocketAddr) = (A.parse().unwrap(), B.parse().unwrap());
    let mut buf = vec![0u8; 2048];
    let mut out = vec![0u8; 2048];
    let ta = a.table();
    let init = match ta.peers()[0]
        .lock()
        .format_handshake_initiation(&mut buf, true)
    {
        TunnResult::WriteToNetwork(d) => d.to_vec(),
        other => panic!("{other:?}"),
    };
    let tb = b.table();
    let resp = match b.decapsulate(&tb, from_a, &init, &mut out) {
        Decap::Reply { datagram, .. } => datagram.to_vec(),
        other => panic!("{other:?}"),
    };
    let keepalive = match a.decapsulate(&ta, from_b, &resp, &mut out) {
        Decap::Reply { datagram, .. } => datagram.to_vec(),
        other => panic!("{other:?}"),
    };
    let _ = b.decapsulate(&tb, from_a, &keepalive, &mut out);
}

fn bench(c: &mut Criterion) {
    let (a, b) = pair();
    let packet = ip4(1420);
    let mut sealed = vec![0u8; 2048];
    let mut opened = vec![0u8; 2048];
    let from_a: SocketAddr = A.parse().unwrap();

    let mut g = c.benchmark_group("data");
    g.throughput(Throughput::Bytes(packet.len() as u64));
    g.bench_function("encapsulate_1420", |bench| {
        let table = a.table();
        bench.iter(|| {
            let peer = a.route(&table, &packet).expect("route");
            let mut tunn = peer.lock();
            match a.encapsulate(peer, &mut tunn, &packet, &mut sealed) {
                Encap::Send { datagram, .. } => datagram.len(),
                other => panic!("{other:?}"),
            }
        })
    });
    g.bench_function("decapsulate_1420", |bench| {
        // Fresh ciphertexts each round (replay protection rejects repeats).
        let ta = a.table();
        let tb = b.table();
        bench.iter_batched(
            || {
                let peer = &ta.peers()[0];
                let mut tunn = peer.lock();
                match a.encapsulate(peer, &mut tunn, &packet, &mut sealed) {
                    Encap::Send { datagram, .. } => datagram.to_vec(),
                    other => panic!("{other:?}"),
                }
            },
            |d| match b.decapsulate(&tb, from_a, &d, &mut opened) {
                Decap::Deliver { packet, .. } => packet.len(),
                other => panic!("{other:?}"),
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("route_lookup", |bench| {
        let table = a.table();
        bench.iter(|| a.route(&table, &packet).is_ok())
    });
    g.finish();

    let mut g = c.benchmark_group("handshake");
    g.throughput(Throughput::Elements(1));
    // Initiation, response and confirmation, both sides' work (four X25519 operations each).
    g.bench_function("full_handshake", |bench| {
        bench.iter_batched(
            fresh_pair,
            |(a, b)| handshake(&a, &b),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
