//! The firewall router's plan (vm mode): a sibling of the host plan, built
//! from the same policy expansion, for a different enforcer.
//!
//! The host plan isolates bridges on the Incus host (policy accept, explicit
//! drops). The router is the firewall instance with one NIC per domain
//! bridge: everything it forwards is cross-domain by construction, so its
//! forward chain has policy drop and only names what passes: the admin
//! domain towards every domain (logged), ICMP (by default), and the network
//! policies. Its sets are keyed by the firewall's interface names, which the
//! plan derives from the bridges through the interface list.

pub mod host_routes;
pub mod links;

use super::{AddressSets, Capabilities, HostPlan, HostPlanInput, PolicyEffect, Warnings};
use crate::model::firewall::FirewallInterface;
use crate::model::{
    BridgePattern, IfName, LogSettings, Name, PortSpan, Protocol, ResolvedPolicy, TableName,
};
use anyhow::{ensure, Context};
use ipnet::{Ipv4Net, Ipv6Net};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// Log prefix of the router when the task does not set one (anklume's).
pub const DEFAULT_LOG_PREFIX: &str = "FW";

/// Everything `render::router` needs, decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouterPlan {
    pub table: TableName,
    /// Firewall interface -> its domain.
    pub interfaces: BTreeMap<IfName, Name>,
    /// The admin domain's interface: it opens connections to every domain.
    pub admin: Option<IfName>,
    /// Port-less domain policies (never an interface with itself).
    pub allowed_pairs: BTreeSet<(IfName, IfName)>,
    pub allowed_services: BTreeSet<(IfName, IfName, Protocol, PortSpan)>,
    /// Machine policies (`hosts`, `to_machine`, `from_machine` only: the
    /// host-input sets concern the Incus host, not the router).
    pub v4: AddressSets<Ipv4Net>,
    pub v6: AddressSets<Ipv6Net>,
    /// ICMP between domains accepted (anklume's default).
    pub icmp: bool,
    pub logging: Option<LogSettings>,
    pub conntrack: bool,
    pub policies: Vec<PolicyEffect>,
}

/// Inputs of a router plan, all validated.
pub struct RouterPlanInput<'a> {
    pub table: TableName,
    pub pattern: BridgePattern,
    pub interfaces: &'a [FirewallInterface],
    /// The admin domain's bridge (as on the host).
    pub admin: Option<IfName>,
    pub policies: Vec<ResolvedPolicy>,
    pub logging: Option<LogSettings>,
    pub icmp: bool,
    pub capabilities: Capabilities,
}

impl RouterPlan {
    pub fn build(input: RouterPlanInput<'_>) -> anyhow::Result<(RouterPlan, Warnings)> {
        ensure!(
            !input.interfaces.is_empty(),
            "no firewall interface: give `interfaces` (the list incus_firewall_vm_profile returns)"
        );
        let bridges: Vec<_> = input
            .interfaces
            .iter()
            .map(FirewallInterface::domain_bridge)
            .collect();
        // The same expansion as the host: the policies become bridge-keyed
        // set elements, which are then renamed to the firewall's interfaces.
        // The admin domain is kept out of it: the router logs it apart.
        let (host, mut warnings) = HostPlan::build(HostPlanInput {
            table: input.table.clone(),
            pattern: input.pattern,
            bridges: &bridges,
            admin: None,
            policies: input.policies,
            logging: input.logging,
            capabilities: input.capabilities,
        })?;
        let names: BTreeMap<&IfName, &IfName> = input
            .interfaces
            .iter()
            .map(|i| (&i.bridge, &i.name))
            .collect();
        let rename = |bridge: &IfName| -> IfName {
            (*names
                .get(bridge)
                .expect("every plan bridge comes from an interface"))
            .clone()
        };
        let admin = input
            .admin
            .as_ref()
            .map(|a| {
                names.get(a).map(|n| (*n).clone()).with_context(|| {
                    format!(
                        "admin_bridge {a} is not one of the firewall's bridges ({})",
                        bridges
                            .iter()
                            .map(|b| b.bridge.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })
            })
            .transpose()?;
        if !(host.v4.host_open.is_empty()
            && host.v4.host_services.is_empty()
            && host.v6.host_open.is_empty()
            && host.v6.host_services.is_empty())
        {
            warnings.push(
                "policies to `host` open the Incus host's own input: they are enforced by host \
                 isolation, not by the firewall router, which ignores them"
                    .to_string(),
            );
        }
        let plan = RouterPlan {
            table: input.table,
            interfaces: input
                .interfaces
                .iter()
                .map(|i| (i.name.clone(), i.domain.clone()))
                .collect(),
            admin,
            allowed_pairs: host
                .allowed_pairs
                .iter()
                .filter(|(i, o)| i != o)
                .map(|(i, o)| (rename(i), rename(o)))
                .collect(),
            allowed_services: host
                .allowed_services
                .iter()
                .map(|(i, o, p, s)| (rename(i), rename(o), *p, *s))
                .collect(),
            v4: forward_sets(&host.v4, &rename),
            v6: forward_sets(&host.v6, &rename),
            icmp: input.icmp,
            logging: host.logging,
            conntrack: host.conntrack,
            policies: host.policies,
        };
        Ok((plan, warnings))
    }

    pub fn interface_names(&self) -> impl Iterator<Item = &IfName> {
        self.interfaces.keys()
    }
}

/// The forwarding part of one family's address sets, interfaces renamed.
fn forward_sets<N: Ord + Copy>(
    sets: &AddressSets<N>,
    rename: &impl Fn(&IfName) -> IfName,
) -> AddressSets<N> {
    AddressSets {
        hosts: sets
            .hosts
            .iter()
            .map(|(i, s, o, d)| (rename(i), *s, rename(o), *d))
            .collect(),
        to_machine: sets
            .to_machine
            .iter()
            .map(|(i, s, d, p, span)| (rename(i), *s, *d, *p, *span))
            .collect(),
        from_machine: sets
            .from_machine
            .iter()
            .map(|(i, s, o, p, span)| (rename(i), *s, rename(o), *p, *span))
            .collect(),
        host_open: BTreeSet::new(),
        host_services: BTreeSet::new(),
    }
}

/// The router's logging: on unless disabled, prefix `FW` unless set.
pub fn router_logging(
    raw: &crate::model::logging::RawLogging,
) -> anyhow::Result<Option<LogSettings>> {
    let mut raw = raw.clone();
    raw.enabled = Some(raw.enabled.unwrap_or(true));
    raw.prefix = Some(
        raw.prefix
            .take()
            .unwrap_or_else(|| DEFAULT_LOG_PREFIX.to_string()),
    );
    LogSettings::from_raw(&raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::firewall::MacAddr;
    use crate::model::logging::RawLogging;
    use crate::model::{DomainBridge, Machine, PolicySpec, World};
    use serde_json::json;

    fn iface(bridge: &str, n: u8) -> FirewallInterface {
        let b = IfName::new(bridge).unwrap();
        FirewallInterface {
            domain: Name::new("domain", bridge.trim_start_matches("net-")).unwrap(),
            device: bridge.into(),
            name: IfName::new(&format!("fw{n}")).unwrap(),
            hwaddr: MacAddr::derive("fw", &b),
            ipv4: Some(format!("10.0.{n}.253/24").parse().unwrap()),
            ipv6: Some(format!("fd00:{n}::fd/64").parse().unwrap()),
            bridge: b,
        }
    }

    fn plan(policies: serde_json::Value, machines: &[Machine], icmp: bool) -> RouterPlan {
        let ifaces = [
            iface("net-admin", 1),
            iface("net-pro", 2),
            iface("net-perso", 3),
        ];
        let bridges: Vec<DomainBridge> = ifaces.iter().map(|i| i.domain_bridge()).collect();
        let world = World::new(&bridges, machines);
        let specs = PolicySpec::parse_all(policies.as_array().unwrap()).unwrap();
        let policies = specs.iter().map(|s| world.resolve(s).unwrap()).collect();
        RouterPlan::build(RouterPlanInput {
            table: TableName::new("anklume").unwrap(),
            pattern: BridgePattern::new("net-").unwrap(),
            interfaces: &ifaces,
            admin: Some(IfName::new("net-admin").unwrap()),
            policies,
            logging: router_logging(&RawLogging::default()).unwrap(),
            icmp,
            capabilities: Capabilities::ALL,
        })
        .unwrap()
        .0
    }

    fn n(s: &str) -> IfName {
        IfName::new(s).unwrap()
    }

    #[test]
    fn sets_use_the_firewall_interface_names_and_no_self_pairs() {
        let p = plan(
            json!([{"from": "pro", "to": "perso", "ports": "all"},
                   {"from": "perso", "to": "pro", "ports": [443]}]),
            &[],
            true,
        );
        assert_eq!(p.admin, Some(n("fw1")));
        assert_eq!(
            p.allowed_pairs,
            BTreeSet::from([(n("fw2"), n("fw3"))]),
            "only the policy; same-interface and admin pairs are not set elements"
        );
        assert_eq!(p.allowed_services.len(), 1);
        let (i, o, proto, span) = p.allowed_services.iter().next().unwrap();
        assert_eq!(
            (i, o, *proto, span.first()),
            (&n("fw3"), &n("fw2"), Protocol::Tcp, 443)
        );
        assert_eq!(p.interfaces.len(), 3);
    }

    #[test]
    fn machine_policies_keep_addresses_and_host_policies_are_left_to_the_host() {
        let m = Machine {
            name: Name::new("machine", "nas").unwrap(),
            project: "default".into(),
            bridge: n("net-perso"),
            ipv4: ["10.0.3.10".parse().unwrap()].into(),
            ipv6: Default::default(),
        };
        let p = plan(
            json!([{"from": "pro", "to": "nas", "ports": [22]},
                   {"from": "pro", "to": "host", "ports": [53], "protocol": "udp"}]),
            &[m],
            true,
        );
        assert_eq!(p.v4.to_machine.len(), 1);
        let (i, _, d, _, _) = p.v4.to_machine.iter().next().unwrap();
        assert_eq!((i, d.to_string().as_str()), (&n("fw2"), "10.0.3.10/32"));
        assert!(p.v6.is_empty(), "nas has no IPv6: nothing opens over IPv6");
        assert!(p.v4.host_services.is_empty());
    }

    #[test]
    fn logging_is_on_by_default_with_prefix_fw_and_can_be_turned_off() {
        let on = router_logging(&RawLogging::default()).unwrap().unwrap();
        assert_eq!(on.line_prefix("DENY", Some("pro")), "FW-DENY-PRO: ");
        let off = router_logging(&RawLogging {
            enabled: Some(false),
            ..RawLogging::default()
        })
        .unwrap();
        assert_eq!(off, None);
        let custom = router_logging(&RawLogging {
            prefix: Some("SYSFW".into()),
            ..RawLogging::default()
        })
        .unwrap()
        .unwrap();
        assert_eq!(custom.line_prefix("DROP", None), "SYSFW-DROP: ");
    }
}
