//! Selectors: which hosts a rule's `from` or `to` names.
//!
//! YAML forms:
//! - `app1-host-1` (a bare string): the host with that name;
//! - `{host: app1-host-1}`: the same, and may be combined with label terms;
//! - `{}`: every host;
//! - a map of label → term, all of which must hold:
//!   - `env: prod` — the label equals `prod` (numbers and booleans are read as their text);
//!   - `env: {in: [prod, staging]}` — equals one of;
//!   - `env: {"!=": dev}` or `env: {not: dev}` — is absent or differs (as in Kubernetes);
//!   - `env: {exists: true}` / `env: {exists: false}` — is present / absent.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// A host as the policy sees it: an id, a unique name and labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HostRef {
    /// Stable id (the coordinator's host id).
    pub id: u64,
    /// Unique name.
    pub name: String,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// One condition on one label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Match {
    /// The label equals this value.
    Eq(String),
    /// The label equals one of these values.
    In(Vec<String>),
    /// The label is absent or differs from this value.
    Ne(String),
    /// The label is present (`true`) or absent (`false`).
    Exists(bool),
}

impl Match {
    /// Whether a host whose label has value `v` (`None` = absent) satisfies this term.
    pub fn matches(&self, v: Option<&str>) -> bool {
        match self {
            Match::Eq(x) => v == Some(x.as_str()),
            Match::In(xs) => v.is_some_and(|v| xs.iter().any(|x| x == v)),
            Match::Ne(x) => v != Some(x.as_str()),
            Match::Exists(e) => v.is_some() == *e,
        }
    }
}

/// Which hosts a rule applies to: optionally one host by name, and label terms; all must hold.
/// The empty selector matches every host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Selector {
    /// Only the host with this name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Label terms.
    pub labels: BTreeMap<String, Match>,
}

impl Selector {
    /// The selector of one host by name.
    pub fn host(name: &str) -> Selector {
        Selector {
            host: Some(name.to_string()),
            labels: BTreeMap::new(),
        }
    }

    /// Whether `h` is selected.
    pub fn matches(&self, h: &HostRef) -> bool {
        if self.host.as_ref().is_some_and(|n| *n != h.name) {
            return false;
        }
        self.labels
            .iter()
            .all(|(k, m)| m.matches(h.labels.get(k).map(String::as_str)))
    }

    /// True for `{}` (every host).
    pub fn is_all(&self) -> bool {
        self.host.is_none() && self.labels.is_empty()
    }
}

/// Reads any YAML scalar (string, number, bool) as its text.
struct ScalarText;

impl Visitor<'_> for ScalarText {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
        Ok(v.to_string())
    }
}

/// A label value: a string, number or bool, read as text.
pub(crate) struct Text(pub String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Text, D::Error> {
        d.deserialize_any(ScalarText).map(Text)
    }
}

impl<'de> Deserialize<'de> for Match {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Match, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Match;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a label value, or one of {in: [...]}, {\"!=\": v}, {not: v}, {exists: true|false}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Match, E> {
                Ok(Match::Eq(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Match, E> {
                Ok(Match::Eq(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Match, E> {
                Ok(Match::Eq(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Match, E> {
                Ok(Match::Eq(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Match, E> {
                Ok(Match::Eq(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Match, A::Error> {
                let Some(op) = map.next_key::<String>()? else {
                    return Err(de::Error::custom(
                        "empty label term: use one of in, !=, not, exists",
                    ));
                };
                let m = match op.as_str() {
                    "in" => {
                        let vs: Vec<Text> = map.next_value()?;
                        if vs.is_empty() {
                            return Err(de::Error::custom("`in` needs at least one value"));
                        }
                        Match::In(vs.into_iter().map(|t| t.0).collect())
                    }
                    "!=" | "not" => Match::Ne(map.next_value::<Text>()?.0),
                    "exists" => Match::Exists(map.next_value()?),
                    other => {
                        return Err(de::Error::custom(format!(
                            "unknown label operator `{other}`: expected in, !=, not or exists"
                        )))
                    }
                };
                if map.next_key::<String>()?.is_some() {
                    return Err(de::Error::custom("a label term takes exactly one operator"));
                }
                Ok(m)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Selector {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Selector, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Selector;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a host name or a map of label selectors")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Selector, E> {
                if v.is_empty() {
                    return Err(E::custom("empty host name"));
                }
                Ok(Selector::host(v))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Selector, E> {
                Err(E::custom("empty selector: write {} to select every host"))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Selector, A::Error> {
                let mut sel = Selector::default();
                while let Some(k) = map.next_key::<String>()? {
                    if k == "host" {
                        if sel.host.is_some() {
                            return Err(de::Error::custom("duplicate key `host`"));
                        }
                        sel.host = Some(map.next_value::<Text>()?.0);
                        continue;
                    }
                    if k.is_empty() {
                        return Err(de::Error::custom("empty label name"));
                    }
                    let m: Match = map.next_value()?;
                    if sel.labels.insert(k.clone(), m).is_some() {
                        return Err(de::Error::custom(format!("duplicate label `{k}`")));
                    }
                }
                Ok(sel)
            }
        }
        d.deserialize_any(V)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let (Some(h), true) = (&self.host, self.labels.is_empty()) {
            return f.write_str(h);
        }
        f.write_str("{")?;
        let mut first = true;
        let mut sep = |f: &mut fmt::Formatter<'_>| {
            let r = if first { Ok(()) } else { f.write_str(", ") };
            first = false;
            r
        };
        if let Some(h) = &self.host {
            sep(f)?;
            write!(f, "host: {h}")?;
        }
        for (k, m) in &self.labels {
            sep(f)?;
            match m {
                Match::Eq(v) => write!(f, "{k}: {v}")?,
                Match::In(vs) => write!(f, "{k}: {{in: [{}]}}", vs.join(", "))?,
                Match::Ne(v) => write!(f, "{k}: {{\"!=\": {v}}}")?,
                Match::Exists(e) => write!(f, "{k}: {{exists: {e}}}")?,
            }
        }
        f.write_str("}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, labels: &[(&str, &str)]) -> HostRef {
        HostRef {
            id: 1,
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn sel(y: &str) -> Selector {
        serde_yaml_ng::from_str(y).unwrap()
    }

    #[test]
    fn operators() {
        let prod = host("a", &[("app", "db1"), ("env", "prod")]);
        let dev = host("b", &[("app", "db1"), ("env", "dev")]);
        let bare = host("c", &[("app", "db1")]);
        let all = [&prod, &dev, &bare];
        let check = |y: &str, want: [bool; 3]| {
            let s = sel(y);
            let got = all.map(|h| s.matches(h));
            assert_eq!(got, want, "{y}");
        };
        check("{}", [true, true, true]);
        check("{app: db1}", [true, true, true]);
        check("{app: db1, env: prod}", [true, false, false]);
        check("{env: {in: [prod, dev]}}", [true, true, false]);
        check("{env: {'!=': prod}}", [false, true, true]);
        check("{env: {not: dev}}", [true, false, true]);
        check("{env: {exists: true}}", [true, true, false]);
        check("{env: {exists: false}}", [false, false, true]);
        check("a", [true, false, false]);
        check("{host: b}", [false, true, false]);
        check("{host: b, env: prod}", [false, false, false]);
        check("{app: web}", [false, false, false]);
        let n = host("n", &[("v", "1"), ("t", "true")]);
        assert!(sel("{v: 1, t: true}").matches(&n));
        assert!(sel("{v: {in: [1, 2]}}").matches(&n));
        assert!(sel("{}").is_all());
    }

    #[test]
    fn bad_terms() {
        for y in [
            "{env: {in: []}}",
            "{env: {like: x}}",
            "{env: {in: [a], not: b}}",
            "{env: {}}",
            "{env: [a]}",
            "[a]",
        ] {
            assert!(serde_yaml_ng::from_str::<Selector>(y).is_err(), "{y}");
        }
    }

    #[test]
    fn display() {
        assert_eq!(sel("x").to_string(), "x");
        assert_eq!(
            sel("{a: b, e: {exists: false}, i: {in: [p, q]}, n: {not: z}}").to_string(),
            "{a: b, e: {exists: false}, i: {in: [p, q]}, n: {\"!=\": z}}"
        );
    }
}
