//! The TUN → UDP path: read a batch from the TUN (one TSO super-packet splits into up to
//! 128 packets), route each packet to its peer, check it against the firewall, seal it in
//! place into the [`SendBatch`] and send runs of equal-sized datagrams with one GSO send.
//! [`tx_worker`] is the `meshd-tx` thread; the rx thread and the [`Pump`](super::Pump) run
//! the same [`TxPath::run`].

use std::io;
use std::time::Duration;

use meshd_policy::Direction;
use meshd_tunnel::{Encap, RouteMemo, TableCache};
use tun_rs::{IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use super::batch::{sealed_room, SendBatch};
use super::buffers::{page_round, Chunk, Pages};
use super::busy_poll::BusyPoll;
use super::clock::{Now, ReadClock};
use super::edge::{Edges, Poller, TunQueue};
use super::handoff::TX_LINGER_MS;
use super::{rx_quiet, try_lock, Idle, Shared, QUIET};

/// Buffers one TUN read may fill (a 64 KiB TSO super-packet at MTU 1420 is ~47 segments).
const TUN_READ_ROOM: usize = 64;

/// What one pass over the TUN did.
pub(super) enum TxPass {
    /// Nothing was queued.
    Empty,
    /// This many packets were read and sent, the first read at `Now`.
    Sent(usize, Now),
    /// The read failed.
    Failed(io::Error),
}

/// The TUN → UDP path: read buffers (one TSO super-packet splits into up to 128 packets)
/// and the send batch, all in one lazily touched mapping.
pub(super) struct TxPath {
    table: TableCache,
    pub(super) pages: Pages,
    original: Chunk,
    bufs: Vec<Chunk>,
    sizes: Vec<usize>,
    batch: SendBatch,
    route: RouteMemo,
    pub(super) idle: Idle,
}

impl TxPath {
    pub(super) fn new(table: TableCache, mtu: usize, max_segments: usize) -> io::Result<TxPath> {
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
    #[inline]
    fn read<T: TunQueue>(&mut self, tun: &T, at: usize) -> io::Result<usize> {
        tun.read(
            self.original.as_mut(),
            &mut self.bufs[at..],
            &mut self.sizes[at..],
        )
    }

    /// One pass: reads what the TUN holds (bounded), seals it and sends it. The time comes
    /// from `clock`, read once and only if something was read.
    pub(super) fn run<E: Edges, C: ReadClock>(&mut self, sh: &Shared<E>, clock: &C) -> TxPass {
        let mut n = match self.read(&sh.tun, 0) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return TxPass::Empty,
            Err(e) => return TxPass::Failed(e),
        };
        self.idle.touch();
        let now = clock.now();
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
    fn seal<E: Edges>(&mut self, sh: &Shared<E>, n: usize, now: Now) {
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

/// Same IP destination (cheap check that the next packet goes to the same peer).
#[inline]
fn same_dst(a: &[u8], b: &[u8]) -> bool {
    let (pa, pb) = (
        meshd_tunnel::packet::dst_addr(a),
        meshd_tunnel::packet::dst_addr(b),
    );
    pa.is_some() && pa == pb
}

/// The `meshd-tx` thread: parked until bulk traffic wakes it (see
/// [`TxPark`](super::handoff::TxPark)), then owns the TUN until it has been quiet for
/// [`TX_LINGER_MS`].
pub(super) fn tx_worker<E: Edges>(sh: &Shared<E>) {
    let mut poller = BusyPoll::new(sh.busy_poll);
    while !sh.stopped() {
        if !sh.tx_park.wait(Duration::from_secs(1)) {
            // Parked: the rx thread watches the TUN. Count idle seconds meanwhile.
            if let Some(mut tx) = try_lock(&sh.tx) {
                if tx.idle.tick() {
                    tx.pages.discard();
                }
            }
            continue;
        }
        if !sh.poller.tun_readable(&sh.tun, TX_LINGER_MS) {
            // Nothing to read for a while: hand the TUN back to the rx thread.
            sh.tx_park.park();
            sh.poller.wake();
            continue;
        }
        // Never wait for the rx thread: it is reading the TUN itself and lets go as soon as
        // the TUN is empty (then poll sleeps) or its pass is done (then we take over).
        let Some(mut tx) = try_lock(&sh.tx) else {
            std::thread::yield_now();
            continue;
        };
        match tx.run(sh, &sh.clock) {
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
