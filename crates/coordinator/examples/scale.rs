//! Scale benchmark: N simulated agents (default 1000) in this process against one coordinator
//! in a child process on loopback. Enrol all, wait for full maps, then change one host's
//! endpoint several times and measure the time until every peer has it (p50/p99/max), plus the
//! coordinator's RSS and CPU time (from /proc/<pid>).
//!
//! `cargo run --release -p meshd-coordinator --example scale -- [AGENTS] [ROUNDS] [GROUPS]`
//!
//! GROUPS = 0 (the default): a full mesh, every host may reach every other. GROUPS = G > 0: the
//! realistic policy of issue 18: hosts in G label groups (`app=g0` …), host i in group i mod G,
//! each group allowed to reach the next 3 (so a host's peers are the 6 groups around its own).
//! Then label rounds follow the endpoint rounds: one host moves to another group, and the work
//! it caused is read from the coordinator's `meshd_coordinator_push_work_total` counters (sessions
//! looked at, pairs and peer sets recomputed, messages and peer records sent), with the time
//! until every host that gains or loses it has its new map.
//!
//! A closed stdout (`... | head -1`) ends it quietly with exit 0.

use std::io::{BufRead as _, Write as _};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshd_agent::{
    client_endpoint, enrol_via, spawn_session, SessionConfig, SessionHandle, SessionState,
};
use meshd_control::api::TokenCreateRequest;
use meshd_control::proto::EndpointReport;
use meshd_control::JoinToken;
use meshd_coordinator::{start, CoordinatorOptions};
use meshd_tunnel::PrivateKey;

fn proc_stat(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    (rss_kb, ticks as f64 / 100.0)
}

/// The policy of `groups` label groups, each reaching the next [`REACH`] (none: a full mesh).
fn policy(groups: usize) -> String {
    if no_peers() {
        return String::new();
    }
    if groups == 0 {
        return "rules:\n  - {name: all, from: {}, to: {}, ports: [any]}\n".into();
    }
    let mut y = String::from("rules:\n");
    for g in 0..groups {
        let to: Vec<String> = (1..=REACH)
            .map(|d| format!("g{}", (g + d) % groups))
            .collect();
        y += &format!(
            "  - {{name: g{g}, from: {{app: g{g}}}, to: {{app: {{in: [{}]}}}}, ports: [tcp/443]}}\n",
            to.join(", ")
        );
    }
    y
}

/// SCALE_NO_PEERS=1: an empty policy (every map empty), to tell what a connected agent costs
/// the coordinator apart from what its peers cost.
fn no_peers() -> bool {
    std::env::var_os("SCALE_NO_PEERS").is_some_and(|v| v == "1")
}

/// Groups a host in group `g` may reach or be reached from (not its own).
fn related(g: usize, groups: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (1..=REACH)
        .flat_map(|d| [(g + d) % groups, (g + groups - d % groups) % groups])
        .filter(|&x| x != g)
        .collect();
    v.sort();
    v.dedup();
    v
}

const REACH: usize = 3;

/// Enrolments tried again (timed out under load).
static RETRIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

async fn serve(dir: &str, groups: usize) -> anyhow::Result<()> {
    let mut o = CoordinatorOptions::new(dir);
    o.listen = "127.0.0.1:0".parse()?;
    o.admin_listen = "127.0.0.1:0".parse()?;
    o.metrics_listen = Some("127.0.0.1:0".parse()?);
    let c = start(o).await?;
    c.admin(meshd_coordinator::AdminOp::PolicyApply(policy(groups)))
        .await?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut tokens = Vec::new();
    for g in 0..groups.max(1) {
        let mut req = TokenCreateRequest::default();
        if groups > 0 {
            req.labels = [("app".to_string(), format!("g{g}"))].into();
        }
        tokens.push(c.create_token(req).await?.token);
    }
    let metrics = c
        .metrics_addr()
        .ok_or_else(|| anyhow::anyhow!("no metrics listener"))?;
    say(format_args!("READY {metrics} {}", tokens.join(" ")))?;
    // Run until stdin closes (the parent exits); a line `label HOST GROUP` moves a host.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(16);
    tokio::task::spawn_blocking(move || {
        let mut s = String::new();
        while std::io::stdin()
            .read_line(&mut s)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            if tx.blocking_send(std::mem::take(&mut s)).is_err() {
                break;
            }
        }
    });
    while let Some(line) = rx.recv().await {
        let mut w = line.split_whitespace();
        if let (Some("label"), Some(host), Some(group)) = (w.next(), w.next(), w.next()) {
            let labels = [("app".to_string(), group.to_string())].into();
            let r = c
                .admin(meshd_coordinator::AdminOp::Label(host.into(), labels))
                .await?;
            say(format_args!("LABELLED {}", r.is_ok()))?;
        }
    }
    c.stop().await;
    Ok(())
}

/// The coordinator's push-work counters, by kind.
fn push_work(metrics: SocketAddr) -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
    let body = ureq_get(metrics)?;
    let mut m = std::collections::BTreeMap::new();
    for l in body.lines() {
        if let Some(rest) = l.strip_prefix("meshd_coordinator_push_work_total{kind=\"") {
            if let Some((k, v)) = rest.split_once("\"} ") {
                m.insert(k.to_string(), v.trim().parse().unwrap_or(f64::NAN));
            }
        }
    }
    Ok(m)
}

/// `GET /metrics` over plain HTTP/1.0 (loopback).
fn ureq_get(addr: SocketAddr) -> anyhow::Result<String> {
    use std::io::Read as _;
    let mut s = std::net::TcpStream::connect(addr)?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Stdout's reader has gone: stop quietly.
#[derive(Debug)]
struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stdout is closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// Prints one line; a closed pipe (EPIPE: Rust ignores SIGPIPE) becomes [`StdoutClosed`].
fn say(line: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    let mut o = std::io::stdout().lock();
    match writeln!(o, "{line}").and_then(|()| o.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        r => Ok(r?),
    }
}

fn main() -> std::process::ExitCode {
    let r = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run()));
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.is::<StdoutClosed>() => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "scale: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("serve") {
        let groups = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(0);
        return serve(&args[2], groups).await;
    }
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let rounds: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let groups: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(0);
    anyhow::ensure!(n >= 2, "at least 2 agents");
    anyhow::ensure!(
        groups == 0 || groups > 2 * REACH,
        "GROUPS is 0 (full mesh) or more than {}",
        2 * REACH
    );
    let dir = tempfile::tempdir()?;
    // The state directory must be private (tempdir makes it 0755).
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )?;
    // SCALE_WRAP=heaptrack (any program taking a command line) runs the coordinator under it
    // (its RSS and CPU figures are then the wrapper's, not the coordinator's).
    let mut cmd = match std::env::var_os("SCALE_WRAP") {
        Some(w) => {
            let mut c = std::process::Command::new(w);
            c.arg(std::env::current_exe()?);
            c
        }
        None => std::process::Command::new(std::env::current_exe()?),
    };
    let mut child = cmd
        .args([
            "serve",
            dir.path().to_str().unwrap_or("."),
            &groups.to_string(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdin"))?;
    let mut out = std::io::BufReader::new(
        child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?,
    );
    let mut line = String::new();
    out.read_line(&mut line)?;
    let mut words = line
        .trim()
        .strip_prefix("READY ")
        .ok_or_else(|| anyhow::anyhow!("bad child output {line:?}"))?
        .split_whitespace();
    let metrics: SocketAddr = words
        .next()
        .ok_or_else(|| anyhow::anyhow!("no metrics address"))?
        .parse()?;
    let tokens: Vec<JoinToken> = words.map(JoinToken::parse).collect::<Result<_, _>>()?;
    let (rss0, _) = proc_stat(pid);
    let shape = if groups == 0 {
        "full mesh".to_string()
    } else {
        format!("{groups} label groups, each reaching {REACH} others")
    };
    say(format_args!(
        "coordinator pid {pid}, idle RSS {:.1} MiB; {n} agents, {shape}",
        rss0 as f64 / 1024.0
    ))?;

    // Host i is in group i mod G; `group` follows the label rounds.
    let mut group: Vec<usize> = (0..n)
        .map(|i| if groups == 0 { 0 } else { i % groups })
        .collect();
    // The hosts whose maps hold host `m` (full mesh: all others).
    let peers_of = |group: &[usize], m: usize| -> Vec<usize> {
        (0..n)
            .filter(|&i| i != m && (groups == 0 || related(group[m], groups).contains(&group[i])))
            .collect()
    };
    let expected: Vec<usize> = if no_peers() {
        vec![0; n]
    } else if groups == 0 {
        vec![n - 1; n]
    } else {
        let mut size = vec![0usize; groups];
        for &g in &group {
            size[g] += 1;
        }
        group
            .iter()
            .map(|&g| related(g, groups).iter().map(|&x| size[x]).sum())
            .collect()
    };

    // A few shared client sockets.
    let eps: Vec<meshd_agent::ClientEndpoint> = (0..8)
        .map(|_| client_endpoint("127.0.0.1:0".parse().unwrap()))
        .collect::<Result<_, _>>()?;
    let t0 = Instant::now();
    // How many agents enrol at once (SCALE_CONCURRENCY, default 64): a real storm is every
    // host at once; the coordinator caps the handshakes it takes on and agents retry.
    let concurrency: usize = std::env::var("SCALE_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut joins = Vec::new();
    for i in 0..n {
        let token = tokens[if groups == 0 { 0 } else { group[i] }].clone();
        let (ep, sem) = (eps[i % eps.len()].clone(), sem.clone());
        joins.push(tokio::spawn(async move {
            let _p = sem.acquire().await;
            let key = PrivateKey::generate();
            let report = EndpointReport {
                addrs: vec![SocketAddr::from((
                    [10, (i >> 16) as u8, (i >> 8) as u8, i as u8],
                    51820,
                ))],
                listen_port: Some(51820),
                transparent: false,
            };
            // As a real agent does: a refused or timed-out enrolment is tried again, with
            // backoff (a real agent without end; here up to 30 times).
            let mut attempt = 0;
            let e = loop {
                match enrol_via(Some(&ep), &token, &format!("h{i}"), &key, report.clone()).await {
                    Ok(e) => break e,
                    Err(e) if attempt < 30 => {
                        attempt += 1;
                        RETRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let _ = e;
                        tokio::time::sleep(Duration::from_millis(200 << attempt.min(5))).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            let mut cfg = SessionConfig::new(e.coordinator, e.coordinator_key, key.clone(), report);
            cfg.endpoint = Some(ep);
            let s = spawn_session(cfg);
            let mut st = s.state();
            st.wait_for(|s| matches!(s, SessionState::Connected { .. }))
                .await?;
            Ok::<_, anyhow::Error>((key, s))
        }));
    }
    let mut agents: Vec<(PrivateKey, SessionHandle)> = Vec::new();
    for j in joins {
        agents.push(j.await??);
    }
    let enrolled = t0.elapsed();
    let work0 = push_work(metrics)?;
    for (i, (_, s)) in agents.iter().enumerate() {
        let want = expected[i];
        let mut m = s.map();
        tokio::time::timeout(
            Duration::from_secs(600),
            m.wait_for(|m| m.as_ref().is_some_and(|m| m.peers.len() == want)),
        )
        .await
        .map_err(|_| anyhow::anyhow!("h{i} never got its {want} peers"))??;
    }
    let converged = t0.elapsed();
    let (rss1, cpu1) = proc_stat(pid);
    let (me_rss, me_cpu) = proc_stat(std::process::id());
    let mean_peers = expected.iter().sum::<usize>() as f64 / n as f64;
    say(format_args!(
        "enrolled+connected {n} ({concurrency} at once) in {enrolled:.2?}; all full maps ({mean_peers:.0} peers each on average) by {converged:.2?}; coordinator RSS {:.1} MiB, CPU {cpu1:.2} s; simulated agents' process RSS {:.1} MiB, CPU {me_cpu:.2} s",
        rss1 as f64 / 1024.0,
        me_rss as f64 / 1024.0,
    ))?;
    say(format_args!(
        "storm work (after all connected): {work0:?}; enrolments retried: {}",
        RETRIES.load(std::sync::atomic::Ordering::Relaxed)
    ))?;

    let mut all = Vec::new();
    for r in 0..rounds {
        let mover = (r * 7919 + 1) % n;
        let k = agents[mover].0.public_key();
        let new_ep = SocketAddr::from(([203, 0, 113, (r % 250) as u8 + 1], 40000 + r as u16));
        let mut waits = Vec::new();
        let start_t = Instant::now();
        for i in peers_of(&group, mover) {
            let mut m = agents[i].1.map();
            waits.push(tokio::spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(30),
                    m.wait_for(|m| {
                        m.as_ref()
                            .and_then(|m| m.peer(&k))
                            .is_some_and(|p| p.endpoints.contains(&new_ep))
                    }),
                )
                .await;
                start_t.elapsed()
            }));
        }
        let before = push_work(metrics)?;
        agents[mover].1.report_endpoints(vec![new_ep]);
        let mut lat = Vec::new();
        for w in waits {
            lat.push(w.await?);
        }
        let work = diff(&before, &push_work(metrics)?);
        let (p50, p99, max) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99), pct(&mut lat, 1.0));
        say(format_args!("round {r}: endpoint change reached {} peers: p50 {p50:.2?} p99 {p99:.2?} max {max:.2?}; work {work}", lat.len()))?;
        all.extend(lat);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (rss2, cpu2) = proc_stat(pid);
    say(format_args!(
        "ALL ROUNDS: n={} p50 {:.2?} p99 {:.2?} max {:.2?}; coordinator RSS {:.1} MiB, CPU total {cpu2:.2} s (changes: {:.2} s)",
        all.len(),
        pct(&mut all, 0.5),
        pct(&mut all, 0.99),
        pct(&mut all, 1.0),
        rss2 as f64 / 1024.0,
        cpu2 - cpu1
    ))?;

    // Label rounds: host m moves from its group to the one opposite; the hosts that held it
    // lose it, those of the new group's neighbours gain it.
    for r in 0..if groups == 0 { 0 } else { rounds } {
        let m = (r * 104_729 + 3) % n;
        let to = (group[m] + groups / 2) % groups;
        let old: std::collections::BTreeSet<usize> = peers_of(&group, m).into_iter().collect();
        let mut moved = group.clone();
        moved[m] = to;
        let new: std::collections::BTreeSet<usize> = peers_of(&moved, m).into_iter().collect();
        let k = agents[m].0.public_key();
        let mut waits = Vec::new();
        let start_t = Instant::now();
        for &i in old.symmetric_difference(&new) {
            let gains = new.contains(&i);
            let mut map = agents[i].1.map();
            waits.push(tokio::spawn(async move {
                let ok = tokio::time::timeout(
                    Duration::from_secs(30),
                    map.wait_for(|x| x.as_ref().is_some_and(|x| x.peer(&k).is_some() == gains)),
                )
                .await
                .is_ok();
                (ok, start_t.elapsed())
            }));
        }
        let before = push_work(metrics)?;
        writeln!(stdin, "label h{m} g{to}")?;
        line.clear();
        out.read_line(&mut line)?;
        anyhow::ensure!(
            line.trim() == "LABELLED true",
            "label change failed: {line:?}"
        );
        group = moved;
        let mut lat = Vec::new();
        let mut missed = 0;
        for w in waits {
            let (ok, t) = w.await?;
            missed += usize::from(!ok);
            lat.push(t);
        }
        let work = diff(&before, &push_work(metrics)?);
        let (p50, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
        say(format_args!(
            "label round {r}: h{m} -> g{to}: {} hosts gain or lose it (of {n}), missed {missed}: p50 {p50:.2?} p99 {p99:.2?}; work {work}",
            lat.len()
        ))?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (rss3, _) = proc_stat(pid);
    say(format_args!(
        "coordinator RSS at the end {:.1} MiB",
        rss3 as f64 / 1024.0
    ))?;
    drop(stdin);
    let _ = child.wait();
    Ok(())
}

/// The counters' growth from `a` to `b`, as `kind=n …`.
fn diff(
    a: &std::collections::BTreeMap<String, f64>,
    b: &std::collections::BTreeMap<String, f64>,
) -> String {
    b.iter()
        .map(|(k, v)| format!("{k}={}", v - a.get(k).copied().unwrap_or(0.0)))
        .collect::<Vec<_>>()
        .join(" ")
}
