//! Static mode (`meshd up --config FILE`): peers from the config file, SIGHUP reloads them.
//! `[interface]` changes need a restart; a reload the policy or the device refuses keeps the
//! running peers. A `wg set` edits the running peers (as config entries) and goes the same
//! way as a reload; it lasts until the next reload or restart (the file is the truth).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use meshd_config::{Config, Interface, Mode, SELF_NAME};
use meshd_policy::BlockEvent;
use meshd_tunnel::{PeerDiff, PrivateKey, TableError};
use tokio::signal::unix::{signal, Signal, SignalKind};

use super::{HostSetup, Peer, PeerSource, PeerUpdate, SourceEvent, UpFacts};
use crate::transparent;
use crate::uapi::{self, DeviceFacts, Errno, SetRequest};

/// The config file as a [`PeerSource`].
pub struct StaticFile {
    path: PathBuf,
    /// The `[interface]` the host runs with (reloads change only peers).
    running: Interface,
    /// The config whose peers the device runs (the file as last applied, with `wg set`
    /// changes since).
    current: Config,
    /// SIGHUP (`None` in tests: no reloads but [`StaticFile::reload`]).
    hup: Option<Signal>,
    /// What the last update came from, until the host says how it went.
    pending: Pending,
}

enum Pending {
    /// The first update (from [`StaticFile::open`]).
    Start,
    /// A reload of this config.
    Reload(Box<Config>),
    /// A `wg set` that gives this config.
    Uapi(Box<Config>),
    /// Nothing outstanding.
    None,
}

/// Reads the config (with `--transparent` forcing the mode) and its key.
fn load(path: &Path, transparent: bool) -> anyhow::Result<(Config, PrivateKey)> {
    let mut cfg = Config::load(path)?;
    if transparent {
        cfg.interface.mode = Mode::Transparent;
    }
    let key = cfg.load_private_key()?;
    cfg.check_own_key(&key.public_key())?;
    Ok((cfg, key))
}

/// The socket mark: the configured one, or in transparent mode meshd's default.
fn fwmark(cfg: &Config) -> Option<u32> {
    match cfg.interface.mode {
        Mode::Transparent => Some(cfg.interface.fwmark.unwrap_or(transparent::FWMARK)),
        Mode::Overlay => cfg.interface.fwmark,
    }
}

/// The config's peers as an update (`now`: Unix seconds, for the policy). Every listed peer
/// is taken to run transparent mode too; its endpoint's address is what gets protected.
pub fn update_from(cfg: &Config, now: u64) -> Result<PeerUpdate, meshd_config::StaticPolicyError> {
    let peers = meshd_config::peer_specs(cfg, now)?;
    for u in &peers.unresolved {
        tracing::warn!(peer = %u.peer, error = %u.error, "cannot resolve endpoint");
    }
    Ok(PeerUpdate {
        host: SELF_NAME.into(),
        host_labels: cfg.interface.labels.clone(),
        peers: peers
            .specs
            .into_iter()
            .zip(&cfg.peers)
            .map(|(spec, p)| Peer {
                underlay: spec.endpoint.map(|e| e.ip()).into_iter().collect(),
                transparent: true,
                labels: p.labels.clone(),
                spec,
            })
            .collect(),
    })
}

impl StaticFile {
    /// Loads `path` (`transparent`: `--transparent`), checks the state directory and compiles
    /// the peers: the source, the host's setup and the first update.
    pub fn open(
        path: &Path,
        state_dir: &Path,
        transparent: bool,
        busy_poll: Duration,
    ) -> anyhow::Result<(Self, HostSetup, PeerUpdate)> {
        let (cfg, key) = load(path, transparent)?;
        meshd_config::fsutil::ensure_private_dir(state_dir).context("meshd state directory")?;
        let first = update_from(&cfg, meshd_time::unix_now())?;
        let iface = &cfg.interface;
        let setup = HostSetup {
            key,
            interface: iface.name.clone(),
            mtu: iface.mtu,
            addresses: iface.addresses.clone(),
            listen_port: iface.listen_port,
            fwmark: fwmark(&cfg),
            busy_poll,
            flows: iface.flows,
            mode: iface.mode,
            routed_prefixes: iface.routed_prefixes.clone(),
            state_dir: state_dir.to_path_buf(),
            uapi_dir: iface.uapi_dir.clone(),
            host: SELF_NAME.into(),
            host_labels: iface.labels.clone(),
            metrics_listen: iface.metrics_listen,
        };
        let source = StaticFile {
            path: path.to_path_buf(),
            running: cfg.interface.clone(),
            current: cfg.clone(),
            hup: None,
            pending: Pending::Start,
        };
        Ok((source, setup, first))
    }

    /// Reads the file again: the new peers, or `None` (logged) if the file or its policy is
    /// refused.
    pub fn reload(&mut self) -> Option<PeerUpdate> {
        let new = match load(&self.path, self.running.mode == Mode::Transparent) {
            Ok((new, _key)) => new,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "reload failed; keeping the running config");
                return None;
            }
        };
        if new.interface != self.running {
            tracing::warn!("[interface] changes need a restart; applying peer changes only");
        }
        match update_from(&new, meshd_time::unix_now()) {
            Ok(update) => {
                self.pending = Pending::Reload(Box::new(new));
                Some(update)
            }
            Err(e) => {
                tracing::error!(error = %format!("{:#}", anyhow::Error::from(e)), "reload refused; keeping the running peers");
                None
            }
        }
    }
}

impl PeerSource for StaticFile {
    async fn start(&mut self, _own: &[ipnet::IpNet]) -> anyhow::Result<()> {
        self.hup = Some(signal(SignalKind::hangup())?);
        Ok(())
    }

    async fn next(&mut self) -> SourceEvent {
        loop {
            match self.hup.as_mut() {
                Some(hup) => {
                    if hup.recv().await.is_none() {
                        self.hup = None;
                        continue;
                    }
                }
                None => std::future::pending::<()>().await,
            }
            if let Some(update) = self.reload() {
                return SourceEvent::Update(update);
            }
        }
    }

    fn applied(&mut self, outcome: Result<&PeerDiff, &TableError>) -> anyhow::Result<()> {
        let pending = std::mem::replace(&mut self.pending, Pending::None);
        match (pending, outcome) {
            (Pending::Start, Err(e)) => Err(anyhow::Error::from(e.clone())
                .context(format!("the peers of {}", self.path.display()))),
            (Pending::Reload(cfg), Ok(diff)) => {
                tracing::info!(changes = %diff.to_string().trim_end().replace('\n', ", "), "reloaded config");
                self.current = *cfg;
                Ok(())
            }
            (Pending::Reload(_), Err(e)) => {
                tracing::error!(error = %e, "reload refused; keeping the running peers");
                Ok(())
            }
            (Pending::Uapi(cfg), Ok(diff)) => {
                tracing::info!(changes = %diff.to_string().trim_end().replace('\n', ", "), "applied wg set");
                self.current = *cfg;
                Ok(())
            }
            (Pending::Uapi(_), Err(e)) => {
                tracing::warn!(error = %e, "wg set refused; keeping the running peers");
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn addresses_changed(&mut self, _own: &[ipnet::IpNet]) {}

    fn uapi_set(&mut self, set: &SetRequest, facts: &DeviceFacts) -> Result<PeerUpdate, Errno> {
        uapi::apply::check_device(set, facts)?;
        let mut cfg = self.current.clone();
        uapi::apply::apply_peers(&mut cfg.peers, set, &facts.public_key)?;
        match update_from(&cfg, meshd_time::unix_now()) {
            Ok(update) => {
                self.pending = Pending::Uapi(Box::new(cfg));
                Ok(update)
            }
            Err(e) => {
                tracing::warn!(error = %format!("{:#}", anyhow::Error::from(e)), "wg set refused; keeping the running peers");
                Err(Errno::EINVAL)
            }
        }
    }

    fn report_blocks(&mut self, _events: Vec<BlockEvent>) {}

    fn report_flows(&mut self, _batch: meshd_control::session::FlowBatch) {}

    fn log_up(&self, up: &UpFacts<'_>) {
        tracing::info!(
            interface = %up.interface,
            public_key = %up.public_key,
            port = up.port,
            offload = up.offload,
            peers = up.peers,
            "meshd up"
        );
    }

    async fn stop(self) {}
}
