//! `meshctl policy mode`, `status` and `hosts list` for learning mode, through the built binary
//! against an in-process coordinator on 127.0.0.1.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use meshd_control::api::{PolicyModeView, TokenCreateRequest};
use meshd_control::proto::EndpointReport;
use meshd_control::JoinToken;
use meshd_coordinator::{start, CoordinatorHandle, CoordinatorOptions};
use meshd_tunnel::PrivateKey;

struct Coord {
    rt: tokio::runtime::Runtime,
    handle: Option<CoordinatorHandle>,
    dir: tempfile::TempDir,
}

impl Coord {
    fn start() -> Coord {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut o = CoordinatorOptions::new(dir.path().join("state"));
        o.listen = "127.0.0.1:0".parse().unwrap();
        o.admin_listen = "127.0.0.1:0".parse().unwrap();
        let handle = rt.block_on(start(o)).unwrap();
        std::fs::write(dir.path().join("empty.toml"), "").unwrap();
        Coord {
            rt,
            handle: Some(handle),
            dir,
        }
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
        assert!(o.status.success(), "meshctl {args:?}: {}", text(&o.stderr));
        text(&o.stdout)
    }

    fn file(&self, name: &str, body: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    fn enrol(&self, name: &str, app: &str) {
        let req = TokenCreateRequest {
            labels: [("app".to_string(), app.to_string())].into(),
            ttl_secs: Some(600),
            uses: Some(1),
        };
        self.rt.block_on(async {
            let h = self.handle.as_ref().unwrap();
            let t = JoinToken::parse(&h.create_token(req).await.unwrap().token).unwrap();
            let ep = EndpointReport {
                addrs: vec![SocketAddr::from(([192, 0, 2, 1], 51820))],
                listen_port: Some(51820),
                transparent: false,
            };
            meshd_agent::enrol(&t, name, &PrivateKey::generate(), ep)
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

#[test]
fn policy_mode_status_and_hosts_say_who_is_not_enforcing() {
    let c = Coord::start();
    for (n, app) in [
        ("legacy-1", "legacy"),
        ("legacy-2", "legacy"),
        ("web-1", "web"),
    ] {
        c.enrol(n, app);
    }
    let s = c.ok(&["status"]);
    assert!(
        s.contains("enforcement:  all hosts enforce the policy\n"),
        "{s}"
    );
    let m = c.ok(&["policy", "mode"]);
    assert!(
        m.contains("every host enforces the policy (3 hosts)"),
        "{m}"
    );

    let out = c.ok(&["policy", "mode", "learn", "--group", "app=legacy"]);
    assert!(
        out.contains("{app: legacy}  runtime  legacy-1, legacy-2"),
        "{out}"
    );
    assert!(
        out.contains("learning hosts: legacy-1, legacy-2\n"),
        "{out}"
    );
    let s = c.ok(&["status"]);
    assert!(
        s.contains("NOT ENFORCING: 2 hosts in learning mode (legacy-1, legacy-2)"),
        "{s}"
    );
    let hosts = c.ok(&["hosts", "list"]);
    let policy_of = |name: &str| {
        hosts
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap()
            .split_whitespace()
            .nth(4)
            .unwrap()
            .to_string()
    };
    assert_eq!(
        (policy_of("legacy-1"), policy_of("web-1")),
        ("learn".into(), "enforce".into()),
        "{hosts}"
    );
    let v: PolicyModeView = serde_json::from_str(&c.ok(&["policy", "mode", "-o", "json"])).unwrap();
    assert_eq!(v.learning, ["legacy-1", "legacy-2"]);

    // A group the file declares: refused, naming the file.
    let p = c.file("p.yaml", "learn:\n  - { app: web }\nrules: []\n");
    c.ok(&["policy", "apply", p.to_str().unwrap()]);
    let o = c.run(&["policy", "mode", "enforce", "--group", "app=web"]);
    assert_eq!(o.status.code(), Some(1));
    let e = text(&o.stderr);
    assert!(
        e.starts_with(
            "meshctl: error: refused: group app=web learns because the policy file says so"
        ),
        "{e}"
    );
    assert!(e.contains("meshctl policy apply"), "{e}");
    // enforce ends the runtime groups; the file's stays, and says where to change it.
    let out = c.ok(&["policy", "mode", "enforce"]);
    assert!(out.contains("learning hosts: web-1\n"), "{out}");
    assert!(out.contains("(file: change the policy file's"), "{out}");
    let o = c.run(&["policy", "mode", "enforce"]);
    assert!(
        text(&o.stderr).contains("declared by the policy file"),
        "{}",
        text(&o.stderr)
    );
    // A group needs a mode (usage error, no request).
    assert_eq!(
        c.run(&["policy", "mode", "--group", "app=x"]).status.code(),
        Some(2)
    );
}
