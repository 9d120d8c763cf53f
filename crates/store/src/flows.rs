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
         GROUP BY host_id, interval_start ORDER BY interval_start",
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SqliteStore, Store};
    use meshd_control::state::Dirty;

    fn labels(app: &str) -> Labels {
        [("app".to_string(), app.to_string())].into()
    }

    fn row(host: u64, peer: Option<u64>, port: u16, at: u64) -> FlowView {
        FlowView {
            interval_start: at,
            host: format!("h{host}"),
            host_id: HostId(host),
            host_labels: labels(&format!("a{host}")),
            peer: peer.map(|p| format!("h{p}")),
            peer_id: peer.map(HostId),
            peer_labels: peer.map(|p| labels(&format!("a{p}"))).unwrap_or_default(),
            src: peer.is_none().then(|| "198.18.0.9".parse().unwrap()),
            direction: Direction::Outbound,
            proto: 6,
            port,
            packets: 10,
            bytes: 1000,
            flows: 1,
            first_seen: at,
            last_seen: at + 5,
            verdict: if peer.is_some() {
                FlowVerdict::Allowed
            } else {
                FlowVerdict::Denied
            },
            rule: peer.map(|_| "r".to_string()),
        }
    }

    fn commit(s: &SqliteStore, rows: Vec<FlowView>) {
        s.commit(
            &Dirty {
                flows: rows,
                ..Default::default()
            },
            &[],
        )
        .unwrap();
    }

    fn all(since: u64, host: Option<u64>) -> FlowFilter {
        FlowFilter {
            since,
            host: host.map(HostId),
            limit: 1000,
        }
    }

    #[test]
    fn flows_round_trip_by_time_and_host_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let rows = vec![
            row(1, Some(2), 5432, 100),
            row(2, Some(3), 22, 110),
            row(3, None, 80, 120),
            row(1, Some(2), 5432, 130),
        ];
        {
            let s = SqliteStore::open(&path).unwrap();
            commit(&s, rows.clone());
            assert_eq!(s.flows(&all(0, None)).unwrap(), rows);
        }
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.flows(&all(0, None)).unwrap(), rows, "after a reopen");
        // since: last seen at or after.
        assert_eq!(s.flows(&all(115, None)).unwrap(), rows[1..].to_vec());
        assert_eq!(s.flows(&all(116, None)).unwrap(), rows[2..].to_vec());
        // host: either end.
        assert_eq!(
            s.flows(&all(0, Some(2))).unwrap(),
            rows[..2]
                .iter()
                .chain(&rows[3..])
                .cloned()
                .collect::<Vec<_>>()
        );
        assert_eq!(s.flows(&all(0, Some(3))).unwrap(), rows[1..3].to_vec());
        // limit: the newest, oldest first.
        let q = FlowFilter {
            limit: 2,
            ..all(0, None)
        };
        assert_eq!(s.flows(&q).unwrap(), rows[2..].to_vec());
        // Label sets are stored once.
        let n: i64 = s
            .read(|c| Ok(c.query_row("SELECT COUNT(*) FROM flow_labels", [], |r| r.get(0))?))
            .unwrap();
        assert_eq!(n, 4, "a1, a2, a3 and {{}}");
        // Start-up gets the recent intervals' row counts.
        let snap = s.load().unwrap();
        let h1: Vec<_> = snap
            .flow_intervals
            .iter()
            .filter(|i| i.host == HostId(1))
            .map(|i| (i.interval_start, i.rows))
            .collect();
        assert_eq!(h1, [(100, 1), (130, 1)]);
    }

    #[test]
    fn the_summary_adds_up_a_window() {
        let s = SqliteStore::open_in_memory().unwrap();
        commit(
            &s,
            vec![
                row(1, Some(2), 5432, 100),
                row(1, Some(2), 5432, 110),
                row(1, Some(2), 22, 120),
                row(1, Some(2), 5432, 500),
            ],
        );
        let sum = s.flow_summary(&all(0, None)).unwrap();
        assert_eq!(sum.len(), 2);
        let pg = &sum[0];
        assert_eq!(pg.port, 5432);
        assert_eq!((pg.packets, pg.bytes, pg.flows), (30, 3000, 3));
        assert_eq!(
            (pg.interval_start, pg.first_seen, pg.last_seen),
            (100, 100, 505)
        );
        let sum = s.flow_summary(&all(200, None)).unwrap();
        assert_eq!((sum.len(), sum[0].packets), (1, 10));
    }

    #[test]
    fn pruning_deletes_old_rows_in_bounded_batches() {
        let s = SqliteStore::open_in_memory().unwrap();
        commit(&s, (0..25).map(|i| row(1, Some(2), 1, i * 10)).collect());
        // Rows last seen before 105 (i*10+5 < 105: i = 0..=9): 10 of them, 4 per batch.
        assert_eq!(s.prune_flows(105, 4).unwrap(), 4);
        assert_eq!(s.prune_flows(105, 4).unwrap(), 4);
        assert_eq!(s.prune_flows(105, 4).unwrap(), 2);
        assert_eq!(s.prune_flows(105, 4).unwrap(), 0);
        let left = s.flows(&all(0, None)).unwrap();
        assert_eq!(left.len(), 15);
        assert_eq!(left[0].interval_start, 100);
    }

    #[test]
    fn a_failed_commit_stores_no_flow_rows() {
        let s = SqliteStore::open_in_memory().unwrap();
        let mut bad = row(1, Some(2), 1, 10);
        bad.bytes = u64::MAX;
        let e = s
            .commit(
                &Dirty {
                    flows: vec![row(1, Some(2), 1, 5), bad],
                    ..Default::default()
                },
                &[],
            )
            .unwrap_err();
        assert!(matches!(e, StoreError::Range("bytes")), "{e:?}");
        assert!(s.flows(&all(0, None)).unwrap().is_empty());
        // A corrupt verdict reads back as an error, not a panic.
        commit(&s, vec![row(1, Some(2), 1, 5)]);
        s.with(|c| Ok(c.execute("UPDATE flows SET verdict = 9", [])?))
            .unwrap();
        assert!(matches!(
            s.flows(&all(0, None)),
            Err(StoreError::Corrupt {
                table: "flows",
                field: "verdict",
                ..
            })
        ));
    }
}
