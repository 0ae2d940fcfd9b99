//! The ruleset as an ordered list of chains and rules: the one truth for
//! the verdicts. `render` writes each condition with [`Cond::nft`] and each
//! action with [`Action::nft`]; `eval` walks the same list in the same order
//! and answers for a packet. Changing a rule, its order or its match text
//! here changes both.

use super::{AddrExceptions, HostPlan, PairExceptions, PortSet};
use crate::model::{IfName, PortSpan, Protocol};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// Named sets and maps of the table (each name written once).
pub const DOMAIN_BRIDGES: &str = "domain_bridges";
pub const PAIRS: &str = "pairs";
pub const INBOUND: &str = "inbound";
pub const EGRESS: &str = "egress";
pub const EGRESS_PORTS: &str = "egress_ports";
pub const EGRESS_PORT_RANGES: &str = "egress_port_ranges";
pub const PROTECTED_V4: &str = "protected_v4";
pub const PROTECTED_V6: &str = "protected_v6";
pub const PROTECTED_OPEN: &str = "protected_open";
pub const GATEWAY_SERVICES: &str = "gateway_services";
pub const HOST_OPEN: &str = "host_open";
pub const HOST_SERVICES: &str = "host_services";
pub const HOST_OPEN_V4: &str = "host_open_v4";
pub const HOST_SERVICES_V4: &str = "host_services_v4";
pub const HOST_OPEN_V6: &str = "host_open_v6";
pub const HOST_SERVICES_V6: &str = "host_services_v6";
pub const DENY_LOG: &str = "deny_log";
pub const HOST_DENY_LOG: &str = "host_deny_log";
pub const LOG_BUDGET: &str = "log_budget";
/// Isolated domains, for packets the host routes back onto their bridge.
pub const ROUTED_INSIDE_V4: &str = "routed_inside_v4";
pub const ROUTED_INSIDE_V6: &str = "routed_inside_v6";
/// The isolated domains' machine MACs (the inet table's own copy).
pub const MACHINE_MACS: &str = "machine_macs";

/// Chains and their hooks.
pub const FORWARD_CHAIN: &str = "isolation";
pub const INPUT_CHAIN: &str = "host_input";
pub const INVALID_CHAIN: &str = "invalid";
pub const PROTECTED_CHAIN: &str = "protected";
/// Packets towards interfaces that are not domain bridges, when protected
/// networks or restricted domains need more than one accept.
pub const OUTSIDE_CHAIN: &str = "outside";
/// The one chain every restricted domain whose port list no other domain
/// shares goes to (and a closed one, to log): its ports are in
/// `egress_ports` and `egress_port_ranges`, keyed by bridge.
pub const RESTRICTED_CHAIN: &str = "egress_restricted";
/// Before Incus's own chains (priority 0).
pub const PRIORITY: i32 = -1;

/// ICMPv6 a bridge needs from its gateway for IPv6 to work at all.
pub const ICMPV6_LINK: &[&str] = &[
    "nd-neighbor-solicit",
    "nd-neighbor-advert",
    "nd-router-solicit",
    "mld-listener-report",
    "mld-listener-done",
    "mld2-listener-report",
];

/// The chain a pair that some policy opens jumps to.
pub fn pair_chain_name(from: &IfName, to: &IfName) -> String {
    // Interface names never hold '/', and nft identifiers may: the name
    // cannot be read two ways.
    format!("pair/{from}/{to}")
}

/// The chain of what policies open from a bridge towards protected networks.
pub fn protected_chain_name(from: &IfName) -> String {
    format!("protected/{from}")
}

/// The chain of what policies from a domain with restricted internet open
/// towards networks outside.
pub fn egress_chain_name(from: &IfName) -> String {
    format!("egress/{from}")
}

/// The chain of an egress port list several restricted domains share.
pub fn egress_list_chain_name(index: usize) -> String {
    format!("egress-list/{index}")
}

/// How many restricted domains must share a port list for it to get its
/// own chain (a handful of plain rules, loaded once) instead of one
/// `egress_ports` element per domain and port: `nft -f` pays for every
/// element, and 1000 domains on a few lists are thousands of elements.
pub const SHARED_LIST_MIN: usize = 2;

/// The port lists at least [`SHARED_LIST_MIN`] restricted domains share,
/// sorted (the index names their chain).
pub fn shared_egress_lists(egress: &BTreeMap<IfName, super::EgressRules>) -> Vec<super::PortSet> {
    let mut uses: BTreeMap<&super::PortSet, usize> = BTreeMap::new();
    for rules in egress.values() {
        if !rules.ports.is_empty() {
            *uses.entry(&rules.ports).or_default() += 1;
        }
    }
    uses.into_iter()
        .filter(|(_, n)| *n >= SHARED_LIST_MIN)
        .map(|(ports, _)| ports.clone())
        .collect()
}

/// Where the `egress` map sends a restricted domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EgressTarget {
    /// Closed, no policy to a network, not logged: nothing to look at.
    Drop,
    /// A chain: the chain of a shared port list, the shared
    /// [`RESTRICTED_CHAIN`], or the domain's own chain of what its policies
    /// to networks open (which then goes to one of the other two).
    Chain(String),
}

/// The chain of what policies open from networks outside into a bridge.
pub fn inbound_chain_name(to: &IfName) -> String {
    format!("inbound/{to}")
}

/// The chain that logs and drops what a domain's bridge may not send.
pub fn deny_chain_name(bridge: &IfName) -> String {
    format!("deny-{bridge}")
}

pub fn host_deny_chain_name(bridge: &IfName) -> String {
    format!("host-deny-{bridge}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub(super) fn ip(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }
}

/// Which interfaces an `iifname`/`oifname` match selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfSel {
    /// `@domain_bridges`
    Known,
    /// `!= @domain_bridges <pattern>* != ...`: neither known nor named like
    /// a domain bridge.
    NotDomainish,
    /// `"<pattern>*"`: any present or future domain bridge name.
    Wildcard,
}

/// Where a packet to the host is addressed, as `fib` tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FibSel {
    /// `fib daddr . iif type { local, broadcast, multicast }`: the
    /// gateway on the bridge it came in on, or a broadcast/multicast there.
    OwnLink,
    /// `fib daddr . iif type local`: the gateway address itself.
    OwnGateway,
    /// `fib daddr . iif type { local, multicast }`
    OwnGatewayOrMulticast,
    /// `fib daddr type local`: any of the host's addresses.
    AnyHostAddress,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    CtEstablished,
    Iif(IfSel),
    Oif(IfSel),
    Fib(FibSel),
    /// `meta l4proto . th dport @gateway_services`
    GatewayService,
    Echo(Family),
    /// ICMPv6 neighbour discovery, router solicitation, MLD.
    Icmpv6Link,
    /// `iifname @host_open`
    HostOpen,
    /// `iifname . meta l4proto . th dport @host_services`
    HostServices,
    /// `iifname . ip saddr @host_open_v4`, ...
    HostOpenAddr(Family),
    HostServicesAddr(Family),
    /// In a pair chain: one source address (`ip saddr`, `ip6 saddr`).
    Saddr(IpAddr),
    /// In a pair chain: one destination address.
    Daddr(IpAddr),
    /// In a pair chain: one port or range (`tcp dport 9000-9010`).
    Dport(Protocol, PortSpan),
    /// `ct status dnat`: a connection whose destination Incus rewrote (a
    /// network forward, a proxy device in NAT mode).
    CtDnat,
    /// In an inbound chain: a source network (`ip saddr 192.0.2.0/24`).
    SaddrNet(ipnet::IpNet),
    /// In an egress chain: a destination network.
    DaddrNet(ipnet::IpNet),
    /// `ip daddr @protected_v4`, `ip6 daddr @protected_v6`.
    DaddrProtected(Family),
    /// `iifname . oifname . ip saddr . ip daddr @routed_inside_v4`: in and
    /// out of one isolated domain's bridge, both ends in its subnet.
    RoutedInside(Family),
    /// `ether daddr != @machine_macs`: not addressed to a known machine,
    /// so routed by the host (its own MAC) rather than bridged.
    EtherDaddrNotMachine,
    /// `iifname . meta l4proto . th dport @egress_ports`: the source
    /// bridge's own egress ports (single ports: a hash lookup), or with
    /// `ranges` its port ranges in `@egress_port_ranges` (an interval set).
    EgressPorts {
        ranges: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Accept,
    Drop,
    /// Cross-domain drop: through the per-domain log chain when logging.
    Deny,
    /// Host-input drop: through the per-domain log chain when logging.
    HostDeny,
    /// Log with this prefix (rate-limited) and go on.
    Log(String),
    Jump(String),
    /// `iifname . oifname vmap @pairs`: accept, or jump to the pair's chain.
    PairsVmap,
    /// `iifname vmap @protected_open`: a bridge that policies open towards
    /// networks jumps to its chain of them.
    ProtectedOpenVmap,
    /// `iifname vmap @egress`: a domain whose internet is restricted is
    /// dropped or jumps to its egress chain ([`HostPlan::egress_target`]).
    EgressVmap,
    /// `oifname vmap @inbound`: a bridge some policy opens to networks
    /// outside jumps to its inbound chain.
    InboundVmap,
    /// `ct state vmap { established : accept, related : accept, invalid :
    /// jump invalid }`: one rule for what conntrack already knows.
    CtVmap,
}

/// A rule: conditions (the inet table's [`Cond`], or the bridge table's
/// [`super::machines::BCond`]) and an action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule<C = Cond> {
    /// Why the rule sits where it sits, rendered as a comment above it.
    pub why: Option<&'static str>,
    pub conds: Vec<C>,
    pub action: Action,
}

impl<C> Rule<C> {
    pub(super) fn new(conds: Vec<C>, action: Action) -> Rule<C> {
        Rule {
            why: None,
            conds,
            action,
        }
    }

    pub(super) fn why(mut self, why: &'static str) -> Rule<C> {
        self.why = Some(why);
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain<C = Cond> {
    pub name: String,
    /// `(hook, priority)` for base chains (policy accept).
    pub hook: Option<(&'static str, i32)>,
    pub why: Option<&'static str>,
    /// The pair a pair chain belongs to.
    pub pair: Option<(IfName, IfName)>,
    pub rules: Vec<Rule<C>>,
}

impl HostPlan {
    /// The whole ruleset's chains, in order; base chains first.
    pub fn chains(&self) -> Vec<Chain> {
        let mut chains = vec![self.forward_chain(), self.input_chain()];
        if self.conntrack {
            chains.push(self.invalid_chain());
        }
        if self.has_protected() {
            chains.push(self.protected_chain());
            for (from, nets) in &self.protected_open {
                chains.push(Chain {
                    name: protected_chain_name(from),
                    hook: None,
                    why: Some(
                        "What policies open from this bridge to networks that are protected.",
                    ),
                    pair: None,
                    rules: net_rules(nets, Cond::DaddrNet),
                });
            }
        }
        for (to, nets) in &self.inbound {
            chains.push(Chain {
                name: inbound_chain_name(to),
                hook: None,
                why: Some("What policies open from networks outside the domains into this bridge."),
                pair: None,
                rules: net_rules(nets, Cond::SaddrNet),
            });
        }
        if self.needs_outside_chain() {
            chains.push(self.outside_chain());
        }
        if self.needs_restricted_chain() {
            chains.push(self.restricted_chain());
        }
        for (index, ports) in self.egress_lists.iter().enumerate() {
            let mut rules: Vec<Rule> = port_rules(ports, vec![]).collect();
            rules.extend(self.egress_denied());
            chains.push(Chain {
                name: egress_list_chain_name(index),
                hook: None,
                why: Some(
                    "An egress port list that several restricted domains share: its ports, the \
                     rest dropped.",
                ),
                pair: None,
                rules,
            });
        }
        for (from, rules) in &self.egress {
            if rules.nets.is_empty() {
                continue;
            }
            let mut net = net_rules(&rules.nets, Cond::DaddrNet);
            net.push(match self.ports_target(rules) {
                EgressTarget::Drop => Rule::new(vec![], Action::Drop),
                EgressTarget::Chain(chain) => Rule::new(vec![], Action::Jump(chain)),
            });
            chains.push(Chain {
                name: egress_chain_name(from),
                hook: None,
                why: Some(
                    "What the policies of this restricted domain open towards networks outside; \
                     then its egress ports, and the rest is dropped.",
                ),
                pair: None,
                rules: net,
            });
        }
        for ((from, to), pair) in &self.pairs {
            if !pair.all {
                chains.push(Chain {
                    name: pair_chain_name(from, to),
                    hook: None,
                    why: None,
                    pair: Some((from.clone(), to.clone())),
                    rules: pair_rules(pair),
                });
            }
        }
        chains
    }

    pub(super) fn log(&self, event: &str) -> Option<Action> {
        self.logging
            .as_ref()
            .map(|l| Action::Log(l.line_prefix(event, None)))
    }

    fn forward_chain(&self) -> Chain {
        use Cond::*;
        let mut rules = Vec::new();
        if self.conntrack {
            rules.push(Rule::new(vec![], Action::CtVmap).why(
                "Replies of connections that a rule below allowed, first: this is the one rule \
                 most packets take. Invalid packets go to their own chain, new ones go on.",
            ));
        }
        rules.push(if self.needs_outside_chain() {
            Rule::new(
                vec![Oif(IfSel::NotDomainish)],
                Action::Jump(OUTSIDE_CHAIN.into()),
            )
            .why(
                "Towards anything that is not a domain bridge (the internet, other interfaces): \
                 one lookup, then the protected networks and restricted domains in their own \
                 chain, which ends in accept. Unidirectional flows stay \"new\" for conntrack, \
                 so this is the path most of their packets take.",
            )
        } else {
            Rule::new(vec![Oif(IfSel::NotDomainish)], Action::Accept).why(
                "Towards anything that is not a domain bridge (the internet, other interfaces): \
                 egress leaves after one lookup. Unidirectional flows stay \"new\" for conntrack, \
                 so this is the path most of their packets take.",
            )
        });
        let mut first = true;
        for (family, used) in [
            (Family::V4, !self.isolated_subnets_v4().is_empty()),
            (Family::V6, !self.isolated_subnets_v6().is_empty()),
        ] {
            if !used {
                continue;
            }
            let mut conds = vec![RoutedInside(family)];
            if !self.isolation.macs.is_empty() {
                conds.push(EtherDaddrNotMachine);
            }
            let rule = Rule::new(conds, Action::Deny);
            rules.push(if std::mem::take(&mut first) {
                rule.why(
                    "A machine of a domain that isolates its machines sending to a neighbour \
                     through the gateway's MAC: the host would route it back onto the bridge, \
                     out of the bridge table's sight. Bridged frames (br_netfilter on) are \
                     addressed to the machine's own MAC and were judged by the bridge table.",
                )
            } else {
                rule
            });
        }
        rules.push(Rule::new(vec![], Action::PairsVmap).why(
            "Between two known domains: one lookup decides. Same-bridge, admin and port-less \
                 pairs accept; a pair that policies open jumps to its own small chain; any other \
                 pair goes on to the drops.",
        ));
        rules.extend(self.inbound_rules());
        rules.push(
            Rule::new(vec![Iif(IfSel::Known), Oif(IfSel::Known)], Action::Deny)
                .why("Cross-domain traffic between known bridges."),
        );
        rules.push(
            Rule::new(vec![Iif(IfSel::Known), Oif(IfSel::Wildcard)], Action::Deny).why(
                "Fail closed for bridges created after this render: a known domain cannot reach \
                 them, and they cannot reach a known domain. Their own same-bridge traffic \
                 (iifname == oifname, unknown) is untouched.",
            ),
        );
        if let Some(log) = self.log("DENY-UNKNOWN") {
            rules.push(Rule::new(
                vec![Iif(IfSel::Wildcard), Oif(IfSel::Known)],
                log,
            ));
        }
        rules.push(Rule::new(
            vec![Iif(IfSel::Wildcard), Oif(IfSel::Known)],
            Action::Drop,
        ));
        Chain {
            name: FORWARD_CHAIN.into(),
            hook: Some(("forward", PRIORITY)),
            why: Some(
                "Routed traffic between bridges. Priority -1 runs before Incus's own chains \
                 (priority 0); a drop here is final for the packet, whereas an accept only ends \
                 this chain, so other tables keep their say.",
            ),
            pair: None,
            rules,
        }
    }

    /// New connections from outside the domains (the uplink, another
    /// bridge, routed IPv6) into a domain: here only packets whose output
    /// is a domain bridge are left, since egress left above.
    fn inbound_rules(&self) -> Vec<Rule> {
        use Cond::*;
        let outside = || Iif(IfSel::NotDomainish);
        if !self.conntrack {
            // Without conntrack, replies to a domain's own internet traffic
            // look like new connections from outside: dropping them would cut
            // every domain off the internet.
            return vec![Rule::new(vec![outside()], Action::Accept).why(
                "From outside the domains: without conntrack, replies to a domain's own \
                 connections cannot be told from new connections, so inbound stays open.",
            )];
        }
        let mut rules = vec![Rule::new(vec![outside(), CtDnat], Action::Accept).why(
            "From outside into a domain, what Incus publishes: network forwards and proxy \
             devices in NAT mode rewrite the destination (DNAT) before this hook.",
        )];
        if !self.inbound.is_empty() {
            rules.push(
                Rule::new(vec![outside()], Action::InboundVmap)
                    .why("What policies open from networks outside into a domain: one lookup."),
            );
        }
        if let Some(log) = self.log("DENY-INBOUND") {
            rules.push(Rule::new(vec![outside()], log));
        }
        rules.push(
            Rule::new(vec![outside()], Action::Drop)
                .why("Every other new connection from outside into a domain."),
        );
        rules
    }

    pub fn has_protected(&self) -> bool {
        !(self.protected_v4.is_empty() && self.protected_v6.is_empty())
    }

    fn protected_chain(&self) -> Chain {
        let mut rules = Vec::new();
        if !self.protected_open.is_empty() {
            rules.push(Rule::new(vec![], Action::ProtectedOpenVmap));
        }
        if let Some(log) = self.log("DENY-PROTECTED") {
            rules.push(Rule::new(vec![], log));
        }
        rules.push(Rule::new(vec![], Action::Drop));
        Chain {
            name: PROTECTED_CHAIN.into(),
            hook: None,
            why: Some(
                "A domain's packet to a protected network: what a policy from its domain opens, \
                 then dropped.",
            ),
            pair: None,
            rules,
        }
    }

    /// Egress needs more than `accept` when some network is protected or
    /// some domain restricted.
    fn needs_outside_chain(&self) -> bool {
        self.has_protected() || !self.egress.is_empty()
    }

    /// What the `egress` map does with a restricted domain. No chain per
    /// domain: 1000 of them took `nft -f` over its bar (144 ms); only a
    /// domain whose policies open networks has its own.
    pub fn egress_target(&self, bridge: &IfName, rules: &super::EgressRules) -> EgressTarget {
        if rules.nets.is_empty() {
            self.ports_target(rules)
        } else {
            EgressTarget::Chain(egress_chain_name(bridge))
        }
    }

    /// Where a restricted domain's egress ports are checked: the chain of
    /// its list when other domains share it, else the shared chain and the
    /// `egress_ports` set (a closed domain: drop, or that chain to log).
    fn ports_target(&self, rules: &super::EgressRules) -> EgressTarget {
        if let Ok(index) = self.egress_lists.binary_search(&rules.ports) {
            EgressTarget::Chain(egress_list_chain_name(index))
        } else if rules.ports.is_empty() && self.logging.is_none() {
            EgressTarget::Drop
        } else {
            EgressTarget::Chain(RESTRICTED_CHAIN.into())
        }
    }

    fn needs_restricted_chain(&self) -> bool {
        self.egress
            .values()
            .any(|r| self.ports_target(r) == EgressTarget::Chain(RESTRICTED_CHAIN.into()))
    }

    /// Whether a restricted domain's ports are elements of `egress_ports`:
    /// it has ports, and no other domain shares its list.
    pub fn in_egress_ports(&self, rules: &super::EgressRules) -> bool {
        !rules.ports.is_empty() && self.egress_lists.binary_search(&rules.ports).is_err()
    }

    /// The elements of `egress_ports` (single ports) or, with `ranges`,
    /// of `egress_port_ranges`.
    pub fn egress_port_elements(
        &self,
        ranges: bool,
    ) -> impl Iterator<Item = (&IfName, Protocol, PortSpan)> + '_ {
        self.egress
            .iter()
            .filter(|(_, r)| self.in_egress_ports(r))
            .flat_map(move |(b, r)| {
                r.ports
                    .iter()
                    .filter(move |(_, s)| is_range(*s) == ranges)
                    .map(move |(p, s)| (b, *p, *s))
            })
    }

    /// Whether `egress_ports` (or `egress_port_ranges`) has elements.
    pub fn has_egress_ports(&self, ranges: bool) -> bool {
        self.egress_port_elements(ranges).next().is_some()
    }

    /// The end of every egress chain: log (when logging) and drop.
    fn egress_denied(&self) -> Vec<Rule> {
        let mut rules = Vec::new();
        if let Some(log) = self.log("DENY-EGRESS") {
            rules.push(Rule::new(vec![], log));
        }
        rules.push(Rule::new(vec![], Action::Drop));
        rules
    }

    fn outside_chain(&self) -> Chain {
        use Cond::*;
        let mut rules: Vec<Rule> = Vec::new();
        for (family, used) in [
            (Family::V4, !self.protected_v4.is_empty()),
            (Family::V6, !self.protected_v6.is_empty()),
        ] {
            if used {
                // The address first: a packet of the other family stops at
                // the protocol compare nft puts before it, and one to the
                // internet at the interval lookup.
                let rule = Rule::new(
                    vec![DaddrProtected(family), Iif(IfSel::Known)],
                    Action::Jump(PROTECTED_CHAIN.into()),
                );
                rules.push(if rules.is_empty() {
                    rule.why(
                        "Protected networks (the LAN, management, cluster networks): no domain \
                         reaches them outside the domains, whatever its internet setting, except \
                         through a policy. One interval lookup per new egress packet.",
                    )
                } else {
                    rule
                });
            }
        }
        if !self.egress.is_empty() {
            rules.push(Rule::new(vec![], Action::EgressVmap).why(
                "Domains whose internet is restricted: one lookup on the source bridge drops a \
                 closed one or sends it to the chain of its port list; the others go on.",
            ));
        }
        rules.push(Rule::new(vec![], Action::Accept));
        Chain {
            name: OUTSIDE_CHAIN.into(),
            hook: None,
            why: Some(
                "A new packet from any interface towards one that is not a domain bridge (the \
                 internet, other interfaces).",
            ),
            pair: None,
            rules,
        }
    }

    fn restricted_chain(&self) -> Chain {
        let mut rules = Vec::new();
        // Single ports in a hash set (one hash lookup per packet, whatever
        // the number of domains), ranges apart in an interval set.
        for ranges in [false, true] {
            if self.has_egress_ports(ranges) {
                rules.push(Rule::new(
                    vec![Cond::EgressPorts { ranges }],
                    Action::Accept,
                ));
            }
        }
        rules.extend(self.egress_denied());
        Chain {
            name: RESTRICTED_CHAIN.into(),
            hook: None,
            why: Some(
                "What restricted domains whose port list no other domain shares may send \
                 outside the domains: their egress ports, one lookup keyed by source bridge (no \
                 chain per domain); the rest is dropped.",
            ),
            pair: None,
            rules,
        }
    }

    fn invalid_chain(&self) -> Chain {
        let mut rules = Vec::new();
        for sel in [Cond::Iif(IfSel::Known), Cond::Oif(IfSel::Known)] {
            if let Some(log) = self.log("INVALID") {
                rules.push(Rule::new(vec![sel.clone()], log));
            }
            rules.push(Rule::new(vec![sel], Action::Drop));
        }
        Chain {
            name: INVALID_CHAIN.into(),
            hook: None,
            why: Some(
                "Invalid packets to or from a domain: never part of a connection we allow. \
                 Other interfaces (Docker, a non-domain Incus bridge) keep their own policy.",
            ),
            pair: None,
            rules,
        }
    }

    fn input_chain(&self) -> Chain {
        use Cond::*;
        let mut rules = Vec::new();
        if self.conntrack {
            rules.push(Rule::new(vec![CtEstablished], Action::Accept));
        }
        rules.push(
            Rule::new(vec![Iif(IfSel::NotDomainish)], Action::Accept)
                .why("Not from a domain bridge: not ours to judge."),
        );
        if !self.gateway.ports.is_empty() {
            rules.push(
                Rule::new(vec![Fib(FibSel::OwnLink), GatewayService], Action::Accept).why(
                    "What a bridge needs from its own gateway (DHCP, DNS, and the operator's \
                     gateway_services), on the gateway address of the bridge the packet came \
                     in on and its broadcast/multicast: never on the host's other addresses.",
                ),
            );
        }
        if self.gateway.echo {
            for family in [Family::V4, Family::V6] {
                rules.push(Rule::new(
                    vec![Fib(FibSel::OwnGateway), Echo(family)],
                    Action::Accept,
                ));
            }
        }
        rules.push(
            Rule::new(
                vec![Fib(FibSel::OwnGatewayOrMulticast), Icmpv6Link],
                Action::Accept,
            )
            .why("IPv6 on the bridge needs neighbour discovery, router solicitation and MLD."),
        );
        let host = &self.host;
        let policy_rules = [
            (!host.open.is_empty(), HostOpen),
            (!host.services.is_empty(), HostServices),
            (!host.v4.open.is_empty(), HostOpenAddr(Family::V4)),
            (!host.v4.services.is_empty(), HostServicesAddr(Family::V4)),
            (!host.v6.open.is_empty(), HostOpenAddr(Family::V6)),
            (!host.v6.services.is_empty(), HostServicesAddr(Family::V6)),
        ];
        let mut first = true;
        for (used, cond) in policy_rules {
            if used {
                let rule = Rule::new(vec![cond], Action::Accept);
                rules.push(if first {
                    first = false;
                    rule.why(
                        "Policies to the host: their ports on every host address (its gateway on \
                         every bridge, its other interfaces).",
                    )
                } else {
                    rule
                });
            }
        }
        rules.push(
            Rule::new(
                vec![Iif(IfSel::Known), Fib(FibSel::AnyHostAddress)],
                Action::HostDeny,
            )
            .why("Everything else a domain sends to any host address."),
        );
        rules.push(
            Rule::new(vec![Iif(IfSel::Known)], Action::Drop)
                .why("Broadcast and multicast the host does not serve: dropped, not logged."),
        );
        rules.push(
            Rule::new(vec![Iif(IfSel::Wildcard)], Action::Drop)
                .why("Bridges created after this render: only the gateway services above."),
        );
        Chain {
            name: INPUT_CHAIN.into(),
            hook: Some(("input", PRIORITY)),
            why: Some(
                "Traffic addressed to the host itself. A domain reaches its own gateway only \
                 for what a bridge needs; every other port and every other host address is \
                 closed unless a policy to the host opens it.",
            ),
            pair: None,
            rules,
        }
    }
}

/// The rules of an inbound or egress chain: one plain rule per network and
/// port span (networks may overlap, which a set would refuse).
fn net_rules(
    nets: &std::collections::BTreeMap<ipnet::IpNet, super::NetExceptions>,
    cond: fn(ipnet::IpNet) -> Cond,
) -> Vec<Rule> {
    let mut rules = Vec::new();
    for (net, e) in nets {
        if e.all {
            rules.push(Rule::new(vec![cond(*net)], Action::Accept));
        } else {
            rules.extend(port_rules(&e.ports, vec![cond(*net)]));
        }
    }
    rules
}

/// The rules of a pair chain: one rule per exception the pair has, plain
/// comparisons and no anonymous set (the kernel names each anonymous set by
/// scanning the table's sets, so thousands of them load in quadratic time:
/// 13.9 s for 10,000 policies, 0.74 s as plain rules). A packet between two
/// domains only walks the chain of its own pair. The firewall router's
/// pair chains are these same rules.
pub fn pair_rules(pair: &PairExceptions) -> Vec<Rule> {
    let mut rules = Vec::new();
    rules.extend(port_rules(&pair.ports, vec![]));
    addr_rules(&pair.v4, IpAddr::V4, &mut rules);
    addr_rules(&pair.v6, IpAddr::V6, &mut rules);
    rules
}

fn port_rules(ports: &PortSet, conds: Vec<Cond>) -> impl Iterator<Item = Rule> + '_ {
    ports.iter().map(move |(proto, span)| {
        let mut all = conds.clone();
        all.push(Cond::Dport(*proto, *span));
        Rule::new(all, Action::Accept)
    })
}

fn addr_rules<A: Ord + Copy>(e: &AddrExceptions<A>, ip: fn(A) -> IpAddr, rules: &mut Vec<Rule>) {
    use Cond::{Daddr, Saddr};
    for s in &e.src_all {
        rules.push(Rule::new(vec![Saddr(ip(*s))], Action::Accept));
    }
    for (s, ports) in &e.src_ports {
        rules.extend(port_rules(ports, vec![Saddr(ip(*s))]));
    }
    for d in &e.dst_all {
        rules.push(Rule::new(vec![Daddr(ip(*d))], Action::Accept));
    }
    for (d, ports) in &e.dst_ports {
        rules.extend(port_rules(ports, vec![Daddr(ip(*d))]));
    }
    for (s, d) in &e.both_all {
        rules.push(Rule::new(
            vec![Saddr(ip(*s)), Daddr(ip(*d))],
            Action::Accept,
        ));
    }
    for ((s, d), ports) in &e.both_ports {
        rules.extend(port_rules(ports, vec![Saddr(ip(*s)), Daddr(ip(*d))]));
    }
}

impl IfSel {
    fn nft(self, field: &str, wildcard: &str) -> String {
        match self {
            IfSel::Known => format!("{field} @{DOMAIN_BRIDGES}"),
            IfSel::NotDomainish => {
                format!("{field} != @{DOMAIN_BRIDGES} {field} != \"{wildcard}\"")
            }
            IfSel::Wildcard => format!("{field} \"{wildcard}\""),
        }
    }
}

impl Cond {
    /// The match as nft text.
    pub fn nft(&self, plan: &HostPlan) -> String {
        self.nft_with(&plan.pattern.wildcard())
    }

    /// The match as nft text, `wildcard` standing for any domain bridge
    /// name (only interface matches use it).
    pub fn nft_with(&self, wildcard: &str) -> String {
        match self {
            Cond::CtEstablished => "ct state established,related".into(),
            Cond::Iif(sel) => sel.nft("iifname", wildcard),
            Cond::Oif(sel) => sel.nft("oifname", wildcard),
            Cond::Fib(FibSel::OwnLink) => {
                "fib daddr . iif type { local, broadcast, multicast }".into()
            }
            Cond::Fib(FibSel::OwnGateway) => "fib daddr . iif type local".into(),
            Cond::Fib(FibSel::OwnGatewayOrMulticast) => {
                "fib daddr . iif type { local, multicast }".into()
            }
            Cond::Fib(FibSel::AnyHostAddress) => "fib daddr type local".into(),
            Cond::GatewayService => format!("meta l4proto . th dport @{GATEWAY_SERVICES}"),
            Cond::Echo(Family::V4) => "icmp type echo-request".into(),
            Cond::Echo(Family::V6) => "icmpv6 type echo-request".into(),
            Cond::Icmpv6Link => format!("icmpv6 type {{ {} }}", ICMPV6_LINK.join(", ")),
            Cond::HostOpen => format!("iifname @{HOST_OPEN}"),
            Cond::HostServices => format!("iifname . meta l4proto . th dport @{HOST_SERVICES}"),
            Cond::HostOpenAddr(f) => {
                let set = if *f == Family::V4 {
                    HOST_OPEN_V4
                } else {
                    HOST_OPEN_V6
                };
                format!("iifname . {} saddr @{set}", f.ip())
            }
            Cond::HostServicesAddr(f) => {
                let set = if *f == Family::V4 {
                    HOST_SERVICES_V4
                } else {
                    HOST_SERVICES_V6
                };
                format!(
                    "iifname . {} saddr . meta l4proto . th dport @{set}",
                    f.ip()
                )
            }
            Cond::Saddr(a) => format!("{} saddr {a}", ip_of(a)),
            Cond::Daddr(a) => format!("{} daddr {a}", ip_of(a)),
            Cond::Dport(p, span) => format!("{} dport {span}", p.as_str()),
            Cond::CtDnat => "ct status dnat".into(),
            Cond::SaddrNet(net) => format!("{} saddr {net}", ip_of(&net.addr())),
            Cond::DaddrNet(net) => format!("{} daddr {net}", ip_of(&net.addr())),
            Cond::DaddrProtected(Family::V4) => format!("ip daddr @{PROTECTED_V4}"),
            Cond::DaddrProtected(Family::V6) => format!("ip6 daddr @{PROTECTED_V6}"),
            Cond::RoutedInside(Family::V4) => {
                format!("iifname . oifname . ip saddr . ip daddr @{ROUTED_INSIDE_V4}")
            }
            Cond::RoutedInside(Family::V6) => {
                format!("iifname . oifname . ip6 saddr . ip6 daddr @{ROUTED_INSIDE_V6}")
            }
            Cond::EtherDaddrNotMachine => format!("ether daddr != @{MACHINE_MACS}"),
            Cond::EgressPorts { ranges } => format!(
                "iifname . meta l4proto . th dport @{}",
                if *ranges {
                    EGRESS_PORT_RANGES
                } else {
                    EGRESS_PORTS
                }
            ),
        }
    }
}

/// A span of more than one port (an interval element).
pub fn is_range(span: PortSpan) -> bool {
    span.first() != span.last()
}

fn ip_of(a: &IpAddr) -> &'static str {
    match a {
        IpAddr::V4(_) => "ip",
        IpAddr::V6(_) => "ip6",
    }
}

impl Action {
    pub fn nft(&self, plan: &HostPlan) -> String {
        self.nft_with(plan.logging.is_some())
    }

    /// The action as nft text, `logged` when the table has the deny-log
    /// maps.
    pub fn nft_with(&self, logged: bool) -> String {
        match self {
            Action::Accept => "accept".into(),
            Action::Drop => "drop".into(),
            Action::Deny if logged => format!("iifname vmap @{DENY_LOG}"),
            Action::HostDeny if logged => format!("iifname vmap @{HOST_DENY_LOG}"),
            Action::Deny | Action::HostDeny => "drop".into(),
            Action::Log(prefix) => {
                format!("limit name \"{LOG_BUDGET}\" log prefix \"{prefix}\" level info")
            }
            Action::Jump(chain) => format!("jump {chain}"),
            Action::PairsVmap => format!("iifname . oifname vmap @{PAIRS}"),
            Action::InboundVmap => format!("oifname vmap @{INBOUND}"),
            Action::EgressVmap => format!("iifname vmap @{EGRESS}"),
            Action::ProtectedOpenVmap => format!("iifname vmap @{PROTECTED_OPEN}"),
            Action::CtVmap => format!(
                "ct state vmap {{ established : accept, related : accept, invalid : jump \
                 {INVALID_CHAIN} }}"
            ),
        }
    }
}
