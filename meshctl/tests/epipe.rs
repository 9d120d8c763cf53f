//! A closed pipe on stdout or stderr (`meshctl hosts list | head -1`) ends meshctl quietly:
//! no panic and no message; exit 0 when only the output's reader went away. Each command gets
//! a pipe whose read end is closed before it starts, so its first write fails with EPIPE.

use std::os::fd::{FromRawFd as _, OwnedFd};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use meshd_control::api::TokenCreateRequest;
use meshd_coordinator::{start, CoordinatorOptions};

/// The write end of a pipe whose read end is already closed.
fn closed_pipe() -> OwnedFd {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors that we then own.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both are fresh descriptors owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    write
}

/// `meshctl` with no settings from the environment or config files on this machine.
fn meshctl(empty_config: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_meshctl"));
    c.env_remove("MESH_SERVER")
        .env_remove("MESH_TOKEN")
        .env_remove("MESH_STATE_DIR")
        .env("MESHCTL_CONFIG", empty_config)
        .stdin(Stdio::null())
        .args(args);
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn closed_pipes_end_meshctl_quietly() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut o = CoordinatorOptions::new(&state);
    o.listen = "127.0.0.1:0".parse().unwrap();
    o.admin_listen = "127.0.0.1:0".parse().unwrap();
    let coord = rt.block_on(start(o)).unwrap();
    for i in 0..3 {
        let req = TokenCreateRequest {
            labels: [("app".to_string(), format!("a{i}"))].into(),
            ttl_secs: Some(600),
            uses: Some(1),
        };
        rt.block_on(coord.create_token(req)).unwrap();
    }
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    let url = format!("http://{}", coord.admin_addr());
    let state = state.to_str().unwrap();
    let remote = |args: &[&str]| -> Vec<String> {
        let mut v = vec!["--server", url.as_str(), "--state-dir", state];
        v.extend_from_slice(args);
        v.into_iter().map(String::from).collect()
    };

    // Stdout's reader is gone: exit 0, nothing on stderr.
    let mut cases: Vec<Vec<String>> = [
        &["--help"][..],
        &["--version"],
        &["token", "--help"],
        // Tens of kilobytes: more than a pipe holds.
        &["completions", "bash"],
        &["completions", "fish"],
    ]
    .iter()
    .map(|a| a.iter().map(|s| s.to_string()).collect())
    .collect();
    cases.push(remote(&["status"]));
    cases.push(remote(&["token", "list"]));
    cases.push(remote(&["--output", "json", "token", "list"]));
    for args in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o: Output = meshctl(&empty, &args)
            .stdout(closed_pipe())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = text(&o.stderr);
        assert!(
            !err.contains("panicked"),
            "meshctl {args:?}: panicked: {err}"
        );
        assert!(err.is_empty(), "meshctl {args:?}: wrote to stderr: {err}");
        assert_eq!(o.status.code(), Some(0), "meshctl {args:?}: {err}");
    }

    // Stderr's reader is gone: `token create` still prints the token on stdout (its details
    // go to stderr) and succeeds.
    let args = remote(&["token", "create", "--labels", "app=x"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = meshctl(&empty, &args)
        .stdout(Stdio::piped())
        .stderr(closed_pipe())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert!(text(&o.stdout).trim().len() > 20, "no token: {o:?}");

    // An error that cannot be reported on stderr: exit 1 as usual, not a panic (101).
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dead = format!("http://127.0.0.1:{dead}");
    let o = meshctl(&empty, &["--server", &dead, "--token", "x", "status"])
        .stdout(Stdio::piped())
        .stderr(closed_pipe())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{o:?}");

    rt.block_on(coord.stop());
}
