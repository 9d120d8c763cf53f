//! The packet path's two edges, batch-shaped like wireguard-go's `tun.Device` and
//! `conn.Bind`: a [`TunQueue`] (one queue of the TUN device) and a [`Bind`] (the tunnel's
//! datagram sockets), plus the [`Poller`] the workers sleep on. The workers, the send batch
//! and the [`Pump`](super::Pump) are generic over an [`Edges`] bundle and monomorphised: the
//! real one ([`Real`]: tun-rs, [`Udp`] with GSO/GRO, epoll) or the in-memory fakes
//! ([`Fake`](super::fake::Fake)).
//!
//! Every call moves many buffers:
//! - [`TunQueue::read`] fills up to `bufs.len()` IP packets from one read (with offload, one
//!   TSO super-packet behind a virtio-net header, split at its GSO size);
//!   [`TunQueue::write`] writes a batch (with offload, GRO-coalesced back into super-packets).
//! - [`Bind::send_to_peer`] sends one buffer of equal-sized datagrams (`segment`: UDP GSO);
//!   [`Bind::recv`] fills many buffers, each a GRO train of datagrams `stride` bytes apart.
//!
//! Per-peer connected sockets, the epoll set and the wake-up socketpair are details of the
//! real implementation; the generic code sees none of them.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use quinn_udp::RecvMeta;
use tun_rs::GROTable;

use super::buffers::{Chunk, Slot};
use super::handoff::Signal;
use super::tun::Tun;
use super::udp::{self, Udp};

/// Header room the packet path leaves in front of every packet it writes to the TUN (the
/// virtio-net header with offload).
pub const TUN_OFFSET: usize = tun_rs::VIRTIO_NET_HDR_LEN;

/// One queue of the TUN device.
pub trait TunQueue: Send + Sync + 'static {
    /// Per-writer coalescing state (tun-rs's GRO table), made on the first batch that can
    /// coalesce and dropped when the path goes idle.
    type Coalesce: Send;

    /// Reads what one read of the device yields into `bufs` (packets at offset 0), their
    /// lengths into `sizes`; `scratch` (at least `TUN_OFFSET + 65535` bytes) takes the raw
    /// read. Returns how many packets; `WouldBlock` when nothing is queued.
    fn read(
        &self,
        scratch: &mut [u8],
        bufs: &mut [Chunk],
        sizes: &mut [usize],
    ) -> io::Result<usize>;

    /// Writes `bufs`, each a packet behind [`TUN_OFFSET`] bytes of header room (which the
    /// writer may fill), coalescing through `coalesce` where it can.
    fn write(&self, coalesce: &mut Option<Self::Coalesce>, bufs: &mut [Slot]) -> io::Result<()>;
}

/// The tunnel's datagram sockets.
pub trait Bind: Send + Sync + 'static {
    /// The receive cursor: what the last wait reported ready, drained by [`recv`](Self::recv).
    type Ready: Default + Send;

    /// How many equal-sized datagrams one [`send_to_peer`](Self::send_to_peer) may carry.
    fn max_segments(&self) -> usize;

    /// Sends `contents` to an authenticated peer's endpoint: one datagram, or several of
    /// `segment` bytes each (the last may be shorter).
    fn send_to_peer(
        &self,
        to: SocketAddr,
        contents: &[u8],
        segment: Option<usize>,
    ) -> io::Result<()>;

    /// As [`send_to_peer`](Self::send_to_peer) for any address (answers to strangers, such
    /// as cookie replies).
    fn send(&self, to: SocketAddr, contents: &[u8]) -> io::Result<()>;

    /// Receives a batch into `bufs` (one GRO train per buffer, described by `meta`) from
    /// what `ready` reports; `WouldBlock` once that is drained.
    fn recv(
        &self,
        ready: &mut Self::Ready,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize>;

    /// Drops per-endpoint state (connected sockets) of endpoints `keep` rejects; returns how
    /// many went.
    fn retain_endpoints(&self, keep: impl Fn(&SocketAddr) -> bool) -> usize;
}

/// What woke [`Poller::wait`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Woken {
    /// A socket has datagrams.
    pub sockets: bool,
    /// The TUN has packets (only reported while watched).
    pub tun: bool,
}

/// How the workers wait on the edges.
pub trait Poller<E: Edges>: Send + Sync + 'static {
    /// The rx worker's sleep: until a socket, a [`wake`](Self::wake) or, if `watch_tun`, the
    /// TUN is ready, at most `timeout_ms`. `None` on timeout. Fills `ready` for
    /// [`Bind::recv`].
    fn wait(
        &self,
        tun: &E::Tun,
        bind: &E::Bind,
        ready: &mut <E::Bind as Bind>::Ready,
        watch_tun: bool,
        timeout_ms: i32,
    ) -> Option<Woken>;

    /// Makes a pending or the next [`wait`](Self::wait) return (the tx worker parked: the
    /// rx worker must watch the TUN again).
    fn wake(&self);

    /// Whether the TUN becomes readable within `timeout_ms` (0: is it now).
    fn tun_readable(&self, tun: &E::Tun, timeout_ms: i32) -> bool;

    /// Whether a datagram is waiting now.
    fn socket_readable(&self, bind: &E::Bind) -> bool;
}

/// A TUN queue, a bind and a poller that go together.
pub trait Edges: Sized + Send + Sync + 'static {
    /// The TUN side.
    type Tun: TunQueue;
    /// The datagram side.
    type Bind: Bind;
    /// The waiting.
    type Poller: Poller<Self>;
}

/// The real edges: a tun-rs queue, [`Udp`] and epoll.
pub struct Real;

impl Edges for Real {
    type Tun = Tun;
    type Bind = Udp;
    type Poller = EpollPoller;
}

impl TunQueue for Tun {
    type Coalesce = GROTable;

    #[inline]
    fn read(
        &self,
        scratch: &mut [u8],
        bufs: &mut [Chunk],
        sizes: &mut [usize],
    ) -> io::Result<usize> {
        self.dev.recv_multiple(scratch, bufs, sizes, 0)
    }

    fn write(&self, gro: &mut Option<GROTable>, bufs: &mut [Slot]) -> io::Result<()> {
        if self.offload && bufs.len() > 1 {
            let gro = gro.get_or_insert_with(GROTable::default);
            self.dev.send_multiple(gro, bufs, TUN_OFFSET).map(drop)
        } else if let [one] = bufs {
            // Nothing to coalesce: a zeroed virtio header (no GSO, checksum complete) and
            // one write, as send_multiple would do after its table work.
            let skip = if self.offload {
                one.as_mut()[..TUN_OFFSET].fill(0);
                0
            } else {
                TUN_OFFSET
            };
            self.dev.send(&one.as_ref()[skip..]).map(drop)
        } else {
            let mut r = Ok(());
            for b in bufs.iter() {
                if let Err(e) = self.dev.send(&b.as_ref()[TUN_OFFSET..]) {
                    r = Err(e);
                }
            }
            r
        }
    }
}

impl Bind for Udp {
    type Ready = udp::Ready;

    #[inline]
    fn max_segments(&self) -> usize {
        Udp::max_segments(self)
    }

    #[inline]
    fn send_to_peer(
        &self,
        to: SocketAddr,
        contents: &[u8],
        segment: Option<usize>,
    ) -> io::Result<()> {
        Udp::send_to_peer(self, to, contents, segment)
    }

    #[inline]
    fn send(&self, to: SocketAddr, contents: &[u8]) -> io::Result<()> {
        Udp::send(self, to, contents, None)
    }

    #[inline]
    fn recv(
        &self,
        ready: &mut udp::Ready,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        Udp::recv(self, ready, bufs, meta)
    }

    fn retain_endpoints(&self, keep: impl Fn(&SocketAddr) -> bool) -> usize {
        self.retain_connected(keep)
    }
}

/// The rx worker's tokens for its other descriptors in the sockets' epoll set.
const WAKE_TOKEN: u64 = udp::FIRST_OTHER_TOKEN;
const TUN_TOKEN: u64 = udp::FIRST_OTHER_TOKEN + 1;

/// The real waiting: one epoll set (the [`Udp`]'s) over the listener, the connected sockets,
/// a wake-up socketpair and, while the tx worker is parked, the TUN.
pub struct EpollPoller {
    wake: Signal,
    /// Whether the TUN is in the epoll set (changed only by the rx worker).
    tun_watched: AtomicBool,
}

impl EpollPoller {
    /// Adds the wake-up socket to `udp`'s epoll set.
    pub fn new(udp: &Udp) -> io::Result<EpollPoller> {
        let wake = Signal::new()?;
        udp.watch(wake.as_raw_fd(), WAKE_TOKEN, true)?;
        Ok(EpollPoller {
            wake,
            tun_watched: AtomicBool::new(false),
        })
    }
}

impl Poller<Real> for EpollPoller {
    fn wait(
        &self,
        tun: &Tun,
        udp: &Udp,
        ready: &mut udp::Ready,
        watch_tun: bool,
        timeout_ms: i32,
    ) -> Option<Woken> {
        let mut watched = self.tun_watched.load(Ordering::Relaxed);
        if watch_tun != watched {
            match udp.watch(tun.dev.as_raw_fd(), TUN_TOKEN, watch_tun) {
                Ok(()) => {
                    watched = watch_tun;
                    self.tun_watched.store(watched, Ordering::Relaxed);
                }
                Err(e) => tracing::warn!(error = %e, "cannot watch the TUN"),
            }
        }
        if udp.wait(ready, timeout_ms) == 0 {
            return None;
        }
        if ready.has(WAKE_TOKEN) {
            self.wake.drain();
        }
        Some(Woken {
            sockets: ready.has_socket(),
            tun: watched && ready.has(TUN_TOKEN),
        })
    }

    fn wake(&self) {
        self.wake.signal();
    }

    #[inline]
    fn tun_readable(&self, tun: &Tun, timeout_ms: i32) -> bool {
        udp::poll_one(tun.dev.as_raw_fd(), libc::POLLIN, timeout_ms)
    }

    #[inline]
    fn socket_readable(&self, udp: &Udp) -> bool {
        udp::poll_one(udp.as_raw_fd(), libc::POLLIN, 0)
    }
}
