//! Validated names. Each type rejects, at construction, every value that nft
//! would need escaped or the kernel would refuse, so the renderer can quote
//! them without further checks.

use anyhow::{bail, ensure};
use serde::Serialize;
use std::fmt;

/// Linux limits interface names to IFNAMSIZ - 1 bytes.
pub const IFNAME_MAX_BYTES: usize = 15;

/// Characters allowed in interface names and patterns: a conservative subset
/// of what Linux accepts, chosen so a name never needs escaping inside an nft
/// quoted string and never contains nft's `*` wildcard.
fn is_ifname_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// A network interface (bridge) name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct IfName(String);

impl IfName {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        ensure!(!name.is_empty(), "interface name is empty");
        ensure!(
            name.len() <= IFNAME_MAX_BYTES,
            "interface name {name:?} is {} bytes long; Linux allows at most {IFNAME_MAX_BYTES}",
            name.len()
        );
        if let Some(bad) = name.chars().find(|c| !is_ifname_char(*c)) {
            bail!(
                "interface name {name:?} contains {bad:?}; only letters, digits, '-', '_' and \
                 '.' are accepted (anything else would need escaping in nft)"
            );
        }
        ensure!(
            name != "." && name != "..",
            "interface name {name:?} is not a valid name"
        );
        Ok(IfName(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The prefix that marks a managed bridge as a domain bridge (`net-`).
/// It is also rendered as an nft wildcard (`"net-*"`) to fail closed for
/// bridges created after the render, so it must leave room for the `*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct BridgePattern(String);

impl BridgePattern {
    pub fn new(pattern: &str) -> anyhow::Result<Self> {
        ensure!(
            !pattern.is_empty(),
            "bridge_pattern is empty: it must be a name prefix such as \"net-\""
        );
        ensure!(
            pattern.len() < IFNAME_MAX_BYTES,
            "bridge_pattern {pattern:?} is {} bytes long; at most {} leave room for a domain name",
            pattern.len(),
            IFNAME_MAX_BYTES - 1
        );
        if let Some(bad) = pattern.chars().find(|c| !is_ifname_char(*c)) {
            bail!(
                "bridge_pattern {pattern:?} contains {bad:?}; it is a plain name prefix (no \
                 wildcard): letters, digits, '-', '_' and '.' only"
            );
        }
        Ok(BridgePattern(pattern.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, bridge: &str) -> bool {
        bridge.starts_with(&self.0) && bridge.len() > self.0.len()
    }

    /// The nft wildcard matching every present and future domain bridge.
    pub fn wildcard(&self) -> String {
        format!("{}*", self.0)
    }
}

/// An nft table name of ours. Kept to identifier characters because it also
/// names the persistence unit and appears unquoted in the ruleset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct TableName(String);

pub const TABLE_NAME_MAX_BYTES: usize = 64;

/// Words nft reads as keywords where a table name is expected, so
/// `table inet <word>` fails only at `nft -c`. Measured with nft 1.0.6 (every
/// word here fails `nft -c -f` as a table name), plus the keywords newer nft
/// versions added (`destroy`, the plural listing words), since the enforcer
/// may run another version.
#[rustfmt::skip]
pub const NFT_KEYWORDS: &[&str] = &[
    "accept", "add", "ah", "all", "arp", "auto", "bridge", "chain", "chains", "comment",
    "comp", "constant", "continue", "counter", "counters", "create", "ct", "dccp", "define",
    "delete", "describe", "destroy", "device", "devices", "drop", "dst", "dup", "dynamic",
    "element", "elements", "esp", "ether", "exthdr", "export", "fib", "flags", "flowtable",
    "flowtables", "flush", "frag", "fwd", "goto", "handle", "hbh", "hook", "icmp", "icmpv6",
    "iif", "iifname", "igmp", "import", "include", "index", "inet", "insert", "interval",
    "ip", "ip6", "ipsec", "jump", "limit", "limits", "list", "log", "map", "maps", "mark",
    "masquerade", "meta", "mh", "monitor", "netdev", "notrack", "numgen", "offload", "oif",
    "oifname", "osf", "policy", "position", "priority", "queue", "quota", "quotas",
    "redirect", "reject", "rename", "replace", "reset", "return", "rt", "rt0", "rule",
    "ruleset", "sctp", "secmark", "set", "sets", "size", "snat", "dnat", "socket", "srh",
    "symhash", "synproxy", "table", "tables", "tcp", "th", "timeout", "tproxy", "type",
    "typeof", "udp", "udplite", "update", "vlan", "vmap",
];

impl TableName {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let mut chars = name.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
        ensure!(
            first_ok
                && name.len() <= TABLE_NAME_MAX_BYTES
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "table name {name:?} is not accepted: it must start with a letter and hold at most \
             {TABLE_NAME_MAX_BYTES} letters, digits or '_'"
        );
        ensure!(
            !NFT_KEYWORDS.contains(&name),
            "table name {name:?} is an nft keyword (nft would read `table inet {name}` as \
             syntax, not a name): pick another name, such as \"anklume\""
        );
        Ok(TableName(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A domain's name, derived from its bridge (`net-pro` -> `pro`), or a
/// machine name. Same character rules as interface names, but may be longer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Name(String);

pub const NAME_MAX_BYTES: usize = 63;

impl Name {
    pub fn new(kind: &str, name: &str) -> anyhow::Result<Self> {
        ensure!(!name.is_empty(), "{kind} name is empty");
        ensure!(
            name.len() <= NAME_MAX_BYTES,
            "{kind} name {name:?} is longer than {NAME_MAX_BYTES} bytes"
        );
        if let Some(bad) = name.chars().find(|c| !is_ifname_char(*c)) {
            bail!(
                "{kind} name {name:?} contains {bad:?}; only letters, digits, '-', '_' and '.' \
                 are accepted"
            );
        }
        Ok(Name(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifname_limits() {
        assert!(IfName::new("net-anklume").is_ok());
        assert!(IfName::new("abcdefghijklmno").is_ok()); // 15 bytes
        let err = IfName::new("abcdefghijklmnop").unwrap_err().to_string();
        assert!(err.contains("16 bytes"), "{err}");
        for bad in [
            "", "net pro", "net\"x", "net-*", "a/b", "é", "..", "net;x", "net{",
        ] {
            assert!(IfName::new(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn pattern_leaves_room_for_the_wildcard_and_a_domain() {
        let p = BridgePattern::new("net-").unwrap();
        assert_eq!(p.wildcard(), "net-*");
        assert!(p.matches("net-pro"));
        assert!(!p.matches("net-"), "the bare prefix is not a domain bridge");
        assert!(!p.matches("incusbr0"));
        assert!(BridgePattern::new("net-*").is_err());
        assert!(BridgePattern::new("").is_err());
        assert!(BridgePattern::new("abcdefghijklmno").is_err());
    }

    #[test]
    fn table_names() {
        assert!(TableName::new("anklume").is_ok());
        assert!(TableName::new("anklume_lab2").is_ok());
        for bad in ["", "1abc", "incus table", "a-b", "x\"y", "a;b"] {
            assert!(TableName::new(bad).is_err(), "{bad:?}");
        }
        for keyword in [
            "table", "inet", "delete", "accept", "udp", "all", "icmp", "ruleset",
        ] {
            let err = TableName::new(keyword).unwrap_err().to_string();
            assert!(err.contains("nft keyword"), "{keyword}: {err}");
        }
    }
}
