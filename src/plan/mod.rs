//! The isolation plan: a pure function from validated inputs to the set
//! elements and per-pair exceptions the ruleset is made of. `rules` turns a
//! plan into the ordered list of chains and rules that both the renderer
//! (`render`) writes and the evaluator (`eval`) walks, so "what the kernel
//! runs" and "what the tests check" are one list.
//!
//! Per-packet cost stays a handful of hash lookups whatever the number of
//! domains and policies: a packet between two domains takes one lookup in
//! the `iifname . oifname` verdict map, and only a pair that some policy
//! opens jumps to a chain holding that pair's own (small) exceptions. A rule
//! per bridge pair is O(N^2) rules (measured at 7.4 s to load and 63 new
//! connections/s at 500 bridges); one interval set of every policy's ports
//! costs every packet a lookup that grows with the number of policies.

pub mod eval;
pub mod expand;
pub mod machines;
pub mod profile;
pub mod report;
pub mod router;
pub mod rules;

use crate::model::{
    merge_spans, BridgePattern, DomainBridge, DomainSettings, GatewayServices, IfName, Internet,
    LogSettings, Name, PortSpan, Protocol, ResolvedPolicy, TableName, Traffic,
};
use anyhow::{bail, ensure};
use expand::{End, Flow, Scope, Side};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};

/// What the kernel can do where the ruleset will be loaded, probed by the
/// runner. A missing capability removes a feature with a warning rather than
/// failing the render.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Capabilities {
    pub log: bool,
    pub limit: bool,
    pub conntrack: bool,
}

impl Capabilities {
    pub const ALL: Capabilities = Capabilities {
        log: true,
        limit: true,
        conntrack: true,
    };
}

/// Ports of TCP and UDP. Spans are merged when the plan is built: nft
/// refuses overlapping interval elements ("File exists").
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct PortSet(BTreeSet<(Protocol, PortSpan)>);

impl PortSet {
    pub fn add(&mut self, proto: Protocol, spans: &BTreeSet<PortSpan>) {
        self.0.extend(spans.iter().map(|s| (proto, *s)));
    }

    fn normalize(&mut self) {
        let mut merged = BTreeSet::new();
        for proto in [Protocol::Tcp, Protocol::Udp] {
            let spans: Vec<PortSpan> = self
                .0
                .iter()
                .filter(|(p, _)| *p == proto)
                .map(|(_, s)| *s)
                .collect();
            merged.extend(merge_spans(&spans).into_iter().map(|s| (proto, s)));
        }
        self.0 = merged;
    }

    pub fn iter(&self) -> impl Iterator<Item = &(Protocol, PortSpan)> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, proto: Protocol, port: u16) -> bool {
        self.0.iter().any(|(p, s)| *p == proto && s.contains(port))
    }
}

impl From<&GatewayServices> for PortSet {
    fn from(g: &GatewayServices) -> PortSet {
        PortSet(g.ports.clone())
    }
}

/// Exceptions between two bridges keyed by addresses of one family, in
/// three shapes so that one set never mixes a whole bridge with single
/// addresses (nft refuses elements that overlap, even across fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrExceptions<A: Ord> {
    /// From a machine to the whole destination bridge.
    pub src_all: BTreeSet<A>,
    pub src_ports: BTreeMap<A, PortSet>,
    /// From the whole source bridge to a machine.
    pub dst_all: BTreeSet<A>,
    pub dst_ports: BTreeMap<A, PortSet>,
    /// From a machine to a machine.
    pub both_all: BTreeSet<(A, A)>,
    pub both_ports: BTreeMap<(A, A), PortSet>,
}

impl<A: Ord> Default for AddrExceptions<A> {
    fn default() -> Self {
        AddrExceptions {
            src_all: BTreeSet::new(),
            src_ports: BTreeMap::new(),
            dst_all: BTreeSet::new(),
            dst_ports: BTreeMap::new(),
            both_all: BTreeSet::new(),
            both_ports: BTreeMap::new(),
        }
    }
}

fn ports_size<K>(m: &BTreeMap<K, PortSet>) -> usize {
    m.values().map(PortSet::len).sum()
}

impl<A: Ord + Copy> AddrExceptions<A> {
    fn size(&self) -> usize {
        self.src_all.len()
            + ports_size(&self.src_ports)
            + self.dst_all.len()
            + ports_size(&self.dst_ports)
            + self.both_all.len()
            + ports_size(&self.both_ports)
    }

    fn normalize(&mut self) {
        for set in self.src_ports.values_mut() {
            set.normalize();
        }
        for set in self.dst_ports.values_mut() {
            set.normalize();
        }
        for set in self.both_ports.values_mut() {
            set.normalize();
        }
    }

    /// Adds `traffic` from the source scope to the destination scope.
    fn add(&mut self, from: &Scope<A>, to: &Scope<A>, traffic: &Traffic) {
        fn ports<K: Ord>(
            map: &mut BTreeMap<K, PortSet>,
            key: K,
            proto: Protocol,
            spans: &BTreeSet<PortSpan>,
        ) {
            map.entry(key).or_default().add(proto, spans)
        }
        match (from, to, traffic) {
            (Scope::Whole, Scope::Whole, _) => {
                unreachable!("whole-bridge flows are pair exceptions")
            }
            (Scope::Only(srcs), Scope::Whole, Traffic::All) => self.src_all.extend(srcs),
            (Scope::Only(srcs), Scope::Whole, Traffic::Ports(p, spans)) => {
                for s in srcs {
                    ports(&mut self.src_ports, *s, *p, spans);
                }
            }
            (Scope::Whole, Scope::Only(dsts), Traffic::All) => self.dst_all.extend(dsts),
            (Scope::Whole, Scope::Only(dsts), Traffic::Ports(p, spans)) => {
                for d in dsts {
                    ports(&mut self.dst_ports, *d, *p, spans);
                }
            }
            (Scope::Only(srcs), Scope::Only(dsts), traffic) => {
                for s in srcs {
                    for d in dsts {
                        match traffic {
                            Traffic::All => {
                                self.both_all.insert((*s, *d));
                            }
                            Traffic::Ports(p, spans) => {
                                ports(&mut self.both_ports, (*s, *d), *p, spans)
                            }
                        }
                    }
                }
            }
        }
    }
}

/// What may cross from one bridge to another.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PairExceptions {
    /// Every packet: same bridge, admin, a port-less domain policy.
    pub all: bool,
    /// Whole bridge to whole bridge, these ports.
    pub ports: PortSet,
    pub v4: AddrExceptions<Ipv4Addr>,
    pub v6: AddrExceptions<Ipv6Addr>,
}

impl PairExceptions {
    fn size(&self) -> usize {
        usize::from(self.all) + self.ports.len() + self.v4.size() + self.v6.size()
    }
}

/// A `to: host` policy's exceptions for one family, from machines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAddrExceptions<A: Ord> {
    pub open: BTreeSet<(IfName, A)>,
    pub services: BTreeMap<(IfName, A), PortSet>,
}

impl<A: Ord> Default for HostAddrExceptions<A> {
    fn default() -> Self {
        HostAddrExceptions {
            open: BTreeSet::new(),
            services: BTreeMap::new(),
        }
    }
}

/// What `to: host` policies open on the host's input, on every host
/// address (see README "Network policies").
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostExceptions {
    /// From a whole domain, every packet.
    pub open: BTreeSet<IfName>,
    /// From a whole domain, these ports.
    pub services: BTreeMap<IfName, PortSet>,
    pub v4: HostAddrExceptions<Ipv4Addr>,
    pub v6: HostAddrExceptions<Ipv6Addr>,
}

impl HostExceptions {
    fn size(&self) -> usize {
        self.open.len()
            + ports_size(&self.services)
            + self.v4.open.len()
            + ports_size(&self.v4.services)
            + self.v6.open.len()
            + ports_size(&self.v6.services)
    }

    fn normalize(&mut self) {
        let sets = self
            .services
            .values_mut()
            .chain(self.v4.services.values_mut())
            .chain(self.v6.services.values_mut());
        for set in sets {
            set.normalize();
        }
    }

    fn add(&mut self, from: &Side, traffic: &Traffic) {
        let bridge = &from.bridge;
        match (&from.v4, traffic) {
            (Scope::Whole, Traffic::All) => {
                self.open.insert(bridge.clone());
            }
            (Scope::Whole, Traffic::Ports(p, spans)) => {
                self.services
                    .entry(bridge.clone())
                    .or_default()
                    .add(*p, spans);
            }
            (Scope::Only(_), _) => {
                add_host_addrs(&mut self.v4, bridge, &from.v4, traffic);
                add_host_addrs(&mut self.v6, bridge, &from.v6, traffic);
            }
        }
    }
}

fn add_host_addrs<A: Ord + Copy>(
    sets: &mut HostAddrExceptions<A>,
    bridge: &IfName,
    scope: &Scope<A>,
    traffic: &Traffic,
) {
    let Scope::Only(addrs) = scope else {
        return;
    };
    for a in addrs {
        match traffic {
            Traffic::All => {
                sets.open.insert((bridge.clone(), *a));
            }
            Traffic::Ports(p, spans) => sets
                .services
                .entry((bridge.clone(), *a))
                .or_default()
                .add(*p, spans),
        }
    }
}

/// What policies open between one network outside the domains and one
/// domain bridge (inbound into it, or egress from it when restricted).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetExceptions {
    /// Every packet.
    pub all: bool,
    pub ports: PortSet,
}

/// What a domain with restricted internet may still send to interfaces
/// that are not domain bridges.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EgressRules {
    /// Its `egress` ports (empty with `internet: false`).
    pub ports: PortSet,
    /// What policies from the domain to a network open.
    pub nets: BTreeMap<ipnet::IpNet, NetExceptions>,
}

/// Everything `render::host` needs, decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPlan {
    pub table: TableName,
    pub pattern: BridgePattern,
    /// bridge -> domain, for every known domain bridge.
    pub domains: BTreeMap<IfName, Name>,
    pub admin: Option<IfName>,
    /// (source bridge, destination bridge) -> what may cross. Pairs absent
    /// here are dropped.
    pub pairs: BTreeMap<(IfName, IfName), PairExceptions>,
    pub host: HostExceptions,
    /// Destination bridge -> source network -> what policies open from
    /// that network (outside the domains) into the bridge. Bridges absent
    /// here take no new connection from outside but Incus's published
    /// (DNAT) ones.
    pub inbound: BTreeMap<IfName, BTreeMap<ipnet::IpNet, NetExceptions>>,
    /// Networks no domain reaches outside the domains (aggregated: nft
    /// refuses overlapping interval elements), by family.
    pub protected_v4: Vec<ipnet::Ipv4Net>,
    pub protected_v6: Vec<ipnet::Ipv6Net>,
    /// Source bridge -> networks policies open from it; only used towards
    /// protected networks (and restricted egress keeps its own copy).
    pub protected_open: BTreeMap<IfName, BTreeMap<ipnet::IpNet, NetExceptions>>,
    /// Source bridge -> what it may send outside the domains, for domains
    /// whose internet is restricted; absent bridges are unrestricted.
    pub egress: BTreeMap<IfName, EgressRules>,
    /// Egress port lists that several restricted domains share, sorted:
    /// each is one chain they all jump to (see `rules::egress_target`).
    pub egress_lists: Vec<PortSet>,
    pub gateway: GatewayServices,
    pub logging: Option<LogSettings>,
    pub conntrack: bool,
    /// What each policy did, for the operator's report.
    pub policies: Vec<PolicyEffect>,
    /// Domains that isolate their machines (the bridge table).
    pub isolation: machines::Isolation,
}

/// How one policy landed in the plan.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PolicyEffect {
    #[serde(flatten)]
    pub policy: ResolvedPolicy,
    /// Elements added to the plan by this policy (both directions), after
    /// merging with what earlier policies opened.
    pub elements: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Inputs of a host plan, all validated.
pub struct HostPlanInput<'a> {
    pub table: TableName,
    pub pattern: BridgePattern,
    pub bridges: &'a [DomainBridge],
    pub admin: Option<IfName>,
    pub policies: Vec<ResolvedPolicy>,
    pub gateway: GatewayServices,
    pub logging: Option<LogSettings>,
    pub capabilities: Capabilities,
    /// Per-domain internet settings (the `domains` option).
    pub domain_settings: DomainSettings,
    /// The `protected_networks` option.
    pub protected_networks: Vec<ipnet::IpNet>,
}

/// Non-fatal findings of planning, returned to the operator as warnings.
pub type Warnings = Vec<String>;

impl HostPlan {
    pub fn build(input: HostPlanInput<'_>) -> anyhow::Result<(HostPlan, Warnings)> {
        let mut warnings = Warnings::new();
        ensure!(
            !input.bridges.is_empty(),
            "no domain bridge to isolate: no managed bridge matches the pattern {:?} and no \
             `bridges` list was given",
            input.pattern.as_str()
        );
        let mut domains = BTreeMap::new();
        let mut owner_of_domain: BTreeMap<&Name, &IfName> = BTreeMap::new();
        for b in input.bridges {
            if let Some(other) = owner_of_domain.insert(&b.domain, &b.bridge) {
                bail!(
                    "bridges {other} and {} both map to domain {:?}",
                    b.bridge,
                    b.domain.as_str()
                );
            }
            domains.insert(b.bridge.clone(), b.domain.clone());
        }
        reject_overlapping_subnets(input.bridges)?;
        if let Some(admin) = &input.admin {
            ensure!(
                domains.contains_key(admin),
                "admin_bridge {admin} is not one of the domain bridges ({})",
                domains
                    .keys()
                    .map(IfName::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let (mut protected_v4, mut protected_v6) = (Vec::new(), Vec::new());
        for net in &input.protected_networks {
            match net {
                ipnet::IpNet::V4(n) => protected_v4.push(*n),
                ipnet::IpNet::V6(n) => protected_v6.push(*n),
            }
        }

        let mut plan = HostPlan {
            table: input.table,
            pattern: input.pattern,
            domains,
            admin: input.admin,
            pairs: BTreeMap::new(),
            host: HostExceptions::default(),
            inbound: BTreeMap::new(),
            egress: BTreeMap::new(),
            egress_lists: Vec::new(),
            protected_v4: ipnet::Ipv4Net::aggregate(&protected_v4),
            protected_v6: ipnet::Ipv6Net::aggregate(&protected_v6),
            protected_open: BTreeMap::new(),
            gateway: input.gateway,
            logging: None,
            conntrack: input.capabilities.conntrack,
            policies: Vec::new(),
            isolation: machines::Isolation::default(),
        };

        // Same-bridge traffic is a domain talking to itself. With
        // br_netfilter loaded it reaches the forward hook with
        // iifname == oifname, and must never be dropped.
        let bridges: Vec<IfName> = plan.domains.keys().cloned().collect();
        for bridge in &bridges {
            plan.pair_mut(bridge, bridge).all = true;
        }
        // The admin domain opens connections to every domain; replies come
        // back as established traffic, nothing opens the other way.
        if let Some(admin) = plan.admin.clone() {
            for bridge in &bridges {
                plan.pair_mut(&admin, bridge).all = true;
            }
        }

        for net in &input.protected_networks {
            for b in input.bridges {
                let overlaps = match net {
                    ipnet::IpNet::V4(n) => b.ipv4.is_some_and(|s| {
                        n.contains(&s.network()) || s.trunc().contains(&n.network())
                    }),
                    ipnet::IpNet::V6(n) => b.ipv6.is_some_and(|s| {
                        n.contains(&s.network()) || s.trunc().contains(&n.network())
                    }),
                };
                if overlaps {
                    warnings.push(format!(
                        "protected network {net} overlaps the subnet of domain {} ({}): it is \
                         only enforced on traffic leaving the domains (isolation between domains \
                         already covers the domain's own bridge)",
                        b.domain.as_str(),
                        b.bridge
                    ));
                }
            }
        }
        // Domain -> bridge once: a search per domain is quadratic at 1000.
        let bridge_of: BTreeMap<&Name, &IfName> =
            plan.domains.iter().map(|(b, d)| (d, b)).collect();
        for (domain, internet) in &input.domain_settings.0 {
            let Some(bridge) = bridge_of.get(domain).map(|b| (*b).clone()) else {
                bail!(
                    "domains.{domain}: not a known domain ({})",
                    plan.domains
                        .values()
                        .map(Name::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            };
            let rules = match internet {
                Internet::Open => continue,
                Internet::Closed => EgressRules::default(),
                Internet::Ports(ports) => EgressRules {
                    ports: PortSet(ports.clone()),
                    nets: BTreeMap::new(),
                },
            };
            plan.egress.insert(bridge, rules);
        }
        for domain in &input.domain_settings.1 {
            let Some(b) = input.bridges.iter().find(|b| b.domain == *domain) else {
                bail!(
                    "domains.{domain}: not a known domain ({})",
                    plan.domains
                        .values()
                        .map(Name::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            };
            if !b.subnets_known {
                warnings.push(format!(
                    "domain {domain} isolates its machines but the subnets of {} are unknown (an \
                     explicit `bridges` entry that Incus does not manage): only its machines' \
                     MACs isolate them",
                    b.bridge
                ));
            }
            plan.isolation
                .domains
                .insert(b.bridge.clone(), (b.ipv4, b.ipv6));
        }
        for policy in input.policies {
            let effect = plan.add_policy(policy);
            plan.policies.push(effect);
        }
        plan.expand_isolation();
        for pair in plan.pairs.values_mut() {
            pair.ports.normalize();
            pair.v4.normalize();
            pair.v6.normalize();
        }
        plan.host.normalize();
        for nets in plan.inbound.values_mut() {
            for e in nets.values_mut() {
                e.ports.normalize();
            }
        }
        for nets in plan.protected_open.values_mut() {
            for e in nets.values_mut() {
                e.ports.normalize();
            }
        }
        for rules in plan.egress.values_mut() {
            rules.ports.normalize();
            for e in rules.nets.values_mut() {
                e.ports.normalize();
            }
        }
        plan.egress_lists = rules::shared_egress_lists(&plan.egress);

        if let Some(logging) = input.logging {
            let caps = input.capabilities;
            if caps.log && caps.limit {
                plan.logging = Some(logging);
            } else {
                let missing: Vec<&str> = [("log", caps.log), ("limit", caps.limit)]
                    .iter()
                    .filter(|(_, ok)| !ok)
                    .map(|(name, _)| *name)
                    .collect();
                warnings.push(format!(
                    "logging was requested but nft here cannot use `{}` (missing kernel support, \
                     or a network namespace without nf_log_all_netns): the ruleset is rendered \
                     without logging",
                    missing.join("`, `")
                ));
            }
        }
        if !plan.conntrack {
            warnings.push(
                "conntrack (`ct`) is not available: the ruleset is rendered without connection \
                 tracking, so replies to allowed cross-domain connections are dropped unless a \
                 policy allows them explicitly"
                    .to_string(),
            );
        }
        Ok((plan, warnings))
    }

    fn pair_mut(&mut self, from: &IfName, to: &IfName) -> &mut PairExceptions {
        self.pairs.entry((from.clone(), to.clone())).or_default()
    }

    /// Expands one resolved policy into plan elements, in both directions
    /// when it is bidirectional.
    fn add_policy(&mut self, policy: ResolvedPolicy) -> PolicyEffect {
        let elements = expand::flows(&policy)
            .iter()
            .map(|flow| self.add_flow(flow))
            .sum();
        let note = match (&policy.from, &policy.to) {
            (crate::model::Endpoint::Host, _) if !policy.bidirectional => Some(
                "the host already reaches every domain (host isolation filters forwarded and \
                 input traffic, not the host's own output): nothing to open"
                    .to_string(),
            ),
            (_, crate::model::Endpoint::Network { .. }) if elements == 0 => Some(
                "the domain reaches this network already (its internet is not restricted and no \
                 protected network overlaps it): nothing to open"
                    .to_string(),
            ),
            (from, to)
                if from
                    .bridge()
                    .is_some_and(|b| self.isolation.domains.contains_key(b))
                    && from.bridge() == to.bridge() =>
            {
                Some(
                    "both ends are in a domain that isolates its machines: opened between its \
                     machines by the bridge table (replies matched statelessly; a whole domain \
                     stands for its machines known at render time)"
                        .to_string(),
                )
            }
            (from, to) if from.bridge().is_some() && from.bridge() == to.bridge() => Some(
                "both ends are on the same bridge, where traffic is already allowed".to_string(),
            ),
            _ => None,
        };
        PolicyEffect {
            policy,
            elements,
            note,
        }
    }

    /// Adds one flow; returns how many elements it added (before merging),
    /// counted on the one pair or host entry it touches.
    fn add_flow(&mut self, flow: &Flow) -> usize {
        match (&flow.from, &flow.to) {
            (End::Host, _) => 0,
            (End::Bridge(src), End::Network(net)) => {
                assert!(
                    src.is_whole(),
                    "machine-to-network is refused when resolved"
                );
                let protected = match net {
                    ipnet::IpNet::V4(n) => self
                        .protected_v4
                        .iter()
                        .any(|p| p.contains(n) || n.contains(p)),
                    ipnet::IpNet::V6(n) => self
                        .protected_v6
                        .iter()
                        .any(|p| p.contains(n) || n.contains(p)),
                };
                let mut added = 0;
                if protected {
                    let e = self
                        .protected_open
                        .entry(src.bridge.clone())
                        .or_default()
                        .entry(*net)
                        .or_default();
                    added += add_net(e, &flow.traffic);
                }
                if let Some(rules) = self.egress.get_mut(&src.bridge) {
                    added += add_net(rules.nets.entry(*net).or_default(), &flow.traffic);
                }
                added
            }
            (End::Network(_), End::Host | End::Network(_)) => {
                unreachable!("refused when the policy is resolved")
            }
            (End::Network(net), End::Bridge(dst)) => {
                assert!(
                    dst.is_whole(),
                    "network-to-machine is refused when resolved"
                );
                let e = self
                    .inbound
                    .entry(dst.bridge.clone())
                    .or_default()
                    .entry(*net)
                    .or_default();
                add_net(e, &flow.traffic)
            }
            (End::Bridge(src), End::Host) => {
                let before = self.host.size();
                self.host.add(src, &flow.traffic);
                self.host.size() - before
            }
            (End::Bridge(src), End::Bridge(dst)) if src.bridge == dst.bridge => {
                // Inside an isolated domain the bridge table opens it; the
                // elements are counted when machines are known (expand).
                if self.isolation.domains.contains_key(&src.bridge) {
                    let policy = self.policies.len();
                    self.isolation.flows.push((policy, flow.clone()));
                }
                0
            }
            (End::Bridge(src), End::Bridge(dst)) => {
                let pair = self.pair_mut(&src.bridge, &dst.bridge);
                let before = pair.size();
                match (src.is_whole() && dst.is_whole(), &flow.traffic) {
                    (true, Traffic::All) => pair.all = true,
                    (true, Traffic::Ports(p, spans)) => pair.ports.add(*p, spans),
                    (false, traffic) => {
                        pair.v4.add(&src.v4, &dst.v4, traffic);
                        pair.v6.add(&src.v6, &dst.v6, traffic);
                    }
                }
                pair.size() - before
            }
        }
    }

    pub fn bridges(&self) -> impl Iterator<Item = &IfName> {
        self.domains.keys()
    }
}

/// Adds traffic to a network exception; returns how many elements it added.
fn add_net(e: &mut NetExceptions, traffic: &Traffic) -> usize {
    let before = usize::from(e.all) + e.ports.len();
    match traffic {
        Traffic::All => e.all = true,
        Traffic::Ports(p, spans) => e.ports.add(*p, spans),
    }
    usize::from(e.all) + e.ports.len() - before
}

/// Two domain bridges on overlapping subnets make addresses ambiguous (a
/// machine policy could match in the wrong domain): refuse them.
fn reject_overlapping_subnets(bridges: &[DomainBridge]) -> anyhow::Result<()> {
    for (i, a) in bridges.iter().enumerate() {
        for b in &bridges[i + 1..] {
            if let (Some(x), Some(y)) = (a.ipv4, b.ipv4) {
                ensure!(
                    !(x.trunc().contains(&y.network()) || y.trunc().contains(&x.network())),
                    "bridges {} ({x}) and {} ({y}) have overlapping IPv4 subnets",
                    a.bridge,
                    b.bridge
                );
            }
            if let (Some(x), Some(y)) = (a.ipv6, b.ipv6) {
                ensure!(
                    !(x.trunc().contains(&y.network()) || y.trunc().contains(&x.network())),
                    "bridges {} ({x}) and {} ({y}) have overlapping IPv6 subnets",
                    a.bridge,
                    b.bridge
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
