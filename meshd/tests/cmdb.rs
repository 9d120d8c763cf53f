//! CMDB import end to end in network namespaces: records keyed by underlay IP and declared
//! flows are imported (applied) before any host exists; two hosts enrol with one generic
//! token, each gets its record's labels by the address the coordinator sees, and the declared
//! flow is the only one that passes.

mod common;

use std::time::Duration;

use common::*;
use meshd_lab::{wait_for, Lab};

#[test]
fn hosts_enrolling_with_a_generic_token_join_their_group_by_ip() {
    meshd_lab::require_root!();
    let lab = Lab::new("cmdb", 3).unwrap();
    let coord = Coord::start(&lab, 0);
    let (web_ip, db_ip) = (lab.host(1).underlay_ip(), lab.host(2).underlay_ip());
    let import = serde_json::json!({
        "hosts": [
            {"line": 2, "ip": web_ip.to_string(), "labels": {"app": "web", "env": "prod"}},
            {"line": 3, "ip": db_ip.to_string(), "labels": {"app": "db", "env": "prod"}},
        ],
        "flows": [{"line": 5, "from_app": "web", "to_app": "db", "proto": "tcp", "port": 5432}],
        "apply": true,
    });
    let (code, v) = coord.api(&lab, "POST", "/v1/import", Some(import));
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["created"], 2, "{v}");
    assert_eq!(v["applied_version"], 1, "{v}");
    // A bad row: refused with its line, nothing changes.
    let bad = serde_json::json!({
        "hosts": [{"line": 7, "ip": web_ip.to_string(), "labels": {"app": "d b"}}],
        "flows": [],
    });
    let (code, v) = coord.api(&lab, "POST", "/v1/import", Some(bad));
    assert_eq!(code, 400, "{v}");
    assert_eq!(v["code"], "import_refused", "{v}");
    assert!(v["failures"][0].as_str().unwrap().starts_with("7: "), "{v}");

    let token = coord.token(&lab, &[("image", "generic")], Some(600), Some(2));
    let _p1 = join(&lab, 1, &token, "node-a");
    let _p2 = join(&lab, 2, &token, "node-b");
    let (a, b) = (lab.host(1), lab.host(2));
    assert!(
        wait_for(Duration::from_secs(20), Duration::from_millis(100), || {
            peer_names(a).contains(&"node-b".to_string())
        }),
        "node-a never learned node-b: {}",
        coord.api(&lab, "GET", "/v1/hosts", None).1
    );
    for (name, app) in [("node-a", "web"), ("node-b", "db")] {
        let (_, h) = coord.api(&lab, "GET", &format!("/v1/hosts/{name}"), None);
        assert_eq!(h["labels"]["app"], app, "{h}");
        assert_eq!(h["labels"]["image"], "generic", "{h}");
    }
    let b_ip = own_overlay(b).unwrap();
    let a_ip = own_overlay(a).unwrap();
    assert!(
        tcp_connects(a.netns(), b.netns(), b_ip, 5432),
        "declared flow"
    );
    assert!(
        !tcp_connects(a.netns(), b.netns(), b_ip, 22),
        "undeclared port"
    );
    assert!(
        !tcp_connects(b.netns(), a.netns(), a_ip, 5432),
        "reverse direction"
    );
    let (_, ev) = coord.api(&lab, "GET", "/v1/events?limit=100", None);
    let n = ev
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "host_labels_from_cmdb")
        .count();
    assert_eq!(n, 2, "{ev}");
    coord.assert_no_secrets_in_logs(&lab);
}
