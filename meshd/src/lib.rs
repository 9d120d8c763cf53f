//! The meshd host library: everything `meshd up` runs (device, data plane, routes,
//! transparent mode, status, block sink) and what feeds it peers. `main.rs` is only the CLI.

pub mod blocks;
pub mod dataplane;
pub mod flows;
pub mod host;
pub mod memory;
pub mod metrics;
pub mod routes;
pub mod source;
pub mod status;
pub mod transparent;
pub mod trust;
pub mod uapi;
pub mod up;
