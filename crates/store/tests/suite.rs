//! The store test suite, run against both SQLite and PostgreSQL: every test in `suite!` runs
//! as `sqlite::NAME` and `postgres::NAME` (the latter on a throwaway server of its own, see
//! `meshd_lab::postgres`). Below it: the two schemas kept in step, the SQLite → PostgreSQL
//! migration, and PostgreSQL's own failure modes.

use std::net::Ipv4Addr;
use std::ops::Deref;

use meshd_control::api::FlowView;
use meshd_control::cmdb::{HostRecord, RecordId};
use meshd_control::flow::FlowVerdict;
use meshd_control::policy::PolicyRecord;
use meshd_control::state::{AdminToken, Dirty, RuntimeMode, SignedRecord};
use meshd_control::{AuditEvent, EventKind, Host, HostId, Labels, Token, TokenId};
use meshd_policy::{BlockEvent, Direction};
use meshd_store::{
    FlowFilter, PgOptions, PgStore, Snapshot, SqliteStore, Store, StoreError, BLOCKS_KEPT,
    MIGRATIONS, PG_MIGRATIONS,
};
use meshd_tunnel::PublicKey;

/// Where a test's database lives (kept for the test's length: reopening sees the same data).
enum Db {
    Sqlite(tempfile::TempDir),
    Postgres(meshd_lab::postgres::Server),
}

/// An open store of either kind (tests only: the size difference does not matter).
#[allow(clippy::large_enum_variant)]
enum S {
    Sqlite(SqliteStore),
    Pg(PgStore),
}

impl Deref for S {
    type Target = dyn Store;
    fn deref(&self) -> &(dyn Store + 'static) {
        match self {
            S::Sqlite(s) => s,
            S::Pg(s) => s,
        }
    }
}

impl S {
    fn execute(&self, sql: &str) -> u64 {
        match self {
            S::Sqlite(s) => s.execute(sql),
            S::Pg(s) => s.execute(sql),
        }
        .unwrap()
    }
    fn count(&self, table: &str) -> i64 {
        let sql = format!("SELECT COUNT(*) FROM {table}");
        match self {
            S::Sqlite(s) => s.query_i64(&sql),
            S::Pg(s) => s.query_i64(&sql),
        }
        .unwrap()
        .unwrap()
    }
    fn schema_version(&self) -> i64 {
        match self {
            S::Sqlite(s) => s.schema_version(),
            S::Pg(s) => s.schema_version(),
        }
        .unwrap()
    }
    fn with_events_kept(self, n: u32) -> S {
        match self {
            S::Sqlite(s) => S::Sqlite(s.with_events_kept(n)),
            S::Pg(s) => S::Pg(s.with_events_kept(n)),
        }
    }
}

impl Db {
    fn sqlite() -> Db {
        Db::Sqlite(tempfile::tempdir().unwrap())
    }
    fn try_open(&self) -> Result<S, StoreError> {
        Ok(match self {
            Db::Sqlite(d) => S::Sqlite(SqliteStore::open(&d.path().join("coordinator.db"))?),
            Db::Postgres(pg) => S::Pg(PgStore::open(&pg.url())?),
        })
    }
    fn open(&self) -> S {
        self.try_open().unwrap()
    }
}

/// Each `fn name(db: &Db)` becomes the tests `sqlite::name` and `postgres::name`.
macro_rules! suite {
    ($(fn $name:ident($db:ident: &Db) $body:block)*) => {
        $(fn $name($db: &Db) $body)*
        mod sqlite {
            $(#[test] fn $name() { super::$name(&super::Db::sqlite()) })*
        }
        mod postgres {
            $(#[test] fn $name() {
                let pg = meshd_lab::require_postgres!();
                super::$name(&super::Db::Postgres(pg))
            })*
        }
    };
}

fn admin_token(name: &str, hash: u8) -> AdminToken {
    AdminToken {
        name: name.into(),
        hash: [hash; 32],
        created_at: 1_700_000_000,
        expires_at: None,
        revoked_at: None,
    }
}

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

fn token(id: u64) -> Token {
    Token {
        id: TokenId(id),
        labels: [("env".to_string(), "prod".to_string())].into(),
        created_at: 5,
        expires_at: Some(3605),
        uses_left: Some(2),
        revoked: false,
        secret_hash: [id as u8; 32],
    }
}

fn block(at: u64, host: &str) -> BlockEvent {
    BlockEvent {
        at,
        host: host.into(),
        host_labels: Default::default(),
        peer: "p".into(),
        peer_labels: Default::default(),
        direction: Direction::Inbound,
        proto: 6,
        src: "100.64.0.2:40000".parse().unwrap(),
        dst: "100.64.0.1:22".parse().unwrap(),
        reason: meshd_policy::DenyReason::DefaultDeny,
        count: 1,
    }
}

fn policy(v: u64) -> PolicyRecord {
    PolicyRecord {
        version: v,
        yaml: format!("# v{v}\n"),
        applied_at: 100 + v,
        comment: "apply".into(),
    }
}

fn record(id: u64, host: Option<u64>) -> HostRecord {
    HostRecord {
        id: RecordId(id),
        name: (id == 1).then(|| "web-1".to_string()),
        ip: Some(format!("198.18.0.{id}").parse().unwrap()),
        labels: [("app".to_string(), "web".to_string())].into(),
        imported_at: 50,
        host: host.map(HostId),
    }
}

fn signed_host(id: u64) -> SignedRecord {
    use meshd_control::signed::{HostStatement, Sig, Signed, Statement, Succession};
    SignedRecord::Host {
        host: HostId(id),
        signed: Signed {
            statement: Statement::Host(HostStatement {
                key: PublicKey([id as u8; 32]),
                name: format!("h{id}"),
                labels: [("app".to_string(), "db".to_string())].into(),
                at_ms: 1_700_000_000_000 + id,
            }),
            sigs: vec![],
            // A rotated host's own succession is stored with its statement.
            successions: vec![Succession {
                new_key: PublicKey([id as u8 + 1; 32]),
                sig: Sig([7; 64]),
            }],
        },
    }
}

fn labels(app: &str) -> Labels {
    [("app".to_string(), app.to_string())].into()
}

fn flow(host: u64, peer: Option<u64>, port: u16, at: u64) -> FlowView {
    FlowView {
        interval_start: at,
        host: format!("h{host}"),
        host_id: HostId(host),
        host_labels: labels(&format!("a{host}")),
        peer: peer.map(|p| format!("h{p}")),
        peer_id: peer.map(HostId),
        peer_labels: peer.map(|p| labels(&format!("a{p}"))).unwrap_or_default(),
        src: peer.is_none().then(|| "198.18.0.9".parse().unwrap()),
        direction: Direction::Outbound,
        proto: 6,
        port,
        packets: 10,
        bytes: 1000,
        flows: 1,
        first_seen: at,
        last_seen: at + 5,
        verdict: if peer.is_some() {
            FlowVerdict::Allowed
        } else {
            FlowVerdict::Denied
        },
        rule: peer.map(|_| "r".to_string()),
    }
}

fn commit_flows(s: &S, rows: Vec<FlowView>) {
    s.commit(
        &Dirty {
            flows: rows,
            ..Default::default()
        },
        &[],
    )
    .unwrap();
}

fn all(since: u64, host: Option<u64>) -> FlowFilter {
    FlowFilter {
        since,
        host: host.map(HostId),
        limit: 1000,
    }
}

suite! {
    fn replicas_commit_in_turn_fenced_by_the_generation(db: &Db) {
        let (a, b) = (db.open(), db.open());
        let hosts = |ids: &[u64]| Dirty {
            hosts: ids.iter().map(|i| host(*i)).collect(),
            ..Default::default()
        };
        let g0 = a.load().unwrap().generation;
        assert_eq!(g0, 0);
        // PostgreSQL wakes the other replica up; SQLite has no notifications (replicas poll).
        let mut listener = b.listen().map(|l| l.unwrap());
        let g1 = a.commit_at(Some(g0), &hosts(&[1]), &[]).unwrap();
        assert_eq!(g1, g0 + 1);
        assert_eq!(b.generation().unwrap(), g1);
        if let Some(l) = listener.as_mut() {
            assert!(l.wait(std::time::Duration::from_secs(5)).unwrap(), "no NOTIFY");
            assert!(!l.wait(std::time::Duration::from_millis(50)).unwrap());
        }
        // b made its batch on g0: refused, nothing of it stored.
        let e = b.commit_at(Some(g0), &hosts(&[2]), &[]).unwrap_err();
        assert!(
            matches!(e, StoreError::Conflict { expected: 0, found: 1 }),
            "{e}"
        );
        assert_eq!(b.load().unwrap().hosts, vec![host(1)]);
        // Having read g1, b commits.
        let g2 = b.commit_at(Some(g1), &hosts(&[2]), &[]).unwrap();
        assert_eq!(g2, g1 + 1);
        assert_eq!(a.load().unwrap().generation, g2);
        // Appended batches (blocks, flows, events) are not fenced and do not move it.
        let appended = Dirty {
            blocks: vec![block(5, "h1")],
            ..Default::default()
        };
        let ev = AuditEvent::new(9, EventKind::DuplicateConnection, "x");
        assert_eq!(a.commit_at(Some(g0), &appended, &[ev]).unwrap(), g0);
        assert_eq!(a.generation().unwrap(), g2);
        // Two replicas committing on the same generation at once: exactly one wins.
        let (a, b) = (std::sync::Arc::new(a), std::sync::Arc::new(b));
        let racers: Vec<_> = [(a.clone(), 3), (b.clone(), 4)]
            .into_iter()
            .map(|(s, id)| std::thread::spawn(move || s.commit_at(Some(g2), &hosts(&[id]), &[])))
            .collect();
        let results: Vec<_> = racers.into_iter().map(|t| t.join().unwrap()).collect();
        let won = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(won, 1, "{results:?}");
        assert!(results
            .iter()
            .any(|r| matches!(r, Err(StoreError::Conflict { expected, found }) if *expected == g2 && *found == g2 + 1)));
        assert_eq!(a.load().unwrap().hosts.len(), 3);
        assert_eq!(a.generation().unwrap(), g2 + 1);
    }

    fn roundtrip_and_reopen(db: &Db) {
        let mut h2 = host(2);
        // Migration 6: a rotation's pending key and the time of the last one round-trip.
        h2.pending_key = Some(PublicKey([9; 32]));
        h2.key_rotated_at = Some(1_700_000_000);
        {
            let s = db.open();
            assert_eq!(s.schema_version(), MIGRATIONS.len() as i64);
            assert_eq!(s.load().unwrap(), Snapshot::default());
            s.commit(
                &Dirty {
                    hosts: vec![host(1), h2.clone()],
                    tokens: vec![token(1)],
                    map_version: Some(7),
                    ..Default::default()
                },
                &[],
            )
            .unwrap();
            h2.removed = true;
            h2.labels.clear();
            h2.ipv6 = None;
            h2.observed_ip = None;
            h2.listen_port = None;
            s.commit(
                &Dirty {
                    hosts: vec![h2.clone()],
                    ..Default::default()
                },
                &[],
            )
            .unwrap();
            s.set_meta("admin_token_hash", "abc").unwrap();
            s.log_event(&AuditEvent::new(9, EventKind::DuplicateConnection, "host h1"))
                .unwrap();
        }
        let s = db.open();
        let snap = s.load().unwrap();
        assert_eq!(snap.hosts, vec![host(1), h2]);
        assert_eq!(snap.tokens, vec![token(1)]);
        assert_eq!(snap.map_version, 7);
        assert_eq!(s.get_meta("admin_token_hash").unwrap().as_deref(), Some("abc"));
        assert_eq!(s.get_meta("nope").unwrap(), None);
        assert_eq!(
            s.recent_events(5).unwrap(),
            vec![AuditEvent::new(9, EventKind::DuplicateConnection, "host h1")]
        );
        // Migrations are recorded once.
        assert_eq!(s.schema_version(), MIGRATIONS.len() as i64);
        assert_eq!(s.count("schema_migrations"), MIGRATIONS.len() as i64);
    }

    fn signed_statements_persist_and_are_upserted(db: &Db) {
        let s = db.open();
        s.commit(
            &Dirty {
                signed: vec![signed_host(2), signed_host(1)],
                ..Default::default()
            },
            &[],
        )
        .unwrap();
        let mut newer = signed_host(1);
        if let SignedRecord::Host { signed, .. } = &mut newer {
            signed.sigs.clear();
            if let meshd_control::signed::Statement::Host(h) = &mut signed.statement {
                h.at_ms += 1;
            }
        }
        s.commit(
            &Dirty {
                signed: vec![newer.clone()],
                ..Default::default()
            },
            &[],
        )
        .unwrap();
        drop(s);
        assert_eq!(db.open().load().unwrap().signed, vec![newer, signed_host(2)]);
    }

    fn runtime_policy_mode_persists_and_a_corrupt_one_is_an_error(db: &Db) {
        let mode = RuntimeMode {
            all: false,
            groups: vec![[("app".to_string(), "legacy".to_string())].into()],
            changed_at: 7,
        };
        {
            let s = db.open();
            assert_eq!(s.load().unwrap().mode, RuntimeMode::default());
            s.commit(
                &Dirty {
                    mode: Some(mode.clone()),
                    ..Default::default()
                },
                &[],
            )
            .unwrap();
        }
        let s = db.open();
        assert_eq!(s.load().unwrap().mode, mode);
        s.set_meta(meshd_store::META_POLICY_MODE, "{not json").unwrap();
        assert!(matches!(
            s.load(),
            Err(StoreError::Corrupt { field: "policy_mode", .. })
        ));
    }

    fn policies_blocks_and_host_states_persist(db: &Db) {
        let mut h = host(1);
        h.quarantined = true;
        let mut r = host(2);
        r.removed = true;
        r.revoked = true;
        {
            let s = db.open();
            for v in 1..=2 {
                s.commit(
                    &Dirty {
                        policy: Some(policy(v)),
                        ..Default::default()
                    },
                    &[],
                )
                .unwrap();
            }
            s.commit(
                &Dirty {
                    hosts: vec![h.clone(), r.clone()],
                    blocks: (0..(BLOCKS_KEPT as u64 + 5)).map(|i| block(i, "a")).collect(),
                    ..Default::default()
                },
                &[],
            )
            .unwrap();
            // A version is written once.
            assert!(s
                .commit(
                    &Dirty {
                        policy: Some(policy(2)),
                        ..Default::default()
                    },
                    &[]
                )
                .is_err());
        }
        let snap = db.open().load().unwrap();
        assert_eq!(snap.policies, vec![policy(1), policy(2)]);
        assert_eq!(snap.hosts, vec![h, r]);
        assert_eq!(snap.blocks.len(), BLOCKS_KEPT as usize, "pruned to the newest");
        assert_eq!(snap.blocks[0].at, 5);
        assert_eq!(snap.blocks.last().unwrap().at, BLOCKS_KEPT as u64 + 4);
    }

    fn cmdb_records_persist_and_a_bad_batch_stores_none(db: &Db) {
        {
            let s = db.open();
            s.commit(
                &Dirty {
                    records: vec![record(1, None), record(2, None)],
                    ..Default::default()
                },
                &[],
            )
            .unwrap();
            s.commit(
                &Dirty {
                    records: vec![record(2, Some(7))],
                    ..Default::default()
                },
                &[],
            )
            .unwrap();
            // One import is one transaction: a record that cannot be stored fails all of it.
            let mut bad = record(4, None);
            bad.imported_at = u64::MAX;
            assert!(s
                .commit(
                    &Dirty {
                        records: vec![record(3, None), bad],
                        ..Default::default()
                    },
                    &[],
                )
                .is_err());
        }
        let snap = db.open().load().unwrap();
        assert_eq!(snap.records, vec![record(1, None), record(2, Some(7))]);
    }

    fn events_are_pruned_to_the_newest(db: &Db) {
        let s = db.open().with_events_kept(3);
        for i in 0..10 {
            s.log_event(&AuditEvent::new(i, EventKind::HostRemoved, format!("e{i}")))
                .unwrap();
        }
        // Through commit too.
        s.commit(&Dirty::default(), &[AuditEvent::new(10, EventKind::HostRemoved, "e10")])
            .unwrap();
        let ev = s.recent_events(100).unwrap();
        let details: Vec<&str> = ev.iter().map(|e| e.detail.as_str()).collect();
        assert_eq!(details, ["e10", "e9", "e8"]);
        assert_eq!(s.count("events"), 3);
    }

    fn admin_tokens_round_trip_by_name_and_only_their_hash_is_stored(db: &Db) {
        let mut ci = admin_token("ci", 0xab);
        ci.expires_at = Some(1_700_003_600);
        let mut b = admin_token("bootstrap", 1);
        b.revoked_at = Some(1_700_000_500);
        {
            let s = db.open();
            let put = |t: Vec<AdminToken>| {
                s.commit(
                    &Dirty {
                        admin_tokens: t,
                        ..Default::default()
                    },
                    &[],
                )
            };
            put(vec![admin_token("bootstrap", 1), ci.clone()]).unwrap();
            // A revocation upserts the row by name.
            put(vec![b.clone()]).unwrap();
            // Hashes are unique: a second name with the same hash is refused, nothing stored.
            assert!(put(vec![admin_token("other", 0xab)]).is_err());
            assert_eq!(s.count("admin_tokens"), 2);
            assert_eq!(s.count(&format!("admin_tokens WHERE hash = '{}'", "ab".repeat(32))), 1);
        }
        let s = db.open();
        assert_eq!(s.load().unwrap().admin_tokens, vec![b, ci]);
        // A corrupt hash or name is an error naming the column, not a panic.
        s.execute("UPDATE admin_tokens SET hash = 'zz' WHERE name = 'ci'");
        assert!(matches!(
            s.load(),
            Err(StoreError::Corrupt { table: "admin_tokens", field: "hash", .. })
        ));
        s.execute(&format!(
            "UPDATE admin_tokens SET hash = '{}', name = 'Bad Name' WHERE name = 'ci'",
            "cd".repeat(32)
        ));
        assert!(matches!(
            s.load(),
            Err(StoreError::Corrupt { table: "admin_tokens", field: "name", .. })
        ));
    }

    fn corrupt_row_is_an_error_not_a_panic(db: &Db) {
        let s = db.open();
        s.commit(
            &Dirty {
                hosts: vec![host(1)],
                ..Default::default()
            },
            &[],
        )
        .unwrap();
        s.execute("UPDATE hosts SET public_key = 'xx'");
        assert!(matches!(
            s.load(),
            Err(StoreError::Corrupt { table: "hosts", field: "public_key", .. })
        ));
        s.execute(&format!("UPDATE hosts SET public_key = '{}'", host(1).public_key.to_base64()));
        s.execute("UPDATE hosts SET listen_port = 70000");
        assert!(matches!(
            s.load(),
            Err(StoreError::Corrupt { table: "hosts", field: "listen_port", .. })
        ), "a port past u16 is corrupt, not truncated");
    }

    fn a_failed_commit_writes_nothing_of_its_batch(db: &Db) {
        let s = db.open();
        let mut bad = token(2);
        bad.expires_at = Some(u64::MAX);
        let e = s
            .commit(
                &Dirty {
                    hosts: vec![host(1)],
                    tokens: vec![token(1), bad],
                    map_version: Some(3),
                    ..Default::default()
                },
                &[AuditEvent::new(1, EventKind::Other("host_enrolled".into()), "h1")],
            )
            .unwrap_err();
        assert!(matches!(e, StoreError::Range("expires_at")), "{e:?}");
        assert!(e.to_string().contains("value out of range"), "{e}");
        // The database refusing a statement midway (a duplicate policy version) too.
        s.commit(&Dirty { policy: Some(policy(1)), ..Default::default() }, &[]).unwrap();
        let e = s
            .commit(
                &Dirty {
                    hosts: vec![host(1)],
                    policy: Some(policy(1)),
                    ..Default::default()
                },
                &[AuditEvent::new(1, EventKind::Other("x".into()), "x")],
            )
            .unwrap_err();
        assert!(!e.to_string().is_empty());
        let snap = s.load().unwrap();
        assert_eq!((snap.hosts.len(), snap.tokens.len(), snap.map_version), (0, 0, 0));
        assert_eq!(s.recent_events(10).unwrap(), vec![]);
        // A good batch stores its records and events together.
        s.commit(
            &Dirty {
                tokens: vec![token(1)],
                ..Default::default()
            },
            &[AuditEvent::new(2, EventKind::Other("k".into()), "d")],
        )
        .unwrap();
        assert_eq!(s.load().unwrap().tokens, vec![token(1)]);
        assert_eq!(
            s.recent_events(10).unwrap(),
            vec![AuditEvent::new(2, EventKind::Other("k".into()), "d")]
        );
    }

    fn refuses_newer_schema(db: &Db) {
        db.open().execute("INSERT INTO schema_migrations VALUES (99, 'future', 0)");
        assert!(matches!(db.try_open(), Err(StoreError::TooNew { found: 99, .. })));
    }

    fn flows_round_trip_by_time_and_host_and_survive_a_reopen(db: &Db) {
        let rows = vec![
            flow(1, Some(2), 5432, 100),
            flow(2, Some(3), 22, 110),
            flow(3, None, 80, 120),
            flow(1, Some(2), 5432, 130),
        ];
        {
            let s = db.open();
            commit_flows(&s, rows.clone());
            assert_eq!(s.flows(&all(0, None)).unwrap(), rows);
        }
        let s = db.open();
        assert_eq!(s.flows(&all(0, None)).unwrap(), rows, "after a reopen");
        // since: last seen at or after.
        assert_eq!(s.flows(&all(115, None)).unwrap(), rows[1..].to_vec());
        assert_eq!(s.flows(&all(116, None)).unwrap(), rows[2..].to_vec());
        // host: either end.
        assert_eq!(
            s.flows(&all(0, Some(2))).unwrap(),
            rows[..2].iter().chain(&rows[3..]).cloned().collect::<Vec<_>>()
        );
        assert_eq!(s.flows(&all(0, Some(3))).unwrap(), rows[1..3].to_vec());
        // limit: the newest, oldest first.
        let q = FlowFilter { limit: 2, ..all(0, None) };
        assert_eq!(s.flows(&q).unwrap(), rows[2..].to_vec());
        // Label sets are stored once.
        assert_eq!(s.count("flow_labels"), 4, "a1, a2, a3 and {{}}");
        // Start-up gets the recent intervals' row counts.
        let snap = s.load().unwrap();
        let h1: Vec<_> = snap
            .flow_intervals
            .iter()
            .filter(|i| i.host == HostId(1))
            .map(|i| (i.interval_start, i.rows))
            .collect();
        assert_eq!(h1, [(100, 1), (130, 1)]);
    }

    fn the_summary_adds_up_a_window(db: &Db) {
        let s = db.open();
        commit_flows(
            &s,
            vec![
                flow(1, Some(2), 5432, 100),
                flow(1, Some(2), 5432, 110),
                flow(1, Some(2), 22, 120),
                flow(1, Some(2), 5432, 500),
            ],
        );
        let sum = s.flow_summary(&all(0, None)).unwrap();
        assert_eq!(sum.len(), 2);
        let pg = &sum[0];
        assert_eq!(pg.port, 5432);
        assert_eq!((pg.packets, pg.bytes, pg.flows), (30, 3000, 3));
        assert_eq!((pg.interval_start, pg.first_seen, pg.last_seen), (100, 100, 505));
        let sum = s.flow_summary(&all(200, None)).unwrap();
        assert_eq!((sum.len(), sum[0].packets), (1, 10));
        // By host (either end).
        assert_eq!(s.flow_summary(&all(0, Some(2))).unwrap().len(), 2);
        assert!(s.flow_summary(&all(0, Some(9))).unwrap().is_empty());
    }

    fn pruning_deletes_old_rows_in_bounded_batches(db: &Db) {
        let s = db.open();
        commit_flows(&s, (0..25).map(|i| flow(1, Some(2), 1, i * 10)).collect());
        // Rows last seen before 105 (i*10+5 < 105: i = 0..=9): 10 of them, 4 per batch.
        assert_eq!(s.prune_flows(105, 4).unwrap(), 4);
        assert_eq!(s.prune_flows(105, 4).unwrap(), 4);
        assert_eq!(s.prune_flows(105, 4).unwrap(), 2);
        assert_eq!(s.prune_flows(105, 4).unwrap(), 0);
        let left = s.flows(&all(0, None)).unwrap();
        assert_eq!(left.len(), 15);
        assert_eq!(left[0].interval_start, 100);
    }

    fn a_failed_commit_stores_no_flow_rows(db: &Db) {
        let s = db.open();
        let mut bad = flow(1, Some(2), 1, 10);
        bad.bytes = u64::MAX;
        let e = s
            .commit(
                &Dirty {
                    flows: vec![flow(1, Some(2), 1, 5), bad],
                    ..Default::default()
                },
                &[],
            )
            .unwrap_err();
        assert!(matches!(e, StoreError::Range("bytes")), "{e:?}");
        assert!(s.flows(&all(0, None)).unwrap().is_empty());
        // A corrupt verdict reads back as an error, not a panic.
        commit_flows(&s, vec![flow(1, Some(2), 1, 5)]);
        s.execute("UPDATE flows SET verdict = 9");
        assert!(matches!(
            s.flows(&all(0, None)),
            Err(StoreError::Corrupt { table: "flows", field: "verdict", .. })
        ));
    }
}

// ---- The two schemas in step ----

/// (table, column, not null) of a migrated SQLite database, sorted.
fn sqlite_columns() -> Vec<(String, String, bool)> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("schema.db");
    drop(SqliteStore::open(&path).unwrap());
    let c = rusqlite::Connection::open(&path).unwrap();
    let mut tables: Vec<String> = c
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    tables.sort();
    let mut v = Vec::new();
    for t in tables {
        let mut st = c
            .prepare(&format!(
                "SELECT name, \"notnull\", pk FROM pragma_table_info('{t}')"
            ))
            .unwrap();
        let cols = st
            .query_map([], |r| {
                let (n, nn, pk): (String, bool, i64) = (r.get(0)?, r.get(1)?, r.get(2)?);
                // A primary key is never null (SQLite's INTEGER PRIMARY KEY is the rowid).
                Ok((t.clone(), n, nn || pk > 0))
            })
            .unwrap();
        v.extend(cols.map(Result::unwrap));
    }
    v.sort();
    v
}

fn pg_columns(url: &str) -> Vec<(String, String, bool)> {
    drop(PgStore::open(url).unwrap());
    let mut c = ::postgres::Client::connect(url, ::postgres::NoTls).unwrap();
    let mut v: Vec<(String, String, bool)> = c
        .query(
            "SELECT table_name::TEXT, column_name::TEXT, is_nullable::TEXT = 'NO'
             FROM information_schema.columns WHERE table_schema = current_schema()",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    v.sort();
    v
}

#[test]
fn the_migrations_are_twins() {
    fn versions(m: &'static [(i64, &str, &str)]) -> Vec<(i64, &'static str)> {
        m.iter().map(|m| (m.0, m.1)).collect()
    }
    assert_eq!(
        versions(MIGRATIONS),
        versions(PG_MIGRATIONS),
        "every SQLite migration needs its PostgreSQL twin (crates/store/src/migrations_pg.rs), same version and name"
    );
    let pg = meshd_lab::require_postgres!();
    let sqlite = sqlite_columns();
    let postgres = pg_columns(&pg.url());
    let only = |a: &[(String, String, bool)], b: &[(String, String, bool)]| {
        a.iter()
            .filter(|x| !b.contains(x))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        (only(&sqlite, &postgres), only(&postgres, &sqlite)),
        (vec![], vec![]),
        "(table, column, not null) only in SQLite, only in PostgreSQL"
    );
    assert!(sqlite.len() > 50, "{sqlite:?}");
}

// ---- SQLite → PostgreSQL ----

/// A store with some of everything, through the trait as the coordinator writes it.
fn populate(s: &dyn Store) {
    let mut h2 = host(2);
    h2.pending_key = Some(PublicKey([9; 32]));
    h2.key_rotated_at = Some(1_700_000_500);
    h2.quarantined = true;
    let mut h3 = host(3);
    h3.removed = true;
    h3.revoked = true;
    h3.ipv6 = None;
    h3.listen_port = None;
    h3.token_id = None;
    let mut t2 = token(2);
    t2.expires_at = None;
    t2.uses_left = None;
    t2.revoked = true;
    for v in 1..=3 {
        s.commit(
            &Dirty {
                policy: Some(policy(v)),
                ..Default::default()
            },
            &[AuditEvent::new(
                v,
                EventKind::Other("policy_applied".into()),
                format!("v{v}"),
            )],
        )
        .unwrap();
    }
    s.commit(
        &Dirty {
            hosts: vec![host(1), h2, h3],
            tokens: vec![token(1), t2],
            map_version: Some(42),
            blocks: (0..7).map(|i| block(1000 + i, "h1")).collect(),
            flows: vec![
                flow(1, Some(2), 5432, 100),
                flow(2, Some(1), 22, 110),
                flow(3, None, 80, 120),
            ],
            mode: Some(RuntimeMode {
                all: false,
                groups: vec![labels("legacy")],
                changed_at: 9,
            }),
            records: vec![record(1, Some(1)), record(2, None)],
            signed: vec![signed_host(1), signed_host(2)],
            admin_tokens: vec![admin_token("bootstrap", 1), {
                let mut t = admin_token("ci", 2);
                t.expires_at = Some(1_700_003_600);
                t.revoked_at = Some(1_700_000_100);
                t
            }],
            ..Default::default()
        },
        &[AuditEvent::new(50, EventKind::HostRemoved, "h3")],
    )
    .unwrap();
    s.set_meta(meshd_store::META_ADMIN_TOKEN_HASH, "0123abcd")
        .unwrap();
    s.log_event(&AuditEvent::new(60, EventKind::DuplicateConnection, "h1"))
        .unwrap();
    // Pruning leaves gaps in the ids.
    s.prune_flows(106, 1).unwrap();
}

#[test]
fn migration_to_postgres_round_trips_a_populated_store() {
    let pg = meshd_lab::require_postgres!();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coordinator.db");
    let src = SqliteStore::open(&path).unwrap();
    populate(&src);
    let counts = meshd_store::transfer::sqlite_to_postgres(&path, &pg.url()).unwrap();
    let n = |t: &str| counts.iter().find(|c| c.table == t).map(|c| c.rows);
    assert_eq!(n("hosts"), Some(3));
    assert_eq!(n("tokens"), Some(2));
    assert_eq!(n("policies"), Some(3));
    assert_eq!(n("events"), Some(5));
    assert_eq!(n("blocks"), Some(7));
    assert_eq!(n("flows"), Some(2));
    assert_eq!(n("cmdb_records"), Some(2));
    assert_eq!(n("signed_statements"), Some(2));
    assert_eq!(n("admin_tokens"), Some(2));
    assert_eq!(
        n("meta"),
        Some(4),
        "map version, mode, admin token hash, generation"
    );
    assert_eq!(counts.len(), 11, "every table: {counts:?}");

    let dst = PgStore::open(&pg.url()).unwrap();
    let (a, b) = (src.load().unwrap(), dst.load().unwrap());
    assert_eq!(a.hosts.len(), 3);
    assert_eq!(a, b, "the same snapshot from both");
    assert_eq!(
        src.recent_events(100).unwrap(),
        dst.recent_events(100).unwrap()
    );
    assert_eq!(
        src.flows(&all(0, None)).unwrap(),
        dst.flows(&all(0, None)).unwrap()
    );
    assert_eq!(
        dst.get_meta(meshd_store::META_ADMIN_TOKEN_HASH)
            .unwrap()
            .as_deref(),
        Some("0123abcd")
    );
    // The store goes on from there: new ids follow the copied ones (no key clash).
    dst.commit(
        &Dirty {
            blocks: vec![block(2000, "h2")],
            flows: vec![flow(1, Some(2), 443, 200)],
            ..Default::default()
        },
        &[AuditEvent::new(70, EventKind::HostRemoved, "after")],
    )
    .unwrap();
    assert_eq!(dst.recent_events(1).unwrap()[0].detail, "after");
    assert_eq!(dst.load().unwrap().blocks.last().unwrap().at, 2000);
    assert_eq!(dst.flows(&all(0, None)).unwrap().len(), 3);

    // A second run refuses the now non-empty target and changes nothing.
    let e = meshd_store::transfer::sqlite_to_postgres(&path, &pg.url()).unwrap_err();
    assert!(
        matches!(e, meshd_store::transfer::TransferError::NotEmpty { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("not empty"), "{e}");
    assert_eq!(dst.recent_events(100).unwrap().len(), 6);
}

#[test]
fn migration_needs_an_existing_source() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.db");
    let e = meshd_store::transfer::sqlite_to_postgres(&path, "postgres://u@127.0.0.1:1/db")
        .unwrap_err();
    assert!(e.to_string().contains("no such SQLite database"), "{e}");
    assert!(!path.exists(), "not created");
}

// ---- PostgreSQL's own failure modes ----

#[test]
fn postgres_unreachable_is_an_error_not_a_hang() {
    let mut pg = meshd_lab::require_postgres!();
    let opts = PgOptions {
        connect_timeout: std::time::Duration::from_secs(2),
        ..Default::default()
    };
    let s = PgStore::open_with(&pg.url(), &opts).unwrap();
    s.commit(
        &Dirty {
            hosts: vec![host(1)],
            ..Default::default()
        },
        &[],
    )
    .unwrap();
    pg.stop();
    let start = std::time::Instant::now();
    let e = s.load().unwrap_err();
    assert!(matches!(e, StoreError::Unreachable(_)), "{e:?}");
    assert!(
        e.to_string().contains("PostgreSQL server is unreachable"),
        "{e}"
    );
    let e = s
        .commit(
            &Dirty {
                hosts: vec![host(2)],
                ..Default::default()
            },
            &[],
        )
        .unwrap_err();
    assert!(matches!(e, StoreError::Unreachable(_)), "{e:?}");
    assert!(start.elapsed() < std::time::Duration::from_secs(20));
    // Opening fails the same way.
    assert!(matches!(
        PgStore::open_with(&pg.url(), &opts),
        Err(StoreError::Unreachable(_))
    ));
    // Back up: the same store reconnects, and the failed commit stored nothing.
    pg.restart().unwrap();
    assert_eq!(s.load().unwrap().hosts, vec![host(1)]);
}

#[test]
fn a_bad_postgres_url_is_an_error_without_its_password() {
    let e =
        PgStore::open("postgres://u:hunter2@127.0.0.1:5432/db?connect_timeout=abc").unwrap_err();
    assert!(matches!(e, StoreError::BadUrl(_)), "{e:?}");
    assert!(!e.to_string().contains("hunter2"), "{e}");
}

// ---- Commit latency, SQLite against PostgreSQL ----

fn latency(name: &str, s: &dyn Store, n: usize) {
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let mut h = host(1 + (i % 50) as u64);
        h.last_seen += i as u64;
        let d = Dirty {
            hosts: vec![h],
            map_version: Some(i as u64),
            ..Default::default()
        };
        let ev = [AuditEvent::new(
            i as u64,
            EventKind::Other("bench".into()),
            "x",
        )];
        let t = std::time::Instant::now();
        s.commit(&d, &ev).unwrap();
        times.push(t.elapsed());
    }
    times.sort();
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    println!(
        "commit latency {name}: n={n} median={:?} p99={:?} max={:?}",
        at(0.5),
        at(0.99),
        times[times.len() - 1]
    );
}

/// `cargo test -p meshd-store --test suite commit_latency -- --ignored --nocapture`
#[test]
#[ignore = "measurement: run with --ignored --nocapture"]
fn commit_latency_sqlite_and_postgres() {
    let n = 500;
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("bench.db")).unwrap();
    latency("sqlite (WAL, synchronous=FULL)", &s, n);
    let pg = meshd_lab::require_postgres!();
    let p = PgStore::open(&pg.url()).unwrap();
    latency("postgres (loopback TCP, synchronous_commit=on)", &p, n);
}
