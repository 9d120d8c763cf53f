//! Errors for loading a config file and for private key files.

use std::fmt;
use std::io;
use std::path::PathBuf;

use ipnet::IpNet;
use meshd_tunnel::KeyError;

/// A place in a config file: the file, and the 1-based line and column when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The config file, as given to [`crate::Config::load`] or [`crate::Config::parse`].
    pub file: PathBuf,
    /// 1-based line and column (in characters), when the place is known.
    pub line_col: Option<(u32, u32)>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line_col {
            Some((line, col)) => write!(f, "{}:{line}:{col}", self.file.display()),
            None => write!(f, "{}", self.file.display()),
        }
    }
}

/// Why a config file was refused.
///
/// Every variant's `Display` starts with `FILE:LINE:COL: ` (or `FILE: ` when the place
/// is not known) and, except for [`ConfigError::Read`] and [`ConfigError::Syntax`],
/// names the field as a path like `peer[0].public_key` (see the crate docs).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The file is not valid TOML.
    #[error("{at}: TOML syntax error: {message}")]
    Syntax {
        /// Where.
        at: Location,
        /// The TOML parser's message.
        message: String,
    },
    /// Valid TOML, but a field is missing, unknown, of the wrong type, or has a value
    /// that does not parse (a bad key, address or mode).
    #[error("{at}: {field}: {message}")]
    Field {
        /// Where.
        at: Location,
        /// The field path, e.g. `peer[0].public_key`; `(top level)` for the document itself.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// Every field parses, but the config as a whole is not usable.
    #[error("{at}: {field}: {reason}")]
    Invalid {
        /// Where.
        at: Location,
        /// The field path, e.g. `interface.mtu`.
        field: String,
        /// What is wrong.
        reason: Invalid,
    },
}

impl ConfigError {
    /// Where in the file the error is, if it is about the file's content.
    pub fn location(&self) -> Option<&Location> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Syntax { at, .. }
            | ConfigError::Field { at, .. }
            | ConfigError::Invalid { at, .. } => Some(at),
        }
    }
}

/// A semantic problem found after the file parsed (see [`ConfigError::Invalid`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// The interface name is not a valid Linux interface name.
    #[error("interface name {name:?} is not valid: {why}")]
    InterfaceName {
        /// The name as written.
        name: String,
        /// Which rule it breaks.
        why: &'static str,
    },
    /// `private_key_file` is the empty string.
    #[error("must not be empty")]
    EmptyPath,
    /// No overlay address was given.
    #[error("at least one address is required")]
    NoAddress,
    /// The MTU is outside 576..=9000.
    #[error("mtu {0} is out of range 576..=9000")]
    MtuRange(u16),
    /// An IPv6 address is configured but the MTU is below IPv6's minimum of 1280.
    #[error("mtu {mtu} is below 1280, the IPv6 minimum, but address {address} is IPv6")]
    MtuTooSmallForIpv6 {
        /// The configured MTU.
        mtu: u16,
        /// The first IPv6 address.
        address: IpNet,
    },
    /// `flow_interval` is outside 1..=3600 seconds.
    #[error("flow_interval {0} is out of range 1..=3600 (seconds)")]
    FlowInterval(u64),
    /// `flow_max_records` is outside 1..=1000000.
    #[error("flow_max_records {0} is out of range 1..=1000000")]
    FlowMaxRecords(usize),
    /// A peer's name is empty.
    #[error("peer name must not be empty")]
    EmptyPeerName,
    /// Two peers have the same name.
    #[error("peer name {name:?} is already used by peer[{first}] (line {first_line})")]
    DuplicatePeerName {
        /// The name.
        name: String,
        /// Index of the first peer with that name.
        first: usize,
        /// Line of the first use.
        first_line: u32,
    },
    /// Two peers have the same public key.
    #[error("public key is already used by peer[{first}] (line {first_line})")]
    DuplicatePublicKey {
        /// Index of the first peer with that key.
        first: usize,
        /// Line of the first use.
        first_line: u32,
    },
    /// A peer has this host's own public key.
    #[error("this is the host's own public key; a host must not list itself as a peer")]
    OwnPublicKey,
    /// The same prefix appears twice in `allowed_ips` (in one peer or two).
    #[error(
        "{net} is already listed at {first_field} (line {first_line}); \
         a prefix can route to only one peer"
    )]
    DuplicateAllowedIp {
        /// The prefix (host bits cleared).
        net: IpNet,
        /// Field path of the first occurrence.
        first_field: String,
        /// Line of the first occurrence.
        first_line: u32,
    },
    /// `persistent_keepalive = 0`.
    #[error("persistent_keepalive must be 1..=65535 seconds; omit it to disable keepalives")]
    KeepaliveZero,
    /// The endpoint is not `ip:port`, `[ipv6]:port` or `hostname:port`.
    #[error("endpoint {value:?} is not \"ip:port\", \"[ipv6]:port\" or \"hostname:port\": {why}")]
    Endpoint {
        /// The endpoint as written.
        value: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// Why a private key file could not be loaded or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file is missing, unreadable or not a regular file.
    #[error("cannot read private key file {}: {source}", path.display())]
    Read {
        /// The key file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// Group or others may read or write the file.
    #[error(
        "private key file {} is accessible by group or others (mode {mode:04o}); \
         run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file does not hold a base64 32-byte key.
    #[error("private key file {}: {source}", path.display())]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// Why the content was refused.
        source: KeyError,
    },
    /// The key file's parent directory could not be created.
    #[error("cannot create directory {} for the private key: {source}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The key file could not be written (including: it already exists).
    #[error("cannot write private key file {}: {source}", path.display())]
    Write {
        /// The key file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
}
