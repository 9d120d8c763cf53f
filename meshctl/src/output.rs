//! Rendering: aligned tables and `key: value` blocks. Pure: the current time is a parameter.

use meshd_control::api::{AdminTokenView, ModeSource, PolicyModeView};
use meshd_control::api::{
    EventView, GuardStats, HostMode, HostView, StatusView, StoreFailure, TokenView,
};
use meshd_control::policy::PolicyRecord;
use meshd_control::{Labels, UnixTime};
use meshd_policy::{ip_proto, BlockEvent, Change, ChangeKind, Direction, Explanation, Policy};

use crate::parse::format_duration;
use crate::policy::{plural, verdict};

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
        "POLICY",
        "MODE",
        "LAST SEEN",
        "ENDPOINT",
        "LABELS",
    ]);
    for h in hosts {
        t.row(vec![
            h.name.clone(),
            h.id.to_string(),
            list(&h.addresses),
            match (h.quarantined, h.connected) {
                (true, _) => "quarantined",
                (false, true) => "connected",
                (false, false) => "offline",
            }
            .into(),
            enforcement(h).into(),
            mode(h),
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

/// `learn` (not enforcing: denied flows pass as would-deny) or `enforce`.
fn enforcement(h: &HostView) -> &'static str {
    if h.learning {
        "learn"
    } else {
        "enforce"
    }
}

fn mode(h: &HostView) -> String {
    h.mode.map_or("-", HostMode::as_str).into()
}

/// `hosts show` (and the result of label, unlabel, rename, remove).
pub fn host_detail(h: &HostView, now: UnixTime) -> String {
    let mut t = Table::new(&["name:", &h.name]);
    let mut state = match (h.connected, h.acked_version) {
        (true, Some(v)) => format!("connected (map version {v} acked)"),
        (true, None) => "connected".into(),
        (false, _) => "offline".into(),
    };
    if h.quarantined {
        state.push_str(", quarantined");
    }
    for (k, v) in [
        ("id:", h.id.to_string()),
        ("public key:", h.public_key.to_string()),
        ("addresses:", list(&h.addresses)),
        ("state:", state),
        (
            "policy:",
            if h.learning {
                "learn (NOT ENFORCING: denied flows pass, recorded as would-deny)".into()
            } else {
                "enforce".into()
            },
        ),
        ("mode:", mode(h)),
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

/// `admin token list`: one row per admin token, by name (never the secret).
pub fn admin_tokens_table(tokens: &[AdminTokenView], now: UnixTime) -> String {
    let mut t = Table::new(&["NAME", "STATE", "CREATED", "EXPIRES", "REVOKED"]);
    for k in tokens {
        t.row(vec![
            k.name.clone(),
            k.state.clone(),
            ago(k.created_at, now),
            until(k.expires_at, now),
            k.revoked_at.map_or_else(|| "-".into(), |r| ago(r, now)),
        ]);
    }
    t.render()
}

/// One line about an admin token (stderr after `admin token create`, stdout after `revoke`).
pub fn admin_token_summary(k: &AdminTokenView, now: UnixTime) -> String {
    let expires = match k.expires_at {
        None => "never expires".to_string(),
        Some(_) => format!("expires {}", until(k.expires_at, now)),
    };
    format!("admin token {} ({}): {expires}", k.name, k.state)
}

/// What `status` knows about the policy.
#[derive(Debug, Clone)]
pub enum PolicyState {
    /// None applied yet: default deny.
    NoPolicy,
    /// This version is current.
    Current(PolicyRecord),
    /// `GET /v1/policy` failed.
    Unknown(String),
}

/// The `policy:` line of `status`.
pub fn policy_state(p: &PolicyState, now: UnixTime) -> String {
    match p {
        PolicyState::NoPolicy => "no policy: all traffic between hosts is denied \
             (apply one with `meshctl policy apply FILE`)"
            .into(),
        PolicyState::Current(r) => format!(
            "version {} (applied {}, {})",
            r.version,
            ago(r.applied_at, now),
            r.comment
        ),
        PolicyState::Unknown(e) => format!("unknown ({e})"),
    }
}

/// The `enforcement:` line of `status`: which hosts are not enforcing.
pub fn enforcement_state(s: &StatusView) -> String {
    const SHOWN: usize = 10;
    let n = s.learning.len();
    if n == 0 {
        return "all hosts enforce the policy".into();
    }
    let mut names = s
        .learning
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if n > SHOWN {
        names.push_str(&format!(", and {} more", n - SHOWN));
    }
    if s.learning_all {
        format!(
            "NOT ENFORCING: the whole mesh is in learning mode ({}: {names}); see `meshctl policy mode`",
            plural(n, "host")
        )
    } else {
        format!(
            "NOT ENFORCING: {} in learning mode ({names}); see `meshctl policy mode`",
            plural(n, "host")
        )
    }
}

/// `policy mode`: which hosts learn, and why (`changed`: the reply to a change).
pub fn policy_mode(v: &PolicyModeView, asked_change: bool, now: UnixTime) -> String {
    let mut out = String::new();
    if asked_change && !v.changed {
        out.push_str("unchanged: the runtime setting already was so\n");
    }
    let sources = |s: &[ModeSource]| {
        s.iter()
            .map(|s| match s {
                ModeSource::File => "the policy file",
                ModeSource::Runtime => "`meshctl policy mode learn`",
            })
            .collect::<Vec<_>>()
            .join(" and ")
    };
    let summary = if v.mesh_wide.is_empty() && v.learning.is_empty() {
        format!(
            "enforce: every host enforces the policy ({})",
            plural(v.hosts, "host")
        )
    } else if v.mesh_wide.is_empty() {
        format!(
            "enforce, except {} of {} in learning mode (NOT ENFORCING)",
            v.learning.len(),
            plural(v.hosts, "host")
        )
    } else {
        format!(
            "learn: the whole mesh is in learning mode, set by {} (NOT ENFORCING: {})",
            sources(&v.mesh_wide),
            plural(v.learning.len(), "host")
        )
    };
    let mut t = Table::new(&["mode:", &summary]);
    if v.changed_at > 0 {
        t.row(vec!["changed:".into(), ago(v.changed_at, now)]);
    }
    out.push_str(&t.render());
    if !v.groups.is_empty() {
        let mut g = Table::new(&["GROUP", "SOURCE", "HOSTS"]);
        for x in &v.groups {
            g.row(vec![
                x.group.clone(),
                x.source.as_str().into(),
                if x.hosts.is_empty() {
                    "-".into()
                } else {
                    x.hosts.join(", ")
                },
            ]);
        }
        out.push('\n');
        out.push_str(&g.render());
    }
    out.push('\n');
    if v.learning.is_empty() {
        out.push_str("learning hosts: none\n");
    } else {
        out.push_str(&format!("learning hosts: {}\n", v.learning.join(", ")));
    }
    if v.groups.iter().any(|g| g.source == ModeSource::File)
        || v.mesh_wide.contains(&ModeSource::File)
    {
        out.push_str(
            "(file: change the policy file's `mode:`/`learn:` and `meshctl policy apply` it)\n",
        );
    }
    out
}

/// The store line of `status`: `ok`, or the last failed commit while none has succeeded since.
fn store_health(f: Option<&StoreFailure>, now: UnixTime) -> String {
    match f {
        None => "ok".into(),
        Some(f) => format!(
            "LAST COMMIT FAILED {} ({}): {}; changes are refused until a commit succeeds",
            ago(f.at, now),
            f.what,
            f.error
        ),
    }
}

/// The listener limits' counters on one line.
fn guard_summary(g: &GuardStats) -> String {
    format!(
        "admin auth failures {} ({} refused backing off), admin handshakes refused {} \
         (timed out {}); bad join tokens {} ({} refused backing off); QUIC half-open {} \
         (peak {}, refused {}), retries {}",
        g.admin_auth_failures,
        g.admin_auth_backoff,
        g.admin_handshakes_refused,
        g.admin_handshakes_timed_out,
        g.join_token_failures,
        g.join_backoff_refused,
        g.quic_half_open,
        g.quic_half_open_peak,
        g.quic_refused_full,
        g.quic_retries,
    )
}

/// `status`.
pub fn status(s: &StatusView, policy: &PolicyState, server: &str, now: UnixTime) -> String {
    let mut t = Table::new(&["coordinator:", server]);
    for (k, v) in [
        ("version:", s.version.clone()),
        ("public key:", s.public_key.to_string()),
        ("advertise:", s.advertise.to_string()),
        ("policy:", policy_state(policy, now)),
        ("enforcement:", enforcement_state(s)),
        ("map version:", s.map_version.to_string()),
        ("hosts:", s.hosts.to_string()),
        ("connected:", s.connected.len().to_string()),
        ("store:", store_health(s.store_failure.as_ref(), now)),
    ] {
        t.row(vec![k.into(), v]);
    }
    if s.guard != GuardStats::default() {
        t.row(vec!["limits:".into(), guard_summary(&s.guard)]);
    }
    let mut out = t.render();
    if !s.connected.is_empty() {
        let mut a = Table::new(&[
            "NAME",
            "ID",
            "CONNECTED",
            "SENT",
            "ACKED",
            "MODE",
            "PROTECTED",
        ]);
        for c in &s.connected {
            a.row(vec![
                c.name.clone(),
                c.id.to_string(),
                ago(c.connected_at, now),
                c.sent_version.to_string(),
                c.acked_version.to_string(),
                c.mode.map_or("-", HostMode::as_str).into(),
                if c.protected.is_empty() {
                    "-".into()
                } else {
                    list(&c.protected)
                },
            ]);
        }
        out.push('\n');
        out.push_str(&a.render());
    }
    out
}

/// Seconds since the epoch as RFC 3339 UTC, e.g. `2026-12-31T18:00:00Z`.
pub fn rfc3339(t: UnixTime) -> String {
    meshd_control::topology::rfc3339(t)
}

/// An IP protocol number as a name (`tcp`, `udp`, `icmp`, `icmpv6`, or the number).
pub fn proto_name(p: u8) -> String {
    match p {
        ip_proto::TCP => "tcp".into(),
        ip_proto::UDP => "udp".into(),
        ip_proto::ICMP => "icmp".into(),
        ip_proto::ICMPV6 => "icmpv6".into(),
        n => n.to_string(),
    }
}

/// `blocks`.
pub fn blocks_table(events: &[BlockEvent]) -> String {
    let mut t = Table::new(&[
        "TIME",
        "HOST",
        "PEER",
        "DIRECTION",
        "PROTO",
        "SRC",
        "DST",
        "REASON",
        "COUNT",
    ]);
    for e in events {
        t.row(vec![
            rfc3339(e.at),
            e.host.clone(),
            e.peer.clone(),
            match e.direction {
                Direction::Outbound => "outbound",
                Direction::Inbound => "inbound",
            }
            .into(),
            proto_name(e.proto),
            e.src.to_string(),
            e.dst.to_string(),
            e.reason.to_string(),
            e.count.to_string(),
        ]);
    }
    t.render()
}

/// `events`, oldest first.
pub fn events_table(events: &[EventView]) -> String {
    let mut t = Table::new(&["TIME", "KIND", "DETAIL"]);
    for e in events {
        t.row(vec![rfc3339(e.at), e.kind.clone(), e.detail.clone()]);
    }
    t.render()
}

/// `policy show`: the file as applied, after a comment with its version (still valid YAML, so
/// `meshctl policy show > policy.yaml` round-trips).
pub fn policy_show(p: Option<&PolicyRecord>) -> String {
    let Some(r) = p else {
        return "no policy: everything is denied (default deny)\n".into();
    };
    let mut out = format!(
        "# policy version {}, applied {} ({})\n",
        r.version,
        rfc3339(r.applied_at),
        r.comment
    );
    out.push_str(&r.yaml);
    if !r.yaml.is_empty() && !r.yaml.ends_with('\n') {
        out.push('\n');
    }
    out
}

/// `policy history`, oldest first; the last version is the current one.
pub fn policy_history(records: &[PolicyRecord], now: UnixTime) -> String {
    let mut t = Table::new(&["VERSION", "APPLIED", "RULES", "TESTS", "COMMENT"]);
    let last = records.iter().map(|r| r.version).max();
    for r in records {
        let (rules, tests) = match Policy::parse(&r.yaml) {
            Ok(p) => (p.rules.len().to_string(), p.tests.len().to_string()),
            Err(_) => ("?".into(), "?".into()),
        };
        let mut comment = r.comment.clone();
        if Some(r.version) == last {
            comment.push_str(" (current)");
        }
        t.row(vec![
            r.version.to_string(),
            ago(r.applied_at, now),
            rules,
            tests,
            comment,
        ]);
    }
    t.render()
}

/// `policy diff`: one `+`/`-` line per host pair and port spec, then a summary.
pub fn changes(c: &[Change]) -> String {
    if c.is_empty() {
        return "no change: no host pair gains or loses access\n".into();
    }
    let mut out = String::new();
    for x in c {
        out.push_str(&format!("{x}\n"));
    }
    let gained = c.iter().filter(|x| x.kind == ChangeKind::Gained).count();
    out.push_str(&format!("{gained} gained, {} lost\n", c.len() - gained));
    out
}

/// `policy explain`.
pub fn explanation(from: &str, to: &str, port: &str, e: &Explanation) -> String {
    if let Some(d) = &e.deny {
        let over = match &e.overrides {
            Some(r) => format!(", overriding allow rule {r}"),
            None => String::new(),
        };
        return format!(
            "denied: {from} -> {to} {port} by deny rule {d}{over} (deny rules win, in learning \
             mode too)\n"
        );
    }
    format!(
        "{}: {from} -> {to} {port} {}{}\n",
        if e.allowed { "allowed" } else { "denied" },
        verdict(e.allowed, e.rule.as_deref())
            .trim_start_matches("allowed ")
            .trim_start_matches("denied "),
        if e.learning {
            "; passes anyway as would-deny: learning mode (`meshctl policy mode`)"
        } else {
            ""
        }
    )
}

/// One line after `policy apply` / `policy rollback`.
pub fn applied(what: &str, version: u64, tests: usize) -> String {
    if tests == 0 {
        format!("{what}: policy version {version} is now current\n")
    } else {
        format!(
            "{what}: policy version {version} is now current ({} passed)\n",
            plural(tests, "test")
        )
    }
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
            mode: Some(HostMode::of(id == 1)),
            quarantined: id == 12,
            learning: id == 1,
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
            "NAME          ID  ADDRESS     STATE        POLICY   MODE         LAST SEEN  ENDPOINT         LABELS\n\
             db1           1   100.64.0.2  connected    learn    transparent  now        192.0.2.1:51820  env=prod\n\
             web-frontend  12  100.64.0.2  quarantined  enforce  overlay      1m ago     192.0.2.1:51820  env=prod\n"
        );
        assert!(
            host_detail(&host("db1", 1, true), 1060).contains("policy:       learn (NOT ENFORCING"),
        );
        assert!(host_detail(&host("w", 2, true), 1060).contains("policy:       enforce\n"));
        let d = host_detail(&host("db1", 1, true), 1060);
        assert!(d.starts_with("name:         db1\n"), "{d}");
        assert!(
            d.contains("state:        connected (map version 7 acked)\n"),
            "{d}"
        );
        assert!(d.contains("observed ip:  -\n"), "{d}");
        assert!(d.contains("mode:         transparent\n"), "{d}");
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
                mode: Some(HostMode::Transparent),
                protected: vec!["198.18.0.2".parse().unwrap()],
            }],
            advertise: "192.0.2.10:7443".parse().unwrap(),
            public_key: PublicKey([1; 32]),
            guard: GuardStats::default(),
            store_failure: None,
            learning: vec![],
            learning_all: false,
        };
        let out = status(&s, &PolicyState::NoPolicy, "http://127.0.0.1:7444", 100);
        assert!(
            out.contains("enforcement:  all hosts enforce the policy\n"),
            "{out}"
        );
        let learning = StatusView {
            learning: vec!["legacy-1".into(), "legacy-2".into()],
            ..s.clone()
        };
        let l = status(&learning, &PolicyState::NoPolicy, "u", 100);
        assert!(
            l.contains(
                "enforcement:  NOT ENFORCING: 2 hosts in learning mode (legacy-1, legacy-2); \
                 see `meshctl policy mode`\n"
            ),
            "{l}"
        );
        let all = StatusView {
            learning: (0..12).map(|i| format!("h{i:02}")).collect(),
            learning_all: true,
            ..s.clone()
        };
        let a = status(&all, &PolicyState::NoPolicy, "u", 100);
        assert!(
            a.contains("NOT ENFORCING: the whole mesh is in learning mode (12 hosts: h00, "),
            "{a}"
        );
        assert!(a.contains("h09, and 2 more)"), "{a}");
        assert!(!out.contains("limits:"), "all zero: no line\n{out}");
        let busy = StatusView {
            guard: GuardStats {
                join_token_failures: 7,
                quic_retries: 3,
                ..GuardStats::default()
            },
            ..s.clone()
        };
        let b = status(&busy, &PolicyState::NoPolicy, "u", 100);
        assert!(
            b.contains("bad join tokens 7 (0 refused backing off)"),
            "{b}"
        );
        assert!(b.contains("retries 3\n"), "{b}");
        assert!(out.contains("store:        ok\n"), "{out}");
        let failed = StatusView {
            store_failure: Some(StoreFailure {
                at: 70,
                error: "disk full: the database cannot grow".into(),
                what: "1 token".into(),
            }),
            ..s.clone()
        };
        let f = status(&failed, &PolicyState::NoPolicy, "u", 100);
        assert!(
            f.contains(
                "store:        LAST COMMIT FAILED 30s ago (1 token): disk full: the database cannot grow;"
            ),
            "{f}"
        );
        assert!(
            out.starts_with("coordinator:  http://127.0.0.1:7444\nversion:      0.1.0\n"),
            "{out}"
        );
        assert!(out.contains("connected:    1\n"), "{out}");
        assert!(
            out.contains("policy:       no policy: all traffic between hosts is denied"),
            "{out}"
        );
        assert!(
            out.ends_with(
                "NAME  ID  CONNECTED  SENT  ACKED  MODE         PROTECTED\n\
                 db1   1   1m ago     4     3      transparent  198.18.0.2\n"
            ),
            "{out}"
        );
        let out = status(&s, &PolicyState::Current(record(3, "apply")), "u", 100);
        assert!(
            out.contains("policy:       version 3 (applied 1m ago, apply)\n"),
            "{out}"
        );
        let out = status(&s, &PolicyState::Unknown("boom".into()), "u", 100);
        assert!(out.contains("policy:       unknown (boom)\n"), "{out}");
    }

    fn record(version: u64, comment: &str) -> PolicyRecord {
        PolicyRecord {
            version,
            yaml: "rules:\n  - { name: r, from: {}, to: {}, ports: [any] }\n".into(),
            applied_at: 40,
            comment: comment.into(),
        }
    }

    #[test]
    fn times_as_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_868_800), "2000-03-01T00:00:00Z");
        assert_eq!(rfc3339(1_798_740_000), "2026-12-31T18:00:00Z");
        assert_eq!(rfc3339(1_709_164_799), "2024-02-28T23:59:59Z");
        for t in [0, 59, 86_399, 951_782_400, 1_798_740_000, 4_102_444_800] {
            assert_eq!(meshd_policy::parse_rfc3339(&rfc3339(t)), Ok(t));
        }
    }

    #[test]
    fn blocks_rows() {
        assert_eq!(
            blocks_table(&[]),
            "TIME  HOST  PEER  DIRECTION  PROTO  SRC  DST  REASON  COUNT\n"
        );
        let e = BlockEvent {
            at: 1_798_740_000,
            host: "db1".into(),
            host_labels: Default::default(),
            peer: "web1".into(),
            peer_labels: Default::default(),
            direction: Direction::Inbound,
            proto: 6,
            src: "100.64.0.3:40000".parse().unwrap(),
            dst: "100.64.0.2:1521".parse().unwrap(),
            reason: meshd_policy::DenyReason::DefaultDeny,
            count: 3,
        };
        let out = blocks_table(&[e]);
        let row = out.lines().nth(1).unwrap();
        assert_eq!(
            row.split("  ")
                .filter(|c| !c.is_empty())
                .map(str::trim)
                .collect::<Vec<_>>(),
            [
                "2026-12-31T18:00:00Z",
                "db1",
                "web1",
                "inbound",
                "tcp",
                "100.64.0.3:40000",
                "100.64.0.2:1521",
                "default deny",
                "3"
            ],
            "{out}"
        );
        assert_eq!(proto_name(17), "udp");
        assert_eq!(proto_name(47), "47");
    }

    #[test]
    fn events_rows() {
        assert_eq!(events_table(&[]), "TIME  KIND  DETAIL\n");
        let e = |at, kind: &str, detail: &str| EventView {
            at,
            kind: kind.into(),
            detail: detail.into(),
        };
        let out = events_table(&[
            e(1_798_740_000, "host_quarantined", "db1 (2)"),
            e(
                1_798_740_001,
                "duplicate_connection",
                "key abc= from 192.0.2.1",
            ),
        ]);
        assert_eq!(
            out,
            "TIME                  KIND                  DETAIL\n\
             2026-12-31T18:00:00Z  host_quarantined      db1 (2)\n\
             2026-12-31T18:00:01Z  duplicate_connection  key abc= from 192.0.2.1\n"
        );
    }

    #[test]
    fn policy_views() {
        assert_eq!(
            policy_show(None),
            "no policy: everything is denied (default deny)\n"
        );
        let r = record(2, "rollback to 1");
        let out = policy_show(Some(&r));
        assert!(
            out.starts_with(
                "# policy version 2, applied 1970-01-01T00:00:40Z (rollback to 1)\nrules:\n"
            ),
            "{out}"
        );
        assert!(Policy::parse(&out).is_ok());

        let mut bad = record(3, "apply");
        bad.yaml = "rules: [".into();
        let out = policy_history(&[record(1, "apply"), r, bad], 100);
        assert_eq!(
            out,
            "VERSION  APPLIED  RULES  TESTS  COMMENT\n\
             1        1m ago   1      0      apply\n\
             2        1m ago   1      0      rollback to 1\n\
             3        1m ago   ?      ?      apply (current)\n"
        );
        assert_eq!(
            policy_history(&[], 0),
            "VERSION  APPLIED  RULES  TESTS  COMMENT\n"
        );
        assert_eq!(
            applied("applied p.yaml", 4, 2),
            "applied p.yaml: policy version 4 is now current (2 tests passed)\n"
        );
        assert_eq!(
            applied("rolled back to version 1", 5, 0),
            "rolled back to version 1: policy version 5 is now current\n"
        );
    }

    #[test]
    fn diffs_and_explanations() {
        assert_eq!(
            changes(&[]),
            "no change: no host pair gains or loses access\n"
        );
        let c = |from: &str, kind| Change {
            from: from.into(),
            to: "db1".into(),
            ports: "tcp/1521".parse().unwrap(),
            kind,
            rule: Some("r".into()),
            deny: None,
        };
        assert_eq!(
            changes(&[c("app1", ChangeKind::Gained), c("web1", ChangeKind::Lost)]),
            "+ app1 -> db1 tcp/1521\n- web1 -> db1 tcp/1521\n1 gained, 1 lost\n"
        );
        let yes = Explanation {
            allowed: true,
            rule: Some("app1-to-db1".into()),
            ..Explanation::DENY
        };
        let denied = Explanation {
            deny: Some("dev-never-prod".into()),
            overrides: Some("app1-to-db1".into()),
            ..Explanation::DENY
        };
        assert_eq!(
            explanation("app1", "db1", "tcp/1521", &denied),
            "denied: app1 -> db1 tcp/1521 by deny rule dev-never-prod, overriding allow rule \
             app1-to-db1 (deny rules win, in learning mode too)\n"
        );
        let mut lost = c("web1", ChangeKind::Lost);
        lost.deny = Some("dev-never-prod".into());
        assert_eq!(
            changes(&[lost]),
            "- web1 -> db1 tcp/1521 (deny dev-never-prod overrides allow r)\n0 gained, 1 lost\n"
        );
        let learning = Explanation {
            learning: true,
            ..Explanation::DENY
        };
        assert_eq!(
            explanation("web1", "db1", "tcp/22", &learning),
            "denied: web1 -> db1 tcp/22 (no rule allows it: default deny); passes anyway as \
             would-deny: learning mode (`meshctl policy mode`)\n"
        );
        assert_eq!(
            explanation("app1", "db1", "tcp/1521", &yes),
            "allowed: app1 -> db1 tcp/1521 by rule app1-to-db1\n"
        );
        assert_eq!(
            explanation("web1", "db1", "tcp/1521", &Explanation::DENY),
            "denied: web1 -> db1 tcp/1521 (no rule allows it: default deny)\n"
        );
    }
}

#[cfg(test)]
mod mode_tests {
    use super::*;
    use meshd_control::api::LearnGroupView;
    use meshd_policy::PolicyMode;

    #[test]
    fn policy_mode_lists_groups_sources_and_hosts() {
        let v = PolicyModeView {
            mode: PolicyMode::Enforce,
            mesh_wide: vec![],
            groups: vec![
                LearnGroupView {
                    group: "{app: legacy}".into(),
                    source: ModeSource::File,
                    hosts: vec!["legacy-1".into(), "legacy-2".into()],
                },
                LearnGroupView {
                    group: "{app: web}".into(),
                    source: ModeSource::Runtime,
                    hosts: vec![],
                },
            ],
            learning: vec!["legacy-1".into(), "legacy-2".into()],
            hosts: 5,
            changed_at: 40,
            changed: true,
        };
        let out = policy_mode(&v, true, 100);
        assert_eq!(
            out,
            "mode:     enforce, except 2 of 5 hosts in learning mode (NOT ENFORCING)\n\
             changed:  1m ago\n\
             \n\
             GROUP          SOURCE   HOSTS\n\
             {app: legacy}  file     legacy-1, legacy-2\n\
             {app: web}     runtime  -\n\
             \n\
             learning hosts: legacy-1, legacy-2\n\
             (file: change the policy file's `mode:`/`learn:` and `meshctl policy apply` it)\n"
        );
        let none = PolicyModeView {
            groups: vec![],
            learning: vec![],
            changed_at: 0,
            changed: false,
            ..v.clone()
        };
        let out = policy_mode(&none, true, 100);
        assert!(
            out.starts_with("unchanged: the runtime setting already was so\n"),
            "{out}"
        );
        assert!(
            out.contains("mode:  enforce: every host enforces the policy (5 hosts)\n"),
            "{out}"
        );
        assert!(out.ends_with("learning hosts: none\n"), "{out}");
        let all = PolicyModeView {
            mode: PolicyMode::Learn,
            mesh_wide: vec![ModeSource::File, ModeSource::Runtime],
            groups: vec![],
            ..v
        };
        let out = policy_mode(&all, false, 100);
        assert!(
            out.contains(
                "learn: the whole mesh is in learning mode, set by the policy file and \
                 `meshctl policy mode learn` (NOT ENFORCING: 2 hosts)"
            ),
            "{out}"
        );
    }
}
