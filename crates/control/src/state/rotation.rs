//! Host key rotation in the coordinator's state (the exchange is drawn in
//! [`crate::rotation`]): requests, proofs, the pending key in peers' maps, the switch on the
//! host's reconnect with its new key, time-outs and the automatic period.

use meshd_tunnel::PublicKey;

use super::{AdminError, ConnId, CoordinatorState, Push};
use crate::event::EventKind;
use crate::model::{Host, HostId, UnixTime};
use crate::proto::{CoordinatorMessage, ErrorCode};
use crate::rotation::{Nonce, Proposal, RotationError, RotationSchedule, SWITCH_AFTER_MS};

/// A rotation step worth an audit event (from [`CoordinatorState::poll_rotation_events`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationEvent {
    /// What.
    pub kind: EventKind,
    /// The host.
    pub host: HostId,
    /// Detail line (host name, keys, reason).
    pub detail: String,
}

impl CoordinatorState {
    /// Sets the automatic rotation periods.
    pub fn set_rotation_schedule(&mut self, schedule: RotationSchedule) {
        self.rotation_schedule = schedule;
    }

    /// Asks the connected host `r` to rotate its key, with challenge `nonce` (random, from
    /// the caller). The request goes out with the next [`poll_pushes`](Self::poll_pushes).
    pub fn start_key_rotation(
        &mut self,
        now: UnixTime,
        r: &str,
        nonce: Nonce,
    ) -> Result<Host, AdminError> {
        let id = self.live_id(r)?;
        if self.successions_full(id) {
            return Err(AdminError::KeyRotation(format!(
                "host {r:?} has rotated {} times since an admin signed its labels: sign them \
                 again (`meshctl --admin-key FILE host label {r} …`) before it rotates again",
                crate::signed::MAX_SUCCESSIONS
            )));
        }
        let conn = self.sessions.get(&id).map(|s| s.conn).ok_or_else(|| {
            AdminError::KeyRotation(format!(
                "host {r:?} is not connected: a key rotation needs the host online"
            ))
        })?;
        self.rotations
            .request(id, nonce, now)
            .map_err(|e| AdminError::KeyRotation(e.to_string()))?;
        self.rotation_msgs.push(Push {
            host: id,
            conn,
            message: CoordinatorMessage::RotateKey { nonce },
        });
        self.rotation_event(EventKind::KeyRotationStarted, id, String::new());
        self.host_result(id, r)
    }

    /// The host's answer to a rotation request. On success the key is pending (persisted
    /// with the batch), peers' maps carry it as the host's next key and the host is told to
    /// switch.
    pub fn key_proposal(
        &mut self,
        now: UnixTime,
        id: HostId,
        conn: ConnId,
        proposal: Proposal,
    ) -> Result<(), ErrorCode> {
        let Proposal {
            ref nonce,
            new_key,
            proof_ok,
            succession,
        } = proposal;
        if !self.session_ok(id, conn) {
            return Ok(());
        }
        let free = !self.by_key.contains_key(&new_key)
            && !self.revoked_keys.contains(&new_key)
            && self.rotations.host_pending(&new_key).is_none();
        if let Err(e) = self
            .rotations
            .propose(id, nonce, new_key, proof_ok, free, now)
        {
            let kind = match e {
                RotationError::NotRequested => return Err(ErrorCode::Malformed),
                _ => EventKind::KeyRotationAborted,
            };
            self.rotation_event(kind, id, e.to_string());
            return Ok(());
        }
        // In a signed mesh peers take the new key as this host only through its own
        // succession signature: a rotation without one would leave them refusing it.
        if let Err(why) = self.attach_succession(id, new_key, succession) {
            let _ = self.rotations.cancel(id);
            self.rotation_event(EventKind::KeyRotationAborted, id, why);
            return Ok(());
        }
        if let Some(h) = self.hosts.get_mut(&id) {
            h.pending_key = Some(new_key);
        }
        // Peers' records of this host change: they get its next key.
        self.touch(id);
        self.rotation_msgs.push(Push {
            host: id,
            conn,
            message: CoordinatorMessage::KeyAccepted {
                new_key,
                switch_after_ms: SWITCH_AFTER_MS,
            },
        });
        self.rotation_event(
            EventKind::KeyRotationProved,
            id,
            format!("next key {new_key}"),
        );
        Ok(())
    }

    /// `key` is the pending key of a live host: the host switched. Its key becomes `key`
    /// (persisted with the batch), peers drop the old one. Called by `connect`.
    pub(super) fn complete_rotation(&mut self, now: UnixTime, key: PublicKey) -> Option<HostId> {
        let id = self.rotations.host_pending(&key)?;
        let h = self.hosts.get_mut(&id).filter(|h| !h.removed)?;
        if !self.rotations.complete(id, &key) {
            return None;
        }
        let old = h.public_key;
        h.public_key = key;
        h.pending_key = None;
        h.key_rotated_at = Some(now);
        self.by_key.remove(&old);
        self.by_key.insert(key, id);
        self.retired_keys.push((key, old));
        // The old key's session (the agent closed it before reconnecting) is superseded; the
        // caller closes its connection ([`rotating_host`](Self::rotating_host)).
        self.sessions.remove(&id);
        self.touch(id);
        self.rotation_event(EventKind::HostKeyRotated, id, format!("key {old} -> {key}"));
        Some(id)
    }

    /// Ends rotations that timed out (a pending key leaves peers' maps) and, when a period
    /// is configured, starts those that are due on connected hosts; `nonce` makes each new
    /// request's challenge. Call when [`rotation_timeout`](Self::rotation_timeout) passes
    /// (or periodically).
    pub fn handle_rotation_timeout(&mut self, now: UnixTime, mut nonce: impl FnMut() -> Nonce) {
        for a in self.rotations.expire(now) {
            if let Some(h) = self.hosts.get_mut(&a.host) {
                if a.pending.is_some() && h.pending_key == a.pending {
                    h.pending_key = None;
                    self.touch(a.host);
                }
            }
            if let Some(k) = a.pending {
                self.detach_succession(a.host, &k);
            }
            self.rotation_event(EventKind::KeyRotationAborted, a.host, a.reason.to_string());
        }
        if !self.rotation_schedule.is_active() {
            return;
        }
        let due: Vec<String> = self
            .sessions
            .keys()
            .filter_map(|id| self.hosts.get(id))
            .filter(|h| !h.removed && self.rotations.phase(h.id).is_none())
            .filter(|h| !self.successions_full(h.id))
            .filter(|h| {
                let since = h.key_rotated_at.unwrap_or(h.created_at);
                self.rotation_schedule.due(&h.labels, since, now)
            })
            .map(|h| h.id.0.to_string())
            .collect();
        for id in due {
            // Connected and idle: only a race with a just-closed session fails, and the next
            // tick retries.
            let _ = self.start_key_rotation(now, &id, nonce());
        }
    }

    /// When [`handle_rotation_timeout`](Self::handle_rotation_timeout) next has work for
    /// sure (a time-out); with a schedule, call it at least every few seconds as well.
    pub fn rotation_timeout(&self) -> Option<UnixTime> {
        self.rotations.poll_timeout()
    }

    /// The live host whose proved next key is `key` (a connection with it completes the
    /// rotation and supersedes the host's old-key connection).
    pub fn rotating_host(&self, key: &PublicKey) -> Option<HostId> {
        self.rotations.host_pending(key)
    }

    /// Whether an automatic period is configured.
    pub fn rotation_scheduled(&self) -> bool {
        self.rotation_schedule.is_active()
    }

    /// Rotation steps since the last call (the coordinator records them as audit events).
    pub fn poll_rotation_events(&mut self) -> Vec<RotationEvent> {
        std::mem::take(&mut self.rotation_events)
    }

    /// A removed or revoked host's rotation ends with it.
    pub(super) fn cancel_rotation(&mut self, id: HostId) {
        if let Some(k) = self.rotations.cancel(id) {
            if let Some(h) = self.hosts.get_mut(&id) {
                if h.revoked {
                    self.revoked_keys.insert(k);
                }
                h.pending_key = None;
            }
            self.detach_succession(id, &k);
        }
    }

    /// Rotation messages and old-key removals join the map pushes (see `poll_pushes`).
    pub(super) fn finish_rotation_pushes(&mut self, out: &mut Vec<Push>) {
        let retired = std::mem::take(&mut self.retired_keys);
        if !retired.is_empty() {
            for p in out.iter_mut() {
                if let CoordinatorMessage::Delta { delta } = &mut p.message {
                    for (new, old) in &retired {
                        if delta.upserts.iter().any(|u| u.public_key == *new) {
                            delta.removals.push(*old);
                        }
                    }
                }
            }
        }
        // After the maps: a host switches only once its peers were sent its next key.
        out.extend(
            std::mem::take(&mut self.rotation_msgs)
                .into_iter()
                .filter(|m| self.session_ok(m.host, m.conn)),
        );
    }

    fn rotation_event(&mut self, kind: EventKind, id: HostId, extra: String) {
        let name = self
            .hosts
            .get(&id)
            .map_or_else(|| id.to_string(), |h| format!("{} ({id})", h.name));
        let detail = if extra.is_empty() {
            name
        } else {
            format!("{name}: {extra}")
        };
        self.rotation_events.push(RotationEvent {
            kind,
            host: id,
            detail,
        });
    }
}
