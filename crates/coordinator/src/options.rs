//! Coordinator options, the clap flags for `meshd coordinator`, and the config file.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::Deserialize;

/// Why the `--config` file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("reading coordinator config {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid (the cause names the line and field).
    #[error("parsing coordinator config {}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: toml::de::Error,
    },
}

/// Why listener limits were refused ([`Limits::validate`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitsError {
    /// A limit that must be at least 1 is 0.
    #[error("limits.{0} must be at least 1")]
    Zero(&'static str),
    /// The loopback share would leave no handshake for anyone else.
    #[error("limits.admin_loopback_reserved ({reserved}) must be below limits.admin_handshakes ({total})")]
    LoopbackReserved {
        /// `admin_loopback_reserved`.
        reserved: usize,
        /// `admin_handshakes`.
        total: usize,
    },
}

/// No address for join tokens to carry ([`CoordinatorOptions::advertise_for`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "--listen {listen} is a wildcard address, so join tokens cannot carry it: \
     pass --advertise ADDR:PORT with the address hosts reach the coordinator on"
)]
pub struct AdvertiseError {
    /// The wildcard listen address.
    pub listen: SocketAddr,
}

/// A replica address list that cannot go into join tokens ([`check_replicas`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaError {
    /// A wildcard address or port 0: agents cannot reach it.
    #[error("{from}: {addr} is not an address agents can reach (a wildcard or port 0): give each replica's advertised control address")]
    Unreachable {
        /// `--replica` or `replicas in FILE`.
        from: String,
        /// The address.
        addr: SocketAddr,
    },
    /// Named twice, or the same as this coordinator's advertised address.
    #[error("{from}: {addr} is listed twice (list only the *other* replicas; this one's advertised address is always first)")]
    Duplicate {
        /// `--replica` or `replicas in FILE`.
        from: String,
        /// The address.
        addr: SocketAddr,
    },
    /// More than a join token carries.
    #[error("{from}: {count} replicas, at most {max} are supported")]
    TooMany {
        /// `--replica` or `replicas in FILE`.
        from: String,
        /// How many were given.
        count: usize,
        /// [`meshd_control::token::MAX_TOKEN_REPLICAS`].
        max: usize,
    },
}

/// Checks the other replicas' addresses (`from` names where they came from in errors):
/// reachable, none twice, not `advertise` (this coordinator's own, when known), bounded.
pub fn check_replicas(
    from: &str,
    advertise: Option<SocketAddr>,
    replicas: &[SocketAddr],
) -> Result<(), ReplicaError> {
    let max = meshd_control::token::MAX_TOKEN_REPLICAS;
    if replicas.len() > max {
        return Err(ReplicaError::TooMany {
            from: from.into(),
            count: replicas.len(),
            max,
        });
    }
    let mut seen: Vec<SocketAddr> = advertise.into_iter().collect();
    for &addr in replicas {
        if addr.ip().is_unspecified() || addr.port() == 0 {
            return Err(ReplicaError::Unreachable {
                from: from.into(),
                addr,
            });
        }
        if seen.contains(&addr) {
            return Err(ReplicaError::Duplicate {
                from: from.into(),
                addr,
            });
        }
        seen.push(addr);
    }
    Ok(())
}

/// Why flags and config file do not make options ([`CoordinatorArgs::resolve`]).
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    /// The config file could not be read or parsed.
    #[error(transparent)]
    File(#[from] ConfigFileError),
    /// Only one of `admin_tls_cert` and `admin_tls_key` is set in the file.
    #[error(
        "coordinator config {}: admin_tls_cert and admin_tls_key go together: set \
         both, or neither to use a self-signed certificate kept in the state directory",
        path.display()
    )]
    TlsPair {
        /// The config file.
        path: PathBuf,
    },
    /// The file's `[limits]` are refused.
    #[error("coordinator config {}", path.display())]
    Limits {
        /// The config file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: LimitsError,
    },
    /// No address for join tokens.
    #[error(transparent)]
    Advertise(#[from] AdvertiseError),
    /// `--replica` / `replicas` is refused.
    #[error(transparent)]
    Replicas(#[from] ReplicaError),
    /// `flow_retention` or `flow_rows_per_host` is refused.
    #[error("coordinator config {}: {message}", path.display())]
    Flows {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A `key_rotation` or `[[key_rotation_group]]` setting is refused.
    #[error("{}: {message}", path.display())]
    KeyRotation {
        /// The config file.
        path: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },
    /// The scan detector's settings are refused.
    #[error("coordinator scan response settings")]
    Scan(#[from] meshd_control::state::ScanConfigError),
    /// An alert setting is refused (a webhook URL, the secret file).
    #[error("coordinator alerts: {0}")]
    Alerts(String),
    /// An SPA setting is refused (`[spa]`, `--spa-window`, `--admin-spa`).
    #[error("coordinator SPA: {0}")]
    Spa(String),
    /// The file's `db` is not a database URL.
    #[error("coordinator config {}: db", path.display())]
    Db {
        /// The config file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: meshd_store::DbSpecError,
    },
}

/// Flow record settings (`flow_retention`, `flow_rows_per_host` in the config file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowSettings {
    /// How long flow rows are kept (seconds; default 24 hours).
    pub retention_secs: u64,
    /// Rows kept per host per reporting interval (default
    /// [`meshd_control::state::DEFAULT_FLOW_ROWS_PER_HOST`]).
    pub rows_per_host: usize,
    /// How often old rows are pruned (seconds).
    pub prune_every_secs: u64,
    /// Rows deleted per pruning transaction (other commits run between batches).
    pub prune_batch: u32,
}

/// Default `flow_retention`: 24 hours (a day of learning; at 1,000 hosts × 100 flow rows every 10 s
/// that is ~108 GB of SQLite, see benches/results/2026-12-02-issue16-flow-ingest.txt).
pub const DEFAULT_FLOW_RETENTION_SECS: u64 = 86_400;

impl Default for FlowSettings {
    fn default() -> Self {
        FlowSettings {
            retention_secs: DEFAULT_FLOW_RETENTION_SECS,
            rows_per_host: meshd_control::state::DEFAULT_FLOW_ROWS_PER_HOST,
            prune_every_secs: 60,
            prune_batch: 10_000,
        }
    }
}

/// A duration like `7d`, `12h`, `30m`, `90s` or a bare number of seconds.
pub fn parse_duration_secs(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().ok()?;
    let mul = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    n.checked_mul(mul)
}

/// The rotation schedule of a config file, each period checked with an error naming its key.
fn key_rotation_schedule(
    file: &CoordinatorFile,
    path: &Path,
) -> Result<meshd_control::rotation::RotationSchedule, OptionsError> {
    use meshd_control::rotation::{parse_period, RotationGroup, RotationSchedule};
    let bad = |message: String| OptionsError::KeyRotation {
        path: path.to_owned(),
        message,
    };
    let default = file
        .key_rotation
        .as_deref()
        .map(|p| parse_period(p).map_err(|e| bad(format!("key_rotation: {e}"))))
        .transpose()?;
    let mut groups = Vec::new();
    for (i, g) in file.key_rotation_group.iter().enumerate() {
        let period = parse_period(&g.period)
            .map_err(|e| bad(format!("key_rotation_group[{i}].period: {e}")))?;
        if g.selector.is_empty() {
            return Err(bad(format!(
                "key_rotation_group[{i}].selector: give at least one label (e.g. {{ env = \"prod\" }}); use key_rotation for every host"
            )));
        }
        groups.push(RotationGroup {
            selector: g.selector.clone(),
            period,
        });
    }
    Ok(RotationSchedule { default, groups })
}

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/meshd";
/// Default control (QUIC) listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7443";
/// Default admin API listen address.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:7444";

/// Stops a running coordinator when triggered (or when the trigger is dropped).
#[derive(Debug, Clone)]
pub struct Shutdown(tokio::sync::watch::Receiver<bool>);

/// The sending side of [`Shutdown`].
#[derive(Debug)]
pub struct ShutdownTrigger(tokio::sync::watch::Sender<bool>);

impl Shutdown {
    /// A pair: trigger it to stop the coordinator.
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        (ShutdownTrigger(tx), Shutdown(rx))
    }

    /// Never fires.
    pub fn never() -> Shutdown {
        let (tx, rx) = tokio::sync::watch::channel(false);
        std::mem::forget(tx);
        Shutdown(rx)
    }

    /// Resolves when triggered (or the trigger is dropped).
    pub async fn wait(mut self) {
        let _closed_means_stop = self.0.wait_for(|v| *v).await;
    }
}

impl ShutdownTrigger {
    /// Stops the coordinator.
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

/// Everything `run` needs.
#[derive(Debug, Clone)]
pub struct CoordinatorOptions {
    /// Directory with the key, database and admin token.
    pub state_dir: PathBuf,
    /// The database (`--db`); `None`: SQLite, `coordinator.db` in the state directory.
    pub db: Option<meshd_store::DbSpec>,
    /// Control (QUIC) listen address.
    pub listen: SocketAddr,
    /// Address join tokens carry; `None`: `listen` (refused when `listen` is a wildcard).
    pub advertise: Option<SocketAddr>,
    /// The other replicas' advertised control addresses (replicas on one database): join
    /// tokens and every `Welcome` carry them after this one's, and agents fail over.
    pub replicas: Vec<SocketAddr>,
    /// Admin HTTP API listen address.
    pub admin_listen: SocketAddr,
    /// Prometheus endpoint (`GET /metrics`, plain HTTP, unauthenticated); `None`: off.
    pub metrics_listen: Option<SocketAddr>,
    /// Serve the admin API over HTTPS on loopback too (elsewhere it always is).
    pub admin_tls: bool,
    /// The admin API's certificate and key (PEM files); `None`: a self-signed pair made once
    /// and kept in the state directory.
    pub admin_tls_files: Option<AdminTlsFiles>,
    /// Overlay IPv4 pool.
    pub pool: Ipv4Net,
    /// Optional overlay IPv6 prefix (/96 or shorter).
    pub pool_v6: Option<Ipv6Net>,
    /// Limits on the listeners (handshakes, timeouts, failure backoff).
    pub limits: Limits,
    /// Flow records: retention, rows per host per interval, pruning.
    pub flows: FlowSettings,
    /// Stop signal.
    pub shutdown: Shutdown,
    /// The scan detector (`[scan_response]`).
    pub scan: meshd_control::state::ScanConfig,
    /// Where alerts go besides the event log and the log (`[alerts]`).
    pub alerts: AlertsConfig,
    /// Single-packet authorisation: the dark control port, and the admin API behind it
    /// (`[spa]`).
    pub spa: SpaSettings,
    /// Automatic host key rotation (`key_rotation`, `[[key_rotation_group]]`).
    pub key_rotation: meshd_control::rotation::RotationSchedule,
}

/// One `[[key_rotation_group]]` of the config file: hosts with all of `selector`'s labels
/// rotate their key every `period` (first matching group wins over `key_rotation`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRotationGroup {
    /// Labels, e.g. `{ env = "prod" }`.
    pub selector: std::collections::BTreeMap<String, String>,
    /// A duration, e.g. `"24h"`, `"7d"` (at least a minute).
    pub period: String,
}

/// Single-packet authorisation (`[spa]` in the config file; every field optional).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpaSettings {
    /// The control port answers only sources that knocked (default on; `--no-spa`).
    pub enabled: bool,
    /// Seconds a knock opens its source address and port for, refreshed by its traffic.
    pub window_secs: u64,
    /// Clock skew accepted either way, seconds (also how long nonces are remembered).
    pub skew_secs: u64,
    /// Nonces the replay cache holds at most (knocks beyond are refused).
    pub replay_capacity: usize,
    /// The admin API, when bound off loopback, takes TCP connections only from IPs that
    /// knocked as admin (`--admin-spa`).
    pub admin: bool,
}

impl Default for SpaSettings {
    fn default() -> Self {
        SpaSettings {
            enabled: true,
            window_secs: 30,
            skew_secs: meshd_channel::spa::DEFAULT_SKEW_MS / 1000,
            replay_capacity: meshd_channel::spa::DEFAULT_REPLAY_CAPACITY,
            admin: false,
        }
    }
}

impl SpaSettings {
    fn validate(&self) -> Result<(), OptionsError> {
        if self.window_secs == 0 || self.skew_secs == 0 || self.replay_capacity == 0 {
            return Err(OptionsError::Spa(
                "spa window_secs, skew_secs and replay_capacity must be at least 1".into(),
            ));
        }
        if self.admin && !self.enabled {
            return Err(OptionsError::Spa(
                "the admin API behind SPA (--admin-spa) needs SPA on".into(),
            ));
        }
        Ok(())
    }
}

/// Alert delivery (`[alerts]` in the config file; every field optional).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertsConfig {
    /// Webhook URLs (http:// or https://) each alert is POSTed to as JSON.
    pub webhook_urls: Vec<String>,
    /// File holding the HMAC-SHA256 secret for `X-Meshd-Signature` (trailing newline ignored).
    pub webhook_secret_file: Option<PathBuf>,
    /// The secret itself (read from `webhook_secret_file`; never in the file).
    #[serde(skip)]
    pub secret: Option<String>,
    /// Alerts waiting for delivery at most; more are dropped and counted.
    pub queue: usize,
    /// Attempts per URL (the first included).
    pub max_attempts: u32,
    /// Wait before the first retry (ms); doubles per retry.
    pub backoff_initial_ms: u64,
    /// Longest wait between retries (ms).
    pub backoff_max_ms: u64,
    /// Time for one attempt (ms).
    pub timeout_ms: u64,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            webhook_urls: Vec::new(),
            webhook_secret_file: None,
            secret: None,
            queue: 256,
            max_attempts: 6,
            backoff_initial_ms: 500,
            backoff_max_ms: 30_000,
            timeout_ms: 5_000,
        }
    }
}

impl AlertsConfig {
    /// Checks the URLs and reads the secret file.
    fn resolve(&mut self) -> Result<(), OptionsError> {
        for u in &self.webhook_urls {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(OptionsError::Alerts(format!(
                    "webhook URL {u:?} must start with http:// or https://"
                )));
            }
        }
        if self.queue == 0 || self.max_attempts == 0 {
            return Err(OptionsError::Alerts(
                "queue and max_attempts must be at least 1".into(),
            ));
        }
        if let Some(p) = &self.webhook_secret_file {
            let s = std::fs::read_to_string(p).map_err(|e| {
                OptionsError::Alerts(format!("reading webhook secret {}: {e}", p.display()))
            })?;
            let s = s.trim_end_matches(['\r', '\n']).to_string();
            if s.is_empty() {
                return Err(OptionsError::Alerts(format!(
                    "webhook secret file {} is empty",
                    p.display()
                )));
            }
            self.secret = Some(s);
        }
        Ok(())
    }
}

/// Limits on the admin API and the control endpoint (`[limits]` in the config file; every
/// field optional).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Admin API TLS handshakes in progress at once.
    pub admin_handshakes: usize,
    /// Of those, at most this many from one source (an IPv4 address, an IPv6 /64).
    pub admin_handshakes_per_source: usize,
    /// Of those, this many only for loopback clients (an operator on this host).
    pub admin_loopback_reserved: usize,
    /// A client has this long to finish the TLS handshake (ms).
    pub admin_handshake_timeout_ms: u64,
    /// A client has this long to send a whole request head, and an idle keep-alive connection
    /// is closed after it (ms).
    pub admin_header_timeout_ms: u64,
    /// Failed admin authentications or join tokens one source may make before it is refused.
    pub auth_failures_before_backoff: u32,
    /// The first refusal's length (ms); each further failure doubles it.
    pub auth_backoff_base_ms: u64,
    /// The longest refusal (s).
    pub auth_backoff_max_secs: u64,
    /// A source without failures for this long starts afresh (s).
    pub auth_forget_after_secs: u64,
    /// Sources each backoff table remembers (the least recently seen is forgotten first).
    pub auth_backoff_sources: usize,
    /// QUIC handshakes in progress from unproven addresses beyond which new clients must
    /// prove theirs with a Retry first (0: always).
    pub quic_retry_threshold: usize,
    /// QUIC handshakes in progress at most; further attempts are refused.
    pub quic_max_half_open: usize,
    /// Connection attempts quinn queues before the accept loop sees them.
    pub quic_max_incoming: usize,
    /// How long a push to one agent may wait for its stream to take it (the agent stopped
    /// reading and its flow-control window is full) before that agent's connection is closed.
    pub control_write_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            admin_handshakes: 64,
            admin_handshakes_per_source: 8,
            admin_loopback_reserved: 16,
            admin_handshake_timeout_ms: 3_000,
            admin_header_timeout_ms: 5_000,
            auth_failures_before_backoff: 5,
            auth_backoff_base_ms: 1_000,
            auth_backoff_max_secs: 300,
            auth_forget_after_secs: 900,
            auth_backoff_sources: 4096,
            quic_retry_threshold: 0,
            quic_max_half_open: 256,
            quic_max_incoming: 1024,
            control_write_timeout_ms: 20_000,
        }
    }
}

impl Limits {
    /// Refuses settings that would lock everyone out or disable a limit by accident.
    pub fn validate(&self) -> Result<(), LimitsError> {
        let nonzero = [
            ("admin_handshakes", self.admin_handshakes as u64),
            (
                "admin_handshakes_per_source",
                self.admin_handshakes_per_source as u64,
            ),
            (
                "admin_handshake_timeout_ms",
                self.admin_handshake_timeout_ms,
            ),
            ("admin_header_timeout_ms", self.admin_header_timeout_ms),
            ("auth_backoff_sources", self.auth_backoff_sources as u64),
            ("quic_max_half_open", self.quic_max_half_open as u64),
            ("quic_max_incoming", self.quic_max_incoming as u64),
            ("control_write_timeout_ms", self.control_write_timeout_ms),
        ];
        if let Some((name, _)) = nonzero.iter().find(|(_, v)| *v == 0) {
            return Err(LimitsError::Zero(name));
        }
        if self.admin_loopback_reserved >= self.admin_handshakes {
            return Err(LimitsError::LoopbackReserved {
                reserved: self.admin_loopback_reserved,
                total: self.admin_handshakes,
            });
        }
        Ok(())
    }
}

impl CoordinatorOptions {
    /// Defaults with a state directory (tests: listen on 127.0.0.1:0 and set ports yourself).
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        CoordinatorOptions {
            state_dir: state_dir.into(),
            db: None,
            listen: SocketAddr::from(([0, 0, 0, 0], 7443)),
            advertise: None,
            replicas: Vec::new(),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 7444)),
            metrics_listen: None,
            admin_tls: false,
            admin_tls_files: None,
            pool: Ipv4Net::new([100, 64, 0, 0].into(), 10).unwrap_or_default(),
            pool_v6: None,
            limits: Limits::default(),
            flows: FlowSettings::default(),
            shutdown: Shutdown::never(),
            scan: meshd_control::state::ScanConfig::default(),
            alerts: AlertsConfig::default(),
            spa: SpaSettings::default(),
            key_rotation: Default::default(),
        }
    }

    /// The advertised control address, given the actually bound listen address.
    pub fn advertise_for(&self, bound: SocketAddr) -> Result<SocketAddr, AdvertiseError> {
        match self.advertise {
            Some(a) => Ok(a),
            None if bound.ip().is_unspecified() => Err(AdvertiseError {
                listen: self.listen,
            }),
            None => Ok(bound),
        }
    }

    /// Whether the admin API speaks HTTPS (see [`admin_needs_tls`]).
    pub fn admin_uses_tls(&self) -> bool {
        admin_needs_tls(
            self.admin_listen.ip(),
            self.admin_tls,
            self.admin_tls_files.is_some(),
        )
    }
}

/// An operator-supplied admin API certificate (chain) and private key, both PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminTlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Whether the admin API must speak HTTPS: always when bound anywhere but loopback (a wildcard
/// address included), and on loopback when asked to (`--admin-tls`) or given a certificate.
pub fn admin_needs_tls(bind: IpAddr, forced: bool, own_cert: bool) -> bool {
    let loopback = match bind {
        IpAddr::V4(a) => a.is_loopback(),
        IpAddr::V6(a) => a.is_loopback() || a.to_ipv4_mapped().is_some_and(|v| v.is_loopback()),
    };
    forced || own_cert || !loopback
}

/// `db` in a config file (a relative `sqlite:` path is the file's directory's).
fn file_db(text: &str, config: &Path) -> Result<meshd_store::DbSpec, OptionsError> {
    let spec: meshd_store::DbSpec = text.parse().map_err(|e| OptionsError::Db {
        path: config.to_owned(),
        source: e,
    })?;
    Ok(match spec {
        meshd_store::DbSpec::Sqlite(p) if p.is_relative() => {
            meshd_store::DbSpec::Sqlite(config.parent().unwrap_or(Path::new("")).join(p))
        }
        other => other,
    })
}

/// `meshd coordinator SUBCOMMAND`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CoordinatorCommand {
    /// Move an installation to another database: copies hosts, keys, labels, tokens, policy
    /// history, events, flows and settings, verifies every table's row count, and commits
    /// all or nothing. The target must be empty; stop the coordinator first. Then start it
    /// with --db set to the target (the key and admin token stay in the state directory).
    Migrate {
        /// The installation's database: sqlite:PATH (e.g. sqlite:/var/lib/meshd/coordinator.db).
        #[arg(long, value_name = "URL")]
        from: meshd_store::DbSpec,
        /// The new, empty database: postgres://USER[:PASSWORD]@HOST[:PORT]/DB.
        #[arg(long, value_name = "URL")]
        to: meshd_store::DbSpec,
    },
}

/// `meshd coordinator` flags (flatten into the subcommand).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CoordinatorArgs {
    /// TOML file with any of: state_dir, db, listen, advertise, replicas, admin_listen, admin_tls,
    /// admin_tls_cert, admin_tls_key, pool, pool_v6, log_format, metrics_listen, flow_retention
    /// (e.g. "7d"), flow_rows_per_host, and a [limits] table.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// State directory (key, database, admin.token) [default: /var/lib/meshd].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// The database: sqlite:PATH, or postgres://USER[:PASSWORD]@HOST[:PORT]/DB (unencrypted:
    /// a server on loopback or a Unix socket, `?host=/run/postgresql`) [default:
    /// sqlite:<state-dir>/coordinator.db].
    #[arg(long, value_name = "URL")]
    pub db: Option<meshd_store::DbSpec>,
    /// What else to do instead of running (`migrate`).
    #[command(subcommand)]
    pub command: Option<CoordinatorCommand>,
    /// Control (QUIC) listen address [default: 0.0.0.0:7443].
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,
    /// Control address put into join tokens [default: --listen unless it is a wildcard].
    #[arg(long, value_name = "ADDR:PORT")]
    pub advertise: Option<SocketAddr>,
    /// Another replica's advertised control address (replicas sharing one PostgreSQL
    /// database and coordinator.key; repeatable; replaces the file's `replicas`). Join
    /// tokens and agents get this coordinator's --advertise first, then these, and agents
    /// fail over between them.
    #[arg(long = "replica", value_name = "ADDR:PORT")]
    pub replica: Vec<SocketAddr>,
    /// Admin HTTP API listen address [default: 127.0.0.1:7444]; anywhere but loopback it is
    /// HTTPS only.
    #[arg(long, value_name = "ADDR:PORT")]
    pub admin_listen: Option<SocketAddr>,
    /// Serve Prometheus metrics (`GET /metrics`) on this address [default: off]. Plain HTTP
    /// without authentication (counters only, no secrets): bind it to loopback or a
    /// management network.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<SocketAddr>,
    /// Serve the admin API over HTTPS on loopback too.
    #[arg(long)]
    pub admin_tls: bool,
    /// Admin API certificate chain, PEM (with --admin-tls-key) [default: a self-signed one
    /// made once as <state-dir>/admin-cert.pem].
    #[arg(long, value_name = "FILE", requires = "admin_tls_key")]
    pub admin_tls_cert: Option<PathBuf>,
    /// Admin API private key, PEM (with --admin-tls-cert) [default: <state-dir>/admin-key.pem].
    #[arg(long, value_name = "FILE", requires = "admin_tls_cert")]
    pub admin_tls_key: Option<PathBuf>,
    /// Overlay IPv4 address pool [default: 100.64.0.0/10].
    #[arg(long, value_name = "CIDR")]
    pub pool: Option<Ipv4Net>,
    /// Optional overlay IPv6 prefix (/96 or shorter).
    #[arg(long, value_name = "CIDR")]
    pub pool_v6: Option<Ipv6Net>,
    /// Scan detector: more distinct denied (peer, port) pairs than N within the window is a
    /// scan [default: 50].
    #[arg(long, value_name = "N")]
    pub scan_max_pairs: Option<usize>,
    /// Scan detector: more distinct denied ports of one peer than M within the window is a
    /// scan [default: 20].
    #[arg(long, value_name = "M")]
    pub scan_max_ports: Option<usize>,
    /// Scan detector window in seconds [default: 60].
    #[arg(long, value_name = "SECS")]
    pub scan_window: Option<u64>,
    /// What the scan detector does to hosts no configured group matches: quarantine or
    /// label:KEY=VALUE [default: quarantine].
    #[arg(long, value_name = "ACTION")]
    pub scan_action: Option<meshd_control::state::ScanAction>,
    /// Turn the scan detector off.
    #[arg(long)]
    pub no_scan_response: bool,
    /// Webhook URL alerts are POSTed to (repeatable; adds to the file's).
    #[arg(long, value_name = "URL")]
    pub webhook_url: Vec<String>,
    /// File with the webhook HMAC secret (X-Meshd-Signature: sha256=...).
    #[arg(long, value_name = "FILE")]
    pub webhook_secret_file: Option<PathBuf>,
    /// Turn single-packet authorisation off: the control port answers any QUIC client (by
    /// default it answers only sources that first sent a valid knock).
    #[arg(long)]
    pub no_spa: bool,
    /// Seconds a valid knock opens its source address:port for, refreshed by traffic
    /// [default: 30].
    #[arg(long, value_name = "SECS")]
    pub spa_window: Option<u64>,
    /// Clock skew accepted on knock timestamps, seconds [default: 30].
    #[arg(long, value_name = "SECS")]
    pub spa_skew: Option<u64>,
    /// The admin API, when bound off loopback, accepts TCP connections only from IPs that
    /// knocked as admin (`meshctl knock`; meshctl knocks itself when its config says so).
    #[arg(long)]
    pub admin_spa: bool,
}

/// The `--config` file (all fields optional; flags win).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorFile {
    /// State directory.
    pub state_dir: Option<PathBuf>,
    /// The database, as `--db` (a relative `sqlite:` path: to the config file's directory).
    pub db: Option<String>,
    /// Control listen address.
    pub listen: Option<SocketAddr>,
    /// Advertised control address.
    pub advertise: Option<SocketAddr>,
    /// The other replicas' advertised control addresses.
    pub replicas: Option<Vec<SocketAddr>>,
    /// Admin listen address.
    pub admin_listen: Option<SocketAddr>,
    /// Prometheus endpoint address.
    pub metrics_listen: Option<SocketAddr>,
    /// HTTPS on loopback too.
    pub admin_tls: Option<bool>,
    /// Admin API certificate chain (relative: to the config file's directory).
    pub admin_tls_cert: Option<PathBuf>,
    /// Admin API private key (relative: to the config file's directory).
    pub admin_tls_key: Option<PathBuf>,
    /// IPv4 pool.
    pub pool: Option<Ipv4Net>,
    /// IPv6 prefix.
    pub pool_v6: Option<Ipv6Net>,
    /// Listener limits.
    pub limits: Option<Limits>,
    /// How long flow records are kept: `7d`, `12h`, `30m` (default 24 hours).
    pub flow_retention: Option<String>,
    /// Flow rows kept per host per reporting interval (default 1000).
    pub flow_rows_per_host: Option<usize>,
    /// `"text"` or `"json"` log lines (`meshd --log-format` wins; read by meshd's main
    /// before the coordinator starts, see [`CoordinatorArgs::log_format`]).
    pub log_format: Option<meshd_config::LogFormat>,
    /// The scan detector.
    pub scan_response: Option<meshd_control::state::ScanConfig>,
    /// Alert delivery (webhooks).
    pub alerts: Option<AlertsConfig>,
    /// Single-packet authorisation.
    pub spa: Option<SpaSettings>,
    /// Host key rotation period for every host, e.g. `"24h"` (default: none, only
    /// `meshctl host rotate-key`).
    pub key_rotation: Option<String>,
    /// Per label group periods (first match wins over `key_rotation`).
    #[serde(default)]
    pub key_rotation_group: Vec<KeyRotationGroup>,
}

impl CoordinatorFile {
    /// Reads and parses a config file; errors name the file and the field.
    pub fn load(path: &Path) -> Result<Self, ConfigFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut f: CoordinatorFile =
            toml::from_str(&text).map_err(|source| ConfigFileError::Parse {
                path: path.to_owned(),
                source,
            })?;
        let base = path.parent().unwrap_or(Path::new(""));
        let secret = f
            .alerts
            .as_mut()
            .and_then(|a| a.webhook_secret_file.as_mut());
        for p in [&mut f.admin_tls_cert, &mut f.admin_tls_key]
            .into_iter()
            .flatten()
            .chain(secret)
        {
            *p = base.join(&*p);
        }
        Ok(f)
    }
}

impl CoordinatorArgs {
    /// The config file's `log_format`, if the file sets one (errors are left for
    /// [`resolve`](Self::resolve) to report once logging is set up).
    pub fn log_format(&self) -> Option<meshd_config::LogFormat> {
        let path = self.config.as_deref()?;
        CoordinatorFile::load(path).ok()?.log_format
    }

    /// Merges flags over the config file over defaults.
    pub fn resolve(&self, shutdown: Shutdown) -> Result<CoordinatorOptions, OptionsError> {
        let config_path = || self.config.clone().unwrap_or_default();
        let file = match &self.config {
            Some(p) => CoordinatorFile::load(p)?,
            None => CoordinatorFile::default(),
        };
        let key_rotation = key_rotation_schedule(&file, &config_path())?;
        let mut o = CoordinatorOptions::new(
            self.state_dir
                .clone()
                .or(file.state_dir)
                .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
        );
        o.db = match (&self.db, &file.db) {
            (Some(d), _) => Some(d.clone()),
            (None, Some(d)) => Some(file_db(d, &config_path())?),
            (None, None) => None,
        };
        if let Some(l) = self.listen.or(file.listen) {
            o.listen = l;
        }
        o.advertise = self.advertise.or(file.advertise);
        if !self.replica.is_empty() {
            check_replicas("--replica", o.advertise, &self.replica)?;
            o.replicas = self.replica.clone();
        } else if let Some(r) = &file.replicas {
            let from = format!("coordinator config {}: replicas", config_path().display());
            check_replicas(&from, o.advertise, r)?;
            o.replicas = r.clone();
        }
        if let Some(a) = self.admin_listen.or(file.admin_listen) {
            o.admin_listen = a;
        }
        o.metrics_listen = self.metrics_listen.or(file.metrics_listen);
        o.admin_tls = self.admin_tls || file.admin_tls.unwrap_or(false);
        o.admin_tls_files = match (self.admin_tls_cert.clone(), self.admin_tls_key.clone()) {
            (Some(cert), Some(key)) => Some(AdminTlsFiles { cert, key }),
            _ => match (file.admin_tls_cert, file.admin_tls_key) {
                (Some(cert), Some(key)) => Some(AdminTlsFiles { cert, key }),
                (None, None) => None,
                _ => {
                    return Err(OptionsError::TlsPair {
                        path: config_path(),
                    })
                }
            },
        };
        if let Some(p) = self.pool.or(file.pool) {
            o.pool = p;
        }
        o.pool_v6 = self.pool_v6.or(file.pool_v6);
        if let Some(l) = file.limits {
            l.validate().map_err(|source| OptionsError::Limits {
                path: config_path(),
                source,
            })?;
            o.limits = l;
        }
        if let Some(r) = &file.flow_retention {
            o.flows.retention_secs =
                parse_duration_secs(r)
                    .filter(|s| *s > 0)
                    .ok_or_else(|| OptionsError::Flows {
                        path: config_path(),
                        message: format!(
                            "flow_retention {r:?}: expected a duration such as 7d, 12h or 30m"
                        ),
                    })?;
        }
        if let Some(n) = file.flow_rows_per_host {
            if n == 0 {
                return Err(OptionsError::Flows {
                    path: config_path(),
                    message: "flow_rows_per_host must be at least 1".into(),
                });
            }
            o.flows.rows_per_host = n;
        }
        o.key_rotation = key_rotation;
        let mut scan = file.scan_response.unwrap_or_default();
        if let Some(n) = self.scan_max_pairs {
            scan.max_pairs = n;
        }
        if let Some(m) = self.scan_max_ports {
            scan.max_ports_per_peer = m;
        }
        if let Some(t) = self.scan_window {
            scan.window_secs = t;
        }
        if let Some(a) = &self.scan_action {
            scan.action = a.clone();
        }
        if self.no_scan_response {
            scan.enabled = false;
        }
        scan.validate()?;
        o.scan = scan;
        let mut alerts = file.alerts.unwrap_or_default();
        alerts.webhook_urls.extend(self.webhook_url.iter().cloned());
        if let Some(p) = &self.webhook_secret_file {
            alerts.webhook_secret_file = Some(p.clone());
        }
        alerts.resolve()?;
        o.alerts = alerts;
        let mut spa = file.spa.unwrap_or_default();
        if self.no_spa {
            spa.enabled = false;
        }
        if let Some(w) = self.spa_window {
            spa.window_secs = w;
        }
        if let Some(k) = self.spa_skew {
            spa.skew_secs = k;
        }
        if self.admin_spa {
            spa.admin = true;
        }
        spa.validate()?;
        o.spa = spa;
        o.shutdown = shutdown;
        if o.advertise.is_none() && o.listen.ip().is_unspecified() {
            o.advertise_for(o.listen)?;
        }
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// An error as `meshd coordinator` prints it (anyhow's `{:#}`: context, then causes).
    fn shown(e: impl std::error::Error + Send + Sync + 'static) -> String {
        format!("{:#}", anyhow::Error::from(e))
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        c: CoordinatorArgs,
    }

    #[test]
    fn flags_over_file_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "listen = \"10.0.0.1:7443\"\npool = \"10.99.0.0/16\"\n").unwrap();
        let cli = Cli::parse_from([
            "x",
            "--config",
            f.to_str().unwrap(),
            "--admin-listen",
            "127.0.0.1:9",
        ]);
        let o = cli.c.resolve(Shutdown::never()).unwrap();
        assert_eq!(o.listen.to_string(), "10.0.0.1:7443");
        assert_eq!(o.pool.to_string(), "10.99.0.0/16");
        assert_eq!(o.admin_listen.to_string(), "127.0.0.1:9");
        assert_eq!(o.metrics_listen, None);
        assert_eq!(o.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(o.advertise_for(o.listen).unwrap(), o.listen);
    }

    #[test]
    fn replicas_from_flags_or_file_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        let resolve = |args: &[&str]| {
            let mut v = vec!["x", "--advertise", "192.0.2.1:7443"];
            v.extend_from_slice(args);
            Cli::parse_from(v).c.resolve(Shutdown::never())
        };
        let a: SocketAddr = "192.0.2.2:7443".parse().unwrap();
        let b: SocketAddr = "[2001:db8::3]:7443".parse().unwrap();
        assert!(resolve(&[]).unwrap().replicas.is_empty());
        let o = resolve(&[
            "--replica",
            "192.0.2.2:7443",
            "--replica",
            "[2001:db8::3]:7443",
        ]);
        assert_eq!(o.unwrap().replicas, vec![a, b]);
        std::fs::write(&f, "replicas = [\"[2001:db8::3]:7443\"]\n").unwrap();
        let file = f.to_str().unwrap();
        assert_eq!(resolve(&["--config", file]).unwrap().replicas, vec![b]);
        // The flag replaces the file's list.
        let o = resolve(&["--config", file, "--replica", "192.0.2.2:7443"]);
        assert_eq!(o.unwrap().replicas, vec![a]);
        let err = |args: &[&str]| shown(resolve(args).unwrap_err());
        let e = err(&["--replica", "0.0.0.0:7443"]);
        assert!(e.contains("--replica") && e.contains("0.0.0.0:7443"), "{e}");
        let e = err(&["--replica", "192.0.2.2:0"]);
        assert!(e.contains("port 0"), "{e}");
        let e = err(&["--replica", "192.0.2.2:7443", "--replica", "192.0.2.2:7443"]);
        assert!(e.contains("listed twice"), "{e}");
        let e = err(&["--replica", "192.0.2.1:7443"]);
        assert!(
            e.contains("listed twice") && e.contains("always first"),
            "{e}"
        );
        std::fs::write(&f, "replicas = [\"192.0.2.2:1\", \"192.0.2.2:1\"]\n").unwrap();
        let e = err(&["--config", file]);
        assert!(e.contains("c.toml") && e.contains("replicas"), "{e}");
        let many: Vec<String> = (1..=17).map(|p| format!("192.0.2.9:{p}")).collect();
        let mut args = Vec::new();
        for m in &many {
            args.extend(["--replica", m.as_str()]);
        }
        assert!(err(&args).contains("at most 15"));
    }

    #[test]
    fn db_from_file_or_flag() {
        use meshd_store::DbSpec;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        let resolve = |args: &[&str]| {
            let mut v = vec!["x", "--advertise", "192.0.2.1:7443"];
            v.extend_from_slice(args);
            Cli::parse_from(v).c.resolve(Shutdown::never())
        };
        assert_eq!(
            resolve(&[]).unwrap().db,
            None,
            "default: the state directory's file"
        );
        std::fs::write(&f, "db = \"postgres://meshd:pw@127.0.0.1:5432/meshd\"\n").unwrap();
        let cfg = f.to_str().unwrap();
        assert_eq!(
            resolve(&["--config", cfg]).unwrap().db,
            Some(DbSpec::Postgres(
                "postgres://meshd:pw@127.0.0.1:5432/meshd".into()
            ))
        );
        assert_eq!(
            resolve(&["--config", cfg, "--db", "sqlite:/srv/c.db"])
                .unwrap()
                .db,
            Some(DbSpec::Sqlite("/srv/c.db".into())),
            "the flag wins"
        );
        // A relative SQLite path in the file is the file's directory's.
        std::fs::write(&f, "db = \"sqlite:state/c.db\"\n").unwrap();
        assert_eq!(
            resolve(&["--config", cfg]).unwrap().db,
            Some(DbSpec::Sqlite(dir.path().join("state/c.db")))
        );
        // A bad one names the file and hides the password.
        std::fs::write(&f, "db = \"mysql://u:secret@h/db\"\n").unwrap();
        let e = shown(resolve(&["--config", cfg]).unwrap_err());
        assert!(
            e.contains("c.toml") && e.contains("db") && e.contains("postgres://"),
            "{e}"
        );
        assert!(!e.contains("secret"), "{e}");
        // On the command line, clap refuses it.
        let Err(e) = Cli::try_parse_from(["x", "--db", "/var/lib/meshd/coordinator.db"]) else {
            panic!("a bare path is not a --db");
        };
        assert!(e.to_string().contains("sqlite:PATH"), "{e}");
    }

    #[test]
    fn metrics_listen_from_file_or_flag() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "listen = \"10.0.0.1:7443\"\nmetrics_listen = \"127.0.0.1:9100\"\n",
        )
        .unwrap();
        let cli = Cli::parse_from(["x", "--config", f.to_str().unwrap()]);
        let o = cli.c.resolve(Shutdown::never()).unwrap();
        assert_eq!(o.metrics_listen, Some("127.0.0.1:9100".parse().unwrap()));
        let cli = Cli::parse_from([
            "x",
            "--config",
            f.to_str().unwrap(),
            "--metrics-listen",
            "127.0.0.1:9101",
        ]);
        let o = cli.c.resolve(Shutdown::never()).unwrap();
        assert_eq!(o.metrics_listen, Some("127.0.0.1:9101".parse().unwrap()));
    }

    #[test]
    fn wildcard_needs_advertise() {
        let cli = Cli::parse_from(["x"]);
        let e = shown(cli.c.resolve(Shutdown::never()).unwrap_err());
        assert!(e.contains("--advertise"), "{e}");
        let cli = Cli::parse_from(["x", "--advertise", "192.0.2.1:7443"]);
        assert!(cli.c.resolve(Shutdown::never()).is_ok());
    }

    #[test]
    fn tls_decision() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for lo in ["127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"] {
            assert!(!admin_needs_tls(ip(lo), false, false), "{lo}");
            assert!(admin_needs_tls(ip(lo), true, false), "{lo} forced");
            assert!(admin_needs_tls(ip(lo), false, true), "{lo} own cert");
        }
        for other in [
            "0.0.0.0",
            "::",
            "198.18.0.1",
            "10.0.0.1",
            "fd00::1",
            "::ffff:198.18.0.1",
        ] {
            assert!(admin_needs_tls(ip(other), false, false), "{other}");
        }
        let o = CoordinatorOptions::new("/x");
        assert!(!o.admin_uses_tls(), "the default admin address is loopback");
    }

    #[test]
    fn admin_tls_flags_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "listen = \"10.0.0.1:7443\"\nadmin_tls = true\n\
             admin_tls_cert = \"tls/c.pem\"\nadmin_tls_key = \"/etc/k.pem\"\n",
        )
        .unwrap();
        let o = Cli::parse_from(["x", "--config", f.to_str().unwrap()])
            .c
            .resolve(Shutdown::never())
            .unwrap();
        assert!(o.admin_tls);
        assert_eq!(
            o.admin_tls_files,
            Some(AdminTlsFiles {
                cert: dir.path().join("tls/c.pem"),
                key: "/etc/k.pem".into(),
            })
        );
        // Flags win over the file.
        let cli = Cli::parse_from([
            "x",
            "--config",
            f.to_str().unwrap(),
            "--admin-tls-cert",
            "a.pem",
            "--admin-tls-key",
            "b.pem",
        ]);
        let o = cli.c.resolve(Shutdown::never()).unwrap();
        assert_eq!(o.admin_tls_files.unwrap().cert, PathBuf::from("a.pem"));
        // One without the other.
        assert!(Cli::try_parse_from(["x", "--admin-tls-cert", "a.pem"]).is_err());
        std::fs::write(
            &f,
            "listen = \"10.0.0.1:7443\"\nadmin_tls_cert = \"c.pem\"\n",
        )
        .unwrap();
        let e = shown(
            Cli::parse_from(["x", "--config", f.to_str().unwrap()])
                .c
                .resolve(Shutdown::never())
                .unwrap_err(),
        );
        assert!(e.contains("admin_tls_key") && e.contains("c.toml"), "{e}");
        // Defaults: no TLS settings.
        let o = Cli::parse_from(["x", "--listen", "127.0.0.1:1"])
            .c
            .resolve(Shutdown::never())
            .unwrap();
        assert!(!o.admin_tls && o.admin_tls_files.is_none());
    }

    #[test]
    fn limits_from_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "listen = \"10.0.0.1:7443\"\n[limits]\nquic_retry_threshold = 32\n",
        )
        .unwrap();
        let o = Cli::parse_from(["x", "--config", f.to_str().unwrap()])
            .c
            .resolve(Shutdown::never())
            .unwrap();
        assert_eq!(o.limits.quic_retry_threshold, 32);
        assert_eq!(
            o.limits.admin_handshakes,
            Limits::default().admin_handshakes
        );
        assert!(Limits::default().validate().is_ok());
        for bad in [
            "admin_handshakes_per_source = 0",
            "admin_loopback_reserved = 64",
            "quic_max_half_open = 0",
        ] {
            std::fs::write(&f, format!("listen = \"10.0.0.1:7443\"\n[limits]\n{bad}\n")).unwrap();
            let e = shown(
                Cli::parse_from(["x", "--config", f.to_str().unwrap()])
                    .c
                    .resolve(Shutdown::never())
                    .unwrap_err(),
            );
            let field = bad.split(' ').next().unwrap();
            assert!(e.contains(field) && e.contains("c.toml"), "{e}");
        }
        std::fs::write(&f, "[limits]\nnope = 1\n").unwrap();
        let e = shown(CoordinatorFile::load(&f).unwrap_err());
        assert!(e.contains("nope") && e.contains("c.toml"), "{e}");
    }

    #[test]
    fn flow_settings_from_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        let resolve = |text: &str| {
            std::fs::write(&f, format!("listen = \"10.0.0.1:7443\"\n{text}")).unwrap();
            Cli::parse_from(["x", "--config", f.to_str().unwrap()])
                .c
                .resolve(Shutdown::never())
        };
        let o = resolve("").unwrap();
        assert_eq!(o.flows, FlowSettings::default());
        assert_eq!(o.flows.retention_secs, 86_400);
        let o = resolve("flow_retention = \"12h\"\nflow_rows_per_host = 50\n").unwrap();
        assert_eq!(
            (o.flows.retention_secs, o.flows.rows_per_host),
            (43_200, 50)
        );
        for bad in [
            "flow_retention = \"7w\"",
            "flow_retention = \"0\"",
            "flow_rows_per_host = 0",
        ] {
            let e = shown(resolve(&format!("{bad}\n")).unwrap_err());
            assert!(
                e.contains(bad.split(' ').next().unwrap()) && e.contains("c.toml"),
                "{e}"
            );
        }
        assert_eq!(parse_duration_secs("90"), Some(90));
        assert_eq!(parse_duration_secs("30m"), Some(1800));
        assert_eq!(parse_duration_secs("h"), None);
    }

    #[test]
    fn log_format_from_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        let cli = |f: &Path| Cli::parse_from(["x", "--config", f.to_str().unwrap()]);
        assert_eq!(Cli::parse_from(["x"]).c.log_format(), None);
        std::fs::write(&f, "listen = \"10.0.0.1:7443\"\n").unwrap();
        assert_eq!(cli(&f).c.log_format(), None);
        std::fs::write(&f, "log_format = \"json\"\nlisten = \"10.0.0.1:7443\"\n").unwrap();
        assert_eq!(cli(&f).c.log_format(), Some(meshd_config::LogFormat::Json));
        assert!(cli(&f).c.resolve(Shutdown::never()).is_ok());
        std::fs::write(&f, "log_format = \"xml\"\n").unwrap();
        assert_eq!(cli(&f).c.log_format(), None);
        let e = shown(CoordinatorFile::load(&f).unwrap_err());
        assert!(e.contains("log_format") && e.contains("c.toml"), "{e}");
    }

    #[test]
    fn key_rotation_from_file_with_errors_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let resolve = |text: &str| {
            std::fs::write(&path, format!("listen = \"10.0.0.1:7443\"\n{text}")).unwrap();
            let cli = Cli::parse_from(["x", "--config", path.to_str().unwrap()]);
            cli.c.resolve(Shutdown::never())
        };
        let o = resolve(
            "key_rotation = \"24h\"\n[[key_rotation_group]]\nselector = { env = \"prod\" }\nperiod = \"1h\"\n",
        )
        .unwrap();
        assert_eq!(o.key_rotation.default, Some(86_400));
        assert_eq!(o.key_rotation.groups[0].period, 3600);
        assert_eq!(o.key_rotation.groups[0].selector["env"], "prod");
        let e = resolve("key_rotation = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key_rotation:") && e.contains("c.toml"), "{e}");
        let e = resolve("[[key_rotation_group]]\nselector = { env = \"prod\" }\nperiod = \"5s\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("key_rotation_group[0].period") && e.contains("minimum"),
            "{e}"
        );
        let e = resolve("[[key_rotation_group]]\nselector = {}\nperiod = \"1h\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key_rotation_group[0].selector"), "{e}");
        assert!(!resolve("").unwrap().key_rotation.is_active());
    }

    #[test]
    fn scan_response_and_alerts_from_file_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(dir.path().join("hook.secret"), "s3cret\n").unwrap();
        std::fs::write(
            &f,
            "listen = \"10.0.0.1:7443\"\n\
             [scan_response]\nmax_pairs = 30\nwindow_secs = 20\n\
             groups = [{ labels = { env = \"dev\" }, action = \"label:zone=restricted\" }]\n\
             [alerts]\nwebhook_urls = [\"http://127.0.0.1:9000/hook\"]\n\
             webhook_secret_file = \"hook.secret\"\n",
        )
        .unwrap();
        let o = Cli::parse_from([
            "x",
            "--config",
            f.to_str().unwrap(),
            "--scan-max-ports",
            "7",
            "--webhook-url",
            "https://alerts.example/hook",
        ])
        .c
        .resolve(Shutdown::never())
        .unwrap();
        assert_eq!(
            (
                o.scan.max_pairs,
                o.scan.max_ports_per_peer,
                o.scan.window_secs
            ),
            (30, 7, 20)
        );
        assert_eq!(o.scan.groups[0].action.to_string(), "label:zone=restricted");
        assert_eq!(o.alerts.webhook_urls.len(), 2);
        assert_eq!(o.alerts.secret.as_deref(), Some("s3cret"));
        let o = Cli::parse_from(["x", "--listen", "127.0.0.1:1"])
            .c
            .resolve(Shutdown::never())
            .unwrap();
        assert!(o.scan.enabled && o.alerts.webhook_urls.is_empty());
        for bad in [
            vec!["--scan-max-pairs", "0"],
            vec!["--webhook-url", "ftp://x"],
            vec!["--webhook-secret-file", "/nonexistent/secret"],
        ] {
            let mut args = vec!["x", "--listen", "127.0.0.1:1"];
            args.extend(bad.iter().copied());
            let e = shown(
                Cli::parse_from(args)
                    .c
                    .resolve(Shutdown::never())
                    .unwrap_err(),
            );
            assert!(
                e.contains("max_pairs") || e.contains("ftp://") || e.contains("/nonexistent"),
                "{e}"
            );
        }
        assert!(Cli::try_parse_from(["x", "--scan-action", "drop"]).is_err());
    }

    #[test]
    fn unknown_field_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "lissten = \"10.0.0.1:7443\"\n").unwrap();
        let e = shown(CoordinatorFile::load(&f).unwrap_err());
        assert!(e.contains("lissten"), "{e}");
    }
}
