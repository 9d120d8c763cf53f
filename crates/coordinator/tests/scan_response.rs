//! The scan detector end to end in process: agents on 127.0.0.1 report denials, the
//! coordinator quarantines the scanner, records the event, and POSTs a signed alert to a local
//! webhook receiver (a thread on 127.0.0.1), retried after a 500.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use meshd_agent::{enrol, spawn_session, SessionConfig, SessionHandle, SessionState};
use meshd_control::api::{HostView, TokenCreateRequest};
use meshd_control::proto::EndpointReport;
use meshd_control::state::ScanAlert;
use meshd_control::JoinToken;
use meshd_coordinator::webhook::signature;
use meshd_coordinator::{start, AdminOp, AdminReply, CoordinatorHandle, CoordinatorOptions};
use meshd_policy::{BlockEvent, DenyReason, Direction};
use meshd_tunnel::PrivateKey;

fn ep() -> EndpointReport {
    EndpointReport {
        addrs: vec![SocketAddr::from(([192, 0, 2, 1], 51820))],
        listen_port: Some(51820),
        transparent: false,
    }
}

async fn join(c: &CoordinatorHandle, name: &str) -> SessionHandle {
    let t = c
        .create_token(TokenCreateRequest {
            labels: [("app".to_string(), name.to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let t = JoinToken::parse(&t.token).unwrap();
    let key = PrivateKey::generate();
    let e = enrol(&t, name, &key, ep()).await.unwrap();
    let s = spawn_session(SessionConfig::new(
        e.coordinator,
        e.coordinator_key,
        key,
        ep(),
    ));
    let mut rx = s.state();
    tokio::time::timeout(
        Duration::from_secs(20),
        rx.wait_for(|s| matches!(s, SessionState::Connected { .. })),
    )
    .await
    .unwrap()
    .unwrap();
    s
}

async fn host(c: &CoordinatorHandle, name: &str) -> HostView {
    match c
        .admin(AdminOp::ShowHost(name.into()))
        .await
        .unwrap()
        .unwrap()
    {
        AdminReply::Host(h) => h,
        other => panic!("{other:?}"),
    }
}

fn denial(peer: &str, dir: Direction, port: u16) -> BlockEvent {
    BlockEvent {
        at: meshd_time::unix_now(),
        host: "lies".into(),
        host_labels: Default::default(),
        peer: peer.into(),
        peer_labels: Default::default(),
        direction: dir,
        proto: 6,
        src: "100.64.0.2:40000".parse().unwrap(),
        dst: SocketAddr::from(([100, 64, 0, 3], port)),
        reason: DenyReason::DefaultDeny,
        count: 1,
    }
}

/// Answers `statuses.len()` POSTs, one per connection; returns (signature header, body).
fn receiver(listener: TcpListener, statuses: Vec<&'static str>) -> Vec<(String, Vec<u8>)> {
    let mut got = Vec::new();
    for status in statuses {
        let (s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let (mut sig, mut len, mut line) = (String::new(), 0usize, String::new());
        r.read_line(&mut line).unwrap();
        assert!(line.starts_with("POST /alerts "), "{line}");
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            let l = line.trim();
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').unwrap();
            match k.to_ascii_lowercase().as_str() {
                "x-meshd-signature" => sig = v.trim().to_string(),
                "content-length" => len = v.trim().parse().unwrap(),
                _ => {}
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).unwrap();
        let mut w = s;
        write!(
            w,
            "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        )
        .unwrap();
        got.push((sig, body));
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scanner_is_quarantined_and_the_webhook_gets_a_signed_alert() {
    let dir = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let hook = format!("http://{}/alerts", listener.local_addr().unwrap());
    let recv = std::thread::spawn(move || receiver(listener, vec!["500 Oops", "204 No Content"]));

    let mut o = CoordinatorOptions::new(dir.path());
    o.listen = "127.0.0.1:0".parse().unwrap();
    o.admin_listen = "127.0.0.1:0".parse().unwrap();
    o.scan.max_pairs = 10;
    o.scan.max_ports_per_peer = 10;
    o.alerts.webhook_urls = vec![hook];
    o.alerts.secret = Some("hook-secret".into());
    o.alerts.backoff_initial_ms = 50;
    let c = start(o).await.unwrap();
    let yaml = "rules:\n  - {name: web, from: {app: a}, to: {app: b}, ports: [tcp/80]}\n";
    c.admin(AdminOp::PolicyApply(yaml.into()))
        .await
        .unwrap()
        .unwrap();
    let a = join(&c, "a").await;
    let b = join(&c, "b").await;

    // b, the victim, reports 10 inbound denials from a: not more than N.
    b.report_blocks(
        (1..=10)
            .map(|p| denial("a", Direction::Inbound, p))
            .collect(),
    )
    .unwrap();
    // Give the actor the batch, then check nothing happened yet.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!host(&c, "a").await.quarantined);
    // a's own agent reports the 11th distinct pair (outbound).
    a.report_blocks(vec![denial("b", Direction::Outbound, 11)])
        .unwrap();
    let t0 = Instant::now();
    while !host(&c, "a").await.quarantined {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "a was not quarantined"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!host(&c, "b").await.quarantined);

    // The event is in the log.
    let AdminReply::Events(ev) = c
        .admin(AdminOp::Events { limit: 100 })
        .await
        .unwrap()
        .unwrap()
    else {
        panic!()
    };
    let scan: Vec<_> = ev.iter().filter(|e| e.kind == "scan_detected").collect();
    assert_eq!(scan.len(), 1, "{ev:?}");
    assert!(scan[0].detail.starts_with("a ("), "{}", scan[0].detail);
    assert!(scan[0].detail.contains("quarantine"), "{}", scan[0].detail);

    // The webhook: refused once with a 500, then accepted; both signed, same body.
    let got = tokio::task::spawn_blocking(move || recv.join().unwrap())
        .await
        .unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].1, got[1].1, "the retry sends the same alert");
    for (sig, body) in &got {
        assert_eq!(sig, &signature(b"hook-secret", body));
    }
    let alert: ScanAlert = serde_json::from_slice(&got[0].1).unwrap();
    assert_eq!(
        (alert.host.as_str(), alert.action.as_str()),
        ("a", "quarantine")
    );
    assert_eq!(alert.distinct_pairs, 11);
    assert_eq!(alert.top_peer, "b");

    // Release lifts it.
    c.admin(AdminOp::Release("a".into()))
        .await
        .unwrap()
        .unwrap();
    assert!(!host(&c, "a").await.quarantined);
    c.stop().await;
}
