//! The isolation plan: a pure function from validated inputs to the sets the
//! ruleset is made of. Rendering (`render`) only formats a plan, and the
//! evaluator (`eval`) answers "what happens to this packet" from the same
//! plan, so tests can check the plan against the policies without nft.
//!
//! Per-packet cost stays a handful of set lookups whatever the number of
//! domains and policies: every exception is an element of a set, never a
//! rule of its own (a rule per bridge pair is O(N^2) rules, measured at 7.4 s
//! to load and 63 new connections/s at 500 bridges).

pub mod eval;
pub mod profile;
pub mod router;

use crate::model::{
    BridgePattern, DomainBridge, Endpoint, IfName, LogSettings, Name, PortSpan, Protocol,
    ResolvedPolicy, TableName, Traffic,
};
use anyhow::{bail, ensure};
use ipnet::{Ipv4Net, Ipv6Net};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// What the kernel can do where the ruleset will be loaded, probed by the
/// runner. A missing capability removes a feature with a warning rather than
/// failing the render.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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

/// Address-level exceptions for one IP family. A domain endpoint appears as
/// the family's whole space (`0.0.0.0/0`, `::/0`) on its bridge, a machine as
/// its own addresses (`/32`, `/128`): the source bridge is always part of the
/// key, so an address spoofed from another bridge opens nothing.
///
/// Flows with ports come in two shapes because nft keeps a concatenation in
/// 64 bytes of registers, and `ifname . ipv6_addr . ifname . ipv6_addr .
/// inet_proto . inet_service` needs 72 (nft 1.0.6 aborts on it). Towards a
/// machine, its exact address stands for the destination bridge: domain
/// subnets never overlap (checked), so the route of that address is its
/// bridge. From a machine to a domain, the destination bridge is the key.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct AddressSets<N: Ord> {
    /// Forwarded, every protocol: `iifname . saddr . oifname . daddr`.
    pub hosts: BTreeSet<(IfName, N, IfName, N)>,
    /// Forwarded to a machine, some ports:
    /// `iifname . saddr . daddr . meta l4proto . th dport`.
    pub to_machine: BTreeSet<(IfName, N, N, Protocol, PortSpan)>,
    /// Forwarded from a machine to a domain, some ports:
    /// `iifname . saddr . oifname . meta l4proto . th dport`.
    pub from_machine: BTreeSet<(IfName, N, IfName, Protocol, PortSpan)>,
    /// To the host itself, every protocol: `iifname . saddr`.
    pub host_open: BTreeSet<(IfName, N)>,
    /// To the host itself, some ports.
    pub host_services: BTreeSet<(IfName, N, Protocol, PortSpan)>,
}

impl<N: Ord> AddressSets<N> {
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
            && self.to_machine.is_empty()
            && self.from_machine.is_empty()
            && self.host_open.is_empty()
            && self.host_services.is_empty()
    }
}

/// Everything `render::host` needs, decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostPlan {
    pub table: TableName,
    pub pattern: BridgePattern,
    /// bridge -> domain, for every known domain bridge.
    pub domains: BTreeMap<IfName, Name>,
    pub admin: Option<IfName>,
    /// Same-bridge pairs, admin pairs and port-less domain policies.
    pub allowed_pairs: BTreeSet<(IfName, IfName)>,
    /// Domain-to-domain policies with ports.
    pub allowed_services: BTreeSet<(IfName, IfName, Protocol, PortSpan)>,
    pub v4: AddressSets<Ipv4Net>,
    pub v6: AddressSets<Ipv6Net>,
    pub logging: Option<LogSettings>,
    pub conntrack: bool,
    /// What each policy did, for the operator's report.
    pub policies: Vec<PolicyEffect>,
}

/// How one policy landed in the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyEffect {
    #[serde(flatten)]
    pub policy: ResolvedPolicy,
    /// Elements added to the plan by this policy (both directions).
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
    pub logging: Option<LogSettings>,
    pub capabilities: Capabilities,
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

        let mut plan = HostPlan {
            table: input.table,
            pattern: input.pattern,
            domains,
            admin: input.admin,
            allowed_pairs: BTreeSet::new(),
            allowed_services: BTreeSet::new(),
            v4: AddressSets::default(),
            v6: AddressSets::default(),
            logging: None,
            conntrack: input.capabilities.conntrack,
            policies: Vec::new(),
        };

        // Same-bridge traffic is a domain talking to itself. With
        // br_netfilter loaded it reaches the forward hook with
        // iifname == oifname, and must never be dropped.
        for bridge in plan.domains.keys() {
            plan.allowed_pairs.insert((bridge.clone(), bridge.clone()));
        }
        // The admin domain opens connections to every domain; replies come
        // back as established traffic, nothing opens the other way.
        if let Some(admin) = &plan.admin {
            for bridge in plan.domains.keys() {
                plan.allowed_pairs.insert((admin.clone(), bridge.clone()));
            }
        }

        for policy in input.policies {
            let effect = plan.add_policy(policy);
            plan.policies.push(effect);
        }

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

    /// Expands one resolved policy into set elements, in both directions
    /// when it is bidirectional.
    fn add_policy(&mut self, policy: ResolvedPolicy) -> PolicyEffect {
        let mut elements = self.add_flow(&policy.from, &policy.to, &policy.traffic);
        if policy.bidirectional {
            elements += self.add_flow(&policy.to, &policy.from, &policy.traffic);
        }
        let note = match (&policy.from, &policy.to) {
            (Endpoint::Host, _) if !policy.bidirectional => Some(
                "the host already reaches every domain (host isolation filters forwarded and \
                 input traffic, not the host's own output): nothing to open"
                    .to_string(),
            ),
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

    /// Adds the elements that let `from` open `traffic` towards `to`;
    /// returns how many elements were new.
    fn add_flow(&mut self, from: &Endpoint, to: &Endpoint, traffic: &Traffic) -> usize {
        let before = self.element_count();
        match (from, to) {
            (Endpoint::Host, _) => {}
            (src, Endpoint::Host) => {
                let bridge = src.bridge().expect("a non-host endpoint has a bridge");
                for net in nets_v4(src) {
                    add_host(&mut self.v4, bridge, net, traffic);
                }
                for net in nets_v6(src) {
                    add_host(&mut self.v6, bridge, net, traffic);
                }
            }
            (src, dst) if src.bridge() == dst.bridge() => {}
            (Endpoint::Domain { bridge: from, .. }, Endpoint::Domain { bridge: to, .. }) => {
                match traffic {
                    Traffic::All => {
                        self.allowed_pairs.insert((from.clone(), to.clone()));
                    }
                    Traffic::Ports(proto, spans) => {
                        for span in spans {
                            self.allowed_services
                                .insert((from.clone(), to.clone(), *proto, *span));
                        }
                    }
                }
            }
            (src, dst) => {
                let (sb, db) = (
                    src.bridge().expect("non-host endpoint").clone(),
                    dst.bridge().expect("non-host endpoint").clone(),
                );
                let to_machine = matches!(dst, Endpoint::Machine { .. });
                for s in nets_v4(src) {
                    for d in nets_v4(dst) {
                        add_forward(&mut self.v4, (&sb, s), (&db, d), to_machine, traffic);
                    }
                }
                for s in nets_v6(src) {
                    for d in nets_v6(dst) {
                        add_forward(&mut self.v6, (&sb, s), (&db, d), to_machine, traffic);
                    }
                }
            }
        }
        self.element_count() - before
    }

    fn element_count(&self) -> usize {
        fn family<N: Ord>(s: &AddressSets<N>) -> usize {
            s.hosts.len()
                + s.to_machine.len()
                + s.from_machine.len()
                + s.host_open.len()
                + s.host_services.len()
        }
        self.allowed_pairs.len() + self.allowed_services.len() + family(&self.v4) + family(&self.v6)
    }

    pub fn bridges(&self) -> impl Iterator<Item = &IfName> {
        self.domains.keys()
    }
}

fn add_host<N: Ord + Copy>(sets: &mut AddressSets<N>, bridge: &IfName, net: N, traffic: &Traffic) {
    match traffic {
        Traffic::All => {
            sets.host_open.insert((bridge.clone(), net));
        }
        Traffic::Ports(proto, spans) => {
            for span in spans {
                sets.host_services
                    .insert((bridge.clone(), net, *proto, *span));
            }
        }
    }
}

/// `to_machine` tells which of the two port shapes applies (see
/// [`AddressSets`]); a destination domain has `d` = the whole space.
fn add_forward<N: Ord + Copy>(
    sets: &mut AddressSets<N>,
    (from, s): (&IfName, N),
    (to, d): (&IfName, N),
    to_machine: bool,
    traffic: &Traffic,
) {
    match traffic {
        Traffic::All => {
            sets.hosts.insert((from.clone(), s, to.clone(), d));
        }
        Traffic::Ports(proto, spans) => {
            for span in spans {
                if to_machine {
                    sets.to_machine.insert((from.clone(), s, d, *proto, *span));
                } else {
                    sets.from_machine
                        .insert((from.clone(), s, to.clone(), *proto, *span));
                }
            }
        }
    }
}

/// The IPv4 networks an endpoint stands for on its bridge. A machine with no
/// IPv4 address yields nothing, so it opens nothing over IPv4.
fn nets_v4(e: &Endpoint) -> Vec<Ipv4Net> {
    match e {
        Endpoint::Host => vec![],
        Endpoint::Domain { .. } => vec![Ipv4Net::default()],
        Endpoint::Machine { ipv4, .. } => ipv4
            .iter()
            .map(|a| Ipv4Net::new(*a, 32).expect("32 is a valid IPv4 prefix"))
            .collect(),
    }
}

fn nets_v6(e: &Endpoint) -> Vec<Ipv6Net> {
    match e {
        Endpoint::Host => vec![],
        Endpoint::Domain { .. } => vec![Ipv6Net::default()],
        Endpoint::Machine { ipv6, .. } => ipv6
            .iter()
            .map(|a| Ipv6Net::new(*a, 128).expect("128 is a valid IPv6 prefix"))
            .collect(),
    }
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
