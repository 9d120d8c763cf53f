//! Virtual time: a clock that only tests move, and a deterministic event queue.
//!
//! [`Clock`] is a base [`Instant`] (read once, when the clock is made) plus an offset the test
//! advances; the matching wall-clock time is a fixed Unix base plus the same offset, so every
//! consumer sees one consistent "now": sessions and timers an `Instant`, the coordinator Unix
//! seconds, the firewall Unix milliseconds.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The Unix time (ms) a new [`Clock`] starts at: 2023-11-14T22:13:20Z.
pub const UNIX_BASE_MS: u64 = 1_700_000_000_000;

/// A clock tests advance. Never reads the system clock after [`Clock::new`].
#[derive(Debug, Clone)]
pub struct Clock {
    base: Instant,
    offset: Duration,
    unix_base_ms: u64,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    /// A clock at [`UNIX_BASE_MS`].
    pub fn new() -> Self {
        Self::at_unix_ms(UNIX_BASE_MS)
    }

    /// A clock whose wall-clock time starts at `unix_ms`.
    pub fn at_unix_ms(unix_ms: u64) -> Self {
        Clock {
            base: Instant::now(),
            offset: Duration::ZERO,
            unix_base_ms: unix_ms,
        }
    }

    /// The current virtual instant.
    pub fn now(&self) -> Instant {
        self.base + self.offset
    }

    /// Virtual time since the clock was made.
    pub fn elapsed(&self) -> Duration {
        self.offset
    }

    /// The current wall-clock time in Unix milliseconds.
    pub fn unix_millis(&self) -> u64 {
        self.unix_base_ms
            .saturating_add(u64::try_from(self.offset.as_millis()).unwrap_or(u64::MAX))
    }

    /// The current wall-clock time in Unix seconds.
    pub fn unix_secs(&self) -> u64 {
        self.unix_millis() / 1000
    }

    /// The Unix seconds of a virtual instant (instants before the base map to the base).
    pub fn unix_secs_at(&self, t: Instant) -> u64 {
        let ms =
            u64::try_from(t.saturating_duration_since(self.base).as_millis()).unwrap_or(u64::MAX);
        self.unix_base_ms.saturating_add(ms) / 1000
    }

    /// The virtual instant of a Unix time in seconds (times before the base map to the base).
    pub fn instant_of_unix_secs(&self, secs: u64) -> Instant {
        let ms = secs.saturating_mul(1000).saturating_sub(self.unix_base_ms);
        self.base + Duration::from_millis(ms)
    }

    /// Moves time forward by `d`.
    pub fn advance(&mut self, d: Duration) {
        self.offset += d;
    }

    /// Moves time forward to `t`; an earlier `t` leaves the clock where it is (time never
    /// goes back).
    pub fn advance_to(&mut self, t: Instant) {
        let off = t.saturating_duration_since(self.base);
        if off > self.offset {
            self.offset = off;
        }
    }
}

/// A deterministic event queue: events come out in time order, events at the same instant in
/// the order they were pushed.
#[derive(Debug)]
pub struct Schedule<E> {
    events: BTreeMap<(Instant, u64), E>,
    seq: u64,
}

impl<E> Default for Schedule<E> {
    fn default() -> Self {
        Schedule {
            events: BTreeMap::new(),
            seq: 0,
        }
    }
}

impl<E> Schedule<E> {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `event` for `at`.
    pub fn push(&mut self, at: Instant, event: E) {
        self.events.insert((at, self.seq), event);
        self.seq += 1;
    }

    /// When the earliest event is due.
    pub fn next_at(&self) -> Option<Instant> {
        self.events.keys().next().map(|k| k.0)
    }

    /// The earliest event if it is due at or before `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<(Instant, E)> {
        let (&(at, seq), _) = self.events.iter().next()?;
        if at > now {
            return None;
        }
        self.events.remove(&(at, seq)).map(|e| (at, e))
    }

    /// Keeps only the events for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&E) -> bool) {
        self.events.retain(|_, e| keep(e));
    }

    /// Events queued.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Nothing queued.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_moves_only_when_told_and_keeps_units_consistent() {
        let mut c = Clock::new();
        let t0 = c.now();
        assert_eq!(c.now(), t0);
        assert_eq!(c.unix_millis(), UNIX_BASE_MS);
        c.advance(Duration::from_millis(1500));
        assert_eq!(c.now() - t0, Duration::from_millis(1500));
        assert_eq!(c.unix_millis(), UNIX_BASE_MS + 1500);
        assert_eq!(c.unix_secs(), UNIX_BASE_MS / 1000 + 1);
        c.advance_to(t0);
        assert_eq!(c.elapsed(), Duration::from_millis(1500), "never backwards");
        let later = c.instant_of_unix_secs(UNIX_BASE_MS / 1000 + 10);
        assert_eq!(later - t0, Duration::from_secs(10));
        assert_eq!(c.unix_secs_at(later), UNIX_BASE_MS / 1000 + 10);
    }

    #[test]
    fn schedule_orders_by_time_then_insertion() {
        let c = Clock::new();
        let t = c.now();
        let mut s = Schedule::new();
        s.push(t + Duration::from_secs(2), "c");
        s.push(t + Duration::from_secs(1), "a");
        s.push(t + Duration::from_secs(1), "b");
        assert_eq!(s.next_at(), Some(t + Duration::from_secs(1)));
        assert!(s.pop_due(t).is_none());
        let far = t + Duration::from_secs(5);
        let order: Vec<_> = std::iter::from_fn(|| s.pop_due(far).map(|e| e.1)).collect();
        assert_eq!(order, ["a", "b", "c"]);
        assert!(s.is_empty());
    }
}
