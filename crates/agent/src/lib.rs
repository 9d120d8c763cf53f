//! The agent's side of the control channel: enrol with a join token, then keep one long-lived
//! session that follows the network map.
//!
//! The session's protocol logic is the sans-IO state machine
//! [`meshd_control::session::AgentSession`]; this crate is its thin tokio driver over QUIC +
//! Noise ([`meshd_channel`]): it opens the transport when asked, feeds frames, timers and
//! local changes in, and carries the session's actions out.
//!
//! ```no_run
//! # async fn f(token: meshd_control::JoinToken, key: meshd_tunnel::PrivateKey) -> Result<(), Box<dyn std::error::Error>> {
//! use meshd_agent::{enrol, spawn_session, SessionConfig};
//! use meshd_control::proto::EndpointReport;
//! let ep = EndpointReport { addrs: vec![], listen_port: Some(51820), transparent: false };
//! let e = enrol(&token, "db1", &key, ep.clone()).await?;          // persist e.coordinator + key
//! let s = spawn_session(SessionConfig::new(e.coordinator, e.coordinator_key, key, ep));
//! let mut maps = s.map();
//! while maps.changed().await.is_ok() { /* program tunnels from maps.borrow() */ }
//! # Ok(()) }
//! ```

mod driver;
mod transport;

use std::time::Duration;

use rand_core::{OsRng, RngCore as _};

pub use driver::{spawn_session, KeyStore, SessionConfig, SessionHandle};
pub use meshd_channel::spa::KnockAs;
pub use meshd_control::session::{
    FlowBatch, SessionState, BLOCK_BATCHES_QUEUED, FLOW_INTERVALS_QUEUED, MAX_BACKOFF,
};
pub use transport::{
    client_endpoint, client_endpoint_marked, enrol, enrol_via, ClientEndpoint, ClientError,
    Enrolment,
};

/// Backoff before reconnect attempt `attempt` (1-based): 100 ms doubling, capped at
/// [`MAX_BACKOFF`], then a random 50–100 % of that (the session's schedule,
/// [`meshd_control::session::backoff`], with fresh randomness).
pub fn backoff(attempt: u32) -> Duration {
    meshd_control::session::backoff(attempt, OsRng.next_u32())
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshd_control::session::BASE_BACKOFF;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        for a in 1..40 {
            let d = backoff(a);
            assert!(d <= MAX_BACKOFF, "{a}: {d:?}");
            assert!(d >= BASE_BACKOFF / 2);
        }
        assert!(backoff(20) >= MAX_BACKOFF / 2);
        assert!(backoff(1) <= BASE_BACKOFF);
    }
}
