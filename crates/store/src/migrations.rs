//! Versioned schema migrations. Each runs once, in order, inside a transaction, and is
//! recorded in `schema_migrations`. Never edit a released migration: append a new one.

/// (version, name, SQL).
pub const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "initial schema",
        r#"
-- Enrolled hosts. Removed hosts are kept (removed = 1) for audit and so their key cannot resume.
CREATE TABLE hosts (
    id          INTEGER PRIMARY KEY,       -- HostId
    name        TEXT    NOT NULL,          -- unique among non-removed hosts (enforced by the core)
    public_key  TEXT    NOT NULL,          -- WireGuard public key, base64
    ipv4        TEXT    NOT NULL,          -- overlay IPv4 from the pool
    ipv6        TEXT,                      -- overlay IPv6, if the pool has a v6 prefix
    labels      TEXT    NOT NULL,          -- JSON object of string → string
    reported    TEXT    NOT NULL,          -- JSON array of "ip:port" the agent reported
    listen_port INTEGER,                   -- WireGuard listen port
    observed_ip TEXT,                      -- control connection's last source IP
    created_at  INTEGER NOT NULL,          -- Unix seconds
    last_seen   INTEGER NOT NULL,          -- Unix seconds
    removed     INTEGER NOT NULL DEFAULT 0,
    token_id    INTEGER                    -- token used to enrol
);
CREATE INDEX hosts_public_key ON hosts(public_key);

-- Join tokens. Only the SHA-256 of the secret is stored.
CREATE TABLE tokens (
    id          INTEGER PRIMARY KEY,       -- TokenId
    labels      TEXT    NOT NULL,          -- JSON object given to enrolling hosts
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER,                   -- NULL: never
    uses_left   INTEGER,                   -- NULL: unlimited
    revoked     INTEGER NOT NULL DEFAULT 0,
    secret_hash BLOB    NOT NULL UNIQUE    -- SHA-256(secret)
);

-- Small key/value settings: admin token hash, map version.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Append-only audit log.
CREATE TABLE events (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    at     INTEGER NOT NULL,
    kind   TEXT    NOT NULL,
    detail TEXT    NOT NULL
);
"#,
    ),
    (
        2,
        "label policy: versions, quarantine/revoke, block log",
        r#"
-- Quarantined hosts are in nobody's map; revoked hosts (also removed) have their key refused.
ALTER TABLE hosts ADD COLUMN quarantined INTEGER NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN revoked     INTEGER NOT NULL DEFAULT 0;

-- Applied policy versions; the highest is current. Rollback appends a copy.
CREATE TABLE policies (
    version    INTEGER PRIMARY KEY,       -- from 1
    yaml       TEXT    NOT NULL,          -- the file as applied
    applied_at INTEGER NOT NULL,          -- Unix seconds
    comment    TEXT    NOT NULL           -- "apply", "rollback to N"
);

-- Denied flows reported by agents; pruned to the newest BLOCKS_KEPT rows on every insert.
CREATE TABLE blocks (
    id    INTEGER PRIMARY KEY AUTOINCREMENT,
    at    INTEGER NOT NULL,               -- Unix seconds of the first folded packet
    host  TEXT    NOT NULL,               -- reporting host's name
    event TEXT    NOT NULL                -- JSON meshd_policy::BlockEvent
);
CREATE INDEX blocks_at ON blocks(at);
"#,
    ),
    (
        3,
        "transparent mode",
        r#"
-- The agent runs in transparent mode (encrypts traffic to peers' underlay addresses).
ALTER TABLE hosts ADD COLUMN transparent INTEGER NOT NULL DEFAULT 0;
"#,
    ),
    (
        4,
        "flow records",
        r#"
-- Label sets of flow rows, each stored once (rows refer to them by id; never pruned: there are
-- as many as distinct label sets ever reported, a handful per label group).
CREATE TABLE flow_labels (
    id     INTEGER PRIMARY KEY,
    labels TEXT NOT NULL UNIQUE           -- JSON object of string -> string
);

-- Flow records: one reporting host's aggregate of one (peer, direction, proto, port, verdict)
-- over one interval. By host id, name and labels, never by address, except `src` of a
-- plaintext drop (no identity). Pruned by age (`flow_retention`) in bounded batches.
CREATE TABLE flows (
    id             INTEGER PRIMARY KEY,
    interval_start INTEGER NOT NULL,      -- Unix seconds
    host_id        INTEGER NOT NULL,      -- reporting host (HostId)
    host_name      TEXT    NOT NULL,      -- its name when stored
    host_labels    INTEGER NOT NULL,      -- flow_labels.id (its labels when stored)
    peer_id        INTEGER,               -- NULL: plaintext drop
    peer_name      TEXT,
    peer_labels    INTEGER NOT NULL,      -- flow_labels.id ({} for a plaintext drop)
    src            TEXT,                  -- plaintext drop only: source address
    outbound       INTEGER NOT NULL,      -- 1: the reporting host opened the flows
    proto          INTEGER NOT NULL,      -- IP protocol number
    port           INTEGER NOT NULL,      -- responder port (0 for ICMP)
    packets        INTEGER NOT NULL,
    bytes          INTEGER NOT NULL,
    flows          INTEGER NOT NULL,
    first_seen     INTEGER NOT NULL,
    last_seen      INTEGER NOT NULL,
    verdict        INTEGER NOT NULL,      -- 0 allowed, 1 denied, 2 would_deny
    rule           TEXT                   -- admitting rule (allowed)
);
CREATE INDEX flows_last_seen ON flows(last_seen);           -- time ranges, pruning
CREATE INDEX flows_host ON flows(host_id, last_seen);       -- ?host= (reporting end)
CREATE INDEX flows_peer ON flows(peer_id, last_seen);       -- ?host= (other end)
"#,
    ),
    (
        5,
        "cmdb host records",
        r#"
-- Host records imported from a CMDB (`meshctl import`): labels for the host with this name or
-- underlay address, enrolled or not yet. Upserted by id; an import is one transaction.
CREATE TABLE cmdb_records (
    id          INTEGER PRIMARY KEY,       -- RecordId
    name        TEXT,                      -- host name, or NULL (matched by address only)
    ip          TEXT,                      -- underlay IP address, or NULL
    labels      TEXT    NOT NULL,          -- JSON object of string -> string
    imported_at INTEGER NOT NULL,          -- Unix seconds of the last import naming it
    host_id     INTEGER                    -- the enrolled host it was applied to
);
"#,
    ),
    (
        6,
        "key rotation",
        r#"
-- Key rotation (issue 17): the proved next key while the host switches to it (peers accept
-- both), and when the key last changed by rotation (NULL: the enrolment key).
ALTER TABLE hosts ADD COLUMN pending_key    TEXT;     -- WireGuard public key, base64
ALTER TABLE hosts ADD COLUMN key_rotated_at INTEGER;  -- Unix seconds
"#,
    ),
    (
        7,
        "signed policy: admin-signed statements",
        r#"
-- Admin-signed statements (issue 17): the admin key-set chain (kind 'key_set', id = seq), each
-- policy version's statement (kind 'policy', id = version) and each host's current name and
-- labels statement (kind 'host', id = host id). body: JSON meshd_control::state::SignedRecord.
-- Agents verify every statement themselves: editing this table (or any other) cannot widen
-- anyone's access, only withhold updates.
CREATE TABLE signed_statements (
    kind TEXT    NOT NULL,
    id   INTEGER NOT NULL,
    body TEXT    NOT NULL,
    PRIMARY KEY (kind, id)
);
"#,
    ),
    (
        8,
        "named admin tokens",
        r#"
-- Named admin tokens (issue 17): who may use the admin API. Only the SHA-256 of the token
-- string is stored (lowercase hex), never the token. The token of <state-dir>/admin.token is
-- the row named 'bootstrap', added by the coordinator at start-up when missing. Names are
-- never reused (a revoked row stays, for the audit log).
CREATE TABLE admin_tokens (
    name       TEXT    PRIMARY KEY,       -- [a-z0-9._-]{1,64}
    hash       TEXT    NOT NULL UNIQUE,   -- SHA-256(token), 64 lowercase hex digits
    created_at INTEGER NOT NULL,          -- Unix seconds
    expires_at INTEGER,                   -- Unix seconds; NULL: never
    revoked_at INTEGER                    -- Unix seconds; NULL: not revoked
);
"#,
    ),
];
