//! `GET /ui`: the live topology page, served by the admin API from the binary (HTML, JS, CSS
//! and d3 v5.16.0 under `crates/coordinator/ui/`, with d3's licence), so it works on an
//! air-gapped network.
//!
//! The page reads `GET /v1/topology` and `GET /v1/flows` (every few seconds) and draws the
//! graph in SVG: nodes are hosts or label groups (`group_by`), edges are coloured by verdict,
//! a click on an edge lists its flows and the rule that allowed them (or, denied or
//! would-deny, the label rule that would be needed).
//!
//! Authentication is the admin token, entered once in the page's login form: `POST
//! /ui/login` checks it like a bearer token (same hash comparison, same failure backoff) and
//! sets the cookie [`COOKIE`] (`HttpOnly; SameSite=Strict; Path=/`, plus `Secure` when the
//! API is on HTTPS). The API takes that cookie on reads only (GET/HEAD, see
//! [`crate::admin::presented_token`]): every change still needs the `Authorization` header,
//! which a cross-site page cannot set, so the cookie cannot be used to change anything.
//! The static files need no token (they hold no data).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;

use meshd_control::state::{AdminToken, AdminTokens, BOOTSTRAP_ADMIN_TOKEN};

use crate::guard::Guard;

/// Name of the login cookie (its value is the admin token).
pub const COOKIE: &str = "meshd_admin";

const INDEX_HTML: &str = include_str!("../ui/index.html");
const APP_JS: &str = include_str!("../ui/app.js");
const APP_CSS: &str = include_str!("../ui/app.css");
const D3_JS: &str = include_str!("../ui/vendor/d3.min.js");
const D3_LICENSE: &str = include_str!("../ui/vendor/d3.LICENSE");

/// Everything the `/ui` routes need to check a token.
#[derive(Clone)]
pub struct UiAuth {
    auth: crate::admin::AdminAuth,
    secure: bool,
    guard: Arc<Guard>,
}

impl UiAuth {
    /// `admin_hash`: the stored hash of one admin token ([`crate::admin_token_hash`]), taken
    /// as the `bootstrap` token with no expiry; `secure`: the admin API speaks HTTPS (the
    /// cookie gets `Secure`); `guard`: the failure backoff shared with the API.
    pub fn new(admin_hash: String, secure: bool, guard: Arc<Guard>) -> Self {
        let tokens = crate::spa::parse_hex32(&admin_hash).map(|hash| AdminToken {
            name: BOOTSTRAP_ADMIN_TOKEN.to_string(),
            hash,
            created_at: 0,
            expires_at: None,
            revoked_at: None,
        });
        Self::with_auth(
            crate::admin::AdminAuth::fixed(AdminTokens::from_tokens(tokens)),
            secure,
            guard,
        )
    }

    /// As [`UiAuth::new`], checking tokens against `auth` (the admin API's).
    pub fn with_auth(auth: crate::admin::AdminAuth, secure: bool, guard: Arc<Guard>) -> Self {
        UiAuth {
            auth,
            secure,
            guard,
        }
    }

    /// Checks a request as the admin API does (bearer on any method, the cookie on reads):
    /// `Err` is the response to send (401, or 429 in backoff). For handlers outside the admin
    /// API that serve the page's data (tests' fixtures).
    #[allow(clippy::result_large_err)] // the rejection is the response itself
    pub fn check(&self, parts: &Parts) -> Result<(), Response> {
        crate::admin::authenticate(parts, &self.auth, &self.guard)
    }
}

/// The token in the request's [`COOKIE`], if any.
pub fn cookie_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
        .filter(|t| !t.is_empty())
}

/// The `/ui` routes: the page, its files, login, logout and a session check.
pub fn router(auth: UiAuth) -> Router {
    Router::new()
        .route(
            "/ui",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/ui/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/ui/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
        .route(
            "/ui/vendor/d3.min.js",
            get(|| async { asset("text/javascript; charset=utf-8", D3_JS) }),
        )
        .route(
            "/ui/vendor/d3.LICENSE",
            get(|| async { asset("text/plain; charset=utf-8", D3_LICENSE) }),
        )
        .route("/ui/login", post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/session", get(session))
        .with_state(auth)
}

/// A static file with headers that keep the page to itself: no inline script or style, no
/// framing, no referrer.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// The login form's body (`application/x-www-form-urlencoded`).
#[derive(Deserialize)]
struct Login {
    token: String,
}

fn source(parts: &Parts) -> Option<IpAddr> {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

/// `POST /ui/login`: checks the token (as a bearer token would be checked) and sets the
/// cookie: 204, or the API's 401/429.
async fn login(State(auth): State<UiAuth>, parts: Parts, Form(f): Form<Login>) -> Response {
    let token = f.token.trim();
    // Admin tokens are `meshd-admin-` + URL-safe base64: nothing else can be a cookie value.
    let cookie_safe = token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let presented = cookie_safe.then_some(token);
    if let Err(r) = crate::admin::check_token(source(&parts), presented, &auth.auth, &auth.guard) {
        return r;
    }
    let secure = if auth.secure { "; Secure" } else { "" };
    let cookie = format!("{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/{secure}");
    match HeaderValue::from_str(&cookie) {
        Ok(v) => (StatusCode::NO_CONTENT, [(header::SET_COOKIE, v)]).into_response(),
        Err(_) => StatusCode::BAD_REQUEST.into_response(),
    }
}

/// `POST /ui/logout`: clears the cookie.
async fn logout(State(auth): State<UiAuth>) -> Response {
    let secure = if auth.secure { "; Secure" } else { "" };
    let cookie = format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0{secure}");
    match HeaderValue::from_str(&cookie) {
        Ok(v) => (StatusCode::NO_CONTENT, [(header::SET_COOKIE, v)]).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// `GET /ui/session`: 204 if the cookie (or a bearer header) holds the admin token, 401 if
/// none is presented — without counting that as a failed authentication, since every first
/// visit has no cookie — and the API's 401/429 for a wrong one.
async fn session(State(auth): State<UiAuth>, parts: Parts) -> Response {
    if crate::admin::presented_token(&parts).is_none() {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    match auth.check(&parts) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(r) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        assert_eq!(cookie_token(&h), None);
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=b; meshd_admin=tok"),
        );
        assert_eq!(cookie_token(&h), Some("tok"));
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("meshd_adminx=1"));
        h.append(header::COOKIE, HeaderValue::from_static("meshd_admin="));
        assert_eq!(cookie_token(&h), None);
    }
}
