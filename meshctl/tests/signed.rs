//! Signed policy through meshctl against an in-process coordinator on 127.0.0.1:
//! signatures for a quorum of 2 collected on "two machines" (`--prepare`, `admin cosign`,
//! `admin submit`), and a signed CMDB import applied as one all-or-none batch whose host
//! statements verify as an agent checks them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use meshd_control::signed::{Signed, TrustBundle, TrustStore};
use meshd_control::state::SignedView;

mod common;

use common::Coord;

impl Coord {
    /// `meshctl` failing: its stderr.
    fn fails(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            !o.status.success(),
            "meshctl {args:?} should have failed: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    /// A new admin key in its own directory (a "machine"): its file and public key.
    fn keygen(&self, machine: &str) -> (String, String) {
        let dir = self.dir.path().join(machine);
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("admin.key");
        let o = self.run(&["admin", "keygen", "--out", key.to_str().unwrap()]);
        assert!(o.status.success(), "{o:?}");
        let public = String::from_utf8_lossy(&o.stderr)
            .lines()
            .find_map(|l| l.strip_prefix("admin public key: "))
            .expect("keygen prints the public key")
            .to_string();
        (key.display().to_string(), public)
    }

    fn keys(&self) -> SignedView {
        serde_json::from_str(&self.ok(&["admin", "keys", "-o", "json"])).unwrap()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// `meshctl admin cosign` on a machine that cannot reach the coordinator.
fn cosign_offline(c: &Coord, file: &Path, key: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .env_remove("MESH_SERVER")
        .env_remove("MESH_TOKEN")
        .env_remove("MESH_ADMIN_KEY")
        .env("MESHCTL_CONFIG", c.dir.path().join("empty.toml"))
        .stdin(Stdio::null())
        .args(["--server", "http://127.0.0.1:1", "--token", "none"])
        .args(["admin", "cosign"])
        .arg(file)
        .args(["--admin-key", key])
        .output()
        .unwrap()
}

#[test]
fn a_quorum_of_two_is_collected_on_two_machines() {
    let c = Coord::start();
    c.enrol("web1", [192, 0, 2, 10]);
    let (k1, p1) = c.keygen("alice");
    let (k2, p2) = c.keygen("bob");
    let (k3, _) = c.keygen("mallory");
    c.ok(&["--admin-key", &k1, "admin", "add-key", &p1]);
    c.ok(&["--admin-key", &k1, "admin", "add-key", &p2, "--quorum", "2"]);
    assert_eq!(c.keys().chain.last().unwrap().key_set().unwrap().quorum, 2);
    // One key is not enough in one invocation (as before).
    let err = c.fails(&["--admin-key", &k1, "hosts", "label", "web1", "app=web"]);
    assert!(
        err.contains("1 valid signature(s) by the admin key set, 2 needed"),
        "{err}"
    );

    // Alice prepares the change: written, not sent.
    let req = c.path("label.json");
    let reqs = req.to_str().unwrap();
    let out = c.ok(&[
        "--admin-key",
        &k1,
        "--prepare",
        reqs,
        "hosts",
        "label",
        "web1",
        "app=web",
    ]);
    assert!(out.contains("prepared (not sent)"), "{out}");
    assert!(
        out.contains("1 of 2 signature(s)") && out.contains("1 more needed"),
        "{out}"
    );
    assert_eq!(c.host("web1").labels.get("app"), None);
    let text = std::fs::read_to_string(&req).unwrap();
    assert!(
        text.contains("\"format\": 1") && text.contains("\"kind\": \"host\""),
        "{text}"
    );
    let err = c.fails(&[
        "--admin-key",
        &k1,
        "--prepare",
        reqs,
        "hosts",
        "label",
        "web1",
        "app=db",
    ]);
    assert!(err.contains("never replaced"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&req).unwrap(),
        text,
        "not overwritten"
    );

    // Submitted with Alice's signature only: the coordinator's quorum error, and what to do.
    let err = c.fails(&["admin", "submit", reqs]);
    assert!(
        err.contains("1 valid signature(s) by the admin key set, 2 needed"),
        "{err}"
    );
    assert!(
        err.contains("1 more needed") && err.contains("admin cosign"),
        "{err}"
    );
    assert_eq!(c.host("web1").labels.get("app"), None);

    // A key outside the set, and Alice again, are refused; the file stays as it was.
    let o = cosign_offline(&c, &req, &k3);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not in the admin key set"), "{err}");
    let o = cosign_offline(&c, &req, &k1);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already signed"));
    assert_eq!(std::fs::read_to_string(&req).unwrap(), text);
    // A signature changed in the file is caught before Bob signs.
    let forged = c.path("forged.json");
    std::fs::write(
        &forged,
        text.replacen("\"app\": \"web\"", "\"app\": \"db\"", 1),
    )
    .unwrap();
    let o = cosign_offline(&c, &forged, &k2);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("does not verify"),
        "{err}"
    );

    // Bob, on his machine without the coordinator, sees what he signs and signs it.
    let o = cosign_offline(&c, &req, &k2);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{o:?}");
    assert!(
        out.contains("host web1") && out.contains("+ app=web"),
        "{out}"
    );
    assert!(
        out.contains("2 of 2 signature(s)") && out.contains("quorum reached"),
        "{out}"
    );
    let out = c.ok(&["admin", "submit", reqs]);
    assert!(out.contains("app=web"), "{out}");
    assert_eq!(c.host("web1").labels["app"], "web");

    // A policy prepared against version 0, overtaken by another: stale at submit, clearly.
    let yaml = "rules:\n  - name: web\n    from: { app: web }\n    to: { app: web }\n    ports: [tcp/80]\n";
    let pf = c.file("p.yaml", yaml);
    let preq = c.path("policy.json");
    let preqs = preq.to_str().unwrap();
    c.ok(&[
        "--admin-key",
        &k1,
        "--prepare",
        preqs,
        "policy",
        "apply",
        &pf,
    ]);
    let o = cosign_offline(&c, &preq, &k2);
    assert!(o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("policy version 1"));
    c.ok(&[
        "--admin-key",
        &k1,
        "--admin-key",
        &k2,
        "policy",
        "apply",
        &pf,
    ]);
    let err = c.fails(&["admin", "submit", preqs]);
    assert!(
        err.contains("is stale") && err.contains("next policy version is 2"),
        "{err}"
    );
    assert!(err.contains("prepare it again"), "{err}");

    // Prepared again, it goes through; a key-set change is collected the same way.
    std::fs::remove_file(&preq).unwrap();
    c.ok(&[
        "--admin-key",
        &k2,
        "--prepare",
        preqs,
        "policy",
        "rollback",
        "1",
    ]);
    assert!(cosign_offline(&c, &preq, &k1).status.success());
    let out = c.ok(&["admin", "submit", preqs]);
    assert!(out.contains("policy version 2"), "{out}");
    let kreq = c.path("keys.json");
    let kreqs = kreq.to_str().unwrap();
    let (_, p4) = c.keygen("carol");
    let out = c.ok(&[
        "--admin-key",
        &k1,
        "--prepare",
        kreqs,
        "admin",
        "add-key",
        &p4,
    ]);
    assert!(out.contains("+ ") && out.contains(&p4), "{out}");
    assert!(cosign_offline(&c, &kreq, &k2).status.success());
    c.ok(&["admin", "submit", kreqs]);
    assert_eq!(
        c.keys().chain.last().unwrap().key_set().unwrap().keys.len(),
        3
    );
    // The runtime learning switch: refused unsigned, its whole next setting collected and
    // submitted like the rest.
    let err = c.fails(&["policy", "mode", "learn", "--group", "app=web"]);
    assert!(err.contains("--admin-key"), "{err}");
    let mreq = c.path("mode.json");
    let mreqs = mreq.to_str().unwrap();
    let out = c.ok(&[
        "--admin-key",
        &k1,
        "--prepare",
        mreqs,
        "policy",
        "mode",
        "learn",
        "--group",
        "app=web",
    ]);
    assert!(out.contains("1 more needed"), "{out}");
    let o = cosign_offline(&c, &mreq, &k2);
    assert!(o.status.success(), "{o:?}");
    let shown =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        shown.contains("learning mode setting 1: learning app=web"),
        "{shown}"
    );
    c.ok(&["admin", "submit", mreqs]);
    let out = c.ok(&["policy", "mode"]);
    assert!(out.contains("web1"), "web1 learns now: {out}");
    // --prepare where nothing is signed is refused.
    let err = c.fails(&["--prepare", reqs, "hosts", "list"]);
    assert!(err.contains("signed commands only"), "{err}");
}

/// What an agent pinned to the coordinator's admin key set makes of `hosts`.
fn agent_accepts(view: &SignedView, hosts: Vec<Signed>) {
    let mut t = TrustStore::pinned(view.fingerprint.unwrap());
    let a = t.absorb(&TrustBundle {
        key_sets: view.chain.clone(),
        policy: None,
        hosts,
        mode: None,
    });
    assert!(a.refused.is_empty(), "{:?}", a.refused);
}

#[test]
fn a_signed_import_applies_all_labels_or_none() {
    let mut c = Coord::start();
    c.enrol("web1", [192, 0, 2, 10]);
    c.enrol("db1", [192, 0, 2, 20]);
    let (k1, p1) = c.keygen("alice");
    c.ok(&["--admin-key", &k1, "admin", "add-key", &p1]);
    let f = c.file(
        "cmdb.csv",
        "hostname,ip,labels\n\
         web1,,app=web;env=prod\n\
         ,192.0.2.20,app=db\n\
         later,192.0.2.99,app=x\n\
         from-app,to-app,port\n\
         web,db,5432\n",
    );
    // Unsigned: refused, and the message names the option.
    let err = c.fails(&["import", &f, "--apply"]);
    assert!(err.contains("--admin-key"), "{err}");

    // Prepared, then one statement altered: the coordinator refuses the batch, names the
    // host, and nothing of it is applied.
    let req = c.path("import.json");
    let reqs = req.to_str().unwrap();
    let out = c.ok(&[
        "--admin-key",
        &k1,
        "--prepare",
        reqs,
        "import",
        &f,
        "--apply",
    ]);
    assert!(
        out.contains("2 host(s)") && out.contains("and policy version 1"),
        "{out}"
    );
    assert!(out.contains("quorum reached"), "{out}");
    let text = std::fs::read_to_string(&req).unwrap();
    let p: serde_json::Value = serde_json::from_str(&text).unwrap();
    let statements: Vec<Signed> =
        serde_json::from_value(p["request"]["statements"].clone()).unwrap();
    agent_accepts(&c.keys(), statements.clone());
    let bad = c.path("bad.json");
    let tampered = text.replacen("\"app\": \"db\"", "\"app\": \"web\"", 1);
    assert_ne!(tampered, text);
    std::fs::write(&bad, tampered).unwrap();
    let err = c.fails(&["admin", "submit", bad.to_str().unwrap()]);
    assert!(err.contains("host db1"), "{err}");
    assert!(err.contains("nothing of the batch was applied"), "{err}");
    assert_eq!(
        c.host("web1").labels.get("app"),
        None,
        "web1 was not relabelled"
    );
    assert_eq!(c.keys().policy_version, 0, "the policy was not applied");

    // The same import, sent: both hosts and the flows' policy, in one commit that survives
    // a restart; the rows for hosts not enrolled yet are said to be left out.
    let o = c.run(&["--admin-key", &k1, "import", &f, "--apply"]);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{err}");
    assert!(out.contains("2 host(s) signed and relabelled"), "{out}");
    assert!(out.contains("policy version 1 is now current"), "{out}");
    assert!(err.contains("1 row(s) match no enrolled host"), "{err}");
    c.restart();
    let (web, db) = (c.host("web1"), c.host("db1"));
    assert_eq!(
        (web.labels["app"].as_str(), web.labels["env"].as_str()),
        ("web", "prod")
    );
    assert_eq!(db.labels["app"], "db");
    assert_eq!(web.labels["image"], "generic", "other labels stay");
    let v = c.keys();
    assert_eq!(v.policy_version, 1);
    assert!(v.policy.is_some(), "the applied version is signed");
    assert!(c.ok(&["policy", "show"]).contains("cmdb-web-to-db"));
    // Importing it again changes nothing and signs nothing.
    let out = c.ok(&["--admin-key", &k1, "import", &f]);
    assert!(out.contains("nothing to sign"), "{out}");
    // The prepared file from before is stale now.
    let err = c.fails(&["admin", "submit", reqs]);
    assert!(err.contains("is stale"), "{err}");
}
