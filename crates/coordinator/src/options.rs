//! Coordinator options, the clap flags for `meshd coordinator`, and the config file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use ipnet::{Ipv4Net, Ipv6Net};
use serde::Deserialize;

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/meshd";
/// Default control (QUIC) listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7443";
/// Default admin API listen address.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:7444";

/// Stops a running coordinator when triggered (or when the trigger is dropped).
#[derive(Debug, Clone)]
pub struct Shutdown(tokio::sync::watch::Receiver<bool>);

/// The sending side of [`Shutdown`].
#[derive(Debug)]
pub struct ShutdownTrigger(tokio::sync::watch::Sender<bool>);

impl Shutdown {
    /// A pair: trigger it to stop the coordinator.
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        (ShutdownTrigger(tx), Shutdown(rx))
    }

    /// Never fires.
    pub fn never() -> Shutdown {
        let (tx, rx) = tokio::sync::watch::channel(false);
        std::mem::forget(tx);
        Shutdown(rx)
    }

    /// Resolves when triggered (or the trigger is dropped).
    pub async fn wait(mut self) {
        let _closed_means_stop = self.0.wait_for(|v| *v).await;
    }
}

impl ShutdownTrigger {
    /// Stops the coordinator.
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

/// Everything `run` needs.
#[derive(Debug, Clone)]
pub struct CoordinatorOptions {
    /// Directory with the key, database and admin token.
    pub state_dir: PathBuf,
    /// Control (QUIC) listen address.
    pub listen: SocketAddr,
    /// Address join tokens carry; `None`: `listen` (refused when `listen` is a wildcard).
    pub advertise: Option<SocketAddr>,
    /// Admin HTTP API listen address.
    pub admin_listen: SocketAddr,
    /// Overlay IPv4 pool.
    pub pool: Ipv4Net,
    /// Optional overlay IPv6 prefix (/96 or shorter).
    pub pool_v6: Option<Ipv6Net>,
    /// Stop signal.
    pub shutdown: Shutdown,
}

impl CoordinatorOptions {
    /// Defaults with a state directory (tests: listen on 127.0.0.1:0 and set ports yourself).
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        CoordinatorOptions {
            state_dir: state_dir.into(),
            listen: SocketAddr::from(([0, 0, 0, 0], 7443)),
            advertise: None,
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 7444)),
            pool: Ipv4Net::new([100, 64, 0, 0].into(), 10).unwrap_or_default(),
            pool_v6: None,
            shutdown: Shutdown::never(),
        }
    }

    /// The advertised control address, given the actually bound listen address.
    pub fn advertise_for(&self, bound: SocketAddr) -> anyhow::Result<SocketAddr> {
        match self.advertise {
            Some(a) => Ok(a),
            None if bound.ip().is_unspecified() => anyhow::bail!(
                "--listen {} is a wildcard address, so join tokens cannot carry it: \
                 pass --advertise ADDR:PORT with the address hosts reach the coordinator on",
                self.listen
            ),
            None => Ok(bound),
        }
    }
}

/// `meshd coordinator` flags (flatten into the subcommand).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CoordinatorArgs {
    /// TOML file with any of: state_dir, listen, advertise, admin_listen, pool, pool_v6.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// State directory (key, database, admin.token) [default: /var/lib/meshd].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Control (QUIC) listen address [default: 0.0.0.0:7443].
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,
    /// Control address put into join tokens [default: --listen unless it is a wildcard].
    #[arg(long, value_name = "ADDR:PORT")]
    pub advertise: Option<SocketAddr>,
    /// Admin HTTP API listen address [default: 127.0.0.1:7444].
    #[arg(long, value_name = "ADDR:PORT")]
    pub admin_listen: Option<SocketAddr>,
    /// Overlay IPv4 address pool [default: 100.64.0.0/10].
    #[arg(long, value_name = "CIDR")]
    pub pool: Option<Ipv4Net>,
    /// Optional overlay IPv6 prefix (/96 or shorter).
    #[arg(long, value_name = "CIDR")]
    pub pool_v6: Option<Ipv6Net>,
}

/// The `--config` file (all fields optional; flags win).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorFile {
    /// State directory.
    pub state_dir: Option<PathBuf>,
    /// Control listen address.
    pub listen: Option<SocketAddr>,
    /// Advertised control address.
    pub advertise: Option<SocketAddr>,
    /// Admin listen address.
    pub admin_listen: Option<SocketAddr>,
    /// IPv4 pool.
    pub pool: Option<Ipv4Net>,
    /// IPv6 prefix.
    pub pool_v6: Option<Ipv6Net>,
}

impl CoordinatorFile {
    /// Reads and parses a config file; errors name the file and the field.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading coordinator config {}", path.display()))?;
        toml::from_str(&text)
            .with_context(|| format!("parsing coordinator config {}", path.display()))
    }
}

impl CoordinatorArgs {
    /// Merges flags over the config file over defaults.
    pub fn resolve(&self, shutdown: Shutdown) -> anyhow::Result<CoordinatorOptions> {
        let file = match &self.config {
            Some(p) => CoordinatorFile::load(p)?,
            None => CoordinatorFile::default(),
        };
        let mut o = CoordinatorOptions::new(
            self.state_dir
                .clone()
                .or(file.state_dir)
                .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
        );
        if let Some(l) = self.listen.or(file.listen) {
            o.listen = l;
        }
        o.advertise = self.advertise.or(file.advertise);
        if let Some(a) = self.admin_listen.or(file.admin_listen) {
            o.admin_listen = a;
        }
        if let Some(p) = self.pool.or(file.pool) {
            o.pool = p;
        }
        o.pool_v6 = self.pool_v6.or(file.pool_v6);
        o.shutdown = shutdown;
        if o.advertise.is_none() && o.listen.ip().is_unspecified() {
            o.advertise_for(o.listen)?;
        }
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        c: CoordinatorArgs,
    }

    #[test]
    fn flags_over_file_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "listen = \"10.0.0.1:7443\"\npool = \"10.99.0.0/16\"\n").unwrap();
        let cli = Cli::parse_from([
            "x",
            "--config",
            f.to_str().unwrap(),
            "--admin-listen",
            "127.0.0.1:9",
        ]);
        let o = cli.c.resolve(Shutdown::never()).unwrap();
        assert_eq!(o.listen.to_string(), "10.0.0.1:7443");
        assert_eq!(o.pool.to_string(), "10.99.0.0/16");
        assert_eq!(o.admin_listen.to_string(), "127.0.0.1:9");
        assert_eq!(o.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(o.advertise_for(o.listen).unwrap(), o.listen);
    }

    #[test]
    fn wildcard_needs_advertise() {
        let cli = Cli::parse_from(["x"]);
        let e = cli.c.resolve(Shutdown::never()).unwrap_err().to_string();
        assert!(e.contains("--advertise"), "{e}");
        let cli = Cli::parse_from(["x", "--advertise", "192.0.2.1:7443"]);
        assert!(cli.c.resolve(Shutdown::never()).is_ok());
    }

    #[test]
    fn unknown_field_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "lissten = \"10.0.0.1:7443\"\n").unwrap();
        let e = format!("{:#}", CoordinatorFile::load(&f).unwrap_err());
        assert!(e.contains("lissten"), "{e}");
    }
}
