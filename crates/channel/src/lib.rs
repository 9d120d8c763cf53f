//! meshd's control channel, shared by the coordinator and the agent: the QUIC endpoint
//! configuration ([`quic`]: TLS only as transport, one bidirectional stream per connection)
//! and Noise IK over that stream ([`noise`]: the agent pins the coordinator's static key, the
//! coordinator learns the agent's WireGuard key), carrying `meshd_control::proto` frames;
//! and the SPA knock that opens the coordinator's dark control port ([`spa`]: sans-IO).

pub mod noise;
pub mod quic;
pub mod spa;
