//! Commit, then acknowledge: an in-process coordinator (agents over QUIC on 127.0.0.1) whose
//! store fails commits on demand. No root needed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use meshd_agent::SessionHandle;
use meshd_agent::{enrol, spawn_session, ClientError, SessionConfig, SessionState};
use meshd_control::api::FlowView;
use meshd_control::api::{HealthView, StatusView, TokenCreateRequest};
use meshd_control::proto::{EndpointReport, ErrorCode};
use meshd_control::state::{AdminError, Dirty, MAX_TOKEN_TTL_SECS};
use meshd_control::{AuditEvent, JoinToken, NetworkMap};
use meshd_coordinator::{
    start_with_store, AdminOp, AdminReply, CoordinatorHandle, CoordinatorOptions,
};
use meshd_store::{FlowFilter, Snapshot, SqliteStore, Store, StoreError};
use meshd_tunnel::PrivateKey;

/// A start error as `meshd coordinator` prints it (anyhow's `{:#}`: context, then causes).
fn shown(e: meshd_coordinator::StartError) -> String {
    format!("{:#}", anyhow::Error::from(e))
}

/// SQLite, except that commits fail with "disk full" while `fail` is set, and each commit
/// first takes `delay_ms` (a slow disk: commands queue up behind it and share the next batch).
struct Flaky {
    inner: SqliteStore,
    fail: AtomicBool,
    delay_ms: AtomicU64,
}

impl Flaky {
    fn open(path: &std::path::Path) -> Self {
        Flaky {
            inner: SqliteStore::open(path).unwrap(),
            fail: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
        }
    }
}

impl Store for Flaky {
    fn load(&self) -> Result<Snapshot, StoreError> {
        self.inner.load()
    }
    fn commit_at(
        &self,
        generation: Option<u64>,
        d: &Dirty,
        events: &[AuditEvent],
    ) -> Result<u64, StoreError> {
        std::thread::sleep(Duration::from_millis(self.delay_ms.load(Ordering::SeqCst)));
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::DiskFull);
        }
        self.inner.commit_at(generation, d, events)
    }
    fn generation(&self) -> Result<u64, StoreError> {
        self.inner.generation()
    }
    fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.inner.get_meta(key)
    }
    fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.inner.set_meta(key, value)
    }
    fn log_event(&self, event: &AuditEvent) -> Result<(), StoreError> {
        self.inner.log_event(event)
    }
    fn recent_events(&self, limit: u32) -> Result<Vec<AuditEvent>, StoreError> {
        self.inner.recent_events(limit)
    }
    fn flows(&self, q: &FlowFilter) -> Result<Vec<FlowView>, StoreError> {
        self.inner.flows(q)
    }
    fn flow_summary(&self, q: &FlowFilter) -> Result<Vec<FlowView>, StoreError> {
        self.inner.flow_summary(q)
    }
    fn prune_flows(&self, before: u64, max_rows: u32) -> Result<u64, StoreError> {
        self.inner.prune_flows(before, max_rows)
    }
}

fn ep() -> EndpointReport {
    EndpointReport {
        addrs: vec![SocketAddr::from(([192, 0, 2, 1], 1))],
        listen_port: Some(51820),
        transparent: false,
    }
}

async fn join(c: &CoordinatorHandle, t: &JoinToken, name: &str) -> SessionHandle {
    let key = PrivateKey::generate();
    let e = enrol(t, name, &key, ep()).await.unwrap();
    assert_eq!(e.coordinator_key, c.public_key());
    spawn_session(SessionConfig::new(
        e.coordinator,
        e.coordinator_key,
        key,
        ep(),
    ))
}

async fn wait_map(a: &SessionHandle, f: impl Fn(&NetworkMap) -> bool) {
    let mut rx = a.map();
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

async fn wait_state(a: &SessionHandle, f: impl Fn(&SessionState) -> bool) {
    let mut rx = a.state();
    tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|s| f(s)))
        .await
        .expect("state not reached")
        .unwrap();
}

fn not_saved(r: Result<AdminReply, AdminError>) -> String {
    match r {
        Err(AdminError::NotSaved(m)) => m,
        other => panic!("expected a not-saved error, got {other:?}"),
    }
}

/// `GET /v1/health` over HTTP without a token: (status code, body).
async fn http_health(c: &CoordinatorHandle) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(c.admin_addr())
        .await
        .unwrap();
    s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, buf)
}

async fn status(c: &CoordinatorHandle) -> StatusView {
    match c.admin(AdminOp::Status).await.unwrap() {
        Ok(AdminReply::Status(s)) => s,
        other => panic!("{other:?}"),
    }
}

async fn health(c: &CoordinatorHandle) -> HealthView {
    match c.admin(AdminOp::Health).await.unwrap() {
        Ok(AdminReply::Health(h)) => h,
        other => panic!("{other:?}"),
    }
}

async fn event_kinds(c: &CoordinatorHandle) -> Vec<String> {
    match c.admin(AdminOp::Events { limit: 1000 }).await.unwrap() {
        Ok(AdminReply::Events(e)) => e.into_iter().map(|e| e.kind).collect(),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_is_refused_rolled_back_and_never_pushed() {
    let dir = private_tempdir();
    let store = Arc::new(Flaky::open(&dir.path().join("test.db")));
    let c = start_with_store(local_opts(dir.path()), store.clone())
        .await
        .unwrap();
    c.admin(AdminOp::PolicyApply(
        "rules:\n  - {name: all, from: {}, to: {}, ports: [any]}\n".into(),
    ))
    .await
    .unwrap()
    .unwrap();
    let t = JoinToken::parse(
        &c.create_token(TokenCreateRequest {
            uses: Some(10),
            ..Default::default()
        })
        .await
        .unwrap()
        .token,
    )
    .unwrap();
    let a = join(&c, &t, "a").await;
    let b = join(&c, &t, "b").await;
    wait_map(&a, |m| m.peers.len() == 1).await;
    wait_map(&b, |m| m.peers.len() == 1).await;
    assert!(health(&c).await.ok);
    assert_eq!(http_health(&c).await.0, 200);

    // A lifetime the store cannot hold is refused before it gets there.
    let r = c
        .admin(AdminOp::CreateToken(TokenCreateRequest {
            ttl_secs: Some(u64::MAX),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert!(matches!(r, Err(AdminError::InvalidTtl(u64::MAX))), "{r:?}");
    assert!(
        health(&c).await.ok,
        "a refused input is not a store failure"
    );

    store.fail.store(true, Ordering::SeqCst);
    // Admin changes are refused with the cause.
    let m = not_saved(
        c.admin(AdminOp::Label(
            "b".into(),
            [("tier".into(), "1".into())].into(),
        ))
        .await
        .unwrap(),
    );
    assert!(m.contains("disk full"), "{m}");
    let m = not_saved(
        c.admin(AdminOp::CreateToken(TokenCreateRequest {
            ttl_secs: Some(MAX_TOKEN_TTL_SECS),
            ..Default::default()
        }))
        .await
        .unwrap(),
    );
    assert!(m.contains("disk full"), "{m}");
    not_saved(c.admin(AdminOp::Remove("a".into())).await.unwrap());
    // So is an enrolment: no address is handed out.
    match enrol(&t, "c", &PrivateKey::generate(), ep()).await {
        Err(ClientError::Refused {
            code: ErrorCode::Internal,
            message,
        }) => assert!(message.contains("disk full"), "{message}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Status and health say so, naming the cause.
    let s = status(&c).await;
    let f = s.store_failure.expect("status shows the failed commit");
    assert!(f.error.contains("disk full"), "{f:?}");
    assert!(!f.what.is_empty(), "{f:?}");
    let h = health(&c).await;
    assert!(!h.ok);
    assert_eq!(h.store_failure.map(|f| f.error), Some(f.error));
    let (code, body) = http_health(&c).await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("disk full"), "{body}");
    // The agents were sent nothing of it: their sessions were closed, and the maps they
    // keep (fail-static) are the last committed ones.
    for x in [&a, &b] {
        wait_state(x, |s| !matches!(s, SessionState::Connected { .. })).await;
    }
    let map = a.map().borrow().clone().unwrap();
    assert_eq!(map.peers.len(), 1);
    assert!(!map.peers[0].labels.contains_key("tier"), "{map:?}");

    // Nothing of it remains in memory either.
    let Ok(AdminReply::Hosts(hosts)) = c.admin(AdminOp::ListHosts).await.unwrap() else {
        panic!()
    };
    let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert!(hosts.iter().all(|h| !h.labels.contains_key("tier")));
    let Ok(AdminReply::Tokens(toks)) = c.admin(AdminOp::ListTokens).await.unwrap() else {
        panic!()
    };
    assert_eq!(toks.len(), 1, "{toks:?}");
    assert_eq!(toks[0].uses_left, Some(8));
    let kinds = event_kinds(&c).await;
    assert!(!kinds.iter().any(|k| k == "host_removed"), "{kinds:?}");

    // Space again: the agents come back with maps of the committed state, the next commit
    // clears the failure, and the refused enrolment works now.
    store.fail.store(false, Ordering::SeqCst);
    for x in [&a, &b] {
        wait_state(x, |s| matches!(s, SessionState::Connected { .. })).await;
    }
    wait_map(&b, |m| m.peers.len() == 1).await;
    let d = join(&c, &t, "c").await;
    wait_map(&d, |m| m.peers.len() == 2).await;
    assert!(health(&c).await.ok);
    assert_eq!(http_health(&c).await.0, 200);
    assert_eq!(status(&c).await.store_failure, None);
    let Ok(AdminReply::Hosts(hosts)) = c.admin(AdminOp::ListHosts).await.unwrap() else {
        panic!()
    };
    let mut addrs: Vec<_> = hosts.iter().flat_map(|h| h.addresses.clone()).collect();
    let n = addrs.len();
    addrs.sort();
    addrs.dedup();
    assert_eq!(addrs.len(), n, "no address twice: {hosts:?}");
    c.stop().await;
}

/// A read that lands in the same batch as a change whose commit fails is still answered, from
/// the committed state (it changed nothing that could be lost); the change is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_sharing_a_failed_batch_is_answered_from_the_committed_state() {
    let dir = private_tempdir();
    let store = Arc::new(Flaky::open(&dir.path().join("test.db")));
    let c = start_with_store(local_opts(dir.path()), store.clone())
        .await
        .unwrap();
    let t = JoinToken::parse(&c.create_token(Default::default()).await.unwrap().token).unwrap();
    let a = join(&c, &t, "a").await;
    wait_state(&a, |s| matches!(s, SessionState::Connected { .. })).await;

    store.fail.store(true, Ordering::SeqCst);
    store.delay_ms.store(300, Ordering::SeqCst);
    // The actor is busy committing (and failing) this one while the next two queue up, so
    // they are picked up together: one batch of a change and a read.
    let label = [("x".into(), "1".into())].into();
    let (busy, (removed, read)) = tokio::join!(c.admin(AdminOp::Label("a".into(), label)), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        tokio::join!(
            c.admin(AdminOp::Remove("a".into())),
            c.admin(AdminOp::Status)
        )
    });
    not_saved(busy.unwrap());
    let m = not_saved(removed.unwrap());
    assert!(m.contains("disk full"), "{m}");
    match read.unwrap() {
        Ok(AdminReply::Status(s)) => {
            assert_eq!(s.hosts, 1, "the refused removal is not shown: {s:?}");
            assert!(s.store_failure.is_some(), "{s:?}");
        }
        other => panic!("a read is answered despite the failed commit, got {other:?}"),
    }
    store.delay_ms.store(0, Ordering::SeqCst);
    c.stop().await;
}

fn private_tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .unwrap()
}

fn local_opts(dir: &std::path::Path) -> CoordinatorOptions {
    let mut o = CoordinatorOptions::new(dir);
    o.listen = "127.0.0.1:0".parse().unwrap();
    o.admin_listen = "127.0.0.1:0".parse().unwrap();
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_files_are_private_and_loose_ones_refused() {
    use meshd_coordinator::start;
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let set = |p: &std::path::Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    let top = private_tempdir();
    let dir = top.path().join("state");
    let c = start(local_opts(&dir)).await.unwrap();
    c.create_token(TokenCreateRequest::default()).await.unwrap();
    assert_eq!(mode(&dir), 0o700);
    for f in [
        "coordinator.key",
        "admin.token",
        "coordinator.db",
        "coordinator.db-wal",
        "coordinator.db-shm",
    ] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
    c.stop().await;

    // A state directory others may enter is refused, naming the fix.
    set(&dir, 0o755);
    let e = shown(start(local_opts(&dir)).await.err().unwrap());
    assert!(e.contains(&format!("chmod 700 {}", dir.display())), "{e}");
    set(&dir, 0o700);
    // So is a key others may read.
    let key = dir.join("coordinator.key");
    set(&key, 0o644);
    let e = shown(start(local_opts(&dir)).await.err().unwrap());
    assert!(e.contains(&format!("chmod 600 {}", key.display())), "{e}");
    set(&key, 0o600);
    // An admin token written 0644 by an earlier version is made private.
    set(&dir.join("admin.token"), 0o644);
    let c = start(local_opts(&dir)).await.unwrap();
    assert_eq!(mode(&dir.join("admin.token")), 0o600);
    c.stop().await;

    // The empty key an earlier version left after a full disk at first start (before any
    // database) no longer blocks every start.
    let fresh = top.path().join("fresh");
    std::fs::create_dir(&fresh).unwrap();
    set(&fresh, 0o700);
    std::fs::write(fresh.join("coordinator.key"), b"").unwrap();
    set(&fresh.join("coordinator.key"), 0o600);
    let c = start(local_opts(&fresh)).await.unwrap();
    assert_eq!(
        std::fs::metadata(fresh.join("coordinator.key"))
            .unwrap()
            .len(),
        45
    );
    c.stop().await;
}

async fn events(c: &CoordinatorHandle) -> Vec<(String, String)> {
    match c.admin(AdminOp::Events { limit: 1000 }).await.unwrap() {
        Ok(AdminReply::Events(e)) => e.into_iter().map(|e| (e.kind, e.detail)).collect(),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rename_on_enrol_and_an_exhausted_pool_are_events() {
    let dir = private_tempdir();
    let mut o = local_opts(dir.path());
    // A /29 has five allocatable addresses.
    o.pool = "100.64.0.0/29".parse().unwrap();
    let c = meshd_coordinator::start(o).await.unwrap();
    let t = JoinToken::parse(
        &c.create_token(TokenCreateRequest::default())
            .await
            .unwrap()
            .token,
    )
    .unwrap();
    enrol(&t, "a", &PrivateKey::generate(), ep()).await.unwrap();
    let e = enrol(&t, "a", &PrivateKey::generate(), ep()).await.unwrap();
    assert_eq!(e.host.name, "a-2");
    let ev = events(&c).await;
    assert!(
        ev.contains(&(
            "host_renamed_on_enrol".into(),
            "requested name a taken; enrolled as a-2 (2)".into()
        )),
        "{ev:?}"
    );
    for i in 0..3 {
        enrol(&t, &format!("f{i}"), &PrivateKey::generate(), ep())
            .await
            .unwrap();
    }
    match enrol(&t, "g", &PrivateKey::generate(), ep()).await {
        Err(ClientError::Refused {
            code: ErrorCode::PoolExhausted,
            ..
        }) => {}
        other => panic!("expected pool exhaustion, got {other:?}"),
    }
    let ev = events(&c).await;
    assert!(
        ev.iter().any(|(k, d)| k == "pool_exhausted"
            && d.contains("100.64.0.0/29")
            && d.contains("refused to enrol g")),
        "{ev:?}"
    );
    c.stop().await;
}
