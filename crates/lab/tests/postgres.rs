//! The throwaway PostgreSQL server: it inherits no descriptors, stops by its pid on drop, and
//! dies with a SIGKILLed test process.

use std::path::Path;
use std::time::{Duration, Instant};

/// True while `pid` is a live (not zombie) process.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|s| s != "Z" && s != "X"),
        Err(_) => false,
    }
}

fn wait_dead(pid: u32, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    !alive(pid)
}

/// The targets of a process's open descriptors.
fn fd_targets(pid: u32) -> Vec<(String, String)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        if let Ok(t) = std::fs::read_link(e.path()) {
            v.push((
                e.file_name().to_string_lossy().into_owned(),
                t.display().to_string(),
            ));
        }
    }
    v
}

#[test]
fn the_server_inherits_no_descriptors_and_stops_by_its_pid_on_drop() {
    // A descriptor without close-on-exec, as `flock FILE cargo test` leaves its lock.
    let held = tempfile::NamedTempFile::new().unwrap();
    let path = std::ffi::CString::new(held.path().as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; the descriptor is closed below.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY) };
    assert!(fd > 2, "open: {}", std::io::Error::last_os_error());
    let held_path = std::fs::canonicalize(held.path()).unwrap();

    let pg = meshd_lab::require_postgres!();
    let pid = pg.pid().unwrap();
    let dir = pg.dir().to_owned();
    assert!(alive(pid));
    assert!(
        dir.join(format!(".s.PGSQL.{}", pg.port())).exists(),
        "the socket is in the temporary directory"
    );
    let fds = fd_targets(pid);
    assert!(
        !fds.iter().any(|(_, t)| Path::new(t) == held_path.as_path()),
        "the server inherited the test's descriptor {fd}: {fds:?}"
    );
    // Not root's (initdb refuses root).
    let owner = std::fs::metadata(format!("/proc/{pid}"))
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap();
    if meshd_lab::is_root() {
        assert_ne!(owner, 0, "under root the server runs as nobody");
    }
    // It serves the TCP port on loopback.
    std::net::TcpStream::connect(("127.0.0.1", pg.port())).unwrap();

    drop(pg);
    assert!(wait_dead(pid, Duration::from_secs(1)), "stopped on drop");
    assert!(!dir.exists(), "directory removed");
    // SAFETY: our own descriptor, opened above.
    unsafe { libc::close(fd) };
}

/// Run by the test below in a child process: starts a server, says its pid, and waits to be
/// SIGKILLed.
#[test]
#[ignore = "helper: run by a_sigkilled_test_takes_its_server_along"]
fn sigkill_helper() {
    let Some(out) = std::env::var_os("MESHD_PG_HELPER_PID_FILE") else {
        return;
    };
    let pg = meshd_lab::postgres::Server::start().unwrap();
    let tmp = Path::new(&out).with_extension("tmp");
    std::fs::write(
        &tmp,
        format!("{} {}", pg.pid().unwrap(), pg.dir().display()),
    )
    .unwrap();
    std::fs::rename(&tmp, &out).unwrap();
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn a_sigkilled_test_takes_its_server_along() {
    if meshd_lab::postgres::bin_dir().is_none() {
        // Skips or fails (under root) as the other tests do.
        let _ = meshd_lab::require_postgres!();
    }
    let tmp = tempfile::tempdir().unwrap();
    let pid_file = tmp.path().join("pid");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "sigkill_helper", "--ignored", "--nocapture"])
        .env("MESHD_PG_HELPER_PID_FILE", &pid_file)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let text = loop {
        if let Ok(t) = std::fs::read_to_string(&pid_file) {
            break t;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the helper exited ({status}) without starting a server");
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "the helper did not start a server in time"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let (pid, dir) = text.split_once(' ').unwrap();
    let pid: u32 = pid.parse().unwrap();
    assert!(alive(pid));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        wait_dead(pid, Duration::from_secs(10)),
        "the server {pid} outlived its SIGKILLed test process"
    );
    // The next start deletes the directory the killed process left.
    assert!(Path::new(dir).exists());
    drop(meshd_lab::postgres::Server::start().unwrap());
    assert!(!Path::new(dir).exists(), "stale {dir} removed");
}

#[test]
fn a_restarted_server_keeps_its_data_and_port() {
    let mut pg = meshd_lab::require_postgres!();
    let port = pg.port();
    let url = pg.create_database("kept").unwrap();
    let old = pg.pid().unwrap();
    pg.stop();
    assert!(wait_dead(old, Duration::from_secs(1)));
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    pg.restart().unwrap();
    assert_eq!(pg.port(), port);
    assert_eq!(pg.url_for("kept"), url);
    assert!(
        pg.create_database("kept").is_err(),
        "the database created before the restart is still there"
    );
}
