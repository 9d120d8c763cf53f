//! Wall-clock time for meshd, defined once.
//!
//! The pure crates (policy, control, firewall) take `now` as a parameter and never read a
//! clock; their `now` is a [`UnixTime`] (seconds since the Unix epoch), the packet path's a
//! [`UnixMillis`]. The edges that do read the clock call [`unix_now`] or [`unix_millis`], or
//! hold a [`Clock`] so that a test can hand in [`ManualClock`] (or its own virtual time)
//! instead of [`SystemClock`].
//!
//! A system clock set before 1970 reads as 0 rather than failing: every caller treats time as
//! a monotone-enough stamp and none can do better with an error.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch.
pub type UnixTime = u64;

/// Milliseconds since the Unix epoch.
pub type UnixMillis = u64;

/// Time since the epoch on the system clock (zero if the clock is before it).
fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Now, in seconds since the Unix epoch (the system clock).
pub fn unix_now() -> UnixTime {
    since_epoch().as_secs()
}

/// Now, in milliseconds since the Unix epoch (the system clock).
pub fn unix_millis() -> UnixMillis {
    millis_of(since_epoch())
}

/// Whole milliseconds of `d`, saturating (a `u64` of milliseconds lasts 584 million years).
fn millis_of(d: Duration) -> UnixMillis {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A source of wall-clock time. Code that reads the time holds one; tests pass a virtual one.
pub trait Clock {
    /// Now, in milliseconds since the Unix epoch.
    fn unix_millis(&self) -> UnixMillis;

    /// Now, in whole seconds since the Unix epoch.
    fn unix_now(&self) -> UnixTime {
        self.unix_millis() / 1000
    }
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn unix_millis(&self) -> UnixMillis {
        unix_millis()
    }

    fn unix_now(&self) -> UnixTime {
        unix_now()
    }
}

impl<C: Clock + ?Sized> Clock for &C {
    fn unix_millis(&self) -> UnixMillis {
        (**self).unix_millis()
    }

    fn unix_now(&self) -> UnixTime {
        (**self).unix_now()
    }
}

/// A clock that moves only when told to (tests). Shared by reference between threads.
#[derive(Debug, Default)]
pub struct ManualClock {
    millis: AtomicU64,
}

impl ManualClock {
    /// A clock standing at `millis` milliseconds since the epoch.
    pub fn at_millis(millis: UnixMillis) -> ManualClock {
        ManualClock {
            millis: AtomicU64::new(millis),
        }
    }

    /// A clock standing at `secs` seconds since the epoch.
    pub fn at(secs: UnixTime) -> ManualClock {
        ManualClock::at_millis(secs.saturating_mul(1000))
    }

    /// Sets the time to `millis` (it may go backwards: wall clocks do).
    pub fn set_millis(&self, millis: UnixMillis) {
        self.millis.store(millis, Ordering::Relaxed);
    }

    /// Moves the time forward by `by` (saturating).
    pub fn advance(&self, by: Duration) {
        let by = millis_of(by);
        // fetch_update with a closure that always returns Some cannot fail.
        let _ = self
            .millis
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| {
                Some(m.saturating_add(by))
            });
    }
}

impl Clock for ManualClock {
    fn unix_millis(&self) -> UnixMillis {
        self.millis.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_readings_agree_with_each_other() {
        let s = unix_now();
        let ms = unix_millis();
        // Taken one after the other: the millisecond reading is in the same or the next second.
        assert!(ms / 1000 >= s && ms / 1000 - s <= 1, "{s} s vs {ms} ms");
        // After 2020 and well before the millisecond count could overflow.
        assert!(s > 1_577_836_800, "{s}");
        let c = SystemClock;
        assert!(c.unix_now() >= s);
        assert!(c.unix_millis() >= ms);
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::at(1_700_000_000);
        assert_eq!(c.unix_now(), 1_700_000_000);
        assert_eq!(c.unix_millis(), 1_700_000_000_000);
        c.advance(Duration::from_millis(1_999));
        assert_eq!(c.unix_millis(), 1_700_000_001_999);
        // Seconds are whole seconds, rounded down.
        assert_eq!(c.unix_now(), 1_700_000_001);
        c.set_millis(5);
        assert_eq!(c.unix_now(), 0);
        c.set_millis(u64::MAX - 1);
        c.advance(Duration::from_secs(10));
        assert_eq!(c.unix_millis(), u64::MAX);
        assert_eq!(ManualClock::at(u64::MAX).unix_millis(), u64::MAX);
    }

    #[test]
    fn clocks_work_behind_references_and_trait_objects() {
        fn read(c: impl Clock) -> UnixTime {
            c.unix_now()
        }
        let c = ManualClock::at(42);
        assert_eq!(read(&c), 42);
        let dynamic: &dyn Clock = &c;
        assert_eq!(read(dynamic), 42);
    }

    #[test]
    fn millis_saturate() {
        assert_eq!(millis_of(Duration::from_millis(1234)), 1234);
        assert_eq!(millis_of(Duration::MAX), u64::MAX);
    }
}
