//! Inside the firewall instance: what to change on its links so each holds
//! its router addresses, and the boot hook that restores them. Pure: the
//! runner reads the links, this decides, the runner acts.
//!
//! Interfaces are found by MAC, never by name or position: VMs name NICs by
//! PCI slot, and a domain added or removed shifts slots. A link found under
//! another name is renamed to the interface's name, so the ruleset (which
//! matches names) and the operator see one name per domain.

use crate::model::firewall::{FirewallInterface, MacAddr};
use anyhow::bail;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

/// A link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub mac: Option<MacAddr>,
    pub up: bool,
    /// Global addresses, `addr/prefix`.
    pub global: BTreeSet<String>,
}

/// One change to make, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkStep {
    /// A link must be down to be renamed; it is brought up by `Up` after.
    Rename {
        from: String,
        to: String,
    },
    Up {
        name: String,
    },
    /// A global address that is not the router's (SLAAC from before
    /// forwarding was on, an older router_host): removed, so the firewall
    /// answers on exactly one address per family and bridge.
    DelAddr {
        name: String,
        cidr: String,
    },
    AddAddr {
        name: String,
        cidr: String,
    },
}

/// The kernel settings a router needs: IPv4 and IPv6 forwarding.
pub const FORWARDING_SYSCTLS: [(&str, &str); 2] = [
    ("net.ipv4.ip_forward", "1"),
    ("net.ipv6.conf.all.forwarding", "1"),
];

/// IPv6 settings of each router interface: a router's addresses are its
/// own, never taken from router advertisements (an image may accept them
/// even with forwarding on, `accept_ra=2`, and SLAAC would give the firewall
/// a second address on every bridge).
pub const LINK_SYSCTLS: [(&str, &str); 2] = [("accept_ra", "0"), ("autoconf", "0")];

/// `/proc/sys` path of an IPv6 setting of one interface.
pub fn link_sysctl_path(iface: &str, key: &str) -> String {
    format!("/proc/sys/net/ipv6/conf/{iface}/{key}")
}

/// `/proc/sys/...` path of a sysctl key.
pub fn sysctl_path(key: &str) -> String {
    format!("/proc/sys/{}", key.replace('.', "/"))
}

/// The wanted addresses of an interface, `addr/prefix`.
pub fn wanted_addresses(i: &FirewallInterface) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    if let Some(v4) = i.ipv4 {
        set.insert(v4.to_string());
    }
    if let Some(v6) = i.ipv6 {
        set.insert(v6.to_string());
    }
    set
}

/// The steps that give every interface its name, state and addresses.
pub fn link_steps(
    interfaces: &[FirewallInterface],
    links: &[Link],
) -> anyhow::Result<Vec<LinkStep>> {
    let mut steps = Vec::new();
    for i in interfaces {
        let Some(link) = links.iter().find(|l| l.mac == Some(i.hwaddr)) else {
            bail!(
                "no interface with MAC {} (bridge {}) in this instance: attach the profile with \
                 incus_firewall_vm_profile, and restart the instance if it is a VM",
                i.hwaddr,
                i.bridge
            );
        };
        let name = i.name.to_string();
        if link.name != name {
            if let Some(other) = links.iter().find(|l| l.name == name) {
                bail!(
                    "interface {name} (wanted for MAC {}) is taken by another link (MAC {}): \
                     rename or remove it",
                    i.hwaddr,
                    other.mac.map_or("none".to_string(), |m| m.to_string())
                );
            }
            steps.push(LinkStep::Rename {
                from: link.name.clone(),
                to: name.clone(),
            });
        }
        if !link.up || link.name != name {
            steps.push(LinkStep::Up { name: name.clone() });
        }
        let wanted = wanted_addresses(i);
        for cidr in link.global.difference(&wanted) {
            steps.push(LinkStep::DelAddr {
                name: name.clone(),
                cidr: cidr.clone(),
            });
        }
        for cidr in wanted.difference(&link.global) {
            steps.push(LinkStep::AddAddr {
                name: name.clone(),
                cidr: cidr.clone(),
            });
        }
    }
    Ok(steps)
}

/// The persistent forwarding settings (`/etc/sysctl.d`).
pub fn sysctl_conf() -> String {
    let mut text = String::from(
        "# Installed by firewall_router_apply (mode router): this instance routes between\n\
         # domains. Its table is loaded before any router address exists (boot hook).\n",
    );
    for (key, value) in FORWARDING_SYSCTLS {
        let _ = writeln!(text, "{key} = {value}");
    }
    text
}

/// The boot hook: the ruleset first, then the addresses, then forwarding,
/// and it stops at the first failure. Until the addresses exist the host
/// has nowhere to send inter-domain traffic, so a failed load leaves the
/// router unreachable (closed), never forwarding unfiltered. POSIX sh with
/// `ip` and `nft` only: no Python in the firewall.
pub fn boot_script(interfaces: &[FirewallInterface], ruleset: &Path, nft: &Path) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "#!/bin/sh\n\
         # Installed by firewall_router_apply (mode router). Do not edit: re-run it.\n\
         set -eu\n\
         PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
         {nft} -f {ruleset}\n\
         # Find a link by MAC address (VMs name NICs by PCI slot).\n\
         by_mac() {{\n\
         \tfor d in /sys/class/net/*; do\n\
         \t\tif [ \"$(cat \"$d/address\" 2>/dev/null)\" = \"$1\" ]; then echo \"${{d##*/}}\"; return 0; fi\n\
         \tdone\n\
         \techo \"anklume router: no link with MAC $1\" >&2\n\
         \treturn 1\n\
         }}\n\
         want() {{  # want <mac> <name> <address>...\n\
         \tdev=$(by_mac \"$1\") || return 1\n\
         \tif [ \"$dev\" != \"$2\" ]; then ip link set dev \"$dev\" down; ip link set dev \"$dev\" name \"$2\"; fi\n\
         \tip link set dev \"$2\" up\n\
         \techo 0 >\"/proc/sys/net/ipv6/conf/$2/accept_ra\"\n\
         \techo 0 >\"/proc/sys/net/ipv6/conf/$2/autoconf\"\n\
         \tname=$2; shift 2\n\
         \tfor a in \"$@\"; do\n\
         \t\tcase $a in\n\
         \t\t*:*) ip -6 addr replace \"$a\" dev \"$name\" nodad ;;\n\
         \t\t*) ip -4 addr replace \"$a\" dev \"$name\" ;;\n\
         \t\tesac\n\
         \tdone\n\
         }}",
        nft = nft.display(),
        ruleset = ruleset.display(),
    );
    for i in interfaces {
        let addrs: Vec<String> = wanted_addresses(i).into_iter().collect();
        let _ = writeln!(s, "want {} {} {}", i.hwaddr, i.name, addrs.join(" "));
    }
    for (key, value) in FORWARDING_SYSCTLS {
        let _ = writeln!(s, "echo {value} >{}", sysctl_path(key));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BridgePattern, DomainBridge, IfName};

    fn iface(bridge: &str, n: u8) -> FirewallInterface {
        let mut b = DomainBridge::new(
            IfName::new(bridge).unwrap(),
            &BridgePattern::new("net-").unwrap(),
        )
        .unwrap();
        b.ipv4 = Some(format!("10.0.{n}.1/24").parse().unwrap());
        b.ipv6 = Some(format!("fd00:{n}::1/64").parse().unwrap());
        FirewallInterface::derive("fw", &b, 253).unwrap()
    }

    fn link(name: &str, i: &FirewallInterface, up: bool, global: &[&str]) -> Link {
        Link {
            name: name.into(),
            mac: Some(i.hwaddr),
            up,
            global: global.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_vm_link_is_found_by_mac_renamed_brought_up_and_addressed() {
        let i = iface("net-pro", 1);
        let steps = link_steps(
            std::slice::from_ref(&i),
            &[link("enp5s0", &i, false, &["fd00:1::1234/64"])],
        )
        .unwrap();
        assert_eq!(
            steps,
            [
                LinkStep::Rename {
                    from: "enp5s0".into(),
                    to: "net-pro".into()
                },
                LinkStep::Up {
                    name: "net-pro".into()
                },
                LinkStep::DelAddr {
                    name: "net-pro".into(),
                    cidr: "fd00:1::1234/64".into()
                },
                LinkStep::AddAddr {
                    name: "net-pro".into(),
                    cidr: "10.0.1.253/24".into()
                },
                LinkStep::AddAddr {
                    name: "net-pro".into(),
                    cidr: "fd00:1::fd/64".into()
                },
            ]
        );
    }

    #[test]
    fn a_converged_link_needs_nothing() {
        let i = iface("net-pro", 1);
        let l = link("net-pro", &i, true, &["10.0.1.253/24", "fd00:1::fd/64"]);
        assert!(link_steps(&[i], &[l]).unwrap().is_empty());
    }

    #[test]
    fn a_missing_nic_or_a_taken_name_fails_with_what_to_do() {
        let i = iface("net-pro", 1);
        let err = link_steps(std::slice::from_ref(&i), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("attach the profile"), "{err}");
        let other = Link {
            name: "net-pro".into(),
            mac: None,
            up: true,
            global: BTreeSet::new(),
        };
        let err = link_steps(
            std::slice::from_ref(&i),
            &[link("eth1", &i, true, &[]), other],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("taken by another link"), "{err}");
    }

    #[test]
    fn the_boot_hook_loads_the_table_before_any_address_and_forwarding_last() {
        let ifaces = [iface("net-a", 1), iface("net-b", 2)];
        let s = boot_script(
            &ifaces,
            Path::new("/etc/nftables.d/r.nft"),
            Path::new("/usr/sbin/nft"),
        );
        let load = s.find("/usr/sbin/nft -f /etc/nftables.d/r.nft").unwrap();
        let first_want = s.find(&format!("want {}", ifaces[0].hwaddr)).unwrap();
        let forward = s.find("echo 1 >/proc/sys/net/ipv4/ip_forward").unwrap();
        assert!(load < first_want && first_want < forward);
        assert!(s.contains("echo 1 >/proc/sys/net/ipv6/conf/all/forwarding"));
        assert!(s.contains("set -eu"));
        assert!(sysctl_conf().contains("net.ipv6.conf.all.forwarding = 1"));
    }
}
