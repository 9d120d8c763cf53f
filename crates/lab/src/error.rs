//! Errors returned by the lab.

use std::net::Ipv4Addr;
use std::process::ExitStatus;
use std::time::Duration;

/// Everything that can go wrong while building or driving a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A program could not be started, or its files could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What the lab was doing (usually the command line).
        what: String,
        /// The underlying OS error.
        #[source]
        source: std::io::Error,
    },
    /// A command ran but exited unsuccessfully.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    CommandFailed {
        /// The command line, for the message.
        cmd: String,
        /// How it exited.
        status: ExitStatus,
        /// Its standard error, trimmed.
        stderr: String,
    },
    /// A command or a readiness check did not finish in time (the command was killed).
    #[error("`{what}` did not finish within {after:?}")]
    Timeout {
        /// The command line or the condition waited for.
        what: String,
        /// The time limit that was exceeded.
        after: Duration,
    },
    /// The underlay /24 has room for 254 hosts only.
    #[error("a lab holds at most {max} hosts, {requested} requested")]
    TooManyHosts {
        /// The number of hosts asked for.
        requested: usize,
        /// The limit.
        max: usize,
    },
    /// Underlay addresses must stay inside 198.18.0.0/15 (RFC 2544 benchmarking range).
    #[error("{0} is outside the lab underlay range 198.18.0.0/15")]
    AddressOutsideUnderlay(Ipv4Addr),
    /// A capture file could not be parsed.
    #[error("capture: {0}")]
    Pcap(#[from] crate::pcap::PcapError),
    /// No host with that index.
    #[error("the lab has no host {index} (it has {count})")]
    NoSuchHost {
        /// The index asked for.
        index: usize,
        /// How many hosts there are.
        count: usize,
    },
}

impl LabError {
    /// Wraps an I/O error with a description of what was being attempted.
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        LabError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Result alias for lab operations.
pub type Result<T, E = LabError> = std::result::Result<T, E>;
