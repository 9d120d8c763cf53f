//! The packet path: TUN and UDP at the edges, [`meshd_tunnel::Device`] in the middle.
//!
//! Three threads, no channels on the packet path:
//! - `tx`: reads batches from the TUN (one TSO super-packet splits into up to 128 packets),
//!   seals each into one contiguous buffer and sends runs of equal-sized datagrams to the same
//!   endpoint with one GSO `sendmsg`.
//! - `rx`: `recvmmsg` with GRO (many datagrams per buffer), opens each into a TUN buffer and
//!   writes the batch with one coalescing `send_multiple` (GRO on the TUN).
//! - `timers`: every 100 ms runs the WireGuard timers (rekey, retries, keepalive).
//!
//! Buffers are allocated once per thread. The peer table is loaded once per batch.
//!
//! Policy: every packet passes the identity firewall ([`Enforcement`]) keyed on the peer's
//! public key — outbound before sealing, inbound after opening and after cryptokey routing.

mod tun;
pub mod udp;

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use meshd_firewall::{BlockLog, BlockLogConfig, Firewall, Verdict};
use meshd_policy::Direction;
use meshd_tunnel::{Decap, Device, Encap};
use quinn_udp::RecvMeta;
use tun_rs::{GROTable, SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

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
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Dataplane {
    /// Opens the TUN and the socket and starts the workers.
    pub fn start(
        device: Arc<Device>,
        policy: Arc<Enforcement>,
        cfg: &DataplaneConfig,
    ) -> anyhow::Result<Dataplane> {
        let udp = Arc::new(Udp::bind(cfg.listen_port, cfg.fwmark)?);
        let tun = tun::open(&cfg.name, cfg.mtu, &cfg.addresses)?;
        let listen_port = udp.local_port();
        let offload = tun.offload;
        let if_index = tun.index;
        let tun_rx = Arc::new(tun.dev);
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(IoStats::default());
        let mtu = usize::from(cfg.mtu);

        let mut threads = Vec::new();
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new().name(name.into()).spawn(f)
        };
        {
            let (device, policy, udp, tun, stop, stats) = (
                device.clone(),
                policy.clone(),
                udp.clone(),
                tun_rx.clone(),
                stop.clone(),
                stats.clone(),
            );
            threads.push(spawn(
                "meshd-tx",
                Box::new(move || tx_worker(&device, &policy, &udp, &tun, &stop, &stats, mtu)),
            )?);
        }
        {
            let (device, policy, udp, tun, stop, stats) = (
                device.clone(),
                policy.clone(),
                udp.clone(),
                tun_rx.clone(),
                stop.clone(),
                stats.clone(),
            );
            threads.push(spawn(
                "meshd-rx",
                Box::new(move || rx_worker(&device, &policy, &udp, &tun, &stop, &stats, offload)),
            )?);
        }
        {
            let (device, udp, stop, stats) =
                (device.clone(), udp.clone(), stop.clone(), stats.clone());
            threads.push(spawn(
                "meshd-timers",
                Box::new(move || timer_worker(&device, &udp, &stop, &stats)),
            )?);
        }
        Ok(Dataplane {
            listen_port,
            if_index,
            offload,
            stats,
            stop,
            threads,
        })
    }

    /// Stops the workers and waits for them (each wakes at least once a second).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
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

/// Room per sealed datagram: packet + WireGuard overhead (32), at least a handshake (148).
fn sealed_room(len: usize) -> usize {
    (len + 32).max(148)
}

/// Sealed datagrams laid end to end, sent in GSO runs (same endpoint, equal sizes, the last
/// of a run may be shorter).
struct SendBatch {
    buf: Vec<u8>,
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
    fn new(capacity: usize, max_segments: usize) -> Self {
        SendBatch {
            buf: vec![0u8; capacity],
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
        &mut self.buf[self.pos..end]
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
        let contents = &self.buf[self.run_start..self.pos];
        let segment = (self.run_count > 1).then_some(self.run_seg);
        match udp.send(to, contents, segment) {
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

fn tx_worker(
    device: &Device,
    policy: &Enforcement,
    udp: &Udp,
    tun: &SyncDevice,
    stop: &AtomicBool,
    stats: &IoStats,
    mtu: usize,
) {
    let mut original = vec![0u8; VIRTIO_NET_HDR_LEN + 65535];
    let slot = mtu.max(1500) + 64;
    let mut bufs = vec![vec![0u8; slot]; IDEAL_BATCH_SIZE];
    let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
    let mut batch = SendBatch::new(IDEAL_BATCH_SIZE * sealed_room(slot), udp.max_segments());
    let fd = tun.as_raw_fd();
    while !stop.load(Ordering::Relaxed) {
        if !udp::poll_one(fd, libc::POLLIN, 1000) {
            continue;
        }
        let mut n = match tun.recv_multiple(&mut original, &mut bufs, &mut sizes, 0) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::warn!(error = %e, "TUN read failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        // Without TSO (UDP floods, many small flows) each read yields one packet: keep
        // reading while a whole super-packet still fits, so one wake-up fills one batch.
        while n + TUN_READ_ROOM <= IDEAL_BATCH_SIZE {
            match tun.recv_multiple(&mut original, &mut bufs[n..], &mut sizes[n..], 0) {
                Ok(k) if k > 0 => n += k,
                _ => break,
            }
        }
        let table = device.table();
        let now = unix_millis();
        let mut i = 0;
        while i < n {
            let Ok(peer) = device.route(&table, &bufs[i][..sizes[i]]) else {
                i += 1;
                continue;
            };
            // One lock for the run of packets to this peer (a TSO burst is one flow).
            let mut tunn = peer.lock();
            let grants = peer.grants();
            loop {
                let pkt = &bufs[i][..sizes[i]];
                if policy.allow(peer, &grants, table.version, Direction::Outbound, pkt, now) {
                    let out = batch.reserve(sealed_room(pkt.len()), udp, stats);
                    if let Encap::Send { to, datagram } =
                        device.encapsulate(peer, &mut tunn, pkt, out)
                    {
                        let len = datagram.len();
                        batch.commit(to, len, udp, stats);
                    }
                }
                i += 1;
                if i >= n || !same_dst(&bufs[i - 1][..sizes[i - 1]], &bufs[i][..sizes[i]]) {
                    break;
                }
            }
        }
        batch.flush(udp, stats);
    }
}

/// Buffers one TUN read may fill (a 64 KiB TSO super-packet at MTU 1420 is ~47 segments).
const TUN_READ_ROOM: usize = 64;

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

fn rx_worker(
    device: &Device,
    policy: &Enforcement,
    udp: &Udp,
    tun: &SyncDevice,
    stop: &AtomicBool,
    stats: &IoStats,
    offload: bool,
) {
    let mut rx: Vec<Vec<u8>> = (0..RX_BUFFERS).map(|_| vec![0u8; RX_BUFFER_SIZE]).collect();
    let mut meta = vec![RecvMeta::default(); RX_BUFFERS];
    let offset = VIRTIO_NET_HDR_LEN;
    // TUN write buffers: packet at `offset`, capacity for GRO coalescing to grow into.
    let mut out: Vec<Vec<u8>> = (0..IDEAL_BATCH_SIZE)
        .map(|_| Vec::with_capacity(offset + 65_536))
        .collect();
    let mut n_out = 0usize;
    let mut gro = GROTable::default();
    let mut scratch = vec![0u8; RX_BUFFER_SIZE];
    let mut replies: Vec<(SocketAddr, Vec<u8>)> = Vec::new();

    let flush_tun = |out: &mut Vec<Vec<u8>>, n_out: &mut usize, gro: &mut GROTable| {
        if *n_out == 0 {
            return;
        }
        let res = if offload {
            tun.send_multiple(gro, &mut out[..*n_out], offset)
        } else {
            let mut r = Ok(0);
            for b in &out[..*n_out] {
                if let Err(e) = tun.send(&b[offset..]) {
                    r = Err(e);
                }
            }
            r
        };
        if let Err(e) = res {
            stats.tun_write_errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, "TUN write failed");
        }
        *n_out = 0;
    };

    while !stop.load(Ordering::Relaxed) {
        if !udp.wait_readable(1000) {
            continue;
        }
        // Drain what is queued (bounded), then write one TUN batch.
        for _ in 0..8 {
            let n = {
                let mut iov: Vec<IoSliceMut<'_>> =
                    rx.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                match udp.recv(&mut iov, &mut meta) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "udp recv failed");
                        break;
                    }
                }
            };
            let table = device.table();
            let now = unix_millis();
            for (m, buf) in meta[..n].iter().zip(&rx) {
                let stride = m.stride.max(1);
                for d in buf[..m.len].chunks(stride) {
                    stats.datagrams_received.fetch_add(1, Ordering::Relaxed);
                    if n_out == out.len() {
                        flush_tun(&mut out, &mut n_out, &mut gro);
                    }
                    let slot = &mut out[n_out];
                    slot.resize(offset + d.len(), 0);
                    match device.decapsulate(&table, m.addr, d, &mut slot[offset..]) {
                        Decap::Deliver { peer, packet } => {
                            let len = packet.len();
                            let grants = peer.grants();
                            let dir = Direction::Inbound;
                            if policy.allow(peer, &grants, table.version, dir, packet, now) {
                                slot.truncate(offset + len);
                                n_out += 1;
                            }
                        }
                        Decap::Reply { peer, datagram } => {
                            replies.push((m.addr, datagram.to_vec()));
                            if let Some(peer) = peer {
                                device.flush(peer, &mut scratch, |to, d| {
                                    replies.push((to, d.to_vec()));
                                });
                            }
                        }
                        Decap::Done | Decap::Drop(_) => {}
                    }
                }
            }
            // Handshake traffic is rare: plain sends, allocation is fine here.
            for (to, d) in replies.drain(..) {
                if udp.send(to, &d, None).is_err() {
                    stats.udp_send_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            if n < RX_BUFFERS {
                break;
            }
        }
        flush_tun(&mut out, &mut n_out, &mut gro);
    }
}

fn timer_worker(device: &Device, udp: &Udp, stop: &AtomicBool, stats: &IoStats) {
    let mut scratch = vec![0u8; 2048];
    let mut last_second = Instant::now();
    device.initiate_all(&mut scratch, |to, d| {
        if udp.send(to, d, None).is_err() {
            stats.udp_send_errors.fetch_add(1, Ordering::Relaxed);
        }
    });
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        device.update_timers(&mut scratch, |to, d| {
            if udp.send(to, d, None).is_err() {
                stats.udp_send_errors.fetch_add(1, Ordering::Relaxed);
            }
        });
        if last_second.elapsed() >= Duration::from_secs(1) {
            device.tick_second();
            last_second = Instant::now();
        }
    }
}
