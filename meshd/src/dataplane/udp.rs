//! The tunnel's UDP socket: dual-stack, big buffers, GRO on receive and GSO on send
//! (through quinn-udp, which does the cmsg work and degrades where the kernel cannot).

use std::io;
use std::net::{SocketAddr, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd};

use anyhow::Context as _;
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use socket2::{Domain, Protocol, Socket, Type};

/// Socket buffer size; forced past rmem_max when we are root.
const SOCKET_BUFFER: usize = 8 << 20;

/// A UDP socket shared by the workers (sending takes `&self`).
pub struct Udp {
    sock: std::net::UdpSocket,
    state: UdpSocketState,
    dual_stack: bool,
}

impl Udp {
    /// Binds `[::]:port` (dual-stack), falling back to `0.0.0.0:port` without IPv6.
    pub fn bind(port: u16, fwmark: Option<u32>) -> anyhow::Result<Udp> {
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
        if let Some(mark) = fwmark {
            sock.set_mark(mark)
                .context("setting SO_MARK on the tunnel socket")?;
        }
        let addr: SocketAddr = if dual_stack {
            (std::net::Ipv6Addr::UNSPECIFIED, port).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, port).into()
        };
        if let Err(e) = sock.bind(&addr.into()) {
            if e.kind() == io::ErrorKind::AddrInUse {
                anyhow::bail!(
                    "UDP port {port} is already in use (another meshd or WireGuard on this host?); \
                     choose another listen_port"
                );
            }
            return Err(e).with_context(|| format!("binding UDP port {port}"));
        }
        force_buffer(&sock, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF);
        force_buffer(&sock, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF);
        sock.set_nonblocking(true)?;
        let sock: std::net::UdpSocket = sock.into();
        let state = UdpSocketState::new(UdpSockRef::from(&sock)).context("UDP socket options")?;
        Ok(Udp {
            sock,
            state,
            dual_stack,
        })
    }

    /// The bound port (useful with `listen_port = 0`).
    pub fn local_port(&self) -> u16 {
        self.sock.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// How many equal-sized datagrams one GSO send may carry (1 without GSO).
    pub fn max_segments(&self) -> usize {
        self.state.max_gso_segments().clamp(1, 64)
    }

    /// Sends one datagram, or several of `segment` bytes each (the last may be shorter).
    pub fn send(&self, to: SocketAddr, contents: &[u8], segment: Option<usize>) -> io::Result<()> {
        let destination = self.map(to);
        let t = Transmit {
            destination,
            ecn: None,
            contents,
            segment_size: segment.filter(|&s| s < contents.len()),
            src_ip: None,
        };
        // A full socket buffer: wait briefly for room rather than drop a whole GSO batch.
        for _ in 0..50 {
            match self.state.try_send(UdpSockRef::from(&self.sock), &t) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    poll_one(self.sock.as_fd().as_raw_fd(), libc::POLLOUT, 10);
                }
                other => return other,
            }
        }
        Err(io::ErrorKind::WouldBlock.into())
    }

    /// Receives a batch; addresses are normalised (no v4-mapped v6).
    pub fn recv(
        &self,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        let n = self.state.recv(UdpSockRef::from(&self.sock), bufs, meta)?;
        for m in &mut meta[..n] {
            m.addr = SocketAddr::new(m.addr.ip().to_canonical(), m.addr.port());
        }
        Ok(n)
    }

    /// The socket's descriptor (for polling).
    pub fn as_raw_fd(&self) -> libc::c_int {
        self.sock.as_raw_fd()
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

/// poll(2) on several descriptors (negative ones are skipped). Returns how many are ready
/// (0 on timeout or error).
pub fn poll_fds(fds: &mut [libc::pollfd], timeout_ms: i32) -> usize {
    // SAFETY: a valid, exclusively borrowed slice of pollfd and its length.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    usize::try_from(rc).unwrap_or(0)
}
