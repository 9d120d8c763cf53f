//! Single-packet authorisation (SPA): the knock that opens the coordinator's dark control port.
//!
//! A knock is one UDP datagram: the 4-byte [`MAGIC`] (`00 6d 6b 01`: a zero first byte, which
//! no QUIC packet has, then `mk` and the format version) followed by one Noise
//! `Noise_X_25519_ChaChaPoly_BLAKE2s` message to the coordinator's static key (the key of the
//! control channel's Noise IK). Noise_X is one-way: the knocker's static key is sent encrypted
//! and authenticated (`ss`), the payload is encrypted to the coordinator, and nothing comes back.
//!
//! The payload (always [`PAYLOAD_LEN`] bytes, so every knock is [`KNOCK_LEN`] bytes whatever its
//! kind):
//!
//! | bytes | field |
//! |---|---|
//! | 1 | kind: 1 host, 2 join token, 3 admin |
//! | 8 | unix time in milliseconds, big endian |
//! | 16 | random nonce |
//! | 16 | token reference ([`token_ref`]; zero for a host) |
//! | 32 | HMAC-SHA256 keyed by `SHA-256(secret)` over the kind, time, nonce, reference and the knocker's static key ([`knock_mac`]; zero for a host) |
//!
//! A host is identified by its static key (Noise proves it holds the private key). A join or
//! admin token is identified by its reference and proven by the MAC: the coordinator stores
//! only `SHA-256(secret)`, which is both the MAC key and what the reference is derived from,
//! so the coordinator can check it while the secret itself never leaves the knocker. Nothing
//! is read from the IP or UDP header, so a knock identifies the same knocker through NAT.
//!
//! This module does no IO and reads no clock: [`open_knock`] parses and decrypts bytes (it never
//! panics on any input; the fuzz target calls it), [`Gate::check`] applies the view of valid
//! identities, the clock skew and the replay cache at a `now` passed in.

use std::collections::{HashMap, HashSet};

use hmac::{Hmac, Mac};
use meshd_tunnel::{PrivateKey, PublicKey};
use sha2::{Digest, Sha256};

/// The knock's Noise protocol name.
pub const SPA_NOISE_PARAMS: &str = "Noise_X_25519_ChaChaPoly_BLAKE2s";
/// The prefix of every knock: a zero byte (never the first byte of a QUIC packet: its fixed
/// bit is clear), `mk`, format version 1.
pub const MAGIC: [u8; 4] = [0x00, b'm', b'k', 0x01];
const PROLOGUE: &[u8] = b"meshd-spa/1";
/// Plaintext payload length.
pub const PAYLOAD_LEN: usize = 1 + 8 + 16 + 16 + 32;
/// Noise_X message length: `e` (32), encrypted `s` (32 + 16), encrypted payload (+ 16).
const NOISE_LEN: usize = 32 + 48 + PAYLOAD_LEN + 16;
/// Length of every knock datagram.
pub const KNOCK_LEN: usize = MAGIC.len() + NOISE_LEN;
/// Default clock skew accepted either way (`spa_skew` in the coordinator config).
pub const DEFAULT_SKEW_MS: u64 = 30_000;
/// Default replay cache bound (nonces kept; a knock that would need more is refused).
pub const DEFAULT_REPLAY_CAPACITY: usize = 65_536;

type HmacSha256 = Hmac<Sha256>;

/// Who knocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KnockKind {
    /// An enrolled host, identified by its static (WireGuard) key.
    Host,
    /// A host enrolling with a join token.
    JoinToken,
    /// An operator (meshctl) with the admin token.
    Admin,
}

impl KnockKind {
    fn byte(self) -> u8 {
        match self {
            KnockKind::Host => 1,
            KnockKind::JoinToken => 2,
            KnockKind::Admin => 3,
        }
    }
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(KnockKind::Host),
            2 => Some(KnockKind::JoinToken),
            3 => Some(KnockKind::Admin),
            _ => None,
        }
    }
    /// Name for logs and metrics: `host`, `join_token`, `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            KnockKind::Host => "host",
            KnockKind::JoinToken => "join_token",
            KnockKind::Admin => "admin",
        }
    }
}

/// A knock's decrypted, authenticated content (the MAC not yet checked: [`Gate::check`] does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Knock {
    /// Who claims to knock.
    pub kind: KnockKind,
    /// The knocker's static key, proven by Noise_X.
    pub static_key: PublicKey,
    /// Unix milliseconds when it was made.
    pub unix_ms: u64,
    /// Random nonce (the replay cache's key).
    pub nonce: [u8; 16],
    /// Token reference (zero for a host).
    pub token_ref: [u8; 16],
    /// MAC by the token (zero for a host).
    pub mac: [u8; 32],
}

/// Why a datagram is not a valid knock. Every cause is a silent drop on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KnockError {
    /// Does not start with [`MAGIC`] (QUIC or noise from a stranger).
    #[error("not a knock")]
    NotKnock,
    /// Starts like a knock but has the wrong length.
    #[error("knock of the wrong length")]
    Length,
    /// Noise refused it: not made for this coordinator's key, or tampered with.
    #[error("knock does not decrypt (not for this coordinator, or tampered)")]
    Decrypt,
    /// Decrypted, but the payload is not a knock payload (unknown kind).
    #[error("malformed knock payload")]
    Payload,
    /// A host key the coordinator does not know (or a removed host).
    #[error("unknown host key")]
    UnknownHost,
    /// A token reference the coordinator does not know, or a token no longer usable.
    #[error("unknown or unusable token")]
    UnknownToken,
    /// The token's MAC does not verify.
    #[error("bad token MAC")]
    BadMac,
    /// The timestamp is outside the accepted skew.
    #[error("timestamp outside the accepted clock skew")]
    Skew,
    /// The nonce was seen before.
    #[error("replayed knock (nonce seen before)")]
    Replay,
    /// The replay cache is full of live nonces: refused rather than forgotten.
    #[error("replay cache full")]
    CacheFull,
}

impl KnockError {
    /// Name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            KnockError::NotKnock => "not_knock",
            KnockError::Length => "length",
            KnockError::Decrypt => "decrypt",
            KnockError::Payload => "payload",
            KnockError::UnknownHost => "unknown_host",
            KnockError::UnknownToken => "unknown_token",
            KnockError::BadMac => "bad_mac",
            KnockError::Skew => "skew",
            KnockError::Replay => "replay",
            KnockError::CacheFull => "cache_full",
        }
    }

    /// Every cause, for counters.
    pub const ALL: [KnockError; 10] = [
        KnockError::NotKnock,
        KnockError::Length,
        KnockError::Decrypt,
        KnockError::Payload,
        KnockError::UnknownHost,
        KnockError::UnknownToken,
        KnockError::BadMac,
        KnockError::Skew,
        KnockError::Replay,
        KnockError::CacheFull,
    ];
}

/// Why a knock could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MakeKnockError {
    /// Noise refused the keys (cannot happen with valid X25519 keys).
    #[error("building the knock: {0}")]
    Noise(#[from] snow::Error),
}

fn params() -> snow::params::NoiseParams {
    // The constant is a valid pattern name; parsing cannot fail (checked by a test).
    SPA_NOISE_PARAMS
        .parse()
        .unwrap_or_else(|_| unreachable!("valid noise params"))
}

/// The reference a token's knocks carry: derived from `SHA-256(secret)`, which the
/// coordinator stores, so it can index its tokens by it; it reveals nothing of the secret.
pub fn token_ref(secret_hash: &[u8; 32]) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(b"meshd-spa/1 token-ref");
    h.update(secret_hash);
    let d: [u8; 32] = h.finalize().into();
    let mut r = [0u8; 16];
    r.copy_from_slice(&d[..16]);
    r
}

/// The token MAC of a knock: HMAC-SHA256 keyed by `SHA-256(secret)`.
pub fn knock_mac(
    secret_hash: &[u8; 32],
    kind: KnockKind,
    unix_ms: u64,
    nonce: &[u8; 16],
    token_ref: &[u8; 16],
    static_key: &PublicKey,
) -> [u8; 32] {
    // HMAC takes a key of any length: `new_from_slice` cannot fail.
    let mut m = match HmacSha256::new_from_slice(secret_hash) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts any key length"),
    };
    m.update(PROLOGUE);
    m.update(&[kind.byte()]);
    m.update(&unix_ms.to_be_bytes());
    m.update(nonce);
    m.update(token_ref);
    m.update(static_key.as_bytes());
    m.finalize().into_bytes().into()
}

/// What the knocker proves itself with.
#[derive(Debug, Clone, Copy)]
pub enum KnockAs<'a> {
    /// An enrolled host (its static key is the identity).
    Host,
    /// A join token: `SHA-256(secret)`.
    JoinToken(&'a [u8; 32]),
    /// The admin token: `SHA-256(token)`.
    Admin(&'a [u8; 32]),
}

/// Makes a knock to `coordinator` from `local` (a host's WireGuard key; for meshctl any fresh
/// key), at `unix_ms` with `nonce` (random: [`fresh_nonce`]).
pub fn make_knock(
    coordinator: &PublicKey,
    local: &PrivateKey,
    who: KnockAs<'_>,
    unix_ms: u64,
    nonce: [u8; 16],
) -> Result<Vec<u8>, MakeKnockError> {
    let static_key = local.public_key();
    let (kind, token_ref, mac) = match who {
        KnockAs::Host => (KnockKind::Host, [0u8; 16], [0u8; 32]),
        KnockAs::JoinToken(h) | KnockAs::Admin(h) => {
            let kind = if matches!(who, KnockAs::Admin(_)) {
                KnockKind::Admin
            } else {
                KnockKind::JoinToken
            };
            let r = token_ref(h);
            (
                kind,
                r,
                knock_mac(h, kind, unix_ms, &nonce, &r, &static_key),
            )
        }
    };
    let mut payload = [0u8; PAYLOAD_LEN];
    payload[0] = kind.byte();
    payload[1..9].copy_from_slice(&unix_ms.to_be_bytes());
    payload[9..25].copy_from_slice(&nonce);
    payload[25..41].copy_from_slice(&token_ref);
    payload[41..73].copy_from_slice(&mac);
    let sk = local.to_bytes();
    let mut hs = snow::Builder::new(params())
        .local_private_key(&sk)?
        .remote_public_key(coordinator.as_bytes())?
        .prologue(PROLOGUE)?
        .build_initiator()?;
    let mut out = vec![0u8; KNOCK_LEN];
    out[..4].copy_from_slice(&MAGIC);
    let n = hs.write_message(&payload, &mut out[4..])?;
    out.truncate(4 + n);
    Ok(out)
}

/// A random nonce from the OS.
pub fn fresh_nonce() -> [u8; 16] {
    use rand_core::RngCore as _;
    let mut n = [0u8; 16];
    rand_core::OsRng.fill_bytes(&mut n);
    n
}

/// Whether a datagram starts like a knock (cheap: the first four bytes).
pub fn looks_like_knock(d: &[u8]) -> bool {
    d.len() >= MAGIC.len() && d[..MAGIC.len()] == MAGIC
}

/// Parses and decrypts a knock made for `coordinator` (its static private key). Takes any
/// bytes and never panics; checks nothing but the format and the cryptography.
pub fn open_knock(coordinator: &PrivateKey, datagram: &[u8]) -> Result<Knock, KnockError> {
    if !looks_like_knock(datagram) {
        return Err(KnockError::NotKnock);
    }
    if datagram.len() != KNOCK_LEN {
        return Err(KnockError::Length);
    }
    let sk = coordinator.to_bytes();
    let mut hs = snow::Builder::new(params())
        .local_private_key(&sk)
        .and_then(|b| b.prologue(PROLOGUE))
        .and_then(|b| b.build_responder())
        .map_err(|_| KnockError::Decrypt)?;
    let mut payload = [0u8; NOISE_LEN];
    let n = hs
        .read_message(&datagram[MAGIC.len()..], &mut payload)
        .map_err(|_| KnockError::Decrypt)?;
    if n != PAYLOAD_LEN {
        return Err(KnockError::Payload);
    }
    let static_key = hs
        .get_remote_static()
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .map(PublicKey)
        .ok_or(KnockError::Decrypt)?;
    let kind = KnockKind::from_byte(payload[0]).ok_or(KnockError::Payload)?;
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&payload[1..9]);
    let mut nonce = [0u8; 16];
    nonce.copy_from_slice(&payload[9..25]);
    let mut token_ref = [0u8; 16];
    token_ref.copy_from_slice(&payload[25..41]);
    let mut mac = [0u8; 32];
    mac.copy_from_slice(&payload[41..73]);
    Ok(Knock {
        kind,
        static_key,
        unix_ms: u64::from_be_bytes(ts),
        nonce,
        token_ref,
        mac,
    })
}

/// A token the coordinator accepts knocks from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenEntry {
    /// `SHA-256(secret)`: the MAC key.
    pub secret_hash: [u8; 32],
    /// Unix milliseconds after which it no longer opens the port (`None`: never).
    pub expires_ms: Option<u64>,
}

/// Who may knock: the coordinator's actor builds one whenever hosts or tokens change and
/// swaps it in whole (the filter reads it lock-free).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpaView {
    /// Keys of enrolled, not removed hosts.
    pub hosts: HashSet<PublicKey>,
    /// Usable join tokens by [`token_ref`].
    pub join_tokens: HashMap<[u8; 16], TokenEntry>,
    /// Admin tokens by [`token_ref`].
    pub admin_tokens: HashMap<[u8; 16], TokenEntry>,
}

impl SpaView {
    /// Adds a join token by its stored hash.
    pub fn add_join_token(&mut self, secret_hash: [u8; 32], expires_ms: Option<u64>) {
        self.join_tokens.insert(
            token_ref(&secret_hash),
            TokenEntry {
                secret_hash,
                expires_ms,
            },
        );
    }
    /// Adds an admin token by its stored hash.
    pub fn add_admin_token(&mut self, secret_hash: [u8; 32], expires_ms: Option<u64>) {
        self.admin_tokens.insert(
            token_ref(&secret_hash),
            TokenEntry {
                secret_hash,
                expires_ms,
            },
        );
    }
}

/// A knock that opened the port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// Who knocked.
    pub kind: KnockKind,
    /// Their static key.
    pub static_key: PublicKey,
    /// The nonce (now in the replay cache).
    pub nonce: [u8; 16],
}

/// The bounded replay cache: the nonces of accepted knocks whose timestamps are still within
/// the skew (an older knock is refused by its timestamp, so its nonce need not be kept).
#[derive(Debug, Clone)]
pub struct ReplayCache {
    seen: HashMap<[u8; 16], u64>,
    capacity: usize,
    skew_ms: u64,
}

impl ReplayCache {
    /// An empty cache keeping at most `capacity` nonces, for timestamps within `skew_ms`.
    pub fn new(capacity: usize, skew_ms: u64) -> Self {
        ReplayCache {
            seen: HashMap::new(),
            capacity: capacity.max(1),
            skew_ms,
        }
    }

    /// Nonces kept now.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether it holds no nonce.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Forgets nonces whose timestamps are older than `now_ms - skew`.
    pub fn prune(&mut self, now_ms: u64) {
        let floor = now_ms.saturating_sub(self.skew_ms);
        self.seen.retain(|_, ts| *ts >= floor);
    }

    /// Records `nonce` (stamped `unix_ms`), or says why not.
    fn insert(&mut self, now_ms: u64, nonce: [u8; 16], unix_ms: u64) -> Result<(), KnockError> {
        if self.seen.contains_key(&nonce) {
            return Err(KnockError::Replay);
        }
        if self.seen.len() >= self.capacity {
            self.prune(now_ms);
            if self.seen.len() >= self.capacity {
                return Err(KnockError::CacheFull);
            }
        }
        self.seen.insert(nonce, unix_ms);
        Ok(())
    }

    /// The entries (nonce, unix ms), for saving.
    pub fn entries(&self) -> impl Iterator<Item = (&[u8; 16], u64)> {
        self.seen.iter().map(|(n, t)| (n, *t))
    }

    /// Serialises the entries: 24 bytes each (nonce, then big-endian unix ms).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.seen.len() * 24);
        for (n, t) in &self.seen {
            b.extend_from_slice(n);
            b.extend_from_slice(&t.to_be_bytes());
        }
        b
    }

    /// Loads entries saved by [`ReplayCache::to_bytes`] (a trailing partial entry is ignored),
    /// keeping those still within the skew at `now_ms`, at most `capacity`.
    pub fn load(&mut self, now_ms: u64, bytes: &[u8]) {
        for e in bytes.chunks_exact(24) {
            if self.seen.len() >= self.capacity {
                break;
            }
            let mut n = [0u8; 16];
            n.copy_from_slice(&e[..16]);
            let mut t = [0u8; 8];
            t.copy_from_slice(&e[16..]);
            self.seen.insert(n, u64::from_be_bytes(t));
        }
        self.prune(now_ms);
    }
}

/// The knock checker: the coordinator's key, the skew and the replay cache.
pub struct Gate {
    key: PrivateKey,
    skew_ms: u64,
    replay: ReplayCache,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("skew_ms", &self.skew_ms)
            .field("replay", &self.replay.len())
            .finish_non_exhaustive()
    }
}

impl Gate {
    /// A gate for the coordinator key `key`, accepting timestamps within `skew_ms` of `now`
    /// and keeping at most `replay_capacity` nonces.
    pub fn new(key: PrivateKey, skew_ms: u64, replay_capacity: usize) -> Self {
        Gate {
            key,
            skew_ms,
            replay: ReplayCache::new(replay_capacity, skew_ms),
        }
    }

    /// The replay cache (to save it).
    pub fn replay(&self) -> &ReplayCache {
        &self.replay
    }

    /// The replay cache (to load it).
    pub fn replay_mut(&mut self) -> &mut ReplayCache {
        &mut self.replay
    }

    /// Checks one datagram at `now_ms` against `view`: format, cryptography, identity, skew,
    /// then replay (only an otherwise valid knock reaches the cache, so strangers cannot
    /// fill it).
    pub fn check(
        &mut self,
        now_ms: u64,
        datagram: &[u8],
        view: &SpaView,
    ) -> Result<Admitted, KnockError> {
        let k = open_knock(&self.key, datagram)?;
        match k.kind {
            KnockKind::Host => {
                if !view.hosts.contains(&k.static_key) {
                    return Err(KnockError::UnknownHost);
                }
            }
            KnockKind::JoinToken | KnockKind::Admin => {
                let table = if k.kind == KnockKind::Admin {
                    &view.admin_tokens
                } else {
                    &view.join_tokens
                };
                let t = table.get(&k.token_ref).ok_or(KnockError::UnknownToken)?;
                if t.expires_ms.is_some_and(|e| now_ms > e) {
                    return Err(KnockError::UnknownToken);
                }
                let want = knock_mac(
                    &t.secret_hash,
                    k.kind,
                    k.unix_ms,
                    &k.nonce,
                    &k.token_ref,
                    &k.static_key,
                );
                if !ct_eq(&want, &k.mac) {
                    return Err(KnockError::BadMac);
                }
            }
        }
        if k.unix_ms.abs_diff(now_ms) > self.skew_ms {
            return Err(KnockError::Skew);
        }
        self.replay.insert(now_ms, k.nonce, k.unix_ms)?;
        Ok(Admitted {
            kind: k.kind,
            static_key: k.static_key,
            nonce: k.nonce,
        })
    }
}

/// Constant-time comparison of two MACs.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    struct Setup {
        coord: PrivateKey,
        host: PrivateKey,
        join: [u8; 32],
        admin: [u8; 32],
        view: SpaView,
    }

    fn setup() -> Setup {
        let coord = PrivateKey::from_bytes([1; 32]);
        let host = PrivateKey::from_bytes([2; 32]);
        let join = meshd_control::token::hash_secret(&[3; 32]);
        let admin = meshd_control::token::hash_secret(b"admin-token");
        let mut view = SpaView::default();
        view.hosts.insert(host.public_key());
        view.add_join_token(join, Some(NOW + 60_000));
        view.add_admin_token(admin, None);
        Setup {
            coord,
            host,
            join,
            admin,
            view,
        }
    }

    fn gate(s: &Setup) -> Gate {
        Gate::new(s.coord.clone(), DEFAULT_SKEW_MS, 16)
    }

    fn knock(s: &Setup, who: KnockAs<'_>, local: &PrivateKey, ts: u64, nonce: u8) -> Vec<u8> {
        make_knock(&s.coord.public_key(), local, who, ts, [nonce; 16]).unwrap()
    }

    #[test]
    fn params_parse_and_length_is_fixed() {
        let _ = params();
        let s = setup();
        let h = knock(&s, KnockAs::Host, &s.host, NOW, 1);
        let j = knock(&s, KnockAs::JoinToken(&s.join), &s.host, NOW, 2);
        assert_eq!(h.len(), KNOCK_LEN);
        assert_eq!(j.len(), KNOCK_LEN, "kinds are indistinguishable by size");
        assert!(looks_like_knock(&h));
    }

    #[test]
    fn valid_knocks_of_each_kind_open() {
        let s = setup();
        let mut g = gate(&s);
        let a = g
            .check(NOW, &knock(&s, KnockAs::Host, &s.host, NOW, 1), &s.view)
            .unwrap();
        assert_eq!(a.kind, KnockKind::Host);
        assert_eq!(a.static_key, s.host.public_key());
        let fresh = PrivateKey::generate();
        let a = g
            .check(
                NOW,
                &knock(&s, KnockAs::JoinToken(&s.join), &fresh, NOW, 2),
                &s.view,
            )
            .unwrap();
        assert_eq!(a.kind, KnockKind::JoinToken);
        let a = g
            .check(
                NOW,
                &knock(&s, KnockAs::Admin(&s.admin), &fresh, NOW - 1000, 3),
                &s.view,
            )
            .unwrap();
        assert_eq!(a.kind, KnockKind::Admin);
    }

    #[test]
    fn wrong_coordinator_key_does_not_decrypt() {
        let s = setup();
        let other = PrivateKey::from_bytes([9; 32]);
        let k = make_knock(&other.public_key(), &s.host, KnockAs::Host, NOW, [1; 16]).unwrap();
        assert_eq!(gate(&s).check(NOW, &k, &s.view), Err(KnockError::Decrypt));
    }

    #[test]
    fn unknown_host_and_token_and_forged_mac_are_refused() {
        let s = setup();
        let mut g = gate(&s);
        let stranger = PrivateKey::from_bytes([7; 32]);
        assert_eq!(
            g.check(NOW, &knock(&s, KnockAs::Host, &stranger, NOW, 1), &s.view),
            Err(KnockError::UnknownHost)
        );
        let wrong = [5u8; 32];
        assert_eq!(
            g.check(
                NOW,
                &knock(&s, KnockAs::JoinToken(&wrong), &stranger, NOW, 2),
                &s.view
            ),
            Err(KnockError::UnknownToken)
        );
        // A join token's hash used for an admin knock: not an admin token.
        assert_eq!(
            g.check(
                NOW,
                &knock(&s, KnockAs::Admin(&s.join), &stranger, NOW, 3),
                &s.view
            ),
            Err(KnockError::UnknownToken)
        );
        // Knows the reference but not the hash: the MAC fails.
        let r = token_ref(&s.join);
        let nonce = [4u8; 16];
        let mac = knock_mac(
            &wrong,
            KnockKind::JoinToken,
            NOW,
            &nonce,
            &r,
            &stranger.public_key(),
        );
        let mut payload = [0u8; PAYLOAD_LEN];
        payload[0] = 2;
        payload[1..9].copy_from_slice(&NOW.to_be_bytes());
        payload[9..25].copy_from_slice(&nonce);
        payload[25..41].copy_from_slice(&r);
        payload[41..73].copy_from_slice(&mac);
        let sk = stranger.to_bytes();
        let mut hs = snow::Builder::new(params())
            .local_private_key(&sk)
            .unwrap()
            .remote_public_key(s.coord.public_key().as_bytes())
            .unwrap()
            .prologue(PROLOGUE)
            .unwrap()
            .build_initiator()
            .unwrap();
        let mut out = vec![0u8; KNOCK_LEN];
        out[..4].copy_from_slice(&MAGIC);
        hs.write_message(&payload, &mut out[4..]).unwrap();
        assert_eq!(g.check(NOW, &out, &s.view), Err(KnockError::BadMac));
        assert!(g.replay().is_empty(), "refused knocks leave no nonce");
    }

    #[test]
    fn expired_token_is_refused() {
        let s = setup();
        let k = knock(&s, KnockAs::JoinToken(&s.join), &s.host, NOW + 61_000, 1);
        assert_eq!(
            gate(&s).check(NOW + 61_000, &k, &s.view),
            Err(KnockError::UnknownToken)
        );
    }

    #[test]
    fn truncated_garbage_and_flipped_bits_are_refused() {
        let s = setup();
        let mut g = gate(&s);
        let k = knock(&s, KnockAs::Host, &s.host, NOW, 1);
        for n in 0..k.len() {
            let r = g.check(NOW, &k[..n], &s.view);
            assert!(
                matches!(r, Err(KnockError::NotKnock | KnockError::Length)),
                "{n}: {r:?}"
            );
        }
        let mut long = k.clone();
        long.push(0);
        assert_eq!(g.check(NOW, &long, &s.view), Err(KnockError::Length));
        for i in 4..k.len() {
            let mut f = k.clone();
            f[i] ^= 0x40;
            assert_eq!(g.check(NOW, &f, &s.view), Err(KnockError::Decrypt), "{i}");
        }
        let mut quic = vec![0xc0u8; 1200];
        quic[1..5].copy_from_slice(&[0, 0, 0, 1]);
        assert_eq!(g.check(NOW, &quic, &s.view), Err(KnockError::NotKnock));
        let mut junk = vec![0u8; KNOCK_LEN];
        junk[..4].copy_from_slice(&MAGIC);
        assert_eq!(g.check(NOW, &junk, &s.view), Err(KnockError::Decrypt));
        // The untouched knock still works afterwards.
        assert!(g.check(NOW, &k, &s.view).is_ok());
    }

    #[test]
    fn replayed_nonce_is_refused() {
        let s = setup();
        let mut g = gate(&s);
        let k = knock(&s, KnockAs::Host, &s.host, NOW, 1);
        assert!(g.check(NOW, &k, &s.view).is_ok());
        assert_eq!(g.check(NOW + 5, &k, &s.view), Err(KnockError::Replay));
        // Same nonce in a fresh knock (new ephemeral key): still a replay.
        let k2 = knock(&s, KnockAs::Host, &s.host, NOW + 10, 1);
        assert_ne!(k, k2);
        assert_eq!(g.check(NOW + 10, &k2, &s.view), Err(KnockError::Replay));
        // After the skew the old knock is refused by its time, and its nonce is forgotten.
        assert_eq!(
            g.check(NOW + DEFAULT_SKEW_MS + 1, &k, &s.view),
            Err(KnockError::Skew)
        );
    }

    #[test]
    fn timestamps_outside_the_skew_are_refused_both_ways() {
        let s = setup();
        let mut g = gate(&s);
        let old = knock(&s, KnockAs::Host, &s.host, NOW - DEFAULT_SKEW_MS - 1, 1);
        let future = knock(&s, KnockAs::Host, &s.host, NOW + DEFAULT_SKEW_MS + 1, 2);
        let edge = knock(&s, KnockAs::Host, &s.host, NOW + DEFAULT_SKEW_MS, 3);
        assert_eq!(g.check(NOW, &old, &s.view), Err(KnockError::Skew));
        assert_eq!(g.check(NOW, &future, &s.view), Err(KnockError::Skew));
        assert!(g.check(NOW, &edge, &s.view).is_ok());
    }

    #[test]
    fn nat_same_knock_identity_is_independent_of_the_source() {
        // The format has no address field: the same bytes from any source identify the same
        // host; a second knock of that host (its own nonce) from another address works too.
        let s = setup();
        let mut g = gate(&s);
        let a = g
            .check(NOW, &knock(&s, KnockAs::Host, &s.host, NOW, 1), &s.view)
            .unwrap();
        let b = g
            .check(NOW, &knock(&s, KnockAs::Host, &s.host, NOW, 2), &s.view)
            .unwrap();
        assert_eq!(a.static_key, b.static_key);
    }

    #[test]
    fn replay_cache_is_bounded_prunes_and_survives_a_save() {
        let s = setup();
        let mut g = Gate::new(s.coord.clone(), DEFAULT_SKEW_MS, 2);
        assert!(g
            .check(NOW, &knock(&s, KnockAs::Host, &s.host, NOW, 1), &s.view)
            .is_ok());
        assert!(g
            .check(NOW, &knock(&s, KnockAs::Host, &s.host, NOW, 2), &s.view)
            .is_ok());
        assert_eq!(
            g.check(NOW, &knock(&s, KnockAs::Host, &s.host, NOW, 3), &s.view),
            Err(KnockError::CacheFull)
        );
        // Saved and loaded into a new gate (a restart): the nonce is still known.
        let saved = g.replay().to_bytes();
        let mut g2 = Gate::new(s.coord.clone(), DEFAULT_SKEW_MS, 2);
        g2.replay_mut().load(NOW + 1, &saved);
        assert_eq!(g2.replay().len(), 2);
        assert_eq!(
            g2.check(NOW + 1, &knock(&s, KnockAs::Host, &s.host, NOW, 1), &s.view),
            Err(KnockError::Replay)
        );
        // Once the skew has passed, old nonces are pruned and room is made.
        let later = NOW + DEFAULT_SKEW_MS + 1;
        assert!(g
            .check(later, &knock(&s, KnockAs::Host, &s.host, later, 3), &s.view)
            .is_ok());
        assert_eq!(g.replay().len(), 1);
        // Loading prunes what is outside the skew, and ignores a partial entry.
        let mut r = ReplayCache::new(8, DEFAULT_SKEW_MS);
        let mut bytes = saved.clone();
        bytes.extend_from_slice(&[1, 2, 3]);
        r.load(later, &bytes);
        assert!(r.is_empty());
    }

    #[test]
    fn open_knock_never_panics_on_random_bytes() {
        let s = setup();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in [
            0usize,
            3,
            4,
            5,
            100,
            KNOCK_LEN - 1,
            KNOCK_LEN,
            KNOCK_LEN + 1,
            2000,
        ] {
            for _ in 0..20 {
                let mut b: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                if len >= 4 {
                    b[..4].copy_from_slice(&MAGIC);
                }
                let _ = open_knock(&s.coord, &b);
            }
        }
    }
}
