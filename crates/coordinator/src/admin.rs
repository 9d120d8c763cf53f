//! Admin HTTP/JSON API (axum) for `meshctl`. Routes and types: `meshd_control::api`.
//! Authentication: `Authorization: Bearer <admin token>`, checked against the stored SHA-256.
//! Plain HTTP: bind it to loopback (the default); TLS for other addresses is not implemented yet.

use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use meshd_control::api::{
    ApiError, LabelRequest, RenameRequest, TokenCreateRequest, UnlabelRequest,
};
use meshd_control::api::{BlocksQuery, ExplainRequest, PolicyText};
use meshd_control::policy::PolicyError;
use meshd_control::state::AdminError;
use meshd_control::TokenId;
use tokio::sync::{mpsc, watch};

use crate::server::{admin_call, admin_token_hash, AdminOp, AdminReply, Cmd};

#[derive(Clone)]
struct AppState {
    cmds: mpsc::Sender<Cmd>,
    admin_hash: String,
}

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
            AdminError::NoSuchHost(_) | AdminError::NoSuchToken(_) | AdminError::HostRemoved(_) => {
                (StatusCode::NOT_FOUND, "not_found")
            }
            AdminError::NameTaken(_) => (StatusCode::CONFLICT, "conflict"),
            AdminError::InvalidName(_) | AdminError::InvalidLabel(_) | AdminError::Port(_) => {
                (StatusCode::BAD_REQUEST, "bad_request")
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
    type Rejection = Failure;
    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, Failure> {
        let tok = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match tok {
            Some(t) if admin_token_hash(t) == st.admin_hash => Ok(Authed),
            _ => Err(Failure(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong admin token: pass --token, set MESH_TOKEN, or read <state-dir>/admin.token".into(),
                Vec::new(),
            )),
        }
    }
}

async fn call(st: &AppState, op: AdminOp) -> Result<Response, Failure> {
    let r = admin_call(&st.cmds, op).await.map_err(|e| {
        Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "internal",
            e.to_string(),
            Vec::new(),
        )
    })??;
    Ok(match r {
        AdminReply::Host(h) => Json(h).into_response(),
        AdminReply::Hosts(h) => Json(h).into_response(),
        AdminReply::Token(t) => Json(t).into_response(),
        AdminReply::Tokens(t) => Json(t).into_response(),
        AdminReply::Created(t) => (StatusCode::CREATED, Json(t)).into_response(),
        AdminReply::Status(s) => Json(s).into_response(),
        AdminReply::Json(v) => Json(v).into_response(),
    })
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
async fn status(_: Authed, State(st): State<AppState>) -> Result<Response, Failure> {
    call(&st, AdminOp::Status).await
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
async fn quarantine(
    _: Authed,
    State(st): State<AppState>,
    Path(h): Path<String>,
) -> Result<Response, Failure> {
    call(&st, AdminOp::Quarantine(h)).await
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
async fn blocks(
    _: Authed,
    State(st): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<BlocksQuery>,
) -> Result<Response, Failure> {
    call(&st, AdminOp::Blocks(q)).await
}

/// The admin router.
fn router(st: AppState) -> Router {
    Router::new()
        .route("/v1/hosts", get(list_hosts))
        .route("/v1/hosts/{host}", get(show_host).delete(remove_host))
        .route("/v1/hosts/{host}/labels", post(label))
        .route("/v1/hosts/{host}/unlabel", post(unlabel))
        .route("/v1/hosts/{host}/rename", post(rename))
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route("/v1/status", get(status))
        .route("/v1/policy", get(policy_get).put(policy_put))
        .route("/v1/policy/history", get(policy_history))
        .route("/v1/policy/rollback/{version}", post(policy_rollback))
        .route("/v1/policy/diff", post(policy_diff))
        .route("/v1/policy/explain", post(policy_explain))
        .route("/v1/policy/check", post(policy_check))
        .route("/v1/hosts/{host}/quarantine", post(quarantine))
        .route("/v1/hosts/{host}/release", post(release))
        .route("/v1/hosts/{host}/revoke", post(revoke_host))
        .route("/v1/blocks", get(blocks))
        .with_state(st)
}

pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    cmds: mpsc::Sender<Cmd>,
    admin_hash: String,
    mut stop: watch::Receiver<bool>,
) {
    let app = router(AppState { cmds, admin_hash });
    let res = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|v| *v).await;
        })
        .await;
    if let Err(e) = res {
        tracing::error!(error = %e, "admin API stopped");
    }
}
