//! `meshd up`: its flags, and which [`PeerSource`](crate::source::PeerSource) they plug into
//! the host.

use std::path::PathBuf;
use std::time::Duration;

use crate::host::{self, edges::NetlinkAddresses};
use crate::source::coordinator::{AgentArgs, Coordinator};
use crate::source::static_file::StaticFile;

/// Flags of `meshd up`. With `--config`, peers come from the file (static mode); with
/// `--join`, the host enrols with a coordinator; with neither, it resumes from `--state-dir`.
#[derive(clap::Args)]
pub struct UpArgs {
    /// Static mode: TOML config with [interface] and [[peer]] tables.
    #[arg(short, long, conflicts_with_all = ["join", "name"])]
    config: Option<PathBuf>,
    /// Enrol with a coordinator using a join token (from `meshctl token create`).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "MESHD_JOIN_TOKEN",
        hide_env_values = true
    )]
    join: Option<String>,
    /// Host name to register (default: /etc/hostname).
    #[arg(long)]
    name: Option<String>,
    /// Where meshd keeps its key, enrolment and last network map.
    #[arg(long, default_value = "/var/lib/meshd")]
    state_dir: PathBuf,
    /// TUN name (coordinator mode; the config file names it in static mode).
    #[arg(long, default_value = "mesh0")]
    interface: String,
    /// WireGuard UDP port (coordinator mode).
    #[arg(long, default_value_t = 51820)]
    listen_port: u16,
    /// TUN MTU (coordinator mode).
    #[arg(long, default_value_t = 1420)]
    mtu: u16,
    /// Transparent mode: encrypt traffic to peers' ordinary (underlay) addresses, with no
    /// change to applications (static mode: same as `mode = "transparent"`).
    #[arg(long)]
    transparent: bool,
    /// Machine id file: a state directory copied to a machine with another id is a clone and
    /// enrols itself as a new host (coordinator mode).
    #[arg(long, default_value = "/etc/machine-id", env = "MESHD_MACHINE_ID_FILE")]
    machine_id_file: PathBuf,
    /// Busy-poll window in microseconds (0: off, the default): after a lone packet leaves
    /// (or arrives) while the other direction is quiet, the worker polls for the answer this
    /// long instead of sleeping, trading CPU for steadier latency. Capped at 5% of a core
    /// per worker; never under bulk traffic.
    #[arg(long, value_name = "US", default_value_t = 0, env = "MESHD_BUSY_POLL_US", value_parser = clap::value_parser!(u32).range(0..=10_000))]
    busy_poll_us: u32,
    /// Prefixes peers may reach through this host besides its own addresses (e.g. a subnet
    /// it routes to), comma-separated or repeated (coordinator mode; static mode:
    /// `[interface] routed_prefixes`). Without it, inner packets to any other destination
    /// are dropped and counted as `inner_destination`.
    #[arg(
        long,
        value_name = "PREFIX",
        value_delimiter = ',',
        conflicts_with = "config"
    )]
    routed_prefixes: Vec<ipnet::IpNet>,
    /// Directory of the WireGuard userspace API socket `<DIR>/<interface>.sock`, read by
    /// `wg show` (coordinator mode; static mode: `[interface] uapi_dir`). Shared by every
    /// network namespace: give each meshd with the same interface name its own.
    #[arg(
        long,
        value_name = "DIR",
        default_value = meshd_config::DEFAULT_UAPI_DIR,
        conflicts_with = "config"
    )]
    uapi_dir: PathBuf,
    /// Flow records: count packets and bytes per flow and report them to the coordinator
    /// every `--flow-interval` (coordinator mode; static mode: `[interface] flow_records`).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set, conflicts_with = "config")]
    flow_records: bool,
    /// Seconds between flow-record reports (coordinator mode; static mode:
    /// `[interface] flow_interval`).
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600), conflicts_with = "config")]
    flow_interval: u64,
    /// Most flow records per interval; more are only counted (coordinator mode; static
    /// mode: `[interface] flow_max_records`).
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=1_000_000), conflicts_with = "config")]
    flow_max_records: u64,
    /// Serve Prometheus metrics (`GET /metrics`, plain HTTP, no authentication: bind it to
    /// loopback or a management network) on this address, e.g. `127.0.0.1:9586`. Off by
    /// default (static mode: also `[interface] metrics_listen`; the flag wins).
    #[arg(long, value_name = "ADDR", env = "MESHD_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
}

impl UpArgs {
    /// Static mode: the config file's `[interface] log_format`, if set (a file that does
    /// not load is reported by [`run`]).
    pub fn log_format(&self) -> Option<meshd_config::LogFormat> {
        let path = self.config.as_deref()?;
        meshd_config::Config::load(path).ok()?.interface.log_format
    }
}

/// Runs the daemon until SIGTERM or SIGINT: a [`host`](crate::host) fed by the config file
/// (`--config`) or by the coordinator (`--join`, or resume from `--state-dir`).
pub fn run(args: UpArgs) -> anyhow::Result<()> {
    let busy_poll = Duration::from_micros(args.busy_poll_us.into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match &args.config {
            Some(config) => {
                let (source, mut setup, first) =
                    StaticFile::open(config, &args.state_dir, args.transparent, busy_poll)?;
                setup.metrics_listen = args.metrics_listen.or(setup.metrics_listen);
                let addresses = NetlinkAddresses::new()?;
                host::run(setup, Some(first), source, addresses).await
            }
            None => {
                let agent = AgentArgs {
                    state_dir: args.state_dir,
                    join: args.join,
                    name: args.name,
                    interface: args.interface,
                    listen_port: args.listen_port,
                    mtu: args.mtu,
                    transparent: args.transparent,
                    machine_id_file: args.machine_id_file,
                    busy_poll,
                    routed_prefixes: args.routed_prefixes,
                    uapi_dir: args.uapi_dir,
                    flows: meshd_config::FlowSettings {
                        enabled: args.flow_records,
                        interval: Duration::from_secs(args.flow_interval),
                        max_records: args.flow_max_records as usize,
                    },
                };
                let addresses = NetlinkAddresses::new()?;
                let (source, mut setup, first) = Coordinator::open(agent, &addresses).await?;
                setup.metrics_listen = args.metrics_listen;
                host::run(setup, first, source, addresses).await
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        up: UpArgs,
    }

    #[test]
    fn routed_prefixes_flag() {
        let cli = Cli::try_parse_from([
            "up",
            "--join",
            "T",
            "--routed-prefixes",
            "10.1.0.0/16,fd10::/64",
            "--routed-prefixes",
            "192.0.2.0/24",
        ])
        .unwrap();
        let got: Vec<String> = cli
            .up
            .routed_prefixes
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(got, ["10.1.0.0/16", "fd10::/64", "192.0.2.0/24"]);
        assert!(Cli::try_parse_from(["up", "--routed-prefixes", "10.1.0.0"]).is_err());
        // Static mode takes them from [interface] routed_prefixes.
        let e = Cli::try_parse_from([
            "up",
            "--config",
            "m.toml",
            "--routed-prefixes",
            "10.1.0.0/16",
        ]);
        assert!(e.is_err());
    }

    #[test]
    fn flow_flags() {
        let cli = Cli::try_parse_from(["up", "--join", "T"]).unwrap();
        assert!(cli.up.flow_records);
        assert_eq!((cli.up.flow_interval, cli.up.flow_max_records), (10, 4096));
        let cli = Cli::try_parse_from([
            "up",
            "--flow-records",
            "false",
            "--flow-interval",
            "30",
            "--flow-max-records",
            "100",
        ])
        .unwrap();
        assert!(!cli.up.flow_records);
        assert_eq!((cli.up.flow_interval, cli.up.flow_max_records), (30, 100));
        assert!(Cli::try_parse_from(["up", "--flow-interval", "0"]).is_err());
        // Static mode takes them from [interface].
        assert!(Cli::try_parse_from(["up", "--config", "m.toml", "--flow-interval", "5"]).is_err());
    }

    #[test]
    fn uapi_dir_flag() {
        let cli = Cli::try_parse_from(["up", "--join", "T"]).unwrap();
        assert_eq!(cli.up.uapi_dir, PathBuf::from("/var/run/wireguard"));
        let cli = Cli::try_parse_from(["up", "--uapi-dir", "/run/ns1/wg"]).unwrap();
        assert_eq!(cli.up.uapi_dir, PathBuf::from("/run/ns1/wg"));
        // Static mode takes it from [interface] uapi_dir.
        assert!(Cli::try_parse_from(["up", "--config", "m.toml", "--uapi-dir", "/x"]).is_err());
        assert!(Cli::try_parse_from(["up", "--config", "m.toml"]).is_ok());
    }
}
