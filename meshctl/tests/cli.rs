//! Runs the built `meshctl` binary against an in-process coordinator on 127.0.0.1.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use meshd_agent as client;
use meshd_control::api::{EventView, HostView, StatusView, TokenCreateRequest, TokenView};
use meshd_control::proto::EndpointReport;
use meshd_control::JoinToken;
use meshd_coordinator::{start, CoordinatorHandle, CoordinatorOptions};
use meshd_tunnel::PrivateKey;

const HOSTS_HEADER: &str = "NAME  ID  ADDRESS  STATE  POLICY  MODE  LAST SEEN  ENDPOINT  LABELS\n";

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
                transparent: false,
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
fn admin_token_create_list_revoke() {
    let c = Coord::start();
    let list = c.ok(&["admin", "token", "list"]);
    let lines: Vec<&str> = list.lines().collect();
    assert!(lines[0].starts_with("NAME       STATE   CREATED"), "{list}");
    assert_eq!(lines.len(), 2, "{list}");
    let cols: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(cols[..2], ["bootstrap", "active"], "{list}");

    let created = c.run(&["admin", "token", "create", "ci", "--ttl", "30d"]);
    assert!(created.status.success(), "{}", text(&created.stderr));
    let stdout = text(&created.stdout);
    // Only the token on stdout, so `TOKEN=$(meshctl admin token create ...)` works.
    assert_eq!(stdout.lines().count(), 1, "{stdout:?}");
    let ci = stdout.trim().to_string();
    assert!(ci.starts_with("meshadm-"), "{ci}");
    let note = text(&created.stderr);
    assert!(
        note.contains("admin token ci (active): expires in 30d") && note.contains("shown only now"),
        "{note}"
    );

    // The new token works; list (and its alias) never shows a secret.
    let with_ci = |args: &[&str]| {
        let mut a = vec!["--token", ci.as_str()];
        a.extend_from_slice(args);
        c.run(&a)
    };
    let o = with_ci(&["admin", "token", "ls", "-o", "json"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let raw = text(&o.stdout);
    let v: Vec<meshd_control::api::AdminTokenView> = serde_json::from_str(&raw).unwrap();
    let names: Vec<(&str, &str)> = v
        .iter()
        .map(|t| (t.name.as_str(), t.state.as_str()))
        .collect();
    assert_eq!(names, [("bootstrap", "active"), ("ci", "active")]);
    let bootstrap = std::fs::read_to_string(c.state_dir().join("admin.token")).unwrap();
    assert!(
        !raw.contains(&ci) && !raw.contains(bootstrap.trim()),
        "{raw}"
    );

    let e = fails(&c.run(&["admin", "token", "create", "ci"]));
    assert!(e.contains("already taken"), "{e}");
    let e = fails(&c.run(&["admin", "token", "create", "Not Valid"]));
    assert!(e.contains("invalid"), "{e}");

    // Revoke the state directory's token with the new one: meshctl's default token is refused.
    let o = with_ci(&["admin", "token", "revoke", "bootstrap"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(
        text(&o.stdout),
        "revoked admin token bootstrap (revoked): never expires\n"
    );
    let e = fails(&c.run(&["hosts", "list"]));
    assert!(
        e.contains("admin token was refused") && e.contains("\"bootstrap\" was revoked"),
        "{e}"
    );
    // The last valid token cannot go.
    let e = fails(&with_ci(&["admin", "token", "revoke", "ci"]));
    assert!(
        e.contains("ci was not revoked") && e.contains("last valid admin token"),
        "{e}"
    );
    let e = fails(&with_ci(&["admin", "token", "revoke", "nobody"]));
    assert!(e.contains("no admin token named \"nobody\""), "{e}");
    let o = with_ci(&["admin", "token", "list"]);
    let list = text(&o.stdout);
    let states: Vec<Vec<&str>> = list
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().take(2).collect())
        .collect();
    assert_eq!(
        states,
        [["bootstrap", "revoked"], ["ci", "active"]],
        "{list}"
    );
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
    // https:// is spoken too (tests/tls.rs); here nothing listens.
    let url = format!("https://127.0.0.1:{}", dead_port());
    let e = fails(
        &c.bare()
            .args(["--server", &url, "--token", "x", "--state-dir"])
            .arg(c.dir.path().join("none"))
            .arg("status")
            .output()
            .unwrap(),
    );
    assert!(
        e.contains(&format!("cannot reach the coordinator at {url}")),
        "{e}"
    );
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

const BLOCKS_HEADER: &str = "TIME  HOST  PEER  DIRECTION  PROTO  SRC  DST  REASON  COUNT\n";

/// app1 may reach db1 on tcp/1521; its tests pass against hosts app1, db1 and web1.
const POLICY_V1: &str = "\
rules:
  - name: app1-to-db1
    from: { app: app1 }
    to:   { app: db1, env: prod }
    ports: [tcp/1521]
tests:
  - { from: { app: app1 }, to: { app: db1, env: prod }, port: tcp/1521, expect: allow }
  - { from: { app: web }, to: { app: db1 }, port: tcp/1521, expect: deny }
  - { from: app1, to: db1, port: tcp/1521, expect: allow }
";

/// Adds web -> db1 on tcp/5432.
const POLICY_V2: &str = "\
rules:
  - name: app1-to-db1
    from: { app: app1 }
    to:   { app: db1, env: prod }
    ports: [tcp/1521]
  - name: web-to-db1
    from: { app: web }
    to:   { app: db1 }
    ports: [tcp/5432]
tests:
  - { from: web1, to: db1, port: tcp/5432, expect: allow }
";

/// Its second test fails: web may not reach db1 under this policy.
const POLICY_FAILING: &str = "\
rules:
  - name: app1-to-db1
    from: { app: app1 }
    to:   { app: db1 }
    ports: [tcp/1521]
tests:
  - { from: { app: app1 }, to: { app: db1 }, port: tcp/1521, expect: allow }
  - { from: { app: web }, to: { app: db1 }, port: tcp/1521, expect: allow }
";

impl Coord {
    /// Writes a policy file into the test's directory; returns its path as a string.
    fn policy_file(&self, name: &str, text: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }

    /// `meshctl` pointed at a dead coordinator, with a token: for offline commands.
    fn offline(&self, args: &[&str]) -> Output {
        let url = format!("http://127.0.0.1:{}", dead_port());
        self.bare()
            .args(["--server", &url, "--token", "x"])
            .args(args)
            .output()
            .unwrap()
    }

    fn enrol_three(&self) {
        self.enrol("app1", &[("app", "app1")]);
        self.enrol("db1", &[("app", "db1"), ("env", "prod")]);
        self.enrol("web1", &[("app", "web")]);
    }
}

#[test]
fn policy_apply_history_rollback() {
    let c = Coord::start();
    let s = c.ok(&["status"]);
    assert!(
        s.contains("policy:       no policy: all traffic between hosts is denied"),
        "{s}"
    );
    let v: serde_json::Value = serde_json::from_str(&c.ok(&["status", "-o", "json"])).unwrap();
    assert_eq!(v["policy_version"], serde_json::Value::Null, "{v}");
    assert_eq!(
        c.ok(&["policy", "show"]),
        "no policy: everything is denied (default deny)\n"
    );
    assert_eq!(
        c.ok(&["policy", "history"]),
        "VERSION  APPLIED  RULES  TESTS  COMMENT\n"
    );
    c.enrol_three();

    let v1 = c.policy_file("v1.yaml", POLICY_V1);
    let out = c.ok(&["policy", "apply", &v1]);
    assert_eq!(
        out,
        format!("applied {v1}: policy version 1 is now current (3 tests passed)\n")
    );
    let s = c.ok(&["status"]);
    assert!(s.contains("policy:       version 1 (applied "), "{s}");
    let v: serde_json::Value = serde_json::from_str(&c.ok(&["status", "-o", "json"])).unwrap();
    assert_eq!(v["policy_version"], 1, "{v}");
    assert_eq!(v["hosts"], 3, "{v}");
    let show = c.ok(&["policy", "show"]);
    assert!(show.starts_with("# policy version 1, applied "), "{show}");
    assert!(show.ends_with(POLICY_V1), "{show}");

    // Refused: a failing test. Nothing changes.
    let bad = c.policy_file("bad.yaml", POLICY_FAILING);
    let e = fails(&c.run(&["policy", "apply", &bad]));
    assert!(
        e.contains(&format!(
            "{bad} was not applied: 1 of the policy's tests failed"
        )),
        "{e}"
    );
    assert!(
        e.contains("\n  tests[1] {app: web} -> {app: db1} tcp/1521 expect allow: FAILED: denied"),
        "{e}"
    );
    assert!(!e.contains("tests[0]"), "only failures are listed: {e}");
    // A test naming a host that is not enrolled refuses the apply too.
    let ghost = c.policy_file(
        "ghost.yaml",
        "tests:\n  - { from: ghost, to: db1, port: tcp/1, expect: deny }\n",
    );
    let e = fails(&c.run(&["policy", "apply", &ghost]));
    assert!(e.contains("ghost"), "{e}");

    let v2 = c.policy_file("v2.yaml", POLICY_V2);
    let out = c.ok(&["policy", "apply", &v2]);
    assert!(out.contains("policy version 2 is now current"), "{out}");
    let json: serde_json::Value =
        serde_json::from_str(&c.ok(&["policy", "show", "-o", "json"])).unwrap();
    assert_eq!(json["policy"]["version"], 2, "{json}");

    let out = c.ok(&["policy", "rollback", "1"]);
    assert_eq!(
        out,
        "rolled back to version 1: policy version 3 is now current\n"
    );
    assert!(c.ok(&["policy", "show"]).ends_with(POLICY_V1));
    let h = c.ok(&["policy", "history"]);
    let rows: Vec<Vec<&str>> = h
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 3, "{h}");
    assert_eq!(rows[0][0], "1");
    assert_eq!(rows[0][rows[0].len() - 1], "apply", "{h}");
    assert_eq!((rows[1][0], rows[2][0]), ("2", "3"), "{h}");
    assert!(h.contains("rollback to 1 (current)\n"), "{h}");
    // RULES and TESTS of version 2.
    assert!(
        h.lines().nth(2).unwrap().contains("  2      1      apply"),
        "{h}"
    );
    let json: Vec<serde_json::Value> =
        serde_json::from_str(&c.ok(&["policy", "history", "-o", "json"])).unwrap();
    assert_eq!(json.len(), 3);
    assert_eq!(json[2]["yaml"], POLICY_V1);

    let e = fails(&c.run(&["policy", "rollback", "99"]));
    assert!(
        e.contains("no policy version 99") && e.contains("meshctl policy history"),
        "{e}"
    );
}

#[test]
fn policy_diff_and_explain() {
    let c = Coord::start();
    c.enrol_three();
    let v1 = c.policy_file("v1.yaml", POLICY_V1);
    // Against no policy: app1 gains db1.
    assert_eq!(
        c.ok(&["policy", "diff", &v1]),
        "+ app1 -> db1 tcp/1521\n1 gained, 0 lost\n"
    );
    c.ok(&["policy", "apply", &v1]);
    assert_eq!(
        c.ok(&["policy", "diff", &v1]),
        "no change: no host pair gains or loses access\n"
    );
    let v2 = c.policy_file("v2.yaml", POLICY_V2);
    assert_eq!(
        c.ok(&["policy", "diff", &v2]),
        "+ web1 -> db1 tcp/5432\n1 gained, 0 lost\n"
    );
    let empty = c.policy_file("empty.yaml", "rules: []\n");
    assert_eq!(
        c.ok(&["policy", "diff", &empty]),
        "- app1 -> db1 tcp/1521\n0 gained, 1 lost\n"
    );
    let json: Vec<serde_json::Value> =
        serde_json::from_str(&c.ok(&["policy", "diff", &v2, "-o", "json"])).unwrap();
    assert_eq!(json.len(), 1);
    assert_eq!(json[0]["from"], "web1");
    assert_eq!(json[0]["kind"], "gained");
    // A file that does not parse is caught before any request.
    let broken = c.policy_file("broken.yaml", "rules: [\n");
    let o = c.run(&["policy", "diff", &broken]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).starts_with(&format!("{broken}:2:")),
        "{}",
        text(&o.stderr)
    );

    let explain = |from: &str, to: &str, port: &str| {
        c.ok(&[
            "policy", "explain", "--from", from, "--to", to, "--port", port,
        ])
    };
    assert_eq!(
        explain("app1", "db1", "tcp/1521"),
        "allowed: app1 -> db1 tcp/1521 by rule app1-to-db1\n"
    );
    assert_eq!(
        explain("web1", "db1", "tcp/1521"),
        "denied: web1 -> db1 tcp/1521 (no rule allows it: default deny)\n"
    );
    // Direction matters: db1 may not open connections to app1.
    assert!(explain("db1", "app1", "tcp/1521").starts_with("denied:"));
    assert!(explain("app1", "db1", "udp/1521").starts_with("denied:"));
    let json: serde_json::Value = serde_json::from_str(&c.ok(&[
        "policy", "explain", "--from", "app1", "--to", "db1", "--port", "tcp/1521", "-o", "json",
    ]))
    .unwrap();
    assert_eq!(json["allowed"], true);
    assert_eq!(json["rule"], "app1-to-db1");
    let e = fails(&c.run(&[
        "policy", "explain", "--from", "nope", "--to", "db1", "--port", "tcp/1521",
    ]));
    assert!(
        e.contains("nope") && e.contains("meshctl hosts list"),
        "{e}"
    );
    let e = usage_error(&c.run(&[
        "policy", "explain", "--from", "app1", "--to", "db1", "--port", "1521",
    ]));
    assert!(e.contains("unknown port spec"), "{e}");

    // A quarantined host is denied everything.
    c.ok(&["host", "quarantine", "db1"]);
    assert!(explain("app1", "db1", "tcp/1521").starts_with("denied:"));
    c.ok(&["host", "release", "db1"]);
    assert!(explain("app1", "db1", "tcp/1521").starts_with("allowed:"));
}

#[test]
fn policy_check_offline_and_online() {
    let c = Coord::start();
    // A YAML error: FILE:LINE:COLUMN on stderr, exit 1, no coordinator needed.
    let bad_port = c.policy_file(
        "port.yaml",
        "rules:\n  - name: a\n    from: {}\n    to: {}\n    ports: [tcp/99999]\n",
    );
    let o = c.offline(&["policy", "check", &bad_port]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let e = text(&o.stderr);
    assert!(
        e.starts_with(&format!("{bad_port}:5:13: rules[0].ports[0]: bad port")),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
    assert_eq!(text(&o.stdout), "");
    let indent = c.policy_file("indent.yaml", "rules:\n  - name: a\n   from: {}\n");
    let o = c.offline(&["policy", "check", &indent]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).starts_with(&format!("{indent}:2:5: ")),
        "{}",
        text(&o.stderr)
    );

    // Label-set tests run offline.
    let labels_only = c.policy_file(
        "labels.yaml",
        &POLICY_V1.replace(
            "  - { from: app1, to: db1, port: tcp/1521, expect: allow }\n",
            "",
        ),
    );
    let o = c.offline(&["policy", "check", &labels_only]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(out.starts_with("ok          tests[0] "), "{out}");
    assert!(
        out.ends_with(&format!(
            "{labels_only}: 1 rule, 2 tests: 2 passed, 0 failed\n"
        )),
        "{out}"
    );

    // A failing test: exit 1, says which.
    let failing = c.policy_file("failing.yaml", POLICY_FAILING);
    let o = c.offline(&["policy", "check", &failing]);
    let e = fails(&o);
    assert!(
        e.contains(&format!("{failing}: 1 of 2 tests failed: tests[1]")),
        "{e}"
    );
    assert!(
        text(&o.stdout).contains(
            "FAILED      tests[1] {app: web} -> {app: db1} tcp/1521 expect allow: \
             denied (no rule allows it: default deny), expected allow"
        ),
        "{}",
        text(&o.stdout)
    );

    // Host-name tests without a coordinator: unresolved, not failed.
    let v1 = c.policy_file("v1.yaml", POLICY_V1);
    let o = c.offline(&["policy", "check", &v1]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(
        out.contains("UNRESOLVED  tests[2] app1 -> db1 tcp/1521 expect allow: host app1 needs"),
        "{out}"
    );
    assert!(out.contains("2 passed, 0 failed, 1 unresolved (host names not checked: cannot reach the coordinator"), "{out}");
    let o = c.run(&["policy", "check", "--offline", &v1]);
    assert!(o.status.success());
    assert!(text(&o.stdout).contains("(host names not checked: --offline)"));

    // With the coordinator: resolved against its inventory; unknown names fail.
    let o = c.run(&["policy", "check", &v1]);
    let e = fails(&o);
    assert!(e.contains("1 of 3 tests failed: tests[2]"), "{e}");
    assert!(
        text(&o.stdout).contains("no host named app1 in the coordinator's inventory"),
        "{}",
        text(&o.stdout)
    );
    c.enrol_three();
    let out = c.ok(&["policy", "check", &v1]);
    assert!(
        out.contains(
            "ok          tests[2] app1 -> db1 tcp/1521 expect allow: allowed by rule app1-to-db1"
        ),
        "{out}"
    );
    assert!(
        out.ends_with(&format!(
            "3 passed, 0 failed (host names resolved at {})\n",
            c.url()
        )),
        "{out}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&c.ok(&["policy", "check", &v1, "-o", "json"])).unwrap();
    assert_eq!(json["ok"], true, "{json}");
    assert_eq!(json["tests"].as_array().unwrap().len(), 3);
    assert_eq!(json["tests"][2]["outcome"], "pass");

    // Standard input.
    let mut cmd = c.bare();
    cmd.args([
        "--server",
        "http://127.0.0.1:1",
        "--token",
        "x",
        "policy",
        "check",
        "-",
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"rules:\n  - name: a\n    from: {}\n    to: {}\n    ports: [tcp/1]\n    colour: red\n").unwrap();
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).starts_with("<stdin>:6:") && text(&o.stderr).contains("colour"),
        "{}",
        text(&o.stderr)
    );
    let e = fails(&c.offline(&["policy", "check", "/no/such/file.yaml"]));
    assert!(
        e.contains("cannot read policy file /no/such/file.yaml"),
        "{e}"
    );
}

#[test]
fn blocks_on_an_empty_coordinator() {
    let c = Coord::start();
    assert_eq!(c.ok(&["blocks"]), BLOCKS_HEADER);
    assert_eq!(
        c.ok(&["blocks", "--host", "db1", "--since", "10m"]),
        BLOCKS_HEADER
    );
    assert_eq!(c.ok(&["blocks", "-o", "json"]).trim(), "[]");
    let e = usage_error(&c.run(&["blocks", "--since", "ten"]));
    assert!(e.contains("--since"), "{e}");
}

#[test]
fn host_quarantine_release_revoke() {
    let c = Coord::start();
    c.enrol("db1", &[("app", "db1")]);
    let out = c.ok(&["host", "quarantine", "db1"]);
    assert!(
        out.starts_with("quarantined host db1 (id ") && out.contains("meshctl host release db1"),
        "{out}"
    );
    // Twice is fine.
    c.ok(&["host", "quarantine", "db1"]);
    let out = c.ok(&["host", "release", "db1"]);
    assert!(out.starts_with("released host db1 (id "), "{out}");
    let h: HostView =
        serde_json::from_str(&c.ok(&["hosts", "quarantine", "db1", "-o", "json"])).unwrap();
    assert_eq!(h.name, "db1");
    c.ok(&["host", "release", "db1"]);

    for cmd in ["quarantine", "release", "revoke"] {
        let e =
            fails(&c.run(&["host", cmd, "nope", "--yes"][..if cmd == "revoke" { 4 } else { 3 }]));
        assert!(
            e.contains("no host named \"nope\"") && e.contains("meshctl hosts list"),
            "{cmd}: {e}"
        );
    }

    // No terminal and no --yes: refuse rather than hang or revoke.
    let e = fails(&c.run(&["host", "revoke", "db1"]));
    assert!(e.contains("--yes"), "{e}");
    assert!(c.ok(&["hosts", "list"]).contains("\ndb1 "));
    let out = c.ok(&["host", "revoke", "db1", "--yes"]);
    assert!(out.starts_with("revoked host db1 (id "), "{out}");
    assert_eq!(c.ok(&["hosts", "list"]), HOSTS_HEADER);
    let e = fails(&c.run(&["host", "quarantine", "db1"]));
    assert!(e.contains("no host named \"db1\""), "{e}");
}

const EVENTS_HEADER: &str = "TIME  KIND  DETAIL\n";

#[test]
fn events_table_and_json() {
    let c = Coord::start();
    assert_eq!(c.ok(&["events"]), EVENTS_HEADER);
    assert_eq!(c.ok(&["events", "-o", "json"]).trim(), "[]");

    c.enrol("db1", &[("app", "db1")]);
    c.ok(&["host", "quarantine", "db1"]);
    c.ok(&["host", "release", "db1"]);
    // A second live connection for web1's key is refused and logged.
    let key = PrivateKey::generate();
    let first = c.rt.block_on(async {
        let h = c.handle();
        let t = h.create_token(TokenCreateRequest::default()).await.unwrap();
        let t = JoinToken::parse(&t.token).unwrap();
        let ep = EndpointReport {
            addrs: vec![SocketAddr::from(([192, 0, 2, 2], 51820))],
            listen_port: Some(51820),
            transparent: false,
        };
        client::enrol(&t, "web1", &key, ep.clone()).await.unwrap();
        let session = |ep| {
            client::spawn_session(client::SessionConfig::new(
                h.control_addr(),
                h.public_key(),
                key.clone(),
                ep,
            ))
        };
        let within = std::time::Duration::from_secs(20);
        let first = session(ep.clone());
        let mut st = first.state();
        tokio::time::timeout(
            within,
            st.wait_for(|s| matches!(s, client::SessionState::Connected { .. })),
        )
        .await
        .unwrap()
        .unwrap();
        let second = session(ep);
        let mut st = second.state();
        tokio::time::timeout(
            within,
            st.wait_for(|s| {
                matches!(s, client::SessionState::Connecting { last_error: Some(e), .. }
                    if e.contains("already live"))
            }),
        )
        .await
        .unwrap()
        .unwrap();
        second.shutdown().await;
        first
    });

    let table = c.ok(&["events"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["TIME", "KIND", "DETAIL"],
        "{table}"
    );
    let kinds: Vec<&str> = lines[1..]
        .iter()
        .map(|l| l.split_whitespace().nth(1).unwrap_or(""))
        .collect();
    assert_eq!(kinds[..2], ["host_quarantined", "host_released"], "{table}");
    assert!(
        kinds[2..].iter().all(|k| *k == "duplicate_connection"),
        "{table}"
    );
    assert!(kinds.len() >= 3, "{table}");
    let dup = format!("key {} from 127.0.0.1", key.public_key());
    assert!(lines[3].ends_with(&dup), "{table}");
    // Times as the other commands show them (RFC 3339, UTC).
    let time = lines[1].split_whitespace().next().unwrap_or("");
    assert!(
        time.len() == 20 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
        "{table}"
    );

    let all: Vec<EventView> = serde_json::from_str(&c.ok(&["events", "-o", "json"])).unwrap();
    assert_eq!(all.len(), kinds.len());
    assert_eq!(all[0].kind, "host_quarantined");
    assert!(all[0].detail.starts_with("db1 "), "{all:?}");
    let last: Vec<EventView> =
        serde_json::from_str(&c.ok(&["events", "--limit", "1", "-o", "json"])).unwrap();
    assert_eq!(last.as_slice(), &all[all.len() - 1..]);
    assert_eq!(last[0].detail, dup);
    let e = usage_error(&c.run(&["events", "--limit", "0"]));
    assert!(e.contains("--limit"), "{e}");
    c.rt.block_on(first.shutdown());
}

#[test]
fn version_names_the_commit() {
    let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let line = text(&out.stdout);
    let line = line.trim();
    let commit = line
        .strip_prefix(&format!("meshctl {} (", env!("CARGO_PKG_VERSION")))
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{line:?} is not `meshctl VERSION (COMMIT)`"));
    let commit = commit.strip_suffix("-dirty").unwrap_or(commit);
    if commit != "unknown" {
        assert!(
            commit.len() >= 7 && commit.bytes().all(|b| b.is_ascii_hexdigit()),
            "{line:?}"
        );
        let head = Command::new("git")
            .args(["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success());
        if let Some(head) = head {
            assert!(text(&head.stdout).starts_with(commit), "{line:?}");
        }
    }
    // Subcommands say the same.
    let sub = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(["hosts", "--version"])
        .output()
        .unwrap();
    assert!(
        text(&sub.stdout).contains(&format!("({commit}")),
        "{}",
        text(&sub.stdout)
    );
}
