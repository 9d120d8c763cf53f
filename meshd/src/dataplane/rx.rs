//! The UDP → TUN path: receive batches (each buffer a GRO train of datagrams), open each
//! datagram in place into a TUN buffer (cryptokey routing, inner destination, firewall) and
//! write the batch with one coalescing TUN write. Then, while the tx path is quiet, run the
//! tx path once for the answers that write produced ([`rx_and_answer`]). [`rx_worker`] is
//! the `meshd-rx` thread; busy polling and the [`Pump`](super::Pump) run the same code.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use meshd_policy::Direction;
use meshd_tunnel::{Decap, DestinationsCache, RouteMemo, TableCache};
use quinn_udp::RecvMeta;
use tun_rs::IDEAL_BATCH_SIZE;

use super::buffers::{Chunk, Pages, Slot};
use super::busy_poll::BusyPoll;
use super::clock::{Now, ReadClock};
use super::edge::{Bind, Edges, Poller, TunQueue, TUN_OFFSET};
use super::handoff::BULK_PACKETS;
use super::tx::TxPass;
use super::{try_lock, tx_quiet, Idle, Shared, QUIET};

/// How many UDP buffers one `recvmmsg` fills; each holds a GRO train of up to 64 KiB.
const RX_BUFFERS: usize = 16;
const RX_BUFFER_SIZE: usize = 65_536;
/// One TUN write buffer: header room and a packet that GRO coalescing may grow to 64 KiB.
const TUN_SLOT_SIZE: usize = 65_536;

/// Decrypted packets waiting for one coalescing TUN write.
struct TunBatch<T: TunQueue> {
    out: Vec<Slot>,
    n: usize,
    /// Made on the first batch that can coalesce, dropped when idle: tun-rs preallocates
    /// 128 item vectors per protocol (~1.7 MiB of small chunks, nearly every page touched).
    gro: Option<T::Coalesce>,
}

impl<T: TunQueue> TunBatch<T> {
    /// Writes the batch to the TUN (GRO-coalesced with offload) and empties it.
    fn flush<E: Edges<Tun = T>>(&mut self, sh: &Shared<E>) {
        if self.n == 0 {
            return;
        }
        if let Err(e) = sh.tun.write(&mut self.gro, &mut self.out[..self.n]) {
            sh.stats.tun_write_errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, "TUN write failed");
        }
        self.n = 0;
    }
}

/// The UDP → TUN path: `recvmmsg` buffers and the TUN write batch, in one lazily touched
/// mapping (only the rx thread uses it).
pub(super) struct RxPath<T: TunQueue> {
    table: TableCache,
    destinations: DestinationsCache,
    pages: Pages,
    rx: [Chunk; RX_BUFFERS],
    meta: Vec<RecvMeta>,
    tun: TunBatch<T>,
    scratch: Chunk,
    replies: Vec<(SocketAddr, Vec<u8>)>,
    route: RouteMemo,
    idle: Idle,
}

impl<T: TunQueue> RxPath<T> {
    pub(super) fn new(table: TableCache, destinations: DestinationsCache) -> io::Result<Self> {
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

    /// After an idle second: hands the buffers back once the path was idle long enough.
    pub(super) fn idle_tick(&mut self) {
        if self.idle.tick() {
            self.pages.discard();
            self.tun.gro = None;
        }
    }

    /// One pass: drains what the sockets `ready` reports hold (bounded), opens it and writes
    /// one TUN batch. Returns how many packets went to the TUN, and when the last batch was
    /// received.
    pub(super) fn run<E: Edges<Tun = T>, C: ReadClock>(
        &mut self,
        sh: &Shared<E>,
        ready: &mut <E::Bind as Bind>::Ready,
        clock: &C,
    ) -> (usize, Option<Now>) {
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
            let now = clock.now();
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
                if sh.udp.send(to, &d).is_err() {
                    sh.stats.udp_send_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.tun.flush(sh);
        (delivered, at)
    }
}

/// What [`rx_and_answer`] did.
pub(super) struct Answered {
    /// Packets delivered to the TUN.
    pub(super) delivered: usize,
    /// Whether a tx pass then sent something.
    pub(super) answered: bool,
    /// When the last batch was received (if any was).
    pub(super) at: Option<Now>,
}

/// One rx pass; then, if it delivered packets while the tx path is quiet, the tx pass for
/// the answers the TUN write produced.
pub(super) fn rx_and_answer<E: Edges, C: ReadClock>(
    sh: &Shared<E>,
    rx: &mut RxPath<E::Tun>,
    ready: &mut <E::Bind as Bind>::Ready,
    clock: &C,
) -> Answered {
    let (delivered, at) = rx.run(sh, ready, clock);
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
    match tx.run(sh, clock) {
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
pub(super) fn wake_tx_for_bulk<E: Edges>(sh: &Shared<E>, packets: usize) {
    if packets >= BULK_PACKETS && sh.tx_park.wake() {
        sh.stats.tx_wakeups.fetch_add(1, Ordering::Relaxed);
    }
}

/// The `meshd-rx` thread: sleeps on the sockets (and, while the tx thread is parked, the
/// TUN), carries what arrives, and the TUN's sparse traffic while the tx thread sleeps.
pub(super) fn rx_worker<E: Edges>(sh: &Shared<E>) {
    let mut poller = BusyPoll::new(sh.busy_poll);
    let mut ready = <E::Bind as Bind>::Ready::default();
    while !sh.stopped() {
        // While the tx thread is parked, watch the TUN too.
        let watch_tun = !sh.tx_park.is_awake();
        let Some(woken) = sh
            .poller
            .wait(&sh.tun, &sh.udp, &mut ready, watch_tun, 1000)
        else {
            if let Some(mut rx) = try_lock(&sh.rx) {
                rx.idle_tick();
            }
            continue;
        };
        if woken.sockets {
            // A busy-polling tx thread may be draining the sockets itself: let it.
            let Some(mut rx) = try_lock(&sh.rx) else {
                std::thread::yield_now();
                continue;
            };
            let pass = rx_and_answer(sh, &mut rx, &mut ready, &sh.clock);
            drop(rx);
            // A request came in and no answer was ready yet (a server at work): wait for
            // the answer on the TUN here rather than waking the tx thread for it.
            if let Some(now) = pass.at.filter(|_| pass.delivered > 0 && !pass.answered) {
                if tx_quiet(sh, now) {
                    poller.wait_for_tx(sh);
                }
            }
        }
        if woken.tun {
            let Some(mut tx) = try_lock(&sh.tx) else {
                continue;
            };
            match tx.run(sh, &sh.clock) {
                TxPass::Sent(n, _) if n >= BULK_PACKETS => {
                    drop(tx);
                    wake_tx_for_bulk(sh, n);
                }
                TxPass::Sent(_, now) => {
                    drop(tx);
                    if super::rx_quiet(sh, now) {
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
