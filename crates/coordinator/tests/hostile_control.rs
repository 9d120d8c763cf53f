//! Misbehaving control clients (issue 17, point 5), in process on 127.0.0.1: a client that
//! trickles its Noise handshake one byte at a time, clients that open a stream and send
//! nothing, and an enrolled agent that stops reading while its map keeps changing. The first
//! two are cut off on their own (handshake timeout), and meanwhile the
//! coordinator keeps serving the well-behaved agents, new enrolments and admin calls.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshd_agent::{self as client, enrol, spawn_session, SessionConfig, SessionHandle};
use meshd_control::api::TokenCreateRequest;
use meshd_control::proto::{
    AgentMessage, CoordinatorMessage, EndpointReport, MAX_AGENT_FRAME, MAX_COORDINATOR_FRAME,
    PROTOCOL_VERSION,
};
use meshd_control::{JoinToken, NetworkMap};
use meshd_coordinator::{start, AdminOp, CoordinatorHandle, CoordinatorOptions};
use meshd_tunnel::PrivateKey;

async fn coordinator(dir: &std::path::Path) -> CoordinatorHandle {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut o = CoordinatorOptions::new(dir);
    o.listen = "127.0.0.1:0".parse().unwrap();
    o.admin_listen = "127.0.0.1:0".parse().unwrap();
    o.limits.control_write_timeout_ms = 2_000;
    start(o).await.unwrap()
}

fn ep(port: u16) -> EndpointReport {
    EndpointReport {
        addrs: vec![SocketAddr::from(([192, 0, 2, 1], port))],
        listen_port: Some(51820),
        transparent: false,
    }
}

async fn join(t: &JoinToken, name: &str) -> SessionHandle {
    let key = PrivateKey::generate();
    let e = enrol(t, name, &key, ep(1)).await.unwrap();
    spawn_session(SessionConfig::new(
        e.coordinator,
        e.coordinator_key,
        key,
        ep(1),
    ))
}

async fn wait_map(s: &SessionHandle, what: &str, f: impl Fn(&NetworkMap) -> bool) {
    let mut rx = s.map();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if rx.borrow_and_update().as_ref().is_some_and(&f) {
                return;
            }
            rx.changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| panic!("map condition not reached in time: {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_trickling_clients_only_hurt_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let yaml = "rules:\n  - {name: all, from: {}, to: {}, ports: [any]}\n";
    c.admin(AdminOp::PolicyApply(yaml.into()))
        .await
        .unwrap()
        .unwrap();
    let t = JoinToken::parse(
        &c.create_token(TokenCreateRequest {
            uses: Some(10),
            ..Default::default()
        })
        .await
        .unwrap()
        .token,
    )
    .unwrap();
    let a = join(&t, "a").await;
    let _b = join(&t, "b").await;
    wait_map(&a, "a sees b", |m| m.peers.len() == 1).await;

    let ep_ = client::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    // These misbehaving clients got past the SPA knock (they hold the admin token): what is
    // tested is that, once in, they only hurt themselves. Strangers never reach quinn
    // (meshd/tests/spa.rs).
    let admin = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let admin = meshd_control::token::hash_secret(admin.trim().as_bytes());
    ep_.knock(
        c.control_addr(),
        &c.public_key(),
        &PrivateKey::generate(),
        meshd_channel::spa::KnockAs::Admin(&admin),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // 1. Trickle: a QUIC connection whose Noise handshake arrives one byte every 300 ms.
    let trickle = ep_.connect(c.control_addr(), "x").unwrap().await.unwrap();
    let (mut ts, _tr) = trickle.open_bi().await.unwrap();
    let trickler = tokio::spawn(async move {
        for i in 0..200u8 {
            if ts.write_all(&[i]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    // 2. Silent: connections that open a stream and send nothing.
    let mut silent = Vec::new();
    for _ in 0..8 {
        let conn = ep_.connect(c.control_addr(), "x").unwrap().await.unwrap();
        let streams = conn.open_bi().await.unwrap();
        silent.push((conn, streams));
    }
    // 3. Stalled reader: enrolled, then never reads another byte.
    let rogue = PrivateKey::generate();
    let stalled = ep_.connect(c.control_addr(), "x").unwrap().await.unwrap();
    let (s, r) = stalled.open_bi().await.unwrap();
    let (mut reader, mut writer) = meshd_channel::noise::initiate(
        s,
        r,
        &rogue,
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
            name: "stalled".into(),
            endpoints: ep(9),
        })
        .await
        .unwrap();
    assert!(matches!(
        reader.recv::<CoordinatorMessage>().await.unwrap(),
        CoordinatorMessage::Welcome { .. }
    ));
    // As a real agent: the enrolment connection closes; the session (whose reader stalls)
    // runs on a second one.
    stalled.close(quinn::VarInt::from_u32(0), b"enrolled");
    let stalled = ep_.connect(c.control_addr(), "x").unwrap().await.unwrap();
    let (s, r) = stalled.open_bi().await.unwrap();
    let (mut reader, mut writer) = meshd_channel::noise::initiate(
        s,
        r,
        &rogue,
        &c.public_key(),
        MAX_AGENT_FRAME,
        MAX_COORDINATOR_FRAME,
    )
    .await
    .unwrap();
    writer
        .send(&AgentMessage::Resume {
            protocol: PROTOCOL_VERSION,
            endpoints: ep(9),
        })
        .await
        .unwrap();
    assert!(matches!(
        reader.recv::<CoordinatorMessage>().await.unwrap(),
        CoordinatorMessage::Welcome { .. }
    ));
    wait_map(&a, "a sees the stalled agent", |m| m.peers.len() == 2).await;

    // Churn: every label change is pushed to every agent, the stalled one included (with
    // long labels, so its stream's flow-control window fills). Admin calls stay prompt.
    let t0 = Instant::now();
    let stalled_closed = {
        let stalled = stalled.clone();
        tokio::spawn(async move {
            stalled.closed().await;
            t0.elapsed()
        })
    };
    let long = "x".repeat(200);
    let mut slowest = Duration::ZERO;
    for i in 0..400 {
        let started = Instant::now();
        // ~5 kB a delta, 2 MB in all: more than a QUIC stream's receive window (1.25 MB).
        let labels = std::iter::once(("round".to_string(), i.to_string()))
            .chain((0..24).map(|p| (format!("pad{p}"), format!("{long}{i}"))))
            .collect();
        c.admin(AdminOp::Label("b".into(), labels))
            .await
            .unwrap()
            .unwrap();
        slowest = slowest.max(started.elapsed());
    }
    assert!(
        slowest < Duration::from_secs(2),
        "an admin call took {slowest:?}"
    );
    wait_map(&a, "a sees the last label change", |m| {
        m.peers
            .iter()
            .any(|p| p.labels.get("round").map(String::as_str) == Some("399"))
    })
    .await;
    // A new agent still enrols while all of that is going on.
    let d = join(&t, "d").await;
    wait_map(&d, "d gets a map", |m| m.peers.len() >= 2).await;
    let churn = t0.elapsed();
    println!("churn took {churn:?}");

    // Each misbehaving client is cut off on its own.
    tokio::time::timeout(Duration::from_secs(15), trickle.closed())
        .await
        .expect("the trickling handshake is closed (handshake timeout)");
    for (conn, _) in &silent {
        tokio::time::timeout(Duration::from_secs(15), conn.closed())
            .await
            .expect("a silent client is closed (handshake timeout)");
    }
    // The agent that stopped reading costs the coordinator at most its stream's flow-control
    // window: its writes block only once the window is full, and then the write timeout (2 s
    // here) closes it. It never held up the others above.
    let closed_after = tokio::time::timeout(Duration::from_secs(30), stalled_closed)
        .await
        .expect("the agent that stopped reading is closed (write timeout)")
        .unwrap();
    println!("stalled agent closed {closed_after:?} after the churn began");
    // Its window fills during the churn; the 2 s write timeout then closes it, well before
    // the churn's end + 5 s (the default 20 s would close it after that: checked).
    assert!(
        closed_after < churn + Duration::from_secs(5),
        "closed by the 2 s write timeout once its window was full: {closed_after:?} (churn {churn:?})"
    );
    trickler.abort();
    // And the well-behaved agent is still served promptly.
    let started = Instant::now();
    c.admin(AdminOp::Label(
        "b".into(),
        [("round".into(), "last".into())].into(),
    ))
    .await
    .unwrap()
    .unwrap();
    wait_map(&a, "a still gets pushes", |m| {
        m.peers
            .iter()
            .any(|p| p.labels.get("round").map(String::as_str) == Some("last"))
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(2));
    c.stop().await;
}
