//! `meshd`: the mesh daemon. `meshd up` runs a host's tunnels; `meshd genkey`/`pubkey` make
//! keys; `meshd status` shows peers like `wg show`.

use meshd::{routes, status, up};

use std::io::{Read as _, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser, Subcommand};
use meshd_tunnel::PrivateKey;

/// `0.1.0 (abc1234)`: the crate version and the git commit it was built from (`-dirty` when
/// tracked files had changes, `unknown` without git; see build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("MESHD_GIT_COMMIT"),
    ")"
);

/// Zero-trust encryption mesh: WireGuard-protocol tunnels between labelled hosts.
#[derive(Parser)]
#[command(name = "meshd", version = VERSION, about)]
// pub(crate): examples/mangen.rs includes this file as a module to render the man pages.
pub(crate) struct Cli {
    /// More logging (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Log line format on stderr: `text` (the default, terminal or not) or `json` (one
    /// object per line, fields in docs/LOGGING.md). Wins over `log_format` in the config file.
    #[arg(
        long,
        value_name = "text|json",
        global = true,
        env = "MESHD_LOG_FORMAT"
    )]
    log_format: Option<meshd_config::LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a new base64 X25519 private key (like `wg genkey`).
    Genkey,
    /// Read a private key on stdin, print its public key (like `wg pubkey`).
    Pubkey,
    /// Bring the mesh interface up and run in the foreground until SIGTERM/SIGINT.
    Up(up::UpArgs),
    /// Run the coordinator: enrols hosts, hands out peers and keys, pushes changes.
    // Boxed: the coordinator's flags are far larger than any other command's.
    Coordinator(Box<meshd_coordinator::CoordinatorArgs>),
    /// Show the interface and its peers (like `wg show`).
    Status {
        /// Interface name.
        #[arg(short, long, default_value = "mesh0")]
        interface: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove what meshd leaves installed on purpose when it dies (transparent mode's
    /// fail-closed guard: the policy-routing rules, the routes and `unreachable` guards in
    /// its table, the nft tables). A clean stop (SIGTERM) does this itself; run it after a
    /// crash when uninstalling. Refused while meshd runs on the interface.
    Down {
        /// Interface name.
        #[arg(short, long, default_value = "mesh0")]
        interface: String,
    },
    /// Parse and validate a config file, then exit (0 if valid).
    CheckConfig {
        /// The TOML file.
        config: PathBuf,
    },
    /// Print shell completions.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Send one SPA knock to a coordinator (debugging: the agent knocks by itself before each
    /// connect). As a host (`--key-file`, `--coordinator`, `--coordinator-key`) or with a join
    /// token (`--token`, which names the coordinator). Needs no privileges.
    Knock {
        /// Knock with this join token (`meshd1-…`), as an enrolling host.
        #[arg(long, value_name = "TOKEN", conflicts_with = "key_file")]
        token: Option<String>,
        /// Knock as the host with this private key file.
        #[arg(long, value_name = "FILE", requires_all = ["coordinator", "coordinator_key"])]
        key_file: Option<PathBuf>,
        /// The coordinator's control address (with --key-file).
        #[arg(long, value_name = "ADDR:PORT")]
        coordinator: Option<std::net::SocketAddr>,
        /// The coordinator's static public key (with --key-file).
        #[arg(long, value_name = "KEY")]
        coordinator_key: Option<String>,
    },
}

/// `meshd knock`: builds the knock and sends it from a plain UDP socket.
fn knock(
    token: Option<String>,
    key_file: Option<PathBuf>,
    coordinator: Option<std::net::SocketAddr>,
    coordinator_key: Option<String>,
) -> anyhow::Result<String> {
    use meshd_channel::spa::{self, KnockAs};
    let hash;
    let (to, ckey, key, who, what) = match (token, key_file) {
        (Some(t), _) => {
            let t = meshd_control::JoinToken::parse(&t).context("--token")?;
            hash = t.secret.hash();
            (
                t.control,
                t.coordinator_key,
                PrivateKey::generate(),
                KnockAs::JoinToken(&hash),
                "join-token",
            )
        }
        (None, Some(f)) => {
            let key = meshd_config::load_private_key(&f)
                .with_context(|| format!("reading {}", f.display()))?;
            let (Some(to), Some(k)) = (coordinator, coordinator_key) else {
                anyhow::bail!("--key-file needs --coordinator and --coordinator-key");
            };
            let k: meshd_tunnel::PublicKey = k
                .trim()
                .parse()
                .map_err(|e| anyhow::anyhow!("--coordinator-key: {e}"))?;
            (to, k, key, KnockAs::Host, "host")
        }
        (None, None) => anyhow::bail!(
            "knock as whom: --token, or --key-file with --coordinator and --coordinator-key"
        ),
    };
    let k = spa::make_knock(
        &ckey,
        &key,
        who,
        meshd_time::unix_millis(),
        spa::fresh_nonce(),
    )
    .context("building the knock")?;
    let bind: std::net::SocketAddr = if to.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = std::net::UdpSocket::bind(bind).context("opening a UDP socket")?;
    let n = s
        .send_to(&k, to)
        .with_context(|| format!("sending the knock to {to}"))?;
    let from = s
        .local_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    Ok(format!(
        "sent a {n}-byte {what} knock to {to} from {from} (static key {}); it opens {from} for the coordinator's window",
        key.public_key()
    ))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = cli
        .log_format
        .or_else(|| configured_log_format(&cli.command))
        .unwrap_or_default();
    init_logging(cli.verbose, format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // `meshd status | head`: the reader has what it wanted.
        Err(e) if e.is::<StdoutClosed>() => ExitCode::SUCCESS,
        Err(e) => {
            // Not `eprintln!`: it panics when stderr is a closed pipe.
            let _ = writeln!(std::io::stderr(), "meshd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Stdout is a pipe whose reader has gone (`meshd status | head -1`): stop quietly, exit 0.
///
/// Rust ignores SIGPIPE, so a write to such a pipe fails with `EPIPE` (and `println!` would
/// panic). SIGPIPE is not restored to its default instead: that would also kill meshd on a
/// write to a closed socket (the status socket, a reset TLS connection, a daemon's log pipe)
/// without a word, where an error naming the cause is wanted.
#[derive(Debug)]
struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stdout is closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// Writes to stdout through its lock and flushes; a closed pipe becomes [`StdoutClosed`].
fn out(f: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> anyhow::Result<()> {
    let mut o = std::io::stdout().lock();
    match f(&mut o).and_then(|()| o.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        r => r.context("writing to stdout"),
    }
}

/// The config file's `log_format` (static mode's `[interface]`, the coordinator's file).
/// A file that cannot be read is reported by the command itself, once logging is set up.
fn configured_log_format(command: &Command) -> Option<meshd_config::LogFormat> {
    match command {
        Command::Up(args) => args.log_format(),
        Command::Coordinator(args) => args.log_format(),
        _ => None,
    }
}

/// Logs to stderr in `format`; text is coloured only when stderr is a terminal (and
/// `NO_COLOR` is unset), so a journal or a log file gets no escape codes.
fn init_logging(verbose: u8, format: meshd_config::LogFormat) {
    use std::io::IsTerminal as _;
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A log line that cannot be written (stderr a closed pipe) is lost, not reported with
        // `eprintln!`, which would panic and take the daemon down.
        .log_internal_errors(false);
    match format {
        meshd_config::LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .init(),
        // docs/LOGGING.md: `timestamp`, `level`, `target`, `message` and the event's fields,
        // all at the top level; no span keys (meshd records no spans), so the keys are fixed.
        meshd_config::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Genkey => {
            let key = PrivateKey::generate();
            out(|w| writeln!(w, "{}", key.to_base64()))
        }
        Command::Pubkey => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the private key from stdin")?;
            let key: PrivateKey = s
                .trim()
                .parse()
                .context("stdin does not hold a base64 private key")?;
            out(|w| writeln!(w, "{}", key.public_key().to_base64()))
        }
        Command::Up(args) => up::run(args),
        Command::Coordinator(args) => run_coordinator(*args),
        Command::Status { interface, json } => {
            let s = status::fetch(&interface)?;
            if json {
                let text = serde_json::to_string_pretty(&s)?;
                out(|w| writeln!(w, "{text}"))
            } else {
                out(|w| status::print(w, &s))
            }
        }
        Command::Down { interface } => down(&interface),
        Command::CheckConfig { config } => {
            let cfg = meshd_config::Config::load(&config)?;
            let key = cfg.load_private_key()?;
            cfg.check_own_key(&key.public_key())?;
            out(|w| writeln!(w, "{}: ok ({} peers)", config.display(), cfg.peers.len()))
        }
        Command::Knock {
            token,
            key_file,
            coordinator,
            coordinator_key,
        } => {
            let line = knock(token, key_file, coordinator, coordinator_key)?;
            out(|w| writeln!(w, "{line}"))
        }
        Command::Completions { shell } => {
            // Into a buffer first: clap_complete panics on a failed write.
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "meshd", &mut buf);
            out(|w| w.write_all(&buf))
        }
    }
}

/// `meshd down`: removes the guard a crashed meshd left on `interface`.
fn down(interface: &str) -> anyhow::Result<()> {
    if status::fetch(interface).is_ok() {
        anyhow::bail!(
            "meshd is running on {interface}; stop it with SIGTERM (a clean stop removes its \
             host state itself)"
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(meshd_hostnet::remove(
        interface,
        meshd_hostnet::DEFAULT_TABLE,
    ))
    .with_context(|| format!("removing meshd's host state for {interface}"))?;
    let overlay = rt
        .block_on(routes::remove_guards())
        .context("removing the overlay guards")?;
    println!(
        "{interface}: meshd's rules, routes, guards and nft tables removed \
         ({overlay} overlay guards)"
    );
    Ok(())
}

/// `meshd coordinator migrate --from sqlite:PATH --to postgres://…`.
fn migrate_db(from: &meshd_store::DbSpec, to: &meshd_store::DbSpec) -> anyhow::Result<()> {
    use meshd_store::DbSpec;
    let (DbSpec::Sqlite(path), DbSpec::Postgres(url)) = (from, to) else {
        anyhow::bail!(
            "migrate copies a SQLite database into PostgreSQL: --from sqlite:PATH --to \
             postgres://USER@HOST/DB (given --from {from} --to {to})"
        );
    };
    let counts = meshd_store::transfer::sqlite_to_postgres(path, url)
        .with_context(|| format!("migrating {from} to {to}"))?;
    for c in &counts {
        println!("{:<18} {:>10} rows", c.table, c.rows);
    }
    let total: i64 = counts.iter().map(|c| c.rows).sum();
    println!(
        "migrated {from} to {to}: {} tables, {total} rows, every count verified; \
         start the coordinator with --db {to}",
        counts.len()
    );
    Ok(())
}

fn run_coordinator(args: meshd_coordinator::CoordinatorArgs) -> anyhow::Result<()> {
    if let Some(meshd_coordinator::CoordinatorCommand::Migrate { from, to }) = &args.command {
        return migrate_db(from, to);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (trigger, shutdown) = meshd_coordinator::Shutdown::new();
        let opts = args.resolve(shutdown)?;
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            if let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            trigger.trigger();
        });
        Ok(meshd_coordinator::run(opts).await?)
    })
}
