//! `meshd status`: a JSON snapshot served on an abstract unix socket named after the
//! interface. Abstract sockets live in the network namespace, so many meshd instances on one
//! machine (one per namespace, same interface name) never collide, and nothing is left on disk.

use std::io::{Read as _, Write};
use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use meshd_config::Mode;
use meshd_tunnel::Device;
use serde::{Deserialize, Serialize};

use crate::dataplane::{Enforcement, IoStats};

/// Everything `meshd status` shows.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    /// TUN name.
    pub interface: String,
    /// Our public key.
    pub public_key: String,
    /// UDP port.
    pub listen_port: u16,
    /// `overlay` or `transparent` (as in the config file).
    pub mode: Mode,
    /// Overlay addresses.
    pub addresses: Vec<String>,
    /// Prefixes peers may reach through this host besides its own addresses
    /// (`routed_prefixes`); inner packets to anything else are dropped.
    #[serde(default)]
    pub routed_prefixes: Vec<String>,
    /// Transparent mode: peer underlay addresses reached only through the tunnel,
    /// as `address (peer)`.
    #[serde(default)]
    pub protected: Vec<String>,
    /// TUN offload on.
    pub offload: bool,
    /// Peers in table order.
    pub peers: Vec<PeerStatus>,
    /// Drop, handshake and IO counters by name: `drop_<reason>` (the device's
    /// [`meshd_tunnel::DropReason`]s), `policy_<reason>` (the firewall's, and
    /// `policy_would_deny`: passed by learning mode), `cookie_replies_sent`, IO counters, and
    /// the latest flow-record interval's `flow_records`, `flow_plaintext`, `flow_overflow`
    /// (with `flow_intervals` collected so far and `flow_interval_start`).
    pub counters: std::collections::BTreeMap<String, u64>,
}

/// One peer's line in `meshd status`.
#[derive(Debug, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Peer name.
    pub name: String,
    /// Public key (base64).
    pub public_key: String,
    /// Current endpoint.
    pub endpoint: Option<String>,
    /// Allowed IPs.
    pub allowed_ips: Vec<String>,
    /// Unix time of the latest handshake.
    pub latest_handshake: Option<u64>,
    /// Decrypted bytes received.
    pub rx_bytes: u64,
    /// Plaintext bytes sent.
    pub tx_bytes: u64,
    /// Keepalive interval.
    pub persistent_keepalive: Option<u16>,
}

/// What the daemon knows besides the device.
pub struct StatusSource {
    pub interface: String,
    pub listen_port: u16,
    pub mode: Mode,
    pub addresses: Vec<String>,
    pub offload: bool,
    /// Transparent mode's protected peer addresses (updated with each map).
    pub protected: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// The latest flow-record interval's counts (the host's collector updates them).
    pub flows: std::sync::Arc<crate::flows::FlowStatus>,
}

/// Builds a snapshot.
pub fn snapshot(device: &Device, io: &IoStats, policy: &Enforcement, src: &StatusSource) -> Status {
    let now = Duration::from_millis(meshd_time::unix_millis());
    let table = device.table();
    let peers = table
        .peers()
        .iter()
        .map(|p| {
            let spec = p.spec();
            PeerStatus {
                name: spec.name,
                public_key: p.public_key.to_base64(),
                endpoint: p.endpoint().map(|e| e.to_string()),
                allowed_ips: spec.allowed_ips.iter().map(|n| n.to_string()).collect(),
                latest_handshake: p
                    .last_handshake()
                    .map(|ago| now.saturating_sub(ago).as_secs()),
                rx_bytes: p.counters.rx_bytes.load(Ordering::Relaxed),
                tx_bytes: p.counters.tx_bytes.load(Ordering::Relaxed),
                persistent_keepalive: spec.persistent_keepalive,
            }
        })
        .collect();
    let mut counters: std::collections::BTreeMap<String, u64> = device
        .counters
        .snapshot()
        .into_iter()
        .map(|(k, v)| (format!("drop_{k}"), v))
        .collect();
    for (k, v) in [
        ("cookie_replies_sent", &device.counters.cookie_replies),
        ("udp_send_errors", &io.udp_send_errors),
        ("tun_write_errors", &io.tun_write_errors),
        ("gso_sends", &io.gso_sends),
        ("datagrams_sent", &io.datagrams_sent),
        ("tx_thread_wakeups", &io.tx_wakeups),
        ("datagrams_received", &io.datagrams_received),
    ] {
        counters.insert(k.into(), v.load(Ordering::Relaxed));
    }
    let fw = policy.firewall.stats();
    for (k, v) in [
        ("policy_default_deny", fw.default_deny),
        ("policy_expired", fw.expired),
        ("policy_quarantined", fw.quarantined),
        ("policy_no_flow", fw.no_flow),
        ("policy_malformed", fw.malformed_total()),
        ("policy_table_full", fw.table_full),
        ("policy_peer_flow_limit", fw.peer_limit),
        ("policy_untracked_fragment", fw.untracked_fragment),
        ("flows_opened", fw.flows_opened),
        ("flows_picked_up", fw.flows_picked_up),
        ("flows_revoked", fw.flows_revoked),
        ("flows_tracked", policy.firewall.len() as u64),
        ("policy_would_deny", fw.would_deny),
    ] {
        counters.insert(k.into(), v);
    }
    let f = &src.flows;
    for (k, v) in [
        ("flow_intervals", &f.intervals),
        ("flow_interval_start", &f.interval_start),
        ("flow_records", &f.records),
        ("flow_plaintext", &f.plaintext),
        ("flow_overflow", &f.overflow),
    ] {
        counters.insert(k.into(), v.load(Ordering::Relaxed));
    }
    for (k, v) in crate::trust::counters().snapshot() {
        counters.insert(k.into(), v);
    }
    Status {
        interface: src.interface.clone(),
        public_key: device.public_key().to_base64(),
        listen_port: src.listen_port,
        mode: src.mode,
        addresses: src.addresses.clone(),
        routed_prefixes: device
            .destinations()
            .routed()
            .iter()
            .map(|n| n.to_string())
            .collect(),
        protected: src.protected.lock().map(|p| p.clone()).unwrap_or_default(),
        offload: src.offload,
        peers,
        counters,
    }
}

fn socket_name(interface: &str) -> String {
    format!("meshd/{interface}")
}

/// Binds the status socket and serves snapshots from a thread until the process exits.
pub fn serve(interface: &str, make: impl Fn() -> Status + Send + 'static) -> anyhow::Result<()> {
    let addr = UnixAddr::from_abstract_name(socket_name(interface).as_bytes())?;
    let listener = UnixListener::bind_addr(&addr).with_context(|| {
        format!("binding the status socket for {interface}: is another meshd running for it?")
    })?;
    std::thread::Builder::new()
        .name("meshd-status".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _timeout = conn.set_write_timeout(Some(Duration::from_secs(2)));
                match serde_json::to_vec(&make()) {
                    Ok(body) => {
                        if let Err(e) = conn.write_all(&body) {
                            tracing::debug!(error = %e, "status client went away");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "encoding status"),
                }
            }
        })?;
    Ok(())
}

/// Asks the meshd serving `interface` in this network namespace for its status.
pub fn fetch(interface: &str) -> anyhow::Result<Status> {
    let addr = UnixAddr::from_abstract_name(socket_name(interface).as_bytes())?;
    let mut conn = UnixStream::connect_addr(&addr).with_context(|| {
        format!("no meshd is running for interface {interface} in this network namespace")
    })?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut body = Vec::new();
    conn.read_to_end(&mut body)?;
    serde_json::from_slice(&body).context("decoding meshd's status")
}

/// Prints a status like `wg show`.
pub fn print(w: &mut dyn Write, s: &Status) -> std::io::Result<()> {
    writeln!(w, "interface: {}", s.interface)?;
    writeln!(w, "  public key: {}", s.public_key)?;
    writeln!(w, "  listening port: {}", s.listen_port)?;
    writeln!(w, "  mode: {}", s.mode)?;
    writeln!(w, "  addresses: {}", s.addresses.join(", "))?;
    if !s.routed_prefixes.is_empty() {
        writeln!(w, "  routed prefixes: {}", s.routed_prefixes.join(", "))?;
    }
    if s.mode == Mode::Transparent {
        if s.protected.is_empty() {
            writeln!(w, "  protected peer addresses: none yet")?;
        } else {
            writeln!(w, "  protected peer addresses: {}", s.protected.join(", "))?;
        }
    }
    let now = meshd_time::unix_now();
    for p in &s.peers {
        writeln!(w)?;
        writeln!(w, "peer: {} ({})", p.name, p.public_key)?;
        if let Some(ep) = &p.endpoint {
            writeln!(w, "  endpoint: {ep}")?;
        }
        writeln!(w, "  allowed ips: {}", p.allowed_ips.join(", "))?;
        match p.latest_handshake {
            Some(t) => writeln!(w, "  latest handshake: {} ago", ago(now.saturating_sub(t)))?,
            None => writeln!(w, "  latest handshake: never")?,
        }
        writeln!(
            w,
            "  transfer: {} received, {} sent",
            bytes(p.rx_bytes),
            bytes(p.tx_bytes)
        )?;
        if let Some(k) = p.persistent_keepalive {
            writeln!(w, "  persistent keepalive: every {k} seconds")?;
        }
    }
    let listed = |prefix: &str| -> Vec<String> {
        s.counters
            .iter()
            .filter(|(k, v)| k.starts_with(prefix) && **v > 0)
            .map(|(k, v)| format!("{}={v}", &k[prefix.len()..]))
            .collect()
    };
    let drops = listed("drop_");
    if !drops.is_empty() {
        writeln!(w)?;
        writeln!(w, "dropped: {}", drops.join(" "))?;
    }
    let denied: Vec<String> = listed("policy_")
        .into_iter()
        .filter(|d| !d.starts_with("would_deny="))
        .collect();
    if !denied.is_empty() {
        writeln!(w, "denied by policy: {}", denied.join(" "))?;
    }
    let count = |k: &str| s.counters.get(k).copied().unwrap_or(0);
    if count("policy_would_deny") > 0 {
        writeln!(
            w,
            "learning mode: {} would-deny passes (not enforcing for some peers)",
            count("policy_would_deny")
        )?;
    }
    if count("flow_intervals") > 0 {
        writeln!(
            w,
            "flow records (last interval): {} records, {} plaintext, {} overflow",
            count("flow_records"),
            count("flow_plaintext"),
            count("flow_overflow")
        )?;
    }
    if count("signed_pinned") > 0 {
        let since = count("signed_stale_since");
        writeln!(
            w,
            "signed policy: version {} applied; {} updates refused{}",
            count("signed_policy_version"),
            count("signed_updates_refused"),
            if since > 0 {
                format!(
                    "; STALE since {} ago (the coordinator sent changes no admin signed)",
                    ago(now.saturating_sub(since))
                )
            } else {
                String::new()
            }
        )?;
    }
    if let Some(n) = s.counters.get("cookie_replies_sent").filter(|n| **n > 0) {
        writeln!(w, "cookie replies sent (under load): {n}")?;
    }
    Ok(())
}

fn ago(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs} seconds"),
        60..=3599 => format!("{} minutes, {} seconds", secs / 60, secs % 60),
        _ => format!("{} hours, {} minutes", secs / 3600, secs % 3600 / 60),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshd_policy::{Direction, PeerGrants};
    use meshd_tunnel::PrivateKey;
    use std::net::IpAddr;

    fn source() -> StatusSource {
        StatusSource {
            interface: "mesh0".into(),
            listen_port: 51820,
            mode: Mode::Overlay,
            addresses: vec!["100.64.0.1/24".into()],
            offload: false,
            protected: Default::default(),
            flows: Default::default(),
        }
    }

    #[test]
    fn flow_record_counts_and_would_deny_are_shown() {
        let device = Device::new(PrivateKey::generate(), 1);
        let policy = Enforcement::new();
        let src = source();
        src.flows.records.store(3, Ordering::Relaxed);
        src.flows.overflow.store(1, Ordering::Relaxed);
        let (l, r): (IpAddr, IpAddr) =
            ("100.64.0.1".parse().unwrap(), "100.64.0.2".parse().unwrap());
        let learn = PeerGrants {
            learn: true,
            ..PeerGrants::default()
        };
        let syn = meshd_firewall::build::tcp(r, 40000, l, 22, meshd_firewall::tcp_flags::SYN);
        let v = policy
            .firewall
            .check(7, &learn, 1, Direction::Inbound, &syn, 1_000);
        assert!(v.is_allow());
        src.flows.intervals.store(1, Ordering::Relaxed);
        let s = snapshot(&device, &IoStats::default(), &policy, &src);
        let mut text = Vec::new();
        print(&mut text, &s).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.contains("flow records (last interval): 3 records, 0 plaintext, 1 overflow"),
            "{text}"
        );
        assert!(
            text.contains("learning mode: 1 would-deny passes"),
            "{text}"
        );
        assert!(!text.contains("denied by policy"), "{text}");
        assert_eq!(
            nonzero(&s),
            vec![
                ("flow_intervals".into(), 1),
                ("flow_overflow".into(), 1),
                ("flow_records".into(), 3),
                ("flows_opened".into(), 1),
                ("flows_tracked".into(), 1),
                ("policy_would_deny".into(), 1),
            ]
        );
    }

    /// Counters that are not zero.
    fn nonzero(s: &Status) -> Vec<(String, u64)> {
        s.counters
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    #[test]
    fn later_fragment_drops_are_shown() {
        let device = Device::new(PrivateKey::generate(), 1);
        let policy = Enforcement::new();
        let io = IoStats::default();
        let (l, r): (IpAddr, IpAddr) =
            ("100.64.0.1".parse().unwrap(), "100.64.0.2".parse().unwrap());
        let big = meshd_firewall::build::udp(r, 5353, l, 53, 2000);
        // A later fragment whose first fragment was never admitted: no port to check.
        let (_first, later) = meshd_firewall::build::fragment_v4(&big, 1480, 0x1234);
        let grants = PeerGrants::allow_all("test");
        let v = policy
            .firewall
            .check(7, &grants, 1, Direction::Inbound, &later, 1_000);
        assert!(!v.is_allow());
        let s = snapshot(&device, &io, &policy, &source());
        assert_eq!(nonzero(&s), vec![("policy_untracked_fragment".into(), 1)]);
    }

    #[test]
    fn every_device_counter_is_shown() {
        let device = Device::new(PrivateKey::generate(), 1);
        let s = snapshot(&device, &IoStats::default(), &Enforcement::new(), &source());
        for name in [
            "drop_replayed_initiation",
            "drop_malformed_inner",
            "drop_inner_destination",
            "cookie_replies_sent",
            "policy_untracked_fragment",
        ] {
            assert_eq!(s.counters.get(name), Some(&0), "{name}");
        }
        device
            .counters
            .cookie_replies
            .fetch_add(2, Ordering::Relaxed);
        device
            .counters
            .count(meshd_tunnel::DropReason::InnerDestination);
        let s = snapshot(&device, &IoStats::default(), &Enforcement::new(), &source());
        assert_eq!(
            nonzero(&s),
            vec![
                ("cookie_replies_sent".into(), 2),
                ("drop_inner_destination".into(), 1)
            ]
        );
        // The JSON form carries them too.
        let json: serde_json::Value = serde_json::to_value(&s).unwrap();
        assert_eq!(json["counters"]["cookie_replies_sent"], 2);
        assert_eq!(json["counters"]["drop_inner_destination"], 1);
    }

    #[test]
    fn mode_is_shown_as_before() {
        let device = Device::new(PrivateKey::generate(), 1);
        let mut src = source();
        src.mode = Mode::Transparent;
        *src.protected.lock().unwrap() = vec!["198.18.0.2 (db1)".into()];
        let s = snapshot(&device, &IoStats::default(), &Enforcement::new(), &src);
        let json: serde_json::Value = serde_json::to_value(&s).unwrap();
        assert_eq!(json["mode"], "transparent");
        let back: Status = serde_json::from_value(json).unwrap();
        assert_eq!(back.mode, Mode::Transparent);
        let mut text = Vec::new();
        print(&mut text, &s).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains("  mode: transparent\n"), "{text}");
        assert!(
            text.contains("  protected peer addresses: 198.18.0.2 (db1)\n"),
            "{text}"
        );
        let s = snapshot(&device, &IoStats::default(), &Enforcement::new(), &source());
        assert_eq!(serde_json::to_value(&s).unwrap()["mode"], "overlay");
        let mut text = Vec::new();
        print(&mut text, &s).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.contains("  mode: overlay\n") && !text.contains("protected"),
            "{text}"
        );
    }
}
