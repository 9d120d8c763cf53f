//! The admin API's transport: HTTPS when bound anywhere but loopback (here 0.0.0.0, reached on
//! 127.0.0.1), a generated certificate kept across restarts, the operator's own certificate,
//! plain HTTP refused on the HTTPS port, plain HTTP on loopback by default.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;

use meshd_coordinator::admin::{fingerprint, ADMIN_CERT_FILE, ADMIN_KEY_FILE};
use meshd_coordinator::options::AdminTlsFiles;
use meshd_coordinator::{start, CoordinatorHandle, CoordinatorOptions};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// A start error as `meshd coordinator` prints it (anyhow's `{:#}`: context, then causes).
fn shown(e: meshd_coordinator::StartError) -> String {
    format!("{:#}", anyhow::Error::from(e))
}

/// Makes an existing state directory private (tempdir makes it 0755); a missing one is made
/// 0700 by the coordinator.
fn private_dir(dir: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    if dir.exists() {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
}

/// A coordinator whose admin API listens on `admin` (control on 127.0.0.1).
async fn coordinator(
    dir: &Path,
    admin: &str,
    tweak: impl FnOnce(&mut CoordinatorOptions),
) -> CoordinatorHandle {
    // The state directory must be private (tempdir makes it 0755).
    private_dir(dir);
    let mut o = CoordinatorOptions::new(dir);
    o.listen = "127.0.0.1:0".parse().unwrap();
    o.admin_listen = admin.parse().unwrap();
    tweak(&mut o);
    start(o).await.unwrap()
}

/// The admin port on 127.0.0.1 (the coordinator may be bound to the wildcard address).
fn local(c: &CoordinatorHandle) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], c.admin_addr().port()))
}

fn token(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("admin.token"))
        .unwrap()
        .trim()
        .to_string()
}

fn request(token: &str) -> String {
    format!(
        "GET /v1/status HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n\
         connection: close\r\n\r\n"
    )
}

fn read_certs(pem: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(pem)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

/// A GET over TLS trusting only `roots`, as `name`; the whole reply, or the rustls error.
async fn https_get(
    addr: SocketAddr,
    name: &str,
    roots: &[CertificateDer<'static>],
    token: &str,
) -> Result<String, std::io::Error> {
    let mut store = rustls::RootCertStore::empty();
    for c in roots {
        store.add(c.clone()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_string()).unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(request(token).as_bytes()).await?;
    let mut out = String::new();
    tls.read_to_string(&mut out).await?;
    Ok(out)
}

/// A plain HTTP GET; the whole reply.
async fn http_get(addr: SocketAddr, token: &str) -> std::io::Result<String> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(request(token).as_bytes()).await?;
    let mut out = Vec::new();
    tcp.read_to_end(&mut out).await?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn cert_error(e: &std::io::Error) -> Option<&rustls::CertificateError> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(c) => Some(c),
        _ => None,
    }
}

/// A self-signed certificate and key (PEM) for `names`.
fn self_signed(names: &[&str]) -> (String, String) {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let ck = rcgen::generate_simple_self_signed(names).unwrap();
    (ck.cert.pem(), ck.signing_key.serialize_pem())
}

#[tokio::test]
async fn non_loopback_serves_https_only_and_keeps_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path(), "0.0.0.0:0", |_| {}).await;
    assert!(c.admin_tls());
    let cert_path = dir.path().join(ADMIN_CERT_FILE);
    let key_path = dir.path().join(ADMIN_KEY_FILE);
    let key_mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
    assert_eq!(key_mode & 0o777, 0o600, "key file mode {key_mode:o}");
    let certs = read_certs(&cert_path);
    let fp = fingerprint(&certs[0]);
    assert_eq!(c.admin_fingerprint(), Some(fp.as_str()));
    assert_eq!(fp.len(), 32 * 3 - 1, "{fp}");
    let tok = token(dir.path());
    let addr = local(&c);

    // A client that connects and says nothing holds up no one.
    let _silent = TcpStream::connect(addr).await.unwrap();

    // HTTPS with the generated certificate as the only root, by address and by name.
    for name in ["127.0.0.1", "localhost"] {
        let reply = https_get(addr, name, &certs, &tok).await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.contains("\"hosts\""), "{reply}");
    }

    // Plain HTTP on the same port: a 400 that says to use HTTPS, never the data.
    let reply = http_get(addr, &tok).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.contains("tls_required"), "{reply}");
    assert!(reply.contains(&format!("https://{addr}")), "{reply}");
    assert!(!reply.contains("\"hosts\""), "{reply}");

    // Any other certificate as the root: refused by the client.
    let (other, _) = self_signed(&["127.0.0.1"]);
    let other = CertificateDer::from_pem_slice(other.as_bytes()).unwrap();
    let e = https_get(addr, "127.0.0.1", &[other], &tok)
        .await
        .unwrap_err();
    assert_eq!(
        cert_error(&e),
        Some(&rustls::CertificateError::UnknownIssuer),
        "{e}"
    );
    c.stop().await;

    // Restart: the same certificate (same fingerprint, same file), still served.
    let pem_before = std::fs::read(&cert_path).unwrap();
    let c = coordinator(dir.path(), "0.0.0.0:0", |_| {}).await;
    assert_eq!(c.admin_fingerprint(), Some(fp.as_str()));
    assert_eq!(std::fs::read(&cert_path).unwrap(), pem_before);
    let reply = https_get(local(&c), "127.0.0.1", &certs, &tok)
        .await
        .unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    c.stop().await;
}

#[tokio::test]
async fn loopback_is_plain_http_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path(), "127.0.0.1:0", |_| {}).await;
    assert!(!c.admin_tls());
    assert_eq!(c.admin_fingerprint(), None);
    assert!(!dir.path().join(ADMIN_CERT_FILE).exists());
    let reply = http_get(c.admin_addr(), &token(dir.path())).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    c.stop().await;
}

#[tokio::test]
async fn forced_tls_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path(), "127.0.0.1:0", |o| o.admin_tls = true).await;
    assert!(c.admin_tls());
    let certs = read_certs(&dir.path().join(ADMIN_CERT_FILE));
    let reply = https_get(c.admin_addr(), "127.0.0.1", &certs, &token(dir.path()))
        .await
        .unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    c.stop().await;
}

#[tokio::test]
async fn operator_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (cert, key) = self_signed(&["coordinator.mesh.test"]);
    let files = AdminTlsFiles {
        cert: dir.path().join("c.pem"),
        key: dir.path().join("k.pem"),
    };
    std::fs::write(&files.cert, &cert).unwrap();
    std::fs::write(&files.key, &key).unwrap();
    let c = coordinator(&state, "127.0.0.1:0", |o| {
        o.admin_tls_files = Some(files.clone())
    })
    .await;
    let certs = read_certs(&files.cert);
    assert_eq!(c.admin_fingerprint(), Some(fingerprint(&certs[0]).as_str()));
    assert!(!state.join(ADMIN_CERT_FILE).exists());
    let tok = token(&state);
    let reply = https_get(c.admin_addr(), "coordinator.mesh.test", &certs, &tok)
        .await
        .unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    // Its names do not include 127.0.0.1.
    let e = https_get(c.admin_addr(), "127.0.0.1", &certs, &tok)
        .await
        .unwrap_err();
    assert!(
        matches!(
            cert_error(&e),
            Some(
                rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. }
            )
        ),
        "{e}"
    );
    c.stop().await;

    // A key that does not belong to the certificate: refused at start, naming the files.
    let (_, other_key) = self_signed(&["x.test"]);
    std::fs::write(&files.key, other_key).unwrap();
    let mut o = CoordinatorOptions::new(&state);
    o.listen = "127.0.0.1:0".parse().unwrap();
    o.admin_listen = "127.0.0.1:0".parse().unwrap();
    o.admin_tls_files = Some(files.clone());
    let e = shown(start(o).await.err().unwrap());
    assert!(e.contains("c.pem") && e.contains("k.pem"), "{e}");
}

#[tokio::test]
async fn half_a_generated_pair_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path(), "0.0.0.0:0", |_| {}).await;
    c.stop().await;
    std::fs::remove_file(dir.path().join(ADMIN_KEY_FILE)).unwrap();
    let mut o = CoordinatorOptions::new(dir.path());
    o.listen = "127.0.0.1:0".parse().unwrap();
    o.admin_listen = "0.0.0.0:0".parse().unwrap();
    let e = shown(start(o).await.err().unwrap());
    assert!(
        e.contains(ADMIN_CERT_FILE) && e.contains(ADMIN_KEY_FILE) && e.contains("does not"),
        "{e}"
    );
    // Nothing was overwritten.
    assert!(dir.path().join(ADMIN_CERT_FILE).exists());
}
