//! Domain bridges: what the renderer knows about each security domain.

use super::names::{BridgePattern, IfName, Name};
use ipnet::{Ipv4Net, Ipv6Net};
use serde::Serialize;

/// One domain and its bridge, as discovered from Incus or given explicitly.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct DomainBridge {
    pub bridge: IfName,
    pub domain: Name,
    /// The bridge's gateway network (`ipv4.address`), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<Ipv4Net>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<Ipv6Net>,
    /// Whether `ipv4`/`ipv6` were read from Incus (then `None` means the
    /// bridge has no subnet in that family). A bridge given in an explicit
    /// `bridges` list that Incus does not manage has unknown subnets: the
    /// addresses of its machines cannot be checked against them.
    #[serde(skip)]
    pub subnets_known: bool,
}

impl DomainBridge {
    pub fn new(bridge: IfName, pattern: &BridgePattern) -> anyhow::Result<Self> {
        let domain = Name::new("domain", domain_of(bridge.as_str(), pattern))?;
        Ok(DomainBridge {
            bridge,
            domain,
            ipv4: None,
            ipv6: None,
            subnets_known: false,
        })
    }
}

/// A bridge's domain is its name without the pattern prefix (`net-pro` is
/// `pro`); a bridge given explicitly outside the pattern is its own domain.
pub fn domain_of<'a>(bridge: &'a str, pattern: &BridgePattern) -> &'a str {
    if pattern.matches(bridge) {
        &bridge[pattern.as_str().len()..]
    } else {
        bridge
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_names_strip_the_pattern() {
        let p = BridgePattern::new("net-").unwrap();
        assert_eq!(domain_of("net-pro", &p), "pro");
        assert_eq!(domain_of("net-ai-tools", &p), "ai-tools");
        assert_eq!(domain_of("br-lab", &p), "br-lab");
    }
}
