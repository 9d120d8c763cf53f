//! Per-source limits on the coordinator's listeners, in the shape the IO edges use them:
//! handshake slots for the admin API's HTTPS port ([`Slots`]), a failure backoff for admin
//! tokens and join tokens ([`Backoff`]), a log limiter ([`LogLimiter`]), the admission decision
//! for QUIC handshakes ([`admit_quic`]), and the counters `GET /v1/status` reports
//! ([`Counters`]). Everything but the counters is pure: the time is a parameter.
//!
//! A "source" is an IPv4 address or an IPv6 /64 (one host gets a whole /64 as easily as one
//! address), see [`source_of`].

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use meshd_control::api::GuardStats;

use crate::options::Limits;

/// The source a peer address counts against: the address itself for IPv4 (and IPv4-mapped
/// IPv6), its /64 for IPv6.
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(a) => {
            let s = a.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// Whether `ip` is a loopback address (IPv4-mapped included).
pub fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// Why a handshake slot was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotRefusal {
    /// This source already holds its share.
    PerSource,
    /// Every slot open to this source is taken (non-loopback sources cannot take the share
    /// reserved for loopback).
    Full,
}

/// Handshakes in progress: at most `total`, at most `per_source` per source, and the last
/// `reserved_loopback` of them only for loopback peers, so an operator on the coordinator's
/// own host always gets a slot.
#[derive(Debug)]
pub struct Slots {
    total: usize,
    per_source: usize,
    reserved_loopback: usize,
    used: usize,
    /// Of `used`, the slots held by non-loopback peers.
    foreign: usize,
    by_source: HashMap<IpAddr, usize>,
}

impl Slots {
    /// Empty slots with these limits.
    pub fn new(total: usize, per_source: usize, reserved_loopback: usize) -> Self {
        Slots {
            total,
            per_source,
            reserved_loopback: reserved_loopback.min(total),
            used: 0,
            foreign: 0,
            by_source: HashMap::new(),
        }
    }

    /// Takes a slot for a peer at `ip`; give it back with [`Slots::release`].
    pub fn take(&mut self, ip: IpAddr) -> Result<(), SlotRefusal> {
        let local = is_loopback(ip);
        if self.used >= self.total
            || (!local && self.foreign >= self.total - self.reserved_loopback)
        {
            return Err(SlotRefusal::Full);
        }
        let n = self.by_source.entry(source_of(ip)).or_insert(0);
        if *n >= self.per_source {
            return Err(SlotRefusal::PerSource);
        }
        *n += 1;
        self.used += 1;
        if !local {
            self.foreign += 1;
        }
        Ok(())
    }

    /// Gives back a slot taken for `ip`.
    pub fn release(&mut self, ip: IpAddr) {
        let src = source_of(ip);
        if let Some(n) = self.by_source.get_mut(&src) {
            *n -= 1;
            self.used = self.used.saturating_sub(1);
            if !is_loopback(ip) {
                self.foreign = self.foreign.saturating_sub(1);
            }
            if *n == 0 {
                self.by_source.remove(&src);
            }
        }
    }

    /// Slots in use.
    pub fn in_use(&self) -> usize {
        self.used
    }
}

/// How a [`Backoff`] treats failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// Failures a source may make before it is refused for a while.
    pub free_failures: u32,
    /// The first refusal's length; each further failure doubles it.
    pub base: Duration,
    /// Longest refusal.
    pub max: Duration,
    /// A source quiet this long starts afresh.
    pub forget_after: Duration,
    /// Sources remembered at most (the least recently seen is forgotten first).
    pub capacity: usize,
    /// At most one log line per source per this long.
    pub log_every: Duration,
}

impl BackoffConfig {
    /// The configuration `limits` asks for.
    pub fn from_limits(l: &Limits) -> Self {
        BackoffConfig {
            free_failures: l.auth_failures_before_backoff,
            base: Duration::from_millis(l.auth_backoff_base_ms),
            max: Duration::from_secs(l.auth_backoff_max_secs),
            forget_after: Duration::from_secs(l.auth_forget_after_secs),
            capacity: l.auth_backoff_sources,
            log_every: Duration::from_secs(LOG_EVERY_SECS),
        }
    }
}

/// Seconds between two log lines about the same source or the same pressure.
pub const LOG_EVERY_SECS: u64 = 10;

#[derive(Debug, Clone)]
struct Entry {
    failures: u32,
    blocked_until: Option<Instant>,
    last_seen: Instant,
    last_log: Option<Instant>,
    /// Events since the last log line about this source.
    unlogged: u64,
}

/// The answer of [`Backoff::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Check {
    /// Let the attempt through.
    Allowed,
    /// Refuse it without looking at it.
    Blocked {
        /// How long the source stays refused.
        retry_after: Duration,
        /// `Some(n)`: log it now, with `n` refusals since the last line about this source.
        log: Option<u64>,
    },
}

/// What [`Backoff::failure`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct Failure {
    /// Failures this source made in a row.
    pub failures: u32,
    /// The source is refused for this long from now.
    pub blocked_for: Option<Duration>,
    /// `Some(n)`: log it now, with `n` events since the last line about this source.
    pub log: Option<u64>,
}

/// Failed attempts per source, with a refusal that doubles with each failure past the free
/// ones. Bounded: at most `capacity` sources, the least recently seen forgotten first.
#[derive(Debug)]
pub struct Backoff {
    cfg: BackoffConfig,
    table: HashMap<IpAddr, Entry>,
}

impl Backoff {
    /// An empty table.
    pub fn new(cfg: BackoffConfig) -> Self {
        Backoff {
            cfg,
            table: HashMap::new(),
        }
    }

    /// Sources remembered.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether no source is remembered.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Whether an attempt from `ip` may go ahead at `now`.
    pub fn check(&mut self, now: Instant, ip: IpAddr) -> Check {
        let src = source_of(ip);
        self.expire(now, src);
        let log_every = self.cfg.log_every;
        let Some(e) = self.table.get_mut(&src) else {
            return Check::Allowed;
        };
        match e.blocked_until {
            Some(t) if t > now => {
                e.unlogged += 1;
                Check::Blocked {
                    retry_after: t - now,
                    log: take_log(e, now, log_every),
                }
            }
            _ => Check::Allowed,
        }
    }

    /// Records a failed attempt from `ip` at `now`.
    pub fn failure(&mut self, now: Instant, ip: IpAddr) -> Failure {
        let src = source_of(ip);
        self.expire(now, src);
        if !self.table.contains_key(&src) && self.table.len() >= self.cfg.capacity {
            self.evict_oldest();
        }
        let cfg = self.cfg;
        let e = self.table.entry(src).or_insert(Entry {
            failures: 0,
            blocked_until: None,
            last_seen: now,
            last_log: None,
            unlogged: 0,
        });
        e.failures = e.failures.saturating_add(1);
        e.last_seen = now;
        e.unlogged += 1;
        let blocked_for = e.failures.checked_sub(cfg.free_failures).map(|over| {
            let factor = 1u32.checked_shl(over).unwrap_or(u32::MAX);
            cfg.base.saturating_mul(factor).min(cfg.max)
        });
        e.blocked_until = blocked_for.map(|d| now + d);
        Failure {
            failures: e.failures,
            blocked_for,
            log: take_log(e, now, cfg.log_every),
        }
    }

    /// A successful attempt from `ip`: its failures are forgotten.
    pub fn success(&mut self, ip: IpAddr) {
        self.table.remove(&source_of(ip));
    }

    /// Forgets `src` if it has been quiet for `forget_after` and is not refused.
    fn expire(&mut self, now: Instant, src: IpAddr) {
        let forget = self.cfg.forget_after;
        if self.table.get(&src).is_some_and(|e| {
            e.blocked_until.is_none_or(|t| t <= now) && now.duration_since(e.last_seen) >= forget
        }) {
            self.table.remove(&src);
        }
    }

    fn evict_oldest(&mut self) {
        if let Some(oldest) = self
            .table
            .iter()
            .min_by_key(|(_, e)| e.last_seen)
            .map(|(k, _)| *k)
        {
            self.table.remove(&oldest);
        }
    }
}

fn take_log(e: &mut Entry, now: Instant, every: Duration) -> Option<u64> {
    if e.last_log.is_some_and(|t| now.duration_since(t) < every) {
        return None;
    }
    e.last_log = Some(now);
    Some(std::mem::take(&mut e.unlogged))
}

/// At most one log line per period, with the count of events since the last one.
#[derive(Debug)]
pub struct LogLimiter {
    every: Duration,
    last: Option<Instant>,
    unlogged: u64,
}

impl LogLimiter {
    /// A limiter allowing one line per `every`.
    pub fn new(every: Duration) -> Self {
        LogLimiter {
            every,
            last: None,
            unlogged: 0,
        }
    }

    /// Records an event at `now`; `Some(n)`: log now, `n` events since the last line.
    #[must_use]
    pub fn hit(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.every)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// What to do with an incoming QUIC connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum QuicAdmission {
    /// Start the handshake.
    Accept,
    /// Answer with a Retry (stateless) so the client proves its address first.
    Retry,
    /// Refuse: too many handshakes in progress.
    RefuseFull,
    /// Refuse: the source is in its join-token backoff.
    RefuseBackoff,
}

/// The admission decision for a QUIC attempt. `validated`: the client's address is proven (it
/// echoed a Retry token); `half_open`: handshakes in progress now; `blocked`: the source is in
/// its backoff. An unvalidated client is sent a Retry once `half_open` reaches
/// `retry_threshold` (0: always), so a flood from spoofed addresses costs no state and draws
/// replies smaller than its packets; a validated one is refused once `half_open` reaches
/// `max_half_open`.
pub fn admit_quic(
    validated: bool,
    half_open: usize,
    blocked: bool,
    retry_threshold: usize,
    max_half_open: usize,
) -> QuicAdmission {
    if !validated && half_open >= retry_threshold {
        QuicAdmission::Retry
    } else if blocked {
        QuicAdmission::RefuseBackoff
    } else if half_open >= max_half_open {
        QuicAdmission::RefuseFull
    } else {
        QuicAdmission::Accept
    }
}

/// Counters of what the limits refused and saw (reported in `GET /v1/status`).
#[derive(Debug, Default)]
pub struct Counters {
    /// Admin requests with a missing or wrong token.
    pub admin_auth_failures: AtomicU64,
    /// Admin requests refused (429) while their source was in its backoff.
    pub admin_auth_backoff: AtomicU64,
    /// Admin HTTPS connections closed at once: their source, or all slots, were busy.
    pub admin_handshakes_refused: AtomicU64,
    /// Admin HTTPS connections closed because the TLS handshake took too long.
    pub admin_handshakes_timed_out: AtomicU64,
    /// Enrolments with an unknown, expired, revoked or used-up join token.
    pub join_token_failures: AtomicU64,
    /// QUIC attempts refused at once while their source was in its join-token backoff.
    pub join_backoff_refused: AtomicU64,
    /// QUIC handshakes in progress now.
    pub quic_half_open: AtomicU64,
    /// Most QUIC handshakes in progress at once since start.
    pub quic_half_open_peak: AtomicU64,
    /// Retry packets sent (address validation).
    pub quic_retries: AtomicU64,
    /// QUIC attempts refused because `max_half_open` handshakes were in progress.
    pub quic_refused_full: AtomicU64,
}

impl Counters {
    /// Adds one to `c`.
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// A handshake started: the half-open gauge and its peak.
    pub fn half_open_started(&self) {
        let now = self.quic_half_open.fetch_add(1, Ordering::Relaxed) + 1;
        self.quic_half_open_peak.fetch_max(now, Ordering::Relaxed);
    }

    /// A handshake ended (either way).
    pub fn half_open_ended(&self) {
        self.quic_half_open.fetch_sub(1, Ordering::Relaxed);
    }

    /// The values now.
    pub fn snapshot(&self) -> GuardStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        GuardStats {
            admin_auth_failures: g(&self.admin_auth_failures),
            admin_auth_backoff: g(&self.admin_auth_backoff),
            admin_handshakes_refused: g(&self.admin_handshakes_refused),
            admin_handshakes_timed_out: g(&self.admin_handshakes_timed_out),
            join_token_failures: g(&self.join_token_failures),
            join_backoff_refused: g(&self.join_backoff_refused),
            quic_half_open: g(&self.quic_half_open),
            quic_half_open_peak: g(&self.quic_half_open_peak),
            quic_retries: g(&self.quic_retries),
            quic_refused_full: g(&self.quic_refused_full),
        }
    }
}

/// The coordinator's shared limit state: counters and the two backoff tables.
#[derive(Debug)]
pub struct Guard {
    /// Counters.
    pub counters: Counters,
    /// Failed admin authentications per source.
    pub admin: Mutex<Backoff>,
    /// Failed join tokens per source.
    pub joins: Mutex<Backoff>,
    /// `--admin-spa` off loopback: the SPA filter whose admin knocks open the admin API to
    /// an IP (unset: no such check).
    pub admin_spa: std::sync::OnceLock<std::sync::Arc<crate::spa::SpaFilter>>,
    /// [`Limits::control_write_timeout_ms`].
    pub control_write_timeout: std::time::Duration,
}

impl Guard {
    /// Empty tables configured from `limits`.
    pub fn new(limits: &Limits) -> Self {
        let cfg = BackoffConfig::from_limits(limits);
        Guard {
            counters: Counters::default(),
            admin: Mutex::new(Backoff::new(cfg)),
            joins: Mutex::new(Backoff::new(cfg)),
            admin_spa: std::sync::OnceLock::new(),
            control_write_timeout: std::time::Duration::from_millis(
                limits.control_write_timeout_ms,
            ),
        }
    }
}

/// Locks `m`, carrying on with the data if a holder panicked (the tables stay consistent: every
/// update is a single insert or remove).
pub fn lock(m: &Mutex<Backoff>) -> std::sync::MutexGuard<'_, Backoff> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn slots_per_source_and_loopback_reserve() {
        let mut s = Slots::new(7, 2, 2);
        assert_eq!(s.take(ip("198.18.0.1")), Ok(()));
        assert_eq!(s.take(ip("198.18.0.1")), Ok(()));
        assert_eq!(s.take(ip("198.18.0.1")), Err(SlotRefusal::PerSource));
        assert_eq!(s.take(ip("198.18.0.2")), Ok(()));
        assert_eq!(
            s.take(ip("::ffff:198.18.0.2")),
            Ok(()),
            "mapped = same source"
        );
        assert_eq!(s.take(ip("::ffff:198.18.0.2")), Err(SlotRefusal::PerSource));
        assert_eq!(s.take(ip("198.18.0.3")), Ok(()));
        // Five non-loopback slots taken: the other two are loopback's.
        assert_eq!(s.take(ip("198.18.0.4")), Err(SlotRefusal::Full));
        assert_eq!(s.take(ip("fd00::1")), Err(SlotRefusal::Full));
        assert_eq!(s.take(ip("127.0.0.1")), Ok(()));
        assert_eq!(s.take(ip("::1")), Ok(()));
        assert_eq!(s.take(ip("127.0.0.2")), Err(SlotRefusal::Full));
        assert_eq!(s.in_use(), 7);
        s.release(ip("198.18.0.1"));
        assert_eq!(s.take(ip("198.18.0.3")), Ok(()));
        assert_eq!(s.take(ip("198.18.0.1")), Err(SlotRefusal::Full));
        s.release(ip("127.0.0.1"));
        assert_eq!(
            s.take(ip("198.18.0.1")),
            Err(SlotRefusal::Full),
            "loopback's share"
        );
        assert_eq!(s.take(ip("127.0.0.5")), Ok(()));
        // Releasing what was never taken changes nothing.
        s.release(ip("203.0.113.9"));
        assert_eq!(s.in_use(), 7);
    }

    #[test]
    fn ipv6_counts_per_64() {
        let mut s = Slots::new(10, 2, 0);
        assert_eq!(s.take(ip("2001:db8:1:2::1")), Ok(()));
        assert_eq!(s.take(ip("2001:db8:1:2::ffff")), Ok(()));
        assert_eq!(
            s.take(ip("2001:db8:1:2:abcd::1")),
            Err(SlotRefusal::PerSource)
        );
        assert_eq!(s.take(ip("2001:db8:1:3::1")), Ok(()));
    }

    fn cfg() -> BackoffConfig {
        BackoffConfig {
            free_failures: 3,
            base: Duration::from_secs(1),
            max: Duration::from_secs(8),
            forget_after: Duration::from_secs(600),
            capacity: 3,
            log_every: Duration::from_secs(10),
        }
    }

    #[test]
    fn backoff_grows_and_success_resets() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let a = ip("198.18.0.1");
        let mut b = Backoff::new(cfg());
        for i in 1..3 {
            let f = b.failure(at(0), a);
            assert_eq!((f.failures, f.blocked_for), (i, None));
            assert_eq!(b.check(at(0), a), Check::Allowed);
        }
        // The third failure starts the refusal: 1 s, then 2, 4, 8, 8 (capped).
        let mut t = 0;
        for want in [1, 2, 4, 8, 8] {
            let f = b.failure(at(t), a);
            assert_eq!(f.blocked_for, Some(Duration::from_secs(want)), "{f:?}");
            assert!(
                matches!(b.check(at(t), a), Check::Blocked { retry_after, .. }
                if retry_after == Duration::from_secs(want))
            );
            assert!(matches!(
                b.check(at(t + want - 1), a),
                Check::Blocked { .. }
            ));
            t += want;
            assert_eq!(b.check(at(t), a), Check::Allowed);
        }
        // Another source is not affected.
        assert_eq!(b.check(at(t), ip("198.18.0.2")), Check::Allowed);
        b.success(a);
        assert!(b.is_empty());
        assert_eq!(b.failure(at(t), a).blocked_for, None);
    }

    #[test]
    fn backoff_forgets_quiet_sources_and_stays_bounded() {
        let t0 = Instant::now();
        let mut b = Backoff::new(cfg());
        let a = ip("198.18.0.1");
        let _ = b.failure(t0, a);
        let _ = b.failure(t0, a);
        // Quiet for the forget period: starts afresh.
        let later = t0 + Duration::from_secs(600);
        assert_eq!(b.failure(later, a).failures, 1);
        // Capacity 3: a fourth source evicts the least recently seen.
        for (i, s) in ["10.0.0.1", "10.0.0.2", "10.0.0.3"].iter().enumerate() {
            let _ = b.failure(later + Duration::from_secs(i as u64 + 1), ip(s));
        }
        assert_eq!(b.len(), 3);
        assert_eq!(
            b.failure(later + Duration::from_secs(9), ip("10.0.0.1"))
                .failures,
            2,
            "still remembered"
        );
        assert_eq!(
            b.failure(later + Duration::from_secs(9), a).failures,
            1,
            "evicted as the oldest"
        );
    }

    #[test]
    fn backoff_logs_once_per_period_with_counts() {
        let t0 = Instant::now();
        let mut b = Backoff::new(cfg());
        let a = ip("198.18.0.1");
        assert_eq!(b.failure(t0, a).log, Some(1));
        assert_eq!(b.failure(t0 + Duration::from_secs(1), a).log, None);
        assert_eq!(b.failure(t0 + Duration::from_secs(2), a).log, None);
        // Blocked now (third failure): refusals count towards the next line.
        let Check::Blocked { log, .. } = b.check(t0 + Duration::from_secs(2), a) else {
            panic!("blocked");
        };
        assert_eq!(log, None);
        assert_eq!(b.failure(t0 + Duration::from_secs(10), a).log, Some(4));
        // Each source has its own limit.
        assert_eq!(
            b.failure(t0 + Duration::from_secs(10), ip("10.0.0.9")).log,
            Some(1)
        );
    }

    #[test]
    fn log_limiter_counts() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(Duration::from_secs(10));
        assert_eq!(l.hit(t0), Some(1));
        for s in 1..10 {
            assert_eq!(l.hit(t0 + Duration::from_secs(s)), None);
        }
        assert_eq!(l.hit(t0 + Duration::from_secs(10)), Some(10));
    }

    #[test]
    fn quic_admission() {
        use QuicAdmission::*;
        // Threshold 0: every unvalidated client is asked to prove its address.
        assert_eq!(admit_quic(false, 0, false, 0, 4), Retry);
        assert_eq!(admit_quic(true, 0, false, 0, 4), Accept);
        // Below the threshold, unvalidated clients start at once; at it, Retry.
        assert_eq!(admit_quic(false, 1, false, 2, 4), Accept);
        assert_eq!(admit_quic(false, 2, false, 2, 4), Retry);
        // The cap holds for validated clients; a threshold above the cap still caps.
        assert_eq!(admit_quic(true, 3, false, 2, 4), Accept);
        assert_eq!(admit_quic(true, 4, false, 2, 4), RefuseFull);
        assert_eq!(admit_quic(false, 4, false, 10, 4), RefuseFull);
        // A source in its backoff is refused once its address is proven (never for a
        // spoofed one).
        assert_eq!(admit_quic(false, 0, true, 0, 4), Retry);
        assert_eq!(admit_quic(true, 0, true, 0, 4), RefuseBackoff);
        assert_eq!(admit_quic(false, 0, true, 1, 4), RefuseBackoff);
    }
}
