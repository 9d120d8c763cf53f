//! `meshd up --join TOKEN` / `meshd up` (resume): a host managed by the coordinator.
//!
//! The private key is made here and never leaves the host. The agent enrols once with a join
//! token, keeps `<state-dir>/agent.json` (who the coordinator is, our overlay addresses) and the
//! last network map `<state-dir>/netmap.json` (fail-static: with the coordinator down, a
//! restarted meshd comes back from it), follows map updates by swapping the peer table, and
//! reports its own underlay addresses when they change.
//!
//! Cloned machines: `agent.json` records the machine id the host enrolled on. A copy of the
//! state directory started on another machine (another `/etc/machine-id`) does not use the
//! original's key: it makes a fresh one and enrols itself with the join token kept in
//! `<state-dir>/join.token` (or the one given with `--join`), getting its own identity.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use futures_util::TryStreamExt as _;
use ipnet::IpNet;
use meshd_agent::{self as client, SessionConfig, SessionState};
use meshd_control::proto::{EndpointReport, HostInfo};
use meshd_control::{JoinToken, NetworkMap};
use meshd_tunnel::{Device, PeerSpec, PrivateKey, PublicKey};
use rand_core::RngCore as _;
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{signal, SignalKind};

use crate::blocks::{BlockSink, Directory};
use crate::dataplane::{Dataplane, DataplaneConfig, Enforcement};
use crate::routes::Routes;
use crate::status::{self, StatusSource};
use crate::transparent::{self, Transparent};

/// Keepalive towards coordinator-managed peers (keeps NAT mappings and detects loss).
const PEER_KEEPALIVE: u16 = 25;
/// How often the agent looks at its own addresses without being told (a safety net: address
/// changes arrive at once as netlink notifications).
const ADDRESS_POLL: Duration = Duration::from_secs(5);
/// Address notifications are gathered until none came for this long ...
const ADDRESS_SETTLE: Duration = Duration::from_millis(50);
/// ... but for no longer than this.
const ADDRESS_SETTLE_MAX: Duration = Duration::from_millis(300);

/// What an enrolled agent keeps on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentState {
    /// Coordinator control address.
    pub coordinator: SocketAddr,
    /// Pinned coordinator key.
    pub coordinator_key: PublicKey,
    /// Our record at enrolment.
    pub host: HostInfo,
    /// The machine id this state belongs to (a copy on another machine is a clone).
    #[serde(default)]
    pub machine_id: Option<String>,
}

/// Options for a coordinator-managed host.
pub struct AgentArgs {
    pub state_dir: PathBuf,
    pub join: Option<String>,
    pub name: Option<String>,
    pub interface: String,
    pub listen_port: u16,
    pub mtu: u16,
    /// Transparent mode: encrypt traffic to peers' underlay addresses.
    pub transparent: bool,
    /// Where the machine id is read (clone detection).
    pub machine_id_file: PathBuf,
    /// Busy-poll window of the packet path (zero: off).
    pub busy_poll: std::time::Duration,
    /// Inner destinations peers may reach through this host besides its own addresses.
    pub routed_prefixes: Vec<IpNet>,
}

/// Reads the machine id (`None` if the file is missing or empty: clone detection is off).
fn machine_id(path: &Path) -> Option<String> {
    let id = std::fs::read_to_string(path).ok()?.trim().to_string();
    (!id.is_empty()).then_some(id)
}

/// Enrols with `token` under `name` (the key is made by the caller and stays here), records the
/// enrolment and keeps the token for re-enrolling a clone. An earlier map is discarded.
async fn enrol(
    token: &str,
    name: &str,
    key: &PrivateKey,
    report: EndpointReport,
    machine_id: Option<String>,
    state_dir: &Path,
) -> anyhow::Result<AgentState> {
    let parsed = JoinToken::parse(token.trim()).context("the join token is not valid")?;
    let e = client::enrol(&parsed, name, key, report)
        .await
        .map_err(|e| anyhow::anyhow!("enrolment failed: {e}"))?;
    let state = AgentState {
        coordinator: e.coordinator,
        coordinator_key: e.coordinator_key,
        host: e.host,
        machine_id,
    };
    write_atomic(
        &state_dir.join("agent.json"),
        &serde_json::to_vec_pretty(&state)?,
    )?;
    write_atomic(&state_dir.join("join.token"), token.trim().as_bytes())?;
    // A new identity: a map from an earlier life must not be reused.
    let _ = std::fs::remove_file(state_dir.join("netmap.json"));
    if state.host.name != name {
        tracing::warn!(requested = %name, name = %state.host.name,
            "requested name {name} is taken by another host; enrolled as {} (rename with `meshctl hosts rename`)",
            state.host.name);
    }
    tracing::info!(name = %state.host.name, addresses = ?state.host.addresses, "enrolled");
    Ok(state)
}

/// Writes a state file: private (0600) and atomic, through the one writer.
fn write_atomic(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    Ok(meshd_config::fsutil::write_private_atomic(path, data)?)
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

/// Transparent mode's plan for `map`; adds the peers' underlay addresses to `specs`' allowed
/// IPs (index-aligned with `map.peers`).
fn plan_transparent(
    map: &NetworkMap,
    specs: &mut [PeerSpec],
    own: &[IpNet],
    overlay: &[IpNet],
) -> transparent::Plan {
    let peers: Vec<transparent::PeerUnderlay<'_>> = map
        .peers
        .iter()
        .map(|p| transparent::PeerUnderlay {
            name: &p.name,
            transparent: p.transparent,
            addrs: p.endpoints.iter().map(SocketAddr::ip).collect(),
            grants: &p.grants,
        })
        .collect();
    let overlay_nets: Vec<IpNet> = overlay.iter().map(IpNet::trunc).collect();
    let plan = transparent::plan(
        true,
        &peers,
        own,
        &overlay_nets,
        crate::dataplane::unix_millis() / 1000,
    );
    for (spec, extra) in specs.iter_mut().zip(&plan.extra_allowed) {
        spec.allowed_ips.extend(extra.iter().copied());
    }
    if !plan.conflicts.is_empty() {
        tracing::warn!(addresses = ?plan.conflicts, "underlay addresses claimed by several peers are not protected");
    }
    plan
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

/// Local underlay addresses worth reporting (not loopback, link-local or our overlay), with
/// their prefix lengths.
pub(crate) async fn local_addresses(handle: &rtnetlink::Handle, overlay: &[IpNet]) -> Vec<IpNet> {
    use rtnetlink::packet_route::address::AddressAttribute;
    let mut out: Vec<IpNet> = Vec::new();
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
            let net = IpNet::new(ip, msg.header.prefix_len).unwrap_or_else(|_| IpNet::from(ip));
            if !skip && !out.iter().any(|n| n.addr() == ip) {
                out.push(net);
            }
        }
    }
    out.sort();
    out
}

/// Decides who this host is: a fresh enrolment (`--join`), the enrolled identity from the
/// state directory, or — when the state was copied from another machine — a new identity
/// enrolled with the kept join token.
async fn identity(
    args: &AgentArgs,
    key_path: &Path,
    report: EndpointReport,
) -> anyhow::Result<(AgentState, PrivateKey)> {
    let agent_path = args.state_dir.join("agent.json");
    let here = machine_id(&args.machine_id_file);
    let name = || args.name.clone().unwrap_or_else(default_name);
    if let Some(token) = &args.join {
        let key = load_or_create_key(key_path)?;
        let state = enrol(token, &name(), &key, report, here, &args.state_dir).await?;
        return Ok((state, key));
    }
    let text = std::fs::read(&agent_path).with_context(|| {
        format!(
            "{} not found: this host is not enrolled. Join with `meshd up --join TOKEN` \
             (from `meshctl token create`) or run static with `meshd up --config FILE`",
            agent_path.display()
        )
    })?;
    let mut state: AgentState = serde_json::from_slice(&text)
        .with_context(|| format!("{} is corrupt", agent_path.display()))?;
    match (&state.machine_id, &here) {
        (Some(then), Some(now)) if then != now => {
            let token_path = args.state_dir.join("join.token");
            let token = std::fs::read_to_string(&token_path).with_context(|| {
                format!(
                    "this state directory belongs to another machine (machine id {then}, this \
                     is {now}) and {} is missing: give this clone its own identity with \
                     `meshd up --join TOKEN`",
                    token_path.display()
                )
            })?;
            tracing::warn!(
                original = %state.host.name,
                original_key = %state.host.public_key,
                "state copied from another machine: making a new key and enrolling as a new host"
            );
            // The original's private key has no business on this machine.
            std::fs::remove_file(key_path)
                .with_context(|| format!("removing the copied key {}", key_path.display()))?;
            let key = PrivateKey::generate();
            meshd_config::write_private_key(key_path, &key)?;
            let state = enrol(&token, &name(), &key, report, here, &args.state_dir)
                .await
                .context("re-enrolling this clone with the kept join token")?;
            Ok((state, key))
        }
        _ => {
            let key = meshd_config::load_private_key(key_path)?;
            if state.machine_id.is_none() && here.is_some() {
                state.machine_id = here;
                write_atomic(&agent_path, &serde_json::to_vec_pretty(&state)?)?;
            }
            Ok((state, key))
        }
    }
}

/// Runs a coordinator-managed host until SIGTERM/SIGINT.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    meshd_config::fsutil::ensure_private_dir(&args.state_dir).context("meshd state directory")?;
    // Written 0644 by earlier versions.
    for f in ["agent.json", "netmap.json", "join.token"] {
        meshd_config::fsutil::make_private(&args.state_dir.join(f))?;
    }
    let map_path = args.state_dir.join("netmap.json");

    let (conn, nl, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(conn);
    // Address notifications (like `ip monitor address`): each one triggers a fresh dump.
    let (conn, _, mut addr_events) = rtnetlink::new_multicast_connection(&[
        rtnetlink::MulticastGroup::Ipv4Ifaddr,
        rtnetlink::MulticastGroup::Ipv6Ifaddr,
    ])
    .context("subscribing to address changes over rtnetlink")?;
    tokio::spawn(conn);
    let report_for = |nets: &[IpNet]| EndpointReport {
        addrs: nets
            .iter()
            .map(|n| SocketAddr::new(n.addr(), args.listen_port))
            .collect(),
        listen_port: Some(args.listen_port),
        transparent: args.transparent,
    };

    let first = local_addresses(&nl, &[]).await;
    let (agent, key) =
        identity(&args, &args.state_dir.join("host.key"), report_for(&first)).await?;
    let persisted: Option<NetworkMap> = std::fs::read(&map_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());

    let fwmark = args.transparent.then_some(transparent::FWMARK);
    let device = Arc::new(Device::new(key.clone(), rand_core::OsRng.next_u32()));
    let addresses = overlay_addresses(&agent.host);
    device.set_destinations(crate::dataplane::local_destinations(
        &addresses,
        &[],
        &args.routed_prefixes,
    ));
    let enforcement = Arc::new(Enforcement::new());
    let dp = Dataplane::start(
        device.clone(),
        enforcement.clone(),
        &DataplaneConfig {
            name: args.interface.clone(),
            mtu: args.mtu,
            addresses: addresses.clone(),
            listen_port: args.listen_port,
            fwmark,
            busy_poll: args.busy_poll,
        },
    )?;
    let protected: Arc<Mutex<Vec<String>>> = Arc::default();
    let source = StatusSource {
        interface: args.interface.clone(),
        listen_port: dp.listen_port,
        mode: if args.transparent {
            "transparent"
        } else {
            "overlay"
        }
        .into(),
        addresses: addresses.iter().map(|a| a.to_string()).collect(),
        offload: dp.offload,
        protected: protected.clone(),
    };
    {
        let (device, io, policy) = (device.clone(), dp.stats.clone(), enforcement.clone());
        status::serve(&args.interface, move || {
            status::snapshot(&device, &io, &policy, &source)
        })?;
    }
    let mut transparent = if args.transparent {
        match Transparent::start(
            dp.if_index,
            &args.interface,
            dp.listen_port,
            transparent::FWMARK,
        )
        .await
        {
            Ok(t) => Some(t),
            Err(e) => {
                dp.stop();
                return Err(e.context("setting up transparent mode"));
            }
        }
    } else {
        None
    };
    let mut routes = Routes::new(dp.if_index, &addresses).await?;
    let mut ips = local_addresses(&nl, &addresses).await;
    let mut applier = MapApplier {
        device: &device,
        routes: &mut routes,
        transparent: transparent.as_mut(),
        overlay: &addresses,
        routed: &args.routed_prefixes,
        protected: &protected,
    };
    if let Some(map) = &persisted {
        applier.apply(map, &ips).await;
        tracing::info!(
            version = map.version,
            peers = map.peers.len(),
            "restored the last network map"
        );
    }
    let mut cfg = SessionConfig::new(
        agent.coordinator,
        agent.coordinator_key,
        key,
        report_for(&ips),
    );
    cfg.initial_map = persisted;
    cfg.fwmark = fwmark;
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
    let mut current = maps.borrow().clone();
    if let Some(map) = &current {
        set_directory(&mut sink, map);
    }
    tracing::info!(interface = %args.interface, name = %agent.host.name, coordinator = %agent.coordinator,
        mode = if args.transparent { "transparent" } else { "overlay" }, "meshd up (coordinator-managed)");
    crate::memory::release_startup_code_logged();

    let result: anyhow::Result<()> = loop {
        tokio::select! {
            _ = term.recv() => break Ok(()),
            _ = int.recv() => break Ok(()),
            changed = maps.changed() => {
                if changed.is_err() { continue; }
                let map = maps.borrow_and_update().clone();
                let Some(map) = map else { continue };
                set_directory(&mut sink, &map);
                if applier.apply(&map, &ips).await {
                    if let Err(e) = serde_json::to_vec(&map).map_err(anyhow::Error::from).and_then(|b| write_atomic(&map_path, &b)) {
                        tracing::warn!(error = %format!("{e:#}"), "persisting the network map failed");
                    }
                }
                current = Some(map);
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
                let now = crate::dataplane::unix_millis();
                let mut events = sink.flush(&enforcement, &device);
                if let (Some(t), Some(map)) = (applier.transparent.as_deref_mut(), &current) {
                    let plain = t.blocked(&agent.host.name, &agent.host.labels, |ip| {
                        map.peers.iter().find(|p| p.endpoints.iter().any(|e| e.ip() == ip))
                            .map(|p| (p.name.clone(), p.labels.clone()))
                    }, now / 1000);
                    events.extend(sink.emit(plain));
                }
                for chunk in events.chunks(meshd_control::proto::MAX_BLOCKS_PER_MESSAGE) {
                    if session.report_blocks(chunk.to_vec()).is_err() {
                        tracing::debug!("block report queue full; events kept in blocks.jsonl only");
                    }
                }
                enforcement.firewall.sweep_all(now);
                // Grants expire: covered ports follow.
                if let Some(map) = &current {
                    if applier.transparent.is_some() {
                        applier.apply(map, &ips).await;
                    }
                }
            }
            _ = address_change(&mut addr_events, &mut poll) => {
                let now = local_addresses(&nl, &addresses).await;
                if now != ips {
                    tracing::info!(addresses = ?now, "underlay addresses changed; reporting");
                    session.report_endpoints(report_for(&now).addrs);
                    ips = now;
                    if let Some(map) = &current {
                        applier.apply(map, &ips).await;
                    }
                }
            }
        }
    };
    routes.clear().await;
    if let Some(t) = transparent {
        t.stop().await;
    }
    session.shutdown().await;
    dp.stop();
    result
}

/// Waits for an address notification (draining any that queued up behind it) or the next
/// safety-net poll.
async fn address_change(
    events: &mut (impl futures_util::Stream + Unpin),
    poll: &mut tokio::time::Interval,
) {
    use futures_util::{FutureExt as _, StreamExt as _};
    tokio::select! {
        Some(_) = events.next() => {
            // One change often comes as several notifications (`ip addr flush` then `add`):
            // wait until they stop for a moment, so peers get one consistent report.
            let deadline = tokio::time::Instant::now() + ADDRESS_SETTLE_MAX;
            loop {
                while let Some(Some(_)) = events.next().now_or_never() {}
                let quiet = tokio::time::timeout(ADDRESS_SETTLE, events.next());
                if quiet.await.is_err() || tokio::time::Instant::now() >= deadline {
                    break;
                }
            }
        }
        _ = poll.tick() => {}
    }
}

/// Applies network maps: the peer table, overlay routes and (transparent mode) underlay routes,
/// allowed IPs and covered ports.
struct MapApplier<'a> {
    device: &'a Device,
    routes: &'a mut Routes,
    transparent: Option<&'a mut Transparent>,
    overlay: &'a [IpNet],
    /// Prefixes peers may reach through this host (`--routed-prefixes`).
    routed: &'a [IpNet],
    protected: &'a Mutex<Vec<String>>,
}

impl MapApplier<'_> {
    /// Returns false if the device refused the map (the previous one stays).
    async fn apply(&mut self, map: &NetworkMap, own: &[IpNet]) -> bool {
        let mut specs = map_to_specs(map);
        let plan = self
            .transparent
            .as_ref()
            .map(|_| plan_transparent(map, &mut specs, own, self.overlay));
        match self.device.set_peers(&specs) {
            Ok(diff) => {
                if !diff.is_empty() {
                    tracing::info!(version = map.version, changes = %diff.to_string().trim_end().replace('\n', ", "), "network map applied");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "network map refused");
                return false;
            }
        }
        let nets: Vec<IpNet> = map
            .peers
            .iter()
            .flat_map(|p| p.addresses.iter().map(|a| IpNet::from(*a)))
            .collect();
        self.routes.sync(nets).await;
        if let (Some(t), Some(plan)) = (self.transparent.as_deref_mut(), plan) {
            // Peers reach our own underlay addresses through the tunnel now.
            let local = crate::dataplane::local_destinations(self.overlay, own, self.routed);
            self.device.set_destinations(local);
            if let Err(e) = t.apply(&plan).await {
                tracing::error!(error = %format!("{e:#}"), "transparent mode: applying routes and filter");
            }
            let list = plan
                .protected
                .iter()
                .map(|(ip, name)| format!("{ip} ({name})"))
                .collect();
            if let Ok(mut p) = self.protected.lock() {
                *p = list;
            }
        }
        true
    }
}
