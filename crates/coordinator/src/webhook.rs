//! Alert webhooks: each alert (the scan detector's [`ScanAlert`]) is POSTed as JSON to every
//! configured URL, signed when a secret is configured (`X-Meshd-Signature: sha256=<hex>`, the
//! HMAC-SHA256 of the body), retried with exponential backoff.
//!
//! The actor hands alerts over only after their batch is committed ([`Webhook::send`] never
//! waits): the queue is bounded, a full queue drops the alert (counted and logged). One task
//! delivers, URL after URL, alert after alert; each attempt runs ureq (rustls, the platform's
//! verifier for https) on a blocking thread with a timeout, so no async task blocks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac as _};
use meshd_control::state::ScanAlert;
use sha2::Sha256;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::options::AlertsConfig;

/// The signature header.
pub const SIGNATURE_HEADER: &str = "X-Meshd-Signature";

/// `sha256=<hex>`: HMAC-SHA256 of `body` under `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes keys of any length.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256=");
    for b in tag {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The sending side: what the actor holds.
#[derive(Debug, Clone)]
pub struct Webhook {
    tx: mpsc::Sender<Arc<Vec<u8>>>,
    dropped: Arc<AtomicU64>,
}

struct Worker {
    cfg: AlertsConfig,
    agent: ureq::Agent,
}

impl Webhook {
    /// Starts the delivery task (`None` without URLs). It ends when every [`Webhook`] is
    /// dropped and the queue is drained.
    pub fn spawn(cfg: AlertsConfig) -> Option<Webhook> {
        if cfg.webhook_urls.is_empty() {
            return None;
        }
        let (tx, rx) = mpsc::channel(cfg.queue.max(1));
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_millis(cfg.timeout_ms.max(1))))
            .tls_config(
                ureq::tls::TlsConfig::builder()
                    .provider(ureq::tls::TlsProvider::Rustls)
                    .root_certs(ureq::tls::RootCerts::PlatformVerifier)
                    .build(),
            )
            .build()
            .new_agent();
        tokio::spawn(Worker { cfg, agent }.run(rx));
        Some(Webhook {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Queues an alert for every URL; a full queue drops it (counted, logged).
    pub fn send(&self, alert: &ScanAlert) {
        let body = match serde_json::to_vec(alert) {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "webhook alert could not be encoded; dropped");
                return;
            }
        };
        if self.tx.try_send(Arc::new(body)).is_err() {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            warn!(
                dropped,
                host = %alert.host,
                "webhook queue full; alert dropped"
            );
        }
    }

    /// Alerts dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Worker {
    async fn run(self, mut rx: mpsc::Receiver<Arc<Vec<u8>>>) {
        let worker = Arc::new(self);
        while let Some(body) = rx.recv().await {
            for url in &worker.cfg.webhook_urls {
                worker.clone().deliver(url.clone(), body.clone()).await;
            }
        }
    }

    /// Posts `body` to `url` until it is accepted (2xx) or `max_attempts` are spent, doubling
    /// the wait from `backoff_initial_ms` up to `backoff_max_ms` between attempts.
    async fn deliver(self: Arc<Self>, url: String, body: Arc<Vec<u8>>) {
        let attempts = self.cfg.max_attempts.max(1);
        let mut wait = Duration::from_millis(self.cfg.backoff_initial_ms);
        let max_wait =
            Duration::from_millis(self.cfg.backoff_max_ms.max(self.cfg.backoff_initial_ms));
        for attempt in 1..=attempts {
            let me = self.clone();
            let (u, b) = (url.clone(), body.clone());
            let res = tokio::task::spawn_blocking(move || me.post(&u, &b)).await;
            let error = match res {
                Ok(Ok(status)) if (200..300).contains(&status) => {
                    debug!(url = %url, status, attempt, "webhook delivered");
                    return;
                }
                Ok(Ok(status)) => format!("HTTP status {status}"),
                Ok(Err(e)) => e,
                Err(e) => format!("delivery task failed: {e}"),
            };
            if attempt == attempts {
                warn!(url = %url, attempts, error = %error, "webhook delivery failed; alert dropped");
                return;
            }
            debug!(url = %url, attempt, error = %error, retry_in_ms = wait.as_millis() as u64, "webhook attempt failed; retrying");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(max_wait);
        }
    }

    /// One attempt (blocking): the response status, or why there was none.
    fn post(&self, url: &str, body: &[u8]) -> Result<u16, String> {
        let mut req = self
            .agent
            .post(url)
            .header("Content-Type", "application/json")
            .header(
                "User-Agent",
                concat!("meshd-coordinator/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(secret) = &self.cfg.secret {
            req = req.header(SIGNATURE_HEADER, signature(secret.as_bytes(), body));
        }
        req.send(body)
            .map(|r| r.status().as_u16())
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};
    use std::net::TcpListener;

    fn alert() -> ScanAlert {
        ScanAlert {
            kind: "scan_detected".into(),
            at: 5,
            host: "h1".into(),
            host_id: meshd_control::HostId(1),
            labels: Default::default(),
            action: "quarantine".into(),
            reason: "r".into(),
            distinct_pairs: 9,
            top_peer: "h2".into(),
            top_peer_ports: 9,
            window_secs: 60,
            sample: vec![],
        }
    }

    /// One request read off a connection: its headers (lower-case names) and body.
    fn read_request(s: &mut std::net::TcpStream) -> (Vec<(String, String)>, Vec<u8>) {
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut headers = Vec::new();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.starts_with("POST /hook "), "{line}");
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            if line.trim().is_empty() {
                break;
            }
            let (k, v) = line.split_once(':').unwrap();
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .map(|(_, v)| v.parse().unwrap())
            .unwrap();
        let mut body = vec![0; len];
        r.read_exact(&mut body).unwrap();
        (headers, body)
    }

    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn posts_signed_json_and_retries_after_a_500() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let receiver = std::thread::spawn(move || {
            let mut seen = Vec::new();
            // First attempt: 500; second: 200. Bounded: two connections.
            for status in ["500 Internal Server Error", "200 OK"] {
                listener.set_nonblocking(false).unwrap();
                let (mut s, _) = listener.accept().unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let req = read_request(&mut s);
                write!(
                    s,
                    "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                )
                .unwrap();
                seen.push((req, std::time::Instant::now()));
            }
            seen
        });
        let hook = Webhook::spawn(AlertsConfig {
            webhook_urls: vec![format!("http://{addr}/hook")],
            secret: Some("s3cret".into()),
            backoff_initial_ms: 100,
            ..Default::default()
        })
        .unwrap();
        hook.send(&alert());
        let seen = tokio::task::spawn_blocking(move || receiver.join().unwrap())
            .await
            .unwrap();
        assert_eq!(seen.len(), 2);
        for ((headers, body), _) in &seen {
            let got: ScanAlert = serde_json::from_slice(body).unwrap();
            assert_eq!(got, alert());
            let sig = headers
                .iter()
                .find(|(k, _)| k == "x-meshd-signature")
                .map(|(_, v)| v.clone())
                .unwrap();
            assert_eq!(sig, signature(b"s3cret", body), "signed over the body");
            assert!(headers
                .iter()
                .any(|(k, v)| k == "content-type" && v == "application/json"));
        }
        let gap = seen[1].1 - seen[0].1;
        assert!(
            gap >= Duration::from_millis(90),
            "backoff before the retry: {gap:?}"
        );
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts() {
        // A URL nobody answers (port 9 on loopback refuses): the worker is busy retrying.
        let hook = Webhook::spawn(AlertsConfig {
            webhook_urls: vec!["http://127.0.0.1:9/hook".into()],
            queue: 2,
            max_attempts: 3,
            backoff_initial_ms: 10_000,
            ..Default::default()
        })
        .unwrap();
        for _ in 0..10 {
            hook.send(&alert());
        }
        assert!(hook.dropped() >= 7, "{}", hook.dropped());
    }
}
