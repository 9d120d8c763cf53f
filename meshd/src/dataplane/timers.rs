//! The periodic work: WireGuard timers (rekey, retries, keepalives) every 100 ms, the
//! handshake rate-limit reset every second, a handshake to every known endpoint at start-up,
//! and every 5 s the sockets of endpoints no peer has any more. [`timer_worker`] is the
//! `meshd-timers` thread; a [`Pump`](super::Pump) runs the same [`Timers::run`] with its
//! own time.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::clock::Now;
use super::edge::{Bind, Edges};
use super::Shared;

/// How often the WireGuard timers run.
pub(super) const TIMER_PERIOD: Duration = Duration::from_millis(100);
/// How often connected sockets of peers that left or roamed are closed.
const SOCKET_SWEEP: Duration = Duration::from_secs(5);

/// The timer state of one host's data path.
pub(super) struct Timers {
    scratch: Vec<u8>,
    /// Set once the start-up handshakes went out.
    started: bool,
    last_second: u64,
    last_sweep: u64,
}

impl Timers {
    pub(super) fn new() -> Self {
        Timers {
            scratch: vec![0u8; 2048],
            started: false,
            last_second: 0,
            last_sweep: 0,
        }
    }

    /// The first call sends a handshake to every known endpoint; every later one (about
    /// every [`TIMER_PERIOD`]) runs the WireGuard timers and whatever is due at `now`.
    pub(super) fn run<E: Edges>(&mut self, sh: &Shared<E>, now: Now) {
        let (device, udp, stats) = (&sh.device, &sh.udp, &sh.stats);
        let send = |to, d: &[u8]| {
            if udp.send_to_peer(to, d, None).is_err() {
                stats.udp_send_errors.fetch_add(1, Ordering::Relaxed);
            }
        };
        if !self.started {
            self.started = true;
            self.last_second = now.micros;
            self.last_sweep = now.micros;
            device.initiate_all(&mut self.scratch, send);
            return;
        }
        if device.take_initiate_request() {
            // This host's key changed: re-handshake every peer under the new key now.
            device.initiate_all(&mut self.scratch, send);
        }
        device.update_timers(&mut self.scratch, send);
        let since = |t: u64| Duration::from_micros(now.micros.saturating_sub(t));
        if since(self.last_second) >= Duration::from_secs(1) {
            device.tick_second();
            self.last_second = now.micros;
        }
        if since(self.last_sweep) >= SOCKET_SWEEP {
            let table = device.table();
            let endpoints: HashSet<SocketAddr> =
                table.peers().iter().filter_map(|p| p.endpoint()).collect();
            let closed = udp.retain_endpoints(|a| endpoints.contains(a));
            if closed > 0 {
                tracing::debug!(closed, "closed connected sockets of departed endpoints");
            }
            self.last_sweep = now.micros;
        }
    }
}

/// The `meshd-timers` thread.
pub(super) fn timer_worker<E: Edges>(sh: &Shared<E>) {
    let mut timers = Timers::new();
    timers.run(sh, sh.clock.now());
    while !sh.stopped() {
        std::thread::sleep(TIMER_PERIOD);
        sh.clock.resync();
        timers.run(sh, sh.clock.now());
    }
}
