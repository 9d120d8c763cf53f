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
use meshd_control::state::AdminError;
use meshd_control::TokenId;
use tokio::sync::{mpsc, watch};

use crate::server::{admin_call, admin_token_hash, AdminOp, AdminReply, Cmd};

#[derive(Clone)]
struct AppState {
    cmds: mpsc::Sender<Cmd>,
    admin_hash: String,
}

struct Failure(StatusCode, &'static str, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (
            self.0,
            Json(ApiError {
                code: self.1.to_string(),
                message: self.2,
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
            AdminError::InvalidName(_) | AdminError::InvalidLabel(_) => {
                (StatusCode::BAD_REQUEST, "bad_request")
            }
        };
        Failure(s, c, e.to_string())
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
            )),
        }
    }
}

async fn call(st: &AppState, op: AdminOp) -> Result<Response, Failure> {
    let r = admin_call(&st.cmds, op)
        .await
        .map_err(|e| Failure(StatusCode::SERVICE_UNAVAILABLE, "internal", e.to_string()))??;
    Ok(match r {
        AdminReply::Host(h) => Json(h).into_response(),
        AdminReply::Hosts(h) => Json(h).into_response(),
        AdminReply::Token(t) => Json(t).into_response(),
        AdminReply::Tokens(t) => Json(t).into_response(),
        AdminReply::Created(t) => (StatusCode::CREATED, Json(t)).into_response(),
        AdminReply::Status(s) => Json(s).into_response(),
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
