//! Isolation inside a domain (`isolate_machines`): rules of the `bridge`
//! family, which sees frames between two ports of one bridge (two machines
//! of one domain) whether br_netfilter is on or off. These kernels have no
//! `meta ibrname` and no conntrack in that family (DESIGN section 4), so a
//! frame is recognized as "inside an isolated domain" by addresses: the
//! MACs of the domain's machines and the domain's subnets; and replies of a
//! policy-allowed flow are matched statelessly. Like `rules`, this is the
//! one ordered list the renderer writes and the evaluator walks.
//!
//! Frames to or from the host's own bridge interface (DHCP, DNS, RA and ND
//! with the gateway) do not pass the bridge `forward` hook: they stay
//! untouched. The chain's policy is accept: it sees every bridge of the host
//! (`incusbr0`, Docker's), and only frames of an isolated domain are dropped.

use super::expand::{Flow, Scope, Side};
use super::rules::{Action, Chain, Family, Rule};
use super::{HostPlan, PortSet, Warnings};
use crate::model::{IfName, MacAddr, Machine, Name, Traffic};
use ipnet::{Ipv4Net, Ipv6Net};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};

/// The bridge-family base chain and the chain that logs and drops.
pub const BRIDGE_CHAIN: &str = "machines";
pub const DENY_MACHINES_CHAIN: &str = "deny-machines";
/// Before br_netfilter (priority 0), which hands same-bridge IP traffic to
/// the inet hooks: what is dropped here never reaches them.
pub const BRIDGE_PRIORITY: i32 = -1;
/// The log event of a dropped frame (`<prefix>-DENY-MACHINES: `).
pub const DENY_MACHINES_EVENT: &str = "DENY-MACHINES";

/// Named sets of the bridge table.
pub const ISOLATED_MACS: &str = "isolated_macs";
pub const ISOLATED_V4: &str = "isolated_v4";
pub const ISOLATED_V6: &str = "isolated_v6";
pub const MACHINE_OPEN_V4: &str = "machine_open_v4";
pub const MACHINE_OPEN_V6: &str = "machine_open_v6";
pub const MACHINE_SERVICES_V4: &str = "machine_services_v4";
pub const MACHINE_SERVICES_V6: &str = "machine_services_v6";

/// A machine of an isolated domain, as the bridge table knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsolatedMachine {
    pub name: Name,
    pub hwaddr: Option<MacAddr>,
    pub v4: BTreeSet<Ipv4Addr>,
    pub v6: BTreeSet<Ipv6Addr>,
}

/// What policies open between two machines of one isolated domain, for one
/// address family: `(source, target)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineFlows<A: Ord> {
    /// Every packet (a port-less policy).
    pub open: BTreeSet<(A, A)>,
    pub services: BTreeMap<(A, A), PortSet>,
}

impl<A: Ord> Default for MachineFlows<A> {
    fn default() -> Self {
        MachineFlows {
            open: BTreeSet::new(),
            services: BTreeMap::new(),
        }
    }
}

impl<A: Ord + Copy> MachineFlows<A> {
    fn add(&mut self, srcs: &BTreeSet<A>, dsts: &BTreeSet<A>, traffic: &Traffic) -> usize {
        let mut added = 0;
        for s in srcs {
            for d in dsts.iter().filter(|d| *d != s) {
                match traffic {
                    Traffic::All => added += usize::from(self.open.insert((*s, *d))),
                    Traffic::Ports(p, spans) => {
                        let set = self.services.entry((*s, *d)).or_default();
                        let before = set.len();
                        set.add(*p, spans);
                        added += set.len() - before;
                    }
                }
            }
        }
        added
    }
}

/// The domains that isolate their machines, and what the bridge table
/// needs for them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Isolation {
    /// Isolated bridge -> its subnets (unknown subnets: `None`).
    pub domains: BTreeMap<IfName, (Option<Ipv4Net>, Option<Ipv6Net>)>,
    /// Isolated bridge -> its machines known at render time.
    pub machines: BTreeMap<IfName, Vec<IsolatedMachine>>,
    /// Every known machine MAC of every isolated domain.
    pub macs: BTreeSet<MacAddr>,
    pub v4: MachineFlows<Ipv4Addr>,
    pub v6: MachineFlows<Ipv6Addr>,
    /// Policy flows inside an isolated domain (with the index of their
    /// policy), kept to expand a whole domain end into its machines once
    /// they are known.
    pub(super) flows: Vec<(usize, Flow)>,
    /// Elements each policy got from the last expansion, by policy index.
    pub(super) counted: BTreeMap<usize, usize>,
}

impl Isolation {
    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }

    /// The addresses a side stands for: a machine's own, or every known
    /// machine of the domain for a whole domain (`from: pro, to: pro` opens
    /// its ports between every two machines of pro).
    fn addrs<A: Ord + Copy>(
        &self,
        side: &Side,
        scope: &Scope<A>,
        of: fn(&IsolatedMachine) -> &BTreeSet<A>,
    ) -> BTreeSet<A> {
        match scope {
            Scope::Only(addrs) => addrs.clone(),
            Scope::Whole => self
                .machines
                .get(&side.bridge)
                .into_iter()
                .flatten()
                .flat_map(|m| of(m).iter().copied())
                .collect(),
        }
    }

    /// Recomputes the machine flows from the kept policy flows; returns the
    /// elements each policy added (by policy index).
    fn expand(&mut self) -> BTreeMap<usize, usize> {
        let mut v4 = MachineFlows::default();
        let mut v6 = MachineFlows::default();
        let mut added = BTreeMap::new();
        for (policy, flow) in &self.flows {
            let (super::expand::End::Bridge(src), super::expand::End::Bridge(dst)) =
                (&flow.from, &flow.to)
            else {
                unreachable!("only flows between two machines of one domain are kept");
            };
            let n = v4.add(
                &self.addrs(src, &src.v4, |m| &m.v4),
                &self.addrs(dst, &dst.v4, |m| &m.v4),
                &flow.traffic,
            ) + v6.add(
                &self.addrs(src, &src.v6, |m| &m.v6),
                &self.addrs(dst, &dst.v6, |m| &m.v6),
                &flow.traffic,
            );
            *added.entry(*policy).or_default() += n;
        }
        for set in v4.services.values_mut().chain(v6.services.values_mut()) {
            set.normalize();
        }
        self.v4 = v4;
        self.v6 = v6;
        added
    }
}

/// Which way a flow set is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// `saddr . daddr . ... . dport`: the packet opening the flow.
    Forward,
    /// `daddr . saddr . ... . sport`: a reply, matched statelessly.
    Reply,
}

/// A match of the bridge table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BCond {
    /// `ether type arp`
    Arp,
    /// ICMPv6 neighbour solicitation and advertisement.
    NeighbourDiscovery,
    /// `ip saddr . ip daddr . meta l4proto . th dport @machine_services_v4`
    /// (`Reply`: addresses swapped, `th sport`).
    Services(Family, Way),
    /// `ip saddr . ip daddr @machine_open_v4` (`Reply`: swapped).
    Open(Family, Way),
    /// `tcp flags & (syn | ack) != syn`: any TCP packet but a bare SYN, so
    /// a reply cannot open a connection back.
    TcpNotSyn,
    /// `meta l4proto udp`
    Udp,
    /// `icmp type echo-reply`, `icmpv6 type echo-reply`
    EchoReply(Family),
    /// `ether saddr @isolated_macs`
    SrcMacIsolated,
    /// `ether daddr @isolated_macs`
    DstMacIsolated,
    /// A broadcast or multicast destination (the group bit).
    DstGroup,
    /// `ip saddr . ip daddr @isolated_v4`: both ends in the subnet of one
    /// isolated domain.
    InsideSubnet(Family),
}

fn sets_of(family: Family) -> (&'static str, &'static str) {
    match family {
        Family::V4 => (MACHINE_SERVICES_V4, MACHINE_OPEN_V4),
        Family::V6 => (MACHINE_SERVICES_V6, MACHINE_OPEN_V6),
    }
}

impl BCond {
    /// The match as nft text.
    pub fn nft(&self) -> String {
        let ends = |f: Family, way: Way| match way {
            Way::Forward => format!("{0} saddr . {0} daddr", f.ip()),
            Way::Reply => format!("{0} daddr . {0} saddr", f.ip()),
        };
        match *self {
            BCond::Arp => "ether type arp".into(),
            BCond::NeighbourDiscovery => {
                "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert }".into()
            }
            BCond::Services(f, way) => {
                let port = if way == Way::Forward {
                    "dport"
                } else {
                    "sport"
                };
                format!(
                    "{} . meta l4proto . th {port} @{}",
                    ends(f, way),
                    sets_of(f).0
                )
            }
            BCond::Open(f, way) => format!("{} @{}", ends(f, way), sets_of(f).1),
            BCond::TcpNotSyn => "tcp flags & (syn | ack) != syn".into(),
            BCond::Udp => "meta l4proto udp".into(),
            BCond::EchoReply(Family::V4) => "icmp type echo-reply".into(),
            BCond::EchoReply(Family::V6) => "icmpv6 type echo-reply".into(),
            BCond::SrcMacIsolated => format!("ether saddr @{ISOLATED_MACS}"),
            BCond::DstMacIsolated => format!("ether daddr @{ISOLATED_MACS}"),
            BCond::DstGroup => "ether daddr & 01:00:00:00:00:00 == 01:00:00:00:00:00".into(),
            BCond::InsideSubnet(Family::V4) => format!("ip saddr . ip daddr @{ISOLATED_V4}"),
            BCond::InsideSubnet(Family::V6) => format!("ip6 saddr . ip6 daddr @{ISOLATED_V6}"),
        }
    }
}

impl HostPlan {
    /// Expands the isolated domains' policy flows and brings each policy's
    /// element count up to date.
    pub(super) fn expand_isolation(&mut self) {
        let added = self.isolation.expand();
        for (policy, n) in &self.isolation.counted {
            if let Some(effect) = self.policies.get_mut(*policy) {
                effect.elements -= n;
            }
        }
        for (policy, n) in &added {
            if let Some(effect) = self.policies.get_mut(*policy) {
                effect.elements += n;
            }
        }
        self.isolation.counted = added;
    }

    /// The isolated domains' subnets, by family.
    pub fn isolated_subnets_v4(&self) -> Vec<Ipv4Net> {
        let nets = self.isolation.domains.values().filter_map(|(v4, _)| *v4);
        nets.map(|n| n.trunc()).collect()
    }

    pub fn isolated_subnets_v6(&self) -> Vec<Ipv6Net> {
        let nets = self.isolation.domains.values().filter_map(|(_, v6)| *v6);
        nets.map(|n| n.trunc()).collect()
    }

    /// Tells the plan the machines found on the bridges (their MACs and
    /// addresses): the bridge table recognizes an isolated domain's machines
    /// by MAC, and a policy naming a whole isolated domain opens its ports
    /// between every two of its machines. Without it only the subnets
    /// isolate, and such policies open nothing (narrower, never wider).
    pub fn add_machines(&mut self, machines: &[Machine]) -> Warnings {
        let mut warnings = Warnings::new();
        let iso = &mut self.isolation;
        iso.machines.clear();
        iso.macs.clear();
        for m in machines {
            if !iso.domains.contains_key(&m.bridge) {
                continue;
            }
            let domain = self.domains.get(&m.bridge).map_or("?", |d| d.as_str());
            match m.hwaddr {
                Some(mac) => {
                    iso.macs.insert(mac);
                    if !m.mac_filtering {
                        warnings.push(format!(
                            "machine \"{}\" of domain {domain} (isolate_machines) has no \
                             security.mac_filtering on its NIC on {}: it can send from another \
                             MAC and pass for a machine the bridge table does not know (set \
                             security.mac_filtering=true on the NIC)",
                            m.name, m.bridge
                        ));
                    }
                }
                None => warnings.push(format!(
                    "machine \"{}\" of domain {domain} (isolate_machines) has no known MAC: only \
                     its addresses in the domain's subnets are isolated (start it, or render \
                     again once Incus reports volatile hwaddr)",
                    m.name
                )),
            }
            iso.machines
                .entry(m.bridge.clone())
                .or_default()
                .push(IsolatedMachine {
                    name: m.name.clone(),
                    hwaddr: m.hwaddr,
                    v4: m.ipv4.clone(),
                    v6: m.ipv6.clone(),
                });
        }
        self.expand_isolation();
        warnings
    }

    /// The bridge table's chains, base chain first; none when no domain
    /// isolates its machines (the table then holds only its comment, so
    /// loading it removes rules an earlier render put there).
    pub fn bridge_chains(&self) -> Vec<Chain<BCond>> {
        use BCond::*;
        let iso = &self.isolation;
        if iso.is_empty() {
            return Vec::new();
        }
        let mut rules = vec![
            Rule::new(vec![Arp], Action::Accept).why(
                "ARP and neighbour discovery between machines: without them no policy flow \
                 between two machines could start, and they carry no data.",
            ),
            Rule::new(vec![NeighbourDiscovery], Action::Accept),
        ];
        let mut forward = Vec::new();
        let mut replies = Vec::new();
        for (family, open, services) in [
            (
                Family::V4,
                !iso.v4.open.is_empty(),
                !iso.v4.services.is_empty(),
            ),
            (
                Family::V6,
                !iso.v6.open.is_empty(),
                !iso.v6.services.is_empty(),
            ),
        ] {
            if services {
                forward.push(Rule::new(
                    vec![Services(family, Way::Forward)],
                    Action::Accept,
                ));
                replies.push(Rule::new(
                    vec![TcpNotSyn, Services(family, Way::Reply)],
                    Action::Accept,
                ));
                replies.push(Rule::new(
                    vec![Udp, Services(family, Way::Reply)],
                    Action::Accept,
                ));
            }
            if open {
                forward.push(Rule::new(vec![Open(family, Way::Forward)], Action::Accept));
                for first in [TcpNotSyn, Udp, EchoReply(family)] {
                    replies.push(Rule::new(
                        vec![first, Open(family, Way::Reply)],
                        Action::Accept,
                    ));
                }
            }
        }
        if let Some(first) = forward.first_mut() {
            first.why = Some(
                "Policies between two machines of an isolated domain: the packets that open \
                 the flow, by source, destination, protocol and port.",
            );
        }
        if let Some(first) = replies.first_mut() {
            first.why = Some(
                "Their replies, matched statelessly (no conntrack in the bridge family): from \
                 the target's service port back to the source, TCP only without a bare SYN (the \
                 target cannot open a connection back), ICMP only echo replies.",
            );
        }
        rules.extend(forward);
        rules.extend(replies);
        let deny = match self.log(DENY_MACHINES_EVENT) {
            Some(_) => Action::Jump(DENY_MACHINES_CHAIN.into()),
            None => Action::Drop,
        };
        if !iso.macs.is_empty() {
            rules.push(
                Rule::new(vec![SrcMacIsolated, DstMacIsolated], deny.clone()).why(
                    "Between two known machines of an isolated domain, whatever they carry (IPv6 \
                     link-local, other protocols). The other end must be one of them too: the \
                     firewall instance (vm mode) routes between domains on the same bridge.",
                ),
            );
            rules.push(Rule::new(vec![SrcMacIsolated, DstGroup], deny.clone()).why(
                "Their broadcast and multicast to the other ports (the gateway still gets \
                     its copy: frames to the host's own bridge interface are not forwarded).",
            ));
        }
        let mut first = true;
        for (family, used) in [
            (Family::V4, !self.isolated_subnets_v4().is_empty()),
            (Family::V6, !self.isolated_subnets_v6().is_empty()),
        ] {
            if used {
                let rule = Rule::new(vec![InsideSubnet(family)], deny.clone());
                rules.push(if std::mem::take(&mut first) {
                    rule.why(
                        "IP traffic with both ends in the subnet of one isolated domain: also \
                         machines created after this render (their MAC is not known yet).",
                    )
                } else {
                    rule
                });
            }
        }
        let mut chains = vec![Chain {
            name: BRIDGE_CHAIN.into(),
            hook: Some(("forward", BRIDGE_PRIORITY)),
            why: Some(
                "Frames between two ports of one bridge. Policy accept: this hook sees every \
                 bridge of the host; only frames of a domain that isolates its machines are \
                 dropped. Priority -1: before br_netfilter hands them to the inet table.",
            ),
            pair: None,
            rules,
        }];
        if let Some(log) = self.log(DENY_MACHINES_EVENT) {
            chains.push(Chain {
                name: DENY_MACHINES_CHAIN.into(),
                hook: None,
                why: Some("Logs (rate-limited) and drops a frame between isolated machines."),
                pair: None,
                rules: vec![Rule::new(vec![], log), Rule::new(vec![], Action::Drop)],
            });
        }
        chains
    }
}

/// The element of a port set as nft writes it after the two addresses.
pub fn service_elements<A: Ord + std::fmt::Display>(flows: &MachineFlows<A>) -> Vec<String> {
    flows
        .services
        .iter()
        .flat_map(|((s, d), set)| {
            set.iter()
                .map(move |(p, span)| format!("{s} . {d} . {} . {span}", p.as_str()))
        })
        .collect()
}
