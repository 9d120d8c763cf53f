//! `meshctl import FILE [--apply]`: a CMDB export (CSV or JSON, see `meshd_control::cmdb`)
//! parsed here — every bad row printed as `FILE:LINE: message`, and nothing sent if any is
//! bad — then sent as one `POST /v1/import`: host records and labels in one transaction, and
//! the declared flows' proposed policy shown as `policy diff` shows changes (applied with
//! `--apply`, whose tests must pass or nothing is imported).

use std::io::Read as _;
use std::path::Path;

use anyhow::Context as _;
use meshd_control::api::ImportRequest;
use meshd_control::cmdb::{self, RowError};
use meshd_control::state::ImportOutcome;

use super::{note, out, output, print_json, ApiFailure, Ctx, Output, Reported};

/// Reads FILE (`-`: standard input): its name for messages and its text.
fn read(path: &Path) -> anyhow::Result<(String, String)> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the import from standard input")?;
        return Ok(("<stdin>".into(), text));
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read import file {}", path.display()))?;
    Ok((path.display().to_string(), text))
}

/// `FILE:LINE: message` (`FILE: message` for the file as a whole).
fn located(file: &str, e: &RowError) -> String {
    if e.line == 0 {
        format!("{file}: {}", e.message)
    } else {
        format!("{file}:{}: {}", e.line, e.message)
    }
}

/// The report for people.
fn render(file: &str, o: &ImportOutcome, apply: bool) -> String {
    let mut s = format!(
        "imported {file}: {} host records created, {} updated\n",
        o.created, o.updated
    );
    for (host, labels) in &o.relabelled {
        s.push_str(&format!(
            "  host {host} relabelled: {}\n",
            output::labels(labels)
        ));
    }
    match (&o.proposed_policy, o.applied_version) {
        (None, _) => s.push_str("no declared flows: the policy is unchanged\n"),
        (Some(_), Some(v)) => {
            s.push_str("declared flows applied:\n");
            s.push_str(&output::changes(&o.changes));
            s.push_str(&output::applied("cmdb import", v, o.tests.len()));
        }
        (Some(_), None) => {
            s.push_str("declared flows, as a policy diff against the current policy:\n");
            s.push_str(&output::changes(&o.changes));
            if !apply {
                s.push_str(&format!(
                    "review, then `meshctl import {file} --apply` (or --write-policy FILE and \
                     `meshctl policy apply FILE`)\n"
                ));
            }
        }
    }
    s
}

impl Ctx {
    /// `meshctl import`.
    pub(crate) fn import(
        &self,
        path: &Path,
        apply: bool,
        write_policy: Option<&Path>,
    ) -> anyhow::Result<()> {
        let (name, text) = read(path)?;
        let file = match cmdb::parse(&text) {
            Ok(f) => f,
            Err(errors) => {
                for e in &errors {
                    note(format_args!("{}", located(&name, e)));
                }
                note(format_args!(
                    "meshctl: error: {name}: {} bad rows; nothing was imported",
                    errors.len()
                ));
                return Err(Reported.into());
            }
        };
        let o: ImportOutcome = self
            .client
            .post("/v1/import", &ImportRequest { file, apply })
            .map_err(|e| match e {
                ApiFailure::Server {
                    code,
                    message,
                    failures,
                    ..
                } if code == "import_refused" || code == "policy_tests_failed" => {
                    let mut s = format!("{name} was not imported (nothing changed): {message}");
                    for f in failures {
                        // Rows come back as `LINE: message`.
                        match f.split_once(": ") {
                            Some((l, m)) if l.parse::<u32>().is_ok_and(|l| l > 0) => {
                                s.push_str(&format!("\n  {name}:{l}: {m}"))
                            }
                            _ => s.push_str(&format!("\n  {f}")),
                        }
                    }
                    anyhow::anyhow!(s)
                }
                e => e.into(),
            })?;
        if let (Some(p), Some(yaml)) = (write_policy, &o.proposed_policy) {
            std::fs::write(p, yaml)
                .with_context(|| format!("writing the proposed policy to {}", p.display()))?;
            note(format_args!("proposed policy written to {}", p.display()));
        }
        match self.output {
            Output::Json => print_json(&o),
            Output::Table => out(&render(&name, &o, apply)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_located_like_compiler_errors() {
        let e = cmdb::parse("hostname,ip,labels\na,1.2.3.x,app=web\n").unwrap_err();
        assert_eq!(
            located("hosts.csv", &e[0]),
            "hosts.csv:2: \"1.2.3.x\" is not an IP address"
        );
        assert_eq!(
            located(
                "f",
                &RowError {
                    line: 0,
                    message: "m".into()
                }
            ),
            "f: m"
        );
    }
}
