//! A network map as the tunnel's peer list.

use std::sync::Arc;

use ipnet::IpNet;
use meshd_tunnel::PeerSpec;

use crate::map::NetworkMap;

/// Keepalive towards coordinator-managed peers, in seconds (keeps NAT mappings and detects loss).
pub const PEER_KEEPALIVE: u16 = 25;

/// The tunnel peers of `map`, index-aligned with `map.peers`: each peer's first endpoint, its
/// overlay addresses as /32 and /128 allowed IPs, [`PEER_KEEPALIVE`], no preshared key, its
/// grants.
pub fn peer_specs(map: &NetworkMap) -> Vec<PeerSpec> {
    map.peers
        .iter()
        .map(|p| PeerSpec {
            next_key: p.next_public_key,
            name: p.name.clone(),
            public_key: p.public_key,
            endpoint: p.endpoints.first().copied(),
            allowed_ips: p.addresses.iter().map(|a| IpNet::from(*a)).collect(),
            persistent_keepalive: Some(PEER_KEEPALIVE),
            preshared_key: None,
            grants: Arc::new(p.grants.clone()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::Peer;
    use meshd_policy::{Grant, PeerGrants, Proto};
    use meshd_tunnel::PublicKey;
    use std::net::SocketAddr;

    #[test]
    fn map_becomes_peer_specs() {
        let mut grants = PeerGrants::default();
        grants.outbound.push(Grant {
            proto: Proto::Tcp,
            ports: (443, 443),
            expires_at: None,
            rule: "web".into(),
        });
        let a = Peer {
            name: "a".into(),
            public_key: PublicKey([1; 32]),
            addresses: vec!["100.64.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
            endpoints: vec![
                SocketAddr::from(([198, 51, 100, 1], 51820)),
                SocketAddr::from(([192, 0, 2, 1], 51820)),
            ],
            labels: Default::default(),
            grants: grants.clone(),
            transparent: true,
            next_public_key: None,
        };
        let b = Peer {
            name: "b".into(),
            public_key: PublicKey([2; 32]),
            addresses: vec!["100.64.0.2".parse().unwrap()],
            endpoints: vec![],
            labels: Default::default(),
            grants: PeerGrants::default(),
            transparent: false,
            next_public_key: None,
        };
        let specs = peer_specs(&NetworkMap::new(4, [b, a]));
        assert_eq!(specs.len(), 2);
        let (sa, sb) = (&specs[0], &specs[1]);
        assert_eq!(sa.name, "a");
        assert_eq!(sa.public_key, PublicKey([1; 32]));
        // The first endpoint (the observed one) only.
        assert_eq!(
            sa.endpoint,
            Some(SocketAddr::from(([198, 51, 100, 1], 51820)))
        );
        assert_eq!(
            sa.allowed_ips,
            vec![
                "100.64.0.1/32".parse::<IpNet>().unwrap(),
                "fd00::1/128".parse().unwrap()
            ]
        );
        assert_eq!(sa.persistent_keepalive, Some(PEER_KEEPALIVE));
        assert_eq!(sa.preshared_key, None);
        assert_eq!(*sa.grants, grants);
        assert_eq!(sb.name, "b");
        assert_eq!(sb.endpoint, None);
        assert!(sb.grants.outbound.is_empty() && sb.grants.inbound.is_empty());
        assert!(peer_specs(&NetworkMap::default()).is_empty());
    }
}
