//! `meshd up`: bring the interface up from a config file, run until told to stop.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use meshd_config::Config;
use meshd_policy::PeerGrants;
use meshd_tunnel::{Device, PeerSpec, PrivateKey};
use rand_core::RngCore as _;
use tokio::signal::unix::{signal, SignalKind};

use crate::blocks::{BlockSink, Directory};
use crate::dataplane::{Dataplane, DataplaneConfig, Enforcement};
use crate::routes::Routes;
use crate::status::{self, StatusSource};

/// Flags of `meshd up`. With `--config`, peers come from the file (static mode); with
/// `--join`, the host enrols with a coordinator; with neither, it resumes from `--state-dir`.
#[derive(clap::Args)]
pub struct UpArgs {
    /// Static mode: TOML config with [interface] and [[peer]] tables.
    #[arg(short, long, conflicts_with_all = ["join", "name"])]
    config: Option<PathBuf>,
    /// Enrol with a coordinator using a join token (from `meshctl token create`).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "MESHD_JOIN_TOKEN",
        hide_env_values = true
    )]
    join: Option<String>,
    /// Host name to register (default: /etc/hostname).
    #[arg(long)]
    name: Option<String>,
    /// Where meshd keeps its key, enrolment and last network map.
    #[arg(long, default_value = "/var/lib/meshd")]
    state_dir: PathBuf,
    /// TUN name (coordinator mode; the config file names it in static mode).
    #[arg(long, default_value = "mesh0")]
    interface: String,
    /// WireGuard UDP port (coordinator mode).
    #[arg(long, default_value_t = 51820)]
    listen_port: u16,
    /// TUN MTU (coordinator mode).
    #[arg(long, default_value_t = 1420)]
    mtu: u16,
}

/// Name of this host in static-mode policy (selectors like `{host: self}`).
const SELF_NAME: &str = "self";

/// Loads the static policy file, runs its tests against the static inventory and compiles the
/// grants per peer (by peer index in the config). `None` without a policy file: every listed
/// peer is allowed both ways, as in WireGuard.
fn static_grants(cfg: &Config) -> anyhow::Result<Option<Vec<PeerGrants>>> {
    let (origin, text) = match (&cfg.interface.policy_file, &cfg.interface.policy) {
        (Some(path), _) => (
            path.display().to_string(),
            std::fs::read_to_string(path)
                .with_context(|| format!("reading policy file {}", path.display()))?,
        ),
        (None, Some(inline)) => (
            format!("{} [interface] policy", cfg.path.display()),
            inline.clone(),
        ),
        (None, None) => return Ok(None),
    };
    let policy = meshd_policy::Policy::parse(&text)
        .map_err(|e| anyhow::anyhow!("{origin}:{}:{}: {}", e.line, e.column, e.message))?;
    let mut hosts = vec![meshd_policy::HostRef {
        id: 0,
        name: SELF_NAME.into(),
        labels: cfg.interface.labels.clone(),
    }];
    hosts.extend(
        cfg.peers
            .iter()
            .enumerate()
            .map(|(i, p)| meshd_policy::HostRef {
                id: i as u64 + 1,
                name: p.name.clone(),
                labels: p.labels.clone(),
            }),
    );
    let now = crate::dataplane::unix_millis() / 1000;
    let failed: Vec<String> = meshd_policy::run_tests(&policy, &hosts, now)
        .into_iter()
        .filter(|t| !t.passed())
        .map(|t| t.to_string())
        .collect();
    if !failed.is_empty() {
        anyhow::bail!("{origin}: policy tests failed:\n  {}", failed.join("\n  "));
    }
    let compiled = meshd_policy::compile(&policy, &hosts, now);
    let mut by_peer = compiled.grants_for(0);
    Ok(Some(
        (0..cfg.peers.len())
            .map(|i| by_peer.remove(&(i as u64 + 1)).unwrap_or_default())
            .collect(),
    ))
}

/// Peer specs from a config file; endpoints resolved now (a failed lookup is logged and
/// leaves the peer waiting to be contacted).
fn peer_specs(cfg: &Config) -> anyhow::Result<Vec<PeerSpec>> {
    let grants = static_grants(cfg)?;
    Ok(cfg
        .peers
        .iter()
        .enumerate()
        .map(|(i, p)| PeerSpec {
            name: p.name.clone(),
            public_key: p.public_key,
            endpoint: p.resolve_endpoint().and_then(|r| {
                r.map_err(|e| tracing::warn!(peer = %p.name, error = %e, "cannot resolve endpoint"))
                    .ok()
            }),
            allowed_ips: p.allowed_ips.clone(),
            persistent_keepalive: p.persistent_keepalive,
            preshared_key: p.preshared_key,
            grants: Arc::new(match &grants {
                Some(g) => g[i].clone(),
                None => PeerGrants::allow_all("static-peer"),
            }),
        })
        .collect())
}

/// Names and labels for block logs.
fn directory(cfg: &Config) -> Directory {
    Directory {
        host: SELF_NAME.into(),
        host_labels: cfg.interface.labels.clone(),
        peers: cfg
            .peers
            .iter()
            .map(|p| (p.public_key, (p.name.clone(), p.labels.clone())))
            .collect(),
    }
}

fn load(path: &std::path::Path) -> anyhow::Result<(Config, PrivateKey)> {
    let cfg = Config::load(path)?;
    let key = cfg.load_private_key()?;
    cfg.check_own_key(&key.public_key())?;
    Ok((cfg, key))
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(args: UpArgs) -> anyhow::Result<()> {
    let Some(config) = args.config.clone() else {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        return rt.block_on(crate::agent::run(crate::agent::AgentArgs {
            state_dir: args.state_dir,
            join: args.join,
            name: args.name,
            interface: args.interface,
            listen_port: args.listen_port,
            mtu: args.mtu,
        }));
    };
    run_static(&config, &args.state_dir)
}

/// Static mode: peers from the config file, SIGHUP reloads them.
fn run_static(config: &std::path::Path, state_dir: &std::path::Path) -> anyhow::Result<()> {
    let (cfg, key) = load(config)?;
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating state directory {}", state_dir.display()))?;
    let device = Arc::new(Device::new(key, rand_core::OsRng.next_u32()));
    device.set_peers(&peer_specs(&cfg)?)?;
    let iface = &cfg.interface;
    let enforcement = Arc::new(Enforcement::new());
    let dp = Dataplane::start(
        device.clone(),
        enforcement.clone(),
        &DataplaneConfig {
            name: iface.name.clone(),
            mtu: iface.mtu,
            addresses: iface.addresses.clone(),
            listen_port: iface.listen_port,
            fwmark: iface.fwmark,
        },
    )?;
    let source = StatusSource {
        interface: iface.name.clone(),
        listen_port: dp.listen_port,
        mode: format!("{:?}", iface.mode).to_lowercase(),
        addresses: iface.addresses.iter().map(|a| a.to_string()).collect(),
        offload: dp.offload,
    };
    {
        let (device, io, policy) = (device.clone(), dp.stats.clone(), enforcement.clone());
        status::serve(&iface.name, move || {
            status::snapshot(&device, &io, &policy, &source)
        })?;
    }
    tracing::info!(
        interface = %iface.name,
        public_key = %device.public_key(),
        port = dp.listen_port,
        offload = dp.offload,
        peers = cfg.peers.len(),
        "meshd up"
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let sink = BlockSink::new(state_dir.join("blocks.jsonl"), directory(&cfg));
    let result = rt.block_on(control_loop(
        config,
        &cfg,
        &device,
        &enforcement,
        sink,
        dp.if_index,
    ));
    dp.stop();
    tracing::info!("meshd stopped");
    result
}

/// Routes, signals and reloads. Returns when asked to stop, after removing what it added.
async fn control_loop(
    config: &std::path::Path,
    cfg: &Config,
    device: &Device,
    enforcement: &Enforcement,
    mut sink: BlockSink,
    if_index: u32,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut routes = Routes::new(if_index, &cfg.interface.addresses)?;
    let allowed = |c: &Config| -> Vec<ipnet::IpNet> {
        c.peers.iter().flat_map(|p| p.allowed_ips.clone()).collect()
    };
    routes.sync(allowed(cfg)).await;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = tick.tick() => {
                let _events = sink.flush(enforcement, device);
                enforcement.firewall.sweep_all(crate::dataplane::unix_millis());
            }
            _ = hup.recv() => {
                match load(config) {
                    Ok((new, _key)) => {
                        if new.interface != cfg.interface {
                            tracing::warn!("[interface] changes need a restart; applying peer changes only");
                        }
                        let specs = match peer_specs(&new) {
                            Ok(s) => s,
                            Err(e) => {
                                tracing::error!(error = %format!("{e:#}"), "reload refused; keeping the running peers");
                                continue;
                            }
                        };
                        match device.set_peers(&specs) {
                            Ok(diff) => {
                                sink.directory = directory(&new);
                                tracing::info!(changes = %diff.to_string().trim_end().replace('\n', ", "), "reloaded config");
                                routes.sync(allowed(&new)).await;
                            }
                            Err(e) => tracing::error!(error = %e, "reload refused; keeping the running peers"),
                        }
                    }
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "reload failed; keeping the running config"),
                }
            }
        }
    }
    routes.clear().await;
    Ok(())
}
