//! Fixtures that several crates' tests share: keys, labels and hosts, policy files, block
//! events, endpoint reports and hand-built IP packets.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use meshd_control::proto::EndpointReport;
use meshd_control::Labels;
use meshd_policy::{BlockEvent, DenyReason, Direction, Grant, HostRef, Proto};
use meshd_tunnel::{PeerSpec, PrivateKey, PublicKey};

use crate::rng::SimRng;

/// Policy files.
pub mod policy {
    /// No rules: default deny, every map empty.
    pub const DENY_ALL: &str = "";

    /// Every host may reach every other on every port.
    pub const ALLOW_ALL: &str = "rules:\n  - {name: all, from: {}, to: {}, ports: [any]}\n";

    /// `app=app` hosts reach `app=db` hosts on tcp/5432, with tests that pass for it.
    pub const APP_TO_DB: &str = "\
rules:
  - name: app-to-db
    from: { app: app }
    to:   { app: db }
    ports: [tcp/5432]
tests:
  - { from: { app: app }, to: { app: db }, port: tcp/5432, expect: allow }
  - { from: { app: db }, to: { app: app }, port: tcp/5432, expect: deny }
";

    /// `app=app` hosts reach `app=db` hosts on udp/5000 and icmp; `role=ops` reaches every host
    /// on udp/22 (the harness's traffic is UDP).
    pub const APP_DB_UDP: &str = "\
rules:
  - name: app-to-db
    from: { app: app }
    to:   { app: db }
    ports: [udp/5000, icmp]
  - name: ops
    from: { role: ops }
    to: {}
    ports: [udp/22]
";

    /// Every host reaches every other on udp/5000 until `expires` (RFC 3339, UTC).
    pub fn allow_udp_until(expires: &str) -> String {
        format!(
            "rules:\n  - name: temporary\n    from: {{}}\n    to: {{}}\n    ports: [udp/5000]\n    expires: {expires}\n"
        )
    }
}

/// A deterministic private key: the same `n` gives the same key in every run.
pub fn private_key(n: u64) -> PrivateKey {
    let mut r = SimRng::new(n ^ 0x6d65_7368_642d_6b65);
    let mut b = [0u8; 32];
    for chunk in b.chunks_mut(8) {
        chunk.copy_from_slice(&r.next_u64().to_le_bytes());
    }
    PrivateKey::from_bytes(b)
}

/// A public key that is just `k` repeated (not a real curve point's owner: for tables and
/// maps that never run a handshake).
pub fn fake_public_key(k: u8) -> PublicKey {
    PublicKey([k; 32])
}

/// A label set from pairs.
pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A host as the policy compiler sees it.
pub fn host_ref(id: u64, name: &str, pairs: &[(&str, &str)]) -> HostRef {
    HostRef {
        id,
        name: name.into(),
        labels: labels(pairs),
    }
}

/// A grant of `proto` ports `lo..=hi` from rule `rule`, expiring at `expires_at`.
pub fn grant(proto: Proto, lo: u16, hi: u16, expires_at: Option<u64>, rule: &str) -> Grant {
    Grant {
        proto,
        ports: (lo, hi),
        expires_at,
        rule: rule.into(),
    }
}

/// A block event: `peer` tried to open tcp/22 on `host` (inbound, default deny), 3 packets
/// folded.
pub fn block_event(at: u64, host: &str, peer: &str) -> BlockEvent {
    BlockEvent {
        at,
        host: host.into(),
        host_labels: Default::default(),
        peer: peer.into(),
        peer_labels: Default::default(),
        direction: Direction::Inbound,
        proto: 6,
        src: "100.64.0.2:40000"
            .parse()
            .unwrap_or(SocketAddr::from(([0; 4], 0))),
        dst: "100.64.0.1:22"
            .parse()
            .unwrap_or(SocketAddr::from(([0; 4], 0))),
        reason: DenyReason::DefaultDeny,
        count: 3,
    }
}

/// An endpoint report of one underlay address (its port is the listen port).
pub fn endpoint_report(addr: SocketAddr) -> EndpointReport {
    EndpointReport {
        addrs: vec![addr],
        listen_port: Some(addr.port()),
        transparent: false,
    }
}

/// A peer spec with one allowed prefix, no keepalive and no grants.
pub fn peer_spec(
    name: &str,
    key: &PublicKey,
    endpoint: Option<SocketAddr>,
    allowed: &str,
) -> PeerSpec {
    PeerSpec {
        next_key: None,
        name: name.into(),
        public_key: *key,
        endpoint,
        allowed_ips: allowed.parse().into_iter().collect(),
        persistent_keepalive: None,
        preshared_key: None,
        grants: Default::default(),
    }
}

/// The bytes every harness test payload starts with: no datagram on a fake link may contain
/// them (inner packets travel only encrypted).
pub const MARKER: &[u8; 16] = b"MESHD-PLAINTEXT!";

/// A payload of `MARKER` followed by `tag`.
pub fn marked(tag: &[u8]) -> Vec<u8> {
    let mut v = MARKER.to_vec();
    v.extend_from_slice(tag);
    v
}

/// Whether `bytes` contain [`MARKER`].
pub fn contains_marker(bytes: &[u8]) -> bool {
    bytes.windows(MARKER.len()).any(|w| w == MARKER)
}

/// A minimal IPv4 packet from `src` to `dst`, protocol UDP, carrying `payload` right after the
/// IP header (no UDP header: for paths that read only the IP header).
pub fn ip4(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    let len = (20 + payload.len()) as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p.extend_from_slice(payload);
    p
}

/// A minimal IPv6 packet, next header UDP, carrying `payload` right after the IPv6 header.
pub fn ip6(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    p[6] = 17;
    p[7] = 64;
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// A UDP datagram (IPv4 or IPv6 by the addresses) with a real UDP header and `payload`
/// (checksums zero: nothing on the harness's path reads them).
pub fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut l4 = Vec::with_capacity(8 + payload.len());
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    l4.extend_from_slice(&[0, 0]);
    l4.extend_from_slice(payload);
    meshd_firewall::build::ip(src, dst, meshd_policy::ip_proto::UDP, &l4)
}

/// The UDP payload of an IP packet built by [`udp`] (`None` if it is not UDP or too short).
pub fn udp_payload(packet: &[u8]) -> Option<&[u8]> {
    let (proto, l4) = match packet.first()? >> 4 {
        4 => {
            let ihl = usize::from(packet.first()? & 0x0f) * 4;
            (*packet.get(9)?, packet.get(ihl..)?)
        }
        6 => (*packet.get(6)?, packet.get(40..)?),
        _ => return None,
    };
    (proto == meshd_policy::ip_proto::UDP).then(|| l4.get(8..))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_deterministic_and_distinct() {
        assert_eq!(private_key(1).public_key(), private_key(1).public_key());
        assert_ne!(private_key(1).public_key(), private_key(2).public_key());
    }

    #[test]
    fn udp_round_trips_and_marker_is_found() {
        let p = udp(
            "100.64.0.1".parse().unwrap(),
            1,
            "100.64.0.2".parse().unwrap(),
            5000,
            &marked(b"x"),
        );
        assert_eq!(udp_payload(&p), Some(&marked(b"x")[..]));
        assert!(contains_marker(&p));
        assert!(!contains_marker(&p[..30]));
        let p6 = udp(
            "fd00::1".parse().unwrap(),
            1,
            "fd00::2".parse().unwrap(),
            2,
            b"y",
        );
        assert_eq!(udp_payload(&p6), Some(&b"y"[..]));
        assert_eq!(udp_payload(&ip4([1; 4], [2; 4], b"")), None);
    }

    #[test]
    fn policies_parse() {
        for p in [
            policy::DENY_ALL,
            policy::ALLOW_ALL,
            policy::APP_TO_DB,
            policy::APP_DB_UDP,
        ] {
            meshd_policy::Policy::parse(p).unwrap();
        }
        meshd_policy::Policy::parse(&policy::allow_udp_until("2030-01-01T00:00:00Z")).unwrap();
    }
}
