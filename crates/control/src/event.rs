//! The coordinator's audit log vocabulary: an [`AuditEvent`] is a time, an [`EventKind`] and a
//! detail line. The store keeps the kind as its string ([`EventKind::as_str`]) and
//! `GET /v1/events` / `meshctl events` show that string, so the strings never change.

use std::fmt;

use crate::api::EventView;
use crate::model::UnixTime;

/// What an audit event records.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A second live connection for a connected host was refused.
    DuplicateConnection,
    /// An enrolling host asked for a taken name and got another one.
    HostRenamedOnEnrol,
    /// An enrolment was refused: no overlay address left.
    PoolExhausted,
    /// A host was removed.
    HostRemoved,
    /// A host was quarantined.
    HostQuarantined,
    /// A quarantine was lifted.
    HostReleased,
    /// A host was removed for good (its key is refused).
    HostRevoked,
    /// A policy version was applied.
    PolicyApplied,
    /// An earlier policy version was re-applied.
    PolicyRollback,
    /// The runtime learning setting changed (`meshctl policy mode`).
    PolicyModeChanged,
    /// A CMDB file was imported (`meshctl import`).
    CmdbImported,
    /// An enrolling host matched a CMDB record and got its labels.
    HostLabelsFromCmdb,
    /// The scan detector acted on a host (quarantine or restricted label).
    ScanDetected,
    /// A host was asked to rotate its key (`meshctl host rotate-key`, or its period).
    KeyRotationStarted,
    /// A rotating host proved its new key; peers accept both until it switches.
    KeyRotationProved,
    /// A host's key rotation completed: it speaks with its new key only.
    HostKeyRotated,
    /// A key rotation was given up (no proof, or no switch, in time).
    KeyRotationAborted,
    /// An admin token was created (`meshctl admin token create`).
    AdminTokenCreated,
    /// An admin token was revoked.
    AdminTokenRevoked,
    /// The admin key set changed (signed policy; the first set is trusted on first use).
    AdminKeysChanged,
    /// A host's name and labels were set from a signed statement.
    HostLabelsSigned,
    /// A kind this version does not write (stored by another version), kept as stored.
    Other(String),
}

impl EventKind {
    /// Every kind this version writes.
    pub const KNOWN: [EventKind; 21] = [
        EventKind::DuplicateConnection,
        EventKind::HostRenamedOnEnrol,
        EventKind::PoolExhausted,
        EventKind::HostRemoved,
        EventKind::HostQuarantined,
        EventKind::HostReleased,
        EventKind::HostRevoked,
        EventKind::PolicyApplied,
        EventKind::PolicyRollback,
        EventKind::PolicyModeChanged,
        EventKind::CmdbImported,
        EventKind::HostLabelsFromCmdb,
        EventKind::ScanDetected,
        EventKind::KeyRotationStarted,
        EventKind::KeyRotationProved,
        EventKind::HostKeyRotated,
        EventKind::KeyRotationAborted,
        EventKind::AdminTokenCreated,
        EventKind::AdminTokenRevoked,
        EventKind::AdminKeysChanged,
        EventKind::HostLabelsSigned,
    ];

    /// The stored and shown name (`host_removed`).
    pub fn as_str(&self) -> &str {
        match self {
            EventKind::DuplicateConnection => "duplicate_connection",
            EventKind::HostRenamedOnEnrol => "host_renamed_on_enrol",
            EventKind::PoolExhausted => "pool_exhausted",
            EventKind::HostRemoved => "host_removed",
            EventKind::HostQuarantined => "host_quarantined",
            EventKind::HostReleased => "host_released",
            EventKind::HostRevoked => "host_revoked",
            EventKind::PolicyApplied => "policy_applied",
            EventKind::PolicyRollback => "policy_rollback",
            EventKind::PolicyModeChanged => "policy_mode_changed",
            EventKind::CmdbImported => "cmdb_imported",
            EventKind::HostLabelsFromCmdb => "host_labels_from_cmdb",
            EventKind::ScanDetected => "scan_detected",
            EventKind::KeyRotationStarted => "key_rotation_started",
            EventKind::KeyRotationProved => "key_rotation_proved",
            EventKind::HostKeyRotated => "host_key_rotated",
            EventKind::KeyRotationAborted => "key_rotation_aborted",
            EventKind::AdminTokenCreated => "admin_token_created",
            EventKind::AdminTokenRevoked => "admin_token_revoked",
            EventKind::AdminKeysChanged => "admin_keys_changed",
            EventKind::HostLabelsSigned => "host_labels_signed",
            EventKind::Other(s) => s,
        }
    }

    /// The kind a stored name stands for (an unknown name is [`EventKind::Other`]).
    pub fn from_stored(s: &str) -> EventKind {
        EventKind::KNOWN
            .into_iter()
            .find(|k| k.as_str() == s)
            .unwrap_or_else(|| EventKind::Other(s.to_string()))
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// When (Unix seconds).
    pub at: UnixTime,
    /// What.
    pub kind: EventKind,
    /// Details, e.g. `h1 (3)` or `key <base64> from 192.0.2.1`.
    pub detail: String,
}

impl AuditEvent {
    /// An event at `at`.
    pub fn new(at: UnixTime, kind: EventKind, detail: impl Into<String>) -> Self {
        AuditEvent {
            at,
            kind,
            detail: detail.into(),
        }
    }
}

impl From<AuditEvent> for EventView {
    fn from(e: AuditEvent) -> Self {
        EventView {
            at: e.at,
            kind: e.kind.as_str().to_string(),
            detail: e.detail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_keep_their_stored_names() {
        let names: Vec<&str> = EventKind::KNOWN.iter().map(EventKind::as_str).collect();
        assert_eq!(
            names,
            [
                "duplicate_connection",
                "host_renamed_on_enrol",
                "pool_exhausted",
                "host_removed",
                "host_quarantined",
                "host_released",
                "host_revoked",
                "policy_applied",
                "policy_rollback",
                "policy_mode_changed",
                "cmdb_imported",
                "host_labels_from_cmdb",
                "scan_detected",
                "key_rotation_started",
                "key_rotation_proved",
                "host_key_rotated",
                "key_rotation_aborted",
                "admin_token_created",
                "admin_token_revoked",
                "admin_keys_changed",
                "host_labels_signed",
            ]
        );
        for k in EventKind::KNOWN {
            assert_eq!(EventKind::from_stored(k.as_str()), k);
            assert_eq!(k.to_string(), k.as_str());
        }
    }

    #[test]
    fn an_unknown_stored_kind_is_kept_as_it_was() {
        let k = EventKind::from_stored("host_enrolled");
        assert_eq!(k, EventKind::Other("host_enrolled".into()));
        assert_eq!(k.as_str(), "host_enrolled");
        let v = EventView::from(AuditEvent::new(5, k, "h1"));
        assert_eq!(
            (v.at, v.kind.as_str(), v.detail.as_str()),
            (5, "host_enrolled", "h1")
        );
    }
}
