//! A pure evaluator of a plan: the verdict the rendered ruleset gives a
//! packet. It mirrors the rule order of `render::host` line for line, so the
//! property tests can compare "what the plan does" with "what the policies
//! say" without a kernel, and the golden and lab tests tie the rendered text
//! back to the kernel.

use super::{AddressSets, HostPlan};
use crate::model::Protocol;
use ipnet::{Ipv4Net, Ipv6Net};
use std::net::IpAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtState {
    New,
    Established,
    Invalid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    Tcp(u16),
    Udp(u16),
    Icmp,
}

impl L4 {
    fn port(self, proto: Protocol) -> Option<u16> {
        match (self, proto) {
            (L4::Tcp(p), Protocol::Tcp) | (L4::Udp(p), Protocol::Udp) => Some(p),
            _ => None,
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

/// A packet addressed to the host itself (input hook).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToHost<'a> {
    pub iif: &'a str,
    pub src: IpAddr,
    /// Whether the destination is one of the host's addresses on `iif`
    /// itself (its gateway on that bridge), as `fib daddr . iif` tells.
    pub dst_on_iif: bool,
    pub l4: L4,
    pub ct: CtState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
}

impl HostPlan {
    fn is_domain(&self, ifname: &str) -> bool {
        self.domains.keys().any(|b| b.as_str() == ifname)
    }

    fn matches_wildcard(&self, ifname: &str) -> bool {
        ifname.starts_with(self.pattern.as_str())
    }

    /// The verdict of the `isolation` chain (forward hook).
    pub fn forward_verdict(&self, p: &Forwarded<'_>) -> Verdict {
        if self.conntrack {
            match p.ct {
                CtState::Established => return Verdict::Accept,
                CtState::Invalid if self.is_domain(p.iif) || self.is_domain(p.oif) => {
                    return Verdict::Drop
                }
                CtState::Invalid | CtState::New => {}
            }
        }
        // The early accepts: only domain-to-domain traffic is judged below.
        let domainish = |ifname: &str| self.is_domain(ifname) || self.matches_wildcard(ifname);
        if !domainish(p.iif) || !domainish(p.oif) {
            return Verdict::Accept;
        }
        let pair = |a: &str, b: &str| {
            self.allowed_pairs
                .iter()
                .any(|(x, y)| x.as_str() == a && y.as_str() == b)
        };
        if pair(p.iif, p.oif) {
            return Verdict::Accept;
        }
        let service = self.allowed_services.iter().any(|(x, y, proto, span)| {
            x.as_str() == p.iif
                && y.as_str() == p.oif
                && p.l4.port(*proto).is_some_and(|port| span.contains(port))
        });
        if service {
            return Verdict::Accept;
        }
        let address_match = match (p.src, p.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => forward_allows(
                &self.v4,
                p,
                |n: &Ipv4Net| n.contains(&s),
                |n| n.contains(&d),
            ),
            (IpAddr::V6(s), IpAddr::V6(d)) => forward_allows(
                &self.v6,
                p,
                |n: &Ipv6Net| n.contains(&s),
                |n| n.contains(&d),
            ),
            _ => false,
        };
        if address_match {
            return Verdict::Accept;
        }
        let (from_known, to_known) = (self.is_domain(p.iif), self.is_domain(p.oif));
        // Three rules: known -> known, known -> new bridge, new -> known.
        let known_to_any = from_known && (to_known || self.matches_wildcard(p.oif));
        if known_to_any || (self.matches_wildcard(p.iif) && to_known) {
            return Verdict::Drop;
        }
        Verdict::Accept
    }

    /// The verdict of the `host_input` chain (input hook).
    pub fn input_verdict(&self, p: &ToHost<'_>) -> Verdict {
        if self.conntrack && p.ct == CtState::Established {
            return Verdict::Accept;
        }
        let allowed = match p.src {
            IpAddr::V4(s) => host_allows(&self.v4, p, |n: &Ipv4Net| n.contains(&s)),
            IpAddr::V6(s) => host_allows(&self.v6, p, |n: &Ipv6Net| n.contains(&s)),
        };
        if allowed {
            return Verdict::Accept;
        }
        let from_domain = self.is_domain(p.iif) || self.matches_wildcard(p.iif);
        if from_domain && !p.dst_on_iif {
            return Verdict::Drop;
        }
        Verdict::Accept
    }
}

fn forward_allows<N: Ord>(
    sets: &AddressSets<N>,
    p: &Forwarded<'_>,
    src_in: impl Fn(&N) -> bool,
    dst_in: impl Fn(&N) -> bool,
) -> bool {
    let hosts = sets
        .hosts
        .iter()
        .any(|(i, s, o, d)| i.as_str() == p.iif && o.as_str() == p.oif && src_in(s) && dst_in(d));
    let port_in = |proto: &Protocol, span: &crate::model::PortSpan| {
        p.l4.port(*proto).is_some_and(|port| span.contains(port))
    };
    hosts
        || sets.to_machine.iter().any(|(i, s, d, proto, span)| {
            i.as_str() == p.iif && src_in(s) && dst_in(d) && port_in(proto, span)
        })
        || sets.from_machine.iter().any(|(i, s, o, proto, span)| {
            i.as_str() == p.iif && src_in(s) && o.as_str() == p.oif && port_in(proto, span)
        })
}

fn host_allows<N: Ord>(sets: &AddressSets<N>, p: &ToHost<'_>, src_in: impl Fn(&N) -> bool) -> bool {
    let open = sets
        .host_open
        .iter()
        .any(|(i, s)| i.as_str() == p.iif && src_in(s));
    open || sets.host_services.iter().any(|(i, s, proto, span)| {
        i.as_str() == p.iif
            && src_in(s)
            && p.l4.port(*proto).is_some_and(|port| span.contains(port))
    })
}
