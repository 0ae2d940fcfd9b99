//! Policy expansion, shared by every plan (the host's, the firewall
//! router's): a resolved policy becomes one or two directed flows whose ends
//! are what a rule can match, a bridge and the addresses on it, or the host.

use crate::model::{Endpoint, IfName, ResolvedPolicy, Traffic};
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Which addresses of one family a side stands for on its bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope<A: Ord> {
    /// The whole bridge (a domain).
    Whole,
    /// Only these addresses (a machine); empty means nothing in this family,
    /// so a machine without IPv6 opens nothing over IPv6.
    Only(BTreeSet<A>),
}

/// A non-host end of a flow: a bridge, and which addresses on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Side {
    pub bridge: IfName,
    pub v4: Scope<Ipv4Addr>,
    pub v6: Scope<Ipv6Addr>,
}

impl Side {
    pub fn is_whole(&self) -> bool {
        self.v4 == Scope::Whole
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    Host,
    Bridge(Side),
}

/// One direction of a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub from: End,
    pub to: End,
    pub traffic: Traffic,
}

fn end(e: &Endpoint) -> End {
    match e {
        Endpoint::Host => End::Host,
        Endpoint::Domain { bridge, .. } => End::Bridge(Side {
            bridge: bridge.clone(),
            v4: Scope::Whole,
            v6: Scope::Whole,
        }),
        Endpoint::Machine {
            bridge, ipv4, ipv6, ..
        } => End::Bridge(Side {
            bridge: bridge.clone(),
            v4: Scope::Only(ipv4.clone()),
            v6: Scope::Only(ipv6.clone()),
        }),
    }
}

/// The flows a policy opens: its own direction, and the reverse one when it
/// is bidirectional.
pub fn flows(policy: &ResolvedPolicy) -> Vec<Flow> {
    let forward = Flow {
        from: end(&policy.from),
        to: end(&policy.to),
        traffic: policy.traffic.clone(),
    };
    let mut out = vec![forward.clone()];
    if policy.bidirectional {
        out.push(Flow {
            from: forward.to,
            to: forward.from,
            traffic: policy.traffic.clone(),
        });
    }
    out
}
