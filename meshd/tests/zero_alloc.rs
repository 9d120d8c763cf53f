//! Zero allocation per packet (issue 19, point 4): two hosts' packet paths over the fake edges
//! in one thread ([`Pump`]), a session established and the firewall admitting the flows, then
//! 100,000 packets both ways — TCP (TSO super-packets split on the TUN, ACKs back) and UDP —
//! through the whole path: TUN read, route, firewall and conntrack, seal, GSO send, the fake
//! link, receive, open, source and destination checks, firewall, TUN write.
//!
//! A counting global allocator (this binary only) counts allocations, reallocations and frees
//! made on this thread while a tx or rx pass runs ("armed" around each pump call only, so
//! building and checking packets does not count). The fakes used inside the passes reuse
//! their buffers ([`FakeTun::recycle`], the link's train pool) and the link's record of every
//! datagram is off while counting ([`FakeNet::set_recording`]); nothing of the fakes is
//! excluded from the count. Every packet must arrive, in order, with its payload intact.
//!
//! `ZERO_ALLOC_TRACE=1` prints a backtrace for the first few allocations counted after the
//! warm-up.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use meshd::dataplane::{
    local_destinations, Enforcement, Fake, FakeHost, FakeNet, FakeTun, Now, Pump,
};
use meshd_firewall::build;
use meshd_policy::{ip_proto, Grant, PeerGrants, Proto};
use meshd_tunnel::{Device, PeerSpec, PrivateKey};

// ---- the counting allocator -------------------------------------------------------------

/// Which pass is running on this thread (0: none, counting off).
const NONE: u8 = 0;
const TX: u8 = 1;
const RX: u8 = 2;

thread_local! {
    static ARMED: Cell<u8> = const { Cell::new(NONE) };
}

/// Allocations (alloc, alloc_zeroed, realloc) per pass kind, and frees.
static ALLOCS: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
static FREES: AtomicU64 = AtomicU64::new(0);
static TRACE: AtomicBool = AtomicBool::new(false);
static TRACED: AtomicU64 = AtomicU64::new(0);

fn armed() -> u8 {
    ARMED.try_with(Cell::get).unwrap_or(NONE)
}

fn counted_alloc(size: usize) {
    let kind = armed();
    if kind == NONE {
        return;
    }
    ALLOCS[usize::from(kind)].fetch_add(1, Ordering::Relaxed);
    if TRACE.load(Ordering::Relaxed) && TRACED.fetch_add(1, Ordering::Relaxed) < 5 {
        // Disarmed while printing (the backtrace allocates).
        ARMED.set(NONE);
        let pass = if kind == TX { "tx" } else { "rx" };
        eprintln!(
            "allocation of {size} bytes in a {pass} pass:\n{}",
            std::backtrace::Backtrace::force_capture()
        );
        ARMED.set(kind);
    }
}

struct Counting;

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        counted_alloc(l.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        counted_alloc(l.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        counted_alloc(new_size);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, new_size) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        if armed() != NONE {
            FREES.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Runs `f` with counting on, as pass `kind`.
fn pass<T>(kind: u8, f: impl FnOnce() -> T) -> T {
    ARMED.set(kind);
    let r = f();
    ARMED.set(NONE);
    r
}

/// (tx allocations, rx allocations, frees) so far.
fn counts() -> (u64, u64, u64) {
    (
        ALLOCS[usize::from(TX)].load(Ordering::Relaxed),
        ALLOCS[usize::from(RX)].load(Ordering::Relaxed),
        FREES.load(Ordering::Relaxed),
    )
}

// ---- packets ------------------------------------------------------------------------------

const UNDERLAY: [&str; 2] = ["198.18.0.1:51820", "198.18.0.2:51820"];
const OVERLAY: [&str; 2] = ["100.64.0.1", "100.64.0.2"];
const TCP_CLIENT: u16 = 40000;
const TCP_SERVER: u16 = 5001;
const UDP_CLIENT: u16 = 40001;
const UDP_SERVER: u16 = 5353;
const MSS: usize = 1200;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const PSH_ACK: u8 = 0x18;
const T0_UNIX_MS: u64 = 1_800_000_000_000;

fn under(i: usize) -> SocketAddr {
    UNDERLAY[i].parse().unwrap()
}

fn over(i: usize) -> IpAddr {
    OVERLAY[i].parse().unwrap()
}

/// Byte `o` of a TCP stream.
fn stream_byte(o: usize) -> u8 {
    ((o * 31 + (o >> 9)) % 251) as u8
}

#[allow(clippy::too_many_arguments)]
fn tcp(
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    flags: u8,
    seq: u32,
    ack: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut l4 = vec![0u8; 20];
    l4[0..2].copy_from_slice(&sport.to_be_bytes());
    l4[2..4].copy_from_slice(&dport.to_be_bytes());
    l4[4..8].copy_from_slice(&seq.to_be_bytes());
    l4[8..12].copy_from_slice(&ack.to_be_bytes());
    l4[12] = 5 << 4;
    l4[13] = flags;
    l4[14..16].copy_from_slice(&65535u16.to_be_bytes());
    l4.extend_from_slice(payload);
    build::ip(src, dst, ip_proto::TCP, &l4)
}

/// A TCP super-packet carrying stream bytes `[off, off + segments * MSS)`.
fn tcp_burst(
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    off: usize,
    segments: usize,
) -> Vec<u8> {
    let payload: Vec<u8> = (off..off + segments * MSS).map(stream_byte).collect();
    tcp(src, sport, dst, dport, PSH_ACK, off as u32, 1, &payload)
}

/// The payload of UDP datagram number `k` (its number, then a pattern; 16 to 1,215 bytes).
fn udp_payload(k: u64) -> Vec<u8> {
    let len = 16 + (k as usize * 37) % 1200;
    let mut p = k.to_be_bytes().to_vec();
    p.extend((8..len).map(|i| ((k as usize + i) % 253) as u8));
    p
}

fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, k: u64) -> Vec<u8> {
    let payload = udp_payload(k);
    let mut l4 = vec![0u8; 8];
    l4[0..2].copy_from_slice(&sport.to_be_bytes());
    l4[2..4].copy_from_slice(&dport.to_be_bytes());
    l4[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    l4.extend_from_slice(&payload);
    build::ip(src, dst, ip_proto::UDP, &l4)
}

/// What one direction expects next; checks each delivered packet against it.
struct Expect {
    src: IpAddr,
    dst: IpAddr,
    /// TCP: the sender's ports, the next stream offset, the next pure ACK's number.
    tcp_ports: (u16, u16),
    tcp_off: usize,
    ack_no: u32,
    /// UDP: the sender's ports and the next datagram's number.
    udp_ports: (u16, u16),
    udp_k: u64,
    delivered: u64,
}

impl Expect {
    fn check(&mut self, p: &[u8]) {
        assert!(
            p.len() >= 20 && p[0] >> 4 == 4,
            "not IPv4: {:02x?}",
            &p[..p.len().min(8)]
        );
        let ihl = usize::from(p[0] & 0x0f) * 4;
        assert_eq!(
            usize::from(u16::from_be_bytes([p[2], p[3]])),
            p.len(),
            "IP length"
        );
        let (src, dst): ([u8; 4], [u8; 4]) =
            (p[12..16].try_into().unwrap(), p[16..20].try_into().unwrap());
        assert_eq!((IpAddr::from(src), IpAddr::from(dst)), (self.src, self.dst));
        let l4 = &p[ihl..];
        let ports = (
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        );
        match p[9] {
            ip_proto::TCP => {
                assert_eq!(ports, self.tcp_ports);
                let seq = u32::from_be_bytes(l4[4..8].try_into().unwrap());
                let ack = u32::from_be_bytes(l4[8..12].try_into().unwrap());
                let payload = &l4[usize::from(l4[12] >> 4) * 4..];
                if payload.is_empty() {
                    assert_eq!(ack, self.ack_no, "pure ACKs in order");
                    self.ack_no += 1;
                } else {
                    assert_eq!(
                        seq as usize, self.tcp_off,
                        "TCP segments in order, none lost"
                    );
                    assert!(
                        payload
                            .iter()
                            .enumerate()
                            .all(|(i, &b)| b == stream_byte(self.tcp_off + i)),
                        "TCP payload at stream offset {} changed",
                        self.tcp_off
                    );
                    self.tcp_off += payload.len();
                }
            }
            ip_proto::UDP => {
                assert_eq!(ports, self.udp_ports);
                assert_eq!(
                    &l4[8..],
                    &udp_payload(self.udp_k)[..],
                    "UDP datagram {}",
                    self.udp_k
                );
                self.udp_k += 1;
            }
            other => panic!("unexpected protocol {other}"),
        }
        self.delivered += 1;
    }
}

// ---- the two hosts ------------------------------------------------------------------------

struct Node {
    host: FakeHost,
    pump: Pump<Fake>,
    policy: Arc<Enforcement>,
}

fn grant(proto: Proto, port: u16) -> Grant {
    Grant {
        proto,
        ports: (port, port),
        expires_at: None,
        rule: "flow".into(),
    }
}

/// Host 0 (A) may open tcp/5001 and udp/5353 to host 1 (B), which admits exactly those;
/// nothing is granted the other way (B's packets pass as conntrack's answers).
fn hosts(net: &FakeNet) -> Vec<Node> {
    let keys = [PrivateKey::generate(), PrivateKey::generate()];
    let flows = vec![grant(Proto::Tcp, TCP_SERVER), grant(Proto::Udp, UDP_SERVER)];
    let grants = [
        PeerGrants {
            outbound: flows.clone(),
            ..PeerGrants::default()
        },
        PeerGrants {
            inbound: flows,
            ..PeerGrants::default()
        },
    ];
    (0..2)
        .map(|i| {
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
            device.set_destinations(local_destinations(
                &[IpNet::new(over(i), 10).unwrap()],
                &[],
                &[],
            ));
            let host = net.host(under(i), true);
            let policy = Arc::new(Enforcement::new());
            let pump = Pump::new(device, policy.clone(), host.edges(), 1420).unwrap();
            Node { host, pump, policy }
        })
        .collect()
}

/// Packets one round puts on each TUN: A sends a 32-segment TCP burst and 16 UDP
/// datagrams, B 8 pure ACKs, 16 UDP answers and a 16-segment TCP burst of its own.
const A_TCP_SEGMENTS: usize = 32;
const B_TCP_SEGMENTS: usize = 16;
const UDP_PER_ROUND: u64 = 16;
const ACKS_PER_ROUND: u32 = 8;
const PER_ROUND: u64 =
    (A_TCP_SEGMENTS + B_TCP_SEGMENTS) as u64 + 2 * UDP_PER_ROUND + ACKS_PER_ROUND as u64;

struct Run {
    net: FakeNet,
    nodes: Vec<Node>,
    micros: u64,
    /// What B then A should receive next.
    expect: [Expect; 2],
    /// What A and B send next: stream offsets, UDP numbers, ACK numbers.
    a_off: usize,
    b_off: usize,
    a_udp: u64,
    b_udp: u64,
    b_ack: u32,
}

impl Run {
    fn now(&self) -> Now {
        Now {
            micros: self.micros,
            unix_ms: T0_UNIX_MS + self.micros / 1000,
        }
    }

    /// Queues one round's packets on both TUNs (not counted: the fake TUN copies each),
    /// 2 ms after the last round (the virtual run spans seconds: timeouts, stamps and the
    /// tx path's after-a-quiet-spell branch all see time pass).
    fn inject_round(&mut self) {
        self.micros += 2_000;
        let (a, b) = (over(0), over(1));
        let ta = &self.nodes[0].host.tun;
        ta.inject_tso(
            &tcp_burst(a, TCP_CLIENT, b, TCP_SERVER, self.a_off, A_TCP_SEGMENTS),
            MSS as u16,
        )
        .unwrap();
        self.a_off += A_TCP_SEGMENTS * MSS;
        for _ in 0..UDP_PER_ROUND {
            ta.inject(&udp(a, UDP_CLIENT, b, UDP_SERVER, self.a_udp));
            self.a_udp += 1;
        }
        let tb = &self.nodes[1].host.tun;
        for _ in 0..ACKS_PER_ROUND {
            tb.inject(&tcp(b, TCP_SERVER, a, TCP_CLIENT, ACK, 1, self.b_ack, &[]));
            self.b_ack += 1;
        }
        for _ in 0..UDP_PER_ROUND {
            tb.inject(&udp(b, UDP_SERVER, a, UDP_CLIENT, self.b_udp));
            self.b_udp += 1;
        }
        tb.inject_tso(
            &tcp_burst(b, TCP_SERVER, a, TCP_CLIENT, self.b_off, B_TCP_SEGMENTS),
            MSS as u16,
        )
        .unwrap();
        self.b_off += B_TCP_SEGMENTS * MSS;
    }

    /// Runs both hosts' tx and rx passes until every TUN and the link are empty (bounded),
    /// counting allocations inside the passes only.
    fn pump(&mut self) {
        for _ in 0..20 {
            self.micros += 100;
            let now = self.now();
            for n in &mut self.nodes {
                pass(TX, || n.pump.tx_pass(now)).unwrap();
            }
            for n in &mut self.nodes {
                pass(RX, || n.pump.rx_pass(now));
            }
            let queued: usize = self.nodes.iter().map(|n| n.host.tun.pending()).sum();
            if queued == 0 && self.net.in_flight() == 0 {
                return;
            }
        }
        panic!("the fake mesh did not drain");
    }

    /// Checks what each TUN got and gives the buffers back to it.
    fn collect(&mut self) {
        for (i, n) in self.nodes.iter().enumerate() {
            let got = n.host.tun.take_delivered();
            let e = &mut self.expect[1 - i];
            for p in &got {
                e.check(p);
            }
            n.host.tun.recycle(got);
        }
    }

    fn delivered(&self) -> u64 {
        self.expect.iter().map(|e| e.delivered).sum()
    }

    fn sent(&self) -> u64 {
        ((self.a_off + self.b_off) / MSS) as u64 + self.a_udp + self.b_udp + u64::from(self.b_ack)
    }
}

fn tun_of(run: &Run, i: usize) -> &FakeTun {
    &run.nodes[i].host.tun
}

#[test]
fn the_packet_path_allocates_nothing_per_packet() {
    let net = FakeNet::new();
    let nodes = hosts(&net);
    let (a, b) = (over(0), over(1));
    let mut run = Run {
        net,
        nodes,
        micros: 0,
        expect: [
            Expect {
                src: a,
                dst: b,
                tcp_ports: (TCP_CLIENT, TCP_SERVER),
                tcp_off: 0,
                ack_no: 0,
                udp_ports: (UDP_CLIENT, UDP_SERVER),
                udp_k: 0,
                delivered: 0,
            },
            Expect {
                src: b,
                dst: a,
                tcp_ports: (TCP_SERVER, TCP_CLIENT),
                tcp_off: 0,
                ack_no: 0,
                udp_ports: (UDP_SERVER, UDP_CLIENT),
                udp_k: 0,
                delivered: 0,
            },
        ],
        a_off: 0,
        b_off: 0,
        a_udp: 0,
        b_udp: 0,
        b_ack: 0,
    };

    // Set-up: the handshake rides on A's SYN; B answers SYN-ACK, A ACKs.
    tun_of(&run, 0).inject(&tcp(a, TCP_CLIENT, b, TCP_SERVER, SYN, 0, 0, &[]));
    run.pump();
    assert_eq!(tun_of(&run, 1).take_delivered().len(), 1, "SYN delivered");
    tun_of(&run, 1).inject(&tcp(b, TCP_SERVER, a, TCP_CLIENT, SYN | ACK, 0, 1, &[]));
    run.pump();
    assert_eq!(
        tun_of(&run, 0).take_delivered().len(),
        1,
        "SYN-ACK delivered"
    );
    tun_of(&run, 0).inject(&tcp(a, TCP_CLIENT, b, TCP_SERVER, ACK, 1, 1, &[]));
    run.pump();
    assert_eq!(tun_of(&run, 1).take_delivered().len(), 1, "ACK delivered");

    // A's first datagram opens the UDP flow B answers on.
    let first = udp(a, UDP_CLIENT, b, UDP_SERVER, run.a_udp);
    tun_of(&run, 0).inject(&first);
    run.a_udp += 1;
    run.pump();
    run.collect();
    assert_eq!(run.delivered(), 1, "first datagram delivered");

    // Warm-up: sessions, connected state, conntrack entries, pools and queues grow here.
    let (tx0, rx0, _) = counts();
    for _ in 0..50 {
        run.inject_round();
        run.pump();
        run.collect();
    }
    assert_eq!(run.delivered(), run.sent(), "warm-up packets delivered");
    // Everything on the link so far was WireGuard, and no inner payload was visible.
    let wire = run.net.wire();
    assert!(wire.iter().any(|w| w.datagram[0] == 4), "data messages");
    for w in &wire {
        let d = &w.datagram;
        assert!(
            d.len() >= 32 && (1..=4).contains(&d[0]) && d[1..4] == [0, 0, 0],
            "not WireGuard"
        );
        assert!(
            !d.windows(64)
                .any(|x| x.iter().enumerate().all(|(i, &c)| c == stream_byte(i))),
            "inner stream visible on the link"
        );
    }
    drop(wire);
    let (tx1, rx1, _) = counts();
    println!(
        "warm-up ({} packets): {} allocations in tx passes, {} in rx passes",
        run.sent(),
        tx1 - tx0,
        rx1 - rx0
    );

    // The measured run: the link's own record (a Vec per datagram) off.
    run.net.set_recording(false);
    let (base_delivered, base_sent) = (run.delivered(), run.sent());
    let io = |run: &Run| {
        run.nodes.iter().fold((0, 0, 0), |(s, g, r), n| {
            let st = n.pump.stats();
            (
                s + st.datagrams_sent.load(Ordering::Relaxed),
                g + st.gso_sends.load(Ordering::Relaxed),
                r + st.datagrams_received.load(Ordering::Relaxed),
            )
        })
    };
    let io_before = io(&run);
    let (tx_before, rx_before, frees_before) = counts();
    TRACE.store(
        std::env::var_os("ZERO_ALLOC_TRACE").is_some(),
        Ordering::Relaxed,
    );
    const PACKETS: u64 = 100_000;
    let started = Instant::now();
    let virtual_start = run.micros;
    let mut rounds = 0u64;
    while run.delivered() - base_delivered < PACKETS {
        rounds += 1;
        assert!(
            rounds <= PACKETS / PER_ROUND + 2,
            "more rounds than 100,000 packets need"
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "out of time after {rounds} rounds"
        );
        run.inject_round();
        run.pump();
        run.collect();
    }
    let elapsed = started.elapsed();
    let (tx_after, rx_after, frees_after) = counts();
    let delivered = run.delivered() - base_delivered;
    println!(
        "{delivered} packets in {rounds} rounds, {:.2} s ({:.1} s virtual): {} allocations in tx passes, {} in rx passes, {} frees",
        elapsed.as_secs_f64(),
        (run.micros - virtual_start) as f64 / 1e6,
        tx_after - tx_before,
        rx_after - rx_before,
        frees_after - frees_before
    );
    assert!(delivered >= PACKETS);
    assert_eq!(
        run.delivered(),
        run.sent(),
        "every packet sent was delivered"
    );
    assert_eq!(delivered, run.sent() - base_sent);
    // One datagram per packet crossed the link (no handshake, no keepalive), most of them in
    // GSO sends of many.
    let io_after = io(&run);
    let (sent, gso, received) = (
        io_after.0 - io_before.0,
        io_after.1 - io_before.1,
        io_after.2 - io_before.2,
    );
    println!("{sent} datagrams sent in {gso} sends, {received} received");
    assert_eq!((sent, received), (delivered, delivered), "datagrams");
    assert!(gso * 2 < sent, "{gso} sends for {sent} datagrams");
    for n in &run.nodes {
        let fw = n.policy.firewall.stats();
        assert_eq!(fw.default_deny, 0, "nothing denied");
    }
    assert_eq!(tx_after - tx_before, 0, "allocations in tx passes");
    assert_eq!(rx_after - rx_before, 0, "allocations in rx passes");
    assert_eq!(frees_after - frees_before, 0, "frees in the passes");
}
