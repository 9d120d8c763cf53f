//! The meshd host library: everything `meshd up` runs (device, data plane, routes,
//! transparent mode, status, block sink) and what feeds it peers. `main.rs` is only the CLI.

pub mod agent;
pub mod blocks;
pub mod dataplane;
pub mod memory;
pub mod routes;
pub mod status;
pub mod transparent;
pub mod up;
