//! Flow counting, collection, retired-flow folding and learning mode.

use std::net::{IpAddr, Ipv4Addr};

use meshd_policy::{DenyReason, Direction, Grant, PeerGrants, Proto};

use crate::build;
use crate::packet::tcp_flags::{ACK, FIN, SYN};
use crate::{
    Config, DropReason, Firewall, FlowAdmission, FlowSample, Timeouts, Verdict, RETIRED_PER_SHARD,
};

const OUT: Direction = Direction::Outbound;
const IN: Direction = Direction::Inbound;
const PEER: u32 = 7;
const T0: u64 = 1_700_000_000_000;

fn l() -> IpAddr {
    Ipv4Addr::new(100, 64, 0, 1).into()
}
fn r() -> IpAddr {
    Ipv4Addr::new(100, 64, 0, 2).into()
}

fn grant(proto: Proto, lo: u16, hi: u16, exp: Option<u64>, rule: &str) -> Grant {
    Grant {
        proto,
        ports: (lo, hi),
        expires_at: exp,
        rule: rule.into(),
    }
}

fn fw_with(shards: usize) -> Firewall<u32> {
    Firewall::new(Config {
        hash_seed: Some(1),
        shards,
        ..Config::default()
    })
}

fn grants() -> PeerGrants {
    PeerGrants {
        deny: Default::default(),
        learn: false,
        outbound: vec![
            grant(Proto::Udp, 53, 53, None, "dns"),
            grant(Proto::Tcp, 1521, 1521, None, "app-db"),
        ],
        inbound: vec![grant(Proto::Tcp, 8000, 8100, None, "web")],
    }
}

fn collect(fw: &Firewall<u32>) -> Vec<FlowSample<u32>> {
    let mut v = Vec::new();
    fw.collect_flows(&mut |s| v.push(s));
    v.sort_by_key(|s| (s.proto, s.port, s.direction == IN));
    v
}

fn reason(v: Verdict) -> DenyReason {
    match v {
        Verdict::Deny(d) => d.reason,
        other => panic!("expected a denial, got {other:?}"),
    }
}

#[test]
fn counts_are_exact_for_a_scripted_sequence() {
    let fw = fw_with(64);
    let g = grants();
    let syn = build::tcp(l(), 40000, r(), 1521, SYN);
    let synack = build::tcp(r(), 1521, l(), 40000, SYN | ACK);
    let data = build::udp(l(), 40000, r(), 1521, 0); // another protocol: not this flow
    let ack = build::tcp(l(), 40000, r(), 1521, ACK);
    let q = build::udp(l(), 5353, r(), 53, 30);
    let a = build::udp(r(), 53, l(), 5353, 200);
    let web = build::tcp(r(), 50000, l(), 8080, SYN);
    assert!(fw.check(PEER, &g, 1, OUT, &syn, T0).is_allow());
    assert!(fw.check(PEER, &g, 1, IN, &synack, T0 + 5).is_allow());
    assert!(fw.check(PEER, &g, 1, OUT, &ack, T0 + 9).is_allow());
    assert!(!fw.check(PEER, &g, 1, OUT, &data, T0 + 9).is_allow());
    assert!(fw.check(PEER, &g, 1, OUT, &q, T0 + 10).is_allow());
    assert!(fw.check(PEER, &g, 1, IN, &a, T0 + 11).is_allow());
    assert!(fw.check(PEER, &g, 1, OUT, &q, T0 + 12).is_allow());
    assert!(fw.check(PEER, &g, 1, IN, &web, T0 + 20).is_allow());
    let got = collect(&fw);
    assert_eq!(got.len(), 3, "{got:?}");
    let tcp = got[0];
    assert_eq!(
        tcp,
        FlowSample {
            peer: PEER,
            direction: OUT,
            proto: 6,
            port: 1521,
            admission: FlowAdmission::Allowed {
                grants_version: 1,
                grant: 1
            },
            packets: 3,
            bytes: (syn.len() + synack.len() + ack.len()) as u64,
            flows: 1,
            first_seen: T0,
            last_seen: T0 + 9,
        }
    );
    assert_eq!(tcp.rule(&g, 1, T0 / 1000), Some("app-db"));
    let web_s = got[1];
    assert_eq!((web_s.direction, web_s.port, web_s.packets), (IN, 8080, 1));
    assert_eq!(web_s.rule(&g, 1, T0 / 1000), Some("web"));
    let dns = got[2];
    assert_eq!((dns.proto, dns.port, dns.direction), (17, 53, OUT));
    assert_eq!(dns.packets, 3);
    assert_eq!(dns.bytes, (2 * q.len() + a.len()) as u64);
    assert_eq!((dns.first_seen, dns.last_seen), (T0 + 10, T0 + 12));
    // Deltas: nothing new, nothing reported; one more packet, one packet reported.
    assert!(collect(&fw).is_empty());
    assert!(fw.check(PEER, &g, 1, IN, &synack, T0 + 30).is_allow());
    let got = collect(&fw);
    assert_eq!(got.len(), 1);
    assert_eq!(
        (
            got[0].packets,
            got[0].bytes,
            got[0].first_seen,
            got[0].last_seen
        ),
        (1, synack.len() as u64, T0 + 30, T0 + 30)
    );
    // The rule resolves by re-admission once the grants moved on (index 1 is gone).
    let g2 = PeerGrants {
        deny: Default::default(),
        learn: false,
        outbound: vec![grant(Proto::Tcp, 1500, 1600, None, "db-range")],
        inbound: vec![],
    };
    assert_eq!(got[0].rule(&g2, 2, T0 / 1000), Some("db-range"));
    assert_eq!(got[0].rule(&PeerGrants::default(), 2, T0 / 1000), None);
}

#[test]
fn flows_that_leave_the_table_are_folded_into_the_next_collection() {
    let fw = fw_with(1);
    let g = grants();
    // Five DNS exchanges from different ports, timed out and swept.
    for i in 0..5u16 {
        let q = build::udp(l(), 6000 + i, r(), 53, 10);
        assert!(fw.check(PEER, &g, 1, OUT, &q, T0 + u64::from(i)).is_allow());
        assert!(fw.check(PEER, &g, 1, OUT, &q, T0 + 100).is_allow());
    }
    let udp_len = build::udp(l(), 6000, r(), 53, 10).len() as u64;
    assert_eq!(fw.sweep_all(T0 + 100 + Timeouts::default().udp), 5);
    // A TCP connection closed and its port reused: the first connection retires.
    let syn = build::tcp(l(), 40000, r(), 1521, SYN);
    let fin = build::tcp(l(), 40000, r(), 1521, FIN | ACK);
    let t1 = T0 + 200_000;
    assert!(fw.check(PEER, &g, 1, OUT, &syn, t1).is_allow());
    assert!(fw.check(PEER, &g, 1, OUT, &fin, t1 + 1).is_allow());
    assert!(fw.check(PEER, &g, 1, OUT, &syn, t1 + 2).is_allow());
    // An inbound flow revoked by new grants on its next packet.
    let web = build::tcp(r(), 50000, l(), 8080, SYN);
    let web_ack = build::tcp(r(), 50000, l(), 8080, ACK);
    assert!(fw.check(PEER, &g, 1, IN, &web, t1).is_allow());
    let none = PeerGrants::default();
    assert_eq!(
        reason(fw.check(PEER, &none, 2, IN, &web_ack, t1 + 3)),
        DenyReason::DefaultDeny
    );
    let got = collect(&fw);
    assert_eq!(got.len(), 4, "{got:?}");
    let dns = got.iter().find(|s| s.port == 53).unwrap();
    assert_eq!((dns.flows, dns.packets), (5, 10));
    assert_eq!(dns.bytes, 10 * udp_len);
    assert_eq!((dns.first_seen, dns.last_seen), (T0, T0 + 100));
    // The old connection (retired, 2 packets) and the new one (live, 1 packet): two
    // samples of the same group, as the table and the retired list hold them.
    let db: Vec<_> = got.iter().filter(|s| s.port == 1521).collect();
    assert_eq!(db.len(), 2);
    assert_eq!(db.iter().map(|s| s.packets).sum::<u64>(), 3);
    assert_eq!(db.iter().map(|s| s.flows).sum::<u64>(), 2);
    let web_s = got.iter().find(|s| s.port == 8080).unwrap();
    assert_eq!((web_s.direction, web_s.packets, web_s.flows), (IN, 1, 1));
    // All reported once: the next collection has only what is new.
    assert!(collect(&fw).is_empty());
    // forget_peer keeps the counts too.
    assert!(fw.check(PEER, &g, 1, OUT, &syn, t1 + 10).is_allow());
    assert_eq!(fw.forget_peer(PEER), 1);
    let got = collect(&fw);
    assert_eq!((got.len(), got[0].packets), (1, 1));
}

#[test]
fn retired_groups_are_bounded_and_overflow_is_counted() {
    let fw = fw_with(1);
    let g = PeerGrants::allow_all("all");
    let extra = 5u16;
    for port in 0..RETIRED_PER_SHARD as u16 + extra {
        let p = build::udp(l(), 7000, r(), 1000 + port, 0);
        assert!(fw.check(PEER, &g, 1, OUT, &p, T0).is_allow());
        assert!(fw.check(PEER, &g, 1, OUT, &p, T0 + 1).is_allow());
    }
    fw.sweep_all(T0 + 1 + Timeouts::default().udp);
    let mut n = 0;
    let c = fw.collect_flows(&mut |s| {
        assert_eq!(s.packets, 2);
        n += 1;
    });
    assert_eq!(n, RETIRED_PER_SHARD);
    assert_eq!(c.samples, RETIRED_PER_SHARD);
    assert_eq!(
        (c.overflow, c.overflow_packets),
        (extra.into(), 2 * u64::from(extra))
    );
    // The next collection starts clean.
    assert_eq!(fw.collect_flows(&mut |_| {}), Default::default());
}

#[test]
fn counting_off_reports_nothing() {
    let fw: Firewall<u32> = Firewall::new(Config {
        count_flows: false,
        ..Config::default()
    });
    let g = grants();
    let q = build::udp(l(), 5353, r(), 53, 30);
    assert!(fw.check(PEER, &g, 1, OUT, &q, T0).is_allow());
    assert!(fw.check(PEER, &g, 1, OUT, &q, T0 + 1).is_allow());
    fw.sweep_all(T0 + 10_000_000);
    assert_eq!(fw.collect_flows(&mut |s| panic!("{s:?}")).samples, 0);
}

fn learning() -> PeerGrants {
    PeerGrants {
        learn: true,
        ..grants()
    }
}

#[test]
fn learning_mode_lets_unadmitted_flows_through_as_would_deny() {
    let fw = fw_with(64);
    let g = learning();
    let ssh = build::tcp(l(), 40000, r(), 22, SYN);
    let ssh_back = build::tcp(r(), 22, l(), 40000, SYN | ACK);
    assert!(fw.check(PEER, &g, 1, OUT, &ssh, T0).is_allow());
    assert!(fw.check(PEER, &g, 1, IN, &ssh_back, T0 + 1).is_allow());
    // Granted flows are still allowed, by their rule.
    let q = build::udp(l(), 5353, r(), 53, 0);
    assert!(fw.check(PEER, &g, 1, OUT, &q, T0 + 2).is_allow());
    // Inbound too, and an expired grant's flows.
    let exp = T0 / 1000 - 1;
    let expired = PeerGrants {
        deny: Default::default(),
        learn: true,
        outbound: vec![],
        inbound: vec![grant(Proto::Udp, 9, 9, Some(exp), "old")],
    };
    let old = build::udp(r(), 1, l(), 9, 0);
    assert!(fw.check(PEER + 1, &expired, 1, IN, &old, T0 + 3).is_allow());
    // Stateless ICMP no grant admits passes (counted), a packet that starts nothing does not.
    let stray = build::tcp(r(), 40001, l(), 22, FIN);
    assert_eq!(
        reason(fw.check(PEER, &g, 1, IN, &stray, T0 + 4)),
        DenyReason::NoFlow
    );
    // Quarantine still denies.
    assert_eq!(
        reason(fw.reject(DenyReason::Quarantined, OUT, &ssh)),
        DenyReason::Quarantined
    );
    let st = fw.stats();
    assert_eq!((st.would_deny, st.default_deny, st.expired), (2, 0, 0));
    assert_eq!((st.flows_opened, st.quarantined, st.no_flow), (3, 1, 1));
    let got = collect(&fw);
    let ssh_s = got.iter().find(|s| s.port == 22).unwrap();
    assert_eq!(ssh_s.admission, FlowAdmission::WouldDeny);
    assert_eq!((ssh_s.direction, ssh_s.packets, ssh_s.peer), (OUT, 2, PEER));
    assert_eq!(ssh_s.rule(&g, 1, T0 / 1000), None);
    let dns = got.iter().find(|s| s.port == 53).unwrap();
    assert_eq!(dns.rule(&g, 1, T0 / 1000), Some("dns"));
    let old_s = got.iter().find(|s| s.port == 9).unwrap();
    assert_eq!(
        (old_s.admission, old_s.direction),
        (FlowAdmission::WouldDeny, IN)
    );
    // Without learning the same flow is denied.
    let strict = fw_with(64);
    assert_eq!(
        reason(strict.check(PEER, &grants(), 1, OUT, &ssh, T0)),
        DenyReason::DefaultDeny
    );
}

#[test]
fn learning_mode_takes_up_connections_mid_stream() {
    let fw = fw_with(64);
    let g = PeerGrants {
        learn: true,
        ..PeerGrants::default()
    };
    // A reply segment of an old connection to the peer's port 5432: the responder is
    // guessed as the lower port's end.
    let seg = build::tcp(r(), 5432, l(), 41000, ACK);
    assert!(fw.check(PEER, &g, 1, IN, &seg, T0).is_allow());
    let got = collect(&fw);
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].direction, got[0].port), (OUT, 5432));
    assert_eq!(got[0].admission, FlowAdmission::WouldDeny);
    assert_eq!(fw.stats().flows_picked_up, 1);
}

#[test]
fn would_deny_flows_are_rechecked_when_the_grants_change() {
    let fw = fw_with(64);
    let ssh = build::tcp(l(), 40000, r(), 22, SYN);
    let ssh_back = build::tcp(r(), 22, l(), 40000, SYN | ACK);
    let pg = build::tcp(l(), 40001, r(), 5432, SYN);
    let pg_back = build::tcp(r(), 5432, l(), 40001, SYN | ACK);
    let learn = PeerGrants {
        learn: true,
        ..PeerGrants::default()
    };
    assert!(fw.check(PEER, &learn, 1, OUT, &ssh, T0).is_allow());
    assert!(fw.check(PEER, &learn, 1, OUT, &pg, T0).is_allow());
    // Enforcing now, with a grant for postgres only.
    let enforce = PeerGrants {
        deny: Default::default(),
        learn: false,
        outbound: vec![grant(Proto::Tcp, 5432, 5432, None, "app-db")],
        inbound: vec![],
    };
    // Same version: nothing is re-checked yet.
    assert!(fw
        .check(PEER, &enforce, 1, IN, &ssh_back, T0 + 1)
        .is_allow());
    assert_eq!(
        reason(fw.check(PEER, &enforce, 2, IN, &ssh_back, T0 + 2)),
        DenyReason::DefaultDeny
    );
    assert!(fw.check(PEER, &enforce, 2, IN, &pg_back, T0 + 2).is_allow());
    assert_eq!(fw.len(), 1);
    assert_eq!(fw.stats().flows_revoked, 1);
    let got = collect(&fw);
    let pg_s = got.iter().find(|s| s.port == 5432).unwrap();
    assert_eq!(
        pg_s.admission,
        FlowAdmission::Allowed {
            grants_version: 2,
            grant: 0
        }
    );
    assert_eq!(pg_s.rule(&enforce, 2, T0 / 1000), Some("app-db"));
    // The revoked ssh flow's counts were kept (2 packets while it flowed).
    let ssh_s = got.iter().find(|s| s.port == 22).unwrap();
    assert_eq!(
        (ssh_s.admission, ssh_s.packets),
        (FlowAdmission::WouldDeny, 2)
    );
    // Back to learning with no grant: an allowed flow keeps flowing as would-deny.
    assert!(fw.check(PEER, &learn, 3, IN, &pg_back, T0 + 3).is_allow());
    let got = collect(&fw);
    assert_eq!(got[0].admission, FlowAdmission::WouldDeny);
}

#[test]
fn a_full_table_still_drops_in_learning_mode() {
    let fw: Firewall<u32> = Firewall::new(Config {
        max_flows: 1,
        shards: 1,
        ..Config::default()
    });
    let g = learning();
    assert!(fw
        .check(PEER, &g, 1, OUT, &build::udp(l(), 1, r(), 2, 0), T0)
        .is_allow());
    assert_eq!(
        fw.check(PEER, &g, 1, OUT, &build::udp(l(), 1, r(), 3, 0), T0),
        Verdict::Drop(DropReason::TableFull)
    );
}

#[test]
fn deny_rules_hold_in_learning_mode_and_name_the_rule() {
    let fw = fw_with(64);
    let denied = PeerGrants {
        learn: true,
        deny: meshd_policy::PeerDenies {
            outbound: vec![grant(Proto::Tcp, 22, 22, None, "no-ssh")],
            inbound: vec![grant(Proto::Any, 0, u16::MAX, None, "isolate")],
        },
        ..grants()
    };
    // A new flow no grant admits but a deny covers: dropped, naming the deny, not learnt.
    let ssh = build::tcp(l(), 40000, r(), 22, SYN);
    assert_eq!(
        reason(fw.check(PEER, &denied, 1, OUT, &ssh, T0)),
        DenyReason::Denied("no-ssh".into())
    );
    // Nor is an old connection taken up mid-stream when either guess of its opener is
    // denied (here the peer opening to this host's port 5432).
    let seg = build::tcp(r(), 41000, l(), 5432, ACK);
    assert_eq!(
        reason(fw.check(PEER, &denied, 1, IN, &seg, T0)),
        DenyReason::Denied("isolate".into())
    );
    // Outside the deny, learning still passes it as would-deny.
    let web = build::tcp(l(), 40001, r(), 80, SYN);
    assert!(fw.check(PEER, &denied, 1, OUT, &web, T0).is_allow());
    let st = fw.stats();
    assert_eq!((st.would_deny, st.default_deny), (1, 2));
    // A flow learnt before the deny arrived is re-checked under the new version and dropped.
    let fw = fw_with(64);
    let learn = PeerGrants {
        learn: true,
        ..PeerGrants::default()
    };
    let ssh_back = build::tcp(r(), 22, l(), 40000, SYN | ACK);
    assert!(fw.check(PEER, &learn, 1, OUT, &ssh, T0).is_allow());
    assert!(fw.check(PEER, &learn, 1, IN, &ssh_back, T0 + 1).is_allow());
    let later = PeerGrants {
        learn: true,
        deny: meshd_policy::PeerDenies {
            outbound: vec![grant(Proto::Tcp, 22, 22, None, "no-ssh")],
            inbound: vec![],
        },
        ..PeerGrants::default()
    };
    assert!(!fw.check(PEER, &later, 2, IN, &ssh_back, T0 + 2).is_allow());
    assert_eq!(fw.stats().flows_revoked, 1);
}
