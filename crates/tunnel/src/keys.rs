//! X25519 keys in WireGuard's base64 encoding (`wg genkey` / `wg pubkey` compatible).

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a key string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not valid base64.
    #[error("key is not valid base64")]
    Base64,
    /// Decoded to something other than 32 bytes.
    #[error("key must decode to 32 bytes, got {0}")]
    Length(usize),
}

fn decode32(s: &str) -> Result<[u8; 32], KeyError> {
    let bytes = STANDARD.decode(s.trim()).map_err(|_| KeyError::Base64)?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Length(bytes.len()))
}

/// A peer's public key: its identity in the mesh.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    /// Base64, as `wg` prints it.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Short form is enough to tell peers apart in logs.
        let s = self.to_base64();
        write!(f, "PublicKey({}…)", &s[..8])
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        decode32(s).map(PublicKey)
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl From<&PrivateKey> for PublicKey {
    fn from(k: &PrivateKey) -> Self {
        k.public_key()
    }
}

/// A host's static private key. Never leaves the host; never printed by `Debug`.
#[derive(Clone)]
pub struct PrivateKey(x25519_dalek::StaticSecret);

impl PrivateKey {
    /// A fresh random key from the OS RNG.
    pub fn generate() -> Self {
        PrivateKey(x25519_dalek::StaticSecret::random_from_rng(
            rand_core::OsRng,
        ))
    }
    /// From raw bytes (clamped by X25519 on use).
    pub fn from_bytes(b: [u8; 32]) -> Self {
        PrivateKey(x25519_dalek::StaticSecret::from(b))
    }
    /// Base64, as `wg genkey` prints it.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0.to_bytes())
    }
    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519_dalek::PublicKey::from(&self.0).to_bytes())
    }
    /// The secret as boringtun's x25519 type.
    pub fn secret(&self) -> &x25519_dalek::StaticSecret {
        &self.0
    }
    /// Raw bytes (e.g. for a Noise handshake library).
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }
    /// X25519 with `peer`: the shared secret both ends compute (key rotation proofs).
    pub fn diffie_hellman(&self, peer: &PublicKey) -> [u8; 32] {
        self.0
            .diffie_hellman(&x25519_dalek::PublicKey::from(peer.0))
            .to_bytes()
    }
}

impl FromStr for PrivateKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        decode32(s).map(PrivateKey::from_bytes)
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_wg_pubkey() {
        // Vector from `echo ... | wg pubkey`.
        let sk: PrivateKey = "YNqHbfBQKaGvzefSSgmpj4cM1r0OTTr6YZ9n6M7KfW0="
            .parse()
            .unwrap();
        assert_eq!(
            sk.public_key().to_base64(),
            "AO2fJUVWS3wyUg1ZUSgCU/qk5PT5sEVaPLMGGNlGhmA="
        );
    }

    #[test]
    fn rejects_bad_keys() {
        assert_eq!("!!".parse::<PublicKey>(), Err(KeyError::Base64));
        assert_eq!("AAAA".parse::<PublicKey>(), Err(KeyError::Length(3)));
    }

    #[test]
    fn roundtrip() {
        let sk = PrivateKey::generate();
        let again: PrivateKey = sk.to_base64().parse().unwrap();
        assert_eq!(again.public_key(), sk.public_key());
    }
}
