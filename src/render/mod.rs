//! Rendering a plan to nft text. Pure: the same plan gives the same bytes
//! (sets are `BTreeSet`s, so element order is stable), which is what makes
//! "changed" and the Ansible diff meaningful.

use crate::model::{IfName, PortSpan, Protocol};
use crate::plan::{AddressSets, HostPlan};
use anyhow::Context;
use minijinja::Environment;
use serde::Serialize;
use std::fmt::Display;
use std::sync::OnceLock;

pub mod router;

const HOST_TEMPLATE: &str = include_str!("host.nft.j2");

/// The comment every table we render carries: the enforcer refuses to
/// replace or delete a live table of the same name without it (Incus's
/// `inet incus`, or anyone else's), so it only ever touches what it made.
pub const TABLE_COMMENT: &str = "managed by anklume-isolation";

fn environment() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(true);
        // The template is part of the binary: a syntax error in it is a
        // build defect caught by every render test.
        env.add_filter("nft_atom", nft_atom);
        env.add_template("host.nft", HOST_TEMPLATE)
            .expect("host.nft.j2 is a valid template");
        env
    })
}

/// Writes one field of a set element: names in double quotes (their
/// characters were validated, so quoting never needs escapes), everything
/// else as it is.
fn nft_atom(atom: minijinja::Value) -> Result<String, minijinja::Error> {
    let text = atom.get_attr("text")?;
    let quoted = atom.get_attr("quoted")?.is_true();
    Ok(if quoted {
        format!("\"{text}\"")
    } else {
        text.to_string()
    })
}

/// One field of a set element: names are quoted, addresses, protocols and
/// ports are written as they are.
#[derive(Serialize)]
struct Atom {
    text: String,
    quoted: bool,
}

fn name(n: &IfName) -> Atom {
    Atom {
        text: n.as_str().to_string(),
        quoted: true,
    }
}

fn raw(value: impl Display) -> Atom {
    Atom {
        text: value.to_string(),
        quoted: false,
    }
}

fn port(span: &PortSpan) -> Atom {
    raw(span)
}

fn proto(p: &Protocol) -> Atom {
    raw(p.as_str())
}

#[derive(Serialize)]
struct SetView {
    name: &'static str,
    why: &'static str,
    #[serde(rename = "type")]
    type_: String,
    interval: bool,
    elements: Vec<Vec<Atom>>,
}

#[derive(Serialize)]
struct DenyChain {
    bridge: String,
    name: String,
    prefix: String,
}

#[derive(Serialize)]
struct LoggingView {
    rate: String,
    invalid_prefix: String,
    unknown_prefix: String,
}

#[derive(Serialize)]
struct HostView {
    summary: String,
    table: String,
    table_comment: &'static str,
    wildcard: String,
    sets: Vec<SetView>,
    forward_accepts: Vec<&'static str>,
    host_accepts: Vec<&'static str>,
    conntrack: bool,
    logging: Option<LoggingView>,
    deny_chains: Vec<DenyChain>,
    host_deny_chains: Vec<DenyChain>,
    deny: &'static str,
    host_deny: &'static str,
}

/// The chain that logs and drops what a domain's bridge may not send.
/// Derived in one place so the map and the chain always agree.
pub fn deny_chain_name(bridge: &IfName) -> String {
    format!("deny-{bridge}")
}

pub fn host_deny_chain_name(bridge: &IfName) -> String {
    format!("host-deny-{bridge}")
}

/// One family's address sets, with the rules that consult them. `ip` is
/// `ip` or `ip6`, `addr` is `ipv4_addr` or `ipv6_addr`.
struct Family<'a, N: Ord> {
    sets: &'a AddressSets<N>,
    names: [&'static str; 5],
    rules: [&'static str; 5],
    addr: &'static str,
}

fn family_views<N: Ord + Display>(
    f: Family<'_, N>,
    sets: &mut Vec<SetView>,
) -> (Vec<&'static str>, Vec<&'static str>) {
    let [hosts_name, to_machine_name, from_machine_name, open_name, services_name] = f.names;
    let [hosts_rule, to_machine_rule, from_machine_rule, open_rule, services_rule] = f.rules;
    let mut forward = Vec::new();
    let mut host = Vec::new();
    if !f.sets.hosts.is_empty() {
        sets.push(SetView {
            name: hosts_name,
            why: "Policies naming a machine, every protocol: source bridge and address, destination bridge and address (a domain side is the whole address space of its bridge).",
            type_: format!("ifname . {0} . ifname . {0}", f.addr),
            interval: true,
            elements: f
                .sets
                .hosts
                .iter()
                .map(|(i, s, o, d)| vec![name(i), raw(s), name(o), raw(d)])
                .collect(),
        });
        forward.push(hosts_rule);
    }
    if !f.sets.to_machine.is_empty() {
        sets.push(SetView {
            name: to_machine_name,
            why: "Policies with ports towards a machine: source bridge and address, the machine's own address (its route is its bridge: domain subnets never overlap).",
            type_: format!("ifname . {0} . {0} . inet_proto . inet_service", f.addr),
            interval: true,
            elements: f
                .sets
                .to_machine
                .iter()
                .map(|(i, s, d, p, span)| vec![name(i), raw(s), raw(d), proto(p), port(span)])
                .collect(),
        });
        forward.push(to_machine_rule);
    }
    if !f.sets.from_machine.is_empty() {
        sets.push(SetView {
            name: from_machine_name,
            why: "Policies with ports from a machine to a whole domain: source bridge and address, destination bridge.",
            type_: format!("ifname . {} . ifname . inet_proto . inet_service", f.addr),
            interval: true,
            elements: f
                .sets
                .from_machine
                .iter()
                .map(|(i, s, o, p, span)| vec![name(i), raw(s), name(o), proto(p), port(span)])
                .collect(),
        });
        forward.push(from_machine_rule);
    }
    if !f.sets.host_open.is_empty() {
        sets.push(SetView {
            name: open_name,
            why: "Policies to the host, every protocol: source bridge and address.",
            type_: format!("ifname . {}", f.addr),
            interval: true,
            elements: f
                .sets
                .host_open
                .iter()
                .map(|(i, s)| vec![name(i), raw(s)])
                .collect(),
        });
        host.push(open_rule);
    }
    if !f.sets.host_services.is_empty() {
        sets.push(SetView {
            name: services_name,
            why: "Policies to the host, with ports.",
            type_: format!("ifname . {} . inet_proto . inet_service", f.addr),
            interval: true,
            elements: f
                .sets
                .host_services
                .iter()
                .map(|(i, s, p, span)| vec![name(i), raw(s), proto(p), port(span)])
                .collect(),
        });
        host.push(services_rule);
    }
    (forward, host)
}

/// Renders the host isolation ruleset of a plan.
pub fn host(plan: &HostPlan) -> anyhow::Result<String> {
    let mut sets = vec![
        SetView {
            name: "domain_bridges",
            why: "Every known domain bridge; the cross-domain drops match against it.",
            type_: "ifname".into(),
            interval: false,
            elements: plan.bridges().map(|b| vec![name(b)]).collect(),
        },
        SetView {
            name: "allowed_pairs",
            why: "Bridge pairs allowed every protocol: each bridge with itself (same-domain traffic), the admin domain towards every domain, port-less domain policies.",
            type_: "ifname . ifname".into(),
            interval: false,
            elements: plan
                .allowed_pairs
                .iter()
                .map(|(i, o)| vec![name(i), name(o)])
                .collect(),
        },
    ];
    let mut forward_accepts = vec!["iifname . oifname @allowed_pairs"];
    let mut host_accepts = Vec::new();
    if !plan.allowed_services.is_empty() {
        sets.push(SetView {
            name: "allowed_services",
            why: "Domain-to-domain policies with ports (ranges are intervals).",
            type_: "ifname . ifname . inet_proto . inet_service".into(),
            interval: true,
            elements: plan
                .allowed_services
                .iter()
                .map(|(i, o, p, span)| vec![name(i), name(o), proto(p), port(span)])
                .collect(),
        });
        forward_accepts.push("iifname . oifname . meta l4proto . th dport @allowed_services");
    }
    for (forward, host) in [
        family_views(
            Family {
                sets: &plan.v4,
                names: [
                    "allowed_hosts_v4",
                    "to_machine_v4",
                    "from_machine_v4",
                    "host_open_v4",
                    "host_services_v4",
                ],
                rules: [
                    "iifname . ip saddr . oifname . ip daddr @allowed_hosts_v4",
                    "iifname . ip saddr . ip daddr . meta l4proto . th dport @to_machine_v4",
                    "iifname . ip saddr . oifname . meta l4proto . th dport @from_machine_v4",
                    "iifname . ip saddr @host_open_v4",
                    "iifname . ip saddr . meta l4proto . th dport @host_services_v4",
                ],
                addr: "ipv4_addr",
            },
            &mut sets,
        ),
        family_views(
            Family {
                sets: &plan.v6,
                names: [
                    "allowed_hosts_v6",
                    "to_machine_v6",
                    "from_machine_v6",
                    "host_open_v6",
                    "host_services_v6",
                ],
                rules: [
                    "iifname . ip6 saddr . oifname . ip6 daddr @allowed_hosts_v6",
                    "iifname . ip6 saddr . ip6 daddr . meta l4proto . th dport @to_machine_v6",
                    "iifname . ip6 saddr . oifname . meta l4proto . th dport @from_machine_v6",
                    "iifname . ip6 saddr @host_open_v6",
                    "iifname . ip6 saddr . meta l4proto . th dport @host_services_v6",
                ],
                addr: "ipv6_addr",
            },
            &mut sets,
        ),
    ] {
        forward_accepts.extend(forward);
        host_accepts.extend(host);
    }

    let (logging, deny_chains, host_deny_chains) = match &plan.logging {
        None => (None, vec![], vec![]),
        Some(settings) => {
            let chains = |name_of: fn(&IfName) -> String, event: &str| {
                plan.domains
                    .iter()
                    .map(|(bridge, domain)| DenyChain {
                        bridge: bridge.to_string(),
                        name: name_of(bridge),
                        prefix: settings.line_prefix(event, Some(domain.as_str())),
                    })
                    .collect::<Vec<_>>()
            };
            (
                Some(LoggingView {
                    rate: settings.rate.clone(),
                    invalid_prefix: settings.line_prefix("INVALID", None),
                    unknown_prefix: settings.line_prefix("DENY-UNKNOWN", None),
                }),
                chains(deny_chain_name, "DENY"),
                chains(host_deny_chain_name, "HOST-DENY"),
            )
        }
    };
    let logged = logging.is_some();
    let view = HostView {
        summary: summary(plan),
        table: plan.table.to_string(),
        table_comment: TABLE_COMMENT,
        wildcard: plan.pattern.wildcard(),
        sets,
        forward_accepts,
        host_accepts,
        conntrack: plan.conntrack,
        logging,
        deny_chains,
        host_deny_chains,
        deny: if logged {
            "iifname vmap @deny_log"
        } else {
            "drop"
        },
        host_deny: if logged {
            "iifname vmap @host_deny_log"
        } else {
            "drop"
        },
    };
    environment()
        .get_template("host.nft")
        .and_then(|t| t.render(&view))
        .context("rendering the host ruleset template")
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
