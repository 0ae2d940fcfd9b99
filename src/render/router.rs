//! Rendering a router plan to nft text: the firewall instance's own table
//! (vm mode). Pure, like the host render, and built from the same set views.

use super::{family_views, name, nft_atom, DenyChain, Family, SetView};
use crate::model::IfName;
use crate::plan::router::RouterPlan;
use anyhow::Context;
use minijinja::Environment;
use serde::Serialize;
use std::sync::OnceLock;

const ROUTER_TEMPLATE: &str = include_str!("router.nft.j2");

/// Chains of the router table, named once.
pub const FORWARD_CHAIN: &str = "forward";
pub const CROSS_DOMAIN_CHAIN: &str = "cross_domain";
pub const INPUT_CHAIN: &str = "input";

/// Log events of the router (anklume's names: `FW-ADMIN-FWD`,
/// `FW-DENY-<DOMAIN>`, `FW-INVALID`, `FW-DROP`, `FW-INPUT-DROP`).
pub const EVENT_ADMIN: &str = "ADMIN-FWD";
pub const EVENT_DENY: &str = "DENY";
pub const EVENT_INVALID: &str = "INVALID";
pub const EVENT_DROP: &str = "DROP";
pub const EVENT_INPUT_DROP: &str = "INPUT-DROP";

fn environment() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(true);
        env.add_filter("nft_atom", nft_atom);
        env.add_template("router.nft", ROUTER_TEMPLATE)
            .expect("router.nft.j2 is a valid template");
        env
    })
}

/// The chain that logs and drops what a domain may not send to another.
pub fn router_deny_chain_name(iface: &IfName) -> String {
    format!("deny-{iface}")
}

#[derive(Serialize)]
struct RouterLogging {
    rate: String,
    admin_prefix: String,
    invalid_prefix: String,
    drop_prefix: String,
    input_prefix: String,
}

#[derive(Serialize)]
struct RouterView {
    table_comment: &'static str,
    summary: String,
    table: String,
    forward_chain: &'static str,
    cross_chain: &'static str,
    input_chain: &'static str,
    sets: Vec<SetView>,
    admin: Option<String>,
    icmp: bool,
    accepts: Vec<&'static str>,
    conntrack: bool,
    logging: Option<RouterLogging>,
    deny_chains: Vec<DenyChain>,
    deny: &'static str,
}

/// Renders the firewall router's ruleset.
pub fn router(plan: &RouterPlan) -> anyhow::Result<String> {
    let mut sets = vec![SetView {
        name: "domain_ifaces",
        why: "The firewall's interfaces, one per domain bridge. Forwarding only ever happens between two of them.",
        type_: "ifname".into(),
        interval: false,
        elements: plan.interface_names().map(|i| vec![name(i)]).collect(),
    }];
    let mut accepts = Vec::new();
    if !plan.allowed_pairs.is_empty() {
        sets.push(SetView {
            name: "allowed_pairs",
            why: "Domain policies without ports: source interface, destination interface.",
            type_: "ifname . ifname".into(),
            interval: false,
            elements: plan
                .allowed_pairs
                .iter()
                .map(|(i, o)| vec![name(i), name(o)])
                .collect(),
        });
        accepts.push("iifname . oifname @allowed_pairs");
    }
    if !plan.allowed_services.is_empty() {
        sets.push(SetView {
            name: "allowed_services",
            why: "Domain policies with ports (ranges are intervals).",
            type_: "ifname . ifname . inet_proto . inet_service".into(),
            interval: true,
            elements: plan
                .allowed_services
                .iter()
                .map(|(i, o, p, span)| vec![name(i), name(o), super::proto(p), super::port(span)])
                .collect(),
        });
        accepts.push("iifname . oifname . meta l4proto . th dport @allowed_services");
    }
    // The router plan has no host-input sets (they are the Incus host's),
    // so only forwarding rules come back.
    let (v4, _) = family_views(
        Family {
            sets: &plan.v4,
            names: [
                "allowed_hosts_v4",
                "to_machine_v4",
                "from_machine_v4",
                "",
                "",
            ],
            rules: [
                "iifname . ip saddr . oifname . ip daddr @allowed_hosts_v4",
                "iifname . ip saddr . ip daddr . meta l4proto . th dport @to_machine_v4",
                "iifname . ip saddr . oifname . meta l4proto . th dport @from_machine_v4",
                "",
                "",
            ],
            addr: "ipv4_addr",
        },
        &mut sets,
    );
    let (v6, _) = family_views(
        Family {
            sets: &plan.v6,
            names: [
                "allowed_hosts_v6",
                "to_machine_v6",
                "from_machine_v6",
                "",
                "",
            ],
            rules: [
                "iifname . ip6 saddr . oifname . ip6 daddr @allowed_hosts_v6",
                "iifname . ip6 saddr . ip6 daddr . meta l4proto . th dport @to_machine_v6",
                "iifname . ip6 saddr . oifname . meta l4proto . th dport @from_machine_v6",
                "",
                "",
            ],
            addr: "ipv6_addr",
        },
        &mut sets,
    );
    accepts.extend(v4);
    accepts.extend(v6);

    let (logging, deny_chains) = match &plan.logging {
        None => (None, vec![]),
        Some(s) => (
            Some(RouterLogging {
                rate: s.rate.clone(),
                admin_prefix: s.line_prefix(EVENT_ADMIN, None),
                invalid_prefix: s.line_prefix(EVENT_INVALID, None),
                drop_prefix: s.line_prefix(EVENT_DROP, None),
                input_prefix: s.line_prefix(EVENT_INPUT_DROP, None),
            }),
            plan.interfaces
                .iter()
                .map(|(iface, domain)| DenyChain {
                    bridge: iface.to_string(),
                    name: router_deny_chain_name(iface),
                    prefix: s.line_prefix(EVENT_DENY, Some(domain.as_str())),
                })
                .collect(),
        ),
    };
    let deny = if logging.is_some() {
        "iifname vmap @deny_log"
    } else {
        "drop"
    };
    let view = RouterView {
        summary: summary(plan),
        table_comment: super::TABLE_COMMENT,
        table: plan.table.to_string(),
        forward_chain: FORWARD_CHAIN,
        cross_chain: CROSS_DOMAIN_CHAIN,
        input_chain: INPUT_CHAIN,
        sets,
        admin: plan.admin.as_ref().map(IfName::to_string),
        icmp: plan.icmp,
        accepts,
        conntrack: plan.conntrack,
        logging,
        deny_chains,
        deny,
    };
    environment()
        .get_template("router.nft")
        .and_then(|t| t.render(&view))
        .context("rendering the router ruleset template")
}

fn summary(plan: &RouterPlan) -> String {
    let ifaces: Vec<String> = plan
        .interfaces
        .iter()
        .map(|(i, d)| format!("{i} ({d})"))
        .collect();
    format!(
        "{} interface(s) [{}], {}, ICMP between domains {}, {} network polic{}",
        ifaces.len(),
        ifaces.join(", "),
        match &plan.admin {
            Some(a) => format!("admin interface {a}"),
            None => "no admin interface".into(),
        },
        if plan.icmp { "accepted" } else { "dropped" },
        plan.policies.len(),
        if plan.policies.len() == 1 { "y" } else { "ies" }
    )
}
