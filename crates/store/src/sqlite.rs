//! SQLite implementation of [`Store`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::sync::Mutex;

use meshd_config::fsutil::{make_private, FsError};

use meshd_control::cmdb::{HostRecord, RecordId};
use meshd_control::state::{AdminToken, Dirty};
use meshd_control::{AuditEvent, EventKind, Host, HostId, Labels, Token, TokenId};
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};

use crate::migrations::MIGRATIONS;
use crate::{
    FlowFilter, Snapshot, Store, StoreError, BLOCKS_KEPT, EVENTS_KEPT, META_GENERATION,
    META_MAP_VERSION, META_POLICY_MODE,
};
use meshd_control::api::FlowView;
use meshd_control::policy::PolicyRecord;
use meshd_control::UnixTime;
use meshd_policy::BlockEvent;

/// SQLite-backed store (one connection behind a mutex; calls are short and blocking).
#[derive(Debug)]
pub struct SqliteStore {
    conn: Mutex<Connection>,
    /// A second, read-only connection for flow queries (a file database only: WAL lets it
    /// read while the writer commits, so a long topology query does not hold up commits).
    reader: Option<Mutex<Connection>>,
    /// How many audit events are kept (older ones are deleted on insert).
    events_kept: u32,
}

fn to_i64(v: u64, what: &'static str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Range(what))
}

impl SqliteStore {
    /// Opens (creating if needed) a database file, sets WAL + `synchronous=FULL`, and runs
    /// pending migrations. The database and its `-wal` and `-shm` files are mode 0600 (SQLite
    /// gives the journal files the database file's mode, so the database is made 0600 first).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if std::fs::symlink_metadata(path).is_err() {
            let created = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path);
            match created {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(source) => {
                    return Err(FsError::Write {
                        path: path.to_owned(),
                        source,
                    }
                    .into())
                }
            }
        }
        make_private(path)?;
        let conn = Connection::open(path)?;
        let mut s = Self::init(conn)?;
        let reader = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        reader.busy_timeout(std::time::Duration::from_secs(5))?;
        s.reader = Some(Mutex::new(reader));
        for suffix in ["-wal", "-shm"] {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            make_private(Path::new(&p))?;
        }
        Ok(s)
    }

    /// An in-memory database (tests).
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Self, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut conn)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            reader: None,
            events_kept: EVENTS_KEPT,
        })
    }

    /// The highest migration applied.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        let c = self.conn.lock().map_err(|_| StoreError::Poisoned)?;
        Ok(c.query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |r| r.get(0),
        )?)
    }

    /// Keeps at most `n` audit events (tests; the default is [`EVENTS_KEPT`]).
    pub fn with_events_kept(mut self, n: u32) -> Self {
        self.events_kept = n;
        self
    }

    /// Runs one SQL statement outside the store's logic (tests, repairs); returns the rows
    /// it changed.
    pub fn execute(&self, sql: &str) -> Result<u64, StoreError> {
        self.with(|c| Ok(c.execute(sql, [])? as u64))
    }

    /// The first column of the first row of a query, as an integer (tests, checks).
    pub fn query_i64(&self, sql: &str) -> Result<Option<i64>, StoreError> {
        self.with(|c| Ok(c.query_row(sql, [], |r| r.get(0)).optional()?.flatten()))
    }

    /// The writer connection (held for a migration's read transaction).
    pub(crate) fn lock(&self) -> Result<std::sync::MutexGuard<'_, Connection>, StoreError> {
        self.conn.lock().map_err(|_| StoreError::Poisoned)
    }

    pub(crate) fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut c = self.conn.lock().map_err(|_| StoreError::Poisoned)?;
        f(&mut c)
    }

    /// Runs a read on the reader connection (the writer's for an in-memory database).
    pub(crate) fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match &self.reader {
            Some(r) => {
                let mut c = r.lock().map_err(|_| StoreError::Poisoned)?;
                // One snapshot for all of `f`'s statements: a commit lands a label set and the
                // flow rows that refer to it together, and a read between two statements would
                // otherwise see the rows without the labels (or two different windows).
                let tx = c.transaction()?;
                let v = f(&tx)?;
                tx.commit()?;
                Ok(v)
            }
            None => self.with(|c| f(c)),
        }
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version    INTEGER PRIMARY KEY,
            name       TEXT NOT NULL,
            applied_at INTEGER NOT NULL  -- Unix seconds, from SQLite's clock
        )",
    )?;
    let current: i64 = conn.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        [],
        |r| r.get(0),
    )?;
    let supported = MIGRATIONS.last().map_or(0, |m| m.0);
    if current > supported {
        return Err(StoreError::TooNew {
            found: current,
            supported,
        });
    }
    for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, unixepoch())",
            params![version, name],
        )?;
        tx.commit()?;
    }
    Ok(())
}

fn put_host(tx: &Transaction<'_>, h: &Host) -> Result<(), StoreError> {
    let labels = serde_json::to_string(&h.labels).map_err(|_| StoreError::Range("labels"))?;
    let reported =
        serde_json::to_string(&h.reported_endpoints).map_err(|_| StoreError::Range("reported"))?;
    tx.execute(
        "INSERT INTO hosts (id, name, public_key, ipv4, ipv6, labels, reported, listen_port,
                            observed_ip, created_at, last_seen, removed, token_id,
                            quarantined, revoked, transparent, pending_key, key_rotated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)
         ON CONFLICT(id) DO UPDATE SET
            name = excluded.name, public_key = excluded.public_key, ipv4 = excluded.ipv4,
            ipv6 = excluded.ipv6, labels = excluded.labels, reported = excluded.reported,
            listen_port = excluded.listen_port, observed_ip = excluded.observed_ip,
            created_at = excluded.created_at, last_seen = excluded.last_seen,
            removed = excluded.removed, token_id = excluded.token_id,
            quarantined = excluded.quarantined, revoked = excluded.revoked,
            transparent = excluded.transparent, pending_key = excluded.pending_key,
            key_rotated_at = excluded.key_rotated_at",
        params![
            to_i64(h.id.0, "host id")?,
            h.name,
            h.public_key.to_base64(),
            h.ipv4.to_string(),
            h.ipv6.map(|a| a.to_string()),
            labels,
            reported,
            h.listen_port,
            h.observed_ip.map(|a| a.to_string()),
            to_i64(h.created_at, "created_at")?,
            to_i64(h.last_seen, "last_seen")?,
            h.removed,
            h.token_id.map(|t| to_i64(t.0, "token id")).transpose()?,
            h.quarantined,
            h.revoked,
            h.transparent,
            h.pending_key.map(|k| k.to_base64()),
            h.key_rotated_at
                .map(|t| to_i64(t, "key_rotated_at"))
                .transpose()?,
        ],
    )?;
    Ok(())
}

fn put_token(tx: &Transaction<'_>, t: &Token) -> Result<(), StoreError> {
    let labels = serde_json::to_string(&t.labels).map_err(|_| StoreError::Range("labels"))?;
    tx.execute(
        "INSERT INTO tokens (id, labels, created_at, expires_at, uses_left, revoked, secret_hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT(id) DO UPDATE SET
            labels = excluded.labels, created_at = excluded.created_at,
            expires_at = excluded.expires_at, uses_left = excluded.uses_left,
            revoked = excluded.revoked, secret_hash = excluded.secret_hash",
        params![
            to_i64(t.id.0, "token id")?,
            labels,
            to_i64(t.created_at, "created_at")?,
            t.expires_at.map(|e| to_i64(e, "expires_at")).transpose()?,
            t.uses_left,
            t.revoked,
            &t.secret_hash[..],
        ],
    )?;
    Ok(())
}

fn u64_col(
    row: &Row<'_>,
    idx: usize,
    table: &'static str,
    id: i64,
    field: &'static str,
) -> Result<u64, StoreError> {
    let v: i64 = row.get(idx)?;
    u64::try_from(v).map_err(|_| StoreError::Corrupt { table, id, field })
}

fn host_from_row(row: &Row<'_>) -> Result<Host, StoreError> {
    let id: i64 = row.get(0)?;
    let bad = |field| StoreError::Corrupt {
        table: "hosts",
        id,
        field,
    };
    let key: String = row.get(2)?;
    let ipv4: String = row.get(3)?;
    let ipv6: Option<String> = row.get(4)?;
    let labels: String = row.get(5)?;
    let reported: String = row.get(6)?;
    let observed: Option<String> = row.get(8)?;
    let token_id: Option<i64> = row.get(12)?;
    let pending: Option<String> = row.get(16)?;
    let rotated: Option<i64> = row.get(17)?;
    Ok(Host {
        id: HostId(u64::try_from(id).map_err(|_| bad("id"))?),
        name: row.get(1)?,
        public_key: key.parse().map_err(|_| bad("public_key"))?,
        ipv4: ipv4.parse::<Ipv4Addr>().map_err(|_| bad("ipv4"))?,
        ipv6: ipv6
            .map(|s| s.parse::<Ipv6Addr>())
            .transpose()
            .map_err(|_| bad("ipv6"))?,
        labels: serde_json::from_str::<Labels>(&labels).map_err(|_| bad("labels"))?,
        reported_endpoints: serde_json::from_str::<Vec<SocketAddr>>(&reported)
            .map_err(|_| bad("reported"))?,
        listen_port: row
            .get::<_, Option<i64>>(7)?
            .map(u16::try_from)
            .transpose()
            .map_err(|_| bad("listen_port"))?,
        observed_ip: observed
            .map(|s| s.parse::<IpAddr>())
            .transpose()
            .map_err(|_| bad("observed_ip"))?,
        created_at: u64_col(row, 9, "hosts", id, "created_at")?,
        last_seen: u64_col(row, 10, "hosts", id, "last_seen")?,
        removed: row.get(11)?,
        token_id: token_id
            .map(|t| u64::try_from(t).map(TokenId))
            .transpose()
            .map_err(|_| bad("token_id"))?,
        quarantined: row.get(13)?,
        revoked: row.get(14)?,
        transparent: row.get(15)?,
        pending_key: pending
            .map(|k| k.parse())
            .transpose()
            .map_err(|_| bad("pending_key"))?,
        key_rotated_at: rotated
            .map(u64::try_from)
            .transpose()
            .map_err(|_| bad("key_rotated_at"))?,
    })
}

fn put_record(tx: &Transaction<'_>, r: &HostRecord) -> Result<(), StoreError> {
    let labels = serde_json::to_string(&r.labels).map_err(|_| StoreError::Range("labels"))?;
    tx.execute(
        "INSERT INTO cmdb_records (id, name, ip, labels, imported_at, host_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT(id) DO UPDATE SET
            name = excluded.name, ip = excluded.ip, labels = excluded.labels,
            imported_at = excluded.imported_at, host_id = excluded.host_id",
        params![
            to_i64(r.id.0, "record id")?,
            r.name,
            r.ip.map(|a| a.to_string()),
            labels,
            to_i64(r.imported_at, "imported_at")?,
            r.host.map(|h| to_i64(h.0, "host id")).transpose()?,
        ],
    )?;
    Ok(())
}

fn record_from_row(row: &Row<'_>) -> Result<HostRecord, StoreError> {
    let id: i64 = row.get(0)?;
    let bad = |field| StoreError::Corrupt {
        table: "cmdb_records",
        id,
        field,
    };
    let ip: Option<String> = row.get(2)?;
    let labels: String = row.get(3)?;
    let host: Option<i64> = row.get(5)?;
    Ok(HostRecord {
        id: RecordId(u64::try_from(id).map_err(|_| bad("id"))?),
        name: row.get(1)?,
        ip: ip
            .map(|s| s.parse::<IpAddr>())
            .transpose()
            .map_err(|_| bad("ip"))?,
        labels: serde_json::from_str::<Labels>(&labels).map_err(|_| bad("labels"))?,
        imported_at: u64_col(row, 4, "cmdb_records", id, "imported_at")?,
        host: host
            .map(|h| u64::try_from(h).map(HostId))
            .transpose()
            .map_err(|_| bad("host_id"))?,
    })
}

fn token_from_row(row: &Row<'_>) -> Result<Token, StoreError> {
    let id: i64 = row.get(0)?;
    let bad = |field| StoreError::Corrupt {
        table: "tokens",
        id,
        field,
    };
    let labels: String = row.get(1)?;
    let expires: Option<i64> = row.get(3)?;
    let hash: Vec<u8> = row.get(6)?;
    Ok(Token {
        id: TokenId(u64::try_from(id).map_err(|_| bad("id"))?),
        labels: serde_json::from_str(&labels).map_err(|_| bad("labels"))?,
        created_at: u64_col(row, 2, "tokens", id, "created_at")?,
        expires_at: expires
            .map(u64::try_from)
            .transpose()
            .map_err(|_| bad("expires_at"))?,
        uses_left: row.get(4)?,
        revoked: row.get(5)?,
        secret_hash: <[u8; 32]>::try_from(hash.as_slice()).map_err(|_| bad("secret_hash"))?,
    })
}

/// Lowercase hex of a hash (how `admin_tokens.hash` is stored: plain TEXT, portable).
pub(crate) fn hex32(b: &[u8; 32]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The hash a 64-digit hex string stands for.
pub(crate) fn unhex32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        let hi = char::from(b[2 * i]).to_digit(16)?;
        let lo = char::from(b[2 * i + 1]).to_digit(16)?;
        *o = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(out)
}

fn put_admin_token(tx: &Transaction<'_>, t: &AdminToken) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO admin_tokens (name, hash, created_at, expires_at, revoked_at)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(name) DO UPDATE SET
            hash = excluded.hash, created_at = excluded.created_at,
            expires_at = excluded.expires_at, revoked_at = excluded.revoked_at",
        params![
            t.name,
            hex32(&t.hash),
            to_i64(t.created_at, "created_at")?,
            t.expires_at.map(|e| to_i64(e, "expires_at")).transpose()?,
            t.revoked_at.map(|e| to_i64(e, "revoked_at")).transpose()?,
        ],
    )?;
    Ok(())
}

/// A row of `SELECT rowid, name, hash, created_at, expires_at, revoked_at FROM admin_tokens`.
fn admin_token_from_row(row: &Row<'_>) -> Result<AdminToken, StoreError> {
    let id: i64 = row.get(0)?;
    let bad = |field| StoreError::Corrupt {
        table: "admin_tokens",
        id,
        field,
    };
    let name: String = row.get(1)?;
    meshd_control::state::validate_admin_token_name(&name).map_err(|_| bad("name"))?;
    let hash: String = row.get(2)?;
    let opt = |idx: usize, field: &'static str| -> Result<Option<u64>, StoreError> {
        let v: Option<i64> = row.get(idx)?;
        v.map(u64::try_from).transpose().map_err(|_| bad(field))
    };
    Ok(AdminToken {
        name,
        hash: unhex32(&hash).ok_or_else(|| bad("hash"))?,
        created_at: u64_col(row, 3, "admin_tokens", id, "created_at")?,
        expires_at: opt(4, "expires_at")?,
        revoked_at: opt(5, "revoked_at")?,
    })
}

fn get_meta(c: &Connection, key: &str) -> Result<Option<String>, StoreError> {
    Ok(
        c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?,
    )
}

fn set_meta(c: &Connection, key: &str, value: &str) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [key, value],
    )?;
    Ok(())
}

/// The shared state's generation (0 before the first fenced commit).
fn read_generation(c: &Connection) -> Result<u64, StoreError> {
    get_meta(c, META_GENERATION)?.map_or(Ok(0), |s| {
        s.parse().map_err(|_| StoreError::Corrupt {
            table: "meta",
            id: 0,
            field: "generation",
        })
    })
}

/// Moves the generation on by one, if it is still `expected` (`None`: whatever it is).
fn bump_generation(c: &Connection, expected: Option<u64>) -> Result<u64, StoreError> {
    let found = read_generation(c)?;
    if let Some(expected) = expected.filter(|e| *e != found) {
        return Err(StoreError::Conflict { expected, found });
    }
    let next = found + 1;
    set_meta(c, META_GENERATION, &next.to_string())?;
    Ok(next)
}

fn insert_event(c: &Connection, kept: u32, e: &AuditEvent) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO events (at, kind, detail) VALUES (?1, ?2, ?3)",
        params![to_i64(e.at, "event time")?, e.kind.as_str(), e.detail],
    )?;
    // A range on the rowid: nothing to scan until the log is full.
    c.execute(
        "DELETE FROM events WHERE id <= last_insert_rowid() - ?1",
        [kept],
    )?;
    Ok(())
}

impl Store for SqliteStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let hosts = {
                let mut st = tx.prepare(
                    "SELECT id, name, public_key, ipv4, ipv6, labels, reported, listen_port,
                            observed_ip, created_at, last_seen, removed, token_id,
                            quarantined, revoked, transparent, pending_key, key_rotated_at
                     FROM hosts ORDER BY id",
                )?;
                let mut rows = st.query([])?;
                let mut v = Vec::new();
                while let Some(r) = rows.next()? {
                    v.push(host_from_row(r)?);
                }
                v
            };
            let tokens = {
                let mut st = tx.prepare(
                    "SELECT id, labels, created_at, expires_at, uses_left, revoked, secret_hash
                     FROM tokens ORDER BY id",
                )?;
                let mut rows = st.query([])?;
                let mut v = Vec::new();
                while let Some(r) = rows.next()? {
                    v.push(token_from_row(r)?);
                }
                v
            };
            let map_version = match get_meta(&tx, META_MAP_VERSION)? {
                Some(s) => s.parse().map_err(|_| StoreError::Corrupt {
                    table: "meta",
                    id: 0,
                    field: "map_version",
                })?,
                None => 0,
            };
            let policies = {
                let mut st = tx.prepare(
                    "SELECT version, yaml, applied_at, comment FROM policies ORDER BY version",
                )?;
                let mut rows = st.query([])?;
                let mut v = Vec::new();
                while let Some(r) = rows.next()? {
                    let version: i64 = r.get(0)?;
                    v.push(PolicyRecord {
                        version: u64::try_from(version).map_err(|_| StoreError::Corrupt {
                            table: "policies",
                            id: version,
                            field: "version",
                        })?,
                        yaml: r.get(1)?,
                        applied_at: u64_col(r, 2, "policies", version, "applied_at")?,
                        comment: r.get(3)?,
                    });
                }
                v
            };
            let blocks = {
                let mut st = tx.prepare(
                    "SELECT id, event FROM (SELECT id, event FROM blocks ORDER BY id DESC LIMIT ?1)
                     ORDER BY id",
                )?;
                let mut rows = st.query([BLOCKS_KEPT])?;
                let mut v = Vec::new();
                while let Some(r) = rows.next()? {
                    let id: i64 = r.get(0)?;
                    let ev: String = r.get(1)?;
                    v.push(serde_json::from_str::<BlockEvent>(&ev).map_err(|_| {
                        StoreError::Corrupt {
                            table: "blocks",
                            id,
                            field: "event",
                        }
                    })?);
                }
                v
            };
            let flow_intervals = crate::flows::intervals(&tx)?;
            let mode = match get_meta(&tx, META_POLICY_MODE)? {
                Some(s) => serde_json::from_str(&s).map_err(|_| StoreError::Corrupt {
                    table: "meta",
                    id: 0,
                    field: "policy_mode",
                })?,
                None => Default::default(),
            };
            let records = {
                let mut st = tx.prepare(
                    "SELECT id, name, ip, labels, imported_at, host_id FROM cmdb_records ORDER BY id",
                )?;
                let mut rows = st.query([])?;
                let mut v = Vec::new();
                while let Some(r) = rows.next()? {
                    v.push(record_from_row(r)?);
                }
                v
            };
            let signed = {
                let mut st =
                    tx.prepare("SELECT kind, id, body FROM signed_statements ORDER BY kind, id")?;
                let mut rows = st.query([])?;
                let mut v = Vec::new();
                while let Some(r) = rows.next()? {
                    let id: i64 = r.get(1)?;
                    let body: String = r.get(2)?;
                    v.push(serde_json::from_str(&body).map_err(|_| StoreError::Corrupt {
                        table: "signed_statements",
                        id,
                        field: "body",
                    })?);
                }
                v
            };
            let admin_tokens = {
                let mut st = tx.prepare(
                    "SELECT rowid, name, hash, created_at, expires_at, revoked_at
                     FROM admin_tokens ORDER BY name",
                )?;
                let mut rows = st.query([])?;
                let mut v = Vec::new();
                while let Some(r) = rows.next()? {
                    v.push(admin_token_from_row(r)?);
                }
                v
            };
            let generation = read_generation(&tx)?;
            tx.commit()?;
            Ok(Snapshot {
                hosts,
                tokens,
                map_version,
                policies,
                blocks,
                flow_intervals,
                mode,
                records,
                signed,
                admin_tokens,
                generation,
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
            // IMMEDIATE: the write lock from the start, so the generation read below is the
            // one this transaction commits on (another process cannot commit in between).
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            // An appended-only batch leaves the caller where it was (it has not read what
            // another replica may have committed meanwhile).
            let after = match (d.shared(), generation) {
                (true, _) => bump_generation(&tx, generation)?,
                (false, Some(g)) => g,
                (false, None) => read_generation(&tx)?,
            };
            for e in events {
                insert_event(&tx, kept, e)?;
            }
            for h in &d.hosts {
                put_host(&tx, h)?;
            }
            for t in &d.tokens {
                put_token(&tx, t)?;
            }
            for r in &d.records {
                put_record(&tx, r)?;
            }
            for t in &d.admin_tokens {
                put_admin_token(&tx, t)?;
            }
            for r in &d.signed {
                let (kind, id) = r.key();
                let id = i64::try_from(id).map_err(|_| StoreError::Range("signed statement id"))?;
                let body =
                    serde_json::to_string(r).map_err(|_| StoreError::Range("signed statement"))?;
                tx.execute(
                    "INSERT INTO signed_statements (kind, id, body) VALUES (?1, ?2, ?3)
                     ON CONFLICT (kind, id) DO UPDATE SET body = excluded.body",
                    rusqlite::params![kind, id, body],
                )?;
            }
            if let Some(v) = d.map_version {
                // The highest any replica reached (replicas number their maps on their own).
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES (?1, ?2)
                     ON CONFLICT(key) DO UPDATE SET value = CAST(MAX(CAST(value AS INTEGER),
                        CAST(excluded.value AS INTEGER)) AS TEXT)",
                    rusqlite::params![META_MAP_VERSION, v.to_string()],
                )?;
            }
            if let Some(m) = &d.mode {
                let json = serde_json::to_string(m).map_err(|_| StoreError::Range("mode"))?;
                set_meta(&tx, META_POLICY_MODE, &json)?;
            }
            if let Some(p) = &d.policy {
                tx.execute(
                    "INSERT INTO policies (version, yaml, applied_at, comment)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![
                        to_i64(p.version, "policy version")?,
                        p.yaml,
                        to_i64(p.applied_at, "applied_at")?,
                        p.comment
                    ],
                )?;
            }
            if !d.blocks.is_empty() {
                for b in &d.blocks {
                    let ev = serde_json::to_string(b).map_err(|_| StoreError::Range("block"))?;
                    tx.execute(
                        "INSERT INTO blocks (at, host, event) VALUES (?1, ?2, ?3)",
                        params![to_i64(b.at, "block time")?, b.host, ev],
                    )?;
                }
                tx.execute(
                    "DELETE FROM blocks WHERE id <= (SELECT MAX(id) FROM blocks) - ?1",
                    [BLOCKS_KEPT],
                )?;
            }
            crate::flows::insert(&tx, &d.flows)?;
            tx.commit()?;
            Ok(after)
        })
    }

    fn generation(&self) -> Result<u64, StoreError> {
        self.with(|c| read_generation(c))
    }

    fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.with(|c| get_meta(c, key))
    }

    fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.with(|c| set_meta(c, key, value))
    }

    fn log_event(&self, event: &AuditEvent) -> Result<(), StoreError> {
        self.with(|c| insert_event(c, self.events_kept, event))
    }

    fn recent_events(&self, limit: u32) -> Result<Vec<AuditEvent>, StoreError> {
        self.with(|c| {
            let mut st =
                c.prepare("SELECT at, kind, detail FROM events ORDER BY id DESC LIMIT ?1")?;
            let mut rows = st.query([limit])?;
            let mut v = Vec::new();
            while let Some(r) = rows.next()? {
                let at: i64 = r.get(0)?;
                let kind: String = r.get(1)?;
                v.push(AuditEvent::new(
                    u64::try_from(at).unwrap_or(0),
                    EventKind::from_stored(&kind),
                    r.get::<_, String>(2)?,
                ));
            }
            Ok(v)
        })
    }

    fn flows(&self, q: &FlowFilter) -> Result<Vec<FlowView>, StoreError> {
        self.read(|c| crate::flows::query(c, q))
    }

    fn flow_summary(&self, q: &FlowFilter) -> Result<Vec<FlowView>, StoreError> {
        self.read(|c| crate::flows::summary(c, q))
    }

    fn prune_flows(&self, before: UnixTime, max_rows: u32) -> Result<u64, StoreError> {
        self.with(|c| crate::flows::prune(c, before, max_rows))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshd_tunnel::PublicKey;

    fn host(id: u64) -> Host {
        Host {
            id: HostId(id),
            name: format!("h{id}"),
            public_key: PublicKey([id as u8; 32]),
            ipv4: Ipv4Addr::new(100, 64, 0, id as u8 + 1),
            ipv6: Some("fd00::1".parse().unwrap()),
            labels: [("app".to_string(), "db".to_string())].into(),
            reported_endpoints: vec![
                "192.0.2.1:51820".parse().unwrap(),
                "[2001:db8::1]:51820".parse().unwrap(),
            ],
            listen_port: Some(51820),
            observed_ip: Some("198.51.100.7".parse().unwrap()),
            created_at: 1_700_000_000,
            last_seen: 1_700_000_100,
            removed: false,
            token_id: Some(TokenId(1)),
            quarantined: false,
            revoked: false,
            transparent: true,
            pending_key: None,
            key_rotated_at: None,
        }
    }

    #[test]
    fn a_read_sees_one_snapshot_even_when_a_commit_lands_between_its_statements() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("coordinator.db")).unwrap();
        let count = |c: &Connection| -> Result<i64, StoreError> {
            Ok(c.query_row("SELECT COUNT(*) FROM hosts", [], |r| r.get(0))?)
        };
        let (before, after) = s
            .read(|c| {
                let before = count(c)?;
                s.commit(
                    &Dirty {
                        hosts: vec![host(1)],
                        ..Default::default()
                    },
                    &[],
                )?;
                Ok((before, count(c)?))
            })
            .unwrap();
        assert_eq!(
            (before, after),
            (0, 0),
            "the read saw a commit in its middle"
        );
        assert_eq!(s.read(count).unwrap(), 1, "the next read sees it");
    }

    #[test]
    fn a_full_database_is_disk_full() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("db")).unwrap();
        s.commit(
            &Dirty::default(),
            &[AuditEvent::new(1, EventKind::HostRemoved, "x")],
        )
        .unwrap();
        // SQLite refuses to grow past max_page_count with SQLITE_FULL, as on a full disk.
        s.with(|c| {
            let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
            c.pragma_update(None, "max_page_count", pages)?;
            Ok(())
        })
        .unwrap();
        let big = "x".repeat(64 * 1024);
        let e = s
            .commit(
                &Dirty::default(),
                &[AuditEvent::new(2, EventKind::HostRemoved, big)],
            )
            .unwrap_err();
        assert!(matches!(e, StoreError::DiskFull), "{e:?}");
        assert!(e.to_string().starts_with("disk full"), "{e}");
        assert_eq!(
            s.recent_events(10).unwrap().len(),
            1,
            "nothing of the batch"
        );
    }

    #[test]
    fn database_files_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("coordinator.db");
        let mode = |suffix: &str| {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777
        };
        let s = SqliteStore::open(&path).unwrap();
        s.commit(
            &Dirty::default(),
            &[AuditEvent::new(1, EventKind::HostRemoved, "x")],
        )
        .unwrap();
        for suffix in ["", "-wal", "-shm"] {
            assert_eq!(mode(suffix), 0o600, "coordinator.db{suffix}");
        }
        drop(s);
        // A database from an earlier version (0644) is made private on open.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let s = SqliteStore::open(&path).unwrap();
        s.commit(
            &Dirty::default(),
            &[AuditEvent::new(2, EventKind::HostRemoved, "y")],
        )
        .unwrap();
        for suffix in ["", "-wal", "-shm"] {
            assert_eq!(mode(suffix), 0o600, "coordinator.db{suffix} after reopen");
        }
    }

    #[test]
    fn the_journal_is_wal() {
        // The backend-independent behaviour is in tests/suite.rs (run on SQLite and
        // PostgreSQL); this and the tests above are SQLite's own.
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("coordinator.db")).unwrap();
        let journal: String = s
            .with(|c| Ok(c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?))
            .unwrap();
        assert_eq!(journal, "wal");
        let sync: i64 = s
            .with(|c| Ok(c.query_row("PRAGMA synchronous", [], |r| r.get(0))?))
            .unwrap();
        assert_eq!(sync, 2, "FULL");
    }
}
