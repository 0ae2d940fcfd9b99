//! The firewall instance's interfaces (vm mode): one NIC per domain bridge,
//! each identified by names and a MAC address derived from its bridge, and
//! the router address it holds there. One function per derived name, so the
//! profile, the router ruleset and the router's address step always agree.

use super::bridge::DomainBridge;
use super::names::{IfName, Name};
use anyhow::{bail, ensure, Context};
use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, Ipv6Addr};

/// The firewall's host number on every domain subnet (`.253`, `::fd`).
pub const DEFAULT_ROUTER_HOST: u32 = 253;

/// One NIC of the firewall instance, as `incus_firewall_vm_profile` returns
/// it and the router render and apply take it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct FirewallInterface {
    /// The host's domain bridge the NIC is plugged into.
    pub bridge: IfName,
    pub domain: Name,
    /// The Incus device name in the profile (derived from the bridge, so
    /// adding or removing a domain never renames another NIC).
    pub device: String,
    /// The interface name inside the instance (containers take it from the
    /// device's `name`; VMs name NICs by PCI slot, so the router step finds
    /// the interface by `hwaddr` and renames it).
    pub name: IfName,
    pub hwaddr: MacAddr,
    /// The router's address on this bridge, with the bridge's prefix length.
    pub ipv4: Option<Ipv4Net>,
    pub ipv6: Option<Ipv6Net>,
}

/// The device name of the NIC on `bridge`.
pub fn device_name(bridge: &IfName) -> String {
    bridge.as_str().to_string()
}

/// The interface name inside the instance: the bridge's own name, which is
/// already a valid interface name of at most 15 bytes and unique per bridge.
pub fn interface_name(bridge: &IfName) -> IfName {
    bridge.clone()
}

/// A locally administered, unicast MAC address, written `aa:bb:cc:dd:ee:ff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr([u8; 6]);

impl MacAddr {
    /// The deterministic MAC of `instance`'s NIC on `bridge`: a hash of both
    /// names, so the identity of a NIC survives re-creation and VMs (which
    /// name NICs by PCI slot) can be matched by MAC. The instance is part of
    /// the key so two firewall instances on one bridge never share a MAC.
    pub fn derive(instance: &str, bridge: &IfName) -> MacAddr {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(format!("anklume-firewall/{instance}/{bridge}").as_bytes());
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&digest[..6]);
        // Bit 1 of the first octet: locally administered; bit 0 clear:
        // unicast.
        mac[0] = (mac[0] & 0xfc) | 0x02;
        MacAddr(mac)
    }

    pub fn parse(text: &str) -> anyhow::Result<MacAddr> {
        let parts: Vec<&str> = text.split(':').collect();
        ensure!(
            parts.len() == 6,
            "hwaddr {text:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"
        );
        let mut mac = [0u8; 6];
        for (slot, part) in mac.iter_mut().zip(&parts) {
            ensure!(
                part.len() == 2,
                "hwaddr {text:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"
            );
            *slot = u8::from_str_radix(part, 16)
                .with_context(|| format!("hwaddr {text:?} is not a MAC address"))?;
        }
        ensure!(mac[0] & 1 == 0, "hwaddr {text:?} is a multicast address");
        Ok(MacAddr(mac))
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Host number `host` of the bridge's IPv4 subnet, with its prefix length.
/// Refuses the network and broadcast addresses and the host's gateway.
pub fn router_ipv4(gateway: Ipv4Net, host: u32) -> anyhow::Result<Ipv4Net> {
    let net = gateway.trunc();
    let size: u64 = 1u64 << (32 - u32::from(net.prefix_len()));
    ensure!(
        u64::from(host) > 0 && u64::from(host) < size.saturating_sub(1),
        "router_host {host} is not a usable host number in {net} (1 to {})",
        size.saturating_sub(2)
    );
    let addr = Ipv4Addr::from(u32::from(net.network()) + host);
    ensure!(
        addr != gateway.addr(),
        "router_host {host} gives {addr}, the host's own gateway address on {net}: pick another \
         router_host"
    );
    Ok(Ipv4Net::new(addr, net.prefix_len()).expect("the prefix length comes from a valid net"))
}

/// Host number `host` of the bridge's IPv6 subnet (`::fd` for 253).
pub fn router_ipv6(gateway: Ipv6Net, host: u32) -> anyhow::Result<Ipv6Net> {
    let net = gateway.trunc();
    let bits = 128 - u32::from(net.prefix_len());
    ensure!(
        host > 0 && (bits >= 32 || u128::from(host) < (1u128 << bits) - 1),
        "router_host {host} is not a usable host number in {net}"
    );
    let addr = Ipv6Addr::from(u128::from(net.network()) + u128::from(host));
    ensure!(
        addr != gateway.addr(),
        "router_host {host} gives {addr}, the host's own gateway address on {net}: pick another \
         router_host"
    );
    Ok(Ipv6Net::new(addr, net.prefix_len()).expect("the prefix length comes from a valid net"))
}

impl FirewallInterface {
    /// The NIC of `instance` on one domain bridge, router addresses derived
    /// from the bridge's gateway networks.
    pub fn derive(
        instance: &str,
        bridge: &DomainBridge,
        router_host: u32,
    ) -> anyhow::Result<FirewallInterface> {
        let on = |e: anyhow::Error| e.context(format!("bridge {}", bridge.bridge));
        Ok(FirewallInterface {
            bridge: bridge.bridge.clone(),
            domain: bridge.domain.clone(),
            device: device_name(&bridge.bridge),
            name: interface_name(&bridge.bridge),
            hwaddr: MacAddr::derive(instance, &bridge.bridge),
            ipv4: bridge
                .ipv4
                .map(|g| router_ipv4(g, router_host))
                .transpose()
                .map_err(on)?,
            ipv6: bridge
                .ipv6
                .map(|g| router_ipv6(g, router_host))
                .transpose()
                .map_err(on)?,
        })
    }

    /// The bridge as the policy model sees it: the router's network stands
    /// for the bridge's subnet.
    pub fn domain_bridge(&self) -> DomainBridge {
        DomainBridge {
            bridge: self.bridge.clone(),
            domain: self.domain.clone(),
            ipv4: self.ipv4,
            ipv6: self.ipv6,
            // The interface's networks are the bridge's, read from Incus
            // by incus_firewall_vm_profile: `None` means no subnet there.
            subnets_known: true,
        }
    }
}

/// One entry of the `interfaces` option, as written in the task (usually
/// the list `incus_firewall_vm_profile` returned).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInterface {
    pub bridge: String,
    pub domain: String,
    pub device: Option<String>,
    pub name: String,
    pub hwaddr: String,
    pub ipv4: Option<String>,
    pub ipv6: Option<String>,
}

/// Validates the `interfaces` option: names, MACs, addresses, and no bridge,
/// name, MAC or domain used twice.
pub fn parse_interfaces(raw: &[RawInterface]) -> anyhow::Result<Vec<FirewallInterface>> {
    ensure!(
        !raw.is_empty(),
        "`interfaces` is empty: give the list returned by incus_firewall_vm_profile"
    );
    let mut out: Vec<FirewallInterface> = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let at = || format!("interfaces[{i}] ({})", r.bridge);
        let bridge = IfName::new(&r.bridge).with_context(at)?;
        let iface = FirewallInterface {
            device: r.device.clone().unwrap_or_else(|| device_name(&bridge)),
            domain: Name::new("domain", &r.domain).with_context(at)?,
            name: IfName::new(&r.name).with_context(at)?,
            hwaddr: MacAddr::parse(&r.hwaddr).with_context(at)?,
            ipv4: opt_parse(r.ipv4.as_deref()).with_context(at)?,
            ipv6: opt_parse(r.ipv6.as_deref()).with_context(at)?,
            bridge,
        };
        if iface.ipv4.is_none() && iface.ipv6.is_none() {
            bail!("{}: no ipv4 nor ipv6 router address", at());
        }
        for other in &out {
            for (what, clash) in [
                ("bridge", other.bridge == iface.bridge),
                ("name", other.name == iface.name),
                ("hwaddr", other.hwaddr == iface.hwaddr),
                ("domain", other.domain == iface.domain),
            ] {
                ensure!(
                    !clash,
                    "{}: {what} is already used by the interface on {}",
                    at(),
                    other.bridge
                );
            }
        }
        out.push(iface);
    }
    Ok(out)
}

fn opt_parse<T: std::str::FromStr>(text: Option<&str>) -> anyhow::Result<Option<T>>
where
    T::Err: std::fmt::Display,
{
    match text.filter(|t| !t.is_empty()) {
        None => Ok(None),
        Some(t) => t
            .parse()
            .map(Some)
            .map_err(|e| anyhow::anyhow!("{t:?} is not an address with a prefix length: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::BridgePattern;

    fn bridge(name: &str, v4: Option<&str>, v6: Option<&str>) -> DomainBridge {
        let mut b = DomainBridge::new(
            IfName::new(name).unwrap(),
            &BridgePattern::new("net-").unwrap(),
        )
        .unwrap();
        b.ipv4 = v4.map(|a| a.parse().unwrap());
        b.ipv6 = v6.map(|a| a.parse().unwrap());
        b
    }

    #[test]
    fn router_addresses_are_host_253_of_each_subnet() {
        let b = bridge("net-pro", Some("10.251.11.1/24"), Some("fd42:251:11::1/64"));
        let i = FirewallInterface::derive("anklume-firewall", &b, 253).unwrap();
        assert_eq!(i.ipv4.unwrap().to_string(), "10.251.11.253/24");
        assert_eq!(i.ipv6.unwrap().to_string(), "fd42:251:11::fd/64");
        assert_eq!(i.device, "net-pro");
        assert_eq!(i.name.as_str(), "net-pro");
        assert_eq!(i.domain.as_str(), "pro");
    }

    #[test]
    fn router_host_must_be_a_usable_address_other_than_the_gateway() {
        let gw: Ipv4Net = "10.0.0.1/24".parse().unwrap();
        assert!(router_ipv4(gw, 0).is_err());
        assert!(router_ipv4(gw, 255).is_err(), "broadcast");
        assert!(router_ipv4(gw, 254).is_ok());
        let err = router_ipv4(gw, 1).unwrap_err().to_string();
        assert!(err.contains("gateway"), "{err}");
        let small: Ipv4Net = "10.0.0.1/30".parse().unwrap();
        assert!(router_ipv4(small, 253).is_err());
        let gw6: Ipv6Net = "fd00::1/64".parse().unwrap();
        assert!(router_ipv6(gw6, 1).is_err());
        assert_eq!(router_ipv6(gw6, 253).unwrap().to_string(), "fd00::fd/64");
    }

    #[test]
    fn macs_are_deterministic_local_unicast_and_differ_per_bridge_and_instance() {
        let pro = IfName::new("net-pro").unwrap();
        let perso = IfName::new("net-perso").unwrap();
        let a = MacAddr::derive("fw", &pro);
        assert_eq!(a, MacAddr::derive("fw", &pro));
        assert_ne!(a, MacAddr::derive("fw", &perso));
        assert_ne!(a, MacAddr::derive("fw2", &pro));
        assert_eq!(a.0[0] & 0x03, 0x02, "locally administered unicast");
        assert_eq!(MacAddr::parse(&a.to_string()).unwrap(), a);
        assert!(MacAddr::parse("01:00:00:00:00:00").is_err(), "multicast");
        assert!(MacAddr::parse("02:00:00:00:00").is_err());
    }

    #[test]
    fn interfaces_option_is_validated() {
        let raw = |bridge: &str, name: &str, mac: &str| RawInterface {
            bridge: bridge.into(),
            domain: bridge.trim_start_matches("net-").into(),
            device: None,
            name: name.into(),
            hwaddr: mac.into(),
            ipv4: Some("10.0.0.253/24".into()),
            ipv6: None,
        };
        let ok = parse_interfaces(&[raw("net-a", "net-a", "02:00:00:00:00:01")]).unwrap();
        assert_eq!(ok[0].device, "net-a");
        let dup = parse_interfaces(&[
            raw("net-a", "x", "02:00:00:00:00:01"),
            raw("net-b", "x", "02:00:00:00:00:02"),
        ]);
        assert!(dup
            .unwrap_err()
            .to_string()
            .contains("name is already used"));
        assert!(
            parse_interfaces(&[raw("net-a", "abcdefghijklmnop", "02:00:00:00:00:01")]).is_err()
        );
        assert!(parse_interfaces(&[]).is_err());
        let mut no_addr = raw("net-a", "net-a", "02:00:00:00:00:01");
        no_addr.ipv4 = None;
        assert!(parse_interfaces(&[no_addr]).is_err());
    }
}
