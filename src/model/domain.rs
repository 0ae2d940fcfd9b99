//! Per-domain settings at the domain's edges: whether it reaches networks
//! outside the domains (the internet, other interfaces) and on which ports.
//! Keyed by domain name, as anklume's infra.yml would carry them.

use super::names::Name;
use super::policy::{PortSpan, Protocol};
use anyhow::{bail, ensure, Context};
use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// One `egress` entry as written: `{protocol: tcp, port: 443}` (a port or a
/// `"first-last"` range).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEgress {
    protocol: String,
    port: Value,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDomain {
    internet: Option<bool>,
    egress: Option<Vec<RawEgress>>,
    isolate_machines: Option<bool>,
}

/// What a domain may open towards interfaces that are not domain bridges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Internet {
    /// Everything (the default).
    Open,
    /// Only these ports.
    Ports(BTreeSet<(Protocol, PortSpan)>),
    /// Nothing.
    Closed,
}

/// The validated settings, by domain name: internet (domains not listed
/// are `Open`), and the domains whose machines are isolated from each other
/// (`isolate_machines: true`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DomainSettings(pub BTreeMap<Name, Internet>, pub BTreeSet<Name>);

impl DomainSettings {
    /// Parses the `domains` option: a map of domain name to
    /// `{internet, egress, isolate_machines}`, every key optional.
    pub fn parse(raw: &BTreeMap<String, Value>) -> anyhow::Result<DomainSettings> {
        let mut out = BTreeMap::new();
        let mut isolated = BTreeSet::new();
        for (name, value) in raw {
            let label = format!("domains.{name}");
            let domain = Name::new("domain", name).with_context(|| label.clone())?;
            let value = if value.is_null() {
                Value::Object(Default::default())
            } else {
                value.clone()
            };
            let raw: RawDomain = serde_json::from_value(value).map_err(|err| {
                anyhow::anyhow!("{label}: {err} (the keys are internet, egress, isolate_machines)")
            })?;
            if raw.isolate_machines == Some(true) {
                isolated.insert(domain.clone());
            }
            let internet = match (raw.internet.unwrap_or(true), raw.egress) {
                (true, None) => Internet::Open,
                (false, None) => Internet::Closed,
                (false, Some(_)) => bail!(
                    "{label}: internet is false and egress is given: drop egress (no internet at \
                     all) or set internet to true (only the egress ports)"
                ),
                (true, Some(entries)) => {
                    let mut ports = BTreeSet::new();
                    for (i, e) in entries.iter().enumerate() {
                        let at = || format!("{label}.egress[{i}]");
                        let proto = Protocol::parse(&e.protocol).with_context(at)?;
                        let span = match &e.port {
                            Value::Number(n) => {
                                let n = n.as_u64().context("a port is a positive number");
                                n.and_then(|n| PortSpan::new(n, n)).with_context(at)?
                            }
                            Value::String(s) => PortSpan::parse_text(s).with_context(at)?,
                            other => bail!("{}: port {other} is not a port or a range", at()),
                        };
                        ports.insert((proto, span));
                    }
                    ensure!(
                        !ports.is_empty(),
                        "{label}: egress is empty: write internet: false for no internet"
                    );
                    Internet::Ports(ports)
                }
            };
            out.insert(domain, internet);
        }
        Ok(DomainSettings(out, isolated))
    }
}

/// Parses the `protected_networks` option: CIDRs, IPv4 or IPv6, without
/// bits set after the prefix (which would read two ways).
pub fn parse_protected_networks<S: AsRef<str>>(entries: &[S]) -> anyhow::Result<Vec<ipnet::IpNet>> {
    entries
        .iter()
        .map(|e| {
            let text = e.as_ref();
            let net: ipnet::IpNet = text.parse().map_err(|_| {
                anyhow::anyhow!("{text:?} is not a CIDR (write 192.168.1.0/24 or fd00:1::/64)")
            })?;
            ensure!(
                net.trunc() == net,
                "{text:?} has bits set after its prefix length: write {}",
                net.trunc()
            );
            Ok(net)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> anyhow::Result<DomainSettings> {
        let map: BTreeMap<String, Value> = serde_json::from_value(v).unwrap();
        DomainSettings::parse(&map)
    }

    #[test]
    fn settings_parse_and_refuse_what_they_cannot_honour() {
        let s = parse(json!({
            "pro": {"internet": false},
            "perso": {"egress": [{"protocol": "udp", "port": 53}, {"protocol": "tcp", "port": "443"}]},
            "ai": {"internet": true, "isolate_machines": false},
            "lab": null
        }))
        .unwrap();
        let get = |n: &str| s.0[&Name::new("d", n).unwrap()].clone();
        assert_eq!(get("pro"), Internet::Closed);
        assert_eq!(get("ai"), Internet::Open);
        assert_eq!(get("lab"), Internet::Open);
        assert!(matches!(get("perso"), Internet::Ports(p) if p.len() == 2));
        assert!(s.1.is_empty(), "isolate_machines defaults to false");
        let iso =
            parse(json!({"pro": {"isolate_machines": true}, "ai": {"isolate_machines": false}}))
                .unwrap();
        assert_eq!(iso.1, BTreeSet::from([Name::new("d", "pro").unwrap()]));
        for (bad, says) in [
            (json!({"pro": {"internets": false}}), "unknown field"),
            (
                json!({"pro": {"internet": false, "egress": []}}),
                "drop egress",
            ),
            (json!({"pro": {"egress": []}}), "egress is empty"),
            (
                json!({"pro": {"egress": [{"protocol": "icmp", "port": 1}]}}),
                "egress[0]",
            ),
            (
                json!({"pro": {"egress": [{"protocol": "tcp", "port": 0}]}}),
                "out of range",
            ),
            (json!({"pro": {"isolate_machines": "yes"}}), "invalid type"),
        ] {
            let msg = format!("{:#}", parse(bad).unwrap_err());
            assert!(msg.contains(says) && msg.contains("domains.pro"), "{msg}");
        }
    }
}
