//! Data-path micro-benchmarks: seal and open of a 1420-byte packet (ns/packet), the route
//! lookup, and complete handshakes per second. Run: `cargo bench -p meshd-tunnel`.

use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use meshd_tunnel::{Decap, Encap};

mod pair;
use pair::{fresh_pair, handshake, ip4, pair, A};

fn bench(c: &mut Criterion) {
    let (a, b) = pair(0);
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
            || fresh_pair(0),
            |(a, b)| handshake(&a, &b),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
