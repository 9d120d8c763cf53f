//! The Noise channel over a real QUIC connection on 127.0.0.1.

use std::net::SocketAddr;

use meshd_channel::{noise, quic};
use meshd_control::proto::{AgentMessage, MAX_AGENT_FRAME, MAX_COORDINATOR_FRAME};
use meshd_tunnel::PrivateKey;

fn endpoints() -> (quinn::Endpoint, quinn::Endpoint, SocketAddr) {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let server = quinn::Endpoint::server(quic::server_config().unwrap(), any).unwrap();
    let addr = server.local_addr().unwrap();
    let mut client = quinn::Endpoint::client(any).unwrap();
    client.set_default_client_config(quic::client_config().unwrap());
    (server, client, addr)
}

#[tokio::test]
async fn handshake_proves_keys_and_frames_cross_both_ways() {
    let (server, client, addr) = endpoints();
    let (agent_key, coord_key) = (PrivateKey::generate(), PrivateKey::generate());
    let coord_pub = coord_key.public_key();
    let srv = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let (send, recv) = conn.accept_bi().await.unwrap();
        let (mut r, mut w, remote) = noise::respond(
            send,
            recv,
            &coord_key,
            MAX_COORDINATOR_FRAME,
            MAX_AGENT_FRAME,
        )
        .await
        .unwrap();
        let m: AgentMessage = r.recv().await.unwrap();
        // A reply far larger than one Noise message (65535 bytes) is chunked.
        let big = "x".repeat(200_000);
        w.send(&(m, big)).await.unwrap();
        w.finish(std::time::Duration::from_secs(5)).await;
        (remote, conn)
    });
    let conn = client
        .connect(addr, "meshd-coordinator")
        .unwrap()
        .await
        .unwrap();
    let (send, recv) = conn.open_bi().await.unwrap();
    let (mut r, mut w) = noise::initiate(
        send,
        recv,
        &agent_key,
        &coord_pub,
        MAX_AGENT_FRAME,
        MAX_COORDINATOR_FRAME,
    )
    .await
    .unwrap();
    w.send(&AgentMessage::Ping { nonce: 42 }).await.unwrap();
    let (echo, big): (AgentMessage, String) = r.recv().await.unwrap();
    assert_eq!(echo, AgentMessage::Ping { nonce: 42 });
    assert_eq!(big.len(), 200_000);
    let (remote, _conn) = srv.await.unwrap();
    assert_eq!(remote, agent_key.public_key());
    // The peer finished its stream: the next read says so.
    assert!(matches!(
        r.recv::<AgentMessage>().await,
        Err(noise::ChannelError::Closed)
    ));
}

#[tokio::test]
async fn a_wrong_pinned_key_fails_the_handshake() {
    let (server, client, addr) = endpoints();
    let coord_key = PrivateKey::generate();
    let srv = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let (send, recv) = conn.accept_bi().await.unwrap();
        noise::respond(
            send,
            recv,
            &coord_key,
            MAX_COORDINATOR_FRAME,
            MAX_AGENT_FRAME,
        )
        .await
        .map(|_| ())
    });
    let conn = client
        .connect(addr, "meshd-coordinator")
        .unwrap()
        .await
        .unwrap();
    let (send, recv) = conn.open_bi().await.unwrap();
    let wrong = PrivateKey::generate().public_key();
    let r = tokio::spawn(async move {
        noise::initiate(
            send,
            recv,
            &PrivateKey::generate(),
            &wrong,
            MAX_AGENT_FRAME,
            MAX_COORDINATOR_FRAME,
        )
        .await
        .map(|_| ())
    });
    // The responder cannot decrypt an initiation made for another static key.
    assert!(matches!(
        srv.await.unwrap(),
        Err(noise::ChannelError::Noise(_))
    ));
    conn.close(0u32.into(), b"done");
    assert!(r.await.unwrap().is_err());
}

#[tokio::test]
async fn an_oversized_frame_is_refused_by_the_receiver() {
    let (server, client, addr) = endpoints();
    let coord_key = PrivateKey::generate();
    let coord_pub = coord_key.public_key();
    let srv = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let (send, recv) = conn.accept_bi().await.unwrap();
        let (mut r, _w, _) = noise::respond(send, recv, &coord_key, MAX_COORDINATOR_FRAME, 100)
            .await
            .unwrap();
        let got = r.recv::<AgentMessage>().await;
        (got, conn)
    });
    let conn = client
        .connect(addr, "meshd-coordinator")
        .unwrap()
        .await
        .unwrap();
    let (send, recv) = conn.open_bi().await.unwrap();
    let (_r, mut w) = noise::initiate(
        send,
        recv,
        &PrivateKey::generate(),
        &coord_pub,
        MAX_AGENT_FRAME,
        MAX_COORDINATOR_FRAME,
    )
    .await
    .unwrap();
    w.send(&serde_json::json!({"type": "ping", "nonce": 1, "pad": "y".repeat(500)}))
        .await
        .unwrap();
    let (got, _conn) = srv.await.unwrap();
    assert!(
        matches!(got, Err(noise::ChannelError::Frame(_))),
        "{:?}",
        got.map(|_| ())
    );
}
