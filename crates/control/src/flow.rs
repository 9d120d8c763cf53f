//! Flow records: what each host saw, aggregated per interval, as agents report them and the
//! coordinator stores and serves them (`meshctl topology`, `policy suggest`, `export flows`,
//! `/ui`).
//!
//! An agent aggregates its tracked flows by (peer identity, direction, protocol, responder
//! port, verdict) and sends one [`crate::AgentMessage::Flows`] batch per `flow_interval`
//! (several messages of at most [`MAX_FLOWS_PER_MESSAGE`] records if it saw more). The peer is
//! named by its key, never by an address: the coordinator resolves it to a host id and labels.
//! Plaintext packets dropped in transparent mode come from outside the mesh, so they have no
//! key: they are [`PlaintextFlow`]s, keyed by source address and destination port.

use std::net::IpAddr;

use meshd_policy::Direction;
use meshd_tunnel::PublicKey;
use serde::{Deserialize, Serialize};

use crate::model::UnixTime;

/// Most records ([`FlowRecord`] plus [`PlaintextFlow`]) in one `Flows` message: keeps the frame
/// well under [`crate::proto::MAX_AGENT_FRAME`] (a record is ~250 bytes of JSON with a long
/// rule name).
pub const MAX_FLOWS_PER_MESSAGE: usize = 128;

/// How the enforcing host decided a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowVerdict {
    /// A grant admitted it (`rule` names it).
    Allowed,
    /// Denied (its packets were dropped; `rule` is absent).
    Denied,
    /// Learning mode: no grant admits it, but it passed (`rule` is absent; the rule that would
    /// be needed is derived from the two hosts' labels).
    WouldDeny,
}

impl FlowVerdict {
    /// The name on the wire and at the CLI: `allowed`, `denied`, `would_deny`.
    pub fn as_str(self) -> &'static str {
        match self {
            FlowVerdict::Allowed => "allowed",
            FlowVerdict::Denied => "denied",
            FlowVerdict::WouldDeny => "would_deny",
        }
    }
}

impl std::fmt::Display for FlowVerdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One aggregated flow between the reporting host and a peer over one interval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// The peer's identity (its WireGuard key).
    pub peer: PublicKey,
    /// Outbound: the reporting host opened the flows; inbound: the peer did.
    pub direction: Direction,
    /// IP protocol number (6 TCP, 17 UDP, 1/58 ICMP).
    pub proto: u8,
    /// The responder's port (0 for ICMP and port-less protocols).
    pub port: u16,
    /// Packets, both ways, in the interval.
    pub packets: u64,
    /// Bytes of inner IP packets, both ways, in the interval.
    pub bytes: u64,
    /// Flows (connections) opened in the interval, or 1 for a flow carried over.
    #[serde(default)]
    pub flows: u64,
    /// First packet seen in the interval (Unix seconds).
    pub first_seen: UnixTime,
    /// Last packet seen in the interval (Unix seconds).
    pub last_seen: UnixTime,
    /// The verdict.
    pub verdict: FlowVerdict,
    /// The admitting rule (`Allowed` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
}

/// Plaintext packets dropped in transparent mode from one source outside the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaintextFlow {
    /// Source address of the dropped packets.
    pub src: IpAddr,
    /// IP protocol number.
    pub proto: u8,
    /// Destination (covered) port on this host.
    pub port: u16,
    /// Packets dropped in the interval.
    pub packets: u64,
    /// First drop seen in the interval (Unix seconds; the counter's read time if unknown).
    pub first_seen: UnixTime,
    /// Last drop seen in the interval (Unix seconds).
    pub last_seen: UnixTime,
}

/// One interval's flow records: what the host aggregated ([`crate::AgentSession::queue_flows`]
/// sends it as one or more [`crate::AgentMessage::Flows`], the `overflow` count with the first)
/// and what [`crate::CoordinatorState::record_flows`] takes from one message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlowBatch {
    /// Start of the interval (Unix seconds).
    pub interval_start: UnixTime,
    /// Flows with peers.
    pub records: Vec<FlowRecord>,
    /// Transparent mode: plaintext drops from outside the mesh.
    pub plaintext: Vec<PlaintextFlow>,
    /// Flows the host could not keep this interval (its cap was reached).
    pub overflow: u64,
}
