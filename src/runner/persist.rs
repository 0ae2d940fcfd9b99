//! Persistence across reboot without any path that flushes other tables.
//!
//! Debian's stock `/etc/nftables.conf` starts with `flush ruleset`, and
//! `nftables.service` flushes the whole ruleset on stop: going through them
//! would wipe Incus's rules at runtime. Instead each table of ours gets its
//! own oneshot unit that loads its file (whose first lines replace only our
//! table), ordered after nftables.service so a stock flush at boot cannot
//! erase it, and before the network comes up so the host never forwards
//! between domains unfiltered. It has no ExecStop: stopping it removes
//! nothing.

use super::fs::{read_optional, remove_owned_file, write_atomic};
use crate::model::TableName;
use crate::render::TABLE_COMMENT;
use anyhow::{bail, Context};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

pub const SYSTEMD_UNIT_DIR: &str = "/etc/systemd/system";
const WANTED_BY: &str = "sysinit.target";
/// The chain of the boot fallback, at the isolation chain's priority.
const FALLBACK_CHAIN: &str = "isolation";

/// The unit that loads one table's ruleset at boot. One function derives
/// the name, so install, tests and lab teardown agree.
pub fn unit_name(table: &TableName) -> String {
    format!("anklume-isolation-{table}.service")
}

/// A path written into a unit must reach `ExecStart=` as one argument and
/// verbatim: systemd splits on whitespace, expands `%` specifiers and `$`
/// variables, reads quotes and backslashes, and a newline starts a new
/// directive (an `ExecStartPre=` once landed in `[Service]` that way). So
/// only absolute paths of plain characters are accepted.
pub fn check_unit_path(path: &Path) -> anyhow::Result<&str> {
    let text = path
        .to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))?;
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+@:,=".contains(c);
    if !text.starts_with('/') || !text.chars().all(plain) || text.contains("/../") {
        bail!(
            "dest {text:?} cannot be written into the boot unit: it must be an absolute path of \
             letters, digits and / . _ - + @ : , = only (no whitespace, control characters, \
             quotes, backslashes, % or $)"
        );
    }
    Ok(text)
}

/// The fail-closed ruleset loaded at boot before our file: our inet table
/// (marked, so the next apply replaces it) with one forward chain that
/// keeps each known domain bridge's own traffic and drops forwarding
/// between two known bridges, and between a known bridge and any bridge
/// matching a wildcard. It is what stays live when the file is missing or
/// `nft -f` refuses it, so the domains never boot unisolated. Names come
/// from the last applied ruleset's sets, whose characters were checked.
///
/// It leaves `bridge <table>` (isolation inside a domain) alone: at boot
/// there is none, and the file loads it in the same transaction as the inet
/// table (its header replaces both); when the unit is restarted with a file
/// that is refused, the bridge table last loaded (ours, stricter than none)
/// stays. The fallback does not isolate machines inside a domain: that is
/// the file's job, and the unit fails visibly when the file does not load.
pub fn boot_fallback(
    table: &TableName,
    bridges: &BTreeSet<String>,
    wildcards: &BTreeSet<String>,
) -> anyhow::Result<String> {
    let plain = |s: &str| {
        !s.is_empty()
            && s.len() <= 16
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-*".contains(c))
    };
    if let Some(bad) = bridges.iter().chain(wildcards).find(|s| !plain(s)) {
        bail!("interface name {bad:?} cannot go into the boot fallback");
    }
    let set = |items: &BTreeSet<String>| {
        items
            .iter()
            .map(|b| format!("\"{b}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut rules = Vec::new();
    if !bridges.is_empty() {
        let known = set(bridges);
        let pairs: Vec<String> = bridges
            .iter()
            .map(|b| format!("\"{b}\" . \"{b}\""))
            .collect();
        rules.push(format!(
            "iifname . oifname {{ {} }} accept",
            pairs.join(", ")
        ));
        rules.push(format!("iifname {{ {known} }} oifname {{ {known} }} drop"));
        for wildcard in wildcards {
            rules.push(format!("iifname {{ {known} }} oifname \"{wildcard}\" drop"));
            rules.push(format!("iifname \"{wildcard}\" oifname {{ {known} }} drop"));
        }
    }
    Ok(format!(
        "table inet {table} {{ }} ; delete table inet {table} ; table inet {table} {{ comment \
         \"{TABLE_COMMENT}\" ; chain {FALLBACK_CHAIN} {{ type filter hook forward priority -1 ; \
         policy accept ; {}}} ; }}",
        rules.iter().map(|r| format!("{r} ; ")).collect::<String>()
    ))
}

/// The unit: load the fail-closed fallback, then our file over it in one
/// transaction. When the file is missing or refused, the unit fails (shown
/// by `systemctl status` and in the journal with nft's error) and the
/// fallback stays live.
pub fn unit_text(
    table: &TableName,
    ruleset: &Path,
    nft: &Path,
    fallback: &str,
) -> anyhow::Result<String> {
    let ruleset = check_unit_path(ruleset)?;
    let nft = check_unit_path(nft)?;
    if fallback.contains(['\'', '\n', '%', '$', '\\']) {
        bail!("the boot fallback cannot be quoted into the unit");
    }
    Ok(format!(
        "# Installed by firewall_router_apply (anklume-isolation). Loads table inet {table}\n\
         # (and table bridge {table}, when the file has one) from {ruleset} at boot; the\n\
         # file replaces only those tables. If it cannot be loaded, the fail-closed\n\
         # fallback (no forwarding between domain bridges) stays live and this unit\n\
         # fails: see `systemctl status` and the journal.\n\
         [Unit]\n\
         Description=anklume isolation ruleset (table inet {table})\n\
         DefaultDependencies=no\n\
         After=nftables.service local-fs.target\n\
         Before=network-pre.target incus.service shutdown.target\n\
         Wants=network-pre.target\n\
         Conflicts=shutdown.target\n\
         \n\
         [Service]\n\
         Type=oneshot\n\
         RemainAfterExit=yes\n\
         ExecStartPre={nft} '{fallback}'\n\
         ExecStart={nft} -f {ruleset}\n\
         ExecReload={nft} -f {ruleset}\n\
         \n\
         [Install]\n\
         WantedBy={WANTED_BY}\n"
    ))
}

/// Where the unit and its enablement link live.
#[derive(Debug, Clone)]
pub struct UnitPaths {
    pub unit: PathBuf,
    pub wants_link: PathBuf,
}

impl UnitPaths {
    pub fn new(unit_dir: &Path, table: &TableName) -> Self {
        let name = unit_name(table);
        UnitPaths {
            unit: unit_dir.join(&name),
            wants_link: unit_dir.join(format!("{WANTED_BY}.wants")).join(&name),
        }
    }

    /// Whether the unit file and its enablement link are already as wanted.
    pub fn is_current(&self, text: &str) -> anyhow::Result<bool> {
        let unit_ok = read_optional(&self.unit)?.as_deref() == Some(text);
        let link_ok = std::fs::read_link(&self.wants_link).ok().as_deref() == Some(&*self.unit);
        Ok(unit_ok && link_ok)
    }

    /// Writes the unit and enables it the way `systemctl enable` does (a
    /// link in the target's `.wants` directory), which also works on a host
    /// where systemd is not running right now; reloads systemd when it is.
    pub fn install(&self, text: &str) -> anyhow::Result<()> {
        write_atomic(&self.unit, text, 0o644)?;
        let wants_dir = self
            .wants_link
            .parent()
            .context("the wants link has a parent directory")?;
        std::fs::create_dir_all(wants_dir)
            .with_context(|| format!("cannot create {}", wants_dir.display()))?;
        if std::fs::read_link(&self.wants_link).ok().as_deref() != Some(&*self.unit) {
            let _ = std::fs::remove_file(&self.wants_link);
            std::os::unix::fs::symlink(&self.unit, &self.wants_link).with_context(|| {
                format!("cannot enable the unit: link {}", self.wants_link.display())
            })?;
        }
        daemon_reload()
    }

    /// Removes the unit and its enablement link (it has no ExecStop:
    /// removing it unloads nothing). Returns whether anything was there.
    pub fn remove(&self) -> anyhow::Result<bool> {
        let link = remove_owned_file(&self.wants_link)?;
        let unit = remove_owned_file(&self.unit)?;
        if link || unit {
            daemon_reload()?;
        }
        Ok(link || unit)
    }

    /// Whether the unit or its link exist.
    pub fn exists(&self) -> bool {
        self.unit.symlink_metadata().is_ok() || self.wants_link.symlink_metadata().is_ok()
    }
}

fn daemon_reload() -> anyhow::Result<()> {
    if systemd_is_running() {
        let mut cmd = std::process::Command::new("systemctl");
        cmd.arg("daemon-reload");
        super::process::run_with_stdin(cmd, None).context("systemctl daemon-reload")?;
    }
    Ok(())
}

pub fn systemd_is_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fallback() -> String {
        let table = TableName::new("anklume").unwrap();
        boot_fallback(
            &table,
            &["net-a".to_string(), "net-b".to_string()].into(),
            &["net-*".to_string()].into(),
        )
        .unwrap()
    }

    #[test]
    fn the_unit_never_stops_or_flushes_and_loads_after_nftables_service() {
        let table = TableName::new("anklume").unwrap();
        let text = unit_text(
            &table,
            Path::new("/etc/nftables.d/x.nft"),
            Path::new("/usr/sbin/nft"),
            &fallback(),
        )
        .unwrap();
        assert!(text.contains("ExecStart=/usr/sbin/nft -f /etc/nftables.d/x.nft\n"));
        assert!(text.contains("ExecStartPre=/usr/sbin/nft 'table inet anklume { }"));
        // On nft's command line a block ends with `;` before the next `}`.
        assert!(text.contains("drop ; } ; }'\n"), "{text}");
        assert!(text.contains("After=nftables.service"));
        assert!(text.contains("Before=network-pre.target"));
        assert!(!text.contains("ExecStop"));
        assert!(!text.contains("flush"));
        assert!(
            !text.contains("ConditionPathExists"),
            "a missing file must fail, not skip"
        );
    }

    #[test]
    fn paths_systemd_would_split_or_expand_are_refused() {
        let table = TableName::new("anklume").unwrap();
        for bad in [
            "/etc/with space/x.nft",
            "/etc/x%i.nft",
            "/etc/x$HOME.nft",
            "/etc/x.nft\nExecStartPre=/bin/evil",
            "/etc/x\tab.nft",
            "relative/x.nft",
            "/etc/\"q\".nft",
            "/etc/a\\b.nft",
            "/etc/../x.nft",
        ] {
            let err = unit_text(
                &table,
                Path::new(bad),
                Path::new("/usr/sbin/nft"),
                &fallback(),
            );
            assert!(err.is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn install_is_idempotent_and_enables_the_unit() {
        let dir = tempfile::tempdir().unwrap();
        let table = TableName::new("anklume_t").unwrap();
        let paths = UnitPaths::new(dir.path(), &table);
        let text = unit_text(
            &table,
            Path::new("/x.nft"),
            Path::new("/usr/sbin/nft"),
            &fallback(),
        )
        .unwrap();
        assert!(!paths.is_current(&text).unwrap());
        if !systemd_is_running() {
            paths.install(&text).unwrap();
            assert!(paths.is_current(&text).unwrap());
            assert_eq!(std::fs::read_link(&paths.wants_link).unwrap(), paths.unit);
            assert!(paths.remove().unwrap());
            assert!(!paths.exists());
            assert!(!paths.remove().unwrap());
        }
    }
}
