//! Rendering a router plan to nft text: the firewall instance's own table
//! (vm mode). Pure, like the host render, and its pair chains are the host
//! plan's own rules ([`crate::plan::rules::pair_rules`]).

use super::{environment, pair_map_elements, quoted, wrap};
use crate::model::IfName;
use crate::plan::router::RouterPlan;
use crate::plan::rules::{pair_chain_name, pair_rules, Rule, DENY_LOG, LOG_BUDGET, PAIRS};
use anyhow::Context;
use serde::Serialize;

/// Chains and sets of the router table, named once.
pub const FORWARD_CHAIN: &str = "forward";
pub const CROSS_DOMAIN_CHAIN: &str = "cross_domain";
pub const INPUT_CHAIN: &str = "input";
pub const DOMAIN_IFACES: &str = "domain_ifaces";

/// Log events of the router (anklume's names: `FW-ADMIN-FWD`,
/// `FW-DENY-<DOMAIN>`, `FW-INVALID`, `FW-DROP`, `FW-INPUT-DROP`).
pub const EVENT_ADMIN: &str = "ADMIN-FWD";
pub const EVENT_DENY: &str = "DENY";
pub const EVENT_INVALID: &str = "INVALID";
pub const EVENT_DROP: &str = "DROP";
pub const EVENT_INPUT_DROP: &str = "INPUT-DROP";

/// The chain that logs and drops what a domain may not send to another.
pub fn router_deny_chain_name(iface: &IfName) -> String {
    format!("deny-{iface}")
}

#[derive(Serialize)]
struct RouterLogging {
    budget: &'static str,
    rate: String,
    admin_prefix: String,
    invalid_prefix: String,
    drop_prefix: String,
    input_prefix: String,
}

#[derive(Serialize)]
struct DenyChain {
    iface: String,
    name: String,
    prefix: String,
}

#[derive(Serialize)]
struct PairChain {
    name: String,
    why: Vec<String>,
    rules: Vec<String>,
}

#[derive(Serialize)]
struct RouterView {
    table_comment: &'static str,
    summary: String,
    table: String,
    forward_chain: &'static str,
    cross_chain: &'static str,
    input_chain: &'static str,
    domain_ifaces_name: &'static str,
    domain_ifaces: Vec<String>,
    pairs_name: &'static str,
    /// `"in" . "out" : accept` or `: jump pair/in/out`.
    pairs: Vec<String>,
    pairs_rule: String,
    pair_chains: Vec<PairChain>,
    admin: Option<String>,
    icmp: bool,
    conntrack: bool,
    logging: Option<RouterLogging>,
    deny_log_name: &'static str,
    deny_chains: Vec<DenyChain>,
    deny: String,
}

fn rule_text(rule: &Rule) -> String {
    // Pair rules only match addresses and ports, and only accept: no
    // interface wildcard, no log map.
    let mut parts: Vec<String> = rule.conds.iter().map(|c| c.nft_with("")).collect();
    parts.push(rule.action.nft_with(false));
    parts.join(" ")
}

/// Renders the firewall router's ruleset.
pub fn router(plan: &RouterPlan) -> anyhow::Result<String> {
    let pairs = pair_map_elements(&plan.pairs);
    let pair_chains = plan
        .pairs
        .iter()
        .filter(|(_, pair)| !pair.all)
        .map(|((i, o), pair)| PairChain {
            name: pair_chain_name(i, o),
            why: wrap(&format!(
                "What policies open from {i} to {o} (domains {} -> {}).",
                plan.interfaces.get(i).map(|d| d.as_str()).unwrap_or("?"),
                plan.interfaces.get(o).map(|d| d.as_str()).unwrap_or("?"),
            )),
            rules: pair_rules(pair).iter().map(rule_text).collect(),
        })
        .collect();
    let (logging, deny_chains) = match &plan.logging {
        None => (None, vec![]),
        Some(s) => (
            Some(RouterLogging {
                budget: LOG_BUDGET,
                rate: s.rate.clone(),
                admin_prefix: s.line_prefix(EVENT_ADMIN, None),
                invalid_prefix: s.line_prefix(EVENT_INVALID, None),
                drop_prefix: s.line_prefix(EVENT_DROP, None),
                input_prefix: s.line_prefix(EVENT_INPUT_DROP, None),
            }),
            plan.interfaces
                .iter()
                .map(|(iface, domain)| DenyChain {
                    iface: quoted(iface),
                    name: router_deny_chain_name(iface),
                    prefix: s.line_prefix(EVENT_DENY, Some(domain.as_str())),
                })
                .collect(),
        ),
    };
    let deny = if logging.is_some() {
        format!("iifname vmap @{DENY_LOG}")
    } else {
        "drop".to_string()
    };
    let view = RouterView {
        summary: summary(plan),
        table_comment: super::TABLE_COMMENT,
        table: plan.table.to_string(),
        forward_chain: FORWARD_CHAIN,
        cross_chain: CROSS_DOMAIN_CHAIN,
        input_chain: INPUT_CHAIN,
        domain_ifaces_name: DOMAIN_IFACES,
        domain_ifaces: plan.interface_names().map(quoted).collect(),
        pairs_name: PAIRS,
        pairs,
        pairs_rule: format!("iifname . oifname vmap @{PAIRS}"),
        pair_chains,
        admin: plan.admin.as_ref().map(quoted),
        icmp: plan.icmp,
        conntrack: plan.conntrack,
        logging,
        deny_log_name: DENY_LOG,
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
