//! The label policy: apply, roll back, diff, check and explain, the compiled policy kept up to
//! date with host changes, and rule expiry.

use std::collections::BTreeMap;

use meshd_policy::{Change, Explanation, PeerGrants, Policy, Probe, TestResult};

use super::{AdminError, CoordinatorState};
use crate::model::{HostId, UnixTime};
use crate::policy::{host_ref, is_live, PolicyError, PolicyRecord};

impl CoordinatorState {
    /// Brings the compiled policy up to date with host `id` (added, changed, removed,
    /// quarantined or released) and marks the affected agents' maps for recomputation.
    pub(super) fn policy_host_changed(&mut self, id: HostId) {
        let Some(h) = self.hosts.get(&id) else {
            return;
        };
        let affected = if is_live(h) {
            self.compiled.update_host(&host_ref(h))
        } else {
            self.compiled.remove_host(id.0)
        };
        for a in affected {
            self.recheck_pairs.entry(HostId(a)).or_default().insert(id);
        }
        self.recheck.insert(id);
        self.membership_dirty = true;
    }

    /// Compiles the current policy (with the runtime learning setting) against the live hosts;
    /// every map is recomputed.
    pub(super) fn recompile(&mut self, now: UnixTime) {
        let hosts: Vec<_> = self
            .hosts
            .values()
            .filter(|h| is_live(h))
            .map(host_ref)
            .collect();
        let learning = self.runtime_mode.learning();
        self.compiled = meshd_policy::compile_with(&self.policy, &learning, &hosts, now);
        self.recheck_all = true;
        self.membership_dirty = true;
    }

    /// Loads the stored policy versions (oldest first; the last is current) at start-up.
    pub fn restore_policies(
        &mut self,
        now: UnixTime,
        mut versions: Vec<PolicyRecord>,
    ) -> Result<(), PolicyError> {
        versions.sort_by_key(|p| p.version);
        self.policy = match versions.last() {
            Some(p) => Policy::parse(&p.yaml)?,
            None => Policy::default(),
        };
        self.policies = versions;
        self.recompile(now);
        Ok(())
    }

    /// Rules expiring: recompile at [`CoordinatorState::policy_timeout`] so expired peers leave
    /// the maps (agents already stopped using the grants on their own).
    pub fn handle_policy_timeout(&mut self, now: UnixTime) {
        if self.policy_timeout().is_some_and(|t| t <= now) {
            self.recompile(now);
        }
    }

    /// When [`CoordinatorState::handle_policy_timeout`] has work to do.
    pub fn policy_timeout(&self) -> Option<UnixTime> {
        self.compiled.next_expiry(self.compiled.compiled_at())
    }

    /// The live hosts as the policy sees them (the inventory for tests, diff and explain).
    pub fn inventory(&self) -> Vec<meshd_policy::HostRef> {
        self.hosts
            .values()
            .filter(|h| !h.removed)
            .map(host_ref)
            .collect()
    }

    /// The current policy version, if any was applied.
    pub fn policy(&self) -> Option<&PolicyRecord> {
        self.policies.last()
    }

    /// Every applied version, oldest first.
    pub fn policy_history(&self) -> &[PolicyRecord] {
        &self.policies
    }

    /// Parses `yaml` and runs its tests against the inventory (host names resolved there).
    pub fn check_policy(&self, now: UnixTime, yaml: &str) -> Result<Vec<TestResult>, PolicyError> {
        let p = Policy::parse(yaml)?;
        Ok(meshd_policy::run_tests(&p, &self.inventory(), now))
    }

    /// Applies a new policy version: refused if it does not parse or any of its tests fails
    /// (a test naming a host that is not enrolled fails). Every map is recomputed.
    pub fn apply_policy(
        &mut self,
        now: UnixTime,
        yaml: &str,
        comment: &str,
    ) -> Result<(PolicyRecord, Vec<TestResult>), PolicyError> {
        let p = Policy::parse(yaml)?;
        let results = meshd_policy::run_tests(&p, &self.inventory(), now);
        if results.iter().any(|t| !t.passed()) {
            return Err(PolicyError::TestsFailed(results));
        }
        let rec = self.install(now, p, yaml, comment);
        Ok((rec, results))
    }

    fn install(&mut self, now: UnixTime, p: Policy, yaml: &str, comment: &str) -> PolicyRecord {
        let rec = PolicyRecord {
            version: self.policies.last().map_or(1, |p| p.version + 1),
            yaml: yaml.to_string(),
            applied_at: now,
            comment: comment.to_string(),
        };
        self.policy = p;
        self.policies.push(rec.clone());
        self.dirty_policy = Some(rec.clone());
        self.recompile(now);
        rec
    }

    /// Re-applies an earlier version as a new version (its tests are not re-run: it was
    /// accepted before, and a rollback must work when the inventory has moved on).
    pub fn rollback_policy(
        &mut self,
        now: UnixTime,
        version: u64,
    ) -> Result<PolicyRecord, PolicyError> {
        let old = self
            .policies
            .iter()
            .find(|p| p.version == version)
            .cloned()
            .ok_or(PolicyError::NoSuchVersion(version))?;
        let p = Policy::parse(&old.yaml)?;
        Ok(self.install(now, p, &old.yaml, &format!("rollback to {version}")))
    }

    /// Which host pairs and ports gain or lose access if `yaml` replaced the current policy.
    pub fn diff_policy(&self, now: UnixTime, yaml: &str) -> Result<Vec<Change>, PolicyError> {
        let new = Policy::parse(yaml)?;
        let hosts: Vec<_> = self
            .hosts
            .values()
            .filter(|h| is_live(h))
            .map(host_ref)
            .collect();
        Ok(meshd_policy::diff(&self.policy, &new, &hosts, now))
    }

    /// Whether `from` may open a connection to `to` on `port` (`tcp/1521`) now, and by which
    /// rule; when denied, whether it passes as would-deny (either end learns). A quarantined
    /// host is denied everything.
    pub fn explain(
        &self,
        now: UnixTime,
        from: &str,
        to: &str,
        port: &str,
    ) -> Result<Explanation, AdminError> {
        let probe: Probe = port.parse()?;
        let (f, t) = (self.find_host(from)?.id, self.find_host(to)?.id);
        Ok(self.compiled.explain(f.0, t.0, probe, now))
    }

    /// The grants `id` holds towards each peer (what its map carries).
    pub fn grants_for(&self, id: HostId) -> BTreeMap<u64, meshd_policy::PeerGrants> {
        self.compiled.grants_for(id.0)
    }

    /// The peers `id` should have, by id, with their grants: the compiled policy's (none when
    /// the host is removed or quarantined: it is not in the compilation). One pass over the
    /// rules plus the granted pairs.
    pub(super) fn peer_grants(&self, id: HostId) -> BTreeMap<u64, PeerGrants> {
        self.compiled.grants_for(id.0)
    }
}
