//! `meshd coordinator migrate --from sqlite:PATH --to postgres://…`: the command moves a
//! store, prints verified counts, hides the password, and refuses a non-empty target.

use std::process::Command;

use meshd_control::state::Dirty;
use meshd_control::{AuditEvent, EventKind, Token, TokenId};
use meshd_store::{SqliteStore, Store};

fn meshd(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_meshd"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn migrate_moves_a_sqlite_store_to_postgres_once() {
    let pg = meshd_lab::require_postgres!();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coordinator.db");
    {
        let s = SqliteStore::open(&path).unwrap();
        s.commit(
            &Dirty {
                tokens: vec![Token {
                    id: TokenId(1),
                    labels: Default::default(),
                    created_at: 1,
                    expires_at: None,
                    uses_left: Some(3),
                    revoked: false,
                    secret_hash: [7; 32],
                }],
                map_version: Some(4),
                ..Default::default()
            },
            &[
                AuditEvent::new(1, EventKind::HostRemoved, "a"),
                AuditEvent::new(2, EventKind::HostRemoved, "b"),
            ],
        )
        .unwrap();
    }
    // A password in the URL (the throwaway server trusts loopback and ignores it).
    let url = pg.url().replace("meshd@", "meshd:hunter2@");
    let from = format!("sqlite:{}", path.display());
    let (ok, out, err) = meshd(&["coordinator", "migrate", "--from", &from, "--to", &url]);
    assert!(ok, "stdout: {out}\nstderr: {err}");
    let rows = |table: &str| {
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(table))
            .and_then(|l| l.split_whitespace().nth(1))
            .map(str::to_string)
    };
    assert_eq!(rows("tokens").as_deref(), Some("1"), "{out}");
    assert_eq!(rows("events").as_deref(), Some("2"), "{out}");
    assert_eq!(rows("hosts").as_deref(), Some("0"), "{out}");
    assert!(out.contains("every count verified"), "{out}");
    assert!(
        !out.contains("hunter2") && !err.contains("hunter2"),
        "{out}{err}"
    );

    // Again: the target has data now.
    let (ok, out, err) = meshd(&["coordinator", "migrate", "--from", &from, "--to", &url]);
    assert!(!ok, "{out}");
    assert!(err.contains("not empty"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");

    // Only SQLite to PostgreSQL.
    let (ok, _, err) = meshd(&["coordinator", "migrate", "--from", &url, "--to", &from]);
    assert!(!ok);
    assert!(err.contains("--from sqlite:PATH --to"), "{err}");
}
