//! Churn soak (issue 18, point 4): two coordinator replicas on one throwaway PostgreSQL
//! server, each a child process of this one (so a SIGKILL is a real crash), and simulated
//! agents in this process. For SECONDS (default 600) it churns, one operation at a time:
//! agents join (a token listing both replicas) and leave (removed through a replica), move
//! (report a new underlay endpoint), change label group, and the policy changes (each group
//! reaching 2 or 3 others); admin calls go to either replica at random. At 30% of the run
//! replica A is killed with SIGKILL, and restarted a while later; at 65% replica B is.
//!
//! After every operation it waits until every agent's map equals the expected state, computed
//! here from the acknowledged operations only: the peer set the policy gives, each peer's
//! labels, its latest reported endpoint among its endpoints, and the same endpoints on every
//! agent that holds it. An operation a replica acknowledged is in the model; one it refused
//! is not (and is counted). At the end, once settled, both replicas must list exactly the
//! model's hosts with their labels (no lost host), every agent's map must equal the expected
//! state (no stale peer, no missed delta), and each replica's RSS must have stayed under
//! SOAK_RSS_MB (default 160 MiB) throughout. Prints the figures; exits 1 on any failure.
//!
//! `cargo run --release -p meshd-coordinator --example soak -- [SECONDS] [AGENTS]`
//! (`scripts/soak.sh` runs it). AGENTS (default 60) is where the population starts; joins
//! and leaves keep it between half and twice that. SOAK_SEED picks the operations.
//! Needs PostgreSQL's server binaries (Debian: `postgresql`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshd_agent::{
    client_endpoint, enrol_via, spawn_session, ClientEndpoint, SessionConfig, SessionHandle,
    SessionState,
};
use meshd_control::api::TokenCreateRequest;
use meshd_control::proto::EndpointReport;
use meshd_control::{JoinToken, Labels};
use meshd_coordinator::{start, AdminOp, AdminReply, CoordinatorOptions};
use meshd_store::DbSpec;
use meshd_tunnel::{PrivateKey, PublicKey};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

/// Label groups (`app=g0` …). More than twice the widest reach, so a group's neighbours on
/// either side are distinct.
const GROUPS: usize = 10;
/// How long to wait for the agents to match the model after one operation.
const SETTLE: Duration = Duration::from_secs(30);
/// After a replica is killed: the agents on it fail over (QUIC's idle time-out, 10 s, then a
/// reconnect to the other address).
const FAILOVER: Duration = Duration::from_secs(45);

/// The policy: group g reaches the next `reach` groups on tcp/443.
fn policy(reach: usize) -> String {
    let mut y = String::from("rules:\n");
    for g in 0..GROUPS {
        let to: Vec<String> = (1..=reach)
            .map(|d| format!("g{}", (g + d) % GROUPS))
            .collect();
        y += &format!(
            "  - {{name: g{g}, from: {{app: g{g}}}, to: {{app: {{in: [{}]}}}}, ports: [tcp/443]}}\n",
            to.join(", ")
        );
    }
    y
}

/// Whether hosts in groups `a` and `b` are peers under `reach` (either may open to the other).
fn related(a: usize, b: usize, reach: usize) -> bool {
    let d = (a + GROUPS - b) % GROUPS;
    a != b && (d <= reach || GROUPS - d <= reach)
}

// ---------------------------------------------------------------- the replicas' side

/// `soak serve DIR DB LISTEN OTHER`: one replica, driven by lines on stdin, one reply line
/// each (`OK …` or `ERR …`).
async fn serve(args: &[String]) -> anyhow::Result<()> {
    let [dir, db, listen, other] = args else {
        anyhow::bail!("serve DIR DB LISTEN OTHER");
    };
    let mut o = CoordinatorOptions::new(dir);
    o.db = Some(DbSpec::Postgres(db.clone()));
    o.listen = listen.parse()?;
    o.replicas = vec![other.parse()?];
    o.admin_listen = "127.0.0.1:0".parse()?;
    o.metrics_listen = Some("127.0.0.1:0".parse()?);
    // A restarted replica binds its port again: retry while the old socket is closing.
    let mut tries = 0;
    let c = loop {
        match start(o.clone()).await {
            Ok(c) => break c,
            Err(e) if tries < 50 => {
                tries += 1;
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let metrics = c
        .metrics_addr()
        .ok_or_else(|| anyhow::anyhow!("no metrics listener"))?;
    let mut out = tokio::io::stdout();
    out.write_all(format!("READY {metrics}\n").as_bytes())
        .await?;
    out.flush().await?;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let w: Vec<&str> = line.split_whitespace().collect();
        let op = match w.as_slice() {
            ["tokens"] => {
                let mut t = Vec::new();
                for g in 0..GROUPS {
                    let req = TokenCreateRequest {
                        labels: group_labels(g),
                        uses: Some(1_000_000),
                        ..Default::default()
                    };
                    t.push(c.create_token(req).await?.token);
                }
                reply(&mut out, Ok(t.join(" "))).await?;
                continue;
            }
            ["label", host, g] => AdminOp::Label(host.to_string(), group_labels(g.parse()?)),
            ["remove", host] => AdminOp::Remove(host.to_string()),
            ["policy", reach] => AdminOp::PolicyApply(policy(reach.parse()?)),
            ["hosts"] => AdminOp::ListHosts,
            ["ping"] => AdminOp::Status,
            _ => {
                reply(&mut out, Err(format!("unknown command {line:?}"))).await?;
                continue;
            }
        };
        let r = match c.admin(op).await {
            Ok(Ok(AdminReply::Hosts(h))) => {
                let h: Vec<(String, Labels, Vec<SocketAddr>)> = h
                    .into_iter()
                    .map(|h| (h.name, h.labels, h.endpoints))
                    .collect();
                Ok(serde_json::to_string(&h)?)
            }
            Ok(Ok(_)) => Ok(String::new()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("{e:#}")),
        };
        reply(&mut out, r).await?;
    }
    c.stop().await;
    Ok(())
}

fn group_labels(g: usize) -> Labels {
    [("app".to_string(), format!("g{g}"))].into()
}

async fn reply(out: &mut tokio::io::Stdout, r: Result<String, String>) -> anyhow::Result<()> {
    let line = match r {
        Ok(s) => format!("OK {s}\n"),
        Err(e) => format!("ERR {}\n", e.replace('\n', " ")),
    };
    out.write_all(line.as_bytes()).await?;
    out.flush().await?;
    Ok(())
}

/// A replica as this process sees it: a child, its control address, its pipes.
struct Replica {
    name: &'static str,
    dir: PathBuf,
    listen: SocketAddr,
    other: SocketAddr,
    db: String,
    child: Option<Child>,
    /// Highest RSS seen (KiB) over all its lives.
    max_rss_kib: u64,
    /// CPU seconds of its earlier lives.
    cpu_before: f64,
    metrics: Option<SocketAddr>,
    /// Push work (`meshd_coordinator_push_work_total` by kind) of its earlier lives.
    work: BTreeMap<String, f64>,
}

struct Child {
    proc: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Replica {
    /// Starts it and waits for `READY`.
    async fn start(&mut self) -> anyhow::Result<Duration> {
        let t = Instant::now();
        let mut proc = tokio::process::Command::new(std::env::current_exe()?)
            .arg("serve")
            .arg(&self.dir)
            .arg(&self.db)
            .arg(self.listen.to_string())
            .arg(self.other.to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = proc.stdin.take().ok_or_else(|| anyhow::anyhow!("stdin"))?;
        let stdout = proc
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("stdout"))?;
        let mut stdout = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
            .await
            .map_err(|_| anyhow::anyhow!("replica {} did not start in 30 s", self.name))??
            .unwrap_or_default();
        let metrics = line
            .strip_prefix("READY ")
            .ok_or_else(|| anyhow::anyhow!("replica {}: {line:?}", self.name))?;
        self.metrics = Some(metrics.parse()?);
        self.child = Some(Child {
            proc,
            stdin,
            stdout,
        });
        Ok(t.elapsed())
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.proc.id())
    }

    /// One command, its reply (`OK` → `Ok(rest)`, `ERR` → `Err(rest)`).
    async fn call(&mut self, cmd: &str) -> anyhow::Result<Result<String, String>> {
        let c = self
            .child
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("replica {} is down", self.name))?;
        c.stdin.write_all(format!("{cmd}\n").as_bytes()).await?;
        c.stdin.flush().await?;
        let line = tokio::time::timeout(Duration::from_secs(30), c.stdout.next_line())
            .await
            .map_err(|_| anyhow::anyhow!("replica {}: no reply to {cmd:?} in 30 s", self.name))??
            .ok_or_else(|| anyhow::anyhow!("replica {} exited", self.name))?;
        Ok(match line.split_once(' ').unwrap_or((line.as_str(), "")) {
            ("OK", rest) => Ok(rest.to_string()),
            (_, rest) => Err(rest.to_string()),
        })
    }

    /// Records RSS now.
    fn sample(&mut self) {
        if let Some(pid) = self.pid() {
            self.max_rss_kib = self.max_rss_kib.max(proc_stat(pid).0);
        }
    }

    fn cpu(&self) -> f64 {
        self.cpu_before + self.pid().map_or(0.0, |p| proc_stat(p).1)
    }

    /// Push work over all its lives (this one read now).
    fn work(&self) -> BTreeMap<String, f64> {
        let mut w = self.work.clone();
        if self.child.is_some() {
            for (k, v) in self.metrics.map(push_work).unwrap_or_default() {
                *w.entry(k).or_default() += v;
            }
        }
        w
    }

    /// SIGKILL, then reaped.
    async fn kill(&mut self) -> anyhow::Result<()> {
        self.sample();
        self.work = self.work();
        self.cpu_before = self.cpu();
        if let Some(mut c) = self.child.take() {
            c.proc.start_kill()?;
            c.proc.wait().await?;
        }
        Ok(())
    }
}

/// A replica's push-work counters by kind (empty if it does not answer).
fn push_work(metrics: SocketAddr) -> BTreeMap<String, f64> {
    use std::io::{Read as _, Write as _};
    let mut body = String::new();
    let read =
        std::net::TcpStream::connect_timeout(&metrics, Duration::from_secs(2)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
            s.read_to_string(&mut body)
        });
    if read.is_err() {
        return BTreeMap::new();
    }
    body.lines()
        .filter_map(|l| l.strip_prefix("meshd_coordinator_push_work_total{kind=\""))
        .filter_map(|rest| rest.split_once("\"} "))
        .filter_map(|(k, v)| Some((k.to_string(), v.trim().parse().ok()?)))
        .collect()
}

/// (VmRSS KiB, CPU seconds user+system) of a process.
fn proc_stat(pid: u32) -> (u64, f64) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0);
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let t: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            Some(t as f64 / 100.0)
        })
        .unwrap_or(0.0);
    (rss, cpu)
}

// ---------------------------------------------------------------- the agents' side

struct Agent {
    key: PublicKey,
    session: SessionHandle,
    group: usize,
    /// The endpoint it reported last.
    endpoint: SocketAddr,
}

/// What the acknowledged operations say the mesh is.
struct Model {
    agents: BTreeMap<String, Agent>,
    reach: usize,
}

impl Model {
    /// The first way an agent's map differs from what it should be, if any.
    fn mismatch(&self) -> Option<String> {
        let mut seen: BTreeMap<String, Vec<SocketAddr>> = BTreeMap::new();
        for (name, a) in &self.agents {
            let map = a.session.map().borrow().clone();
            let Some(map) = map else {
                return Some(format!("{name} has no map"));
            };
            let want: BTreeSet<&str> = self
                .agents
                .iter()
                .filter(|(_, b)| related(a.group, b.group, self.reach))
                .map(|(n, _)| n.as_str())
                .collect();
            let have: BTreeSet<&str> = map.peers.iter().map(|p| p.name.as_str()).collect();
            if want != have {
                let stale: Vec<_> = have.difference(&want).collect();
                let missing: Vec<_> = want.difference(&have).collect();
                return Some(format!(
                    "{name}: stale peers {stale:?}, missing {missing:?}"
                ));
            }
            for p in &map.peers {
                let Some(b) = self.agents.get(&p.name) else {
                    continue;
                };
                if p.public_key != b.key {
                    return Some(format!("{name}: {} has another key", p.name));
                }
                if p.labels != group_labels(b.group) {
                    return Some(format!("{name}: {} labels {:?}", p.name, p.labels));
                }
                if !p.endpoints.contains(&b.endpoint) {
                    return Some(format!(
                        "{name}: {} endpoints {:?} lack {}",
                        p.name, p.endpoints, b.endpoint
                    ));
                }
                let first = seen
                    .entry(p.name.clone())
                    .or_insert_with(|| p.endpoints.clone());
                if *first != p.endpoints {
                    return Some(format!(
                        "{}: endpoints {:?} on {name}, {first:?} elsewhere",
                        p.name, p.endpoints
                    ));
                }
            }
        }
        None
    }

    /// Waits until no agent's map differs; how long it took, or the last difference.
    async fn settle(&self, within: Duration) -> Result<Duration, String> {
        let t = Instant::now();
        loop {
            match self.mismatch() {
                None => return Ok(t.elapsed()),
                Some(m) if t.elapsed() > within => return Err(m),
                Some(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }
}

/// A small deterministic generator (xorshift64*), seeded by SOAK_SEED.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Figures of one kind of operation.
#[derive(Default)]
struct Kind {
    done: usize,
    refused: usize,
    latencies: Vec<Duration>,
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[(((v.len() - 1) as f64) * p).round() as usize]
}

struct Soak {
    replicas: [Replica; 2],
    model: Model,
    tokens: Vec<JoinToken>,
    eps: Vec<ClientEndpoint>,
    next_host: usize,
    rng: Rng,
    kinds: BTreeMap<&'static str, Kind>,
    failures: Vec<String>,
    /// Fail-over: kill → every agent connected to the survivor and matching the model, with
    /// how many agents had to move.
    failovers: Vec<(usize, Duration)>,
    /// Restart → the replica answers an admin call.
    restarts: Vec<Duration>,
}

impl Soak {
    /// A replica to send an admin call to: either live one, at random.
    fn pick(&mut self) -> usize {
        let live: Vec<usize> = (0..2)
            .filter(|&i| self.replicas[i].child.is_some())
            .collect();
        live[self.rng.below(live.len())]
    }

    async fn admin(&mut self, cmd: &str) -> anyhow::Result<Result<String, String>> {
        let i = self.pick();
        self.replicas[i].call(cmd).await
    }

    fn endpoint_for(&mut self, n: usize) -> SocketAddr {
        // Underlay addresses the agents report (never sent to: the map only carries them).
        let r = self.rng.below(250) as u8;
        SocketAddr::from((
            [198, 18, (n % 250) as u8, r + 1],
            40_000 + (n % 20_000) as u16,
        ))
    }

    async fn join(&mut self) -> anyhow::Result<Result<(), String>> {
        let n = self.next_host;
        self.next_host += 1;
        let name = format!("h{n}");
        let group = self.rng.below(GROUPS);
        let endpoint = self.endpoint_for(n);
        let key = PrivateKey::generate();
        let report = EndpointReport {
            addrs: vec![endpoint],
            listen_port: Some(51820),
            transparent: false,
        };
        let ep = self.eps[n % self.eps.len()].clone();
        // Half the hosts get a token naming B first (as made through B), so both replicas
        // serve agents when one is killed.
        let mut token = self.tokens[group].clone();
        if self.rng.below(2) == 1 {
            if let Some(b) = token.replicas.first_mut() {
                std::mem::swap(&mut token.control, b);
            }
        }
        let e = match enrol_via(Some(&ep), &token, &name, &key, report.clone()).await {
            Ok(e) => e,
            Err(e) => return Ok(Err(format!("{name}: {e}"))),
        };
        let mut cfg = SessionConfig::new(e.coordinator, e.coordinator_key, key.clone(), report);
        cfg.fallbacks = e.replicas;
        cfg.endpoint = Some(ep);
        let session = spawn_session(cfg);
        self.model.agents.insert(
            name,
            Agent {
                key: key.public_key(),
                session,
                group,
                endpoint,
            },
        );
        Ok(Ok(()))
    }

    fn random_agent(&mut self) -> Option<String> {
        let n = self.model.agents.len();
        if n == 0 {
            return None;
        }
        self.model.agents.keys().nth(self.rng.below(n)).cloned()
    }

    /// One operation of `kind`; `Ok(false)`: refused (not in the model).
    async fn op(&mut self, kind: &'static str) -> anyhow::Result<bool> {
        let refused = |r: Result<String, String>, what: String| match r {
            Ok(_) => Ok(true),
            Err(e) => {
                eprintln!("soak: {what} refused: {e}");
                Ok(false)
            }
        };
        match kind {
            "join" => match self.join().await? {
                Ok(()) => Ok(true),
                Err(e) => refused(Err(e), "join".into()),
            },
            "leave" => {
                let Some(name) = self.random_agent() else {
                    return Ok(true);
                };
                let r = self.admin(&format!("remove {name}")).await?;
                if r.is_ok() {
                    if let Some(a) = self.model.agents.remove(&name) {
                        a.session.shutdown().await;
                    }
                }
                refused(r, format!("remove {name}"))
            }
            "move" => {
                let Some(name) = self.random_agent() else {
                    return Ok(true);
                };
                let n = self.next_host + self.rng.below(1000);
                let ep = self.endpoint_for(n);
                if let Some(a) = self.model.agents.get_mut(&name) {
                    a.endpoint = ep;
                    a.session.report_endpoints(vec![ep]);
                }
                Ok(true)
            }
            "label" => {
                let Some(name) = self.random_agent() else {
                    return Ok(true);
                };
                let g = self.rng.below(GROUPS);
                let r = self.admin(&format!("label {name} {g}")).await?;
                if r.is_ok() {
                    if let Some(a) = self.model.agents.get_mut(&name) {
                        a.group = g;
                    }
                }
                refused(r, format!("label {name}"))
            }
            "policy" => {
                let reach = if self.model.reach == 3 { 2 } else { 3 };
                let r = self.admin(&format!("policy {reach}")).await?;
                if r.is_ok() {
                    self.model.reach = reach;
                }
                refused(r, format!("policy {reach}"))
            }
            other => anyhow::bail!("unknown operation {other}"),
        }
    }

    fn sample(&mut self) {
        for r in &mut self.replicas {
            r.sample();
        }
    }

    /// Kills replica `i`, waits for every agent to be on the other and up to date, and then
    /// keeps churning while it is down, for `down`.
    async fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        let survivor = self.replicas[1 - i].listen;
        let dead = self.replicas[i].listen;
        let moving = self
            .model
            .agents
            .values()
            .filter(|a| a.session.coordinator() == dead)
            .count();
        println!(
            "soak: SIGKILL replica {} ({moving} agents on it)",
            self.replicas[i].name
        );
        self.replicas[i].kill().await?;
        let t = Instant::now();
        loop {
            let all_on = self.model.agents.values().all(|a| {
                a.session.coordinator() == survivor
                    && matches!(*a.session.state().borrow(), SessionState::Connected { .. })
            });
            if all_on && self.model.mismatch().is_none() {
                break;
            }
            if t.elapsed() > FAILOVER {
                let off: Vec<&String> = self
                    .model
                    .agents
                    .iter()
                    .filter(|(_, a)| a.session.coordinator() != survivor)
                    .map(|(n, _)| n)
                    .collect();
                self.failures.push(format!(
                    "after replica {} was killed, not all agents were on the other within {FAILOVER:?}: {off:?}, {:?}",
                    self.replicas[i].name,
                    self.model.mismatch()
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let f = t.elapsed();
        println!(
            "soak: {} agents on replica {} after {f:.2?}",
            self.model.agents.len(),
            self.replicas[1 - i].name
        );
        self.failovers.push((moving, f));
        Ok(())
    }

    async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        let t = Instant::now();
        self.replicas[i].start().await?;
        match self.replicas[i].call("ping").await? {
            Ok(_) => {}
            Err(e) => self
                .failures
                .push(format!("restarted replica {}: {e}", self.replicas[i].name)),
        }
        let d = t.elapsed();
        println!(
            "soak: replica {} restarted, answering after {d:.2?}",
            self.replicas[i].name
        );
        self.restarts.push(d);
        Ok(())
    }

    /// Both replicas list exactly the model's hosts, with their labels and endpoints agreeing
    /// with the agents' maps.
    async fn check_hosts(&mut self) -> anyhow::Result<()> {
        let want: BTreeMap<String, Labels> = self
            .model
            .agents
            .iter()
            .map(|(n, a)| (n.clone(), group_labels(a.group)))
            .collect();
        for i in 0..2 {
            // A replica follows the other's last commits within a second.
            let t = Instant::now();
            loop {
                let hosts = match self.replicas[i].call("hosts").await? {
                    Ok(j) => serde_json::from_str::<Vec<(String, Labels, Vec<SocketAddr>)>>(&j)?,
                    Err(e) => anyhow::bail!("hosts: {e}"),
                };
                let have: BTreeMap<String, Labels> = hosts
                    .iter()
                    .map(|(n, l, _)| (n.clone(), l.clone()))
                    .collect();
                let endpoints_agree = hosts.iter().all(|(n, _, eps)| {
                    self.model.agents.values().all(|a| {
                        a.session.map().borrow().as_ref().is_none_or(|m| {
                            m.peers.iter().all(|p| p.name != *n || p.endpoints == *eps)
                        })
                    })
                });
                if have == want && endpoints_agree {
                    break;
                }
                if t.elapsed() > Duration::from_secs(10) {
                    let lost: Vec<_> = want.keys().filter(|n| !have.contains_key(*n)).collect();
                    let extra: Vec<_> = have.keys().filter(|n| !want.contains_key(*n)).collect();
                    self.failures.push(format!(
                        "replica {} lists other hosts: lost {lost:?}, extra {extra:?}, endpoints agree {endpoints_agree}",
                        self.replicas[i].name
                    ));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }
}

async fn run(args: &[String]) -> anyhow::Result<bool> {
    let secs: u64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(600);
    let start_agents: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(60);
    let rss_bound_mib: u64 = std::env::var("SOAK_RSS_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(160);
    let seed: u64 = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    let pg = meshd_lab::postgres::Server::start()?;
    let db = pg.url();
    let dirs = [tempfile::tempdir()?, tempfile::tempdir()?];
    for d in &dirs {
        // The state directory must be private.
        std::fs::set_permissions(
            d.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )?;
    }
    let ports = [free_port(0)?, free_port(1)?];
    let addr = |i: usize| SocketAddr::from(([127, 0, 0, 1], ports[i]));
    let replica = |i: usize, name| Replica {
        name,
        dir: dirs[i].path().to_path_buf(),
        listen: addr(i),
        other: addr(1 - i),
        db: db.clone(),
        child: None,
        max_rss_kib: 0,
        cpu_before: 0.0,
        metrics: None,
        work: BTreeMap::new(),
    };
    let mut a = replica(0, "A");
    let mut b = replica(1, "B");
    a.start().await?;
    // Replicas share the coordinator's identity: B starts with A's key file.
    copy_key(&a.dir, &b.dir)?;
    b.start().await?;
    let mut soak = Soak {
        replicas: [a, b],
        model: Model {
            agents: BTreeMap::new(),
            reach: 3,
        },
        tokens: Vec::new(),
        eps: (0..4)
            .map(|_| client_endpoint("127.0.0.1:0".parse().expect("address")))
            .collect::<Result<_, _>>()?,
        next_host: 0,
        rng: Rng(seed | 1),
        kinds: BTreeMap::new(),
        failures: Vec::new(),
        failovers: Vec::new(),
        restarts: Vec::new(),
    };
    if let Err(e) = soak.replicas[0].call(&format!("policy {}", 3)).await? {
        anyhow::bail!("policy: {e}");
    }
    let tokens = match soak.replicas[0].call("tokens").await? {
        Ok(t) => t,
        Err(e) => anyhow::bail!("tokens: {e}"),
    };
    soak.tokens = tokens
        .split_whitespace()
        .map(JoinToken::parse)
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(
        soak.tokens
            .iter()
            .all(|t| t.addresses() == vec![addr(0), addr(1)]),
        "the tokens do not list both replicas"
    );
    // B must know the tokens before an agent it serves uses one: wait for it to follow.
    let t = Instant::now();
    while soak.replicas[1].call("ping").await?.is_err() || t.elapsed() < Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..start_agents {
        if let Err(e) = soak.join().await? {
            anyhow::bail!("initial enrolment: {e}");
        }
    }
    match soak.model.settle(Duration::from_secs(60)).await {
        Ok(d) => println!(
            "soak: {start_agents} agents enrolled and up to date ({d:.2?} after the last), replicas {} and {} on PostgreSQL, {secs} s of churn",
            soak.replicas[0].listen, soak.replicas[1].listen
        ),
        Err(m) => anyhow::bail!("the initial agents never matched the model: {m}"),
    }

    let t0 = Instant::now();
    let total = Duration::from_secs(secs);
    let down = Duration::from_secs((secs / 10).clamp(3, 20));
    // (when, replica, kill?) in order.
    let mut events = vec![
        (total.mul_f64(0.30), 0, true),
        (total.mul_f64(0.30) + down, 0, false),
        (total.mul_f64(0.65), 1, true),
        (total.mul_f64(0.65) + down, 1, false),
    ];
    events.reverse();
    let mut ops = 0usize;
    while t0.elapsed() < total {
        if let Some(&(at, i, kill)) = events.last() {
            if t0.elapsed() >= at {
                events.pop();
                if kill {
                    soak.kill(i).await?;
                } else {
                    soak.restart(i).await?;
                }
                continue;
            }
        }
        let n = soak.model.agents.len();
        let kind = match soak.rng.below(100) {
            0..=14 if n < 2 * start_agents => "join",
            15..=29 if n > start_agents / 2 => "leave",
            30..=59 => "move",
            60..=94 => "label",
            95..=99 => "policy",
            _ => "move",
        };
        let t = Instant::now();
        let acked = soak.op(kind).await?;
        let settled = soak.model.settle(SETTLE).await;
        let k = soak.kinds.entry(kind).or_default();
        if acked {
            k.done += 1;
        } else {
            k.refused += 1;
        }
        match settled {
            Ok(_) => k.latencies.push(t.elapsed()),
            Err(m) => soak.failures.push(format!(
                "after {kind} (op {ops}): not settled in {SETTLE:?}: {m}"
            )),
        }
        ops += 1;
        soak.sample();
        if ops % 200 == 0 {
            println!(
                "soak: {:.0?}: {ops} operations, {} agents, RSS A {} B {} MiB",
                t0.elapsed(),
                soak.model.agents.len(),
                soak.replicas[0].max_rss_kib / 1024,
                soak.replicas[1].max_rss_kib / 1024
            );
        }
        tokio::time::sleep(Duration::from_millis(soak.rng.below(100) as u64)).await;
    }
    for (_, i, kill) in events.into_iter().rev() {
        if !kill && soak.replicas[i].child.is_none() {
            soak.restart(i).await?;
        }
    }

    // Settled: every map as the model says, both replicas list the model's hosts.
    let t = Instant::now();
    let settled = soak.model.settle(Duration::from_secs(60)).await;
    match &settled {
        Ok(_) => println!("soak: settled {:.2?} after the last operation", t.elapsed()),
        Err(m) => soak.failures.push(format!("never settled at the end: {m}")),
    }
    soak.check_hosts().await?;
    soak.sample();

    println!(
        "SOAK {secs} s, seed {seed}: {ops} operations, {} hosts joined in all, {} at the end",
        soak.next_host,
        soak.model.agents.len()
    );
    for (kind, k) in &mut soak.kinds {
        println!(
            "  {kind:<6} {:>5} acknowledged, {:>3} refused; settled on every agent p50 {:.1?} p99 {:.1?} max {:.1?}",
            k.done,
            k.refused,
            pct(&mut k.latencies, 0.5),
            pct(&mut k.latencies, 0.99),
            pct(&mut k.latencies, 1.0)
        );
    }
    println!(
        "  fail-over after SIGKILL (agents that moved, time until every agent was on the survivor and up to date): {:?}",
        soak.failovers
    );
    println!("  restart → answering: {:?}", soak.restarts);
    for r in &soak.replicas {
        let w = r.work();
        let get = |k: &str| w.get(k).copied().unwrap_or(0.0);
        println!(
            "  replica {}: max RSS {:.1} MiB (bound {rss_bound_mib} MiB), CPU {:.1} s; pushed {} messages, {} of them full maps, {} peer records",
            r.name,
            r.max_rss_kib as f64 / 1024.0,
            r.cpu(),
            get("messages"),
            get("full_maps"),
            get("peers_sent")
        );
        if r.max_rss_kib > rss_bound_mib * 1024 {
            soak.failures.push(format!(
                "replica {} RSS {:.1} MiB over the bound {rss_bound_mib} MiB",
                r.name,
                r.max_rss_kib as f64 / 1024.0
            ));
        }
    }
    for a in std::mem::take(&mut soak.model.agents).into_values() {
        a.session.shutdown().await;
    }
    for r in &mut soak.replicas {
        r.kill().await?;
    }
    drop(pg);
    if soak.failures.is_empty() {
        println!("SOAK PASS: no lost host, no stale peer, no missed change, RSS within bound");
        Ok(true)
    } else {
        for f in &soak.failures {
            println!("SOAK FAIL: {f}");
        }
        Ok(false)
    }
}

fn copy_key(from: &Path, to: &Path) -> anyhow::Result<()> {
    let key = meshd_coordinator::KEY_FILE;
    // A replica writes its key file on start; the other must have the same identity.
    let t = Instant::now();
    while !from.join(key).exists() {
        anyhow::ensure!(t.elapsed() < Duration::from_secs(10), "no key file");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::copy(from.join(key), to.join(key))?;
    Ok(())
}

/// A free UDP port on 127.0.0.1 below the ephemeral range (a restarted replica binds it again).
fn free_port(nth: u32) -> anyhow::Result<u16> {
    let start = (std::process::id() * 7 + nth * 1_000) % 10_000;
    (0..10_000)
        .map(|i| 21_000 + ((start + i) % 10_000) as u16)
        .find(|&p| std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok())
        .ok_or_else(|| anyhow::anyhow!("no free UDP port in 21000..31000"))
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("soak: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let r = if args.first().map(String::as_str) == Some("serve") {
        rt.block_on(serve(&args[1..])).map(|()| true)
    } else {
        rt.block_on(run(&args))
    };
    match r {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
