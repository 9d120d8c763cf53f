//! The host: one composition root for `meshd up`, whatever feeds it peers.
//!
//! [`run`] builds the device, the data plane, the status and UAPI sockets, transparent mode
//! and the overlay routes from a [`HostSetup`], then runs ONE loop: SIGTERM/SIGINT stop it;
//! one one-second tick (block log, firewall sweep, transparent mode's plaintext drops, re-plan
//! for grant expiry); address changes; the [`PeerSource`]'s updates; and `wg set`s, which the
//! source turns into updates (or refuses). `meshd up --config` and
//! `meshd up --join`/resume differ only in the source they plug in.
//!
//! [`Host`] is what decides: it applies a [`PeerUpdate`] the same way for every source
//! (transparent plan, peer table, routes, local destinations, protected addresses, block
//! directory) over the edges of [`edges`], which tests fake.

pub mod edges;
#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use ipnet::IpNet;
use meshd_config::Mode;
use meshd_policy::BlockEvent;
use meshd_tunnel::{Device, PeerDiff, PrivateKey, TableError};
use rand_core::RngCore as _;
use tokio::signal::unix::{signal, SignalKind};

use crate::blocks::{BlockSink, Directory};
use crate::dataplane::{local_destinations, unix_millis, Dataplane, DataplaneConfig, Enforcement};
use crate::flows::{FlowCollector, FlowStatus};
use crate::routes::Routes;
use crate::source::{HostSetup, PeerSource, PeerUpdate, SourceEvent, UpFacts};
use crate::status::{self, StatusSource};
use crate::transparent::{self, Transparent};
use crate::uapi::{self, DeviceFacts, Errno, SetCall};
use edges::{AddressWatch, LocalAddresses, NetlinkAddresses, OverlayRoutes, UnderlayGuard};
use meshd_control::session::FlowBatch;

/// What a running host owns besides the data plane: the device's peer table and destinations,
/// routes, transparent mode, the protected-address list `meshd status` shows and the block
/// sink. Time is passed in.
pub struct Host<R, T> {
    device: Arc<Device>,
    enforcement: Arc<Enforcement>,
    routes: R,
    transparent: Option<T>,
    protected: Arc<Mutex<Vec<String>>>,
    sink: BlockSink,
    /// Our overlay addresses (with prefix lengths).
    overlay: Vec<IpNet>,
    /// Prefixes peers may reach through this host besides its own addresses.
    routed: Vec<IpNet>,
    /// Our underlay addresses, as last seen.
    own: Vec<IpNet>,
    /// The last update the device took.
    current: Option<PeerUpdate>,
    /// Underlay addresses claimed by several peers in the last plan (warned about once).
    conflicts: Vec<IpAddr>,
    /// Flow records of the current interval (`None`: `flow_records = false`).
    flows: Option<FlowCollector>,
    /// The latest interval's counts, as `meshd status` shows them.
    flow_status: Arc<FlowStatus>,
}

impl<R: OverlayRoutes, T: UnderlayGuard> Host<R, T> {
    /// Key rotation: the device's static key becomes `key`; sessions restart under it and the
    /// timers re-handshake every peer at once (peers already accept the new key).
    pub fn rotate_key(&mut self, key: PrivateKey) {
        let old = self.device.public_key();
        self.device.set_private_key(key);
        tracing::info!(old_key = %old, public_key = %self.device.public_key(),
            "host key rotated; re-handshaking every peer");
    }

    /// A host over a started device. `transparent` is `Some` in transparent mode; `own` are
    /// this host's underlay addresses now.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        device: Arc<Device>,
        enforcement: Arc<Enforcement>,
        routes: R,
        transparent: Option<T>,
        protected: Arc<Mutex<Vec<String>>>,
        sink: BlockSink,
        setup: &HostSetup,
        own: Vec<IpNet>,
    ) -> Self {
        Host {
            device,
            enforcement,
            routes,
            transparent,
            protected,
            sink,
            overlay: setup.addresses.clone(),
            routed: setup.routed_prefixes.clone(),
            own,
            current: None,
            conflicts: Vec::new(),
            flows: setup.flows.enabled.then(|| FlowCollector::new(setup.flows)),
            flow_status: Arc::default(),
        }
    }

    /// Publishes the flow-record counts in `status` (the one `meshd status` reads).
    pub fn set_flow_status(&mut self, status: Arc<FlowStatus>) {
        self.flow_status = status;
    }

    /// The latest flow-record interval's counts.
    pub fn flow_status(&self) -> &FlowStatus {
        &self.flow_status
    }

    /// Applies `update` (`now`: Unix seconds): the peer table (with transparent mode's extra
    /// allowed IPs), overlay routes, and in transparent mode the local destinations, underlay
    /// routes, covered ports and protected list. A refused table changes nothing: the running
    /// peers, routes and plan stay.
    pub async fn apply(&mut self, update: PeerUpdate, now: u64) -> Result<PeerDiff, TableError> {
        let diff = self.install(&update, now).await?;
        self.sink.directory = update.directory();
        self.current = Some(update);
        Ok(diff)
    }

    async fn install(&mut self, update: &PeerUpdate, now: u64) -> Result<PeerDiff, TableError> {
        let mut specs = update.specs();
        let plan = self.transparent.is_some().then(|| {
            let peers: Vec<transparent::PeerUnderlay<'_>> = update
                .peers
                .iter()
                .map(|p| transparent::PeerUnderlay {
                    name: &p.spec.name,
                    transparent: p.transparent,
                    addrs: p.underlay.clone(),
                    grants: &p.spec.grants,
                })
                .collect();
            let overlay_nets: Vec<IpNet> = self.overlay.iter().map(IpNet::trunc).collect();
            transparent::plan(true, &peers, &self.own, &overlay_nets, now)
        });
        if let Some(plan) = &plan {
            for (spec, extra) in specs.iter_mut().zip(&plan.extra_allowed) {
                for n in extra {
                    if !spec.allowed_ips.contains(n) {
                        spec.allowed_ips.push(*n);
                    }
                }
            }
            if plan.conflicts != self.conflicts {
                if !plan.conflicts.is_empty() {
                    tracing::warn!(addresses = ?plan.conflicts, "underlay addresses claimed by several peers are not protected");
                }
                self.conflicts = plan.conflicts.clone();
            }
        }
        let diff = self.device.set_peers(&specs)?;
        self.routes.sync(update.overlay_routes()).await;
        if let (Some(t), Some(plan)) = (self.transparent.as_mut(), plan) {
            // Peers reach our own underlay addresses through the tunnel now.
            self.device.set_destinations(local_destinations(
                &self.overlay,
                &self.own,
                &self.routed,
            ));
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
        Ok(diff)
    }

    /// Applies the current update again (own addresses moved, grants expired).
    async fn replan(&mut self, now: u64) {
        let Some(update) = self.current.take() else {
            return;
        };
        match self.install(&update, now).await {
            Ok(diff) if !diff.is_empty() => {
                tracing::info!(changes = %diff.to_string().trim_end().replace('\n', ", "), "peer table re-planned");
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "re-planned peer table refused"),
        }
        self.current = Some(update);
    }

    /// This host's underlay addresses are `own` now (`now`: Unix seconds). Returns whether
    /// they changed; transparent mode re-plans if so.
    pub async fn set_own_addresses(&mut self, own: Vec<IpNet>, now: u64) -> bool {
        if own == self.own {
            return false;
        }
        self.own = own;
        if self.transparent.is_some() {
            self.replan(now).await;
        }
        true
    }

    /// This host's underlay addresses as last seen.
    pub fn own_addresses(&self) -> &[IpNet] {
        &self.own
    }

    /// The once-a-second work (`now_ms`: Unix milliseconds): drains the block log and
    /// transparent mode's plaintext drops into events (written and logged; returned for the
    /// source), sweeps the firewall, and re-plans transparent mode for grant expiry.
    pub async fn tick(&mut self, now_ms: u64) -> Vec<BlockEvent> {
        let now = now_ms / 1000;
        let flows = &mut self.flows;
        let mut events = self.sink.flush(&self.enforcement, &self.device, |d, key| {
            if let Some(f) = flows.as_mut() {
                f.add_denial(d, key);
            }
        });
        if let Some(t) = self.transparent.as_mut() {
            match t.take_blocked().await {
                Ok(drops) => {
                    if let Some(f) = self.flows.as_mut() {
                        f.add_plaintext(&drops, now_ms);
                    }
                    let Directory {
                        host, host_labels, ..
                    } = &self.sink.directory;
                    let current = self.current.as_ref();
                    let plain = transparent::plaintext_events(
                        drops,
                        host,
                        host_labels,
                        |ip| current.and_then(|u| u.peer_at(ip)),
                        now,
                    );
                    events.extend(self.sink.emit(plain));
                }
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "reading plaintext drops"),
            }
        }
        self.enforcement.firewall.sweep_all(now_ms);
        if self.transparent.is_some() {
            self.replan(now).await;
        }
        events
    }

    /// Flow records (`now_ms`: Unix milliseconds; call after each [`tick`](Self::tick)):
    /// once per `flow_interval`, the firewall's counts, the denials and plaintext drops the
    /// ticks saw, aggregated into the interval's batch (also shown by `meshd status`).
    /// `None` between intervals and with flow records off.
    pub fn collect_flows(&mut self, now_ms: u64) -> Option<FlowBatch> {
        let f = self.flows.as_mut()?;
        if !f.due(now_ms) {
            return None;
        }
        f.collect_firewall(&self.enforcement.firewall, &self.device.table(), now_ms);
        Some(f.finish(now_ms, &self.flow_status))
    }

    /// Drops every peer (the source refused this host for good).
    pub fn clear_peers(&mut self) {
        if let Err(e) = self.device.set_peers(&[]) {
            tracing::error!(error = %e, "clearing the peer table");
        }
        self.current = None;
    }

    /// Removes the routes and transparent mode's state (a clean stop).
    pub async fn stop(mut self) {
        self.routes.clear().await;
        if let Some(t) = self.transparent.take() {
            t.stop().await;
        }
    }
}

/// Runs a host fed by `source` until SIGTERM/SIGINT (or the source refuses it for good).
/// `initial` is what the source knew at open (the config's peers, the last network map); it
/// is loaded into the device before the data plane starts and applied fully once the host is
/// up.
pub async fn run<S: PeerSource>(
    setup: HostSetup,
    initial: Option<PeerUpdate>,
    mut source: S,
    addresses: NetlinkAddresses,
) -> anyhow::Result<()> {
    // First: a socket path someone else serves refuses the start before anything is set up.
    let uapi = uapi::Listener::bind(&setup.uapi_dir, &setup.interface)?;
    let device = Arc::new(Device::new(setup.key.clone(), rand_core::OsRng.next_u32()));
    if let Some(u) = &initial {
        // Peers from the first packet on; the full apply below reports a refusal.
        let _ = device.set_peers(&u.specs());
    }
    device.set_destinations(local_destinations(
        &setup.addresses,
        &[],
        &setup.routed_prefixes,
    ));
    let enforcement = Arc::new(Enforcement::with_flow_counts(setup.flows.enabled));
    let dp = Dataplane::start(
        device.clone(),
        enforcement.clone(),
        &DataplaneConfig {
            name: setup.interface.clone(),
            mtu: setup.mtu,
            addresses: setup.addresses.clone(),
            listen_port: setup.listen_port,
            fwmark: setup.fwmark,
            busy_poll: setup.busy_poll,
        },
    )?;
    let result = serve(
        &setup,
        initial,
        &mut source,
        &addresses,
        &device,
        &enforcement,
        &dp,
        uapi,
    )
    .await;
    source.stop().await;
    dp.stop();
    tracing::info!("meshd stopped");
    result
}

/// Everything after the data plane is up; returns after removing what it added.
#[allow(clippy::too_many_arguments)]
async fn serve<S: PeerSource>(
    setup: &HostSetup,
    initial: Option<PeerUpdate>,
    source: &mut S,
    addresses: &NetlinkAddresses,
    device: &Arc<Device>,
    enforcement: &Arc<Enforcement>,
    dp: &Dataplane,
    uapi: uapi::Listener,
) -> anyhow::Result<()> {
    let protected: Arc<Mutex<Vec<String>>> = Arc::default();
    let flow_status: Arc<FlowStatus> = Arc::default();
    let status_source = StatusSource {
        flows: flow_status.clone(),
        interface: setup.interface.clone(),
        listen_port: dp.listen_port,
        mode: setup.mode,
        addresses: setup.addresses.iter().map(|a| a.to_string()).collect(),
        offload: dp.offload,
        protected: protected.clone(),
    };
    let snapshot: crate::metrics::Snapshot = {
        let (device, io, policy) = (device.clone(), dp.stats.clone(), enforcement.clone());
        Arc::new(move || status::snapshot(&device, &io, &policy, &status_source))
    };
    {
        let snapshot = snapshot.clone();
        status::serve(&setup.interface, move || snapshot())?;
    }
    let _metrics = match setup.metrics_listen {
        Some(addr) => Some(crate::metrics::start(addr, snapshot).await?),
        None => None,
    };
    let facts = DeviceFacts {
        private_key: setup.key.to_bytes(),
        public_key: device.public_key(),
        listen_port: dp.listen_port,
        fwmark: setup.fwmark,
    };
    let (set_tx, mut sets) = tokio::sync::mpsc::channel(4);
    let _uapi = {
        let (device, facts) = (device.clone(), facts.clone());
        uapi.serve(move || uapi::device_state(&device, &facts), set_tx)?
    };
    let mut watch = AddressWatch::new()?;
    let transparent = match setup.mode {
        Mode::Transparent => {
            let mark = setup.fwmark.unwrap_or(transparent::FWMARK);
            let t = Transparent::start(dp.if_index, &setup.interface, dp.listen_port, mark).await;
            Some(t.context("setting up transparent mode")?)
        }
        Mode::Overlay => None,
    };
    let routes = match Routes::new(dp.if_index, &setup.addresses).await {
        Ok(r) => r,
        Err(e) => {
            if let Some(t) = transparent {
                t.stop().await;
            }
            return Err(e);
        }
    };
    let own = addresses.local_addresses(&setup.addresses).await;
    let sink = BlockSink::new(
        setup.state_dir.join("blocks.jsonl"),
        Directory {
            host: setup.host.clone(),
            host_labels: setup.host_labels.clone(),
            peers: Default::default(),
        },
    );
    let mut host = Host::new(
        device.clone(),
        enforcement.clone(),
        routes,
        transparent,
        protected,
        sink,
        setup,
        own,
    );
    host.set_flow_status(flow_status);
    let result = async {
        if let Some(u) = initial {
            let outcome = host.apply(u, meshd_time::unix_now()).await;
            source.applied(outcome.as_ref())?;
        }
        source.start(host.own_addresses()).await?;
        source.log_up(&UpFacts {
            interface: &setup.interface,
            public_key: device.public_key().to_base64(),
            port: dp.listen_port,
            offload: dp.offload,
            mode: setup.mode,
            peers: device.table().peers().len(),
        });
        crate::memory::release_startup_code_logged();
        let mut uapi = UapiSets {
            calls: &mut sets,
            facts: &facts,
        };
        run_loop(
            &mut host,
            source,
            addresses,
            &mut watch,
            &setup.addresses,
            &mut uapi,
        )
        .await
    }
    .await;
    host.stop().await;
    result
}

/// `wg set`s from the UAPI socket, and the running device they are checked against.
struct UapiSets<'a> {
    calls: &'a mut tokio::sync::mpsc::Receiver<SetCall>,
    facts: &'a DeviceFacts,
}

/// A `wg set`: the source turns it into an update (or refuses it), the host applies it like
/// any other, the source hears how it went. Returns the client's errno: 0, the source's
/// refusal, or `EINVAL` for a table the device refused (the running peers stay).
pub(crate) async fn uapi_set<S: PeerSource, R: OverlayRoutes, T: UnderlayGuard>(
    host: &mut Host<R, T>,
    source: &mut S,
    set: &uapi::SetRequest,
    facts: &DeviceFacts,
    now: u64,
) -> anyhow::Result<Errno> {
    let update = match source.uapi_set(set, facts) {
        Ok(update) => update,
        Err(errno) => return Ok(errno),
    };
    let outcome = host.apply(update, now).await;
    source.applied(outcome.as_ref())?;
    Ok(match outcome {
        Ok(_) => Errno::OK,
        Err(_) => Errno::EINVAL,
    })
}

/// The one loop: signals, the source, the tick, address changes, `wg set`s.
async fn run_loop<S: PeerSource, R: OverlayRoutes, T: UnderlayGuard>(
    host: &mut Host<R, T>,
    source: &mut S,
    addresses: &impl LocalAddresses,
    watch: &mut AddressWatch,
    overlay: &[IpNet],
    uapi: &mut UapiSets<'_>,
) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            event = source.next() => match event {
                SourceEvent::Update(update) => {
                    let outcome = host.apply(update, meshd_time::unix_now()).await;
                    source.applied(outcome.as_ref())?;
                }
                SourceEvent::Refused(e) => {
                    host.clear_peers();
                    return Err(e);
                }
                SourceEvent::RotateKey(key) => host.rotate_key(key),
            },
            Some(call) = uapi.calls.recv() => {
                let errno = uapi_set(host, source, &call.request, uapi.facts, meshd_time::unix_now()).await?;
                if call.reply.send(errno).is_err() {
                    tracing::debug!("the wg set client left before its answer");
                }
            }
            _ = tick.tick() => {
                let now_ms = unix_millis();
                let events = host.tick(now_ms).await;
                source.report_blocks(events);
                if let Some(batch) = host.collect_flows(now_ms) {
                    source.report_flows(batch);
                }
            }
            () = watch.changed() => {
                let own = addresses.local_addresses(overlay).await;
                if host.set_own_addresses(own, meshd_time::unix_now()).await {
                    source.addresses_changed(host.own_addresses());
                }
            }
        }
    }
}
