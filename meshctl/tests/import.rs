//! `meshctl import` against an in-process coordinator on 127.0.0.1: a broken file is refused
//! with its line numbers and changes nothing (also after a restart); a host imported by
//! underlay IP gets its labels when it enrols with a generic token; declared flows are shown
//! as a policy diff and applied with --apply.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use meshd_control::api::{EventView, HostView, TokenCreateRequest};
use meshd_control::proto::EndpointReport;
use meshd_control::JoinToken;
use meshd_coordinator::{start, CoordinatorHandle, CoordinatorOptions};
use meshd_tunnel::PrivateKey;

struct Coord {
    rt: tokio::runtime::Runtime,
    handle: Option<CoordinatorHandle>,
    dir: tempfile::TempDir,
}

fn options(state: &Path) -> CoordinatorOptions {
    let mut o = CoordinatorOptions::new(state);
    o.listen = "127.0.0.1:0".parse().unwrap();
    o.admin_listen = "127.0.0.1:0".parse().unwrap();
    o
}

impl Coord {
    fn start() -> Coord {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("empty.toml"), "").unwrap();
        let handle = rt
            .block_on(start(options(&dir.path().join("state"))))
            .unwrap();
        Coord {
            rt,
            handle: Some(handle),
            dir,
        }
    }

    fn restart(&mut self) {
        if let Some(h) = self.handle.take() {
            self.rt.block_on(h.stop());
        }
        let h = self
            .rt
            .block_on(start(options(&self.dir.path().join("state"))))
            .unwrap();
        self.handle = Some(h);
    }

    fn run(&self, args: &[&str]) -> Output {
        let h = self.handle.as_ref().unwrap();
        Command::new(env!("CARGO_BIN_EXE_meshctl"))
            .env_remove("MESH_SERVER")
            .env_remove("MESH_TOKEN")
            .env_remove("MESH_STATE_DIR")
            .env("MESHCTL_CONFIG", self.dir.path().join("empty.toml"))
            .stdin(Stdio::null())
            .arg("--server")
            .arg(format!("http://{}", h.admin_addr()))
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "meshctl {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn file(&self, name: &str, text: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }

    /// Enrols `name` with a generic token, reporting `underlay` as its endpoint.
    fn enrol(&self, name: &str, underlay: [u8; 4]) {
        let h = self.handle.as_ref().unwrap();
        self.rt.block_on(async {
            let t = h
                .create_token(TokenCreateRequest {
                    labels: [("image".to_string(), "generic".to_string())].into(),
                    ..Default::default()
                })
                .await
                .unwrap();
            let t = JoinToken::parse(&t.token).unwrap();
            let ep = EndpointReport {
                addrs: vec![SocketAddr::from((underlay, 51820))],
                listen_port: Some(51820),
                transparent: false,
            };
            meshd_agent::enrol(&t, name, &PrivateKey::generate(), ep)
                .await
                .unwrap();
        });
    }

    fn host(&self, name: &str) -> HostView {
        serde_json::from_str(&self.ok(&["hosts", "show", name, "-o", "json"])).unwrap()
    }

    fn events(&self) -> Vec<EventView> {
        serde_json::from_str(&self.ok(&["events", "-o", "json"])).unwrap()
    }
}

impl Drop for Coord {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            self.rt.block_on(h.stop());
        }
    }
}

#[test]
fn a_broken_file_is_refused_with_its_lines_and_changes_nothing() {
    let mut c = Coord::start();
    c.enrol("web-1", [192, 0, 2, 10]);
    let before = c.ok(&["hosts", "list", "-o", "json"]);
    let events_before = c.events();
    let f = c.file(
        "cmdb.csv",
        "hostname,ip,labels\n\
         web-1,,app=web;env=prod\n\
         db-1,192.0.2.300,app=db\n\
         db-2,192.0.2.21,app=d b\n\
         from-app,to-app,port\n\
         web,db,http\n",
    );
    let o = c.run(&["import", &f]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    for line in [3, 4, 6] {
        assert!(err.contains(&format!("{f}:{line}: ")), "line {line}: {err}");
    }
    assert!(!err.contains(&format!("{f}:2:")), "{err}");
    assert!(err.contains("nothing was imported"), "{err}");
    assert_eq!(c.ok(&["hosts", "list", "-o", "json"]), before);
    // JSON too, with the lines of the objects.
    let j = c.file(
        "cmdb.json",
        "{\"hosts\": [\n  {\"hostname\": \"web-1\", \"labels\": {\"app\": \"web\"}},\n  {\"ip\": \"nope\", \"labels\": {\"app\": \"db\"}}\n]}\n",
    );
    let o = c.run(&["import", &j]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("{j}:3: \"nope\" is not an IP address")),
        "{err}"
    );
    // Nothing reached the store: the same after a restart.
    c.restart();
    assert_eq!(c.ok(&["hosts", "list", "-o", "json"]), before);
    assert_eq!(c.events(), events_before);
    assert_eq!(c.host("web-1").labels.get("app"), None);
}

#[test]
fn an_unenrolled_host_imported_by_ip_gets_its_labels_when_it_enrols() {
    let mut c = Coord::start();
    c.enrol("web-1", [192, 0, 2, 10]);
    let f = c.file(
        "cmdb.json",
        r#"{"hosts": [{"hostname": "web-1", "labels": {"app": "web"}},
                     {"ip": "192.0.2.20", "labels": "app=db;env=prod"}],
            "flows": [{"from": "web", "to": "db", "port": 5432}]}"#,
    );
    let out = c.ok(&["import", &f]);
    assert!(out.contains("2 host records created, 0 updated"), "{out}");
    assert!(out.contains("host web-1 relabelled"), "{out}");
    assert!(out.contains("--apply"), "{out}");
    assert_eq!(c.host("web-1").labels["app"], "web");
    // The records survive a restart; then the host enrols from that address.
    c.restart();
    c.enrol("anything", [192, 0, 2, 20]);
    let h = c.host("anything");
    assert_eq!(h.labels["app"], "db", "{:?}", h.labels);
    assert_eq!(h.labels["env"], "prod");
    assert_eq!(
        h.labels["image"], "generic",
        "the token's other labels stay"
    );
    let ev = c.events();
    let kinds: Vec<&str> = ev.iter().map(|e| e.kind.as_str()).collect();
    assert!(kinds.contains(&"cmdb_imported"), "{kinds:?}");
    assert!(
        ev.iter()
            .any(|e| e.kind == "host_labels_from_cmdb" && e.detail.contains("192.0.2.20")),
        "{ev:?}"
    );
    // Now the flow's rule adds access: shown, then applied.
    let out = c.ok(&["import", &f]);
    assert!(out.contains("+ web-1 -> anything tcp/5432"), "{out}");
    let policy = c.dir.path().join("proposed.yaml");
    let out = c.ok(&[
        "import",
        &f,
        "--apply",
        "--write-policy",
        policy.to_str().unwrap(),
    ]);
    assert!(out.contains("policy version 1 is now current"), "{out}");
    let yaml = std::fs::read_to_string(&policy).unwrap();
    assert!(yaml.contains("cmdb-web-to-db"), "{yaml}");
    assert!(c.ok(&["policy", "show"]).contains("cmdb-web-to-db"));
    // CSV with one column per label key updates the record (no new one).
    let csv = c.file(
        "cmdb.csv",
        "Host Name,IP Address,app,tier\n,192.0.2.20,db,gold\n",
    );
    let out = c.ok(&["import", &csv]);
    assert!(out.contains("0 host records created, 1 updated"), "{out}");
    assert_eq!(c.host("anything").labels["tier"], "gold");
}
