//! Per-packet cost of the identity firewall: a packet of an established TCP flow (the common
//! case, target < 50 ns), and new-flow admission with 1,000 grants on the peer.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use meshd_firewall::tcp_flags::{ACK, SYN};
use meshd_firewall::{build, Config, Firewall};
use meshd_policy::{Direction, Grant, PeerGrants, Proto};

const NOW: u64 = 1_700_000_000_000;
type Key = [u8; 32];
const PEER: Key = [7; 32];

fn l4() -> IpAddr {
    Ipv4Addr::new(100, 64, 0, 1).into()
}
fn r4() -> IpAddr {
    Ipv4Addr::new(100, 64, 0, 2).into()
}

/// 1,000 TCP grants for single ports 10000..10999 (the last admits port 10999), expiring.
fn thousand_grants() -> PeerGrants {
    let g = (0..1000u16)
        .map(|i| Grant {
            proto: Proto::Tcp,
            ports: (10_000 + i, 10_000 + i),
            expires_at: Some(NOW / 1000 + 86_400),
            rule: format!("rule-{i}"),
        })
        .collect::<Vec<_>>();
    PeerGrants {
        deny: Default::default(),
        learn: false,
        outbound: g.clone(),
        inbound: g,
    }
}

/// Benches one established-flow packet with peer identity `peer` (a 32-byte public key or a
/// 4-byte peer index: the key is hashed on every packet, so its size shows).
fn bench_established<P: Copy + Eq + std::hash::Hash + Send + Sync>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    peer: P,
    l: IpAddr,
    r: IpAddr,
) {
    let fw: Firewall<P> = Firewall::new(Config::default());
    let grants = thousand_grants();
    // Fill the table a little so lookups are not into an empty map.
    for p in 0..2000u16 {
        let syn = build::tcp(l, 20_000 + p, r, 10_999, SYN);
        assert!(fw
            .check(peer, &grants, 1, Direction::Outbound, &syn, NOW)
            .is_allow());
    }
    let all = PeerGrants::allow_all("all");
    let syn = build::tcp(l, 40_000, r, 1521, SYN);
    assert!(fw
        .check(peer, &all, 1, Direction::Outbound, &syn, NOW)
        .is_allow());
    let reply = build::tcp(r, 1521, l, 40_000, SYN | ACK);
    assert!(fw
        .check(peer, &all, 1, Direction::Inbound, &reply, NOW)
        .is_allow());
    // A full-size data segment (the firewall reads headers only).
    let mut tcp = build::tcp(r, 1521, l, 40_000, ACK)[if l.is_ipv4() { 20 } else { 40 }..].to_vec();
    tcp.resize(20 + 1380, 0);
    let data = build::ip(r, l, meshd_policy::ip_proto::TCP, &tcp);
    assert!(fw
        .check(peer, &all, 1, Direction::Inbound, &data, NOW)
        .is_allow());
    group.bench_function(name, |b| {
        b.iter(|| {
            fw.check(
                black_box(peer),
                &all,
                1,
                Direction::Inbound,
                black_box(&data),
                NOW + 5,
            )
        })
    });
}

fn established(c: &mut Criterion) {
    let mut group = c.benchmark_group("check");
    group.throughput(Throughput::Elements(1));
    let (l6, r6): (IpAddr, IpAddr) = (
        "fd00::1".parse::<Ipv6Addr>().unwrap().into(),
        "fd00::2".parse::<Ipv6Addr>().unwrap().into(),
    );
    bench_established(&mut group, "established_tcp_v4_key32", PEER, l4(), r4());
    bench_established(&mut group, "established_tcp_v6_key32", PEER, l6, r6);
    bench_established(&mut group, "established_tcp_v4_index", 7u32, l4(), r4());
    bench_established(&mut group, "established_tcp_v6_index", 7u32, l6, r6);
    group.finish();
}

fn new_flows(c: &mut Criterion) {
    let mut group = c.benchmark_group("check");
    group.throughput(Throughput::Elements(1));
    let grants = thousand_grants();

    // Denied after scanning all 1,000 grants (and the expired-reason scan).
    let fw: Firewall<Key> = Firewall::new(Config::default());
    let denied = build::tcp(l4(), 40_000, r4(), 22, SYN);
    group.bench_function("new_flow_denied_1000_grants", |b| {
        b.iter(|| {
            fw.check(
                black_box(PEER),
                &grants,
                1,
                Direction::Outbound,
                black_box(&denied),
                NOW,
            )
        })
    });

    // Admitted by the last of 1,000 grants and inserted: a distinct flow per iteration, a
    // fresh table every 65,536 (its growth is part of the cost).
    let packets: Vec<Vec<u8>> = (0..=u16::MAX)
        .map(|p| build::tcp(l4(), p, r4(), 10_999, SYN))
        .collect();
    group.bench_function("new_flow_admitted_1000_grants", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(packets.len() as u64) as usize;
                let fw: Firewall<Key> = Firewall::new(Config {
                    max_flows: 1 << 17,
                    ..Config::default()
                });
                let start = Instant::now();
                for p in &packets[..n] {
                    let v = fw.check(PEER, &grants, 1, Direction::Outbound, black_box(p), NOW);
                    let _ = black_box(v);
                }
                total += start.elapsed();
                left -= n as u64;
            }
            total
        })
    });

    // A tracked flow re-checked after a grants version bump (1,000 grants, match is last).
    let fw: Firewall<Key> = Firewall::new(Config::default());
    let syn = build::tcp(l4(), 40_000, r4(), 10_999, SYN);
    assert!(fw
        .check(PEER, &grants, 1, Direction::Outbound, &syn, NOW)
        .is_allow());
    let reply = build::tcp(r4(), 10_999, l4(), 40_000, ACK);
    let mut version = 1u64;
    group.bench_function("recheck_after_bump_1000_grants", |b| {
        b.iter(|| {
            version += 1;
            fw.check(
                black_box(PEER),
                &grants,
                version,
                Direction::Inbound,
                black_box(&reply),
                NOW,
            )
        })
    });
    group.finish();
}

criterion_group!(benches, established, new_flows);
criterion_main!(benches);
