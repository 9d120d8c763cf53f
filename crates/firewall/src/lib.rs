//! meshd's identity firewall: the stateful per-packet enforcement of a peer's
//! [`PeerGrants`](meshd_policy::PeerGrants), with no IO and no clock (`now` is a parameter).
//!
//! meshd's packet path calls [`Firewall::check`] egress before encrypting
//! ([`Direction::Outbound`](meshd_policy::Direction)) and ingress after decrypting and after
//! checking the inner source address belongs to the peer's key (`Inbound`). Decisions are keyed
//! on the peer's identity `P` (its key or index), never on addresses alone:
//!
//! - A packet of a tracked flow passes both ways (TCP, UDP, ICMP echo by identifier, other
//!   protocols by address pair); ICMP errors quoting a tracked flow pass too.
//! - Otherwise it opens a flow — TCP only with a bare SYN, ICMP only with an echo request — iff
//!   a grant admits it; what no grant admits is denied ([`DenyReason`](meshd_policy::DenyReason)).
//! - Flows are stamped with the grants version and grant expiry that admitted them and are
//!   re-checked on their next packet after either changes: flows that became forbidden stop.
//! - Conntrack is sharded (`parking_lot::Mutex` per shard, one foldhash per packet), bounded
//!   ([`DropReason::TableFull`]) overall and per peer ([`DropReason::PeerLimit`]: one admitted
//!   peer cannot fill the table and starve the others), with idle timeouts enforced on lookup and reclaimed by a
//!   bounded [`Firewall::sweep`].
//! - Every packet not allowed is counted ([`Stats`]); denials feed the folding, rate-limited
//!   [`BlockLog`], whose [`Denial`]s become [`BlockEvent`](meshd_policy::BlockEvent)s.
//! - Flow records: each tracked flow counts its packets and bytes in its conntrack entry,
//!   under the shard lock the check holds anyway (no other lock, no allocation).
//!   [`Firewall::collect_flows`], from a timer, hands out the counts since the previous
//!   collection as [`FlowSample`]s (with the admitting grant, or would-deny); flows that left
//!   the table in between are folded into a bounded per-shard group list
//!   ([`RETIRED_PER_SHARD`], overflow counted).
//! - Learning mode ([`PeerGrants::learn`](meshd_policy::PeerGrants)): a new flow no grant
//!   admits passes, tracked as would-deny ([`FlowAdmission::WouldDeny`], [`Stats::would_deny`]);
//!   re-checked when the grants change like any flow.
#![forbid(unsafe_code)]

mod blocklog;
pub mod build;
mod firewall;
mod packet;

pub use blocklog::{BlockLog, BlockLogConfig, Denial};
pub use firewall::{
    Collected, Config, Denied, DropReason, Firewall, FlowAdmission, FlowSample, FlowTuple, Millis,
    Stats, Timeouts, Verdict, RETIRED_PER_SHARD,
};
pub use packet::{tcp_flags, Malformed};

#[cfg(test)]
mod flow_tests;
#[cfg(test)]
mod tests;
