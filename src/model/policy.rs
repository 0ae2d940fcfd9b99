//! Network policies: narrow exceptions to the isolation, in anklume's
//! vocabulary (`from`, `to`, `ports`, `protocol`, `bidirectional`).
//!
//! Parsing happens in two steps. [`PolicySpec::parse`] checks the shape of one
//! entry (ports, protocol, names) without knowing the world; resolution
//! (in `plan`) then turns names into domains, machines or the host. Every
//! error names the entry by its position and description, and an entry is
//! never read wider than written: an omitted protocol with explicit ports is
//! TCP (anklume's default), never "all protocols".

use super::names::Name;
use anyhow::{bail, ensure, Context};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeSet;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        match text {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            other => bail!("unknown protocol {other:?}: use \"tcp\" or \"udp\""),
        }
    }

    /// The keyword nft uses for `meta l4proto` values.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// An inclusive port range; a single port is `first == last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortSpan {
    first: u16,
    last: u16,
}

impl PortSpan {
    pub fn new(first: u64, last: u64) -> anyhow::Result<Self> {
        for port in [first, last] {
            ensure!(
                (1..=65535).contains(&port),
                "port {port} is out of range: ports go from 1 to 65535"
            );
        }
        ensure!(
            first <= last,
            "port range {first}-{last} is reversed: write {last}-{first}"
        );
        Ok(PortSpan {
            first: first as u16,
            last: last as u16,
        })
    }

    pub fn single(port: u16) -> anyhow::Result<Self> {
        Self::new(port.into(), port.into())
    }

    pub fn first(self) -> u16 {
        self.first
    }

    pub fn last(self) -> u16 {
        self.last
    }

    pub fn contains(self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    pub(crate) fn parse_text(text: &str) -> anyhow::Result<Self> {
        let number = |part: &str| -> anyhow::Result<u64> {
            part.trim()
                .parse::<u64>()
                .with_context(|| format!("{text:?} is not a port or a \"first-last\" range"))
        };
        match text.split_once('-') {
            Some((first, last)) => Self::new(number(first)?, number(last)?),
            None => {
                let port = number(text)?;
                Self::new(port, port)
            }
        }
    }
}

/// Merges overlapping and adjacent spans (`22`, `1-1024`, `1025` become
/// `1-1025`). nft refuses interval elements that overlap ("File exists"), so
/// every port list reaches a set through this; the operator's report keeps
/// the spans as written.
pub fn merge_spans<'a>(spans: impl IntoIterator<Item = &'a PortSpan>) -> Vec<PortSpan> {
    let mut sorted: Vec<PortSpan> = spans.into_iter().copied().collect();
    sorted.sort();
    let mut merged: Vec<PortSpan> = Vec::with_capacity(sorted.len());
    for span in sorted {
        match merged.last_mut() {
            Some(last) if u32::from(span.first) <= u32::from(last.last) + 1 => {
                last.last = last.last.max(span.last);
            }
            _ => merged.push(span),
        }
    }
    merged
}

impl fmt::Display for PortSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl Serialize for PortSpan {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What a policy opens at the transport layer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Traffic {
    /// `ports: all` without a protocol: every packet, ICMP included.
    All,
    /// These ports of one protocol (`ports: all` with a protocol is 1-65535).
    Ports(Protocol, BTreeSet<PortSpan>),
}

impl Serialize for Traffic {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Traffic::All => s.serialize_str("all"),
            Traffic::Ports(proto, spans) => {
                let text: Vec<String> = spans
                    .iter()
                    .map(|p| format!("{}/{p}", proto.as_str()))
                    .collect();
                s.collect_str(&text.join(","))
            }
        }
    }
}

/// One side of a policy before resolution.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointRef {
    Host,
    /// A domain or a machine: which one is decided by resolution.
    Named(Name),
}

impl EndpointRef {
    fn parse(field: &str, text: &str) -> anyhow::Result<Self> {
        if text == "host" {
            Ok(EndpointRef::Host)
        } else {
            Ok(EndpointRef::Named(Name::new(field, text)?))
        }
    }
}

impl fmt::Display for EndpointRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndpointRef::Host => f.write_str("host"),
            EndpointRef::Named(name) => write!(f, "{name}"),
        }
    }
}

/// A policy entry as written by the operator (anklume's format).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub description: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub ports: Option<Value>,
    pub protocol: Option<String>,
    pub bidirectional: Option<bool>,
}

/// A policy whose fields are valid, its names not yet resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicySpec {
    /// Position in the operator's list, from 1, for error messages.
    pub position: usize,
    pub description: String,
    pub from: EndpointRef,
    pub to: EndpointRef,
    pub traffic: Traffic,
    pub bidirectional: bool,
}

/// Descriptions end up in nft comments and log lines: keep them to text that
/// never needs escaping there.
const DESCRIPTION_MAX_BYTES: usize = 120;

impl PolicySpec {
    /// Parses every entry of a policy list; the first invalid one fails the
    /// whole list, named by its position and description.
    pub fn parse_all(entries: &[Value]) -> anyhow::Result<Vec<PolicySpec>> {
        let specs: Vec<PolicySpec> = entries
            .iter()
            .enumerate()
            .map(|(i, entry)| PolicySpec::parse(i + 1, entry))
            .collect::<anyhow::Result<_>>()?;
        reject_contradicting_duplicates(&specs)?;
        Ok(specs)
    }

    pub fn parse(position: usize, entry: &Value) -> anyhow::Result<PolicySpec> {
        let label = entry_label(position, entry);
        let raw: RawPolicy = serde_json::from_value(entry.clone())
            .map_err(|err| anyhow::anyhow!("{label}: {err}"))?;
        Self::from_raw(position, raw).with_context(|| label)
    }

    fn from_raw(position: usize, raw: RawPolicy) -> anyhow::Result<PolicySpec> {
        let description = raw.description.unwrap_or_default();
        ensure!(
            description.len() <= DESCRIPTION_MAX_BYTES,
            "description is longer than {DESCRIPTION_MAX_BYTES} bytes"
        );
        if let Some(bad) = description
            .chars()
            .find(|c| !(c.is_alphanumeric() || " -_.,:()/+'".contains(*c)))
        {
            bail!(
                "description contains {bad:?}, which would need escaping in nft comments; use \
                 letters, digits, spaces and - _ . , : ( ) / + '"
            );
        }
        let from = raw
            .from
            .context("`from` is missing (a domain, a machine or \"host\")")?;
        let to = raw
            .to
            .context("`to` is missing (a domain, a machine or \"host\")")?;
        let from = EndpointRef::parse("`from`", &from)?;
        let to = EndpointRef::parse("`to`", &to)?;
        ensure!(
            !(from == EndpointRef::Host && to == EndpointRef::Host),
            "`from` and `to` are both \"host\""
        );
        let protocol = raw.protocol.as_deref().map(Protocol::parse).transpose()?;
        let ports = raw.ports.context(
            "`ports` is missing: list ports and \"first-last\" ranges, or write \"all\"",
        )?;
        let traffic = parse_traffic(&ports, protocol)?;
        Ok(PolicySpec {
            position,
            description,
            from,
            to,
            traffic,
            bidirectional: raw.bidirectional.unwrap_or(false),
        })
    }

    /// How the entry is named in messages: `network policy #3 ("Pro reaches AI")`.
    pub fn label(&self) -> String {
        if self.description.is_empty() {
            format!("network policy #{}", self.position)
        } else {
            format!("network policy #{} ({:?})", self.position, self.description)
        }
    }
}

fn entry_label(position: usize, entry: &Value) -> String {
    match entry.get("description").and_then(Value::as_str) {
        Some(d) if !d.is_empty() => format!("network policy #{position} ({d:?})"),
        _ => format!("network policy #{position}"),
    }
}

fn parse_traffic(ports: &Value, protocol: Option<Protocol>) -> anyhow::Result<Traffic> {
    let all_ports = || PortSpan::new(1, 65535).map(|span| BTreeSet::from([span]));
    match (ports, protocol) {
        (Value::String(s), None) if s == "all" => Ok(Traffic::All),
        (Value::String(s), Some(proto)) if s == "all" => Ok(Traffic::Ports(proto, all_ports()?)),
        (Value::Array(items), proto) => {
            ensure!(
                !items.is_empty(),
                "`ports` is an empty list: list ports, or write \"all\""
            );
            let mut spans = BTreeSet::new();
            for item in items {
                let span = match item {
                    Value::Number(n) => {
                        let port = n
                            .as_u64()
                            .with_context(|| format!("port {n} is not a whole number"))?;
                        PortSpan::new(port, port)?
                    }
                    Value::String(s) => PortSpan::parse_text(s)?,
                    other => bail!("port {other} is neither a number nor a \"first-last\" range"),
                };
                spans.insert(span);
            }
            Ok(Traffic::Ports(proto.unwrap_or(Protocol::Tcp), spans))
        }
        (Value::Number(n), proto) => {
            let port = n
                .as_u64()
                .with_context(|| format!("port {n} is not a whole number"))?;
            Ok(Traffic::Ports(
                proto.unwrap_or(Protocol::Tcp),
                BTreeSet::from([PortSpan::new(port, port)?]),
            ))
        }
        (other, _) => {
            bail!("`ports` is {other}: list ports and \"first-last\" ranges, or write \"all\"")
        }
    }
}

/// Two entries with the same ends and ports but different directions are
/// almost always an editing mistake (one says "both ways", the other "one
/// way"): refuse rather than guess which one the operator meant.
fn reject_contradicting_duplicates(specs: &[PolicySpec]) -> anyhow::Result<()> {
    for (i, a) in specs.iter().enumerate() {
        for b in &specs[i + 1..] {
            let same_ends = a.from == b.from && a.to == b.to;
            if same_ends && a.traffic == b.traffic && a.bidirectional != b.bidirectional {
                bail!(
                    "{} and {} say the same thing with different `bidirectional` values; keep one",
                    a.label(),
                    b.label()
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> anyhow::Result<PolicySpec> {
        PolicySpec::parse(1, &v)
    }

    #[test]
    fn anklume_example_parses() {
        let p = parse(
            json!({"description": "Pro reaches the AI API", "from": "pro",
            "to": "ai-tools", "ports": [8080, "9000-9010"], "protocol": "tcp"}),
        )
        .unwrap();
        assert_eq!(p.from, EndpointRef::Named(Name::new("x", "pro").unwrap()));
        let Traffic::Ports(Protocol::Tcp, spans) = &p.traffic else {
            panic!("{:?}", p.traffic)
        };
        let shown: Vec<String> = spans.iter().map(|s| s.to_string()).collect();
        assert_eq!(shown, ["8080", "9000-9010"]);
        assert!(!p.bidirectional);
    }

    #[test]
    fn ports_all_without_protocol_is_all_traffic_and_with_protocol_is_narrower() {
        let all = parse(json!({"from": "a", "to": "b", "ports": "all"})).unwrap();
        assert_eq!(all.traffic, Traffic::All);
        let udp =
            parse(json!({"from": "a", "to": "b", "ports": "all", "protocol": "udp"})).unwrap();
        assert!(matches!(udp.traffic, Traffic::Ports(Protocol::Udp, _)));
    }

    #[test]
    fn bad_entries_are_named_with_their_reason() {
        let cases = [
            (
                json!({"from": "a", "to": "b", "ports": [0]}),
                "port 0 is out of range",
            ),
            (
                json!({"from": "a", "to": "b", "ports": [65536]}),
                "port 65536 is out of range",
            ),
            (
                json!({"from": "a", "to": "b", "ports": ["10-5"]}),
                "reversed",
            ),
            (
                json!({"from": "a", "to": "b", "ports": [22], "protocol": "icmp"}),
                "unknown protocol",
            ),
            (json!({"from": "a", "to": "b", "ports": []}), "empty list"),
            (json!({"from": "a", "to": "b"}), "`ports` is missing"),
            (json!({"to": "b", "ports": "all"}), "`from` is missing"),
            (
                json!({"from": "a b", "to": "b", "ports": "all"}),
                "contains ' '",
            ),
            (
                json!({"from": "a", "to": "b", "ports": "all", "colour": 1}),
                "unknown field `colour`",
            ),
            (
                json!({"description": "x\"; flush ruleset", "from": "a", "to": "b", "ports": "all"}),
                "description contains",
            ),
            (
                json!({"from": "host", "to": "host", "ports": "all"}),
                "both \"host\"",
            ),
            (
                json!({"from": "a", "to": "b", "ports": ["ssh"]}),
                "not a port",
            ),
        ];
        for (entry, expected) in cases {
            let err = format!("{:#}", parse(entry.clone()).unwrap_err());
            assert!(err.starts_with("network policy #1"), "{err}");
            assert!(err.contains(expected), "{entry}: {err}");
        }
    }

    #[test]
    fn overlapping_and_adjacent_spans_merge() {
        let spans = |list: &[(u64, u64)]| -> Vec<PortSpan> {
            list.iter()
                .map(|(a, b)| PortSpan::new(*a, *b).unwrap())
                .collect()
        };
        let shown = |v: Vec<PortSpan>| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            shown(merge_spans(&spans(&[(22, 22), (1, 1024)]))),
            ["1-1024"]
        );
        assert_eq!(
            shown(merge_spans(&spans(&[
                (443, 443),
                (1, 442),
                (8080, 8080),
                (8081, 8090)
            ]))),
            ["1-443", "8080-8090"]
        );
        assert_eq!(
            shown(merge_spans(&spans(&[(10, 20), (22, 30), (65535, 65535)]))),
            ["10-20", "22-30", "65535"]
        );
        assert_eq!(
            shown(merge_spans(&spans(&[(1, 65535), (65535, 65535)]))),
            ["1-65535"]
        );
    }

    #[test]
    fn contradicting_duplicates_are_refused() {
        let list = vec![
            json!({"from": "a", "to": "b", "ports": [22], "bidirectional": true}),
            json!({"description": "again", "from": "a", "to": "b", "ports": [22]}),
        ];
        let err = PolicySpec::parse_all(&list).unwrap_err().to_string();
        assert!(err.contains("#1") && err.contains("#2"), "{err}");
    }
}
