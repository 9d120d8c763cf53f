//! meshctl: the operator CLI for a meshd coordinator's admin HTTP/JSON API
//! (`meshd_control::api`): hosts, join tokens, status, shell completions.
//!
//! `main` calls [`run`] and prints any error chain as one `meshctl: error: ...` line on
//! stderr, exiting 1. Known failures ([`client::ApiFailure`]) already carry a hint that says
//! what to do.
#![forbid(unsafe_code)]

mod cli;
mod client;
mod config;
mod output;
mod parse;

use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser as _};
use meshd_control::api::{
    HostView, LabelRequest, RenameRequest, StatusView, TokenCreateRequest, TokenCreated, TokenView,
    UnlabelRequest,
};
use meshd_control::{Labels, UnixTime};
use serde::Serialize;

use crate::cli::{Cli, Command, HostsCmd, Output, TokenCmd};
use crate::client::{segment, ApiFailure, Client};
use crate::config::{EnvValues, FlagValues};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshctl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let g = &cli.global;
    let ctx = || -> anyhow::Result<Ctx> {
        let env = EnvValues::from_process();
        let file = config::load_file(g.config.as_deref(), &env)?;
        let flags = FlagValues {
            server: g.server.clone(),
            token: g.token.clone(),
            state_dir: g.state_dir.clone(),
        };
        let s = config::resolve(&flags, &env, file.as_ref());
        let base = parse::server_url(&s.server)
            .map_err(|e| anyhow::anyhow!("{e} (from {})", s.server_source))?;
        let token = s.token.read()?;
        Ok(Ctx {
            client: Client::new(base.clone(), token, s.token.to_string(), g.verbose),
            server: base,
            output: g.output,
            now: unix_now(),
        })
    };
    match cli.command {
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "meshctl", &mut std::io::stdout());
            Ok(())
        }
        Command::Status => ctx()?.status(),
        Command::Hosts(h) => ctx()?.hosts(h),
        Command::Token(t) => ctx()?.token(t),
    }
}

fn unix_now() -> UnixTime {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Everything a command needs.
struct Ctx {
    client: Client,
    server: String,
    output: Output,
    now: UnixTime,
}

/// Adds the "which host" hint to a 404.
fn host_hint(host: &str) -> impl Fn(ApiFailure) -> anyhow::Error + '_ {
    move |e| match e {
        ApiFailure::NotFound { message } => {
            anyhow::anyhow!("no host named {host:?} (see `meshctl hosts list`): {message}")
        }
        e => e.into(),
    }
}

fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    let s = serde_json::to_string_pretty(v).context("encoding JSON output")?;
    out(&format!("{s}\n"))
}

/// Writes to stdout; a closed pipe (`meshctl hosts list | head -1`) is not an error.
fn out(s: &str) -> anyhow::Result<()> {
    let mut o = std::io::stdout().lock();
    match o.write_all(s.as_bytes()).and_then(|()| o.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(()),
    }
}

impl Ctx {
    fn status(&self) -> anyhow::Result<()> {
        let s: StatusView = self.client.get("/v1/status")?;
        match self.output {
            Output::Json => print_json(&s),
            Output::Table => out(&output::status(&s, &self.server, self.now)),
        }
    }

    fn host_result(&self, h: &HostView, what: &str) -> anyhow::Result<()> {
        match self.output {
            Output::Json => print_json(h),
            Output::Table => {
                if !what.is_empty() {
                    eprintln!("{what}");
                }
                out(&output::host_detail(h, self.now))
            }
        }
    }

    fn hosts(&self, cmd: HostsCmd) -> anyhow::Result<()> {
        match cmd {
            HostsCmd::List => {
                let mut hosts: Vec<HostView> = self.client.get("/v1/hosts")?;
                hosts.sort_by(|a, b| a.name.cmp(&b.name));
                match self.output {
                    Output::Json => print_json(&hosts),
                    Output::Table => out(&output::hosts_table(&hosts, self.now)),
                }
            }
            HostsCmd::Show { host } => {
                let h: HostView = self
                    .client
                    .get(&format!("/v1/hosts/{}", segment(&host)))
                    .map_err(host_hint(&host))?;
                self.host_result(&h, "")
            }
            HostsCmd::Label { host, labels } => {
                let mut all = Labels::new();
                for l in labels {
                    all.extend(l);
                }
                let h: HostView = self
                    .client
                    .post(
                        &format!("/v1/hosts/{}/labels", segment(&host)),
                        &LabelRequest { labels: all },
                    )
                    .map_err(host_hint(&host))?;
                self.host_result(
                    &h,
                    &format!("labels of {} are now {}", h.name, output::labels(&h.labels)),
                )
            }
            HostsCmd::Unlabel { host, keys } => {
                let mut all: Vec<String> = Vec::new();
                for k in keys.into_iter().flatten() {
                    if !all.contains(&k) {
                        all.push(k);
                    }
                }
                let h: HostView = self
                    .client
                    .post(
                        &format!("/v1/hosts/{}/unlabel", segment(&host)),
                        &UnlabelRequest { keys: all },
                    )
                    .map_err(host_hint(&host))?;
                self.host_result(
                    &h,
                    &format!("labels of {} are now {}", h.name, output::labels(&h.labels)),
                )
            }
            HostsCmd::Rename { host, new_name } => {
                meshd_control::model::validate_name(&new_name)
                    .map_err(|e| anyhow::anyhow!("cannot rename to {new_name:?}: {e}"))?;
                let h: HostView = self
                    .client
                    .post(
                        &format!("/v1/hosts/{}/rename", segment(&host)),
                        &RenameRequest { name: new_name },
                    )
                    .map_err(host_hint(&host))?;
                self.host_result(&h, &format!("renamed {host} to {}", h.name))
            }
            HostsCmd::Remove { host, yes } => {
                if !yes {
                    confirm(&format!(
                        "remove host {host:?}? every peer drops its tunnel and its key cannot rejoin"
                    ))?;
                }
                let h: HostView = self
                    .client
                    .delete(&format!("/v1/hosts/{}", segment(&host)))
                    .map_err(host_hint(&host))?;
                match self.output {
                    Output::Json => print_json(&h),
                    Output::Table => out(&format!("removed host {} (id {})\n", h.name, h.id)),
                }
            }
        }
    }

    fn token(&self, cmd: TokenCmd) -> anyhow::Result<()> {
        match cmd {
            TokenCmd::Create { labels, ttl, uses } => {
                let req = TokenCreateRequest {
                    labels: labels.unwrap_or_default(),
                    ttl_secs: ttl.map(|d| d.as_secs()),
                    uses,
                };
                let t: TokenCreated = self.client.post("/v1/tokens", &req)?;
                match self.output {
                    Output::Json => print_json(&t),
                    Output::Table => {
                        eprintln!(
                            "created {}; enrol a host with `meshd up --join TOKEN`",
                            output::token_summary(&t.info, self.now)
                        );
                        out(&format!("{}\n", t.token))
                    }
                }
            }
            TokenCmd::List => {
                let mut tokens: Vec<TokenView> = self.client.get("/v1/tokens")?;
                tokens.sort_by_key(|t| t.id);
                match self.output {
                    Output::Json => print_json(&tokens),
                    Output::Table => out(&output::tokens_table(&tokens, self.now)),
                }
            }
            TokenCmd::Revoke { id } => {
                let t: TokenView =
                    self.client
                        .delete(&format!("/v1/tokens/{id}"))
                        .map_err(|e| match e {
                            ApiFailure::NotFound { message } => anyhow::anyhow!(
                                "no token with id {id} (see `meshctl token list`): {message}"
                            ),
                            e => e.into(),
                        })?;
                match self.output {
                    Output::Json => print_json(&t),
                    Output::Table => out(&format!(
                        "revoked {}\n",
                        output::token_summary(&t, self.now)
                    )),
                }
            }
        }
    }
}

/// Asks on the terminal; refuses cleanly without one.
fn confirm(question: &str) -> anyhow::Result<()> {
    if !std::io::stdin().is_terminal() {
        anyhow::bail!("{question}: no terminal to confirm on; pass --yes");
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush().ok();
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the answer")?;
    if matches!(line.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
        Ok(())
    } else {
        anyhow::bail!("not removed (answer y to confirm, or pass --yes)")
    }
}
