//! CMDB import files (`meshctl import FILE`): host records (a host name and/or an underlay IP
//! address with labels) and declared business flows (`from-app,to-app,port`), as CSV or JSON.
//! Pure: text in, typed rows or every bad row with its line out; no IO. The policy proposal
//! ([`propose_policy`]) adds one rule per declared flow to the current policy text.
//!
//! # CSV
//!
//! Sections start with a header row; the first row of the file is one. Blank lines and lines
//! starting with `#` are skipped.
//!
//! ```text
//! hostname,ip,labels
//! web-1,198.18.0.2,app=web;env=prod
//! ,198.18.0.3,app=db;env=prod
//! from-app,to-app,port
//! web,db,5432
//! web,dns,udp/53
//! ```
//!
//! Hosts header columns (case-insensitive; `-` and spaces count as `_`): the name is
//! `hostname`, `host`, `name`, `host_name` or `fqdn`; the address `ip`, `ip_address`,
//! `ipaddress`, `address`, `addr` or `underlay_ip`; `labels` or `tags` hold `k=v` pairs
//! separated by `;` or `,`; any other column is a label key whose cell is the value (an empty
//! cell sets nothing). A later row starts a hosts section again when its first cell is one of
//! the name/address column names and none of its cells is an IP address.
//!
//! Flows header: a row with `from_app` (or `from`), `to_app` (or `to`) and `port` columns, and
//! optionally `proto`. A port is `5432` (TCP), `tcp/5432` or `udp/53`.
//!
//! # JSON
//!
//! ```json
//! {"hosts": [{"hostname": "web-1", "ip": "198.18.0.2", "labels": {"app": "web"}},
//!            {"ip": "198.18.0.3", "labels": "app=db;env=prod"}],
//!  "flows": [{"from": "web", "to": "db", "port": 5432},
//!            {"from_app": "web", "to_app": "dns", "port": "udp/53"}]}
//! ```
//!
//! A top-level array is a list of hosts. Host keys take the CSV column names; other string
//! values are labels, as extra CSV columns are. Lines are those of each object's start.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::model::{validate_label, validate_name, HostId, Labels, UnixTime};
use crate::state::MAX_LABELS;

/// Most rows (hosts plus flows) one import may carry.
pub const MAX_IMPORT_ROWS: usize = 100_000;

/// One host record row: a name and/or an underlay IP address, with labels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRow {
    /// Line in the file (1-based; 0 when unknown).
    #[serde(default)]
    pub line: u32,
    /// Host name (as the host asks for it when it enrols).
    #[serde(default)]
    pub name: Option<String>,
    /// Underlay IP address.
    #[serde(default)]
    pub ip: Option<IpAddr>,
    /// Labels.
    #[serde(default)]
    pub labels: Labels,
}

/// A declared business flow: hosts labelled `app=from_app` open connections to hosts labelled
/// `app=to_app` on `proto/port`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeclaredFlow {
    /// Line in the file (1-based; 0 when unknown).
    #[serde(default)]
    pub line: u32,
    /// The client application (`app` label value).
    pub from_app: String,
    /// The server application (`app` label value).
    pub to_app: String,
    /// `tcp` or `udp`.
    pub proto: String,
    /// Destination port.
    pub port: u16,
}

impl DeclaredFlow {
    /// `tcp/5432`.
    pub fn port_spec(&self) -> String {
        format!("{}/{}", self.proto, self.port)
    }

    /// The rule name the flow goes into (`cmdb-web-to-db`).
    pub fn rule_name(&self) -> String {
        format!("cmdb-{}-to-{}", self.from_app, self.to_app)
    }
}

/// A parsed import file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmdbFile {
    /// Host records, in file order.
    #[serde(default)]
    pub hosts: Vec<HostRow>,
    /// Declared flows, in file order (duplicates dropped).
    #[serde(default)]
    pub flows: Vec<DeclaredFlow>,
}

/// One bad row: its line and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowError {
    /// Line (1-based; 0: the file as a whole).
    pub line: u32,
    /// What is wrong.
    pub message: String,
}

impl RowError {
    fn new(line: u32, message: impl Into<String>) -> Self {
        RowError {
            line,
            message: message.into(),
        }
    }
}

impl fmt::Display for RowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.line, self.message)
    }
}

/// A stored host record's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RecordId(pub u64);

/// A host record the coordinator keeps: labels for the host with this name or underlay IP,
/// enrolled or not yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    /// Id.
    pub id: RecordId,
    /// Host name.
    pub name: Option<String>,
    /// Underlay IP address.
    pub ip: Option<IpAddr>,
    /// Labels.
    pub labels: Labels,
    /// When it was last imported.
    pub imported_at: UnixTime,
    /// The enrolled host it was last applied to.
    pub host: Option<HostId>,
}

impl HostRecord {
    /// `web-1`, `198.18.0.2` or `web-1/198.18.0.2`.
    pub fn key(&self) -> String {
        match (&self.name, self.ip) {
            (Some(n), Some(ip)) => format!("{n}/{ip}"),
            (Some(n), None) => n.clone(),
            (None, Some(ip)) => ip.to_string(),
            (None, None) => "-".into(),
        }
    }
}

/// Parses a CSV or JSON import (JSON when the first non-blank character is `{` or `[`) and
/// validates every row ([`validate`]); on failure, every bad row.
pub fn parse(text: &str) -> Result<CmdbFile, Vec<RowError>> {
    let (file, mut errors) = match text.trim_start().chars().next() {
        Some('{') | Some('[') => json_rows(text),
        _ => csv_rows(text),
    };
    // The rows that did parse are checked too: every bad row is reported at once.
    errors.extend(validate(&file));
    errors.sort_by_key(|e| e.line);
    errors.dedup();
    if errors.is_empty() {
        Ok(file)
    } else {
        Err(errors)
    }
}

/// Checks rows on their own and against each other: names, addresses, labels (the syntax and
/// bounds of the rest of meshd), at least one key and one label per host, no name or address
/// twice, flows' applications and ports. Returns every problem, by line.
pub fn validate(file: &CmdbFile) -> Vec<RowError> {
    let mut errors = Vec::new();
    if file.hosts.len() + file.flows.len() > MAX_IMPORT_ROWS {
        errors.push(RowError::new(
            0,
            format!(
                "{} rows is too many (at most {MAX_IMPORT_ROWS})",
                file.hosts.len() + file.flows.len()
            ),
        ));
        return errors;
    }
    let mut names: HashMap<&str, u32> = HashMap::new();
    let mut ips: HashMap<IpAddr, u32> = HashMap::new();
    for h in &file.hosts {
        let line = h.line;
        if h.name.is_none() && h.ip.is_none() {
            errors.push(RowError::new(line, "neither a host name nor an IP address"));
        }
        if let Some(n) = &h.name {
            if let Err(e) = validate_name(n) {
                errors.push(RowError::new(line, format!("host name {n:?}: {e}")));
            } else if let Some(first) = names.insert(n, line) {
                names.insert(n, first);
                errors.push(RowError::new(
                    line,
                    format!("duplicate host name {n:?} (first on line {first})"),
                ));
            }
        }
        if let Some(ip) = h.ip {
            if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
                errors.push(RowError::new(
                    line,
                    format!("{ip} is not a host's underlay address"),
                ));
            } else if let Some(first) = ips.insert(ip, line) {
                ips.insert(ip, first);
                errors.push(RowError::new(
                    line,
                    format!("duplicate IP address {ip} (first on line {first})"),
                ));
            }
        }
        if h.labels.is_empty() {
            errors.push(RowError::new(line, "no labels for this host"));
        }
        if h.labels.len() > MAX_LABELS {
            errors.push(RowError::new(
                line,
                format!(
                    "{} labels is too many (at most {MAX_LABELS})",
                    h.labels.len()
                ),
            ));
        }
        for (k, v) in &h.labels {
            if let Err(e) = validate_label(k, v) {
                errors.push(RowError::new(line, e.to_string()));
            }
        }
    }
    for f in &file.flows {
        for (what, app) in [("from-app", &f.from_app), ("to-app", &f.to_app)] {
            if app.is_empty() {
                errors.push(RowError::new(f.line, format!("{what} is empty")));
            } else if let Err(e) = validate_label("app", app) {
                errors.push(RowError::new(f.line, format!("{what} {app:?}: {e}")));
            }
        }
        if !matches!(f.proto.as_str(), "tcp" | "udp") {
            errors.push(RowError::new(
                f.line,
                format!("protocol {:?}: give tcp or udp", f.proto),
            ));
        }
        if f.port == 0 {
            errors.push(RowError::new(f.line, "port 0 is not a port"));
        }
    }
    errors.sort_by_key(|e| e.line);
    errors
}

/// Canonical column name: lower case, `-` and spaces as `_`.
fn norm(s: &str) -> String {
    s.trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c == '-' || c == ' ' { '_' } else { c })
        .collect()
}

const NAME_COLS: [&str; 5] = ["hostname", "host", "name", "host_name", "fqdn"];
const IP_COLS: [&str; 6] = [
    "ip",
    "ip_address",
    "ipaddress",
    "address",
    "addr",
    "underlay_ip",
];
const LABELS_COLS: [&str; 2] = ["labels", "tags"];
const FROM_COLS: [&str; 3] = ["from_app", "from", "source_app"];
const TO_COLS: [&str; 3] = ["to_app", "to", "dest_app"];
const PORT_COLS: [&str; 2] = ["port", "ports"];
const PROTO_COLS: [&str; 2] = ["proto", "protocol"];

/// What a CSV column holds.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostCol {
    Name,
    Ip,
    Labels,
    Label(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlowCol {
    From,
    To,
    Port,
    Proto,
}

enum Section {
    Hosts(Vec<HostCol>),
    Flows(Vec<Option<FlowCol>>),
}

fn flow_header(cells: &[String]) -> Option<Vec<Option<FlowCol>>> {
    let cols: Vec<Option<FlowCol>> = cells
        .iter()
        .map(|c| {
            let c = norm(c);
            let c = c.as_str();
            if FROM_COLS.contains(&c) {
                Some(FlowCol::From)
            } else if TO_COLS.contains(&c) {
                Some(FlowCol::To)
            } else if PORT_COLS.contains(&c) {
                Some(FlowCol::Port)
            } else if PROTO_COLS.contains(&c) {
                Some(FlowCol::Proto)
            } else {
                None
            }
        })
        .collect();
    let has = |k| cols.contains(&Some(k));
    (has(FlowCol::From) && has(FlowCol::To) && has(FlowCol::Port)).then_some(cols)
}

fn hosts_header(cells: &[String], first_row: bool) -> Option<Vec<HostCol>> {
    let first = cells.first().map(|c| norm(c)).unwrap_or_default();
    let keyish = NAME_COLS.contains(&first.as_str()) || IP_COLS.contains(&first.as_str());
    let any_ip = cells.iter().any(|c| c.trim().parse::<IpAddr>().is_ok());
    if !first_row && (!keyish || any_ip) {
        return None;
    }
    Some(
        cells
            .iter()
            .map(|c| {
                let n = norm(c);
                if NAME_COLS.contains(&n.as_str()) {
                    HostCol::Name
                } else if IP_COLS.contains(&n.as_str()) {
                    HostCol::Ip
                } else if LABELS_COLS.contains(&n.as_str()) {
                    HostCol::Labels
                } else {
                    HostCol::Label(c.trim().to_string())
                }
            })
            .collect(),
    )
}

/// `app=web;env=prod` (also `,`-separated); every bad pair is an error.
fn label_list(s: &str, line: u32, labels: &mut Labels, errors: &mut Vec<RowError>) {
    for part in s.split([';', ',']).map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some((k, v)) => {
                labels.insert(k.trim().to_string(), v.trim().to_string());
            }
            None => errors.push(RowError::new(
                line,
                format!("label {part:?} has no '=' (write key=value)"),
            )),
        }
    }
}

/// `5432`, `tcp/5432`, `udp/53` (a separate `proto` wins over none).
fn port_of(s: &str, proto: Option<&str>, line: u32) -> Result<(String, u16), RowError> {
    let s = s.trim();
    let (p, n) = match s.split_once('/') {
        Some((p, n)) => (p.trim().to_ascii_lowercase(), n.trim()),
        None => (
            proto
                .map(|p| p.trim().to_ascii_lowercase())
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "tcp".into()),
            s,
        ),
    };
    let port = n.parse::<u16>().map_err(|_| {
        RowError::new(
            line,
            format!("port {s:?}: give a number 1-65535, tcp/N or udp/N"),
        )
    })?;
    Ok((p, port))
}

fn ip_of(s: &str, line: u32) -> Result<IpAddr, RowError> {
    s.trim()
        .parse::<IpAddr>()
        .map_err(|_| RowError::new(line, format!("{s:?} is not an IP address")))
}

/// Parses the CSV variant (see the module docs); rows are not validated beyond their shape.
pub fn parse_csv(text: &str) -> Result<CmdbFile, Vec<RowError>> {
    ok_or_errors(csv_rows(text))
}

fn ok_or_errors((file, errors): (CmdbFile, Vec<RowError>)) -> Result<CmdbFile, Vec<RowError>> {
    if errors.is_empty() {
        Ok(file)
    } else {
        Err(errors)
    }
}

/// The rows that parse, and the errors of those that do not.
fn csv_rows(text: &str) -> (CmdbFile, Vec<RowError>) {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .comment(Some(b'#'))
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let mut out = CmdbFile::default();
    let mut errors = Vec::new();
    let mut section: Option<Section> = None;
    let mut seen_flows = BTreeSet::new();
    let mut rec = csv::StringRecord::new();
    loop {
        match rdr.read_record(&mut rec) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line()) as u32;
                errors.push(RowError::new(line, format!("not CSV: {e}")));
                break;
            }
        }
        let line = rec.position().map_or(0, |p| p.line()) as u32;
        let cells: Vec<String> = rec.iter().map(str::to_string).collect();
        if cells.iter().all(String::is_empty) {
            continue;
        }
        if let Some(cols) = flow_header(&cells) {
            section = Some(Section::Flows(cols));
            continue;
        }
        if let Some(cols) = hosts_header(&cells, section.is_none()) {
            if !cols
                .iter()
                .any(|c| matches!(c, HostCol::Name | HostCol::Ip))
            {
                errors.push(RowError::new(
                    line,
                    "header has no hostname or ip column (nor from-app,to-app,port)",
                ));
                return (out, errors);
            }
            section = Some(Section::Hosts(cols));
            continue;
        }
        match &section {
            None => unreachable_header(&mut errors, line),
            Some(Section::Hosts(cols)) => {
                if cells.len() > cols.len() {
                    errors.push(RowError::new(
                        line,
                        format!("{} fields but the header has {}", cells.len(), cols.len()),
                    ));
                    continue;
                }
                let mut row = HostRow {
                    line,
                    name: None,
                    ip: None,
                    labels: Labels::new(),
                };
                for (col, cell) in cols.iter().zip(&cells) {
                    if cell.is_empty() {
                        continue;
                    }
                    match col {
                        HostCol::Name => row.name = Some(cell.clone()),
                        HostCol::Ip => match ip_of(cell, line) {
                            Ok(ip) => row.ip = Some(ip),
                            Err(e) => errors.push(e),
                        },
                        HostCol::Labels => label_list(cell, line, &mut row.labels, &mut errors),
                        HostCol::Label(k) => {
                            row.labels.insert(k.clone(), cell.clone());
                        }
                    }
                }
                out.hosts.push(row);
            }
            Some(Section::Flows(cols)) => {
                let get = |want: FlowCol| {
                    cols.iter()
                        .zip(&cells)
                        .find(|(c, _)| **c == Some(want))
                        .map(|(_, v)| v.as_str())
                };
                let (Some(from), Some(to), Some(port)) =
                    (get(FlowCol::From), get(FlowCol::To), get(FlowCol::Port))
                else {
                    errors.push(RowError::new(
                        line,
                        "a flow needs from-app, to-app and port",
                    ));
                    continue;
                };
                match port_of(port, get(FlowCol::Proto), line) {
                    Ok((proto, port)) => push_flow(
                        &mut out,
                        &mut seen_flows,
                        DeclaredFlow {
                            line,
                            from_app: from.to_string(),
                            to_app: to.to_string(),
                            proto,
                            port,
                        },
                    ),
                    Err(e) => errors.push(e),
                }
            }
        }
    }
    (out, errors)
}

/// The first row is always a header, so a data row without a section cannot happen; kept as
/// an error rather than a panic.
fn unreachable_header(errors: &mut Vec<RowError>, line: u32) {
    errors.push(RowError::new(line, "data before any header row"));
}

fn push_flow(
    out: &mut CmdbFile,
    seen: &mut BTreeSet<(String, String, String, u16)>,
    f: DeclaredFlow,
) {
    if seen.insert((
        f.from_app.clone(),
        f.to_app.clone(),
        f.proto.clone(),
        f.port,
    )) {
        out.flows.push(f);
    }
}

/// The top level of a JSON import.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonTop<'a> {
    #[serde(borrow, default)]
    hosts: Vec<&'a serde_json::value::RawValue>,
    #[serde(borrow, default)]
    flows: Vec<&'a serde_json::value::RawValue>,
}

/// Line of `part`, a slice of `text`.
fn line_of(text: &str, part: &str) -> u32 {
    let off = (part.as_ptr() as usize)
        .saturating_sub(text.as_ptr() as usize)
        .min(text.len());
    text.as_bytes()[..off]
        .iter()
        .filter(|b| **b == b'\n')
        .count() as u32
        + 1
}

fn json_str(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.trim().to_string()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Parses the JSON variant (see the module docs); rows are not validated beyond their shape.
pub fn parse_json(text: &str) -> Result<CmdbFile, Vec<RowError>> {
    ok_or_errors(json_rows(text))
}

/// The rows that parse, and the errors of those that do not.
fn json_rows(text: &str) -> (CmdbFile, Vec<RowError>) {
    let bad_json = |e: serde_json::Error| {
        (
            CmdbFile::default(),
            vec![RowError::new(
                e.line() as u32,
                format!("not valid JSON: {e}"),
            )],
        )
    };
    let top: Result<JsonTop<'_>, _> = if text.trim_start().starts_with('[') {
        serde_json::from_str(text).map(|hosts| JsonTop {
            hosts,
            flows: Vec::new(),
        })
    } else {
        serde_json::from_str(text)
    };
    let top = match top {
        Ok(t) => t,
        Err(e) => return bad_json(e),
    };
    let mut out = CmdbFile::default();
    let mut errors = Vec::new();
    let mut seen_flows = BTreeSet::new();
    for raw in top.hosts {
        let line = line_of(text, raw.get());
        let obj: serde_json::Map<String, serde_json::Value> = match serde_json::from_str(raw.get())
        {
            Ok(o) => o,
            Err(_) => {
                errors.push(RowError::new(line, "a host must be a JSON object"));
                continue;
            }
        };
        let mut row = HostRow {
            line,
            name: None,
            ip: None,
            labels: Labels::new(),
        };
        for (k, v) in &obj {
            let n = norm(k);
            if v.is_null() {
                continue;
            }
            if LABELS_COLS.contains(&n.as_str()) {
                match v {
                    serde_json::Value::Object(m) => {
                        for (lk, lv) in m {
                            match json_str(lv) {
                                Some(s) => {
                                    row.labels.insert(lk.clone(), s);
                                }
                                None => errors.push(RowError::new(
                                    line,
                                    format!("label {lk:?}: the value must be a string"),
                                )),
                            }
                        }
                    }
                    serde_json::Value::String(s) => {
                        label_list(s, line, &mut row.labels, &mut errors)
                    }
                    _ => errors.push(RowError::new(
                        line,
                        "labels must be an object or a \"k=v;k=v\" string",
                    )),
                }
                continue;
            }
            let Some(s) = json_str(v) else {
                errors.push(RowError::new(line, format!("{k:?} must be a string")));
                continue;
            };
            if s.is_empty() {
                continue;
            }
            if NAME_COLS.contains(&n.as_str()) {
                row.name = Some(s);
            } else if IP_COLS.contains(&n.as_str()) {
                match ip_of(&s, line) {
                    Ok(ip) => row.ip = Some(ip),
                    Err(e) => errors.push(e),
                }
            } else {
                row.labels.insert(k.clone(), s);
            }
        }
        out.hosts.push(row);
    }
    for raw in top.flows {
        let line = line_of(text, raw.get());
        let obj: serde_json::Map<String, serde_json::Value> = match serde_json::from_str(raw.get())
        {
            Ok(o) => o,
            Err(_) => {
                errors.push(RowError::new(line, "a flow must be a JSON object"));
                continue;
            }
        };
        let mut fields: BTreeMap<&'static str, String> = BTreeMap::new();
        let mut bad = false;
        for (k, v) in &obj {
            let n = norm(k);
            let which = if FROM_COLS.contains(&n.as_str()) {
                "from"
            } else if TO_COLS.contains(&n.as_str()) {
                "to"
            } else if PORT_COLS.contains(&n.as_str()) {
                "port"
            } else if PROTO_COLS.contains(&n.as_str()) {
                "proto"
            } else {
                errors.push(RowError::new(
                    line,
                    format!("unknown flow field {k:?} (from, to, port, proto)"),
                ));
                bad = true;
                continue;
            };
            match json_str(v) {
                Some(s) => {
                    fields.insert(which, s);
                }
                None => {
                    errors.push(RowError::new(
                        line,
                        format!("{k:?} must be a string or number"),
                    ));
                    bad = true;
                }
            }
        }
        if bad {
            continue;
        }
        let (Some(from), Some(to), Some(port)) =
            (fields.get("from"), fields.get("to"), fields.get("port"))
        else {
            errors.push(RowError::new(line, "a flow needs from, to and port"));
            continue;
        };
        match port_of(port, fields.get("proto").map(String::as_str), line) {
            Ok((proto, port)) => push_flow(
                &mut out,
                &mut seen_flows,
                DeclaredFlow {
                    line,
                    from_app: from.clone(),
                    to_app: to.clone(),
                    proto,
                    port,
                },
            ),
            Err(e) => errors.push(e),
        }
    }
    (out, errors)
}

/// Why no policy could be proposed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// The current policy text is not a YAML mapping with a `rules` list.
    #[error("the current policy cannot be extended: {0}")]
    Current(String),
}

/// The current policy plus one rule per (from-app, to-app) pair of `flows` — named
/// `cmdb-FROM-to-TO`, `from: {app: FROM}`, `to: {app: TO}`, the pair's ports — and one
/// `allow` test per flow. A rule of that name already there gets the missing ports added, so
/// importing the same file twice proposes no change. The YAML is re-emitted (comments of the
/// current text are not kept; every key, e.g. `learn`, is).
pub fn propose_policy(current: &str, flows: &[DeclaredFlow]) -> Result<String, ProposeError> {
    use serde_yaml_ng::{Mapping, Value};
    let blank = current
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#') || l.trim() == "---");
    let mut doc = if blank {
        Value::Mapping(Mapping::new())
    } else {
        serde_yaml_ng::from_str::<Value>(current)
            .map_err(|e| ProposeError::Current(e.to_string()))?
    };
    let Value::Mapping(top) = &mut doc else {
        return Err(ProposeError::Current("not a mapping".into()));
    };
    let key = |s: &str| Value::String(s.into());
    for list in ["rules", "tests"] {
        match top.get(key(list)) {
            None | Some(Value::Null) => {
                top.insert(key(list), Value::Sequence(Vec::new()));
            }
            Some(Value::Sequence(_)) => {}
            Some(_) => return Err(ProposeError::Current(format!("{list} is not a list"))),
        }
    }
    // Ports per rule, in flow order.
    let mut by_rule: Vec<(String, &DeclaredFlow, Vec<String>)> = Vec::new();
    for f in flows {
        let name = f.rule_name();
        match by_rule.iter_mut().find(|(n, _, _)| *n == name) {
            Some((_, _, ports)) => {
                if !ports.contains(&f.port_spec()) {
                    ports.push(f.port_spec());
                }
            }
            None => by_rule.push((name, f, vec![f.port_spec()])),
        }
    }
    let app = |a: &str| {
        let mut m = Mapping::new();
        m.insert(key("app"), key(a));
        Value::Mapping(m)
    };
    if let Some(Value::Sequence(rules)) = top.get_mut(key("rules")) {
        for (name, f, ports) in &by_rule {
            let existing = rules.iter_mut().find_map(|r| match r {
                Value::Mapping(m) if m.get(key("name")) == Some(&key(name)) => Some(m),
                _ => None,
            });
            match existing {
                Some(m) => {
                    if let Some(Value::Sequence(have)) = m.get_mut(key("ports")) {
                        for p in ports {
                            if !have.contains(&key(p)) {
                                have.push(key(p));
                            }
                        }
                    }
                }
                None => {
                    let mut m = Mapping::new();
                    m.insert(key("name"), key(name));
                    m.insert(key("from"), app(&f.from_app));
                    m.insert(key("to"), app(&f.to_app));
                    m.insert(
                        key("ports"),
                        Value::Sequence(ports.iter().map(|p| key(p)).collect()),
                    );
                    rules.push(Value::Mapping(m));
                }
            }
        }
    }
    if let Some(Value::Sequence(tests)) = top.get_mut(key("tests")) {
        for f in flows {
            let mut m = Mapping::new();
            m.insert(key("from"), app(&f.from_app));
            m.insert(key("to"), app(&f.to_app));
            m.insert(key("port"), key(&f.port_spec()));
            m.insert(key("expect"), key("allow"));
            let t = Value::Mapping(m);
            if !tests.contains(&t) {
                tests.push(t);
            }
        }
    }
    if matches!(top.get(key("tests")), Some(Value::Sequence(t)) if t.is_empty()) {
        top.remove(key("tests"));
    }
    serde_yaml_ng::to_string(&doc).map_err(|e| ProposeError::Current(e.to_string()))
}

/// An enrolled host as [`relabel_plan`] sees it (from `GET /v1/hosts`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanHost {
    /// Its id.
    pub id: HostId,
    /// Its name.
    pub name: String,
    /// Its underlay addresses (observed and reported).
    pub ips: Vec<IpAddr>,
    /// Its labels now.
    pub labels: Labels,
}

/// One enrolled host an import relabels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relabel {
    /// The host.
    pub id: HostId,
    /// Its name.
    pub name: String,
    /// Its labels now.
    pub before: Labels,
    /// Its labels after the import (the rows' labels merged over them, in file order).
    pub after: Labels,
}

/// What an import would do to enrolled hosts ([`relabel_plan`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RelabelPlan {
    /// Hosts whose labels change, by id.
    pub hosts: Vec<Relabel>,
    /// Lines of rows that match no enrolled host.
    pub unmatched: Vec<u32>,
}

/// The labels an import gives enrolled hosts, computed off the coordinator (a signed import:
/// meshctl signs exactly these). The rules of the coordinator's import: a row names the live
/// host with its name, else the one with its underlay address; a row whose name and address
/// name two different hosts is refused, as is a host left with more than [`MAX_LABELS`]
/// labels; the row's labels are merged over the host's (the row wins a key both set).
pub fn relabel_plan(file: &CmdbFile, hosts: &[PlanHost]) -> Result<RelabelPlan, Vec<RowError>> {
    let mut errors = validate(file);
    let mut after: BTreeMap<HostId, Labels> = BTreeMap::new();
    let mut plan = RelabelPlan::default();
    for row in &file.hosts {
        let by_name = row
            .name
            .as_ref()
            .and_then(|n| hosts.iter().find(|h| &h.name == n));
        let by_ip = row
            .ip
            .and_then(|ip| hosts.iter().find(|h| h.ips.contains(&ip)));
        let h = match (by_name, by_ip) {
            (Some(a), Some(b)) if a.id != b.id => {
                errors.push(RowError {
                    line: row.line,
                    message: format!(
                        "host name {:?} is enrolled host {} but {} is the address of host {}",
                        a.name,
                        a.id,
                        row.ip.map(|i| i.to_string()).unwrap_or_default(),
                        b.id
                    ),
                });
                continue;
            }
            (Some(h), _) | (None, Some(h)) => h,
            (None, None) => {
                plan.unmatched.push(row.line);
                continue;
            }
        };
        let labels = after.entry(h.id).or_insert_with(|| h.labels.clone());
        labels.extend(row.labels.clone());
        if labels.len() > MAX_LABELS {
            errors.push(RowError {
                line: row.line,
                message: format!(
                    "host {} would have {} labels (at most {MAX_LABELS})",
                    h.name,
                    labels.len()
                ),
            });
        }
    }
    if !errors.is_empty() {
        errors.sort_by_key(|e| e.line);
        return Err(errors);
    }
    for h in hosts {
        if let Some(labels) = after.remove(&h.id) {
            if labels != h.labels {
                plan.hosts.push(Relabel {
                    id: h.id,
                    name: h.name.clone(),
                    before: h.labels.clone(),
                    after: labels,
                });
            }
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_hosts_and_flows() {
        let text = "# exported 2024-01-01\n\
                    hostname,ip,labels\n\
                    web-1,198.18.0.2,app=web;env=prod\n\
                    ,198.18.0.3,\"app=db,env=prod\"\n\
                    \n\
                    from-app,to-app,port\n\
                    web,db,5432\n\
                    web,db,tcp/5432\n\
                    web,dns,udp/53\n";
        let f = parse(text).unwrap();
        assert_eq!(f.hosts.len(), 2);
        assert_eq!(f.hosts[0].line, 3);
        assert_eq!(f.hosts[0].name.as_deref(), Some("web-1"));
        assert_eq!(f.hosts[0].labels["env"], "prod");
        assert_eq!(f.hosts[1].name, None);
        assert_eq!(f.hosts[1].ip, Some("198.18.0.3".parse().unwrap()));
        assert_eq!(f.hosts[1].labels["app"], "db");
        // tcp/5432 twice is one flow.
        let flows: Vec<_> = f.flows.iter().map(|f| (f.line, f.port_spec())).collect();
        assert_eq!(flows, [(7, "tcp/5432".into()), (9, "udp/53".to_string())]);
    }

    #[test]
    fn csv_one_column_per_label() {
        let text = "Host Name,IP Address,app,env\nweb-1,198.18.0.2,web,prod\ndb-1,,db,\n";
        let f = parse(text).unwrap();
        assert_eq!(f.hosts[0].labels.len(), 2);
        assert_eq!(f.hosts[1].labels.len(), 1, "an empty cell sets no label");
        assert_eq!(f.hosts[1].ip, None);
    }

    #[test]
    fn every_bad_row_is_reported_with_its_line() {
        let text = "hostname,ip,labels\n\
                    web-1,198.18.0.2,app=web\n\
                    web 2,198.18.0.300,app=web\n\
                    web-1,,app=x\n\
                    db-1,198.18.0.2,app=d b\n\
                    ,,app=db\n\
                    from,to,port\n\
                    web,db,http\n";
        let e = parse(text).unwrap_err();
        let shown: Vec<String> = e.iter().map(ToString::to_string).collect();
        let lines: Vec<u32> = e.iter().map(|e| e.line).collect();
        assert!(lines.contains(&3) && lines.contains(&4) && lines.contains(&5));
        assert!(lines.contains(&6) && lines.contains(&8), "{shown:?}");
        assert!(
            shown
                .iter()
                .any(|s| s.contains("duplicate host name \"web-1\" (first on line 2)")),
            "{shown:?}"
        );
        assert!(
            shown
                .iter()
                .any(|s| s.starts_with("5: duplicate IP address 198.18.0.2")),
            "{shown:?}"
        );
        assert!(
            shown
                .iter()
                .any(|s| s.starts_with("3: \"198.18.0.300\" is not")),
            "{shown:?}"
        );
    }

    #[test]
    fn json_variants_with_lines() {
        let text = r#"{
  "hosts": [
    {"hostname": "web-1", "ip": "198.18.0.2", "labels": {"app": "web"}},
    {"ip": "198.18.0.3", "labels": "app=db;env=prod", "owner": "ops"}
  ],
  "flows": [
    {"from": "web", "to": "db", "port": 5432},
    {"from_app": "web", "to_app": "dns", "port": "53", "proto": "udp"}
  ]
}"#;
        let f = parse(text).unwrap();
        assert_eq!(f.hosts[0].line, 3);
        assert_eq!(f.hosts[1].line, 4);
        assert_eq!(f.hosts[1].labels["owner"], "ops");
        assert_eq!(f.flows[1].port_spec(), "udp/53");
        assert_eq!(f.flows[1].line, 8);
        // A top-level array is a list of hosts.
        let f = parse("[{\"name\": \"a\", \"labels\": {\"app\": \"x\"}}]").unwrap();
        assert_eq!(f.hosts.len(), 1);
        let e = parse("{\n\"hosts\": [\n{\"name\": \"a b\", \"labels\": {}}\n]}").unwrap_err();
        assert_eq!(e.iter().map(|e| e.line).collect::<Vec<_>>(), [3, 3]);
        let e = parse("{\"hosts\": [\n{\"name\": \"a\",,}]}").unwrap_err();
        assert_eq!(e[0].line, 2);
        assert!(e[0].message.starts_with("not valid JSON"));
        let e = parse("{\"host\": []}").unwrap_err();
        assert!(e[0].message.contains("unknown field"), "{e:?}");
    }

    #[test]
    fn garbage_never_panics() {
        for t in [
            "",
            "\u{0}",
            "\"",
            "{",
            "[1,2]",
            "hostname\n\"x",
            "a,b\n1,2,3",
            "from,to,port\n",
        ] {
            let _ = parse(t);
        }
    }

    #[test]
    fn proposed_policy_adds_rules_and_tests_idempotently() {
        let flows = parse("from-app,to-app,port\nweb,db,5432\nweb,db,5433\napi,db,5432\n")
            .unwrap()
            .flows;
        let current =
            "# comment\nrules:\n  - {name: ssh, from: {role: admin}, to: {}, ports: [tcp/22]}\n";
        let p = propose_policy(current, &flows).unwrap();
        let parsed = meshd_policy::Policy::parse(&p).unwrap();
        let names: Vec<&str> = parsed.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["ssh", "cmdb-web-to-db", "cmdb-api-to-db"]);
        assert_eq!(parsed.rules[1].ports.len(), 2);
        assert_eq!(parsed.tests.len(), 3);
        let tests = meshd_policy::run_tests(&parsed, &meshd_policy::NoInventory, 0);
        assert!(tests.iter().all(|t| t.passed()), "{tests:?}");
        // Again: nothing new.
        let again = propose_policy(&p, &flows).unwrap();
        assert_eq!(meshd_policy::Policy::parse(&again).unwrap(), parsed);
        // From nothing.
        let p = propose_policy("", &flows[..1]).unwrap();
        assert_eq!(meshd_policy::Policy::parse(&p).unwrap().rules.len(), 1);
        assert!(propose_policy("- a\n- b\n", &flows).is_err());
    }

    #[test]
    fn relabel_plan_matches_by_name_then_address_and_merges() {
        let h = |id, name: &str, ip: [u8; 4], labels: &[(&str, &str)]| PlanHost {
            id: HostId(id),
            name: name.into(),
            ips: vec![IpAddr::from(ip)],
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let hosts = [
            h(1, "web1", [10, 0, 0, 1], &[("app", "web")]),
            h(2, "db1", [10, 0, 0, 2], &[("app", "db")]),
        ];
        let f = parse("hostname,ip,labels\nweb1,,env=prod\n,10.0.0.2,app=db\nnew,10.9.9.9,app=x\n")
            .unwrap();
        let p = relabel_plan(&f, &hosts).unwrap();
        assert_eq!(p.unmatched, vec![4]);
        assert_eq!(p.hosts.len(), 1, "db1's labels do not change: {p:?}");
        assert_eq!(p.hosts[0].name, "web1");
        assert_eq!(
            p.hosts[0].after.get("env").map(String::as_str),
            Some("prod")
        );
        assert_eq!(p.hosts[0].after.get("app").map(String::as_str), Some("web"));
        let f = parse("hostname,ip,labels\nweb1,10.0.0.2,env=prod\n").unwrap();
        let e = relabel_plan(&f, &hosts).unwrap_err();
        assert_eq!(e[0].line, 2, "{e:?}");
    }
}
