//! The policy file (YAML): rules and tests, parsed once into typed values with errors that give
//! the line and column.
//!
//! ```yaml
//! rules:
//!   - name: app1-to-db1
//!     from: { app: app1 }
//!     to:   { app: db1, env: prod }
//!     ports: [tcp/1521]
//!   - name: contractor-web
//!     from: { team: contractor }
//!     to:   { app: web }
//!     ports: [tcp/443, udp/53, icmp]
//!     expires: 2026-12-31T18:00:00Z
//! tests:
//!   - { from: app1-host-1, to: db1-host-1, port: tcp/1521, expect: allow }
//!   - { from: { app: web }, to: { app: db1 }, port: tcp/1521, expect: deny }
//! ```
//!
//! A rule `from A to B ports P` lets hosts matching A open connections to hosts matching B on P
//! (replies of an admitted flow are tracked by the firewall). Unknown keys are refused, rule
//! names are unique, every rule has at least one port spec. A test endpoint is a host name
//! (resolved against an inventory) or a label set describing a host (checkable offline).
//!
//! Deny rules (guardrails no allow rule can override, and an emergency isolation switch):
//!
//! ```yaml
//! deny:
//!   - name: dev-never-prod          # env=dev never opens anything to env=prod
//!     from: { env: dev }
//!     to:   { env: prod }
//!     ports: [any]                  # optional, default [any]
//!   - name: incident-isolate        # nothing to or from a host labelled incident=isolate
//!     isolate: { incident: isolate }
//! ```
//!
//! A deny rule has the allow rules' selector and port syntax; `isolate: S` is shorthand for
//! "from S to every host and from every host to S". Whatever a deny matches is taken out of the
//! grants at compilation (the data plane never sees it granted), wins over every allow rule
//! whatever the file order, and is enforced in learning mode too (a denied flow is dropped,
//! never recorded as would-deny). Deny and allow rule names share one namespace.
//!
//! Learning mode (for installing meshd on an estate whose flows nobody can list):
//!
//! ```yaml
//! mode: enforce          # or `learn`: the whole mesh learns (default: enforce)
//! learn:                 # hosts matching any of these selectors learn
//!   - { app: legacy }
//!   - old-erp-1
//! ```
//!
//! A pair of hosts where either end learns is in learning mode: the two are peers whatever the
//! rules say, and a new flow no rule admits still passes and is recorded as would-deny (with the
//! rule that would have been needed) instead of being dropped. The rules' grants still apply, so
//! allowed flows keep reporting their rule. `tests:` check the rules as enforced (learning does
//! not make a denied test pass). The coordinator adds its runtime setting (`meshctl policy mode`)
//! to the file's: the hosts that learn are those the file or the runtime setting names.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::grant::UnixTime;
use crate::port::{ParseVisitor, PortSpec, Probe};
use crate::selector::{Selector, Text};

/// A parsed policy file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// `enforce` (the default) or `learn` (the whole mesh learns).
    #[serde(default)]
    pub mode: PolicyMode,
    /// Selectors of the hosts that learn (any match).
    #[serde(default)]
    pub learn: Vec<Selector>,
    /// Rules, in file order (the first admitting rule is the one reported).
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Deny rules: what they match is denied whatever the rules and learning say.
    #[serde(default)]
    pub deny: Vec<DenyRule>,
    /// Tests run by `policy check` and before every apply.
    #[serde(default)]
    pub tests: Vec<PolicyTest>,
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Unique name (reported by block logs and `explain`).
    pub name: String,
    /// Hosts that may open connections.
    pub from: Selector,
    /// Hosts they may open connections to.
    pub to: Selector,
    /// Protocols and destination ports (at least one).
    #[serde(deserialize_with = "nonempty_ports")]
    pub ports: Vec<PortSpec>,
    /// When the rule stops working (RFC 3339 in the file, seconds since the epoch here).
    #[serde(default, deserialize_with = "rfc3339_opt")]
    pub expires: Option<UnixTime>,
}

/// One deny rule (`deny:` in the file).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawDeny")]
pub struct DenyRule {
    /// Unique name (across allow and deny rules), reported when it wins.
    pub name: String,
    /// Hosts that must not open connections…
    pub from: Selector,
    /// …to these hosts.
    pub to: Selector,
    /// Protocols and destination ports denied (`[any]` when the file gives none).
    pub ports: Vec<PortSpec>,
    /// Also deny `to` → `from` (set by `isolate:`, where `to` is every host).
    pub both_ways: bool,
}

impl DenyRule {
    /// `isolate: sel`: nothing to or from the hosts `sel` matches.
    pub fn isolate(name: &str, sel: Selector) -> DenyRule {
        DenyRule {
            name: name.to_string(),
            from: sel,
            to: Selector::default(),
            ports: vec![PortSpec::ANY],
            both_ways: true,
        }
    }

    /// True if this rule forbids `from` opening a connection matching `probe` to `to`.
    pub fn denies(&self, from: &crate::HostRef, to: &crate::HostRef, probe: Probe) -> bool {
        let pair = (self.from.matches(from) && self.to.matches(to))
            || (self.both_ways && self.from.matches(to) && self.to.matches(from));
        pair && self.ports.iter().any(|p| p.admits(probe))
    }
}

/// A deny rule as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeny {
    name: String,
    #[serde(default)]
    from: Option<Selector>,
    #[serde(default)]
    to: Option<Selector>,
    #[serde(default)]
    isolate: Option<Selector>,
    #[serde(default, deserialize_with = "nonempty_ports_opt")]
    ports: Option<Vec<PortSpec>>,
}

impl TryFrom<RawDeny> for DenyRule {
    type Error = String;
    fn try_from(r: RawDeny) -> Result<DenyRule, String> {
        let n = &r.name;
        match (r.from, r.to, r.isolate) {
            (None, None, Some(sel)) => {
                let mut d = DenyRule::isolate(n, sel);
                if let Some(p) = r.ports {
                    d.ports = p;
                }
                Ok(d)
            }
            (Some(from), Some(to), None) => Ok(DenyRule {
                name: r.name,
                from,
                to,
                ports: r.ports.unwrap_or_else(|| vec![PortSpec::ANY]),
                both_ways: false,
            }),
            (_, _, Some(_)) => Err(format!(
                "deny rule `{n}`: `isolate` stands alone (no `from`/`to`)"
            )),
            _ => Err(format!(
                "deny rule `{n}`: needs both `from` and `to`, or `isolate`"
            )),
        }
    }
}

/// The mesh-wide policy mode (`mode:` in the file).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyMode {
    /// Denied flows are dropped (the default).
    #[default]
    Enforce,
    /// Every host learns: denied flows pass and are recorded as would-deny.
    Learn,
}

impl PolicyMode {
    /// `enforce` or `learn`.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyMode::Enforce => "enforce",
            PolicyMode::Learn => "learn",
        }
    }
}

impl fmt::Display for PolicyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PolicyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<PolicyMode, String> {
        match s {
            "enforce" => Ok(PolicyMode::Enforce),
            "learn" => Ok(PolicyMode::Learn),
            _ => Err(format!("unknown mode `{s}`: expected `learn` or `enforce`")),
        }
    }
}

impl Rule {
    /// True if the rule no longer works at `now`.
    pub fn expired(&self, now: UnixTime) -> bool {
        self.expires.is_some_and(|t| now >= t)
    }
}

/// A test case: is a connection from `from` to `to` on `port` allowed?
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyTest {
    /// Who opens the connection.
    pub from: Endpoint,
    /// Who is connected to.
    pub to: Endpoint,
    /// Protocol and destination port (one port: `tcp/N`, `udp/N` or `icmp`).
    pub port: Probe,
    /// The expected outcome.
    pub expect: Expect,
}

/// A test endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Endpoint {
    /// A host of the inventory, by name.
    Host(String),
    /// A (hypothetical) host with exactly these labels.
    Labels(BTreeMap<String, String>),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Host(h) => f.write_str(h),
            Endpoint::Labels(l) => {
                f.write_str("{")?;
                for (i, (k, v)) in l.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{k}: {v}")?;
                }
                f.write_str("}")
            }
        }
    }
}

/// A test's expected outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    /// Allowed by some rule.
    Allow,
    /// Denied.
    Deny,
}

/// Why a policy file does not parse. Lines and columns start at 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct ParseError {
    /// Line of the offending value.
    pub line: usize,
    /// Column of the offending value.
    pub column: usize,
    /// What is wrong (with the path to the field, e.g. `rules[1].ports[0]: …`).
    pub message: String,
}

impl Policy {
    /// Parses and validates a policy file. An empty file is an empty policy (default deny).
    pub fn parse(text: &str) -> Result<Policy, ParseError> {
        let blank = text
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#') || l.trim() == "---");
        if blank {
            return Ok(Policy::default());
        }
        let policy: Policy = serde_yaml_ng::from_str(text).map_err(|e| {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((1, 1));
            let mut message = e.to_string();
            if let Some(i) = message.rfind(" at line ") {
                message.truncate(i);
            }
            ParseError {
                line,
                column,
                message,
            }
        })?;
        let mut seen = BTreeSet::new();
        let names = (policy.rules.iter().enumerate())
            .map(|(i, r)| ("rules", i, &r.name))
            .chain(
                policy
                    .deny
                    .iter()
                    .enumerate()
                    .map(|(i, d)| ("deny", i, &d.name)),
            );
        for (what, i, name) in names {
            if name.trim().is_empty() {
                let (line, column) = locate_name(text, name, 0);
                return Err(ParseError {
                    line,
                    column,
                    message: format!("{what}[{i}].name: empty rule name"),
                });
            }
            if !seen.insert(name.as_str()) {
                let (line, column) = locate_name(text, name, 1);
                return Err(ParseError {
                    line,
                    column,
                    message: format!("{what}[{i}].name: duplicate rule name `{name}`"),
                });
            }
        }
        Ok(policy)
    }

    /// The rule called `name`.
    pub fn rule(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.name == name)
    }

    /// The deny rule called `name`.
    pub fn deny_rule(&self, name: &str) -> Option<&DenyRule> {
        self.deny.iter().find(|r| r.name == name)
    }

    /// Whether the file puts `h` in learning mode (`mode: learn`, or a `learn:` selector
    /// matches it).
    pub fn learns(&self, h: &crate::selector::HostRef) -> bool {
        self.mode == PolicyMode::Learn || self.learn.iter().any(|s| s.matches(h))
    }

    /// Whether the file declares any learning at all.
    pub fn declares_learning(&self) -> bool {
        self.mode == PolicyMode::Learn || !self.learn.is_empty()
    }
}

/// Where the `skip`-th (0-based) `name: <name>` entry is, for errors found after parsing.
fn locate_name(text: &str, name: &str, skip: usize) -> (usize, usize) {
    let mut found = 0;
    for (i, line) in text.lines().enumerate() {
        let mut from = 0;
        while let Some(p) = line[from..].find("name:") {
            let at = from + p;
            let before = line[..at].chars().last();
            let rest = line[at + 5..].trim_start();
            let rest = rest.trim_start_matches(['"', '\'']);
            let value_ok = rest.starts_with(name)
                && rest[name.len()..]
                    .chars()
                    .next()
                    .is_none_or(|c| matches!(c, '"' | '\'' | ',' | '}' | ' ' | '#'));
            if before.is_none_or(|c| !c.is_alphanumeric() && c != '_' && c != '-') && value_ok {
                if found == skip {
                    let col = line.len() - line[at + 5..].trim_start().len();
                    return (i + 1, col + 1);
                }
                found += 1;
            }
            from = at + 5;
        }
    }
    (1, 1)
}

fn nonempty_ports<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PortSpec>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<PortSpec>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a list of port specs such as [tcp/443, udp/53, icmp]")
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<PortSpec>, A::Error> {
            let mut v = Vec::new();
            while let Some(p) = seq.next_element()? {
                v.push(p);
            }
            if v.is_empty() {
                return Err(de::Error::custom(
                    "a rule needs at least one port spec (use [any] for everything)",
                ));
            }
            Ok(v)
        }
    }
    d.deserialize_seq(V)
}

fn nonempty_ports_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<PortSpec>>, D::Error> {
    nonempty_ports(d).map(Some)
}

/// An RFC 3339 time as seconds since the epoch.
struct Rfc3339(UnixTime);

impl FromStr for Rfc3339 {
    type Err = String;
    fn from_str(s: &str) -> Result<Rfc3339, String> {
        parse_rfc3339(s).map(Rfc3339).map_err(|why| {
            format!("bad time `{s}` ({why}): expected RFC 3339 such as 2026-12-31T18:00:00Z")
        })
    }
}

fn rfc3339_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<UnixTime>, D::Error> {
    let t: Rfc3339 = d.deserialize_str(ParseVisitor(PhantomData, "an RFC 3339 time"))?;
    Ok(Some(t.0))
}

/// Parses an RFC 3339 date-time (`2026-12-31T18:00:00Z`, `…T18:00:00.5+01:00`) into seconds
/// since the epoch (fractions are dropped).
pub fn parse_rfc3339(s: &str) -> Result<UnixTime, &'static str> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Result<i64, &'static str> {
        let part = b.get(r).ok_or("too short")?;
        if part.iter().all(u8::is_ascii_digit) {
            Ok(part.iter().fold(0i64, |a, d| a * 10 + i64::from(d - b'0')))
        } else {
            Err("not a number where one is expected")
        }
    };
    if b.len() < 20 {
        return Err("too short");
    }
    if b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err("wrong separators");
    }
    let (y, mo, d, h, mi, sec) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    let mut i = 19;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return Err("empty fraction");
        }
    }
    let offset = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
            let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if oh > 23 || om > 59 {
                return Err("bad offset");
            }
            let o = oh * 3600 + om * 60;
            if *sign == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return Err("missing or bad time zone (Z or ±HH:MM)"),
    };
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let mdays = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&mo) || d < 1 || d > mdays[(mo - 1) as usize] {
        return Err("no such date");
    }
    if h > 23 || mi > 59 || sec > 60 {
        return Err("no such time");
    }
    // Days from civil (Howard Hinnant).
    let yy = if mo <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let t = days * 86_400 + h * 3600 + mi * 60 + sec.min(59) - offset;
    u64::try_from(t).map_err(|_| "before 1970")
}

impl<'de> Deserialize<'de> for Endpoint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Endpoint, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Endpoint;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a host name or a map of labels")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Endpoint, E> {
                if v.is_empty() {
                    return Err(E::custom("empty host name"));
                }
                Ok(Endpoint::Host(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Endpoint, A::Error> {
                let mut labels = BTreeMap::new();
                while let Some(k) = map.next_key::<String>()? {
                    let v = map.next_value::<Text>()?.0;
                    if labels.insert(k.clone(), v).is_some() {
                        return Err(de::Error::custom(format!("duplicate label `{k}`")));
                    }
                }
                Ok(Endpoint::Labels(labels))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grant::Proto;

    const EXAMPLE: &str = "\
rules:
  - name: app1-to-db1
    from: { app: app1 }
    to:   { app: db1, env: prod }
    ports: [tcp/1521]
  - name: contractor-web
    from: { team: contractor }
    to:   { app: web }
    ports: [tcp/443, udp/53, icmp]
    expires: 2026-12-31T18:00:00Z
tests:                      # checked by `policy check` and before every apply
  - { from: app1-host-1, to: db1-host-1, port: tcp/1521, expect: allow }
  - { from: { app: web }, to: { app: db1 }, port: tcp/1521, expect: deny }
";

    #[test]
    fn parses_the_example() {
        let p = Policy::parse(EXAMPLE).unwrap();
        assert_eq!(p.rules.len(), 2);
        assert_eq!(p.rules[1].ports.len(), 3);
        assert_eq!(p.rules[1].ports[2].proto, Proto::Icmp);
        assert_eq!(p.rules[1].expires, Some(1_798_740_000));
        assert_eq!(p.rules[0].expires, None);
        assert_eq!(p.tests[0].from, Endpoint::Host("app1-host-1".into()));
        assert_eq!(
            p.tests[1].to,
            Endpoint::Labels([("app".to_string(), "db1".to_string())].into())
        );
        assert_eq!(p.tests[1].expect, Expect::Deny);
        assert_eq!(Policy::parse("").unwrap(), Policy::default());
        assert_eq!(Policy::parse("# nothing\n").unwrap(), Policy::default());
        assert_eq!(Policy::parse("rules: []\n").unwrap().rules.len(), 0);
    }

    fn err(text: &str) -> ParseError {
        Policy::parse(text).expect_err(text)
    }

    #[test]
    fn errors_carry_line_and_column() {
        // Bad port on line 4: the value starts at column 13.
        let e = err("rules:\n  - name: a\n    from: {}\n    to: {}\n    ports: [tcp/99999]\n");
        assert_eq!((e.line, e.column), (5, 13), "{e}");
        assert!(e.message.contains("bad port"), "{e}");
        assert!(e.message.contains("rules[0].ports[0]"), "{e}");

        let e = err(
            "rules:\n  - name: a\n    from: {}\n    to: {}\n    ports: [tcp/1]\n    colour: red\n",
        );
        assert_eq!(e.line, 6, "{e}");
        assert!(e.message.contains("unknown field `colour`"), "{e}");

        let e =
            err("rules:\n  - name: a\n    from: {env: {like: x}}\n    to: {}\n    ports: [any]\n");
        assert_eq!(e.line, 3, "{e}");
        assert!(e.message.contains("unknown label operator"), "{e}");

        let e = err("rules:\n  - name: a\n    from: {}\n    to: {}\n    ports: [any]\n    expires: tomorrow\n");
        assert_eq!((e.line, e.column), (6, 14), "{e}");
        assert!(e.message.contains("RFC 3339"), "{e}");

        let e = err("rules:\n  - name: a\n    from: {}\n    to: {}\n    ports: []\n");
        assert_eq!(e.line, 5, "{e}");

        let e = err("rules:\n  - name: a\n    from: {}\n    ports: [any]\n");
        assert!(e.message.contains("missing field `to`"), "{e}");

        let e = err("rules:\n  - name: a\n    from: {}\n    to: {}\n    ports: [any]\n  - name: b\n    from: {}\n    to: {}\n    ports: [any]\n  - name: a\n    from: {}\n    to: {}\n    ports: [any]\n");
        assert_eq!((e.line, e.column), (10, 11), "{e}");
        assert!(e.message.contains("duplicate rule name `a`"), "{e}");

        // Mis-indented: YAML ends the rule early; the error points at the rule.
        let e = err("rules:\n  - name: a\n   from: {}\n");
        assert_eq!((e.line, e.column), (2, 5), "{e}");
        let e = err("rules: [\n");
        assert_eq!(e.line, 2, "{e}");

        let e = err("tests:\n  - { from: a, to: b, port: tcp/1-2, expect: allow }\n");
        assert_eq!(e.line, 2, "{e}");
        assert!(e.message.contains("single"), "{e}");

        let e = err("tests:\n  - { from: a, to: b, port: tcp/1, expect: maybe }\n");
        assert_eq!(e.line, 2, "{e}");

        let e = err("policy: 1\n");
        assert_eq!((e.line, e.column), (1, 1), "{e}");
        assert!(e.to_string().starts_with("line 1, column 1: "), "{e}");
    }

    #[test]
    fn learning_mode_and_groups() {
        let p =
            Policy::parse("mode: enforce\nlearn:\n  - { app: legacy }\n  - old-erp-1\nrules: []\n")
                .unwrap();
        assert_eq!(p.mode, PolicyMode::Enforce);
        assert_eq!(p.learn.len(), 2);
        assert_eq!(p.learn[1], Selector::host("old-erp-1"));
        let legacy = crate::HostRef {
            id: 1,
            name: "l1".into(),
            labels: [("app".to_string(), "legacy".to_string())].into(),
        };
        let web = crate::HostRef {
            id: 2,
            name: "w1".into(),
            labels: [("app".to_string(), "web".to_string())].into(),
        };
        assert!(p.learns(&legacy) && !p.learns(&web));
        assert!(p.declares_learning());
        // The whole mesh; the default is enforce with nobody learning.
        let all = Policy::parse("mode: learn\n").unwrap();
        assert!(all.learns(&web) && all.declares_learning());
        let none = Policy::parse("rules: []\n").unwrap();
        assert_eq!(none.mode, PolicyMode::Enforce);
        assert!(!none.learns(&legacy) && !none.declares_learning());
        assert_eq!("learn".parse::<PolicyMode>(), Ok(PolicyMode::Learn));
        assert!("lurn".parse::<PolicyMode>().is_err());
        assert_eq!(PolicyMode::Learn.to_string(), "learn");
    }

    #[test]
    fn learning_errors_carry_line_and_column() {
        let e = err("rules: []\nmode: lurn\n");
        assert_eq!((e.line, e.column), (2, 7), "{e}");
        assert!(e.message.contains("unknown variant `lurn`"), "{e}");
        assert!(e.message.contains("`learn`"), "{e}");
        let e = err("learn:\n  - { app: {like: x} }\n");
        assert_eq!(e.line, 2, "{e}");
        assert!(e.message.contains("unknown label operator"), "{e}");
        let e = err("learn: { app: legacy }\n");
        assert_eq!(e.line, 1, "{e}");
        assert!(e.message.contains("learn"), "{e}");
        let e = err("learn:\n  - 42\n");
        assert_eq!(e.line, 2, "{e}");
    }

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_rfc3339("2000-03-01T00:00:00Z"), Ok(951_868_800));
        assert_eq!(parse_rfc3339("2026-12-31T18:00:00Z"), Ok(1_798_740_000));
        assert_eq!(
            parse_rfc3339("2026-12-31T19:00:00.25+01:00"),
            Ok(1_798_740_000)
        );
        assert_eq!(
            parse_rfc3339("2026-12-31T17:30:00-00:30"),
            Ok(1_798_740_000)
        );
        for bad in [
            "2026-12-31",
            "2026-02-30T00:00:00Z",
            "2026-12-31T18:00:00",
            "2026-12-31T25:00:00Z",
            "1969-12-31T23:59:59Z",
            "2026-12-31T18:00:00+0100",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad}");
        }
    }
}
