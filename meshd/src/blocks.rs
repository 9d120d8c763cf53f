//! Block logs: denied flows, folded and rate-limited by the firewall's [`BlockLog`], become
//! [`BlockEvent`]s naming both hosts with their labels. They are appended as JSON lines to
//! `<state-dir>/blocks.jsonl` (rotated at 16 MiB), logged, and (coordinator mode) sent to the
//! coordinator for `meshctl blocks`.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;

use meshd_firewall::Denial;
use meshd_policy::BlockEvent;
use meshd_tunnel::{Device, PublicKey};

use crate::dataplane::{unix_millis, Enforcement};

/// Rotate the JSON-lines file past this size.
const MAX_LOG_BYTES: u64 = 16 << 20;

/// Names and labels of this host and its peers, for block events.
#[derive(Default, Clone)]
pub struct Directory {
    /// This host's name.
    pub host: String,
    /// This host's labels.
    pub host_labels: BTreeMap<String, String>,
    /// Peers by key.
    pub peers: HashMap<PublicKey, (String, BTreeMap<String, String>)>,
}

/// Turns drained denials into events and writes them out.
pub struct BlockSink {
    path: PathBuf,
    /// Who is who.
    pub directory: Directory,
}

impl BlockSink {
    /// Events go to `path` (JSON lines, mode 0600; an older file is made 0600).
    pub fn new(path: PathBuf, directory: Directory) -> Self {
        if let Err(e) = meshd_config::fsutil::make_private(&path) {
            tracing::warn!(error = %e, "block log permissions");
        }
        BlockSink { path, directory }
    }

    /// Drains the block log; returns the events (already written and logged). Peer indices
    /// are resolved to keys through the device's current table; `each` sees every drained
    /// denial with its peer's key (flow records count them).
    pub fn flush(
        &mut self,
        enforcement: &Enforcement,
        device: &Device,
        mut each: impl FnMut(&Denial<u32>, Option<PublicKey>),
    ) -> Vec<BlockEvent> {
        let denials = enforcement.blocks.drain(unix_millis());
        if denials.is_empty() {
            return Vec::new();
        }
        let empty = BTreeMap::new();
        let table = device.table();
        let events: Vec<BlockEvent> = denials
            .iter()
            .map(|d| {
                let key = table.by_receiver_index(d.peer << 8).map(|p| p.public_key);
                each(d, key);
                let (peer, labels) = key
                    .and_then(|k| self.directory.peers.get(&k))
                    .map(|(n, l)| (n.as_str(), l))
                    .unwrap_or(("unknown", &empty));
                d.to_block_event(
                    &self.directory.host,
                    &self.directory.host_labels,
                    peer,
                    labels,
                )
            })
            .collect();
        self.emit(events)
    }

    /// Writes and logs events from elsewhere (transparent mode's plaintext drops); returns them.
    pub fn emit(&mut self, events: Vec<BlockEvent>) -> Vec<BlockEvent> {
        if events.is_empty() {
            return events;
        }
        if let Err(e) = self.write(&events) {
            tracing::warn!(error = %e, path = %self.path.display(), "writing block log");
        }
        for e in &events {
            tracing::info!(
                target: "meshd::block",
                peer = %e.peer,
                direction = ?e.direction,
                proto = e.proto,
                src = %e.src,
                dst = %e.dst,
                reason = %e.reason,
                count = e.count,
                "denied"
            );
        }
        events
    }

    fn write(&self, events: &[BlockEvent]) -> std::io::Result<()> {
        if std::fs::metadata(&self.path).is_ok_and(|m| m.len() > MAX_LOG_BYTES) {
            std::fs::rename(&self.path, self.path.with_extension("jsonl.1"))?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)?;
        let mut buf = Vec::new();
        for e in events {
            serde_json::to_writer(&mut buf, e)?;
            buf.push(b'\n');
        }
        f.write_all(&buf)
    }
}
