//! meshd's in-process test kit: virtual time, fake links, shared fixtures and a whole mesh —
//! the coordinator's state, N agent sessions and N devices — in one thread, with no root, no
//! sockets and no sleeps. Tests built on it run in milliseconds and replay exactly from a seed.
//!
//! - [`time`]: a [`Clock`](time::Clock) tests advance (an `Instant` base plus an offset, and the
//!   matching Unix seconds and milliseconds) and a deterministic [`Schedule`](time::Schedule).
//! - [`link`]: a fake underlay ([`Network`](link::Network)) with latency, jitter, loss,
//!   reordering, MTU and partitions (both ways or one way), every datagram recorded.
//! - [`fixtures`]: keys, labels, hosts, policy files, block events and packets that several
//!   crates' tests share.
//! - [`device`]: one host's data plane ([`SimDevice`](device::SimDevice)): meshd's tunnel
//!   `Device` and identity `Firewall`, fed from network maps.
//! - [`mesh`]: the harness: a [`Mesh`](mesh::Mesh) of a coordinator and N hosts (agent
//!   session + device each) over fake links, run from one due event to the next.
//! - [`coordinator`]: `CoordinatorState` driven as the coordinator's actor drives it, with an
//!   in-memory store and restarts from it.
//!
//! # Why not turmoil
//!
//! turmoil simulates hosts, links, partitions and time for *tokio* code: it would run meshd's
//! real async drivers, but its time is tokio's paused clock, so boringtun's and the
//! coordinator's own clock reads would still not follow it, and it needs the IO under test to
//! go through turmoil's sockets (quinn, the TUN and rtnetlink do not). The pieces meshd's logic
//! lives in are already sans-IO (`CoordinatorState`, the agent session, `Device`, `Firewall`),
//! so a hand-built harness of a few hundred lines drives them directly, single-threaded and
//! seeded, with no async runtime and no real time at all — which is what makes a proptest over
//! whole meshes cheap — and leaves the real sockets to the namespace tests.
#![forbid(unsafe_code)]

pub mod coordinator;
pub mod device;
pub mod fixtures;
pub mod link;
pub mod mesh;
pub mod rng;
pub mod time;
