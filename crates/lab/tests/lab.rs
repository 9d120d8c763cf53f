//! End-to-end tests of the lab itself. They need root, `ip`, `ping`, `tcpdump` and `socat`.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use meshd_lab::pcap::ip_proto;
use meshd_lab::{wait_for, Cmd, Lab, LabError, Signal};

/// Names of all named network namespaces.
fn netns_list() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(out.status.success(), "ip netns list failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// True if the process exists and is not a zombie.
fn process_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Waits until `pid` has exec'd `program` (`ip netns exec` has entered the namespace).
fn wait_exec(pid: u32, program: &str) {
    let ok = wait_for(Duration::from_secs(5), Duration::from_millis(5), || {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.split(|&b| b == 0).next() == Some(program.as_bytes()))
    });
    assert!(ok, "pid {pid} never became {program}");
}

/// Asserts a lab's namespaces exist, then drops it and asserts they are gone.
fn assert_drop_removes(lab: Lab) {
    let names = lab.namespaces().to_vec();
    let dir = lab.dir().to_owned();
    let listed = netns_list();
    for n in &names {
        assert!(listed.contains(n), "{n} missing before drop");
    }
    drop(lab);
    let listed = netns_list();
    for n in &names {
        assert!(!listed.contains(n), "{n} still present after drop");
    }
    if std::env::var("MESHD_LAB_KEEP").as_deref() != Ok("1") {
        assert!(!dir.exists(), "{} not removed", dir.display());
    }
}

#[test]
fn three_hosts_ping_roam_and_drop() {
    meshd_lab::require_root!();
    let lab = Lab::new("ping", 3).unwrap();
    assert_eq!(lab.hosts().len(), 3);
    for (i, h) in lab.hosts().iter().enumerate() {
        assert_eq!(h.index(), i);
        assert_eq!(h.name(), format!("h{i}"));
        assert!(h.netns().starts_with("mlab-"), "{}", h.netns());
        assert_eq!(h.underlay_ip(), Ipv4Addr::new(198, 18, 0, i as u8 + 1));
        let addrs = h
            .exec_ok("ip", ["-o", "addr", "show", "dev", "eth0"])
            .unwrap();
        let addrs = String::from_utf8_lossy(&addrs.stdout);
        assert!(addrs.contains(&format!("198.18.0.{}/24", i + 1)), "{addrs}");
        assert!(addrs.contains(&format!("fd00:1::{}/64", i + 1)), "{addrs}");
    }
    let sw = Command::new("ip")
        .args([
            "-n",
            lab.switch_netns(),
            "-o",
            "link",
            "show",
            "master",
            "br0",
        ])
        .output()
        .unwrap();
    let sw = String::from_utf8_lossy(&sw.stdout);
    for port in ["h0@", "h1@", "h2@"] {
        assert!(sw.contains(port), "bridge ports: {sw}");
    }

    let (h0, h1, h2) = (lab.host(0), lab.host(1), lab.host(2));
    assert!(h0.ping(h1.underlay_ip().into()).unwrap(), "h0 -> h1");
    assert!(h2.ping(h0.underlay_ip().into()).unwrap(), "h2 -> h0");
    assert!(
        h0.ping(h1.underlay_ipv6().into()).unwrap(),
        "h0 -> h1 over IPv6"
    );
    assert!(
        !h0.ping(IpAddr::from([198, 18, 0, 77])).unwrap(),
        "nobody has .77"
    );

    let old = h1.underlay_ip();
    let new = Ipv4Addr::new(198, 18, 0, 101);
    h1.set_underlay_ip(new).unwrap();
    assert_eq!(h1.underlay_ip(), new);
    assert!(h0.ping(new.into()).unwrap(), "h0 -> h1 at its new address");
    assert!(!h0.ping(old.into()).unwrap(), "old address must be gone");
    assert!(matches!(
        h1.set_underlay_ip(Ipv4Addr::new(10, 0, 0, 1)),
        Err(LabError::AddressOutsideUnderlay(_))
    ));
    assert_eq!(h1.underlay_ip(), new);

    assert_drop_removes(lab);
}

#[test]
fn add_host_later_and_labs_are_isolated() {
    meshd_lab::require_root!();
    let mut a = Lab::new("grow", 1).unwrap();
    let b = Lab::new("other", 2).unwrap();
    assert_ne!(a.prefix(), b.prefix());
    // 198.18.0.2 exists only in lab b.
    assert!(!a.host(0).ping(IpAddr::from([198, 18, 0, 2])).unwrap());
    assert!(b.host(0).ping(IpAddr::from([198, 18, 0, 2])).unwrap());
    let added = a.add_host().unwrap();
    assert_eq!(added.index(), 1);
    assert_eq!(added.underlay_ip(), Ipv4Addr::new(198, 18, 0, 2));
    // The earlier failed ping may have left a failed neighbour entry: retry, bounded.
    assert!(wait_for(
        Duration::from_secs(6),
        Duration::from_millis(100),
        || a.host(0)
            .ping(IpAddr::from([198, 18, 0, 2]))
            .unwrap_or(false)
    ));
    assert!(matches!(
        a.try_host(5),
        Err(LabError::NoSuchHost { index: 5, count: 2 })
    ));
    assert_drop_removes(a);
    assert_drop_removes(b);
}

#[test]
fn exec_spawn_env_cwd_and_timeouts() {
    meshd_lab::require_root!();
    let lab = Lab::new("exec", 1).unwrap();
    let h = lab.host(0);

    let err = h
        .exec_ok("sh", ["-c", "echo oops >&2; exit 3"])
        .unwrap_err();
    match err {
        LabError::CommandFailed { status, stderr, .. } => {
            assert_eq!(status.code(), Some(3));
            assert_eq!(stderr, "oops");
        }
        other => panic!("unexpected {other:?}"),
    }
    let out = h.exec("sh", ["-c", "exit 4"]).unwrap();
    assert_eq!(out.status.code(), Some(4));

    let started = Instant::now();
    let err = h
        .exec_cmd(
            Cmd::new("sleep")
                .arg("30")
                .timeout(Duration::from_millis(300)),
        )
        .unwrap_err();
    assert!(matches!(err, LabError::Timeout { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));

    let p = h
        .spawn(
            Cmd::new("sh")
                .args(["-c", "echo \"$LAB_FOO\"; pwd; echo err >&2; exit 7"])
                .env("LAB_FOO", "bar baz")
                .current_dir(lab.dir())
                .label("envtest"),
        )
        .unwrap();
    let status = p
        .wait_timeout(Duration::from_secs(10))
        .unwrap()
        .expect("exits");
    assert_eq!(status.code(), Some(7));
    let expected = format!("bar baz\n{}\n", lab.dir().display());
    assert_eq!(p.stdout().unwrap(), expected);
    assert_eq!(p.stderr().unwrap(), "err\n");
    assert!(p.stdout_path().starts_with(lab.dir()));
    assert!(p.stdout_path().to_string_lossy().contains("envtest"));
    // Signalling a reaped process is a no-op, not a stray kill.
    p.kill(Signal::Term).unwrap();

    let s = h.spawn(Cmd::new("sleep").arg("1000")).unwrap();
    assert!(s.wait_timeout(Duration::from_millis(50)).unwrap().is_none());
    let status = s.stop(Duration::from_secs(2)).unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc_sigterm()));
}

/// SIGTERM's number on Linux.
fn libc_sigterm() -> i32 {
    Signal::Term.as_raw()
}

#[test]
fn drop_kills_spawned_processes_even_if_they_ignore_sigterm() {
    meshd_lab::require_root!();
    let lab = Lab::new("kill", 2).unwrap();
    let plain = lab.host(0).spawn(Cmd::new("sleep").arg("1000")).unwrap();
    // Ignored signals stay ignored across exec, so neither sh nor its sleeps die on SIGTERM.
    let stubborn = lab
        .host(1)
        .spawn(Cmd::new("sh").args(["-c", "trap '' TERM; while :; do sleep 1; done"]))
        .unwrap();
    let pids = [plain.pid(), stubborn.pid()];
    wait_exec(plain.pid(), "sleep");
    wait_exec(stubborn.pid(), "sh");
    for pid in pids {
        assert!(process_running(pid), "{pid} should run");
    }
    let pids_in_ns = Command::new("ip")
        .args(["netns", "pids", lab.host(0).netns()])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&pids_in_ns.stdout).contains(&plain.pid().to_string()),
        "sleep must run inside the host namespace"
    );
    let started = Instant::now();
    assert_drop_removes(lab);
    assert!(started.elapsed() < Duration::from_secs(10));
    for pid in pids {
        assert!(!process_running(pid), "{pid} survived the lab");
    }
    assert!(plain.try_wait().unwrap().is_some());
}

#[test]
fn panic_inside_a_lab_still_cleans_up() {
    meshd_lab::require_root!();
    let seen: Mutex<Option<(Vec<String>, u32)>> = Mutex::new(None);
    let result = std::panic::catch_unwind(|| {
        let lab = Lab::new("panic", 2).unwrap();
        let p = lab.host(1).spawn(Cmd::new("sleep").arg("1000")).unwrap();
        wait_exec(p.pid(), "sleep");
        *seen.lock().unwrap() = Some((lab.namespaces().to_vec(), p.pid()));
        panic!("deliberate panic inside a lab");
    });
    assert!(result.is_err());
    let (names, pid) = seen.into_inner().unwrap().expect("lab was built");
    let listed = netns_list();
    for n in &names {
        assert!(!listed.contains(n), "{n} leaked after panic");
    }
    assert!(!process_running(pid), "sleep {pid} leaked after panic");
}

#[test]
fn stale_namespaces_of_dead_pids_are_removed_live_ones_kept() {
    meshd_lab::require_root!();
    let dead = (4_000_000u32..4_001_000)
        .find(|p| !Path::new(&format!("/proc/{p}")).exists())
        .unwrap();
    let me = std::process::id();
    let stale = format!("mlab-{dead}-{me}-h0");
    // Pid 1 is always alive: its namespaces must survive.
    let live = format!("mlab-1-{me}-h0");
    for n in [&stale, &live] {
        let ok = Command::new("ip")
            .args(["netns", "add", n])
            .status()
            .unwrap();
        assert!(ok.success(), "ip netns add {n}");
    }
    // A leftover process inside the stale namespace. (A concurrently starting lab may remove
    // the namespace first, in which case `ip netns exec` fails; either way it must end.)
    let mut leftover = Command::new("ip")
        .args(["netns", "exec", &stale, "sleep", "1000"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = leftover.id();
    wait_for(Duration::from_secs(2), Duration::from_millis(10), || {
        std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.starts_with("sleep"))
            || leftover.try_wait().is_ok_and(|s| s.is_some())
    });

    let lab = Lab::new("stale", 1).unwrap();
    let listed = netns_list();
    let live_kept = listed.contains(&live);
    let _ = Command::new("ip").args(["netns", "del", &live]).status();
    assert!(!listed.contains(&stale), "stale namespace survived");
    assert!(live_kept, "namespace of a live pid was removed");
    assert!(listed.iter().any(|n| n == lab.host(0).netns()));

    let ended = wait_for(Duration::from_secs(5), Duration::from_millis(10), || {
        leftover.try_wait().is_ok_and(|s| s.is_some())
    });
    if !ended {
        let _ = leftover.kill();
        let _ = leftover.wait();
    }
    assert!(ended, "process inside the stale namespace was not killed");
}

#[test]
fn capture_sees_udp_marker() {
    meshd_lab::require_root!();
    let lab = Lab::new("capture", 2).unwrap();
    let (h0, h1) = (lab.host(0), lab.host(1));
    let marker = format!("MESHD-LAB-MARKER-{}", std::process::id());

    let receiver = h1
        .spawn(Cmd::new("socat").args(["-u", "UDP4-RECV:40000", "STDOUT"]))
        .unwrap();
    let cap = lab.capture(1, "eth0", "udp port 40000").unwrap();
    // The receiver may need a moment to bind: resend until it has the marker.
    let delivered = wait_for(Duration::from_secs(10), Duration::from_millis(100), || {
        let script = format!(
            "printf %s '{marker}' | socat -u - UDP4-SENDTO:{}:40000,sourceport=40001",
            h1.underlay_ip()
        );
        h0.exec_ok("sh", ["-c", &script]).unwrap();
        receiver.stdout().unwrap().contains(&marker)
    });
    assert!(delivered, "socat receiver never got the marker");
    assert!(cap.wait_for_packets(1, Duration::from_secs(5)));
    let path = cap.path().to_owned();
    let pcap = cap.stop_parsed().unwrap();
    assert!(path.starts_with(lab.dir()));

    assert!(!pcap.packets.is_empty());
    assert!(pcap.any_contains(marker.as_bytes()));
    let sums = pcap.summaries();
    assert_eq!(sums.len(), pcap.packets.len(), "filter admits only IP/UDP");
    for s in &sums {
        assert_eq!(s.ip_proto, ip_proto::UDP);
        assert_eq!(s.dst_port, Some(40000));
        assert_eq!(s.src_port, Some(40001));
        assert_eq!(s.src, IpAddr::from(h0.underlay_ip()));
        assert_eq!(s.dst, IpAddr::from(h1.underlay_ip()));
        assert_eq!(s.payload, marker.as_bytes());
    }

    // A bad filter is reported, not waited on.
    let err = lab.capture(0, "eth0", "this is not bpf").unwrap_err();
    assert!(matches!(err, LabError::CommandFailed { .. }), "{err:?}");
    assert_drop_removes(lab);
}
