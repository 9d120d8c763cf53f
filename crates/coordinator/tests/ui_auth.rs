//! `/ui` on a real in-process coordinator: the page and its files are served from the
//! binary, the login sets the cookie, and the cookie is accepted on reads only.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use meshd_coordinator::{start, CoordinatorHandle, CoordinatorOptions};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

async fn coordinator(dir: &Path, tls: bool) -> CoordinatorHandle {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut o = CoordinatorOptions::new(dir);
    o.listen = "127.0.0.1:0".parse().unwrap();
    o.admin_listen = "127.0.0.1:0".parse().unwrap();
    o.admin_tls = tls;
    start(o).await.unwrap()
}

fn token(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("admin.token"))
        .unwrap()
        .trim()
        .to_string()
}

/// A reply: status, header lines (lower-cased names), body.
struct Reply {
    status: u16,
    head: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.head
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, req: String) -> Reply {
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let out = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines.next().unwrap()[9..12].parse().unwrap();
    let head = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        head,
        body: body.to_string(),
    }
}

fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> String {
    let mut r = format!("{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n");
    for (k, v) in headers {
        r += &format!("{k}: {v}\r\n");
    }
    r + &format!("content-length: {}\r\n\r\n{body}", body.len())
}

async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    exchange(tcp, request(method, path, headers, body)).await
}

fn login_body(token: &str) -> String {
    format!("token={token}")
}

const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_reads_but_never_writes() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path(), false).await;
    let a = c.admin_addr();
    let admin = token(dir.path());

    // The page and its files, without a token, with a policy that forbids inline code.
    let page = http(a, "GET", "/ui", &[], "").await;
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(page.body.contains("/ui/vendor/d3.min.js"), "{}", page.body);
    assert!(!page.body.contains("http://") && !page.body.contains("https://"));
    let csp = page.header("content-security-policy").unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
    let d3 = http(a, "GET", "/ui/vendor/d3.min.js", &[], "").await;
    assert_eq!(d3.status, 200);
    assert!(d3.body.starts_with("// https://d3js.org v5.16.0"));
    let lic = http(a, "GET", "/ui/vendor/d3.LICENSE", &[], "").await;
    assert!(lic.body.contains("BSD-3-Clause"));
    for f in ["/ui/app.js", "/ui/app.css"] {
        assert_eq!(http(a, "GET", f, &[], "").await.status, 200, "{f}");
    }

    // No cookie: the session check says so without counting a failed authentication.
    assert_eq!(http(a, "GET", "/ui/session", &[], "").await.status, 401);
    assert_eq!(c.guard_stats().admin_auth_failures, 0);

    // A wrong token at the login form: refused, no cookie, counted.
    let bad = http(
        a,
        "POST",
        "/ui/login",
        &[FORM],
        &login_body("meshd-admin-wrong"),
    )
    .await;
    assert_eq!(bad.status, 401);
    assert_eq!(bad.header("set-cookie"), None);
    assert_eq!(c.guard_stats().admin_auth_failures, 1);

    // The right one: the cookie, HttpOnly, SameSite=Strict, Path=/, not Secure on HTTP.
    let ok = http(a, "POST", "/ui/login", &[FORM], &login_body(&admin)).await;
    assert_eq!(ok.status, 204, "{}", ok.body);
    let set = ok.header("set-cookie").unwrap().to_string();
    let cookie = set.split(';').next().unwrap().to_string();
    assert_eq!(cookie, format!("meshd_admin={admin}"));
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.split("; ").any(|a| a == attr), "{set} lacks {attr}");
    }
    assert!(!set.contains("Secure"), "{set}");
    let with = [("cookie", cookie.as_str())];

    // Reads with the cookie work.
    assert_eq!(http(a, "GET", "/ui/session", &with, "").await.status, 204);
    let hosts = http(a, "GET", "/v1/hosts", &with, "").await;
    assert_eq!(hosts.status, 200, "{}", hosts.body);
    assert_eq!(http(a, "GET", "/v1/status", &with, "").await.status, 200);

    // Writes with the cookie alone are refused (and change nothing) ...
    let json = ("content-type", "application/json");
    let create = http(
        a,
        "POST",
        "/v1/tokens",
        &[with[0], json],
        r#"{"labels":{}}"#,
    )
    .await;
    assert_eq!(create.status, 401, "{}", create.body);
    let put = http(
        a,
        "PUT",
        "/v1/policy",
        &[with[0], json],
        r#"{"yaml":"rules: []\n"}"#,
    )
    .await;
    assert_eq!(put.status, 401);
    let bearer = format!("Bearer {admin}");
    let tokens = http(a, "GET", "/v1/tokens", &[("authorization", &bearer)], "").await;
    assert_eq!(
        tokens.body.trim(),
        "[]",
        "a token was made: {}",
        tokens.body
    );
    // ... while the bearer header still works for them.
    let create = http(
        a,
        "POST",
        "/v1/tokens",
        &[("authorization", &bearer), json],
        r#"{"labels":{}}"#,
    )
    .await;
    assert_eq!(create.status, 201, "{}", create.body);

    // A wrong cookie is refused on reads too.
    let wrong = [("cookie", "meshd_admin=meshd-admin-nope")];
    assert_eq!(http(a, "GET", "/v1/hosts", &wrong, "").await.status, 401);
    assert_eq!(http(a, "GET", "/ui/session", &wrong, "").await.status, 401);

    // Logout clears the cookie.
    let out = http(a, "POST", "/ui/logout", &[], "").await;
    assert_eq!(out.status, 204);
    assert!(out.header("set-cookie").unwrap().contains("Max-Age=0"));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_is_secure_on_https() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path(), true).await;
    assert!(c.admin_tls());
    let admin = token(dir.path());
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(dir.path().join(meshd_coordinator::admin::ADMIN_CERT_FILE))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots.add(cert).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(c.admin_addr())
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    let r = exchange(
        tls,
        request("POST", "/ui/login", &[FORM], &login_body(&admin)),
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let set = r.header("set-cookie").unwrap();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/", "Secure"] {
        assert!(set.split("; ").any(|a| a == attr), "{set} lacks {attr}");
    }
    c.stop().await;
}
