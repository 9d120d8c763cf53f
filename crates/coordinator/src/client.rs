//! Agent-side client: enrol with a join token, then keep one long-lived session that follows
//! the network map.
//!
//! ```no_run
//! # async fn f(token: meshd_control::JoinToken, key: meshd_tunnel::PrivateKey) -> Result<(), Box<dyn std::error::Error>> {
//! use meshd_coordinator::client::{enrol, spawn_session, SessionConfig};
//! use meshd_control::proto::EndpointReport;
//! let ep = EndpointReport { addrs: vec![], listen_port: Some(51820), transparent: false };
//! let e = enrol(&token, "db1", &key, ep.clone()).await?;          // persist e.coordinator + key
//! let s = spawn_session(SessionConfig::new(e.coordinator, e.coordinator_key, key, ep));
//! let mut maps = s.map();
//! while maps.changed().await.is_ok() { /* program tunnels from maps.borrow() */ }
//! # Ok(()) }
//! ```

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use meshd_control::proto::{
    AgentMessage, CoordinatorMessage, EndpointReport, ErrorCode, HostInfo, MAX_AGENT_FRAME,
    MAX_COORDINATOR_FRAME, PROTOCOL_VERSION,
};
use meshd_control::{JoinToken, NetworkMap};
use meshd_tunnel::{PrivateKey, PublicKey};
use rand_core::{OsRng, RngCore as _};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::noise::{self, ChannelError, NoiseReader, NoiseWriter};
use crate::quic;

const TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnect backoff cap.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
const BASE_BACKOFF: Duration = Duration::from_millis(100);

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
    /// The coordinator's control address.
    pub coordinator: SocketAddr,
    /// The coordinator's static key (pin it).
    pub coordinator_key: PublicKey,
}

/// A client QUIC endpoint bound to `bind` (share one between many sessions if you like).
pub fn client_endpoint(bind: SocketAddr) -> Result<quinn::Endpoint, ClientError> {
    let mut ep = quinn::Endpoint::client(bind)?;
    ep.set_default_client_config(
        quic::client_config().map_err(|e| ClientError::Setup(format!("{e:#}")))?,
    );
    Ok(ep)
}

/// Like [`client_endpoint`], with the socket's packets carrying firewall mark `fwmark`
/// (`SO_MARK`): transparent mode's policy routing lets marked packets bypass the tunnel, so
/// the control connection to a coordinator on a peer's address is not steered into it.
pub fn client_endpoint_marked(
    bind: SocketAddr,
    fwmark: Option<u32>,
) -> Result<quinn::Endpoint, ClientError> {
    let Some(mark) = fwmark else {
        return client_endpoint(bind);
    };
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(bind),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    sock.set_mark(mark)?;
    sock.bind(&bind.into())?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| ClientError::Setup("no async runtime for the QUIC endpoint".into()))?;
    let mut ep =
        quinn::Endpoint::new(quinn::EndpointConfig::default(), None, sock.into(), runtime)?;
    ep.set_default_client_config(
        quic::client_config().map_err(|e| ClientError::Setup(format!("{e:#}")))?,
    );
    Ok(ep)
}

fn wildcard_for(addr: SocketAddr) -> SocketAddr {
    if addr.is_ipv4() {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
    }
}

struct Open {
    conn: quinn::Connection,
    reader: NoiseReader,
    writer: NoiseWriter,
    _endpoint: quinn::Endpoint,
}

async fn timed<T, E>(f: impl std::future::Future<Output = Result<T, E>>) -> Result<T, ClientError>
where
    ClientError: From<E>,
{
    tokio::time::timeout(TIMEOUT, f)
        .await
        .map_err(|_| ClientError::Timeout)?
        .map_err(Into::into)
}

async fn open(
    addr: SocketAddr,
    coordinator_key: &PublicKey,
    key: &PrivateKey,
    endpoint: Option<&quinn::Endpoint>,
    fwmark: Option<u32>,
) -> Result<Open, ClientError> {
    let ep = match endpoint {
        Some(e) => e.clone(),
        None => client_endpoint_marked(wildcard_for(addr), fwmark)?,
    };
    let conn = timed(ep.connect(addr, "meshd-coordinator")?).await?;
    let (send, recv) = timed(conn.open_bi()).await?;
    let (reader, writer) = tokio::time::timeout(
        TIMEOUT,
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
        _endpoint: ep,
    })
}

async fn hello(o: &mut Open, msg: AgentMessage) -> Result<HostInfo, ClientError> {
    o.writer.send(&msg).await?;
    match timed(o.reader.recv::<CoordinatorMessage>()).await? {
        CoordinatorMessage::Welcome { host, .. } => Ok(host),
        CoordinatorMessage::Error { code, message } => Err(ClientError::Refused { code, message }),
        other => Err(ClientError::Protocol(format!(
            "expected welcome, got {other:?}"
        ))),
    }
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

/// [`enrol`] over a given client endpoint (`None`: a fresh one).
pub async fn enrol_via(
    endpoint: Option<&quinn::Endpoint>,
    token: &JoinToken,
    name: &str,
    key: &PrivateKey,
    endpoints: EndpointReport,
) -> Result<Enrolment, ClientError> {
    let mut o = open(token.control, &token.coordinator_key, key, endpoint, None).await?;
    let host = hello(
        &mut o,
        AgentMessage::Enrol {
            protocol: PROTOCOL_VERSION,
            secret: token.secret.clone(),
            name: name.to_string(),
            endpoints,
        },
    )
    .await;
    o.conn.close(quinn::VarInt::from_u32(0), b"enrolled");
    Ok(Enrolment {
        host: host?,
        coordinator: token.control,
        coordinator_key: token.coordinator_key,
    })
}

/// Session parameters.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Coordinator control address.
    pub coordinator: SocketAddr,
    /// Pinned coordinator key.
    pub coordinator_key: PublicKey,
    /// This host's WireGuard private key.
    pub private_key: PrivateKey,
    /// Initial endpoint report.
    pub endpoints: EndpointReport,
    /// Last persisted map (published until the first map arrives; fail-static).
    pub initial_map: Option<NetworkMap>,
    /// A shared client endpoint (`None`: one per session).
    pub endpoint: Option<quinn::Endpoint>,
    /// Firewall mark for the session's own socket (when `endpoint` is `None`).
    pub fwmark: Option<u32>,
}

impl SessionConfig {
    /// A config with no persisted map and its own QUIC socket.
    pub fn new(
        coordinator: SocketAddr,
        coordinator_key: PublicKey,
        private_key: PrivateKey,
        endpoints: EndpointReport,
    ) -> Self {
        SessionConfig {
            coordinator,
            coordinator_key,
            private_key,
            endpoints,
            initial_map: None,
            endpoint: None,
            fwmark: None,
        }
    }
}

/// Where the session is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionState {
    /// Not connected; `attempt` failures in a row so far.
    Connecting {
        /// Consecutive failures.
        attempt: u32,
        /// The last failure.
        last_error: Option<String>,
    },
    /// Connected and following the map.
    Connected {
        /// Our record as the coordinator sent it.
        host: HostInfo,
    },
    /// Refused for good (host removed, unknown host …): the session stopped.
    Refused {
        /// Why.
        code: ErrorCode,
        /// Detail.
        message: String,
    },
    /// Stopped by [`SessionHandle::shutdown`].
    Stopped,
}

/// A running session.
#[derive(Debug)]
pub struct SessionHandle {
    map: watch::Receiver<Option<NetworkMap>>,
    state: watch::Receiver<SessionState>,
    report: watch::Sender<EndpointReport>,
    blocks: mpsc::Sender<Vec<meshd_policy::BlockEvent>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// Batches of block events a session holds while the coordinator is slow or unreachable.
pub const BLOCK_BATCHES_QUEUED: usize = 16;

impl SessionHandle {
    /// The latest network map (`None` until one arrives, unless a persisted one was given).
    pub fn map(&self) -> watch::Receiver<Option<NetworkMap>> {
        self.map.clone()
    }

    /// The session state.
    pub fn state(&self) -> watch::Receiver<SessionState> {
        self.state.clone()
    }

    /// Reports new local underlay endpoints (sent at once if connected, else on reconnect).
    pub fn report_endpoints(&self, addrs: Vec<SocketAddr>) {
        self.report.send_if_modified(|r| {
            let changed = r.addrs != addrs;
            r.addrs = addrs;
            changed
        });
    }

    /// Replaces the whole endpoint report (addresses and listen port).
    pub fn report(&self, report: EndpointReport) {
        self.report.send_if_modified(|r| {
            let changed = *r != report;
            *r = report;
            changed
        });
    }

    /// Queues denied-flow events for the coordinator (`meshctl blocks`); sent in messages of at
    /// most [`meshd_control::proto::MAX_BLOCKS_PER_MESSAGE`] events once connected. A full
    /// queue ([`BLOCK_BATCHES_QUEUED`] batches) hands the batch back: count it and drop it.
    pub fn report_blocks(
        &self,
        events: Vec<meshd_policy::BlockEvent>,
    ) -> Result<(), Vec<meshd_policy::BlockEvent>> {
        if events.is_empty() {
            return Ok(());
        }
        self.blocks.try_send(events).map_err(|e| e.into_inner())
    }

    /// Stops the session and waits for it.
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        let _ = self.task.await;
    }
}

/// Starts a session: connect, `Resume`, follow maps, ack, report endpoints; reconnect with
/// exponential backoff and jitter (capped at [`MAX_BACKOFF`]) until refused for good.
pub fn spawn_session(cfg: SessionConfig) -> SessionHandle {
    let (map_tx, map) = watch::channel(cfg.initial_map.clone());
    let (state_tx, state) = watch::channel(SessionState::Connecting {
        attempt: 0,
        last_error: None,
    });
    let (report, report_rx) = watch::channel(cfg.endpoints.clone());
    let (blocks, blocks_rx) = mpsc::channel(BLOCK_BATCHES_QUEUED);
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(session_loop(
        cfg, map_tx, state_tx, report_rx, blocks_rx, stop_rx,
    ));
    SessionHandle {
        map,
        state,
        report,
        blocks,
        stop,
        task,
    }
}

/// Backoff before reconnect attempt `attempt` (1-based): 100 ms doubling, capped at 5 s, then
/// a random 50–100 % of that.
pub fn backoff(attempt: u32) -> Duration {
    let exp = BASE_BACKOFF.saturating_mul(1u32 << attempt.saturating_sub(1).min(10));
    let d = exp.min(MAX_BACKOFF);
    let frac = 0.5 + f64::from(OsRng.next_u32() % 1000) / 2000.0;
    d.mul_f64(frac)
}

async fn session_loop(
    cfg: SessionConfig,
    map_tx: watch::Sender<Option<NetworkMap>>,
    state_tx: watch::Sender<SessionState>,
    mut report_rx: watch::Receiver<EndpointReport>,
    mut blocks_rx: mpsc::Receiver<Vec<meshd_policy::BlockEvent>>,
    mut stop_rx: watch::Receiver<bool>,
) {
    let mut attempt = 0u32;
    loop {
        let res = tokio::select! {
            r = run_once(&cfg, &map_tx, &state_tx, &mut report_rx, &mut blocks_rx, &mut attempt) => r,
            _ = stop_rx.wait_for(|v| *v) => break,
        };
        let last_error = match res {
            Err(ClientError::Refused { code, message }) if !code.is_retryable() => {
                warn!(%code, %message, "coordinator refused this host; session stopped");
                state_tx.send_replace(SessionState::Refused { code, message });
                return;
            }
            Err(e) => {
                debug!(error = %e, "control session ended");
                Some(e.to_string())
            }
            Ok(()) => None,
        };
        attempt = attempt.saturating_add(1);
        state_tx.send_replace(SessionState::Connecting {
            attempt,
            last_error,
        });
        tokio::select! {
            _ = tokio::time::sleep(backoff(attempt)) => {}
            _ = stop_rx.wait_for(|v| *v) => break,
        }
    }
    state_tx.send_replace(SessionState::Stopped);
}

async fn run_once(
    cfg: &SessionConfig,
    map_tx: &watch::Sender<Option<NetworkMap>>,
    state_tx: &watch::Sender<SessionState>,
    report_rx: &mut watch::Receiver<EndpointReport>,
    blocks_rx: &mut mpsc::Receiver<Vec<meshd_policy::BlockEvent>>,
    attempt: &mut u32,
) -> Result<(), ClientError> {
    let mut o = open(
        cfg.coordinator,
        &cfg.coordinator_key,
        &cfg.private_key,
        cfg.endpoint.as_ref(),
        cfg.fwmark,
    )
    .await?;
    let report = report_rx.borrow_and_update().clone();
    let host = hello(
        &mut o,
        AgentMessage::Resume {
            protocol: PROTOCOL_VERSION,
            endpoints: report,
        },
    )
    .await?;
    info!(host = %host.name, coordinator = %cfg.coordinator, "control session up");
    state_tx.send_replace(SessionState::Connected { host });
    *attempt = 0;
    let Open {
        conn,
        mut reader,
        mut writer,
        _endpoint,
    } = o;

    let (mtx, mut mrx) = mpsc::channel(16);
    let reader_task = tokio::spawn(async move {
        loop {
            let r = reader.recv::<CoordinatorMessage>().await;
            let end = r.is_err();
            if mtx.send(r).await.is_err() || end {
                break;
            }
        }
    });
    let _abort = AbortOnDrop(reader_task);
    let mut have_full = false;
    let result = loop {
        tokio::select! {
            m = mrx.recv() => match m {
                Some(Ok(CoordinatorMessage::FullMap { map })) => {
                    let v = map.version;
                    map_tx.send_replace(Some(map));
                    have_full = true;
                    writer.send(&AgentMessage::Ack { version: v }).await?;
                }
                Some(Ok(CoordinatorMessage::Delta { delta })) => {
                    let ok = have_full
                        && map_tx.borrow().as_ref().is_some_and(|m| m.version == delta.from_version);
                    if ok {
                        map_tx.send_modify(|m| {
                            if let Some(m) = m.as_mut() {
                                // Checked above: the versions match, so this cannot fail.
                                let _checked = m.apply(&delta);
                            }
                        });
                        writer.send(&AgentMessage::Ack { version: delta.to_version }).await?;
                    } else {
                        warn!(from = delta.from_version, "cannot apply map delta; asking for a full map");
                        have_full = false;
                        writer.send(&AgentMessage::Resync).await?;
                    }
                }
                Some(Ok(CoordinatorMessage::Pong { .. })) => {}
                Some(Ok(CoordinatorMessage::Error { code, message })) => {
                    break Err(ClientError::Refused { code, message });
                }
                Some(Ok(CoordinatorMessage::Welcome { .. })) => {
                    break Err(ClientError::Protocol("second welcome".into()));
                }
                Some(Err(e)) => break Err(ClientError::Channel(e)),
                None => break Err(ClientError::Channel(ChannelError::Closed)),
            },
            r = report_rx.changed() => {
                if r.is_err() {
                    break Ok(());
                }
                let endpoints = report_rx.borrow_and_update().clone();
                writer.send(&AgentMessage::ReportEndpoints { endpoints }).await?;
            }
            Some(events) = blocks_rx.recv() => {
                for chunk in events.chunks(meshd_control::proto::MAX_BLOCKS_PER_MESSAGE) {
                    writer.send(&AgentMessage::Blocks { events: chunk.to_vec() }).await?;
                }
            }
        }
    };
    conn.close(quinn::VarInt::from_u32(0), b"bye");
    result
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
