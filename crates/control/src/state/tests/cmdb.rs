use super::*;
use crate::cmdb::{self, CmdbFile};

fn file(text: &str) -> CmdbFile {
    cmdb::parse(text).unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn enrol_from(
    s: &mut CoordinatorState,
    k: u8,
    name: &str,
    observed: [u8; 4],
    reported: [u8; 4],
) -> HostInfo {
    s.connect(
        100,
        key(k),
        ConnId(u64::from(k)),
        observed.into(),
        Hello::Enrol {
            secret_hash: hash_secret(b"generic"),
            name: name.into(),
            endpoints: EndpointReport {
                addrs: vec![SocketAddr::from((reported, 51820))],
                listen_port: Some(51820),
                transparent: false,
            },
        },
    )
    .unwrap()
}

fn generic(s: &mut CoordinatorState) {
    s.create_token(
        0,
        TokenSpec {
            labels: labels(&[("app", "generic"), ("image", "rhel9")]),
            ..Default::default()
        },
        hash_secret(b"generic"),
    )
    .unwrap();
}

#[test]
fn a_file_with_a_bad_row_is_refused_whole_and_changes_nothing() {
    let mut s = three();
    let _ = maps(&mut s);
    let before: Vec<Host> = s.hosts().cloned().collect();
    // Row 3 is fine and names enrolled h1; row 4 has a bad label: nothing may happen.
    let f = CmdbFile {
        hosts: vec![
            cmdb::HostRow {
                line: 3,
                name: Some("h1".into()),
                ip: None,
                labels: labels(&[("app", "web")]),
            },
            cmdb::HostRow {
                line: 4,
                name: None,
                ip: Some("198.18.0.9".parse().unwrap()),
                labels: labels(&[("app", "d b")]),
            },
        ],
        flows: Vec::new(),
    };
    let e = s.import_cmdb(5, &f, true).unwrap_err();
    let AdminError::Import(rows) = &e else {
        panic!("{e:?}")
    };
    assert_eq!(rows.iter().map(|r| r.line).collect::<Vec<_>>(), [4]);
    assert!(rows[0].message.contains("\"app\""), "{rows:?}");
    assert_eq!(s.hosts().cloned().collect::<Vec<_>>(), before);
    assert_eq!(s.cmdb_records().count(), 0);
    assert!(s.take_dirty().is_empty(), "nothing to persist");
    assert!(s.poll_pushes().is_empty());
}

#[test]
fn an_unenrolled_host_imported_by_ip_gets_its_labels_when_it_enrols() {
    let mut s = st();
    generic(&mut s);
    let out = s
        .import_cmdb(
            10,
            &file("hostname,ip,labels\n,198.18.0.7,app=db;env=prod\nweb-1,,app=web\n"),
            false,
        )
        .unwrap();
    assert_eq!((out.created, out.updated), (2, 0));
    assert!(out.relabelled.is_empty());
    let d = s.take_dirty();
    assert_eq!(d.records.len(), 2, "records are persisted with the import");
    // Enrols with the generic token from that underlay address.
    let info = enrol_from(&mut s, 7, "anything", [198, 18, 0, 7], [10, 0, 0, 7]);
    let h = s.host(info.id).unwrap().clone();
    assert_eq!(
        h.labels,
        labels(&[("app", "db"), ("env", "prod"), ("image", "rhel9")]),
        "the record's labels win over the token's; the token's others stay"
    );
    let notices = s.poll_notices();
    assert!(
        matches!(&notices[..], [Notice::LabelsFromCmdb { id, record, .. }] if *id == info.id && record == "198.18.0.7"),
        "{notices:?}"
    );
    assert_eq!(notices[0].kind(), crate::EventKind::HostLabelsFromCmdb);
    let d = s.take_dirty();
    assert_eq!(d.records.len(), 1);
    assert_eq!(d.records[0].host, Some(info.id));
    // The record is used: another host from that address gets the token's labels only.
    let other = enrol_from(&mut s, 8, "other", [198, 18, 0, 7], [10, 0, 0, 8]);
    assert_eq!(s.host(other.id).unwrap().labels["app"], "generic");
    // By requested name, with a reported (not observed) address that matches nothing.
    let web = enrol_from(&mut s, 9, "web-1", [198, 18, 0, 9], [10, 0, 0, 9]);
    assert_eq!(s.host(web.id).unwrap().labels["app"], "web");
    // Without a match: the token's labels.
    let plain = enrol_from(&mut s, 10, "plain", [198, 18, 0, 10], [10, 0, 0, 10]);
    assert_eq!(
        s.host(plain.id).unwrap().labels,
        labels(&[("app", "generic"), ("image", "rhel9")])
    );
}

#[test]
fn a_reported_endpoint_address_matches_too() {
    let mut s = st();
    generic(&mut s);
    s.import_cmdb(1, &file("ip,app\n10.1.2.3,pay\n"), false)
        .unwrap();
    let info = enrol_from(&mut s, 3, "x", [203, 0, 113, 1], [10, 1, 2, 3]);
    assert_eq!(s.host(info.id).unwrap().labels["app"], "pay");
}

#[test]
fn an_import_updates_enrolled_hosts_by_name_or_address() {
    let mut s = st();
    generic(&mut s);
    let a = enrol_from(&mut s, 1, "a", [198, 18, 0, 1], [10, 0, 0, 1]);
    let b = enrol_from(&mut s, 2, "b", [198, 18, 0, 2], [10, 0, 0, 2]);
    let _ = s.take_dirty();
    let out = s
        .import_cmdb(
            5,
            &file("hostname,ip,labels\na,,app=web\n,10.0.0.2,app=db;env=prod\n"),
            false,
        )
        .unwrap();
    assert_eq!(out.relabelled.len(), 2);
    assert_eq!(s.host(a.id).unwrap().labels["app"], "web");
    assert_eq!(s.host(b.id).unwrap().labels["env"], "prod");
    assert_eq!(
        s.host(b.id).unwrap().labels["image"],
        "rhel9",
        "other keys kept"
    );
    let d = s.take_dirty();
    assert_eq!(d.hosts.len(), 2);
    assert_eq!(d.records.len(), 2);
    // Re-import: updates, no new records.
    let out = s
        .import_cmdb(6, &file("hostname,ip,labels\na,,app=web2\n"), false)
        .unwrap();
    assert_eq!((out.created, out.updated), (0, 1));
    assert_eq!(s.cmdb_records().count(), 2);
    // A row whose name and address are two different hosts is refused.
    let e = s
        .import_cmdb(7, &file("hostname,ip,labels\na,198.18.0.2,app=x\n"), false)
        .unwrap_err();
    assert!(
        matches!(&e, AdminError::Import(r) if r[0].line == 2 && r[0].message.contains("host 2")),
        "{e:?}"
    );
    assert_eq!(s.host(a.id).unwrap().labels["app"], "web2");
}

#[test]
fn declared_flows_are_proposed_and_applied_with_their_tests() {
    let mut s = three();
    s.apply_policy(1, POLICY, "test").unwrap();
    let _ = maps(&mut s);
    let text = "hostname,labels\nh3,app=web\nfrom-app,to-app,port\nweb,db,5432\n";
    let out = s.import_cmdb(5, &file(text), false).unwrap();
    let proposed = out.proposed_policy.clone().unwrap();
    let p = meshd_policy::Policy::parse(&proposed).unwrap();
    assert_eq!(p.rules.len(), 2);
    assert_eq!(p.rules[1].name, "cmdb-web-to-db");
    assert_eq!(
        out.changes
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["+ h3 -> h2 tcp/5432"]
    );
    assert_eq!(s.policy().unwrap().version, 1, "not applied without apply");
    let out = s.import_cmdb(6, &file(text), true).unwrap();
    assert_eq!(out.applied_version, Some(2));
    assert_eq!(out.tests.len(), 3);
    assert!(peer_names(&s, 3).contains(&"h2".to_string()));
}

#[test]
fn a_failing_test_refuses_the_whole_import() {
    let mut s = three();
    // The current policy's test names h1 as an app client.
    let policy =
        "rules:\n  - {name: app-to-db, from: {app: app}, to: {app: db}, ports: [tcp/5432]}\n\
                  tests:\n  - {from: h1, to: h2, port: tcp/5432, expect: allow}\n";
    s.apply_policy(1, policy, "test").unwrap();
    let _ = maps(&mut s);
    let before: Vec<Host> = s.hosts().cloned().collect();
    // Moving h1 to app=web breaks that test once the proposed policy is applied.
    let text = "hostname,labels\nh1,app=web\nnew-host,app=web\nfrom-app,to-app,port\nweb,api,80\n";
    let e = s.import_cmdb(5, &file(text), true).unwrap_err();
    assert!(
        matches!(e, AdminError::Policy(PolicyError::TestsFailed(_))),
        "{e:?}"
    );
    let after: Vec<Labels> = s.hosts().map(|h| h.labels.clone()).collect();
    assert_eq!(
        after,
        before.iter().map(|h| h.labels.clone()).collect::<Vec<_>>()
    );
    assert_eq!(s.cmdb_records().count(), 0);
    assert_eq!(s.policy().unwrap().version, 1);
    assert!(s.take_dirty().records.is_empty());
    // Without --apply the same file imports (the records and labels; the policy only proposed).
    s.import_cmdb(6, &file(text), false).unwrap();
    assert_eq!(s.cmdb_records().count(), 2);
}
