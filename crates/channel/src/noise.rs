//! Noise (`Noise_IK_25519_ChaChaPoly_BLAKE2s`) over one QUIC bidirectional stream.
//!
//! The agent is the initiator with its WireGuard static key and pins the coordinator's static
//! key; the coordinator is the responder and learns (authenticated) the agent's key. Every Noise
//! message on the stream is a 2-byte big-endian length then the message (at most 65535 bytes).
//! Application frames (`meshd_control::proto`) are chunked into transport messages; each
//! direction keeps its own nonce, so reader and writer halves run independently.

use std::sync::Arc;

use meshd_control::proto::{encode_frame, release_buffer, FrameDecoder, FrameError};
use meshd_tunnel::{PrivateKey, PublicKey};
use serde::de::DeserializeOwned;
use serde::Serialize;
use snow::StatelessTransportState;

/// The Noise protocol name.
pub const NOISE_PARAMS: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
const PROLOGUE: &[u8] = b"meshd-control/1";
const MAX_MSG: usize = 65535;
const TAG: usize = 16;
const MAX_PLAIN: usize = MAX_MSG - TAG;

/// Why the secure channel failed.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The peer closed the stream.
    #[error("control stream closed")]
    Closed,
    /// Reading the stream failed.
    #[error("control stream read: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing the stream failed.
    #[error("control stream write: {0}")]
    Write(#[from] quinn::WriteError),
    /// Noise handshake or decryption failure (wrong key, tampering, not a meshd peer).
    #[error("noise: {0}")]
    Noise(#[from] snow::Error),
    /// Framing failure (oversized or malformed message).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A zero-length Noise message.
    #[error("empty noise message")]
    Empty,
}

fn params() -> snow::params::NoiseParams {
    // The constant is a valid pattern name; parsing cannot fail (checked by a test).
    NOISE_PARAMS
        .parse()
        .unwrap_or_else(|_| unreachable!("valid noise params"))
}

async fn read_msg(recv: &mut quinn::RecvStream, buf: &mut Vec<u8>) -> Result<(), ChannelError> {
    let mut len = [0u8; 2];
    read_exact(recv, &mut len).await?;
    let n = usize::from(u16::from_be_bytes(len));
    if n == 0 {
        return Err(ChannelError::Empty);
    }
    buf.resize(n, 0);
    read_exact(recv, buf).await
}

async fn read_exact(recv: &mut quinn::RecvStream, buf: &mut [u8]) -> Result<(), ChannelError> {
    recv.read_exact(buf).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(_) => ChannelError::Closed,
        quinn::ReadExactError::ReadError(e) => ChannelError::Read(e),
    })
}

async fn write_msg(send: &mut quinn::SendStream, msg: &[u8]) -> Result<(), ChannelError> {
    // msg.len() <= MAX_MSG by construction.
    let len = u16::try_from(msg.len()).map_err(|_| ChannelError::Empty)?;
    send.write_all(&len.to_be_bytes()).await?;
    send.write_all(msg).await?;
    Ok(())
}

/// Sending half.
pub struct NoiseWriter {
    send: quinn::SendStream,
    state: Arc<StatelessTransportState>,
    nonce: u64,
    max_frame: usize,
    buf: Vec<u8>,
}

/// Receiving half.
pub struct NoiseReader {
    recv: quinn::RecvStream,
    inbound: Inbound,
    cipher: Vec<u8>,
}

/// The receiving half's sans-IO core: Noise transport messages in (in stream order),
/// application messages out. [`NoiseReader`] feeds it from the stream; the fuzz targets
/// (`crates/fuzz-targets`) feed it directly.
pub struct Inbound {
    state: Arc<StatelessTransportState>,
    nonce: u64,
    decoder: FrameDecoder,
    plain: Vec<u8>,
}

impl Inbound {
    /// Opens messages of `state`'s receiving direction from nonce 0, refusing application
    /// frames longer than `max_frame`.
    pub fn new(state: Arc<StatelessTransportState>, max_frame: usize) -> Inbound {
        Inbound {
            state,
            nonce: 0,
            decoder: FrameDecoder::new(max_frame),
            plain: Vec::new(),
        }
    }

    /// Decrypts the next Noise transport message and buffers its plaintext.
    pub fn push(&mut self, cipher: &[u8]) -> Result<(), ChannelError> {
        if cipher.is_empty() {
            return Err(ChannelError::Empty);
        }
        self.plain.resize(cipher.len(), 0);
        let n = self
            .state
            .read_message(self.nonce, cipher, &mut self.plain)?;
        self.nonce += 1;
        let pushed = self.decoder.push(&self.plain[..n]);
        self.plain.clear();
        release_buffer(&mut self.plain);
        Ok(pushed?)
    }

    /// The next complete application message, if one is buffered.
    pub fn next_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ChannelError> {
        Ok(self.decoder.next_message()?)
    }
}

impl NoiseWriter {
    /// Encrypts and writes one application message.
    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), ChannelError> {
        let frame = encode_frame(msg, self.max_frame)?;
        for chunk in frame.chunks(MAX_PLAIN) {
            self.buf.resize(chunk.len() + TAG, 0);
            let n = self.state.write_message(self.nonce, chunk, &mut self.buf)?;
            self.nonce += 1;
            let (send, buf) = (&mut self.send, &self.buf[..n]);
            write_msg(send, buf).await?;
        }
        // A full map's 64 KiB chunk buffer is not kept for the small messages that follow.
        self.buf.clear();
        release_buffer(&mut self.buf);
        Ok(())
    }

    /// Encrypts and writes raw plaintext bytes as one application chunk, bypassing framing
    /// (for tests of the peer's handling of malformed input).
    #[doc(hidden)]
    pub async fn send_raw(&mut self, plaintext: &[u8]) -> Result<(), ChannelError> {
        for chunk in plaintext.chunks(MAX_PLAIN) {
            self.buf.resize(chunk.len() + TAG, 0);
            let n = self.state.write_message(self.nonce, chunk, &mut self.buf)?;
            self.nonce += 1;
            let (send, buf) = (&mut self.send, &self.buf[..n]);
            write_msg(send, buf).await?;
        }
        Ok(())
    }

    /// Finishes the stream and waits (up to `wait`) until the peer has received everything.
    pub async fn finish(&mut self, wait: std::time::Duration) {
        if self.send.finish().is_ok() {
            let _timeout_or_stopped = tokio::time::timeout(wait, self.send.stopped()).await;
        }
    }
}

impl NoiseReader {
    /// Reads, decrypts and decodes the next application message. Not cancel-safe: run it in
    /// its own task.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<T, ChannelError> {
        loop {
            if let Some(m) = self.inbound.next_message()? {
                return Ok(m);
            }
            read_msg(&mut self.recv, &mut self.cipher).await?;
            self.inbound.push(&self.cipher)?;
            self.cipher.clear();
            release_buffer(&mut self.cipher);
        }
    }
}

fn halves(
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    state: StatelessTransportState,
    max_send: usize,
    max_recv: usize,
) -> (NoiseReader, NoiseWriter) {
    let state = Arc::new(state);
    (
        NoiseReader {
            recv,
            inbound: Inbound::new(state.clone(), max_recv),
            cipher: Vec::new(),
        },
        NoiseWriter {
            send,
            state,
            nonce: 0,
            max_frame: max_send,
            buf: Vec::new(),
        },
    )
}

/// Agent side: handshake as initiator, pinning `remote`.
pub async fn initiate(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    local: &PrivateKey,
    remote: &PublicKey,
    max_send: usize,
    max_recv: usize,
) -> Result<(NoiseReader, NoiseWriter), ChannelError> {
    let mut hs = initiator(local, remote)?;
    let mut buf = vec![0u8; MAX_MSG];
    let n = hs.write_message(&[], &mut buf)?;
    write_msg(&mut send, &buf[..n]).await?;
    let mut msg = Vec::new();
    read_msg(&mut recv, &mut msg).await?;
    hs.read_message(&msg, &mut buf)?;
    let st = hs.into_stateless_transport_mode()?;
    Ok(halves(send, recv, st, max_send, max_recv))
}

/// Coordinator side: handshake as responder; returns the agent's proven static key.
pub async fn respond(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    local: &PrivateKey,
    max_send: usize,
    max_recv: usize,
) -> Result<(NoiseReader, NoiseWriter, PublicKey), ChannelError> {
    let mut msg = Vec::new();
    read_msg(&mut recv, &mut msg).await?;
    let (mut hs, remote) = read_initiation(local, &msg)?;
    let mut buf = vec![0u8; MAX_MSG];
    let n = hs.write_message(&[], &mut buf)?;
    write_msg(&mut send, &buf[..n]).await?;
    let st = hs.into_stateless_transport_mode()?;
    let (r, w) = halves(send, recv, st, max_send, max_recv);
    Ok((r, w, remote))
}

/// Coordinator side, sans IO: reads the agent's first handshake message (any bytes a stranger
/// sends) as responder with `local`; returns the handshake, ready to write its answer, and the
/// agent's proven static key.
pub fn read_initiation(
    local: &PrivateKey,
    msg: &[u8],
) -> Result<(snow::HandshakeState, PublicKey), ChannelError> {
    let sk = local.to_bytes();
    let mut hs = snow::Builder::new(params())
        .local_private_key(&sk)?
        .prologue(PROLOGUE)?
        .build_responder()?;
    let mut buf = vec![0u8; MAX_MSG];
    hs.read_message(msg, &mut buf)?;
    let remote = hs
        .get_remote_static()
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .map(PublicKey)
        .ok_or(ChannelError::Noise(snow::Error::Input))?;
    Ok((hs, remote))
}

/// Agent side, sans IO: the initiator's handshake state with `local`, pinning `remote`
/// (write its first message, read the answer, then `into_stateless_transport_mode`).
pub fn initiator(
    local: &PrivateKey,
    remote: &PublicKey,
) -> Result<snow::HandshakeState, ChannelError> {
    let sk = local.to_bytes();
    Ok(snow::Builder::new(params())
        .local_private_key(&sk)?
        .remote_public_key(remote.as_bytes())?
        .prologue(PROLOGUE)?
        .build_initiator()?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn params_parse() {
        let _ = super::params();
    }
}
