//! The coordinator's Prometheus endpoint (`--metrics-listen`, `metrics_listen` in the config
//! file): `GET /metrics` in the OpenMetrics text format, on a listener of its own.
//!
//! Unauthenticated, and safe to be: it serves counts, latencies and route names — no host
//! names, keys, tokens or labels — and changes nothing. Bind it to loopback or a management
//! network all the same (plain HTTP; the request-head timeout of the admin API applies).
//!
//! The actor, the admin API and the agent connections update [`Metrics`] as they go (an
//! atomic add per event, a histogram observation per commit or push, never on the packet
//! path: the coordinator has none); the listener guards' counters ([`Guard`]) are read at
//! scrape time. Names (counters get `_total` from the encoder):
//!
//! | metric | type | what |
//! |---|---|---|
//! | `meshd_coordinator_hosts{state}` | gauge | hosts by `active`, `quarantined`, `revoked` (otherwise removed ones not counted) |
//! | `meshd_coordinator_connected_agents` | gauge | live agent sessions |
//! | `meshd_coordinator_pushes_total{kind}` | counter | control messages pushed to agents: `full_map`, `delta`, `other` |
//! | `meshd_coordinator_push_work_total{kind}` | counter | what computing pushes cost: `rounds`, `sessions` looked at, `full_maps` built, `peer_sets` recomputed whole, single `pairs` recomputed, `peers_sent`, `messages` ([`meshd_control::state::PushWork`]) |
//! | `meshd_coordinator_push_seconds` | histogram | from picking up the batch that caused a push to handing it to the agent's connection (includes the commit) |
//! | `meshd_coordinator_push_ack_seconds` | histogram | from a push to the agent's ack of a map version |
//! | `meshd_coordinator_store_commit_seconds` | histogram | one store commit (a batch's records and events, one transaction) |
//! | `meshd_coordinator_store_commit_failures_total` | counter | commits that failed (the batch was rolled back) |
//! | `meshd_coordinator_store_follows_total` | counter | reloads after another replica's commit (or a conflict with one) |
//! | `meshd_coordinator_admin_requests_total{method,route,status}` | counter | admin API requests by route pattern (`/v1/hosts/:host`) and HTTP status |
//! | `meshd_coordinator_block_events_total{reason}` | counter | block events received from agents, by deny reason |
//! | `meshd_coordinator_blocked_packets_total{reason}` | counter | packets those events folded in |
//! | `meshd_coordinator_flows_ingested_total` | counter | flow rows ingested from agents ([`Metrics::record_flows_ingested`]) |
//! | `meshd_coordinator_spa_dropped_total` | counter | datagrams to the control port from sources that had not knocked, dropped unanswered |
//! | `meshd_coordinator_spa_knocks_accepted_total{kind}` | counter | valid knocks: `host`, `join_token`, `admin` |
//! | `meshd_coordinator_spa_knocks_refused_total{reason}` | counter | refused knocks: `replay`, `skew`, `decrypt`, `unknown_host`, `unknown_token`, `bad_mac`, `length`, `payload`, `cache_full` |
//! | `meshd_coordinator_spa_rate_limited_total` | counter | knock-shaped datagrams dropped unchecked over 2,000 a second |
//! | `meshd_coordinator_spa_admin_refused_total` | counter | admin API connections closed (`--admin-spa`: the source IP had not knocked as admin) |
//! | `meshd_coordinator_spa_open_sources` | gauge | source address:ports open now |
//! | `meshd_coordinator_guard_<name>` | counter/gauge | the listener limits of `GET /v1/status` (`guard`): `admin_auth_failures_total`, `quic_retries_total`, `quic_half_open` … |

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::guard::Guard;

/// Content type of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Guard counters that are levels, not totals.
const GUARD_GAUGES: &[&str] = &["quic_half_open", "quic_half_open_peak"];

/// Labels of `meshd_coordinator_admin_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdminRequestLabels {
    /// HTTP method.
    pub method: String,
    /// The route's pattern, e.g. `/v1/hosts/:host` (never the host itself).
    pub route: String,
    /// HTTP status of the answer.
    pub status: u16,
}

/// One label `kind`, `state` or `reason` with a fixed set of values.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// The value.
    pub kind: &'static str,
}

/// Hosts by state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// `active`, `quarantined` or `revoked`.
    pub state: &'static str,
}

/// A deny reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// `default_deny`, `expired`, `quarantined`, `no_flow`, `plaintext`.
    pub reason: String,
}

/// The coordinator's metrics (shared by the actor, the admin API and the endpoint).
pub struct Metrics {
    registry: Registry,
    hosts: Family<StateLabel, Gauge>,
    connected_agents: Gauge,
    pushes: Family<KindLabel, Counter>,
    push_work: Family<KindLabel, Counter>,
    push_seconds: Histogram,
    push_ack_seconds: Histogram,
    commit_seconds: Histogram,
    commit_failures: Counter,
    follows: Counter,
    admin_requests: Family<AdminRequestLabels, Counter>,
    block_events: Family<ReasonLabel, Counter>,
    blocked_packets: Family<ReasonLabel, Counter>,
    flows_ingested: Counter,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Metrics")
    }
}

/// Latency buckets: 100 µs doubling to ~3.3 s.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0001, 2.0, 16)
}

/// Reads the guard counters at scrape time.
#[derive(Debug)]
struct GuardCollector(Arc<Guard>);

impl Collector for GuardCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> fmt::Result {
        let stats = serde_json::to_value(self.0.counters.snapshot()).map_err(|_| fmt::Error)?;
        let Some(fields) = stats.as_object() else {
            return Ok(());
        };
        for (k, v) in fields {
            let Some(v) = v.as_u64() else { continue };
            let name = format!("meshd_coordinator_guard_{k}");
            let help = format!("listener limits: {k} (GET /v1/status guard)");
            if GUARD_GAUGES.contains(&k.as_str()) {
                let g = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
                g.encode(e.encode_descriptor(&name, &help, None, g.metric_type())?)?;
            } else {
                let c = ConstCounter::new(v);
                c.encode(e.encode_descriptor(&name, &help, None, c.metric_type())?)?;
            }
        }
        Ok(())
    }
}

/// Reads the SPA filter's counters at scrape time.
#[derive(Debug)]
struct SpaCollector(Arc<crate::spa::SpaFilter>);

impl Collector for SpaCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> fmt::Result {
        use meshd_channel::spa::{KnockError, KnockKind};
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.0.counters;
        let counter = |e: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64| {
            let c = ConstCounter::new(v);
            c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
        };
        counter(
            &mut e,
            "meshd_coordinator_spa_dropped",
            "Datagrams from sources that had not knocked, dropped unanswered",
            c.dropped.load(Relaxed),
        )?;
        counter(
            &mut e,
            "meshd_coordinator_spa_rate_limited",
            "Knock-shaped datagrams dropped unchecked over the rate limit",
            c.rate_limited.load(Relaxed),
        )?;
        counter(
            &mut e,
            "meshd_coordinator_spa_admin_refused",
            "Admin API connections closed: the source had not knocked as admin",
            c.admin_refused.load(Relaxed),
        )?;
        {
            let f = Family::<KindLabel, Counter>::default();
            for k in [KnockKind::Host, KnockKind::JoinToken, KnockKind::Admin] {
                f.get_or_create(&KindLabel { kind: k.as_str() })
                    .inc_by(c.accepted(k));
            }
            f.encode(e.encode_descriptor(
                "meshd_coordinator_spa_knocks_accepted",
                "Valid knocks, by kind",
                None,
                f.metric_type(),
            )?)?;
        }
        {
            let f = Family::<ReasonLabel, Counter>::default();
            for r in KnockError::ALL {
                if r == KnockError::NotKnock {
                    continue;
                }
                f.get_or_create(&ReasonLabel {
                    reason: r.as_str().to_string(),
                })
                .inc_by(c.refused(r));
            }
            f.encode(e.encode_descriptor(
                "meshd_coordinator_spa_knocks_refused",
                "Refused knocks, by reason (replay, skew, ...)",
                None,
                f.metric_type(),
            )?)?;
        }
        let g = ConstGauge::new(i64::try_from(c.open.load(Relaxed)).unwrap_or(i64::MAX));
        g.encode(e.encode_descriptor(
            "meshd_coordinator_spa_open_sources",
            "Source address:ports the control port is open to now",
            None,
            g.metric_type(),
        )?)
    }
}

impl Metrics {
    /// Adds the SPA filter's counters (read at scrape time).
    pub fn register_spa(&mut self, filter: Arc<crate::spa::SpaFilter>) {
        self.registry
            .register_collector(Box::new(SpaCollector(filter)));
    }

    /// Metrics registered, the guard's counters read from `guard` at scrape time.
    pub fn new(guard: Arc<Guard>) -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            hosts: Family::default(),
            connected_agents: Gauge::default(),
            pushes: Family::default(),
            push_work: Family::default(),
            push_seconds: Histogram::new(latency_buckets()),
            push_ack_seconds: Histogram::new(latency_buckets()),
            commit_seconds: Histogram::new(latency_buckets()),
            commit_failures: Counter::default(),
            follows: Counter::default(),
            admin_requests: Family::default(),
            block_events: Family::default(),
            blocked_packets: Family::default(),
            flows_ingested: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "meshd_coordinator_hosts",
            "Hosts by state (removed hosts not counted)",
            m.hosts.clone(),
        );
        registry.register(
            "meshd_coordinator_connected_agents",
            "Live agent sessions",
            m.connected_agents.clone(),
        );
        registry.register(
            "meshd_coordinator_pushes",
            "Control messages pushed to agents, by kind",
            m.pushes.clone(),
        );
        registry.register(
            "meshd_coordinator_push_work",
            "What computing pushes cost (sessions looked at, peer sets and pairs recomputed, peers sent)",
            m.push_work.clone(),
        );
        registry.register(
            "meshd_coordinator_push_seconds",
            "From picking up the batch that caused a push to handing it to the agent's connection",
            m.push_seconds.clone(),
        );
        registry.register(
            "meshd_coordinator_push_ack_seconds",
            "From a push to the agent's ack of a map version",
            m.push_ack_seconds.clone(),
        );
        registry.register(
            "meshd_coordinator_store_commit_seconds",
            "Store commits (one transaction per batch)",
            m.commit_seconds.clone(),
        );
        registry.register(
            "meshd_coordinator_store_commit_failures",
            "Store commits that failed (the batch was rolled back)",
            m.commit_failures.clone(),
        );
        registry.register(
            "meshd_coordinator_store_follows",
            "Reloads of the state after another replica's commit (or a conflict with one)",
            m.follows.clone(),
        );
        registry.register(
            "meshd_coordinator_admin_requests",
            "Admin API requests by method, route pattern and status",
            m.admin_requests.clone(),
        );
        registry.register(
            "meshd_coordinator_block_events",
            "Block events received from agents, by deny reason",
            m.block_events.clone(),
        );
        registry.register(
            "meshd_coordinator_blocked_packets",
            "Packets folded into the block events received, by deny reason",
            m.blocked_packets.clone(),
        );
        registry.register(
            "meshd_coordinator_flows_ingested",
            "Flow rows ingested from agents",
            m.flows_ingested.clone(),
        );
        registry.register_collector(Box::new(GuardCollector(guard)));
        // Every known series from the start, so dashboards and alerts see zeros, not gaps.
        for state in ["active", "quarantined", "revoked"] {
            let _ = m.hosts.get_or_create(&StateLabel { state });
        }
        for reason in [
            "default_deny",
            "expired",
            "quarantined",
            "no_flow",
            "plaintext",
        ] {
            let label = ReasonLabel {
                reason: reason.into(),
            };
            let _ = m.block_events.get_or_create(&label);
            let _ = m.blocked_packets.get_or_create(&label);
        }
        for kind in ["full_map", "delta"] {
            let _ = m.pushes.get_or_create(&KindLabel { kind });
        }
        Metrics { registry, ..m }
    }

    /// The text `GET /metrics` answers.
    pub fn render(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// Hosts by state and live sessions, after a batch.
    pub(crate) fn set_hosts(&self, active: i64, quarantined: i64, revoked: i64, agents: i64) {
        for (state, n) in [
            ("active", active),
            ("quarantined", quarantined),
            ("revoked", revoked),
        ] {
            self.hosts.get_or_create(&StateLabel { state }).set(n);
        }
        self.connected_agents.set(agents);
    }

    /// A message pushed to an agent, `since` the batch that caused it was picked up.
    pub(crate) fn pushed(&self, kind: &'static str, since: Duration) {
        self.pushes.get_or_create(&KindLabel { kind }).inc();
        self.push_seconds.observe(since.as_secs_f64());
    }

    /// The push work done since `before` (the state's counters; a state rebuilt after a failed
    /// commit starts again from zero, so a counter that went back counts from zero).
    pub(crate) fn push_work(
        &self,
        before: meshd_control::state::PushWork,
        now: meshd_control::state::PushWork,
    ) {
        for (kind, b, n) in [
            ("rounds", before.rounds, now.rounds),
            ("sessions", before.sessions, now.sessions),
            ("full_maps", before.full_maps, now.full_maps),
            ("peer_sets", before.peer_sets, now.peer_sets),
            ("pairs", before.pairs, now.pairs),
            ("peers_sent", before.peers_sent, now.peers_sent),
            ("messages", before.messages, now.messages),
        ] {
            let d = if n >= b { n - b } else { n };
            self.push_work.get_or_create(&KindLabel { kind }).inc_by(d);
        }
    }

    /// An agent acked a map version `after` the push.
    pub(crate) fn acked(&self, after: Duration) {
        self.push_ack_seconds.observe(after.as_secs_f64());
    }

    /// A store commit took `took`; `ok`: it succeeded.
    pub(crate) fn committed(&self, took: Duration, ok: bool) {
        self.commit_seconds.observe(took.as_secs_f64());
        if !ok {
            self.commit_failures.inc();
        }
    }

    /// The state was reloaded to follow another replica's commit.
    pub(crate) fn followed(&self) {
        self.follows.inc();
    }

    /// An admin API request was answered.
    pub(crate) fn admin_request(&self, method: &str, route: &str, status: u16) {
        self.admin_requests
            .get_or_create(&AdminRequestLabels {
                method: method.to_string(),
                route: route.to_string(),
                status,
            })
            .inc();
    }

    /// Block events received from an agent.
    pub(crate) fn blocks(&self, events: &[meshd_policy::BlockEvent]) {
        for e in events {
            let reason = serde_json::to_value(&e.reason)
                .ok()
                .and_then(|v| v["kind"].as_str().map(str::to_string))
                .unwrap_or_else(|| "other".into());
            let label = ReasonLabel { reason };
            self.blocked_packets.get_or_create(&label).inc_by(e.count);
            self.block_events.get_or_create(&label).inc();
        }
    }

    /// Hook for flow ingest (engineer "coordflows"): call with the number of flow rows an
    /// `AgentMessage::Flows` added to the store, once committed.
    pub fn record_flows_ingested(&self, rows: u64) {
        self.flows_ingested.inc_by(rows);
    }
}

/// The router of the metrics listener: `GET /metrics` only.
pub(crate) fn router(metrics: Arc<Metrics>) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move { scrape(&metrics) }
        }),
    )
}

fn scrape(m: &Metrics) -> Response {
    match m.render() {
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

/// `kind` label of a pushed message.
pub(crate) fn push_kind(m: &meshd_control::proto::CoordinatorMessage) -> &'static str {
    use meshd_control::proto::CoordinatorMessage as M;
    match m {
        M::FullMap { .. } => "full_map",
        M::Delta { .. } => "delta",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_was_recorded() {
        let guard = Arc::new(Guard::new(&crate::options::Limits::default()));
        crate::guard::Counters::bump(&guard.counters.admin_auth_failures);
        let m = Metrics::new(guard);
        m.set_hosts(3, 1, 0, 2);
        m.pushed("delta", Duration::from_millis(3));
        m.push_work(
            Default::default(),
            meshd_control::state::PushWork {
                sessions: 7,
                ..Default::default()
            },
        );
        m.committed(Duration::from_millis(1), true);
        m.admin_request("GET", "/v1/hosts", 200);
        m.record_flows_ingested(5);
        let text = m.render().unwrap();
        let s = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        let get = |name: &str, label: Option<(&str, &str)>| {
            s.samples
                .iter()
                .find(|x| x.metric == name && label.is_none_or(|(k, v)| x.labels.get(k) == Some(v)))
                .map(|x| match &x.value {
                    prometheus_parse::Value::Counter(v)
                    | prometheus_parse::Value::Gauge(v)
                    | prometheus_parse::Value::Untyped(v) => *v,
                    prometheus_parse::Value::Histogram(b) => b.last().map_or(0.0, |b| b.count),
                    _ => f64::NAN,
                })
        };
        assert_eq!(
            get("meshd_coordinator_hosts", Some(("state", "active"))),
            Some(3.0)
        );
        assert_eq!(get("meshd_coordinator_connected_agents", None), Some(2.0));
        assert_eq!(
            get("meshd_coordinator_pushes_total", Some(("kind", "delta"))),
            Some(1.0)
        );
        assert_eq!(get("meshd_coordinator_push_seconds_count", None), Some(1.0));
        assert_eq!(
            get(
                "meshd_coordinator_push_work_total",
                Some(("kind", "sessions"))
            ),
            Some(7.0)
        );
        assert_eq!(get("meshd_coordinator_push_seconds", None), Some(1.0));
        assert_eq!(
            get(
                "meshd_coordinator_admin_requests_total",
                Some(("route", "/v1/hosts"))
            ),
            Some(1.0)
        );
        assert_eq!(
            get("meshd_coordinator_flows_ingested_total", None),
            Some(5.0)
        );
        assert_eq!(
            get("meshd_coordinator_guard_admin_auth_failures_total", None),
            Some(1.0)
        );
        assert_eq!(
            get("meshd_coordinator_guard_quic_half_open", None),
            Some(0.0)
        );
    }
}
