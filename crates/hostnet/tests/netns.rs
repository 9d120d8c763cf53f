//! End-to-end tests of meshd-hostnet in lab network namespaces (need root, `ip`, `nft`).
//!
//! Every test builds its own [`Lab`] (namespaces named with this process's pid, deleted on
//! drop, also when a test panics) and runs the library in a thread that `setns`es into a lab
//! host, with its own current-thread tokio runtime. Nothing runs in the root namespace.
//! Only 198.18.0.0/24, fd00:1::/64 (underlay) and 100.64.0.0/24 (overlay stand-in) are used.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::time::{Duration, Instant};

use meshd_hostnet::{cleanup_stale, Blocked, Config, Covered, HostNet, Proto, Route};
use meshd_lab::{Host, Lab};
use serde_json::Value;

const TUN: &str = "mtun0";
const LISTEN_PORT: u16 = 51820;
/// Connect attempts that must fail are given this long (the brief bound is 2 s).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);

/// Runs `f` on a thread inside namespace `ns` and returns its result (panics propagate).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    let res = std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: setns on a valid namespace fd; it affects only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join();
    match res {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// Runs the async `f` in namespace `ns` on a current-thread runtime.
fn run_in<F, Fut, T>(ns: &str, f: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    in_netns(ns, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f())
    })
}

/// `ip -n NS -j ARGS...` parsed as JSON.
fn ip_json(ns: &str, args: &[&str]) -> Value {
    let out = std::process::Command::new("ip")
        .args(["-n", ns, "-j"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Value::Array(vec![]);
    }
    serde_json::from_str(&text).unwrap()
}

fn ip_ok(ns: &str, args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(["-n", ns])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Number of rules at `prio` for one family.
fn rule_count(ns: &str, v6: bool, prio: u32) -> usize {
    let fam = if v6 { "-6" } else { "-4" };
    ip_json(ns, &[fam, "rule", "show"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["priority"].as_u64() == Some(u64::from(prio)))
        .count()
}

/// Routes in `table` for one family.
fn table_routes(ns: &str, v6: bool, table: u32) -> Vec<Value> {
    let fam = if v6 { "-6" } else { "-4" };
    let out = std::process::Command::new("ip")
        .args(["-n", ns, "-j", fam, "route", "show", "table"])
        .arg(table.to_string())
        .output()
        .unwrap();
    if String::from_utf8_lossy(&out.stderr).contains("FIB table does not exist") {
        return vec![];
    }
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Array(vec![]));
    v.as_array().unwrap().clone()
}

/// `family name` of the `meshd_*` nft tables in `ns`, sorted.
fn nft_tables(ns: &str) -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-j", "list", "tables"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut names: Vec<String> = v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get("table"))
        .filter(|t| t["name"].as_str().unwrap().starts_with("meshd_"))
        .map(|t| {
            format!(
                "{} {}",
                t["family"].as_str().unwrap(),
                t["name"].as_str().unwrap()
            )
        })
        .collect();
    names.sort();
    names
}

/// Runs `nft ARGS` in `ns` and asserts it succeeded.
fn nft_ok(ns: &str, args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "nft"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// (dev, prefsrc) of `ip route get DST [mark M]`.
fn route_get(ns: &str, dst: &str, mark: Option<u32>) -> (String, String) {
    let m = mark.map(|m| format!("{m:#x}"));
    let mut args = vec!["route", "get", dst];
    if let Some(m) = &m {
        args.extend(["mark", m.as_str()]);
    }
    let v = ip_json(ns, &args);
    let r = &v[0];
    (
        r["dev"].as_str().unwrap_or_default().to_owned(),
        r["prefsrc"].as_str().unwrap_or_default().to_owned(),
    )
}

fn if_index(ns: &str, name: &str) -> u32 {
    let v = ip_json(ns, &["link", "show", name]);
    u32::try_from(v[0]["ifindex"].as_u64().unwrap()).unwrap()
}

/// Adds a stand-in for the TUN named [`TUN`] to `host` and returns a config for it: one end
/// of a veth pair whose other end is in the same namespace, both up (a packet sink; the
/// `dummy` module may be missing).
fn dummy_tun(host: &Host) -> Config {
    let ns = host.netns();
    ip_ok(
        ns,
        &[
            "link", "add", TUN, "type", "veth", "peer", "name", "mtunsink",
        ],
    );
    ip_ok(ns, &["link", "set", "mtunsink", "up"]);
    ip_ok(ns, &["link", "set", TUN, "up"]);
    Config::with_defaults(if_index(ns, TUN), TUN, LISTEN_PORT)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Routes into the TUN (not the `unreachable` guards) in `table` for one family.
fn tun_routes(ns: &str, v6: bool, table: u32) -> Vec<Value> {
    table_routes(ns, v6, table)
        .into_iter()
        .filter(|r| r["type"] != "unreachable")
        .collect()
}

/// Destinations of the `unreachable` guard routes in `table` for one family.
fn guard_routes(ns: &str, v6: bool, table: u32) -> Vec<String> {
    table_routes(ns, v6, table)
        .into_iter()
        .filter(|r| r["type"] == "unreachable")
        .map(|r| {
            assert_eq!(r["metric"], meshd_hostnet::GUARD_METRIC, "{r}");
            r["dst"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// Asserts the guard routes of `cfg` in `ns` (IPv4 and IPv6 counts).
fn assert_guards(ns: &str, cfg: &Config, v4: usize, v6: usize) {
    assert_eq!(guard_routes(ns, false, cfg.table).len(), v4, "IPv4 guards");
    assert_eq!(guard_routes(ns, true, cfg.table).len(), v6, "IPv6 guards");
}

/// Asserts the whole footprint of `cfg` in `ns`: rules per family, routes into the TUN in
/// the table, nft tables.
fn assert_footprint(ns: &str, cfg: &Config, rules: usize, routes4: usize, routes6: usize) {
    assert_eq!(
        rule_count(ns, false, cfg.rule_priority),
        rules,
        "IPv4 rules"
    );
    assert_eq!(rule_count(ns, true, cfg.rule_priority), rules, "IPv6 rules");
    assert_eq!(
        tun_routes(ns, false, cfg.table).len(),
        routes4,
        "IPv4 routes"
    );
    assert_eq!(
        tun_routes(ns, true, cfg.table).len(),
        routes6,
        "IPv6 routes"
    );
    let want: Vec<String> = if rules > 0 {
        vec![
            format!("arp {}", cfg.nft_table()),
            format!("inet {}", cfg.nft_table()),
        ]
    } else {
        vec![]
    };
    assert_eq!(nft_tables(ns), want, "nft tables");
}

#[test]
fn routes_rules_restart_and_stop() {
    meshd_lab::require_root!("network namespaces and nft");
    let lab = Lab::new("hostnet-routes", 1).unwrap();
    let h = lab.host(0);
    let ns = h.netns().to_owned();
    let cfg = dummy_tun(h);
    let (me4, me6) = (IpAddr::V4(h.underlay_ip()), IpAddr::V6(h.underlay_ipv6()));

    // Start, route two peers, check the lookups with and without the mark.
    let ns2 = ns.clone();
    let c = cfg.clone();
    run_in(&ns, move || async move {
        let ns = ns2;
        let mut hn = HostNet::start(c.clone()).await.unwrap();
        assert_footprint(&ns, &c, 1, 0, 0);
        let rule = &ip_json(&ns, &["-4", "rule", "show"])
            .as_array()
            .unwrap()
            .clone();
        let ours = rule
            .iter()
            .find(|r| r["priority"].as_u64() == Some(5200))
            .unwrap();
        assert!(ours.get("not").is_some(), "rule is not inverted: {ours}");
        assert_eq!(ours["fwmark"], format!("{:#x}", c.fwmark));

        hn.set_routes(&[
            Route {
                dst: ip("198.18.0.2"),
                src: Some(me4),
            },
            Route {
                dst: ip("fd00:1::2"),
                src: Some(me6),
            },
        ])
        .await
        .unwrap();
        assert_footprint(&ns, &c, 1, 1, 1);
        assert_guards(&ns, &c, 1, 1);
        assert_eq!(
            route_get(&ns, "198.18.0.2", None),
            (TUN.to_owned(), "198.18.0.1".to_owned())
        );
        assert_eq!(route_get(&ns, "198.18.0.2", Some(c.fwmark)).0, "eth0");
        assert_eq!(
            route_get(&ns, "fd00:1::2", None),
            (TUN.to_owned(), "fd00:1::1".to_owned())
        );
        assert_eq!(route_get(&ns, "fd00:1::2", Some(c.fwmark)).0, "eth0");
        // Other addresses are not affected.
        assert_eq!(route_get(&ns, "198.18.0.9", None).0, "eth0");

        // A changed set: one kept, one added, one source changed, nothing else touched.
        hn.set_routes(&[
            Route {
                dst: ip("198.18.0.2"),
                src: Some(me4),
            },
            Route {
                dst: ip("198.18.0.3"),
                src: Some(me4),
            },
            Route {
                dst: ip("fd00:1::2"),
                src: None,
            },
        ])
        .await
        .unwrap();
        assert_footprint(&ns, &c, 1, 2, 1);
        assert_guards(&ns, &c, 2, 1);
        let r6 = tun_routes(&ns, true, c.table);
        assert_eq!(r6[0]["dst"], "fd00:1::2");
        assert!(r6[0].get("prefsrc").is_none(), "{r6:?}");
        // Remove one.
        hn.set_routes(&[Route {
            dst: ip("198.18.0.3"),
            src: Some(me4),
        }])
        .await
        .unwrap();
        assert_footprint(&ns, &c, 1, 1, 0);
        assert_guards(&ns, &c, 1, 0);
        assert_eq!(route_get(&ns, "198.18.0.2", None).0, "eth0");
        assert_eq!(route_get(&ns, "198.18.0.3", None).0, TUN);
        assert_eq!(hn.routes().len(), 1);
        // Crash: dropped without stop; everything stays.
        drop(hn);
    });
    assert_footprint(&ns, &cfg, 1, 1, 0);
    assert_guards(&ns, &cfg, 1, 0);

    // A stale rule into our table from an older run with another priority (the kernel
    // refuses an exact duplicate of the live one).
    let t = cfg.table.to_string();
    let m = format!("{:#x}", cfg.fwmark);
    for fam in ["-4", "-6"] {
        ip_ok(
            &ns,
            &[
                fam, "rule", "add", "not", "fwmark", &m, "table", &t, "pref", "5100",
            ],
        );
    }
    assert_eq!(rule_count(&ns, false, 5100), 1);
    assert_eq!(rule_count(&ns, true, 5100), 1);

    // Restart after the crash: exactly one of everything, no stale routes.
    let ns2 = ns.clone();
    let c = cfg.clone();
    run_in(&ns, move || async move {
        let ns = ns2;
        let mut hn = HostNet::start(c.clone()).await.unwrap();
        // The crashed run's guard stays until the first set_routes reconciles it.
        assert_footprint(&ns, &c, 1, 0, 0);
        assert_eq!(guard_routes(&ns, false, c.table), ["198.18.0.3"]);
        assert_eq!(hn.guarded(), [ip("198.18.0.3")]);
        assert_eq!(rule_count(&ns, false, 5100), 0);
        assert_eq!(rule_count(&ns, true, 5100), 0);
        hn.set_routes(&[Route {
            dst: ip("198.18.0.2"),
            src: Some(me4),
        }])
        .await
        .unwrap();
        assert_eq!(guard_routes(&ns, false, c.table), ["198.18.0.2"]);
        assert_eq!(hn.guarded(), [ip("198.18.0.2")]);
        // And again: start on top of a live-looking state.
        drop(hn);
        let hn = HostNet::start(c.clone()).await.unwrap();
        assert_footprint(&ns, &c, 1, 0, 0);
        assert_guards(&ns, &c, 1, 0);
        hn.stop().await.unwrap();
        assert_footprint(&ns, &c, 0, 0, 0);
        assert_guards(&ns, &c, 0, 0);
        assert_eq!(route_get(&ns, "198.18.0.2", None).0, "eth0");

        // cleanup_stale removes a crashed instance's state and is idempotent.
        let mut hn = HostNet::start(c.clone()).await.unwrap();
        hn.set_routes(&[Route {
            dst: ip("fd00:1::2"),
            src: Some(me6),
        }])
        .await
        .unwrap();
        drop(hn);
        assert_footprint(&ns, &c, 1, 0, 1);
        assert_guards(&ns, &c, 0, 1);
        cleanup_stale(&c).await.unwrap();
        assert_footprint(&ns, &c, 0, 0, 0);
        assert_guards(&ns, &c, 0, 0);
        cleanup_stale(&c).await.unwrap();
        assert_footprint(&ns, &c, 0, 0, 0);
    });
}

/// Tries a TCP connection from namespace `from` to `to` within [`CONNECT_TIMEOUT`].
fn tcp_connects(from: &str, to: SocketAddr) -> bool {
    in_netns(from, move || {
        let start = Instant::now();
        let res = TcpStream::connect_timeout(&to, CONNECT_TIMEOUT);
        assert!(start.elapsed() < Duration::from_secs(2) + Duration::from_millis(500));
        match res {
            Ok(_) => true,
            Err(e) if e.kind() == ErrorKind::TimedOut || e.kind() == ErrorKind::WouldBlock => false,
            Err(e) => panic!("connect to {to}: unexpected error {e}"),
        }
    })
}

/// Sends one UDP datagram from `from` to `to`, and reports whether `rx` got it within 500 ms.
fn udp_delivered(from: &str, to: SocketAddr, rx: &UdpSocket) -> bool {
    in_netns(from, move || {
        let s = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).unwrap();
        s.send_to(b"plaintext", to).unwrap();
    });
    rx.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 64];
    rx.recv_from(&mut buf).is_ok()
}

fn find(blocked: &[Blocked], src: &str, proto: Proto, port: u16) -> u64 {
    blocked
        .iter()
        .filter(|b| b.src == ip(src) && b.proto == proto && b.port == port)
        .map(|b| b.packets)
        .sum()
}

#[test]
fn covered_ports_only_accept_traffic_through_the_tun() {
    meshd_lab::require_root!("network namespaces and nft");
    let lab = Lab::new("hostnet-guard", 2).unwrap();
    let (h0, h1) = (lab.host(0), lab.host(1));
    let (ns0, ns1) = (h0.netns().to_owned(), h1.netns().to_owned());
    // The TUN stand-in: a veth pair h0:mtunp <-> h1:mtun0 with overlay-range addresses.
    ip_ok(
        &ns1,
        &[
            "link", "add", TUN, "type", "veth", "peer", "name", "mtunp", "netns", &ns0,
        ],
    );
    ip_ok(&ns1, &["addr", "add", "100.64.0.2/24", "dev", TUN]);
    ip_ok(&ns1, &["link", "set", TUN, "up"]);
    ip_ok(&ns0, &["addr", "add", "100.64.0.1/24", "dev", "mtunp"]);
    ip_ok(&ns0, &["link", "set", "mtunp", "up"]);
    let cfg = Config::with_defaults(if_index(&ns1, TUN), TUN, LISTEN_PORT);

    // h0 listens too, for the reply-direction check.
    let _l0 = in_netns(&ns0, || TcpListener::bind("[::]:7000").unwrap());
    let c = cfg.clone();
    let ns1c = ns1.clone();
    run_in(&ns1, move || async move {
        let ns1 = ns1c;
        let listeners: Vec<TcpListener> = [5005u16, 6000]
            .iter()
            .map(|p| TcpListener::bind(("::", *p)).unwrap())
            .collect();
        let udp5300 = UdpSocket::bind("[::]:5300").unwrap();
        let udp_tunnel = UdpSocket::bind(("::", LISTEN_PORT)).unwrap();
        let v4 = |p: u16| SocketAddr::new(ip("198.18.0.2"), p);
        let v6 = |p: u16| SocketAddr::new(ip("fd00:1::2"), p);
        let overlay = |p: u16| SocketAddr::new(ip("100.64.0.2"), p);

        // No table yet: the listing says so (whatever nft's message), and start creates it.
        let table = c.nft_table();
        assert!(meshd_hostnet::nft::list_table(&table)
            .await
            .unwrap()
            .is_none());
        let mut hn = HostNet::start(c.clone()).await.unwrap();
        assert!(meshd_hostnet::nft::list_table(&table)
            .await
            .unwrap()
            .is_some());
        // Nothing covered yet: everything connects.
        assert!(tcp_connects(&ns0, v4(5005)));
        assert!(hn.take_blocked().await.unwrap().is_empty());

        hn.set_covered(&Covered {
            tcp: vec![(5000, 5010), (5004, 5006)],
            udp: vec![(5300, 5300), (51000, 52000)],
        })
        .await
        .unwrap();
        assert!(
            !tcp_connects(&ns0, v4(5005)),
            "plaintext v4 to a covered port"
        );
        assert!(
            !tcp_connects(&ns0, v6(5005)),
            "plaintext v6 to a covered port"
        );
        assert!(tcp_connects(&ns0, v4(6000)), "uncovered v4");
        assert!(tcp_connects(&ns0, v6(6000)), "uncovered v6");
        assert!(tcp_connects(&ns0, overlay(5005)), "through the TUN");
        assert!(!udp_delivered(&ns0, v4(5300), &udp5300), "plaintext udp");
        assert!(
            udp_delivered(&ns0, v4(LISTEN_PORT), &udp_tunnel),
            "tunnel port inside a covered range"
        );
        assert!(
            udp_delivered(&ns0, v6(LISTEN_PORT), &udp_tunnel),
            "tunnel port v6"
        );

        let blocked = hn.take_blocked().await.unwrap();
        assert!(
            find(&blocked, "198.18.0.1", Proto::Tcp, 5005) >= 1,
            "{blocked:?}"
        );
        assert!(
            find(&blocked, "fd00:1::1", Proto::Tcp, 5005) >= 1,
            "{blocked:?}"
        );
        assert_eq!(
            find(&blocked, "198.18.0.1", Proto::Udp, 5300),
            1,
            "{blocked:?}"
        );
        assert_eq!(blocked.len(), 3, "only the dropped flows: {blocked:?}");
        // Increases only: nothing new since.
        assert!(hn.take_blocked().await.unwrap().is_empty());
        assert!(!tcp_connects(&ns0, v4(5005)));
        let again = hn.take_blocked().await.unwrap();
        assert_eq!(again.len(), 1, "{again:?}");
        assert!(again[0].packets >= 1);

        // Replies to connections this host opened pass even on covered (ephemeral) ports.
        hn.set_covered(&Covered {
            tcp: vec![(1024, 65535)],
            udp: vec![],
        })
        .await
        .unwrap();
        let h0_addr = SocketAddr::new(ip("198.18.0.1"), 7000);
        let reply_ok = TcpStream::connect_timeout(&h0_addr, CONNECT_TIMEOUT);
        assert!(reply_ok.is_ok(), "outgoing connection: {reply_ok:?}");

        // Replacing the covered set: 5005 opens, 6000 closes.
        hn.set_covered(&Covered {
            tcp: vec![(6000, 6000)],
            udp: vec![],
        })
        .await
        .unwrap();
        assert!(tcp_connects(&ns0, v4(5005)));
        assert!(!tcp_connects(&ns0, v4(6000)));
        assert!(
            udp_delivered(&ns0, v4(5300), &udp5300),
            "udp no longer covered"
        );

        // Someone deletes the table: reading the drops says it is gone, and stop still works.
        nft_ok(&ns1, &["delete", "table", "inet", &table]);
        let gone = hn.take_blocked().await.unwrap_err();
        assert!(
            matches!(&gone, meshd_hostnet::Error::TableGone { table: t } if *t == table),
            "{gone:?}"
        );
        assert!(gone.to_string().contains("is gone"), "{gone}");
        hn.stop().await.unwrap();
        assert!(tcp_connects(&ns0, v4(6000)), "after stop");
        assert!(nft_tables(&ns1).is_empty());
        drop(listeners);
    });
}

#[test]
fn tunnel_packets_bypass_the_tun_under_strict_rp_filter() {
    meshd_lab::require_root!("network namespaces and nft");
    let lab = Lab::new("hostnet-mark", 2).unwrap();
    let (h0, h1) = (lab.host(0), lab.host(1));
    let (ns0, ns1) = (h0.netns().to_owned(), h1.netns().to_owned());
    let cfg = dummy_tun(h1);
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &ns1, "sysctl", "-q", "-w"])
        .args([
            "net.ipv4.conf.all.rp_filter=1",
            "net.ipv4.conf.eth0.rp_filter=1",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let peer_rx = in_netns(&ns0, || UdpSocket::bind("0.0.0.0:40000").unwrap());
    peer_rx
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let c = cfg.clone();
    let ns0c = ns0.clone();
    run_in(&ns1, move || async move {
        let ns0 = ns0c;
        let mut hn = HostNet::start(c.clone()).await.unwrap();
        hn.set_routes(&[Route {
            dst: ip("198.18.0.1"),
            src: Some(ip("198.18.0.2")),
        }])
        .await
        .unwrap();
        let tunnel = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .unwrap();
        tunnel.set_mark(c.fwmark).unwrap();
        tunnel
            .bind(&SocketAddr::new(ip("0.0.0.0"), LISTEN_PORT).into())
            .unwrap();
        let tunnel: UdpSocket = tunnel.into();
        tunnel
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        // The peer's datagram to the tunnel port passes strict rp_filter.
        let tunnel_addr = SocketAddr::new(ip("198.18.0.2"), LISTEN_PORT);
        in_netns(&ns0, move || {
            let s = UdpSocket::bind("0.0.0.0:40001").unwrap();
            s.send_to(b"handshake", tunnel_addr).unwrap();
        });
        let mut buf = [0u8; 64];
        let r = tunnel.recv_from(&mut buf);
        if r.is_err() {
            for cmd in [
                "sysctl net.ipv4.conf.all.src_valid_mark net.ipv4.conf.all.rp_filter net.ipv4.conf.eth0.rp_filter",
                "nft list ruleset",
                "nstat -az TcpExtIPReversePathFilter",
                "ip rule",
                "ip route show table all",
            ] {
                let o = std::process::Command::new("sh").args(["-c", cmd]).output().unwrap();
                eprintln!("$ {cmd}\n{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            }
        }
        let (n, from) = r.expect("tunnel port unreachable");
        assert_eq!(&buf[..n], b"handshake");
        assert_eq!(from, SocketAddr::new(ip("198.18.0.1"), 40001));
        // The marked socket reaches the peer directly ...
        tunnel
            .send_to(b"marked", SocketAddr::new(ip("198.18.0.1"), 40000))
            .unwrap();
        let mut buf = [0u8; 64];
        let (n, _) = peer_rx.recv_from(&mut buf).expect("marked reply lost");
        assert_eq!(&buf[..n], b"marked");
        // ... while unmarked traffic to the peer goes into the TUN (here: a dummy sink).
        let plain = UdpSocket::bind("0.0.0.0:0").unwrap();
        plain
            .send_to(b"plain", SocketAddr::new(ip("198.18.0.1"), 40000))
            .unwrap();
        assert!(
            peer_rx.recv_from(&mut buf).is_err(),
            "unmarked bypassed the TUN"
        );
        hn.stop().await.unwrap();
    });
}

/// What a connection attempt from `from` to `to` ran into.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    /// Connected.
    Connected,
    /// Refused on this host at once (no route: `unreachable`; or dropped by nft on output).
    LocalError,
    /// Nothing came back in time (dropped somewhere).
    TimedOut,
}

fn tcp_attempt(from: &str, to: SocketAddr) -> Attempt {
    in_netns(from, move || {
        match TcpStream::connect_timeout(&to, Duration::from_millis(700)) {
            Ok(_) => Attempt::Connected,
            Err(e) if e.kind() == ErrorKind::TimedOut || e.kind() == ErrorKind::WouldBlock => {
                Attempt::TimedOut
            }
            Err(_) => Attempt::LocalError,
        }
    })
}

/// Sends a UDP datagram from `from` (with `SO_MARK = mark` if given); true if `rx` got it.
fn udp_marked_delivered(from: &str, to: SocketAddr, mark: Option<u32>, rx: &UdpSocket) -> bool {
    in_netns(from, move || {
        let s = socket2::Socket::new(socket2::Domain::for_address(to), socket2::Type::DGRAM, None)
            .unwrap();
        if let Some(m) = mark {
            s.set_mark(m).unwrap();
        }
        // A send refused locally (no route, or nft on output) is "not delivered".
        let _ = s.send_to(b"plaintext", &to.into());
    });
    rx.set_read_timeout(Some(Duration::from_millis(400)))
        .unwrap();
    let mut buf = [0u8; 64];
    rx.recv_from(&mut buf).is_ok()
}

/// Asserts that TCP and UDP from `ns` to the peer's `dsts` do not leave in plaintext, and
/// that meshd's own marked sockets still get through.
fn assert_blocked(ns: &str, dsts: &[IpAddr], mark: u32, udp: &UdpSocket, when: &str) {
    for &dst in dsts {
        let got = tcp_attempt(ns, SocketAddr::new(dst, 5005));
        assert_ne!(
            got,
            Attempt::Connected,
            "{when}: tcp to {dst} left in plaintext"
        );
        assert!(
            !udp_marked_delivered(ns, SocketAddr::new(dst, 5300), None, udp),
            "{when}: udp to {dst} left in plaintext"
        );
        assert!(
            udp_marked_delivered(ns, SocketAddr::new(dst, 5300), Some(mark), udp),
            "{when}: marked udp to {dst} was dropped"
        );
    }
}

/// Asserts that TCP and UDP from `ns` to the peer's `dsts` flow in plaintext (no meshd).
fn assert_plain(ns: &str, dsts: &[IpAddr], udp: &UdpSocket, when: &str) {
    for &dst in dsts {
        let got = tcp_attempt(ns, SocketAddr::new(dst, 5005));
        assert_eq!(got, Attempt::Connected, "{when}: tcp to {dst}");
        assert!(
            udp_marked_delivered(ns, SocketAddr::new(dst, 5300), None, udp),
            "{when}: udp to {dst}"
        );
    }
}

#[test]
fn the_guard_outlives_the_tun_the_process_and_a_flushed_table() {
    meshd_lab::require_root!("network namespaces and nft");
    let lab = Lab::new("hostnet-failclosed", 2).unwrap();
    let (h0, h1) = (lab.host(0), lab.host(1));
    let (ns0, ns1) = (h0.netns().to_owned(), h1.netns().to_owned());
    let cfg = dummy_tun(h0);
    let peer = [IpAddr::V4(h1.underlay_ip()), IpAddr::V6(h1.underlay_ipv6())];
    let routes = [
        Route {
            dst: peer[0],
            src: Some(IpAddr::V4(h0.underlay_ip())),
        },
        Route {
            dst: peer[1],
            src: Some(IpAddr::V6(h0.underlay_ipv6())),
        },
    ];
    // The peer serves TCP and UDP on its underlay addresses.
    let (_tcp, udp) = in_netns(&ns1, || {
        (
            TcpListener::bind("[::]:5005").unwrap(),
            UdpSocket::bind("[::]:5300").unwrap(),
        )
    });
    assert_plain(&ns0, &peer, &udp, "before meshd");

    let c = cfg.clone();
    run_in(&ns0, move || async move {
        let mut hn = HostNet::start(c).await.unwrap();
        hn.set_routes(&routes).await.unwrap();
        // Crash: the process dies without stop.
        drop(hn);
    });
    // The kernel deletes the TUN with the process, and its routes with it.
    ip_ok(&ns0, &["link", "del", TUN]);
    assert_footprint(&ns0, &cfg, 1, 0, 0);
    assert_guards(&ns0, &cfg, 1, 1);
    let out = std::process::Command::new("ip")
        .args(["-n", &ns0, "route", "get", &peer[0].to_string()])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a route to the peer without the TUN: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Connecting fails at once, on this host.
    assert_eq!(
        tcp_attempt(&ns0, SocketAddr::new(peer[0], 5005)),
        Attempt::LocalError
    );
    assert_blocked(&ns0, &peer, cfg.fwmark, &udp, "meshd crashed");

    // Second layer: even with the guard routes flushed by someone, nft drops it on output.
    for fam in ["-4", "-6"] {
        ip_ok(
            &ns0,
            &[fam, "route", "flush", "table", &cfg.table.to_string()],
        );
    }
    assert_guards(&ns0, &cfg, 0, 0);
    assert_blocked(
        &ns0,
        &peer,
        cfg.fwmark,
        &udp,
        "meshd crashed, table flushed",
    );

    // Restart on a new TUN: the sets carry over, so nothing opens before the map arrives;
    // then the guard routes come back. A clean stop removes it all.
    let cfg2 = dummy_tun(h0);
    let c = cfg2.clone();
    let ns = ns0.clone();
    let udp = run_in(&ns0, move || async move {
        let mut hn = HostNet::start(c.clone()).await.unwrap();
        assert_eq!(hn.guarded(), peer);
        assert_blocked(&ns, &peer, c.fwmark, &udp, "restarted, no map yet");
        hn.set_routes(&routes).await.unwrap();
        assert_guards(&ns, &c, 1, 1);
        assert_eq!(route_get(&ns, &peer[0].to_string(), None).0, TUN);
        hn.stop().await.unwrap();
        udp
    });
    ip_ok(&ns0, &["link", "del", TUN]);
    assert_footprint(&ns0, &cfg2, 0, 0, 0);
    assert_guards(&ns0, &cfg2, 0, 0);
    assert_plain(&ns0, &peer, &udp, "after a clean stop");
}
