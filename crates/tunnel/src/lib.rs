//! The WireGuard-protocol core of meshd, with no IO: keys, the peer table (replaceable while
//! running), cryptokey routing and IP header helpers. `meshd` wires it to TUN and UDP.
#![forbid(unsafe_code)]

pub mod keys;

pub use keys::{KeyError, PrivateKey, PublicKey};
