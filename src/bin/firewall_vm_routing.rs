//! Ansible binary module `firewall_vm_routing`: on the Incus host (vm mode),
//! routes traffic between domains through the firewall instance, IPv4 and
//! IPv6, with nothing to configure in the instances (see
//! `plan::router::host_routes` for why and how). It owns one nft table (the
//! steering marks, untracking and redirect drops) and its policy-routing
//! rules and routes; `state: absent` removes all of them.

use anklume_isolation::apply::{self, replace_table, ROUTING_MODE};
use anklume_isolation::guard::{check_ruleset, check_table_name};
use anklume_isolation::model::firewall::{parse_interfaces, RawInterface};
use anklume_isolation::model::TableName;
use anklume_isolation::module::{self, Diff, Invocation, ModuleOptions, Outcome};
use anklume_isolation::plan::router::host_routes::{routing_change, SteerPlan};
use anklume_isolation::runner::fs::{read_optional, write_atomic};
use anklume_isolation::runner::host_routes;
use anklume_isolation::runner::nft::Nft;
use anklume_isolation::runner::persist::{self, UnitPaths};
use anklume_isolation::sha256_hex;
use anyhow::{bail, Context};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const DEFAULT_TABLE: &str = "anklume_route";
const DEFAULT_DEST: &str = "/etc/nftables.d/anklume-route.nft";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    interfaces: Option<Vec<RawInterface>>,
    table: Option<String>,
    dest: Option<PathBuf>,
    state: Option<String>,
    persist: Option<bool>,
}

impl ModuleOptions for Options {
    const NAMES: &'static [&'static str] = &["interfaces", "table", "dest", "state", "persist"];
}

fn main() {
    module::run(routing_module)
}

fn routing_module(inv: &Invocation<Options>) -> anyhow::Result<Outcome> {
    // Parse.
    let opts = &inv.options;
    let table = TableName::new(opts.table.as_deref().unwrap_or(DEFAULT_TABLE))?;
    check_table_name(&table)?;
    let dest = opts
        .dest
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DEST));
    let present = match opts.state.as_deref().unwrap_or("present") {
        "present" => true,
        "absent" => false,
        other => bail!("state {other:?} is unknown: use present or absent"),
    };
    let nft = Nft::find().context("nft is not installed here: install the nftables package")?;
    let unit_paths = UnitPaths::new(Path::new(persist::SYSTEMD_UNIT_DIR), &table);

    // Plan.
    let plan = if present {
        let interfaces = parse_interfaces(opts.interfaces.as_deref().unwrap_or_default())
            .context("state present needs `interfaces` (from incus_firewall_vm_profile)")?;
        Some(SteerPlan::build(table.clone(), &interfaces)?)
    } else {
        None
    };
    let content = plan.as_ref().map(SteerPlan::render);
    let (want_rules, want_routes) = match &plan {
        Some(p) => (p.rules.clone(), p.routes.clone()),
        None => (BTreeSet::new(), BTreeSet::new()),
    };
    let routing = routing_change(&host_routes::read_state()?, &want_rules, &want_routes);
    let previous_file = read_optional(&dest)?;
    let want = match &content {
        Some(text) => {
            check_ruleset(text, &table)?;
            nft.check(text)?;
            Some(apply::verify(&nft, &table, text, &ROUTING_MODE)?.want)
        }
        None => None,
    };
    // Someone else's table of this name: refuse before changing anything.
    apply::ownership(&nft, &table, previous_file.as_deref())?;
    let live = nft.table_canonical(&table)?;
    let live_changed = live != want;
    let file_changed = previous_file != content;
    // At boot, before the file: an empty table of ours (nothing steered, so
    // the host's isolation drops domain-to-domain traffic until it loads).
    let fallback = persist::boot_fallback(&table, &BTreeSet::new(), &BTreeSet::new())?;
    let unit_text = persist::unit_text(&table, &dest, nft.program(), &fallback)?;
    let unit_changed = match (&content, opts.persist.unwrap_or(true)) {
        (Some(_), true) => !unit_paths.is_current(&unit_text)?,
        (Some(_), false) => false,
        (None, _) => unit_paths.unit.exists() || unit_paths.wants_link.exists(),
    };

    // Act. Marks before rules or rules before marks are both closed: a
    // marked packet with no rule, or a rule with no marked packet, falls
    // through to the main table, where host isolation drops it.
    if !inv.check_mode {
        match (&content, &want) {
            (Some(text), Some(want)) if live_changed => {
                replace_table(&nft, &table, text, want)?;
            }
            (None, _) if live.is_some() => nft
                .load(&format!("delete table inet {table}\n"))
                .with_context(|| format!("removing table inet {table}"))?,
            _ => {}
        }
        host_routes::apply(&routing)?;
        match &content {
            Some(text) if file_changed => write_atomic(&dest, text, 0o644)?,
            None if previous_file.is_some() => std::fs::remove_file(&dest)
                .with_context(|| format!("removing {}", dest.display()))?,
            _ => {}
        }
        if unit_changed {
            match content {
                Some(_) => unit_paths.install(&unit_text)?,
                None => {
                    for path in [&unit_paths.wants_link, &unit_paths.unit] {
                        let _ = std::fs::remove_file(path);
                    }
                }
            }
        }
    }

    // Report.
    let describe = |v6: bool| if v6 { "ipv6" } else { "ipv4" };
    let mut outcome =
        Outcome::new(live_changed || file_changed || unit_changed || !routing.is_empty());
    outcome.diff = Some(Diff {
        before: previous_file.unwrap_or_default(),
        after: content.clone().unwrap_or_default(),
        before_header: dest.display().to_string(),
        after_header: dest.display().to_string(),
    });
    outcome
        .set("table", format!("inet {table}"))
        .set("dest", dest.display().to_string())
        .set("sha256", content.as_deref().map(sha256_hex))
        .set("live_changed", live_changed)
        .set(
            "rules_added",
            routing
                .add_rules
                .iter()
                .map(|r| format!("{} iif {} lookup {}", describe(r.v6), r.bridge, r.table))
                .collect::<Vec<_>>(),
        )
        .set(
            "rules_removed",
            routing
                .del_rules
                .iter()
                .map(|r| format!("{} iif {} lookup {}", describe(r.v6), r.bridge, r.table))
                .collect::<Vec<_>>(),
        )
        .set(
            "routes",
            want_routes
                .iter()
                .map(|r| format!("table {} default via {} dev {}", r.table, r.via, r.dev))
                .collect::<Vec<_>>(),
        );
    Ok(outcome)
}
