//! Join tokens: `meshd1-<base64url(addr, coordinator key, secret)>`.
//!
//! Binary layout before base64url (no padding): one family byte (4 or 6), the IP (4 or 16
//! bytes), the port (2 bytes, big endian), the coordinator's static X25519 public key (32
//! bytes), then the secret (32 bytes). The coordinator stores only `SHA-256(secret)`. Once
//! admin keys are registered (signed policy) the fingerprint of the admin key set follows
//! (32 bytes), for the agent to pin ([`JoinToken::encode_pinned`], [`JoinToken::admin_pin`]).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use meshd_tunnel::PublicKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Prefix of every join token string (carries the format version).
pub const JOIN_TOKEN_PREFIX: &str = "meshd1-";

/// A 32-byte random secret (join token or admin token). Never printed by `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenSecret(#[serde(with = "b64_32")] pub [u8; 32]);

impl TokenSecret {
    /// SHA-256 of the secret: what the coordinator stores and looks tokens up by.
    pub fn hash(&self) -> [u8; 32] {
        hash_secret(&self.0)
    }
}

impl fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenSecret(<redacted>)")
    }
}

/// SHA-256 of arbitrary secret bytes.
pub fn hash_secret(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

/// Why a join token string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinTokenError {
    /// Does not start with `meshd1-` (e.g. an admin token or a truncated paste).
    #[error("not a meshd join token (expected it to start with \"{JOIN_TOKEN_PREFIX}\")")]
    Prefix,
    /// The part after the prefix is not base64url.
    #[error("join token is corrupted (not base64url); copy it again from `meshctl token create`")]
    Base64,
    /// Wrong length for its address family.
    #[error("join token is truncated or corrupted (wrong length {0})")]
    Length(usize),
    /// Unknown address family byte.
    #[error("join token is corrupted (unknown address family {0})")]
    Family(u8),
}

/// Everything a host needs to enrol: where the coordinator is, its pinned key, and the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Coordinator control (QUIC) address.
    pub control: SocketAddr,
    /// Coordinator static public key, pinned by the agent in the Noise handshake.
    pub coordinator_key: PublicKey,
    /// The enrolment secret.
    pub secret: TokenSecret,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("control", &self.control)
            .field("coordinator_key", &self.coordinator_key)
            .finish_non_exhaustive()
    }
}

impl JoinToken {
    /// Encodes the token as `meshd1-…`.
    pub fn encode(&self) -> String {
        let mut b = Vec::with_capacity(1 + 16 + 2 + 64);
        match self.control.ip() {
            IpAddr::V4(ip) => {
                b.push(4);
                b.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                b.push(6);
                b.extend_from_slice(&ip.octets());
            }
        }
        b.extend_from_slice(&self.control.port().to_be_bytes());
        b.extend_from_slice(self.coordinator_key.as_bytes());
        b.extend_from_slice(&self.secret.0);
        format!("{JOIN_TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(b))
    }

    /// Encodes the token with the admin key-set fingerprint for the agent to pin.
    pub fn encode_pinned(&self, pin: Option<&crate::signed::Hash32>) -> String {
        let Some(pin) = pin else {
            return self.encode();
        };
        let plain = self.encode();
        let mut b = URL_SAFE_NO_PAD
            .decode(&plain[JOIN_TOKEN_PREFIX.len()..])
            .unwrap_or_default();
        b.extend_from_slice(&pin.0);
        format!("{JOIN_TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(b))
    }

    /// The admin key-set fingerprint a token carries (`None`: an unsigned mesh's token).
    pub fn admin_pin(s: &str) -> Result<Option<crate::signed::Hash32>, JoinTokenError> {
        let b = Self::bytes(s)?;
        Self::parse(s)?;
        let plain = 1 + if b.first() == Some(&4) { 4 } else { 16 } + 2 + 64;
        Ok((b.len() == plain + 32).then(|| {
            let mut p = [0u8; 32];
            p.copy_from_slice(&b[plain..]);
            crate::signed::Hash32(p)
        }))
    }

    fn bytes(s: &str) -> Result<Vec<u8>, JoinTokenError> {
        let body = s
            .trim()
            .strip_prefix(JOIN_TOKEN_PREFIX)
            .ok_or(JoinTokenError::Prefix)?;
        URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| JoinTokenError::Base64)
    }

    /// Parses a `meshd1-…` string (surrounding whitespace ignored).
    pub fn parse(s: &str) -> Result<Self, JoinTokenError> {
        let body = s
            .trim()
            .strip_prefix(JOIN_TOKEN_PREFIX)
            .ok_or(JoinTokenError::Prefix)?;
        let b = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| JoinTokenError::Base64)?;
        let (&fam, rest) = b.split_first().ok_or(JoinTokenError::Length(0))?;
        let iplen = match fam {
            4 => 4,
            6 => 16,
            other => return Err(JoinTokenError::Family(other)),
        };
        if rest.len() != iplen + 2 + 64 && rest.len() != iplen + 2 + 64 + 32 {
            return Err(JoinTokenError::Length(b.len()));
        }
        let (ipb, rest) = rest.split_at(iplen);
        let ip = if fam == 4 {
            let mut o = [0u8; 4];
            o.copy_from_slice(ipb);
            IpAddr::V4(Ipv4Addr::from(o))
        } else {
            let mut o = [0u8; 16];
            o.copy_from_slice(ipb);
            IpAddr::V6(Ipv6Addr::from(o))
        };
        let port = u16::from_be_bytes([rest[0], rest[1]]);
        let mut key = [0u8; 32];
        key.copy_from_slice(&rest[2..34]);
        let mut secret = [0u8; 32];
        secret.copy_from_slice(&rest[34..66]);
        Ok(JoinToken {
            control: SocketAddr::new(ip, port),
            coordinator_key: PublicKey(key),
            secret: TokenSecret(secret),
        })
    }
}

impl FromStr for JoinToken {
    type Err = JoinTokenError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JoinToken::parse(s)
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encode())
    }
}

mod b64_32 {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&URL_SAFE_NO_PAD.encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let b = URL_SAFE_NO_PAD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)?;
        <[u8; 32]>::try_from(b.as_slice())
            .map_err(|_| serde::de::Error::custom("expected 32 bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tok(addr: &str) -> JoinToken {
        JoinToken {
            control: addr.parse().unwrap(),
            coordinator_key: PublicKey([7; 32]),
            secret: TokenSecret([9; 32]),
        }
    }

    #[test]
    fn pinned_tokens_carry_the_admin_fingerprint() {
        for a in ["192.0.2.1:7443", "[2001:db8::1]:7443"] {
            let t = tok(a);
            let pin = crate::signed::Hash32([0xab; 32]);
            let s = t.encode_pinned(Some(&pin));
            assert_eq!(JoinToken::parse(&s).unwrap(), t);
            assert_eq!(JoinToken::admin_pin(&s), Ok(Some(pin)));
            assert_eq!(JoinToken::admin_pin(&t.encode()), Ok(None));
            // Cut in the pin: refused, never a partial pin.
            let cut = &s[..s.len() - 4];
            assert!(JoinToken::admin_pin(cut).is_err());
        }
    }

    #[test]
    fn roundtrip_v4_v6() {
        for a in ["192.0.2.1:7443", "[2001:db8::1]:7443"] {
            let t = tok(a);
            let s = t.encode();
            assert!(s.starts_with("meshd1-"));
            assert_eq!(JoinToken::parse(&format!("  {s}\n")).unwrap(), t);
        }
    }

    #[test]
    fn errors_are_specific() {
        assert_eq!(JoinToken::parse("hello"), Err(JoinTokenError::Prefix));
        assert_eq!(JoinToken::parse("meshd1-!!!"), Err(JoinTokenError::Base64));
        let s = tok("192.0.2.1:7443").encode();
        assert!(matches!(
            JoinToken::parse(&s[..s.len() - 4]),
            Err(JoinTokenError::Length(_))
        ));
        let bad = format!("meshd1-{}", URL_SAFE_NO_PAD.encode([5u8; 71]));
        assert_eq!(JoinToken::parse(&bad), Err(JoinTokenError::Family(5)));
        assert_eq!(JoinToken::parse("meshd1-"), Err(JoinTokenError::Length(0)));
    }

    #[test]
    fn debug_redacts_secret() {
        let d = format!("{:?}", tok("192.0.2.1:1"));
        assert!(!d.contains("9, 9"));
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,200}") {
            let _ = JoinToken::parse(&s);
            let _ = JoinToken::parse(&format!("meshd1-{s}"));
        }
    }
}
