//! Command-line definition (clap derive; the doc comments are the help text).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use meshd_control::Labels;

use crate::parse;

/// Operate a meshd coordinator: enrolled hosts, join tokens, status.
///
/// The coordinator is found with --server, MESH_SERVER, `server` in the config file, or
/// http://127.0.0.1:7444. The admin token comes from --token, MESH_TOKEN, `token`/`token_file`
/// in the config file, or <state-dir>/admin.token. Config file: --config, MESHCTL_CONFIG,
/// ~/.config/meshctl/config.toml, or /etc/meshd/meshctl.toml.
#[derive(Debug, Parser)]
#[command(name = "meshctl", version, propagate_version = true)]
pub struct Cli {
    /// Connection and output options.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Coordinator admin API URL [env: MESH_SERVER] [default: http://127.0.0.1:7444].
    #[arg(long, global = true, value_name = "URL")]
    pub server: Option<String>,
    /// Admin token [env: MESH_TOKEN] [default: read from <state-dir>/admin.token].
    #[arg(long, global = true, value_name = "TOKEN")]
    pub token: Option<String>,
    /// Coordinator state directory holding admin.token [env: MESH_STATE_DIR] [default: /var/lib/meshd].
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Config file with `server` and `token` or `token_file` [env: MESHCTL_CONFIG].
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Print requests to stderr (-vv: also the replies).
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// The API's JSON, for scripts.
    Json,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Enrolled hosts.
    #[command(subcommand)]
    Hosts(HostsCmd),
    /// Join tokens that enrol hosts.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Coordinator status: version, hosts, connected agents.
    Status,
    /// Print a shell completion script (e.g. `meshctl completions bash > /etc/bash_completion.d/meshctl`).
    Completions {
        /// Shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// `meshctl hosts ...`.
#[derive(Debug, Subcommand)]
pub enum HostsCmd {
    /// List hosts.
    #[command(visible_alias = "ls")]
    List,
    /// Show one host (by name, id or public key).
    Show {
        /// Host name, id or public key.
        host: String,
    },
    /// Add or replace labels on a host.
    Label {
        /// Host name, id or public key.
        host: String,
        /// Labels as key=value[,key=value...] (several arguments are merged).
        #[arg(required = true, value_name = "KEY=VALUE,...", value_parser = parse::labels)]
        labels: Vec<Labels>,
    },
    /// Remove labels from a host by key.
    Unlabel {
        /// Host name, id or public key.
        host: String,
        /// Label keys as key[,key...] (several arguments are merged).
        #[arg(required = true, value_name = "KEY,...", value_parser = parse::label_keys)]
        keys: Vec<Vec<String>>,
    },
    /// Rename a host.
    Rename {
        /// Host name, id or public key.
        host: String,
        /// New name.
        new_name: String,
    },
    /// Remove a host: every peer drops its tunnel and its key cannot come back.
    #[command(visible_alias = "rm")]
    Remove {
        /// Host name, id or public key.
        host: String,
        /// Do not ask for confirmation (required without a terminal).
        #[arg(long, short)]
        yes: bool,
    },
}

/// `meshctl token ...`.
#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Create a join token; prints only the token on stdout (details go to stderr).
    Create {
        /// Labels for hosts that enrol with it, as key=value[,key=value...].
        #[arg(long, short, value_name = "KEY=VALUE,...", value_parser = parse::labels)]
        labels: Option<Labels>,
        /// Lifetime, e.g. 30s, 10m, 1h, 7d [default: never expires].
        #[arg(long, value_parser = parse::duration)]
        ttl: Option<Duration>,
        /// Number of hosts that may enrol with it [default: unlimited].
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        uses: Option<u32>,
    },
    /// List join tokens (never shows the secrets).
    #[command(visible_alias = "ls")]
    List,
    /// Revoke a join token so no further host can enrol with it.
    Revoke {
        /// Token id (see `meshctl token list`).
        id: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        Cli::try_parse_from(std::iter::once("meshctl").chain(args.iter().copied()))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn token_create() {
        let c = parse(&[
            "token",
            "create",
            "--labels",
            "app=db1,env=prod",
            "--ttl",
            "1h",
            "--uses",
            "1",
        ])
        .unwrap();
        match c.command {
            Command::Token(TokenCmd::Create { labels, ttl, uses }) => {
                let l = labels.unwrap();
                assert_eq!(l["app"], "db1");
                assert_eq!(l["env"], "prod");
                assert_eq!(ttl, Some(Duration::from_secs(3600)));
                assert_eq!(uses, Some(1));
            }
            other => panic!("{other:?}"),
        }
        let e = parse(&["token", "create", "--ttl", "10"]).unwrap_err();
        assert!(e.contains("no unit"), "{e}");
        let e = parse(&["token", "create", "--uses", "0"]).unwrap_err();
        assert!(e.contains("--uses"), "{e}");
        let e = parse(&["token", "create", "--labels", "app"]).unwrap_err();
        assert!(e.contains("no '='"), "{e}");
    }

    #[test]
    fn hosts_commands() {
        let c = parse(&["hosts", "label", "db1", "app=db1,env=prod", "tier=1"]).unwrap();
        match c.command {
            Command::Hosts(HostsCmd::Label { host, labels }) => {
                assert_eq!(host, "db1");
                assert_eq!(labels.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["hosts", "label", "db1"]).is_err());
        let e = parse(&["hosts", "unlabel", "db1", "env=prod"]).unwrap_err();
        assert!(e.contains("only keys"), "{e}");
        let c = parse(&["hosts", "remove", "db1", "--yes"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Hosts(HostsCmd::Remove { yes: true, .. })
        ));
        assert!(parse(&["hosts", "rename", "db1"]).is_err());
        assert!(parse(&["token", "revoke", "abc"]).is_err());
    }

    #[test]
    fn global_flags_anywhere() {
        let c = parse(&[
            "hosts", "list", "--output", "json", "--server", "h:1", "-vv",
        ])
        .unwrap();
        assert_eq!(c.global.output, Output::Json);
        assert_eq!(c.global.server.as_deref(), Some("h:1"));
        assert_eq!(c.global.verbose, 2);
        let c = parse(&["--token", "t", "status"]).unwrap();
        assert_eq!(c.global.token.as_deref(), Some("t"));
        assert_eq!(c.global.output, Output::Table);
        assert!(parse(&["status", "--output", "yaml"]).is_err());
        assert!(parse(&["completions", "bash"]).is_ok());
        assert!(parse(&["completions", "tcsh"]).is_err());
    }
}
