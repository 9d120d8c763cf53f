//! The `flows` and `flow_labels` tables (migration 4): inserts in the commit transaction,
//! queries by time and host, pruning by age, and the row counts start-up restores.

use std::collections::HashMap;

use meshd_control::api::FlowView;
use meshd_control::flow::FlowVerdict;
use meshd_control::state::FlowInterval;
use meshd_control::{HostId, Labels};
use meshd_policy::Direction;
use rusqlite::{params, Connection, OptionalExtension as _, Row, Transaction};

use crate::{FlowFilter, StoreError, FLOW_INTERVALS_LOADED_SECS};

fn to_i64(v: u64, what: &'static str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Range(what))
}

fn verdict_code(v: FlowVerdict) -> i64 {
    match v {
        FlowVerdict::Allowed => 0,
        FlowVerdict::Denied => 1,
        FlowVerdict::WouldDeny => 2,
    }
}

/// The id of a label set, inserted if new (`cache`: this transaction's lookups).
fn label_id(
    tx: &Transaction<'_>,
    cache: &mut HashMap<String, i64>,
    labels: &Labels,
) -> Result<i64, StoreError> {
    let json = serde_json::to_string(labels).map_err(|_| StoreError::Range("labels"))?;
    if let Some(id) = cache.get(&json) {
        return Ok(*id);
    }
    let found: Option<i64> = tx
        .prepare_cached("SELECT id FROM flow_labels WHERE labels = ?1")?
        .query_row([&json], |r| r.get(0))
        .optional()?;
    let id = match found {
        Some(id) => id,
        None => {
            tx.prepare_cached("INSERT INTO flow_labels (labels) VALUES (?1)")?
                .execute([&json])?;
            tx.last_insert_rowid()
        }
    };
    cache.insert(json, id);
    Ok(id)
}

/// Inserts flow rows (inside the commit transaction).
pub(crate) fn insert(tx: &Transaction<'_>, rows: &[FlowView]) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut cache = HashMap::new();
    for r in rows {
        let hl = label_id(tx, &mut cache, &r.host_labels)?;
        let pl = label_id(tx, &mut cache, &r.peer_labels)?;
        tx.prepare_cached(
            "INSERT INTO flows (interval_start, host_id, host_name, host_labels, peer_id,
                                peer_name, peer_labels, src, outbound, proto, port, packets,
                                bytes, flows, first_seen, last_seen, verdict, rule)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16,
                     ?17, ?18)",
        )?
        .execute(params![
            to_i64(r.interval_start, "interval_start")?,
            to_i64(r.host_id.0, "host id")?,
            r.host,
            hl,
            r.peer_id.map(|p| to_i64(p.0, "peer id")).transpose()?,
            r.peer,
            pl,
            r.src.map(|a| a.to_string()),
            r.direction == Direction::Outbound,
            r.proto,
            r.port,
            to_i64(r.packets, "packets")?,
            to_i64(r.bytes, "bytes")?,
            to_i64(r.flows, "flows")?,
            to_i64(r.first_seen, "first_seen")?,
            to_i64(r.last_seen, "last_seen")?,
            verdict_code(r.verdict),
            r.rule,
        ])?;
    }
    Ok(())
}

fn all_labels(c: &Connection) -> Result<HashMap<i64, Labels>, StoreError> {
    let mut st = c.prepare("SELECT id, labels FROM flow_labels")?;
    let mut rows = st.query([])?;
    let mut m = HashMap::new();
    while let Some(r) = rows.next()? {
        let id: i64 = r.get(0)?;
        let json: String = r.get(1)?;
        let l = serde_json::from_str(&json).map_err(|_| StoreError::Corrupt {
            table: "flow_labels",
            id,
            field: "labels",
        })?;
        m.insert(id, l);
    }
    Ok(m)
}

/// Columns 0..=17 in the order of [`COLUMNS`] (or [`SUMS`]) into a view.
fn view(r: &Row<'_>, labels: &HashMap<i64, Labels>, id: i64) -> Result<FlowView, StoreError> {
    let bad = |field| StoreError::Corrupt {
        table: "flows",
        id,
        field,
    };
    let u = |i: usize, field| -> Result<u64, StoreError> {
        let v: i64 = r.get(i)?;
        u64::try_from(v).map_err(|_| bad(field))
    };
    let label = |i: usize, field| -> Result<Labels, StoreError> {
        let l: i64 = r.get(i)?;
        labels.get(&l).cloned().ok_or(bad(field))
    };
    let peer_id: Option<i64> = r.get(4)?;
    let src: Option<String> = r.get(7)?;
    let outbound: bool = r.get(8)?;
    let verdict: i64 = r.get(16)?;
    Ok(FlowView {
        interval_start: u(0, "interval_start")?,
        host_id: HostId(u(1, "host_id")?),
        host: r.get(2)?,
        host_labels: label(3, "host_labels")?,
        peer_id: peer_id
            .map(|p| u64::try_from(p).map(HostId))
            .transpose()
            .map_err(|_| bad("peer_id"))?,
        peer: r.get(5)?,
        peer_labels: label(6, "peer_labels")?,
        src: src.map(|s| s.parse()).transpose().map_err(|_| bad("src"))?,
        direction: if outbound {
            Direction::Outbound
        } else {
            Direction::Inbound
        },
        proto: r.get(9)?,
        port: r.get(10)?,
        packets: u(11, "packets")?,
        bytes: u(12, "bytes")?,
        flows: u(13, "flows")?,
        first_seen: u(14, "first_seen")?,
        last_seen: u(15, "last_seen")?,
        verdict: match verdict {
            0 => FlowVerdict::Allowed,
            1 => FlowVerdict::Denied,
            2 => FlowVerdict::WouldDeny,
            _ => return Err(bad("verdict")),
        },
        rule: r.get(17)?,
    })
}

const COLUMNS: &str = "interval_start, host_id, host_name, host_labels, peer_id, peer_name,
    peer_labels, src, outbound, proto, port, packets, bytes, flows, first_seen, last_seen,
    verdict, rule, id";

const SUMS: &str = "MIN(interval_start), host_id, MAX(host_name), host_labels, peer_id,
    MAX(peer_name), peer_labels, src, outbound, proto, port, SUM(packets), SUM(bytes),
    SUM(flows), MIN(first_seen), MAX(last_seen), verdict, rule, MIN(id)";

fn filter(q: &FlowFilter) -> Result<(String, i64, i64), StoreError> {
    let since = to_i64(q.since, "since")?;
    match q.host {
        None => Ok(("last_seen >= ?1 AND ?2 = ?2".into(), since, 0)),
        Some(h) => Ok((
            "((host_id = ?2 AND last_seen >= ?1) OR (peer_id = ?2 AND last_seen >= ?1))".into(),
            since,
            to_i64(h.0, "host id")?,
        )),
    }
}

/// The newest `q.limit` matching rows, oldest first.
pub(crate) fn query(c: &Connection, q: &FlowFilter) -> Result<Vec<FlowView>, StoreError> {
    let labels = all_labels(c)?;
    let (cond, since, host) = filter(q)?;
    let mut st = c.prepare(&format!(
        "SELECT {COLUMNS} FROM flows WHERE {cond} ORDER BY id DESC LIMIT ?3"
    ))?;
    let mut rows = st.query(params![since, host, q.limit])?;
    let mut v = Vec::new();
    while let Some(r) = rows.next()? {
        let id: i64 = r.get(18)?;
        v.push(view(r, &labels, id)?);
    }
    v.reverse();
    Ok(v)
}

/// Matching rows summed per group (see [`crate::Store::flow_summary`]).
pub(crate) fn summary(c: &Connection, q: &FlowFilter) -> Result<Vec<FlowView>, StoreError> {
    let labels = all_labels(c)?;
    let (cond, since, host) = filter(q)?;
    let mut st = c.prepare(&format!(
        "SELECT {SUMS} FROM flows WHERE {cond}
         GROUP BY host_id, host_labels, peer_id, peer_labels, src, outbound, proto, port,
                  verdict, rule
         ORDER BY MIN(id) LIMIT ?3"
    ))?;
    let mut rows = st.query(params![since, host, q.limit])?;
    let mut v = Vec::new();
    while let Some(r) = rows.next()? {
        let id: i64 = r.get(18)?;
        v.push(view(r, &labels, id)?);
    }
    Ok(v)
}

/// Deletes at most `max_rows` rows last seen before `before`.
pub(crate) fn prune(c: &Connection, before: u64, max_rows: u32) -> Result<u64, StoreError> {
    let n = c.execute(
        "DELETE FROM flows WHERE id IN
            (SELECT id FROM flows WHERE last_seen < ?1 LIMIT ?2)",
        params![to_i64(before, "before")?, max_rows],
    )?;
    Ok(n as u64)
}

/// Row counts per (host, interval) of the last [`FLOW_INTERVALS_LOADED_SECS`] before the
/// newest row.
pub(crate) fn intervals(c: &Connection) -> Result<Vec<FlowInterval>, StoreError> {
    let newest: Option<i64> = c.query_row("SELECT MAX(last_seen) FROM flows", [], |r| r.get(0))?;
    let Some(newest) = newest else {
        return Ok(Vec::new());
    };
    let from = newest.saturating_sub(FLOW_INTERVALS_LOADED_SECS as i64);
    let mut st = c.prepare(
        "SELECT host_id, interval_start, COUNT(*) FROM flows WHERE last_seen >= ?1
         GROUP BY host_id, interval_start ORDER BY interval_start, host_id",
    )?;
    let mut rows = st.query([from])?;
    let mut v = Vec::new();
    while let Some(r) = rows.next()? {
        let (h, t, n): (i64, i64, i64) = (r.get(0)?, r.get(1)?, r.get(2)?);
        let bad = |field| StoreError::Corrupt {
            table: "flows",
            id: 0,
            field,
        };
        v.push(FlowInterval {
            host: HostId(u64::try_from(h).map_err(|_| bad("host_id"))?),
            interval_start: u64::try_from(t).map_err(|_| bad("interval_start"))?,
            rows: usize::try_from(n).map_err(|_| bad("count"))?,
        });
    }
    Ok(v)
}

// Tests: tests/suite.rs (each on SQLite and PostgreSQL).
