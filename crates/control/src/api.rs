//! Admin HTTP/JSON API types, shared by the coordinator and `meshctl`.
//!
//! Routes (all under a bearer admin token, `Authorization: Bearer <token>`):
//!
//! | method | path | body | reply |
//! |---|---|---|---|
//! | GET | `/v1/hosts` | | `Vec<HostView>` |
//! | GET | `/v1/hosts/{host}` | | `HostView` |
//! | POST | `/v1/hosts/{host}/labels` | `LabelRequest` | `HostView` |
//! | POST | `/v1/hosts/{host}/unlabel` | `UnlabelRequest` | `HostView` |
//! | POST | `/v1/hosts/{host}/rename` | `RenameRequest` | `HostView` |
//! | DELETE | `/v1/hosts/{host}` | | `HostView` |
//! | POST | `/v1/tokens` | `TokenCreateRequest` | `TokenCreated` |
//! | GET | `/v1/tokens` | | `Vec<TokenView>` |
//! | DELETE | `/v1/tokens/{id}` | | `TokenView` |
//! | POST | `/v1/admin/tokens` | `AdminTokenCreateRequest` | `AdminTokenCreated` (201; the secret, once) |
//! | GET | `/v1/admin/tokens` | | `Vec<AdminTokenView>` |
//! | DELETE | `/v1/admin/tokens/{name}` | | `AdminTokenView` (409 `last_admin_token`) |
//! | GET | `/v1/status` | | `StatusView` |
//! | GET | `/v1/health` | (no token) | `HealthView` (503 while commits fail) |
//! | GET | `/v1/events?limit=N` | | `Vec<EventView>` (newest `N`, oldest first) |
//! | GET | `/v1/policy/mode` | | `PolicyModeView` (which hosts learn, and why) |
//! | POST | `/v1/policy/mode` | `PolicyModeRequest` | `PolicyModeView` (409: declared by the file) |
//! | GET | `/v1/flows?since=T&host=H` | | `Vec<FlowView>` (oldest first) |
//! | GET | `/v1/topology?since=T&group_by=K` | | `TopologyView` |
//! | GET | `/ui` | (token cookie) | the topology page |
//! | POST | `/v1/import` | `ImportRequest` | `state::ImportOutcome` (400 `import_refused`: every bad row) |
//!
//! `{host}` is a name, an id or a public key (base64, URL-encoded). Errors reply with a 4xx/5xx
//! status and an [`ApiError`] body. A refused admin token is a 401 with code `unauthorized`
//! (unknown or missing), `token_expired` or `token_revoked`.

use std::net::{IpAddr, SocketAddr};

use meshd_tunnel::PublicKey;
use serde::{Deserialize, Serialize};

use crate::model::{Host, HostId, Labels, Token, TokenId, UnixTime};

/// How a host carries its traffic, as its agent reported: on the JSON wire `"overlay"` or
/// `"transparent"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostMode {
    /// Overlay addresses only (the default).
    Overlay,
    /// Transparent mode: the host's underlay addresses are carried too.
    Transparent,
}

impl HostMode {
    /// `Transparent` if `transparent`, else `Overlay`.
    pub fn of(transparent: bool) -> Self {
        if transparent {
            HostMode::Transparent
        } else {
            HostMode::Overlay
        }
    }

    /// The name on the wire and at the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            HostMode::Overlay => "overlay",
            HostMode::Transparent => "transparent",
        }
    }
}

impl std::fmt::Display for HostMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A host as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostView {
    /// Id.
    pub id: HostId,
    /// Name.
    pub name: String,
    /// Public key.
    pub public_key: PublicKey,
    /// Overlay addresses.
    pub addresses: Vec<IpAddr>,
    /// Labels.
    pub labels: Labels,
    /// Endpoints peers use (observed first).
    pub endpoints: Vec<SocketAddr>,
    /// Observed control-connection source IP.
    pub observed_ip: Option<IpAddr>,
    /// Whether it has a live control connection.
    pub connected: bool,
    /// Enrolment time (Unix seconds).
    pub created_at: UnixTime,
    /// Last contact (Unix seconds).
    pub last_seen: UnixTime,
    /// Map version last acked (when connected).
    pub acked_version: Option<u64>,
    /// `overlay` or `transparent` (as the agent last reported); absent from coordinators
    /// older than the field.
    #[serde(default)]
    pub mode: Option<HostMode>,
    /// Quarantined: in nobody's map until released.
    #[serde(default)]
    pub quarantined: bool,
    /// In learning mode: flows the policy denies still pass (reported as would-deny).
    #[serde(default)]
    pub learning: bool,
}

impl HostView {
    /// From a host record and its session state.
    pub fn new(h: &Host, connected: bool, acked_version: Option<u64>) -> Self {
        HostView {
            id: h.id,
            name: h.name.clone(),
            public_key: h.public_key,
            addresses: h.addresses(),
            labels: h.labels.clone(),
            endpoints: h.endpoints(),
            observed_ip: h.observed_ip,
            connected,
            created_at: h.created_at,
            last_seen: h.last_seen,
            acked_version,
            mode: Some(HostMode::of(h.transparent)),
            quarantined: h.quarantined,
            // The coordinator's state knows (`CoordinatorState::is_learning`).
            learning: false,
        }
    }
}

/// Add or replace labels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelRequest {
    /// Labels to set.
    pub labels: Labels,
}

/// Remove labels by key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnlabelRequest {
    /// Keys to remove.
    pub keys: Vec<String>,
}

/// `POST /v1/signed/policy`: a policy file with its signed statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedPolicyRequest {
    /// The file.
    pub yaml: String,
    /// Its policy statement, signed by a quorum of the admin keys.
    pub signed: crate::signed::Signed,
}

/// `POST /v1/signed/mode`: the runtime learning setting, whole, signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedModeRequest {
    /// Its mode statement, signed by a quorum of the admin keys.
    pub signed: crate::signed::Signed,
}

/// `POST /v1/signed/rollback/{version}` (the statement's hash is of that version's file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRollbackRequest {
    /// The policy statement, signed.
    pub signed: crate::signed::Signed,
}

/// `POST /v1/signed/hosts/{host}`: a host's name and labels, exactly, signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedHostRequest {
    /// The host statement, signed by a quorum of the admin keys.
    pub signed: crate::signed::Signed,
    /// Also lift the host's quarantine.
    #[serde(default)]
    pub release: bool,
}

/// Most host statements in one `POST /v1/signed/hosts`.
pub const SIGNED_BATCH_MAX: usize = 10_000;

/// `POST /v1/signed/hosts`: host statements (a signed CMDB import), applied all or none in
/// one commit; optionally with the signed policy version the import's declared flows make,
/// applied after the labels (its tests run over the hosts as relabelled).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SignedHostsRequest {
    /// Host statements (one per host key), each signed by a quorum of the admin keys.
    pub statements: Vec<crate::signed::Signed>,
    /// A signed policy version to apply with them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<SignedPolicyRequest>,
}

/// Reply to `POST /v1/signed/hosts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedHostsApplied {
    /// The hosts as they are now, in the order of the statements.
    pub hosts: Vec<HostView>,
    /// The policy version applied with them.
    #[serde(default)]
    pub policy: Option<PolicyApplied>,
}

/// Rename a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenameRequest {
    /// New name.
    pub name: String,
}

/// Create a join token.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TokenCreateRequest {
    /// Labels for hosts that enrol with it.
    #[serde(default)]
    pub labels: Labels,
    /// Lifetime in seconds (absent: never expires).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// Number of enrolments (absent: unlimited).
    #[serde(default)]
    pub uses: Option<u32>,
}

/// A token as listed (never includes the secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenView {
    /// Id.
    pub id: TokenId,
    /// Labels.
    pub labels: Labels,
    /// Creation time.
    pub created_at: UnixTime,
    /// Expiry.
    pub expires_at: Option<UnixTime>,
    /// Uses left (absent: unlimited).
    pub uses_left: Option<u32>,
    /// Revoked.
    pub revoked: bool,
    /// `active`, `expired`, `revoked` or `used_up` at the time of the request.
    pub state: String,
}

impl TokenView {
    /// From a token record at `now`.
    pub fn new(t: &Token, now: UnixTime) -> Self {
        let state = match t.check(now) {
            Ok(()) => "active",
            Err(crate::model::TokenUnusable::Expired) => "expired",
            Err(crate::model::TokenUnusable::Revoked) => "revoked",
            Err(crate::model::TokenUnusable::UsedUp) => "used_up",
        };
        TokenView {
            id: t.id,
            labels: t.labels.clone(),
            created_at: t.created_at,
            expires_at: t.expires_at,
            uses_left: t.uses_left,
            revoked: t.revoked,
            state: state.to_string(),
        }
    }
}

/// A new token: the only time the join token string is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCreated {
    /// The `meshd1-…` string to pass to `meshd up --join`.
    pub token: String,
    /// The record.
    pub info: TokenView,
}

/// Create a named admin token (`POST /v1/admin/tokens`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AdminTokenCreateRequest {
    /// Unique name, `[a-z0-9._-]{1,64}`.
    pub name: String,
    /// Lifetime in seconds (absent: never expires).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// An admin token as listed: never the secret nor its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminTokenView {
    /// Name.
    pub name: String,
    /// Creation time.
    pub created_at: UnixTime,
    /// Expiry (absent: never).
    pub expires_at: Option<UnixTime>,
    /// When it was revoked (absent: not revoked).
    pub revoked_at: Option<UnixTime>,
    /// `active`, `expired` or `revoked` at the time of the request.
    pub state: String,
}

impl AdminTokenView {
    /// From a token record at `now`.
    pub fn new(t: &crate::state::AdminToken, now: UnixTime) -> Self {
        AdminTokenView {
            name: t.name.clone(),
            created_at: t.created_at,
            expires_at: t.expires_at,
            revoked_at: t.revoked_at,
            state: t.state(now).to_string(),
        }
    }
}

/// A new admin token: the only time its secret is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminTokenCreated {
    /// The `meshadm-…` string to pass as `--token` / `MESH_TOKEN`.
    pub token: String,
    /// The record.
    pub info: AdminTokenView,
}

/// A connected agent in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectedAgent {
    /// Host id.
    pub id: HostId,
    /// Host name.
    pub name: String,
    /// Last version sent.
    pub sent_version: u64,
    /// Last version acked.
    pub acked_version: u64,
    /// Connected since.
    pub connected_at: UnixTime,
    /// `overlay` or `transparent`; absent from coordinators older than the field.
    #[serde(default)]
    pub mode: Option<HostMode>,
    /// Transparent mode: the host's underlay addresses, which its transparent peers reach
    /// only through the tunnel (empty in overlay mode).
    #[serde(default)]
    pub protected: Vec<IpAddr>,
}

/// Coordinator status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusView {
    /// Crate version.
    pub version: String,
    /// Global map version.
    pub map_version: u64,
    /// Non-removed hosts.
    pub hosts: usize,
    /// Live agents.
    pub connected: Vec<ConnectedAgent>,
    /// Control address tokens carry.
    pub advertise: SocketAddr,
    /// Coordinator public key.
    pub public_key: PublicKey,
    /// What the listeners' limits refused and saw (admin API and control endpoint).
    #[serde(default)]
    pub guard: GuardStats,
    /// The last failed commit, while no commit has succeeded since (`None`: healthy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_failure: Option<StoreFailure>,
    /// The hosts in learning mode (not enforcing: denied flows pass), by name, sorted.
    #[serde(default)]
    pub learning: Vec<String>,
    /// The whole mesh learns (`mode: learn` in the file or `meshctl policy mode learn`).
    #[serde(default)]
    pub learning_all: bool,
}

/// A commit the coordinator could not make (the change was refused and rolled back).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreFailure {
    /// When.
    pub at: UnixTime,
    /// Why (`disk full: …`, `value out of range for the database: …`).
    pub error: String,
    /// What the batch held (`1 host, 2 events`).
    pub what: String,
}

/// `GET /v1/health` (no token needed): 200 when the coordinator can save changes, else 503.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthView {
    /// Whether the last commit succeeded.
    pub ok: bool,
    /// The last failed commit, while no commit has succeeded since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_failure: Option<StoreFailure>,
}

/// Counters of the coordinator's listener limits (since start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuardStats {
    /// Admin requests with a missing or wrong token.
    pub admin_auth_failures: u64,
    /// Admin requests refused (429) while their source was backing off.
    pub admin_auth_backoff: u64,
    /// Admin HTTPS connections closed at once (their source's share, or all slots, busy).
    pub admin_handshakes_refused: u64,
    /// Admin HTTPS connections closed for a TLS handshake that took too long.
    pub admin_handshakes_timed_out: u64,
    /// Enrolments with an unknown, expired, revoked or used-up join token.
    pub join_token_failures: u64,
    /// Control connections refused at once while their source was backing off.
    pub join_backoff_refused: u64,
    /// QUIC handshakes in progress.
    pub quic_half_open: u64,
    /// Most QUIC handshakes in progress at once.
    pub quic_half_open_peak: u64,
    /// QUIC Retry packets sent (address validation).
    pub quic_retries: u64,
    /// QUIC attempts refused with the half-open limit reached.
    pub quic_refused_full: u64,
}

/// Error body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// Short machine-readable code (`unauthorized`, `token_expired`, `token_revoked`,
    /// `not_found`, `bad_request`, `conflict`, `last_admin_token`, `internal`, …).
    pub code: String,
    /// What went wrong and what to do.
    pub message: String,
    /// Itemised failures (a policy's parse error with line and column, or its failing tests).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<String>,
}

/// `PUT /v1/policy`, `POST /v1/policy/diff`, `POST /v1/policy/check` as JSON (a `text/*` or
/// `application/yaml` body is the file itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyText {
    /// The policy file.
    pub yaml: String,
}

/// `GET /v1/policy`: the current version (`None`: no policy yet, everything is denied).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyCurrent {
    /// The current version.
    pub policy: Option<crate::policy::PolicyRecord>,
}

/// Reply to `PUT /v1/policy` and `POST /v1/policy/rollback/{version}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyApplied {
    /// The new version.
    pub version: u64,
    /// The file's tests (all passed; empty for a rollback).
    pub tests: Vec<meshd_policy::TestResult>,
}

/// Reply to `POST /v1/policy/check` (200 even when tests fail; 400 when it does not parse).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyCheck {
    /// Every test passed.
    pub ok: bool,
    /// Each test's outcome (host names resolved against the inventory).
    pub tests: Vec<meshd_policy::TestResult>,
}

/// `POST /v1/policy/explain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainRequest {
    /// Host opening the connection (name, id or key).
    pub from: String,
    /// Host connected to.
    pub to: String,
    /// `tcp/N`, `udp/N` or `icmp`.
    pub port: String,
}

/// `POST /v1/policy/mode`: `meshctl policy mode learn|enforce [--group k=v,…]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyModeRequest {
    /// `learn` or `enforce`.
    pub mode: meshd_policy::PolicyMode,
    /// A label group (hosts with all these labels); absent: the whole mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<Labels>,
}

/// Where a learning setting comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeSource {
    /// The policy file (`mode: learn`, `learn:`): change it with `policy apply`.
    File,
    /// `meshctl policy mode` (stored apart from the file).
    Runtime,
}

impl ModeSource {
    /// `file` or `runtime`.
    pub fn as_str(self) -> &'static str {
        match self {
            ModeSource::File => "file",
            ModeSource::Runtime => "runtime",
        }
    }
}

/// One learning group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LearnGroupView {
    /// The selector as written (`{app: legacy}`, a host name).
    pub group: String,
    /// Where it is declared.
    pub source: ModeSource,
    /// The live hosts it selects now, by name, sorted.
    pub hosts: Vec<String>,
}

/// `GET /v1/policy/mode` and the reply to `POST`: which hosts are not enforcing, and why. The
/// hosts that learn are those the file or the runtime setting names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyModeView {
    /// `learn` when the whole mesh learns, else `enforce` (groups may still learn).
    pub mode: meshd_policy::PolicyMode,
    /// Where whole-mesh learning comes from (empty: it does not).
    #[serde(default)]
    pub mesh_wide: Vec<ModeSource>,
    /// Learning groups, the file's first.
    #[serde(default)]
    pub groups: Vec<LearnGroupView>,
    /// Every live host in learning mode, by name, sorted.
    #[serde(default)]
    pub learning: Vec<String>,
    /// Live (not removed, not quarantined) hosts.
    pub hosts: usize,
    /// When the runtime setting last changed (0: never).
    #[serde(default)]
    pub changed_at: UnixTime,
    /// Whether this request changed the setting (a `POST` that asked for what already was
    /// answers `false`).
    #[serde(default)]
    pub changed: bool,
}

/// `GET /v1/blocks` query.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlocksQuery {
    /// Only events where this host (name) is either end.
    pub host: Option<String>,
    /// Only events from the last this many seconds.
    pub since: Option<u64>,
}

/// Most events `GET /v1/events` returns (and the coordinator keeps in memory).
pub const EVENTS_MAX: u32 = 1000;
/// Events `GET /v1/events` returns without `limit`.
pub const EVENTS_DEFAULT: u32 = 100;

/// `GET /v1/events` query.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsQuery {
    /// How many of the newest events (default [`EVENTS_DEFAULT`], at most [`EVENTS_MAX`]).
    pub limit: Option<u32>,
}

/// One entry of the coordinator's audit log (`GET /v1/events`, oldest first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventView {
    /// When (Unix seconds).
    pub at: UnixTime,
    /// What: an [`EventKind`](crate::EventKind)'s name (`duplicate_connection`,
    /// `host_removed`, `policy_applied`, …).
    pub kind: String,
    /// Details, e.g. `key <base64> from 192.0.2.1` for a refused duplicate connection.
    pub detail: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_mode_keeps_its_wire_names_and_an_old_coordinator_omits_it() {
        for (m, name) in [
            (HostMode::Overlay, "\"overlay\""),
            (HostMode::Transparent, "\"transparent\""),
        ] {
            assert_eq!(serde_json::to_string(&m).unwrap(), name);
            assert_eq!(serde_json::from_str::<HostMode>(name).unwrap(), m);
            assert_eq!(format!("\"{m}\""), name);
        }
        assert!(serde_json::from_str::<HostMode>("\"bridge\"").is_err());
        // A connected-agent row from a coordinator older than the field.
        let old = r#"{"id":1,"name":"a","sent_version":2,"acked_version":2,"connected_at":5}"#;
        let c: ConnectedAgent = serde_json::from_str(old).unwrap();
        assert_eq!(c.mode, None);
        let now = r#"{"id":1,"name":"a","sent_version":2,"acked_version":2,"connected_at":5,"mode":"transparent"}"#;
        let c: ConnectedAgent = serde_json::from_str(now).unwrap();
        assert_eq!(c.mode, Some(HostMode::Transparent));
    }
}

/// Query of `GET /v1/flows` and `GET /v1/topology`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FlowsQuery {
    /// Only flows last seen at or after this time (Unix seconds; absent: the retention window).
    #[serde(default)]
    pub since: Option<UnixTime>,
    /// Only flows where this host (name, id or key) is either end.
    #[serde(default)]
    pub host: Option<String>,
    /// Topology only: group nodes by `host` (the default), or by a label key such as `app`.
    #[serde(default)]
    pub group_by: Option<String>,
    /// Flows only: at most this many rows, the newest (default and most:
    /// [`FLOWS_MAX_ROWS`]).
    #[serde(default)]
    pub limit: Option<u32>,
}

/// Most rows `GET /v1/flows` returns (the newest; `limit` may ask for fewer).
pub const FLOWS_MAX_ROWS: u32 = 100_000;

/// One stored flow row, as `GET /v1/flows` and `meshctl export flows` show it: one reporting
/// host's aggregate for one interval, by host id and labels (never by bare address, except the
/// source of a plaintext drop, which has no identity).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowView {
    /// Start of the reporting interval (Unix seconds; in a topology's summed rows, the
    /// earliest).
    #[serde(default)]
    pub interval_start: UnixTime,
    /// The reporting (enforcing) host.
    pub host: String,
    /// Its id.
    pub host_id: HostId,
    /// Its labels when the row was stored.
    pub host_labels: Labels,
    /// The peer's name (absent for a plaintext drop).
    #[serde(default)]
    pub peer: Option<String>,
    /// The peer's id (absent for a plaintext drop or a peer since removed).
    #[serde(default)]
    pub peer_id: Option<HostId>,
    /// The peer's labels when the row was stored.
    #[serde(default)]
    pub peer_labels: Labels,
    /// Plaintext drop only: the source address outside the mesh.
    #[serde(default)]
    pub src: Option<IpAddr>,
    /// `outbound`: the reporting host opened the flows; `inbound`: the other end did.
    pub direction: meshd_policy::Direction,
    /// IP protocol number.
    pub proto: u8,
    /// Responder's port (0 for ICMP).
    pub port: u16,
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
    /// Connections opened.
    pub flows: u64,
    /// First seen (Unix seconds).
    pub first_seen: UnixTime,
    /// Last seen (Unix seconds).
    pub last_seen: UnixTime,
    /// Verdict (plaintext drops are `denied`).
    pub verdict: crate::flow::FlowVerdict,
    /// The admitting rule (allowed flows).
    #[serde(default)]
    pub rule: Option<String>,
}

/// `GET /v1/topology`: who talks to whom, grouped.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TopologyView {
    /// What a node is: `host` or a label key.
    pub group_by: String,
    /// Window start (Unix seconds).
    pub since: UnixTime,
    /// Nodes, sorted by id.
    pub nodes: Vec<TopologyNode>,
    /// Edges (opener → responder), sorted by (from, to, proto, port, verdict).
    pub edges: Vec<TopologyEdge>,
}

/// A node: one host, or one label group (`app=web`; hosts without the key form `app=(none)`),
/// or `outside` for plaintext sources beyond the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopologyNode {
    /// Stable id: the host name, `KEY=VALUE`, or `outside:ADDR`.
    pub id: String,
    /// Hosts in the node (sorted).
    pub hosts: Vec<String>,
    /// How many of them are not enforcing (learning mode).
    #[serde(default)]
    pub learning: usize,
}

/// An edge: flows from one node to another on one protocol/port with one verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopologyEdge {
    /// Opener node id.
    pub from: String,
    /// Responder node id.
    pub to: String,
    /// IP protocol number.
    pub proto: u8,
    /// Responder port (0 for ICMP).
    pub port: u16,
    /// Verdict.
    pub verdict: crate::flow::FlowVerdict,
    /// Rules that admitted the flows (allowed), sorted.
    #[serde(default)]
    pub rules: Vec<String>,
    /// Packets (counted once per flow, not once per reporting end).
    pub packets: u64,
    /// Bytes (likewise).
    pub bytes: u64,
    /// Connections.
    pub flows: u64,
    /// First seen.
    pub first_seen: UnixTime,
    /// Last seen.
    pub last_seen: UnixTime,
    /// Host pairs behind the edge, `opener>responder`, sorted.
    pub pairs: Vec<String>,
}

/// `POST /v1/import`: a parsed CMDB file (`meshctl import`), imported as one change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportRequest {
    /// Host records and declared flows.
    #[serde(flatten)]
    pub file: crate::cmdb::CmdbFile,
    /// Also apply the proposed policy (its tests must pass, or nothing is imported).
    #[serde(default)]
    pub apply: bool,
}
