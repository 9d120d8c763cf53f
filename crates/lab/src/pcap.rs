//! A small reader for classic libpcap files (what `tcpdump -w` writes) and a summary of each
//! packet's IP and transport headers. Pure code: no I/O.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

/// LINKTYPE_ETHERNET.
pub const LINKTYPE_ETHERNET: u32 = 1;
/// LINKTYPE_RAW: the packet starts with an IPv4 or IPv6 header.
pub const LINKTYPE_RAW: u32 = 101;
/// LINKTYPE_LINUX_SLL: Linux "cooked" capture (e.g. `tcpdump -i any`).
pub const LINKTYPE_LINUX_SLL: u32 = 113;
/// LINKTYPE_IPV4: raw IPv4.
pub const LINKTYPE_IPV4: u32 = 228;
/// LINKTYPE_IPV6: raw IPv6.
pub const LINKTYPE_IPV6: u32 = 229;
/// LINKTYPE_LINUX_SLL2: Linux "cooked" capture v2 (newer `tcpdump -i any`).
pub const LINKTYPE_LINUX_SLL2: u32 = 276;

/// IP protocol numbers used in [`PacketSummary::ip_proto`].
pub mod ip_proto {
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
}

/// Why a pcap file could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PcapError {
    /// Shorter than the 24-byte global header.
    #[error("pcap file too short for its header ({0} bytes)")]
    TooShort(usize),
    /// Not a classic pcap magic number (pcapng is not supported).
    #[error("not a classic pcap file (magic {0:#010x})")]
    BadMagic(u32),
}

/// A parsed pcap file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pcap {
    /// The link type of every packet (one of the `LINKTYPE_*` constants, usually ethernet).
    pub linktype: u32,
    /// The packets, in file order.
    pub packets: Vec<PcapPacket>,
}

/// One captured packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcapPacket {
    /// Capture time since the Unix epoch.
    pub ts: Duration,
    /// Length of the packet on the wire (may exceed `data.len()` when truncated by snaplen).
    pub orig_len: u32,
    /// The captured bytes, starting with the link-layer header.
    pub data: Vec<u8>,
    /// Link type of `data` (copied from the file header).
    pub linktype: u32,
}

/// The interesting fields of an IP packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacketSummary {
    /// IP protocol number of the transport header (see [`ip_proto`]).
    pub ip_proto: u8,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source port (TCP and UDP only).
    pub src_port: Option<u16>,
    /// Destination port (TCP and UDP only).
    pub dst_port: Option<u16>,
    /// Bytes after the TCP/UDP header, or after the IP header for other protocols.
    pub payload: Vec<u8>,
}

impl PacketSummary {
    /// True for UDP packets.
    pub fn is_udp(&self) -> bool {
        self.ip_proto == ip_proto::UDP
    }

    /// True for TCP packets.
    pub fn is_tcp(&self) -> bool {
        self.ip_proto == ip_proto::TCP
    }
}

impl Pcap {
    /// Summaries of the IP packets (non-IP frames such as ARP are skipped).
    pub fn summaries(&self) -> Vec<PacketSummary> {
        self.packets
            .iter()
            .filter_map(PcapPacket::summary)
            .collect()
    }

    /// True if any packet's captured bytes contain `needle` anywhere (headers included).
    pub fn any_contains(&self, needle: &[u8]) -> bool {
        self.packets.iter().any(|p| contains_bytes(&p.data, needle))
    }
}

impl PcapPacket {
    /// The IP summary, or `None` for non-IP or malformed frames.
    pub fn summary(&self) -> Option<PacketSummary> {
        summarize_frame(self.linktype, &self.data)
    }
}

/// Parses a classic pcap file (either byte order, micro- or nanosecond timestamps).
///
/// A truncated last record (a capture read while tcpdump is still writing) is ignored.
pub fn parse_pcap(bytes: &[u8]) -> Result<Pcap, PcapError> {
    if bytes.len() < 24 {
        return Err(PcapError::TooShort(bytes.len()));
    }
    let magic_le = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let (little, nanos) = match magic_le {
        0xa1b2_c3d4 => (true, false),
        0xa1b2_3c4d => (true, true),
        0xd4c3_b2a1 => (false, false),
        0x4d3c_b2a1 => (false, true),
        other => return Err(PcapError::BadMagic(other)),
    };
    let rd = |off: usize| -> u32 {
        let b = [bytes[off], bytes[off + 1], bytes[off + 2], bytes[off + 3]];
        if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    };
    // The low 28 bits hold the link type; the upper bits carry FCS information.
    let linktype = rd(20) & 0x0fff_ffff;
    let mut packets = Vec::new();
    let mut off = 24;
    while off + 16 <= bytes.len() {
        let secs = rd(off);
        let frac = rd(off + 4);
        let incl = rd(off + 8) as usize;
        let orig_len = rd(off + 12);
        let start = off + 16;
        let Some(end) = start.checked_add(incl).filter(|&e| e <= bytes.len()) else {
            break;
        };
        let sub = if nanos {
            Duration::from_nanos(u64::from(frac))
        } else {
            Duration::from_micros(u64::from(frac))
        };
        packets.push(PcapPacket {
            ts: Duration::from_secs(u64::from(secs)) + sub,
            orig_len,
            data: bytes[start..end].to_vec(),
            linktype,
        });
        off = end;
    }
    Ok(Pcap { linktype, packets })
}

/// Summarises one frame of the given link type; `None` for non-IP or malformed frames.
pub fn summarize_frame(linktype: u32, frame: &[u8]) -> Option<PacketSummary> {
    let (ethertype, l3) = match linktype {
        LINKTYPE_ETHERNET => {
            let mut et = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
            let mut off = 14;
            // Up to two VLAN tags (802.1Q / 802.1ad).
            for _ in 0..2 {
                if et == 0x8100 || et == 0x88a8 {
                    et = u16::from_be_bytes([*frame.get(off + 2)?, *frame.get(off + 3)?]);
                    off += 4;
                }
            }
            (Some(et), frame.get(off..)?)
        }
        LINKTYPE_LINUX_SLL => (
            Some(u16::from_be_bytes([*frame.get(14)?, *frame.get(15)?])),
            frame.get(16..)?,
        ),
        LINKTYPE_LINUX_SLL2 => (
            Some(u16::from_be_bytes([*frame.first()?, *frame.get(1)?])),
            frame.get(20..)?,
        ),
        LINKTYPE_RAW | LINKTYPE_IPV4 | LINKTYPE_IPV6 => (None, frame),
        _ => return None,
    };
    let version = l3.first()? >> 4;
    match (ethertype, version) {
        (Some(0x0800) | None, 4) => summarize_ipv4(l3),
        (Some(0x86dd) | None, 6) => summarize_ipv6(l3),
        _ => None,
    }
}

/// Summarises an IPv4 packet.
fn summarize_ipv4(p: &[u8]) -> Option<PacketSummary> {
    let ihl = usize::from(p.first()? & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*p.get(2)?, *p.get(3)?]));
    if ihl < 20 || total < ihl {
        return None;
    }
    // Ethernet pads short frames; trust the IP length, but tolerate snaplen truncation.
    let p = &p[..total.min(p.len())];
    let frag = u16::from_be_bytes([*p.get(6)?, *p.get(7)?]);
    let first_fragment = frag & 0x1fff == 0;
    let proto = *p.get(9)?;
    let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
    let dst = Ipv4Addr::new(*p.get(16)?, p[17], p[18], *p.get(19)?);
    let body = p.get(ihl..)?;
    Some(transport(
        proto,
        src.into(),
        dst.into(),
        body,
        first_fragment,
    ))
}

/// Summarises an IPv6 packet, skipping hop-by-hop, routing, fragment and destination options.
fn summarize_ipv6(p: &[u8]) -> Option<PacketSummary> {
    let plen = usize::from(u16::from_be_bytes([*p.get(4)?, *p.get(5)?]));
    let mut next = *p.get(6)?;
    let src: [u8; 16] = p.get(8..24)?.try_into().ok()?;
    let dst: [u8; 16] = p.get(24..40)?.try_into().ok()?;
    let end = (40 + plen).min(p.len());
    let mut body = p.get(40..end)?;
    let mut first_fragment = true;
    for _ in 0..8 {
        match next {
            0 | 43 | 60 => {
                let len = (usize::from(*body.get(1)?) + 1) * 8;
                next = *body.first()?;
                body = body.get(len..)?;
            }
            44 => {
                let off = u16::from_be_bytes([*body.get(2)?, *body.get(3)?]) >> 3;
                first_fragment = off == 0;
                next = *body.first()?;
                body = body.get(8..)?;
            }
            _ => break,
        }
    }
    Some(transport(
        next,
        Ipv6Addr::from(src).into(),
        Ipv6Addr::from(dst).into(),
        body,
        first_fragment,
    ))
}

/// Splits ports and payload off a transport header.
fn transport(proto: u8, src: IpAddr, dst: IpAddr, body: &[u8], first: bool) -> PacketSummary {
    let ports = |b: &[u8]| -> Option<(u16, u16)> {
        Some((
            u16::from_be_bytes([*b.first()?, *b.get(1)?]),
            u16::from_be_bytes([*b.get(2)?, *b.get(3)?]),
        ))
    };
    let (src_port, dst_port, payload) = match proto {
        ip_proto::UDP if first && body.len() >= 8 => {
            let (s, d) = ports(body).unwrap_or_default();
            (Some(s), Some(d), &body[8..])
        }
        ip_proto::TCP if first && body.len() >= 20 => {
            let (s, d) = ports(body).unwrap_or_default();
            let doff = usize::from(body[12] >> 4) * 4;
            (Some(s), Some(d), body.get(doff.max(20)..).unwrap_or(&[]))
        }
        _ => (None, None, body),
    };
    PacketSummary {
        ip_proto: proto,
        src,
        dst,
        src_port,
        dst_port,
        payload: payload.to_vec(),
    }
}

/// True if `needle` occurs in `haystack` (an empty needle always does).
pub fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pcap_file(linktype: u32, frames: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        v.extend_from_slice(&2u16.to_le_bytes());
        v.extend_from_slice(&4u16.to_le_bytes());
        v.extend_from_slice(&[0; 8]);
        v.extend_from_slice(&65535u32.to_le_bytes());
        v.extend_from_slice(&linktype.to_le_bytes());
        for (i, f) in frames.iter().enumerate() {
            v.extend_from_slice(&(100 + i as u32).to_le_bytes());
            v.extend_from_slice(&7u32.to_le_bytes());
            v.extend_from_slice(&(f.len() as u32).to_le_bytes());
            v.extend_from_slice(&(f.len() as u32).to_le_bytes());
            v.extend_from_slice(f);
        }
        v
    }

    fn udp4_eth(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00]);
        let total = (20 + 8 + payload.len()) as u16;
        f.extend_from_slice(&[
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0x40,
            0,
            64,
            17,
        ]);
        f.extend_from_slice(&[0, 0, 198, 18, 0, 1, 198, 18, 0, 2]);
        let ulen = (8 + payload.len()) as u16;
        f.extend_from_slice(&[0x30, 0x39, 0xca, 0x6c, (ulen >> 8) as u8, ulen as u8, 0, 0]);
        f.extend_from_slice(payload);
        // Ethernet padding, which must not leak into the payload.
        f.resize(f.len().max(60), 0xee);
        f
    }

    #[test]
    fn parses_udp_over_ethernet_and_ignores_padding() {
        let frame = udp4_eth(b"hi");
        let mut arp = vec![0u8; 12];
        arp.extend_from_slice(&[0x08, 0x06]);
        arp.resize(42, 0);
        let file = pcap_file(LINKTYPE_ETHERNET, &[&frame, &arp]);
        let pcap = parse_pcap(&file).unwrap();
        assert_eq!(pcap.packets.len(), 2);
        assert_eq!(pcap.packets[0].ts, Duration::new(100, 7_000));
        let sums = pcap.summaries();
        assert_eq!(sums.len(), 1, "ARP is not summarised");
        let s = &sums[0];
        assert!(s.is_udp());
        assert_eq!(s.src, IpAddr::from([198, 18, 0, 1]));
        assert_eq!(s.dst, IpAddr::from([198, 18, 0, 2]));
        assert_eq!(s.src_port, Some(12345));
        assert_eq!(s.dst_port, Some(51820));
        assert_eq!(s.payload, b"hi");
        assert!(pcap.any_contains(b"hi"));
        assert!(!pcap.any_contains(b"nope"));
    }

    #[test]
    fn truncated_tail_is_ignored_and_bad_magic_rejected() {
        let frame = udp4_eth(b"x");
        let mut file = pcap_file(LINKTYPE_ETHERNET, &[&frame, &frame]);
        file.truncate(file.len() - 5);
        assert_eq!(parse_pcap(&file).unwrap().packets.len(), 1);
        assert_eq!(parse_pcap(&file[..10]), Err(PcapError::TooShort(10)));
        let mut bad = file.clone();
        bad[0] = 0;
        assert!(matches!(parse_pcap(&bad), Err(PcapError::BadMagic(_))));
    }

    #[test]
    fn raw_ipv6_udp() {
        let mut p = vec![0x60, 0, 0, 0, 0, 11, 17, 64];
        p.extend_from_slice(&Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1).octets());
        p.extend_from_slice(&Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 2).octets());
        p.extend_from_slice(&[0, 1, 0, 2, 0, 11, 0, 0, b'a', b'b', b'c']);
        let s = summarize_frame(LINKTYPE_RAW, &p).unwrap();
        assert_eq!(s.ip_proto, ip_proto::UDP);
        assert_eq!(s.dst_port, Some(2));
        assert_eq!(s.payload, b"abc");
        assert_eq!(s.dst, "fd00:1::2".parse::<IpAddr>().unwrap());
    }
}
