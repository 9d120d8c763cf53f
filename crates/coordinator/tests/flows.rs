//! Flow records over the real control channel: agents (raw clients on 127.0.0.1) report
//! flows; they come back from `GET /v1/flows` and `GET /v1/topology`, and survive a restart.

use std::net::SocketAddr;
use std::time::Duration;

use meshd_control::api::{FlowView, TokenCreateRequest, TopologyView};
use meshd_control::flow::{FlowRecord, FlowVerdict, PlaintextFlow};
use meshd_control::proto::{
    AgentMessage, CoordinatorMessage, EndpointReport, MAX_AGENT_FRAME, MAX_COORDINATOR_FRAME,
    PROTOCOL_VERSION,
};
use meshd_control::JoinToken;
use meshd_coordinator::{start, AdminOp, CoordinatorHandle, CoordinatorOptions};
use meshd_policy::Direction;
use meshd_tunnel::{PrivateKey, PublicKey};

async fn coordinator(dir: &std::path::Path) -> CoordinatorHandle {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut o = CoordinatorOptions::new(dir);
    o.listen = "127.0.0.1:0".parse().unwrap();
    o.admin_listen = "127.0.0.1:0".parse().unwrap();
    start(o).await.unwrap()
}

async fn http(addr: SocketAddr, path: &str, token: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n\r\n"
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

/// A raw agent: enrolled over one connection, its session (to send flows) on a second.
struct RawAgent {
    key: PublicKey,
    _conn: quinn::Connection,
    _reader: meshd_channel::noise::NoiseReader,
    writer: meshd_channel::noise::NoiseWriter,
}

async fn raw_agent(
    ep: &meshd_agent::ClientEndpoint,
    c: &CoordinatorHandle,
    t: &JoinToken,
    name: &str,
) -> RawAgent {
    let key = PrivateKey::generate();
    // SPA: knock with the join token first, from the connection's own socket.
    let hash = t.secret.hash();
    ep.knock(
        c.control_addr(),
        &c.public_key(),
        &key,
        meshd_agent::KnockAs::JoinToken(&hash),
    )
    .unwrap();
    let conn = ep.connect(c.control_addr(), "x").unwrap().await.unwrap();
    let (s, r) = conn.open_bi().await.unwrap();
    let (mut reader, mut writer) = meshd_channel::noise::initiate(
        s,
        r,
        &key,
        &c.public_key(),
        MAX_AGENT_FRAME,
        MAX_COORDINATOR_FRAME,
    )
    .await
    .unwrap();
    writer
        .send(&AgentMessage::Enrol {
            protocol: PROTOCOL_VERSION,
            secret: t.secret.clone(),
            name: name.into(),
            endpoints: EndpointReport {
                addrs: vec![SocketAddr::from(([192, 0, 2, 1], 1))],
                listen_port: Some(51820),
                transparent: false,
            },
        })
        .await
        .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(10), reader.recv::<CoordinatorMessage>())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(m, CoordinatorMessage::Welcome { .. }), "{m:?}");
    // As a real agent does: the enrolment connection closes, the session runs on a new one.
    conn.close(quinn::VarInt::from_u32(0), b"enrolled");
    ep.knock(
        c.control_addr(),
        &c.public_key(),
        &key,
        meshd_agent::KnockAs::Host,
    )
    .unwrap();
    let conn = ep.connect(c.control_addr(), "x").unwrap().await.unwrap();
    let (s, r) = conn.open_bi().await.unwrap();
    let (mut reader, mut writer) = meshd_channel::noise::initiate(
        s,
        r,
        &key,
        &c.public_key(),
        MAX_AGENT_FRAME,
        MAX_COORDINATOR_FRAME,
    )
    .await
    .unwrap();
    writer
        .send(&AgentMessage::Resume {
            protocol: PROTOCOL_VERSION,
            endpoints: EndpointReport {
                addrs: vec![SocketAddr::from(([192, 0, 2, 1], 1))],
                listen_port: Some(51820),
                transparent: false,
            },
        })
        .await
        .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(10), reader.recv::<CoordinatorMessage>())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(m, CoordinatorMessage::Welcome { .. }), "{m:?}");
    RawAgent {
        key: key.public_key(),
        _conn: conn,
        _reader: reader,
        writer,
    }
}

async fn labelled_token(c: &CoordinatorHandle, app: &str) -> JoinToken {
    let t = c
        .create_token(TokenCreateRequest {
            labels: [("app".into(), app.into())].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    JoinToken::parse(&t.token).unwrap()
}

fn rec(peer: PublicKey, direction: Direction, packets: u64, at: u64) -> FlowRecord {
    FlowRecord {
        peer,
        direction,
        proto: 6,
        port: 5432,
        packets,
        bytes: packets * 100,
        flows: 1,
        first_seen: at,
        last_seen: at + 3,
        verdict: FlowVerdict::Allowed,
        rule: Some("web-to-db".into()),
    }
}

/// Polls `/v1/flows?...` until it holds `n` rows (bounded: 10 s).
async fn flows_until(c: &CoordinatorHandle, admin: &str, query: &str, n: usize) -> Vec<FlowView> {
    for _ in 0..100 {
        let (st, body) = http(c.admin_addr(), &format!("/v1/flows{query}"), admin).await;
        assert_eq!(st, 200, "{body}");
        let rows: Vec<FlowView> = serde_json::from_str(&body).unwrap();
        if rows.len() >= n {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("fewer than {n} flow rows in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_flows_come_back_from_flows_and_topology_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let admin = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let admin = admin.trim();
    let yaml =
        "rules:\n  - {name: web-to-db, from: {app: web}, to: {app: db}, ports: [tcp/5432]}\n";
    c.admin(AdminOp::PolicyApply(yaml.into()))
        .await
        .unwrap()
        .unwrap();
    let ep = meshd_agent::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    let web = labelled_token(&c, "web").await;
    let db = labelled_token(&c, "db").await;
    let mut w1 = raw_agent(&ep, &c, &web, "w1").await;
    let mut d1 = raw_agent(&ep, &c, &db, "d1").await;
    let now = meshd_coordinator::unix_now();
    let stranger = PrivateKey::generate().public_key();
    // w1 opened to d1 (10 packets as w1 counted them); d1 saw the same flow inbound (9), a
    // plaintext probe from outside, and a record about a key nobody has.
    w1.writer
        .send(&AgentMessage::Flows {
            interval_start: now - 10,
            records: vec![rec(d1.key, Direction::Outbound, 10, now - 8)],
            plaintext: vec![],
            overflow: 0,
        })
        .await
        .unwrap();
    d1.writer
        .send(&AgentMessage::Flows {
            interval_start: now - 10,
            records: vec![
                rec(w1.key, Direction::Inbound, 9, now - 8),
                rec(stranger, Direction::Inbound, 1, now - 8),
            ],
            plaintext: vec![PlaintextFlow {
                src: "198.18.0.9".parse().unwrap(),
                proto: 6,
                port: 22,
                packets: 4,
                first_seen: now - 7,
                last_seen: now - 6,
            }],
            overflow: 2,
        })
        .await
        .unwrap();
    let rows = flows_until(&c, admin, "", 3).await;
    assert_eq!(
        rows.len(),
        3,
        "the unknown peer's record is dropped: {rows:#?}"
    );
    let from_w1 = rows.iter().find(|r| r.host == "w1").unwrap();
    assert_eq!(from_w1.peer.as_deref(), Some("d1"));
    assert_eq!(
        from_w1.host_labels.get("app").map(String::as_str),
        Some("web")
    );
    assert_eq!(
        from_w1.peer_labels.get("app").map(String::as_str),
        Some("db")
    );
    assert_eq!(from_w1.rule.as_deref(), Some("web-to-db"));
    let plain = rows.iter().find(|r| r.src.is_some()).unwrap();
    assert_eq!((plain.host.as_str(), plain.port), ("d1", 22));
    assert_eq!(plain.verdict, FlowVerdict::Denied);
    // Host filter (either end) and since.
    let rows = flows_until(&c, admin, "?host=w1", 2).await;
    assert_eq!(rows.len(), 2);
    let (st, body) = http(
        c.admin_addr(),
        &format!("/v1/flows?since={}", now + 100),
        admin,
    )
    .await;
    assert_eq!((st, body.as_str()), (200, "[]"));
    let (st, _) = http(c.admin_addr(), "/v1/flows?host=nobody", admin).await;
    assert_eq!(st, 404);
    let (st, _) = http(c.admin_addr(), "/v1/flows?since=yesterday", admin).await;
    assert_eq!(st, 400);

    // Topology by app: the flow once (the opener's count), the outside probe, verdicts.
    let topo = |c: &CoordinatorHandle, q: &'static str| {
        let addr = c.admin_addr();
        let admin = admin.to_string();
        async move {
            let (st, body) = http(addr, &format!("/v1/topology{q}"), &admin).await;
            assert_eq!(st, 200, "{body}");
            serde_json::from_str::<TopologyView>(&body).unwrap()
        }
    };
    let t = topo(&c, "?group_by=app").await;
    assert_eq!(t.group_by, "app");
    let ids: Vec<&str> = t.nodes.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(ids, ["app=db", "app=web", "outside:198.18.0.9"]);
    assert_eq!(t.edges.len(), 2, "{t:#?}");
    let e = &t.edges[0];
    assert_eq!(
        (e.from.as_str(), e.to.as_str(), e.port),
        ("app=web", "app=db", 5432)
    );
    assert_eq!(
        (e.verdict, e.packets, e.flows),
        (FlowVerdict::Allowed, 10, 1)
    );
    assert_eq!(e.pairs, ["w1>d1"]);
    assert_eq!(e.rules, ["web-to-db"]);
    assert_eq!(t.edges[1].from, "outside:198.18.0.9");
    assert_eq!(t.edges[1].verdict, FlowVerdict::Denied);
    let t = topo(&c, "").await;
    assert_eq!(t.group_by, "host");
    assert!(
        t.edges.iter().any(|e| e.from == "w1" && e.to == "d1"),
        "{t:#?}"
    );
    let (st, _) = http(c.admin_addr(), "/v1/topology?group_by=a%20b", admin).await;
    assert_eq!(st, 400);

    // Stored: a restarted coordinator serves the same rows.
    drop((w1, d1));
    c.stop().await;
    let c = coordinator(dir.path()).await;
    let rows = flows_until(&c, admin, "", 3).await;
    assert_eq!(rows.len(), 3);
    let t = topo(&c, "?group_by=app").await;
    assert_eq!(t.edges.len(), 2);
    c.stop().await;
}
