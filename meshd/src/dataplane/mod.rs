//! The packet path: TUN and UDP at the edges, [`meshd_tunnel::Device`] in the middle.
//!
//! Three threads, no channels on the packet path:
//! - `tx` ([`tx`]): reads batches from the TUN (one TSO super-packet splits into up to 128
//!   packets), seals each into one contiguous buffer ([`batch`]) and sends runs of
//!   equal-sized datagrams to the same endpoint with one GSO `sendmsg`. A lone packet (no
//!   TSO) is sent before the next read.
//! - `rx` ([`rx`]): `recvmmsg` with GRO (many datagrams per buffer), opens each into a TUN
//!   buffer and writes the batch with one coalescing `send_multiple` (GRO on the TUN). Then
//!   it runs the tx path once itself (if `tx` is not busy): the TUN write ran the host's
//!   stack, which has often queued its answer (echo reply, ACK, RPC response) on the TUN
//!   already, and sealing it here saves a thread wake-up per round trip. Only while the tx
//!   thread is parked or quiet (nothing read for 1 ms): under bulk traffic both threads stay
//!   busy in parallel.
//! - Parking ([`handoff`]): sparse traffic is carried by the rx thread alone, polling the
//!   socket and the TUN; a TUN pass that reads a batch wakes the tx thread, which owns the
//!   TUN until it has read nothing for 50 ms. A round trip then wakes one thread per host.
//! - Busy polling ([`busy_poll`], off by default): when a lone packet leaves while nothing
//!   came in lately (a request), the worker polls the socket for the answer for up to
//!   `busy_poll` instead of sleeping and handles it itself; symmetrically the rx thread waits
//!   on the TUN for an answer that was not ready at once. One worker polls at a time, at most
//!   5% of its time, never under bulk traffic.
//! - `timers` ([`timers`]): every 100 ms runs the WireGuard timers (rekey, retries,
//!   keepalive).
//!
//! The edges are traits ([`edge`]): a [`TunQueue`] and a [`Bind`] that move many buffers per
//! call with their offload metadata, and a [`Poller`] the workers sleep on, bundled as
//! [`Edges`]. Everything above is generic over them and monomorphised: [`Real`] (tun-rs,
//! [`udp::Udp`] with GSO/GRO and per-peer connected sockets, epoll) in the daemon, the
//! in-memory [`fake`]s in tests. A [`Pump`] runs one host's passes synchronously with the
//! time passed in, so a test can run many hosts in one thread.
//!
//! The tx path's state (buffers, send batch) sits behind a mutex so that both threads can
//! run it; whoever holds it reads, seals and sends in order, so a flow is never reordered.
//!
//! Buffers are allocated once per path, from `mmap` ([`Chunk`]s of one mapping): pages become
//! resident only when a packet is written into them, and after 5 idle seconds a path hands
//! them back (`MADV_DONTNEED`); the rx path's GRO table is made on the first batch that can
//! coalesce and dropped when idle. An idle daemon keeps almost no buffer memory; nothing is
//! allocated per packet or per batch. The peer table and the set of accepted inner
//! destinations are loaded once per batch.
//!
//! Policy: every packet passes the identity firewall ([`Enforcement`]) keyed on the peer's
//! public key — outbound before sealing, inbound after opening, after cryptokey routing and
//! after the inner-destination check (the device drops packets not addressed to this host
//! unless a routed prefix covers them, see [`meshd_tunnel::Destinations`]).

mod batch;
mod buffers;
mod busy_poll;
mod clock;
pub mod edge;
pub mod fake;
mod handoff;
mod pump;
#[cfg(test)]
mod pump_tests;
mod rx;
mod timers;
mod tun;
mod tx;
pub mod udp;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::Duration;

use ipnet::IpNet;
use meshd_firewall::{BlockLog, BlockLogConfig, Firewall, Verdict};
use meshd_policy::Direction;
use meshd_tunnel::Device;

pub use buffers::{Chunk, Slot};
pub use clock::Now;
pub use edge::{Bind, Edges, EpollPoller, Poller, Real, TunQueue, Woken, TUN_OFFSET};
pub use fake::{Fake, FakeBind, FakeHost, FakeNet, FakePoller, FakeTun};
pub use pump::Pump;

use clock::Clock;
use handoff::TxPark;
use rx::RxPath;
use tx::TxPath;

/// What the packet path needs to start.
#[derive(Debug, Clone)]
pub struct DataplaneConfig {
    /// TUN interface name.
    pub name: String,
    /// TUN MTU.
    pub mtu: u16,
    /// Overlay addresses of this host.
    pub addresses: Vec<IpNet>,
    /// UDP listen port (0: any).
    pub listen_port: u16,
    /// Firewall mark for the tunnel socket.
    pub fwmark: Option<u32>,
    /// How long a worker polls for the answer to a lone exchange before it sleeps (zero:
    /// never). See [`BusyPoll`].
    pub busy_poll: Duration,
}

/// IO-level counters (the device keeps the protocol-level ones). The tx path's counters and
/// the rx path's sit on separate cache lines: each is bumped every batch by its own thread.
#[derive(Debug, Default)]
#[repr(C)]
pub struct IoStats {
    /// Datagrams that could not be sent.
    pub udp_send_errors: AtomicU64,
    /// GSO sends and the datagrams they carried (their ratio is the mean batch).
    pub gso_sends: AtomicU64,
    /// Datagrams sent.
    pub datagrams_sent: AtomicU64,
    _rx_apart: [u64; 14],
    /// Datagrams received.
    pub datagrams_received: AtomicU64,
    /// TUN write errors.
    pub tun_write_errors: AtomicU64,
    /// Times bulk traffic woke the parked tx thread.
    pub tx_wakeups: AtomicU64,
}

/// The identity firewall and its block log, shared by the workers.
pub struct Enforcement {
    /// Conntrack and grant checks, keyed by the peer's local index (unique per live peer,
    /// cheaper to hash than its key).
    pub firewall: Firewall<u32>,
    /// Folded, rate-limited denials waiting to be logged (by peer index).
    pub blocks: BlockLog<u32>,
}

impl Enforcement {
    /// Defaults: 64 Ki flows, 100 block events per second, flows counted.
    pub fn new() -> Self {
        Self::with_flow_counts(true)
    }

    /// As [`new`](Self::new); `count_flows` off leaves the per-flow packet and byte counts
    /// out of the packet path (`flow_records = false`).
    pub fn with_flow_counts(count_flows: bool) -> Self {
        Enforcement {
            firewall: Firewall::new(meshd_firewall::Config {
                count_flows,
                ..meshd_firewall::Config::default()
            }),
            blocks: BlockLog::new(BlockLogConfig::default()),
        }
    }

    /// Checks one packet exchanged with `peer`; records denials for the block log.
    #[inline]
    pub(crate) fn allow(
        &self,
        peer: &meshd_tunnel::Peer,
        grants: &meshd_policy::PeerGrants,
        version: u64,
        dir: Direction,
        packet: &[u8],
        now: u64,
    ) -> bool {
        match self
            .firewall
            .check(peer.index, grants, version, dir, packet, now)
        {
            Verdict::Allow => true,
            Verdict::Deny(d) => {
                self.blocks.record(peer.index, &d, now);
                false
            }
            Verdict::Drop(_) => false,
        }
    }
}

impl Default for Enforcement {
    fn default() -> Self {
        Self::new()
    }
}

/// The inner destinations peers may send to: this host's overlay addresses, in transparent
/// mode its own underlay addresses (peers route them into their tunnels), and the operator's
/// routed prefixes. Decrypted packets to anything else are dropped (`inner_destination`).
pub fn local_destinations(
    overlay: &[IpNet],
    underlay: &[IpNet],
    routed: &[IpNet],
) -> meshd_tunnel::Destinations {
    meshd_tunnel::Destinations::new(overlay.iter().chain(underlay).map(IpNet::addr), routed)
}

/// Unix time in milliseconds (the firewall's clock; read once per batch).
pub use meshd_time::unix_millis;

/// A running packet path. Dropping it stops the threads.
///
/// `E` is the edges it runs on: the real TUN and sockets ([`Dataplane::start`]), or fakes
/// ([`Dataplane::start_with`]).
pub struct Dataplane<E: Edges = Real> {
    /// The bound UDP port.
    pub listen_port: u16,
    /// Kernel index of the TUN interface.
    pub if_index: u32,
    /// Whether the TUN runs with offload.
    pub offload: bool,
    /// IO counters.
    pub stats: Arc<IoStats>,
    shared: Arc<Shared<E>>,
    threads: Vec<JoinHandle<()>>,
}

/// What the workers share.
pub(crate) struct Shared<E: Edges> {
    device: Arc<Device>,
    policy: Arc<Enforcement>,
    udp: E::Bind,
    tun: E::Tun,
    poller: E::Poller,
    stop: AtomicBool,
    stats: Arc<IoStats>,
    /// The TUN → UDP path. The `tx` thread takes it on every TUN wake-up; the `rx` thread
    /// takes it (without waiting) right after it wrote to the TUN, to seal the reply that the
    /// write may have produced.
    tx: Padded<Mutex<TxPath>>,
    /// The UDP → TUN path: the `rx` thread's, or a busy-polling worker's.
    rx: Padded<Mutex<RxPath<E::Tun>>>,
    /// Busy polling: its window, and whether a worker is polling now (one at a time).
    busy_poll: Duration,
    polling: AtomicBool,
    clock: Clock,
    /// When each path last carried packets (read by the other thread without its lock).
    tx_active: Padded<LastActive>,
    rx_active: Padded<LastActive>,
    /// Whether the tx thread is awake (bulk traffic) or leaves the TUN to the rx thread.
    tx_park: TxPark,
}

impl<E: Edges> Shared<E> {
    fn new(
        device: Arc<Device>,
        policy: Arc<Enforcement>,
        edges: (E::Tun, E::Bind, E::Poller),
        mtu: u16,
        busy_poll: Duration,
    ) -> io::Result<Shared<E>> {
        let (tun, udp, poller) = edges;
        let tx = TxPath::new(device.table_cache(), usize::from(mtu), udp.max_segments())?;
        let rx = RxPath::new(device.table_cache(), device.destinations_cache())?;
        Ok(Shared {
            device,
            policy,
            udp,
            tun,
            poller,
            stop: AtomicBool::new(false),
            stats: Arc::new(IoStats::default()),
            tx: Padded(Mutex::new(tx)),
            rx: Padded(Mutex::new(rx)),
            busy_poll,
            polling: AtomicBool::new(false),
            clock: Clock::new(),
            tx_active: Padded(LastActive::default()),
            rx_active: Padded(LastActive::default()),
            tx_park: TxPark::new(),
        })
    }

    #[inline]
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// A value on cache lines of its own: what one worker writes every batch (its path's lock,
/// its activity stamp) must not share a line with what the other worker writes or reads
/// every batch (128 bytes: the adjacent-line prefetcher pairs 64-byte lines).
#[repr(align(128))]
struct Padded<T>(T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        &self.0
    }
}

/// When a path last carried packets, as [`Now::micros`].
#[derive(Default)]
struct LastActive {
    micros: AtomicU64,
}

impl LastActive {
    #[inline]
    fn touch(&self, now: Now) {
        self.micros.store(now.micros, Ordering::Relaxed);
    }

    /// Whether nothing passed for at least `d` before `now`.
    #[inline]
    fn quiet_at(&self, now: Now, d: Duration) -> bool {
        let last = self.micros.load(Ordering::Relaxed);
        u128::from(now.micros.saturating_sub(last)) >= d.as_micros()
    }
}

/// How long a path must have carried nothing before the other path's thread runs it.
const QUIET: Duration = Duration::from_millis(1);

/// Whether the rx path has received nothing lately (false while its thread is working).
#[inline]
fn rx_quiet<E: Edges>(sh: &Shared<E>, now: Now) -> bool {
    sh.rx_active.quiet_at(now, QUIET)
}

/// Whether the tx path has read nothing lately (false while its thread is working).
#[inline]
fn tx_quiet<E: Edges>(sh: &Shared<E>, now: Now) -> bool {
    sh.tx_active.quiet_at(now, QUIET)
}

impl Dataplane<Real> {
    /// Opens the TUN and the socket and starts the workers.
    pub fn start(
        device: Arc<Device>,
        policy: Arc<Enforcement>,
        cfg: &DataplaneConfig,
    ) -> anyhow::Result<Dataplane> {
        let udp = udp::Udp::bind(cfg.listen_port, cfg.fwmark)?;
        let tun = tun::open(&cfg.name, cfg.mtu, &cfg.addresses)?;
        let listen_port = udp.local_port();
        let (offload, if_index) = (tun.offload, tun.index);
        let poller = EpollPoller::new(&udp)?;
        let shared =
            Shared::<Real>::new(device, policy, (tun, udp, poller), cfg.mtu, cfg.busy_poll)?;
        Ok(Self::spawn(shared, listen_port, if_index, offload)?)
    }
}

impl<E: Edges> Dataplane<E> {
    /// Starts the workers over edges the caller made (fakes: a whole host's threads without
    /// root). The caller knows its edges: `listen_port` and `if_index` are 0 and `offload`
    /// false.
    pub fn start_with(
        device: Arc<Device>,
        policy: Arc<Enforcement>,
        edges: (E::Tun, E::Bind, E::Poller),
        mtu: u16,
        busy_poll: Duration,
    ) -> io::Result<Dataplane<E>> {
        let shared = Shared::<E>::new(device, policy, edges, mtu, busy_poll)?;
        Self::spawn(shared, 0, 0, false)
    }

    fn spawn(
        shared: Shared<E>,
        listen_port: u16,
        if_index: u32,
        offload: bool,
    ) -> io::Result<Dataplane<E>> {
        let shared = Arc::new(shared);
        let stats = shared.stats.clone();
        let mut dp = Dataplane {
            listen_port,
            if_index,
            offload,
            stats,
            shared,
            threads: Vec::new(),
        };
        type Worker<E> = fn(&Shared<E>);
        let workers: [(&str, Worker<E>); 3] = [
            ("meshd-tx", tx::tx_worker::<E>),
            ("meshd-rx", rx::rx_worker::<E>),
            ("meshd-timers", timers::timer_worker::<E>),
        ];
        for (name, work) in workers {
            let sh = dp.shared.clone();
            let t = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || work(&sh))?;
            dp.threads.push(t);
        }
        Ok(dp)
    }

    /// Stops the workers and waits for them (each wakes at least once a second).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _joined = t.join();
        }
    }
}

impl<E: Edges> Drop for Dataplane<E> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Locks a worker's path (a panic aborts the daemon, so there is no poisoned state to fear).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Takes a worker's path if nobody holds it.
fn try_lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

/// Idle seconds after which a path hands its written buffer pages back to the kernel.
const IDLE_RELEASE_SECS: u32 = 5;

/// Whether a path's buffers hold written pages, and for how many idle seconds.
#[derive(Default)]
struct Idle {
    used: bool,
    seconds: u32,
}

impl Idle {
    #[inline]
    fn touch(&mut self) {
        self.used = true;
        self.seconds = 0;
    }

    /// Called after an idle second; true when the buffers should be released now.
    fn tick(&mut self) -> bool {
        if !self.used {
            return false;
        }
        self.seconds += 1;
        if self.seconds < IDLE_RELEASE_SECS {
            return false;
        }
        self.used = false;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_active_is_quiet_only_after_the_interval() {
        let clock = Clock::new();
        let at = |ms: u64| clock.at(Duration::from_millis(ms));
        let a = LastActive::default();
        a.touch(at(1_000));
        assert!(!a.quiet_at(at(1_000), Duration::from_millis(50)));
        assert!(!a.quiet_at(at(1_049), Duration::from_millis(50)));
        assert!(a.quiet_at(at(1_050), Duration::from_millis(50)));
        a.touch(at(1_060));
        assert!(!a.quiet_at(at(1_060), Duration::from_millis(50)));
        // A reading from before the last touch (another thread's, slightly stale) is not quiet.
        assert!(!a.quiet_at(at(900), Duration::from_millis(50)));
    }

    #[test]
    fn idle_releases_after_five_idle_seconds_of_a_used_path() {
        let mut i = Idle::default();
        assert!(!i.tick(), "never used: nothing to release");
        i.touch();
        for _ in 1..IDLE_RELEASE_SECS {
            assert!(!i.tick());
        }
        assert!(i.tick());
        assert!(!i.tick(), "released once");
    }
}
