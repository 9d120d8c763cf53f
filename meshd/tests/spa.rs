//! End to end, in network namespaces: the coordinator's control port is dark (SPA). A
//! stranger's QUIC Initial gets no reply at all (a capture shows no datagram and no ICMP back);
//! an agent that knocks enrols and connects; a replayed knock is refused (also after a
//! coordinator restart) and its source stays dark; a knock from behind a NAT (a namespace
//! doing nftables masquerade) opens the port for the translated address.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use common::*;
use meshd_agent::{client_endpoint, KnockAs};
use meshd_channel::spa;
use meshd_control::proto::EndpointReport;
use meshd_lab::{wait_for, Lab};
use meshd_tunnel::{PrivateKey, PublicKey};

const ALLOW_ALL: &str = "rules:\n  - name: all\n    from: {}\n    to: {}\n    ports: [any]\n";

/// Whether a QUIC handshake to `to` completes within 3 s from a fresh socket in namespace
/// `ns`, after sending `first` (a knock, or nothing) from that same socket.
fn quic_handshake(ns: &str, to: SocketAddr, first: Option<Vec<u8>>) -> bool {
    in_netns(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let ep = client_endpoint("0.0.0.0:0".parse().unwrap()).unwrap();
            if let Some(k) = first {
                ep.send_datagram(&k, to).unwrap();
            }
            let c = ep.connect(to, "meshd-coordinator").unwrap();
            let r = tokio::time::timeout(Duration::from_secs(3), c).await;
            let ok = matches!(r, Ok(Ok(_)));
            ep.close(0u32.into(), b"");
            ok
        })
    })
}

/// An admin knock (the coordinator's admin token) made now.
fn admin_knock(coord: &Coord, key: &PublicKey) -> Vec<u8> {
    let token = std::fs::read_to_string(coord.dir.join("admin.token")).unwrap();
    let hash = meshd_control::token::hash_secret(token.trim().as_bytes());
    spa::make_knock(
        key,
        &PrivateKey::generate(),
        KnockAs::Admin(&hash),
        meshd_time::unix_millis(),
        spa::fresh_nonce(),
    )
    .unwrap()
}

fn log(coord: &Coord) -> String {
    coord
        .proc
        .as_ref()
        .and_then(|p| p.stderr().ok())
        .unwrap_or_default()
}

fn coordinator_key(coord: &Coord) -> PublicKey {
    meshd_config::load_private_key(coord.dir.join("coordinator.key"))
        .unwrap()
        .public_key()
}

/// A namespace behind lab host `router` (10.77.0.2 → masqueraded to the router's underlay
/// address); deleted on drop.
struct NatNs {
    name: String,
}

impl NatNs {
    fn new(lab: &Lab, router: usize) -> NatNs {
        let name = format!("{}-natin", lab.prefix());
        let r = lab.host(router);
        let sh = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().unwrap();
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        sh(&["netns", "add", &name]);
        let nat = NatNs { name };
        let n = nat.name.as_str();
        sh(&[
            "-n",
            r.netns(),
            "link",
            "add",
            "natv0",
            "type",
            "veth",
            "peer",
            "name",
            "natv1",
            "netns",
            n,
        ]);
        sh(&[
            "-n",
            r.netns(),
            "addr",
            "add",
            "10.77.0.1/24",
            "dev",
            "natv0",
        ]);
        sh(&["-n", r.netns(), "link", "set", "natv0", "up"]);
        sh(&["-n", n, "addr", "add", "10.77.0.2/24", "dev", "natv1"]);
        sh(&["-n", n, "link", "set", "natv1", "up"]);
        sh(&["-n", n, "link", "set", "lo", "up"]);
        sh(&["-n", n, "route", "add", "default", "via", "10.77.0.1"]);
        r.exec_ok("sysctl", ["-qw", "net.ipv4.ip_forward=1"])
            .unwrap();
        r.exec_ok(
            "nft",
            ["add table ip nat; \
                 add chain ip nat post { type nat hook postrouting priority 100; }; \
                 add rule ip nat post oifname \"eth0\" masquerade"],
        )
        .unwrap();
        nat
    }
}

impl Drop for NatNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
fn dark_control_port_knock_replay_and_nat() {
    meshd_lab::require_root!();
    let lab = Lab::new("spa", 3).unwrap();
    let mut coord = Coord::start(&lab, 0);
    let (code, v) = coord.apply_policy(&lab, ALLOW_ALL);
    assert!((200..300).contains(&code), "policy apply: {code} {v}");
    let ckey = coordinator_key(&coord);
    let c_ip = lab.host(0).underlay_ip();
    let control = SocketAddr::new(IpAddr::V4(c_ip), 7443);
    let h1 = lab.host(1).netns().to_string();

    // 1. A stranger: a real QUIC client that does not knock. Nothing at all comes back.
    let cap = lab
        .capture(1, "eth0", &format!("host {c_ip} and (udp or icmp)"))
        .unwrap();
    assert!(
        !quic_handshake(&h1, control, None),
        "a stranger completed a QUIC handshake"
    );
    let pcap = cap.stop_parsed().unwrap();
    let pk = pcap.summaries();
    let sent = pk.iter().filter(|p| p.dst == IpAddr::V4(c_ip)).count();
    let back: Vec<_> = pk.iter().filter(|p| p.src == IpAddr::V4(c_ip)).collect();
    assert!(sent >= 1, "the capture saw the stranger's Initials: {pk:?}");
    assert!(back.is_empty(), "the dark port answered: {back:?}");

    // 2. A fresh admin knock from the same socket opens it: the handshake completes.
    let k = admin_knock(&coord, &ckey);
    assert!(
        quic_handshake(&h1, control, Some(k.clone())),
        "a knocked source could not connect"
    );
    // 3. The same knock replayed from another source port: refused, the port stays dark.
    assert!(
        !quic_handshake(&h1, control, Some(k.clone())),
        "a replayed knock opened the port"
    );
    assert!(
        log(&coord).contains("spa knock refused (replayed"),
        "no replay event in the log:\n{}",
        log(&coord)
    );

    // 4. A real agent (`meshd up --join`) knocks with its token, enrols, reconnects as a host.
    let token = coord.token(&lab, &[("app", "a")], Some(3600), Some(1));
    let agent = join(&lab, 1, &token, "host1");
    let ok = wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
        own_overlay(lab.host(1)).is_some()
    });
    assert!(
        ok,
        "the agent never enrolled: {}",
        agent.stderr().unwrap_or_default()
    );
    let ok = wait_for(Duration::from_secs(10), Duration::from_millis(100), || {
        log(&coord).contains("kind=\"host\"") || log(&coord).contains("kind=host")
    });
    assert!(ok, "the agent did not knock as a host:\n{}", log(&coord));

    // 5. Restart: the replay cache was saved; the old knock is still refused.
    if let Some(p) = coord.proc.take() {
        stop_cleanly(p);
    }
    coord.restart(&lab);
    assert!(
        !quic_handshake(&h1, control, Some(k)),
        "a knock replayed after a restart opened the port"
    );
    assert!(
        log(&coord).contains("spa knock refused (replayed"),
        "{}",
        log(&coord)
    );

    // 6. Behind a NAT: a host in a masqueraded namespace enrols (knock, then QUIC) through it.
    let nat = NatNs::new(&lab, 2);
    let token = coord.token(&lab, &[("app", "n")], Some(3600), Some(1));
    let t = meshd_control::JoinToken::parse(&token).unwrap();
    let enrolled = in_netns(&nat.name, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(meshd_agent::enrol(
            &t,
            "natted",
            &PrivateKey::generate(),
            EndpointReport {
                addrs: vec![],
                listen_port: Some(51820),
                transparent: false,
            },
        ))
        .map(|e| e.host.name)
    });
    assert_eq!(enrolled.unwrap(), "natted");
    let r_ip = lab.host(2).underlay_ip().to_string();
    assert!(
        log(&coord)
            .lines()
            .any(|l| l.contains("spa knock accepted") && l.contains(&r_ip)),
        "the NATed knock was not seen from the router's address {r_ip}:\n{}",
        log(&coord)
    );
    drop(nat);
    stop_cleanly(agent);
    coord.assert_no_secrets_in_logs(&lab);
}
