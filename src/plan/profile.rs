//! The firewall instance's multi-NIC profile, reconciled declaratively: a
//! pure function from the domain bridges and the profile Incus holds now to
//! the profile it must hold, and what changes.
//!
//! NICs are keyed by bridge (the device name is derived from the bridge), so
//! adding or removing a domain adds or removes exactly one device and leaves
//! every other one byte-identical. An earlier implementation indexed NICs by
//! position (`eth<i>` over a sorted list): a new domain shifted the mapping
//! and a removed one left a stale device that blocked deleting its network.

use crate::model::firewall::FirewallInterface;
use crate::model::{DomainBridge, IfName};
use anyhow::{bail, ensure};
use serde_json::{Map, Value};
use std::collections::BTreeSet;

/// Incus device type of a NIC.
const NIC: &str = "nic";

/// The firewall's interfaces, admin bridge first, then by bridge name.
pub fn interfaces(
    instance: &str,
    bridges: &[DomainBridge],
    admin: Option<&IfName>,
    router_host: u32,
) -> anyhow::Result<Vec<FirewallInterface>> {
    ensure!(
        !bridges.is_empty(),
        "no domain bridge for the firewall: no managed bridge matches the pattern and no \
         `bridges` list was given"
    );
    if let Some(admin) = admin {
        ensure!(
            bridges.iter().any(|b| &b.bridge == admin),
            "admin_bridge {admin} is not one of the domain bridges ({})",
            bridges
                .iter()
                .map(|b| b.bridge.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut out = bridges
        .iter()
        .map(|b| FirewallInterface::derive(instance, b, router_host))
        .collect::<anyhow::Result<Vec<_>>>()?;
    out.sort_by(|a, b| {
        let rank = |i: &FirewallInterface| Some(&i.bridge) != admin;
        (rank(a), &a.bridge).cmp(&(rank(b), &b.bridge))
    });
    let mut seen = BTreeSet::new();
    for i in &out {
        if !seen.insert(i.hwaddr) {
            bail!(
                "two bridges derive the same hwaddr {} (a hash collision): rename one bridge",
                i.hwaddr
            );
        }
        if i.ipv4.is_none() && i.ipv6.is_none() {
            bail!(
                "bridge {} has neither ipv4.address nor ipv6.address: the firewall cannot route \
                 on it",
                i.bridge
            );
        }
    }
    Ok(out)
}

/// The Incus device of one firewall NIC. Source-address filtering is off:
/// a router forwards other hosts' packets. The IPv4 router address is also
/// the NIC's `ipv4.address`, which reserves it in the bridge's DHCP server so
/// no instance is ever leased the firewall's address.
pub fn nic_device(i: &FirewallInterface) -> Map<String, Value> {
    let mut d = Map::new();
    let mut put = |k: &str, v: String| {
        d.insert(k.to_string(), Value::String(v));
    };
    put("type", NIC.to_string());
    put("network", i.bridge.to_string());
    put("name", i.name.to_string());
    put("hwaddr", i.hwaddr.to_string());
    put("security.ipv4_filtering", "false".into());
    put("security.ipv6_filtering", "false".into());
    put("security.mac_filtering", "false".into());
    if let Some(v4) = i.ipv4 {
        put("ipv4.address", v4.addr().to_string());
    }
    d
}

/// What reconciling the profile's devices does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileChange {
    /// The complete device map the profile must hold (a `PUT` replaces them
    /// all, the only way Incus removes a device).
    pub devices: Map<String, Value>,
    pub added: Vec<String>,
    pub updated: Vec<String>,
    pub removed: Vec<String>,
}

impl ProfileChange {
    pub fn changed(&self) -> bool {
        !(self.added.is_empty() && self.updated.is_empty() && self.removed.is_empty())
    }
}

/// The profile's devices after reconciliation: every wanted NIC exactly as
/// derived, every other NIC removed, devices of other types (a root disk an
/// operator added) kept as they are.
pub fn reconcile(current: &Map<String, Value>, wanted: &[FirewallInterface]) -> ProfileChange {
    let mut devices = Map::new();
    let (mut added, mut updated, mut removed) = (Vec::new(), Vec::new(), Vec::new());
    let wanted_names: BTreeSet<&str> = wanted.iter().map(|i| i.device.as_str()).collect();
    for (name, device) in current {
        if wanted_names.contains(name.as_str()) {
            continue;
        }
        if device["type"] == NIC {
            removed.push(name.clone());
        } else {
            devices.insert(name.clone(), device.clone());
        }
    }
    for i in wanted {
        let device = Value::Object(nic_device(i));
        match current.get(&i.device) {
            None => added.push(i.device.clone()),
            Some(have) if have != &device => updated.push(i.device.clone()),
            Some(_) => {}
        }
        devices.insert(i.device.clone(), device);
    }
    ProfileChange {
        devices,
        added,
        updated,
        removed,
    }
}

/// The instance's profile list with `profile` appended, or `None` when it
/// is already there (adding a profile twice fails: "Duplicate profile").
pub fn with_profile(current: &[String], profile: &str) -> Option<Vec<String>> {
    if current.iter().any(|p| p == profile) {
        return None;
    }
    let mut list = current.to_vec();
    list.push(profile.to_string());
    Some(list)
}

/// The instance's profile list without `profile`, or `None` when absent.
pub fn without_profile(current: &[String], profile: &str) -> Option<Vec<String>> {
    if !current.iter().any(|p| p == profile) {
        return None;
    }
    Some(current.iter().filter(|p| *p != profile).cloned().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::BridgePattern;

    fn bridges(names: &[(&str, u8)]) -> Vec<DomainBridge> {
        let pattern = BridgePattern::new("net-").unwrap();
        names
            .iter()
            .map(|(name, n)| {
                let mut b = DomainBridge::new(IfName::new(name).unwrap(), &pattern).unwrap();
                b.ipv4 = Some(format!("10.1.{n}.1/24").parse().unwrap());
                b.ipv6 = Some(format!("fd00:{n}::1/64").parse().unwrap());
                b
            })
            .collect()
    }

    fn wanted(names: &[(&str, u8)], admin: Option<&str>) -> Vec<FirewallInterface> {
        let admin = admin.map(|a| IfName::new(a).unwrap());
        interfaces("fw", &bridges(names), admin.as_ref(), 253).unwrap()
    }

    #[test]
    fn admin_first_then_by_bridge() {
        let w = wanted(
            &[("net-pro", 1), ("net-admin", 2), ("net-ai", 3)],
            Some("net-pro"),
        );
        let order: Vec<&str> = w.iter().map(|i| i.bridge.as_str()).collect();
        assert_eq!(order, ["net-pro", "net-admin", "net-ai"]);
        let err = interfaces(
            "fw",
            &bridges(&[("net-a", 1)]),
            Some(&IfName::new("net-x").unwrap()),
            253,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("admin_bridge net-x"), "{err}");
    }

    #[test]
    fn adding_a_domain_adds_one_device_and_leaves_the_others_identical() {
        let three = [("net-a", 1), ("net-b", 2), ("net-c", 3)];
        let first = reconcile(&Map::new(), &wanted(&three, Some("net-a")));
        assert_eq!(first.added, ["net-a", "net-b", "net-c"]);
        let four = [("net-a", 1), ("net-b", 2), ("net-bb", 4), ("net-c", 3)];
        let second = reconcile(&first.devices, &wanted(&four, Some("net-a")));
        assert_eq!(second.added, ["net-bb"]);
        assert!(second.updated.is_empty() && second.removed.is_empty());
        for name in ["net-a", "net-b", "net-c"] {
            assert_eq!(
                second.devices[name], first.devices[name],
                "{name} unchanged"
            );
        }
        // Idempotent.
        let again = reconcile(&second.devices, &wanted(&four, Some("net-a")));
        assert!(!again.changed());
        assert_eq!(again.devices, second.devices);
    }

    #[test]
    fn removing_a_domain_removes_its_device_only_and_keeps_other_device_types() {
        let mut current =
            reconcile(&Map::new(), &wanted(&[("net-a", 1), ("net-b", 2)], None)).devices;
        current.insert(
            "root".into(),
            serde_json::json!({"type": "disk", "path": "/", "pool": "p"}),
        );
        current.insert(
            "eth0".into(),
            serde_json::json!({"type": "nic", "network": "net-a"}),
        );
        let change = reconcile(&current, &wanted(&[("net-a", 1)], None));
        assert_eq!(change.removed, ["eth0", "net-b"]);
        assert!(change.added.is_empty() && change.updated.is_empty());
        assert!(change.devices.contains_key("root"));
        assert_eq!(change.devices["net-a"], current["net-a"]);
        assert_eq!(change.devices.len(), 2);
    }

    #[test]
    fn a_hand_edited_nic_is_put_back() {
        let w = wanted(&[("net-a", 1)], None);
        let mut current = reconcile(&Map::new(), &w).devices;
        current["net-a"]["security.ipv4_filtering"] = "true".into();
        let change = reconcile(&current, &w);
        assert_eq!(change.updated, ["net-a"]);
    }

    #[test]
    fn nic_devices_let_the_router_forward() {
        let w = wanted(&[("net-a", 1)], None);
        let d = nic_device(&w[0]);
        assert_eq!(d["network"], "net-a");
        assert_eq!(d["name"], "net-a");
        assert_eq!(d["security.ipv4_filtering"], "false");
        assert_eq!(d["security.ipv6_filtering"], "false");
        assert_eq!(d["ipv4.address"], "10.1.1.253");
        assert_eq!(d["hwaddr"], w[0].hwaddr.to_string());
    }

    #[test]
    fn profile_lists_never_hold_a_profile_twice() {
        let have = vec!["default".to_string()];
        assert_eq!(
            with_profile(&have, "fw").unwrap(),
            ["default".to_string(), "fw".to_string()]
        );
        let both = with_profile(&have, "fw").unwrap();
        assert_eq!(with_profile(&both, "fw"), None);
        assert_eq!(without_profile(&both, "fw").unwrap(), have);
        assert_eq!(without_profile(&have, "fw"), None);
    }
}
