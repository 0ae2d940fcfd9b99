//! Ansible binary module `firewall_router_apply`: validates a rendered
//! ruleset and makes it live and persistent where rules are enforced (the
//! host, or later the firewall VM), or with `state: absent` removes it. It
//! only ever touches its own, marked tables: `inet <table>`, and in host mode
//! `bridge <table>` (isolation inside a domain) when the ruleset has one.

use anklume_isolation::apply::{self, Load, ModeRules, Ownership, HOST_MODE, ROUTER_MODE};
use anklume_isolation::effects::in_place_tables;
use anklume_isolation::guard::{check_ruleset_in, check_table_name, strip_log_statements};
use anklume_isolation::model::firewall::{parse_interfaces, FirewallInterface, RawInterface};
use anklume_isolation::model::TableName;
use anklume_isolation::module::{self, Diff, Invocation, ModuleOptions, Outcome};
use anklume_isolation::runner::conntrack::{self, Conntrack};
use anklume_isolation::runner::fs::{read_capped, Existing};
use anklume_isolation::runner::lock::{ApplyLock, DEFAULT_LOCK_PATH};
use anklume_isolation::runner::nft::Nft;
use anklume_isolation::runner::persist::{self, check_unit_path, UnitPaths};
use anklume_isolation::runner::process::DEFAULT_TIMEOUT;
use anklume_isolation::runner::router::{self, RouterPaths};
use anklume_isolation::sha256_hex;
use anyhow::{bail, Context};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

const DEFAULT_DEST: &str = "/etc/nftables.d/anklume-isolation.nft";
const DEFAULT_TABLE: &str = "anklume";
/// How many command timeouts an apply waits for another one's lock: the
/// other apply runs at most a handful of bounded commands.
const LOCK_WAIT_TIMEOUTS: u32 = 10;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    src: Option<PathBuf>,
    content: Option<String>,
    dest: Option<PathBuf>,
    table: Option<String>,
    mode: Option<String>,
    persist: Option<bool>,
    state: Option<String>,
    command_timeout: Option<u64>,
    unit_dir: Option<PathBuf>,
    lock_path: Option<PathBuf>,
    interfaces: Option<Vec<RawInterface>>,
}

impl ModuleOptions for Options {
    const NAMES: &'static [&'static str] = &[
        "src",
        "content",
        "dest",
        "table",
        "mode",
        "persist",
        "state",
        "command_timeout",
        "unit_dir",
        "lock_path",
        "interfaces",
    ];
}

fn main() {
    module::run(apply_module)
}

fn apply_module(inv: &Invocation<Options>) -> anyhow::Result<Outcome> {
    // Parse.
    let opts = &inv.options;
    // Router mode (inside the firewall instance) also gives each interface
    // its router addresses and turns forwarding on, after the table is live.
    let (mode, router): (&ModeRules, _) = match opts.mode.as_deref().unwrap_or("host") {
        "host" => (&HOST_MODE, None),
        "router" => (
            &ROUTER_MODE,
            Some(
                parse_interfaces(opts.interfaces.as_deref().unwrap_or_default())
                    .context("mode \"router\" needs `interfaces`")?,
            ),
        ),
        other => bail!("mode {other:?} is unknown: use \"host\" or \"router\""),
    };
    let table = TableName::new(opts.table.as_deref().unwrap_or(DEFAULT_TABLE))?;
    check_table_name(&table)?;
    let dest = opts
        .dest
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DEST));
    check_unit_path(&dest)?;
    let timeout = match opts.command_timeout {
        None => DEFAULT_TIMEOUT,
        Some(0) => bail!("command_timeout must be at least 1 (seconds)"),
        Some(secs) => Duration::from_secs(secs),
    };
    let unit_dir = opts
        .unit_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(persist::SYSTEMD_UNIT_DIR));
    let unit_paths = UnitPaths::new(&unit_dir, &table);
    let nft = Nft::find()
        .context("nft is not installed here: install the nftables package")?
        .with_timeout(timeout);

    // One apply at a time on this machine, from the first look at the live
    // table to the last file written.
    let lock_path = opts
        .lock_path
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_LOCK_PATH));
    let _lock = ApplyLock::acquire(&lock_path, timeout * LOCK_WAIT_TIMEOUTS)?;

    match opts.state.as_deref().unwrap_or("present") {
        "present" => present(
            inv,
            &nft,
            &table,
            mode,
            router.as_deref(),
            &dest,
            &unit_paths,
        ),
        "absent" => absent(inv, &nft, &table, mode, &dest, &unit_paths),
        other => bail!("state {other:?} is unknown: use \"present\" or \"absent\""),
    }
}

fn present(
    inv: &Invocation<Options>,
    nft: &Nft,
    table: &TableName,
    mode: &ModeRules,
    router: Option<&[FirewallInterface]>,
    dest: &Path,
    unit_paths: &UnitPaths,
) -> anyhow::Result<Outcome> {
    let opts = &inv.options;
    let mut warnings = Vec::new();
    let mut desired = match (&opts.src, &opts.content) {
        (Some(src), None) => read_capped(src, apply::MAX_RULESET_BYTES)?
            .with_context(|| format!("src {} does not exist", src.display()))?,
        (None, Some(content)) if content.len() as u64 > apply::MAX_RULESET_BYTES => bail!(
            "content is larger than {} bytes: refused",
            apply::MAX_RULESET_BYTES
        ),
        (None, Some(content)) => content.clone(),
        (Some(_), Some(_)) => bail!("give either `src` or `content`, not both"),
        (None, None) => {
            bail!("give the rendered ruleset as `src` (a file) or `content` (its text)")
        }
    };

    // Validate: our table only (text), what this kernel supports, the
    // kernel's own check, then what the ruleset does (scratch namespace).
    let families = mode.families();
    check_ruleset_in(&desired, table, families)?;
    if !nft.probe().log {
        let (stripped, removed) = strip_log_statements(&desired);
        if removed > 0 {
            warnings.push(format!(
                "this kernel refuses nft `log` (no nft_log, or a namespace without \
                 nf_log_all_netns): {removed} log statement(s) were left out; the rules and \
                 their verdicts are unchanged, only silent"
            ));
            desired = stripped;
            check_ruleset_in(&desired, table, families)?;
        }
    }
    nft.check(&desired)?;
    let verified = apply::verify(nft, table, &desired, mode)?;
    let files = apply::Files::read(dest)?;
    let applied = match &files.current {
        Existing::Text(text) => Some(text.as_str()),
        _ => None,
    };
    // Every table of the mode is ours or absent (someone else's `bridge
    // <table>` refuses the apply even when the file has no bridge table: the
    // name is ours in both families).
    let owned = apply::ownerships(nft, table, families, applied)?;
    for (family, _) in owned.iter().filter(|(_, o)| **o == Ownership::Adopted) {
        warnings.push(format!(
            "table {family} {table} had no ownership mark but is exactly what {} loads: \
             adopted (applied by an older version) and marked now",
            dest.display()
        ));
    }

    // Plan: compare what the kernel would hold with what it holds (nft's
    // JSON leaves out the table comment: an adopted table is reloaded to
    // carry the mark).
    let old_table = match owned.get("inet") {
        Some(Ownership::Ours | Ownership::Adopted) => nft.table_canonical(table)?,
        _ => None,
    };
    let live = apply::live_tables(nft, table, &owned)?;
    let live_changed = live != verified.tables;
    // A bridge table of ours that the ruleset no longer has (a file from
    // before isolation inside domains, or none isolated and an older
    // render): deleted in the same transaction, so live equals the file.
    let stale_bridge = families.contains(&"bridge")
        && live.contains_key("bridge")
        && !verified.tables.contains_key("bridge");
    let whole = match stale_bridge {
        true => format!("{desired}\ntable bridge {table} {{}}\ndelete table bridge {table}\n"),
        false => desired.clone(),
    };
    // Same base chains: update elements (and the chains maps jump to) of
    // both tables in one transaction instead of swapping the whole file. A
    // table that appears or goes, or any other change, swaps the whole file
    // (both tables, one transaction).
    let in_place = in_place_tables(&live, &verified.tables);
    let load = live_changed.then(|| match &in_place {
        Some(update) if update.chains => Load::Chains(&update.batch),
        Some(update) => Load::Sets(&update.batch),
        None => Load::Table(&whole),
    });
    let file_changed = !files.holds(&desired);
    if let Existing::Unreadable(_) = files.current {
        warnings.push(format!(
            "{} was not UTF-8 text (corrupted?): it is kept as {} and replaced",
            dest.display(),
            files.previous_path().display()
        ));
    }
    let persist = opts.persist.unwrap_or(true);
    // The router's boot hook loads the table itself, before its addresses
    // and forwarding (closed until the table is live).
    let unit = match persist && router.is_none() {
        true => {
            let fallback = persist::boot_fallback(table, &verified.bridges, &verified.wildcards)?;
            Some(persist::unit_text(table, dest, nft.program(), &fallback)?)
        }
        false => None,
    };
    let unit_changed = match &unit {
        Some(text) => !unit_paths.is_current(text)?,
        None => false,
    };
    let foreign = nft.foreign_forward_drop_chains(table)?;
    if !foreign.is_empty() {
        warnings.push(format!(
            "other tables have forward chains with a drop policy ({}): they may drop traffic \
             that this table allows (same-domain, internet, policies)",
            foreign.join("; ")
        ));
    }
    let ours = owned.get("inet") == Some(&Ownership::Ours)
        && !owned.values().any(|o| *o == Ownership::Adopted);
    if !file_changed && live_changed && ours {
        warnings.push(format!(
            "the live tables of {table} differed from {}: they were changed outside this module",
            dest.display()
        ));
    }

    let mut revoked = None;
    // Act (not in check mode). The boot unit first: it loads `dest`, which
    // stays the last good ruleset until the live table is confirmed.
    if !inv.check_mode {
        if let Some(text) = &unit {
            if unit_changed {
                unit_paths.install(text)?;
                if !persist::systemd_is_running() {
                    warnings.push(format!(
                        "systemd is not running here: {} is installed and enabled for the next \
                         boot under systemd",
                        unit_paths.unit.display()
                    ));
                }
            }
        }
        if live_changed || file_changed {
            apply::commit(nft, table, &desired, &verified, load, &files)?;
        }
        if let (true, Some(old)) = (live_changed, &old_table) {
            revoked = cut_revoked(table, old, &verified.want, nft.timeout(), &mut warnings);
        }
    }

    let router_report = match router {
        None => None,
        Some(interfaces) => {
            let mut report = router::converge_live(interfaces, inv.check_mode)?;
            if persist {
                let paths = RouterPaths::new(Path::new("/"), table);
                report.persisted =
                    router::persist(&paths, interfaces, dest, nft.program(), inv.check_mode)?;
            }
            Some(report)
        }
    };

    // Report.
    let before = match &files.current {
        Existing::Text(text) => text.clone(),
        _ => String::new(),
    };
    let router_changed = router_report.as_ref().is_some_and(|r| r.changed());
    let mut outcome = Outcome::new(live_changed || file_changed || unit_changed || router_changed);
    outcome.warnings = warnings;
    outcome.diff = Some(Diff {
        before,
        after: desired.clone(),
        before_header: dest.display().to_string(),
        after_header: dest.display().to_string(),
    });
    outcome
        .set("state", "present")
        .set("dest", dest.display().to_string())
        .set("sha256", sha256_hex(&desired))
        .set("table", format!("inet {table}"))
        .set(
            "tables",
            verified
                .tables
                .keys()
                .map(|family| format!("{family} {table}"))
                .collect::<Vec<_>>(),
        )
        .set("live_changed", live_changed)
        .set("update", load.map(|load| load.kind()))
        .set("revoked_connections", revoked)
        .set("file_changed", file_changed)
        .set(
            "previous",
            (file_changed && files.current != Existing::Missing)
                .then(|| files.previous_path().display().to_string()),
        )
        .set(
            "unit",
            unit.as_ref().map(|_| unit_paths.unit.display().to_string()),
        )
        .set("router", &router_report);
    Ok(outcome)
}

/// `state: absent`: our tables (inet, and bridge in host mode), the file,
/// `.previous` and the boot unit, nothing else.
fn absent(
    inv: &Invocation<Options>,
    nft: &Nft,
    table: &TableName,
    mode: &ModeRules,
    dest: &Path,
    unit_paths: &UnitPaths,
) -> anyhow::Result<Outcome> {
    // Someone else's table of this name: refuse before removing anything.
    let applied = match apply::Files::read(dest)?.current {
        Existing::Text(text) => Some(text),
        _ => None,
    };
    apply::ownerships(nft, table, mode.families(), applied.as_deref())?;
    let unit_exists = unit_paths.exists();
    if unit_exists && !inv.check_mode {
        // The unit first: a crash half-way must not leave a boot unit that
        // loads the fail-closed fallback without its file.
        unit_paths.remove()?;
    }
    let removed = apply::remove(nft, table, mode.families(), dest, inv.check_mode)?;
    let mut outcome =
        Outcome::new(!removed.families.is_empty() || !removed.files.is_empty() || unit_exists);
    outcome
        .set("state", "absent")
        .set("table", format!("inet {table}"))
        .set("table_removed", removed.table)
        .set(
            "tables_removed",
            removed
                .families
                .iter()
                .map(|family| format!("{family} {table}"))
                .collect::<Vec<_>>(),
        )
        .set(
            "files_removed",
            removed
                .files
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>(),
        )
        .set(
            "unit",
            unit_exists.then(|| unit_paths.unit.display().to_string()),
        );
    Ok(outcome)
}

/// Cuts the connections the new table no longer admits; a failure here is a
/// warning (the new rules are live and stop every new connection).
fn cut_revoked(
    table: &TableName,
    old: &serde_json::Value,
    new: &serde_json::Value,
    timeout: Duration,
    warnings: &mut Vec<String>,
) -> Option<usize> {
    let Some(conntrack) = Conntrack::find(timeout) else {
        warnings.push(
            "conntrack (conntrack-tools) is not installed: connections opened under an \
             allowance this apply removed keep running until they end; install it to cut them"
                .to_string(),
        );
        return None;
    };
    let cut = conntrack::interfaces(timeout)
        .and_then(|ifs| apply::cut_revoked(table, old, new, &conntrack, &ifs));
    match cut {
        Ok(n) => Some(n),
        Err(err) => {
            warnings.push(format!(
                "the new rules are live, but cutting the connections they no longer allow \
                 failed: {err:#}"
            ));
            None
        }
    }
}
