//! `meshd up --metrics-listen ADDR` (or `[interface] metrics_listen`): a Prometheus endpoint,
//! `GET /metrics`, in the OpenMetrics text format (prometheus-client's encoder).
//!
//! Nothing here runs on the packet path: every scrape takes a [`Status`] snapshot — the same
//! one `meshd status` prints, read from the counters the device, the data plane and the
//! firewall already keep — and encodes it. Counters of the snapshot become metrics by name
//! (see [`encode_status`]), so a counter added to the snapshot shows up here without a change.
//!
//! Plain HTTP and no authentication: the endpoint serves counters and peer names, no keys or
//! tokens. Bind it to loopback or a management network. Bounded like the admin API: at most
//! [`MAX_CONNECTIONS`] connections at once (more are closed), each request head within
//! [`HEADER_TIMEOUT`].

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::status::Status;

/// Content type of the OpenMetrics text format (Prometheus scrapes it as such).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Connections served at once; further ones are closed at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Each request head (also the next one on a kept-alive connection) must arrive within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A session older than this is gone (WireGuard's `REJECT_AFTER_TIME`): a peer whose latest
/// handshake is older does not count in `meshd_peers_handshaken`.
const SESSION_LIFETIME_SECS: u64 = 180;

/// Status counters that are levels, not running totals: exported as gauges `meshd_<name>`.
/// Everything else in [`Status::counters`] is a counter. (Flow records, engineer "agentflows":
/// a table-size counter they add to the snapshot belongs in this list.)
pub const GAUGES: &[&str] = &[
    "flows_tracked",
    "signed_pinned",
    "signed_policy_version",
    "signed_stale_since",
];

/// What a scrape reads: a fresh status snapshot.
pub type Snapshot = Arc<dyn Fn() -> Status + Send + Sync>;

/// Encodes the status snapshot at every scrape.
struct StatusCollector(Snapshot);

impl fmt::Debug for StatusCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StatusCollector")
    }
}

impl Collector for StatusCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        encode_status(&(self.0)(), meshd_time::unix_now(), &mut encoder)
    }
}

/// The registry `GET /metrics` encodes: the status snapshot. Other collectors register here
/// too (hook for flow records, engineer "agentflows": per-peer packet counts come from the
/// flow table's own counters, registered as one more `Collector` before [`serve`]).
pub fn registry(snapshot: Snapshot) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(StatusCollector(snapshot)));
    r
}

/// The text `GET /metrics` answers.
pub fn render(registry: &Registry) -> Result<String, fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

fn counter(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: i64) -> fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

/// Writes `s` as metrics (`now`: Unix seconds). Names (counters get `_total` from the
/// encoder):
/// - `meshd_info{interface,mode}` 1; `meshd_peers`, `meshd_peers_handshaken`
///   (latest handshake under 180 s ago), `meshd_protected_addresses`;
/// - per peer (label `peer`, the peer's name): `meshd_peer_rx_bytes_total`,
///   `meshd_peer_tx_bytes_total`, `meshd_peer_last_handshake_timestamp_seconds` (peers that
///   had one);
/// - `meshd_drops_total{reason}` from the device's `drop_<reason>` counters,
///   `meshd_policy_denials_total{reason}` from the firewall's `policy_<reason>` ones;
/// - every other counter of the snapshot as `meshd_<name>_total` (`meshd_flows_opened_total`,
///   `meshd_cookie_replies_sent_total`, `meshd_datagrams_received_total` …), or as the gauge
///   `meshd_<name>` if it is in [`GAUGES`] (`meshd_flows_tracked`).
pub fn encode_status(s: &Status, now: u64, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
    {
        let g = ConstGauge::new(1i64);
        let mut family = e.encode_descriptor(
            "meshd_info",
            "This daemon: interface and mode",
            None,
            MetricType::Gauge,
        )?;
        let labels = [
            ("interface", s.interface.as_str()),
            ("mode", s.mode.as_str()),
        ];
        g.encode(family.encode_family(&labels)?)?;
    }
    gauge(e, "meshd_peers", "Peers in the table", s.peers.len() as i64)?;
    let live = s
        .peers
        .iter()
        .filter(|p| {
            p.latest_handshake
                .is_some_and(|t| now.saturating_sub(t) < SESSION_LIFETIME_SECS)
        })
        .count();
    gauge(
        e,
        "meshd_peers_handshaken",
        "Peers whose latest handshake is under 180 s old (a live session)",
        live as i64,
    )?;
    gauge(
        e,
        "meshd_protected_addresses",
        "Transparent mode: peer underlay addresses reached only through the tunnel",
        s.protected.len() as i64,
    )?;
    let per_peer = |e: &mut DescriptorEncoder<'_>,
                    name: &str,
                    help: &str,
                    ty: MetricType,
                    value: &dyn Fn(&crate::status::PeerStatus) -> Option<u64>|
     -> fmt::Result {
        let mut family = e.encode_descriptor(name, help, None, ty)?;
        for p in &s.peers {
            let Some(v) = value(p) else { continue };
            let labels = [("peer", p.name.as_str())];
            let m = family.encode_family(&labels)?;
            match ty {
                MetricType::Counter => ConstCounter::new(v).encode(m)?,
                _ => ConstGauge::new(v as i64).encode(m)?,
            }
        }
        Ok(())
    };
    per_peer(
        e,
        "meshd_peer_rx_bytes",
        "Decrypted bytes received from the peer",
        MetricType::Counter,
        &|p| Some(p.rx_bytes),
    )?;
    per_peer(
        e,
        "meshd_peer_tx_bytes",
        "Plaintext bytes sent to the peer through the tunnel",
        MetricType::Counter,
        &|p| Some(p.tx_bytes),
    )?;
    per_peer(
        e,
        "meshd_peer_last_handshake_timestamp_seconds",
        "Unix time of the peer's latest completed handshake",
        MetricType::Gauge,
        &|p| p.latest_handshake,
    )?;
    let by_reason = |e: &mut DescriptorEncoder<'_>, prefix: &str, name: &str, help: &str| {
        let mut family = e.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (k, v) in &s.counters {
            if let Some(reason) = k.strip_prefix(prefix) {
                let labels = [("reason", reason)];
                ConstCounter::new(*v).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok::<(), fmt::Error>(())
    };
    by_reason(
        e,
        "drop_",
        "meshd_drops",
        "Datagrams and packets the device dropped, by reason",
    )?;
    by_reason(
        e,
        "policy_",
        "meshd_policy_denials",
        "Packets the identity firewall denied, by reason",
    )?;
    for (k, v) in &s.counters {
        if k.starts_with("drop_") || k.starts_with("policy_") {
            continue;
        }
        let name = format!("meshd_{k}");
        let help = format!("meshd status counter {k}");
        if GAUGES.contains(&k.as_str()) {
            gauge(e, &name, &help, i64::try_from(*v).unwrap_or(i64::MAX))?;
        } else {
            counter(e, &name, &help, *v)?;
        }
    }
    Ok(())
}

/// Binds the metrics listener (at start, so a taken port refuses the start).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics listener on {addr}"))
}

/// Serves `GET /metrics` on `listener` until the task is dropped or aborted.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>) {
    let app = router(registry);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (io, remote) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%remote, "metrics listener: too many connections; closing");
            continue;
        };
        let app = app.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let mut app = app.clone();
                    tower_service::Service::call(&mut app, req.map(axum::body::Body::new))
                });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
            if let Err(e) = conn.await {
                tracing::debug!(%remote, error = %e, "metrics connection ended");
            }
        });
    }
}

fn router(registry: Arc<Registry>) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move { scrape(&registry) }
        }),
    )
}

fn scrape(registry: &Registry) -> Response {
    match render(registry) {
        Ok(body) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
        Err(_) => {
            tracing::warn!("encoding metrics failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding metrics failed\n",
            )
                .into_response()
        }
    }
}

/// Binds and starts serving (the host's wiring): logs the address.
pub async fn start(addr: SocketAddr, snapshot: Snapshot) -> anyhow::Result<MetricsTask> {
    let listener = bind(addr).await?;
    let local = listener.local_addr().unwrap_or(addr);
    tracing::info!(metrics_addr = %local, "metrics endpoint");
    let task = tokio::spawn(serve(listener, Arc::new(registry(snapshot))));
    Ok(MetricsTask(task))
}

/// The serving task; dropping it stops the endpoint.
pub struct MetricsTask(tokio::task::JoinHandle<()>);

impl Drop for MetricsTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::{Enforcement, IoStats};
    use crate::status::{self, StatusSource};
    use meshd_config::Mode;
    use meshd_tunnel::{Device, PeerSpec, PrivateKey};
    use std::sync::atomic::Ordering;

    fn parse(text: &str) -> prometheus_parse::Scrape {
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
    }

    fn value(s: &prometheus_parse::Scrape, name: &str, label: Option<(&str, &str)>) -> Option<f64> {
        s.samples
            .iter()
            .find(|x| x.metric == name && label.is_none_or(|(k, v)| x.labels.get(k) == Some(v)))
            .map(|x| match x.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
    }

    #[test]
    fn the_snapshot_is_rendered_by_name_and_label() {
        let device = Arc::new(Device::new(PrivateKey::generate(), 1));
        let peer = PrivateKey::generate().public_key();
        let spec = PeerSpec {
            next_key: None,
            name: "db1".into(),
            public_key: peer,
            endpoint: None,
            allowed_ips: vec!["100.64.0.2/32".parse().unwrap()],
            persistent_keepalive: None,
            preshared_key: None,
            grants: Default::default(),
        };
        device.set_peers(&[spec]).unwrap();
        let policy = Arc::new(Enforcement::new());
        let io = Arc::new(IoStats::default());
        let src = StatusSource {
            interface: "mesh0".into(),
            listen_port: 51820,
            mode: Mode::Overlay,
            addresses: vec!["100.64.0.1/24".into()],
            offload: false,
            protected: Default::default(),
            flows: Default::default(),
        };
        let snapshot: Snapshot = {
            let (device, io, policy) = (device.clone(), io.clone(), policy.clone());
            Arc::new(move || status::snapshot(&device, &io, &policy, &src))
        };
        let reg = registry(snapshot);
        let before = parse(&render(&reg).unwrap());
        assert_eq!(value(&before, "meshd_peers", None), Some(1.0));
        assert_eq!(
            value(&before, "meshd_peer_rx_bytes_total", Some(("peer", "db1"))),
            Some(0.0)
        );
        assert_eq!(value(&before, "meshd_flows_tracked", None), Some(0.0));
        assert_eq!(
            value(
                &before,
                "meshd_drops_total",
                Some(("reason", "inner_destination"))
            ),
            Some(0.0)
        );
        // No handshake yet: no timestamp sample.
        assert_eq!(
            value(&before, "meshd_peer_last_handshake_timestamp_seconds", None),
            None
        );

        let table = device.table();
        let p = &table.peers()[0];
        p.counters.rx_bytes.fetch_add(1234, Ordering::Relaxed);
        device
            .counters
            .count(meshd_tunnel::DropReason::InnerDestination);
        io.datagrams_received.fetch_add(7, Ordering::Relaxed);
        let after = parse(&render(&reg).unwrap());
        assert_eq!(
            value(&after, "meshd_peer_rx_bytes_total", Some(("peer", "db1"))),
            Some(1234.0)
        );
        assert_eq!(
            value(
                &after,
                "meshd_drops_total",
                Some(("reason", "inner_destination"))
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&after, "meshd_datagrams_received_total", None),
            Some(7.0)
        );
        assert_eq!(
            value(
                &after,
                "meshd_policy_denials_total",
                Some(("reason", "default_deny"))
            ),
            Some(0.0)
        );
        assert_eq!(
            value(&after, "meshd_info", Some(("interface", "mesh0"))),
            Some(1.0)
        );
    }
}
