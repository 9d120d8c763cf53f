//! meshd's configuration file, as read by `meshd up --config FILE`.
//!
//! This crate parses and validates the file into a typed [`Config`]; it does no
//! networking and reads no file but the ones it is asked to (the config file in
//! [`Config::load`], key files in [`load_private_key`]).
//!
//! # The file format
//!
//! The file is [TOML](https://toml.io). A complete example:
//!
//! ```toml
//! [interface]
//! name = "mesh0"
//! private_key_file = "/etc/meshd/host.key"
//! listen_port = 51820
//! address = ["100.64.0.1/10", "fd7a:6d65:7368::1/48"]
//! mtu = 1420
//! mode = "overlay"
//! fwmark = 0x4d5348
//! routed_prefixes = ["10.1.0.0/16"]
//! uapi_dir = "/var/run/wireguard"
//! log_format = "text"
//! metrics_listen = "127.0.0.1:9586"
//!
//! [[peer]]
//! name = "db1"
//! public_key = "AO2fJUVWS3wyUg1ZUSgCU/qk5PT5sEVaPLMGGNlGhmA="
//! endpoint = "198.18.0.2:51820"
//! allowed_ips = ["100.64.0.2/32"]
//! persistent_keepalive = 25
//! ```
//!
//! ## `[interface]` (required, exactly one)
//!
//! | key | | meaning |
//! |---|---|---|
//! | `name` | required | Name of the TUN device: 1 to 15 bytes, no `/`, `:` or whitespace, not `.` or `..` (Linux's rules). |
//! | `private_key_file` | required | File holding this host's private key in base64 (`wg genkey` format), mode 0600. A relative path is relative to the directory of the config file. |
//! | `listen_port` | default `51820` | UDP port to listen on; `0` lets the OS pick one. |
//! | `address` | required | This host's overlay address(es) with prefix length, e.g. `"100.64.0.1/10"`: one string, or an array mixing IPv4 and IPv6. At least one. |
//! | `mtu` | default `1420` | TUN MTU, `576..=9000`; at least `1280` if any address is IPv6. |
//! | `mode` | default `"overlay"` | `"overlay"`: peers are reached by the overlay addresses above. `"transparent"`: meshd encrypts traffic to peers' ordinary addresses. |
//! | `fwmark` | optional | Firewall mark (u32, hex allowed: `0x4d5348`) set on meshd's UDP packets; `0` means none, as in `wg`. |
//! | `routed_prefixes` | default `[]` | Inner destinations beyond this host's own addresses that peers may send to through the tunnel (this host routes them on, e.g. a subnet behind it): one prefix string or an array. Without it, a decrypted packet is written to the TUN only if its destination is one of `address` (and, in transparent mode, this host's own underlay addresses); anything else (another host, a broadcast or multicast address) is dropped and counted as `inner_destination`. Peers still need the prefix in their `allowed_ips` for this host. |
//! | `uapi_dir` | default `"/var/run/wireguard"` | Directory of the WireGuard userspace API socket `<uapi_dir>/<name>.sock`, which `wg show`, `wg showconf` and `wg set` use (the same socket wireguard-go and boringtun serve). It is shared by every network namespace of the machine, so two meshd with the same interface name in different namespaces need different directories (`wg` itself only looks in `/var/run/wireguard`). A relative path is relative to the directory of the config file. Created 0755 if missing. |
//! | `log_format` | default `"text"` | `"text"` or `"json"` (one object per line, fields in docs/LOGGING.md); `meshd --log-format` wins. Read at start, not on reload. |
//! | `flow_records` | default `true` | Count packets and bytes per tracked flow and aggregate them into flow records every `flow_interval` (`meshd status` shows the latest interval's counts; coordinator mode reports them). `false` turns counting and collection off. Read at start. |
//! | `flow_interval` | default `10` | Seconds between flow-record collections, `1..=3600`. |
//! | `flow_max_records` | default `4096` | Most flow records per interval, `1..=1000000`; flows beyond it are only counted (`overflow`). |
//! | `metrics_listen` | optional (off) | Address (`"ip:port"`) of a plain-HTTP Prometheus endpoint, `GET /metrics` (per-peer bytes, handshakes, drops and denials by reason, flows). No secrets, no authentication: bind it to loopback or a management network. `meshd up --metrics-listen` wins. Read at start, not on reload. |
//!
//! ## `[[peer]]` (any number, including none)
//!
//! Note the double brackets: each `[[peer]]` starts one more peer.
//!
//! | key | | meaning |
//! |---|---|---|
//! | `name` | required | Label for logs and commands; unique among peers, not empty. |
//! | `public_key` | required | The peer's public key in base64; unique among peers and not this host's own key. |
//! | `endpoint` | optional | Where to send the first handshake: `"ip:port"`, `"[ipv6]:port"` or `"hostname:port"`. A hostname is resolved when it is used ([`PeerConfig::resolve_endpoint`]), not when the file is read. Without it meshd waits for the peer to connect. |
//! | `allowed_ips` | default `[]` | Prefixes routed to this peer and accepted from it: one string or an array. The same prefix (after clearing host bits) may not appear twice in the file; different overlapping prefixes are fine (longest prefix wins). |
//! | `persistent_keepalive` | optional | Send a keepalive after this many idle seconds, `1..=65535` (e.g. `25` behind NAT). |
//! | `preshared_key` | optional | Extra symmetric key in base64 (`wg genpsk`), same on both sides. |
//!
//! Any other key, anywhere, is an error, so a typo never silently does nothing. In
//! particular a top-level `rules` key is refused until this version of meshd enforces rules.
//!
//! # Error messages
//!
//! Errors ([`ConfigError`]) read `FILE:LINE:COLUMN: FIELD: WHAT`, for example
//!
//! ```text
//! /etc/meshd/meshd.toml:9:14: peer[0].public_key: key must decode to 32 bytes, got 3
//! ```
//!
//! LINE and COLUMN are 1-based (columns count characters) and point at the offending
//! value, at the key for an unknown key, and at the table for a missing key. FIELD is the
//! path to it: table keys joined by `.`, with a zero-based index in brackets for array
//! elements and for the n-th `[[peer]]`, as in `interface.mtu`, `peer[2].allowed_ips[0]`,
//! `interface.nmae` (an unknown key), `peer[0]` (a key missing from that peer). Errors
//! about the document itself use `(top level)`. TOML syntax errors read
//! `FILE:LINE:COLUMN: TOML syntax error: WHAT`.
//! [`Config::check_own_key`] runs without the file text and so names file and field only.

#![forbid(unsafe_code)]

mod error;
pub mod fsutil;
mod keyfile;
mod log_format;
pub mod static_peers;

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs as _};
use std::ops::Range;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use meshd_tunnel::PublicKey;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

pub use error::{ConfigError, Invalid, KeyFileError, Location};
pub use keyfile::{load_private_key, write_private_key};
pub use log_format::{LogFormat, UnknownLogFormat};
pub use meshd_tunnel::{KeyError, PrivateKey};
pub use static_peers::{peer_specs, static_grants, StaticPeers, StaticPolicyError, SELF_NAME};

/// Default UDP listen port (WireGuard's).
pub const DEFAULT_LISTEN_PORT: u16 = 51820;
/// Default TUN MTU: 1500 minus the WireGuard-over-IPv6 overhead.
pub const DEFAULT_MTU: u16 = 1420;
/// Allowed TUN MTUs.
pub const MTU_RANGE: std::ops::RangeInclusive<u16> = 576..=9000;
/// Smallest MTU IPv6 allows; required when any overlay address is IPv6.
pub const MIN_IPV6_MTU: u16 = 1280;
/// Default directory of the WireGuard userspace API sockets (where `wg` looks).
pub const DEFAULT_UAPI_DIR: &str = "/var/run/wireguard";
/// Allowed `flow_interval`s, in seconds.
pub const FLOW_INTERVAL_RANGE: std::ops::RangeInclusive<u64> = 1..=3600;
/// Allowed `flow_max_records`.
pub const FLOW_MAX_RECORDS_RANGE: std::ops::RangeInclusive<usize> = 1..=1_000_000;

/// Flow records: whether, how often and how many (`flow_records`, `flow_interval`,
/// `flow_max_records`; coordinator mode takes them from `meshd up` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowSettings {
    /// Count and collect at all.
    pub enabled: bool,
    /// Time between collections.
    pub interval: std::time::Duration,
    /// Most records per interval; more are counted as overflow.
    pub max_records: usize,
}

impl Default for FlowSettings {
    fn default() -> Self {
        FlowSettings {
            enabled: true,
            interval: std::time::Duration::from_secs(10),
            max_records: 4096,
        }
    }
}

/// A parsed and validated config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The `[interface]` table.
    pub interface: Interface,
    /// The `[[peer]]` tables, in file order.
    pub peers: Vec<PeerConfig>,
    /// The file it came from (as given; used in messages).
    pub path: PathBuf,
}

/// This host's side: the `[interface]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// TUN device name.
    pub name: String,
    /// Private key file, already resolved against the config file's directory.
    pub private_key_file: PathBuf,
    /// UDP port; 0 = any.
    pub listen_port: u16,
    /// Overlay addresses with prefix length (at least one).
    pub addresses: Vec<IpNet>,
    /// TUN MTU.
    pub mtu: u16,
    /// How traffic reaches the mesh.
    pub mode: Mode,
    /// Firewall mark for meshd's UDP packets (`None` when absent or 0).
    pub fwmark: Option<u32>,
    /// This host's labels (static mode: what policy selectors match).
    pub labels: BTreeMap<String, String>,
    /// Static mode: a policy file (the YAML rule syntax of `meshctl policy`); without one,
    /// every listed peer is allowed both ways, as in WireGuard.
    pub policy_file: Option<PathBuf>,
    /// Static mode: the same YAML rules inline (a TOML multi-line string); used when
    /// `policy_file` is absent.
    pub policy: Option<String>,
    /// Inner destinations peers may reach through this host besides its own addresses
    /// (host bits cleared; empty: only this host's own addresses).
    pub routed_prefixes: Vec<IpNet>,
    /// Directory of the WireGuard userspace API socket (`<uapi_dir>/<name>.sock`), already
    /// resolved against the config file's directory.
    pub uapi_dir: PathBuf,
    /// `log_format`, when the file sets it (`meshd --log-format` wins).
    pub log_format: Option<LogFormat>,
    /// `flow_records`, `flow_interval`, `flow_max_records`.
    pub flows: FlowSettings,
    /// Address of the Prometheus endpoint (`GET /metrics`); `None`: off.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// How traffic reaches the mesh (`interface.mode`; `meshd status` shows it as the same
/// lowercase word).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Peers are addressed by their overlay addresses (the default).
    #[default]
    Overlay,
    /// Traffic to peers' ordinary addresses is encrypted transparently.
    Transparent,
}

impl Mode {
    /// The word used in the config file and in `meshd status`: `overlay` or `transparent`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Overlay => "overlay",
            Mode::Transparent => "transparent",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `[[peer]]` table.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// Unique label.
    pub name: String,
    /// The peer's identity.
    pub public_key: PublicKey,
    /// Endpoint as written (`ip:port`, `[v6]:port` or `host:port`); see [`Self::resolve_endpoint`].
    pub endpoint: Option<String>,
    /// Prefixes routed to and accepted from this peer, as written.
    pub allowed_ips: Vec<IpNet>,
    /// Keepalive interval in seconds (1..=65535).
    pub persistent_keepalive: Option<u16>,
    /// Optional preshared key (never printed by `Debug`).
    pub preshared_key: Option<[u8; 32]>,
    /// The peer's labels (static mode policy).
    pub labels: BTreeMap<String, String>,
}

impl fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerConfig")
            .field("name", &self.name)
            .field("public_key", &self.public_key)
            .field("endpoint", &self.endpoint)
            .field("allowed_ips", &self.allowed_ips)
            .field("persistent_keepalive", &self.persistent_keepalive)
            .field("preshared_key", &self.preshared_key.map(|_| "<redacted>"))
            .finish()
    }
}

impl PeerConfig {
    /// Resolves the endpoint now (DNS for a hostname); `None` if the peer has no endpoint.
    pub fn resolve_endpoint(&self) -> Option<io::Result<SocketAddr>> {
        self.endpoint.as_deref().map(resolve_endpoint)
    }
}

/// Resolves an endpoint string (`ip:port`, `[v6]:port` or `host:port`) to its first address.
pub fn resolve_endpoint(endpoint: &str) -> io::Result<SocketAddr> {
    endpoint.to_socket_addrs()?.next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{endpoint}: name resolved to no addresses"),
        )
    })
}

impl Config {
    /// Reads and parses the config file at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses config text; `path` names the file in messages and anchors a relative
    /// `private_key_file`.
    pub fn parse(text: &str, path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let ctx = Ctx {
            text,
            file: path.as_ref(),
        };
        // Parse once as plain TOML so that syntax errors are told apart from field errors.
        if let Err(e) = toml::from_str::<toml::Table>(text) {
            return Err(ConfigError::Syntax {
                at: ctx.at_opt(e.span()),
                message: e.message().trim().to_owned(),
            });
        }
        let raw: RawConfig = serde_path_to_error::deserialize(toml::Deserializer::new(text))
            .map_err(|e| {
                let field = field_path(e.path());
                let inner = e.into_inner();
                let mut message = inner.message().trim().to_owned();
                if field == "peer" && message.contains("expected a sequence") {
                    message.push_str(" (write each peer as [[peer]], with double brackets)");
                }
                ConfigError::Field {
                    at: ctx.at_opt(inner.span()),
                    field,
                    message,
                }
            })?;
        ctx.build(raw)
    }

    /// Checks that no peer has `own` (this host's public key); call once the private
    /// key is loaded. The error names file and field but no line.
    pub fn check_own_key(&self, own: &PublicKey) -> Result<(), ConfigError> {
        match self.peers.iter().position(|p| p.public_key == *own) {
            Some(i) => Err(ConfigError::Invalid {
                at: Location {
                    file: self.path.clone(),
                    line_col: None,
                },
                field: format!("peer[{i}].public_key"),
                reason: Invalid::OwnPublicKey,
            }),
            None => Ok(()),
        }
    }

    /// Loads `interface.private_key_file` (see [`load_private_key`]).
    pub fn load_private_key(&self) -> Result<PrivateKey, KeyFileError> {
        load_private_key(&self.interface.private_key_file)
    }
}

// ---------------------------------------------------------------------------------------
// Raw, span-carrying mirror of the file. Converted and validated by `Ctx::build`.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interface: RawInterface,
    #[serde(default)]
    peer: Vec<RawPeer>,
    // ==== EXTENSION POINT: top-level `rules` ====
    // When meshd gains policy rules, add the field here, e.g.
    //     #[serde(default)]
    //     rules: Vec<Spanned<RawRule>>,
    // validate it in `Ctx::build` and expose it as `pub rules` on `Config`, then update the
    // format table in the crate docs. Until then `deny_unknown_fields` refuses `rules`, so
    // nobody believes an ignored rule is enforced.
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInterface {
    name: Spanned<String>,
    private_key_file: Spanned<PathBuf>,
    listen_port: Option<u16>,
    address: Spanned<NetList>,
    mtu: Option<Spanned<u16>>,
    #[serde(default)]
    mode: Mode,
    fwmark: Option<u32>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    policy_file: Option<PathBuf>,
    policy: Option<String>,
    routed_prefixes: Option<Spanned<NetList>>,
    uapi_dir: Option<Spanned<PathBuf>>,
    log_format: Option<LogFormat>,
    flow_records: Option<bool>,
    flow_interval: Option<Spanned<u64>>,
    flow_max_records: Option<Spanned<usize>>,
    metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: Spanned<String>,
    public_key: Spanned<PublicKey>,
    endpoint: Option<Spanned<String>>,
    allowed_ips: Option<Spanned<NetList>>,
    persistent_keepalive: Option<Spanned<u16>>,
    preshared_key: Option<Key32>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// A 32-byte base64 key that is not a public key (the preshared key).
struct Key32([u8; 32]);

impl<'de> Deserialize<'de> for Key32 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Same encoding and checks as a public key.
        PublicKey::deserialize(d).map(|k| Key32(k.0))
    }
}

/// One prefix string, or an array of them; array elements keep their own spans.
///
/// The strings are parsed in [`Ctx::nets`], not here: an error raised inside an array
/// element's `Deserialize` would carry the whole array's span.
struct NetList(Vec<(String, Option<Range<usize>>)>);

/// Parses a prefix such as `100.64.0.1/10`, with a hint when the prefix length is missing.
fn parse_net(s: &str) -> Result<IpNet, String> {
    s.parse().map_err(|e| {
        if s.parse::<std::net::IpAddr>().is_ok() {
            format!("{s:?} needs a prefix length, e.g. \"{s}/32\" or \"{s}/128\"")
        } else {
            format!("{s:?}: {e}")
        }
    })
}

impl<'de> Deserialize<'de> for NetList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = NetList;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a prefix like \"100.64.0.1/10\" or an array of them")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<NetList, E> {
                Ok(NetList(vec![(s.to_owned(), None)]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<NetList, A::Error> {
                let mut out = Vec::new();
                while let Some(n) = seq.next_element::<Spanned<String>>()? {
                    let span = n.span();
                    out.push((n.into_inner(), Some(span)));
                }
                Ok(NetList(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// Renders a serde path as `peer[0].public_key`, hiding `toml::Spanned`'s internal fields.
fn field_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for seg in path.iter() {
        match seg {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if key.starts_with("$__serde_spanned_private") {
                    continue;
                }
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
            }
        }
    }
    if out.is_empty() {
        out.push_str("(top level)");
    }
    out
}

/// 1-based line and column (in characters) of byte `offset` in `text`, saturating at `u32::MAX`.
fn line_col(text: &str, offset: usize) -> (u32, u32) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let col = text
        .get(line_start..offset)
        .map_or(offset - line_start, |s| s.chars().count());
    let sat = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    (sat(line), sat(col + 1))
}

/// Linux's `dev_valid_name` rules, with the reason for the first one broken.
fn check_interface_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("must not be empty")
    } else if name.len() > 15 {
        Err("longer than 15 bytes")
    } else if name == "." || name == ".." {
        Err("\".\" and \"..\" are reserved")
    } else if name.contains(['/', ':']) {
        Err("must not contain '/' or ':'")
    } else if name.chars().any(char::is_whitespace) {
        Err("must not contain whitespace")
    } else {
        Ok(())
    }
}

/// Checks the shape of an endpoint without resolving it.
fn check_endpoint(s: &str) -> Result<(), &'static str> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return if addr.port() == 0 {
            Err("port must not be 0")
        } else {
            Ok(())
        };
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err("missing \":port\"");
    };
    let port: u16 = port.parse().map_err(|_| "port is not a number 1..=65535")?;
    if port == 0 {
        return Err("port must not be 0");
    }
    if host.starts_with('[') {
        return Err("not a valid bracketed IPv6 address");
    }
    if host.contains(':') {
        return Err("an IPv6 address must be in brackets");
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() || name.len() > 253 {
        return Err("host name must be 1 to 253 characters");
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if !name.split('.').all(label_ok) {
        return Err("not a valid host name");
    }
    Ok(())
}

/// The file text and name, for turning spans into locations.
struct Ctx<'a> {
    text: &'a str,
    file: &'a Path,
}

impl Ctx<'_> {
    fn at(&self, span: &Range<usize>) -> Location {
        Location {
            file: self.file.to_owned(),
            line_col: Some(line_col(self.text, span.start)),
        }
    }

    fn at_opt(&self, span: Option<Range<usize>>) -> Location {
        Location {
            file: self.file.to_owned(),
            line_col: span.map(|s| line_col(self.text, s.start)),
        }
    }

    fn line(&self, span: &Range<usize>) -> u32 {
        line_col(self.text, span.start).0
    }

    fn invalid(
        &self,
        span: &Range<usize>,
        field: impl Into<String>,
        reason: Invalid,
    ) -> ConfigError {
        ConfigError::Invalid {
            at: self.at(span),
            field: field.into(),
            reason,
        }
    }

    /// Parses a [`NetList`] at `field`: `(prefix, its span, its field path)` per element.
    fn nets(
        &self,
        list: Spanned<NetList>,
        field: &str,
    ) -> Result<Vec<(IpNet, Range<usize>, String)>, ConfigError> {
        let list_span = list.span();
        let mut out = Vec::new();
        for (j, (text, span)) in list.into_inner().0.into_iter().enumerate() {
            // Only array elements carry their own span.
            let field = match span {
                Some(_) => format!("{field}[{j}]"),
                None => field.to_owned(),
            };
            let span = span.unwrap_or_else(|| list_span.clone());
            match parse_net(&text) {
                Ok(net) => out.push((net, span, field)),
                Err(message) => {
                    return Err(ConfigError::Field {
                        at: self.at(&span),
                        field,
                        message,
                    })
                }
            }
        }
        Ok(out)
    }

    fn build(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let interface = self.build_interface(raw.interface)?;
        let peers = self.build_peers(raw.peer)?;
        Ok(Config {
            interface,
            peers,
            path: self.file.to_owned(),
        })
    }

    fn build_interface(&self, raw: RawInterface) -> Result<Interface, ConfigError> {
        if let Err(why) = check_interface_name(raw.name.get_ref()) {
            let reason = Invalid::InterfaceName {
                name: raw.name.get_ref().clone(),
                why,
            };
            return Err(self.invalid(&raw.name.span(), "interface.name", reason));
        }
        if raw.private_key_file.get_ref().as_os_str().is_empty() {
            return Err(self.invalid(
                &raw.private_key_file.span(),
                "interface.private_key_file",
                Invalid::EmptyPath,
            ));
        }
        let address_span = raw.address.span();
        let addresses: Vec<IpNet> = self
            .nets(raw.address, "interface.address")?
            .into_iter()
            .map(|(net, _, _)| net)
            .collect();
        if addresses.is_empty() {
            return Err(self.invalid(&address_span, "interface.address", Invalid::NoAddress));
        }
        let mtu = raw.mtu.as_ref().map_or(DEFAULT_MTU, |m| *m.get_ref());
        let mtu_span = raw.mtu.as_ref().map(|m| m.span());
        if !MTU_RANGE.contains(&mtu) {
            let span = mtu_span.clone().unwrap_or_else(|| address_span.clone());
            return Err(self.invalid(&span, "interface.mtu", Invalid::MtuRange(mtu)));
        }
        if mtu < MIN_IPV6_MTU {
            if let Some(v6) = addresses.iter().find(|a| matches!(a, IpNet::V6(_))) {
                let span = mtu_span.unwrap_or_else(|| address_span.clone());
                let reason = Invalid::MtuTooSmallForIpv6 { mtu, address: *v6 };
                return Err(self.invalid(&span, "interface.mtu", reason));
            }
        }
        let relative = |p: PathBuf| match self.file.parent() {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p,
        };
        let private_key_file = relative(raw.private_key_file.into_inner());
        let mut routed_prefixes: Vec<IpNet> = match raw.routed_prefixes {
            Some(list) => self
                .nets(list, "interface.routed_prefixes")?
                .into_iter()
                .map(|(net, _, _)| net.trunc())
                .collect(),
            None => Vec::new(),
        };
        routed_prefixes.sort();
        routed_prefixes.dedup();
        let uapi_dir = match raw.uapi_dir {
            Some(d) if d.get_ref().as_os_str().is_empty() => {
                return Err(self.invalid(&d.span(), "interface.uapi_dir", Invalid::EmptyPath))
            }
            Some(d) => relative(d.into_inner()),
            None => PathBuf::from(DEFAULT_UAPI_DIR),
        };
        let mut flows = FlowSettings::default();
        if let Some(on) = raw.flow_records {
            flows.enabled = on;
        }
        if let Some(i) = raw.flow_interval {
            if !FLOW_INTERVAL_RANGE.contains(i.get_ref()) {
                let reason = Invalid::FlowInterval(*i.get_ref());
                return Err(self.invalid(&i.span(), "interface.flow_interval", reason));
            }
            flows.interval = std::time::Duration::from_secs(*i.get_ref());
        }
        if let Some(n) = raw.flow_max_records {
            if !FLOW_MAX_RECORDS_RANGE.contains(n.get_ref()) {
                let reason = Invalid::FlowMaxRecords(*n.get_ref());
                return Err(self.invalid(&n.span(), "interface.flow_max_records", reason));
            }
            flows.max_records = *n.get_ref();
        }
        Ok(Interface {
            flows,
            name: raw.name.into_inner(),
            private_key_file,
            listen_port: raw.listen_port.unwrap_or(DEFAULT_LISTEN_PORT),
            addresses,
            mtu,
            mode: raw.mode,
            fwmark: raw.fwmark.filter(|&m| m != 0),
            labels: raw.labels,
            policy_file: raw.policy_file.map(relative),
            policy: raw.policy,
            routed_prefixes,
            uapi_dir,
            log_format: raw.log_format,
            metrics_listen: raw.metrics_listen,
        })
    }

    fn build_peers(&self, raw: Vec<RawPeer>) -> Result<Vec<PeerConfig>, ConfigError> {
        let mut names: HashMap<String, (usize, u32)> = HashMap::new();
        let mut keys: HashMap<PublicKey, (usize, u32)> = HashMap::new();
        let mut nets: HashMap<IpNet, (String, u32)> = HashMap::new();
        let mut peers = Vec::with_capacity(raw.len());
        for (i, p) in raw.into_iter().enumerate() {
            let name_span = p.name.span();
            let name = p.name.into_inner();
            if name.is_empty() {
                return Err(self.invalid(
                    &name_span,
                    format!("peer[{i}].name"),
                    Invalid::EmptyPeerName,
                ));
            }
            if let Some(&(first, first_line)) = names.get(&name) {
                let reason = Invalid::DuplicatePeerName {
                    name,
                    first,
                    first_line,
                };
                return Err(self.invalid(&name_span, format!("peer[{i}].name"), reason));
            }
            names.insert(name.clone(), (i, self.line(&name_span)));

            let key_span = p.public_key.span();
            let public_key = p.public_key.into_inner();
            if let Some(&(first, first_line)) = keys.get(&public_key) {
                let reason = Invalid::DuplicatePublicKey { first, first_line };
                return Err(self.invalid(&key_span, format!("peer[{i}].public_key"), reason));
            }
            keys.insert(public_key, (i, self.line(&key_span)));

            let endpoint = match p.endpoint {
                Some(ep) => {
                    if let Err(why) = check_endpoint(ep.get_ref()) {
                        let reason = Invalid::Endpoint {
                            value: ep.get_ref().clone(),
                            why,
                        };
                        return Err(self.invalid(
                            &ep.span(),
                            format!("peer[{i}].endpoint"),
                            reason,
                        ));
                    }
                    Some(ep.into_inner())
                }
                None => None,
            };

            let mut allowed_ips = Vec::new();
            if let Some(list) = p.allowed_ips {
                for (net, span, field) in self.nets(list, &format!("peer[{i}].allowed_ips"))? {
                    let prefix = net.trunc();
                    if let Some((first_field, first_line)) = nets.get(&prefix) {
                        let reason = Invalid::DuplicateAllowedIp {
                            net: prefix,
                            first_field: first_field.clone(),
                            first_line: *first_line,
                        };
                        return Err(self.invalid(&span, field, reason));
                    }
                    nets.insert(prefix, (field, self.line(&span)));
                    allowed_ips.push(net);
                }
            }

            let persistent_keepalive = match p.persistent_keepalive {
                Some(k) if *k.get_ref() == 0 => {
                    return Err(self.invalid(
                        &k.span(),
                        format!("peer[{i}].persistent_keepalive"),
                        Invalid::KeepaliveZero,
                    ))
                }
                Some(k) => Some(k.into_inner()),
                None => None,
            };

            peers.push(PeerConfig {
                name,
                public_key,
                endpoint,
                allowed_ips,
                persistent_keepalive,
                preshared_key: p.preshared_key.map(|k| k.0),
                labels: p.labels,
            });
        }
        Ok(peers)
    }
}

#[cfg(test)]
mod tests;
