//! Admin HTTP/JSON API (axum) for `meshctl`. Routes and types: `meshd_control::api`.
//! Authentication: `Authorization: Bearer <admin token>`, looked up by its SHA-256 among the
//! named admin tokens ([`AdminAuth`]; expired and revoked ones get 401 `token_expired` /
//! `token_revoked`).
//!
//! Transport: plain HTTP on loopback (the default, 127.0.0.1:7444); HTTPS only anywhere else
//! ([`crate::options::admin_needs_tls`]), with rustls. The certificate is the operator's
//! (`--admin-tls-cert`/`--admin-tls-key`) or a self-signed one made on first start and kept as
//! `<state-dir>/admin-cert.pem` + `admin-key.pem` (0600), which `meshctl` trusts by default.
//! A plain HTTP request to the HTTPS port gets a 400 that says to use `https://`.
//!
//! Limits ([`crate::options::Limits`]): TLS handshakes in progress are bounded in total and per
//! source, with a share only loopback clients may take, and each must finish within a few
//! seconds; every request head must arrive within `admin_header_timeout_ms` (hyper's header
//! read timeout, which also closes idle keep-alive connections). Failed authentications are
//! logged (one line per source per 10 s, with a count), counted in `GET /v1/status`, and a
//! source that keeps failing gets 429 with `Retry-After` for a doubling time
//! ([`crate::guard::Backoff`]).

use axum::extract::{ConnectInfo, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use meshd_control::api::AdminTokenCreateRequest;
use meshd_control::api::PolicyModeRequest;
use meshd_control::api::{
    ApiError, LabelRequest, RenameRequest, TokenCreateRequest, UnlabelRequest,
};
use meshd_control::api::{BlocksQuery, EventsQuery, ExplainRequest, PolicyText, EVENTS_DEFAULT};
use meshd_control::api::{FlowsQuery, FLOWS_MAX_ROWS};
use meshd_control::policy::PolicyError;
use meshd_control::state::{AdminAuthError, AdminError, AdminTokens};
use meshd_control::topology::InventoryHost;
use meshd_control::TokenId;
use tokio::sync::{mpsc, watch};

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{self, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, error, warn};

use crate::guard::{self, Check, Counters, Guard, LogLimiter, Slots};
use crate::metrics::Metrics;
use crate::options::{AdminTlsFiles, Limits};

use crate::actor::Commands;
use crate::error::AdminTlsError;
use crate::ops::{AdminOp, AdminReply};
use crate::state_dir::admin_cert_files;
pub use crate::state_dir::{fingerprint, generated_names, ADMIN_CERT_FILE, ADMIN_KEY_FILE};

#[derive(Clone)]
struct AppState {
    cmds: Commands,
    flows: FlowAccess,
    auth: AdminAuth,
    guard: Arc<Guard>,
    metrics: Arc<Metrics>,
}

/// The admin tokens the API accepts: the actor's copy of the state's table, published after
/// every commit that changes it and before that commit's replies (so a created token works,
/// and a revoked one is refused, from the moment the reply arrives).
#[derive(Clone)]
pub struct AdminAuth(watch::Receiver<Arc<AdminTokens>>);

impl AdminAuth {
    /// Follows what the actor publishes on `rx`.
    pub(crate) fn new(rx: watch::Receiver<Arc<AdminTokens>>) -> Self {
        AdminAuth(rx)
    }

    /// A fixed set of tokens (for handlers outside a running coordinator: tests' fixtures).
    pub fn fixed(tokens: AdminTokens) -> Self {
        // A receiver keeps the last value after its sender is gone.
        let (_tx, rx) = watch::channel(Arc::new(tokens));
        AdminAuth(rx)
    }

    /// The name of the token `tok` if it authenticates now (the clock is read here, at the
    /// edge; the check itself is the pure state's).
    pub fn check(&self, tok: &str) -> Result<String, AdminAuthError> {
        let hash = meshd_control::token::hash_secret(tok.trim().as_bytes());
        let now = crate::actor::unix_now();
        self.0
            .borrow()
            .authenticate(now, &hash)
            .map(|t| t.name.clone())
    }
}

/// What the flow routes read: the store (on a blocking thread, never through the actor) and
/// the retention (the default window).
#[derive(Clone)]
pub(crate) struct FlowAccess {
    /// The store.
    pub(crate) store: Arc<dyn meshd_store::Store>,
    /// `flow_retention` (seconds).
    pub(crate) retention_secs: u64,
}

/// Most (host, peer, port, verdict, rule) groups a topology folds.
const TOPOLOGY_MAX_GROUPS: u32 = 200_000;

struct Failure(StatusCode, &'static str, String, Vec<String>);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (
            self.0,
            Json(ApiError {
                code: self.1.to_string(),
                message: self.2,
                failures: self.3,
            }),
        )
            .into_response()
    }
}

impl From<AdminError> for Failure {
    fn from(e: AdminError) -> Self {
        let (s, c) = match e {
            // The refused statement's status and code, the batch's message.
            AdminError::SignedBatch { ref why, .. } => {
                let inner = Failure::from((**why).clone());
                return Failure(inner.0, inner.1, e.to_string(), inner.3);
            }
            AdminError::BadBatch(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            AdminError::NoSuchHost(_)
            | AdminError::NoSuchToken(_)
            | AdminError::HostRemoved(_)
            | AdminError::NoSuchAdminToken(_) => (StatusCode::NOT_FOUND, "not_found"),
            AdminError::NameTaken(_)
            | AdminError::ModeRefused(_)
            | AdminError::KeyRotation(_)
            | AdminError::AdminTokenNameTaken(_) => (StatusCode::CONFLICT, "conflict"),
            AdminError::LastAdminToken(_) => (StatusCode::CONFLICT, "last_admin_token"),
            AdminError::InvalidAdminTokenName(_)
            | AdminError::InvalidName(_)
            | AdminError::InvalidLabel(_)
            | AdminError::Port(_)
            | AdminError::InvalidTtl(_)
            | AdminError::InvalidUses(_)
            | AdminError::TooManyLabels(_)
            | AdminError::InvalidGroup(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            AdminError::PolicyTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            AdminError::SignatureRequired(_) => (StatusCode::FORBIDDEN, "signature_required"),
            AdminError::BadSignature(_) => (StatusCode::FORBIDDEN, "bad_signature"),
            AdminError::NoAdminKeys => (StatusCode::CONFLICT, "no_admin_keys"),
            // Nothing was changed; the same request may work once the cause is fixed.
            AdminError::NotSaved(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_saved"),
            AdminError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            AdminError::Import(ref rows) => {
                let failures = rows.iter().map(ToString::to_string).collect();
                return Failure(
                    StatusCode::BAD_REQUEST,
                    "import_refused",
                    e.to_string(),
                    failures,
                );
            }
            AdminError::Policy(PolicyError::NoSuchVersion(_)) => {
                (StatusCode::NOT_FOUND, "not_found")
            }
            AdminError::Policy(PolicyError::Parse(ref p)) => {
                return Failure(
                    StatusCode::BAD_REQUEST,
                    "policy_parse",
                    e.to_string(),
                    vec![p.to_string()],
                )
            }
            AdminError::Policy(PolicyError::TestsFailed(ref t)) => {
                let failures = t
                    .iter()
                    .filter(|t| !t.passed())
                    .map(ToString::to_string)
                    .collect();
                return Failure(
                    StatusCode::BAD_REQUEST,
                    "policy_tests_failed",
                    e.to_string(),
                    failures,
                );
            }
        };
        Failure(s, c, e.to_string(), Vec::new())
    }
}

/// Proof that the request carried the admin token.
struct Authed;

impl FromRequestParts<AppState> for Authed {
    type Rejection = Response;
    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, Response> {
        authenticate(parts, &st.auth, &st.guard).map(|()| Authed)
    }
}

/// The admin token a request presents: `Authorization: Bearer <token>` on any method, or the
/// `/ui` login cookie ([`crate::ui::COOKIE`]) on reads only (GET, HEAD). A cross-site form
/// can only send a POST (or navigate with a GET, which changes nothing), and
/// `SameSite=Strict` keeps the cookie off cross-site requests anyway.
pub(crate) fn presented_token(parts: &Parts) -> Option<&str> {
    let bearer = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if bearer.is_some() {
        return bearer;
    }
    let read = parts.method == axum::http::Method::GET || parts.method == axum::http::Method::HEAD;
    if !read {
        return None;
    }
    crate::ui::cookie_token(&parts.headers)
}

/// Checks the admin token of a request ([`presented_token`]) against the admin tokens, with
/// the failure log and backoff of [`Guard`]. Tokens are looked up by their SHA-256, so the
/// time it takes says nothing about the token. An expired or revoked token gets 401
/// `token_expired` / `token_revoked` (and counts as a failure, like a wrong one).
#[allow(clippy::result_large_err)] // the rejection is the response itself, as axum's extractors return
pub fn authenticate(parts: &Parts, auth: &AdminAuth, guard: &Guard) -> Result<(), Response> {
    // Every connection is served by `serve_http`, which records the client address.
    let source = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    check_token(source, presented_token(parts), auth, guard)
}

/// Checks `tok` (from a header, the cookie or the `/ui` login form) for a client at `source`.
#[allow(clippy::result_large_err)] // the rejection is the response itself, as axum's extractors return
pub(crate) fn check_token(
    source: Option<IpAddr>,
    tok: Option<&str>,
    auth: &AdminAuth,
    guard: &Guard,
) -> Result<(), Response> {
    let now = std::time::Instant::now();
    let counters = &guard.counters;
    if let Some(ip) = source {
        if let Check::Blocked { retry_after, log } = guard::lock(&guard.admin).check(now, ip) {
            Counters::bump(&counters.admin_auth_backoff);
            if let Some(refused) = log {
                warn!(source = %ip, refused, retry_after_secs = retry_after.as_secs(),
                    "admin API: refusing requests from a source that keeps failing to authenticate");
            }
            let secs = retry_after.as_secs_f64().ceil().max(1.0);
            let mut r = Failure(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_failures",
                format!("too many failed authentications from {ip}: try again in {secs} s"),
                Vec::new(),
            )
            .into_response();
            r.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs as u64),
            );
            return Err(r);
        }
    }
    let refused = match tok.map(|t| auth.check(t)) {
        Some(Ok(_name)) => {
            if let Some(ip) = source {
                guard::lock(&guard.admin).success(ip);
            }
            return Ok(());
        }
        Some(Err(e)) => e,
        None => AdminAuthError::Unknown,
    };
    Counters::bump(&counters.admin_auth_failures);
    if let Some(ip) = source {
        let f = guard::lock(&guard.admin).failure(now, ip);
        if let Some(failed) = f.log {
            warn!(source = %ip, failed, in_a_row = f.failures,
                backoff_secs = f.blocked_for.map(|d| d.as_secs_f64()),
                presented = tok.is_some(), reason = %refused, "admin API: failed authentication");
        }
    }
    let (code, message) = match refused {
        AdminAuthError::Unknown => (
            "unauthorized",
            "missing or wrong admin token: pass --token, set MESH_TOKEN, or read <state-dir>/admin.token".to_string(),
        ),
        AdminAuthError::Expired(name) => (
            "token_expired",
            format!("admin token {name:?} has expired: use another one (`meshctl admin token create NAME` makes one)"),
        ),
        AdminAuthError::Revoked(name) => (
            "token_revoked",
            format!("admin token {name:?} was revoked: use another one (`meshctl admin token create NAME` makes one)"),
        ),
    };
    Err(Failure(StatusCode::UNAUTHORIZED, code, message, Vec::new()).into_response())
}

async fn call(st: &AppState, op: AdminOp) -> Result<Response, Failure> {
    Ok(reply(ask(st, op).await?))
}

async fn ask(st: &AppState, op: AdminOp) -> Result<AdminReply, Failure> {
    Ok(st.cmds.admin(op).await.map_err(|e| {
        Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "internal",
            e.to_string(),
            Vec::new(),
        )
    })??)
}

fn reply(r: AdminReply) -> Response {
    match r {
        AdminReply::Host(h) => Json(h).into_response(),
        AdminReply::Hosts(h) => Json(h).into_response(),
        AdminReply::Token(t) => Json(t).into_response(),
        AdminReply::Tokens(t) => Json(t).into_response(),
        AdminReply::Created(t) => (StatusCode::CREATED, Json(t)).into_response(),
        AdminReply::AdminToken(t) => Json(t).into_response(),
        AdminReply::AdminTokens(t) => Json(t).into_response(),
        AdminReply::AdminTokenCreated(t) => (StatusCode::CREATED, Json(t)).into_response(),
        AdminReply::Status(s) => Json(s).into_response(),
        AdminReply::Events(e) => Json(e).into_response(),
        AdminReply::Health(h) if h.ok => Json(h).into_response(),
        AdminReply::Health(h) => (StatusCode::SERVICE_UNAVAILABLE, Json(h)).into_response(),
        AdminReply::Json(v) => Json(v).into_response(),
    }
}

async fn list_hosts(_: Authed, State(st): State<AppState>) -> Result<Response, Failure> {
    call(&st, AdminOp::ListHosts).await
}
async fn show_host(
    _: Authed,
    State(st): State<AppState>,
    Path(h): Path<String>,
) -> Result<Response, Failure> {
    call(&st, AdminOp::ShowHost(h)).await
}
async fn remove_host(
    _: Authed,
    State(st): State<AppState>,
    Path(h): Path<String>,
) -> Result<Response, Failure> {
    call(&st, AdminOp::Remove(h)).await
}
async fn label(
    _: Authed,
    State(st): State<AppState>,
    Path(h): Path<String>,
    Json(r): Json<LabelRequest>,
) -> Result<Response, Failure> {
    call(&st, AdminOp::Label(h, r.labels)).await
}
async fn unlabel(
    _: Authed,
    State(st): State<AppState>,
    Path(h): Path<String>,
    Json(r): Json<UnlabelRequest>,
) -> Result<Response, Failure> {
    call(&st, AdminOp::Unlabel(h, r.keys)).await
}
async fn rename(
    _: Authed,
    State(st): State<AppState>,
    Path(h): Path<String>,
    Json(r): Json<RenameRequest>,
) -> Result<Response, Failure> {
    call(&st, AdminOp::Rename(h, r.name)).await
}
async fn create_token(
    _: Authed,
    State(st): State<AppState>,
    Json(r): Json<TokenCreateRequest>,
) -> Result<Response, Failure> {
    call(&st, AdminOp::CreateToken(r)).await
}
async fn list_tokens(_: Authed, State(st): State<AppState>) -> Result<Response, Failure> {
    call(&st, AdminOp::ListTokens).await
}
async fn revoke_token(
    _: Authed,
    State(st): State<AppState>,
    Path(id): Path<u64>,
) -> Result<Response, Failure> {
    call(&st, AdminOp::RevokeToken(TokenId(id))).await
}
async fn create_admin_token(
    _: Authed,
    State(st): State<AppState>,
    Json(r): Json<AdminTokenCreateRequest>,
) -> Result<Response, Failure> {
    call(&st, AdminOp::CreateAdminToken(r)).await
}
async fn list_admin_tokens(_: Authed, State(st): State<AppState>) -> Result<Response, Failure> {
    call(&st, AdminOp::ListAdminTokens).await
}
async fn revoke_admin_token(
    _: Authed,
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, Failure> {
    call(&st, AdminOp::RevokeAdminToken(name)).await
}
/// `GET /v1/status`, with the listener limits' counters (kept outside the actor).
async fn status(_: Authed, State(st): State<AppState>) -> Result<Response, Failure> {
    match ask(&st, AdminOp::Status).await? {
        AdminReply::Status(mut s) => {
            s.guard = st.guard.counters.snapshot();
            Ok(Json(s).into_response())
        }
        other => Ok(reply(other)),
    }
}
/// `GET /v1/health` (no token: for monitoring): 503 while commits fail.
async fn health(State(st): State<AppState>) -> Result<Response, Failure> {
    call(&st, AdminOp::Health).await
}

/// A policy file from the body: JSON `{"yaml": …}` when the content type says JSON or the body
/// is such an object (a policy file never is: `yaml` is not one of its keys), else the text.
fn policy_body(headers: &axum::http::HeaderMap, body: &str) -> Result<String, Failure> {
    let json = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    match serde_json::from_str::<PolicyText>(body) {
        Ok(p) => Ok(p.yaml),
        Err(e) if json => Err(Failure(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("expected {{\"yaml\": \"...\"}}: {e}"),
            Vec::new(),
        )),
        Err(_) => Ok(body.to_string()),
    }
}

async fn policy_get(_: Authed, State(st): State<AppState>) -> Result<Response, Failure> {
    call(&st, AdminOp::PolicyGet).await
}
async fn policy_put(
    _: Authed,
    State(st): State<AppState>,
    headers: axum::http::HeaderMap,
    body: String,
) -> Result<Response, Failure> {
    call(&st, AdminOp::PolicyApply(policy_body(&headers, &body)?)).await
}
async fn policy_history(_: Authed, State(st): State<AppState>) -> Result<Response, Failure> {
    call(&st, AdminOp::PolicyHistory).await
}
async fn policy_rollback(
    _: Authed,
    State(st): State<AppState>,
    Path(v): Path<u64>,
) -> Result<Response, Failure> {
    call(&st, AdminOp::PolicyRollback(v)).await
}
async fn policy_diff(
    _: Authed,
    State(st): State<AppState>,
    headers: axum::http::HeaderMap,
    body: String,
) -> Result<Response, Failure> {
    call(&st, AdminOp::PolicyDiff(policy_body(&headers, &body)?)).await
}
async fn policy_check(
    _: Authed,
    State(st): State<AppState>,
    headers: axum::http::HeaderMap,
    body: String,
) -> Result<Response, Failure> {
    call(&st, AdminOp::PolicyCheck(policy_body(&headers, &body)?)).await
}
async fn policy_explain(
    _: Authed,
    State(st): State<AppState>,
    Json(r): Json<ExplainRequest>,
) -> Result<Response, Failure> {
    call(&st, AdminOp::Explain(r)).await
}
async fn policy_mode_get(_: Authed, State(st): State<AppState>) -> Result<Response, Failure> {
    call(&st, AdminOp::PolicyModeGet).await
}
async fn policy_mode_set(
    _: Authed,
    State(st): State<AppState>,
    Json(r): Json<PolicyModeRequest>,
) -> Result<Response, Failure> {
    call(&st, AdminOp::PolicyModeSet(r)).await
}
async fn quarantine(
    _: Authed,
    State(st): State<AppState>,
    Path(h): Path<String>,
) -> Result<Response, Failure> {
    call(&st, AdminOp::Quarantine(h)).await
}
async fn admin_keys(_: Authed, State(st): State<AppState>) -> Result<Response, Failure> {
    call(&st, AdminOp::AdminKeys).await
}
async fn add_key_set(
    _: Authed,
    State(st): State<AppState>,
    Json(s): Json<meshd_control::signed::Signed>,
) -> Result<Response, Failure> {
    call(&st, AdminOp::AddKeySet(s)).await
}
async fn signed_policy(
    _: Authed,
    State(st): State<AppState>,
    Json(r): Json<meshd_control::api::SignedPolicyRequest>,
) -> Result<Response, Failure> {
    call(&st, AdminOp::SignedPolicy(r)).await
}
async fn signed_mode(
    _: Authed,
    State(st): State<AppState>,
    Json(r): Json<meshd_control::api::SignedModeRequest>,
) -> Result<Response, Failure> {
    call(&st, AdminOp::SignedMode(r.signed)).await
}
async fn signed_rollback(
    _: Authed,
    State(st): State<AppState>,
    Path(v): Path<u64>,
    Json(r): Json<meshd_control::api::SignedRollbackRequest>,
) -> Result<Response, Failure> {
    call(&st, AdminOp::SignedRollback(v, r.signed)).await
}
async fn signed_host(
    _: Authed,
    State(st): State<AppState>,
    Path(h): Path<String>,
    Json(r): Json<meshd_control::api::SignedHostRequest>,
) -> Result<Response, Failure> {
    call(&st, AdminOp::SignedHost(h, r)).await
}
async fn signed_hosts(
    _: Authed,
    State(st): State<AppState>,
    Json(r): Json<meshd_control::api::SignedHostsRequest>,
) -> Result<Response, Failure> {
    call(&st, AdminOp::SignedHosts(r)).await
}
async fn release(
    _: Authed,
    State(st): State<AppState>,
    Path(h): Path<String>,
) -> Result<Response, Failure> {
    call(&st, AdminOp::Release(h)).await
}
async fn revoke_host(
    _: Authed,
    State(st): State<AppState>,
    Path(h): Path<String>,
) -> Result<Response, Failure> {
    call(&st, AdminOp::Revoke(h)).await
}
async fn rotate_key(
    _: Authed,
    State(st): State<AppState>,
    Path(h): Path<String>,
) -> Result<Response, Failure> {
    call(&st, AdminOp::RotateKey(h)).await
}
async fn blocks(
    _: Authed,
    State(st): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<BlocksQuery>,
) -> Result<Response, Failure> {
    call(&st, AdminOp::Blocks(q)).await
}

/// `GET /v1/events?limit=N`: the newest N audit events (default 100, at most 1000), oldest
/// first.
async fn events(
    _: Authed,
    State(st): State<AppState>,
    q: Result<axum::extract::Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Failure> {
    let axum::extract::Query(q) = q.map_err(|e| {
        Failure(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{}: limit must be a number of events", e.body_text()),
            Vec::new(),
        )
    })?;
    let limit = q.limit.unwrap_or(EVENTS_DEFAULT);
    call(&st, AdminOp::Events { limit }).await
}

fn bad_query(e: &axum::extract::rejection::QueryRejection, what: &str) -> Failure {
    Failure(
        StatusCode::BAD_REQUEST,
        "bad_request",
        format!("{}: {what}", e.body_text()),
        Vec::new(),
    )
}

/// The window start and host filter of a flow query (`host` resolved by name, id or key).
async fn flow_filter(
    st: &AppState,
    q: &FlowsQuery,
    limit: u32,
) -> Result<meshd_store::FlowFilter, Failure> {
    let since = q
        .since
        .unwrap_or_else(|| crate::actor::unix_now().saturating_sub(st.flows.retention_secs));
    let host = match &q.host {
        None => None,
        Some(h) => match ask(st, AdminOp::ShowHost(h.clone())).await? {
            AdminReply::Host(v) => Some(v.id),
            _ => None,
        },
    };
    Ok(meshd_store::FlowFilter { since, host, limit })
}

/// Runs a flow query on a blocking thread.
async fn read_flows<T: Send + 'static>(
    st: &AppState,
    f: impl FnOnce(&dyn meshd_store::Store) -> Result<T, meshd_store::StoreError> + Send + 'static,
) -> Result<T, Failure> {
    let store = st.flows.store.clone();
    let internal =
        |m: String| Failure(StatusCode::INTERNAL_SERVER_ERROR, "internal", m, Vec::new());
    tokio::task::spawn_blocking(move || f(&*store))
        .await
        .map_err(|e| internal(format!("flow query task failed: {e}")))?
        .map_err(|e| {
            error!(error = %e, "flow query failed");
            internal(format!("reading flow records failed: {e}"))
        })
}

/// `GET /v1/flows?since=T&host=H&limit=N`: stored flow rows, oldest first.
async fn flows(
    _: Authed,
    State(st): State<AppState>,
    q: Result<axum::extract::Query<FlowsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Failure> {
    let axum::extract::Query(q) =
        q.map_err(|e| bad_query(&e, "since and limit are numbers, host a name, id or key"))?;
    let limit = q.limit.unwrap_or(FLOWS_MAX_ROWS).min(FLOWS_MAX_ROWS);
    let filter = flow_filter(&st, &q, limit).await?;
    let rows = read_flows(&st, move |s| s.flows(&filter)).await?;
    Ok(Json(rows).into_response())
}

/// `GET /v1/topology?since=T&group_by=K&host=H`: the flow graph.
async fn topology(
    _: Authed,
    State(st): State<AppState>,
    q: Result<axum::extract::Query<FlowsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Failure> {
    let axum::extract::Query(q) =
        q.map_err(|e| bad_query(&e, "since is a number, group_by host or a label key"))?;
    let group_by = q
        .group_by
        .clone()
        .unwrap_or_else(|| meshd_control::topology::GROUP_BY_HOST.to_string());
    if let Err(e) = meshd_control::model::validate_label(&group_by, "") {
        return Err(Failure(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("group_by: {e}"),
            Vec::new(),
        ));
    }
    let filter = flow_filter(&st, &q, TOPOLOGY_MAX_GROUPS).await?;
    let rows = read_flows(&st, move |s| s.flow_summary(&filter)).await?;
    let inventory: Vec<InventoryHost> = match ask(&st, AdminOp::ListHosts).await? {
        AdminReply::Hosts(hs) => hs
            .into_iter()
            .map(|h| InventoryHost {
                id: h.id,
                name: h.name,
                labels: h.labels,
            })
            .collect(),
        _ => Vec::new(),
    };
    let t = meshd_control::topology::topology(&rows, &inventory, &group_by, filter.since);
    Ok(Json(t).into_response())
}

/// `POST /v1/import`: a CMDB file as one change (every bad row refuses it).
async fn import(
    _: Authed,
    State(st): State<AppState>,
    Json(r): Json<meshd_control::api::ImportRequest>,
) -> Result<Response, Failure> {
    call(&st, AdminOp::Import(r)).await
}

/// The admin router, with the `/ui` page (`secure`: the API is on HTTPS, so is the cookie).
fn router(st: AppState, secure: bool) -> Router {
    let ui = crate::ui::router(crate::ui::UiAuth::with_auth(
        st.auth.clone(),
        secure,
        st.guard.clone(),
    ));
    Router::new()
        .route("/v1/hosts", get(list_hosts))
        .route("/v1/hosts/{host}", get(show_host).delete(remove_host))
        .route("/v1/hosts/{host}/labels", post(label))
        .route("/v1/hosts/{host}/unlabel", post(unlabel))
        .route("/v1/hosts/{host}/rename", post(rename))
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route("/v1/status", get(status))
        .route("/v1/health", get(health))
        .route("/v1/policy", get(policy_get).put(policy_put))
        .route("/v1/policy/history", get(policy_history))
        .route("/v1/policy/rollback/{version}", post(policy_rollback))
        .route("/v1/policy/diff", post(policy_diff))
        .route("/v1/policy/explain", post(policy_explain))
        .route("/v1/policy/check", post(policy_check))
        .route(
            "/v1/policy/mode",
            get(policy_mode_get).post(policy_mode_set),
        )
        .route("/v1/hosts/{host}/quarantine", post(quarantine))
        .route("/v1/hosts/{host}/rotate-key", post(rotate_key))
        .route("/v1/hosts/{host}/release", post(release))
        .route("/v1/hosts/{host}/revoke", post(revoke_host))
        .route("/v1/blocks", get(blocks))
        .route("/v1/events", get(events))
        .route("/v1/flows", get(flows))
        .route("/v1/topology", get(topology))
        .route("/v1/import", post(import))
        .route("/v1/admin/keys", get(admin_keys).post(add_key_set))
        .route(
            "/v1/admin/tokens",
            get(list_admin_tokens).post(create_admin_token),
        )
        .route(
            "/v1/admin/tokens/{name}",
            axum::routing::delete(revoke_admin_token),
        )
        .route("/v1/signed/policy", post(signed_policy))
        .route("/v1/signed/rollback/{version}", post(signed_rollback))
        .route("/v1/signed/mode", post(signed_mode))
        // A signed import of many hosts (~300 bytes a statement) outgrows axum's 2 MiB default.
        .route(
            "/v1/signed/hosts",
            post(signed_hosts).layer(axum::extract::DefaultBodyLimit::max(16 << 20)),
        )
        .route("/v1/signed/hosts/{host}", post(signed_host))
        .route_layer(axum::middleware::from_fn_with_state(
            st.metrics.clone(),
            count_request,
        ))
        .with_state(st)
        .merge(ui)
}

/// A route pattern as a label value: `/v1/hosts/{host}` → `/v1/hosts/:host` (no braces, which
/// simple text-format parsers take for the end of the label set).
fn route_label(pattern: &str) -> String {
    pattern.replace('{', ":").replace('}', "")
}

/// Counts an answered request in `meshd_coordinator_admin_requests_total` (by route pattern,
/// never by the host or token in the path).
async fn count_request(
    State(metrics): State<Arc<Metrics>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| route_label(p.as_str()));
    let r = next.run(req).await;
    metrics.admin_request(method.as_str(), &route, r.status().as_u16());
    r
}

/// Serves the admin API on `listener` (HTTPS when `tls` is given) until `stop`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    (cmds, flows): (Commands, FlowAccess),
    auth: AdminAuth,
    stop: watch::Receiver<bool>,
    limits: Limits,
    guard: Arc<Guard>,
    metrics: Arc<Metrics>,
) {
    let header_timeout = Duration::from_millis(limits.admin_header_timeout_ms);
    let app = router(
        AppState {
            cmds,
            flows,
            auth,
            guard: guard.clone(),
            metrics,
        },
        tls.is_some(),
    );
    match tls {
        None => serve_http(listener, app, header_timeout, stop).await,
        Some(config) => {
            let (tls_listener, acceptor) = TlsListener::start(listener, config, &limits, guard);
            serve_http(tls_listener, app, header_timeout, stop).await;
            // The accept loop owns the socket and the handshakes in flight: end them now.
            acceptor.abort();
            let _aborted = acceptor.await;
        }
    }
}

/// Serves `app` over plain HTTP on `listener` until `stop` (the metrics listener), with the
/// admin API's request-head timeout.
pub(crate) async fn serve_plain(
    listener: TcpListener,
    app: Router,
    header_timeout: Duration,
    stop: watch::Receiver<bool>,
) {
    serve_http(listener, app, header_timeout, stop).await
}

/// Resolves once `stop` is set (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _closed_means_stop = stop.wait_for(|v| *v).await;
}

/// Serves HTTP/1.1 on the connections `listener` hands over until `stop`: each request head
/// must arrive within `header_timeout` (so must the next one on a kept-alive connection), and
/// carries the peer's address ([`ConnectInfo`]). On stop, connections finish the request in
/// progress (for at most [`SHUTDOWN_GRACE`]).
async fn serve_http<L>(
    mut listener: L,
    app: Router,
    header_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    let mut conns = JoinSet::new();
    loop {
        let (io, remote) = tokio::select! {
            c = listener.accept() => c,
            () = stopped(&mut stop) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let app = app.clone();
        let mut stop = stop.clone();
        conns.spawn(async move {
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(remote));
                    let mut app = app.clone();
                    tower_service::Service::call(&mut app, req.map(axum::body::Body::new))
                },
            );
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
            let mut conn = std::pin::pin!(conn);
            let res = tokio::select! {
                r = conn.as_mut() => r,
                () = stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(SHUTDOWN_GRACE, conn).await.unwrap_or(Ok(()))
                }
            };
            if let Err(e) = res {
                debug!(%remote, error = %e, "admin API connection ended");
            }
        });
    }
    // Stopping: the tasks are finishing their last request.
    let _done = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    conns.abort_all();
}

/// How long connections may finish their request once the admin API stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Established connections handed to the HTTP server but not yet taken.
const ACCEPTED_QUEUE: usize = 16;
/// First byte of a TLS record carrying a handshake (a ClientHello).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// Largest plain HTTP request head read before answering it.
const MAX_PLAIN_HEAD: usize = 8 * 1024;

/// The admin API's TLS set-up, ready to serve.
pub struct AdminTls {
    /// rustls server configuration (HTTP/1.1).
    pub config: Arc<rustls::ServerConfig>,
    /// The leaf certificate file.
    pub cert_path: PathBuf,
    /// SHA-256 of the leaf certificate (DER), as `AB:CD:...` like `openssl x509 -fingerprint -sha256`.
    pub fingerprint: String,
    /// Whether the certificate was made on this start.
    pub generated: bool,
}

/// Loads the operator's certificate and key, or the generated pair in `state_dir`, making the
/// pair on first use ([`admin_cert_files`]). `ips`: addresses a generated certificate must name
/// (see [`generated_names`]); a kept one that lacks one of them is reported, not replaced, so
/// its fingerprint stays what clients trust.
pub fn load_or_create(
    state_dir: &path::Path,
    own: Option<&AdminTlsFiles>,
    ips: &[IpAddr],
) -> Result<AdminTls, AdminTlsError> {
    let files = admin_cert_files(state_dir, own, ips)?;
    let (cert_path, key_path) = (files.cert, files.key);
    let certs = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| AdminTlsError::ReadCert {
            path: cert_path.clone(),
            source,
        })?;
    let Some(leaf) = certs.first() else {
        return Err(AdminTlsError::NoCert { path: cert_path });
    };
    let fp = fingerprint(leaf);
    if own.is_none() && !files.generated {
        warn_missing_names(&cert_path, leaf, ips);
    }
    if own.is_some() {
        warn_if_readable(&key_path);
    }
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|source| AdminTlsError::ReadKey {
        path: key_path.clone(),
        source,
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(AdminTlsError::Versions)?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|source| AdminTlsError::CertKey {
        cert: cert_path.clone(),
        key: key_path.clone(),
        source,
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(AdminTls {
        config: Arc::new(config),
        cert_path,
        fingerprint: fp,
        generated: files.generated,
    })
}

/// Warns when a kept generated certificate does not name one of `ips` (the listen address moved).
fn warn_missing_names(cert_path: &path::Path, leaf: &CertificateDer<'_>, ips: &[IpAddr]) {
    let Ok(parsed) = rustls::server::ParsedCertificate::try_from(leaf) else {
        warn!(cert_path = %cert_path.display(), "cannot parse the admin API certificate");
        return;
    };
    for ip in ips.iter().filter(|ip| !ip.is_unspecified()) {
        let name = ServerName::IpAddress(ip.to_canonical().into());
        if rustls::client::verify_server_name(&parsed, &name).is_err() {
            warn!(cert_path = %cert_path.display(), address = %ip,
                "the admin API certificate does not name this address, so clients using it will \
                 refuse it: delete admin-cert.pem and admin-key.pem in the state directory to \
                 make a new one (and give clients the new admin-cert.pem), or use --admin-tls-cert");
        }
    }
}

/// Warns when the operator's private key file can be read by other users.
fn warn_if_readable(key_path: &path::Path) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(m) = std::fs::metadata(key_path) {
        if m.permissions().mode() & 0o004 != 0 {
            warn!(key_path = %key_path.display(), "the admin API private key is world-readable: chmod o-r it");
        }
    }
}

/// An axum listener handing over connections whose TLS handshake is done. The handshakes run
/// in their own tasks, each within `admin_handshake_timeout_ms`, so a slow or silent client
/// holds up no one; at most `admin_handshakes` at once, `admin_handshakes_per_source` per
/// source, the last `admin_loopback_reserved` only for loopback ([`Slots`]). A connection that
/// finds no slot is closed at once (not left in the backlog, where it would queue an operator's
/// connection behind a flood).
struct TlsListener {
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Starts the accept loop; abort the returned task to close the socket.
    fn start(
        tcp: TcpListener,
        config: Arc<rustls::ServerConfig>,
        limits: &Limits,
        guard: Arc<Guard>,
    ) -> (TlsListener, tokio::task::JoinHandle<()>) {
        let local = tcp
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (tx, rx) = mpsc::channel(ACCEPTED_QUEUE);
        let slots = Slots::new(
            limits.admin_handshakes,
            limits.admin_handshakes_per_source,
            limits.admin_loopback_reserved,
        );
        let timeout = Duration::from_millis(limits.admin_handshake_timeout_ms);
        let task = tokio::spawn(accept_loop(
            tcp,
            TlsAcceptor::from(config),
            tx,
            slots,
            timeout,
            guard,
        ));
        (
            TlsListener {
                accepted: rx,
                local,
            },
            task,
        )
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(c) => c,
            None => {
                error!("admin API accept loop ended");
                std::future::pending().await
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

async fn accept_loop(
    mut tcp: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
    mut slots: Slots,
    timeout: Duration,
    guard: Arc<Guard>,
) {
    let mut pending = JoinSet::new();
    // Which source each handshake task holds a slot for.
    let mut owners: HashMap<tokio::task::Id, IpAddr> = HashMap::new();
    let mut refusals = LogLimiter::new(Duration::from_secs(guard::LOG_EVERY_SECS));
    loop {
        let (stream, remote) = tokio::select! {
            () = tx.closed() => return,
            Some(done) = pending.join_next_with_id(), if !pending.is_empty() => {
                let id = match done {
                    Ok((id, ())) => id,
                    Err(e) => e.id(),
                };
                if let Some(ip) = owners.remove(&id) {
                    slots.release(ip);
                }
                continue;
            }
            c = axum::serve::Listener::accept(&mut tcp) => c,
        };
        if let Some(spa) = guard.admin_spa.get() {
            if !spa.admin_allowed(remote.ip()) {
                // `--admin-spa`: not knocked as admin. Closed before any byte is read or
                // written (the kernel has completed the TCP handshake already).
                debug!(source = %remote.ip(), "admin API: source has not knocked as admin; closing");
                let _reset = stream.set_zero_linger();
                drop(stream);
                continue;
            }
        }
        if let Err(why) = slots.take(remote.ip()) {
            Counters::bump(&guard.counters.admin_handshakes_refused);
            if let Some(refused) = refusals.hit(std::time::Instant::now()) {
                warn!(source = %remote.ip(), reason = ?why, refused, in_progress = slots.in_use(),
                    "admin API: too many TLS handshakes in progress; closing new connections");
            }
            // A reset rather than a close: no TIME_WAIT left behind for a flood.
            let _reset = stream.set_zero_linger();
            drop(stream);
            continue;
        }
        let (acceptor, tx, guard) = (acceptor.clone(), tx.clone(), guard.clone());
        let task = pending.spawn(async move {
            match tokio::time::timeout(timeout, handshake(stream, &acceptor)).await {
                Ok(Ok(Some(s))) => {
                    if tx.send((s, remote)).await.is_err() {
                        debug!(%remote, "admin API stopping: connection dropped");
                    }
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => debug!(%remote, error = %e, "admin API TLS handshake failed"),
                Err(_) => {
                    Counters::bump(&guard.counters.admin_handshakes_timed_out);
                    debug!(%remote, "admin API TLS handshake timed out");
                }
            }
        });
        owners.insert(task.id(), remote.ip());
    }
}

/// The TLS handshake; a client speaking plain HTTP gets a 400 saying to use HTTPS (`None`).
async fn handshake(
    stream: TcpStream,
    acceptor: &TlsAcceptor,
) -> std::io::Result<Option<TlsStream<TcpStream>>> {
    let mut first = [0u8; 1];
    if stream.peek(&mut first).await? == 0 {
        return Ok(None);
    }
    if first[0] != TLS_HANDSHAKE_RECORD {
        refuse_plain_http(stream).await?;
        return Ok(None);
    }
    acceptor.accept(stream).await.map(Some)
}

/// Answers a plain HTTP request on the HTTPS port with a 400 `tls_required` [`ApiError`], and
/// reads what the client still sends so closing does not reset the reply away.
async fn refuse_plain_http(mut stream: TcpStream) -> std::io::Result<()> {
    let local = stream.local_addr()?;
    let mut buf = vec![0u8; MAX_PLAIN_HEAD];
    let mut n = 0;
    while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf[n..]).await? {
            0 => return Ok(()),
            r => n += r,
        }
    }
    let body = serde_json::to_string(&ApiError {
        code: "tls_required".into(),
        message: format!(
            "the admin API on {local} speaks HTTPS only: use https://{local} \
             (meshctl: --server https://{local} --ca <coordinator state-dir>/{ADMIN_CERT_FILE})"
        ),
        failures: Vec::new(),
    })
    .map_err(std::io::Error::other)?;
    let head = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await?;
    while stream.read(&mut buf).await? > 0 {}
    Ok(())
}
