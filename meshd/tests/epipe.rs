//! A closed pipe on stdout or stderr (`meshd status | head -1`) ends meshd quietly: exit 0 for
//! stdout, no panic, no message. Each command gets a pipe whose read end is closed before it
//! starts, so its first write fails with EPIPE whatever the output's length.

mod common;

use std::io::Write as _;
use std::os::fd::{FromRawFd as _, OwnedFd};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use meshd_lab::Lab;

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

/// Runs `cmd` with stdout into a closed pipe, `stdin` on its stdin; returns its output
/// (stderr captured).
fn into_closed_stdout(mut cmd: Command, stdin: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(closed_pipe())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn assert_quiet_success(what: &str, o: &Output) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{what}: panicked: {err}");
    assert!(err.is_empty(), "{what}: wrote to stderr: {err}");
    assert_eq!(o.status.code(), Some(0), "{what}: {:?} {err}", o.status);
}

fn meshd(args: &[&str]) -> Command {
    let mut c = Command::new(meshd_bin());
    c.args(args);
    c
}

#[test]
fn closed_stdout_ends_every_command_quietly() {
    let private = meshd_tunnel::PrivateKey::generate();
    let key = private.to_base64();
    let d = tempfile_dir("cmds");
    meshd_config::write_private_key(d.join("host.key"), &private).unwrap();
    let cfg = d.join("meshd.toml");
    std::fs::write(
        &cfg,
        "[interface]\nname = \"mesh0\"\nprivate_key_file = \"host.key\"\naddress = \"100.64.0.1/24\"\n",
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap().to_string();
    for (args, stdin) in [
        (vec!["--help"], ""),
        (vec!["--version"], ""),
        (vec!["genkey"], ""),
        (vec!["pubkey"], key.as_str()),
        (vec!["check-config", cfg.as_str()], ""),
        // Tens of kilobytes: more than a pipe holds.
        (vec!["completions", "bash"], ""),
        (vec!["completions", "zsh"], ""),
    ] {
        let o = into_closed_stdout(meshd(&args), stdin);
        assert_quiet_success(&format!("meshd {}", args.join(" ")), &o);
    }
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn status_into_a_closed_pipe_is_quiet() {
    meshd_lab::require_root!();
    let lab = Lab::new("epipe", 1).unwrap();
    let node = Node::new(&lab, 0);
    node.write_config(&lab, &[], "");
    let _meshd = node.start(&lab);
    let ns = lab.host(0).netns().to_string();
    for json in [false, true] {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &ns, meshd_bin(), "status"]);
        if json {
            c.arg("--json");
        }
        let o = into_closed_stdout(c, "");
        assert_quiet_success(&format!("meshd status (json: {json})"), &o);
    }
}

#[test]
fn closed_stderr_is_no_panic() {
    // An error message that cannot be written: exit 1 as usual, not a panic (101).
    let mut child = meshd(&["check-config", "/nonexistent/meshd.toml"])
        .stdout(Stdio::null())
        .stderr(closed_pipe())
        .spawn()
        .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(1));

    // A daemon whose log pipe closed keeps serving, and stops cleanly on SIGTERM.
    let d = tempfile_dir("coord");
    let mut child = meshd(&["coordinator", "--listen", "127.0.0.1:0"])
        .args(["--admin-listen", "127.0.0.1:0", "--state-dir"])
        .arg(d.join("state"))
        .stdout(Stdio::null())
        .stderr(closed_pipe())
        .spawn()
        .unwrap();
    // It has logged its start-up once the admin token exists.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !d.join("state/admin.token").exists() && Instant::now() < deadline {
        assert!(child.try_wait().unwrap().is_none(), "coordinator died");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        d.join("state/admin.token").exists(),
        "coordinator did not start"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "coordinator died with its log pipe closed: {:?}",
        child.try_wait()
    );
    // SAFETY: signalling the child we started, by its pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().unwrap().code(), Some(0));
    std::fs::remove_dir_all(&d).unwrap();
}

fn tempfile_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("meshd-epipe-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
