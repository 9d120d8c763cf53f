//! Two tunnel devices that know each other, for the data-path benchmarks: `benches/tunnel.rs`
//! (`mod pair;`) and `crates/tunnel/examples/cores.rs` (by `#[path]`).

use std::net::SocketAddr;

use meshd_tunnel::{Decap, Destinations, Device, PeerSpec, PrivateKey, TunnResult};

pub const A: &str = "198.18.0.1:51820";
pub const B: &str = "198.18.0.2:51820";

fn spec(name: &str, key: &PrivateKey, ep: &str, ip: &str) -> PeerSpec {
    PeerSpec {
        next_key: None,
        name: name.into(),
        public_key: key.public_key(),
        endpoint: Some(ep.parse().expect("endpoint")),
        allowed_ips: vec![ip.parse().expect("prefix")],
        persistent_keepalive: None,
        preshared_key: None,
        grants: Default::default(),
    }
}

/// A `len`-byte IPv4 UDP packet from 100.64.0.1 to 100.64.0.2.
pub fn ip4(len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[100, 64, 0, 1]);
    p[16..20].copy_from_slice(&[100, 64, 0, 2]);
    p
}

/// Two devices that know each other (a is 100.64.0.1 at `A`, b 100.64.0.2 at `B`), no session
/// yet; `seed` picks their session index spaces.
pub fn fresh_pair(seed: u32) -> (Device, Device) {
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let a = Device::new(ka.clone(), seed.wrapping_mul(2).wrapping_add(1));
    let b = Device::new(kb.clone(), seed.wrapping_mul(2).wrapping_add(2));
    a.set_peers(&[spec("b", &kb, B, "100.64.0.2/32")])
        .expect("peers");
    b.set_peers(&[spec("a", &ka, A, "100.64.0.1/32")])
        .expect("peers");
    let own = |ip: [u8; 4]| Destinations::new([ip.into()], &[]);
    a.set_destinations(own([100, 64, 0, 1]));
    b.set_destinations(own([100, 64, 0, 2]));
    (a, b)
}

/// One full handshake a -> b -> a, confirmed by a's keepalive.
pub fn handshake(a: &Device, b: &Device) {
    let (from_a, from_b): (SocketAddr, SocketAddr) = (A.parse().unwrap(), B.parse().unwrap());
    let mut buf = vec![0u8; 2048];
    let mut out = vec![0u8; 2048];
    let (ta, tb) = (a.table(), b.table());
    let init = match ta.peers()[0]
        .lock()
        .format_handshake_initiation(&mut buf, true)
    {
        TunnResult::WriteToNetwork(d) => d.to_vec(),
        other => panic!("initiation: {other:?}"),
    };
    let resp = match b.decapsulate(&tb, from_a, &init, &mut out) {
        Decap::Reply { datagram, .. } => datagram.to_vec(),
        other => panic!("response: {other:?}"),
    };
    let keepalive = match a.decapsulate(&ta, from_b, &resp, &mut out) {
        Decap::Reply { datagram, .. } => datagram.to_vec(),
        other => panic!("keepalive: {other:?}"),
    };
    match b.decapsulate(&tb, from_a, &keepalive, &mut out) {
        Decap::Done => {}
        other => panic!("confirmation: {other:?}"),
    }
}

/// Two devices with an established session.
pub fn pair(seed: u32) -> (Device, Device) {
    let (a, b) = fresh_pair(seed);
    handshake(&a, &b);
    (a, b)
}
