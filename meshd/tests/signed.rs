//! End to end, signed policy (issue 17 point 3): admins sign with meshctl; a coordinator whose
//! SQLite database is edited by hand to give a host extra access cannot make agents grant it —
//! they refuse and report it (`meshd status`) — while the same change signed through meshctl
//! applies and traffic flows.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use meshd_lab::{wait_for, Lab};

const POLICY: &str = "\
rules:
  - name: web-to-db
    from: { role: web }
    to:   { role: db }
    ports: [tcp/5432]
";

fn meshctl_bin() -> PathBuf {
    let p = Path::new(meshd_bin()).with_file_name("meshctl");
    assert!(
        p.exists(),
        "{} is missing: cargo build -p meshctl",
        p.display()
    );
    p
}

/// `meshctl [--admin-key KEY] ARGS` in the coordinator's namespace: (status, stdout, stderr).
fn meshctl(lab: &Lab, coord: &Coord, key: Option<&Path>, args: &[&str]) -> (i32, String, String) {
    let bin = meshctl_bin();
    let token = std::fs::read_to_string(coord.dir.join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let empty = lab.dir().join("meshctl-empty.toml");
    std::fs::write(&empty, "").unwrap();
    let mut all: Vec<String> = Vec::new();
    if let Some(k) = key {
        all.push("--admin-key".into());
        all.push(k.display().to_string());
    }
    all.extend(args.iter().map(|s| s.to_string()));
    let out = in_netns(lab.host(coord.idx).netns(), move || {
        Command::new(bin)
            .args([
                "--server",
                "http://127.0.0.1:7444",
                "--token",
                &token,
                "--config",
            ])
            .arg(&empty)
            .args(&all)
            .env_remove("MESH_ADMIN_KEY")
            .output()
            .unwrap()
    });
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(r: (i32, String, String), what: &str) -> String {
    assert_eq!(r.0, 0, "{what}: {} {}", r.1, r.2);
    r.1
}

fn counter(host: &meshd_lab::Host, name: &str) -> u64 {
    status_json(host)
        .and_then(|s| s["counters"][name].as_u64())
        .unwrap_or(0)
}

#[test]
fn edited_database_cannot_widen_access_signed_change_applies() {
    meshd_lab::require_root!();
    let lab = Lab::new("signed", 4).unwrap();
    let mut coord = Coord::start(&lab, 0);
    let key = lab.dir().join("admin.key");

    // The admin makes a key (0600) and registers it: the first key, on trust.
    let r = meshctl(
        &lab,
        &coord,
        None,
        &["admin", "keygen", "--out", key.to_str().unwrap()],
    );
    assert_eq!(r.0, 0, "{r:?}");
    let public =
        r.2.lines()
            .find_map(|l| l.strip_prefix("admin public key: "))
            .expect("keygen prints the public key")
            .to_string();
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    ok(
        meshctl(&lab, &coord, Some(&key), &["admin", "add-key", &public]),
        "add-key",
    );

    // Now unsigned widening changes are refused by the API, with a clear error.
    let (code, v) = coord.apply_policy(&lab, POLICY);
    assert_eq!(code, 403, "{v}");
    assert_eq!(v["code"], "signature_required", "{v}");
    let policy = lab.dir().join("policy.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    ok(
        meshctl(
            &lab,
            &coord,
            Some(&key),
            &["policy", "apply", policy.to_str().unwrap()],
        ),
        "signed policy apply",
    );

    // Tokens carry the admin key set's fingerprint (meshctl checks it); hosts enrol.
    let mut procs = Vec::new();
    for (i, name, role) in [(1, "web", "web"), (2, "db", "db"), (3, "other", "other")] {
        let out = ok(
            meshctl(
                &lab,
                &coord,
                Some(&key),
                &[
                    "token",
                    "create",
                    "--labels",
                    &format!("role={role}"),
                    "--uses",
                    "1",
                ],
            ),
            "token create",
        );
        let token = out.trim().lines().last().unwrap().to_string();
        assert!(meshd_control::JoinToken::admin_pin(&token)
            .unwrap()
            .is_some());
        procs.push(join(&lab, i, &token, name));
    }
    for (name, role) in [("web", "web"), ("db", "db"), ("other", "other")] {
        let ok_up = wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
            meshctl(&lab, &coord, None, &["hosts", "show", name]).0 == 0
        });
        assert!(ok_up, "{name} did not enrol");
        ok(
            meshctl(
                &lab,
                &coord,
                Some(&key),
                &["host", "label", name, &format!("role={role}")],
            ),
            "signed label",
        );
    }
    let (web, other) = (lab.host(1), lab.host(3));
    let db_ip = own_overlay(lab.host(2)).unwrap();
    let other_ip = own_overlay(other).unwrap();
    assert!(
        wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
            peer_names(web) == ["db"]
        }),
        "web never got db as its peer: {:?}",
        peer_names(web)
    );
    assert!(tcp_connects(web.netns(), lab.host(2).netns(), db_ip, 5432));
    assert_eq!(counter(web, "signed_pinned"), 1);
    assert_eq!(counter(web, "signed_policy_version"), 1);
    // Before their labels were signed, the token's (unsigned) labels were refused: counted,
    // but all is current now.
    assert_eq!(counter(web, "signed_stale_since"), 0);
    let (web_before, other_before) = (
        counter(web, "signed_updates_refused"),
        counter(other, "signed_updates_refused"),
    );

    // A compromised coordinator: its database edited by hand to make `other` a db host.
    let p = coord.proc.take().unwrap();
    stop_cleanly(p);
    let db = coord.dir.join("coordinator.db");
    let out = Command::new("sqlite3")
        .arg(&db)
        .arg(r#"UPDATE hosts SET labels = '{"role":"db"}' WHERE name = 'other';"#)
        .output()
        .expect("sqlite3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    coord.restart(&lab);
    // The coordinator believes it (its maps now grant web → other) …
    let (_, v) = coord.api(&lab, "GET", "/v1/hosts/other", None);
    assert_eq!(v["labels"]["role"], "db", "{v}");
    // … but the agents refuse it and say so.
    assert!(
        wait_for(Duration::from_secs(20), Duration::from_millis(200), || {
            counter(web, "signed_updates_refused") > web_before
                && counter(other, "signed_updates_refused") > other_before
        }),
        "web and other never reported a refused update: {:?} {:?}",
        status_json(web).map(|s| s["counters"].clone()),
        status_json(other).map(|s| s["counters"].clone())
    );
    assert!(counter(web, "signed_stale_since") > 0);
    assert_eq!(
        peer_names(web),
        ["db"],
        "the forged peer must not be applied"
    );
    assert!(!tcp_connects(web.netns(), other.netns(), other_ip, 5432));
    let text = web
        .exec(meshd_bin(), ["status", "--interface", "mesh0"])
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains("STALE since"), "{text}");
    let log = procs[0].stderr().unwrap_or_default();
    assert!(log.contains("refused unsigned widening"), "{log}");
    // An unsigned relabel through the API is refused as well.
    let r = meshctl(&lab, &coord, None, &["host", "label", "other", "role=db"]);
    assert_ne!(r.0, 0);
    assert!(r.2.contains("must be signed"), "{r:?}");

    // The same change signed by the admin applies: traffic flows.
    ok(
        meshctl(
            &lab,
            &coord,
            Some(&key),
            &["host", "label", "other", "role=db"],
        ),
        "signed label",
    );
    assert!(
        wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
            peer_names(web).len() == 2 && counter(web, "signed_stale_since") == 0
        }),
        "the signed change did not apply: {:?}",
        peer_names(web)
    );
    assert!(wait_for(
        Duration::from_secs(10),
        Duration::from_millis(200),
        || { tcp_connects(web.netns(), other.netns(), other_ip, 5432) }
    ));

    // db rotates its key, no admin involved: its old key signs the new one, and web takes the
    // new key as the same signed db (nothing refused, db stays its peer, traffic flows).
    let refused = counter(web, "signed_updates_refused");
    let key_of = |coord: &Coord| {
        let (code, v) = coord.api(&lab, "GET", "/v1/hosts/db", None);
        assert_eq!(code, 200, "{v}");
        v["public_key"].as_str().unwrap_or_default().to_string()
    };
    let old_key = key_of(&coord);
    // (db may still be reconnecting after the coordinator's restart: a rotation needs it
    // online.)
    let mut answer = (0, serde_json::Value::Null);
    let rotated = wait_for(Duration::from_secs(15), Duration::from_millis(200), || {
        answer = coord.api(&lab, "POST", "/v1/hosts/db/rotate-key", None);
        answer.0 == 200
    });
    assert!(rotated, "rotate-key: {answer:?}");
    assert!(
        wait_for(Duration::from_secs(20), Duration::from_millis(100), || {
            key_of(&coord) != old_key
        }),
        "db never switched keys"
    );
    let (_, events) = coord.api(&lab, "GET", "/v1/events", None);
    assert!(
        !events.to_string().contains("key_rotation_aborted"),
        "{events}"
    );
    assert!(
        wait_for(Duration::from_secs(15), Duration::from_millis(200), || {
            tcp_connects(web.netns(), lab.host(2).netns(), db_ip, 5432)
        }),
        "web cannot reach db on its new key: peers {:?}",
        peer_names(web)
    );
    let mut peers = peer_names(web);
    peers.sort();
    assert_eq!(peers, ["db", "other"]);
    assert_eq!(
        counter(web, "signed_updates_refused"),
        refused,
        "web refused db's rotated key"
    );
    for p in procs {
        stop_cleanly(p);
    }
}
