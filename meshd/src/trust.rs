//! Signed policy on the host (issue 17): how current the agent's admin-signed view is, shared
//! between the coordinator source (which updates it from its session) and `meshd status` /
//! `--metrics-listen` (which read it as the `signed_*` counters). One coordinator source runs
//! per daemon, so one process-wide value.

use std::sync::atomic::{AtomicU64, Ordering};

/// The agent's signed view, as counters.
#[derive(Debug, Default)]
pub struct TrustCounters {
    /// 1 once an admin key set is pinned (maps are checked), else 0.
    pub pinned: AtomicU64,
    /// The newest verified signed policy version applied (0: none).
    pub policy_version: AtomicU64,
    /// Updates with refused (unsigned widening) parts so far.
    pub refused: AtomicU64,
    /// Unix time since which updates are refused (0: not stale).
    pub stale_since: AtomicU64,
}

static TRUST: TrustCounters = TrustCounters {
    pinned: AtomicU64::new(0),
    policy_version: AtomicU64::new(0),
    refused: AtomicU64::new(0),
    stale_since: AtomicU64::new(0),
};

/// The process's counters.
pub fn counters() -> &'static TrustCounters {
    &TRUST
}

impl TrustCounters {
    /// Takes the session's view (`since_unix`: the refusal start as Unix seconds).
    pub fn update(&self, s: &meshd_control::session::TrustStatus, since_unix: Option<u64>) {
        self.pinned
            .store(u64::from(s.pinned.is_some()), Ordering::Relaxed);
        self.policy_version
            .store(s.policy_version.unwrap_or(0), Ordering::Relaxed);
        self.refused.store(s.refused, Ordering::Relaxed);
        self.stale_since
            .store(since_unix.unwrap_or(0), Ordering::Relaxed);
    }

    /// `(name, value)` for the status snapshot.
    pub fn snapshot(&self) -> [(&'static str, u64); 4] {
        [
            ("signed_pinned", self.pinned.load(Ordering::Relaxed)),
            (
                "signed_policy_version",
                self.policy_version.load(Ordering::Relaxed),
            ),
            (
                "signed_updates_refused",
                self.refused.load(Ordering::Relaxed),
            ),
            (
                "signed_stale_since",
                self.stale_since.load(Ordering::Relaxed),
            ),
        ]
    }
}
