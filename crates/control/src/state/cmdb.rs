//! CMDB host records: imported labels for hosts by name or underlay IP, enrolled or not yet
//! ([`CoordinatorState::import_cmdb`]), applied to a host when it enrols
//! ([`CoordinatorState::labels_on_enrol`]).
//!
//! Which labels win: an enrolling host starts from its join token's labels and the matching
//! record's labels are merged over them (the record wins a key both set). A generic image
//! token carries the same labels for every host, the CMDB says what this one host is; an
//! import over an enrolled host likewise replaces the keys it names and keeps the others.

use std::collections::BTreeMap;
use std::net::IpAddr;

use meshd_policy::{Change, TestResult};

use super::{AdminError, CoordinatorState, Notice, MAX_LABELS};
use crate::cmdb::{self, CmdbFile, HostRecord, RecordId, RowError};
use crate::model::{Host, HostId, Labels, UnixTime};

/// What an import did (or, refused, nothing).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImportOutcome {
    /// Records created.
    pub created: usize,
    /// Records updated (the same name, or the same address without a name).
    pub updated: usize,
    /// Enrolled hosts whose labels changed, with their labels now.
    pub relabelled: Vec<(String, Labels)>,
    /// The current policy plus the declared flows' rules (`None`: no flows declared).
    pub proposed_policy: Option<String>,
    /// Access changes if the proposed policy replaced the current one (over the hosts as
    /// they are after the import).
    pub changes: Vec<Change>,
    /// The policy version the import applied (with `apply`).
    pub applied_version: Option<u64>,
    /// The proposed policy's tests (with `apply`: all passed).
    pub tests: Vec<TestResult>,
}

/// A host's underlay addresses as the coordinator knows them: the observed one and the
/// reported endpoints' addresses.
fn underlay_ips(h: &Host) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = h.observed_ip.into_iter().collect();
    for e in &h.reported_endpoints {
        if !v.contains(&e.ip()) {
            v.push(e.ip());
        }
    }
    v
}

impl CoordinatorState {
    /// Stored host records, by id.
    pub fn cmdb_records(&self) -> impl Iterator<Item = &HostRecord> {
        self.records.values()
    }

    /// Loads the stored records at start-up.
    pub fn restore_records(&mut self, records: Vec<HostRecord>) {
        for r in records {
            self.next_record = self.next_record.max(r.id.0 + 1);
            self.records.insert(r.id, r);
        }
    }

    /// The live host a row names: by name, or by underlay address (observed or reported).
    /// A row whose name and address name two different hosts is refused.
    fn host_for_row(&self, row: &cmdb::HostRow) -> Result<Option<HostId>, RowError> {
        let live = || self.hosts.values().filter(|h| !h.removed);
        let by_name = row
            .name
            .as_ref()
            .and_then(|n| live().find(|h| &h.name == n))
            .map(|h| h.id);
        let by_ip = row
            .ip
            .and_then(|ip| live().find(|h| underlay_ips(h).contains(&ip)))
            .map(|h| h.id);
        match (by_name, by_ip) {
            (Some(a), Some(b)) if a != b => Err(RowError {
                line: row.line,
                message: format!(
                    "host name {:?} is enrolled host {a} but {} is the address of host {b}",
                    row.name.as_deref().unwrap_or_default(),
                    row.ip.map(|i| i.to_string()).unwrap_or_default(),
                ),
            }),
            (a, b) => Ok(a.or(b)),
        }
    }

    /// The stored record a row updates: the one with its name, else (a row without a name)
    /// the one with its address and no name.
    fn record_for_row(&self, row: &cmdb::HostRow) -> Option<RecordId> {
        self.records
            .values()
            .find(|r| match &row.name {
                Some(n) => r.name.as_ref() == Some(n),
                None => r.name.is_none() && r.ip == row.ip,
            })
            .map(|r| r.id)
    }

    /// Imports a CMDB file as one change: every row is checked first (syntax, bounds,
    /// duplicates, a row naming two different hosts, too many labels after the merge) and any
    /// bad row refuses the whole import ([`AdminError::Import`], every bad row by line).
    /// Records are created or updated; enrolled hosts a row names (by name, or by underlay
    /// address) get its labels merged over theirs. The declared flows make a proposed policy
    /// (the current one plus a rule per flow, [`cmdb::propose_policy`]); with `apply` it is
    /// applied, its tests run over the hosts as relabelled, and a failing test refuses the
    /// whole import: nothing is left changed.
    pub fn import_cmdb(
        &mut self,
        now: UnixTime,
        file: &CmdbFile,
        apply: bool,
    ) -> Result<ImportOutcome, AdminError> {
        let mut errors = cmdb::validate(file);
        let mut targets = Vec::with_capacity(file.hosts.len());
        for row in &file.hosts {
            match self.host_for_row(row) {
                Ok(t) => {
                    if let Some(h) = t.and_then(|id| self.hosts.get(&id)) {
                        let after = h
                            .labels
                            .keys()
                            .chain(row.labels.keys())
                            .collect::<std::collections::BTreeSet<_>>()
                            .len();
                        if after > MAX_LABELS {
                            errors.push(RowError {
                                line: row.line,
                                message: format!(
                                    "host {} would have {after} labels (at most {MAX_LABELS})",
                                    h.name
                                ),
                            });
                        }
                    }
                    targets.push(t);
                }
                Err(e) => {
                    errors.push(e);
                    targets.push(None);
                }
            }
        }
        let current = self.policy().map(|p| p.yaml.clone()).unwrap_or_default();
        let proposed = if file.flows.is_empty() {
            None
        } else {
            match cmdb::propose_policy(&current, &file.flows) {
                Ok(p) => Some(p),
                Err(e) => {
                    errors.push(RowError {
                        line: 0,
                        message: e.to_string(),
                    });
                    None
                }
            }
        };
        if !errors.is_empty() {
            errors.sort_by_key(|e| e.line);
            return Err(AdminError::Import(errors));
        }
        if let Some(p) = &proposed {
            super::check_policy_size(p)?;
        }

        // Kept to undo the import if the proposed policy is refused.
        let records_before = self.records.clone();
        let next_record_before = self.next_record;
        let mut labels_before: BTreeMap<HostId, Labels> = BTreeMap::new();
        let mut out = ImportOutcome {
            created: 0,
            updated: 0,
            relabelled: Vec::new(),
            proposed_policy: proposed.clone(),
            changes: Vec::new(),
            applied_version: None,
            tests: Vec::new(),
        };
        for (row, target) in file.hosts.iter().zip(&targets) {
            let id = match self.record_for_row(row) {
                Some(id) => {
                    out.updated += 1;
                    id
                }
                None => {
                    out.created += 1;
                    let id = RecordId(self.next_record);
                    self.next_record += 1;
                    id
                }
            };
            let host = target.or_else(|| self.records.get(&id).and_then(|r| r.host));
            self.records.insert(
                id,
                HostRecord {
                    id,
                    name: row.name.clone(),
                    ip: row.ip,
                    labels: row.labels.clone(),
                    imported_at: now,
                    host,
                },
            );
            self.dirty_records.insert(id);
            if let Some(hid) = *target {
                if let Some(h) = self.hosts.get_mut(&hid) {
                    let before = h.labels.clone();
                    h.labels.extend(row.labels.clone());
                    if h.labels != before {
                        labels_before.entry(hid).or_insert(before);
                        self.touch(hid);
                        self.policy_host_changed(hid);
                    }
                }
            }
        }
        for id in labels_before.keys() {
            if let Some(h) = self.hosts.get(id) {
                out.relabelled.push((h.name.clone(), h.labels.clone()));
            }
        }
        if let Some(p) = &proposed {
            let res = self.diff_policy(now, p).and_then(|changes| {
                if apply {
                    let (rec, tests) = self.apply_policy(now, p, "cmdb import")?;
                    Ok((changes, Some(rec.version), tests))
                } else {
                    Ok((changes, None, Vec::new()))
                }
            });
            match res {
                Ok((changes, version, tests)) => {
                    out.changes = changes;
                    out.applied_version = version;
                    out.tests = tests;
                }
                Err(e) => {
                    // Undo: the records as they were, the hosts' labels as they were.
                    self.records = records_before;
                    self.next_record = next_record_before;
                    self.dirty_records
                        .retain(|id| self.records.contains_key(id));
                    for (hid, labels) in labels_before {
                        if let Some(h) = self.hosts.get_mut(&hid) {
                            h.labels = labels;
                            self.touch(hid);
                            self.policy_host_changed(hid);
                        }
                    }
                    return Err(e.into());
                }
            }
        }
        Ok(out)
    }

    /// The labels an enrolling host gets: its token's, with the labels of the record that
    /// matches its requested name (first) or one of its underlay addresses merged over them
    /// (the record wins; see the module docs). A record already applied to another live host
    /// is not used again. Records the match and queues a [`Notice::LabelsFromCmdb`].
    pub(super) fn labels_on_enrol(
        &mut self,
        id: HostId,
        requested: &str,
        ips: &[IpAddr],
        token_labels: Labels,
    ) -> Labels {
        let free = |r: &HostRecord| {
            r.host
                .is_none_or(|h| self.hosts.get(&h).is_none_or(|h| h.removed))
        };
        let found = self
            .records
            .values()
            .find(|r| free(r) && r.name.as_deref() == Some(requested))
            .or_else(|| {
                self.records
                    .values()
                    .find(|r| free(r) && r.ip.is_some_and(|ip| ips.contains(&ip)))
            })
            .map(|r| r.id);
        let Some(rid) = found else {
            return token_labels;
        };
        let Some(r) = self.records.get_mut(&rid) else {
            return token_labels;
        };
        let mut labels = token_labels;
        labels.extend(r.labels.clone());
        if labels.len() > MAX_LABELS {
            labels = r.labels.clone();
        }
        r.host = Some(id);
        self.dirty_records.insert(rid);
        self.notices.push(Notice::LabelsFromCmdb {
            id,
            record: r.key(),
            labels: labels.clone(),
        });
        labels
    }
}
