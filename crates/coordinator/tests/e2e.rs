//! In-process coordinator on 127.0.0.1 with agents using the client library.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshd_agent::{
    self as client, enrol, spawn_session, ClientError, SessionConfig, SessionHandle, SessionState,
};
use meshd_control::api::{EventView, HostView, TokenCreateRequest};
use meshd_control::proto::{
    AgentMessage, CoordinatorMessage, EndpointReport, ErrorCode, MAX_AGENT_FRAME,
    MAX_COORDINATOR_FRAME, PROTOCOL_VERSION,
};
use meshd_control::{JoinToken, NetworkMap, TokenSecret};
use meshd_coordinator::{start, AdminOp, AdminReply, CoordinatorHandle, CoordinatorOptions};
use meshd_tunnel::{PrivateKey, PublicKey};

async fn coordinator(dir: &std::path::Path, listen: SocketAddr) -> CoordinatorHandle {
    coordinator_with(dir, listen, |_| {}).await
}

async fn coordinator_with(
    dir: &std::path::Path,
    listen: SocketAddr,
    tweak: impl FnOnce(&mut CoordinatorOptions),
) -> CoordinatorHandle {
    // The state directory must be private (tempdir makes it 0755).
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut o = CoordinatorOptions::new(dir);
    o.listen = listen;
    o.admin_listen = "127.0.0.1:0".parse().unwrap();
    tweak(&mut o);
    start(o).await.unwrap()
}

/// A UDP port on 127.0.0.1 below the ephemeral range (32768 and up), free when asked; the
/// start depends on the process id so parallel test binaries rarely probe the same ports.
fn fixed_port() -> u16 {
    let start = std::process::id() % 12_000;
    (0..12_000)
        .map(|i| 20_000 + ((start + i) % 12_000) as u16)
        .find(|&p| std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok())
        .expect("a free UDP port in 20000..32000")
}

/// Every host may reach every host (the tests below that are not about policy).
async fn allow_all(c: &CoordinatorHandle) {
    let yaml = "rules:\n  - {name: all, from: {}, to: {}, ports: [any]}\n";
    c.admin(AdminOp::PolicyApply(yaml.into()))
        .await
        .unwrap()
        .unwrap();
}

fn ep(port: u16) -> EndpointReport {
    EndpointReport {
        addrs: vec![SocketAddr::from(([192, 0, 2, 1], port))],
        listen_port: Some(51820),
        transparent: false,
    }
}

async fn token(c: &CoordinatorHandle, req: TokenCreateRequest) -> JoinToken {
    JoinToken::parse(&c.create_token(req).await.unwrap().token).unwrap()
}

struct Agent {
    key: PrivateKey,
    session: SessionHandle,
}

async fn join(c: &CoordinatorHandle, t: &JoinToken, name: &str) -> Agent {
    let key = PrivateKey::generate();
    let e = enrol(t, name, &key, ep(1)).await.unwrap();
    assert_eq!(e.coordinator_key, c.public_key());
    let session = spawn_session(SessionConfig::new(
        e.coordinator,
        e.coordinator_key,
        key.clone(),
        ep(1),
    ));
    Agent { key, session }
}

/// Knocks (SPA) as admin from `ep_`'s socket, as meshctl would, so raw QUIC from it reaches
/// the coordinator.
fn knock_admin(ep_: &client::ClientEndpoint, dir: &std::path::Path, c: &CoordinatorHandle) {
    let token = std::fs::read_to_string(dir.join("admin.token")).unwrap();
    let hash = meshd_control::token::hash_secret(token.trim().as_bytes());
    ep_.knock(
        c.control_addr(),
        &c.public_key(),
        &PrivateKey::generate(),
        client::KnockAs::Admin(&hash),
    )
    .unwrap();
}

/// A raw control connection from `ep_` with `key`, past the Noise handshake (for speaking
/// the protocol by hand).
async fn raw_channel(
    ep_: &client::ClientEndpoint,
    dir: &std::path::Path,
    c: &CoordinatorHandle,
    key: &PrivateKey,
) -> (
    quinn::Connection,
    meshd_channel::noise::NoiseReader,
    meshd_channel::noise::NoiseWriter,
) {
    knock_admin(ep_, dir, c);
    let conn = ep_.connect(c.control_addr(), "x").unwrap().await.unwrap();
    let (s, r) = conn.open_bi().await.unwrap();
    let (reader, writer) = meshd_channel::noise::initiate(
        s,
        r,
        key,
        &c.public_key(),
        MAX_AGENT_FRAME,
        MAX_COORDINATOR_FRAME,
    )
    .await
    .unwrap();
    (conn, reader, writer)
}

/// Waits until `f(map)` holds, returning the time it took.
async fn wait_map(a: &Agent, f: impl Fn(&NetworkMap) -> bool) -> Duration {
    let t0 = Instant::now();
    let mut rx = a.session.map();
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if rx.borrow_and_update().as_ref().is_some_and(&f) {
                return;
            }
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("map condition not reached in time");
    t0.elapsed()
}

async fn wait_state(a: &Agent, f: impl Fn(&SessionState) -> bool) {
    let mut rx = a.session.state();
    tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|s| f(s)))
        .await
        .expect("state not reached")
        .unwrap();
}

fn has_endpoint(m: &NetworkMap, k: &PublicKey, e: SocketAddr) -> bool {
    m.peer(k).is_some_and(|p| p.endpoints.contains(&e))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_endpoint_change_and_removal() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    allow_all(&c).await;
    let t = token(
        &c,
        TokenCreateRequest {
            labels: [("env".into(), "prod".into())].into(),
            ttl_secs: Some(3600),
            uses: Some(3),
        },
    )
    .await;
    let mut agents = Vec::new();
    for n in ["a", "b", "c"] {
        agents.push(join(&c, &t, n).await);
    }
    for a in &agents {
        wait_map(a, |m| m.peers.len() == 2).await;
        let m = a.session.map().borrow().clone().unwrap();
        assert!(m.peer(&a.key.public_key()).is_none());
        assert!(m
            .peers
            .iter()
            .all(|p| p.labels.get("env").map(String::as_str) == Some("prod")));
        assert!(
            m.peers
                .iter()
                .all(|p| p.endpoints.contains(&"127.0.0.1:51820".parse().unwrap())),
            "observed endpoint first: {m:?}"
        );
    }
    // C's endpoints change: A and B get the delta quickly.
    let ck = agents[2].key.public_key();
    let new_ep: SocketAddr = "198.51.100.9:51820".parse().unwrap();
    let t0 = Instant::now();
    agents[2].session.report_endpoints(vec![new_ep]);
    let (da, db) = tokio::join!(
        wait_map(&agents[0], |m| has_endpoint(m, &ck, new_ep)),
        wait_map(&agents[1], |m| has_endpoint(m, &ck, new_ep)),
    );
    let total = t0.elapsed();
    println!("endpoint change propagated to peers in {total:?} (a {da:?}, b {db:?})");
    assert!(total < Duration::from_secs(1), "{total:?}");

    // Acks arrive.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let Ok(AdminReply::Status(s)) = c.admin(AdminOp::Status).await.unwrap() else {
        panic!()
    };
    assert_eq!(s.connected.len(), 3);
    assert!(
        s.connected
            .iter()
            .all(|a| a.acked_version == a.sent_version && a.sent_version > 0),
        "{s:?}"
    );

    // Remove C: it disappears from A and B; C's session is refused for good.
    let Ok(AdminReply::Host(h)) = c.admin(AdminOp::Remove("c".into())).await.unwrap() else {
        panic!()
    };
    assert_eq!(h.public_key, ck);
    wait_map(&agents[0], |m| m.peer(&ck).is_none() && m.peers.len() == 1).await;
    wait_map(&agents[1], |m| m.peer(&ck).is_none() && m.peers.len() == 1).await;
    wait_state(&agents[2], |s| {
        matches!(
            s,
            SessionState::Refused {
                code: ErrorCode::HostRemoved,
                ..
            }
        )
    })
    .await;
    c.stop().await;
}

/// SPA off: with it on, a knock with an unknown, expired, revoked or used-up token is refused
/// and the enrolment only times out (a dark port says nothing); this is the layer behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_refusals_are_distinct() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator_with(dir.path(), "127.0.0.1:0".parse().unwrap(), |o| {
        o.spa.enabled = false
    })
    .await;
    let expired = token(
        &c,
        TokenCreateRequest {
            ttl_secs: Some(0),
            ..Default::default()
        },
    )
    .await;
    let revoked = c.create_token(TokenCreateRequest::default()).await.unwrap();
    c.admin(AdminOp::RevokeToken(revoked.info.id))
        .await
        .unwrap()
        .unwrap();
    let revoked = JoinToken::parse(&revoked.token).unwrap();
    let once = token(
        &c,
        TokenCreateRequest {
            uses: Some(1),
            ..Default::default()
        },
    )
    .await;
    let mut unknown = once.clone();
    unknown.secret = TokenSecret([0x55; 32]);
    let code = |r: Result<client::Enrolment, ClientError>| match r {
        Err(ClientError::Refused { code, .. }) => code,
        other => panic!("expected refusal, got {other:?}"),
    };
    let k = || PrivateKey::generate();
    assert_eq!(
        code(enrol(&unknown, "x", &k(), ep(1)).await),
        ErrorCode::TokenUnknown
    );
    assert_eq!(
        code(enrol(&expired, "x", &k(), ep(1)).await),
        ErrorCode::TokenExpired
    );
    assert_eq!(
        code(enrol(&revoked, "x", &k(), ep(1)).await),
        ErrorCode::TokenRevoked
    );
    enrol(&once, "x", &k(), ep(1)).await.unwrap();
    assert_eq!(
        code(enrol(&once, "y", &k(), ep(1)).await),
        ErrorCode::TokenUsedUp
    );
    // Wrong pinned coordinator key: the Noise handshake fails.
    let mut wrong = once.clone();
    wrong.coordinator_key = PrivateKey::generate().public_key();
    assert!(matches!(
        enrol(&wrong, "z", &k(), ep(1)).await,
        Err(ClientError::Handshake(_) | ClientError::Connection(_) | ClientError::Timeout)
    ));
    // Resume of an unknown key.
    let s = spawn_session(SessionConfig::new(
        c.control_addr(),
        c.public_key(),
        k(),
        ep(1),
    ));
    let mut st = s.state();
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        st.wait_for(|s| matches!(s, SessionState::Refused { .. })),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    assert!(matches!(
        r,
        SessionState::Refused {
            code: ErrorCode::UnknownHost,
            ..
        }
    ));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_frames_only_hurt_their_sender() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    allow_all(&c).await;
    let t = token(&c, TokenCreateRequest::default()).await;
    let a = join(&c, &t, "a").await;
    let b = join(&c, &t, "b").await;
    wait_map(&a, |m| m.peers.len() == 1).await;
    wait_map(&b, |m| m.peers.len() == 1).await;

    // Raw clients: garbage before the handshake, an oversized frame, and malformed JSON.
    let ep_ = client::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    knock_admin(&ep_, dir.path(), &c);
    {
        let conn = ep_.connect(c.control_addr(), "x").unwrap().await.unwrap();
        let (mut s, _r) = conn.open_bi().await.unwrap();
        s.write_all(&[0xff; 5000]).await.unwrap();
        let _ = s.finish();
        let e = tokio::time::timeout(Duration::from_secs(15), conn.closed())
            .await
            .expect("coordinator closes a garbage handshake");
        println!("garbage handshake closed: {e}");
    }
    for payload in [
        (u32::try_from(MAX_AGENT_FRAME).unwrap() + 1)
            .to_be_bytes()
            .to_vec(),
        [&[0, 0, 0, 5][..], b"{nope"].concat(),
    ] {
        // Enrolled agent key speaking garbage after a valid handshake and hello.
        let rogue = PrivateKey::generate();
        let (_conn, mut reader, mut writer) = raw_channel(&ep_, dir.path(), &c, &rogue).await;
        writer
            .send(&AgentMessage::Enrol {
                protocol: PROTOCOL_VERSION,
                secret: t.secret.clone(),
                name: "rogue".into(),
                endpoints: ep(9),
            })
            .await
            .unwrap();
        assert!(matches!(
            reader.recv::<CoordinatorMessage>().await.unwrap(),
            CoordinatorMessage::Welcome { .. }
        ));
        writer.send_raw(&payload).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match reader.recv::<CoordinatorMessage>().await {
                    Ok(CoordinatorMessage::Error { code, .. }) => break Some(code),
                    Ok(_) => continue,
                    Err(_) => break None,
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(got, Some(ErrorCode::Malformed));
    }
    // The others are unaffected: a change from A still reaches B.
    let e: SocketAddr = "203.0.113.5:51820".parse().unwrap();
    a.session.report_endpoints(vec![e]);
    let ak = a.key.public_key();
    let d = wait_map(&b, |m| has_endpoint(m, &ak, e)).await;
    assert!(d < Duration::from_secs(1));
    assert!(matches!(
        *a.session.state().borrow(),
        SessionState::Connected { .. }
    ));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_state_and_agents_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    // Below the ephemeral range: while the coordinator is down, no socket bound to port 0
    // (the agents', other tests') can be given its port.
    let c = coordinator(dir.path(), SocketAddr::from(([127, 0, 0, 1], fixed_port()))).await;
    // Applied once: the policy survives the restart below.
    allow_all(&c).await;
    let addr = c.control_addr();
    let key = c.public_key();
    let t = token(
        &c,
        TokenCreateRequest {
            labels: [("app".into(), "db".into())].into(),
            uses: Some(5),
            ..Default::default()
        },
    )
    .await;
    let a = join(&c, &t, "a").await;
    let b = join(&c, &t, "b").await;
    wait_map(&a, |m| m.peers.len() == 1).await;
    c.admin(AdminOp::Label(
        "b".into(),
        [("tier".into(), "1".into())].into(),
    ))
    .await
    .unwrap()
    .unwrap();
    wait_map(&a, |m| m.peers[0].labels.contains_key("tier")).await;
    c.stop().await;
    // Down: agents keep their last map (fail-static) and try to reconnect.
    wait_state(&a, |s| matches!(s, SessionState::Connecting { .. })).await;
    assert_eq!(a.session.map().borrow().as_ref().unwrap().peers.len(), 1);

    // The old endpoint's socket closes when its driver task ends, just after stop().
    let mut restarted = None;
    for _ in 0..50 {
        let mut o = CoordinatorOptions::new(dir.path());
        o.listen = addr;
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
    assert_eq!(c.public_key(), key, "key persisted");
    for x in [&a, &b] {
        wait_state(x, |s| matches!(s, SessionState::Connected { .. })).await;
    }
    wait_map(&a, |m| {
        m.peers.len() == 1 && m.peers[0].labels.get("tier").map(String::as_str) == Some("1")
    })
    .await;
    let Ok(AdminReply::Hosts(hosts)) = c.admin(AdminOp::ListHosts).await.unwrap() else {
        panic!()
    };
    let names: Vec<&str> = hosts.iter().map(|h: &HostView| h.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert!(hosts
        .iter()
        .all(|h| h.labels.get("app").map(String::as_str) == Some("db")));
    let Ok(AdminReply::Tokens(toks)) = c.admin(AdminOp::ListTokens).await.unwrap() else {
        panic!()
    };
    assert_eq!(toks.len(), 1);
    assert_eq!(toks[0].uses_left, Some(3));
    // The token still works after the restart.
    let d = join(&c, &t, "d").await;
    wait_map(&d, |m| m.peers.len() == 2).await;
    wait_map(&a, |m| m.peers.len() == 2).await;
    c.stop().await;
}

async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    http_ct(addr, method, path, token, body, "application/json").await
}

async fn http_ct(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
    content_type: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    if let Some(t) = token {
        req += &format!("Authorization: Bearer {t}\r\n");
    }
    let body = body.unwrap_or("");
    req += &format!(
        "Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_http_api() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let admin = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let admin = admin.trim();
    use std::os::unix::fs::PermissionsExt;
    for f in ["admin.token", "coordinator.key"] {
        let mode = std::fs::metadata(dir.path().join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    let a = c.admin_addr();
    assert_eq!(http(a, "GET", "/v1/hosts", None, None).await.0, 401);
    assert_eq!(
        http(a, "GET", "/v1/hosts", Some("meshadm-wrong"), None)
            .await
            .0,
        401
    );
    let (st, body) = http(
        a,
        "POST",
        "/v1/tokens",
        Some(admin),
        Some(r#"{"labels":{"app":"web"},"ttl_secs":3600,"uses":2}"#),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    let created: meshd_control::api::TokenCreated = serde_json::from_str(&body).unwrap();
    let t = JoinToken::parse(&created.token).unwrap();
    assert_eq!(t.control, c.control_addr());
    let agent = join(&c, &t, "web1").await;
    wait_state(&agent, |s| matches!(s, SessionState::Connected { .. })).await;
    let (st, body) = http(a, "GET", "/v1/hosts", Some(admin), None).await;
    assert_eq!(st, 200);
    let hosts: Vec<HostView> = serde_json::from_str(&body).unwrap();
    assert_eq!(hosts.len(), 1);
    assert!(hosts[0].connected);
    assert_eq!(hosts[0].addresses[0].to_string(), "100.64.0.2");
    let (st, _) = http(
        a,
        "POST",
        "/v1/hosts/web1/labels",
        Some(admin),
        Some(r#"{"labels":{"env":"prod"}}"#),
    )
    .await;
    assert_eq!(st, 200);
    let (st, _) = http(
        a,
        "POST",
        "/v1/hosts/web1/unlabel",
        Some(admin),
        Some(r#"{"keys":["app"]}"#),
    )
    .await;
    assert_eq!(st, 200);
    let (st, body) = http(
        a,
        "POST",
        "/v1/hosts/web1/rename",
        Some(admin),
        Some(r#"{"name":"web-1"}"#),
    )
    .await;
    assert_eq!(st, 200);
    let h: HostView = serde_json::from_str(&body).unwrap();
    assert_eq!(h.name, "web-1");
    assert_eq!(h.labels, [("env".to_string(), "prod".to_string())].into());
    assert_eq!(
        http(a, "GET", "/v1/hosts/nope", Some(admin), None).await.0,
        404
    );
    assert_eq!(
        http(
            a,
            "POST",
            "/v1/hosts/web-1/rename",
            Some(admin),
            Some(r#"{"name":"bad name"}"#)
        )
        .await
        .0,
        400
    );
    let (st, body) = http(a, "GET", "/v1/tokens", Some(admin), None).await;
    assert_eq!(st, 200, "{body}");
    assert!(body.contains("\"uses_left\":1"), "{body}");
    assert_eq!(
        http(
            a,
            "DELETE",
            &format!("/v1/tokens/{}", created.info.id),
            Some(admin),
            None
        )
        .await
        .0,
        200
    );
    let (st, body) = http(a, "GET", "/v1/status", Some(admin), None).await;
    assert_eq!(st, 200);
    let s: meshd_control::api::StatusView = serde_json::from_str(&body).unwrap();
    assert_eq!(s.hosts, 1);
    assert_eq!(s.connected.len(), 1);
    assert_eq!(
        http(a, "DELETE", "/v1/hosts/web-1", Some(admin), None)
            .await
            .0,
        200
    );
    c.stop().await;
}

const POLICY: &str = "\
rules:
  - name: app-to-db
    from: { app: app }
    to:   { app: db }
    ports: [tcp/5432]
tests:
  - { from: a, to: b, port: tcp/5432, expect: allow }
  - { from: { app: web }, to: { app: db }, port: tcp/5432, expect: deny }
";

async fn labelled(c: &CoordinatorHandle, name: &str, app: &str) -> Agent {
    let t = token(
        c,
        TokenCreateRequest {
            labels: [("app".into(), app.into())].into(),
            ..Default::default()
        },
    )
    .await;
    let a = join(c, &t, name).await;
    wait_state(&a, |s| matches!(s, SessionState::Connected { .. })).await;
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_quarantine_revoke_and_blocks() {
    use meshd_control::api::{ApiError, PolicyApplied, PolicyCheck, PolicyCurrent};
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let admin = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let admin = Some(admin.trim());
    let h = c.admin_addr();
    let a = labelled(&c, "a", "app").await;
    let b = labelled(&c, "b", "db").await;
    let w = labelled(&c, "w", "web").await;
    // No policy yet: default deny, empty maps.
    for x in [&a, &b, &w] {
        wait_map(x, |m| m.peers.is_empty()).await;
    }
    let (st, body) = http(h, "GET", "/v1/policy", admin, None).await;
    assert_eq!(st, 200);
    let cur: PolicyCurrent = serde_json::from_str(&body).unwrap();
    assert!(cur.policy.is_none());

    // Refused: does not parse (line and column), then a failing test.
    let (st, body) = http_ct(
        h,
        "PUT",
        "/v1/policy",
        admin,
        Some("rules:\n  - name: x\n    form: {}\n"),
        "text/yaml",
    )
    .await;
    assert_eq!(st, 400, "{body}");
    let e: ApiError = serde_json::from_str(&body).unwrap();
    assert_eq!(e.code, "policy_parse");
    assert!(e.failures[0].starts_with("line 3, column 5"), "{e:?}");
    let failing = POLICY.replace("expect: deny", "expect: allow");
    let (st, body) = http_ct(h, "PUT", "/v1/policy", admin, Some(&failing), "text/yaml").await;
    assert_eq!(st, 400, "{body}");
    let e: ApiError = serde_json::from_str(&body).unwrap();
    assert_eq!(e.code, "policy_tests_failed");
    assert_eq!(e.failures.len(), 1, "{e:?}");
    // check: 200 with the outcome; diff: the pair that gains access.
    let (st, body) = http_ct(
        h,
        "POST",
        "/v1/policy/check",
        admin,
        Some(&failing),
        "text/yaml",
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let chk: PolicyCheck = serde_json::from_str(&body).unwrap();
    assert!(!chk.ok && chk.tests[0].passed());
    let req = serde_json::json!({ "yaml": POLICY }).to_string();
    let (st, body) = http(h, "POST", "/v1/policy/diff", admin, Some(&req)).await;
    assert_eq!(st, 200, "{body}");
    let changes: Vec<meshd_policy::Change> = serde_json::from_str(&body).unwrap();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].to_string(), "+ a -> b tcp/5432");

    // Apply (JSON body): a and b learn each other with grants; w learns nobody.
    let t0 = Instant::now();
    let (st, body) = http(h, "PUT", "/v1/policy", admin, Some(&req)).await;
    assert_eq!(st, 200, "{body}");
    let applied: PolicyApplied = serde_json::from_str(&body).unwrap();
    assert_eq!(applied.version, 1);
    let (bk, ak) = (b.key.public_key(), a.key.public_key());
    wait_map(&a, |m| {
        m.peers.len() == 1 && m.peer(&bk).is_some_and(|p| !p.grants.outbound.is_empty())
    })
    .await;
    wait_map(&b, |m| {
        m.peers.len() == 1 && m.peer(&ak).is_some_and(|p| !p.grants.inbound.is_empty())
    })
    .await;
    println!("policy applied and pushed in {:?}", t0.elapsed());
    assert!(w.session.map().borrow().as_ref().unwrap().peers.is_empty());
    let ex = serde_json::json!({"from": "a", "to": "b", "port": "tcp/5432"}).to_string();
    let (st, body) = http(h, "POST", "/v1/policy/explain", admin, Some(&ex)).await;
    assert_eq!(st, 200, "{body}");
    let e: meshd_policy::Explanation = serde_json::from_str(&body).unwrap();
    assert!(e.allowed && e.rule.as_deref() == Some("app-to-db"));
    let ex = serde_json::json!({"from": "w", "to": "b", "port": "tcp/5432"}).to_string();
    let (_, body) = http(h, "POST", "/v1/policy/explain", admin, Some(&ex)).await;
    assert!(
        !serde_json::from_str::<meshd_policy::Explanation>(&body)
            .unwrap()
            .allowed
    );

    // A label change moves w into the allowed set.
    c.admin(AdminOp::Label(
        "w".into(),
        [("app".into(), "app".into())].into(),
    ))
    .await
    .unwrap()
    .unwrap();
    wait_map(&w, |m| m.peer(&bk).is_some()).await;
    wait_map(&b, |m| m.peers.len() == 2).await;

    // Quarantine a: cut off from everyone within 1 s; release brings it back.
    let t0 = Instant::now();
    let (st, _) = http(h, "POST", "/v1/hosts/a/quarantine", admin, None).await;
    assert_eq!(st, 200);
    let (da, db) = tokio::join!(
        wait_map(&a, |m| m.peers.is_empty()),
        wait_map(&b, |m| m.peer(&ak).is_none()),
    );
    let took = t0.elapsed();
    println!("quarantine took effect in {took:?} (a {da:?}, b {db:?})");
    assert!(took < Duration::from_secs(1), "{took:?}");
    let (st, _) = http(h, "POST", "/v1/hosts/a/release", admin, None).await;
    assert_eq!(st, 200);
    wait_map(&a, |m| m.peer(&bk).is_some()).await;

    // History and rollback (to deny-all by applying an empty policy first).
    let (st, _) = http_ct(
        h,
        "PUT",
        "/v1/policy",
        admin,
        Some("rules: []\n"),
        "text/yaml",
    )
    .await;
    assert_eq!(st, 200);
    wait_map(&a, |m| m.peers.is_empty()).await;
    let (st, body) = http(h, "POST", "/v1/policy/rollback/1", admin, None).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<PolicyApplied>(&body)
            .unwrap()
            .version,
        3
    );
    wait_map(&a, |m| m.peer(&bk).is_some()).await;
    let (st, body) = http(h, "GET", "/v1/policy/history", admin, None).await;
    assert_eq!(st, 200);
    let hist: Vec<meshd_control::policy::PolicyRecord> = serde_json::from_str(&body).unwrap();
    assert_eq!(hist.len(), 3);
    assert_eq!(hist[2].comment, "rollback to 1");
    assert_eq!(
        http(h, "POST", "/v1/policy/rollback/9", admin, None)
            .await
            .0,
        404
    );

    // Blocks reported by an agent show up, named by the sender.
    let ev = meshd_policy::BlockEvent {
        at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
        host: "whoever".into(),
        host_labels: Default::default(),
        peer: "w".into(),
        peer_labels: Default::default(),
        direction: meshd_policy::Direction::Inbound,
        proto: 6,
        src: "100.64.0.4:40000".parse().unwrap(),
        dst: "100.64.0.3:5432".parse().unwrap(),
        reason: meshd_policy::DenyReason::DefaultDeny,
        count: 1,
    };
    b.session.report_blocks(vec![ev; 100]).unwrap();
    let t0 = Instant::now();
    let blocks = loop {
        let (st, body) = http(h, "GET", "/v1/blocks?host=b&since=600", admin, None).await;
        assert_eq!(st, 200, "{body}");
        let v: Vec<meshd_policy::BlockEvent> = serde_json::from_str(&body).unwrap();
        if v.len() == 100 || t0.elapsed() > Duration::from_secs(10) {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(blocks.len(), 100, "two messages of at most 64");
    assert!(blocks.iter().all(|e| e.host == "b"));
    let (_, body) = http(h, "GET", "/v1/blocks?host=a", admin, None).await;
    assert_eq!(body, "[]");

    // Revoke b: its session is refused with a distinct code, and so is its key with a new token.
    let (st, _) = http(h, "POST", "/v1/hosts/b/revoke", admin, None).await;
    assert_eq!(st, 200);
    wait_state(&b, |s| {
        matches!(
            s,
            SessionState::Refused {
                code: ErrorCode::HostRevoked,
                ..
            }
        )
    })
    .await;
    wait_map(&a, |m| m.peers.is_empty()).await;
    let t = token(&c, TokenCreateRequest::default()).await;
    match enrol(&t, "b-again", &b.key, ep(1)).await {
        Err(ClientError::Refused { code, .. }) => assert_eq!(code, ErrorCode::HostRevoked),
        other => panic!("{other:?}"),
    }
    // Policy, quarantine state and blocks survive a restart.
    let addr = c.control_addr();
    c.stop().await;
    let c = coordinator(dir.path(), addr).await;
    let Ok(AdminReply::Json(v)) = c.admin(AdminOp::PolicyGet).await.unwrap() else {
        panic!()
    };
    let cur: PolicyCurrent = serde_json::from_value(v).unwrap();
    assert_eq!(cur.policy.unwrap().version, 3);
    let Ok(AdminReply::Json(v)) = c.admin(AdminOp::Blocks(Default::default())).await.unwrap()
    else {
        panic!()
    };
    assert_eq!(v.as_array().unwrap().len(), 100);
    c.stop().await;
}

/// `GET /v1/events` with the admin token: the parsed events, oldest first.
async fn events(c: &CoordinatorHandle, admin: &str, query: &str) -> Vec<EventView> {
    let (st, body) = http(
        c.admin_addr(),
        "GET",
        &format!("/v1/events{query}"),
        Some(admin),
        None,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn names_key(e: &EventView, key: &PublicKey) -> bool {
    e.kind == "duplicate_connection" && e.detail.contains(&key.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_connection_is_refused_logged_and_listed() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let admin = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let admin = admin.trim();
    allow_all(&c).await;
    let t = token(&c, TokenCreateRequest::default()).await;
    let a = join(&c, &t, "a").await;
    wait_state(&a, |s| matches!(s, SessionState::Connected { .. })).await;
    let ak = a.key.public_key();
    // The enrolment connection (maybe still open here) did not count as a duplicate.
    let all = events(&c, admin, "").await;
    assert!(!all.iter().any(|e| names_key(e, &ak)), "{all:?}");

    // A second session with A's key: the coordinator refuses it with AlreadyConnected. The
    // code is retryable (the old connection may be a dead one not yet timed out), so the
    // session keeps trying with backoff and reports the refusal as its last error.
    let dup = Agent {
        key: a.key.clone(),
        session: spawn_session(SessionConfig::new(
            c.control_addr(),
            c.public_key(),
            a.key.clone(),
            ep(2),
        )),
    };
    let refused = ErrorCode::AlreadyConnected.to_string();
    wait_state(&dup, |s| {
        matches!(s, SessionState::Connecting { last_error: Some(e), .. } if e.contains(&refused))
    })
    .await;
    // The same on the wire: the exact code.
    {
        let ep_ = client::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
        let (_conn, mut reader, mut writer) = raw_channel(&ep_, dir.path(), &c, &a.key).await;
        writer
            .send(&AgentMessage::Resume {
                protocol: PROTOCOL_VERSION,
                endpoints: ep(3),
            })
            .await
            .unwrap();
        let reply =
            tokio::time::timeout(Duration::from_secs(5), reader.recv::<CoordinatorMessage>())
                .await
                .unwrap()
                .unwrap();
        assert!(
            matches!(
                reply,
                CoordinatorMessage::Error {
                    code: ErrorCode::AlreadyConnected,
                    ..
                }
            ),
            "{reply:?}"
        );
    }
    dup.session.shutdown().await;

    // The first session is untouched: still connected, and it still follows the map.
    assert!(matches!(
        *a.session.state().borrow(),
        SessionState::Connected { .. }
    ));
    let b = join(&c, &t, "b").await;
    let bk = b.key.public_key();
    wait_map(&a, |m| m.peer(&bk).is_some()).await;
    assert!(matches!(
        *a.session.state().borrow(),
        SessionState::Connected { .. }
    ));

    // The admin API lists the refusals, naming the key, oldest first.
    let all = events(&c, admin, "").await;
    let dups: Vec<&EventView> = all.iter().filter(|e| names_key(e, &ak)).collect();
    assert!(dups.len() >= 2, "session and raw refusals: {all:?}");
    assert_eq!(all[0].kind, "policy_applied", "{all:?}");
    assert!(all.windows(2).all(|w| w[0].at <= w[1].at), "{all:?}");
    let last = events(&c, admin, "?limit=1").await;
    assert_eq!(last.as_slice(), &all[all.len() - 1..]);
    let Ok(AdminReply::Events(same)) = c.admin(AdminOp::Events { limit: 5000 }).await.unwrap()
    else {
        panic!()
    };
    assert_eq!(same, all, "capped, not refused; same as over HTTP");
    let a_ = c.admin_addr();
    assert_eq!(http(a_, "GET", "/v1/events", None, None).await.0, 401);
    let (st, body) = http(a_, "GET", "/v1/events?limit=ten", Some(admin), None).await;
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("bad_request"), "{body}");
    drop((a, b));
    c.stop().await;

    // After a restart the events come from the database.
    let c = coordinator(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let again = events(&c, admin, "").await;
    assert_eq!(again, all);
    c.stop().await;
}

/// The enrolment connection does not block the resume that follows it, even when its close
/// has not reached the coordinator yet (here it is never closed): the resume supersedes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_supersedes_an_open_enrolment_connection() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let admin = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let admin = admin.trim();
    allow_all(&c).await;
    let t = token(&c, TokenCreateRequest::default()).await;
    let key = PrivateKey::generate();
    let ep_ = client::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    let (conn, mut reader, mut writer) = raw_channel(&ep_, dir.path(), &c, &key).await;
    writer
        .send(&AgentMessage::Enrol {
            protocol: PROTOCOL_VERSION,
            secret: t.secret.clone(),
            name: "a".into(),
            endpoints: ep(1),
        })
        .await
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), reader.recv::<CoordinatorMessage>())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(reply, CoordinatorMessage::Welcome { .. }),
        "{reply:?}"
    );

    let a = Agent {
        key: key.clone(),
        session: spawn_session(SessionConfig::new(
            c.control_addr(),
            c.public_key(),
            key.clone(),
            ep(1),
        )),
    };
    wait_state(&a, |s| matches!(s, SessionState::Connected { .. })).await;
    let ak = key.public_key();
    let all = events(&c, admin, "").await;
    assert!(!all.iter().any(|e| names_key(e, &ak)), "{all:?}");
    // The coordinator closed the superseded enrolment connection.
    tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .unwrap();
    drop(a);
    c.stop().await;
}

/// A UDP relay on 127.0.0.1 to `to` that drops the first `drop_first` datagrams from the
/// client (one client: the first sender), relays everything else both ways. The coordinator
/// sees the relay's address for knocks and QUIC alike.
async fn lossy_relay(
    to: SocketAddr,
    drop_first: usize,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    back.connect(to).await.unwrap();
    let addr = front.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut a, mut b) = (vec![0u8; 65_536], vec![0u8; 65_536]);
        let mut client = None;
        let mut dropped = 0;
        loop {
            tokio::select! {
                r = front.recv_from(&mut a) => {
                    let Ok((n, from)) = r else { return };
                    client.get_or_insert(from);
                    if dropped < drop_first {
                        dropped += 1;
                        continue;
                    }
                    let _ = back.send(&a[..n]).await;
                }
                r = back.recv(&mut b) => {
                    let Ok(n) = r else { return };
                    if let Some(c) = client {
                        let _ = front.send_to(&b[..n], c).await;
                    }
                }
            }
        }
    });
    (addr, task)
}

#[tokio::test]
async fn a_lost_knock_is_sent_again_and_the_enrolment_goes_through() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let mut t = token(&c, TokenCreateRequest::default()).await;
    // The first datagram the agent sends is its knock: the relay loses it, so the QUIC
    // handshake that follows is a stranger's to the SPA filter until a knock gets through.
    let (relay, task) = lossy_relay(c.control_addr(), 1).await;
    t.control = relay;
    let started = Instant::now();
    let key = PrivateKey::generate();
    let e = tokio::time::timeout(Duration::from_secs(8), enrol(&t, "lossy", &key, ep(1)))
        .await
        .expect("the enrolment did not finish within 8 s: was the knock not sent again?")
        .expect("enrolment");
    assert_eq!(e.host.name, "lossy");
    eprintln!("enrolled through a lost knock in {:?}", started.elapsed());
    task.abort();
    c.stop().await;
}

#[tokio::test]
async fn a_silent_replica_costs_a_fail_over_seconds_not_the_whole_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    allow_all(&c).await;
    let t = token(&c, TokenCreateRequest::default()).await;
    let key = PrivateKey::generate();
    let e = enrol(&t, "h1", &key, ep(1)).await.unwrap();
    // A replica that takes every datagram and never answers (dead behind a firewall that
    // drops, or partitioned), listed first.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut cfg = SessionConfig::new(
        silent.local_addr().unwrap(),
        e.coordinator_key,
        key.clone(),
        ep(1),
    );
    cfg.fallbacks = vec![e.coordinator];
    let started = Instant::now();
    let s = spawn_session(cfg);
    let mut st = s.state();
    tokio::time::timeout(
        Duration::from_secs(9),
        st.wait_for(|s| matches!(s, SessionState::Connected { .. })),
    )
    .await
    .expect(
        "not connected through the second replica within 9 s (the single-address timeout is 10 s)",
    )
    .unwrap();
    eprintln!("on the live replica after {:?}", started.elapsed());
    assert_eq!(s.coordinator(), e.coordinator);
    drop(silent);
    c.stop().await;
}
