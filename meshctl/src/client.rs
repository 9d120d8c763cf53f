//! Blocking client for the coordinator's admin HTTP/JSON API (`meshd_control::api`).
//!
//! Failures are a typed [`ApiFailure`] so `main` can turn them into operator hints.

use std::fmt;
use std::time::Duration;

use meshd_control::api::ApiError;
use serde::de::DeserializeOwned;
use serde::Serialize;
use ureq::tls::{RootCerts, TlsConfig, TlsProvider};

use crate::config::Trust;

/// Connect timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Whole-request timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an API call failed.
#[derive(Debug)]
pub enum ApiFailure {
    /// No TCP connection to the server.
    Unreachable {
        /// Base URL.
        url: String,
        /// Underlying cause.
        cause: String,
    },
    /// 401: the admin token was refused.
    Unauthorized {
        /// Where the token came from.
        token_source: String,
        /// The `ApiError` code: `token_expired`, `token_revoked`, or `unauthorized` (unknown).
        code: String,
        /// The server's message.
        message: String,
    },
    /// 404 with the server's message.
    NotFound {
        /// Server message.
        message: String,
    },
    /// Any other non-2xx reply.
    Server {
        /// HTTP status.
        status: u16,
        /// The `ApiError` code (`bad_request`, `policy_tests_failed`, ...; empty without one).
        code: String,
        /// Server message (the `ApiError` body, or the raw body).
        message: String,
        /// Itemised failures (a policy's parse error or failing tests).
        failures: Vec<String>,
    },
    /// The server's TLS certificate was refused.
    Untrusted {
        /// Base URL.
        url: String,
        /// Why rustls refused it.
        cause: CertProblem,
        /// rustls' own words.
        detail: String,
        /// What it was checked against.
        trust: String,
    },
    /// The TLS handshake failed for another reason.
    Tls {
        /// Base URL.
        url: String,
        /// What went wrong.
        detail: String,
    },
    /// The transfer failed after connecting, or the reply was not the expected JSON.
    Protocol {
        /// Base URL.
        url: String,
        /// What went wrong.
        detail: String,
    },
}

impl fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiFailure::Unreachable { url, cause } => write!(
                f,
                "cannot reach the coordinator at {url} ({cause}): is `meshd coordinator` running? \
                 set --server or MESH_SERVER"
            ),
            ApiFailure::Unauthorized {
                token_source,
                code,
                message,
            } if code == "token_expired" || code == "token_revoked" => write!(
                f,
                "the admin token was refused (it came from {token_source}): {message}"
            ),
            ApiFailure::Unauthorized { token_source, .. } => write!(
                f,
                "the admin token was refused (it came from {token_source}): check --token/MESH_TOKEN \
                 or <state-dir>/admin.token"
            ),
            ApiFailure::NotFound { message } => write!(f, "{message}"),
            ApiFailure::Server {
                status,
                message,
                failures,
                ..
            } => {
                write!(f, "the coordinator refused the request ({status}): {message}")?;
                for x in failures {
                    write!(f, "\n  {x}")?;
                }
                Ok(())
            }
            ApiFailure::Untrusted {
                url,
                cause,
                detail,
                trust,
            } => {
                let what = match cause {
                    CertProblem::UnknownIssuer => "is not signed by a trusted certificate",
                    CertProblem::WrongName => "is not valid for the name in the URL",
                    CertProblem::Expired => "has expired or is not valid yet",
                    CertProblem::Other => "was refused",
                };
                write!(
                    f,
                    "the coordinator's TLS certificate at {url} {what} ({detail}; checked against \
                     {trust}): "
                )?;
                match cause {
                    CertProblem::WrongName => write!(
                        f,
                        "use a --server address the certificate names (a generated one names the \
                         admin listen address, --advertise, localhost and 127.0.0.1), or give the \
                         coordinator a certificate for this name with --admin-tls-cert/--admin-tls-key"
                    ),
                    CertProblem::Expired => write!(
                        f,
                        "renew it (a generated one: delete admin-cert.pem and admin-key.pem in the \
                         coordinator's state directory and restart it), or check this machine's clock"
                    ),
                    CertProblem::UnknownIssuer | CertProblem::Other => write!(
                        f,
                        "pass --ca <coordinator state-dir>/admin-cert.pem (or set MESH_CA, or \
                         `ca_file` in the config file; a copy of that file works too), and compare its \
                         SHA-256 fingerprint with the one the coordinator logs at start"
                    ),
                }
            }
            ApiFailure::Tls { url, detail } => write!(
                f,
                "TLS handshake with {url} failed ({detail}): is the admin API plain HTTP? \
                 (it is on loopback unless the coordinator runs with --admin-tls) then use http://"
            ),
            ApiFailure::Protocol { url, detail } => write!(
                f,
                "bad reply from {url}: {detail} (is --server the coordinator's admin API address?)"
            ),
        }
    }
}

impl std::error::Error for ApiFailure {}

/// Why a server certificate was refused, as far as the hint goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertProblem {
    /// Not signed by a trusted certificate (self-signed and not given with --ca, another CA).
    UnknownIssuer,
    /// Valid, but not for the host name or address in the URL.
    WrongName,
    /// Outside its validity period.
    Expired,
    /// Anything else (bad signature, revoked, wrong usage, ...).
    Other,
}

impl CertProblem {
    fn of(e: &rustls::CertificateError) -> CertProblem {
        use rustls::CertificateError as C;
        match e {
            C::UnknownIssuer | C::BadSignature | C::UnhandledCriticalExtension => {
                CertProblem::UnknownIssuer
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => CertProblem::WrongName,
            C::Expired
            | C::ExpiredContext { .. }
            | C::NotValidYet
            | C::NotValidYetContext { .. } => CertProblem::Expired,
            _ => CertProblem::Other,
        }
    }
}

/// An admin API client.
pub struct Client {
    base: String,
    token: String,
    token_source: String,
    trust: String,
    agent: ureq::Agent,
    verbose: u8,
}

impl Client {
    /// A client for `base` (normalised URL) with a bearer token; `trust` checks an https://
    /// server's certificate.
    pub fn new(
        base: String,
        token: String,
        token_source: String,
        trust: &Trust,
        verbose: u8,
    ) -> Self {
        let roots = match trust {
            Trust::Certs { certs, .. } => RootCerts::new_with_certs(certs),
            Trust::System { .. } => RootCerts::PlatformVerifier,
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_global(Some(REQUEST_TIMEOUT))
            .tls_config(
                TlsConfig::builder()
                    .provider(TlsProvider::Rustls)
                    .root_certs(roots)
                    .build(),
            )
            .build()
            .new_agent();
        Client {
            base,
            token,
            token_source,
            trust: trust.to_string(),
            agent,
            verbose,
        }
    }

    /// The base URL (`http(s)://host:port`).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// GET `path`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiFailure> {
        let url = self.url(path);
        let r = self
            .agent
            .get(&url)
            .header("Authorization", self.auth())
            .call();
        self.finish("GET", &url, r)
    }

    /// POST `body` as JSON to `path`.
    pub fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ApiFailure> {
        let url = self.url(path);
        let body = serde_json::to_string(body).map_err(|e| ApiFailure::Protocol {
            url: self.base.clone(),
            detail: format!("encoding the request: {e}"),
        })?;
        let r = self
            .agent
            .post(&url)
            .header("Authorization", self.auth())
            .header("Content-Type", "application/json")
            .send(body.as_str());
        self.finish("POST", &url, r)
    }

    /// POST with an empty body (actions named by the path alone).
    pub fn post_empty<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiFailure> {
        let url = self.url(path);
        let r = self
            .agent
            .post(&url)
            .header("Authorization", self.auth())
            .send_empty();
        self.finish("POST", &url, r)
    }

    /// PUT `body` as JSON to `path`.
    pub fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ApiFailure> {
        let url = self.url(path);
        let body = serde_json::to_string(body).map_err(|e| ApiFailure::Protocol {
            url: self.base.clone(),
            detail: format!("encoding the request: {e}"),
        })?;
        let r = self
            .agent
            .put(&url)
            .header("Authorization", self.auth())
            .header("Content-Type", "application/json")
            .send(body.as_str());
        self.finish("PUT", &url, r)
    }

    /// DELETE `path`.
    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiFailure> {
        let url = self.url(path);
        let r = self
            .agent
            .delete(&url)
            .header("Authorization", self.auth())
            .call();
        self.finish("DELETE", &url, r)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn auth(&self) -> String {
        format!("Bearer {}", self.token)
    }

    fn finish<T: DeserializeOwned>(
        &self,
        method: &str,
        url: &str,
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T, ApiFailure> {
        let mut resp = r.map_err(|e| {
            if self.verbose > 0 {
                crate::note(format_args!("meshctl: {method} {url}: {e}"));
            }
            self.transport_failure(e)
        })?;
        let status = resp.status().as_u16();
        if self.verbose > 0 {
            crate::note(format_args!("meshctl: {method} {url} -> {status}"));
        }
        let body = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| ApiFailure::Protocol {
                url: self.base.clone(),
                detail: format!("reading the reply: {e}"),
            })?;
        if self.verbose > 1 {
            crate::note(format_args!("meshctl: reply body: {body}"));
        }
        if (200..300).contains(&status) {
            return serde_json::from_str(&body).map_err(|e| ApiFailure::Protocol {
                url: self.base.clone(),
                detail: format!("unexpected reply to {method} {url}: {e}"),
            });
        }
        Err(classify(status, &body, &self.token_source))
    }

    fn transport_failure(&self, e: ureq::Error) -> ApiFailure {
        let unreachable = |cause: String| ApiFailure::Unreachable {
            url: self.base.clone(),
            cause,
        };
        let tls = |e: &rustls::Error| match e {
            rustls::Error::InvalidCertificate(c) => ApiFailure::Untrusted {
                url: self.base.clone(),
                cause: CertProblem::of(c),
                detail: e.to_string(),
                trust: self.trust.clone(),
            },
            _ => ApiFailure::Tls {
                url: self.base.clone(),
                detail: e.to_string(),
            },
        };
        match e {
            ureq::Error::Rustls(r) => tls(&r),
            ureq::Error::Io(io) if rustls_error(&io).is_some() => {
                rustls_error(&io).map_or_else(|| unreachable(io.to_string()), tls)
            }
            ureq::Error::Io(io) => match io.kind() {
                std::io::ErrorKind::ConnectionRefused => unreachable("connection refused".into()),
                std::io::ErrorKind::TimedOut => unreachable("connection timed out".into()),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof => {
                    ApiFailure::Protocol {
                        url: self.base.clone(),
                        detail: format!("the connection was closed ({io})"),
                    }
                }
                _ => unreachable(io.to_string()),
            },
            ureq::Error::HostNotFound => unreachable("host not found".into()),
            ureq::Error::ConnectionFailed => unreachable("connection failed".into()),
            ureq::Error::Timeout(t) => unreachable(format!("timed out ({t})")),
            ureq::Error::BadUri(u) => ApiFailure::Protocol {
                url: self.base.clone(),
                detail: format!("bad URL {u}"),
            },
            other => ApiFailure::Protocol {
                url: self.base.clone(),
                detail: other.to_string(),
            },
        }
    }
}

/// The rustls error inside an I/O error (how a failed handshake reaches ureq's caller).
fn rustls_error(io: &std::io::Error) -> Option<&rustls::Error> {
    io.get_ref()?.downcast_ref::<rustls::Error>()
}

/// Turns a non-2xx reply into a failure, using the server's `ApiError` message when present.
pub fn classify(status: u16, body: &str, token_source: &str) -> ApiFailure {
    let (code, message, failures) = match serde_json::from_str::<ApiError>(body) {
        Ok(e) => (e.code, e.message, e.failures),
        Err(_) if body.trim().is_empty() => (
            String::new(),
            format!("HTTP {status} with no message"),
            Vec::new(),
        ),
        Err(_) => (
            String::new(),
            body.trim().chars().take(500).collect(),
            Vec::new(),
        ),
    };
    match status {
        401 => ApiFailure::Unauthorized {
            token_source: token_source.to_string(),
            code,
            message,
        },
        404 => ApiFailure::NotFound { message },
        _ => ApiFailure::Server {
            status,
            code,
            message,
            failures,
        },
    }
}

/// `?k=v&...` from the pairs whose value is present (values percent-encoded); empty if none.
pub fn query(pairs: &[(&str, Option<String>)]) -> String {
    let mut out = String::new();
    for (k, v) in pairs {
        if let Some(v) = v {
            out.push(if out.is_empty() { '?' } else { '&' });
            out.push_str(k);
            out.push('=');
            out.push_str(&segment(v));
        }
    }
    out
}

/// Percent-encodes one URL path segment (host names, ids, base64 keys with `/` and `+`).
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_replies() {
        let body = r#"{"code":"not_found","message":"no host \"x\""}"#;
        match classify(404, body, "--token") {
            ApiFailure::NotFound { message } => assert_eq!(message, "no host \"x\""),
            other => panic!("{other:?}"),
        }
        let e = classify(401, "{}", "MESH_TOKEN").to_string();
        assert!(
            e.contains("admin token was refused") && e.contains("MESH_TOKEN"),
            "{e}"
        );
        let body = r#"{"code":"token_revoked","message":"admin token \"ci\" was revoked"}"#;
        let e = classify(401, body, "--token").to_string();
        assert!(
            e.contains("refused (it came from --token)") && e.contains("\"ci\" was revoked"),
            "{e}"
        );
        let e = classify(409, r#"{"code":"conflict","message":"name taken"}"#, "").to_string();
        assert!(e.contains("409") && e.contains("name taken"), "{e}");
        let e = classify(502, "Bad Gateway", "").to_string();
        assert!(e.contains("Bad Gateway"), "{e}");
        let e = classify(500, "", "").to_string();
        assert!(e.contains("no message"), "{e}");
        let body = r#"{"code":"policy_tests_failed","message":"1 of the policy's tests failed","failures":["tests[1] a -> b tcp/1 expect deny: FAILED: allowed by rule r"]}"#;
        match classify(400, body, "") {
            ApiFailure::Server {
                status: 400,
                code,
                failures,
                ..
            } => {
                assert_eq!(code, "policy_tests_failed");
                assert_eq!(failures.len(), 1);
            }
            other => panic!("{other:?}"),
        }
        let e = classify(400, body, "").to_string();
        assert!(
            e.ends_with(
                "tests failed\n  tests[1] a -> b tcp/1 expect deny: FAILED: allowed by rule r"
            ),
            "{e}"
        );
    }

    #[test]
    fn queries() {
        assert_eq!(query(&[("host", None), ("since", None)]), "");
        assert_eq!(
            query(&[("host", Some("db 1".into())), ("since", Some("600".into()))]),
            "?host=db%201&since=600"
        );
        assert_eq!(
            query(&[("host", None), ("since", Some("60".into()))]),
            "?since=60"
        );
    }

    #[test]
    fn path_segments() {
        assert_eq!(segment("db-1.prod"), "db-1.prod");
        assert_eq!(segment("ab+c/d="), "ab%2Bc%2Fd%3D");
        assert_eq!(segment("a b"), "a%20b");
    }
}
