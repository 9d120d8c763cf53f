//! The cross-platform WireGuard userspace API on `<uapi_dir>/<interface>.sock` (default
//! `/var/run/wireguard/mesh0.sock`, where wireguard-go and boringtun serve it too), so that
//! `wg show`, `wg showconf`, `wg set` and tools built on them work against meshd.
//!
//! - [`proto`] parses requests and formats answers (pure).
//! - `get=1` is answered from the device's peer table, read the way `meshd status` reads it
//!   ([`device_state`]).
//! - `set=1` goes to the host as a [`SetCall`]; the host hands it to its
//!   [`PeerSource`](crate::source::PeerSource): static mode applies it like a SIGHUP reload
//!   ([`apply`] edits the config's peers, the source compiles and the host applies them),
//!   coordinator mode refuses it with `EPERM` because the coordinator owns the peers. A new
//!   private key, listen port or fwmark is refused with `EOPNOTSUPP` (needs a restart).
//! - [`server`] binds and serves the socket.

pub mod apply;
pub mod proto;
pub mod server;

use std::sync::atomic::Ordering;
use std::time::Duration;

use meshd_tunnel::Device;

pub use apply::DeviceFacts;
pub use proto::{DeviceState, Errno, PeerState, SetRequest};
pub use server::{Listener, Server, SetCall};

/// The device as `get=1` shows it, read like [`crate::status::snapshot`] reads it (same
/// counters, same endpoint, handshake time as now minus the time since it).
pub fn device_state(device: &Device, facts: &DeviceFacts) -> DeviceState {
    let now = Duration::from_millis(meshd_time::unix_millis());
    let table = device.table();
    let peers = table
        .peers()
        .iter()
        .map(|p| {
            let spec = p.spec();
            let at = p.last_handshake().map(|ago| now.saturating_sub(ago));
            PeerState {
                public_key: p.public_key.0,
                preshared_key: spec.preshared_key,
                endpoint: p.endpoint(),
                last_handshake: at.map_or((0, 0), |t| (t.as_secs(), t.subsec_nanos())),
                tx_bytes: p.counters.tx_bytes.load(Ordering::Relaxed),
                rx_bytes: p.counters.rx_bytes.load(Ordering::Relaxed),
                persistent_keepalive: spec.persistent_keepalive.unwrap_or(0),
                allowed_ips: spec.allowed_ips.clone(),
            }
        })
        .collect();
    DeviceState {
        private_key: facts.private_key,
        listen_port: facts.listen_port,
        fwmark: facts.fwmark,
        peers,
    }
}
