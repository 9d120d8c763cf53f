//! The tokio driver of [`AgentSession`]: one task per session that opens the transport when
//! the session asks, feeds it frames, timer expiries and local changes, and carries out its
//! actions. All protocol decisions are the session's.
//!
//! The session sits behind a mutex shared with the [`SessionHandle`] (as quinn's `Connection`
//! shares its quinn-proto state): the handle's methods feed their input directly — so a full
//! block queue hands the batch back at once — and wake the task to drain the actions. The lock
//! is never held across an await.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use meshd_channel::noise::{ChannelError, NoiseWriter};
use meshd_control::proto::{AgentMessage, CoordinatorMessage, EndpointReport};
use meshd_control::session::{Action, AgentSession, Input, SessionParams, SessionState};
use meshd_control::NetworkMap;
use meshd_tunnel::{PrivateKey, PublicKey};
use parking_lot::Mutex;
use rand_core::{OsRng, RngCore as _};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::transport::{open, ClientError, Open};

/// Frames read ahead of the session (the reader task waits when they are not taken).
const FRAMES_QUEUED: usize = 16;

/// Where a rotated host key is kept (issue 17). The driver makes the key; the host stores it.
/// Both calls must be durable when they return (fsync'd, 0600).
pub trait KeyStore: Send + Sync + std::fmt::Debug {
    /// Keeps `key` as the next key, before it is proposed to the coordinator.
    fn save_next(&self, key: &PrivateKey) -> std::io::Result<()>;
    /// Makes `key` (saved earlier) this host's key, before the host uses it.
    fn promote(&self, key: &PrivateKey) -> std::io::Result<()>;
}

/// Session parameters.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Coordinator control address, tried first (the one that worked last).
    pub coordinator: SocketAddr,
    /// The other coordinator replicas, tried in order when `coordinator` fails (fail-over;
    /// each `Welcome`'s list replaces them, see [`SessionHandle::coordinators`]).
    pub fallbacks: Vec<SocketAddr>,
    /// Pinned coordinator key.
    pub coordinator_key: PublicKey,
    /// This host's WireGuard private key.
    pub private_key: PrivateKey,
    /// Initial endpoint report.
    pub endpoints: EndpointReport,
    /// Last persisted map (published until the first map arrives; fail-static).
    pub initial_map: Option<NetworkMap>,
    /// A shared client endpoint (`None`: one per session).
    pub endpoint: Option<crate::ClientEndpoint>,
    /// Firewall mark for the session's own socket (when `endpoint` is `None`).
    pub fwmark: Option<u32>,
    /// Where rotated keys go; `None`: rotation requests are not answered (the coordinator
    /// gives up after its time-out).
    pub key_store: Option<Arc<dyn KeyStore>>,
    /// Verified admin statements (signed policy): pinned at enrolment or restored from disk.
    /// `None`: the session pins the first admin key set it is sent.
    pub trust: Option<meshd_control::signed::TrustStore>,
}

impl SessionConfig {
    /// A config with no persisted map and its own QUIC socket.
    pub fn new(
        coordinator: SocketAddr,
        coordinator_key: PublicKey,
        private_key: PrivateKey,
        endpoints: EndpointReport,
    ) -> Self {
        SessionConfig {
            coordinator,
            fallbacks: Vec::new(),
            coordinator_key,
            private_key,
            endpoints,
            initial_map: None,
            endpoint: None,
            fwmark: None,
            key_store: None,
            trust: None,
        }
    }
}

#[derive(Debug)]
struct Shared {
    session: Mutex<AgentSession>,
    /// Set after feeding the session from outside the task: its actions want draining.
    wake: Notify,
}

impl Shared {
    fn input(&self, input: Input) {
        self.session.lock().handle_input(input, Instant::now());
        self.wake.notify_one();
    }
}

/// A running session.
#[derive(Debug)]
pub struct SessionHandle {
    shared: Arc<Shared>,
    map: watch::Receiver<Option<NetworkMap>>,
    state: watch::Receiver<SessionState>,
    key: watch::Receiver<PrivateKey>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl SessionHandle {
    /// The latest network map (`None` until one arrives, unless a persisted one was given).
    pub fn map(&self) -> watch::Receiver<Option<NetworkMap>> {
        self.map.clone()
    }

    /// The session state.
    pub fn state(&self) -> watch::Receiver<SessionState> {
        self.state.clone()
    }

    /// This host's key: changes when a rotation switches (already stored by the
    /// [`KeyStore`]); the host must switch its device to it.
    pub fn key(&self) -> watch::Receiver<PrivateKey> {
        self.key.clone()
    }

    /// Reports new local underlay endpoints (sent at once if connected, else on reconnect).
    pub fn report_endpoints(&self, addrs: Vec<SocketAddr>) {
        let report = {
            let s = self.shared.session.lock();
            if s.endpoints().addrs == addrs {
                return;
            }
            EndpointReport {
                addrs,
                ..s.endpoints().clone()
            }
        };
        self.shared.input(Input::Endpoints(report));
    }

    /// Replaces the whole endpoint report (addresses and listen port).
    pub fn report(&self, report: EndpointReport) {
        if *self.shared.session.lock().endpoints() == report {
            return;
        }
        self.shared.input(Input::Endpoints(report));
    }

    /// Queues denied-flow events for the coordinator (`meshctl blocks`); sent in messages of at
    /// most [`meshd_control::proto::MAX_BLOCKS_PER_MESSAGE`] events once connected. A full
    /// queue ([`crate::BLOCK_BATCHES_QUEUED`] batches), or a session that has ended, hands the
    /// batch back: count it and drop it.
    pub fn report_blocks(
        &self,
        events: Vec<meshd_policy::BlockEvent>,
    ) -> Result<(), Vec<meshd_policy::BlockEvent>> {
        if events.is_empty() {
            return Ok(());
        }
        self.shared.session.lock().queue_blocks(events)?;
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Queues one interval's flow records for the coordinator; sent in messages of at most
    /// [`meshd_control::flow::MAX_FLOWS_PER_MESSAGE`] records once connected. While the
    /// session is down the newest [`crate::FLOW_INTERVALS_QUEUED`] intervals wait; older ones
    /// are dropped and counted ([`flows_dropped`](Self::flows_dropped)).
    pub fn report_flows(&self, batch: meshd_control::session::FlowBatch) {
        if batch.is_empty() {
            return;
        }
        self.shared.session.lock().queue_flows(batch);
        self.shared.wake.notify_one();
    }

    /// How current the signed view is: last signed policy applied, refusals, since when.
    pub fn trust_status(&self) -> meshd_control::session::TrustStatus {
        self.shared.session.lock().trust_status().clone()
    }

    /// The verified admin statements (to persist: they only move forward).
    pub fn trust_store(&self) -> meshd_control::signed::TrustStore {
        self.shared.session.lock().trust().clone()
    }

    /// The coordinator addresses the session knows, the one that worked last first (what
    /// the last `Welcome` listed, else the configured ones): persist them for a restart.
    pub fn coordinators(&self) -> Vec<SocketAddr> {
        self.shared.session.lock().coordinators().to_vec()
    }

    /// The coordinator address being tried or connected to.
    pub fn coordinator(&self) -> SocketAddr {
        self.shared.session.lock().coordinator()
    }

    /// Flow-record intervals dropped unsent so far.
    pub fn flows_dropped(&self) -> u64 {
        self.shared.session.lock().flows_dropped()
    }

    /// Stops the session and waits for it.
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        let _finished_or_panicked = self.task.await;
    }
}

/// Starts a session: connect, `Resume`, follow maps, ack, report endpoints; reconnect — to
/// the next coordinator replica, with exponential backoff and jitter per round over them
/// (capped at [`crate::MAX_BACKOFF`]) — until refused for good.
/// Dropping the handle stops it too.
pub fn spawn_session(mut cfg: SessionConfig) -> SessionHandle {
    let initial_map = cfg.initial_map.take();
    let trust = cfg.trust.take();
    let session = AgentSession::new(
        SessionParams {
            coordinator: cfg.coordinator,
            fallbacks: cfg.fallbacks.clone(),
            endpoints: cfg.endpoints.clone(),
            initial_map: initial_map.clone(),
            jitter_seed: OsRng.next_u64(),
        },
        Instant::now(),
    );
    let mut session = match trust {
        Some(t) => session.with_trust(t),
        None => session,
    };
    // The initial map is the watch's first value (so it is not a change); the rest (the
    // connect) is for the task.
    let mut first = VecDeque::new();
    while let Some(a) = session.poll_action() {
        if !matches!(a, Action::ApplyMap(_)) {
            first.push_back(a);
        }
    }
    let (map_tx, map) = watch::channel(initial_map);
    let (state_tx, state) = watch::channel(session.state().clone());
    let (stop, stop_rx) = watch::channel(false);
    let (key_tx, key) = watch::channel(cfg.private_key.clone());
    let shared = Arc::new(Shared {
        session: Mutex::new(session),
        wake: Notify::new(),
    });
    let current = cfg.coordinator;
    let task = tokio::spawn(
        Driver {
            cfg,
            shared: shared.clone(),
            map_tx,
            state_tx,
            key_tx,
            next_key: None,
            link: Link::Down,
            current,
        }
        .run(first, stop_rx),
    );
    SessionHandle {
        shared,
        map,
        state,
        key,
        stop,
        task,
    }
}

type Connecting =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Open, ClientError>> + Send>>;

/// The live connection: dropping it closes the connection and stops its reader.
struct Live {
    conn: quinn::Connection,
    writer: NoiseWriter,
    frames: mpsc::Receiver<Result<CoordinatorMessage, ChannelError>>,
    _reader: AbortOnDrop,
    endpoint: crate::ClientEndpoint,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.conn.close(quinn::VarInt::from_u32(0), b"bye");
    }
}

enum Link {
    Down,
    Connecting(Connecting),
    Up(Live),
}

enum Event {
    Opened(Result<Open, ClientError>),
    Frame(Result<CoordinatorMessage, ChannelError>),
    Timer,
    Woken,
    Stop,
}

impl Link {
    /// The next thing the transport has to say (pending forever when down).
    async fn next(&mut self) -> Event {
        match self {
            Link::Down => std::future::pending().await,
            Link::Connecting(f) => Event::Opened(f.await),
            Link::Up(live) => Event::Frame(
                live.frames
                    .recv()
                    .await
                    .unwrap_or(Err(ChannelError::Closed)),
            ),
        }
    }
}

struct Driver {
    cfg: SessionConfig,
    shared: Arc<Shared>,
    map_tx: watch::Sender<Option<NetworkMap>>,
    state_tx: watch::Sender<SessionState>,
    key_tx: watch::Sender<PrivateKey>,
    /// A rotation's new key, saved and proposed, not switched to yet.
    next_key: Option<PrivateKey>,
    link: Link,
    /// The coordinator address of the last `Connect`.
    current: SocketAddr,
}

impl Driver {
    fn input(&self, input: Input) {
        self.shared
            .session
            .lock()
            .handle_input(input, Instant::now());
    }

    async fn run(mut self, mut pending: VecDeque<Action>, mut stop: watch::Receiver<bool>) {
        loop {
            while let Some(a) = pending
                .pop_front()
                .or_else(|| self.shared.session.lock().poll_action())
            {
                self.act(a).await;
            }
            let (finished, timeout) = {
                let s = self.shared.session.lock();
                (s.is_finished(), s.poll_timeout())
            };
            if finished {
                break;
            }
            let timer = async {
                match timeout {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            let event = tokio::select! {
                e = self.link.next() => e,
                () = timer => Event::Timer,
                () = self.shared.wake.notified() => Event::Woken,
                // A dropped handle stops the session as well.
                _ = stop.wait_for(|v| *v) => Event::Stop,
            };
            match event {
                Event::Opened(Ok(o)) => {
                    let Open {
                        conn,
                        mut reader,
                        writer,
                        endpoint,
                    } = o;
                    let (tx, frames) = mpsc::channel(FRAMES_QUEUED);
                    let reader = tokio::spawn(async move {
                        loop {
                            let r = reader.recv::<CoordinatorMessage>().await;
                            let end = r.is_err();
                            if tx.send(r).await.is_err() || end {
                                break;
                            }
                        }
                    });
                    self.link = Link::Up(Live {
                        conn,
                        writer,
                        frames,
                        _reader: AbortOnDrop(reader),
                        endpoint,
                    });
                    self.input(Input::TransportUp);
                }
                Event::Opened(Err(e)) => self.down(e),
                Event::Frame(Ok(m)) => self.input(Input::Frame(m)),
                Event::Frame(Err(e)) => self.down(ClientError::Channel(e)),
                Event::Timer => self.shared.session.lock().handle_timeout(Instant::now()),
                Event::Woken => {}
                Event::Stop => self.shared.session.lock().shutdown(),
            }
        }
        self.link = Link::Down;
    }

    /// The transport failed: drop it and tell the session.
    fn down(&mut self, e: ClientError) {
        self.link = Link::Down;
        self.input(Input::TransportDown {
            error: e.to_string(),
        });
    }

    async fn act(&mut self, a: Action) {
        match a {
            Action::Connect(addr) => {
                // Knocks (also the one after an address change) go where the session is
                // connecting to.
                self.current = addr;
                let coordinator_key = self.cfg.coordinator_key;
                let (key, endpoint, fwmark) = (
                    self.cfg.private_key.clone(),
                    self.cfg.endpoint.clone(),
                    self.cfg.fwmark,
                );
                // With other replicas to try, a silent one gets a few seconds, not the
                // whole timeout.
                let limit = if self.shared.session.lock().coordinators().len() > 1 {
                    crate::transport::FAILOVER_TIMEOUT
                } else {
                    crate::transport::TIMEOUT
                };
                self.link = Link::Connecting(Box::pin(async move {
                    open(
                        addr,
                        &coordinator_key,
                        &key,
                        meshd_channel::spa::KnockAs::Host,
                        endpoint.as_ref(),
                        fwmark,
                        limit,
                    )
                    .await
                }));
            }
            Action::Close => self.link = Link::Down,
            Action::Send(msg) => {
                if matches!(msg, AgentMessage::Resync) {
                    warn!("cannot apply map delta; asking for a full map");
                }
                // A frame for a transport that is gone is dropped (the session knows).
                let Link::Up(live) = &mut self.link else {
                    return;
                };
                if matches!(msg, AgentMessage::ReportEndpoints { .. }) {
                    // This host's underlay address changed, so its datagrams may now come from
                    // a source the coordinator's SPA filter has not seen: knock from there
                    // first, or the report (and the connection) would be dropped as a stranger's.
                    if let Err(e) = live.endpoint.knock(
                        self.current,
                        &self.cfg.coordinator_key,
                        &self.cfg.private_key,
                        meshd_channel::spa::KnockAs::Host,
                    ) {
                        debug!(error = %e, "knock after an address change");
                    }
                }
                if let Err(e) = live.writer.send(&msg).await {
                    self.down(ClientError::Channel(e));
                }
            }
            Action::ApplyMap(m) => {
                self.map_tx.send_replace(Some(Arc::unwrap_or_clone(m)));
            }
            Action::PrepareKey { nonce } => self.prepare_key(nonce),
            Action::SwitchKey { new_key } => self.switch_key(new_key),
            Action::TrustRefused(r) => {
                let reasons: Vec<String> = r.reasons.iter().map(ToString::to_string).collect();
                warn!(
                    map_version = r.map_version,
                    refused = r.refused_total,
                    reason = %reasons.join("; "),
                    "refused unsigned widening from the coordinator; applied only what admins signed"
                );
            }
            Action::State(s) => {
                match &s {
                    SessionState::Connected { host } => {
                        info!(host = %host.name, coordinator = %self.current, "control session up")
                    }
                    SessionState::Connecting {
                        last_error: Some(e),
                        ..
                    } => debug!(error = %e, "control session ended"),
                    SessionState::Refused { code, message } => {
                        warn!(%code, reason = %message, "coordinator refused this host; session stopped")
                    }
                    SessionState::Connecting { .. } | SessionState::Stopped => {}
                }
                self.state_tx.send_replace(s);
            }
        }
    }
}

impl Driver {
    /// Key rotation, step 1: a new key, stored durably before it is proposed.
    fn prepare_key(&mut self, nonce: meshd_control::rotation::Nonce) {
        let Some(store) = self.cfg.key_store.clone() else {
            warn!("the coordinator asked for a key rotation, but this session keeps no key file; ignored");
            return;
        };
        let key = PrivateKey::generate();
        if let Err(e) = store.save_next(&key) {
            warn!(error = %e, "key rotation: storing the new key failed; not proposing it");
            return;
        }
        let proof = meshd_control::rotation::prove(
            &key,
            &self.cfg.coordinator_key,
            &self.cfg.private_key.public_key(),
            &nonce,
        );
        info!(new_key = %key.public_key(), "key rotation: new key stored, proposing it");
        let new_key = key.public_key();
        // The old key hands on to the new one: peers in a signed mesh accept the new key as
        // this host on that signature (the coordinator cannot make one).
        let succession = meshd_control::signed::Succession::sign(
            &self.cfg.private_key,
            new_key,
            rand_core::OsRng,
        )
        .sig;
        self.next_key = Some(key);
        self.input(Input::KeyPrepared {
            nonce,
            new_key,
            proof,
            succession,
        });
    }

    /// Key rotation, step 2: the coordinator committed the key: store it as this host's
    /// key, then use it (the next connect authenticates with it; the host's device follows
    /// the key watch).
    fn switch_key(&mut self, new_key: PublicKey) {
        let Some(key) = self.next_key.take().filter(|k| k.public_key() == new_key) else {
            warn!(%new_key, "key rotation: asked to switch to a key this session did not make; ignored");
            return;
        };
        let Some(store) = self.cfg.key_store.clone() else {
            return;
        };
        if let Err(e) = store.promote(&key) {
            // Without the key on disk a restart would come back with a key the coordinator
            // no longer accepts: keep the old one (the coordinator aborts the rotation).
            warn!(error = %e, "key rotation: storing the switched key failed; keeping the old key");
            return;
        }
        info!(%new_key, old_key = %self.cfg.private_key.public_key(), "key rotation: switched to the new key");
        self.cfg.private_key = key.clone();
        self.key_tx.send_replace(key);
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
