//! Headless Chromium for the coordinator's `/ui` topology page (feature `browser`).
//!
//! [`render_topology`] starts `chromedriver` (Debian's `chromium-driver`, driving
//! `/usr/bin/chromium`), optionally inside a lab namespace, loads the page, logs in with the
//! admin token through the page's form, waits for the SVG, reads the rendered nodes and edges
//! from the DOM, clicks the edges asked for and reads the flow panel each opens, saves a
//! screenshot, and stops the browser. chromedriver runs in a process group of its own and is
//! stopped by that group's id (SIGTERM, then SIGKILL); every wait is bounded.
//!
//! ```no_run
//! # fn main() -> Result<(), meshd_lab::browser::BrowserError> {
//! use meshd_lab::browser::{render_topology, BrowserOptions};
//! let opts = BrowserOptions::new("target/ui-artefacts");
//! let page = render_topology("http://127.0.0.1:7444/ui?group_by=app", "meshd-admin-…", &opts)?;
//! println!("{:?} {:?} {}", page.nodes, page.edges, page.screenshot.display());
//! # Ok(()) }
//! ```

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{ClientBuilder, Locator};
use serde_json::{json, Value};

/// The Chromium binary chromedriver is told to drive.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// The chromedriver binary.
pub const CHROMEDRIVER: &str = "chromedriver";

/// What can go wrong driving the browser.
#[derive(Debug, thiserror::Error)]
pub enum BrowserError {
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// chromedriver never answered.
    #[error("chromedriver did not start within {0:?} (is the chromium-driver package installed?); its log: {1}")]
    DriverNotReady(Duration, String),
    /// A WebDriver command failed.
    #[error("webdriver: {0}")]
    WebDriver(String),
    /// A condition on the page was not reached in time.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    /// The page answered something this harness does not understand.
    #[error("unexpected page content: {0}")]
    Page(String),
}

fn wd(e: impl std::fmt::Display) -> BrowserError {
    BrowserError::WebDriver(e.to_string())
}

/// How to run the browser.
#[derive(Debug, Clone)]
pub struct BrowserOptions {
    /// Run chromedriver and Chromium in this network namespace (`/run/netns/NAME`, e.g. a lab
    /// host's [`crate::Host::netns`]) so the page's URL is resolved there; `None`: this one.
    pub netns: Option<String>,
    /// Where the screenshot, chromedriver's log and the browser profile go (created).
    pub out_dir: PathBuf,
    /// File name of the screenshot in `out_dir`.
    pub screenshot_name: String,
    /// Bound on each wait (driver start, login, topology, panel).
    pub timeout: Duration,
    /// Edges to click, in order; the flow panel each opens is returned.
    pub click: Vec<RenderedEdge>,
    /// Browser window size in pixels.
    pub window: (u32, u32),
}

impl BrowserOptions {
    /// Defaults: this namespace, `topology.png`, 30 s waits, no clicks, 1400×1000.
    pub fn new(out_dir: impl Into<PathBuf>) -> Self {
        BrowserOptions {
            netns: None,
            out_dir: out_dir.into(),
            screenshot_name: "topology.png".into(),
            timeout: Duration::from_secs(30),
            click: Vec::new(),
            window: (1400, 1000),
        }
    }
}

/// One edge as drawn (`line.edge` and its `data-*`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RenderedEdge {
    /// Opener node id.
    pub from: String,
    /// Responder node id.
    pub to: String,
    /// IP protocol number.
    pub proto: u8,
    /// Responder port.
    pub port: u16,
    /// `allowed`, `denied` or `would_deny` (also the element's class).
    pub verdict: String,
}

/// One flow row of the panel (`tr.flow`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PanelRow {
    /// The reporting host.
    pub host: String,
    /// The peer (or `outside:ADDR`).
    pub peer: String,
    /// The row's verdict.
    pub verdict: String,
    /// The row's cells as shown.
    pub cells: Vec<String>,
}

/// The flow panel after a click on an edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowPanel {
    /// The edge clicked.
    pub edge: RenderedEdge,
    /// Its flows.
    pub rows: Vec<PanelRow>,
    /// Allowed edges: the rules that allowed them (`.rule`).
    pub rules: Vec<String>,
    /// Denied / would-deny edges: the rule that would be needed (`pre.needed-rule`).
    pub needed_rule: Option<String>,
    /// The panel's whole text.
    pub text: String,
}

/// What the page showed.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// Node ids (`g.node[data-id]`), sorted.
    pub nodes: Vec<String>,
    /// Edges, sorted.
    pub edges: Vec<RenderedEdge>,
    /// Edges whose element lacks the class of its verdict (should be empty).
    pub unclassed_edges: Vec<RenderedEdge>,
    /// One panel per edge of [`BrowserOptions::click`].
    pub panels: Vec<FlowPanel>,
    /// The screenshot (PNG).
    pub screenshot: PathBuf,
}

/// Loads `url` (the `/ui` page, e.g. `http://127.0.0.1:7444/ui?group_by=app`), logs in with
/// `token`, and returns what it rendered once it shows at least one node.
pub fn render_topology(
    url: &str,
    token: &str,
    opts: &BrowserOptions,
) -> Result<Rendered, BrowserError> {
    render_topology_until(url, token, opts, |nodes, _| !nodes.is_empty())
}

/// As [`render_topology`], reading the page (it refreshes itself every few seconds) until
/// `until(nodes, edges)` holds, for at most `opts.timeout`.
pub fn render_topology_until(
    url: &str,
    token: &str,
    opts: &BrowserOptions,
    until: impl Fn(&[String], &[RenderedEdge]) -> bool + Send + 'static,
) -> Result<Rendered, BrowserError> {
    let (url, token, mut opts) = (url.to_string(), token.to_string(), opts.clone());
    std::fs::create_dir_all(&opts.out_dir).map_err(|source| BrowserError::Io {
        what: format!("creating {}", opts.out_dir.display()),
        source,
    })?;
    // chromedriver finds Chromium's DevTools port in the profile directory only by a
    // canonical path (one with `..` makes the session start time out).
    opts.out_dir = std::fs::canonicalize(&opts.out_dir).map_err(|source| BrowserError::Io {
        what: format!("resolving {}", opts.out_dir.display()),
        source,
    })?;
    // A thread of its own: it may enter the namespace (sockets and children follow the
    // thread), and it runs its own runtime whatever the caller runs.
    std::thread::spawn(move || {
        if let Some(ns) = &opts.netns {
            enter_netns(ns)?;
        }
        let driver = Driver::start(&opts)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| BrowserError::Io {
                what: "starting a runtime".into(),
                source,
            })?;
        let r = rt.block_on(session(&driver, &url, &token, &opts, until));
        driver.stop();
        r
    })
    .join()
    .unwrap_or_else(|_| Err(BrowserError::Page("the browser thread panicked".into())))
}

fn enter_netns(ns: &str) -> Result<(), BrowserError> {
    let path = format!("/run/netns/{ns}");
    let f = File::open(&path).map_err(|source| BrowserError::Io {
        what: format!("opening {path}"),
        source,
    })?;
    // SAFETY: setns with a valid namespace descriptor; it changes only this thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(BrowserError::Io {
            what: format!("entering {path}"),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// A running chromedriver, in a process group of its own.
struct Driver {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Driver {
    fn start(opts: &BrowserOptions) -> Result<Driver, BrowserError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |source| BrowserError::Io { what, source }
        };
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(io("picking a port for chromedriver"))?
            .port();
        let log = opts.out_dir.join("chromedriver.log");
        let out = File::create(&log).map_err(io("creating chromedriver.log"))?;
        let err = out.try_clone().map_err(io("chromedriver.log"))?;
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(io("starting chromedriver (package chromium-driver)"))?;
        let d = Driver { child, port, log };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + opts.timeout.min(Duration::from_secs(15));
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline {
                let text = std::fs::read_to_string(&d.log).unwrap_or_default();
                d.stop();
                return Err(BrowserError::DriverNotReady(opts.timeout, text));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(d)
    }

    /// Stops chromedriver and what it started (its process group), by the id we started.
    fn stop(mut self) {
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: signalling the process group of a child we started and have not reaped.
        unsafe { libc::kill(-pgid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Whatever is left of the group (Chromium's helpers) goes too.
        // SAFETY: as above; the group id is still ours (the leader may have exited, but
        // the id cannot be reused while members of the group live).
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _reaped = self.child.wait();
    }
}

async fn session(
    driver: &Driver,
    url: &str,
    token: &str,
    opts: &BrowserOptions,
    until: impl Fn(&[String], &[RenderedEdge]) -> bool,
) -> Result<Rendered, BrowserError> {
    let profile = opts.out_dir.join("chromium-profile");
    let caps = json!({
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-extensions", "--disable-background-networking",
                "--disable-breakpad", "--disable-crash-reporter",
                format!("--window-size={},{}", opts.window.0, opts.window.1),
                format!("--user-data-dir={}", profile.display()),
            ],
        }
    });
    let Value::Object(caps) = caps else {
        return Err(BrowserError::Page("capabilities".into()));
    };
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let client = ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .map_err(wd)?;
    let r = drive(&client, url, token, opts, until).await;
    let _closed = client.close().await;
    r
}

const READ_GRAPH: &str = r#"
const q = (s) => Array.from(document.querySelectorAll(s));
return {
  updated: Number(document.body.dataset.updated || 0),
  login: !document.getElementById('login').classList.contains('hidden'),
  loginError: document.getElementById('login-error').textContent,
  nodes: q('#topology g.node').map((n) => n.getAttribute('data-id')),
  edges: q('#topology line.edge').map((e) => ({
    from: e.getAttribute('data-from'), to: e.getAttribute('data-to'),
    proto: Number(e.getAttribute('data-proto')), port: Number(e.getAttribute('data-port')),
    verdict: e.getAttribute('data-verdict'),
    classed: e.classList.contains(e.getAttribute('data-verdict')),
  })),
};
"#;

const READ_PANEL: &str = r#"
const p = document.getElementById('flow-panel');
const q = (s) => Array.from(p.querySelectorAll(s));
return {
  visible: !p.classList.contains('hidden'),
  edge: p.getAttribute('data-edge'),
  rows: p.getAttribute('data-rows'),
  text: p.innerText,
  flows: q('tr.flow').map((r) => ({
    host: r.getAttribute('data-host'), peer: r.getAttribute('data-peer'),
    verdict: r.getAttribute('data-verdict'),
    cells: Array.from(r.querySelectorAll('td')).map((c) => c.textContent),
  })),
  rules: q('.rule').map((r) => r.textContent),
  needed: q('pre.needed-rule').map((r) => r.textContent)[0] || null,
};
"#;

fn str_of(v: &Value, k: &str) -> String {
    v[k].as_str().unwrap_or_default().to_string()
}

fn edges_of(v: &Value) -> (Vec<RenderedEdge>, Vec<RenderedEdge>) {
    let mut all = Vec::new();
    let mut unclassed = Vec::new();
    for e in v["edges"].as_array().into_iter().flatten() {
        let edge = RenderedEdge {
            from: str_of(e, "from"),
            to: str_of(e, "to"),
            proto: e["proto"].as_u64().unwrap_or(0) as u8,
            port: e["port"].as_u64().unwrap_or(0) as u16,
            verdict: str_of(e, "verdict"),
        };
        if e["classed"] != Value::Bool(true) {
            unclassed.push(edge.clone());
        }
        all.push(edge);
    }
    all.sort();
    (all, unclassed)
}

fn nodes_of(v: &Value) -> Vec<String> {
    let mut n: Vec<String> = v["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str().map(str::to_string))
        .collect();
    n.sort();
    n
}

async fn drive(
    client: &fantoccini::Client,
    url: &str,
    token: &str,
    opts: &BrowserOptions,
    until: impl Fn(&[String], &[RenderedEdge]) -> bool,
) -> Result<Rendered, BrowserError> {
    client.goto(url).await.map_err(wd)?;
    // The login form (first visit) or the graph (a cookie from before).
    let deadline = Instant::now() + opts.timeout;
    let mut logged_in = false;
    let v = loop {
        let v = client.execute(READ_GRAPH, vec![]).await.map_err(wd)?;
        if v["updated"].as_u64().unwrap_or(0) >= 1 && !v["login"].as_bool().unwrap_or(true) {
            let (nodes, edges) = (nodes_of(&v), edges_of(&v).0);
            if until(&nodes, &edges) {
                break v;
            }
        } else if v["login"].as_bool() == Some(true) {
            let err = str_of(&v, "loginError");
            if logged_in && !err.is_empty() {
                return Err(BrowserError::Page(format!("login refused: {err}")));
            }
            if !logged_in {
                let field = client.find(Locator::Id("token")).await.map_err(wd)?;
                field.send_keys(token).await.map_err(wd)?;
                let button = client.find(Locator::Id("login-button")).await.map_err(wd)?;
                button.click().await.map_err(wd)?;
                logged_in = true;
            }
        }
        if Instant::now() > deadline {
            return Err(BrowserError::Timeout(
                opts.timeout,
                format!("the topology to render as asked (last read: {v})"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let nodes = nodes_of(&v);
    let (edges, unclassed_edges) = edges_of(&v);
    let mut panels = Vec::new();
    for e in &opts.click {
        panels.push(click_edge(client, e, opts.timeout).await?);
    }
    let png = client.screenshot().await.map_err(wd)?;
    let screenshot = opts.out_dir.join(&opts.screenshot_name);
    write(&screenshot, &png)?;
    Ok(Rendered {
        nodes,
        edges,
        unclassed_edges,
        panels,
        screenshot,
    })
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), BrowserError> {
    std::fs::write(path, bytes).map_err(|source| BrowserError::Io {
        what: format!("writing {}", path.display()),
        source,
    })
}

/// Clicks the label of edge `e` (a real pointer click through WebDriver) and reads the panel
/// once it shows that edge's flows.
async fn click_edge(
    client: &fantoccini::Client,
    e: &RenderedEdge,
    timeout: Duration,
) -> Result<FlowPanel, BrowserError> {
    let css = format!(
        "#topology text.edge-label[data-from=\"{}\"][data-to=\"{}\"][data-proto=\"{}\"][data-port=\"{}\"][data-verdict=\"{}\"]",
        e.from.replace('"', "\\\""),
        e.to.replace('"', "\\\""),
        e.proto,
        e.port,
        e.verdict
    );
    let label = client.find(Locator::Css(&css)).await.map_err(wd)?;
    label.click().await.map_err(wd)?;
    let key = format!("{}|{}|{}|{}|{}", e.from, e.to, e.proto, e.port, e.verdict);
    let deadline = Instant::now() + timeout;
    loop {
        let p = client.execute(READ_PANEL, vec![]).await.map_err(wd)?;
        if p["visible"] == Value::Bool(true)
            && p["edge"].as_str() == Some(key.as_str())
            && !p["rows"].is_null()
        {
            let rows = p["flows"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| PanelRow {
                    host: str_of(r, "host"),
                    peer: str_of(r, "peer"),
                    verdict: str_of(r, "verdict"),
                    cells: r["cells"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|c| c.as_str().unwrap_or_default().to_string())
                        .collect(),
                })
                .collect();
            let rules = p["rules"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r.as_str().map(str::to_string))
                .collect();
            return Ok(FlowPanel {
                edge: e.clone(),
                rows,
                rules,
                needed_rule: p["needed"].as_str().map(str::to_string),
                text: str_of(&p, "text"),
            });
        }
        if Instant::now() > deadline {
            return Err(BrowserError::Timeout(
                timeout,
                format!("the flow panel of {key} (last read: {p})"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
