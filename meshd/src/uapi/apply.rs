//! A `set=1` applied to static mode's peer list (the `[[peer]]` tables as typed
//! [`PeerConfig`]s), so that the static source compiles the result exactly as it compiles a
//! reloaded file. Pure.

use std::collections::BTreeMap;

use meshd_config::PeerConfig;
use meshd_tunnel::PublicKey;

use super::proto::{AllowedIpOp, Errno, SetRequest};

/// What the running device is, for the interface-level keys of a `set`.
#[derive(Debug, Clone)]
pub struct DeviceFacts {
    /// This host's private key.
    pub private_key: [u8; 32],
    /// This host's public key.
    pub public_key: PublicKey,
    /// The UDP port bound.
    pub listen_port: u16,
    /// The socket mark (`None`: none).
    pub fwmark: Option<u32>,
}

/// Interface-level keys: a value equal to the running one is accepted (`wg setconf` and
/// `wg syncconf` always send the private key), another one is refused with
/// [`Errno::EOPNOTSUPP`]: a new key, port or mark needs a restart, as `[interface]` changes
/// do on SIGHUP.
pub fn check_device(set: &SetRequest, facts: &DeviceFacts) -> Result<(), Errno> {
    if set.private_key.is_some_and(|k| k != facts.private_key) {
        return Err(Errno::EOPNOTSUPP);
    }
    if set.listen_port.is_some_and(|p| p != facts.listen_port) {
        return Err(Errno::EOPNOTSUPP);
    }
    if set
        .fwmark
        .is_some_and(|m| (m != 0).then_some(m) != facts.fwmark)
    {
        return Err(Errno::EOPNOTSUPP);
    }
    Ok(())
}

/// Applies the peer part of `set` to `peers` (in place; on an error `peers` may be half
/// changed, so work on a copy). A peer carrying `own` key is ignored, as in wireguard-go. A
/// new peer is named after its key (base64), made unique among the names in use.
pub fn apply_peers(
    peers: &mut Vec<PeerConfig>,
    set: &SetRequest,
    own: &PublicKey,
) -> Result<(), Errno> {
    if set.replace_peers {
        peers.clear();
    }
    for change in &set.peers {
        let key = PublicKey(change.public_key);
        if key == *own {
            continue;
        }
        let at = peers.iter().position(|p| p.public_key == key);
        if change.remove {
            if let Some(i) = at {
                peers.remove(i);
            }
            continue;
        }
        let i = match at {
            Some(i) => i,
            None if change.update_only => continue,
            None => {
                let name = unique_name(peers, &key.to_base64());
                peers.push(PeerConfig {
                    name,
                    public_key: key,
                    endpoint: None,
                    allowed_ips: Vec::new(),
                    persistent_keepalive: None,
                    preshared_key: None,
                    labels: BTreeMap::new(),
                });
                peers.len() - 1
            }
        };
        let p = &mut peers[i];
        if let Some(psk) = change.preshared_key {
            p.preshared_key = (psk != [0; 32]).then_some(psk);
        }
        if let Some(ep) = change.endpoint {
            if ep.port() == 0 {
                return Err(Errno::EINVAL);
            }
            p.endpoint = Some(ep.to_string());
        }
        if let Some(k) = change.persistent_keepalive {
            p.persistent_keepalive = (k != 0).then_some(k);
        }
        for op in &change.allowed_ips {
            match *op {
                AllowedIpOp::Clear => p.allowed_ips.clear(),
                AllowedIpOp::Add(net) => {
                    if !p.allowed_ips.iter().any(|n| n.trunc() == net.trunc()) {
                        p.allowed_ips.push(net);
                    }
                }
                AllowedIpOp::Remove(net) => p.allowed_ips.retain(|n| n.trunc() != net.trunc()),
            }
        }
    }
    // Like the kernel and wireguard-go, a prefix belongs to one peer: the last one given it.
    let mut owner: BTreeMap<ipnet::IpNet, usize> = BTreeMap::new();
    for change in &set.peers {
        let key = PublicKey(change.public_key);
        let Some(i) = peers.iter().position(|p| p.public_key == key) else {
            continue;
        };
        for op in &change.allowed_ips {
            if let AllowedIpOp::Add(net) = op {
                owner.insert(net.trunc(), i);
            }
        }
    }
    for (i, p) in peers.iter_mut().enumerate() {
        p.allowed_ips
            .retain(|n| owner.get(&n.trunc()).is_none_or(|&o| o == i));
    }
    Ok(())
}

/// `base`, or `base#2`, `base#3` … whichever no peer is named yet.
fn unique_name(peers: &[PeerConfig], base: &str) -> String {
    let taken = |n: &str| peers.iter().any(|p| p.name == n);
    if !taken(base) {
        return base.to_string();
    }
    (2..)
        .map(|i| format!("{base}#{i}"))
        .find(|n| !taken(n))
        .unwrap_or_else(|| base.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uapi::proto::{parse_request, Request};
    use meshd_tunnel::PrivateKey;

    fn key(n: u8) -> PublicKey {
        PrivateKey::from_bytes([n; 32]).public_key()
    }

    fn hex(k: &PublicKey) -> String {
        crate::uapi::proto::to_hex(&k.0)
    }

    fn set(text: &str) -> SetRequest {
        match parse_request(&format!("set=1\n{text}\n")) {
            Ok(Request::Set(s)) => s,
            other => panic!("{other:?}"),
        }
    }

    fn peer(name: &str, k: u8, ips: &[&str]) -> PeerConfig {
        PeerConfig {
            name: name.into(),
            public_key: key(k),
            endpoint: Some("198.18.0.2:51820".into()),
            allowed_ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            persistent_keepalive: Some(25),
            preshared_key: None,
            labels: [("app".to_string(), name.to_string())].into(),
        }
    }

    fn facts() -> DeviceFacts {
        let private = PrivateKey::from_bytes([1; 32]);
        DeviceFacts {
            private_key: private.to_bytes(),
            public_key: private.public_key(),
            listen_port: 51820,
            fwmark: None,
        }
    }

    #[test]
    fn adds_updates_and_removes_peers() {
        let mut peers = vec![peer("db1", 2, &["100.64.0.2/32"])];
        let s = set(&format!(
            "public_key={}\nendpoint=198.18.0.3:51820\nallowed_ip=100.64.0.3/32\n\
             public_key={}\nreplace_allowed_ips=true\nallowed_ip=100.64.0.22/32\n\
             persistent_keepalive_interval=0\npreshared_key={}\n",
            hex(&key(3)),
            hex(&key(2)),
            "07".repeat(32)
        ));
        apply_peers(&mut peers, &s, &facts().public_key).unwrap();
        assert_eq!(peers.len(), 2);
        // The existing peer keeps its name and labels; its fields change.
        assert_eq!(peers[0].name, "db1");
        assert_eq!(peers[0].labels.get("app").map(String::as_str), Some("db1"));
        assert_eq!(
            peers[0].allowed_ips,
            vec!["100.64.0.22/32".parse().unwrap()]
        );
        assert_eq!(peers[0].persistent_keepalive, None);
        assert_eq!(peers[0].preshared_key, Some([7; 32]));
        // The new one is named after its key.
        assert_eq!(peers[1].name, key(3).to_base64());
        assert_eq!(peers[1].endpoint.as_deref(), Some("198.18.0.3:51820"));
        assert_eq!(peers[1].allowed_ips, vec!["100.64.0.3/32".parse().unwrap()]);
        // An all-zero preshared key clears it; remove drops the peer.
        let s = set(&format!(
            "public_key={}\npreshared_key={}\npublic_key={}\nremove=true\n",
            hex(&key(2)),
            "0".repeat(64),
            hex(&key(3))
        ));
        apply_peers(&mut peers, &s, &facts().public_key).unwrap();
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].preshared_key, None);
    }

    #[test]
    fn update_only_own_key_replace_peers_and_moved_prefixes() {
        let own = facts().public_key;
        let mut peers = vec![peer("db1", 2, &["100.64.0.2/32", "10.9.0.0/16"])];
        // update_only on an unknown key and our own key: nothing happens.
        let s = set(&format!(
            "public_key={}\nupdate_only=true\nallowed_ip=100.64.0.9/32\npublic_key={}\nallowed_ip=100.64.0.8/32\n",
            hex(&key(9)),
            hex(&own)
        ));
        let before = peers.clone();
        apply_peers(&mut peers, &s, &own).unwrap();
        assert_eq!(peers, before);
        // A prefix given to another peer moves to it (the last one given it wins).
        let s = set(&format!(
            "public_key={}\nallowed_ip=10.9.1.1/16\n",
            hex(&key(4))
        ));
        apply_peers(&mut peers, &s, &own).unwrap();
        assert_eq!(peers[0].allowed_ips, vec!["100.64.0.2/32".parse().unwrap()]);
        assert_eq!(peers[1].allowed_ips, vec!["10.9.1.1/16".parse().unwrap()]);
        // allowed_ip=-prefix removes, matching on the network.
        let s = set(&format!(
            "public_key={}\nallowed_ip=-10.9.0.0/16\n",
            hex(&key(4))
        ));
        apply_peers(&mut peers, &s, &own).unwrap();
        assert!(peers[1].allowed_ips.is_empty());
        // replace_peers: only what follows stays.
        let s = set(&format!(
            "replace_peers=true\npublic_key={}\nallowed_ip=100.64.0.5/32\n",
            hex(&key(5))
        ));
        apply_peers(&mut peers, &s, &own).unwrap();
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].public_key, key(5));
    }

    #[test]
    fn a_new_peer_never_takes_a_name_in_use() {
        let k = key(3);
        let mut peers = vec![PeerConfig {
            name: k.to_base64(),
            ..peer("x", 2, &[])
        }];
        apply_peers(
            &mut peers,
            &set(&format!("public_key={}\n", hex(&k))),
            &facts().public_key,
        )
        .unwrap();
        assert_eq!(peers[1].name, format!("{}#2", k.to_base64()));
    }

    #[test]
    fn endpoint_port_zero_is_refused() {
        let mut peers = vec![];
        let s = set(&format!(
            "public_key={}\nendpoint=198.18.0.3:0\n",
            hex(&key(3))
        ));
        assert_eq!(
            apply_peers(&mut peers, &s, &facts().public_key),
            Err(Errno::EINVAL)
        );
    }

    #[test]
    fn interface_keys_must_equal_the_running_ones() {
        let f = facts();
        let ok = set(&format!(
            "private_key={}\nlisten_port=51820\nfwmark=0\n",
            crate::uapi::proto::to_hex(&f.private_key)
        ));
        assert_eq!(check_device(&ok, &f), Ok(()));
        for text in [
            format!("private_key={}\n", "11".repeat(32)),
            "listen_port=51821\n".to_string(),
            "fwmark=7\n".to_string(),
        ] {
            assert_eq!(
                check_device(&set(&text), &f),
                Err(Errno::EOPNOTSUPP),
                "{text}"
            );
        }
        let marked = DeviceFacts {
            fwmark: Some(7),
            ..f
        };
        assert_eq!(check_device(&set("fwmark=7\n"), &marked), Ok(()));
        assert_eq!(
            check_device(&set("fwmark=0\n"), &marked),
            Err(Errno::EOPNOTSUPP)
        );
    }
}
