//! Rendering: aligned tables and `key: value` blocks. Pure: the current time is a parameter.

use meshd_control::api::{HostView, StatusView, TokenView};
use meshd_control::{Labels, UnixTime};

use crate::parse::format_duration;

/// A table: a header row and data rows, rendered with columns padded to their widest cell.
#[derive(Debug, Clone, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (missing cells render empty, extra cells are dropped).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Renders with two spaces between columns and no trailing spaces; ends with a newline.
    pub fn render(&self) -> String {
        let n = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, w) in widths.iter().enumerate() {
                let c = r.get(i).map(String::as_str).unwrap_or("");
                line.push_str(c);
                if i + 1 < n {
                    let pad = w - c.chars().count() + 2;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `a=b,c=d`, or `-` when empty.
pub fn labels(l: &Labels) -> String {
    if l.is_empty() {
        return "-".into();
    }
    l.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `5m ago`, `just now`, or `never` for 0.
pub fn ago(t: UnixTime, now: UnixTime) -> String {
    if t == 0 {
        return "never".into();
    }
    match now.checked_sub(t) {
        Some(0) | None => "just now".into(),
        Some(d) => format!("{} ago", format_duration(d)),
    }
}

/// `in 1h`, `expired 5m ago`, or `never`.
pub fn until(t: Option<UnixTime>, now: UnixTime) -> String {
    match t {
        None => "never".into(),
        Some(t) if t > now => format!("in {}", format_duration(t - now)),
        Some(t) => format!("expired {}", ago(t, now)),
    }
}

fn list<T: ToString>(v: &[T]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// `hosts list`.
pub fn hosts_table(hosts: &[HostView], now: UnixTime) -> String {
    let mut t = Table::new(&[
        "NAME",
        "ID",
        "ADDRESS",
        "STATE",
        "LAST SEEN",
        "ENDPOINT",
        "LABELS",
    ]);
    for h in hosts {
        t.row(vec![
            h.name.clone(),
            h.id.to_string(),
            list(&h.addresses),
            if h.connected { "connected" } else { "offline" }.into(),
            if h.connected {
                "now".into()
            } else {
                ago(h.last_seen, now)
            },
            h.endpoints
                .first()
                .map_or_else(|| "-".into(), ToString::to_string),
            labels(&h.labels),
        ]);
    }
    t.render()
}

/// `hosts show` (and the result of label, unlabel, rename, remove).
pub fn host_detail(h: &HostView, now: UnixTime) -> String {
    let mut t = Table::new(&["name:", &h.name]);
    let state = match (h.connected, h.acked_version) {
        (true, Some(v)) => format!("connected (map version {v} acked)"),
        (true, None) => "connected".into(),
        (false, _) => "offline".into(),
    };
    for (k, v) in [
        ("id:", h.id.to_string()),
        ("public key:", h.public_key.to_string()),
        ("addresses:", list(&h.addresses)),
        ("state:", state),
        ("last seen:", ago(h.last_seen, now)),
        ("enrolled:", ago(h.created_at, now)),
        (
            "observed ip:",
            h.observed_ip
                .map_or_else(|| "-".into(), |ip| ip.to_string()),
        ),
        ("endpoints:", list(&h.endpoints)),
        ("labels:", labels(&h.labels)),
    ] {
        t.row(vec![k.into(), v]);
    }
    t.render()
}

/// `token list`.
pub fn tokens_table(tokens: &[TokenView], now: UnixTime) -> String {
    let mut t = Table::new(&["ID", "STATE", "LABELS", "USES LEFT", "EXPIRES", "CREATED"]);
    for k in tokens {
        t.row(vec![
            k.id.to_string(),
            k.state.clone(),
            labels(&k.labels),
            k.uses_left
                .map_or_else(|| "unlimited".into(), |u| u.to_string()),
            until(k.expires_at, now),
            ago(k.created_at, now),
        ]);
    }
    t.render()
}

/// One line about a token (stderr after `token create`, stdout after `token revoke`).
pub fn token_summary(k: &TokenView, now: UnixTime) -> String {
    let uses = match k.uses_left {
        None => "unlimited uses".to_string(),
        Some(1) => "1 use".to_string(),
        Some(n) => format!("{n} uses"),
    };
    let expires = match k.expires_at {
        None => "never expires".to_string(),
        Some(_) => format!("expires {}", until(k.expires_at, now)),
    };
    format!(
        "token {} ({}): labels {}, {uses}, {expires}",
        k.id,
        k.state,
        labels(&k.labels)
    )
}

/// `status`.
pub fn status(s: &StatusView, server: &str, now: UnixTime) -> String {
    let mut t = Table::new(&["coordinator:", server]);
    for (k, v) in [
        ("version:", s.version.clone()),
        ("public key:", s.public_key.to_string()),
        ("advertise:", s.advertise.to_string()),
        ("map version:", s.map_version.to_string()),
        ("hosts:", s.hosts.to_string()),
        ("connected:", s.connected.len().to_string()),
    ] {
        t.row(vec![k.into(), v]);
    }
    let mut out = t.render();
    if !s.connected.is_empty() {
        let mut a = Table::new(&["NAME", "ID", "CONNECTED", "SENT", "ACKED"]);
        for c in &s.connected {
            a.row(vec![
                c.name.clone(),
                c.id.to_string(),
                ago(c.connected_at, now),
                c.sent_version.to_string(),
                c.acked_version.to_string(),
            ]);
        }
        out.push('\n');
        out.push_str(&a.render());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshd_control::api::ConnectedAgent;
    use meshd_control::{HostId, TokenId};
    use meshd_tunnel::PublicKey;

    fn host(name: &str, id: u64, connected: bool) -> HostView {
        HostView {
            id: HostId(id),
            name: name.into(),
            public_key: PublicKey([1; 32]),
            addresses: vec!["100.64.0.2".parse().unwrap()],
            labels: [("env".to_string(), "prod".to_string())].into(),
            endpoints: vec!["192.0.2.1:51820".parse().unwrap()],
            observed_ip: None,
            connected,
            created_at: 1000,
            last_seen: 1000,
            acked_version: connected.then_some(7),
        }
    }

    #[test]
    fn table_aligns_columns() {
        let mut t = Table::new(&["NAME", "ID", "LABELS"]);
        t.row(vec!["a".into(), "10".into(), "x=y".into()]);
        t.row(vec!["longer-name".into(), "2".into(), "-".into()]);
        assert_eq!(
            t.render(),
            "NAME         ID  LABELS\n\
             a            10  x=y\n\
             longer-name  2   -\n"
        );
    }

    #[test]
    fn empty_table_is_header_only() {
        assert_eq!(Table::new(&["NAME", "ID"]).render(), "NAME  ID\n");
        assert_eq!(hosts_table(&[], 0).lines().count(), 1);
        assert!(hosts_table(&[], 0).starts_with("NAME  ID  ADDRESS"));
    }

    #[test]
    fn table_tolerates_ragged_rows_and_unicode() {
        let mut t = Table::new(&["A", "B", "C"]);
        t.row(vec!["é".into()]);
        t.row(vec!["xx".into(), "y".into(), "z".into(), "extra".into()]);
        assert_eq!(t.render(), "A   B  C\né\nxx  y  z\n");
    }

    #[test]
    fn times() {
        assert_eq!(ago(0, 100), "never");
        assert_eq!(ago(100, 100), "just now");
        assert_eq!(ago(200, 100), "just now");
        assert_eq!(ago(40, 100), "1m ago");
        assert_eq!(until(None, 100), "never");
        assert_eq!(until(Some(3700), 100), "in 1h");
        assert_eq!(until(Some(40), 100), "expired 1m ago");
    }

    #[test]
    fn hosts_table_rows() {
        let out = hosts_table(
            &[host("db1", 1, true), host("web-frontend", 12, false)],
            1060,
        );
        assert_eq!(
            out,
            "NAME          ID  ADDRESS     STATE      LAST SEEN  ENDPOINT         LABELS\n\
             db1           1   100.64.0.2  connected  now        192.0.2.1:51820  env=prod\n\
             web-frontend  12  100.64.0.2  offline    1m ago     192.0.2.1:51820  env=prod\n"
        );
        let d = host_detail(&host("db1", 1, true), 1060);
        assert!(d.starts_with("name:         db1\n"), "{d}");
        assert!(
            d.contains("state:        connected (map version 7 acked)\n"),
            "{d}"
        );
        assert!(d.contains("observed ip:  -\n"), "{d}");
    }

    #[test]
    fn tokens() {
        let mut k = TokenView {
            id: TokenId(3),
            labels: [("app".to_string(), "db1".to_string())].into(),
            created_at: 100,
            expires_at: Some(3700),
            uses_left: Some(1),
            revoked: false,
            state: "active".into(),
        };
        assert_eq!(
            tokens_table(std::slice::from_ref(&k), 100),
            "ID  STATE   LABELS   USES LEFT  EXPIRES  CREATED\n\
             3   active  app=db1  1          in 1h    just now\n"
        );
        assert_eq!(
            token_summary(&k, 100),
            "token 3 (active): labels app=db1, 1 use, expires in 1h"
        );
        k.uses_left = None;
        k.expires_at = None;
        k.labels.clear();
        assert_eq!(
            token_summary(&k, 100),
            "token 3 (active): labels -, unlimited uses, never expires"
        );
    }

    #[test]
    fn status_view() {
        let s = StatusView {
            version: "0.1.0".into(),
            map_version: 4,
            hosts: 2,
            connected: vec![ConnectedAgent {
                id: HostId(1),
                name: "db1".into(),
                sent_version: 4,
                acked_version: 3,
                connected_at: 40,
            }],
            advertise: "192.0.2.10:7443".parse().unwrap(),
            public_key: PublicKey([1; 32]),
        };
        let out = status(&s, "http://127.0.0.1:7444", 100);
        assert!(
            out.starts_with("coordinator:  http://127.0.0.1:7444\nversion:      0.1.0\n"),
            "{out}"
        );
        assert!(out.contains("connected:    1\n"), "{out}");
        assert!(
            out.ends_with("NAME  ID  CONNECTED  SENT  ACKED\ndb1   1   1m ago     4     3\n"),
            "{out}"
        );
    }
}
