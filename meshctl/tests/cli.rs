//! Runs the built `meshctl` binary against an in-process coordinator on 127.0.0.1.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use meshd_control::api::{HostView, StatusView, TokenCreateRequest, TokenView};
use meshd_control::proto::EndpointReport;
use meshd_control::JoinToken;
use meshd_coordinator::{client, start, CoordinatorHandle, CoordinatorOptions};
use meshd_tunnel::PrivateKey;

const HOSTS_HEADER: &str = "NAME  ID  ADDRESS  STATE  LAST SEEN  ENDPOINT  LABELS\n";

struct Coord {
    rt: tokio::runtime::Runtime,
    handle: Option<CoordinatorHandle>,
    dir: tempfile::TempDir,
    /// An empty config file, so no ~/.config or /etc file on the machine changes the outcome.
    empty_config: PathBuf,
}

impl Coord {
    fn start() -> Coord {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let mut o = CoordinatorOptions::new(&state);
        o.listen = "127.0.0.1:0".parse().unwrap();
        o.admin_listen = "127.0.0.1:0".parse().unwrap();
        let handle = rt.block_on(start(o)).unwrap();
        let empty_config = dir.path().join("empty.toml");
        std::fs::write(&empty_config, "").unwrap();
        Coord {
            rt,
            handle: Some(handle),
            dir,
            empty_config,
        }
    }

    fn handle(&self) -> &CoordinatorHandle {
        self.handle.as_ref().unwrap()
    }

    fn url(&self) -> String {
        format!("http://{}", self.handle().admin_addr())
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// `meshctl` with no server/token settings from the environment or config files.
    fn bare(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_meshctl"));
        c.env_remove("MESH_SERVER")
            .env_remove("MESH_TOKEN")
            .env_remove("MESH_STATE_DIR")
            .env("MESHCTL_CONFIG", &self.empty_config)
            .stdin(Stdio::null());
        c
    }

    /// `meshctl --server URL --state-dir DIR args...` (token from <state-dir>/admin.token).
    fn run(&self, args: &[&str]) -> Output {
        let mut c = self.bare();
        c.arg("--server")
            .arg(self.url())
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(args);
        c.output().unwrap()
    }

    /// Like `run`, asserting success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "meshctl {args:?} failed: {}",
            text(&o.stderr)
        );
        text(&o.stdout)
    }

    /// Enrols a host directly with the client library.
    fn enrol(&self, name: &str, labels: &[(&str, &str)]) {
        let req = TokenCreateRequest {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ttl_secs: Some(600),
            uses: Some(1),
        };
        self.rt.block_on(async {
            let t = self.handle().create_token(req).await.unwrap();
            let t = JoinToken::parse(&t.token).unwrap();
            let ep = EndpointReport {
                addrs: vec![SocketAddr::from(([192, 0, 2, 1], 51820))],
                listen_port: Some(51820),
            };
            client::enrol(&t, name, &PrivateKey::generate(), ep)
                .await
                .unwrap();
        });
    }
}

impl Drop for Coord {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            self.rt.block_on(h.stop());
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A runtime failure: exit status 1 with a `meshctl: error:` line.
fn fails(o: &Output) -> String {
    assert!(
        !o.status.success(),
        "expected failure, got stdout {}",
        text(&o.stdout)
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let e = text(&o.stderr);
    assert!(e.starts_with("meshctl: error: "), "{e}");
    e
}

/// A usage error caught while parsing arguments (clap: exit status 2), before any request.
fn usage_error(o: &Output) -> String {
    assert_eq!(
        o.status.code(),
        Some(2),
        "stdout {} stderr {}",
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stderr)
}

/// A loopback port with nothing listening.
fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn token_create_list_revoke() {
    let c = Coord::start();
    let created = c.run(&[
        "token",
        "create",
        "--labels",
        "app=db1,env=prod",
        "--ttl",
        "1h",
        "--uses",
        "1",
    ]);
    assert!(created.status.success(), "{}", text(&created.stderr));
    let stdout = text(&created.stdout);
    // Only the token on stdout, so `TOKEN=$(meshctl token create ...)` works.
    assert_eq!(stdout.lines().count(), 1, "{stdout:?}");
    let token = stdout.trim();
    let parsed = JoinToken::parse(token).expect("stdout is a join token");
    assert_eq!(parsed.coordinator_key, c.handle().public_key());
    assert!(text(&created.stderr).contains("meshd up --join"));

    let list = c.ok(&["token", "list"]);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 2, "{list}");
    assert!(lines[0].starts_with("ID  STATE   LABELS"), "{list}");
    let cols: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        cols[..5],
        ["1", "active", "app=db1,env=prod", "1", "in"],
        "{list}"
    );
    assert!(!list.contains(token), "token list must not show the secret");

    let json: Vec<TokenView> =
        serde_json::from_str(&c.ok(&["token", "list", "-o", "json"])).unwrap();
    assert_eq!(json.len(), 1);
    assert_eq!(json[0].state, "active");
    let id = json[0].id.to_string();

    let revoked = c.ok(&["token", "revoke", &id]);
    assert!(
        revoked.starts_with(&format!("revoked token {id} (revoked)")),
        "{revoked}"
    );
    let list = c.ok(&["token", "list"]);
    assert!(
        list.lines().nth(1).unwrap().split_whitespace().nth(1) == Some("revoked"),
        "{list}"
    );

    let e = fails(&c.run(&["token", "revoke", "999"]));
    assert!(
        e.contains("no token with id 999") && e.contains("meshctl token list"),
        "{e}"
    );

    let json = c.ok(&["token", "create", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(
        v["token"].as_str().unwrap().starts_with("meshd1-"),
        "{json}"
    );
    assert_eq!(v["info"]["uses_left"], serde_json::Value::Null);
}

#[test]
fn empty_coordinator_hosts_and_status() {
    let c = Coord::start();
    assert_eq!(c.ok(&["hosts", "list"]), HOSTS_HEADER);
    assert_eq!(c.ok(&["hosts", "list", "-o", "json"]).trim(), "[]");
    let e = fails(&c.run(&["hosts", "show", "nope"]));
    assert!(
        e.contains("no host named \"nope\"") && e.contains("meshctl hosts list"),
        "{e}"
    );
    let e = fails(&c.run(&["hosts", "rename", "nope", "x"]));
    assert!(e.contains("no host named \"nope\""), "{e}");

    let s = c.ok(&["status"]);
    assert!(s.contains(&format!("coordinator:  {}\n", c.url())), "{s}");
    assert!(
        s.contains("hosts:        0\n") && s.contains("connected:    0\n"),
        "{s}"
    );
    let v: StatusView = serde_json::from_str(&c.ok(&["status", "--output", "json"])).unwrap();
    assert_eq!(v.hosts, 0);
    assert_eq!(v.public_key, c.handle().public_key());
}

#[test]
fn host_management() {
    let c = Coord::start();
    c.enrol("db1", &[("app", "db1"), ("env", "prod")]);
    let list = c.ok(&["hosts", "list"]);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 2, "{list}");
    assert!(lines[0].starts_with("NAME  ID  ADDRESS"), "{list}");
    let cols: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(cols[0], "db1");
    assert!(cols[2].starts_with("100.64."), "{list}");
    assert_eq!(*cols.last().unwrap(), "app=db1,env=prod");

    let show = c.ok(&["hosts", "show", "db1"]);
    assert!(show.starts_with("name:         db1\n"), "{show}");

    let h: HostView =
        serde_json::from_str(&c.ok(&["hosts", "label", "db1", "tier=1,env=stage", "-o", "json"]))
            .unwrap();
    assert_eq!(h.labels["env"], "stage");
    assert_eq!(h.labels["tier"], "1");
    // A public key with '/' and '+' in it works as the host argument.
    let key = h.public_key.to_string();
    let h: HostView =
        serde_json::from_str(&c.ok(&["hosts", "unlabel", &key, "tier,app", "-o", "json"])).unwrap();
    assert_eq!(h.labels.keys().collect::<Vec<_>>(), ["env"]);

    let e = usage_error(&c.run(&["hosts", "label", "db1", "bad label=x"]));
    assert!(e.contains("only letters"), "{e}");
    let e = fails(&c.run(&["hosts", "rename", "db1", "no spaces"]));
    assert!(e.contains("cannot rename"), "{e}");

    c.ok(&["hosts", "rename", "db1", "db2"]);
    assert!(c.ok(&["hosts", "list"]).contains("\ndb2 "));

    // No terminal and no --yes: refuse rather than hang or remove.
    let e = fails(&c.run(&["hosts", "remove", "db2"]));
    assert!(e.contains("--yes"), "{e}");
    assert!(c.ok(&["hosts", "list"]).contains("\ndb2 "));
    let out = c.ok(&["hosts", "remove", "db2", "--yes"]);
    assert!(out.starts_with("removed host db2"), "{out}");
    assert_eq!(c.ok(&["hosts", "list"]), HOSTS_HEADER);
}

#[test]
fn wrong_token_is_refused() {
    let c = Coord::start();
    let e = fails(&c.run(&["--token", "meshadm-wrong", "hosts", "list"]));
    assert!(
        e.contains("the admin token was refused") && e.contains("--token"),
        "{e}"
    );

    let o = c
        .bare()
        .args(["--server", &c.url(), "status"])
        .env("MESH_TOKEN", "nope")
        .output()
        .unwrap();
    let e = fails(&o);
    assert!(
        e.contains("the admin token was refused") && e.contains("MESH_TOKEN"),
        "{e}"
    );

    let missing = c.dir.path().join("no-such-dir");
    let o = c
        .bare()
        .args(["--server", &c.url(), "hosts", "list"])
        .env("MESH_STATE_DIR", &missing)
        .output()
        .unwrap();
    let e = fails(&o);
    assert!(
        e.contains("no admin token") && e.contains("no-such-dir/admin.token"),
        "{e}"
    );
}

#[test]
fn unreachable_server() {
    let c = Coord::start();
    let url = format!("http://127.0.0.1:{}", dead_port());
    let e = fails(
        &c.bare()
            .args(["--server", &url, "--token", "x", "hosts", "list"])
            .output()
            .unwrap(),
    );
    assert!(
        e.contains(&format!("cannot reach the coordinator at {url}")),
        "{e}"
    );
    assert!(
        e.contains("is `meshd coordinator` running? set --server or MESH_SERVER"),
        "{e}"
    );
    let e = fails(
        &c.bare()
            .args(["--server", "https://h:1", "--token", "x", "status"])
            .output()
            .unwrap(),
    );
    assert!(e.contains("https is not supported"), "{e}");
}

#[test]
fn config_file_and_precedence() {
    let c = Coord::start();
    let cfg = c.dir.path().join("meshctl.toml");
    let token_file = c.state_dir().join("admin.token");
    std::fs::write(
        &cfg,
        format!(
            "server = \"{}\"\ntoken_file = \"{}\"\n",
            c.url(),
            token_file.display()
        ),
    )
    .unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = c.bare();
        cmd.env("MESHCTL_CONFIG", &cfg).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let o = run(&["hosts", "list"], &[]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), HOSTS_HEADER);

    // The environment beats the file...
    let dead = format!("http://127.0.0.1:{}", dead_port());
    let e = fails(&run(&["hosts", "list"], &[("MESH_SERVER", &dead)]));
    assert!(e.contains("cannot reach"), "{e}");
    let e = fails(&run(&["hosts", "list"], &[("MESH_TOKEN", "wrong")]));
    assert!(e.contains("refused"), "{e}");
    // ...and the flag beats the environment.
    let o = run(
        &["--server", &c.url(), "hosts", "list"],
        &[("MESH_SERVER", &dead)],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));

    let bad = c.dir.path().join("bad.toml");
    std::fs::write(&bad, "sever = \"typo\"\n").unwrap();
    let e = fails(
        &c.bare()
            .arg("--config")
            .arg(&bad)
            .args(["hosts", "list"])
            .output()
            .unwrap(),
    );
    assert!(e.contains("bad.toml") && e.contains("sever"), "{e}");
}

#[test]
fn completions_and_bad_arguments() {
    let c = Coord::start();
    let o = c.bare().args(["completions", "bash"]).output().unwrap();
    assert!(o.status.success());
    assert!(text(&o.stdout).contains("meshctl"));
    // Completions need no coordinator and no token.
    let o = c
        .bare()
        .args(["--server", "http://127.0.0.1:1", "completions", "zsh"])
        .output()
        .unwrap();
    assert!(o.status.success());

    let e = usage_error(
        &c.bare()
            .args(["token", "create", "--ttl", "5x"])
            .output()
            .unwrap(),
    );
    assert!(e.contains("unknown unit"), "{e}");
    let e = usage_error(
        &c.bare()
            .args(["token", "create", "--uses", "0"])
            .output()
            .unwrap(),
    );
    assert!(e.contains("--uses"), "{e}");
}
