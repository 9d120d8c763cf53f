//! The coordinator side, in memory: `meshd_control::CoordinatorState` driven the way the
//! coordinator's actor drives it (`crates/coordinator/src/server.rs`), with a store that
//! holds what the SQLite store would.
//!
//! Per batch (here: per delivered message or admin call): `handle_policy_timeout(now)`, the
//! events, then [`SimCoordinator::flush`]: notices, pushes and kicks polled, the dirty records
//! committed to the [`MemStore`], and only then the pushes and kicks handed out. A restart
//! ([`SimCoordinator::restart`]) rebuilds the state from the store as start-up does
//! (`restore`, `restore_policies`, `restore_mode`, `restore_blocks`, `restore_flow_intervals`); live sessions do not survive it.

use std::collections::BTreeMap;

use ipnet::{Ipv4Net, Ipv6Net};
use meshd_control::policy::PolicyRecord;
use meshd_control::proto::{AgentMessage, CoordinatorMessage, ErrorCode, HostInfo};
use meshd_control::state::{
    ConnId, Dirty, Hello, Kick, Notice, RestoreError, RuntimeMode, TokenSpec,
};
use meshd_control::{
    CoordinatorState, Host, HostId, IpPool, PoolError, Push, Token, TokenId, UnixTime,
};
use meshd_policy::BlockEvent;
use meshd_tunnel::PublicKey;

/// What the coordinator's store holds: the committed records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemStore {
    /// Hosts by id.
    pub hosts: BTreeMap<HostId, Host>,
    /// Tokens by id.
    pub tokens: BTreeMap<TokenId, Token>,
    /// The last map version committed.
    pub map_version: u64,
    /// Applied policy versions, oldest first.
    pub policies: Vec<PolicyRecord>,
    /// Block events, oldest first.
    pub blocks: Vec<BlockEvent>,
    /// Flow rows, oldest first (never pruned here).
    pub flows: Vec<meshd_control::api::FlowView>,
    /// The runtime learning setting.
    pub mode: RuntimeMode,
    /// Commits so far.
    pub commits: u64,
}

impl MemStore {
    /// Commits one batch's records.
    pub fn commit(&mut self, d: Dirty) {
        if d.is_empty() {
            return;
        }
        for h in d.hosts {
            self.hosts.insert(h.id, h);
        }
        for t in d.tokens {
            self.tokens.insert(t.id, t);
        }
        if let Some(v) = d.map_version {
            self.map_version = v;
        }
        if let Some(p) = d.policy {
            self.policies.push(p);
        }
        if let Some(m) = d.mode {
            self.mode = m;
        }
        self.blocks.extend(d.blocks);
        self.flows.extend(d.flows);
        let keep = meshd_control::state::BLOCKS_KEPT;
        if self.blocks.len() > keep {
            let n = self.blocks.len() - keep;
            self.blocks.drain(..n);
        }
        self.commits += 1;
    }
}

/// What a batch sends: maps and deltas, and connections to close (after sending their
/// error).
#[derive(Debug, Default)]
#[must_use]
pub struct Outbox {
    /// Maps and deltas.
    pub pushes: Vec<Push>,
    /// Sessions to close.
    pub kicks: Vec<Kick>,
    /// Notices of the batch.
    pub notices: Vec<Notice>,
}

/// Why a restart failed.
#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    /// The stored hosts do not fit the pool.
    #[error(transparent)]
    Restore(#[from] RestoreError),
    /// The stored policy does not parse.
    #[error(transparent)]
    Policy(#[from] meshd_control::policy::PolicyError),
}

/// The in-memory coordinator. See the module docs.
#[derive(Debug)]
pub struct SimCoordinator {
    state: CoordinatorState,
    store: MemStore,
    pool: (Ipv4Net, Option<Ipv6Net>),
    next_conn: u64,
    restarts: u64,
}

impl SimCoordinator {
    /// A fresh coordinator over a pool.
    pub fn new(pool_v4: Ipv4Net, pool_v6: Option<Ipv6Net>) -> Result<Self, PoolError> {
        Ok(SimCoordinator {
            state: CoordinatorState::new(pool_v4, pool_v6)?,
            store: MemStore::default(),
            pool: (pool_v4, pool_v6),
            next_conn: 0,
            restarts: 0,
        })
    }

    /// The state (read-only: to compare agents against `full_map_for` / `grants_for`).
    pub fn state(&self) -> &CoordinatorState {
        &self.state
    }

    /// The state for admin operations; call [`SimCoordinator::flush`] after them.
    pub fn state_mut(&mut self) -> &mut CoordinatorState {
        &mut self.state
    }

    /// What the store holds.
    pub fn store(&self) -> &MemStore {
        &self.store
    }

    /// Restarts so far.
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    /// Starts a batch at `now`: rules that expired are recompiled away.
    pub fn begin(&mut self, now: UnixTime) {
        self.state.handle_policy_timeout(now);
    }

    /// Ends a batch: polls what to send and commits the changed records before anything is
    /// sent (commit, then acknowledge).
    pub fn flush(&mut self) -> Outbox {
        let notices = self.state.poll_notices();
        let pushes = self.state.poll_pushes();
        let kicks = self.state.poll_kicks();
        self.store.commit(self.state.take_dirty());
        Outbox {
            pushes,
            kicks,
            notices,
        }
    }

    /// A new connection's first message: `Enrol` or `Resume`. On success the session is live
    /// (its full map comes with the next flush) and the reply is the `Welcome`.
    pub fn hello(
        &mut self,
        now: UnixTime,
        key: PublicKey,
        observed: std::net::IpAddr,
        first: AgentMessage,
    ) -> Result<(ConnId, HostInfo), ErrorCode> {
        let hello = Hello::from_first(first).map_err(|r| r.code)?;
        self.next_conn += 1;
        let conn = ConnId(self.next_conn);
        let info = self.state.connect(now, key, conn, observed, hello)?;
        Ok((conn, info))
    }

    /// A later message on a live connection, as the server's connection task turns it into a
    /// command. `observed` is the connection's current source address (a report takes it
    /// afresh). Returns the direct answer, if any (`Pong`), or an error to close with.
    pub fn message(
        &mut self,
        now: UnixTime,
        host: HostId,
        conn: ConnId,
        observed: std::net::IpAddr,
        m: AgentMessage,
    ) -> Result<Option<CoordinatorMessage>, ErrorCode> {
        match m {
            AgentMessage::ReportEndpoints { endpoints } => {
                self.state.observed_changed(now, host, conn, observed);
                self.state.report_endpoints(now, host, conn, endpoints);
            }
            AgentMessage::Ack { version } => self.state.ack(host, conn, version),
            AgentMessage::Resync => self.state.resync(host, conn),
            AgentMessage::Blocks { events } => self.state.record_blocks(host, conn, events),
            AgentMessage::Flows {
                interval_start,
                records,
                plaintext,
                overflow,
            } => {
                let _counted = self.state.record_flows(
                    now,
                    host,
                    conn,
                    meshd_control::state::FlowBatch {
                        interval_start,
                        records,
                        plaintext,
                        overflow,
                    },
                );
            }
            AgentMessage::Ping { nonce } => return Ok(Some(CoordinatorMessage::Pong { nonce })),
            // The harness holds no coordinator key to check a proof with: a rotation started
            // here is aborted as unproved (the real path is tested in meshd/tests/rotation.rs).
            AgentMessage::KeyProposal { nonce, new_key, .. } => {
                self.state.key_proposal(
                    now,
                    host,
                    conn,
                    meshd_control::rotation::Proposal {
                        nonce,
                        new_key,
                        proof_ok: false,
                        succession: None,
                    },
                )?;
            }
            AgentMessage::Enrol { .. } | AgentMessage::Resume { .. } => {
                return Err(ErrorCode::Malformed)
            }
        }
        Ok(None)
    }

    /// The connection ended.
    pub fn disconnect(&mut self, now: UnixTime, host: HostId, conn: ConnId) {
        self.state.disconnect(now, host, conn);
    }

    /// Creates a join token with `labels` and secret `secret`, committed at once.
    pub fn create_token(
        &mut self,
        now: UnixTime,
        spec: TokenSpec,
        secret: &meshd_control::TokenSecret,
    ) -> Result<Token, meshd_control::state::AdminError> {
        let t = self.state.create_token(now, spec, secret.hash())?;
        let _nothing_to_send = self.flush();
        Ok(t)
    }

    /// Kills the coordinator and starts it again from its store at `now`: every session is
    /// gone (the caller closes the agents' connections).
    pub fn restart(&mut self, now: UnixTime) -> Result<(), RestartError> {
        let pool = IpPool::new(self.pool.0, self.pool.1).map_err(|source| RestoreError::Pool {
            host: String::new(),
            source,
        })?;
        let s = &self.store;
        let mut state = CoordinatorState::restore(
            pool,
            s.hosts.values().cloned().collect(),
            s.tokens.values().cloned().collect(),
            s.map_version,
        )?;
        state.restore_policies(now, s.policies.clone())?;
        state.restore_mode(now, s.mode.clone());
        state.restore_blocks(s.blocks.clone());
        // As the SQLite store's load: row counts per (host, interval) stored.
        let mut counts: BTreeMap<(HostId, UnixTime), usize> = BTreeMap::new();
        for f in &s.flows {
            *counts.entry((f.host_id, f.interval_start)).or_default() += 1;
        }
        state.restore_flow_intervals(
            counts
                .into_iter()
                .map(
                    |((host, interval_start), rows)| meshd_control::state::FlowInterval {
                        host,
                        interval_start,
                        rows,
                    },
                )
                .collect(),
        );
        self.state = state;
        self.restarts += 1;
        Ok(())
    }
}
