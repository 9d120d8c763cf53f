//! Learning mode over the real coordinator (QUIC control channel, admin HTTP API, SQLite store)
//! with agents from the client library: `POST /v1/policy/mode` puts a label group in learning
//! mode, and the right agents' maps carry `learn = true` for exactly the right peers; the
//! setting survives a restart; a group the policy file declares cannot be ended at runtime.

use std::net::SocketAddr;
use std::time::Duration;

use meshd_agent::{enrol, spawn_session, SessionConfig, SessionHandle, SessionState};
use meshd_control::api::{
    ApiError, EventView, HostView, PolicyModeView, StatusView, TokenCreateRequest,
};
use meshd_control::proto::EndpointReport;
use meshd_control::{JoinToken, NetworkMap};
use meshd_coordinator::{start, AdminOp, CoordinatorHandle, CoordinatorOptions};
use meshd_tunnel::{PrivateKey, PublicKey};

async fn coordinator(dir: &std::path::Path, listen: SocketAddr) -> CoordinatorHandle {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut o = CoordinatorOptions::new(dir);
    o.listen = listen;
    o.admin_listen = "127.0.0.1:0".parse().unwrap();
    start(o).await.unwrap()
}

/// A UDP port on 127.0.0.1 below the ephemeral range, free when asked (so the restarted
/// coordinator can take it again).
fn fixed_port() -> u16 {
    let start = (std::process::id() + 5_000) % 12_000;
    (0..12_000)
        .map(|i| 20_000 + ((start + i) % 12_000) as u16)
        .find(|&p| std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok())
        .expect("a free UDP port in 20000..32000")
}

fn ep() -> EndpointReport {
    EndpointReport {
        addrs: vec![SocketAddr::from(([192, 0, 2, 1], 1))],
        listen_port: Some(51820),
        transparent: false,
    }
}

struct Agent {
    key: PublicKey,
    session: SessionHandle,
}

async fn labelled(c: &CoordinatorHandle, name: &str, app: &str) -> Agent {
    let t = c
        .create_token(TokenCreateRequest {
            labels: [("app".into(), app.into())].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let t = JoinToken::parse(&t.token).unwrap();
    let key = PrivateKey::generate();
    let e = enrol(&t, name, &key, ep()).await.unwrap();
    let session = spawn_session(SessionConfig::new(
        e.coordinator,
        e.coordinator_key,
        key.clone(),
        ep(),
    ));
    let a = Agent {
        key: key.public_key(),
        session,
    };
    wait_connected(&a).await;
    a
}

async fn wait_connected(a: &Agent) {
    let mut rx = a.session.state();
    tokio::time::timeout(
        Duration::from_secs(20),
        rx.wait_for(|s| matches!(s, SessionState::Connected { .. })),
    )
    .await
    .expect("connected in time")
    .unwrap();
}

/// Per peer key of the agent's current map: (learn, has grants).
fn flags(m: &NetworkMap) -> Vec<(PublicKey, bool, bool)> {
    let mut v: Vec<_> = m
        .peers
        .iter()
        .map(|p| (p.public_key, p.grants.learn, !p.grants.is_empty()))
        .collect();
    v.sort_by_key(|x| x.0 .0);
    v
}

/// Waits until the agent's map holds exactly `want` (peer, learn, has grants).
async fn wait_flags(a: &Agent, mut want: Vec<(PublicKey, bool, bool)>) {
    want.sort_by_key(|x| x.0 .0);
    let mut rx = a.session.map();
    let r = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if rx
                .borrow_and_update()
                .as_ref()
                .is_some_and(|m| flags(m) == want)
            {
                return;
            }
            rx.changed().await.unwrap();
        }
    })
    .await;
    if r.is_err() {
        let got = a.session.map().borrow().as_ref().map(flags);
        panic!("map not reached in time: want {want:?}, got {got:?}");
    }
}

async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

const POLICY: &str = "\
rules:
  - name: web-to-db
    from: { app: web }
    to:   { app: db }
    ports: [tcp/5432]
tests:
  - { from: { app: web }, to: { app: db }, port: tcp/5432, expect: allow }
  - { from: { app: legacy }, to: { app: db }, port: tcp/5432, expect: deny }
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learning_group_reaches_the_right_maps_survives_restart_and_file_groups_stay() {
    let dir = tempfile::tempdir().unwrap();
    let listen = SocketAddr::from(([127, 0, 0, 1], fixed_port()));
    let c = coordinator(dir.path(), listen).await;
    let admin = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let admin = admin.trim().to_string();
    c.admin(AdminOp::PolicyApply(POLICY.into()))
        .await
        .unwrap()
        .unwrap();
    let legacy = labelled(&c, "legacy", "legacy").await;
    let web = labelled(&c, "web", "web").await;
    let db = labelled(&c, "db", "db").await;
    let (l, w, d) = (legacy.key, web.key, db.key);
    // Enforcing: only web and db peer, by the rule.
    wait_flags(&web, vec![(d, false, true)]).await;
    wait_flags(&db, vec![(w, false, true)]).await;
    wait_flags(&legacy, vec![]).await;

    // Learning for app=legacy: legacy peers with everyone, learn=true both ways; the rule's
    // pair keeps its grants and no learn flag.
    let h = c.admin_addr();
    let (st, body) = http(
        h,
        "POST",
        "/v1/policy/mode",
        &admin,
        r#"{"mode":"learn","group":{"app":"legacy"}}"#,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let v: PolicyModeView = serde_json::from_str(&body).unwrap();
    assert!(v.changed);
    assert_eq!(v.learning, ["legacy"]);
    wait_flags(&legacy, vec![(w, true, false), (d, true, false)]).await;
    wait_flags(&web, vec![(d, false, true), (l, true, false)]).await;
    wait_flags(&db, vec![(w, false, true), (l, true, false)]).await;

    // Shown: status, hosts, the audit log.
    let (st, body) = http(h, "GET", "/v1/status", &admin, "").await;
    assert_eq!(st, 200, "{body}");
    let s: StatusView = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (s.learning.as_slice(), s.learning_all),
        (&["legacy".to_string()][..], false)
    );
    let (_, body) = http(h, "GET", "/v1/hosts", &admin, "").await;
    let hosts: Vec<HostView> = serde_json::from_str(&body).unwrap();
    let learning: Vec<&str> = hosts
        .iter()
        .filter(|h| h.learning)
        .map(|h| h.name.as_str())
        .collect();
    assert_eq!(learning, ["legacy"]);
    let (_, body) = http(h, "GET", "/v1/events?limit=10", &admin, "").await;
    let events: Vec<EventView> = serde_json::from_str(&body).unwrap();
    let e = events
        .iter()
        .find(|e| e.kind == "policy_mode_changed")
        .expect("an audit event");
    assert_eq!(
        e.detail,
        "learn --group app=legacy: 1 of 3 hosts learning (legacy)"
    );

    // Restart: the runtime setting was committed; a host enrolling afterwards gets legacy as
    // a learning peer, computed by the restarted coordinator.
    c.stop().await;
    let mut restarted = None;
    for _ in 0..50 {
        let mut o = CoordinatorOptions::new(dir.path());
        o.listen = listen;
        o.admin_listen = "127.0.0.1:0".parse().unwrap();
        match start(o).await {
            Ok(c) => {
                restarted = Some(c);
                break;
            }
            Err(e) => {
                eprintln!("restart: {e:#}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let c = restarted.expect("coordinator restarts on its old address within 5 s");
    let h = c.admin_addr();
    let (_, body) = http(h, "GET", "/v1/policy/mode", &admin, "").await;
    let v: PolicyModeView = serde_json::from_str(&body).unwrap();
    assert_eq!(v.learning, ["legacy"], "{body}");
    let db2 = labelled(&c, "db2", "db").await;
    wait_flags(&db2, vec![(w, false, true), (l, true, false)]).await;
    wait_connected(&legacy).await;
    wait_flags(
        &legacy,
        vec![(w, true, false), (d, true, false), (db2.key, true, false)],
    )
    .await;

    // A group the file declares cannot be ended at runtime: 409, the file is named.
    let with_file = format!("learn:\n  - {{ app: web }}\n{POLICY}");
    c.admin(AdminOp::PolicyApply(with_file))
        .await
        .unwrap()
        .unwrap();
    let (st, body) = http(
        h,
        "POST",
        "/v1/policy/mode",
        &admin,
        r#"{"mode":"enforce","group":{"app":"web"}}"#,
    )
    .await;
    assert_eq!(st, 409, "{body}");
    let e: ApiError = serde_json::from_str(&body).unwrap();
    assert!(e.message.contains("policy file"), "{e:?}");
    // Ending the runtime group: legacy keeps only web (which learns by the file).
    let (st, body) = http(
        h,
        "POST",
        "/v1/policy/mode",
        &admin,
        r#"{"mode":"enforce","group":{"app":"legacy"}}"#,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    wait_flags(&legacy, vec![(w, true, false)]).await;
    wait_connected(&db).await;
    wait_flags(&db, vec![(w, true, true)]).await;
    // A bad request is refused without a change.
    let (st, body) = http(
        h,
        "POST",
        "/v1/policy/mode",
        &admin,
        r#"{"mode":"learn","group":{}}"#,
    )
    .await;
    assert_eq!(st, 400, "{body}");
    c.stop().await;
}
