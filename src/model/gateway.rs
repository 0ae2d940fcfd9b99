//! The services a domain reaches on its own gateway (the host's address on
//! its bridge): what a bridge needs to work, and nothing else unless an
//! operator adds it (or a `to: host` policy opens it).

use super::policy::{merge_spans, PortSpan, Protocol};
use anyhow::{bail, Context};
use serde::Serialize;
use std::collections::BTreeSet;

/// DHCPv4, DHCPv6, DNS over UDP and TCP, and ICMP/ICMPv6 echo. Neighbour
/// discovery, router solicitation and MLD are not in the list: without them
/// IPv6 on the bridge stops working, so they are always accepted.
pub const DEFAULT_GATEWAY_SERVICES: &[&str] =
    &["udp/67", "udp/547", "udp/53", "tcp/53", ECHO_REQUEST];

/// The entry that opens ICMP and ICMPv6 echo requests to the gateway.
pub const ECHO_REQUEST: &str = "icmp/echo-request";

/// The validated list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GatewayServices {
    /// Transport ports, merged (nft refuses overlapping interval elements).
    pub ports: BTreeSet<(Protocol, PortSpan)>,
    /// ICMP and ICMPv6 echo requests.
    pub echo: bool,
}

impl GatewayServices {
    /// Parses `udp/67`, `tcp/8000-8010`, `icmp/echo-request` entries.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> anyhow::Result<GatewayServices> {
        let mut spans: Vec<(Protocol, PortSpan)> = Vec::new();
        let mut echo = false;
        for entry in entries {
            let entry = entry.as_ref();
            if entry == ECHO_REQUEST {
                echo = true;
                continue;
            }
            let parsed = entry
                .split_once('/')
                .context("expected <tcp|udp>/<port or first-last>, or \"icmp/echo-request\"")
                .and_then(|(proto, ports)| {
                    Ok((Protocol::parse(proto)?, PortSpan::parse_text(ports)?))
                });
            match parsed {
                Ok(span) => spans.push(span),
                Err(err) => bail!("gateway_services entry {entry:?}: {err:#}"),
            }
        }
        let mut ports = BTreeSet::new();
        for proto in [Protocol::Tcp, Protocol::Udp] {
            let of_proto: Vec<PortSpan> = spans
                .iter()
                .filter(|(p, _)| *p == proto)
                .map(|(_, s)| *s)
                .collect();
            for span in merge_spans(&of_proto) {
                ports.insert((proto, span));
            }
        }
        Ok(GatewayServices { ports, echo })
    }

    pub fn defaults() -> GatewayServices {
        Self::parse(DEFAULT_GATEWAY_SERVICES).expect("the default gateway services parse")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors() {
        let d = GatewayServices::defaults();
        assert!(d.echo);
        let shown: Vec<String> = d
            .ports
            .iter()
            .map(|(p, s)| format!("{}/{s}", p.as_str()))
            .collect();
        assert_eq!(shown, ["tcp/53", "udp/53", "udp/67", "udp/547"]);
        let merged = GatewayServices::parse(&["udp/123", "udp/120-125", "tcp/53"]).unwrap();
        assert!(!merged.echo);
        assert_eq!(merged.ports.len(), 2);
        for bad in ["ntp", "sctp/1", "udp/0", "udp/9-1", "icmp/timestamp"] {
            let err = GatewayServices::parse(&[bad]).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
    }
}
