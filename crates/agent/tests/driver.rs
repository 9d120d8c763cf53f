//! The driver against a hand-written coordinator on 127.0.0.1 (meshd-channel's responder
//! side), speaking the protocol frame by frame. The coordinator's own tests run the driver
//! against the real server.

use std::net::SocketAddr;
use std::time::Duration;

use meshd_agent::{spawn_session, SessionConfig, SessionState, BLOCK_BATCHES_QUEUED};
use meshd_channel::noise::{self, NoiseReader, NoiseWriter};
use meshd_channel::quic;
use meshd_control::proto::{
    AgentMessage, CoordinatorMessage, EndpointReport, ErrorCode, HostInfo, MAX_AGENT_FRAME,
    MAX_BLOCKS_PER_MESSAGE, MAX_COORDINATOR_FRAME, PROTOCOL_VERSION,
};
use meshd_control::{HostId, NetworkMap, Peer};
use meshd_policy::{BlockEvent, DenyReason, Direction};
use meshd_tunnel::{PrivateKey, PublicKey};
use tokio::time::timeout;

const WITHIN: Duration = Duration::from_secs(10);

fn ep(port: u16) -> EndpointReport {
    EndpointReport {
        addrs: vec![SocketAddr::from(([192, 0, 2, 1], port))],
        listen_port: Some(51820),
        transparent: false,
    }
}

fn map(version: u64, peers: &[u8]) -> NetworkMap {
    NetworkMap::new(
        version,
        peers.iter().map(|&k| Peer {
            name: format!("p{k}"),
            public_key: PublicKey([k; 32]),
            addresses: vec![format!("100.64.0.{k}").parse().unwrap()],
            endpoints: vec![],
            labels: Default::default(),
            grants: Default::default(),
            transparent: false,
            next_public_key: None,
        }),
    )
}

fn block(n: u16) -> BlockEvent {
    BlockEvent {
        at: 1,
        host: "a".into(),
        host_labels: Default::default(),
        peer: "p2".into(),
        peer_labels: Default::default(),
        direction: Direction::Inbound,
        proto: 17,
        src: SocketAddr::from(([100, 64, 0, 2], n)),
        dst: SocketAddr::from(([100, 64, 0, 1], 53)),
        reason: DenyReason::DefaultDeny,
        count: 1,
    }
}

struct Fake {
    server: quinn::Endpoint,
    key: PrivateKey,
}

struct Conn {
    conn: quinn::Connection,
    reader: NoiseReader,
    writer: NoiseWriter,
}

impl Fake {
    fn new() -> Fake {
        let server = quinn::Endpoint::server(
            quic::server_config().unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        Fake {
            server,
            key: PrivateKey::generate(),
        }
    }

    fn config(&self, agent: &PrivateKey) -> SessionConfig {
        SessionConfig::new(
            self.server.local_addr().unwrap(),
            self.key.public_key(),
            agent.clone(),
            ep(1),
        )
    }

    /// Accepts the next connection and reads its `Resume`; answers `Welcome`.
    async fn accept(&self, agent: &PrivateKey) -> (Conn, EndpointReport) {
        let conn = self.server.accept().await.unwrap().await.unwrap();
        let mut c = self.handshake(conn, agent).await;
        let AgentMessage::Resume {
            protocol,
            endpoints,
        } = c.recv().await
        else {
            panic!("expected resume")
        };
        assert_eq!(protocol, PROTOCOL_VERSION);
        c.send(CoordinatorMessage::Welcome {
            protocol: PROTOCOL_VERSION,
            host: host_info(agent),
            replicas: vec![],
        })
        .await;
        (c, endpoints)
    }

    /// The Noise handshake on a connection's first stream, checking the agent's key.
    async fn handshake(&self, conn: quinn::Connection, agent: &PrivateKey) -> Conn {
        let (send, recv) = conn.accept_bi().await.unwrap();
        let (reader, writer, remote) = noise::respond(
            send,
            recv,
            &self.key,
            MAX_COORDINATOR_FRAME,
            MAX_AGENT_FRAME,
        )
        .await
        .unwrap();
        assert_eq!(remote, agent.public_key());
        Conn {
            conn,
            reader,
            writer,
        }
    }
}

/// The record the fake coordinators give the agent.
fn host_info(agent: &PrivateKey) -> HostInfo {
    HostInfo {
        id: HostId(1),
        name: "a".into(),
        public_key: agent.public_key(),
        addresses: vec!["100.64.0.1".parse().unwrap()],
        networks: vec!["100.64.0.0/10".parse().unwrap()],
        labels: Default::default(),
    }
}

impl Conn {
    async fn recv(&mut self) -> AgentMessage {
        timeout(WITHIN, self.reader.recv()).await.unwrap().unwrap()
    }

    async fn send(&mut self, m: CoordinatorMessage) {
        self.writer.send(&m).await.unwrap();
    }
}

async fn wait_state(
    rx: &mut tokio::sync::watch::Receiver<SessionState>,
    f: impl Fn(&SessionState) -> bool,
) -> SessionState {
    timeout(WITHIN, rx.wait_for(|s| f(s)))
        .await
        .unwrap()
        .unwrap()
        .clone()
}

#[tokio::test]
async fn follows_maps_reports_and_stops_when_refused() {
    let fake = Fake::new();
    let agent = PrivateKey::generate();
    let mut cfg = fake.config(&agent);
    cfg.initial_map = Some(map(1, &[2]));
    let s = spawn_session(cfg);
    // Fail-static: the persisted map is there at once, and is not a change.
    let mut maps = s.map();
    assert_eq!(maps.borrow().as_ref().map(|m| m.version), Some(1));
    assert!(!maps.has_changed().unwrap());

    let (mut c, sent) = fake.accept(&agent).await;
    assert_eq!(sent, ep(1));
    let mut state = s.state();
    wait_state(&mut state, |s| matches!(s, SessionState::Connected { .. })).await;

    c.send(CoordinatorMessage::FullMap {
        map: map(5, &[2, 3]),
    })
    .await;
    assert_eq!(c.recv().await, AgentMessage::Ack { version: 5 });
    let delta = map(5, &[2, 3]).diff(&map(6, &[3, 4]));
    c.send(CoordinatorMessage::Delta { delta }).await;
    assert_eq!(c.recv().await, AgentMessage::Ack { version: 6 });
    timeout(
        WITHIN,
        maps.wait_for(|m| m.as_ref() == Some(&map(6, &[3, 4]))),
    )
    .await
    .unwrap()
    .unwrap();
    // A delta from elsewhere: resync, the map stays.
    let stale = map(2, &[]).diff(&map(3, &[9]));
    c.send(CoordinatorMessage::Delta { delta: stale }).await;
    assert_eq!(c.recv().await, AgentMessage::Resync);

    s.report_endpoints(ep(2).addrs);
    assert_eq!(
        c.recv().await,
        AgentMessage::ReportEndpoints { endpoints: ep(2) }
    );
    s.report_blocks((0..100).map(block).collect()).unwrap();
    let mut got = Vec::new();
    while got.len() < 100 {
        let AgentMessage::Blocks { events } = c.recv().await else {
            panic!("expected blocks")
        };
        assert!(events.len() <= MAX_BLOCKS_PER_MESSAGE);
        got.extend(events);
    }
    assert_eq!(got, (0..100).map(block).collect::<Vec<_>>());

    c.send(CoordinatorMessage::Error {
        code: ErrorCode::HostRemoved,
        message: "removed".into(),
    })
    .await;
    let st = wait_state(&mut state, |s| matches!(s, SessionState::Refused { .. })).await;
    assert_eq!(
        st,
        SessionState::Refused {
            code: ErrorCode::HostRemoved,
            message: "removed".into()
        }
    );
    // The session closed the connection and never comes back.
    timeout(WITHIN, c.conn.closed()).await.unwrap();
    assert!(s.report_blocks(vec![block(1)]).is_err());
    assert!(
        timeout(Duration::from_millis(300), fake.server.accept())
            .await
            .is_err(),
        "a refused session reconnected"
    );
    assert_eq!(maps.borrow().as_ref().map(|m| m.version), Some(6));
    s.shutdown().await;
}

#[tokio::test]
async fn reconnects_and_resumes_with_the_new_endpoints() {
    let fake = Fake::new();
    let agent = PrivateKey::generate();
    let s = spawn_session(fake.config(&agent));
    let mut state = s.state();
    let (c, _) = fake.accept(&agent).await;
    wait_state(&mut state, |s| matches!(s, SessionState::Connected { .. })).await;
    // The coordinator goes away; the endpoints change meanwhile.
    c.conn.close(0u32.into(), b"restart");
    let st = wait_state(&mut state, |s| matches!(s, SessionState::Connecting { .. })).await;
    let SessionState::Connecting {
        attempt: 1,
        last_error: Some(e),
    } = st
    else {
        panic!("{st:?}")
    };
    assert!(e.starts_with("control channel"), "{e}");
    s.report(ep(7));
    let (mut c, sent) = fake.accept(&agent).await;
    assert_eq!(sent, ep(7));
    wait_state(&mut state, |s| matches!(s, SessionState::Connected { .. })).await;
    // A second welcome is a protocol error: the session closes and comes back.
    c.send(CoordinatorMessage::Welcome {
        protocol: PROTOCOL_VERSION,
        host: HostInfo {
            id: HostId(1),
            name: "a".into(),
            public_key: agent.public_key(),
            addresses: vec![],
            networks: vec![],
            labels: Default::default(),
        },
        replicas: vec![],
    })
    .await;
    let st = wait_state(&mut state, |s| matches!(s, SessionState::Connecting { .. })).await;
    assert!(
        matches!(&st, SessionState::Connecting { last_error: Some(e), .. } if e == "protocol error: second welcome"),
        "{st:?}"
    );
    timeout(WITHIN, c.conn.closed()).await.unwrap();
    let (_c, _) = fake.accept(&agent).await;
    wait_state(&mut state, |s| matches!(s, SessionState::Connected { .. })).await;
    s.shutdown().await;
    assert_eq!(*state.borrow(), SessionState::Stopped);
}

#[tokio::test]
async fn blocks_wait_in_a_bounded_queue_while_disconnected() {
    // A coordinator that never answers: the session stays connecting.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let s = spawn_session(SessionConfig::new(
        silent.local_addr().unwrap(),
        PrivateKey::generate().public_key(),
        PrivateKey::generate(),
        ep(1),
    ));
    for i in 0..BLOCK_BATCHES_QUEUED {
        s.report_blocks(vec![block(i as u16)]).unwrap();
    }
    assert_eq!(s.report_blocks(vec![block(99)]), Err(vec![block(99)]));
    assert_eq!(s.report_blocks(vec![]), Ok(()));
    assert!(matches!(
        *s.state().borrow(),
        SessionState::Connecting { attempt: 0, .. }
    ));
    let mut state = s.state();
    s.shutdown().await;
    assert_eq!(*state.borrow_and_update(), SessionState::Stopped);
}

/// Two replicas: their own addresses, the same coordinator key.
fn two_replicas() -> (Fake, Fake, SocketAddr, SocketAddr) {
    let a = Fake::new();
    let b = Fake {
        key: a.key.clone(),
        ..Fake::new()
    };
    let (addr_a, addr_b) = (
        a.server.local_addr().unwrap(),
        b.server.local_addr().unwrap(),
    );
    (a, b, addr_a, addr_b)
}

#[tokio::test]
async fn fails_over_to_the_next_replica_and_keeps_the_map_meanwhile() {
    let (a, b, addr_a, addr_b) = two_replicas();
    let agent = PrivateKey::generate();
    let mut cfg = a.config(&agent);
    cfg.fallbacks = vec![addr_b];
    let s = spawn_session(cfg);
    let (mut c, _) = a.accept(&agent).await;
    let mut state = s.state();
    wait_state(&mut state, |s| matches!(s, SessionState::Connected { .. })).await;
    assert_eq!(s.coordinator(), addr_a);
    c.send(CoordinatorMessage::FullMap { map: map(5, &[2]) })
        .await;
    assert_eq!(c.recv().await, AgentMessage::Ack { version: 5 });
    // Replica A goes away for good.
    a.server.close(quinn::VarInt::from_u32(0), b"gone");
    drop(c);
    let (mut c, _) = timeout(WITHIN, b.accept(&agent))
        .await
        .expect("the session did not fail over to B");
    wait_state(&mut state, |s| matches!(s, SessionState::Connected { .. })).await;
    assert_eq!(s.coordinator(), addr_b);
    assert_eq!(
        s.coordinators(),
        vec![addr_b, addr_a],
        "B worked last: first"
    );
    // The map stayed while no coordinator was there, until B sends its own.
    let maps = s.map();
    assert_eq!(maps.borrow().as_ref().map(|m| m.version), Some(5));
    c.send(CoordinatorMessage::FullMap { map: map(7, &[3]) })
        .await;
    assert_eq!(c.recv().await, AgentMessage::Ack { version: 7 });
    s.shutdown().await;
}

/// Issue 18: a replica that lost its database refuses an enrolment with `internal`
/// (retryable); the agent goes on to the next replica the token lists, which enrols it.
/// A final refusal (an unknown token) is not tried elsewhere.
#[tokio::test]
async fn enrolment_refused_as_retryable_goes_on_to_the_next_replica() {
    use meshd_control::{JoinToken, TokenSecret};
    let (a, b, addr_a, addr_b) = two_replicas();
    let token = JoinToken {
        control: addr_a,
        replicas: vec![addr_b],
        coordinator_key: a.key.public_key(),
        secret: TokenSecret([7; 32]),
    };
    let agent = PrivateKey::generate();
    // Reads the `Enrol` on the next connection and answers `reply`; nothing if no agent
    // comes within WITHIN.
    async fn answer(f: &Fake, agent: &PrivateKey, reply: CoordinatorMessage) {
        let Ok(Some(incoming)) = timeout(WITHIN, f.server.accept()).await else {
            return;
        };
        let mut c = f.handshake(incoming.await.unwrap(), agent).await;
        assert!(matches!(c.recv().await, AgentMessage::Enrol { .. }));
        c.send(reply).await;
        // Until the agent closes.
        let _ = timeout(WITHIN, c.conn.closed()).await;
    }
    let refuse = |code| CoordinatorMessage::Error {
        code,
        message: "no".into(),
    };
    let welcome = CoordinatorMessage::Welcome {
        protocol: PROTOCOL_VERSION,
        host: host_info(&agent),
        replicas: vec![addr_b, addr_a],
    };
    let (enrolled, (), ()) = tokio::join!(
        meshd_agent::enrol(&token, "a", &agent, ep(1)),
        answer(&a, &agent, refuse(ErrorCode::Internal)),
        answer(&b, &agent, welcome),
    );
    let e = enrolled.expect("enrolled through the second replica");
    assert_eq!((e.coordinator, e.replicas), (addr_b, vec![addr_a]));

    // A final refusal from the first replica ends the enrolment there.
    let (enrolled, ()) = tokio::join!(
        meshd_agent::enrol(&token, "a", &agent, ep(1)),
        answer(&a, &agent, refuse(ErrorCode::TokenUnknown)),
    );
    assert!(
        matches!(
            enrolled,
            Err(meshd_agent::ClientError::Refused {
                code: ErrorCode::TokenUnknown,
                ..
            })
        ),
        "{enrolled:?}"
    );
}
