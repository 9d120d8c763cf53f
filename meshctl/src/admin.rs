//! Signed policy on the operator's side (issue 17): admin key files (`meshctl admin keygen`),
//! the key-set chain (`admin keys|add-key|remove-key`), and the signed forms of policy and
//! host changes, used whenever `--admin-key FILE` / `MESH_ADMIN_KEY` is given. The private key
//! never leaves this process: only statements and signatures go to the coordinator.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use anyhow::Context as _;
use meshd_control::api::{
    HostView, SignedHostRequest, SignedHostsApplied, SignedHostsRequest, SignedPolicyRequest,
    SignedRollbackRequest,
};
use meshd_control::policy::PolicyRecord;
use meshd_control::signed::{
    check_genesis, check_successor, AdminKey, AdminSigningKey, Hash32, HostStatement,
    KeySetStatement, PolicyStatement, Signed, Statement,
};
use meshd_control::state::SignedView;
use meshd_control::Labels;

use crate::client::{segment, Client};
use crate::prepared::{self, Prepared, Request};

/// Reads a key file (base64 of the 32-byte seed); refuses one group or others may read.
pub fn load_key(path: &Path) -> anyhow::Result<AdminSigningKey> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta =
        std::fs::metadata(path).with_context(|| format!("admin key file {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        anyhow::bail!(
            "admin key file {} may be read by others (chmod 600 {})",
            path.display(),
            path.display()
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading admin key file {}", path.display()))?;
    AdminSigningKey::from_text(&text)
        .map_err(|e| anyhow::anyhow!("admin key file {}: {e}", path.display()))
}

/// Makes a key: writes the private key 0600 to `out` (never replacing a file) and returns it.
pub fn keygen(out: Option<&Path>) -> anyhow::Result<(AdminSigningKey, String)> {
    let mut seed = [0u8; 32];
    getrandom(&mut seed)?;
    let key = AdminSigningKey::from_seed(seed);
    let text = key.to_text();
    if let Some(p) = out {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(p)
            .with_context(|| format!("creating admin key file {} (never replaced)", p.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing admin key file {}", p.display()))?;
    }
    Ok((key, text))
}

/// 32 random bytes from the OS (/dev/urandom: no extra crate for one read).
fn getrandom(buf: &mut [u8]) -> anyhow::Result<()> {
    use std::io::Read as _;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .context("reading /dev/urandom")
}

fn now_ms() -> u64 {
    meshd_time::unix_millis()
}

/// The coordinator's chain, verified here from its first link (whose keys signed it
/// themselves), and, when `keys` is not empty, checked to contain one of them: the
/// fingerprint to trust. `None`: no admin key registered.
pub fn verified_chain(
    c: &Client,
    keys: &[AdminSigningKey],
) -> anyhow::Result<(SignedView, Option<Hash32>)> {
    let v: SignedView = c.get("/v1/admin/keys")?;
    let Some(first) = v.chain.first() else {
        return Ok((v, None));
    };
    check_genesis(first)
        .map_err(|e| anyhow::anyhow!("the coordinator's first admin key set: {e}"))?;
    for w in v.chain.windows(2) {
        check_successor(&w[0], &w[1])
            .map_err(|e| anyhow::anyhow!("the coordinator's admin key-set chain is broken: {e}"))?;
    }
    let last = v.chain.last().unwrap_or(first);
    let set = last.key_set()?;
    if !keys.is_empty() && !keys.iter().any(|k| set.keys.contains(&k.public())) {
        anyhow::bail!(
            "none of the given admin keys is in the coordinator's admin key set (fingerprint {})",
            last.statement.hash()
        );
    }
    let fp = last.statement.hash();
    if v.fingerprint != Some(fp) {
        anyhow::bail!(
            "the coordinator reports fingerprint {:?}, its chain says {fp}",
            v.fingerprint
        );
    }
    Ok((v, Some(fp)))
}

/// The next key set: `change` applied to the current keys (none yet: the first set, signed
/// by its own key and registered on trust), signed by `keys`, as a request to post.
pub fn prepare_keys(
    c: &Client,
    keys: &[AdminSigningKey],
    change: impl FnOnce(&mut Vec<AdminKey>),
    quorum: Option<u32>,
) -> anyhow::Result<Prepared> {
    let (v, _) = verified_chain(c, &[])?;
    let (seq, prev, mut set, old_quorum) = match v.chain.last() {
        Some(s) => {
            let k = s.key_set()?;
            (k.seq + 1, s.statement.hash(), k.keys.clone(), k.quorum)
        }
        None => (1, Hash32::ZERO, Vec::new(), 1),
    };
    change(&mut set);
    set.sort();
    set.dedup();
    let quorum = quorum.unwrap_or(old_quorum).min(set.len().max(1) as u32);
    let st = Statement::KeySet(KeySetStatement {
        seq,
        keys: set,
        quorum,
        prev,
        at_ms: now_ms(),
    });
    let signed = prepared::sign(st, keys);
    Ok(Prepared::new(c.base(), v.chain, Request::KeySet { signed }))
}

/// [`prepare_keys`], posted.
pub fn change_keys(
    c: &Client,
    keys: &[AdminSigningKey],
    change: impl FnOnce(&mut Vec<AdminKey>),
    quorum: Option<u32>,
) -> anyhow::Result<SignedView> {
    match submit(c, &prepare_keys(c, keys, change, quorum)?.request)? {
        Submitted::Keys(v) => Ok(v),
        _ => anyhow::bail!("unexpected reply kind"),
    }
}

fn need_keys(keys: &[AdminSigningKey]) -> anyhow::Result<()> {
    if keys.is_empty() {
        anyhow::bail!("give the admin key to sign with: --admin-key FILE (or MESH_ADMIN_KEY)");
    }
    Ok(())
}

/// `policy apply` signed, as a request to post: the statement names the next version and
/// the previous statement.
pub fn prepare_policy(
    c: &Client,
    keys: &[AdminSigningKey],
    yaml: String,
) -> anyhow::Result<Prepared> {
    let (v, _) = verified_chain(c, keys)?;
    let current: meshd_control::api::PolicyCurrent = c.get("/v1/policy")?;
    let signed = sign_policy(&v, keys, &yaml);
    Ok(Prepared::new(
        c.base(),
        v.chain,
        Request::Policy {
            yaml,
            previous_yaml: current.policy.map(|p| p.yaml),
            signed,
        },
    ))
}

/// `policy apply` signed and posted.
pub fn apply_policy(
    c: &Client,
    keys: &[AdminSigningKey],
    yaml: String,
) -> anyhow::Result<meshd_control::api::PolicyApplied> {
    need_keys(keys)?;
    match submit(c, &prepare_policy(c, keys, yaml)?.request)? {
        Submitted::Policy(r) => Ok(r),
        _ => anyhow::bail!("unexpected reply kind"),
    }
}

/// The statement of the next policy version, for `yaml`, signed by `keys`.
pub fn sign_policy(v: &SignedView, keys: &[AdminSigningKey], yaml: &str) -> Signed {
    let st = Statement::Policy(PolicyStatement {
        seq: v.policy_version + 1,
        sha256: Hash32::of(yaml.as_bytes()),
        prev: v
            .policy
            .as_ref()
            .map_or(Hash32::ZERO, |p| p.statement.hash()),
        at_ms: now_ms(),
    });
    prepared::sign(st, keys)
}

/// `policy rollback N` signed, as a request to post: the file of version N, signed as the
/// next version.
pub fn prepare_rollback(
    c: &Client,
    keys: &[AdminSigningKey],
    version: u64,
) -> anyhow::Result<Prepared> {
    let (v, _) = verified_chain(c, keys)?;
    let history: Vec<PolicyRecord> = c.get("/v1/policy/history")?;
    let old = history
        .iter()
        .find(|p| p.version == version)
        .ok_or_else(|| {
            anyhow::anyhow!("no policy version {version} (see `meshctl policy history`)")
        })?;
    let signed = sign_policy(&v, keys, &old.yaml);
    Ok(Prepared::new(
        c.base(),
        v.chain,
        Request::Rollback {
            version,
            yaml: old.yaml.clone(),
            signed,
        },
    ))
}

/// `policy rollback N` signed and posted.
pub fn rollback_policy(
    c: &Client,
    keys: &[AdminSigningKey],
    version: u64,
) -> anyhow::Result<meshd_control::api::PolicyApplied> {
    need_keys(keys)?;
    match submit(c, &prepare_rollback(c, keys, version)?.request)? {
        Submitted::Policy(r) => Ok(r),
        _ => anyhow::bail!("unexpected reply kind"),
    }
}

/// A signed host change as a request to post: the host's current name and labels with
/// `change` applied, signed for its key, and the quarantine lifted if `release`.
pub fn prepare_host(
    c: &Client,
    keys: &[AdminSigningKey],
    host: &str,
    change: impl FnOnce(&mut String, &mut Labels),
    release: bool,
) -> anyhow::Result<Prepared> {
    let (v, _) = verified_chain(c, keys)?;
    let h: HostView = c.get(&format!("/v1/hosts/{}", segment(host)))?;
    let (mut name, mut labels) = (h.name.clone(), h.labels.clone());
    change(&mut name, &mut labels);
    let st = Statement::Host(HostStatement {
        key: h.public_key,
        name,
        labels,
        at_ms: now_ms(),
    });
    Ok(Prepared::new(
        c.base(),
        v.chain,
        Request::Host {
            host: h.public_key.to_string(),
            name_before: h.name,
            labels_before: h.labels,
            release,
            signed: prepared::sign(st, keys),
        },
    ))
}

/// A signed host change, posted.
pub fn host_change(
    c: &Client,
    keys: &[AdminSigningKey],
    host: &str,
    change: impl FnOnce(&mut String, &mut Labels),
    release: bool,
) -> anyhow::Result<HostView> {
    need_keys(keys)?;
    match submit(c, &prepare_host(c, keys, host, change, release)?.request)? {
        Submitted::Host(h) => Ok(h),
        _ => anyhow::bail!("unexpected reply kind"),
    }
}

/// The coordinator's answer to a posted signed request.
#[derive(Debug, serde::Serialize)]
#[serde(untagged)]
pub enum Submitted {
    /// A policy version (apply or rollback).
    Policy(meshd_control::api::PolicyApplied),
    /// One host.
    Host(HostView),
    /// A batch of hosts (signed import).
    Hosts(SignedHostsApplied),
    /// The key set.
    Keys(SignedView),
    /// The runtime learning setting.
    Mode(meshd_control::api::PolicyModeView),
}

/// Posts a signed request to its endpoint (the coordinator verifies it).
pub fn submit(c: &Client, r: &Request) -> anyhow::Result<Submitted> {
    Ok(match r {
        Request::Policy { yaml, signed, .. } => Submitted::Policy(c.post(
            "/v1/signed/policy",
            &SignedPolicyRequest {
                yaml: yaml.clone(),
                signed: signed.clone(),
            },
        )?),
        Request::Rollback {
            version, signed, ..
        } => Submitted::Policy(c.post(
            &format!("/v1/signed/rollback/{version}"),
            &SignedRollbackRequest {
                signed: signed.clone(),
            },
        )?),
        Request::Host {
            host,
            release,
            signed,
            ..
        } => Submitted::Host(c.post(
            &format!("/v1/signed/hosts/{}", segment(host)),
            &SignedHostRequest {
                signed: signed.clone(),
                release: *release,
            },
        )?),
        Request::Hosts {
            statements, policy, ..
        } => Submitted::Hosts(c.post(
            "/v1/signed/hosts",
            &SignedHostsRequest {
                statements: statements.clone(),
                policy: policy.clone(),
            },
        )?),
        Request::KeySet { signed } => Submitted::Keys(c.post("/v1/admin/keys", signed)?),
        Request::Mode { signed, .. } => Submitted::Mode(c.post(
            "/v1/signed/mode",
            &meshd_control::api::SignedModeRequest {
                signed: signed.clone(),
            },
        )?),
    })
}

/// `policy mode learn|enforce [--group G]` signed, as a request to post: the whole next
/// runtime learning setting (the coordinator's current one changed as the command says).
pub fn prepare_mode(
    c: &Client,
    keys: &[AdminSigningKey],
    mode: meshd_policy::PolicyMode,
    group: Option<meshd_control::Labels>,
) -> anyhow::Result<Prepared> {
    let (v, _) = verified_chain(c, keys)?;
    let before = v.runtime_mode.clone();
    let mut next = before.clone();
    match (mode, group) {
        (meshd_policy::PolicyMode::Learn, None) => next.all = true,
        (meshd_policy::PolicyMode::Learn, Some(g)) => {
            if !next.groups.contains(&g) {
                next.groups.push(g);
            }
        }
        (meshd_policy::PolicyMode::Enforce, None) => {
            next.all = false;
            next.groups.clear();
        }
        (meshd_policy::PolicyMode::Enforce, Some(g)) => {
            let Some(i) = next.groups.iter().position(|x| *x == g) else {
                anyhow::bail!(
                    "that group is not a runtime learning group (see `meshctl policy mode`); \
                     learning the policy file declares is ended by editing the file"
                );
            };
            next.groups.remove(i);
        }
    }
    let st = Statement::Mode(meshd_control::signed::ModeStatement {
        seq: v
            .mode
            .as_ref()
            .and_then(|m| m.mode().ok())
            .map_or(1, |m| m.seq + 1),
        all: next.all,
        groups: next.groups,
        prev: v.mode.as_ref().map_or(Hash32::ZERO, |m| m.statement.hash()),
        at_ms: now_ms(),
    });
    let signed = prepared::sign(st, keys);
    Ok(Prepared::new(
        c.base(),
        v.chain,
        Request::Mode { before, signed },
    ))
}

/// Refuses a prepared request the coordinator has moved past (another key set, another next
/// policy version) with a message that says so, before posting it.
pub fn check_fresh(c: &Client, p: &Prepared, file: &Path) -> anyhow::Result<()> {
    let (v, fp) = verified_chain(c, &[])?;
    let f = file.display();
    match &p.request {
        Request::KeySet { signed } => {
            let k = signed.key_set()?;
            let (seq, prev) = match v.chain.last() {
                Some(l) => (l.key_set()?.seq + 1, l.statement.hash()),
                None => (1, Hash32::ZERO),
            };
            if k.seq != seq || k.prev != prev {
                anyhow::bail!(
                    "{f} is stale: it proposes admin key set version {} after {}, but the \
                     coordinator's next is version {seq} after {prev} (the key set changed since \
                     it was prepared): prepare it again",
                    k.seq,
                    k.prev
                );
            }
        }
        _ => {
            if p.fingerprint() != fp {
                anyhow::bail!(
                    "{f} is stale: it was prepared for admin key set {}, but the coordinator's is \
                     now {}: prepare it again and have it signed by the current set",
                    p.fingerprint()
                        .map_or_else(|| "(none)".into(), |h| h.to_string()),
                    fp.map_or_else(
                        || "(none: the mesh runs unsigned)".into(),
                        |h| h.to_string()
                    ),
                );
            }
        }
    }
    if let Some((_, s)) = p.request.policy() {
        let st = s.policy()?;
        let next = v.policy_version + 1;
        let prev = v
            .policy
            .as_ref()
            .map_or(Hash32::ZERO, |p| p.statement.hash());
        if st.seq != next || st.prev != prev {
            anyhow::bail!(
                "{f} is stale: it signs policy version {}, but the coordinator's next policy \
                 version is {next}{} (a policy was applied since it was prepared): prepare it again",
                st.seq,
                if st.seq == next {
                    " after another statement"
                } else {
                    ""
                }
            );
        }
    }
    if let Request::Host { host, signed, .. } = &p.request {
        let h: HostView = c
            .get(&format!("/v1/hosts/{}", segment(host)))
            .map_err(|e| anyhow::anyhow!("{f}: the host it signs for: {e}"))?;
        if Some(h.public_key) != signed.host().ok().map(|s| s.key) {
            anyhow::bail!("{f}: the host it names has another key now: prepare it again");
        }
    }
    Ok(())
}

/// Checks that a join token carries the fingerprint of the chain verified here.
pub fn check_token_pin(c: &Client, keys: &[AdminSigningKey], token: &str) -> anyhow::Result<()> {
    let (_, fp) = verified_chain(c, keys)?;
    let pin = meshd_control::JoinToken::admin_pin(token)
        .map_err(|e| anyhow::anyhow!("the coordinator returned a bad join token: {e}"))?;
    if pin != fp {
        anyhow::bail!(
            "the join token pins admin keys {pin:?} but the verified admin key set is {fp:?}: not printing it"
        );
    }
    Ok(())
}
