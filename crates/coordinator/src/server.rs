//! The coordinator: one actor task owns the reconciliation state and the store; connection
//! tasks speak QUIC + Noise to agents; the admin API sends it commands.
//!
//! The actor handles commands in batches: apply all pending commands to the pure state, poll
//! pushes and kicks, commit the dirty records in one transaction (on a blocking thread), and
//! only then reply and push. No lock is ever held across network or disk IO.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use meshd_config::fsutil::{ensure_private_dir, make_private, write_private_atomic};
use meshd_control::api::{
    ConnectedAgent, EventView, GuardStats, HealthView, HostView, PolicyApplied, PolicyCheck,
    PolicyCurrent, StatusView, StoreFailure, TokenCreateRequest, TokenCreated, TokenView,
    EVENTS_MAX,
};
use meshd_control::proto::{
    AgentMessage, CoordinatorMessage, EndpointReport, ErrorCode, HostInfo, MAX_AGENT_FRAME,
    MAX_COORDINATOR_FRAME, PROTOCOL_VERSION,
};
use meshd_control::state::{check_policy_size, AdminError, ConnId, Hello, TokenSpec};
use meshd_control::token::hash_secret;
use meshd_control::{
    CoordinatorState, HostId, IpPool, JoinToken, Labels, TokenId, TokenSecret, UnixTime,
};
use meshd_store::{SqliteStore, Store, META_ADMIN_TOKEN_HASH};
use meshd_tunnel::{PrivateKey, PublicKey};
use rand_core::{OsRng, RngCore as _};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use crate::guard::{self, admit_quic, Check, Counters, Guard, LogLimiter, QuicAdmission};
use crate::noise::{self, ChannelError};
use crate::options::{CoordinatorOptions, Limits};
use crate::{admin, quic};

/// Key file name in the state directory.
pub const KEY_FILE: &str = "coordinator.key";
/// Database file name in the state directory.
pub const DB_FILE: &str = "coordinator.db";
/// Admin token file name in the state directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// Admin token prefix.
pub const ADMIN_TOKEN_PREFIX: &str = "meshadm-";

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes quinn buffers for one connection attempt not yet accepted (0-RTT and the like).
const INCOMING_BUFFER: u64 = 64 * 1024;
/// Bytes quinn buffers for all of them.
const INCOMING_BUFFER_TOTAL: u64 = 8 * 1024 * 1024;
const OUTBOUND_QUEUE: usize = 256;
const COMMAND_QUEUE: usize = 4096;
const MAX_BATCH: usize = 1024;
const MEMBERSHIP_BATCH_WINDOW: Duration = Duration::from_millis(50);
const OBSERVE_INTERVAL: Duration = Duration::from_millis(250);

/// Seconds since the Unix epoch (the only clock read on the coordinator's state path).
pub fn unix_now() -> UnixTime {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An admin operation (the HTTP API and in-process callers use the same set).
#[derive(Debug, Clone)]
pub enum AdminOp {
    /// All non-removed hosts.
    ListHosts,
    /// One host by name, id or key.
    ShowHost(String),
    /// Add/replace labels.
    Label(String, Labels),
    /// Remove labels by key.
    Unlabel(String, Vec<String>),
    /// Rename.
    Rename(String, String),
    /// Remove from the mesh.
    Remove(String),
    /// New join token.
    CreateToken(TokenCreateRequest),
    /// All tokens.
    ListTokens,
    /// Revoke a token.
    RevokeToken(TokenId),
    /// Status.
    Status,
    /// The current policy.
    PolicyGet,
    /// Apply a policy file (refused if it does not parse or its tests fail).
    PolicyApply(String),
    /// Every applied version.
    PolicyHistory,
    /// Re-apply an earlier version.
    PolicyRollback(u64),
    /// Access changes if this file were applied.
    PolicyDiff(String),
    /// Parse and run the file's tests against the inventory.
    PolicyCheck(String),
    /// Allowed or denied, and by which rule.
    Explain(meshd_control::api::ExplainRequest),
    /// Cut a host off from every peer.
    Quarantine(String),
    /// Undo a quarantine.
    Release(String),
    /// Remove a host for good; its key is refused from then on.
    Revoke(String),
    /// Recent block events.
    Blocks(meshd_control::api::BlocksQuery),
    /// The newest `limit` audit events (at most [`EVENTS_MAX`]), oldest first.
    Events {
        /// How many.
        limit: u32,
    },
    /// Whether changes can be saved (answered even when nothing else is).
    Health,
}

/// The result of an [`AdminOp`].
#[derive(Debug, Clone)]
pub enum AdminReply {
    /// One host.
    Host(HostView),
    /// Hosts.
    Hosts(Vec<HostView>),
    /// One token.
    Token(TokenView),
    /// Tokens.
    Tokens(Vec<TokenView>),
    /// A new token.
    Created(TokenCreated),
    /// Status.
    Status(StatusView),
    /// Audit events, oldest first.
    Events(Vec<EventView>),
    /// Health.
    Health(HealthView),
    /// Any other JSON reply (policy, explain, blocks).
    Json(serde_json::Value),
}

pub(crate) enum Outbound {
    Msg(CoordinatorMessage),
    Close(ErrorCode, String),
}

pub(crate) enum Cmd {
    Connect {
        key: PublicKey,
        observed: IpAddr,
        hello: Hello,
        tx: mpsc::Sender<Outbound>,
        conn: quinn::Connection,
        reply: oneshot::Sender<ConnectReply>,
    },
    Report {
        host: HostId,
        conn: ConnId,
        endpoints: EndpointReport,
    },
    Observed {
        host: HostId,
        conn: ConnId,
        ip: IpAddr,
    },
    Ack {
        host: HostId,
        conn: ConnId,
        version: u64,
    },
    Resync {
        host: HostId,
        conn: ConnId,
    },
    Disconnect {
        host: HostId,
        conn: ConnId,
    },
    Blocks {
        host: HostId,
        conn: ConnId,
        events: Vec<meshd_policy::BlockEvent>,
    },
    Admin {
        op: AdminOp,
        reply: oneshot::Sender<Result<AdminReply, AdminError>>,
    },
}

/// The actor's answer to a `Connect`: the welcome, or the refusal with its message.
pub(crate) type ConnectReply = Result<(HostInfo, ConnId), (ErrorCode, String)>;

enum Deferred {
    Connect(oneshot::Sender<ConnectReply>, ConnectReply),
    Admin(
        oneshot::Sender<Result<AdminReply, AdminError>>,
        Result<AdminReply, AdminError>,
    ),
}

struct Live {
    conn_id: ConnId,
    tx: mpsc::Sender<Outbound>,
    conn: quinn::Connection,
    /// Opened to enrol: the agent closes it once enrolled and resumes on a new one.
    enrolment: bool,
}

struct Actor {
    state: CoordinatorState,
    store: Arc<dyn Store>,
    live: HashMap<HostId, Live>,
    next_conn: u64,
    advertise: SocketAddr,
    public_key: PublicKey,
    /// Events of this batch, not yet written to the store.
    events: Vec<(UnixTime, String, String)>,
    /// The newest committed events (at most [`EVENTS_MAX`], oldest first): `GET /v1/events`
    /// is served from here, with no database read on the actor.
    recent: VecDeque<(UnixTime, String, String)>,
    /// The empty pool the state is rebuilt over after a failed commit.
    pool: IpPool,
    /// The last failed commit, until one succeeds (`meshctl status`, `GET /v1/health`).
    store_failure: Option<StoreFailure>,
    /// Set when the state could not be reloaded after a failed commit: every command is
    /// refused until a reload works.
    stale: Option<String>,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>, mut stop: watch::Receiver<bool>) {
        loop {
            // Wake up when a rule expires, to drop peers that no longer have any grant (agents
            // already stopped using the expired grants on their own).
            let expiry = self
                .state
                .policy_timeout()
                .map(|t| Duration::from_secs(t.saturating_sub(unix_now()).clamp(1, 3600)));
            let first = tokio::select! {
                c = rx.recv() => match c { Some(c) => Some(c), None => break },
                _ = stop.wait_for(|v| *v) => break,
                _ = tokio::time::sleep(expiry.unwrap_or(Duration::from_secs(3600))), if expiry.is_some() => None,
            };
            let mut batch: Vec<Cmd> = first.into_iter().collect();
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
            self.state.handle_policy_timeout(now);
            let mut deferred = Vec::new();
            for c in batch {
                self.apply(now, c, &mut deferred);
            }
            // Membership changes fan out to every agent: gather more of them (an enrolment
            // storm) for a moment so each agent gets one delta instead of many.
            if self.state.membership_pending() {
                let deadline = tokio::time::Instant::now() + MEMBERSHIP_BATCH_WINDOW;
                loop {
                    tokio::select! {
                        c = rx.recv() => match c {
                            Some(c) => self.apply(now, c, &mut deferred),
                            None => break,
                        },
                        _ = tokio::time::sleep_until(deadline) => break,
                    }
                }
            }
            for n in self.state.poll_notices() {
                warn!(kind = n.kind(), "{n}");
                self.events.push((now, n.kind().into(), n.to_string()));
            }
            let pushes = self.state.poll_pushes();
            let kicks = self.state.poll_kicks();
            let dirty = self.state.take_dirty();
            let events = std::mem::take(&mut self.events);
            // Commit, then acknowledge: nothing of the batch is replied, pushed or shown
            // before the store has it.
            if !dirty.is_empty() || !events.is_empty() {
                let what = describe_batch(&dirty, &events);
                let store = self.store.clone();
                let res = tokio::task::spawn_blocking(move || {
                    store.commit(&dirty, &events).map(|()| events)
                })
                .await;
                let error = match res {
                    Ok(Ok(events)) => {
                        if let Some(f) = self.store_failure.take() {
                            info!(failed_at = f.at, "commits succeed again");
                        }
                        self.remember(&events);
                        None
                    }
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(e) => Some(format!("commit task failed: {e}")),
                };
                if let Some(error) = error {
                    self.roll_back(now, error, what, deferred).await;
                    continue;
                }
            }
            for d in deferred {
                match d {
                    Deferred::Connect(tx, r) => {
                        let _agent_gone = tx.send(r);
                    }
                    Deferred::Admin(tx, r) => {
                        let _caller_gone = tx.send(r);
                    }
                }
            }
            for k in kicks {
                if let Some(l) = self.live.remove(&k.host) {
                    if l.conn_id == k.conn {
                        info!(host = %k.host, code = ?k.code, "closing agent session");
                        if l.tx
                            .try_send(Outbound::Close(k.code, k.code.to_string()))
                            .is_err()
                        {
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
                if let Err(e) = l.tx.try_send(Outbound::Msg(p.message)) {
                    // A full queue means the agent is not reading: drop it; it reconnects and
                    // gets a full map.
                    warn!(host = %p.host, error = %e, "agent not keeping up; closing its session");
                    l.conn.close(close_code(ErrorCode::Internal), b"too slow");
                    self.state.disconnect(now, p.host, p.conn);
                    self.live.remove(&p.host);
                }
            }
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
        for d in deferred {
            match d {
                Deferred::Connect(tx, _) => {
                    let _agent_gone =
                        tx.send(Err((ErrorCode::Internal, format!("not saved: {error}"))));
                }
                Deferred::Admin(tx, _) => {
                    let _caller_gone = tx.send(Err(AdminError::NotSaved(error.clone())));
                }
            }
        }
        let message = format!("coordinator could not save its state ({error}); reconnect");
        for (host, l) in self.live.drain() {
            debug!(%host, "closing agent session after a failed commit");
            if l.tx
                .try_send(Outbound::Close(ErrorCode::Internal, message.clone()))
                .is_err()
            {
                l.conn
                    .close(close_code(ErrorCode::Internal), b"state not saved");
            }
        }
        if let Err(e) = self.reload(now).await {
            error!(error = %e, "reloading the state from the store failed; refusing every command until it works");
            self.stale = Some(e);
        }
    }

    /// Rebuilds the state from the store, as at start-up (live sessions are not kept).
    async fn reload(&mut self, now: UnixTime) -> Result<(), String> {
        let store = self.store.clone();
        let (snapshot, mut recent) = tokio::task::spawn_blocking(move || {
            Ok::<_, meshd_store::StoreError>((store.load()?, store.recent_events(EVENTS_MAX)?))
        })
        .await
        .map_err(|e| format!("reload task failed: {e}"))?
        .map_err(|e| e.to_string())?;
        recent.reverse();
        self.state =
            restore_state(self.pool.clone(), snapshot, now).map_err(|e| format!("{e:#}"))?;
        self.recent = recent.into();
        self.events.clear();
        self.stale = None;
        Ok(())
    }

    /// Answers a command while the state could not be reloaded.
    fn refuse_stale(&mut self, c: Cmd, why: &str) {
        let msg = format!("the coordinator cannot read its store: {why}");
        match c {
            Cmd::Connect { reply, .. } => {
                let _agent_gone = reply.send(Err((ErrorCode::Internal, msg)));
            }
            Cmd::Admin {
                op: AdminOp::Health,
                reply,
            } => {
                let _caller_gone = reply.send(Ok(self.health()));
            }
            Cmd::Admin { reply, .. } => {
                let _caller_gone = reply.send(Err(AdminError::NotSaved(msg)));
            }
            _ => {}
        }
    }

    fn health(&self) -> AdminReply {
        AdminReply::Health(HealthView {
            ok: self.store_failure.is_none() && self.stale.is_none(),
            store_failure: self.store_failure.clone(),
        })
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
            } => {
                self.next_conn += 1;
                let cid = ConnId(self.next_conn);
                let enrolment = matches!(hello, Hello::Enrol { .. });
                // A previous connection that QUIC already knows is closed (a restart whose
                // close frame arrived) does not count as live, nor does the enrolment
                // connection: the agent closes it and resumes at once, and its close frame
                // may still be in flight (on a loaded host) when the resume arrives.
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
                let r = self.state.connect(now, key, cid, observed, hello);
                match &r {
                    Ok(info) => {
                        debug!(host = %info.id, name = %info.name, peer = %key, "agent connected");
                        self.live.insert(
                            info.id,
                            Live {
                                conn_id: cid,
                                tx,
                                conn,
                                enrolment,
                            },
                        );
                    }
                    Err(ErrorCode::AlreadyConnected) => {
                        warn!(peer = %key, %observed, "refused a second live connection for a connected host");
                        self.events.push((
                            now,
                            "duplicate_connection".into(),
                            format!("key {key} from {observed}"),
                        ));
                    }
                    Err(code) => debug!(peer = %key, ?code, "agent refused"),
                }
                deferred.push(Deferred::Connect(
                    reply,
                    r.map(|i| (i, cid)).map_err(|c| (c, c.to_string())),
                ));
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
            } => self.state.ack(host, conn, version),
            Cmd::Resync { host, conn } => self.state.resync(host, conn),
            Cmd::Disconnect { host, conn } => {
                self.state.disconnect(now, host, conn);
                if self.live.get(&host).is_some_and(|l| l.conn_id == conn) {
                    self.live.remove(&host);
                }
            }
            Cmd::Blocks { host, conn, events } => self.state.record_blocks(host, conn, events),
            Cmd::Admin { op, reply } => {
                let r = self.admin(now, op);
                deferred.push(Deferred::Admin(reply, r));
            }
        }
    }

    /// Keeps the newest [`EVENTS_MAX`] events for `GET /v1/events`.
    fn remember(&mut self, events: &[(UnixTime, String, String)]) {
        let max = EVENTS_MAX as usize;
        let skip = events.len().saturating_sub(max);
        self.recent.extend(events[skip..].iter().cloned());
        let excess = self.recent.len().saturating_sub(max);
        self.recent.drain(..excess);
    }

    /// The newest `limit` committed events (capped at [`EVENTS_MAX`]), oldest first (this
    /// batch's are not committed yet, so they are not shown).
    fn recent_events(&self, limit: u32) -> Vec<EventView> {
        let n = limit.min(EVENTS_MAX) as usize;
        self.recent
            .iter()
            .skip(self.recent.len().saturating_sub(n))
            .map(|(at, kind, detail)| EventView {
                at: *at,
                kind: kind.clone(),
                detail: detail.clone(),
            })
            .collect()
    }

    fn view(&self, h: &meshd_control::Host) -> HostView {
        let s = self.state.sessions().into_iter().find(|s| s.host == h.id);
        HostView::new(h, s.is_some(), s.map(|s| s.acked_version))
    }

    fn admin(&mut self, now: UnixTime, op: AdminOp) -> Result<AdminReply, AdminError> {
        Ok(match op {
            AdminOp::ListHosts => {
                let sessions: HashMap<HostId, u64> = self
                    .state
                    .sessions()
                    .into_iter()
                    .map(|s| (s.host, s.acked_version))
                    .collect();
                AdminReply::Hosts(
                    self.state
                        .hosts()
                        .filter(|h| !h.removed)
                        .map(|h| {
                            HostView::new(
                                h,
                                sessions.contains_key(&h.id),
                                sessions.get(&h.id).copied(),
                            )
                        })
                        .collect(),
                )
            }
            AdminOp::ShowHost(r) => AdminReply::Host(self.view(self.state.find_host(&r)?)),
            AdminOp::Label(r, l) => {
                let h = self.state.set_labels(&r, l)?;
                AdminReply::Host(self.view(&h))
            }
            AdminOp::Unlabel(r, k) => {
                let h = self.state.remove_labels(&r, &k)?;
                AdminReply::Host(self.view(&h))
            }
            AdminOp::Rename(r, n) => {
                let h = self.state.rename(&r, &n)?;
                AdminReply::Host(self.view(&h))
            }
            AdminOp::Remove(r) => {
                let h = self.state.remove_host(&r)?;
                self.events
                    .push((now, "host_removed".into(), format!("{} ({})", h.name, h.id)));
                AdminReply::Host(HostView::new(&h, false, None))
            }
            AdminOp::CreateToken(req) => {
                let mut secret = [0u8; 32];
                OsRng.fill_bytes(&mut secret);
                let secret = TokenSecret(secret);
                let t = self.state.create_token(
                    now,
                    TokenSpec {
                        labels: req.labels,
                        ttl_secs: req.ttl_secs,
                        uses: req.uses,
                    },
                    secret.hash(),
                )?;
                let jt = JoinToken {
                    control: self.advertise,
                    coordinator_key: self.public_key,
                    secret,
                };
                AdminReply::Created(TokenCreated {
                    token: jt.encode(),
                    info: TokenView::new(&t, now),
                })
            }
            AdminOp::ListTokens => AdminReply::Tokens(
                self.state
                    .tokens()
                    .map(|t| TokenView::new(t, now))
                    .collect(),
            ),
            AdminOp::RevokeToken(id) => {
                AdminReply::Token(TokenView::new(&self.state.revoke_token(id)?, now))
            }
            AdminOp::PolicyGet => json(&PolicyCurrent {
                policy: self.state.policy().cloned(),
            }),
            AdminOp::PolicyApply(yaml) => {
                check_policy_size(&yaml)?;
                let (rec, tests) = self.state.apply_policy(now, &yaml, "apply")?;
                info!(rules_version = rec.version, "policy applied");
                self.events.push((
                    now,
                    "policy_applied".into(),
                    format!("version {}", rec.version),
                ));
                json(&PolicyApplied {
                    version: rec.version,
                    tests,
                })
            }
            AdminOp::PolicyHistory => json(&self.state.policy_history()),
            AdminOp::PolicyRollback(v) => {
                let rec = self.state.rollback_policy(now, v)?;
                info!(rules_version = rec.version, to = v, "policy rolled back");
                self.events.push((
                    now,
                    "policy_rollback".into(),
                    format!("version {} = version {v}", rec.version),
                ));
                json(&PolicyApplied {
                    version: rec.version,
                    tests: Vec::new(),
                })
            }
            AdminOp::PolicyDiff(yaml) => json(&{
                check_policy_size(&yaml)?;
                self.state.diff_policy(now, &yaml)?
            }),
            AdminOp::PolicyCheck(yaml) => {
                check_policy_size(&yaml)?;
                let tests = self.state.check_policy(now, &yaml)?;
                json(&PolicyCheck {
                    ok: tests.iter().all(|t| t.passed()),
                    tests,
                })
            }
            AdminOp::Explain(r) => json(&self.state.explain(now, &r.from, &r.to, &r.port)?),
            AdminOp::Quarantine(r) => {
                let h = self.state.quarantine(&r)?;
                self.events.push((
                    now,
                    "host_quarantined".into(),
                    format!("{} ({})", h.name, h.id),
                ));
                AdminReply::Host(self.view(&h))
            }
            AdminOp::Release(r) => {
                let h = self.state.release(&r)?;
                self.events.push((
                    now,
                    "host_released".into(),
                    format!("{} ({})", h.name, h.id),
                ));
                AdminReply::Host(self.view(&h))
            }
            AdminOp::Revoke(r) => {
                let h = self.state.revoke_host(&r)?;
                self.events
                    .push((now, "host_revoked".into(), format!("{} ({})", h.name, h.id)));
                AdminReply::Host(HostView::new(&h, false, None))
            }
            AdminOp::Blocks(q) => {
                let since = q.since.map_or(0, |s| now.saturating_sub(s));
                json(&self.state.blocks(q.host.as_deref(), since))
            }
            AdminOp::Events { limit } => AdminReply::Events(self.recent_events(limit)),
            AdminOp::Status => {
                let connected = self
                    .state
                    .sessions()
                    .into_iter()
                    .map(|s| {
                        let host = self.state.host(s.host);
                        let transparent = host.is_some_and(|h| h.transparent);
                        let mut protected: Vec<IpAddr> = host
                            .filter(|h| h.transparent)
                            .map(|h| h.endpoints().iter().map(|e| e.ip()).collect())
                            .unwrap_or_default();
                        protected.dedup();
                        ConnectedAgent {
                            id: s.host,
                            name: host.map(|h| h.name.clone()).unwrap_or_default(),
                            sent_version: s.sent_version,
                            acked_version: s.acked_version,
                            connected_at: s.connected_at,
                            mode: if transparent {
                                "transparent"
                            } else {
                                "overlay"
                            }
                            .into(),
                            protected,
                        }
                    })
                    .collect();
                AdminReply::Status(StatusView {
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    map_version: self.state.map_version(),
                    hosts: self.state.hosts().filter(|h| !h.removed).count(),
                    connected,
                    advertise: self.advertise,
                    public_key: self.public_key,
                    // Filled in by the admin API (the counters live outside the actor).
                    guard: GuardStats::default(),
                    store_failure: self.store_failure.clone(),
                })
            }
            AdminOp::Health => self.health(),
        })
    }
}

/// What a batch held, for the log and `meshctl status` (`2 hosts, 1 token, 3 events`).
fn describe_batch(
    d: &meshd_control::state::Dirty,
    events: &[(UnixTime, String, String)],
) -> String {
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
    count(events.len(), "event", "events");
    count(
        usize::from(d.map_version.is_some()),
        "map version",
        "map versions",
    );
    parts.join(", ")
}

/// The state as the store holds it (at start-up, and after a failed commit).
fn restore_state(
    pool: IpPool,
    snapshot: meshd_store::Snapshot,
    now: UnixTime,
) -> anyhow::Result<CoordinatorState> {
    let mut state =
        CoordinatorState::restore(pool, snapshot.hosts, snapshot.tokens, snapshot.map_version)
            .context("restoring state from the database (was --pool changed?)")?;
    state
        .restore_policies(now, snapshot.policies)
        .context("restoring the stored policy")?;
    state.restore_blocks(snapshot.blocks);
    Ok(state)
}

fn json<T: serde::Serialize>(v: &T) -> AdminReply {
    AdminReply::Json(serde_json::to_value(v).unwrap_or(serde_json::Value::Null))
}

fn close_code(c: ErrorCode) -> quinn::VarInt {
    quinn::VarInt::from_u32(match c {
        ErrorCode::Malformed => 2,
        ErrorCode::Internal => 3,
        _ => 1,
    })
}

/// A running coordinator.
pub struct CoordinatorHandle {
    control_addr: SocketAddr,
    admin_addr: SocketAddr,
    /// SHA-256 fingerprint of the admin API's certificate; `None`: plain HTTP.
    admin_fingerprint: Option<String>,
    advertise: SocketAddr,
    public_key: PublicKey,
    cmds: mpsc::Sender<Cmd>,
    stop: watch::Sender<bool>,
    endpoint: quinn::Endpoint,
    tasks: Vec<JoinHandle<()>>,
    guard: Arc<Guard>,
}

impl CoordinatorHandle {
    /// Bound control (QUIC) address.
    pub fn control_addr(&self) -> SocketAddr {
        self.control_addr
    }
    /// Bound admin API address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }
    /// Whether the admin API speaks HTTPS.
    pub fn admin_tls(&self) -> bool {
        self.admin_fingerprint.is_some()
    }
    /// SHA-256 fingerprint of the admin API's certificate (`AB:CD:...`); `None`: plain HTTP.
    pub fn admin_fingerprint(&self) -> Option<&str> {
        self.admin_fingerprint.as_deref()
    }
    /// Address join tokens carry.
    pub fn advertise(&self) -> SocketAddr {
        self.advertise
    }
    /// The coordinator's static public key.
    pub fn public_key(&self) -> PublicKey {
        self.public_key
    }

    /// The listener limits' counters now (what `GET /v1/status` reports as `guard`).
    pub fn guard_stats(&self) -> GuardStats {
        self.guard.counters.snapshot()
    }

    /// Runs an admin operation in process (same path as the HTTP API).
    pub async fn admin(&self, op: AdminOp) -> anyhow::Result<Result<AdminReply, AdminError>> {
        admin_call(&self.cmds, op).await
    }

    /// Creates a join token and returns its string.
    pub async fn create_token(&self, req: TokenCreateRequest) -> anyhow::Result<TokenCreated> {
        match self.admin(AdminOp::CreateToken(req)).await?? {
            AdminReply::Created(t) => Ok(t),
            other => anyhow::bail!("unexpected reply {other:?}"),
        }
    }

    /// Stops everything and waits until the sockets are released.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"coordinator shutting down");
        for t in self.tasks {
            let _ = t.await;
        }
        self.endpoint.wait_idle().await;
    }
}

pub(crate) async fn admin_call(
    cmds: &mpsc::Sender<Cmd>,
    op: AdminOp,
) -> anyhow::Result<Result<AdminReply, AdminError>> {
    let (tx, rx) = oneshot::channel();
    cmds.send(Cmd::Admin { op, reply: tx })
        .await
        .map_err(|_| anyhow::anyhow!("coordinator stopped"))?;
    rx.await.map_err(|_| anyhow::anyhow!("coordinator stopped"))
}

/// Loads the coordinator key, creating it (0600, atomically) on first start. A key file that
/// group or others may read is refused with the `chmod` that fixes it.
pub fn load_or_create_key(path: &Path) -> anyhow::Result<PrivateKey> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.len() == 0 && !path.with_file_name(DB_FILE).exists() => {
            // Left by an earlier version whose first start hit a full disk: no key was ever
            // used (the database comes after it), so a new one is made.
            warn!(path = %path.display(), "replacing an empty coordinator key left by a failed first start");
            std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
        }
        Ok(_) => return Ok(meshd_config::load_private_key(path)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let k = PrivateKey::generate();
    meshd_config::write_private_key(path, &k)?;
    info!(path = %path.display(), "created coordinator key");
    Ok(k)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The stored form of an admin token.
pub fn admin_token_hash(token: &str) -> String {
    hex(&hash_secret(token.trim().as_bytes()))
}

/// Starts the coordinator (state in `<state-dir>/coordinator.db`) and returns once it is
/// listening.
pub async fn start(opts: CoordinatorOptions) -> anyhow::Result<CoordinatorHandle> {
    start_inner(opts, None).await
}

/// As [`start`], with `store` instead of the SQLite database in the state directory (another
/// storage backend; tests pass one that fails on demand). The key and admin token files are
/// still kept in the state directory.
pub async fn start_with_store(
    opts: CoordinatorOptions,
    store: Arc<dyn Store>,
) -> anyhow::Result<CoordinatorHandle> {
    start_inner(opts, Some(store)).await
}

async fn start_inner(
    opts: CoordinatorOptions,
    store: Option<Arc<dyn Store>>,
) -> anyhow::Result<CoordinatorHandle> {
    let dir = opts.state_dir.clone();
    ensure_private_dir(&dir).context("coordinator state directory")?;
    let key = load_or_create_key(&dir.join(KEY_FILE))?;
    // Written 0644 by earlier versions.
    make_private(&dir.join(ADMIN_TOKEN_FILE))?;
    let public_key = key.public_key();
    let store: Arc<dyn Store> = match store {
        Some(s) => s,
        None => {
            let db = dir.join(DB_FILE);
            let db2 = db.clone();
            Arc::new(
                tokio::task::spawn_blocking(move || SqliteStore::open(&db2))
                    .await?
                    .with_context(|| format!("opening {}", db.display()))?,
            )
        }
    };
    let (admin_hash, snapshot, recent_events) = {
        let store = store.clone();
        let token_path = dir.join(ADMIN_TOKEN_FILE);
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let hash = match store.get_meta(META_ADMIN_TOKEN_HASH)? {
                Some(h) => h,
                None => {
                    let mut b = [0u8; 32];
                    OsRng.fill_bytes(&mut b);
                    let token = format!("{ADMIN_TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(b));
                    write_private_atomic(&token_path, format!("{token}\n").as_bytes())?;
                    let h = admin_token_hash(&token);
                    store.set_meta(META_ADMIN_TOKEN_HASH, &h)?;
                    info!(path = %token_path.display(), "wrote initial admin token");
                    h
                }
            };
            // Newest first from the store; the actor keeps them oldest first.
            let mut events = store.recent_events(EVENTS_MAX)?;
            events.reverse();
            Ok((hash, store.load()?, events))
        })
        .await??
    };
    let pool = IpPool::new(opts.pool, opts.pool_v6).context("address pool")?;
    let state = restore_state(pool.clone(), snapshot, unix_now())?;

    opts.limits.validate()?;
    let limits = opts.limits.clone();
    let guard = Arc::new(Guard::new(&limits));
    let mut server_config = quic::server_config()?;
    server_config
        .max_incoming(limits.quic_max_incoming)
        .incoming_buffer_size(INCOMING_BUFFER)
        .incoming_buffer_size_total(INCOMING_BUFFER_TOTAL);
    let endpoint = quinn::Endpoint::server(server_config, opts.listen)
        .with_context(|| format!("binding control listener on {}", opts.listen))?;
    let control_addr = endpoint.local_addr()?;
    let advertise = opts.advertise_for(control_addr)?;
    let admin_listener = tokio::net::TcpListener::bind(opts.admin_listen)
        .await
        .with_context(|| format!("binding admin API on {}", opts.admin_listen))?;
    let admin_addr = admin_listener.local_addr()?;
    let admin_tls = if opts.admin_uses_tls() {
        let mut ips = vec![admin_addr.ip(), control_addr.ip()];
        ips.extend(opts.advertise.map(|a| a.ip()));
        let tls = admin::load_or_create(&dir, opts.admin_tls_files.as_ref(), &ips)?;
        info!(%admin_addr, scheme = "https", cert = %tls.cert_path.display(),
            fingerprint = %tls.fingerprint, "admin API");
        Some(tls)
    } else {
        info!(%admin_addr, scheme = "http", "admin API (plain HTTP on loopback)");
        None
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
    let actor = Actor {
        state,
        store,
        live: HashMap::new(),
        next_conn: 0,
        advertise,
        public_key,
        events: Vec::new(),
        recent: recent_events.into(),
        pool,
        store_failure: None,
        stale: None,
    };
    let mut tasks = vec![tokio::spawn(actor.run(cmd_rx, stop_rx.clone()))];
    let key = Arc::new(key);
    tasks.push(tokio::spawn(accept_loop(
        endpoint.clone(),
        key,
        cmd_tx.clone(),
        stop_rx.clone(),
        limits.clone(),
        guard.clone(),
    )));
    let admin_fingerprint = admin_tls.as_ref().map(|t| t.fingerprint.clone());
    tasks.push(tokio::spawn(admin::serve(
        admin_listener,
        admin_tls.map(|t| t.config),
        cmd_tx.clone(),
        admin_hash,
        stop_rx,
        limits,
        guard.clone(),
    )));
    info!(%control_addr, %advertise, %admin_addr, public_key = %public_key, "coordinator started");
    Ok(CoordinatorHandle {
        control_addr,
        admin_addr,
        admin_fingerprint,
        advertise,
        public_key,
        cmds: cmd_tx,
        stop: stop_tx,
        endpoint,
        tasks,
        guard,
    })
}

/// Runs the coordinator until `opts.shutdown` fires.
pub async fn run(opts: CoordinatorOptions) -> anyhow::Result<()> {
    let shutdown = opts.shutdown.clone();
    let h = start(opts).await?;
    shutdown.wait().await;
    info!("coordinator stopping");
    h.stop().await;
    Ok(())
}

/// Takes the control endpoint's connection attempts: a client whose address is not proven is
/// sent a Retry once `quic_retry_threshold` handshakes are in progress (by default always, so
/// nothing but a Retry, smaller than the client's Initial, goes to an unproven address);
/// `quic_max_half_open` handshakes in progress at most; a source in its join-token backoff is
/// refused. Pressure is logged at most once per 10 s, with counts.
async fn accept_loop(
    endpoint: quinn::Endpoint,
    key: Arc<PrivateKey>,
    cmds: mpsc::Sender<Cmd>,
    mut stop: watch::Receiver<bool>,
    limits: Limits,
    guard: Arc<Guard>,
) {
    let mut pressure = LogLimiter::new(Duration::from_secs(guard::LOG_EVERY_SECS));
    let mut backoff_log = LogLimiter::new(Duration::from_secs(guard::LOG_EVERY_SECS));
    let c = &guard.counters;
    loop {
        let inc = tokio::select! {
            i = endpoint.accept() => match i { Some(i) => i, None => break },
            _ = stop.wait_for(|v| *v) => break,
        };
        let now = std::time::Instant::now();
        let remote = inc.remote_address();
        let half_open =
            usize::try_from(c.quic_half_open.load(Ordering::Relaxed)).unwrap_or(usize::MAX);
        let validated = inc.remote_address_validated();
        // Only a proven address is looked up: a spoofed one is sent a Retry at most.
        let blocked = validated
            && matches!(
                guard::lock(&guard.joins).check(now, remote.ip()),
                Check::Blocked { .. }
            );
        match admit_quic(
            validated,
            half_open,
            blocked,
            limits.quic_retry_threshold,
            limits.quic_max_half_open,
        ) {
            QuicAdmission::Accept => {
                c.half_open_started();
                tokio::spawn(handle_conn(
                    inc,
                    key.clone(),
                    cmds.clone(),
                    HalfOpen(guard.clone()),
                ));
            }
            QuicAdmission::Retry => {
                match inc.retry() {
                    Ok(()) => Counters::bump(&c.quic_retries),
                    Err(e) => e.into_incoming().ignore(),
                }
                if half_open > 0 {
                    if let Some(n) = pressure.hit(now) {
                        warn!(half_open, retries = c.quic_retries.load(Ordering::Relaxed),
                            refused = c.quic_refused_full.load(Ordering::Relaxed), since_last = n,
                            "control endpoint: many QUIC handshakes in progress; new clients must prove their address (Retry)");
                    }
                }
            }
            QuicAdmission::RefuseFull => {
                // Counted first: the client may hear of it before this thread goes on.
                Counters::bump(&c.quic_refused_full);
                inc.refuse();
                if let Some(n) = pressure.hit(now) {
                    warn!(
                        half_open,
                        retries = c.quic_retries.load(Ordering::Relaxed),
                        refused = c.quic_refused_full.load(Ordering::Relaxed),
                        since_last = n,
                        "control endpoint: QUIC half-open limit reached; refusing new connections"
                    );
                }
            }
            QuicAdmission::RefuseBackoff => {
                Counters::bump(&c.join_backoff_refused);
                inc.refuse();
                if let Some(n) = backoff_log.hit(now) {
                    warn!(source = %remote.ip(), refused = n,
                        "control endpoint: refusing connections from a source that keeps presenting bad join tokens");
                }
            }
        }
    }
}

/// One QUIC handshake in progress: counted in `quic_half_open` until dropped.
struct HalfOpen(Arc<Guard>);

impl Drop for HalfOpen {
    fn drop(&mut self) {
        self.0.counters.half_open_ended();
    }
}

async fn handle_conn(
    inc: quinn::Incoming,
    key: Arc<PrivateKey>,
    cmds: mpsc::Sender<Cmd>,
    half_open: HalfOpen,
) {
    let remote = inc.remote_address();
    let res = inc.await;
    let guard = half_open.0.clone();
    drop(half_open);
    let conn = match res {
        Ok(c) => c,
        Err(e) => {
            debug!(%remote, error = %e, "QUIC handshake failed");
            return;
        }
    };
    if let Err(e) = serve_conn(&conn, &key, &cmds, &guard).await {
        debug!(%remote, error = %e, "control connection ended");
    }
    conn.close(quinn::VarInt::from_u32(0), b"bye");
}

/// Whether a refusal means the join token was wrong (a guess, or one no longer valid).
fn bad_join_token(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::TokenUnknown
            | ErrorCode::TokenExpired
            | ErrorCode::TokenRevoked
            | ErrorCode::TokenUsedUp
    )
}

/// Counts, logs (rate-limited per source) and backs off a bad join token from `ip`.
fn join_token_failed(guard: &Guard, ip: IpAddr, code: ErrorCode) {
    Counters::bump(&guard.counters.join_token_failures);
    let f = guard::lock(&guard.joins).failure(std::time::Instant::now(), ip);
    if let Some(failed) = f.log {
        warn!(source = %ip, ?code, failed, in_a_row = f.failures,
            backoff_secs = f.blocked_for.map(|d| d.as_secs_f64()),
            "control endpoint: enrolment with a bad join token");
    }
}

#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("timed out")]
    Timeout,
    #[error("connection: {0}")]
    Conn(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error("coordinator stopping")]
    Stopping,
}

async fn timed<T, E: Into<ServeError>>(
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, ServeError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, f)
        .await
        .map_err(|_| ServeError::Timeout)?
        .map_err(Into::into)
}

async fn refuse(w: &mut noise::NoiseWriter, code: ErrorCode, message: String) {
    let _best_effort = w.send(&CoordinatorMessage::Error { code, message }).await;
    w.finish(Duration::from_secs(2)).await;
}

async fn serve_conn(
    conn: &quinn::Connection,
    key: &PrivateKey,
    cmds: &mpsc::Sender<Cmd>,
    guard: &Guard,
) -> Result<(), ServeError> {
    let (send, recv) = timed(conn.accept_bi()).await?;
    let (mut reader, mut writer, agent_key) = timed(noise::respond(
        send,
        recv,
        key,
        MAX_COORDINATOR_FRAME,
        MAX_AGENT_FRAME,
    ))
    .await?;
    let first = match timed(reader.recv::<AgentMessage>()).await {
        Ok(m) => m,
        Err(ServeError::Channel(e @ (ChannelError::Frame(_) | ChannelError::Noise(_)))) => {
            refuse(&mut writer, ErrorCode::Malformed, e.to_string()).await;
            return Err(e.into());
        }
        Err(e) => return Err(e),
    };
    let hello = match first {
        AgentMessage::Enrol {
            protocol,
            secret,
            name,
            endpoints,
        } if protocol == PROTOCOL_VERSION => Hello::Enrol {
            secret_hash: secret.hash(),
            name,
            endpoints,
        },
        AgentMessage::Resume {
            protocol,
            endpoints,
        } if protocol == PROTOCOL_VERSION => Hello::Resume { endpoints },
        AgentMessage::Enrol { protocol, .. } | AgentMessage::Resume { protocol, .. } => {
            refuse(
                &mut writer,
                ErrorCode::ProtocolVersion,
                format!("protocol {protocol} not supported (want {PROTOCOL_VERSION})"),
            )
            .await;
            return Ok(());
        }
        _ => {
            refuse(
                &mut writer,
                ErrorCode::Malformed,
                "first message must be enrol or resume".into(),
            )
            .await;
            return Ok(());
        }
    };
    let enrolling = matches!(hello, Hello::Enrol { .. });
    let (tx, mut rx) = mpsc::channel(OUTBOUND_QUEUE);
    let (reply_tx, reply_rx) = oneshot::channel();
    let mut observed = conn.remote_address();
    cmds.send(Cmd::Connect {
        key: agent_key,
        observed: observed.ip(),
        hello,
        tx: tx.clone(),
        conn: conn.clone(),
        reply: reply_tx,
    })
    .await
    .map_err(|_| ServeError::Stopping)?;
    let (info, cid) = match reply_rx.await.map_err(|_| ServeError::Stopping)? {
        Ok(x) => x,
        Err((code, message)) => {
            if enrolling && bad_join_token(code) {
                join_token_failed(guard, observed.ip(), code);
            }
            refuse(&mut writer, code, message).await;
            return Ok(());
        }
    };
    if enrolling {
        guard::lock(&guard.joins).success(observed.ip());
    }
    let host = info.id;
    writer
        .send(&CoordinatorMessage::Welcome {
            protocol: PROTOCOL_VERSION,
            host: info,
        })
        .await?;

    let reader_task = {
        let cmds = cmds.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let err = loop {
                let m = match reader.recv::<AgentMessage>().await {
                    Ok(m) => m,
                    Err(e) => break e,
                };
                let cmd = match m {
                    AgentMessage::ReportEndpoints { endpoints } => Cmd::Report {
                        host,
                        conn: cid,
                        endpoints,
                    },
                    AgentMessage::Ack { version } => Cmd::Ack {
                        host,
                        conn: cid,
                        version,
                    },
                    AgentMessage::Resync => Cmd::Resync { host, conn: cid },
                    AgentMessage::Blocks { events } => Cmd::Blocks {
                        host,
                        conn: cid,
                        events,
                    },
                    AgentMessage::Ping { nonce } => {
                        // Dropped if the queue is full; the agent pings again.
                        let _queue_full =
                            tx.try_send(Outbound::Msg(CoordinatorMessage::Pong { nonce }));
                        continue;
                    }
                    AgentMessage::Enrol { .. } | AgentMessage::Resume { .. } => {
                        let _ = tx
                            .send(Outbound::Close(
                                ErrorCode::Malformed,
                                "unexpected hello".into(),
                            ))
                            .await;
                        break ChannelError::Closed;
                    }
                };
                if cmds.send(cmd).await.is_err() {
                    break ChannelError::Closed;
                }
            };
            if matches!(
                err,
                ChannelError::Frame(_) | ChannelError::Noise(_) | ChannelError::Empty
            ) {
                warn!(%host, error = %err, "malformed control message; closing this agent's connection");
                let _ = tx
                    .send(Outbound::Close(ErrorCode::Malformed, err.to_string()))
                    .await;
            }
            let _ = cmds.send(Cmd::Disconnect { host, conn: cid }).await;
        })
    };
    drop(tx);

    let mut tick = tokio::time::interval(OBSERVE_INTERVAL);
    let result = loop {
        tokio::select! {
            m = rx.recv() => match m {
                Some(Outbound::Msg(msg)) => {
                    if let Err(e) = writer.send(&msg).await {
                        break Err(e.into());
                    }
                }
                Some(Outbound::Close(code, message)) => {
                    refuse(&mut writer, code, message).await;
                    break Ok(());
                }
                None => break Ok(()),
            },
            _ = tick.tick() => {
                let now = conn.remote_address();
                if now != observed {
                    observed = now;
                    info!(%host, %now, "agent's observed address changed");
                    if cmds.send(Cmd::Observed { host, conn: cid, ip: now.ip() }).await.is_err() {
                        break Err(ServeError::Stopping);
                    }
                }
            }
            e = conn.closed() => break Err(e.into()),
        }
    };
    reader_task.abort();
    let _ = cmds.send(Cmd::Disconnect { host, conn: cid }).await;
    result
}
