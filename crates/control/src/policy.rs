//! The label policy as the coordinator holds it: applied versions (the YAML as written), the
//! view of a host the compiler sees, and why an apply is refused. Which hosts peer with which,
//! and with which grants, is [`meshd_policy::Compiled`] (kept by [`crate::CoordinatorState`]):
//! a host's map holds exactly [`meshd_policy::Compiled::peers_of`], default deny.

use meshd_policy::{HostRef, ParseError, TestResult};
use serde::{Deserialize, Serialize};

use crate::model::{Host, UnixTime};

/// One applied policy version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecord {
    /// Version, from 1, strictly increasing.
    pub version: u64,
    /// The file as applied.
    pub yaml: String,
    /// When it was applied.
    pub applied_at: UnixTime,
    /// How it came (`apply`, `rollback to 3`).
    pub comment: String,
}

/// Why a policy was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The file does not parse.
    #[error("policy does not parse: {0}")]
    Parse(#[from] ParseError),
    /// Some of the file's tests fail (or name hosts not in the inventory).
    #[error("{} of the policy's tests failed", .0.iter().filter(|t| !t.passed()).count())]
    TestsFailed(Vec<TestResult>),
    /// Rollback to a version that was never applied.
    #[error("no policy version {0}")]
    NoSuchVersion(u64),
}

/// Whether a host takes part in the policy (not removed, not quarantined).
pub fn is_live(h: &Host) -> bool {
    !h.removed && !h.quarantined
}

/// The policy's view of a host.
pub fn host_ref(h: &Host) -> HostRef {
    HostRef {
        id: h.id.0,
        name: h.name.clone(),
        labels: h.labels.clone(),
    }
}
