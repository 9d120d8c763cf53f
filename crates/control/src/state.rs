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
//! removed and their key is refused for good ([`ErrorCode::HostRevoked`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use meshd_tunnel::PublicKey;

use crate::map::{MapDelta, NetworkMap, Peer};
use crate::model::{
    validate_label, validate_name, Host, HostId, LabelError, Labels, NameError, Token, TokenId,
    TokenUnusable, UnixTime,
};
use crate::policy::{host_ref, is_live, PolicyError, PolicyRecord};
use crate::pool::{IpPool, PoolError};
use crate::proto::{CoordinatorMessage, EndpointReport, ErrorCode, HostInfo};
use meshd_policy::{
    BlockEvent, Change, Compiled, Explanation, PeerGrants, Policy, Probe, TestResult,
};

/// Identifies one control connection (so a stale disconnect cannot end a newer session).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// How an agent opens a session.
#[derive(Debug, Clone)]
pub enum Hello {
    /// New host with a join token (only the secret's hash is passed in).
    Enrol {
        /// SHA-256 of the token secret.
        secret_hash: [u8; 32],
        /// Requested name.
        name: String,
        /// Underlay endpoints.
        endpoints: EndpointReport,
    },
    /// Enrolled host reconnecting.
    Resume {
        /// Underlay endpoints.
        endpoints: EndpointReport,
    },
}

/// A message for one connected agent.
#[derive(Debug, Clone)]
#[must_use]
pub struct Push {
    /// Recipient host.
    pub host: HostId,
    /// Recipient connection.
    pub conn: ConnId,
    /// `FullMap` or `Delta`.
    pub message: CoordinatorMessage,
}

/// A connection to close, with the error to send first.
#[derive(Debug, Clone)]
#[must_use]
pub struct Kick {
    /// Host.
    pub host: HostId,
    /// Connection.
    pub conn: ConnId,
    /// Why.
    pub code: ErrorCode,
}

/// Records changed since the last `take_dirty` (persist all in one transaction).
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct Dirty {
    /// Changed hosts (full records).
    pub hosts: Vec<Host>,
    /// Changed tokens (full records).
    pub tokens: Vec<Token>,
    /// New map version, if it moved.
    pub map_version: Option<u64>,
    /// A newly applied policy version.
    pub policy: Option<PolicyRecord>,
    /// Block events received since the last call (the store keeps a bounded number).
    pub blocks: Vec<BlockEvent>,
}

impl Dirty {
    /// Nothing to persist.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
            && self.tokens.is_empty()
            && self.map_version.is_none()
            && self.policy.is_none()
            && self.blocks.is_empty()
    }
}

/// Parameters of a new join token.
#[derive(Debug, Clone, Default)]
pub struct TokenSpec {
    /// Labels for hosts enrolling with it.
    pub labels: Labels,
    /// Lifetime in seconds (`None`: no expiry).
    pub ttl_secs: Option<u64>,
    /// Number of enrolments (`None`: unlimited).
    pub uses: Option<u32>,
}

/// Why an admin operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// No host matches.
    #[error("no host {0:?} (give a name, id or public key; see `meshctl hosts list`)")]
    NoSuchHost(String),
    /// No token with this id.
    #[error("no token with id {0}")]
    NoSuchToken(TokenId),
    /// Name used by another host.
    #[error("host name {0:?} is already taken")]
    NameTaken(String),
    /// Invalid name.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// Invalid label.
    #[error(transparent)]
    InvalidLabel(#[from] LabelError),
    /// The host was removed.
    #[error("host {0:?} was removed")]
    HostRemoved(String),
    /// A policy operation failed.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// Not a single protocol and port (`tcp/N`, `udp/N`, `icmp`).
    #[error(transparent)]
    Port(#[from] meshd_policy::PortSpecError),
    /// A token lifetime beyond [`MAX_TOKEN_TTL_SECS`].
    #[error("token lifetime {0} s is out of range: give at most {MAX_TOKEN_TTL_SECS} s (10 years), or none for no expiry")]
    InvalidTtl(u64),
    /// A token use count beyond [`MAX_TOKEN_USES`].
    #[error(
        "token use count {0} is out of range: give at most {MAX_TOKEN_USES}, or none for unlimited"
    )]
    InvalidUses(u32),
    /// More than [`MAX_LABELS`] labels on a host or token.
    #[error("{0} labels is too many (at most {MAX_LABELS})")]
    TooManyLabels(usize),
    /// A policy file over [`MAX_POLICY_BYTES`].
    #[error("the policy file is {0} bytes; at most {MAX_POLICY_BYTES} are accepted")]
    PolicyTooLarge(usize),
    /// The change could not be saved, so it was not made (the state is as before the request).
    #[error("not saved, nothing changed: {0}")]
    NotSaved(String),
}

/// Longest token lifetime: 10 years (longer ones overflowed the store's 64-bit signed time).
pub const MAX_TOKEN_TTL_SECS: u64 = 10 * 365 * 24 * 3600;
/// Most enrolments one token may allow.
pub const MAX_TOKEN_USES: u32 = 1_000_000;
/// Most labels on one host or token.
pub const MAX_LABELS: usize = 64;
/// Largest policy file accepted.
pub const MAX_POLICY_BYTES: usize = 1024 * 1024;
/// Most underlay endpoints kept from one agent's report (the rest are dropped).
pub const MAX_REPORTED_ENDPOINTS: usize = 64;
/// Latest event time the store can hold (its integers are signed 64-bit).
const MAX_STORED_TIME: u64 = i64::MAX as u64;

/// Something the operator should hear about, from [`CoordinatorState::poll_notices`] (the
/// coordinator logs it and records it as an event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// An enrolling host asked for a name another host has; it got another one.
    HostRenamedOnEnrol {
        /// The new host.
        id: HostId,
        /// The name it asked for.
        requested: String,
        /// The name it got.
        assigned: String,
    },
    /// An enrolment was refused: no overlay address left.
    PoolExhausted {
        /// The pool.
        pool: Ipv4Net,
        /// Addresses in use.
        used: usize,
        /// The name the refused host asked for.
        requested: String,
    },
}

impl Notice {
    /// The event kind (`meshctl events`).
    pub fn kind(&self) -> &'static str {
        match self {
            Notice::HostRenamedOnEnrol { .. } => "host_renamed_on_enrol",
            Notice::PoolExhausted { .. } => "pool_exhausted",
        }
    }
}

impl std::fmt::Display for Notice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Notice::HostRenamedOnEnrol {
                id,
                requested,
                assigned,
            } => write!(
                f,
                "requested name {requested} taken; enrolled as {assigned} ({id})"
            ),
            Notice::PoolExhausted {
                pool,
                used,
                requested,
            } => write!(
                f,
                "address pool {pool} exhausted ({used} addresses in use); refused to enrol {requested}"
            ),
        }
    }
}

/// Checks a label set's size and each pair.
fn validate_labels(labels: &Labels) -> Result<(), AdminError> {
    if labels.len() > MAX_LABELS {
        return Err(AdminError::TooManyLabels(labels.len()));
    }
    for (k, v) in labels {
        validate_label(k, v)?;
    }
    Ok(())
}

/// Refuses a policy file over [`MAX_POLICY_BYTES`] (before it is parsed or stored).
pub fn check_policy_size(yaml: &str) -> Result<(), AdminError> {
    if yaml.len() > MAX_POLICY_BYTES {
        return Err(AdminError::PolicyTooLarge(yaml.len()));
    }
    Ok(())
}

/// How many block events the coordinator keeps in memory for `GET /v1/blocks`.
pub const BLOCKS_KEPT: usize = 10_000;

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

/// A live session as shown by `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// Host.
    pub host: HostId,
    /// Connection.
    pub conn: ConnId,
    /// Last map version sent (0: none yet).
    pub sent_version: u64,
    /// Last version the agent acked.
    pub acked_version: u64,
    /// Connected since.
    pub connected_at: UnixTime,
}

#[derive(Debug)]
struct Session {
    conn: ConnId,
    /// Sorted by host id: (peer, revision sent, fingerprint of the grants sent); `None` until
    /// the first full map.
    sent: Option<Vec<(HostId, u64, u64)>>,
    sent_version: u64,
    acked: u64,
    connected_at: UnixTime,
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
    dirty_policy: Option<PolicyRecord>,
    /// Keys refused for good.
    revoked_keys: HashSet<PublicKey>,
    /// The most recent block events (at most [`BLOCKS_KEPT`]) and those not yet persisted.
    blocks: VecDeque<BlockEvent>,
    dirty_blocks: Vec<BlockEvent>,
    blocks_dropped: u64,
    notices: Vec<Notice>,
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
            dirty_policy: None,
            revoked_keys: HashSet::new(),
            blocks: VecDeque::new(),
            dirty_blocks: Vec::new(),
            blocks_dropped: 0,
            notices: Vec::new(),
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

    /// Live sessions.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        self.sessions
            .iter()
            .map(|(h, s)| SessionInfo {
                host: *h,
                conn: s.conn,
                sent_version: s.sent_version,
                acked_version: s.acked,
                connected_at: s.connected_at,
            })
            .collect()
    }

    /// Whether a host has a live session.
    pub fn is_connected(&self, id: HostId) -> bool {
        self.sessions.contains_key(&id)
    }

    fn name_taken(&self, name: &str, except: Option<HostId>) -> bool {
        self.hosts
            .values()
            .any(|h| !h.removed && h.name == name && Some(h.id) != except)
    }

    /// An agent connected and proved `key`. On success the session is live and its full map
    /// will come out of the next `poll_pushes`.
    pub fn connect(
        &mut self,
        now: UnixTime,
        key: PublicKey,
        conn: ConnId,
        observed: IpAddr,
        hello: Hello,
    ) -> Result<HostInfo, ErrorCode> {
        if self.revoked_keys.contains(&key) {
            return Err(ErrorCode::HostRevoked);
        }
        let existing = self.by_key.get(&key).copied();
        let (id, endpoints) = match (hello, existing.and_then(|id| self.hosts.get(&id))) {
            (Hello::Resume { .. }, None) => return Err(ErrorCode::UnknownHost),
            (Hello::Resume { .. }, Some(h)) if h.removed => return Err(ErrorCode::HostRemoved),
            (Hello::Resume { endpoints }, Some(h)) => (h.id, endpoints),
            // Already enrolled (e.g. the Welcome was lost): resume without using the token.
            (Hello::Enrol { endpoints, .. }, Some(h)) if !h.removed => (h.id, endpoints),
            (
                Hello::Enrol {
                    secret_hash,
                    name,
                    endpoints,
                },
                _,
            ) => {
                let id = self.enrol(now, key, secret_hash, name, &endpoints)?;
                (id, endpoints)
            }
        };
        if self.sessions.contains_key(&id) {
            return Err(ErrorCode::AlreadyConnected);
        }
        self.sessions.insert(
            id,
            Session {
                conn,
                sent: None,
                sent_version: 0,
                acked: 0,
                connected_at: now,
            },
        );
        self.update_endpoints(now, id, Some(endpoints), Some(observed));
        let h = self.hosts.get(&id).ok_or(ErrorCode::Internal)?;
        Ok(HostInfo::from_host(h, self.networks()))
    }

    /// A free name for host `id` that asked for the taken `name`: `name-ID` (then `name-ID-2`,
    /// …), with `name` shortened so the result stays a valid name.
    fn free_name(&self, name: &str, id: HostId) -> String {
        (1u64..)
            .map(|n| {
                let suffix = if n == 1 {
                    format!("-{}", id.0)
                } else {
                    format!("-{}-{n}", id.0)
                };
                // Validated names are ASCII: any byte index is a char boundary.
                let keep = name.len().min(63usize.saturating_sub(suffix.len()));
                format!("{}{suffix}", &name[..keep])
            })
            .find(|n| !self.name_taken(n, None))
            .unwrap_or_else(|| format!("host-{}", id.0))
    }

    /// What happened that the operator should hear about, since the last call.
    pub fn poll_notices(&mut self) -> Vec<Notice> {
        std::mem::take(&mut self.notices)
    }

    fn enrol(
        &mut self,
        now: UnixTime,
        key: PublicKey,
        secret_hash: [u8; 32],
        name: String,
        endpoints: &EndpointReport,
    ) -> Result<HostId, ErrorCode> {
        let tid = *self
            .by_hash
            .get(&secret_hash)
            .ok_or(ErrorCode::TokenUnknown)?;
        let token = self.tokens.get(&tid).ok_or(ErrorCode::TokenUnknown)?;
        token.check(now).map_err(|e| match e {
            TokenUnusable::Expired => ErrorCode::TokenExpired,
            TokenUnusable::Revoked => ErrorCode::TokenRevoked,
            TokenUnusable::UsedUp => ErrorCode::TokenUsedUp,
        })?;
        validate_name(&name).map_err(|_| ErrorCode::InvalidName)?;
        let labels = token.labels.clone();
        let id = HostId(self.next_host);
        let (ipv4, ipv6) = match self.pool.allocate() {
            Ok(a) => a,
            Err(_) => {
                self.notices.push(Notice::PoolExhausted {
                    pool: self.pool.network(),
                    used: self.pool.allocated(),
                    requested: name,
                });
                return Err(ErrorCode::PoolExhausted);
            }
        };
        let name = if self.name_taken(&name, None) {
            let assigned = self.free_name(&name, id);
            self.notices.push(Notice::HostRenamedOnEnrol {
                id,
                requested: name,
                assigned: assigned.clone(),
            });
            assigned
        } else {
            name
        };
        self.next_host += 1;
        if let Some(t) = self.tokens.get_mut(&tid) {
            if let Some(u) = t.uses_left.as_mut() {
                *u = u.saturating_sub(1);
            }
        }
        self.dirty_tokens.insert(tid);
        self.hosts.insert(
            id,
            Host {
                id,
                name,
                public_key: key,
                ipv4,
                ipv6,
                labels,
                reported_endpoints: endpoints.addrs.clone(),
                listen_port: endpoints.listen_port,
                observed_ip: None,
                created_at: now,
                last_seen: now,
                removed: false,
                token_id: Some(tid),
                quarantined: false,
                revoked: false,
                transparent: endpoints.transparent,
            },
        );
        self.by_key.insert(key, id);
        self.touch(id);
        self.policy_host_changed(id);
        Ok(id)
    }

    fn update_endpoints(
        &mut self,
        now: UnixTime,
        id: HostId,
        report: Option<EndpointReport>,
        observed: Option<IpAddr>,
    ) {
        let Some(h) = self.hosts.get_mut(&id) else {
            return;
        };
        let before = (h.endpoints(), h.transparent);
        if let Some(mut r) = report {
            r.addrs.truncate(MAX_REPORTED_ENDPOINTS);
            h.reported_endpoints = r.addrs;
            h.listen_port = r.listen_port;
            h.transparent = r.transparent;
        }
        if let Some(o) = observed {
            h.observed_ip = Some(o);
        }
        h.last_seen = now;
        let changed = (h.endpoints(), h.transparent) != before;
        self.dirty_hosts.insert(id);
        if changed {
            self.touch(id);
        }
    }

    fn session_ok(&self, id: HostId, conn: ConnId) -> bool {
        self.sessions.get(&id).is_some_and(|s| s.conn == conn)
    }

    /// The agent reported new underlay endpoints.
    pub fn report_endpoints(&mut self, now: UnixTime, id: HostId, conn: ConnId, r: EndpointReport) {
        if self.session_ok(id, conn) {
            self.update_endpoints(now, id, Some(r), None);
        }
    }

    /// The agent's control connection now comes from another source address.
    pub fn observed_changed(&mut self, now: UnixTime, id: HostId, conn: ConnId, ip: IpAddr) {
        if self.session_ok(id, conn) {
            self.update_endpoints(now, id, None, Some(ip));
        }
    }

    /// The agent applied `version`.
    pub fn ack(&mut self, id: HostId, conn: ConnId, version: u64) {
        if let Some(s) = self.sessions.get_mut(&id).filter(|s| s.conn == conn) {
            s.acked = s.acked.max(version.min(s.sent_version));
        }
    }

    /// The agent could not apply a delta: the next poll sends it a full map.
    pub fn resync(&mut self, id: HostId, conn: ConnId) {
        if let Some(s) = self.sessions.get_mut(&id).filter(|s| s.conn == conn) {
            s.sent = None;
        }
    }

    /// The connection ended (a stale connection id is ignored).
    pub fn disconnect(&mut self, now: UnixTime, id: HostId, conn: ConnId) {
        if self.session_ok(id, conn) {
            self.sessions.remove(&id);
            if let Some(h) = self.hosts.get_mut(&id) {
                h.last_seen = now;
                self.dirty_hosts.insert(id);
            }
        }
    }

    /// Creates a token; the caller generated the secret and passes its hash.
    pub fn create_token(
        &mut self,
        now: UnixTime,
        spec: TokenSpec,
        secret_hash: [u8; 32],
    ) -> Result<Token, AdminError> {
        validate_labels(&spec.labels)?;
        // Zero is allowed: a token that is expired or used up at once.
        if let Some(t) = spec.ttl_secs.filter(|&t| t > MAX_TOKEN_TTL_SECS) {
            return Err(AdminError::InvalidTtl(t));
        }
        if let Some(u) = spec.uses.filter(|&u| u > MAX_TOKEN_USES) {
            return Err(AdminError::InvalidUses(u));
        }
        let id = TokenId(self.next_token);
        self.next_token += 1;
        let t = Token {
            id,
            labels: spec.labels,
            created_at: now,
            expires_at: spec.ttl_secs.map(|t| now.saturating_add(t)),
            uses_left: spec.uses,
            revoked: false,
            secret_hash,
        };
        self.by_hash.insert(secret_hash, id);
        self.tokens.insert(id, t.clone());
        self.dirty_tokens.insert(id);
        Ok(t)
    }

    /// Revokes a token.
    pub fn revoke_token(&mut self, id: TokenId) -> Result<Token, AdminError> {
        let t = self
            .tokens
            .get_mut(&id)
            .ok_or(AdminError::NoSuchToken(id))?;
        t.revoked = true;
        self.dirty_tokens.insert(id);
        Ok(t.clone())
    }

    fn live_id(&self, r: &str) -> Result<HostId, AdminError> {
        self.find_host(r).map(|h| h.id)
    }

    /// Adds or replaces labels.
    pub fn set_labels(&mut self, r: &str, labels: Labels) -> Result<Host, AdminError> {
        validate_labels(&labels)?;
        let id = self.live_id(r)?;
        let h = self
            .hosts
            .get_mut(&id)
            .ok_or_else(|| AdminError::NoSuchHost(r.into()))?;
        let after = h
            .labels
            .keys()
            .chain(labels.keys())
            .collect::<BTreeSet<_>>()
            .len();
        if after > MAX_LABELS {
            return Err(AdminError::TooManyLabels(after));
        }
        let before = h.labels.clone();
        h.labels.extend(labels);
        if h.labels != before {
            self.touch(id);
            self.policy_host_changed(id);
        }
        self.host_result(id, r)
    }

    /// Removes labels by key (absent keys are ignored).
    pub fn remove_labels(&mut self, r: &str, keys: &[String]) -> Result<Host, AdminError> {
        let id = self.live_id(r)?;
        let h = self
            .hosts
            .get_mut(&id)
            .ok_or_else(|| AdminError::NoSuchHost(r.into()))?;
        let n = h.labels.len();
        h.labels.retain(|k, _| !keys.contains(k));
        if h.labels.len() != n {
            self.touch(id);
            self.policy_host_changed(id);
        }
        self.host_result(id, r)
    }

    /// Renames a host.
    pub fn rename(&mut self, r: &str, name: &str) -> Result<Host, AdminError> {
        validate_name(name)?;
        let id = self.live_id(r)?;
        if self.name_taken(name, Some(id)) {
            return Err(AdminError::NameTaken(name.into()));
        }
        let h = self
            .hosts
            .get_mut(&id)
            .ok_or_else(|| AdminError::NoSuchHost(r.into()))?;
        if h.name != name {
            h.name = name.to_string();
            self.touch(id);
            self.policy_host_changed(id);
        }
        self.host_result(id, r)
    }

    /// Removes a host: it leaves every peer's map, its address returns to the pool, and its
    /// live session (if any) is kicked with `HostRemoved`.
    pub fn remove_host(&mut self, r: &str) -> Result<Host, AdminError> {
        let id = self.live_id(r)?;
        let h = self
            .hosts
            .get_mut(&id)
            .ok_or_else(|| AdminError::NoSuchHost(r.into()))?;
        h.removed = true;
        let addr = h.ipv4;
        self.pool.release(addr);
        self.touch(id);
        self.policy_host_changed(id);
        if let Some(s) = self.sessions.remove(&id) {
            self.kicks.push(Kick {
                host: id,
                conn: s.conn,
                code: ErrorCode::HostRemoved,
            });
        }
        self.host_result(id, r)
    }

    /// Brings the compiled policy up to date with host `id` (added, changed, removed,
    /// quarantined or released) and marks the affected agents' maps for recomputation.
    fn policy_host_changed(&mut self, id: HostId) {
        let Some(h) = self.hosts.get(&id) else {
            return;
        };
        let affected = if is_live(h) {
            self.compiled.update_host(&host_ref(h))
        } else {
            self.compiled.remove_host(id.0)
        };
        for a in affected {
            self.recheck_pairs.entry(HostId(a)).or_default().insert(id);
        }
        self.recheck.insert(id);
        self.membership_dirty = true;
    }

    /// Compiles the current policy against the live hosts; every map is recomputed.
    fn recompile(&mut self, now: UnixTime) {
        let hosts: Vec<_> = self
            .hosts
            .values()
            .filter(|h| is_live(h))
            .map(host_ref)
            .collect();
        self.compiled = meshd_policy::compile(&self.policy, &hosts, now);
        self.recheck_all = true;
        self.membership_dirty = true;
    }

    /// Loads the stored policy versions (oldest first; the last is current) at start-up.
    pub fn restore_policies(
        &mut self,
        now: UnixTime,
        mut versions: Vec<PolicyRecord>,
    ) -> Result<(), PolicyError> {
        versions.sort_by_key(|p| p.version);
        self.policy = match versions.last() {
            Some(p) => Policy::parse(&p.yaml)?,
            None => Policy::default(),
        };
        self.policies = versions;
        self.recompile(now);
        Ok(())
    }

    /// Rules expiring: recompile at [`CoordinatorState::policy_timeout`] so expired peers leave
    /// the maps (agents already stopped using the grants on their own).
    pub fn handle_policy_timeout(&mut self, now: UnixTime) {
        if self.policy_timeout().is_some_and(|t| t <= now) {
            self.recompile(now);
        }
    }

    /// When [`CoordinatorState::handle_policy_timeout`] has work to do.
    pub fn policy_timeout(&self) -> Option<UnixTime> {
        self.compiled.next_expiry(self.compiled.compiled_at())
    }

    /// The live hosts as the policy sees them (the inventory for tests, diff and explain).
    pub fn inventory(&self) -> Vec<meshd_policy::HostRef> {
        self.hosts
            .values()
            .filter(|h| !h.removed)
            .map(host_ref)
            .collect()
    }

    /// The current policy version, if any was applied.
    pub fn policy(&self) -> Option<&PolicyRecord> {
        self.policies.last()
    }

    /// Every applied version, oldest first.
    pub fn policy_history(&self) -> &[PolicyRecord] {
        &self.policies
    }

    /// Parses `yaml` and runs its tests against the inventory (host names resolved there).
    pub fn check_policy(&self, now: UnixTime, yaml: &str) -> Result<Vec<TestResult>, PolicyError> {
        let p = Policy::parse(yaml)?;
        Ok(meshd_policy::run_tests(&p, &self.inventory(), now))
    }

    /// Applies a new policy version: refused if it does not parse or any of its tests fails
    /// (a test naming a host that is not enrolled fails). Every map is recomputed.
    pub fn apply_policy(
        &mut self,
        now: UnixTime,
        yaml: &str,
        comment: &str,
    ) -> Result<(PolicyRecord, Vec<TestResult>), PolicyError> {
        let p = Policy::parse(yaml)?;
        let results = meshd_policy::run_tests(&p, &self.inventory(), now);
        if results.iter().any(|t| !t.passed()) {
            return Err(PolicyError::TestsFailed(results));
        }
        let rec = self.install(now, p, yaml, comment);
        Ok((rec, results))
    }

    fn install(&mut self, now: UnixTime, p: Policy, yaml: &str, comment: &str) -> PolicyRecord {
        let rec = PolicyRecord {
            version: self.policies.last().map_or(1, |p| p.version + 1),
            yaml: yaml.to_string(),
            applied_at: now,
            comment: comment.to_string(),
        };
        self.policy = p;
        self.policies.push(rec.clone());
        self.dirty_policy = Some(rec.clone());
        self.recompile(now);
        rec
    }

    /// Re-applies an earlier version as a new version (its tests are not re-run: it was
    /// accepted before, and a rollback must work when the inventory has moved on).
    pub fn rollback_policy(
        &mut self,
        now: UnixTime,
        version: u64,
    ) -> Result<PolicyRecord, PolicyError> {
        let old = self
            .policies
            .iter()
            .find(|p| p.version == version)
            .cloned()
            .ok_or(PolicyError::NoSuchVersion(version))?;
        let p = Policy::parse(&old.yaml)?;
        Ok(self.install(now, p, &old.yaml, &format!("rollback to {version}")))
    }

    /// Which host pairs and ports gain or lose access if `yaml` replaced the current policy.
    pub fn diff_policy(&self, now: UnixTime, yaml: &str) -> Result<Vec<Change>, PolicyError> {
        let new = Policy::parse(yaml)?;
        let hosts: Vec<_> = self
            .hosts
            .values()
            .filter(|h| is_live(h))
            .map(host_ref)
            .collect();
        Ok(meshd_policy::diff(&self.policy, &new, &hosts, now))
    }

    /// Whether `from` may open a connection to `to` on `port` (`tcp/1521`) now, and by which
    /// rule. A quarantined host is denied everything.
    pub fn explain(
        &self,
        now: UnixTime,
        from: &str,
        to: &str,
        port: &str,
    ) -> Result<Explanation, AdminError> {
        let probe: Probe = port.parse()?;
        let (f, t) = (self.find_host(from)?.id, self.find_host(to)?.id);
        Ok(self.compiled.explain(f.0, t.0, probe, now))
    }

    /// The grants `id` holds towards each peer (what its map carries).
    pub fn grants_for(&self, id: HostId) -> BTreeMap<u64, meshd_policy::PeerGrants> {
        self.compiled.grants_for(id.0)
    }

    /// Cuts a host off: it leaves every map and its own map empties (pushed with the next poll).
    pub fn quarantine(&mut self, r: &str) -> Result<Host, AdminError> {
        self.set_quarantined(r, true)
    }

    /// Undoes [`CoordinatorState::quarantine`].
    pub fn release(&mut self, r: &str) -> Result<Host, AdminError> {
        self.set_quarantined(r, false)
    }

    fn set_quarantined(&mut self, r: &str, q: bool) -> Result<Host, AdminError> {
        let id = self.live_id(r)?;
        let h = self
            .hosts
            .get_mut(&id)
            .ok_or_else(|| AdminError::NoSuchHost(r.into()))?;
        if h.quarantined != q {
            h.quarantined = q;
            self.dirty_hosts.insert(id);
            self.policy_host_changed(id);
        }
        self.host_result(id, r)
    }

    /// Removes a host for good: as [`CoordinatorState::remove_host`], and its key is refused
    /// from now on with [`ErrorCode::HostRevoked`], even with a new join token.
    pub fn revoke_host(&mut self, r: &str) -> Result<Host, AdminError> {
        let id = self.live_id(r)?;
        if let Some(h) = self.hosts.get_mut(&id) {
            h.revoked = true;
            self.revoked_keys.insert(h.public_key);
        }
        self.remove_host(r)?;
        if let Some(k) = self.kicks.iter_mut().find(|k| k.host == id) {
            k.code = ErrorCode::HostRevoked;
        }
        self.host_result(id, r)
    }

    /// Block events from the agent of `id` (beyond [`crate::proto::MAX_BLOCKS_PER_MESSAGE`]
    /// per call they are dropped and counted). The host field is set to the sender's name.
    pub fn record_blocks(&mut self, id: HostId, conn: ConnId, events: Vec<BlockEvent>) {
        if !self.session_ok(id, conn) {
            return;
        }
        let Some(name) = self.hosts.get(&id).map(|h| h.name.clone()) else {
            return;
        };
        let max = crate::proto::MAX_BLOCKS_PER_MESSAGE;
        self.blocks_dropped += events.len().saturating_sub(max) as u64;
        for mut e in events.into_iter().take(max) {
            if e.at > MAX_STORED_TIME {
                // The store cannot hold it (and it would fail the whole batch's commit).
                self.blocks_dropped += 1;
                continue;
            }
            e.host = name.clone();
            if self.blocks.len() == BLOCKS_KEPT {
                self.blocks.pop_front();
            }
            self.blocks.push_back(e.clone());
            self.dirty_blocks.push(e);
        }
    }

    /// Loads stored block events (oldest first) at start-up.
    pub fn restore_blocks(&mut self, events: Vec<BlockEvent>) {
        let skip = events.len().saturating_sub(BLOCKS_KEPT);
        self.blocks = events.into_iter().skip(skip).collect();
    }

    /// Block events at or after `since`, optionally only those where `host` is either end,
    /// oldest first.
    pub fn blocks(&self, host: Option<&str>, since: UnixTime) -> Vec<BlockEvent> {
        self.blocks
            .iter()
            .filter(|e| e.at >= since)
            .filter(|e| host.is_none_or(|h| e.host == h || e.peer == h))
            .cloned()
            .collect()
    }

    /// Block events dropped because a message carried too many.
    pub fn blocks_dropped(&self) -> u64 {
        self.blocks_dropped
    }

    fn host_result(&self, id: HostId, r: &str) -> Result<Host, AdminError> {
        self.hosts
            .get(&id)
            .cloned()
            .ok_or_else(|| AdminError::NoSuchHost(r.into()))
    }

    /// The peers `id` should have, by id, with their grants: the compiled policy's (none when
    /// the host is removed or quarantined: it is not in the compilation). One pass over the
    /// rules plus the granted pairs.
    fn peer_grants(&self, id: HostId) -> BTreeMap<u64, PeerGrants> {
        self.compiled.grants_for(id.0)
    }

    /// The full map `id` should have now, at `version`.
    pub fn full_map_for(&self, id: HostId, version: u64) -> NetworkMap {
        let mut peers: Vec<Peer> = self
            .peer_grants(id)
            .into_iter()
            .filter_map(|(p, g)| self.hosts.get(&HostId(p)).map(|h| Peer::with_grants(h, g)))
            .collect();
        peers.sort_by_key(|p| p.public_key);
        NetworkMap { version, peers }
    }

    fn rev(&self, id: HostId) -> u64 {
        self.revs.get(&id).copied().unwrap_or(0)
    }

    /// Maps and deltas for connected agents since the last call.
    pub fn poll_pushes(&mut self) -> Vec<Push> {
        let changed = std::mem::take(&mut self.changed);
        let membership = std::mem::take(&mut self.membership_dirty);
        let recheck = std::mem::take(&mut self.recheck);
        let recheck_all = std::mem::take(&mut self.recheck_all);
        let recheck_pairs = std::mem::take(&mut self.recheck_pairs);
        let need_any = self.sessions.values().any(|s| s.sent.is_none())
            || (!self.sessions.is_empty() && (membership || !changed.is_empty()));
        if !need_any {
            return Vec::new();
        }
        let version = self.map_version + 1;
        let ids: Vec<HostId> = self.sessions.keys().copied().collect();
        let mut out = Vec::new();
        for id in ids {
            let Some((sent, conn, from)) = self
                .sessions
                .get(&id)
                .map(|s| (s.sent.clone(), s.conn, s.sent_version))
            else {
                continue;
            };
            let (new_sent, message) = match sent {
                None => {
                    let map = self.full_map_for(id, version);
                    let ns = self
                        .compiled
                        .peer_fingerprints(id.0)
                        .into_iter()
                        .map(|(p, f)| (HostId(p), self.rev(HostId(p)), f))
                        .collect();
                    (ns, Some(CoordinatorMessage::FullMap { map }))
                }
                Some(old) => {
                    let (ns, delta) = if recheck_all || recheck.contains(&id) {
                        self.delta_membership(id, &old, from, version)
                    } else if let Some(pairs) = recheck_pairs.get(&id) {
                        self.delta_pairs(id, &old, pairs, &changed, from, version)
                    } else {
                        self.delta_changed(id, &old, &changed, from, version)
                    };
                    let msg = (!delta.is_empty()).then_some(CoordinatorMessage::Delta { delta });
                    (ns, msg)
                }
            };
            if let Some(message) = message {
                if let Some(s) = self.sessions.get_mut(&id) {
                    s.sent = Some(new_sent);
                    s.sent_version = version;
                }
                out.push(Push {
                    host: id,
                    conn,
                    message,
                });
            }
        }
        if !out.is_empty() {
            self.map_version = version;
            self.version_dirty = true;
        }
        out
    }

    /// The peer record of `peer` as `me` gets it, with the grants between them.
    fn peer_of(&self, me: HostId, peer: HostId) -> Option<Peer> {
        let h = self.hosts.get(&peer)?;
        Some(Peer::with_grants(
            h,
            self.compiled.grants_between(me.0, peer.0),
        ))
    }

    fn delta_membership(
        &self,
        id: HostId,
        old: &[(HostId, u64, u64)],
        from: u64,
        to: u64,
    ) -> (Vec<(HostId, u64, u64)>, MapDelta) {
        // Fingerprints first (no allocation per peer); grants only for new or changed peers.
        let new = self.compiled.peer_fingerprints(id.0);
        let new_ids: Vec<HostId> = new.iter().map(|&(p, _)| HostId(p)).collect();
        let hash_of = |n: HostId| {
            new.binary_search_by_key(&n.0, |x| x.0)
                .map_or(0, |i| new[i].1)
        };
        let with = |n: HostId| self.peer_of(id, n);
        let mut upserts = Vec::new();
        let mut removals = Vec::new();
        let mut ns = Vec::with_capacity(new_ids.len());
        let (mut i, mut j) = (0, 0);
        while i < old.len() || j < new_ids.len() {
            match (old.get(i), new_ids.get(j)) {
                (Some(&(o, orev, ogh)), Some(&n)) if o == n => {
                    let (r, gh) = (self.rev(n), hash_of(n));
                    if r != orev || gh != ogh {
                        upserts.extend(with(n));
                    }
                    ns.push((n, r, gh));
                    i += 1;
                    j += 1;
                }
                (Some(&(o, _, _)), Some(&n)) if o < n => {
                    removals.extend(self.hosts.get(&o).map(|h| h.public_key));
                    i += 1;
                }
                (_, Some(&n)) => {
                    upserts.extend(with(n));
                    ns.push((n, self.rev(n), hash_of(n)));
                    j += 1;
                }
                (Some(&(o, _, _)), None) => {
                    removals.extend(self.hosts.get(&o).map(|h| h.public_key));
                    i += 1;
                }
                (None, None) => break,
            }
        }
        (
            ns,
            MapDelta {
                from_version: from,
                to_version: to,
                upserts,
                removals,
            },
        )
    }

    /// Only the pairs (`id`, p ∈ `pairs`) may have changed grants, plus the records in `changed`.
    fn delta_pairs(
        &self,
        id: HostId,
        old: &[(HostId, u64, u64)],
        pairs: &BTreeSet<HostId>,
        changed: &BTreeSet<HostId>,
        from: u64,
        to: u64,
    ) -> (Vec<(HostId, u64, u64)>, MapDelta) {
        let mut ns = old.to_vec();
        let mut upserts = Vec::new();
        let mut removals = Vec::new();
        for &p in pairs {
            let fp = self.compiled.pair_fingerprint(id.0, p.0);
            let at = ns.binary_search_by(|(h, _, _)| h.cmp(&p));
            match (at, fp) {
                (Ok(i), 0) => {
                    ns.remove(i);
                    removals.extend(self.hosts.get(&p).map(|h| h.public_key));
                }
                (Err(_), 0) => {}
                (Ok(i), fp) => {
                    let r = self.rev(p);
                    if ns[i].1 != r || ns[i].2 != fp {
                        ns[i] = (p, r, fp);
                        upserts.extend(self.peer_of(id, p));
                    }
                }
                (Err(i), fp) => {
                    ns.insert(i, (p, self.rev(p), fp));
                    upserts.extend(self.peer_of(id, p));
                }
            }
        }
        let (ns, rest) = self.delta_changed(id, &ns, changed, from, to);
        upserts.extend(rest.upserts);
        (
            ns,
            MapDelta {
                from_version: from,
                to_version: to,
                upserts,
                removals,
            },
        )
    }

    fn delta_changed(
        &self,
        id: HostId,
        old: &[(HostId, u64, u64)],
        changed: &BTreeSet<HostId>,
        from: u64,
        to: u64,
    ) -> (Vec<(HostId, u64, u64)>, MapDelta) {
        let mut ns = old.to_vec();
        let mut upserts = Vec::new();
        for c in changed {
            if let Ok(i) = ns.binary_search_by(|(h, _, _)| h.cmp(c)) {
                let r = self.rev(*c);
                if ns[i].1 != r {
                    ns[i].1 = r;
                    upserts.extend(self.peer_of(id, *c));
                }
            }
        }
        (
            ns,
            MapDelta {
                from_version: from,
                to_version: to,
                upserts,
                removals: Vec::new(),
            },
        )
    }

    /// Connections to close since the last call.
    pub fn poll_kicks(&mut self) -> Vec<Kick> {
        std::mem::take(&mut self.kicks)
    }

    /// Records to persist since the last call.
    pub fn take_dirty(&mut self) -> Dirty {
        let hosts = std::mem::take(&mut self.dirty_hosts)
            .into_iter()
            .filter_map(|id| self.hosts.get(&id).cloned())
            .collect();
        let tokens = std::mem::take(&mut self.dirty_tokens)
            .into_iter()
            .filter_map(|id| self.tokens.get(&id).cloned())
            .collect();
        let map_version = std::mem::take(&mut self.version_dirty).then_some(self.map_version);
        Dirty {
            hosts,
            tokens,
            map_version,
            policy: self.dirty_policy.take(),
            blocks: std::mem::take(&mut self.dirty_blocks),
        }
    }
}

#[cfg(test)]
mod tests;
