//! Issue 18, replicas, end to end: two `meshd coordinator` processes on one PostgreSQL
//! database (sharing the coordinator key and admin token), three hosts in network namespaces.
//! A change made through replica A reaches a host connected to replica B; A is SIGKILLed: the
//! hosts keep their tunnels (a TCP stream between two of them goes on), fail over to B, and a
//! change made through B reaches every host.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use common::*;
use meshd_lab::{wait_for, Lab, Signal};

const ALLOW_ALL: &str = "rules:\n  - {name: all, from: {}, to: {}, ports: [any]}\n";

/// The hosts a replica has a live agent session with (each replica only knows its own).
fn connected(c: &Coord, lab: &Lab) -> Vec<String> {
    let (code, v) = c.api(lab, "GET", "/v1/hosts", None);
    if code != 200 {
        return Vec::new();
    }
    let mut names: Vec<String> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| h["connected"] == true)
        .filter_map(|h| h["name"].as_str().map(String::from))
        .collect();
    names.sort();
    names
}

fn rename(c: &Coord, lab: &Lab, host: &str, to: &str) {
    let (code, v) = c.api(
        lab,
        "POST",
        &format!("/v1/hosts/{host}/rename"),
        Some(serde_json::json!({ "name": to })),
    );
    assert_eq!(code, 200, "rename {host}: {v}");
}

fn sees(lab: &Lab, idx: usize, name: &str) -> bool {
    peer_names(lab.host(idx)).iter().any(|n| n == name)
}

#[test]
fn two_replicas_one_killed_hosts_keep_their_tunnels_and_fail_over() {
    meshd_lab::require_root!();
    let pg = meshd_lab::require_postgres!();
    let lab = Lab::new("replicas", 5).unwrap();
    // The coordinators run in network namespaces: they reach the server over its Unix socket.
    let db = format!(
        "postgres://{}@localhost:{}/postgres?host={}",
        meshd_lab::postgres::USER,
        pg.port(),
        pg.dir().display()
    );
    let addr = |i: usize| format!("{}:7443", lab.host(i).underlay_ip());
    let mut a = Coord::start_with(&lab, 0, "replica-a", &["--db", &db, "--replica", &addr(1)]);
    // B shares A's identity: its key and admin token (whose hash is in the database).
    let dir_b = lab.dir().join("replica-b");
    std::fs::create_dir(&dir_b).unwrap();
    std::fs::set_permissions(&dir_b, std::fs::Permissions::from_mode(0o700)).unwrap();
    for f in ["coordinator.key", "admin.token"] {
        std::fs::copy(a.dir.join(f), dir_b.join(f)).unwrap();
    }
    let b = Coord::start_with(&lab, 1, "replica-b", &["--db", &db, "--replica", &addr(0)]);
    let (code, v) = a.apply_policy(&lab, ALLOW_ALL);
    assert!((200..300).contains(&code), "policy apply: {code} {v}");

    // h2 and h3 join through A (their token lists A, then B), h4 through B.
    let ta = a.token(&lab, &[("app", "x")], Some(3600), Some(2));
    let tb = b.token(&lab, &[("app", "x")], Some(3600), Some(1));
    assert!(
        ta.starts_with("meshd2-") && tb.starts_with("meshd2-"),
        "{ta} {tb}"
    );
    // (B follows A's token, and A B's, within a second.)
    std::thread::sleep(Duration::from_millis(1500));
    let mut procs = vec![
        join(&lab, 2, &ta, "h2"),
        join(&lab, 3, &ta, "h3"),
        join(&lab, 4, &tb, "h4"),
    ];
    for i in 2..=4 {
        assert!(
            wait_for(Duration::from_secs(20), Duration::from_millis(100), || {
                peer_names(lab.host(i)).len() == 2
            }),
            "h{i} never got both peers: {:?}",
            peer_names(lab.host(i))
        );
    }
    assert!(
        wait_for(Duration::from_secs(10), Duration::from_millis(100), || {
            connected(&a, &lab) == ["h2", "h3"] && connected(&b, &lab) == ["h4"]
        }),
        "sessions: A {:?}, B {:?}",
        connected(&a, &lab),
        connected(&b, &lab)
    );

    // A change made through A reaches h4, connected to B.
    rename(&a, &lab, "h2", "web");
    assert!(
        wait_for(Duration::from_secs(5), Duration::from_millis(50), || sees(
            &lab, 4, "web"
        )),
        "h4 (on B) never saw the rename made through A: {:?}",
        peer_names(lab.host(4))
    );

    // A TCP stream h2 -> h3 through their tunnel; then A dies (SIGKILL).
    let ov3 = own_overlay(lab.host(3)).unwrap();
    assert!(wait_ping(lab.host(2), ov3, Duration::from_secs(10)));
    let stream = Stream::start(lab.host(2).netns(), lab.host(3).netns(), ov3, 7311);
    assert!(
        wait_for(Duration::from_secs(5), Duration::from_millis(50), || stream
            .bytes()
            > 0),
        "the stream never started"
    );
    let killed = a.proc.take().unwrap();
    killed.kill(Signal::Kill).unwrap();
    // The hosts fail over to B; the tunnel never stopped carrying the stream.
    assert!(
        wait_for(Duration::from_secs(30), Duration::from_millis(200), || {
            connected(&b, &lab) == ["h3", "h4", "web"]
        }),
        "not every host failed over to B: {:?}",
        connected(&b, &lab)
    );
    assert!(stream.flowing(Duration::from_secs(2)), "the stream stalled");
    // A change made through B reaches every host.
    rename(&b, &lab, "h3", "db");
    for i in [2, 4] {
        assert!(
            wait_for(Duration::from_secs(5), Duration::from_millis(50), || sees(
                &lab, i, "db"
            )),
            "host {i} never saw the rename made through B: {:?}",
            peer_names(lab.host(i))
        );
    }
    assert!(stream.flowing(Duration::from_secs(1)), "the stream stalled");
    drop(stream);
    for p in procs.drain(..) {
        stop_cleanly(p);
    }
    drop(b);
    drop(pg);
}
