//! meshctl: the operator CLI for a meshd coordinator's admin HTTP/JSON API
//! (`meshd_control::api`): hosts, join tokens, label policy, block logs, status, shell
//! completions.
//!
//! `main` calls [`run`] and prints any error chain as one `meshctl: error: ...` line on
//! stderr, exiting 1. Known failures ([`client::ApiFailure`]) already carry a hint that says
//! what to do. A [`Reported`] error was already printed (e.g. `FILE:LINE:COLUMN: message`).
#![forbid(unsafe_code)]

mod admin;
mod cli;
mod client;
mod config;
mod flows;
mod import;
mod knock;
mod output;
mod parse;
mod policy;
mod prepared;

use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser as _};
use meshd_control::api::{
    AdminTokenCreateRequest, AdminTokenCreated, AdminTokenView, EventView, ExplainRequest,
    HostView, LabelRequest, PolicyApplied, PolicyCheck, PolicyCurrent, PolicyText, RenameRequest,
    StatusView, TokenCreateRequest, TokenCreated, TokenView, UnlabelRequest,
};
use meshd_control::policy::PolicyRecord;
use meshd_control::{Labels, UnixTime};
use meshd_policy::{BlockEvent, Change, Explanation, NoInventory};
use meshd_time::unix_now;

/// `0.1.0 (abc1234)`: the crate version and the git commit it was built from (`-dirty` when
/// tracked files had changes, `unknown` without git; see build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("MESHD_GIT_COMMIT"),
    ")"
);
use serde::Serialize;

use crate::cli::{
    AdminCmd, AdminTokenCmd, Cli, Command, ExportCmd, ExportFormat, HostsCmd, Output, PolicyCmd,
    TokenCmd, TopologyFormat,
};
use crate::client::{query, segment, ApiFailure, Client};
use crate::config::{EnvValues, FlagValues};
use crate::output::PolicyState;
use crate::policy::{CheckReport, Inventory, Source};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<Reported>() => ExitCode::FAILURE,
        Err(e) => {
            note(format_args!("meshctl: error: {e:#}"));
            ExitCode::FAILURE
        }
    }
}

/// Writes one line to stderr. Not `eprintln!`, which panics when stderr is a closed pipe
/// (`meshctl token create 2>&1 | head -1`): a lost note is not worth a panic.
fn note(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// A failure already printed on stderr: exit 1 without another message.
#[derive(Debug)]
struct Reported;

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("(reported above)")
    }
}

impl std::error::Error for Reported {}

/// Reads and parses a policy file; a parse error is printed as `FILE:LINE:COLUMN: message`.
fn load_policy(path: &std::path::Path) -> anyhow::Result<(Source, meshd_policy::Policy)> {
    let src = policy::read(path)?;
    match policy::parse(&src) {
        Ok(p) => Ok((src, p)),
        Err(line) => {
            note(format_args!("{line}"));
            Err(Reported.into())
        }
    }
}

/// The config file (if any) and the settings resolved from flags, environment and file.
fn settings(g: &cli::GlobalArgs) -> anyhow::Result<(Option<config::LoadedFile>, config::Settings)> {
    let env = EnvValues::from_process();
    let file = config::load_file(g.config.as_deref(), &env)?;
    let flags = FlagValues {
        server: g.server.clone(),
        token: g.token.clone(),
        state_dir: g.state_dir.clone(),
        ca: g.ca.clone(),
    };
    let s = config::resolve(&flags, &env, file.as_ref());
    Ok((file, s))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let g = &cli.global;
    let ctx = || -> anyhow::Result<Ctx> {
        let (file, s) = settings(g)?;
        let base = parse::server_url(&s.server)
            .map_err(|e| anyhow::anyhow!("{e} (from {})", s.server_source))?;
        let token = s.token.read()?;
        if let Some(t) = knock::target(None, None, file.as_ref().map(|f| &f.config))? {
            let line = knock::send(&t, &token)?;
            if g.verbose > 0 {
                eprintln!("{line}");
            }
            // Let the coordinator take the knock before the TCP connection arrives.
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let trust = if base.starts_with("https://") {
            s.ca.load()?
        } else {
            config::Trust::System {
                why: "plain HTTP".into(),
            }
        };
        let admin_keys = admin_keys(g)?;
        Ok(Ctx {
            client: Client::new(base.clone(), token, s.token.to_string(), &trust, g.verbose),
            admin_keys,
            prepare: g.prepare.clone(),
            server: base,
            output: g.output,
            now: unix_now(),
        })
    };
    if g.prepare.is_some() && !prepares(&cli.command) {
        anyhow::bail!(
            "--prepare FILE applies to signed commands only (policy apply|rollback, hosts \
             label|unlabel|rename|release, import, admin add-key|remove-key)"
        );
    }
    match cli.command {
        Command::Admin(AdminCmd::Cosign { file }) => cosign(&file, &admin_keys(g)?),
        Command::Knock {
            control,
            coordinator_key,
        } => {
            let (file, s) = settings(g)?;
            let t = knock::target(
                control,
                coordinator_key.as_deref(),
                file.as_ref().map(|f| &f.config),
            )?
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "where to knock: --control and --coordinator-key (or spa_control and spa_coordinator_key in the config file)"
                )
            })?;
            out(&format!("{}\n", knock::send(&t, &s.token.read()?)?))
        }
        Command::Completions { shell } => {
            // Into a buffer first: clap_complete panics on a failed write (a closed pipe).
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "meshctl", &mut buf);
            out(&String::from_utf8_lossy(&buf))
        }
        Command::Admin(AdminCmd::Keygen { out: path }) => {
            let (key, text) = admin::keygen(path.as_deref())?;
            note(format_args!("admin public key: {}", key.public()));
            match path {
                Some(p) => note(format_args!(
                    "private key written to {} (0600); register the public key with `meshctl admin add-key`",
                    p.display()
                )),
                None => out(&text)?,
            }
            Ok(())
        }
        Command::Admin(a) => ctx()?.admin(a),
        Command::Status => ctx()?.status(),
        Command::Hosts(h) => ctx()?.hosts(h),
        Command::Token(t) => ctx()?.token(t),
        Command::Blocks { host, since } => ctx()?.blocks(host, since),
        Command::Events { limit } => ctx()?.events(limit),
        Command::Topology {
            group_by,
            since,
            format,
        } => ctx()?.topology(&group_by, since, format),
        Command::Export(ExportCmd::Flows { format, since }) => ctx()?.export_flows(format, since),
        Command::Import {
            file,
            apply,
            write_policy,
        } => ctx()?.import(&file, apply, write_policy.as_deref()),
        Command::Policy(PolicyCmd::Check { file, offline }) => {
            policy_check(&file, offline, g.output, ctx)
        }
        Command::Policy(p) => ctx()?.policy(p),
    }
}

/// The admin signing keys: every --admin-key file, else MESH_ADMIN_KEY's.
fn admin_keys(g: &cli::GlobalArgs) -> anyhow::Result<Vec<meshd_control::signed::AdminSigningKey>> {
    let mut key_files = g.admin_key.clone();
    if key_files.is_empty() {
        if let Some(p) = std::env::var_os("MESH_ADMIN_KEY").filter(|p| !p.is_empty()) {
            key_files.push(p.into());
        }
    }
    key_files.iter().map(|p| admin::load_key(p)).collect()
}

/// Whether `--prepare` applies to the command (it signs a change).
fn prepares(c: &Command) -> bool {
    matches!(
        c,
        Command::Policy(PolicyCmd::Apply { .. } | PolicyCmd::Rollback { .. })
            | Command::Hosts(
                HostsCmd::Label { .. }
                    | HostsCmd::Unlabel { .. }
                    | HostsCmd::Rename { .. }
                    | HostsCmd::Release { .. }
            )
            | Command::Import { .. }
            | Command::Admin(AdminCmd::AddKey { .. } | AdminCmd::RemoveKey { .. })
            | Command::Policy(PolicyCmd::Mode { mode: Some(_), .. })
    )
}

/// `admin cosign FILE`: shows what FILE signs, checks its signatures and adds those of
/// `keys` (no coordinator needed: the file carries the admin key-set chain).
fn cosign(
    file: &std::path::Path,
    keys: &[meshd_control::signed::AdminSigningKey],
) -> anyhow::Result<()> {
    if keys.is_empty() {
        anyhow::bail!("give the admin key to sign with: --admin-key FILE (or MESH_ADMIN_KEY)");
    }
    let mut p = prepared::Prepared::read(file)?;
    let set = p
        .signer_set()
        .with_context(|| format!("{}", file.display()))?;
    p.check_signatures(&set)
        .with_context(|| format!("{}: not signing", file.display()))?;
    let mut s = format!(
        "{} request prepared against {} (admin key set {}):\n",
        p.request.kind(),
        p.server,
        p.fingerprint()
            .map_or_else(|| "(first set)".to_string(), |f| f.to_string())
    );
    s.push_str(&p.summary());
    for k in keys {
        p.cosign(&set, k)
            .with_context(|| format!("{}: nothing was written", file.display()))?;
        s.push_str(&format!("signed with {}\n", k.public()));
    }
    p.replace(file)?;
    s.push_str(&p.progress(&set, file));
    out(&s)
}

impl Ctx {
    /// `--prepare FILE`: writes the signed request (never replacing a file) and says how many
    /// more signatures it needs.
    fn write_prepared(&self, p: prepared::Prepared) -> anyhow::Result<()> {
        let Some(file) = &self.prepare else {
            anyhow::bail!("no --prepare FILE given");
        };
        if self.admin_keys.is_empty() && p.chain.is_empty() {
            anyhow::bail!(
                "the mesh runs unsigned (no admin key registered): there is nothing to prepare"
            );
        }
        let set = p.signer_set()?;
        p.write_new(file)?;
        match self.output {
            Output::Json => print_json(&p),
            Output::Table => {
                let mut s = p.summary();
                s.push_str(&format!(
                    "prepared (not sent): {} request written to {}\n",
                    p.request.kind(),
                    file.display()
                ));
                s.push_str(&p.progress(&set, file));
                out(&s)
            }
        }
    }

    /// `admin submit FILE`: checks FILE is still current, posts it, shows the answer.
    fn submit(&self, file: &std::path::Path) -> anyhow::Result<()> {
        let p = prepared::Prepared::read(file)?;
        let set = p.signer_set()?;
        admin::check_fresh(&self.client, &p, file)?;
        let r = admin::submit(&self.client, &p.request).map_err(|e| {
            match e.downcast::<ApiFailure>() {
                Ok(ApiFailure::Server {
                    status,
                    code,
                    message,
                    failures,
                }) => {
                    let mut s = format!(
                        "the coordinator refused {} ({status} {code}): {message}",
                        file.display()
                    );
                    for f in failures {
                        s.push_str(&format!("\n  {f}"));
                    }
                    if code == "bad_signature" {
                        s.push_str(&format!("\n  {}", p.progress(&set, file).trim_end()));
                    }
                    anyhow::anyhow!(s)
                }
                Ok(f) => f.into(),
                Err(e) => e,
            }
        })?;
        let what = format!("submitted {} ({})", file.display(), p.request.kind());
        match (self.output, r) {
            (Output::Json, r) => print_json(&r),
            (Output::Table, admin::Submitted::Policy(a)) => {
                out(&output::applied(&what, a.version, a.tests.len()))
            }
            (Output::Table, admin::Submitted::Host(h)) => self.host_result(
                &h,
                &format!("{what}: {} is now {}", h.name, output::labels(&h.labels)),
            ),
            (Output::Table, admin::Submitted::Hosts(b)) => out(&import::render_signed(&what, &b)),
            (Output::Table, admin::Submitted::Keys(v)) => {
                note(format_args!("{what}"));
                self.show_keys(&v)
            }
            (Output::Table, admin::Submitted::Mode(v)) => {
                note(format_args!("{what}"));
                out(&output::policy_mode(&v, true, self.now))
            }
        }
    }
}

/// `policy check`: parse locally, run the tests; host-name tests go to the coordinator when it
/// can be reached (`connect`), and stay unresolved otherwise.
fn policy_check(
    file: &std::path::Path,
    offline: bool,
    output: Output,
    connect: impl FnOnce() -> anyhow::Result<Ctx>,
) -> anyhow::Result<()> {
    let (src, p) = load_policy(file)?;
    let hosts = policy::test_hosts(&p);
    let local = || meshd_policy::run_tests(&p, &NoInventory, unix_now());
    let (inventory, tests) = if hosts.is_empty() {
        (Inventory::NotNeeded, local())
    } else if offline {
        (Inventory::Offline("--offline".into()), local())
    } else {
        let remote = connect().and_then(|c| {
            let r: PolicyCheck = c
                .client
                .post(
                    "/v1/policy/check",
                    &PolicyText {
                        yaml: src.text.clone(),
                    },
                )
                .map_err(|e| match e {
                    ApiFailure::Server {
                        code, failures, ..
                    } if code == "policy_parse" => anyhow::anyhow!(
                        "the coordinator cannot parse {} although meshctl can (different versions?): {}",
                        src.name,
                        failures.join("; ")
                    ),
                    e => e.into(),
                })?;
            Ok((c.server, r))
        });
        match remote {
            Ok((server, r)) => (Inventory::Coordinator(server), r.tests),
            Err(e) => {
                let why = format!("{e:#}");
                note(format_args!(
                    "meshctl: warning: host names in the tests were not resolved: {why}"
                ));
                (Inventory::Offline(why), local())
            }
        }
    };
    let report = CheckReport::new(&src.name, p.rules.len(), inventory, tests);
    match output {
        Output::Json => print_json(&report)?,
        Output::Table => out(&report.render())?,
    }
    if report.ok {
        Ok(())
    } else {
        anyhow::bail!("{}", report.failure_message())
    }
}

/// Everything a command needs.
/// A change to a host's name and labels, signed by `admin::host_change`.
type HostEdit = Box<dyn FnOnce(&mut String, &mut Labels)>;

struct Ctx {
    client: Client,
    /// Admin signing keys (`--admin-key`): widening changes are sent signed.
    admin_keys: Vec<meshd_control::signed::AdminSigningKey>,
    /// `--prepare FILE`: signed changes are written there instead of sent.
    prepare: Option<std::path::PathBuf>,
    server: String,
    output: Output,
    now: UnixTime,
}

/// Adds the "see hosts list" hint to a 404 naming a host (explain).
fn hosts_hint(e: ApiFailure) -> anyhow::Error {
    match e {
        ApiFailure::NotFound { message } => {
            anyhow::anyhow!("{message} (see `meshctl hosts list`)")
        }
        e => e.into(),
    }
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
        let policy = match self.client.get::<PolicyCurrent>("/v1/policy") {
            Ok(PolicyCurrent { policy: None }) => PolicyState::NoPolicy,
            Ok(PolicyCurrent { policy: Some(r) }) => PolicyState::Current(r),
            Err(e) => PolicyState::Unknown(e.to_string()),
        };
        match self.output {
            Output::Json => {
                /// The status with the current policy version (`null`: none, default deny).
                #[derive(Serialize)]
                struct StatusWithPolicy<'a> {
                    #[serde(flatten)]
                    status: &'a StatusView,
                    policy_version: Option<u64>,
                }
                let policy_version = match &policy {
                    PolicyState::Current(r) => Some(r.version),
                    PolicyState::NoPolicy => None,
                    PolicyState::Unknown(e) => anyhow::bail!("reading the policy: {e}"),
                };
                print_json(&StatusWithPolicy {
                    status: &s,
                    policy_version,
                })
            }
            Output::Table => out(&output::status(&s, &policy, &self.server, self.now)),
        }
    }

    fn blocks(
        &self,
        host: Option<String>,
        since: Option<std::time::Duration>,
    ) -> anyhow::Result<()> {
        let q = query(&[
            ("host", host),
            ("since", since.map(|d| d.as_secs().to_string())),
        ]);
        let events: Vec<BlockEvent> = self.client.get(&format!("/v1/blocks{q}"))?;
        match self.output {
            Output::Json => print_json(&events),
            Output::Table => out(&output::blocks_table(&events)),
        }
    }

    fn get_topology(
        &self,
        group_by: &str,
        since: std::time::Duration,
    ) -> anyhow::Result<meshd_control::api::TopologyView> {
        let q = query(&[
            ("group_by", Some(group_by.to_string())),
            (
                "since",
                Some(unix_now().saturating_sub(since.as_secs()).to_string()),
            ),
        ]);
        Ok(self.client.get(&format!("/v1/topology{q}"))?)
    }

    fn topology(
        &self,
        group_by: &str,
        since: std::time::Duration,
        format: TopologyFormat,
    ) -> anyhow::Result<()> {
        let t = self.get_topology(group_by, since)?;
        match format {
            TopologyFormat::Json => print_json(&t),
            TopologyFormat::Table => out(&flows::topology_table(&t)),
            TopologyFormat::Dot => out(&flows::topology_dot(&t)),
        }
    }

    fn export_flows(
        &self,
        format: ExportFormat,
        since: Option<std::time::Duration>,
    ) -> anyhow::Result<()> {
        let q = query(&[(
            "since",
            since.map(|d| unix_now().saturating_sub(d.as_secs()).to_string()),
        )]);
        let rows: Vec<meshd_control::api::FlowView> = self.client.get(&format!("/v1/flows{q}"))?;
        match format {
            ExportFormat::Json => print_json(&rows),
            ExportFormat::Csv => out(&flows::flows_csv(&rows)?),
        }
    }

    fn events(&self, limit: u32) -> anyhow::Result<()> {
        let events: Vec<EventView> = self.client.get(&format!("/v1/events?limit={limit}"))?;
        match self.output {
            Output::Json => print_json(&events),
            Output::Table => out(&output::events_table(&events)),
        }
    }

    fn policy(&self, cmd: PolicyCmd) -> anyhow::Result<()> {
        match cmd {
            PolicyCmd::Check { .. } => unreachable!("policy check runs without a Ctx first"),
            PolicyCmd::Suggest { group_by, since } => {
                let t = self.get_topology(&group_by, since)?;
                let s = meshd_control::suggest::suggest(&t, unix_now());
                eprintln!(
                    "{} rule(s), {} test(s) from {} edge(s); {} left out",
                    s.rules,
                    s.tests,
                    t.edges.len(),
                    s.skipped.len()
                );
                out(&s.yaml)
            }
            PolicyCmd::Diff { file } => {
                let (src, _) = load_policy(&file)?;
                let changes: Vec<Change> = self
                    .client
                    .post("/v1/policy/diff", &PolicyText { yaml: src.text })
                    .map_err(|e| policy_refused(&src.name, "compared", e))?;
                match self.output {
                    Output::Json => print_json(&changes),
                    Output::Table => out(&output::changes(&changes)),
                }
            }
            PolicyCmd::Apply { file } => {
                let (src, _) = load_policy(&file)?;
                if self.prepare.is_some() {
                    return self.write_prepared(admin::prepare_policy(
                        &self.client,
                        &self.admin_keys,
                        src.text,
                    )?);
                }
                let r: PolicyApplied = if self.admin_keys.is_empty() {
                    self.client
                        .put("/v1/policy", &PolicyText { yaml: src.text })
                        .map_err(|e| policy_refused(&src.name, "applied", e))?
                } else {
                    admin::apply_policy(&self.client, &self.admin_keys, src.text).map_err(|e| {
                        match e.downcast::<ApiFailure>() {
                            Ok(f) => policy_refused(&src.name, "applied", f),
                            Err(e) => e,
                        }
                    })?
                };
                match self.output {
                    Output::Json => print_json(&r),
                    Output::Table => out(&output::applied(
                        &format!("applied {}", src.name),
                        r.version,
                        r.tests.len(),
                    )),
                }
            }
            PolicyCmd::Show => {
                let c: PolicyCurrent = self.client.get("/v1/policy")?;
                match self.output {
                    Output::Json => print_json(&c),
                    Output::Table => out(&output::policy_show(c.policy.as_ref())),
                }
            }
            PolicyCmd::History => {
                let mut h: Vec<PolicyRecord> = self.client.get("/v1/policy/history")?;
                h.sort_by_key(|r| r.version);
                match self.output {
                    Output::Json => print_json(&h),
                    Output::Table => out(&output::policy_history(&h, self.now)),
                }
            }
            PolicyCmd::Rollback { target: version } if self.prepare.is_some() => self
                .write_prepared(admin::prepare_rollback(
                    &self.client,
                    &self.admin_keys,
                    version,
                )?),
            PolicyCmd::Rollback { target: version } if !self.admin_keys.is_empty() => {
                let r = admin::rollback_policy(&self.client, &self.admin_keys, version)?;
                match self.output {
                    Output::Json => print_json(&r),
                    Output::Table => out(&output::applied(
                        &format!("rolled back to version {version} (signed)"),
                        r.version,
                        0,
                    )),
                }
            }
            PolicyCmd::Rollback { target: version } => {
                let r: PolicyApplied = self
                    .client
                    .post_empty(&format!("/v1/policy/rollback/{version}"))
                    .map_err(|e| match e {
                        ApiFailure::NotFound { message } => {
                            anyhow::anyhow!("{message} (see `meshctl policy history`)")
                        }
                        e => e.into(),
                    })?;
                match self.output {
                    Output::Json => print_json(&r),
                    Output::Table => out(&output::applied(
                        &format!("rolled back to version {version}"),
                        r.version,
                        0,
                    )),
                }
            }
            PolicyCmd::Explain { from, to, port } => {
                let e: Explanation = self
                    .client
                    .post(
                        "/v1/policy/explain",
                        &ExplainRequest {
                            from: from.clone(),
                            to: to.clone(),
                            port: port.clone(),
                        },
                    )
                    .map_err(hosts_hint)?;
                match self.output {
                    Output::Json => print_json(&e),
                    Output::Table => out(&output::explanation(&from, &to, &port, &e)),
                }
            }
            PolicyCmd::Mode { mode, group } => self.policy_mode(mode, group),
        }
    }

    /// `policy mode [learn|enforce [--group G]]`.
    fn policy_mode(&self, mode: Option<cli::ModeArg>, group: Option<Labels>) -> anyhow::Result<()> {
        use meshd_control::api::{PolicyModeRequest, PolicyModeView};
        // With admin keys (a signed mesh), the whole next setting is signed here.
        if let Some(m) = mode.filter(|_| !self.admin_keys.is_empty() || self.prepare.is_some()) {
            let p = admin::prepare_mode(&self.client, &self.admin_keys, m.into(), group)?;
            if self.prepare.is_some() {
                return self.write_prepared(p);
            }
            let admin::Submitted::Mode(v) = admin::submit(&self.client, &p.request)? else {
                anyhow::bail!("unexpected reply kind");
            };
            return match self.output {
                Output::Json => print_json(&v),
                Output::Table => out(&output::policy_mode(&v, true, self.now)),
            };
        }
        let v: PolicyModeView = match mode {
            None => self.client.get("/v1/policy/mode")?,
            Some(m) => self
                .client
                .post(
                    "/v1/policy/mode",
                    &PolicyModeRequest {
                        mode: m.into(),
                        group,
                    },
                )
                .map_err(|e| match e {
                    ApiFailure::Server {
                        status: 409,
                        message,
                        ..
                    } => {
                        anyhow::anyhow!("refused: {message}")
                    }
                    e => e.into(),
                })?,
        };
        match self.output {
            Output::Json => print_json(&v),
            Output::Table => out(&output::policy_mode(&v, mode.is_some(), self.now)),
        }
    }

    fn host_result(&self, h: &HostView, what: &str) -> anyhow::Result<()> {
        match self.output {
            Output::Json => print_json(h),
            Output::Table => {
                if !what.is_empty() {
                    note(format_args!("{what}"));
                }
                out(&output::host_detail(h, self.now))
            }
        }
    }

    fn admin_token(&self, cmd: AdminTokenCmd) -> anyhow::Result<()> {
        let no_such = |name: &str| {
            let name = name.to_string();
            move |e| match e {
                ApiFailure::NotFound { message } => anyhow::anyhow!("{message}"),
                ApiFailure::Server { code, message, .. } if code == "last_admin_token" => {
                    anyhow::anyhow!("{name} was not revoked: {message}")
                }
                e => e.into(),
            }
        };
        match cmd {
            AdminTokenCmd::Create { name, ttl } => {
                let req = AdminTokenCreateRequest {
                    name,
                    ttl_secs: ttl.map(|d| d.as_secs()),
                };
                let t: AdminTokenCreated = self.client.post("/v1/admin/tokens", &req)?;
                match self.output {
                    Output::Json => print_json(&t),
                    Output::Table => {
                        note(format_args!(
                            "created {}; it is shown only now: pass it with --token or MESH_TOKEN",
                            output::admin_token_summary(&t.info, self.now)
                        ));
                        out(&format!("{}\n", t.token))
                    }
                }
            }
            AdminTokenCmd::List => {
                let tokens: Vec<AdminTokenView> = self.client.get("/v1/admin/tokens")?;
                match self.output {
                    Output::Json => print_json(&tokens),
                    Output::Table => out(&output::admin_tokens_table(&tokens, self.now)),
                }
            }
            AdminTokenCmd::Revoke { name } => {
                let t: AdminTokenView = self
                    .client
                    .delete(&format!("/v1/admin/tokens/{}", segment(&name)))
                    .map_err(no_such(&name))?;
                match self.output {
                    Output::Json => print_json(&t),
                    Output::Table => out(&format!(
                        "revoked {}\n",
                        output::admin_token_summary(&t, self.now)
                    )),
                }
            }
        }
    }

    fn admin(&self, cmd: AdminCmd) -> anyhow::Result<()> {
        let v = match cmd {
            AdminCmd::Keygen { .. } => unreachable!("keygen runs without a Ctx"),
            AdminCmd::Cosign { .. } => unreachable!("cosign runs without a Ctx"),
            AdminCmd::Submit { file } => return self.submit(&file),
            AdminCmd::AddKey { key, quorum } if self.prepare.is_some() => {
                return self.write_prepared(admin::prepare_keys(
                    &self.client,
                    &self.admin_keys,
                    |s| s.push(key),
                    quorum,
                )?)
            }
            AdminCmd::RemoveKey { key, quorum } if self.prepare.is_some() => {
                return self.write_prepared(admin::prepare_keys(
                    &self.client,
                    &self.admin_keys,
                    |s| s.retain(|k| *k != key),
                    quorum,
                )?)
            }
            AdminCmd::Token(t) => return self.admin_token(t),
            AdminCmd::Keys => admin::verified_chain(&self.client, &self.admin_keys)?.0,
            AdminCmd::AddKey { key, quorum } => {
                let keys = if self.admin_keys.is_empty() {
                    anyhow::bail!("give the key file to sign with: --admin-key FILE (for the first key: its own file)");
                } else {
                    &self.admin_keys
                };
                admin::change_keys(&self.client, keys, |s| s.push(key), quorum)?
            }
            AdminCmd::RemoveKey { key, quorum } => admin::change_keys(
                &self.client,
                &self.admin_keys,
                |s| s.retain(|k| *k != key),
                quorum,
            )?,
        };
        self.show_keys(&v)
    }

    /// The admin key set, as `admin keys` shows it.
    fn show_keys(&self, v: &meshd_control::state::SignedView) -> anyhow::Result<()> {
        match self.output {
            Output::Json => print_json(v),
            Output::Table => {
                let mut s = String::new();
                match v.chain.last().and_then(|l| l.key_set().ok()) {
                    None => s.push_str("no admin keys: the mesh runs unsigned\n"),
                    Some(k) => {
                        s.push_str(&format!(
                            "admin key set {} (version {}, {} of {} signatures needed)\n",
                            v.fingerprint.map(|f| f.to_string()).unwrap_or_default(),
                            k.seq,
                            k.quorum,
                            k.keys.len()
                        ));
                        for key in &k.keys {
                            s.push_str(&format!("  {key}\n"));
                        }
                        s.push_str(&format!(
                            "policy version {}: {}\n",
                            v.policy_version,
                            if v.policy.is_some() {
                                "signed"
                            } else {
                                "NOT signed"
                            }
                        ));
                    }
                }
                out(&s)
            }
        }
    }

    fn hosts(&self, cmd: HostsCmd) -> anyhow::Result<()> {
        if !self.admin_keys.is_empty() || self.prepare.is_some() {
            let (host, release, what): (String, bool, HostEdit) = match cmd {
                HostsCmd::Label { host, labels } => (
                    host,
                    false,
                    Box::new(move |_, l: &mut Labels| {
                        for x in labels {
                            l.extend(x);
                        }
                    }),
                ),
                HostsCmd::Unlabel { host, keys } => (
                    host,
                    false,
                    Box::new(move |_, l: &mut Labels| {
                        for k in keys.into_iter().flatten() {
                            l.remove(&k);
                        }
                    }),
                ),
                HostsCmd::Rename { host, new_name } => {
                    meshd_control::model::validate_name(&new_name)
                        .map_err(|e| anyhow::anyhow!("cannot rename to {new_name:?}: {e}"))?;
                    (
                        host,
                        false,
                        Box::new(move |n: &mut String, _| *n = new_name),
                    )
                }
                HostsCmd::Release { host } => (host, true, Box::new(|_, _| {})),
                other => return self.hosts_unsigned(other),
            };
            if self.prepare.is_some() {
                let p = admin::prepare_host(&self.client, &self.admin_keys, &host, what, release)
                    .map_err(|e| match e.downcast::<ApiFailure>() {
                    Ok(f) => host_hint(&host)(f),
                    Err(e) => e,
                })?;
                return self.write_prepared(p);
            }
            let h = admin::host_change(&self.client, &self.admin_keys, &host, what, release)
                .map_err(|e| match e.downcast::<ApiFailure>() {
                    Ok(f) => host_hint(&host)(f),
                    Err(e) => e,
                })?;
            return self.host_result(
                &h,
                &format!(
                    "signed: {} is now {}{}",
                    h.name,
                    output::labels(&h.labels),
                    if release { " (released)" } else { "" }
                ),
            );
        }
        self.hosts_unsigned(cmd)
    }

    fn hosts_unsigned(&self, cmd: HostsCmd) -> anyhow::Result<()> {
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
            HostsCmd::Quarantine { host } => {
                let h: HostView = self
                    .client
                    .post_empty(&format!("/v1/hosts/{}/quarantine", segment(&host)))
                    .map_err(host_hint(&host))?;
                match self.output {
                    Output::Json => print_json(&h),
                    Output::Table => out(&format!(
                        "quarantined host {} (id {}): cut off from every peer; undo with \
                         `meshctl host release {}`\n",
                        h.name, h.id, h.name
                    )),
                }
            }
            HostsCmd::RotateKey { host, wait } => {
                let h: HostView = self
                    .client
                    .post_empty(&format!("/v1/hosts/{}/rotate-key", segment(&host)))
                    .map_err(host_hint(&host))?;
                let old = h.public_key;
                let Some(wait) = wait else {
                    return match self.output {
                        Output::Json => print_json(&h),
                        Output::Table => out(&format!(
                            "asked host {} (id {}) to rotate its key {old}; it switches once its                              peers accept the new one (`meshctl events` shows each step)\n",
                            h.name, h.id
                        )),
                    };
                };
                let deadline = std::time::Instant::now() + wait;
                loop {
                    let now: HostView = self
                        .client
                        .get(&format!("/v1/hosts/{}", h.id))
                        .map_err(host_hint(&host))?;
                    if now.public_key != old {
                        return match self.output {
                            Output::Json => print_json(&now),
                            Output::Table => out(&format!(
                                "rotated the key of host {} (id {}): {old} -> {}\n",
                                now.name, now.id, now.public_key
                            )),
                        };
                    }
                    if std::time::Instant::now() >= deadline {
                        anyhow::bail!(
                            "host {} still has its old key after {}: see `meshctl events` \
                             (the rotation is aborted if the host does not switch in time)",
                            h.name,
                            parse::format_duration(wait.as_secs())
                        );
                    }
                    std::thread::sleep(std::time::Duration::from_millis(250));
                }
            }
            HostsCmd::Release { host } => {
                let h: HostView = self
                    .client
                    .post_empty(&format!("/v1/hosts/{}/release", segment(&host)))
                    .map_err(host_hint(&host))?;
                match self.output {
                    Output::Json => print_json(&h),
                    Output::Table => out(&format!(
                        "released host {} (id {}): its peers are back as the policy allows\n",
                        h.name, h.id
                    )),
                }
            }
            HostsCmd::Revoke { host, yes } => {
                if !yes {
                    confirm(&format!(
                        "revoke host {host:?}? it is removed and its key is refused for good"
                    ))?;
                }
                let h: HostView = self
                    .client
                    .post_empty(&format!("/v1/hosts/{}/revoke", segment(&host)))
                    .map_err(host_hint(&host))?;
                match self.output {
                    Output::Json => print_json(&h),
                    Output::Table => out(&format!(
                        "revoked host {} (id {}): its key is refused from now on\n",
                        h.name, h.id
                    )),
                }
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
                if !self.admin_keys.is_empty() {
                    // The token must pin the admin key set verified here, not one of the
                    // coordinator's choosing.
                    admin::check_token_pin(&self.client, &self.admin_keys, &t.token)?;
                }
                match self.output {
                    Output::Json => print_json(&t),
                    Output::Table => {
                        note(format_args!(
                            "created {}; enrol a host with `meshd up --join TOKEN`",
                            output::token_summary(&t.info, self.now)
                        ));
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

/// A refused policy (apply, diff): the coordinator's itemised failures, one per line.
fn policy_refused(file: &str, what: &str, e: ApiFailure) -> anyhow::Error {
    match e {
        ApiFailure::Server {
            message, failures, ..
        } if !failures.is_empty() => {
            let mut s = format!("{file} was not {what}: {message}");
            for f in failures {
                s.push_str(&format!("\n  {f}"));
            }
            anyhow::anyhow!(s)
        }
        e => e.into(),
    }
}

/// Asks on the terminal; refuses cleanly without one.
fn confirm(question: &str) -> anyhow::Result<()> {
    if !std::io::stdin().is_terminal() {
        anyhow::bail!("{question}: no terminal to confirm on; pass --yes");
    }
    let mut err = std::io::stderr();
    let _ = write!(err, "{question} [y/N] ").and_then(|()| err.flush());
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the answer")?;
    if matches!(line.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
        Ok(())
    } else {
        anyhow::bail!("nothing done (answer y to confirm, or pass --yes)")
    }
}
