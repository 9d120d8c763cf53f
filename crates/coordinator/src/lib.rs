//! meshd coordinator: the control-plane server (QUIC + Noise control channel to agents, admin
//! HTTP/JSON API, SQLite state) and the agent-side client library ([`client`]).
//!
//! Entry points: [`run`] (what `meshd coordinator` calls, with [`CoordinatorArgs`] flattened
//! into its flags), [`start`] (tests: returns a handle with the bound addresses),
//! [`client::enrol`] and [`client::spawn_session`] (what `meshd up` calls).

pub mod admin;
pub mod client;
pub mod guard;
pub mod noise;
pub mod options;
pub mod quic;
pub mod server;

pub use options::{
    CoordinatorArgs, CoordinatorFile, CoordinatorOptions, Shutdown, ShutdownTrigger,
};
pub use server::{run, start, start_with_store, AdminOp, AdminReply, CoordinatorHandle};
