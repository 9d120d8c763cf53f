//! Learning mode at runtime (`meshctl policy mode learn|enforce [--group k=v,…]`): a setting
//! stored apart from the policy file, combined with the file's `mode:` / `learn:` so that the
//! hosts that learn are exactly those the file **or** the runtime setting names.
//!
//! - `learn` / `learn --group G`: the whole mesh / the hosts with G's labels learn (added to
//!   whatever the file says).
//! - `enforce --group G`: removes the runtime group G. Refused when G's hosts learn because
//!   of the file (edit the file and apply it), or while the whole mesh learns by the runtime
//!   switch (a group cannot be exempted).
//! - `enforce`: clears every runtime setting; refused when there is none and the file declares
//!   learning (the file is what has to change).
//!
//! Every change is recorded for the store ([`Dirty::mode`](super::Dirty)) and recompiles the
//! policy like an apply, so the maps of exactly the hosts whose pairs changed are pushed.

use std::collections::BTreeMap;

use meshd_policy::{Learning, Match, PolicyMode, Selector};
use serde::{Deserialize, Serialize};

use super::admin::validate_labels;
use super::{AdminError, CoordinatorState};
use crate::api::{LearnGroupView, ModeSource, PolicyModeView};
use crate::model::{HostId, Labels, UnixTime};
use crate::policy::{host_ref, is_live};

/// Most runtime learning groups.
pub const MAX_LEARN_GROUPS: usize = 64;

/// The runtime learning setting, as stored (JSON in the store's meta table).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeMode {
    /// The whole mesh learns.
    #[serde(default)]
    pub all: bool,
    /// Label groups that learn (a host with all of a group's labels learns), in the order set.
    #[serde(default)]
    pub groups: Vec<Labels>,
    /// When it last changed (0: never).
    #[serde(default)]
    pub changed_at: UnixTime,
}

impl RuntimeMode {
    /// As the policy compiler takes it.
    pub fn learning(&self) -> Learning {
        Learning {
            all: self.all,
            groups: self.groups.iter().map(group_selector).collect(),
        }
    }
}

/// The selector of a label group: every label equal.
pub fn group_selector(g: &Labels) -> Selector {
    Selector {
        host: None,
        labels: g
            .iter()
            .map(|(k, v)| (k.clone(), Match::Eq(v.clone())))
            .collect(),
    }
}

/// `app=legacy,env=x`, as the CLI takes it.
fn group_text(g: &Labels) -> String {
    g.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

impl CoordinatorState {
    /// Whether host `id` is in learning mode now (false when unknown, removed or quarantined).
    /// A pure, O(1) query (one bit of the compiled policy), e.g. for a detector that must
    /// never quarantine a learning host for its would-deny flows.
    pub fn is_learning(&self, id: HostId) -> bool {
        self.compiled.is_learning(id.0)
    }

    /// The runtime learning setting (the file's is in the current policy).
    pub fn runtime_mode(&self) -> &RuntimeMode {
        &self.runtime_mode
    }

    /// The live hosts in learning mode, by name, sorted.
    pub fn learning_host_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .compiled
            .learning_hosts()
            .map(|h| h.name.clone())
            .collect();
        v.sort();
        v
    }

    /// Whether every host learns.
    pub fn learning_all(&self) -> bool {
        self.compiled.learns_all()
    }

    /// Loads the stored runtime setting at start-up (after the policy versions); every map is
    /// recomputed.
    pub fn restore_mode(&mut self, now: UnixTime, mode: RuntimeMode) {
        self.runtime_mode = mode;
        self.recompile(now);
    }

    /// Which hosts learn, and why.
    pub fn mode_view(&self) -> PolicyModeView {
        let live: Vec<_> = self
            .hosts
            .values()
            .filter(|h| is_live(h))
            .map(host_ref)
            .collect();
        let names = |sel: &Selector| {
            let mut v: Vec<String> = live
                .iter()
                .filter(|h| sel.matches(h))
                .map(|h| h.name.clone())
                .collect();
            v.sort();
            v
        };
        let mut mesh_wide = Vec::new();
        if self.policy.mode == PolicyMode::Learn {
            mesh_wide.push(ModeSource::File);
        }
        if self.runtime_mode.all {
            mesh_wide.push(ModeSource::Runtime);
        }
        let file = self
            .policy
            .learn
            .iter()
            .map(|s| (s.clone(), ModeSource::File));
        let runtime = self
            .runtime_mode
            .groups
            .iter()
            .map(|g| (group_selector(g), ModeSource::Runtime));
        let groups = file
            .chain(runtime)
            .map(|(sel, source)| LearnGroupView {
                group: sel.to_string(),
                source,
                hosts: names(&sel),
            })
            .collect();
        PolicyModeView {
            mode: if mesh_wide.is_empty() {
                PolicyMode::Enforce
            } else {
                PolicyMode::Learn
            },
            mesh_wide,
            groups,
            learning: self.learning_host_names(),
            hosts: live.len(),
            changed_at: self.runtime_mode.changed_at,
            changed: false,
        }
    }

    /// `meshctl policy mode learn|enforce [--group G]` (see the module docs for what is
    /// refused). A change is stored with the next commit and recompiles every map.
    pub fn set_mode(
        &mut self,
        now: UnixTime,
        mode: PolicyMode,
        group: Option<Labels>,
    ) -> Result<PolicyModeView, AdminError> {
        if let Some(g) = &group {
            if g.is_empty() {
                return Err(AdminError::InvalidGroup(
                    "empty group: give labels such as --group app=legacy, or no --group for \
                     the whole mesh"
                        .into(),
                ));
            }
            validate_labels(g)?;
        }
        let mut next = self.runtime_mode.clone();
        match (mode, group) {
            (PolicyMode::Learn, None) => next.all = true,
            (PolicyMode::Learn, Some(g)) => {
                if !next.groups.contains(&g) {
                    if next.groups.len() >= MAX_LEARN_GROUPS {
                        return Err(AdminError::InvalidGroup(format!(
                            "at most {MAX_LEARN_GROUPS} learning groups; end one with \
                             `meshctl policy mode enforce --group …` first"
                        )));
                    }
                    next.groups.push(g);
                }
            }
            (PolicyMode::Enforce, None) => {
                let had_runtime = next.all || !next.groups.is_empty();
                if !had_runtime && self.policy.declares_learning() {
                    return Err(AdminError::ModeRefused(format!(
                        "learning is declared by the policy file ({}), not by `meshctl policy \
                         mode`: remove it from the file and `meshctl policy apply` it",
                        self.file_learning()
                    )));
                }
                next.all = false;
                next.groups.clear();
            }
            (PolicyMode::Enforce, Some(g)) => {
                if let Some(i) = next.groups.iter().position(|x| *x == g) {
                    next.groups.remove(i);
                } else {
                    self.refuse_enforce_group(&g)?;
                }
            }
        }
        let changed = next.all != self.runtime_mode.all || next.groups != self.runtime_mode.groups;
        if changed {
            next.changed_at = now;
            self.runtime_mode = next;
            self.dirty_mode = true;
            self.recompile(now);
        }
        Ok(PolicyModeView {
            changed,
            ..self.mode_view()
        })
    }

    /// `enforce --group G` for a G that is not a runtime group: refused when its hosts learn
    /// for another reason the runtime setting cannot undo; else there is nothing to do.
    fn refuse_enforce_group(&self, g: &Labels) -> Result<(), AdminError> {
        let text = group_text(g);
        if self.runtime_mode.all {
            return Err(AdminError::ModeRefused(format!(
                "the whole mesh is in learning mode (set with `meshctl policy mode learn`); a \
                 group cannot be exempted: end it with `meshctl policy mode enforce`, then \
                 put the groups that should learn with `meshctl policy mode learn --group …` \
                 (not {text})"
            )));
        }
        let sel = group_selector(g);
        let from_file: BTreeMap<String, ()> = self
            .hosts
            .values()
            .filter(|h| is_live(h))
            .map(host_ref)
            .filter(|h| sel.matches(h) && self.policy.learns(h))
            .map(|h| (h.name, ()))
            .collect();
        if self.policy.learn.contains(&sel)
            || self.policy.mode == PolicyMode::Learn
            || !from_file.is_empty()
        {
            let hosts = from_file.into_keys().collect::<Vec<_>>().join(", ");
            return Err(AdminError::ModeRefused(format!(
                "group {text} learns because the policy file says so ({}){}: edit the \
                 file's `mode:`/`learn:` and `meshctl policy apply` it",
                self.file_learning(),
                if hosts.is_empty() {
                    String::new()
                } else {
                    format!(", hosts {hosts}")
                }
            )));
        }
        Ok(())
    }

    /// The file's learning declarations, for messages (`mode: learn`, `learn: [{app: x}]`).
    fn file_learning(&self) -> String {
        let mut parts = Vec::new();
        if self.policy.mode == PolicyMode::Learn {
            parts.push("mode: learn".to_string());
        }
        if !self.policy.learn.is_empty() {
            let sels: Vec<String> = self.policy.learn.iter().map(|s| s.to_string()).collect();
            parts.push(format!("learn: [{}]", sels.join(", ")));
        }
        parts.join(", ")
    }
}
