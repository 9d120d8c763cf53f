//! Bounded busy polling for the answer to a lone exchange ([`BusyPoll`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::edge::{Bind, Edges, Poller};
use super::rx::rx_and_answer;
use super::tx::TxPass;
use super::{try_lock, Shared};

/// Bounded busy polling for the answer to a lone exchange.
///
/// An idle thread woken by the kernel costs tens of microseconds (more in a VM) on each
/// side of a round trip. When one path has just carried a packet while the other was quiet
/// (a request went out; a request came in and its answer is not ready yet), the thread that
/// carried it polls the other path's edge for up to `window` and handles the answer
/// itself. Under bulk traffic both paths are busy and nobody polls. One worker polls at a
/// time and each spends at most [`BUSY_POLL_SHARE`] of its time polling, so a host with many
/// sparse exchanges never burns more than that.
pub(super) struct BusyPoll {
    window: Duration,
    /// Start of the current accounting second and the time spent polling in it.
    second: Instant,
    spent: Duration,
}

/// The most of each second a worker may spend busy polling.
const BUSY_POLL_SHARE: Duration = Duration::from_millis(50);

impl BusyPoll {
    pub(super) fn new(window: Duration) -> Self {
        BusyPoll {
            window,
            second: Instant::now(),
            spent: Duration::ZERO,
        }
    }

    /// Polls `ready` without sleeping until it says yes (true) or the window closes.
    /// `polling` is shared by the workers: only one polls at a time.
    fn spin(&mut self, polling: &AtomicBool, mut ready: impl FnMut() -> bool) -> bool {
        if self.window.is_zero() {
            return false;
        }
        let start = Instant::now();
        if start.duration_since(self.second) >= Duration::from_secs(1) {
            self.second = start;
            self.spent = Duration::ZERO;
        }
        if self.spent >= BUSY_POLL_SHARE
            || polling
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return false;
        }
        let window = self.window.min(BUSY_POLL_SHARE - self.spent);
        let mut got = false;
        while !got && start.elapsed() < window {
            got = ready();
            if !got {
                // The answer's path often runs on this very CPU (the peer's reader was
                // woken here by our send): let it run rather than spin against it.
                std::thread::yield_now();
            }
        }
        polling.store(false, Ordering::Release);
        self.spent += start.elapsed();
        got
    }

    /// After a send: waits for the answer on the sockets and delivers it (and the tx pass
    /// for whatever that delivery produced).
    pub(super) fn wait_for_rx<E: Edges>(&mut self, sh: &Shared<E>) {
        if !self.spin(&sh.polling, || sh.poller.socket_readable(&sh.udp)) {
            return;
        }
        if let Some(mut rx) = try_lock(&sh.rx) {
            let mut ready = <E::Bind as Bind>::Ready::default();
            rx_and_answer(sh, &mut rx, &mut ready, &sh.clock);
        }
    }

    /// After a delivery: waits for the answer on the TUN and sends it.
    pub(super) fn wait_for_tx<E: Edges>(&mut self, sh: &Shared<E>) {
        if !self.spin(&sh.polling, || sh.poller.tun_readable(&sh.tun, 0)) {
            return;
        }
        if let Some(mut tx) = try_lock(&sh.tx) {
            if let TxPass::Failed(e) = tx.run(sh, &sh.clock) {
                tracing::debug!(error = %e, "TUN read failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::udp::poll_one;
    use std::io::Write as _;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    fn readable(r: &UnixStream) -> impl FnMut() -> bool + '_ {
        move || poll_one(r.as_raw_fd(), libc::POLLIN, 0)
    }

    #[test]
    fn busy_poll_sees_data_and_gives_up_after_its_window() {
        let (mut w, r) = UnixStream::pair().expect("socketpair");
        let polling = AtomicBool::new(false);
        let mut p = BusyPoll::new(Duration::from_millis(2));
        let t = Instant::now();
        assert!(!p.spin(&polling, readable(&r)), "nothing to read");
        assert!(t.elapsed() >= Duration::from_millis(2));
        assert!(!polling.load(Ordering::Relaxed), "flag released");
        w.write_all(b"x").expect("write");
        assert!(p.spin(&polling, readable(&r)), "data is ready");
    }

    #[test]
    fn busy_poll_is_off_when_zero_taken_or_over_budget() {
        let (mut w, r) = UnixStream::pair().expect("socketpair");
        w.write_all(b"x").expect("write");
        let polling = AtomicBool::new(false);
        assert!(!BusyPoll::new(Duration::ZERO).spin(&polling, readable(&r)));
        let mut p = BusyPoll::new(Duration::from_millis(1));
        polling.store(true, Ordering::Relaxed);
        assert!(!p.spin(&polling, readable(&r)), "another worker polls");
        polling.store(false, Ordering::Relaxed);
        p.spent = BUSY_POLL_SHARE;
        assert!(!p.spin(&polling, readable(&r)), "budget spent this second");
        p.second -= Duration::from_secs(1);
        assert!(p.spin(&polling, readable(&r)), "a new second, a new budget");
    }

    #[test]
    fn busy_poll_spends_at_most_its_share_per_second() {
        let (_w, r) = UnixStream::pair().expect("socketpair");
        let polling = AtomicBool::new(false);
        let mut p = BusyPoll::new(Duration::from_millis(20));
        let t = Instant::now();
        for _ in 0..10 {
            p.spin(&polling, readable(&r));
        }
        // 10 windows of 20 ms would be 200 ms; the share caps it (allow scheduling slack,
        // unless the second rolled over on a very slow machine).
        if t.elapsed() < Duration::from_secs(1) {
            assert!(
                p.spent <= BUSY_POLL_SHARE + Duration::from_millis(5),
                "{:?}",
                p.spent
            );
        }
    }
}
