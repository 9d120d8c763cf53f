//! The tunnel's UDP sockets: GRO on receive and GSO on send (through quinn-udp, which does
//! the cmsg work and degrades where the kernel cannot).
//!
//! One dual-stack listener takes whatever arrives at the port. Next to it, each peer we send
//! to gets its own socket bound to the same port (`SO_REUSEPORT`) and *connected* to the
//! peer's endpoint, as boringtun and wireguard-go do: a send on it needs no route lookup (the
//! socket caches its route) and a datagram from the peer is matched to it by the kernel's early
//! demux, which skips the input route lookup too. On the 2-vCPU lab that is ~10 µs per round
//! trip. The listener and the connected sockets sit in one epoll set, which the receive path
//! polls as a single descriptor.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{SocketAddr, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, PoisonError, RwLock};

use anyhow::Context as _;
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use socket2::{Domain, Protocol, Socket, Type};

/// Socket buffer size; forced past rmem_max when we are root.
const SOCKET_BUFFER: usize = 8 << 20;

/// Most connected sockets (one per peer we talk to; each is a descriptor). Peers past this
/// share the listener.
const MAX_CONNECTED: usize = 1024;

/// The listener's epoll token; connected sockets count up from 1.
const LISTENER: u64 = 0;

/// Events taken per `epoll_wait`.
const READY_EVENTS: usize = 32;

/// Tokens from here up are the caller's descriptors ([`Udp::watch`]), not sockets.
pub const FIRST_OTHER_TOKEN: u64 = u64::MAX - 15;

/// One UDP socket and its quinn-udp state.
struct Sock {
    sock: std::net::UdpSocket,
    state: UdpSocketState,
}

impl Sock {
    fn new(sock: Socket) -> io::Result<Sock> {
        force_buffer(&sock, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF);
        force_buffer(&sock, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF);
        sock.set_nonblocking(true)?;
        let sock: std::net::UdpSocket = sock.into();
        let state = UdpSocketState::new(UdpSockRef::from(&sock))?;
        Ok(Sock { sock, state })
    }

    fn recv(&self, bufs: &mut [io::IoSliceMut<'_>], meta: &mut [RecvMeta]) -> io::Result<usize> {
        self.state.recv(UdpSockRef::from(&self.sock), bufs, meta)
    }
}

/// A socket connected to one peer endpoint.
struct Conn {
    sock: Sock,
    token: u64,
}

impl Conn {
    /// One datagram to the connected address (no address given: the cached route is used).
    fn send(&self, contents: &[u8]) -> io::Result<()> {
        // SAFETY: a valid descriptor and a live buffer with its exact length.
        let rc = unsafe {
            libc::send(
                self.sock.sock.as_raw_fd(),
                contents.as_ptr().cast(),
                contents.len(),
                0,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

/// The connected sockets, by endpoint and by epoll token.
#[derive(Default)]
struct Conns {
    by_addr: HashMap<SocketAddr, Arc<Conn>>,
    by_token: HashMap<u64, Arc<Conn>>,
    next_token: u64,
    /// Endpoints a socket could not be opened for (until the next sweep).
    refused: HashSet<SocketAddr>,
    /// Set when the process ran out of descriptors: stop opening sockets.
    exhausted: bool,
}

/// The receive path's cursor over ready sockets (one `epoll_wait` per pass, not per batch).
pub struct Ready {
    events: [libc::epoll_event; READY_EVENTS],
    n: usize,
    next: usize,
    polled: bool,
}

impl Ready {
    /// Whether the last wait reported the descriptor watched under `token`.
    pub fn has(&self, token: u64) -> bool {
        self.events[..self.n].iter().any(|e| e.u64 == token)
    }

    /// Whether the last wait reported a socket.
    pub fn has_socket(&self) -> bool {
        self.events[..self.n]
            .iter()
            .any(|e| e.u64 < FIRST_OTHER_TOKEN)
    }
}

impl Default for Ready {
    fn default() -> Self {
        Ready {
            events: [libc::epoll_event { events: 0, u64: 0 }; READY_EVENTS],
            n: 0,
            next: 0,
            polled: false,
        }
    }
}

/// The tunnel's sockets, shared by the workers (sending and receiving take `&self`).
pub struct Udp {
    listener: Sock,
    dual_stack: bool,
    port: u16,
    fwmark: Option<u32>,
    epoll: OwnedFd,
    conns: RwLock<Conns>,
    max_conns: usize,
    /// Held for the daemon's life: a second meshd in this network namespace cannot take
    /// the port (`SO_REUSEPORT` alone would let it).
    _claim: UnixDatagram,
}

impl Udp {
    /// Binds `[::]:port` (dual-stack), falling back to `0.0.0.0:port` without IPv6.
    pub fn bind(port: u16, fwmark: Option<u32>) -> anyhow::Result<Udp> {
        Self::bind_with(port, fwmark, MAX_CONNECTED)
    }

    /// As [`bind`](Self::bind), with at most `max_conns` connected sockets (0: none).
    pub fn bind_with(port: u16, fwmark: Option<u32>, max_conns: usize) -> anyhow::Result<Udp> {
        let in_use = || {
            anyhow::anyhow!(
                "UDP port {port} is already in use (another meshd or WireGuard on this host?); \
                 choose another listen_port"
            )
        };
        let claim = if port != 0 {
            let claim = claim_port(port).map_err(|_| in_use())?;
            // The listener shares its port with our connected sockets (SO_REUSEPORT), which
            // would also let it share with a stranger's socket that set the option: make
            // sure nobody holds the port first.
            match new_listener_socket(false) {
                Ok((probe, dual)) => match probe.bind(&wildcard(dual, port).into()) {
                    Err(e) if e.kind() == io::ErrorKind::AddrInUse => return Err(in_use()),
                    Err(e) => return Err(e).with_context(|| format!("binding UDP port {port}")),
                    Ok(()) => {}
                },
                Err(e) => return Err(e),
            }
            Some(claim)
        } else {
            None
        };
        let (sock, dual_stack) = new_listener_socket(true)?;
        if let Some(mark) = fwmark {
            sock.set_mark(mark)
                .context("setting SO_MARK on the tunnel socket")?;
        }
        if let Err(e) = sock.bind(&wildcard(dual_stack, port).into()) {
            if e.kind() == io::ErrorKind::AddrInUse {
                return Err(in_use());
            }
            return Err(e).with_context(|| format!("binding UDP port {port}"));
        }
        let listener = Sock::new(sock).context("UDP socket options")?;
        let port = listener.sock.local_addr().map(|a| a.port()).unwrap_or(port);
        let claim = match claim {
            Some(c) => c,
            None => claim_port(port).map_err(|_| in_use())?,
        };
        // SAFETY: epoll_create1 with a valid flag; the result is checked before use.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(io::Error::last_os_error()).context("epoll_create1");
        }
        // SAFETY: a fresh descriptor we own.
        let epoll = unsafe { OwnedFd::from_raw_fd(epfd) };
        epoll_add(&epoll, listener.sock.as_raw_fd(), LISTENER).context("epoll_ctl")?;
        Ok(Udp {
            listener,
            dual_stack,
            port,
            fwmark,
            epoll,
            conns: RwLock::new(Conns {
                next_token: LISTENER + 1,
                ..Conns::default()
            }),
            max_conns: max_conns.min(descriptor_budget()),
            _claim: claim,
        })
    }

    /// The bound port (useful with `listen_port = 0`).
    pub fn local_port(&self) -> u16 {
        self.port
    }

    /// How many equal-sized datagrams one GSO send may carry (1 without GSO).
    pub fn max_segments(&self) -> usize {
        self.listener.state.max_gso_segments().clamp(1, 64)
    }

    /// Sends one datagram, or several of `segment` bytes each (the last may be shorter).
    /// A lone datagram goes out on `to`'s connected socket if it has one.
    pub fn send(&self, to: SocketAddr, contents: &[u8], segment: Option<usize>) -> io::Result<()> {
        let segment = segment.filter(|&s| s < contents.len());
        if segment.is_none() {
            if let Some(sent) = self.send_connected(to, contents) {
                return sent;
            }
        }
        self.send_listener(to, contents, segment)
    }

    /// As [`send`](Self::send) for `to`, an authenticated peer's endpoint: opens a connected
    /// socket for it if it has none (only for peers: a stranger's address gets none).
    pub fn send_to_peer(
        &self,
        to: SocketAddr,
        contents: &[u8],
        segment: Option<usize>,
    ) -> io::Result<()> {
        let segment = segment.filter(|&s| s < contents.len());
        if segment.is_some() {
            return self.send_listener(to, contents, segment);
        }
        if let Some(sent) = self.send_connected(to, contents) {
            return sent;
        }
        let sent = self.send_listener(to, contents, None);
        if self.max_conns > 0 {
            self.connect(to);
        }
        sent
    }

    /// Receives a batch from the next ready socket; addresses are normalised (no v4-mapped
    /// v6). `WouldBlock` once every socket `epoll` reported ready has been drained.
    pub fn recv(
        &self,
        ready: &mut Ready,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        loop {
            if ready.next < ready.n {
                let token = ready.events[ready.next].u64;
                let got = if token >= FIRST_OTHER_TOKEN {
                    Err(io::ErrorKind::WouldBlock.into())
                } else if token == LISTENER {
                    self.listener.recv(bufs, meta)
                } else {
                    match self.read_conns().by_token.get(&token) {
                        Some(c) => c.sock.recv(bufs, meta),
                        None => Err(io::ErrorKind::WouldBlock.into()),
                    }
                };
                match got {
                    Ok(n) => {
                        if n < bufs.len() {
                            ready.next += 1;
                        }
                        for m in &mut meta[..n] {
                            m.addr = SocketAddr::new(m.addr.ip().to_canonical(), m.addr.port());
                        }
                        return Ok(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready.next += 1,
                    // A connected socket reports an ICMP error (the peer's port closed) on
                    // its next receive; the error is consumed, the socket stays usable.
                    Err(e) if token != LISTENER => {
                        tracing::trace!(error = %e, "connected socket error");
                        ready.next += 1;
                    }
                    Err(e) => {
                        ready.next += 1;
                        return Err(e);
                    }
                }
            } else if !ready.polled {
                ready.polled = true;
                // SAFETY: a valid epoll descriptor and a buffer of READY_EVENTS events.
                let n = unsafe {
                    libc::epoll_wait(
                        self.epoll.as_raw_fd(),
                        ready.events.as_mut_ptr(),
                        READY_EVENTS as libc::c_int,
                        0,
                    )
                };
                ready.n = usize::try_from(n).unwrap_or(0);
                ready.next = 0;
            } else {
                ready.polled = false;
                ready.n = 0;
                ready.next = 0;
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
    }

    /// Sleeps until a socket or a watched descriptor is ready or `timeout_ms` passes; the
    /// events land in `ready` for [`recv`](Self::recv). Returns how many.
    pub fn wait(&self, ready: &mut Ready, timeout_ms: i32) -> usize {
        // SAFETY: a valid epoll descriptor and a buffer of READY_EVENTS events.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                ready.events.as_mut_ptr(),
                READY_EVENTS as libc::c_int,
                timeout_ms,
            )
        };
        ready.n = usize::try_from(n).unwrap_or(0);
        ready.next = 0;
        ready.polled = true;
        ready.n
    }

    /// Adds (`on`) or removes another descriptor to the set [`wait`](Self::wait) sleeps on,
    /// reported under `token` (at least [`FIRST_OTHER_TOKEN`]).
    pub fn watch(&self, fd: libc::c_int, token: u64, on: bool) -> io::Result<()> {
        debug_assert!(token >= FIRST_OTHER_TOKEN);
        if on {
            epoll_add(&self.epoll, fd, token)
        } else {
            epoll_del(&self.epoll, fd);
            Ok(())
        }
    }

    /// A descriptor that polls readable while any socket (or watched descriptor) is ready.
    pub fn as_raw_fd(&self) -> libc::c_int {
        self.epoll.as_raw_fd()
    }

    /// Closes the connected sockets whose endpoint `keep` rejects (peers gone or roamed) and
    /// forgets failed attempts. Returns how many sockets were closed.
    pub fn retain_connected(&self, keep: impl Fn(&SocketAddr) -> bool) -> usize {
        let mut c = self.write_conns();
        c.refused.clear();
        let gone: Vec<SocketAddr> = c.by_addr.keys().filter(|a| !keep(a)).copied().collect();
        for addr in &gone {
            if let Some(conn) = c.by_addr.remove(addr) {
                c.by_token.remove(&conn.token);
                epoll_del(&self.epoll, conn.sock.sock.as_raw_fd());
            }
        }
        gone.len()
    }

    /// How many connected sockets are open.
    #[cfg(test)]
    pub fn connected(&self) -> usize {
        self.read_conns().by_addr.len()
    }

    fn read_conns(&self) -> std::sync::RwLockReadGuard<'_, Conns> {
        self.conns.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_conns(&self) -> std::sync::RwLockWriteGuard<'_, Conns> {
        self.conns.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends on `to`'s connected socket; `None` if it has none (or it just failed).
    fn send_connected(&self, to: SocketAddr, contents: &[u8]) -> Option<io::Result<()>> {
        let conns = self.read_conns();
        let conn = conns.by_addr.get(&to)?;
        let mut sent = conn.send(contents);
        if matches!(&sent, Err(e) if e.kind() == io::ErrorKind::ConnectionRefused) {
            // An earlier datagram drew an ICMP port unreachable (the peer restarting); the
            // error is reported once, on this send, which did not go out: send again.
            sent = conn.send(contents);
        }
        match sent {
            Ok(()) => Some(Ok(())),
            // Full buffer: the listener path waits for room.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => {
                // E.g. our address changed under the socket: drop it, the listener takes over
                // and the next send opens a fresh one.
                tracing::debug!(error = %e, endpoint = %to, "connected socket failed; closing it");
                drop(conns);
                self.disconnect(to, true);
                None
            }
        }
    }

    fn send_listener(
        &self,
        to: SocketAddr,
        contents: &[u8],
        segment: Option<usize>,
    ) -> io::Result<()> {
        let t = Transmit {
            destination: self.map(to),
            ecn: None,
            contents,
            segment_size: segment,
            src_ip: None,
        };
        // A full socket buffer: wait briefly for room rather than drop a whole GSO batch.
        for _ in 0..50 {
            match self
                .listener
                .state
                .try_send(UdpSockRef::from(&self.listener.sock), &t)
            {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    poll_one(self.listener.sock.as_fd().as_raw_fd(), libc::POLLOUT, 10);
                }
                other => return other,
            }
        }
        Err(io::ErrorKind::WouldBlock.into())
    }

    /// Opens a socket connected to `to` unless one exists, the budget is spent or another
    /// thread holds the table (the next send tries again).
    fn connect(&self, to: SocketAddr) {
        let Ok(mut c) = self.conns.try_write() else {
            return;
        };
        if c.exhausted
            || c.by_addr.len() >= self.max_conns
            || c.by_addr.contains_key(&to)
            || c.refused.contains(&to)
            || (to.is_ipv6() && !self.dual_stack)
        {
            return;
        }
        let token = c.next_token;
        let opened = self.open_connected(to).and_then(|sock| {
            epoll_add(&self.epoll, sock.sock.as_raw_fd(), token)?;
            Ok(sock)
        });
        match opened {
            Ok(sock) => {
                let conn = Arc::new(Conn { sock, token });
                c.next_token += 1;
                c.by_addr.insert(to, conn.clone());
                c.by_token.insert(token, conn);
            }
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => {
                tracing::warn!(error = %e, "out of descriptors: no more connected UDP sockets");
                c.exhausted = true;
            }
            Err(e) => {
                tracing::debug!(error = %e, endpoint = %to, "no connected socket for this endpoint");
                if c.refused.len() < self.max_conns {
                    c.refused.insert(to);
                }
            }
        }
    }

    fn open_connected(&self, to: SocketAddr) -> io::Result<Sock> {
        let domain = if to.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        };
        let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
        if to.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s.set_reuse_port(true)?;
        if let Some(mark) = self.fwmark {
            s.set_mark(mark)?;
        }
        let local: SocketAddr = if to.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, self.port).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, self.port).into()
        };
        s.bind(&local.into())?;
        s.connect(&to.into())?;
        Sock::new(s)
    }

    /// Closes `to`'s socket; `refuse` keeps a new one from opening until the next sweep.
    fn disconnect(&self, to: SocketAddr, refuse: bool) {
        let mut c = self.write_conns();
        if refuse && c.refused.len() < self.max_conns {
            c.refused.insert(to);
        }
        if let Some(conn) = c.by_addr.remove(&to) {
            c.by_token.remove(&conn.token);
            epoll_del(&self.epoll, conn.sock.sock.as_raw_fd());
        }
    }

    fn map(&self, to: SocketAddr) -> SocketAddr {
        match to {
            SocketAddr::V4(v4) if self.dual_stack => {
                SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0).into()
            }
            other => other,
        }
    }
}

/// A UDP socket for the listener: dual-stack IPv6 if the host has IPv6, else IPv4.
/// `shared` sets `SO_REUSEPORT` (so connected sockets can bind the same port).
fn new_listener_socket(shared: bool) -> anyhow::Result<(Socket, bool)> {
    let (sock, dual_stack) = match Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)) {
        Ok(s) => {
            s.set_only_v6(false).context("clearing IPV6_V6ONLY")?;
            (s, true)
        }
        Err(_) => (
            Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
                .context("creating UDP socket")?,
            false,
        ),
    };
    if shared {
        sock.set_reuse_port(true).context("setting SO_REUSEPORT")?;
    }
    Ok((sock, dual_stack))
}

fn wildcard(dual_stack: bool, port: u16) -> SocketAddr {
    if dual_stack {
        (std::net::Ipv6Addr::UNSPECIFIED, port).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, port).into()
    }
}

/// Claims `port` in this network namespace: an abstract unix socket named after it (abstract
/// names are per namespace and vanish with the process).
fn claim_port(port: u16) -> io::Result<UnixDatagram> {
    use std::os::linux::net::SocketAddrExt as _;
    let name = format!("meshd/udp/{port}");
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    UnixDatagram::bind_addr(&addr)
}

/// How many connected sockets the descriptor limit allows: raises the soft limit to the
/// hard one and keeps half for everything else.
fn descriptor_budget() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid resource and a live struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    usize::try_from(lim.rlim_cur / 2).unwrap_or(usize::MAX)
}

fn epoll_add(epoll: &OwnedFd, fd: libc::c_int, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: token,
    };
    // SAFETY: valid descriptors and a live event struct.
    let rc = unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn epoll_del(epoll: &OwnedFd, fd: libc::c_int) {
    // SAFETY: valid descriptors; a null event is allowed for EPOLL_CTL_DEL.
    unsafe {
        libc::epoll_ctl(
            epoll.as_raw_fd(),
            libc::EPOLL_CTL_DEL,
            fd,
            std::ptr::null_mut(),
        );
    }
}

fn force_buffer(sock: &Socket, force: libc::c_int, plain: libc::c_int) {
    let size = SOCKET_BUFFER as libc::c_int;
    // SAFETY: setsockopt with a valid fd, a pointer to a live c_int and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            force,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        // Without CAP_NET_ADMIN: take what rmem_max/wmem_max allow.
        // SAFETY: as above.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                plain,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// poll(2) on one descriptor. True if it became ready for `events`.
pub fn poll_one(fd: libc::c_int, events: libc::c_short, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd, count 1.
    let rc = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    rc > 0 && (p.revents & events) != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn local(u: &Udp) -> SocketAddr {
        (std::net::Ipv4Addr::LOCALHOST, u.local_port()).into()
    }

    /// The next datagram `u` receives on any of its sockets, within a second.
    fn recv_one(u: &Udp) -> Option<(Vec<u8>, SocketAddr)> {
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut ready = Ready::default();
        let mut buf = vec![0u8; 2048];
        let mut meta = [RecvMeta::default()];
        while Instant::now() < deadline {
            u.wait(&mut ready, 50);
            let mut iov = [io::IoSliceMut::new(&mut buf)];
            if let Ok(1) = u.recv(&mut ready, &mut iov, &mut meta) {
                return Some((buf[..meta[0].len].to_vec(), meta[0].addr));
            }
        }
        None
    }

    #[test]
    fn peers_get_a_connected_socket_on_the_listen_port() {
        let a = Udp::bind(0, None).unwrap();
        let b = Udp::bind(0, None).unwrap();
        a.send_to_peer(local(&b), b"one", None).unwrap();
        assert_eq!(recv_one(&b), Some((b"one".to_vec(), local(&a))));
        assert_eq!(
            a.connected(),
            1,
            "a peer's endpoint gets a connected socket"
        );
        b.send_to_peer(local(&a), b"two", None).unwrap();
        assert_eq!(recv_one(&a), Some((b"two".to_vec(), local(&b))));
        assert_eq!(b.connected(), 1);
        // Now both ends send on connected sockets: the source is still the listen port (peers
        // roam to whatever address our packets come from) and the answers arrive.
        for i in 0..3u8 {
            a.send_to_peer(local(&b), &[i], None).unwrap();
            assert_eq!(recv_one(&b), Some((vec![i], local(&a))));
            b.send(local(&a), &[i, i], None).unwrap();
            assert_eq!(recv_one(&a), Some((vec![i, i], local(&b))));
        }
        assert_eq!((a.connected(), b.connected()), (1, 1));
        // A GSO run goes through the listener and arrives as separate datagrams.
        a.send_to_peer(local(&b), b"abcdef", Some(3)).unwrap();
        let first = recv_one(&b).map(|(d, _)| d);
        assert!(
            first == Some(b"abc".to_vec()) || first == Some(b"abcdef".to_vec()),
            "{first:?}"
        );
    }

    #[test]
    fn ipv6_peers_get_connected_sockets_too() {
        if std::net::UdpSocket::bind("[::1]:0").is_err() {
            return; // no IPv6 loopback here
        }
        let a = Udp::bind(0, None).unwrap();
        let b = Udp::bind(0, None).unwrap();
        let v6 = |u: &Udp| SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, u.local_port()));
        for i in 0..3u8 {
            a.send_to_peer(v6(&b), &[i], None).unwrap();
            assert_eq!(recv_one(&b), Some((vec![i], v6(&a))));
            b.send_to_peer(v6(&a), &[i, i], None).unwrap();
            assert_eq!(recv_one(&a), Some((vec![i, i], v6(&b))));
        }
        assert_eq!((a.connected(), b.connected()), (1, 1));
    }

    #[test]
    fn strangers_get_no_socket_and_departed_peers_lose_theirs() {
        let a = Udp::bind(0, None).unwrap();
        let b = Udp::bind(0, None).unwrap();
        a.send(local(&b), b"cookie reply", None).unwrap();
        assert_eq!(recv_one(&b).map(|(d, _)| d), Some(b"cookie reply".to_vec()));
        assert_eq!(
            a.connected(),
            0,
            "plain sends (answers to anyone) open nothing"
        );
        a.send_to_peer(local(&b), b"x", None).unwrap();
        assert_eq!(a.connected(), 1);
        assert_eq!(a.retain_connected(|addr| *addr != local(&b)), 1);
        assert_eq!(a.connected(), 0);
        // Still reachable through the listener, and the next send reconnects.
        a.send_to_peer(local(&b), b"y", None).unwrap();
        assert!(recv_one(&b).is_some());
        assert_eq!(a.connected(), 1);
    }

    #[test]
    fn a_peer_restarting_on_its_port_is_reached_again() {
        let a = Udp::bind(0, None).unwrap();
        let b = Udp::bind(0, None).unwrap();
        let b_addr = local(&b);
        a.send_to_peer(b_addr, b"hello", None).unwrap();
        assert!(recv_one(&b).is_some());
        drop(b);
        // The port is closed: ICMP port unreachable comes back to the connected socket.
        for _ in 0..3 {
            let _ = a.send_to_peer(b_addr, b"anyone?", None);
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            recv_one(&a).is_none(),
            "the error is consumed, nothing is received"
        );
        let Ok(b) = Udp::bind(b_addr.port(), None) else {
            return; // someone else took the freed port meanwhile: nothing to check
        };
        let mut got = None;
        for _ in 0..5 {
            a.send_to_peer(b_addr, b"back", None).unwrap();
            got = recv_one(&b);
            if got.is_some() {
                break;
            }
        }
        assert_eq!(got, Some((b"back".to_vec(), local(&a))));
    }

    #[test]
    fn a_port_in_use_is_refused_even_by_another_meshd() {
        let a = Udp::bind(0, None).unwrap();
        let err = Udp::bind(a.local_port(), None).err().expect("second bind");
        assert!(err.to_string().contains("already in use"), "{err}");
        let plain = std::net::UdpSocket::bind("[::]:0").unwrap();
        let port = plain.local_addr().unwrap().port();
        let err = Udp::bind(port, None)
            .err()
            .expect("port held by a plain socket");
        assert!(err.to_string().contains("already in use"), "{err}");
    }

    #[test]
    fn without_a_budget_nothing_is_connected() {
        let a = Udp::bind_with(0, None, 0).unwrap();
        let b = Udp::bind(0, None).unwrap();
        a.send_to_peer(local(&b), b"z", None).unwrap();
        assert!(recv_one(&b).is_some());
        assert_eq!(a.connected(), 0);
    }
}
