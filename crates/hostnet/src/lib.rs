//! Host networking for meshd's transparent mode.
//!
//! In transparent mode applications keep talking to peers' *underlay* addresses and meshd
//! encrypts that traffic anyway. This crate installs what the host needs for that and removes
//! it again:
//!
//! - **Policy routing** (rtnetlink, IPv4 and IPv6), like wg-quick's full tunnel: a rule
//!   `not fwmark MARK lookup TABLE` at a fixed priority, and in TABLE one host route
//!   (/32, /128) per peer underlay address via the TUN, with the host's own underlay address as
//!   preferred source (so sockets bind the real address, not the overlay one). Unmarked traffic
//!   to a peer therefore enters the TUN with its real addresses; meshd's own sockets set
//!   `SO_MARK = MARK`, skip the rule and reach the peer directly.
//! - **An input guard** (nftables table `inet meshd_<ifname>`): on the covered TCP/UDP ports,
//!   only packets from `lo`, from the TUN, to meshd's tunnel port, or replies to connections
//!   this host opened are accepted. Other packets to covered ports (plaintext from the
//!   underlay) are recorded as `source . protocol . port` with a packet counter in a dynamic
//!   set and dropped; [`HostNet::take_blocked`] reads those counters for the block log.
//!   Uncovered ports are untouched.
//! - **Marks for strict reverse-path filtering**: packets to the tunnel port, and replies on
//!   marked connections (ct mark save/restore), carry MARK on input, and
//!   `net.ipv4.conf.all.src_valid_mark` is set to 1 (as wg-quick does; it is not reset on
//!   stop, because other tunnels may rely on it). With `rp_filter = 1` the reverse lookup of
//!   an encrypted packet from a peer would otherwise pick the TUN route and drop it.
//!
//! - **A guard that outlives meshd** (fail closed): next to each route into the TUN, an
//!   `unreachable` route to the same address at metric [`GUARD_METRIC`] in the same table, and
//!   in the nft table an output chain that drops unmarked TCP/UDP to a protected address
//!   leaving by any interface but the TUN. When meshd dies the kernel removes the TUN and its
//!   routes; the rule, the `unreachable` routes and the nft table stay, so traffic to a
//!   protected peer fails locally (EHOSTUNREACH) instead of leaving in plaintext, until meshd
//!   is back or the operator runs `meshd down`.
//!
//! Everything is keyed by the [`Config`]: the rules are those pointing at `table`, the routes
//! are those in `table`, the nft table is named after the interface. [`HostNet::start`]
//! reconciles what a crashed instance left: it keeps one rule per family, the `unreachable`
//! guards and the nft sets' contents (the table is re-created in one transaction that
//! carries them over), so a restart after SIGKILL leaves no duplicates and no unguarded
//! moment. Only [`HostNet::stop`] (a clean stop) or [`cleanup_stale`] (`meshd down`) delete
//! it. Dropping a [`HostNet`] without `stop` leaves the state installed (that is what a
//! crash does).
//!
//! The decisions (route diffs, port-range merging, counter deltas, the nft JSON documents)
//! are pure functions in [`plan`] and [`nft`]; the nft documents are applied with
//! `nft -j -f -`, each as one atomic transaction. Needs CAP_NET_ADMIN and the `nft` binary.

mod error;
pub mod nft;
pub mod plan;

pub use error::{ConfigError, Error, NetlinkOp, NftError, NftOp, RangeError, RouteError};

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt as _;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteScope, RouteType,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

/// Default firewall mark of meshd's own sockets ("MSH").
pub const DEFAULT_FWMARK: u32 = 0x004d_5348;
/// Default routing table for the routes into the TUN.
pub const DEFAULT_TABLE: u32 = 0x004d_5348;
/// Default priority of the `not fwmark lookup TABLE` rules (before main at 32766).
pub const DEFAULT_RULE_PRIORITY: u32 = 5200;
/// Metric of the `unreachable` guard routes: below every route into the TUN (metric 0), so
/// they decide only when the TUN's route is gone.
pub const GUARD_METRIC: u32 = 0x7fff_ffff;

/// What to install, and for which interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Index of the TUN device the routes point into.
    pub if_index: u32,
    /// Name of the TUN device (input accepted from it; names the nft table).
    pub if_name: String,
    /// Mark on meshd's own sockets (SO_MARK); marked traffic bypasses the TUN routes.
    pub fwmark: u32,
    /// Routing table for the routes into the TUN (owned by this instance).
    pub table: u32,
    /// Priority of the IPv4 and IPv6 rules.
    pub rule_priority: u32,
    /// meshd's bound UDP tunnel port (always accepted on input); not 0.
    pub listen_port: u16,
}

impl Config {
    /// A config with the default mark, table and priority.
    pub fn with_defaults(if_index: u32, if_name: impl Into<String>, listen_port: u16) -> Config {
        Config {
            if_index,
            if_name: if_name.into(),
            fwmark: DEFAULT_FWMARK,
            table: DEFAULT_TABLE,
            rule_priority: DEFAULT_RULE_PRIORITY,
            listen_port,
        }
    }

    /// Rejects values that would touch state that is not ours or cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.if_name.is_empty() || self.if_name.len() > 15 {
            return Err(ConfigError::InterfaceName(self.if_name.clone()));
        }
        if self.if_index == 0 {
            return Err(ConfigError::InterfaceIndex);
        }
        if self.fwmark == 0 {
            return Err(ConfigError::Fwmark);
        }
        // 0 unspec, 253 default, 254 main, 255 local.
        if matches!(self.table, 0 | 253..=255) {
            return Err(ConfigError::KernelTable(self.table));
        }
        if self.rule_priority == 0 || self.rule_priority >= 32766 {
            return Err(ConfigError::RulePriority(self.rule_priority));
        }
        if self.listen_port == 0 {
            return Err(ConfigError::ListenPort);
        }
        Ok(())
    }

    /// Name of the nft table, `meshd_<sanitised ifname>`.
    pub fn nft_table(&self) -> String {
        plan::nft_table_name(&self.if_name)
    }
}

/// A host route to a peer underlay address via the TUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    /// The peer's underlay address (a /32 or /128 route).
    pub dst: IpAddr,
    /// This host's own underlay address of the same family (RTA_PREFSRC).
    pub src: Option<IpAddr>,
}

/// Ports whose inbound traffic must come through the TUN: inclusive ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Covered {
    /// Covered TCP port ranges.
    pub tcp: Vec<(u16, u16)>,
    /// Covered UDP port ranges.
    pub udp: Vec<(u16, u16)>,
}

/// Transport protocol of a blocked packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// Plaintext packets dropped on a covered port since the previous [`HostNet::take_blocked`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocked {
    /// Source address of the dropped packets.
    pub src: IpAddr,
    /// Their protocol.
    pub proto: Proto,
    /// Their destination port.
    pub port: u16,
    /// How many were dropped since the previous call.
    pub packets: u64,
}

/// The installed host-networking state of one meshd instance.
///
/// Call order: [`HostNet::start`], then any number of [`HostNet::set_routes`],
/// [`HostNet::set_covered`] and [`HostNet::take_blocked`], then [`HostNet::stop`].
pub struct HostNet {
    cfg: Config,
    nft_table: String,
    handle: Handle,
    conn: tokio::task::JoinHandle<()>,
    /// Routes in `cfg.table` that this instance installed: destination → preferred source.
    installed: BTreeMap<IpAddr, Option<IpAddr>>,
    /// Destinations with an `unreachable` guard route in `cfg.table` (found at start or
    /// added since).
    guards: BTreeSet<IpAddr>,
    /// The nft protected sets' content (carried over at start, then kept equal to the
    /// destinations that have a route or a guard).
    protected: BTreeSet<IpAddr>,
    /// Blocked-set counters at the previous `take_blocked`.
    blocked_seen: HashMap<plan::BlockedKey, u64>,
}

impl fmt::Debug for HostNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostNet")
            .field("cfg", &self.cfg)
            .field("installed", &self.installed)
            .finish_non_exhaustive()
    }
}

/// Opens an rtnetlink connection whose task runs on the current tokio runtime.
fn connect() -> Result<(Handle, tokio::task::JoinHandle<()>), Error> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(Error::Connect)?;
    Ok((handle, tokio::spawn(conn)))
}

impl HostNet {
    /// Removes stale state of `cfg` (from a crash), then installs the IPv4 and IPv6 rules
    /// and the nft table with empty covered sets. Must run inside a tokio runtime.
    pub async fn start(cfg: Config) -> Result<HostNet, Error> {
        cfg.validate()?;
        let (handle, conn) = connect()?;
        let nft_table = cfg.nft_table();
        let mut me = HostNet {
            cfg,
            nft_table,
            handle,
            conn,
            installed: BTreeMap::new(),
            guards: BTreeSet::new(),
            protected: BTreeSet::new(),
            blocked_seen: HashMap::new(),
        };
        // A failed start leaves whatever guard was there: failing closed is the point.
        if let Err(e) = me.install().await {
            me.conn.abort();
            return Err(e);
        }
        Ok(me)
    }

    /// Reconciles what an earlier instance left (never removing a guard first) and installs
    /// what is missing.
    async fn install(&mut self) -> Result<(), Error> {
        // The nft table is re-created in one transaction carrying over the old sets, so
        // covered ports and protected addresses stay guarded across the restart.
        let kept = match nft::list_table(&self.nft_table).await {
            Ok(Some(listing)) => nft::parse_kept(&listing),
            Ok(None) => nft::Kept::default(),
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "reading the old nft table; starting with empty sets");
                nft::Kept::default()
            }
        };
        nft::apply(
            &nft::create_table(&self.nft_table, &self.cfg, &kept),
            NftOp::CreateTable,
        )
        .await?;
        self.guards = reconcile_routes(&self.handle, &self.cfg)
            .await
            .map_err(|e| Error::Reconcile(Box::new(e)))?;
        self.protected = kept.protected.iter().copied().collect();
        for v6 in [false, true] {
            ensure_rule(&self.handle, &self.cfg, v6).await?;
        }
        enable_src_valid_mark();
        Ok(())
    }

    /// Addresses guarded now: an `unreachable` route, or the nft output guard, or both.
    pub fn guarded(&self) -> Vec<IpAddr> {
        self.guards.union(&self.protected).copied().collect()
    }

    /// Makes the nft protected sets equal to `want` if they differ.
    async fn sync_protected(&mut self, want: BTreeSet<IpAddr>, op: NftOp) -> Result<(), Error> {
        if want == self.protected {
            return Ok(());
        }
        let all: Vec<IpAddr> = want.iter().copied().collect();
        nft::apply(&nft::set_protected(&self.nft_table, &all), op).await?;
        self.protected = want;
        Ok(())
    }

    /// The config this instance was started with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Makes the routes in the table equal to `routes`: adds new ones, replaces those whose
    /// source changed, deletes those no longer wanted. Every change is tried; the first
    /// failure is returned, and what did succeed is remembered.
    ///
    /// Every destination also gets a guard (an `unreachable` route at [`GUARD_METRIC`] and an
    /// element of the nft protected set) before its route into the TUN, and loses it only
    /// after that route is gone: at no point does a wanted destination lack both.
    pub async fn set_routes(&mut self, routes: &[Route]) -> Result<(), Error> {
        let wanted = plan::wanted_routes(routes)?;
        let diff = plan::diff_routes(&self.installed, &wanted);
        let mut first_err: Option<Error> = None;
        // Guards first: the nft set, then an unreachable route per new destination.
        if !wanted.keys().all(|d| self.protected.contains(d)) {
            let more = self
                .protected
                .iter()
                .chain(wanted.keys())
                .copied()
                .collect();
            self.sync_protected(more, NftOp::AddProtected).await?;
        }
        let new_guards: Vec<IpAddr> = wanted
            .keys()
            .filter(|d| !self.guards.contains(d))
            .copied()
            .collect();
        for dst in new_guards {
            let msg = guard_message(&self.cfg, dst);
            match self.handle.route().add(msg).replace().execute().await {
                Ok(()) => {
                    self.guards.insert(dst);
                }
                Err(source) => {
                    first_err.get_or_insert(Error::Netlink {
                        op: NetlinkOp::AddGuard(dst),
                        source,
                    });
                }
            }
        }
        for dst in diff.remove {
            let src = self.installed.get(&dst).copied().flatten();
            let msg = route_message(&self.cfg, Route { dst, src });
            match self.handle.route().del(msg).execute().await {
                Ok(()) => {
                    self.installed.remove(&dst);
                }
                Err(e) if is_errno(&e, libc_esrch()) => {
                    // Already gone (someone deleted it, or the TUN went down): fine.
                    self.installed.remove(&dst);
                }
                Err(source) => {
                    first_err.get_or_insert(Error::Netlink {
                        op: NetlinkOp::DeleteRoute(dst),
                        source,
                    });
                }
            }
        }
        for r in diff.upsert {
            let msg = route_message(&self.cfg, r);
            if !self.guards.contains(&r.dst) {
                // Its guard could not be installed: do not route it without one.
                continue;
            }
            match self.handle.route().add(msg).replace().execute().await {
                Ok(()) => {
                    self.installed.insert(r.dst, r.src);
                }
                Err(source) => {
                    let op = NetlinkOp::AddRoute {
                        dst: r.dst,
                        src: r.src,
                        table: self.cfg.table,
                    };
                    first_err.get_or_insert(Error::Netlink { op, source });
                }
            }
        }
        // Guards of destinations no longer wanted, once their route into the TUN is gone.
        let old_guards: Vec<IpAddr> = self
            .guards
            .iter()
            .filter(|d| !wanted.contains_key(d) && !self.installed.contains_key(d))
            .copied()
            .collect();
        for dst in old_guards {
            let msg = guard_message(&self.cfg, dst);
            match self.handle.route().del(msg).execute().await {
                Ok(()) => {
                    self.guards.remove(&dst);
                }
                Err(e) if is_errno(&e, libc_esrch()) => {
                    self.guards.remove(&dst);
                }
                Err(source) => {
                    first_err.get_or_insert(Error::Netlink {
                        op: NetlinkOp::DeleteGuard(dst),
                        source,
                    });
                }
            }
        }
        let keep = wanted
            .keys()
            .chain(self.installed.keys())
            .chain(self.guards.iter())
            .copied()
            .collect();
        if let Err(e) = self.sync_protected(keep, NftOp::RemoveProtected).await {
            first_err.get_or_insert(e);
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The routes currently installed by this instance.
    pub fn routes(&self) -> Vec<Route> {
        self.installed
            .iter()
            .map(|(&dst, &src)| Route { dst, src })
            .collect()
    }

    /// Replaces the covered ports in one nft transaction (both sets flushed and refilled;
    /// established tunnel traffic is never affected). Overlapping ranges are merged.
    pub async fn set_covered(&mut self, covered: &Covered) -> Result<(), Error> {
        let ports = |proto, ranges: &[(u16, u16)]| {
            plan::normalize_ranges(ranges).map_err(|source| Error::Ports { proto, source })
        };
        let normal = Covered {
            tcp: ports(Proto::Tcp, &covered.tcp)?,
            udp: ports(Proto::Udp, &covered.udp)?,
        };
        nft::apply(
            &nft::set_covered(&self.nft_table, &normal),
            NftOp::SetCovered,
        )
        .await?;
        Ok(())
    }

    /// Plaintext packets dropped on covered ports since the previous call, per source,
    /// protocol and port. Records expire after [`nft::BLOCKED_TIMEOUT_S`] without hits, so
    /// call this more often than that.
    pub async fn take_blocked(&mut self) -> Result<Vec<Blocked>, Error> {
        let listing = nft::list_table(&self.nft_table)
            .await?
            .ok_or_else(|| Error::TableGone {
                table: self.nft_table.clone(),
            })?;
        let now = nft::parse_blocked(&listing)?;
        Ok(plan::blocked_increase(&mut self.blocked_seen, now))
    }

    /// Removes the rules, the routes in the table (guards too) and the nft table: after a
    /// clean stop traffic to the peers flows as it did before meshd.
    pub async fn stop(mut self) -> Result<(), Error> {
        let res = remove_all(&self.handle, &self.cfg).await;
        self.installed.clear();
        self.guards.clear();
        self.protected.clear();
        self.conn.abort();
        res
    }
}

impl Drop for HostNet {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

/// Removes whatever an instance with `cfg` may have left behind (rules pointing at the
/// table, routes in the table, the nft table). Idempotent; needs a tokio runtime.
pub async fn cleanup_stale(cfg: &Config) -> Result<(), Error> {
    cfg.validate()?;
    let (handle, conn) = connect()?;
    let res = remove_all(&handle, cfg).await;
    conn.abort();
    res
}

/// What `meshd down` runs: removes everything an instance on interface `if_name` with
/// routing table `table` installed (the rules pointing at the table, every route in it, the
/// guards too, and the nft tables), whether or not its TUN still exists. Idempotent; needs a
/// tokio runtime.
pub async fn remove(if_name: &str, table: u32) -> Result<(), Error> {
    // Only the name and the table matter for removal; the rest just has to validate.
    let cfg = Config {
        table,
        ..Config::with_defaults(u32::MAX, if_name, u16::MAX)
    };
    cleanup_stale(&cfg).await
}

/// Deletes rules, routes and the nft table of `cfg`; tries all three, returns the first error.
async fn remove_all(handle: &Handle, cfg: &Config) -> Result<(), Error> {
    let mut errors = Vec::new();
    if let Err(e) = remove_rules(handle, cfg).await {
        errors.push(e);
    }
    if let Err(e) = remove_routes(handle, cfg).await {
        errors.push(e);
    }
    if let Err(e) = nft::apply(&nft::delete_table(&cfg.nft_table()), NftOp::DeleteTable).await {
        errors.push(e.into());
    }
    match errors.into_iter().next() {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

/// Table of a rule: the FRA_TABLE attribute if present, else the header byte.
pub fn rule_table(rule: &RuleMessage) -> u32 {
    rule.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(rule.header.table))
}

/// Table of a route: the RTA_TABLE attribute if present, else the header byte.
pub fn route_table(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table))
}

/// All rules of one family.
pub async fn dump_rules(handle: &Handle, v6: bool) -> Result<Vec<RuleMessage>, Error> {
    let ver = if v6 { IpVersion::V6 } else { IpVersion::V4 };
    handle
        .rule()
        .get(ver)
        .execute()
        .try_collect()
        .await
        .map_err(|source| Error::Netlink {
            op: NetlinkOp::DumpRules,
            source,
        })
}

/// All routes of one family, in every table.
pub async fn dump_routes(handle: &Handle, v6: bool) -> Result<Vec<RouteMessage>, Error> {
    let msg = if v6 {
        RouteMessageBuilder::<Ipv6Addr>::new().build()
    } else {
        RouteMessageBuilder::<Ipv4Addr>::new().build()
    };
    handle
        .route()
        .get(msg)
        .execute()
        .try_collect()
        .await
        .map_err(|source| Error::Netlink {
            op: NetlinkOp::DumpRoutes,
            source,
        })
}

/// Deletes a dumped rule; one already gone is fine.
async fn del_rule(handle: &Handle, rule: RuleMessage) -> Result<(), Error> {
    match handle.rule().del(rule).execute().await {
        Ok(()) => Ok(()),
        Err(e) if is_errno(&e, libc_enoent()) => Ok(()),
        Err(source) => Err(Error::Netlink {
            op: NetlinkOp::DeleteStaleRule,
            source,
        }),
    }
}

/// Deletes a dumped route; one already gone is fine.
async fn del_route(handle: &Handle, route: RouteMessage) -> Result<(), Error> {
    match handle.route().del(route).execute().await {
        Ok(()) => Ok(()),
        Err(e) if is_errno(&e, libc_esrch()) => Ok(()),
        Err(source) => Err(Error::Netlink {
            op: NetlinkOp::DeleteStaleRoute,
            source,
        }),
    }
}

async fn remove_rules(handle: &Handle, cfg: &Config) -> Result<(), Error> {
    for v6 in [false, true] {
        for rule in dump_rules(handle, v6).await? {
            if rule_table(&rule) != cfg.table {
                continue;
            }
            del_rule(handle, rule).await?;
        }
    }
    Ok(())
}

async fn remove_routes(handle: &Handle, cfg: &Config) -> Result<(), Error> {
    for v6 in [false, true] {
        for route in dump_routes(handle, v6).await? {
            if route_table(&route) != cfg.table {
                continue;
            }
            del_route(handle, route).await?;
        }
    }
    Ok(())
}

/// True for an `unreachable` route (a guard).
fn is_guard(route: &RouteMessage) -> bool {
    route.header.kind == RouteType::Unreachable
}

/// At start: deletes routes in the table other than guards (routes into an earlier TUN are
/// gone with it; anything else is not ours) and returns the guarded destinations.
async fn reconcile_routes(handle: &Handle, cfg: &Config) -> Result<BTreeSet<IpAddr>, Error> {
    let mut guards = BTreeSet::new();
    for v6 in [false, true] {
        for route in dump_routes(handle, v6).await? {
            if route_table(&route) != cfg.table {
                continue;
            }
            if is_guard(&route) {
                if let Some(dst) = route_destination(&route) {
                    guards.insert(dst);
                }
                continue;
            }
            del_route(handle, route).await?;
        }
    }
    Ok(guards)
}

/// The destination of a host route (/32 or /128), if it is one.
fn route_destination(route: &RouteMessage) -> Option<IpAddr> {
    let full = route.header.destination_prefix_length;
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(a)) if full == 32 => Some(IpAddr::V4(*a)),
        RouteAttribute::Destination(RouteAddress::Inet6(a)) if full == 128 => Some(IpAddr::V6(*a)),
        _ => None,
    })
}

/// True if `rule` is exactly the rule [`add_rule`] installs for `cfg`.
fn is_our_rule(rule: &RuleMessage, cfg: &Config) -> bool {
    let attr = |want: &RuleAttribute| rule.attributes.contains(want);
    rule.header.flags.contains(RuleFlags::Invert)
        && rule.header.action == RuleAction::ToTable
        && attr(&RuleAttribute::Priority(cfg.rule_priority))
        && attr(&RuleAttribute::FwMark(cfg.fwmark))
}

/// Leaves exactly one `not fwmark MARK lookup TABLE` rule for the family: adds it if
/// missing, then deletes any other rule pointing at the table (duplicates, or a different
/// priority or mark from an older config). Never a moment without the rule.
async fn ensure_rule(handle: &Handle, cfg: &Config, v6: bool) -> Result<(), Error> {
    let rules: Vec<RuleMessage> = dump_rules(handle, v6)
        .await?
        .into_iter()
        .filter(|r| rule_table(r) == cfg.table)
        .collect();
    let keep = rules.iter().position(|r| is_our_rule(r, cfg));
    if keep.is_none() {
        add_rule(handle, cfg, v6).await?;
    }
    for (i, rule) in rules.into_iter().enumerate() {
        if Some(i) == keep {
            continue;
        }
        del_rule(handle, rule).await?;
    }
    Ok(())
}

/// The netlink message for the `unreachable` guard route to `dst` in the table.
fn guard_message(cfg: &Config, dst: IpAddr) -> RouteMessage {
    let mut msg = match dst {
        IpAddr::V4(dst) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, 32)
            .table_id(cfg.table)
            .kind(RouteType::Unreachable)
            .scope(RouteScope::Universe)
            .priority(GUARD_METRIC)
            .build(),
        IpAddr::V6(dst) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(dst, 128)
            .table_id(cfg.table)
            .kind(RouteType::Unreachable)
            .scope(RouteScope::Universe)
            .priority(GUARD_METRIC)
            .build(),
    };
    if cfg.table > 255 {
        msg.header.table = RouteHeader::RT_TABLE_UNSPEC;
    }
    msg
}

/// `not fwmark MARK lookup TABLE` at the configured priority, for one family.
async fn add_rule(handle: &Handle, cfg: &Config, v6: bool) -> Result<(), Error> {
    let base = handle
        .rule()
        .add()
        .table_id(cfg.table)
        .priority(cfg.rule_priority)
        .fw_mark(cfg.fwmark)
        .action(RuleAction::ToTable);
    let res = if v6 {
        let mut req = base.v6();
        req.message_mut().header.flags |= RuleFlags::Invert;
        req.execute().await
    } else {
        let mut req = base.v4();
        req.message_mut().header.flags |= RuleFlags::Invert;
        req.execute().await
    };
    res.map_err(|source| Error::Netlink {
        op: NetlinkOp::AddRule {
            v6,
            fwmark: cfg.fwmark,
            table: cfg.table,
            priority: cfg.rule_priority,
        },
        source,
    })
}

/// The netlink message for a host route to `r.dst` via the TUN in the table.
fn route_message(cfg: &Config, r: Route) -> RouteMessage {
    let mut msg = match (r.dst, r.src) {
        (IpAddr::V4(dst), src) => {
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(dst, 32);
            if let Some(IpAddr::V4(s)) = src {
                b = b.pref_source(s);
            }
            b.output_interface(cfg.if_index)
                .table_id(cfg.table)
                .scope(RouteScope::Link)
                .build()
        }
        (IpAddr::V6(dst), src) => {
            let mut b = RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(dst, 128);
            if let Some(IpAddr::V6(s)) = src {
                b = b.pref_source(s);
            }
            b.output_interface(cfg.if_index)
                .table_id(cfg.table)
                .scope(RouteScope::Link)
                .build()
        }
    };
    if cfg.table > 255 {
        msg.header.table = RouteHeader::RT_TABLE_UNSPEC;
    }
    msg
}

/// The preferred source of a dumped route, if any.
pub fn route_pref_source(route: &RouteMessage) -> Option<IpAddr> {
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::PrefSource(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        RouteAttribute::PrefSource(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    })
}

/// True if `e` is a netlink error with this (positive) errno.
fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.is_some_and(|c| c.get().abs() == errno),
        _ => false,
    }
}

/// ENOENT: a rule to delete is already gone.
const fn libc_enoent() -> i32 {
    2
}

/// ESRCH: a route to delete is already gone.
const fn libc_esrch() -> i32 {
    3
}

/// `e` and its sources, `: `-separated (as anyhow's `{:#}` prints a chain), for a log line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// Sets `net.ipv4.conf.all.src_valid_mark = 1` if it is 0 (see the crate docs); a failure
/// is only logged, since it matters only with strict reverse-path filtering.
fn enable_src_valid_mark() {
    const PATH: &str = "/proc/sys/net/ipv4/conf/all/src_valid_mark";
    match std::fs::read_to_string(PATH) {
        Ok(v) if v.trim() == "0" => {
            if let Err(e) = std::fs::write(PATH, "1") {
                tracing::warn!(error = %e, "could not set {PATH} = 1; strict rp_filter may drop tunnel packets");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not read {PATH}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation() {
        let good = Config::with_defaults(3, "mesh0", 51820);
        good.validate().unwrap();
        for (bad, why) in [
            (
                Config {
                    fwmark: 0,
                    ..good.clone()
                },
                ConfigError::Fwmark,
            ),
            (
                Config {
                    table: 254,
                    ..good.clone()
                },
                ConfigError::KernelTable(254),
            ),
            (
                Config {
                    listen_port: 0,
                    ..good.clone()
                },
                ConfigError::ListenPort,
            ),
            (
                Config {
                    if_name: "a-very-long-interface".into(),
                    ..good.clone()
                },
                ConfigError::InterfaceName("a-very-long-interface".into()),
            ),
            (
                Config {
                    rule_priority: 32766,
                    ..good.clone()
                },
                ConfigError::RulePriority(32766),
            ),
            (
                Config {
                    if_index: 0,
                    ..good.clone()
                },
                ConfigError::InterfaceIndex,
            ),
        ] {
            assert_eq!(bad.validate(), Err(why), "{bad:?}");
        }
        assert_eq!(good.nft_table(), "meshd_mesh0");
    }

    #[test]
    fn route_messages_carry_table_oif_and_source() {
        let cfg = Config::with_defaults(9, "mesh0", 51820);
        let msg = route_message(
            &cfg,
            Route {
                dst: "198.18.0.2".parse().unwrap(),
                src: Some("198.18.0.1".parse().unwrap()),
            },
        );
        assert_eq!(route_table(&msg), DEFAULT_TABLE);
        assert_eq!(msg.header.destination_prefix_length, 32);
        assert!(msg.attributes.contains(&RouteAttribute::Oif(9)));
        assert_eq!(route_pref_source(&msg), Some("198.18.0.1".parse().unwrap()));
        let msg6 = route_message(
            &cfg,
            Route {
                dst: "fd00:1::2".parse().unwrap(),
                src: None,
            },
        );
        assert_eq!(msg6.header.destination_prefix_length, 128);
        assert_eq!(route_pref_source(&msg6), None);
    }
}
