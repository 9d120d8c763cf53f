//! Admin operations: join tokens, labels, rename, remove, quarantine, revoke, and the bounds
//! every admin input is checked against before it can reach the store.

use std::collections::BTreeSet;

use super::{CoordinatorState, Kick};
use crate::model::{
    validate_label, validate_name, Host, LabelError, Labels, NameError, Token, TokenId, UnixTime,
};
use crate::policy::PolicyError;
use crate::proto::ErrorCode;

/// Parameters of a new join token.
#[derive(Debug, Clone, Default)]
pub struct TokenSpec {
    /// Labels for hosts enrolling with it.
    pub labels: Labels,
    /// Lifetime in seconds (`None`: no expiry).
    pub ttl_secs: Option<u64>,
    /// Number of enrolments (`None`: unlimited).
    pub uses: Option<u32>,
}

/// Why an admin operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// No host matches.
    #[error("no host {0:?} (give a name, id or public key; see `meshctl hosts list`)")]
    NoSuchHost(String),
    /// No token with this id.
    #[error("no token with id {0}")]
    NoSuchToken(TokenId),
    /// Name used by another host.
    #[error("host name {0:?} is already taken")]
    NameTaken(String),
    /// Invalid name.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// Invalid label.
    #[error(transparent)]
    InvalidLabel(#[from] LabelError),
    /// The host was removed.
    #[error("host {0:?} was removed")]
    HostRemoved(String),
    /// A policy operation failed.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// Not a single protocol and port (`tcp/N`, `udp/N`, `icmp`).
    #[error(transparent)]
    Port(#[from] meshd_policy::PortSpecError),
    /// A token lifetime beyond [`MAX_TOKEN_TTL_SECS`].
    #[error("token lifetime {0} s is out of range: give at most {MAX_TOKEN_TTL_SECS} s (10 years), or none for no expiry")]
    InvalidTtl(u64),
    /// A token use count beyond [`MAX_TOKEN_USES`].
    #[error(
        "token use count {0} is out of range: give at most {MAX_TOKEN_USES}, or none for unlimited"
    )]
    InvalidUses(u32),
    /// More than [`MAX_LABELS`] labels on a host or token.
    #[error("{0} labels is too many (at most {MAX_LABELS})")]
    TooManyLabels(usize),
    /// A policy file over [`MAX_POLICY_BYTES`].
    #[error("the policy file is {0} bytes; at most {MAX_POLICY_BYTES} are accepted")]
    PolicyTooLarge(usize),
    /// A CMDB import with bad rows (every one, by line); nothing was imported.
    #[error("{} bad rows; nothing imported", .0.len())]
    Import(Vec<crate::cmdb::RowError>),
    /// The change could not be saved, so it was not made (the state is as before the request).
    #[error("not saved, nothing changed: {0}")]
    NotSaved(String),
    /// Another coordinator replica changed the state at the same moment; nothing of this
    /// change was saved and it may simply be tried again (the admin API does so itself).
    #[error("not saved, nothing changed: {0}")]
    Conflict(String),
    /// A policy mode change the runtime setting cannot make (learning declared by the policy
    /// file, or a group exempted from whole-mesh learning); the message says what to do.
    #[error("{0}")]
    ModeRefused(String),
    /// A bad `--group` (empty, or too many groups).
    #[error("{0}")]
    InvalidGroup(String),
    /// A key rotation cannot start (host offline, one already under way).
    #[error("{0}")]
    KeyRotation(String),
    /// An admin key set is registered, so this change must be signed (signed policy).
    #[error("{0} must be signed by an admin key once admin keys are registered (pass --admin-key FILE to meshctl)")]
    SignatureRequired(&'static str),
    /// A signed change whose statement or signatures do not verify.
    #[error("signed change refused: {0}")]
    BadSignature(#[from] crate::signed::SignError),
    /// One statement of a signed batch (`POST /v1/signed/hosts`) was refused: nothing of the
    /// batch was applied.
    #[error("host {host}: {why} (nothing of the batch was applied)")]
    SignedBatch {
        /// The host the refused statement names (its name, else its key).
        host: String,
        /// Why it was refused.
        why: Box<AdminError>,
    },
    /// An empty or oversized signed batch.
    #[error("{0}")]
    BadBatch(String),
    /// A signed change, but no admin key set is registered yet (`meshctl admin add-key`).
    #[error("no admin key is registered (register the first with `meshctl admin add-key`)")]
    NoAdminKeys,
    /// A bad admin token name.
    #[error(transparent)]
    InvalidAdminTokenName(#[from] super::AdminTokenNameError),
    /// An admin token with this name exists (or existed: names are not reused).
    #[error(
        "admin token name {0:?} is already taken (names are not reused, also after a revocation)"
    )]
    AdminTokenNameTaken(String),
    /// No admin token with this name.
    #[error("no admin token named {0:?} (see `meshctl admin token list`)")]
    NoSuchAdminToken(String),
    /// Revoking it would leave no valid admin token.
    #[error("admin token {0:?} is the last valid admin token: create another (`meshctl admin token create NAME`) before revoking it")]
    LastAdminToken(String),
}

/// Longest token lifetime: 10 years (longer ones overflowed the store's 64-bit signed time).
pub const MAX_TOKEN_TTL_SECS: u64 = 10 * 365 * 24 * 3600;

/// Most enrolments one token may allow.
pub const MAX_TOKEN_USES: u32 = 1_000_000;

/// Most labels on one host or token.
pub const MAX_LABELS: usize = 64;

/// Largest policy file accepted.
pub const MAX_POLICY_BYTES: usize = 1024 * 1024;

/// Checks a label set's size and each pair.
pub(super) fn validate_labels(labels: &Labels) -> Result<(), AdminError> {
    if labels.len() > MAX_LABELS {
        return Err(AdminError::TooManyLabels(labels.len()));
    }
    for (k, v) in labels {
        validate_label(k, v)?;
    }
    Ok(())
}

/// Refuses a policy file over [`MAX_POLICY_BYTES`] (before it is parsed or stored).
pub fn check_policy_size(yaml: &str) -> Result<(), AdminError> {
    if yaml.len() > MAX_POLICY_BYTES {
        return Err(AdminError::PolicyTooLarge(yaml.len()));
    }
    Ok(())
}

impl CoordinatorState {
    /// Creates a token; the caller generated the secret and passes its hash.
    pub fn create_token(
        &mut self,
        now: UnixTime,
        spec: TokenSpec,
        secret_hash: [u8; 32],
    ) -> Result<Token, AdminError> {
        validate_labels(&spec.labels)?;
        // Zero is allowed: a token that is expired or used up at once.
        if let Some(t) = spec.ttl_secs.filter(|&t| t > MAX_TOKEN_TTL_SECS) {
            return Err(AdminError::InvalidTtl(t));
        }
        if let Some(u) = spec.uses.filter(|&u| u > MAX_TOKEN_USES) {
            return Err(AdminError::InvalidUses(u));
        }
        let id = TokenId(self.next_token);
        self.next_token += 1;
        let t = Token {
            id,
            labels: spec.labels,
            created_at: now,
            expires_at: spec.ttl_secs.map(|t| now.saturating_add(t)),
            uses_left: spec.uses,
            revoked: false,
            secret_hash,
        };
        self.by_hash.insert(secret_hash, id);
        self.tokens.insert(id, t.clone());
        self.dirty_tokens.insert(id);
        Ok(t)
    }

    /// Revokes a token.
    pub fn revoke_token(&mut self, id: TokenId) -> Result<Token, AdminError> {
        let t = self
            .tokens
            .get_mut(&id)
            .ok_or(AdminError::NoSuchToken(id))?;
        t.revoked = true;
        self.dirty_tokens.insert(id);
        Ok(t.clone())
    }

    /// Adds or replaces labels.
    pub fn set_labels(&mut self, r: &str, labels: Labels) -> Result<Host, AdminError> {
        validate_labels(&labels)?;
        let id = self.live_id(r)?;
        let h = self
            .hosts
            .get_mut(&id)
            .ok_or_else(|| AdminError::NoSuchHost(r.into()))?;
        let after = h
            .labels
            .keys()
            .chain(labels.keys())
            .collect::<BTreeSet<_>>()
            .len();
        if after > MAX_LABELS {
            return Err(AdminError::TooManyLabels(after));
        }
        let before = h.labels.clone();
        h.labels.extend(labels);
        if h.labels != before {
            self.touch(id);
            self.policy_host_changed(id);
        }
        self.host_result(id, r)
    }

    /// Removes labels by key (absent keys are ignored).
    pub fn remove_labels(&mut self, r: &str, keys: &[String]) -> Result<Host, AdminError> {
        let id = self.live_id(r)?;
        let h = self
            .hosts
            .get_mut(&id)
            .ok_or_else(|| AdminError::NoSuchHost(r.into()))?;
        let n = h.labels.len();
        h.labels.retain(|k, _| !keys.contains(k));
        if h.labels.len() != n {
            self.touch(id);
            self.policy_host_changed(id);
        }
        self.host_result(id, r)
    }

    /// Renames a host.
    pub fn rename(&mut self, r: &str, name: &str) -> Result<Host, AdminError> {
        validate_name(name)?;
        let id = self.live_id(r)?;
        if self.name_taken(name, Some(id)) {
            return Err(AdminError::NameTaken(name.into()));
        }
        let h = self
            .hosts
            .get_mut(&id)
            .ok_or_else(|| AdminError::NoSuchHost(r.into()))?;
        if h.name != name {
            h.name = name.to_string();
            self.touch(id);
            self.policy_host_changed(id);
        }
        self.host_result(id, r)
    }

    /// Removes a host: it leaves every peer's map, its address returns to the pool, and its
    /// live session (if any) is kicked with `HostRemoved`.
    pub fn remove_host(&mut self, r: &str) -> Result<Host, AdminError> {
        let id = self.live_id(r)?;
        let h = self
            .hosts
            .get_mut(&id)
            .ok_or_else(|| AdminError::NoSuchHost(r.into()))?;
        h.removed = true;
        let addr = h.ipv4;
        self.pool.release(addr);
        self.cancel_rotation(id);
        self.touch(id);
        self.policy_host_changed(id);
        if let Some(s) = self.sessions.remove(&id) {
            self.kicks.push(Kick {
                host: id,
                conn: s.conn,
                code: ErrorCode::HostRemoved,
            });
        }
        self.host_result(id, r)
    }

    /// Cuts a host off: it leaves every map and its own map empties (pushed with the next poll).
    pub fn quarantine(&mut self, r: &str) -> Result<Host, AdminError> {
        self.set_quarantined(r, true)
    }

    /// Undoes [`CoordinatorState::quarantine`].
    pub fn release(&mut self, r: &str) -> Result<Host, AdminError> {
        self.set_quarantined(r, false)
    }

    fn set_quarantined(&mut self, r: &str, q: bool) -> Result<Host, AdminError> {
        let id = self.live_id(r)?;
        let h = self
            .hosts
            .get_mut(&id)
            .ok_or_else(|| AdminError::NoSuchHost(r.into()))?;
        if h.quarantined != q {
            h.quarantined = q;
            self.dirty_hosts.insert(id);
            self.policy_host_changed(id);
        }
        self.host_result(id, r)
    }

    /// Removes a host for good: as [`CoordinatorState::remove_host`], and its key is refused
    /// from now on with [`ErrorCode::HostRevoked`], even with a new join token.
    pub fn revoke_host(&mut self, r: &str) -> Result<Host, AdminError> {
        let id = self.live_id(r)?;
        if let Some(h) = self.hosts.get_mut(&id) {
            h.revoked = true;
            self.revoked_keys.insert(h.public_key);
        }
        self.remove_host(r)?;
        if let Some(k) = self.kicks.iter_mut().find(|k| k.host == id) {
            k.code = ErrorCode::HostRevoked;
        }
        self.host_result(id, r)
    }
}
