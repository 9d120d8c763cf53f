//! Reading what the firewall needs from an IPv4 or IPv6 packet: addresses, protocol, ports (or
//! the ICMP echo id), TCP flags, fragment position and, for ICMP errors, the quoted packet.
//! Never panics: every index is bounds-checked and anything inconsistent is [`Malformed`].

use meshd_policy::ip_proto;

/// Why a packet could not be read. Counted per variant in [`crate::Stats::malformed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Malformed {
    /// Empty, or the version nibble is neither 4 nor 6.
    BadVersion,
    /// Shorter than its fixed IP header.
    TruncatedIpHeader,
    /// IPv4 header length below 20 bytes or past the end of the packet.
    BadHeaderLength,
    /// The IP total/payload length is larger than the buffer or smaller than the header.
    BadTotalLength,
    /// An IPv6 extension header runs past the end, or the chain is longer than we follow.
    BadExtensionHeaders,
    /// The TCP, UDP or ICMP header is cut short (or TCP's data offset is invalid).
    TruncatedTransport,
}

impl Malformed {
    /// All variants, in counter order.
    pub const ALL: [Malformed; 6] = [
        Malformed::BadVersion,
        Malformed::TruncatedIpHeader,
        Malformed::BadHeaderLength,
        Malformed::BadTotalLength,
        Malformed::BadExtensionHeaders,
        Malformed::TruncatedTransport,
    ];

    /// Stable snake_case name (for metrics and logs).
    pub fn as_str(self) -> &'static str {
        match self {
            Malformed::BadVersion => "bad_version",
            Malformed::TruncatedIpHeader => "truncated_ip_header",
            Malformed::BadHeaderLength => "bad_header_length",
            Malformed::BadTotalLength => "bad_total_length",
            Malformed::BadExtensionHeaders => "bad_extension_headers",
            Malformed::TruncatedTransport => "truncated_transport",
        }
    }
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// TCP flag bits (byte 13 of the TCP header).
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// PSH.
    pub const PSH: u8 = 0x08;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// Addresses and ports of one packet. Addresses are IPv6-sized; IPv4 is stored v4-mapped and
/// `v6` tells the families apart. For ICMP echo both ports carry the echo identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tuple {
    pub v6: bool,
    pub proto: u8,
    pub src: u128,
    pub dst: u128,
    pub sport: u16,
    pub dport: u16,
}

/// What kind of transport payload follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// TCP with its flag byte.
    Tcp(u8),
    /// UDP.
    Udp,
    /// ICMP/ICMPv6 echo request (ports = identifier).
    EchoRequest,
    /// ICMP/ICMPv6 echo reply (ports = identifier).
    EchoReply,
    /// ICMP error quoting a packet that starts at this offset in the buffer
    /// (read with [`parse_quoted`] only on this rare path, to keep [`Parsed`] small).
    IcmpError { at: u32, end: u32 },
    /// Any other ICMP message (ports 0).
    IcmpOther,
    /// Another IP protocol (ports 0).
    Other,
    /// A non-first fragment: no transport header (ports 0).
    LaterFragment,
}

/// Fragment position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Frag {
    /// Not fragmented (or an IPv6 atomic fragment).
    Whole,
    /// Offset 0 with more fragments to come; carries the IP identification.
    First(u32),
    /// Offset > 0; carries the IP identification.
    Later(u32),
}

/// A parsed packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Parsed {
    pub t: Tuple,
    pub kind: Kind,
    pub frag: Frag,
}

const MAX_EXT_HEADERS: usize = 8;

#[inline]
fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

#[inline]
fn v4_mapped(b: &[u8]) -> u128 {
    // Caller guarantees 4 bytes.
    let mut a = [0u8; 16];
    a[10] = 0xff;
    a[11] = 0xff;
    a[12..16].copy_from_slice(&b[..4]);
    u128::from_be_bytes(a)
}

#[inline]
fn v6_addr(b: &[u8]) -> u128 {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    u128::from_be_bytes(a)
}

/// The network layer: tuple without ports, fragment position, and the transport bytes.
struct Net<'a> {
    v6: bool,
    proto: u8,
    src: u128,
    dst: u128,
    frag: Frag,
    l4: &'a [u8],
    /// Offset of `l4` in the packet.
    l4_at: usize,
}

/// Parses the IP header. `quoted`: the packet is quoted inside an ICMP error and may be cut
/// short, so the length fields are not held against the buffer.
#[inline]
fn parse_net(b: &[u8], quoted: bool) -> Result<Net<'_>, Malformed> {
    match b.first().map(|v| v >> 4) {
        Some(4) => parse_v4(b, quoted),
        Some(6) => parse_v6(b, quoted),
        _ => Err(Malformed::BadVersion),
    }
}

#[inline]
fn parse_v4(b: &[u8], quoted: bool) -> Result<Net<'_>, Malformed> {
    if b.len() < 20 {
        return Err(Malformed::TruncatedIpHeader);
    }
    let ihl = usize::from(b[0] & 0x0f) * 4;
    if ihl < 20 || ihl > b.len() {
        return Err(Malformed::BadHeaderLength);
    }
    let total = usize::from(u16::from_be_bytes([b[2], b[3]]));
    let end = if quoted {
        total.clamp(ihl, b.len())
    } else {
        if total < ihl || total > b.len() {
            return Err(Malformed::BadTotalLength);
        }
        total
    };
    let id = u32::from(u16::from_be_bytes([b[4], b[5]]));
    let ff = u16::from_be_bytes([b[6], b[7]]);
    let more = ff & 0x2000 != 0;
    let offset = ff & 0x1fff;
    let frag = match (offset, more) {
        (0, false) => Frag::Whole,
        (0, true) => Frag::First(id),
        _ => Frag::Later(id),
    };
    Ok(Net {
        v6: false,
        proto: b[9],
        src: v4_mapped(&b[12..16]),
        dst: v4_mapped(&b[16..20]),
        frag,
        l4: &b[ihl..end],
        l4_at: ihl,
    })
}

fn parse_v6(b: &[u8], quoted: bool) -> Result<Net<'_>, Malformed> {
    if b.len() < 40 {
        return Err(Malformed::TruncatedIpHeader);
    }
    let payload = usize::from(u16::from_be_bytes([b[4], b[5]]));
    let end = if quoted {
        (40 + payload).min(b.len())
    } else {
        // Payload length 0 means a jumbogram (never inside a tunnel): reject with the rest.
        if payload == 0 && b.len() > 40 || 40 + payload > b.len() {
            return Err(Malformed::BadTotalLength);
        }
        40 + payload
    };
    let mut next = b[6];
    let mut at = 40;
    let mut frag = Frag::Whole;
    for _ in 0..=MAX_EXT_HEADERS {
        let hdr_len = match next {
            // Hop-by-hop, routing, destination options, mobility, HIP, shim6: (len + 1) * 8.
            0 | 43 | 60 | 135 | 139 | 140 => {
                let l = *b[..end].get(at + 1).ok_or(Malformed::BadExtensionHeaders)?;
                (usize::from(l) + 1) * 8
            }
            // Fragment header: fixed 8 bytes.
            44 => {
                let h = b[..end]
                    .get(at..at + 8)
                    .ok_or(Malformed::BadExtensionHeaders)?;
                let off_m = u16::from_be_bytes([h[2], h[3]]);
                let id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                let offset = off_m >> 3;
                let more = off_m & 1 != 0;
                frag = match (offset, more) {
                    (0, false) => Frag::Whole,
                    (0, true) => Frag::First(id),
                    _ => Frag::Later(id),
                };
                8
            }
            // Authentication header: (len + 2) * 4.
            51 => {
                let l = *b[..end].get(at + 1).ok_or(Malformed::BadExtensionHeaders)?;
                (usize::from(l) + 2) * 4
            }
            _ => {
                return Ok(Net {
                    v6: true,
                    proto: next,
                    src: v6_addr(&b[8..24]),
                    dst: v6_addr(&b[24..40]),
                    frag,
                    l4: &b[at..end],
                    l4_at: at,
                })
            }
        };
        if at + hdr_len > end {
            return Err(Malformed::BadExtensionHeaders);
        }
        next = b[at];
        at += hdr_len;
        if matches!(frag, Frag::Later(_)) {
            // Past a non-first fragment header the rest is opaque payload.
            return Ok(Net {
                v6: true,
                proto: next,
                src: v6_addr(&b[8..24]),
                dst: v6_addr(&b[24..40]),
                frag,
                l4: &b[at..end],
                l4_at: at,
            });
        }
    }
    Err(Malformed::BadExtensionHeaders)
}

fn is_icmp_error(v6: bool, ty: u8) -> bool {
    if v6 {
        matches!(ty, 1..=4)
    } else {
        matches!(ty, 3 | 4 | 11 | 12)
    }
}

/// Echo request/reply type numbers for the family.
fn echo_types(v6: bool) -> (u8, u8) {
    if v6 {
        (128, 129)
    } else {
        (8, 0)
    }
}

fn icmp_proto(v6: bool) -> u8 {
    if v6 {
        ip_proto::ICMPV6
    } else {
        ip_proto::ICMP
    }
}

/// Parses a whole packet as seen on the tunnel.
#[inline]
pub(crate) fn parse(b: &[u8]) -> Result<Parsed, Malformed> {
    let n = parse_net(b, false)?;
    let mut t = Tuple {
        v6: n.v6,
        proto: n.proto,
        src: n.src,
        dst: n.dst,
        sport: 0,
        dport: 0,
    };
    if matches!(n.frag, Frag::Later(_)) {
        return Ok(Parsed {
            t,
            kind: Kind::LaterFragment,
            frag: n.frag,
        });
    }
    let l4 = n.l4;
    let kind = match n.proto {
        ip_proto::TCP => {
            if l4.len() < 20 {
                return Err(Malformed::TruncatedTransport);
            }
            let off = usize::from(l4[12] >> 4) * 4;
            if off < 20 || off > l4.len() {
                return Err(Malformed::TruncatedTransport);
            }
            t.sport = u16::from_be_bytes([l4[0], l4[1]]);
            t.dport = u16::from_be_bytes([l4[2], l4[3]]);
            Kind::Tcp(l4[13])
        }
        ip_proto::UDP => {
            if l4.len() < 8 {
                return Err(Malformed::TruncatedTransport);
            }
            t.sport = u16::from_be_bytes([l4[0], l4[1]]);
            t.dport = u16::from_be_bytes([l4[2], l4[3]]);
            Kind::Udp
        }
        p if p == icmp_proto(n.v6) => {
            if l4.len() < 8 {
                return Err(Malformed::TruncatedTransport);
            }
            let ty = l4[0];
            let (req, rep) = echo_types(n.v6);
            if ty == req || ty == rep {
                let id = u16::from_be_bytes([l4[4], l4[5]]);
                t.sport = id;
                t.dport = id;
                if ty == req {
                    Kind::EchoRequest
                } else {
                    Kind::EchoReply
                }
            } else if is_icmp_error(n.v6, ty) {
                // The quoted packet ends where the error does (`end`), not at trailing padding.
                Kind::IcmpError {
                    at: (n.l4_at + 8) as u32,
                    end: (n.l4_at + l4.len()) as u32,
                }
            } else {
                Kind::IcmpOther
            }
        }
        _ => Kind::Other,
    };
    Ok(Parsed {
        t,
        kind,
        frag: n.frag,
    })
}

/// The tuple of the packet quoted in an ICMP error (at least 8 transport bytes are quoted);
/// `None` if it is unreadable (such an error relates to no flow).
pub(crate) fn parse_quoted(b: &[u8], v6: bool) -> Option<Tuple> {
    let n = parse_net(b, true).ok()?;
    if n.v6 != v6 || matches!(n.frag, Frag::Later(_)) {
        return None;
    }
    let l4 = n.l4;
    let (sport, dport) = match n.proto {
        ip_proto::TCP | ip_proto::UDP => (be16(l4, 0)?, be16(l4, 2)?),
        p if p == icmp_proto(v6) => {
            let (req, rep) = echo_types(v6);
            let ty = *l4.first()?;
            if ty != req && ty != rep {
                return None;
            }
            let id = be16(l4, 4)?;
            (id, id)
        }
        _ => (0, 0),
    };
    Some(Tuple {
        v6,
        proto: n.proto,
        src: n.src,
        dst: n.dst,
        sport,
        dport,
    })
}

impl Tuple {
    /// The address as a std type.
    pub fn ip(&self, a: u128) -> std::net::IpAddr {
        let v6 = std::net::Ipv6Addr::from(a);
        match (self.v6, v6.to_ipv4_mapped()) {
            (false, Some(v4)) => v4.into(),
            _ => v6.into(),
        }
    }
}
