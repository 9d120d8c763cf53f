//! Questions about a policy: the direct (naive) evaluation of one connection, the file's tests,
//! and the access a new policy gains or loses against an old one.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::compile::{compile, Explanation};
use crate::file::{Endpoint, Expect, Policy, PolicyTest};
use crate::grant::UnixTime;
use crate::port::{PortSpec, Probe};
use crate::selector::HostRef;

impl Policy {
    /// Direct evaluation, rule by rule: may `from` open a connection to `to` matching `probe` at
    /// `now`? A matching deny rule wins over every allow rule and over learning. (When denied
    /// by no deny rule: does it pass as would-deny because either end learns?) The reference
    /// the compiled tables are tested against.
    pub fn explain_hosts(
        &self,
        from: &HostRef,
        to: &HostRef,
        probe: Probe,
        now: UnixTime,
    ) -> Explanation {
        if from.id == to.id {
            return Explanation::DENY;
        }
        let allow = self.rules.iter().find(|r| {
            !r.expired(now)
                && r.from.matches(from)
                && r.to.matches(to)
                && r.ports.iter().any(|p| p.admits(probe))
        });
        if let Some(d) = self.deny.iter().find(|d| d.denies(from, to, probe)) {
            return Explanation {
                deny: Some(d.name.clone()),
                overrides: allow.map(|r| r.name.clone()),
                ..Explanation::DENY
            };
        }
        allow.map_or(
            Explanation {
                learning: self.learns(from) || self.learns(to),
                ..Explanation::DENY
            },
            |r| Explanation {
                allowed: true,
                rule: Some(r.name.clone()),
                ..Explanation::DENY
            },
        )
    }
}

/// Finds hosts by name (the coordinator's inventory).
pub trait Resolve {
    /// The host called `name`.
    fn resolve(&self, name: &str) -> Option<HostRef>;
}

/// No inventory: host-name tests cannot be resolved (offline `policy check`).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoInventory;

impl Resolve for NoInventory {
    fn resolve(&self, _: &str) -> Option<HostRef> {
        None
    }
}

impl Resolve for [HostRef] {
    fn resolve(&self, name: &str) -> Option<HostRef> {
        self.iter().find(|h| h.name == name).cloned()
    }
}

impl Resolve for Vec<HostRef> {
    fn resolve(&self, name: &str) -> Option<HostRef> {
        self.as_slice().resolve(name)
    }
}

/// How one test went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum TestOutcome {
    /// As expected (`rule`: the allowing rule, if allowed).
    Pass {
        /// The allowing rule.
        rule: Option<String>,
        /// The deny rule that denied it, if one did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deny: Option<String>,
    },
    /// Not as expected.
    Fail {
        /// What the policy says.
        got: Expect,
        /// The allowing rule, if allowed; with `deny`, the allow rule the deny shadowed.
        rule: Option<String>,
        /// The deny rule that denied it (shadowing `rule`, if any).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deny: Option<String>,
    },
    /// A host name is not in the inventory (or there is no inventory).
    Unresolved {
        /// The unknown name.
        host: String,
    },
}

/// One test's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestResult {
    /// Index in the file's `tests`.
    pub index: usize,
    /// `from -> to port expect …`, for display.
    pub test: String,
    /// Outcome.
    #[serde(flatten)]
    pub outcome: TestOutcome,
}

impl TestResult {
    /// True if the test passed.
    pub fn passed(&self) -> bool {
        matches!(self.outcome, TestOutcome::Pass { .. })
    }
}

impl std::fmt::Display for TestResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tests[{}] {}: ", self.index, self.test)?;
        match &self.outcome {
            TestOutcome::Pass { .. } => f.write_str("ok"),
            TestOutcome::Fail { got, rule, deny } => {
                let got = if *got == Expect::Allow {
                    "allowed"
                } else {
                    "denied"
                };
                match (deny, rule) {
                    (Some(d), Some(r)) => {
                        write!(
                            f,
                            "FAILED: {got} by deny rule {d} (shadowing allow rule {r})"
                        )
                    }
                    (Some(d), None) => write!(f, "FAILED: {got} by deny rule {d}"),
                    (None, Some(r)) => write!(f, "FAILED: {got} by rule {r}"),
                    (None, None) => write!(f, "FAILED: {got}"),
                }
            }
            TestOutcome::Unresolved { host } => write!(f, "UNRESOLVED: no host named {host}"),
        }
    }
}

/// Runs the policy's tests at `now`. Label-set endpoints are hypothetical hosts with exactly
/// those labels (and no name), so they need no inventory; host names go through `resolver`.
pub fn run_tests<R: Resolve + ?Sized>(
    policy: &Policy,
    resolver: &R,
    now: UnixTime,
) -> Vec<TestResult> {
    policy
        .tests
        .iter()
        .enumerate()
        .map(|(index, t)| TestResult {
            index,
            test: describe(t),
            outcome: run_one(policy, t, resolver, now),
        })
        .collect()
}

fn describe(t: &PolicyTest) -> String {
    let e = match t.expect {
        Expect::Allow => "allow",
        Expect::Deny => "deny",
    };
    format!("{} -> {} {} expect {e}", t.from, t.to, t.port)
}

fn run_one<R: Resolve + ?Sized>(
    policy: &Policy,
    t: &PolicyTest,
    resolver: &R,
    now: UnixTime,
) -> TestOutcome {
    let endpoint = |e: &Endpoint, hypothetical_id: u64| match e {
        Endpoint::Host(n) => resolver.resolve(n).ok_or_else(|| n.clone()),
        Endpoint::Labels(l) => Ok(HostRef {
            id: hypothetical_id,
            name: String::new(),
            labels: l.clone(),
        }),
    };
    let (from, to) = match (endpoint(&t.from, u64::MAX), endpoint(&t.to, u64::MAX - 1)) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(host), _) | (_, Err(host)) => return TestOutcome::Unresolved { host },
    };
    let ex = policy.explain_hosts(&from, &to, t.port, now);
    let got = if ex.allowed {
        Expect::Allow
    } else {
        Expect::Deny
    };
    // A denied test names the allow rule the deny shadowed.
    let rule = ex.rule.or(ex.overrides);
    if got == t.expect {
        TestOutcome::Pass {
            rule: if ex.allowed { rule } else { None },
            deny: ex.deny,
        }
    } else {
        TestOutcome::Fail {
            got,
            rule,
            deny: ex.deny,
        }
    }
}

/// Gained or lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    /// The new policy allows it, the old one did not.
    Gained,
    /// The old policy allowed it, the new one does not.
    Lost,
}

/// One access change between two policies: `from` may (no longer) open connections to `to` on
/// `ports`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Change {
    /// Host that opens connections (name).
    pub from: String,
    /// Host connected to (name).
    pub to: String,
    /// The port spec as written in the rules.
    pub ports: PortSpec,
    /// Gained or lost.
    pub kind: ChangeKind,
    /// The allow rule giving it (the new policy's when gained, the old one's when lost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Lost because of this deny rule of the new policy (overriding `rule`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny: Option<String>,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sign = match self.kind {
            ChangeKind::Gained => '+',
            ChangeKind::Lost => '-',
        };
        write!(f, "{sign} {} -> {} {}", self.from, self.to, self.ports)?;
        match (&self.deny, &self.rule) {
            (Some(d), Some(r)) => write!(f, " (deny {d} overrides allow {r})"),
            (Some(d), None) => write!(f, " (deny {d})"),
            _ => Ok(()),
        }
    }
}

/// Which host pairs and port specs gain or lose access going from `old` to `new` (both
/// evaluated at `now`). Port specs are compared as written: narrowing `tcp/1-100` to `tcp/1-50`
/// shows as one lost and one gained spec; a deny rule taking part of a spec away shows the spec
/// lost (naming the deny and the allow rule it overrides) and the pieces left gained. Sorted by
/// from, to, ports, kind.
pub fn diff(old: &Policy, new: &Policy, hosts: &[HostRef], now: UnixTime) -> Vec<Change> {
    let (a, b) = (compile(old, hosts, now), compile(new, hosts, now));
    let mut out = Vec::new();
    let name = |id: u64| a.host(id).map(|h| h.name.clone()).unwrap_or_default();
    type Specs = BTreeMap<u64, BTreeMap<PortSpec, String>>;
    let specs = |c: &crate::compile::Compiled, id: u64| -> Specs {
        c.grants_for(id)
            .into_iter()
            .map(|(p, g)| {
                let mut m = BTreeMap::new();
                for g in &g.outbound {
                    m.entry(PortSpec::of_grant(g))
                        .or_insert_with(|| g.rule.clone());
                }
                (p, m)
            })
            .filter(|(_, s)| !s.is_empty())
            .collect()
    };
    let empty = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for h in hosts {
        if !seen.insert(h.id) {
            continue;
        }
        let (sa, sb) = (specs(&a, h.id), specs(&b, h.id));
        let peers: BTreeSet<u64> = sa.keys().chain(sb.keys()).copied().collect();
        for p in peers {
            let (pa, pb) = (sa.get(&p).unwrap_or(&empty), sb.get(&p).unwrap_or(&empty));
            for (set, other, kind) in [(pb, pa, ChangeKind::Gained), (pa, pb, ChangeKind::Lost)] {
                for (spec, rule) in set.iter().filter(|(s, _)| !other.contains_key(*s)) {
                    let deny = match kind {
                        ChangeKind::Gained => None,
                        ChangeKind::Lost => b
                            .denies_between(h.id, p)
                            .into_iter()
                            .find(|d| overlaps(d, spec))
                            .map(|d| d.rule),
                    };
                    out.push(Change {
                        from: name(h.id),
                        to: name(p),
                        ports: *spec,
                        kind,
                        rule: Some(rule.clone()),
                        deny,
                    });
                }
            }
        }
    }
    out.sort();
    out
}

/// Whether deny grant `d` takes anything away from `spec`.
fn overlaps(d: &crate::grant::Grant, spec: &PortSpec) -> bool {
    let g = spec.grant("", None);
    g.subtract(std::slice::from_ref(d)) != [g]
}
