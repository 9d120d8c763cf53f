//! Unit tests with hand-built packets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use meshd_policy::{ip_proto, DenyReason, Direction, Grant, PeerGrants, Proto};

use crate::build;
use crate::packet::tcp_flags::{ACK, FIN, RST, SYN};
use crate::{Config, DropReason, Firewall, Malformed, Timeouts, Verdict};

const OUT: Direction = Direction::Outbound;
const IN: Direction = Direction::Inbound;
const PEER: u32 = 7;

fn l() -> IpAddr {
    Ipv4Addr::new(100, 64, 0, 1).into()
}
fn r() -> IpAddr {
    Ipv4Addr::new(100, 64, 0, 2).into()
}
fn l6() -> IpAddr {
    "fd00::1".parse::<Ipv6Addr>().unwrap().into()
}
fn r6() -> IpAddr {
    "fd00::2".parse::<Ipv6Addr>().unwrap().into()
}

fn grant(proto: Proto, lo: u16, hi: u16, exp: Option<u64>, rule: &str) -> Grant {
    Grant {
        proto,
        ports: (lo, hi),
        expires_at: exp,
        rule: rule.into(),
    }
}

fn fw() -> Firewall<u32> {
    Firewall::new(Config {
        hash_seed: Some(1),
        ..Config::default()
    })
}

/// Outbound tcp/1521 and udp/53, inbound tcp/8000-8100 and icmp.
fn grants() -> PeerGrants {
    PeerGrants {
        deny: Default::default(),
        learn: false,
        outbound: vec![
            grant(Proto::Tcp, 1521, 1521, None, "app-db"),
            grant(Proto::Udp, 53, 53, None, "dns"),
            grant(Proto::Icmp, 0, 0, None, "ping"),
        ],
        inbound: vec![
            grant(Proto::Tcp, 8000, 8100, None, "web"),
            grant(Proto::Icmp, 0, 0, None, "ping"),
        ],
    }
}

fn reason(v: Verdict) -> DenyReason {
    match v {
        Verdict::Deny(d) => d.reason,
        other => panic!("expected a denial, got {other:?}"),
    }
}

const T0: u64 = 1_700_000_000_000;

#[test]
fn tcp_syn_opens_and_replies_pass() {
    let fw = fw();
    let g = grants();
    let syn = build::tcp(l(), 40000, r(), 1521, SYN);
    assert_eq!(fw.check(PEER, &g, 1, OUT, &syn, T0), Verdict::Allow);
    let synack = build::tcp(r(), 1521, l(), 40000, SYN | ACK);
    assert_eq!(fw.check(PEER, &g, 1, IN, &synack, T0 + 1), Verdict::Allow);
    let ack = build::tcp(l(), 40000, r(), 1521, ACK);
    assert_eq!(fw.check(PEER, &g, 1, OUT, &ack, T0 + 2), Verdict::Allow);
    assert_eq!(fw.len(), 1);
    assert_eq!(fw.stats().flows_opened, 1);
    // Another peer cannot ride the flow: identity is part of the key.
    assert_eq!(
        reason(fw.check(PEER + 1, &g, 1, IN, &synack, T0 + 3)),
        DenyReason::NoFlow
    );
}

#[test]
fn tcp_without_syn_and_without_flow_is_denied() {
    let fw = fw();
    let g = grants();
    for flags in [SYN | ACK, FIN, RST, 0] {
        let p = build::tcp(l(), 40000, r(), 1521, flags);
        let v = fw.check(PEER, &g, 1, OUT, &p, T0);
        let Verdict::Deny(d) = v else { panic!("{v:?}") };
        assert_eq!(d.reason, DenyReason::NoFlow);
        assert_eq!(d.flow.proto, ip_proto::TCP);
        assert_eq!(d.flow.dst, "100.64.0.2:1521".parse().unwrap());
        assert_eq!(d.direction, OUT);
    }
    assert_eq!(fw.stats().no_flow, 4);
    assert!(fw.is_empty());
    // Mid-stream on a port no grant admits either way.
    for (dir, p) in [
        (OUT, build::tcp(l(), 40000, r(), 1522, ACK)),
        (IN, build::tcp(r(), 1522, l(), 40000, ACK)),
        (IN, build::tcp(r(), 40000, l(), 1521, ACK)),
    ] {
        assert_eq!(
            reason(fw.check(PEER, &g, 1, dir, &p, T0)),
            DenyReason::NoFlow
        );
    }
    assert!(fw.is_empty());
    assert_eq!(fw.stats().flows_picked_up, 0);
}

#[test]
fn established_tcp_is_taken_up_mid_stream_on_granted_ports() {
    // A restarted meshd sees connections it never saw open: their segments carry ACK and
    // no SYN. They are taken up if a grant admits them, either end first.
    let g = grants();
    // Our client's next segment to the granted port (outbound tcp/1521).
    let fw = fw();
    let ack = build::tcp(l(), 40000, r(), 1521, ACK);
    assert_eq!(fw.check(PEER, &g, 1, OUT, &ack, T0), Verdict::Allow);
    let back = build::tcp(r(), 1521, l(), 40000, ACK);
    assert_eq!(fw.check(PEER, &g, 1, IN, &back, T0 + 1), Verdict::Allow);
    assert_eq!(fw.stats().flows_picked_up, 1);
    assert_eq!(fw.stats().flows_opened, 0);
    assert_eq!(fw.len(), 1);
    // The server's reply arriving first (its retransmission): still the connection we
    // opened to tcp/1521.
    let fw2 = Firewall::<u32>::new(Config::default());
    assert_eq!(fw2.check(PEER, &g, 1, IN, &back, T0), Verdict::Allow);
    assert_eq!(fw2.check(PEER, &g, 1, OUT, &ack, T0 + 1), Verdict::Allow);
    assert_eq!(fw2.stats().flows_picked_up, 1);
    // The peer's connection to our granted inbound range, seen mid-stream here.
    let fw3 = Firewall::<u32>::new(Config::default());
    let data = build::tcp(r(), 50000, l(), 8050, ACK | FIN);
    assert_eq!(fw3.check(PEER, &g, 1, IN, &data, T0), Verdict::Allow);
    assert_eq!(fw3.stats().flows_picked_up, 1);
    // Taken up flows are re-checked like any other: the grant goes, the flow goes.
    let none = PeerGrants::default();
    assert_eq!(
        reason(fw.check(PEER, &none, 2, OUT, &ack, T0 + 2)),
        DenyReason::DefaultDeny
    );
    assert_eq!(fw.stats().flows_revoked, 1);
}

#[test]
fn a_taken_up_flow_does_not_let_the_responder_open_the_other_way() {
    // The peer (the server of tcp/1521) sends an ACK from 1521 to our port 22: it is taken
    // up as "our connection to its 1521" (our kernel answers RST). A SYN it then sends on
    // the same ports is a new connection to our port 22, which no grant admits.
    let taken = fw();
    let g = grants();
    let stray = build::tcp(r(), 1521, l(), 22, ACK);
    assert_eq!(taken.check(PEER, &g, 1, IN, &stray, T0), Verdict::Allow);
    let rst = build::tcp(l(), 22, r(), 1521, RST);
    assert_eq!(taken.check(PEER, &g, 1, OUT, &rst, T0 + 1), Verdict::Allow);
    for flags in [SYN, SYN | ECE_CWR] {
        let syn = build::tcp(r(), 1521, l(), 22, flags);
        assert_eq!(
            reason(taken.check(PEER, &g, 1, IN, &syn, T0 + 2)),
            DenyReason::NoFlow,
            "flags {flags:#x}"
        );
    }
    // The same holds for a flow opened with a SYN: the responder cannot send a bare SYN.
    let opened = fw();
    let syn = build::tcp(l(), 40000, r(), 1521, SYN);
    assert_eq!(opened.check(PEER, &g, 1, OUT, &syn, T0), Verdict::Allow);
    let reverse_syn = build::tcp(r(), 1521, l(), 40000, SYN);
    assert_eq!(
        reason(opened.check(PEER, &g, 1, IN, &reverse_syn, T0 + 1)),
        DenyReason::NoFlow
    );
    let synack = build::tcp(r(), 1521, l(), 40000, SYN | ACK);
    assert_eq!(
        opened.check(PEER, &g, 1, IN, &synack, T0 + 2),
        Verdict::Allow
    );
}

/// ECE | CWR: flags a SYN may carry (ECN set-up).
const ECE_CWR: u8 = 0x40 | 0x80;

#[test]
fn default_deny_and_port_ranges() {
    let fw = fw();
    let g = grants();
    // Wrong port, wrong direction, wrong protocol.
    let p = build::tcp(l(), 40000, r(), 1522, SYN);
    assert_eq!(
        reason(fw.check(PEER, &g, 1, OUT, &p, T0)),
        DenyReason::DefaultDeny
    );
    let p = build::tcp(r(), 40000, l(), 1521, SYN);
    assert_eq!(
        reason(fw.check(PEER, &g, 1, IN, &p, T0)),
        DenyReason::DefaultDeny
    );
    let p = build::udp(l(), 40000, r(), 1521, 0);
    assert_eq!(
        reason(fw.check(PEER, &g, 1, OUT, &p, T0)),
        DenyReason::DefaultDeny
    );
    // Inbound range 8000-8100: both ends and the inside pass, outside does not.
    for (port, ok) in [
        (7999, false),
        (8000, true),
        (8050, true),
        (8100, true),
        (8101, false),
    ] {
        let p = build::tcp(r(), 50000, l(), port, SYN);
        assert_eq!(
            fw.check(PEER, &g, 1, IN, &p, T0).is_allow(),
            ok,
            "port {port}"
        );
    }
    // Nothing granted at all (fresh mesh): everything is denied.
    let none = PeerGrants::default();
    let p = build::udp(l(), 1, r(), 53, 0);
    assert_eq!(
        reason(fw.check(PEER, &none, 1, OUT, &p, T0)),
        DenyReason::DefaultDeny
    );
    assert_eq!(fw.stats().default_deny, 4 + 2);
}

#[test]
fn udp_both_ways_and_timeouts() {
    let fw = fw();
    let g = grants();
    let q = build::udp(l(), 5353, r(), 53, 32);
    let a = build::udp(r(), 53, l(), 5353, 64);
    assert!(fw.check(PEER, &g, 1, OUT, &q, T0).is_allow());
    assert!(fw.check(PEER, &g, 1, IN, &a, T0 + 10).is_allow());
    // Seen both ways: 180 s idle timeout.
    assert!(fw.check(PEER, &g, 1, IN, &a, T0 + 10 + 179_999).is_allow());
    assert_eq!(
        reason(fw.check(PEER, &g, 1, IN, &a, T0 + 10 + 179_999 + 180_000)),
        DenyReason::DefaultDeny
    );
    // One way only: 60 s, then the answer opens nothing (no inbound udp grant).
    let q2 = build::udp(l(), 5354, r(), 53, 32);
    let a2 = build::udp(r(), 53, l(), 5354, 64);
    assert!(fw.check(PEER, &g, 1, OUT, &q2, T0).is_allow());
    assert_eq!(
        reason(fw.check(PEER, &g, 1, IN, &a2, T0 + 60_000)),
        DenyReason::DefaultDeny
    );
}

#[test]
fn icmp_echo_reply_is_stateful() {
    let fw = fw();
    let g = PeerGrants {
        deny: Default::default(),
        learn: false,
        outbound: vec![grant(Proto::Icmp, 0, 0, None, "ping")],
        inbound: vec![],
    };
    let req = build::echo(l(), r(), 77, false);
    let rep = build::echo(r(), l(), 77, true);
    // A reply without a request is not a flow start.
    assert_eq!(
        reason(fw.check(PEER, &g, 1, IN, &rep, T0)),
        DenyReason::NoFlow
    );
    assert!(fw.check(PEER, &g, 1, OUT, &req, T0).is_allow());
    assert!(fw.check(PEER, &g, 1, IN, &rep, T0 + 5).is_allow());
    // Another identifier is another flow.
    let rep2 = build::echo(r(), l(), 78, true);
    assert_eq!(
        reason(fw.check(PEER, &g, 1, IN, &rep2, T0 + 5)),
        DenyReason::NoFlow
    );
    // The peer pinging us back with the same id is judged by the inbound grants.
    let back = build::echo(r(), l(), 77, false);
    assert_eq!(
        reason(fw.check(PEER, &g, 1, IN, &back, T0 + 6)),
        DenyReason::DefaultDeny
    );
    // 30 s idle: gone.
    assert_eq!(
        reason(fw.check(PEER, &g, 1, IN, &rep, T0 + 6 + 30_000)),
        DenyReason::NoFlow
    );
    // IPv6 echo.
    let req6 = build::echo(l6(), r6(), 9, false);
    let rep6 = build::echo(r6(), l6(), 9, true);
    assert!(fw.check(PEER, &g, 1, OUT, &req6, T0).is_allow());
    assert!(fw.check(PEER, &g, 1, IN, &rep6, T0).is_allow());
}

#[test]
fn grant_expiry_mid_flow_denies() {
    let fw = fw();
    let exp = T0 / 1000 + 100;
    let g = PeerGrants {
        deny: Default::default(),
        learn: false,
        outbound: vec![grant(Proto::Tcp, 443, 443, Some(exp), "contractor-web")],
        inbound: vec![],
    };
    let syn = build::tcp(l(), 40000, r(), 443, SYN);
    let data = build::tcp(r(), 443, l(), 40000, ACK);
    assert!(fw.check(PEER, &g, 1, OUT, &syn, T0).is_allow());
    assert!(fw.check(PEER, &g, 1, IN, &data, T0 + 1).is_allow());
    assert!(fw.check(PEER, &g, 1, IN, &data, exp * 1000 - 1).is_allow());
    let v = fw.check(PEER, &g, 1, IN, &data, exp * 1000);
    assert_eq!(reason(v), DenyReason::Expired("contractor-web".into()));
    assert!(fw.is_empty(), "the flow is gone");
    assert_eq!(fw.stats().flows_revoked, 1);
    // New flows too.
    assert_eq!(
        reason(fw.check(PEER, &g, 1, OUT, &syn, exp * 1000 + 5)),
        DenyReason::Expired("contractor-web".into())
    );
    assert_eq!(fw.stats().expired, 2);
}

#[test]
fn expiry_falls_back_to_another_grant() {
    let fw = fw();
    let exp = T0 / 1000 + 10;
    let g = PeerGrants {
        deny: Default::default(),
        learn: false,
        outbound: vec![
            grant(Proto::Tcp, 443, 443, Some(exp), "temp"),
            grant(Proto::Any, 0, u16::MAX, None, "all"),
        ],
        inbound: vec![],
    };
    let syn = build::tcp(l(), 40000, r(), 443, SYN);
    let data = build::tcp(r(), 443, l(), 40000, ACK);
    assert!(fw.check(PEER, &g, 1, OUT, &syn, T0).is_allow());
    assert!(fw.check(PEER, &g, 1, IN, &data, exp * 1000 + 1).is_allow());
}

#[test]
fn version_bump_rechecks_flows() {
    let fw = fw();
    let g1 = grants();
    let db = build::tcp(l(), 40000, r(), 1521, SYN);
    let db_reply = build::tcp(r(), 1521, l(), 40000, ACK);
    let dns = build::udp(l(), 5353, r(), 53, 0);
    let dns_reply = build::udp(r(), 53, l(), 5353, 0);
    assert!(fw.check(PEER, &g1, 1, OUT, &db, T0).is_allow());
    assert!(fw.check(PEER, &g1, 1, OUT, &dns, T0).is_allow());
    // New grants: the db rule is gone, dns stays (at another index).
    let g2 = PeerGrants {
        deny: Default::default(),
        learn: false,
        outbound: vec![
            grant(Proto::Tcp, 22, 22, None, "ssh"),
            grant(Proto::Udp, 53, 53, None, "dns"),
        ],
        inbound: vec![],
    };
    // Without a bump the flow is trusted (the caller promised the grants did not change).
    assert!(fw.check(PEER, &g2, 1, IN, &db_reply, T0 + 1).is_allow());
    assert_eq!(
        reason(fw.check(PEER, &g2, 2, IN, &db_reply, T0 + 2)),
        DenyReason::DefaultDeny
    );
    assert!(fw.check(PEER, &g2, 2, IN, &dns_reply, T0 + 2).is_allow());
    assert_eq!(fw.len(), 1);
    // Quarantine-style: no grants at all; the flow stops on its next packet.
    let none = PeerGrants::default();
    assert_eq!(
        reason(fw.check(PEER, &none, 3, IN, &dns_reply, T0 + 3)),
        DenyReason::DefaultDeny
    );
    assert!(fw.is_empty());
    assert_eq!(fw.stats().flows_revoked, 2);
}

#[test]
fn forget_peer_and_reject() {
    let fw = fw();
    let g = grants();
    let syn = build::tcp(l(), 40000, r(), 1521, SYN);
    assert!(fw.check(PEER, &g, 1, OUT, &syn, T0).is_allow());
    assert!(fw.check(PEER + 1, &g, 1, OUT, &syn, T0).is_allow());
    assert_eq!(fw.forget_peer(PEER), 1);
    assert_eq!(fw.len(), 1);
    // A segment of the forgotten flow that could not be taken up mid-stream (no ACK).
    let ack = build::tcp(l(), 40000, r(), 1521, FIN);
    assert_eq!(
        reason(fw.check(PEER, &g, 1, OUT, &ack, T0)),
        DenyReason::NoFlow
    );
    let v = fw.reject(DenyReason::Quarantined, IN, &ack);
    assert_eq!(reason(v), DenyReason::Quarantined);
    assert_eq!(fw.stats().quarantined, 1);
}

#[test]
fn ipv6_tcp_with_extension_headers() {
    let fw = fw();
    let g = grants();
    let syn = build::tcp(l6(), 40000, r6(), 1521, SYN);
    let syn = build::with_ext_headers(&syn, &[(0, 8), (60, 16)]);
    assert!(fw.check(PEER, &g, 1, OUT, &syn, T0).is_allow());
    let reply = build::tcp(r6(), 1521, l6(), 40000, SYN | ACK);
    assert!(fw.check(PEER, &g, 1, IN, &reply, T0).is_allow());
    let other = build::tcp(l6(), 40000, r6(), 1522, SYN);
    let Verdict::Deny(d) = fw.check(PEER, &g, 1, OUT, &other, T0) else {
        panic!()
    };
    assert_eq!(d.flow.src, "[fd00::1]:40000".parse().unwrap());
    // A v4 packet with the same numbers is not the v6 flow.
    let v4_mapped_reply = build::tcp(r(), 1521, l(), 40000, SYN | ACK);
    assert!(!fw.check(PEER, &g, 1, IN, &v4_mapped_reply, T0).is_allow());
    // An extension chain that runs past the end.
    let mut bad = build::with_ext_headers(&build::tcp(l6(), 1, r6(), 1521, SYN), &[(0, 8)]);
    bad[41] = 200;
    assert_eq!(
        fw.check(PEER, &g, 1, OUT, &bad, T0),
        Verdict::Drop(DropReason::Malformed(Malformed::BadExtensionHeaders))
    );
}

#[test]
fn malformed_packets_are_dropped_and_counted() {
    let fw = fw();
    let g = PeerGrants::allow_all("static");
    let good = build::tcp(l(), 1, r(), 2, SYN);
    let cases: Vec<(Vec<u8>, Malformed)> = vec![
        (vec![], Malformed::BadVersion),
        (vec![0x50; 40], Malformed::BadVersion),
        (good[..19].to_vec(), Malformed::TruncatedIpHeader),
        (good[..30].to_vec(), Malformed::BadTotalLength),
        (
            {
                let mut p = good.clone();
                p[0] = 0x44;
                p
            },
            Malformed::BadHeaderLength,
        ),
        (
            {
                let mut p = good.clone();
                p[0] = 0x4f;
                p
            },
            Malformed::BadHeaderLength,
        ),
        (
            {
                let mut p = good.clone();
                p[2..4].copy_from_slice(&30u16.to_be_bytes());
                p
            },
            Malformed::TruncatedTransport,
        ),
        (
            {
                let mut p = good.clone();
                p[32] = 0x40;
                p
            },
            Malformed::TruncatedTransport,
        ),
        (
            build::tcp(l6(), 1, r6(), 2, SYN)[..39].to_vec(),
            Malformed::TruncatedIpHeader,
        ),
        (
            build::tcp(l6(), 1, r6(), 2, SYN)[..50].to_vec(),
            Malformed::BadTotalLength,
        ),
    ];
    for (i, (p, m)) in cases.iter().enumerate() {
        assert_eq!(
            fw.check(PEER, &g, 1, OUT, p, T0),
            Verdict::Drop(DropReason::Malformed(*m)),
            "case {i}"
        );
    }
    assert_eq!(fw.stats().malformed_total(), cases.len() as u64);
    assert!(fw.is_empty());
    // Trailing bytes after the IP total length (link padding) are fine.
    let mut padded = good.clone();
    padded.extend_from_slice(&[0; 6]);
    assert!(fw.check(PEER, &g, 1, OUT, &padded, T0).is_allow());
}

#[test]
fn table_is_bounded() {
    let fw: Firewall<u32> = Firewall::new(Config {
        max_flows: 64,
        shards: 4,
        hash_seed: Some(3),
        ..Config::default()
    });
    let g = PeerGrants::allow_all("all");
    let mut full = 0;
    for port in 0..1000u16 {
        let p = build::udp(l(), port, r(), 53, 0);
        match fw.check(PEER, &g, 1, OUT, &p, T0) {
            Verdict::Allow => {}
            Verdict::Drop(DropReason::TableFull) => full += 1,
            v => panic!("{v:?}"),
        }
    }
    assert!(fw.len() <= fw.capacity() && fw.capacity() == 64);
    assert_eq!(fw.stats().table_full, full);
    assert_eq!(fw.stats().flows_opened, 1000 - full);
    // Once the flows idle out, a full shard makes room again (lazily).
    let later = T0 + 61_000;
    for port in 1000..1100u16 {
        let p = build::udp(l(), port, r(), 53, 0);
        let _ = fw.check(PEER, &g, 1, OUT, &p, later);
    }
    assert!(fw.stats().flows_opened > 1000 - full);
    assert!(fw.len() <= 64);
}

#[test]
fn one_peer_cannot_fill_the_table() {
    const GREEDY: u32 = 1;
    const OTHER: u32 = 2;
    let fw: Firewall<u32> = Firewall::new(Config {
        max_flows: 1024,
        max_flows_per_peer: 64,
        shards: 4,
        hash_seed: Some(9),
        ..Config::default()
    });
    let g = PeerGrants::allow_all("all");
    let mut limited = 0;
    for port in 0..1000u16 {
        let p = build::udp(l(), port, r(), 53, 0);
        match fw.check(GREEDY, &g, 1, OUT, &p, T0) {
            Verdict::Allow => {}
            Verdict::Drop(DropReason::PeerLimit) => limited += 1,
            v => panic!("{v:?}"),
        }
    }
    // 16 per shard: at most 64 flows, at least one full shard's worth.
    assert!(fw.len() <= 64 && fw.len() >= 16, "{}", fw.len());
    assert_eq!(fw.stats().peer_limit, limited);
    assert_eq!(fw.stats().table_full, 0);
    // Another peer still opens flows (16 cannot overfill any shard's share of 16), and the
    // greedy one's open flows keep working.
    for port in 0..16u16 {
        let p = build::udp(l(), port, r(), 53, 0);
        assert!(fw.check(OTHER, &g, 1, OUT, &p, T0).is_allow());
    }
    let first = build::udp(l(), 0, r(), 53, 0);
    assert!(fw.check(GREEDY, &g, 1, OUT, &first, T0).is_allow());
    // Forgetting the peer frees its share at once.
    fw.forget_peer(GREEDY);
    let p = build::udp(l(), 5000, r(), 53, 0);
    assert!(fw.check(GREEDY, &g, 1, OUT, &p, T0).is_allow());
    // Once its flows idle out, the share is free again (lazily, without a sweep).
    let later = T0 + 61_000;
    let mut opened = 0;
    for port in 6000..6100u16 {
        let p = build::udp(l(), port, r(), 53, 0);
        if fw.check(GREEDY, &g, 1, OUT, &p, later).is_allow() {
            opened += 1;
        }
    }
    assert!(opened >= 16, "{opened}");
    // The sweep keeps the per-peer counts right: after everything idles out, all is free.
    fw.sweep_all(later + 61_000);
    assert!(fw.is_empty());
    // 16 flows cannot overfill any shard's share of 16.
    for port in 7000..7016u16 {
        let p = build::udp(l(), port, r(), 53, 0);
        assert!(fw.check(GREEDY, &g, 1, OUT, &p, later + 61_000).is_allow());
    }
    assert_eq!(fw.len(), 16);
}

#[test]
fn sweep_reclaims_idle_flows_with_bounded_work() {
    let fw: Firewall<u32> = Firewall::new(Config {
        shards: 8,
        hash_seed: Some(5),
        ..Config::default()
    });
    let g = PeerGrants::allow_all("all");
    let t = Timeouts::default();
    // 100 UDP flows (60 s), 100 TCP established flows (2 h), one ICMP (30 s).
    for port in 0..100u16 {
        let _ = fw.check(PEER, &g, 1, OUT, &build::udp(l(), port, r(), 53, 0), T0);
        let _ = fw.check(PEER, &g, 1, OUT, &build::tcp(l(), port, r(), 22, SYN), T0);
        let _ = fw.check(
            PEER,
            &g,
            1,
            IN,
            &build::tcp(r(), 22, l(), port, SYN | ACK),
            T0,
        );
    }
    let _ = fw.check(PEER, &g, 1, OUT, &build::echo(l(), r(), 1, false), T0);
    assert_eq!(fw.len(), 201);
    assert_eq!(fw.sweep_all(T0 + t.icmp - 1), 0);
    assert_eq!(fw.sweep_all(T0 + t.icmp), 1);
    // One shard at a time.
    let mut removed = 0;
    for _ in 0..fw.shard_count() {
        removed += fw.sweep(T0 + t.udp, 1);
    }
    assert_eq!(removed, 100);
    assert_eq!(fw.len(), 100);
    assert_eq!(fw.sweep_all(T0 + t.tcp_established), 100);
    assert!(fw.is_empty());
}

#[test]
fn tcp_fin_rst_shorten_timeout_and_port_reuse_reopens() {
    let fw = fw();
    let g = grants();
    let syn = build::tcp(l(), 40000, r(), 1521, SYN);
    let synack = build::tcp(r(), 1521, l(), 40000, SYN | ACK);
    let fin = build::tcp(l(), 40000, r(), 1521, FIN | ACK);
    let ack = build::tcp(r(), 1521, l(), 40000, ACK);
    assert!(fw.check(PEER, &g, 1, OUT, &syn, T0).is_allow());
    assert!(fw.check(PEER, &g, 1, IN, &synack, T0).is_allow());
    // Established: an hour of silence is fine.
    assert!(fw.check(PEER, &g, 1, IN, &ack, T0 + 3_600_000).is_allow());
    let t = T0 + 3_600_000;
    assert!(fw.check(PEER, &g, 1, OUT, &fin, t).is_allow());
    assert!(fw.check(PEER, &g, 1, IN, &ack, t + 9_999).is_allow());
    // Gone after the closing timeout (a SYN-ACK is never taken up mid-stream).
    assert_eq!(
        reason(fw.check(PEER, &g, 1, IN, &synack, t + 9_999 + 10_000)),
        DenyReason::NoFlow
    );
    // Same ports again while closing: the new SYN reopens (and is checked against grants).
    assert!(fw.check(PEER, &g, 1, OUT, &syn, T0).is_allow());
    assert!(fw
        .check(
            PEER,
            &g,
            1,
            OUT,
            &build::tcp(l(), 40000, r(), 1521, RST),
            T0
        )
        .is_allow());
    assert!(fw.check(PEER, &g, 1, OUT, &syn, T0 + 1).is_allow());
    assert_eq!(fw.stats().flows_opened, 3);
    // An unanswered SYN times out after 30 s.
    let syn2 = build::tcp(l(), 40001, r(), 1521, SYN);
    assert!(fw.check(PEER, &g, 1, OUT, &syn2, T0).is_allow());
    let late = build::tcp(r(), 1521, l(), 40001, SYN | ACK);
    assert_eq!(
        reason(fw.check(PEER, &g, 1, IN, &late, T0 + 30_000)),
        DenyReason::NoFlow
    );
}

#[test]
fn spoofed_direction_does_not_match() {
    let fw = fw();
    let g = grants();
    let syn = build::tcp(l(), 40000, r(), 1521, SYN);
    assert!(fw.check(PEER, &g, 1, OUT, &syn, T0).is_allow());
    // The peer sends a packet claiming to come from our end of the flow.
    let spoof = build::tcp(l(), 40000, r(), 1521, ACK);
    assert_eq!(
        reason(fw.check(PEER, &g, 1, IN, &spoof, T0)),
        DenyReason::NoFlow
    );
}

#[test]
fn icmp_errors_for_tracked_flows_pass() {
    let fw = fw();
    let g = PeerGrants {
        deny: Default::default(),
        learn: false,
        outbound: vec![grant(Proto::Udp, 53, 53, None, "dns")],
        inbound: vec![],
    };
    let q = build::udp(l(), 5353, r(), 53, 16);
    assert!(fw.check(PEER, &g, 1, OUT, &q, T0).is_allow());
    let err = build::unreachable(r(), l(), &q);
    assert!(fw.check(PEER, &g, 1, IN, &err, T0).is_allow());
    // Quoting an untracked flow: no ICMP grant inbound, denied.
    let other = build::udp(l(), 5354, r(), 53, 16);
    let err2 = build::unreachable(r(), l(), &other);
    assert_eq!(
        reason(fw.check(PEER, &g, 1, IN, &err2, T0)),
        DenyReason::DefaultDeny
    );
    // IPv6 too.
    let q6 = build::udp(l6(), 5353, r6(), 53, 16);
    assert!(fw.check(PEER, &g, 1, OUT, &q6, T0).is_allow());
    assert!(fw
        .check(PEER, &g, 1, IN, &build::unreachable(r6(), l6(), &q6), T0)
        .is_allow());
}

#[test]
fn fragments_follow_their_first() {
    let fw = fw();
    let g = grants();
    let big = build::udp(l(), 5353, r(), 53, 2000);
    let (first, later) = build::fragment_v4(&big, 1480, 0x1234);
    assert_eq!(
        fw.check(PEER, &g, 1, OUT, &later, T0),
        Verdict::Drop(DropReason::UntrackedFragment)
    );
    assert!(fw.check(PEER, &g, 1, OUT, &first, T0).is_allow());
    assert!(fw.check(PEER, &g, 1, OUT, &later, T0 + 1).is_allow());
    assert!(!fw.check(PEER, &g, 1, OUT, &later, T0 + 5_000).is_allow());
    // A denied first fragment lets nothing after it through.
    let bad = build::udp(l(), 5353, r(), 54, 2000);
    let (first, later) = build::fragment_v4(&bad, 1480, 0x1235);
    assert!(!fw.check(PEER, &g, 1, OUT, &first, T0).is_allow());
    assert!(!fw.check(PEER, &g, 1, OUT, &later, T0).is_allow());
    assert_eq!(fw.stats().untracked_fragment, 3);
}

#[test]
fn block_log_folds_and_rate_limits() {
    use crate::{BlockLog, BlockLogConfig};
    let fw = fw();
    let g = grants();
    let log = BlockLog::new(BlockLogConfig {
        window: 1000,
        max_per_second: 3,
        max_pending: 5,
    });
    // 10 SYN retries to one closed port, from changing source ports: one event.
    for i in 0..10u16 {
        let p = build::tcp(l(), 40000 + i, r(), 22, SYN);
        if let Verdict::Deny(d) = fw.check(PEER, &g, 1, OUT, &p, T0 + u64::from(i)) {
            log.record(PEER, &d, T0 + u64::from(i));
        }
    }
    assert!(log.drain(T0 + 999).is_empty(), "window still open");
    let ev = log.drain(T0 + 1000);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].count, 10);
    assert_eq!(ev[0].src, "100.64.0.1:40000".parse().unwrap());
    assert_eq!(ev[0].reason, DenyReason::DefaultDeny);
    let be = ev[0].to_block_event(
        "app1-host-1",
        &Default::default(),
        "db1-host-1",
        &Default::default(),
    );
    assert_eq!(be.count, 10);
    assert_eq!(be.at, T0 / 1000);
    assert_eq!(be.direction, OUT);
    // 8 distinct flows: 5 pending at most, 3 dropped; 3 released per second.
    let t = T0 + 2000;
    for port in 1..=8u16 {
        let p = build::tcp(l(), 40000, r(), port, SYN);
        if let Verdict::Deny(d) = fw.check(PEER, &g, 1, OUT, &p, t) {
            log.record(PEER, &d, t);
        }
    }
    assert_eq!(log.pending(), 5);
    assert_eq!(log.dropped(), 3);
    assert_eq!(log.drain(t + 1000).len(), 3);
    assert_eq!(log.drain(t + 1500).len(), 0, "budget spent this second");
    assert_eq!(log.drain(t + 2000).len(), 2);
    assert_eq!(log.pending(), 0);
}

#[test]
fn concurrent_tx_rx_workers() {
    use std::sync::Arc;
    let fw: Arc<Firewall<u32>> = Arc::new(fw());
    let g = Arc::new(grants());
    let tx = {
        let (fw, g) = (fw.clone(), g.clone());
        std::thread::spawn(move || {
            for i in 0..2000u16 {
                let p = build::tcp(l(), 10000 + i, r(), 1521, SYN);
                assert!(fw.check(PEER, &g, 1, OUT, &p, T0).is_allow());
            }
        })
    };
    let rx = {
        let (fw, g) = (fw.clone(), g.clone());
        std::thread::spawn(move || {
            for i in 0..2000u16 {
                let p = build::tcp(r(), 50000, l(), 8000 + i % 100, SYN);
                let _ = fw.check(PEER, &g, 1, IN, &p, T0);
            }
        })
    };
    tx.join().unwrap();
    rx.join().unwrap();
    assert_eq!(fw.len(), 2000 + 100);
}
