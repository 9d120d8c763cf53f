//! End to end (issue 17): a long TCP stream through the tunnel survives a key rotation of
//! either host, with no reset and no gap over 1 s between received chunks.

mod common;

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use meshd_lab::{wait_for, Lab};

const ALLOW_ALL: &str = "rules:\n  - name: all\n    from: {}\n    to: {}\n    ports: [any]\n";

/// What the receiving end saw.
#[derive(Debug, Default)]
struct Seen {
    bytes: u64,
    /// Largest time between two reads that returned data.
    max_gap: Duration,
    /// A read error other than a timeout, or EOF before the end (a reset or close).
    broken: Option<String>,
    /// Failed connects or writes on the sending side (a reset shows here too).
    send_errors: u64,
}

/// A TCP stream `from_ns` → `to:port` for at most `secs` seconds, measuring the receiver's
/// largest gap between chunks; the sender's write errors are counted.
struct GapStream {
    seen: Arc<Mutex<Seen>>,
    send_errors: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    rx: Option<std::thread::JoinHandle<()>>,
}

impl GapStream {
    fn start(from_ns: &str, to_ns: &str, to: IpAddr, port: u16, secs: u64) -> GapStream {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let send_errors = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let listener = in_netns(to_ns, move || TcpListener::bind(("0.0.0.0", port)).unwrap());
        let rx = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                let Ok((mut s, _)) = listener.accept() else {
                    seen.lock().unwrap().broken = Some("accept failed".into());
                    return;
                };
                s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                let mut buf = vec![0u8; 65536];
                let deadline = Instant::now() + Duration::from_secs(secs + 5);
                let mut last = Instant::now();
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match s.read(&mut buf) {
                        Ok(0) => {
                            if !stop.load(Ordering::Relaxed) {
                                seen.lock().unwrap().broken = Some("EOF before the end".into());
                            }
                            break;
                        }
                        Ok(n) => {
                            let now = Instant::now();
                            let mut g = seen.lock().unwrap();
                            g.bytes += n as u64;
                            g.max_gap = g.max_gap.max(now - last);
                            last = now;
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(e) => {
                            seen.lock().unwrap().broken = Some(e.to_string());
                            break;
                        }
                    }
                }
            })
        };
        {
            let (stop, errors) = (stop.clone(), send_errors.clone());
            spawn_in_netns(from_ns, move || {
                let Ok(mut s) =
                    TcpStream::connect_timeout(&SocketAddr::new(to, port), Duration::from_secs(5))
                else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                let chunk = vec![7u8; 4096];
                let deadline = Instant::now() + Duration::from_secs(secs);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    if s.write_all(&chunk).is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
        }
        GapStream {
            seen,
            send_errors,
            stop,
            rx: Some(rx),
        }
    }

    fn bytes(&self) -> u64 {
        self.seen.lock().unwrap().bytes
    }

    fn finish(mut self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.rx.take() {
            let _ = t.join();
        }
        let mut seen = std::mem::take(&mut *self.seen.lock().unwrap());
        seen.send_errors = self.send_errors.load(Ordering::Relaxed);
        seen
    }
}

impl Drop for GapStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn public_key(coord: &Coord, lab: &Lab, host: &str) -> String {
    let (code, v) = coord.api(lab, "GET", &format!("/v1/hosts/{host}"), None);
    assert_eq!(code, 200, "{v}");
    v["public_key"].as_str().unwrap_or_default().to_string()
}

/// Rotates `host`'s key through the admin API and waits until it runs on the new one.
fn rotate(coord: &Coord, lab: &Lab, host: &str) -> (String, String) {
    let old = public_key(coord, lab, host);
    let (code, v) = coord.api(lab, "POST", &format!("/v1/hosts/{host}/rotate-key"), None);
    assert_eq!(code, 200, "rotate-key {host}: {v}");
    let ok = wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
        public_key(coord, lab, host) != old
    });
    let new = public_key(coord, lab, host);
    assert!(ok, "{host} still has key {old}");
    (old, new)
}

#[test]
fn tcp_stream_survives_key_rotation_of_either_host() {
    meshd_lab::require_root!();
    let lab = Lab::new("rotate", 3).unwrap();
    let coord = Coord::start(&lab, 0);
    let (code, v) = coord.apply_policy(&lab, ALLOW_ALL);
    assert!((200..300).contains(&code), "policy apply: {code} {v}");
    let mut procs = Vec::new();
    for i in 1..=2 {
        let token = coord.token(&lab, &[("app", &format!("app{i}"))], Some(3600), Some(1));
        procs.push(join(&lab, i, &token, &format!("host{i}")));
    }
    for i in 1..=2 {
        let ok = wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
            peer_names(lab.host(i)).len() == 1
        });
        assert!(ok, "host{i} never got its peer");
    }
    let ov2 = own_overlay(lab.host(2)).unwrap();
    assert!(
        wait_ping(lab.host(1), ov2, Duration::from_secs(10)),
        "no ping: host1 {:?}\nhost2 {:?}",
        status_json(lab.host(1)),
        status_json(lab.host(2))
    );

    let stream = GapStream::start(lab.host(1).netns(), lab.host(2).netns(), ov2, 7301, 15);
    assert!(
        wait_for(Duration::from_secs(5), Duration::from_millis(50), || stream
            .bytes()
            > 0),
        "the stream never started"
    );
    std::thread::sleep(Duration::from_secs(1));

    // The sender's host rotates, then the receiver's.
    let (old1, new1) = rotate(&coord, &lab, "host1");
    let at1 = stream.bytes();
    std::thread::sleep(Duration::from_secs(2));
    assert!(stream.bytes() > at1, "no data after host1's rotation");
    let (old2, new2) = rotate(&coord, &lab, "host2");
    let at2 = stream.bytes();
    std::thread::sleep(Duration::from_secs(2));
    assert!(stream.bytes() > at2, "no data after host2's rotation");
    let seen = stream.finish();
    eprintln!(
        "received {} bytes, largest gap {:?}",
        seen.bytes, seen.max_gap
    );
    assert_eq!(seen.broken, None, "the connection broke");
    assert_eq!(seen.send_errors, 0, "the sender saw an error (reset?)");
    assert!(
        seen.max_gap < Duration::from_secs(1),
        "gap of {:?} between received chunks",
        seen.max_gap
    );
    assert_ne!(old1, new1);
    assert_ne!(old2, new2);

    // The new key is the one on disk (0600), the next-key file is gone, each host's status
    // shows the other's new key, and the audit log has both rotations.
    for (i, new) in [(1, &new1), (2, &new2)] {
        let dir = lab.dir().join(format!("agent{i}"));
        let text = std::fs::read_to_string(dir.join("host.key")).unwrap();
        let key: meshd_tunnel::PrivateKey = text.trim().parse().unwrap();
        assert_eq!(&key.public_key().to_base64(), new);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.join("host.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!dir.join("host.key.next").exists());
    }
    let s1 = status_json(lab.host(1)).unwrap().to_string();
    assert!(s1.contains(&new2) && !s1.contains(&old2), "{s1}");
    let (_, events) = coord.api(&lab, "GET", "/v1/events?limit=1000", None);
    let rotated = events
        .as_array()
        .map(|a| a.iter().filter(|e| e["kind"] == "host_key_rotated").count())
        .unwrap_or(0);
    assert_eq!(rotated, 2, "{events}");
    // The old key is refused now: a second stream still connects (tunnels are fine).
    assert!(tcp_connects(
        lab.host(2).netns(),
        lab.host(1).netns(),
        own_overlay(lab.host(1)).unwrap(),
        7302
    ));
    for p in procs {
        stop_cleanly(p);
    }
}
