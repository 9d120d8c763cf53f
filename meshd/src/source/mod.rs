//! What feeds a [`Host`](crate::host::Host) its peers: one [`PeerSource`], the config file
//! ([`static_file`], `meshd up --config`) or the coordinator session ([`coordinator`],
//! `meshd up --join` / resume). A source opens (who this host is: its key, interface and
//! addresses, as a [`HostSetup`], and perhaps a first [`PeerUpdate`]), then yields typed
//! updates; the host applies each one the same way whatever the source, and tells the source
//! how it went ([`PeerSource::applied`]).

pub mod coordinator;
pub mod static_file;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use meshd_config::Mode;
use meshd_policy::BlockEvent;
use meshd_tunnel::{PeerDiff, PeerSpec, PrivateKey, TableError};

use crate::blocks::Directory;
use crate::uapi::{DeviceFacts, Errno, SetRequest};

/// Labels by key (`app = "db1"`).
pub type Labels = BTreeMap<String, String>;

/// One peer as a source knows it.
#[derive(Debug, Clone)]
pub struct Peer {
    /// What the device gets (allowed IPs: the peer's overlay prefixes, which are also routed
    /// into the TUN; transparent mode adds underlay addresses to a copy).
    pub spec: PeerSpec,
    /// Whether the peer runs transparent mode (static mode: every listed peer does).
    pub transparent: bool,
    /// The peer's underlay addresses (its endpoints' IPs): what transparent mode protects.
    pub underlay: Vec<IpAddr>,
    /// The peer's labels (block logs).
    pub labels: Labels,
}

/// Everything a source says about the mesh at one moment.
#[derive(Debug, Clone, Default)]
pub struct PeerUpdate {
    /// This host's name in block logs (`self` in static mode).
    pub host: String,
    /// This host's labels.
    pub host_labels: Labels,
    /// The peers, in table order.
    pub peers: Vec<Peer>,
}

impl PeerUpdate {
    /// The peer specs as the source gave them.
    pub fn specs(&self) -> Vec<PeerSpec> {
        self.peers.iter().map(|p| p.spec.clone()).collect()
    }

    /// Prefixes routed into the TUN: every peer's allowed IPs as given (not the underlay
    /// addresses transparent mode adds: those are routed by its own table).
    pub fn overlay_routes(&self) -> Vec<IpNet> {
        self.peers
            .iter()
            .flat_map(|p| p.spec.allowed_ips.iter().copied())
            .collect()
    }

    /// Names and labels of both ends, for block events.
    pub fn directory(&self) -> Directory {
        Directory {
            host: self.host.clone(),
            host_labels: self.host_labels.clone(),
            peers: self
                .peers
                .iter()
                .map(|p| (p.spec.public_key, (p.spec.name.clone(), p.labels.clone())))
                .collect(),
        }
    }

    /// The peer one of whose underlay addresses is `ip`, with its labels.
    pub fn peer_at(&self, ip: IpAddr) -> Option<(String, Labels)> {
        self.peers
            .iter()
            .find(|p| p.underlay.contains(&ip))
            .map(|p| (p.spec.name.clone(), p.labels.clone()))
    }
}

/// Who this host is and how its interface is set up: what a source decides before the host
/// starts.
pub struct HostSetup {
    /// This host's private key.
    pub key: PrivateKey,
    /// TUN name.
    pub interface: String,
    /// TUN MTU.
    pub mtu: u16,
    /// Overlay addresses with prefix lengths.
    pub addresses: Vec<IpNet>,
    /// WireGuard UDP port (0: the OS picks one).
    pub listen_port: u16,
    /// Socket mark of meshd's UDP packets (transparent mode always has one).
    pub fwmark: Option<u32>,
    /// Busy-poll window of the packet path (zero: off).
    pub busy_poll: Duration,
    /// Overlay or transparent.
    pub mode: Mode,
    /// Inner destinations peers may reach through this host besides its own addresses.
    pub routed_prefixes: Vec<IpNet>,
    /// Where `blocks.jsonl` goes.
    pub state_dir: PathBuf,
    /// Directory of the UAPI socket `<uapi_dir>/<interface>.sock`.
    pub uapi_dir: PathBuf,
    /// Flow records: on or off, interval, cap.
    pub flows: meshd_config::FlowSettings,
    /// This host's name and labels in block logs until the first update says otherwise.
    pub host: String,
    /// See `host`.
    pub host_labels: Labels,
    /// Prometheus endpoint (`--metrics-listen`, `[interface] metrics_listen`); `None`: off.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// What a source has for the host.
#[derive(Debug)]
pub enum SourceEvent {
    /// New peers: apply them.
    Update(PeerUpdate),
    /// The source will never give peers again (the coordinator refused this host): drop every
    /// peer and stop with this error.
    Refused(anyhow::Error),
    /// Key rotation: this host's key is now this one (already stored): switch the device.
    RotateKey(PrivateKey),
}

/// Facts of a running host, for a source's "meshd up" line.
pub struct UpFacts<'a> {
    /// TUN name.
    pub interface: &'a str,
    /// This host's public key (base64).
    pub public_key: String,
    /// The UDP port bound.
    pub port: u16,
    /// TUN offload on.
    pub offload: bool,
    /// Overlay or transparent.
    pub mode: Mode,
    /// Peers in the table now.
    pub peers: usize,
}

/// A feed of peers for the host. The host calls [`start`](Self::start) once it is up, then
/// polls [`next`](Self::next) (which must be cancel-safe: it sits in a `select!` with signals,
/// the tick and address changes) and answers each update with [`applied`](Self::applied).
///
/// The host runs on one current-thread runtime and never spawns a source, so the futures need
/// not be `Send`.
#[allow(async_fn_in_trait)]
pub trait PeerSource {
    /// The host is up with `own` as its underlay addresses: start feeding (the coordinator
    /// source connects here).
    async fn start(&mut self, own: &[IpNet]) -> anyhow::Result<()>;

    /// The next event. Cancel-safe.
    async fn next(&mut self) -> SourceEvent;

    /// How the host took the last update (or the first one from `open`): the new table's diff,
    /// or why the device refused it (the running peers stay). An error stops the host.
    fn applied(&mut self, outcome: Result<&PeerDiff, &TableError>) -> anyhow::Result<()>;

    /// This host's underlay addresses changed to `own`.
    fn addresses_changed(&mut self, own: &[IpNet]);

    /// Denied flows of the last tick (already written to `blocks.jsonl` and logged).
    fn report_blocks(&mut self, events: Vec<BlockEvent>);

    /// One flow-record interval (already shown by `meshd status`); the coordinator source
    /// reports it, the static source has no one to tell.
    fn report_flows(&mut self, batch: meshd_control::session::FlowBatch);

    /// A `wg set` (UAPI `set=1`): the update to apply (the host answers the client after
    /// [`applied`](Self::applied)), or the errno that refuses it at once.
    fn uapi_set(&mut self, set: &SetRequest, facts: &DeviceFacts) -> Result<PeerUpdate, Errno>;

    /// Logs the source's "meshd up" line.
    fn log_up(&self, up: &UpFacts<'_>);

    /// The host is stopping.
    async fn stop(self);
}
