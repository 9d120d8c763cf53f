//! Admin-signed statements (issue 17, signed policy): what admins sign with their Ed25519 keys
//! (held by meshctl, never by the coordinator), how the key set itself changes (a chain, each
//! link signed by a quorum of the previous set), and the agent's check ([`TrustStore`]): the
//! grants a coordinator sends are cut down to what the newest verified signed policy and the
//! signed host statements of both ends allow, so a coordinator can narrow or withhold, never
//! widen.
//!
//! Signatures cover [`Statement::canonical`], a fixed binary encoding (domain tag, a kind byte,
//! big-endian integers, length-prefixed strings, labels in key order), never the JSON that
//! carries them. Pure: no clock (times are passed in), no IO, no randomness (meshctl makes the
//! key seeds).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use meshd_policy::{PeerGrants, Policy};
use meshd_tunnel::PublicKey;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::map::NetworkMap;
use crate::model::Labels;

/// Domain separation for every signed byte string.
const DOMAIN: &[u8] = b"meshd-signed-v1\0";

/// Most keys in an admin key set.
pub const MAX_ADMIN_KEYS: usize = 32;

/// Domain separation for a host's key succession ([`Succession`]).
const SUCCESSION_DOMAIN: &[u8] = b"meshd-key-succession-v1\0";

/// Most key successions one host statement carries: at a daily rotation, two months before an
/// admin must sign the host's labels again (which starts a new chain at its current key).
pub const MAX_SUCCESSIONS: usize = 64;

/// A SHA-256 digest: content hashes, statement hashes, key-set fingerprints. Hex in text.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Hash32(pub [u8; 32]);

impl Hash32 {
    /// The all-zero hash: "no previous statement".
    pub const ZERO: Hash32 = Hash32([0; 32]);

    /// SHA-256 of `bytes`.
    pub fn of(bytes: &[u8]) -> Hash32 {
        Hash32(Sha256::digest(bytes).into())
    }
}

impl fmt::Display for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash32({self})")
    }
}

/// Why a text is not a hash, key or signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not 64 hex digits.
    #[error("expected 64 hex digits")]
    Hex,
    /// Not base64 of the right length.
    #[error("expected base64 of {0} bytes")]
    Base64(usize),
    /// Base64 of 32 bytes, but not a valid Ed25519 point.
    #[error("not a valid Ed25519 public key")]
    Point,
}

impl FromStr for Hash32 {
    type Err = DecodeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.len() != 64 || !s.is_ascii() {
            return Err(DecodeError::Hex);
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| DecodeError::Hex)?;
        }
        Ok(Hash32(out))
    }
}

impl Serialize for Hash32 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Hash32 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn b64_fixed<const N: usize>(s: &str) -> Result<[u8; N], DecodeError> {
    let v = STANDARD
        .decode(s.trim())
        .map_err(|_| DecodeError::Base64(N))?;
    v.try_into().map_err(|_| DecodeError::Base64(N))
}

/// An admin's Ed25519 public key (base64 in text).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AdminKey(pub [u8; 32]);

impl AdminKey {
    fn verifying(&self) -> Option<VerifyingKey> {
        VerifyingKey::from_bytes(&self.0).ok()
    }
}

impl fmt::Display for AdminKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for AdminKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AdminKey({self})")
    }
}

impl FromStr for AdminKey {
    type Err = DecodeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let k = AdminKey(b64_fixed::<32>(s)?);
        k.verifying().ok_or(DecodeError::Point)?;
        Ok(k)
    }
}

impl Serialize for AdminKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for AdminKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An admin's private signing key (meshctl only). `Debug` never shows it.
#[derive(Clone)]
pub struct AdminSigningKey(SigningKey);

impl AdminSigningKey {
    /// From a 32-byte seed (meshctl draws it from the OS).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        AdminSigningKey(SigningKey::from_bytes(&seed))
    }

    /// Parses a key file's text (base64 of the seed).
    pub fn from_text(s: &str) -> Result<Self, DecodeError> {
        Ok(Self::from_seed(b64_fixed::<32>(s)?))
    }

    /// The key file's text (base64 of the seed, one line).
    pub fn to_text(&self) -> String {
        format!("{}\n", STANDARD.encode(self.0.to_bytes()))
    }

    /// The public key.
    pub fn public(&self) -> AdminKey {
        AdminKey(self.0.verifying_key().to_bytes())
    }

    /// Signs `st`'s canonical bytes.
    pub fn sign(&self, st: &Statement) -> AdminSig {
        AdminSig {
            key: self.public(),
            sig: Sig(self.0.sign(&st.canonical()).to_bytes()),
        }
    }
}

impl fmt::Debug for AdminSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AdminSigningKey(public {})", self.public())
    }
}

/// 64 signature bytes (base64 in text).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sig(pub [u8; 64]);

impl fmt::Debug for Sig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sig({})", STANDARD.encode(self.0))
    }
}

impl Serialize for Sig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(self.0))
    }
}

impl<'de> Deserialize<'de> for Sig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        b64_fixed::<64>(&s)
            .map(Sig)
            .map_err(serde::de::Error::custom)
    }
}

/// One admin's signature over a statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminSig {
    /// Who signed.
    pub key: AdminKey,
    /// The signature over [`Statement::canonical`].
    pub sig: Sig,
}

/// The admin key set: who may sign, and how many must.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySetStatement {
    /// 1 for the first set, then +1 per change.
    pub seq: u64,
    /// The keys, sorted, no duplicates.
    pub keys: Vec<AdminKey>,
    /// Distinct signatures a statement needs (1 ..= keys).
    pub quorum: u32,
    /// Hash of the previous set's statement ([`Hash32::ZERO`] for the first).
    pub prev: Hash32,
    /// When it was signed (Unix milliseconds, meshctl's clock; informational).
    pub at_ms: u64,
}

/// One policy version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyStatement {
    /// The coordinator's policy version it becomes (agents accept only increasing ones).
    pub seq: u64,
    /// SHA-256 of the YAML, byte for byte.
    pub sha256: Hash32,
    /// Hash of the previous policy statement ([`Hash32::ZERO`] for the first).
    pub prev: Hash32,
    /// When it was signed (Unix milliseconds).
    pub at_ms: u64,
}

/// A host's identity as the policy sees it: its key, name and labels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStatement {
    /// The host's WireGuard key (what peers identify it by).
    pub key: PublicKey,
    /// Its name (selectors may name hosts).
    pub name: String,
    /// Its labels, exactly.
    pub labels: Labels,
    /// When it was signed (Unix milliseconds); agents accept only newer ones per key.
    pub at_ms: u64,
}

/// The runtime learning setting (`meshctl policy mode`), whole: learning widens access (a
/// would-deny flow passes), so in a signed mesh it is signed like a policy version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeStatement {
    /// 1 for the first signed setting, then +1 per change (agents accept only increasing ones).
    pub seq: u64,
    /// The whole mesh learns.
    pub all: bool,
    /// Label groups that learn (a host with all of a group's labels learns).
    pub groups: Vec<Labels>,
    /// Hash of the previous mode statement ([`Hash32::ZERO`] for the first).
    pub prev: Hash32,
    /// When it was signed (Unix milliseconds).
    pub at_ms: u64,
}

impl ModeStatement {
    /// As the policy compiler takes it (on top of the policy file's own learning).
    pub fn learning(&self) -> meshd_policy::Learning {
        meshd_policy::Learning {
            all: self.all,
            groups: self
                .groups
                .iter()
                .map(crate::state::group_selector)
                .collect(),
        }
    }
}

/// Something admins sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Statement {
    /// The admin key set.
    KeySet(KeySetStatement),
    /// A policy version.
    Policy(PolicyStatement),
    /// A host's name and labels.
    Host(HostStatement),
    /// The runtime learning setting.
    Mode(ModeStatement),
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_str(out: &mut Vec<u8>, s: &str) {
    // Strings here are bounded far below 4 GiB (names, labels); saturate rather than wrap.
    put_u32(out, u32::try_from(s.len()).unwrap_or(u32::MAX));
    out.extend_from_slice(s.as_bytes());
}

impl Statement {
    /// The bytes signatures cover.
    pub fn canonical(&self) -> Vec<u8> {
        let mut out = DOMAIN.to_vec();
        match self {
            Statement::KeySet(k) => {
                out.push(1);
                put_u64(&mut out, k.seq);
                put_u32(&mut out, k.quorum);
                put_u32(&mut out, u32::try_from(k.keys.len()).unwrap_or(u32::MAX));
                for key in &k.keys {
                    out.extend_from_slice(&key.0);
                }
                out.extend_from_slice(&k.prev.0);
                put_u64(&mut out, k.at_ms);
            }
            Statement::Policy(p) => {
                out.push(2);
                put_u64(&mut out, p.seq);
                out.extend_from_slice(&p.sha256.0);
                out.extend_from_slice(&p.prev.0);
                put_u64(&mut out, p.at_ms);
            }
            Statement::Host(h) => {
                out.push(3);
                out.extend_from_slice(h.key.as_bytes());
                put_str(&mut out, &h.name);
                put_u32(&mut out, u32::try_from(h.labels.len()).unwrap_or(u32::MAX));
                for (k, v) in &h.labels {
                    put_str(&mut out, k);
                    put_str(&mut out, v);
                }
                put_u64(&mut out, h.at_ms);
            }
            Statement::Mode(m) => {
                out.push(4);
                put_u64(&mut out, m.seq);
                out.push(u8::from(m.all));
                put_u32(&mut out, u32::try_from(m.groups.len()).unwrap_or(u32::MAX));
                for g in &m.groups {
                    put_u32(&mut out, u32::try_from(g.len()).unwrap_or(u32::MAX));
                    for (k, v) in g {
                        put_str(&mut out, k);
                        put_str(&mut out, v);
                    }
                }
                out.extend_from_slice(&m.prev.0);
                put_u64(&mut out, m.at_ms);
            }
        }
        out
    }

    /// SHA-256 of [`Statement::canonical`]: what the next statement's `prev` names, and (for a
    /// key set) its fingerprint.
    pub fn hash(&self) -> Hash32 {
        Hash32::of(&self.canonical())
    }

    /// Short name of the kind (`key_set`, `policy`, `host`).
    pub fn kind(&self) -> &'static str {
        match self {
            Statement::KeySet(_) => "key_set",
            Statement::Policy(_) => "policy",
            Statement::Host(_) => "host",
            Statement::Mode(_) => "mode",
        }
    }
}

/// A statement with its signatures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    /// What is signed.
    pub statement: Statement,
    /// Signatures (one per key; extra or unknown ones are ignored).
    pub sigs: Vec<AdminSig>,
    /// Host statements only: the host's own key successions since the statement's key, oldest
    /// first (key rotation in a signed mesh). Not covered by the admins' signatures: each link
    /// is signed by the key before it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub successions: Vec<Succession>,
}

/// A host handing its identity on to its next WireGuard key (key rotation in a signed mesh):
/// the previous key's XEdDSA signature over [`succession_message`]. Only the holder of the
/// previous private key can make one — not the coordinator — so a chain of them from the key an
/// admin signed a [`HostStatement`] for lets peers accept the rotated key as the same host
/// without an admin online.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Succession {
    /// The key that takes over.
    pub new_key: PublicKey,
    /// XEdDSA signature by the previous key.
    pub sig: Sig,
}

/// The bytes a [`Succession`] signature covers: domain tag, old key, new key.
pub fn succession_message(old: &PublicKey, new: &PublicKey) -> Vec<u8> {
    let mut out = SUCCESSION_DOMAIN.to_vec();
    out.extend_from_slice(old.as_bytes());
    out.extend_from_slice(new.as_bytes());
    out
}

impl Succession {
    /// `old` hands on to `new_key` (`rng`: the OS's, for XEdDSA's random nonce).
    pub fn sign(
        old: &meshd_tunnel::PrivateKey,
        new_key: PublicKey,
        rng: impl rand_core::RngCore + rand_core::CryptoRng,
    ) -> Succession {
        use xeddsa::Sign as _;
        let key = xeddsa::xed25519::PrivateKey::from(&old.to_bytes());
        let sig: [u8; 64] = key.sign(&succession_message(&old.public_key(), &new_key), rng);
        Succession {
            new_key,
            sig: Sig(sig),
        }
    }

    /// Whether `old` signed this succession. Strict: a key that maps to a weak (small-order)
    /// Ed25519 point, or a non-canonical signature, never verifies.
    pub fn verify(&self, old: &PublicKey) -> bool {
        use xeddsa::ConvertMont as _;
        let Ok(ed) = xeddsa::xed25519::PublicKey(*old.as_bytes()).convert_mont(0) else {
            return false;
        };
        let Ok(vk) = VerifyingKey::from_bytes(&ed) else {
            return false;
        };
        if vk.is_weak() || old == &self.new_key {
            return false;
        }
        let sig = ed25519_dalek::Signature::from_bytes(&self.sig.0);
        vk.verify_strict(&succession_message(old, &self.new_key), &sig)
            .is_ok()
    }
}

/// Why a signed statement or a key-set change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    /// Fewer valid signatures by distinct keys of the set than its quorum.
    #[error("{valid} valid signature(s) by the admin key set, {quorum} needed")]
    Quorum {
        /// Valid signatures by distinct keys of the set.
        valid: usize,
        /// The set's quorum.
        quorum: u32,
    },
    /// Another kind of statement than the operation needs.
    #[error("expected a {expected} statement, got {got}")]
    Kind {
        /// Needed.
        expected: &'static str,
        /// Given.
        got: &'static str,
    },
    /// A key set that is empty, unsorted, too big, or whose quorum is out of range.
    #[error("invalid key set: {0}")]
    BadKeySet(&'static str),
    /// Not the successor of the current statement (`seq` or `prev`).
    #[error("not the next statement: expected seq {seq} after {prev}")]
    NotNext {
        /// Expected sequence number.
        seq: u64,
        /// Expected previous hash.
        prev: Hash32,
    },
    /// The content does not match the hash signed.
    #[error("content does not match the signed hash")]
    ContentMismatch,
    /// The statement is about another host.
    #[error("statement is for another host key or name")]
    WrongHost,
    /// Not newer than what is already held.
    #[error("not newer than the statement already held (replayed or reordered)")]
    Stale,
    /// A key succession not signed by the key before it (the chain stops there).
    #[error("key succession to {0} not signed by the key before it")]
    Succession(PublicKey),
    /// More key successions than [`MAX_SUCCESSIONS`] (an admin must sign the host again).
    #[error(
        "more than {MAX_SUCCESSIONS} key successions: an admin must sign the host's labels again"
    )]
    TooManySuccessions,
}

impl Signed {
    /// `st` signed by each of `keys`.
    pub fn sign(st: Statement, keys: &[&AdminSigningKey]) -> Signed {
        let sigs = keys.iter().map(|k| k.sign(&st)).collect();
        Signed {
            statement: st,
            sigs,
            successions: Vec::new(),
        }
    }

    /// The keys a host statement speaks for: its own, then each successor whose link verifies,
    /// in order, with why the chain stops early (a bad link, or too many). Empty for other
    /// kinds.
    pub fn host_keys(&self) -> (Vec<PublicKey>, Option<SignError>) {
        let Ok(h) = self.host() else {
            return (Vec::new(), None);
        };
        let mut keys = vec![h.key];
        for (i, s) in self.successions.iter().enumerate() {
            if i >= MAX_SUCCESSIONS {
                return (keys, Some(SignError::TooManySuccessions));
            }
            let prev = keys[keys.len() - 1];
            if keys.contains(&s.new_key) || !s.verify(&prev) {
                return (keys, Some(SignError::Succession(s.new_key)));
            }
            keys.push(s.new_key);
        }
        (keys, None)
    }

    /// The last key of a host statement's succession chain (its own key when it has none).
    pub fn current_key(&self) -> Option<PublicKey> {
        self.host_keys().0.last().copied()
    }

    /// Valid signatures by distinct keys of `set`.
    pub fn valid_signers(&self, set: &KeySetStatement) -> usize {
        let msg = self.statement.canonical();
        let mut seen: Vec<AdminKey> = Vec::new();
        for s in &self.sigs {
            if seen.contains(&s.key) || set.keys.binary_search(&s.key).is_err() {
                continue;
            }
            let Some(vk) = s.key.verifying() else {
                continue;
            };
            let sig = ed25519_dalek::Signature::from_bytes(&s.sig.0);
            if vk.verify_strict(&msg, &sig).is_ok() {
                seen.push(s.key);
            }
        }
        seen.len()
    }

    /// Ok if a quorum of `set` signed it.
    pub fn verify(&self, set: &KeySetStatement) -> Result<(), SignError> {
        let valid = self.valid_signers(set);
        if valid >= set.quorum as usize && set.quorum >= 1 {
            Ok(())
        } else {
            Err(SignError::Quorum {
                valid,
                quorum: set.quorum,
            })
        }
    }

    /// The key set inside, or a kind error.
    pub fn key_set(&self) -> Result<&KeySetStatement, SignError> {
        match &self.statement {
            Statement::KeySet(k) => Ok(k),
            other => Err(SignError::Kind {
                expected: "key_set",
                got: other.kind(),
            }),
        }
    }

    /// The policy statement inside, or a kind error.
    pub fn policy(&self) -> Result<&PolicyStatement, SignError> {
        match &self.statement {
            Statement::Policy(p) => Ok(p),
            other => Err(SignError::Kind {
                expected: "policy",
                got: other.kind(),
            }),
        }
    }

    /// The mode statement inside, or a kind error.
    pub fn mode(&self) -> Result<&ModeStatement, SignError> {
        match &self.statement {
            Statement::Mode(m) => Ok(m),
            other => Err(SignError::Kind {
                expected: "mode",
                got: other.kind(),
            }),
        }
    }

    /// The host statement inside, or a kind error.
    pub fn host(&self) -> Result<&HostStatement, SignError> {
        match &self.statement {
            Statement::Host(h) => Ok(h),
            other => Err(SignError::Kind {
                expected: "host",
                got: other.kind(),
            }),
        }
    }
}

/// Structural checks of a key set: 1..=[`MAX_ADMIN_KEYS`] sorted distinct keys, 1 ≤ quorum ≤ keys.
pub fn check_key_set(k: &KeySetStatement) -> Result<(), SignError> {
    if k.keys.is_empty() {
        return Err(SignError::BadKeySet("no keys"));
    }
    if k.keys.len() > MAX_ADMIN_KEYS {
        return Err(SignError::BadKeySet("too many keys"));
    }
    if k.keys.windows(2).any(|w| w[0] >= w[1]) {
        return Err(SignError::BadKeySet("keys not sorted and distinct"));
    }
    if k.quorum == 0 || k.quorum as usize > k.keys.len() {
        return Err(SignError::BadKeySet(
            "quorum must be between 1 and the number of keys",
        ));
    }
    Ok(())
}

/// The first key set (trust on first use): seq 1, no previous, signed by a quorum of itself
/// (each signer proves it holds its key).
pub fn check_genesis(s: &Signed) -> Result<(), SignError> {
    let k = s.key_set()?;
    check_key_set(k)?;
    if k.seq != 1 || k.prev != Hash32::ZERO {
        return Err(SignError::NotNext {
            seq: 1,
            prev: Hash32::ZERO,
        });
    }
    s.verify(k)
}

/// `next` may follow `current` in the key-set chain: seq + 1, `prev` = hash of `current`,
/// signed by a quorum of `current`.
pub fn check_successor(current: &Signed, next: &Signed) -> Result<(), SignError> {
    let cur = current.key_set()?;
    let k = next.key_set()?;
    check_key_set(k)?;
    let (seq, prev) = (cur.seq.saturating_add(1), current.statement.hash());
    if k.seq != seq || k.prev != prev {
        return Err(SignError::NotNext { seq, prev });
    }
    next.verify(cur)
}

/// A policy file with its signed statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedPolicy {
    /// The file as applied.
    pub yaml: String,
    /// Its [`PolicyStatement`], signed.
    pub signed: Signed,
}

/// What the coordinator forwards to an agent before a map or delta
/// ([`CoordinatorMessage::Trust`](crate::proto::CoordinatorMessage::Trust)).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TrustBundle {
    /// The admin key-set chain, oldest first.
    pub key_sets: Vec<Signed>,
    /// The current signed policy (absent when the agent was already sent it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<SignedPolicy>,
    /// Host statements: the agent's own and those of the peers in the map that follows.
    #[serde(default)]
    pub hosts: Vec<Signed>,
    /// The current signed runtime learning setting (absent: none was signed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Signed>,
}

/// Why (part of) an update was not applied as sent: a widening no admin signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The pinned key set is not in the chain the coordinator sent.
    #[error("the pinned admin key set {0} is not in the chain sent")]
    PinNotOffered(Hash32),
    /// The coordinator sent no key set although this agent holds one.
    #[error("no admin key set sent (this agent trusts {0})")]
    NoKeySet(Hash32),
    /// A link of the key-set chain failed.
    #[error("admin key-set change refused: {0}")]
    KeySet(SignError),
    /// The policy statement failed.
    #[error("policy version refused: {0}")]
    Policy(SignError),
    /// The signed policy does not parse.
    #[error("signed policy does not parse")]
    PolicyParse,
    /// The runtime learning setting failed.
    #[error("learning mode setting refused: {0}")]
    Mode(SignError),
    /// A host statement failed.
    #[error("host statement for {name} refused: {why}")]
    Host {
        /// The statement's host name.
        name: String,
        /// Why.
        why: SignError,
    },
    /// Grants to a peer beyond what the signed statements allow were cut.
    #[error("grants with {peer} not covered by the signed policy and labels")]
    Grants {
        /// The peer's name.
        peer: String,
    },
}

/// What an agent has verified: the key set it follows, the newest signed policy and host
/// statements. Serde-able so the agent keeps it across restarts (statements only move forward).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrustStore {
    /// Fingerprint of the key set trusted first (from the join token, or the first one sent).
    pub pin: Option<Hash32>,
    /// The newest key set verified from the pin.
    #[serde(default)]
    key_set: Option<Signed>,
    /// The newest verified policy.
    #[serde(default)]
    policy: Option<SignedPolicy>,
    /// The newest verified host statement per key.
    #[serde(default)]
    hosts: BTreeMap<PublicKey, Signed>,
    /// The newest verified runtime learning setting.
    #[serde(default)]
    mode: Option<Signed>,
    #[serde(skip)]
    parsed: Option<Policy>,
}

/// What [`TrustStore::absorb`] learnt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use]
pub struct Absorbed {
    /// The store pinned the first key set it was sent (trust on first use).
    pub pinned_first: Option<Hash32>,
    /// Statements refused.
    pub refused: Vec<Refusal>,
}

impl TrustStore {
    /// A store pinned to a key-set fingerprint (from the join token).
    pub fn pinned(pin: Hash32) -> Self {
        TrustStore {
            pin: Some(pin),
            ..TrustStore::default()
        }
    }

    /// Whether maps are checked (a key set is pinned).
    pub fn is_active(&self) -> bool {
        self.pin.is_some()
    }

    /// The version of the newest verified signed policy.
    pub fn policy_version(&self) -> Option<u64> {
        self.policy
            .as_ref()
            .and_then(|p| p.signed.policy().ok().map(|s| s.seq))
    }

    /// The key set followed now.
    pub fn key_set(&self) -> Option<&KeySetStatement> {
        self.key_set.as_ref().and_then(|s| s.key_set().ok())
    }

    /// Takes what verifies from `b`; keeps what it held for the rest.
    pub fn absorb(&mut self, b: &TrustBundle) -> Absorbed {
        let mut out = Absorbed::default();
        self.absorb_key_sets(&b.key_sets, &mut out);
        let Some(set) = self.key_set().cloned() else {
            return out;
        };
        if let Some(p) = &b.policy {
            if let Err(r) = self.absorb_policy(p, &set) {
                out.refused.push(r);
            }
        }
        for h in &b.hosts {
            if let Err(r) = self.absorb_host(h, &set) {
                out.refused.push(r);
            }
        }
        if let Some(m) = &b.mode {
            if let Err(r) = self.absorb_mode(m, &set) {
                out.refused.push(r);
            }
        }
        out
    }

    fn absorb_mode(&mut self, s: &Signed, set: &KeySetStatement) -> Result<(), Refusal> {
        let st = s.mode().map_err(Refusal::Mode)?;
        if let Some(held) = &self.mode {
            if held == s {
                return Ok(());
            }
            if held.mode().map_or(0, |m| m.seq) >= st.seq {
                return Err(Refusal::Mode(SignError::Stale));
            }
        }
        s.verify(set).map_err(Refusal::Mode)?;
        self.mode = Some(s.clone());
        Ok(())
    }

    /// The sequence number of the newest verified runtime learning setting.
    pub fn mode_seq(&self) -> Option<u64> {
        self.mode
            .as_ref()
            .and_then(|m| m.mode().ok())
            .map(|m| m.seq)
    }

    fn absorb_key_sets(&mut self, chain: &[Signed], out: &mut Absorbed) {
        let start = match (&self.key_set, self.pin) {
            (Some(cur), _) => {
                let h = cur.statement.hash();
                match chain.iter().position(|s| s.statement.hash() == h) {
                    Some(i) => i,
                    None => {
                        out.refused.push(Refusal::NoKeySet(h));
                        return;
                    }
                }
            }
            (None, Some(pin)) => {
                match chain
                    .iter()
                    .position(|s| s.statement.hash() == pin && s.key_set().is_ok())
                {
                    Some(i) => i,
                    None => {
                        out.refused.push(Refusal::PinNotOffered(pin));
                        return;
                    }
                }
            }
            (None, None) => {
                let Some(first) = chain.first() else {
                    return;
                };
                if let Err(e) = check_genesis(first) {
                    out.refused.push(Refusal::KeySet(e));
                    return;
                }
                let pin = first.statement.hash();
                self.pin = Some(pin);
                out.pinned_first = Some(pin);
                0
            }
        };
        let mut cur = chain[start].clone();
        for next in &chain[start + 1..] {
            if let Err(e) = check_successor(&cur, next) {
                out.refused.push(Refusal::KeySet(e));
                break;
            }
            cur = next.clone();
        }
        self.key_set = Some(cur);
    }

    fn absorb_policy(&mut self, p: &SignedPolicy, set: &KeySetStatement) -> Result<(), Refusal> {
        let st = p.signed.policy().map_err(Refusal::Policy)?;
        if let Some(held) = &self.policy {
            if held.signed == p.signed && held.yaml == p.yaml {
                return Ok(());
            }
            let held_seq = held.signed.policy().map(|s| s.seq).unwrap_or(0);
            if st.seq <= held_seq {
                return Err(Refusal::Policy(SignError::Stale));
            }
        }
        if Hash32::of(p.yaml.as_bytes()) != st.sha256 {
            return Err(Refusal::Policy(SignError::ContentMismatch));
        }
        p.signed.verify(set).map_err(Refusal::Policy)?;
        let parsed = Policy::parse(&p.yaml).map_err(|_| Refusal::PolicyParse)?;
        self.policy = Some(p.clone());
        self.parsed = Some(parsed);
        Ok(())
    }

    /// A host statement: verified against `set` (unless the same statement is held), kept under
    /// its key, and under each successor key of its verified succession chain. A statement an
    /// admin signed for a key always wins over a chain that reaches that key; between chains,
    /// the newer statement's.
    fn absorb_host(&mut self, s: &Signed, set: &KeySetStatement) -> Result<(), Refusal> {
        let name = |s: &Signed| s.host().map(|h| h.name.clone()).unwrap_or_default();
        let h = s
            .host()
            .map_err(|why| Refusal::Host { name: name(s), why })?;
        let refuse = |why| Refusal::Host {
            name: h.name.clone(),
            why,
        };
        let held = self.hosts.get(&h.key).filter(|x| is_direct(x, &h.key));
        if held == Some(s) {
            return Ok(());
        }
        let same_statement = held.is_some_and(|x| x.statement == s.statement);
        if let Some(x) = held.filter(|_| !same_statement) {
            if x.host().map(|x| x.at_ms).unwrap_or(0) >= h.at_ms {
                return Err(refuse(SignError::Stale));
            }
        }
        if !same_statement {
            s.verify(set).map_err(refuse)?;
        }
        let (keys, broken) = s.host_keys();
        self.hosts.insert(h.key, s.clone());
        for k in keys.iter().skip(1) {
            let keep = self.hosts.get(k).is_some_and(|x| {
                is_direct(x, k) || x.host().map(|x| x.at_ms).unwrap_or(0) > h.at_ms
            });
            if !keep {
                self.hosts.insert(*k, s.clone());
            }
        }
        broken.map_or(Ok(()), |why| Err(refuse(why)))
    }

    /// The signed identity (name, labels) of key `k`: the statement an admin signed for it, or
    /// one whose succession chain reaches it — unless an admin has since signed a newer
    /// statement for that name on another key (a chain from a retired key cannot outlive it).
    fn identity(&self, k: &PublicKey) -> Option<&HostStatement> {
        let h = self.hosts.get(k)?.host().ok()?;
        if h.key != *k {
            let superseded = self.hosts.iter().any(|(key, o)| {
                o.host().is_ok_and(|o| {
                    o.key == *key && o.key != h.key && o.name == h.name && o.at_ms > h.at_ms
                })
            });
            if superseded {
                return None;
            }
        }
        Some(h)
    }

    /// Forgets host statements of keys that are neither `own` nor a peer's key (or next key) in
    /// `map` (keeps the store bounded by the map).
    pub fn retain_hosts(&mut self, own: &PublicKey, map: &NetworkMap) {
        let next: std::collections::BTreeSet<PublicKey> =
            map.peers.iter().filter_map(|p| p.next_public_key).collect();
        self.hosts
            .retain(|k, _| k == own || map.peer(k).is_some() || next.contains(k));
    }

    fn policy_parsed(&mut self) -> Option<&Policy> {
        if self.parsed.is_none() {
            self.parsed = self
                .policy
                .as_ref()
                .and_then(|p| Policy::parse(&p.yaml).ok());
        }
        self.parsed.as_ref()
    }

    /// The grants the signed statements allow between `own` and `peer` (nothing when any of
    /// the policy, `own`'s or `peer`'s statement is missing).
    pub fn signed_grants(&mut self, own: &PublicKey, peer: &PublicKey) -> PeerGrants {
        let refs =
            [own, peer].map(|k| self.identity(k).map(|h| (h.name.clone(), h.labels.clone())));
        let [Some(me), Some(them)] = refs else {
            return PeerGrants::default();
        };
        let learning = self
            .mode
            .as_ref()
            .and_then(|m| m.mode().ok())
            .map(ModeStatement::learning)
            .unwrap_or_default();
        let Some(policy) = self.policy_parsed() else {
            return PeerGrants::default();
        };
        let hosts = [
            meshd_policy::HostRef {
                id: 1,
                name: me.0,
                labels: me.1,
            },
            meshd_policy::HostRef {
                id: 2,
                name: them.0,
                labels: them.1,
            },
        ];
        // Compiled at time 0: no rule counts as expired, so expiry is the coordinator's to
        // narrow (grants carry `expires_at`, which the agent enforces itself).
        meshd_policy::compile_with(policy, &learning, &hosts, 0).grants_between(1, 2)
    }

    /// `map` as this agent may apply it: every peer's grants cut to what the signed statements
    /// allow, peers left with nothing dropped. Inactive stores pass the map through.
    pub fn filter(&mut self, own: &PublicKey, map: &NetworkMap) -> (NetworkMap, Vec<Refusal>) {
        if !self.is_active() {
            return (map.clone(), Vec::new());
        }
        let mut refused = Vec::new();
        let mut peers = Vec::with_capacity(map.peers.len());
        for p in &map.peers {
            let allowed = self.signed_grants(own, &p.public_key);
            let cut = intersect(&p.grants, &allowed);
            if cut != p.grants {
                refused.push(Refusal::Grants {
                    peer: p.name.clone(),
                });
            }
            if cut.is_empty() && !cut.learn {
                continue;
            }
            // A next key (key rotation) would be accepted as this peer: only one with the same
            // signed identity (the host's own succession, or an admin's statement), or the
            // coordinator could slip its own key in.
            let who = |k: &PublicKey| self.identity(k).map(|h| (h.name.clone(), h.labels.clone()));
            let unsigned_next = p
                .next_public_key
                .is_some_and(|k| who(&k).is_none() || who(&k) != who(&p.public_key));
            if unsigned_next {
                refused.push(Refusal::Grants {
                    peer: p.name.clone(),
                });
            }
            if cut == p.grants && !unsigned_next {
                // Nothing cut: the shared record as it came.
                peers.push(p.clone());
                continue;
            }
            let mut p = crate::map::Peer::clone(p);
            p.grants = cut;
            if unsigned_next {
                p.next_public_key = None;
            }
            peers.push(std::sync::Arc::new(p));
        }
        (
            NetworkMap {
                version: map.version,
                peers,
            },
            refused,
        )
    }
}

/// Whether `s` is the statement an admin signed for `key` itself (not one reaching it through a
/// succession chain).
fn is_direct(s: &Signed, key: &PublicKey) -> bool {
    s.host().is_ok_and(|h| h.key == *key)
}

/// The grants of `sent` that `allowed` also holds (learning only if both learn).
pub fn intersect(sent: &PeerGrants, allowed: &PeerGrants) -> PeerGrants {
    PeerGrants {
        outbound: sent
            .outbound
            .iter()
            .filter(|g| allowed.outbound.contains(g))
            .cloned()
            .collect(),
        inbound: sent
            .inbound
            .iter()
            .filter(|g| allowed.inbound.contains(g))
            .cloned()
            .collect(),
        learn: sent.learn && allowed.learn,
        // Denies only narrow: keep every deny either side names.
        deny: meshd_policy::PeerDenies {
            outbound: union(&sent.deny.outbound, &allowed.deny.outbound),
            inbound: union(&sent.deny.inbound, &allowed.deny.inbound),
        },
    }
}

fn union(a: &[meshd_policy::Grant], b: &[meshd_policy::Grant]) -> Vec<meshd_policy::Grant> {
    let mut out = a.to_vec();
    out.extend(b.iter().filter(|g| !a.contains(g)).cloned());
    out
}

#[cfg(test)]
mod tests;
