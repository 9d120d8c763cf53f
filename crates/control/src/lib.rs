//! meshd control plane core: the coordinator's data model, IP pool, network maps and deltas,
//! join tokens, the agent↔coordinator protocol messages and framing, the admin API types,
//! and the reconciliation state machine.
//!
//! This crate is pure: no tokio, no sockets, no clock reads. Every function that needs the
//! time takes `now` ([`UnixTime`], seconds since the epoch) as a parameter. The coordinator
//! binary (`meshd-coordinator`) wires it to QUIC, the admin HTTP API and the database.
//!
//! Call order for the reconciliation core ([`state::CoordinatorState`]):
//! 1. feed events with `enrol` / `connect` / `report_endpoints` / admin operations (each takes `now`);
//! 2. `take_dirty()` → records to persist (persist them before sending anything);
//! 3. `poll_pushes()` → full maps / deltas to send to connected agents.
//!
//! The agent's side of the control channel is a state machine too ([`session::AgentSession`]:
//! inputs in, actions polled, time passed in); `meshd-agent` drives it over QUIC.
#![forbid(unsafe_code)]

pub mod api;
pub mod cmdb;
pub mod event;
pub mod flow;
pub mod map;
pub mod model;
pub mod policy;
pub mod pool;
pub mod proto;
pub mod rotation;
pub mod session;
pub mod signed;
pub mod specs;
pub mod state;
pub mod suggest;
pub mod token;
pub mod topology;

pub use event::{AuditEvent, EventKind};
pub use flow::{FlowRecord, FlowVerdict, PlaintextFlow};
pub use map::{DeltaError, MapDelta, NetworkMap, Peer};
pub use model::{Host, HostId, Labels, Token, TokenId, UnixTime};
pub use pool::{IpPool, PoolError};
pub use proto::{AgentMessage, CoordinatorMessage, ErrorCode, FrameDecoder, FrameError};
pub use session::{AgentSession, SessionParams, SessionState};
pub use specs::peer_specs;
pub use state::{CoordinatorState, Push};
pub use token::{JoinToken, JoinTokenError, TokenSecret};
