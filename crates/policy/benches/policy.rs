//! Policy benchmarks: compile 10,000 hosts × 1,000 rules, an incremental one-host change, and
//! the per-packet grant check.

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use meshd_policy::{
    compile, ip_proto, Direction, Grant, HostRef, Match, PeerGrants, Policy, PortSpec, Proto, Rule,
    Selector,
};

const HOSTS: u64 = 10_000;
const RULES: usize = 1_000;

/// Hosts with app (200 values), env (3), team (20) and, for a third, a `tier` label.
fn hosts() -> Vec<HostRef> {
    (0..HOSTS)
        .map(|i| {
            let mut labels = BTreeMap::new();
            labels.insert("app".into(), format!("app{}", i % 200));
            labels.insert(
                "env".into(),
                ["prod", "staging", "dev"][(i % 3) as usize].into(),
            );
            labels.insert("team".into(), format!("team{}", i % 20));
            if i % 3 == 0 {
                labels.insert("tier".into(), "front".into());
            }
            HostRef {
                id: i,
                name: format!("host-{i}"),
                labels,
            }
        })
        .collect()
}

fn sel(terms: &[(&str, Match)]) -> Selector {
    Selector {
        host: None,
        labels: terms
            .iter()
            .map(|(k, m)| (k.to_string(), m.clone()))
            .collect(),
    }
}

/// 1,000 rules mixing every operator: mostly app → app pairs with env terms.
fn policy() -> Policy {
    let eq = |v: String| Match::Eq(v);
    let rules = (0..RULES)
        .map(|i| {
            let (from, to) = match i % 5 {
                0 => (
                    sel(&[("app", eq(format!("app{}", i % 200)))]),
                    sel(&[
                        ("app", eq(format!("app{}", (i * 7) % 200))),
                        ("env", eq("prod".into())),
                    ]),
                ),
                1 => (
                    sel(&[
                        ("team", eq(format!("team{}", i % 20))),
                        ("env", Match::Ne("dev".into())),
                    ]),
                    sel(&[(
                        "app",
                        Match::In(vec![
                            format!("app{}", i % 200),
                            format!("app{}", (i + 1) % 200),
                        ]),
                    )]),
                ),
                2 => (
                    sel(&[
                        ("app", eq(format!("app{}", i % 200))),
                        ("tier", Match::Exists(true)),
                    ]),
                    sel(&[
                        ("app", eq(format!("app{}", (i * 3) % 200))),
                        ("tier", Match::Exists(false)),
                    ]),
                ),
                3 => (
                    Selector::host(&format!("host-{}", i * 7)),
                    sel(&[
                        ("team", eq(format!("team{}", i % 20))),
                        ("env", eq("staging".into())),
                    ]),
                ),
                _ => (
                    sel(&[("app", eq(format!("app{}", i % 200)))]),
                    sel(&[("app", eq(format!("app{}", (i * 11) % 200)))]),
                ),
            };
            Rule {
                name: format!("rule-{i}"),
                from,
                to,
                ports: vec![PortSpec {
                    proto: Proto::Tcp,
                    lo: 1000 + i as u16,
                    hi: 1000 + i as u16,
                }],
                expires: (i % 10 == 0).then_some(2_000_000_000),
            }
        })
        .collect();
    Policy {
        rules,
        ..Policy::default()
    }
}

fn benches(c: &mut Criterion) {
    let (hosts, policy) = (hosts(), policy());
    let now = 1_700_000_000;
    let mut g = c.benchmark_group("policy");
    g.sample_size(10);
    g.bench_function("compile_10k_hosts_1k_rules", |b| {
        b.iter(|| black_box(compile(&policy, &hosts, now)))
    });
    let compiled = compile(&policy, &hosts, now);
    g.bench_function("grants_for_one_host", |b| {
        b.iter(|| black_box(compiled.grants_for(black_box(4242))))
    });
    g.bench_function("update_host_label_change", |b| {
        let mut c = compiled.clone();
        let mut h = hosts[4242].clone();
        let mut flip = false;
        b.iter(|| {
            flip = !flip;
            h.labels.insert(
                "app".into(),
                if flip { "app7".into() } else { "app42".into() },
            );
            let affected = c.update_host(&h);
            // What a coordinator does next: the changed host's own grants.
            black_box((affected.len(), c.grants_for(h.id).len()))
        })
    });
    g.bench_function("update_host_add_remove", |b| {
        let mut c = compiled.clone();
        let mut h = hosts[17].clone();
        h.id = 99_999;
        h.name = "new-host".into();
        b.iter(|| {
            black_box(c.update_host(&h).len());
            black_box(c.remove_host(h.id).len())
        })
    });
    // Learning mode: 50 hosts (app=app7) learn, so they peer with all 10,000.
    let mut learning = policy.clone();
    learning.learn = vec![sel(&[("app", Match::Eq("app7".into()))])];
    let lc = compile(&learning, &hosts, now);
    g.bench_function("grants_for_one_host_50_learning", |b| {
        b.iter(|| black_box(lc.grants_for(black_box(4242))))
    });
    g.bench_function("update_host_into_and_out_of_learning", |b| {
        let mut c = lc.clone();
        let mut h = hosts[4242].clone();
        let mut flip = false;
        b.iter(|| {
            flip = !flip;
            h.labels.insert(
                "app".into(),
                if flip { "app7".into() } else { "app42".into() },
            );
            black_box(c.update_host(&h).len())
        })
    });
    g.finish();

    // Per-packet check: a peer with 8 grants, the admitting one last.
    let grant = |proto, lo, hi| Grant {
        proto,
        ports: (lo, hi),
        expires_at: Some(2_000_000_000),
        rule: "r".into(),
    };
    let pg = PeerGrants {
        deny: Default::default(),
        learn: false,
        outbound: (0..7)
            .map(|i| grant(Proto::Udp, 100 + i, 100 + i))
            .chain([grant(Proto::Tcp, 1521, 1521)])
            .collect(),
        inbound: vec![grant(Proto::Icmp, 0, 0)],
    };
    let mut g = c.benchmark_group("packet");
    g.bench_function("peer_grants_find_hit_8th", |b| {
        b.iter(|| {
            black_box(&pg)
                .find(
                    Direction::Outbound,
                    black_box(ip_proto::TCP),
                    black_box(1521),
                    black_box(now),
                )
                .is_some()
        })
    });
    g.bench_function("peer_grants_find_miss", |b| {
        b.iter(|| {
            black_box(&pg)
                .find(
                    Direction::Outbound,
                    black_box(ip_proto::TCP),
                    black_box(22),
                    black_box(now),
                )
                .is_some()
        })
    });
    g.bench_function("peer_grants_find_hit_1st", |b| {
        b.iter(|| {
            black_box(&pg)
                .find(
                    Direction::Inbound,
                    black_box(ip_proto::ICMP),
                    black_box(0),
                    black_box(now),
                )
                .is_some()
        })
    });
    g.finish();
}

criterion_group!(policy_benches, benches);
criterion_main!(policy_benches);
