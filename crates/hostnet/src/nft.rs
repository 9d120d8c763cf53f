//! The nftables side: JSON documents for `nft -j -f -` (built by pure functions) and the
//! parser for the blocked-traffic sets, plus the one function that runs `nft`.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use anyhow::Context as _;
use serde_json::{json, Value};

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

/// Commands that (re)create the table for `cfg` in one transaction: any old table of that
/// name is deleted first, so applying this twice leaves exactly one table.
pub fn create_table(table: &str, cfg: &Config) -> Value {
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
    for (name, ranges) in [
        (SET_COVERED_TCP, &covered.tcp),
        (SET_COVERED_UDP, &covered.udp),
    ] {
        cmds.push(
            json!({ "flush": { "set": { "family": FAMILY, "table": table, "name": name } } }),
        );
        if ranges.is_empty() {
            continue;
        }
        let elem: Vec<Value> = ranges
            .iter()
            .map(|&(lo, hi)| {
                if lo == hi {
                    json!(lo)
                } else {
                    json!({ "range": [lo, hi] })
                }
            })
            .collect();
        cmds.push(json!({ "add": { "element": {
            "family": FAMILY, "table": table, "name": name, "elem": elem,
        } } }));
    }
    json!({ "nftables": cmds })
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
pub fn parse_blocked(listing: &Value) -> anyhow::Result<HashMap<BlockedKey, u64>> {
    let objects = listing
        .get("nftables")
        .and_then(Value::as_array)
        .context("nft listing has no \"nftables\" array")?;
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
pub fn apply(doc: &Value, what: &str) -> anyhow::Result<()> {
    run(&["-j", "-f", "-"], Some(doc.to_string()), what).map(drop)
}

/// Runs `nft -j list table inet TABLE` and parses the JSON; `None` if there is no such table.
pub fn list_table(table: &str) -> anyhow::Result<Option<Value>> {
    match run(&["-j", "list", "table", FAMILY, table], None, "listing") {
        Ok(out) => Ok(Some(
            serde_json::from_slice(&out).context("parsing nft -j list table output")?,
        )),
        Err(e) if format!("{e:#}").contains("No such file or directory") => Ok(None),
        Err(e) => Err(e),
    }
}

/// Runs `nft ARGS` (feeding `stdin` if given) and returns stdout; errors carry stderr.
fn run(args: &[&str], stdin: Option<String>, what: &str) -> anyhow::Result<Vec<u8>> {
    let mut cmd = Command::new("nft");
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
        .with_context(|| format!("nft {what}: starting nft (is nftables installed?)"))?;
    if let Some(input) = stdin {
        let mut pipe = child
            .stdin
            .take()
            .context("nft: stdin pipe missing after spawn")?;
        pipe.write_all(input.as_bytes())
            .with_context(|| format!("nft {what}: writing the ruleset"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("nft {what}: waiting for nft"))?;
    if !out.status.success() {
        anyhow::bail!(
            "nft {what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
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
        let doc = create_table("meshd_mesh0", &cfg());
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
        assert_eq!(
            cmds[1]["add"]["element"]["elem"],
            json!([22, { "range": [5000, 5010] }])
        );
        assert_eq!(cmds[2]["flush"]["set"]["name"], SET_COVERED_UDP);
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
        assert!(parse_blocked(&json!({})).is_err());
    }
}
