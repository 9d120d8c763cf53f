//! Command-line definition (clap derive; the doc comments are the help text).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use meshd_control::Labels;

use crate::parse;

/// Operate a meshd coordinator: enrolled hosts, join tokens, label policy, block logs, status.
///
/// The coordinator is found with --server, MESH_SERVER, `server` in the config file, or
/// http://127.0.0.1:7444. The admin token comes from --token, MESH_TOKEN, `token`/`token_file`
/// in the config file, or <state-dir>/admin.token. Config file: --config, MESHCTL_CONFIG,
/// ~/.config/meshctl/config.toml, or /etc/meshd/meshctl.toml.
///
/// An admin API bound anywhere but loopback speaks HTTPS only: use --server https://HOST:PORT.
/// Its certificate is checked against --ca, MESH_CA, `ca_file` in the config file, or
/// <state-dir>/admin-cert.pem (the coordinator's self-signed one) when that exists, else the
/// system's trusted roots.
#[derive(Debug, Parser)]
#[command(name = "meshctl", version = crate::VERSION, propagate_version = true)]
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
    /// Coordinator admin API URL, http:// or https:// [env: MESH_SERVER] [default: http://127.0.0.1:7444].
    #[arg(long, global = true, value_name = "URL")]
    pub server: Option<String>,
    /// Admin token [env: MESH_TOKEN] [default: read from <state-dir>/admin.token].
    #[arg(long, global = true, value_name = "TOKEN")]
    pub token: Option<String>,
    /// Coordinator state directory holding admin.token and admin-cert.pem [env: MESH_STATE_DIR] [default: /var/lib/meshd].
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// PEM certificate(s) to trust for an https:// server: the coordinator's admin-cert.pem or
    /// its CA [env: MESH_CA] [default: <state-dir>/admin-cert.pem if it exists, else the system's roots].
    #[arg(long, global = true, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Config file with `server`, `token` or `token_file`, and `ca_file` [env: MESHCTL_CONFIG].
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Admin signing key file(s) (signed policy): policy, label, rename and release changes are
    /// signed with them; repeat for a quorum above 1 [env: MESH_ADMIN_KEY].
    #[arg(long, global = true, value_name = "FILE")]
    pub admin_key: Vec<PathBuf>,
    /// Signed commands (policy apply/rollback, host label/unlabel/rename/release, import,
    /// admin add-key/remove-key): write the signed request to FILE (never replaced) instead
    /// of sending it, to collect more signatures with `admin cosign` and send it with
    /// `admin submit`.
    #[arg(long, global = true, value_name = "FILE")]
    pub prepare: Option<PathBuf>,
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
    /// Enrolled hosts (also `meshctl host ...`): list, label, quarantine, release, revoke.
    #[command(subcommand, visible_alias = "host")]
    Hosts(HostsCmd),
    /// The label policy: check, diff, apply, show, history, rollback, explain.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Denied flows reported by the hosts (block logs), oldest first.
    Blocks {
        /// Only flows where this host (by name) is either end.
        #[arg(long, value_name = "NAME")]
        host: Option<String>,
        /// Only flows denied in the last DURATION, e.g. 30s, 10m, 1h, 7d [default: all kept].
        #[arg(long, value_name = "DURATION", value_parser = parse::duration)]
        since: Option<Duration>,
    },
    /// The coordinator's audit log (refused duplicate connections, removals, quarantines,
    /// policy versions), oldest first.
    Events {
        /// Show the newest N events (1-1000).
        #[arg(long, short = 'n', value_name = "N", default_value_t = 100,
              value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
    },
    /// Import a CMDB export (CSV or JSON): host records by name and/or underlay IP with their
    /// labels, and declared business flows (from-app,to-app,port).
    ///
    /// CSV: a `hostname,ip,labels` header (labels as `app=web;env=prod`, or one column per
    /// label key), then rows; a `from-app,to-app,port` header starts the flows (port `5432`,
    /// `tcp/5432` or `udp/53`). JSON: `{"hosts": [{"hostname", "ip", "labels"}], "flows":
    /// [{"from", "to", "port"}]}`. Every bad row is printed as FILE:LINE: message and nothing
    /// is sent. Records apply to enrolled hosts that match by name or underlay IP, and to
    /// hosts that enrol later (their labels win over the join token's). Declared flows are
    /// shown as a policy diff (the current policy plus a `cmdb-FROM-to-TO` rule per pair).
    Import {
        /// CMDB file (`-`: standard input).
        file: PathBuf,
        /// Also apply the proposed policy (its tests must pass, or nothing is imported).
        #[arg(long)]
        apply: bool,
        /// Write the proposed policy to this file (to review and `policy apply` later).
        #[arg(long, value_name = "FILE")]
        write_policy: Option<PathBuf>,
    },
    /// Join tokens that enrol hosts.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Admin access: named admin tokens (token create, list, revoke) and the signing keys of
    /// signed policy (keygen, keys, add-key, remove-key).
    #[command(subcommand)]
    Admin(AdminCmd),
    /// Who talks to whom, from the hosts' flow records: edges opener -> responder with
    /// protocol/port, volume and verdict (allowed, denied, would_deny).
    Topology {
        /// Nodes: `host`, or a label key such as `app` (hosts without it form `app=(none)`).
        #[arg(long, value_name = "host|LABEL", default_value = "host")]
        group_by: String,
        /// Flows seen in the last DURATION, e.g. 10m, 1h, 7d.
        #[arg(long, value_name = "DURATION", value_parser = parse::duration, default_value = "1h")]
        since: Duration,
        /// table, json (the API's TopologyView) or dot (a Graphviz digraph, edges coloured by
        /// verdict: `meshctl topology --format dot | dot -Tsvg > mesh.svg`).
        #[arg(long, value_enum, default_value_t = TopologyFormat::Table)]
        format: TopologyFormat,
    },
    /// Hand data back to other systems (a CMDB).
    #[command(subcommand)]
    Export(ExportCmd),
    /// Coordinator status: version, policy version, hosts, connected agents.
    Status,
    /// Send one SPA knock as admin (debugging; meshctl knocks by itself before its API calls
    /// when the config file sets `spa_control` and `spa_coordinator_key`).
    Knock {
        /// The coordinator's control (QUIC) address [default: `spa_control` in the config].
        #[arg(long, value_name = "ADDR:PORT")]
        control: Option<std::net::SocketAddr>,
        /// The coordinator's static public key [default: `spa_coordinator_key`].
        #[arg(long, value_name = "KEY")]
        coordinator_key: Option<String>,
    },
    /// Print a shell completion script (e.g. `meshctl completions bash > /etc/bash_completion.d/meshctl`).
    Completions {
        /// Shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// `meshctl topology --format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TopologyFormat {
    /// Aligned columns.
    Table,
    /// The API's JSON.
    Json,
    /// A Graphviz digraph.
    Dot,
}

/// `meshctl export flows --format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// CSV with a header row.
    Csv,
    /// The API's JSON rows.
    Json,
}

/// `meshctl export ...`.
#[derive(Debug, clap::Subcommand)]
pub enum ExportCmd {
    /// The stored flow records, one row per host, peer, port, verdict and interval, oldest
    /// first (at most the newest 100000 rows).
    Flows {
        /// csv (with a header row) or json.
        #[arg(long, value_enum, default_value_t = ExportFormat::Csv)]
        format: ExportFormat,
        /// Only flows seen in the last DURATION, e.g. 1h, 7d [default: all kept].
        #[arg(long, value_name = "DURATION", value_parser = parse::duration)]
        since: Option<Duration>,
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
    /// Cut a host off from every peer at once (it stays enrolled; undo with `release`).
    Quarantine {
        /// Host name, id or public key.
        host: String,
    },
    /// Undo `quarantine`: the host's peers come back as the policy allows.
    Release {
        /// Host name, id or public key.
        host: String,
    },
    /// Rotate a connected host's WireGuard key with no drop: the host makes a new key, proves
    /// it, its peers accept both keys until it switches, then only the new one.
    #[command(name = "rotate-key")]
    RotateKey {
        /// Host name, id or public key.
        host: String,
        /// Wait until the host runs on its new key (at most this long, e.g. 30s).
        #[arg(long, value_name = "DURATION", value_parser = parse::duration)]
        wait: Option<Duration>,
    },
    /// Remove a host's identity for good: its key is refused even if it reconnects.
    Revoke {
        /// Host name, id or public key.
        host: String,
        /// Do not ask for confirmation (required without a terminal).
        #[arg(long, short)]
        yes: bool,
    },
}

/// `meshctl admin ...`: the Ed25519 keys that sign policy, label and quarantine-release
/// changes. Private keys stay in files here; the coordinator only sees public keys.
#[derive(Debug, Subcommand)]
pub enum AdminCmd {
    /// Make a signing key: the private key goes to FILE (0600, never replaced) or stdout, the
    /// public key to stderr.
    Keygen {
        /// Where to write the private key.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Show the coordinator's admin key set (verified here) and its fingerprint.
    Keys,
    /// Add a public key to the admin key set, signed by --admin-key (the first key is
    /// registered with the admin token alone: trust on first use; pass its own key file).
    AddKey {
        /// The public key (base64, as `admin keygen` prints it).
        key: meshd_control::signed::AdminKey,
        /// Signatures the set needs from now on [default: unchanged, 1 for the first set].
        #[arg(long)]
        quorum: Option<u32>,
    },
    /// Remove a public key from the admin key set, signed by a quorum of the current set.
    RemoveKey {
        /// The public key (base64).
        key: meshd_control::signed::AdminKey,
        /// Signatures the set needs from now on [default: unchanged, at most the keys left].
        #[arg(long)]
        quorum: Option<u32>,
    },
    /// Show a request written by --prepare and add the signatures of --admin-key to it (a key
    /// outside the request's admin key set, or one that signed already, is refused).
    Cosign {
        /// The prepared request (JSON); replaced atomically.
        file: PathBuf,
    },
    /// Send a request written by --prepare (and cosigned) to the coordinator.
    Submit {
        /// The prepared request (JSON).
        file: PathBuf,
    },
    /// Named admin tokens (who may use the admin API): create, list, revoke.
    #[command(subcommand)]
    Token(AdminTokenCmd),
}

/// `meshctl admin token ...`: named admin tokens. The coordinator's first token (in
/// <state-dir>/admin.token) is named `bootstrap`; the last valid token cannot be revoked.
#[derive(Debug, Subcommand)]
pub enum AdminTokenCmd {
    /// Create an admin token; prints only the token on stdout (details go to stderr). It is
    /// shown this once: the coordinator keeps only its SHA-256.
    Create {
        /// Unique name: 1 to 64 of a-z, 0-9, '.', '_', '-' (never reused, also once revoked).
        name: String,
        /// Lifetime, e.g. 30s, 10m, 1h, 30d [default: never expires].
        #[arg(long, value_parser = parse::duration)]
        ttl: Option<Duration>,
    },
    /// List admin tokens: name, state, created, expiry (never the secrets).
    #[command(visible_alias = "ls")]
    List,
    /// Revoke an admin token: it is refused from now on (401 token_revoked).
    Revoke {
        /// Token name (see `meshctl admin token list`).
        name: String,
    },
}

/// `meshctl policy ...`. FILE is a policy YAML file, or `-` for standard input.
#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Parse a policy file and run its tests; exit status 1 if it does not parse or a test fails.
    ///
    /// Errors are printed as FILE:LINE:COLUMN: message. Tests between label sets run offline;
    /// tests naming hosts are resolved against the coordinator's inventory when it can be
    /// reached (a name not in it fails, as it would refuse an apply), and are otherwise reported
    /// as unresolved (not a failure).
    Check {
        /// Policy file (`-`: standard input).
        file: PathBuf,
        /// Do not contact the coordinator: host-name tests stay unresolved.
        #[arg(long)]
        offline: bool,
    },
    /// Which host pairs and ports would gain or lose access if FILE replaced the current policy.
    Diff {
        /// Policy file (`-`: standard input).
        file: PathBuf,
    },
    /// Apply a policy file as a new version (the coordinator refuses it if a test fails).
    Apply {
        /// Policy file (`-`: standard input).
        file: PathBuf,
    },
    /// Print the current policy (YAML, with its version in a comment).
    Show,
    /// List the applied versions, oldest first.
    #[command(visible_alias = "log")]
    History,
    /// Re-apply an earlier version as a new version.
    Rollback {
        /// Version to go back to (see `meshctl policy history`).
        #[arg(value_name = "VERSION")]
        target: u64,
    },
    /// Print the smallest policy file that allows exactly the observed flows (allowed and
    /// would-deny ones), with comments citing the evidence and a test per flow, for review
    /// before `policy apply`. Denied flows and plaintext sources are listed as left out.
    Suggest {
        /// Rule granularity: a label key such as `app`, or `host`.
        #[arg(long, value_name = "LABEL|host", default_value = "app")]
        group_by: String,
        /// Flows seen in the last DURATION, e.g. 1h, 24h, 7d.
        #[arg(long, value_name = "DURATION", value_parser = parse::duration, default_value = "24h")]
        since: Duration,
    },
    /// Whether a connection is allowed now, and by which rule.
    Explain {
        /// Host that opens the connection (name, id or public key).
        #[arg(long, value_name = "HOST")]
        from: String,
        /// Host it connects to (name, id or public key).
        #[arg(long, value_name = "HOST")]
        to: String,
        /// Protocol and destination port: tcp/N, udp/N or icmp.
        #[arg(long, value_name = "PROTO/PORT", value_parser = parse::probe)]
        port: String,
    },
    /// Learning mode: show which hosts are not enforcing, or switch the whole mesh or one
    /// label group to `learn` (flows the policy denies still pass, recorded as would-deny) or
    /// back to `enforce`.
    ///
    /// The hosts that learn are those the policy file (`mode: learn`, `learn: [...]`) or this
    /// runtime setting names; the runtime setting is stored apart from the file. `enforce
    /// --group G` ends a group set here (a group the file declares is refused: edit the file
    /// and apply it); `enforce` alone ends every runtime setting. A change reaches the hosts'
    /// maps at once.
    Mode {
        /// `learn` or `enforce` [default: show the current mode].
        #[arg(value_enum)]
        mode: Option<ModeArg>,
        /// Only the hosts with all these labels, as key=value[,key=value...] [default: the
        /// whole mesh].
        #[arg(long, value_name = "KEY=VALUE,...", value_parser = parse::labels, requires = "mode")]
        group: Option<Labels>,
    },
}

/// `meshctl policy mode learn|enforce`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Denied flows still pass and are recorded as would-deny.
    Learn,
    /// Denied flows are dropped.
    Enforce,
}

impl From<ModeArg> for meshd_policy::PolicyMode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Learn => meshd_policy::PolicyMode::Learn,
            ModeArg::Enforce => meshd_policy::PolicyMode::Enforce,
        }
    }
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
    fn admin_token_commands() {
        let c = parse(&["admin", "token", "create", "ci", "--ttl", "30d"]).unwrap();
        match c.command {
            Command::Admin(AdminCmd::Token(AdminTokenCmd::Create { name, ttl })) => {
                assert_eq!(name, "ci");
                assert_eq!(ttl, Some(Duration::from_secs(30 * 86400)));
            }
            other => panic!("{other:?}"),
        }
        for l in ["list", "ls"] {
            let c = parse(&["admin", "token", l]).unwrap();
            assert!(matches!(
                c.command,
                Command::Admin(AdminCmd::Token(AdminTokenCmd::List))
            ));
        }
        let c = parse(&["admin", "token", "revoke", "bootstrap"]).unwrap();
        assert!(matches!(
            &c.command,
            Command::Admin(AdminCmd::Token(AdminTokenCmd::Revoke { name })) if name == "bootstrap"
        ));
        assert!(parse(&["admin", "token", "create"]).is_err());
        assert!(parse(&["admin", "token", "revoke"]).is_err());
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
    fn host_alias_and_quarantine() {
        for group in ["host", "hosts"] {
            let c = parse(&[group, "quarantine", "db1"]).unwrap();
            assert!(
                matches!(&c.command, Command::Hosts(HostsCmd::Quarantine { host }) if host == "db1"),
                "{c:?}"
            );
        }
        let c = parse(&["host", "release", "db1"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Hosts(HostsCmd::Release { .. })
        ));
        let c = parse(&["host", "revoke", "db1", "-y"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Hosts(HostsCmd::Revoke { yes: true, .. })
        ));
        let c = parse(&["host", "list"]).unwrap();
        assert!(matches!(c.command, Command::Hosts(HostsCmd::List)));
        assert!(parse(&["host", "quarantine"]).is_err());
    }

    #[test]
    fn policy_commands() {
        let c = parse(&["policy", "check", "p.yaml"]).unwrap();
        assert!(matches!(
            &c.command,
            Command::Policy(PolicyCmd::Check { file, offline: false }) if file == &PathBuf::from("p.yaml")
        ));
        let c = parse(&["policy", "check", "-", "--offline"]).unwrap();
        assert!(matches!(
            &c.command,
            Command::Policy(PolicyCmd::Check { offline: true, .. })
        ));
        assert!(parse(&["policy", "check"]).is_err());
        for sub in ["diff", "apply"] {
            assert!(parse(&["policy", sub, "p.yaml"]).is_ok());
            assert!(parse(&["policy", sub]).is_err());
        }
        assert!(matches!(
            parse(&["policy", "show"]).unwrap().command,
            Command::Policy(PolicyCmd::Show)
        ));
        assert!(matches!(
            parse(&["policy", "log"]).unwrap().command,
            Command::Policy(PolicyCmd::History)
        ));
        assert!(matches!(
            parse(&["policy", "rollback", "3"]).unwrap().command,
            Command::Policy(PolicyCmd::Rollback { target: 3 })
        ));
        assert!(parse(&["policy", "rollback", "v3"]).is_err());
        // `--version` still prints meshctl's version, not the rollback target.
        assert!(parse(&["policy", "rollback", "--version"]).is_err());

        let c = parse(&[
            "policy", "explain", "--from", "app1", "--to", "db1", "--port", "tcp/1521",
        ])
        .unwrap();
        match c.command {
            Command::Policy(PolicyCmd::Explain { from, to, port }) => {
                assert_eq!(
                    (from.as_str(), to.as_str(), port.as_str()),
                    ("app1", "db1", "tcp/1521")
                );
            }
            other => panic!("{other:?}"),
        }
        let e = parse(&[
            "policy", "explain", "--from", "a", "--to", "b", "--port", "tcp/1-9",
        ])
        .unwrap_err();
        assert!(e.contains("single"), "{e}");
        assert!(parse(&["policy", "explain", "--from", "a", "--to", "b"]).is_err());
    }

    #[test]
    fn policy_mode() {
        assert!(matches!(
            parse(&["policy", "mode"]).unwrap().command,
            Command::Policy(PolicyCmd::Mode {
                mode: None,
                group: None
            })
        ));
        match parse(&["policy", "mode", "learn", "--group", "app=legacy,env=x"])
            .unwrap()
            .command
        {
            Command::Policy(PolicyCmd::Mode {
                mode: Some(ModeArg::Learn),
                group: Some(g),
            }) => {
                assert_eq!(g.len(), 2);
                assert_eq!(g["app"], "legacy");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(&["policy", "mode", "enforce"]).unwrap().command,
            Command::Policy(PolicyCmd::Mode {
                mode: Some(ModeArg::Enforce),
                group: None
            })
        ));
        // A group needs a mode; bad modes and labels are refused.
        assert!(parse(&["policy", "mode", "--group", "app=x"]).is_err());
        assert!(parse(&["policy", "mode", "lurn"]).is_err());
        let e = parse(&["policy", "mode", "learn", "--group", "app"]).unwrap_err();
        assert!(e.contains("no '='"), "{e}");
    }

    #[test]
    fn blocks_filters() {
        let c = parse(&["blocks"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Blocks {
                host: None,
                since: None
            }
        ));
        let c = parse(&["blocks", "--host", "db1", "--since", "10m", "-o", "json"]).unwrap();
        match c.command {
            Command::Blocks { host, since } => {
                assert_eq!(host.as_deref(), Some("db1"));
                assert_eq!(since, Some(Duration::from_secs(600)));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.global.output, Output::Json);
        let e = parse(&["blocks", "--since", "10"]).unwrap_err();
        assert!(e.contains("no unit"), "{e}");
    }

    #[test]
    fn events_limit() {
        assert!(matches!(
            parse(&["events"]).unwrap().command,
            Command::Events { limit: 100 }
        ));
        let c = parse(&["events", "--limit", "5", "-o", "json"]).unwrap();
        assert!(matches!(c.command, Command::Events { limit: 5 }));
        assert_eq!(c.global.output, Output::Json);
        assert!(parse(&["events", "-n", "1000"]).is_ok());
        for bad in ["0", "1001", "ten"] {
            assert!(parse(&["events", "--limit", bad]).is_err(), "{bad}");
        }
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
