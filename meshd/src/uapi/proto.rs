//! The cross-platform WireGuard configuration protocol (<https://www.wireguard.com/xplatform/>),
//! as wireguard-go's `device/uapi.go` speaks it: the text of one `get=1` or `set=1` request
//! parsed into a typed [`Request`], and the `get` answer formatted from a [`DeviceState`].
//! Pure: no IO, no clock.
//!
//! An answer ends with `errno=N` and a blank line. As in wireguard-go, `N` is 0 or a negated
//! `errno.h` value (`errno=-22`), which `wg` turns back into the error it prints.

use std::fmt::Write as _;
use std::net::SocketAddr;

use ipnet::IpNet;

/// An `errno.h` value as the protocol carries it (`errno=-N` on the wire; 0: success).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    /// Success.
    pub const OK: Errno = Errno(0);
    /// Not permitted: the coordinator owns the peers (coordinator mode).
    pub const EPERM: Errno = Errno(1);
    /// The answer could not be made (wireguard-go's `IpcErrorIO`).
    pub const EIO: Errno = Errno(5);
    /// A request longer than meshd reads.
    pub const E2BIG: Errno = Errno(7);
    /// A value that does not parse, an unknown key, a refused table (`IpcErrorInvalid`).
    pub const EINVAL: Errno = Errno(22);
    /// A line without `=` (`IpcErrorProtocol`).
    pub const EPROTO: Errno = Errno(71);
    /// A change meshd cannot make while running: another private key, listen port or
    /// fwmark (restart with a new config instead, as for `[interface]` changes on SIGHUP).
    pub const EOPNOTSUPP: Errno = Errno(95);

    /// The `errno=…` line's value: `0` or the negated number, as wireguard-go writes it.
    pub fn wire(self) -> i64 {
        -i64::from(self.0)
    }
}

/// One request of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `get=1`: the device and its peers.
    Get,
    /// `set=1`: changes, applied as a whole or not at all.
    Set(SetRequest),
}

/// What a `set=1` asks for, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetRequest {
    /// `private_key=` (hex; all zeros: none).
    pub private_key: Option<[u8; 32]>,
    /// `listen_port=`.
    pub listen_port: Option<u16>,
    /// `fwmark=` (0: none).
    pub fwmark: Option<u32>,
    /// `replace_peers=true`: every peer not named below goes.
    pub replace_peers: bool,
    /// Per-peer changes, in request order (a key may come twice).
    pub peers: Vec<PeerChange>,
}

/// The lines after one `public_key=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerChange {
    /// The peer's key.
    pub public_key: [u8; 32],
    /// `remove=true`: delete the peer (later lines for it are checked, then ignored).
    pub remove: bool,
    /// `update_only=true`: change the peer only if it exists.
    pub update_only: bool,
    /// `preshared_key=` (hex; all zeros: none).
    pub preshared_key: Option<[u8; 32]>,
    /// `endpoint=` (`ip:port` or `[ip6]:port`; wg sends numeric addresses only).
    pub endpoint: Option<SocketAddr>,
    /// `persistent_keepalive_interval=` (0: off).
    pub persistent_keepalive: Option<u16>,
    /// `replace_allowed_ips=true` and `allowed_ip=[-]prefix`, in order.
    pub allowed_ips: Vec<AllowedIpOp>,
}

/// One change to a peer's allowed IPs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllowedIpOp {
    /// `replace_allowed_ips=true`: drop the ones so far.
    Clear,
    /// `allowed_ip=prefix`.
    Add(IpNet),
    /// `allowed_ip=-prefix`.
    Remove(IpNet),
}

impl PeerChange {
    fn new(public_key: [u8; 32]) -> Self {
        PeerChange {
            public_key,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            allowed_ips: Vec::new(),
        }
    }
}

/// How a request's text ends: a blank line.
pub const END: &str = "\n\n";

/// Parses one request: `get=1\n\n`, or `set=1\n` with `key=value` lines up to a blank line.
/// `text` is the whole request including the blank line. `Err(None)`: not a request at all
/// (an unknown operation: wireguard-go closes the connection without an answer).
pub fn parse_request(text: &str) -> Result<Request, Option<Errno>> {
    let Some((op, rest)) = text.split_once('\n') else {
        return Err(None);
    };
    match op {
        "get=1" => {
            // Exactly one empty line must follow.
            if rest == "\n" {
                Ok(Request::Get)
            } else {
                Err(Some(Errno::EINVAL))
            }
        }
        "set=1" => parse_set(rest).map(Request::Set).map_err(Some),
        _ => Err(None),
    }
}

/// Parses the lines of a `set=1` (after the operation line), up to and including the blank
/// line that ends it.
pub fn parse_set(body: &str) -> Result<SetRequest, Errno> {
    let mut set = SetRequest::default();
    let mut peer: Option<PeerChange> = None;
    let mut ended = false;
    for line in body.split_inclusive('\n') {
        if line == "\n" {
            ended = true;
            break;
        }
        // A last line without its newline: the request was cut off.
        let line = line.strip_suffix('\n').ok_or(Errno::EIO)?;
        let (key, value) = line.split_once('=').ok_or(Errno::EPROTO)?;
        if key == "public_key" {
            set.peers.extend(peer.take());
            peer = Some(PeerChange::new(hex_key(value)?));
            continue;
        }
        match peer.as_mut() {
            None => device_line(&mut set, key, value)?,
            Some(p) => peer_line(p, key, value)?,
        }
    }
    if !ended {
        // The connection ended before the blank line.
        return Err(Errno::EIO);
    }
    set.peers.extend(peer);
    Ok(set)
}

fn device_line(set: &mut SetRequest, key: &str, value: &str) -> Result<(), Errno> {
    match key {
        "private_key" => set.private_key = Some(hex_key(value)?),
        "listen_port" => set.listen_port = Some(number(value)?),
        "fwmark" => set.fwmark = Some(number(value)?),
        "replace_peers" => {
            flag(value)?;
            set.replace_peers = true;
        }
        _ => return Err(Errno::EINVAL),
    }
    Ok(())
}

fn peer_line(p: &mut PeerChange, key: &str, value: &str) -> Result<(), Errno> {
    match key {
        "update_only" => {
            flag(value)?;
            p.update_only = true;
        }
        "remove" => {
            flag(value)?;
            p.remove = true;
        }
        "preshared_key" => p.preshared_key = Some(hex_key(value)?),
        "endpoint" => p.endpoint = Some(value.parse().map_err(|_| Errno::EINVAL)?),
        "persistent_keepalive_interval" => p.persistent_keepalive = Some(number(value)?),
        "replace_allowed_ips" => {
            flag(value)?;
            p.allowed_ips.push(AllowedIpOp::Clear);
        }
        "allowed_ip" => {
            let op = match value.strip_prefix('-') {
                Some(v) => AllowedIpOp::Remove(prefix(v)?),
                None => AllowedIpOp::Add(prefix(value)?),
            };
            p.allowed_ips.push(op);
        }
        "protocol_version" if value == "1" => {}
        _ => return Err(Errno::EINVAL),
    }
    Ok(())
}

/// `true` is the only value a flag takes.
fn flag(value: &str) -> Result<(), Errno> {
    if value == "true" {
        Ok(())
    } else {
        Err(Errno::EINVAL)
    }
}

/// A decimal number that fits (no sign, no spaces).
fn number<T: std::str::FromStr>(value: &str) -> Result<T, Errno> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Errno::EINVAL);
    }
    value.parse().map_err(|_| Errno::EINVAL)
}

/// A prefix; like wireguard-go (`netip.ParsePrefix`), the length is required and host bits
/// may be set.
fn prefix(value: &str) -> Result<IpNet, Errno> {
    value.parse().map_err(|_| Errno::EINVAL)
}

/// A 32-byte key in 64 hex digits (either case).
pub fn hex_key(value: &str) -> Result<[u8; 32], Errno> {
    let b = value.as_bytes();
    if b.len() != 64 {
        return Err(Errno::EINVAL);
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(Errno::EINVAL),
    };
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = digit(b[2 * i])? << 4 | digit(b[2 * i + 1])?;
    }
    Ok(out)
}

/// A key as 64 lowercase hex digits.
pub fn to_hex(key: &[u8; 32]) -> String {
    let mut s = String::with_capacity(64);
    for b in key {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// What a `get=1` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    /// This host's private key.
    pub private_key: [u8; 32],
    /// The UDP port bound.
    pub listen_port: u16,
    /// The socket mark, if any.
    pub fwmark: Option<u32>,
    /// The peers, in table order.
    pub peers: Vec<PeerState>,
}

/// One peer in a `get=1` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerState {
    /// The peer's key.
    pub public_key: [u8; 32],
    /// Its preshared key, if any.
    pub preshared_key: Option<[u8; 32]>,
    /// Where we send to it now.
    pub endpoint: Option<SocketAddr>,
    /// Unix time of the last handshake as (seconds, nanoseconds); (0, 0): never.
    pub last_handshake: (u64, u32),
    /// Plaintext bytes sent.
    pub tx_bytes: u64,
    /// Decrypted bytes received.
    pub rx_bytes: u64,
    /// Keepalive interval (0: off).
    pub persistent_keepalive: u16,
    /// Allowed IPs.
    pub allowed_ips: Vec<IpNet>,
}

/// The answer to `get=1`, in wireguard-go's order, ending with `errno=0` and a blank line.
pub fn format_get(d: &DeviceState) -> String {
    let mut s = String::with_capacity(128 + d.peers.len() * 400);
    let _ = writeln!(s, "private_key={}", to_hex(&d.private_key));
    if d.listen_port != 0 {
        let _ = writeln!(s, "listen_port={}", d.listen_port);
    }
    if let Some(m) = d.fwmark.filter(|&m| m != 0) {
        let _ = writeln!(s, "fwmark={m}");
    }
    for p in &d.peers {
        let _ = writeln!(s, "public_key={}", to_hex(&p.public_key));
        if let Some(psk) = &p.preshared_key {
            let _ = writeln!(s, "preshared_key={}", to_hex(psk));
        }
        let _ = writeln!(s, "protocol_version=1");
        if let Some(ep) = p.endpoint {
            let _ = writeln!(s, "endpoint={ep}");
        }
        let _ = writeln!(s, "last_handshake_time_sec={}", p.last_handshake.0);
        let _ = writeln!(s, "last_handshake_time_nsec={}", p.last_handshake.1);
        let _ = writeln!(s, "tx_bytes={}", p.tx_bytes);
        let _ = writeln!(s, "rx_bytes={}", p.rx_bytes);
        let _ = writeln!(
            s,
            "persistent_keepalive_interval={}",
            p.persistent_keepalive
        );
        for ip in &p.allowed_ips {
            let _ = writeln!(s, "allowed_ip={ip}");
        }
    }
    s.push_str(&status_line(Errno::OK));
    s
}

/// The `errno=N` line and the blank line that end every answer.
pub fn status_line(e: Errno) -> String {
    format!("errno={}\n\n", e.wire())
}

#[cfg(test)]
#[path = "proto_tests.rs"]
mod tests;
