//! Ansible binary module `incus_nftables_render`: discovers the domain
//! bridges from Incus and renders the isolation ruleset to a file. It runs
//! where the Incus socket is (the anklume container) and changes nothing on
//! the host: applying is `firewall_router_apply`'s job, on the enforcer.

use anklume_isolation::model::firewall::{parse_interfaces, FirewallInterface, RawInterface};
use anklume_isolation::model::logging::RawLogging;
use anklume_isolation::model::{
    confine_to_bridges, parse_protected_networks, BridgePattern, DomainBridge, DomainSettings,
    EndpointRef, GatewayServices, IfName, LogSettings, PolicySpec, TableName, World,
};
use anklume_isolation::module::{self, Diff, Invocation, ModuleOptions, Outcome};
use anklume_isolation::plan::report::REPORT_MAX_DOMAINS;
use anklume_isolation::plan::router::{router_logging, RouterPlan, RouterPlanInput};
use anklume_isolation::plan::{Capabilities, HostPlan, HostPlanInput};
use anklume_isolation::runner::fs::{read_optional, write_atomic};
use anklume_isolation::runner::incus::Incus;
use anklume_isolation::runner::nft::Nft;
use anklume_isolation::{render, sha256_hex};
use anyhow::{bail, Context};
use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

const DEFAULT_PATTERN: &str = "net-";
const DEFAULT_TABLE: &str = "anklume";
const DEFAULT_OUTPUT: &str = "/opt/anklume/nftables-isolation.nft";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    target: Option<String>,
    bridge_pattern: Option<String>,
    bridges: Option<Vec<String>>,
    admin_bridge: Option<String>,
    table: Option<String>,
    output_path: Option<PathBuf>,
    validate: Option<String>,
    policies: Option<Vec<Value>>,
    logging: Option<RawLogging>,
    project: Option<String>,
    interfaces: Option<Vec<RawInterface>>,
    icmp: Option<bool>,
    gateway_services: Option<Vec<String>>,
    domains: Option<BTreeMap<String, Value>>,
    protected_networks: Option<Vec<String>>,
}

impl ModuleOptions for Options {
    const NAMES: &'static [&'static str] = &[
        "target",
        "bridge_pattern",
        "bridges",
        "admin_bridge",
        "table",
        "output_path",
        "validate",
        "policies",
        "logging",
        "project",
        "interfaces",
        "icmp",
        "gateway_services",
        "domains",
        "protected_networks",
    ];
}

/// When to run `nft -c` on the rendered text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Validate {
    /// When nft is installed here.
    Auto,
    /// Fail if nft is not installed.
    Always,
    Never,
}

fn main() {
    module::run(render_module)
}

fn render_module(inv: &Invocation<Options>) -> anyhow::Result<Outcome> {
    // Parse: every option into a validated type, before anything is read.
    let opts = &inv.options;
    // The router (the firewall instance's own table) takes its bridges from
    // the interfaces incus_firewall_vm_profile returned.
    let router: Option<Vec<FirewallInterface>> = match opts.target.as_deref().unwrap_or("host") {
        "host" => None,
        "router" => Some(
            parse_interfaces(opts.interfaces.as_deref().unwrap_or_default())
                .context("target \"router\" needs `interfaces`")?,
        ),
        other => bail!("target {other:?} is unknown: use \"host\" or \"router\""),
    };
    let pattern = BridgePattern::new(opts.bridge_pattern.as_deref().unwrap_or(DEFAULT_PATTERN))?;
    let table = TableName::new(opts.table.as_deref().unwrap_or(DEFAULT_TABLE))?;
    let path = opts
        .output_path
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_OUTPUT));
    let validate = match opts.validate.as_deref().unwrap_or("auto") {
        "auto" => Validate::Auto,
        "always" => Validate::Always,
        "never" => Validate::Never,
        other => bail!("validate {other:?} is unknown: use auto, always or never"),
    };
    let explicit_bridges: Option<Vec<IfName>> = opts
        .bridges
        .as_ref()
        .map(|names| names.iter().map(|n| IfName::new(n)).collect())
        .transpose()
        .context("option `bridges`")?;
    let admin = opts
        .admin_bridge
        .as_deref()
        .map(IfName::new)
        .transpose()
        .context("option `admin_bridge`")?;
    let specs = PolicySpec::parse_all(opts.policies.as_deref().unwrap_or_default())?;
    let raw_logging = opts.logging.clone().unwrap_or_default();
    let logging = match router {
        Some(_) => router_logging(&raw_logging)?,
        None => LogSettings::from_raw(&raw_logging)?,
    };
    let gateway = match &opts.gateway_services {
        Some(entries) => GatewayServices::parse(entries).context("option `gateway_services`")?,
        None => GatewayServices::defaults(),
    };
    let domain_settings = DomainSettings::parse(&opts.domains.clone().unwrap_or_default())
        .context("option `domains`")?;
    let protected_networks =
        parse_protected_networks(opts.protected_networks.as_deref().unwrap_or_default())
            .context("option `protected_networks`")?;

    // Discover: the bridges, and the machines only when a policy names one.
    let incus = || Incus::find();
    let explicit = explicit_bridges.is_some();
    let mut bridges: Vec<DomainBridge> = match explicit_bridges {
        _ if router.is_some() => router
            .iter()
            .flatten()
            .map(FirewallInterface::domain_bridge)
            .collect(),
        Some(names) => names
            .into_iter()
            .map(|name| DomainBridge::new(name, &pattern))
            .collect::<anyhow::Result<_>>()?,
        None => incus()?.domain_bridges(&pattern)?,
    };
    let domain_names: BTreeSet<&str> = bridges.iter().map(|b| b.domain.as_str()).collect();
    let names_a_machine = specs.iter().any(|spec| {
        [&spec.from, &spec.to]
            .into_iter()
            .any(|end| matches!(end, EndpointRef::Named(n) if !domain_names.contains(n.as_str())))
    });
    // A domain that isolates its machines needs their MACs too.
    let isolates = router.is_none() && !domain_settings.1.is_empty();
    let mut machines = if names_a_machine || isolates {
        let incus = incus().context(
            "a network policy names something that is not a domain, or a domain isolates its \
             machines, so machines must be looked up in Incus",
        )?;
        // Explicit bridges skip discovery, but a machine's addresses are
        // only trusted inside its bridge's subnets: learn those of the
        // listed bridges Incus manages (the others stay unchecked, and say so).
        if explicit {
            incus.fill_subnets(&mut bridges)?;
        }
        let bridge_set = bridges.iter().map(|b| b.bridge.clone()).collect();
        incus.machines(opts.project.as_deref(), &bridge_set)?
    } else {
        Vec::new()
    };
    confine_to_bridges(&mut machines, &bridges);
    let world = World::new(&bridges, &machines);
    let policies = specs
        .iter()
        .map(|spec| world.resolve(spec))
        .collect::<anyhow::Result<Vec<_>>>()?;

    // Plan and render: pure.
    let nft = match validate {
        Validate::Never => None,
        Validate::Auto => Nft::find(),
        Validate::Always => Some(Nft::find().context(
            "validate is \"always\" but nft is not installed here: install nftables, or use \
             validate \"auto\"",
        )?),
    };
    let capabilities = nft.as_ref().map_or(Capabilities::ALL, Nft::probe);
    let mut warnings: Vec<String> = policies
        .iter()
        .flat_map(|p| p.warnings.iter().cloned())
        .collect();
    let (report, content) = match &router {
        None => {
            let (mut plan, plan_warnings) = HostPlan::build(HostPlanInput {
                protected_networks,
                domain_settings,
                table,
                pattern,
                bridges: &bridges,
                admin,
                policies,
                gateway,
                logging,
                capabilities,
            })?;
            warnings.extend(plan_warnings);
            warnings.extend(plan.add_machines(&machines));
            let content = render::host(&plan)?;
            let reachability = if plan.domains.len() <= REPORT_MAX_DOMAINS {
                Some(serde_json::to_value(plan.reachability())?)
            } else {
                warnings.push(format!(
                    "reachability is not computed beyond {REPORT_MAX_DOMAINS} domains ({} here)",
                    plan.domains.len()
                ));
                None
            };
            let report = Report {
                bridges: plan.bridges().cloned().collect(),
                domains: serde_json::to_value(&plan.domains)?,
                policies: serde_json::to_value(&plan.policies)?,
                admin: plan.admin.clone(),
                logging: plan.logging.is_some(),
                reachability,
            };
            (report, content)
        }
        Some(interfaces) => {
            if !domain_settings.0.is_empty()
                || !domain_settings.1.is_empty()
                || !protected_networks.is_empty()
            {
                bail!(
                    "`domains` and `protected_networks` are host settings: target router does \
                     not take them (the host enforces them in both firewall modes)"
                );
            }
            let (plan, plan_warnings) = RouterPlan::build(RouterPlanInput {
                table,
                pattern,
                interfaces,
                admin: admin.clone(),
                policies,
                logging,
                icmp: opts.icmp.unwrap_or(true),
                capabilities,
            })?;
            warnings.extend(plan_warnings);
            let content = render::router::router(&plan)?;
            let report = Report {
                bridges: bridges.iter().map(|b| b.bridge.clone()).collect(),
                domains: serde_json::to_value(&plan.interfaces)?,
                policies: serde_json::to_value(&plan.policies)?,
                admin,
                logging: plan.logging.is_some(),
                reachability: None,
            };
            (report, content)
        }
    };
    if let Some(nft) = &nft {
        nft.check(&content)?;
    } else if validate == Validate::Auto {
        warnings.push("nft is not installed here: the ruleset was not checked with `nft -c` (it will be on the enforcer)".into());
    }

    // Act: write only when the content changed, never in check mode.
    let previous = read_optional(&path)?;
    let changed = previous.as_deref() != Some(content.as_str());
    if changed && !inv.check_mode {
        write_atomic(&path, &content, 0o644)?;
    }

    // Report.
    let mut outcome = Outcome::new(changed);
    outcome.warnings = warnings;
    outcome.diff = Some(Diff {
        before: previous.unwrap_or_default(),
        after: content.clone(),
        before_header: path.display().to_string(),
        after_header: path.display().to_string(),
    });
    outcome
        .set("path", path.display().to_string())
        .set("sha256", sha256_hex(&content))
        .set("bridges", &report.bridges)
        .set("domains", &report.domains)
        .set("policies", &report.policies)
        .set(
            "gateway_services",
            opts.gateway_services.clone().unwrap_or_else(|| {
                anklume_isolation::model::gateway::DEFAULT_GATEWAY_SERVICES
                    .iter()
                    .map(|s| s.to_string())
                    .collect()
            }),
        )
        .set("reachability", &report.reachability)
        .set("validated", nft.is_some())
        .set("capabilities", capabilities)
        .set(
            "summary",
            serde_json::json!({
                "target": if router.is_some() { "router" } else { "host" },
                "bridges": report.bridges.len(),
                "admin_bridge": report.admin,
                "policies": report.policies.as_array().map_or(0, Vec::len),
                "logging": report.logging,
            }),
        )
        .set("content", content);
    Ok(outcome)
}

/// What the module reports of either plan (`domains` is bridge -> domain for
/// the host, firewall interface -> domain for the router).
struct Report {
    bridges: Vec<IfName>,
    domains: Value,
    policies: Value,
    admin: Option<IfName>,
    logging: bool,
    /// Who may open what to whom (host target only).
    reachability: Option<Value>,
}
