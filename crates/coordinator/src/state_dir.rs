//! The coordinator's state directory (0700): its key, database, admin token and the generated
//! admin API certificate pair. Every private file is written through the one atomic writer
//! (`meshd_config::fsutil`: temporary file, fsync, rename, fsync of the directory, 0600).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use meshd_config::fsutil::{ensure_private_dir, make_private, write_private_atomic};
use meshd_control::state::{AdminToken, Dirty, BOOTSTRAP_ADMIN_TOKEN};
use meshd_control::token::hash_secret;
use meshd_control::UnixTime;
use meshd_store::{Snapshot, Store, META_ADMIN_TOKEN_HASH};
use meshd_tunnel::PrivateKey;
use rand_core::{OsRng, RngCore as _};
use rustls::pki_types::ServerName;
use sha2::Digest as _;
use tracing::{info, warn};

use crate::error::{AdminTlsError, KeyError, StartError};
use crate::options::AdminTlsFiles;

/// Key file name in the state directory.
pub const KEY_FILE: &str = "coordinator.key";
/// Database file name in the state directory.
pub const DB_FILE: &str = "coordinator.db";
/// Admin token file name in the state directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// Admin token prefix.
pub const ADMIN_TOKEN_PREFIX: &str = "meshadm-";
/// The admin certificate file in the state directory (made on first start when needed).
pub const ADMIN_CERT_FILE: &str = "admin-cert.pem";
/// The admin certificate's private key in the state directory (0600).
pub const ADMIN_KEY_FILE: &str = "admin-key.pem";

/// Validity of a generated certificate.
const GENERATED_VALIDITY_DAYS: i64 = 10 * 365;

/// Makes sure `dir` exists and is private, and makes an admin token file written 0644 by an
/// earlier version private.
pub fn prepare(dir: &Path) -> Result<(), StartError> {
    ensure_private_dir(dir).map_err(StartError::StateDir)?;
    make_private(&dir.join(ADMIN_TOKEN_FILE)).map_err(StartError::AdminToken)
}

/// Loads the coordinator key, creating it (0600, atomically) on first start. A key file that
/// group or others may read is refused with the `chmod` that fixes it.
pub fn load_or_create_key(path: &Path) -> Result<PrivateKey, KeyError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.len() == 0 && !path.with_file_name(DB_FILE).exists() => {
            // Left by an earlier version whose first start hit a full disk: no key was ever
            // used (the database comes after it), so a new one is made.
            warn!(path = %path.display(), "replacing an empty coordinator key left by a failed first start");
            std::fs::remove_file(path).map_err(|source| KeyError::RemoveEmpty {
                path: path.to_owned(),
                source,
            })?;
        }
        Ok(_) => return Ok(meshd_config::load_private_key(path)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(KeyError::Inspect {
                path: path.to_owned(),
                source,
            })
        }
    }
    let k = PrivateKey::generate();
    // The atomic writer's no-replace form: a key is never overwritten.
    meshd_config::write_private_key(path, &k)?;
    info!(path = %path.display(), "created coordinator key");
    Ok(k)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The stored form of an admin token.
pub fn admin_token_hash(token: &str) -> String {
    hex(&hash_secret(token.trim().as_bytes()))
}

/// A fresh admin token: `meshadm-` + 32 random bytes, base64url (cookie-safe, see `ui.rs`).
pub(crate) fn generate_admin_token() -> String {
    let mut b = [0u8; 32];
    OsRng.fill_bytes(&mut b);
    format!("{ADMIN_TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(b))
}

/// The stored admin token hash; on first start a new token is made, written to
/// `<dir>/admin.token` (0600) and its hash stored. Blocking (file and store IO).
pub fn load_or_create_admin_token(store: &dyn Store, dir: &Path) -> Result<String, StartError> {
    if let Some(h) = store.get_meta(META_ADMIN_TOKEN_HASH)? {
        return Ok(h);
    }
    let path = dir.join(ADMIN_TOKEN_FILE);
    let token = generate_admin_token();
    write_private_atomic(&path, format!("{token}\n").as_bytes()).map_err(StartError::AdminToken)?;
    let h = admin_token_hash(&token);
    store.set_meta(META_ADMIN_TOKEN_HASH, &h)?;
    info!(path = %path.display(), "wrote initial admin token");
    Ok(h)
}

/// Makes sure the token of `<state-dir>/admin.token` (`hash`: its stored hex SHA-256) is the
/// admin token named `bootstrap`: an install from before named admin tokens gets the row on
/// its first start, written before anything else runs. An existing row (also a revoked one)
/// is left as it is. Blocking (store IO).
pub fn ensure_bootstrap_token(
    store: &dyn Store,
    snapshot: &mut Snapshot,
    hash: &str,
    now: UnixTime,
) -> Result<(), StartError> {
    if snapshot
        .admin_tokens
        .iter()
        .any(|t| t.name == BOOTSTRAP_ADMIN_TOKEN)
    {
        return Ok(());
    }
    let hash = crate::spa::parse_hex32(hash).ok_or(StartError::AdminTokenHash)?;
    let t = AdminToken {
        name: BOOTSTRAP_ADMIN_TOKEN.to_string(),
        hash,
        created_at: now,
        expires_at: None,
        revoked_at: None,
    };
    // Fenced on the snapshot's generation: a replica that started at the same moment and
    // wrote the row first makes this a conflict, and the row is there on the next start.
    snapshot.generation = store.commit_at(
        Some(snapshot.generation),
        &Dirty {
            admin_tokens: vec![t.clone()],
            ..Dirty::default()
        },
        &[],
    )?;
    snapshot.admin_tokens.push(t);
    Ok(())
}

/// Where the admin API's certificate and key are, and whether they were made on this start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// Made on this start (a self-signed pair in the state directory).
    pub generated: bool,
}

/// The operator's certificate files, or the generated pair in `state_dir`, made on first use
/// for the names [`generated_names`] gives `ips`. Half a generated pair is refused.
pub fn admin_cert_files(
    state_dir: &Path,
    own: Option<&AdminTlsFiles>,
    ips: &[IpAddr],
) -> Result<CertFiles, AdminTlsError> {
    if let Some(f) = own {
        return Ok(CertFiles {
            cert: f.cert.clone(),
            key: f.key.clone(),
            generated: false,
        });
    }
    let cert = state_dir.join(ADMIN_CERT_FILE);
    let key = state_dir.join(ADMIN_KEY_FILE);
    let generated = match (cert.exists(), key.exists()) {
        (true, true) => false,
        (false, false) => {
            let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").ok();
            generate(&cert, &key, &generated_names(ips, hostname.as_deref()))?;
            true
        }
        (c, _) => {
            let (there, missing) = if c { (&cert, &key) } else { (&key, &cert) };
            return Err(AdminTlsError::HalfAPair {
                there: there.clone(),
                missing: missing.clone(),
                cert: cert.clone(),
            });
        }
    };
    Ok(CertFiles {
        cert,
        key,
        generated,
    })
}

/// SHA-256 fingerprint of a DER certificate, upper-case hex pairs joined by `:`.
pub fn fingerprint(der: &[u8]) -> String {
    let d = sha2::Sha256::digest(der);
    let hex: Vec<String> = d.iter().map(|b| format!("{b:02X}")).collect();
    hex.join(":")
}

/// The names a generated certificate is made for: localhost, 127.0.0.1 and ::1, the admin
/// listen address, the control listen and advertised addresses (wildcards left out) and the
/// host name, without duplicates.
pub fn generated_names(ips: &[IpAddr], hostname: Option<&str>) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    let extra = ips
        .iter()
        .filter(|ip| !ip.is_unspecified())
        .map(|ip| ip.to_canonical().to_string())
        .chain(
            hostname
                .map(str::trim)
                .filter(|h| !h.is_empty() && h.parse::<IpAddr>().is_err())
                .filter(|h| ServerName::try_from(*h).is_ok())
                .map(str::to_string),
        );
    for n in extra {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    names
}

/// Makes a self-signed certificate for `names` and writes it and its key (both 0600, in the
/// 0700 state directory).
fn generate(cert_path: &Path, key_path: &Path, names: &[String]) -> Result<(), AdminTlsError> {
    let gen = |what| move |source| AdminTlsError::Generate { what, source };
    let mut params =
        rcgen::CertificateParams::new(names.to_vec()).map_err(gen("admin certificate names"))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "meshd coordinator admin API");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(GENERATED_VALIDITY_DAYS);
    let key = rcgen::KeyPair::generate().map_err(gen("generating the admin certificate key"))?;
    let cert = params
        .self_signed(&key)
        .map_err(gen("signing the admin certificate"))?;
    // The key first: a crash in between leaves a key without a certificate, which start-up
    // reports, never a certificate whose key is lost.
    write_private_atomic(key_path, key.serialize_pem().as_bytes())?;
    write_private_atomic(cert_path, cert.pem().as_bytes())?;
    info!(cert_path = %cert_path.display(), key_path = %key_path.display(), names = ?names,
        "generated a self-signed admin API certificate");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_format() {
        // SHA-256 of the empty input.
        assert_eq!(
            fingerprint(b""),
            "E3:B0:C4:42:98:FC:1C:14:9A:FB:F4:C8:99:6F:B9:24:\
             27:AE:41:E4:64:9B:93:4C:A4:95:99:1B:78:52:B8:55"
        );
    }

    #[test]
    fn names_of_a_generated_certificate() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            generated_names(&[ip("0.0.0.0"), ip("::")], None),
            ["localhost", "127.0.0.1", "::1"]
        );
        assert_eq!(
            generated_names(
                &[
                    ip("198.18.0.1"),
                    ip("127.0.0.1"),
                    ip("::ffff:198.18.0.1"),
                    ip("fd00::1")
                ],
                Some("coord-1\n"),
            ),
            [
                "localhost",
                "127.0.0.1",
                "::1",
                "198.18.0.1",
                "fd00::1",
                "coord-1"
            ]
        );
        // Not a DNS name: left out.
        assert_eq!(generated_names(&[], Some("bad name")).len(), 3);
    }

    #[test]
    fn half_a_generated_pair_is_refused_naming_both_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(ADMIN_CERT_FILE), "x").unwrap();
        let e = admin_cert_files(dir.path(), None, &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(ADMIN_CERT_FILE) && e.contains(ADMIN_KEY_FILE) && e.contains("does not"),
            "{e}"
        );
    }

    #[test]
    fn a_generated_pair_is_private_and_kept() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let made = admin_cert_files(dir.path(), None, &[]).unwrap();
        assert!(made.generated);
        for f in [&made.cert, &made.key] {
            let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", f.display());
        }
        let kept = admin_cert_files(dir.path(), None, &[]).unwrap();
        assert!(!kept.generated);
        assert_eq!((kept.cert, kept.key), (made.cert, made.key));
    }
}
