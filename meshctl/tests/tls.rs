//! `meshctl` against a coordinator whose admin API speaks HTTPS (bound to 0.0.0.0, reached on
//! 127.0.0.1): trust from the state directory, --ca, MESH_CA and the config file, and the
//! errors for an untrusted certificate, a wrong name and a scheme mismatch.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use meshd_coordinator::options::AdminTlsFiles;
use meshd_coordinator::{start, CoordinatorHandle, CoordinatorOptions};

struct Coord {
    rt: tokio::runtime::Runtime,
    handle: Option<CoordinatorHandle>,
    dir: tempfile::TempDir,
    empty_config: PathBuf,
}

impl Coord {
    fn start(admin: &str, tweak: impl FnOnce(&mut CoordinatorOptions, &Path)) -> Coord {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut o = CoordinatorOptions::new(dir.path().join("state"));
        o.listen = "127.0.0.1:0".parse().unwrap();
        o.admin_listen = admin.parse().unwrap();
        tweak(&mut o, dir.path());
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

    fn port(&self) -> u16 {
        self.handle.as_ref().unwrap().admin_addr().port()
    }

    fn https(&self) -> String {
        format!("https://127.0.0.1:{}", self.port())
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn cert(&self) -> PathBuf {
        self.state_dir().join("admin-cert.pem")
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.state_dir().join("admin.token"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// `meshctl` with no settings from the environment or config files.
    fn bare(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_meshctl"));
        c.env_remove("MESH_SERVER")
            .env_remove("MESH_TOKEN")
            .env_remove("MESH_STATE_DIR")
            .env_remove("MESH_CA")
            .env("MESHCTL_CONFIG", &self.empty_config)
            .stdin(Stdio::null());
        c
    }

    /// `meshctl --server URL --token TOKEN --state-dir <empty dir> args...`: no CA by default.
    fn with_token(&self, server: &str, args: &[&str]) -> Output {
        let mut c = self.bare();
        c.arg("--server")
            .arg(server)
            .arg("--token")
            .arg(self.token())
            .arg("--state-dir")
            .arg(self.dir.path().join("no-state"))
            .args(args);
        c.output().unwrap()
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

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "meshctl failed: {}", text(&o.stderr));
    text(&o.stdout)
}

/// A runtime failure: exit status 1 with one `meshctl: error:` line and no panic.
fn fails(o: &Output) -> String {
    assert!(
        !o.status.success(),
        "expected failure, got stdout {}",
        text(&o.stdout)
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let e = text(&o.stderr);
    assert!(
        e.starts_with("meshctl: error: ") && !e.contains("panicked"),
        "{e}"
    );
    e
}

fn self_signed(names: &[&str]) -> (String, String) {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let ck = rcgen::generate_simple_self_signed(names).unwrap();
    (ck.cert.pem(), ck.signing_key.serialize_pem())
}

#[test]
fn https_with_the_coordinators_certificate() {
    let c = Coord::start("0.0.0.0:0", |_, _| {});
    let url = c.https();

    // Default: <state-dir>/admin-cert.pem next to admin.token.
    let mut cmd = c.bare();
    cmd.args(["--server", &url, "--state-dir"])
        .arg(c.state_dir())
        .args(["-o", "json", "hosts", "list"]);
    assert_eq!(ok(&cmd.output().unwrap()).trim(), "[]");

    // --ca, by address and by name.
    let ca = c.cert();
    let ca = ca.to_str().unwrap();
    ok(&c.with_token(&url, &["--ca", ca, "status"]));
    let by_name = format!("https://localhost:{}/", c.port());
    ok(&c.with_token(&by_name, &["--ca", ca, "hosts", "list"]));

    // MESH_CA.
    let mut cmd = c.bare();
    cmd.env("MESH_CA", ca)
        .args(["--server", &url, "--token", &c.token(), "hosts", "list"]);
    ok(&cmd.output().unwrap());

    // `ca_file` in the config file, relative to it.
    let conf_dir = c.dir.path().join("conf");
    std::fs::create_dir(&conf_dir).unwrap();
    std::fs::copy(c.cert(), conf_dir.join("coordinator.pem")).unwrap();
    let conf = conf_dir.join("meshctl.toml");
    std::fs::write(
        &conf,
        format!(
            "server = \"{url}\"\ntoken = \"{}\"\nca_file = \"coordinator.pem\"\n",
            c.token()
        ),
    )
    .unwrap();
    let mut cmd = c.bare();
    cmd.env("MESHCTL_CONFIG", &conf)
        .arg("--state-dir")
        .arg(c.dir.path().join("no-state"))
        .args(["hosts", "list"]);
    ok(&cmd.output().unwrap());
}

#[test]
fn untrusted_certificate_says_what_to_do() {
    let c = Coord::start("0.0.0.0:0", |_, _| {});
    let url = c.https();

    // Another certificate given as the CA.
    let other = c.dir.path().join("other.pem");
    std::fs::write(&other, self_signed(&["127.0.0.1"]).0).unwrap();
    let e = fails(&c.with_token(&url, &["--ca", other.to_str().unwrap(), "hosts", "list"]));
    assert!(
        e.contains("not signed by a trusted certificate")
            && e.contains("other.pem")
            && e.contains("pass --ca <coordinator state-dir>/admin-cert.pem"),
        "{e}"
    );

    // No CA at all (no admin-cert.pem in --state-dir): the system's roots do not know it.
    let e = fails(&c.with_token(&url, &["hosts", "list"]));
    assert!(
        e.contains("system's trusted roots") && e.contains("pass --ca"),
        "{e}"
    );

    // A CA file that is not there.
    let missing = c.dir.path().join("missing.pem");
    let e = fails(&c.with_token(&url, &["--ca", missing.to_str().unwrap(), "status"]));
    assert!(
        e.contains("cannot read the CA file") && e.contains("missing.pem"),
        "{e}"
    );
}

#[test]
fn certificate_for_another_name() {
    let (cert, key) = self_signed(&["coordinator.mesh.test"]);
    let c = Coord::start("0.0.0.0:0", |o, dir| {
        let files = AdminTlsFiles {
            cert: dir.join("c.pem"),
            key: dir.join("k.pem"),
        };
        std::fs::write(&files.cert, &cert).unwrap();
        std::fs::write(&files.key, &key).unwrap();
        o.admin_tls_files = Some(files);
    });
    let ca = c.dir.path().join("c.pem");
    let e = fails(&c.with_token(&c.https(), &["--ca", ca.to_str().unwrap(), "status"]));
    assert!(
        e.contains("not valid for the name") && e.contains("--admin-tls-cert"),
        "{e}"
    );
}

#[test]
fn scheme_mismatch() {
    // http:// to the HTTPS port: the coordinator's 400 says to use https://.
    let c = Coord::start("0.0.0.0:0", |_, _| {});
    let http = format!("http://127.0.0.1:{}", c.port());
    let e = fails(&c.with_token(&http, &["hosts", "list"]));
    assert!(
        e.contains("HTTPS only") && e.contains(&format!("https://127.0.0.1:{}", c.port())),
        "{e}"
    );

    // https:// to a plain HTTP (loopback) admin API.
    let plain = Coord::start("127.0.0.1:0", |_, _| {});
    let e = fails(&plain.with_token(&plain.https(), &["hosts", "list"]));
    assert!(e.contains("TLS handshake") && e.contains("http://"), "{e}");
}
