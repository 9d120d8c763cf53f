//! The control endpoint under a flood of QUIC Initials, on loopback: replies to an unproven
//! address stay within 3× what it sent (RFC 9000 §8), half-open connections are capped, Retry
//! validates addresses under pressure, a real agent still gets in, and bad join tokens are
//! counted and backed off per source. SPA stays on (the default): the raw sockets knock as
//! admin first, as meshctl would, so their Initials reach quinn.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use meshd_agent::{enrol, enrol_via, ClientError};
use meshd_control::api::TokenCreateRequest;
use meshd_control::proto::{EndpointReport, ErrorCode};
use meshd_control::{JoinToken, TokenSecret};
use meshd_coordinator::{start, CoordinatorHandle, CoordinatorOptions};
use meshd_tunnel::PrivateKey;
use tokio::net::UdpSocket;

async fn coordinator(
    dir: &std::path::Path,
    tweak: impl FnOnce(&mut CoordinatorOptions),
) -> CoordinatorHandle {
    // The coordinator refuses a state directory others can read (tempdir makes it 0755).
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let mut o = CoordinatorOptions::new(dir);
    o.listen = "127.0.0.1:0".parse().unwrap();
    o.admin_listen = "127.0.0.1:0".parse().unwrap();
    tweak(&mut o);
    start(o).await.unwrap()
}

fn ep() -> EndpointReport {
    EndpointReport {
        addrs: vec![SocketAddr::from(([192, 0, 2, 1], 51820))],
        listen_port: Some(51820),
        transparent: false,
    }
}

/// Whether a datagram starts with a QUIC v1 Retry packet.
fn is_retry(d: &[u8]) -> bool {
    d.len() > 5 && d[0] & 0xf0 == 0xf0 && d[1..5] == [0, 0, 0, 1]
}

/// Whether a datagram starts with a QUIC v1 Initial packet.
fn is_initial(d: &[u8]) -> bool {
    d.len() > 5 && d[0] & 0xf0 == 0xc0 && d[1..5] == [0, 0, 0, 1]
}

/// Knocks as admin (the admin token in the state directory) from `sock`, so the coordinator
/// lets its datagrams through to quinn.
async fn knock_admin(sock: &UdpSocket, c: &CoordinatorHandle, dir: &std::path::Path) {
    let token = std::fs::read_to_string(dir.join("admin.token")).unwrap();
    let hash = meshd_control::token::hash_secret(token.trim().as_bytes());
    let k = meshd_channel::spa::make_knock(
        &c.public_key(),
        &PrivateKey::generate(),
        meshd_channel::spa::KnockAs::Admin(&hash),
        meshd_time::unix_millis(),
        meshd_channel::spa::fresh_nonce(),
    )
    .unwrap();
    sock.send_to(&k, c.control_addr()).await.unwrap();
}

fn client_endpoint() -> quinn::Endpoint {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(meshd_channel::quic::client_config().unwrap());
    ep
}

/// What the server sent back to one client Initial datagram.
#[derive(Debug, Default)]
struct Replies {
    sent: usize,
    datagrams: usize,
    bytes: usize,
    retries: usize,
}

/// Lets a real quinn client send its first datagram to `server` through a relay that forwards
/// nothing else, and counts what comes back to the relay during `window` (the client's address
/// is never proven: nothing reaches it).
async fn one_initial(c: &CoordinatorHandle, dir: &std::path::Path, window: Duration) -> Replies {
    let server = c.control_addr();
    let relay = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    knock_admin(&relay, c, dir).await;
    let ep = client_endpoint();
    let connecting = ep.connect(relay.local_addr().unwrap(), "x").unwrap();
    let mut buf = vec![0u8; 65536];
    let (n, _) = relay.recv_from(&mut buf).await.unwrap();
    assert!(is_initial(&buf[..n]));
    let mut r = Replies {
        sent: n,
        ..Replies::default()
    };
    relay.send_to(&buf[..n], server).await.unwrap();
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(got) = tokio::time::timeout_at(deadline, relay.recv_from(&mut buf)).await {
        let (n, from) = got.unwrap();
        if from == server {
            r.datagrams += 1;
            r.bytes += n;
            r.retries += usize::from(is_retry(&buf[..n]));
        }
    }
    drop(connecting);
    ep.close(0u32.into(), b"");
    r
}

/// Before: 4 datagrams, 3,738 bytes for one 1,200-byte Initial (quinn lets a datagram go out
/// whole while any budget is left, and the server's flight is 1,200 + 138 bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_initial_draws_at_most_three_times_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path(), |_| {}).await;
    // Long enough for the server's first two retransmissions (PTO 1 s, then 2 s).
    let r = one_initial(&c, dir.path(), Duration::from_secs(4)).await;
    assert!(r.bytes <= 3 * r.sent, "{r:?}");
    assert_eq!(r.retries, 1, "an unproven address gets a Retry: {r:?}");
    assert_eq!(c.guard_stats().quic_half_open_peak, 0, "no state kept");
    c.stop().await;
}

/// `n` distinct client Initials sent to `server` from `ports` UDP ports, replies counted and
/// never forwarded (so no handshake completes).
struct Flood {
    forwarded: usize,
    replies: Arc<AtomicUsize>,
    retries: Arc<AtomicUsize>,
    readers: Vec<tokio::task::JoinHandle<()>>,
    _ep: quinn::Endpoint,
    _connecting: Vec<quinn::Connecting>,
}

async fn flood(c: &CoordinatorHandle, dir: &std::path::Path, n: usize, ports: usize) -> Flood {
    let server = c.control_addr();
    let relay = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let replies = Arc::new(AtomicUsize::new(0));
    let retries = Arc::new(AtomicUsize::new(0));
    let mut pool = Vec::new();
    let mut readers = Vec::new();
    for _ in 0..ports {
        let s = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        knock_admin(&s, c, dir).await;
        let (s2, replies, retries) = (s.clone(), replies.clone(), retries.clone());
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((len, _)) = s2.recv_from(&mut buf).await {
                replies.fetch_add(1, Ordering::Relaxed);
                if is_retry(&buf[..len]) {
                    retries.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
        pool.push(s);
    }
    let ep = client_endpoint();
    let mut connecting = Vec::new();
    let mut forwarded = 0;
    let mut buf = vec![0u8; 65536];
    for _ in 0..n {
        connecting.push(ep.connect(relay_addr, "x").unwrap());
        // Each connection's first Initial; anything else (a retransmission) is not forwarded.
        let got = tokio::time::timeout(Duration::from_secs(5), relay.recv_from(&mut buf))
            .await
            .expect("the client sends its Initial")
            .unwrap();
        let len = got.0;
        if is_initial(&buf[..len]) {
            pool[forwarded % ports]
                .send_to(&buf[..len], server)
                .await
                .unwrap();
            forwarded += 1;
        }
    }
    Flood {
        forwarded,
        replies,
        retries,
        readers,
        _ep: ep,
        _connecting: connecting,
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        for r in &self.readers {
            r.abort();
        }
    }
}

/// Enrols one real agent (the coordinator answers with a host id).
async fn real_agent_enrols(c: &CoordinatorHandle, name: &str) {
    let t = c.create_token(TokenCreateRequest::default()).await.unwrap();
    let t = JoinToken::parse(&t.token).unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        enrol(&t, name, &PrivateKey::generate(), ep()),
    )
    .await
    .expect("a real agent enrols during the flood")
    .unwrap();
}

/// A threshold of 8 unproven handshakes: the flood gets 8 half-open connections and Retry
/// packets for the rest; a real agent (which answers the Retry) enrols meanwhile. Before:
/// every Initial became a half-open connection (27 kB each: 10k took 272 MB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_flood_is_capped_and_retried() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path(), |o| {
        o.limits.quic_retry_threshold = 8;
        o.limits.quic_max_half_open = 32;
    })
    .await;
    let f = flood(&c, dir.path(), 300, 64).await;
    assert!(f.forwarded >= 290, "{}", f.forwarded);
    // Every forwarded Initial is answered (handshake or Retry) within a moment.
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let g = c.guard_stats();
            if g.quic_retries as usize + g.quic_half_open_peak as usize >= f.forwarded * 9 / 10 {
                return g;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the flood was not answered: {:?}", c.guard_stats()));
    real_agent_enrols(&c, "during").await;
    let g = c.guard_stats();
    assert!(
        g.quic_half_open_peak <= 8 + 1,
        "half-open not capped: {g:?} (seen {seen:?})"
    );
    assert!(g.quic_retries as usize >= f.forwarded - 9, "{g:?}");
    assert!(
        f.retries.load(Ordering::Relaxed) >= 1,
        "no Retry packet came back ({} replies)",
        f.replies.load(Ordering::Relaxed)
    );
    assert_eq!(g.quic_refused_full, 0, "{g:?}");
    c.stop().await;
}

/// With the Retry threshold above the cap, the cap holds on its own: attempts past it are
/// refused and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_cap_refuses_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path(), |o| {
        o.limits.quic_retry_threshold = 1000;
        o.limits.quic_max_half_open = 16;
    })
    .await;
    let f = flood(&c, dir.path(), 100, 16).await;
    let g = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let g = c.guard_stats();
            if g.quic_refused_full as usize + g.quic_half_open_peak as usize >= f.forwarded * 9 / 10
            {
                return g;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the flood was not answered: {:?}", c.guard_stats()));
    assert!(g.quic_half_open_peak <= 16, "{g:?}");
    assert_eq!(g.quic_half_open, 16, "{g:?}");
    assert!(g.quic_refused_full >= 70, "{g:?}");
    assert_eq!(g.quic_retries, 0, "{g:?}");
    c.stop().await;
}

/// A join token with the right coordinator but a made-up secret.
fn guessed(real: &JoinToken) -> JoinToken {
    JoinToken {
        secret: TokenSecret([7; 32]),
        ..real.clone()
    }
}

fn endpoint_on(ip: &str) -> meshd_agent::ClientEndpoint {
    meshd_agent::client_endpoint(format!("{ip}:0").parse().unwrap()).unwrap()
}

/// Join-token guesses from 127.0.0.2: the first five are answered "unknown token" and
/// counted, then the source's connections are refused at once for a while; 127.0.0.3 is
/// not affected, and the refusal ends. SPA off: with it on, a guessed token's knock is refused
/// and its QUIC never reaches this backoff (tests/spa.rs); this is the layer behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_token_guesses_back_off_per_source() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path(), |o| o.spa.enabled = false).await;
    let t = c.create_token(TokenCreateRequest::default()).await.unwrap();
    let real = JoinToken::parse(&t.token).unwrap();
    let bad = guessed(&real);
    let attacker = endpoint_on("127.0.0.2");
    for i in 0..5 {
        let e = enrol_via(Some(&attacker), &bad, "x", &PrivateKey::generate(), ep())
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                ClientError::Refused {
                    code: ErrorCode::TokenUnknown,
                    ..
                }
            ),
            "attempt {i}: {e:?}"
        );
    }
    let e = enrol_via(Some(&attacker), &bad, "x", &PrivateKey::generate(), ep())
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Connection(quinn::ConnectionError::ConnectionClosed(_))
        ),
        "refused before the token is looked at: {e:?}"
    );
    // Even the right token, from that source, for now.
    let e = enrol_via(Some(&attacker), &real, "x", &PrivateKey::generate(), ep())
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Connection(quinn::ConnectionError::ConnectionClosed(_))
        ),
        "{e:?}"
    );
    let g = c.guard_stats();
    assert_eq!(g.join_token_failures, 5, "{g:?}");
    assert!(g.join_backoff_refused >= 2, "{g:?}");
    // Another source enrols.
    let other = endpoint_on("127.0.0.3");
    enrol_via(Some(&other), &real, "other", &PrivateKey::generate(), ep())
        .await
        .unwrap();
    // The first refusal lasts 1 s; then the right token works from 127.0.0.2 too.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    enrol_via(
        Some(&attacker),
        &real,
        "late",
        &PrivateKey::generate(),
        ep(),
    )
    .await
    .unwrap();
    c.stop().await;
}
