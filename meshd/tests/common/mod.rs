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

    /// Writes a config naming `peers` as (node, endpoint-known).
    pub fn write_config(&self, lab: &Lab, peers: &[(&Node, bool)], extra_peer_toml: &str) {
        let mut s = format!(
            "[interface]\nname = \"mesh0\"\nprivate_key_file = \"host.key\"\nlisten_port = {}\naddress = \"{}/24\"\nmtu = 1420\n",
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
        let host = lab.host(self.idx);
        let proc = host
            .spawn(
                Cmd::new(meshd_bin())
                    .args(["up", "--config"])
                    .arg(self.config_path())
                    .arg("--state-dir")
                    .arg(self.dir.join("state"))
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
    let rx = in_netns(to_ns, move || {
        UdpSocket::bind((IpAddr::from([0u8; 4]), port)).unwrap()
    });
    rx.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let tx = in_netns(from, || {
        UdpSocket::bind((IpAddr::from([0u8; 4]), 0)).unwrap()
    });
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
