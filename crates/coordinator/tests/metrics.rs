//! The coordinator's `--metrics-listen` endpoint, scraped over HTTP and parsed with a
//! Prometheus text parser (`prometheus-parse`, not the encoder that wrote it): real agents
//! enrol, an admin change is pushed, and the counters say so.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshd_agent::{enrol, spawn_session, SessionConfig, SessionHandle};
use meshd_control::api::TokenCreateRequest;
use meshd_control::proto::EndpointReport;
use meshd_control::{JoinToken, NetworkMap};
use meshd_coordinator::{start, AdminOp, CoordinatorHandle, CoordinatorOptions};
use meshd_tunnel::PrivateKey;

async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    if let Some(t) = token {
        req += &format!("Authorization: Bearer {t}\r\n");
    }
    req += &format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    let status = out[9..12].parse().unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (status, head.to_string(), body.to_string())
}

/// One scrape, parsed.
struct Scrape(prometheus_parse::Scrape);

impl Scrape {
    async fn get(addr: SocketAddr) -> Scrape {
        let (status, head, body) = http(addr, "GET", "/metrics", None, "").await;
        assert_eq!(status, 200, "{head}\n{body}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/openmetrics-text"),
            "{head}"
        );
        assert!(body.trim_end().ends_with("# EOF"), "{body}");
        let lines = body.lines().map(|l| Ok(l.to_string()));
        Scrape(prometheus_parse::Scrape::parse(lines).unwrap())
    }

    /// The value of the first sample named `name` whose labels include `labels` (a
    /// histogram: its count).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                prometheus_parse::Value::Histogram(b) => b
                    .iter()
                    .find(|b| b.less_than.is_infinite())
                    .map_or(0.0, |b| b.count),
                prometheus_parse::Value::Summary(_) => f64::NAN,
            })
    }

    fn must(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
    }
}

/// Metric names the sample Grafana dashboard (docs/grafana-meshd.json) uses that start with
/// `prefix` (histogram series without `_bucket`).
fn dashboard_names(prefix: &str, not: Option<&str>) -> std::collections::BTreeSet<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/grafana-meshd.json");
    let text = std::fs::read_to_string(path).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut names = std::collections::BTreeSet::new();
    for p in v["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find(prefix) {
                let tail = &rest[i..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                let name = tail[..end].trim_end_matches("_bucket").to_string();
                if not.is_none_or(|n| !name.starts_with(n)) {
                    names.insert(name);
                }
                rest = &tail[end..];
            }
        }
    }
    assert!(!names.is_empty());
    names
}

fn ep() -> EndpointReport {
    EndpointReport {
        addrs: vec![SocketAddr::from(([192, 0, 2, 1], 1))],
        listen_port: Some(51820),
        transparent: false,
    }
}

async fn join(c: &CoordinatorHandle, name: &str) -> SessionHandle {
    let t = c
        .create_token(TokenCreateRequest {
            labels: [("app".to_string(), name.to_string())].into(),
            ttl_secs: Some(600),
            uses: Some(1),
        })
        .await
        .unwrap();
    let t = JoinToken::parse(&t.token).unwrap();
    let key = PrivateKey::generate();
    let e = enrol(&t, name, &key, ep()).await.unwrap();
    spawn_session(SessionConfig::new(
        e.coordinator,
        e.coordinator_key,
        key,
        ep(),
    ))
}

async fn wait_map(s: &SessionHandle, f: impl Fn(&NetworkMap) -> bool) {
    let mut rx = s.map();
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if rx.borrow_and_update().as_ref().is_some_and(&f) {
                return;
            }
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("map condition not reached in time");
}

/// Scrapes until `f` holds (the actor updates gauges after its batch; acks arrive later).
async fn wait_scrape(addr: SocketAddr, what: &str, f: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = Scrape::get(addr).await;
        if f(&s) {
            return s;
        }
        if Instant::now() > deadline {
            let text: Vec<String> =
                s.0.samples
                    .iter()
                    .map(|x| format!("{} {:?} {:?}", x.metric, x.labels, x.value))
                    .collect();
            panic!("metrics never showed {what}:\n{}", text.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_metrics_follow_agents_pushes_and_admin_requests() {
    let dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut o = CoordinatorOptions::new(dir.path());
    o.listen = "127.0.0.1:0".parse().unwrap();
    o.admin_listen = "127.0.0.1:0".parse().unwrap();
    o.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let c = start(o).await.unwrap();
    let m = c.metrics_addr().expect("metrics listener bound");
    let admin = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let admin = admin.trim();

    // Nothing yet: every family is there, at zero.
    let s = Scrape::get(m).await;
    assert_eq!(
        s.must("meshd_coordinator_hosts", &[("state", "active")]),
        0.0
    );
    assert_eq!(s.must("meshd_coordinator_connected_agents", &[]), 0.0);
    assert_eq!(s.must("meshd_coordinator_flows_ingested_total", &[]), 0.0);
    assert_eq!(
        s.must("meshd_coordinator_guard_admin_auth_failures_total", &[]),
        0.0
    );

    let yaml = "rules:\n  - {name: all, from: {}, to: {}, ports: [any]}\n";
    c.admin(AdminOp::PolicyApply(yaml.into()))
        .await
        .unwrap()
        .unwrap();
    let a = join(&c, "a").await;
    let b = join(&c, "b").await;
    wait_map(&a, |m| m.peers.len() == 1).await;
    wait_map(&b, |m| m.peers.len() == 1).await;
    let s = wait_scrape(m, "two connected agents", |s| {
        s.value("meshd_coordinator_connected_agents", &[]) == Some(2.0)
    })
    .await;
    assert_eq!(
        s.must("meshd_coordinator_hosts", &[("state", "active")]),
        2.0
    );
    let full = s.must("meshd_coordinator_pushes_total", &[("kind", "full_map")]);
    assert!(full >= 2.0, "full maps pushed: {full}");
    let commits = s.must("meshd_coordinator_store_commit_seconds", &[]);
    assert!(commits >= 3.0, "commits: {commits}");
    assert!(s.must("meshd_coordinator_store_commit_seconds_sum", &[]) > 0.0);
    let pushes_before = s.must("meshd_coordinator_push_seconds", &[]);
    assert!(pushes_before >= 2.0);

    // An admin change over the API: counted by route, and pushed to the peer (a delta),
    // which acks it.
    let acks_before = s
        .value("meshd_coordinator_push_ack_seconds", &[])
        .unwrap_or(0.0);
    let (status, _, body) = http(
        c.admin_addr(),
        "POST",
        "/v1/hosts/a/labels",
        Some(admin),
        r#"{"labels":{"env":"prod"}}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    wait_map(&b, |m| {
        m.peers
            .iter()
            .any(|p| p.labels.get("env").map(String::as_str) == Some("prod"))
    })
    .await;
    let s = wait_scrape(m, "the label change pushed and acked", |s| {
        s.value("meshd_coordinator_push_seconds", &[])
            .unwrap_or(0.0)
            >= pushes_before + 1.0
            && s.value("meshd_coordinator_push_ack_seconds", &[])
                .unwrap_or(0.0)
                > acks_before
    })
    .await;
    assert!(s.must("meshd_coordinator_pushes_total", &[("kind", "delta")]) >= 1.0);
    assert_eq!(
        s.must(
            "meshd_coordinator_admin_requests_total",
            &[
                ("method", "POST"),
                ("route", "/v1/hosts/:host/labels"),
                ("status", "200")
            ]
        ),
        1.0
    );

    // A wrong token: a 401 by route, and the guard's failure counter.
    let (status, _, _) = http(c.admin_addr(), "GET", "/v1/hosts", Some("nope"), "").await;
    assert_eq!(status, 401);
    let s = Scrape::get(m).await;
    assert_eq!(
        s.must(
            "meshd_coordinator_admin_requests_total",
            &[("route", "/v1/hosts"), ("status", "401")]
        ),
        1.0
    );
    assert_eq!(
        s.must("meshd_coordinator_guard_admin_auth_failures_total", &[]),
        1.0
    );
    // The text names no host, label or token.
    let (_, _, text) = http(m, "GET", "/metrics", None, "").await;
    for secret in [admin, "prod"] {
        assert!(!text.contains(secret), "metrics show {secret}");
    }
    // Every coordinator metric the sample dashboard charts exists.
    let shown: std::collections::BTreeSet<&str> =
        s.0.samples.iter().map(|x| x.metric.as_str()).collect();
    for name in dashboard_names("meshd_coordinator_", None) {
        assert!(
            shown.contains(name.as_str()),
            "the dashboard uses {name}, not served"
        );
    }
    // Only /metrics is served there.
    let (status, _, _) = http(m, "GET", "/v1/hosts", Some(admin), "").await;
    assert_eq!(status, 404);

    // A quarantine moves a host between states.
    c.admin(AdminOp::Quarantine("b".into()))
        .await
        .unwrap()
        .unwrap();
    wait_scrape(m, "one quarantined host", |s| {
        s.value("meshd_coordinator_hosts", &[("state", "quarantined")]) == Some(1.0)
            && s.value("meshd_coordinator_hosts", &[("state", "active")]) == Some(1.0)
    })
    .await;
    drop((a, b));
    c.stop().await;
}
