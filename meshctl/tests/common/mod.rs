//! The in-process coordinator meshctl's tests run against (127.0.0.1, a temporary state
//! directory) and meshctl run on it as a subprocess.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use meshd_control::api::{HostView, TokenCreateRequest};
use meshd_control::proto::EndpointReport;
use meshd_control::JoinToken;
use meshd_coordinator::{start, CoordinatorHandle, CoordinatorOptions};
use meshd_tunnel::PrivateKey;

pub struct Coord {
    pub rt: tokio::runtime::Runtime,
    pub handle: Option<CoordinatorHandle>,
    pub dir: tempfile::TempDir,
}

pub fn options(state: &Path) -> CoordinatorOptions {
    let mut o = CoordinatorOptions::new(state);
    o.listen = "127.0.0.1:0".parse().unwrap();
    o.admin_listen = "127.0.0.1:0".parse().unwrap();
    o
}

impl Coord {
    pub fn start() -> Coord {
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

    pub fn restart(&mut self) {
        if let Some(h) = self.handle.take() {
            self.rt.block_on(h.stop());
        }
        let h = self
            .rt
            .block_on(start(options(&self.dir.path().join("state"))))
            .unwrap();
        self.handle = Some(h);
    }

    pub fn run(&self, args: &[&str]) -> Output {
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

    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "meshctl {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn file(&self, name: &str, text: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }

    /// Enrols `name` with a generic token, reporting `underlay` as its endpoint.
    pub fn enrol(&self, name: &str, underlay: [u8; 4]) {
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

    pub fn host(&self, name: &str) -> HostView {
        serde_json::from_str(&self.ok(&["hosts", "show", name, "-o", "json"])).unwrap()
    }
}

impl Drop for Coord {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            self.rt.block_on(h.stop());
        }
    }
}
