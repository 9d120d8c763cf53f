//! Encrypt+decrypt throughput from 1 to N worker threads, in process (issue 19, point 3): no
//! kernel, no TUN, no socket — what the crypto of the packet path can do per core and how it
//! scales with threads, apart from everything else on the host.
//!
//! Run: `cargo run --release -p meshd-tunnel --example cores -- [MAX_THREADS] [SECONDS]`
//! (default: 2 × available_parallelism, at least 4; 2 s per row). `CORES_MAX_PACKETS` bounds
//! each thread's packets per row too (default 4,000,000), so a row ends at whichever comes
//! first.
//!
//! Each worker seals a 1420-byte IPv4 packet on device A ([`Device::encapsulate`], the peer's
//! session locked once per batch of 64 as the tx path does for a run of packets to one peer)
//! and opens it on device B ([`Device::decapsulate_memo`]: parse, receiver index, AEAD open,
//! replay window, cryptokey routing of the inner source, inner destination check) — the same
//! calls, in the same order, as meshd's tx and rx paths, minus the TUN, the sockets and the
//! firewall. A packet counts once: its 1420 plaintext bytes were sealed and opened.
//!
//! Two modes, each printed as one table:
//! - `independent`: every worker owns its own pair of devices with an established session (as
//!   N peers would be spread over N workers). This is the scaling a per-core design can get.
//! - `one-peer`: every worker uses the same pair (one peer). Each direction's session is one
//!   boringtun `Tunn` behind one mutex (every `Tunn` method takes `&mut self`, the AEAD runs
//!   under the lock), so one peer's sealing is serial and so is its opening: this mode can
//!   never exceed about 2× its 1-thread row (A's seal lock and B's open lock run in parallel),
//!   whatever N. It is what a single busy peer gets today, and why per-peer parallel crypto
//!   needs wireguard-go's shape (nonces assigned in order, AEAD outside the lock, results
//!   written in order); see docs/MULTICORE.md.
//!
//! Columns: `Gbit/s` of plaintext over the row's wall time; `ratio` to the 1-thread row;
//! `efficiency` = ratio / threads; `busy` = on-CPU time of the workers over the wall time (in
//! cores, from /proc/thread-self/schedstat), `per busy core` = Gbit/s / busy, and `rq wait` =
//! run-queue wait over the workers' total time (threads that wanted a CPU and had none). Where
//! threads outnumber cores, `busy` stops at the core count and `rq wait` rises: the row then
//! measures the machine, not the code.
//!
//! meshd's data path today runs one tx thread (TUN → seal → UDP) and one rx thread
//! (UDP → open → TUN) per host, whatever the machine has: two workers, one per direction.

use std::net::SocketAddr;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use meshd_tunnel::{Decap, Device, Encap, RouteMemo};

const PACKET: usize = 1420;
/// Packets sealed per lock of the peer's session (the tx path locks once per run).
const BATCH: usize = 64;
#[path = "../../../benches/pair.rs"]
mod pair;
use pair::{ip4, pair, A};

/// On-CPU and run-queue-wait nanoseconds of the calling thread so far.
fn schedstat() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let mut f = s.split_whitespace().map(|x| x.parse::<u64>().unwrap_or(0));
    (f.next().unwrap_or(0), f.next().unwrap_or(0))
}

/// What one worker did in one row.
#[derive(Default, Clone, Copy)]
struct Work {
    packets: u64,
    bytes: u64,
    drops: u64,
    on_cpu_ns: u64,
    wait_ns: u64,
}

/// Seals on `a` and opens on `b` until `limit` or `packets` is reached (checked every batch).
fn worker(a: &Device, b: &Device, limit: Duration, packets: u64, start: &Barrier) -> Work {
    let from_a: SocketAddr = A.parse().unwrap();
    let packet = ip4(PACKET);
    // One sealed datagram per slot of the batch, as the tx path's contiguous send buffer.
    let mut sealed = vec![[0u8; PACKET + 32]; BATCH];
    let mut lens = [0usize; BATCH];
    let mut opened = vec![0u8; PACKET + 32];
    let (ta, tb) = (a.table(), b.table());
    let peer = &ta.peers()[0];
    let local = b.destinations();
    let mut memo = RouteMemo::default();
    let mut w = Work::default();
    start.wait();
    let (cpu0, wait0) = schedstat();
    let t0 = Instant::now();
    while w.packets < packets && t0.elapsed() < limit {
        {
            let mut tunn = peer.lock();
            for (out, len) in sealed.iter_mut().zip(lens.iter_mut()) {
                *len = match a.encapsulate(peer, &mut tunn, &packet, out) {
                    Encap::Send { datagram, .. } => datagram.len(),
                    other => panic!("seal: {other:?}"),
                };
            }
        }
        for (d, &len) in sealed.iter().zip(lens.iter()) {
            match b.decapsulate_memo(&tb, &mut memo, &local, from_a, &d[..len], &mut opened) {
                Decap::Deliver { packet, .. } => w.bytes += packet.len() as u64,
                // One-peer mode: another worker's later counters can push this one out of
                // the replay window.
                Decap::Drop(_) => w.drops += 1,
                other => panic!("open: {other:?}"),
            }
        }
        w.packets += BATCH as u64;
    }
    let (cpu1, wait1) = schedstat();
    w.on_cpu_ns = cpu1.saturating_sub(cpu0);
    w.wait_ns = wait1.saturating_sub(wait0);
    w
}

/// One row: `threads` workers, each on its own pair (`shared` = None) or all on one.
fn row(threads: usize, shared: Option<&(Device, Device)>, limit: Duration, packets: u64) -> Row {
    let own: Vec<(Device, Device)> = match shared {
        Some(_) => Vec::new(),
        None => (0..threads as u32).map(pair).collect(),
    };
    let start = Barrier::new(threads + 1);
    let (works, wall) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let (a, b) = shared.unwrap_or_else(|| &own[i]);
                let start = &start;
                std::thread::Builder::new()
                    .name(format!("cores-{i}"))
                    .spawn_scoped(s, move || worker(a, b, limit, packets, start))
                    .expect("spawn")
            })
            .collect();
        start.wait();
        let t0 = Instant::now();
        let works: Vec<Work> = handles
            .into_iter()
            .map(|h| h.join().expect("worker"))
            .collect();
        (works, t0.elapsed())
    });
    let sum = |f: fn(&Work) -> u64| works.iter().map(f).sum::<u64>();
    Row {
        threads,
        packets: sum(|w| w.packets),
        bytes: sum(|w| w.bytes),
        drops: sum(|w| w.drops),
        on_cpu: Duration::from_nanos(sum(|w| w.on_cpu_ns)),
        wait: Duration::from_nanos(sum(|w| w.wait_ns)),
        wall,
    }
}

struct Row {
    threads: usize,
    packets: u64,
    bytes: u64,
    drops: u64,
    on_cpu: Duration,
    wait: Duration,
    wall: Duration,
}

impl Row {
    fn gbits(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.wall.as_secs_f64() / 1e9
    }
}

/// 1, 2, 3, 4, then doubling, and always `max` itself.
fn thread_counts(max: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (1..=max.min(4)).collect();
    let mut n = 8;
    while n < max {
        v.push(n);
        n *= 2;
    }
    if *v.last().unwrap_or(&0) != max {
        v.push(max);
    }
    v
}

fn table(mode: &str, about: &str, counts: &[usize], mut run: impl FnMut(usize) -> Row) {
    println!();
    println!("mode {mode}: {about}");
    println!(
        "{:>7} {:>10} {:>8} {:>7} {:>10} {:>6} {:>14} {:>8} {:>8}",
        "threads",
        "packets",
        "Gbit/s",
        "ratio",
        "efficiency",
        "busy",
        "per busy core",
        "rq wait",
        "drops"
    );
    let mut base = None;
    for &n in counts {
        let r = run(n);
        let g = r.gbits();
        let base = *base.get_or_insert(g);
        let ratio = g / base;
        let busy = r.on_cpu.as_secs_f64() / r.wall.as_secs_f64();
        let total = (r.on_cpu + r.wait).as_secs_f64();
        let wait = if total > 0.0 {
            100.0 * r.wait.as_secs_f64() / total
        } else {
            0.0
        };
        println!(
            "{:>7} {:>10} {:>8.2} {:>6.2}x {:>9.0}% {:>6.2} {:>14.2} {:>7.1}% {:>8}",
            r.threads,
            r.packets,
            g,
            ratio,
            100.0 * ratio / n as f64,
            busy,
            if busy > 0.0 { g / busy } else { 0.0 },
            wait,
            r.drops
        );
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let max: usize = args
        .next()
        .map(|a| a.parse().expect("MAX_THREADS: a number"))
        .unwrap_or((2 * cores).max(4))
        .max(1);
    let secs: f64 = args
        .next()
        .map(|a| a.parse().expect("SECONDS: a number"))
        .unwrap_or(2.0);
    let limit = Duration::from_secs_f64(secs);
    let packets: u64 = std::env::var("CORES_MAX_PACKETS")
        .ok()
        .map(|v| v.parse().expect("CORES_MAX_PACKETS: a number"))
        .unwrap_or(4_000_000);
    let counts = thread_counts(max);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    println!("# cores: seal+open of {PACKET}-byte IPv4 packets in process (meshd-tunnel Device pairs over boringtun/ring; no kernel, no TUN, no socket, no firewall)");
    println!("# available_parallelism {cores}; threads {counts:?}; each row {secs} s or {packets} packets per thread, whichever first; seal batch {BATCH}");
    println!("# loadavg at start: {}", load.trim());
    println!("# a packet counts once (1420 plaintext bytes sealed and opened); ratio = Gbit/s / 1-thread row; efficiency = ratio / threads");
    println!("# meshd today: one tx thread (seal) and one rx thread (open) per host, whatever the machine has");

    table(
        "independent",
        "each worker owns one Device pair (its own sessions): N peers spread over N workers",
        &counts,
        |n| row(n, None, limit, packets),
    );
    table(
        "one-peer",
        "every worker on the same Device pair: one peer's session per direction, each behind one lock (ceiling about 2x the 1-thread row)",
        &counts,
        |n| row(n, Some(&pair(1_000 + n as u32)), limit, packets),
    );
}
