//! A random life of a mesh: joins, leaves, moves, label and policy changes, quarantines,
//! partitions (control and data), coordinator restarts and traffic over lossy, reordering
//! links. Once it settles, every host follows what the final coordinator state compiles to,
//! and nothing crossed a link but WireGuard messages, none carrying an inner payload in clear.
//! 32 cases by default (`MESH_CASES=256 cargo test -p meshd-testkit --test property` for more).

use std::time::Duration;

use meshd_policy::{ip_proto, Direction};
use meshd_testkit::fixtures::{self, labels, marked, policy};
use meshd_testkit::link::LinkConfig;
use meshd_testkit::mesh::{HostIdx, Mesh, MeshConfig};
use proptest::prelude::*;

const LABELS: [&[(&str, &str)]; 4] = [&[], &[("app", "app")], &[("app", "db")], &[("role", "ops")]];

const POLICIES: [&str; 4] = [
    policy::ALLOW_ALL,
    policy::DENY_ALL,
    policy::APP_DB_UDP,
    "rules:\n  - {name: ops, from: {role: ops}, to: {app: {exists: true}}, ports: [udp/5000]}\n  - {name: db, from: {app: db}, to: {app: app}, ports: [any]}\n",
];

#[derive(Debug, Clone)]
enum Op {
    Join(usize),
    Leave(usize),
    Move(usize),
    Label(usize, usize),
    Policy(usize),
    Quarantine(usize, bool),
    CutControl(usize),
    HealControl(usize),
    CutData(usize, usize),
    HealData,
    Restart,
    Traffic(usize, usize),
    Run(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let i = 0usize..8;
    prop_oneof![
        3 => (0..LABELS.len()).prop_map(Op::Join),
        1 => i.clone().prop_map(Op::Leave),
        2 => i.clone().prop_map(Op::Move),
        2 => (i.clone(), 0..LABELS.len()).prop_map(|(h, l)| Op::Label(h, l)),
        2 => (0..POLICIES.len()).prop_map(Op::Policy),
        1 => (i.clone(), any::<bool>()).prop_map(|(h, q)| Op::Quarantine(h, q)),
        1 => i.clone().prop_map(Op::CutControl),
        1 => i.clone().prop_map(Op::HealControl),
        1 => (i.clone(), i.clone()).prop_map(|(a, b)| Op::CutData(a, b)),
        1 => Just(Op::HealData),
        1 => Just(Op::Restart),
        4 => (i.clone(), i).prop_map(|(a, b)| Op::Traffic(a, b)),
        3 => (1u64..15_000).prop_map(Op::Run),
    ]
}

fn pick(m: &Mesh, i: usize) -> Option<HostIdx> {
    let n = m.hosts().len();
    (n > 0).then(|| HostIdx(i % n))
}

fn run(seed: u64, ops: &[Op]) -> Result<(), TestCaseError> {
    let cfg = MeshConfig {
        seed,
        link: LinkConfig {
            latency: Duration::from_millis(3),
            jitter: Duration::from_millis(2),
            loss: 0.05,
            reorder: 0.05,
            ..LinkConfig::default()
        },
        ..MeshConfig::default()
    };
    let mut m = Mesh::new(cfg).unwrap();
    m.apply_policy(policy::ALLOW_ALL).unwrap();
    let mut joined = 0;
    let mut sent = 0u32;
    for op in ops {
        match *op {
            Op::Join(l) => {
                if m.add_host(&format!("h{joined}"), labels(LABELS[l])).is_ok() {
                    joined += 1;
                }
            }
            Op::Leave(i) => {
                if let Some(h) = pick(&m, i) {
                    let name = m.host(h).name.clone();
                    let _maybe_gone = m.admin(|s, _| s.remove_host(&name));
                }
            }
            Op::Move(i) => {
                if let Some(h) = pick(&m, i) {
                    m.move_host(h);
                }
            }
            Op::Label(i, l) => {
                if let Some(h) = pick(&m, i) {
                    let name = m.host(h).name.clone();
                    let _maybe_gone = m.admin(|s, _| {
                        let old: Vec<String> = s
                            .find_host(&name)
                            .map(|h| h.labels.keys().cloned().collect())
                            .unwrap_or_default();
                        s.remove_labels(&name, &old)?;
                        s.set_labels(&name, labels(LABELS[l]))
                    });
                }
            }
            Op::Policy(p) => {
                let _down_or_refused = m.apply_policy(POLICIES[p]);
            }
            Op::Quarantine(i, q) => {
                if let Some(h) = pick(&m, i) {
                    let name = m.host(h).name.clone();
                    let _maybe_gone = m.admin(|s, _| {
                        if q {
                            s.quarantine(&name)
                        } else {
                            s.release(&name)
                        }
                    });
                }
            }
            Op::CutControl(i) => {
                if let Some(h) = pick(&m, i) {
                    m.partition_control(h);
                }
            }
            Op::HealControl(i) => {
                if let Some(h) = pick(&m, i) {
                    m.heal_control(h);
                }
            }
            Op::CutData(a, b) => {
                if let (Some(a), Some(b)) = (pick(&m, a), pick(&m, b)) {
                    m.partition_hosts(a, b);
                }
            }
            Op::HealData => m.net_mut().heal_all(),
            Op::Restart => m.restart_coordinator().unwrap(),
            Op::Traffic(a, b) => {
                if let (Some(a), Some(b)) = (pick(&m, a), pick(&m, b)) {
                    sent += 1;
                    // Denied or unroutable is fine: policy decides.
                    let _maybe_denied = m.send_udp(a, b, 5000, &marked(&sent.to_be_bytes()));
                }
            }
            Op::Run(ms) => m.run_for(Duration::from_millis(ms)),
        }
    }
    // Settle: every path healed, long enough for backoff (≤ 5 s) plus a connect timeout.
    m.heal_coordinator();
    m.net_mut().heal_all();
    m.run_for(Duration::from_secs(30));

    for (i, host) in m.hosts().iter().enumerate() {
        let h = HostIdx(i);
        let want = m.expected_map(h);
        let removed = m.state().host(host.id()).is_none_or(|r| r.removed);
        if removed {
            prop_assert!(
                host.device().peers().is_empty(),
                "{}: removed, no tunnels",
                host.name
            );
            continue;
        }
        prop_assert!(
            host.is_connected(),
            "{}: connected after settling",
            host.name
        );
        let have = host.session().map().cloned().unwrap_or_default();
        prop_assert_eq!(&have.peers, &want.peers, "{}: session map", &host.name);
        let grants = m.state().grants_for(host.id());
        let peers = host.device().peers();
        prop_assert_eq!(peers.len(), grants.len(), "{}: device peers", &host.name);
        for (pid, g) in &grants {
            let key = m
                .state()
                .host(meshd_control::HostId(*pid))
                .map(|p| p.public_key)
                .unwrap();
            let (spec, _) = peers.get(&key).unwrap();
            prop_assert_eq!(
                &*spec.grants,
                g,
                "{}: grants towards host {}",
                &host.name,
                pid
            );
        }
    }
    // Traffic between every pair over lossless links: delivered exactly when granted.
    m.net_mut().set_default_link(LinkConfig::default());
    // The data plane settles through traffic too, as WireGuard does: a host that kept a
    // session while its peer dropped and re-added it (one side's map changed while the other
    // was cut off) is heard from no more, and its next data starts a new handshake only
    // after the unanswered-data timeout. One round of traffic, then that long.
    let n = m.hosts().len();
    for a in (0..n).map(HostIdx) {
        for b in (0..n).map(HostIdx).filter(|&b| b != a) {
            let _denied_or_unroutable = m.send_udp(a, b, 5000, b"warm-up");
        }
    }
    m.run_for(meshd_testkit::device::UNANSWERED_TIMEOUT + Duration::from_secs(1));
    let now = m.clock().unix_secs();
    for a in (0..n).map(HostIdx) {
        for b in (0..n).map(HostIdx).filter(|&b| b != a) {
            let (ha, hb) = (m.host(a), m.host(b));
            let allowed = m
                .state()
                .grants_for(ha.id())
                .get(&hb.id().0)
                .is_some_and(|g| {
                    g.find(Direction::Outbound, ip_proto::UDP, 5000, now)
                        .is_some()
                });
            let p = marked(format!("final {} {}", a.0, b.0).as_bytes());
            let ka = ha.public_key();
            let _denied_or_unroutable = m.send_udp(a, b, 5000, &p);
            m.run_for(Duration::from_millis(50));
            let got = m.host(b).received(&ka, &p);
            prop_assert_eq!(
                got,
                usize::from(allowed),
                "{} -> {}: allowed {}",
                a.0,
                b.0,
                allowed
            );
            sent += 1;
        }
    }
    prop_assert!(sent > 0 || n < 2);
    for r in m.net().log() {
        prop_assert!(
            boringtun::noise::Tunn::parse_incoming_packet(&r.payload).is_ok(),
            "a datagram that is not a WireGuard message: {:?}",
            r
        );
        prop_assert!(
            !fixtures::contains_marker(&r.payload),
            "plaintext on the wire: {:?}",
            r
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("MESH_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(32), ..ProptestConfig::default() })]
    #[test]
    fn a_random_mesh_life_settles_to_the_compiled_state(seed in any::<u64>(), ops in prop::collection::vec(op(), 1..40)) {
        run(seed, &ops)?;
    }
}

#[test]
fn traffic_in_the_random_life_is_delivered_when_policy_allows() {
    // A fixed run with traffic that must arrive: the property above must not pass vacuously.
    let ops = [Op::Join(1), Op::Join(2), Op::Join(3), Op::Run(500)];
    run(7, &ops).unwrap();
    let mut m = Mesh::new(MeshConfig::default()).unwrap();
    m.apply_policy(POLICIES[3]).unwrap();
    let a = m.add_host("a", labels(LABELS[1])).unwrap();
    let b = m.add_host("b", labels(LABELS[2])).unwrap();
    m.run_for(Duration::from_secs(1));
    m.send_udp(b, a, 5000, &marked(b"db to app")).unwrap();
    m.run_for(Duration::from_millis(20));
    assert_eq!(
        m.host(a)
            .received(&m.host(b).public_key(), &marked(b"db to app")),
        1
    );
    assert!(
        m.send_udp(a, b, 5000, &marked(b"app to db")).is_err(),
        "not granted"
    );
}
