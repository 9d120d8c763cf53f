//! meshd coordinator: the control-plane server (QUIC + Noise control channel to agents, admin
//! HTTP/JSON API, SQLite state). The channel itself is `meshd-channel`; the agent's side of it
//! is `meshd-agent`.
//!
//! Entry points: [`run`] (what `meshd coordinator` calls, with [`CoordinatorArgs`] flattened
//! into its flags), [`start`] (tests: returns a handle with the bound addresses).

pub mod admin;
pub mod guard;
pub mod options;
pub mod server;

pub(crate) use meshd_channel::{noise, quic};

pub use options::{
    CoordinatorArgs, CoordinatorFile, CoordinatorOptions, Shutdown, ShutdownTrigger,
};
pub use server::{run, start, start_with_store, AdminOp, AdminReply, CoordinatorHandle};
