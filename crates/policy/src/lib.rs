//! meshd's label policy, with no IO and no clock reads (`now` is a parameter).
//!
//! - [`file`]: the YAML policy file ([`Policy::parse`]; errors give line and column), with
//!   learning mode (`mode: learn`, `learn: [selectors]`) and deny rules (`deny:`, which no
//!   allow rule and no learning overrides).
//! - [`selector`]: which hosts a rule names ([`Selector`], matched against a [`HostRef`]).
//! - [`port`]: port specs (`tcp/N-M`, `udp/N`, `icmp`, `any`) and probes (`tcp/1521`).
//! - [`compile`](mod@compile): [`compile()`] a policy against an inventory into per-selector
//!   bitsets; per-host grants ([`Compiled::grants_for`]) and peers ([`Compiled::peers_of`]) are
//!   materialised on demand; host changes are incremental ([`Compiled::update_host`]).
//! - [`eval`]: direct evaluation ([`Policy::explain_hosts`]), [`run_tests`], [`diff`].
//! - [`grant`]: what one host enforces per peer ([`PeerGrants`]), as carried in network maps and
//!   checked on the packet path. Default deny: what no grant admits is dropped.
#![forbid(unsafe_code)]

pub mod compile;
pub mod eval;
pub mod file;
pub mod grant;
pub mod port;
pub mod selector;

pub use compile::{compile, compile_with, Compiled, Explanation, Learning};
pub use eval::{
    diff, run_tests, Change, ChangeKind, NoInventory, Resolve, TestOutcome, TestResult,
};
pub use file::{
    parse_rfc3339, DenyRule, Endpoint, Expect, ParseError, Policy, PolicyMode, PolicyTest, Rule,
};
pub use grant::{
    ip_proto, BlockEvent, DenyReason, Direction, Grant, PeerDenies, PeerGrants, Proto, UnixTime,
};
pub use port::{PortSpec, PortSpecError, Probe};
pub use selector::{HostRef, Match, Selector};
