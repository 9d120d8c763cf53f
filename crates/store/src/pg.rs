//! PostgreSQL implementation of [`Store`]: the sync `postgres` client behind an `r2d2` pool,
//! the schema of [`PG_MIGRATIONS`] (the SQLite one's twin).
//!
//! Connections are unencrypted (`NoTls`): meant for a server on loopback or a Unix socket (or
//! a network the operator trusts). Durability is the server's: a commit returns once
//! PostgreSQL has it durable (`synchronous_commit` on, its default).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr as _;
use std::time::Duration;

use meshd_control::api::FlowView;
use meshd_control::cmdb::{HostRecord, RecordId};
use meshd_control::flow::FlowVerdict;
use meshd_control::policy::PolicyRecord;
use meshd_control::state::{AdminToken, Dirty, FlowInterval};
use meshd_control::{AuditEvent, EventKind, Host, HostId, Labels, Token, TokenId, UnixTime};
use meshd_policy::{BlockEvent, Direction};
use postgres::error::SqlState;
use postgres::{GenericClient, IsolationLevel, NoTls, Row, Transaction};
use r2d2_postgres::PostgresConnectionManager;

use crate::migrations_pg::PG_MIGRATIONS;
use crate::{
    FlowFilter, Snapshot, Store, StoreError, BLOCKS_KEPT, EVENTS_KEPT, FLOW_INTERVALS_LOADED_SECS,
    META_GENERATION, META_MAP_VERSION, META_POLICY_MODE, NOTIFY_CHANNEL,
};

type Pool = r2d2::Pool<PostgresConnectionManager<NoTls>>;

/// Key of the advisory lock held while migrating (two coordinators starting at once).
const MIGRATION_LOCK: i64 = 0x6d65_7368_6400_0001;

/// Connection settings of [`PgStore::open_with`].
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// How long to wait for a connection (opening one, or a free one from the pool) before
    /// [`StoreError::Unreachable`]. Also the connect timeout when the URL sets none.
    pub connect_timeout: Duration,
    /// Connections kept open at most (the actor's commits, flow queries, the pruner).
    pub pool_size: u32,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            connect_timeout: Duration::from_secs(10),
            pool_size: 4,
        }
    }
}

/// PostgreSQL-backed store. Its methods block (the sync client runs a small runtime of its
/// own): async callers use `spawn_blocking`, as for SQLite. Dropping it is fine anywhere (the
/// connections are closed on a thread of their own).
pub struct PgStore {
    /// Always `Some` but in `drop`.
    pool: Option<Pool>,
    events_kept: u32,
    /// For connections outside the pool ([`PgStore::listener`]).
    config: postgres::Config,
}

/// A connection of its own that `LISTEN`s on [`NOTIFY_CHANNEL`] ([`PgStore::listener`]).
/// Blocking: use it on a thread of its own (never drop it on an async runtime's thread).
pub struct PgListener {
    client: postgres::Client,
}

impl crate::ChangeListener for PgListener {
    fn wait(&mut self, timeout: Duration) -> Result<bool, StoreError> {
        if self.client.is_closed() {
            return Err(StoreError::Unreachable(
                "the LISTEN connection closed".into(),
            ));
        }
        use postgres::fallible_iterator::FallibleIterator as _;
        let mut n = self.client.notifications();
        let got = n.timeout_iter(timeout).next()?.is_some();
        // Several commits may have been notified: one wake-up covers them all.
        while n.iter().next()?.is_some() {}
        Ok(got)
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Closing a sync client blocks on its runtime, which panics on an async runtime's
        // thread (where the coordinator's last reference to the store may go).
        if let Some(pool) = self.pool.take() {
            let closer = std::thread::Builder::new()
                .name("meshd-pg-close".into())
                .spawn(move || drop(pool));
            if let Err(e) = closer {
                tracing::warn!(error = %e, "could not start a thread to close PostgreSQL connections; leaking them");
            }
        }
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("pool", &self.pool.as_ref().map(|p| p.state()))
            .finish()
    }
}

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        if e.is_closed() {
            return StoreError::Unreachable(e.to_string());
        }
        match e.code() {
            None => {
                // No SQLSTATE: the connection itself failed (I/O, a reset, a timeout).
                let io = std::error::Error::source(&e)
                    .is_some_and(|s| s.downcast_ref::<std::io::Error>().is_some());
                if io {
                    StoreError::Unreachable(e.to_string())
                } else {
                    StoreError::Postgres(e)
                }
            }
            Some(c) if *c == SqlState::DISK_FULL => StoreError::DiskFull,
            Some(c) if *c == SqlState::NUMERIC_VALUE_OUT_OF_RANGE => {
                StoreError::Range("an integer")
            }
            // Class 08 (connection exception) and a server shutting down or starting up.
            Some(c)
                if c.code().starts_with("08")
                    || *c == SqlState::ADMIN_SHUTDOWN
                    || *c == SqlState::CRASH_SHUTDOWN
                    || *c == SqlState::CANNOT_CONNECT_NOW =>
            {
                StoreError::Unreachable(e.to_string())
            }
            Some(_) => StoreError::Postgres(e),
        }
    }
}

impl From<r2d2::Error> for StoreError {
    fn from(e: r2d2::Error) -> Self {
        StoreError::Unreachable(e.to_string())
    }
}

fn to_i64(v: u64, what: &'static str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Range(what))
}

impl PgStore {
    /// Connects (`postgres://user[:password]@host[:port]/db[?options]`, or a Unix socket with
    /// `host=/path` in the options) and runs pending migrations.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with(url, &PgOptions::default())
    }

    /// As [`PgStore::open`], with connection settings.
    pub fn open_with(url: &str, opts: &PgOptions) -> Result<Self, StoreError> {
        let mut config = postgres::Config::from_str(url)
            .map_err(|e| StoreError::BadUrl(format!("{}: {e}", crate::redact_url(url))))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(opts.connect_timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name("meshd-coordinator");
        }
        // Notice a server that went away within minutes, not the kernel's two hours.
        config.keepalives_idle(Duration::from_secs(60));
        let manager = PostgresConnectionManager::new(config.clone(), NoTls);
        let pool = r2d2::Pool::builder()
            .max_size(opts.pool_size.max(1))
            .min_idle(Some(1))
            .connection_timeout(opts.connect_timeout)
            // A connection the server closed meanwhile is replaced before use.
            .test_on_check_out(true)
            .error_handler(Box::new(r2d2::NopErrorHandler))
            .build(manager)?;
        let s = PgStore {
            pool: Some(pool),
            events_kept: EVENTS_KEPT,
            config,
        };
        s.with(migrate)?;
        Ok(s)
    }

    /// A connection of its own listening for other replicas' commits.
    pub fn listener(&self) -> Result<PgListener, StoreError> {
        let mut client = self
            .config
            .connect(NoTls)
            .map_err(|e| StoreError::Unreachable(e.to_string()))?;
        client.batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))?;
        Ok(PgListener { client })
    }

    /// Keeps at most `n` audit events (tests; the default is [`EVENTS_KEPT`]).
    pub fn with_events_kept(mut self, n: u32) -> Self {
        self.events_kept = n;
        self
    }

    /// The highest migration applied.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        self.with(|c| {
            Ok(c.query_one(
                "SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_migrations",
                &[],
            )?
            .try_get(0)?)
        })
    }

    /// Runs one SQL statement outside the store's logic (tests, repairs); returns the rows
    /// it changed.
    pub fn execute(&self, sql: &str) -> Result<u64, StoreError> {
        self.with(|c| Ok(c.execute(sql, &[])?))
    }

    /// The first column of the first row of a query, as an integer (tests, checks).
    pub fn query_i64(&self, sql: &str) -> Result<Option<i64>, StoreError> {
        self.with(|c| match c.query_opt(sql, &[])? {
            Some(r) => Ok(r.try_get(0)?),
            None => Ok(None),
        })
    }

    /// A connection from the pool.
    pub(crate) fn conn(
        &self,
    ) -> Result<r2d2::PooledConnection<PostgresConnectionManager<NoTls>>, StoreError> {
        match &self.pool {
            Some(p) => Ok(p.get()?),
            None => Err(StoreError::Unreachable("the store is closing".into())),
        }
    }

    pub(crate) fn with<T>(
        &self,
        f: impl FnOnce(&mut postgres::Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut c = self.conn()?;
        f(&mut c)
    }

    /// A read in one snapshot (a commit landing between two statements is not seen).
    fn read<T>(
        &self,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.with(|c| {
            let mut tx = c
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()?;
            let v = f(&mut tx)?;
            tx.commit()?;
            Ok(v)
        })
    }
}

fn migrate(c: &mut postgres::Client) -> Result<(), StoreError> {
    let mut tx = c.transaction()?;
    tx.query("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version    BIGINT PRIMARY KEY,
            name       TEXT   NOT NULL,
            applied_at BIGINT NOT NULL
        )",
    )?;
    let current: i64 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_migrations",
            &[],
        )?
        .try_get(0)?;
    let supported = PG_MIGRATIONS.last().map_or(0, |m| m.0);
    if current > supported {
        return Err(StoreError::TooNew {
            found: current,
            supported,
        });
    }
    for (version, name, sql) in PG_MIGRATIONS.iter().filter(|m| m.0 > current) {
        tx.batch_execute(sql)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at)
             VALUES ($1, $2, EXTRACT(EPOCH FROM now())::BIGINT)",
            &[version, name],
        )?;
    }
    tx.commit()?;
    Ok(())
}

fn json<T: serde::Serialize>(v: &T, what: &'static str) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|_| StoreError::Range(what))
}

fn put_host(tx: &mut Transaction<'_>, h: &Host) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO hosts (id, name, public_key, ipv4, ipv6, labels, reported, listen_port,
                            observed_ip, created_at, last_seen, removed, token_id,
                            quarantined, revoked, transparent, pending_key, key_rotated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)
         ON CONFLICT (id) DO UPDATE SET
            name = excluded.name, public_key = excluded.public_key, ipv4 = excluded.ipv4,
            ipv6 = excluded.ipv6, labels = excluded.labels, reported = excluded.reported,
            listen_port = excluded.listen_port, observed_ip = excluded.observed_ip,
            created_at = excluded.created_at, last_seen = excluded.last_seen,
            removed = excluded.removed, token_id = excluded.token_id,
            quarantined = excluded.quarantined, revoked = excluded.revoked,
            transparent = excluded.transparent, pending_key = excluded.pending_key,
            key_rotated_at = excluded.key_rotated_at",
        &[
            &to_i64(h.id.0, "host id")?,
            &h.name,
            &h.public_key.to_base64(),
            &h.ipv4.to_string(),
            &h.ipv6.map(|a| a.to_string()),
            &json(&h.labels, "labels")?,
            &json(&h.reported_endpoints, "reported")?,
            &h.listen_port.map(i64::from),
            &h.observed_ip.map(|a| a.to_string()),
            &to_i64(h.created_at, "created_at")?,
            &to_i64(h.last_seen, "last_seen")?,
            &h.removed,
            &h.token_id.map(|t| to_i64(t.0, "token id")).transpose()?,
            &h.quarantined,
            &h.revoked,
            &h.transparent,
            &h.pending_key.map(|k| k.to_base64()),
            &h.key_rotated_at
                .map(|t| to_i64(t, "key_rotated_at"))
                .transpose()?,
        ],
    )?;
    Ok(())
}

fn put_token(tx: &mut Transaction<'_>, t: &Token) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO tokens (id, labels, created_at, expires_at, uses_left, revoked, secret_hash)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (id) DO UPDATE SET
            labels = excluded.labels, created_at = excluded.created_at,
            expires_at = excluded.expires_at, uses_left = excluded.uses_left,
            revoked = excluded.revoked, secret_hash = excluded.secret_hash",
        &[
            &to_i64(t.id.0, "token id")?,
            &json(&t.labels, "labels")?,
            &to_i64(t.created_at, "created_at")?,
            &t.expires_at.map(|e| to_i64(e, "expires_at")).transpose()?,
            &t.uses_left.map(i64::from),
            &t.revoked,
            &&t.secret_hash[..],
        ],
    )?;
    Ok(())
}

fn put_record(tx: &mut Transaction<'_>, r: &HostRecord) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO cmdb_records (id, name, ip, labels, imported_at, host_id)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (id) DO UPDATE SET
            name = excluded.name, ip = excluded.ip, labels = excluded.labels,
            imported_at = excluded.imported_at, host_id = excluded.host_id",
        &[
            &to_i64(r.id.0, "record id")?,
            &r.name,
            &r.ip.map(|a| a.to_string()),
            &json(&r.labels, "labels")?,
            &to_i64(r.imported_at, "imported_at")?,
            &r.host.map(|h| to_i64(h.0, "host id")).transpose()?,
        ],
    )?;
    Ok(())
}

/// Column `idx` as u64 (a negative value is corrupt).
fn u64_col(
    row: &Row,
    idx: usize,
    table: &'static str,
    id: i64,
    field: &'static str,
) -> Result<u64, StoreError> {
    let v: i64 = row.try_get(idx)?;
    u64::try_from(v).map_err(|_| StoreError::Corrupt { table, id, field })
}

/// Optional column `idx` converted with `T::try_from` (out of range is corrupt).
fn opt_col<T: TryFrom<i64>>(
    row: &Row,
    idx: usize,
    table: &'static str,
    id: i64,
    field: &'static str,
) -> Result<Option<T>, StoreError> {
    let v: Option<i64> = row.try_get(idx)?;
    v.map(T::try_from)
        .transpose()
        .map_err(|_| StoreError::Corrupt { table, id, field })
}

/// A row of `SELECT name, hash, created_at, expires_at, revoked_at FROM admin_tokens` (the
/// table has no numeric id: errors name row 0).
fn admin_token_from_row(row: &Row) -> Result<AdminToken, StoreError> {
    let bad = |field| StoreError::Corrupt {
        table: "admin_tokens",
        id: 0,
        field,
    };
    let name: String = row.try_get(0)?;
    meshd_control::state::validate_admin_token_name(&name).map_err(|_| bad("name"))?;
    let hash: String = row.try_get(1)?;
    Ok(AdminToken {
        name,
        hash: crate::sqlite::unhex32(&hash).ok_or_else(|| bad("hash"))?,
        created_at: u64_col(row, 2, "admin_tokens", 0, "created_at")?,
        expires_at: opt_col(row, 3, "admin_tokens", 0, "expires_at")?,
        revoked_at: opt_col(row, 4, "admin_tokens", 0, "revoked_at")?,
    })
}

fn host_from_row(row: &Row) -> Result<Host, StoreError> {
    let id: i64 = row.try_get(0)?;
    let bad = |field| StoreError::Corrupt {
        table: "hosts",
        id,
        field,
    };
    let key: String = row.try_get(2)?;
    let ipv4: String = row.try_get(3)?;
    let ipv6: Option<String> = row.try_get(4)?;
    let labels: String = row.try_get(5)?;
    let reported: String = row.try_get(6)?;
    let observed: Option<String> = row.try_get(8)?;
    let pending: Option<String> = row.try_get(16)?;
    Ok(Host {
        id: HostId(u64::try_from(id).map_err(|_| bad("id"))?),
        name: row.try_get(1)?,
        public_key: key.parse().map_err(|_| bad("public_key"))?,
        ipv4: ipv4.parse::<Ipv4Addr>().map_err(|_| bad("ipv4"))?,
        ipv6: ipv6
            .map(|s| s.parse::<Ipv6Addr>())
            .transpose()
            .map_err(|_| bad("ipv6"))?,
        labels: serde_json::from_str::<Labels>(&labels).map_err(|_| bad("labels"))?,
        reported_endpoints: serde_json::from_str::<Vec<SocketAddr>>(&reported)
            .map_err(|_| bad("reported"))?,
        listen_port: opt_col(row, 7, "hosts", id, "listen_port")?,
        observed_ip: observed
            .map(|s| s.parse::<IpAddr>())
            .transpose()
            .map_err(|_| bad("observed_ip"))?,
        created_at: u64_col(row, 9, "hosts", id, "created_at")?,
        last_seen: u64_col(row, 10, "hosts", id, "last_seen")?,
        removed: row.try_get(11)?,
        token_id: opt_col::<u64>(row, 12, "hosts", id, "token_id")?.map(TokenId),
        quarantined: row.try_get(13)?,
        revoked: row.try_get(14)?,
        transparent: row.try_get(15)?,
        pending_key: pending
            .map(|k| k.parse())
            .transpose()
            .map_err(|_| bad("pending_key"))?,
        key_rotated_at: opt_col(row, 17, "hosts", id, "key_rotated_at")?,
    })
}

fn token_from_row(row: &Row) -> Result<Token, StoreError> {
    let id: i64 = row.try_get(0)?;
    let bad = |field| StoreError::Corrupt {
        table: "tokens",
        id,
        field,
    };
    let labels: String = row.try_get(1)?;
    let hash: Vec<u8> = row.try_get(6)?;
    Ok(Token {
        id: TokenId(u64::try_from(id).map_err(|_| bad("id"))?),
        labels: serde_json::from_str(&labels).map_err(|_| bad("labels"))?,
        created_at: u64_col(row, 2, "tokens", id, "created_at")?,
        expires_at: opt_col(row, 3, "tokens", id, "expires_at")?,
        uses_left: opt_col(row, 4, "tokens", id, "uses_left")?,
        revoked: row.try_get(5)?,
        secret_hash: <[u8; 32]>::try_from(hash.as_slice()).map_err(|_| bad("secret_hash"))?,
    })
}

fn record_from_row(row: &Row) -> Result<HostRecord, StoreError> {
    let id: i64 = row.try_get(0)?;
    let bad = |field| StoreError::Corrupt {
        table: "cmdb_records",
        id,
        field,
    };
    let ip: Option<String> = row.try_get(2)?;
    let labels: String = row.try_get(3)?;
    Ok(HostRecord {
        id: RecordId(u64::try_from(id).map_err(|_| bad("id"))?),
        name: row.try_get(1)?,
        ip: ip
            .map(|s| s.parse::<IpAddr>())
            .transpose()
            .map_err(|_| bad("ip"))?,
        labels: serde_json::from_str::<Labels>(&labels).map_err(|_| bad("labels"))?,
        imported_at: u64_col(row, 4, "cmdb_records", id, "imported_at")?,
        host: opt_col::<u64>(row, 5, "cmdb_records", id, "host_id")?.map(HostId),
    })
}

fn get_meta(c: &mut impl GenericClient, key: &str) -> Result<Option<String>, StoreError> {
    match c.query_opt("SELECT value FROM meta WHERE key = $1", &[&key])? {
        Some(r) => Ok(Some(r.try_get(0)?)),
        None => Ok(None),
    }
}

fn set_meta(c: &mut impl GenericClient, key: &str, value: &str) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO meta (key, value) VALUES ($1, $2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        &[&key, &value],
    )?;
    Ok(())
}

/// The shared state's generation (0 before the first fenced commit).
fn read_generation(c: &mut impl GenericClient) -> Result<u64, StoreError> {
    get_meta(c, META_GENERATION)?.map_or(Ok(0), |s| {
        s.parse().map_err(|_| StoreError::Corrupt {
            table: "meta",
            id: 0,
            field: "generation",
        })
    })
}

/// Moves the generation on by one if it is still `expected` (`None`: whatever it is), under
/// the generation row's lock: two replicas' commits queue here, and the second finds the
/// first's generation (read committed re-reads a row it waited for). Notifies the other
/// replicas at commit.
fn bump_generation(c: &mut impl GenericClient, expected: Option<u64>) -> Result<u64, StoreError> {
    c.execute(
        "INSERT INTO meta (key, value) VALUES ($1, '0') ON CONFLICT (key) DO NOTHING",
        &[&META_GENERATION],
    )?;
    let row = c.query_one(
        "SELECT value FROM meta WHERE key = $1 FOR UPDATE",
        &[&META_GENERATION],
    )?;
    let found: String = row.try_get(0)?;
    let found: u64 = found.parse().map_err(|_| StoreError::Corrupt {
        table: "meta",
        id: 0,
        field: "generation",
    })?;
    if let Some(expected) = expected.filter(|e| *e != found) {
        return Err(StoreError::Conflict { expected, found });
    }
    let next = found + 1;
    let text = next.to_string();
    c.execute(
        "UPDATE meta SET value = $2 WHERE key = $1",
        &[&META_GENERATION, &text],
    )?;
    c.execute("SELECT pg_notify($1, $2)", &[&NOTIFY_CHANNEL, &text])?;
    Ok(next)
}

fn insert_event(c: &mut impl GenericClient, kept: u32, e: &AuditEvent) -> Result<(), StoreError> {
    let id: i64 = c
        .query_one(
            "INSERT INTO events (at, kind, detail) VALUES ($1, $2, $3) RETURNING id",
            &[&to_i64(e.at, "event time")?, &e.kind.as_str(), &e.detail],
        )?
        .try_get(0)?;
    // A range on the key: nothing to scan until the log is full.
    c.execute(
        "DELETE FROM events WHERE id <= $1",
        &[&id.saturating_sub(i64::from(kept))],
    )?;
    Ok(())
}

/// Decodes a JSON column of `table` row `id`.
fn json_col<T: serde::de::DeserializeOwned>(
    text: &str,
    table: &'static str,
    id: i64,
    field: &'static str,
) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|_| StoreError::Corrupt { table, id, field })
}

impl Store for PgStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        self.read(|tx| {
            let hosts = tx
                .query(
                    "SELECT id, name, public_key, ipv4, ipv6, labels, reported, listen_port,
                            observed_ip, created_at, last_seen, removed, token_id,
                            quarantined, revoked, transparent, pending_key, key_rotated_at
                     FROM hosts ORDER BY id",
                    &[],
                )?
                .iter()
                .map(host_from_row)
                .collect::<Result<Vec<_>, _>>()?;
            let tokens = tx
                .query(
                    "SELECT id, labels, created_at, expires_at, uses_left, revoked, secret_hash
                     FROM tokens ORDER BY id",
                    &[],
                )?
                .iter()
                .map(token_from_row)
                .collect::<Result<Vec<_>, _>>()?;
            let map_version = match get_meta(tx, META_MAP_VERSION)? {
                Some(s) => s.parse().map_err(|_| StoreError::Corrupt {
                    table: "meta",
                    id: 0,
                    field: "map_version",
                })?,
                None => 0,
            };
            let mut policies = Vec::new();
            for r in tx.query(
                "SELECT version, yaml, applied_at, comment FROM policies ORDER BY version",
                &[],
            )? {
                let version: i64 = r.try_get(0)?;
                policies.push(PolicyRecord {
                    version: u64::try_from(version).map_err(|_| StoreError::Corrupt {
                        table: "policies",
                        id: version,
                        field: "version",
                    })?,
                    yaml: r.try_get(1)?,
                    applied_at: u64_col(&r, 2, "policies", version, "applied_at")?,
                    comment: r.try_get(3)?,
                });
            }
            let mut blocks = Vec::new();
            for r in tx.query(
                "SELECT id, event FROM (SELECT id, event FROM blocks ORDER BY id DESC LIMIT $1) b
                 ORDER BY id",
                &[&i64::from(BLOCKS_KEPT)],
            )? {
                let id: i64 = r.try_get(0)?;
                let ev: String = r.try_get(1)?;
                blocks.push(json_col::<BlockEvent>(&ev, "blocks", id, "event")?);
            }
            let flow_intervals = intervals(tx)?;
            let mode = match get_meta(tx, META_POLICY_MODE)? {
                Some(s) => json_col(&s, "meta", 0, "policy_mode")?,
                None => Default::default(),
            };
            let records = tx
                .query(
                    "SELECT id, name, ip, labels, imported_at, host_id FROM cmdb_records
                     ORDER BY id",
                    &[],
                )?
                .iter()
                .map(record_from_row)
                .collect::<Result<Vec<_>, _>>()?;
            let mut signed = Vec::new();
            // COLLATE "C": the byte order SQLite sorts text in.
            for r in tx.query(
                "SELECT kind, id, body FROM signed_statements ORDER BY kind COLLATE \"C\", id",
                &[],
            )? {
                let id: i64 = r.try_get(1)?;
                let body: String = r.try_get(2)?;
                signed.push(json_col(&body, "signed_statements", id, "body")?);
            }
            let mut admin_tokens = Vec::new();
            // COLLATE "C": SQLite's order of names.
            for r in tx.query(
                "SELECT name, hash, created_at, expires_at, revoked_at FROM admin_tokens
                 ORDER BY name COLLATE \"C\"",
                &[],
            )? {
                admin_tokens.push(admin_token_from_row(&r)?);
            }
            Ok(Snapshot {
                hosts,
                tokens,
                map_version,
                policies,
                blocks,
                mode,
                flow_intervals,
                records,
                signed,
                admin_tokens,
                generation: read_generation(tx)?,
            })
        })
    }

    fn commit_at(
        &self,
        generation: Option<u64>,
        d: &Dirty,
        events: &[AuditEvent],
    ) -> Result<u64, StoreError> {
        if d.is_empty() && events.is_empty() {
            return self.generation();
        }
        let kept = self.events_kept;
        self.with(|c| {
            let mut tx = c.transaction()?;
            // An appended-only batch leaves the caller where it was (it has not read what
            // another replica may have committed meanwhile).
            let after = match (d.shared(), generation) {
                (true, _) => bump_generation(&mut tx, generation)?,
                (false, Some(g)) => g,
                (false, None) => read_generation(&mut tx)?,
            };
            for e in events {
                insert_event(&mut tx, kept, e)?;
            }
            for h in &d.hosts {
                put_host(&mut tx, h)?;
            }
            for t in &d.tokens {
                put_token(&mut tx, t)?;
            }
            for r in &d.records {
                put_record(&mut tx, r)?;
            }
            for t in &d.admin_tokens {
                tx.execute(
                    "INSERT INTO admin_tokens (name, hash, created_at, expires_at, revoked_at)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (name) DO UPDATE SET
                        hash = excluded.hash, created_at = excluded.created_at,
                        expires_at = excluded.expires_at, revoked_at = excluded.revoked_at",
                    &[
                        &t.name,
                        &crate::sqlite::hex32(&t.hash),
                        &to_i64(t.created_at, "created_at")?,
                        &t.expires_at.map(|e| to_i64(e, "expires_at")).transpose()?,
                        &t.revoked_at.map(|e| to_i64(e, "revoked_at")).transpose()?,
                    ],
                )?;
            }
            for r in &d.signed {
                let (kind, id) = r.key();
                let id = i64::try_from(id).map_err(|_| StoreError::Range("signed statement id"))?;
                let body = json(r, "signed statement")?;
                tx.execute(
                    "INSERT INTO signed_statements (kind, id, body) VALUES ($1, $2, $3)
                     ON CONFLICT (kind, id) DO UPDATE SET body = excluded.body",
                    &[&kind, &id, &body],
                )?;
            }
            if let Some(v) = d.map_version {
                // The highest any replica reached (replicas number their maps on their own).
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ($1, $2)
                     ON CONFLICT (key) DO UPDATE SET value =
                        GREATEST(meta.value::BIGINT, excluded.value::BIGINT)::TEXT",
                    &[&META_MAP_VERSION, &v.to_string()],
                )?;
            }
            if let Some(m) = &d.mode {
                set_meta(&mut tx, META_POLICY_MODE, &json(m, "mode")?)?;
            }
            if let Some(p) = &d.policy {
                tx.execute(
                    "INSERT INTO policies (version, yaml, applied_at, comment)
                     VALUES ($1, $2, $3, $4)",
                    &[
                        &to_i64(p.version, "policy version")?,
                        &p.yaml,
                        &to_i64(p.applied_at, "applied_at")?,
                        &p.comment,
                    ],
                )?;
            }
            if !d.blocks.is_empty() {
                for b in &d.blocks {
                    tx.execute(
                        "INSERT INTO blocks (at, host, event) VALUES ($1, $2, $3)",
                        &[&to_i64(b.at, "block time")?, &b.host, &json(b, "block")?],
                    )?;
                }
                tx.execute(
                    "DELETE FROM blocks WHERE id <= (SELECT MAX(id) FROM blocks) - $1",
                    &[&i64::from(BLOCKS_KEPT)],
                )?;
            }
            insert_flows(&mut tx, &d.flows)?;
            tx.commit()?;
            Ok(after)
        })
    }

    fn generation(&self) -> Result<u64, StoreError> {
        self.with(read_generation)
    }

    fn listen(&self) -> Option<Result<Box<dyn crate::ChangeListener>, StoreError>> {
        Some(
            self.listener()
                .map(|l| Box::new(l) as Box<dyn crate::ChangeListener>),
        )
    }

    fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.with(|c| get_meta(c, key))
    }

    fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.with(|c| set_meta(c, key, value))
    }

    fn log_event(&self, event: &AuditEvent) -> Result<(), StoreError> {
        let kept = self.events_kept;
        self.with(|c| {
            let mut tx = c.transaction()?;
            insert_event(&mut tx, kept, event)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn recent_events(&self, limit: u32) -> Result<Vec<AuditEvent>, StoreError> {
        self.with(|c| {
            let mut v = Vec::new();
            for r in c.query(
                "SELECT at, kind, detail FROM events ORDER BY id DESC LIMIT $1",
                &[&i64::from(limit)],
            )? {
                let at: i64 = r.try_get(0)?;
                let kind: String = r.try_get(1)?;
                v.push(AuditEvent::new(
                    u64::try_from(at).unwrap_or(0),
                    EventKind::from_stored(&kind),
                    r.try_get::<_, String>(2)?,
                ));
            }
            Ok(v)
        })
    }

    fn flows(&self, q: &FlowFilter) -> Result<Vec<FlowView>, StoreError> {
        self.read(|tx| query_flows(tx, q, false))
    }

    fn flow_summary(&self, q: &FlowFilter) -> Result<Vec<FlowView>, StoreError> {
        self.read(|tx| query_flows(tx, q, true))
    }

    fn prune_flows(&self, before: UnixTime, max_rows: u32) -> Result<u64, StoreError> {
        self.with(|c| {
            Ok(c.execute(
                "DELETE FROM flows WHERE id IN
                    (SELECT id FROM flows WHERE last_seen < $1 LIMIT $2)",
                &[&to_i64(before, "before")?, &i64::from(max_rows)],
            )?)
        })
    }
}

// ---- flows (migration 4), as crate::flows for SQLite ----

fn verdict_code(v: FlowVerdict) -> i64 {
    match v {
        FlowVerdict::Allowed => 0,
        FlowVerdict::Denied => 1,
        FlowVerdict::WouldDeny => 2,
    }
}

fn label_id(
    tx: &mut Transaction<'_>,
    cache: &mut HashMap<String, i64>,
    labels: &Labels,
) -> Result<i64, StoreError> {
    let json = json(labels, "labels")?;
    if let Some(id) = cache.get(&json) {
        return Ok(*id);
    }
    let id: i64 = match tx.query_opt("SELECT id FROM flow_labels WHERE labels = $1", &[&json])? {
        Some(r) => r.try_get(0)?,
        None => tx
            .query_one(
                "INSERT INTO flow_labels (labels) VALUES ($1) RETURNING id",
                &[&json],
            )?
            .try_get(0)?,
    };
    cache.insert(json, id);
    Ok(id)
}

fn insert_flows(tx: &mut Transaction<'_>, rows: &[FlowView]) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut cache = HashMap::new();
    let st = tx.prepare(
        "INSERT INTO flows (interval_start, host_id, host_name, host_labels, peer_id,
                            peer_name, peer_labels, src, outbound, proto, port, packets,
                            bytes, flows, first_seen, last_seen, verdict, rule)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                 $17, $18)",
    )?;
    for r in rows {
        let hl = label_id(tx, &mut cache, &r.host_labels)?;
        let pl = label_id(tx, &mut cache, &r.peer_labels)?;
        tx.execute(
            &st,
            &[
                &to_i64(r.interval_start, "interval_start")?,
                &to_i64(r.host_id.0, "host id")?,
                &r.host,
                &hl,
                &r.peer_id.map(|p| to_i64(p.0, "peer id")).transpose()?,
                &r.peer,
                &pl,
                &r.src.map(|a| a.to_string()),
                &(r.direction == Direction::Outbound),
                &i64::from(r.proto),
                &i64::from(r.port),
                &to_i64(r.packets, "packets")?,
                &to_i64(r.bytes, "bytes")?,
                &to_i64(r.flows, "flows")?,
                &to_i64(r.first_seen, "first_seen")?,
                &to_i64(r.last_seen, "last_seen")?,
                &verdict_code(r.verdict),
                &r.rule,
            ],
        )?;
    }
    Ok(())
}

fn all_labels(tx: &mut Transaction<'_>) -> Result<HashMap<i64, Labels>, StoreError> {
    let mut m = HashMap::new();
    for r in tx.query("SELECT id, labels FROM flow_labels", &[])? {
        let id: i64 = r.try_get(0)?;
        let text: String = r.try_get(1)?;
        m.insert(id, json_col(&text, "flow_labels", id, "labels")?);
    }
    Ok(m)
}

const COLUMNS: &str = "interval_start, host_id, host_name, host_labels, peer_id, peer_name,
    peer_labels, src, outbound, proto, port, packets, bytes, flows, first_seen, last_seen,
    verdict, rule, id";

// Sums cast back to BIGINT (PostgreSQL sums BIGINT into NUMERIC; a sum past i64 is an error).
const SUMS: &str = "MIN(interval_start), host_id, MAX(host_name), host_labels, peer_id,
    MAX(peer_name), peer_labels, src, outbound, proto, port, SUM(packets)::BIGINT,
    SUM(bytes)::BIGINT, SUM(flows)::BIGINT, MIN(first_seen), MAX(last_seen), verdict, rule,
    MIN(id)";

fn query_flows(
    tx: &mut Transaction<'_>,
    q: &FlowFilter,
    summed: bool,
) -> Result<Vec<FlowView>, StoreError> {
    let labels = all_labels(tx)?;
    let since = to_i64(q.since, "since")?;
    let limit = i64::from(q.limit);
    let host = q.host.map(|h| to_i64(h.0, "host id")).transpose()?;
    let cond = match host {
        None => "last_seen >= $1",
        Some(_) => "((host_id = $3 AND last_seen >= $1) OR (peer_id = $3 AND last_seen >= $1))",
    };
    let sql = if summed {
        format!(
            "SELECT {SUMS} FROM flows WHERE {cond}
             GROUP BY host_id, host_labels, peer_id, peer_labels, src, outbound, proto, port,
                      verdict, rule
             ORDER BY MIN(id) LIMIT $2"
        )
    } else {
        format!("SELECT {COLUMNS} FROM flows WHERE {cond} ORDER BY id DESC LIMIT $2")
    };
    let rows = match host {
        None => tx.query(&sql, &[&since, &limit])?,
        Some(h) => tx.query(&sql, &[&since, &limit, &h])?,
    };
    let mut v = rows
        .iter()
        .map(|r| {
            let id: i64 = r.try_get(18)?;
            flow_view(r, &labels, id)
        })
        .collect::<Result<Vec<_>, _>>()?;
    if !summed {
        v.reverse();
    }
    Ok(v)
}

fn flow_view(r: &Row, labels: &HashMap<i64, Labels>, id: i64) -> Result<FlowView, StoreError> {
    let bad = |field| StoreError::Corrupt {
        table: "flows",
        id,
        field,
    };
    let u = |i: usize, field| u64_col(r, i, "flows", id, field);
    let label = |i: usize, field| -> Result<Labels, StoreError> {
        let l: i64 = r.try_get(i)?;
        labels.get(&l).cloned().ok_or(bad(field))
    };
    let small = |i: usize| -> Result<i64, StoreError> { Ok(r.try_get::<_, i64>(i)?) };
    let src: Option<String> = r.try_get(7)?;
    let outbound: bool = r.try_get(8)?;
    Ok(FlowView {
        interval_start: u(0, "interval_start")?,
        host_id: HostId(u(1, "host_id")?),
        host: r.try_get(2)?,
        host_labels: label(3, "host_labels")?,
        peer_id: opt_col::<u64>(r, 4, "flows", id, "peer_id")?.map(HostId),
        peer: r.try_get(5)?,
        peer_labels: label(6, "peer_labels")?,
        src: src.map(|s| s.parse()).transpose().map_err(|_| bad("src"))?,
        direction: if outbound {
            Direction::Outbound
        } else {
            Direction::Inbound
        },
        proto: u8::try_from(small(9)?).map_err(|_| bad("proto"))?,
        port: u16::try_from(small(10)?).map_err(|_| bad("port"))?,
        packets: u(11, "packets")?,
        bytes: u(12, "bytes")?,
        flows: u(13, "flows")?,
        first_seen: u(14, "first_seen")?,
        last_seen: u(15, "last_seen")?,
        verdict: match small(16)? {
            0 => FlowVerdict::Allowed,
            1 => FlowVerdict::Denied,
            2 => FlowVerdict::WouldDeny,
            _ => return Err(bad("verdict")),
        },
        rule: r.try_get(17)?,
    })
}

fn intervals(tx: &mut Transaction<'_>) -> Result<Vec<FlowInterval>, StoreError> {
    let newest: Option<i64> = tx
        .query_one("SELECT MAX(last_seen) FROM flows", &[])?
        .try_get(0)?;
    let Some(newest) = newest else {
        return Ok(Vec::new());
    };
    let from = newest.saturating_sub(FLOW_INTERVALS_LOADED_SECS as i64);
    let bad = |field| StoreError::Corrupt {
        table: "flows",
        id: 0,
        field,
    };
    let mut v = Vec::new();
    for r in tx.query(
        "SELECT host_id, interval_start, COUNT(*) FROM flows WHERE last_seen >= $1
         GROUP BY host_id, interval_start ORDER BY interval_start, host_id",
        &[&from],
    )? {
        let (h, t, n): (i64, i64, i64) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
        v.push(FlowInterval {
            host: HostId(u64::try_from(h).map_err(|_| bad("host_id"))?),
            interval_start: u64::try_from(t).map_err(|_| bad("interval_start"))?,
            rows: usize::try_from(n).map_err(|_| bad("count"))?,
        });
    }
    Ok(v)
}
