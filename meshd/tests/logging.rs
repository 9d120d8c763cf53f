//! docs/LOGGING.md stays true: every field the daemon's events use is in its vocabulary and
//! every info/warn/error message is listed; `--log-format json` (or `log_format` in the config
//! file) writes one object per line with the documented top-level keys. No root needed.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::meshd_bin;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn logging_md() -> String {
    std::fs::read_to_string(repo().join("docs/LOGGING.md")).unwrap()
}

/// The field names of the "Field vocabulary" table (a row may name several: `a`, `b`).
fn vocabulary(doc: &str) -> BTreeSet<String> {
    let section = doc
        .split("\n## Field vocabulary\n")
        .nth(1)
        .expect("docs/LOGGING.md has a Field vocabulary section");
    let section = section.split("\n## ").next().unwrap();
    let mut names = BTreeSet::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let first_cell = line.split('|').nth(1).unwrap();
        for name in first_cell.split('`').skip(1).step_by(2) {
            names.insert(name.to_owned());
        }
    }
    names
}

/// One tracing macro call found in the source.
#[derive(Debug)]
struct Call {
    at: String,
    level: String,
    message: Option<String>,
    fields: Vec<String>,
}

/// Splits macro arguments at top-level commas (strings and brackets kept whole).
fn split_args(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth) = (Vec::new(), String::new(), 0i32);
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                cur.push(c);
                while let Some(d) = chars.next() {
                    cur.push(d);
                    if d == '\\' {
                        cur.extend(chars.next());
                    } else if d == '"' {
                        break;
                    }
                }
                continue;
            }
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur).trim().to_owned());
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_owned());
    }
    out
}

/// A string literal's text, with `\`-newline continuations folded as Rust does.
fn literal(s: &str) -> String {
    let inner = &s[1..s.len() - 1];
    let mut out = String::new();
    let mut it = inner.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\\' && it.peek() == Some(&'\n') {
            while it.peek().is_some_and(|c| c.is_whitespace()) {
                it.next();
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Every `trace!`..`error!` call (bare or `tracing::`) in the `.rs` files under `dir`.
fn calls_in(dir: &Path, out: &mut Vec<Call>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            calls_in(&path, out);
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for level in ["trace", "debug", "info", "warn", "error"] {
            let needle = format!("{level}!(");
            let mut from = 0;
            while let Some(i) = text[from..].find(&needle) {
                let start = from + i;
                from = start + needle.len();
                let before = text[..start].chars().next_back();
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                    continue; // e.g. `eprintln!(`… is not ours; `tracing::` ends in ':'.
                }
                // The matching parenthesis (strings skipped).
                let body_start = from;
                let (mut depth, mut j, b) = (1, body_start, text.as_bytes());
                while depth > 0 {
                    match b[j] {
                        b'(' => depth += 1,
                        b')' => depth -= 1,
                        b'"' => {
                            j += 1;
                            while b[j] != b'"' {
                                j += if b[j] == b'\\' { 2 } else { 1 };
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
                let args = split_args(&text[body_start..j - 1]);
                let mut call = Call {
                    at: format!(
                        "{}:{}",
                        path.display(),
                        text[..start].matches('\n').count() + 1
                    ),
                    level: level.to_owned(),
                    message: None,
                    fields: Vec::new(),
                };
                for a in args.iter().filter(|a| !a.starts_with("target:")) {
                    if a.starts_with('"') {
                        call.message = Some(literal(a));
                        break;
                    }
                    let name: String = a
                        .trim_start_matches(['%', '?'])
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '.')
                        .collect();
                    call.fields.push(name);
                }
                out.push(call);
            }
        }
    }
}

fn all_calls() -> Vec<Call> {
    let mut calls = Vec::new();
    for dir in [
        "meshd/src",
        "crates/agent/src",
        "crates/coordinator/src",
        "crates/hostnet/src",
    ] {
        calls_in(&repo().join(dir), &mut calls);
    }
    calls
}

#[test]
fn every_event_field_is_in_the_vocabulary_and_every_message_is_documented() {
    let doc = logging_md();
    let vocab = vocabulary(&doc);
    for reserved in ["timestamp", "level", "target", "message"] {
        assert!(!vocab.contains(reserved), "{reserved} is a top-level key");
    }
    let calls = all_calls();
    assert!(
        calls.len() > 50,
        "the scan found only {} calls",
        calls.len()
    );
    let mut bad = Vec::new();
    for c in &calls {
        for f in &c.fields {
            if !vocab.contains(f) {
                bad.push(format!(
                    "{}: field {f:?} is not in docs/LOGGING.md's vocabulary",
                    c.at
                ));
            }
        }
        match &c.message {
            None => bad.push(format!("{}: event without a message", c.at)),
            Some(m) if c.level != "trace" && c.level != "debug" => {
                if !doc.contains(&format!("`{m}`")) {
                    bad.push(format!(
                        "{}: {} message {m:?} is not in docs/LOGGING.md",
                        c.at, c.level
                    ));
                }
            }
            Some(_) => {}
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn the_scan_sees_fields_and_messages() {
    // The scanner itself: a multi-line call with a target, sigils, a shorthand and a
    // continued literal.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("x.rs"),
        "fn f() { tracing::info!(\n target: \"t\", peer = %p.name, ?code, attempt, \
         error = %format!(\"{e:#}\"), \"a \\\n   b\"); eprintln!(\"no\"); }\n",
    )
    .unwrap();
    let mut calls = Vec::new();
    calls_in(dir.path(), &mut calls);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].fields, ["peer", "code", "attempt", "error"]);
    assert_eq!(calls[0].message.as_deref(), Some("a b"));
    let v = vocabulary(&logging_md());
    assert!(v.contains("peer") && v.contains("peer_key") && v.contains("cert_path"));
    assert!(!v.contains("nonsense"));
}

/// Starts a coordinator on loopback (ports chosen by the OS) with `args`, waits for
/// "coordinator started", makes a failed admin request, stops it with SIGTERM and returns
/// every stderr line.
fn coordinator_lines(args: &[&str], config: Option<&str>) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut cmd = Command::new(meshd_bin());
    cmd.args(args)
        .arg("coordinator")
        .arg("--state-dir")
        .arg(&state)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info,meshd_coordinator=debug")
        .env_remove("MESHD_LOG_FORMAT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(text) = config {
        let f = dir.path().join("coordinator.toml");
        std::fs::write(&f, text).unwrap();
        cmd.arg("--config").arg(f);
    }
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap();
            let _ = tx.send(line.clone());
            lines.push(line);
        }
        lines
    });
    // Up: the admin address from the started line, then a request with a wrong token.
    let started = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("coordinator started in time");
        if line.contains("coordinator started") {
            break line;
        }
    };
    let admin = started
        .split(['"', ' ', '='])
        .filter_map(|w| w.parse::<std::net::SocketAddr>().ok())
        .nth(2)
        .expect("admin address in the started line");
    {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(admin).unwrap();
        s.write_all(
            b"GET /v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer meshadm-wrong\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");
    }
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    assert!(child.wait().unwrap().success());
    reader.join().unwrap()
}

fn assert_json_lines(lines: &[String]) {
    let vocab = vocabulary(&logging_md());
    assert!(lines.len() >= 4, "{lines:?}");
    let mut messages = Vec::new();
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let obj = v
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {line}"));
        for key in ["timestamp", "level", "target", "message"] {
            assert!(
                obj.get(key).is_some_and(|v| v.is_string()),
                "{key} in {line}"
            );
        }
        let ts = obj["timestamp"].as_str().unwrap();
        assert!(
            ts.len() > 20 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
            "{ts}"
        );
        let level = obj["level"].as_str().unwrap();
        assert!(
            ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&level),
            "{line}"
        );
        if obj["target"].as_str().unwrap().starts_with("meshd") {
            for (k, v) in obj {
                let top = ["timestamp", "level", "target", "message"].contains(&k.as_str());
                assert!(top || vocab.contains(k), "undocumented field {k:?}: {line}");
                assert!(!v.is_object() && !v.is_array(), "nested value in {line}");
            }
        }
        messages.push(obj["message"].as_str().unwrap().to_owned());
    }
    for want in [
        "created coordinator key",
        "wrote initial admin token",
        "coordinator started",
        "admin API: failed authentication",
        "coordinator stopping",
    ] {
        assert!(
            messages.iter().any(|m| m == want),
            "{want:?} in {messages:?}"
        );
    }
}

#[test]
fn json_lines_have_the_documented_keys() {
    let lines = coordinator_lines(&["--log-format", "json"], None);
    assert_json_lines(&lines);
    let auth = lines
        .iter()
        .find(|l| l.contains("admin API: failed authentication"))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(auth).unwrap();
    assert_eq!(v["level"], "WARN");
    assert_eq!(v["source"], "127.0.0.1");
    assert_eq!(v["presented"], true);
    assert!(v["failed"].is_u64(), "{auth}");
}

#[test]
fn config_file_log_format_and_the_flag_wins() {
    let lines = coordinator_lines(&[], Some("log_format = \"json\"\n"));
    assert_json_lines(&lines);
    // The flag wins over the file; text on a pipe has no colour codes.
    let lines = coordinator_lines(&["--log-format", "text"], Some("log_format = \"json\"\n"));
    assert!(
        lines.iter().any(|l| l.contains("coordinator started")),
        "{lines:?}"
    );
    for l in &lines {
        assert!(
            serde_json::from_str::<serde_json::Value>(l).is_err(),
            "JSON: {l}"
        );
        assert!(!l.contains('\u{1b}'), "escape codes in {l:?}");
    }
    // Text is the default.
    let lines = coordinator_lines(&[], None);
    assert!(
        lines
            .iter()
            .all(|l| !l.starts_with('{') && !l.contains('\u{1b}')),
        "{lines:?}"
    );
}

#[test]
fn bad_log_format_is_refused() {
    let out = Command::new(meshd_bin())
        .args(["--log-format", "yaml", "genkey"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("yaml") && err.contains("json"), "{err}");
}
