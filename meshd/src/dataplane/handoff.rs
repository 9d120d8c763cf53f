//! Handing the TUN between the workers: [`TxPark`] (is the tx worker awake or parked) and
//! [`Signal`] (the socketpair that wakes the rx worker's epoll when the tx worker parks).

use std::io::{self, Read as _, Write as _};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use super::lock;

/// Packets one TUN pass must read for the rx thread to wake the tx thread (bulk traffic:
/// from then on the two directions run on two cores).
pub(super) const BULK_PACKETS: usize = 8;
/// How long the awake tx thread waits for the TUN before it parks and hands it back.
pub(super) const TX_LINGER_MS: i32 = 50;

/// Whether the tx thread watches the TUN (awake) or leaves it to the rx thread (parked).
///
/// Sparse traffic (requests, pings, keepalives) is carried by the rx thread alone: it polls
/// both the socket and the TUN, so a round trip wakes one thread per host, and nothing wakes
/// a second thread just to find the packet gone. When a TUN pass reads a batch
/// ([`BULK_PACKETS`]) the rx thread wakes the tx thread, which then owns the TUN until it
/// has read nothing for [`TX_LINGER_MS`]; it parks and signals the rx thread to watch the
/// TUN again. Someone always watches the TUN: the flag is cleared by the tx thread only, and
/// the rx thread re-reads it after every signal.
pub(super) struct TxPark {
    awake: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

impl TxPark {
    pub(super) fn new() -> Self {
        TxPark {
            awake: AtomicBool::new(false),
            lock: Mutex::new(()),
            cv: Condvar::new(),
        }
    }

    pub(super) fn is_awake(&self) -> bool {
        self.awake.load(Ordering::Acquire)
    }

    /// Wakes the tx thread (the rx thread saw bulk traffic on the TUN); false if it was
    /// awake already.
    pub(super) fn wake(&self) -> bool {
        if self.is_awake() {
            return false;
        }
        {
            let _g = lock(&self.lock);
            self.awake.store(true, Ordering::Release);
        }
        self.cv.notify_one();
        true
    }

    /// The tx thread goes back to sleep.
    pub(super) fn park(&self) {
        let _g = lock(&self.lock);
        self.awake.store(false, Ordering::Release);
    }

    /// The tx thread waits (up to `timeout`) to be woken; true if awake.
    pub(super) fn wait(&self, timeout: Duration) -> bool {
        if self.is_awake() {
            return true;
        }
        let g = lock(&self.lock);
        let (_g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |_| !self.awake.load(Ordering::Acquire))
            .unwrap_or_else(|e| e.into_inner());
        self.is_awake()
    }
}

/// A self-pipe that wakes the rx thread from `epoll_wait` (to re-read whether it must watch
/// the TUN).
pub(super) struct Signal {
    rx: UnixStream,
    tx: UnixStream,
}

impl Signal {
    pub(super) fn new() -> io::Result<Self> {
        let (rx, tx) = UnixStream::pair()?;
        rx.set_nonblocking(true)?;
        tx.set_nonblocking(true)?;
        Ok(Signal { rx, tx })
    }

    pub(super) fn signal(&self) {
        // A full pipe already holds a pending signal.
        let _ = (&self.tx).write(&[1]);
    }

    pub(super) fn drain(&self) {
        let mut buf = [0u8; 64];
        while matches!((&self.rx).read(&mut buf), Ok(n) if n > 0) {}
    }
}

impl AsRawFd for Signal {
    /// The end that polls readable while a signal is pending.
    fn as_raw_fd(&self) -> RawFd {
        self.rx.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn park_wake_and_wait() {
        let p = TxPark::new();
        assert!(!p.is_awake());
        assert!(
            !p.wait(Duration::from_millis(1)),
            "parked: the wait times out"
        );
        assert!(p.wake());
        assert!(!p.wake(), "already awake");
        assert!(p.wait(Duration::from_secs(1)));
        p.park();
        assert!(!p.is_awake());
        let p = std::sync::Arc::new(p);
        let q = p.clone();
        let t = std::thread::spawn(move || q.wait(Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(5));
        p.wake();
        assert!(t.join().unwrap(), "a waiting tx thread is woken");
    }

    #[test]
    fn signal_polls_readable_until_drained() {
        let s = Signal::new().unwrap();
        let fd = s.as_raw_fd();
        assert!(!super::super::udp::poll_one(fd, libc::POLLIN, 0));
        s.signal();
        s.signal();
        assert!(super::super::udp::poll_one(fd, libc::POLLIN, 0));
        s.drain();
        assert!(!super::super::udp::poll_one(fd, libc::POLLIN, 0));
    }
}
