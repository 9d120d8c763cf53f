//! `meshctl import FILE [--apply]`: a CMDB export (CSV or JSON, see `meshd_control::cmdb`)
//! parsed here — every bad row printed as `FILE:LINE: message`, and nothing sent if any is
//! bad — then sent as one `POST /v1/import`: host records and labels in one transaction, and
//! the declared flows' proposed policy shown as `policy diff` shows changes (applied with
//! `--apply`, whose tests must pass or nothing is imported).

use std::io::Read as _;
use std::path::Path;

use anyhow::Context as _;
use meshd_control::api::{
    HostView, ImportRequest, PolicyCurrent, PolicyText, SignedHostsApplied, SignedPolicyRequest,
};
use meshd_control::cmdb::{self, CmdbFile, PlanHost, RowError};
use meshd_control::signed::{HostStatement, Statement};
use meshd_control::state::ImportOutcome;

use super::{admin, note, out, output, prepared, print_json, ApiFailure, Ctx, Output, Reported};

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

/// The report of a signed batch, for people.
pub(crate) fn render_signed(what: &str, b: &SignedHostsApplied) -> String {
    let mut s = format!("{what}: {} host(s) signed and relabelled\n", b.hosts.len());
    for h in &b.hosts {
        s.push_str(&format!(
            "  host {} relabelled: {}\n",
            h.name,
            output::labels(&h.labels)
        ));
    }
    if let Some(p) = &b.policy {
        s.push_str(&output::applied(
            "declared flows applied (signed)",
            p.version,
            p.tests.len(),
        ));
    }
    s
}

/// A host's underlay addresses as `GET /v1/hosts` shows them.
fn plan_host(h: &HostView) -> PlanHost {
    let mut ips: Vec<std::net::IpAddr> = h.observed_ip.into_iter().collect();
    for e in &h.endpoints {
        if !ips.contains(&e.ip()) {
            ips.push(e.ip());
        }
    }
    PlanHost {
        id: h.id,
        name: h.name.clone(),
        ips,
        labels: h.labels.clone(),
    }
}

impl Ctx {
    /// `meshctl import` in a signed mesh: the relabelling is computed here (as the
    /// coordinator would, [`cmdb::relabel_plan`]), every changed host's exact new labels are
    /// signed and sent as one batch (`POST /v1/signed/hosts`: all or none), with `--apply`
    /// together with the declared flows' policy, signed as the next version. Rows that match
    /// no enrolled host are not recorded (their labels would be unsigned).
    fn import_signed(
        &self,
        name: &str,
        file: &CmdbFile,
        apply: bool,
        write_policy: Option<&Path>,
        view: meshd_control::state::SignedView,
    ) -> anyhow::Result<()> {
        let hosts: Vec<HostView> = self.client.get("/v1/hosts")?;
        let plan_hosts: Vec<PlanHost> = hosts.iter().map(plan_host).collect();
        let plan = match cmdb::relabel_plan(file, &plan_hosts) {
            Ok(p) => p,
            Err(errors) => {
                for e in &errors {
                    note(format_args!("{}", located(name, e)));
                }
                note(format_args!(
                    "meshctl: error: {name}: {} bad rows; nothing was imported",
                    errors.len()
                ));
                return Err(Reported.into());
            }
        };
        let at_ms = meshd_time::unix_millis();
        let mut statements = Vec::with_capacity(plan.hosts.len());
        for r in &plan.hosts {
            let Some(h) = hosts.iter().find(|h| h.id == r.id) else {
                continue;
            };
            let st = Statement::Host(HostStatement {
                key: h.public_key,
                name: r.name.clone(),
                labels: r.after.clone(),
                at_ms,
            });
            statements.push(prepared::sign(st, &self.admin_keys));
        }
        let proposed = if file.flows.is_empty() {
            None
        } else {
            let cur: PolicyCurrent = self.client.get("/v1/policy")?;
            let current = cur.policy.map(|p| p.yaml).unwrap_or_default();
            Some(
                cmdb::propose_policy(&current, &file.flows)
                    .map_err(|e| anyhow::anyhow!("{name}: the declared flows: {e}"))?,
            )
        };
        if let (Some(p), Some(yaml)) = (write_policy, &proposed) {
            std::fs::write(p, yaml)
                .with_context(|| format!("writing the proposed policy to {}", p.display()))?;
            note(format_args!("proposed policy written to {}", p.display()));
        }
        if !plan.unmatched.is_empty() {
            note(format_args!(
                "{name}: {} row(s) match no enrolled host and are not recorded in a signed mesh \
                 (sign their labels with `meshctl host label` once they enrol)",
                plan.unmatched.len()
            ));
        }
        let policy = match (&proposed, apply) {
            (Some(yaml), true) => Some(SignedPolicyRequest {
                signed: admin::sign_policy(&view, &self.admin_keys, yaml),
                yaml: yaml.clone(),
            }),
            _ => None,
        };
        if statements.is_empty() && policy.is_none() {
            out(&format!(
                "{name}: no enrolled host's labels change; nothing to sign\n"
            ))?;
        } else {
            let request = prepared::Request::Hosts {
                source: name.to_string(),
                statements,
                policy,
            };
            if self.prepare.is_some() {
                return self.write_prepared(prepared::Prepared::new(
                    self.client.base(),
                    view.chain,
                    request,
                ));
            }
            let r = admin::submit(&self.client, &request).map_err(|e| {
                match e.downcast::<ApiFailure>() {
                    Ok(ApiFailure::Server {
                        message, failures, ..
                    }) => {
                        let mut s = format!("{name} was not imported (nothing changed): {message}");
                        for f in failures {
                            s.push_str(&format!("\n  {f}"));
                        }
                        anyhow::anyhow!(s)
                    }
                    Ok(f) => f.into(),
                    Err(e) => e,
                }
            })?;
            let admin::Submitted::Hosts(b) = r else {
                anyhow::bail!("unexpected reply to a signed import");
            };
            match self.output {
                Output::Json => print_json(&b)?,
                Output::Table => out(&render_signed(&format!("signed import of {name}"), &b))?,
            }
        }
        if let (Some(yaml), false) = (proposed, apply) {
            let changes: Vec<meshd_policy::Change> =
                self.client.post("/v1/policy/diff", &PolicyText { yaml })?;
            if self.output == Output::Table {
                let mut s =
                    "declared flows, as a policy diff against the current policy:\n".to_string();
                s.push_str(&output::changes(&changes));
                s.push_str(&format!(
                    "review, then `meshctl import {name} --apply --admin-key FILE` (or \
                     --write-policy FILE and `meshctl policy apply FILE`)\n"
                ));
                out(&s)?;
            }
        }
        Ok(())
    }

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
        if !self.admin_keys.is_empty() || self.prepare.is_some() {
            let (view, fp) = admin::verified_chain(&self.client, &self.admin_keys)?;
            if fp.is_some() {
                return self.import_signed(&name, &file, apply, write_policy, view);
            }
            if self.prepare.is_some() {
                anyhow::bail!(
                    "the mesh runs unsigned (no admin key registered): there is nothing to prepare"
                );
            }
        }
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
