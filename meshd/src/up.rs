//! `meshd up`: bring the interface up from a config file, run until told to stop.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use meshd_config::Config;
use meshd_policy::PeerGrants;
use meshd_tunnel::{Device, PeerSpec, PrivateKey};
use rand_core::RngCore as _;
use tokio::signal::unix::{signal, SignalKind};

use crate::dataplane::{Dataplane, DataplaneConfig};
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

/// Peer specs from a config file; endpoints resolved now (a failed lookup is logged and
/// leaves the peer waiting to be contacted).
fn peer_specs(cfg: &Config) -> Vec<PeerSpec> {
    cfg.peers
        .iter()
        .map(|p| PeerSpec {
            name: p.name.clone(),
            public_key: p.public_key,
            endpoint: p.resolve_endpoint().and_then(|r| {
                r.map_err(|e| tracing::warn!(peer = %p.name, error = %e, "cannot resolve endpoint"))
                    .ok()
            }),
            allowed_ips: p.allowed_ips.clone(),
            persistent_keepalive: p.persistent_keepalive,
            preshared_key: p.preshared_key,
            // Static mode without rules: the peers the file lists are allowed, as in WireGuard.
            grants: Arc::new(PeerGrants::allow_all("static-peer")),
        })
        .collect()
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
    device.set_peers(&peer_specs(&cfg))?;
    let iface = &cfg.interface;
    let dp = Dataplane::start(
        device.clone(),
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
        let (device, io) = (device.clone(), dp.stats.clone());
        status::serve(&iface.name, move || status::snapshot(&device, &io, &source))?;
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
    let result = rt.block_on(control_loop(config, &cfg, &device, dp.if_index));
    dp.stop();
    tracing::info!("meshd stopped");
    result
}

/// Routes, signals and reloads. Returns when asked to stop, after removing what it added.
async fn control_loop(
    config: &std::path::Path,
    cfg: &Config,
    device: &Device,
    if_index: u32,
) -> anyhow::Result<()> {
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
            _ = hup.recv() => {
                match load(config) {
                    Ok((new, _key)) => {
                        if new.interface != cfg.interface {
                            tracing::warn!("[interface] changes need a restart; applying peer changes only");
                        }
                        match device.set_peers(&peer_specs(&new)) {
                            Ok(diff) => {
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
