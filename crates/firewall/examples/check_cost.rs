//! Runs N packets of one established TCP flow and one UDP flow through `Firewall::check`, with
//! flow counting on or off: the per-packet cost of flow records, counted in instructions by
//! `valgrind --tool=callgrind` (repeatable whatever else the machine is doing):
//!
//! ```text
//! cargo build --release -p meshd-firewall --example check_cost
//! for c in on off; do valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.$c \
//!     target/release/examples/check_cost $c 1000000; done
//! ```
//! The difference of the two totals over 2 × N packets is the cost per packet.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use meshd_firewall::tcp_flags::{ACK, SYN};
use meshd_firewall::{build, Config, Firewall};
use meshd_policy::{ip_proto, Direction, PeerGrants};

const NOW: u64 = 1_700_000_000_000;

fn main() {
    let mut args = std::env::args().skip(1);
    let count_flows = match args.next().as_deref() {
        Some("on") => true,
        Some("off") => false,
        _ => {
            eprintln!("usage: check_cost on|off [PACKETS]");
            std::process::exit(2);
        }
    };
    let n: u64 = match args.next().map(|s| s.parse()) {
        None => 1_000_000,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            eprintln!("PACKETS: {e}");
            std::process::exit(2);
        }
    };
    let fw: Firewall<u32> = Firewall::new(Config {
        count_flows,
        hash_seed: Some(1),
        ..Config::default()
    });
    let all = PeerGrants::allow_all("all");
    let l: IpAddr = Ipv4Addr::new(100, 64, 0, 1).into();
    let r: IpAddr = Ipv4Addr::new(100, 64, 0, 2).into();
    let out = Direction::Outbound;
    let syn = build::tcp(l, 40_000, r, 5201, SYN);
    let synack = build::tcp(r, 5201, l, 40_000, SYN | ACK);
    let ack = build::tcp(l, 40_000, r, 5201, ACK);
    for (p, d) in [(&syn, out), (&synack, Direction::Inbound), (&ack, out)] {
        if !fw.check(7, &all, 1, d, p, NOW).is_allow() {
            eprintln!("handshake denied");
            std::process::exit(1);
        }
    }
    let mut seg = ack[20..].to_vec();
    seg.resize(20 + 1380, 0);
    let data = build::ip(l, r, ip_proto::TCP, &seg);
    let udp = build::udp(l, 40_001, r, 5201, 1392);
    let mut allowed = 0u64;
    for i in 0..n {
        let now = NOW + i / 1000;
        allowed += fw.check(7, &all, 1, out, black_box(&data), now).is_allow() as u64;
        allowed += fw.check(7, &all, 1, out, black_box(&udp), now).is_allow() as u64;
    }
    println!(
        "count_flows={count_flows} packets={} allowed={allowed}",
        2 * n
    );
}
