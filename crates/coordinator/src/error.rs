//! The coordinator's errors: one enum per public operation, each variant naming the file,
//! address or setting and carrying the cause as its `source` (so `{:#}` through anyhow, as
//! `meshd coordinator` prints it, reads `context: cause: …`).

use std::error::Error as StdError;
use std::net::SocketAddr;
use std::path::PathBuf;

use meshd_config::fsutil::FsError;
use meshd_config::KeyFileError;
use meshd_control::policy::PolicyError;
use meshd_control::state::RestoreError;
use meshd_control::PoolError;
use meshd_store::StoreError;

pub use crate::options::{
    AdvertiseError, ConfigFileError, LimitsError, OptionsError, ReplicaError,
};

/// A boxed cause from a layer with its own error type (rustls, rcgen, the QUIC set-up).
pub type Cause = Box<dyn StdError + Send + Sync + 'static>;

/// Why the coordinator could not start ([`crate::start`], [`crate::run`]).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A thread could not be started.
    #[error("starting a thread")]
    Thread(#[source] std::io::Error),
    /// The state directory could not be made or is open to others.
    #[error("coordinator state directory")]
    StateDir(#[source] FsError),
    /// The coordinator key could not be read or made.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The admin token file could not be made private, or written.
    #[error("admin token file")]
    AdminToken(#[source] FsError),
    /// The database could not be opened.
    #[error("opening {}", path.display())]
    OpenStore {
        /// The database file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: StoreError,
    },
    /// The stored hash of `<state-dir>/admin.token` is not 64 hex digits.
    #[error(
        "the stored admin token hash (meta key admin_token_hash) is corrupt: not 64 hex digits"
    )]
    AdminTokenHash,
    /// A PostgreSQL database could not be opened (`db`: its URL, password hidden).
    #[error("opening the database {db}")]
    OpenDb {
        /// The database.
        db: String,
        /// Cause.
        #[source]
        source: StoreError,
    },
    /// The store could not be read (or the admin token hash not written to it).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The configured pool is not usable.
    #[error("address pool")]
    Pool(#[source] PoolError),
    /// The stored state does not fit the configuration.
    #[error(transparent)]
    Restore(#[from] RestoreStateError),
    /// The listener limits are inconsistent.
    #[error(transparent)]
    Limits(#[from] LimitsError),
    /// No address for join tokens.
    #[error(transparent)]
    Advertise(#[from] AdvertiseError),
    /// The replica addresses are refused (a wildcard, one twice, this one's own).
    #[error(transparent)]
    Replicas(#[from] ReplicaError),
    /// The QUIC server configuration could not be built.
    #[error("QUIC server configuration")]
    Quic(#[source] Cause),
    /// The control (QUIC) socket could not be bound.
    #[error("binding control listener on {addr}")]
    BindControl {
        /// The listen address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The admin API socket could not be bound.
    #[error("binding admin API on {addr}")]
    BindAdmin {
        /// The listen address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The metrics listener could not be bound.
    #[error("binding the metrics listener on {addr}")]
    BindMetrics {
        /// The listen address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A bound socket's address could not be read.
    #[error("reading a listener's address")]
    LocalAddr(#[source] std::io::Error),
    /// The admin API's certificate or key.
    #[error(transparent)]
    AdminTls(#[from] AdminTlsError),
    /// A start-up task on a blocking thread failed.
    #[error("start-up task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// Why the coordinator key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be inspected.
    #[error("reading {}", path.display())]
    Inspect {
        /// The key file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// An empty key left by a failed first start could not be removed.
    #[error("removing {}", path.display())]
    RemoveEmpty {
        /// The key file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The key file could not be read, is open to others or holds no key; or a new one could
    /// not be written.
    #[error(transparent)]
    File(#[from] KeyFileError),
}

/// Why the stored state could not be restored (at start-up, and after a failed commit).
#[derive(Debug, thiserror::Error)]
pub enum RestoreStateError {
    /// A stored host does not fit the pool.
    #[error("restoring state from the database (was --pool changed?)")]
    Hosts(#[source] RestoreError),
    /// The stored policy does not parse.
    #[error("restoring the stored policy")]
    Policy(#[source] PolicyError),
}

/// Why the admin API's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AdminTlsError {
    /// One file of the generated pair is there, the other is not.
    #[error(
        "{} exists but {} does not: restore it, or delete {} so a new certificate is made \
         (clients that trusted the old one must then be given the new {})",
        there.display(),
        missing.display(),
        there.display(),
        cert.display()
    )]
    HalfAPair {
        /// The file that is there.
        there: PathBuf,
        /// The file that is missing.
        missing: PathBuf,
        /// The certificate file.
        cert: PathBuf,
    },
    /// The certificate file could not be read or parsed.
    #[error("reading the admin API certificate {}", path.display())]
    ReadCert {
        /// The certificate file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// The certificate file holds no certificate.
    #[error(
        "{} holds no certificate (expected PEM: -----BEGIN CERTIFICATE-----)",
        path.display()
    )]
    NoCert {
        /// The certificate file.
        path: PathBuf,
    },
    /// The key file could not be read or parsed.
    #[error("reading the admin API private key {}", path.display())]
    ReadKey {
        /// The key file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// rustls refused the protocol versions.
    #[error("admin API TLS protocol versions")]
    Versions(#[source] rustls::Error),
    /// rustls refused the certificate and key (e.g. they do not belong together).
    #[error("admin API certificate {} with key {}", cert.display(), key.display())]
    CertKey {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// Cause.
        #[source]
        source: rustls::Error,
    },
    /// A certificate could not be generated.
    #[error("{what}")]
    Generate {
        /// Which step.
        what: &'static str,
        /// Cause.
        #[source]
        source: rcgen::Error,
    },
    /// A generated file could not be written.
    #[error(transparent)]
    Write(#[from] FsError),
}

/// Why an in-process admin call ([`crate::CoordinatorHandle::admin`]) got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("coordinator stopped")]
pub struct Stopped;

/// Why [`crate::CoordinatorHandle::create_token`] made no token.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The coordinator is not running.
    #[error(transparent)]
    Stopped(#[from] Stopped),
    /// The operation was refused.
    #[error(transparent)]
    Admin(#[from] meshd_control::state::AdminError),
    /// The actor answered with another kind of reply.
    #[error("unexpected reply {0}")]
    UnexpectedReply(String),
}

/// `e` and its sources joined by `: ` (what anyhow's `{:#}` prints), for messages kept as text.
pub(crate) fn chain(e: &(dyn StdError + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_joins_the_causes_like_anyhow() {
        let e = StartError::StateDir(FsError::NotADirectory {
            path: "/x/state".into(),
        });
        assert_eq!(
            chain(&e),
            "coordinator state directory: /x/state is not a directory"
        );
        assert_eq!(chain(&e), format!("{:#}", anyhow::Error::from(e)));
    }
}
