//! The committed corpus replays on stable: every file of `fuzz/corpus/<target>/` goes through
//! its target's function (no panic), as do the freshly generated seeds. The layout is checked
//! too: every target has a corpus directory, a cargo-fuzz target file and a `[[bin]]`, and no
//! corpus directory lacks a target. `MESHD_WRITE_CORPUS=1` rewrites the generated seeds.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use meshd_fuzz_targets::{seeds::seeds, Target, TARGETS};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// Runs `bytes` through `t`; the panic message if it panicked.
fn run(t: &Target, bytes: &[u8]) -> Option<String> {
    catch_unwind(AssertUnwindSafe(|| (t.run)(bytes)))
        .err()
        .map(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into())
        })
}

#[test]
fn generated_seeds_run_and_are_written_on_request() {
    let write = std::env::var_os("MESHD_WRITE_CORPUS").is_some_and(|v| v == "1");
    let mut failed = Vec::new();
    for s in seeds() {
        let t = TARGETS
            .iter()
            .find(|t| t.name == s.target)
            .expect("seed of a known target");
        if let Some(p) = run(t, &s.bytes) {
            failed.push(format!("{}/{}: {p}", s.target, s.name));
        }
        if write {
            let dir = fuzz_dir().join("corpus").join(s.target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(&s.name), &s.bytes).unwrap();
        }
    }
    assert!(
        failed.is_empty(),
        "seeds that panic:\n{}",
        failed.join("\n")
    );
}

#[test]
fn committed_corpus_replays_without_panic() {
    let corpus = fuzz_dir().join("corpus");
    let mut failed = Vec::new();
    let mut total = 0;
    for t in TARGETS {
        let dir = corpus.join(t.name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (MESHD_WRITE_CORPUS=1 writes it)", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        assert!(files.len() >= 3, "{}: too few seeds", dir.display());
        for f in files {
            let bytes = std::fs::read(&f).unwrap();
            total += 1;
            if let Some(p) = run(t, &bytes) {
                failed.push(format!("{}: {p}", f.display()));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "corpus files that panic:\n{}",
        failed.join("\n")
    );
    assert!(total > 50, "only {total} corpus files");
}

#[test]
fn every_target_has_a_cargo_fuzz_binary_and_every_corpus_a_target() {
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    for t in TARGETS {
        let file = fuzz_dir()
            .join("fuzz_targets")
            .join(format!("{}.rs", t.name));
        let src =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(
            src.contains(&format!("meshd_fuzz_targets::{}(", t.name)),
            "{} does not call meshd_fuzz_targets::{}",
            file.display(),
            t.name
        );
        assert!(
            manifest.contains(&format!("name = \"{}\"", t.name)),
            "fuzz/Cargo.toml has no [[bin]] {}",
            t.name
        );
    }
    for e in std::fs::read_dir(fuzz_dir().join("corpus")).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(
            TARGETS.iter().any(|t| t.name == name),
            "fuzz/corpus/{name} belongs to no target"
        );
    }
}

fn seed(target: &str, name: &str) -> Vec<u8> {
    std::fs::read(fuzz_dir().join("corpus").join(target).join(name))
        .unwrap_or_else(|e| panic!("{target}/{name}: {e}"))
}

fn text(target: &str, name: &str) -> String {
    String::from_utf8(seed(target, name)).unwrap()
}

/// The seeds are what their names say: valid inputs get past the parsers (a corpus of
/// rejects would fuzz only the first check).
#[test]
fn valid_seeds_are_accepted_by_the_parsers() {
    use meshd_control::proto::{AgentMessage, CoordinatorMessage, FrameDecoder};
    use meshd_fuzz_targets as ft;
    for name in ["readme", "full", "mode-learn"] {
        meshd_policy::Policy::parse(&text("policy", name))
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
    }
    for name in [
        "minimal.toml",
        "packaged-example.toml",
        "static-inline-policy.toml",
    ] {
        let cfg = meshd_config::Config::parse(&text("config", name), "/x.toml")
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        if name.starts_with("static") {
            let g = meshd_config::static_peers::static_grants(&cfg, ft::NOW).unwrap();
            assert_eq!(g.map(|g| g.len()), Some(1));
        }
    }
    // The SPA gate admits the three valid knocks (once), and nothing else of the corpus.
    {
        use meshd_channel::spa::{Gate, SpaView};
        let mut view = SpaView::default();
        view.hosts.insert(ft::peer_key().public_key());
        view.add_join_token(meshd_control::token::hash_secret(ft::SPA_JOIN_SECRET), None);
        view.add_admin_token(
            meshd_control::token::hash_secret(ft::SPA_ADMIN_SECRET),
            None,
        );
        let mut gate = Gate::new(ft::our_key(), 30_000, 64);
        for name in ["knock-host", "knock-join-token", "knock-admin"] {
            let d = seed("spa", name);
            assert!(gate.check(ft::NOW * 1000, &d, &view).is_ok(), "{name}");
            assert!(
                gate.check(ft::NOW * 1000, &d, &view).is_err(),
                "{name} replayed"
            );
        }
        for name in [
            "knock-host-truncated",
            "knock-host-flipped",
            "knock-other-coordinator",
            "knock-stale",
        ] {
            assert!(
                gate.check(ft::NOW * 1000, &seed("spa", name), &view)
                    .is_err(),
                "{name}"
            );
        }
    }
    for name in ["doc.csv", "doc.json", "extra-columns.csv", "array.json"] {
        meshd_control::cmdb::parse(&text("cmdb", name)).unwrap_or_else(|e| panic!("{name}: {e:?}"));
    }
    let count = |max, bytes: &[u8], agent: bool| {
        let mut d = FrameDecoder::new(max);
        d.push(bytes).unwrap();
        let mut n = 0;
        loop {
            let got = if agent {
                d.next_message::<AgentMessage>().unwrap().is_some()
            } else {
                d.next_message::<CoordinatorMessage>().unwrap().is_some()
            };
            if !got {
                return n;
            }
            n += 1;
        }
    };
    assert_eq!(count(65536, &seed("agent_frames", "session"), true), 7);
    assert_eq!(
        count(1 << 25, &seed("coordinator_frames", "session"), false),
        4
    );
    let init = seed("channel_handshake", "init");
    meshd_channel::noise::read_initiation(&ft::our_key(), &init).unwrap();
    let dev = ft::our_device();
    let table = dev.table();
    let mut out = vec![0u8; 2048];
    let init = seed("decapsulate", "init");
    let d = dev.decapsulate(&table, ft::peer_endpoint(), &init, &mut out);
    assert!(
        matches!(d, meshd_tunnel::Decap::Reply { peer: Some(_), .. }),
        "{d:?}"
    );
    use meshd_firewall::Verdict;
    let verdict = |name: &str| ft::tunnel_inner_verdict(&seed("tunnel_inner", name));
    assert_eq!(verdict("tcp-syn-granted"), Some(Verdict::Allow));
    assert_eq!(verdict("udp-granted"), Some(Verdict::Allow));
    assert!(matches!(verdict("tcp-syn-denied"), Some(Verdict::Deny(_))));
    assert_eq!(verdict("spoofed-source"), None);
    assert_eq!(verdict("to-elsewhere"), None);
}
