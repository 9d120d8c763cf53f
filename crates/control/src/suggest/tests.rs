use super::*;
use crate::topology::tests::{inv, row};
use crate::topology::{topology, InventoryHost};
use meshd_policy::{compile, run_tests, Direction, HostRef, NoInventory, Policy, Probe};

fn href(h: &InventoryHost) -> HostRef {
    HostRef {
        id: h.id.0,
        name: h.name.clone(),
        labels: h.labels.clone(),
    }
}

/// web (w1, w2) → db (d1) on tcp/5432 and icmp (would-deny), a host without `app` → db on
/// udp/53, one denied flow, one plaintext drop.
fn observed() -> (Vec<InventoryHost>, Vec<crate::api::FlowView>) {
    let w1 = inv(1, "w1", Some("web"));
    let w2 = inv(2, "w2", Some("web"));
    let d1 = inv(3, "d1", Some("db"));
    let n1 = inv(4, "n1", None);
    let (a, wd, den) = (
        FlowVerdict::Allowed,
        FlowVerdict::WouldDeny,
        FlowVerdict::Denied,
    );
    let mut rows = vec![
        row(&w1, &d1, Direction::Outbound, 6, 5432, a, 10, 100),
        row(&d1, &w1, Direction::Inbound, 6, 5432, a, 10, 100),
        row(&w2, &d1, Direction::Outbound, 6, 5432, a, 5, 200),
        row(&w1, &d1, Direction::Outbound, 1, 0, wd, 2, 300),
        row(&n1, &d1, Direction::Outbound, 17, 53, wd, 2, 300),
        row(&d1, &w1, Direction::Outbound, 6, 22, den, 1, 400),
    ];
    let mut plain = row(&d1, &d1, Direction::Inbound, 6, 5432, den, 3, 500);
    plain.peer = None;
    plain.peer_id = None;
    plain.src = Some("198.18.0.9".parse().unwrap());
    rows.push(plain);
    (vec![w1, w2, d1, n1], rows)
}

#[test]
fn the_suggestion_parses_allows_exactly_what_was_seen_and_its_tests_pass() {
    let (hosts, rows) = observed();
    let t = topology(&rows, &hosts, "app", 50);
    let s = suggest(&t, 1000);
    println!("{}", s.yaml);
    let p = Policy::parse(&s.yaml).unwrap_or_else(|e| panic!("{e}\n{}", s.yaml));
    assert_eq!(s.rules, 2, "web->db and (none)->db");
    assert_eq!(p.rules.len(), 2);
    let web_db = p.rules.iter().find(|r| r.name == "web-to-db").unwrap();
    let ports: Vec<String> = web_db.ports.iter().map(ToString::to_string).collect();
    assert_eq!(
        ports,
        ["icmp", "tcp/5432"],
        "one rule per pair, ports grouped"
    );
    assert_eq!(s.tests, 3);
    assert_eq!(p.tests.len(), 3);
    let results = run_tests(&p, &NoInventory, 1000);
    assert!(results.iter().all(|r| r.passed()), "{results:?}");
    // Evidence is cited.
    assert!(s.yaml.contains("w1>d1, w2>d1"), "{}", s.yaml);
    assert!(s.yaml.contains("allowed by web-db"), "{}", s.yaml);
    assert!(s.yaml.contains("would be denied"), "{}", s.yaml);
    assert!(
        s.yaml.contains("first seen 1970-01-01T00:01:40Z"),
        "{}",
        s.yaml
    );
    assert_eq!(s.skipped.len(), 2, "the denied flow and the plaintext drop");

    // Compiled against the observed hosts: every observed (allowed or would-deny) flow is
    // allowed, and flows not seen are denied.
    let refs: Vec<HostRef> = hosts.iter().map(href).collect();
    let c = compile(&p, &refs, 1000);
    let allowed = |from: u64, to: u64, probe: &str| {
        c.explain(from, to, probe.parse::<Probe>().unwrap(), 1000)
            .allowed
    };
    assert!(allowed(1, 3, "tcp/5432"));
    assert!(allowed(2, 3, "tcp/5432"));
    assert!(allowed(2, 3, "icmp"), "label level: w2 is web too");
    assert!(allowed(4, 3, "udp/53"));
    assert!(!allowed(3, 1, "tcp/22"), "the denied flow stays denied");
    assert!(!allowed(1, 3, "tcp/5433"), "an unseen port");
    assert!(!allowed(3, 1, "tcp/5432"), "the reverse direction");
    assert!(!allowed(1, 3, "udp/53"), "web never used udp/53");
    assert!(!allowed(1, 2, "tcp/5432"), "web to web");
}

#[test]
fn host_grouping_and_nothing_seen() {
    let (hosts, rows) = observed();
    let t = topology(&rows, &hosts, "host", 50);
    let s = suggest(&t, 1000);
    let p = Policy::parse(&s.yaml).unwrap_or_else(|e| panic!("{e}\n{}", s.yaml));
    assert_eq!(p.rules.len(), 3, "w1->d1, w2->d1, n1->d1");
    let refs: Vec<HostRef> = hosts.iter().map(href).collect();
    let results = run_tests(&p, refs.as_slice(), 1000);
    assert!(results.iter().all(|r| r.passed()), "{results:?}");
    let c = compile(&p, &refs, 1000);
    let probe = |s: &str| s.parse::<Probe>().unwrap();
    assert!(c.explain(1, 3, probe("icmp"), 1000).allowed);
    assert!(
        !c.explain(2, 3, probe("icmp"), 1000).allowed,
        "host level: w2 never pinged"
    );

    let empty = suggest(&topology(&[], &hosts, "app", 0), 0);
    let p = Policy::parse(&empty.yaml).unwrap();
    assert!(p.rules.is_empty() && p.tests.is_empty());
}

#[test]
fn odd_label_values_are_quoted() {
    let a = inv(1, "a", Some("my app"));
    let b = inv(2, "b", Some("true"));
    let rows = vec![row(
        &a,
        &b,
        Direction::Outbound,
        6,
        80,
        FlowVerdict::Allowed,
        1,
        10,
    )];
    let s = suggest(&topology(&rows, &[a.clone(), b.clone()], "app", 0), 0);
    let p = Policy::parse(&s.yaml).unwrap_or_else(|e| panic!("{e}\n{}", s.yaml));
    let c = compile(&p, &[href(&a), href(&b)], 0);
    assert!(
        c.explain(1, 2, "tcp/80".parse().unwrap(), 0).allowed,
        "{}",
        s.yaml
    );
    assert!(run_tests(&p, &NoInventory, 0).iter().all(|r| r.passed()));
}
