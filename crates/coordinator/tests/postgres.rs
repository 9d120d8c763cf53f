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

fn label_of<'a>(m: &'a NetworkMap, key: &str) -> Option<&'a str> {
    m.peers
        .first()
        .and_then(|p| p.labels.get(key))
        .map(String::as_str)
}

async fn label(c: &CoordinatorHandle, host: &str, k: &str, v: &str) {
    c.admin(AdminOp::Label(host.into(), [(k.into(), v.into())].into()))
        .await
        .unwrap()
        .unwrap();
}

/// Issue 18, replicas: two coordinators on one database. An agent enrolled through either is
/// a peer of an agent on the other; a change made through one reaches agents connected to the
/// other (LISTEN/NOTIFY, then a reload); two changes made at once through both land (the
/// loser of the commit race is refused with a conflict, caught up and run again), and no
/// agent session is torn down on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_one_database_follow_each_others_changes() {
    // RUST_LOG=meshd_coordinator=debug shows the replicas following each other.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let pg = meshd_lab::require_postgres!();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let db = Some(DbSpec::Postgres(pg.url()));
    let listen_a = SocketAddr::from(([127, 0, 0, 1], fixed_port()));
    let listen_b = SocketAddr::from(([127, 0, 0, 1], fixed_port()));
    let a = start_on(dir_a.path(), listen_a, db.clone()).await;
    // Replicas share the coordinator's identity: B starts with A's key file.
    let key_file = meshd_coordinator::KEY_FILE;
    std::fs::copy(dir_a.path().join(key_file), dir_b.path().join(key_file)).unwrap();
    let b = start_on(dir_b.path(), listen_b, db.clone()).await;
    assert_eq!(a.public_key(), b.public_key());

    let yaml = "rules:\n  - {name: all, from: {}, to: {}, ports: [any]}\n";
    a.admin(AdminOp::PolicyApply(yaml.into()))
        .await
        .unwrap()
        .unwrap();
    // A token made through A works on either replica.
    let via_a = JoinToken::parse(
        &a.create_token(TokenCreateRequest {
            uses: Some(5),
            ..Default::default()
        })
        .await
        .unwrap()
        .token,
    )
    .unwrap();
    let via_b = JoinToken {
        control: listen_b,
        ..via_a.clone()
    };
    // B knows the token once it followed A's commit (an agent's knock with a token the
    // replica has not seen yet is dropped, as any stranger's).
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let Ok(AdminReply::Tokens(t)) = b.admin(AdminOp::ListTokens).await.unwrap() else {
            panic!("ListTokens")
        };
        if !t.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "B never saw A's token"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let h1 = join(&via_a, "h1").await;
    let h2 = join(&via_b, "h2").await;
    wait_map(&h1, |m| m.peers.len() == 1).await;
    wait_map(&h2, |m| m.peers.len() == 1).await;
    // Any moment an agent is not connected from here on is recorded.
    let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for s in [&h1, &h2] {
        let (mut rx, dropped) = (s.state(), dropped.clone());
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                if !matches!(*rx.borrow(), SessionState::Connected { .. }) {
                    dropped.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
    }

    // A change through A reaches h2 (on B), and one through B reaches h1 (on A).
    let t = std::time::Instant::now();
    label(&a, "h1", "tier", "1").await;
    wait_map(&h2, |m| label_of(m, "tier") == Some("1")).await;
    let a_to_b = t.elapsed();
    let t = std::time::Instant::now();
    label(&b, "h2", "tier", "2").await;
    wait_map(&h1, |m| label_of(m, "tier") == Some("2")).await;
    let b_to_a = t.elapsed();
    println!("change through A seen on B's agent after {a_to_b:?}, B to A {b_to_a:?}");

    // Both replicas change at once: both land, in one order, and both replicas agree.
    for round in 0..5 {
        let v = round.to_string();
        let (ra, rb) = tokio::join!(
            a.admin(AdminOp::Label(
                "h1".into(),
                [("x".into(), v.clone())].into()
            )),
            b.admin(AdminOp::Label(
                "h2".into(),
                [("x".into(), v.clone())].into()
            )),
        );
        ra.unwrap().unwrap();
        rb.unwrap().unwrap();
        wait_map(&h1, |m| label_of(m, "x") == Some(v.as_str())).await;
        wait_map(&h2, |m| label_of(m, "x") == Some(v.as_str())).await;
    }
    let labels =
        |h: Vec<HostView>| -> Vec<_> { h.into_iter().map(|h| (h.name, h.labels)).collect() };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (la, lb) = (labels(hosts(&a).await), labels(hosts(&b).await));
        if la == lb {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "replicas disagree: {la:?} {lb:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Following never closed a session.
    assert!(
        !dropped.load(std::sync::atomic::Ordering::Relaxed),
        "an agent lost its session"
    );
    let m = a.metrics().render().unwrap();
    let follows = m
        .lines()
        .find_map(|l| l.strip_prefix("meshd_coordinator_store_follows_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(follows >= 1.0, "{m}");
    // Following sent deltas: each replica built one full map, its agent's first.
    for (name, c) in [("A", &a), ("B", &b)] {
        let m = c.metrics().render().unwrap();
        let full_maps = m
            .lines()
            .find_map(|l| l.strip_prefix("meshd_coordinator_push_work_total{kind=\"full_maps\"} "))
            .and_then(|v| v.trim().parse::<f64>().ok());
        assert_eq!(full_maps, Some(1.0), "replica {name}: {m}");
    }
    a.stop().await;
    b.stop().await;
}

/// Starts a replica that lists `others` (`--replica`), retrying like [`start_on`].
async fn start_replica(
    dir: &Path,
    listen: SocketAddr,
    db: Option<DbSpec>,
    others: Vec<SocketAddr>,
) -> CoordinatorHandle {
    for _ in 0..50 {
        let mut o = options(dir, listen, db.clone());
        o.replicas = others.clone();
        if let Ok(c) = start(o).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("replica on {listen} did not start within 5 s");
}

/// Issue 18, point 2, fail-over: the join token lists both replicas, the agent connected to
/// A moves to B when A stops, within seconds, keeping its map meanwhile, and follows changes
/// made through B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_fail_over_to_another_replica() {
    let pg = meshd_lab::require_postgres!();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let db = Some(DbSpec::Postgres(pg.url()));
    let listen_a = SocketAddr::from(([127, 0, 0, 1], fixed_port()));
    let listen_b = SocketAddr::from(([127, 0, 0, 1], fixed_port()));
    let a = start_replica(dir_a.path(), listen_a, db.clone(), vec![listen_b]).await;
    let key_file = meshd_coordinator::KEY_FILE;
    std::fs::copy(dir_a.path().join(key_file), dir_b.path().join(key_file)).unwrap();
    let b = start_replica(dir_b.path(), listen_b, db.clone(), vec![listen_a]).await;
    let yaml = "rules:\n  - {name: all, from: {}, to: {}, ports: [any]}\n";
    a.admin(AdminOp::PolicyApply(yaml.into()))
        .await
        .unwrap()
        .unwrap();
    // The token names A first, then B.
    let s = a
        .create_token(TokenCreateRequest {
            uses: Some(5),
            ..Default::default()
        })
        .await
        .unwrap()
        .token;
    assert!(s.starts_with("meshd2-"), "{s}");
    let token = JoinToken::parse(&s).unwrap();
    assert_eq!(token.addresses(), vec![listen_a, listen_b]);

    // h1 enrols (at A, the first address) and keeps both addresses; h2 sits on B.
    let key = PrivateKey::generate();
    let e = enrol(&token, "h1", &key, ep()).await.unwrap();
    assert_eq!(
        (e.coordinator, e.replicas.clone()),
        (listen_a, vec![listen_b])
    );
    let mut cfg = SessionConfig::new(e.coordinator, e.coordinator_key, key, ep());
    cfg.fallbacks = e.replicas;
    let h1 = spawn_session(cfg);
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while !matches!(b.admin(AdminOp::ListTokens).await.unwrap(), Ok(AdminReply::Tokens(t)) if !t.is_empty())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "B never saw the token"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let h2 = join(
        &JoinToken {
            control: listen_b,
            replicas: vec![],
            ..token.clone()
        },
        "h2",
    )
    .await;
    wait_map(&h1, |m| m.peers.len() == 1).await;
    wait_connected(&h1).await;
    assert_eq!(h1.coordinator(), listen_a);
    assert_eq!(
        h1.coordinators(),
        vec![listen_a, listen_b],
        "from A's Welcome"
    );
    // Every map h1 publishes from here on is recorded: none may lose the peer.
    let lost = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (mut rx, lost) = (h1.map(), lost.clone());
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                if rx.borrow().as_ref().is_none_or(|m| m.peers.len() != 1) {
                    lost.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
    }

    // A goes away: h1 is on B within a few seconds.
    let t = std::time::Instant::now();
    a.stop().await;
    loop {
        let on_b = h1.coordinator() == listen_b
            && matches!(*h1.state().borrow(), SessionState::Connected { .. });
        if on_b {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "h1 did not fail over to B within 5 s: {:?} at {}",
            *h1.state().borrow(),
            h1.coordinator()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let failover = t.elapsed();
    println!("agent on B {failover:?} after A stopped");
    assert_eq!(h1.coordinators(), vec![listen_b, listen_a], "B worked last");
    assert!(h1
        .map()
        .borrow()
        .as_ref()
        .is_some_and(|m| m.peers.len() == 1));

    // A change through B reaches h1.
    label(&b, "h2", "tier", "b").await;
    wait_map(&h1, |m| label_of(m, "tier") == Some("b")).await;
    assert!(
        !lost.load(std::sync::atomic::Ordering::Relaxed),
        "h1 dropped its map during the fail-over"
    );
    drop(h2);
    b.stop().await;
}
