//! End to end: `meshd up --metrics-listen` and `[interface] metrics_listen`, scraped inside
//! the hosts' namespaces after real traffic and parsed with a Prometheus text parser.

mod common;

use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use common::*;
use meshd_lab::{Host, Lab};

/// `GET /metrics` on `addr` from inside `host`'s namespace: (status line, body).
fn scrape_raw(host: &Host, addr: SocketAddr, path: &str) -> (String, String) {
    use std::io::{Read as _, Write as _};
    let path = path.to_string();
    in_netns(host.netns(), move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        (
            head.lines().next().unwrap_or_default().to_string(),
            body.to_string(),
        )
    })
}

fn scrape(host: &Host, addr: SocketAddr) -> prometheus_parse::Scrape {
    let (status, body) = scrape_raw(host, addr, "/metrics");
    assert!(status.contains(" 200 "), "{status}\n{body}");
    assert!(body.trim_end().ends_with("# EOF"), "{body}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap()
}

fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

fn must(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    value(s, name, labels).unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
}

/// Metric names the sample Grafana dashboard (docs/grafana-meshd.json) uses that start with
/// `prefix` (histogram series without `_bucket`).
fn dashboard_names(prefix: &str, not: Option<&str>) -> std::collections::BTreeSet<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/grafana-meshd.json");
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

#[test]
fn metrics_after_traffic_and_garbage() {
    meshd_lab::require_root!();
    let lab = Lab::new("metrics", 2).unwrap();
    let (a, b) = (Node::new(&lab, 0), Node::new(&lab, 1));
    a.write_config(&lab, &[(&b, true)], "");
    b.write_config(&lab, &[(&a, true)], "");
    // h1 takes the address from its config file, h0 from the flag.
    let text = read(&b.config_path()).replace(
        "[interface]\n",
        "[interface]\nmetrics_listen = \"127.0.0.1:9587\"\n",
    );
    std::fs::write(b.config_path(), text).unwrap();
    let _pa = a.start_with(&lab, &["--metrics-listen", "127.0.0.1:9586"]);
    let _pb = b.start(&lab);
    let (ha, hb) = (lab.host(0), lab.host(1));
    let (ma, mb): (SocketAddr, SocketAddr) = (
        "127.0.0.1:9586".parse().unwrap(),
        "127.0.0.1:9587".parse().unwrap(),
    );

    // Before any traffic: one peer, nothing moved.
    let s = scrape(ha, ma);
    assert_eq!(must(&s, "meshd_peers", &[]), 1.0);
    assert_eq!(must(&s, "meshd_info", &[("interface", "mesh0")]), 1.0);

    assert!(
        wait_ping(ha, overlay(1).into(), Duration::from_secs(10)),
        "tunnel never came up"
    );
    let (sent, got, _) = tcp_transfer(ha.netns(), hb.netns(), overlay(1).into(), 7300, 1 << 20);
    assert_eq!(sent, got);
    // Garbage to h0's WireGuard port: counted as a malformed datagram.
    let to_a = SocketAddr::new(IpAddr::V4(ha.underlay_ip()), 51820);
    in_netns(hb.netns(), move || {
        let u = UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..3 {
            u.send_to(b"not wireguard", to_a).unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(300));

    let s = scrape(ha, ma);
    let tx = must(&s, "meshd_peer_tx_bytes_total", &[("peer", "h1")]);
    assert!(tx >= (1 << 20) as f64, "h0 sent {tx} bytes to h1");
    assert!(must(&s, "meshd_peer_rx_bytes_total", &[("peer", "h1")]) > 0.0);
    assert_eq!(must(&s, "meshd_peers_handshaken", &[]), 1.0);
    let hs = must(
        &s,
        "meshd_peer_last_handshake_timestamp_seconds",
        &[("peer", "h1")],
    );
    let now = meshd_time::unix_now() as f64;
    assert!(
        hs > now - 60.0 && hs <= now + 1.0,
        "handshake at {hs}, now {now}"
    );
    assert!(must(&s, "meshd_drops_total", &[("reason", "malformed")]) >= 3.0);
    assert!(must(&s, "meshd_flows_opened_total", &[]) >= 1.0);
    assert!(value(&s, "meshd_flows_tracked", &[]).is_some());
    assert!(must(&s, "meshd_datagrams_received_total", &[]) > 0.0);
    assert_eq!(
        must(
            &s,
            "meshd_policy_denials_total",
            &[("reason", "default_deny")]
        ),
        0.0
    );

    // Every host metric the sample dashboard charts exists.
    let shown: std::collections::BTreeSet<&str> =
        s.samples.iter().map(|x| x.metric.as_str()).collect();
    for name in dashboard_names("meshd_", Some("meshd_coordinator_")) {
        assert!(
            shown.contains(name.as_str()),
            "the dashboard uses {name}, not served"
        );
    }

    // h1, from its config key: it received what h0 sent.
    let s = scrape(hb, mb);
    let rx = must(&s, "meshd_peer_rx_bytes_total", &[("peer", "h0")]);
    assert!(rx >= (1 << 20) as f64, "h1 received {rx} bytes from h0");
    // Only /metrics is served.
    let (status, _) = scrape_raw(hb, mb, "/status");
    assert!(status.contains(" 404 "), "{status}");
}
