//! Flow ingest benchmark: H simulated hosts (default 1000) each reporting R flow rows
//! (default 100) every 10 s, for M simulated minutes (default 5), driven through the pure
//! coordinator state (`record_flows`, `take_dirty`) and the SQLite store (`commit`, one
//! transaction per simulated second as the actor batches, WAL + synchronous=FULL, in a
//! temporary directory). Reports CPU seconds and store bytes per simulated hour (extrapolated
//! from the run, linearly), and the time to prune the run's rows in 10 000-row batches (and
//! that figure scaled to an hour of rows).
//!
//! `cargo run --release -p meshd-coordinator --example flow_ingest -- [HOSTS] [ROWS] [MINUTES]`

use std::net::IpAddr;
use std::time::Instant;

use meshd_control::flow::{FlowRecord, FlowVerdict};
use meshd_control::proto::EndpointReport;
use meshd_control::state::{ConnId, FlowBatch, FlowLimits, Hello, TokenSpec};
use meshd_control::token::hash_secret;
use meshd_control::CoordinatorState;
use meshd_control::HostId;
use meshd_policy::Direction;
use meshd_store::{SqliteStore, Store};
use meshd_tunnel::PublicKey;

/// CPU seconds (user + system) of this process, from /proc/self/stat (100 ticks/s).
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

fn key(i: usize) -> PublicKey {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    PublicKey(k)
}

fn db_bytes(dir: &std::path::Path) -> u64 {
    ["coordinator.db", "coordinator.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let hosts: usize = args.next().map_or(Ok(1000), |a| a.parse())?;
    let rows: usize = args.next().map_or(Ok(100), |a| a.parse())?;
    let minutes: u64 = args.next().map_or(Ok(5), |a| a.parse())?;
    let interval = 10u64;
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(&dir.path().join("coordinator.db"))?;
    let mut s = CoordinatorState::new("100.64.0.0/10".parse()?, None)?;
    s.set_flow_limits(FlowLimits {
        rows_per_host: rows.max(1),
    });
    let t0 = 1_800_000_000u64;
    s.create_token(t0, TokenSpec::default(), hash_secret(b"bench"))?;
    let ep = EndpointReport {
        addrs: vec![],
        listen_port: Some(51820),
        transparent: false,
    };
    for i in 0..hosts {
        s.connect(
            t0,
            key(i),
            ConnId(i as u64 + 1),
            IpAddr::from([198, 18, (i >> 8) as u8, i as u8]),
            Hello::Enrol {
                secret_hash: hash_secret(b"bench"),
                name: format!("h{i}"),
                endpoints: ep.clone(),
            },
        )
        .map_err(|e| anyhow::anyhow!("enrol h{i}: {e:?}"))?;
        s.set_labels(
            &format!("h{i}"),
            [
                ("app".to_string(), format!("app{}", i % 20)),
                ("env".to_string(), "prod".to_string()),
            ]
            .into(),
        )?;
    }
    let _ = s.poll_pushes();
    store.commit(&s.take_dirty(), &[])?;
    let size0 = db_bytes(dir.path());
    println!(
        "flow ingest: {hosts} hosts x {rows} rows every {interval} s, {minutes} simulated min, \
         SQLite WAL synchronous=FULL, one commit per simulated second"
    );
    let cpu0 = cpu_secs();
    let wall0 = Instant::now();
    let mut stored = 0usize;
    let seconds = minutes * 60;
    let mut commit_max = 0f64;
    for sec in 0..seconds {
        let now = t0 + sec;
        let interval_start = now - now % interval;
        // Each host reports once per interval; a tenth of them in each second.
        for h in (0..hosts).filter(|h| (*h as u64) % interval == sec % interval) {
            let records = (0..rows)
                .map(|r| FlowRecord {
                    peer: key((h + 1 + r % 50) % hosts),
                    direction: if r % 2 == 0 {
                        Direction::Outbound
                    } else {
                        Direction::Inbound
                    },
                    proto: 6,
                    port: 1000 + (r / 50) as u16,
                    packets: 100 + r as u64,
                    bytes: 64_000 + r as u64,
                    flows: 1,
                    first_seen: interval_start,
                    last_seen: now,
                    verdict: FlowVerdict::Allowed,
                    rule: Some("app-to-app".into()),
                })
                .collect();
            let r = s.record_flows(
                now,
                HostId(h as u64 + 1),
                ConnId(h as u64 + 1),
                FlowBatch {
                    interval_start,
                    records,
                    ..Default::default()
                },
            );
            stored += r.stored;
        }
        let d = s.take_dirty();
        let c0 = Instant::now();
        store.commit(&d, &[])?;
        commit_max = commit_max.max(c0.elapsed().as_secs_f64());
    }
    let cpu = cpu_secs() - cpu0;
    let wall = wall0.elapsed().as_secs_f64();
    let bytes = db_bytes(dir.path()).saturating_sub(size0);
    let per_hour = 3600.0 / seconds as f64;
    println!(
        "rows stored: {stored} ({:.0} rows/s simulated)",
        stored as f64 / seconds as f64
    );
    println!(
        "ingest: {cpu:.1} CPU s, {wall:.1} s wall for {seconds} simulated s -> {:.0} CPU s per \
         simulated hour ({:.1}% of one core)",
        cpu * per_hour,
        100.0 * cpu / seconds as f64
    );
    println!("slowest commit: {:.1} ms", commit_max * 1000.0);
    println!(
        "store: {:.1} MB for the run ({:.0} bytes/row) -> {:.2} GB per simulated hour",
        bytes as f64 / 1e6,
        bytes as f64 / stored.max(1) as f64,
        bytes as f64 * per_hour / 1e9
    );
    let p0 = Instant::now();
    let mut pruned = 0u64;
    let mut batches = 0u64;
    let mut batch_max = 0f64;
    loop {
        let b0 = Instant::now();
        let n = store.prune_flows(t0 + seconds + 1, 10_000)?;
        batch_max = batch_max.max(b0.elapsed().as_secs_f64());
        pruned += n;
        batches += 1;
        if n < 10_000 {
            break;
        }
    }
    let prune = p0.elapsed().as_secs_f64();
    println!(
        "pruning: {pruned} rows in {batches} batches of 10000, {prune:.1} s (slowest batch \
         {:.0} ms) -> {:.0} s for an hour of rows",
        batch_max * 1000.0,
        prune * per_hour
    );
    Ok(())
}
