//! Ansible binary module `incus_nftables_render`: discovers the domain
//! bridges from Incus and renders the isolation ruleset to a file. It runs
//! where the Incus socket is (the anklume container) and changes nothing on
//! the host: applying is `firewall_router_apply`'s job, on the enforcer.

use anklume_isolation::model::logging::RawLogging;
use anklume_isolation::model::{
    confine_to_bridges, parse_protected_networks, BridgePattern, DomainBridge, DomainSettings,
    EndpointRef, GatewayServices, IfName, LogSettings, PolicySpec, TableName, World,
};
use anklume_isolation::module::{self, Diff, Invocation, ModuleOptions, Outcome};
use anklume_isolation::plan::report::REPORT_MAX_DOMAINS;
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
    match opts.target.as_deref().unwrap_or("host") {
        "host" => {}
        "router" => bail!(
            "target \"router\" (the firewall VM's ruleset) is not implemented yet; use target \
             \"host\""
        ),
        other => bail!("target {other:?} is unknown: use \"host\""),
    }
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
    let logging = LogSettings::from_raw(&opts.logging.clone().unwrap_or_default())?;
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
    let mut machines = if names_a_machine {
        let incus = incus().context(
            "a network policy names something that is not a domain, so machines must be \
             looked up in Incus",
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
    let (plan, plan_warnings) = HostPlan::build(HostPlanInput {
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
    let content = render::host(&plan)?;
    let reachability = if plan.domains.len() <= REPORT_MAX_DOMAINS {
        Some(plan.reachability())
    } else {
        warnings.push(format!(
            "reachability is not computed beyond {REPORT_MAX_DOMAINS} domains ({} here)",
            plan.domains.len()
        ));
        None
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
        .set("bridges", plan.bridges().collect::<Vec<_>>())
        .set("domains", &plan.domains)
        .set("policies", &plan.policies)
        .set(
            "gateway_services",
            opts.gateway_services.clone().unwrap_or_else(|| {
                anklume_isolation::model::gateway::DEFAULT_GATEWAY_SERVICES
                    .iter()
                    .map(|s| s.to_string())
                    .collect()
            }),
        )
        .set("reachability", &reachability)
        .set("validated", nft.is_some())
        .set("capabilities", capabilities)
        .set(
            "summary",
            serde_json::json!({
                "bridges": plan.domains.len(),
                "admin_bridge": plan.admin,
                "policies": plan.policies.len(),
                "logging": plan.logging.is_some(),
            }),
        )
        .set("content", content);
    Ok(outcome)
}
