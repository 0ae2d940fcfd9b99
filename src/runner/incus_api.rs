//! Writing to Incus through its own client: `incus query -X <method> -d
//! <json> --wait <path>` (the client handles the socket, remotes and TLS;
//! `--wait` waits for the asynchronous operations that instance updates
//! return). Reads of the firewall profile and instance live here too, in
//! typed form, so the profile module never parses JSON ad hoc.

use super::process::{find_program, run_with_stdin};
use anyhow::Context;
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::process::Command;

#[derive(Debug, Clone)]
pub struct IncusApi {
    program: PathBuf,
}

/// A profile as Incus holds it (the parts we reconcile and must keep).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub description: String,
    pub config: Map<String, Value>,
    pub devices: Map<String, Value>,
}

impl IncusApi {
    pub fn find() -> anyhow::Result<IncusApi> {
        find_program("incus")
            .map(|program| IncusApi { program })
            .context(
                "the `incus` client is not installed here: run this module where the Incus \
                 socket and client are (the anklume container or the host)",
            )
    }

    fn run(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<String> {
        let mut cmd = Command::new(&self.program);
        cmd.args(["query", "-X", method]);
        if let Some(body) = body {
            cmd.args(["--wait", "-d"]).arg(body.to_string());
        }
        cmd.arg(path);
        run_with_stdin(cmd, None).with_context(|| format!("incus query -X {method} {path}"))
    }

    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        let out = self.run("GET", path, None)?;
        serde_json::from_str(&out).with_context(|| format!("incus query {path}: invalid JSON"))
    }

    /// The names in a collection (`/1.0/profiles` lists URLs). Looking a
    /// name up in its collection tells "absent" from every other failure
    /// without parsing the client's error text.
    fn names(&self, collection: &str, project: &str) -> anyhow::Result<Vec<String>> {
        let list = self.get(&format!("{collection}?project={project}"))?;
        Ok(list
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter_map(|url| url.rsplit('/').next())
            .map(|name| name.split('?').next().unwrap_or(name).to_string())
            .collect())
    }

    pub fn profile(&self, project: &str, name: &str) -> anyhow::Result<Option<Profile>> {
        if !self
            .names("/1.0/profiles", project)?
            .iter()
            .any(|n| n == name)
        {
            return Ok(None);
        }
        let v = self.get(&format!("/1.0/profiles/{name}?project={project}"))?;
        let obj = |key: &str| v[key].as_object().cloned().unwrap_or_default();
        Ok(Some(Profile {
            description: v["description"].as_str().unwrap_or_default().to_string(),
            config: obj("config"),
            devices: obj("devices"),
        }))
    }

    pub fn create_profile(
        &self,
        project: &str,
        name: &str,
        description: &str,
        devices: &Map<String, Value>,
    ) -> anyhow::Result<()> {
        let body = serde_json::json!({
            "name": name, "description": description, "config": {}, "devices": devices,
        });
        self.run(
            "POST",
            &format!("/1.0/profiles?project={project}"),
            Some(&body),
        )
        .map(drop)
    }

    /// `PUT` replaces every device: the only way Incus removes one.
    pub fn replace_profile_devices(
        &self,
        project: &str,
        name: &str,
        current: &Profile,
        devices: &Map<String, Value>,
    ) -> anyhow::Result<()> {
        let body = serde_json::json!({
            "description": current.description, "config": current.config, "devices": devices,
        });
        self.run(
            "PUT",
            &format!("/1.0/profiles/{name}?project={project}"),
            Some(&body),
        )
        .map(drop)
    }

    pub fn delete_profile(&self, project: &str, name: &str) -> anyhow::Result<()> {
        self.run(
            "DELETE",
            &format!("/1.0/profiles/{name}?project={project}"),
            None,
        )
        .map(drop)
    }

    /// The instance's profile list, or `None` when it does not exist.
    pub fn instance_profiles(
        &self,
        project: &str,
        instance: &str,
    ) -> anyhow::Result<Option<Vec<String>>> {
        if !self
            .names("/1.0/instances", project)?
            .iter()
            .any(|n| n == instance)
        {
            return Ok(None);
        }
        let v = self.get(&format!("/1.0/instances/{instance}?project={project}"))?;
        Ok(Some(
            v["profiles"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
        ))
    }

    pub fn set_instance_profiles(
        &self,
        project: &str,
        instance: &str,
        profiles: &[String],
    ) -> anyhow::Result<()> {
        let body = serde_json::json!({ "profiles": profiles });
        self.run(
            "PATCH",
            &format!("/1.0/instances/{instance}?project={project}"),
            Some(&body),
        )
        .map(drop)
    }

    /// Every managed network, as `/1.0/networks?recursion=1` lists them.
    pub fn networks(&self, project: &str) -> anyhow::Result<Value> {
        self.get(&format!("/1.0/networks?recursion=1&project={project}"))
    }
}

fn config_net<T: std::str::FromStr>(network: &Value, key: &str) -> anyhow::Result<Option<T>>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    let name = network["name"].as_str().unwrap_or_default();
    network["config"][key]
        .as_str()
        .filter(|s| !s.is_empty() && *s != "none")
        .map(str::parse)
        .transpose()
        .with_context(|| format!("network {name}: {key}"))
}

/// The domain bridges the firewall plugs into: the managed bridges matching
/// the pattern, or exactly the `explicit` ones (each must be a managed
/// bridge: the firewall needs its subnets to derive its addresses).
pub fn select_bridges(
    networks: &Value,
    pattern: &crate::model::BridgePattern,
    explicit: Option<&[crate::model::IfName]>,
) -> anyhow::Result<Vec<crate::model::DomainBridge>> {
    use crate::model::{DomainBridge, IfName};
    let managed: Vec<&Value> = networks
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["managed"] == true && n["type"] == "bridge")
        .collect();
    let chosen: Vec<&Value> = match explicit {
        None => managed
            .into_iter()
            .filter(|n| n["name"].as_str().is_some_and(|s| pattern.matches(s)))
            .collect(),
        Some(names) => names
            .iter()
            .map(|want| {
                managed
                    .iter()
                    .copied()
                    .find(|n| n["name"] == want.as_str())
                    .with_context(|| {
                        format!("bridge {want} is not a managed Incus bridge: create it first")
                    })
            })
            .collect::<anyhow::Result<_>>()?,
    };
    chosen
        .into_iter()
        .map(|n| {
            let name = IfName::new(n["name"].as_str().unwrap_or_default())?;
            let mut bridge = DomainBridge::new(name, pattern)?;
            bridge.ipv4 = config_net(n, "ipv4.address")?;
            bridge.ipv6 = config_net(n, "ipv6.address")?;
            Ok(bridge)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BridgePattern, IfName};
    use serde_json::json;

    #[test]
    fn bridges_by_pattern_or_explicit_with_their_subnets() {
        let networks = json!([
            {"name": "eth0", "managed": false, "type": "physical", "config": {}},
            {"name": "net-pro", "managed": true, "type": "bridge",
             "config": {"ipv4.address": "10.1.1.1/24", "ipv6.address": "fd00:1::1/64"}},
            {"name": "br-x", "managed": true, "type": "bridge", "config": {"ipv4.address": "10.9.0.1/24", "ipv6.address": "none"}}
        ]);
        let p = BridgePattern::new("net-").unwrap();
        let found = select_bridges(&networks, &p, None).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].ipv6.unwrap().to_string(), "fd00:1::1/64");
        let explicit = [IfName::new("br-x").unwrap()];
        let found = select_bridges(&networks, &p, Some(&explicit)).unwrap();
        assert_eq!(found[0].domain.as_str(), "br-x");
        assert_eq!(found[0].ipv6, None);
        let missing = [IfName::new("eth0").unwrap()];
        assert!(select_bridges(&networks, &p, Some(&missing)).is_err());
    }
}
