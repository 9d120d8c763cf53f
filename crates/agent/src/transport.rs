//! Opening the QUIC + Noise transport to the coordinator, and enrolment (one exchange on it).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use meshd_channel::spa::{self, KnockAs};

use meshd_channel::noise::{self, ChannelError, NoiseReader, NoiseWriter};
use meshd_channel::quic;
use meshd_control::proto::{
    AgentMessage, CoordinatorMessage, EndpointReport, ErrorCode, HostInfo, MAX_AGENT_FRAME,
    MAX_COORDINATOR_FRAME, PROTOCOL_VERSION,
};
use meshd_control::JoinToken;
use meshd_tunnel::{PrivateKey, PublicKey};

/// How long each step of opening the transport (QUIC handshake, stream, Noise handshake) and
/// the enrolment's answer may take.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(10);
/// How long one replica gets to answer when there are others to try: a silent (dead or
/// partitioned) replica must not cost a fail-over the whole [`TIMEOUT`].
pub(crate) const FAILOVER_TIMEOUT: Duration = Duration::from_secs(4);
/// When the knock is first sent again while the QUIC handshake has no answer: a knock lost
/// on the way, or refused by a replica that has not yet followed the commit that made its
/// token or host (replicas follow each other within a second), is not the end of the attempt.
/// Then once more after twice that, and no more in that attempt: in an enrolment storm a
/// thousand agents wait on the coordinator's handshake limit, and a knock every 400 ms each
/// (two X25519 operations on both sides) was most of their CPU and filled the coordinator's
/// budget of knock checks, crowding out newcomers' first knocks.
const REKNOCK: Duration = Duration::from_millis(400);
/// Knocks sent again in one attempt.
const REKNOCKS: usize = 2;

/// The waits before each knock sent again while a handshake has no answer: [`REKNOCK`],
/// then twice that; [`REKNOCKS`] in all.
fn reknock_waits() -> impl Iterator<Item = Duration> {
    std::iter::successors(Some(REKNOCK), |w| Some(*w * 2)).take(REKNOCKS)
}

/// Why talking to the coordinator failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The coordinator said no (token expired/revoked/used up, host removed, …).
    #[error("coordinator refused: {code} ({message})")]
    Refused {
        /// Which refusal.
        code: ErrorCode,
        /// Detail from the coordinator.
        message: String,
    },
    /// Could not create the local QUIC socket.
    #[error("creating the QUIC socket: {0}")]
    Socket(#[from] std::io::Error),
    /// Could not send the SPA knock.
    #[error("sending the SPA knock: {0}")]
    Knock(#[source] std::io::Error),
    /// QUIC configuration problem.
    #[error("QUIC setup: {0}")]
    Setup(String),
    /// Could not start connecting.
    #[error("connecting to the coordinator: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The QUIC connection failed or closed.
    #[error("coordinator connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The Noise handshake failed: the coordinator's key is not the pinned one, or it is not a
    /// meshd coordinator.
    #[error("secure handshake with the coordinator failed (wrong coordinator key pinned, or not a meshd coordinator): {0}")]
    Handshake(#[source] ChannelError),
    /// The secure channel failed after the handshake.
    #[error("control channel: {0}")]
    Channel(#[from] ChannelError),
    /// No answer in time.
    #[error("timed out waiting for the coordinator")]
    Timeout,
    /// The coordinator sent something out of order.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// What to keep after enrolling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolment {
    /// Our record: id, name (may have been de-duplicated), overlay addresses, labels.
    pub host: HostInfo,
    /// The coordinator's control address (the replica that answered).
    pub coordinator: SocketAddr,
    /// The other replicas' addresses: the `Welcome`'s list, else the token's (fail-over).
    pub replicas: Vec<SocketAddr>,
    /// The coordinator's static key (pin it).
    pub coordinator_key: PublicKey,
}

fn setup_error(e: quic::QuicSetupError) -> ClientError {
    ClientError::Setup(e.to_string())
}

/// A client QUIC endpoint and a second handle on its UDP socket (the same socket, `dup`ed),
/// from which SPA knocks go out: a knock must come from the address and port the QUIC
/// connection will use. Derefs to the [`quinn::Endpoint`].
#[derive(Debug, Clone)]
pub struct ClientEndpoint {
    quic: quinn::Endpoint,
    knock: Arc<std::net::UdpSocket>,
}

impl std::ops::Deref for ClientEndpoint {
    type Target = quinn::Endpoint;
    fn deref(&self) -> &quinn::Endpoint {
        &self.quic
    }
}

impl ClientEndpoint {
    /// The QUIC endpoint.
    pub fn quic(&self) -> &quinn::Endpoint {
        &self.quic
    }

    /// Sends one SPA knock to `to` (the coordinator, whose static key is `coordinator_key`)
    /// from this endpoint's socket, as `who`, with the static key `key`; returns its length.
    pub fn knock(
        &self,
        to: SocketAddr,
        coordinator_key: &PublicKey,
        key: &PrivateKey,
        who: KnockAs<'_>,
    ) -> Result<usize, ClientError> {
        let k = spa::make_knock(
            coordinator_key,
            key,
            who,
            meshd_time::unix_millis(),
            spa::fresh_nonce(),
        )
        .map_err(|e| ClientError::Setup(e.to_string()))?;
        // The socket is quinn's (non-blocking): a full send buffer drops the knock, and the
        // connection attempt that follows times out and is retried with a new one.
        self.knock.send_to(&k, to).map_err(ClientError::Knock)
    }
}

impl ClientEndpoint {
    /// Sends raw bytes from this endpoint's socket (tests: replaying a captured knock).
    #[doc(hidden)]
    pub fn send_datagram(&self, bytes: &[u8], to: SocketAddr) -> std::io::Result<usize> {
        self.knock.send_to(bytes, to)
    }
}

/// A client QUIC endpoint bound to `bind` (share one between many sessions if you like).
pub fn client_endpoint(bind: SocketAddr) -> Result<ClientEndpoint, ClientError> {
    client_endpoint_marked(bind, None)
}

/// Like [`client_endpoint`], with the socket's packets carrying firewall mark `fwmark`
/// (`SO_MARK`): transparent mode's policy routing lets marked packets bypass the tunnel, so
/// the control connection to a coordinator on a peer's address is not steered into it.
pub fn client_endpoint_marked(
    bind: SocketAddr,
    fwmark: Option<u32>,
) -> Result<ClientEndpoint, ClientError> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(bind),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if let Some(mark) = fwmark {
        sock.set_mark(mark)?;
    }
    sock.bind(&bind.into())?;
    let sock: std::net::UdpSocket = sock.into();
    let knock = Arc::new(sock.try_clone()?);
    let runtime = quinn::default_runtime()
        .ok_or_else(|| ClientError::Setup("no async runtime for the QUIC endpoint".into()))?;
    let mut ep = quinn::Endpoint::new(quinn::EndpointConfig::default(), None, sock, runtime)?;
    ep.set_default_client_config(quic::client_config().map_err(setup_error)?);
    Ok(ClientEndpoint { quic: ep, knock })
}

fn wildcard_for(addr: SocketAddr) -> SocketAddr {
    if addr.is_ipv4() {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
    }
}

/// An open transport: the QUIC connection and the two halves of the Noise channel on its
/// stream.
pub(crate) struct Open {
    pub(crate) conn: quinn::Connection,
    pub(crate) reader: NoiseReader,
    pub(crate) writer: NoiseWriter,
    /// The endpoint the connection runs on (the session's own one, when not shared).
    pub(crate) endpoint: ClientEndpoint,
}

async fn timed<T, E>(f: impl std::future::Future<Output = Result<T, E>>) -> Result<T, ClientError>
where
    ClientError: From<E>,
{
    within(TIMEOUT, f).await
}

async fn within<T, E>(
    limit: Duration,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, ClientError>
where
    ClientError: From<E>,
{
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| ClientError::Timeout)?
        .map_err(Into::into)
}

/// Waits for `connecting` (at most `limit`), knocking again meanwhile ([`reknock_waits`]).
async fn connect_knocking(
    connecting: quinn::Connecting,
    limit: Duration,
    mut knock: impl FnMut() -> Result<usize, ClientError>,
) -> Result<quinn::Connection, ClientError> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut waits = reknock_waits();
    // After the last knock, the next is past the deadline.
    let mut next = tokio::time::Instant::now() + waits.next().unwrap_or(limit);
    tokio::pin!(connecting);
    loop {
        tokio::select! {
            r = &mut connecting => return r.map_err(Into::into),
            _ = tokio::time::sleep_until(deadline) => return Err(ClientError::Timeout),
            _ = tokio::time::sleep_until(next) => {
                if let Err(e) = knock() {
                    tracing::debug!(error = %e, "knocking again");
                }
                next += waits.next().unwrap_or(limit);
            }
        }
    }
}

/// Knocks (SPA, as `who`; again while the handshake has no answer), connects to `addr` over
/// `endpoint` (`None`: a fresh one, marked with `fwmark`) and runs the Noise handshake pinning
/// `coordinator_key`; each step within `limit`.
pub(crate) async fn open(
    addr: SocketAddr,
    coordinator_key: &PublicKey,
    key: &PrivateKey,
    who: KnockAs<'_>,
    endpoint: Option<&ClientEndpoint>,
    fwmark: Option<u32>,
    limit: Duration,
) -> Result<Open, ClientError> {
    let ep = match endpoint {
        Some(e) => e.clone(),
        None => client_endpoint_marked(wildcard_for(addr), fwmark)?,
    };
    ep.knock(addr, coordinator_key, key, who)?;
    let connecting = ep.connect(addr, "meshd-coordinator")?;
    let conn = connect_knocking(connecting, limit, || {
        ep.knock(addr, coordinator_key, key, who)
    })
    .await?;
    let (send, recv) = within(limit, conn.open_bi()).await?;
    let (reader, writer) = tokio::time::timeout(
        limit,
        noise::initiate(
            send,
            recv,
            key,
            coordinator_key,
            MAX_AGENT_FRAME,
            MAX_COORDINATOR_FRAME,
        ),
    )
    .await
    .map_err(|_| ClientError::Timeout)?
    .map_err(ClientError::Handshake)?;
    Ok(Open {
        conn,
        reader,
        writer,
        endpoint: ep,
    })
}

/// Enrols this host with a join token. The private key never leaves the host: only the
/// Noise handshake proves it.
pub async fn enrol(
    token: &JoinToken,
    name: &str,
    key: &PrivateKey,
    endpoints: EndpointReport,
) -> Result<Enrolment, ClientError> {
    enrol_via(None, token, name, key, endpoints).await
}

/// [`enrol`] over a given client endpoint (`None`: a fresh one). Knocks with the token first.
/// The token's addresses are tried in order until one answers. A refusal is final (the
/// replicas share one database, so another would say the same) unless it is retryable: a
/// replica that lost its database refuses with `internal`, and another may have it.
pub async fn enrol_via(
    endpoint: Option<&ClientEndpoint>,
    token: &JoinToken,
    name: &str,
    key: &PrivateKey,
    endpoints: EndpointReport,
) -> Result<Enrolment, ClientError> {
    let addrs = token.addresses();
    let mut last = None;
    for addr in &addrs {
        match enrol_at(*addr, endpoint, token, name, key, endpoints.clone()).await {
            Ok((host, listed)) => {
                let listed = if listed.is_empty() {
                    addrs.clone()
                } else {
                    listed
                };
                return Ok(Enrolment {
                    host,
                    coordinator: *addr,
                    replicas: listed
                        .into_iter()
                        .filter(|a| a != addr && !a.ip().is_unspecified() && a.port() != 0)
                        .collect(),
                    coordinator_key: token.coordinator_key,
                });
            }
            Err(e @ ClientError::Refused { code, .. }) if !code.is_retryable() => return Err(e),
            Err(e) => {
                if addrs.len() > 1 {
                    tracing::warn!(coordinator = %addr, error = %e, "enrolment: coordinator replica unreachable, trying the next");
                }
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or(ClientError::Timeout))
}

/// One enrolment attempt at `addr`: our record and the replicas the `Welcome` listed.
async fn enrol_at(
    addr: SocketAddr,
    endpoint: Option<&ClientEndpoint>,
    token: &JoinToken,
    name: &str,
    key: &PrivateKey,
    endpoints: EndpointReport,
) -> Result<(HostInfo, Vec<SocketAddr>), ClientError> {
    let hash = token.secret.hash();
    let limit = if token.addresses().len() > 1 {
        FAILOVER_TIMEOUT
    } else {
        TIMEOUT
    };
    let mut o = open(
        addr,
        &token.coordinator_key,
        key,
        KnockAs::JoinToken(&hash),
        endpoint,
        None,
        limit,
    )
    .await?;
    let msg = AgentMessage::Enrol {
        protocol: PROTOCOL_VERSION,
        secret: token.secret.clone(),
        name: name.to_string(),
        endpoints,
    };
    let host = async {
        o.writer.send(&msg).await?;
        match timed(o.reader.recv::<CoordinatorMessage>()).await? {
            CoordinatorMessage::Welcome { host, replicas, .. } => Ok((host, replicas)),
            CoordinatorMessage::Error { code, message } => {
                Err(ClientError::Refused { code, message })
            }
            other => Err(ClientError::Protocol(format!(
                "expected welcome, got {other:?}"
            ))),
        }
    }
    .await;
    o.conn.close(quinn::VarInt::from_u32(0), b"enrolled");
    host
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unanswered handshake is knocked for again soon (a lost knock costs 400 ms), once
    /// more after a replica has had time to follow (1.2 s), and then not: within the 10 s
    /// time-out an agent knocks twice more, not 25 times.
    #[test]
    fn knocks_again_soon_then_once_more_and_stops() {
        let waits: Vec<u64> = reknock_waits().map(|w| w.as_millis() as u64).collect();
        assert_eq!(waits, [400, 800]);
    }
}
