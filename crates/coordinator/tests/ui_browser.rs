//! The `/ui` page in a real browser (headless Chromium through chromedriver, Debian packages
//! `chromium` and `chromium-driver`): the coordinator's own `/ui` router and auth, with
//! fixture handlers for `GET /v1/topology` and `GET /v1/flows` that check the login cookie
//! the way the API does. The harness (`meshd_lab::browser`) logs in through the form, reads
//! the SVG's nodes and edges, clicks edges and reads the flow panel, and saves a screenshot
//! to `$MESHD_UI_ARTEFACTS` (default `target/ui-artefacts/`) as a CI artefact.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use meshd_control::api::{FlowView, FlowsQuery, TopologyEdge, TopologyNode, TopologyView};
use meshd_control::flow::FlowVerdict;
use meshd_control::HostId;
use meshd_coordinator::guard::Guard;
use meshd_coordinator::options::Limits;
use meshd_coordinator::ui::{self, UiAuth};
use meshd_lab::browser::{render_topology, BrowserOptions, RenderedEdge};
use meshd_policy::Direction;

const TOKEN: &str = "meshd-admin-fixture_TOKEN-0123456789abcdef";
const NOW: u64 = 1_800_000_000;
const TCP: u8 = 6;
const UDP: u8 = 17;

fn labels(app: &str) -> meshd_control::Labels {
    [("app".to_string(), app.to_string())].into()
}

/// Three hosts: web1 (app=web), db1 (app=db), legacy1 (app=legacy, learning), and a
/// plaintext source outside the mesh.
fn flows() -> Vec<FlowView> {
    let row = |host: &str,
               id: u64,
               peer: Option<(&str, u64)>,
               dir,
               proto,
               port,
               verdict,
               rule: Option<&str>| {
        let app = |h: &str| h.trim_end_matches('1').to_string();
        FlowView {
            host: host.into(),
            host_id: HostId(id),
            host_labels: labels(&app(host)),
            peer: peer.map(|p| p.0.to_string()),
            peer_id: peer.map(|p| HostId(p.1)),
            peer_labels: peer.map(|p| labels(&app(p.0))).unwrap_or_default(),
            src: peer.is_none().then(|| "198.18.9.9".parse().unwrap()),
            direction: dir,
            proto,
            port,
            packets: 40,
            bytes: 4000,
            flows: 2,
            interval_start: NOW - 600,
            first_seen: NOW - 600,
            last_seen: NOW - 5,
            verdict,
            rule: rule.map(str::to_string),
        }
    };
    use Direction::{Inbound, Outbound};
    use FlowVerdict::{Allowed, Denied, WouldDeny};
    vec![
        row(
            "web1",
            1,
            Some(("db1", 2)),
            Outbound,
            TCP,
            5432,
            Allowed,
            Some("web-db"),
        ),
        row(
            "db1",
            2,
            Some(("web1", 1)),
            Inbound,
            TCP,
            5432,
            Allowed,
            Some("web-db"),
        ),
        row("web1", 1, Some(("db1", 2)), Outbound, UDP, 53, Denied, None),
        row(
            "legacy1",
            3,
            Some(("db1", 2)),
            Outbound,
            TCP,
            5432,
            WouldDeny,
            None,
        ),
        row("db1", 2, None, Inbound, TCP, 5432, Denied, None),
    ]
}

fn edge(
    from: &str,
    to: &str,
    proto: u8,
    port: u16,
    verdict: FlowVerdict,
    rules: &[&str],
    pairs: &[&str],
) -> TopologyEdge {
    TopologyEdge {
        from: from.into(),
        to: to.into(),
        proto,
        port,
        verdict,
        rules: rules.iter().map(|r| r.to_string()).collect(),
        packets: 40,
        bytes: 4000,
        flows: 2,
        first_seen: NOW - 600,
        last_seen: NOW - 5,
        pairs: pairs.iter().map(|p| p.to_string()).collect(),
    }
}

fn topology(group_by: &str) -> TopologyView {
    use FlowVerdict::{Allowed, Denied, WouldDeny};
    let node = |id: &str, hosts: &[&str], learning| TopologyNode {
        id: id.into(),
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
        learning,
    };
    let (nodes, edges) = if group_by == "app" {
        (
            vec![
                node("app=db", &["db1"], 0),
                node("app=legacy", &["legacy1"], 1),
                node("app=web", &["web1"], 0),
                node("outside:198.18.9.9", &[], 0),
            ],
            vec![
                edge(
                    "app=legacy",
                    "app=db",
                    TCP,
                    5432,
                    WouldDeny,
                    &[],
                    &["legacy1>db1"],
                ),
                edge(
                    "app=web",
                    "app=db",
                    TCP,
                    5432,
                    Allowed,
                    &["web-db"],
                    &["web1>db1"],
                ),
                edge("app=web", "app=db", UDP, 53, Denied, &[], &["web1>db1"]),
                edge(
                    "outside:198.18.9.9",
                    "app=db",
                    TCP,
                    5432,
                    Denied,
                    &[],
                    &["198.18.9.9>db1"],
                ),
            ],
        )
    } else {
        (
            vec![
                node("db1", &["db1"], 0),
                node("legacy1", &["legacy1"], 1),
                node("outside:198.18.9.9", &[], 0),
                node("web1", &["web1"], 0),
            ],
            vec![
                edge(
                    "legacy1",
                    "db1",
                    TCP,
                    5432,
                    WouldDeny,
                    &[],
                    &["legacy1>db1"],
                ),
                edge(
                    "outside:198.18.9.9",
                    "db1",
                    TCP,
                    5432,
                    Denied,
                    &[],
                    &["198.18.9.9>db1"],
                ),
                edge(
                    "web1",
                    "db1",
                    TCP,
                    5432,
                    Allowed,
                    &["web-db"],
                    &["web1>db1"],
                ),
                edge("web1", "db1", UDP, 53, Denied, &[], &["web1>db1"]),
            ],
        )
    };
    TopologyView {
        group_by: group_by.into(),
        since: NOW - 3600,
        nodes,
        edges,
    }
}

async fn fixture_topology(
    State(auth): State<Arc<UiAuth>>,
    parts: Parts,
    Query(q): Query<FlowsQuery>,
) -> Response {
    if let Err(r) = auth.check(&parts) {
        return r;
    }
    Json(topology(q.group_by.as_deref().unwrap_or("host"))).into_response()
}

async fn fixture_flows(
    State(auth): State<Arc<UiAuth>>,
    parts: Parts,
    Query(q): Query<FlowsQuery>,
) -> Response {
    if let Err(r) = auth.check(&parts) {
        return r;
    }
    let rows: Vec<FlowView> = flows()
        .into_iter()
        .filter(|f| {
            q.host
                .as_deref()
                .is_none_or(|h| f.host == h || f.peer.as_deref() == Some(h))
        })
        .collect();
    Json(rows).into_response()
}

/// Serves the real `/ui` router and the fixtures on 127.0.0.1 from a thread of its own.
fn serve() -> std::net::SocketAddr {
    let guard = Arc::new(Guard::new(&Limits::default()));
    let auth = UiAuth::new(meshd_coordinator::admin_token_hash(TOKEN), false, guard);
    let fixtures = Router::new()
        .route("/v1/topology", get(fixture_topology))
        .route("/v1/flows", get(fixture_flows))
        .with_state(Arc::new(auth.clone()));
    let app = ui::router(auth).merge(fixtures);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(l, app).await.unwrap();
        });
    });
    addr
}

fn artefacts() -> PathBuf {
    std::env::var_os("MESHD_UI_ARTEFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/ui-artefacts")
        })
}

fn rendered(from: &str, to: &str, proto: u8, port: u16, verdict: &str) -> RenderedEdge {
    RenderedEdge {
        from: from.into(),
        to: to.into(),
        proto,
        port,
        verdict: verdict.into(),
    }
}

/// One browser at a time: two Chromiums and chromedrivers started at once on this 2-core
/// machine made one session fail now and then (seen once as the unprivileged user).
static ONE_BROWSER: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_browser() -> std::sync::MutexGuard<'static, ()> {
    ONE_BROWSER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[test]
fn topology_page_in_headless_chromium() {
    let _one = one_browser();
    assert!(
        std::path::Path::new(meshd_lab::browser::CHROMIUM).exists(),
        "this test needs Debian's chromium and chromium-driver (scripts/test.sh installs them)"
    );
    let addr = serve();
    let allowed = rendered("app=web", "app=db", TCP, 5432, "allowed");
    let would = rendered("app=legacy", "app=db", TCP, 5432, "would_deny");
    let outside = rendered("outside:198.18.9.9", "app=db", TCP, 5432, "denied");
    let mut opts = BrowserOptions::new(artefacts().join("fixture"));
    opts.screenshot_name = "topology-by-app.png".into();
    opts.click = vec![allowed.clone(), outside.clone(), would.clone()];
    let page = render_topology(&format!("http://{addr}/ui?group_by=app"), TOKEN, &opts)
        .unwrap_or_else(|e| panic!("{e}"));

    let want = topology("app");
    let mut ids: Vec<String> = want.nodes.iter().map(|n| n.id.clone()).collect();
    ids.sort();
    assert_eq!(page.nodes, ids);
    let mut edges: Vec<RenderedEdge> = want
        .edges
        .iter()
        .map(|e| rendered(&e.from, &e.to, e.proto, e.port, e.verdict.as_str()))
        .collect();
    edges.sort();
    assert_eq!(page.edges, edges);
    assert!(
        page.unclassed_edges.is_empty(),
        "{:?}",
        page.unclassed_edges
    );

    // The allowed edge: its two rows (both ends reported it) and the rule.
    let p = &page.panels[0];
    assert_eq!(p.edge, allowed);
    let mut hosts: Vec<&str> = p.rows.iter().map(|r| r.host.as_str()).collect();
    hosts.sort();
    assert_eq!(hosts, ["db1", "web1"], "{}", p.text);
    assert!(p.rows.iter().all(|r| r.verdict == "allowed"));
    assert_eq!(p.rules, ["web-db"]);
    assert_eq!(p.needed_rule, None);
    // Learning mode: the label rule that would be needed.
    let p = &page.panels[2];
    assert_eq!(p.rows.len(), 1, "{}", p.text);
    assert_eq!(
        (p.rows[0].host.as_str(), p.rows[0].peer.as_str()),
        ("legacy1", "db1")
    );
    let needed = p.needed_rule.as_deref().unwrap_or_default();
    for want in ["from: {app: legacy}", "to: {app: db}", "ports: [tcp/5432]"] {
        assert!(needed.contains(want), "{needed}");
    }
    assert!(p.text.contains("would be denied"), "{}", p.text);
    // A plaintext source outside the mesh.
    let p = &page.panels[1];
    assert_eq!(p.rows.len(), 1, "{}", p.text);
    assert_eq!(p.rows[0].peer, "outside:198.18.9.9");
    assert!(
        p.text.contains("plaintext from outside the mesh"),
        "{}",
        p.text
    );
    assert_eq!(p.needed_rule, None, "no label rule admits plaintext");

    let png = std::fs::read(&page.screenshot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "{}",
        page.screenshot.display()
    );
    println!("screenshot: {}", page.screenshot.display());

    // Grouped by host: the hosts are the nodes.
    let mut opts = BrowserOptions::new(artefacts().join("fixture"));
    opts.screenshot_name = "topology-by-host.png".into();
    let page = render_topology(&format!("http://{addr}/ui"), TOKEN, &opts)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(page.nodes, ["db1", "legacy1", "outside:198.18.9.9", "web1"]);
    assert_eq!(page.edges.len(), 4);
}

#[test]
fn wrong_token_is_refused_in_the_browser() {
    let _one = one_browser();
    assert!(std::path::Path::new(meshd_lab::browser::CHROMIUM).exists());
    let addr = serve();
    let mut opts = BrowserOptions::new(artefacts().join("fixture-refused"));
    opts.timeout = std::time::Duration::from_secs(15);
    let e = render_topology(&format!("http://{addr}/ui"), "meshd-admin-wrong", &opts).unwrap_err();
    assert!(e.to_string().contains("login refused"), "{e}");
}
