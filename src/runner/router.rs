//! Inside the firewall instance (mode router): reads the links, applies the
//! link steps the plan decided, turns forwarding on, and installs the boot
//! hook (a systemd unit where systemd runs the instance, an inittab entry
//! where busybox or sysvinit does) and the sysctl.d file.
//!
//! Order matters and is the caller's: the table is live before this runs,
//! so forwarding is never on without it.

use super::fs::{read_optional, write_atomic};
use super::process::{find_program, run_with_stdin};
use crate::model::firewall::{FirewallInterface, MacAddr};
use crate::model::TableName;
use crate::plan::router::links::{
    boot_script, link_steps, link_sysctl_path, sysctl_conf, sysctl_path, Link, LinkStep,
    FORWARDING_SYSCTLS, LINK_SYSCTLS,
};
use anyhow::Context;
use serde::Serialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the persistent pieces go, under a root (`/` in production, a
/// temporary directory in tests).
#[derive(Debug, Clone)]
pub struct RouterPaths {
    pub script: PathBuf,
    pub sysctl: PathBuf,
    pub unit: PathBuf,
    pub wants_link: PathBuf,
    pub inittab: PathBuf,
}

const UNIT_WANTED_BY: &str = "sysinit.target";

impl RouterPaths {
    pub fn new(root: &Path, table: &TableName) -> RouterPaths {
        let unit_name = format!("anklume-router-{table}.service");
        RouterPaths {
            script: root.join(format!("etc/anklume/router-{table}.sh")),
            sysctl: root.join("etc/sysctl.d/60-anklume-router.conf"),
            unit: root.join("etc/systemd/system").join(&unit_name),
            wants_link: root
                .join("etc/systemd/system")
                .join(format!("{UNIT_WANTED_BY}.wants"))
                .join(&unit_name),
            inittab: root.join("etc/inittab"),
        }
    }

    fn unit_text(&self, script_path: &Path) -> String {
        format!(
            "# Installed by firewall_router_apply (mode router).\n\
             [Unit]\n\
             Description=anklume firewall router: ruleset, router addresses, forwarding\n\
             DefaultDependencies=no\n\
             After=local-fs.target nftables.service systemd-sysctl.service\n\
             Before=network-pre.target shutdown.target\n\
             Wants=network-pre.target\n\
             Conflicts=shutdown.target\n\
             \n\
             [Service]\n\
             Type=oneshot\n\
             RemainAfterExit=yes\n\
             ExecStart=/bin/sh {}\n\
             \n\
             [Install]\n\
             WantedBy={UNIT_WANTED_BY}\n",
            script_path.display()
        )
    }

    /// The inittab line of busybox init and sysvinit, run once at boot.
    fn inittab_line(script_path: &Path) -> String {
        format!("::sysinit:/bin/sh {}", script_path.display())
    }
}

/// What one converge did (or would do, in check mode).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RouterReport {
    pub link_steps: Vec<String>,
    pub forwarding_changed: bool,
    pub persisted: Vec<String>,
}

impl RouterReport {
    pub fn changed(&self) -> bool {
        !(self.link_steps.is_empty() && !self.forwarding_changed && self.persisted.is_empty())
    }
}

fn ip() -> anyhow::Result<PathBuf> {
    find_program("ip").context("`ip` (iproute2) is not installed in the firewall instance")
}

fn run_ip(args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new(ip()?);
    cmd.args(args);
    run_with_stdin(cmd, None).with_context(|| format!("ip {}", args.join(" ")))
}

/// Every link with its MAC, state and global addresses (`ip -j addr`).
pub fn read_links() -> anyhow::Result<Vec<Link>> {
    let out = run_ip(&["-j", "addr", "show"])?;
    let json: Value = serde_json::from_str(&out).context("ip -j addr show: invalid JSON")?;
    Ok(parse_links(&json))
}

pub fn parse_links(json: &Value) -> Vec<Link> {
    json.as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| {
            let name = l["ifname"].as_str()?.to_string();
            let mac = l["address"].as_str().and_then(|m| MacAddr::parse(m).ok());
            let up = l["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == "UP"));
            let global = l["addr_info"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|a| a["scope"] == "global")
                .filter_map(|a| Some(format!("{}/{}", a["local"].as_str()?, a["prefixlen"])))
                .collect();
            Some(Link {
                name,
                mac,
                up,
                global,
            })
        })
        .collect()
}

fn apply_step(step: &LinkStep) -> anyhow::Result<()> {
    match step {
        LinkStep::Rename { from, to } => {
            run_ip(&["link", "set", "dev", from, "down"])?;
            run_ip(&["link", "set", "dev", from, "name", to])?;
        }
        LinkStep::Up { name } => {
            run_ip(&["link", "set", "dev", name, "up"])?;
        }
        LinkStep::DelAddr { name, cidr } => {
            run_ip(&["addr", "del", cidr, "dev", name])?;
        }
        // No duplicate address detection: the address is reserved for this
        // NIC (DHCP reservation, fixed host number), and DAD would leave the
        // router unreachable over IPv6 for a second after every apply.
        LinkStep::AddAddr { name, cidr } if cidr.contains(':') => {
            run_ip(&["-6", "addr", "replace", cidr, "dev", name, "nodad"])?;
        }
        LinkStep::AddAddr { name, cidr } => {
            run_ip(&["-4", "addr", "replace", cidr, "dev", name])?;
        }
    }
    Ok(())
}

fn describe(step: &LinkStep) -> String {
    match step {
        LinkStep::Rename { from, to } => format!("rename {from} to {to}"),
        LinkStep::Up { name } => format!("set {name} up"),
        LinkStep::DelAddr { name, cidr } => format!("remove {cidr} from {name}"),
        LinkStep::AddAddr { name, cidr } => format!("add {cidr} to {name}"),
    }
}

/// Addresses and forwarding, now. The table must already be live.
pub fn converge_live(
    interfaces: &[FirewallInterface],
    check_mode: bool,
) -> anyhow::Result<RouterReport> {
    let steps = link_steps(interfaces, &read_links()?)?;
    let mut report = RouterReport {
        link_steps: steps.iter().map(describe).collect(),
        ..RouterReport::default()
    };
    for (key, value) in FORWARDING_SYSCTLS {
        let path = sysctl_path(key);
        let current = read_optional(Path::new(&path))?.unwrap_or_default();
        if current.trim() != value {
            report.forwarding_changed = true;
            if !check_mode {
                std::fs::write(&path, value).with_context(|| format!("cannot set {key}"))?;
            }
        }
    }
    // Renames and links up first: the per-interface settings are named
    // after the interface, and must be in place before addresses are
    // removed, or a router advertisement puts a SLAAC address back.
    let (links, addresses): (Vec<&LinkStep>, Vec<&LinkStep>) = steps
        .iter()
        .partition(|s| matches!(s, LinkStep::Rename { .. } | LinkStep::Up { .. }));
    if !check_mode {
        links.into_iter().try_for_each(apply_step)?;
    }
    for iface in interfaces {
        for (key, value) in LINK_SYSCTLS {
            let path = link_sysctl_path(iface.name.as_str(), key);
            // Before a rename (check mode) the path may not exist yet.
            let current = read_optional(Path::new(&path))?.unwrap_or_default();
            if current.trim() != value {
                report
                    .link_steps
                    .push(format!("set {key}={value} on {}", iface.name));
                if !check_mode {
                    std::fs::write(&path, value)
                        .with_context(|| format!("cannot set {key} on {}", iface.name))?;
                }
            }
        }
    }
    if !check_mode {
        addresses.into_iter().try_for_each(apply_step)?;
    }
    Ok(report)
}

/// The boot hook and the sysctl.d file, written only when they differ.
pub fn persist(
    paths: &RouterPaths,
    interfaces: &[FirewallInterface],
    ruleset: &Path,
    nft: &Path,
    check_mode: bool,
) -> anyhow::Result<Vec<String>> {
    let mut changed = Vec::new();
    let script_text = boot_script(interfaces, ruleset, nft);
    let mut files = vec![
        (paths.script.clone(), script_text, 0o755),
        (paths.sysctl.clone(), sysctl_conf(), 0o644),
    ];
    let systemd =
        paths.unit.parent().is_some_and(Path::is_dir) || Path::new("/run/systemd/system").is_dir();
    if systemd {
        files.push((paths.unit.clone(), paths.unit_text(&paths.script), 0o644));
    }
    for (path, text, mode) in &files {
        if read_optional(path)?.as_deref() != Some(text.as_str()) {
            changed.push(path.display().to_string());
            if !check_mode {
                write_atomic(path, text, *mode)?;
            }
        }
    }
    if systemd && std::fs::read_link(&paths.wants_link).ok().as_deref() != Some(&*paths.unit) {
        changed.push(paths.wants_link.display().to_string());
        if !check_mode {
            let dir = paths
                .wants_link
                .parent()
                .context("wants link has a parent")?;
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let _ = std::fs::remove_file(&paths.wants_link);
            std::os::unix::fs::symlink(&paths.unit, &paths.wants_link)
                .with_context(|| format!("cannot enable {}", paths.unit.display()))?;
        }
    }
    // busybox init and sysvinit read /etc/inittab; add our line once.
    if let Some(inittab) = read_optional(&paths.inittab)? {
        let line = RouterPaths::inittab_line(&paths.script);
        if !inittab.lines().any(|l| l == line) {
            changed.push(paths.inittab.display().to_string());
            if !check_mode {
                let mut text = inittab;
                if !text.ends_with('\n') {
                    text.push('\n');
                }
                text.push_str("# anklume firewall router (firewall_router_apply, mode router)\n");
                text.push_str(&line);
                text.push('\n');
                write_atomic(&paths.inittab, &text, 0o644)?;
            }
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn links_are_parsed_from_ip_json() {
        let json = json!([
            {"ifname": "lo", "flags": ["LOOPBACK", "UP"], "address": "00:00:00:00:00:00",
             "addr_info": [{"family": "inet", "local": "127.0.0.1", "prefixlen": 8, "scope": "host"}]},
            {"ifname": "enp5s0", "flags": ["BROADCAST", "MULTICAST"], "address": "0a:00:00:00:00:01",
             "addr_info": [{"family": "inet6", "local": "fd00::1", "prefixlen": 64, "scope": "global"},
                           {"family": "inet6", "local": "fe80::1", "prefixlen": 64, "scope": "link"}]}
        ]);
        let links = parse_links(&json);
        assert_eq!(links.len(), 2);
        assert!(links[0].up && links[0].global.is_empty());
        assert!(!links[1].up);
        assert_eq!(links[1].mac.unwrap().to_string(), "0a:00:00:00:00:01");
        assert_eq!(links[1].global.iter().collect::<Vec<_>>(), ["fd00::1/64"]);
    }

    #[test]
    fn persistence_goes_to_inittab_when_there_is_one_and_is_idempotent() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc/systemd/system")).unwrap();
        std::fs::write(root.path().join("etc/inittab"), "::sysinit:/etc/lab/rc\n").unwrap();
        let table = TableName::new("anklume").unwrap();
        let paths = RouterPaths::new(root.path(), &table);
        let first = persist(
            &paths,
            &[],
            Path::new("/r.nft"),
            Path::new("/usr/sbin/nft"),
            false,
        )
        .unwrap();
        assert!(first.iter().any(|p| p.ends_with("etc/inittab")));
        let inittab = std::fs::read_to_string(&paths.inittab).unwrap();
        assert!(inittab.starts_with("::sysinit:/etc/lab/rc\n"));
        assert!(inittab.contains(&format!("::sysinit:/bin/sh {}", paths.script.display())));
        assert!(std::fs::read_to_string(&paths.sysctl)
            .unwrap()
            .contains("ip_forward = 1"));
        let again = persist(
            &paths,
            &[],
            Path::new("/r.nft"),
            Path::new("/usr/sbin/nft"),
            false,
        )
        .unwrap();
        assert!(again.is_empty(), "{again:?}");
    }
}
