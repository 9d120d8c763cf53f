//! Compilation against the naive evaluator, incremental changes against a fresh compile, and
//! explain / run_tests / diff.

use std::collections::{BTreeMap, BTreeSet};

use meshd_policy::{
    compile, compile_with, diff, ip_proto, run_tests, ChangeKind, Compiled, DenyRule, Direction,
    Grant, HostRef, Learning, Match, NoInventory, PeerDenies, PeerGrants, Policy, PolicyMode,
    PortSpec, Probe, Proto, Rule, Selector, TestOutcome,
};
use meshd_testkit::fixtures::host_ref as host;
use proptest::prelude::*;

const NOW: u64 = 1_000;

/// Whether `h` learns: the file's `mode`/`learn:` or the runtime `extra`, straight from them.
fn naive_learns(policy: &Policy, extra: &Learning, h: &HostRef) -> bool {
    policy.mode == PolicyMode::Learn
        || extra.all
        || policy
            .learn
            .iter()
            .chain(&extra.groups)
            .any(|s| s.matches(h))
}

/// The deny grants for `a` opening connections to `b`, deny rule by deny rule.
fn naive_denies(policy: &Policy, a: &HostRef, b: &HostRef) -> Vec<Grant> {
    let mut v = Vec::new();
    for d in &policy.deny {
        let pair = (d.from.matches(a) && d.to.matches(b))
            || (d.both_ways && d.from.matches(b) && d.to.matches(a));
        if pair {
            let mut g: Vec<Grant> = d.ports.iter().map(|p| p.grant(&d.name, None)).collect();
            g.dedup();
            v.extend(g);
        }
    }
    v
}

/// The grants between `a` and `b` seen from `a`, rule by rule, straight from the policy and
/// the runtime learning: a pair learns if either end does; denies are subtracted and listed,
/// and a pair left with nothing is no pair.
fn naive_with(policy: &Policy, extra: &Learning, a: &HostRef, b: &HostRef, now: u64) -> PeerGrants {
    let mut pg = PeerGrants::default();
    if a.id == b.id {
        return pg;
    }
    let (out_d, in_d) = (naive_denies(policy, a, b), naive_denies(policy, b, a));
    pg.learn = naive_learns(policy, extra, a) || naive_learns(policy, extra, b);
    for r in policy.rules.iter().filter(|r| !r.expired(now)) {
        let grants = || {
            let mut g: Vec<Grant> = r
                .ports
                .iter()
                .map(|p| p.grant(&r.name, r.expires))
                .collect();
            g.dedup();
            g
        };
        if r.from.matches(a) && r.to.matches(b) {
            pg.outbound
                .extend(grants().iter().flat_map(|g| g.subtract(&out_d)));
        }
        if r.from.matches(b) && r.to.matches(a) {
            pg.inbound
                .extend(grants().iter().flat_map(|g| g.subtract(&in_d)));
        }
    }
    if pg.is_empty() && !pg.learn {
        return PeerGrants::default();
    }
    pg.deny = PeerDenies {
        outbound: out_d,
        inbound: in_d,
    };
    pg
}

/// Probes around the generated ports, plus ICMP and an "other" protocol (SCTP).
fn probes() -> Vec<Probe> {
    let mut v: Vec<Probe> = (0..7)
        .flat_map(|port| [ip_proto::TCP, ip_proto::UDP].map(|ip_proto| Probe { ip_proto, port }))
        .collect();
    v.push(Probe {
        ip_proto: ip_proto::ICMP,
        port: 0,
    });
    v.push(Probe {
        ip_proto: 132,
        port: 0,
    });
    v
}

/// What the data plane does, from the compiled grants alone, agrees with direct evaluation:
/// a flow is admitted by a grant of the first allowing rule exactly when `explain_hosts`
/// allows it, and the deny lists name the winning deny rule (which learning never overrides).
fn check_enforcement(policy: &Policy, c: &Compiled, hosts: &BTreeMap<u64, HostRef>) {
    for a in hosts.values() {
        for b in hosts.values() {
            let pg = c.grants_between(a.id, b.id);
            for p in probes() {
                let want = policy.explain_hosts(a, b, p, NOW);
                let got = pg.find(Direction::Outbound, p.ip_proto, p.port, NOW);
                assert_eq!(
                    got.map(|g| g.rule.clone()),
                    want.rule,
                    "{} -> {} {p}: {pg:?}",
                    a.name,
                    b.name
                );
                let back = c.grants_between(b.id, a.id);
                let got_in = back.find(Direction::Inbound, p.ip_proto, p.port, NOW);
                assert_eq!(got_in.map(|g| g.rule.clone()), want.rule);
                if want.deny.is_some() && !pg.is_empty() || want.deny.is_some() && pg.learn {
                    let d = pg.deny.find(Direction::Outbound, p.ip_proto, p.port);
                    assert_eq!(d.map(|g| g.rule.clone()), want.deny, "{p}");
                    assert!(!want.learning, "a deny is never learnt");
                }
                if want.deny.is_none() {
                    assert!(pg
                        .deny
                        .find(Direction::Outbound, p.ip_proto, p.port)
                        .is_none());
                }
                assert_eq!(c.explain(a.id, b.id, p, NOW), want);
            }
        }
    }
}

/// Checks every table of `c` against the naive evaluator over `hosts`.
fn check_against_naive(policy: &Policy, c: &Compiled, hosts: &BTreeMap<u64, HostRef>) {
    check_against_naive_with(policy, &Learning::default(), c, hosts)
}

/// [`check_against_naive`] with runtime learning.
fn check_against_naive_with(
    policy: &Policy,
    extra: &Learning,
    c: &Compiled,
    hosts: &BTreeMap<u64, HostRef>,
) {
    for a in hosts.values() {
        assert_eq!(
            c.is_learning(a.id),
            naive_learns(policy, extra, a),
            "{} learns",
            a.name
        );
        let grants = c.grants_for(a.id);
        let mut want_peers = BTreeSet::new();
        for b in hosts.values() {
            let want = naive_with(policy, extra, a, b, NOW);
            let got = grants.get(&b.id).cloned().unwrap_or_default();
            assert_eq!(got, want, "{} -> {}", a.name, b.name);
            assert_eq!(c.grants_between(a.id, b.id), want);
            if !want.is_empty() || want.learn {
                want_peers.insert(b.id);
            }
        }
        assert!(grants.values().all(|g| !g.is_empty() || g.learn));
        let fp = c.peer_fingerprints(a.id);
        assert_eq!(
            fp.iter().map(|x| x.0).collect::<Vec<_>>(),
            grants.keys().copied().collect::<Vec<_>>()
        );
        for b in hosts.values() {
            let f = fp.iter().find(|x| x.0 == b.id).map_or(0, |x| x.1);
            assert_eq!(c.pair_fingerprint(a.id, b.id), f);
        }
        assert_eq!(c.peers_of(a.id), want_peers, "peers of {}", a.name);
    }
}

const KEYS: [&str; 3] = ["app", "env", "team"];
const VALUES: [&str; 3] = ["a", "b", "c"];

fn arb_labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    proptest::collection::btree_map(
        proptest::sample::select(&KEYS[..]).prop_map(String::from),
        proptest::sample::select(&VALUES[..]).prop_map(String::from),
        0..3,
    )
}

fn arb_match() -> impl Strategy<Value = Match> {
    let v = || proptest::sample::select(&VALUES[..]).prop_map(String::from);
    prop_oneof![
        v().prop_map(Match::Eq),
        proptest::collection::vec(v(), 1..3).prop_map(Match::In),
        v().prop_map(Match::Ne),
        any::<bool>().prop_map(Match::Exists),
    ]
}

fn arb_selector(names: usize) -> impl Strategy<Value = Selector> {
    (
        proptest::option::weighted(0.15, 0..names),
        proptest::collection::btree_map(
            proptest::sample::select(&KEYS[..]).prop_map(String::from),
            arb_match(),
            0..3,
        ),
    )
        .prop_map(|(host, labels)| Selector {
            host: host.map(|i| format!("h{i}")),
            labels,
        })
}

fn arb_port() -> impl Strategy<Value = PortSpec> {
    prop_oneof![
        Just(PortSpec::ANY),
        Just(PortSpec {
            proto: Proto::Other,
            lo: 0,
            hi: 0
        }),
        Just(PortSpec {
            proto: Proto::Icmp,
            lo: 0,
            hi: 0
        }),
        (0u16..4, 0u16..3).prop_map(|(lo, w)| PortSpec {
            proto: Proto::Tcp,
            lo,
            hi: lo + w
        }),
        (0u16..4).prop_map(|p| PortSpec {
            proto: Proto::Udp,
            lo: p,
            hi: p
        }),
    ]
}

fn arb_policy(names: usize) -> impl Strategy<Value = Policy> {
    proptest::collection::vec(
        (
            arb_selector(names),
            arb_selector(names),
            proptest::collection::vec(arb_port(), 1..3),
            proptest::option::weighted(0.3, 500u64..1500),
        ),
        0..8,
    )
    .prop_flat_map(move |rules| (Just(rules), arb_learning(names), arb_denies(names)))
    .prop_map(|(rules, (all, learn), deny)| Policy {
        deny,
        mode: if all {
            PolicyMode::Learn
        } else {
            PolicyMode::Enforce
        },
        learn,
        rules: rules
            .into_iter()
            .enumerate()
            .map(|(i, (from, to, ports, expires))| Rule {
                name: format!("r{i}"),
                from,
                to,
                ports,
                expires,
            })
            .collect(),
        tests: vec![],
    })
}

/// Deny rules: often none, else up to three (some `isolate`, some with narrow ports).
fn arb_denies(names: usize) -> impl Strategy<Value = Vec<DenyRule>> {
    let one = (
        arb_selector(names),
        arb_selector(names),
        proptest::collection::vec(arb_port(), 1..3),
        0u8..4,
    );
    prop_oneof![
        2 => Just(Vec::new()),
        3 => proptest::collection::vec(one, 1..4),
    ]
    .prop_map(|ds| {
        ds.into_iter()
            .enumerate()
            .map(|(i, (from, to, ports, kind))| {
                let name = format!("d{i}");
                match kind {
                    0 => DenyRule::isolate(&name, from),
                    _ => DenyRule {
                        name,
                        from,
                        to,
                        ports,
                        both_ways: kind == 1,
                    },
                }
            })
            .collect()
    })
}

/// Learning: rarely the whole mesh, else up to two selectors (often none).
fn arb_learning(names: usize) -> impl Strategy<Value = (bool, Vec<Selector>)> {
    (
        proptest::bool::weighted(0.05),
        prop_oneof![
            2 => Just(Vec::new()),
            3 => proptest::collection::vec(arb_selector(names), 1..3),
        ],
    )
}

/// Runtime learning on top of the file's.
fn arb_extra(names: usize) -> impl Strategy<Value = Learning> {
    arb_learning(names).prop_map(|(all, groups)| Learning { all, groups })
}

/// Up to 12 hosts with ids 0..12 and names h0..h11.
fn arb_hosts() -> impl Strategy<Value = Vec<HostRef>> {
    proptest::collection::vec(arb_labels(), 0..12).prop_map(|ls| {
        ls.into_iter()
            .enumerate()
            .map(|(i, labels)| HostRef {
                id: i as u64,
                name: format!("h{i}"),
                labels,
            })
            .collect()
    })
}

/// A host change: new labels for id (new host if unknown), or removal.
fn arb_ops() -> impl Strategy<Value = Vec<(u64, Option<BTreeMap<String, String>>)>> {
    proptest::collection::vec(
        (0u64..16, proptest::option::weighted(0.8, arb_labels())),
        0..10,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn compiled_agrees_with_naive(policy in arb_policy(12), hosts in arb_hosts()) {
        let c = compile(&policy, &hosts, NOW);
        let map = hosts.iter().map(|h| (h.id, h.clone())).collect();
        check_against_naive(&policy, &c, &map);
        check_enforcement(&policy, &c, &map);
        // explain agrees with direct evaluation for every pair and a few probes.
        for a in &hosts {
            for b in &hosts {
                for probe in ["tcp/1", "tcp/3", "udp/2", "icmp"] {
                    let probe: Probe = probe.parse().unwrap();
                    for now in [NOW, 1_200] {
                        prop_assert_eq!(
                            c.explain(a.id, b.id, probe, now),
                            policy.explain_hosts(a, b, probe, now)
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn runtime_learning_agrees_with_naive(
        policy in arb_policy(12),
        extra in arb_extra(12),
        hosts in arb_hosts(),
    ) {
        let c = compile_with(&policy, &extra, &hosts, NOW);
        let map = hosts.iter().map(|h| (h.id, h.clone())).collect();
        check_against_naive_with(&policy, &extra, &c, &map);
        if extra == Learning::default() {
            check_enforcement(&policy, &c, &map);
        }
        let want: BTreeSet<u64> = hosts
            .iter()
            .filter(|h| naive_learns(&policy, &extra, h))
            .map(|h| h.id)
            .collect();
        prop_assert_eq!(c.learning_hosts().map(|h| h.id).collect::<BTreeSet<_>>(), want);
        // explain: denied flows with a learning end pass as would-deny; allowed ones keep
        // their rule and never say so.
        for a in &hosts {
            for b in &hosts {
                let e = c.explain(a.id, b.id, "tcp/1".parse().unwrap(), NOW);
                let learns = a.id != b.id
                    && (naive_learns(&policy, &extra, a) || naive_learns(&policy, &extra, b));
                prop_assert_eq!(e.learning, !e.allowed && e.deny.is_none() && learns);
            }
        }
    }

    #[test]
    fn incremental_learning_equals_fresh(
        policy in arb_policy(16),
        extra in arb_extra(16),
        hosts in arb_hosts(),
        ops in arb_ops(),
    ) {
        let mut c = compile_with(&policy, &extra, &hosts, NOW);
        let mut map: BTreeMap<u64, HostRef> = hosts.iter().map(|h| (h.id, h.clone())).collect();
        for (id, labels) in ops {
            let before: BTreeMap<u64, BTreeMap<u64, PeerGrants>> =
                map.keys().map(|&h| (h, c.grants_for(h))).collect();
            let affected = match labels {
                Some(labels) => {
                    let h = HostRef { id, name: format!("h{id}"), labels };
                    map.insert(id, h.clone());
                    c.update_host(&h)
                }
                None => {
                    map.remove(&id);
                    c.remove_host(id)
                }
            };
            check_against_naive_with(&policy, &extra, &c, &map);
            for &h in map.keys() {
                if before.get(&h) != Some(&c.grants_for(h)) {
                    prop_assert!(affected.contains(&h), "host {} changed but not reported", h);
                }
            }
        }
    }

    #[test]
    fn incremental_equals_fresh(policy in arb_policy(16), hosts in arb_hosts(), ops in arb_ops()) {
        let mut c = compile(&policy, &hosts, NOW);
        let mut map: BTreeMap<u64, HostRef> = hosts.iter().map(|h| (h.id, h.clone())).collect();
        for (id, labels) in ops {
            let before: BTreeMap<u64, BTreeMap<u64, PeerGrants>> =
                map.keys().map(|&h| (h, c.grants_for(h))).collect();
            let fp_before: BTreeMap<u64, Vec<(u64, u64)>> =
                map.keys().map(|&h| (h, c.peer_fingerprints(h))).collect();
            let affected = match labels {
                Some(labels) => {
                    let h = HostRef { id, name: format!("h{id}"), labels };
                    map.insert(id, h.clone());
                    c.update_host(&h)
                }
                None => {
                    map.remove(&id);
                    c.remove_host(id)
                }
            };
            check_against_naive(&policy, &c, &map);
            // Exactly the hosts whose grants changed are reported (plus a new host).
            for &h in map.keys() {
                let changed = before.get(&h) != Some(&c.grants_for(h));
                if changed {
                    prop_assert!(affected.contains(&h), "host {} changed but not reported", h);
                }
                // Fingerprints change exactly when grants do (per peer).
                if let Some(old) = fp_before.get(&h) {
                    let now_fp = c.peer_fingerprints(h);
                    for (p, f) in &now_fp {
                        let old_f = old.iter().find(|x| x.0 == *p).map(|x| x.1);
                        let same = before[&h].get(p) == c.grants_for(h).get(p);
                        prop_assert_eq!(old_f == Some(*f), same);
                    }
                }
            }
            for h in &affected {
                prop_assert!(map.contains_key(h));
            }
        }
        let fresh = compile(&policy, &map.values().cloned().collect::<Vec<_>>(), NOW);
        for &h in map.keys() {
            prop_assert_eq!(fresh.grants_for(h), c.grants_for(h));
        }
    }
}

const FILE: &str = "\
rules:
  - name: app1-to-db1
    from: { app: app1 }
    to:   { app: db1, env: prod }
    ports: [tcp/1521]
  - name: contractor-web
    from: { team: contractor }
    to:   { app: web }
    ports: [tcp/443, udp/53, icmp]
    expires: 1970-01-01T00:20:00Z
  - name: ops
    from: ops-1
    to: {}
    ports: [tcp/22]
tests:
  - { from: app1-host-1, to: db1-host-1, port: tcp/1521, expect: allow }
  - { from: { app: web }, to: { app: db1 }, port: tcp/1521, expect: deny }
  - { from: { app: app1 }, to: { app: db1, env: prod }, port: tcp/1521, expect: allow }
  - { from: { app: app1 }, to: { app: db1, env: prod }, port: tcp/1522, expect: allow }
";

fn inventory() -> Vec<HostRef> {
    vec![
        host(1, "app1-host-1", &[("app", "app1")]),
        host(2, "db1-host-1", &[("app", "db1"), ("env", "prod")]),
        host(3, "db1-host-2", &[("app", "db1"), ("env", "dev")]),
        host(4, "web-1", &[("app", "web")]),
        host(5, "contractor-1", &[("team", "contractor")]),
        host(6, "ops-1", &[]),
    ]
}

#[test]
fn example_grants_peers_and_self() {
    let p = Policy::parse(FILE).unwrap();
    let c = compile(&p, &inventory(), NOW);
    let g = c.grants_for(1);
    assert_eq!(g.keys().copied().collect::<Vec<_>>(), vec![2, 6]);
    assert_eq!(g[&2].outbound.len(), 1);
    assert!(g[&2].inbound.is_empty());
    assert_eq!(g[&6].inbound[0].rule, "ops");
    assert_eq!(
        c.peers_of(3),
        BTreeSet::from([6]),
        "dev db only reachable by ops"
    );
    assert_eq!(c.peers_of(4), BTreeSet::from([5, 6]));
    // The ops host selects every host, itself included, but gets no grant to itself.
    assert_eq!(c.peers_of(6), BTreeSet::from([1, 2, 3, 4, 5]));
    assert!(c.grants_between(6, 6).is_empty());
    // Expiring grants carry expires_at; agents enforce it.
    let w = &c.grants_for(5)[&4].outbound;
    assert_eq!(w.len(), 3);
    assert!(w.iter().all(|g| g.expires_at == Some(1200)));
    assert_eq!(c.next_expiry(NOW), Some(1200));
    // Already expired at compile time: dropped.
    let late = compile(&p, &inventory(), 1200);
    assert_eq!(late.peers_of(5), BTreeSet::from([6]), "only ops is left");
    assert_eq!(late.rule_count(), 2);
    // Unknown hosts have nothing.
    assert!(c.grants_for(99).is_empty() && c.peers_of(99).is_empty());
}

#[test]
fn explain_names_the_rule() {
    let p = Policy::parse(FILE).unwrap();
    let c = compile(&p, &inventory(), NOW);
    let probe = |s: &str| s.parse::<Probe>().unwrap();
    let e = c.explain(1, 2, probe("tcp/1521"), NOW);
    assert!(e.allowed);
    assert_eq!(e.rule.as_deref(), Some("app1-to-db1"));
    assert!(
        !c.explain(2, 1, probe("tcp/1521"), NOW).allowed,
        "replies are not new flows"
    );
    assert!(!c.explain(1, 2, probe("tcp/1522"), NOW).allowed);
    assert!(!c.explain(1, 3, probe("tcp/1521"), NOW).allowed);
    assert!(c.explain(5, 4, probe("icmp"), NOW).allowed);
    assert!(!c.explain(5, 4, probe("icmp"), 1200).allowed, "expired");
    assert_eq!(
        c.explain(6, 6, probe("tcp/22"), NOW),
        meshd_policy::Explanation::DENY
    );
    assert_eq!(
        p.explain_hosts(&inventory()[0], &inventory()[1], probe("tcp/1521"), NOW),
        e
    );
}

#[test]
fn tests_offline_and_with_inventory() {
    let p = Policy::parse(FILE).unwrap();
    let offline = run_tests(&p, &NoInventory, NOW);
    assert_eq!(offline.len(), 4);
    assert_eq!(
        offline[0].outcome,
        TestOutcome::Unresolved {
            host: "app1-host-1".into()
        }
    );
    assert!(offline[1].passed() && offline[2].passed());
    assert_eq!(
        offline[3].outcome,
        TestOutcome::Fail {
            got: meshd_policy::Expect::Deny,
            rule: None,
            deny: None,
        }
    );
    assert!(offline[3].to_string().contains("FAILED"), "{}", offline[3]);
    let inv = inventory();
    let online = run_tests(&p, &inv, NOW);
    assert_eq!(
        online[0].outcome,
        TestOutcome::Pass {
            rule: Some("app1-to-db1".into()),
            deny: None,
        }
    );
    let c = compile(&p, &inv, NOW);
    assert!(run_tests(&p, &c, NOW)[0].passed());
}

#[test]
fn diff_lists_pairs_and_ports() {
    let old = Policy::parse(FILE).unwrap();
    let new_text = FILE
        .replace("ports: [tcp/1521]", "ports: [tcp/1521, tcp/1522]")
        .replace("from: ops-1", "from: contractor-1");
    let new = Policy::parse(&new_text).unwrap();
    let changes = diff(&old, &new, &inventory(), NOW);
    let shown: Vec<String> = changes.iter().map(ToString::to_string).collect();
    assert!(
        shown.contains(&"+ app1-host-1 -> db1-host-1 tcp/1522".to_string()),
        "{shown:?}"
    );
    assert!(
        shown.contains(&"- ops-1 -> web-1 tcp/22".to_string()),
        "{shown:?}"
    );
    assert!(
        shown.contains(&"+ contractor-1 -> ops-1 tcp/22".to_string()),
        "{shown:?}"
    );
    assert!(!shown
        .iter()
        .any(|s| s.contains("app1-host-1 -> db1-host-1 tcp/1521")));
    assert_eq!(
        changes
            .iter()
            .filter(|c| c.kind == ChangeKind::Lost)
            .count(),
        5
    );
    assert!(diff(&old, &old, &inventory(), NOW).is_empty());
}

#[test]
fn update_reports_affected_hosts() {
    let p = Policy::parse(FILE).unwrap();
    let mut c = compile(&p, &inventory(), NOW);
    // db1-host-2 moves to prod: app1 gains it; ops already had it.
    let moved = host(3, "db1-host-2", &[("app", "db1"), ("env", "prod")]);
    assert_eq!(c.update_host(&moved), BTreeSet::from([1, 3]));
    // A label change with no policy effect changes nobody.
    let same = host(
        3,
        "db1-host-2",
        &[("app", "db1"), ("env", "prod"), ("x", "y")],
    );
    assert_eq!(c.update_host(&same), BTreeSet::new());
    // A new host: itself plus ops.
    assert_eq!(c.update_host(&host(7, "n", &[])), BTreeSet::from([6, 7]));
    assert_eq!(c.remove_host(7), BTreeSet::from([6]));
    assert_eq!(c.remove_host(7), BTreeSet::new());
    assert_eq!(c.host_count(), 6);
    assert!(c.explain(1, 3, "tcp/1521".parse().unwrap(), NOW).allowed);
    let _ = ip_proto::TCP;
}

#[test]
fn learning_hosts_peer_with_everyone_and_keep_their_grants() {
    let p = Policy::parse(&format!("learn:\n  - {{ app: web }}\n{FILE}")).unwrap();
    let mut c = compile(&p, &inventory(), NOW);
    // web-1 (4) learns: a peer of every host both ways, learn=true on each pair.
    assert!(c.is_learning(4) && !c.is_learning(1));
    assert_eq!(c.peers_of(4), BTreeSet::from([1, 2, 3, 5, 6]));
    for other in [1, 2, 3, 5, 6] {
        assert!(c.peers_of(other).contains(&4), "{other} peers with web-1");
        assert!(c.grants_between(4, other).learn);
        assert!(c.grants_between(other, 4).learn);
        assert!(c.grants_for(other)[&4].learn);
    }
    // The rules' grants stay: contractor-1 → web-1 still carries its three grants.
    let g = c.grants_between(4, 5);
    assert_eq!(g.inbound.len(), 3);
    assert_eq!(g.inbound[0].rule, "contractor-web");
    // Pairs without a learning end are unchanged.
    assert!(!c.grants_between(1, 2).learn);
    assert_eq!(c.peers_of(3), BTreeSet::from([4, 6]));
    // explain: a denied flow with a learning end passes as would-deny; allowed keeps its rule.
    let probe = |s: &str| s.parse::<Probe>().unwrap();
    let e = c.explain(1, 4, probe("tcp/80"), NOW);
    assert!(!e.allowed && e.learning && e.rule.is_none());
    let e = c.explain(5, 4, probe("tcp/443"), NOW);
    assert!(e.allowed && !e.learning);
    assert_eq!(e.rule.as_deref(), Some("contractor-web"));
    assert!(!c.explain(1, 3, probe("tcp/80"), NOW).learning);
    assert_eq!(
        p.explain_hosts(&inventory()[0], &inventory()[3], probe("tcp/80"), NOW),
        c.explain(1, 4, probe("tcp/80"), NOW)
    );

    // Incremental: db1-host-2 (3) joins the web group: every host that does not learn
    // itself is affected (its pair flips), and so is 3.
    let moved = host(3, "db1-host-2", &[("app", "web")]);
    assert_eq!(c.update_host(&moved), BTreeSet::from([1, 2, 3, 5, 6]));
    assert!(c.is_learning(3) && c.grants_between(1, 3).learn);
    // ... and leaves it again.
    let back = host(3, "db1-host-2", &[("app", "db1"), ("env", "dev")]);
    assert_eq!(c.update_host(&back), BTreeSet::from([1, 2, 3, 5, 6]));
    assert!(!c.is_learning(3) && !c.grants_between(1, 3).learn);
    assert!(c.grants_between(4, 3).learn, "web-1 still learns");
    // A new host pairs with the learning one; removing it tells it.
    assert_eq!(c.update_host(&host(7, "n", &[])), BTreeSet::from([4, 6, 7]));
    assert!(c.grants_between(7, 4).learn);
    assert_eq!(c.remove_host(7), BTreeSet::from([4, 6]));
    // The whole mesh at runtime: every pair learns.
    let all = compile_with(
        &p,
        &Learning {
            all: true,
            groups: vec![],
        },
        &inventory(),
        NOW,
    );
    assert!(all.learns_all());
    assert_eq!(all.peers_of(1), BTreeSet::from([2, 3, 4, 5, 6]));
    assert_eq!(all.learning_hosts().count(), 6);
}

const GUARDED: &str = "\
mode: enforce
learn:
  - { app: web }
rules:
  - name: everyone-ssh
    from: {}
    to: {}
    ports: [tcp/22, tcp/1521]
  - name: app1-to-db1
    from: { app: app1 }
    to:   { app: db1 }
    ports: [any]
deny:
  - name: dev-never-prod
    from: { env: dev }
    to:   { env: prod }
  - name: no-db-ssh
    from: {}
    to: { app: db1 }
    ports: [tcp/22]
  - name: incident-isolate
    isolate: { incident: isolate }
tests:
  - { from: { app: app1, env: dev }, to: { app: db1, env: prod }, port: tcp/1521, expect: allow }
  - { from: { app: app1 }, to: { app: db1 }, port: tcp/22, expect: deny }
  - { from: { app: app1 }, to: { app: db1 }, port: tcp/1521, expect: allow }
";

fn guarded_inventory() -> Vec<HostRef> {
    vec![
        host(1, "app1-dev", &[("app", "app1"), ("env", "dev")]),
        host(2, "db1-prod", &[("app", "db1"), ("env", "prod")]),
        host(3, "app1-prod", &[("app", "app1"), ("env", "prod")]),
        host(4, "web-dev", &[("app", "web"), ("env", "dev")]),
        host(5, "ops", &[]),
    ]
}

#[test]
fn deny_rules_parse_and_validate() {
    let p = Policy::parse(GUARDED).unwrap();
    assert_eq!(p.deny.len(), 3);
    assert_eq!(p.deny[0].ports, vec![PortSpec::ANY], "ports default to any");
    assert!(!p.deny[0].both_ways && p.deny[2].both_ways);
    assert_eq!(p.deny[2].to, Selector::default());
    assert_eq!(p.deny[1].ports[0].to_string(), "tcp/22");
    let err = |t: &str| Policy::parse(t).expect_err(t).to_string();
    let e = err("deny:\n  - name: a\n    from: {}\n");
    assert!(e.contains("needs both `from` and `to`"), "{e}");
    let e = err("deny:\n  - name: a\n    isolate: {}\n    to: {}\n");
    assert!(e.contains("stands alone"), "{e}");
    let e = err("deny:\n  - name: a\n    from: {}\n    to: {}\n    colour: red\n");
    assert!(e.contains("unknown field `colour`"), "{e}");
    let e = err("deny:\n  - name: a\n    from: {}\n    to: {}\n    ports: []\n");
    assert!(e.contains("at least one port"), "{e}");
    let e = err("rules:\n  - name: a\n    from: {}\n    to: {}\n    ports: [any]\ndeny:\n  - name: a\n    isolate: {}\n");
    assert!(e.contains("deny[0].name: duplicate rule name `a`"), "{e}");
}

#[test]
fn deny_overrides_allow_in_grants_explain_and_tests() {
    let p = Policy::parse(GUARDED).unwrap();
    let inv = guarded_inventory();
    let c = compile(&p, &inv, NOW);
    let probe = |s: &str| s.parse::<Probe>().unwrap();
    // app1-dev -> db1-prod: everything denied by dev-never-prod; the other way (prod to dev)
    // is still allowed, so they stay peers.
    let g = c.grants_between(1, 2);
    assert!(g.outbound.is_empty() && !g.inbound.is_empty());
    assert_eq!(g.deny.outbound[0].rule, "dev-never-prod");
    assert!(g.deny.inbound.is_empty());
    assert!(c.peers_of(1).contains(&2));
    let e = c.explain(1, 2, probe("tcp/1521"), NOW);
    assert!(!e.allowed && !e.learning);
    assert_eq!(e.deny.as_deref(), Some("dev-never-prod"));
    assert_eq!(e.overrides.as_deref(), Some("everyone-ssh"));
    assert_eq!(p.explain_hosts(&inv[0], &inv[1], probe("tcp/1521"), NOW), e);
    // app1-prod -> db1-prod: `any` minus tcp/22, split into what is left.
    let g = c.grants_between(3, 2);
    assert!(g
        .find(Direction::Outbound, ip_proto::TCP, 22, NOW)
        .is_none());
    assert_eq!(
        g.find(Direction::Outbound, ip_proto::TCP, 1521, NOW)
            .map(|g| g.rule.as_str()),
        Some("everyone-ssh")
    );
    assert!(g
        .find(Direction::Outbound, ip_proto::TCP, 23, NOW)
        .is_some());
    assert!(
        g.find(Direction::Outbound, 132, 0, NOW).is_some(),
        "other protocols stay"
    );
    assert_eq!(g.deny.outbound.len(), 1);
    assert_eq!(g.deny.outbound[0].rule, "no-db-ssh");
    let e = c.explain(3, 2, probe("tcp/22"), NOW);
    assert_eq!(
        (e.deny.as_deref(), e.overrides.as_deref()),
        (Some("no-db-ssh"), Some("everyone-ssh"))
    );
    // The peer's view is the mirror image.
    let back = c.grants_between(2, 3);
    assert!(back
        .find(Direction::Inbound, ip_proto::TCP, 22, NOW)
        .is_none());
    assert_eq!(back.deny.inbound[0].rule, "no-db-ssh");
    // Learning never lets a deny through: web-dev learns, and its pair with db1-prod is
    // a learning pair whose deny list still forbids everything web-dev would open.
    let w = c.grants_between(4, 2);
    assert!(w.learn && w.outbound.is_empty());
    assert_eq!(
        w.deny
            .find(Direction::Outbound, ip_proto::TCP, 80)
            .map(|g| g.rule.as_str()),
        Some("dev-never-prod")
    );
    let e = c.explain(4, 2, probe("tcp/80"), NOW);
    assert!(!e.allowed && !e.learning && e.deny.as_deref() == Some("dev-never-prod"));
    // A learning flow with no deny still passes as would-deny.
    assert!(c.explain(4, 5, probe("tcp/80"), NOW).learning);

    // The file's tests: the one expecting allow through a deny fails and names both rules.
    let results = run_tests(&p, &NoInventory, NOW);
    assert_eq!(
        results[0].outcome,
        TestOutcome::Fail {
            got: meshd_policy::Expect::Deny,
            rule: Some("everyone-ssh".into()),
            deny: Some("dev-never-prod".into()),
        }
    );
    let shown = results[0].to_string();
    assert!(
        shown.contains("denied by deny rule dev-never-prod (shadowing allow rule everyone-ssh)"),
        "{shown}"
    );
    assert_eq!(
        results[1].outcome,
        TestOutcome::Pass {
            rule: None,
            deny: Some("no-db-ssh".into())
        }
    );
    assert!(results[2].passed());
    // Without the deny rules the same test passes: the failure is the deny's doing.
    let mut open = p.clone();
    open.deny.clear();
    assert!(run_tests(&open, &NoInventory, NOW)[0].passed());
}

#[test]
fn isolate_cuts_a_host_off_and_back_incrementally() {
    let p = Policy::parse(GUARDED).unwrap();
    let inv = guarded_inventory();
    let mut c = compile(&p, &inv, NOW);
    assert_eq!(c.peers_of(5), BTreeSet::from([1, 2, 3, 4]));
    // ops is put in isolation: every host it had grants with is told, it keeps only the
    // learning pair with web-dev, and that pair denies everything both ways.
    let isolated = host(5, "ops", &[("incident", "isolate")]);
    let affected = c.update_host(&isolated);
    assert_eq!(affected, BTreeSet::from([1, 2, 3, 4, 5]));
    assert_eq!(c.peers_of(5), BTreeSet::from([4]));
    assert!(!c.grants_for(1).contains_key(&5));
    let w = c.grants_between(5, 4);
    assert!(w.learn && w.is_empty());
    assert_eq!(w.deny.inbound[0].rule, "incident-isolate");
    assert_eq!(w.deny.outbound[0].rule, "incident-isolate");
    let e = c.explain(1, 5, "tcp/22".parse().unwrap(), NOW);
    assert_eq!(e.deny.as_deref(), Some("incident-isolate"));
    // A label change far from every deny touches nobody.
    let same = host(
        1,
        "app1-dev",
        &[("app", "app1"), ("env", "dev"), ("x", "y")],
    );
    assert_eq!(c.update_host(&same), BTreeSet::new());
    // Out of isolation: back to where it was.
    let back = host(5, "ops", &[]);
    assert_eq!(c.update_host(&back), BTreeSet::from([1, 2, 3, 4, 5]));
    let fresh = compile(&p, &inv, NOW);
    for h in &inv {
        assert_eq!(c.grants_for(h.id), fresh.grants_for(h.id), "{}", h.name);
    }
}

#[test]
fn diff_names_the_deny_that_won() {
    let old = Policy::parse(GUARDED).unwrap();
    let mut open = old.clone();
    open.deny.clear();
    let inv = guarded_inventory();
    let changes = diff(&open, &old, &inv, NOW);
    let shown: Vec<String> = changes.iter().map(ToString::to_string).collect();
    assert!(
        shown.contains(
            &"- app1-dev -> db1-prod tcp/1521 (deny dev-never-prod overrides allow everyone-ssh)"
                .to_string()
        ),
        "{shown:?}"
    );
    assert!(
        shown.contains(
            &"- app1-prod -> db1-prod tcp/22 (deny no-db-ssh overrides allow everyone-ssh)"
                .to_string()
        ),
        "{shown:?}"
    );
    // The rest of app1-prod's `any` to db1-prod is still there, as pieces.
    assert!(
        shown.contains(&"+ app1-prod -> db1-prod tcp/23-65535".to_string()),
        "{shown:?}"
    );
    // Lifting the denies gains it all back, naming the allow rule.
    let back = diff(&old, &open, &inv, NOW);
    let c = back
        .iter()
        .find(|c| c.from == "app1-dev" && c.to == "db1-prod" && c.ports.to_string() == "tcp/1521")
        .unwrap();
    assert_eq!(
        (c.kind, c.rule.as_deref(), c.deny.as_deref()),
        (ChangeKind::Gained, Some("everyone-ssh"), None)
    );
}
