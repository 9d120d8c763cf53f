//! Static mode's peers: the `[[peer]]` tables turned into the device's [`PeerSpec`]s, with the
//! policy file (or `[interface] policy`) tested and compiled against the config's own
//! inventory (this host is [`SELF_NAME`], each peer its `name` and `labels`).
//!
//! Pure but for reading the policy file and resolving endpoints; `now` (Unix seconds) is
//! passed in.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use meshd_policy::{HostRef, PeerGrants, Policy};
use meshd_tunnel::PeerSpec;

use crate::Config;

/// Name of this host in static-mode policy (selectors like `{host: self}`).
pub const SELF_NAME: &str = "self";

/// Why a config's policy cannot be used (a start fails, a reload is refused).
#[derive(Debug, thiserror::Error)]
pub enum StaticPolicyError {
    /// `[interface] policy_file` could not be read.
    #[error("reading policy file {}", path.display())]
    Read {
        /// The policy file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The policy does not parse.
    #[error("{origin}:{line}:{column}: {message}")]
    Parse {
        /// The policy file, or `CONFIG [interface] policy` for an inline one.
        origin: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// The policy's own tests fail against the static inventory.
    #[error("{origin}: policy tests failed:\n  {}", failed.join("\n  "))]
    TestsFailed {
        /// As in [`StaticPolicyError::Parse`].
        origin: String,
        /// Each failed test, as the policy crate prints it.
        failed: Vec<String>,
    },
}

/// A peer whose endpoint did not resolve (it waits to be contacted).
#[derive(Debug)]
pub struct Unresolved {
    /// The peer's name.
    pub peer: String,
    /// Why.
    pub error: io::Error,
}

/// The peers of a config file, ready for the device.
#[derive(Debug)]
pub struct StaticPeers {
    /// One spec per `[[peer]]`, in file order.
    pub specs: Vec<PeerSpec>,
    /// Endpoints that failed to resolve (their specs have no endpoint).
    pub unresolved: Vec<Unresolved>,
}

/// The static inventory policy selectors and tests see: this host as id 0, peer `i` as
/// `i + 1`.
fn inventory(cfg: &Config) -> Vec<HostRef> {
    let mut hosts = vec![HostRef {
        id: 0,
        name: SELF_NAME.into(),
        labels: cfg.interface.labels.clone(),
    }];
    hosts.extend(cfg.peers.iter().enumerate().map(|(i, p)| HostRef {
        id: i as u64 + 1,
        name: p.name.clone(),
        labels: p.labels.clone(),
    }));
    hosts
}

/// Loads the config's policy, runs its tests against the static inventory and compiles the
/// grants per peer (index-aligned with `cfg.peers`). `None` without a policy: every listed
/// peer is allowed both ways, as in WireGuard.
pub fn static_grants(cfg: &Config, now: u64) -> Result<Option<Vec<PeerGrants>>, StaticPolicyError> {
    let (origin, text) = match (&cfg.interface.policy_file, &cfg.interface.policy) {
        (Some(path), _) => (
            path.display().to_string(),
            std::fs::read_to_string(path).map_err(|source| StaticPolicyError::Read {
                path: path.clone(),
                source,
            })?,
        ),
        (None, Some(inline)) => (
            format!("{} [interface] policy", cfg.path.display()),
            inline.clone(),
        ),
        (None, None) => return Ok(None),
    };
    let policy = Policy::parse(&text).map_err(|e| StaticPolicyError::Parse {
        origin: origin.clone(),
        line: e.line,
        column: e.column,
        message: e.message,
    })?;
    let hosts = inventory(cfg);
    let failed: Vec<String> = meshd_policy::run_tests(&policy, &hosts, now)
        .into_iter()
        .filter(|t| !t.passed())
        .map(|t| t.to_string())
        .collect();
    if !failed.is_empty() {
        return Err(StaticPolicyError::TestsFailed { origin, failed });
    }
    let mut by_peer = meshd_policy::compile(&policy, &hosts, now).grants_for(0);
    Ok(Some(
        (0..cfg.peers.len())
            .map(|i| by_peer.remove(&(i as u64 + 1)).unwrap_or_default())
            .collect(),
    ))
}

/// Peer specs from a config file, grants compiled from its policy; endpoints resolved now (a
/// failed lookup leaves the peer waiting to be contacted and is listed in
/// [`StaticPeers::unresolved`]).
pub fn peer_specs(cfg: &Config, now: u64) -> Result<StaticPeers, StaticPolicyError> {
    let grants = static_grants(cfg, now)?;
    let mut unresolved = Vec::new();
    let specs = cfg
        .peers
        .iter()
        .enumerate()
        .map(|(i, p)| PeerSpec {
            next_key: None,
            name: p.name.clone(),
            public_key: p.public_key,
            endpoint: p.resolve_endpoint().and_then(|r| {
                r.map_err(|error| {
                    unresolved.push(Unresolved {
                        peer: p.name.clone(),
                        error,
                    })
                })
                .ok()
            }),
            allowed_ips: p.allowed_ips.clone(),
            persistent_keepalive: p.persistent_keepalive,
            preshared_key: p.preshared_key,
            grants: Arc::new(match &grants {
                Some(g) => g[i].clone(),
                None => PeerGrants::allow_all("static-peer"),
            }),
        })
        .collect();
    Ok(StaticPeers { specs, unresolved })
}

/// Each peer's labels by name (block logs name both ends with their labels).
pub fn peer_labels(cfg: &Config) -> BTreeMap<String, BTreeMap<String, String>> {
    cfg.peers
        .iter()
        .map(|p| (p.name.clone(), p.labels.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshd_policy::{Direction, Proto};
    use meshd_tunnel::PrivateKey;

    fn key(n: u8) -> String {
        PrivateKey::from_bytes([n; 32]).public_key().to_base64()
    }

    fn config(policy: &str) -> Config {
        let text = format!(
            r#"
[interface]
name = "mesh0"
private_key_file = "k"
address = "100.64.0.1/24"
labels = {{ role = "app" }}
{policy}

[[peer]]
name = "db1"
public_key = "{}"
endpoint = "198.18.0.2:51820"
allowed_ips = "100.64.0.2/32"
labels = {{ role = "db" }}

[[peer]]
name = "web"
public_key = "{}"
allowed_ips = "100.64.0.3/32"
labels = {{ role = "web" }}
"#,
            key(2),
            key(3)
        );
        match Config::parse(&text, "/etc/meshd/meshd.toml") {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    const RULES: &str = r#"policy = """
rules:
  - name: app-to-db
    from: {role: app}
    to: {role: db}
    ports: [tcp/5432]
tests:
  - { from: { role: app }, to: { role: db }, port: tcp/5432, expect: allow }
"""
"#;

    #[test]
    fn no_policy_allows_every_peer() {
        let peers = peer_specs(&config(""), 0).unwrap();
        assert_eq!(peers.specs.len(), 2);
        assert!(peers.unresolved.is_empty());
        for s in &peers.specs {
            assert_eq!(
                *s.grants,
                PeerGrants::allow_all("static-peer"),
                "{}",
                s.name
            );
        }
        assert_eq!(
            peers.specs[0].endpoint,
            Some("198.18.0.2:51820".parse().unwrap())
        );
        assert_eq!(peers.specs[1].endpoint, None);
    }

    #[test]
    fn policy_grants_follow_labels() {
        let peers = peer_specs(&config(RULES), 0).unwrap();
        let db = &peers.specs[0].grants;
        assert_eq!(db.outbound.len(), 1, "{db:?}");
        assert_eq!(db.outbound[0].proto, Proto::Tcp);
        assert_eq!(db.outbound[0].ports, (5432, 5432));
        assert!(db.inbound.is_empty());
        assert!(db
            .find(Direction::Outbound, meshd_policy::ip_proto::TCP, 5432, 0)
            .is_some());
        // web matches no rule: nothing either way.
        assert_eq!(*peers.specs[1].grants, PeerGrants::default());
    }

    #[test]
    fn failing_policy_tests_are_refused() {
        let failing = RULES.replace("expect: allow", "expect: deny");
        let e = peer_specs(&config(&failing), 0).unwrap_err();
        assert!(
            matches!(e, StaticPolicyError::TestsFailed { ref failed, .. } if failed.len() == 1)
        );
        let msg = e.to_string();
        assert!(
            msg.starts_with("/etc/meshd/meshd.toml [interface] policy: policy tests failed:\n  "),
            "{msg}"
        );
    }

    #[test]
    fn parse_errors_name_the_place() {
        let bad = "policy = \"\"\"\nrules:\n  - name: r\n    from: {role: app}\n    to: {role: db}\n    ports: [tcp/99999]\n\"\"\"\n";
        let e = static_grants(&config(bad), 0).unwrap_err();
        let StaticPolicyError::Parse { line, .. } = &e else {
            panic!("{e:?}");
        };
        assert_eq!(*line, 5, "{e}");
        assert!(
            e.to_string()
                .starts_with("/etc/meshd/meshd.toml [interface] policy:5:"),
            "{e}"
        );
    }

    #[test]
    fn a_missing_policy_file_names_it() {
        let mut cfg = config("");
        cfg.interface.policy_file = Some("/nonexistent/meshd-policy.yaml".into());
        let e = static_grants(&cfg, 0).unwrap_err();
        assert!(matches!(e, StaticPolicyError::Read { .. }));
        assert_eq!(
            e.to_string(),
            "reading policy file /nonexistent/meshd-policy.yaml"
        );
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn labels_by_name() {
        let l = peer_labels(&config(""));
        assert_eq!(l["db1"]["role"], "db");
        assert_eq!(l["web"]["role"], "web");
    }
}
