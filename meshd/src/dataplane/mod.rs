//! The packet path: TUN and UDP at the edges, [`meshd_tunnel::Device`] in the middle.
//!
//! Three threads, no channels on the packet path:
//! - `tx`: reads batches from the TUN (one TSO super-packet splits into up to 128 packets),
//!   seals each into one contiguous buffer and sends runs of equal-sized datagrams to the same
//!   endpoint with one GSO `sendmsg`. A lone packet (no TSO) is sent before the next read.
//! - `rx`: `recvmmsg` with GRO (many datagrams per buffer), opens each into a TUN buffer and
//!   writes the batch with one coalescing `send_multiple` (GRO on the TUN). Then it runs the
//!   tx path once itself (if `tx` is not busy): the TUN write ran the host's stack, which has
//!   often queued its answer (echo reply, ACK, RPC response) on the TUN already, and sealing
//!   it here saves a thread wake-up per round trip. Only while the tx thread is parked or
//!   quiet (nothing read for 1 ms): under bulk traffic both threads stay busy in parallel.
//! - Parking ([`TxPark`]): sparse traffic is carried by the rx thread alone, polling the socket
//!   and the TUN; a TUN pass that reads a batch wakes the tx thread, which owns the TUN until
//!   it has read nothing for 50 ms. A round trip then wakes one thread per host, not two.
//! - Busy polling ([`BusyPoll`], off by default): when a lone packet leaves while nothing came
//!   in lately (a request), the worker polls the socket for the answer for up to `busy_poll`
//!   instead of sleeping and handles it itself; symmetrically the rx thread waits on the TUN
//!   for an answer that was not ready at once. One worker polls at a time, at most 5% of its
//!   time, never under bulk traffic.
//! - `timers`: every 100 ms runs the WireGuard timers (rekey, retries, keepalive).
//!
//! The tx path's state (buffers, send batch) sits behind a mutex so that both threads can
//! run it; whoever holds it reads, seals and sends in order, so a flow is never reordered.
//!
//! Buffers are allocated once per path, from `mmap` ([`buffers::Pages`]): pages become
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

mod buffers;
mod clock;
mod tun;
pub mod udp;

use std::collections::HashSet;
use std::io::{self, IoSliceMut, Read as _, Write as _};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use meshd_firewall::{BlockLog, BlockLogConfig, Firewall, Verdict};
use meshd_policy::Direction;
use meshd_tunnel::{Decap, DestinationsCache, Device, Encap, RouteMemo, TableCache};
use quinn_udp::RecvMeta;
use tun_rs::{GROTable, SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use buffers::{page_round, Chunk, Pages, Slot};
use clock::{Clock, Now};
use udp::Udp;

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

/// IO-level counters (the device keeps the protocol-level ones).
#[derive(Debug, Default)]
pub struct IoStats {
    /// Datagrams that could not be sent.
    pub udp_send_errors: AtomicU64,
    /// TUN write errors.
    pub tun_write_errors: AtomicU64,
    /// GSO sends and the datagrams they carried (their ratio is the mean batch).
    pub gso_sends: AtomicU64,
    /// Datagrams sent.
    pub datagrams_sent: AtomicU64,
    /// Datagrams received.
    pub datagrams_received: AtomicU64,
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
    /// Defaults: 64 Ki flows, 100 block events per second.
    pub fn new() -> Self {
        Enforcement {
            firewall: Firewall::new(meshd_firewall::Config::default()),
            blocks: BlockLog::new(BlockLogConfig::default()),
        }
    }

    /// Checks one packet exchanged with `peer`; records denials for the block log.
    #[inline]
    fn allow(
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
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A running packet path. Dropping it stops the threads.
pub struct Dataplane {
    /// The bound UDP port.
    pub listen_port: u16,
    /// Kernel index of the TUN interface.
    pub if_index: u32,
    /// Whether the TUN runs with offload.
    pub offload: bool,
    /// IO counters.
    pub stats: Arc<IoStats>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// What the workers share.
struct Shared {
    device: Arc<Device>,
    policy: Arc<Enforcement>,
    udp: Udp,
    tun: SyncDevice,
    offload: bool,
    stop: AtomicBool,
    stats: Arc<IoStats>,
    /// The TUN → UDP path. The `tx` thread takes it on every TUN wake-up; the `rx` thread
    /// takes it (without waiting) right after it wrote to the TUN, to seal the reply that the
    /// write may have produced.
    tx: Mutex<TxPath>,
    /// The UDP → TUN path: the `rx` thread's, or a busy-polling worker's.
    rx: Mutex<RxPath>,
    /// Busy polling: its window, and whether a worker is polling now (one at a time).
    busy_poll: Duration,
    polling: AtomicBool,
    clock: Clock,
    /// When each path last carried packets (read by the other thread without its lock).
    tx_active: LastActive,
    rx_active: LastActive,
    /// Whether the tx thread is awake (bulk traffic) or leaves the TUN to the rx thread.
    tx_park: TxPark,
    /// Wakes the rx thread when the tx thread parks.
    rx_wake: Signal,
}

/// When a path last carried packets, as [`Now::micros`].
#[derive(Default)]
struct LastActive {
    micros: AtomicU64,
}

impl LastActive {
    fn touch(&self, now: Now) {
        self.micros.store(now.micros, Ordering::Relaxed);
    }

    /// Whether nothing passed for at least `d` before `now`.
    fn quiet_at(&self, now: Now, d: Duration) -> bool {
        let last = self.micros.load(Ordering::Relaxed);
        u128::from(now.micros.saturating_sub(last)) >= d.as_micros()
    }
}

impl Dataplane {
    /// Opens the TUN and the socket and starts the workers.
    pub fn start(
        device: Arc<Device>,
        policy: Arc<Enforcement>,
        cfg: &DataplaneConfig,
    ) -> anyhow::Result<Dataplane> {
        let udp = Udp::bind(cfg.listen_port, cfg.fwmark)?;
        let tun = tun::open(&cfg.name, cfg.mtu, &cfg.addresses)?;
        let listen_port = udp.local_port();
        let offload = tun.offload;
        let if_index = tun.index;
        let stats = Arc::new(IoStats::default());
        let tx = TxPath::new(
            device.table_cache(),
            usize::from(cfg.mtu),
            udp.max_segments(),
        )?;
        let rx = RxPath::new(device.table_cache(), device.destinations_cache())?;
        let shared = Arc::new(Shared {
            device,
            policy,
            udp,
            tun: tun.dev,
            offload,
            stop: AtomicBool::new(false),
            stats: stats.clone(),
            tx: Mutex::new(tx),
            rx: Mutex::new(rx),
            busy_poll: cfg.busy_poll,
            polling: AtomicBool::new(false),
            clock: Clock::new(),
            tx_active: LastActive::default(),
            rx_active: LastActive::default(),
            tx_park: TxPark::new(),
            rx_wake: Signal::new()?,
        });

        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new().name(name.into()).spawn(f)
        };
        let mut threads = Vec::new();
        let sh = shared.clone();
        threads.push(spawn("meshd-tx", Box::new(move || tx_worker(&sh)))?);
        let sh = shared.clone();
        threads.push(spawn("meshd-rx", Box::new(move || rx_worker(&sh)))?);
        let sh = shared.clone();
        threads.push(spawn("meshd-timers", Box::new(move || timer_worker(&sh)))?);
        Ok(Dataplane {
            listen_port,
            if_index,
            offload,
            stats,
            shared,
            threads,
        })
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

impl Drop for Dataplane {
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

/// Room per sealed datagram: packet + WireGuard overhead (32), at least a handshake (148).
fn sealed_room(len: usize) -> usize {
    (len + 32).max(148)
}

/// Sealed datagrams laid end to end, sent in GSO runs (same endpoint, equal sizes, the last
/// of a run may be shorter).
struct SendBatch {
    buf: Chunk,
    pos: usize,
    run_start: usize,
    run_to: Option<SocketAddr>,
    run_seg: usize,
    run_count: usize,
    run_closed: bool,
    max_segments: usize,
}

/// Largest GSO send the kernel takes.
const GSO_MAX_BYTES: usize = 65_000;

impl SendBatch {
    fn new(buf: Chunk, max_segments: usize) -> Self {
        SendBatch {
            buf,
            pos: 0,
            run_start: 0,
            run_to: None,
            run_seg: 0,
            run_count: 0,
            run_closed: false,
            max_segments,
        }
    }

    /// Space for one more datagram of at most `room` bytes (flushes if full).
    fn reserve(&mut self, room: usize, udp: &Udp, stats: &IoStats) -> &mut [u8] {
        if self.pos + room > self.buf.len() {
            self.flush(udp, stats);
        }
        let end = (self.pos + room).min(self.buf.len());
        &mut self.buf.as_mut()[self.pos..end]
    }

    /// Records that `len` bytes for `to` were written at the reserved position.
    fn commit(&mut self, to: SocketAddr, len: usize, udp: &Udp, stats: &IoStats) {
        let fits = self.run_to == Some(to)
            && !self.run_closed
            && len <= self.run_seg
            && self.run_count < self.max_segments
            && self.pos + len - self.run_start <= GSO_MAX_BYTES;
        if !fits {
            self.send_run(udp, stats);
            self.run_start = self.pos;
            self.run_to = Some(to);
            self.run_seg = len;
            self.run_count = 0;
            self.run_closed = false;
        }
        self.run_closed = len < self.run_seg;
        self.pos += len;
        self.run_count += 1;
    }

    fn send_run(&mut self, udp: &Udp, stats: &IoStats) {
        let Some(to) = self.run_to.take() else { return };
        let contents = &self.buf.as_ref()[self.run_start..self.pos];
        let segment = (self.run_count > 1).then_some(self.run_seg);
        match udp.send_to_peer(to, contents, segment) {
            Ok(()) => {
                stats.gso_sends.fetch_add(1, Ordering::Relaxed);
                stats
                    .datagrams_sent
                    .fetch_add(self.run_count as u64, Ordering::Relaxed);
            }
            Err(e) => {
                stats
                    .udp_send_errors
                    .fetch_add(self.run_count as u64, Ordering::Relaxed);
                tracing::debug!(error = %e, %to, "udp send failed");
            }
        }
        self.run_count = 0;
    }

    /// Sends everything and empties the buffer.
    fn flush(&mut self, udp: &Udp, stats: &IoStats) {
        self.send_run(udp, stats);
        self.pos = 0;
        self.run_start = 0;
    }
}

/// Buffers one TUN read may fill (a 64 KiB TSO super-packet at MTU 1420 is ~47 segments).
const TUN_READ_ROOM: usize = 64;

/// What one pass over the TUN did.
enum TxPass {
    /// Nothing was queued.
    Empty,
    /// This many packets were read and sent, the first read at `Now`.
    Sent(usize, Now),
    /// The read failed.
    Failed(io::Error),
}

/// The TUN → UDP path: read buffers (one TSO super-packet splits into up to 128 packets)
/// and the send batch, all in one lazily touched mapping.
struct TxPath {
    table: TableCache,
    pages: Pages,
    original: Chunk,
    bufs: Vec<Chunk>,
    sizes: Vec<usize>,
    batch: SendBatch,
    route: RouteMemo,
    idle: Idle,
}

impl TxPath {
    fn new(table: TableCache, mtu: usize, max_segments: usize) -> io::Result<TxPath> {
        let slot = mtu.max(1500) + 64;
        let original = page_round(VIRTIO_NET_HDR_LEN + 65535);
        let batch = IDEAL_BATCH_SIZE * sealed_room(slot);
        let mut pages = Pages::new(original + IDEAL_BATCH_SIZE * slot + batch)?;
        let mut chunks = pages.carve(
            std::iter::once(original)
                .chain(std::iter::repeat_n(slot, IDEAL_BATCH_SIZE))
                .chain(std::iter::once(batch)),
        );
        let carve_err = || io::Error::other("carving the TX buffers");
        let batch = chunks.pop().ok_or_else(carve_err)?;
        if chunks.len() != 1 + IDEAL_BATCH_SIZE {
            return Err(carve_err());
        }
        let original = chunks.remove(0);
        Ok(TxPath {
            table,
            pages,
            original,
            bufs: chunks,
            sizes: vec![0; IDEAL_BATCH_SIZE],
            batch: SendBatch::new(batch, max_segments),
            route: RouteMemo::default(),
            idle: Idle::default(),
        })
    }

    /// Reads one TUN read's worth of packets into `bufs[at..]`.
    fn read(&mut self, tun: &SyncDevice, at: usize) -> io::Result<usize> {
        tun.recv_multiple(
            self.original.as_mut(),
            &mut self.bufs[at..],
            &mut self.sizes[at..],
            0,
        )
    }

    /// One pass: reads what the TUN holds (bounded), seals it and sends it.
    fn run(&mut self, sh: &Shared) -> TxPass {
        let mut n = match self.read(&sh.tun, 0) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return TxPass::Empty,
            Err(e) => return TxPass::Failed(e),
        };
        self.idle.touch();
        let now = sh.clock.now();
        let after_quiet = sh.tx_active.quiet_at(now, QUIET);
        sh.tx_active.touch(now);
        let mut total = n;
        if n == 1 {
            // A lone packet (no TSO: a ping, an ACK, a request): send it before looking for
            // more, so its latency does not include another read.
            self.seal(sh, 1, now);
            if after_quiet {
                // After a quiet spell it is most likely alone: end the pass without the read
                // that would find the TUN empty. The answer's path may be waiting for this
                // CPU, and a packet that did follow keeps the TUN readable for the next poll.
                return TxPass::Sent(1, now);
            }
            n = 0;
        }
        // Without TSO (UDP floods, many small flows) each read yields one packet: keep
        // reading while a whole super-packet still fits, so one wake-up fills one batch.
        while n + TUN_READ_ROOM <= IDEAL_BATCH_SIZE {
            match self.read(&sh.tun, n) {
                Ok(k) if k > 0 => {
                    n += k;
                    total += k;
                }
                _ => break,
            }
        }
        self.seal(sh, n, now);
        TxPass::Sent(total, now)
    }

    /// Seals `bufs[..n]` and sends them.
    fn seal(&mut self, sh: &Shared, n: usize, now: Now) {
        if n == 0 {
            return;
        }
        let table = self.table.load();
        let now = now.unix_ms;
        let (bufs, sizes) = (&self.bufs, &self.sizes);
        let packet = |i: usize| {
            let b = bufs[i].as_ref();
            &b[..sizes[i].min(b.len())]
        };
        let mut i = 0;
        while i < n {
            let Ok(peer) = sh.device.route_memo(table, &mut self.route, packet(i)) else {
                i += 1;
                continue;
            };
            // One lock for the run of packets to this peer (a TSO burst is one flow).
            let mut tunn = peer.lock();
            let grants = peer.grants();
            loop {
                let pkt = packet(i);
                let out = Direction::Outbound;
                if sh.policy.allow(peer, &grants, table.version, out, pkt, now) {
                    let room = self
                        .batch
                        .reserve(sealed_room(pkt.len()), &sh.udp, &sh.stats);
                    if let Encap::Send { to, datagram } =
                        sh.device.encapsulate(peer, &mut tunn, pkt, room)
                    {
                        let len = datagram.len();
                        self.batch.commit(to, len, &sh.udp, &sh.stats);
                    }
                }
                i += 1;
                if i >= n || !same_dst(packet(i - 1), packet(i)) {
                    break;
                }
            }
        }
        self.batch.flush(&sh.udp, &sh.stats);
    }
}

fn tx_worker(sh: &Shared) {
    let fd = sh.tun.as_raw_fd();
    let mut poller = BusyPoll::new(sh.busy_poll);
    while !sh.stop.load(Ordering::Relaxed) {
        if !sh.tx_park.wait(Duration::from_secs(1)) {
            // Parked: the rx thread watches the TUN. Count idle seconds meanwhile.
            if let Some(mut tx) = try_lock(&sh.tx) {
                if tx.idle.tick() {
                    tx.pages.discard();
                }
            }
            continue;
        }
        if !udp::poll_one(fd, libc::POLLIN, TX_LINGER_MS) {
            // Nothing to read for a while: hand the TUN back to the rx thread.
            sh.tx_park.park();
            sh.rx_wake.signal();
            continue;
        }
        // Never wait for the rx thread: it is reading the TUN itself and lets go as soon as
        // the TUN is empty (then poll sleeps) or its pass is done (then we take over).
        let Some(mut tx) = try_lock(&sh.tx) else {
            std::thread::yield_now();
            continue;
        };
        match tx.run(sh) {
            TxPass::Failed(e) => {
                drop(tx);
                tracing::warn!(error = %e, "TUN read failed");
                std::thread::sleep(Duration::from_millis(10));
            }
            TxPass::Sent(_, now) => {
                drop(tx);
                // A request left while nothing came in lately: its answer is probably
                // on its way. Wait for it here instead of waking the rx thread.
                if rx_quiet(sh, now) {
                    poller.wait_for_rx(sh);
                }
            }
            TxPass::Empty => {}
        }
    }
}

/// Packets one TUN pass must read for the rx thread to wake the tx thread (bulk traffic:
/// from then on the two directions run on two cores).
const BULK_PACKETS: usize = 8;
/// How long the awake tx thread waits for the TUN before it parks and hands it back.
const TX_LINGER_MS: i32 = 50;

/// Whether the tx thread watches the TUN (awake) or leaves it to the rx thread (parked).
///
/// Sparse traffic (requests, pings, keepalives) is carried by the rx thread alone: it polls
/// both the socket and the TUN, so a round trip wakes one thread per host, and nothing wakes
/// a second thread just to find the packet gone. When a TUN pass reads a batch
/// ([`BULK_PACKETS`]) the rx thread wakes the tx thread, which then owns the TUN until it
/// has read nothing for [`TX_LINGER_MS`]; it parks and signals the rx thread to watch the
/// TUN again. Someone always watches the TUN: the flag is cleared by the tx thread only, and
/// the rx thread re-reads it after every signal.
struct TxPark {
    awake: AtomicBool,
    lock: Mutex<()>,
    cv: std::sync::Condvar,
}

impl TxPark {
    fn new() -> Self {
        TxPark {
            awake: AtomicBool::new(false),
            lock: Mutex::new(()),
            cv: std::sync::Condvar::new(),
        }
    }

    fn is_awake(&self) -> bool {
        self.awake.load(Ordering::Acquire)
    }

    /// Wakes the tx thread (the rx thread saw bulk traffic on the TUN); false if it was
    /// awake already.
    fn wake(&self) -> bool {
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
    fn park(&self) {
        let _g = lock(&self.lock);
        self.awake.store(false, Ordering::Release);
    }

    /// The tx thread waits (up to `timeout`) to be woken; true if awake.
    fn wait(&self, timeout: Duration) -> bool {
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

/// A self-pipe that wakes the rx thread from `poll` (to re-read whether it must watch the TUN).
struct Signal {
    rx: std::os::unix::net::UnixStream,
    tx: std::os::unix::net::UnixStream,
}

impl Signal {
    fn new() -> io::Result<Self> {
        let (rx, tx) = std::os::unix::net::UnixStream::pair()?;
        rx.set_nonblocking(true)?;
        tx.set_nonblocking(true)?;
        Ok(Signal { rx, tx })
    }

    fn signal(&self) {
        // A full pipe already holds a pending signal.
        let _ = (&self.tx).write(&[1]);
    }

    fn drain(&self) {
        let mut buf = [0u8; 64];
        while matches!((&self.rx).read(&mut buf), Ok(n) if n > 0) {}
    }
}

/// Same IP destination (cheap check that the next packet goes to the same peer).
fn same_dst(a: &[u8], b: &[u8]) -> bool {
    let (pa, pb) = (
        meshd_tunnel::packet::dst_addr(a),
        meshd_tunnel::packet::dst_addr(b),
    );
    pa.is_some() && pa == pb
}

/// How many UDP buffers one `recvmmsg` fills; each holds a GRO train of up to 64 KiB.
const RX_BUFFERS: usize = 16;
const RX_BUFFER_SIZE: usize = 65_536;
/// One TUN write buffer: header room and a packet that GRO coalescing may grow to 64 KiB.
const TUN_SLOT_SIZE: usize = 65_536;
/// Header room in front of each packet written to the TUN.
const TUN_OFFSET: usize = VIRTIO_NET_HDR_LEN;

/// Decrypted packets waiting for one coalescing TUN write.
struct TunBatch {
    out: Vec<Slot>,
    n: usize,
    /// Made on the first batch that can coalesce, dropped when idle: tun-rs preallocates
    /// 128 item vectors per protocol (~1.7 MiB of small chunks, nearly every page touched).
    gro: Option<GROTable>,
}

impl TunBatch {
    /// Writes the batch to the TUN (GRO-coalesced with offload) and empties it.
    fn flush(&mut self, sh: &Shared) {
        if self.n == 0 {
            return;
        }
        let bufs = &mut self.out[..self.n];
        let res = if sh.offload && bufs.len() > 1 {
            let gro = self.gro.get_or_insert_with(GROTable::default);
            sh.tun.send_multiple(gro, bufs, TUN_OFFSET)
        } else if let [one] = bufs {
            // Nothing to coalesce: a zeroed virtio header (no GSO, checksum complete) and
            // one write, as send_multiple would do after its table work.
            let skip = if sh.offload {
                one.as_mut()[..TUN_OFFSET].fill(0);
                0
            } else {
                TUN_OFFSET
            };
            sh.tun.send(&one.as_ref()[skip..])
        } else {
            let mut r = Ok(0);
            for b in bufs.iter() {
                if let Err(e) = sh.tun.send(&b.as_ref()[TUN_OFFSET..]) {
                    r = Err(e);
                }
            }
            r
        };
        if let Err(e) = res {
            sh.stats.tun_write_errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, "TUN write failed");
        }
        self.n = 0;
    }
}

/// The UDP → TUN path: `recvmmsg` buffers and the TUN write batch, in one lazily touched
/// mapping (only the rx thread uses it).
struct RxPath {
    table: TableCache,
    destinations: DestinationsCache,
    pages: Pages,
    rx: [Chunk; RX_BUFFERS],
    meta: Vec<RecvMeta>,
    tun: TunBatch,
    scratch: Chunk,
    replies: Vec<(SocketAddr, Vec<u8>)>,
    route: RouteMemo,
    idle: Idle,
}

impl RxPath {
    fn new(table: TableCache, destinations: DestinationsCache) -> io::Result<RxPath> {
        let mut pages = Pages::new(
            RX_BUFFERS * RX_BUFFER_SIZE + IDEAL_BATCH_SIZE * TUN_SLOT_SIZE + RX_BUFFER_SIZE,
        )?;
        let mut chunks = pages.carve(
            std::iter::repeat_n(RX_BUFFER_SIZE, RX_BUFFERS)
                .chain(std::iter::repeat_n(TUN_SLOT_SIZE, IDEAL_BATCH_SIZE))
                .chain(std::iter::once(RX_BUFFER_SIZE)),
        );
        let scratch = chunks
            .pop()
            .ok_or_else(|| io::Error::other("carving the RX buffers"))?;
        let out: Vec<Slot> = chunks
            .split_off(RX_BUFFERS)
            .into_iter()
            .map(Slot::new)
            .collect();
        let rx: [Chunk; RX_BUFFERS] = chunks
            .try_into()
            .map_err(|_| io::Error::other("carving the RX buffers"))?;
        Ok(RxPath {
            table,
            destinations,
            pages,
            rx,
            meta: vec![RecvMeta::default(); RX_BUFFERS],
            tun: TunBatch {
                out,
                n: 0,
                gro: None,
            },
            scratch,
            replies: Vec::new(),
            route: RouteMemo::default(),
            idle: Idle::default(),
        })
    }

    /// One pass: drains what the sockets `ready` reports hold (bounded), opens it and writes
    /// one TUN batch. Returns how many packets went to the TUN, and when the last batch was
    /// received.
    fn run(&mut self, sh: &Shared, ready: &mut udp::Ready) -> (usize, Option<Now>) {
        self.idle.touch();
        let mut delivered = 0;
        let mut at = None;
        for _ in 0..8 {
            let n = {
                let mut iov = self.rx.each_mut().map(|c| IoSliceMut::new(c.as_mut()));
                match sh.udp.recv(ready, &mut iov, &mut self.meta) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "udp recv failed");
                        break;
                    }
                }
            };
            let now = sh.clock.now();
            at = Some(now);
            sh.rx_active.touch(now);
            let table = self.table.load();
            let local = self.destinations.load();
            let now = now.unix_ms;
            for (m, buf) in self.meta[..n].iter().zip(&self.rx) {
                let buf = buf.as_ref();
                let stride = m.stride.max(1);
                for d in buf[..m.len.min(buf.len())].chunks(stride) {
                    sh.stats.datagrams_received.fetch_add(1, Ordering::Relaxed);
                    if self.tun.n == self.tun.out.len() {
                        self.tun.flush(sh);
                    }
                    let slot = &mut self.tun.out[self.tun.n];
                    let Some(space) = slot.space().get_mut(TUN_OFFSET..TUN_OFFSET + d.len()) else {
                        continue;
                    };
                    match sh.device.decapsulate_memo(
                        table,
                        &mut self.route,
                        local,
                        m.addr,
                        d,
                        space,
                    ) {
                        Decap::Deliver { peer, packet } => {
                            let len = packet.len();
                            let grants = peer.grants();
                            let dir = Direction::Inbound;
                            if sh
                                .policy
                                .allow(peer, &grants, table.version, dir, packet, now)
                            {
                                slot.set_len(TUN_OFFSET + len);
                                self.tun.n += 1;
                                delivered += 1;
                            }
                        }
                        Decap::Reply { peer, datagram } => {
                            self.replies.push((m.addr, datagram.to_vec()));
                            if let Some(peer) = peer {
                                let replies = &mut self.replies;
                                sh.device.flush(peer, self.scratch.as_mut(), |to, d| {
                                    replies.push((to, d.to_vec()));
                                });
                            }
                        }
                        Decap::Done | Decap::Drop(_) => {}
                    }
                }
            }
            // Handshake traffic is rare: plain sends, allocation is fine here.
            for (to, d) in self.replies.drain(..) {
                if sh.udp.send(to, &d, None).is_err() {
                    sh.stats.udp_send_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.tun.flush(sh);
        (delivered, at)
    }
}

/// How long a path must have carried nothing before the other path's thread runs it.
const QUIET: Duration = Duration::from_millis(1);

/// Whether the rx path has received nothing lately (false while its thread is working).
fn rx_quiet(sh: &Shared, now: Now) -> bool {
    sh.rx_active.quiet_at(now, QUIET)
}

/// What [`rx_and_answer`] did.
struct Answered {
    /// Packets delivered to the TUN.
    delivered: usize,
    /// Whether a tx pass then sent something.
    answered: bool,
    /// When the last batch was received (if any was).
    at: Option<Now>,
}

/// One rx pass; then, if it delivered packets while the tx path is quiet, the tx pass for
/// the answers the TUN write produced.
fn rx_and_answer(sh: &Shared, rx: &mut RxPath, ready: &mut udp::Ready) -> Answered {
    let (delivered, at) = rx.run(sh, ready);
    let mut done = Answered {
        delivered,
        answered: false,
        at,
    };
    let Some(now) = at.filter(|_| delivered > 0) else {
        return done;
    };
    // Run to completion: the TUN write ran the host's stack, which may have queued its
    // answer (echo reply, ACK, response) on the TUN already. While the tx thread is quiet
    // (asleep: waking it costs tens of µs) seal and send that answer from here. While it
    // is busy (bulk traffic) leave the TUN to it: both threads keep working in parallel.
    let Some(mut tx) = try_lock(&sh.tx) else {
        return done;
    };
    if sh.tx_park.is_awake() && !sh.tx_active.quiet_at(now, QUIET) {
        return done;
    }
    match tx.run(sh) {
        TxPass::Sent(n, _) => {
            drop(tx);
            // Traffic both ways (a bulk transfer's other direction): hand the TUN to the tx
            // thread so the two directions run on two cores.
            wake_tx_for_bulk(sh, n);
            done.answered = true;
        }
        TxPass::Empty => {}
        TxPass::Failed(e) => tracing::debug!(error = %e, "TUN read failed"),
    }
    done
}

/// Wakes the parked tx thread if a TUN pass run by the rx thread read a batch.
fn wake_tx_for_bulk(sh: &Shared, packets: usize) {
    if packets >= BULK_PACKETS && sh.tx_park.wake() {
        sh.stats.tx_wakeups.fetch_add(1, Ordering::Relaxed);
    }
}

/// The rx thread's tokens for its other descriptors in the sockets' epoll set.
const WAKE_TOKEN: u64 = udp::FIRST_OTHER_TOKEN;
const TUN_TOKEN: u64 = udp::FIRST_OTHER_TOKEN + 1;

fn rx_worker(sh: &Shared) {
    let mut poller = BusyPoll::new(sh.busy_poll);
    let mut ready = udp::Ready::default();
    if let Err(e) = sh.udp.watch(sh.rx_wake.rx.as_raw_fd(), WAKE_TOKEN, true) {
        tracing::error!(error = %e, "cannot watch the rx wake-up socket");
    }
    let mut tun_watched = false;
    while !sh.stop.load(Ordering::Relaxed) {
        // While the tx thread is parked, watch the TUN too.
        let want_tun = !sh.tx_park.is_awake();
        if want_tun != tun_watched {
            match sh.udp.watch(sh.tun.as_raw_fd(), TUN_TOKEN, want_tun) {
                Ok(()) => tun_watched = want_tun,
                Err(e) => tracing::warn!(error = %e, "cannot watch the TUN"),
            }
        }
        if sh.udp.wait(&mut ready, 1000) == 0 {
            if let Some(mut rx) = try_lock(&sh.rx) {
                if rx.idle.tick() {
                    rx.pages.discard();
                    rx.tun.gro = None;
                }
            }
            continue;
        }
        if ready.has(WAKE_TOKEN) {
            sh.rx_wake.drain();
        }
        let tun_ready = tun_watched && ready.has(TUN_TOKEN);
        if ready.has_socket() {
            // A busy-polling tx thread may be draining the sockets itself: let it.
            let Some(mut rx) = try_lock(&sh.rx) else {
                std::thread::yield_now();
                continue;
            };
            let pass = rx_and_answer(sh, &mut rx, &mut ready);
            drop(rx);
            // A request came in and no answer was ready yet (a server at work): wait for
            // the answer on the TUN here rather than waking the tx thread for it.
            if let Some(now) = pass.at.filter(|_| pass.delivered > 0 && !pass.answered) {
                if tx_quiet(sh, now) {
                    poller.wait_for_tx(sh);
                }
            }
        }
        if tun_ready {
            let Some(mut tx) = try_lock(&sh.tx) else {
                continue;
            };
            match tx.run(sh) {
                TxPass::Sent(n, _) if n >= BULK_PACKETS => {
                    drop(tx);
                    wake_tx_for_bulk(sh, n);
                }
                TxPass::Sent(_, now) => {
                    drop(tx);
                    if rx_quiet(sh, now) {
                        poller.wait_for_rx(sh);
                    }
                }
                TxPass::Empty => {}
                TxPass::Failed(e) => {
                    drop(tx);
                    tracing::warn!(error = %e, "TUN read failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

/// Whether the tx path has read nothing lately (false while its thread is working).
fn tx_quiet(sh: &Shared, now: Now) -> bool {
    sh.tx_active.quiet_at(now, QUIET)
}

/// Bounded busy polling for the answer to a lone exchange.
///
/// An idle thread woken by the kernel costs tens of microseconds (more in a VM) on each
/// side of a round trip. When one path has just carried a packet while the other was quiet
/// (a request went out; a request came in and its answer is not ready yet), the thread that
/// carried it polls the other path's descriptor for up to `window` and handles the answer
/// itself. Under bulk traffic both paths are busy and nobody polls. One worker polls at a
/// time and each spends at most [`BUSY_POLL_SHARE`] of its time polling, so a host with many
/// sparse exchanges never burns more than that.
struct BusyPoll {
    window: Duration,
    /// Start of the current accounting second and the time spent polling in it.
    second: Instant,
    spent: Duration,
}

/// The most of each second a worker may spend busy polling.
const BUSY_POLL_SHARE: Duration = Duration::from_millis(50);

impl BusyPoll {
    fn new(window: Duration) -> Self {
        BusyPoll {
            window,
            second: Instant::now(),
            spent: Duration::ZERO,
        }
    }

    /// Polls `fd` without sleeping until it is readable (true) or the window closes.
    /// `polling` is shared by the workers: only one polls at a time.
    fn spin(&mut self, polling: &AtomicBool, fd: libc::c_int) -> bool {
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
        let mut ready = false;
        while !ready && start.elapsed() < window {
            ready = udp::poll_one(fd, libc::POLLIN, 0);
            if !ready {
                // The answer's path often runs on this very CPU (the peer's reader was
                // woken here by our send): let it run rather than spin against it.
                std::thread::yield_now();
            }
        }
        polling.store(false, Ordering::Release);
        self.spent += start.elapsed();
        ready
    }

    /// After a send: waits for the answer on the UDP socket and delivers it (and the tx
    /// pass for whatever that delivery produced).
    fn wait_for_rx(&mut self, sh: &Shared) {
        if !self.spin(&sh.polling, sh.udp.as_raw_fd()) {
            return;
        }
        if let Some(mut rx) = try_lock(&sh.rx) {
            rx_and_answer(sh, &mut rx, &mut udp::Ready::default());
        }
    }

    /// After a delivery: waits for the answer on the TUN and sends it.
    fn wait_for_tx(&mut self, sh: &Shared) {
        if !self.spin(&sh.polling, sh.tun.as_raw_fd()) {
            return;
        }
        if let Some(mut tx) = try_lock(&sh.tx) {
            if let TxPass::Failed(e) = tx.run(sh) {
                tracing::debug!(error = %e, "TUN read failed");
            }
        }
    }
}

/// How often connected sockets of peers that left or roamed are closed.
const SOCKET_SWEEP: Duration = Duration::from_secs(5);

fn timer_worker(sh: &Shared) {
    let (device, udp, stats) = (&sh.device, &sh.udp, &sh.stats);
    let mut scratch = vec![0u8; 2048];
    let mut last_second = Instant::now();
    let mut last_sweep = Instant::now();
    let send = |to, d: &[u8]| {
        if udp.send_to_peer(to, d, None).is_err() {
            stats.udp_send_errors.fetch_add(1, Ordering::Relaxed);
        }
    };
    device.initiate_all(&mut scratch, send);
    while !sh.stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        sh.clock.resync();
        device.update_timers(&mut scratch, send);
        if last_second.elapsed() >= Duration::from_secs(1) {
            device.tick_second();
            last_second = Instant::now();
        }
        if last_sweep.elapsed() >= SOCKET_SWEEP {
            let table = device.table();
            let endpoints: HashSet<SocketAddr> =
                table.peers().iter().filter_map(|p| p.endpoint()).collect();
            let closed = udp.retain_connected(|a| endpoints.contains(a));
            if closed > 0 {
                tracing::debug!(closed, "closed connected sockets of departed endpoints");
            }
            last_sweep = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

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
    fn busy_poll_sees_data_and_gives_up_after_its_window() {
        let (mut w, r) = UnixStream::pair().expect("socketpair");
        let polling = AtomicBool::new(false);
        let mut p = BusyPoll::new(Duration::from_millis(2));
        let t = Instant::now();
        assert!(!p.spin(&polling, r.as_raw_fd()), "nothing to read");
        assert!(t.elapsed() >= Duration::from_millis(2));
        assert!(!polling.load(Ordering::Relaxed), "flag released");
        w.write_all(b"x").expect("write");
        assert!(p.spin(&polling, r.as_raw_fd()), "data is ready");
    }

    #[test]
    fn busy_poll_is_off_when_zero_taken_or_over_budget() {
        let (mut w, r) = UnixStream::pair().expect("socketpair");
        w.write_all(b"x").expect("write");
        let polling = AtomicBool::new(false);
        assert!(!BusyPoll::new(Duration::ZERO).spin(&polling, r.as_raw_fd()));
        let mut p = BusyPoll::new(Duration::from_millis(1));
        polling.store(true, Ordering::Relaxed);
        assert!(!p.spin(&polling, r.as_raw_fd()), "another worker polls");
        polling.store(false, Ordering::Relaxed);
        p.spent = BUSY_POLL_SHARE;
        assert!(!p.spin(&polling, r.as_raw_fd()), "budget spent this second");
        p.second -= Duration::from_secs(1);
        assert!(
            p.spin(&polling, r.as_raw_fd()),
            "a new second, a new budget"
        );
    }

    #[test]
    fn busy_poll_spends_at_most_its_share_per_second() {
        let (_w, r) = UnixStream::pair().expect("socketpair");
        let polling = AtomicBool::new(false);
        let mut p = BusyPoll::new(Duration::from_millis(20));
        let t = Instant::now();
        for _ in 0..10 {
            p.spin(&polling, r.as_raw_fd());
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
