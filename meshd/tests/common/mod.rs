//! Shared helpers for meshd's end-to-end tests: hosts in a [`meshd_lab::Lab`] running meshd,
//! and traffic generated from this test process inside a namespace (a thread that `setns`es).
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshd_lab::{wait_for, Cmd, Host, Lab, ProcHandle};
use meshd_tunnel::PrivateKey;
use sha2::{Digest, Sha256};

/// The meshd binary under test.
pub fn meshd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_meshd")
}

/// Overlay address of lab host `i`.
pub fn overlay(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(100, 64, 0, (i + 1) as u8)
}

/// One meshd host's files.
pub struct Node {
    pub idx: usize,
    pub key: PrivateKey,
    pub dir: PathBuf,
    pub port: u16,
}

impl Node {
    pub fn new(lab: &Lab, idx: usize) -> Node {
        let dir = lab.dir().join(format!("node{idx}"));
        std::fs::create_dir_all(&dir).unwrap();
        let key = PrivateKey::generate();
        meshd_config::write_private_key(dir.join("host.key"), &key).unwrap();
        Node {
            idx,
            key,
            dir,
            port: 51820,
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("meshd.toml")
    }

    /// This node's UAPI directory (`uapi_dir = "uapi"`: every lab host has its own, since
    /// /var/run/wireguard is shared by all namespaces).
    pub fn uapi_dir(&self) -> PathBuf {
        self.dir.join("uapi")
    }

    /// Writes a config naming `peers` as (node, endpoint-known).
    pub fn write_config(&self, lab: &Lab, peers: &[(&Node, bool)], extra_peer_toml: &str) {
        let mut s = format!(
            "[interface]\nname = \"mesh0\"\nprivate_key_file = \"host.key\"\nlisten_port = {}\naddress = \"{}/24\"\nmtu = 1420\nuapi_dir = \"uapi\"\n",
            self.port,
            overlay(self.idx)
        );
        for (p, with_ep) in peers {
            s += &format!(
                "\n[[peer]]\nname = \"h{}\"\npublic_key = \"{}\"\nallowed_ips = [\"{}/32\"]\n",
                p.idx,
                p.key.public_key(),
                overlay(p.idx)
            );
            if *with_ep {
                s += &format!(
                    "endpoint = \"{}:{}\"\n",
                    lab.host(p.idx).underlay_ip(),
                    p.port
                );
            }
        }
        s += extra_peer_toml;
        std::fs::write(self.config_path(), s).unwrap();
    }

    /// Starts `meshd up` and waits until its status socket answers.
    pub fn start(&self, lab: &Lab) -> ProcHandle {
        self.start_with(lab, &[])
    }

    /// Starts `meshd up` with extra arguments and waits until its status socket answers.
    pub fn start_with(&self, lab: &Lab, extra: &[&str]) -> ProcHandle {
        let host = lab.host(self.idx);
        let proc = host
            .spawn(
                Cmd::new(meshd_bin())
                    .args(["up", "--config"])
                    .arg(self.config_path())
                    .arg("--state-dir")
                    .arg(self.dir.join("state"))
                    .args(extra.iter().copied())
                    .env("RUST_LOG", "debug")
                    .label(format!("meshd-h{}", self.idx)),
            )
            .unwrap();
        let up = wait_for(Duration::from_secs(10), Duration::from_millis(50), || {
            status_json(host).is_some()
        });
        assert!(
            up,
            "meshd on h{} did not come up: {}",
            self.idx,
            proc.stderr().unwrap_or_default()
        );
        proc
    }
}

/// `meshd status --json` in the host's namespace.
pub fn status_json(host: &Host) -> Option<serde_json::Value> {
    let out = host
        .exec(meshd_bin(), ["status", "--json", "--interface", "mesh0"])
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Runs `f` on a thread that has entered network namespace `ns` (sockets it makes live there).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap();
        // SAFETY: setns on a valid namespace fd; affects only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

/// Deterministic pseudo-random bytes (xorshift), so no RNG crate is needed.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `len` bytes over TCP from namespace `from` to `to_addr:port` (a listener in `to_ns`)
/// and returns (sent digest, received digest, seconds).
pub fn tcp_transfer(
    from: &str,
    to_ns: &str,
    to_addr: IpAddr,
    port: u16,
    len: usize,
) -> ([u8; 32], [u8; 32], f64) {
    let listener = in_netns(to_ns, move || {
        TcpListener::bind((IpAddr::from([0u8; 4]), port)).unwrap()
    });
    let server = std::thread::spawn(move || {
        listener.set_nonblocking(false).unwrap();
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        <[u8; 32]>::from(h.finalize())
    });
    let data = pattern(len, 0x5eed);
    let sent: [u8; 32] = Sha256::digest(&data).into();
    let start = Instant::now();
    in_netns(from, move || {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::new(to_addr, port), Duration::from_secs(10))
                .unwrap();
        s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(&data).unwrap();
    });
    let got = server.join().unwrap();
    (sent, got, start.elapsed().as_secs_f64())
}

/// Sends `count` UDP datagrams from `from` to a socket in `to_ns` and returns how many
/// arrived intact (waits at most 3 s).
pub fn udp_exchange(from: &str, to_ns: &str, to_addr: IpAddr, port: u16, count: usize) -> usize {
    let (tx, rx) = udp_pair(from, to_ns, port, Duration::from_millis(300));
    for i in 0..count {
        let msg = format!("datagram-{i}");
        tx.send_to(msg.as_bytes(), (to_addr, port)).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut got = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut buf = [0u8; 2048];
    while got.len() < count && Instant::now() < deadline {
        if let Ok(n) = rx.recv(&mut buf) {
            if let Some(i) = std::str::from_utf8(&buf[..n])
                .ok()
                .and_then(|s| s.strip_prefix("datagram-"))
                .and_then(|s| s.parse::<usize>().ok())
            {
                got.insert(i);
            }
        }
    }
    got.len()
}

/// A sender in netns `from` and a receiver on `port` in netns `to_ns` (reads time out after
/// `read_timeout`).
pub fn udp_pair(
    from: &str,
    to_ns: &str,
    port: u16,
    read_timeout: Duration,
) -> (UdpSocket, UdpSocket) {
    let rx = in_netns(to_ns, move || {
        UdpSocket::bind((IpAddr::from([0u8; 4]), port)).unwrap()
    });
    rx.set_read_timeout(Some(read_timeout)).unwrap();
    let tx = in_netns(from, || {
        UdpSocket::bind((IpAddr::from([0u8; 4]), 0)).unwrap()
    });
    (tx, rx)
}

/// Pings `dst` from `host` until it answers (bounded).
pub fn wait_ping(host: &Host, dst: IpAddr, timeout: Duration) -> bool {
    wait_for(timeout, Duration::from_millis(100), || {
        host.ping(dst).unwrap_or(false)
    })
}

/// A file path's text, or "" if unreadable.
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A coordinator running in lab host `idx` (control on its underlay address, admin on its
/// loopback), with helpers for the admin API.
pub struct Coord {
    pub idx: usize,
    pub dir: PathBuf,
    pub proc: Option<ProcHandle>,
    /// Every join token [`Coord::token`] created (for [`Coord::assert_no_secrets_in_logs`]).
    pub tokens: std::sync::Mutex<Vec<String>>,
    /// More `meshd coordinator` arguments (`--db …`, `--replica …`).
    pub extra: Vec<String>,
}

impl Coord {
    pub fn start(lab: &Lab, idx: usize) -> Coord {
        Coord::start_with(lab, idx, "coordinator", &[])
    }

    /// A coordinator with its state in `<lab>/<name>` and `extra` arguments.
    pub fn start_with(lab: &Lab, idx: usize, name: &str, extra: &[&str]) -> Coord {
        let dir = lab.dir().join(name);
        let mut c = Coord {
            idx,
            dir,
            proc: None,
            tokens: Default::default(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        c.restart(lab);
        c
    }

    /// (Re)starts the process on the same state directory.
    pub fn restart(&mut self, lab: &Lab) {
        let host = lab.host(self.idx);
        let listen = format!("{}:7443", host.underlay_ip());
        let proc = host
            .spawn(
                Cmd::new(meshd_bin())
                    .args([
                        "coordinator",
                        "--listen",
                        &listen,
                        "--admin-listen",
                        "127.0.0.1:7444",
                    ])
                    .arg("--state-dir")
                    .arg(&self.dir)
                    .args(&self.extra)
                    .env("RUST_LOG", "info")
                    .label("coordinator"),
            )
            .unwrap();
        let ns = host.netns().to_string();
        let ok = wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
            self.dir.join("admin.token").exists()
                && http(&ns, "GET", "/v1/status", None, &self.token_or_empty()).0 == 200
        });
        assert!(
            ok,
            "coordinator did not come up: {}",
            proc.stderr().unwrap_or_default()
        );
        self.proc = Some(proc);
    }

    fn token_or_empty(&self) -> String {
        std::fs::read_to_string(self.dir.join("admin.token"))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// An admin API call: (status code, JSON body).
    pub fn api(
        &self,
        lab: &Lab,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let (code, text) = http(
            lab.host(self.idx).netns(),
            method,
            path,
            body,
            &self.token_or_empty(),
        );
        (
            code,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        )
    }

    /// Applies a policy (YAML); returns (status code, body).
    pub fn apply_policy(&self, lab: &Lab, yaml: &str) -> (u16, serde_json::Value) {
        self.api(
            lab,
            "PUT",
            "/v1/policy",
            Some(serde_json::json!({ "yaml": yaml })),
        )
    }

    /// Creates a join token with `labels` ("k=v" pairs), optional ttl and uses.
    pub fn token(
        &self,
        lab: &Lab,
        labels: &[(&str, &str)],
        ttl_secs: Option<u64>,
        uses: Option<u32>,
    ) -> String {
        let labels: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        let (code, v) = self.api(
            lab,
            "POST",
            "/v1/tokens",
            Some(serde_json::json!({"labels": labels, "ttl_secs": ttl_secs, "uses": uses})),
        );
        assert!(code == 200 || code == 201, "token create: {code} {v}");
        let token = v["token"].as_str().unwrap().to_string();
        self.tokens.lock().unwrap().push(token.clone());
        token
    }

    /// Fails if any log the lab's processes wrote holds a secret: see
    /// [`assert_no_secrets_in_logs`] (the join tokens this coordinator made included).
    pub fn assert_no_secrets_in_logs(&self, lab: &Lab) {
        let tokens = self.tokens.lock().unwrap().clone();
        assert_no_secrets_in_logs(lab, &tokens);
    }
}

/// Minimal HTTP/1.1 client run inside namespace `ns` against 127.0.0.1:7444.
pub fn http(
    ns: &str,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
    token: &str,
) -> (u16, String) {
    let (method, path, token) = (method.to_string(), path.to_string(), token.to_string());
    in_netns(ns, move || {
        let Ok(mut s) =
            TcpStream::connect_timeout(&"127.0.0.1:7444".parse().unwrap(), Duration::from_secs(2))
        else {
            return (0, String::new());
        };
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        if s.write_all(req.as_bytes()).is_err() {
            return (0, String::new());
        }
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        let code = resp
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (code, body)
    })
}

/// The UAPI directory of the agent on lab host `idx` (its own: /var/run/wireguard is shared).
pub fn agent_uapi_dir(lab: &Lab, idx: usize) -> PathBuf {
    lab.dir().join(format!("agent{idx}-uapi"))
}

/// Starts `meshd up --join TOKEN --name NAME` on lab host `idx` with its own state dir.
pub fn join(lab: &Lab, idx: usize, token: &str, name: &str) -> ProcHandle {
    join_with(lab, idx, token, name, &[])
}

/// [`join`] with extra `meshd up` arguments (e.g. `--flow-interval 1`).
pub fn join_with(lab: &Lab, idx: usize, token: &str, name: &str, extra: &[&str]) -> ProcHandle {
    let host = lab.host(idx);
    let state = lab.dir().join(format!("agent{idx}"));
    host.spawn(
        Cmd::new(meshd_bin())
            .args(["up", "--join", token, "--name", name])
            .args(extra.iter().copied())
            .arg("--state-dir")
            .arg(&state)
            .arg("--uapi-dir")
            .arg(agent_uapi_dir(lab, idx))
            .env("RUST_LOG", "info")
            .label(format!("agent-{name}")),
    )
    .unwrap()
}

/// Restarts an enrolled agent from its state directory (no token).
pub fn resume(lab: &Lab, idx: usize, name: &str) -> ProcHandle {
    let host = lab.host(idx);
    let state = lab.dir().join(format!("agent{idx}"));
    host.spawn(
        Cmd::new(meshd_bin())
            .args(["up", "--state-dir"])
            .arg(&state)
            .arg("--uapi-dir")
            .arg(agent_uapi_dir(lab, idx))
            .env("RUST_LOG", "info")
            .label(format!("agent-{name}-resumed")),
    )
    .unwrap()
}

/// The overlay IPv4 address meshd in `host` reports for itself.
pub fn own_overlay(host: &Host) -> Option<IpAddr> {
    let s = status_json(host)?;
    let a = s["addresses"][0].as_str()?;
    a.split('/').next()?.parse().ok()
}

/// Peer names in `host`'s status.
pub fn peer_names(host: &Host) -> Vec<String> {
    status_json(host)
        .map(|s| {
            s["peers"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|p| p["name"].as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        })
        .unwrap_or_default()
}

/// Like [`in_netns`] but returns the running thread.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap();
        // SAFETY: setns on a valid namespace fd; affects only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}");
        f()
    })
}

/// A TCP stream that keeps sending (bounded: 30 s) and counts what arrives.
pub struct Stream {
    pub received: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub last_rx: std::sync::Arc<std::sync::Mutex<Instant>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Stream {
    pub fn start(from_ns: &str, to_ns: &str, to: IpAddr, port: u16) -> Stream {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::{Arc, Mutex};
        let received = Arc::new(AtomicU64::new(0));
        let last_rx = Arc::new(Mutex::new(Instant::now()));
        let stop = Arc::new(AtomicBool::new(false));
        let listener = in_netns(to_ns, move || TcpListener::bind(("0.0.0.0", port)).unwrap());
        {
            let (received, last_rx, stop) = (received.clone(), last_rx.clone(), stop.clone());
            std::thread::spawn(move || {
                let Ok((mut s, _)) = listener.accept() else {
                    return;
                };
                s.set_read_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                let mut buf = vec![0u8; 65536];
                let deadline = Instant::now() + Duration::from_secs(30);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            received.fetch_add(n as u64, Ordering::Relaxed);
                            *last_rx.lock().unwrap() = Instant::now();
                        }
                        Err(_) => continue,
                    }
                }
            });
        }
        {
            let stop = stop.clone();
            spawn_in_netns(from_ns, move || {
                let Ok(mut s) =
                    TcpStream::connect_timeout(&SocketAddr::new(to, port), Duration::from_secs(5))
                else {
                    return;
                };
                s.set_write_timeout(Some(Duration::from_millis(500)))
                    .unwrap();
                let chunk = vec![7u8; 8192];
                let deadline = Instant::now() + Duration::from_secs(30);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let _ = s.write(&chunk);
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
        }
        Stream {
            received,
            last_rx,
            stop,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.received.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// True if bytes keep arriving over the next `window`.
    pub fn flowing(&self, window: Duration) -> bool {
        let before = self.bytes();
        std::thread::sleep(window);
        self.bytes() > before
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Whether a TCP connection from `from_ns` to `to:port` (a listener in `to_ns`) succeeds.
pub fn tcp_connects(from_ns: &str, to_ns: &str, to: IpAddr, port: u16) -> bool {
    // An earlier listener on the port may still be closing: retry the bind briefly.
    let _l = in_netns(to_ns, move || {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match TcpListener::bind(("0.0.0.0", port)) {
                Ok(l) => return l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("bind {port}: {e}"),
            }
        }
    });
    in_netns(from_ns, move || {
        TcpStream::connect_timeout(&SocketAddr::new(to, port), Duration::from_millis(1500)).is_ok()
    })
}

/// Stops `p` with SIGTERM and asserts it exits 0 within 10 s (a clean stop).
pub fn stop_cleanly(p: ProcHandle) {
    p.kill(meshd_lab::Signal::Term).unwrap();
    let st = p.wait_timeout(Duration::from_secs(10)).unwrap();
    assert!(
        st.is_some_and(|s| s.success()),
        "meshd did not exit cleanly: {}",
        p.stderr().unwrap_or_default()
    );
}

/// The secrets a join token string carries: the string itself and its 32-byte secret in
/// every encoding a careless log line might use.
fn join_token_secrets(token: &str) -> Vec<(String, String)> {
    use base64::Engine as _;
    let mut out = vec![("join token".to_string(), token.trim().to_string())];
    if let Ok(t) = meshd_control::JoinToken::parse(token) {
        let s = &t.secret.0;
        let hex: String = s.iter().map(|b| format!("{b:02x}")).collect();
        for (how, text) in [
            (
                "base64url",
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s),
            ),
            (
                "base64",
                base64::engine::general_purpose::STANDARD.encode(s),
            ),
            ("hex", hex),
        ] {
            out.push((format!("join token secret ({how})"), text));
        }
    }
    out
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// Fails if any log (`*.out`, `*.err`) of the lab's processes contains the admin token (or
/// its part after `meshadm-`), one of `join_tokens` or a join token kept in a state
/// directory (or its secret), or a private key found in the lab's directory (`*.key`, the
/// admin API's PEM key). Needs at least one log, one admin token and one private key, so it
/// cannot pass by finding nothing.
pub fn assert_no_secrets_in_logs(lab: &Lab, join_tokens: &[String]) {
    let mut files = Vec::new();
    files_under(lab.dir(), &mut files);
    let mut secrets: Vec<(String, String)> = Vec::new();
    let mut logs = Vec::new();
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let text = || read(f).trim().to_string();
        if name.ends_with(".out") || name.ends_with(".err") {
            logs.push(f.clone());
        } else if name == "admin.token" {
            let t = text();
            if let Some(secret) = t.strip_prefix("meshadm-") {
                secrets.push(("admin token secret".into(), secret.to_string()));
            }
            secrets.push(("admin token".into(), t));
        } else if name == "join.token" {
            secrets.extend(join_token_secrets(&text()));
        } else if name.ends_with(".key") {
            secrets.push((format!("private key {name}"), text()));
        } else if name.ends_with("key.pem") {
            for line in text()
                .lines()
                .filter(|l| !l.starts_with("-----") && l.len() >= 40)
            {
                secrets.push((format!("PEM private key {name}"), line.to_string()));
            }
        }
    }
    for t in join_tokens {
        secrets.extend(join_token_secrets(t));
    }
    secrets.retain(|(_, s)| s.len() >= 16);
    assert!(!logs.is_empty(), "no logs in {}", lab.dir().display());
    assert!(
        secrets.iter().any(|(w, _)| w == "admin token"),
        "no admin token in {}",
        lab.dir().display()
    );
    assert!(
        secrets.iter().any(|(w, _)| w.starts_with("private key")),
        "no private key in {}",
        lab.dir().display()
    );
    let mut found = Vec::new();
    for log in &logs {
        let text = read(log);
        for (what, secret) in &secrets {
            if let Some(at) = text.find(secret.as_str()) {
                let line = text[..at].matches('\n').count() + 1;
                found.push(format!("{}:{line}: {what}", log.display()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "secrets in logs ({} logs, {} secrets checked):\n{}",
        logs.len(),
        secrets.len(),
        found.join("\n")
    );
}
