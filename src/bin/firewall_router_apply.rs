//! Ansible binary module `firewall_router_apply`: validates a rendered
//! ruleset and makes it live and persistent where rules are enforced (the
//! host, or later the firewall VM). It only ever touches its own table.

use anklume_isolation::apply::replace_table;
use anklume_isolation::guard::check_ruleset;
use anklume_isolation::model::firewall::{parse_interfaces, RawInterface};
use anklume_isolation::model::TableName;
use anklume_isolation::module::{self, Diff, Invocation, ModuleOptions, Outcome};
use anklume_isolation::runner::fs::{read_optional, write_atomic};
use anklume_isolation::runner::nft::Nft;
use anklume_isolation::runner::persist::{self, UnitPaths};
use anklume_isolation::runner::router::{self, RouterPaths};
use anklume_isolation::sha256_hex;
use anyhow::{bail, Context};
use serde::Deserialize;
use std::path::{Path, PathBuf};

const DEFAULT_DEST: &str = "/etc/nftables.d/anklume-isolation.nft";
const DEFAULT_TABLE: &str = "anklume";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    src: Option<PathBuf>,
    content: Option<String>,
    dest: Option<PathBuf>,
    table: Option<String>,
    mode: Option<String>,
    persist: Option<bool>,
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
    let router = match opts.mode.as_deref().unwrap_or("host") {
        "host" => None,
        "router" => Some(
            parse_interfaces(opts.interfaces.as_deref().unwrap_or_default())
                .context("mode \"router\" needs `interfaces`")?,
        ),
        other => bail!("mode {other:?} is unknown: use \"host\" or \"router\""),
    };
    let table = TableName::new(opts.table.as_deref().unwrap_or(DEFAULT_TABLE))?;
    let dest = opts
        .dest
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DEST));
    let desired = match (&opts.src, &opts.content) {
        (Some(src), None) => {
            read_optional(src)?.with_context(|| format!("src {} does not exist", src.display()))?
        }
        (None, Some(content)) => content.clone(),
        (Some(_), Some(_)) => bail!("give either `src` or `content`, not both"),
        (None, None) => {
            bail!("give the rendered ruleset as `src` (a file) or `content` (its text)")
        }
    };

    // Validate: our table only, then the kernel's own check.
    check_ruleset(&desired, &table)?;
    let nft = Nft::find().context("nft is not installed here: install the nftables package")?;
    nft.check(&desired)?;

    // Plan: compare what the kernel would hold with what it holds.
    let want = nft.canonical_of(&desired, &table)?;
    let live_changed = nft.table_canonical(&table)?.as_ref() != Some(&want);
    let previous_file = read_optional(&dest)?;
    let file_changed = previous_file.as_deref() != Some(desired.as_str());
    let persist = opts.persist.unwrap_or(true);
    // The router's boot hook loads the table itself, before its addresses.
    let unit = (persist && router.is_none()).then(|| {
        let paths = UnitPaths::new(Path::new(persist::SYSTEMD_UNIT_DIR), &table);
        let text = persist::unit_text(&table, &dest, nft.program());
        (paths, text)
    });
    let unit_changed = match &unit {
        Some((paths, text)) => !paths.is_current(text)?,
        None => false,
    };
    let mut warnings = Vec::new();
    let foreign = nft.foreign_forward_drop_chains(&table)?;
    if !foreign.is_empty() {
        warnings.push(format!(
            "other tables have forward chains with a drop policy ({}): they may drop traffic \
             that this table allows (same-domain, internet, policies)",
            foreign.join("; ")
        ));
    }
    if !file_changed && live_changed {
        warnings.push(format!(
            "the live table inet {table} differed from {}: it was changed outside this module",
            dest.display()
        ));
    }

    // Act (not in check mode): live table first, so a file on disk never
    // describes rules that failed to load.
    if !inv.check_mode {
        if live_changed {
            replace_table(&nft, &table, &desired, &want)?;
        }
        if file_changed {
            if let Some(previous) = &previous_file {
                write_atomic(&previous_path(&dest), previous, 0o644)?;
            }
            write_atomic(&dest, &desired, 0o644)?;
        }
        if let Some((paths, text)) = &unit {
            if unit_changed {
                paths.install(text)?;
            }
            if unit_changed && !persist::systemd_is_running() {
                warnings.push(format!(
                    "systemd is not running here: {} is installed and enabled for the next boot \
                     under systemd",
                    paths.unit.display()
                ));
            }
        }
    }

    let router_report = match &router {
        None => None,
        Some(interfaces) => {
            let mut report = router::converge_live(interfaces, inv.check_mode)?;
            if persist {
                let paths = RouterPaths::new(Path::new("/"), &table);
                report.persisted =
                    router::persist(&paths, interfaces, &dest, nft.program(), inv.check_mode)?;
            }
            Some(report)
        }
    };

    // Report.
    let router_changed = router_report.as_ref().is_some_and(|r| r.changed());
    let mut outcome = Outcome::new(live_changed || file_changed || unit_changed || router_changed);
    outcome.warnings = warnings;
    outcome.diff = Some(Diff {
        before: previous_file.clone().unwrap_or_default(),
        after: desired.clone(),
        before_header: dest.display().to_string(),
        after_header: dest.display().to_string(),
    });
    outcome
        .set("dest", dest.display().to_string())
        .set("sha256", sha256_hex(&desired))
        .set("table", format!("inet {table}"))
        .set("live_changed", live_changed)
        .set("file_changed", file_changed)
        .set(
            "previous",
            previous_file
                .filter(|_| file_changed)
                .map(|_| previous_path(&dest).display().to_string()),
        )
        .set(
            "unit",
            unit.as_ref()
                .map(|(paths, _)| paths.unit.display().to_string()),
        )
        .set("router", &router_report);
    Ok(outcome)
}

/// Where the file being replaced is kept: `<dest>.previous`.
fn previous_path(dest: &Path) -> PathBuf {
    let mut name = dest.as_os_str().to_owned();
    name.push(".previous");
    PathBuf::from(name)
}
