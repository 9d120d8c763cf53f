//! End-to-end tests of the control plane: a coordinator and hosts enrolled by token in
//! network namespaces.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use common::*;
use meshd_lab::{wait_for, Lab, Signal};

/// Every host may reach every other on everything (these tests are about the control plane).
const ALLOW_ALL: &str = "rules:\n  - name: all\n    from: {}\n    to: {}\n    ports: [any]\n";

/// Lab host 0 runs the coordinator; hosts 1..=n join with labelled tokens.
fn mesh(tag: &str, n: usize) -> (Lab, Coord, Vec<meshd_lab::ProcHandle>, Vec<IpAddr>) {
    let lab = Lab::new(tag, n + 1).unwrap();
    let coord = Coord::start(&lab, 0);
    let (code, v) = coord.apply_policy(&lab, ALLOW_ALL);
    assert!((200..300).contains(&code), "policy apply: {code} {v}");
    let mut procs = Vec::new();
    for i in 1..=n {
        let app = format!("app{i}");
        let token = coord.token(&lab, &[("app", &app), ("env", "prod")], Some(3600), Some(1));
        procs.push(join(&lab, i, &token, &format!("host{i}")));
    }
    let mut overlays = Vec::new();
    for i in 1..=n {
        let host = lab.host(i);
        let ok = wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
            peer_names(host).len() == n - 1
        });
        assert!(
            ok,
            "host{i} never got its {} peers: {:?}",
            n - 1,
            peer_names(host)
        );
        overlays.push(own_overlay(host).unwrap());
    }
    (lab, coord, procs, overlays)
}

fn all_pairs_ping(lab: &Lab, overlays: &[IpAddr], timeout: Duration) {
    for (i, _) in overlays.iter().enumerate() {
        for (j, dst) in overlays.iter().enumerate() {
            if i != j {
                assert!(
                    wait_ping(lab.host(i + 1), *dst, timeout),
                    "host{} cannot reach host{} ({dst})",
                    i + 1,
                    j + 1
                );
            }
        }
    }
}

#[test]
fn enrol_three_hosts_traffic_ip_change_and_coordinator_restart() {
    meshd_lab::require_root!();
    let (lab, mut coord, _procs, ov) = mesh("ctl-3", 3);
    let (code, hosts) = coord.api(&lab, "GET", "/v1/hosts", None);
    assert_eq!(code, 200);
    let listed = hosts.to_string();
    for name in ["host1", "host2", "host3"] {
        assert!(listed.contains(name), "{name} missing from {listed}");
    }
    assert!(listed.contains("app2"), "labels missing: {listed}");
    all_pairs_ping(&lab, &ov, Duration::from_secs(10));
    // TCP and UDP across one pair each way.
    let (h1, h2, h3) = (lab.host(1), lab.host(2), lab.host(3));
    let (s, g, _) = tcp_transfer(h1.netns(), h3.netns(), ov[2], 7001, 4 << 20);
    assert_eq!(s, g);
    let (s, g, _) = tcp_transfer(h3.netns(), h2.netns(), ov[1], 7002, 4 << 20);
    assert_eq!(s, g);
    assert!(udp_exchange(h2.netns(), h1.netns(), ov[0], 7003, 50) >= 48);

    // Host 3's underlay IP changes: hosts 1 and 2 learn the new endpoint from the coordinator.
    let new_ip = Ipv4Addr::new(198, 18, 0, 99);
    h3.set_underlay_ip(new_ip).unwrap();
    let start = Instant::now();
    let want = format!("{new_ip}:51820");
    let learned = wait_for(Duration::from_secs(10), Duration::from_millis(20), || {
        [h1, h2].iter().all(|h| {
            status_json(h)
                .map(|s| s["peers"].to_string().contains(&want))
                .unwrap_or(false)
        })
    });
    let took = start.elapsed();
    assert!(learned, "peers never learned host3's new endpoint");
    eprintln!(
        "IP change propagated to all peers in {:.0} ms",
        took.as_secs_f64() * 1000.0
    );
    all_pairs_ping(&lab, &ov, Duration::from_secs(10));

    // Coordinator killed: tunnels keep working.
    let p = coord.proc.take().unwrap();
    p.kill(Signal::Kill).unwrap();
    p.wait_timeout(Duration::from_secs(5)).unwrap();
    all_pairs_ping(&lab, &ov, Duration::from_secs(5));
    // Restarted: nothing lost, agents reconnect.
    coord.restart(&lab);
    let back = wait_for(Duration::from_secs(20), Duration::from_millis(200), || {
        let (_, st) = coord.api(&lab, "GET", "/v1/status", None);
        st["connected"].as_array().map(|a| a.len()) == Some(3)
    });
    assert!(
        back,
        "agents did not reconnect: {}",
        coord.api(&lab, "GET", "/v1/status", None).1
    );
    let (_, hosts) = coord.api(&lab, "GET", "/v1/hosts", None);
    assert_eq!(
        hosts.to_string().matches("\"host").count(),
        listed.matches("\"host").count()
    );
    assert!(hosts.to_string().contains("app3"));
    // No admin token, join token, token secret or private key in any log.
    coord.assert_no_secrets_in_logs(&lab);
}

#[test]
fn removed_host_loses_tunnels_and_bad_tokens_are_refused() {
    meshd_lab::require_root!();
    let (lab, coord, mut procs, ov) = mesh("ctl-rm", 3);
    all_pairs_ping(&lab, &ov, Duration::from_secs(10));
    let (code, v) = coord.api(&lab, "DELETE", "/v1/hosts/host3", None);
    assert!((200..300).contains(&code), "{code} {v}");
    for i in [1, 2] {
        let h = lab.host(i);
        assert!(
            wait_for(Duration::from_secs(5), Duration::from_millis(50), || {
                !peer_names(h).contains(&"host3".to_string())
            }),
            "host{i} still has host3"
        );
        assert!(
            !h.ping(ov[2]).unwrap(),
            "host{i} still reaches removed host3"
        );
    }
    // The removed host's meshd stops with a clear message.
    let p3 = procs.pop().unwrap();
    let st = p3.wait_timeout(Duration::from_secs(10)).unwrap();
    assert!(
        matches!(st, Some(s) if !s.success()),
        "removed host kept running"
    );
    assert!(
        p3.stderr().unwrap().contains("removed"),
        "{}",
        p3.stderr().unwrap()
    );

    // A single-use token works once; the second enrolment is refused, naming why.
    let t_once = coord.token(&lab, &[("app", "x")], None, Some(1));
    let p = join(&lab, 3, &t_once, "first");
    assert!(wait_for(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || peer_names(lab.host(1)).contains(&"first".to_string())
    ));
    p.kill(Signal::Term).unwrap();
    let _ = p.wait_timeout(Duration::from_secs(5));
    let again = lab.dir().join("again");
    let out = lab
        .host(3)
        .exec(
            meshd_bin(),
            [
                "up",
                "--join",
                &t_once,
                "--name",
                "again",
                "--state-dir",
                again.to_str().unwrap(),
            ],
        )
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("used up"), "{err}");
    // Revoked.
    let t_rev = coord.token(&lab, &[("app", "x")], None, None);
    let (_, tokens) = coord.api(&lab, "GET", "/v1/tokens", None);
    let rev_id = tokens.as_array().unwrap().last().unwrap()["id"].clone();
    let (code, _) = coord.api(&lab, "DELETE", &format!("/v1/tokens/{}", rev_id), None);
    assert!((200..300).contains(&code), "revoke: {code}");
    let out = lab
        .host(3)
        .exec(
            meshd_bin(),
            [
                "up",
                "--join",
                &t_rev,
                "--name",
                "rev",
                "--state-dir",
                lab.dir().join("rev").to_str().unwrap(),
            ],
        )
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("revoked"), "{err}");
    // Expired.
    let t_exp = coord.token(&lab, &[("app", "x")], Some(1), None);
    std::thread::sleep(Duration::from_millis(2100));
    let out = lab
        .host(3)
        .exec(
            meshd_bin(),
            [
                "up",
                "--join",
                &t_exp,
                "--name",
                "exp",
                "--state-dir",
                lab.dir().join("exp").to_str().unwrap(),
            ],
        )
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("expired"), "{err}");
    // Garbage.
    let out = lab
        .host(3)
        .exec(
            meshd_bin(),
            [
                "up",
                "--join",
                "meshd1-garbage",
                "--state-dir",
                lab.dir().join("bad").to_str().unwrap(),
            ],
        )
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("join token"));
    // No admin token, join token, token secret or private key in any log.
    coord.assert_no_secrets_in_logs(&lab);
}

#[test]
fn agent_restarts_from_persisted_map_with_coordinator_down() {
    meshd_lab::require_root!();
    let (lab, mut coord, mut procs, ov) = mesh("ctl-static", 2);
    all_pairs_ping(&lab, &ov, Duration::from_secs(10));
    // State directories are 0700 and their files 0600 (agent and coordinator).
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &std::path::Path| {
            std::fs::metadata(p)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
                .permissions()
                .mode()
                & 0o777
        };
        let agent = lab.dir().join("agent2");
        assert_eq!(mode(&agent), 0o700);
        for f in ["host.key", "agent.json", "join.token", "netmap.json"] {
            assert_eq!(mode(&agent.join(f)), 0o600, "{f}");
        }
        assert_eq!(mode(&coord.dir), 0o700);
        for f in [
            "coordinator.key",
            "admin.token",
            "coordinator.db",
            "coordinator.db-wal",
        ] {
            assert_eq!(mode(&coord.dir.join(f)), 0o600, "{f}");
        }
    }
    let p = coord.proc.take().unwrap();
    p.kill(Signal::Kill).unwrap();
    p.wait_timeout(Duration::from_secs(5)).unwrap();
    // Restart host2's meshd while the coordinator is down: it comes back from netmap.json.
    let p2 = procs.pop().unwrap();
    p2.kill(Signal::Term).unwrap();
    assert!(p2.wait_timeout(Duration::from_secs(5)).unwrap().is_some());
    let p2 = resume(&lab, 2, "host2");
    assert!(
        wait_ping(lab.host(2), ov[0], Duration::from_secs(15)),
        "no tunnel from persisted map"
    );
    assert!(wait_ping(lab.host(1), ov[1], Duration::from_secs(5)));
    // SIGHUP (what `systemctl reload` and log rotation send) has nothing to reload in
    // coordinator mode, and must not kill the daemon (its default action would).
    p2.kill(Signal::Hup).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        p2.wait_timeout(Duration::from_millis(10))
            .unwrap()
            .is_none(),
        "SIGHUP killed a coordinator-mode meshd"
    );
    assert!(wait_ping(lab.host(1), ov[1], Duration::from_secs(5)));
    // No admin token, join token, token secret or private key in any log.
    coord.assert_no_secrets_in_logs(&lab);
}
