//! End-to-end tests of label policy: a coordinator, hosts with labels, the identity firewall on
//! every host.

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::*;
use meshd_lab::{wait_for, Lab};

const POLICY: &str = "rules:
  - name: app1-to-db1
    from: { app: app1 }
    to: { app: db1, env: prod }
    ports: [tcp/1521]
tests:
  - { from: { app: app1 }, to: { app: db1, env: prod }, port: tcp/1521, expect: allow }
  - { from: { app: web }, to: { app: db1, env: prod }, port: tcp/1521, expect: deny }
";

struct Mesh {
    lab: Lab,
    coord: Coord,
    _procs: Vec<meshd_lab::ProcHandle>,
    /// web, app1, db1 overlay addresses.
    ov: Vec<IpAddr>,
}

/// h0 coordinator; h1 web, h2 app1, h3 db1 (env=prod).
fn mesh(tag: &str, policy: &str) -> Mesh {
    let lab = Lab::new(tag, 4).unwrap();
    let coord = Coord::start(&lab, 0);
    let (code, v) = coord.apply_policy(&lab, policy);
    assert!((200..300).contains(&code), "policy apply: {code} {v}");
    let mut procs = Vec::new();
    for (i, (name, app)) in [("web", "web"), ("app1", "app1"), ("db1", "db1")]
        .iter()
        .enumerate()
    {
        let token = coord.token(&lab, &[("app", app), ("env", "prod")], Some(600), Some(1));
        procs.push(join(&lab, i + 1, &token, name));
    }
    let mut ov = Vec::new();
    for i in 1..=3 {
        let h = lab.host(i);
        assert!(
            wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
                own_overlay(h).is_some()
            }),
            "host {i} not up"
        );
        ov.push(own_overlay(h).unwrap());
    }
    // app1 and db1 learn each other.
    assert!(wait_for(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            peer_names(lab.host(2)).contains(&"db1".into())
                && peer_names(lab.host(3)).contains(&"app1".into())
        }
    ));
    Mesh {
        lab,
        coord,
        _procs: procs,
        ov,
    }
}

#[test]
fn only_granted_flows_pass_and_denials_are_reported() {
    meshd_lab::require_root!();
    let m = mesh("pol-basic", POLICY);
    let (web, app1, db1) = (m.lab.host(1), m.lab.host(2), m.lab.host(3));
    // app1 -> db1 on tcp/1521 only.
    let (s, g, _) = tcp_transfer(app1.netns(), db1.netns(), m.ov[2], 1521, 1 << 20);
    assert_eq!(s, g);
    assert!(
        !tcp_connects(app1.netns(), db1.netns(), m.ov[2], 22),
        "app1 reached db1:22"
    );
    assert!(
        !tcp_connects(db1.netns(), app1.netns(), m.ov[1], 1521),
        "db1 opened to app1"
    );
    assert!(!app1.ping(m.ov[2]).unwrap(), "ICMP passed without a rule");
    // web never learns db1's key (and db1 never learns web's): no handshake is possible.
    assert!(
        !peer_names(web).contains(&"db1".to_string()),
        "{:?}",
        peer_names(web)
    );
    assert!(!peer_names(db1).contains(&"web".to_string()));
    assert!(!tcp_connects(web.netns(), db1.netns(), m.ov[2], 1521));
    // The denial reaches the coordinator naming both hosts.
    let ok = wait_for(Duration::from_secs(8), Duration::from_millis(200), || {
        let (_, b) = m.coord.api(&m.lab, "GET", "/v1/blocks?host=app1", None);
        let t = b.to_string();
        t.contains("\"peer\":\"db1\"") && t.contains("\"host\":\"app1\"") && t.contains(":22")
    });
    assert!(
        ok,
        "no block for app1 -> db1:22: {}",
        m.coord.api(&m.lab, "GET", "/v1/blocks", None).1
    );
    // No admin token, join token, token secret or private key in any log.
    m.coord.assert_no_secrets_in_logs(&m.lab);
}

#[test]
fn label_change_moves_a_host_while_traffic_runs() {
    meshd_lab::require_root!();
    let m = mesh("pol-label", POLICY);
    let (app1, db1) = (m.lab.host(2), m.lab.host(3));
    let stream = Stream::start(app1.netns(), db1.netns(), m.ov[2], 1521);
    assert!(
        stream.flowing(Duration::from_millis(500)),
        "stream never started"
    );
    // db1 leaves env=prod: the rule no longer matches; the open flow stops.
    let t0 = Instant::now();
    let (code, v) = m.coord.api(
        &m.lab,
        "POST",
        "/v1/hosts/db1/labels",
        Some(serde_json::json!({"labels": {"env": "dev"}})),
    );
    assert!((200..300).contains(&code), "{code} {v}");
    assert!(
        wait_for(Duration::from_secs(5), Duration::from_millis(50), || {
            !stream.flowing(Duration::from_millis(300))
        }),
        "traffic kept flowing after the label change"
    );
    let stopped = stream.last_rx.lock().unwrap().saturating_duration_since(t0);
    eprintln!(
        "flow stopped {:.0} ms after the label change",
        stopped.as_secs_f64() * 1000.0
    );
    drop(stream);
    // Back to prod: allowed again.
    let (code, _) = m.coord.api(
        &m.lab,
        "POST",
        "/v1/hosts/db1/labels",
        Some(serde_json::json!({"labels": {"env": "prod"}})),
    );
    assert!((200..300).contains(&code));
    assert!(
        wait_for(Duration::from_secs(5), Duration::from_millis(200), || {
            tcp_connects(app1.netns(), db1.netns(), m.ov[2], 1521)
        }),
        "app1 cannot reach db1 again after the label came back"
    );
    // No admin token, join token, token secret or private key in any log.
    m.coord.assert_no_secrets_in_logs(&m.lab);
}

#[test]
fn expiring_rule_stops_on_time() {
    meshd_lab::require_root!();
    let expires = std::time::SystemTime::now() + Duration::from_secs(6);
    let secs = expires
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let policy = format!(
        "{POLICY_RULES}  - name: temp-ping\n    from: {{ app: app1 }}\n    to: {{ app: db1 }}\n    ports: [icmp]\n    expires: {}\n",
        rfc3339(secs)
    );
    let m = mesh("pol-expiry", &policy);
    let (app1, _db1) = (m.lab.host(2), m.lab.host(3));
    assert!(
        wait_ping(app1, m.ov[2], Duration::from_secs(3)),
        "ping not allowed before expiry"
    );
    // Kill the coordinator: agents enforce expiry themselves.
    let p = m.coord.proc.as_ref().unwrap();
    p.kill(meshd_lab::Signal::Kill).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    std::thread::sleep(Duration::from_secs(secs.saturating_sub(now) + 1));
    assert!(
        !app1.ping(m.ov[2]).unwrap(),
        "ping still allowed after the rule expired"
    );
    // No admin token, join token, token secret or private key in any log.
    m.coord.assert_no_secrets_in_logs(&m.lab);
}

const POLICY_RULES: &str = "rules:
  - name: app1-to-db1
    from: { app: app1 }
    to: { app: db1, env: prod }
    ports: [tcp/1521]
";

/// Unix seconds as RFC 3339 UTC (civil-from-days, no date crate needed).
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[test]
fn quarantine_cuts_an_open_connection_and_revoke_is_final() {
    meshd_lab::require_root!();
    let m = mesh("pol-quarantine", POLICY);
    let (app1, db1) = (m.lab.host(2), m.lab.host(3));
    let stream = Stream::start(app1.netns(), db1.netns(), m.ov[2], 1521);
    assert!(
        stream.flowing(Duration::from_millis(500)),
        "stream never started"
    );
    let t0 = Instant::now();
    let (code, v) = m
        .coord
        .api(&m.lab, "POST", "/v1/hosts/db1/quarantine", None);
    assert!((200..300).contains(&code), "{code} {v}");
    assert!(
        wait_for(Duration::from_secs(5), Duration::from_millis(20), || {
            !peer_names(app1).contains(&"db1".to_string())
        }),
        "app1 still has db1 as a peer"
    );
    let cut = t0.elapsed();
    assert!(
        !stream.flowing(Duration::from_millis(500)),
        "traffic flows after quarantine"
    );
    eprintln!(
        "quarantine removed db1 from app1 in {:.0} ms",
        cut.as_secs_f64() * 1000.0
    );
    assert!(
        peer_names(db1).is_empty(),
        "quarantined db1 still has peers: {:?}",
        peer_names(db1)
    );
    drop(stream);
    // Release: back.
    let (code, _) = m.coord.api(&m.lab, "POST", "/v1/hosts/db1/release", None);
    assert!((200..300).contains(&code));
    assert!(wait_for(
        Duration::from_secs(5),
        Duration::from_millis(100),
        || { peer_names(app1).contains(&"db1".to_string()) }
    ));
    assert!(wait_for(
        Duration::from_secs(5),
        Duration::from_millis(200),
        || { tcp_connects(app1.netns(), db1.netns(), m.ov[2], 1521) }
    ));
    // Revoke: db1's key is refused for good; its meshd stops saying so.
    let (code, _) = m.coord.api(&m.lab, "POST", "/v1/hosts/db1/revoke", None);
    assert!((200..300).contains(&code));
    assert!(wait_for(
        Duration::from_secs(5),
        Duration::from_millis(100),
        || { !peer_names(app1).contains(&"db1".to_string()) }
    ));
    let original = &m._procs[2];
    let st = original.wait_timeout(Duration::from_secs(15)).unwrap();
    assert!(
        matches!(st, Some(s) if !s.success()),
        "revoked db1 kept running"
    );
    assert!(
        original.stderr().unwrap().contains("revoked"),
        "{}",
        original.stderr().unwrap()
    );
    // Restarting from its state directory does not bring it back.
    let p = resume(&m.lab, 3, "db1-again");
    let st = p.wait_timeout(Duration::from_secs(15)).unwrap();
    assert!(
        matches!(st, Some(s) if !s.success()),
        "revoked host resumed"
    );
    assert!(
        p.stderr().unwrap().contains("revoked"),
        "{}",
        p.stderr().unwrap()
    );
    // No admin token, join token, token secret or private key in any log.
    m.coord.assert_no_secrets_in_logs(&m.lab);
}
