//! Named admin tokens (issue 17): who may use the admin API. Each has a name, the SHA-256 of
//! its secret (never the secret), a creation time, an optional expiry and, once revoked, the
//! time it was revoked. The token the coordinator writes to `<state-dir>/admin.token` on its
//! first start is the one named [`BOOTSTRAP_ADMIN_TOKEN`].
//!
//! Rules: names are `[a-z0-9._-]{1,64}` and unique for good (a revoked name is not reused, so
//! the audit log names one token per name); lifetimes are bounded by [`MAX_TOKEN_TTL_SECS`];
//! the last valid (unexpired, unrevoked) token cannot be revoked, so the API cannot lock
//! everyone out. The HTTP edge checks a presented token with [`AdminTokens::authenticate`] on
//! a copy the actor publishes after each commit.

use std::collections::{BTreeMap, HashMap};

use super::{AdminError, CoordinatorState, MAX_TOKEN_TTL_SECS};
use crate::model::UnixTime;

/// Name of the token made on the coordinator's first start (`<state-dir>/admin.token`).
pub const BOOTSTRAP_ADMIN_TOKEN: &str = "bootstrap";

/// Longest admin token name.
pub const MAX_ADMIN_TOKEN_NAME: usize = 64;

/// One admin token as stored: the secret itself never is, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminToken {
    /// Unique name (`[a-z0-9._-]{1,64}`).
    pub name: String,
    /// SHA-256 of the token string.
    pub hash: [u8; 32],
    /// When it was created (Unix seconds).
    pub created_at: UnixTime,
    /// When it stops working (`None`: never).
    pub expires_at: Option<UnixTime>,
    /// When it was revoked (`None`: not revoked).
    pub revoked_at: Option<UnixTime>,
}

/// Why a presented admin token is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminAuthError {
    /// No admin token has this hash (a wrong or missing token).
    #[error("unknown admin token")]
    Unknown,
    /// The named token is past its expiry.
    #[error("admin token {0:?} has expired")]
    Expired(String),
    /// The named token was revoked.
    #[error("admin token {0:?} was revoked")]
    Revoked(String),
}

/// Why an admin token name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("admin token name {0:?} is invalid: give 1 to {MAX_ADMIN_TOKEN_NAME} characters of a-z, 0-9, '.', '_', '-'")]
pub struct AdminTokenNameError(pub String);

/// Checks an admin token name: `[a-z0-9._-]{1,64}`.
pub fn validate_admin_token_name(name: &str) -> Result<(), AdminTokenNameError> {
    let ok = (1..=MAX_ADMIN_TOKEN_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(AdminTokenNameError(name.to_string()))
    }
}

impl AdminToken {
    /// Whether it authenticates at `now`: revocation wins over expiry.
    pub fn check(&self, now: UnixTime) -> Result<(), AdminAuthError> {
        if self.revoked_at.is_some() {
            return Err(AdminAuthError::Revoked(self.name.clone()));
        }
        if self.expires_at.is_some_and(|e| now >= e) {
            return Err(AdminAuthError::Expired(self.name.clone()));
        }
        Ok(())
    }

    /// Not revoked and not expired at `now`.
    pub fn is_valid(&self, now: UnixTime) -> bool {
        self.check(now).is_ok()
    }

    /// `active`, `expired` or `revoked` at `now` (as listed).
    pub fn state(&self, now: UnixTime) -> &'static str {
        match self.check(now) {
            Ok(()) => "active",
            Err(AdminAuthError::Expired(_)) => "expired",
            Err(AdminAuthError::Revoked(_) | AdminAuthError::Unknown) => "revoked",
        }
    }
}

/// The admin tokens by name, with a hash index. Cheap to clone (a handful of entries): the
/// actor publishes a copy for the HTTP edge after each commit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminTokens {
    by_name: BTreeMap<String, AdminToken>,
    by_hash: HashMap<[u8; 32], String>,
}

impl AdminTokens {
    /// A set of tokens (later duplicates of a name or hash replace earlier ones).
    pub fn from_tokens(tokens: impl IntoIterator<Item = AdminToken>) -> Self {
        let mut s = AdminTokens::default();
        for t in tokens {
            s.insert(t);
        }
        s
    }

    fn insert(&mut self, t: AdminToken) {
        if let Some(old) = self.by_name.get(&t.name) {
            self.by_hash.remove(&old.hash);
        }
        self.by_hash.insert(t.hash, t.name.clone());
        self.by_name.insert(t.name.clone(), t);
    }

    /// The token whose secret hashes to `hash`, if it authenticates at `now`.
    pub fn authenticate(
        &self,
        now: UnixTime,
        hash: &[u8; 32],
    ) -> Result<&AdminToken, AdminAuthError> {
        let t = self
            .by_hash
            .get(hash)
            .and_then(|n| self.by_name.get(n))
            .ok_or(AdminAuthError::Unknown)?;
        t.check(now)?;
        Ok(t)
    }

    /// All tokens, by name.
    pub fn iter(&self) -> impl Iterator<Item = &AdminToken> {
        self.by_name.values()
    }

    /// A token by name.
    pub fn get(&self, name: &str) -> Option<&AdminToken> {
        self.by_name.get(name)
    }

    /// How many tokens authenticate at `now`.
    pub fn valid_count(&self, now: UnixTime) -> usize {
        self.iter().filter(|t| t.is_valid(now)).count()
    }
}

/// A revocation's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminTokenRevoked {
    /// The token as it is now.
    pub token: AdminToken,
    /// It was revoked by this call (`false`: it already was; nothing changed).
    pub changed: bool,
}

impl CoordinatorState {
    /// The admin tokens.
    pub fn admin_tokens(&self) -> &AdminTokens {
        &self.admin_tokens
    }

    /// Loads the stored admin tokens at start-up.
    pub fn restore_admin_tokens(&mut self, tokens: Vec<AdminToken>) {
        self.admin_tokens = AdminTokens::from_tokens(tokens);
    }

    /// Creates an admin token; the caller generated the secret and passes its hash. `ttl_secs`
    /// 0 is allowed (expired at once), as for join tokens.
    pub fn create_admin_token(
        &mut self,
        now: UnixTime,
        name: &str,
        ttl_secs: Option<u64>,
        hash: [u8; 32],
    ) -> Result<AdminToken, AdminError> {
        validate_admin_token_name(name)?;
        if let Some(t) = ttl_secs.filter(|&t| t > MAX_TOKEN_TTL_SECS) {
            return Err(AdminError::InvalidTtl(t));
        }
        if self.admin_tokens.by_name.contains_key(name) {
            return Err(AdminError::AdminTokenNameTaken(name.to_string()));
        }
        let t = AdminToken {
            name: name.to_string(),
            hash,
            created_at: now,
            expires_at: ttl_secs.map(|t| now.saturating_add(t)),
            revoked_at: None,
        };
        self.admin_tokens.insert(t.clone());
        self.dirty_admin_tokens.insert(t.name.clone());
        Ok(t)
    }

    /// Revokes an admin token by name; refused if it is the last valid one at `now`.
    /// Revoking a revoked token changes nothing.
    pub fn revoke_admin_token(
        &mut self,
        now: UnixTime,
        name: &str,
    ) -> Result<AdminTokenRevoked, AdminError> {
        let t = self
            .admin_tokens
            .by_name
            .get(name)
            .ok_or_else(|| AdminError::NoSuchAdminToken(name.to_string()))?;
        if t.revoked_at.is_some() {
            return Ok(AdminTokenRevoked {
                token: t.clone(),
                changed: false,
            });
        }
        if t.is_valid(now) && self.admin_tokens.valid_count(now) <= 1 {
            return Err(AdminError::LastAdminToken(name.to_string()));
        }
        let t = self
            .admin_tokens
            .by_name
            .get_mut(name)
            .ok_or_else(|| AdminError::NoSuchAdminToken(name.to_string()))?;
        t.revoked_at = Some(now);
        let token = t.clone();
        self.dirty_admin_tokens.insert(token.name.clone());
        Ok(AdminTokenRevoked {
            token,
            changed: true,
        })
    }
}
