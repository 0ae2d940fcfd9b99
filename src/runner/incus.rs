//! Talking to Incus through its own client (`incus query`), as the anklume
//! container does: the client handles the socket, remotes, projects and TLS.
//! Parsing is split from querying so it can be tested on recorded JSON.

use super::process::{find_program, run_with_stdin};
use crate::model::{BridgePattern, DomainBridge, IfName, MacAddr, Machine, Name};
use anyhow::Context;
use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::Value;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;

#[derive(Debug, Clone)]
pub struct Incus {
    program: PathBuf,
}

impl Incus {
    pub fn find() -> anyhow::Result<Incus> {
        find_program("incus")
            .map(|program| Incus { program })
            .context(
                "the `incus` client is not installed here: run this module where the Incus \
                 socket and client are (the anklume container), or give an explicit `bridges` \
                 list",
            )
    }

    /// `incus query <path>`: the REST API as JSON. Projects go in the URL
    /// (`?project=P`): `incus query` refuses `--project`.
    pub fn query(&self, path: &str) -> anyhow::Result<Value> {
        let mut cmd = Command::new(&self.program);
        cmd.args(["query", path]);
        let out = run_with_stdin(cmd, None).with_context(|| format!("incus query {path}"))?;
        serde_json::from_str(&out).with_context(|| format!("incus query {path}: invalid JSON"))
    }

    /// The managed bridges whose name starts with the pattern.
    pub fn domain_bridges(&self, pattern: &BridgePattern) -> anyhow::Result<Vec<DomainBridge>> {
        let networks = self.query("/1.0/networks?recursion=1")?;
        parse_networks(&networks, pattern)
    }

    /// Instances with a NIC on one of `bridges`, in one project or in all.
    pub fn machines(
        &self,
        project: Option<&str>,
        bridges: &BTreeSet<IfName>,
    ) -> anyhow::Result<Vec<Machine>> {
        let scope = match project {
            Some(p) => format!("project={}", percent_encode(p)),
            None => "all-projects=true".to_string(),
        };
        let instances = self.query(&format!("/1.0/instances?recursion=2&{scope}"))?;
        parse_instances(&instances, bridges)
    }

    /// Fills in the subnets of explicitly listed bridges that Incus manages,
    /// so the addresses of their machines can be checked; the others stay
    /// unknown (and machines on them are reported unchecked).
    pub fn fill_subnets(&self, bridges: &mut [DomainBridge]) -> anyhow::Result<()> {
        let networks = self.query("/1.0/networks?recursion=1")?;
        fill_subnets(&networks, bridges)
    }
}

/// Encodes a query-string value: everything but RFC 3986 unreserved
/// characters, so `lab&all-projects=true` stays one project name.
pub fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The pure half of [`Incus::fill_subnets`].
pub fn fill_subnets(networks: &Value, bridges: &mut [DomainBridge]) -> anyhow::Result<()> {
    for network in managed_bridges(networks) {
        let name = network["name"].as_str().unwrap_or_default();
        if let Some(b) = bridges.iter_mut().find(|b| b.bridge.as_str() == name) {
            let (ipv4, ipv6) = subnets_of(network)?;
            b.ipv4 = ipv4;
            b.ipv6 = ipv6;
            b.subnets_known = true;
        }
    }
    Ok(())
}

fn subnets_of(network: &Value) -> anyhow::Result<(Option<Ipv4Net>, Option<Ipv6Net>)> {
    let name = network["name"].as_str().unwrap_or_default();
    let ipv4 = config_str(network, "ipv4.address")
        .map(|a| a.parse())
        .transpose()
        .with_context(|| format!("network {name}: ipv4.address"))?;
    let ipv6 = config_str(network, "ipv6.address")
        .map(|a| a.parse())
        .transpose()
        .with_context(|| format!("network {name}: ipv6.address"))?;
    Ok((ipv4, ipv6))
}

fn config_str<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v["config"][key]
        .as_str()
        .filter(|s| !s.is_empty() && *s != "none")
}

fn bridge_of(network: &Value, pattern: &BridgePattern) -> anyhow::Result<DomainBridge> {
    let name = network["name"].as_str().unwrap_or_default();
    let mut bridge = DomainBridge::new(IfName::new(name)?, pattern)?;
    (bridge.ipv4, bridge.ipv6) = subnets_of(network)?;
    bridge.subnets_known = true;
    Ok(bridge)
}

fn managed_bridges(networks: &Value) -> impl Iterator<Item = &Value> {
    networks
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["managed"] == true && n["type"] == "bridge")
}

/// `/1.0/networks?recursion=1` lists unmanaged host interfaces too (`eth0`,
/// `lo`): only managed bridges matching the pattern are domains.
pub fn parse_networks(
    networks: &Value,
    pattern: &BridgePattern,
) -> anyhow::Result<Vec<DomainBridge>> {
    managed_bridges(networks)
        .filter(|n| n["name"].as_str().is_some_and(|name| pattern.matches(name)))
        .map(|n| bridge_of(n, pattern))
        .collect()
}

/// Finds, for each instance, its NIC on a domain bridge and the addresses it
/// holds there: the NIC's static `ipv4.address`/`ipv6.address`, plus the
/// global addresses the running instance reports on that interface.
pub fn parse_instances(
    instances: &Value,
    bridges: &BTreeSet<IfName>,
) -> anyhow::Result<Vec<Machine>> {
    let mut machines = Vec::new();
    for instance in instances.as_array().into_iter().flatten() {
        let Some(name) = instance["name"].as_str() else {
            continue;
        };
        let project = instance["project"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let devices = instance["expanded_devices"]
            .as_object()
            .or_else(|| instance["devices"].as_object());
        let mut nics: Vec<Machine> = Vec::new();
        for (device_name, device) in devices.into_iter().flatten() {
            if device["type"] != "nic" {
                continue;
            }
            let network = device["network"]
                .as_str()
                .or_else(|| device["parent"].as_str())
                .unwrap_or_default();
            let Some(bridge) = bridges.iter().find(|b| b.as_str() == network) else {
                continue;
            };
            let mut m = Machine::new(Name::new("machine", name)?, &project, bridge.clone());
            let v4 = &mut m.ipv4;
            let v6 = &mut m.ipv6;
            if let Some(a) = device["ipv4.address"].as_str().and_then(|a| a.parse().ok()) {
                v4.insert(a);
            }
            if let Some(a) = device["ipv6.address"].as_str().and_then(|a| a.parse().ok()) {
                v6.insert(a);
            }
            // Inside the instance the interface is named after the device
            // unless the device sets `name`.
            let ifname = device["name"].as_str().unwrap_or(device_name);
            let live = &instance["state"]["network"][ifname]["addresses"];
            for address in live.as_array().into_iter().flatten() {
                if address["scope"] != "global" {
                    continue;
                }
                match address["address"].as_str().and_then(|a| a.parse().ok()) {
                    Some(IpAddr::V4(a)) => {
                        v4.insert(a);
                    }
                    Some(IpAddr::V6(a)) => {
                        v6.insert(a);
                    }
                    None => {}
                }
            }
            m.hwaddr = hwaddr_of(instance, device_name, ifname);
            m.mac_filtering = device["security.mac_filtering"] == "true";
            m.ipv4_filtering = device["security.ipv4_filtering"] == "true";
            m.ipv6_filtering = device["security.ipv6_filtering"] == "true";
            nics.push(m);
        }
        match nics.len() {
            0 => continue,
            1 => machines.extend(nics),
            // An instance on several domain bridges (the firewall VM) is a
            // router, not a policy endpoint: leave it out, so naming it in a
            // policy fails with "unknown" instead of opening several bridges.
            _ => continue,
        }
    }
    Ok(machines)
}

/// The MAC of a NIC: Incus keeps the one it generated in
/// `volatile.<device>.hwaddr` (a device may set `hwaddr` itself); a
/// running instance also reports it. An unreadable value counts as unknown.
fn hwaddr_of(instance: &Value, device: &str, ifname: &str) -> Option<MacAddr> {
    let key = format!("volatile.{device}.hwaddr");
    [
        &instance["expanded_devices"][device]["hwaddr"],
        &instance["devices"][device]["hwaddr"],
        &instance["expanded_config"][key.as_str()],
        &instance["config"][key.as_str()],
        &instance["state"]["network"][ifname]["hwaddr"],
    ]
    .into_iter()
    .find_map(|v| v.as_str().and_then(|s| s.parse().ok()))
}

#[cfg(test)]
mod tests {
    //! On JSON recorded from the lab's real daemon (`make record-fixtures`).
    use super::*;

    const NETWORKS: &str = include_str!("../../tests/fixtures/incus/networks.json");
    const INSTANCES: &str = include_str!("../../tests/fixtures/incus/instances.json");

    fn json(text: &str) -> Value {
        serde_json::from_str(text).expect("a recorded fixture is JSON")
    }

    fn lab_pattern() -> BridgePattern {
        BridgePattern::new("lab-net-").unwrap()
    }

    #[test]
    fn only_managed_bridges_matching_the_pattern_are_domains() {
        let found = parse_networks(&json(NETWORKS), &lab_pattern()).unwrap();
        let names: Vec<&str> = found.iter().map(|b| b.bridge.as_str()).collect();
        assert_eq!(names, ["lab-net-anklume", "lab-net-perso", "lab-net-pro"]);
        assert_eq!(found[2].domain.as_str(), "pro");
        assert_eq!(found[2].ipv4.unwrap().to_string(), "10.251.11.1/24");
        assert_eq!(found[2].ipv6.unwrap().to_string(), "fd42:251:11::1/64");
        assert!(found.iter().all(|b| b.subnets_known));
        // The unmanaged loopback is in the recording, and skipped.
        assert!(NETWORKS.contains("\"lo\""));
    }

    #[test]
    fn machines_take_static_and_live_global_addresses_of_their_domain_nic() {
        let found = parse_networks(&json(NETWORKS), &lab_pattern()).unwrap();
        let bridges = found.iter().map(|b| b.bridge.clone()).collect();
        let machines = parse_instances(&json(INSTANCES), &bridges).unwrap();
        let web = machines
            .iter()
            .find(|m| m.name.as_str() == "pro-web")
            .unwrap();
        assert_eq!(web.bridge.as_str(), "lab-net-pro");
        assert_eq!(web.project, "anklume-lab");
        let shown: Vec<String> = web
            .ipv4
            .iter()
            .map(ToString::to_string)
            .chain(web.ipv6.iter().map(ToString::to_string))
            .collect();
        // Link-local fe80:: addresses are not global: left out.
        assert_eq!(shown, ["10.251.11.11", "fd42:251:11:0:1266:6aff:fefb:b0b"]);
        assert!(!web.ipv4_filtering && !web.ipv6_filtering);
        // Its MAC, from what the running instance reports.
        assert_eq!(web.hwaddr.unwrap().to_string(), "10:66:6a:fb:0b:0b");
        assert!(!web.mac_filtering);
        assert_eq!(machines.len(), 5);
    }

    #[test]
    fn explicit_bridges_learn_their_subnets_when_incus_manages_them() {
        let pattern = lab_pattern();
        let mut bridges = vec![
            DomainBridge::new(IfName::new("lab-net-pro").unwrap(), &pattern).unwrap(),
            DomainBridge::new(IfName::new("br-manual").unwrap(), &pattern).unwrap(),
        ];
        fill_subnets(&json(NETWORKS), &mut bridges).unwrap();
        assert!(bridges[0].subnets_known);
        assert_eq!(bridges[0].ipv4.unwrap().to_string(), "10.251.11.1/24");
        assert!(!bridges[1].subnets_known && bridges[1].ipv4.is_none());
    }

    #[test]
    fn the_mac_comes_from_volatile_config_first() {
        let instances = serde_json::json!([{
            "name": "a", "project": "p",
            "expanded_devices": {"eth0": {"type": "nic", "network": "net-pro",
                                          "security.mac_filtering": "true"}},
            "expanded_config": {"volatile.eth0.hwaddr": "00:16:3E:00:00:01"},
            "state": {"network": {"eth0": {"hwaddr": "00:16:3e:00:00:02", "addresses": []}}}
        }]);
        let bridges = [IfName::new("net-pro").unwrap()].into();
        let m = &parse_instances(&instances, &bridges).unwrap()[0];
        assert_eq!(m.hwaddr.unwrap().to_string(), "00:16:3e:00:00:01");
        assert!(m.mac_filtering);
    }

    #[test]
    fn the_project_is_one_query_value() {
        assert_eq!(percent_encode("anklume-lab"), "anklume-lab");
        assert_eq!(
            percent_encode("lab&all-projects=true"),
            "lab%26all-projects%3Dtrue"
        );
        assert_eq!(percent_encode("a b/c?d#e"), "a%20b%2Fc%3Fd%23e");
    }
}
