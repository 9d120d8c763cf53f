//! Scale benchmark: N simulated agents (default 1000) in this process against one coordinator
//! in a child process on loopback. Enrol all, wait for full maps, then change one host's
//! endpoint several times and measure the time until every peer has it (p50/p99/max), plus the
//! coordinator's RSS and CPU time (from /proc/<pid>).
//!
//! `cargo run --release -p meshd-coordinator --example scale -- [AGENTS] [ROUNDS]`
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

async fn serve(dir: &str) -> anyhow::Result<()> {
    let mut o = CoordinatorOptions::new(dir);
    o.listen = "127.0.0.1:0".parse()?;
    o.admin_listen = "127.0.0.1:0".parse()?;
    let c = start(o).await?;
    // Full mesh: every agent may reach every other (default deny otherwise).
    let allow_all = "rules:\n  - {name: all, from: {}, to: {}, ports: [any]}\n";
    c.admin(meshd_coordinator::AdminOp::PolicyApply(allow_all.into()))
        .await?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let t = c.create_token(TokenCreateRequest::default()).await?;
    say(format_args!("READY {}", t.token))?;
    // Run until stdin closes (the parent exits).
    tokio::task::spawn_blocking(|| {
        let mut s = String::new();
        while std::io::stdin()
            .read_line(&mut s)
            .map(|n| n > 0)
            .unwrap_or(false)
        {}
    })
    .await?;
    c.stop().await;
    Ok(())
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
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
        return serve(&args[2]).await;
    }
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let rounds: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let dir = tempfile::tempdir()?;
    // The state directory must be private (tempdir makes it 0755).
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )?;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["serve", dir.path().to_str().unwrap_or(".")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let mut line = String::new();
    std::io::BufReader::new(
        child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?,
    )
    .read_line(&mut line)?;
    let token = JoinToken::parse(
        line.trim()
            .strip_prefix("READY ")
            .ok_or_else(|| anyhow::anyhow!("bad child output {line:?}"))?,
    )?;
    let (rss0, _) = proc_stat(pid);
    say(format_args!(
        "coordinator pid {pid}, idle RSS {:.1} MiB; {n} agents",
        rss0 as f64 / 1024.0
    ))?;

    // A few shared client sockets.
    let eps: Vec<meshd_agent::ClientEndpoint> = (0..8)
        .map(|_| client_endpoint("127.0.0.1:0".parse().unwrap()))
        .collect::<Result<_, _>>()?;
    let t0 = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut joins = Vec::new();
    for i in 0..n {
        let (token, ep, sem) = (token.clone(), eps[i % eps.len()].clone(), sem.clone());
        joins.push(tokio::spawn(async move {
            let _p = sem.acquire().await;
            let key = PrivateKey::generate();
            let report = EndpointReport {
                addrs: vec![SocketAddr::from(([10, (i >> 8) as u8, i as u8, 1], 51820))],
                listen_port: Some(51820),
                transparent: false,
            };
            let e = enrol_via(Some(&ep), &token, &format!("h{i}"), &key, report.clone()).await?;
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
    for (_, s) in &agents {
        let mut m = s.map();
        m.wait_for(|m| m.as_ref().is_some_and(|m| m.peers.len() == n - 1))
            .await?;
    }
    let converged = t0.elapsed();
    let (rss1, cpu1) = proc_stat(pid);
    say(format_args!(
        "enrolled+connected {n} in {enrolled:.2?}; all full maps ({} peers each) by {converged:.2?}; coordinator RSS {:.1} MiB, CPU {cpu1:.2} s",
        n - 1,
        rss1 as f64 / 1024.0
    ))?;

    let mut all = Vec::new();
    for r in 0..rounds {
        let mover = r % n;
        let k = agents[mover].0.public_key();
        let new_ep = SocketAddr::from(([203, 0, 113, (r % 250) as u8 + 1], 40000 + r as u16));
        let mut waits = Vec::new();
        let start_t = Instant::now();
        for (i, (_, s)) in agents.iter().enumerate() {
            if i == mover {
                continue;
            }
            let mut m = s.map();
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
        agents[mover].1.report_endpoints(vec![new_ep]);
        let mut lat = Vec::new();
        for w in waits {
            lat.push(w.await?);
        }
        let (p50, p99, max) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99), pct(&mut lat, 1.0));
        say(format_args!("round {r}: endpoint change reached {} peers: p50 {p50:.2?} p99 {p99:.2?} max {max:.2?}", lat.len()))?;
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
    drop(child.stdin.take());
    let _ = child.wait();
    Ok(())
}
