//! Named admin tokens on a real in-process coordinator (no root): the state directory's token
//! is `bootstrap`; a second token is created, used, and the first revoked with it (401
//! `token_revoked` from then on, on the bearer and the `/ui` cookie paths); a token past its
//! expiry gets 401 `token_expired`; the last valid token cannot be revoked (409
//! `last_admin_token`); all of it survives a restart on the same state directory.

use std::net::SocketAddr;
use std::path::Path;

use meshd_control::api::{AdminTokenCreated, AdminTokenView, ApiError, EventView};
use meshd_coordinator::{start, CoordinatorHandle, CoordinatorOptions};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

async fn coordinator(dir: &Path) -> CoordinatorHandle {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut o = CoordinatorOptions::new(dir);
    o.listen = "127.0.0.1:0".parse().unwrap();
    o.admin_listen = "127.0.0.1:0".parse().unwrap();
    start(o).await.unwrap()
}

struct Reply {
    status: u16,
    body: String,
}

impl Reply {
    /// The `ApiError` code of a refusal.
    fn code(&self) -> String {
        serde_json::from_str::<ApiError>(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", self.body))
            .code
    }
}

/// One request on its own connection; `auth`: a bearer token, or `cookie=` + a `/ui` cookie.
async fn http(addr: SocketAddr, method: &str, path: &str, auth: &str, body: &str) -> Reply {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let header = match auth.strip_prefix("cookie=") {
        Some(c) => format!("cookie: meshd_admin={c}\r\n"),
        None if auth.is_empty() => String::new(),
        None => format!("authorization: Bearer {auth}\r\n"),
    };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{header}\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let out = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    Reply {
        status: head[9..12].parse().unwrap(),
        body: body.to_string(),
    }
}

async fn create(addr: SocketAddr, auth: &str, body: &str) -> AdminTokenCreated {
    let r = http(addr, "POST", "/v1/admin/tokens", auth, body).await;
    assert_eq!(r.status, 201, "{}", r.body);
    serde_json::from_str(&r.body).unwrap()
}

async fn list(addr: SocketAddr, auth: &str) -> (Vec<AdminTokenView>, String) {
    let r = http(addr, "GET", "/v1/admin/tokens", auth, "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    (serde_json::from_str(&r.body).unwrap(), r.body)
}

/// A request that works with `auth` (it also clears the source's failure count, so the
/// refusals this test provokes never reach the backoff).
async fn works(addr: SocketAddr, auth: &str) {
    let r = http(addr, "GET", "/v1/hosts", auth, "").await;
    assert_eq!(r.status, 200, "{}", r.body);
}

fn states(v: &[AdminTokenView]) -> Vec<(&str, &str)> {
    v.iter()
        .map(|t| (t.name.as_str(), t.state.as_str()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_use_revoke_expire_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = std::fs::read_to_string({
        let c = coordinator(dir.path()).await;
        c.stop().await;
        dir.path().join("admin.token")
    })
    .unwrap()
    .trim()
    .to_string();

    let c = coordinator(dir.path()).await;
    let a = c.admin_addr();
    // The state directory's token is listed as `bootstrap`, and is the last valid one.
    let (l, _) = list(a, &bootstrap).await;
    assert_eq!(states(&l), [("bootstrap", "active")]);
    let r = http(a, "DELETE", "/v1/admin/tokens/bootstrap", &bootstrap, "").await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (409, "last_admin_token"),
        "{}",
        r.body
    );
    works(a, &bootstrap).await;

    // Input is checked before anything is stored.
    for (body, status, code) in [
        (r#"{"name":"Bad Name"}"#, 400, "bad_request"),
        (r#"{"name":""}"#, 400, "bad_request"),
        (r#"{"name":"bootstrap"}"#, 409, "conflict"),
        (
            r#"{"name":"long","ttl_secs":999999999999}"#,
            400,
            "bad_request",
        ),
    ] {
        let r = http(a, "POST", "/v1/admin/tokens", &bootstrap, body).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (status, code),
            "{body}: {}",
            r.body
        );
    }
    let r = http(a, "DELETE", "/v1/admin/tokens/nobody", &bootstrap, "").await;
    assert_eq!((r.status, r.code().as_str()), (404, "not_found"));

    // A second token: shown once, works at once.
    let ops = create(a, &bootstrap, r#"{"name":"ops"}"#).await;
    assert!(ops.token.starts_with("meshadm-"), "{}", ops.token);
    assert_eq!((ops.info.name.as_str(), ops.info.expires_at), ("ops", None));
    works(a, &ops.token).await;
    let (l, raw) = list(a, &ops.token).await;
    assert_eq!(states(&l), [("bootstrap", "active"), ("ops", "active")]);
    assert!(
        !raw.contains(&ops.token) && !raw.contains(&bootstrap),
        "{raw}"
    );
    assert!(!raw.contains("hash"), "{raw}");

    // Revoke the first with the second: the first is refused as revoked, everywhere.
    let r = http(a, "DELETE", "/v1/admin/tokens/bootstrap", &ops.token, "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v: AdminTokenView = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v.state, "revoked");
    assert!(v.revoked_at.is_some());
    let r = http(a, "GET", "/v1/hosts", &bootstrap, "").await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (401, "token_revoked"),
        "{}",
        r.body
    );
    assert!(r.body.contains("bootstrap"), "{}", r.body);
    works(a, &ops.token).await;
    let r = http(a, "GET", "/v1/hosts", &format!("cookie={bootstrap}"), "").await;
    assert_eq!((r.status, r.code().as_str()), (401, "token_revoked"));
    let r = http(a, "GET", "/ui/session", &format!("cookie={bootstrap}"), "").await;
    assert_eq!((r.status, r.code().as_str()), (401, "token_revoked"));
    works(a, &ops.token).await;
    assert_eq!(
        http(
            a,
            "GET",
            "/ui/session",
            &format!("cookie={}", ops.token),
            ""
        )
        .await
        .status,
        204
    );

    // A token past its expiry (a lifetime of 0 s: expired at once).
    let short = create(a, &ops.token, r#"{"name":"short","ttl_secs":0}"#).await;
    let r = http(a, "GET", "/v1/hosts", &short.token, "").await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (401, "token_expired"),
        "{}",
        r.body
    );
    works(a, &ops.token).await;
    // An unknown one is refused as before.
    let r = http(a, "GET", "/v1/hosts", "meshadm-nope", "").await;
    assert_eq!((r.status, r.code().as_str()), (401, "unauthorized"));
    works(a, &ops.token).await;

    // `ops` is the last valid one (bootstrap revoked, short expired).
    let r = http(a, "DELETE", "/v1/admin/tokens/ops", &ops.token, "").await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (409, "last_admin_token"),
        "{}",
        r.body
    );
    let ci = create(a, &ops.token, r#"{"name":"ci","ttl_secs":3600}"#).await;
    let exp = ci.info.expires_at.unwrap();
    assert!(exp >= ci.info.created_at + 3600 && exp <= ci.info.created_at + 3601);

    // The audit log names the tokens, never their secrets.
    let r = http(a, "GET", "/v1/events", &ops.token, "").await;
    let events: Vec<EventView> = serde_json::from_str(&r.body).unwrap();
    let logged: Vec<(&str, &str)> = events
        .iter()
        .filter(|e| e.kind.starts_with("admin_token"))
        .map(|e| (e.kind.as_str(), e.detail.as_str()))
        .collect();
    assert_eq!(
        logged,
        [
            ("admin_token_created", "ops"),
            ("admin_token_revoked", "bootstrap"),
            ("admin_token_created", "short"),
            ("admin_token_created", "ci"),
        ]
    );
    for t in [&bootstrap, &ops.token, &short.token, &ci.token] {
        assert!(!r.body.contains(t.as_str()));
    }
    c.stop().await;

    // A restart on the same state directory keeps all of it.
    let c = coordinator(dir.path()).await;
    let a = c.admin_addr();
    works(a, &ops.token).await;
    works(a, &ci.token).await;
    let r = http(a, "GET", "/v1/hosts", &bootstrap, "").await;
    assert_eq!((r.status, r.code().as_str()), (401, "token_revoked"));
    let r = http(a, "GET", "/v1/hosts", &short.token, "").await;
    assert_eq!((r.status, r.code().as_str()), (401, "token_expired"));
    let (l, _) = list(a, &ci.token).await;
    assert_eq!(
        states(&l),
        [
            ("bootstrap", "revoked"),
            ("ci", "active"),
            ("ops", "active"),
            ("short", "expired")
        ]
    );
    // The state directory's token file is not rewritten: the revoked token stays revoked.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("admin.token"))
            .unwrap()
            .trim(),
        bootstrap
    );
    // Now ops may go (ci is valid), and is refused at once.
    let r = http(a, "DELETE", "/v1/admin/tokens/ops", &ci.token, "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = http(a, "GET", "/v1/hosts", &ops.token, "").await;
    assert_eq!((r.status, r.code().as_str()), (401, "token_revoked"));
    c.stop().await;
}
