//! The admin operations ([`AdminOp`] in, [`AdminReply`] out): what the HTTP API and in-process
//! callers ask the actor to do. The actor lends them its state for one operation ([`Ops`]);
//! the events they record are committed with the batch, before the reply goes out.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use meshd_control::api::{
    AdminTokenCreateRequest, AdminTokenCreated, AdminTokenView, BlocksQuery, ConnectedAgent,
    EventView, ExplainRequest, GuardStats, HealthView, HostView, PolicyApplied, PolicyCheck,
    PolicyCurrent, PolicyModeRequest, StatusView, TokenCreateRequest, TokenCreated, TokenView,
    EVENTS_MAX,
};
use meshd_control::state::{check_policy_size, AdminError, TokenSpec};
use meshd_control::{
    AuditEvent, CoordinatorState, EventKind, Host, HostId, JoinToken, Labels, TokenId, TokenSecret,
    UnixTime,
};
use meshd_tunnel::PublicKey;
use rand_core::{OsRng, RngCore as _};
use tracing::info;

/// An admin operation (the HTTP API and in-process callers use the same set).
#[derive(Debug, Clone)]
pub enum AdminOp {
    /// All non-removed hosts.
    ListHosts,
    /// One host by name, id or key.
    ShowHost(String),
    /// Add/replace labels.
    Label(String, Labels),
    /// Remove labels by key.
    Unlabel(String, Vec<String>),
    /// Rename.
    Rename(String, String),
    /// Remove from the mesh.
    Remove(String),
    /// New join token.
    CreateToken(TokenCreateRequest),
    /// All tokens.
    ListTokens,
    /// Revoke a token.
    RevokeToken(TokenId),
    /// Status.
    Status,
    /// The current policy.
    PolicyGet,
    /// Apply a policy file (refused if it does not parse or its tests fail).
    PolicyApply(String),
    /// Every applied version.
    PolicyHistory,
    /// Re-apply an earlier version.
    PolicyRollback(u64),
    /// Access changes if this file were applied.
    PolicyDiff(String),
    /// Parse and run the file's tests against the inventory.
    PolicyCheck(String),
    /// Allowed or denied, and by which rule.
    Explain(ExplainRequest),
    /// Which hosts learn, and why (`meshctl policy mode`).
    PolicyModeGet,
    /// Set the runtime learning mode (`meshctl policy mode learn|enforce [--group …]`).
    PolicyModeSet(PolicyModeRequest),
    /// Cut a host off from every peer.
    Quarantine(String),
    /// Undo a quarantine.
    Release(String),
    /// Remove a host for good; its key is refused from then on.
    Revoke(String),
    /// Recent block events.
    Blocks(BlocksQuery),
    /// The newest `limit` audit events (at most [`EVENTS_MAX`]), oldest first.
    Events {
        /// How many.
        limit: u32,
    },
    /// Whether changes can be saved (answered even when nothing else is).
    Health,
    /// Import a CMDB file (host records, declared flows) as one change.
    Import(meshd_control::api::ImportRequest),
    /// Ask a connected host to rotate its key (`meshctl host rotate-key`).
    RotateKey(String),
    /// The admin key-set chain and the current policy statement (signed policy).
    AdminKeys,
    /// Add the next admin key set (the first on trust; later ones signed by a quorum).
    AddKeySet(meshd_control::signed::Signed),
    /// Apply a signed policy version.
    SignedPolicy(meshd_control::api::SignedPolicyRequest),
    /// Re-apply an earlier version, signed.
    SignedRollback(u64, meshd_control::signed::Signed),
    /// `POST /v1/signed/mode`: the runtime learning setting, signed.
    SignedMode(meshd_control::signed::Signed),
    /// Set a host's name and labels from a signed host statement (and lift its quarantine).
    SignedHost(String, meshd_control::api::SignedHostRequest),
    /// Set many hosts' names and labels from signed host statements, all or none (a signed
    /// CMDB import), with an optional signed policy version.
    SignedHosts(meshd_control::api::SignedHostsRequest),
    /// New named admin token (`meshctl admin token create`).
    CreateAdminToken(AdminTokenCreateRequest),
    /// All admin tokens, also expired and revoked ones (never their secrets or hashes).
    ListAdminTokens,
    /// Revoke an admin token by name (refused for the last valid one).
    RevokeAdminToken(String),
}

impl AdminOp {
    /// Whether the operation only reads the state (it changes nothing and logs nothing).
    pub fn is_read_only(&self) -> bool {
        use AdminOp as O;
        matches!(
            self,
            O::ListHosts
                | O::ShowHost(_)
                | O::ListTokens
                | O::Status
                | O::PolicyGet
                | O::PolicyHistory
                | O::PolicyDiff(_)
                | O::PolicyCheck(_)
                | O::Explain(_)
                | O::PolicyModeGet
                | O::Blocks(_)
                | O::Events { .. }
                | O::Health
                | O::AdminKeys
                | O::ListAdminTokens
        )
    }
}

/// The result of an [`AdminOp`].
#[derive(Debug, Clone)]
pub enum AdminReply {
    /// One host.
    Host(HostView),
    /// Hosts.
    Hosts(Vec<HostView>),
    /// One token.
    Token(TokenView),
    /// Tokens.
    Tokens(Vec<TokenView>),
    /// A new token.
    Created(TokenCreated),
    /// One admin token.
    AdminToken(AdminTokenView),
    /// Admin tokens, by name.
    AdminTokens(Vec<AdminTokenView>),
    /// A new admin token (its secret, this once).
    AdminTokenCreated(AdminTokenCreated),
    /// Status.
    Status(StatusView),
    /// Audit events, oldest first.
    Events(Vec<EventView>),
    /// Health.
    Health(HealthView),
    /// Any other JSON reply (policy, explain, blocks).
    Json(serde_json::Value),
}

/// Who the coordinator is, as join tokens and `status` show it.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    /// The control address join tokens carry.
    pub(crate) advertise: SocketAddr,
    /// The other replicas' control addresses (`--replica`), carried after `advertise`.
    pub(crate) replicas: Arc<[SocketAddr]>,
    /// The coordinator's static public key.
    pub(crate) public_key: PublicKey,
}

/// What one admin operation works on, lent by the actor.
pub(crate) struct Ops<'a> {
    /// The reconciliation state.
    pub(crate) state: &'a mut CoordinatorState,
    /// This batch's audit events (committed with the batch).
    pub(crate) events: &'a mut Vec<AuditEvent>,
    /// The newest committed events, oldest first.
    pub(crate) recent: &'a VecDeque<AuditEvent>,
    /// Who the coordinator is.
    pub(crate) identity: Identity,
    /// Whether commits work now.
    pub(crate) health: HealthView,
    /// Labels the scan detector sets (release removes them).
    pub(crate) restricted: &'a [(String, String)],
}

impl Ops<'_> {
    /// Runs `op` at `now`.
    pub(crate) fn run(self, now: UnixTime, op: AdminOp) -> Result<AdminReply, AdminError> {
        let Ops {
            state,
            events,
            recent,
            identity,
            health,
            restricted,
        } = self;
        let view = |state: &CoordinatorState, h: &Host| {
            let s = state.sessions().into_iter().find(|s| s.host == h.id);
            HostView {
                learning: state.is_learning(h.id),
                ..HostView::new(h, s.is_some(), s.map(|s| s.acked_version))
            }
        };
        let mut record = |kind, detail: String| events.push(AuditEvent::new(now, kind, detail));
        let named = |h: &Host| format!("{} ({})", h.name, h.id);
        // Once admin keys are registered, changes that can widen access must come signed.
        let unsigned = match &op {
            AdminOp::Label(..) => Some("host label"),
            AdminOp::Unlabel(..) => Some("host unlabel"),
            AdminOp::Rename(..) => Some("host rename"),
            AdminOp::Release(_) => Some("host release"),
            AdminOp::PolicyApply(_) => Some("policy apply"),
            AdminOp::PolicyRollback(_) => Some("policy rollback"),
            AdminOp::PolicyModeSet(_) => Some("policy mode (meshctl signs the setting)"),
            AdminOp::Import(_) => Some("import (meshctl signs the labels it sets)"),
            _ => None,
        };
        if let Some(what) = unsigned {
            state.require_unsigned(what)?;
        }
        Ok(match op {
            AdminOp::ListHosts => {
                let sessions: HashMap<HostId, u64> = state
                    .sessions()
                    .into_iter()
                    .map(|s| (s.host, s.acked_version))
                    .collect();
                AdminReply::Hosts(
                    state
                        .hosts()
                        .filter(|h| !h.removed)
                        .map(|h| HostView {
                            learning: state.is_learning(h.id),
                            ..HostView::new(
                                h,
                                sessions.contains_key(&h.id),
                                sessions.get(&h.id).copied(),
                            )
                        })
                        .collect(),
                )
            }
            AdminOp::ShowHost(r) => AdminReply::Host(view(state, state.find_host(&r)?)),
            AdminOp::Label(r, l) => {
                let h = state.set_labels(&r, l)?;
                AdminReply::Host(view(state, &h))
            }
            AdminOp::Unlabel(r, k) => {
                let h = state.remove_labels(&r, &k)?;
                AdminReply::Host(view(state, &h))
            }
            AdminOp::Rename(r, n) => {
                let h = state.rename(&r, &n)?;
                AdminReply::Host(view(state, &h))
            }
            AdminOp::Remove(r) => {
                let h = state.remove_host(&r)?;
                record(EventKind::HostRemoved, named(&h));
                AdminReply::Host(HostView::new(&h, false, None))
            }
            AdminOp::CreateToken(req) => {
                let mut secret = [0u8; 32];
                OsRng.fill_bytes(&mut secret);
                let secret = TokenSecret(secret);
                let t = state.create_token(
                    now,
                    TokenSpec {
                        labels: req.labels,
                        ttl_secs: req.ttl_secs,
                        uses: req.uses,
                    },
                    secret.hash(),
                )?;
                let jt = JoinToken {
                    control: identity.advertise,
                    replicas: identity.replicas.to_vec(),
                    coordinator_key: identity.public_key,
                    secret,
                };
                AdminReply::Created(TokenCreated {
                    token: jt.encode_pinned(state.admin_fingerprint().as_ref()),
                    info: TokenView::new(&t, now),
                })
            }
            AdminOp::ListTokens => {
                AdminReply::Tokens(state.tokens().map(|t| TokenView::new(t, now)).collect())
            }
            AdminOp::RevokeToken(id) => {
                AdminReply::Token(TokenView::new(&state.revoke_token(id)?, now))
            }
            AdminOp::CreateAdminToken(req) => {
                let token = crate::state_dir::generate_admin_token();
                let hash = meshd_control::token::hash_secret(token.as_bytes());
                let t = state.create_admin_token(now, &req.name, req.ttl_secs, hash)?;
                record(EventKind::AdminTokenCreated, t.name.clone());
                info!(token = %t.name, expires_at = ?t.expires_at, "admin token created");
                AdminReply::AdminTokenCreated(AdminTokenCreated {
                    token,
                    info: AdminTokenView::new(&t, now),
                })
            }
            AdminOp::ListAdminTokens => AdminReply::AdminTokens(
                state
                    .admin_tokens()
                    .iter()
                    .map(|t| AdminTokenView::new(t, now))
                    .collect(),
            ),
            AdminOp::RevokeAdminToken(name) => {
                let r = state.revoke_admin_token(now, &name)?;
                if r.changed {
                    record(EventKind::AdminTokenRevoked, r.token.name.clone());
                    info!(token = %r.token.name, "admin token revoked");
                }
                AdminReply::AdminToken(AdminTokenView::new(&r.token, now))
            }
            AdminOp::PolicyGet => json(&PolicyCurrent {
                policy: state.policy().cloned(),
            }),
            AdminOp::PolicyApply(yaml) => {
                check_policy_size(&yaml)?;
                let (rec, tests) = state.apply_policy(now, &yaml, "apply")?;
                info!(rules_version = rec.version, "policy applied");
                record(EventKind::PolicyApplied, format!("version {}", rec.version));
                json(&PolicyApplied {
                    version: rec.version,
                    tests,
                })
            }
            AdminOp::PolicyHistory => json(&state.policy_history()),
            AdminOp::PolicyRollback(v) => {
                let rec = state.rollback_policy(now, v)?;
                info!(
                    rules_version = rec.version,
                    restored_version = v,
                    "policy rolled back"
                );
                record(
                    EventKind::PolicyRollback,
                    format!("version {} = version {v}", rec.version),
                );
                json(&PolicyApplied {
                    version: rec.version,
                    tests: Vec::new(),
                })
            }
            AdminOp::PolicyDiff(yaml) => json(&{
                check_policy_size(&yaml)?;
                state.diff_policy(now, &yaml)?
            }),
            AdminOp::PolicyCheck(yaml) => {
                check_policy_size(&yaml)?;
                let tests = state.check_policy(now, &yaml)?;
                json(&PolicyCheck {
                    ok: tests.iter().all(|t| t.passed()),
                    tests,
                })
            }
            AdminOp::Explain(r) => json(&state.explain(now, &r.from, &r.to, &r.port)?),
            AdminOp::PolicyModeGet => json(&state.mode_view()),
            AdminOp::PolicyModeSet(r) => {
                let group = r.group.as_ref().map(|g| {
                    g.iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(",")
                });
                let v = state.set_mode(now, r.mode, r.group)?;
                if v.changed {
                    let what = match &group {
                        Some(g) => format!("{} --group {g}", r.mode),
                        None => r.mode.to_string(),
                    };
                    info!(
                        policy_mode = %r.mode,
                        group = group.as_deref().unwrap_or("*"),
                        learning_hosts = v.learning.len(),
                        "policy mode changed"
                    );
                    record(
                        EventKind::PolicyModeChanged,
                        format!(
                            "{what}: {} of {} hosts learning{}",
                            v.learning.len(),
                            v.hosts,
                            if v.learning.is_empty() {
                                String::new()
                            } else {
                                format!(" ({})", v.learning.join(", "))
                            }
                        ),
                    );
                }
                json(&v)
            }
            AdminOp::Quarantine(r) => {
                let h = state.quarantine(&r)?;
                record(EventKind::HostQuarantined, named(&h));
                AdminReply::Host(view(state, &h))
            }
            AdminOp::Release(r) => {
                let h = state.release_scan(&r, restricted)?;
                record(EventKind::HostReleased, named(&h));
                AdminReply::Host(view(state, &h))
            }
            AdminOp::RotateKey(r) => {
                // The audit event comes from the state's rotation events.
                let h = state.start_key_rotation(now, &r, crate::actor::random_nonce())?;
                AdminReply::Host(view(state, &h))
            }
            AdminOp::Revoke(r) => {
                let h = state.revoke_host(&r)?;
                record(EventKind::HostRevoked, named(&h));
                AdminReply::Host(HostView::new(&h, false, None))
            }
            AdminOp::Blocks(q) => {
                let since = q.since.map_or(0, |s| now.saturating_sub(s));
                json(&state.blocks(q.host.as_deref(), since))
            }
            AdminOp::Events { limit } => AdminReply::Events(newest(recent, limit)),
            AdminOp::Status => AdminReply::Status(status(state, &identity, &health)),
            AdminOp::Health => AdminReply::Health(health),
            AdminOp::AdminKeys => json(&state.signed_view()),
            AdminOp::AddKeySet(s) => {
                let first = state.admin_keys().is_none();
                let fp = state.add_key_set(s)?;
                let keys = state.admin_keys().map_or(0, |k| k.keys.len());
                info!(fingerprint = %fp, keys, first, "admin key set changed");
                record(
                    EventKind::AdminKeysChanged,
                    format!(
                        "{keys} keys, fingerprint {fp}{}",
                        if first {
                            " (first set, trusted on first use)"
                        } else {
                            ""
                        }
                    ),
                );
                json(&state.signed_view())
            }
            AdminOp::SignedMode(s) => {
                let v = state.set_mode_signed(now, s)?;
                if v.changed {
                    info!(mode = %v.mode, "signed learning mode setting applied");
                    record(EventKind::PolicyModeChanged, format!("{} (signed)", v.mode));
                }
                json(&v)
            }
            AdminOp::SignedPolicy(r) => {
                check_policy_size(&r.yaml)?;
                let (rec, tests) = state.apply_signed_policy(now, &r.yaml, r.signed)?;
                info!(rules_version = rec.version, "signed policy applied");
                record(
                    EventKind::PolicyApplied,
                    format!("version {} (signed)", rec.version),
                );
                json(&PolicyApplied {
                    version: rec.version,
                    tests,
                })
            }
            AdminOp::SignedRollback(v, s) => {
                let rec = state.rollback_signed(now, v, s)?;
                info!(
                    rules_version = rec.version,
                    restored_version = v,
                    "signed policy rolled back"
                );
                record(
                    EventKind::PolicyRollback,
                    format!("version {} = version {v} (signed)", rec.version),
                );
                json(&PolicyApplied {
                    version: rec.version,
                    tests: Vec::new(),
                })
            }
            AdminOp::SignedHost(r, req) => {
                let was = state.find_host(&r)?.quarantined;
                let h = state.set_host_signed(&r, req.signed, req.release)?;
                info!(host = %h.name, host_id = %h.id, release = req.release, "signed host labels set");
                record(EventKind::HostLabelsSigned, named(&h));
                if req.release && was {
                    record(EventKind::HostReleased, named(&h));
                }
                AdminReply::Host(view(state, &h))
            }
            AdminOp::SignedHosts(req) => {
                if let Some(p) = &req.policy {
                    check_policy_size(&p.yaml)?;
                }
                let policy = req
                    .policy
                    .as_ref()
                    .map(|p| (p.yaml.as_str(), p.signed.clone()));
                let n = req.statements.len();
                let r = state.set_hosts_signed(now, req.statements, policy)?;
                info!(
                    hosts = n,
                    rules_version = r.policy.as_ref().map(|p| p.0.version),
                    "signed host batch applied"
                );
                for h in &r.hosts {
                    record(EventKind::HostLabelsSigned, named(h));
                }
                if let Some((rec, _)) = &r.policy {
                    record(
                        EventKind::PolicyApplied,
                        format!("version {} (signed, with {n} host statements)", rec.version),
                    );
                }
                json(&meshd_control::api::SignedHostsApplied {
                    hosts: r.hosts.iter().map(|h| view(state, h)).collect(),
                    policy: r.policy.map(|(rec, tests)| PolicyApplied {
                        version: rec.version,
                        tests,
                    }),
                })
            }
            AdminOp::Import(req) => {
                let out = state.import_cmdb(now, &req.file, req.apply)?;
                info!(
                    created = out.created,
                    updated = out.updated,
                    relabelled = out.relabelled.len(),
                    flows = req.file.flows.len(),
                    rules_version = out.applied_version,
                    "cmdb import"
                );
                let mut detail = format!(
                    "{} records created, {} updated, {} hosts relabelled, {} declared flows",
                    out.created,
                    out.updated,
                    out.relabelled.len(),
                    req.file.flows.len()
                );
                if let Some(v) = out.applied_version {
                    detail.push_str(&format!("; policy version {v}"));
                }
                record(EventKind::CmdbImported, detail);
                if let Some(v) = out.applied_version {
                    record(EventKind::PolicyApplied, format!("version {v}"));
                }
                json(&out)
            }
        })
    }
}

/// The newest `limit` committed events (capped at [`EVENTS_MAX`]), oldest first (the current
/// batch's are not committed yet, so they are not shown).
fn newest(recent: &VecDeque<AuditEvent>, limit: u32) -> Vec<EventView> {
    let n = limit.min(EVENTS_MAX) as usize;
    recent
        .iter()
        .skip(recent.len().saturating_sub(n))
        .cloned()
        .map(EventView::from)
        .collect()
}

fn status(state: &CoordinatorState, identity: &Identity, health: &HealthView) -> StatusView {
    let connected = state
        .sessions()
        .into_iter()
        .map(|s| {
            let host = state.host(s.host);
            let transparent = host.is_some_and(|h| h.transparent);
            let mut protected: Vec<IpAddr> = host
                .filter(|h| h.transparent)
                .map(|h| h.endpoints().iter().map(|e| e.ip()).collect())
                .unwrap_or_default();
            protected.dedup();
            ConnectedAgent {
                id: s.host,
                name: host.map(|h| h.name.clone()).unwrap_or_default(),
                sent_version: s.sent_version,
                acked_version: s.acked_version,
                connected_at: s.connected_at,
                mode: Some(meshd_control::api::HostMode::of(transparent)),
                protected,
            }
        })
        .collect();
    StatusView {
        version: env!("CARGO_PKG_VERSION").to_string(),
        map_version: state.map_version(),
        hosts: state.hosts().filter(|h| !h.removed).count(),
        connected,
        advertise: identity.advertise,
        public_key: identity.public_key,
        // Filled in by the admin API (the counters live outside the actor).
        guard: GuardStats::default(),
        store_failure: health.store_failure.clone(),
        learning: state.learning_host_names(),
        learning_all: state.learning_all(),
    }
}

fn json<T: serde::Serialize>(v: &T) -> AdminReply {
    AdminReply::Json(serde_json::to_value(v).unwrap_or(serde_json::Value::Null))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops_over<'a>(
        state: &'a mut CoordinatorState,
        events: &'a mut Vec<AuditEvent>,
        recent: &'a VecDeque<AuditEvent>,
    ) -> Ops<'a> {
        Ops {
            state,
            events,
            recent,
            identity: Identity {
                advertise: "192.0.2.1:7443".parse().unwrap(),
                replicas: Arc::from(Vec::new()),
                public_key: PublicKey([7; 32]),
            },
            health: HealthView {
                ok: true,
                store_failure: None,
            },
            restricted: &[],
        }
    }

    #[test]
    fn operations_record_named_events_with_todays_strings() {
        let mut state = CoordinatorState::new("100.64.0.0/24".parse().unwrap(), None).unwrap();
        let (mut events, recent) = (Vec::new(), VecDeque::new());
        let yaml = "rules:\n  - {name: all, from: {}, to: {}, ports: [any]}\n";
        ops_over(&mut state, &mut events, &recent)
            .run(5, AdminOp::PolicyApply(yaml.into()))
            .unwrap();
        ops_over(&mut state, &mut events, &recent)
            .run(6, AdminOp::PolicyRollback(1))
            .unwrap();
        let shown: Vec<_> = events
            .iter()
            .map(|e| (e.at, e.kind.as_str(), e.detail.as_str()))
            .collect();
        assert_eq!(
            shown,
            [
                (5, "policy_applied", "version 1"),
                (6, "policy_rollback", "version 2 = version 1")
            ]
        );
        // A refused operation records nothing.
        let e = ops_over(&mut state, &mut events, &recent)
            .run(7, AdminOp::Remove("nobody".into()))
            .unwrap_err();
        assert!(matches!(e, AdminError::NoSuchHost(_)), "{e}");
        assert_eq!(events.len(), 2);
    }

    #[test]
    fn admin_token_events_name_the_token_never_its_secret() {
        let mut state = CoordinatorState::new("100.64.0.0/24".parse().unwrap(), None).unwrap();
        let (mut events, recent) = (Vec::new(), VecDeque::new());
        let mut run = |now, op| ops_over(&mut state, &mut events, &recent).run(now, op);
        let created = |r| match r {
            Ok(AdminReply::AdminTokenCreated(c)) => c,
            other => panic!("{other:?}"),
        };
        let a = created(run(
            5,
            AdminOp::CreateAdminToken(AdminTokenCreateRequest {
                name: "ops".into(),
                ttl_secs: None,
            }),
        ));
        let b = created(run(
            6,
            AdminOp::CreateAdminToken(AdminTokenCreateRequest {
                name: "ci".into(),
                ttl_secs: Some(60),
            }),
        ));
        assert!(a.token.starts_with("meshadm-") && a.token != b.token);
        assert_eq!(
            (b.info.expires_at, b.info.state.as_str()),
            (Some(66), "active")
        );
        assert!(matches!(
            run(7, AdminOp::RevokeAdminToken("ops".into())),
            Ok(AdminReply::AdminToken(v)) if v.state == "revoked" && v.revoked_at == Some(7)
        ));
        // Again: nothing changes, nothing is logged.
        assert!(run(8, AdminOp::RevokeAdminToken("ops".into())).is_ok());
        assert_eq!(
            run(9, AdminOp::RevokeAdminToken("ci".into())).unwrap_err(),
            AdminError::LastAdminToken("ci".into())
        );
        assert!(AdminOp::ListAdminTokens.is_read_only());
        assert!(!AdminOp::RevokeAdminToken("ci".into()).is_read_only());
        let shown: Vec<_> = events
            .iter()
            .map(|e| (e.at, e.kind.as_str(), e.detail.as_str()))
            .collect();
        assert_eq!(
            shown,
            [
                (5, "admin_token_created", "ops"),
                (6, "admin_token_created", "ci"),
                (7, "admin_token_revoked", "ops"),
            ]
        );
    }

    #[test]
    fn events_are_the_newest_committed_oldest_first() {
        let mut state = CoordinatorState::new("100.64.0.0/24".parse().unwrap(), None).unwrap();
        let mut events = Vec::new();
        let recent: VecDeque<AuditEvent> = (0..5)
            .map(|i| AuditEvent::new(i, EventKind::HostRemoved, format!("h{i}")))
            .collect();
        let r = ops_over(&mut state, &mut events, &recent)
            .run(9, AdminOp::Events { limit: 2 })
            .unwrap();
        let AdminReply::Events(v) = r else {
            panic!("{r:?}")
        };
        let details: Vec<_> = v.iter().map(|e| e.detail.as_str()).collect();
        assert_eq!(details, ["h3", "h4"]);
        assert!(v.iter().all(|e| e.kind == "host_removed"));
    }
}
