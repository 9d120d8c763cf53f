//! Why a host-networking operation failed: one enum for the crate, nested by cause.
//!
//! Each error's `Display` says what was being done (`adding route to 198.18.0.2 …`); the OS,
//! netlink or nft cause is its [`std::error::Error::source`], so `{:#}` of an
//! `anyhow::Error` built from one prints the whole chain, as the daemon logs it.

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::process::ExitStatus;

use crate::Proto;

/// Why a [`crate::HostNet`] operation, [`crate::cleanup_stale`] or [`crate::remove`] failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The [`crate::Config`] would touch state that is not ours or cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The routes asked for contradict each other.
    #[error(transparent)]
    Routes(#[from] RouteError),
    /// A covered port range is empty.
    #[error("covered {proto} ports")]
    Ports {
        /// Which set.
        proto: Proto,
        /// The bad range.
        #[source]
        source: RangeError,
    },
    /// The rtnetlink socket could not be opened.
    #[error("opening rtnetlink")]
    Connect(#[source] io::Error),
    /// A netlink request failed.
    #[error("{op}")]
    Netlink {
        /// What was asked of the kernel.
        op: NetlinkOp,
        /// What the kernel (or the netlink library) said.
        #[source]
        source: rtnetlink::Error,
    },
    /// Reconciling what an earlier instance left failed (at start).
    #[error("reconciling routes left by an earlier run")]
    Reconcile(#[source] Box<Error>),
    /// Running `nft` failed.
    #[error(transparent)]
    Nft(#[from] NftError),
    /// This instance's nft table no longer exists.
    #[error("nft table inet {table} is gone (deleted by someone else?)")]
    TableGone {
        /// The table's name.
        table: String,
    },
}

/// Why a [`crate::Config`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Linux interface names have 1 to 15 bytes.
    #[error("interface name {0:?} must have 1 to 15 bytes")]
    InterfaceName(String),
    /// No interface has index 0.
    #[error("interface index must not be 0")]
    InterfaceIndex,
    /// A zero mark would match unmarked traffic.
    #[error("fwmark must not be 0 (unmarked traffic would bypass the TUN too)")]
    Fwmark,
    /// 0 (unspec), 253 (default), 254 (main) and 255 (local) belong to the kernel.
    #[error("table {0} is a kernel table; use a table of its own")]
    KernelTable(u32),
    /// The rules must come before the main table's (32766) and after priority 0.
    #[error("rule priority {0} must be between 1 and 32765 (before the main table)")]
    RulePriority(u32),
    /// The input guard must accept the bound tunnel port.
    #[error("listen_port must be the bound tunnel port, not 0")]
    ListenPort,
}

/// Why the routes given to [`crate::HostNet::set_routes`] were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The preferred source is IPv4 for an IPv6 destination or the other way round.
    #[error("route to {dst}: source {src} is of the other address family")]
    FamilyMismatch {
        /// The destination.
        dst: IpAddr,
        /// Its source.
        src: IpAddr,
    },
    /// The same destination twice with different sources.
    #[error("route to {0} given twice with different sources")]
    Conflict(IpAddr),
}

/// A port range whose start is above its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("port range {lo}-{hi} is empty (start above end)")]
pub struct RangeError {
    /// Start of the range.
    pub lo: u16,
    /// End of the range.
    pub hi: u16,
}

/// What a netlink request was for (names the failing step in [`Error::Netlink`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetlinkOp {
    /// Dumping one family's rules.
    DumpRules,
    /// Dumping one family's routes.
    DumpRoutes,
    /// Deleting a stale rule pointing at our table (start, stop, `meshd down`).
    DeleteStaleRule,
    /// Deleting a stale route in our table (start, stop, `meshd down`).
    DeleteStaleRoute,
    /// Deleting the route into the TUN to a destination no longer wanted.
    DeleteRoute(IpAddr),
    /// Adding the `not fwmark MARK lookup TABLE` rule.
    AddRule {
        /// IPv6 (else IPv4).
        v6: bool,
        /// The mark.
        fwmark: u32,
        /// The table.
        table: u32,
        /// The rule's priority.
        priority: u32,
    },
    /// Adding a host route into the TUN.
    AddRoute {
        /// The destination.
        dst: IpAddr,
        /// The preferred source.
        src: Option<IpAddr>,
        /// The table.
        table: u32,
    },
    /// Adding the `unreachable` guard route.
    AddGuard(IpAddr),
    /// Deleting the `unreachable` guard route.
    DeleteGuard(IpAddr),
}

impl fmt::Display for NetlinkOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetlinkOp::DumpRules => f.write_str("dumping rules"),
            NetlinkOp::DumpRoutes => f.write_str("dumping routes"),
            NetlinkOp::DeleteStaleRule => f.write_str("deleting a stale rule"),
            NetlinkOp::DeleteStaleRoute => f.write_str("deleting a route"),
            NetlinkOp::DeleteRoute(dst) => write!(f, "deleting route to {dst}"),
            NetlinkOp::AddRule {
                v6,
                fwmark,
                table,
                priority,
            } => write!(
                f,
                "adding IPv{} rule 'not fwmark {fwmark:#x} lookup {table}' at priority {priority}",
                if *v6 { 6 } else { 4 },
            ),
            NetlinkOp::AddRoute { dst, src, table } => match src {
                Some(src) => write!(f, "adding route to {dst} (src {src}) in table {table}"),
                None => write!(f, "adding route to {dst} (src none) in table {table}"),
            },
            NetlinkOp::AddGuard(dst) => write!(f, "adding the unreachable guard route to {dst}"),
            NetlinkOp::DeleteGuard(dst) => write!(f, "deleting the guard route to {dst}"),
        }
    }
}

/// What an `nft` run was for (names the failing step in [`NftError`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NftOp {
    /// (Re)creating the table at start.
    CreateTable,
    /// Adding addresses to the protected sets.
    AddProtected,
    /// Removing addresses from the protected sets.
    RemoveProtected,
    /// Replacing the covered port sets.
    SetCovered,
    /// Deleting the table (stop, `meshd down`).
    DeleteTable,
    /// `nft -j list table`.
    ListTable,
    /// `nft -j list tables` (does the table exist?).
    ListTables,
}

impl fmt::Display for NftOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NftOp::CreateTable => "creating the input and output guard table",
            NftOp::AddProtected => "adding protected addresses",
            NftOp::RemoveProtected => "removing protected addresses",
            NftOp::SetCovered => "replacing covered ports",
            NftOp::DeleteTable => "deleting the table",
            NftOp::ListTable => "listing",
            NftOp::ListTables => "listing tables",
        })
    }
}

impl NftOp {
    /// The nft command run for this step (after `nft -j`).
    pub fn command(self) -> &'static str {
        match self {
            NftOp::ListTable => "list table",
            NftOp::ListTables => "list tables",
            _ => "-f -",
        }
    }
}

/// Why running `nft` failed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// `nft` could not be started.
    #[error("nft {op}: starting nft (is nftables installed?)")]
    Spawn {
        /// What the run was for.
        op: NftOp,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// Feeding the ruleset to `nft`'s stdin failed (and `nft` did not fail itself).
    #[error("nft {op}: writing the ruleset")]
    Stdin {
        /// What the run was for.
        op: NftOp,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// Waiting for `nft` or reading its output failed.
    #[error("nft {op}: waiting for nft")]
    Wait {
        /// What the run was for.
        op: NftOp,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// `nft` exited unsuccessfully; `stderr` is what it printed (trimmed).
    #[error("nft {op} failed ({status}): {stderr}")]
    Failed {
        /// What the run was for.
        op: NftOp,
        /// Its exit status.
        status: ExitStatus,
        /// Its standard error.
        stderr: String,
    },
    /// `nft -j` printed something that is not JSON.
    #[error("parsing nft -j {} output", .op.command())]
    Json {
        /// What the run was for.
        op: NftOp,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// `nft -j` printed JSON without the top-level `nftables` array.
    #[error("nft listing has no \"nftables\" array")]
    Listing,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `{:#}` of an `anyhow::Error` prints: the error and its sources, `: `-separated.
    fn chain(e: &dyn std::error::Error) -> String {
        crate::error_chain(e)
    }

    #[test]
    fn messages_name_the_step_and_keep_the_cause() {
        let dst: IpAddr = "198.18.0.2".parse().unwrap();
        let src: IpAddr = "198.18.0.1".parse().unwrap();
        for (op, want) in [
            (NetlinkOp::DumpRules, "dumping rules"),
            (NetlinkOp::DumpRoutes, "dumping routes"),
            (NetlinkOp::DeleteStaleRule, "deleting a stale rule"),
            (NetlinkOp::DeleteStaleRoute, "deleting a route"),
            (NetlinkOp::DeleteRoute(dst), "deleting route to 198.18.0.2"),
            (
                NetlinkOp::AddRule {
                    v6: true,
                    fwmark: 0x4d5348,
                    table: 7,
                    priority: 5200,
                },
                "adding IPv6 rule 'not fwmark 0x4d5348 lookup 7' at priority 5200",
            ),
            (
                NetlinkOp::AddRoute {
                    dst,
                    src: Some(src),
                    table: 7,
                },
                "adding route to 198.18.0.2 (src 198.18.0.1) in table 7",
            ),
            (
                NetlinkOp::AddRoute {
                    dst,
                    src: None,
                    table: 7,
                },
                "adding route to 198.18.0.2 (src none) in table 7",
            ),
            (
                NetlinkOp::AddGuard(dst),
                "adding the unreachable guard route to 198.18.0.2",
            ),
            (
                NetlinkOp::DeleteGuard(dst),
                "deleting the guard route to 198.18.0.2",
            ),
        ] {
            assert_eq!(op.to_string(), want);
        }

        let spawn = Error::from(NftError::Spawn {
            op: NftOp::SetCovered,
            source: io::Error::from(io::ErrorKind::NotFound),
        });
        assert_eq!(
            chain(&spawn),
            format!(
                "nft replacing covered ports: starting nft (is nftables installed?): {}",
                io::Error::from(io::ErrorKind::NotFound)
            )
        );
        let json = serde_json::from_slice::<serde_json::Value>(b"{").unwrap_err();
        let e = NftError::Json {
            op: NftOp::ListTable,
            source: json,
        };
        assert!(
            chain(&e).starts_with("parsing nft -j list table output: "),
            "{}",
            chain(&e)
        );
        let reconcile = Error::Reconcile(Box::new(Error::Connect(io::Error::other("no"))));
        assert_eq!(
            chain(&reconcile),
            "reconciling routes left by an earlier run: opening rtnetlink: no"
        );
        let ports = Error::Ports {
            proto: Proto::Udp,
            source: RangeError { lo: 9, hi: 3 },
        };
        assert_eq!(
            chain(&ports),
            "covered udp ports: port range 9-3 is empty (start above end)"
        );
        assert_eq!(
            Error::from(ConfigError::KernelTable(254)).to_string(),
            "table 254 is a kernel table; use a table of its own"
        );
    }

    #[test]
    fn a_failed_nft_run_carries_its_status_and_stderr() {
        use std::os::unix::process::ExitStatusExt as _;
        let e = NftError::Failed {
            op: NftOp::CreateTable,
            // A wait status: exit code 1 in the high byte.
            status: ExitStatus::from_raw(1 << 8),
            stderr: "Error: Could not process rule: Operation not permitted".into(),
        };
        assert_eq!(
            e.to_string(),
            "nft creating the input and output guard table failed (exit status: 1): \
             Error: Could not process rule: Operation not permitted"
        );
    }
}
