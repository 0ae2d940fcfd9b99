//! The host's policy-routing rules and routes towards the firewall (vm
//! mode): read what is ours (rules at our priority, routes in our tables),
//! apply the change the plan computed. Only `ip` is run.

use super::process::{find_program, run_with_stdin};
use crate::model::IfName;
use crate::plan::router::host_routes::{
    RoutingChange, RoutingState, SteerRoute, SteerRule, RULE_PRIORITY, STEER_MARK, TABLE_BASE,
    TABLE_LIMIT,
};
use anyhow::Context;
use serde_json::Value;
use std::process::Command;

fn ip(family_v6: bool, args: &[&str]) -> anyhow::Result<String> {
    let program = find_program("ip").context("`ip` (iproute2) is not installed")?;
    let mut cmd = Command::new(program);
    let fam = if family_v6 { "-6" } else { "-4" };
    cmd.arg(fam).args(args);
    run_with_stdin(cmd, None).with_context(|| format!("ip {fam} {}", args.join(" ")))
}

fn ours(table: &Value) -> Option<u32> {
    let id: u32 = match table {
        Value::String(s) => s.parse().ok()?,
        Value::Number(n) => u32::try_from(n.as_u64()?).ok()?,
        _ => return None,
    };
    (TABLE_BASE..TABLE_LIMIT).contains(&id).then_some(id)
}

/// Rules at our priority with an input interface and one of our tables,
/// and the default routes of our tables, both families.
pub fn read_state() -> anyhow::Result<RoutingState> {
    let mut state = RoutingState::default();
    for v6 in [false, true] {
        let rules: Value = serde_json::from_str(&ip(v6, &["-j", "rule", "show"])?)
            .context("ip -j rule show: invalid JSON")?;
        for r in rules.as_array().into_iter().flatten() {
            if r["priority"] != RULE_PRIORITY {
                continue;
            }
            let (Some(table), Some(iif)) = (ours(&r["table"]), r["iif"].as_str()) else {
                continue;
            };
            state.rules.insert(SteerRule {
                v6,
                bridge: IfName::new(iif)?,
                table,
            });
        }
        let routes: Value =
            serde_json::from_str(&ip(v6, &["-j", "route", "show", "table", "all"])?)
                .context("ip -j route show: invalid JSON")?;
        for r in routes.as_array().into_iter().flatten() {
            let Some(table) = ours(&r["table"]) else {
                continue;
            };
            if let (Some(via), Some(dev)) = (r["gateway"].as_str(), r["dev"].as_str()) {
                state.routes.insert(SteerRoute {
                    table,
                    via: via.to_string(),
                    dev: IfName::new(dev)?,
                    v6,
                });
            }
        }
    }
    Ok(state)
}

fn rule_args(rule: &SteerRule) -> Vec<String> {
    vec![
        "pref".into(),
        RULE_PRIORITY.to_string(),
        "iif".into(),
        rule.bridge.to_string(),
        "fwmark".into(),
        format!("{STEER_MARK:#x}/{STEER_MARK:#x}"),
        "lookup".into(),
        rule.table.to_string(),
    ]
}

fn route_args(route: &SteerRoute) -> Vec<String> {
    vec![
        "default".into(),
        "via".into(),
        route.via.clone(),
        "dev".into(),
        route.dev.to_string(),
        "table".into(),
        route.table.to_string(),
    ]
}

/// Removals first, then additions (see `RoutingChange`).
pub fn apply(change: &RoutingChange) -> anyhow::Result<()> {
    let run = |v6: bool, verb: &[&str], rest: Vec<String>| {
        let mut args: Vec<&str> = verb.to_vec();
        args.extend(rest.iter().map(String::as_str));
        ip(v6, &args).map(drop)
    };
    for r in &change.del_rules {
        run(r.v6, &["rule", "del"], rule_args(r))?;
    }
    for r in &change.del_routes {
        run(r.v6, &["route", "del"], route_args(r))?;
    }
    for r in &change.add_routes {
        run(r.v6, &["route", "replace"], route_args(r))?;
    }
    for r in &change.add_rules {
        run(r.v6, &["rule", "add"], rule_args(r))?;
    }
    Ok(())
}
