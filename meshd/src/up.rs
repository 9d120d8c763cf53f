//! `meshd up`: bring the interface up from a config file, run until told to stop.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use meshd_config::{Config, Mode};
use meshd_policy::PeerGrants;
use meshd_tunnel::{Device, PeerSpec, PrivateKey};
use rand_core::RngCore as _;
use tokio::signal::unix::{signal, SignalKind};

use crate::blocks::{BlockSink, Directory};
use crate::dataplane::{Dataplane, DataplaneConfig, Enforcement};
use crate::routes::Routes;
use crate::status::{self, StatusSource};
use crate::transparent::{self, Transparent};

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
    /// Transparent mode: encrypt traffic to peers' ordinary (underlay) addresses, with no
    /// change to applications (static mode: same as `mode = "transparent"`).
    #[arg(long)]
    transparent: bool,
    /// Machine id file: a state directory copied to a machine with another id is a clone and
    /// enrols itself as a new host (coordinator mode).
    #[arg(long, default_value = "/etc/machine-id", env = "MESHD_MACHINE_ID_FILE")]
    machine_id_file: PathBuf,
    /// Busy-poll window in microseconds (0: off, the default): after a lone packet leaves
    /// (or arrives) while the other direction is quiet, the worker polls for the answer this
    /// long instead of sleeping, trading CPU for steadier latency. Capped at 5% of a core
    /// per worker; never under bulk traffic.
    #[arg(long, value_name = "US", default_value_t = 0, env = "MESHD_BUSY_POLL_US", value_parser = clap::value_parser!(u32).range(0..=10_000))]
    busy_poll_us: u32,
    /// Prefixes peers may reach through this host besides its own addresses (e.g. a subnet
    /// it routes to), comma-separated or repeated (coordinator mode; static mode:
    /// `[interface] routed_prefixes`). Without it, inner packets to any other destination
    /// are dropped and counted as `inner_destination`.
    #[arg(
        long,
        value_name = "PREFIX",
        value_delimiter = ',',
        conflicts_with = "config"
    )]
    routed_prefixes: Vec<ipnet::IpNet>,
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

fn load(path: &std::path::Path, transparent: bool) -> anyhow::Result<(Config, PrivateKey)> {
    let mut cfg = Config::load(path)?;
    if transparent {
        cfg.interface.mode = Mode::Transparent;
    }
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
            transparent: args.transparent,
            machine_id_file: args.machine_id_file,
            busy_poll: Duration::from_micros(args.busy_poll_us.into()),
            routed_prefixes: args.routed_prefixes,
        }));
    };
    let busy_poll = Duration::from_micros(args.busy_poll_us.into());
    run_static(&config, &args.state_dir, args.transparent, busy_poll)
}

/// Static mode: peers from the config file, SIGHUP reloads them.
fn run_static(
    config: &std::path::Path,
    state_dir: &std::path::Path,
    transparent: bool,
    busy_poll: Duration,
) -> anyhow::Result<()> {
    let (cfg, key) = load(config, transparent)?;
    meshd_config::fsutil::ensure_private_dir(state_dir).context("meshd state directory")?;
    let device = Arc::new(Device::new(key, rand_core::OsRng.next_u32()));
    device.set_peers(&peer_specs(&cfg)?)?;
    let iface = &cfg.interface;
    device.set_destinations(crate::dataplane::local_destinations(
        &iface.addresses,
        &[],
        &iface.routed_prefixes,
    ));
    let enforcement = Arc::new(Enforcement::new());
    let dp = Dataplane::start(
        device.clone(),
        enforcement.clone(),
        &DataplaneConfig {
            name: iface.name.clone(),
            mtu: iface.mtu,
            addresses: iface.addresses.clone(),
            listen_port: iface.listen_port,
            fwmark: fwmark(&cfg),
            busy_poll,
        },
    )?;
    let protected: Arc<Mutex<Vec<String>>> = Arc::default();
    let source = StatusSource {
        interface: iface.name.clone(),
        listen_port: dp.listen_port,
        mode: format!("{:?}", iface.mode).to_lowercase(),
        addresses: iface.addresses.iter().map(|a| a.to_string()).collect(),
        offload: dp.offload,
        protected: protected.clone(),
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
        (dp.if_index, dp.listen_port),
        &protected,
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
    (if_index, listen_port): (u32, u16),
    protected: &Mutex<Vec<String>>,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut routes = Routes::new(if_index, &cfg.interface.addresses).await?;
    let allowed = |c: &Config| -> Vec<ipnet::IpNet> {
        c.peers.iter().flat_map(|p| p.allowed_ips.clone()).collect()
    };
    routes.sync(allowed(cfg)).await;
    let mut transparent = match fwmark(cfg).filter(|_| cfg.interface.mode == Mode::Transparent) {
        Some(mark) => {
            let name = &cfg.interface.name;
            let t = Transparent::start(if_index, name, listen_port, mark).await;
            Some(t.context("setting up transparent mode")?)
        }
        None => None,
    };
    let (conn, nl, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(conn);
    let overlay: Vec<ipnet::IpNet> = cfg.interface.addresses.clone();
    let mut own = crate::agent::local_addresses(&nl, &cfg.interface.addresses).await;
    // The peers as configured; transparent mode adds underlay addresses to a copy.
    let mut specs = peer_specs(cfg)?;
    if let Some(t) = transparent.as_mut() {
        apply_transparent(t, device, &mut specs.clone(), &own, &overlay, protected).await;
    }
    let mut current = cfg.clone();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    crate::memory::release_startup_code_logged();
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = tick.tick() => {
                let now = crate::dataplane::unix_millis();
                let _events = sink.flush(enforcement, device);
                enforcement.firewall.sweep_all(now);
                if let Some(t) = transparent.as_mut() {
                    let peer_of = |ip: std::net::IpAddr| {
                        let s = specs.iter().find(|s| s.endpoint.is_some_and(|e| e.ip() == ip))?;
                        let labels = current.peers.iter().find(|p| p.name == s.name).map(|p| p.labels.clone());
                        Some((s.name.clone(), labels.unwrap_or_default()))
                    };
                    let plain = t.blocked(SELF_NAME, &current.interface.labels, peer_of, now / 1000).await;
                    let _events = sink.emit(plain);
                    // Own addresses move and grants expire: the plan follows.
                    own = crate::agent::local_addresses(&nl, &current.interface.addresses).await;
                    apply_transparent(t, device, &mut specs.clone(), &own, &overlay, protected).await;
                }
            }
            _ = hup.recv() => {
                match load(config, cfg.interface.mode == Mode::Transparent) {
                    Ok((new, _key)) => {
                        if new.interface != cfg.interface {
                            tracing::warn!("[interface] changes need a restart; applying peer changes only");
                        }
                        let mut new_specs = match peer_specs(&new) {
                            Ok(s) => s,
                            Err(e) => {
                                tracing::error!(error = %format!("{e:#}"), "reload refused; keeping the running peers");
                                continue;
                            }
                        };
                        match device.set_peers(&new_specs) {
                            Ok(diff) => {
                                sink.directory = directory(&new);
                                tracing::info!(changes = %diff.to_string().trim_end().replace('\n', ", "), "reloaded config");
                                routes.sync(allowed(&new)).await;
                                if let Some(t) = transparent.as_mut() {
                                    specs = new_specs.clone();
                                    apply_transparent(t, device, &mut new_specs, &own, &overlay, protected).await;
                                } else {
                                    specs = new_specs;
                                }
                                current = new;
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
    if let Some(t) = transparent {
        t.stop().await;
    }
    Ok(())
}

/// The socket mark: the configured one, or in transparent mode meshd's default.
fn fwmark(cfg: &Config) -> Option<u32> {
    match cfg.interface.mode {
        Mode::Transparent => Some(cfg.interface.fwmark.unwrap_or(transparent::FWMARK)),
        Mode::Overlay => cfg.interface.fwmark,
    }
}

/// Static transparent mode: every listed peer is taken to run transparent mode too; its
/// endpoint's address is what gets protected.
async fn apply_transparent(
    t: &mut Transparent,
    device: &Device,
    specs: &mut [PeerSpec],
    own: &[ipnet::IpNet],
    overlay: &[ipnet::IpNet],
    protected: &Mutex<Vec<String>>,
) {
    let peers: Vec<transparent::PeerUnderlay<'_>> = specs
        .iter()
        .map(|s| transparent::PeerUnderlay {
            name: &s.name,
            transparent: true,
            addrs: s.endpoint.map(|e| e.ip()).into_iter().collect(),
            grants: &s.grants,
        })
        .collect();
    let now = crate::dataplane::unix_millis() / 1000;
    let overlay_nets: Vec<ipnet::IpNet> = overlay.iter().map(ipnet::IpNet::trunc).collect();
    let plan = transparent::plan(true, &peers, own, &overlay_nets, now);
    drop(peers);
    for (s, extra) in specs.iter_mut().zip(&plan.extra_allowed) {
        for n in extra {
            if !s.allowed_ips.contains(n) {
                s.allowed_ips.push(*n);
            }
        }
    }
    if let Err(e) = device.set_peers(specs) {
        tracing::error!(error = %e, "transparent mode: peer table refused");
        return;
    }
    // Peers reach our own underlay addresses through the tunnel now (routed prefixes
    // come from [interface] and change only with a restart).
    let routed = device.destinations().routed().to_vec();
    device.set_destinations(crate::dataplane::local_destinations(overlay, own, &routed));
    if let Err(e) = t.apply(&plan).await {
        tracing::error!(error = %format!("{e:#}"), "transparent mode: applying routes and filter");
    }
    if let Ok(mut p) = protected.lock() {
        *p = plan
            .protected
            .iter()
            .map(|(ip, name)| format!("{ip} ({name})"))
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        up: UpArgs,
    }

    #[test]
    fn routed_prefixes_flag() {
        let cli = Cli::try_parse_from([
            "up",
            "--join",
            "T",
            "--routed-prefixes",
            "10.1.0.0/16,fd10::/64",
            "--routed-prefixes",
            "192.0.2.0/24",
        ])
        .unwrap();
        let got: Vec<String> = cli
            .up
            .routed_prefixes
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(got, ["10.1.0.0/16", "fd10::/64", "192.0.2.0/24"]);
        assert!(Cli::try_parse_from(["up", "--routed-prefixes", "10.1.0.0"]).is_err());
        // Static mode takes them from [interface] routed_prefixes.
        let e = Cli::try_parse_from([
            "up",
            "--config",
            "m.toml",
            "--routed-prefixes",
            "10.1.0.0/16",
        ]);
        assert!(e.is_err());
    }
}
