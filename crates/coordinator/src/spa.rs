//! The dark control port: a wrapper around the control endpoint's UDP socket (quinn's
//! [`AsyncUdpSocket`]) that hands quinn only datagrams from source addresses and ports that
//! knocked ([`meshd_channel::spa`]).
//!
//! Datagrams from any other source are dropped before quinn sees them: no handshake, no
//! version negotiation, no stateless reset, and (the socket stays open) no ICMP port
//! unreachable. A valid knock opens its source `addr:port` for `window`; every datagram from an
//! open source pushes its expiry on (QUIC keep-alives every 2 s keep established connections
//! open), so the established path costs one hash lookup per datagram, under one uncontended
//! lock per receive batch (only the endpoint driver receives). Knocks themselves never reach
//! quinn either.
//!
//! Who may knock is a [`SpaView`] the actor swaps in whole when hosts or tokens change (read
//! lock-free here). The replay cache is saved to `<state-dir>/spa-replay` (0600, atomically) a
//! moment after each accepted knock and at stop, and loaded at start.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use meshd_channel::spa::{looks_like_knock, Gate, KnockError, KnockKind, SpaView};
use meshd_control::model::Host;
use meshd_control::state::CoordinatorState;
use meshd_tunnel::PrivateKey;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::guard::LogLimiter;
use crate::options::SpaSettings;

/// The replay cache file in the state directory.
pub const REPLAY_FILE: &str = "spa-replay";
/// Most sources open at once (a knock beyond is refused as `cache_full`).
const MAX_OPEN: usize = 65_536;
/// How often expired openings are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// How long after an accepted knock the replay cache is saved (knocks in between share a
/// write).
const SAVE_DELAY: Duration = Duration::from_millis(50);
/// Knock verifications per second at most (two X25519 operations each); more are dropped
/// unchecked and counted as `rate_limited`.
const KNOCKS_PER_SEC: u32 = 2_000;
/// Receive batches read per `poll_recv` when everything is dropped.
const RECV_ROUNDS: usize = 8;

/// Counters (`meshd_coordinator_spa_*` in the metrics).
#[derive(Debug, Default)]
pub struct SpaCounters {
    /// Datagrams from sources that had not knocked, dropped.
    pub dropped: AtomicU64,
    /// Knocks accepted, by kind (host, join token, admin).
    pub accepted: [AtomicU64; 3],
    /// Knocks refused, by [`KnockError::ALL`] index.
    pub refused: [AtomicU64; KnockError::ALL.len()],
    /// Knock-shaped datagrams dropped unchecked over the rate limit.
    pub rate_limited: AtomicU64,
    /// Admin API connections closed because the source had not knocked as admin.
    pub admin_refused: AtomicU64,
    /// Sources open now.
    pub open: AtomicU64,
}

fn kind_index(k: KnockKind) -> usize {
    match k {
        KnockKind::Host => 0,
        KnockKind::JoinToken => 1,
        KnockKind::Admin => 2,
    }
}

fn reason_index(e: KnockError) -> usize {
    KnockError::ALL.iter().position(|x| *x == e).unwrap_or(0)
}

impl SpaCounters {
    /// Refusals of one cause.
    pub fn refused(&self, e: KnockError) -> u64 {
        self.refused[reason_index(e)].load(Ordering::Relaxed)
    }
    /// Accepted knocks of one kind.
    pub fn accepted(&self, k: KnockKind) -> u64 {
        self.accepted[kind_index(k)].load(Ordering::Relaxed)
    }
}

struct FilterState {
    gate: Gate,
    /// Open sources and when they close.
    open: HashMap<SocketAddr, Instant>,
    /// IPs that knocked as admin and until when (the admin API's TCP filter).
    admin_ips: HashMap<IpAddr, Instant>,
    last_sweep: Instant,
    /// The rate limit's second and its count.
    rate_second: Instant,
    rate_count: u32,
    replay_log: LogLimiter,
}

/// The filter's shared state: the knock gate, the open sources, the view, the counters.
pub struct SpaFilter {
    view: ArcSwap<SpaView>,
    state: Mutex<FilterState>,
    /// Counters.
    pub counters: SpaCounters,
    window: Duration,
    save: Notify,
    replay_path: PathBuf,
}

impl fmt::Debug for SpaFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpaFilter")
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl SpaFilter {
    /// A filter for the coordinator key `key` with `settings`; the replay cache is loaded from
    /// `<state_dir>/spa-replay` (a missing or unreadable file: an empty cache, logged).
    pub fn new(key: PrivateKey, settings: &SpaSettings, state_dir: &std::path::Path) -> Self {
        let skew_ms = settings.skew_secs.saturating_mul(1000);
        let mut gate = Gate::new(key, skew_ms, settings.replay_capacity);
        let replay_path = state_dir.join(REPLAY_FILE);
        match std::fs::read(&replay_path) {
            Ok(b) => {
                gate.replay_mut().load(meshd_time::unix_millis(), &b);
                debug!(nonces = gate.replay().len(), "SPA replay cache loaded");
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => warn!(path = %replay_path.display(), error = %e,
                "reading the SPA replay cache failed; starting with an empty one"),
        }
        let now = Instant::now();
        SpaFilter {
            view: ArcSwap::from_pointee(SpaView::default()),
            state: Mutex::new(FilterState {
                gate,
                open: HashMap::new(),
                admin_ips: HashMap::new(),
                last_sweep: now,
                rate_second: now,
                rate_count: 0,
                replay_log: LogLimiter::new(Duration::from_secs(crate::guard::LOG_EVERY_SECS)),
            }),
            counters: SpaCounters::default(),
            window: Duration::from_secs(settings.window_secs),
            save: Notify::new(),
            replay_path,
        }
    }

    fn lock(&self) -> MutexGuard<'_, FilterState> {
        // A panic while holding it leaves plain maps behind: keep using them.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Swaps in who may knock.
    pub fn set_view(&self, view: SpaView) {
        self.view.store(Arc::new(view));
    }

    /// Whether `ip` knocked as admin within the window (the admin API's check).
    pub fn admin_allowed(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let ip = canonical(ip);
        let ok = self.lock().admin_ips.get(&ip).is_some_and(|t| *t > now);
        if !ok {
            self.counters.admin_refused.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Filters one received batch in place: keeps datagrams from open sources (refreshing
    /// them), takes knocks, drops the rest; returns how many of `n` remain (moved to the
    /// front).
    fn filter(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta], n: usize) -> usize {
        let now = Instant::now();
        let mut st = self.lock();
        let st = &mut *st;
        let mut kept = 0;
        let mut unix_ms = None;
        for i in 0..n.min(meta.len()).min(bufs.len()) {
            let m = meta[i];
            if let Some(exp) = st.open.get_mut(&m.addr) {
                if *exp > now {
                    *exp = now + self.window;
                    if kept != i {
                        move_datagram(bufs, meta, i, kept);
                    }
                    kept += 1;
                    continue;
                }
            }
            // Not open: a knock or nothing.
            let len = m.len.min(bufs[i].len());
            let stride = if m.stride == 0 { len } else { m.stride };
            let data = &bufs[i][..len];
            let mut knocked = false;
            for d in data.chunks(stride.max(1)) {
                if !looks_like_knock(d) {
                    continue;
                }
                if now.duration_since(st.rate_second) >= Duration::from_secs(1) {
                    st.rate_second = now;
                    st.rate_count = 0;
                }
                if st.rate_count >= KNOCKS_PER_SEC {
                    self.counters.rate_limited.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                st.rate_count += 1;
                let ms = *unix_ms.get_or_insert_with(meshd_time::unix_millis);
                let view = self.view.load();
                match st.gate.check(ms, d, &view) {
                    Ok(a) => {
                        if st.open.len() >= MAX_OPEN && !st.open.contains_key(&m.addr) {
                            sweep(st, now);
                        }
                        if st.open.len() >= MAX_OPEN && !st.open.contains_key(&m.addr) {
                            self.counters.refused[reason_index(KnockError::CacheFull)]
                                .fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        st.open.insert(m.addr, now + self.window);
                        if a.kind == KnockKind::Admin {
                            st.admin_ips
                                .insert(canonical(m.addr.ip()), now + self.window);
                        }
                        self.counters.accepted[kind_index(a.kind)].fetch_add(1, Ordering::Relaxed);
                        info!(source = %m.addr, kind = a.kind.as_str(), peer_key = %a.static_key,
                            "spa knock accepted");
                        knocked = true;
                        self.save.notify_one();
                    }
                    Err(e) => {
                        self.counters.refused[reason_index(e)].fetch_add(1, Ordering::Relaxed);
                        if matches!(e, KnockError::Replay | KnockError::Skew) {
                            if let Some(since_last) = st.replay_log.hit(now) {
                                warn!(source = %m.addr, reason = e.as_str(), since_last,
                                    "spa knock refused (replayed or outside the clock skew)");
                            }
                        } else {
                            debug!(source = %m.addr, reason = e.as_str(), "spa knock refused");
                        }
                    }
                }
            }
            if !knocked {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        if now.duration_since(st.last_sweep) >= SWEEP_EVERY {
            sweep(st, now);
        }
        self.counters
            .open
            .store(st.open.len() as u64, Ordering::Relaxed);
        kept
    }

    /// [`SpaFilter::filter`] itself, for the cost benchmark (`examples/spa_cost.rs`); not API.
    #[doc(hidden)]
    pub fn filter_batch(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
        n: usize,
    ) -> usize {
        self.filter(bufs, meta, n)
    }

    /// Saves the replay cache now (blocking file IO).
    fn save_now(&self) {
        let bytes = self.lock().gate.replay().to_bytes();
        if let Err(e) = meshd_config::fsutil::write_private_atomic(&self.replay_path, &bytes) {
            warn!(path = %self.replay_path.display(), error = %e, "saving the SPA replay cache failed");
        }
    }
}

/// Drops expired openings (and prunes the replay cache's old nonces).
fn sweep(st: &mut FilterState, now: Instant) {
    st.open.retain(|_, t| *t > now);
    st.admin_ips.retain(|_, t| *t > now);
    st.gate.replay_mut().prune(meshd_time::unix_millis());
    st.last_sweep = now;
}

/// An IPv4-mapped IPv6 address as IPv4 (a dual-stack admin listener sees those).
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Moves datagram `from` to slot `to` (< `from`): its bytes and its metadata.
fn move_datagram(bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta], from: usize, to: usize) {
    let (head, tail) = bufs.split_at_mut(from);
    let len = meta[from].len.min(tail[0].len()).min(head[to].len());
    head[to][..len].copy_from_slice(&tail[0][..len]);
    meta[to] = meta[from];
    meta[to].len = len;
}

/// Saves the replay cache a moment after accepted knocks, until `stop`; once more at the end.
pub(crate) async fn save_loop(
    filter: Arc<SpaFilter>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            () = filter.save.notified() => {}
            _ = stop.wait_for(|v| *v) => break,
        }
        tokio::time::sleep(SAVE_DELAY).await;
        let f = filter.clone();
        let _joined = tokio::task::spawn_blocking(move || f.save_now()).await;
    }
    let f = filter.clone();
    let _joined = tokio::task::spawn_blocking(move || f.save_now()).await;
}

/// The view of who may knock, from the coordinator's state.
pub(crate) fn view_of(state: &CoordinatorState) -> SpaView {
    let mut v = SpaView {
        hosts: state
            .hosts()
            // Removed and revoked hosts too: the key proves who they are, and the coordinator
            // then tells them so (`HostRevoked`, `HostRemoved`: the agent stops) rather than
            // leaving them to retry in the dark forever. A host mid-rotation reconnects with
            // its next key: it must be able to knock with it.
            .flat_map(|h: &Host| std::iter::once(h.public_key).chain(h.pending_key))
            .collect(),
        ..SpaView::default()
    };
    // Every token the coordinator knows, also used-up, expired and revoked ones: whoever
    // holds one is no stranger (it proves it holds the secret), and the coordinator then tells
    // it exactly why it is refused (`TokenUsedUp`, …) instead of leaving it to time out.
    for t in state.tokens() {
        v.add_join_token(t.secret_hash, None);
    }
    // Admin tokens: only those not revoked, each until its expiry (the filter checks it per
    // knock: past the last millisecond before `expires_at`, as the admin API refuses it from
    // `expires_at` on), so a revoked or expired admin token no longer opens the admin port.
    for t in state.admin_tokens().iter() {
        if t.revoked_at.is_none() {
            let last_ms = t
                .expires_at
                .map(|e| e.saturating_mul(1000).saturating_sub(1));
            v.add_admin_token(t.hash, last_ms);
        }
    }
    v
}

/// Parses a hex SHA-256 (how the admin token hash is stored).
pub(crate) fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let b = s.trim().as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        let hi = (b[2 * i] as char).to_digit(16)?;
        let lo = (b[2 * i + 1] as char).to_digit(16)?;
        *o = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(out)
}

/// The control endpoint's socket behind the filter.
pub struct SpaSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    filter: Arc<SpaFilter>,
}

impl fmt::Debug for SpaSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpaSocket")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl SpaSocket {
    /// Wraps `inner` (quinn's socket) with `filter`.
    pub fn new(inner: Arc<dyn AsyncUdpSocket>, filter: Arc<SpaFilter>) -> Self {
        SpaSocket { inner, filter }
    }
}

impl AsyncUdpSocket for SpaSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        // A batch whose datagrams were all dropped: read on (until the socket would block,
        // which registers the waker), a few batches at most, then hand quinn an empty batch
        // so its own work limit and other tasks get their turn under a flood.
        for _ in 0..RECV_ROUNDS {
            match self.inner.poll_recv(cx, bufs, meta) {
                Poll::Ready(Ok(n)) => {
                    let kept = self.filter.filter(bufs, meta, n);
                    if kept > 0 {
                        return Poll::Ready(Ok(kept));
                    }
                }
                other => return other,
            }
        }
        Poll::Ready(Ok(0))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshd_channel::spa::{make_knock, KnockAs, DEFAULT_SKEW_MS};
    use meshd_control::state::AdminToken;
    use meshd_control::token::hash_secret;

    #[test]
    fn revoked_and_expired_admin_tokens_no_longer_knock() {
        let hash = |s: &str| hash_secret(s.as_bytes());
        let token = |name: &str, expires_at, revoked_at| AdminToken {
            name: name.into(),
            hash: hash(name),
            created_at: 1_000,
            expires_at,
            revoked_at,
        };
        let mut state = CoordinatorState::new("100.64.0.0/24".parse().unwrap(), None).unwrap();
        state.restore_admin_tokens(vec![
            token("bootstrap", None, Some(1_500)),
            token("ops", None, None),
            token("ci", Some(2_000), None),
        ]);
        let view = view_of(&state);
        let coord = PrivateKey::from_bytes([1; 32]);
        let local = PrivateKey::from_bytes([2; 32]);
        let mut gate = Gate::new(coord.clone(), DEFAULT_SKEW_MS, 64);
        let mut nonce = 0u8;
        let mut knock = |name: &str, at_secs: u64| {
            nonce += 1;
            let ms = at_secs * 1000;
            let k = make_knock(
                &coord.public_key(),
                &local,
                KnockAs::Admin(&hash(name)),
                ms,
                [nonce; 16],
            )
            .unwrap();
            gate.check(ms, &k, &view).map(|a| a.kind)
        };
        assert_eq!(knock("ops", 1_900), Ok(KnockKind::Admin));
        assert_eq!(knock("ci", 1_999), Ok(KnockKind::Admin));
        assert_eq!(knock("ci", 2_000), Err(KnockError::UnknownToken), "expired");
        assert_eq!(
            knock("bootstrap", 1_900),
            Err(KnockError::UnknownToken),
            "revoked"
        );
    }
}
