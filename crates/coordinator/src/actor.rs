//! The actor: one task owns the reconciliation state ([`CoordinatorState`]) and the store;
//! agent connections and the admin API send it [`Cmd`]s through [`Commands`].
//!
//! It handles commands in batches: apply all pending commands to the pure state, poll pushes
//! and kicks, commit the dirty records and the batch's audit events in one transaction (on a
//! blocking thread), and only then reply and push. A failed commit rolls the batch back: the
//! state is rebuilt from the store. No lock is ever held across network or disk IO.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use meshd_control::api::{HealthView, StoreFailure, EVENTS_MAX};
use meshd_control::proto::{CoordinatorMessage, EndpointReport, ErrorCode, HostInfo};
use meshd_control::state::{
    AdminError, ConnId, Dirty, FlowBatch, FlowLimits, Hello, ScanAlert, ScanConfig, ScanDetector,
};
use meshd_control::{AuditEvent, CoordinatorState, EventKind, HostId, IpPool, UnixTime};
use meshd_store::{Snapshot, Store};
use meshd_tunnel::PublicKey;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::error::{chain, RestoreStateError, Stopped};
use crate::metrics::Metrics;
use crate::ops::{AdminOp, AdminReply, Identity, Ops};
use crate::webhook::Webhook;

/// How many times an admin operation is run when it keeps losing to other replicas' commits.
const CONFLICT_TRIES: u32 = 4;
/// How often [`follow_loop`] reads the store's generation when no notification comes.
pub(crate) const FOLLOW_POLL: Duration = Duration::from_secs(1);

const COMMAND_QUEUE: usize = 4096;
const MAX_BATCH: usize = 1024;
const MEMBERSHIP_BATCH_WINDOW: Duration = Duration::from_millis(50);
/// A storm (at least [`STORM_CONNECTS`] connects in one window) keeps gathering, window after
/// window, up to this long: each agent then gets one delta for many newcomers, where it would
/// get one per window. A lone change waits one window only.
const MEMBERSHIP_BATCH_MAX: Duration = Duration::from_millis(400);
const STORM_CONNECTS: usize = 2;

/// Seconds since the Unix epoch (the only clock read on the coordinator's state path).
pub use meshd_time::unix_now;

/// What a connection task sends its agent.
pub(crate) enum Outbound {
    /// A control message.
    Msg(CoordinatorMessage),
    /// An error message, then the end of the connection.
    Close(Refusal),
}

/// A session's welcome: the host as the agent sees it, and the connection's id.
#[derive(Debug)]
pub(crate) struct Welcome {
    /// The agent's host.
    pub(crate) info: HostInfo,
    /// This connection.
    pub(crate) conn: ConnId,
}

/// Why a connection is refused or closed, as the agent is told.
#[derive(Debug, Clone)]
pub(crate) struct Refusal {
    /// The error code.
    pub(crate) code: ErrorCode,
    /// The message.
    pub(crate) message: String,
}

impl Refusal {
    /// A refusal whose message is the code's own text.
    pub(crate) fn of(code: ErrorCode) -> Self {
        Refusal {
            code,
            message: code.to_string(),
        }
    }
}

/// The actor's answer to a [`Cmd::Connect`].
pub(crate) type ConnectReply = Result<Welcome, Refusal>;

/// The answer to an admin operation.
pub(crate) type AdminResult = Result<AdminReply, AdminError>;

/// A command for the actor.
pub(crate) enum Cmd {
    /// An agent proved `key` and said hello.
    Connect {
        key: PublicKey,
        observed: IpAddr,
        hello: Hello,
        tx: mpsc::Sender<Outbound>,
        conn: quinn::Connection,
        reply: oneshot::Sender<ConnectReply>,
        /// Earlier tries lost to another replica's commit.
        attempt: u32,
    },
    /// New underlay endpoints.
    Report {
        host: HostId,
        conn: ConnId,
        endpoints: EndpointReport,
    },
    /// The connection's source address changed.
    Observed {
        host: HostId,
        conn: ConnId,
        ip: IpAddr,
    },
    /// The agent applied `version`.
    Ack {
        host: HostId,
        conn: ConnId,
        version: u64,
    },
    /// The agent wants a full map.
    Resync { host: HostId, conn: ConnId },
    /// The connection ended.
    Disconnect { host: HostId, conn: ConnId },
    /// The agent's answer to a key rotation request (`proof_ok`: checked by the connection
    /// task, which holds the coordinator's key).
    KeyProposal {
        host: HostId,
        conn: ConnId,
        nonce: meshd_control::rotation::Nonce,
        new_key: PublicKey,
        proof_ok: bool,
        /// The old key's signature over the new one (checked by the state).
        succession: Option<meshd_control::signed::Sig>,
    },
    /// Block events from the agent.
    Blocks {
        host: HostId,
        conn: ConnId,
        events: Vec<meshd_policy::BlockEvent>,
    },
    /// Flow records of one interval from the agent.
    Flows {
        host: HostId,
        conn: ConnId,
        interval_start: UnixTime,
        records: Vec<meshd_control::FlowRecord>,
        plaintext: Vec<meshd_control::PlaintextFlow>,
        overflow: u64,
    },
    /// An admin operation.
    Admin {
        op: AdminOp,
        reply: oneshot::Sender<AdminResult>,
    },
    /// The store's generation is `generation` (another replica may have committed: see
    /// [`follow_loop`]).
    StoreChanged { generation: u64 },
}

/// The actor's inbox (bounded): what connection tasks and the admin API hold.
#[derive(Clone)]
pub(crate) struct Commands(mpsc::Sender<Cmd>);

impl Commands {
    /// Hands `c` to the actor (waits while the inbox is full).
    pub(crate) async fn send(&self, c: Cmd) -> Result<(), Stopped> {
        self.0.send(c).await.map_err(|_| Stopped)
    }

    /// Runs an admin operation and waits for its (committed) answer. A conflict with another
    /// replica's commit saved nothing, and the actor has reloaded the state since: the
    /// operation is run again, a few times.
    pub(crate) async fn admin(&self, op: AdminOp) -> Result<AdminResult, Stopped> {
        let mut tries = 0;
        loop {
            let (tx, rx) = oneshot::channel();
            self.send(Cmd::Admin {
                op: op.clone(),
                reply: tx,
            })
            .await?;
            let r = rx.await.map_err(|_| Stopped)?;
            tries += 1;
            if matches!(r, Err(AdminError::Conflict(_))) && tries < CONFLICT_TRIES {
                continue;
            }
            return Ok(r);
        }
    }
}

/// A reply held back until the batch is committed.
enum Deferred {
    /// The reply, and the command to run again if the batch loses to another replica's
    /// commit.
    Connect(
        oneshot::Sender<ConnectReply>,
        ConnectReply,
        Box<ConnectAgain>,
    ),
    /// The reply, and the operation itself if it only reads (after a failed commit it is
    /// answered again from the reloaded state: the batch it shared failed, not it).
    Admin(
        oneshot::Sender<AdminResult>,
        AdminResult,
        Option<Box<AdminOp>>,
    ),
}

/// A connect's inputs, kept until its batch is committed.
struct ConnectAgain {
    key: PublicKey,
    observed: IpAddr,
    hello: Hello,
    tx: mpsc::Sender<Outbound>,
    conn: quinn::Connection,
    attempt: u32,
}

/// One agent's live connection.
struct Live {
    conn_id: ConnId,
    /// The key the agent authenticated with (a reload re-attaches the session under it).
    key: PublicKey,
    tx: mpsc::Sender<Outbound>,
    conn: quinn::Connection,
    /// Opened to enrol: the agent closes it once enrolled and resumes on a new one.
    enrolment: bool,
    /// When the oldest push the agent has not acked yet went out (`push_ack_seconds`).
    unacked_since: Option<std::time::Instant>,
}

/// The task owning the state and the store.
pub(crate) struct Actor {
    state: CoordinatorState,
    store: Arc<dyn Store>,
    live: HashMap<HostId, Live>,
    next_conn: u64,
    identity: Identity,
    /// Events of this batch, not yet written to the store.
    events: Vec<AuditEvent>,
    /// The newest committed events (at most [`EVENTS_MAX`], oldest first): `GET /v1/events`
    /// is served from here, with no database read on the actor.
    recent: VecDeque<AuditEvent>,
    /// The empty pool the state is rebuilt over after a failed commit.
    pool: IpPool,
    /// The last failed commit, until one succeeds (`meshctl status`, `GET /v1/health`).
    store_failure: Option<StoreFailure>,
    /// Set when the state could not be reloaded after a failed commit: every command is
    /// refused until a reload works.
    stale: Option<String>,
    /// Flow ingest bounds (kept for reloads).
    flow_limits: FlowLimits,
    /// The scan detector (kept across a reload: its windows are evidence, not state).
    detector: ScanDetector,
    /// Labels the detector's actions set (release removes them).
    restricted: Vec<(String, String)>,
    /// Where alerts are POSTed (none configured: `None`).
    webhook: Option<Webhook>,
    /// This batch's alerts, sent once it is committed.
    alerts: Vec<ScanAlert>,
    /// Prometheus metrics (`--metrics-listen`).
    metrics: Arc<Metrics>,
    /// The SPA filter (told who may knock whenever hosts, join tokens or admin tokens
    /// change); `None`: SPA off.
    spa: Option<Arc<crate::spa::SpaFilter>>,
    /// Where the admin API reads the admin tokens from (published after each commit that
    /// changes them, and after a reload).
    admin_auth: watch::Sender<Arc<meshd_control::state::AdminTokens>>,
    /// Automatic key rotation periods (kept for reloads).
    rotation: meshd_control::rotation::RotationSchedule,
    /// The store generation the state is at: commits are fenced by it
    /// ([`Store::commit_at`]), a newer one (another replica's commit) is followed.
    generation: u64,
    /// The newest generation the store was seen at ([`Cmd::StoreChanged`]).
    follow_to: u64,
    /// Connects whose batch lost to another replica's commit, run first in the next batch.
    again: Vec<Cmd>,
}

impl Actor {
    /// An actor over a state restored from `store` (`recent`: its newest events, oldest first).
    pub(crate) fn new(
        state: CoordinatorState,
        store: Arc<dyn Store>,
        pool: IpPool,
        identity: Identity,
        recent: Vec<AuditEvent>,
        flow_limits: FlowLimits,
        metrics: Arc<Metrics>,
    ) -> Self {
        let admin_auth = watch::Sender::new(Arc::new(state.admin_tokens().clone()));
        Actor {
            state,
            store,
            live: HashMap::new(),
            next_conn: 0,
            identity,
            events: Vec::new(),
            recent: recent.into(),
            pool,
            store_failure: None,
            stale: None,
            flow_limits,
            metrics,
            detector: ScanDetector::new(ScanConfig::default()),
            restricted: Vec::new(),
            webhook: None,
            alerts: Vec::new(),
            rotation: Default::default(),
            spa: None,
            admin_auth,
            generation: 0,
            follow_to: 0,
            again: Vec::new(),
        }
    }

    /// The generation of the snapshot the state was restored from.
    pub(crate) fn at_generation(mut self, generation: u64) -> Self {
        self.generation = generation;
        self
    }

    /// Keeps `filter`'s view of who may knock up to date (hosts, join tokens, admin tokens).
    pub(crate) fn with_spa(mut self, filter: Option<Arc<crate::spa::SpaFilter>>) -> Self {
        self.spa = filter;
        self.publish_spa();
        self
    }

    /// The admin tokens as the admin API checks them (kept current by the actor).
    pub(crate) fn admin_auth(&self) -> crate::admin::AdminAuth {
        crate::admin::AdminAuth::new(self.admin_auth.subscribe())
    }

    /// Swaps a fresh view of who may knock into the SPA filter.
    fn publish_spa(&self) {
        if let Some(f) = &self.spa {
            f.set_view(crate::spa::view_of(&self.state));
        }
    }

    /// Hands the admin API the current admin tokens.
    fn publish_admin_auth(&self) {
        self.admin_auth
            .send_replace(Arc::new(self.state.admin_tokens().clone()));
    }

    /// Sets the automatic key rotation periods (`key_rotation`).
    pub(crate) fn with_key_rotation(
        mut self,
        schedule: meshd_control::rotation::RotationSchedule,
    ) -> Self {
        self.state.set_rotation_schedule(schedule.clone());
        self.rotation = schedule;
        self
    }

    /// Sets the scan detector's settings and the alert webhook.
    pub(crate) fn with_scan_response(mut self, cfg: ScanConfig, webhook: Option<Webhook>) -> Self {
        self.restricted = cfg.restricted_labels();
        self.detector = ScanDetector::new(cfg);
        self.webhook = webhook;
        self
    }

    /// A committed batch's alerts: the log line, then the webhook.
    fn send_alerts(&mut self) {
        for a in std::mem::take(&mut self.alerts) {
            warn!(
                host = %a.host,
                host_id = %a.host_id,
                action = %a.action,
                reason = %a.reason,
                distinct_pairs = a.distinct_pairs,
                top_peer = %a.top_peer,
                top_peer_ports = a.top_peer_ports,
                "scan detected"
            );
            if let Some(w) = &self.webhook {
                w.send(&a);
            }
        }
    }

    /// Starts the actor's task; it ends when `stop` is set or every [`Commands`] is dropped.
    pub(crate) fn spawn(
        self,
        stop: watch::Receiver<bool>,
    ) -> (Commands, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        (Commands(tx), tokio::spawn(self.run(rx, stop)))
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>, mut stop: watch::Receiver<bool>) {
        loop {
            // Wake up when a rule expires, to drop peers that no longer have any grant (agents
            // already stopped using the expired grants on their own).
            let expiry = self
                .state
                .policy_timeout()
                .map(|t| Duration::from_secs(t.saturating_sub(unix_now()).clamp(1, 3600)));
            // Key rotation: time-outs, and with a period a check every few seconds.
            let rotation = self
                .state
                .rotation_timeout()
                .map(|t| Duration::from_secs(t.saturating_sub(unix_now()).clamp(1, 3600)))
                .into_iter()
                .chain(self.state.rotation_scheduled().then_some(ROTATION_CHECK))
                .min();
            let first = if !self.again.is_empty() {
                None
            } else {
                tokio::select! {
                    c = rx.recv() => match c { Some(c) => Some(c), None => break },
                    _ = stop.wait_for(|v| *v) => break,
                    _ = tokio::time::sleep(expiry.unwrap_or(Duration::from_secs(3600))), if expiry.is_some() => None,
                    _ = tokio::time::sleep(rotation.unwrap_or(Duration::from_secs(3600))), if rotation.is_some() => None,
                }
            };
            let picked_up = std::time::Instant::now();
            let mut batch: Vec<Cmd> = std::mem::take(&mut self.again);
            batch.extend(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            let now = unix_now();
            if let Some(why) = self.stale.clone() {
                // A failed commit whose state could not be reloaded: nothing is applied
                // until the store is readable again.
                if let Err(e) = self.reload(now).await {
                    self.stale = Some(e.clone());
                    for c in batch {
                        self.refuse_stale(c, &why);
                    }
                    continue;
                }
            }
            // Another replica committed: catch up before applying anything, so this batch
            // is made on (and fenced by) the newest state.
            for c in &batch {
                if let Cmd::StoreChanged { generation } = c {
                    self.follow_to = self.follow_to.max(*generation);
                }
            }
            batch.retain(|c| !matches!(c, Cmd::StoreChanged { .. }));
            let following = self.follow_to > self.generation;
            if following {
                self.follow(now).await;
                if let Some(why) = self.stale.clone() {
                    for c in batch {
                        self.refuse_stale(c, &why);
                    }
                    continue;
                }
            }
            self.state.handle_policy_timeout(now);
            self.state.handle_rotation_timeout(now, random_nonce);
            let mut deferred = Vec::new();
            for c in batch {
                self.apply(now, c, &mut deferred);
            }
            // Membership changes fan out to every agent: gather more of them (an enrolment
            // storm) for a moment so each agent gets one delta instead of many.
            // (Not right after following another replica: every session gets a full map then
            // anyway, and that replica's next commit must not wait for this window.)
            if self.state.membership_pending() && !following {
                let started = tokio::time::Instant::now();
                let mut deadline = started + MEMBERSHIP_BATCH_WINDOW;
                let mut connects = 0;
                loop {
                    tokio::select! {
                        c = rx.recv() => match c {
                            Some(c) => {
                                connects += usize::from(matches!(c, Cmd::Connect { .. }));
                                let follow = matches!(c, Cmd::StoreChanged { .. });
                                self.apply(now, c, &mut deferred);
                                if follow && self.follow_to > self.generation {
                                    // Another replica committed: this batch (made on the
                                    // older state) goes now, and conflicts if it must.
                                    break;
                                }
                            }
                            None => break,
                        },
                        _ = tokio::time::sleep_until(deadline) => {
                            if connects < STORM_CONNECTS
                                || deadline - started >= MEMBERSHIP_BATCH_MAX
                            {
                                break;
                            }
                            connects = 0;
                            deadline += MEMBERSHIP_BATCH_WINDOW;
                        }
                    }
                }
            }
            for e in self.state.poll_rotation_events() {
                info!(host_id = %e.host, kind = %e.kind, detail = %e.detail, "key rotation step");
                self.events.push(AuditEvent::new(now, e.kind, e.detail));
            }
            for n in self.state.poll_notices() {
                warn!(kind = %n.kind(), "{n}");
                self.events
                    .push(AuditEvent::new(now, n.kind(), n.to_string()));
            }
            let work_before = self.state.push_work();
            let pushes = self.state.poll_pushes();
            self.metrics.push_work(work_before, self.state.push_work());
            let kicks = self.state.poll_kicks();
            let dirty = self.state.take_dirty();
            let admin_dirty = !dirty.admin_tokens.is_empty();
            let spa_dirty = !dirty.hosts.is_empty() || !dirty.tokens.is_empty() || admin_dirty;
            let events = std::mem::take(&mut self.events);
            // Commit, then acknowledge: nothing of the batch is replied, pushed or shown
            // before the store has it.
            if !dirty.is_empty() || !events.is_empty() {
                let what = describe_batch(&dirty, &events);
                let store = self.store.clone();
                let generation = self.generation;
                let res = tokio::task::spawn_blocking(move || {
                    let started = std::time::Instant::now();
                    let r = store
                        .commit_at(Some(generation), &dirty, &events)
                        .map(|g| (g, events));
                    (r, started.elapsed())
                })
                .await;
                let res = res.map(|(r, took)| {
                    self.metrics.committed(took, r.is_ok());
                    r
                });
                let mut conflict = false;
                let error = match res {
                    Ok(Ok((generation, events))) => {
                        if let Some(f) = self.store_failure.take() {
                            info!(failed_at = f.at, "commits succeed again");
                        }
                        self.generation = generation;
                        self.remember(events);
                        None
                    }
                    Ok(Err(e)) => {
                        conflict = matches!(e, meshd_store::StoreError::Conflict { .. });
                        Some(e.to_string())
                    }
                    Err(e) => Some(format!("commit task failed: {e}")),
                };
                if conflict {
                    // Another replica committed first: nothing of this batch was saved.
                    // Catch up (sessions stay) and tell the callers to try again.
                    self.alerts.clear();
                    self.refuse_conflict(error.unwrap_or_default(), deferred);
                    self.follow(now).await;
                    continue;
                }
                if let Some(error) = error {
                    // Nothing of the batch was saved: its actions did not happen.
                    self.alerts.clear();
                    self.roll_back(now, error, what, deferred).await;
                    self.publish_spa();
                    self.publish_admin_auth();
                    continue;
                }
            }
            // Before the replies: an enrolled host knocks as a host right after its welcome.
            if spa_dirty {
                self.publish_spa();
            }
            // Before the replies: a created admin token works, a revoked one is refused, from
            // the moment its reply arrives.
            if admin_dirty {
                self.publish_admin_auth();
            }
            self.send_alerts();
            for d in deferred {
                match d {
                    Deferred::Connect(tx, r, _) => {
                        let _agent_gone = tx.send(r);
                    }
                    Deferred::Admin(tx, r, _) => {
                        let _caller_gone = tx.send(r);
                    }
                }
            }
            for k in kicks {
                if let Some(l) = self.live.remove(&k.host) {
                    if l.conn_id == k.conn {
                        info!(host_id = %k.host, code = ?k.code, "closing agent session");
                        if l.tx.try_send(Outbound::Close(Refusal::of(k.code))).is_err() {
                            l.conn.close(close_code(k.code), b"closed");
                        }
                    }
                }
            }
            for p in pushes {
                let Some(l) = self.live.get(&p.host) else {
                    continue;
                };
                if l.conn_id != p.conn {
                    continue;
                }
                let kind = crate::metrics::push_kind(&p.message);
                if let Err(e) = l.tx.try_send(Outbound::Msg(p.message)) {
                    // A full queue means the agent is not reading: drop it; it reconnects and
                    // gets a full map.
                    warn!(host_id = %p.host, error = %e, "agent not keeping up; closing its session");
                    l.conn.close(close_code(ErrorCode::Internal), b"too slow");
                    self.state.disconnect(now, p.host, p.conn);
                    self.live.remove(&p.host);
                    continue;
                }
                self.metrics.pushed(kind, picked_up.elapsed());
                if let Some(l) = self.live.get_mut(&p.host) {
                    l.unacked_since.get_or_insert_with(std::time::Instant::now);
                }
            }
            self.update_gauges();
        }
        for l in self.live.values() {
            l.conn
                .close(quinn::VarInt::from_u32(0), b"coordinator shutting down");
        }
    }

    /// A commit failed: every reply of the batch becomes an error naming the cause, its pushes
    /// and events are dropped, the state is rebuilt from the store (which holds exactly the
    /// last committed state), and every agent session is closed so that the agents (fail-static:
    /// their tunnels keep running) reconnect and get maps of the rolled-back state.
    async fn roll_back(
        &mut self,
        now: UnixTime,
        error: String,
        what: String,
        deferred: Vec<Deferred>,
    ) {
        error!(%error, batch = %what, "saving coordinator state failed; the batch is refused and rolled back");
        self.store_failure = Some(StoreFailure {
            at: now,
            error: error.clone(),
            what,
        });
        let mut reads = Vec::new();
        for d in deferred {
            match d {
                Deferred::Connect(tx, _, _) => {
                    let _agent_gone = tx.send(Err(Refusal {
                        code: ErrorCode::Internal,
                        message: format!("not saved: {error}"),
                    }));
                }
                Deferred::Admin(tx, _, Some(op)) => reads.push((tx, op)),
                Deferred::Admin(tx, _, None) => {
                    let _caller_gone = tx.send(Err(AdminError::NotSaved(error.clone())));
                }
            }
        }
        let refusal = Refusal {
            code: ErrorCode::Internal,
            message: format!("coordinator could not save its state ({error}); reconnect"),
        };
        for (host, l) in self.live.drain() {
            debug!(host_id = %host, "closing agent session after a failed commit");
            if l.tx.try_send(Outbound::Close(refusal.clone())).is_err() {
                l.conn
                    .close(close_code(ErrorCode::Internal), b"state not saved");
            }
        }
        if let Err(e) = self.reload(now).await {
            error!(error = %e, "reloading the state from the store failed; refusing every command until it works");
            self.stale = Some(e);
        }
        // A read that shared the failed batch (a status asked while agents reconnected) is
        // answered from what is committed, never from the rolled-back changes.
        for (tx, op) in reads {
            let r = match &self.stale {
                Some(why) => Err(AdminError::NotSaved(format!(
                    "the coordinator cannot read its store: {why}"
                ))),
                None => self.run_admin(now, *op),
            };
            let _caller_gone = tx.send(r);
        }
        self.events.clear();
    }

    /// Runs one admin operation on the state (its audit events join this batch's).
    fn run_admin(&mut self, now: UnixTime, op: AdminOp) -> AdminResult {
        let health = self.health();
        Ops {
            state: &mut self.state,
            events: &mut self.events,
            recent: &self.recent,
            identity: self.identity.clone(),
            health,
            restricted: &self.restricted,
        }
        .run(now, op)
    }

    /// Catches up with the store after another replica's commit (or a conflict with one):
    /// reloads the state and re-attaches every live session, which goes on from what it was
    /// sent: it gets a delta of what changed (`CoordinatorState::carry_from`), not a full map.
    /// Agents keep their connections and tunnels. A session whose host is gone under its
    /// key is closed. If the store cannot be read, commands are refused until it can and the
    /// sessions stay (agents keep their last map).
    async fn follow(&mut self, now: UnixTime) {
        let before = self.generation;
        let old = match self.reload(now).await {
            Ok(old) => old,
            Err(e) => {
                error!(error = %e, "following another replica's commit: the store cannot be read; refusing every command until it can");
                self.stale = Some(e);
                return;
            }
        };
        let mut carried = self.state.carry_from(old);
        let mut closed = Vec::new();
        for (id, l) in self.live.iter().filter(|(_, l)| !l.enrolment) {
            match self.state.attach_session(now, *id, &l.key, l.conn_id) {
                Ok(()) => {
                    self.state.resume_carried(*id, &mut carried);
                }
                Err(code) => closed.push((*id, code)),
            }
        }
        for (id, code) in closed {
            if let Some(l) = self.live.remove(&id) {
                info!(host_id = %id, ?code, "closing a session its host no longer allows");
                if l.tx.try_send(Outbound::Close(Refusal::of(code))).is_err() {
                    l.conn.close(close_code(code), b"closed");
                }
            }
        }
        // Who may knock and which admin tokens work come from the reloaded state too.
        self.publish_spa();
        self.publish_admin_auth();
        self.metrics.followed();
        debug!(
            from = before,
            to = self.generation,
            sessions = self.live.len(),
            "followed the store"
        );
    }

    /// A commit lost to another replica's: every reply of the batch says so (admin calls are
    /// tried again by [`Commands::admin`]; agents reconnect); its pushes and events are dropped.
    fn refuse_conflict(&mut self, error: String, deferred: Vec<Deferred>) {
        info!(%error, "commit conflicted with another replica's; catching up");
        for d in deferred {
            match d {
                Deferred::Connect(reply, r, again) if again.attempt + 1 < CONFLICT_TRIES => {
                    // Run again on the caught-up state (its session was not saved: forget it
                    // without closing the agent's connection).
                    if let Ok(w) = &r {
                        if self
                            .live
                            .get(&w.info.id)
                            .is_some_and(|l| l.conn_id == w.conn)
                        {
                            self.live.remove(&w.info.id);
                        }
                    }
                    let ConnectAgain {
                        key,
                        observed,
                        hello,
                        tx,
                        conn,
                        attempt,
                    } = *again;
                    self.again.push(Cmd::Connect {
                        key,
                        observed,
                        hello,
                        tx,
                        conn,
                        reply,
                        attempt: attempt + 1,
                    });
                }
                Deferred::Connect(tx, _, _) => {
                    let _agent_gone = tx.send(Err(Refusal {
                        code: ErrorCode::Internal,
                        message: format!("not saved: {error}"),
                    }));
                }
                Deferred::Admin(tx, _, _) => {
                    let _caller_gone = tx.send(Err(AdminError::Conflict(error.clone())));
                }
            }
        }
        self.events.clear();
    }

    /// Rebuilds the state from the store, as at start-up (live sessions are not kept);
    /// returns the state it replaced.
    async fn reload(&mut self, now: UnixTime) -> Result<CoordinatorState, String> {
        let store = self.store.clone();
        let (snapshot, mut recent) = tokio::task::spawn_blocking(move || {
            Ok::<_, meshd_store::StoreError>((store.load()?, store.recent_events(EVENTS_MAX)?))
        })
        .await
        .map_err(|e| format!("reload task failed: {e}"))?
        .map_err(|e| e.to_string())?;
        recent.reverse();
        let generation = snapshot.generation;
        let old = std::mem::replace(
            &mut self.state,
            restore_state(self.pool.clone(), snapshot, now, self.flow_limits)
                .map_err(|e| chain(&e))?,
        );
        self.generation = generation;
        self.state.set_rotation_schedule(self.rotation.clone());
        self.recent = recent.into();
        self.events.clear();
        self.alerts.clear();
        self.stale = None;
        Ok(old)
    }

    /// Answers a command while the state could not be reloaded.
    fn refuse_stale(&mut self, c: Cmd, why: &str) {
        let message = format!("the coordinator cannot read its store: {why}");
        match c {
            Cmd::Connect { reply, .. } => {
                let _agent_gone = reply.send(Err(Refusal {
                    code: ErrorCode::Internal,
                    message,
                }));
            }
            Cmd::Admin {
                op: AdminOp::Health,
                reply,
            } => {
                let _caller_gone = reply.send(Ok(AdminReply::Health(self.health())));
            }
            Cmd::Admin { reply, .. } => {
                let _caller_gone = reply.send(Err(AdminError::NotSaved(message)));
            }
            _ => {}
        }
    }

    fn health(&self) -> HealthView {
        HealthView {
            ok: self.store_failure.is_none() && self.stale.is_none(),
            store_failure: self.store_failure.clone(),
        }
    }

    fn apply(&mut self, now: UnixTime, c: Cmd, deferred: &mut Vec<Deferred>) {
        match c {
            Cmd::Connect {
                key,
                observed,
                hello,
                tx,
                conn,
                reply,
                attempt,
            } => {
                let again = Box::new(ConnectAgain {
                    key,
                    observed,
                    hello: hello.clone(),
                    tx: tx.clone(),
                    conn: conn.clone(),
                    attempt,
                });
                let r = self.connect(now, key, observed, hello, tx, conn);
                deferred.push(Deferred::Connect(reply, r, again));
            }
            Cmd::Report {
                host,
                conn,
                endpoints,
            } => {
                // The report just came over the connection, so its source is the freshest
                // observation: take both at once (one consistent map for the peers).
                if let Some(l) = self.live.get(&host).filter(|l| l.conn_id == conn) {
                    let ip = l.conn.remote_address().ip();
                    self.state.observed_changed(now, host, conn, ip);
                }
                self.state.report_endpoints(now, host, conn, endpoints)
            }
            Cmd::Observed { host, conn, ip } => self.state.observed_changed(now, host, conn, ip),
            Cmd::Ack {
                host,
                conn,
                version,
            } => {
                if let Some(l) = self.live.get_mut(&host).filter(|l| l.conn_id == conn) {
                    if let Some(t) = l.unacked_since.take() {
                        self.metrics.acked(t.elapsed());
                    }
                }
                self.state.ack(host, conn, version)
            }
            Cmd::Resync { host, conn } => self.state.resync(host, conn),
            Cmd::KeyProposal {
                host,
                conn,
                nonce,
                new_key,
                proof_ok,
                succession,
            } => {
                let proposal = meshd_control::rotation::Proposal {
                    nonce,
                    new_key,
                    proof_ok,
                    succession,
                };
                if let Err(code) = self.state.key_proposal(now, host, conn, proposal) {
                    warn!(host_id = %host, %code, "unexpected key proposal; closing the session");
                    if let Some(l) = self.live.get(&host).filter(|l| l.conn_id == conn) {
                        l.conn.close(close_code(code), b"unexpected key proposal");
                    }
                }
            }
            Cmd::Disconnect { host, conn } => {
                self.state.disconnect(now, host, conn);
                if self.live.get(&host).is_some_and(|l| l.conn_id == conn) {
                    self.live.remove(&host);
                }
            }
            Cmd::Blocks { host, conn, events } => {
                let live = self.live.get(&host).is_some_and(|l| l.conn_id == conn);
                let seen = if live { events.clone() } else { Vec::new() };
                self.metrics.blocks(&events);
                self.state.record_blocks(host, conn, events);
                // A learning host's would-be denials pass as would-deny: never a scan.
                let alerts =
                    self.state
                        .detect_scans(now, &mut self.detector, host, &seen, |s, id| {
                            s.is_learning(id)
                        });
                for a in alerts {
                    self.events
                        .push(AuditEvent::new(now, EventKind::ScanDetected, a.to_string()));
                    self.alerts.push(a);
                }
            }
            Cmd::Flows {
                host,
                conn,
                interval_start,
                records,
                plaintext,
                overflow,
            } => {
                let r = self.state.record_flows(
                    now,
                    host,
                    conn,
                    FlowBatch {
                        interval_start,
                        records,
                        plaintext,
                        overflow,
                    },
                );
                self.metrics.record_flows_ingested(r.stored as u64);
                if r.dropped > 0 || overflow > 0 {
                    debug!(host_id = %host, stored = r.stored, dropped = r.dropped,
                        agent_overflow = overflow, "flow rows dropped");
                }
            }
            Cmd::StoreChanged { generation } => {
                // Mid-batch: followed before the next one (this batch's commit, made on the
                // older state, conflicts and is refused if the store moved on).
                self.follow_to = self.follow_to.max(generation);
            }
            Cmd::Admin { op, reply } => {
                let read = op.is_read_only().then(|| Box::new(op.clone()));
                let r = self.run_admin(now, op);
                deferred.push(Deferred::Admin(reply, r, read));
            }
        }
    }

    fn connect(
        &mut self,
        now: UnixTime,
        key: PublicKey,
        observed: IpAddr,
        hello: Hello,
        tx: mpsc::Sender<Outbound>,
        conn: quinn::Connection,
    ) -> ConnectReply {
        self.next_conn += 1;
        let cid = ConnId(self.next_conn);
        let enrolment = matches!(hello, Hello::Enrol { .. });
        // A previous connection that QUIC already knows is closed (a restart whose close
        // frame arrived) does not count as live, nor does the enrolment connection: the agent
        // closes it and resumes at once, and its close frame may still be in flight (on a
        // loaded host) when the resume arrives.
        // A rotating host reconnecting with its new key supersedes its old-key connection.
        if let Some(id) = self.state.rotating_host(&key) {
            if let Some(old) = self.live.remove(&id) {
                old.conn.close(quinn::VarInt::from_u32(0), b"key rotated");
                self.state.disconnect(now, id, old.conn_id);
            }
        }
        if let Some(id) = self.state.host_by_key(&key).map(|h| h.id) {
            if let Some(old) = self
                .live
                .get(&id)
                .filter(|l| l.enrolment || l.conn.close_reason().is_some())
            {
                let old_id = old.conn_id;
                old.conn.close(quinn::VarInt::from_u32(0), b"superseded");
                self.state.disconnect(now, id, old_id);
                self.live.remove(&id);
            }
        }
        match self.state.connect(now, key, cid, observed, hello) {
            Ok(info) => {
                debug!(host_id = %info.id, host = %info.name, peer_key = %key, "agent connected");
                if enrolment {
                    // The agent reads its welcome on this connection, closes it and resumes
                    // on a new one at once: no session here, so no full map is made for a
                    // connection that is closing (half the work of an enrolment storm).
                    self.state.disconnect(now, info.id, cid);
                }
                self.live.insert(
                    info.id,
                    Live {
                        conn_id: cid,
                        key,
                        tx,
                        conn,
                        enrolment,
                        unacked_since: None,
                    },
                );
                Ok(Welcome { info, conn: cid })
            }
            Err(code) => {
                if matches!(code, ErrorCode::AlreadyConnected) {
                    warn!(peer_key = %key, source = %observed, "refused a second live connection for a connected host");
                    self.events.push(AuditEvent::new(
                        now,
                        EventKind::DuplicateConnection,
                        format!("key {key} from {observed}"),
                    ));
                } else {
                    debug!(peer_key = %key, ?code, "agent refused");
                }
                Err(Refusal::of(code))
            }
        }
    }

    /// Hosts by state and live sessions, for the metrics (after every batch).
    fn update_gauges(&self) {
        let (mut active, mut quarantined, mut revoked) = (0, 0, 0);
        for h in self.state.hosts() {
            if h.revoked {
                revoked += 1;
            } else if h.removed {
                continue;
            } else if h.quarantined {
                quarantined += 1;
            } else {
                active += 1;
            }
        }
        self.metrics
            .set_hosts(active, quarantined, revoked, self.live.len() as i64);
    }

    /// Keeps the newest [`EVENTS_MAX`] events for `GET /v1/events`.
    fn remember(&mut self, events: Vec<AuditEvent>) {
        let max = EVENTS_MAX as usize;
        let skip = events.len().saturating_sub(max);
        self.recent.extend(events.into_iter().skip(skip));
        let excess = self.recent.len().saturating_sub(max);
        self.recent.drain(..excess);
    }
}

/// What a batch held, for the log and `meshctl status` (`2 hosts, 1 token, 3 events`).
fn describe_batch(d: &Dirty, events: &[AuditEvent]) -> String {
    let mut parts = Vec::new();
    let mut count = |n: usize, one: &str, many: &str| {
        if n > 0 {
            parts.push(format!("{n} {}", if n == 1 { one } else { many }));
        }
    };
    count(d.hosts.len(), "host", "hosts");
    count(d.tokens.len(), "token", "tokens");
    count(
        usize::from(d.policy.is_some()),
        "policy version",
        "policy versions",
    );
    count(d.blocks.len(), "block event", "block events");
    count(d.flows.len(), "flow row", "flow rows");
    count(usize::from(d.mode.is_some()), "policy mode", "policy modes");
    count(d.signed.len(), "signed statement", "signed statements");
    count(d.admin_tokens.len(), "admin token", "admin tokens");
    count(events.len(), "event", "events");
    count(
        usize::from(d.map_version.is_some()),
        "map version",
        "map versions",
    );
    parts.join(", ")
}

/// The state as the store holds it (at start-up, and after a failed commit).
pub(crate) fn restore_state(
    pool: IpPool,
    snapshot: Snapshot,
    now: UnixTime,
    flow_limits: FlowLimits,
) -> Result<CoordinatorState, RestoreStateError> {
    let mut state =
        CoordinatorState::restore(pool, snapshot.hosts, snapshot.tokens, snapshot.map_version)
            .map_err(RestoreStateError::Hosts)?;
    state
        .restore_policies(now, snapshot.policies)
        .map_err(RestoreStateError::Policy)?;
    state.restore_mode(now, snapshot.mode);
    state.restore_blocks(snapshot.blocks);
    state.set_flow_limits(flow_limits);
    state.restore_flow_intervals(snapshot.flow_intervals);
    state.restore_records(snapshot.records);
    state.restore_signed(snapshot.signed);
    state.restore_admin_tokens(snapshot.admin_tokens);
    Ok(state)
}

/// How often due key rotations are looked for when a period is configured.
const ROTATION_CHECK: Duration = Duration::from_secs(5);

/// A fresh random challenge for a key rotation request.
/// Tells the actor whenever the store's generation moves (another replica's commit, or the
/// actor's own: it ignores those), woken by the store's notifications where it has them
/// (PostgreSQL `LISTEN`) and reading the generation every [`FOLLOW_POLL`] regardless, so a
/// lost notification or connection costs at most that. Runs on a thread of its own (the
/// PostgreSQL client blocks) until `stop` is set or the actor is gone.
pub(crate) fn follow_loop(store: Arc<dyn Store>, cmds: Commands, stop: watch::Receiver<bool>) {
    let mut listener: Option<Box<dyn meshd_store::ChangeListener>> = None;
    let mut listen_failed = false;
    let mut seen = None;
    while !*stop.borrow() {
        if listener.is_none() {
            match store.listen() {
                Some(Ok(l)) => {
                    if listen_failed {
                        info!("listening for other replicas' commits again");
                    }
                    listen_failed = false;
                    listener = Some(l);
                }
                Some(Err(e)) if !listen_failed => {
                    warn!(error = %e, "cannot listen for other replicas' commits; polling the store every second");
                    listen_failed = true;
                }
                _ => {}
            }
        }
        match listener.as_mut() {
            Some(l) => {
                if let Err(e) = l.wait(FOLLOW_POLL) {
                    debug!(error = %e, "the listening connection failed; making a new one");
                    listener = None;
                    std::thread::sleep(FOLLOW_POLL);
                }
            }
            None => std::thread::sleep(FOLLOW_POLL),
        }
        match store.generation() {
            Ok(g) if seen != Some(g) => {
                seen = Some(g);
                if cmds
                    .0
                    .blocking_send(Cmd::StoreChanged { generation: g })
                    .is_err()
                {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => debug!(error = %e, "reading the store's generation failed"),
        }
    }
}

pub(crate) fn random_nonce() -> meshd_control::rotation::Nonce {
    use rand_core::RngCore as _;
    let mut b = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut b);
    meshd_control::rotation::Nonce(b)
}

/// The QUIC application close code for an error code.
pub(crate) fn close_code(c: ErrorCode) -> quinn::VarInt {
    quinn::VarInt::from_u32(match c {
        ErrorCode::Malformed => 2,
        ErrorCode::Internal => 3,
        _ => 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_described_by_what_it_holds() {
        let d = Dirty {
            map_version: Some(3),
            ..Default::default()
        };
        let events = vec![
            AuditEvent::new(1, EventKind::HostRemoved, "a (1)"),
            AuditEvent::new(1, EventKind::HostRevoked, "b (2)"),
        ];
        assert_eq!(describe_batch(&d, &events), "2 events, 1 map version");
        assert_eq!(describe_batch(&Dirty::default(), &[]), "");
    }
}
