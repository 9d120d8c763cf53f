//! Sessions: an agent's hello (enrol or resume), its endpoint reports, acks, resyncs and
//! disconnect, and what the operator should hear of enrolments ([`Notice`]).

use std::net::IpAddr;

use meshd_tunnel::PublicKey;

use super::{ConnId, CoordinatorState, SentPeer};
use crate::event::EventKind;
use crate::model::{validate_name, Host, HostId, TokenUnusable, UnixTime};
use crate::proto::{AgentMessage, EndpointReport, ErrorCode, HostInfo, PROTOCOL_VERSION};
use ipnet::Ipv4Net;

/// How an agent opens a session.
#[derive(Debug, Clone)]
pub enum Hello {
    /// New host with a join token (only the secret's hash is passed in).
    Enrol {
        /// SHA-256 of the token secret.
        secret_hash: [u8; 32],
        /// Requested name.
        name: String,
        /// Underlay endpoints.
        endpoints: EndpointReport,
    },
    /// Enrolled host reconnecting.
    Resume {
        /// Underlay endpoints.
        endpoints: EndpointReport,
    },
}

/// Why a connection's first message opens no session: the code and text the agent is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloRefused {
    /// The error code.
    pub code: ErrorCode,
    /// The message.
    pub message: String,
}

impl Hello {
    /// The hello a connection's first message asks for: `Enrol` or `Resume` at this
    /// protocol version (only the token secret's hash is kept); anything else is refused.
    /// The coordinator's connection task and the test harness both call this.
    pub fn from_first(first: AgentMessage) -> Result<Hello, HelloRefused> {
        match first {
            AgentMessage::Enrol {
                protocol,
                secret,
                name,
                endpoints,
            } if protocol == PROTOCOL_VERSION => Ok(Hello::Enrol {
                secret_hash: secret.hash(),
                name,
                endpoints,
            }),
            AgentMessage::Resume {
                protocol,
                endpoints,
            } if protocol == PROTOCOL_VERSION => Ok(Hello::Resume { endpoints }),
            AgentMessage::Enrol { protocol, .. } | AgentMessage::Resume { protocol, .. } => {
                Err(HelloRefused {
                    code: ErrorCode::ProtocolVersion,
                    message: format!("protocol {protocol} not supported (want {PROTOCOL_VERSION})"),
                })
            }
            _ => Err(HelloRefused {
                code: ErrorCode::Malformed,
                message: "first message must be enrol or resume".into(),
            }),
        }
    }
}

/// Most underlay endpoints kept from one agent's report (the rest are dropped).
pub const MAX_REPORTED_ENDPOINTS: usize = 64;

/// Something the operator should hear about, from [`CoordinatorState::poll_notices`] (the
/// coordinator logs it and records it as an event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// An enrolling host asked for a name another host has; it got another one.
    HostRenamedOnEnrol {
        /// The new host.
        id: HostId,
        /// The name it asked for.
        requested: String,
        /// The name it got.
        assigned: String,
    },
    /// An enrolment was refused: no overlay address left.
    PoolExhausted {
        /// The pool.
        pool: Ipv4Net,
        /// Addresses in use.
        used: usize,
        /// The name the refused host asked for.
        requested: String,
    },
    /// An enrolling host matched a CMDB record (by name or underlay IP) and got its labels.
    LabelsFromCmdb {
        /// The new host.
        id: HostId,
        /// The record's key (`name`, `ip` or `name/ip`).
        record: String,
        /// The host's labels now.
        labels: crate::model::Labels,
    },
}

impl Notice {
    /// The event kind (`meshctl events`).
    pub fn kind(&self) -> EventKind {
        match self {
            Notice::HostRenamedOnEnrol { .. } => EventKind::HostRenamedOnEnrol,
            Notice::PoolExhausted { .. } => EventKind::PoolExhausted,
            Notice::LabelsFromCmdb { .. } => EventKind::HostLabelsFromCmdb,
        }
    }
}

impl std::fmt::Display for Notice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Notice::HostRenamedOnEnrol {
                id,
                requested,
                assigned,
            } => write!(
                f,
                "requested name {requested} taken; enrolled as {assigned} ({id})"
            ),
            Notice::PoolExhausted {
                pool,
                used,
                requested,
            } => write!(
                f,
                "address pool {pool} exhausted ({used} addresses in use); refused to enrol {requested}"
            ),
            Notice::LabelsFromCmdb { id, record, labels } => {
                let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                write!(
                    f,
                    "host {id} matched CMDB record {record}; labels {}",
                    l.join(",")
                )
            }
        }
    }
}

/// A live session as shown by `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// Host.
    pub host: HostId,
    /// Connection.
    pub conn: ConnId,
    /// Last map version sent (0: none yet).
    pub sent_version: u64,
    /// Last version the agent acked.
    pub acked_version: u64,
    /// Connected since.
    pub connected_at: UnixTime,
}

#[derive(Debug)]
pub(super) struct Session {
    pub(super) conn: ConnId,
    /// The peers last sent, sorted by host id; `None` until the first full map.
    pub(super) sent: Option<Vec<SentPeer>>,
    pub(super) sent_version: u64,
    pub(super) acked: u64,
    pub(super) connected_at: UnixTime,
}

impl CoordinatorState {
    /// Live sessions.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        self.sessions
            .iter()
            .map(|(h, s)| SessionInfo {
                host: *h,
                conn: s.conn,
                sent_version: s.sent_version,
                acked_version: s.acked,
                connected_at: s.connected_at,
            })
            .collect()
    }

    /// Whether a host has a live session.
    pub fn is_connected(&self, id: HostId) -> bool {
        self.sessions.contains_key(&id)
    }

    /// An agent connected and proved `key`. On success the session is live and its full map
    /// will come out of the next `poll_pushes`.
    pub fn connect(
        &mut self,
        now: UnixTime,
        key: PublicKey,
        conn: ConnId,
        observed: IpAddr,
        hello: Hello,
    ) -> Result<HostInfo, ErrorCode> {
        if self.revoked_keys.contains(&key) {
            return Err(ErrorCode::HostRevoked);
        }
        // A rotating host reconnecting with its proved next key: the switch completes.
        if !self.by_key.contains_key(&key) {
            self.complete_rotation(now, key);
        }
        let existing = self.by_key.get(&key).copied();
        let (id, endpoints) = match (hello, existing.and_then(|id| self.hosts.get(&id))) {
            (Hello::Resume { .. }, None) => return Err(ErrorCode::UnknownHost),
            (Hello::Resume { .. }, Some(h)) if h.removed => return Err(ErrorCode::HostRemoved),
            (Hello::Resume { endpoints }, Some(h)) => (h.id, endpoints),
            // Already enrolled (e.g. the Welcome was lost): resume without using the token.
            (Hello::Enrol { endpoints, .. }, Some(h)) if !h.removed => (h.id, endpoints),
            (
                Hello::Enrol {
                    secret_hash,
                    name,
                    endpoints,
                },
                _,
            ) => {
                let id = self.enrol(now, key, secret_hash, name, &endpoints, observed)?;
                (id, endpoints)
            }
        };
        if self.sessions.contains_key(&id) {
            return Err(ErrorCode::AlreadyConnected);
        }
        self.sessions.insert(
            id,
            Session {
                conn,
                sent: None,
                sent_version: 0,
                acked: 0,
                connected_at: now,
            },
        );
        self.update_endpoints(now, id, Some(endpoints), Some(observed));
        let h = self.hosts.get(&id).ok_or(ErrorCode::Internal)?;
        Ok(HostInfo::from_host(h, self.networks()))
    }

    /// Re-attaches an agent session that outlived a reload of the state from the store
    /// (another coordinator replica's commit, or a conflict with one): the session goes on
    /// on connection `conn` and gets a full map of the reloaded state with the next pushes.
    /// Records nothing (no endpoint update, no event): following a commit must not make one,
    /// or replicas would wake each other up for ever. Err: the host is not there any more
    /// under `key` (removed, revoked or re-keyed meanwhile); close the connection.
    pub fn attach_session(
        &mut self,
        now: UnixTime,
        id: HostId,
        key: &PublicKey,
        conn: ConnId,
    ) -> Result<(), ErrorCode> {
        let h = self.hosts.get(&id).ok_or(ErrorCode::UnknownHost)?;
        if h.removed {
            return Err(ErrorCode::HostRemoved);
        }
        if h.revoked || self.revoked_keys.contains(key) {
            return Err(ErrorCode::HostRevoked);
        }
        if h.public_key != *key {
            return Err(ErrorCode::UnknownHost);
        }
        self.sessions.insert(
            id,
            Session {
                conn,
                sent: None,
                sent_version: 0,
                acked: 0,
                connected_at: now,
            },
        );
        Ok(())
    }

    /// A free name for host `id` that asked for the taken `name`: `name-ID` (then `name-ID-2`,
    /// …), with `name` shortened so the result stays a valid name.
    fn free_name(&self, name: &str, id: HostId) -> String {
        (1u64..)
            .map(|n| {
                let suffix = if n == 1 {
                    format!("-{}", id.0)
                } else {
                    format!("-{}-{n}", id.0)
                };
                // Validated names are ASCII: any byte index is a char boundary.
                let keep = name.len().min(63usize.saturating_sub(suffix.len()));
                format!("{}{suffix}", &name[..keep])
            })
            .find(|n| !self.name_taken(n, None))
            .unwrap_or_else(|| format!("host-{}", id.0))
    }

    /// What happened that the operator should hear about, since the last call.
    pub fn poll_notices(&mut self) -> Vec<Notice> {
        std::mem::take(&mut self.notices)
    }

    fn enrol(
        &mut self,
        now: UnixTime,
        key: PublicKey,
        secret_hash: [u8; 32],
        name: String,
        endpoints: &EndpointReport,
        observed: IpAddr,
    ) -> Result<HostId, ErrorCode> {
        let tid = *self
            .by_hash
            .get(&secret_hash)
            .ok_or(ErrorCode::TokenUnknown)?;
        let token = self.tokens.get(&tid).ok_or(ErrorCode::TokenUnknown)?;
        token.check(now).map_err(|e| match e {
            TokenUnusable::Expired => ErrorCode::TokenExpired,
            TokenUnusable::Revoked => ErrorCode::TokenRevoked,
            TokenUnusable::UsedUp => ErrorCode::TokenUsedUp,
        })?;
        validate_name(&name).map_err(|_| ErrorCode::InvalidName)?;
        let labels = token.labels.clone();
        let id = HostId(self.next_host);
        let (ipv4, ipv6) = match self.pool.allocate() {
            Ok(a) => a,
            Err(_) => {
                self.notices.push(Notice::PoolExhausted {
                    pool: self.pool.network(),
                    used: self.pool.allocated(),
                    requested: name,
                });
                return Err(ErrorCode::PoolExhausted);
            }
        };
        // CMDB records match the requested name or an underlay address.
        let mut ips = vec![observed];
        ips.extend(endpoints.addrs.iter().map(|a| a.ip()));
        let labels = self.labels_on_enrol(id, &name, &ips, labels);
        let name = if self.name_taken(&name, None) {
            let assigned = self.free_name(&name, id);
            self.notices.push(Notice::HostRenamedOnEnrol {
                id,
                requested: name,
                assigned: assigned.clone(),
            });
            assigned
        } else {
            name
        };
        self.next_host += 1;
        if let Some(t) = self.tokens.get_mut(&tid) {
            if let Some(u) = t.uses_left.as_mut() {
                *u = u.saturating_sub(1);
            }
        }
        self.dirty_tokens.insert(tid);
        self.hosts.insert(
            id,
            Host {
                id,
                name,
                public_key: key,
                ipv4,
                ipv6,
                labels,
                reported_endpoints: endpoints.addrs.clone(),
                listen_port: endpoints.listen_port,
                observed_ip: None,
                created_at: now,
                last_seen: now,
                removed: false,
                token_id: Some(tid),
                quarantined: false,
                revoked: false,
                transparent: endpoints.transparent,
                pending_key: None,
                key_rotated_at: None,
            },
        );
        self.by_key.insert(key, id);
        self.touch(id);
        self.policy_host_changed(id);
        Ok(id)
    }

    fn update_endpoints(
        &mut self,
        now: UnixTime,
        id: HostId,
        report: Option<EndpointReport>,
        observed: Option<IpAddr>,
    ) {
        let Some(h) = self.hosts.get_mut(&id) else {
            return;
        };
        let before = (h.endpoints(), h.transparent);
        if let Some(mut r) = report {
            r.addrs.truncate(MAX_REPORTED_ENDPOINTS);
            h.reported_endpoints = r.addrs;
            h.listen_port = r.listen_port;
            h.transparent = r.transparent;
        }
        if let Some(o) = observed {
            h.observed_ip = Some(o);
        }
        h.last_seen = now;
        let changed = (h.endpoints(), h.transparent) != before;
        self.dirty_hosts.insert(id);
        if changed {
            self.touch(id);
        }
    }

    pub(super) fn session_ok(&self, id: HostId, conn: ConnId) -> bool {
        self.sessions.get(&id).is_some_and(|s| s.conn == conn)
    }

    /// The agent reported new underlay endpoints.
    pub fn report_endpoints(&mut self, now: UnixTime, id: HostId, conn: ConnId, r: EndpointReport) {
        if self.session_ok(id, conn) {
            self.update_endpoints(now, id, Some(r), None);
        }
    }

    /// The agent's control connection now comes from another source address.
    pub fn observed_changed(&mut self, now: UnixTime, id: HostId, conn: ConnId, ip: IpAddr) {
        if self.session_ok(id, conn) {
            self.update_endpoints(now, id, None, Some(ip));
        }
    }

    /// The agent applied `version`.
    pub fn ack(&mut self, id: HostId, conn: ConnId, version: u64) {
        if let Some(s) = self.sessions.get_mut(&id).filter(|s| s.conn == conn) {
            s.acked = s.acked.max(version.min(s.sent_version));
        }
    }

    /// The agent could not apply a delta: the next poll sends it a full map.
    pub fn resync(&mut self, id: HostId, conn: ConnId) {
        if let Some(s) = self.sessions.get_mut(&id).filter(|s| s.conn == conn) {
            s.sent = None;
        }
    }

    /// The connection ended (a stale connection id is ignored).
    pub fn disconnect(&mut self, now: UnixTime, id: HostId, conn: ConnId) {
        if self.session_ok(id, conn) {
            self.sessions.remove(&id);
            if let Some(h) = self.hosts.get_mut(&id) {
                h.last_seen = now;
                self.dirty_hosts.insert(id);
            }
        }
    }
}
