//! meshd coordinator: the control-plane server (QUIC + Noise control channel to agents, admin
//! HTTP/JSON API, SQLite state). The channel itself is `meshd-channel`; the agent's side of it
//! is `meshd-agent`.
//!
//! Entry points: [`run`] (what `meshd coordinator` calls, with [`CoordinatorArgs`] flattened
//! into its flags), [`start`] (tests: returns a handle with the bound addresses).
//!
//! The server's parts, and who uses whom (no cycle):
//! - [`ops`]: the admin operations ([`AdminOp`] → [`AdminReply`]) over the state;
//! - `actor`: the task owning the state and the store (commit, then acknowledge), fed by
//!   commands; it runs the operations;
//! - `agent_conn`: the control endpoint and one task per agent connection, sending commands;
//! - [`admin`]: the admin HTTP(S) API, sending operations;
//! - [`state_dir`]: the key, admin token and certificate files;
//! - [`start`] (here) wires them together.

mod actor;
pub mod admin;
mod agent_conn;
pub mod error;
pub mod guard;
pub mod metrics;
pub mod ops;
pub mod options;
pub mod spa;
pub mod state_dir;
pub mod ui;
pub mod webhook;

pub(crate) use meshd_channel::{noise, quic};

use std::net::SocketAddr;
use std::sync::Arc;

use meshd_control::api::{GuardStats, TokenCreateRequest, TokenCreated, EVENTS_MAX};
use meshd_control::state::AdminError;
use meshd_control::IpPool;
use meshd_store::{DbSpec, Store};
use meshd_tunnel::PublicKey;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

pub use actor::unix_now;
pub use error::{CallError, StartError, Stopped};
pub use ops::{AdminOp, AdminReply};
pub use options::{
    CoordinatorArgs, CoordinatorCommand, CoordinatorFile, CoordinatorOptions, FlowSettings,
    Shutdown, ShutdownTrigger,
};
pub use state_dir::{admin_token_hash, load_or_create_key, KEY_FILE};

use actor::{restore_state, Actor, Commands};
use guard::Guard;
use ops::Identity;

/// A running coordinator.
pub struct CoordinatorHandle {
    control_addr: SocketAddr,
    admin_addr: SocketAddr,
    /// Bound metrics address (`--metrics-listen`).
    metrics_addr: Option<SocketAddr>,
    metrics: Arc<metrics::Metrics>,
    /// SHA-256 fingerprint of the admin API's certificate; `None`: plain HTTP.
    admin_fingerprint: Option<String>,
    identity: Identity,
    cmds: Commands,
    stop: watch::Sender<bool>,
    endpoint: quinn::Endpoint,
    tasks: Vec<JoinHandle<()>>,
    guard: Arc<Guard>,
}

impl CoordinatorHandle {
    /// Bound control (QUIC) address.
    pub fn control_addr(&self) -> SocketAddr {
        self.control_addr
    }
    /// Bound admin API address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }
    /// Bound metrics address; `None`: no `--metrics-listen`.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }
    /// The metrics (what `GET /metrics` renders).
    pub fn metrics(&self) -> &metrics::Metrics {
        &self.metrics
    }
    /// Whether the admin API speaks HTTPS.
    pub fn admin_tls(&self) -> bool {
        self.admin_fingerprint.is_some()
    }
    /// SHA-256 fingerprint of the admin API's certificate (`AB:CD:...`); `None`: plain HTTP.
    pub fn admin_fingerprint(&self) -> Option<&str> {
        self.admin_fingerprint.as_deref()
    }
    /// Address join tokens carry.
    pub fn advertise(&self) -> SocketAddr {
        self.identity.advertise
    }
    /// The coordinator's static public key.
    pub fn public_key(&self) -> PublicKey {
        self.identity.public_key
    }

    /// The listener limits' counters now (what `GET /v1/status` reports as `guard`).
    pub fn guard_stats(&self) -> GuardStats {
        self.guard.counters.snapshot()
    }

    /// Runs an admin operation in process (same path as the HTTP API).
    pub async fn admin(&self, op: AdminOp) -> Result<Result<AdminReply, AdminError>, Stopped> {
        self.cmds.admin(op).await
    }

    /// Creates a join token and returns its string.
    pub async fn create_token(&self, req: TokenCreateRequest) -> Result<TokenCreated, CallError> {
        match self.admin(AdminOp::CreateToken(req)).await?? {
            AdminReply::Created(t) => Ok(t),
            other => Err(CallError::UnexpectedReply(format!("{other:?}"))),
        }
    }

    /// Stops everything and waits until the sockets are released.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"coordinator shutting down");
        for t in self.tasks {
            let _ = t.await;
        }
        self.endpoint.wait_idle().await;
    }
}

/// Starts the coordinator (state in `<state-dir>/coordinator.db`) and returns once it is
/// listening.
pub async fn start(opts: CoordinatorOptions) -> Result<CoordinatorHandle, StartError> {
    start_inner(opts, None).await
}

/// As [`start`], with `store` instead of the SQLite database in the state directory (another
/// storage backend; tests pass one that fails on demand). The key and admin token files are
/// still kept in the state directory.
pub async fn start_with_store(
    opts: CoordinatorOptions,
    store: Arc<dyn Store>,
) -> Result<CoordinatorHandle, StartError> {
    start_inner(opts, Some(store)).await
}

/// Runs a blocking start-up step on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StartError> + Send + 'static,
) -> Result<T, StartError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(StartError::Task)?
}

async fn start_inner(
    opts: CoordinatorOptions,
    store: Option<Arc<dyn Store>>,
) -> Result<CoordinatorHandle, StartError> {
    let dir = opts.state_dir.clone();
    state_dir::prepare(&dir)?;
    let key = load_or_create_key(&dir.join(state_dir::KEY_FILE))?;
    let public_key = key.public_key();
    let store: Arc<dyn Store> = match store {
        Some(s) => s,
        None => {
            let spec = opts
                .db
                .clone()
                .unwrap_or_else(|| DbSpec::Sqlite(dir.join(state_dir::DB_FILE)));
            info!(db = %spec, "opening the database");
            blocking(move || {
                meshd_store::open(&spec).map_err(|source| match spec {
                    DbSpec::Sqlite(path) => StartError::OpenStore { path, source },
                    DbSpec::Postgres(_) => StartError::OpenDb {
                        db: spec.to_string(),
                        source,
                    },
                })
            })
            .await?
        }
    };
    let (snapshot, recent_events) = {
        let (store, dir) = (store.clone(), dir.clone());
        blocking(move || {
            let hash = state_dir::load_or_create_admin_token(&*store, &dir)?;
            // Newest first from the store; the actor keeps them oldest first.
            let mut events = store.recent_events(EVENTS_MAX)?;
            events.reverse();
            let mut snapshot = store.load()?;
            state_dir::ensure_bootstrap_token(&*store, &mut snapshot, &hash, unix_now())?;
            Ok((snapshot, events))
        })
        .await?
    };
    let pool = IpPool::new(opts.pool, opts.pool_v6).map_err(StartError::Pool)?;
    let flow_limits = meshd_control::state::FlowLimits {
        rows_per_host: opts.flows.rows_per_host,
    };
    let generation = snapshot.generation;
    let state = restore_state(pool.clone(), snapshot, unix_now(), flow_limits)?;

    opts.limits.validate()?;
    let limits = opts.limits.clone();
    let guard = Arc::new(Guard::new(&limits));
    let spa = if opts.spa.enabled {
        let (k, s, d) = (key.clone(), opts.spa.clone(), dir.clone());
        Some(Arc::new(
            blocking(move || Ok(spa::SpaFilter::new(k, &s, &d))).await?,
        ))
    } else {
        None
    };
    let endpoint = agent_conn::control_endpoint(opts.listen, &limits, spa.clone())?;
    let control_addr = endpoint.local_addr().map_err(StartError::LocalAddr)?;
    let advertise = opts.advertise_for(control_addr)?;
    options::check_replicas("--replica", Some(advertise), &opts.replicas)?;
    let replicas: Arc<[SocketAddr]> = Arc::from(opts.replicas.clone());
    let admin_listener = tokio::net::TcpListener::bind(opts.admin_listen)
        .await
        .map_err(|source| StartError::BindAdmin {
            addr: opts.admin_listen,
            source,
        })?;
    let admin_addr = admin_listener.local_addr().map_err(StartError::LocalAddr)?;
    if opts.spa.admin {
        match &spa {
            Some(f) if !admin_addr.ip().is_loopback() => {
                let _first = guard.admin_spa.set(f.clone());
                info!(%admin_addr, "admin API behind SPA: only IPs that knocked as admin may connect");
            }
            _ => {
                warn!(%admin_addr, "--admin-spa has no effect: the admin API is on loopback (or SPA is off)")
            }
        }
    }
    let metrics_listener = match opts.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::BindMetrics { addr, source })?,
        ),
        None => None,
    };
    let metrics_addr = match &metrics_listener {
        Some(l) => Some(l.local_addr().map_err(StartError::LocalAddr)?),
        None => None,
    };
    let admin_tls = if opts.admin_uses_tls() {
        let mut ips = vec![admin_addr.ip(), control_addr.ip()];
        ips.extend(opts.advertise.map(|a| a.ip()));
        let tls = admin::load_or_create(&dir, opts.admin_tls_files.as_ref(), &ips)?;
        info!(%admin_addr, scheme = "https", cert_path = %tls.cert_path.display(),
            fingerprint = %tls.fingerprint, "admin API");
        Some(tls)
    } else {
        info!(%admin_addr, scheme = "http", "admin API (plain HTTP on loopback)");
        None
    };

    let identity = Identity {
        advertise,
        replicas: replicas.clone(),
        public_key,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut metrics = metrics::Metrics::new(guard.clone());
    if let Some(f) = &spa {
        metrics.register_spa(f.clone());
    }
    let metrics = Arc::new(metrics);
    let actor = Actor::new(
        state,
        store.clone(),
        pool,
        identity.clone(),
        recent_events,
        flow_limits,
        metrics.clone(),
    )
    .with_scan_response(
        opts.scan.clone(),
        webhook::Webhook::spawn(opts.alerts.clone()),
    )
    .with_spa(spa.clone())
    .with_key_rotation(opts.key_rotation.clone())
    .at_generation(generation);
    let admin_auth = actor.admin_auth();
    let (cmds, actor_task) = actor.spawn(stop_rx.clone());
    {
        // Replicas on one database follow each other's commits (a lone coordinator just
        // reads one number a second).
        let (store, cmds, stop) = (store.clone(), cmds.clone(), stop_rx.clone());
        std::thread::Builder::new()
            .name("meshd-follow".into())
            .spawn(move || actor::follow_loop(store, cmds, stop))
            .map_err(StartError::Thread)?;
    }
    let mut tasks = vec![actor_task];
    if let Some(f) = &spa {
        tasks.push(tokio::spawn(spa::save_loop(f.clone(), stop_rx.clone())));
    }
    tasks.push(tokio::spawn(prune_flows(
        store.clone(),
        opts.flows,
        stop_rx.clone(),
    )));
    // What every Welcome lists: this replica first, then the others.
    let welcome_replicas: Arc<[SocketAddr]> = if replicas.is_empty() {
        Arc::from(Vec::new())
    } else {
        std::iter::once(advertise)
            .chain(replicas.iter().copied())
            .collect()
    };
    tasks.push(tokio::spawn(agent_conn::accept_loop(
        endpoint.clone(),
        welcome_replicas,
        Arc::new(key),
        cmds.clone(),
        stop_rx.clone(),
        limits.clone(),
        guard.clone(),
    )));
    if let (Some(l), Some(addr)) = (metrics_listener, metrics_addr) {
        info!(metrics_addr = %addr, "metrics endpoint (plain HTTP, unauthenticated)");
        tasks.push(tokio::spawn(admin::serve_plain(
            l,
            metrics::router(metrics.clone()),
            std::time::Duration::from_millis(limits.admin_header_timeout_ms),
            stop_rx.clone(),
        )));
    }
    let admin_fingerprint = admin_tls.as_ref().map(|t| t.fingerprint.clone());
    tasks.push(tokio::spawn(admin::serve(
        admin_listener,
        admin_tls.map(|t| t.config),
        (
            cmds.clone(),
            admin::FlowAccess {
                store,
                retention_secs: opts.flows.retention_secs,
            },
        ),
        admin_auth,
        stop_rx,
        limits,
        guard.clone(),
        metrics.clone(),
    )));
    info!(%control_addr, %advertise, %admin_addr, public_key = %public_key, "coordinator started");
    Ok(CoordinatorHandle {
        control_addr,
        admin_addr,
        metrics_addr,
        metrics,
        admin_fingerprint,
        identity,
        cmds,
        stop: stop_tx,
        endpoint,
        tasks,
        guard,
    })
}

/// Most pruning batches per timer tick (the rest wait for the next tick).
const PRUNE_BATCHES_PER_TICK: u32 = 100;

/// Deletes flow rows older than the retention, every `prune_every_secs`, in batches of
/// `prune_batch` rows (each its own short transaction, so commits run in between).
async fn prune_flows(store: Arc<dyn Store>, f: FlowSettings, mut stop: watch::Receiver<bool>) {
    let every = std::time::Duration::from_secs(f.prune_every_secs.max(1));
    loop {
        tokio::select! {
            _ = stop.wait_for(|v| *v) => return,
            _ = tokio::time::sleep(every) => {}
        }
        let before = unix_now().saturating_sub(f.retention_secs);
        let started = std::time::Instant::now();
        let mut rows = 0u64;
        for _ in 0..PRUNE_BATCHES_PER_TICK {
            let s = store.clone();
            let batch = f.prune_batch;
            match tokio::task::spawn_blocking(move || s.prune_flows(before, batch)).await {
                Ok(Ok(n)) => {
                    rows += n;
                    if n < u64::from(batch) {
                        break;
                    }
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "pruning flow records failed");
                    break;
                }
                Err(e) => {
                    warn!(error = %e, "pruning flow records failed");
                    break;
                }
            }
            if *stop.borrow() {
                return;
            }
        }
        if rows > 0 {
            info!(
                rows,
                before,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "flow records pruned"
            );
        }
    }
}

/// Runs the coordinator until `opts.shutdown` fires.
pub async fn run(opts: CoordinatorOptions) -> Result<(), StartError> {
    let shutdown = opts.shutdown.clone();
    let h = start(opts).await?;
    shutdown.wait().await;
    info!("coordinator stopping");
    h.stop().await;
    Ok(())
}
