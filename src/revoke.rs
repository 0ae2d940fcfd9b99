//! Revocation that cuts: which open connections the new ruleset no longer
//! allows.
//!
//! `ct state established,related accept` comes first in our chains (it is
//! the one lookup most packets take), so removing a policy stops new
//! connections but not the ones it let in: an open SSH session or UDP flow
//! kept going. After an apply, every conntrack entry that an accept rule of
//! the *old* table admitted and no accept rule of the *new* one admits is
//! deleted; its next packet is then new and meets the new rules.
//!
//! The accept rules are read from the tables themselves (typed, from `nft
//! -j`): each `<selectors> @set accept` rule and its set's elements. A
//! conntrack entry has no interfaces, so a flow's bridges are the ones whose
//! subnets hold its addresses. Anything this cannot read (another selector,
//! another element shape) counts as "admits": the error is then to leave a
//! flow running, never to cut an allowed one. Pure: the runner lists
//! conntrack and the interfaces.

use crate::effects::Listing;
use ipnet::IpNet;
use serde_json::Value;
use std::net::IpAddr;

/// One field of a set key, as a rule selects it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Selector {
    Iif,
    Oif,
    L4proto,
    Dport,
    Saddr,
    Daddr,
    /// A selector this module does not evaluate: matches anything.
    Other,
}

/// An `accept` rule keyed on a set, on the forward or input hook.
#[derive(Debug, Clone)]
struct AcceptRule {
    input: bool,
    selectors: Vec<Selector>,
    elements: Vec<Vec<Atom>>,
}

/// One field of a set element.
#[derive(Debug, Clone, PartialEq)]
enum Atom {
    Name(String),
    Number(u64, u64),
    Net(IpNet),
    Proto(u8),
    /// Unreadable: matches anything.
    Any,
}

/// A connection as conntrack holds it (its original direction), placed on
/// the host's interfaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
}

/// The host's interfaces and their addresses (`ip -j addr`).
#[derive(Debug, Clone, Default)]
pub struct Interfaces {
    /// (interface, one of its addresses with its prefix length)
    pub addresses: Vec<(String, IpNet)>,
}

impl Interfaces {
    fn holding(&self, addr: IpAddr) -> Option<&str> {
        self.addresses
            .iter()
            .filter(|(_, net)| net.contains(&addr))
            .max_by_key(|(_, net)| net.prefix_len())
            .map(|(name, _)| name.as_str())
    }

    fn is_local(&self, addr: IpAddr) -> bool {
        self.addresses.iter().any(|(_, net)| net.addr() == addr)
    }
}

/// The accept rules of `table`, from a canonical listing.
pub struct Admission {
    rules: Vec<AcceptRule>,
}

impl Admission {
    pub fn of(listing: &Value, table: &str) -> anyhow::Result<Admission> {
        let listing: Listing = serde_json::from_value(listing.clone())?;
        Ok(Admission {
            rules: listing
                .set_accept_rules(table)
                .into_iter()
                .map(|(hook, selectors, elements)| AcceptRule {
                    input: hook == "input",
                    selectors: selectors.iter().map(selector).collect(),
                    elements: elements.iter().map(element).collect(),
                })
                .collect(),
        })
    }

    /// Whether some accept rule admits the flow as a new connection.
    pub fn admits(&self, flow: &Flow, interfaces: &Interfaces) -> bool {
        let input = interfaces.is_local(flow.dst);
        let iif = interfaces.holding(flow.src);
        let oif = if input {
            None
        } else {
            interfaces.holding(flow.dst)
        };
        self.rules
            .iter()
            .filter(|rule| rule.input == input)
            .any(|rule| {
                rule.elements.iter().any(|element| {
                    element.len() == rule.selectors.len()
                        && rule
                            .selectors
                            .iter()
                            .zip(element)
                            .all(|(sel, atom)| field_matches(*sel, atom, flow, iif, oif))
                })
            })
    }
}

fn field_matches(
    sel: Selector,
    atom: &Atom,
    flow: &Flow,
    iif: Option<&str>,
    oif: Option<&str>,
) -> bool {
    if *atom == Atom::Any || sel == Selector::Other {
        return true;
    }
    match (sel, atom) {
        (Selector::Iif, Atom::Name(name)) => iif == Some(name.as_str()),
        (Selector::Oif, Atom::Name(name)) => oif == Some(name.as_str()),
        (Selector::L4proto, Atom::Proto(p)) => flow.proto == *p,
        (Selector::L4proto, Atom::Number(lo, hi)) => (*lo..=*hi).contains(&u64::from(flow.proto)),
        (Selector::Dport, Atom::Number(lo, hi)) => flow
            .dport
            .is_some_and(|port| (*lo..=*hi).contains(&u64::from(port))),
        (Selector::Saddr, Atom::Net(net)) => net.contains(&flow.src),
        (Selector::Daddr, Atom::Net(net)) => net.contains(&flow.dst),
        _ => false,
    }
}

/// Flows `old` admitted and `new` does not: the connections to cut.
pub fn revoked<'a>(
    old: &Admission,
    new: &Admission,
    flows: &'a [Flow],
    interfaces: &Interfaces,
) -> Vec<&'a Flow> {
    flows
        .iter()
        .filter(|flow| old.admits(flow, interfaces) && !new.admits(flow, interfaces))
        .collect()
}

/// A selector of nft's JSON: `{"meta": {"key": "iifname"}}`,
/// `{"payload": {"protocol": "th", "field": "dport"}}`, ...
fn selector(v: &Value) -> Selector {
    #[derive(serde::Deserialize)]
    struct Meta {
        key: String,
    }
    #[derive(serde::Deserialize)]
    struct Payload {
        protocol: String,
        field: String,
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Sel {
        Meta(Meta),
        Payload(Payload),
    }
    match serde_json::from_value::<Sel>(v.clone()) {
        Ok(Sel::Meta(m)) => match m.key.as_str() {
            "iifname" => Selector::Iif,
            "oifname" => Selector::Oif,
            "l4proto" => Selector::L4proto,
            _ => Selector::Other,
        },
        Ok(Sel::Payload(p)) => match (p.protocol.as_str(), p.field.as_str()) {
            ("th" | "tcp" | "udp", "dport") => Selector::Dport,
            ("ip" | "ip6", "saddr") => Selector::Saddr,
            ("ip" | "ip6", "daddr") => Selector::Daddr,
            _ => Selector::Other,
        },
        Err(_) => Selector::Other,
    }
}

/// One element as a list of atoms (a concatenation, or one value).
fn element(v: &Value) -> Vec<Atom> {
    // `{"elem": {"val": ..., "timeout": ...}}` wraps elements with options.
    let v = v.get("elem").and_then(|e| e.get("val")).unwrap_or(v);
    match v.get("concat").and_then(Value::as_array) {
        Some(parts) => parts.iter().map(atom).collect(),
        None => vec![atom(v)],
    }
}

fn atom(v: &Value) -> Atom {
    #[derive(serde::Deserialize)]
    struct Prefix {
        addr: String,
        len: u8,
    }
    if let Some(n) = v.as_u64() {
        return Atom::Number(n, n);
    }
    if let Some(s) = v.as_str() {
        if let Ok(addr) = s.parse::<IpAddr>() {
            return IpNet::new(addr, if addr.is_ipv4() { 32 } else { 128 })
                .map_or(Atom::Any, Atom::Net);
        }
        return match s {
            "tcp" => Atom::Proto(6),
            "udp" => Atom::Proto(17),
            "icmp" => Atom::Proto(1),
            "icmpv6" | "ipv6-icmp" => Atom::Proto(58),
            "sctp" => Atom::Proto(132),
            _ => Atom::Name(s.to_string()),
        };
    }
    if let Some(p) = v.get("prefix") {
        return serde_json::from_value::<Prefix>(p.clone())
            .ok()
            .and_then(|p| IpNet::new(p.addr.parse().ok()?, p.len).ok())
            .map_or(Atom::Any, Atom::Net);
    }
    if let Some([lo, hi]) = v.get("range").and_then(Value::as_array).map(Vec::as_slice) {
        if let (Some(lo), Some(hi)) = (lo.as_u64(), hi.as_u64()) {
            return Atom::Number(lo, hi);
        }
        // An address range: the smallest prefix covering it would widen it,
        // so it matches anything (never cuts what it may allow).
    }
    Atom::Any
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn admission(elements: Value) -> Admission {
        let listing = json!({"nftables": [
            {"table": {"family": "inet", "name": "t"}},
            {"set": {"family": "inet", "table": "t", "name": "svc",
                     "type": ["ifname", "ifname", "inet_proto", "inet_service"],
                     "elem": elements}},
            {"chain": {"family": "inet", "table": "t", "name": "isolation",
                       "type": "filter", "hook": "forward", "prio": -1, "policy": "accept"}},
            {"rule": {"family": "inet", "table": "t", "chain": "isolation", "expr": [
                {"match": {"op": "==", "left": {"concat": [
                    {"meta": {"key": "iifname"}}, {"meta": {"key": "oifname"}},
                    {"meta": {"key": "l4proto"}}, {"payload": {"protocol": "th", "field": "dport"}}]},
                    "right": "@svc"}},
                {"accept": null}]}}
        ]});
        Admission::of(&listing, "t").unwrap()
    }

    fn interfaces() -> Interfaces {
        Interfaces {
            addresses: vec![
                ("net-a".into(), "10.231.1.1/24".parse().unwrap()),
                ("net-b".into(), "10.231.2.1/24".parse().unwrap()),
            ],
        }
    }

    fn flow(dport: u16) -> Flow {
        Flow {
            proto: 17,
            src: "10.231.1.2".parse().unwrap(),
            dst: "10.231.2.2".parse().unwrap(),
            sport: Some(40000),
            dport: Some(dport),
        }
    }

    #[test]
    fn a_removed_allowance_revokes_its_flows_and_only_those() {
        let old = admission(json!([
            {"concat": ["net-a", "net-b", "udp", 5001]},
            {"concat": ["net-a", "net-b", "udp", {"range": [6000, 6010]}]}
        ]));
        let new = admission(json!([{"concat": ["net-a", "net-b", "udp", 5001]}]));
        let flows = [flow(5001), flow(6005), flow(7000)];
        let cut = revoked(&old, &new, &flows, &interfaces());
        assert_eq!(
            cut,
            vec![&flows[1]],
            "6005 lost its allowance; 7000 never had one"
        );
        // Same tables: nothing to cut.
        assert!(revoked(&old, &old, &flows, &interfaces()).is_empty());
    }

    #[test]
    fn unreadable_shapes_count_as_admitting() {
        let old = admission(json!([{"concat": ["net-a", "net-b", "udp", 6005]}]));
        let odd = admission(json!([{"concat": ["net-a", "net-b", "udp", {"weird": 1}]}]));
        assert!(odd.admits(&flow(6005), &interfaces()));
        assert!(revoked(&old, &odd, &[flow(6005)], &interfaces()).is_empty());
    }

    /// The host's shape: `iifname . oifname vmap @pairs`, a pair that
    /// accepts, and a pair that jumps to a chain of plain-match rules.
    fn pairs_admission(chain_rules: Vec<Value>) -> Admission {
        let mut listing = vec![
            json!({"table": {"family": "inet", "name": "t"}}),
            json!({"map": {"family": "inet", "table": "t", "name": "pairs",
                "type": ["ifname", "ifname"], "map": "verdict", "elem": [
                    [{"concat": ["net-b", "net-a"]}, {"accept": null}],
                    [{"concat": ["net-a", "net-b"]}, {"jump": {"target": "pair/net-a/net-b"}}]]}}),
            json!({"chain": {"family": "inet", "table": "t", "name": "pair/net-a/net-b"}}),
            json!({"chain": {"family": "inet", "table": "t", "name": "isolation",
                "type": "filter", "hook": "forward", "prio": -1, "policy": "accept"}}),
            json!({"rule": {"family": "inet", "table": "t", "chain": "isolation", "expr": [
                {"vmap": {"key": {"ct": {"key": "state"}}, "data": {"set": [
                    ["established", {"accept": null}]]}}},
            ]}}),
            json!({"rule": {"family": "inet", "table": "t", "chain": "isolation", "expr": [
                {"vmap": {"key": {"concat": [{"meta": {"key": "iifname"}},
                    {"meta": {"key": "oifname"}}]}, "data": "@pairs"}}]}}),
        ];
        listing.extend(chain_rules.into_iter().map(|expr| {
            json!({"rule": {"family": "inet", "table": "t", "chain": "pair/net-a/net-b",
                "expr": expr}})
        }));
        Admission::of(&json!({ "nftables": listing }), "t").unwrap()
    }

    fn udp_dport(range: Value) -> Value {
        json!([
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                "right": "10.231.1.2"}},
            {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}},
                "right": range}},
            {"accept": null}
        ])
    }

    #[test]
    fn pair_chains_behind_a_verdict_map_are_read() {
        let old = pairs_admission(vec![
            udp_dport(json!(5001)),
            udp_dport(json!({"range": [6000, 6010]})),
        ]);
        let new = pairs_admission(vec![udp_dport(json!(5001))]);
        let flows = [flow(5001), flow(6005), flow(7000)];
        assert!(old.admits(&flows[0], &interfaces()));
        assert_eq!(revoked(&old, &new, &flows, &interfaces()), vec![&flows[1]]);
        // `udp dport` is UDP only: a TCP flow to 5001 was never admitted.
        let tcp = Flow {
            proto: 6,
            ..flow(5001)
        };
        assert!(!old.admits(&tcp, &interfaces()));
        // The accepting pair admits everything from net-b to net-a.
        let back = Flow {
            src: "10.231.2.2".parse().unwrap(),
            dst: "10.231.1.2".parse().unwrap(),
            ..flow(7000)
        };
        assert!(new.admits(&back, &interfaces()));
        // A match this module cannot read admits (never cuts).
        let odd = pairs_admission(vec![json!([
            {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                "right": "10.9.9.9"}},
            {"accept": null}
        ])]);
        assert!(odd.admits(&flow(7000), &interfaces()));
    }
}
