//! Agent connections: the control endpoint's accept loop (Retry, half-open cap, join-token
//! backoff) and one task per QUIC connection, which runs the Noise handshake, says hello to the
//! actor and then carries messages both ways until either side ends it.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use meshd_control::proto::{
    AgentMessage, CoordinatorMessage, ErrorCode, MAX_AGENT_FRAME, MAX_COORDINATOR_FRAME,
    PROTOCOL_VERSION,
};
use meshd_control::state::{Hello, HelloRefused};
use meshd_tunnel::PrivateKey;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::actor::{Cmd, Commands, Outbound, Refusal, Welcome};
use crate::error::{StartError, Stopped};
use crate::guard::{self, admit_quic, Check, Counters, Guard, LogLimiter, QuicAdmission};
use crate::noise::{self, ChannelError};
use crate::options::Limits;
use crate::quic;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes quinn buffers for one connection attempt not yet accepted (0-RTT and the like).
const INCOMING_BUFFER: u64 = 64 * 1024;
/// Bytes quinn buffers for all of them.
const INCOMING_BUFFER_TOTAL: u64 = 8 * 1024 * 1024;
const OUTBOUND_QUEUE: usize = 256;
/// Longest one message to an agent may take to write: an agent that stops reading (QUIC flow
/// control holds the write) is closed after this, whatever its queue holds.
const OBSERVE_INTERVAL: Duration = Duration::from_millis(250);

/// The control (QUIC) endpoint on `listen`, with quinn's incoming queue and buffers bounded.
/// With `spa`, the socket sits behind the SPA filter (only sources that knocked reach quinn).
pub(crate) fn control_endpoint(
    listen: SocketAddr,
    limits: &Limits,
    spa: Option<Arc<crate::spa::SpaFilter>>,
) -> Result<quinn::Endpoint, StartError> {
    let mut server_config = quic::server_config().map_err(|e| StartError::Quic(e.into()))?;
    server_config
        .max_incoming(limits.quic_max_incoming)
        .incoming_buffer_size(INCOMING_BUFFER)
        .incoming_buffer_size_total(INCOMING_BUFFER_TOTAL);
    let bind_err = |source| StartError::BindControl {
        addr: listen,
        source,
    };
    let socket = std::net::UdpSocket::bind(listen).map_err(bind_err)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| bind_err(std::io::Error::other("no async runtime")))?;
    let mut socket = runtime.wrap_udp_socket(socket).map_err(bind_err)?;
    if let Some(f) = spa {
        socket = Arc::new(crate::spa::SpaSocket::new(socket, f));
    }
    quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        Some(server_config),
        socket,
        runtime,
    )
    .map_err(bind_err)
}

/// Takes the control endpoint's connection attempts: a client whose address is not proven is
/// sent a Retry once `quic_retry_threshold` handshakes are in progress (by default always, so
/// nothing but a Retry, smaller than the client's Initial, goes to an unproven address);
/// `quic_max_half_open` handshakes in progress at most; a source in its join-token backoff is
/// refused. Pressure is logged at most once per 10 s, with counts.
pub(crate) async fn accept_loop(
    endpoint: quinn::Endpoint,
    replicas: Arc<[SocketAddr]>,
    key: Arc<PrivateKey>,
    cmds: Commands,
    mut stop: watch::Receiver<bool>,
    limits: Limits,
    guard: Arc<Guard>,
) {
    let mut pressure = LogLimiter::new(Duration::from_secs(guard::LOG_EVERY_SECS));
    let mut backoff_log = LogLimiter::new(Duration::from_secs(guard::LOG_EVERY_SECS));
    let c = &guard.counters;
    loop {
        let inc = tokio::select! {
            i = endpoint.accept() => match i { Some(i) => i, None => break },
            _ = stop.wait_for(|v| *v) => break,
        };
        let now = std::time::Instant::now();
        let remote = inc.remote_address();
        let half_open =
            usize::try_from(c.quic_half_open.load(Ordering::Relaxed)).unwrap_or(usize::MAX);
        let validated = inc.remote_address_validated();
        // Only a proven address is looked up: a spoofed one is sent a Retry at most.
        let blocked = validated
            && matches!(
                guard::lock(&guard.joins).check(now, remote.ip()),
                Check::Blocked { .. }
            );
        match admit_quic(
            validated,
            half_open,
            blocked,
            limits.quic_retry_threshold,
            limits.quic_max_half_open,
        ) {
            QuicAdmission::Accept => {
                c.half_open_started();
                tokio::spawn(handle_conn(
                    inc,
                    replicas.clone(),
                    key.clone(),
                    cmds.clone(),
                    HalfOpen(guard.clone()),
                ));
            }
            QuicAdmission::Retry => {
                match inc.retry() {
                    Ok(()) => Counters::bump(&c.quic_retries),
                    Err(e) => e.into_incoming().ignore(),
                }
                if half_open > 0 {
                    if let Some(n) = pressure.hit(now) {
                        warn!(half_open, retries = c.quic_retries.load(Ordering::Relaxed),
                            refused = c.quic_refused_full.load(Ordering::Relaxed), since_last = n,
                            "control endpoint: many QUIC handshakes in progress; new clients must prove their address (Retry)");
                    }
                }
            }
            QuicAdmission::RefuseFull => {
                // Counted first: the client may hear of it before this thread goes on.
                Counters::bump(&c.quic_refused_full);
                inc.refuse();
                if let Some(n) = pressure.hit(now) {
                    warn!(
                        half_open,
                        retries = c.quic_retries.load(Ordering::Relaxed),
                        refused = c.quic_refused_full.load(Ordering::Relaxed),
                        since_last = n,
                        "control endpoint: QUIC half-open limit reached; refusing new connections"
                    );
                }
            }
            QuicAdmission::RefuseBackoff => {
                Counters::bump(&c.join_backoff_refused);
                inc.refuse();
                if let Some(n) = backoff_log.hit(now) {
                    warn!(source = %remote.ip(), refused = n,
                        "control endpoint: refusing connections from a source that keeps presenting bad join tokens");
                }
            }
        }
    }
}

/// One QUIC handshake in progress: counted in `quic_half_open` until dropped.
struct HalfOpen(Arc<Guard>);

impl Drop for HalfOpen {
    fn drop(&mut self) {
        self.0.counters.half_open_ended();
    }
}

async fn handle_conn(
    inc: quinn::Incoming,
    replicas: Arc<[SocketAddr]>,
    key: Arc<PrivateKey>,
    cmds: Commands,
    half_open: HalfOpen,
) {
    let remote = inc.remote_address();
    let res = inc.await;
    let guard = half_open.0.clone();
    drop(half_open);
    let conn = match res {
        Ok(c) => c,
        Err(e) => {
            debug!(%remote, error = %e, "QUIC handshake failed");
            return;
        }
    };
    if let Err(e) = serve_conn(&conn, &replicas, &key, &cmds, &guard).await {
        debug!(%remote, error = %e, "control connection ended");
    }
    conn.close(quinn::VarInt::from_u32(0), b"bye");
}

/// Whether a refusal means the join token was wrong (a guess, or one no longer valid).
fn bad_join_token(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::TokenUnknown
            | ErrorCode::TokenExpired
            | ErrorCode::TokenRevoked
            | ErrorCode::TokenUsedUp
    )
}

/// Counts, logs (rate-limited per source) and backs off a bad join token from `ip`.
fn join_token_failed(guard: &Guard, ip: IpAddr, code: ErrorCode) {
    Counters::bump(&guard.counters.join_token_failures);
    let f = guard::lock(&guard.joins).failure(std::time::Instant::now(), ip);
    if let Some(failed) = f.log {
        warn!(source = %ip, ?code, failed, in_a_row = f.failures,
            backoff_secs = f.blocked_for.map(|d| d.as_secs_f64()),
            "control endpoint: enrolment with a bad join token");
    }
}

#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("timed out")]
    Timeout,
    #[error("connection: {0}")]
    Conn(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error("coordinator stopping")]
    Stopping,
}

impl From<Stopped> for ServeError {
    fn from(_: Stopped) -> Self {
        ServeError::Stopping
    }
}

async fn timed<T, E: Into<ServeError>>(
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, ServeError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, f)
        .await
        .map_err(|_| ServeError::Timeout)?
        .map_err(Into::into)
}

async fn refuse(w: &mut noise::NoiseWriter, r: Refusal) {
    let _best_effort = w
        .send(&CoordinatorMessage::Error {
            code: r.code,
            message: r.message,
        })
        .await;
    w.finish(Duration::from_secs(2)).await;
}

async fn serve_conn(
    conn: &quinn::Connection,
    replicas: &[SocketAddr],
    key: &PrivateKey,
    cmds: &Commands,
    guard: &Guard,
) -> Result<(), ServeError> {
    let (send, recv) = timed(conn.accept_bi()).await?;
    let (mut reader, mut writer, agent_key) = timed(noise::respond(
        send,
        recv,
        key,
        MAX_COORDINATOR_FRAME,
        MAX_AGENT_FRAME,
    ))
    .await?;
    let first = match timed(reader.recv::<AgentMessage>()).await {
        Ok(m) => m,
        Err(ServeError::Channel(e @ (ChannelError::Frame(_) | ChannelError::Noise(_)))) => {
            let message = e.to_string();
            refuse(
                &mut writer,
                Refusal {
                    code: ErrorCode::Malformed,
                    message,
                },
            )
            .await;
            return Err(e.into());
        }
        Err(e) => return Err(e),
    };
    let hello = match Hello::from_first(first) {
        Ok(hello) => hello,
        Err(HelloRefused { code, message }) => {
            refuse(&mut writer, Refusal { code, message }).await;
            return Ok(());
        }
    };
    let enrolling = matches!(hello, Hello::Enrol { .. });
    let (tx, mut rx) = mpsc::channel(OUTBOUND_QUEUE);
    let (reply_tx, reply_rx) = oneshot::channel();
    let mut observed = conn.remote_address();
    cmds.send(Cmd::Connect {
        key: agent_key,
        observed: observed.ip(),
        hello,
        tx: tx.clone(),
        conn: conn.clone(),
        reply: reply_tx,
        attempt: 0,
    })
    .await?;
    let Welcome { info, conn: cid } = match reply_rx.await.map_err(|_| ServeError::Stopping)? {
        Ok(w) => w,
        Err(r) => {
            if enrolling && bad_join_token(r.code) {
                join_token_failed(guard, observed.ip(), r.code);
            }
            refuse(&mut writer, r).await;
            return Ok(());
        }
    };
    if enrolling {
        guard::lock(&guard.joins).success(observed.ip());
    }
    let host = info.id;
    let name = info.name.clone();
    writer
        .send(&CoordinatorMessage::Welcome {
            protocol: PROTOCOL_VERSION,
            host: info,
            replicas: replicas.to_vec(),
        })
        .await?;

    let reader_task = {
        let cmds = cmds.clone();
        let tx = tx.clone();
        let name = name.clone();
        // Key rotation proofs are checked here, with the coordinator's key, over the key
        // this connection authenticated (the host's current one).
        let coordinator_key = key.clone();
        let old_key = agent_key;
        tokio::spawn(async move {
            let err = loop {
                let m = match reader.recv::<AgentMessage>().await {
                    Ok(m) => m,
                    Err(e) => break e,
                };
                let cmd = match m {
                    AgentMessage::ReportEndpoints { endpoints } => Cmd::Report {
                        host,
                        conn: cid,
                        endpoints,
                    },
                    AgentMessage::Ack { version } => Cmd::Ack {
                        host,
                        conn: cid,
                        version,
                    },
                    AgentMessage::Resync => Cmd::Resync { host, conn: cid },
                    AgentMessage::Blocks { events } => Cmd::Blocks {
                        host,
                        conn: cid,
                        events,
                    },
                    AgentMessage::Flows {
                        interval_start,
                        records,
                        plaintext,
                        overflow,
                    } => Cmd::Flows {
                        host,
                        conn: cid,
                        interval_start,
                        records,
                        plaintext,
                        overflow,
                    },
                    AgentMessage::KeyProposal {
                        nonce,
                        new_key,
                        proof,
                        succession,
                    } => Cmd::KeyProposal {
                        host,
                        conn: cid,
                        nonce,
                        new_key,
                        succession,
                        proof_ok: meshd_control::rotation::verify(
                            &coordinator_key,
                            &old_key,
                            &new_key,
                            &nonce,
                            &proof,
                        ),
                    },
                    AgentMessage::Ping { nonce } => {
                        // Dropped if the queue is full; the agent pings again.
                        let _queue_full =
                            tx.try_send(Outbound::Msg(CoordinatorMessage::Pong { nonce }));
                        continue;
                    }
                    AgentMessage::Enrol { .. } | AgentMessage::Resume { .. } => {
                        let _ = tx
                            .send(Outbound::Close(Refusal {
                                code: ErrorCode::Malformed,
                                message: "unexpected hello".into(),
                            }))
                            .await;
                        break ChannelError::Closed;
                    }
                };
                if cmds.send(cmd).await.is_err() {
                    break ChannelError::Closed;
                }
            };
            if matches!(
                err,
                ChannelError::Frame(_) | ChannelError::Noise(_) | ChannelError::Empty
            ) {
                warn!(host_id = %host, host = %name, error = %err,
                    "malformed control message; closing this agent's connection");
                let _ = tx
                    .send(Outbound::Close(Refusal {
                        code: ErrorCode::Malformed,
                        message: err.to_string(),
                    }))
                    .await;
            }
            let _ = cmds.send(Cmd::Disconnect { host, conn: cid }).await;
        })
    };
    drop(tx);

    let mut tick = tokio::time::interval(OBSERVE_INTERVAL);
    let result = loop {
        tokio::select! {
            m = rx.recv() => match m {
                Some(Outbound::Msg(msg)) => {
                    match tokio::time::timeout(guard.control_write_timeout, writer.send(&msg)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => break Err(e.into()),
                        Err(_) => {
                            warn!(host_id = %host, host = %name,
                                "agent stopped reading its control stream; closing its connection");
                            conn.close(quinn::VarInt::from_u32(0), b"not reading");
                            break Err(ServeError::Timeout);
                        }
                    }
                }
                Some(Outbound::Close(r)) => {
                    refuse(&mut writer, r).await;
                    break Ok(());
                }
                None => break Ok(()),
            },
            _ = tick.tick() => {
                let now = conn.remote_address();
                if now != observed {
                    observed = now;
                    info!(host_id = %host, host = %name, remote = %now, "agent's observed address changed");
                    if cmds.send(Cmd::Observed { host, conn: cid, ip: now.ip() }).await.is_err() {
                        break Err(ServeError::Stopping);
                    }
                }
            }
            e = conn.closed() => break Err(e.into()),
        }
    };
    reader_task.abort();
    let _ = cmds.send(Cmd::Disconnect { host, conn: cid }).await;
    result
}
