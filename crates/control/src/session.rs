//! The agent's control session as a state machine without IO, in the style of quinn-proto.
//!
//! [`AgentSession`] knows the protocol an agent speaks to the coordinator: open a transport,
//! say `Resume` with the endpoint report, wait for `Welcome`, then follow the network map (a
//! full map, then deltas; each applied map is acked, a delta that does not fit the map asks
//! for a full one with `Resync`), report endpoint changes, queued block events and flow
//! records (one [`FlowBatch`] per interval, in chunks of at most [`MAX_FLOWS_PER_MESSAGE`]
//! records), and, when
//! anything fails, close and reconnect after an exponential backoff with jitter — until the
//! coordinator refuses the host for good. It reads no clock, opens no socket and spawns
//! nothing: the driver (`meshd-agent`, over QUIC + Noise) does the IO.
//!
//! Call order, repeated for as long as the session lives:
//! 1. feed what happened: [`AgentSession::handle_input`] (transport up or down, a frame from
//!    the coordinator, new endpoints, block events) and, once the instant from
//!    [`AgentSession::poll_timeout`] has passed, [`AgentSession::handle_timeout`];
//! 2. drain [`AgentSession::poll_action`] until it returns `None`, carrying out each
//!    [`Action`] in order (connect, send a frame, close, apply a map, show a state);
//! 3. wait for the next input or for [`AgentSession::poll_timeout`].
//!
//! Frames are only ever asked to be sent between an [`Input::TransportUp`] and the next
//! [`Input::TransportDown`] or [`Action::Close`]; the first one is always `Resume`.
//!
//! Fail-over: the session knows every coordinator replica's address (the join token's, then
//! each `Welcome`'s list) and [`Action::Connect`] names the one to try. When a connect fails
//! or an established connection is lost, the next address is tried after a short pause
//! ([`STEP_PAUSE`], jittered); only a whole round over the list failing counts as one step of
//! the exponential backoff, and every round starts at the address that worked last. The map
//! is kept throughout (fail-static) until a coordinator sends a new one.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshd_policy::BlockEvent;

use crate::flow::{FlowRecord, MAX_FLOWS_PER_MESSAGE};
use crate::map::NetworkMap;
use crate::proto::{
    AgentMessage, CoordinatorMessage, EndpointReport, ErrorCode, HostInfo, MAX_BLOCKS_PER_MESSAGE,
    PROTOCOL_VERSION,
};

/// Reconnect backoff cap.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The backoff before the first reconnect attempt (before jitter).
pub const BASE_BACKOFF: Duration = Duration::from_millis(100);
/// How long a requested transport may take to come up (QUIC handshake, stream, Noise).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the coordinator may take to answer `Resume` with `Welcome`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause before trying the next coordinator address within one round (before jitter:
/// 50–100 % of it, so the agents of a replica that went away do not all arrive at once).
pub const STEP_PAUSE: Duration = BASE_BACKOFF;
/// Most coordinator addresses a session keeps (a `Welcome` naming more is cut).
pub const MAX_COORDINATORS: usize = 16;
/// Batches of block events the session holds while the coordinator is slow or unreachable.
pub const BLOCK_BATCHES_QUEUED: usize = 16;
/// Flow-record intervals the session holds while the coordinator is slow or unreachable: a
/// newer interval pushes out the oldest (counted in [`AgentSession::flows_dropped`]).
pub const FLOW_INTERVALS_QUEUED: usize = 6;

pub use crate::flow::FlowBatch;

impl FlowBatch {
    /// Nothing to report.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.plaintext.is_empty() && self.overflow == 0
    }

    /// Takes the next message's worth (at most [`MAX_FLOWS_PER_MESSAGE`] records and
    /// plaintext flows together; the overflow count goes with the first).
    fn next_message(&mut self) -> AgentMessage {
        let n = self.records.len().min(MAX_FLOWS_PER_MESSAGE);
        let records: Vec<FlowRecord> = self.records.drain(..n).collect();
        let m = self.plaintext.len().min(MAX_FLOWS_PER_MESSAGE - n);
        let plaintext = self.plaintext.drain(..m).collect();
        AgentMessage::Flows {
            interval_start: self.interval_start,
            records,
            plaintext,
            overflow: std::mem::take(&mut self.overflow),
        }
    }
}

/// Backoff before reconnect attempt `attempt` (1-based): 100 ms doubling, capped at
/// [`MAX_BACKOFF`], then 50–100 % of that chosen by `random` (any value; uniform is best).
pub fn backoff(attempt: u32, random: u32) -> Duration {
    let exp = BASE_BACKOFF.saturating_mul(1u32 << attempt.saturating_sub(1).min(10));
    let d = exp.min(MAX_BACKOFF);
    let frac = 0.5 + f64::from(random % 1000) / 2000.0;
    d.mul_f64(frac)
}

/// A small xorshift64* generator for the backoff jitter (seeded by the driver).
#[derive(Debug, Clone)]
struct Jitter(u64);

impl Jitter {
    fn new(seed: u64) -> Self {
        // xorshift has one fixed point, zero.
        Jitter(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    fn next_u32(&mut self) -> u32 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        // The high half of the product is the well-mixed part.
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as u32
    }
}

/// What a session starts from.
#[derive(Debug, Clone)]
pub struct SessionParams {
    /// The coordinator address tried first (the one that worked last).
    pub coordinator: SocketAddr,
    /// The other replicas' addresses, tried in this order when `coordinator` fails.
    pub fallbacks: Vec<SocketAddr>,
    /// The endpoint report sent in the first `Resume`.
    pub endpoints: EndpointReport,
    /// Last persisted map: applied at once and kept until the first map arrives (fail-static).
    pub initial_map: Option<NetworkMap>,
    /// Seed for the backoff jitter (the driver passes a random one; tests a fixed one).
    pub jitter_seed: u64,
}

/// Where the session is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionState {
    /// Not connected; `attempt` failures in a row so far.
    Connecting {
        /// Consecutive failures.
        attempt: u32,
        /// The last failure.
        last_error: Option<String>,
    },
    /// Connected and following the map.
    Connected {
        /// Our record as the coordinator sent it.
        host: HostInfo,
    },
    /// Refused for good (host removed, unknown host …): the session stopped.
    Refused {
        /// Why.
        code: ErrorCode,
        /// Detail.
        message: String,
    },
    /// Stopped by [`AgentSession::shutdown`].
    Stopped,
}

/// Something that happened, fed to [`AgentSession::handle_input`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The driver's QUIC+Noise transport to the coordinator is up.
    TransportUp,
    /// It failed or closed.
    TransportDown {
        /// Why (shown as the state's `last_error`).
        error: String,
    },
    /// A frame from the coordinator.
    Frame(CoordinatorMessage),
    /// Local underlay endpoints changed.
    Endpoints(EndpointReport),
    /// Denied-flow events to report. The queue is bounded ([`BLOCK_BATCHES_QUEUED`] batches):
    /// a batch that does not fit is dropped and counted ([`AgentSession::blocks_dropped`]);
    /// use [`AgentSession::queue_blocks`] to get it handed back instead.
    Blocks(Vec<BlockEvent>),
    /// One interval's flow records (see [`AgentSession::queue_flows`]).
    Flows(FlowBatch),
    /// The driver made and stored the new key an [`Action::PrepareKey`] asked for: propose
    /// it to the coordinator.
    KeyPrepared {
        /// The request's challenge.
        nonce: crate::rotation::Nonce,
        /// The new public key.
        new_key: meshd_tunnel::PublicKey,
        /// [`crate::rotation::prove`] over the nonce.
        proof: crate::rotation::Proof,
        /// The old key's signature over the new one ([`crate::signed::Succession::sign`]).
        succession: crate::signed::Sig,
    },
}

/// Something the driver must do, drained with [`AgentSession::poll_action`].
#[must_use]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Open the transport to this coordinator address (knock there first); answer with
    /// [`Input::TransportUp`] or [`Input::TransportDown`].
    Connect(SocketAddr),
    /// Send this frame on the open transport.
    Send(AgentMessage),
    /// Close the transport (the session then waits for its reconnect timer).
    Close,
    /// Apply this map to the host; the host persists what it accepted.
    ApplyMap(Arc<NetworkMap>),
    /// The session state changed.
    State(SessionState),
    /// Key rotation: make a new key, store it durably, prove it over `nonce` (see
    /// [`crate::rotation::prove`]) and answer with [`Input::KeyPrepared`].
    PrepareKey {
        /// The coordinator's challenge.
        nonce: crate::rotation::Nonce,
    },
    /// Key rotation: the coordinator committed `new_key` and peers accept it: make it this
    /// host's key (device and file) now. The session then closes the transport and
    /// reconnects, and the next [`Action::Connect`] must use the new key.
    SwitchKey {
        /// The key prepared earlier.
        new_key: meshd_tunnel::PublicKey,
    },
    /// Part of an update was not applied: a widening no admin signed, or a statement that
    /// did not verify (log it; [`AgentSession::trust_status`] has the totals).
    TrustRefused(TrustReport),
}

/// What an agent did not apply of one update, and why ([`Action::TrustRefused`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustReport {
    /// The map version the update led to.
    pub map_version: u64,
    /// Each refused statement or cut grant.
    pub reasons: Vec<crate::signed::Refusal>,
    /// Updates with refusals so far.
    pub refused_total: u64,
}

/// How current the agent's signed view is (`meshd status`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustStatus {
    /// The pinned admin key-set fingerprint (`None`: unsigned mesh, maps applied as sent).
    pub pinned: Option<crate::signed::Hash32>,
    /// The newest verified signed policy version applied.
    pub policy_version: Option<u64>,
    /// Updates with refusals so far.
    pub refused: u64,
    /// Since when updates are refused (cleared by an update applied in full).
    pub refused_since: Option<Instant>,
    /// The first reason of the latest refusal.
    pub last_reason: Option<String>,
}

/// Why a connection ended (its `Display` is the state's `last_error`).
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("coordinator refused: {code} ({message})")]
    Refused { code: ErrorCode, message: String },
    #[error("timed out waiting for the coordinator")]
    Timeout,
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("{0}")]
    Transport(String),
}

#[derive(Debug)]
enum Phase {
    /// No transport; reconnect at `until`.
    Waiting { until: Instant },
    /// A transport was asked for ([`Action::Connect`]).
    Connecting { deadline: Instant },
    /// `Resume` sent with `sent`; waiting for `Welcome`.
    Hello {
        deadline: Instant,
        sent: EndpointReport,
    },
    /// Following the map; `reported` is the endpoint report the coordinator last got.
    Connected {
        have_full: bool,
        reported: EndpointReport,
    },
    /// Refused for good.
    Refused,
    /// Shut down.
    Stopped,
}

impl Phase {
    fn has_transport(&self) -> bool {
        matches!(
            self,
            Phase::Connecting { .. } | Phase::Hello { .. } | Phase::Connected { .. }
        )
    }
}

/// The agent's side of one long-lived control session (see the module docs for the call
/// order).
#[derive(Debug)]
pub struct AgentSession {
    phase: Phase,
    state: SessionState,
    attempt: u32,
    endpoints: EndpointReport,
    map: Option<Arc<NetworkMap>>,
    blocks: VecDeque<Vec<BlockEvent>>,
    blocks_dropped: u64,
    flows: VecDeque<FlowBatch>,
    flows_dropped: u64,
    actions: VecDeque<Action>,
    jitter: Jitter,
    /// Coordinator addresses, never empty; a new round starts at index 0, the one that worked
    /// last.
    addrs: Vec<SocketAddr>,
    /// The address being tried or connected to.
    cursor: usize,
    /// Failed attempts in the current round.
    tried: usize,
    /// Whole rounds failed in a row (the backoff's attempt number).
    rounds: u32,
    /// `unknown host` answers in a row, from different addresses (see
    /// [`AgentSession::refused`]).
    unknown_in_a_row: usize,
    /// Key rotation: switch to this key at this instant (after `KeyAccepted`).
    switch: Option<(Instant, meshd_tunnel::PublicKey)>,
    /// Verified admin statements (signed policy); inactive until a key set is pinned.
    trust: crate::signed::TrustStore,
    /// The `Trust` frame for the next map or delta.
    pending_trust: Option<Box<crate::signed::TrustBundle>>,
    /// This host's key (from `Welcome`).
    own_key: Option<meshd_tunnel::PublicKey>,
    trust_status: TrustStatus,
}

impl AgentSession {
    /// A session that connects at once: the first [`poll_action`](Self::poll_action)s yield
    /// [`Action::ApplyMap`] of the initial map, if any (fail-static), then [`Action::Connect`].
    pub fn new(params: SessionParams, now: Instant) -> Self {
        let mut actions = VecDeque::new();
        let map = params.initial_map.map(Arc::new);
        if let Some(m) = &map {
            actions.push_back(Action::ApplyMap(m.clone()));
        }
        let mut addrs = vec![params.coordinator];
        for a in params.fallbacks {
            if !addrs.contains(&a) && addrs.len() < MAX_COORDINATORS {
                addrs.push(a);
            }
        }
        actions.push_back(Action::Connect(addrs[0]));
        AgentSession {
            phase: Phase::Connecting {
                deadline: now + CONNECT_TIMEOUT,
            },
            state: SessionState::Connecting {
                attempt: 0,
                last_error: None,
            },
            attempt: 0,
            endpoints: params.endpoints,
            map,
            blocks: VecDeque::new(),
            blocks_dropped: 0,
            flows: VecDeque::new(),
            flows_dropped: 0,
            actions,
            jitter: Jitter::new(params.jitter_seed),
            addrs,
            cursor: 0,
            tried: 0,
            rounds: 0,
            unknown_in_a_row: 0,
            switch: None,
            trust: crate::signed::TrustStore::default(),
            pending_trust: None,
            own_key: None,
            trust_status: TrustStatus::default(),
        }
    }

    /// Checks maps against admin-signed statements from `store` on (pinned at enrolment, or
    /// restored from disk). Without it the session pins the first key set it is sent.
    pub fn with_trust(mut self, store: crate::signed::TrustStore) -> Self {
        self.trust_status.pinned = store.pin;
        self.trust_status.policy_version = store.policy_version();
        self.trust = store;
        self
    }

    /// The verified admin statements (persist them so they only move forward).
    pub fn trust(&self) -> &crate::signed::TrustStore {
        &self.trust
    }

    /// Staleness: the last signed policy applied, refusals and since when.
    pub fn trust_status(&self) -> &TrustStatus {
        &self.trust_status
    }

    /// The map to apply for the coordinator's `raw` map: cut to what the signed statements
    /// allow, with any refusal reported.
    fn checked(&mut self, raw: &Arc<NetworkMap>, now: Instant) -> Arc<NetworkMap> {
        let mut reasons = Vec::new();
        if let Some(b) = self.pending_trust.take() {
            let got = self.trust.absorb(&b);
            reasons.extend(got.refused);
        }
        self.trust_status.pinned = self.trust.pin;
        self.trust_status.policy_version = self.trust.policy_version();
        if !self.trust.is_active() {
            return raw.clone();
        }
        let own = self.own_key.unwrap_or(meshd_tunnel::PublicKey([0; 32]));
        let (map, cut) = self.trust.filter(&own, raw);
        self.trust.retain_hosts(&own, raw);
        reasons.extend(cut);
        if reasons.is_empty() {
            self.trust_status.refused_since = None;
            return if map == **raw {
                raw.clone()
            } else {
                Arc::new(map)
            };
        }
        self.trust_status.refused = self.trust_status.refused.saturating_add(1);
        self.trust_status.refused_since.get_or_insert(now);
        self.trust_status.last_reason = reasons.first().map(|r| r.to_string());
        self.actions.push_back(Action::TrustRefused(TrustReport {
            map_version: raw.version,
            reasons,
            refused_total: self.trust_status.refused,
        }));
        Arc::new(map)
    }

    /// Feeds one input.
    pub fn handle_input(&mut self, input: Input, now: Instant) {
        match input {
            Input::TransportUp => {
                // A late answer to a connect the session has given up on is ignored: the
                // driver was told to close it.
                if let Phase::Connecting { .. } = self.phase {
                    let sent = self.endpoints.clone();
                    self.actions.push_back(Action::Send(AgentMessage::Resume {
                        protocol: PROTOCOL_VERSION,
                        endpoints: sent.clone(),
                    }));
                    self.phase = Phase::Hello {
                        deadline: now + HELLO_TIMEOUT,
                        sent,
                    };
                }
            }
            Input::TransportDown { error } => {
                if self.phase.has_transport() {
                    self.fail(now, Failure::Transport(error), false);
                }
            }
            Input::Frame(msg) => self.on_frame(msg, now),
            Input::Endpoints(report) => self.endpoints = report,
            Input::Blocks(events) => {
                if self.queue_blocks(events).is_err() {
                    self.blocks_dropped = self.blocks_dropped.saturating_add(1);
                }
            }
            Input::Flows(batch) => self.queue_flows(batch),
            Input::KeyPrepared {
                nonce,
                new_key,
                proof,
                succession,
            } => {
                // Only on the connection that asked (a proof is bound to its nonce anyway).
                if let Phase::Connected { .. } = self.phase {
                    self.actions
                        .push_back(Action::Send(AgentMessage::KeyProposal {
                            nonce,
                            new_key,
                            proof,
                            succession: Some(succession),
                        }));
                }
            }
        }
    }

    /// Queues one interval's flow records, sent once the session is established (after
    /// `Welcome`, after any queued block events) in [`AgentMessage::Flows`] messages of at
    /// most [`MAX_FLOWS_PER_MESSAGE`] records. At most [`FLOW_INTERVALS_QUEUED`] intervals
    /// wait: a new one pushes out the oldest, counted in
    /// [`flows_dropped`](Self::flows_dropped) (so does a batch given to a refused or stopped
    /// session). Empty batches are ignored.
    pub fn queue_flows(&mut self, batch: FlowBatch) {
        if batch.is_empty() {
            return;
        }
        if matches!(self.phase, Phase::Refused | Phase::Stopped) {
            self.flows_dropped = self.flows_dropped.saturating_add(1);
            return;
        }
        if self.flows.len() >= FLOW_INTERVALS_QUEUED {
            self.flows.pop_front();
            self.flows_dropped = self.flows_dropped.saturating_add(1);
        }
        self.flows.push_back(batch);
    }

    /// Queues denied-flow events, sent after `Welcome` in messages of at most
    /// [`MAX_BLOCKS_PER_MESSAGE`] events. A full queue ([`BLOCK_BATCHES_QUEUED`] batches), or
    /// a session that was refused or stopped, hands the batch back.
    pub fn queue_blocks(&mut self, events: Vec<BlockEvent>) -> Result<(), Vec<BlockEvent>> {
        if events.is_empty() {
            return Ok(());
        }
        if matches!(self.phase, Phase::Refused | Phase::Stopped)
            || self.blocks.len() >= BLOCK_BATCHES_QUEUED
        {
            return Err(events);
        }
        self.blocks.push_back(events);
        Ok(())
    }

    /// Acts on the timer from [`poll_timeout`](Self::poll_timeout) (early calls do nothing).
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some((at, new_key)) = self.switch {
            if now >= at && matches!(self.phase, Phase::Connected { .. }) {
                self.switch = None;
                self.actions.push_back(Action::SwitchKey { new_key });
                // Reconnect with the new key: the coordinator completes the rotation on it.
                self.drop_sends();
                self.actions.push_back(Action::Close);
                self.phase = Phase::Waiting { until: now };
                self.set_state(SessionState::Connecting {
                    attempt: 0,
                    last_error: Some("reconnecting with the rotated key".into()),
                });
                return;
            }
        }
        match self.phase {
            Phase::Waiting { until } if now >= until => {
                self.phase = Phase::Connecting {
                    deadline: now + CONNECT_TIMEOUT,
                };
                self.actions
                    .push_back(Action::Connect(self.addrs[self.cursor]));
            }
            Phase::Connecting { deadline } | Phase::Hello { deadline, .. } if now >= deadline => {
                self.fail(now, Failure::Timeout, true);
            }
            _ => {}
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) wants to be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Waiting { until } => Some(*until),
            Phase::Connecting { deadline } | Phase::Hello { deadline, .. } => Some(*deadline),
            Phase::Connected { .. } => self.switch.map(|(at, _)| at),
            Phase::Refused | Phase::Stopped => None,
        }
    }

    /// The next thing to do, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        if let Some(a) = self.actions.pop_front() {
            return Some(a);
        }
        let Phase::Connected { reported, .. } = &mut self.phase else {
            return None;
        };
        if *reported != self.endpoints {
            *reported = self.endpoints.clone();
            return Some(Action::Send(AgentMessage::ReportEndpoints {
                endpoints: self.endpoints.clone(),
            }));
        }
        if let Some(front) = self.blocks.front_mut() {
            let events = if front.len() <= MAX_BLOCKS_PER_MESSAGE {
                self.blocks.pop_front().unwrap_or_default()
            } else {
                front.drain(..MAX_BLOCKS_PER_MESSAGE).collect()
            };
            return Some(Action::Send(AgentMessage::Blocks { events }));
        }
        let front = self.flows.front_mut()?;
        let msg = front.next_message();
        if front.records.is_empty() && front.plaintext.is_empty() {
            self.flows.pop_front();
        }
        Some(Action::Send(msg))
    }

    /// Stops for good: closes the transport, if any, and ends in [`SessionState::Stopped`]
    /// (a refused session stays refused).
    pub fn shutdown(&mut self) {
        if matches!(self.phase, Phase::Refused | Phase::Stopped) {
            return;
        }
        self.drop_sends();
        if self.phase.has_transport() {
            self.actions.push_back(Action::Close);
        }
        self.phase = Phase::Stopped;
        self.blocks.clear();
        self.flows.clear();
        self.set_state(SessionState::Stopped);
    }

    /// The coordinator addresses the session knows, the one that worked last first (persist
    /// them: a restarted agent starts from this list).
    pub fn coordinators(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The address being tried or connected to.
    pub fn coordinator(&self) -> SocketAddr {
        self.addrs[self.cursor]
    }

    /// The current map (the initial one until the coordinator sends one).
    pub fn map(&self) -> Option<&NetworkMap> {
        self.map.as_deref()
    }

    /// The session state.
    pub fn state(&self) -> &SessionState {
        &self.state
    }

    /// The endpoint report the session holds (sent in the next `Resume`, or already reported).
    pub fn endpoints(&self) -> &EndpointReport {
        &self.endpoints
    }

    /// Batches of block events queued, not yet sent.
    pub fn blocks_queued(&self) -> usize {
        self.blocks.len()
    }

    /// Batches given as [`Input::Blocks`] that were dropped because the queue was full (or the
    /// session refused or stopped).
    pub fn blocks_dropped(&self) -> u64 {
        self.blocks_dropped
    }

    /// Intervals of flow records queued, not yet (fully) sent.
    pub fn flows_queued(&self) -> usize {
        self.flows.len()
    }

    /// Intervals of flow records dropped unsent: pushed out of a full queue
    /// ([`FLOW_INTERVALS_QUEUED`]), or given to a refused or stopped session.
    pub fn flows_dropped(&self) -> u64 {
        self.flows_dropped
    }

    /// True once the session will never do anything again (refused or stopped).
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Refused | Phase::Stopped)
    }

    fn on_frame(&mut self, msg: CoordinatorMessage, now: Instant) {
        match &mut self.phase {
            Phase::Hello { sent, .. } => match msg {
                CoordinatorMessage::Welcome { host, replicas, .. } => {
                    self.phase = Phase::Connected {
                        have_full: false,
                        reported: std::mem::take(sent),
                    };
                    self.attempt = 0;
                    self.worked(&replicas);
                    self.own_key = Some(host.public_key);
                    self.pending_trust = None;
                    self.set_state(SessionState::Connected { host });
                }
                CoordinatorMessage::Error { code, message } => self.refused(code, message, now),
                other => self.fail(
                    now,
                    Failure::Protocol(format!("expected welcome, got {}", kind(&other))),
                    true,
                ),
            },
            Phase::Connected { have_full, .. } => match msg {
                CoordinatorMessage::FullMap { map } => {
                    let version = map.version;
                    let map = Arc::new(map);
                    self.map = Some(map.clone());
                    *have_full = true;
                    let map = self.checked(&map, now);
                    self.actions.push_back(Action::ApplyMap(map));
                    self.actions
                        .push_back(Action::Send(AgentMessage::Ack { version }));
                }
                CoordinatorMessage::Delta { delta } => {
                    let applied = match self.map.as_mut() {
                        Some(m) if *have_full && m.version == delta.from_version => {
                            Arc::make_mut(m).apply(&delta).is_ok()
                        }
                        _ => false,
                    };
                    match (applied, self.map.clone()) {
                        (true, Some(m)) => {
                            let m = self.checked(&m, now);
                            self.actions.push_back(Action::ApplyMap(m));
                            self.actions.push_back(Action::Send(AgentMessage::Ack {
                                version: delta.to_version,
                            }));
                        }
                        _ => {
                            if let Phase::Connected { have_full, .. } = &mut self.phase {
                                *have_full = false;
                            }
                            self.pending_trust = None;
                            self.actions.push_back(Action::Send(AgentMessage::Resync));
                        }
                    }
                }
                CoordinatorMessage::Trust { bundle } => self.pending_trust = Some(bundle),
                CoordinatorMessage::Pong { .. } => {}
                CoordinatorMessage::RotateKey { nonce } => {
                    self.actions.push_back(Action::PrepareKey { nonce });
                }
                CoordinatorMessage::KeyAccepted {
                    new_key,
                    switch_after_ms,
                } => {
                    // At most a minute, whatever the coordinator says.
                    let wait = Duration::from_millis(switch_after_ms.min(60_000));
                    self.switch = Some((now + wait, new_key));
                }
                CoordinatorMessage::Error { code, message } => self.refused(code, message, now),
                CoordinatorMessage::Welcome { .. } => {
                    self.fail(now, Failure::Protocol("second welcome".into()), true)
                }
            },
            // No transport the session knows of: a stale frame.
            Phase::Waiting { .. } | Phase::Connecting { .. } | Phase::Refused | Phase::Stopped => {}
        }
    }

    /// The coordinator sent an error: stop for good, or reconnect if the code says it may help.
    fn refused(&mut self, code: ErrorCode, message: String, now: Instant) {
        // With replicas, `unknown host` may come from one that has not followed this host's
        // enrolment yet (replicas follow each other within a second): final only when every
        // address has said so, one after the other.
        if code == ErrorCode::UnknownHost && self.addrs.len() > 1 {
            self.unknown_in_a_row += 1;
            if self.unknown_in_a_row < self.addrs.len() {
                self.fail(now, Failure::Refused { code, message }, true);
                return;
            }
        }
        if code.is_retryable() {
            self.fail(now, Failure::Refused { code, message }, true);
            return;
        }
        self.drop_sends();
        self.actions.push_back(Action::Close);
        self.phase = Phase::Refused;
        self.blocks.clear();
        self.flows.clear();
        self.set_state(SessionState::Refused { code, message });
    }

    /// The address being tried answered `Welcome`: it becomes the first of the list (tried
    /// first from now on), and the coordinator's list of replicas, if it sent one, replaces
    /// the others.
    fn worked(&mut self, replicas: &[SocketAddr]) {
        let good = self.addrs[self.cursor];
        let mut addrs = vec![good];
        let others: Vec<SocketAddr> = if replicas.is_empty() {
            self.addrs.clone()
        } else {
            replicas.to_vec()
        };
        for a in others {
            let usable = !a.ip().is_unspecified() && a.port() != 0;
            if usable && !addrs.contains(&a) && addrs.len() < MAX_COORDINATORS {
                addrs.push(a);
            }
        }
        self.addrs = addrs;
        self.cursor = 0;
        self.tried = 0;
        self.rounds = 0;
        self.unknown_in_a_row = 0;
    }

    /// The connection ended: close it if the driver does not know yet, wait, reconnect —
    /// to the next address, or, after a whole round failed, to the first one after the
    /// backoff.
    fn fail(&mut self, now: Instant, why: Failure, close: bool) {
        self.drop_sends();
        // A switch not made on this connection is not made: the coordinator aborts it.
        self.switch = None;
        if close {
            self.actions.push_back(Action::Close);
        }
        if !matches!(
            why,
            Failure::Refused {
                code: ErrorCode::UnknownHost,
                ..
            }
        ) {
            self.unknown_in_a_row = 0;
        }
        self.attempt = self.attempt.saturating_add(1);
        self.tried += 1;
        let wait = if self.tried >= self.addrs.len() {
            self.tried = 0;
            self.cursor = 0;
            self.rounds = self.rounds.saturating_add(1);
            backoff(self.rounds, self.jitter.next_u32())
        } else {
            self.cursor = (self.cursor + 1) % self.addrs.len();
            STEP_PAUSE.mul_f64(0.5 + f64::from(self.jitter.next_u32() % 1000) / 2000.0)
        };
        self.phase = Phase::Waiting { until: now + wait };
        self.set_state(SessionState::Connecting {
            attempt: self.attempt,
            last_error: Some(why.to_string()),
        });
    }

    /// Frames not yet handed out were meant for a transport that is gone.
    fn drop_sends(&mut self) {
        self.actions.retain(|a| !matches!(a, Action::Send(_)));
    }

    fn set_state(&mut self, s: SessionState) {
        if self.state != s {
            self.state = s.clone();
            self.actions.push_back(Action::State(s));
        }
    }
}

fn kind(m: &CoordinatorMessage) -> &'static str {
    match m {
        CoordinatorMessage::Welcome { .. } => "welcome",
        CoordinatorMessage::FullMap { .. } => "full_map",
        CoordinatorMessage::Delta { .. } => "delta",
        CoordinatorMessage::Trust { .. } => "trust",
        CoordinatorMessage::Pong { .. } => "pong",
        CoordinatorMessage::RotateKey { .. } => "rotate_key",
        CoordinatorMessage::KeyAccepted { .. } => "key_accepted",
        CoordinatorMessage::Error { .. } => "error",
    }
}

#[cfg(test)]
mod tests;
