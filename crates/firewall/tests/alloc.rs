//! The packet path allocates nothing per packet: counting a tracked flow's packets, learning
//! mode's would-deny flows and folding retired flows happen in memory reserved earlier.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};

use meshd_firewall::tcp_flags::{ACK, SYN};
use meshd_firewall::{build, Config, Firewall};
use meshd_policy::{Direction, PeerGrants};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

const T0: u64 = 1_700_000_000_000;

#[test]
fn no_allocation_per_packet() {
    let l: IpAddr = Ipv4Addr::new(10, 0, 0, 1).into();
    let r: IpAddr = Ipv4Addr::new(10, 0, 0, 2).into();
    let fw: Firewall<u32> = Firewall::new(Config {
        shards: 1,
        ..Config::default()
    });
    let learn = PeerGrants {
        learn: true,
        ..PeerGrants::allow_all("all")
    };
    let learn_only = PeerGrants {
        learn: true,
        ..PeerGrants::default()
    };
    let syn = build::tcp(l, 40000, r, 5432, SYN);
    let ack = build::tcp(l, 40000, r, 5432, ACK);
    let back = build::tcp(r, 5432, l, 40000, ACK);
    let udp: Vec<Vec<u8>> = (0..64)
        .map(|i| build::udp(l, 1000 + i, r, 53, 100))
        .collect();
    // Warm up: the table and the retired groups reserve their memory.
    assert!(fw
        .check(1, &learn, 1, Direction::Outbound, &syn, T0)
        .is_allow());
    for p in &udp {
        assert!(fw
            .check(1, &learn_only, 1, Direction::Outbound, p, T0)
            .is_allow());
    }
    fw.sweep_all(T0 + 10 * 60_000);
    let mut n = 0;
    fw.collect_flows(&mut |_| n += 1);
    assert!(n > 0);
    let before = ALLOCS.load(Ordering::Relaxed);
    let mut t = T0 + 10 * 60_000;
    for _ in 0..1000 {
        t += 1;
        assert!(fw
            .check(1, &learn, 1, Direction::Outbound, &syn, t)
            .is_allow());
        assert!(fw
            .check(1, &learn, 1, Direction::Inbound, &back, t)
            .is_allow());
        assert!(fw
            .check(1, &learn, 1, Direction::Outbound, &ack, t)
            .is_allow());
    }
    // Would-deny flows opened, counted, timed out and folded into the retired groups.
    for p in &udp {
        assert!(fw
            .check(1, &learn_only, 2, Direction::Outbound, p, t)
            .is_allow());
        assert!(fw
            .check(1, &learn_only, 2, Direction::Outbound, p, t + 1)
            .is_allow());
    }
    fw.sweep_all(t + 10 * 60_000);
    let mut m = 0;
    fw.collect_flows(&mut |_| m += 1);
    assert_eq!(
        ALLOCS.load(Ordering::Relaxed) - before,
        0,
        "allocations on the packet path"
    );
    assert!(m >= 2, "{m}");
}
