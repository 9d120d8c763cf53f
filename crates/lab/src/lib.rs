//! A network-namespace lab for meshd's end-to-end tests and benchmarks.
//!
//! [`Lab::new`] builds N hosts, each in its own network namespace, joined by a Linux bridge
//! that lives in a separate "switch" namespace. Nothing is created in the root namespace:
//!
//! ```text
//!   mlab-<pid>-<seq>-sw:  br0 ── h0 ─┬─ h1 ─┬─ ...        (veth ends, enslaved to br0)
//!                                     │      │
//!   mlab-<pid>-<seq>-h0:  eth0 ───────┘      │            198.18.0.1/24, fd00:1::1/64
//!   mlab-<pid>-<seq>-h1:  eth0 ──────────────┘            198.18.0.2/24, fd00:1::2/64
//! ```
//!
//! Host `i` gets the IPv4 underlay address `198.18.0.(i+1)/24` and the IPv6 address
//! `fd00:1::(i+1)/64` (added with `nodad`, so it is usable at once). Only 198.18.0.0/15
//! (RFC 2544 benchmarking) and fd00::/8 are used, so no traffic can leave the lab.
//!
//! ```no_run
//! use meshd_lab::{Cmd, Lab};
//! # fn main() -> Result<(), meshd_lab::LabError> {
//! let lab = Lab::new("ping", 2)?;
//! let (a, b) = (lab.host(0), lab.host(1));
//! assert!(a.ping(b.underlay_ip().into())?);
//! let server = b.spawn(Cmd::new("iperf3").arg("-s"))?;
//! let cap = lab.capture(1, "eth0", "udp")?;
//! a.exec_ok("iperf3", ["-c", &b.underlay_ip().to_string(), "-u", "-t", "1"])?;
//! let pcap = cap.stop_parsed()?;
//! println!("{} packets, server log at {}", pcap.packets.len(), server.stdout_path().display());
//! # Ok(()) }
//! // Dropping `lab` stops iperf3 and deletes the namespaces, also when a test panics.
//! ```
//!
//! Rules the lab keeps:
//! - **Unique names.** Namespaces are named `mlab-<pid>-<seq>-h<i>` / `mlab-<pid>-<seq>-sw`, so
//!   labs in parallel test threads and parallel test binaries never collide. The `tag` given to
//!   [`Lab::new`] only appears in logs.
//! - **Stale cleanup.** [`Lab::new`] first deletes `mlab-*` namespaces whose embedded pid is not
//!   a running process (left behind by a killed run), SIGKILLing the leftover processes that are
//!   still inside them. Namespaces of live pids are never touched.
//! - **Cleanup always.** `Drop for Lab` sends SIGTERM to the process group of every process the
//!   lab spawned, waits up to [`TERM_GRACE`], sends SIGKILL, reaps them, and deletes the
//!   namespaces (which deletes the veths). Drop runs during panic unwinding too. Processes are
//!   only ever signalled by the pid the lab started, never by name. Descendants that leave the
//!   process group (e.g. with `setsid`) are not tracked.
//! - **Logs.** Spawned processes write stdout/stderr to files under [`Lab::dir`], a per-lab
//!   temporary directory removed on drop unless the environment has `MESHD_LAB_KEEP=1`.
//! - **Bounded.** Every wait has a time limit; one-shot commands are killed after
//!   [`DEFAULT_EXEC_TIMEOUT`] unless [`Cmd::timeout`] says otherwise.
//!
//! Everything here is blocking std code and needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN), plus
//! `ip` (iproute2) and, for captures, `tcpdump`.

#[cfg(feature = "browser")]
pub mod browser;
mod capture;
mod error;
pub mod pcap;
pub mod postgres;
mod proc;

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

pub use capture::{Capture, CAPTURE_START_TIMEOUT};
pub use error::{LabError, Result};
pub use proc::{Cmd, ProcHandle, Signal, DEFAULT_EXEC_TIMEOUT, TERM_GRACE};

use proc::{run_ok, run_with_timeout, terminate_all, Tracked};

/// Prefix of every namespace a lab creates.
pub const NS_PREFIX: &str = "mlab-";

/// Most hosts one lab can hold (the underlay is a /24).
pub const MAX_HOSTS: usize = 254;

/// Prefix length of the IPv4 underlay addresses.
pub const UNDERLAY_PREFIX_LEN: u8 = 24;

/// Environment variable that keeps [`Lab::dir`] after the lab is dropped when set to `1`.
pub const KEEP_ENV: &str = "MESHD_LAB_KEEP";

/// Labs created by this process so far (part of namespace names).
static LAB_SEQ: AtomicU64 = AtomicU64::new(0);

/// Serialises this process's first `ip netns add`, which sets up the shared `/run/netns` mount.
static NETNS_FIRST_ADD: Mutex<bool> = Mutex::new(false);

/// True when this process runs as root (effective uid 0), which a lab needs: network
/// namespaces, veth links, TUN devices and nft all take `CAP_NET_ADMIN`/`CAP_SYS_ADMIN`.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Prints that the current test is skipped because it needs root. Written straight to
/// stderr, past libtest's output capture, so a normal `cargo test` shows it.
pub fn skip_notice(why: &str) {
    use std::io::Write as _;
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    let _ = writeln!(
        std::io::stderr().lock(),
        "SKIP {test}: needs root ({why}); run the tests as root to include it"
    );
}

/// Returns from the calling test (skips it) with a printed notice unless this process is
/// root. Under root, as in CI, nothing is skipped.
///
/// ```no_run
/// #[test]
/// fn two_hosts_talk() {
///     meshd_lab::require_root!();
///     let lab = meshd_lab::Lab::new("talk", 2).unwrap();
/// }
/// ```
#[macro_export]
macro_rules! require_root {
    () => {
        $crate::require_root!("network namespaces")
    };
    ($why:expr) => {
        if !$crate::is_root() {
            $crate::skip_notice($why);
            return;
        }
    };
}

/// The IPv4 underlay address host `index` starts with: 198.18.0.(index+1).
pub fn underlay_ipv4(index: usize) -> Ipv4Addr {
    assert!(index < MAX_HOSTS, "host index {index} out of range");
    Ipv4Addr::new(198, 18, 0, (index + 1) as u8)
}

/// The IPv6 underlay address of host `index`: fd00:1::(index+1).
pub fn underlay_ipv6(index: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, (index + 1) as u16)
}

/// True if `ip` is inside 198.18.0.0/15, the only IPv4 range the lab uses.
pub fn in_underlay_range(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    o[0] == 198 && (o[1] & 0xfe) == 18
}

/// Polls `cond` every `poll_interval` until it returns true or `timeout` passes; returns
/// whether it became true. `cond` runs at least once and at most about
/// `timeout / poll_interval + 2` times.
pub fn wait_for(
    timeout: Duration,
    poll_interval: Duration,
    mut cond: impl FnMut() -> bool,
) -> bool {
    let poll = poll_interval.max(Duration::from_millis(1));
    let deadline = Instant::now() + timeout;
    let max_rounds = timeout.as_millis() / poll.as_millis() + 2;
    for _ in 0..max_rounds {
        if cond() {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        std::thread::sleep(poll.min(left));
    }
    cond()
}

/// Runs `ip ARGS` in the root mount namespace, failing on a non-zero exit.
fn ip<I, S>(args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new("ip");
    cmd.args(args);
    let what = format!("{cmd:?}");
    run_ok(cmd, &what, DEFAULT_EXEC_TIMEOUT, None)
}

/// Runs a newline-separated `ip -batch` script in namespace `netns`.
fn ip_batch(netns: &str, script: &str) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["-n", netns, "-batch", "-"]);
    let what = format!("ip -n {netns} -batch <<{script:?}");
    run_ok(cmd, &what, DEFAULT_EXEC_TIMEOUT, Some(script.as_bytes())).map(drop)
}

/// Runs `sysctl -w` assignments inside `netns`.
fn netns_sysctl(netns: &str, assignments: &[&str]) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns, "sysctl", "-q", "-w"]);
    cmd.args(assignments);
    let what = format!("{cmd:?}");
    run_ok(cmd, &what, DEFAULT_EXEC_TIMEOUT, None).map(drop)
}

/// Creates a named network namespace.
fn netns_add(name: &str) -> Result<()> {
    let mut first = NETNS_FIRST_ADD.lock().unwrap_or_else(|p| p.into_inner());
    if *first {
        drop(first);
        ip(["netns", "add", name]).map(drop)
    } else {
        ip(["netns", "add", name])?;
        *first = true;
        Ok(())
    }
}

/// Names of all named network namespaces.
fn netns_list() -> Result<Vec<String>> {
    let out = ip(["netns", "list"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// The pid embedded in a lab namespace name `mlab-<pid>-...`, if it is one.
fn owner_pid(netns: &str) -> Option<u32> {
    netns
        .strip_prefix(NS_PREFIX)?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// True if a process with this pid exists.
fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Runs once per process, before its first lab exists.
static OWN_PID_CLEANUP: Once = Once::new();

/// Deletes `mlab-*` namespaces whose owning pid is not running, SIGKILLing any processes
/// still inside them; returns the deleted names. [`Lab::new`] calls this first.
///
/// Liveness is judged in this process's pid namespace, so labs of processes in other pid
/// namespaces that share `/run/netns` would look stale.
pub fn cleanup_stale_namespaces() -> Result<Vec<String>> {
    cleanup_stale(false)
}

/// [`cleanup_stale_namespaces`]; with `own_pid_is_stale`, also namespaces carrying this
/// process's pid (left by an earlier process that had the same pid).
fn cleanup_stale(own_pid_is_stale: bool) -> Result<Vec<String>> {
    let me = std::process::id();
    let mut removed = Vec::new();
    for ns in netns_list()? {
        let Some(pid) = owner_pid(&ns) else { continue };
        let stale = if pid == me {
            own_pid_is_stale
        } else {
            !pid_alive(pid)
        };
        if !stale {
            continue;
        }
        // Leftovers of a killed run: the namespace is ours, so its processes are too.
        if let Ok(out) = ip(["netns", "pids", &ns]) {
            for p in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(p) = p.parse::<i32>() {
                    // SAFETY: kill(2) has no memory-safety preconditions.
                    let _already_gone = unsafe { libc::kill(p, libc::SIGKILL) };
                }
            }
        }
        // Another process may be cleaning up the same namespace right now.
        if ip(["netns", "del", &ns]).is_ok() || !netns_list()?.contains(&ns) {
            removed.push(ns);
        }
    }
    Ok(removed)
}

/// State shared by a lab, its hosts and its captures.
#[derive(Debug)]
pub(crate) struct LabInner {
    /// The name prefix `mlab-<pid>-<seq>`.
    prefix: String,
    /// Directory for logs and captures.
    pub(crate) dir: PathBuf,
    /// Every process spawned in this lab.
    procs: Mutex<Vec<Arc<Tracked>>>,
    /// Counter for file names.
    seq: AtomicU64,
}

impl LabInner {
    /// A fresh number for file names.
    pub(crate) fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Remembers a spawned process so that the lab's drop stops it.
    fn register(&self, t: Arc<Tracked>) {
        self.procs.lock().unwrap_or_else(|p| p.into_inner()).push(t);
    }
}

/// A set of hosts in network namespaces joined by a bridge; dropping it tears everything down.
#[derive(Debug)]
pub struct Lab {
    inner: Arc<LabInner>,
    tag: String,
    switch_netns: String,
    hosts: Vec<Host>,
    /// Namespaces to delete on drop, in creation order.
    namespaces: Vec<String>,
    tempdir: Option<tempfile::TempDir>,
}

impl Lab {
    /// Builds a lab of `n_hosts` hosts; `tag` only labels logs and the temp directory.
    pub fn new(tag: &str, n_hosts: usize) -> Result<Lab> {
        if n_hosts > MAX_HOSTS {
            return Err(LabError::TooManyHosts {
                requested: n_hosts,
                max: MAX_HOSTS,
            });
        }
        // No lab of this process exists during the first call, so namespaces with our pid
        // are leftovers of an earlier process that had the same pid.
        OWN_PID_CLEANUP.call_once(|| {
            if let Err(e) = cleanup_stale(true) {
                eprintln!("meshd-lab: stale namespace cleanup failed: {e}");
            }
        });
        if let Err(e) = cleanup_stale(false) {
            eprintln!("meshd-lab: stale namespace cleanup failed: {e}");
        }
        let prefix = format!(
            "{NS_PREFIX}{}-{}",
            std::process::id(),
            LAB_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let safe_tag: String = tag
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
            .take(32)
            .collect();
        let tempdir = tempfile::Builder::new()
            .prefix(&format!("{prefix}-{safe_tag}-"))
            .tempdir()
            .map_err(|e| LabError::io("create lab temp dir", e))?;
        let inner = Arc::new(LabInner {
            prefix: prefix.clone(),
            dir: tempdir.path().to_owned(),
            procs: Mutex::new(Vec::new()),
            seq: AtomicU64::new(0),
        });
        let switch_netns = format!("{prefix}-sw");
        let mut lab = Lab {
            inner,
            tag: tag.to_owned(),
            switch_netns: switch_netns.clone(),
            hosts: Vec::new(),
            namespaces: Vec::new(),
            tempdir: Some(tempdir),
        };
        // From here on, an early return drops `lab`, which deletes what was created.
        netns_add(&switch_netns)?;
        lab.namespaces.push(switch_netns.clone());
        // No IPv6 on the switch: its ports would otherwise send ND/MLD noise into captures.
        netns_sysctl(
            &switch_netns,
            &[
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        )?;
        ip_batch(
            &switch_netns,
            "link set lo up\n\
             link add br0 type bridge stp_state 0 forward_delay 0 mcast_snooping 0\n\
             link set br0 up\n",
        )?;
        for _ in 0..n_hosts {
            lab.add_host()?;
        }
        Ok(lab)
    }

    /// Adds one more host, with the next index and its default underlay addresses.
    pub fn add_host(&mut self) -> Result<&Host> {
        let index = self.hosts.len();
        if index >= MAX_HOSTS {
            return Err(LabError::TooManyHosts {
                requested: index + 1,
                max: MAX_HOSTS,
            });
        }
        let name = format!("h{index}");
        let netns = format!("{}-{name}", self.inner.prefix);
        netns_add(&netns)?;
        self.namespaces.push(netns.clone());
        // Set before eth0 exists so that it inherits them: no DAD delay, no router solicitations.
        netns_sysctl(
            &netns,
            &[
                "net.ipv6.conf.default.accept_dad=0",
                "net.ipv6.conf.default.router_solicitations=0",
                "net.ipv6.conf.default.accept_ra=0",
            ],
        )?;
        ip_batch(
            &self.switch_netns,
            &format!(
                "link add {name} type veth peer name eth0 netns {netns}\n\
                 link set {name} master br0 up\n"
            ),
        )?;
        let v4 = underlay_ipv4(index);
        let v6 = underlay_ipv6(index);
        ip_batch(
            &netns,
            &format!(
                "link set lo up\n\
                 addr add {v4}/{UNDERLAY_PREFIX_LEN} dev eth0\n\
                 addr add {v6}/64 dev eth0 nodad\n\
                 link set eth0 up\n"
            ),
        )?;
        self.hosts.push(Host {
            lab: Arc::clone(&self.inner),
            index,
            name,
            netns,
            underlay: Mutex::new(v4),
            underlay6: v6,
        });
        Ok(&self.hosts[index])
    }

    /// All hosts, by index.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Host `index`; panics if there is no such host (use [`Lab::try_host`] to get an error).
    pub fn host(&self, index: usize) -> &Host {
        match self.try_host(index) {
            Ok(h) => h,
            Err(e) => panic!("{e}"),
        }
    }

    /// Host `index`, or [`LabError::NoSuchHost`].
    pub fn try_host(&self, index: usize) -> Result<&Host> {
        self.hosts.get(index).ok_or(LabError::NoSuchHost {
            index,
            count: self.hosts.len(),
        })
    }

    /// The tag given to [`Lab::new`].
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The namespace name prefix, `mlab-<pid>-<seq>`.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The namespace holding the bridge `br0` and the switch-side veth ends `h<i>`.
    pub fn switch_netns(&self) -> &str {
        &self.switch_netns
    }

    /// Every namespace this lab created (switch first).
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// Per-lab directory for logs and captures (removed on drop unless `MESHD_LAB_KEEP=1`).
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Starts tcpdump on `iface` of host `host_idx` with a BPF filter ("" for everything).
    pub fn capture(&self, host_idx: usize, iface: &str, bpf_filter: &str) -> Result<Capture> {
        self.try_host(host_idx)?.capture(iface, bpf_filter)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let procs =
            std::mem::take(&mut *self.inner.procs.lock().unwrap_or_else(|p| p.into_inner()));
        terminate_all(&procs, TERM_GRACE);
        // Hosts first, then the switch; deleting a namespace deletes its veth ends.
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = ip(["netns", "del", ns]) {
                eprintln!("meshd-lab [{}]: {e}", self.tag);
            }
        }
        if let Some(td) = self.tempdir.take() {
            if std::env::var(KEEP_ENV).is_ok_and(|v| v == "1") {
                let kept = td.keep();
                eprintln!("meshd-lab [{}]: kept {}", self.tag, kept.display());
            } else if let Err(e) = td.close() {
                eprintln!("meshd-lab [{}]: removing temp dir: {e}", self.tag);
            }
        }
    }
}

/// One host of a lab: a network namespace with `lo` and `eth0` on the lab bridge.
#[derive(Debug)]
pub struct Host {
    pub(crate) lab: Arc<LabInner>,
    index: usize,
    name: String,
    netns: String,
    underlay: Mutex<Ipv4Addr>,
    underlay6: Ipv6Addr,
}

impl Host {
    /// The host's index in the lab.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The short name, `h<index>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The network namespace name, for `ip netns exec`.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The current IPv4 underlay address of `eth0`.
    pub fn underlay_ip(&self) -> Ipv4Addr {
        *self.underlay.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The IPv6 underlay address of `eth0`, fd00:1::(index+1).
    pub fn underlay_ipv6(&self) -> Ipv6Addr {
        self.underlay6
    }

    /// Replaces the IPv4 address of `eth0` with `new`/24 (roaming); `new` must be in
    /// 198.18.0.0/15, and in 198.18.0.0/24 to stay reachable from the other hosts.
    pub fn set_underlay_ip(&self, new: Ipv4Addr) -> Result<()> {
        if !in_underlay_range(new) {
            return Err(LabError::AddressOutsideUnderlay(new));
        }
        let mut cur = self.underlay.lock().unwrap_or_else(|p| p.into_inner());
        ip(["-n", &self.netns, "-4", "addr", "flush", "dev", "eth0"])?;
        let cidr = format!("{new}/{UNDERLAY_PREFIX_LEN}");
        ip(["-n", &self.netns, "addr", "add", &cidr, "dev", "eth0"])?;
        *cur = new;
        Ok(())
    }

    /// Runs `program args...` in this namespace and returns its output, whatever the exit code.
    pub fn exec<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Cmd::new(program);
        cmd.args(args);
        self.exec_cmd(&cmd)
    }

    /// Like [`Host::exec`] but a non-zero exit is an error carrying stderr.
    pub fn exec_ok<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = self.exec(&program, args)?;
        proc::check_status(&program.as_ref().to_string_lossy(), out)
    }

    /// Runs a [`Cmd`] (with its env, directory and time limit) to completion in this namespace.
    pub fn exec_cmd(&self, cmd: &Cmd) -> Result<Output> {
        let what = format!("ip netns exec {} {}", self.netns, cmd.display());
        run_with_timeout(cmd.in_netns(&self.netns), &what, cmd.exec_timeout(), None)
    }

    /// Starts `cmd` in the background in this namespace; output goes to files in [`Lab::dir`].
    pub fn spawn(&self, cmd: &Cmd) -> Result<ProcHandle> {
        let base = format!("{}-{}-{}", self.name, cmd.file_label(), self.lab.next_seq());
        let (tracked, handle) = proc::spawn_tracked(
            cmd,
            &self.netns,
            self.lab.dir.join(format!("{base}.out")),
            self.lab.dir.join(format!("{base}.err")),
        )?;
        self.lab.register(tracked);
        Ok(handle)
    }

    /// Starts tcpdump on `iface` in this namespace (see [`Lab::capture`]).
    pub fn capture(&self, iface: &str, bpf_filter: &str) -> Result<Capture> {
        Capture::start(self, iface, bpf_filter)
    }

    /// Sends one ping (1 s timeout) to `dst`; true if it was answered.
    pub fn ping(&self, dst: IpAddr) -> Result<bool> {
        let mut cmd = Cmd::new("ping");
        cmd.args(["-n", "-c", "1", "-W", "1"])
            .arg(dst.to_string())
            .timeout(Duration::from_secs(10));
        Ok(self.exec_cmd(&cmd)?.status.success())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ranges() {
        assert_eq!(owner_pid("mlab-123-4-h0"), Some(123));
        assert_eq!(owner_pid("mlab-x-4-h0"), None);
        assert_eq!(owner_pid("other-123-4-h0"), None);
        assert!(in_underlay_range(Ipv4Addr::new(198, 19, 255, 1)));
        assert!(!in_underlay_range(Ipv4Addr::new(198, 20, 0, 1)));
        assert!(!in_underlay_range(Ipv4Addr::new(10, 18, 0, 1)));
        assert_eq!(underlay_ipv4(0), Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(underlay_ipv6(2).to_string(), "fd00:1::3");
    }

    #[test]
    fn wait_for_is_bounded() {
        let start = Instant::now();
        let mut calls = 0;
        assert!(!wait_for(
            Duration::from_millis(50),
            Duration::from_millis(10),
            || {
                calls += 1;
                false
            }
        ));
        assert!(start.elapsed() < Duration::from_secs(1));
        assert!((2..=8).contains(&calls), "{calls} calls");
        let mut n = 0;
        assert!(wait_for(Duration::from_secs(5), Duration::ZERO, || {
            n += 1;
            n == 3
        }));
    }

    #[test]
    fn lab_types_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Lab>();
        check::<Host>();
        check::<ProcHandle>();
        check::<Capture>();
    }
}
