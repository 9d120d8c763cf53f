//! The workers' clock. One reading per pass gives both the activity stamps and the firewall's
//! wall-clock milliseconds; the wall clock is derived from the monotonic one with an offset
//! that the timer thread re-reads every 100 ms, so a stepped wall clock is followed within
//! that (the firewall counts seconds).
//!
//! Where the kernel itself keeps time with the CPU's invariant time-stamp counter
//! (clocksource `tsc`, x86-64), a reading is one `rdtsc` scaled by a rate the timer thread
//! calibrates against the monotonic clock. `clock_gettime` goes through the vDSO's data page,
//! which after a few idle milliseconds is a cache and TLB miss: ~2 µs per call on the 2-vCPU
//! lab, four calls per round trip, against ~10 ns for the counter.

use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One reading of the [`Clock`] (or a time a [`Pump`](super::Pump) is given).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    /// Microseconds since the dataplane started.
    pub micros: u64,
    /// Unix milliseconds.
    pub unix_ms: u64,
}

/// Where a pass takes its time from: the workers read the [`Clock`] (once per batch, and
/// only once something was read); a [`Pump`](super::Pump) passes a fixed [`Now`].
pub trait ReadClock {
    /// The time now.
    fn now(&self) -> Now;
}

impl ReadClock for Clock {
    #[inline]
    fn now(&self) -> Now {
        Clock::now(self)
    }
}

impl ReadClock for Now {
    #[inline]
    fn now(&self) -> Now {
        *self
    }
}

/// See the module documentation.
pub struct Clock {
    base: Instant,
    /// Unix milliseconds at `base` (as of the last `resync`).
    unix_at_base_ms: AtomicU64,
    tsc: Option<Tsc>,
}

impl Clock {
    /// A clock using the time-stamp counter where the kernel trusts it.
    pub fn new() -> Self {
        Self::with_counter(tsc_is_reliable())
    }

    /// A clock that uses the time-stamp counter only if `counter` (and the CPU has one).
    pub fn with_counter(counter: bool) -> Self {
        let clock = Clock {
            base: Instant::now(),
            unix_at_base_ms: AtomicU64::new(0),
            tsc: counter.then(Tsc::new).flatten(),
        };
        clock.resync();
        clock
    }

    /// Reads the clock.
    #[inline]
    pub fn now(&self) -> Now {
        let micros = match self.tsc.as_ref().and_then(Tsc::micros) {
            Some(m) => m,
            None => u64::try_from(self.base.elapsed().as_micros()).unwrap_or(u64::MAX),
        };
        self.at_micros(micros)
    }

    /// The reading `since_base` after the clock started.
    #[cfg(test)]
    pub fn at(&self, since_base: Duration) -> Now {
        self.at_micros(u64::try_from(since_base.as_micros()).unwrap_or(u64::MAX))
    }

    fn at_micros(&self, micros: u64) -> Now {
        let base = self.unix_at_base_ms.load(Ordering::Relaxed);
        Now {
            micros,
            unix_ms: base.saturating_add(micros / 1000),
        }
    }

    /// Re-reads the wall clock and recalibrates the counter (the timer thread, every 100 ms).
    pub fn resync(&self) {
        let elapsed = self.base.elapsed();
        let ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        let base = super::unix_millis().saturating_sub(ms);
        self.unix_at_base_ms.store(base, Ordering::Relaxed);
        if let Some(t) = &self.tsc {
            t.calibrate(elapsed);
        }
    }

    /// Whether readings come from the time-stamp counter (once calibrated).
    #[cfg(test)]
    pub fn uses_counter(&self) -> bool {
        self.tsc.as_ref().is_some_and(|t| t.micros().is_some())
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether the kernel keeps time with the time-stamp counter (it does so only when the counter
/// is invariant and synchronised across CPUs).
fn tsc_is_reliable() -> bool {
    cfg!(target_arch = "x86_64")
        && std::fs::read_to_string(
            "/sys/devices/system/clocksource/clocksource0/current_clocksource",
        )
        .is_ok_and(|s| s.trim() == "tsc")
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no preconditions on x86-64.
    unsafe { std::arch::x86_64::_rdtsc() }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline]
fn rdtsc() -> u64 {
    0
}

/// Counter → microseconds since the clock's base: an anchor `(ticks, micros)` and a rate
/// (microseconds per tick, 32.32 fixed point), published under a sequence lock by the one
/// calibrating thread.
struct Tsc {
    /// Counter at the clock's base.
    start: u64,
    seq: AtomicU64,
    anchor_ticks: AtomicU64,
    anchor_micros: AtomicU64,
    /// 0 until the first calibration.
    rate: AtomicU64,
}

/// Shortest span a rate is measured over.
const MIN_CALIBRATION: Duration = Duration::from_millis(50);

impl Tsc {
    fn new() -> Option<Tsc> {
        let start = rdtsc();
        (start != 0).then(|| Tsc {
            start,
            seq: AtomicU64::new(0),
            anchor_ticks: AtomicU64::new(start),
            anchor_micros: AtomicU64::new(0),
            rate: AtomicU64::new(0),
        })
    }

    /// Microseconds since the base, or `None` before the first calibration.
    #[inline]
    fn micros(&self) -> Option<u64> {
        loop {
            let s1 = self.seq.load(Ordering::Acquire);
            let ticks = self.anchor_ticks.load(Ordering::Relaxed);
            let micros = self.anchor_micros.load(Ordering::Relaxed);
            let rate = self.rate.load(Ordering::Relaxed);
            fence(Ordering::Acquire);
            if s1 & 1 == 1 || self.seq.load(Ordering::Relaxed) != s1 {
                std::hint::spin_loop();
                continue;
            }
            if rate == 0 {
                return None;
            }
            let since = u128::from(rdtsc().saturating_sub(ticks));
            let add = (since * u128::from(rate)) >> 32;
            return Some(micros.saturating_add(u64::try_from(add).unwrap_or(u64::MAX)));
        }
    }

    /// Measures the rate over the whole time since the base (`elapsed`, read just now) and
    /// re-anchors there.
    fn calibrate(&self, elapsed: Duration) {
        let now = rdtsc();
        let ticks = now.saturating_sub(self.start);
        if elapsed < MIN_CALIBRATION || ticks == 0 {
            return;
        }
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let rate = (u128::from(micros) << 32) / u128::from(ticks);
        let Ok(rate) = u64::try_from(rate) else {
            return;
        };
        let s = self.seq.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::Release);
        self.anchor_ticks.store(now, Ordering::Relaxed);
        self.anchor_micros.store(micros, Ordering::Relaxed);
        self.rate.store(rate.max(1), Ordering::Relaxed);
        self.seq.store(s.wrapping_add(2), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derives_wall_time_from_one_monotonic_read() {
        let clock = Clock::with_counter(false);
        let wall = super::super::unix_millis();
        let now = clock.now();
        // Derived and read wall clocks agree (allowing for the time between the two reads).
        assert!(
            now.unix_ms.abs_diff(wall) < 1_000,
            "{} vs {wall}",
            now.unix_ms
        );
        let later = clock.at(Duration::from_micros(now.micros) + Duration::from_secs(90));
        assert_eq!(later.unix_ms - now.unix_ms, 90_000);
        assert_eq!(later.micros - now.micros, 90_000_000);
        // A resync follows the wall clock again (here: no step, so nothing moves much).
        clock.resync();
        assert!(clock.now().unix_ms.abs_diff(super::super::unix_millis()) < 1_000);
    }

    #[test]
    fn counter_readings_track_the_monotonic_clock() {
        let clock = Clock::with_counter(true);
        if clock.tsc.is_none() {
            return; // no counter on this CPU: the Instant path is tested above
        }
        assert!(
            !clock.uses_counter(),
            "no rate before the first calibration"
        );
        let start = Instant::now();
        std::thread::sleep(Duration::from_millis(120));
        clock.resync();
        assert!(clock.uses_counter());
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(30));
            let by_counter = clock.now().micros;
            let by_instant = u64::try_from(clock.base.elapsed().as_micros()).unwrap_or(0);
            // Within 2% of the elapsed time (the rate was measured over ≥ 120 ms) + 1 ms.
            let tolerance = by_instant / 50 + 1_000;
            assert!(
                by_counter.abs_diff(by_instant) <= tolerance,
                "counter {by_counter} µs vs monotonic {by_instant} µs after {:?}",
                start.elapsed()
            );
        }
        // Readings do not go backwards between calibrations.
        let a = clock.now().micros;
        let b = clock.now().micros;
        assert!(b >= a);
    }
}
