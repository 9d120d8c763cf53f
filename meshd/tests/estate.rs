//! End-to-end tests of seeing the estate (issue 16): flow records from three labelled hosts
//! reach the coordinator and come back as a topology (API and `meshctl topology`), and
//! learning mode followed by `meshctl policy suggest` gives a policy that allows exactly what
//! was seen.

mod common;

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use meshd_lab::browser::{render_topology_until, BrowserOptions, RenderedEdge};
use meshd_lab::{wait_for, Lab};

/// The `meshctl` binary next to the `meshd` under test (`cargo test --workspace` builds both).
fn meshctl_bin() -> PathBuf {
    let p = std::path::Path::new(meshd_bin()).with_file_name("meshctl");
    assert!(
        p.exists(),
        "{} is missing: build it first (cargo build -p meshctl)",
        p.display()
    );
    p
}

/// Runs `meshctl ARGS` in the coordinator's namespace against its admin API; (status, stdout,
/// stderr).
fn meshctl(lab: &Lab, coord: &Coord, args: &[&str]) -> (i32, String, String) {
    let bin = meshctl_bin();
    let token = std::fs::read_to_string(coord.dir.join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let empty = lab.dir().join("meshctl-empty.toml");
    std::fs::write(&empty, "").unwrap();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let out = in_netns(lab.host(coord.idx).netns(), move || {
        Command::new(bin)
            .args([
                "--server",
                "http://127.0.0.1:7444",
                "--token",
                &token,
                "--config",
            ])
            .arg(&empty)
            .args(&args)
            .output()
            .unwrap()
    });
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

struct Estate {
    lab: Lab,
    coord: Coord,
    _procs: Vec<meshd_lab::ProcHandle>,
    /// Overlay addresses of hosts 1..=n, in order.
    ov: Vec<IpAddr>,
}

/// h0 runs the coordinator with `policy`; hosts 1.. enrol as `names` with `app=<app>`,
/// reporting flows every second.
fn estate(tag: &str, policy: &str, hosts: &[(&str, &str)]) -> Estate {
    let lab = Lab::new(tag, hosts.len() + 1).unwrap();
    let coord = Coord::start(&lab, 0);
    let (code, v) = coord.apply_policy(&lab, policy);
    assert!((200..300).contains(&code), "policy apply: {code} {v}");
    let mut procs = Vec::new();
    for (i, (name, app)) in hosts.iter().enumerate() {
        let token = coord.token(&lab, &[("app", app), ("env", "prod")], Some(600), Some(1));
        procs.push(join_with(
            &lab,
            i + 1,
            &token,
            name,
            &["--flow-interval", "1"],
        ));
    }
    let mut ov = Vec::new();
    for i in 1..=hosts.len() {
        let h = lab.host(i);
        assert!(
            wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
                own_overlay(h).is_some()
            }),
            "host {i} not up"
        );
        ov.push(own_overlay(h).unwrap());
    }
    Estate {
        lab,
        coord,
        _procs: procs,
        ov,
    }
}

/// The edge `from -> to` on `proto/port` with `verdict` in a topology JSON, if present.
fn edge<'a>(
    topo: &'a serde_json::Value,
    from: &str,
    to: &str,
    port: u64,
    verdict: &str,
) -> Option<&'a serde_json::Value> {
    topo["edges"].as_array()?.iter().find(|e| {
        e["from"] == from && e["to"] == to && e["port"] == port && e["verdict"] == verdict
    })
}

const THREE_TIER: &str = "rules:
  - name: web-to-api
    from: { app: web }
    to: { app: api }
    ports: [tcp/8080]
  - name: api-to-db
    from: { app: api }
    to: { app: db }
    ports: [tcp/5432]
";

#[test]
fn traffic_among_three_hosts_shows_in_the_topology_with_verdicts() {
    meshd_lab::require_root!();
    let e = estate(
        "est-topo",
        THREE_TIER,
        &[("web1", "web"), ("api1", "api"), ("db1", "db")],
    );
    let (web, api, db) = (e.lab.host(1), e.lab.host(2), e.lab.host(3));
    assert!(wait_for(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || peer_names(api).contains(&"db1".into()) && peer_names(web).contains(&"api1".into())
    ));
    let (s, g, _) = tcp_transfer(web.netns(), api.netns(), e.ov[1], 8080, 256 << 10);
    assert_eq!(s, g);
    let (s, g, _) = tcp_transfer(api.netns(), db.netns(), e.ov[2], 5432, 256 << 10);
    assert_eq!(s, g);
    assert!(
        !tcp_connects(api.netns(), db.netns(), e.ov[2], 22),
        "api1 reached db1:22"
    );

    // The API's topology, by app: two allowed edges with their rules and one denied.
    let mut topo = serde_json::Value::Null;
    let seen = wait_for(Duration::from_secs(15), Duration::from_millis(300), || {
        topo = e
            .coord
            .api(&e.lab, "GET", "/v1/topology?group_by=app", None)
            .1;
        edge(&topo, "app=web", "app=api", 8080, "allowed").is_some()
            && edge(&topo, "app=api", "app=db", 5432, "allowed").is_some()
            && edge(&topo, "app=api", "app=db", 22, "denied").is_some()
    });
    assert!(seen, "topology lacks the expected edges: {topo:#}");
    let web_api = edge(&topo, "app=web", "app=api", 8080, "allowed").unwrap();
    assert_eq!(web_api["rules"], serde_json::json!(["web-to-api"]));
    assert_eq!(web_api["proto"], 6);
    assert!(web_api["bytes"].as_u64().unwrap() >= 256 << 10, "{web_api}");
    assert_eq!(web_api["pairs"], serde_json::json!(["web1>api1"]));
    let nodes: Vec<&str> = topo["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(nodes, ["app=api", "app=db", "app=web"]);
    // Nothing that did not happen: web never talked to db.
    assert!(
        !topo["edges"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["from"] == "app=web" && x["to"] == "app=db"),
        "{topo:#}"
    );

    // meshctl topology --format json shows the same edges by host; dot draws them.
    let (rc, out, err) = meshctl(&e.lab, &e.coord, &["topology", "--format", "json"]);
    assert_eq!(rc, 0, "meshctl topology: {err}");
    let by_host: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        edge(&by_host, "web1", "api1", 8080, "allowed").is_some(),
        "{out}"
    );
    assert!(
        edge(&by_host, "api1", "db1", 5432, "allowed").is_some(),
        "{out}"
    );
    assert!(
        edge(&by_host, "api1", "db1", 22, "denied").is_some(),
        "{out}"
    );
    let (rc, dot, err) = meshctl(
        &e.lab,
        &e.coord,
        &["topology", "--group-by", "app", "--format", "dot"],
    );
    assert_eq!(rc, 0, "meshctl topology dot: {err}");
    assert!(dot.starts_with("digraph"), "{dot}");
    assert!(dot.contains("\"app=web\" -> \"app=api\""), "{dot}");
    // And export flows hands them out as CSV, by name and labels.
    let (rc, csv, err) = meshctl(&e.lab, &e.coord, &["export", "flows", "--format", "csv"]);
    assert_eq!(rc, 0, "meshctl export flows: {err}");
    assert!(
        csv.lines()
            .any(|l| l.contains("web1") && l.contains("api1") && l.contains("8080")),
        "{csv}"
    );

    // The /ui page in headless Chromium, inside the coordinator's namespace: the same three
    // label groups and edges, coloured by verdict; a click on an edge lists its flows and rule.
    let want = |from: &str, to: &str, port: u16, verdict: &str| RenderedEdge {
        from: from.into(),
        to: to.into(),
        proto: 6,
        port,
        verdict: verdict.into(),
    };
    let (allowed, denied) = (
        want("app=web", "app=api", 8080, "allowed"),
        want("app=api", "app=db", 22, "denied"),
    );
    let mut opts = BrowserOptions::new(ui_artefacts().join("estate"));
    opts.netns = Some(e.lab.host(e.coord.idx).netns().to_string());
    opts.screenshot_name = "three-hosts-by-app.png".into();
    opts.click = vec![allowed.clone(), denied.clone()];
    let expected = vec![
        want("app=api", "app=db", 22, "denied"),
        want("app=api", "app=db", 5432, "allowed"),
        allowed.clone(),
    ];
    let exp = expected.clone();
    let page = render_topology_until(
        "http://127.0.0.1:7444/ui?group_by=app",
        &admin_token(&e.coord),
        &opts,
        move |_, edges| exp.iter().all(|x| edges.contains(x)),
    )
    .unwrap_or_else(|err| panic!("/ui: {err}"));
    assert_eq!(page.nodes, ["app=api", "app=db", "app=web"]);
    let mut edges = page.edges.clone();
    edges.sort();
    assert_eq!(edges, expected, "rendered edges");
    assert!(
        page.unclassed_edges.is_empty(),
        "{:?}",
        page.unclassed_edges
    );
    let p = &page.panels[0];
    assert_eq!(p.edge, allowed);
    assert_eq!(p.rules, ["web-to-api"], "{}", p.text);
    assert!(
        p.rows.iter().any(|r| r.host == "web1" && r.peer == "api1"),
        "{}",
        p.text
    );
    let p = &page.panels[1];
    assert_eq!(p.edge, denied);
    assert!(p.rows.iter().all(|r| r.verdict == "denied"), "{}", p.text);
    let needed = p.needed_rule.as_deref().unwrap_or_default();
    for w in ["from: {app: api}", "to: {app: db}", "ports: [tcp/22]"] {
        assert!(needed.contains(w), "needed rule {needed:?}: {}", p.text);
    }
    let png = std::fs::read(&page.screenshot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{}",
        page.screenshot.display()
    );
    println!("screenshot: {}", page.screenshot.display());
    e.coord.assert_no_secrets_in_logs(&e.lab);
}

/// Where browser screenshots go (a CI artefact): `$MESHD_UI_ARTEFACTS`, else
/// `target/ui-artefacts`.
fn ui_artefacts() -> PathBuf {
    std::env::var_os("MESHD_UI_ARTEFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/ui-artefacts"))
}

fn admin_token(coord: &Coord) -> String {
    std::fs::read_to_string(coord.dir.join("admin.token"))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn learning_then_suggest_allows_exactly_what_was_seen() {
    meshd_lab::require_root!();
    let policy = "learn:
  - { app: legacy }
rules: []
";
    let e = estate("est-learn", policy, &[("legacy1", "legacy"), ("db1", "db")]);
    let (legacy, db) = (e.lab.host(1), e.lab.host(2));
    // No rule at all, but legacy1 is learning: it peers with db1 and its flows pass.
    assert!(
        wait_for(Duration::from_secs(10), Duration::from_millis(100), || {
            peer_names(legacy).contains(&"db1".into()) && peer_names(db).contains(&"legacy1".into())
        }),
        "learning host not peered"
    );
    let (rc, out, err) = meshctl(&e.lab, &e.coord, &["status"]);
    assert_eq!(rc, 0, "{err}");
    assert!(out.contains("NOT ENFORCING"), "{out}");
    let (s, g, _) = tcp_transfer(legacy.netns(), db.netns(), e.ov[1], 5432, 64 << 10);
    assert_eq!(s, g, "a would-deny flow did not pass in learning mode");
    let ok = wait_for(Duration::from_secs(15), Duration::from_millis(300), || {
        let t = e
            .coord
            .api(&e.lab, "GET", "/v1/topology?group_by=app", None)
            .1;
        edge(&t, "app=legacy", "app=db", 5432, "would_deny").is_some()
    });
    assert!(ok, "no would-deny edge");

    // The suggestion, applied, allows legacy -> db on 5432 and nothing else.
    let (rc, suggestion, err) = meshctl(
        &e.lab,
        &e.coord,
        &["policy", "suggest", "--group-by", "app", "--since", "1h"],
    );
    assert_eq!(rc, 0, "policy suggest: {err}");
    assert!(suggestion.contains("tcp/5432"), "{suggestion}");
    assert!(suggestion.contains("tests:"), "{suggestion}");
    let (code, v) = e.coord.apply_policy(&e.lab, &suggestion);
    assert!(
        (200..300).contains(&code),
        "apply suggestion: {code} {v}\n{suggestion}"
    );
    let (rc, out, _) = meshctl(&e.lab, &e.coord, &["status"]);
    assert_eq!(rc, 0);
    assert!(!out.contains("NOT ENFORCING"), "{out}");
    // Enforcing now: the seen flow still works, an unseen port and the reverse way do not.
    assert!(
        wait_for(Duration::from_secs(10), Duration::from_millis(200), || {
            !tcp_connects(legacy.netns(), db.netns(), e.ov[1], 5433)
        }),
        "an unseen flow passed after the suggestion was applied"
    );
    assert!(tcp_connects(legacy.netns(), db.netns(), e.ov[1], 5432));
    assert!(
        !tcp_connects(db.netns(), legacy.netns(), e.ov[0], 5432),
        "db1 opened to legacy1"
    );
}
