//! Resolving policy names against the world: a name is a domain (its whole
//! bridge), a machine (its addresses on its domain's bridge, never the whole
//! bridge), or the host.

use super::bridge::DomainBridge;
use super::names::{IfName, Name};
use super::policy::{EndpointRef, PolicySpec, Traffic};
use anyhow::{bail, Context};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};

/// An instance attached to a domain bridge, with the addresses it holds there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Machine {
    pub name: Name,
    pub project: String,
    pub bridge: IfName,
    pub ipv4: BTreeSet<Ipv4Addr>,
    pub ipv6: BTreeSet<Ipv6Addr>,
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
}

impl Endpoint {
    pub fn bridge(&self) -> Option<&IfName> {
        match self {
            Endpoint::Host => None,
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
        Ok(ResolvedPolicy {
            position: spec.position,
            description: spec.description.clone(),
            from: resolve("from", &spec.from)?,
            to: resolve("to", &spec.to)?,
            traffic: spec.traffic.clone(),
            bidirectional: spec.bidirectional,
        })
    }

    fn resolve_ref(&self, r: &EndpointRef) -> anyhow::Result<Endpoint> {
        let name = match r {
            EndpointRef::Host => return Ok(Endpoint::Host),
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
