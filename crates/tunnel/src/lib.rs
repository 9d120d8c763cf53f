//! The WireGuard-protocol core of meshd, with no IO: keys, the peer table (replaceable while
//! running), cryptokey routing and IP header helpers. `meshd` wires it to TUN and UDP.
//!
//! Flow: the daemon builds a [`Device`] from its private key, feeds it [`PeerSpec`]s with
//! [`Device::set_peers`] (again on every change: unchanged peers keep their sessions), and
//! per datagram calls [`Device::decapsulate`] or, per IP packet, [`Device::route`] then
//! [`Device::encapsulate`]. [`Device::update_timers`] must run about every 100 ms and
//! [`Device::tick_second`] every second. [`Device::set_destinations`] says which inner
//! destinations peers may send to (this host's own addresses and any routed prefixes);
//! decrypted packets to anything else are dropped.
#![forbid(unsafe_code)]

pub mod allowed_ips;
pub mod destinations;
pub mod device;
pub mod keys;
pub mod packet;
pub mod peer;
pub mod table;

pub use boringtun::noise::{Tunn, TunnResult};
pub use destinations::Destinations;
pub use device::{Decap, DestinationsCache, Device, DeviceCounters, DropReason, Encap, TableCache};
pub use keys::{KeyError, PrivateKey, PublicKey};
pub use peer::{Peer, PeerCounters, PeerSpec};
pub use table::{PeerDiff, PeerTable, RouteMemo, TableError};
