//! Routing through the firewall, on the host (vm mode), for IPv4 and IPv6,
//! with nothing to configure in the instances.
//!
//! Every domain instance keeps the host as its default gateway (internet
//! egress unchanged). On the host, a packet that comes in on a domain bridge
//! from one domain subnet to another is marked, and one policy-routing rule
//! per bridge sends marked packets back out the same bridge to the
//! firewall's address there (one table per bridge, one default route each:
//! O(N) rules and routes). Why not DHCP option 121: it reaches only DHCP
//! clients (and only at renewal), and IPv6 has no equivalent (DESIGN 8).
//!
//! The same packets are also exempt from connection tracking (`notrack`):
//! otherwise Incus's masquerade (`saddr <subnet> daddr != <subnet>`, with no
//! output interface) rewrites the source of the packet it routes back to the
//! firewall to the host's gateway address, and the firewall would see every
//! connection as coming from the host. The host's isolation table keeps
//! dropping every cross-bridge forward (vm mode renders it with no
//! exception), so a packet that escapes this steering is dropped, never
//! routed between domains by the host. The host's redirects ("send it to the
//! firewall yourself") are dropped on the way out of domain bridges: with
//! br_netfilter, instances that accept them lose peers.

use crate::model::firewall::FirewallInterface;
use crate::model::{IfName, TableName};
use ipnet::{Ipv4Net, Ipv6Net};
use std::collections::BTreeSet;
use std::fmt::Write as _;

/// The packet mark bit of steered packets; rules match it under this mask
/// so other users of the mark keep their bits.
pub const STEER_MARK: u32 = 0x0041_0000;
/// Priority of the policy-routing rules: after `local` (0), before `main`
/// (32766), so the host's own addresses are still delivered locally.
pub const RULE_PRIORITY: u32 = 3253;
/// First routing table id; bridge i (sorted by name) uses base + i.
pub const TABLE_BASE: u32 = 0x4100;
/// Upper bound of our table ids (what removal considers ours).
pub const TABLE_LIMIT: u32 = TABLE_BASE + 0x1000;

/// One policy-routing rule: marked packets in on `bridge` use `table`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SteerRule {
    pub v6: bool,
    pub bridge: IfName,
    pub table: u32,
}

/// The one route of a bridge's table: to the firewall on that bridge.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SteerRoute {
    pub table: u32,
    pub via: String,
    pub dev: IfName,
    pub v6: bool,
}

/// Everything the host needs, decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SteerPlan {
    pub table: TableName,
    pub bridges: BTreeSet<IfName>,
    pub nets_v4: BTreeSet<Ipv4Net>,
    pub nets_v6: BTreeSet<Ipv6Net>,
    pub rules: BTreeSet<SteerRule>,
    pub routes: BTreeSet<SteerRoute>,
}

impl SteerPlan {
    pub fn build(table: TableName, interfaces: &[FirewallInterface]) -> anyhow::Result<SteerPlan> {
        anyhow::ensure!(
            interfaces.len() < (TABLE_LIMIT - TABLE_BASE) as usize,
            "too many domain bridges for the routing table range"
        );
        let mut sorted: Vec<&FirewallInterface> = interfaces.iter().collect();
        sorted.sort_by(|a, b| a.bridge.cmp(&b.bridge));
        let mut plan = SteerPlan {
            table,
            bridges: BTreeSet::new(),
            nets_v4: BTreeSet::new(),
            nets_v6: BTreeSet::new(),
            rules: BTreeSet::new(),
            routes: BTreeSet::new(),
        };
        for (i, iface) in sorted.into_iter().enumerate() {
            let table = TABLE_BASE + i as u32;
            plan.bridges.insert(iface.bridge.clone());
            if let Some(v4) = iface.ipv4 {
                plan.nets_v4.insert(v4.trunc());
                plan.rules.insert(SteerRule {
                    v6: false,
                    bridge: iface.bridge.clone(),
                    table,
                });
                plan.routes.insert(SteerRoute {
                    table,
                    via: v4.addr().to_string(),
                    dev: iface.bridge.clone(),
                    v6: false,
                });
            }
            if let Some(v6) = iface.ipv6 {
                plan.nets_v6.insert(v6.trunc());
                plan.rules.insert(SteerRule {
                    v6: true,
                    bridge: iface.bridge.clone(),
                    table,
                });
                plan.routes.insert(SteerRoute {
                    table,
                    via: v6.addr().to_string(),
                    dev: iface.bridge.clone(),
                    v6: true,
                });
            }
        }
        Ok(plan)
    }

    /// The host's steering table. The first two lines make the load an
    /// atomic replace of this table only.
    pub fn render(&self) -> String {
        let t = &self.table;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# Rendered by firewall_vm_routing (anklume-isolation, vm mode): steer traffic\n\
             # between domains to the firewall instance, untracked, and drop the host's\n\
             # redirects on domain bridges. Do not edit: re-run the module.\n\
             table inet {t} {{}}\n\
             delete table inet {t}\n\
             table inet {t} {{\n\
             \t# Marks the table as ours: the apply never replaces or deletes a\n\
             \t# table of this name that lacks it.\n\
             \tcomment \"{comment}\"\n",
            comment = crate::render::TABLE_COMMENT
        );
        let bridges: Vec<String> = self.bridges.iter().map(|b| format!("\"{b}\"")).collect();
        let _ = writeln!(
            s,
            "\tset domain_bridges {{\n\t\ttype ifname\n\t\telements = {{ {} }}\n\t}}\n",
            bridges.join(", ")
        );
        let mut steer_rules = Vec::new();
        for (fam, ip, addr, nets) in [
            ("v4", "ip", "ipv4_addr", set_elements(&self.nets_v4)),
            ("v6", "ip6", "ipv6_addr", set_elements(&self.nets_v6)),
        ] {
            if nets.is_empty() {
                continue;
            }
            let same: Vec<String> = nets.iter().map(|n| format!("{n} . {n}")).collect();
            let _ = writeln!(
                s,
                "\t# Domain subnets ({fam}).\n\
                 \tset domain_nets_{fam} {{\n\t\ttype {addr}\n\t\tflags interval\n\t\telements = {{ {} }}\n\t}}\n\n\
                 \t# A subnet with itself: same-domain traffic, left alone.\n\
                 \tset same_net_{fam} {{\n\t\ttype {addr} . {addr}\n\t\tflags interval\n\t\telements = {{ {} }}\n\t}}\n",
                nets.join(", "),
                same.join(", ")
            );
            steer_rules.push(format!(
                "\t\t{ip} saddr . {ip} daddr @same_net_{fam} accept\n\
                 \t\t{ip} saddr @domain_nets_{fam} {ip} daddr @domain_nets_{fam} meta mark set meta mark | {STEER_MARK:#x} notrack"
            ));
        }
        let _ = writeln!(
            s,
            "\t# Before conntrack (priority raw): from one domain subnet to another,\n\
             \t# marked for the policy-routing rules and untracked, so no NAT of the\n\
             \t# host rewrites it on its way to the firewall.\n\
             \tchain steer {{\n\
             \t\ttype filter hook prerouting priority raw; policy accept;\n\
             \t\tiifname != @domain_bridges accept\n\
             {}\n\
             \t}}\n\n\
             \t# The host routes steered packets back out the bridge they came in on,\n\
             \t# which makes it send redirects: never on domain bridges.\n\
             \tchain no_redirects {{\n\
             \t\ttype filter hook output priority filter; policy accept;\n\
             \t\toifname @domain_bridges icmp type redirect drop\n\
             \t\toifname @domain_bridges icmpv6 type nd-redirect drop\n\
             \t}}\n\
             }}",
            steer_rules.join("\n")
        );
        s
    }
}

fn set_elements<N: std::fmt::Display>(nets: &BTreeSet<N>) -> Vec<String> {
    nets.iter().map(ToString::to_string).collect()
}

/// The policy-routing state of the host that is ours (rules at our
/// priority, routes in our tables), as read by the runner.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingState {
    pub rules: BTreeSet<SteerRule>,
    pub routes: BTreeSet<SteerRoute>,
}

/// What to remove and add to go from `current` to `wanted`. Removals come
/// first; a removed route leaves its table empty, so marked packets fall
/// through to `main`, where the host isolation drops them (closed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingChange {
    pub del_rules: Vec<SteerRule>,
    pub add_rules: Vec<SteerRule>,
    pub del_routes: Vec<SteerRoute>,
    pub add_routes: Vec<SteerRoute>,
}

impl RoutingChange {
    pub fn is_empty(&self) -> bool {
        self.del_rules.is_empty()
            && self.add_rules.is_empty()
            && self.del_routes.is_empty()
            && self.add_routes.is_empty()
    }
}

pub fn routing_change(
    current: &RoutingState,
    wanted_rules: &BTreeSet<SteerRule>,
    wanted_routes: &BTreeSet<SteerRoute>,
) -> RoutingChange {
    RoutingChange {
        del_rules: current.rules.difference(wanted_rules).cloned().collect(),
        add_rules: wanted_rules.difference(&current.rules).cloned().collect(),
        del_routes: current.routes.difference(wanted_routes).cloned().collect(),
        add_routes: wanted_routes.difference(&current.routes).cloned().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BridgePattern, DomainBridge};

    fn ifaces(names: &[(&str, u8)]) -> Vec<FirewallInterface> {
        let p = BridgePattern::new("net-").unwrap();
        names
            .iter()
            .map(|(b, n)| {
                let mut d = DomainBridge::new(IfName::new(b).unwrap(), &p).unwrap();
                d.ipv4 = Some(format!("10.0.{n}.1/24").parse().unwrap());
                d.ipv6 = Some(format!("fd00:{n}::1/64").parse().unwrap());
                FirewallInterface::derive("fw", &d, 253).unwrap()
            })
            .collect()
    }

    #[test]
    fn one_rule_and_one_route_per_bridge_and_family() {
        let plan = SteerPlan::build(
            TableName::new("anklume_route").unwrap(),
            &ifaces(&[("net-pro", 2), ("net-a", 1)]),
        )
        .unwrap();
        assert_eq!(plan.rules.len(), 4);
        assert_eq!(plan.routes.len(), 4);
        let a = plan
            .routes
            .iter()
            .find(|r| r.dev.as_str() == "net-a" && !r.v6)
            .unwrap();
        assert_eq!((a.table, a.via.as_str()), (TABLE_BASE, "10.0.1.253"));
        let pro6 = plan
            .routes
            .iter()
            .find(|r| r.dev.as_str() == "net-pro" && r.v6)
            .unwrap();
        assert_eq!(
            (pro6.table, pro6.via.as_str()),
            (TABLE_BASE + 1, "fd00:2::fd")
        );
        let text = plan.render();
        assert!(
            text.contains("elements = { 10.0.1.0/24, 10.0.2.0/24 }"),
            "{text}"
        );
        assert!(text.contains("10.0.1.0/24 . 10.0.1.0/24"));
        assert!(text.contains("notrack"));
        assert!(text.contains("icmpv6 type nd-redirect drop"));
    }

    #[test]
    fn changes_remove_what_is_stale_and_add_what_is_missing() {
        let t = TableName::new("r").unwrap();
        let two = SteerPlan::build(t.clone(), &ifaces(&[("net-a", 1), ("net-b", 2)])).unwrap();
        let one = SteerPlan::build(t, &ifaces(&[("net-a", 1)])).unwrap();
        let current = RoutingState {
            rules: two.rules.clone(),
            routes: two.routes.clone(),
        };
        let change = routing_change(&current, &one.rules, &one.routes);
        assert_eq!(change.del_rules.len(), 2);
        assert_eq!(change.del_routes.len(), 2);
        assert!(change.add_rules.is_empty() && change.add_routes.is_empty());
        let same = RoutingState {
            rules: one.rules.clone(),
            routes: one.routes.clone(),
        };
        assert!(routing_change(&same, &one.rules, &one.routes).is_empty());
    }
}
