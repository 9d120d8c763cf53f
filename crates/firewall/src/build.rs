//! Minimal packet builders for tests, benches and the lab harness. Headers only (plus
//! `payload` zero bytes), checksums left zero: the firewall never reads them.

use std::net::IpAddr;

use meshd_policy::ip_proto;

/// An IP header for `src → dst` carrying `proto` and `l4`; the family follows the addresses
/// (mixed families are a caller bug and produce IPv6 with v4-mapped addresses).
pub fn ip(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = 20 + l4.len();
            let mut p = Vec::with_capacity(total);
            p.extend_from_slice(&[0x45, 0, (total >> 8) as u8, total as u8]);
            p.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(l4);
            p
        }
        (s, d) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V4(a) => a.to_ipv6_mapped(),
                IpAddr::V6(a) => a,
            };
            let mut p = Vec::with_capacity(40 + l4.len());
            p.extend_from_slice(&[0x60, 0, 0, 0]);
            p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            p.extend_from_slice(&[proto, 64]);
            p.extend_from_slice(&v6(s).octets());
            p.extend_from_slice(&v6(d).octets());
            p.extend_from_slice(l4);
            p
        }
    }
}

/// A TCP segment with `flags` (see [`crate::tcp_flags`]).
pub fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8) -> Vec<u8> {
    let mut h = [0u8; 20];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = flags;
    ip(src, dst, ip_proto::TCP, &h)
}

/// A UDP datagram with `payload` zero bytes.
pub fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, payload: usize) -> Vec<u8> {
    let mut h = vec![0u8; 8 + payload];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..6].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
    ip(src, dst, ip_proto::UDP, &h)
}

/// An ICMP (IPv4) or ICMPv6 echo request (`reply == false`) or reply with identifier `id`.
pub fn echo(src: IpAddr, dst: IpAddr, id: u16, reply: bool) -> Vec<u8> {
    let v6 = src.is_ipv6() || dst.is_ipv6();
    let ty = match (v6, reply) {
        (false, false) => 8,
        (false, true) => 0,
        (true, false) => 128,
        (true, true) => 129,
    };
    let mut h = [0u8; 8];
    h[0] = ty;
    h[4..6].copy_from_slice(&id.to_be_bytes());
    h[6..8].copy_from_slice(&1u16.to_be_bytes());
    ip(
        src,
        dst,
        if v6 { ip_proto::ICMPV6 } else { ip_proto::ICMP },
        &h,
    )
}

/// An ICMP destination-unreachable (port unreachable) from `src` to `dst` quoting `quoted`.
pub fn unreachable(src: IpAddr, dst: IpAddr, quoted: &[u8]) -> Vec<u8> {
    let v6 = src.is_ipv6() || dst.is_ipv6();
    let mut h = vec![
        if v6 { 1 } else { 3 },
        if v6 { 4 } else { 3 },
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    h.extend_from_slice(&quoted[..quoted.len().min(if v6 { 1232 } else { 548 })]);
    ip(
        src,
        dst,
        if v6 { ip_proto::ICMPV6 } else { ip_proto::ICMP },
        &h,
    )
}

/// Splits an IPv4 packet into two fragments at transport offset `at` (a multiple of 8):
/// returns (first, later). Identification `id`.
pub fn fragment_v4(packet: &[u8], at: usize, id: u16) -> (Vec<u8>, Vec<u8>) {
    assert!(at % 8 == 0 && packet.len() > 20 + at, "bad fragment split");
    let mut first = packet[..20 + at].to_vec();
    let total = first.len() as u16;
    first[2..4].copy_from_slice(&total.to_be_bytes());
    first[4..6].copy_from_slice(&id.to_be_bytes());
    first[6..8].copy_from_slice(&0x2000u16.to_be_bytes());
    let mut later = packet[..20].to_vec();
    later.extend_from_slice(&packet[20 + at..]);
    let total = later.len() as u16;
    later[2..4].copy_from_slice(&total.to_be_bytes());
    later[4..6].copy_from_slice(&id.to_be_bytes());
    later[6..8].copy_from_slice(&((at / 8) as u16).to_be_bytes());
    (first, later)
}

/// Inserts IPv6 extension headers (`(next-header code, total length in bytes)`, each a
/// multiple of 8, e.g. `(0, 8)` hop-by-hop, `(60, 16)` destination options) after the fixed
/// header of an IPv6 packet.
pub fn with_ext_headers(packet: &[u8], exts: &[(u8, usize)]) -> Vec<u8> {
    assert!(packet.len() >= 40 && packet[0] >> 4 == 6, "not IPv6");
    let mut out = packet[..40].to_vec();
    let proto = packet[6];
    let mut codes: Vec<u8> = exts.iter().map(|e| e.0).collect();
    codes.push(proto);
    out[6] = codes[0];
    for (i, &(_, len)) in exts.iter().enumerate() {
        assert!(len >= 8 && len % 8 == 0, "extension length");
        let mut h = vec![0u8; len];
        h[0] = codes[i + 1];
        h[1] = (len / 8 - 1) as u8;
        out.extend_from_slice(&h);
    }
    out.extend_from_slice(&packet[40..]);
    let payload = (out.len() - 40) as u16;
    out[4..6].copy_from_slice(&payload.to_be_bytes());
    out
}
