//! The coordinator's reconciliation core: hosts, tokens and live sessions in memory; events in,
//! records to persist and maps/deltas to push out.
//!
//! Call order per batch of events:
//! 1. any number of event methods (`connect`, `report_endpoints`, admin operations …), each with `now`;
//! 2. [`CoordinatorState::poll_pushes`] and [`CoordinatorState::poll_kicks`];
//! 3. [`CoordinatorState::take_dirty`] → persist the records (before sending anything);
//! 4. send the pushes, close the kicked connections.
//!
//! Per session the state keeps, sorted by host id, the revision of every peer record the agent
//! was last sent and a hash of the grants it was sent with; a peer whose host revision or grants
//! moved on is re-sent.
//!
//! Which hosts peer with which is the compiled label policy ([`meshd_policy::Compiled`]): a host's
//! map holds exactly the hosts it may open connections to or be reached from, each with its grants.
//! No policy = default deny = empty maps. Host changes update the compiled policy incrementally and
//! only the affected agents' maps are recomputed; a policy change recomputes every map.
//! Quarantined hosts are left out of the compilation (nobody's peer, no peers); revoked hosts are
//! removed and their key is refused for good ([`ErrorCode::HostRevoked`](crate::proto::ErrorCode::HostRevoked)).
//!
//! The type and its constructors are here; its methods are grouped by seam:
//! `sessions.rs` (connect, hello, ack, resync, disconnect), `admin.rs` (tokens, labels, rename,
//! remove, quarantine, revoke, input bounds), `admin_tokens.rs` (named admin tokens),
//! `policy.rs` (apply, rollback, diff, explain, check, expiry), `mode.rs` (learning mode at runtime, `is_learning`), `blocks.rs` (block
//! events), `flows.rs` (flow records) and `pushes.rs` (maps and deltas out, kicks, records to
//! persist).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use meshd_policy::{BlockEvent, Compiled, Policy};
use meshd_tunnel::PublicKey;

use crate::model::{Host, HostId, Token, TokenId};
use crate::policy::PolicyRecord;
use crate::pool::{IpPool, PoolError};

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

pub use admin::{
    check_policy_size, AdminError, TokenSpec, MAX_LABELS, MAX_POLICY_BYTES, MAX_TOKEN_TTL_SECS,
    MAX_TOKEN_USES,
};
pub use admin_tokens::{
    validate_admin_token_name, AdminAuthError, AdminToken, AdminTokenNameError, AdminTokenRevoked,
    AdminTokens, BOOTSTRAP_ADMIN_TOKEN, MAX_ADMIN_TOKEN_NAME,
};
pub use blocks::BLOCKS_KEPT;
pub use cmdb::ImportOutcome;
pub use detector::{ScanAction, ScanAlert, ScanConfig, ScanConfigError, ScanDetector, ScanGroup};
pub use flows::{
    FlowBatch, FlowInterval, FlowLimits, FlowStats, FlowsRecorded, DEFAULT_FLOW_ROWS_PER_HOST,
    FLOW_CLOCK_AHEAD_SECS, FLOW_INTERVALS_REMEMBERED,
};
pub use mode::{group_selector, RuntimeMode, MAX_LEARN_GROUPS};
pub use pushes::{Carried, Dirty, Kick, Push, PushWork};
pub use rotation::RotationEvent;
pub use sessions::{Hello, HelloRefused, Notice, SessionInfo, MAX_REPORTED_ENDPOINTS};
pub use signed::{SignedBatchApplied, SignedRecord, SignedView};

use pushes::SentPeer;
use sessions::Session;

/// Identifies one control connection (so a stale disconnect cannot end a newer session).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// Why persisted state could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    /// A stored host's address does not fit the configured pool.
    #[error("host {host}: {source}")]
    Pool {
        /// Host name.
        host: String,
        /// Cause.
        #[source]
        source: PoolError,
    },
}

/// The reconciliation core. See the module docs for the call order.
#[derive(Debug)]
pub struct CoordinatorState {
    pool: IpPool,
    hosts: BTreeMap<HostId, Host>,
    by_key: HashMap<PublicKey, HostId>,
    tokens: BTreeMap<TokenId, Token>,
    by_hash: HashMap<[u8; 32], TokenId>,
    next_host: u64,
    next_token: u64,
    map_version: u64,
    version_dirty: bool,
    revs: HashMap<HostId, u64>,
    next_rev: u64,
    sessions: BTreeMap<HostId, Session>,
    changed: BTreeSet<HostId>,
    membership_dirty: bool,
    dirty_hosts: BTreeSet<HostId>,
    dirty_tokens: BTreeSet<TokenId>,
    kicks: Vec<Kick>,
    /// Applied policy versions, oldest first; the last is current.
    policies: Vec<PolicyRecord>,
    /// The current policy, parsed.
    policy: Policy,
    /// The current policy compiled against the live hosts.
    compiled: Compiled,
    /// Hosts whose whole peer set may have changed (all of them if `recheck_all`).
    recheck: BTreeSet<HostId>,
    recheck_all: bool,
    /// Per host, the peers whose grants towards it may have changed (one host changed: only the
    /// pairs involving it; checked without recomputing the whole map).
    recheck_pairs: BTreeMap<HostId, BTreeSet<HostId>>,
    /// What computing pushes has cost (counters).
    push_work: pushes::PushWork,
    dirty_policy: Option<PolicyRecord>,
    /// The runtime learning setting (`meshctl policy mode`), combined with the file's.
    runtime_mode: RuntimeMode,
    /// The runtime setting changed since the last `take_dirty`.
    dirty_mode: bool,
    /// Keys refused for good.
    revoked_keys: HashSet<PublicKey>,
    /// The most recent block events (at most [`BLOCKS_KEPT`]) and those not yet persisted.
    blocks: VecDeque<BlockEvent>,
    dirty_blocks: Vec<BlockEvent>,
    blocks_dropped: u64,
    notices: Vec<Notice>,
    /// Flow ingest bounds, per-host interval row counts, rows not yet persisted, counters.
    flow_limits: FlowLimits,
    flow_counts: HashMap<HostId, flows::IntervalCounts>,
    dirty_flows: Vec<crate::api::FlowView>,
    flow_stats: FlowStats,
    /// CMDB host records (`state/cmdb.rs`), those not yet persisted, the next id.
    records: BTreeMap<crate::cmdb::RecordId, crate::cmdb::HostRecord>,
    dirty_records: BTreeSet<crate::cmdb::RecordId>,
    next_record: u64,
    /// Key rotations under way (`state/rotation.rs`), the automatic periods, the rotation
    /// messages for the next poll, (new, old) keys of completed rotations whose old key
    /// peers must drop, and the steps to record as events.
    rotations: crate::rotation::Rotations,
    rotation_schedule: crate::rotation::RotationSchedule,
    rotation_msgs: Vec<Push>,
    retired_keys: Vec<(PublicKey, PublicKey)>,
    rotation_events: Vec<RotationEvent>,
    /// Admin-signed statements (`state/signed.rs`; empty: unsigned mesh).
    signed: signed::SignedState,
    /// Named admin tokens (`state/admin_tokens.rs`) and those not yet persisted, by name.
    admin_tokens: AdminTokens,
    dirty_admin_tokens: BTreeSet<String>,
}

impl CoordinatorState {
    /// Empty state over a pool.
    pub fn new(pool_v4: Ipv4Net, pool_v6: Option<Ipv6Net>) -> Result<Self, PoolError> {
        Ok(Self::empty(IpPool::new(pool_v4, pool_v6)?))
    }

    fn empty(pool: IpPool) -> Self {
        CoordinatorState {
            pool,
            hosts: BTreeMap::new(),
            by_key: HashMap::new(),
            tokens: BTreeMap::new(),
            by_hash: HashMap::new(),
            next_host: 1,
            next_token: 1,
            map_version: 0,
            version_dirty: false,
            revs: HashMap::new(),
            next_rev: 1,
            sessions: BTreeMap::new(),
            changed: BTreeSet::new(),
            membership_dirty: false,
            dirty_hosts: BTreeSet::new(),
            dirty_tokens: BTreeSet::new(),
            kicks: Vec::new(),
            policies: Vec::new(),
            policy: Policy::default(),
            compiled: meshd_policy::compile(&Policy::default(), &[], 0),
            recheck: BTreeSet::new(),
            recheck_all: false,
            recheck_pairs: BTreeMap::new(),
            push_work: pushes::PushWork::default(),
            dirty_policy: None,
            runtime_mode: RuntimeMode::default(),
            dirty_mode: false,
            revoked_keys: HashSet::new(),
            blocks: VecDeque::new(),
            dirty_blocks: Vec::new(),
            blocks_dropped: 0,
            notices: Vec::new(),
            flow_limits: FlowLimits::default(),
            flow_counts: HashMap::new(),
            dirty_flows: Vec::new(),
            flow_stats: FlowStats::default(),
            records: BTreeMap::new(),
            dirty_records: BTreeSet::new(),
            next_record: 1,
            rotations: crate::rotation::Rotations::default(),
            rotation_schedule: crate::rotation::RotationSchedule::default(),
            rotation_msgs: Vec::new(),
            retired_keys: Vec::new(),
            rotation_events: Vec::new(),
            signed: signed::SignedState::default(),
            admin_tokens: AdminTokens::default(),
            dirty_admin_tokens: BTreeSet::new(),
        }
    }

    /// State rebuilt from storage (`pool` empty; stored hosts' addresses are reserved in it).
    pub fn restore(
        pool: IpPool,
        hosts: Vec<Host>,
        tokens: Vec<Token>,
        map_version: u64,
    ) -> Result<Self, RestoreError> {
        let mut s = Self::empty(pool);
        s.map_version = map_version;
        for mut h in hosts {
            s.next_host = s.next_host.max(h.id.0 + 1);
            if !h.removed {
                s.pool
                    .reserve(h.ipv4)
                    .map_err(|source| RestoreError::Pool {
                        host: h.name.clone(),
                        source,
                    })?;
                if h.ipv6.is_none() {
                    h.ipv6 = s.pool.v6_for(h.ipv4);
                }
            }
            // A live host beats a removed one for its key; otherwise the newest wins.
            let replace = match s.by_key.get(&h.public_key).and_then(|id| s.hosts.get(id)) {
                Some(old) => old.removed || (!h.removed && h.id > old.id),
                None => true,
            };
            if replace {
                s.by_key.insert(h.public_key, h.id);
            }
            let rev = s.bump_rev();
            s.revs.insert(h.id, rev);
            if h.revoked {
                s.revoked_keys.insert(h.public_key);
            }
            // A rotation proved before a restart: peers keep accepting both keys until the
            // host reconnects with the new one (or the grace period ends).
            if let (Some(k), false) = (h.pending_key, h.removed) {
                s.rotations.restore_pending(h.id, k, h.last_seen);
            }
            s.hosts.insert(h.id, h);
        }
        s.recompile(0);
        for t in tokens {
            s.next_token = s.next_token.max(t.id.0 + 1);
            s.by_hash.insert(t.secret_hash, t.id);
            s.tokens.insert(t.id, t);
        }
        Ok(s)
    }

    fn bump_rev(&mut self) -> u64 {
        let r = self.next_rev;
        self.next_rev += 1;
        r
    }

    /// Marks a host's peer-visible record as changed.
    fn touch(&mut self, id: HostId) {
        let r = self.bump_rev();
        self.revs.insert(id, r);
        self.changed.insert(id);
        self.dirty_hosts.insert(id);
    }

    /// The pool's networks (for `Welcome`).
    pub fn networks(&self) -> Vec<IpNet> {
        let mut v = vec![IpNet::V4(self.pool.network())];
        if let Some(n) = self.pool.network_v6() {
            v.push(IpNet::V6(n));
        }
        v
    }

    /// Whether a membership change (enrol, removal, labels) awaits the next `poll_pushes`
    /// (such changes fan out to every agent, so callers may wait a little to batch them).
    pub fn membership_pending(&self) -> bool {
        self.membership_dirty
    }

    /// Current global map version.
    pub fn map_version(&self) -> u64 {
        self.map_version
    }

    /// All hosts, including removed ones, by id.
    pub fn hosts(&self) -> impl Iterator<Item = &Host> {
        self.hosts.values()
    }

    /// A host by id.
    pub fn host(&self, id: HostId) -> Option<&Host> {
        self.hosts.get(&id)
    }

    /// The live (not removed) host with this key.
    pub fn host_by_key(&self, key: &PublicKey) -> Option<&Host> {
        self.by_key
            .get(key)
            .and_then(|id| self.hosts.get(id))
            .filter(|h| !h.removed)
    }

    /// Finds a non-removed host by name, then id, then public key.
    pub fn find_host(&self, r: &str) -> Result<&Host, AdminError> {
        let live = || self.hosts.values().filter(|h| !h.removed);
        if let Some(h) = live().find(|h| h.name == r) {
            return Ok(h);
        }
        if let Ok(id) = r.parse::<u64>() {
            if let Some(h) = self.hosts.get(&HostId(id)) {
                return if h.removed {
                    Err(AdminError::HostRemoved(r.into()))
                } else {
                    Ok(h)
                };
            }
        }
        if let Ok(k) = r.parse::<PublicKey>() {
            if let Some(h) = self.host_by_key(&k) {
                return Ok(h);
            }
        }
        Err(AdminError::NoSuchHost(r.into()))
    }

    /// All tokens by id.
    pub fn tokens(&self) -> impl Iterator<Item = &Token> {
        self.tokens.values()
    }

    fn name_taken(&self, name: &str, except: Option<HostId>) -> bool {
        self.hosts
            .values()
            .any(|h| !h.removed && h.name == name && Some(h.id) != except)
    }

    fn live_id(&self, r: &str) -> Result<HostId, AdminError> {
        self.find_host(r).map(|h| h.id)
    }

    fn host_result(&self, id: HostId, r: &str) -> Result<Host, AdminError> {
        self.hosts
            .get(&id)
            .cloned()
            .ok_or_else(|| AdminError::NoSuchHost(r.into()))
    }
}

#[cfg(test)]
mod tests;
