//! Prepared signed requests: signatures collected on several machines for a quorum above 1.
//! Every signed command given `--prepare FILE` writes what it would post (the statement(s),
//! the signatures made so far, the payload and target) to FILE instead of posting it;
//! `meshctl admin cosign FILE --admin-key K` checks it and adds K's signatures (write a temp
//! file, then rename); `meshctl admin submit FILE` posts it. The format is versioned
//! ([`FORMAT`]) and described in docs/ARCHITECTURE.md ("Collecting signatures").
//!
//! The file holds no secret. It carries the admin key-set chain it was prepared against, so a
//! cosigner without access to the coordinator can check the signer set (from its first link,
//! as `admin keys` does) and see what it signs; the coordinator checks everything again.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use meshd_control::api::SignedPolicyRequest;
use meshd_control::signed::{
    check_genesis, check_successor, AdminSigningKey, Hash32, KeySetStatement, Signed, Statement,
};
use serde::{Deserialize, Serialize};

use crate::output;

/// The version of the file format written here (and the only one read).
pub const FORMAT: u32 = 1;

/// A prepared signed request (`--prepare FILE`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepared {
    /// [`FORMAT`].
    pub format: u32,
    /// The coordinator it was prepared against (informational).
    pub server: String,
    /// When it was prepared (Unix milliseconds).
    pub prepared_at_ms: u64,
    /// The coordinator's admin key-set chain then, oldest first (empty: the first key set).
    pub chain: Vec<Signed>,
    /// What `admin submit` posts.
    pub request: Request,
}

/// What a prepared file posts, by kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Request {
    /// `policy apply`: `POST /v1/signed/policy`.
    Policy {
        /// The policy file.
        yaml: String,
        /// The file of the version it replaces (for the cosigners' summary; not signed).
        #[serde(default)]
        previous_yaml: Option<String>,
        /// Its statement (the next policy version).
        signed: Signed,
    },
    /// `policy rollback V`: `POST /v1/signed/rollback/{version}`.
    Rollback {
        /// The version whose file is re-applied.
        version: u64,
        /// That version's file (what the statement's hash covers).
        yaml: String,
        /// Its statement (the next policy version).
        signed: Signed,
    },
    /// `host label|unlabel|rename|release`: `POST /v1/signed/hosts/{host}`.
    Host {
        /// The host (its WireGuard key, as the statement names it).
        host: String,
        /// Its name when prepared.
        name_before: String,
        /// Its labels when prepared.
        labels_before: meshd_control::Labels,
        /// Also lift its quarantine.
        release: bool,
        /// The host statement.
        signed: Signed,
    },
    /// A signed CMDB import: `POST /v1/signed/hosts`, all or none.
    Hosts {
        /// The import file's name (informational).
        source: String,
        /// Host statements.
        statements: Vec<Signed>,
        /// The declared flows' policy, applied with them (`import --apply`).
        #[serde(default)]
        policy: Option<SignedPolicyRequest>,
    },
    /// `admin add-key|remove-key`: `POST /v1/admin/keys`.
    KeySet {
        /// The next key set.
        signed: Signed,
    },
    /// `policy mode learn|enforce [--group G]`: `POST /v1/signed/mode`.
    Mode {
        /// The runtime learning setting it replaces (for the cosigners' summary; not signed).
        before: meshd_control::state::RuntimeMode,
        /// The next setting, whole.
        signed: Signed,
    },
}

impl Request {
    /// The kind as the file names it.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Policy { .. } => "policy",
            Request::Rollback { .. } => "rollback",
            Request::Host { .. } => "host",
            Request::Hosts { .. } => "hosts",
            Request::KeySet { .. } => "key_set",
            Request::Mode { .. } => "mode",
        }
    }

    /// Every statement to sign.
    pub fn statements(&self) -> Vec<&Signed> {
        match self {
            Request::Policy { signed, .. }
            | Request::Rollback { signed, .. }
            | Request::Host { signed, .. }
            | Request::KeySet { signed }
            | Request::Mode { signed, .. } => vec![signed],
            Request::Hosts {
                statements, policy, ..
            } => statements
                .iter()
                .chain(policy.as_ref().map(|p| &p.signed))
                .collect(),
        }
    }

    fn statements_mut(&mut self) -> Vec<&mut Signed> {
        match self {
            Request::Policy { signed, .. }
            | Request::Rollback { signed, .. }
            | Request::Host { signed, .. }
            | Request::KeySet { signed }
            | Request::Mode { signed, .. } => vec![signed],
            Request::Hosts {
                statements, policy, ..
            } => statements
                .iter_mut()
                .chain(policy.as_mut().map(|p| &mut p.signed))
                .collect(),
        }
    }

    /// The signed policy statement inside, with the file it covers.
    pub fn policy(&self) -> Option<(&str, &Signed)> {
        match self {
            Request::Policy { yaml, signed, .. } | Request::Rollback { yaml, signed, .. } => {
                Some((yaml, signed))
            }
            Request::Hosts {
                policy: Some(p), ..
            } => Some((&p.yaml, &p.signed)),
            _ => None,
        }
    }
}

/// Checks an admin key-set chain from its first link (trust on first use, as `admin keys`).
pub fn verify_chain(chain: &[Signed]) -> anyhow::Result<Option<&Signed>> {
    let Some(first) = chain.first() else {
        return Ok(None);
    };
    check_genesis(first).map_err(|e| anyhow::anyhow!("the first admin key set: {e}"))?;
    for w in chain.windows(2) {
        check_successor(&w[0], &w[1])
            .map_err(|e| anyhow::anyhow!("the admin key-set chain is broken: {e}"))?;
    }
    Ok(chain.last())
}

impl Prepared {
    /// A new prepared request.
    pub fn new(server: &str, chain: Vec<Signed>, request: Request) -> Self {
        Prepared {
            format: FORMAT,
            server: server.to_string(),
            prepared_at_ms: meshd_time::unix_millis(),
            chain,
            request,
        }
    }

    /// Reads FILE (any other format version is refused).
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read prepared request {}", path.display()))?;
        #[derive(Deserialize)]
        struct Version {
            format: Option<u32>,
        }
        let v: Version = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a prepared request (JSON written by --prepare)",
                path.display()
            )
        })?;
        if v.format != Some(FORMAT) {
            anyhow::bail!(
                "{}: prepared-request format {:?}, this meshctl reads format {FORMAT} only",
                path.display(),
                v.format
            );
        }
        let p: Prepared = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid prepared request", path.display()))?;
        p.check_content()
            .with_context(|| format!("{} is inconsistent", path.display()))?;
        Ok(p)
    }

    fn text(&self) -> anyhow::Result<String> {
        let mut s = serde_json::to_string_pretty(self).context("encoding the prepared request")?;
        s.push('\n');
        Ok(s)
    }

    /// Writes a new FILE (never replacing one).
    pub fn write_new(&self, path: &Path) -> anyhow::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .with_context(|| {
                format!(
                    "creating prepared request {} (an existing file is never replaced)",
                    path.display()
                )
            })?;
        f.write_all(self.text()?.as_bytes())
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing prepared request {}", path.display()))
    }

    /// Replaces FILE atomically: a temporary file next to it, synced, then renamed over it.
    pub fn replace(&self, path: &Path) -> anyhow::Result<()> {
        let name = path
            .file_name()
            .ok_or_else(|| anyhow::anyhow!("{} is not a file name", path.display()))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{}.tmp", std::process::id()));
        let tmp: PathBuf = path.with_file_name(tmp_name);
        let r = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            f.write_all(self.text()?.as_bytes())
                .and_then(|()| f.sync_all())
                .with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, path)
                .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
        })();
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r
    }

    /// The statements are of the right kind and the files they cover match their hashes.
    fn check_content(&self) -> anyhow::Result<()> {
        let kinds_ok = match &self.request {
            Request::Policy { signed, .. } | Request::Rollback { signed, .. } => {
                signed.policy().is_ok()
            }
            Request::Host { signed, .. } => signed.host().is_ok(),
            Request::Hosts {
                statements, policy, ..
            } => {
                statements.iter().all(|s| s.host().is_ok())
                    && policy.as_ref().is_none_or(|p| p.signed.policy().is_ok())
            }
            Request::KeySet { signed } => signed.key_set().is_ok(),
            Request::Mode { signed, .. } => signed.mode().is_ok(),
        };
        if !kinds_ok {
            anyhow::bail!("a statement is not of the kind {:?}", self.request.kind());
        }
        if let Some((yaml, s)) = self.request.policy() {
            let st = s.policy()?;
            if Hash32::of(yaml.as_bytes()) != st.sha256 {
                anyhow::bail!("the policy file does not match the sha256 its statement signs");
            }
        }
        Ok(())
    }

    /// The key set whose signatures count: the last of the chain (verified from its first
    /// link), or, registering the first set, that set itself.
    pub fn signer_set(&self) -> anyhow::Result<KeySetStatement> {
        match verify_chain(&self.chain)? {
            Some(last) => Ok(last.key_set()?.clone()),
            None => match &self.request {
                Request::KeySet { signed } => Ok(signed.key_set()?.clone()),
                _ => anyhow::bail!("no admin key set in the file: nothing can sign it"),
            },
        }
    }

    /// Fingerprint of the key set it was prepared against (`None`: the first set).
    pub fn fingerprint(&self) -> Option<Hash32> {
        self.chain.last().map(|s| s.statement.hash())
    }

    /// Every signature must be by a key of `set`, once per statement, and valid.
    pub fn check_signatures(&self, set: &KeySetStatement) -> anyhow::Result<()> {
        for s in self.request.statements() {
            let mut seen = Vec::new();
            for sig in &s.sigs {
                if set.keys.binary_search(&sig.key).is_err() {
                    anyhow::bail!(
                        "a signature by {} is not by a key of the admin key set",
                        sig.key
                    );
                }
                if seen.contains(&sig.key) {
                    anyhow::bail!("{} signed a statement twice", sig.key);
                }
                seen.push(sig.key);
                let one = Signed {
                    statement: s.statement.clone(),
                    sigs: vec![sig.clone()],
                    successions: Vec::new(),
                };
                if one.valid_signers(set) != 1 {
                    anyhow::bail!(
                        "the signature by {} does not verify: the file was changed after it was signed",
                        sig.key
                    );
                }
            }
        }
        Ok(())
    }

    /// Valid signatures by distinct keys of `set` (the fewest over its statements).
    pub fn signers(&self, set: &KeySetStatement) -> usize {
        self.request
            .statements()
            .iter()
            .map(|s| s.valid_signers(set))
            .min()
            .unwrap_or(0)
    }

    /// Adds `key`'s signature to every statement (refused: a key outside `set`, or one that
    /// signed already).
    pub fn cosign(&mut self, set: &KeySetStatement, key: &AdminSigningKey) -> anyhow::Result<()> {
        let k = key.public();
        if set.keys.binary_search(&k).is_err() {
            anyhow::bail!(
                "admin key {k} is not in the admin key set this request is for (see `meshctl admin keys`): not signing"
            );
        }
        if self
            .request
            .statements()
            .iter()
            .any(|s| s.sigs.iter().any(|x| x.key == k))
        {
            anyhow::bail!("admin key {k} has already signed this request");
        }
        for s in self.request.statements_mut() {
            let sig = key.sign(&s.statement);
            s.sigs.push(sig);
        }
        Ok(())
    }

    /// What is being signed, for people.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        match &self.request {
            Request::Policy {
                yaml,
                previous_yaml,
                signed,
            } => {
                if let Ok(p) = signed.policy() {
                    s.push_str(&format!(
                        "policy version {} (sha256 {}, {} bytes)\n",
                        p.seq,
                        p.sha256,
                        yaml.len()
                    ));
                }
                match previous_yaml {
                    Some(old) => s.push_str(&line_diff(old, yaml)),
                    None => s.push_str("  (no previous policy)\n"),
                }
            }
            Request::Rollback {
                version,
                yaml,
                signed,
            } => {
                if let Ok(p) = signed.policy() {
                    s.push_str(&format!(
                        "policy version {} = the file of version {version} (rollback; sha256 {}, {} bytes)\n",
                        p.seq,
                        p.sha256,
                        yaml.len()
                    ));
                }
            }
            Request::Host {
                name_before,
                labels_before,
                release,
                signed,
                ..
            } => {
                if let Ok(h) = signed.host() {
                    s.push_str(&host_line(name_before, labels_before, h));
                    if *release {
                        s.push_str("  and release its quarantine\n");
                    }
                }
            }
            Request::Hosts {
                source,
                statements,
                policy,
            } => {
                s.push_str(&format!(
                    "signed import of {source}: {} host(s), all or none\n",
                    statements.len()
                ));
                for st in statements {
                    if let Ok(h) = st.host() {
                        s.push_str(&format!(
                            "  host {} ({}) = {}\n",
                            h.name,
                            h.key,
                            output::labels(&h.labels)
                        ));
                    }
                }
                if let Some(p) = policy {
                    if let Ok(st) = p.signed.policy() {
                        s.push_str(&format!(
                            "  and policy version {} (sha256 {}, the declared flows' rules)\n",
                            st.seq, st.sha256
                        ));
                    }
                }
            }
            Request::KeySet { signed } => {
                if let Ok(k) = signed.key_set() {
                    s.push_str(&format!(
                        "admin key set version {}: {} key(s), {} signature(s) needed from then on\n",
                        k.seq,
                        k.keys.len(),
                        k.quorum
                    ));
                    let old: Vec<_> = self
                        .chain
                        .last()
                        .and_then(|c| c.key_set().ok())
                        .map(|c| c.keys.clone())
                        .unwrap_or_default();
                    for key in &k.keys {
                        let mark = if old.contains(key) { " " } else { "+" };
                        s.push_str(&format!("  {mark} {key}\n"));
                    }
                    for key in old.iter().filter(|o| !k.keys.contains(o)) {
                        s.push_str(&format!("  - {key}\n"));
                    }
                }
            }
            Request::Mode { before, signed } => {
                if let Ok(m) = signed.mode() {
                    let text = |all: bool, groups: &[meshd_control::Labels]| {
                        let mut parts: Vec<String> = groups
                            .iter()
                            .map(|g| {
                                g.iter()
                                    .map(|(k, v)| format!("{k}={v}"))
                                    .collect::<Vec<_>>()
                                    .join(",")
                            })
                            .collect();
                        if all {
                            parts.insert(0, "the whole mesh".into());
                        }
                        if parts.is_empty() {
                            "nothing (enforce)".into()
                        } else {
                            parts.join("; ")
                        }
                    };
                    s.push_str(&format!(
                        "learning mode setting {}: learning {} (was {})\n",
                        m.seq,
                        text(m.all, &m.groups),
                        text(before.all, &before.groups)
                    ));
                }
            }
        }
        s
    }

    /// How far the quorum is, for people.
    pub fn progress(&self, set: &KeySetStatement, path: &Path) -> String {
        let have = self.signers(set);
        let need = set.quorum as usize;
        let fp = self
            .fingerprint()
            .map_or_else(|| "(first set)".to_string(), |f| f.to_string());
        if have >= need {
            format!(
                "{have} of {need} signature(s) by admin key set {fp}: quorum reached; post it with `meshctl admin submit {}`\n",
                path.display()
            )
        } else {
            format!(
                "{have} of {need} signature(s) by admin key set {fp}: {} more needed (`meshctl admin cosign {} --admin-key FILE`)\n",
                need - have,
                path.display()
            )
        }
    }
}

fn host_line(
    name_before: &str,
    labels_before: &meshd_control::Labels,
    h: &meshd_control::signed::HostStatement,
) -> String {
    let mut s = format!("host {name_before} ({})", h.key);
    if h.name != name_before {
        s.push_str(&format!(" renamed to {}", h.name));
    }
    s.push_str(&format!(" = {}\n", output::labels(&h.labels)));
    for (k, v) in &h.labels {
        match labels_before.get(k) {
            None => s.push_str(&format!("  + {k}={v}\n")),
            Some(old) if old != v => s.push_str(&format!("  ~ {k}={old} -> {v}\n")),
            Some(_) => {}
        }
    }
    for (k, v) in labels_before {
        if !h.labels.contains_key(k) {
            s.push_str(&format!("  - {k}={v}\n"));
        }
    }
    s
}

/// Lines only in `new` (`+`) and only in `old` (`-`): a cheap summary, not a real diff.
fn line_diff(old: &str, new: &str) -> String {
    let (o, n): (Vec<&str>, Vec<&str>) = (old.lines().collect(), new.lines().collect());
    let mut s = String::new();
    for l in o.iter().filter(|l| !n.contains(l)) {
        s.push_str(&format!("  - {l}\n"));
    }
    for l in n.iter().filter(|l| !o.contains(l)) {
        s.push_str(&format!("  + {l}\n"));
    }
    if s.is_empty() {
        s.push_str("  (the same lines as the current policy)\n");
    }
    s
}

/// Signed statement of `st` by `keys` (none: unsigned yet, to be cosigned).
pub fn sign(st: Statement, keys: &[AdminSigningKey]) -> Signed {
    Signed::sign(st, &keys.iter().collect::<Vec<_>>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshd_control::signed::{HostStatement, PolicyStatement};

    fn key(n: u8) -> AdminSigningKey {
        AdminSigningKey::from_seed([n; 32])
    }

    fn chain(keys: &[&AdminSigningKey], quorum: u32) -> Vec<Signed> {
        let mut ks: Vec<_> = keys.iter().map(|k| k.public()).collect();
        ks.sort();
        vec![Signed::sign(
            Statement::KeySet(KeySetStatement {
                seq: 1,
                keys: ks,
                quorum,
                prev: Hash32::ZERO,
                at_ms: 1,
            }),
            keys,
        )]
    }

    #[test]
    fn cosign_checks_keys_and_signatures_and_counts_the_quorum() {
        let (k1, k2, k3) = (key(1), key(2), key(3));
        let yaml = "rules: []\n".to_string();
        let st = Statement::Policy(PolicyStatement {
            seq: 1,
            sha256: Hash32::of(yaml.as_bytes()),
            prev: Hash32::ZERO,
            at_ms: 5,
        });
        let mut p = Prepared::new(
            "http://x",
            chain(&[&k1, &k2], 2),
            Request::Policy {
                yaml,
                previous_yaml: None,
                signed: sign(st, std::slice::from_ref(&k1)),
            },
        );
        let set = p.signer_set().unwrap();
        p.check_signatures(&set).unwrap();
        assert_eq!(p.signers(&set), 1);
        let e = p.cosign(&set, &k3).unwrap_err().to_string();
        assert!(e.contains("not in the admin key set"), "{e}");
        let e = p.cosign(&set, &k1).unwrap_err().to_string();
        assert!(e.contains("already signed"), "{e}");
        p.cosign(&set, &k2).unwrap();
        assert_eq!(p.signers(&set), 2);
        // A tampered signature is caught before cosigning.
        let mut bad = p.clone();
        if let Request::Policy { signed, .. } = &mut bad.request {
            signed.sigs[0].sig.0[0] ^= 1;
        }
        assert!(bad.check_signatures(&set).is_err());
        // Round trip through a file; the format is checked.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("req.json");
        p.write_new(&f).unwrap();
        assert!(p.write_new(&f).is_err(), "never overwrites");
        assert_eq!(Prepared::read(&f).unwrap(), p);
        p.replace(&f).unwrap();
        let text = std::fs::read_to_string(&f)
            .unwrap()
            .replace("\"format\": 1", "\"format\": 2");
        std::fs::write(&f, text).unwrap();
        assert!(Prepared::read(&f)
            .unwrap_err()
            .to_string()
            .contains("format"));
    }

    #[test]
    fn a_batch_is_signed_whole_and_summarised() {
        let k1 = key(1);
        let h = |n: u8| {
            Statement::Host(HostStatement {
                key: meshd_tunnel::PrivateKey::from_bytes([n; 32]).public_key(),
                name: format!("h{n}"),
                labels: [("app".to_string(), "db".to_string())].into(),
                at_ms: 9,
            })
        };
        let mut p = Prepared::new(
            "http://x",
            chain(&[&k1], 1),
            Request::Hosts {
                source: "cmdb.csv".into(),
                statements: vec![sign(h(1), &[]), sign(h(2), &[])],
                policy: None,
            },
        );
        let set = p.signer_set().unwrap();
        assert_eq!(p.signers(&set), 0);
        p.cosign(&set, &k1).unwrap();
        assert_eq!(p.signers(&set), 1);
        let s = p.summary();
        assert!(s.contains("2 host(s)") && s.contains("host h2"), "{s}");
    }
}
