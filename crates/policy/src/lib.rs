//! meshd's label policy, with no IO.
//!
//! - [`grant`]: what one host enforces per peer ([`PeerGrants`]), as carried in network maps and
//!   checked on the packet path. Default deny: what no grant admits is dropped.
#![forbid(unsafe_code)]

pub mod grant;

pub use grant::{ip_proto, BlockEvent, DenyReason, Direction, Grant, PeerGrants, Proto, UnixTime};
