//! Tests of the coordinator state, one file per seam; the shared fixtures are here.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};

use meshd_policy::BlockEvent;
use meshd_tunnel::PublicKey;
use proptest::prelude::*;

use super::*;
use crate::map::NetworkMap;
use crate::model::{validate_name, HostId, Labels};
use crate::policy::PolicyError;
use crate::proto::{CoordinatorMessage, EndpointReport, ErrorCode, HostInfo};
use crate::token::hash_secret;

mod admin;
mod admin_tokens;
mod blocks;
mod cmdb;
mod detector;
mod flows;
mod mode;
mod policy;
mod pushes;
mod rotation;
mod sessions;
mod signed;

fn key(k: u8) -> PublicKey {
    PublicKey([k; 32])
}

/// A key rotation proposal as the connection task hands it to the state.
fn prop(
    nonce: crate::rotation::Nonce,
    new_key: PublicKey,
    proof_ok: bool,
    succession: Option<crate::signed::Sig>,
) -> crate::rotation::Proposal {
    crate::rotation::Proposal {
        nonce,
        new_key,
        proof_ok,
        succession,
    }
}

fn st() -> CoordinatorState {
    CoordinatorState::new("100.64.0.0/24".parse().unwrap(), None).unwrap()
}

const ALLOW_ALL: &str = "rules:\n  - {name: all, from: {}, to: {}, ports: [any]}\n";

fn allow_all(s: &mut CoordinatorState) {
    s.apply_policy(0, ALLOW_ALL, "test").unwrap();
}

fn ep(port: u16) -> EndpointReport {
    EndpointReport {
        addrs: vec![SocketAddr::from(([192, 0, 2, 1], port))],
        listen_port: Some(51820),
        transparent: false,
    }
}

fn enrol(s: &mut CoordinatorState, k: u8, secret: &[u8]) -> Result<HostInfo, ErrorCode> {
    s.connect(
        100,
        key(k),
        ConnId(u64::from(k)),
        IpAddr::from([198, 51, 100, k]),
        Hello::Enrol {
            secret_hash: hash_secret(secret),
            name: format!("h{k}"),
            endpoints: ep(1),
        },
    )
}

const POLICY: &str = "\
rules:
  - name: app-to-db
    from: { app: app }
    to:   { app: db }
    ports: [tcp/5432]
tests:
  - { from: { app: app }, to: { app: db }, port: tcp/5432, expect: allow }
  - { from: { app: db }, to: { app: app }, port: tcp/5432, expect: deny }
";

/// Three connected hosts: h1 app=app, h2 app=db, h3 app=web; maps drained.
fn three() -> CoordinatorState {
    let mut s = st();
    s.create_token(0, TokenSpec::default(), hash_secret(b"t"))
        .unwrap();
    for k in 1..=3 {
        enrol(&mut s, k, b"t").unwrap();
    }
    for (h, app) in [("h1", "app"), ("h2", "db"), ("h3", "web")] {
        s.set_labels(h, [("app".into(), app.into())].into())
            .unwrap();
    }
    s
}

fn maps(s: &mut CoordinatorState) -> BTreeMap<HostId, CoordinatorMessage> {
    let out = s
        .poll_pushes()
        .into_iter()
        .map(|p| (p.host, p.message))
        .collect();
    let _ = s.take_dirty();
    out
}

fn peer_names(s: &CoordinatorState, id: u64) -> Vec<String> {
    let m = s.full_map_for(HostId(id), 0);
    let mut v: Vec<String> = m.peers.iter().map(|p| p.name.clone()).collect();
    v.sort();
    v
}

fn block(at: u64, peer: &str) -> BlockEvent {
    BlockEvent {
        at,
        host: "spoofed".into(),
        host_labels: Default::default(),
        peer: peer.into(),
        peer_labels: Default::default(),
        direction: meshd_policy::Direction::Inbound,
        proto: 6,
        src: "100.64.0.2:40000".parse().unwrap(),
        dst: "100.64.0.1:22".parse().unwrap(),
        reason: meshd_policy::DenyReason::DefaultDeny,
        count: 3,
    }
}

fn enrol_named(s: &mut CoordinatorState, k: u8, name: &str) -> Result<HostInfo, ErrorCode> {
    s.connect(
        0,
        key(k),
        ConnId(u64::from(k)),
        [1, 1, 1, k].into(),
        Hello::Enrol {
            secret_hash: hash_secret(b"t"),
            name: name.into(),
            endpoints: ep(1),
        },
    )
}

#[test]
fn restore_keeps_everything() {
    let mut s = st();
    s.create_token(
        0,
        TokenSpec {
            uses: Some(5),
            ..Default::default()
        },
        hash_secret(b"t"),
    )
    .unwrap();
    for k in 1..=3 {
        enrol(&mut s, k, b"t").unwrap();
    }
    s.remove_host("h2").unwrap();
    let _ = s.poll_pushes();
    let hosts: Vec<Host> = s.hosts().cloned().collect();
    let tokens: Vec<Token> = s.tokens().cloned().collect();
    let mut r = CoordinatorState::restore(
        IpPool::new("100.64.0.0/24".parse().unwrap(), None).unwrap(),
        hosts.clone(),
        tokens.clone(),
        s.map_version(),
    )
    .unwrap();
    assert_eq!(r.hosts().cloned().collect::<Vec<_>>(), hosts);
    assert_eq!(r.tokens().next().unwrap().uses_left, Some(2));
    // Next enrol gets a fresh id and reuses the freed address.
    let info = enrol(&mut r, 9, b"t").unwrap();
    assert_eq!(info.id, HostId(4));
    assert_eq!(info.addresses[0].to_string(), "100.64.0.3");
}
