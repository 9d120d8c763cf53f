//! Control protocol: messages between agent and coordinator, and their framing.
//!
//! Each message is one frame: a 4-byte big-endian length, then that many bytes of JSON. Frames
//! travel inside the Noise transport (see `meshd-coordinator`), which chunks them. Limits are
//! per direction: agents only ever send small messages ([`MAX_AGENT_FRAME`]); full maps can be
//! large ([`MAX_COORDINATOR_FRAME`]). A frame over the limit is refused from its header alone,
//! before anything is buffered.

use std::net::{IpAddr, SocketAddr};

use meshd_tunnel::PublicKey;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::map::{MapDelta, NetworkMap};
use crate::model::{Host, HostId, Labels, UnixTime};
use crate::token::TokenSecret;

/// Protocol version carried in `Enrol`, `Resume` and `Welcome`.
pub const PROTOCOL_VERSION: u16 = 1;
/// Largest frame an agent may send (bytes of JSON).
pub const MAX_AGENT_FRAME: usize = 64 * 1024;
/// Most block events in one [`AgentMessage::Blocks`] (keeps the frame under [`MAX_AGENT_FRAME`]
/// with modest labels).
pub const MAX_BLOCKS_PER_MESSAGE: usize = 64;
/// Largest frame the coordinator sends (a full map of ~100k peers fits).
pub const MAX_COORDINATOR_FRAME: usize = 32 * 1024 * 1024;

/// Where an agent can be reached on the underlay.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EndpointReport {
    /// Local underlay addresses with the WireGuard port.
    pub addrs: Vec<SocketAddr>,
    /// The WireGuard listen port; the coordinator pairs it with the observed source IP.
    pub listen_port: Option<u16>,
    /// The host runs in transparent mode: peers that do too send it traffic for its underlay
    /// addresses through the tunnel (and accept its underlay addresses as inner sources).
    #[serde(default)]
    pub transparent: bool,
}

/// Agent → coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    /// First message of a new host: enrol with a join token secret.
    Enrol {
        /// [`PROTOCOL_VERSION`].
        protocol: u16,
        /// The join token's secret.
        secret: TokenSecret,
        /// Requested host name.
        name: String,
        /// Underlay endpoints.
        endpoints: EndpointReport,
    },
    /// First message of an enrolled host (identified by its Noise static key).
    Resume {
        /// [`PROTOCOL_VERSION`].
        protocol: u16,
        /// Underlay endpoints.
        endpoints: EndpointReport,
    },
    /// The agent's underlay endpoints changed.
    ReportEndpoints {
        /// New endpoints.
        endpoints: EndpointReport,
    },
    /// The agent has applied the map at this version.
    Ack {
        /// Version applied.
        version: u64,
    },
    /// The agent could not apply a delta; send a full map.
    Resync,
    /// Denied flows seen by the agent's firewall (at most [`MAX_BLOCKS_PER_MESSAGE`]; more are
    /// dropped by the coordinator with a counter). Send more messages for more events.
    Blocks {
        /// The events, oldest first.
        events: Vec<meshd_policy::BlockEvent>,
    },
    /// Flow records of one interval (at most [`crate::flow::MAX_FLOWS_PER_MESSAGE`] records
    /// and plaintext flows together; more are dropped by the coordinator with a counter). An
    /// agent that saw more sends several messages.
    Flows {
        /// Start of the interval (Unix seconds).
        interval_start: UnixTime,
        /// Flows with peers.
        records: Vec<crate::flow::FlowRecord>,
        /// Transparent mode: plaintext drops from outside the mesh.
        #[serde(default)]
        plaintext: Vec<crate::flow::PlaintextFlow>,
        /// Flows the agent could not keep this interval (its cap was reached).
        #[serde(default)]
        overflow: u64,
    },
    /// Liveness probe.
    Ping {
        /// Echoed in `Pong`.
        nonce: u64,
    },
    /// Answer to [`CoordinatorMessage::RotateKey`]: the new key, already stored durably, and
    /// the proof that this host holds it ([`crate::rotation::prove`]).
    KeyProposal {
        /// The request's challenge.
        nonce: crate::rotation::Nonce,
        /// The new public key.
        new_key: PublicKey,
        /// HMAC keyed with DH(new private, coordinator public).
        proof: crate::rotation::Proof,
        /// The old key's XEdDSA signature handing on to the new one
        /// ([`crate::signed::Succession`]): what lets peers in a signed mesh accept the new key
        /// as this host. Absent from agents older than signed key rotation.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        succession: Option<crate::signed::Sig>,
    },
}

/// The enrolled host's own record, as sent to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// Id.
    pub id: HostId,
    /// Name.
    pub name: String,
    /// Public key.
    pub public_key: PublicKey,
    /// Overlay addresses (v4 first).
    pub addresses: Vec<IpAddr>,
    /// The pool prefix lengths' networks the addresses belong to, e.g. `100.64.0.0/10`.
    pub networks: Vec<ipnet::IpNet>,
    /// Labels.
    pub labels: Labels,
}

impl HostInfo {
    /// From a host record and the pool's networks.
    pub fn from_host(h: &Host, networks: Vec<ipnet::IpNet>) -> HostInfo {
        HostInfo {
            id: h.id,
            name: h.name.clone(),
            public_key: h.public_key,
            addresses: h.addresses(),
            networks,
            labels: h.labels.clone(),
        }
    }
}

/// Why the coordinator refused or closed a session. Distinct codes so the agent can say which.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// No token with this secret.
    #[error("join token is not known to the coordinator")]
    TokenUnknown,
    /// Token past its expiry.
    #[error("join token has expired")]
    TokenExpired,
    /// Token revoked by an operator.
    #[error("join token was revoked")]
    TokenRevoked,
    /// Token has no uses left.
    #[error("join token has been used up")]
    TokenUsedUp,
    /// `Resume` from a key the coordinator has never enrolled.
    #[error("this host is not enrolled (join with a token)")]
    UnknownHost,
    /// The host was removed by an operator.
    #[error("this host was removed from the mesh")]
    HostRemoved,
    /// The host's identity was revoked: its key is refused for good (enrol a new key).
    #[error("this host's key was revoked and is refused for good")]
    HostRevoked,
    /// Another live connection exists for this key.
    #[error("another connection for this host is already live")]
    AlreadyConnected,
    /// Unsupported protocol version.
    #[error("unsupported control protocol version")]
    ProtocolVersion,
    /// Invalid host name.
    #[error("invalid host name")]
    InvalidName,
    /// The address pool is exhausted.
    #[error("the coordinator's address pool is exhausted")]
    PoolExhausted,
    /// A malformed, oversized or out-of-order message.
    #[error("malformed control message")]
    Malformed,
    /// Coordinator-side failure (e.g. storage).
    #[error("coordinator internal error")]
    Internal,
}

impl ErrorCode {
    /// Whether retrying later can help (otherwise the agent should stop and tell the operator).
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorCode::AlreadyConnected | ErrorCode::Internal)
    }
}

/// Coordinator → agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CoordinatorMessage {
    /// Accepted: the host's own record.
    Welcome {
        /// [`PROTOCOL_VERSION`].
        protocol: u16,
        /// The host's record.
        host: HostInfo,
        /// Every coordinator replica's control address, this one's first (`--replica`); the
        /// agent fails over between them. Empty from a coordinator that does not say (an
        /// older one): the agent keeps the addresses it has.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        replicas: Vec<std::net::SocketAddr>,
    },
    /// A complete map (on connect, and after `Resync`).
    FullMap {
        /// The map.
        map: NetworkMap,
    },
    /// Changes since the last map sent.
    Delta {
        /// The changes.
        delta: MapDelta,
    },
    /// Admin-signed statements for the full map or delta that follows (sent only once an
    /// admin key set exists; see [`crate::signed`]).
    Trust {
        /// The key-set chain, the policy (when new to this agent) and the host statements.
        bundle: Box<crate::signed::TrustBundle>,
    },
    /// Reply to `Ping`.
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// Rotate the host key: make a new one, store it, answer with
    /// [`AgentMessage::KeyProposal`].
    RotateKey {
        /// The challenge to prove the new key over.
        nonce: crate::rotation::Nonce,
    },
    /// The proposed key is committed and on its way to the peers: switch to it after
    /// `switch_after_ms`, then reconnect with it.
    KeyAccepted {
        /// The key proposed.
        new_key: PublicKey,
        /// How long to wait before switching (peers apply the map carrying the key).
        switch_after_ms: u64,
    },
    /// Refusal or fatal error; the coordinator closes the connection after it.
    Error {
        /// Machine-readable cause.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
}

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Length prefix over the limit.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// Not a valid message.
    #[error("malformed message: {0}")]
    Malformed(#[source] serde_json::Error),
}

/// Encodes one message as a frame (length prefix + JSON).
pub fn encode_frame<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; 4];
    serde_json::to_writer(&mut out, msg).map_err(FrameError::Malformed)?;
    let len = out.len() - 4;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    // len <= max <= u32::MAX in practice; refuse otherwise.
    let l32 = u32::try_from(len).map_err(|_| FrameError::TooLarge { len, max })?;
    out[..4].copy_from_slice(&l32.to_be_bytes());
    Ok(out)
}

/// The capacity a connection's message buffers keep between messages. A full map of
/// hundreds of peers is hundreds of KiB; kept by every buffer of every connection, 10,000
/// agents' connections held most of a coordinator's memory. Past this, a buffer that has
/// been emptied is given back.
pub const KEEP_BUFFER: usize = 4096;

/// Gives an emptied buffer's memory back when it grew past [`KEEP_BUFFER`].
pub fn release_buffer(buf: &mut Vec<u8>) {
    if buf.is_empty() && buf.capacity() > KEEP_BUFFER {
        *buf = Vec::new();
    }
}

/// Incremental frame decoder: push bytes, pull messages.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max: usize,
}

impl FrameDecoder {
    /// A decoder refusing frames longer than `max`.
    pub fn new(max: usize) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            max,
        }
    }

    /// Appends received bytes. Fails at once if a pending frame header announces too much.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        self.buf.extend_from_slice(bytes);
        self.check_header()
    }

    fn check_header(&self) -> Result<(), FrameError> {
        if self.buf.len() >= 4 {
            let len =
                u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
            if len > self.max {
                return Err(FrameError::TooLarge { len, max: self.max });
            }
        }
        Ok(())
    }

    /// The next complete message, if one is buffered.
    pub fn next_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        self.check_header()?;
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let res = serde_json::from_slice(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        release_buffer(&mut self.buf);
        res.map(Some).map_err(FrameError::Malformed)
    }

    /// Bytes buffered but not yet returned.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A large message does not leave its size allocated in the decoder.
    #[test]
    fn a_large_frame_is_not_kept_allocated_once_read() {
        let big = AgentMessage::Enrol {
            protocol: PROTOCOL_VERSION,
            secret: TokenSecret([3; 32]),
            name: "x".repeat(200_000),
            endpoints: EndpointReport {
                addrs: vec![],
                listen_port: None,
                transparent: false,
            },
        };
        let bytes = encode_frame(&big, 1 << 20).unwrap();
        let mut d = FrameDecoder::new(1 << 20);
        for chunk in bytes.chunks(65_519) {
            d.push(chunk).unwrap();
        }
        assert!(d.buf.capacity() > 200_000);
        assert_eq!(d.next_message::<AgentMessage>().unwrap(), Some(big));
        assert!(d.buf.capacity() <= KEEP_BUFFER, "{}", d.buf.capacity());
        // A small one keeps its buffer (no allocation per message).
        let small = encode_frame(&AgentMessage::Ack { version: 1 }, 1 << 20).unwrap();
        d.push(&small).unwrap();
        let cap = d.buf.capacity();
        assert!(d.next_message::<AgentMessage>().unwrap().is_some());
        assert_eq!(d.buf.capacity(), cap);
    }

    #[test]
    fn roundtrip_split_anywhere() {
        let msgs = vec![
            AgentMessage::Ping { nonce: 7 },
            AgentMessage::Enrol {
                protocol: PROTOCOL_VERSION,
                secret: TokenSecret([3; 32]),
                name: "db1".into(),
                endpoints: EndpointReport {
                    addrs: vec!["192.0.2.1:51820".parse().unwrap()],
                    listen_port: Some(51820),
                    transparent: false,
                },
            },
            AgentMessage::Ack { version: 9 },
        ];
        let mut bytes = Vec::new();
        for m in &msgs {
            bytes.extend(encode_frame(m, MAX_AGENT_FRAME).unwrap());
        }
        for split in 0..bytes.len() {
            let mut d = FrameDecoder::new(MAX_AGENT_FRAME);
            let mut got = Vec::new();
            for chunk in [&bytes[..split], &bytes[split..]] {
                d.push(chunk).unwrap();
                while let Some(m) = d.next_message::<AgentMessage>().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got, msgs);
        }
    }

    #[test]
    fn oversized_refused_from_header() {
        let mut d = FrameDecoder::new(100);
        let err = d.push(&1000u32.to_be_bytes()).unwrap_err();
        assert!(matches!(
            err,
            FrameError::TooLarge {
                len: 1000,
                max: 100
            }
        ));
        let big = AgentMessage::Enrol {
            protocol: 1,
            secret: TokenSecret([0; 32]),
            name: "x".repeat(200),
            endpoints: EndpointReport::default(),
        };
        assert!(matches!(
            encode_frame(&big, 100),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn malformed_is_error_not_panic() {
        let mut d = FrameDecoder::new(100);
        d.push(&[0, 0, 0, 3, b'{', b'x', b'}']).unwrap();
        assert!(matches!(
            d.next_message::<AgentMessage>(),
            Err(FrameError::Malformed(_))
        ));
        d.push(&[0, 0, 0, 2, b'{', b'}']).unwrap();
        assert!(matches!(
            d.next_message::<AgentMessage>(),
            Err(FrameError::Malformed(_))
        ));
    }

    proptest! {
        #[test]
        fn decoder_never_panics(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8)) {
            let mut d = FrameDecoder::new(256);
            for c in chunks {
                if d.push(&c).is_err() { break; }
                while let Ok(Some(_)) | Err(FrameError::Malformed(_)) = d.next_message::<AgentMessage>() {}
            }
        }
    }
}
