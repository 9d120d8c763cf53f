//! Port specs (`tcp/N`, `tcp/N-M`, `udp/N`, `udp/N-M`, `icmp`, `other`, `any`) and probes (one protocol
//! and port, as used by tests and `explain`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::grant::{ip_proto, Grant, Proto, UnixTime};

/// A protocol with an inclusive destination port range, as written in a rule's `ports`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortSpec {
    /// Protocol.
    pub proto: Proto,
    /// First port (0 for `icmp` and `any`).
    pub lo: u16,
    /// Last port, inclusive (0 for `icmp`, 65535 for `any`).
    pub hi: u16,
}

/// Why a port spec does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortSpecError {
    /// Not `tcp/…`, `udp/…`, `icmp` or `any`.
    #[error("unknown port spec `{0}`: expected tcp/N, tcp/N-M, udp/N, udp/N-M, icmp or any")]
    Unknown(String),
    /// The port is not a number in 0..=65535.
    #[error("bad port `{0}`: expected a number from 0 to 65535")]
    BadPort(String),
    /// `N-M` with N > M.
    #[error("empty port range {0}-{1}: the first port is above the last")]
    EmptyRange(u16, u16),
    /// A probe needs one port, not a range, and not `any`.
    #[error("`{0}` is not a single protocol and port (expected tcp/N, udp/N or icmp)")]
    NotSingle(String),
}

impl PortSpec {
    /// `any`.
    pub const ANY: PortSpec = PortSpec {
        proto: Proto::Any,
        lo: 0,
        hi: u16::MAX,
    };

    /// The grant this spec gives under `rule`.
    pub fn grant(&self, rule: &str, expires_at: Option<UnixTime>) -> Grant {
        Grant {
            proto: self.proto,
            ports: (self.lo, self.hi),
            expires_at,
            rule: rule.to_string(),
        }
    }

    /// The spec a grant was made from.
    pub fn of_grant(g: &Grant) -> PortSpec {
        PortSpec {
            proto: g.proto,
            lo: g.ports.0,
            hi: g.ports.1,
        }
    }

    /// True if a flow matching `probe` is within this spec.
    pub fn admits(&self, probe: Probe) -> bool {
        self.grant("", None).admits(probe.ip_proto, probe.port, 0)
    }
}

impl FromStr for PortSpec {
    type Err = PortSpecError;

    fn from_str(s: &str) -> Result<PortSpec, PortSpecError> {
        let t = s.trim();
        match t {
            "any" => return Ok(PortSpec::ANY),
            "icmp" => {
                return Ok(PortSpec {
                    proto: Proto::Icmp,
                    lo: 0,
                    hi: 0,
                })
            }
            "other" => {
                return Ok(PortSpec {
                    proto: Proto::Other,
                    lo: 0,
                    hi: 0,
                })
            }
            _ => {}
        }
        let (proto, rest) = if let Some(r) = t.strip_prefix("tcp/") {
            (Proto::Tcp, r)
        } else if let Some(r) = t.strip_prefix("udp/") {
            (Proto::Udp, r)
        } else {
            return Err(PortSpecError::Unknown(s.to_string()));
        };
        let port = |p: &str| {
            p.parse::<u16>()
                .map_err(|_| PortSpecError::BadPort(p.to_string()))
        };
        let (lo, hi) = match rest.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => {
                let p = port(rest)?;
                (p, p)
            }
        };
        if lo > hi {
            return Err(PortSpecError::EmptyRange(lo, hi));
        }
        Ok(PortSpec { proto, lo, hi })
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.proto {
            Proto::Any => return f.write_str("any"),
            Proto::Icmp => return f.write_str("icmp"),
            Proto::Other => return f.write_str("other"),
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        if self.lo == self.hi {
            write!(f, "{name}/{}", self.lo)
        } else {
            write!(f, "{name}/{}-{}", self.lo, self.hi)
        }
    }
}

impl Serialize for PortSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Deserializes a string through `FromStr`, raising the error inside the visitor so the YAML
/// deserializer attaches the value's own line and column.
pub(crate) struct ParseVisitor<T>(pub std::marker::PhantomData<T>, pub &'static str);

impl<T: FromStr> serde::de::Visitor<'_> for ParseVisitor<T>
where
    T::Err: fmt::Display,
{
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.1)
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
        v.parse().map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for PortSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<PortSpec, D::Error> {
        d.deserialize_str(ParseVisitor(
            std::marker::PhantomData,
            "a port spec such as tcp/443",
        ))
    }
}

/// One connection attempt: IP protocol number and destination port (0 for ICMP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Probe {
    /// IP protocol number ([`ip_proto`]).
    pub ip_proto: u8,
    /// Destination port.
    pub port: u16,
}

impl FromStr for Probe {
    type Err = PortSpecError;

    fn from_str(s: &str) -> Result<Probe, PortSpecError> {
        let spec: PortSpec = s.parse()?;
        match spec.proto {
            Proto::Icmp => Ok(Probe {
                ip_proto: ip_proto::ICMP,
                port: 0,
            }),
            Proto::Tcp | Proto::Udp if spec.lo == spec.hi => Ok(Probe {
                ip_proto: if spec.proto == Proto::Tcp {
                    ip_proto::TCP
                } else {
                    ip_proto::UDP
                },
                port: spec.lo,
            }),
            _ => Err(PortSpecError::NotSingle(s.to_string())),
        }
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip_proto {
            ip_proto::TCP => write!(f, "tcp/{}", self.port),
            ip_proto::UDP => write!(f, "udp/{}", self.port),
            ip_proto::ICMP | ip_proto::ICMPV6 => f.write_str("icmp"),
            p => write!(f, "proto {p}/{}", self.port),
        }
    }
}

impl Serialize for Probe {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Probe {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Probe, D::Error> {
        d.deserialize_str(ParseVisitor(
            std::marker::PhantomData,
            "a port such as tcp/443",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display() {
        for s in [
            "tcp/1521",
            "tcp/8000-8080",
            "udp/53",
            "udp/0-65535",
            "icmp",
            "other",
            "any",
        ] {
            let p: PortSpec = s.parse().unwrap();
            assert_eq!(p.to_string(), s);
        }
        assert_eq!(
            "tcp/1521".parse::<PortSpec>().unwrap(),
            PortSpec {
                proto: Proto::Tcp,
                lo: 1521,
                hi: 1521
            }
        );
        assert!(matches!(
            "sctp/1".parse::<PortSpec>(),
            Err(PortSpecError::Unknown(_))
        ));
        assert!(matches!(
            "tcp/70000".parse::<PortSpec>(),
            Err(PortSpecError::BadPort(_))
        ));
        assert!(matches!(
            "tcp/".parse::<PortSpec>(),
            Err(PortSpecError::BadPort(_))
        ));
        assert!(matches!(
            "tcp/9-1".parse::<PortSpec>(),
            Err(PortSpecError::EmptyRange(9, 1))
        ));
        assert!(matches!(
            "tcp".parse::<PortSpec>(),
            Err(PortSpecError::Unknown(_))
        ));
    }

    #[test]
    fn admits() {
        let r: PortSpec = "tcp/10-20".parse().unwrap();
        let p = |s: &str| s.parse::<Probe>().unwrap();
        assert!(r.admits(p("tcp/10")) && r.admits(p("tcp/20")));
        assert!(!r.admits(p("tcp/21")) && !r.admits(p("udp/15")) && !r.admits(p("icmp")));
        assert!(PortSpec::ANY.admits(p("udp/1")) && PortSpec::ANY.admits(p("icmp")));
        let icmp: PortSpec = "icmp".parse().unwrap();
        assert!(icmp.admits(p("icmp")) && !icmp.admits(p("tcp/1")));
        assert!(matches!(
            "tcp/1-2".parse::<Probe>(),
            Err(PortSpecError::NotSingle(_))
        ));
        assert!(matches!(
            "any".parse::<Probe>(),
            Err(PortSpecError::NotSingle(_))
        ));
        assert_eq!(p("udp/53").to_string(), "udp/53");
    }
}
