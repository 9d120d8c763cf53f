//! `meshd up --join TOKEN` / `meshd up` (resume): a host managed by the coordinator, as a
//! [`PeerSource`]: enrolment and identity here, then the session's network maps.
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

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use ipnet::IpNet;
use meshd_agent::{self as client, SessionConfig, SessionHandle, SessionState};
use meshd_config::fsutil::write_private_atomic as write_private;
use meshd_config::Mode;
use meshd_control::proto::{EndpointReport, HostInfo};
use meshd_control::{JoinToken, NetworkMap};
use meshd_policy::BlockEvent;
use meshd_tunnel::{PeerDiff, PrivateKey, PublicKey, TableError};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{HostSetup, Peer, PeerSource, PeerUpdate, SourceEvent, UpFacts};
use crate::host::edges::LocalAddresses;
use crate::transparent;
use crate::uapi::{DeviceFacts, Errno, SetRequest};

/// What an enrolled agent keeps on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentState {
    /// Coordinator control address: the replica that worked last (tried first).
    pub coordinator: SocketAddr,
    /// The other coordinator replicas' addresses, tried in order when `coordinator` does not
    /// answer (from the join token, then each `Welcome`). Absent in older files: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<SocketAddr>,
    /// Pinned coordinator key.
    pub coordinator_key: PublicKey,
    /// Our record at enrolment.
    pub host: HostInfo,
    /// The machine id this state belongs to (a copy on another machine is a clone).
    #[serde(default)]
    pub machine_id: Option<String>,
    /// Fingerprint of the admin key set the join token carried (signed policy): maps are
    /// checked against statements signed by it and its quorum-signed successors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_pin: Option<meshd_control::signed::Hash32>,
}

impl AgentState {
    /// Takes the session's coordinator list (the one that worked last first); true when it
    /// differs from what the file holds (write it then).
    pub fn learn_coordinators(&mut self, list: &[SocketAddr]) -> bool {
        let Some((&first, rest)) = list.split_first() else {
            return false;
        };
        if first == self.coordinator && rest == self.replicas.as_slice() {
            return false;
        }
        self.coordinator = first;
        self.replicas = rest.to_vec();
        true
    }
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
    /// Directory of the UAPI socket.
    pub uapi_dir: PathBuf,
    /// Flow records: on or off, interval, cap.
    pub flows: meshd_config::FlowSettings,
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
    let admin_pin = JoinToken::admin_pin(token.trim()).context("the join token is not valid")?;
    let state = AgentState {
        coordinator: e.coordinator,
        replicas: e.replicas,
        coordinator_key: e.coordinator_key,
        host: e.host,
        machine_id,
        admin_pin,
    };
    write_private(
        &state_dir.join("agent.json"),
        &serde_json::to_vec_pretty(&state)?,
    )?;
    write_private(&state_dir.join("join.token"), token.trim().as_bytes())?;
    // A new identity: a map (or signed statements) from an earlier life must not be reused.
    let _ = std::fs::remove_file(state_dir.join("netmap.json"));
    let _ = std::fs::remove_file(state_dir.join(TRUST_FILE));
    if let Some(pin) = &state.admin_pin {
        tracing::info!(admin_keys = %pin, "pinned the admin key set from the join token");
    }
    if state.host.name != name {
        tracing::warn!(requested = %name, host = %state.host.name,
            "requested name {name} is taken by another host; enrolled as {} (rename with `meshctl hosts rename`)",
            state.host.name);
    }
    tracing::info!(host = %state.host.name, addresses = ?state.host.addresses, "enrolled");
    Ok(state)
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
                host = %state.host.name,
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
                write_private(&agent_path, &serde_json::to_vec_pretty(&state)?)?;
            }
            Ok((state, key))
        }
    }
}

/// The peers of a network map as an update: allowed IPs are the peers' overlay addresses,
/// underlay addresses their endpoints' IPs.
pub fn map_update(map: &NetworkMap, host: &HostInfo) -> PeerUpdate {
    PeerUpdate {
        host: host.name.clone(),
        host_labels: host.labels.clone(),
        peers: meshd_control::peer_specs(map)
            .into_iter()
            .zip(&map.peers)
            .map(|(spec, p)| Peer {
                spec,
                transparent: p.transparent,
                underlay: p.endpoints.iter().map(SocketAddr::ip).collect(),
                labels: p.labels.clone(),
            })
            .collect(),
    }
}

/// Rotated keys in the state directory: `host.key.next` while the coordinator checks the new
/// key, then `host.key` (both 0600, fsync'd, replaced atomically).
#[derive(Debug)]
struct KeyFiles {
    dir: PathBuf,
}

impl KeyFiles {
    fn write(path: &Path, key: &PrivateKey) -> std::io::Result<()> {
        write_private(path, format!("{}\n", key.to_base64()).as_bytes())
            .map_err(|e| std::io::Error::other(e.to_string()))
    }
}

impl client::KeyStore for KeyFiles {
    fn save_next(&self, key: &PrivateKey) -> std::io::Result<()> {
        Self::write(&self.dir.join("host.key.next"), key)
    }

    fn promote(&self, key: &PrivateKey) -> std::io::Result<()> {
        Self::write(&self.dir.join("host.key"), key)?;
        match std::fs::remove_file(self.dir.join("host.key.next")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// The coordinator session as a [`PeerSource`].
/// The verified admin statements (signed policy), kept so they only move forward.
const TRUST_FILE: &str = "trust.json";

/// The trust store to start from: `trust.json` if it follows the same pin, else a fresh one
/// pinned to `pin` (`None` and nothing stored: the first key set sent is pinned).
fn load_trust(
    state_dir: &Path,
    pin: Option<meshd_control::signed::Hash32>,
) -> Option<meshd_control::signed::TrustStore> {
    let stored: Option<meshd_control::signed::TrustStore> =
        std::fs::read(state_dir.join(TRUST_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
    match (stored, pin) {
        (Some(s), Some(p)) if s.pin == Some(p) => Some(s),
        (Some(s), None) => Some(s),
        (_, Some(p)) => Some(meshd_control::signed::TrustStore::pinned(p)),
        (None, None) => None,
    }
}

pub struct Coordinator {
    state_dir: PathBuf,
    agent: AgentState,
    key: PrivateKey,
    listen_port: u16,
    transparent: bool,
    /// The map from `netmap.json`, handed to the session at start.
    persisted: Option<NetworkMap>,
    session: Option<Session>,
    /// What the last update came from, until the host says how it went.
    pending: Option<Pending>,
}

struct Session {
    handle: SessionHandle,
    /// `None` once the session dropped its end.
    maps: Option<watch::Receiver<Option<NetworkMap>>>,
    state: Option<watch::Receiver<SessionState>>,
    /// This host's key (changes on a rotation).
    key: Option<watch::Receiver<PrivateKey>>,
    /// SIGHUP: nothing to reload here (the coordinator owns the peers), but without a handler
    /// its default action would kill the daemon. `None` if it could not be installed.
    hup: Option<tokio::signal::unix::Signal>,
}

enum Pending {
    /// The map restored from `netmap.json` (already on disk).
    Restored { version: u64, peers: usize },
    /// A map from the session (persisted once the device takes it).
    Received(NetworkMap),
}

impl Coordinator {
    /// Checks the state directory, decides who this host is (enrolling if asked or if it is a
    /// clone) and reads the last network map: the source, the host's setup and the first
    /// update (the last map, if any).
    pub async fn open(
        args: AgentArgs,
        addresses: &impl LocalAddresses,
    ) -> anyhow::Result<(Self, HostSetup, Option<PeerUpdate>)> {
        meshd_config::fsutil::ensure_private_dir(&args.state_dir)
            .context("meshd state directory")?;
        // Written 0644 by earlier versions.
        for f in ["agent.json", "netmap.json", "join.token"] {
            meshd_config::fsutil::make_private(&args.state_dir.join(f))?;
        }
        let first = addresses.local_addresses(&[]).await;
        let report = endpoint_report(&first, args.listen_port, args.transparent);
        let (agent, key) = identity(&args, &args.state_dir.join("host.key"), report).await?;
        let persisted: Option<NetworkMap> = std::fs::read(args.state_dir.join("netmap.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let setup = HostSetup {
            key: key.clone(),
            interface: args.interface,
            mtu: args.mtu,
            addresses: overlay_addresses(&agent.host),
            listen_port: args.listen_port,
            fwmark: args.transparent.then_some(transparent::FWMARK),
            busy_poll: args.busy_poll,
            flows: args.flows,
            mode: if args.transparent {
                Mode::Transparent
            } else {
                Mode::Overlay
            },
            routed_prefixes: args.routed_prefixes,
            state_dir: args.state_dir.clone(),
            uapi_dir: args.uapi_dir.clone(),
            host: agent.host.name.clone(),
            host_labels: agent.host.labels.clone(),
            metrics_listen: None,
        };
        let initial = persisted.as_ref().map(|m| map_update(m, &agent.host));
        let pending = persisted.as_ref().map(|m| Pending::Restored {
            version: m.version,
            peers: m.peers.len(),
        });
        let source = Coordinator {
            state_dir: args.state_dir,
            agent,
            key,
            listen_port: args.listen_port,
            transparent: args.transparent,
            persisted,
            session: None,
            pending,
        };
        Ok((source, setup, initial))
    }

    fn map_path(&self) -> PathBuf {
        self.state_dir.join("netmap.json")
    }

    /// After a map: publish the signed view (status, metrics) and persist what was verified.
    fn signed_view_applied(&self) {
        let Some(s) = &self.session else { return };
        let status = s.handle.trust_status();
        let since = status
            .refused_since
            .map(|t| meshd_time::unix_now().saturating_sub(t.elapsed().as_secs()));
        crate::trust::counters().update(&status, since);
        if status.pinned.is_none() {
            return;
        }
        let store = s.handle.trust_store();
        let written = serde_json::to_vec(&store)
            .map_err(anyhow::Error::from)
            .and_then(|b| Ok(write_private(&self.state_dir.join(TRUST_FILE), &b)?));
        if let Err(e) = written {
            tracing::warn!(error = %format!("{e:#}"), "persisting the signed statements failed");
        }
    }
}

/// What the coordinator is told about our underlay addresses.
fn endpoint_report(own: &[IpNet], listen_port: u16, transparent: bool) -> EndpointReport {
    EndpointReport {
        addrs: own
            .iter()
            .map(|n| SocketAddr::new(n.addr(), listen_port))
            .collect(),
        listen_port: Some(listen_port),
        transparent,
    }
}

impl PeerSource for Coordinator {
    async fn start(&mut self, own: &[IpNet]) -> anyhow::Result<()> {
        let mut cfg = SessionConfig::new(
            self.agent.coordinator,
            self.agent.coordinator_key,
            self.key.clone(),
            endpoint_report(own, self.listen_port, self.transparent),
        );
        cfg.fallbacks = self.agent.replicas.clone();
        cfg.initial_map = self.persisted.take();
        cfg.fwmark = self.transparent.then_some(transparent::FWMARK);
        cfg.key_store = Some(std::sync::Arc::new(KeyFiles {
            dir: self.state_dir.clone(),
        }));
        cfg.trust = load_trust(&self.state_dir, self.agent.admin_pin);
        let handle = client::spawn_session(cfg);
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("installing the SIGHUP handler")?;
        self.session = Some(Session {
            maps: Some(handle.map()),
            state: Some(handle.state()),
            key: Some(handle.key()),
            hup: Some(hup),
            handle,
        });
        Ok(())
    }

    async fn next(&mut self) -> SourceEvent {
        let Some(session) = self.session.as_mut() else {
            return std::future::pending().await;
        };
        loop {
            let (maps, state, hup) = (&mut session.maps, &mut session.state, &mut session.hup);
            let key = &mut session.key;
            tokio::select! {
                changed = async { key.as_mut()?.changed().await.ok() }, if key.is_some() => {
                    let Some(()) = changed else {
                        session.key = None;
                        continue;
                    };
                    let Some(k) = session.key.as_mut().map(|k| k.borrow_and_update().clone()) else {
                        continue;
                    };
                    self.key = k.clone();
                    self.agent.host.public_key = k.public_key();
                    if let Err(e) = serde_json::to_vec_pretty(&self.agent)
                        .map_err(anyhow::Error::from)
                        .and_then(|b| Ok(write_private(&self.state_dir.join("agent.json"), &b)?))
                    {
                        tracing::warn!(error = %format!("{e:#}"), "updating agent.json after the key rotation failed");
                    }
                    return SourceEvent::RotateKey(k);
                }
                got = async { hup.as_mut()?.recv().await }, if hup.is_some() => {
                    if got.is_none() {
                        session.hup = None;
                    } else {
                        tracing::info!("SIGHUP ignored: in coordinator mode the coordinator owns the peers");
                    }
                }
                changed = async { maps.as_mut()?.changed().await.ok() }, if maps.is_some() => {
                    let Some(()) = changed else {
                        session.maps = None;
                        continue;
                    };
                    let Some(map) = session.maps.as_mut().and_then(|m| m.borrow_and_update().clone()) else {
                        continue;
                    };
                    let update = map_update(&map, &self.agent.host);
                    self.pending = Some(Pending::Received(map));
                    return SourceEvent::Update(update);
                }
                changed = async { state.as_mut()?.changed().await.ok() }, if state.is_some() => {
                    let Some(()) = changed else {
                        session.state = None;
                        continue;
                    };
                    let Some(s) = session.state.as_mut().map(|s| s.borrow_and_update().clone()) else {
                        continue;
                    };
                    match s {
                        SessionState::Refused { code, message } => {
                            let _ = std::fs::remove_file(self.map_path());
                            return SourceEvent::Refused(anyhow::anyhow!(
                                "the coordinator refused this host: {code} ({message})"
                            ));
                        }
                        SessionState::Connected { .. } => {
                            let list = session.handle.coordinators();
                            tracing::info!(coordinator = %session.handle.coordinator(), "connected to the coordinator");
                            if self.agent.learn_coordinators(&list) {
                                // A restarted agent starts from the replica that worked last
                                // and knows every other one.
                                tracing::info!(coordinators = ?list, "coordinator replicas updated in agent.json");
                                if let Err(e) = serde_json::to_vec_pretty(&self.agent)
                                    .map_err(anyhow::Error::from)
                                    .and_then(|b| Ok(write_private(&self.state_dir.join("agent.json"), &b)?))
                                {
                                    tracing::warn!(error = %format!("{e:#}"), "updating agent.json with the coordinator replicas failed");
                                }
                            }
                        }
                        SessionState::Connecting { attempt, last_error } if attempt > 0 => {
                            tracing::debug!(attempt, error = %last_error.as_deref().unwrap_or_default(), "coordinator unreachable; tunnels keep running");
                        }
                        _ => {}
                    }
                }
                else => return std::future::pending().await,
            }
        }
    }

    fn applied(&mut self, outcome: Result<&PeerDiff, &TableError>) -> anyhow::Result<()> {
        match (self.pending.take(), outcome) {
            (Some(Pending::Restored { version, peers }), Ok(_)) => {
                tracing::info!(
                    map_version = version,
                    peers,
                    "restored the last network map"
                );
            }
            (Some(Pending::Received(map)), Ok(diff)) => {
                if !diff.is_empty() {
                    tracing::info!(map_version = map.version, changes = %diff.to_string().trim_end().replace('\n', ", "), "network map applied");
                }
                let written = serde_json::to_vec(&map)
                    .map_err(anyhow::Error::from)
                    .and_then(|b| Ok(write_private(&self.map_path(), &b)?));
                if let Err(e) = written {
                    tracing::warn!(error = %format!("{e:#}"), "persisting the network map failed");
                }
                self.signed_view_applied();
            }
            (_, Err(e)) => tracing::error!(error = %e, "network map refused"),
            (None, Ok(_)) => {}
        }
        Ok(())
    }

    fn addresses_changed(&mut self, own: &[IpNet]) {
        tracing::info!(addresses = ?own, "underlay addresses changed; reporting");
        if let Some(s) = &self.session {
            let report = endpoint_report(own, self.listen_port, self.transparent);
            s.handle.report_endpoints(report.addrs);
        }
    }

    fn report_blocks(&mut self, events: Vec<BlockEvent>) {
        let Some(s) = &self.session else { return };
        for chunk in events.chunks(meshd_control::proto::MAX_BLOCKS_PER_MESSAGE) {
            if s.handle.report_blocks(chunk.to_vec()).is_err() {
                tracing::debug!("block report queue full; events kept in blocks.jsonl only");
            }
        }
    }

    fn report_flows(&mut self, batch: meshd_control::session::FlowBatch) {
        let Some(s) = &self.session else { return };
        s.handle.report_flows(batch);
    }

    fn uapi_set(&mut self, _set: &SetRequest, _facts: &DeviceFacts) -> Result<PeerUpdate, Errno> {
        tracing::info!("wg set refused: the coordinator owns the peers");
        Err(Errno::EPERM)
    }

    fn log_up(&self, up: &UpFacts<'_>) {
        tracing::info!(interface = %up.interface, host = %self.agent.host.name, coordinator = %self.agent.coordinator,
            mode = %up.mode, "meshd up (coordinator-managed)");
    }

    async fn stop(self) {
        if let Some(s) = self.session {
            s.handle.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::{host, table};

    fn key(n: u8) -> PrivateKey {
        PrivateKey::from_bytes([n; 32])
    }

    fn source(dir: &Path, pending: Option<Pending>) -> Coordinator {
        Coordinator {
            state_dir: dir.to_path_buf(),
            agent: AgentState {
                coordinator: "127.0.0.1:7443".parse().unwrap(),
                replicas: vec![],
                coordinator_key: key(9).public_key(),
                host: HostInfo {
                    id: meshd_control::model::HostId(1),
                    name: "app1".into(),
                    public_key: key(1).public_key(),
                    addresses: vec!["100.64.0.1".parse().unwrap()],
                    networks: vec!["100.64.0.0/10".parse().unwrap()],
                    labels: [("app".to_string(), "app1".to_string())].into(),
                },
                machine_id: None,
                admin_pin: None,
            },
            key: key(1),
            listen_port: 51820,
            transparent: false,
            persisted: None,
            session: None,
            pending,
        }
    }

    #[test]
    fn agent_state_keeps_the_replicas_and_reads_older_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = source(dir.path(), None).agent;
        let old = serde_json::to_value(&st).unwrap();
        assert!(
            old.get("replicas").is_none(),
            "no replicas: the file is as before"
        );
        let back: AgentState = serde_json::from_value(old).unwrap();
        assert!(back.replicas.is_empty());
        let (a, b): (SocketAddr, SocketAddr) = (
            "127.0.0.1:7443".parse().unwrap(),
            "127.0.0.2:7443".parse().unwrap(),
        );
        assert!(!st.learn_coordinators(&[a]));
        assert!(!st.learn_coordinators(&[]));
        assert!(st.learn_coordinators(&[b, a]));
        assert_eq!((st.coordinator, st.replicas.clone()), (b, vec![a]));
        assert!(!st.learn_coordinators(&[b, a]));
        let back: AgentState = serde_json::from_slice(&serde_json::to_vec(&st).unwrap()).unwrap();
        assert_eq!((back.coordinator, back.replicas), (b, vec![a]));
    }

    fn map(version: u64, keys: &[u8]) -> NetworkMap {
        NetworkMap {
            version,
            peers: keys
                .iter()
                .enumerate()
                .map(|(i, &k)| meshd_control::map::Peer {
                    name: format!("p{i}"),
                    public_key: key(k).public_key(),
                    addresses: vec![format!("100.64.0.{}", 10 + i).parse().unwrap()],
                    endpoints: vec![format!("198.18.0.{}:51820", 10 + i).parse().unwrap()],
                    labels: Default::default(),
                    grants: meshd_policy::PeerGrants::default(),
                    transparent: false,
                    next_public_key: None,
                })
                .map(std::sync::Arc::new)
                .collect(),
        }
    }

    #[test]
    fn map_peers_keep_their_keepalive_endpoints_and_labels() {
        let mut m = map(3, &[2, 3]);
        std::sync::Arc::make_mut(&mut m.peers[1])
            .endpoints
            .push("[fd00:18::3]:51820".parse().unwrap());
        std::sync::Arc::make_mut(&mut m.peers[1]).transparent = true;
        let u = map_update(&m, &source(Path::new("/"), None).agent.host);
        assert_eq!(
            (u.host.as_str(), u.host_labels["app"].as_str()),
            ("app1", "app1")
        );
        assert_eq!(u.peers[1].spec.endpoint, Some(m.peers[1].endpoints[0]));
        assert_eq!(u.peers[1].underlay.len(), 2);
        assert!(u.peers[1].transparent && !u.peers[0].transparent);
        assert_eq!(
            u.peers[0].spec.persistent_keepalive,
            Some(meshd_control::specs::PEER_KEEPALIVE)
        );
        assert_eq!(u.overlay_routes().len(), 2);
    }

    #[tokio::test]
    async fn a_refused_map_is_not_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("netmap.json");
        let mut h = host(Mode::Overlay, &[]);
        let mut src = source(dir.path(), None);
        let good = map(1, &[2, 3]);
        src.pending = Some(Pending::Received(good.clone()));
        let outcome = h.host.apply(map_update(&good, &src.agent.host), 0).await;
        src.applied(outcome.as_ref()).unwrap();
        let on_disk: NetworkMap = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(on_disk, good);
        let running = table(&h.device);

        // Two peers with one key: the device refuses, the file keeps the last good map.
        let bad = map(2, &[2, 2]);
        src.pending = Some(Pending::Received(bad.clone()));
        let outcome = h.host.apply(map_update(&bad, &src.agent.host), 0).await;
        assert!(outcome.is_err());
        src.applied(outcome.as_ref()).unwrap();
        let on_disk: NetworkMap = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(on_disk, good);
        assert_eq!(table(&h.device), running);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[tokio::test]
    async fn a_restored_map_is_not_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut src = source(
            dir.path(),
            Some(Pending::Restored {
                version: 4,
                peers: 2,
            }),
        );
        let mut h = host(Mode::Overlay, &[]);
        let outcome = h
            .host
            .apply(map_update(&map(4, &[2, 3]), &src.agent.host), 0)
            .await;
        src.applied(outcome.as_ref()).unwrap();
        assert!(!dir.path().join("netmap.json").exists());
        assert_eq!(table(&h.device).len(), 2);
    }

    #[test]
    fn overlay_addresses_take_the_pool_prefix() {
        let mut info = source(Path::new("/"), None).agent.host;
        info.addresses.push("fd7a::1".parse().unwrap());
        let got: Vec<String> = overlay_addresses(&info)
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(got, ["100.64.0.1/10", "fd7a::1/128"]);
    }
}
