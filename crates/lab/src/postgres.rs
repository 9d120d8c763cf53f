//! A throwaway PostgreSQL server for tests: [`Server::start`] runs `initdb` into a temporary
//! directory and `postgres` on a free loopback port, as an ordinary user (no system service,
//! no cluster of the machine's touched).
//!
//! - **Who runs it.** The current user; under root (`initdb` refuses root) the user `nobody`,
//!   with the directory handed to it.
//! - **Nothing inherited.** The child closes every descriptor above stderr before `exec`
//!   (a test process may hold descriptors without close-on-exec, e.g. the lock file of a
//!   `flock` around `cargo test`; a server holding it would hold the lock for good).
//! - **Does not outlive its test.** `Drop` stops it by the pid it started (SIGINT, a fast
//!   shutdown, then SIGKILL after [`STOP_GRACE`]) and deletes the directory. The child also
//!   has `PR_SET_PDEATHSIG` = SIGKILL: a SIGKILLed test process takes its server with it. The
//!   parent that counts is the *thread* that called [`Server::start`]: start it on the thread
//!   that keeps the `Server` (a test's own thread), not on a short-lived one.
//! - **Stale directories.** A killed test process leaves its directory behind; the next
//!   [`Server::start`] deletes those whose owning process (named in the directory) is gone.
//! - **Missing PostgreSQL.** [`require_postgres!`](crate::require_postgres) skips the test with
//!   a notice when not root and fails it, naming the Debian package `postgresql`, under root
//!   (as in CI, where nothing may skip). The binaries are looked for in `$MESHD_PG_BINDIR`,
//!   then the newest `/usr/lib/postgresql/*/bin` (Debian keeps them off `PATH`), then `PATH`.

use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{LabError, Result};

/// How long a stopped server gets to exit after SIGINT before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long `initdb` may take.
const INITDB_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The superuser `initdb` creates (no password: `trust` on loopback and the socket).
pub const USER: &str = "meshd";
/// The Debian package with `initdb` and `postgres`.
pub const PACKAGE: &str = "postgresql";

/// The directory holding `initdb`, `postgres` and `createdb`, if PostgreSQL is installed.
pub fn bin_dir() -> Option<PathBuf> {
    let has = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Some(d) = std::env::var_os("MESHD_PG_BINDIR").map(PathBuf::from) {
        return has(&d).then_some(d);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let d = e.path().join("bin");
            has(&d).then_some((v, d))
        })
        .collect();
    versions.sort();
    if let Some((_, d)) = versions.pop() {
        return Some(d);
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|d| has(d))
}

/// Why PostgreSQL is needed but absent (the message a test fails or skips with).
pub fn missing_message() -> String {
    format!(
        "PostgreSQL is not installed (no initdb/postgres in $MESHD_PG_BINDIR, \
         /usr/lib/postgresql/*/bin or PATH): install the Debian package {PACKAGE} \
         (apt-get install -y {PACKAGE})"
    )
}

/// Starts a server for the calling test, or returns from it: with a printed notice when not
/// root and PostgreSQL is missing; under root a missing PostgreSQL fails the test, naming the
/// package. Evaluates to the [`Server`](crate::postgres::Server).
///
/// ```no_run
/// #[test]
/// fn stores_on_postgres() {
///     let pg = meshd_lab::require_postgres!();
///     let url = pg.url();
/// }
/// ```
#[macro_export]
macro_rules! require_postgres {
    () => {
        match $crate::postgres::Server::start_or_skip() {
            Some(s) => s,
            None => return,
        }
    };
}

/// A running throwaway server (stopped and deleted on drop).
#[derive(Debug)]
pub struct Server {
    child: Option<Child>,
    port: u16,
    bin: PathBuf,
    as_nobody: Option<(u32, u32)>,
    dir: tempfile::TempDir,
}

/// The uid and gid of `nobody`/`nogroup` (what the server runs as under root).
fn nobody() -> Result<(u32, u32)> {
    let name = c"nobody";
    // SAFETY: getpwnam takes a NUL-terminated name; the result is read at once, before any
    // other call that could reuse its static buffer (tests start servers from several threads,
    // but the entry for one name is the same whichever call wrote it).
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err(LabError::io(
            "looking up the user nobody (the PostgreSQL server runs as it under root)",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
    }
    // SAFETY: non-null, points at a valid passwd entry.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Ok((uid, gid))
}

/// Sets up the child: closes inherited descriptors, dies with its parent thread.
fn prepare(cmd: &mut Command, as_nobody: Option<(u32, u32)>) {
    if let Some((uid, gid)) = as_nobody {
        // std sets the gid, drops supplementary groups and sets the uid before the hook below.
        cmd.uid(uid).gid(gid);
    }
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the hook only makes async-signal-safe system calls (prctl, getppid, close_range,
    // close) and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            // After the uid change (which would clear it).
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The parent died before the prctl: nobody would kill us.
            if libc::getppid() != parent {
                return Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
            }
            // Everything above stderr; std's own error pipe is close-on-exec and so stays
            // usable until exec (close_range with CLOEXEC marks rather than closes).
            let r = libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC as libc::c_uint,
            );
            if r != 0 {
                // Older kernels: mark each one (up to the soft limit, bounded).
                for fd in 3..4096 {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags >= 0 {
                        libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
                    }
                }
            }
            Ok(())
        });
    }
}

/// Runs a short command to completion within `limit`, its output into `log`.
fn run(mut cmd: Command, what: &str, log: &Path, limit: Duration) -> Result<()> {
    let out =
        File::create(log).map_err(|e| LabError::io(format!("creating {}", log.display()), e))?;
    let err = out
        .try_clone()
        .map_err(|e| LabError::io(format!("opening {}", log.display()), e))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    let mut child = cmd.spawn().map_err(|e| LabError::io(what, e))?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                return Err(LabError::CommandFailed {
                    cmd: what.to_string(),
                    status,
                    stderr: tail(log),
                })
            }
            Ok(None) if start.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(LabError::Timeout {
                    what: what.to_string(),
                    after: limit,
                });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(LabError::io(what, e)),
        }
    }
}

/// The last lines of a log (for error messages).
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Prefix of the servers' temporary directories.
const DIR_PREFIX: &str = "meshd-pg-";
/// The file in a server's directory naming the test process that made it.
const OWNER_FILE: &str = "owner.pid";

/// Deletes server directories of test processes that no longer run (killed before their
/// `Drop`; their servers died with them). Directories without an owner file are left alone.
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten().take(10_000) {
        let name = e.file_name();
        if !name.to_string_lossy().starts_with(DIR_PREFIX) {
            continue;
        }
        let Some(pid) = std::fs::read_to_string(e.path().join(OWNER_FILE))
            .ok()
            .and_then(|t| t.trim().parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        // SAFETY: kill(2) with signal 0 only checks whether the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A loopback port nothing listens on right now.
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| LabError::io("binding a loopback port", e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| LabError::io("reading a bound port", e))
}

impl Server {
    /// As [`Server::start`], or `None` after printing a skip notice when PostgreSQL is missing
    /// and this process is not root. Panics (fails the test) when it is missing under root,
    /// naming the package, or when the server does not start.
    pub fn start_or_skip() -> Option<Server> {
        if bin_dir().is_none() {
            if crate::is_root() {
                panic!("{}", missing_message());
            }
            use std::io::Write as _;
            let thread = std::thread::current();
            let test = thread.name().unwrap_or("a test");
            let _ = writeln!(
                std::io::stderr().lock(),
                "SKIP {test}: needs PostgreSQL: {}",
                missing_message()
            );
            return None;
        }
        match Server::start() {
            Ok(s) => Some(s),
            Err(e) => panic!("starting a throwaway PostgreSQL server: {e}"),
        }
    }

    /// Initialises a cluster in a new temporary directory and starts it on a free loopback
    /// port (see the module docs). Returns once it accepts connections.
    pub fn start() -> Result<Server> {
        let bin = bin_dir().ok_or_else(|| {
            LabError::io(
                missing_message(),
                std::io::Error::from(std::io::ErrorKind::NotFound),
            )
        })?;
        remove_stale_dirs();
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir()
            .map_err(|e| LabError::io("creating the PostgreSQL directory", e))?;
        let owner = dir.path().join(OWNER_FILE);
        std::fs::write(&owner, std::process::id().to_string())
            .map_err(|e| LabError::io(format!("writing {}", owner.display()), e))?;
        let as_nobody = if crate::is_root() {
            let (uid, gid) = nobody()?;
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .map_err(|e| LabError::io(format!("chown {}", dir.path().display()), e))?;
            Some((uid, gid))
        } else {
            None
        };
        let data = dir.path().join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", USER, "-E", "UTF8", "--no-instructions"])
            .arg("--no-sync")
            .env("LC_ALL", "C")
            .env("TZ", "UTC");
        prepare(&mut initdb, as_nobody);
        run(
            initdb,
            "initdb",
            &dir.path().join("initdb.log"),
            INITDB_TIMEOUT,
        )?;
        let mut server = Server {
            child: None,
            port: 0,
            bin,
            as_nobody,
            dir,
        };
        // The port is free when picked but could be taken before the server binds it: retry.
        let mut last = None;
        for _ in 0..5 {
            match free_port().and_then(|port| server.spawn(port)) {
                Ok(()) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| LabError::Timeout {
            what: "starting postgres".into(),
            after: READY_TIMEOUT,
        }))
    }

    fn spawn(&mut self, port: u16) -> Result<()> {
        let log_path = self.dir.path().join("postgres.log");
        let log = File::create(&log_path)
            .map_err(|e| LabError::io(format!("creating {}", log_path.display()), e))?;
        let err = log
            .try_clone()
            .map_err(|e| LabError::io(format!("opening {}", log_path.display()), e))?;
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-k")
            .arg(self.dir.path())
            .arg("-p")
            .arg(port.to_string())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=30",
                "-c",
                "shared_buffers=16MB",
            ])
            .env("LC_ALL", "C")
            .env("TZ", "UTC")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        prepare(&mut cmd, self.as_nobody);
        let child = cmd
            .spawn()
            .map_err(|e| LabError::io("starting postgres", e))?;
        self.child = Some(child);
        self.port = port;
        let pid_file = self.dir.path().join("data").join("postmaster.pid");
        let start = Instant::now();
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    return Err(LabError::CommandFailed {
                        cmd: format!("postgres -p {port}"),
                        status,
                        stderr: tail(&log_path),
                    });
                }
            }
            // Line 8 of postmaster.pid is the server's status; "ready" once it accepts.
            let ready = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|t| t.lines().nth(7).map(|l| l.trim() == "ready"))
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            if start.elapsed() > READY_TIMEOUT {
                self.stop();
                return Err(LabError::Timeout {
                    what: format!("postgres on port {port} to accept connections"),
                    after: READY_TIMEOUT,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's pid (the process [`Server::start`] started), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The directory with the data directory, the socket and the logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A connection URL for database `db` (`postgres` exists from the start).
    pub fn url_for(&self, db: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{db}", self.port)
    }

    /// A connection URL for the `postgres` database.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// Creates a database (with `createdb`) and returns its URL.
    pub fn create_database(&self, name: &str) -> Result<String> {
        let mut cmd = Command::new(self.bin.join("createdb"));
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            USER,
            name,
        ]);
        prepare(&mut cmd, self.as_nobody);
        run(
            cmd,
            &format!("createdb {name}"),
            &self.dir.path().join("createdb.log"),
            INITDB_TIMEOUT,
        )?;
        Ok(self.url_for(name))
    }

    /// Stops the server (a fast shutdown, SIGKILL after [`STOP_GRACE`]) and waits for it.
    /// Idempotent; the directory stays until drop, so [`Server::restart`] can start it again.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill(2) on the pid of our own unreaped child (it cannot be reused).
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
        let start = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if start.elapsed() > STOP_GRACE => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Starts a stopped server again on the same data and port (fails if the port was taken
    /// in between).
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn(self.port)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}
