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

use super::{Capabilities, HostPlan, HostPlanInput, PairExceptions, PolicyEffect, Warnings};
use crate::model::firewall::FirewallInterface;
use crate::model::{
    BridgePattern, GatewayServices, IfName, LogSettings, Name, ResolvedPolicy, TableName,
};
use anyhow::{ensure, Context};
use std::collections::BTreeMap;

/// Log prefix of the router when the task does not set one (anklume's).
pub const DEFAULT_LOG_PREFIX: &str = "FW";

/// Everything `render::router` needs, decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterPlan {
    pub table: TableName,
    /// Firewall interface -> its domain.
    pub interfaces: BTreeMap<IfName, Name>,
    /// The admin domain's interface: it opens connections to every domain.
    pub admin: Option<IfName>,
    /// (source interface, destination interface) -> what the network
    /// policies open, the host plan's per-pair exceptions keyed by the
    /// firewall's interfaces. Never an interface with itself (everything the
    /// router forwards is cross-domain) and never the admin domain's
    /// blanket access (the router logs it apart). Pairs absent here are
    /// denied.
    pub pairs: BTreeMap<(IfName, IfName), PairExceptions>,
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
        // The same expansion as the host (`expand::flows` into per-pair
        // exceptions, with the same checks and policy report), whose pairs
        // are then renamed to the firewall's interfaces. The admin domain
        // is kept out of it: the router logs it apart. The host's own
        // input (gateway services, policies to `host`) is not the router's.
        let (host, mut warnings) = HostPlan::build(HostPlanInput {
            table: input.table.clone(),
            pattern: input.pattern,
            bridges: &bridges,
            admin: None,
            policies: input.policies,
            gateway: GatewayServices {
                ports: Default::default(),
                echo: false,
            },
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
        let h = &host.host;
        if !(h.open.is_empty()
            && h.services.is_empty()
            && h.v4.open.is_empty()
            && h.v4.services.is_empty()
            && h.v6.open.is_empty()
            && h.v6.services.is_empty())
        {
            warnings.push(
                "policies to `host` open the Incus host's own input: they are enforced by host \
                 isolation, not by the firewall router, which ignores them"
                    .to_string(),
            );
        }
        let pairs = host
            .pairs
            .into_iter()
            .filter(|((i, o), _)| i != o)
            .map(|((i, o), pair)| ((rename(&i), rename(&o)), pair))
            // The admin interface is accepted before the pairs lookup.
            .filter(|((i, _), _)| Some(i) != admin.as_ref())
            .collect();
        let plan = RouterPlan {
            table: input.table,
            interfaces: input
                .interfaces
                .iter()
                .map(|i| (i.name.clone(), i.domain.clone()))
                .collect(),
            admin,
            pairs,
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
    use crate::model::{DomainBridge, Machine, PolicySpec, Protocol, World};
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
    fn pairs_use_the_firewall_interface_names_and_no_self_or_admin_pairs() {
        let p = plan(
            json!([{"from": "pro", "to": "perso", "ports": "all"},
                   {"from": "perso", "to": "pro", "ports": [443]}]),
            &[],
            true,
        );
        assert_eq!(p.admin, Some(n("fw1")));
        assert_eq!(
            p.pairs.keys().cloned().collect::<Vec<_>>(),
            vec![(n("fw2"), n("fw3")), (n("fw3"), n("fw2"))],
            "only the policies; same-interface and admin pairs are not in the map"
        );
        assert!(p.pairs[&(n("fw2"), n("fw3"))].all);
        let back = &p.pairs[&(n("fw3"), n("fw2"))];
        assert!(!back.all);
        assert!(back.ports.contains(Protocol::Tcp, 443));
        assert_eq!(back.ports.len(), 1);
        assert_eq!(p.interfaces.len(), 3);
    }

    #[test]
    fn machine_policies_keep_addresses_and_host_policies_are_left_to_the_host() {
        let mut m = Machine::new(
            Name::new("machine", "nas").unwrap(),
            "default",
            n("net-perso"),
        );
        m.ipv4 = ["10.0.3.10".parse().unwrap()].into();
        m.ipv4_filtering = true;
        let p = plan(
            json!([{"from": "pro", "to": "nas", "ports": [22]},
                   {"from": "pro", "to": "host", "ports": [53], "protocol": "udp"}]),
            &[m],
            true,
        );
        assert_eq!(p.pairs.len(), 1, "the host policy adds no router pair");
        let pair = &p.pairs[&(n("fw2"), n("fw3"))];
        let addr: std::net::Ipv4Addr = "10.0.3.10".parse().unwrap();
        assert!(pair.v4.dst_ports[&addr].contains(Protocol::Tcp, 22));
        assert_eq!(pair.v4.dst_ports.len(), 1);
        assert!(
            pair.v6.dst_ports.is_empty() && pair.v6.dst_all.is_empty(),
            "nas has no IPv6: nothing opens over IPv6"
        );
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
