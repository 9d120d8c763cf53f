//! Automatic response to scans: a detector fed by the block events agents report.
//!
//! The scanning actor of a denial is the reporting host for an outbound one (it tried to open)
//! and the peer for an inbound one (it tried to reach the reporter), so a scanner whose own
//! agent lies about its traffic is still caught by its victims. Per actor the detector keeps
//! the distinct (peer, protocol, port) pairs it was denied within the last `window_secs`
//! (the coordinator's `now`, not the agents' clocks); more than `max_pairs` of them, or more
//! than `max_ports_per_peer` ports of one peer, is a scan. The action is the first matching
//! group's (by labels), else the default: `quarantine` (the existing quarantine) or a label
//! set on the host (`label:zone=restricted`, overwriting that key; release removes it).
//!
//! Memory is bounded: at most `max(max_pairs, max_ports_per_peer) + 1` pairs per actor (the
//! oldest forgotten first; one more than a threshold is all a decision needs), and at most
//! `max_actors` actors (the least recently seen forgotten first).
//!
//! A host in learning mode is never acted on, nor are denials between it and any peer counted
//! (its pairs' denials are would-denies): the caller passes the predicate
//! (`CoordinatorState::is_learning` where learning mode exists).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;

use meshd_policy::{BlockEvent, DenyReason, Direction};
use serde::{Deserialize, Serialize};

use super::{AdminError, CoordinatorState};
use crate::model::{validate_label, Host, HostId, Labels, UnixTime};

/// What the detector does to a scanning host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanAction {
    /// Cut it off from every peer (`meshctl host quarantine`).
    Quarantine,
    /// Set this label on it (overwriting the key), e.g. moving it to a restricted group.
    Label {
        /// Key.
        key: String,
        /// Value.
        value: String,
    },
}

impl FromStr for ScanAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "quarantine" {
            return Ok(ScanAction::Quarantine);
        }
        let bad = || format!("scan action {s:?}: give quarantine or label:KEY=VALUE");
        let kv = s.strip_prefix("label:").ok_or_else(bad)?;
        let (key, value) = kv.split_once('=').ok_or_else(bad)?;
        validate_label(key, value).map_err(|e| format!("scan action {s:?}: {e}"))?;
        Ok(ScanAction::Label {
            key: key.into(),
            value: value.into(),
        })
    }
}

impl fmt::Display for ScanAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScanAction::Quarantine => f.write_str("quarantine"),
            ScanAction::Label { key, value } => write!(f, "label:{key}={value}"),
        }
    }
}

impl<'de> Deserialize<'de> for ScanAction {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for ScanAction {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A label group with its own action (`[[scan_response.groups]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScanGroup {
    /// Hosts carrying all these labels.
    pub labels: Labels,
    /// Their action.
    pub action: ScanAction,
}

/// Detector settings (`[scan_response]` in the coordinator config; every field optional).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScanConfig {
    /// Act on scans at all.
    pub enabled: bool,
    /// The window T, in seconds.
    pub window_secs: u64,
    /// N: more distinct denied (peer, port) pairs than this within the window is a scan.
    pub max_pairs: usize,
    /// M: more distinct denied ports of one peer than this within the window is a scan.
    pub max_ports_per_peer: usize,
    /// The action for hosts no group matches.
    pub action: ScanAction,
    /// Label groups with their own action, first match wins.
    pub groups: Vec<ScanGroup>,
    /// Actors tracked at most (the least recently seen is forgotten first).
    pub max_actors: usize,
}

impl Default for ScanConfig {
    fn default() -> Self {
        ScanConfig {
            enabled: true,
            window_secs: 60,
            max_pairs: 50,
            max_ports_per_peer: 20,
            action: ScanAction::Quarantine,
            groups: Vec::new(),
            max_actors: 4096,
        }
    }
}

/// Why scan settings were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScanConfigError {
    /// A setting that must be at least 1 is 0.
    #[error("scan_response.{0} must be at least 1")]
    Zero(&'static str),
    /// A threshold too large to be a bound on memory.
    #[error("scan_response.{0} must be at most {1}")]
    TooLarge(&'static str, usize),
    /// A group's labels are invalid.
    #[error("scan_response.groups: {0}")]
    Label(#[from] crate::model::LabelError),
}

/// Largest per-actor threshold accepted (so a window stays small).
pub const MAX_SCAN_THRESHOLD: usize = 65_536;

impl ScanConfig {
    /// Refuses zero thresholds and invalid group labels.
    pub fn validate(&self) -> Result<(), ScanConfigError> {
        for (name, v) in [
            ("window_secs", self.window_secs as usize),
            ("max_pairs", self.max_pairs),
            ("max_ports_per_peer", self.max_ports_per_peer),
            ("max_actors", self.max_actors),
        ] {
            if v == 0 {
                return Err(ScanConfigError::Zero(name));
            }
        }
        for (name, v) in [
            ("max_pairs", self.max_pairs),
            ("max_ports_per_peer", self.max_ports_per_peer),
        ] {
            if v > MAX_SCAN_THRESHOLD {
                return Err(ScanConfigError::TooLarge(name, MAX_SCAN_THRESHOLD));
            }
        }
        for g in &self.groups {
            for (k, v) in &g.labels {
                validate_label(k, v)?;
            }
        }
        Ok(())
    }

    /// The action for a host with these labels.
    pub fn action_for(&self, labels: &Labels) -> &ScanAction {
        self.groups
            .iter()
            .find(|g| g.labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
            .map_or(&self.action, |g| &g.action)
    }

    /// Every label an action may set (release removes them).
    pub fn restricted_labels(&self) -> Vec<(String, String)> {
        let mut v = Vec::new();
        for a in std::iter::once(&self.action).chain(self.groups.iter().map(|g| &g.action)) {
            if let ScanAction::Label { key, value } = a {
                if !v.contains(&(key.clone(), value.clone())) {
                    v.push((key.clone(), value.clone()));
                }
            }
        }
        v
    }

    fn per_actor(&self) -> usize {
        self.max_pairs.max(self.max_ports_per_peer) + 1
    }
}

/// One alert: the detector acted on a host. Also the webhook's JSON body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanAlert {
    /// Always `"scan_detected"`.
    pub kind: String,
    /// When (coordinator time).
    pub at: UnixTime,
    /// The scanning host's name.
    pub host: String,
    /// Its id.
    pub host_id: HostId,
    /// Its labels before the action.
    pub labels: Labels,
    /// What was done (`quarantine`, `label:zone=restricted`).
    pub action: String,
    /// Which threshold it crossed, in words.
    pub reason: String,
    /// Distinct denied (peer, port) pairs within the window.
    pub distinct_pairs: usize,
    /// The peer with the most denied ports, and how many.
    pub top_peer: String,
    /// Ports of `top_peer`.
    pub top_peer_ports: usize,
    /// The window, in seconds.
    pub window_secs: u64,
    /// Some of the denied pairs (`db-1 tcp/22`), at most 10.
    pub sample: Vec<String>,
}

impl fmt::Display for ScanAlert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): {}; action {}",
            self.host, self.host_id, self.reason, self.action
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hit {
    at: UnixTime,
    target: HostId,
    proto: u8,
    port: u16,
}

#[derive(Debug, Default)]
struct Window {
    last: UnixTime,
    /// Distinct pairs, oldest first (a repeated pair moves to the back).
    hits: VecDeque<Hit>,
}

/// What crossed a threshold.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Trigger {
    pairs: usize,
    top_peer: HostId,
    top_ports: usize,
    by_pairs: bool,
    sample: Vec<(HostId, u8, u16)>,
}

/// The detector's memory: per actor, the recent distinct denied pairs. Pure; time passed in.
#[derive(Debug)]
pub struct ScanDetector {
    cfg: ScanConfig,
    actors: HashMap<HostId, Window>,
    forgotten: u64,
}

impl ScanDetector {
    /// A detector with these settings (validate them first: zero thresholds act on nothing).
    pub fn new(cfg: ScanConfig) -> Self {
        ScanDetector {
            cfg,
            actors: HashMap::new(),
            forgotten: 0,
        }
    }

    /// Its settings.
    pub fn config(&self) -> &ScanConfig {
        &self.cfg
    }

    /// Actors tracked now.
    pub fn tracked(&self) -> usize {
        self.actors.len()
    }

    /// Actors forgotten because `max_actors` were tracked.
    pub fn forgotten(&self) -> u64 {
        self.forgotten
    }

    /// Pairs held for one actor (tests, bounds).
    pub fn pairs_of(&self, actor: HostId) -> usize {
        self.actors.get(&actor).map_or(0, |w| w.hits.len())
    }

    /// Forgets an actor (released, removed).
    pub fn forget(&mut self, actor: HostId) {
        self.actors.remove(&actor);
    }

    /// One denied attempt of `actor` on `target`'s `proto/port` at `now`; a threshold crossed
    /// ends the actor's window and says what crossed it.
    fn observe(
        &mut self,
        now: UnixTime,
        actor: HostId,
        target: HostId,
        proto: u8,
        port: u16,
    ) -> Option<Trigger> {
        if !self.actors.contains_key(&actor) && self.actors.len() >= self.cfg.max_actors {
            let oldest = self
                .actors
                .iter()
                .min_by_key(|(id, w)| (w.last, **id))
                .map(|(id, _)| *id);
            if let Some(o) = oldest {
                self.actors.remove(&o);
                self.forgotten += 1;
            }
        }
        let per_actor = self.cfg.per_actor();
        let horizon = now.saturating_sub(self.cfg.window_secs);
        let w = self.actors.entry(actor).or_default();
        w.last = w.last.max(now);
        while w
            .hits
            .front()
            .is_some_and(|h| h.at <= horizon && now >= self.cfg.window_secs)
        {
            w.hits.pop_front();
        }
        if let Some(i) = w
            .hits
            .iter()
            .position(|h| (h.target, h.proto, h.port) == (target, proto, port))
        {
            w.hits.remove(i);
        }
        w.hits.push_back(Hit {
            at: now,
            target,
            proto,
            port,
        });
        while w.hits.len() > per_actor {
            w.hits.pop_front();
        }
        let pairs = w.hits.len();
        let mut per_peer: HashMap<HostId, usize> = HashMap::new();
        for h in &w.hits {
            *per_peer.entry(h.target).or_default() += 1;
        }
        let (top_peer, top_ports) = per_peer
            .into_iter()
            .max_by_key(|(id, n)| (*n, std::cmp::Reverse(*id)))
            .unwrap_or((target, 0));
        let by_pairs = pairs > self.cfg.max_pairs;
        if !by_pairs && top_ports <= self.cfg.max_ports_per_peer {
            return None;
        }
        let sample = w
            .hits
            .iter()
            .rev()
            .take(10)
            .map(|h| (h.target, h.proto, h.port))
            .collect();
        self.actors.remove(&actor);
        Some(Trigger {
            pairs,
            top_peer,
            top_ports,
            by_pairs,
            sample,
        })
    }
}

fn proto_name(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 | 58 => "icmp".into(),
        n => format!("proto{n}"),
    }
}

impl CoordinatorState {
    /// Feeds block events from `reporter`'s agent to the detector and acts on every host that
    /// crossed a threshold (quarantine or label, as configured for its labels). Events whose
    /// peer is not a live host, denials other than default-deny or an expired rule, pairs
    /// involving a learning host (`is_learning`) and hosts already acted on (quarantined, or
    /// carrying the action's label) are not counted. Returns one alert per action taken; the
    /// changes are in the state like an admin's (commit them before sending the alerts).
    pub fn detect_scans(
        &mut self,
        now: UnixTime,
        detector: &mut ScanDetector,
        reporter: HostId,
        events: &[BlockEvent],
        is_learning: impl Fn(&CoordinatorState, HostId) -> bool,
    ) -> Vec<ScanAlert> {
        let mut alerts = Vec::new();
        if !detector.cfg.enabled {
            return alerts;
        }
        let live = |s: &CoordinatorState, id: HostId| s.hosts.get(&id).is_some_and(|h| !h.removed);
        if !live(self, reporter) {
            return alerts;
        }
        for e in events {
            if !matches!(e.reason, DenyReason::DefaultDeny | DenyReason::Expired(_)) {
                continue;
            }
            let Some(peer) = self
                .hosts
                .values()
                .find(|h| !h.removed && h.name == e.peer)
                .map(|h| h.id)
            else {
                continue;
            };
            let (actor, target) = match e.direction {
                Direction::Outbound => (reporter, peer),
                Direction::Inbound => (peer, reporter),
            };
            if actor == target || is_learning(self, actor) || is_learning(self, target) {
                continue;
            }
            let Some(h) = self.hosts.get(&actor) else {
                continue;
            };
            let action = detector.cfg.action_for(&h.labels).clone();
            if already_acted(h, &action) {
                continue;
            }
            let Some(t) = detector.observe(now, actor, target, e.proto, e.dst.port()) else {
                continue;
            };
            let name_of = |id: HostId| {
                self.hosts
                    .get(&id)
                    .map_or_else(|| id.to_string(), |h| h.name.clone())
            };
            let window = detector.cfg.window_secs;
            let reason = if t.by_pairs {
                format!(
                    "{} distinct denied (peer, port) pairs in {window} s (more than {})",
                    t.pairs, detector.cfg.max_pairs
                )
            } else {
                format!(
                    "{} distinct denied ports of {} in {window} s (more than {})",
                    t.top_ports,
                    name_of(t.top_peer),
                    detector.cfg.max_ports_per_peer
                )
            };
            let mut alert = ScanAlert {
                kind: "scan_detected".into(),
                at: now,
                host: h.name.clone(),
                host_id: actor,
                labels: h.labels.clone(),
                action: action.to_string(),
                reason,
                distinct_pairs: t.pairs,
                top_peer: name_of(t.top_peer),
                top_peer_ports: t.top_ports,
                window_secs: window,
                sample: t
                    .sample
                    .iter()
                    .map(|(p, proto, port)| {
                        format!("{} {}/{port}", name_of(*p), proto_name(*proto))
                    })
                    .collect(),
            };
            let name = alert.host.clone();
            let done = match &action {
                ScanAction::Quarantine => self.quarantine(&name).map(|_| ()),
                ScanAction::Label { key, value } => self
                    .set_labels(&name, [(key.clone(), value.clone())].into())
                    .map(|_| ()),
            };
            if let Err(e) = done {
                alert.action = format!("{action} failed: {e}");
            }
            alerts.push(alert);
        }
        alerts
    }

    /// Lifts a quarantine and removes the scan detector's restricted labels (`restricted`:
    /// [`ScanConfig::restricted_labels`]) where the host carries them with that value.
    pub fn release_scan(
        &mut self,
        r: &str,
        restricted: &[(String, String)],
    ) -> Result<Host, AdminError> {
        let h = self.release(r)?;
        let keys: Vec<String> = restricted
            .iter()
            .filter(|(k, v)| h.labels.get(k) == Some(v))
            .map(|(k, _)| k.clone())
            .collect();
        if keys.is_empty() {
            return Ok(h);
        }
        self.remove_labels(r, &keys)
    }
}

/// Whether the action was already taken on this host.
fn already_acted(h: &Host, action: &ScanAction) -> bool {
    match action {
        ScanAction::Quarantine => h.quarantined,
        ScanAction::Label { key, value } => h.labels.get(key) == Some(value),
    }
}
