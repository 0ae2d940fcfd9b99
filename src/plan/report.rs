//! The "who reaches whom" report: what a machine of each domain may open
//! towards each other domain, the internet and the host, computed by sending
//! probe packets through the evaluator (so it reads the same rule list the
//! kernel gets, not the plan's data structures). Probes use addresses that
//! no machine holds: the report is domain-wide; what policies open for
//! single machines is in the module's `policies` result.

use super::eval::{CtState, Evaluator, Forwarded, HostDst, ToHost, Verdict, L4};
use super::HostPlan;
use crate::model::{PortSpan, Protocol};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

/// Stands for "an address on the internet" and "an anonymous machine of a
/// domain": in no subnet a plan names (documentation range).
const SOME_MACHINE: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 254));
const SOME_MACHINE_V6: IpAddr = IpAddr::V6(std::net::Ipv6Addr::new(
    0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0xfe,
));
const SOME_INTERNET_HOST: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 254));
/// An interface that is not a domain bridge.
const UPLINK: &str = "reachability-uplink";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DomainReach {
    /// Destination domain -> what opens: `all`, or `icmp` and
    /// `tcp/<port or range>` entries.
    pub domains: BTreeMap<String, Vec<String>>,
    /// To an internet address (not protected).
    pub internet: Vec<String>,
    /// To its own gateway.
    pub gateway: Vec<String>,
    /// To the host's other addresses.
    pub host: Vec<String>,
    /// From outside, by source (`anywhere`, or a network a policy names):
    /// new connections Incus does not publish (its DNAT always passes).
    pub inbound: BTreeMap<String, Vec<String>>,
}

/// Domain name -> what it may open.
pub type Reachability = BTreeMap<String, DomainReach>;

/// The report probes every ordered pair of domains through the evaluator,
/// which looks pairs up linearly: beyond this many domains it is skipped
/// (the render must stay within its time budget at 1000 domains).
pub const REPORT_MAX_DOMAINS: usize = 64;

impl HostPlan {
    pub fn reachability(&self) -> Reachability {
        let eval = self.evaluator();
        let probes = self.probe_spans();
        let mut out = Reachability::new();
        for (bridge, domain) in &self.domains {
            let mut domains = BTreeMap::new();
            for (to_bridge, to_domain) in &self.domains {
                if to_bridge == bridge {
                    continue;
                }
                let opens = describe(&probes, |l4| {
                    fwd(
                        &eval,
                        bridge.as_str(),
                        to_bridge.as_str(),
                        SOME_MACHINE,
                        SOME_MACHINE,
                        l4,
                    )
                });
                if !opens.is_empty() {
                    domains.insert(to_domain.to_string(), opens);
                }
            }
            let to_host = |dst: HostDst| {
                describe(&probes, |l4| {
                    eval.input(&ToHost {
                        iif: bridge.as_str(),
                        src: SOME_MACHINE,
                        dst,
                        l4,
                        ct: CtState::New,
                    }) == Verdict::Accept
                })
            };
            out.insert(
                domain.to_string(),
                DomainReach {
                    domains,
                    internet: describe(&probes, |l4| {
                        fwd(
                            &eval,
                            bridge.as_str(),
                            UPLINK,
                            SOME_MACHINE,
                            SOME_INTERNET_HOST,
                            l4,
                        )
                    }),
                    gateway: to_host(HostDst::Gateway),
                    host: to_host(HostDst::Elsewhere),
                    inbound: self.inbound_report(&eval, &probes, bridge),
                },
            );
        }
        out
    }

    fn inbound_report(
        &self,
        eval: &Evaluator<'_>,
        probes: &BTreeSet<(Protocol, PortSpan)>,
        bridge: &crate::model::IfName,
    ) -> BTreeMap<String, Vec<String>> {
        let mut sources = vec![("anywhere".to_string(), SOME_INTERNET_HOST)];
        if let Some(nets) = self.inbound.get(bridge) {
            sources.extend(nets.keys().map(|n| (n.to_string(), n.network())));
        }
        let mut out = BTreeMap::new();
        for (label, src) in sources {
            let dst = match src {
                IpAddr::V4(_) => SOME_MACHINE,
                IpAddr::V6(_) => SOME_MACHINE_V6,
            };
            let opens = describe(probes, |l4| {
                fwd(eval, UPLINK, bridge.as_str(), src, dst, l4)
            });
            if !opens.is_empty() {
                out.insert(label, opens);
            }
        }
        out
    }

    /// Every port span the plan names anywhere, plus the ends of the port
    /// space, so that "every port" can be told from "these ports".
    fn probe_spans(&self) -> BTreeSet<(Protocol, PortSpan)> {
        let mut spans: BTreeSet<(Protocol, PortSpan)> = BTreeSet::new();
        let mut add = |set: &super::PortSet| spans.extend(set.iter().copied());
        for pair in self.pairs.values() {
            add(&pair.ports);
        }
        add(&super::PortSet::from(&self.gateway));
        for set in self.host.services.values() {
            add(set);
        }
        for rules in self.egress.values() {
            add(&rules.ports);
        }
        for nets in self.inbound.values() {
            for e in nets.values() {
                add(&e.ports);
            }
        }
        for proto in [Protocol::Tcp, Protocol::Udp] {
            for port in [1, 65535] {
                spans.insert((
                    proto,
                    PortSpan::single(port).expect("1 and 65535 are ports"),
                ));
            }
        }
        spans
    }
}

fn fwd(eval: &Evaluator<'_>, iif: &str, oif: &str, src: IpAddr, dst: IpAddr, l4: L4) -> bool {
    eval.forward(&Forwarded {
        iif,
        oif,
        src,
        dst,
        l4,
        ct: CtState::New,
    }) == Verdict::Accept
}

/// `["all"]` when every probe passes, else what passes (a span counts when
/// both its ends pass).
fn describe(spans: &BTreeSet<(Protocol, PortSpan)>, passes: impl Fn(L4) -> bool) -> Vec<String> {
    let l4 = |proto: Protocol, port: u16| match proto {
        Protocol::Tcp => L4::Tcp(port),
        Protocol::Udp => L4::Udp(port),
    };
    let icmp = passes(L4::Icmp);
    let open: Vec<String> = spans
        .iter()
        .filter(|(p, s)| passes(l4(*p, s.first())) && passes(l4(*p, s.last())))
        .map(|(p, s)| format!("{}/{s}", p.as_str()))
        .collect();
    if icmp && open.len() == spans.len() {
        return vec!["all".into()];
    }
    let mut out: Vec<String> = icmp.then(|| "icmp".to_string()).into_iter().collect();
    out.extend(open);
    out
}

#[cfg(test)]
mod tests {
    use super::super::tests::plan_with_edges;
    use serde_json::json;

    #[test]
    fn the_report_reads_the_rules() {
        let (plan, _) = plan_with_edges(
            &["net-anklume", "net-pro", "net-perso"],
            Some("net-anklume"),
            &[],
            json!([
                {"from": "pro", "to": "perso", "ports": [8080, "9000-9010"]},
                {"from": "perso", "to": "host", "ports": [2223]},
                {"from": "192.0.2.0/24", "to": "pro", "ports": [22]}
            ]),
            json!({"perso": {"internet": false}, "pro": {"egress": [{"protocol": "tcp", "port": 443}]}}),
            &[],
        )
        .unwrap();
        let r = plan.reachability();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(r["anklume"].domains["pro"], s(&["all"]));
        assert_eq!(r["anklume"].internet, s(&["all"]));
        assert_eq!(r["pro"].domains["perso"], s(&["tcp/8080", "tcp/9000-9010"]));
        assert!(!r["pro"].domains.contains_key("anklume"));
        assert!(!r["perso"].domains.contains_key("pro"));
        assert_eq!(r["pro"].internet, s(&["tcp/443"]));
        assert!(r["perso"].internet.is_empty());
        assert!(r["perso"].host.contains(&"tcp/2223".to_string()));
        assert!(!r["pro"].host.contains(&"tcp/2223".to_string()));
        assert!(r["pro"].gateway.contains(&"udp/53".to_string()));
        assert_eq!(r["pro"].inbound["192.0.2.0/24"], s(&["tcp/22"]));
        assert_eq!(r["pro"].inbound.len(), 1, "nothing from anywhere else");
        assert!(r["perso"].inbound.is_empty());
    }
}
