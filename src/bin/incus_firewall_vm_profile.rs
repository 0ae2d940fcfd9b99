//! Ansible binary module `incus_firewall_vm_profile`: reconciles the firewall
//! instance's multi-NIC profile (one NIC per domain bridge, keyed by bridge)
//! and attaches it to the instance. Runs where the Incus socket is. Returns
//! the interface list the router render and apply take.

use anklume_isolation::model::firewall::DEFAULT_ROUTER_HOST;
use anklume_isolation::model::{BridgePattern, IfName};
use anklume_isolation::module::{self, Diff, Invocation, ModuleOptions, Outcome};
use anklume_isolation::plan::profile::{
    interfaces, reconcile, with_profile, without_profile, ProfileChange,
};
use anklume_isolation::runner::incus_api::{select_bridges, IncusApi};
use anyhow::{bail, Context};
use serde::Deserialize;
use serde_json::{Map, Value};

const DEFAULT_PROFILE: &str = "firewall-multi-nic";
const DEFAULT_PROJECT: &str = "default";
const DEFAULT_INSTANCE: &str = "anklume-firewall";
const DEFAULT_PATTERN: &str = "net-";
const DESCRIPTION: &str =
    "anklume firewall: one NIC per domain bridge (managed by incus_firewall_vm_profile)";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    profile: Option<String>,
    project: Option<String>,
    instance: Option<String>,
    bridge_pattern: Option<String>,
    bridges: Option<Vec<String>>,
    admin_bridge: Option<String>,
    router_host: Option<u32>,
    state: Option<String>,
}

impl ModuleOptions for Options {
    const NAMES: &'static [&'static str] = &[
        "profile",
        "project",
        "instance",
        "bridge_pattern",
        "bridges",
        "admin_bridge",
        "router_host",
        "state",
    ];
}

fn main() {
    module::run(profile_module)
}

fn profile_module(inv: &Invocation<Options>) -> anyhow::Result<Outcome> {
    // Parse.
    let opts = &inv.options;
    let profile = opts.profile.as_deref().unwrap_or(DEFAULT_PROFILE);
    let project = opts.project.as_deref().unwrap_or(DEFAULT_PROJECT);
    let instance = opts.instance.as_deref().unwrap_or(DEFAULT_INSTANCE);
    for (what, value) in [
        ("profile", profile),
        ("project", project),
        ("instance", instance),
    ] {
        // These go into URLs: keep them to Incus's own name characters.
        if value.is_empty()
            || !value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            bail!("{what} {value:?} is not a valid Incus name");
        }
    }
    let present = match opts.state.as_deref().unwrap_or("present") {
        "present" => true,
        "absent" => false,
        other => bail!("state {other:?} is unknown: use present or absent"),
    };
    let pattern = BridgePattern::new(opts.bridge_pattern.as_deref().unwrap_or(DEFAULT_PATTERN))?;
    let explicit: Option<Vec<IfName>> = opts
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
    let router_host = opts.router_host.unwrap_or(DEFAULT_ROUTER_HOST);

    // Discover.
    let incus = IncusApi::find()?;
    let current = incus.profile(project, profile)?;
    let attached_to = incus.instance_profiles(project, instance)?;
    if !present {
        return remove(
            inv,
            &incus,
            (project, profile, instance),
            current.as_ref(),
            attached_to,
        );
    }
    let attached_to = attached_to.with_context(|| {
        format!(
            "instance {instance} does not exist in project {project}: create the firewall \
             instance first (for example `incus init --empty {instance} --project {project}`, or \
             from an image), then run this again"
        )
    })?;
    let networks = incus.networks(project)?;
    let bridges = select_bridges(&networks, &pattern, explicit.as_deref())?;

    // Plan: pure.
    let wanted = interfaces(instance, &bridges, admin.as_ref(), router_host)?;
    let empty = Map::new();
    let change = reconcile(current.as_ref().map_or(&empty, |p| &p.devices), &wanted);
    let create = current.is_none();
    let profiles = with_profile(&attached_to, profile);
    let changed = create || change.changed() || profiles.is_some();

    // Act.
    if !inv.check_mode {
        match &current {
            None => incus
                .create_profile(project, profile, DESCRIPTION, &change.devices)
                .with_context(|| format!("creating profile {profile}"))?,
            Some(p) if change.changed() => incus
                .replace_profile_devices(project, profile, p, &change.devices)
                .with_context(|| format!("updating profile {profile}"))?,
            Some(_) => {}
        }
        if let Some(list) = &profiles {
            incus
                .set_instance_profiles(project, instance, list)
                .with_context(|| format!("attaching profile {profile} to {instance}"))?;
        }
    }

    // Report.
    let mut outcome = Outcome::new(changed);
    outcome.diff = Some(devices_diff(
        profile,
        current.as_ref().map(|p| &p.devices),
        Some(&change.devices),
    ));
    report(&mut outcome, profile, instance, &change);
    outcome
        .set("created", create)
        .set("attached", profiles.is_some())
        .set("interfaces", &wanted);
    Ok(outcome)
}

/// `state: absent`: detach the profile from the instance, then delete it
/// (Incus refuses to delete a profile in use).
fn remove(
    inv: &Invocation<Options>,
    incus: &IncusApi,
    (project, profile, instance): (&str, &str, &str),
    current: Option<&anklume_isolation::runner::incus_api::Profile>,
    attached_to: Option<Vec<String>>,
) -> anyhow::Result<Outcome> {
    let detach = attached_to
        .as_deref()
        .and_then(|list| without_profile(list, profile));
    let changed = current.is_some() || detach.is_some();
    if !inv.check_mode {
        if let Some(list) = &detach {
            incus
                .set_instance_profiles(project, instance, list)
                .with_context(|| format!("detaching profile {profile} from {instance}"))?;
        }
        if current.is_some() {
            incus
                .delete_profile(project, profile)
                .with_context(|| format!("deleting profile {profile}"))?;
        }
    }
    let mut outcome = Outcome::new(changed);
    outcome.diff = Some(devices_diff(profile, current.map(|p| &p.devices), None));
    outcome
        .set("profile", profile)
        .set("instance", instance)
        .set("detached", detach.is_some())
        .set("deleted", current.is_some())
        .set("interfaces", Vec::<Value>::new());
    Ok(outcome)
}

fn report(outcome: &mut Outcome, profile: &str, instance: &str, change: &ProfileChange) {
    outcome
        .set("profile", profile)
        .set("instance", instance)
        .set("devices_added", &change.added)
        .set("devices_updated", &change.updated)
        .set("devices_removed", &change.removed);
}

/// The profile's devices before and after, one JSON document each (keys
/// sorted), for Ansible's diff.
fn devices_diff(
    profile: &str,
    before: Option<&Map<String, Value>>,
    after: Option<&Map<String, Value>>,
) -> Diff {
    let text = |d: Option<&Map<String, Value>>| {
        d.map(|d| serde_json::to_string_pretty(d).unwrap_or_default() + "\n")
            .unwrap_or_default()
    };
    Diff {
        before: text(before),
        after: text(after),
        before_header: format!("profile {profile} devices"),
        after_header: format!("profile {profile} devices"),
    }
}
