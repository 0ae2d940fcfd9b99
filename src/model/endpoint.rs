//! Resolving policy names against the world: a name is a domain (its whole
//! bridge), a machine (its addresses on its domain's bridge, never the whole
//! bridge), or the host.

use super::bridge::DomainBridge;
use super::names::{IfName, Name};
use super::policy::{EndpointRef, PolicySpec, Traffic};
use anyhow::{bail, Context};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An instance attached to a domain bridge, with the addresses it holds there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Machine {
    pub name: Name,
    pub project: String,
    pub bridge: IfName,
    pub ipv4: BTreeSet<Ipv4Addr>,
    pub ipv6: BTreeSet<Ipv6Addr>,
    /// `security.ipv4_filtering` / `security.ipv6_filtering` on its NIC:
    /// Incus then drops what it sends from an address that is not its own,
    /// so no other instance on the bridge can take its address.
    pub ipv4_filtering: bool,
    pub ipv6_filtering: bool,
    /// The NIC's MAC address (`volatile.<nic>.hwaddr`, or what the running
    /// instance reports): how the bridge table knows the machines of a
    /// domain that isolates its machines.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hwaddr: Option<super::MacAddr>,
    /// `security.mac_filtering` on its NIC: Incus then drops frames it
    /// sends from another MAC, so it cannot pass for another machine.
    pub mac_filtering: bool,
    /// Addresses it reported outside the subnets of its own bridge, left
    /// out by [`confine_to_bridges`] (anyone root inside an instance can add
    /// one; it must never open another domain's address).
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub ignored: BTreeSet<IpAddr>,
    /// False when its bridge's subnets are unknown (an explicit `bridges`
    /// entry Incus does not manage): its addresses are taken as reported.
    pub addresses_checked: bool,
}

impl Machine {
    /// A machine with addresses as given, nothing checked yet.
    pub fn new(name: Name, project: &str, bridge: IfName) -> Machine {
        Machine {
            name,
            project: project.to_string(),
            bridge,
            ipv4: BTreeSet::new(),
            ipv6: BTreeSet::new(),
            ipv4_filtering: false,
            ipv6_filtering: false,
            hwaddr: None,
            mac_filtering: false,
            ignored: BTreeSet::new(),
            addresses_checked: false,
        }
    }
}

/// A machine is its addresses inside the subnets of its own bridge: every
/// other address it reports is moved to `ignored`. The gateway (the host's
/// own address on the bridge) is never a machine's address either.
pub fn confine_to_bridges(machines: &mut [Machine], bridges: &[DomainBridge]) {
    for m in machines {
        let Some(b) = bridges.iter().find(|b| b.bridge == m.bridge) else {
            continue;
        };
        if !b.subnets_known {
            m.addresses_checked = false;
            continue;
        }
        m.addresses_checked = true;
        let (v4, v6) = (b.ipv4, b.ipv6);
        let keep4 = |a: &Ipv4Addr| v4.is_some_and(|n| n.trunc().contains(a) && n.addr() != *a);
        let keep6 = |a: &Ipv6Addr| v6.is_some_and(|n| n.trunc().contains(a) && n.addr() != *a);
        let (in4, out4): (BTreeSet<Ipv4Addr>, BTreeSet<Ipv4Addr>) =
            m.ipv4.iter().partition(|a| keep4(a));
        let (in6, out6): (BTreeSet<Ipv6Addr>, BTreeSet<Ipv6Addr>) =
            m.ipv6.iter().partition(|a| keep6(a));
        m.ignored.extend(out4.into_iter().map(IpAddr::V4));
        m.ignored.extend(out6.into_iter().map(IpAddr::V6));
        m.ipv4 = in4;
        m.ipv6 = in6;
    }
}

/// A resolved side of a policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Endpoint {
    Host,
    Domain {
        name: Name,
        bridge: IfName,
    },
    Machine {
        name: Name,
        bridge: IfName,
        ipv4: BTreeSet<Ipv4Addr>,
        ipv6: BTreeSet<Ipv6Addr>,
    },
    /// Addresses outside the domains, written as a CIDR.
    Network {
        cidr: ipnet::IpNet,
    },
}

impl Endpoint {
    pub fn bridge(&self) -> Option<&IfName> {
        match self {
            Endpoint::Host | Endpoint::Network { .. } => None,
            Endpoint::Domain { bridge, .. } | Endpoint::Machine { bridge, .. } => Some(bridge),
        }
    }
}

/// A policy with both ends resolved. `bidirectional` policies are kept as
/// one entry here (for the operator's report) and expanded by the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResolvedPolicy {
    pub position: usize,
    pub description: String,
    pub from: Endpoint,
    pub to: Endpoint,
    pub traffic: Traffic,
    pub bidirectional: bool,
    /// What the operator should know about how its names resolved
    /// (addresses ignored or unchecked, NICs without address filtering).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// What names can resolve to.
#[derive(Debug, Default)]
pub struct World<'a> {
    pub domains: BTreeMap<&'a str, &'a DomainBridge>,
    pub machines: BTreeMap<&'a str, Vec<&'a Machine>>,
}

impl<'a> World<'a> {
    pub fn new(bridges: &'a [DomainBridge], machines: &'a [Machine]) -> Self {
        let mut world = World::default();
        for bridge in bridges {
            world.domains.insert(bridge.domain.as_str(), bridge);
        }
        for machine in machines {
            world
                .machines
                .entry(machine.name.as_str())
                .or_default()
                .push(machine);
        }
        world
    }

    pub fn resolve(&self, spec: &PolicySpec) -> anyhow::Result<ResolvedPolicy> {
        let resolve = |side: &str, r: &EndpointRef| {
            self.resolve_ref(r)
                .with_context(|| format!("{}: `{side}`", spec.label()))
        };
        let mut warnings = Vec::new();
        for r in [&spec.from, &spec.to] {
            if let Some([m]) = self.machine_named(r) {
                warnings.extend(machine_warnings(m).map(|w| format!("{}: {w}", spec.label())));
            }
        }
        warnings.dedup();
        let from = resolve("from", &spec.from)?;
        let to = resolve("to", &spec.to)?;
        check_network_ends(&from, &to).with_context(|| spec.label())?;
        Ok(ResolvedPolicy {
            position: spec.position,
            description: spec.description.clone(),
            from,
            to,
            traffic: spec.traffic.clone(),
            bidirectional: spec.bidirectional,
            warnings,
        })
    }

    fn machine_named(&self, r: &EndpointRef) -> Option<&[&'a Machine]> {
        match r {
            EndpointRef::Named(name) if !self.domains.contains_key(name.as_str()) => {
                self.machines.get(name.as_str()).map(Vec::as_slice)
            }
            _ => None,
        }
    }

    fn resolve_ref(&self, r: &EndpointRef) -> anyhow::Result<Endpoint> {
        let name = match r {
            EndpointRef::Host => return Ok(Endpoint::Host),
            EndpointRef::Network(cidr) => return Ok(Endpoint::Network { cidr: *cidr }),
            EndpointRef::Named(name) => name,
        };
        let domain = self.domains.get(name.as_str());
        let machines = self.machines.get(name.as_str());
        match (domain, machines.map(Vec::as_slice)) {
            (Some(_), Some([_, ..])) => bail!(
                "\"{name}\" is both a domain and a machine name; rename one of them so the policy \
                 is not read wider or narrower than meant"
            ),
            (Some(d), _) => Ok(Endpoint::Domain {
                name: d.domain.clone(),
                bridge: d.bridge.clone(),
            }),
            (None, Some([m])) => {
                if m.ipv4.is_empty() && m.ipv6.is_empty() && !m.ignored.is_empty() {
                    let list: Vec<String> = m.ignored.iter().map(IpAddr::to_string).collect();
                    bail!(
                        "machine \"{name}\" has no address on {}: it only reports {}, outside \
                         the subnets of its bridge (ignored); give it an address on {}",
                        m.bridge,
                        list.join(", "),
                        m.bridge
                    );
                }
                if m.ipv4.is_empty() && m.ipv6.is_empty() {
                    bail!(
                        "machine \"{name}\" has no address on {}: start it or give its NIC a \
                         static ipv4.address, so the policy can name it exactly",
                        m.bridge
                    );
                }
                Ok(Endpoint::Machine {
                    name: m.name.clone(),
                    bridge: m.bridge.clone(),
                    ipv4: m.ipv4.clone(),
                    ipv6: m.ipv6.clone(),
                })
            }
            (None, Some(many)) if many.len() > 1 => {
                let projects: Vec<&str> = many.iter().map(|m| m.project.as_str()).collect();
                bail!(
                    "machine name \"{name}\" exists in several projects ({}); set the module's \
                     `project` option to pick one",
                    projects.join(", ")
                )
            }
            _ => {
                let domains: Vec<&str> = self.domains.keys().copied().collect();
                bail!(
                    "\"{name}\" is not a known domain ({}) nor a machine on a domain bridge",
                    domains.join(", ")
                )
            }
        }
    }
}

/// A CIDR end is a network outside the domains: the other end must be a
/// domain (inbound from that network into the domain), or the network is
/// the destination (outbound). Anything else would be read wider or
/// narrower than written, so it is refused.
fn check_network_ends(from: &Endpoint, to: &Endpoint) -> anyhow::Result<()> {
    match (from, to) {
        (Endpoint::Network { .. }, Endpoint::Network { .. }) => {
            bail!("`from` and `to` are both networks: a policy needs a domain, a machine or the host on one side")
        }
        (Endpoint::Network { cidr }, Endpoint::Machine { name, .. })
        | (Endpoint::Machine { name, .. }, Endpoint::Network { cidr }) => bail!(
            "a network ({cidr}) with a machine ({name}) is not supported yet: name the machine's \
             domain instead"
        ),
        (Endpoint::Network { cidr }, Endpoint::Host)
        | (Endpoint::Host, Endpoint::Network { cidr }) => {
            bail!(
                "a network ({cidr}) with the host: host isolation does not filter the host's \
                 traffic with networks outside the domains; name a domain instead"
            )
        }
        _ => Ok(()),
    }
}

/// What is not exact about a machine a policy names.
fn machine_warnings(m: &Machine) -> impl Iterator<Item = String> {
    let name = &m.name;
    let bridge = &m.bridge;
    let mut out = Vec::new();
    if !m.ignored.is_empty() {
        let list: Vec<String> = m.ignored.iter().map(IpAddr::to_string).collect();
        out.push(format!(
            "machine \"{name}\" reports {} outside the subnets of its bridge {bridge}: ignored \
             (a machine is only its addresses on its own bridge)",
            list.join(", ")
        ));
    }
    if !m.addresses_checked {
        out.push(format!(
            "machine \"{name}\" is on {bridge}, whose subnets are unknown (an explicit `bridges` \
             entry that Incus does not manage): its addresses are taken as it reports them, not \
             checked against the bridge"
        ));
    }
    for (family, used, filtering) in [
        ("ipv4", !m.ipv4.is_empty(), m.ipv4_filtering),
        ("ipv6", !m.ipv6.is_empty(), m.ipv6_filtering),
    ] {
        if used && !filtering {
            out.push(format!(
                "machine \"{name}\" has no security.{family}_filtering on its NIC on {bridge}: \
                 another instance on {bridge} can take its {family} address and get what the \
                 policy opens to it (set security.{family}_filtering=true on the NIC)"
            ));
        }
    }
    out.into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::names::BridgePattern;

    #[test]
    fn a_machine_is_only_its_addresses_on_its_own_bridge() {
        let pattern = BridgePattern::new("net-").unwrap();
        let mut perso = DomainBridge::new(IfName::new("net-perso").unwrap(), &pattern).unwrap();
        perso.ipv4 = Some("10.20.0.1/24".parse().unwrap());
        perso.ipv6 = Some("fd00:20::1/64".parse().unwrap());
        perso.subnets_known = true;
        let explicit = DomainBridge::new(IfName::new("br-x").unwrap(), &pattern).unwrap();
        let mut nas = Machine::new(
            Name::new("machine", "nas").unwrap(),
            "lab",
            IfName::new("net-perso").unwrap(),
        );
        nas.ipv4 = ["10.20.0.7", "10.30.0.7", "10.20.0.1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        nas.ipv6 = ["fd00:20::7", "fd00:30::7"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let mut other = Machine::new(
            Name::new("machine", "x").unwrap(),
            "lab",
            IfName::new("br-x").unwrap(),
        );
        other.ipv4.insert("192.0.2.9".parse().unwrap());
        let mut machines = [nas, other];
        confine_to_bridges(&mut machines, &[perso, explicit]);
        let [nas, other] = &machines;
        assert_eq!(nas.ipv4, BTreeSet::from(["10.20.0.7".parse().unwrap()]));
        assert_eq!(nas.ipv6, BTreeSet::from(["fd00:20::7".parse().unwrap()]));
        let ignored: Vec<String> = nas.ignored.iter().map(|a| a.to_string()).collect();
        assert_eq!(ignored, ["10.20.0.1", "10.30.0.7", "fd00:30::7"]);
        assert!(nas.addresses_checked);
        let warnings: Vec<String> = machine_warnings(nas).collect();
        assert!(warnings[0].contains("10.30.0.7") && warnings[0].contains("ignored"));
        assert!(warnings
            .iter()
            .any(|w| w.contains("security.ipv4_filtering")));
        // Unknown subnets: kept as reported, and said so.
        assert!(!other.addresses_checked);
        assert_eq!(other.ipv4.len(), 1);
        assert!(machine_warnings(other).any(|w| w.contains("not checked")));
    }
}
