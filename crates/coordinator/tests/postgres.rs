//! The coordinator on PostgreSQL (`--db postgres://…`): agents enrol, a restart keeps the
//! hosts, and an installation moved from SQLite (`meshd coordinator migrate`) goes on there.
//! Each test runs a throwaway server of its own (`meshd_lab::postgres`).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use meshd_agent::{enrol, spawn_session, SessionConfig, SessionHandle, SessionState};
use meshd_control::api::{HostView, TokenCreateRequest};
use meshd_control::proto::EndpointReport;
use meshd_control::{JoinToken, NetworkMap};
use meshd_coordinator::{start, AdminOp, AdminReply, CoordinatorHandle, CoordinatorOptions};
use meshd_store::{DbSpec, PgStore};
use meshd_tunnel::PrivateKey;

/// A UDP port on 127.0.0.1 below the ephemeral range, free when asked (the restarted
/// coordinator binds it again). Each call starts its search elsewhere, so the tests of this
/// binary, running at once, do not pick the same one before either binds it.
fn fixed_port() -> u16 {
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let start = (std::process::id() + 7_000 + call * 1_000) % 12_000;
    (0..12_000)
        .map(|i| 20_000 + ((start + i) % 12_000) as u16)
        .find(|&p| std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok())
        .expect("a free UDP port in 20000..32000")
}

fn options(dir: &Path, listen: SocketAddr, db: Option<DbSpec>) -> CoordinatorOptions {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut o = CoordinatorOptions::new(dir);
    o.listen = listen;
    o.admin_listen = "127.0.0.1:0".parse().unwrap();
    o.db = db;
    o
}

/// Starts, retrying while the old endpoint's socket is still closing after a stop.
async fn start_on(dir: &Path, listen: SocketAddr, db: Option<DbSpec>) -> CoordinatorHandle {
    let mut last = None;
    for _ in 0..50 {
        match start(options(dir, listen, db.clone())).await {
            Ok(c) => return c,
            Err(e) => {
                last = Some(format!("{e:#}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    panic!("the coordinator did not start within 5 s: {last:?}");
}

fn ep() -> EndpointReport {
    EndpointReport {
        addrs: vec![SocketAddr::from(([192, 0, 2, 1], 1))],
        listen_port: Some(51820),
        transparent: false,
    }
}

async fn join(t: &JoinToken, name: &str) -> SessionHandle {
    let key = PrivateKey::generate();
    let e = enrol(t, name, &key, ep()).await.unwrap();
    spawn_session(SessionConfig::new(
        e.coordinator,
        e.coordinator_key,
        key,
        ep(),
    ))
}

async fn wait_map(s: &SessionHandle, f: impl Fn(&NetworkMap) -> bool) {
    let mut rx = s.map();
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if rx.borrow_and_update().as_ref().is_some_and(&f) {
                return;
            }
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("map condition not reached in time");
}

async fn wait_connected(s: &SessionHandle) {
    let mut rx = s.state();
    tokio::time::timeout(
        Duration::from_secs(20),
        rx.wait_for(|s| matches!(s, SessionState::Connected { .. })),
    )
    .await
    .expect("the agent did not reconnect")
    .unwrap();
}

async fn hosts(c: &CoordinatorHandle) -> Vec<HostView> {
    let Ok(AdminReply::Hosts(h)) = c.admin(AdminOp::ListHosts).await.unwrap() else {
        panic!("ListHosts")
    };
    h
}

/// Two agents enrolled with labels and a policy, on `c`.
async fn populate(c: &CoordinatorHandle) -> (SessionHandle, SessionHandle) {
    let yaml = "rules:\n  - {name: all, from: {}, to: {}, ports: [any]}\n";
    c.admin(AdminOp::PolicyApply(yaml.into()))
        .await
        .unwrap()
        .unwrap();
    let t = JoinToken::parse(
        &c.create_token(TokenCreateRequest {
            labels: [("app".into(), "db".into())].into(),
            uses: Some(5),
            ..Default::default()
        })
        .await
        .unwrap()
        .token,
    )
    .unwrap();
    let a = join(&t, "a").await;
    let b = join(&t, "b").await;
    wait_map(&a, |m| m.peers.len() == 1).await;
    c.admin(AdminOp::Label(
        "b".into(),
        [("tier".into(), "1".into())].into(),
    ))
    .await
    .unwrap()
    .unwrap();
    wait_map(&a, |m| m.peers[0].labels.contains_key("tier")).await;
    (a, b)
}

/// What the restarted coordinator must still have.
async fn check_kept(c: &CoordinatorHandle, a: &SessionHandle, b: &SessionHandle) {
    for s in [a, b] {
        wait_connected(s).await;
    }
    wait_map(a, |m| {
        m.peers.len() == 1 && m.peers[0].labels.get("tier").map(String::as_str) == Some("1")
    })
    .await;
    let h = hosts(c).await;
    let names: Vec<&str> = h.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert!(h
        .iter()
        .all(|h| h.labels.get("app").map(String::as_str) == Some("db")));
    let Ok(AdminReply::Tokens(toks)) = c.admin(AdminOp::ListTokens).await.unwrap() else {
        panic!("ListTokens")
    };
    assert_eq!(toks.len(), 1);
    assert_eq!(toks[0].uses_left, Some(3));
    let Ok(AdminReply::Json(history)) = c.admin(AdminOp::PolicyHistory).await.unwrap() else {
        panic!("PolicyHistory")
    };
    assert_eq!(
        history.as_array().map(Vec::len),
        Some(1),
        "policy history: {history}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_on_postgres_enrols_agents_and_keeps_them_across_a_restart() {
    let pg = meshd_lab::require_postgres!();
    let dir = tempfile::tempdir().unwrap();
    let db = Some(DbSpec::Postgres(pg.url()));
    let listen = SocketAddr::from(([127, 0, 0, 1], fixed_port()));
    let c = start_on(dir.path(), listen, db.clone()).await;
    let key = c.public_key();
    let (a, b) = populate(&c).await;
    c.stop().await;

    // In PostgreSQL, not in a SQLite file of the state directory.
    assert!(!dir.path().join("coordinator.db").exists());
    // The sync client blocks: off the async runtime, as the coordinator calls it.
    let url = pg.url();
    let n = tokio::task::spawn_blocking(move || {
        PgStore::open(&url)
            .unwrap()
            .query_i64("SELECT COUNT(*) FROM hosts")
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(n, Some(2));

    let c = start_on(dir.path(), listen, db).await;
    assert_eq!(c.public_key(), key, "the key stays in the state directory");
    check_kept(&c, &a, &b).await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_installation_migrated_from_sqlite_goes_on_on_postgres() {
    let pg = meshd_lab::require_postgres!();
    let dir = tempfile::tempdir().unwrap();
    let listen = SocketAddr::from(([127, 0, 0, 1], fixed_port()));
    let c = start_on(dir.path(), listen, None).await;
    let (a, b) = populate(&c).await;
    c.stop().await;

    let (path, url) = (dir.path().join("coordinator.db"), pg.url());
    let counts =
        tokio::task::spawn_blocking(move || meshd_store::transfer::sqlite_to_postgres(&path, &url))
            .await
            .unwrap()
            .unwrap();
    let hosts_copied = counts.iter().find(|c| c.table == "hosts").map(|c| c.rows);
    assert_eq!(hosts_copied, Some(2), "{counts:?}");

    // Set the SQLite file aside: the coordinator must run from PostgreSQL alone.
    std::fs::rename(
        dir.path().join("coordinator.db"),
        dir.path().join("coordinator.db.moved"),
    )
    .unwrap();
    let c = start_on(dir.path(), listen, Some(DbSpec::Postgres(pg.url()))).await;
    check_kept(&c, &a, &b).await;
    c.stop().await;
}
