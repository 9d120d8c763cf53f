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
//! - [`device`]: one host's data plane ([`SimDevice`](device::SimDevice)): meshd's real
//!   packet path — `meshd::dataplane::Pump` (the tx, rx and timer passes the daemon's worker
//!   threads run) over the fake TUN and bind, with meshd's `Device` and `Enforcement` — fed
//!   from network maps, its datagrams carried by the fake links.
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
//! lives in are already sans-IO (`CoordinatorState`, the agent session) or synchronous over
//! fakeable edges (the data path's `Pump`), so a hand-built harness of a few hundred lines
//! drives them directly, single-threaded and seeded, with no async runtime and no sleeping —
//! which is what makes a proptest over whole meshes cheap — and leaves the real sockets to the
//! namespace tests.
//!
//! # What runs in virtual time
//!
//! Everything the harness decides (links, the control channel, sessions' timers, the
//! coordinator's clock, grant expiry) and everything meshd's data path is given a `now` for
//! (firewall verdicts and flow expiry, block-log stamps, the timer pass's schedule and its
//! once-a-second work). Not boringtun's session timers: its `Tunn` reads the monotonic clock
//! itself, so handshake retries, rekeying, the unanswered-data handshake and persistent
//! keepalives are driven by [`device`] in virtual time, and session expiry does not run (see
//! [`device`]'s docs).
#![forbid(unsafe_code)]

pub mod coordinator;
pub mod device;
pub mod fixtures;
pub mod link;
pub mod mesh;
pub mod rng;
pub mod time;
