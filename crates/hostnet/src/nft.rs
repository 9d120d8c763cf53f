//! The nftables side: JSON documents for `nft -j -f -` (built by pure functions) and the
//! parser for the blocked-traffic sets, plus the one function that runs `nft` (a child
//! process awaited on the tokio runtime).

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::process::Stdio;

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt as _;
use tokio::process::Command;

use crate::error::{NftError, NftOp};

use crate::plan::BlockedKey;
use crate::{Config, Covered, Proto};

/// nftables address family of the table (one table for IPv4 and IPv6).
const FAMILY: &str = "inet";
/// Family of the small companion table that marks incoming ARP (same name).
const ARP: &str = "arp";
/// Named interval set of covered TCP ports.
pub const SET_COVERED_TCP: &str = "covered_tcp";
/// Named interval set of covered UDP ports.
pub const SET_COVERED_UDP: &str = "covered_udp";
/// Set of protected peer IPv4 addresses: unmarked TCP/UDP to them that would leave by another
/// interface than the TUN is dropped (the output guard).
pub const SET_PROTECTED4: &str = "protected4";
/// The IPv6 twin of [`SET_PROTECTED4`].
pub const SET_PROTECTED6: &str = "protected6";
/// Dynamic set `ipv4_addr . inet_proto . inet_service` of dropped plaintext, with counters.
pub const SET_BLOCKED4: &str = "blocked4";
/// The IPv6 twin of [`SET_BLOCKED4`].
pub const SET_BLOCKED6: &str = "blocked6";
/// Seconds a blocked-traffic record lives without new hits.
pub const BLOCKED_TIMEOUT_S: u32 = 600;
/// Most records per blocked set; when full, packets are still dropped but not recorded
/// (the drop rules have their own counters).
pub const BLOCKED_SET_SIZE: u32 = 65536;
/// Priority of the input chain (`filter`).
const PRIO_FILTER: i32 = 0;
/// Priority of the mark save/restore chains (`mangle`).
const PRIO_MANGLE: i32 = -150;

/// What a new table starts with: the set contents of the table it replaces, so that a
/// restart never opens a window in which covered ports or protected addresses are unguarded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Kept {
    /// Covered port ranges (normalised).
    pub covered: Covered,
    /// Protected peer addresses (the output guard).
    pub protected: Vec<IpAddr>,
}

/// Commands that (re)create the table for `cfg` in one transaction: any old table of that
/// name is deleted first, so applying this twice leaves exactly one table. The sets start
/// with `kept` (what the old table held), in the same transaction.
pub fn create_table(table: &str, cfg: &Config, kept: &Kept) -> Value {
    let t = |name: &str| json!({ "family": FAMILY, "table": table, "name": name });
    let mut cmds = vec![];
    for family in [FAMILY, ARP] {
        cmds.push(json!({ "add": { "table": { "family": family, "name": table } } }));
        cmds.push(json!({ "delete": { "table": { "family": family, "name": table } } }));
        cmds.push(json!({ "add": { "table": { "family": family, "name": table } } }));
    }
    for name in [SET_COVERED_TCP, SET_COVERED_UDP] {
        let mut s = t(name);
        s["type"] = json!("inet_service");
        s["flags"] = json!(["interval"]);
        cmds.push(json!({ "add": { "set": s } }));
    }
    for (name, addr) in [(SET_PROTECTED4, "ipv4_addr"), (SET_PROTECTED6, "ipv6_addr")] {
        let mut s = t(name);
        s["type"] = json!(addr);
        cmds.push(json!({ "add": { "set": s } }));
    }
    for (name, addr) in [(SET_BLOCKED4, "ipv4_addr"), (SET_BLOCKED6, "ipv6_addr")] {
        let mut s = t(name);
        s["type"] = json!([addr, "inet_proto", "inet_service"]);
        // nft marks the set dynamic itself because a rule updates it (and nft 1.0.6's
        // JSON parser rejects the "dynamic" flag).
        s["flags"] = json!(["timeout"]);
        s["timeout"] = json!(BLOCKED_TIMEOUT_S);
        s["size"] = json!(BLOCKED_SET_SIZE);
        cmds.push(json!({ "add": { "set": s } }));
    }
    for (name, hook, prio) in [
        ("input", "input", PRIO_FILTER),
        ("output", "output", PRIO_FILTER),
        ("premangle", "prerouting", PRIO_MANGLE),
        ("postmangle", "postrouting", PRIO_MANGLE),
    ] {
        let mut c = t(name);
        c["type"] = json!("filter");
        c["hook"] = json!(hook);
        c["prio"] = json!(prio);
        c["policy"] = json!("accept");
        cmds.push(json!({ "add": { "chain": c } }));
    }
    let rule = |chain: &str, expr: Vec<Value>| json!({ "add": { "rule": { "family": FAMILY, "table": table, "chain": chain, "expr": expr } } });
    let accept = json!({ "accept": null });
    let mark = cfg.fwmark;

    // Input: what may reach covered ports, then record + drop the rest.
    cmds.push(rule(
        "input",
        vec![
            eq(json!({ "meta": { "key": "iif" } }), json!("lo")),
            accept.clone(),
        ],
    ));
    cmds.push(rule(
        "input",
        vec![
            eq(json!({ "meta": { "key": "iifname" } }), json!(cfg.if_name)),
            accept.clone(),
        ],
    ));
    cmds.push(rule(
        "input",
        vec![eq(port_of("udp"), json!(cfg.listen_port)), accept.clone()],
    ));
    cmds.push(rule(
        "input",
        vec![
            eq(json!({ "ct": { "key": "direction" } }), json!("reply")),
            accept,
        ],
    ));
    for (proto, covered) in [("tcp", SET_COVERED_TCP), ("udp", SET_COVERED_UDP)] {
        let in_set = eq(port_of(proto), json!(format!("@{covered}")));
        // Recording is its own rule: if the dynamic set is full the update fails and ends
        // the rule, and the drop below must still happen.
        for (nfproto, l3, blocked) in [("ipv4", "ip", SET_BLOCKED4), ("ipv6", "ip6", SET_BLOCKED6)]
        {
            cmds.push(rule(
                "input",
                vec![
                    eq(json!({ "meta": { "key": "nfproto" } }), json!(nfproto)),
                    in_set.clone(),
                    json!({ "set": {
                        "op": "update",
                        "elem": { "concat": [
                            { "payload": { "protocol": l3, "field": "saddr" } },
                            { "meta": { "key": "l4proto" } },
                            port_of(proto),
                        ] },
                        "set": format!("@{blocked}"),
                        "stmt": [ { "counter": null } ],
                    } }),
                ],
            ));
        }
        cmds.push(rule(
            "input",
            vec![in_set, json!({ "counter": null }), json!({ "drop": null })],
        ));
    }

    // Output guard: TCP and UDP to a protected peer address leave only through the TUN, or
    // carry meshd's mark (its own tunnel and control sockets). The routes already send such
    // traffic into the TUN; this holds when they do not (the TUN is gone because meshd
    // crashed, or someone flushed the table), and it outlives the process.
    cmds.push(rule(
        "output",
        vec![
            eq(json!({ "meta": { "key": "mark" } }), json!(mark)),
            json!({ "accept": null }),
        ],
    ));
    cmds.push(rule(
        "output",
        vec![
            eq(json!({ "meta": { "key": "oifname" } }), json!(cfg.if_name)),
            json!({ "accept": null }),
        ],
    ));
    for (l3, set) in [("ip", SET_PROTECTED4), ("ip6", SET_PROTECTED6)] {
        cmds.push(rule(
            "output",
            vec![
                eq(
                    json!({ "meta": { "key": "l4proto" } }),
                    json!({ "set": ["tcp", "udp"] }),
                ),
                eq(
                    json!({ "payload": { "protocol": l3, "field": "daddr" } }),
                    json!(format!("@{set}")),
                ),
                json!({ "counter": null }),
                json!({ "drop": null }),
            ],
        ));
    }

    // Marks for strict reverse-path filtering (with src_valid_mark): packets to the tunnel
    // port and replies on connections meshd opened with its mark carry the mark, so their
    // reverse lookup skips the TUN routes, like wg-quick's premangle/postmangle.
    let set_meta_mark = |value: Value| json!({ "mangle": { "key": { "meta": { "key": "mark" } }, "value": value } });
    cmds.push(rule(
        "premangle",
        vec![
            eq(port_of("udp"), json!(cfg.listen_port)),
            set_meta_mark(json!(mark)),
        ],
    ));
    cmds.push(rule(
        "premangle",
        vec![
            eq(json!({ "ct": { "key": "mark" } }), json!(mark)),
            set_meta_mark(json!({ "ct": { "key": "mark" } })),
        ],
    ));
    cmds.push(rule(
        "postmangle",
        vec![
            eq(json!({ "meta": { "key": "mark" } }), json!(mark)),
            json!({ "mangle": { "key": { "ct": { "key": "mark" } }, "value": { "meta": { "key": "mark" } } } }),
        ],
    ));
    // ARP requests from on-link peers are reverse-path checked like IP packets, and their
    // source routes into the TUN: mark them too, so strict rp_filter still answers them.
    cmds.push(json!({ "add": { "chain": {
        "family": ARP, "table": table, "name": "input",
        "type": "filter", "hook": "input", "prio": PRIO_FILTER, "policy": "accept",
    } } }));
    cmds.push(json!({ "add": { "rule": {
        "family": ARP, "table": table, "chain": "input", "expr": [set_meta_mark(json!(mark))],
    } } }));
    cmds.extend(covered_elements(table, &kept.covered));
    cmds.extend(protected_elements(table, &kept.protected));
    json!({ "nftables": cmds })
}

/// Commands that delete the tables if they exist (no error if they do not).
pub fn delete_table(table: &str) -> Value {
    json!({ "nftables": [
        { "add": { "table": { "family": FAMILY, "name": table } } },
        { "delete": { "table": { "family": FAMILY, "name": table } } },
        { "add": { "table": { "family": ARP, "name": table } } },
        { "delete": { "table": { "family": ARP, "name": table } } },
    ] })
}

/// Commands that replace the covered port sets in one transaction (flush and refill).
/// `covered` must be normalised (see [`crate::plan::normalize_ranges`]).
pub fn set_covered(table: &str, covered: &Covered) -> Value {
    let mut cmds = Vec::new();
    for name in [SET_COVERED_TCP, SET_COVERED_UDP] {
        cmds.push(flush_set(table, name));
    }
    cmds.extend(covered_elements(table, covered));
    json!({ "nftables": cmds })
}

/// Commands that replace the protected address sets in one transaction (flush and refill).
pub fn set_protected(table: &str, protected: &[IpAddr]) -> Value {
    let mut cmds = Vec::new();
    for name in [SET_PROTECTED4, SET_PROTECTED6] {
        cmds.push(flush_set(table, name));
    }
    cmds.extend(protected_elements(table, protected));
    json!({ "nftables": cmds })
}

fn flush_set(table: &str, name: &str) -> Value {
    json!({ "flush": { "set": { "family": FAMILY, "table": table, "name": name } } })
}

fn add_elements(table: &str, set: &str, elem: Vec<Value>) -> Option<Value> {
    (!elem.is_empty()).then(|| {
        json!({ "add": { "element": {
            "family": FAMILY, "table": table, "name": set, "elem": elem,
        } } })
    })
}

/// `add element` commands for the covered port sets (none for an empty set).
fn covered_elements(table: &str, covered: &Covered) -> Vec<Value> {
    let ranges = |r: &[(u16, u16)]| -> Vec<Value> {
        r.iter()
            .map(|&(lo, hi)| {
                if lo == hi {
                    json!(lo)
                } else {
                    json!({ "range": [lo, hi] })
                }
            })
            .collect()
    };
    [
        add_elements(table, SET_COVERED_TCP, ranges(&covered.tcp)),
        add_elements(table, SET_COVERED_UDP, ranges(&covered.udp)),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// `add element` commands for the protected address sets (none for an empty set).
fn protected_elements(table: &str, protected: &[IpAddr]) -> Vec<Value> {
    let of = |v6: bool| -> Vec<Value> {
        let mut a: Vec<IpAddr> = protected
            .iter()
            .filter(|a| a.is_ipv6() == v6)
            .copied()
            .collect();
        a.sort_unstable();
        a.dedup();
        a.into_iter().map(|a| json!(a.to_string())).collect()
    };
    [
        add_elements(table, SET_PROTECTED4, of(false)),
        add_elements(table, SET_PROTECTED6, of(true)),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// What the sets of an existing table hold (`nft -j list table` output), to carry over into
/// its replacement. Unknown element shapes are skipped with a warning.
pub fn parse_kept(listing: &Value) -> Kept {
    let mut kept = Kept::default();
    let Some(objects) = listing.get("nftables").and_then(Value::as_array) else {
        return kept;
    };
    for set in objects.iter().filter_map(|o| o.get("set")) {
        let name = set.get("name").and_then(Value::as_str).unwrap_or("");
        let elems = set
            .get("elem")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        for e in elems {
            let ok = match name {
                SET_COVERED_TCP | SET_COVERED_UDP => port_range(e).map(|r| {
                    if name == SET_COVERED_TCP {
                        kept.covered.tcp.push(r)
                    } else {
                        kept.covered.udp.push(r)
                    }
                }),
                SET_PROTECTED4 | SET_PROTECTED6 => e
                    .as_str()
                    .and_then(|a| a.parse::<IpAddr>().ok())
                    .map(|a| kept.protected.push(a)),
                _ => Some(()),
            };
            if ok.is_none() {
                tracing::warn!(set = name, element = %e, "unexpected set element");
            }
        }
    }
    kept
}

/// A covered-set element: a port or `{"range": [lo, hi]}`.
fn port_range(e: &Value) -> Option<(u16, u16)> {
    let port = |v: &Value| v.as_u64().and_then(|p| u16::try_from(p).ok());
    match e.get("range").and_then(Value::as_array).map(Vec::as_slice) {
        Some([lo, hi]) => Some((port(lo)?, port(hi)?)),
        Some(_) => None,
        None => port(e).map(|p| (p, p)),
    }
}

/// `left == right` as an nft JSON match.
fn eq(left: Value, right: Value) -> Value {
    json!({ "match": { "op": "==", "left": left, "right": right } })
}

/// The destination-port payload expression of `proto`.
fn port_of(proto: &str) -> Value {
    json!({ "payload": { "protocol": proto, "field": "dport" } })
}

/// Reads the packet counters of the blocked sets from `nft -j list table` output.
/// Elements that do not parse (unexpected shapes) are skipped with a warning.
pub fn parse_blocked(listing: &Value) -> Result<HashMap<BlockedKey, u64>, NftError> {
    let objects = listing
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or(NftError::Listing)?;
    let mut out = HashMap::new();
    for obj in objects {
        let Some(set) = obj.get("set") else { continue };
        let name = set.get("name").and_then(Value::as_str);
        if !matches!(name, Some(SET_BLOCKED4) | Some(SET_BLOCKED6)) {
            continue;
        }
        let Some(elems) = set.get("elem").and_then(Value::as_array) else {
            continue;
        };
        for e in elems {
            match parse_blocked_elem(e) {
                Some((key, packets)) => *out.entry(key).or_insert(0) += packets,
                None => tracing::warn!(element = %e, "unexpected blocked-set element"),
            }
        }
    }
    Ok(out)
}

/// One element `{"elem": {"val": {"concat": [addr, proto, port]}, "counter": {...}}}`.
fn parse_blocked_elem(e: &Value) -> Option<(BlockedKey, u64)> {
    let (val, packets) = match e.get("elem") {
        Some(inner) => (
            inner.get("val")?,
            inner
                .get("counter")
                .and_then(|c| c.get("packets"))
                .and_then(Value::as_u64)
                .unwrap_or(0),
        ),
        None => (e, 0),
    };
    let parts = val.get("concat")?.as_array()?;
    let [addr, proto, port] = parts.as_slice() else {
        return None;
    };
    let addr: IpAddr = addr.as_str()?.parse().ok()?;
    let proto = match proto {
        Value::String(s) if s == "tcp" => Proto::Tcp,
        Value::String(s) if s == "udp" => Proto::Udp,
        Value::Number(n) if n.as_u64() == Some(6) => Proto::Tcp,
        Value::Number(n) if n.as_u64() == Some(17) => Proto::Udp,
        _ => return None,
    };
    let port: u16 = match port {
        Value::Number(n) => u16::try_from(n.as_u64()?).ok()?,
        Value::String(s) => s.parse().ok()?,
        _ => return None,
    };
    Some(((addr, proto, port), packets))
}

/// Runs `nft -j -f -` with `doc` on stdin: one atomic transaction.
pub async fn apply(doc: &Value, op: NftOp) -> Result<(), NftError> {
    run(&["-j", "-f", "-"], Some(doc.to_string()), op)
        .await
        .map(drop)
}

/// Runs `nft -j list table inet TABLE` and parses the JSON; `None` if there is no such table.
///
/// Whether a failed listing means "no such table" is not read from nft's message (its wording
/// differs between versions and locales): the tables are listed ([`list_tables`]) and looked
/// at. If that fails too, or shows the table, the listing's own error is returned.
pub async fn list_table(table: &str) -> Result<Option<Value>, NftError> {
    let err = match run(
        &["-j", "list", "table", FAMILY, table],
        None,
        NftOp::ListTable,
    )
    .await
    {
        Ok(out) => return parse_json(&out, NftOp::ListTable).map(Some),
        Err(e) => e,
    };
    if !matches!(err, NftError::Failed { .. }) {
        return Err(err);
    }
    match list_tables().await {
        Ok(tables) if !has_table(&tables, FAMILY, table) => Ok(None),
        _ => Err(err),
    }
}

/// Runs `nft -j list tables` (every family) and parses the JSON.
pub async fn list_tables() -> Result<Value, NftError> {
    let out = run(&["-j", "list", "tables"], None, NftOp::ListTables).await?;
    parse_json(&out, NftOp::ListTables)
}

/// True if `nft -j list tables` output `listing` names table `name` of `family`.
pub fn has_table(listing: &Value, family: &str, name: &str) -> bool {
    listing
        .get("nftables")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|o| o.get("table"))
        .any(|t| {
            t.get("family").and_then(Value::as_str) == Some(family)
                && t.get("name").and_then(Value::as_str) == Some(name)
        })
}

fn parse_json(out: &[u8], op: NftOp) -> Result<Value, NftError> {
    serde_json::from_slice(out).map_err(|source| NftError::Json { op, source })
}

/// Runs `nft ARGS` (feeding `stdin` if given) and returns stdout; errors carry stderr.
///
/// A child process awaited on the tokio runtime, never blocking it. It is started from the
/// calling thread (so it runs in that thread's network namespace, which the namespace tests
/// rely on) and its stdin is written while its output is read, so neither side can stall on
/// a full pipe.
async fn run(args: &[&str], stdin: Option<String>, op: NftOp) -> Result<Vec<u8>, NftError> {
    run_program("nft", args, stdin, op).await
}

/// [`run`] with another program (tests).
async fn run_program(
    program: &str,
    args: &[&str],
    stdin: Option<String>,
    op: NftOp,
) -> Result<Vec<u8>, NftError> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|source| NftError::Spawn { op, source })?;
    let pipe = child.stdin.take();
    let feed = async move {
        match (pipe, stdin) {
            (Some(mut pipe), Some(input)) => {
                pipe.write_all(input.as_bytes()).await
                // `pipe` is dropped here, closing it: nft sees the end of its input.
            }
            (None, Some(_)) => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "nft: stdin pipe missing after spawn",
            )),
            _ => Ok(()),
        }
    };
    let (fed, out) = tokio::join!(feed, child.wait_with_output());
    let out = out.map_err(|source| NftError::Wait { op, source })?;
    if !out.status.success() {
        // nft's own complaint says more than the broken pipe it may have left us.
        return Err(NftError::Failed {
            op,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    fed.map_err(|source| NftError::Stdin { op, source })?;
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config {
            if_index: 7,
            if_name: "mesh0".into(),
            fwmark: 0x4d5348,
            table: 0x4d5348,
            rule_priority: 5200,
            listen_port: 51820,
        }
    }

    #[test]
    fn create_table_is_delete_then_add_with_the_guard_rules() {
        let doc = create_table("meshd_mesh0", &cfg(), &Kept::default());
        let cmds = doc["nftables"].as_array().unwrap();
        assert!(cmds[0]["add"]["table"].is_object());
        assert!(cmds[1]["delete"]["table"].is_object());
        assert_eq!(cmds[4]["delete"]["table"]["family"], "arp");
        let text = doc.to_string();
        for needle in [
            r#""right":"mesh0""#,
            r#""right":51820"#,
            r#""set":"@blocked4""#,
            r#""set":"@blocked6""#,
            r#""right":"@covered_tcp""#,
            r#""right":"@covered_udp""#,
            r#""right":"reply""#,
            r#""right":5067592"#,
        ] {
            assert!(text.contains(needle), "{needle} missing in {text}");
        }
        // The drop for each protocol comes after every accept and after the recording rules.
        let input: Vec<&Value> = cmds
            .iter()
            .filter_map(|c| c["add"]["rule"].as_object())
            .filter(|r| r["chain"] == "input" && r["family"] == "inet")
            .map(|r| &r["expr"])
            .collect();
        assert_eq!(input.len(), 4 + 2 * 3);
        let last = input.last().unwrap().as_array().unwrap();
        assert_eq!(last.last().unwrap(), &json!({ "drop": null }));
    }

    #[test]
    fn output_guard_drops_unmarked_tcp_udp_to_protected_addresses_not_via_the_tun() {
        let doc = create_table("meshd_mesh0", &cfg(), &Kept::default());
        let cmds = doc["nftables"].as_array().unwrap();
        let output: Vec<&Value> = cmds
            .iter()
            .filter_map(|c| c["add"]["rule"].as_object())
            .filter(|r| r["chain"] == "output")
            .map(|r| &r["expr"])
            .collect();
        assert_eq!(output.len(), 4, "{output:?}");
        // The two accepts (meshd's mark, the TUN) come before the drops.
        assert_eq!(output[0][0]["match"]["right"], json!(0x4d5348));
        assert_eq!(output[1][0]["match"]["right"], json!("mesh0"));
        for (expr, set) in output[2..].iter().zip(["@protected4", "@protected6"]) {
            assert_eq!(expr[1]["match"]["right"], json!(set));
            assert_eq!(expr[0]["match"]["right"], json!({ "set": ["tcp", "udp"] }));
            assert_eq!(
                expr.as_array().unwrap().last(),
                Some(&json!({ "drop": null }))
            );
        }
        let chain = cmds
            .iter()
            .find(|c| c["add"]["chain"]["name"] == "output")
            .unwrap();
        assert_eq!(chain["add"]["chain"]["hook"], "output");
        // No elements without something to keep.
        assert!(!doc.to_string().contains(r#""element""#));
    }

    #[test]
    fn a_recreated_table_keeps_the_old_sets_in_the_same_transaction() {
        let kept = Kept {
            covered: Covered {
                tcp: vec![(22, 22), (5000, 5010)],
                udp: vec![(53, 53)],
            },
            protected: vec![
                "198.18.0.2".parse().unwrap(),
                "fd00:1::2".parse().unwrap(),
                "198.18.0.2".parse().unwrap(),
            ],
        };
        let doc = create_table("t", &cfg(), &kept);
        let cmds = doc["nftables"].as_array().unwrap();
        let elements: Vec<(&str, &Value)> = cmds
            .iter()
            .filter_map(|c| c["add"]["element"].as_object())
            .map(|e| (e["name"].as_str().unwrap(), &e["elem"]))
            .collect();
        assert_eq!(
            elements,
            vec![
                (SET_COVERED_TCP, &json!([22, { "range": [5000, 5010] }])),
                (SET_COVERED_UDP, &json!([53])),
                (SET_PROTECTED4, &json!(["198.18.0.2"])),
                (SET_PROTECTED6, &json!(["fd00:1::2"])),
            ]
        );
        // ... after the delete and the set definitions.
        let first_elem = cmds.iter().position(|c| c["add"]["element"].is_object());
        let last_set = cmds.iter().rposition(|c| c["add"]["set"].is_object());
        assert!(first_elem > last_set);
        // Reading such a table back gives the same sets.
        let listing = json!({ "nftables": [
            { "metainfo": { "version": "1.0.6" } },
            { "set": { "name": "covered_tcp", "elem": [22, { "range": [5000, 5010] }] } },
            { "set": { "name": "covered_udp", "elem": [53] } },
            { "set": { "name": "protected4", "elem": ["198.18.0.2"] } },
            { "set": { "name": "protected6", "elem": ["fd00:1::2", { "odd": 1 }] } },
            { "set": { "name": "blocked4", "elem": [] } },
        ] });
        let back = parse_kept(&listing);
        assert_eq!(back.covered, kept.covered);
        assert_eq!(
            back.protected,
            vec![
                "198.18.0.2".parse::<IpAddr>().unwrap(),
                "fd00:1::2".parse().unwrap()
            ]
        );
        assert_eq!(parse_kept(&json!({})), Kept::default());
    }

    #[test]
    fn protected_flushes_and_refills_both_sets() {
        let doc = set_protected("t", &["fd00:1::3".parse().unwrap()]);
        let cmds = doc["nftables"].as_array().unwrap();
        assert_eq!(cmds.len(), 3);
        assert_eq!(cmds[0]["flush"]["set"]["name"], SET_PROTECTED4);
        assert_eq!(cmds[1]["flush"]["set"]["name"], SET_PROTECTED6);
        assert_eq!(cmds[2]["add"]["element"]["elem"], json!(["fd00:1::3"]));
    }

    #[test]
    fn covered_flushes_and_refills_both_sets() {
        let doc = set_covered(
            "t",
            &Covered {
                tcp: vec![(22, 22), (5000, 5010)],
                udp: vec![],
            },
        );
        let cmds = doc["nftables"].as_array().unwrap();
        assert_eq!(cmds.len(), 3);
        assert_eq!(cmds[0]["flush"]["set"]["name"], SET_COVERED_TCP);
        assert_eq!(cmds[1]["flush"]["set"]["name"], SET_COVERED_UDP);
        assert_eq!(cmds[2]["add"]["element"]["name"], SET_COVERED_TCP);
        assert_eq!(
            cmds[2]["add"]["element"]["elem"],
            json!([22, { "range": [5000, 5010] }])
        );
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn the_runner_feeds_stdin_while_reading_stdout_and_reports_failures() {
        block_on(async {
            // More than a pipe holds each way: writing all before reading would stall.
            let big = "x".repeat(1 << 20);
            let cat = run_program("cat", &[], Some(big.clone()), NftOp::SetCovered);
            // A liveness bound, not a speed claim: the sequential version hangs forever.
            let out = tokio::time::timeout(std::time::Duration::from_secs(60), cat)
                .await
                .expect("the runner stalled on a full pipe")
                .unwrap();
            assert_eq!(out.len(), big.len());
            let out = run_program("echo", &["-n", "hi"], None, NftOp::ListTables)
                .await
                .unwrap();
            assert_eq!(out, b"hi");

            let e = run_program(
                "sh",
                &["-c", "echo '  Error: no  ' >&2; exit 3"],
                None,
                NftOp::ListTable,
            )
            .await
            .unwrap_err();
            match &e {
                NftError::Failed { op, status, stderr } => {
                    assert_eq!(*op, NftOp::ListTable);
                    assert_eq!(status.code(), Some(3));
                    assert_eq!(stderr, "Error: no");
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(
                e.to_string(),
                "nft listing failed (exit status: 3): Error: no"
            );
            // A failure that closes stdin early is reported as nft's failure, not the pipe's.
            let e = run_program(
                "sh",
                &["-c", "exec 0<&-; echo bad >&2; exit 1"],
                Some(big),
                NftOp::CreateTable,
            )
            .await
            .unwrap_err();
            assert!(
                matches!(&e, NftError::Failed { stderr, .. } if stderr == "bad"),
                "{e:?}"
            );

            let e = run_program("/nonexistent/nft", &[], None, NftOp::DeleteTable)
                .await
                .unwrap_err();
            assert!(
                matches!(&e, NftError::Spawn { op: NftOp::DeleteTable, source } if source.kind() == io::ErrorKind::NotFound),
                "{e:?}"
            );
        });
    }

    #[test]
    fn a_table_is_found_in_the_list_of_tables_by_family_and_name() {
        let listing = json!({ "nftables": [
            { "metainfo": { "version": "1.0.6", "json_schema_version": 1 } },
            { "table": { "family": "inet", "name": "meshd_mesh0", "handle": 1 } },
            { "table": { "family": "arp", "name": "meshd_mesh1", "handle": 2 } },
            { "table": { "family": "inet" } },
        ] });
        assert!(has_table(&listing, "inet", "meshd_mesh0"));
        assert!(!has_table(&listing, "inet", "meshd_mesh1"), "other family");
        assert!(!has_table(&listing, "arp", "meshd_mesh0"));
        assert!(!has_table(&listing, "inet", "meshd_mesh"), "prefix only");
        assert!(!has_table(
            &json!({ "nftables": [] }),
            "inet",
            "meshd_mesh0"
        ));
        assert!(!has_table(&json!({}), "inet", "meshd_mesh0"));
    }

    #[test]
    fn blocked_listing_parses() {
        let listing = json!({ "nftables": [
            { "metainfo": { "version": "1.0.6" } },
            { "set": { "name": "covered_tcp", "elem": [22] } },
            { "set": { "name": "blocked4", "elem": [
                { "elem": { "val": { "concat": ["198.18.0.1", "tcp", 5005] },
                            "expires": 599, "counter": { "packets": 3, "bytes": 180 } } },
                { "elem": { "val": { "concat": ["198.18.0.9", 17, "53"] },
                            "counter": { "packets": 1, "bytes": 60 } } },
                { "elem": { "val": "garbage" } },
            ] } },
            { "set": { "name": "blocked6", "elem": [
                { "elem": { "val": { "concat": ["fd00:1::1", "tcp", 5005] },
                            "counter": { "packets": 2, "bytes": 1 } } },
            ] } },
        ] });
        let got = parse_blocked(&listing).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[&("198.18.0.1".parse().unwrap(), Proto::Tcp, 5005)], 3);
        assert_eq!(got[&("198.18.0.9".parse().unwrap(), Proto::Udp, 53)], 1);
        assert_eq!(got[&("fd00:1::1".parse().unwrap(), Proto::Tcp, 5005)], 2);
        assert!(matches!(parse_blocked(&json!({})), Err(NftError::Listing)));
    }
}
