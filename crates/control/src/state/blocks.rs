//! Block events: recorded from agents (bounded), restored at start-up, queried by the admin API.

use meshd_policy::BlockEvent;

use super::{ConnId, CoordinatorState};
use crate::model::{HostId, UnixTime};

/// How many block events the coordinator keeps in memory for `GET /v1/blocks`.
pub const BLOCKS_KEPT: usize = 10_000;

/// Latest event time the store can hold (its integers are signed 64-bit).
const MAX_STORED_TIME: u64 = i64::MAX as u64;

impl CoordinatorState {
    /// Block events from the agent of `id` (beyond [`crate::proto::MAX_BLOCKS_PER_MESSAGE`]
    /// per call they are dropped and counted). The host field is set to the sender's name.
    pub fn record_blocks(&mut self, id: HostId, conn: ConnId, events: Vec<BlockEvent>) {
        if !self.session_ok(id, conn) {
            return;
        }
        let Some(name) = self.hosts.get(&id).map(|h| h.name.clone()) else {
            return;
        };
        let max = crate::proto::MAX_BLOCKS_PER_MESSAGE;
        self.blocks_dropped += events.len().saturating_sub(max) as u64;
        for mut e in events.into_iter().take(max) {
            if e.at > MAX_STORED_TIME {
                // The store cannot hold it (and it would fail the whole batch's commit).
                self.blocks_dropped += 1;
                continue;
            }
            e.host = name.clone();
            if self.blocks.len() == BLOCKS_KEPT {
                self.blocks.pop_front();
            }
            self.blocks.push_back(e.clone());
            self.dirty_blocks.push(e);
        }
    }

    /// Loads stored block events (oldest first) at start-up.
    pub fn restore_blocks(&mut self, events: Vec<BlockEvent>) {
        let skip = events.len().saturating_sub(BLOCKS_KEPT);
        self.blocks = events.into_iter().skip(skip).collect();
    }

    /// Block events at or after `since`, optionally only those where `host` is either end,
    /// oldest first.
    pub fn blocks(&self, host: Option<&str>, since: UnixTime) -> Vec<BlockEvent> {
        self.blocks
            .iter()
            .filter(|e| e.at >= since)
            .filter(|e| host.is_none_or(|h| e.host == h || e.peer == h))
            .cloned()
            .collect()
    }

    /// Block events dropped because a message carried too many.
    pub fn blocks_dropped(&self) -> u64 {
        self.blocks_dropped
    }
}
