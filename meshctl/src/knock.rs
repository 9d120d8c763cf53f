//! `meshctl knock`: one SPA knock as admin (the admin token, hashed, keys the knock's MAC), so
//! a coordinator started with `--admin-spa` lets this IP's admin API connections in, and its
//! dark control port answers this source address and port for the window.

use std::net::{SocketAddr, UdpSocket};

use anyhow::Context as _;
use meshd_channel::spa::{self, KnockAs};
use meshd_tunnel::{PrivateKey, PublicKey};

/// Where to knock: the coordinator's control (QUIC) address and its static public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnockTarget {
    /// Control address (`meshd coordinator --listen` / `--advertise`).
    pub control: SocketAddr,
    /// The coordinator's static public key (`meshctl status`, or the join token).
    pub key: PublicKey,
}

/// Sends one admin knock to `t`; returns a line saying what was sent.
pub fn send(t: &KnockTarget, admin_token: &str) -> anyhow::Result<String> {
    let hash = meshd_control::token::hash_secret(admin_token.trim().as_bytes());
    let k = spa::make_knock(
        &t.key,
        &PrivateKey::generate(),
        KnockAs::Admin(&hash),
        meshd_time::unix_millis(),
        spa::fresh_nonce(),
    )
    .context("building the knock")?;
    let bind: SocketAddr = if t.control.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = UdpSocket::bind(bind).context("opening a UDP socket for the knock")?;
    let n = s
        .send_to(&k, t.control)
        .with_context(|| format!("sending the knock to {}", t.control))?;
    let from = s
        .local_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    Ok(format!(
        "sent a {n}-byte admin knock to {} (coordinator key {}) from {from}",
        t.control, t.key
    ))
}

/// The target from flags, else the config file (`spa_control`, `spa_coordinator_key`);
/// `None` when neither names both.
pub fn target(
    control: Option<SocketAddr>,
    key: Option<&str>,
    file: Option<&crate::config::FileConfig>,
) -> anyhow::Result<Option<KnockTarget>> {
    let control = control.or_else(|| file.and_then(|f| f.spa_control));
    let key = key
        .map(str::to_string)
        .or_else(|| file.and_then(|f| f.spa_coordinator_key.clone()));
    match (control, key) {
        (Some(control), Some(key)) => {
            let key = key
                .trim()
                .parse::<PublicKey>()
                .map_err(|e| anyhow::anyhow!("coordinator key {key:?}: {e}"))?;
            Ok(Some(KnockTarget { control, key }))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knock_is_a_valid_admin_knock() {
        let coord = PrivateKey::generate();
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let t = KnockTarget {
            control: rx.local_addr().unwrap(),
            key: coord.public_key(),
        };
        let line = send(&t, "meshadm-secret\n").unwrap();
        assert!(line.contains("admin knock"), "{line}");
        let mut buf = [0u8; 512];
        let (n, _) = rx.recv_from(&mut buf).unwrap();
        let mut view = spa::SpaView::default();
        view.add_admin_token(meshd_control::token::hash_secret(b"meshadm-secret"), None);
        let mut g = spa::Gate::new(coord, spa::DEFAULT_SKEW_MS, 8);
        let a = g
            .check(meshd_time::unix_millis(), &buf[..n], &view)
            .unwrap();
        assert_eq!(a.kind, spa::KnockKind::Admin);
    }
}
