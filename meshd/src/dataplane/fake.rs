//! In-memory edges: a [`FakeTun`] to inject IP packets into (as the host's stack would
//! write them) and read delivered ones from, and a [`FakeNet`] that carries datagrams
//! between [`FakeBind`]s and records each one. No root, no descriptors: a [`FakePoller`]
//! sleeps on a condition variable the fakes ring, so the real worker threads can run over
//! them too ([`Dataplane::start_with`](super::Dataplane::start_with)), and a
//! [`Pump`](super::Pump) drives them without any waiting at all.
//!
//! Offload is modelled where it changes the packet path's work: a TUN with offload reads a
//! TCP super-packet ([`FakeTun::inject_tso`]) split at its segment size by tun-rs's own
//! splitter (the code `recv_multiple` runs behind a virtio-net header), and a send with a
//! GSO segment size arrives as one GRO train (`stride`), as over a veth with `UDP_GRO`.
//!
//! Inside the data path's passes the fakes allocate nothing once warmed up (the
//! zero-allocation test, `meshd/tests/zero_alloc.rs`, counts): packet and train buffers come
//! from pools ([`FakeTun::recycle`] gives delivered packets back, a fully received train's
//! buffer returns to the link), and the link's record of every datagram, which grows by
//! one `Vec` per datagram, can be switched off ([`FakeNet::set_recording`]).

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use quinn_udp::RecvMeta;
use tun_rs::{VirtioNetHdr, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6};

use super::buffers::{Chunk, Slot};
use super::edge::{Bind, Edges, Poller, TunQueue, Woken, TUN_OFFSET};

/// The fake edges.
pub struct Fake;

impl Edges for Fake {
    type Tun = FakeTun;
    type Bind = FakeBind;
    type Poller = FakePoller;
}

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Rung by a host's fakes whenever something becomes readable for it.
#[derive(Default)]
struct Doorbell {
    rings: Mutex<u64>,
    cv: Condvar,
}

impl Doorbell {
    fn ring(&self) {
        *guard(&self.rings) += 1;
        self.cv.notify_all();
    }

    /// Waits until `ready()` (checked under the bell's lock) or `timeout`.
    fn wait_for(&self, timeout: Duration, mut ready: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = guard(&self.rings);
        loop {
            if ready() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            g = self
                .cv
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// What the host's stack handed the TUN.
enum Frame {
    Packet(Vec<u8>),
    /// A TCP super-packet and its segment size (with offload).
    Tso(Vec<u8>, u16),
}

#[derive(Default)]
struct TunState {
    inbound: VecDeque<Frame>,
    delivered: VecDeque<Vec<u8>>,
    /// Packet buffers to reuse (frames read, packets given back by [`FakeTun::recycle`]).
    spare: Vec<Vec<u8>>,
    writes: usize,
}

/// Capacity of a new fake packet buffer: any packet at MTU fits a reused one.
const PACKET_CAPACITY: usize = 2048;

/// A copy of `bytes` in a buffer from `spare` (a new one if none is left).
fn pooled(spare: &mut Vec<Vec<u8>>, bytes: &[u8], capacity: usize) -> Vec<u8> {
    let mut v = spare
        .pop()
        .unwrap_or_else(|| Vec::with_capacity(bytes.len().max(capacity)));
    v.clear();
    v.extend_from_slice(bytes);
    v
}

struct TunInner {
    offload: bool,
    state: Mutex<TunState>,
    bell: Arc<Doorbell>,
}

/// An in-memory TUN queue (a handle: clones share the queue).
#[derive(Clone)]
pub struct FakeTun {
    inner: Arc<TunInner>,
}

impl FakeTun {
    /// Queues an IP packet for the data path to read (what an application's send becomes).
    pub fn inject(&self, packet: &[u8]) {
        let mut s = guard(&self.inner.state);
        let p = pooled(&mut s.spare, packet, PACKET_CAPACITY);
        s.inbound.push_back(Frame::Packet(p));
        drop(s);
        self.inner.bell.ring();
    }

    /// Queues a TCP super-packet (one IP header, one TCP header, a payload of many
    /// segments) to be read as segments of `mss` payload bytes, as the kernel hands one to a
    /// TUN with TSO. Needs offload.
    pub fn inject_tso(&self, packet: &[u8], mss: u16) -> io::Result<()> {
        if !self.inner.offload {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "TSO needs a TUN with offload",
            ));
        }
        let mut s = guard(&self.inner.state);
        let p = pooled(&mut s.spare, packet, PACKET_CAPACITY);
        s.inbound.push_back(Frame::Tso(p, mss));
        drop(s);
        self.inner.bell.ring();
        Ok(())
    }

    /// Takes the packets the data path delivered, in order.
    pub fn take_delivered(&self) -> Vec<Vec<u8>> {
        guard(&self.inner.state).delivered.drain(..).collect()
    }

    /// Gives packet buffers (say, from [`take_delivered`](Self::take_delivered)) back for
    /// later deliveries and injections to reuse.
    pub fn recycle(&self, packets: impl IntoIterator<Item = Vec<u8>>) {
        guard(&self.inner.state).spare.extend(packets);
    }

    /// How many injected frames the data path has not read yet.
    pub fn pending(&self) -> usize {
        guard(&self.inner.state).inbound.len()
    }

    /// How many write calls the data path made (one per batch).
    pub fn writes(&self) -> usize {
        guard(&self.inner.state).writes
    }
}

/// The virtio-net header the kernel puts in front of a TCP super-packet.
fn tso_header(packet: &[u8], mss: u16) -> io::Result<(VirtioNetHdr, bool)> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_string());
    let first = packet.first().ok_or_else(|| bad("empty packet"))?;
    let (is_v6, ip_len) = match first >> 4 {
        4 => (false, usize::from(first & 0x0f) * 4),
        6 => (true, 40),
        _ => return Err(bad("not an IP packet")),
    };
    let tcp_len = packet
        .get(ip_len + 12)
        .map(|b| usize::from(b >> 4) * 4)
        .ok_or_else(|| bad("no TCP header"))?;
    let hdr_len = u16::try_from(ip_len + tcp_len).map_err(|_| bad("headers too long"))?;
    let hdr = VirtioNetHdr {
        flags: 1, // VIRTIO_NET_HDR_F_NEEDS_CSUM
        gso_type: if is_v6 {
            VIRTIO_NET_HDR_GSO_TCPV6
        } else {
            VIRTIO_NET_HDR_GSO_TCPV4
        },
        hdr_len,
        gso_size: mss,
        csum_start: ip_len as u16,
        csum_offset: 16,
    };
    Ok((hdr, is_v6))
}

impl TunQueue for FakeTun {
    type Coalesce = ();

    fn read(
        &self,
        _scratch: &mut [u8],
        bufs: &mut [Chunk],
        sizes: &mut [usize],
    ) -> io::Result<usize> {
        let frame = guard(&self.inner.state).inbound.pop_front();
        let (read, buffer) = match frame {
            None => return Err(io::ErrorKind::WouldBlock.into()),
            Some(Frame::Packet(p)) => {
                let read = match (bufs.first_mut(), sizes.first_mut()) {
                    (Some(buf), Some(size)) => match buf.as_mut().get_mut(..p.len()) {
                        Some(dst) => {
                            dst.copy_from_slice(&p);
                            *size = p.len();
                            Ok(1)
                        }
                        None => Err(io::Error::other("packet longer than the buffer")),
                    },
                    _ => Err(io::Error::other("no buffer")),
                };
                (read, p)
            }
            Some(Frame::Tso(mut p, mss)) => {
                let read = tso_header(&p, mss)
                    .and_then(|(hdr, is_v6)| tun_rs::gso_split(&mut p, hdr, bufs, sizes, 0, is_v6));
                (read, p)
            }
        };
        // The frame's buffer serves a later injection or delivery.
        guard(&self.inner.state).spare.push(buffer);
        read
    }

    fn write(&self, _coalesce: &mut Option<()>, bufs: &mut [Slot]) -> io::Result<()> {
        let mut s = guard(&self.inner.state);
        s.writes += 1;
        let s = &mut *s;
        for b in bufs.iter() {
            if let Some(p) = b.as_ref().get(TUN_OFFSET..) {
                let p = pooled(&mut s.spare, p, PACKET_CAPACITY);
                s.delivered.push_back(p);
            }
        }
        Ok(())
    }
}

/// One datagram that crossed a [`FakeNet`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wire {
    /// Sender's address.
    pub from: SocketAddr,
    /// Destination address.
    pub to: SocketAddr,
    /// The datagram.
    pub datagram: Vec<u8>,
}

/// One send call (the sender's view): destination, bytes, GSO segment size.
pub type SendCall = (SocketAddr, usize, Option<usize>);

/// Datagrams waiting at a host: one GRO train per send.
struct Train {
    from: SocketAddr,
    data: Vec<u8>,
    stride: usize,
}

struct Inbox {
    trains: VecDeque<Train>,
    bell: Arc<Doorbell>,
}

/// Capacity of a new train buffer: the largest GSO send fits a reused one.
const TRAIN_CAPACITY: usize = 65_536;

#[derive(Default)]
struct NetState {
    hosts: HashMap<SocketAddr, Inbox>,
    /// Off: `wire` and `sends` record nothing (see [`FakeNet::set_recording`]).
    unrecorded: bool,
    wire: Vec<Wire>,
    sends: Vec<SendCall>,
    /// Buffers of trains received whole, for later sends to reuse.
    spare: Vec<Vec<u8>>,
}

/// A lossless in-memory link between hosts, addressed by socket address (a handle: clones
/// share the link).
#[derive(Clone, Default)]
pub struct FakeNet {
    state: Arc<Mutex<NetState>>,
}

/// One host's fake edges.
pub struct FakeHost {
    /// Its TUN.
    pub tun: FakeTun,
    /// Its sockets.
    pub bind: FakeBind,
    /// Its waiting.
    pub poller: FakePoller,
}

impl FakeHost {
    /// The edges, for [`Pump::new`](super::Pump::new) or
    /// [`Dataplane::start_with`](super::Dataplane::start_with) (the TUN and bind stay
    /// reachable through clones).
    pub fn edges(&self) -> (FakeTun, FakeBind, FakePoller) {
        (self.tun.clone(), self.bind.clone(), self.poller.clone())
    }
}

impl FakeNet {
    /// An empty link.
    pub fn new() -> FakeNet {
        FakeNet::default()
    }

    /// Attaches a host at `addr` with a TUN (with or without offload).
    pub fn host(&self, addr: SocketAddr, offload: bool) -> FakeHost {
        let bell = Arc::new(Doorbell::default());
        guard(&self.state).hosts.insert(
            addr,
            Inbox {
                trains: VecDeque::new(),
                bell: bell.clone(),
            },
        );
        FakeHost {
            tun: FakeTun {
                inner: Arc::new(TunInner {
                    offload,
                    state: Mutex::new(TunState::default()),
                    bell: bell.clone(),
                }),
            },
            bind: FakeBind {
                net: self.clone(),
                addr,
            },
            poller: FakePoller {
                bell,
                woken: Arc::new(AtomicBool::new(false)),
            },
        }
    }

    /// Whether the link records every datagram and send call for [`wire`](Self::wire),
    /// [`take_wire`](Self::take_wire) and [`sends`](Self::sends) (on by default). The record
    /// costs a `Vec` per datagram: a harness that pushes many packets through and counts
    /// allocations turns it off.
    pub fn set_recording(&self, on: bool) {
        guard(&self.state).unrecorded = !on;
    }

    /// Every datagram that crossed the link so far, in order.
    pub fn wire(&self) -> Vec<Wire> {
        guard(&self.state).wire.clone()
    }

    /// Takes the datagrams that crossed the link since the last take, in order (a harness
    /// that carries them over links of its own: attach one host per [`FakeNet`] and nothing
    /// sent to a peer arrives here by itself).
    pub fn take_wire(&self) -> Vec<Wire> {
        std::mem::take(&mut guard(&self.state).wire)
    }

    /// Every send call so far: (destination, bytes, GSO segment size).
    pub fn sends(&self) -> Vec<SendCall> {
        guard(&self.state).sends.clone()
    }

    /// Datagrams waiting to be received anywhere.
    pub fn in_flight(&self) -> usize {
        guard(&self.state)
            .hosts
            .values()
            .map(|h| h.trains.len())
            .sum()
    }

    fn carry(&self, from: SocketAddr, to: SocketAddr, contents: &[u8], segment: Option<usize>) {
        let stride = segment
            .filter(|&s| s > 0 && s < contents.len())
            .unwrap_or(contents.len())
            .max(1);
        let bell = {
            let mut s = guard(&self.state);
            let s = &mut *s;
            if !s.unrecorded {
                s.sends.push((to, contents.len(), segment));
                for d in contents.chunks(stride) {
                    s.wire.push(Wire {
                        from,
                        to,
                        datagram: d.to_vec(),
                    });
                }
            }
            // Nobody at `to`: the datagram is lost, as on a real link.
            s.hosts.get_mut(&to).map(|h| {
                h.trains.push_back(Train {
                    from,
                    data: pooled(&mut s.spare, contents, TRAIN_CAPACITY),
                    stride,
                });
                h.bell.clone()
            })
        };
        if let Some(b) = bell {
            b.ring();
        }
    }
}

/// A host's sockets on a [`FakeNet`] (a handle).
#[derive(Clone)]
pub struct FakeBind {
    net: FakeNet,
    addr: SocketAddr,
}

/// The fake receive cursor (the fake has nothing to remember between calls).
#[derive(Debug, Default)]
pub struct FakeReady;

impl FakeBind {
    /// This host's address on the link.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Queues `datagram` as arriving from `from` (what a link outside this [`FakeNet`]
    /// delivered), for the next receive. Not recorded on the wire: it did not cross this link.
    pub fn inject(&self, from: SocketAddr, datagram: &[u8]) {
        let bell = {
            let mut s = guard(&self.net.state);
            let s = &mut *s;
            s.hosts.get_mut(&self.addr).map(|h| {
                h.trains.push_back(Train {
                    from,
                    data: pooled(&mut s.spare, datagram, TRAIN_CAPACITY),
                    stride: datagram.len().max(1),
                });
                h.bell.clone()
            })
        };
        if let Some(b) = bell {
            b.ring();
        }
    }

    fn pending(&self) -> bool {
        guard(&self.net.state)
            .hosts
            .get(&self.addr)
            .is_some_and(|h| !h.trains.is_empty())
    }
}

impl Bind for FakeBind {
    type Ready = FakeReady;

    fn max_segments(&self) -> usize {
        64
    }

    fn send_to_peer(
        &self,
        to: SocketAddr,
        contents: &[u8],
        segment: Option<usize>,
    ) -> io::Result<()> {
        self.net.carry(self.addr, to, contents, segment);
        Ok(())
    }

    fn send(&self, to: SocketAddr, contents: &[u8]) -> io::Result<()> {
        self.net.carry(self.addr, to, contents, None);
        Ok(())
    }

    fn recv(
        &self,
        _ready: &mut FakeReady,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        let mut s = guard(&self.net.state);
        let s = &mut *s;
        let Some(inbox) = s.hosts.get_mut(&self.addr) else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let mut n = 0;
        for (buf, m) in bufs.iter_mut().zip(meta.iter_mut()) {
            let Some(mut t) = inbox.trains.pop_front() else {
                break;
            };
            // Whole datagrams only: what does not fit stays for the next buffer.
            let fit = (buf.len() / t.stride * t.stride).min(t.data.len());
            if fit == 0 {
                // A datagram larger than any buffer: truncated away, as by the kernel.
                s.spare.push(t.data);
                continue;
            }
            buf[..fit].copy_from_slice(&t.data[..fit]);
            *m = RecvMeta::default();
            m.addr = t.from;
            m.len = fit;
            m.stride = t.stride;
            n += 1;
            if fit < t.data.len() {
                t.data.drain(..fit);
                inbox.trains.push_front(t);
            } else {
                s.spare.push(t.data);
            }
        }
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    fn retain_endpoints(&self, _keep: impl Fn(&SocketAddr) -> bool) -> usize {
        0
    }
}

/// Waiting on a host's fakes: a condition variable its TUN and inbox ring.
#[derive(Clone)]
pub struct FakePoller {
    bell: Arc<Doorbell>,
    woken: Arc<AtomicBool>,
}

impl Poller<Fake> for FakePoller {
    fn wait(
        &self,
        tun: &FakeTun,
        bind: &FakeBind,
        _ready: &mut FakeReady,
        watch_tun: bool,
        timeout_ms: i32,
    ) -> Option<Woken> {
        let mut woken = Woken::default();
        let timeout = Duration::from_millis(u64::try_from(timeout_ms).unwrap_or(0));
        let any = self.bell.wait_for(timeout, || {
            woken.sockets = bind.pending();
            woken.tun = watch_tun && tun.pending() > 0;
            let signalled = self.woken.swap(false, Ordering::AcqRel);
            woken.sockets || woken.tun || signalled
        });
        any.then_some(woken)
    }

    fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        self.bell.ring();
    }

    fn tun_readable(&self, tun: &FakeTun, timeout_ms: i32) -> bool {
        let timeout = Duration::from_millis(u64::try_from(timeout_ms).unwrap_or(0));
        self.bell.wait_for(timeout, || tun.pending() > 0)
    }

    fn socket_readable(&self, bind: &FakeBind) -> bool {
        bind.pending()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::from(([198, 18, 0, last], 51820))
    }

    fn recv_all(bind: &FakeBind) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut got = Vec::new();
        let mut bufs = [[0u8; 64]; 4];
        let mut meta = [RecvMeta::default(); 4];
        loop {
            let mut iov = bufs.each_mut().map(|b| IoSliceMut::new(b));
            match bind.recv(&mut FakeReady, &mut iov, &mut meta) {
                Ok(n) => {
                    for (m, b) in meta[..n].iter().zip(&bufs) {
                        got.push((m.addr, b[..m.len].to_vec()));
                    }
                }
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
                    return got;
                }
            }
        }
    }

    #[test]
    fn take_wire_drains_what_was_sent_and_keeps_the_send_calls() {
        let net = FakeNet::new();
        let a = net.host(addr(1), false);
        a.bind.send(addr(2), b"one").unwrap();
        a.bind.send_to_peer(addr(3), b"twothree", Some(3)).unwrap();
        let wire = net.take_wire();
        let seen: Vec<(SocketAddr, &[u8])> =
            wire.iter().map(|w| (w.to, w.datagram.as_slice())).collect();
        assert_eq!(
            seen,
            [
                (addr(2), &b"one"[..]),
                (addr(3), b"two"),
                (addr(3), b"thr"),
                (addr(3), b"ee")
            ]
        );
        assert!(wire.iter().all(|w| w.from == addr(1)));
        assert!(net.take_wire().is_empty(), "taken");
        assert!(net.wire().is_empty());
        assert_eq!(net.sends().len(), 2, "send calls stay recorded");
        assert_eq!(
            net.in_flight(),
            0,
            "nobody at the destinations: nothing queued"
        );
    }

    #[test]
    fn inject_queues_a_datagram_with_its_source_for_the_next_receive() {
        let net = FakeNet::new();
        let a = net.host(addr(1), false);
        assert!(!a.poller.socket_readable(&a.bind));
        a.bind.inject(addr(7), b"hello");
        a.bind.inject(addr(8), b"again");
        assert!(a.poller.socket_readable(&a.bind));
        assert_eq!(
            recv_all(&a.bind),
            [(addr(7), b"hello".to_vec()), (addr(8), b"again".to_vec())]
        );
        assert!(
            net.wire().is_empty(),
            "injected datagrams did not cross this link"
        );
        // The poller wakes for it, as for a datagram carried by the link.
        a.bind.inject(addr(7), b"x");
        let woken = a
            .poller
            .wait(&a.tun, &a.bind, &mut FakeReady, false, 1000)
            .unwrap();
        assert!(woken.sockets);
    }
}
