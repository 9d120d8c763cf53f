//! Property tests: random bytes never panic, and random packet sequences get the same verdicts
//! as a naive reference model of the semantics (a list of flows scanned linearly, admission by
//! `PeerGrants::find`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use meshd_firewall::tcp_flags::{ACK, FIN, RST, SYN};
use meshd_firewall::{
    build, Config, Denied, DropReason, Firewall, FlowAdmission, FlowTuple, Timeouts, Verdict,
};
use meshd_policy::{ip_proto, DenyReason, Direction, Grant, PeerGrants, Proto};
use meshd_testkit::fixtures;
use proptest::prelude::*;

const T0: u64 = meshd_testkit::time::UNIX_BASE_MS;
const CAP: usize = 6;

// ---------- the model ----------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pk {
    Tcp(u8),
    Udp,
    EchoReq,
    EchoRep,
}

#[derive(Debug, Clone, Copy)]
struct Pkt {
    kind: Pk,
    src: (IpAddr, u16),
    dst: (IpAddr, u16),
}

impl Pkt {
    fn proto(&self) -> u8 {
        match self.kind {
            Pk::Tcp(_) => ip_proto::TCP,
            Pk::Udp => ip_proto::UDP,
            _ => ip_proto::ICMP,
        }
    }
    fn bytes(&self) -> Vec<u8> {
        match self.kind {
            Pk::Tcp(f) => build::tcp(self.src.0, self.src.1, self.dst.0, self.dst.1, f),
            Pk::Udp => build::udp(self.src.0, self.src.1, self.dst.0, self.dst.1, 4),
            Pk::EchoReq => build::echo(self.src.0, self.dst.0, self.src.1, false),
            Pk::EchoRep => build::echo(self.src.0, self.dst.0, self.src.1, true),
        }
    }
    fn tuple(&self) -> FlowTuple {
        let ports = matches!(self.kind, Pk::Tcp(_) | Pk::Udp);
        let p = |e: (IpAddr, u16)| SocketAddr::new(e.0, if ports { e.1 } else { 0 });
        FlowTuple {
            proto: self.proto(),
            src: p(self.src),
            dst: p(self.dst),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Opening,
    Established,
    Closing,
    Unreplied,
    Replied,
    Echo,
}

#[derive(Debug, Clone)]
struct MFlow {
    peer: u32,
    proto: u8,
    opener: (IpAddr, u16),
    responder: (IpAddr, u16),
    dir: Direction,
    state: St,
    last_seen: u64,
    version: u64,
    expires: u64,
    port: u16,
    would_deny: bool,
    packets: u64,
    bytes: u64,
}

/// What flow records group by: peer, opener's direction, protocol, responder port (0 without
/// ports), would-deny.
type Group = (u32, bool, u8, u16, bool);

struct Model {
    flows: Vec<MFlow>,
    t: Timeouts,
    next_evict: u64,
    /// Counts of flows that left the table since the last collection.
    retired: std::collections::BTreeMap<Group, (u64, u64)>,
}

fn group(f: &MFlow) -> Group {
    let port = if matches!(f.proto, ip_proto::TCP | ip_proto::UDP) {
        f.port
    } else {
        0
    };
    (
        f.peer,
        f.dir == Direction::Outbound,
        f.proto,
        port,
        f.would_deny,
    )
}

fn learns(g: &PeerGrants, r: &DenyReason) -> bool {
    g.learn && matches!(r, DenyReason::DefaultDeny | DenyReason::Expired(_))
}

fn timeout(t: &Timeouts, s: St) -> u64 {
    match s {
        St::Opening => t.tcp_opening,
        St::Established => t.tcp_established,
        St::Closing => t.tcp_closing,
        St::Unreplied => t.udp,
        St::Replied => t.udp_replied,
        St::Echo => t.icmp,
    }
}

/// The obvious reading of the grants: `find`, else the first matching-but-expired grant.
fn admit(
    g: &PeerGrants,
    dir: Direction,
    proto: u8,
    port: u16,
    now_s: u64,
) -> Result<u64, DenyReason> {
    if let Some(x) = g.find(dir, proto, port, now_s) {
        return Ok(x.expires_at.unwrap_or(u64::MAX));
    }
    let list = if dir == Direction::Outbound {
        &g.outbound
    } else {
        &g.inbound
    };
    for x in list {
        let forever = Grant {
            expires_at: None,
            ..x.clone()
        };
        if x.expires_at.is_some() && forever.admits(proto, port, now_s) {
            return Err(DenyReason::Expired(x.rule.clone()));
        }
    }
    Err(DenyReason::DefaultDeny)
}

impl Model {
    fn idle(&self, f: &MFlow, now: u64) -> bool {
        now >= f.last_seen + timeout(&self.t, f.state)
    }

    fn remove(&mut self, i: usize) {
        let f = self.flows.remove(i);
        self.retire(&f);
    }

    fn retire(&mut self, f: &MFlow) {
        if f.packets > 0 {
            let e = self.retired.entry(group(f)).or_default();
            e.0 += f.packets;
            e.1 += f.bytes;
        }
    }

    /// Removes the flows `keep` refuses, keeping their counts.
    fn retain(&mut self, keep: impl Fn(&MFlow) -> bool) {
        let (kept, gone): (Vec<MFlow>, Vec<MFlow>) =
            std::mem::take(&mut self.flows).into_iter().partition(keep);
        self.flows = kept;
        for f in &gone {
            self.retire(f);
        }
    }

    /// Everything since the last collection, by group; zeroes it.
    fn collect(&mut self) -> std::collections::BTreeMap<Group, (u64, u64)> {
        let mut out = std::mem::take(&mut self.retired);
        for f in &mut self.flows {
            if f.packets > 0 {
                let e = out.entry(group(f)).or_default();
                e.0 += f.packets;
                e.1 += f.bytes;
                f.packets = 0;
                f.bytes = 0;
            }
        }
        out
    }

    fn deny(r: DenyReason, dir: Direction, p: &Pkt) -> Verdict {
        Verdict::Deny(Denied {
            reason: r,
            direction: dir,
            flow: p.tuple(),
        })
    }

    fn check(
        &mut self,
        peer: u32,
        g: &PeerGrants,
        version: u64,
        dir: Direction,
        p: &Pkt,
        now: u64,
    ) -> Verdict {
        let now_s = now / 1000;
        let proto = p.proto();
        let found = self.flows.iter().position(|f| {
            f.peer == peer
                && f.proto == proto
                && ((f.opener == p.src && f.responder == p.dst)
                    || (f.opener == p.dst && f.responder == p.src))
        });
        if let Some(i) = found {
            let forward = self.flows[i].opener == p.src;
            let bare_syn = matches!(p.kind, Pk::Tcp(fl) if fl & (SYN | ACK) == SYN);
            if self.idle(&self.flows[i], now)
                || (bare_syn && forward && self.flows[i].state == St::Closing)
            {
                self.remove(i);
            } else {
                let f = &mut self.flows[i];
                if forward != (dir == f.dir) || (bare_syn && !forward) {
                    return Self::deny(DenyReason::NoFlow, dir, p);
                }
                if (p.kind == Pk::EchoReq && !forward) || (p.kind == Pk::EchoRep && forward) {
                    return match admit(g, dir, proto, p.dst.1, now_s) {
                        Ok(_) if p.kind == Pk::EchoReq => Verdict::Allow,
                        Ok(_) => Self::deny(DenyReason::NoFlow, dir, p),
                        Err(r) if p.kind == Pk::EchoReq && learns(g, &r) => Verdict::Allow,
                        Err(r) => Self::deny(r, dir, p),
                    };
                }
                if f.version != version || now_s >= f.expires {
                    match admit(g, f.dir, proto, f.port, now_s) {
                        Ok(e) => {
                            f.version = version;
                            f.expires = e;
                            f.would_deny = false;
                        }
                        Err(r) if learns(g, &r) => {
                            f.version = version;
                            f.expires = u64::MAX;
                            f.would_deny = true;
                        }
                        Err(r) => {
                            self.remove(i);
                            return Self::deny(r, dir, p);
                        }
                    }
                }
                f.last_seen = now;
                f.packets += 1;
                f.bytes += p.bytes().len() as u64;
                f.state = match (f.state, p.kind) {
                    (_, Pk::Tcp(fl)) if fl & (FIN | RST) != 0 => St::Closing,
                    (St::Opening, Pk::Tcp(_)) if !forward => St::Established,
                    (St::Unreplied, _) if !forward => St::Replied,
                    (s, _) => s,
                };
                return Verdict::Allow;
            }
        }
        let mut opener = (p.src, p.dst, dir, p.dst.1);
        let mut picked_learning = false;
        let state = match p.kind {
            Pk::Tcp(fl) if fl & (SYN | ACK | RST) == SYN => St::Opening,
            // Mid-stream with no flow: taken up if a grant admits it one way or the other.
            Pk::Tcp(fl) if fl & (SYN | ACK) == ACK => {
                let back = if dir == Direction::Outbound {
                    Direction::Inbound
                } else {
                    Direction::Outbound
                };
                if admit(g, dir, proto, p.dst.1, now_s).is_err() {
                    match admit(g, back, proto, p.src.1, now_s) {
                        Ok(_) => opener = (p.dst, p.src, back, p.src.1),
                        Err(r) if learns(g, &r) => {
                            picked_learning = true;
                            if p.src.1 < p.dst.1 {
                                opener = (p.dst, p.src, back, p.src.1);
                            }
                        }
                        Err(_) => return Self::deny(DenyReason::NoFlow, dir, p),
                    }
                }
                if fl & (FIN | RST) != 0 {
                    St::Closing
                } else {
                    St::Established
                }
            }
            Pk::Tcp(_) | Pk::EchoRep => return Self::deny(DenyReason::NoFlow, dir, p),
            Pk::EchoReq => St::Echo,
            Pk::Udp => St::Unreplied,
        };
        let (opener_addr, responder, dir, resp_port) = opener;
        let port = if proto == ip_proto::ICMP {
            0
        } else {
            resp_port
        };
        let (expires, would_deny) = match admit(g, dir, proto, port, now_s) {
            Ok(e) => (e, false),
            Err(_) if picked_learning => (u64::MAX, true),
            Err(r) if learns(g, &r) => (u64::MAX, true),
            Err(r) => return Self::deny(r, dir, p),
        };
        if self.flows.len() >= CAP && now >= self.next_evict {
            self.next_evict = now + 1000;
            let t = self.t;
            self.retain(|f| now < f.last_seen + timeout(&t, f.state));
        }
        if self.flows.len() >= CAP {
            return Verdict::Drop(DropReason::TableFull);
        }
        self.flows.push(MFlow {
            peer,
            proto,
            opener: opener_addr,
            responder,
            dir,
            state,
            last_seen: now,
            version,
            expires,
            port: resp_port,
            would_deny,
            packets: 1,
            bytes: p.bytes().len() as u64,
        });
        Verdict::Allow
    }
}

// ---------- random scenarios ----------

#[derive(Debug, Clone)]
enum Op {
    Packet {
        peer: u32,
        dir: Direction,
        kind: Pk,
        local: u8,
        remote: u8,
        lport: u8,
        rport: u8,
        swap: bool,
    },
    /// An earlier packet again (`reply`: reversed, the other way through the tunnel), as `kind`.
    Again {
        back: prop::sample::Index,
        reply: bool,
        kind: Option<Pk>,
    },
    Advance(u64),
    /// Jump to `T0 + ms` (if later): lands on and around the grants' expiry times.
    Until(u64),
    SetGrants(usize),
    Bump,
    Forget(u32),
    Sweep,
    /// Collect the flow counts and compare them with the model's.
    Collect,
}

fn grant_sets() -> Vec<PeerGrants> {
    let g = |proto, lo, hi, exp: Option<u64>, rule: &str| {
        fixtures::grant(proto, lo, hi, exp.map(|s| T0 / 1000 + s), rule)
    };
    vec![
        PeerGrants::default(),
        PeerGrants {
            deny: Default::default(),
            learn: false,
            outbound: vec![
                g(Proto::Tcp, 80, 80, None, "web"),
                g(Proto::Udp, 53, 53, None, "dns"),
            ],
            inbound: vec![g(Proto::Icmp, 0, 0, None, "ping")],
        },
        PeerGrants {
            deny: Default::default(),
            learn: false,
            outbound: vec![
                g(Proto::Tcp, 53, 1000, Some(40), "temp"),
                g(Proto::Icmp, 0, 0, None, "ping"),
            ],
            inbound: vec![
                g(Proto::Udp, 1000, 1001, Some(100), "udp-temp"),
                g(Proto::Tcp, 1001, 1001, None, "t"),
            ],
        },
        PeerGrants::allow_all("all"),
        PeerGrants {
            deny: Default::default(),
            learn: false,
            outbound: vec![g(Proto::Any, 0, 0, Some(20), "any-temp")],
            inbound: vec![
                g(Proto::Any, 0, 0, Some(300), "any-temp-in"),
                g(Proto::Udp, 53, 53, None, "dns-in"),
            ],
        },
        // Learning mode: nothing granted, or some of it (and some expiring).
        PeerGrants {
            learn: true,
            ..PeerGrants::default()
        },
        PeerGrants {
            deny: Default::default(),
            learn: true,
            outbound: vec![
                g(Proto::Tcp, 80, 80, None, "web"),
                g(Proto::Udp, 53, 53, Some(40), "dns-temp"),
            ],
            inbound: vec![g(Proto::Icmp, 0, 0, None, "ping")],
        },
    ]
}

fn arb_op() -> impl Strategy<Value = Op> {
    let kind = prop_oneof![
        prop::sample::select(vec![
            SYN,
            SYN | ACK,
            ACK,
            FIN | ACK,
            RST,
            SYN | RST,
            ACK | RST
        ])
        .prop_map(Pk::Tcp),
        Just(Pk::Udp),
        Just(Pk::EchoReq),
        Just(Pk::EchoRep),
    ];
    let kind2 = kind.clone();
    let dir = prop_oneof![Just(Direction::Outbound), Just(Direction::Inbound)];
    prop_oneof![
        12 => (1u32..3, dir, kind, 0u8..2, 0u8..2, 0u8..4, 0u8..4, prop::bool::weighted(0.05)).prop_map(
            |(peer, dir, kind, local, remote, lport, rport, swap)| Op::Packet { peer, dir, kind, local, remote, lport, rport, swap }
        ),
        8 => (any::<prop::sample::Index>(), any::<bool>(), prop::option::weighted(0.5, kind2)).prop_map(
            |(back, reply, kind)| Op::Again { back, reply, kind }
        ),
        4 => prop::sample::select(vec![1u64, 400, 999, 1_000, 5_000, 10_000, 20_000, 31_000, 61_000, 200_000]).prop_map(Op::Advance),
        1 => prop::sample::select(vec![19_999u64, 20_000, 39_999, 40_000, 40_500, 99_999, 100_000, 299_999, 300_000]).prop_map(Op::Until),
        2 => (0usize..7).prop_map(Op::SetGrants),
        1 => Just(Op::Bump),
        1 => (1u32..3).prop_map(Op::Forget),
        1 => Just(Op::Sweep),
        1 => Just(Op::Collect),
    ]
}

const PORTS: [u16; 4] = [53, 80, 1000, 1001];

fn run(ops: &[Op]) {
    let sets = grant_sets();
    let fw: Firewall<u32> = Firewall::new(Config {
        max_flows: CAP,
        shards: 1,
        ..Config::default()
    });
    let mut m = Model {
        flows: Vec::new(),
        t: Timeouts::default(),
        next_evict: 0,
        retired: Default::default(),
    };
    let (mut now, mut set, mut version) = (T0, 1usize, 1u64);
    let mut sent: Vec<(u32, Direction, Pkt)> = Vec::new();
    let send = |peer: u32,
                dir: Direction,
                p: Pkt,
                now: u64,
                set: usize,
                version: u64,
                step: usize,
                m: &mut Model| {
        let got = fw.check(peer, &sets[set], version, dir, &p.bytes(), now);
        let want = m.check(peer, &sets[set], version, dir, &p, now);
        assert_eq!(
            got,
            want,
            "step {step}: {p:?} {dir:?} peer {peer} at +{} ms, grants {set} v{version}",
            now - T0
        );
    };
    for (step, op) in ops.iter().enumerate() {
        match *op {
            Op::Again { back, reply, kind } => {
                if sent.is_empty() {
                    continue;
                }
                let (peer, mut dir, mut p) = sent[sent.len() - 1 - back.index(sent.len())];
                if reply {
                    std::mem::swap(&mut p.src, &mut p.dst);
                    dir = if dir == Direction::Outbound {
                        Direction::Inbound
                    } else {
                        Direction::Outbound
                    };
                }
                if let Some(k) = kind {
                    let icmp = |k: Pk| matches!(k, Pk::EchoReq | Pk::EchoRep);
                    if icmp(k) != icmp(p.kind) {
                        continue;
                    }
                    p.kind = k;
                }
                send(peer, dir, p, now, set, version, step, &mut m);
                sent.push((peer, dir, p));
            }
            Op::Packet {
                peer,
                dir,
                kind,
                local,
                remote,
                lport,
                rport,
                swap,
            } => {
                let la: IpAddr = Ipv4Addr::new(10, 0, 0, 1 + local).into();
                let ra: IpAddr = Ipv4Addr::new(10, 0, 1, 1 + remote).into();
                let (lp, rp) = match kind {
                    // ICMP: the "port" is the echo id on both ends.
                    Pk::EchoReq | Pk::EchoRep => (u16::from(lport % 2), u16::from(lport % 2)),
                    _ => (PORTS[lport as usize], PORTS[rport as usize]),
                };
                let (mut src, mut dst) = ((la, lp), (ra, rp));
                if dir == Direction::Inbound {
                    std::mem::swap(&mut src, &mut dst);
                }
                if swap {
                    std::mem::swap(&mut src, &mut dst);
                }
                let p = Pkt { kind, src, dst };
                send(peer, dir, p, now, set, version, step, &mut m);
                sent.push((peer, dir, p));
            }
            Op::Advance(ms) => now += ms,
            Op::Until(ms) => now = now.max(T0 + ms),
            Op::SetGrants(i) => {
                set = i;
                version += 1;
            }
            Op::Bump => version += 1,
            Op::Forget(peer) => {
                let want = m.flows.iter().filter(|f| f.peer == peer).count();
                m.retain(|f| f.peer != peer);
                assert_eq!(fw.forget_peer(peer), want, "step {step}: forget");
            }
            Op::Collect => {
                let want = m.collect();
                let mut got: std::collections::BTreeMap<Group, (u64, u64)> = Default::default();
                let c = fw.collect_flows(&mut |s| {
                    let e = got
                        .entry((
                            s.peer,
                            s.direction == Direction::Outbound,
                            s.proto,
                            s.port,
                            s.admission == FlowAdmission::WouldDeny,
                        ))
                        .or_default();
                    e.0 += s.packets;
                    e.1 += s.bytes;
                });
                if c.overflow == 0 {
                    assert_eq!(got, want, "step {step}: collected counts");
                }
            }
            Op::Sweep => {
                let before = m.flows.len();
                let t = m.t;
                m.retain(|f| now < f.last_seen + timeout(&t, f.state));
                assert_eq!(
                    fw.sweep_all(now),
                    before - m.flows.len(),
                    "step {step}: sweep"
                );
            }
        }
        assert_eq!(
            fw.len(),
            m.flows.len(),
            "step {step}: table size after {op:?}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn matches_the_model(ops in prop::collection::vec(arb_op(), 1..120)) {
        run(&ops);
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200), dir in any::<bool>()) {
        let fw: Firewall<u8> = Firewall::new(Config::default());
        let g = PeerGrants::allow_all("all");
        let d = if dir { Direction::Inbound } else { Direction::Outbound };
        let _ = fw.check(1, &g, 1, d, &bytes, T0);
        let _ = fw.reject(DenyReason::Quarantined, d, &bytes);
    }

    #[test]
    fn mutated_packets_never_panic(
        which in 0usize..8,
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in any::<prop::sample::Index>(),
        v6 in any::<bool>(),
    ) {
        let (l, r): (IpAddr, IpAddr) = if v6 {
            ("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap())
        } else {
            (Ipv4Addr::new(10, 0, 0, 1).into(), Ipv4Addr::new(10, 0, 0, 2).into())
        };
        let base = match which {
            0 => build::tcp(l, 1, r, 2, SYN),
            1 => build::udp(l, 1, r, 2, 9),
            2 => build::echo(l, r, 3, false),
            3 => build::unreachable(r, l, &build::udp(l, 1, r, 2, 9)),
            4 => build::unreachable(r, l, &build::echo(l, r, 3, false)),
            5 if v6 => build::with_ext_headers(&build::tcp(l, 1, r, 2, SYN), &[(0, 8), (43, 24), (60, 8)]),
            6 if !v6 => build::fragment_v4(&build::udp(l, 1, r, 2, 64), 16, 7).1,
            _ => build::ip(l, r, 132, &[0; 12]),
        };
        let mut p = base;
        for (i, b) in flips {
            let i = i.index(p.len());
            p[i] = b;
        }
        p.truncate(cut.index(p.len() + 1));
        let fw: Firewall<u8> = Firewall::new(Config::default());
        let g = PeerGrants::allow_all("all");
        for d in [Direction::Outbound, Direction::Inbound] {
            let _ = fw.check(1, &g, 1, d, &p, T0);
        }
    }
}
