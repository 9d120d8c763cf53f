//! Just enough IP header parsing for routing decisions. Never panics on short or odd input.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The source address of an IPv4 or IPv6 packet, if the header is complete.
pub fn src_addr(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => Some(IpAddr::V4(v4_at(packet, 12)?)),
        6 if packet.len() >= 40 => Some(IpAddr::V6(v6_at(packet, 8)?)),
        _ => None,
    }
}

/// The destination address of an IPv4 or IPv6 packet, if the header is complete.
pub fn dst_addr(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => Some(IpAddr::V4(v4_at(packet, 16)?)),
        6 if packet.len() >= 40 => Some(IpAddr::V6(v6_at(packet, 24)?)),
        _ => None,
    }
}

fn v4_at(p: &[u8], off: usize) -> Option<Ipv4Addr> {
    let b: [u8; 4] = p.get(off..off + 4)?.try_into().ok()?;
    Some(Ipv4Addr::from(b))
}

fn v6_at(p: &[u8], off: usize) -> Option<Ipv6Addr> {
    let b: [u8; 16] = p.get(off..off + 16)?.try_into().ok()?;
    Some(Ipv6Addr::from(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_header() {
        let mut p = [0u8; 20];
        p[0] = 0x45;
        p[12..16].copy_from_slice(&[100, 64, 0, 1]);
        p[16..20].copy_from_slice(&[100, 64, 0, 2]);
        assert_eq!(src_addr(&p), Some("100.64.0.1".parse().unwrap()));
        assert_eq!(dst_addr(&p), Some("100.64.0.2".parse().unwrap()));
        assert_eq!(dst_addr(&p[..19]), None);
    }

    #[test]
    fn v6_header() {
        let mut p = [0u8; 40];
        p[0] = 0x60;
        p[23] = 1;
        p[39] = 2;
        assert_eq!(src_addr(&p), Some("::1".parse().unwrap()));
        assert_eq!(dst_addr(&p), Some("::2".parse().unwrap()));
        assert_eq!(src_addr(&p[..39]), None);
    }

    #[test]
    fn garbage() {
        assert_eq!(src_addr(&[]), None);
        assert_eq!(dst_addr(&[0x55; 64]), None);
    }
}
