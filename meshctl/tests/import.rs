//! `meshctl import` against an in-process coordinator on 127.0.0.1: a broken file is refused
//! with its line numbers and changes nothing (also after a restart); a host imported by
//! underlay IP gets its labels when it enrols with a generic token; declared flows are shown
//! as a policy diff and applied with --apply.

use meshd_control::api::EventView;

mod common;

use common::Coord;

impl Coord {
    fn events(&self) -> Vec<EventView> {
        serde_json::from_str(&self.ok(&["events", "-o", "json"])).unwrap()
    }
}

#[test]
fn a_broken_file_is_refused_with_its_lines_and_changes_nothing() {
    let mut c = Coord::start();
    c.enrol("web-1", [192, 0, 2, 10]);
    let before = c.ok(&["hosts", "list", "-o", "json"]);
    let events_before = c.events();
    let f = c.file(
        "cmdb.csv",
        "hostname,ip,labels\n\
         web-1,,app=web;env=prod\n\
         db-1,192.0.2.300,app=db\n\
         db-2,192.0.2.21,app=d b\n\
         from-app,to-app,port\n\
         web,db,http\n",
    );
    let o = c.run(&["import", &f]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    for line in [3, 4, 6] {
        assert!(err.contains(&format!("{f}:{line}: ")), "line {line}: {err}");
    }
    assert!(!err.contains(&format!("{f}:2:")), "{err}");
    assert!(err.contains("nothing was imported"), "{err}");
    assert_eq!(c.ok(&["hosts", "list", "-o", "json"]), before);
    // JSON too, with the lines of the objects.
    let j = c.file(
        "cmdb.json",
        "{\"hosts\": [\n  {\"hostname\": \"web-1\", \"labels\": {\"app\": \"web\"}},\n  {\"ip\": \"nope\", \"labels\": {\"app\": \"db\"}}\n]}\n",
    );
    let o = c.run(&["import", &j]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("{j}:3: \"nope\" is not an IP address")),
        "{err}"
    );
    // Nothing reached the store: the same after a restart.
    c.restart();
    assert_eq!(c.ok(&["hosts", "list", "-o", "json"]), before);
    assert_eq!(c.events(), events_before);
    assert_eq!(c.host("web-1").labels.get("app"), None);
}

#[test]
fn an_unenrolled_host_imported_by_ip_gets_its_labels_when_it_enrols() {
    let mut c = Coord::start();
    c.enrol("web-1", [192, 0, 2, 10]);
    let f = c.file(
        "cmdb.json",
        r#"{"hosts": [{"hostname": "web-1", "labels": {"app": "web"}},
                     {"ip": "192.0.2.20", "labels": "app=db;env=prod"}],
            "flows": [{"from": "web", "to": "db", "port": 5432}]}"#,
    );
    let out = c.ok(&["import", &f]);
    assert!(out.contains("2 host records created, 0 updated"), "{out}");
    assert!(out.contains("host web-1 relabelled"), "{out}");
    assert!(out.contains("--apply"), "{out}");
    assert_eq!(c.host("web-1").labels["app"], "web");
    // The records survive a restart; then the host enrols from that address.
    c.restart();
    c.enrol("anything", [192, 0, 2, 20]);
    let h = c.host("anything");
    assert_eq!(h.labels["app"], "db", "{:?}", h.labels);
    assert_eq!(h.labels["env"], "prod");
    assert_eq!(
        h.labels["image"], "generic",
        "the token's other labels stay"
    );
    let ev = c.events();
    let kinds: Vec<&str> = ev.iter().map(|e| e.kind.as_str()).collect();
    assert!(kinds.contains(&"cmdb_imported"), "{kinds:?}");
    assert!(
        ev.iter()
            .any(|e| e.kind == "host_labels_from_cmdb" && e.detail.contains("192.0.2.20")),
        "{ev:?}"
    );
    // Now the flow's rule adds access: shown, then applied.
    let out = c.ok(&["import", &f]);
    assert!(out.contains("+ web-1 -> anything tcp/5432"), "{out}");
    let policy = c.dir.path().join("proposed.yaml");
    let out = c.ok(&[
        "import",
        &f,
        "--apply",
        "--write-policy",
        policy.to_str().unwrap(),
    ]);
    assert!(out.contains("policy version 1 is now current"), "{out}");
    let yaml = std::fs::read_to_string(&policy).unwrap();
    assert!(yaml.contains("cmdb-web-to-db"), "{yaml}");
    assert!(c.ok(&["policy", "show"]).contains("cmdb-web-to-db"));
    // CSV with one column per label key updates the record (no new one).
    let csv = c.file(
        "cmdb.csv",
        "Host Name,IP Address,app,tier\n,192.0.2.20,db,gold\n",
    );
    let out = c.ok(&["import", &csv]);
    assert!(out.contains("0 host records created, 1 updated"), "{out}");
    assert_eq!(c.host("anything").labels["tier"], "gold");
}
