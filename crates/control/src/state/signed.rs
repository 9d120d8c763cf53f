//! Admin-signed statements on the coordinator (issue 17, signed policy): the admin key-set
//! chain, the signed statement of each policy version and of each host's name and labels.
//! The coordinator verifies every signed change before making it, keeps the statement next to
//! it (for the store: [`Dirty::signed`](super::Dirty)) and forwards the statements to agents
//! in a `Trust` frame before each map or delta ([`CoordinatorState::trust_for`]); agents check
//! them again ([`crate::signed::TrustStore`]) — the coordinator is not trusted to.
//!
//! With no key set registered, nothing here is used and the mesh runs unsigned. Once one is,
//! [`CoordinatorState::require_unsigned`] refuses the unsigned forms of widening changes.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::{AdminError, CoordinatorState};
use crate::model::{Host, HostId, Labels, UnixTime};
use crate::policy::PolicyRecord;
use crate::proto::CoordinatorMessage;
use crate::signed::{
    check_genesis, check_successor, Hash32, KeySetStatement, Sig, SignError, Signed, SignedPolicy,
    Succession, TrustBundle, MAX_SUCCESSIONS,
};
use meshd_tunnel::PublicKey;

/// One signed statement as the store keeps it (kind, id, JSON body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum SignedRecord {
    /// A key set of the chain (id: its seq).
    KeySet {
        /// The statement.
        signed: Signed,
    },
    /// The statement of one policy version.
    Policy {
        /// The policy version.
        version: u64,
        /// The statement.
        signed: Signed,
    },
    /// The statement of a host's name and labels.
    Host {
        /// The host.
        host: HostId,
        /// The statement.
        signed: Signed,
    },
    /// A runtime learning setting (id: its seq).
    Mode {
        /// The statement.
        signed: Signed,
    },
}

impl SignedRecord {
    /// The store's key: kind and id.
    pub fn key(&self) -> (&'static str, u64) {
        match self {
            SignedRecord::KeySet { signed } => ("key_set", signed.key_set().map_or(0, |k| k.seq)),
            SignedRecord::Policy { version, .. } => ("policy", *version),
            SignedRecord::Host { host, .. } => ("host", host.0),
            SignedRecord::Mode { signed } => ("mode", signed.mode().map_or(0, |m| m.seq)),
        }
    }
}

/// The coordinator's signed statements.
#[derive(Debug, Default)]
pub(super) struct SignedState {
    /// The key-set chain, oldest first (empty: unsigned mesh).
    chain: Vec<Signed>,
    /// Per policy version, its statement.
    policies: BTreeMap<u64, Signed>,
    /// Per host, the statement of its current name and labels.
    hosts: BTreeMap<HostId, Signed>,
    /// The statement of the current runtime learning setting.
    mode: Option<Signed>,
    /// The policy version each agent session was last sent.
    policy_sent: HashMap<HostId, u64>,
    /// The hash of its own host statement each agent session was last sent.
    own_sent: HashMap<HostId, Hash32>,
    /// Not yet persisted.
    pub(super) dirty: Vec<SignedRecord>,
}

/// `GET /v1/admin/keys`: the chain, its fingerprint and the current policy statement.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SignedView {
    /// The key-set chain, oldest first (empty: the mesh runs unsigned).
    pub chain: Vec<Signed>,
    /// Fingerprint (statement hash) of the current key set.
    pub fingerprint: Option<Hash32>,
    /// The current policy version's statement, if signed.
    pub policy: Option<Signed>,
    /// The current policy version (0: none).
    pub policy_version: u64,
    /// The statement of the current runtime learning setting, if signed.
    #[serde(default)]
    pub mode: Option<Signed>,
    /// The current runtime learning setting (what a signed `policy mode` starts from).
    #[serde(default)]
    pub runtime_mode: super::RuntimeMode,
}

impl CoordinatorState {
    /// The current admin key set (`None`: unsigned mesh).
    pub fn admin_keys(&self) -> Option<&KeySetStatement> {
        self.signed.chain.last().and_then(|s| s.key_set().ok())
    }

    /// Fingerprint of the current admin key set (what join tokens carry).
    pub fn admin_fingerprint(&self) -> Option<Hash32> {
        self.signed.chain.last().map(|s| s.statement.hash())
    }

    /// The chain, its fingerprint and the current policy statement.
    pub fn signed_view(&self) -> SignedView {
        let v = self.policy().map_or(0, |p| p.version);
        SignedView {
            chain: self.signed.chain.clone(),
            fingerprint: self.admin_fingerprint(),
            policy: self.signed.policies.get(&v).cloned(),
            policy_version: v,
            mode: self.signed.mode.clone(),
            runtime_mode: self.runtime_mode.clone(),
        }
    }

    /// The signed statement of a host's name and labels.
    pub fn host_statement(&self, id: HostId) -> Option<&Signed> {
        self.signed.hosts.get(&id)
    }

    /// Refuses `what` when admin keys are registered (it must come signed).
    pub fn require_unsigned(&self, what: &'static str) -> Result<(), AdminError> {
        match self.admin_keys() {
            Some(_) => Err(AdminError::SignatureRequired(what)),
            None => Ok(()),
        }
    }

    /// Adds a key set to the chain: the first is taken on trust (the admin token) but must be
    /// signed by its own keys; every later one by a quorum of the current set.
    pub fn add_key_set(&mut self, s: Signed) -> Result<Hash32, AdminError> {
        match self.signed.chain.last() {
            None => check_genesis(&s)?,
            Some(cur) => check_successor(cur, &s)?,
        }
        let fp = s.statement.hash();
        self.signed
            .dirty
            .push(SignedRecord::KeySet { signed: s.clone() });
        self.signed.chain.push(s);
        // Every agent gets the new chain with its next map: send full maps now.
        self.resend_all();
        Ok(fp)
    }

    fn resend_all(&mut self) {
        for s in self.sessions.values_mut() {
            s.sent = None;
        }
    }

    fn check_policy_statement(&self, yaml: &str, s: &Signed) -> Result<(), AdminError> {
        let set = self.admin_keys().ok_or(AdminError::NoAdminKeys)?;
        let st = s.policy()?;
        let cur = self.policy().map_or(0, |p| p.version);
        let prev = self
            .signed
            .policies
            .get(&cur)
            .map_or(Hash32::ZERO, |p| p.statement.hash());
        if st.seq != cur + 1 || st.prev != prev {
            return Err(crate::signed::SignError::NotNext { seq: cur + 1, prev }.into());
        }
        if Hash32::of(yaml.as_bytes()) != st.sha256 {
            return Err(crate::signed::SignError::ContentMismatch.into());
        }
        s.verify(set)?;
        Ok(())
    }

    /// Applies a signed policy version (as [`CoordinatorState::apply_policy`], after checking
    /// the statement: next version, hash of the file, quorum of the admin key set).
    pub fn apply_signed_policy(
        &mut self,
        now: UnixTime,
        yaml: &str,
        s: Signed,
    ) -> Result<(PolicyRecord, Vec<meshd_policy::TestResult>), AdminError> {
        self.check_policy_statement(yaml, &s)?;
        let (rec, tests) = self.apply_policy(now, yaml, "apply (signed)")?;
        self.keep_policy_statement(rec.version, s);
        Ok((rec, tests))
    }

    /// Re-applies version `version` as a new one, with a statement signed for its file.
    pub fn rollback_signed(
        &mut self,
        now: UnixTime,
        version: u64,
        s: Signed,
    ) -> Result<PolicyRecord, AdminError> {
        let yaml = self
            .policies
            .iter()
            .find(|p| p.version == version)
            .map(|p| p.yaml.clone())
            .ok_or(crate::policy::PolicyError::NoSuchVersion(version))?;
        self.check_policy_statement(&yaml, &s)?;
        let rec = self.rollback_policy(now, version)?;
        self.keep_policy_statement(rec.version, s);
        Ok(rec)
    }

    fn keep_policy_statement(&mut self, version: u64, s: Signed) {
        self.signed.dirty.push(SignedRecord::Policy {
            version,
            signed: s.clone(),
        });
        self.signed.policies.insert(version, s);
    }

    /// Sets a host's name and labels to exactly those of a signed host statement (for its key,
    /// newer than the one held, signed by a quorum), and lifts its quarantine if `release`.
    pub fn set_host_signed(
        &mut self,
        r: &str,
        s: Signed,
        release: bool,
    ) -> Result<Host, AdminError> {
        let set = self.admin_keys().ok_or(AdminError::NoAdminKeys)?.clone();
        let id = self.live_id(r)?;
        let st = s.host()?.clone();
        let h = self.host_result(id, r)?;
        if st.key != h.public_key {
            return Err(crate::signed::SignError::WrongHost.into());
        }
        if let Some(held) = self.signed.hosts.get(&id).and_then(|x| x.host().ok()) {
            if held.at_ms >= st.at_ms {
                return Err(crate::signed::SignError::Stale.into());
            }
        }
        super::admin::validate_labels(&st.labels)?;
        s.verify(&set)?;
        if st.name != h.name {
            self.rename(r, &st.name)?;
        }
        let gone: Vec<String> = h
            .labels
            .keys()
            .filter(|k| !st.labels.contains_key(*k))
            .cloned()
            .collect();
        let key = st.key.to_string();
        self.remove_labels(&key, &gone)?;
        self.set_labels(&key, st.labels.clone())?;
        if release {
            self.release(&key)?;
        }
        // A rotation under way keeps its succession: the new statement is for the current
        // key, which signed the hand-over to the pending one.
        let mut s = s;
        s.successions = self
            .signed
            .hosts
            .get(&id)
            .and_then(|held| held.successions.last())
            .filter(|last| Some(last.new_key) == h.pending_key && last.verify(&h.public_key))
            .copied()
            .into_iter()
            .collect();
        // The peers' next deltas carry the statement (a touch re-sends the host's record).
        self.touch(id);
        self.signed.dirty.push(SignedRecord::Host {
            host: id,
            signed: s.clone(),
        });
        self.signed.hosts.insert(id, s);
        self.host_result(id, &key)
    }

    /// Key rotation in a signed mesh: checks the host's succession signature from its current
    /// key to `new_key` and appends it to the host's statement (persisted with the batch; peers
    /// get it with the host's next record). Nothing to do in an unsigned mesh, for a host no
    /// admin signed (its peers give it nothing anyway), or one whose chain no longer reaches
    /// its key (its peers refuse it already). Err: why the rotation must not go ahead.
    pub(super) fn attach_succession(
        &mut self,
        id: HostId,
        new_key: PublicKey,
        sig: Option<Sig>,
    ) -> Result<(), String> {
        let Some(current) = self
            .hosts
            .get(&id)
            .filter(|h| !h.removed)
            .map(|h| h.public_key)
        else {
            return Ok(());
        };
        if self.signed.chain.is_empty() {
            return Ok(());
        }
        let Some(st) = self.signed.hosts.get_mut(&id) else {
            return Ok(());
        };
        let (keys, broken) = st.host_keys();
        if broken.is_some() || keys.last() != Some(&current) {
            return Ok(());
        }
        if st.successions.len() >= MAX_SUCCESSIONS {
            return Err(SignError::TooManySuccessions.to_string());
        }
        let Some(sig) = sig else {
            return Err(
                "the host sent no key succession signature (an agent older than \
                        signed key rotation?): its peers would refuse the new key"
                    .to_string(),
            );
        };
        let succession = Succession { new_key, sig };
        if !succession.verify(&current) {
            return Err(SignError::Succession(new_key).to_string());
        }
        st.successions.push(succession);
        let signed = st.clone();
        self.signed
            .dirty
            .push(SignedRecord::Host { host: id, signed });
        Ok(())
    }

    /// A rotation to `key` ended without completing: its succession leaves the host's
    /// statement.
    pub(super) fn detach_succession(&mut self, id: HostId, key: &PublicKey) {
        let Some(st) = self.signed.hosts.get_mut(&id) else {
            return;
        };
        if st.successions.last().map(|s| &s.new_key) != Some(key) {
            return;
        }
        st.successions.pop();
        let signed = st.clone();
        self.signed
            .dirty
            .push(SignedRecord::Host { host: id, signed });
    }

    /// Whether host `id`'s statement holds as many successions as it may: it must be signed
    /// again before its key rotates.
    pub(super) fn successions_full(&self, id: HostId) -> bool {
        !self.signed.chain.is_empty()
            && self
                .signed
                .hosts
                .get(&id)
                .is_some_and(|s| s.successions.len() >= MAX_SUCCESSIONS)
    }

    /// Sets the runtime learning setting to exactly a signed mode statement's (the next one
    /// after the current, signed by a quorum): what `meshctl --admin-key F policy mode …`
    /// sends in a signed mesh. Recompiles like an unsigned change.
    pub fn set_mode_signed(
        &mut self,
        now: UnixTime,
        s: Signed,
    ) -> Result<crate::api::PolicyModeView, AdminError> {
        let set = self.admin_keys().ok_or(AdminError::NoAdminKeys)?.clone();
        let st = s.mode()?.clone();
        let (seq, prev) = match &self.signed.mode {
            Some(cur) => (
                cur.mode().map_or(0, |m| m.seq).saturating_add(1),
                cur.statement.hash(),
            ),
            None => (1, Hash32::ZERO),
        };
        if st.seq != seq || st.prev != prev {
            return Err(SignError::NotNext { seq, prev }.into());
        }
        if st.groups.len() > super::MAX_LEARN_GROUPS {
            return Err(AdminError::InvalidGroup(format!(
                "at most {} learning groups",
                super::MAX_LEARN_GROUPS
            )));
        }
        for (i, g) in st.groups.iter().enumerate() {
            if g.is_empty() || st.groups[..i].contains(g) {
                return Err(AdminError::InvalidGroup(
                    "a learning group is empty or given twice".into(),
                ));
            }
            super::admin::validate_labels(g)?;
        }
        s.verify(&set)?;
        let next = super::RuntimeMode {
            all: st.all,
            groups: st.groups.clone(),
            changed_at: now,
        };
        let changed = next.all != self.runtime_mode.all || next.groups != self.runtime_mode.groups;
        self.runtime_mode = next;
        self.dirty_mode = true;
        self.recompile(now);
        // Every agent gets the statement with its next map or delta; those whose grants did
        // not change need it only once they do.
        self.signed
            .dirty
            .push(SignedRecord::Mode { signed: s.clone() });
        self.signed.mode = Some(s);
        Ok(crate::api::PolicyModeView {
            changed,
            ..self.mode_view()
        })
    }

    /// Loads stored statements (after [`CoordinatorState::restore`] and the policies).
    pub fn restore_signed(&mut self, records: Vec<SignedRecord>) {
        let mut chain: Vec<Signed> = Vec::new();
        for r in records {
            match r {
                SignedRecord::KeySet { signed } => chain.push(signed),
                SignedRecord::Policy { version, signed } => {
                    self.signed.policies.insert(version, signed);
                }
                SignedRecord::Host { host, signed } => {
                    self.signed.hosts.insert(host, signed);
                }
                SignedRecord::Mode { signed } => {
                    let seq = |s: &Signed| s.mode().map_or(0, |m| m.seq);
                    if self
                        .signed
                        .mode
                        .as_ref()
                        .is_none_or(|m| seq(m) < seq(&signed))
                    {
                        self.signed.mode = Some(signed);
                    }
                }
            }
        }
        chain.sort_by_key(|s| s.key_set().map_or(0, |k| k.seq));
        self.signed.chain = chain;
    }

    /// Whether host `id`'s agent lacks the current signed policy or its own current host
    /// statement (then it gets a delta even when its map did not change).
    pub(super) fn trust_pending(&self, id: HostId) -> bool {
        if self.signed.chain.is_empty() {
            return false;
        }
        let v = self.policy().map_or(0, |p| p.version);
        let policy =
            self.signed.policies.contains_key(&v) && self.signed.policy_sent.get(&id) != Some(&v);
        let own = self.signed.hosts.get(&id).map(|s| s.statement.hash());
        policy || (own.is_some() && self.signed.own_sent.get(&id) != own.as_ref())
    }

    /// The `Trust` frame to send before `message` to host `id` (`None` in an unsigned mesh or
    /// for anything but a map or delta). Carries the chain, the current policy when the
    /// session was not sent it yet (or the message is a full map), and the host statements
    /// of `id` and of every peer in the message.
    pub(super) fn trust_for(
        &mut self,
        id: HostId,
        message: &CoordinatorMessage,
    ) -> Option<CoordinatorMessage> {
        if self.signed.chain.is_empty() {
            return None;
        }
        let (keys, full): (Vec<PublicKey>, bool) = match message {
            CoordinatorMessage::FullMap { map } => {
                (map.peers.iter().map(|p| p.public_key).collect(), true)
            }
            CoordinatorMessage::Delta { delta } => {
                (delta.upserts.iter().map(|p| p.public_key).collect(), false)
            }
            _ => return None,
        };
        let mut hosts: Vec<Signed> = self.signed.hosts.get(&id).cloned().into_iter().collect();
        if let Some(own) = hosts.first() {
            let h = own.statement.hash();
            self.signed.own_sent.insert(id, h);
        }
        for k in &keys {
            if let Some(s) = self.by_key.get(k).and_then(|h| self.signed.hosts.get(h)) {
                hosts.push(s.clone());
            }
        }
        let current = self.policy().map(|p| (p.version, p.yaml.clone()));
        let policy = current.and_then(|(v, yaml)| {
            let s = self.signed.policies.get(&v)?;
            let sent = self.signed.policy_sent.get(&id) == Some(&v);
            (full || !sent).then(|| SignedPolicy {
                yaml,
                signed: s.clone(),
            })
        });
        if let Some(p) = &policy {
            if let Ok(st) = p.signed.policy() {
                self.signed.policy_sent.insert(id, st.seq);
            }
        }
        Some(CoordinatorMessage::Trust {
            bundle: Box::new(TrustBundle {
                key_sets: self.signed.chain.clone(),
                policy,
                hosts,
                mode: self.signed.mode.clone(),
            }),
        })
    }
}

/// A signed batch (`POST /v1/signed/hosts`, a signed CMDB import): checked whole, then
/// applied whole. Kept apart from the single-statement path above.
impl CoordinatorState {
    /// Sets the names and labels of many hosts to exactly those of signed host statements,
    /// all or none. Every statement is checked first, as [`CoordinatorState::set_host_signed`]
    /// checks one (a live host with its key, newer than the statement held, valid name and
    /// labels, a quorum of the admin key set), and the batch as a whole (one statement per
    /// host, no two live hosts left with one name); the first refused one is named in
    /// [`AdminError::SignedBatch`] and nothing is changed. With `policy`, that signed version
    /// is applied after the labels (its tests see the hosts as relabelled); if it is refused
    /// the hosts are put back as they were. The caller commits everything as one batch.
    pub fn set_hosts_signed(
        &mut self,
        now: UnixTime,
        statements: Vec<Signed>,
        policy: Option<(&str, Signed)>,
    ) -> Result<SignedBatchApplied, AdminError> {
        use crate::model::validate_name;
        if statements.is_empty() && policy.is_none() {
            return Err(AdminError::BadBatch(
                "no host statements in the batch".into(),
            ));
        }
        if statements.len() > crate::api::SIGNED_BATCH_MAX {
            return Err(AdminError::BadBatch(format!(
                "{} host statements in one batch (at most {})",
                statements.len(),
                crate::api::SIGNED_BATCH_MAX
            )));
        }
        let set = self.admin_keys().ok_or(AdminError::NoAdminKeys)?.clone();
        let fail = |host: String, why: AdminError| AdminError::SignedBatch {
            host,
            why: Box::new(why),
        };
        let mut ids: Vec<HostId> = Vec::with_capacity(statements.len());
        for (i, s) in statements.iter().enumerate() {
            let st = s
                .host()
                .map_err(|e| fail(format!("#{} of the batch", i + 1), e.into()))?;
            let who = st.name.clone();
            let h = self.host_by_key(&st.key).ok_or_else(|| {
                fail(
                    who.clone(),
                    AdminError::NoSuchHost(format!("with key {}", st.key)),
                )
            })?;
            let id = h.id;
            let who = if h.name == st.name {
                who
            } else {
                format!("{} (to be named {who})", h.name)
            };
            if ids.contains(&id) {
                return Err(fail(
                    who,
                    AdminError::BadBatch("a second statement for this host".into()),
                ));
            }
            if let Some(held) = self.signed.hosts.get(&id).and_then(|x| x.host().ok()) {
                if held.at_ms >= st.at_ms {
                    return Err(fail(who, crate::signed::SignError::Stale.into()));
                }
            }
            validate_name(&st.name).map_err(|e| fail(who.clone(), e.into()))?;
            super::admin::validate_labels(&st.labels).map_err(|e| fail(who.clone(), e))?;
            s.verify(&set).map_err(|e| fail(who.clone(), e.into()))?;
            ids.push(id);
        }
        // Names once the batch is applied: still one live host per name.
        let mut after: HashMap<&str, HostId> = HashMap::new();
        let renamed: BTreeMap<HostId, &str> = ids
            .iter()
            .zip(&statements)
            .filter_map(|(id, s)| Some((*id, s.host().ok()?.name.as_str())))
            .collect();
        for h in self.hosts.values().filter(|h| !h.removed) {
            let name = renamed.get(&h.id).copied().unwrap_or(h.name.as_str());
            if let Some(other) = after.insert(name, h.id) {
                let who = if renamed.contains_key(&h.id) {
                    h.id
                } else {
                    other
                };
                let host = self.hosts.get(&who).map_or(name, |h| h.name.as_str());
                return Err(fail(host.to_string(), AdminError::NameTaken(name.into())));
            }
        }

        // Everything verified: apply (nothing below can fail but the policy).
        let dirty_len = self.signed.dirty.len();
        let mut before: Vec<(HostId, String, Labels, Option<Signed>)> = Vec::new();
        for (s, id) in statements.into_iter().zip(ids.iter().copied()) {
            let Ok(st) = s.host().cloned() else { continue };
            let held = self.signed.hosts.get(&id).cloned();
            let Some(h) = self.hosts.get_mut(&id) else {
                continue;
            };
            before.push((id, h.name.clone(), h.labels.clone(), held));
            let changed = h.name != st.name || h.labels != st.labels;
            h.name = st.name;
            h.labels = st.labels;
            if changed {
                self.policy_host_changed(id);
            }
            // The peers' next deltas carry the statement (a touch re-sends the host's record).
            self.touch(id);
            self.signed.dirty.push(SignedRecord::Host {
                host: id,
                signed: s.clone(),
            });
            self.signed.hosts.insert(id, s);
        }
        let policy = match policy {
            None => None,
            Some((yaml, s)) => match self.apply_signed_policy(now, yaml, s) {
                Ok(r) => Some(r),
                Err(e) => {
                    // Put the hosts and their statements back as they were.
                    self.signed.dirty.truncate(dirty_len);
                    for (id, name, labels, held) in before {
                        if let Some(h) = self.hosts.get_mut(&id) {
                            h.name = name;
                            h.labels = labels;
                        }
                        self.policy_host_changed(id);
                        self.touch(id);
                        match held {
                            Some(s) => self.signed.hosts.insert(id, s),
                            None => self.signed.hosts.remove(&id),
                        };
                    }
                    return Err(e);
                }
            },
        };
        Ok(SignedBatchApplied {
            hosts: ids
                .iter()
                .filter_map(|id| self.hosts.get(id).cloned())
                .collect(),
            policy,
        })
    }
}

/// What [`CoordinatorState::set_hosts_signed`] did.
#[derive(Debug, Clone)]
pub struct SignedBatchApplied {
    /// The hosts as they are now, in the order of the statements.
    pub hosts: Vec<Host>,
    /// The policy version applied with them, and its tests.
    pub policy: Option<(PolicyRecord, Vec<meshd_policy::TestResult>)>,
}
