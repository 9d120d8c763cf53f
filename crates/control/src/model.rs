//! Stored records: hosts and join tokens.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use meshd_tunnel::PublicKey;
use serde::{Deserialize, Serialize};

/// Seconds since the Unix epoch (defined once, in `meshd-time`). Passed in by the caller;
/// this crate never reads a clock.
pub use meshd_time::UnixTime;

/// Host labels (`app=db1`, `env=prod`).
pub type Labels = BTreeMap<String, String>;

/// A host's stable id, assigned by the coordinator at enrolment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HostId(pub u64);

impl std::fmt::Display for HostId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A join token's id (what `meshctl token list|revoke` show and take).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TokenId(pub u64);

impl std::fmt::Display for TokenId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// An enrolled host as the coordinator stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    /// Stable id.
    pub id: HostId,
    /// Unique (among non-removed hosts) DNS-label-like name.
    pub name: String,
    /// WireGuard static public key: the host's identity.
    pub public_key: PublicKey,
    /// Overlay IPv4 address from the pool.
    pub ipv4: Ipv4Addr,
    /// Optional overlay IPv6 address (when the pool has a v6 prefix).
    pub ipv6: Option<Ipv6Addr>,
    /// Labels (from the join token, then edited by the operator).
    pub labels: Labels,
    /// Underlay endpoints the agent reported (its local addresses and WireGuard port).
    pub reported_endpoints: Vec<SocketAddr>,
    /// The agent's WireGuard listen port, used with the observed IP.
    pub listen_port: Option<u16>,
    /// The source address the coordinator last saw the agent's control connection come from.
    pub observed_ip: Option<IpAddr>,
    /// When the host enrolled.
    pub created_at: UnixTime,
    /// When the coordinator last heard from the host.
    pub last_seen: UnixTime,
    /// Removed by an operator: no longer a peer of anyone; its key may not resume.
    pub removed: bool,
    /// Quarantined: in nobody's map and its own map is empty, until released.
    #[serde(default)]
    pub quarantined: bool,
    /// Revoked (implies removed): its key is refused for good, even with a new join token.
    #[serde(default)]
    pub revoked: bool,
    /// The join token it enrolled with.
    pub token_id: Option<TokenId>,
    /// The agent runs in transparent mode (as it last reported).
    #[serde(default)]
    pub transparent: bool,
    /// Key rotation: the proved next key, while the host switches to it (peers accept both).
    #[serde(default)]
    pub pending_key: Option<PublicKey>,
    /// When the key last changed by rotation (`None`: the enrolment key).
    #[serde(default)]
    pub key_rotated_at: Option<UnixTime>,
}

impl Host {
    /// Overlay addresses, v4 first.
    pub fn addresses(&self) -> Vec<IpAddr> {
        let mut v = vec![IpAddr::V4(self.ipv4)];
        if let Some(a) = self.ipv6 {
            v.push(IpAddr::V6(a));
        }
        v
    }

    /// Endpoints peers should try: the observed one first (observed IP + listen port), then the
    /// reported ones, without duplicates.
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        let mut out = Vec::with_capacity(self.reported_endpoints.len() + 1);
        if let (Some(ip), Some(port)) = (self.observed_ip, self.listen_port) {
            out.push(SocketAddr::new(ip, port));
        }
        for e in &self.reported_endpoints {
            if !out.contains(e) {
                out.push(*e);
            }
        }
        out
    }
}

/// A join token record. The secret itself is never stored: only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// Id.
    pub id: TokenId,
    /// Labels given to hosts that enrol with this token.
    pub labels: Labels,
    /// When it was created.
    pub created_at: UnixTime,
    /// When it stops working (`None`: never).
    pub expires_at: Option<UnixTime>,
    /// Enrolments left (`None`: unlimited).
    pub uses_left: Option<u32>,
    /// Revoked by an operator.
    pub revoked: bool,
    /// SHA-256 of the secret.
    pub secret_hash: [u8; 32],
}

/// Why a token cannot be used now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenUnusable {
    /// Past its expiry.
    #[error("join token expired")]
    Expired,
    /// Revoked by an operator.
    #[error("join token revoked")]
    Revoked,
    /// No uses left.
    #[error("join token used up")]
    UsedUp,
}

impl Token {
    /// Whether the token can enrol a host at `now`; revocation wins over expiry over use count.
    pub fn check(&self, now: UnixTime) -> Result<(), TokenUnusable> {
        if self.revoked {
            return Err(TokenUnusable::Revoked);
        }
        if self.expires_at.is_some_and(|e| now >= e) {
            return Err(TokenUnusable::Expired);
        }
        if self.uses_left == Some(0) {
            return Err(TokenUnusable::UsedUp);
        }
        Ok(())
    }
}

/// Why a host name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty or longer than 63 bytes.
    #[error("host name must be 1 to 63 characters")]
    Length,
    /// A character other than `a-z A-Z 0-9 - _ .`.
    #[error("host name may only contain letters, digits, '-', '_' and '.'")]
    Character,
}

/// Checks a host name: 1–63 characters of `[A-Za-z0-9._-]`.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() || name.len() > 63 {
        return Err(NameError::Length);
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(NameError::Character);
    }
    Ok(())
}

/// Why a label was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    /// Key empty or over 63 bytes, or value over 255 bytes.
    #[error("label {0:?}: key must be 1-63 characters and value at most 255")]
    Length(String),
    /// A character other than `[A-Za-z0-9._/-]` in the key or value.
    #[error("label {0:?}: only letters, digits, '-', '_', '.' and '/' are allowed")]
    Character(String),
}

/// Checks one label pair.
pub fn validate_label(key: &str, value: &str) -> Result<(), LabelError> {
    let ok = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
    };
    if key.is_empty() || key.len() > 63 || value.len() > 255 {
        return Err(LabelError::Length(key.to_string()));
    }
    if !ok(key) || !ok(value) {
        return Err(LabelError::Character(key.to_string()));
    }
    Ok(())
}

/// Parses `a=b,c=d` into labels.
pub fn parse_labels(s: &str) -> Result<Labels, LabelError> {
    let mut out = Labels::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        validate_label(k, v)?;
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_check_order() {
        let mut t = Token {
            id: TokenId(1),
            labels: Labels::new(),
            created_at: 0,
            expires_at: Some(10),
            uses_left: Some(1),
            revoked: false,
            secret_hash: [0; 32],
        };
        assert_eq!(t.check(5), Ok(()));
        assert_eq!(t.check(10), Err(TokenUnusable::Expired));
        t.uses_left = Some(0);
        assert_eq!(t.check(5), Err(TokenUnusable::UsedUp));
        t.revoked = true;
        assert_eq!(t.check(50), Err(TokenUnusable::Revoked));
    }

    #[test]
    fn names_and_labels() {
        assert!(validate_name("db-1.prod").is_ok());
        assert_eq!(validate_name(""), Err(NameError::Length));
        assert_eq!(validate_name("a b"), Err(NameError::Character));
        let l = parse_labels("app=db1, env=prod").unwrap();
        assert_eq!(l.get("env").map(String::as_str), Some("prod"));
        assert!(parse_labels("a b=c").is_err());
    }

    #[test]
    fn endpoints_observed_first_dedup() {
        let h = Host {
            id: HostId(1),
            name: "a".into(),
            public_key: PublicKey([1; 32]),
            ipv4: "100.64.0.2".parse().unwrap(),
            ipv6: None,
            labels: Labels::new(),
            reported_endpoints: vec![
                "10.0.0.1:51820".parse().unwrap(),
                "1.2.3.4:51820".parse().unwrap(),
            ],
            listen_port: Some(51820),
            observed_ip: Some("1.2.3.4".parse().unwrap()),
            created_at: 0,
            last_seen: 0,
            removed: false,
            token_id: None,
            quarantined: false,
            revoked: false,
            transparent: false,
            pending_key: None,
            key_rotated_at: None,
        };
        let e: Vec<String> = h.endpoints().iter().map(|e| e.to_string()).collect();
        assert_eq!(e, ["1.2.3.4:51820", "10.0.0.1:51820"]);
    }
}
