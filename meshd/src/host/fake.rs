//! Fake edges for in-process host tests: they record what the host asked of the kernel.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use ipnet::IpNet;
use meshd_config::Mode;
use meshd_hostnet::{Blocked, Covered, Route};
use meshd_tunnel::{Device, PrivateKey};

use super::edges::{OverlayRoutes, UnderlayGuard};
use super::Host;
use crate::blocks::{BlockSink, Directory};
use crate::dataplane::Enforcement;
use crate::source::HostSetup;
use crate::transparent::Plan;

/// What the fakes saw.
#[derive(Default, Debug)]
pub struct Seen {
    /// Every `sync` of the overlay routes, sorted.
    pub route_syncs: Vec<Vec<IpNet>>,
    /// Overlay routes cleared.
    pub routes_cleared: bool,
    /// Every transparent plan applied: routes, covered ports, protected addresses.
    pub plans: Vec<(Vec<Route>, Covered, Vec<String>)>,
    /// Plaintext drops the next `take_blocked` returns.
    pub drops: Vec<Blocked>,
    /// Transparent mode stopped.
    pub guard_stopped: bool,
}

/// Overlay routes that only record.
pub struct FakeRoutes(pub Rc<RefCell<Seen>>);

impl OverlayRoutes for FakeRoutes {
    async fn sync(&mut self, mut wanted: Vec<IpNet>) {
        wanted.sort();
        self.0.borrow_mut().route_syncs.push(wanted);
    }

    async fn clear(&mut self) {
        self.0.borrow_mut().routes_cleared = true;
    }
}

/// Transparent mode that only records.
pub struct FakeGuard(pub Rc<RefCell<Seen>>);

impl UnderlayGuard for FakeGuard {
    async fn apply(&mut self, plan: &Plan) -> anyhow::Result<()> {
        let protected = plan
            .protected
            .iter()
            .map(|(ip, n)| format!("{ip} ({n})"))
            .collect();
        self.0
            .borrow_mut()
            .plans
            .push((plan.routes.clone(), plan.covered.clone(), protected));
        Ok(())
    }

    async fn take_blocked(&mut self) -> anyhow::Result<Vec<Blocked>> {
        Ok(std::mem::take(&mut self.0.borrow_mut().drops))
    }

    async fn stop(self) {
        self.0.borrow_mut().guard_stopped = true;
    }
}

/// A host under test.
pub struct TestHost {
    pub host: Host<FakeRoutes, FakeGuard>,
    pub device: Arc<Device>,
    pub protected: Arc<Mutex<Vec<String>>>,
    pub seen: Rc<RefCell<Seen>>,
    pub dir: tempfile::TempDir,
}

/// A setup for `mode` with overlay address 100.64.0.1/10.
pub fn setup(mode: Mode, dir: &std::path::Path) -> HostSetup {
    HostSetup {
        key: PrivateKey::from_bytes([1; 32]),
        interface: "mesh0".into(),
        mtu: 1420,
        addresses: vec!["100.64.0.1/10".parse().unwrap()],
        listen_port: 51820,
        fwmark: None,
        busy_poll: std::time::Duration::ZERO,
        flows: meshd_config::FlowSettings::default(),
        mode,
        routed_prefixes: vec![],
        state_dir: dir.to_path_buf(),
        uapi_dir: dir.join("uapi"),
        host: "h0".into(),
        host_labels: Default::default(),
        metrics_listen: None,
    }
}

/// A host in `mode` whose underlay address is `own`.
pub fn host(mode: Mode, own: &[&str]) -> TestHost {
    let dir = tempfile::tempdir().unwrap();
    let setup = setup(mode, dir.path());
    let device = Arc::new(Device::new(setup.key.clone(), 1));
    let seen = Rc::new(RefCell::new(Seen::default()));
    let protected: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = BlockSink::new(
        dir.path().join("blocks.jsonl"),
        Directory {
            host: setup.host.clone(),
            ..Directory::default()
        },
    );
    let host = Host::new(
        device.clone(),
        Arc::new(Enforcement::new()),
        FakeRoutes(seen.clone()),
        (mode == Mode::Transparent).then(|| FakeGuard(seen.clone())),
        protected.clone(),
        sink,
        &setup,
        own.iter().map(|a| a.parse().unwrap()).collect(),
    );
    TestHost {
        host,
        device,
        protected,
        seen,
        dir,
    }
}

/// The device's peer table as comparable text: name, key, endpoint, sorted allowed IPs,
/// keepalive, grants.
pub fn table(device: &Device) -> Vec<String> {
    device
        .table()
        .peers()
        .iter()
        .map(|p| {
            let s = p.spec();
            let mut ips: Vec<String> = s.allowed_ips.iter().map(|n| n.to_string()).collect();
            ips.sort();
            format!(
                "{} {} {:?} [{}] {:?} {:?}",
                s.name,
                s.public_key,
                s.endpoint,
                ips.join(" "),
                s.persistent_keepalive,
                s.grants
            )
        })
        .collect()
}
