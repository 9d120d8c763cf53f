//! Automatic response to a scan, end to end in network namespaces: a coordinator with a low
//! threshold and a webhook receiver on its loopback, a scanner and a victim that may talk on
//! tcp/80 only. A bounded port scan (TCP connects to 50 ports of the victim, 200 ms each)
//! gets the scanner quarantined; the receiver gets the signed alert.

mod common;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use meshd_lab::{wait_for, Cmd, Lab};

const POLICY: &str = "rules:
  - name: web-to-db
    from: { app: web }
    to: { app: db }
    ports: [tcp/80]
";

const SECRET: &str = "lab-hook-secret";
const HOOK_PORT: u16 = 9099;

/// Starts the coordinator on lab host `idx` with the scan thresholds and the webhook.
fn coordinator(lab: &Lab, idx: usize) -> Coord {
    let dir = lab.dir().join("coordinator");
    let secret = lab.dir().join("hook.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let host = lab.host(idx);
    let listen = format!("{}:7443", host.underlay_ip());
    let hook = format!("http://127.0.0.1:{HOOK_PORT}/alerts");
    let proc = host
        .spawn(
            Cmd::new(meshd_bin())
                .args([
                    "coordinator",
                    "--listen",
                    &listen,
                    "--admin-listen",
                    "127.0.0.1:7444",
                ])
                .args([
                    "--scan-max-ports",
                    "10",
                    "--scan-max-pairs",
                    "40",
                    "--scan-window",
                    "60",
                ])
                .args(["--webhook-url", &hook, "--webhook-secret-file"])
                .arg(&secret)
                .arg("--state-dir")
                .arg(&dir)
                .env("RUST_LOG", "info")
                .label("coordinator"),
        )
        .unwrap();
    let c = Coord {
        idx,
        dir,
        proc: Some(proc),
        tokens: Default::default(),
        extra: Vec::new(),
    };
    let ok = wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
        c.dir.join("admin.token").exists() && c.api(lab, "GET", "/v1/status", None).0 == 200
    });
    assert!(
        ok,
        "coordinator did not come up: {}",
        c.proc
            .as_ref()
            .and_then(|p| p.stderr().ok())
            .unwrap_or_default()
    );
    c
}

/// One POST read off `listener` (in the coordinator's namespace), answered 200; bounded by
/// `deadline`. Returns (signature header, body).
fn receive_one(listener: &TcpListener, deadline: Instant) -> Option<(String, Vec<u8>)> {
    listener.set_nonblocking(true).unwrap();
    let mut s = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(_) => return None,
        }
    };
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let (mut sig, mut len, mut line) = (String::new(), 0usize, String::new());
    r.read_line(&mut line).ok()?;
    if !line.starts_with("POST /alerts ") {
        return None;
    }
    loop {
        line.clear();
        r.read_line(&mut line).ok()?;
        let l = line.trim();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':')?;
        match k.to_ascii_lowercase().as_str() {
            "x-meshd-signature" => sig = v.trim().to_string(),
            "content-length" => len = v.trim().parse().ok()?,
            _ => {}
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .ok()?;
    Some((sig, body))
}

#[test]
fn a_port_scan_quarantines_the_scanner_and_the_webhook_gets_the_alert() {
    meshd_lab::require_root!();
    let lab = Lab::new("scan", 3).unwrap();
    let coord = coordinator(&lab, 0);
    // The receiver listens on the coordinator's loopback (bound before any alert can exist).
    let listener = in_netns(lab.host(0).netns(), || {
        TcpListener::bind(("127.0.0.1", HOOK_PORT)).unwrap()
    });
    let receiver = std::thread::spawn(move || {
        receive_one(&listener, Instant::now() + Duration::from_secs(60))
    });
    let (code, v) = coord.apply_policy(&lab, POLICY);
    assert!((200..300).contains(&code), "policy apply: {code} {v}");
    let t1 = coord.token(&lab, &[("app", "web")], Some(600), Some(1));
    let t2 = coord.token(&lab, &[("app", "db")], Some(600), Some(1));
    let _p1 = join(&lab, 1, &t1, "scanner");
    let _p2 = join(&lab, 2, &t2, "victim");
    let (scanner, victim) = (lab.host(1), lab.host(2));
    assert!(
        wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
            peer_names(scanner).contains(&"victim".to_string())
                && peer_names(victim).contains(&"scanner".to_string())
        }),
        "scanner and victim did not learn each other"
    );
    let victim_ip = own_overlay(victim).unwrap();
    // The granted port works: the mesh is up.
    assert!(tcp_connects(scanner.netns(), victim.netns(), victim_ip, 80));
    assert_eq!(host_state(&coord, &lab, "scanner"), Some(false));

    // The scan: 50 ports, 200 ms each, at most 10 s.
    let hits = in_netns(scanner.netns(), move || {
        (2000..2050u16)
            .filter(|p| {
                TcpStream::connect_timeout(
                    &SocketAddr::new(victim_ip, *p),
                    Duration::from_millis(200),
                )
                .is_ok()
            })
            .count()
    });
    assert_eq!(hits, 0, "denied ports answered");

    let quarantined = wait_for(Duration::from_secs(20), Duration::from_millis(200), || {
        host_state(&coord, &lab, "scanner") == Some(true)
    });
    assert!(
        quarantined,
        "scanner not quarantined; blocks: {}",
        coord.api(&lab, "GET", "/v1/blocks?host=scanner", None).1
    );
    assert_eq!(
        host_state(&coord, &lab, "victim"),
        Some(false),
        "the victim is not acted on"
    );
    // Cut off: the victim drops it, the granted port no longer works.
    assert!(wait_for(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || { !peer_names(victim).contains(&"scanner".to_string()) }
    ));
    assert!(!tcp_connects(
        scanner.netns(),
        victim.netns(),
        victim_ip,
        80
    ));

    // The event.
    let (_, ev) = coord.api(&lab, "GET", "/v1/events?limit=100", None);
    let scan: Vec<&serde_json::Value> = ev
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "scan_detected")
        .collect();
    assert_eq!(scan.len(), 1, "{ev}");
    assert!(
        scan[0]["detail"].as_str().unwrap().starts_with("scanner ("),
        "{ev}"
    );

    // The webhook.
    let (sig, body) = receiver
        .join()
        .unwrap()
        .expect("no webhook POST within 60 s");
    assert_eq!(
        sig,
        meshd_coordinator::webhook::signature(SECRET.as_bytes(), &body)
    );
    let alert: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(alert["kind"], "scan_detected");
    assert_eq!(alert["host"], "scanner");
    assert_eq!(alert["action"], "quarantine");
    assert_eq!(alert["top_peer"], "victim");
    assert!(alert["top_peer_ports"].as_u64().unwrap() > 10, "{alert}");

    // Release lifts it: the granted port works again.
    let (code, _) = coord.api(&lab, "POST", "/v1/hosts/scanner/release", None);
    assert_eq!(code, 200);
    assert!(wait_for(
        Duration::from_secs(15),
        Duration::from_millis(200),
        || { tcp_connects(scanner.netns(), victim.netns(), victim_ip, 80) }
    ));
    coord.assert_no_secrets_in_logs(&lab);
    let log = coord
        .proc
        .as_ref()
        .and_then(|p| p.stderr().ok())
        .unwrap_or_default();
    assert!(log.contains("scan detected"), "{log}");
}

/// Whether the coordinator has `name` quarantined (`None`: no such host).
fn host_state(coord: &Coord, lab: &Lab, name: &str) -> Option<bool> {
    let (code, v) = coord.api(lab, "GET", &format!("/v1/hosts/{name}"), None);
    (code == 200).then(|| v["quarantined"].as_bool().unwrap_or(false))
}

#[test]
fn a_learning_host_that_scans_is_not_quarantined() {
    meshd_lab::require_root!();
    let lab = Lab::new("scanlearn", 3).unwrap();
    let coord = coordinator(&lab, 0);
    let policy = format!("learn:\n  - {{ app: web }}\n{POLICY}");
    let (code, v) = coord.apply_policy(&lab, &policy);
    assert!((200..300).contains(&code), "policy apply: {code} {v}");
    let t1 = coord.token(&lab, &[("app", "web")], Some(600), Some(1));
    let t2 = coord.token(&lab, &[("app", "db")], Some(600), Some(1));
    let _p1 = join_with(&lab, 1, &t1, "scanner", &["--flow-interval", "1"]);
    let _p2 = join_with(&lab, 2, &t2, "victim", &["--flow-interval", "1"]);
    let (scanner, victim) = (lab.host(1), lab.host(2));
    assert!(
        wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
            peer_names(scanner).contains(&"victim".to_string())
                && peer_names(victim).contains(&"scanner".to_string())
        }),
        "scanner and victim did not learn each other"
    );
    let victim_ip = own_overlay(victim).unwrap();
    // The same scan as above: in learning mode its packets pass (as would-deny flows), so the
    // victim's kernel answers each connect with a reset; nothing is denied.
    in_netns(scanner.netns(), move || {
        for p in 2000..2050u16 {
            let _refused = TcpStream::connect_timeout(
                &SocketAddr::new(victim_ip, p),
                Duration::from_millis(200),
            );
        }
    });
    // The scan was seen (as would-deny flows on many ports) ...
    let seen = wait_for(Duration::from_secs(15), Duration::from_millis(300), || {
        let (_, flows) = coord.api(&lab, "GET", "/v1/flows?host=scanner", None);
        let ports: std::collections::BTreeSet<u64> = flows
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|f| f["verdict"] == "would_deny")
                    .filter_map(|f| f["port"].as_u64())
                    .collect()
            })
            .unwrap_or_default();
        ports.len() >= 40
    });
    assert!(seen, "the scan's would-deny flows were not recorded");
    // ... and still, after the detector has had every report, nobody is acted on.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(host_state(&coord, &lab, "scanner"), Some(false));
    let (_, ev) = coord.api(&lab, "GET", "/v1/events?limit=100", None);
    assert!(
        !ev.to_string().contains("scan_detected"),
        "a learning host was acted on: {ev}"
    );
}
