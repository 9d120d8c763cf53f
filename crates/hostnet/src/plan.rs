//! Pure decisions: which routes to add, replace or remove; how covered port ranges are
//! normalised; how blocked-packet counters turn into per-call increases. No IO here.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use crate::error::{RangeError, RouteError};
use crate::{Blocked, Proto, Route};

/// What [`diff_routes`] decided: routes to delete, and routes to add or replace.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
#[must_use]
pub struct RouteDiff {
    /// Destinations whose route goes away.
    pub remove: Vec<IpAddr>,
    /// New routes, and routes whose preferred source changed (installed with replace).
    pub upsert: Vec<Route>,
}

impl RouteDiff {
    /// True if nothing needs doing.
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.upsert.is_empty()
    }
}

/// Checks `wanted` (address families agree, no destination twice with different sources)
/// and returns it as a map destination → preferred source.
pub fn wanted_routes(wanted: &[Route]) -> Result<BTreeMap<IpAddr, Option<IpAddr>>, RouteError> {
    let mut out = BTreeMap::new();
    for r in wanted {
        if let Some(src) = r.src {
            if src.is_ipv4() != r.dst.is_ipv4() {
                return Err(RouteError::FamilyMismatch { dst: r.dst, src });
            }
        }
        if let Some(prev) = out.insert(r.dst, r.src) {
            if prev != r.src {
                return Err(RouteError::Conflict(r.dst));
            }
        }
    }
    Ok(out)
}

/// The changes that turn `installed` into `wanted`.
pub fn diff_routes(
    installed: &BTreeMap<IpAddr, Option<IpAddr>>,
    wanted: &BTreeMap<IpAddr, Option<IpAddr>>,
) -> RouteDiff {
    let remove = installed
        .keys()
        .filter(|d| !wanted.contains_key(d))
        .copied()
        .collect();
    let upsert = wanted
        .iter()
        .filter(|(d, s)| installed.get(d) != Some(s))
        .map(|(&dst, &src)| Route { dst, src })
        .collect();
    RouteDiff { remove, upsert }
}

/// Sorts inclusive port ranges and merges overlapping or adjacent ones (nft rejects
/// overlapping intervals in one set). Fails on a range whose start is above its end.
pub fn normalize_ranges(ranges: &[(u16, u16)]) -> Result<Vec<(u16, u16)>, RangeError> {
    let mut sorted = ranges.to_vec();
    if let Some(&(lo, hi)) = sorted.iter().find(|(lo, hi)| lo > hi) {
        return Err(RangeError { lo, hi });
    }
    sorted.sort_unstable();
    let mut out: Vec<(u16, u16)> = Vec::with_capacity(sorted.len());
    for (lo, hi) in sorted {
        match out.last_mut() {
            Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    Ok(out)
}

/// Key of one blocked-traffic record: source address, protocol, destination port.
pub type BlockedKey = (IpAddr, Proto, u16);

/// Turns the current per-element packet counters into increases since `prev`, and makes
/// `prev` the current snapshot. An element whose counter went down was expired and
/// re-created by the kernel since the last call, so all of its packets are new.
pub fn blocked_increase(
    prev: &mut HashMap<BlockedKey, u64>,
    now: HashMap<BlockedKey, u64>,
) -> Vec<Blocked> {
    let mut out: Vec<Blocked> = now
        .iter()
        .filter_map(|(&(src, proto, port), &cur)| {
            let before = prev.get(&(src, proto, port)).copied().unwrap_or(0);
            let packets = if cur >= before { cur - before } else { cur };
            (packets > 0).then_some(Blocked {
                src,
                proto,
                port,
                packets,
            })
        })
        .collect();
    out.sort_by_key(|b| (b.src, b.proto, b.port));
    *prev = now;
    out
}

/// `meshd_<ifname>` with every character outside `[A-Za-z0-9_]` replaced by `_`
/// (interface names may hold `-`, `.` and more; nft identifiers may not).
pub fn nft_table_name(if_name: &str) -> String {
    let clean: String = if_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("meshd_{clean}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 18, 0, d))
    }

    #[test]
    fn diff_adds_removes_and_replaces_exactly_the_difference() {
        let installed: BTreeMap<_, _> = [(v4(2), Some(v4(1))), (v4(3), None), (v4(4), None)]
            .into_iter()
            .collect();
        let wanted: BTreeMap<_, _> = [(v4(2), Some(v4(1))), (v4(3), Some(v4(1))), (v4(5), None)]
            .into_iter()
            .collect();
        let d = diff_routes(&installed, &wanted);
        assert_eq!(d.remove, vec![v4(4)]);
        assert_eq!(
            d.upsert,
            vec![
                Route {
                    dst: v4(3),
                    src: Some(v4(1))
                },
                Route {
                    dst: v4(5),
                    src: None
                }
            ]
        );
        assert!(diff_routes(&wanted, &wanted).is_empty());
    }

    #[test]
    fn wanted_routes_rejects_mixed_families_and_conflicts() {
        let six = IpAddr::V6(Ipv6Addr::LOCALHOST);
        assert_eq!(
            wanted_routes(&[Route {
                dst: v4(2),
                src: Some(six)
            }]),
            Err(RouteError::FamilyMismatch {
                dst: v4(2),
                src: six
            })
        );
        let r = Route {
            dst: v4(2),
            src: Some(v4(1)),
        };
        assert_eq!(
            wanted_routes(&[
                r,
                Route {
                    dst: v4(2),
                    src: None
                }
            ]),
            Err(RouteError::Conflict(v4(2)))
        );
        assert_eq!(wanted_routes(&[r, r]).unwrap().len(), 1);
    }

    #[test]
    fn ranges_merge() {
        assert_eq!(
            normalize_ranges(&[(10, 20), (5, 9), (30, 30), (15, 25), (65535, 65535)]).unwrap(),
            vec![(5, 25), (30, 30), (65535, 65535)]
        );
        assert_eq!(
            normalize_ranges(&[(1, 1), (2, 1)]),
            Err(RangeError { lo: 2, hi: 1 })
        );
        assert_eq!(normalize_ranges(&[]).unwrap(), vec![]);
        assert_eq!(
            normalize_ranges(&[(0, 65535), (1, 2)]).unwrap(),
            vec![(0, 65535)]
        );
    }

    proptest! {
        #[test]
        fn ranges_cover_the_same_ports_disjointly(
            raw in proptest::collection::vec((0u16..300, 0u16..20), 0..12)
        ) {
            let ranges: Vec<(u16, u16)> = raw.iter().map(|&(lo, w)| (lo, lo + w)).collect();
            let merged = normalize_ranges(&ranges).unwrap();
            for p in 0u16..330 {
                let naive = ranges.iter().any(|&(lo, hi)| lo <= p && p <= hi);
                let got = merged.iter().filter(|&&(lo, hi)| lo <= p && p <= hi).count();
                prop_assert_eq!(got, usize::from(naive));
            }
            for w in merged.windows(2) {
                prop_assert!(u32::from(w[0].1) + 1 < u32::from(w[1].0));
            }
        }
    }

    #[test]
    fn blocked_counts_increase_and_survive_reexpiry() {
        let k = (v4(1), Proto::Tcp, 5005);
        let k2 = (v4(7), Proto::Udp, 53);
        let mut prev = HashMap::new();
        let got = blocked_increase(&mut prev, [(k, 3)].into_iter().collect());
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].packets, 3);
        // No change: nothing reported.
        assert!(blocked_increase(&mut prev, [(k, 3)].into_iter().collect()).is_empty());
        // Grew by 2; a new key appears.
        let got = blocked_increase(&mut prev, [(k, 5), (k2, 1)].into_iter().collect());
        assert_eq!(
            got.iter().map(|b| (b.src, b.packets)).collect::<Vec<_>>(),
            vec![(v4(1), 2), (v4(7), 1)]
        );
        // Expired and re-created with a smaller counter: all of it is new.
        let got = blocked_increase(&mut prev, [(k, 1)].into_iter().collect());
        assert_eq!(got[0].packets, 1);
        assert_eq!(prev.len(), 1);
    }

    #[test]
    fn table_names_are_sanitised() {
        assert_eq!(nft_table_name("mesh0"), "meshd_mesh0");
        assert_eq!(nft_table_name("m-1.x\"; drop"), "meshd_m_1_x___drop");
    }
}
