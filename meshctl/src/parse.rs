//! Parsers for command-line values: label lists, label keys, durations, server URLs.
//! Each returns an error message that names the bad input and shows the expected form.

use std::time::Duration;

use meshd_control::model::validate_label;
use meshd_control::Labels;

/// Parses `k=v[,k=v...]` into labels. Every item needs an `=`; keys must be unique.
pub fn labels(s: &str) -> Result<Labels, String> {
    let mut out = Labels::new();
    for item in s.split(',').map(str::trim) {
        if item.is_empty() {
            return Err(format!(
                "empty label in {s:?}: expected key=value[,key=value...], e.g. app=db1,env=prod"
            ));
        }
        let Some((k, v)) = item.split_once('=') else {
            return Err(format!(
                "label {item:?} has no '=': expected key=value, e.g. env=prod"
            ));
        };
        let (k, v) = (k.trim(), v.trim());
        validate_label(k, v).map_err(|e| e.to_string())?;
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(format!("label key {k:?} given twice in {s:?}"));
        }
    }
    Ok(out)
}

/// Parses `key[,key...]` (label keys to remove).
pub fn label_keys(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for k in s.split(',').map(str::trim) {
        if k.is_empty() {
            return Err(format!(
                "empty label key in {s:?}: expected key[,key...], e.g. env,app"
            ));
        }
        if k.contains('=') {
            return Err(format!(
                "{k:?} looks like key=value: unlabel takes only keys, e.g. `meshctl hosts unlabel db1 env`"
            ));
        }
        validate_label(k, "").map_err(|e| e.to_string())?;
        if !out.iter().any(|x| x == k) {
            out.push(k.to_string());
        }
    }
    Ok(out)
}

/// Parses a duration: a number with a unit `s`, `m`, `h` or `d`, optionally several
/// (`30s`, `10m`, `1h`, `7d`, `1h30m`). Zero is refused.
pub fn duration(s: &str) -> Result<Duration, String> {
    let hint = "expected a number with a unit s, m, h or d, e.g. 30s, 10m, 1h, 7d";
    let t = s.trim();
    if t.is_empty() {
        return Err(format!("empty duration: {hint}"));
    }
    let mut total: u64 = 0;
    let mut num = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(format!("duration {s:?}: unknown unit {c:?}: {hint}")),
        };
        if num.is_empty() {
            return Err(format!(
                "duration {s:?}: unit {c:?} without a number: {hint}"
            ));
        }
        let n: u64 = num
            .parse()
            .map_err(|_| format!("duration {s:?} is too large"))?;
        total = n
            .checked_mul(unit)
            .and_then(|x| total.checked_add(x))
            .ok_or_else(|| format!("duration {s:?} is too large"))?;
        num.clear();
    }
    if !num.is_empty() {
        return Err(format!("duration {s:?} has no unit: {hint}"));
    }
    if total == 0 {
        return Err(format!("duration {s:?} must be longer than zero"));
    }
    Ok(Duration::from_secs(total))
}

/// Formats seconds as the largest whole units, e.g. `1h30m`, `7d`, `45s`.
pub fn format_duration(secs: u64) -> String {
    if secs == 0 {
        return "0s".into();
    }
    // Two units are enough to read at a glance (`2d3h`, not `2d3h4m5s`).
    let mut out = String::new();
    let mut used = 0;
    let mut rest = secs;
    for (unit, n) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
        if used == 2 {
            break;
        }
        if rest >= n {
            out.push_str(&format!("{}{unit}", rest / n));
            rest %= n;
            used += 1;
        } else if used > 0 {
            used += 1;
        }
    }
    out
}

/// Checks a probe (`tcp/1521`, `udp/53`, `icmp`) for `policy explain`; returns it unchanged.
pub fn probe(s: &str) -> Result<String, String> {
    let t = s.trim();
    t.parse::<meshd_policy::Probe>()
        .map_err(|e| e.to_string())
        .map(|_| t.to_string())
}

/// Normalises a server address: adds `http://` when no scheme is given, drops a trailing
/// `/`, and refuses schemes other than `http://` and `https://`.
pub fn server_url(s: &str) -> Result<String, String> {
    let t = s.trim();
    let t = match t.find("://") {
        Some(i) => &t[..i + 3 + t[i + 3..].trim_end_matches('/').len()],
        None => t.trim_end_matches('/'),
    };
    if t.is_empty() {
        return Err("empty server address: expected e.g. http://127.0.0.1:7444".into());
    }
    for scheme in ["http://", "https://"] {
        if let Some(rest) = t.strip_prefix(scheme) {
            if rest.is_empty() {
                return Err(format!(
                    "{s:?} has no host: expected e.g. {scheme}127.0.0.1:7444"
                ));
            }
            return Ok(t.to_string());
        }
    }
    if t.contains("://") {
        return Err(format!(
            "{t}: unsupported scheme (use http://HOST:PORT, or https://HOST:PORT when the \
             admin API is not on loopback)"
        ));
    }
    Ok(format!("http://{t}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_lists() {
        let l = labels("app=db1,env=prod").unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l["app"], "db1");
        assert_eq!(l["env"], "prod");
        assert_eq!(labels(" a = b ").unwrap()["a"], "b");
        assert_eq!(labels("tier=").unwrap()["tier"], "");
    }

    #[test]
    fn bad_label_lists() {
        let e = labels("app").unwrap_err();
        assert!(e.contains("no '='"), "{e}");
        let e = labels("app=db1,").unwrap_err();
        assert!(e.contains("empty label"), "{e}");
        let e = labels("a=1,a=2").unwrap_err();
        assert!(e.contains("twice"), "{e}");
        let e = labels("=x").unwrap_err();
        assert!(e.contains("key must be 1-63"), "{e}");
        let e = labels("a b=c").unwrap_err();
        assert!(e.contains("only letters"), "{e}");
        assert!(labels("").is_err());
    }

    #[test]
    fn key_lists() {
        assert_eq!(label_keys("env, app,env").unwrap(), ["env", "app"]);
        assert!(label_keys("env=prod").unwrap_err().contains("only keys"));
        assert!(label_keys("a,,b").unwrap_err().contains("empty"));
        assert!(label_keys("a b").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(duration("30s").unwrap().as_secs(), 30);
        assert_eq!(duration("10m").unwrap().as_secs(), 600);
        assert_eq!(duration("1h").unwrap().as_secs(), 3600);
        assert_eq!(duration("7d").unwrap().as_secs(), 7 * 86_400);
        assert_eq!(duration("1h30m").unwrap().as_secs(), 5400);
    }

    #[test]
    fn bad_durations() {
        assert!(duration("10").unwrap_err().contains("no unit"));
        assert!(duration("1w").unwrap_err().contains("unknown unit"));
        assert!(duration("h").unwrap_err().contains("without a number"));
        assert!(duration("0s").unwrap_err().contains("longer than zero"));
        assert!(duration("").unwrap_err().contains("empty"));
        assert!(duration("-1h").is_err());
        assert!(duration("99999999999999999999d")
            .unwrap_err()
            .contains("too large"));
        assert!(duration("999999999999999999d")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn durations_format() {
        assert_eq!(format_duration(0), "0s");
        assert_eq!(format_duration(45), "45s");
        assert_eq!(format_duration(5400), "1h30m");
        assert_eq!(format_duration(7 * 86_400), "7d");
        assert_eq!(format_duration(2 * 86_400 + 3 * 3600 + 4 * 60 + 5), "2d3h");
    }

    #[test]
    fn probes() {
        assert_eq!(probe("tcp/1521").unwrap(), "tcp/1521");
        assert_eq!(probe(" icmp ").unwrap(), "icmp");
        assert_eq!(probe("udp/53").unwrap(), "udp/53");
        assert!(probe("tcp/1-2").unwrap_err().contains("single"));
        assert!(probe("any").unwrap_err().contains("single"));
        assert!(probe("tcp/99999").unwrap_err().contains("bad port"));
        assert!(probe("1521").unwrap_err().contains("unknown port spec"));
    }

    #[test]
    fn server_urls() {
        assert_eq!(
            server_url("127.0.0.1:7444").unwrap(),
            "http://127.0.0.1:7444"
        );
        assert_eq!(server_url("http://h:1/").unwrap(), "http://h:1");
        assert_eq!(server_url("https://h:1/").unwrap(), "https://h:1");
        assert_eq!(
            server_url(" https://198.18.0.1:7444 ").unwrap(),
            "https://198.18.0.1:7444"
        );
        assert!(server_url("https://").unwrap_err().contains("no host"));
        assert!(server_url("ftp://h")
            .unwrap_err()
            .contains("unsupported scheme"));
        assert!(server_url("  ").is_err());
        assert!(server_url("http://").is_err());
        assert!(server_url("http:///").is_err());
        assert_eq!(server_url("h:1//").unwrap(), "http://h:1");
    }
}
