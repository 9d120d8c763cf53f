//! SPA filter cost on an established connection (issue 17). The coordinator's control port
//! sits behind [`SpaSocket`]; the tunnel port never does, so what is measured here is a QUIC
//! control connection on 127.0.0.1 with the filter and without.
//!
//! `cargo run --release -p meshd-coordinator --example spa_cost -- [ROUNDS] [MBYTES]`
//!
//! Each round builds two server endpoints in turn, from the same kind of UDP socket the
//! coordinator uses: `on`, the socket wrapped in [`SpaSocket`] with a real [`SpaFilter`] (the
//! client knocks first, as an enrolled host, from its QUIC socket), and `off`, the plain
//! socket. A fresh client endpoint connects with the project's QUIC configs, sends MBYTES MiB
//! (default 256) over one bi stream which the server reads and discards (it answers with the
//! byte count, checked), then runs 20 000 request/response round trips of 64 bytes on a second
//! stream (the server echoes). Rounds alternate on, off, on, off … (ROUNDS pairs, default 6,
//! after one unreported warm-up pair); per-run figures, the medians, and the ratios on/off of
//! throughput and of the round-trip p50 are printed. Every run is bounded by 60 s.
//!
//! The filter's own cost, without QUIC or the kernel: [`SpaFilter::filter_batch`] on batches of
//! 32 datagrams of 1200 bytes from sources that knocked, in ns per datagram (median of 5), for
//! 1 and 1000 open sources.
//!
//! `spa_cost filter on|off [DATAGRAMS] [SOURCES]` runs that loop once (default 1 000 000
//! datagrams, 1 open source), with the filter (`on`) or the same loop without it (`off`), for
//! `valgrind --tool=callgrind`: (on − off) / DATAGRAMS is the filter's instructions per datagram.
//!
//! `spa_cost quic on|off [MBYTES]` runs one QUIC run (no warm-up, no filter loop), for
//! callgrind too: `SpaFilter::filter`'s inclusive share of the process's instructions.

use std::io::IoSliceMut;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use meshd_channel::spa::{fresh_nonce, make_knock, KnockAs, KnockKind, SpaView};
use meshd_coordinator::options::SpaSettings;
use meshd_coordinator::spa::{SpaFilter, SpaSocket};
use meshd_tunnel::{PrivateKey, PublicKey};
use quinn::udp::RecvMeta;

/// Round trips of the ping-pong.
const PINGS: usize = 20_000;
/// Bytes of one ping (and its echo).
const PING_LEN: usize = 64;
/// Write size on the bulk stream.
const CHUNK: usize = 64 * 1024;
/// Longest one run may take.
const RUN_LIMIT: Duration = Duration::from_secs(60);
/// Datagrams per receive batch in the filter loop (quinn-udp's batch on Linux).
const BATCH: usize = 32;
/// Bytes per datagram in the filter loop (a full QUIC packet).
const DGRAM: usize = 1200;
/// The server name the client asks for (the coordinator's certificate's).
const SERVER_NAME: &str = "meshd-coordinator";

/// CPU seconds (user + system) of this process, from /proc/self/stat (100 ticks/s).
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The coordinator's key and a host key it knows, and a filter that lets the host knock.
struct Keys {
    coord: PublicKey,
    host: PrivateKey,
}

fn new_filter(dir: &std::path::Path) -> (Arc<SpaFilter>, Keys) {
    let coord = PrivateKey::generate();
    let host = PrivateKey::generate();
    let coord_pub = coord.public_key();
    let filter = Arc::new(SpaFilter::new(coord, &SpaSettings::default(), dir));
    let mut view = SpaView::default();
    view.hosts.insert(host.public_key());
    filter.set_view(view);
    (
        filter,
        Keys {
            coord: coord_pub,
            host,
        },
    )
}

// ---- the filter alone ----

/// Opens `sources` source addresses (127.0.0.1, ports from 20000) on `filter` by real knocks.
fn open_sources(
    filter: &SpaFilter,
    keys: &Keys,
    sources: usize,
) -> anyhow::Result<Vec<SocketAddr>> {
    if sources == 0 || sources > 2_000 {
        bail!("SOURCES must be 1 to 2000 (the filter verifies 2000 knocks per second at most)");
    }
    let mut addrs = Vec::with_capacity(sources);
    let mut buf = vec![0u8; DGRAM];
    for i in 0..sources {
        let port = u16::try_from(20_000 + i)?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let k = make_knock(
            &keys.coord,
            &keys.host,
            KnockAs::Host,
            meshd_time::unix_millis(),
            fresh_nonce(),
        )
        .map_err(|e| anyhow!("making a knock: {e}"))?;
        buf[..k.len()].copy_from_slice(&k);
        let mut bufs = [IoSliceMut::new(&mut buf[..k.len()])];
        let mut meta = [meta_for(addr, k.len())];
        filter.filter_batch(&mut bufs, &mut meta, 1);
        addrs.push(addr);
    }
    let accepted = filter.counters.accepted(KnockKind::Host);
    if accepted != sources as u64 {
        bail!("{accepted} of {sources} knocks accepted");
    }
    Ok(addrs)
}

fn meta_for(addr: SocketAddr, len: usize) -> RecvMeta {
    RecvMeta {
        addr,
        len,
        stride: len,
        ecn: None,
        dst_ip: None,
    }
}

/// Runs `datagrams` datagrams (rounded up to whole batches) from `addrs` in turn through the
/// filter (`with_filter`) or through the same loop without it; returns the elapsed time.
fn filter_loop(
    filter: &SpaFilter,
    addrs: &[SocketAddr],
    datagrams: usize,
    with_filter: bool,
) -> anyhow::Result<Duration> {
    let mut storage = vec![0u8; BATCH * DGRAM];
    let batches = datagrams.div_ceil(BATCH);
    let mut next = 0usize;
    let mut meta = [meta_for(addrs[0], DGRAM); BATCH];
    let t0 = Instant::now();
    for _ in 0..batches {
        for m in meta.iter_mut() {
            *m = meta_for(addrs[next], DGRAM);
            next = (next + 1) % addrs.len();
        }
        let mut bufs: Vec<IoSliceMut<'_>> =
            storage.chunks_mut(DGRAM).map(IoSliceMut::new).collect();
        let kept = if with_filter {
            filter.filter_batch(&mut bufs, &mut meta, BATCH)
        } else {
            std::hint::black_box((&mut bufs, &mut meta));
            std::hint::black_box(BATCH)
        };
        if kept != BATCH {
            bail!("the filter kept {kept} of {BATCH} datagrams from open sources");
        }
    }
    Ok(t0.elapsed())
}

/// ns per datagram through the filter, median of 5 runs of `datagrams`, and of the bare loop.
fn filter_ns(sources: usize, datagrams: usize) -> anyhow::Result<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let (filter, keys) = new_filter(dir.path());
    let addrs = open_sources(&filter, &keys, sources)?;
    filter_loop(&filter, &addrs, datagrams / 10, true)?;
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        on.push(
            filter_loop(&filter, &addrs, datagrams, true)?.as_nanos() as f64 / datagrams as f64,
        );
        off.push(
            filter_loop(&filter, &addrs, datagrams, false)?.as_nanos() as f64 / datagrams as f64,
        );
    }
    Ok((median(&on), median(&off)))
}

/// `filter on|off [DATAGRAMS] [SOURCES]`: one loop, for callgrind.
fn filter_mode(mut args: impl Iterator<Item = String>) -> anyhow::Result<()> {
    let with_filter = match args.next().as_deref() {
        Some("on") => true,
        Some("off") => false,
        _ => bail!("usage: spa_cost filter on|off [DATAGRAMS] [SOURCES]"),
    };
    let datagrams: usize = args.next().map_or(Ok(1_000_000), |a| a.parse())?;
    let sources: usize = args.next().map_or(Ok(1), |a| a.parse())?;
    if datagrams == 0 || datagrams > 1_000_000_000 {
        bail!("DATAGRAMS must be 1 to 1e9");
    }
    let dir = tempfile::tempdir()?;
    let (filter, keys) = new_filter(dir.path());
    let addrs = open_sources(&filter, &keys, sources)?;
    let took = filter_loop(&filter, &addrs, datagrams, with_filter)?;
    println!(
        "filter {}: {} datagrams ({} batches of {BATCH}) from {sources} open source(s) in {:.3} s",
        if with_filter { "on" } else { "off" },
        datagrams.div_ceil(BATCH) * BATCH,
        datagrams.div_ceil(BATCH),
        took.as_secs_f64()
    );
    Ok(())
}

// ---- QUIC on loopback ----

/// One run's figures.
struct Run {
    mib_s: f64,
    cpu_s_per_gib: f64,
    rtt_p50_us: f64,
    rtt_p99_us: f64,
    server_rx_datagrams: u64,
}

fn server_endpoint(filter: Option<Arc<SpaFilter>>) -> anyhow::Result<quinn::Endpoint> {
    let server_config = meshd_channel::quic::server_config()?;
    let socket = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    let runtime = quinn::default_runtime().ok_or_else(|| anyhow!("no async runtime"))?;
    let mut socket = runtime.wrap_udp_socket(socket)?;
    if let Some(f) = filter {
        socket = Arc::new(SpaSocket::new(socket, f));
    }
    Ok(quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        Some(server_config),
        socket,
        runtime,
    )?)
}

/// The server: one connection; stream 1 read and discarded (answered with its length),
/// stream 2 echoed 64 bytes at a time until the client finishes it. Returns the datagrams the
/// connection received.
async fn serve(endpoint: quinn::Endpoint) -> anyhow::Result<u64> {
    let incoming = endpoint
        .accept()
        .await
        .ok_or_else(|| anyhow!("server endpoint closed"))?;
    let conn = incoming.await?;
    let (mut send, mut recv) = conn.accept_bi().await?;
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    while let Some(n) = recv.read(&mut buf).await? {
        total += n as u64;
    }
    send.write_all(&total.to_le_bytes()).await?;
    send.finish()?;
    let (mut send, mut recv) = conn.accept_bi().await?;
    let mut ping = [0u8; PING_LEN];
    for _ in 0..=PINGS {
        match recv.read_exact(&mut ping).await {
            Ok(()) => send.write_all(&ping).await?,
            Err(quinn::ReadExactError::FinishedEarly(0)) => break,
            Err(e) => return Err(e.into()),
        }
    }
    send.finish()?;
    conn.closed().await;
    Ok(conn.stats().udp_rx.datagrams)
}

async fn run_once(
    filter: Option<Arc<SpaFilter>>,
    keys: &Keys,
    mbytes: usize,
) -> anyhow::Result<Run> {
    let spa = filter.is_some();
    let server = server_endpoint(filter)?;
    let server_addr = server.local_addr()?;
    let serving = tokio::spawn(serve(server.clone()));

    let client = meshd_agent::client_endpoint((Ipv4Addr::LOCALHOST, 0).into())?;
    if spa {
        client.knock(server_addr, &keys.coord, &keys.host, KnockAs::Host)?;
    }
    let conn = client.connect(server_addr, SERVER_NAME)?.await?;

    // Bulk.
    let (mut send, mut recv) = conn.open_bi().await?;
    let chunk = vec![0x5au8; CHUNK];
    let total = (mbytes as u64) << 20;
    let (t0, c0) = (Instant::now(), cpu_secs());
    let mut sent = 0u64;
    while sent < total {
        let n = usize::try_from((total - sent).min(CHUNK as u64))?;
        send.write_all(&chunk[..n]).await?;
        sent += n as u64;
    }
    send.finish()?;
    let answer = recv.read_to_end(8).await?;
    let took = t0.elapsed().as_secs_f64();
    let cpu = cpu_secs() - c0;
    let got = u64::from_le_bytes(
        answer
            .as_slice()
            .try_into()
            .map_err(|_| anyhow!("server answered {} bytes, not 8", answer.len()))?,
    );
    if got != total {
        bail!("server read {got} bytes of {total}");
    }

    // Ping-pong.
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut rtts = Vec::with_capacity(PINGS);
    let mut ping = [0u8; PING_LEN];
    for i in 0..PINGS {
        ping[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let t = Instant::now();
        send.write_all(&ping).await?;
        let mut echo = [0u8; PING_LEN];
        recv.read_exact(&mut echo).await?;
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
        if echo != ping {
            bail!("echo {i} differs");
        }
    }
    send.finish()?;
    if !recv.read_to_end(PING_LEN).await?.is_empty() {
        bail!("server sent more than the echoes");
    }
    conn.close(0u32.into(), b"done");
    let server_rx_datagrams = serving.await??;
    client.wait_idle().await;
    server.close(0u32.into(), b"done");
    server.wait_idle().await;

    rtts.sort_by(f64::total_cmp);
    let mib = total as f64 / f64::from(1u32 << 20);
    Ok(Run {
        mib_s: if took > 0.0 { mib / took } else { f64::NAN },
        cpu_s_per_gib: if mib > 0.0 {
            cpu / mib * 1024.0
        } else {
            f64::NAN
        },
        rtt_p50_us: percentile(&rtts, 0.50),
        rtt_p99_us: percentile(&rtts, 0.99),
        server_rx_datagrams,
    })
}

async fn run_bounded(
    filter: Option<Arc<SpaFilter>>,
    keys: &Keys,
    mbytes: usize,
) -> anyhow::Result<Run> {
    tokio::time::timeout(RUN_LIMIT, run_once(filter, keys, mbytes))
        .await
        .map_err(|_| anyhow!("a run took more than {} s", RUN_LIMIT.as_secs()))?
}

fn quic_mode(rounds: usize, mbytes: usize) -> anyhow::Result<()> {
    if rounds == 0 || rounds > 100 || mbytes == 0 || mbytes > 16_384 {
        bail!("ROUNDS must be 1 to 100, MBYTES 1 to 16384");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let (filter, keys) = new_filter(dir.path());
    let started = Instant::now();
    let mut on: Vec<Run> = Vec::new();
    let mut off: Vec<Run> = Vec::new();
    rt.block_on(async {
        // Warm-up pair, not reported.
        run_bounded(Some(filter.clone()), &keys, mbytes.min(32)).await?;
        run_bounded(None, &keys, mbytes.min(32)).await?;
        for round in 1..=rounds {
            for spa in [true, false] {
                let r = run_bounded(spa.then(|| filter.clone()), &keys, mbytes)
                    .await
                    .with_context(|| format!("round {round} spa {}", if spa { "on" } else { "off" }))?;
                println!(
                    "round {round} spa {:<3}: {mbytes} MiB at {:7.1} MiB/s, cpu {:.2} s/GiB, rtt p50 {:6.1} us p99 {:6.1} us ({PINGS} x {PING_LEN} B), server rx {} datagrams",
                    if spa { "on" } else { "off" },
                    r.mib_s,
                    r.cpu_s_per_gib,
                    r.rtt_p50_us,
                    r.rtt_p99_us,
                    r.server_rx_datagrams
                );
                if spa { on.push(r) } else { off.push(r) }
            }
        }
        anyhow::Ok(())
    })?;
    let med = |v: &[Run], f: fn(&Run) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    let (t_on, t_off) = (med(&on, |r| r.mib_s), med(&off, |r| r.mib_s));
    let (c_on, c_off) = (
        med(&on, |r| r.cpu_s_per_gib),
        med(&off, |r| r.cpu_s_per_gib),
    );
    let (p_on, p_off) = (med(&on, |r| r.rtt_p50_us), med(&off, |r| r.rtt_p50_us));
    let (q_on, q_off) = (med(&on, |r| r.rtt_p99_us), med(&off, |r| r.rtt_p99_us));
    println!("medians of {rounds}: spa on  {t_on:7.1} MiB/s, cpu {c_on:.2} s/GiB, rtt p50 {p_on:6.1} us p99 {q_on:6.1} us");
    println!("medians of {rounds}: spa off {t_off:7.1} MiB/s, cpu {c_off:.2} s/GiB, rtt p50 {p_off:6.1} us p99 {q_off:6.1} us");
    println!(
        "spa on/off: throughput {:.2}x, rtt p50 {:.2}x (cpu per GiB {:.2}x, rtt p99 {:.2}x)",
        t_on / t_off,
        p_on / p_off,
        c_on / c_off,
        q_on / q_off
    );
    println!("quic runs took {:.0} s", started.elapsed().as_secs_f64());

    for sources in [1, 1000] {
        let (ns_on, ns_off) = filter_ns(sources, 2_000_000)?;
        println!(
            "filter alone, {sources} open source(s): {ns_on:.1} ns/datagram through SpaFilter::filter (batches of {BATCH}; the bare loop {ns_off:.1} ns)"
        );
    }
    Ok(())
}

/// `quic on|off [MBYTES]`: one run, for callgrind.
fn quic_once(mut args: impl Iterator<Item = String>) -> anyhow::Result<()> {
    let spa = match args.next().as_deref() {
        Some("on") => true,
        Some("off") => false,
        _ => bail!("usage: spa_cost quic on|off [MBYTES]"),
    };
    let mbytes: usize = args.next().map_or(Ok(8), |a| a.parse())?;
    if mbytes == 0 || mbytes > 16_384 {
        bail!("MBYTES must be 1 to 16384");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let (filter, keys) = new_filter(dir.path());
    let r = rt.block_on(run_bounded(spa.then(|| filter.clone()), &keys, mbytes))?;
    println!(
        "quic spa {}: {mbytes} MiB and {PINGS} round trips, server rx {} datagrams",
        if spa { "on" } else { "off" },
        r.server_rx_datagrams
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).peekable();
    match args.peek().map(String::as_str) {
        Some("filter") => {
            args.next();
            return filter_mode(args);
        }
        Some("quic") => {
            args.next();
            return quic_once(args);
        }
        _ => {}
    }
    let rounds: usize = args.next().map_or(Ok(6), |a| a.parse())?;
    let mbytes: usize = args.next().map_or(Ok(256), |a| a.parse())?;
    quic_mode(rounds, mbytes)
}
