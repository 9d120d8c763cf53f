//! meshd's fuzz surface: one function per parser of untrusted bytes, each taking the raw input
//! and returning nothing. Bad input must come back as a typed error or a counted drop; a panic
//! (or a broken invariant asserted here) is the bug.
//!
//! The same functions run in two places:
//! - `fuzz/fuzz_targets/<name>.rs`, one two-line cargo-fuzz target each (libFuzzer;
//!   `scripts/fuzz.sh SECONDS` runs them all, nightly or `RUSTC_BOOTSTRAP=1`);
//! - `tests/corpus.rs`, an ordinary `cargo test` on stable that replays every file of
//!   `fuzz/corpus/<name>/` (and the freshly generated [`seeds`]) through [`TARGETS`].
//!
//! Adding a target is one function here, one line in [`TARGETS`], seeds in [`seeds`], a
//! `fuzz/fuzz_targets/<name>.rs` and its `[[bin]]` in `fuzz/Cargo.toml` (the replay test
//! fails until all exist), and `MESHD_WRITE_CORPUS=1` to write its corpus directory.
#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ipnet::{IpNet, Ipv4Net};
use std::sync::Arc;
use std::time::Instant;

use meshd_channel::noise::{self, Inbound};
use meshd_control::proto::{
    encode_frame, AgentMessage, CoordinatorMessage, FrameDecoder, MAX_AGENT_FRAME,
    MAX_COORDINATOR_FRAME,
};
use meshd_control::session::{Action, Input};
use meshd_control::state::Hello;
use meshd_control::{cmdb, AgentSession, SessionParams};
use meshd_firewall::{BlockLog, BlockLogConfig, Firewall, Verdict};
use meshd_policy::{Direction, Grant, HostRef, PeerGrants, Policy, Proto};
use meshd_tunnel::{Decap, Destinations, Device, Encap, PeerSpec, PrivateKey};

pub mod seeds;

/// One fuzz target: its name (the corpus directory and the cargo-fuzz binary) and function.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// `fuzz/corpus/<name>/`, `fuzz/fuzz_targets/<name>.rs`.
    pub name: &'static str,
    /// Feeds one input.
    pub run: fn(&[u8]),
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "spa",
        run: spa,
    },
    Target {
        name: "decapsulate",
        run: decapsulate,
    },
    Target {
        name: "tunnel_inner",
        run: tunnel_inner,
    },
    Target {
        name: "firewall",
        run: firewall,
    },
    Target {
        name: "agent_frames",
        run: agent_frames,
    },
    Target {
        name: "coordinator_frames",
        run: coordinator_frames,
    },
    Target {
        name: "channel_handshake",
        run: channel_handshake,
    },
    Target {
        name: "channel_frames",
        run: channel_frames,
    },
    Target {
        name: "policy",
        run: policy,
    },
    Target {
        name: "config",
        run: config,
    },
    Target {
        name: "cmdb",
        run: cmdb,
    },
    Target {
        name: "admin_request",
        run: admin_request,
    },
];

/// Fixed wall-clock time for everything that takes `now` (2023-11-14, Unix seconds).
pub const NOW: u64 = 1_700_000_000;

/// The host under test's key (the receiving device, the coordinator).
pub fn our_key() -> PrivateKey {
    PrivateKey::from_bytes([0xa1; 32])
}

/// The one known peer's key (the sender, the agent).
pub fn peer_key() -> PrivateKey {
    PrivateKey::from_bytes([0xb2; 32])
}

/// The peer's underlay endpoint, where every datagram comes from.
pub fn peer_endpoint() -> SocketAddr {
    SocketAddr::from(([198, 18, 0, 2], 51820))
}

/// Our underlay endpoint.
pub fn our_endpoint() -> SocketAddr {
    SocketAddr::from(([198, 18, 0, 1], 51820))
}

pub(crate) fn spec(
    name: &str,
    key: &PrivateKey,
    ep: SocketAddr,
    ip: &str,
    grants: PeerGrants,
) -> PeerSpec {
    PeerSpec {
        name: name.into(),
        public_key: key.public_key(),
        endpoint: Some(ep),
        allowed_ips: ip.parse().into_iter().collect(),
        persistent_keepalive: None,
        preshared_key: None,
        grants: Arc::new(grants),
        next_key: None,
    }
}

fn grant(proto: Proto, lo: u16, hi: u16, expires_at: Option<u64>, rule: &str) -> Grant {
    Grant {
        proto,
        ports: (lo, hi),
        expires_at,
        rule: rule.into(),
    }
}

/// A small grants set: out tcp/1521, udp/53, icmp, tcp/22 (expired); in tcp/8000-8100, icmp,
/// udp/5000-5010 (expiring a minute after [`NOW`]).
pub fn grants() -> PeerGrants {
    PeerGrants {
        learn: false,
        outbound: vec![
            grant(Proto::Tcp, 1521, 1521, None, "app-db"),
            grant(Proto::Udp, 53, 53, None, "dns"),
            grant(Proto::Icmp, 0, 0, None, "ping"),
            grant(Proto::Tcp, 22, 22, Some(NOW - 60), "old-ssh"),
        ],
        inbound: vec![
            grant(Proto::Tcp, 8000, 8100, None, "web"),
            grant(Proto::Icmp, 0, 0, None, "ping"),
            grant(Proto::Udp, 5000, 5010, Some(NOW + 60), "media"),
        ],
        deny: meshd_policy::PeerDenies {
            outbound: vec![grant(Proto::Tcp, 23, 23, None, "no-telnet")],
            inbound: vec![grant(Proto::Tcp, 8080, 8080, None, "no-8080")],
        },
    }
}

/// The receiving device: our key, the peer at 100.64.0.2/32, our address 100.64.0.1.
pub fn our_device() -> Device {
    let dev = Device::new(our_key(), 0x1000);
    // A one-peer table with a valid key cannot fail to build.
    let _diff = dev.set_peers(&[spec(
        "b",
        &peer_key(),
        peer_endpoint(),
        "100.64.0.2/32",
        grants(),
    )]);
    // A routed prefix behind this host (10.9.0.0/16): a valid length cannot fail.
    let routed: Vec<IpNet> = Ipv4Net::new(Ipv4Addr::new(10, 9, 0, 0), 16)
        .map(IpNet::V4)
        .into_iter()
        .collect();
    dev.set_destinations(Destinations::new([IpAddr::from([100, 64, 0, 1])], &routed));

    dev
}

/// The sending peer's device, knowing us at 100.64.0.1/32.
pub fn peer_device() -> Device {
    let dev = Device::new(peer_key(), 0x2000);
    let _diff = dev.set_peers(&[spec(
        "a",
        &our_key(),
        our_endpoint(),
        "100.64.0.1/32",
        PeerGrants::allow_all("fuzz"),
    )]);
    dev
}

/// Any datagram at the tunnel port, from the known peer's endpoint: dropped (and counted),
/// answered or delivered, never a panic. One datagram per input; a fresh device each time.
pub fn decapsulate(data: &[u8]) {
    let dev = our_device();
    let table = dev.table();
    let mut out = vec![0u8; data.len().max(256)];
    if let Decap::Reply {
        peer: Some(peer), ..
    } = dev.decapsulate(&table, peer_endpoint(), data, &mut out)
    {
        let peer = peer.clone();
        dev.flush(&peer, &mut out, |_, _| {});
    }
}

/// Two devices with a session up; the peer seals, we open.
struct Session {
    ours: Device,
    theirs: Device,
}

impl Session {
    /// The peer initiates (its first packet queues), we answer, it completes.
    fn up() -> Option<Session> {
        let (ours, theirs) = (our_device(), peer_device());
        let probe = [0x45, 0, 0, 20];
        let init = seal(&theirs, &probe)?;
        let mut out = vec![0u8; 2048];
        let response = match ours.decapsulate(&ours.table(), peer_endpoint(), &init, &mut out) {
            Decap::Reply { datagram, .. } => datagram.to_vec(),
            _ => return None,
        };
        let mut out = vec![0u8; 2048];
        let _done = theirs.decapsulate(&theirs.table(), our_endpoint(), &response, &mut out);
        let s = Session { ours, theirs };
        // The session is up when the peer's next packet is a data message (type 4).
        (seal(&s.theirs, &probe)?.first() == Some(&4)).then_some(s)
    }
}

/// Seals `packet` on `dev`'s first peer; the datagram it would send.
pub(crate) fn seal(dev: &Device, packet: &[u8]) -> Option<Vec<u8>> {
    let table = dev.table();
    let peer = table.peers().first()?;
    let mut tunn = peer.lock();
    let mut out = vec![0u8; packet.len() + 148];
    match dev.encapsulate(peer, &mut tunn, packet, &mut out) {
        Encap::Send { datagram, .. } => Some(datagram.to_vec()),
        Encap::Queued | Encap::Drop(_) => None,
    }
}

thread_local! {
    static SESSION: RefCell<Option<Session>> = const { RefCell::new(None) };
}

/// Any inner packet from an authenticated peer (it holds a session and seals whatever it
/// likes): the receive path's checks after decryption — boringtun's IP header check, the
/// inner source against the peer's allowed IPs, the inner destination — then, as meshd's rx
/// worker does, the identity firewall (inbound, the peer's grants) and the block log.
pub fn tunnel_inner(data: &[u8]) {
    let _verdict = tunnel_inner_verdict(data);
}

/// [`tunnel_inner`]'s outcome: the firewall's verdict on a delivered packet, `None` when
/// the receive path dropped it (or no session could be set up).
pub fn tunnel_inner_verdict(data: &[u8]) -> Option<Verdict> {
    SESSION.with(|cell| {
        let mut cell = cell.borrow_mut();
        // Sessions expire (boringtun's own clock): start a new one when sealing stops.
        let mut datagram = cell.as_ref().and_then(|s| seal(&s.theirs, data));
        if datagram.as_ref().and_then(|d| d.first()) != Some(&4) {
            *cell = Session::up();
            datagram = cell.as_ref().and_then(|s| seal(&s.theirs, data));
        }
        let (s, d) = (cell.as_ref()?, datagram?);
        let table = s.ours.table();
        let mut out = vec![0u8; d.len()];
        let Decap::Deliver { peer, packet } =
            s.ours.decapsulate(&table, peer_endpoint(), &d, &mut out)
        else {
            return None;
        };
        let fw: Firewall<u32> = Firewall::new(small_firewall());
        let blocks = BlockLog::new(BlockLogConfig::default());
        let g = peer.grants();
        let now = NOW * 1000;
        let verdict = fw.check(peer.index, &g, 1, Direction::Inbound, packet, now);
        if let Verdict::Deny(denied) = &verdict {
            blocks.record(peer.index, denied, now);
            let _events = blocks.drain(now + 1000);
        }
        Some(verdict)
    })
}

fn small_firewall() -> meshd_firewall::Config {
    meshd_firewall::Config {
        max_flows: 64,
        max_flows_per_peer: 16,
        shards: 2,
        hash_seed: Some(1),
        ..meshd_firewall::Config::default()
    }
}

/// Splits `data` into records of `[header bytes][u16 BE length][that many bytes]` (the last
/// one takes what is left).
fn records(mut data: &[u8], header: usize) -> impl Iterator<Item = (&[u8], &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < header + 2 {
            return None;
        }
        let (h, rest) = data.split_at(header);
        let n = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let (body, tail) = rest[2..].split_at(n);
        data = tail;
        Some((h, body))
    })
}

/// Inner IP packets (IPv4/IPv6, TCP/UDP/ICMP, fragments, anything) into the identity
/// firewall with the [`grants`] set: a sequence of `[flags][u16 length][packet]` records
/// through one firewall. `flags`: bit 0 inbound, bit 1 the second peer, bit 2 a new grants
/// version (re-check), bits 4-7 seconds to advance. Then a sweep and a flow collection.
pub fn firewall(data: &[u8]) {
    let fw: Firewall<u32> = Firewall::new(small_firewall());
    let blocks = BlockLog::new(BlockLogConfig::default());
    let (g, none) = (grants(), PeerGrants::default());
    let (mut now, mut version) = (NOW * 1000, 1u64);
    for (h, packet) in records(data, 1) {
        let f = h[0];
        let dir = if f & 1 == 1 {
            Direction::Inbound
        } else {
            Direction::Outbound
        };
        let (peer, grants) = if f & 2 == 2 { (2, &none) } else { (1, &g) };
        version += u64::from(f >> 2 & 1);
        now += u64::from(f >> 4) * 1000;
        if let Verdict::Deny(d) = fw.check(peer, grants, version, dir, packet, now) {
            blocks.record(peer, &d, now);
        }
    }
    fw.sweep_all(now + 600_000);
    let _collected = fw.collect_flows(&mut |_| {});
    let _events = blocks.drain(now + 1000);
}

/// Any bytes an agent sends on its control stream, after decryption (the coordinator's side):
/// frames of [`AgentMessage`] up to [`MAX_AGENT_FRAME`]; the first one must be a hello
/// ([`Hello::from_first`]). What decodes re-encodes to the same message.
pub fn agent_frames(data: &[u8]) {
    let mut dec = FrameDecoder::new(MAX_AGENT_FRAME);
    if dec.push(data).is_err() {
        return;
    }
    let mut first = true;
    while let Ok(Some(msg)) = dec.next_message::<AgentMessage>() {
        roundtrip(&msg, MAX_AGENT_FRAME);
        if std::mem::take(&mut first) && Hello::from_first(msg).is_err() {
            return;
        }
    }
}

/// Encoding a decoded message gives a frame that decodes to it again.
fn roundtrip<T>(msg: &T, max: usize)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let Ok(frame) = encode_frame(msg, max) else {
        return;
    };
    let mut dec = FrameDecoder::new(max);
    let again = dec
        .push(&frame)
        .ok()
        .and_then(|()| dec.next_message::<T>().ok());
    assert_eq!(
        again.flatten().as_ref(),
        Some(msg),
        "re-encoded message differs"
    );
}

/// Any bytes the coordinator sends (the agent's side): frames of [`CoordinatorMessage`] up
/// to [`MAX_COORDINATOR_FRAME`] into the agent's control session ([`AgentSession`]); every
/// map it applies becomes peer specs and a peer table (`Device::set_peers`), as meshd's host
/// does. A malformed frame closes the transport, as the driver does.
pub fn coordinator_frames(data: &[u8]) {
    let t0 = Instant::now();
    let mut session = AgentSession::new(
        SessionParams {
            coordinator: std::net::SocketAddr::from(([127, 0, 0, 1], 7443)),
            fallbacks: vec![],
            endpoints: Default::default(),
            initial_map: None,
            jitter_seed: 7,
        },
        t0,
    );
    let dev = Device::new(our_key(), 0x3000);
    let apply = |s: &mut AgentSession| {
        while let Some(a) = s.poll_action() {
            if let Action::ApplyMap(map) = a {
                let specs = meshd_control::peer_specs(&map);
                let _diff = dev.set_peers(&specs);
            }
        }
    };
    apply(&mut session);
    session.handle_input(Input::TransportUp, t0);
    apply(&mut session);
    let mut dec = FrameDecoder::new(MAX_COORDINATOR_FRAME);
    if dec.push(data).is_err() {
        return;
    }
    loop {
        match dec.next_message::<CoordinatorMessage>() {
            Ok(Some(msg)) => {
                roundtrip(&msg, MAX_COORDINATOR_FRAME);
                session.handle_input(Input::Frame(msg), t0);
                apply(&mut session);
            }
            Ok(None) => break,
            Err(e) => {
                session.handle_input(
                    Input::TransportDown {
                        error: e.to_string(),
                    },
                    t0,
                );
                apply(&mut session);
                break;
            }
        }
    }
    let _state = session.state();
}

/// Any first message a stranger sends on the control stream: the coordinator's Noise IK
/// responder reads it; if it was a valid initiation, the answer is written and the transport
/// keys derived.
/// The join token and admin token secrets the SPA target's coordinator knows (their SHA-256
/// is what it stores).
pub const SPA_JOIN_SECRET: &[u8] = b"fuzz-join-token-secret";
/// See [`SPA_JOIN_SECRET`].
pub const SPA_ADMIN_SECRET: &[u8] = b"fuzz-admin-token";

/// One datagram at the coordinator's control port, into the SPA gate (format, Noise_X,
/// identity, skew, replay) against a view knowing [`peer_key`] as a host and one join and
/// one admin token: an admitted knock must be refused the second time (a replay).
pub fn spa(data: &[u8]) {
    use meshd_channel::spa::{Gate, SpaView};
    let mut view = SpaView::default();
    view.hosts.insert(peer_key().public_key());
    view.add_join_token(meshd_control::token::hash_secret(SPA_JOIN_SECRET), None);
    view.add_admin_token(meshd_control::token::hash_secret(SPA_ADMIN_SECRET), None);
    let mut gate = Gate::new(our_key(), 30_000, 64);
    let now_ms = NOW * 1000;
    if gate.check(now_ms, data, &view).is_ok() {
        assert!(
            gate.check(now_ms, data, &view).is_err(),
            "a replayed knock was admitted"
        );
    }
}

pub fn channel_handshake(data: &[u8]) {
    if let Ok((mut hs, _agent)) = noise::read_initiation(&our_key(), data) {
        let mut buf = vec![0u8; 65535];
        if hs.write_message(&[], &mut buf).is_ok() {
            let _transport = hs.into_stateless_transport_mode();
        }
    }
}

/// Both ends of one control channel's transport: (agent's, coordinator's).
type Transport = (
    Arc<snow::StatelessTransportState>,
    Arc<snow::StatelessTransportState>,
);

fn transport() -> Option<Transport> {
    let mut agent = noise::initiator(&peer_key(), &our_key().public_key()).ok()?;
    let mut buf = vec![0u8; 65535];
    let n = agent.write_message(&[], &mut buf).ok()?;
    let (mut coord, _) = noise::read_initiation(&our_key(), &buf[..n]).ok()?;
    let n = coord.write_message(&[], &mut buf).ok()?;
    let mut scratch = vec![0u8; 65535];
    agent.read_message(&buf[..n], &mut scratch).ok()?;
    Some((
        Arc::new(agent.into_stateless_transport_mode().ok()?),
        Arc::new(coord.into_stateless_transport_mode().ok()?),
    ))
}

thread_local! {
    static TRANSPORT: Option<Transport> = transport();
}

/// The control channel's chunking: an authenticated peer may cut its frames into Noise
/// transport messages any way it likes. `data[0]`: bit 0 set, the coordinator receives
/// (agent frames, [`MAX_AGENT_FRAME`]), else the agent receives (coordinator frames); bit 1
/// set, the chunks go in as ciphertext unsealed (forgeries). Then `[u16 length][chunk]`
/// records, each sealed with the next nonce and pushed into the receiver's [`Inbound`],
/// draining messages after each.
pub fn channel_frames(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    TRANSPORT.with(|t| {
        let Some((agent, coord)) = t else { return };
        let to_coordinator = mode & 1 == 1;
        let (sender, receiver, max) = if to_coordinator {
            (agent, coord, MAX_AGENT_FRAME)
        } else {
            (coord, agent, MAX_COORDINATOR_FRAME)
        };
        let mut inbound = Inbound::new(receiver.clone(), max);
        let mut sealed = vec![0u8; 65535];
        for (nonce, (_, chunk)) in (0u64..).zip(records(rest, 0)) {
            let cipher = if mode & 2 == 2 {
                chunk
            } else {
                match sender.write_message(nonce, chunk, &mut sealed) {
                    Ok(n) => &sealed[..n],
                    Err(_) => return,
                }
            };
            if inbound.push(cipher).is_err() {
                return;
            }
            let ok = if to_coordinator {
                drain::<AgentMessage>(&mut inbound)
            } else {
                drain::<CoordinatorMessage>(&mut inbound)
            };
            if !ok {
                return;
            }
        }
    });
}

/// Pulls every complete message; false on an error (the connection closes).
fn drain<T: serde::de::DeserializeOwned>(inbound: &mut Inbound) -> bool {
    loop {
        match inbound.next_message::<T>() {
            Ok(Some(_)) => continue,
            Ok(None) => return true,
            Err(_) => return false,
        }
    }
}

/// A small inventory to compile policies against.
pub fn inventory() -> Vec<HostRef> {
    let host = |id: u64, name: &str, labels: &[(&str, &str)]| HostRef {
        id,
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    vec![
        host(1, "web1", &[("app", "web"), ("env", "prod")]),
        host(2, "db1", &[("app", "db1"), ("env", "prod")]),
        host(3, "app1", &[("app", "app1"), ("env", "dev")]),
        host(4, "laptop", &[("team", "contractor")]),
    ]
}

/// Any policy file (YAML): a policy or an error with line and column; a policy then runs its
/// tests, compiles against [`inventory`] (grants for every host), explains every pair and
/// diffs against the empty policy.
pub fn policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(p) = Policy::parse(text) else { return };
    let hosts = inventory();
    let _results = meshd_policy::run_tests(&p, hosts.as_slice(), NOW);
    let compiled = meshd_policy::compile(&p, &hosts, NOW);
    let probes = [(6, 1521), (17, 53), (1, 0)]
        .map(|(ip_proto, port)| meshd_policy::Probe { ip_proto, port });
    for h in &hosts {
        let _grants = compiled.grants_for(h.id);
        for to in &hosts {
            for probe in probes {
                let _ex = compiled.explain(h.id, to.id, probe, NOW);
            }
        }
    }
    let _changes = meshd_policy::diff(&Policy::default(), &p, &hosts, NOW);
}

/// Any daemon config file (TOML): a config or an error naming file, line and field; a config
/// with an inline policy compiles its static grants (a `policy_file` is not read: no IO).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = meshd_config::Config::parse(text, "/nonexistent/fuzz.toml") else {
        return;
    };
    let _labels = meshd_config::static_peers::peer_labels(&cfg);
    if cfg.interface.policy_file.is_none() {
        let _grants = meshd_config::static_peers::static_grants(&cfg, NOW);
    }
}

/// Any CMDB import (CSV or JSON): rows or every bad row; from rows, the proposed policy is a
/// valid policy file.
pub fn cmdb(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = cmdb::parse(text) else { return };
    if let Ok(proposal) = cmdb::propose_policy("", &file.flows) {
        if let Err(e) = Policy::parse(&proposal) {
            panic!("proposed policy does not parse: {e:?}\n{proposal}");
        }
    }
}

/// The admin API's JSON request bodies (axum's `Json` extractor is serde; these are the
/// types it fills), then the checks the coordinator makes on them. `data[0]` picks the type.
pub fn admin_request(data: &[u8]) {
    use meshd_control::api::*;
    use meshd_control::model::{validate_label, validate_name};
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let labels = |l: &meshd_control::Labels| {
        for (k, v) in l {
            let _ok = validate_label(k, v);
        }
    };
    match which % 8 {
        0 => {
            if let Ok(r) = serde_json::from_slice::<LabelRequest>(body) {
                labels(&r.labels);
            }
        }
        1 => {
            let _r = serde_json::from_slice::<UnlabelRequest>(body);
        }
        2 => {
            if let Ok(r) = serde_json::from_slice::<RenameRequest>(body) {
                let _ok = validate_name(&r.name);
            }
        }
        3 => {
            if let Ok(r) = serde_json::from_slice::<TokenCreateRequest>(body) {
                labels(&r.labels);
            }
        }
        4 => {
            if let Ok(r) = serde_json::from_slice::<PolicyText>(body) {
                policy(r.yaml.as_bytes());
            }
        }
        5 => {
            if let Ok(r) = serde_json::from_slice::<ExplainRequest>(body) {
                let _probe = r.port.parse::<meshd_policy::Probe>();
            }
        }
        6 => {
            if let Ok(r) = serde_json::from_slice::<PolicyModeRequest>(body) {
                if let Some(g) = &r.group {
                    labels(g);
                }
            }
        }
        _ => {
            if let Ok(r) = serde_json::from_slice::<ImportRequest>(body) {
                let _errors = cmdb::validate(&r.file);
            }
        }
    }
}
