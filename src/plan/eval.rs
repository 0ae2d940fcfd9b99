//! A pure evaluator of a plan: the verdict its ruleset gives a packet. It
//! walks the chains and rules of [`HostPlan::chains`], the same list the
//! renderer writes, so the property tests check the rules the kernel gets
//! (and the golden tests send real packets through the rendered text to
//! compare with this evaluator).

use super::machines::{BCond, MachineFlows, Way, BRIDGE_CHAIN};
use super::rules::{
    Action, Chain, Cond, EgressTarget, Family, FibSel, IfSel, FORWARD_CHAIN, INPUT_CHAIN,
};
use super::{HostAddrExceptions, HostPlan, PortSet};
use crate::model::{MacAddr, PortSpan, Protocol};
use std::net::IpAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtState {
    New,
    /// New, and its destination rewritten by Incus (a network forward, a
    /// proxy device in NAT mode): `ct status dnat`.
    NewDnat,
    Established,
    Invalid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    Tcp(u16),
    Udp(u16),
    /// ICMP or ICMPv6 echo request.
    Icmp,
    /// ICMPv6 neighbour solicitation (IPv6 only).
    Nd,
}

impl L4 {
    fn in_span(self, proto: Protocol, span: PortSpan) -> bool {
        match (self, proto) {
            (L4::Tcp(p), Protocol::Tcp) | (L4::Udp(p), Protocol::Udp) => span.contains(p),
            _ => false,
        }
    }

    fn in_ports(self, set: &PortSet) -> bool {
        match self {
            L4::Tcp(p) => set.contains(Protocol::Tcp, p),
            L4::Udp(p) => set.contains(Protocol::Udp, p),
            L4::Icmp | L4::Nd => false,
        }
    }
}

/// A packet routed from one interface to another (forward hook).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded<'a> {
    pub iif: &'a str,
    pub oif: &'a str,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
    pub ct: CtState,
}

/// Where a packet to the host is addressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostDst {
    /// The host's address on the bridge it came in on (its gateway).
    Gateway,
    /// Another of the host's addresses (a gateway on another bridge, the
    /// uplink's address).
    Elsewhere,
    Broadcast,
    Multicast,
}

/// A packet addressed to the host itself (input hook).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToHost<'a> {
    pub iif: &'a str,
    pub src: IpAddr,
    pub dst: HostDst,
    pub l4: L4,
    pub ct: CtState,
}

/// What a frame between two ports of one bridge carries (bridge family).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameL4 {
    Tcp {
        sport: u16,
        dport: u16,
        /// SYN without ACK: a packet opening a connection.
        bare_syn: bool,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    EchoRequest,
    EchoReply,
    /// ICMPv6 neighbour solicitation or advertisement.
    Nd,
    /// Any other IP protocol or ICMP type.
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    Arp,
    Ip {
        src: IpAddr,
        dst: IpAddr,
        l4: FrameL4,
    },
    /// Neither ARP nor IP.
    Other,
}

/// A frame forwarded between two ports of one bridge (bridge `forward`
/// hook): machine to machine, never to or from the host itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub src_mac: MacAddr,
    pub dst_mac: MacAddr,
    pub payload: Payload,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
}

/// What the rules look at, for either hook.
struct Packet<'a> {
    iif: &'a str,
    /// Empty on the input hook, as nft's `oifname` is there.
    oif: &'a str,
    src: IpAddr,
    dst: Option<IpAddr>,
    host_dst: Option<HostDst>,
    l4: L4,
    ct: CtState,
    /// The Ethernet destination of a forwarded packet: `None` for one the
    /// host routes (addressed to its own MAC), a machine's for one bridged
    /// with br_netfilter on.
    eth_dst: Option<MacAddr>,
}

impl HostPlan {
    fn is_domain(&self, ifname: &str) -> bool {
        self.domains.keys().any(|b| b.as_str() == ifname)
    }

    fn matches_wildcard(&self, ifname: &str) -> bool {
        ifname.starts_with(self.pattern.as_str())
    }

    fn selects(&self, sel: IfSel, ifname: &str) -> bool {
        match sel {
            IfSel::Known => self.is_domain(ifname),
            IfSel::NotDomainish => !self.is_domain(ifname) && !self.matches_wildcard(ifname),
            IfSel::Wildcard => self.matches_wildcard(ifname),
        }
    }

    /// An evaluator that keeps the chains, for many packets.
    pub fn evaluator(&self) -> Evaluator<'_> {
        Evaluator {
            plan: self,
            chains: self.chains(),
            bridge_chains: self.bridge_chains(),
        }
    }

    /// The verdict of the forward hook.
    pub fn forward_verdict(&self, p: &Forwarded<'_>) -> Verdict {
        self.evaluator().forward(p)
    }

    /// The verdict of the input hook.
    pub fn input_verdict(&self, p: &ToHost<'_>) -> Verdict {
        self.evaluator().input(p)
    }
}

/// A plan with its chains built once.
pub struct Evaluator<'a> {
    plan: &'a HostPlan,
    chains: Vec<Chain>,
    bridge_chains: Vec<Chain<BCond>>,
}

impl Evaluator<'_> {
    /// The verdict of the forward hook.
    pub fn forward(&self, p: &Forwarded<'_>) -> Verdict {
        self.forward_to_mac(p, None)
    }

    /// The verdict of the inet forward hook for a frame bridged between two
    /// machines of one bridge that br_netfilter hands to it (`iif == oif`,
    /// addressed to the machine's own MAC).
    pub fn forward_bridged(&self, p: &Forwarded<'_>, dst_mac: MacAddr) -> Verdict {
        self.forward_to_mac(p, Some(dst_mac))
    }

    /// The forward hook with the frame's destination MAC when it matters
    /// (`None`: routed, addressed to the host).
    fn forward_to_mac(&self, p: &Forwarded<'_>, eth_dst: Option<MacAddr>) -> Verdict {
        let packet = Packet {
            iif: p.iif,
            oif: p.oif,
            src: p.src,
            dst: Some(p.dst),
            host_dst: None,
            l4: p.l4,
            ct: p.ct,
            eth_dst,
        };
        self.base_verdict(FORWARD_CHAIN, &packet)
    }

    /// The verdict of the input hook.
    pub fn input(&self, p: &ToHost<'_>) -> Verdict {
        let packet = Packet {
            iif: p.iif,
            oif: "",
            src: p.src,
            dst: None,
            host_dst: Some(p.dst),
            l4: p.l4,
            ct: p.ct,
            eth_dst: None,
        };
        self.base_verdict(INPUT_CHAIN, &packet)
    }

    /// The verdict of the bridge table's forward hook (policy accept; no
    /// chain at all when no domain isolates its machines).
    pub fn bridge(&self, f: &Frame) -> Verdict {
        if self.bridge_chains.is_empty() {
            return Verdict::Accept;
        }
        run_bridge(self.plan, &self.bridge_chains, BRIDGE_CHAIN, f).unwrap_or(Verdict::Accept)
    }

    fn base_verdict(&self, chain: &str, p: &Packet<'_>) -> Verdict {
        // Base chains have policy accept.
        run(self.plan, &self.chains, chain, p).unwrap_or(Verdict::Accept)
    }
}

/// Runs one chain; `None` when the packet falls off its end (return).
fn run(plan: &HostPlan, chains: &[Chain], name: &str, p: &Packet<'_>) -> Option<Verdict> {
    let chain = chains
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("a rule jumps to chain {name}, which the plan does not have"));
    for rule in &chain.rules {
        if !rule.conds.iter().all(|c| holds(plan, c, p)) {
            continue;
        }
        let verdict = match &rule.action {
            Action::Accept => Some(Verdict::Accept),
            Action::Drop | Action::Deny | Action::HostDeny => Some(Verdict::Drop),
            Action::Log(_) => None,
            Action::Jump(target) => run(plan, chains, target, p),
            Action::CtVmap => match p.ct {
                CtState::Established => Some(Verdict::Accept),
                CtState::Invalid => run(plan, chains, super::rules::INVALID_CHAIN, p),
                CtState::New | CtState::NewDnat => None,
            },
            Action::PairsVmap => {
                let found = plan
                    .pairs
                    .iter()
                    .find(|((i, o), _)| i.as_str() == p.iif && o.as_str() == p.oif);
                match found {
                    None => None,
                    Some((_, pair)) if pair.all => Some(Verdict::Accept),
                    Some(((i, o), _)) => run(plan, chains, &super::rules::pair_chain_name(i, o), p),
                }
            }
            Action::ProtectedOpenVmap => {
                match plan.protected_open.keys().find(|b| b.as_str() == p.iif) {
                    None => None,
                    Some(b) => run(plan, chains, &super::rules::protected_chain_name(b), p),
                }
            }
            Action::EgressVmap => match plan.egress.iter().find(|(b, _)| b.as_str() == p.iif) {
                None => None,
                Some((b, rules)) => match plan.egress_target(b, rules) {
                    EgressTarget::Drop => Some(Verdict::Drop),
                    EgressTarget::Chain(name) => run(plan, chains, &name, p),
                },
            },
            Action::InboundVmap => match plan.inbound.keys().find(|b| b.as_str() == p.oif) {
                None => None,
                Some(b) => run(plan, chains, &super::rules::inbound_chain_name(b), p),
            },
        };
        if verdict.is_some() {
            return verdict;
        }
    }
    None
}

fn family_of(a: IpAddr) -> Family {
    match a {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    }
}

fn holds(plan: &HostPlan, c: &Cond, p: &Packet<'_>) -> bool {
    let fib = |accepted: &[HostDst]| p.host_dst.is_some_and(|d| accepted.contains(&d));
    match c {
        Cond::CtEstablished => p.ct == CtState::Established,
        Cond::Iif(sel) => plan.selects(*sel, p.iif),
        Cond::Oif(sel) => plan.selects(*sel, p.oif),
        Cond::Fib(FibSel::OwnLink) => {
            fib(&[HostDst::Gateway, HostDst::Broadcast, HostDst::Multicast])
        }
        Cond::Fib(FibSel::OwnGateway) => fib(&[HostDst::Gateway]),
        Cond::Fib(FibSel::OwnGatewayOrMulticast) => fib(&[HostDst::Gateway, HostDst::Multicast]),
        Cond::Fib(FibSel::AnyHostAddress) => fib(&[HostDst::Gateway, HostDst::Elsewhere]),
        Cond::GatewayService => p.l4.in_ports(&PortSet::from(&plan.gateway)),
        Cond::Echo(f) => p.l4 == L4::Icmp && family_of(p.src) == *f,
        Cond::Icmpv6Link => p.l4 == L4::Nd && family_of(p.src) == Family::V6,
        Cond::HostOpen => plan.host.open.iter().any(|b| b.as_str() == p.iif),
        Cond::HostServices => plan
            .host
            .services
            .iter()
            .any(|(b, set)| b.as_str() == p.iif && p.l4.in_ports(set)),
        Cond::HostOpenAddr(f) | Cond::HostServicesAddr(f) => {
            let ports = matches!(c, Cond::HostServicesAddr(_));
            match (f, p.src) {
                (Family::V4, IpAddr::V4(s)) => host_addr(&plan.host.v4, p, s, ports),
                (Family::V6, IpAddr::V6(s)) => host_addr(&plan.host.v6, p, s, ports),
                _ => false,
            }
        }
        Cond::Saddr(a) => p.src == *a,
        Cond::Daddr(a) => p.dst == Some(*a),
        Cond::Dport(Protocol::Tcp, span) => matches!(p.l4, L4::Tcp(port) if span.contains(port)),
        Cond::Dport(Protocol::Udp, span) => matches!(p.l4, L4::Udp(port) if span.contains(port)),
        Cond::CtDnat => p.ct == CtState::NewDnat,
        Cond::SaddrNet(net) => net.contains(&p.src),
        Cond::DaddrNet(net) => p.dst.is_some_and(|d| net.contains(&d)),
        Cond::RoutedInside(family) => {
            p.iif == p.oif
                && plan
                    .isolation
                    .domains
                    .iter()
                    .filter(|(b, _)| b.as_str() == p.iif)
                    .any(|(_, (v4, v6))| match (family, p.src, p.dst) {
                        (Family::V4, IpAddr::V4(s), Some(IpAddr::V4(d))) => {
                            v4.is_some_and(|n| n.trunc().contains(&s) && n.trunc().contains(&d))
                        }
                        (Family::V6, IpAddr::V6(s), Some(IpAddr::V6(d))) => {
                            v6.is_some_and(|n| n.trunc().contains(&s) && n.trunc().contains(&d))
                        }
                        _ => false,
                    })
        }
        Cond::EtherDaddrNotMachine => !p.eth_dst.is_some_and(|m| plan.isolation.macs.contains(&m)),
        Cond::DaddrProtected(_) => match p.dst {
            Some(IpAddr::V4(d)) => plan.protected_v4.iter().any(|n| n.contains(&d)),
            Some(IpAddr::V6(d)) => plan.protected_v6.iter().any(|n| n.contains(&d)),
            None => false,
        },
        Cond::EgressPorts { ranges } => plan
            .egress_port_elements(*ranges)
            .any(|(b, proto, span)| b.as_str() == p.iif && p.l4.in_span(proto, span)),
    }
}

fn host_addr<A: Ord + Copy>(
    e: &HostAddrExceptions<A>,
    p: &Packet<'_>,
    src: A,
    ports: bool,
) -> bool {
    if ports {
        e.services
            .iter()
            .any(|((b, a), set)| b.as_str() == p.iif && *a == src && p.l4.in_ports(set))
    } else {
        e.open.iter().any(|(b, a)| b.as_str() == p.iif && *a == src)
    }
}

/// Runs one chain of the bridge table; `None` when the frame falls off its
/// end.
fn run_bridge(plan: &HostPlan, chains: &[Chain<BCond>], name: &str, f: &Frame) -> Option<Verdict> {
    let chain = chains
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("a rule jumps to chain {name}, which the plan does not have"));
    for rule in &chain.rules {
        if !rule.conds.iter().all(|c| bridge_holds(plan, *c, f)) {
            continue;
        }
        let verdict = match &rule.action {
            Action::Accept => Some(Verdict::Accept),
            Action::Drop => Some(Verdict::Drop),
            Action::Log(_) => None,
            Action::Jump(target) => run_bridge(plan, chains, target, f),
            other => unreachable!("the bridge table has no {other:?}"),
        };
        if verdict.is_some() {
            return verdict;
        }
    }
    None
}

/// Whether `(a, b)` with this traffic is in one family's machine flows.
fn flows_hold<A: Ord + Copy>(
    flows: &MachineFlows<A>,
    a: A,
    b: A,
    l4: FrameL4,
    way: Way,
    services: bool,
) -> bool {
    if !services {
        return flows.open.contains(&(a, b));
    }
    let (proto, port) = match (l4, way) {
        (FrameL4::Tcp { dport, .. }, Way::Forward) => (Protocol::Tcp, dport),
        (FrameL4::Tcp { sport, .. }, Way::Reply) => (Protocol::Tcp, sport),
        (FrameL4::Udp { dport, .. }, Way::Forward) => (Protocol::Udp, dport),
        (FrameL4::Udp { sport, .. }, Way::Reply) => (Protocol::Udp, sport),
        _ => return false,
    };
    flows
        .services
        .get(&(a, b))
        .is_some_and(|set| set.contains(proto, port))
}

fn bridge_holds(plan: &HostPlan, c: BCond, f: &Frame) -> bool {
    let iso = &plan.isolation;
    let ip = match f.payload {
        Payload::Ip { src, dst, l4 } => Some((src, dst, l4)),
        Payload::Arp | Payload::Other => None,
    };
    let flows = |family: Family, way: Way, services: bool| match ip {
        Some((IpAddr::V4(s), IpAddr::V4(d), l4)) if family == Family::V4 => {
            let (a, b) = if way == Way::Forward { (s, d) } else { (d, s) };
            flows_hold(&iso.v4, a, b, l4, way, services)
        }
        Some((IpAddr::V6(s), IpAddr::V6(d), l4)) if family == Family::V6 => {
            let (a, b) = if way == Way::Forward { (s, d) } else { (d, s) };
            flows_hold(&iso.v6, a, b, l4, way, services)
        }
        _ => false,
    };
    match c {
        BCond::Arp => f.payload == Payload::Arp,
        BCond::NeighbourDiscovery => {
            matches!(ip, Some((IpAddr::V6(_), _, FrameL4::Nd)))
        }
        BCond::Services(family, way) => flows(family, way, true),
        BCond::Open(family, way) => flows(family, way, false),
        BCond::TcpNotSyn => matches!(
            ip,
            Some((
                _,
                _,
                FrameL4::Tcp {
                    bare_syn: false,
                    ..
                }
            ))
        ),
        BCond::Udp => matches!(ip, Some((_, _, FrameL4::Udp { .. }))),
        BCond::EchoReply(family) => {
            matches!(ip, Some((src, _, FrameL4::EchoReply)) if family_of(src) == family)
        }
        BCond::SrcMacIsolated => iso.macs.contains(&f.src_mac),
        BCond::DstMacIsolated => iso.macs.contains(&f.dst_mac),
        BCond::DstGroup => f.dst_mac.is_group(),
        BCond::InsideSubnet(Family::V4) => match ip {
            Some((IpAddr::V4(s), IpAddr::V4(d), _)) => plan
                .isolated_subnets_v4()
                .iter()
                .any(|n| n.contains(&s) && n.contains(&d)),
            _ => false,
        },
        BCond::InsideSubnet(Family::V6) => match ip {
            Some((IpAddr::V6(s), IpAddr::V6(d), _)) => plan
                .isolated_subnets_v6()
                .iter()
                .any(|n| n.contains(&s) && n.contains(&d)),
            _ => false,
        },
    }
}
