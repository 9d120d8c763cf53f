//! The send batch: sealed datagrams laid end to end in one buffer and sent in GSO runs
//! (same endpoint, equal sizes, the last of a run may be shorter), one
//! [`Bind::send_to_peer`] per run.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use super::buffers::Chunk;
use super::edge::Bind;
use super::IoStats;

/// Room per sealed datagram: packet + WireGuard overhead (32), at least a handshake (148).
pub(super) fn sealed_room(len: usize) -> usize {
    (len + 32).max(148)
}

/// Largest GSO send the kernel takes.
const GSO_MAX_BYTES: usize = 65_000;

/// See the module documentation.
pub(super) struct SendBatch {
    buf: Chunk,
    pos: usize,
    run_start: usize,
    run_to: Option<SocketAddr>,
    run_seg: usize,
    run_count: usize,
    run_closed: bool,
    max_segments: usize,
}

impl SendBatch {
    pub(super) fn new(buf: Chunk, max_segments: usize) -> Self {
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
    #[inline]
    pub(super) fn reserve<B: Bind>(&mut self, room: usize, udp: &B, stats: &IoStats) -> &mut [u8] {
        if self.pos + room > self.buf.len() {
            self.flush(udp, stats);
        }
        let end = (self.pos + room).min(self.buf.len());
        &mut self.buf.as_mut()[self.pos..end]
    }

    /// Records that `len` bytes for `to` were written at the reserved position.
    #[inline]
    pub(super) fn commit<B: Bind>(&mut self, to: SocketAddr, len: usize, udp: &B, stats: &IoStats) {
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

    fn send_run<B: Bind>(&mut self, udp: &B, stats: &IoStats) {
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
                tracing::debug!(error = %e, endpoint = %to, "udp send failed");
            }
        }
        self.run_count = 0;
    }

    /// Sends everything and empties the buffer.
    pub(super) fn flush<B: Bind>(&mut self, udp: &B, stats: &IoStats) {
        self.send_run(udp, stats);
        self.pos = 0;
        self.run_start = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::buffers::Pages;
    use crate::dataplane::fake::FakeNet;

    /// Commits datagrams of the given (endpoint, length) and returns the sends the link saw
    /// as (to, total bytes, segment size).
    fn runs(items: &[(u8, usize)], max_segments: usize) -> Vec<(SocketAddr, usize, Option<usize>)> {
        let net = FakeNet::new();
        let me: SocketAddr = "198.18.0.1:1".parse().unwrap();
        let host = net.host(me, false);
        let mut pages = Pages::new(1 << 20).unwrap();
        let mut chunks = pages.carve([1 << 20]);
        let mut b = SendBatch::new(chunks.remove(0), max_segments);
        let stats = IoStats::default();
        for &(to, len) in items {
            let to: SocketAddr = format!("198.18.0.{to}:1").parse().unwrap();
            let room = b.reserve(len, &host.bind, &stats);
            room[..len].fill(0xab);
            b.commit(to, len, &host.bind, &stats);
        }
        b.flush(&host.bind, &stats);
        net.sends()
    }

    #[test]
    fn equal_sizes_to_one_endpoint_make_one_gso_send() {
        let r = runs(&[(2, 100), (2, 100), (2, 100), (2, 60)], 64);
        assert_eq!(r, vec![("198.18.0.2:1".parse().unwrap(), 360, Some(100))]);
    }

    #[test]
    fn runs_break_on_endpoint_size_growth_and_limits() {
        let two: SocketAddr = "198.18.0.2:1".parse().unwrap();
        let three: SocketAddr = "198.18.0.3:1".parse().unwrap();
        // Another endpoint, a larger datagram after a short one, the segment limit.
        let r = runs(
            &[
                (2, 100),
                (3, 100),
                (3, 50),
                (3, 50),
                (2, 100),
                (2, 100),
                (2, 100),
            ],
            2,
        );
        assert_eq!(
            r,
            vec![
                (two, 100, None),
                (three, 150, Some(100)),
                (three, 50, None),
                (two, 200, Some(100)),
                (two, 100, None),
            ]
        );
        // No more than GSO_MAX_BYTES per send.
        let r = runs(&[(2, 1500); 50], 64);
        assert!(r.iter().all(|&(_, n, _)| n <= GSO_MAX_BYTES), "{r:?}");
        assert_eq!(r.iter().map(|&(_, n, _)| n).sum::<usize>(), 50 * 1500);
        assert_eq!(sealed_room(10), 148);
        assert_eq!(sealed_room(1420), 1452);
    }
}
