//! End-to-end tests of transparent mode: applications use the hosts' ordinary (underlay)
//! addresses and meshd encrypts that traffic, guards the ports the policy covers, follows
//! address changes, gives cloned VMs their own identity, and cleans up after itself.

mod common;

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use meshd_lab::{wait_for, Cmd, Lab, ProcHandle, Signal};

/// app1 may open tcp/1521 on db1 (and ping it); nothing else.
const POLICY: &str = "rules:
  - name: app-to-db
    from: {app: app1}
    to: {app: db1}
    ports: [tcp/1521, icmp]
";

const COVERED: u16 = 1521;
const UNCOVERED: u16 = 8080;

/// Starts `meshd up --transparent` on lab host `idx` with its own state dir and machine id.
fn join_transparent(lab: &Lab, idx: usize, token: &str, name: &str) -> ProcHandle {
    let state = state_dir(lab, idx);
    spawn_agent(
        lab,
        idx,
        &state,
        Some(token),
        Some(name),
        &machine_id(lab, idx),
    )
}

fn state_dir(lab: &Lab, idx: usize) -> PathBuf {
    lab.dir().join(format!("agent{idx}"))
}

/// A machine-id file per lab host (namespaces share /etc/machine-id).
fn machine_id(lab: &Lab, idx: usize) -> PathBuf {
    let path = lab.dir().join(format!("machine-id-{idx}"));
    if !path.exists() {
        std::fs::write(&path, format!("{:032x}\n", 0x6d65_7368_0000 + idx as u128)).unwrap();
    }
    path
}

fn spawn_agent(
    lab: &Lab,
    idx: usize,
    state: &std::path::Path,
    token: Option<&str>,
    name: Option<&str>,
    machine_id: &std::path::Path,
) -> ProcHandle {
    let mut cmd = Cmd::new(meshd_bin());
    cmd.args(["up", "--transparent", "--state-dir"])
        .arg(state)
        .arg("--uapi-dir")
        .arg(format!("{}-uapi", state.display()))
        .arg("--machine-id-file")
        .arg(machine_id);
    if let Some(t) = token {
        cmd.args(["--join", t]);
    }
    if let Some(n) = name {
        cmd.args(["--name", n]);
    }
    lab.host(idx)
        .spawn(
            cmd.env("RUST_LOG", "info")
                .label(format!("agent-{idx}-{}", name.unwrap_or("resumed"))),
        )
        .unwrap()
}

/// The protected peer addresses `meshd status` lists on `host`.
fn protected(host: &meshd_lab::Host) -> Vec<String> {
    status_json(host)
        .and_then(|s| {
            s["protected"].as_array().map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
        })
        .unwrap_or_default()
}

fn wait_protected(host: &meshd_lab::Host, ip: IpAddr) -> bool {
    let want = format!("{ip} (");
    wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
        protected(host).iter().any(|p| p.starts_with(&want))
    })
}

/// A coordinator on host 0 with [`POLICY`]; host `a` joins as app1 and host `b` as db1, both
/// transparent.
fn mesh(tag: &str, hosts: usize, a: usize, b: usize) -> (Lab, Coord, Vec<ProcHandle>) {
    mesh_with(tag, hosts, a, b, POLICY)
}

/// [`mesh`] with another policy.
fn mesh_with(
    tag: &str,
    hosts: usize,
    a: usize,
    b: usize,
    policy: &str,
) -> (Lab, Coord, Vec<ProcHandle>) {
    let lab = Lab::new(tag, hosts).unwrap();
    let coord = Coord::start(&lab, 0);
    let (code, v) = coord.apply_policy(&lab, policy);
    assert!((200..300).contains(&code), "policy apply: {code} {v}");
    let ta = coord.token(&lab, &[("app", "app1")], Some(3600), Some(1));
    // db1's image keeps a reusable token, so clones of it can enrol themselves.
    let tb = coord.token(&lab, &[("app", "db1")], Some(3600), Some(5));
    let procs = vec![
        join_transparent(&lab, a, &ta, "app1"),
        join_transparent(&lab, b, &tb, "db1"),
    ];
    let (ha, hb) = (lab.host(a), lab.host(b));
    assert!(
        wait_protected(ha, hb.underlay_ip().into()),
        "app1 never protected db1's address: {:?}; stderr: {}",
        protected(ha),
        procs[0].stderr().unwrap_or_default()
    );
    assert!(
        wait_protected(hb, ha.underlay_ip().into()),
        "db1 never protected app1's address: {:?}",
        protected(hb)
    );
    (lab, coord, procs)
}

/// A one-connection server on `port` in `ns`: returns (peer address, bytes read).
fn serve_once(ns: &str, port: u16) -> std::thread::JoinHandle<Option<(SocketAddr, Vec<u8>)>> {
    let listener = in_netns(ns, move || TcpListener::bind(("::", port)).unwrap());
    std::thread::spawn(move || {
        listener.set_nonblocking(true).ok()?;
        let deadline = Instant::now() + Duration::from_secs(15);
        let (mut s, peer) = loop {
            match listener.accept() {
                Ok(x) => break x,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(_) => return None,
            }
        };
        s.set_nonblocking(false).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        Some((peer, got))
    })
}

/// Connects from `ns` to `to:port` and sends `data` (bounded).
fn send(ns: &str, to: IpAddr, port: u16, data: &'static [u8]) -> bool {
    send_within(ns, to, port, data, Duration::from_millis(1500))
}

fn send_within(ns: &str, to: IpAddr, port: u16, data: &'static [u8], limit: Duration) -> bool {
    in_netns(ns, move || {
        let Ok(mut s) = TcpStream::connect_timeout(&SocketAddr::new(to, port), limit) else {
            return false;
        };
        s.write_all(data).is_ok()
    })
}

fn canonical(a: SocketAddr) -> IpAddr {
    match a.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

#[test]
fn underlay_traffic_is_encrypted_and_covered_ports_require_the_tunnel() {
    meshd_lab::require_root!();
    // Host 0: coordinator; 1: app1; 2: db1; 3: a host outside the mesh.
    let (lab, coord, procs) = mesh("tp-guard", 4, 1, 2);
    let (ha, hb, hc) = (lab.host(1), lab.host(2), lab.host(3));
    let (a_ip, b_ip) = (
        IpAddr::from(ha.underlay_ip()),
        IpAddr::from(hb.underlay_ip()),
    );

    // A's client talks to B's ordinary address; the underlay shows only tunnel UDP.
    let cap = lab
        .capture(
            2,
            "eth0",
            &format!("(host {a_ip} or host {}) and not icmp6", ha.underlay_ipv6()),
        )
        .unwrap();
    let marker: &'static [u8] = b"MESHD-TRANSPARENT-MARKER-91c2";
    let server = serve_once(hb.netns(), COVERED);
    assert!(
        send(ha.netns(), b_ip, COVERED, marker),
        "app1 could not reach db1's address on tcp/{COVERED}: {}",
        procs[0].stderr().unwrap_or_default()
    );
    let (peer, got) = server
        .join()
        .unwrap()
        .expect("db1's server got no connection");
    assert_eq!(got, marker);
    assert_eq!(canonical(peer), a_ip, "db1 must see app1's real address");
    // A large transfer does not stall (MTU/MSS through the tunnel), digest checked.
    let (sent, got, secs) = tcp_transfer(ha.netns(), hb.netns(), b_ip, COVERED, 16 << 20);
    assert_eq!(sent, got, "16 MiB to db1's address arrived corrupted");
    println!("transparent: 16 MiB in {secs:.2} s");
    // IPv6 too.
    let b6 = IpAddr::from(hb.underlay_ipv6());
    assert!(
        wait_protected(ha, b6),
        "v6 not protected: {:?}",
        protected(ha)
    );
    let server = serve_once(hb.netns(), COVERED);
    assert!(
        send(ha.netns(), b6, COVERED, marker),
        "no v6 through the tunnel"
    );
    let (peer, got) = server.join().unwrap().expect("no v6 connection");
    assert_eq!(got, marker);
    assert_eq!(peer.ip(), IpAddr::from(ha.underlay_ipv6()));
    // A port the policy does not grant is refused by the tunnel's own policy, even though the
    // route leads into the tunnel.
    assert!(!send(ha.netns(), b_ip, UNCOVERED, b"nope"));
    std::thread::sleep(Duration::from_millis(300));
    let pcap = cap.stop_parsed().unwrap();
    assert!(!pcap.any_contains(marker), "marker visible on the underlay");
    let mut tunnel = 0;
    for s in pcap.summaries() {
        assert_eq!(s.ip_proto, 17, "non-UDP packet between app1 and db1: {s:?}");
        assert_eq!(
            (s.src_port, s.dst_port),
            (Some(51820), Some(51820)),
            "{s:?}"
        );
        tunnel += 1;
    }
    assert!(tunnel >= 2, "only {tunnel} tunnel packets captured");

    // A host outside the mesh: the covered port is closed to it, other ports are untouched.
    assert!(
        !tcp_connects(hc.netns(), hb.netns(), b_ip, COVERED),
        "plaintext reached the covered port"
    );
    assert!(
        tcp_connects(hc.netns(), hb.netns(), b_ip, UNCOVERED),
        "an uncovered port was cut"
    );
    // ... and the drop is in db1's block log, naming the source.
    let c_ip = hc.underlay_ip().to_string();
    let log = state_dir(&lab, 2).join("blocks.jsonl");
    let logged = wait_for(Duration::from_secs(5), Duration::from_millis(100), || {
        read(&log)
            .lines()
            .any(|l| l.contains("plaintext") && l.contains(&c_ip) && l.contains("1521"))
    });
    assert!(logged, "no plaintext block event: {}", read(&log));
    let reached = wait_for(Duration::from_secs(5), Duration::from_millis(200), || {
        let (_, v) = coord.api(&lab, "GET", "/v1/blocks", None);
        v.to_string().contains("plaintext")
    });
    assert!(
        reached,
        "the coordinator never got the plaintext block event"
    );

    // Both status views name the mode and the protected addresses.
    let s = status_json(hb).unwrap();
    assert_eq!(s["mode"], "transparent");
    assert!(protected(hb)
        .iter()
        .any(|p| p.starts_with(&format!("{a_ip} (app1)"))));
    let (_, st) = coord.api(&lab, "GET", "/v1/status", None);
    let db = st["connected"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == "db1"))
        .cloned()
        .expect("db1 connected");
    assert_eq!(db["mode"], "transparent");
    assert!(
        db["protected"].to_string().contains(&b_ip.to_string()),
        "{db}"
    );
    // No admin token, join token, token secret or private key in any log.
    coord.assert_no_secrets_in_logs(&lab);
}

#[test]
fn address_change_clone_and_crash_cleanup() {
    meshd_lab::require_root!();
    // Host 0: coordinator; 1: app1; 2: db1; 3: where db1's clone starts.
    let (lab, coord, mut procs) = mesh("tp-move", 4, 1, 2);
    let (ha, hb, hc) = (lab.host(1), lab.host(2), lab.host(3));

    // db1's address changes: app1's client reaches the new address through the tunnel.
    let new_ip = std::net::Ipv4Addr::new(198, 18, 0, 77);
    let t0 = Instant::now();
    hb.set_underlay_ip(new_ip).unwrap();
    // Until app1 has the new route, its attempts go out in plaintext and db1 drops them.
    let server = serve_once(hb.netns(), COVERED);
    // Short attempts, so the time measured is not a SYN retransmission timer.
    let moved = wait_for(Duration::from_secs(15), Duration::from_millis(20), || {
        send_within(
            ha.netns(),
            new_ip.into(),
            COVERED,
            b"after-move",
            Duration::from_millis(100),
        )
    });
    assert!(
        moved,
        "app1 never reached db1's new address through the tunnel"
    );
    let (peer, data) = server.join().unwrap().expect("db1 got no connection");
    assert_eq!(data, b"after-move");
    assert_eq!(canonical(peer), IpAddr::from(ha.underlay_ip()));
    println!(
        "transparent: traffic to a moved host flows again after {} ms",
        t0.elapsed().as_millis()
    );
    assert!(wait_protected(ha, new_ip.into()));

    // A clone of db1's state directory, started on another machine, enrols as a new host.
    let clone_dir = lab.dir().join("clone-of-db1");
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(state_dir(&lab, 2))
        .arg(&clone_dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    let original_key = status_json(hb).unwrap()["public_key"].clone();
    let clone = spawn_agent(&lab, 3, &clone_dir, None, None, &machine_id(&lab, 3));
    let enrolled = wait_for(Duration::from_secs(15), Duration::from_millis(200), || {
        let (_, hosts) = coord.api(&lab, "GET", "/v1/hosts", None);
        hosts.as_array().is_some_and(|h| h.len() == 3)
    });
    let (_, hosts) = coord.api(&lab, "GET", "/v1/hosts", None);
    assert!(
        enrolled,
        "clone did not enrol: {hosts}; stderr: {}",
        clone.stderr().unwrap_or_default()
    );
    let clone_key = status_json(hc).unwrap()["public_key"].clone();
    assert_ne!(clone_key, original_key, "the clone kept the original's key");
    let db_hosts = hosts
        .as_array()
        .map(|h| h.iter().filter(|h| h["labels"]["app"] == "db1").count());
    assert_eq!(db_hosts, Some(2), "the clone lacks db1's labels: {hosts}");
    // The original keeps working.
    let server = serve_once(hb.netns(), COVERED);
    assert!(send(ha.netns(), new_ip.into(), COVERED, b"still-db1"));
    assert_eq!(
        server.join().unwrap().map(|x| x.1),
        Some(b"still-db1".to_vec())
    );
    clone.kill(Signal::Term).unwrap();

    // SIGKILL and restart: no duplicate rules, routes or tables; SIGTERM: none left.
    let before = host_state(ha);
    assert_eq!(before.rules, 2, "one rule per family: {before:?}");
    assert_eq!(before.tables, 2, "{before:?}");
    assert!(before.routes >= 2, "{before:?}");
    assert_eq!(
        before.guards, before.routes,
        "a guard per route: {before:?}"
    );
    let a = procs.remove(0);
    a.kill(Signal::Kill).unwrap();
    let _ = a.wait_timeout(Duration::from_secs(5));
    let a = spawn_agent(
        &lab,
        1,
        &state_dir(&lab, 1),
        None,
        None,
        &machine_id(&lab, 1),
    );
    assert!(wait_protected(ha, new_ip.into()));
    let after = host_state(ha);
    assert_eq!(after, before, "state after a crash and restart differs");
    let server = serve_once(hb.netns(), COVERED);
    assert!(send(ha.netns(), new_ip.into(), COVERED, b"after-crash"));
    assert!(server.join().unwrap().is_some());
    a.kill(Signal::Term).unwrap();
    let st = a.wait_timeout(Duration::from_secs(10)).unwrap();
    assert!(
        st.is_some_and(|s| s.success()),
        "meshd did not exit cleanly"
    );
    let gone = host_state(ha);
    assert_eq!(gone, HostState::default(), "left behind after stop");
    // No admin token, join token, token secret or private key in any log.
    coord.assert_no_secrets_in_logs(&lab);
}

/// What transparent mode installed in a host: rules pointing at meshd's table, routes in it,
/// nft tables named meshd_*.
#[derive(Debug, Default, PartialEq, Eq)]
struct HostState {
    rules: usize,
    routes: usize,
    /// `unreachable` guard routes in meshd's table (they outlive the TUN).
    guards: usize,
    tables: usize,
}

fn host_state(host: &meshd_lab::Host) -> HostState {
    let table = meshd_hostnet::DEFAULT_TABLE.to_string();
    let count = |args: &[&str], needle: &str| -> usize {
        let out = host.exec(args[0], &args[1..]).unwrap();
        String::from_utf8_lossy(&out.stdout).matches(needle).count()
    };
    let rules = count(&["ip", "-4", "rule", "show"], &format!("lookup {table}"))
        + count(&["ip", "-6", "rule", "show"], &format!("lookup {table}"));
    let routes = count(&["ip", "-4", "route", "show", "table", &table], "dev mesh0")
        + count(&["ip", "-6", "route", "show", "table", &table], "dev mesh0");
    let guards = count(
        &["ip", "-4", "route", "show", "table", &table],
        "unreachable",
    ) + count(
        &["ip", "-6", "route", "show", "table", &table],
        "unreachable",
    );
    let tables = count(&["nft", "list", "tables"], "meshd_");
    HostState {
        rules,
        routes,
        guards,
        tables,
    }
}

#[test]
fn static_mode_transparent_with_a_policy_file() {
    meshd_lab::require_root!();
    // Static config: two transparent hosts, host 2 outside the mesh. The inline policy grants
    // tcp/1521 from h0 to h1, so only that port is covered on h1.
    let lab = Lab::new("tp-static", 3).unwrap();
    let (n0, n1) = (Node::new(&lab, 0), Node::new(&lab, 1));
    let policy = "policy = '''\nrules:\n  - name: db\n    from: {host: h0}\n    to: {host: self}\n    ports: [tcp/1521]\n'''\n";
    let transparent = |n: &Node, peer: &Node, peer_name_self: bool| {
        n.write_config(&lab, &[(peer, true)], "");
        let text = std::fs::read_to_string(n.config_path()).unwrap();
        let mut iface = "mtu = 1420\nmode = \"transparent\"\n".to_string();
        if peer_name_self {
            iface.push_str(policy);
        }
        std::fs::write(n.config_path(), text.replacen("mtu = 1420\n", &iface, 1)).unwrap();
    };
    transparent(&n0, &n1, false);
    transparent(&n1, &n0, true);
    let (p0, p1) = (n0.start(&lab), n1.start(&lab));
    let (h0, h1, h2) = (lab.host(0), lab.host(1), lab.host(2));
    let b_ip = IpAddr::from(h1.underlay_ip());
    assert!(wait_protected(h0, b_ip), "{:?}", protected(h0));
    assert!(wait_protected(h1, h0.underlay_ip().into()));
    let (sent, got, _) = tcp_transfer(h0.netns(), h1.netns(), b_ip, COVERED, 4 << 20);
    assert_eq!(sent, got);
    assert!(!tcp_connects(h2.netns(), h1.netns(), b_ip, COVERED));
    assert!(tcp_connects(h2.netns(), h1.netns(), b_ip, UNCOVERED));
    for p in [p0, p1] {
        stop_cleanly(p);
    }
    assert_eq!(host_state(h0), HostState::default());
    assert_eq!(host_state(h1), HostState::default());
}

/// Payload of the client's requests and of the server's replies in the fail-closed test:
/// neither may ever appear on the underlay.
const REQUEST: &[u8] = b"MESHD-FAILCLOSED-REQUEST-4f1a";
const REPLY: &[u8] = b"MESHD-FAILCLOSED-REPLY-93be";

/// Counters of the fail-closed test's traffic.
#[derive(Default)]
struct Traffic {
    /// UDP replies received by the client.
    udp_replies: AtomicU64,
    /// New TCP connections that exchanged a request and a reply.
    tcp_new: AtomicU64,
    /// Replies received on each long-lived connection (v4, v6).
    long_replies: [AtomicU64; 2],
    /// Set if a long-lived connection broke (error or EOF).
    long_broken: [AtomicBool; 2],
    stop: AtomicBool,
}

impl Traffic {
    fn snapshot(&self) -> [u64; 4] {
        [
            self.udp_replies.load(Relaxed),
            self.tcp_new.load(Relaxed),
            self.long_replies[0].load(Relaxed),
            self.long_replies[1].load(Relaxed),
        ]
    }

    /// Waits (at most `limit`) until every kind of traffic moved past `since`.
    fn all_moved(&self, since: [u64; 4], limit: Duration) -> bool {
        wait_for(limit, Duration::from_millis(50), || {
            self.snapshot()
                .iter()
                .zip(since)
                .all(|(now, then)| *now > then)
        })
    }
}

/// Echo servers on `ns`'s port [`COVERED`] (TCP and UDP, dual-stack): every read gets a
/// [`REPLY`]. Bounded by `t.stop` and 90 s.
fn echo_servers(ns: &str, t: &Arc<Traffic>) {
    let (tcp, udp) = in_netns(ns, || {
        (
            TcpListener::bind(("::", COVERED)).unwrap(),
            UdpSocket::bind(("::", COVERED)).unwrap(),
        )
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    let t2 = t.clone();
    std::thread::spawn(move || {
        udp.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut buf = [0u8; 256];
        while !t2.stop.load(Relaxed) && Instant::now() < deadline {
            if let Ok((_, from)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(REPLY, from);
            }
        }
    });
    let t2 = t.clone();
    std::thread::spawn(move || {
        tcp.set_nonblocking(true).unwrap();
        while !t2.stop.load(Relaxed) && Instant::now() < deadline {
            let Ok((mut s, _)) = tcp.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            let t3 = t2.clone();
            std::thread::spawn(move || {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                let mut buf = [0u8; 4096];
                while !t3.stop.load(Relaxed) && Instant::now() < deadline {
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(_) => {
                            if s.write_all(REPLY).is_err() {
                                break;
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                        Err(_) => break,
                    }
                }
            });
        }
    });
}

/// The client side on `ns`, towards `dsts` (v4, v6) port [`COVERED`]: UDP requests every
/// 20 ms, a new TCP connection every 100 ms, and one long-lived connection per family that
/// sends a request every 50 ms. Bounded by `t.stop` and 90 s.
fn clients(ns: &str, dsts: [IpAddr; 2], t: &Arc<Traffic>) {
    let deadline = Instant::now() + Duration::from_secs(90);
    let t2 = t.clone();
    spawn_in_netns(ns, move || {
        let sock = UdpSocket::bind("[::]:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let mut buf = [0u8; 256];
        while !t2.stop.load(Relaxed) && Instant::now() < deadline {
            for d in dsts {
                // Sends refused locally (the guard) are expected while meshd is down.
                let _ = sock.send_to(REQUEST, SocketAddr::new(d, COVERED));
            }
            while let Ok((n, _)) = sock.recv_from(&mut buf) {
                if &buf[..n] == REPLY {
                    t2.udp_replies.fetch_add(1, Relaxed);
                }
            }
        }
    });
    let t2 = t.clone();
    spawn_in_netns(ns, move || {
        let mut buf = [0u8; 256];
        while !t2.stop.load(Relaxed) && Instant::now() < deadline {
            for d in dsts {
                let to = SocketAddr::new(d, COVERED);
                let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_millis(300)) else {
                    continue;
                };
                s.set_read_timeout(Some(Duration::from_millis(500)))
                    .unwrap();
                if s.write_all(REQUEST).is_ok() && s.read(&mut buf).is_ok_and(|n| n > 0) {
                    t2.tcp_new.fetch_add(1, Relaxed);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    for (i, d) in dsts.into_iter().enumerate() {
        let t2 = t.clone();
        spawn_in_netns(ns, move || {
            let to = SocketAddr::new(d, COVERED);
            let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_secs(5)) else {
                t2.long_broken[i].store(true, Relaxed);
                return;
            };
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let mut buf = [0u8; 4096];
            while !t2.stop.load(Relaxed) && Instant::now() < deadline {
                if s.write_all(REQUEST).is_err() {
                    t2.long_broken[i].store(true, Relaxed);
                    return;
                }
                match s.read(&mut buf) {
                    Ok(0) => {
                        t2.long_broken[i].store(true, Relaxed);
                        return;
                    }
                    Ok(n) => {
                        let replies = buf[..n]
                            .windows(REPLY.len())
                            .filter(|w| *w == REPLY)
                            .count();
                        t2.long_replies[i].fetch_add(replies.max(1) as u64, Relaxed);
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => {
                        t2.long_broken[i].store(true, Relaxed);
                        return;
                    }
                }
            }
        });
    }
}

#[test]
fn sigkill_of_either_end_never_lets_plaintext_out_and_connections_survive_the_restart() {
    meshd_lab::require_root!();
    // Host 0: coordinator; 1: app1 (client); 2: db1 (server). tcp/1521 and udp/1521 covered.
    let policy = "rules:
  - name: app-to-db
    from: {app: app1}
    to: {app: db1}
    ports: [tcp/1521, udp/1521, icmp]
";
    let (lab, _coord, procs) = mesh_with("tp-kill", 3, 1, 2, policy);
    let (ha, hb) = (lab.host(1), lab.host(2));
    let db = [
        IpAddr::from(hb.underlay_ip()),
        IpAddr::from(hb.underlay_ipv6()),
    ];
    assert!(
        wait_protected(ha, db[1]),
        "v6 not protected: {:?}",
        protected(ha)
    );
    assert!(wait_protected(hb, ha.underlay_ipv6().into()));
    // Everything between the two on the underlay, both ways.
    let cap = lab
        .capture(
            2,
            "eth0",
            &format!(
                "(host {} or host {}) and not icmp6",
                ha.underlay_ip(),
                ha.underlay_ipv6()
            ),
        )
        .unwrap();
    let t = Arc::new(Traffic::default());
    echo_servers(hb.netns(), &t);
    clients(ha.netns(), db, &t);
    assert!(
        t.all_moved([0; 4], Duration::from_secs(15)),
        "traffic never flowed: {:?}",
        t.snapshot()
    );

    let mut procs = procs.into_iter();
    let mut agents = [procs.next(), procs.next()];
    for (side, idx) in [(0usize, 1usize), (1, 2)] {
        let name = ["app1", "db1"][side];
        let p = agents[side].take().unwrap();
        p.kill(Signal::Kill).unwrap();
        let _ = p.wait_timeout(Duration::from_secs(5));
        // Down for a while, with the client still sending.
        std::thread::sleep(Duration::from_millis(1500));
        let down = t.snapshot();
        let restarted = spawn_agent(
            &lab,
            idx,
            &state_dir(&lab, idx),
            None,
            None,
            &machine_id(&lab, idx),
        );
        assert!(
            t.all_moved(down, Duration::from_secs(20)),
            "traffic did not resume after {name}'s meshd restarted: {:?} -> {:?}; stderr: {}",
            down,
            t.snapshot(),
            restarted.stderr().unwrap_or_default()
        );
        agents[side] = Some(restarted);
    }
    t.stop.store(true, Relaxed);
    std::thread::sleep(Duration::from_millis(300));
    let pcap = cap.stop_parsed().unwrap();
    assert!(
        !pcap.any_contains(REQUEST),
        "a client request crossed the underlay in plaintext"
    );
    assert!(
        !pcap.any_contains(REPLY),
        "a server reply crossed the underlay in plaintext"
    );
    for s in pcap.summaries() {
        assert_eq!(s.ip_proto, 17, "non-UDP packet between app1 and db1: {s:?}");
        assert_eq!(
            (s.src_port, s.dst_port),
            (Some(51820), Some(51820)),
            "{s:?}"
        );
    }
    // The established connections outlived both restarts.
    for (i, fam) in ["IPv4", "IPv6"].iter().enumerate() {
        assert!(
            !t.long_broken[i].load(Relaxed),
            "the long-lived {fam} connection broke across the restarts"
        );
    }
    // And were taken up mid-stream by the restarted firewalls.
    for (h, name) in [(ha, "app1"), (hb, "db1")] {
        let picked = status_json(h)
            .and_then(|s| s["counters"]["flows_picked_up"].as_u64())
            .unwrap_or(0);
        assert!(picked >= 1, "{name} took up no established flow");
    }

    // Uninstalling after a crash: `meshd down` removes the guard (refused while meshd runs).
    let out = ha.exec(meshd_bin(), ["down"]).unwrap();
    assert!(!out.status.success(), "meshd down ran under a live meshd");
    assert!(String::from_utf8_lossy(&out.stderr).contains("is running"));
    let a = agents[0].take().unwrap();
    a.kill(Signal::Kill).unwrap();
    let _ = a.wait_timeout(Duration::from_secs(5));
    let left = host_state(ha);
    assert!(
        left.guards >= 2 && left.rules == 2 && left.tables == 2,
        "{left:?}"
    );
    let out = ha.exec(meshd_bin(), ["down"]).unwrap();
    assert!(
        out.status.success(),
        "meshd down: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        host_state(ha),
        HostState::default(),
        "left after meshd down"
    );
    // No admin token, join token, token secret or private key in any log.
    _coord.assert_no_secrets_in_logs(&lab);
}
