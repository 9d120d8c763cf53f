//! Coordinator storage: the [`Store`] trait and its SQLite implementation ([`SqliteStore`]).
//!
//! The trait is synchronous and coarse-grained on purpose: the coordinator keeps its state in
//! memory (`meshd_control::CoordinatorState`), loads it once with [`Store::load`] and writes each
//! batch of changed records with one [`Store::commit`] transaction. Async callers run these on
//! `tokio::task::spawn_blocking` and never hold a connection across an await. A PostgreSQL
//! implementation (e.g. with the sync `postgres` crate or a pool) implements the same trait and
//! the callers do not change.
//!
//! Durability: SQLite in WAL mode with `synchronous=FULL`, so a transaction that `commit`
//! returned `Ok` for survives `kill -9` and power loss. Schema migrations are versioned and
//! recorded in the `schema_migrations` table.
#![forbid(unsafe_code)]

mod flows;
mod migrations;
mod sqlite;

use meshd_control::api::FlowView;
use meshd_control::policy::PolicyRecord;
use meshd_control::state::{Dirty, FlowInterval, RuntimeMode};
use meshd_control::{AuditEvent, Host, HostId, Token, UnixTime};
use meshd_policy::BlockEvent;

pub use migrations::MIGRATIONS;
pub use sqlite::SqliteStore;

/// Everything the coordinator keeps across restarts (apart from its key file).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// All hosts, including removed ones.
    pub hosts: Vec<Host>,
    /// All tokens.
    pub tokens: Vec<Token>,
    /// The global map version.
    pub map_version: u64,
    /// Applied policy versions, oldest first.
    pub policies: Vec<PolicyRecord>,
    /// The newest block events (at most [`BLOCKS_KEPT`]), oldest first.
    pub blocks: Vec<BlockEvent>,
    /// The runtime learning setting (`meshctl policy mode`; default: none).
    pub mode: RuntimeMode,
    /// Row counts of the intervals stored in the last [`FLOW_INTERVALS_LOADED_SECS`] before
    /// the newest flow row (the per-interval bound survives a restart).
    pub flow_intervals: Vec<FlowInterval>,
    /// CMDB host records, by id.
    pub records: Vec<meshd_control::cmdb::HostRecord>,
    /// Admin-signed statements (signed policy; empty: unsigned mesh).
    pub signed: Vec<meshd_control::state::SignedRecord>,
    /// Named admin tokens, by name (also revoked and expired ones).
    pub admin_tokens: Vec<meshd_control::state::AdminToken>,
}

/// How far back from the newest flow row [`Store::load`] counts rows per interval.
pub const FLOW_INTERVALS_LOADED_SECS: u64 = 300;

/// Which flow rows a query reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowFilter {
    /// Rows last seen at or after this time.
    pub since: UnixTime,
    /// Only rows where this host is either end.
    pub host: Option<HostId>,
    /// At most this many rows (the newest for [`Store::flows`]).
    pub limit: u32,
}

/// How many block events the store keeps (older ones are deleted on insert).
pub const BLOCKS_KEPT: u32 = meshd_control::state::BLOCKS_KEPT as u32;

/// How many audit events (`log_event`) the store keeps; older ones are deleted on insert.
pub const EVENTS_KEPT: u32 = 100_000;

/// Why a storage operation failed. Nothing of a failed [`Store::commit`] was written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file system is full (`SQLITE_FULL`, `ENOSPC`).
    #[error("disk full: the database cannot grow (free space where the state directory is)")]
    DiskFull,
    /// The database or its directory is read-only (`SQLITE_READONLY`).
    #[error("the database is read-only: {0}")]
    ReadOnly(#[source] rusqlite::Error),
    /// The operating system failed a read, write or sync (`SQLITE_IOERR`).
    #[error("I/O error on the database: {0}")]
    Io(#[source] rusqlite::Error),
    /// Any other database error.
    #[error("database error: {0}")]
    Db(#[source] rusqlite::Error),
    /// A stored value could not be decoded.
    #[error("corrupt {table} row {id}: bad {field}")]
    Corrupt {
        /// Table.
        table: &'static str,
        /// Row id.
        id: i64,
        /// Column.
        field: &'static str,
    },
    /// A value does not fit the database's integer type (SQLite's is a signed 64-bit one).
    #[error("value out of range for the database: {0}")]
    Range(&'static str),
    /// The database was written by a newer meshd.
    #[error("database schema version {found} is newer than this meshd supports ({supported}); upgrade meshd")]
    TooNew {
        /// Version in the database.
        found: i64,
        /// Highest version known here.
        supported: i64,
    },
    /// The connection mutex was poisoned by a panic in another thread.
    #[error("database connection poisoned by an earlier panic")]
    Poisoned,
    /// A database file's permissions could not be made private.
    #[error(transparent)]
    Permissions(#[from] meshd_config::fsutil::FsError),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ffi::ErrorCode as C;
        match &e {
            rusqlite::Error::SqliteFailure(f, _) => match f.code {
                C::DiskFull => StoreError::DiskFull,
                C::ReadOnly => StoreError::ReadOnly(e),
                C::SystemIoFailure => StoreError::Io(e),
                _ => StoreError::Db(e),
            },
            rusqlite::Error::ToSqlConversionFailure(_) => StoreError::Range("an integer"),
            _ => StoreError::Db(e),
        }
    }
}

/// The former name of [`AuditEvent`] (the store keeps its kind as the string).
pub type EventRecord = AuditEvent;

/// Coordinator storage. Implementations must be durable once a method returns `Ok`.
pub trait Store: Send + Sync + 'static {
    /// Loads hosts, tokens, the map version, policy versions and recent block events.
    fn load(&self) -> Result<Snapshot, StoreError>;
    /// Writes a batch of changed records and audit events in one transaction (upserts by id;
    /// a new policy version, block events and audit events are appended, block events pruned
    /// to [`BLOCKS_KEPT`], audit events to [`EVENTS_KEPT`]). All or nothing: on `Err` nothing
    /// of the batch is stored.
    fn commit(&self, changes: &Dirty, events: &[AuditEvent]) -> Result<(), StoreError>;
    /// Reads a meta value (e.g. `admin_token_hash`).
    fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError>;
    /// Writes a meta value.
    fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError>;
    /// Appends to the audit/event log (e.g. a refused duplicate connection).
    fn log_event(&self, event: &AuditEvent) -> Result<(), StoreError>;
    /// The most recent `limit` events, newest first.
    fn recent_events(&self, limit: u32) -> Result<Vec<AuditEvent>, StoreError>;
    /// Flow rows matching `q`: the newest `q.limit`, returned oldest first.
    fn flows(&self, q: &FlowFilter) -> Result<Vec<FlowView>, StoreError>;
    /// Flow rows matching `q` summed over the window per (host, labels, peer, labels, source,
    /// direction, proto, port, verdict, rule): packets, bytes and flows added up, first and
    /// last seen the extremes, `interval_start` the earliest (what a topology needs, far fewer
    /// rows than [`Store::flows`]). At most `q.limit` groups.
    fn flow_summary(&self, q: &FlowFilter) -> Result<Vec<FlowView>, StoreError>;
    /// Deletes at most `max_rows` flow rows last seen before `before`; returns how many.
    fn prune_flows(&self, before: UnixTime, max_rows: u32) -> Result<u64, StoreError>;
}

/// Meta key: SHA-256 (hex) of the admin token written to `<state-dir>/admin.token` on the
/// first start (the `bootstrap` row of `admin_tokens` is made from it).
pub const META_ADMIN_TOKEN_HASH: &str = "admin_token_hash";
/// Meta key: the global map version.
pub const META_MAP_VERSION: &str = "map_version";
/// Meta key: the runtime learning setting ([`RuntimeMode`] as JSON).
pub const META_POLICY_MODE: &str = "policy_mode";
