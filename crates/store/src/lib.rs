//! Coordinator storage: the [`Store`] trait and its implementations, SQLite ([`SqliteStore`])
//! and PostgreSQL ([`PgStore`]); [`DbSpec`] names one (`sqlite:PATH`, `postgres://…`) and
//! [`open`] opens it; [`transfer::sqlite_to_postgres`] moves an installation between them.
//!
//! The trait is synchronous and coarse-grained on purpose: the coordinator keeps its state in
//! memory (`meshd_control::CoordinatorState`), loads it once with [`Store::load`] and writes each
//! batch of changed records with one [`Store::commit`] transaction. Async callers run these on
//! `tokio::task::spawn_blocking` and never hold a connection across an await.
//!
//! Durability: SQLite in WAL mode with `synchronous=FULL`, so a transaction that `commit`
//! returned `Ok` for survives `kill -9` and power loss; PostgreSQL's commit returns once the
//! server has it durable. Schema migrations are versioned and recorded in the
//! `schema_migrations` table; [`MIGRATIONS`] and [`PG_MIGRATIONS`] are twins (same versions,
//! tables and columns; a test keeps them in step).
#![forbid(unsafe_code)]

mod flows;
mod migrations;
mod migrations_pg;
mod pg;
mod sqlite;
pub mod transfer;

use std::path::PathBuf;
use std::sync::Arc;

use meshd_control::api::FlowView;
use meshd_control::policy::PolicyRecord;
use meshd_control::state::{Dirty, FlowInterval, RuntimeMode};
use meshd_control::{AuditEvent, Host, HostId, Token, UnixTime};
use meshd_policy::BlockEvent;

pub use migrations::MIGRATIONS;
pub use migrations_pg::PG_MIGRATIONS;
pub use pg::{PgListener, PgOptions, PgStore};
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
    /// The store's generation when it was read ([`Store::commit_at`]).
    pub generation: u64,
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
    /// PostgreSQL refused a statement (a constraint, a type, a permission: its SQLSTATE and
    /// message follow).
    #[error("PostgreSQL error: {}", pg_message(.0))]
    Postgres(#[source] ::postgres::Error),
    /// The PostgreSQL server cannot be reached or dropped the connection (nothing of the
    /// operation is known to be stored; a commit is not).
    /// Another coordinator replica committed shared state since this one read it
    /// ([`Store::commit_at`]): reload and retry.
    #[error("another coordinator replica changed the state at the same time (generation {expected} expected, {found} found): retry")]
    Conflict {
        /// The generation the batch was made on.
        expected: u64,
        /// The store's.
        found: u64,
    },
    #[error("the PostgreSQL server is unreachable: {0} (is it running, and is the URL right?)")]
    Unreachable(String),
    /// A database URL that does not parse.
    #[error("bad database URL {0}")]
    BadUrl(String),
}

/// A PostgreSQL error with its SQLSTATE, when the server sent one.
fn pg_message(e: &::postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    }
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
    fn commit(&self, changes: &Dirty, events: &[AuditEvent]) -> Result<(), StoreError> {
        self.commit_at(None, changes, events).map(|_| ())
    }
    /// [`Store::commit`], fenced for coordinator replicas sharing one database: a batch that
    /// changes shared state ([`Dirty::shared`]) is stored only if the store's generation is
    /// still `generation` — no other replica committed shared state since this one loaded it
    /// or last committed — and moves the generation on by one, in the same transaction
    /// (PostgreSQL: under the generation row's lock, so replicas' commits are serialised, and
    /// with a `NOTIFY meshd_changes`). Otherwise [`StoreError::Conflict`] and nothing is
    /// stored. `None` commits whatever the generation (tools, tests). Returns the generation
    /// the caller is at after the commit: one more for shared state, `generation` unchanged
    /// for an appended-only batch (it has not read what others committed meanwhile).
    fn commit_at(
        &self,
        generation: Option<u64>,
        changes: &Dirty,
        events: &[AuditEvent],
    ) -> Result<u64, StoreError>;
    /// The current generation (one small read: replicas poll it).
    fn generation(&self) -> Result<u64, StoreError>;
    /// A connection that wakes up when any replica commits shared state (PostgreSQL
    /// `LISTEN meshd_changes`). `None`: this store has no notifications (SQLite); poll
    /// [`Store::generation`].
    fn listen(&self) -> Option<Result<Box<dyn ChangeListener>, StoreError>> {
        None
    }
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

/// Waits for other replicas' commits ([`Store::listen`]).
pub trait ChangeListener: Send {
    /// Blocks until a commit of shared state is notified (`Ok(true)`) or `timeout` passes
    /// (`Ok(false)`). An error means the connection is lost: make a new listener.
    fn wait(&mut self, timeout: std::time::Duration) -> Result<bool, StoreError>;
}

/// Meta key: the generation of the shared state, moved on by every fenced commit
/// ([`Store::commit_at`]).
pub const META_GENERATION: &str = "generation";
/// The channel PostgreSQL notifies on a commit of shared state.
pub const NOTIFY_CHANNEL: &str = "meshd_changes";

/// Meta key: SHA-256 (hex) of the admin token written to `<state-dir>/admin.token` on the
/// first start (the `bootstrap` row of `admin_tokens` is made from it).
pub const META_ADMIN_TOKEN_HASH: &str = "admin_token_hash";
/// Meta key: the global map version.
pub const META_MAP_VERSION: &str = "map_version";
/// Meta key: the runtime learning setting ([`RuntimeMode`] as JSON).
pub const META_POLICY_MODE: &str = "policy_mode";

/// Which database a coordinator uses: `sqlite:PATH` or `postgres://…` (`postgresql://…`).
#[derive(Clone, PartialEq, Eq)]
pub enum DbSpec {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL.
    Postgres(String),
}

/// A `--db` value that names no known database.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a database: expected sqlite:PATH or postgres://USER@HOST[:PORT]/DB")]
pub struct DbSpecError(String);

impl std::str::FromStr for DbSpec {
    type Err = DbSpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("sqlite:") {
            // `sqlite:///abs` and `sqlite://rel` are read as the path after the slashes' scheme.
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(DbSpecError(s.to_string()));
            }
            return Ok(DbSpec::Sqlite(PathBuf::from(path)));
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(DbSpec::Postgres(s.to_string()));
        }
        Err(DbSpecError(redact_url(s)))
    }
}

impl std::fmt::Display for DbSpec {
    /// The spec with any password replaced by `***` (for logs and errors).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DbSpec::Sqlite(p) => write!(f, "sqlite:{}", p.display()),
            DbSpec::Postgres(u) => f.write_str(&redact_url(u)),
        }
    }
}

impl std::fmt::Debug for DbSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DbSpec({self})")
    }
}

/// `url` with the password (in the user part or a `password=` option) replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        if let Some(at) = authority.rfind('@') {
            if let Some(colon) = authority[..at].find(':') {
                let start = scheme_end + 3 + colon + 1;
                let end = scheme_end + 3 + at;
                out.replace_range(start..end, "***");
            }
        }
    }
    let mut redacted = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(i) = rest.find("password=") {
        let (head, tail) = rest.split_at(i + "password=".len());
        redacted.push_str(head);
        redacted.push_str("***");
        rest = &tail[tail.find(['&', ' ']).unwrap_or(tail.len())..];
    }
    redacted.push_str(rest);
    redacted
}

/// Opens (creating and migrating as needed) the database `spec` names.
pub fn open(spec: &DbSpec) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match spec {
        DbSpec::Sqlite(path) => Arc::new(SqliteStore::open(path)?),
        DbSpec::Postgres(url) => Arc::new(PgStore::open(url)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn db_specs_parse_and_hide_passwords() {
        assert_eq!(
            "sqlite:/var/lib/meshd/coordinator.db".parse::<DbSpec>(),
            Ok(DbSpec::Sqlite("/var/lib/meshd/coordinator.db".into()))
        );
        assert_eq!(
            "sqlite:rel.db".parse::<DbSpec>(),
            Ok(DbSpec::Sqlite("rel.db".into()))
        );
        let pg: DbSpec = "postgres://meshd:s3cret@db:5432/meshd?password=x&sslmode=disable"
            .parse()
            .unwrap();
        assert!(matches!(pg, DbSpec::Postgres(_)));
        let shown = pg.to_string();
        assert!(
            !shown.contains("s3cret") && !shown.contains("=x"),
            "{shown}"
        );
        assert_eq!(
            shown,
            "postgres://meshd:***@db:5432/meshd?password=***&sslmode=disable"
        );
        assert_eq!(format!("{pg:?}"), format!("DbSpec({shown})"));
        assert!("postgresql://h/db".parse::<DbSpec>().is_ok());
        for bad in ["", "sqlite:", "/var/lib/x.db", "mysql://a:b@h/db"] {
            let e = bad.parse::<DbSpec>().unwrap_err();
            assert!(!e.to_string().contains(":b@"), "{e}");
        }
    }
}
