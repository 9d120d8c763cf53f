//! Host key rotation (issue 17): the proof a rotating host gives, the per-label-group period,
//! and the coordinator's per-host rotation state machine. Pure: time is passed in.
//!
//! The exchange, over the control channel the host authenticated with its old key:
//!
//! ```text
//!  coordinator                                  agent (old key K, coordinator key C pinned)
//!   start(now, nonce) ── RotateKey{nonce} ────▶ makes N, writes it durably (0600)
//!                     ◀── KeyProposal{nonce, N, proof = HMAC(DH(n, C), label‖nonce‖K‖N)}
//!   verify, commit pending = N (store first),
//!   peers' maps: next_public_key = N  ─────────▶ peers accept K and N (same identity)
//!                     ── KeyAccepted{N, after} ▶ waits `after`, switches its device to N
//!                                               (peers' N entries take over on its first
//!                                               handshake), reconnects with N
//!   Resume from N: key = N, pending = none;
//!   peers' maps: key N, K removed
//! ```
//!
//! The control channel (Noise IK with K) proves the old key; the MAC proves the new one
//! (only the holder of n and the coordinator can compute DH(n, C)). A request not answered
//! within [`PROOF_TIMEOUT`], or a proved key not switched to within [`SWITCH_GRACE`], is
//! aborted: peers drop the next key and the host keeps its old one.

use std::collections::BTreeMap;
use std::fmt;

use hmac::{Hmac, Mac};
use meshd_tunnel::{PrivateKey, PublicKey};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::model::{HostId, Labels, UnixTime};

/// How long a host may take to answer a rotation request with its proof (seconds).
pub const PROOF_TIMEOUT: u64 = 30;
/// How long a proved key may stay pending before the rotation is aborted (seconds): the host
/// must have switched and reconnected with it by then.
pub const SWITCH_GRACE: u64 = 120;
/// How long the host waits after `KeyAccepted` before it switches, so its peers have applied
/// the map that carries its next key (milliseconds).
pub const SWITCH_AFTER_MS: u64 = 1500;
/// Shortest rotation period accepted in the configuration (seconds).
pub const MIN_PERIOD: u64 = 60;

const LABEL: &[u8] = b"meshd key rotation v1";

/// A rotation request's random challenge (hex on the wire).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Nonce(pub [u8; 32]);

impl fmt::Debug for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Nonce({})", hex(&self.0[..4]))
    }
}

impl Serialize for Nonce {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex(&self.0))
    }
}

impl<'de> Deserialize<'de> for Nonce {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        unhex32(&s)
            .map(Nonce)
            .ok_or_else(|| serde::de::Error::custom("nonce: expected 64 hex digits"))
    }
}

/// The MAC that proves the holder of the new key (hex on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proof(pub [u8; 32]);

impl Serialize for Proof {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex(&self.0))
    }
}

impl<'de> Deserialize<'de> for Proof {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        unhex32(&s)
            .map(Proof)
            .ok_or_else(|| serde::de::Error::custom("proof: expected 64 hex digits"))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn mac(shared: &[u8; 32], nonce: &Nonce, old: &PublicKey, new: &PublicKey) -> Hmac<Sha256> {
    // HMAC takes a key of any length: this cannot fail.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(shared)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    m.update(LABEL);
    m.update(&nonce.0);
    m.update(old.as_bytes());
    m.update(new.as_bytes());
    m
}

/// A host's answer to a rotation request, as the coordinator's state takes it
/// ([`CoordinatorState::key_proposal`](crate::state::CoordinatorState::key_proposal)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proposal {
    /// The request's challenge.
    pub nonce: Nonce,
    /// The proposed key.
    pub new_key: PublicKey,
    /// [`verify`]'s verdict on the proof (the caller holds the coordinator's key).
    pub proof_ok: bool,
    /// The old key's signature over the new one ([`crate::signed::Succession`]).
    pub succession: Option<crate::signed::Sig>,
}

/// The agent's proof that it holds `new` (sent over the channel authenticated by `old`).
pub fn prove(new: &PrivateKey, coordinator: &PublicKey, old: &PublicKey, nonce: &Nonce) -> Proof {
    let shared = new.diffie_hellman(coordinator);
    let out = mac(&shared, nonce, old, &new.public_key())
        .finalize()
        .into_bytes();
    let mut p = [0u8; 32];
    p.copy_from_slice(&out);
    Proof(p)
}

/// The coordinator's check of [`prove`] (constant time).
pub fn verify(
    coordinator: &PrivateKey,
    old: &PublicKey,
    new: &PublicKey,
    nonce: &Nonce,
    proof: &Proof,
) -> bool {
    let shared = coordinator.diffie_hellman(new);
    // An all-zero shared secret means a low-order "key": never a real one.
    if shared == [0u8; 32] {
        return false;
    }
    mac(&shared, nonce, old, new).verify_slice(&proof.0).is_ok()
}

/// One `[[key_rotation]]` group: hosts matching every label of `selector` rotate every
/// `period` seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationGroup {
    /// Labels a host must all have.
    pub selector: Labels,
    /// Seconds between rotations.
    pub period: u64,
}

/// When hosts rotate automatically: the first matching group's period, else the default;
/// neither: never (only `meshctl host rotate-key`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RotationSchedule {
    /// The global period (`key_rotation = "24h"`).
    pub default: Option<u64>,
    /// Per label group, first match wins.
    pub groups: Vec<RotationGroup>,
}

impl RotationSchedule {
    /// The period for a host with these labels.
    pub fn period_for(&self, labels: &Labels) -> Option<u64> {
        self.groups
            .iter()
            .find(|g| g.selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
            .map(|g| g.period)
            .or(self.default)
    }

    /// Whether any host can be due (so the caller needs a timer at all).
    pub fn is_active(&self) -> bool {
        self.default.is_some() || !self.groups.is_empty()
    }

    /// Whether a host whose key dates from `since` is due at `now`.
    pub fn due(&self, labels: &Labels, since: UnixTime, now: UnixTime) -> bool {
        self.period_for(labels)
            .is_some_and(|p| now >= since.saturating_add(p))
    }
}

/// Where one host's rotation is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Asked at `at`; waiting for the proof.
    Requested {
        /// The challenge.
        nonce: Nonce,
        /// When.
        at: UnixTime,
    },
    /// `new_key` proved and committed at `at`: peers accept both keys; waiting for the host
    /// to reconnect with it.
    Proved {
        /// The next key.
        new_key: PublicKey,
        /// When.
        at: UnixTime,
    },
}

/// Why a rotation step was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RotationError {
    /// A rotation of this host is already under way.
    #[error("a key rotation of this host is already in progress")]
    InProgress,
    /// A proposal without a request (or for another nonce, or too late).
    #[error("no key rotation was requested with this nonce (or it timed out)")]
    NotRequested,
    /// The MAC does not prove the new key.
    #[error("the proof of the new key does not verify")]
    BadProof,
    /// The proposed key is the old one, another host's, or refused.
    #[error("the proposed key is already in use")]
    KeyInUse,
}

/// A rotation that ended without completing (from [`Rotations::expire`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aborted {
    /// The host.
    pub host: HostId,
    /// The key that was pending, if one had been proved (peers must drop it).
    pub pending: Option<PublicKey>,
    /// Why.
    pub reason: &'static str,
}

/// Every host's rotation in progress.
#[derive(Debug, Clone, Default)]
pub struct Rotations {
    by_host: BTreeMap<HostId, Phase>,
}

impl Rotations {
    /// The phase of `host`'s rotation, if one is under way.
    pub fn phase(&self, host: HostId) -> Option<&Phase> {
        self.by_host.get(&host)
    }

    /// Hosts rotating now.
    pub fn len(&self) -> usize {
        self.by_host.len()
    }

    /// No rotation under way.
    pub fn is_empty(&self) -> bool {
        self.by_host.is_empty()
    }

    /// A restarted coordinator: `host` has `key` pending since `at` (from the store).
    pub fn restore_pending(&mut self, host: HostId, key: PublicKey, at: UnixTime) {
        self.by_host
            .insert(host, Phase::Proved { new_key: key, at });
    }

    /// Starts a rotation with challenge `nonce`. Refused while one is under way.
    pub fn request(
        &mut self,
        host: HostId,
        nonce: Nonce,
        now: UnixTime,
    ) -> Result<(), RotationError> {
        if self.by_host.contains_key(&host) {
            return Err(RotationError::InProgress);
        }
        self.by_host
            .insert(host, Phase::Requested { nonce, at: now });
        Ok(())
    }

    /// The host answered with `new_key`; `proof_ok` is [`verify`]'s verdict and `key_free`
    /// whether no host has (or had revoked) that key. On success the key is pending.
    pub fn propose(
        &mut self,
        host: HostId,
        nonce: &Nonce,
        new_key: PublicKey,
        proof_ok: bool,
        key_free: bool,
        now: UnixTime,
    ) -> Result<(), RotationError> {
        match self.by_host.get(&host) {
            Some(Phase::Requested { nonce: n, at })
                if n == nonce && now <= at.saturating_add(PROOF_TIMEOUT) => {}
            _ => return Err(RotationError::NotRequested),
        }
        if !proof_ok {
            self.by_host.remove(&host);
            return Err(RotationError::BadProof);
        }
        if !key_free {
            self.by_host.remove(&host);
            return Err(RotationError::KeyInUse);
        }
        self.by_host
            .insert(host, Phase::Proved { new_key, at: now });
        Ok(())
    }

    /// The host connected with `key`: true (and the rotation is over) if it is its pending
    /// key.
    pub fn complete(&mut self, host: HostId, key: &PublicKey) -> bool {
        match self.by_host.get(&host) {
            Some(Phase::Proved { new_key, .. }) if new_key == key => {
                self.by_host.remove(&host);
                true
            }
            _ => false,
        }
    }

    /// The host whose pending key is `key`.
    pub fn host_pending(&self, key: &PublicKey) -> Option<HostId> {
        self.by_host.iter().find_map(|(h, p)| match p {
            Phase::Proved { new_key, .. } if new_key == key => Some(*h),
            _ => None,
        })
    }

    /// Forgets `host`'s rotation (removed, revoked); returns the pending key, if any.
    pub fn cancel(&mut self, host: HostId) -> Option<PublicKey> {
        match self.by_host.remove(&host)? {
            Phase::Proved { new_key, .. } => Some(new_key),
            Phase::Requested { .. } => None,
        }
    }

    /// Ends the rotations that timed out at `now`.
    pub fn expire(&mut self, now: UnixTime) -> Vec<Aborted> {
        let mut out = Vec::new();
        self.by_host.retain(|&host, p| match *p {
            Phase::Requested { at, .. } if now > at.saturating_add(PROOF_TIMEOUT) => {
                out.push(Aborted {
                    host,
                    pending: None,
                    reason: "no proof of a new key in time",
                });
                false
            }
            Phase::Proved { new_key, at } if now > at.saturating_add(SWITCH_GRACE) => {
                out.push(Aborted {
                    host,
                    pending: Some(new_key),
                    reason: "the host did not reconnect with its new key in time",
                });
                false
            }
            _ => true,
        });
        out
    }

    /// When [`expire`](Self::expire) next has something to do.
    pub fn poll_timeout(&self) -> Option<UnixTime> {
        self.by_host
            .values()
            .map(|p| match *p {
                Phase::Requested { at, .. } => at.saturating_add(PROOF_TIMEOUT + 1),
                Phase::Proved { at, .. } => at.saturating_add(SWITCH_GRACE + 1),
            })
            .min()
    }
}

/// Parses a rotation period (`24h`, `7d`, `90m`, `3600s`), at least [`MIN_PERIOD`].
pub fn parse_period(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. \"24h\", \"7d\")"))?;
    let mul = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use s, m, h or d)")),
    };
    let secs = n
        .checked_mul(mul)
        .ok_or_else(|| format!("{s:?} is too long"))?;
    if secs < MIN_PERIOD {
        return Err(format!(
            "{s:?} is shorter than the minimum of {MIN_PERIOD} s"
        ));
    }
    Ok(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn proof_verifies_only_for_the_right_keys_and_nonce() {
        let coord = PrivateKey::generate();
        let old = PrivateKey::generate().public_key();
        let new = PrivateKey::generate();
        let nonce = Nonce([7; 32]);
        let p = prove(&new, &coord.public_key(), &old, &nonce);
        assert!(verify(&coord, &old, &new.public_key(), &nonce, &p));
        // Another nonce, old key, new key or coordinator: refused.
        assert!(!verify(
            &coord,
            &old,
            &new.public_key(),
            &Nonce([8; 32]),
            &p
        ));
        let other = PrivateKey::generate().public_key();
        assert!(!verify(&coord, &other, &new.public_key(), &nonce, &p));
        assert!(!verify(&coord, &old, &other, &nonce, &p));
        assert!(!verify(
            &PrivateKey::generate(),
            &old,
            &new.public_key(),
            &nonce,
            &p
        ));
        // A low-order point gives an all-zero secret: never accepted.
        let zero = PublicKey([0; 32]);
        assert!(!verify(&coord, &old, &zero, &nonce, &Proof([0; 32])));
        // Wire form round-trips.
        let json = serde_json::to_string(&(nonce, p)).unwrap();
        let back: (Nonce, Proof) = serde_json::from_str(&json).unwrap();
        assert_eq!(back, (nonce, p));
        assert!(serde_json::from_str::<Nonce>("\"zz\"").is_err());
    }

    #[test]
    fn schedule_first_group_wins_then_default() {
        let s = RotationSchedule {
            default: Some(86_400),
            groups: vec![
                RotationGroup {
                    selector: labels(&[("env", "prod")]),
                    period: 3600,
                },
                RotationGroup {
                    selector: labels(&[("env", "prod"), ("app", "db")]),
                    period: 60,
                },
            ],
        };
        assert_eq!(
            s.period_for(&labels(&[("env", "prod"), ("app", "db")])),
            Some(3600)
        );
        assert_eq!(s.period_for(&labels(&[("env", "dev")])), Some(86_400));
        assert!(s.due(&labels(&[("env", "prod")]), 1000, 4600));
        assert!(!s.due(&labels(&[("env", "prod")]), 1000, 4599));
        let none = RotationSchedule::default();
        assert!(!none.is_active() && !none.due(&Labels::new(), 0, u64::MAX));
    }

    #[test]
    fn state_machine_request_prove_complete() {
        let mut r = Rotations::default();
        let (h, n) = (HostId(1), Nonce([1; 32]));
        let k = PrivateKey::generate().public_key();
        assert_eq!(
            r.propose(h, &n, k, true, true, 10),
            Err(RotationError::NotRequested),
            "a proposal nobody asked for"
        );
        r.request(h, n, 10).unwrap();
        assert_eq!(r.request(h, n, 11), Err(RotationError::InProgress));
        assert_eq!(
            r.propose(h, &Nonce([2; 32]), k, true, true, 11),
            Err(RotationError::NotRequested)
        );
        r.propose(h, &n, k, true, true, 12).unwrap();
        assert_eq!(r.host_pending(&k), Some(h));
        assert!(!r.complete(h, &PrivateKey::generate().public_key()));
        assert!(r.complete(h, &k));
        assert!(r.is_empty());
    }

    #[test]
    fn bad_proof_or_taken_key_ends_the_rotation() {
        let mut r = Rotations::default();
        let (h, n) = (HostId(1), Nonce([1; 32]));
        let k = PrivateKey::generate().public_key();
        r.request(h, n, 0).unwrap();
        assert_eq!(
            r.propose(h, &n, k, false, true, 1),
            Err(RotationError::BadProof)
        );
        assert!(r.phase(h).is_none());
        r.request(h, n, 2).unwrap();
        assert_eq!(
            r.propose(h, &n, k, true, false, 3),
            Err(RotationError::KeyInUse)
        );
        assert!(r.phase(h).is_none());
    }

    #[test]
    fn timeouts_abort_with_the_pending_key() {
        let mut r = Rotations::default();
        let k = PrivateKey::generate().public_key();
        r.request(HostId(1), Nonce([1; 32]), 100).unwrap();
        r.request(HostId(2), Nonce([2; 32]), 100).unwrap();
        r.propose(HostId(2), &Nonce([2; 32]), k, true, true, 110)
            .unwrap();
        assert_eq!(r.poll_timeout(), Some(100 + PROOF_TIMEOUT + 1));
        // A late proof is refused.
        assert!(r.expire(100 + PROOF_TIMEOUT).is_empty());
        let gone = r.expire(100 + PROOF_TIMEOUT + 1);
        assert_eq!(gone.len(), 1);
        assert_eq!((gone[0].host, gone[0].pending), (HostId(1), None));
        assert!(r.expire(110 + SWITCH_GRACE).is_empty());
        let gone = r.expire(110 + SWITCH_GRACE + 1);
        assert_eq!((gone[0].host, gone[0].pending), (HostId(2), Some(k)));
        assert!(r.is_empty() && r.poll_timeout().is_none());
    }

    #[test]
    fn periods_parse_with_units_and_a_floor() {
        assert_eq!(parse_period("24h"), Ok(86_400));
        assert_eq!(parse_period("7d"), Ok(604_800));
        assert_eq!(parse_period("90m"), Ok(5400));
        assert!(parse_period("30s").unwrap_err().contains("minimum"));
        assert!(parse_period("1y").unwrap_err().contains("unit"));
        assert!(parse_period("soon").is_err());
        assert!(parse_period("99999999999999999999d").is_err());
    }
}
