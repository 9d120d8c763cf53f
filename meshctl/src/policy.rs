//! Policy files on the operator's side: reading, parsing with `FILE:LINE:COLUMN: message`
//! errors, and the report of `policy check`. Pure except [`read`].

use std::io::Read as _;
use std::path::Path;

use anyhow::Context as _;
use meshd_policy::{Endpoint, Expect, Policy, TestOutcome, TestResult};
use serde::Serialize;

/// A policy file as read: the name to show in messages and its text.
#[derive(Debug, Clone)]
pub struct Source {
    /// The path as given, or `<stdin>` for `-`.
    pub name: String,
    /// The file's text.
    pub text: String,
}

/// Reads FILE, or standard input for `-`.
pub fn read(path: &Path) -> anyhow::Result<Source> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the policy from standard input")?;
        return Ok(Source {
            name: "<stdin>".into(),
            text,
        });
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read policy file {}", path.display()))?;
    Ok(Source {
        name: path.display().to_string(),
        text,
    })
}

/// Parses the file; the error is one `FILE:LINE:COLUMN: message` line (as compilers print
/// them, so editors and CI annotations can jump to it).
pub fn parse(src: &Source) -> Result<Policy, String> {
    Policy::parse(&src.text)
        .map_err(|e| format!("{}:{}:{}: {}", src.name, e.line, e.column, e.message))
}

/// The host names the file's tests use (they need the coordinator's inventory), deduplicated
/// in file order.
pub fn test_hosts(p: &Policy) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for t in &p.tests {
        for e in [&t.from, &t.to] {
            if let Endpoint::Host(h) = e {
                if !out.contains(h) {
                    out.push(h.clone());
                }
            }
        }
    }
    out
}

/// Where host-name tests were resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "detail")]
pub enum Inventory {
    /// No host-name tests: nothing to resolve.
    NotNeeded,
    /// Against the coordinator at this URL (an unknown name is a failure, as apply would say).
    Coordinator(String),
    /// Not resolved, for this reason (host-name tests are reported, not failed).
    Offline(String),
}

/// The outcome of `policy check`.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// The file as named on the command line.
    pub file: String,
    /// True when nothing failed (unresolved tests without an inventory do not fail).
    pub ok: bool,
    /// Number of rules.
    pub rules: usize,
    /// Where host names were resolved.
    pub inventory: Inventory,
    /// Every test's result, in file order.
    pub tests: Vec<TestResult>,
}

impl CheckReport {
    /// A report; `ok` is computed.
    pub fn new(file: &str, rules: usize, inventory: Inventory, tests: Vec<TestResult>) -> Self {
        let mut r = CheckReport {
            file: file.to_string(),
            ok: true,
            rules,
            inventory,
            tests,
        };
        r.ok = r.failed().is_empty();
        r
    }

    /// Tests that count as failed: wrong outcome, or (with an inventory) an unknown host.
    pub fn failed(&self) -> Vec<&TestResult> {
        let online = matches!(self.inventory, Inventory::Coordinator(_));
        self.tests
            .iter()
            .filter(|t| match t.outcome {
                TestOutcome::Pass { .. } => false,
                TestOutcome::Fail { .. } => true,
                TestOutcome::Unresolved { .. } => online,
            })
            .collect()
    }

    /// The report for people: one line per test, then a summary line.
    pub fn render(&self) -> String {
        let online = matches!(self.inventory, Inventory::Coordinator(_));
        let mut out = String::new();
        for t in &self.tests {
            let (status, detail) = match &t.outcome {
                TestOutcome::Pass { deny: Some(d), .. } => {
                    ("ok", format!("denied by deny rule {d}"))
                }
                TestOutcome::Pass { rule, .. } => ("ok", verdict(rule.is_some(), rule.as_deref())),
                TestOutcome::Fail {
                    deny: Some(d),
                    rule,
                    ..
                } => (
                    "FAILED",
                    match rule {
                        Some(r) => format!(
                            "denied by deny rule {d} (shadowing allow rule {r}), expected allow"
                        ),
                        None => format!("denied by deny rule {d}, expected allow"),
                    },
                ),
                TestOutcome::Fail { got, rule, .. } => (
                    "FAILED",
                    format!(
                        "{}, expected {}",
                        verdict(*got == Expect::Allow, rule.as_deref()),
                        if *got == Expect::Allow {
                            "deny"
                        } else {
                            "allow"
                        }
                    ),
                ),
                TestOutcome::Unresolved { host } if online => (
                    "FAILED",
                    format!("no host named {host} in the coordinator's inventory"),
                ),
                TestOutcome::Unresolved { host } => (
                    "UNRESOLVED",
                    format!("host {host} needs the coordinator's inventory"),
                ),
            };
            out.push_str(&format!(
                "{status:<10}  tests[{}] {}: {detail}\n",
                t.index, t.test
            ));
        }
        let passed = self.tests.iter().filter(|t| t.passed()).count();
        let failed = self.failed().len();
        let unresolved = self.tests.len() - passed - failed;
        let rules = plural(self.rules, "rule");
        let mut summary = if self.tests.is_empty() {
            format!("{}: {rules}, no tests", self.file)
        } else {
            let mut s = format!(
                "{}: {rules}, {}: {passed} passed, {failed} failed",
                self.file,
                plural(self.tests.len(), "test")
            );
            if unresolved > 0 {
                s.push_str(&format!(", {unresolved} unresolved"));
            }
            s
        };
        match &self.inventory {
            Inventory::Offline(why) if unresolved > 0 => {
                summary.push_str(&format!(" (host names not checked: {why})"));
            }
            Inventory::Coordinator(url) => {
                summary.push_str(&format!(" (host names resolved at {url})"));
            }
            _ => {}
        }
        out.push_str(&summary);
        out.push('\n');
        out
    }

    /// The error for a failed check, naming the failed tests.
    pub fn failure_message(&self) -> String {
        let failed = self.failed();
        let which: Vec<String> = failed
            .iter()
            .map(|t| format!("tests[{}]", t.index))
            .collect();
        format!(
            "{}: {} of {} failed: {}",
            self.file,
            failed.len(),
            plural(self.tests.len(), "test"),
            which.join(", ")
        )
    }
}

/// `allowed by rule R` or `denied (no rule allows it)`.
pub fn verdict(allowed: bool, rule: Option<&str>) -> String {
    match (allowed, rule) {
        (true, Some(r)) => format!("allowed by rule {r}"),
        (true, None) => "allowed".into(),
        (false, _) => "denied (no rule allows it: default deny)".into(),
    }
}

/// `1 rule`, `2 rules`.
pub fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshd_policy::{run_tests, NoInventory};

    const FILE: &str = "\
rules:
  - name: app1-to-db1
    from: { app: app1 }
    to:   { app: db1, env: prod }
    ports: [tcp/1521]
tests:
  - { from: { app: app1 }, to: { app: db1, env: prod }, port: tcp/1521, expect: allow }
  - { from: { app: web }, to: { app: db1 }, port: tcp/1521, expect: allow }
  - { from: app1-host-1, to: db1-host-1, port: tcp/1521, expect: allow }
";

    fn src(text: &str) -> Source {
        Source {
            name: "p.yaml".into(),
            text: text.into(),
        }
    }

    #[test]
    fn parse_errors_are_file_line_column() {
        let e = parse(&src(
            "rules:\n  - name: a\n    from: {}\n    to: {}\n    ports: [tcp/99999]\n",
        ))
        .unwrap_err();
        assert!(e.starts_with("p.yaml:5:13: rules[0].ports[0]"), "{e}");
        assert!(e.contains("bad port"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        assert!(parse(&src("")).unwrap().rules.is_empty());
    }

    #[test]
    fn offline_report() {
        let p = parse(&src(FILE)).unwrap();
        assert_eq!(test_hosts(&p), ["app1-host-1", "db1-host-1"]);
        let r = CheckReport::new(
            "p.yaml",
            p.rules.len(),
            Inventory::Offline("no coordinator".into()),
            run_tests(&p, &NoInventory, 0),
        );
        assert!(!r.ok);
        let out = r.render();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4, "{out}");
        assert_eq!(
            lines[0],
            "ok          tests[0] {app: app1} -> {app: db1, env: prod} tcp/1521 expect allow: \
             allowed by rule app1-to-db1"
        );
        assert_eq!(
            lines[1],
            "FAILED      tests[1] {app: web} -> {app: db1} tcp/1521 expect allow: \
             denied (no rule allows it: default deny), expected allow"
        );
        assert!(
            lines[2].starts_with("UNRESOLVED  tests[2] app1-host-1 -> db1-host-1"),
            "{out}"
        );
        assert_eq!(
            lines[3],
            "p.yaml: 1 rule, 3 tests: 1 passed, 1 failed, 1 unresolved \
             (host names not checked: no coordinator)"
        );
        assert_eq!(r.failure_message(), "p.yaml: 1 of 3 tests failed: tests[1]");
    }

    #[test]
    fn unresolved_fails_only_with_an_inventory() {
        let p = parse(&src(FILE)).unwrap();
        let mut tests = run_tests(&p, &NoInventory, 0);
        tests.remove(1);
        let r = CheckReport::new("p.yaml", 1, Inventory::Offline("x".into()), tests.clone());
        assert!(r.ok, "{}", r.render());
        let r = CheckReport::new(
            "p.yaml",
            1,
            Inventory::Coordinator("http://c".into()),
            tests,
        );
        assert!(!r.ok);
        assert!(
            r.render().contains("FAILED      tests[2] app1-host-1"),
            "{}",
            r.render()
        );
        assert!(r
            .render()
            .contains("no host named app1-host-1 in the coordinator's inventory"));
        assert!(r.render().ends_with("(host names resolved at http://c)\n"));
        let r = CheckReport::new("p.yaml", 2, Inventory::NotNeeded, Vec::new());
        assert_eq!(r.render(), "p.yaml: 2 rules, no tests\n");
        assert!(r.ok);
    }
}
