//! Running programs inside lab namespaces: one-shot commands with a time limit, and tracked
//! background processes that the lab terminates when it is dropped.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{LabError, Result};

/// Default time limit for one-shot commands ([`crate::Host::exec`] and the lab's own `ip` calls).
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the lab waits after SIGTERM before it sends SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(2);

/// A signal that can be sent to a spawned process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: ask to terminate.
    Term,
    /// SIGKILL: terminate at once.
    Kill,
    /// SIGINT: interrupt (tcpdump flushes and exits).
    Int,
    /// SIGHUP: conventionally "reload".
    Hup,
    /// SIGUSR1.
    Usr1,
    /// SIGUSR2.
    Usr2,
    /// SIGSTOP: pause the process.
    Stop,
    /// SIGCONT: resume a paused process.
    Cont,
}

impl Signal {
    /// The raw signal number.
    pub fn as_raw(self) -> libc::c_int {
        match self {
            Signal::Term => libc::SIGTERM,
            Signal::Kill => libc::SIGKILL,
            Signal::Int => libc::SIGINT,
            Signal::Hup => libc::SIGHUP,
            Signal::Usr1 => libc::SIGUSR1,
            Signal::Usr2 => libc::SIGUSR2,
            Signal::Stop => libc::SIGSTOP,
            Signal::Cont => libc::SIGCONT,
        }
    }
}

/// A command to run inside a host namespace: program, arguments, environment, working directory.
///
/// Builder methods take `&mut self` like [`std::process::Command`], so both
/// `host.spawn(Cmd::new("sleep").arg("5"))` and step-by-step building work.
#[derive(Debug, Clone)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    cwd: Option<PathBuf>,
    label: Option<String>,
    timeout: Duration,
}

impl Cmd {
    /// A command running `program` (looked up in `PATH` inside the namespace).
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Cmd {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            envs: Vec::new(),
            cwd: None,
            label: None,
            timeout: DEFAULT_EXEC_TIMEOUT,
        }
    }

    /// Appends one argument.
    pub fn arg(&mut self, arg: impl AsRef<OsStr>) -> &mut Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Appends several arguments.
    pub fn args<I, S>(&mut self, args: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable for the program (the rest of the environment is inherited).
    pub fn env(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut Self {
        self.envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Sets the working directory of the program.
    pub fn current_dir(&mut self, dir: impl AsRef<Path>) -> &mut Self {
        self.cwd = Some(dir.as_ref().to_owned());
        self
    }

    /// Names the log files of a spawned process (default: the program's file name).
    pub fn label(&mut self, label: impl Into<String>) -> &mut Self {
        self.label = Some(label.into());
        self
    }

    /// Time limit for one-shot runs via [`crate::Host::exec_cmd`] (default 60 s); ignored by spawn.
    pub fn timeout(&mut self, timeout: Duration) -> &mut Self {
        self.timeout = timeout;
        self
    }

    /// The command line as text, for messages.
    pub fn display(&self) -> String {
        let mut s = self.program.to_string_lossy().into_owned();
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }

    /// The label used for log file names, made safe for a file name.
    pub(crate) fn file_label(&self) -> String {
        let raw = match &self.label {
            Some(l) => l.clone(),
            None => Path::new(&self.program)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "proc".to_owned()),
        };
        raw.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .take(48)
            .collect()
    }

    /// The configured one-shot time limit.
    pub(crate) fn exec_timeout(&self) -> Duration {
        self.timeout
    }

    /// Builds `ip netns exec NETNS program args...` with this command's environment and directory.
    pub(crate) fn in_netns(&self, netns: &str) -> Command {
        let mut c = Command::new("ip");
        c.arg("netns").arg("exec").arg(netns).arg(&self.program);
        c.args(&self.args);
        for (k, v) in &self.envs {
            c.env(k, v);
        }
        if let Some(d) = &self.cwd {
            c.current_dir(d);
        }
        c
    }
}

/// Sends `sig` to a process (`pid > 0`) or a process group (`pid < 0`).
fn raw_kill(pid: i32, sig: libc::c_int) -> std::io::Result<()> {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let r = unsafe { libc::kill(pid, sig) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// True when the child `pid` has exited (it is left unreaped, so its pid and group stay ours).
fn exited_unreaped(pid: u32) -> bool {
    // SAFETY: siginfo_t is plain old data; all-zero is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable siginfo_t for the duration of the call.
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    if r != 0 {
        // ECHILD: nothing left to wait for.
        return true;
    }
    // SAFETY: waitid filled `info` (or left it zeroed when nothing has exited).
    unsafe { info.si_pid() != 0 }
}

/// Converts a child's pid to the signed type `kill(2)` wants.
fn signed_pid(pid: u32) -> i32 {
    i32::try_from(pid).expect("pid fits in i32")
}

/// Sleeps for a poll step that grows from 1 ms to 20 ms, never past `deadline`.
fn poll_sleep(step: &mut Duration, deadline: Instant) {
    let left = deadline.saturating_duration_since(Instant::now());
    thread::sleep((*step).min(left));
    *step = (*step * 2).min(Duration::from_millis(20));
}

/// Reads a pipe to its end on a thread; the receiver gets the bytes.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::sync_channel(1);
    if let Some(mut p) = pipe {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ignored_partial_read = p.read_to_end(&mut buf);
            let _receiver_may_be_gone = tx.send(buf);
        });
    } else {
        let _receiver_is_here = tx.send(Vec::new());
    }
    rx
}

/// Runs `cmd` to completion with captured output, killing its process group after `timeout`.
pub(crate) fn run_with_timeout(
    mut cmd: Command,
    what: &str,
    timeout: Duration,
    stdin: Option<&[u8]>,
) -> Result<Output> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0);
    let mut child = cmd.spawn().map_err(|e| LabError::io(what, e))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Inputs are small `ip -batch` scripts; a failed write shows up as a failed command.
        let _reported_by_exit_status = pipe.write_all(input);
    }
    let out_rx = drain(child.stdout.take());
    let err_rx = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let mut step = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(LabError::io(what, e)),
        }
        if Instant::now() >= deadline {
            let _already_gone = raw_kill(-signed_pid(child.id()), libc::SIGKILL);
            let _reaped = child.wait();
            return Err(LabError::Timeout {
                what: what.to_owned(),
                after: timeout,
            });
        }
        poll_sleep(&mut step, deadline);
    };
    // A daemonised grandchild may hold the pipes open; do not wait for it forever.
    let grace = Duration::from_secs(2);
    let stdout = out_rx.recv_timeout(grace).unwrap_or_default();
    let stderr = err_rx.recv_timeout(grace).unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Like [`run_with_timeout`] but a non-zero exit becomes [`LabError::CommandFailed`].
pub(crate) fn run_ok(
    cmd: Command,
    what: &str,
    timeout: Duration,
    stdin: Option<&[u8]>,
) -> Result<Output> {
    let out = run_with_timeout(cmd, what, timeout, stdin)?;
    check_status(what, out)
}

/// Turns a non-zero exit into [`LabError::CommandFailed`] carrying stderr.
pub(crate) fn check_status(what: &str, out: Output) -> Result<Output> {
    if out.status.success() {
        Ok(out)
    } else {
        Err(LabError::CommandFailed {
            cmd: what.to_owned(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// State of a tracked child, shared by its [`ProcHandle`] and the lab's registry.
#[derive(Debug)]
pub(crate) struct Tracked {
    pid: u32,
    what: String,
    state: Mutex<TrackedState>,
}

#[derive(Debug)]
struct TrackedState {
    child: Child,
    /// Set once the child has been reaped; after that its pid must never be signalled.
    status: Option<ExitStatus>,
}

impl Tracked {
    fn lock(&self) -> MutexGuard<'_, TrackedState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl TrackedState {
    fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status)
    }
}

/// Spawns `cmd` in `netns` with stdout/stderr going to files, in its own process group.
pub(crate) fn spawn_tracked(
    cmd: &Cmd,
    netns: &str,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
) -> Result<(Arc<Tracked>, ProcHandle)> {
    let what = format!("ip netns exec {netns} {}", cmd.display());
    let out = File::create(&stdout_path)
        .map_err(|e| LabError::io(format!("create {}", stdout_path.display()), e))?;
    let err = File::create(&stderr_path)
        .map_err(|e| LabError::io(format!("create {}", stderr_path.display()), e))?;
    let mut c = cmd.in_netns(netns);
    c.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    let child = c.spawn().map_err(|e| LabError::io(&what, e))?;
    let tracked = Arc::new(Tracked {
        pid: child.id(),
        what,
        state: Mutex::new(TrackedState {
            child,
            status: None,
        }),
    });
    let handle = ProcHandle {
        tracked: Arc::clone(&tracked),
        stdout_path,
        stderr_path,
    };
    Ok((tracked, handle))
}

/// Terminates tracked processes: SIGTERM to each process group, up to `grace` for the leaders
/// to exit, SIGKILL to every group still holding an unreaped leader, then reap.
pub(crate) fn terminate_all(procs: &[Arc<Tracked>], grace: Duration) {
    // Holding every lock keeps handles in other threads from reaping (and freeing a pid)
    // while we signal.
    let mut guards: Vec<(&Tracked, MutexGuard<'_, TrackedState>)> =
        procs.iter().map(|t| (&**t, t.lock())).collect();
    guards.retain(|(_, g)| g.status.is_none());
    for (t, _) in &guards {
        let _already_gone = raw_kill(-signed_pid(t.pid), libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    let mut step = Duration::from_millis(1);
    while Instant::now() < deadline && !guards.iter().all(|(t, _)| exited_unreaped(t.pid)) {
        poll_sleep(&mut step, deadline);
    }
    for (t, _) in &guards {
        // The leader is unreaped (maybe a zombie), so the group id is still ours: this also
        // catches descendants that outlived their parent.
        let _already_gone = raw_kill(-signed_pid(t.pid), libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for (t, g) in &mut guards {
        let mut step = Duration::from_millis(1);
        loop {
            match g.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => poll_sleep(&mut step, deadline),
                Ok(None) => {
                    eprintln!(
                        "meshd-lab: pid {} ({}) did not die after SIGKILL",
                        t.pid, t.what
                    );
                    break;
                }
                Err(e) => {
                    eprintln!("meshd-lab: waiting for pid {} ({}): {e}", t.pid, t.what);
                    break;
                }
            }
        }
    }
}

/// A background process started by [`crate::Host::spawn`]; the lab kills it on drop if it
/// is still running. Dropping the handle does not stop the process.
#[derive(Debug)]
pub struct ProcHandle {
    tracked: Arc<Tracked>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
}

impl ProcHandle {
    /// The process id (of the program itself: `ip netns exec` replaces itself with it).
    pub fn pid(&self) -> u32 {
        self.tracked.pid
    }

    /// Sends a signal to the process; does nothing once it has been reaped.
    pub fn kill(&self, signal: Signal) -> Result<()> {
        let g = self.tracked.lock();
        if g.status.is_some() {
            return Ok(());
        }
        raw_kill(signed_pid(self.tracked.pid), signal.as_raw())
            .map_err(|e| LabError::io(format!("kill -{} {}", signal.as_raw(), self.tracked.pid), e))
    }

    /// The exit status if the process has exited (reaping it), without blocking.
    pub fn try_wait(&self) -> Result<Option<ExitStatus>> {
        self.tracked
            .lock()
            .try_wait()
            .map_err(|e| LabError::io(format!("wait for {}", self.tracked.what), e))
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        let mut step = Duration::from_millis(1);
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            poll_sleep(&mut step, deadline);
        }
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL; returns the exit status.
    pub fn stop(&self, grace: Duration) -> Result<ExitStatus> {
        self.kill(Signal::Term)?;
        if let Some(status) = self.wait_timeout(grace)? {
            return Ok(status);
        }
        self.kill(Signal::Kill)?;
        self.wait_timeout(Duration::from_secs(5))?
            .ok_or_else(|| LabError::Timeout {
                what: format!("{} after SIGKILL", self.tracked.what),
                after: Duration::from_secs(5),
            })
    }

    /// The file receiving the process's standard output.
    pub fn stdout_path(&self) -> &Path {
        &self.stdout_path
    }

    /// The file receiving the process's standard error.
    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }

    /// Standard output written so far (lossy UTF-8).
    pub fn stdout(&self) -> Result<String> {
        read_lossy(&self.stdout_path)
    }

    /// Standard error written so far (lossy UTF-8).
    pub fn stderr(&self) -> Result<String> {
        read_lossy(&self.stderr_path)
    }

    /// The command line, for messages.
    pub fn command_line(&self) -> &str {
        &self.tracked.what
    }
}

/// Reads a log file as lossy UTF-8.
fn read_lossy(path: &Path) -> Result<String> {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .map_err(|e| LabError::io(format!("read {}", path.display()), e))
}
