//! The "who reaches whom" report: what a machine of each domain may open
//! towards each other domain, the internet and the host, computed by sending
//! probe packets through the evaluator (so it reads the same rule list the
//! kernel gets, not the plan's data structures). Domain cells probe with
//! addresses no machine holds; inside a domain that isolates its machines,
//! with its known machines (the bridge table knows them by MAC); machine
//! cells (`machines`) with the real address of each machine a policy names
//! as its source.

use super::eval::{
    CtState, Evaluator, Forwarded, Frame, FrameL4, HostDst, Payload, ToHost, Verdict, L4,
};
use super::HostPlan;
use crate::model::{Endpoint, IfName, MacAddr, Name, PortSpan, Protocol};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Stands for "an address on the internet" and "an anonymous machine of a
/// domain": in no subnet a plan names (documentation range).
const SOME_MACHINE: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 254));
const SOME_MACHINE_V6: IpAddr = IpAddr::V6(std::net::Ipv6Addr::new(
    0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0xfe,
));
const SOME_INTERNET_HOST: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 254));
/// An interface that is not a domain bridge.
const UPLINK: &str = "reachability-uplink";
/// MACs no machine holds (locally administered), for anonymous machines.
const SOME_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0xfe]);
const OTHER_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0xfd]);
/// The source port of probe connections.
const PROBE_SPORT: u16 = 40000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DomainReach {
    /// Destination domain -> what opens: `all`, or `icmp` and
    /// `tcp/<port or range>` entries. The domain's own name is always there:
    /// what every machine of it may open to every other (`all`, unless it
    /// isolates its machines).
    pub domains: BTreeMap<String, Vec<String>>,
    /// Machine of this domain that a policy names as `from` -> target (every
    /// other domain, standing for an anonymous machine of it, and every
    /// machine a policy names as `to`) -> what that machine may open to it.
    pub machines: BTreeMap<String, BTreeMap<String, Vec<String>>>,
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
            domains.insert(
                domain.to_string(),
                self.inside_domain(&eval, &probes, bridge),
            );
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
                    machines: self.machine_report(&eval, &probes, bridge),
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

    /// What every machine of a domain may open to every other: probed
    /// between each ordered pair of its known machines when it isolates
    /// them (an anonymous pair in its subnet when it has fewer than two).
    fn inside_domain(
        &self,
        eval: &Evaluator<'_>,
        probes: &BTreeSet<(Protocol, PortSpan)>,
        bridge: &IfName,
    ) -> Vec<String> {
        let known: Vec<Probe> = self
            .isolation
            .machines
            .get(bridge)
            .into_iter()
            .flatten()
            .filter_map(|m| self.machine_probe(bridge, &m.name, None))
            .collect();
        let mut pairs: Vec<(Probe, Probe)> = Vec::new();
        for (i, a) in known.iter().enumerate() {
            for (j, b) in known.iter().enumerate() {
                if i != j && a.ip.is_ipv6() == b.ip.is_ipv6() {
                    pairs.push((a.clone(), b.clone()));
                }
            }
        }
        if pairs.is_empty() {
            let (a, b) = self.anonymous_pair(bridge);
            pairs.push((a, b));
        }
        describe(probes, |l4| {
            pairs.iter().all(|(a, b)| same_bridge(eval, a, b, l4))
        })
    }

    /// Two addresses no machine holds, inside the bridge's subnet when it
    /// has one (so the bridge table's subnet rule sees them).
    fn anonymous_pair(&self, bridge: &IfName) -> (Probe, Probe) {
        let subnet = self.isolation.domains.get(bridge).and_then(|(v4, _)| *v4);
        let (a, b) = match subnet {
            Some(net) => {
                let last = u32::from(net.trunc().broadcast());
                // The two highest host addresses (a /30 still has them).
                (
                    IpAddr::V4(Ipv4Addr::from(last - 1)),
                    IpAddr::V4(Ipv4Addr::from(last - 2)),
                )
            }
            None => (SOME_MACHINE, IpAddr::V4(Ipv4Addr::new(192, 0, 2, 253))),
        };
        let probe = |ip, mac| Probe {
            bridge: bridge.clone(),
            ip,
            mac,
        };
        (probe(a, SOME_MAC), probe(b, OTHER_MAC))
    }

    /// A named machine's probe: its bridge, its address (IPv4 if it has
    /// one, else IPv6; `family` forces one), its MAC when known.
    fn machine_probe(&self, bridge: &IfName, name: &Name, family: Option<bool>) -> Option<Probe> {
        let (v4, v6) = self.machine_addresses(bridge, name)?;
        let ip = match family {
            Some(true) => v6.first().copied().map(IpAddr::V6),
            Some(false) => v4.first().copied().map(IpAddr::V4),
            None => v4
                .first()
                .copied()
                .map(IpAddr::V4)
                .or_else(|| v6.first().copied().map(IpAddr::V6)),
        }?;
        let mac = self
            .isolation
            .machines
            .get(bridge)
            .into_iter()
            .flatten()
            .find(|m| m.name == *name)
            .and_then(|m| m.hwaddr)
            .unwrap_or(SOME_MAC);
        Some(Probe {
            bridge: bridge.clone(),
            ip,
            mac,
        })
    }

    /// A machine's addresses, from the isolated domain's machines or the
    /// policies that name it.
    fn machine_addresses(
        &self,
        bridge: &IfName,
        name: &Name,
    ) -> Option<(Vec<Ipv4Addr>, Vec<Ipv6Addr>)> {
        if let Some(m) = self
            .isolation
            .machines
            .get(bridge)
            .into_iter()
            .flatten()
            .find(|m| m.name == *name)
        {
            return Some((
                m.v4.iter().copied().collect(),
                m.v6.iter().copied().collect(),
            ));
        }
        self.policies
            .iter()
            .flat_map(|e| [&e.policy.from, &e.policy.to])
            .find_map(|end| match end {
                Endpoint::Machine {
                    name: n,
                    bridge: b,
                    ipv4,
                    ipv6,
                } if n == name && b == bridge => Some((
                    ipv4.iter().copied().collect(),
                    ipv6.iter().copied().collect(),
                )),
                _ => None,
            })
    }

    /// The machine cells of one domain: each machine of it a policy names
    /// as `from`, towards every other domain and every machine a policy
    /// names as `to`.
    fn machine_report(
        &self,
        eval: &Evaluator<'_>,
        probes: &BTreeSet<(Protocol, PortSpan)>,
        bridge: &IfName,
    ) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
        let named = |to: bool| -> BTreeSet<(IfName, Name)> {
            self.policies
                .iter()
                .map(|e| if to { &e.policy.to } else { &e.policy.from })
                .filter_map(|end| match end {
                    Endpoint::Machine { name, bridge, .. } => Some((bridge.clone(), name.clone())),
                    _ => None,
                })
                .collect()
        };
        let targets = named(true);
        let mut out = BTreeMap::new();
        for (b, name) in named(false).iter().filter(|(b, _)| b == bridge) {
            let Some(src) = self.machine_probe(b, name, None) else {
                continue;
            };
            let mut cells = BTreeMap::new();
            for (to_bridge, to_domain) in &self.domains {
                if to_bridge == bridge {
                    continue;
                }
                let dst = match src.ip {
                    IpAddr::V4(_) => SOME_MACHINE,
                    IpAddr::V6(_) => SOME_MACHINE_V6,
                };
                let opens = describe(probes, |l4| {
                    fwd(eval, bridge.as_str(), to_bridge.as_str(), src.ip, dst, l4)
                });
                cells.insert(to_domain.to_string(), opens);
            }
            for (to_bridge, to_name) in &targets {
                if to_name == name && to_bridge == bridge {
                    continue;
                }
                let dst = self.machine_probe(to_bridge, to_name, Some(src.ip.is_ipv6()));
                let opens = match dst {
                    None => Vec::new(),
                    Some(dst) if dst.bridge == src.bridge => {
                        describe(probes, |l4| same_bridge(eval, &src, &dst, l4))
                    }
                    Some(dst) => describe(probes, |l4| {
                        fwd(
                            eval,
                            src.bridge.as_str(),
                            dst.bridge.as_str(),
                            src.ip,
                            dst.ip,
                            l4,
                        )
                    }),
                };
                cells.insert(to_name.to_string(), opens);
            }
            out.insert(name.to_string(), cells);
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
            // Machine policies' ports, for the machine cells.
            let v4 = &pair.v4;
            let v6 = &pair.v6;
            for set in v4.src_ports.values().chain(v4.dst_ports.values()) {
                add(set);
            }
            for set in v4.both_ports.values() {
                add(set);
            }
            for set in v6.src_ports.values().chain(v6.dst_ports.values()) {
                add(set);
            }
            for set in v6.both_ports.values() {
                add(set);
            }
        }
        add(&super::PortSet::from(&self.gateway));
        for set in self.host.services.values() {
            add(set);
        }
        for rules in self.egress.values() {
            add(&rules.ports);
        }
        let iso = &self.isolation;
        for set in iso.v4.services.values().chain(iso.v6.services.values()) {
            add(set);
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

/// One end of a same-bridge probe.
#[derive(Debug, Clone)]
struct Probe {
    bridge: IfName,
    ip: IpAddr,
    mac: MacAddr,
}

/// A new connection between two machines on one bridge: the bridge table
/// sees the frame, and with br_netfilter on the inet forward hook sees it
/// too (iifname == oifname == the bridge): both must let it through.
fn same_bridge(eval: &Evaluator<'_>, src: &Probe, dst: &Probe, l4: L4) -> bool {
    let l4_frame = match l4 {
        L4::Tcp(dport) => FrameL4::Tcp {
            sport: PROBE_SPORT,
            dport,
            bare_syn: true,
        },
        L4::Udp(dport) => FrameL4::Udp {
            sport: PROBE_SPORT,
            dport,
        },
        L4::Icmp => FrameL4::EchoRequest,
        L4::Nd => FrameL4::Nd,
    };
    let frame = Frame {
        src_mac: src.mac,
        dst_mac: dst.mac,
        payload: Payload::Ip {
            src: src.ip,
            dst: dst.ip,
            l4: l4_frame,
        },
    };
    let bridged = Forwarded {
        iif: src.bridge.as_str(),
        oif: dst.bridge.as_str(),
        src: src.ip,
        dst: dst.ip,
        l4,
        ct: CtState::New,
    };
    eval.bridge(&frame) == Verdict::Accept
        && eval.forward_bridged(&bridged, dst.mac) == Verdict::Accept
}

/// `["all"]` when every probe passes, else what passes (a span counts when
/// both its ends pass).
fn describe(spans: &BTreeSet<(Protocol, PortSpan)>, passes: impl Fn(L4) -> bool) -> Vec<String> {
    let l4 = |proto: Protocol, port: u16| match proto {
        Protocol::Tcp => L4::Tcp(port),
        Protocol::Udp => L4::Udp(port),
    };
    let icmp = passes(L4::Icmp);
    let passing: Vec<&(Protocol, PortSpan)> = spans
        .iter()
        .filter(|(p, s)| passes(l4(*p, s.first())) && passes(l4(*p, s.last())))
        .collect();
    if icmp && passing.len() == spans.len() {
        return vec!["all".into()];
    }
    // A span inside another passing span of its protocol says nothing more.
    let open: Vec<String> = passing
        .iter()
        .filter(|(p, s)| {
            !passing
                .iter()
                .any(|(q, t)| q == p && t != s && t.first() <= s.first() && s.last() <= t.last())
        })
        .map(|(p, s)| format!("{}/{s}", p.as_str()))
        .collect();
    let mut out: Vec<String> = icmp.then(|| "icmp".to_string()).into_iter().collect();
    out.extend(open);
    out
}

#[cfg(test)]
mod tests {
    use super::super::tests::{machine, plan_with_edges};
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
        // Each domain reaches itself entirely; no machine cells without
        // machine policies.
        assert_eq!(r["pro"].domains["pro"], s(&["all"]));
        assert!(r["pro"].machines.is_empty());
    }

    #[test]
    fn the_report_shows_isolated_domains_and_machine_cells() {
        let mut machines = vec![
            machine("pro-a", "net-pro", &["10.1.0.10"], &["fd00:1::10"]),
            machine("pro-b", "net-pro", &["10.1.0.11"], &[]),
            machine("pro-c", "net-pro", &["10.1.0.12"], &[]),
            machine("nas", "net-perso", &["10.2.0.10"], &[]),
            machine("six", "net-perso", &[], &["fd00:2::20"]),
        ];
        for (i, m) in machines.iter_mut().enumerate() {
            m.hwaddr = Some(format!("00:16:3e:00:00:{i:02x}").parse().unwrap());
        }
        let (mut plan, _) = plan_with_edges(
            &["net-anklume", "net-pro", "net-perso"],
            None,
            &machines,
            json!([
                {"from": "pro-a", "to": "pro-b", "ports": [22]},
                {"from": "pro", "to": "pro", "ports": [53], "protocol": "udp"},
                {"from": "pro-a", "to": "nas", "ports": [443]},
                {"from": "six", "to": "pro", "ports": [80]}
            ]),
            json!({"pro": {"isolate_machines": true}}),
            &[],
        )
        .unwrap();
        let mut confined = machines.clone();
        crate::model::confine_to_bridges(
            &mut confined,
            &super::super::tests::test_bridges(&["net-anklume", "net-pro", "net-perso"]),
        );
        plan.add_machines(&confined);
        let r = plan.reachability();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        // Between every two machines of pro: only the domain-wide policy.
        assert_eq!(r["pro"].domains["pro"], s(&["udp/53"]));
        assert_eq!(r["perso"].domains["perso"], s(&["all"]));
        let a = &r["pro"].machines["pro-a"];
        assert_eq!(a["pro-b"], s(&["tcp/22", "udp/53"]));
        assert_eq!(a["nas"], s(&["tcp/443"]));
        assert!(a["perso"].is_empty() && a["anklume"].is_empty());
        assert_eq!(r["pro"].machines.len(), 1, "only machines named as from");
        // A machine with only IPv6 probes with it; pro-b has no IPv6 (so
        // nothing), pro-a does, but no policy opens to it from six.
        let six = &r["perso"].machines["six"];
        assert_eq!(six["pro"], s(&["tcp/80"]));
        assert!(six["pro-b"].is_empty());
        assert!(six["nas"].is_empty(), "{six:?}");
    }
}
