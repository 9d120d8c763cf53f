//! The in-process harness: one coordinator, N hosts (each an agent session and a device) over
//! fake links, in one thread with virtual time.
//!
//! - **Coordinator**: a [`SimCoordinator`] (the pure `CoordinatorState` with an in-memory
//!   store), fed each agent frame as the coordinator's connection task and actor would:
//!   `Enrol`/`Resume` → `connect` → `Welcome`; later frames → `report_endpoints` (with the
//!   connection's current source address taken afresh), `ack`, `resync`, `record_blocks`,
//!   `Pong`; after each batch the pushes go out as `FullMap`/`Delta` frames and kicks as an
//!   `Error` frame followed by the close.
//! - **Control channel**: per host one connection at a time, reliable and ordered with a fixed
//!   latency, as QUIC is. A partition between a host and the coordinator holds the frames; if
//!   it lasts [`IDLE_TIMEOUT`] the connection dies on both ends (QUIC's idle timeout), otherwise
//!   the held frames arrive once it heals. A connect while cut completes when it heals; a
//!   connect while the coordinator is down is never answered (the session times out).
//! - **Agents**: meshd_control's sans-IO [`AgentSession`], driven by its actions: `Connect`,
//!   `Send`, `Close`, `ApplyMap` (programs the device), `State` (a refusal clears the device).
//! - **Data plane**: a [`SimDevice`] per host — meshd's packet path over fake edges — on a
//!   seeded [`Network`]: what a host's fake bind sends is handed to the network (with the
//!   host's current underlay address as source), what the network delivers is fed to the
//!   destination's bind; the device's timers run every 100 ms of virtual time.
//!
//! Everything happens in [`Mesh::run_for`] / [`Mesh::run_until`], which jump the clock from one
//! due event to the next.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::{Ipv4Net, Ipv6Net};
use meshd_control::proto::{
    AgentMessage, CoordinatorMessage, ErrorCode, HostInfo, PROTOCOL_VERSION,
};
use meshd_control::session::{Action, AgentSession, Input, SessionParams, SessionState};
use meshd_control::state::TokenSpec;
use meshd_control::{CoordinatorState, HostId, Labels, NetworkMap, TokenSecret, UnixTime};
use meshd_tunnel::{PrivateKey, PublicKey};

use crate::coordinator::{Outbox, SimCoordinator};
use crate::device::{SendError, SimDevice, Transmit};
use crate::fixtures;
use crate::link::{LinkConfig, Network, NodeId};
use crate::rng::SimRng;
use crate::time::{Clock, Schedule};

/// QUIC's idle timeout on the control connection (`meshd_coordinator::quic::IDLE_TIMEOUT`).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the devices' timers run.
pub const TICK: Duration = Duration::from_millis(100);
/// The WireGuard port every host listens on.
pub const LISTEN_PORT: u16 = 51820;

/// A host of the mesh, by the order it was added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostIdx(pub usize);

/// Harness settings.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// Seed of every random choice (link faults, session jitter, keys).
    pub seed: u64,
    /// How data-plane links behave.
    pub link: LinkConfig,
    /// One-way latency of the control channel.
    pub control_latency: Duration,
    /// The coordinator's IPv4 pool.
    pub pool_v4: Ipv4Net,
    /// Its IPv6 pool, if any.
    pub pool_v6: Option<Ipv6Net>,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            seed: 1,
            link: LinkConfig::default(),
            control_latency: Duration::from_millis(2),
            pool_v4: Ipv4Net::new(Ipv4Addr::new(100, 64, 0, 0), 24).unwrap_or_default(),
            pool_v6: None,
        }
    }
}

/// An inner packet a host's stack received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    /// When.
    pub at: Instant,
    /// The peer it came from (by key: identity, not address).
    pub from: PublicKey,
    /// The IP packet.
    pub packet: Vec<u8>,
}

#[derive(Debug)]
enum ConnPhase {
    /// Connect asked for, transport not up yet.
    Opening,
    /// Transport up; `session` once the coordinator accepted the hello.
    Open {
        session: Option<(HostId, meshd_control::state::ConnId)>,
    },
}

#[derive(Debug)]
struct Conn {
    epoch: u64,
    phase: ConnPhase,
    /// Frames that met a partition, in order, with their direction (true: to the coordinator).
    held: Vec<Frame>,
}

#[derive(Debug, Clone)]
enum Frame {
    Up(AgentMessage),
    Down(CoordinatorMessage),
    /// The coordinator closed the connection (after its error frame).
    Closed(String),
}

#[derive(Debug)]
enum Ctl {
    TransportUp {
        host: HostIdx,
        epoch: u64,
    },
    Frame {
        host: HostIdx,
        epoch: u64,
        frame: Frame,
    },
    /// The agent closed: the coordinator sees the disconnect.
    AgentClosed {
        session: (HostId, meshd_control::state::ConnId),
    },
    /// QUIC idle timeout check for a connection that met a partition.
    Idle {
        host: HostIdx,
        epoch: u64,
    },
}

/// One host: its identity, agent session, device and what its stack received.
pub struct SimHost {
    /// Name it enrolled with.
    pub name: String,
    /// Its record as the coordinator sent it at enrolment.
    pub info: HostInfo,
    key: PrivateKey,
    node: NodeId,
    addr: SocketAddr,
    session: AgentSession,
    device: SimDevice,
    conn: Option<Conn>,
    /// Inner packets delivered to this host's stack.
    pub inbox: Vec<Inbound>,
    /// Every state the session went through.
    pub states: Vec<SessionState>,
    /// Maps the device refused.
    pub maps_refused: u64,
    /// Whether the control path to the coordinator is cut.
    control_cut: bool,
}

impl std::fmt::Debug for SimHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHost")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl SimHost {
    /// The coordinator's id of this host.
    pub fn id(&self) -> HostId {
        self.info.id
    }

    /// Its public key.
    pub fn public_key(&self) -> PublicKey {
        self.key.public_key()
    }

    /// Its underlay endpoint now.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its overlay IPv4 address.
    pub fn overlay_v4(&self) -> IpAddr {
        self.info
            .addresses
            .iter()
            .copied()
            .find(IpAddr::is_ipv4)
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }

    /// Its agent session.
    pub fn session(&self) -> &AgentSession {
        &self.session
    }

    /// Its device.
    pub fn device(&self) -> &SimDevice {
        &self.device
    }

    /// Whether its session is connected to the coordinator.
    pub fn is_connected(&self) -> bool {
        matches!(self.session.state(), SessionState::Connected { .. })
    }

    /// Inner packets received from `from` whose UDP payload is `payload`.
    pub fn received(&self, from: &PublicKey, payload: &[u8]) -> usize {
        self.inbox
            .iter()
            .filter(|i| i.from == *from && fixtures::udp_payload(&i.packet) == Some(payload))
            .count()
    }
}

/// Why a harness operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The coordinator refused the enrolment.
    #[error("enrolment refused: {0}")]
    Enrol(ErrorCode),
    /// The coordinator is down or cut off from the host.
    #[error("the coordinator is not reachable")]
    Unreachable,
    /// An admin operation failed.
    #[error(transparent)]
    Admin(#[from] meshd_control::state::AdminError),
    /// A policy was refused.
    #[error(transparent)]
    Policy(#[from] meshd_control::policy::PolicyError),
    /// The coordinator could not restart from its store.
    #[error(transparent)]
    Restart(#[from] crate::coordinator::RestartError),
    /// The device refused the packet.
    #[error("send: {0:?}")]
    Send(SendError),
}

/// The whole mesh. See the module docs.
pub struct Mesh {
    clock: Clock,
    net: Network,
    coord: SimCoordinator,
    coord_up: bool,
    hosts: Vec<SimHost>,
    control: Schedule<Ctl>,
    control_latency: Duration,
    next_epoch: u64,
    next_tick: Instant,
    rng: SimRng,
    next_move: u32,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("elapsed", &self.clock.elapsed())
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

fn unix_secs(c: &Clock) -> UnixTime {
    c.unix_secs()
}

impl Mesh {
    /// An empty mesh with a coordinator and no policy (default deny).
    pub fn new(cfg: MeshConfig) -> Result<Self, meshd_control::PoolError> {
        let clock = Clock::new();
        let mut rng = SimRng::new(cfg.seed);
        Ok(Mesh {
            next_tick: clock.now(),
            net: Network::new(rng.next_u64(), cfg.link),
            coord: SimCoordinator::new(cfg.pool_v4, cfg.pool_v6)?,
            coord_up: true,
            hosts: Vec::new(),
            control: Schedule::new(),
            control_latency: cfg.control_latency,
            next_epoch: 0,
            rng,
            next_move: 0,
            clock,
        })
    }

    /// The virtual clock.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Now.
    pub fn now(&self) -> Instant {
        self.clock.now()
    }

    /// The data-plane network (partitions, link settings, the wire log).
    pub fn net(&self) -> &Network {
        &self.net
    }

    /// The data-plane network, to change.
    pub fn net_mut(&mut self) -> &mut Network {
        &mut self.net
    }

    /// The coordinator.
    pub fn coordinator(&self) -> &SimCoordinator {
        &self.coord
    }

    /// The coordinator's state.
    pub fn state(&self) -> &CoordinatorState {
        self.coord.state()
    }

    /// A host.
    pub fn host(&self, h: HostIdx) -> &SimHost {
        &self.hosts[h.0]
    }

    /// All hosts, in the order they were added.
    pub fn hosts(&self) -> &[SimHost] {
        &self.hosts
    }

    /// A host by name.
    pub fn find(&self, name: &str) -> Option<HostIdx> {
        self.hosts.iter().position(|h| h.name == name).map(HostIdx)
    }

    /// Enrols a new host with `labels` (a one-use token, as `meshctl token create` and
    /// `meshd up --join` do) and starts its agent session, which then resumes.
    pub fn add_host(&mut self, name: &str, labels: Labels) -> Result<HostIdx, MeshError> {
        if !self.coord_up {
            return Err(MeshError::Unreachable);
        }
        let idx = HostIdx(self.hosts.len());
        let n = idx.0 as u32;
        let ip = Ipv4Addr::new(198, 18, (n / 250) as u8, (n % 250 + 1) as u8);
        let addr = SocketAddr::new(IpAddr::V4(ip), LISTEN_PORT);
        let key = fixtures::private_key(self.rng.next_u64());
        let mut secret = [0u8; 32];
        for c in secret.chunks_mut(8) {
            c.copy_from_slice(&self.rng.next_u64().to_le_bytes());
        }
        let secret = TokenSecret(secret);
        let now = unix_secs(&self.clock);
        let spec = TokenSpec {
            labels,
            ttl_secs: None,
            uses: Some(1),
        };
        self.coord.create_token(now, spec, &secret)?;
        self.coord.begin(now);
        let report = fixtures::endpoint_report(addr);
        let (conn, info) = self
            .coord
            .hello(
                now,
                key.public_key(),
                addr.ip(),
                AgentMessage::Enrol {
                    protocol: PROTOCOL_VERSION,
                    secret,
                    name: name.into(),
                    endpoints: report.clone(),
                },
            )
            .map_err(MeshError::Enrol)?;
        // The enrolment connection closes; the session resumes on a new one.
        self.coord.disconnect(now, info.id, conn);
        let out = self.coord.flush();
        let node = NodeId(idx.0 + 1);
        self.net.attach(node, addr.ip());
        let device = SimDevice::new(key.clone(), (self.rng.next_u64() as u32) | 1);
        device.set_addresses(&info.addresses);
        let session = AgentSession::new(
            SessionParams {
                coordinator: SocketAddr::from(([192, 0, 2, 1], 7443)),
                fallbacks: vec![],
                endpoints: report,
                initial_map: None,
                jitter_seed: self.rng.next_u64(),
            },
            self.clock.now(),
        );
        self.hosts.push(SimHost {
            name: info.name.clone(),
            info,
            key,
            node,
            addr,
            session,
            device,
            conn: None,
            inbox: Vec::new(),
            states: Vec::new(),
            maps_refused: 0,
            control_cut: false,
        });
        self.deliver(out);
        self.drive(idx);
        Ok(idx)
    }

    /// An admin operation on the coordinator's state at now, as one batch (its pushes and
    /// kicks go out after it).
    pub fn admin<R>(
        &mut self,
        op: impl FnOnce(&mut CoordinatorState, UnixTime) -> R,
    ) -> Result<R, MeshError> {
        if !self.coord_up {
            return Err(MeshError::Unreachable);
        }
        let now = unix_secs(&self.clock);
        self.coord.begin(now);
        let r = op(self.coord.state_mut(), now);
        let out = self.coord.flush();
        self.deliver(out);
        Ok(r)
    }

    /// Applies a policy file (`meshctl policy apply`).
    pub fn apply_policy(&mut self, yaml: &str) -> Result<(), MeshError> {
        self.admin(|s, now| s.apply_policy(now, yaml, "test").map(|_| ()))??;
        Ok(())
    }

    /// Moves a host to a new underlay address (its old one goes dead) and tells its session
    /// (the agent reports its endpoints). Returns the new endpoint.
    pub fn move_host(&mut self, h: HostIdx) -> SocketAddr {
        self.next_move += 1;
        let m = self.next_move;
        let ip = Ipv4Addr::new(198, 19, (m / 250) as u8, (m % 250 + 1) as u8);
        let new = SocketAddr::new(IpAddr::V4(ip), LISTEN_PORT);
        let host = &mut self.hosts[h.0];
        self.net.detach(host.addr.ip());
        self.net.attach(host.node, new.ip());
        host.addr = new;
        let now = self.clock.now();
        host.session
            .handle_input(Input::Endpoints(fixtures::endpoint_report(new)), now);
        self.drive(h);
        new
    }

    /// Cuts the data-plane path between two hosts (both ways).
    pub fn partition_hosts(&mut self, a: HostIdx, b: HostIdx) {
        let (na, nb) = (self.hosts[a.0].node, self.hosts[b.0].node);
        self.net.partition(na, nb);
    }

    /// Heals the data-plane path between two hosts.
    pub fn heal_hosts(&mut self, a: HostIdx, b: HostIdx) {
        let (na, nb) = (self.hosts[a.0].node, self.hosts[b.0].node);
        self.net.heal(na, nb);
    }

    /// Cuts one host's control path to the coordinator (both ways).
    pub fn partition_control(&mut self, h: HostIdx) {
        let now = self.clock.now();
        let host = &mut self.hosts[h.0];
        if host.control_cut {
            return;
        }
        host.control_cut = true;
        if let Some(c) = &host.conn {
            self.control.push(
                now + IDLE_TIMEOUT,
                Ctl::Idle {
                    host: h,
                    epoch: c.epoch,
                },
            );
        }
    }

    /// Heals one host's control path: held frames go on, a pending connect completes.
    pub fn heal_control(&mut self, h: HostIdx) {
        let at = self.clock.now() + self.control_latency;
        let coord_up = self.coord_up;
        let host = &mut self.hosts[h.0];
        if !host.control_cut {
            return;
        }
        host.control_cut = false;
        let Some(c) = host.conn.as_mut() else { return };
        let epoch = c.epoch;
        for frame in std::mem::take(&mut c.held) {
            self.control.push(
                at,
                Ctl::Frame {
                    host: h,
                    epoch,
                    frame,
                },
            );
        }
        if matches!(c.phase, ConnPhase::Opening) && coord_up {
            self.control.push(
                at + self.control_latency,
                Ctl::TransportUp { host: h, epoch },
            );
        }
    }

    /// Cuts every host's control path (the coordinator is partitioned away).
    pub fn partition_coordinator(&mut self) {
        for i in 0..self.hosts.len() {
            self.partition_control(HostIdx(i));
        }
    }

    /// Heals every host's control path.
    pub fn heal_coordinator(&mut self) {
        for i in 0..self.hosts.len() {
            self.heal_control(HostIdx(i));
        }
    }

    /// Kills the coordinator: its live sessions are gone, every agent's connection resets.
    pub fn stop_coordinator(&mut self) {
        self.coord_up = false;
        let at = self.clock.now() + self.control_latency;
        for (i, host) in self.hosts.iter_mut().enumerate() {
            if let Some(c) = &host.conn {
                if matches!(c.phase, ConnPhase::Open { .. }) {
                    let frame = Frame::Closed("connection reset: coordinator went away".into());
                    self.control.push(
                        at,
                        Ctl::Frame {
                            host: HostIdx(i),
                            epoch: c.epoch,
                            frame,
                        },
                    );
                }
            }
        }
    }

    /// Starts the coordinator again from what its store holds.
    pub fn start_coordinator(&mut self) -> Result<(), MeshError> {
        self.coord.restart(unix_secs(&self.clock))?;
        self.coord_up = true;
        Ok(())
    }

    /// [`stop_coordinator`](Self::stop_coordinator) then
    /// [`start_coordinator`](Self::start_coordinator).
    pub fn restart_coordinator(&mut self) -> Result<(), MeshError> {
        self.stop_coordinator();
        self.start_coordinator()
    }

    /// Sends a UDP datagram from `from`'s stack to `to`'s overlay address, port `dport`.
    pub fn send_udp(
        &mut self,
        from: HostIdx,
        to: HostIdx,
        dport: u16,
        payload: &[u8],
    ) -> Result<(), MeshError> {
        let dst = self.hosts[to.0].overlay_v4();
        self.send_udp_to(from, dst, dport, payload)
    }

    /// Sends a UDP datagram from `from`'s stack to `dst`.
    pub fn send_udp_to(
        &mut self,
        from: HostIdx,
        dst: IpAddr,
        dport: u16,
        payload: &[u8],
    ) -> Result<(), MeshError> {
        let (now, ms) = (self.clock.now(), self.clock.unix_millis());
        let host = &mut self.hosts[from.0];
        let packet = fixtures::udp(host.overlay_v4(), 40_000, dst, dport, payload);
        let tx = host
            .device
            .send(now, ms, &packet)
            .map_err(MeshError::Send)?;
        let src = host.addr;
        self.transmit(src, tx);
        Ok(())
    }

    fn transmit(&mut self, from: SocketAddr, tx: Vec<Transmit>) {
        let now = self.clock.now();
        for t in tx {
            self.net.send(now, from, t.to, t.datagram);
        }
    }

    /// What the coordinator's state says `h`'s map should hold now (its version aside).
    pub fn expected_map(&self, h: HostIdx) -> NetworkMap {
        self.coord.state().full_map_for(self.hosts[h.0].id(), 0)
    }

    /// Runs for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let until = self.clock.now() + d;
        self.run_until(until);
    }

    /// Runs every event due up to `until`, then sets the clock to `until`.
    pub fn run_until(&mut self, until: Instant) {
        // A generous bound: a livelock is a bug in the harness or the code under test.
        for _ in 0..50_000_000u64 {
            let Some(next) = self.next_event().filter(|t| *t <= until) else {
                self.clock.advance_to(until);
                return;
            };
            self.clock.advance_to(next);
            self.step();
        }
        panic!("the mesh never went quiet before {until:?}");
    }

    fn next_event(&self) -> Option<Instant> {
        let policy = self
            .coord_up
            .then(|| self.coord.state().policy_timeout())
            .flatten()
            .map(|t| self.clock.instant_of_unix_secs(t));
        [
            self.net.next_at(),
            self.control.next_at(),
            Some(self.next_tick),
            policy,
        ]
        .into_iter()
        .chain(self.hosts.iter().map(|h| h.session.poll_timeout()))
        .flatten()
        .min()
    }

    fn step(&mut self) {
        let now = self.clock.now();
        let (ms, secs) = (self.clock.unix_millis(), self.clock.unix_secs());
        while let Some(d) = self.net.poll(now) {
            let Some(h) = self.hosts.iter().position(|h| h.node == d.node) else {
                continue;
            };
            let host = &mut self.hosts[h];
            let r = host.device.receive(now, ms, d.from, &d.payload);
            if let Some((from, packet)) = r.delivered {
                host.inbox.push(Inbound {
                    at: now,
                    from,
                    packet,
                });
            }
            let src = host.addr;
            self.transmit(src, r.transmits);
        }
        while let Some((_, e)) = self.control.pop_due(now) {
            self.control_event(e);
        }
        if self.coord_up
            && self
                .coord
                .state()
                .policy_timeout()
                .is_some_and(|t| t <= secs)
        {
            self.coord.begin(secs);
            let out = self.coord.flush();
            self.deliver(out);
        }
        for i in 0..self.hosts.len() {
            if self.hosts[i]
                .session
                .poll_timeout()
                .is_some_and(|t| t <= now)
            {
                self.hosts[i].session.handle_timeout(now);
                self.drive(HostIdx(i));
            }
        }
        if self.next_tick <= now {
            for i in 0..self.hosts.len() {
                let host = &mut self.hosts[i];
                let tx = host.device.tick(now, ms);
                let src = host.addr;
                self.transmit(src, tx);
            }
            self.next_tick = now + TICK;
        }
    }

    /// Carries out a session's actions.
    fn drive(&mut self, h: HostIdx) {
        let now = self.clock.now();
        let lat = self.control_latency;
        while let Some(a) = self.hosts[h.0].session.poll_action() {
            let host = &mut self.hosts[h.0];
            match a {
                // Simulated hosts keep their keys (no key store): rotation requests go
                // unanswered and the coordinator aborts them.
                Action::PrepareKey { .. } | Action::SwitchKey { .. } => {}
                Action::Connect(_) => {
                    self.next_epoch += 1;
                    let epoch = self.next_epoch;
                    host.conn = Some(Conn {
                        epoch,
                        phase: ConnPhase::Opening,
                        held: Vec::new(),
                    });
                    if self.coord_up && !host.control_cut {
                        // QUIC handshake, stream and Noise: about one and a half round trips.
                        self.control
                            .push(now + lat * 3, Ctl::TransportUp { host: h, epoch });
                    }
                }
                Action::Send(m) => {
                    if let Some(c) = &host.conn {
                        let frame = Frame::Up(m);
                        self.control.push(
                            now + lat,
                            Ctl::Frame {
                                host: h,
                                epoch: c.epoch,
                                frame,
                            },
                        );
                    }
                }
                Action::Close => {
                    if let Some(Conn {
                        phase: ConnPhase::Open { session: Some(s) },
                        ..
                    }) = host.conn.take()
                    {
                        let at = if host.control_cut {
                            now + IDLE_TIMEOUT
                        } else {
                            now + lat
                        };
                        self.control.push(at, Ctl::AgentClosed { session: s });
                    }
                }
                Action::ApplyMap(map) => {
                    if host.device.apply_map(&map).is_err() {
                        host.maps_refused += 1;
                    }
                }
                Action::State(s) => {
                    if matches!(s, SessionState::Refused { .. }) {
                        host.device.clear();
                    }
                    host.states.push(s);
                }
                // Signed policy: the session's own counters say what it refused.
                Action::TrustRefused(_) => {}
            }
        }
    }

    fn control_event(&mut self, e: Ctl) {
        let now = self.clock.now();
        match e {
            Ctl::TransportUp { host: h, epoch } => {
                let host = &mut self.hosts[h.0];
                let Some(c) = host.conn.as_mut().filter(|c| c.epoch == epoch) else {
                    return;
                };
                if !matches!(c.phase, ConnPhase::Opening) || !self.coord_up {
                    return;
                }
                if host.control_cut {
                    // Completes when the path heals.
                    return;
                }
                c.phase = ConnPhase::Open { session: None };
                host.session.handle_input(Input::TransportUp, now);
                self.drive(h);
            }
            Ctl::Frame {
                host: h,
                epoch,
                frame,
            } => {
                let host = &mut self.hosts[h.0];
                let Some(c) = host.conn.as_mut().filter(|c| c.epoch == epoch) else {
                    return;
                };
                if host.control_cut {
                    c.held.push(frame);
                    return;
                }
                match frame {
                    Frame::Up(m) => self.at_coordinator(h, m),
                    Frame::Down(m) => {
                        host.session.handle_input(Input::Frame(m), now);
                        self.drive(h);
                    }
                    Frame::Closed(error) => {
                        host.conn = None;
                        host.session
                            .handle_input(Input::TransportDown { error }, now);
                        self.drive(h);
                    }
                }
            }
            Ctl::AgentClosed { session } => {
                if self.coord_up {
                    let secs = unix_secs(&self.clock);
                    self.coord.begin(secs);
                    self.coord.disconnect(secs, session.0, session.1);
                    let out = self.coord.flush();
                    self.deliver(out);
                }
            }
            Ctl::Idle { host: h, epoch } => {
                let host = &mut self.hosts[h.0];
                if !host.control_cut || host.conn.as_ref().is_none_or(|c| c.epoch != epoch) {
                    return;
                }
                let Some(c) = host.conn.take() else { return };
                host.session.handle_input(
                    Input::TransportDown {
                        error: "timed out (idle)".into(),
                    },
                    now,
                );
                if let ConnPhase::Open {
                    session: Some((id, conn)),
                } = c.phase
                {
                    if self.coord_up {
                        let secs = unix_secs(&self.clock);
                        self.coord.begin(secs);
                        self.coord.disconnect(secs, id, conn);
                        let out = self.coord.flush();
                        self.deliver(out);
                    }
                }
                self.drive(h);
            }
        }
    }

    /// A frame arrived at the coordinator over `h`'s connection.
    fn at_coordinator(&mut self, h: HostIdx, m: AgentMessage) {
        if !self.coord_up {
            return;
        }
        let secs = unix_secs(&self.clock);
        let host = &mut self.hosts[h.0];
        let Some(c) = host.conn.as_mut() else { return };
        let ConnPhase::Open { session } = &mut c.phase else {
            return;
        };
        let epoch = c.epoch;
        let observed = host.addr.ip();
        let key = host.key.public_key();
        self.coord.begin(secs);
        let mut replies = Vec::new();
        match *session {
            None => match self.coord.hello(secs, key, observed, m) {
                Ok((conn, info)) => {
                    *session = Some((info.id, conn));
                    replies.push(Frame::Down(CoordinatorMessage::Welcome {
                        protocol: PROTOCOL_VERSION,
                        host: info,
                        replicas: vec![],
                    }));
                }
                Err(code) => {
                    replies.push(Frame::Down(error_frame(code)));
                    replies.push(Frame::Closed(format!("closed by the coordinator: {code}")));
                }
            },
            Some((id, conn)) => match self.coord.message(secs, id, conn, observed, m) {
                Ok(reply) => replies.extend(reply.map(Frame::Down)),
                Err(code) => {
                    self.coord.disconnect(secs, id, conn);
                    replies.push(Frame::Down(error_frame(code)));
                    replies.push(Frame::Closed(format!("closed by the coordinator: {code}")));
                }
            },
        }
        let at = self.clock.now() + self.control_latency;
        for frame in replies {
            self.control.push(
                at,
                Ctl::Frame {
                    host: h,
                    epoch,
                    frame,
                },
            );
        }
        let out = self.coord.flush();
        self.deliver(out);
    }

    /// Sends a batch's pushes and kicks to the connections they name.
    fn deliver(&mut self, out: Outbox) {
        let at = self.clock.now() + self.control_latency;
        let by_session: BTreeMap<_, _> = self
            .hosts
            .iter()
            .enumerate()
            .filter_map(|(i, h)| match &h.conn {
                Some(Conn {
                    epoch,
                    phase: ConnPhase::Open { session: Some(s) },
                    ..
                }) => Some((*s, (HostIdx(i), *epoch))),
                _ => None,
            })
            .collect();
        for p in out.pushes {
            if let Some(&(host, epoch)) = by_session.get(&(p.host, p.conn)) {
                let frame = Frame::Down(p.message);
                self.control.push(at, Ctl::Frame { host, epoch, frame });
            }
        }
        for k in out.kicks {
            if let Some(&(host, epoch)) = by_session.get(&(k.host, k.conn)) {
                if let Some(Conn {
                    phase: ConnPhase::Open { session },
                    ..
                }) = self.hosts[host.0].conn.as_mut()
                {
                    *session = None;
                }
                for frame in [
                    Frame::Down(error_frame(k.code)),
                    Frame::Closed(format!("closed by the coordinator: {}", k.code)),
                ] {
                    self.control.push(at, Ctl::Frame { host, epoch, frame });
                }
            }
        }
    }
}

fn error_frame(code: ErrorCode) -> CoordinatorMessage {
    CoordinatorMessage::Error {
        code,
        message: code.to_string(),
    }
}
