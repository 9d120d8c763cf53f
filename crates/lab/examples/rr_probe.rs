//! A TCP request/response probe in the manner of netperf's TCP_RR (which Debian does not ship):
//! `scripts/bench-tunnel.sh` runs the server in namespace B and the client in A.
//!
//! ```text
//! rr_probe server --listen 0.0.0.0:5202 [--size 1] [--max-conns 64] [--lifetime-secs 3600]
//! rr_probe client --connect 100.64.0.2:5202 [--flows 1] [--secs 10] [--size 1]
//! ```
//!
//! - **Server.** Accepts up to `--max-conns` connections at once (more are closed at once), one
//!   thread each: read exactly `--size` bytes, write `--size` bytes back, until EOF. A connection
//!   idle for 30 s is closed; the process exits after `--lifetime-secs` whatever happens.
//! - **Client.** Opens `--flows` connections (TCP_NODELAY on both ends, as netperf does with
//!   `-D`), waits until all are connected, then each runs transactions back to back — one
//!   request outstanding per connection, like TCP_RR — for `--secs` seconds. Prints one JSON
//!   line: transactions, transactions/s, mean, p50, p99 and max latency in microseconds
//!   (percentiles from a log-linear histogram, within 1.6%). Exits non-zero if a connection
//!   could not be made or failed during the run.
//!
//! Standard library only; every socket operation has a timeout.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// Socket read/write timeout on the client (one transaction slower than this is a failure).
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// A server connection idle this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request/response size accepted.
const MAX_SIZE: usize = 65_536;
/// Most concurrent flows the client opens.
const MAX_FLOWS: usize = 1024;
/// Longest client run.
const MAX_SECS: u64 = 3600;

fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rr_probe: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> String {
    "usage: rr_probe server --listen ADDR:PORT [--size N] [--max-conns N] [--lifetime-secs N]\n\
     \x20      rr_probe client --connect ADDR:PORT [--flows N] [--secs N] [--size N]"
        .into()
}

/// Parsed `--name value` options, each allowed once.
struct Opts(Vec<(String, String)>);

impl Opts {
    fn parse(args: &[String], known: &[&str]) -> Result<Self, String> {
        let mut out: Vec<(String, String)> = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let name = a
                .strip_prefix("--")
                .filter(|n| known.contains(n))
                .ok_or_else(|| format!("unknown argument '{a}'\n{}", usage()))?;
            let v = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
            if out.iter().any(|(n, _)| n == name) {
                return Err(format!("--{name} given twice"));
            }
            out.push((name.to_string(), v.clone()));
        }
        Ok(Opts(out))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// A number in `1..=max`, or `default` when absent.
    fn num(&self, name: &str, default: u64, max: u64) -> Result<u64, String> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => match v.parse::<u64>() {
                Ok(n) if (1..=max).contains(&n) => Ok(n),
                _ => Err(format!(
                    "--{name} must be a number from 1 to {max}, not '{v}'"
                )),
            },
        }
    }

    fn addr(&self, name: &str) -> Result<SocketAddr, String> {
        let v = self
            .get(name)
            .ok_or_else(|| format!("--{name} ADDR:PORT is required\n{}", usage()))?;
        v.to_socket_addrs()
            .map_err(|e| format!("--{name} '{v}': {e}"))?
            .next()
            .ok_or_else(|| format!("--{name} '{v}': no address"))
    }
}

fn run(args: Vec<String>) -> Result<(), String> {
    let (mode, rest) = args.split_first().ok_or_else(usage)?;
    match mode.as_str() {
        "server" => {
            let o = Opts::parse(rest, &["listen", "size", "max-conns", "lifetime-secs"])?;
            server(
                o.addr("listen")?,
                o.num("size", 1, MAX_SIZE as u64)? as usize,
                o.num("max-conns", 64, 4096)? as usize,
                Duration::from_secs(o.num("lifetime-secs", 3600, 86_400)?),
            )
        }
        "client" => {
            let o = Opts::parse(rest, &["connect", "flows", "secs", "size"])?;
            client(
                o.addr("connect")?,
                o.num("flows", 1, MAX_FLOWS as u64)? as usize,
                Duration::from_secs(o.num("secs", 10, MAX_SECS)?),
                o.num("size", 1, MAX_SIZE as u64)? as usize,
            )
        }
        _ => Err(usage()),
    }
}

fn server(
    listen: SocketAddr,
    size: usize,
    max_conns: usize,
    lifetime: Duration,
) -> Result<(), String> {
    let listener = TcpListener::bind(listen).map_err(|e| format!("binding {listen}: {e}"))?;
    std::thread::spawn(move || {
        std::thread::sleep(lifetime);
        eprintln!(
            "rr_probe: lifetime of {} s over, exiting",
            lifetime.as_secs()
        );
        std::process::exit(0);
    });
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        if active.fetch_add(1, Ordering::SeqCst) >= max_conns {
            active.fetch_sub(1, Ordering::SeqCst);
            continue; // dropped: closed
        }
        let active = Arc::clone(&active);
        std::thread::spawn(move || {
            let _ = echo(stream, size);
            active.fetch_sub(1, Ordering::SeqCst);
        });
    }
    Ok(())
}

/// Answers each `size`-byte request with `size` bytes until EOF, an error or idleness.
fn echo(mut s: TcpStream, size: usize) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IDLE_TIMEOUT))?;
    s.set_write_timeout(Some(IDLE_TIMEOUT))?;
    let mut buf = vec![0u8; size];
    loop {
        s.read_exact(&mut buf)?;
        s.write_all(&buf)?;
    }
}

fn client(addr: SocketAddr, flows: usize, secs: Duration, size: usize) -> Result<(), String> {
    let mut streams = Vec::with_capacity(flows);
    for i in 0..flows {
        let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .map_err(|e| format!("connecting flow {i} to {addr}: {e}"))?;
        s.set_nodelay(true)
            .and_then(|()| s.set_read_timeout(Some(IO_TIMEOUT)))
            .and_then(|()| s.set_write_timeout(Some(IO_TIMEOUT)))
            .map_err(|e| format!("setting up flow {i}: {e}"))?;
        streams.push(s);
    }
    let barrier = Arc::new(Barrier::new(flows));
    let workers: Vec<_> = streams
        .into_iter()
        .map(|s| {
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || flow(s, size, secs, &barrier))
        })
        .collect();
    let mut total = Hist::new();
    let mut elapsed = Duration::ZERO;
    let mut errors = Vec::new();
    for w in workers {
        match w.join() {
            Ok(r) => {
                total.merge(&r.hist);
                elapsed = elapsed.max(r.elapsed);
                if let Some(e) = r.error {
                    errors.push(e);
                }
            }
            Err(_) => errors.push("a flow thread panicked".into()),
        }
    }
    let secs_run = elapsed.as_secs_f64();
    let tps = if secs_run > 0.0 {
        total.count as f64 / secs_run
    } else {
        0.0
    };
    let us = |ns: u64| ns as f64 / 1000.0;
    println!(
        "{{\"flows\":{flows},\"size\":{size},\"secs\":{secs_run:.3},\"transactions\":{},\
         \"tps\":{tps:.1},\"mean_us\":{:.1},\"p50_us\":{:.1},\"p99_us\":{:.1},\"max_us\":{:.1},\
         \"errors\":{}}}",
        total.count,
        us(total.mean()),
        us(total.percentile(50.0)),
        us(total.percentile(99.0)),
        us(total.max),
        errors.len()
    );
    match errors.first() {
        None => Ok(()),
        Some(e) => Err(format!(
            "{} of {flows} flows failed, first: {e}",
            errors.len()
        )),
    }
}

struct FlowResult {
    hist: Hist,
    elapsed: Duration,
    error: Option<String>,
}

/// One connection's transactions, back to back, from the barrier until `secs` have passed.
fn flow(mut s: TcpStream, size: usize, secs: Duration, barrier: &Barrier) -> FlowResult {
    let mut hist = Hist::new();
    let req = vec![0x5au8; size];
    let mut resp = vec![0u8; size];
    barrier.wait();
    let start = Instant::now();
    let deadline = start + secs;
    let mut error = None;
    let mut last = start;
    while last < deadline {
        if let Err(e) = s.write_all(&req).and_then(|()| s.read_exact(&mut resp)) {
            error = Some(e.to_string());
            break;
        }
        let now = Instant::now();
        hist.record((now - last).as_nanos().min(u64::MAX as u128) as u64);
        last = now;
    }
    FlowResult {
        hist,
        elapsed: last - start,
        error,
    }
}

/// Log-linear histogram of nanoseconds: exact below 128, then 64 buckets per power of two.
struct Hist {
    buckets: Vec<u64>,
    count: u64,
    sum: u128,
    max: u64,
}

const SUB_BITS: u32 = 6;
const SUB: usize = 1 << SUB_BITS;
const BUCKETS: usize = (64 - SUB_BITS as usize + 1) * SUB;

impl Hist {
    fn new() -> Self {
        Hist {
            buckets: vec![0; BUCKETS],
            count: 0,
            sum: 0,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < (2 * SUB) as u64 {
            return v as usize;
        }
        let e = 63 - v.leading_zeros(); // >= SUB_BITS + 1
        let shift = e - SUB_BITS;
        ((shift as usize) * SUB) + (v >> shift) as usize
    }

    /// The middle of bucket `i`'s range.
    fn value(i: usize) -> u64 {
        if i < 2 * SUB {
            return i as u64;
        }
        let shift = (i / SUB - 1) as u32;
        let m = (i % SUB + SUB) as u64;
        (m << shift) + ((1u64 << shift) >> 1)
    }

    fn record(&mut self, ns: u64) {
        self.buckets[Self::index(ns)] += 1;
        self.count += 1;
        self.sum += u128::from(ns);
        self.max = self.max.max(ns);
    }

    fn merge(&mut self, o: &Hist) {
        for (a, b) in self.buckets.iter_mut().zip(&o.buckets) {
            *a += b;
        }
        self.count += o.count;
        self.sum += o.sum;
        self.max = self.max.max(o.max);
    }

    fn mean(&self) -> u64 {
        if self.count == 0 {
            return 0;
        }
        (self.sum / u128::from(self.count)) as u64
    }

    /// The value below which `p` percent of the samples lie (bucket middle), 0 when empty.
    fn percentile(&self, p: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((p / 100.0) * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Self::value(i).min(self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::Hist;

    #[test]
    fn buckets_are_contiguous_and_within_two_percent() {
        let mut prev = 0;
        for v in (0..200_000u64).chain([1 << 40, u64::MAX]) {
            let i = Hist::index(v);
            assert!(i >= prev && i < super::BUCKETS, "v={v} i={i}");
            prev = i;
            let mid = Hist::value(i) as f64;
            assert!(
                (mid - v as f64).abs() <= v as f64 * 0.016 + 0.5,
                "v={v} mid={mid}"
            );
        }
    }

    #[test]
    fn percentiles_of_a_uniform_run() {
        let mut h = Hist::new();
        for v in 1..=10_000u64 {
            h.record(v * 1000);
        }
        let p50 = h.percentile(50.0) as f64;
        let p99 = h.percentile(99.0) as f64;
        assert!((p50 - 5_000_000.0).abs() < 5_000_000.0 * 0.02, "p50={p50}");
        assert!((p99 - 9_900_000.0).abs() < 9_900_000.0 * 0.02, "p99={p99}");
        assert_eq!(h.count, 10_000);
        assert_eq!(h.max, 10_000_000);
    }
}
