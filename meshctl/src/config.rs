//! Where meshctl finds the coordinator and its admin token.
//!
//! Precedence, highest first: command-line flag, environment variable, config file, default.
//! - server: `--server`, `MESH_SERVER`, file `server`, `http://127.0.0.1:7444`.
//! - token: `--token`, `MESH_TOKEN`, file `token`, file `token_file`, `<state-dir>/admin.token`.
//! - CA for an https:// server: `--ca`, `MESH_CA`, file `ca_file` (or `ca`),
//!   `<state-dir>/admin-cert.pem` when it exists, else the system's trusted roots.
//! - state dir: `--state-dir`, `MESH_STATE_DIR`, `/var/lib/meshd`.
//! - config file: `--config` / `MESHCTL_CONFIG` (must exist), else the first that exists of
//!   `$XDG_CONFIG_HOME/meshctl/config.toml` (or `~/.config/meshctl/config.toml`) and
//!   `/etc/meshd/meshctl.toml`.
//!
//! [`resolve`] is pure: it takes the flag, environment and file values as arguments.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Deserialize;

/// Default admin API address.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7444";
/// Default coordinator state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/meshd";
/// Admin token file name inside the state directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// The coordinator's generated admin API certificate inside the state directory.
pub const ADMIN_CERT_FILE: &str = "admin-cert.pem";
/// System-wide config file.
pub const SYSTEM_CONFIG: &str = "/etc/meshd/meshctl.toml";

/// Values given on the command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlagValues {
    /// `--server`.
    pub server: Option<String>,
    /// `--token`.
    pub token: Option<String>,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--ca`.
    pub ca: Option<PathBuf>,
}

/// Values from the environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvValues {
    /// `MESH_SERVER`.
    pub server: Option<String>,
    /// `MESH_TOKEN`.
    pub token: Option<String>,
    /// `MESH_STATE_DIR`.
    pub state_dir: Option<PathBuf>,
    /// `MESH_CA`.
    pub ca: Option<PathBuf>,
    /// `MESHCTL_CONFIG`.
    pub config: Option<PathBuf>,
    /// `XDG_CONFIG_HOME`.
    pub xdg_config_home: Option<PathBuf>,
    /// `HOME`.
    pub home: Option<PathBuf>,
}

impl EnvValues {
    /// Reads the process environment (empty values count as unset).
    pub fn from_process() -> Self {
        let s = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let p = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        EnvValues {
            server: s("MESH_SERVER"),
            token: s("MESH_TOKEN"),
            state_dir: p("MESH_STATE_DIR"),
            ca: p("MESH_CA"),
            config: p("MESHCTL_CONFIG"),
            xdg_config_home: p("XDG_CONFIG_HOME"),
            home: p("HOME"),
        }
    }
}

/// The config file (`server`, `token` or `token_file`, `ca_file`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Admin API URL.
    pub server: Option<String>,
    /// Admin token.
    pub token: Option<String>,
    /// File holding the admin token (relative paths: relative to the config file).
    pub token_file: Option<PathBuf>,
    /// PEM file with the CA certificate(s) to trust for an https:// server (relative paths:
    /// relative to the config file).
    #[serde(alias = "ca")]
    pub ca_file: Option<PathBuf>,
    /// SPA: the coordinator's control address; with `spa_coordinator_key`, meshctl knocks as
    /// admin before its API calls (a coordinator with `--admin-spa`).
    pub spa_control: Option<std::net::SocketAddr>,
    /// SPA: the coordinator's static public key.
    pub spa_coordinator_key: Option<String>,
}

/// A loaded config file and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedFile {
    /// Path.
    pub path: PathBuf,
    /// Contents.
    pub config: FileConfig,
}

impl FileConfig {
    /// Parses a config file's text; errors name the file.
    pub fn parse(text: &str, path: &Path) -> anyhow::Result<Self> {
        let c: FileConfig = toml::from_str(text)
            .with_context(|| format!("invalid config file {}", path.display()))?;
        if c.token.is_some() && c.token_file.is_some() {
            anyhow::bail!(
                "config file {}: set either `token` or `token_file`, not both",
                path.display()
            );
        }
        Ok(c)
    }
}

/// The config files to look at, in order, when none is named explicitly.
pub fn default_config_paths(env: &EnvValues) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(x) = &env.xdg_config_home {
        v.push(x.join("meshctl/config.toml"));
    } else if let Some(h) = &env.home {
        v.push(h.join(".config/meshctl/config.toml"));
    }
    v.push(PathBuf::from(SYSTEM_CONFIG));
    v
}

/// Loads the config file: the explicit one (which must exist) or the first default that exists.
pub fn load_file(explicit: Option<&Path>, env: &EnvValues) -> anyhow::Result<Option<LoadedFile>> {
    let explicit = explicit.or(env.config.as_deref());
    if let Some(p) = explicit {
        let text = std::fs::read_to_string(p)
            .with_context(|| format!("cannot read config file {}", p.display()))?;
        let config = FileConfig::parse(&text, p)?;
        return Ok(Some(LoadedFile {
            path: p.to_path_buf(),
            config,
        }));
    }
    for p in default_config_paths(env) {
        match std::fs::read_to_string(&p) {
            Ok(text) => {
                let config = FileConfig::parse(&text, &p)?;
                return Ok(Some(LoadedFile { path: p, config }));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read config file {}", p.display()))
            }
        }
    }
    Ok(None)
}

/// Where the admin token comes from (before it is read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `--token`.
    Flag(String),
    /// `MESH_TOKEN`.
    Env(String),
    /// `token` in the config file.
    File { path: PathBuf, token: String },
    /// A file to read: `token_file` in the config, or `<state-dir>/admin.token`.
    TokenFile(PathBuf),
}

impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Flag(_) => write!(f, "--token"),
            TokenSource::Env(_) => write!(f, "MESH_TOKEN"),
            TokenSource::File { path, .. } => write!(f, "`token` in {}", path.display()),
            TokenSource::TokenFile(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Which certificates an https:// server's certificate is checked against (before any is read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// `--ca`.
    Flag(PathBuf),
    /// `MESH_CA`.
    Env(PathBuf),
    /// `ca_file` in the config file (resolved against its directory).
    File {
        /// The config file.
        config: PathBuf,
        /// The CA file.
        path: PathBuf,
    },
    /// `<state-dir>/admin-cert.pem` if it exists (the coordinator's generated certificate),
    /// else the system's trusted roots.
    Default(PathBuf),
}

impl CaSource {
    /// The CA file named explicitly or by default (a default one may not exist).
    pub fn path(&self) -> &Path {
        match self {
            CaSource::Flag(p) | CaSource::Env(p) | CaSource::Default(p) => p,
            CaSource::File { path, .. } => path,
        }
    }
}

/// What an https:// server's certificate is checked against.
#[derive(Debug, Clone)]
pub enum Trust {
    /// These certificates only (the coordinator's own, or the CA that signed it).
    Certs {
        /// The certificates.
        certs: Vec<ureq::tls::Certificate<'static>>,
        /// Where they came from (for messages).
        from: String,
    },
    /// The system's trusted roots.
    System {
        /// Why (for messages), e.g. that the default CA file does not exist.
        why: String,
    },
}

impl fmt::Display for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trust::Certs { from, .. } => write!(f, "{from}"),
            Trust::System { why } => write!(f, "the system's trusted roots ({why})"),
        }
    }
}

impl CaSource {
    /// Reads the certificates. A missing or unreadable default file means the system's roots;
    /// a named file must be readable and hold at least one PEM certificate.
    pub fn load(&self) -> anyhow::Result<Trust> {
        let p = self.path();
        let bytes = match std::fs::read(p) {
            Ok(b) => b,
            Err(e) if matches!(self, CaSource::Default(_)) => {
                let why = match e.kind() {
                    std::io::ErrorKind::NotFound => format!("no {}", p.display()),
                    _ => format!("cannot read {}: {e}", p.display()),
                };
                return Ok(Trust::System { why });
            }
            Err(e) => {
                let why = match e.kind() {
                    std::io::ErrorKind::NotFound => "it does not exist".to_string(),
                    std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
                    _ => e.to_string(),
                };
                anyhow::bail!(
                    "cannot read the CA file from {self}: {why}; pass --ca with the \
                     coordinator's certificate (<coordinator state-dir>/{ADMIN_CERT_FILE}) \
                     or the CA that signed it"
                );
            }
        };
        let mut certs = Vec::new();
        for item in ureq::tls::parse_pem(&bytes) {
            match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => certs.push(c),
                Ok(_) => {}
                Err(e) => anyhow::bail!("the CA file from {self} is not valid PEM: {e}"),
            }
        }
        if certs.is_empty() {
            anyhow::bail!(
                "the CA file from {self} holds no certificate (expected PEM: \
                 -----BEGIN CERTIFICATE-----)"
            );
        }
        Ok(Trust::Certs {
            certs,
            from: self.to_string(),
        })
    }
}

impl fmt::Display for CaSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CaSource::Flag(p) => write!(f, "--ca {}", p.display()),
            CaSource::Env(p) => write!(f, "MESH_CA={}", p.display()),
            CaSource::File { config, path } => {
                write!(f, "`ca_file` {} in {}", path.display(), config.display())
            }
            CaSource::Default(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Resolved settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Admin API base URL, as given (not yet normalised).
    pub server: String,
    /// Where the server came from (for messages).
    pub server_source: &'static str,
    /// Where the token comes from.
    pub token: TokenSource,
    /// Coordinator state directory.
    pub state_dir: PathBuf,
    /// Trust for an https:// server.
    pub ca: CaSource,
}

/// Applies the precedence rules. Pure: no environment or file access.
pub fn resolve(flags: &FlagValues, env: &EnvValues, file: Option<&LoadedFile>) -> Settings {
    let fc = file.map(|f| &f.config);
    let (server, server_source) = if let Some(s) = &flags.server {
        (s.clone(), "--server")
    } else if let Some(s) = &env.server {
        (s.clone(), "MESH_SERVER")
    } else if let Some(s) = fc.and_then(|c| c.server.clone()) {
        (s, "config file")
    } else {
        (DEFAULT_SERVER.to_string(), "default")
    };
    let state_dir = flags
        .state_dir
        .clone()
        .or_else(|| env.state_dir.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    let token = if let Some(t) = &flags.token {
        TokenSource::Flag(t.clone())
    } else if let Some(t) = &env.token {
        TokenSource::Env(t.clone())
    } else if let (Some(f), Some(t)) = (file, fc.and_then(|c| c.token.clone())) {
        TokenSource::File {
            path: f.path.clone(),
            token: t,
        }
    } else if let (Some(f), Some(p)) = (file, fc.and_then(|c| c.token_file.clone())) {
        let base = f.path.parent().unwrap_or(Path::new("/"));
        TokenSource::TokenFile(base.join(p))
    } else {
        TokenSource::TokenFile(state_dir.join(ADMIN_TOKEN_FILE))
    };
    let ca = if let Some(p) = &flags.ca {
        CaSource::Flag(p.clone())
    } else if let Some(p) = &env.ca {
        CaSource::Env(p.clone())
    } else if let (Some(f), Some(p)) = (file, fc.and_then(|c| c.ca_file.clone())) {
        let base = f.path.parent().unwrap_or(Path::new("/"));
        CaSource::File {
            config: f.path.clone(),
            path: base.join(p),
        }
    } else {
        CaSource::Default(state_dir.join(ADMIN_CERT_FILE))
    };
    Settings {
        server,
        server_source,
        token,
        state_dir,
        ca,
    }
}

impl TokenSource {
    /// The token itself (reads the file when it comes from one).
    pub fn read(&self) -> anyhow::Result<String> {
        let t = match self {
            TokenSource::Flag(t) | TokenSource::Env(t) | TokenSource::File { token: t, .. } => {
                t.clone()
            }
            TokenSource::TokenFile(p) => match std::fs::read_to_string(p) {
                Ok(s) => s,
                Err(e) => {
                    let why = match e.kind() {
                        std::io::ErrorKind::NotFound => "it does not exist".to_string(),
                        std::io::ErrorKind::PermissionDenied => {
                            "permission denied (it is readable by root only: use sudo)".to_string()
                        }
                        _ => e.to_string(),
                    };
                    anyhow::bail!(
                        "no admin token: cannot read {}: {why}; pass --token, set MESH_TOKEN, \
                         or point --state-dir/MESH_STATE_DIR at the coordinator's state directory",
                        p.display()
                    );
                }
            },
        };
        let t = t.trim().to_string();
        if t.is_empty() {
            anyhow::bail!("the admin token from {self} is empty");
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(server: Option<&str>, token: Option<&str>, token_file: Option<&str>) -> LoadedFile {
        LoadedFile {
            path: PathBuf::from("/etc/meshd/meshctl.toml"),
            config: FileConfig {
                server: server.map(Into::into),
                token: token.map(Into::into),
                token_file: token_file.map(Into::into),
                ca_file: None,
                ..FileConfig::default()
            },
        }
    }

    #[test]
    fn defaults() {
        let s = resolve(&FlagValues::default(), &EnvValues::default(), None);
        assert_eq!(s.server, DEFAULT_SERVER);
        assert_eq!(s.server_source, "default");
        assert_eq!(s.state_dir, PathBuf::from("/var/lib/meshd"));
        assert_eq!(
            s.token,
            TokenSource::TokenFile("/var/lib/meshd/admin.token".into())
        );
    }

    #[test]
    fn flag_beats_env_beats_file_beats_default() {
        let f = file(Some("http://file:1"), Some("file-tok"), None);
        let env = EnvValues {
            server: Some("http://env:1".into()),
            token: Some("env-tok".into()),
            state_dir: Some("/env/state".into()),
            ..Default::default()
        };
        let flags = FlagValues {
            server: Some("http://flag:1".into()),
            token: Some("flag-tok".into()),
            state_dir: Some("/flag/state".into()),
            ca: None,
        };
        let s = resolve(&flags, &env, Some(&f));
        assert_eq!(
            (s.server.as_str(), s.server_source),
            ("http://flag:1", "--server")
        );
        assert_eq!(s.token, TokenSource::Flag("flag-tok".into()));
        assert_eq!(s.state_dir, PathBuf::from("/flag/state"));

        let s = resolve(&FlagValues::default(), &env, Some(&f));
        assert_eq!(
            (s.server.as_str(), s.server_source),
            ("http://env:1", "MESH_SERVER")
        );
        assert_eq!(s.token, TokenSource::Env("env-tok".into()));
        assert_eq!(s.state_dir, PathBuf::from("/env/state"));

        let s = resolve(&FlagValues::default(), &EnvValues::default(), Some(&f));
        assert_eq!(
            (s.server.as_str(), s.server_source),
            ("http://file:1", "config file")
        );
        assert_eq!(
            s.token,
            TokenSource::File {
                path: f.path.clone(),
                token: "file-tok".into()
            }
        );
    }

    #[test]
    fn token_file_relative_to_config_and_state_dir_fallback() {
        let f = file(None, None, Some("admin.tok"));
        let s = resolve(&FlagValues::default(), &EnvValues::default(), Some(&f));
        assert_eq!(s.server, DEFAULT_SERVER);
        assert_eq!(
            s.token,
            TokenSource::TokenFile("/etc/meshd/admin.tok".into())
        );

        let f = file(Some("http://file:1"), None, None);
        let flags = FlagValues {
            state_dir: Some("/srv/mesh".into()),
            ..Default::default()
        };
        let s = resolve(&flags, &EnvValues::default(), Some(&f));
        assert_eq!(
            s.token,
            TokenSource::TokenFile("/srv/mesh/admin.token".into())
        );
    }

    #[test]
    fn ca_precedence() {
        let mut f = file(None, None, None);
        f.config.ca_file = Some("tls/ca.pem".into());
        let env = EnvValues {
            ca: Some("/env/ca.pem".into()),
            ..Default::default()
        };
        let flags = FlagValues {
            ca: Some("/flag/ca.pem".into()),
            state_dir: Some("/srv/mesh".into()),
            ..Default::default()
        };
        let s = resolve(&flags, &env, Some(&f));
        assert_eq!(s.ca, CaSource::Flag("/flag/ca.pem".into()));
        let s = resolve(&FlagValues::default(), &env, Some(&f));
        assert_eq!(s.ca, CaSource::Env("/env/ca.pem".into()));
        let s = resolve(&FlagValues::default(), &EnvValues::default(), Some(&f));
        assert_eq!(s.ca.path(), Path::new("/etc/meshd/tls/ca.pem"));
        assert!(
            s.ca.to_string().contains("/etc/meshd/meshctl.toml"),
            "{}",
            s.ca
        );
        let flags = FlagValues {
            state_dir: Some("/srv/mesh".into()),
            ..Default::default()
        };
        let s = resolve(&flags, &EnvValues::default(), None);
        assert_eq!(s.ca, CaSource::Default("/srv/mesh/admin-cert.pem".into()));
        let p = Path::new("/x/meshctl.toml");
        let c = FileConfig::parse("ca = \"a.pem\"", p).unwrap();
        assert_eq!(c.ca_file, Some(PathBuf::from("a.pem")));
    }

    #[test]
    fn ca_loading() {
        let dir = tempfile::tempdir().unwrap();
        // A missing default file means the system's roots; a missing named one is an error.
        let missing = dir.path().join("admin-cert.pem");
        match CaSource::Default(missing.clone()).load().unwrap() {
            Trust::System { why } => assert!(why.contains("admin-cert.pem"), "{why}"),
            other => panic!("{other:?}"),
        }
        let e = CaSource::Flag(missing.clone())
            .load()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--ca") && e.contains("does not exist") && e.contains("admin-cert.pem"),
            "{e}"
        );
        std::fs::write(&missing, "not a certificate\n").unwrap();
        let e = CaSource::Env(missing.clone())
            .load()
            .unwrap_err()
            .to_string();
        assert!(e.contains("MESH_CA") && e.contains("no certificate"), "{e}");
        let pem = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()])
            .unwrap()
            .cert
            .pem();
        std::fs::write(&missing, format!("{pem}{pem}")).unwrap();
        match CaSource::Default(missing).load().unwrap() {
            Trust::Certs { certs, .. } => assert_eq!(certs.len(), 2),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn config_file_parsing() {
        let p = Path::new("/x/meshctl.toml");
        let c = FileConfig::parse("server = \"http://a:1\"\ntoken_file = \"/t\"\n", p).unwrap();
        assert_eq!(c.server.as_deref(), Some("http://a:1"));
        assert_eq!(c.token_file, Some(PathBuf::from("/t")));
        let e = format!("{:#}", FileConfig::parse("sever = \"x\"", p).unwrap_err());
        assert!(e.contains("/x/meshctl.toml") && e.contains("sever"), "{e}");
        let e = FileConfig::parse("token = \"a\"\ntoken_file = \"b\"", p).unwrap_err();
        assert!(e.to_string().contains("not both"), "{e}");
    }

    #[test]
    fn config_search_order() {
        let env = EnvValues {
            xdg_config_home: Some("/xdg".into()),
            home: Some("/home/u".into()),
            ..Default::default()
        };
        assert_eq!(
            default_config_paths(&env),
            [
                PathBuf::from("/xdg/meshctl/config.toml"),
                PathBuf::from(SYSTEM_CONFIG)
            ]
        );
        let env = EnvValues {
            home: Some("/home/u".into()),
            ..Default::default()
        };
        assert_eq!(
            default_config_paths(&env)[0],
            PathBuf::from("/home/u/.config/meshctl/config.toml")
        );
    }

    #[test]
    fn token_reading() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("admin.token");
        std::fs::write(&p, "meshadm-abc\n").unwrap();
        assert_eq!(TokenSource::TokenFile(p).read().unwrap(), "meshadm-abc");
        let missing = TokenSource::TokenFile(dir.path().join("nope"));
        let e = missing.read().unwrap_err().to_string();
        assert!(e.contains("does not exist") && e.contains("--token"), "{e}");
        assert!(TokenSource::Flag("  ".into()).read().is_err());
    }

    #[test]
    fn explicit_config_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing.toml");
        let e = load_file(Some(&p), &EnvValues::default()).unwrap_err();
        assert!(e.to_string().contains("missing.toml"), "{e}");
        std::fs::write(&p, "server = \"http://x:1\"").unwrap();
        let f = load_file(
            None,
            &EnvValues {
                config: Some(p.clone()),
                ..Default::default()
            },
        )
        .unwrap()
        .unwrap();
        assert_eq!(f.path, p);
    }
}
