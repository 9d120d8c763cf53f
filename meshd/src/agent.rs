//! `meshd up --join TOKEN` / `meshd up` (resume): a host managed by the coordinator.
//!
//! The private key is made here and never leaves the host. The agent enrols once with a join
//! token, keeps `<state-dir>/agent.json` (who the coordinator is, our overlay addresses) and the
//! last network map `<state-dir>/netmap.json` (fail-static: with the coordinator down, a
//! restarted meshd comes back from it), follows map updates by swapping the peer table, and
//! reports its own underlay addresses when they change.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::TryStreamExt as _;
use ipnet::IpNet;
use meshd_control::proto::{EndpointReport, HostInfo};
use meshd_control::{JoinToken, NetworkMap};
use meshd_coordinator::client::{self, SessionConfig, SessionState};
use meshd_tunnel::{Device, PeerSpec, PrivateKey, PublicKey};
use rand_core::RngCore as _;
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{signal, SignalKind};

use crate::blocks::{BlockSink, Directory};
use crate::dataplane::{Dataplane, DataplaneConfig, Enforcement};
use crate::routes::Routes;
use crate::status::{self, StatusSource};

/// Keepalive towards coordinator-managed peers (keeps NAT mappings and detects loss).
const PEER_KEEPALIVE: u16 = 25;
/// How often the agent looks at its own addresses.
const ADDRESS_POLL: Duration = Duration::from_millis(250);

/// What an enrolled agent keeps on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentState {
    /// Coordinator control address.
    pub coordinator: SocketAddr,
    /// Pinned coordinator key.
    pub coordinator_key: PublicKey,
    /// Our record at enrolment.
    pub host: HostInfo,
}

/// Options for a coordinator-managed host.
pub struct AgentArgs {
    pub state_dir: PathBuf,
    pub join: Option<String>,
    pub name: Option<String>,
    pub interface: String,
    pub listen_port: u16,
    pub mtu: u16,
}

fn write_atomic(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

fn load_or_create_key(path: &Path) -> anyhow::Result<PrivateKey> {
    if path.exists() {
        return Ok(meshd_config::load_private_key(path)?);
    }
    let key = PrivateKey::generate();
    meshd_config::write_private_key(path, &key)?;
    tracing::info!(path = %path.display(), public_key = %key.public_key(), "created this host's key");
    Ok(key)
}

fn default_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "host".into())
}

/// Peer specs from a network map: allowed IPs are the peers' overlay addresses.
pub fn map_to_specs(map: &NetworkMap) -> Vec<PeerSpec> {
    map.peers
        .iter()
        .map(|p| PeerSpec {
            name: p.name.clone(),
            public_key: p.public_key,
            endpoint: p.endpoints.first().copied(),
            allowed_ips: p.addresses.iter().map(|a| IpNet::from(*a)).collect(),
            persistent_keepalive: Some(PEER_KEEPALIVE),
            preshared_key: None,
            grants: Arc::new(p.grants.clone()),
        })
        .collect()
}

/// Our overlay addresses with the pool's prefix length (so the whole pool routes to the TUN).
fn overlay_addresses(host: &HostInfo) -> Vec<IpNet> {
    host.addresses
        .iter()
        .map(|a| {
            let len = host
                .networks
                .iter()
                .find(|n| n.contains(a))
                .map(|n| n.prefix_len())
                .unwrap_or(if a.is_ipv4() { 32 } else { 128 });
            IpNet::new(*a, len).unwrap_or_else(|_| IpNet::from(*a))
        })
        .collect()
}

/// Local underlay addresses worth reporting (not loopback, link-local or our overlay).
async fn local_addresses(handle: &rtnetlink::Handle, overlay: &[IpNet]) -> Vec<IpAddr> {
    use rtnetlink::packet_route::address::AddressAttribute;
    let mut out = Vec::new();
    let mut stream = handle.address().get().execute();
    while let Ok(Some(msg)) = stream.try_next().await {
        for attr in &msg.attributes {
            let AddressAttribute::Address(ip) = attr else {
                continue;
            };
            let ip = *ip;
            let skip = ip.is_loopback()
                || ip.is_unspecified()
                || matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
                || matches!(ip, IpAddr::V4(v4) if v4.is_link_local())
                || overlay.iter().any(|n| n.addr() == ip);
            if !skip && !out.contains(&ip) {
                out.push(ip);
            }
        }
    }
    out.sort();
    out
}

/// Runs a coordinator-managed host until SIGTERM/SIGINT.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating state directory {}", args.state_dir.display()))?;
    let key = load_or_create_key(&args.state_dir.join("host.key"))?;
    let agent_path = args.state_dir.join("agent.json");
    let map_path = args.state_dir.join("netmap.json");

    let (conn, nl, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(conn);
    let report_for = |ips: &[IpAddr]| EndpointReport {
        addrs: ips
            .iter()
            .map(|ip| SocketAddr::new(*ip, args.listen_port))
            .collect(),
        listen_port: Some(args.listen_port),
    };

    let agent = match &args.join {
        Some(token) => {
            let token = JoinToken::parse(token.trim()).context("the join token is not valid")?;
            let name = args.name.clone().unwrap_or_else(default_name);
            let ips = local_addresses(&nl, &[]).await;
            let e = client::enrol(&token, &name, &key, report_for(&ips))
                .await
                .map_err(|e| anyhow::anyhow!("enrolment failed: {e}"))?;
            let state = AgentState {
                coordinator: e.coordinator,
                coordinator_key: e.coordinator_key,
                host: e.host,
            };
            write_atomic(&agent_path, &serde_json::to_vec_pretty(&state)?)?;
            // A new identity: a map from an earlier life must not be reused.
            let _ = std::fs::remove_file(&map_path);
            tracing::info!(name = %state.host.name, addresses = ?state.host.addresses, "enrolled");
            state
        }
        None => {
            let text = std::fs::read(&agent_path).with_context(|| {
                format!(
                    "{} not found: this host is not enrolled. Join with `meshd up --join TOKEN` \
                     (from `meshctl token create`) or run static with `meshd up --config FILE`",
                    agent_path.display()
                )
            })?;
            serde_json::from_slice(&text)
                .with_context(|| format!("{} is corrupt", agent_path.display()))?
        }
    };
    let persisted: Option<NetworkMap> = std::fs::read(&map_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());

    let device = Arc::new(Device::new(key.clone(), rand_core::OsRng.next_u32()));
    if let Some(map) = &persisted {
        device.set_peers(&map_to_specs(map))?;
        tracing::info!(
            version = map.version,
            peers = map.peers.len(),
            "restored the last network map"
        );
    }
    let addresses = overlay_addresses(&agent.host);
    let enforcement = Arc::new(Enforcement::new());
    let dp = Dataplane::start(
        device.clone(),
        enforcement.clone(),
        &DataplaneConfig {
            name: args.interface.clone(),
            mtu: args.mtu,
            addresses: addresses.clone(),
            listen_port: args.listen_port,
            fwmark: None,
        },
    )?;
    let source = StatusSource {
        interface: args.interface.clone(),
        listen_port: dp.listen_port,
        mode: "overlay".into(),
        addresses: addresses.iter().map(|a| a.to_string()).collect(),
        offload: dp.offload,
    };
    {
        let (device, io, policy) = (device.clone(), dp.stats.clone(), enforcement.clone());
        status::serve(&args.interface, move || {
            status::snapshot(&device, &io, &policy, &source)
        })?;
    }
    let mut routes = Routes::new(dp.if_index, &addresses)?;
    let mut ips = local_addresses(&nl, &addresses).await;
    let mut cfg = SessionConfig::new(
        agent.coordinator,
        agent.coordinator_key,
        key,
        report_for(&ips),
    );
    cfg.initial_map = persisted;
    let session = client::spawn_session(cfg);
    let mut maps = session.map();
    let mut state = session.state();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut poll = tokio::time::interval(ADDRESS_POLL);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut sink = BlockSink::new(args.state_dir.join("blocks.jsonl"), Directory::default());
    let set_directory = |sink: &mut BlockSink, map: &NetworkMap| {
        sink.directory = Directory {
            host: agent.host.name.clone(),
            host_labels: agent.host.labels.clone(),
            peers: map
                .peers
                .iter()
                .map(|p| (p.public_key, (p.name.clone(), p.labels.clone())))
                .collect(),
        };
    };
    if let Some(map) = maps.borrow().as_ref() {
        set_directory(&mut sink, map);
    }
    tracing::info!(interface = %args.interface, name = %agent.host.name, coordinator = %agent.coordinator, "meshd up (coordinator-managed)");

    let result: anyhow::Result<()> = loop {
        tokio::select! {
            _ = term.recv() => break Ok(()),
            _ = int.recv() => break Ok(()),
            changed = maps.changed() => {
                if changed.is_err() { continue; }
                let map = maps.borrow_and_update().clone();
                let Some(map) = map else { continue };
                set_directory(&mut sink, &map);
                match device.set_peers(&map_to_specs(&map)) {
                    Ok(diff) => {
                        if !diff.is_empty() {
                            tracing::info!(version = map.version, changes = %diff.to_string().trim_end().replace('\n', ", "), "network map applied");
                        }
                        let nets: Vec<IpNet> = map.peers.iter().flat_map(|p| p.addresses.iter().map(|a| IpNet::from(*a))).collect();
                        routes.sync(nets).await;
                        if let Err(e) = serde_json::to_vec(&map).map_err(anyhow::Error::from).and_then(|b| write_atomic(&map_path, &b)) {
                            tracing::warn!(error = %format!("{e:#}"), "persisting the network map failed");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "network map refused"),
                }
            }
            changed = state.changed() => {
                if changed.is_err() { continue; }
                let s = state.borrow_and_update().clone();
                match s {
                    SessionState::Refused { code, message } => {
                        device.set_peers(&[])?;
                        let _ = std::fs::remove_file(&map_path);
                        break Err(anyhow::anyhow!("the coordinator refused this host: {code} ({message})"));
                    }
                    SessionState::Connected { .. } => tracing::info!("connected to the coordinator"),
                    SessionState::Connecting { attempt, last_error } if attempt > 0 => {
                        tracing::debug!(attempt, error = ?last_error, "coordinator unreachable; tunnels keep running");
                    }
                    _ => {}
                }
            }
            _ = tick.tick() => {
                let events = sink.flush(&enforcement, &device);
                for chunk in events.chunks(meshd_control::proto::MAX_BLOCKS_PER_MESSAGE) {
                    if session.report_blocks(chunk.to_vec()).is_err() {
                        tracing::debug!("block report queue full; events kept in blocks.jsonl only");
                    }
                }
                enforcement.firewall.sweep_all(crate::dataplane::unix_millis());
            }
            _ = poll.tick() => {
                let now = local_addresses(&nl, &addresses).await;
                if now != ips {
                    tracing::info!(addresses = ?now, "underlay addresses changed; reporting");
                    session.report_endpoints(report_for(&now).addrs);
                    ips = now;
                }
            }
        }
    };
    routes.clear().await;
    session.shutdown().await;
    dp.stop();
    result
}
