//! `meshd`: the mesh daemon. `meshd up` runs a host's tunnels; `meshd genkey`/`pubkey` make
//! keys; `meshd status` shows peers like `wg show`.

mod agent;
mod blocks;
mod dataplane;
mod memory;
mod routes;
mod status;
mod transparent;
mod up;

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser, Subcommand};
use meshd_tunnel::PrivateKey;

/// Zero-trust encryption mesh: WireGuard-protocol tunnels between labelled hosts.
#[derive(Parser)]
#[command(name = "meshd", version, about)]
struct Cli {
    /// More logging (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
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
    Coordinator(meshd_coordinator::CoordinatorArgs),
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Genkey => {
            println!("{}", PrivateKey::generate().to_base64());
            Ok(())
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
            println!("{}", key.public_key().to_base64());
            Ok(())
        }
        Command::Up(args) => up::run(args),
        Command::Coordinator(args) => run_coordinator(args),
        Command::Status { interface, json } => {
            let s = status::fetch(&interface)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                status::print(&s);
            }
            Ok(())
        }
        Command::Down { interface } => down(&interface),
        Command::CheckConfig { config } => {
            let cfg = meshd_config::Config::load(&config)?;
            let key = cfg.load_private_key()?;
            cfg.check_own_key(&key.public_key())?;
            println!("{}: ok ({} peers)", config.display(), cfg.peers.len());
            Ok(())
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "meshd", &mut std::io::stdout());
            Ok(())
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

fn run_coordinator(args: meshd_coordinator::CoordinatorArgs) -> anyhow::Result<()> {
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
        meshd_coordinator::run(opts).await
    })
}
