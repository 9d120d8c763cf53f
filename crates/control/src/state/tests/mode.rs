use meshd_policy::PolicyMode::{Enforce, Learn};

use super::*;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// h1 app=app, h2 app=db, h3 app=web, h4 app=legacy; POLICY applied (h1 → h2 tcp/5432);
/// every map drained.
fn four() -> CoordinatorState {
    let mut s = three();
    enrol(&mut s, 4, b"t").unwrap();
    s.set_labels("h4", labels(&[("app", "legacy")])).unwrap();
    s.apply_policy(10, POLICY, "apply").unwrap();
    let _ = maps(&mut s);
    s
}

/// A pushed peer: its name, its learn flag, whether it carries grants.
type PeerFlags = (String, bool, bool);

/// Per pushed host, its upserted peers by name with their learn flag (and whether they carry
/// grants), and its removals.
fn learn_flags(
    pushed: &BTreeMap<HostId, CoordinatorMessage>,
) -> BTreeMap<u64, (Vec<PeerFlags>, usize)> {
    pushed
        .iter()
        .map(|(h, m)| {
            let (ups, rem) = match m {
                CoordinatorMessage::Delta { delta } => {
                    (delta.upserts.clone(), delta.removals.len())
                }
                CoordinatorMessage::FullMap { map } => (
                    map.peers
                        .iter()
                        .map(|p| crate::map::Peer::clone(p))
                        .collect(),
                    0,
                ),
                other => panic!("{other:?}"),
            };
            let mut v: Vec<_> = ups
                .iter()
                .map(|p| (p.name.clone(), p.grants.learn, !p.grants.is_empty()))
                .collect();
            v.sort();
            (h.0, (v, rem))
        })
        .collect()
}

/// Like `maps`, but hands back the batch's records too.
fn maps_dirty(s: &mut CoordinatorState) -> (BTreeMap<HostId, CoordinatorMessage>, Dirty) {
    let out = s
        .poll_pushes()
        .into_iter()
        .map(|p| (p.host, p.message))
        .collect();
    (out, s.take_dirty())
}

fn s_(x: &str) -> String {
    x.to_string()
}

#[test]
fn a_learning_group_peers_with_everyone_and_only_affected_maps_are_pushed() {
    let mut s = four();
    assert!(!s.is_learning(HostId(3)));
    let v = s
        .set_mode(20, Learn, Some(labels(&[("app", "web")])))
        .unwrap();
    assert!(v.changed);
    assert_eq!(v.learning, vec!["h3"]);
    assert_eq!(v.mode, Enforce, "a group, not the whole mesh");
    assert_eq!(v.groups.len(), 1);
    assert_eq!(
        (v.groups[0].group.as_str(), v.groups[0].source),
        ("{app: web}", crate::api::ModeSource::Runtime)
    );
    assert!(s.is_learning(HostId(3)) && !s.is_learning(HostId(1)));
    let (pushed, dirty) = maps_dirty(&mut s);
    let pushed = learn_flags(&pushed);
    // h3 gains every host; every other host gains h3; all with learn=true.
    assert_eq!(
        pushed[&3].0,
        vec![
            (s_("h1"), true, false),
            (s_("h2"), true, false),
            (s_("h4"), true, false)
        ]
    );
    for h in [1, 2, 4] {
        assert_eq!(pushed[&h].0, vec![(s_("h3"), true, false)], "host {h}");
    }
    // The rules' grants stay and the pair without a learning end is untouched.
    let g = s.grants_for(HostId(1));
    assert!(!g[&2].learn && !g[&2].outbound.is_empty());
    assert!(g[&3].learn && g[&3].is_empty());
    // Durable: the setting is in the batch's records, once.
    let mode = dirty.mode.expect("mode to persist");
    assert_eq!(mode.groups, vec![labels(&[("app", "web")])]);
    assert_eq!(mode.changed_at, 20);
    assert!(s.take_dirty().mode.is_none());

    // A second group: h3 already had the pair with h4 in learning mode, so only h1, h2, h4
    // get a map.
    s.set_mode(21, Learn, Some(labels(&[("app", "legacy")])))
        .unwrap();
    let pushed = learn_flags(&maps(&mut s));
    assert_eq!(pushed.keys().copied().collect::<Vec<_>>(), vec![1, 2, 4]);
    assert_eq!(
        pushed[&4].0,
        vec![(s_("h1"), true, false), (s_("h2"), true, false)]
    );
    // Asking again changes nothing: no push, nothing to store.
    let v = s
        .set_mode(22, Learn, Some(labels(&[("app", "legacy")])))
        .unwrap();
    assert!(!v.changed);
    assert!(maps(&mut s).is_empty());
    assert!(s.take_dirty().mode.is_none());

    // explain says a denied flow passes as would-deny.
    let e = s.explain(22, "h4", "h2", "tcp/22").unwrap();
    assert!(!e.allowed && e.learning);
    let e = s.explain(22, "h1", "h2", "tcp/5432").unwrap();
    assert!(e.allowed && !e.learning);

    // enforce --group web: h3 leaves learning; h3 loses h1, h2 (no grants) and keeps h4
    // (still learning), h1 and h2 lose h3, h4's pair with h3 stays learning.
    let v = s
        .set_mode(23, Enforce, Some(labels(&[("app", "web")])))
        .unwrap();
    assert!(v.changed);
    assert_eq!(v.learning, vec!["h4"]);
    let pushed = maps(&mut s);
    assert_eq!(
        pushed.keys().map(|h| h.0).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(peer_names(&s, 3), vec!["h4"]);
    assert_eq!(peer_names(&s, 1), vec!["h2", "h4"]);
    // enforce: back to the rules alone.
    s.set_mode(24, Enforce, None).unwrap();
    let (_, dirty) = maps_dirty(&mut s);
    assert_eq!(peer_names(&s, 4), Vec::<String>::new());
    assert!(s.learning_host_names().is_empty());
    assert_eq!(
        dirty.mode,
        Some(RuntimeMode {
            all: false,
            groups: vec![],
            changed_at: 24
        })
    );
}

#[test]
fn whole_mesh_learning_and_quarantine() {
    let mut s = four();
    let v = s.set_mode(20, Learn, None).unwrap();
    assert_eq!(v.mode, Learn);
    assert_eq!(v.mesh_wide, vec![crate::api::ModeSource::Runtime]);
    assert_eq!(v.learning, vec!["h1", "h2", "h3", "h4"]);
    assert!(s.learning_all());
    let _ = maps(&mut s);
    for h in 1..=4u64 {
        assert_eq!(s.full_map_for(HostId(h), 0).peers.len(), 3);
        assert!(s
            .full_map_for(HostId(h), 0)
            .peers
            .iter()
            .all(|p| p.grants.learn));
    }
    // A quarantined host is not learning and in nobody's map, learning or not.
    s.quarantine("h4").unwrap();
    let _ = maps(&mut s);
    assert!(!s.is_learning(HostId(4)));
    assert!(s.full_map_for(HostId(4), 0).peers.is_empty());
    assert_eq!(peer_names(&s, 1), vec!["h2", "h3"]);
    assert_eq!(s.mode_view().hosts, 3);
}

#[test]
fn refused_changes_change_nothing() {
    let mut s = four();
    let file = format!("learn:\n  - {{ app: legacy }}\n{POLICY}");
    s.apply_policy(11, &file, "apply").unwrap();
    let _ = maps(&mut s);
    let _ = s.take_dirty();
    assert!(s.is_learning(HostId(4)));
    let v = s.mode_view();
    assert_eq!(v.groups[0].source, crate::api::ModeSource::File);
    assert_eq!(v.groups[0].hosts, vec!["h4"]);
    let refused = |s: &mut CoordinatorState, mode, group: Option<Labels>| {
        let e = s.set_mode(30, mode, group).unwrap_err();
        assert!(maps(s).is_empty(), "no push after {e}");
        assert!(s.take_dirty().is_empty(), "nothing to store after {e}");
        e.to_string()
    };
    // The file's group, and a narrower group whose hosts the file makes learn.
    let e = refused(&mut s, Enforce, Some(labels(&[("app", "legacy")])));
    assert!(
        e.contains("policy file") && e.contains("policy apply"),
        "{e}"
    );
    assert!(e.contains("learn: [{app: legacy}]"), "{e}");
    s.set_labels("h4", labels(&[("app", "legacy"), ("env", "x")]))
        .unwrap();
    let _ = maps(&mut s);
    let _ = s.take_dirty();
    let e = refused(&mut s, Enforce, Some(labels(&[("env", "x")])));
    assert!(e.contains("hosts h4"), "{e}");
    // Whole-mesh enforce with nothing set at runtime: the file is what must change.
    let e = refused(&mut s, Enforce, None);
    assert!(e.contains("declared by the policy file"), "{e}");
    // A group nobody learns for: nothing to do, accepted.
    assert!(
        !s.set_mode(30, Enforce, Some(labels(&[("app", "db")])))
            .unwrap()
            .changed
    );
    // Bad groups.
    assert!(matches!(
        s.set_mode(30, Learn, Some(Labels::new())),
        Err(AdminError::InvalidGroup(_))
    ));
    assert!(matches!(
        s.set_mode(30, Learn, Some(labels(&[("bad key!", "x")]))),
        Err(AdminError::InvalidLabel(_))
    ));
    // Runtime whole-mesh learning cannot exempt a group.
    s.set_mode(31, Learn, None).unwrap();
    let _ = maps(&mut s);
    let _ = s.take_dirty();
    let e = refused(&mut s, Enforce, Some(labels(&[("app", "web")])));
    assert!(e.contains("whole mesh"), "{e}");
    // enforce clears the runtime part; the file's group still learns.
    let v = s.set_mode(32, Enforce, None).unwrap();
    assert!(v.changed);
    assert_eq!(v.learning, vec!["h4"]);
    assert!(v.mesh_wide.is_empty());
}

#[test]
fn runtime_mode_survives_a_restart() {
    let mut s = four();
    s.set_mode(20, Learn, Some(labels(&[("app", "legacy")])))
        .unwrap();
    let stored = maps_dirty(&mut s).1.mode.unwrap();
    let before = s.full_map_for(HostId(1), 0);
    let hosts: Vec<Host> = s.hosts().cloned().collect();
    let mut r = CoordinatorState::restore(
        IpPool::new("100.64.0.0/24".parse().unwrap(), None).unwrap(),
        hosts,
        vec![],
        s.map_version(),
    )
    .unwrap();
    r.restore_policies(25, s.policy_history().to_vec()).unwrap();
    assert!(!r.is_learning(HostId(4)), "not before the mode is restored");
    r.restore_mode(25, stored.clone());
    assert!(r.is_learning(HostId(4)));
    assert_eq!(r.runtime_mode(), &stored);
    assert_eq!(r.full_map_for(HostId(1), 0), before);
    assert!(r
        .full_map_for(HostId(1), 0)
        .peers
        .iter()
        .any(|p| p.name == "h4" && p.grants.learn));
    // Restoring is not a change to store again.
    assert!(r.take_dirty().mode.is_none());
    // The stored form round-trips as JSON (the store keeps it so).
    let json = serde_json::to_string(&stored).unwrap();
    assert_eq!(serde_json::from_str::<RuntimeMode>(&json).unwrap(), stored);
    assert_eq!(
        serde_json::from_str::<RuntimeMode>("{}").unwrap(),
        RuntimeMode::default()
    );
}
