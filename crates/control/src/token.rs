//! Join tokens: `meshd1-…` (one coordinator address) and `meshd2-…` (several replicas).
//!
//! Binary layout before base64url (no padding), shared by both versions: one family byte (4
//! or 6), the IP (4 or 16 bytes), the port (2 bytes, big endian), the coordinator's static
//! X25519 public key (32 bytes), then the secret (32 bytes). The coordinator stores only
//! `SHA-256(secret)`.
//!
//! - `meshd1-`: optionally followed by the fingerprint of the admin key set (32 bytes,
//!   detected by length), for the agent to pin ([`JoinToken::encode_pinned`],
//!   [`JoinToken::admin_pin`]). Nothing else may follow.
//! - `meshd2-`: followed by extension records, each one type byte, one length byte and that
//!   many bytes of value: type 1 is the admin pin (32 bytes), type 2 one more replica's
//!   control address (family byte, IP, port: 7 or 19 bytes; at most [`MAX_TOKEN_REPLICAS`]).
//!   Unknown types are skipped, so a later version can add records older agents ignore.
//!
//! [`JoinToken::encode_pinned`] writes `meshd1-` whenever the token names one address, so
//! such tokens stay readable by every older meshd; only a token with replicas is `meshd2-`,
//! which an older meshd refuses as "not a meshd join token" rather than misreading.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use meshd_tunnel::PublicKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Prefix of a join token naming one coordinator address (format version 1).
pub const JOIN_TOKEN_PREFIX: &str = "meshd1-";
/// Prefix of a join token with extension records (replica addresses; format version 2).
pub const JOIN_TOKEN_PREFIX_V2: &str = "meshd2-";
/// Most replica addresses a token carries besides [`JoinToken::control`].
pub const MAX_TOKEN_REPLICAS: usize = 15;

/// Extension record: the admin key-set fingerprint.
const EXT_ADMIN_PIN: u8 = 1;
/// Extension record: one more replica's control address.
const EXT_REPLICA: u8 = 2;

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
    /// Does not start with `meshd1-` or `meshd2-` (e.g. an admin token or a truncated paste).
    #[error("not a meshd join token (expected it to start with \"{JOIN_TOKEN_PREFIX}\" or \"{JOIN_TOKEN_PREFIX_V2}\")")]
    Prefix,
    /// A `meshdN-` token of a format this meshd does not know.
    #[error("join token format {0} is newer than this meshd understands (it reads 1 and 2): upgrade meshd")]
    Version(String),
    /// The part after the prefix is not base64url.
    #[error("join token is corrupted (not base64url); copy it again from `meshctl token create`")]
    Base64,
    /// Wrong length for its address family.
    #[error("join token is truncated or corrupted (wrong length {0})")]
    Length(usize),
    /// Unknown address family byte.
    #[error("join token is corrupted (unknown address family {0})")]
    Family(u8),
    /// A `meshd2-` extension record is cut short or malformed.
    #[error("join token is truncated or corrupted (bad extension record: {0})")]
    Extension(&'static str),
}

/// Everything a host needs to enrol: where the coordinator is, its pinned key, and the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Coordinator control (QUIC) address: the one tried first.
    pub control: SocketAddr,
    /// The other coordinator replicas' control addresses (same key, same database), tried
    /// when `control` does not answer. Empty for a lone coordinator (a `meshd1-` token).
    pub replicas: Vec<SocketAddr>,
    /// Coordinator static public key, pinned by the agent in the Noise handshake.
    pub coordinator_key: PublicKey,
    /// The enrolment secret.
    pub secret: TokenSecret,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("control", &self.control)
            .field("replicas", &self.replicas)
            .field("coordinator_key", &self.coordinator_key)
            .finish_non_exhaustive()
    }
}

fn put_addr(b: &mut Vec<u8>, a: SocketAddr) {
    match a.ip() {
        IpAddr::V4(ip) => {
            b.push(4);
            b.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            b.push(6);
            b.extend_from_slice(&ip.octets());
        }
    }
    b.extend_from_slice(&a.port().to_be_bytes());
}

/// Reads a family byte, IP and port from the front of `b`; returns the address and the rest.
fn take_addr(b: &[u8]) -> Result<(SocketAddr, &[u8]), JoinTokenError> {
    let (&fam, rest) = b.split_first().ok_or(JoinTokenError::Length(0))?;
    let iplen = match fam {
        4 => 4,
        6 => 16,
        other => return Err(JoinTokenError::Family(other)),
    };
    if rest.len() < iplen + 2 {
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
    Ok((SocketAddr::new(ip, port), &rest[2..]))
}

impl JoinToken {
    /// A token for one coordinator address (no replicas).
    pub fn new(control: SocketAddr, coordinator_key: PublicKey, secret: TokenSecret) -> Self {
        JoinToken {
            control,
            replicas: Vec::new(),
            coordinator_key,
            secret,
        }
    }

    /// Every address, `control` first, then the replicas (duplicates left out).
    pub fn addresses(&self) -> Vec<SocketAddr> {
        let mut v = vec![self.control];
        for a in &self.replicas {
            if !v.contains(a) {
                v.push(*a);
            }
        }
        v
    }

    /// Encodes the token (`meshd1-…` without replicas, else `meshd2-…`).
    pub fn encode(&self) -> String {
        self.encode_pinned(None)
    }

    /// Encodes the token with the admin key-set fingerprint for the agent to pin.
    pub fn encode_pinned(&self, pin: Option<&crate::signed::Hash32>) -> String {
        let mut b = Vec::with_capacity(1 + 16 + 2 + 64 + 34);
        put_addr(&mut b, self.control);
        b.extend_from_slice(self.coordinator_key.as_bytes());
        b.extend_from_slice(&self.secret.0);
        let replicas: Vec<SocketAddr> = self
            .addresses()
            .into_iter()
            .skip(1)
            .take(MAX_TOKEN_REPLICAS)
            .collect();
        if replicas.is_empty() {
            if let Some(pin) = pin {
                b.extend_from_slice(&pin.0);
            }
            return format!("{JOIN_TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(b));
        }
        if let Some(pin) = pin {
            b.extend_from_slice(&[EXT_ADMIN_PIN, 32]);
            b.extend_from_slice(&pin.0);
        }
        for a in replicas {
            let mut v = Vec::with_capacity(19);
            put_addr(&mut v, a);
            b.push(EXT_REPLICA);
            b.push(v.len() as u8);
            b.extend_from_slice(&v);
        }
        format!("{JOIN_TOKEN_PREFIX_V2}{}", URL_SAFE_NO_PAD.encode(b))
    }

    /// The admin key-set fingerprint a token carries (`None`: an unsigned mesh's token).
    pub fn admin_pin(s: &str) -> Result<Option<crate::signed::Hash32>, JoinTokenError> {
        Ok(Self::parse_full(s)?.1)
    }

    /// Parses a `meshd1-…` or `meshd2-…` string (surrounding whitespace ignored).
    pub fn parse(s: &str) -> Result<Self, JoinTokenError> {
        Ok(Self::parse_full(s)?.0)
    }

    /// The token and the admin pin it carries.
    fn parse_full(s: &str) -> Result<(Self, Option<crate::signed::Hash32>), JoinTokenError> {
        let s = s.trim();
        let (v2, body) = if let Some(body) = s.strip_prefix(JOIN_TOKEN_PREFIX) {
            (false, body)
        } else if let Some(body) = s.strip_prefix(JOIN_TOKEN_PREFIX_V2) {
            (true, body)
        } else {
            return Err(match newer_version(s) {
                Some(v) => JoinTokenError::Version(v.to_string()),
                None => JoinTokenError::Prefix,
            });
        };
        let b = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| JoinTokenError::Base64)?;
        let (control, rest) = take_addr(&b)?;
        if rest.len() < 64 {
            return Err(JoinTokenError::Length(b.len()));
        }
        let (fixed, ext) = rest.split_at(64);
        let mut key = [0u8; 32];
        key.copy_from_slice(&fixed[..32]);
        let mut secret = [0u8; 32];
        secret.copy_from_slice(&fixed[32..]);
        let mut token = JoinToken {
            control,
            replicas: Vec::new(),
            coordinator_key: PublicKey(key),
            secret: TokenSecret(secret),
        };
        let mut pin = None;
        if !v2 {
            match ext.len() {
                0 => {}
                32 => pin = Some(hash32(ext)),
                _ => return Err(JoinTokenError::Length(b.len())),
            }
            return Ok((token, pin));
        }
        let mut ext = ext;
        while !ext.is_empty() {
            let [ty, len, rest @ ..] = ext else {
                return Err(JoinTokenError::Extension("cut in a record header"));
            };
            let len = usize::from(*len);
            if rest.len() < len {
                return Err(JoinTokenError::Extension("cut in a record"));
            }
            let (value, next) = rest.split_at(len);
            ext = next;
            match *ty {
                EXT_ADMIN_PIN => {
                    if len != 32 || pin.is_some() {
                        return Err(JoinTokenError::Extension("admin pin"));
                    }
                    pin = Some(hash32(value));
                }
                EXT_REPLICA => {
                    let (a, tail) = take_addr(value)
                        .map_err(|_| JoinTokenError::Extension("replica address"))?;
                    if !tail.is_empty() {
                        return Err(JoinTokenError::Extension("replica address"));
                    }
                    if token.replicas.len() >= MAX_TOKEN_REPLICAS {
                        return Err(JoinTokenError::Extension("too many replica addresses"));
                    }
                    if a != token.control && !token.replicas.contains(&a) {
                        token.replicas.push(a);
                    }
                }
                // A later version's record: skipped.
                _ => {}
            }
        }
        Ok((token, pin))
    }
}

/// `Some("3")` for a `meshd3-…` string: a token format newer than this code.
fn newer_version(s: &str) -> Option<&str> {
    let rest = s.strip_prefix("meshd")?;
    let (v, _) = rest.split_once('-')?;
    (!v.is_empty() && v.len() <= 3 && v.bytes().all(|c| c.is_ascii_digit())).then_some(v)
}

fn hash32(b: &[u8]) -> crate::signed::Hash32 {
    let mut p = [0u8; 32];
    p.copy_from_slice(b);
    crate::signed::Hash32(p)
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
        JoinToken::new(
            addr.parse().unwrap(),
            PublicKey([7; 32]),
            TokenSecret([9; 32]),
        )
    }

    fn with_replicas(addr: &str, replicas: &[&str]) -> JoinToken {
        JoinToken {
            replicas: replicas.iter().map(|a| a.parse().unwrap()).collect(),
            ..tok(addr)
        }
    }

    /// A `meshd1-` token as the code before replicas wrote it (body bytes, optional pin).
    fn legacy(t: &JoinToken, pin: Option<[u8; 32]>) -> String {
        let mut b = Vec::new();
        put_addr(&mut b, t.control);
        b.extend_from_slice(t.coordinator_key.as_bytes());
        b.extend_from_slice(&t.secret.0);
        if let Some(p) = pin {
            b.extend_from_slice(&p);
        }
        format!("meshd1-{}", URL_SAFE_NO_PAD.encode(b))
    }

    #[test]
    fn old_tokens_still_parse_and_one_address_stays_v1() {
        for a in ["192.0.2.1:7443", "[2001:db8::1]:7443"] {
            let t = tok(a);
            let old = legacy(&t, None);
            assert_eq!(t.encode(), old, "one address: the same bytes as before");
            assert_eq!(JoinToken::parse(&old).unwrap(), t);
            assert_eq!(JoinToken::admin_pin(&old), Ok(None));
            let pinned = legacy(&t, Some([0xcd; 32]));
            let pin = crate::signed::Hash32([0xcd; 32]);
            assert_eq!(t.encode_pinned(Some(&pin)), pinned);
            assert_eq!(JoinToken::parse(&pinned).unwrap(), t);
            assert_eq!(JoinToken::admin_pin(&pinned), Ok(Some(pin)));
        }
    }

    #[test]
    fn replicas_round_trip_in_a_v2_token() {
        let t = with_replicas(
            "192.0.2.1:7443",
            &["192.0.2.2:7443", "[2001:db8::3]:7444", "198.51.100.4:1"],
        );
        let s = t.encode();
        assert!(s.starts_with("meshd2-"), "{s}");
        let back = JoinToken::parse(&s).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.addresses().len(), 4);
        assert_eq!(JoinToken::admin_pin(&s), Ok(None));
        let pin = crate::signed::Hash32([0xab; 32]);
        let s = t.encode_pinned(Some(&pin));
        assert_eq!(JoinToken::parse(&s).unwrap(), t);
        assert_eq!(JoinToken::admin_pin(&s), Ok(Some(pin)));
        // Every cut is refused, never read as a shorter list.
        for n in 1..12 {
            assert!(JoinToken::parse(&s[..s.len() - n]).is_err(), "cut {n}");
        }
    }

    #[test]
    fn replicas_are_deduplicated_and_unknown_records_skipped() {
        let t = with_replicas(
            "192.0.2.1:7443",
            &["192.0.2.1:7443", "192.0.2.2:1", "192.0.2.2:1"],
        );
        let back = JoinToken::parse(&t.encode()).unwrap();
        assert_eq!(back.replicas, vec!["192.0.2.2:1".parse().unwrap()]);
        // A later version's record type 9 is skipped.
        let s = with_replicas("192.0.2.1:7443", &["192.0.2.2:1"]).encode();
        let mut b = URL_SAFE_NO_PAD.decode(&s[7..]).unwrap();
        b.extend_from_slice(&[9, 3, 1, 2, 3]);
        let s = format!("meshd2-{}", URL_SAFE_NO_PAD.encode(b));
        assert_eq!(JoinToken::parse(&s).unwrap().replicas.len(), 1);
    }

    #[test]
    fn newer_formats_are_refused_by_name() {
        assert_eq!(
            JoinToken::parse("meshd3-AAAA"),
            Err(JoinTokenError::Version("3".into()))
        );
        assert!(JoinTokenError::Version("3".into())
            .to_string()
            .contains("upgrade meshd"));
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

    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
        ]
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,200}") {
            let _ = JoinToken::parse(&s);
            let _ = JoinToken::parse(&format!("meshd1-{s}"));
            let _ = JoinToken::parse(&format!("meshd2-{s}"));
        }

        #[test]
        fn any_token_round_trips(
            control in arb_addr(),
            replicas in proptest::collection::vec(arb_addr(), 0..MAX_TOKEN_REPLICAS),
            key in any::<[u8; 32]>(),
            secret in any::<[u8; 32]>(),
            pin in proptest::option::of(any::<[u8; 32]>()),
        ) {
            let mut t = JoinToken { control, replicas, coordinator_key: PublicKey(key), secret: TokenSecret(secret) };
            let pin = pin.map(crate::signed::Hash32);
            let s = t.encode_pinned(pin.as_ref());
            t.replicas = t.addresses().split_off(1);
            prop_assert_eq!(JoinToken::parse(&s).unwrap(), t);
            prop_assert_eq!(JoinToken::admin_pin(&s).unwrap(), pin);
        }

        #[test]
        fn v2_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = JoinToken::parse(&format!("meshd2-{}", URL_SAFE_NO_PAD.encode(&b)));
        }
    }
}
