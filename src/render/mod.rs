//! Rendering a plan to nft text. Pure: the same plan gives the same bytes
//! (sets are `BTreeSet`s, so element order is stable), which is what makes
//! "changed" and the Ansible diff meaningful. The chains and rules come
//! from `plan::rules`, the list the evaluator walks too: this module only
//! formats them, and the template only loops and quotes.

use crate::model::IfName;
use crate::plan::machines::{
    service_elements, BCond, DENY_MACHINES_CHAIN, ISOLATED_MACS, ISOLATED_V4, ISOLATED_V6,
    MACHINE_OPEN_V4, MACHINE_OPEN_V6, MACHINE_SERVICES_V4, MACHINE_SERVICES_V6,
};
use crate::plan::rules::{
    inbound_chain_name, pair_chain_name, protected_chain_name, Chain, EgressTarget, DENY_LOG,
    DOMAIN_BRIDGES, EGRESS, EGRESS_PORTS, EGRESS_PORT_RANGES, GATEWAY_SERVICES, HOST_DENY_LOG,
    HOST_OPEN, HOST_OPEN_V4, HOST_OPEN_V6, HOST_SERVICES, HOST_SERVICES_V4, HOST_SERVICES_V6,
    INBOUND, LOG_BUDGET, MACHINE_MACS, PAIRS, PROTECTED_OPEN, PROTECTED_V4, PROTECTED_V6,
    ROUTED_INSIDE_V4, ROUTED_INSIDE_V6,
};
use crate::plan::{HostAddrExceptions, HostPlan, PairExceptions, PortSet};
use anyhow::Context;
use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Display;
use std::sync::OnceLock;

pub mod router;

pub use crate::plan::rules::{deny_chain_name, host_deny_chain_name};

const HOST_TEMPLATE: &str = include_str!("host.nft.j2");
const ROUTER_TEMPLATE: &str = include_str!("router.nft.j2");

/// The comment every table we render carries: the enforcer refuses to
/// replace or delete a live table of the same name without it (Incus's
/// `inet incus`, or anyone else's), so it only ever touches what it made.
pub const TABLE_COMMENT: &str = "managed by anklume-isolation";
/// Width of the `#` comments the renderer wraps.
const COMMENT_WIDTH: usize = 72;

/// Every template of the crate, with the same strict settings.
fn environment() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(true);
        // A misspelt variable in the template is an error, not an empty
        // string that would silently drop a match from a rule.
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        // The template is part of the binary: a syntax error in it is a
        // build defect caught by every render test.
        env.add_template("host.nft", HOST_TEMPLATE)
            .expect("host.nft.j2 is a valid template");
        env.add_template("router.nft", ROUTER_TEMPLATE)
            .expect("router.nft.j2 is a valid template");
        env
    })
}

/// The `pairs` verdict map's elements: a pair that opens everything
/// accepts, any other jumps to its own chain (host and router alike).
fn pair_map_elements(pairs: &BTreeMap<(IfName, IfName), PairExceptions>) -> Vec<String> {
    pairs
        .iter()
        .map(|((i, o), pair)| {
            let verdict = if pair.all {
                "accept".to_string()
            } else {
                format!("jump {}", pair_chain_name(i, o))
            };
            format!("{} . {} : {verdict}", quoted(i), quoted(o))
        })
        .collect()
}

fn quoted(n: &IfName) -> String {
    format!("\"{n}\"")
}

#[derive(Serialize)]
struct SetView {
    name: &'static str,
    why: Vec<String>,
    #[serde(rename = "type")]
    type_: String,
    interval: bool,
    elements: Vec<String>,
}

#[derive(Serialize)]
struct MapView {
    name: &'static str,
    why: Vec<String>,
    #[serde(rename = "type")]
    type_: &'static str,
    elements: Vec<String>,
}

#[derive(Serialize)]
struct RuleView {
    why: Vec<String>,
    text: String,
}

#[derive(Serialize)]
struct ChainView {
    name: String,
    why: Vec<String>,
    header: Option<String>,
    rules: Vec<RuleView>,
}

#[derive(Serialize)]
struct LogChain {
    name: String,
    prefix: String,
}

#[derive(Serialize)]
struct LoggingView {
    budget: &'static str,
    rate: String,
    chains: Vec<LogChain>,
}

/// The bridge table (isolation inside a domain): same name as the inet
/// table, always rendered on the host so that a render without isolated
/// domains removes the rules of an earlier one in the same atomic load.
#[derive(Serialize)]
struct BridgeView {
    sets: Vec<SetView>,
    /// The shared log budget, when the bridge chain logs.
    log_budget: Option<LoggingView>,
    chains: Vec<ChainView>,
}

#[derive(Serialize)]
struct HostView {
    summary: String,
    table: String,
    table_comment: &'static str,
    sets: Vec<SetView>,
    maps: Vec<MapView>,
    logging: Option<LoggingView>,
    chains: Vec<ChainView>,
    bridge: BridgeView,
}

/// Splits a sentence into comment lines.
fn wrap(text: &str) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let line = lines.last_mut().expect("never empty");
        if !line.is_empty() && line.len() + 1 + word.len() > COMMENT_WIDTH {
            lines.push(word.to_string());
        } else {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
    }
    lines
}

fn port_elements<K: Display>(
    map: &BTreeMap<K, PortSet>,
    key: impl Fn(&K) -> String,
) -> Vec<String> {
    map.iter()
        .flat_map(|(k, set)| {
            let k = key(k);
            set.iter()
                .map(move |(p, s)| format!("{k} . {} . {s}", p.as_str()))
        })
        .collect()
}

fn host_addr_sets<A: Ord + Display>(
    e: &HostAddrExceptions<A>,
    names: (&'static str, &'static str),
    addr: &str,
    sets: &mut Vec<SetView>,
) {
    if !e.open.is_empty() {
        sets.push(SetView {
            name: names.0,
            why: wrap(
                "Machines a policy to the host opens every packet for: their bridge and address.",
            ),
            type_: format!("ifname . {addr}"),
            interval: false,
            elements: e
                .open
                .iter()
                .map(|(b, a)| format!("{} . {a}", quoted(b)))
                .collect(),
        });
    }
    if !e.services.is_empty() {
        struct Key<'a, A>(&'a IfName, &'a A);
        impl<A: Display> Display for Key<'_, A> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "\"{}\" . {}", self.0, self.1)
            }
        }
        let keyed: BTreeMap<(IfName, String), PortSet> = e
            .services
            .iter()
            .map(|((b, a), set)| ((b.clone(), Key(b, a).to_string()), set.clone()))
            .collect();
        sets.push(SetView {
            name: names.1,
            why: wrap("Machines a policy to the host opens ports for: bridge, address, ports."),
            type_: format!("ifname . {addr} . inet_proto . inet_service"),
            interval: true,
            elements: keyed
                .iter()
                .flat_map(|((_, k), set)| {
                    set.iter()
                        .map(move |(p, s)| format!("{k} . {} . {s}", p.as_str()))
                })
                .collect(),
        });
    }
}

fn sets(plan: &HostPlan) -> Vec<SetView> {
    let mut sets = vec![SetView {
        name: DOMAIN_BRIDGES,
        why: wrap("Every known domain bridge."),
        type_: "ifname".into(),
        interval: false,
        elements: plan.bridges().map(quoted).collect(),
    }];
    for (name, elements, type_) in [
        (
            PROTECTED_V4,
            plan.protected_v4
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>(),
            "ipv4_addr",
        ),
        (
            PROTECTED_V6,
            plan.protected_v6.iter().map(|n| n.to_string()).collect(),
            "ipv6_addr",
        ),
    ] {
        if !elements.is_empty() {
            sets.push(SetView {
                name,
                why: wrap("Protected networks (the protected_networks option), aggregated."),
                type_: type_.into(),
                interval: true,
                elements,
            });
        }
    }
    for (name, type_, elements) in [
        (
            ROUTED_INSIDE_V4,
            "ifname . ifname . ipv4_addr . ipv4_addr",
            isolated_elements(plan, |(v4, _)| v4.map(|n| n.trunc().to_string())),
        ),
        (
            ROUTED_INSIDE_V6,
            "ifname . ifname . ipv6_addr . ipv6_addr",
            isolated_elements(plan, |(_, v6)| v6.map(|n| n.trunc().to_string())),
        ),
    ] {
        if !elements.is_empty() {
            sets.push(SetView {
                name,
                why: wrap(
                    "Domains that isolate their machines: in and out of their bridge, both \
                     ends in their subnet.",
                ),
                type_: type_.into(),
                interval: true,
                elements,
            });
        }
    }
    if !plan.isolation.macs.is_empty() {
        sets.push(SetView {
            name: MACHINE_MACS,
            why: wrap("MACs of the machines of domains that isolate their machines."),
            type_: "ether_addr".into(),
            interval: false,
            elements: plan
                .isolation
                .macs
                .iter()
                .map(ToString::to_string)
                .collect(),
        });
    }
    let gateway = PortSet::from(&plan.gateway);
    if !gateway.is_empty() {
        sets.push(SetView {
            name: GATEWAY_SERVICES,
            why: wrap("What a domain reaches on its own gateway (the gateway_services option)."),
            type_: "inet_proto . inet_service".into(),
            interval: true,
            elements: gateway
                .iter()
                .map(|(p, s)| format!("{} . {s}", p.as_str()))
                .collect(),
        });
    }
    for (name, ranges, why) in [
        (
            EGRESS_PORTS,
            false,
            "Egress ports of restricted domains whose list no other domain shares (the domains \
             option), by source bridge.",
        ),
        (EGRESS_PORT_RANGES, true, "The same for their port ranges."),
    ] {
        if plan.has_egress_ports(ranges) {
            sets.push(SetView {
                name,
                why: wrap(why),
                type_: "ifname . inet_proto . inet_service".into(),
                interval: ranges,
                elements: plan
                    .egress_port_elements(ranges)
                    .map(|(b, p, s)| format!("{} . {} . {s}", quoted(b), p.as_str()))
                    .collect(),
            });
        }
    }
    let host = &plan.host;
    if !host.open.is_empty() {
        sets.push(SetView {
            name: HOST_OPEN,
            why: wrap("Domains a policy to the host opens every packet for."),
            type_: "ifname".into(),
            interval: false,
            elements: host.open.iter().map(quoted).collect(),
        });
    }
    if !host.services.is_empty() {
        sets.push(SetView {
            name: HOST_SERVICES,
            why: wrap("Domains a policy to the host opens ports for."),
            type_: "ifname . inet_proto . inet_service".into(),
            interval: true,
            elements: port_elements(&host.services, quoted),
        });
    }
    host_addr_sets(
        &host.v4,
        (HOST_OPEN_V4, HOST_SERVICES_V4),
        "ipv4_addr",
        &mut sets,
    );
    host_addr_sets(
        &host.v6,
        (HOST_OPEN_V6, HOST_SERVICES_V6),
        "ipv6_addr",
        &mut sets,
    );
    sets
}

fn maps(plan: &HostPlan) -> Vec<MapView> {
    let mut maps = vec![MapView {
        name: PAIRS,
        why: wrap(
            "Bridge pairs with a verdict: each bridge with itself (same-domain traffic), the \
             admin domain towards every domain and port-less domain policies accept; a pair \
             that policies open with ports or for machines jumps to its own chain.",
        ),
        type_: "ifname . ifname : verdict",
        elements: pair_map_elements(&plan.pairs),
    }];
    if plan.has_protected() && !plan.protected_open.is_empty() {
        maps.push(MapView {
            name: PROTECTED_OPEN,
            why: wrap(
                "Domain bridges that policies open towards protected networks -> their chain.",
            ),
            type_: "ifname : verdict",
            elements: plan
                .protected_open
                .keys()
                .map(|b| format!("{} : jump {}", quoted(b), protected_chain_name(b)))
                .collect(),
        });
    }
    if !plan.egress.is_empty() {
        maps.push(MapView {
            name: EGRESS,
            why: wrap(
                "Domains whose internet is restricted -> drop (closed, not logged), or the chain \
                 of what they may still send outside the domains.",
            ),
            type_: "ifname : verdict",
            elements: plan
                .egress
                .iter()
                .map(|(b, rules)| match plan.egress_target(b, rules) {
                    EgressTarget::Drop => format!("{} : drop", quoted(b)),
                    EgressTarget::Chain(chain) => format!("{} : jump {chain}", quoted(b)),
                })
                .collect(),
        });
    }
    if !plan.inbound.is_empty() {
        maps.push(MapView {
            name: INBOUND,
            why: wrap(
                "Domain bridges that policies open to networks outside the domains -> the chain \
                 of those networks and ports.",
            ),
            type_: "ifname : verdict",
            elements: plan
                .inbound
                .keys()
                .map(|b| format!("{} : jump {}", quoted(b), inbound_chain_name(b)))
                .collect(),
        });
    }
    if plan.logging.is_some() {
        for (name, chain_of, why) in [
            (
                DENY_LOG,
                deny_chain_name as fn(&IfName) -> String,
                "Source bridge -> the chain that logs its denied packets with the domain in the \
                 prefix, then drops them.",
            ),
            (
                HOST_DENY_LOG,
                host_deny_chain_name,
                "The same for what a domain may not send to the host.",
            ),
        ] {
            maps.push(MapView {
                name,
                why: wrap(why),
                type_: "ifname : verdict",
                elements: plan
                    .bridges()
                    .map(|b| format!("{} : jump {}", quoted(b), chain_of(b)))
                    .collect(),
            });
        }
    }
    maps
}

fn chain_view<C>(plan: &HostPlan, chain: &Chain<C>, cond: impl Fn(&C) -> String) -> ChainView {
    let why = match (&chain.why, &chain.pair) {
        (Some(why), _) => wrap(why),
        (None, Some((from, to))) => wrap(&format!(
            "What policies open from {from} to {to} (domains {} -> {}).",
            plan.domains.get(from).map(|d| d.as_str()).unwrap_or("?"),
            plan.domains.get(to).map(|d| d.as_str()).unwrap_or("?"),
        )),
        (None, None) => vec![],
    };
    ChainView {
        name: chain.name.clone(),
        why,
        header: chain
            .hook
            .map(|(hook, prio)| format!("type filter hook {hook} priority {prio}; policy accept;")),
        rules: chain
            .rules
            .iter()
            .map(|rule| {
                let mut parts: Vec<String> = rule.conds.iter().map(&cond).collect();
                parts.push(rule.action.nft(plan));
                RuleView {
                    why: rule.why.map(wrap).unwrap_or_default(),
                    text: parts.join(" "),
                }
            })
            .collect(),
    }
}

/// Renders the host isolation ruleset of a plan.
pub fn host(plan: &HostPlan) -> anyhow::Result<String> {
    let logging = plan.logging.as_ref().map(|settings| {
        let mut chains = Vec::new();
        for (event, name_of) in [
            ("DENY", deny_chain_name as fn(&IfName) -> String),
            ("HOST-DENY", host_deny_chain_name),
        ] {
            chains.extend(plan.domains.iter().map(|(bridge, domain)| LogChain {
                name: name_of(bridge),
                prefix: settings.line_prefix(event, Some(domain.as_str())),
            }));
        }
        LoggingView {
            budget: LOG_BUDGET,
            rate: settings.rate.clone(),
            chains,
        }
    });
    let chains = plan.chains();
    let view = HostView {
        summary: summary(plan),
        table: plan.table.to_string(),
        table_comment: TABLE_COMMENT,
        sets: sets(plan),
        maps: maps(plan),
        logging,
        chains: chains
            .iter()
            .map(|c| chain_view(plan, c, |cond| cond.nft(plan)))
            .collect(),
        bridge: bridge_view(plan),
    };
    environment()
        .get_template("host.nft")
        .and_then(|t| t.render(&view))
        .context("rendering the host ruleset template")
}

/// `"<bridge>" . "<bridge>" . <subnet> . <subnet>` for each isolated
/// domain with a subnet in the family `net` picks.
fn isolated_elements(
    plan: &HostPlan,
    net: impl Fn(&(Option<ipnet::Ipv4Net>, Option<ipnet::Ipv6Net>)) -> Option<String>,
) -> Vec<String> {
    plan.isolation
        .domains
        .iter()
        .filter_map(|(b, nets)| net(nets).map(|n| format!("{0} . {0} . {n} . {n}", quoted(b))))
        .collect()
}

fn bridge_sets(plan: &HostPlan) -> Vec<SetView> {
    let iso = &plan.isolation;
    let mut sets = Vec::new();
    if !iso.macs.is_empty() {
        sets.push(SetView {
            name: ISOLATED_MACS,
            why: wrap("MACs of the machines of domains that isolate their machines."),
            type_: "ether_addr".into(),
            interval: false,
            elements: iso.macs.iter().map(ToString::to_string).collect(),
        });
    }
    let v4: Vec<String> = plan
        .isolated_subnets_v4()
        .iter()
        .map(|n| format!("{n} . {n}"))
        .collect();
    let v6: Vec<String> = plan
        .isolated_subnets_v6()
        .iter()
        .map(|n| format!("{n} . {n}"))
        .collect();
    for (name, type_, elements) in [
        (ISOLATED_V4, "ipv4_addr . ipv4_addr", v4),
        (ISOLATED_V6, "ipv6_addr . ipv6_addr", v6),
    ] {
        if !elements.is_empty() {
            sets.push(SetView {
                name,
                why: wrap(
                    "Both ends in the subnet of one domain that isolates its machines \
                     (subnet . subnet).",
                ),
                type_: type_.into(),
                interval: true,
                elements,
            });
        }
    }
    let addr = |v6: bool| if v6 { "ipv6_addr" } else { "ipv4_addr" };
    for (v6, open, services, open_name, services_name) in [
        (
            false,
            iso.v4
                .open
                .iter()
                .map(|(s, d)| format!("{s} . {d}"))
                .collect::<Vec<_>>(),
            service_elements(&iso.v4),
            MACHINE_OPEN_V4,
            MACHINE_SERVICES_V4,
        ),
        (
            true,
            iso.v6
                .open
                .iter()
                .map(|(s, d)| format!("{s} . {d}"))
                .collect(),
            service_elements(&iso.v6),
            MACHINE_OPEN_V6,
            MACHINE_SERVICES_V6,
        ),
    ] {
        if !services.is_empty() {
            sets.push(SetView {
                name: services_name,
                why: wrap(
                    "Policies between two machines of an isolated domain: source, target, \
                     protocol, ports.",
                ),
                type_: format!("{0} . {0} . inet_proto . inet_service", addr(v6)),
                interval: true,
                elements: services,
            });
        }
        if !open.is_empty() {
            sets.push(SetView {
                name: open_name,
                why: wrap("Port-less policies between two machines of an isolated domain."),
                type_: format!("{0} . {0}", addr(v6)),
                interval: false,
                elements: open,
            });
        }
    }
    sets
}

fn bridge_view(plan: &HostPlan) -> BridgeView {
    let chains = plan.bridge_chains();
    let logs = chains.iter().any(|c| c.name == DENY_MACHINES_CHAIN);
    BridgeView {
        sets: bridge_sets(plan),
        log_budget: plan
            .logging
            .as_ref()
            .filter(|_| logs)
            .map(|settings| LoggingView {
                budget: LOG_BUDGET,
                rate: settings.rate.clone(),
                chains: Vec::new(),
            }),
        chains: chains
            .iter()
            .map(|c| chain_view(plan, c, BCond::nft))
            .collect(),
    }
}

fn summary(plan: &HostPlan) -> String {
    let domains: Vec<&str> = plan.domains.values().map(|d| d.as_str()).collect();
    let shown = if domains.len() <= 12 {
        domains.join(", ")
    } else {
        format!(
            "{}, ... ({} in all)",
            domains[..12].join(", "),
            domains.len()
        )
    };
    let admin = match &plan.admin {
        Some(admin) => format!("admin bridge {admin}"),
        None => "no admin bridge".to_string(),
    };
    format!(
        "{} domain bridge(s) [{}], {}, {} network polic{}",
        domains.len(),
        shown,
        admin,
        plan.policies.len(),
        if plan.policies.len() == 1 { "y" } else { "ies" }
    )
}
