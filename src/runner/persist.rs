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

use super::fs::{read_optional, write_atomic};
use crate::model::TableName;
use anyhow::Context;
use std::path::{Path, PathBuf};

pub const SYSTEMD_UNIT_DIR: &str = "/etc/systemd/system";
const WANTED_BY: &str = "sysinit.target";

/// The unit that loads one table's ruleset at boot. One function derives
/// the name, so install, tests and lab teardown agree.
pub fn unit_name(table: &TableName) -> String {
    format!("anklume-isolation-{table}.service")
}

pub fn unit_text(table: &TableName, ruleset: &Path, nft: &Path) -> String {
    format!(
        "# Installed by firewall_router_apply (anklume-isolation). Loads table inet {table}\n\
         # from {ruleset} at boot; the file replaces only that table.\n\
         [Unit]\n\
         Description=anklume isolation ruleset (table inet {table})\n\
         DefaultDependencies=no\n\
         After=nftables.service local-fs.target\n\
         Before=network-pre.target incus.service shutdown.target\n\
         Wants=network-pre.target\n\
         Conflicts=shutdown.target\n\
         ConditionPathExists={ruleset}\n\
         \n\
         [Service]\n\
         Type=oneshot\n\
         RemainAfterExit=yes\n\
         ExecStart={nft} -f {ruleset}\n\
         ExecReload={nft} -f {ruleset}\n\
         \n\
         [Install]\n\
         WantedBy={WANTED_BY}\n",
        ruleset = ruleset.display(),
        nft = nft.display(),
    )
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
        if systemd_is_running() {
            let mut cmd = std::process::Command::new("systemctl");
            cmd.arg("daemon-reload");
            super::process::run_with_stdin(cmd, None).context("systemctl daemon-reload")?;
        }
        Ok(())
    }
}

pub fn systemd_is_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_never_stops_or_flushes_and_loads_after_nftables_service() {
        let table = TableName::new("anklume").unwrap();
        let text = unit_text(
            &table,
            Path::new("/etc/nftables.d/x.nft"),
            Path::new("/usr/sbin/nft"),
        );
        assert!(text.contains("ExecStart=/usr/sbin/nft -f /etc/nftables.d/x.nft\n"));
        assert!(text.contains("After=nftables.service"));
        assert!(text.contains("Before=network-pre.target"));
        assert!(!text.contains("ExecStop"));
        assert!(!text.contains("flush"));
    }

    #[test]
    fn install_is_idempotent_and_enables_the_unit() {
        let dir = tempfile::tempdir().unwrap();
        let table = TableName::new("anklume_t").unwrap();
        let paths = UnitPaths::new(dir.path(), &table);
        let text = unit_text(&table, Path::new("/x.nft"), Path::new("/usr/sbin/nft"));
        assert!(!paths.is_current(&text).unwrap());
        if !systemd_is_running() {
            paths.install(&text).unwrap();
            assert!(paths.is_current(&text).unwrap());
            assert_eq!(std::fs::read_link(&paths.wants_link).unwrap(), paths.unit);
        }
    }
}
