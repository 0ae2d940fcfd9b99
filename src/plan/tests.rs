//! Plan tests: hand-written cases for each rule of the model, and a property
//! test that, for random domains, machines and policies, the plan (through
//! the evaluator that mirrors the rendered rules) allows exactly what an
//! independent reading of the policies allows.

use super::eval::{CtState, Forwarded, HostDst, ToHost, Verdict, L4};
use super::*;
use crate::model::{confine_to_bridges, Machine, PolicySpec, World};
use serde_json::{json, Value};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub(super) fn test_bridges(names: &[&str]) -> Vec<DomainBridge> {
    bridges(names)
}

fn bridges(names: &[&str]) -> Vec<DomainBridge> {
    let pattern = BridgePattern::new("net-").unwrap();
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let mut b = DomainBridge::new(IfName::new(n).unwrap(), &pattern).unwrap();
            b.ipv4 = Some(format!("10.{i}.0.1/24").parse().unwrap());
            b.ipv6 = Some(format!("fd00:{i}::1/64").parse().unwrap());
            b.subnets_known = true;
            b
        })
        .collect()
}

pub(super) fn machine(name: &str, bridge: &str, v4: &[&str], v6: &[&str]) -> Machine {
    let mut m = Machine::new(
        Name::new("machine", name).unwrap(),
        "lab",
        IfName::new(bridge).unwrap(),
    );
    m.ipv4 = v4.iter().map(|a| a.parse().unwrap()).collect();
    m.ipv6 = v6.iter().map(|a| a.parse().unwrap()).collect();
    m.ipv4_filtering = true;
    m.ipv6_filtering = true;
    m
}

fn plan_with(
    names: &[&str],
    admin: Option<&str>,
    machines: &[Machine],
    policies: Value,
) -> anyhow::Result<HostPlan> {
    plan_with_settings(names, admin, machines, policies, json!({}))
}

/// A plan with the `domains` option as given.
fn plan_with_settings(
    names: &[&str],
    admin: Option<&str>,
    machines: &[Machine],
    policies: Value,
    domains: Value,
) -> anyhow::Result<HostPlan> {
    plan_with_edges(names, admin, machines, policies, domains, &[]).map(|(plan, _)| plan)
}

/// A plan with the `domains` and `protected_networks` options, and its
/// warnings.
pub(super) fn plan_with_edges(
    names: &[&str],
    admin: Option<&str>,
    machines: &[Machine],
    policies: Value,
    domains: Value,
    protected: &[&str],
) -> anyhow::Result<(HostPlan, Warnings)> {
    let domains: BTreeMap<String, Value> = serde_json::from_value(domains).unwrap();
    let bridges = bridges(names);
    let specs = PolicySpec::parse_all(policies.as_array().unwrap())?;
    let mut machines = machines.to_vec();
    confine_to_bridges(&mut machines, &bridges);
    let world = World::new(&bridges, &machines);
    let policies = specs
        .iter()
        .map(|s| world.resolve(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    HostPlan::build(HostPlanInput {
        protected_networks: crate::model::parse_protected_networks(protected)?,
        domain_settings: DomainSettings::parse(&domains)?,
        table: TableName::new("anklume").unwrap(),
        pattern: BridgePattern::new("net-").unwrap(),
        bridges: &bridges,
        admin: admin.map(|a| IfName::new(a).unwrap()),
        policies,
        gateway: GatewayServices::defaults(),
        logging: None,
        capabilities: Capabilities::ALL,
    })
}

fn v4(a: &str) -> IpAddr {
    IpAddr::V4(a.parse::<Ipv4Addr>().unwrap())
}

fn v6(a: &str) -> IpAddr {
    IpAddr::V6(a.parse::<Ipv6Addr>().unwrap())
}

fn fwd<'a>(iif: &'a str, oif: &'a str, src: IpAddr, dst: IpAddr, l4: L4) -> Forwarded<'a> {
    Forwarded {
        iif,
        oif,
        src,
        dst,
        l4,
        ct: CtState::New,
    }
}

const PRO: &str = "net-pro";
const PERSO: &str = "net-perso";
const ADMIN: &str = "net-anklume";

#[test]
fn strict_isolation_allows_same_bridge_and_internet_only() {
    let plan = plan_with(&[ADMIN, PRO, PERSO], None, &[], json!([])).unwrap();
    let (a, b) = (v4("10.1.0.5"), v4("10.2.0.5"));
    assert_eq!(
        plan.forward_verdict(&fwd(PRO, PRO, a, a, L4::Icmp)),
        Verdict::Accept
    );
    assert_eq!(
        plan.forward_verdict(&fwd(PRO, PERSO, a, b, L4::Tcp(80))),
        Verdict::Drop
    );
    assert_eq!(
        plan.forward_verdict(&fwd(ADMIN, PRO, a, b, L4::Tcp(22))),
        Verdict::Drop
    );
    // Internet egress and its replies: eth0 is not a domain bridge.
    let internet = v4("198.51.100.2");
    assert_eq!(
        plan.forward_verdict(&fwd(PRO, "eth0", a, internet, L4::Tcp(443))),
        Verdict::Accept
    );
    let egress_reply = Forwarded {
        ct: CtState::Established,
        ..fwd("eth0", PRO, internet, a, L4::Tcp(40000))
    };
    assert_eq!(plan.forward_verdict(&egress_reply), Verdict::Accept);
    // A new connection from outside into a domain: dropped, unless Incus
    // published it (a network forward or NAT proxy device: DNAT).
    assert_eq!(
        plan.forward_verdict(&fwd("eth0", PRO, internet, a, L4::Tcp(22))),
        Verdict::Drop
    );
    let published = Forwarded {
        ct: CtState::NewDnat,
        ..fwd("eth0", PRO, internet, a, L4::Tcp(22))
    };
    assert_eq!(plan.forward_verdict(&published), Verdict::Accept);
    // A bridge made after the render takes no inbound either (fail closed).
    assert_eq!(
        plan.forward_verdict(&fwd("eth0", "net-new", internet, a, L4::Tcp(22))),
        Verdict::Drop
    );
    // Conntrack comes first: replies pass, invalid packets do not.
    let reply = Forwarded {
        ct: CtState::Established,
        ..fwd(PERSO, PRO, b, a, L4::Tcp(80))
    };
    assert_eq!(plan.forward_verdict(&reply), Verdict::Accept);
    let invalid = Forwarded {
        ct: CtState::Invalid,
        ..fwd(PRO, PRO, a, a, L4::Tcp(80))
    };
    assert_eq!(plan.forward_verdict(&invalid), Verdict::Drop);
    // Invalid packets elsewhere are not ours to judge.
    let elsewhere = Forwarded {
        ct: CtState::Invalid,
        ..fwd("docker0", "eth0", a, internet, L4::Tcp(80))
    };
    assert_eq!(plan.forward_verdict(&elsewhere), Verdict::Accept);
}

#[test]
fn bridges_created_after_the_render_fail_closed_but_keep_their_own_traffic() {
    let plan = plan_with(&[PRO, PERSO], None, &[], json!([])).unwrap();
    let (a, n) = (v4("10.1.0.5"), v4("10.9.0.5"));
    assert_eq!(
        plan.forward_verdict(&fwd(PRO, "net-late", a, n, L4::Icmp)),
        Verdict::Drop
    );
    assert_eq!(
        plan.forward_verdict(&fwd("net-late", PRO, n, a, L4::Icmp)),
        Verdict::Drop
    );
    assert_eq!(
        plan.forward_verdict(&fwd("net-late", "net-late", n, n, L4::Icmp)),
        Verdict::Accept
    );
    assert_eq!(
        plan.forward_verdict(&fwd("net-late", "eth0", n, v4("198.51.100.2"), L4::Icmp)),
        Verdict::Accept
    );
}

#[test]
fn admin_opens_towards_every_domain_and_nothing_back() {
    let plan = plan_with(&[ADMIN, PRO, PERSO], Some(ADMIN), &[], json!([])).unwrap();
    let (a, p) = (v4("10.0.0.5"), v4("10.1.0.5"));
    assert_eq!(
        plan.forward_verdict(&fwd(ADMIN, PRO, a, p, L4::Tcp(22))),
        Verdict::Accept
    );
    assert_eq!(
        plan.forward_verdict(&fwd(PRO, ADMIN, p, a, L4::Tcp(22))),
        Verdict::Drop
    );
    let reply = Forwarded {
        ct: CtState::Established,
        ..fwd(PRO, ADMIN, p, a, L4::Tcp(40000))
    };
    assert_eq!(plan.forward_verdict(&reply), Verdict::Accept);
}

#[test]
fn a_network_policy_opens_inbound_to_its_domain_only() {
    let plan = plan_with(
        &[ADMIN, PRO, PERSO],
        None,
        &[],
        json!([
            {"from": "192.0.2.0/24", "to": "pro", "ports": [22]},
            {"from": "2001:db8::/64", "to": "pro", "ports": "all"},
            {"description": "Covers every domain subnet", "from": "10.0.0.0/8", "to": "perso", "ports": [80]},
            {"from": "pro", "to": "198.51.100.0/24", "ports": [443]}
        ]),
    )
    .unwrap();
    let (pro, perso) = (v4("10.1.0.5"), v4("10.2.0.5"));
    let cases = [
        (
            "eth0",
            PRO,
            v4("192.0.2.9"),
            pro,
            L4::Tcp(22),
            Verdict::Accept,
        ),
        (
            "eth0",
            PRO,
            v4("192.0.2.9"),
            pro,
            L4::Tcp(23),
            Verdict::Drop,
        ),
        (
            "eth0",
            PRO,
            v4("192.0.3.9"),
            pro,
            L4::Tcp(22),
            Verdict::Drop,
        ),
        (
            "eth0",
            PERSO,
            v4("192.0.2.9"),
            perso,
            L4::Tcp(22),
            Verdict::Drop,
        ),
        (
            "eth0",
            PRO,
            v6("2001:db8::9"),
            v6("fd00:1::5"),
            L4::Icmp,
            Verdict::Accept,
        ),
        (
            "eth0",
            PRO,
            v6("2001:db8:1::9"),
            v6("fd00:1::5"),
            L4::Icmp,
            Verdict::Drop,
        ),
        (
            "eth0",
            PERSO,
            v4("10.9.0.9"),
            perso,
            L4::Tcp(80),
            Verdict::Accept,
        ),
        // The network covers pro's subnet: it never opens pro -> perso.
        (PRO, PERSO, pro, perso, L4::Tcp(80), Verdict::Drop),
    ];
    for (iif, oif, src, dst, l4, want) in cases {
        assert_eq!(
            plan.forward_verdict(&fwd(iif, oif, src, dst, l4)),
            want,
            "{iif} -> {oif} {src} -> {dst} {l4:?}"
        );
    }
    // Domain -> network is egress, already open: the policy says so.
    assert!(plan.policies[3]
        .note
        .as_deref()
        .unwrap()
        .contains("already"));
}

#[test]
fn restricted_internet_keeps_only_its_ports_and_policies_to_networks() {
    let plan = plan_with_settings(
        &[ADMIN, PRO, PERSO],
        None,
        &[],
        json!([
            {"from": "pro", "to": "198.51.100.0/24", "ports": [8080]},
            {"from": "perso", "to": "2001:db8::/64", "ports": "all"},
            {"from": "anklume", "to": "198.51.100.0/24", "ports": [8080]}
        ]),
        json!({"pro": {"egress": [{"protocol": "udp", "port": 53}, {"protocol": "tcp", "port": "443-444"}]},
               "perso": {"internet": false}}),
    )
    .unwrap();
    let (pro, perso, anklume) = (v4("10.1.0.5"), v4("10.2.0.5"), v4("10.0.0.5"));
    let up = v4("198.51.100.2");
    let cases = [
        (PRO, up, pro, L4::Tcp(443), Verdict::Accept),
        (PRO, up, pro, L4::Udp(53), Verdict::Accept),
        (PRO, up, pro, L4::Tcp(80), Verdict::Drop),
        (PRO, up, pro, L4::Icmp, Verdict::Drop),
        (PRO, up, pro, L4::Tcp(8080), Verdict::Accept),
        (PRO, v4("192.0.2.1"), pro, L4::Tcp(8080), Verdict::Drop),
        (PERSO, up, perso, L4::Tcp(443), Verdict::Drop),
        (
            PERSO,
            v6("2001:db8::1"),
            v6("fd00:2::5"),
            L4::Tcp(22),
            Verdict::Accept,
        ),
        (ADMIN, up, anklume, L4::Tcp(80), Verdict::Accept),
    ];
    for (iif, dst, src, l4, want) in cases {
        assert_eq!(
            plan.forward_verdict(&fwd(iif, "eth0", src, dst, l4)),
            want,
            "{iif} {src} -> {dst} {l4:?}"
        );
    }
    // Between domains and from outside nothing changes; replies still pass.
    assert_eq!(
        plan.forward_verdict(&fwd(PERSO, PERSO, perso, perso, L4::Tcp(80))),
        Verdict::Accept
    );
    let reply = Forwarded {
        ct: CtState::Established,
        ..fwd(PERSO, "eth0", perso, up, L4::Tcp(80))
    };
    assert_eq!(plan.forward_verdict(&reply), Verdict::Accept);
    // A policy to a network from an unrestricted domain opens nothing.
    assert!(plan.policies[2].note.is_some() && plan.policies[0].note.is_none());
    let err = plan_with_settings(
        &[PRO],
        None,
        &[],
        json!([]),
        json!({"ai": {"internet": false}}),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("domains.ai: not a known domain"));
}

#[test]
fn shared_egress_lists_keep_each_domains_verdicts() {
    // a and b share a list (one chain), c has its own (egress_ports), d
    // shares a's list and has a policy to a network (its chain, then the
    // list's), e is closed (a plain drop in the map).
    let list = json!([{"protocol": "udp", "port": 53}, {"protocol": "tcp", "port": "443-444"}]);
    let (plan, _) = plan_with_edges(
        &["net-a", "net-b", "net-c", "net-d", "net-e", "net-f"],
        None,
        &[],
        json!([{"from": "d", "to": "198.51.100.0/24", "ports": [22]}]),
        json!({"a": {"egress": list}, "b": {"egress": list}, "d": {"egress": list},
               "c": {"egress": [{"protocol": "tcp", "port": 22}]}, "e": {"internet": false}}),
        &[],
    )
    .unwrap();
    assert_eq!(plan.egress_lists.len(), 1, "{:?}", plan.egress_lists);
    let chains: Vec<String> = plan.chains().into_iter().map(|c| c.name).collect();
    assert!(chains.contains(&"egress-list/0".to_string()), "{chains:?}");
    assert!(!chains
        .iter()
        .any(|c| c == "egress/net-a" || c == "egress/net-c"));
    let (src, up, net) = (v4("10.9.0.5"), v4("192.0.2.7"), v4("198.51.100.9"));
    let cases = [
        ("net-a", up, L4::Tcp(444), Verdict::Accept),
        ("net-b", up, L4::Udp(53), Verdict::Accept),
        ("net-b", up, L4::Tcp(22), Verdict::Drop),
        ("net-c", up, L4::Tcp(22), Verdict::Accept),
        ("net-c", up, L4::Tcp(443), Verdict::Drop),
        ("net-d", net, L4::Tcp(22), Verdict::Accept),
        ("net-d", up, L4::Tcp(22), Verdict::Drop),
        ("net-d", up, L4::Tcp(443), Verdict::Accept),
        ("net-e", up, L4::Udp(53), Verdict::Drop),
        ("net-f", up, L4::Tcp(22), Verdict::Accept),
    ];
    for (iif, dst, l4, want) in cases {
        assert_eq!(
            plan.forward_verdict(&fwd(iif, "eth0", src, dst, l4)),
            want,
            "{iif} -> {dst} {l4:?}"
        );
    }
}

#[test]
fn protected_networks_are_closed_to_every_domain_but_through_a_policy() {
    let (plan, warnings) = plan_with_edges(
        &[ADMIN, PRO, PERSO],
        Some(ADMIN),
        &[],
        json!([
            {"from": "pro", "to": "198.18.0.10/32", "ports": [22]},
            {"from": "perso", "to": "0.0.0.0/0", "ports": [443]}
        ]),
        json!({}),
        &[
            "198.18.0.0/24",
            "198.18.0.0/25",
            "2001:db8:252::/64",
            "10.2.0.0/16",
        ],
    )
    .unwrap();
    assert_eq!(
        plan.protected_v4.len(),
        2,
        "aggregated: {:?}",
        plan.protected_v4
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("10.2.0.0/16") && w.contains("perso")),
        "{warnings:?}"
    );
    let (pro, perso, anklume) = (v4("10.1.0.5"), v4("10.2.0.5"), v4("10.0.0.5"));
    let lan = v4("198.18.0.10");
    let cases = [
        (PRO, pro, lan, L4::Tcp(22), Verdict::Accept),
        (PRO, pro, lan, L4::Tcp(23), Verdict::Drop),
        (PRO, pro, v4("198.18.0.11"), L4::Tcp(22), Verdict::Drop),
        (PRO, pro, v4("198.51.100.2"), L4::Tcp(23), Verdict::Accept),
        (ADMIN, anklume, lan, L4::Tcp(22), Verdict::Drop),
        (PERSO, perso, lan, L4::Tcp(443), Verdict::Accept),
        (PERSO, perso, lan, L4::Icmp, Verdict::Drop),
        (
            PRO,
            v6("fd00:1::5"),
            v6("2001:db8:252::2"),
            L4::Icmp,
            Verdict::Drop,
        ),
        (
            PRO,
            v6("fd00:1::5"),
            v6("2001:db8:251::2"),
            L4::Icmp,
            Verdict::Accept,
        ),
    ];
    for (iif, src, dst, l4, want) in cases {
        assert_eq!(
            plan.forward_verdict(&fwd(iif, "eth0", src, dst, l4)),
            want,
            "{iif} {src} -> {dst} {l4:?}"
        );
    }
    // A protected network over a domain's subnet never cuts that domain's
    // own traffic nor changes isolation between domains.
    assert_eq!(
        plan.forward_verdict(&fwd(PERSO, PERSO, perso, perso, L4::Tcp(80))),
        Verdict::Accept
    );
    assert_eq!(
        plan.forward_verdict(&fwd(ADMIN, PERSO, anklume, perso, L4::Tcp(80))),
        Verdict::Accept
    );
}

#[test]
fn network_ends_are_refused_where_they_would_be_misread() {
    let m = machine("nas", PERSO, &["10.2.0.10"], &[]);
    for (from, to, says) in [
        ("192.0.2.0/24", "nas", "not supported yet"),
        ("192.0.2.0/24", "host", "with the host"),
        ("192.0.2.0/24", "198.51.100.0/24", "both networks"),
        ("192.0.2.1/24", "pro", "write 192.0.2.0/24"),
        ("192.0.2.0/33", "pro", "not a CIDR"),
    ] {
        let err = plan_with(
            &[ADMIN, PRO, PERSO],
            None,
            std::slice::from_ref(&m),
            json!([{"from": from, "to": to, "ports": [22]}]),
        )
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains(says) && msg.contains("#1"),
            "{from} -> {to}: {msg}"
        );
    }
}

#[test]
fn unknown_admin_bridge_is_refused() {
    let err = plan_with(&[PRO], Some("net-nope"), &[], json!([]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("admin_bridge net-nope"), "{err}");
}

#[test]
fn domain_policy_opens_exactly_its_ports_one_way() {
    let plan = plan_with(
        &[PRO, PERSO],
        None,
        &[],
        json!([{"from": "pro", "to": "perso", "ports": [8080, "9000-9010"], "protocol": "tcp"}]),
    )
    .unwrap();
    let (a, b) = (v4("10.0.0.5"), v4("10.1.0.5"));
    for (l4, expected) in [
        (L4::Tcp(8080), Verdict::Accept),
        (L4::Tcp(8081), Verdict::Drop),
        (L4::Tcp(9000), Verdict::Accept),
        (L4::Tcp(9010), Verdict::Accept),
        (L4::Tcp(9011), Verdict::Drop),
        (L4::Udp(8080), Verdict::Drop),
        (L4::Icmp, Verdict::Drop),
    ] {
        assert_eq!(
            plan.forward_verdict(&fwd(PRO, PERSO, a, b, l4)),
            expected,
            "{l4:?}"
        );
        assert_eq!(
            plan.forward_verdict(&fwd(PRO, PERSO, v6("fd00::5"), v6("fd00:1::5"), l4)),
            expected,
            "v6 {l4:?}"
        );
    }
    assert_eq!(
        plan.forward_verdict(&fwd(PERSO, PRO, b, a, L4::Tcp(8080))),
        Verdict::Drop
    );
}

#[test]
fn machine_policy_never_widens_to_the_bridge_nor_to_a_missing_family() {
    let machines = [
        machine("nas", PERSO, &["10.1.0.10"], &[]),
        machine("desk", PERSO, &["10.1.0.11"], &["fd00:1::11"]),
        machine("backup", PRO, &["10.0.0.20"], &["fd00::20"]),
    ];
    let plan = plan_with(
        &[PRO, PERSO],
        None,
        &machines,
        json!([{"from": "backup", "to": "nas", "ports": [22]}]),
    )
    .unwrap();
    let ok = fwd(PRO, PERSO, v4("10.0.0.20"), v4("10.1.0.10"), L4::Tcp(22));
    assert_eq!(plan.forward_verdict(&ok), Verdict::Accept);
    // The neighbour on the same bridge stays closed.
    let neighbour = fwd(PRO, PERSO, v4("10.0.0.20"), v4("10.1.0.11"), L4::Tcp(22));
    assert_eq!(plan.forward_verdict(&neighbour), Verdict::Drop);
    // Another source on the backup machine's bridge stays closed.
    let other_src = fwd(PRO, PERSO, v4("10.0.0.21"), v4("10.1.0.10"), L4::Tcp(22));
    assert_eq!(plan.forward_verdict(&other_src), Verdict::Drop);
    // nas has no IPv6: nothing at all is open over IPv6.
    let pair = &plan.pairs[&(IfName::new(PRO).unwrap(), IfName::new(PERSO).unwrap())];
    assert_eq!(pair.v6, AddrExceptions::default(), "{pair:?}");
    let six = fwd(PRO, PERSO, v6("fd00::20"), v6("fd00:1::11"), L4::Tcp(22));
    assert_eq!(plan.forward_verdict(&six), Verdict::Drop);
}

#[test]
fn host_policies_open_the_host_input_exactly() {
    let plan = plan_with(
        &[PRO, PERSO],
        None,
        &[],
        json!([{"from": "pro", "to": "host", "ports": [22]}]),
    )
    .unwrap();
    let to_host = |iif, src, dst, l4| ToHost {
        iif,
        src,
        dst,
        l4,
        ct: CtState::New,
    };
    let (s4, s6) = (v4("10.1.0.5"), v6("fd00:1::5"));
    use HostDst::*;
    for (iif, src, dst, l4, expected) in [
        // The own gateway: what a bridge needs, both families.
        (PERSO, s4, Gateway, L4::Udp(53), Verdict::Accept),
        (PERSO, s4, Gateway, L4::Tcp(53), Verdict::Accept),
        (PERSO, s4, Broadcast, L4::Udp(67), Verdict::Accept),
        (PERSO, s6, Multicast, L4::Udp(547), Verdict::Accept),
        (PERSO, s4, Gateway, L4::Icmp, Verdict::Accept),
        (PERSO, s6, Gateway, L4::Icmp, Verdict::Accept),
        (PERSO, s6, Multicast, L4::Nd, Verdict::Accept),
        (PERSO, s6, Gateway, L4::Nd, Verdict::Accept),
        // ... and nothing else on it, on any port a host service listens.
        (PERSO, s4, Gateway, L4::Tcp(2223), Verdict::Drop),
        (PERSO, s6, Gateway, L4::Tcp(22), Verdict::Drop),
        (PERSO, s4, Gateway, L4::Udp(123), Verdict::Drop),
        (PERSO, s4, Broadcast, L4::Udp(137), Verdict::Drop),
        // The host's addresses elsewhere: not even the gateway services.
        (PERSO, s4, Elsewhere, L4::Udp(53), Verdict::Drop),
        (PERSO, s4, Elsewhere, L4::Icmp, Verdict::Drop),
        (PERSO, s4, Elsewhere, L4::Tcp(22), Verdict::Drop),
        // The policy opens its port on every host address, for pro only.
        (PRO, s4, Elsewhere, L4::Tcp(22), Verdict::Accept),
        (PRO, s4, Gateway, L4::Tcp(22), Verdict::Accept),
        (PRO, s6, Gateway, L4::Tcp(22), Verdict::Accept),
        (PRO, s4, Gateway, L4::Tcp(23), Verdict::Drop),
        // A bridge created after the render: gateway services only.
        ("net-late", s4, Gateway, L4::Udp(67), Verdict::Accept),
        ("net-late", s4, Gateway, L4::Tcp(2223), Verdict::Drop),
        // Not a domain: untouched.
        ("eth0", s4, Elsewhere, L4::Tcp(23), Verdict::Accept),
    ] {
        let packet = to_host(iif, src, dst, l4);
        assert_eq!(plan.input_verdict(&packet), expected, "{packet:?}");
    }
}

#[test]
fn gateway_services_are_the_operators_list() {
    let bridges = bridges(&[PRO]);
    let (plan, _) = HostPlan::build(HostPlanInput {
        protected_networks: Vec::new(),
        domain_settings: Default::default(),
        table: TableName::new("anklume").unwrap(),
        pattern: BridgePattern::new("net-").unwrap(),
        bridges: &bridges,
        admin: None,
        policies: vec![],
        gateway: GatewayServices::parse(&["udp/123", "udp/67"]).unwrap(),
        logging: None,
        capabilities: Capabilities::ALL,
    })
    .unwrap();
    let packet = |l4| ToHost {
        iif: PRO,
        src: v4("10.0.0.5"),
        dst: HostDst::Gateway,
        l4,
        ct: CtState::New,
    };
    assert_eq!(plan.input_verdict(&packet(L4::Udp(123))), Verdict::Accept);
    assert_eq!(plan.input_verdict(&packet(L4::Udp(53))), Verdict::Drop);
    assert_eq!(plan.input_verdict(&packet(L4::Icmp)), Verdict::Drop);
}

#[test]
fn a_machine_reporting_another_domains_address_does_not_widen_a_policy() {
    // The reproduction: nas on perso also reports an address of ai.
    let machines = [
        machine("nas", "net-perso", &["10.1.0.7", "10.2.0.7"], &[]),
        machine("backup", PRO, &["10.0.0.20"], &[]),
    ];
    let plan = plan_with(
        &[PRO, PERSO, "net-ai"],
        None,
        &machines,
        json!([{"from": "backup", "to": "nas", "ports": [22]}]),
    )
    .unwrap();
    let src = v4("10.0.0.20");
    assert_eq!(
        plan.forward_verdict(&fwd(PRO, PERSO, src, v4("10.1.0.7"), L4::Tcp(22))),
        Verdict::Accept
    );
    for (oif, dst) in [
        ("net-ai", "10.2.0.7"),
        (PERSO, "10.2.0.7"),
        ("net-ai", "10.1.0.7"),
    ] {
        assert_eq!(
            plan.forward_verdict(&fwd(PRO, oif, src, v4(dst), L4::Tcp(22))),
            Verdict::Drop,
            "{oif} {dst}"
        );
    }
    let warnings = &plan.policies[0].policy.warnings;
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("10.2.0.7") && w.contains("ignored")),
        "{warnings:?}"
    );
}

#[test]
fn policy_errors_name_the_entry() {
    let err = plan_with(
        &[PRO, PERSO],
        None,
        &[],
        json!([{"from": "pro", "to": "nowhere", "ports": [1]}]),
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("network policy #1") && msg.contains("\"nowhere\" is not a known domain"),
        "{msg}"
    );
    let machines = [machine("ghost", PRO, &[], &[])];
    let err = plan_with(
        &[PRO, PERSO],
        None,
        &machines,
        json!([{"from": "ghost", "to": "perso", "ports": "all"}]),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("has no address"), "{err:#}");
    // Only an address of another domain: ignored, so no address, and said so.
    let machines = [machine("squatter", PRO, &["10.1.0.5"], &[])];
    let err = plan_with(
        &[PRO, PERSO],
        None,
        &machines,
        json!([{"from": "squatter", "to": "perso", "ports": "all"}]),
    )
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("only reports 10.1.0.5, outside the subnets"),
        "{err:#}"
    );
}

#[test]
fn overlapping_subnets_are_refused() {
    let mut b = bridges(&[PRO, PERSO]);
    b[1].ipv4 = Some("10.0.0.128/25".parse().unwrap());
    let err = HostPlan::build(HostPlanInput {
        protected_networks: Vec::new(),
        domain_settings: Default::default(),
        table: TableName::new("anklume").unwrap(),
        pattern: BridgePattern::new("net-").unwrap(),
        bridges: &b,
        admin: None,
        policies: vec![],
        gateway: GatewayServices::defaults(),
        logging: None,
        capabilities: Capabilities::ALL,
    })
    .unwrap_err();
    assert!(err.to_string().contains("overlapping IPv4"), "{err}");
}

#[test]
fn isolated_machines_meet_only_through_policies_and_replies_cannot_open_back() {
    use super::eval::{Frame, FrameL4, Payload};
    use crate::model::MacAddr;
    let mac = |b: u8| MacAddr([0, 0x16, 0x3e, 0, 1, b]);
    let mut machines = vec![
        machine("pro-a", PRO, &["10.1.0.10"], &["fd00:1::10"]),
        machine("pro-b", PRO, &["10.1.0.11"], &["fd00:1::11"]),
        machine("pro-c", PRO, &["10.1.0.12"], &[]),
        machine("new", PRO, &["10.1.0.13"], &[]),
    ];
    for (i, m) in machines.iter_mut().take(3).enumerate() {
        m.hwaddr = Some(mac(i as u8));
    }
    machines[1].mac_filtering = true;
    let (mut plan, _) = plan_with_edges(
        &[ADMIN, PRO, PERSO],
        None,
        &machines,
        json!([{"from": "pro-a", "to": "pro-b", "ports": [22]}]),
        json!({"pro": {"isolate_machines": true}}),
        &[],
    )
    .unwrap();
    let note = plan.policies[0].note.clone().unwrap();
    assert!(note.contains("isolates its machines"), "{note}");
    let mut confined = machines.clone();
    confine_to_bridges(&mut confined, &bridges(&[ADMIN, PRO, PERSO]));
    let warnings = plan.add_machines(&confined);
    assert!(warnings
        .iter()
        .any(|w| w.contains("\"pro-a\"") && w.contains("mac_filtering")));
    assert!(!warnings.iter().any(|w| w.contains("\"pro-b\"")));
    assert!(warnings
        .iter()
        .any(|w| w.contains("\"new\"") && w.contains("no known MAC")));
    let eval = plan.evaluator();
    let frame = |s: u8, d: u8, src: &str, dst: &str, l4| Frame {
        src_mac: mac(s),
        dst_mac: mac(d),
        payload: Payload::Ip {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            l4,
        },
    };
    let syn = |dport| FrameL4::Tcp {
        sport: 40000,
        dport,
        bare_syn: true,
    };
    let (a, b, c) = ("10.1.0.10", "10.1.0.11", "10.1.0.12");
    // The policy port, over both families; not its neighbour, not pro-c.
    assert_eq!(eval.bridge(&frame(0, 1, a, b, syn(22))), Verdict::Accept);
    assert_eq!(
        eval.bridge(&frame(0, 1, "fd00:1::10", "fd00:1::11", syn(22))),
        Verdict::Accept
    );
    assert_eq!(eval.bridge(&frame(0, 1, a, b, syn(23))), Verdict::Drop);
    assert_eq!(eval.bridge(&frame(0, 2, a, c, syn(22))), Verdict::Drop);
    // Replies pass statelessly; a bare SYN from the service port does not.
    let reply = |bare_syn| FrameL4::Tcp {
        sport: 22,
        dport: 40000,
        bare_syn,
    };
    assert_eq!(
        eval.bridge(&frame(1, 0, b, a, reply(false))),
        Verdict::Accept
    );
    assert_eq!(eval.bridge(&frame(1, 0, b, a, reply(true))), Verdict::Drop);
    assert_eq!(
        eval.bridge(&frame(1, 0, b, a, FrameL4::EchoReply)),
        Verdict::Drop
    );
    // Link-local between known machines, multicast from one: dropped; ARP
    // and ND pass; a machine unknown at render time is caught by its subnet
    // address, not by its MAC.
    let ll = frame(0, 1, "fe80::1", "fe80::2", FrameL4::EchoRequest);
    assert_eq!(eval.bridge(&ll), Verdict::Drop);
    let group = Frame {
        dst_mac: MacAddr([0x33, 0x33, 0, 0, 0, 1]),
        ..ll
    };
    assert_eq!(eval.bridge(&group), Verdict::Drop);
    let nd = frame(0, 1, "fe80::1", "fe80::2", FrameL4::Nd);
    assert_eq!(eval.bridge(&nd), Verdict::Accept);
    let arp = Frame {
        payload: Payload::Arp,
        ..ll
    };
    assert_eq!(eval.bridge(&arp), Verdict::Accept);
    let unknown = Frame {
        src_mac: MacAddr([2, 0, 0, 0, 0, 9]),
        ..frame(9, 1, "10.1.0.13", b, syn(80))
    };
    assert_eq!(eval.bridge(&unknown), Verdict::Drop);
    let unknown_ll = Frame {
        src_mac: MacAddr([2, 0, 0, 0, 0, 9]),
        ..ll
    };
    assert_eq!(
        eval.bridge(&unknown_ll),
        Verdict::Accept,
        "the residual limit, as documented"
    );
    // Another bridge's frames are not ours to judge, nor are perso's.
    let other = Frame {
        src_mac: MacAddr([2, 0, 0, 0, 0, 7]),
        dst_mac: MacAddr([2, 0, 0, 0, 0, 8]),
        ..frame(0, 0, "10.2.0.5", "10.2.0.6", syn(23))
    };
    assert_eq!(eval.bridge(&other), Verdict::Accept);
    // Routed back onto the bridge through the gateway: dropped by the inet
    // table; the same packet bridged to pro-b's MAC with br_netfilter on is
    // the bridge table's business (accepted by the pairs map).
    let routed = fwd(PRO, PRO, v4(a), v4(b), L4::Tcp(23));
    assert_eq!(eval.forward(&routed), Verdict::Drop);
    assert_eq!(eval.forward_bridged(&routed, mac(1)), Verdict::Accept);
    // Cross-domain traffic of pro's machines is the inet table's as before.
    assert_eq!(
        eval.forward(&fwd(PRO, "eth0", v4(a), v4("198.51.100.2"), L4::Tcp(443))),
        Verdict::Accept
    );
}

#[test]
fn missing_log_support_drops_logging_with_a_warning() {
    let b = bridges(&[PRO]);
    let (plan, warnings) = HostPlan::build(HostPlanInput {
        protected_networks: Vec::new(),
        domain_settings: Default::default(),
        table: TableName::new("anklume").unwrap(),
        pattern: BridgePattern::new("net-").unwrap(),
        bridges: &b,
        admin: None,
        policies: vec![],
        gateway: GatewayServices::defaults(),
        logging: Some(LogSettings {
            prefix: "ANKLUME".into(),
            rate: "10/minute".into(),
        }),
        capabilities: Capabilities {
            log: false,
            ..Capabilities::ALL
        },
    })
    .unwrap();
    assert_eq!(plan.logging, None);
    assert!(warnings[0].contains("`log`"), "{warnings:?}");
}

/// Random worlds: the plan against an independent reading of the policies.
mod properties {
    use super::super::eval::{Frame, FrameL4, Payload};
    use super::*;
    use crate::model::{Endpoint, MacAddr, ResolvedPolicy};
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A tiny deterministic generator, so one proptest seed is one world.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    /// A machine is what the generator put on its own bridge, whatever
    /// else it reports: the oracle reads that, not the resolved policy.
    type Truth = BTreeMap<String, (String, Vec<IpAddr>)>;

    fn endpoint_matches(truth: &Truth, e: &Endpoint, iif: &str, src: IpAddr) -> bool {
        match e {
            Endpoint::Host => false,
            // A network end matches packets from outside the domains only
            // (`iif` is not a domain bridge), whatever its addresses cover.
            Endpoint::Network { cidr } => !iif.starts_with("net-") && cidr.contains(&src),
            Endpoint::Domain { bridge, .. } => bridge.as_str() == iif,
            Endpoint::Machine { name, .. } => {
                let (bridge, addrs) = &truth[name.as_str()];
                bridge == iif && addrs.contains(&src)
            }
        }
    }

    fn traffic_matches(t: &Traffic, l4: L4) -> bool {
        match (t, l4) {
            (Traffic::All, _) => true,
            (Traffic::Ports(Protocol::Tcp, spans), L4::Tcp(p))
            | (Traffic::Ports(Protocol::Udp, spans), L4::Udp(p)) => {
                spans.iter().any(|s| s.contains(p))
            }
            _ => false,
        }
    }

    /// Whether some policy, read in its direction (or both when it is
    /// bidirectional), admits the packet according to `admits(from, to, traffic)`.
    fn some_policy(
        policies: &[ResolvedPolicy],
        admits: impl Fn(&Endpoint, &Endpoint, &Traffic) -> bool,
    ) -> bool {
        policies.iter().any(|pol| {
            admits(&pol.from, &pol.to, &pol.traffic)
                || (pol.bidirectional && admits(&pol.to, &pol.from, &pol.traffic))
        })
    }

    fn verdict(allowed: bool) -> Verdict {
        if allowed {
            Verdict::Accept
        } else {
            Verdict::Drop
        }
    }

    /// The policies read directly: is this new forwarded packet allowed?
    #[allow(clippy::too_many_arguments)]
    fn oracle_forward(
        truth: &Truth,
        policies: &[ResolvedPolicy],
        admin: Option<&str>,
        known: &[&str],
        settings: &BTreeMap<String, Internet>,
        protected: &[ipnet::IpNet],
        isolated: &BTreeSet<String>,
        p: &Forwarded<'_>,
    ) -> Verdict {
        let known_if = |i: &str| known.contains(&i);
        let domainish = |i: &str| i.starts_with("net-");
        let to_network = |from: &Endpoint, to: &Endpoint, traffic: &Traffic| {
            matches!(to, Endpoint::Network { cidr } if cidr.contains(&p.dst))
                && matches!(from, Endpoint::Domain { bridge, .. } if bridge.as_str() == p.iif)
                && traffic_matches(traffic, p.l4)
        };
        if known_if(p.iif) && !domainish(p.oif) && protected.iter().any(|n| n.contains(&p.dst)) {
            // Protected: only a policy from the domain to a network opens it.
            return verdict(some_policy(policies, to_network));
        }
        if known_if(p.iif) && !domainish(p.oif) {
            // Egress: as the domain's internet setting says, plus policies
            // from the domain to a network when it is restricted.
            let by_setting = match settings.get(p.iif) {
                None | Some(Internet::Open) => return Verdict::Accept,
                Some(Internet::Closed) => false,
                Some(Internet::Ports(ports)) => ports.iter().any(|(proto, span)| {
                    matches!((proto, p.l4), (Protocol::Tcp, L4::Tcp(x)) | (Protocol::Udp, L4::Udp(x)) if span.contains(x))
                }),
            };
            return verdict(by_setting || some_policy(policies, to_network));
        }
        if !domainish(p.iif) && domainish(p.oif) {
            // Inbound: published by Incus (DNAT), or opened by a policy
            // from a network into the destination's domain.
            return verdict(
                p.ct == CtState::NewDnat
                    || some_policy(policies, |from, to, traffic| {
                        matches!(from, Endpoint::Network { .. })
                            && endpoint_matches(truth, from, p.iif, p.src)
                            && endpoint_matches(truth, to, p.oif, p.dst)
                            && traffic_matches(traffic, p.l4)
                    }),
            );
        }
        if p.iif == p.oif && isolated.contains(p.iif) {
            // Routed back onto the bridge of a domain that isolates its
            // machines (this evaluator call is a routed packet): dropped when
            // both ends are in its subnet (10.<i>.0.0/24, fd00:<i>::/64).
            let i: u16 = p.iif.trim_start_matches("net-d").parse().unwrap();
            let inside = |a: IpAddr| match a {
                IpAddr::V4(a) => a.octets()[0] == 10 && u16::from(a.octets()[1]) == i,
                IpAddr::V6(a) => a.segments()[0] == 0xfd00 && a.segments()[1] == i,
            };
            if inside(p.src) && inside(p.dst) {
                return Verdict::Drop;
            }
        }
        if !(known_if(p.iif) && known_if(p.oif)) || p.iif == p.oif || admin == Some(p.iif) {
            return Verdict::Accept;
        }
        verdict(some_policy(policies, |from, to, traffic| {
            endpoint_matches(truth, from, p.iif, p.src)
                && endpoint_matches(truth, to, p.oif, p.dst)
                && traffic_matches(traffic, p.l4)
        }))
    }

    /// The host input read directly: the default gateway services on the
    /// own gateway, link ICMPv6, and policies to the host.
    fn oracle_host(truth: &Truth, policies: &[ResolvedPolicy], p: &ToHost<'_>) -> Verdict {
        use HostDst::*;
        let own_link = matches!(p.dst, Gateway | Broadcast | Multicast);
        let service = matches!(p.l4, L4::Udp(53 | 67 | 547) | L4::Tcp(53));
        let echo = p.dst == Gateway && p.l4 == L4::Icmp;
        let nd = matches!(p.dst, Gateway | Multicast) && p.l4 == L4::Nd && p.src.is_ipv6();
        let policy = some_policy(policies, |from, to, traffic| {
            *to == Endpoint::Host
                && endpoint_matches(truth, from, p.iif, p.src)
                && traffic_matches(traffic, p.l4)
        });
        verdict((own_link && service) || echo || nd || policy)
    }

    fn random_ports(rng: &mut Rng) -> Value {
        if rng.chance(20) {
            return json!("all");
        }
        let n = 1 + rng.below(3);
        let items: Vec<Value> = (0..n)
            .map(|_| {
                let first = 1 + rng.below(40) as u16 * 10;
                if rng.chance(30) {
                    json!(format!("{}-{}", first, first + rng.below(15) as u16))
                } else {
                    json!(first)
                }
            })
            .collect();
        json!(items)
    }

    /// What happened to the generated worlds, so a run that compared
    /// nothing cannot pass unnoticed.
    #[derive(Default)]
    struct Tally {
        compared: AtomicUsize,
        refused: AtomicUsize,
    }

    static TALLY: Tally = Tally {
        compared: AtomicUsize::new(0),
        refused: AtomicUsize::new(0),
    };

    fn check_world(seed: u64) {
        let mut rng = Rng(seed | 1);
        let n_domains = 2 + rng.below(3) as usize;
        let names: Vec<String> = (0..n_domains).map(|i| format!("net-d{i}")).collect();
        let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut machines = Vec::new();
        let mut truth = Truth::new();
        for (i, bridge) in names.iter().enumerate() {
            for m in 0..rng.below(3) {
                let has_v4 = rng.chance(85);
                let has_v6 = rng.chance(60) || !has_v4;
                let a4 = format!("10.{i}.0.{}", 10 + m);
                let a6 = format!("fd00:{i}::{}", 10 + m);
                // Sometimes it also reports an address of another domain
                // (anyone root inside it can add one): it must never count.
                let other = (i + 1 + rng.below(n_domains as u64 - 1) as usize) % n_domains;
                let f4 = format!("10.{other}.0.{}", 50 + m);
                let f6 = format!("fd00:{other}::{}", 50 + m);
                let foreign = rng.chance(30);
                let mut v4: Vec<&str> = if has_v4 { vec![&a4] } else { vec![] };
                let mut v6: Vec<&str> = if has_v6 { vec![&a6] } else { vec![] };
                if foreign {
                    v4.push(&f4);
                    v6.push(&f6);
                }
                let name = format!("m{i}x{m}");
                let own: Vec<IpAddr> = v4
                    .iter()
                    .chain(&v6)
                    .filter(|a| {
                        a.starts_with(&format!("10.{i}.")) || a.starts_with(&format!("fd00:{i}:"))
                    })
                    .map(|a| a.parse().unwrap())
                    .collect();
                truth.insert(name.clone(), (bridge.clone(), own));
                machines.push(machine(&name, bridge, &v4, &v6));
            }
        }
        let endpoint_names: Vec<String> = (0..n_domains)
            .map(|i| format!("d{i}"))
            .chain(machines.iter().map(|m| m.name.to_string()))
            .chain(["host".to_string()])
            .collect();
        // Networks outside the domains; 10.0.0.0/8 and fd00::/8 also cover
        // every domain's subnet, which must never open anything between
        // domains.
        let networks = [
            "192.0.2.0/24",
            "198.18.0.0/24",
            "198.18.0.7/32",
            "192.0.2.7/32",
            "2001:db8::/64",
            "10.0.0.0/8",
            "fd00::/8",
        ];
        let mut policies = Vec::new();
        for _ in 0..rng.below(6) {
            let mut from = endpoint_names[rng.below(endpoint_names.len() as u64) as usize].clone();
            let mut to = endpoint_names[rng.below(endpoint_names.len() as u64) as usize].clone();
            if from == "host" && to == "host" {
                continue;
            }
            if rng.chance(30) {
                // A network with a domain, either way.
                let net = networks[rng.below(networks.len() as u64) as usize].to_string();
                let domain = format!("d{}", rng.below(n_domains as u64));
                (from, to) = if rng.chance(70) {
                    (net, domain)
                } else {
                    (domain, net)
                };
            }
            let mut entry = json!({"from": from, "to": to, "ports": random_ports(&mut rng),
                                   "bidirectional": rng.chance(30)});
            if rng.chance(50) {
                entry["protocol"] = json!(if rng.chance(50) { "tcp" } else { "udp" });
            }
            policies.push(entry);
        }
        let admin = rng.chance(30).then(|| name_refs[0]);
        // Internet settings: some domains closed, some on a few ports.
        let mut settings_json = serde_json::Map::new();
        let mut settings: BTreeMap<String, Internet> = BTreeMap::new();
        for (i, bridge) in names.iter().enumerate() {
            match rng.below(4) {
                0 => {
                    settings_json.insert(format!("d{i}"), json!({"internet": false}));
                    settings.insert(bridge.clone(), Internet::Closed);
                }
                1 => {
                    let port = 1 + rng.below(40) as u16 * 10;
                    let proto = if rng.chance(50) {
                        Protocol::Tcp
                    } else {
                        Protocol::Udp
                    };
                    settings_json.insert(
                        format!("d{i}"),
                        json!({"egress": [{"protocol": proto.as_str(), "port": port}]}),
                    );
                    let span = PortSpan::single(port).unwrap();
                    settings.insert(bridge.clone(), Internet::Ports([(proto, span)].into()));
                }
                _ => {}
            }
        }
        let all_protected = ["192.0.2.0/25", "198.18.0.0/24", "2001:db8::/80"];
        let protected: Vec<&str> = all_protected
            .iter()
            .copied()
            .filter(|_| rng.chance(40))
            .collect();
        let nets: Vec<ipnet::IpNet> = protected.iter().map(|n| n.parse().unwrap()).collect();
        // Isolation inside a domain: some domains isolate their machines;
        // machines have a MAC, a few none (not known to Incus yet).
        let mut isolated: BTreeSet<String> = BTreeSet::new();
        for (i, bridge) in names.iter().enumerate() {
            if rng.chance(35) {
                isolated.insert(bridge.clone());
                let entry = settings_json
                    .entry(format!("d{i}"))
                    .or_insert_with(|| json!({}));
                entry["isolate_machines"] = json!(true);
            }
        }
        for (k, m) in machines.iter_mut().enumerate() {
            if rng.chance(90) {
                m.hwaddr = Some(MacAddr([0, 0x16, 0x3e, 0, 0, k as u8]));
            }
        }
        let plan = match plan_with_edges(
            &name_refs,
            admin,
            &machines,
            json!(policies.clone()),
            Value::Object(settings_json),
            &protected,
        ) {
            Ok((mut plan, _)) => {
                let mut confined = machines.clone();
                confine_to_bridges(&mut confined, &bridges(&name_refs));
                plan.add_machines(&confined);
                plan
            }
            Err(err) => {
                // The only refusals a generated world may meet: contradicting
                // duplicates, and a machine left without any address.
                let msg = format!("{err:#}");
                assert!(
                    msg.contains("different `bidirectional` values")
                        || msg.contains("has no address"),
                    "seed {seed}: unexpected refusal: {msg}\npolicies {policies:#?}"
                );
                TALLY.refused.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        TALLY.compared.fetch_add(1, Ordering::Relaxed);
        let resolved: Vec<ResolvedPolicy> =
            plan.policies.iter().map(|e| e.policy.clone()).collect();
        let eval = plan.evaluator();
        check_frames(
            seed, &plan, &eval, &truth, &resolved, &machines, &isolated, &names,
        );

        // Candidate addresses: every address any machine reports (its own
        // and foreign ones) plus an anonymous neighbour per bridge, in both
        // families; each is tried as a source on its own bridge and on the
        // next one, and as a destination out of every bridge.
        let mut addrs: Vec<IpAddr> = Vec::new();
        for i in 0..n_domains {
            addrs.push(v4(&format!("10.{i}.0.99")));
            addrs.push(v6(&format!("fd00:{i}::99")));
        }
        for m in &machines {
            addrs.extend(m.ipv4.iter().map(|a| IpAddr::V4(*a)));
            addrs.extend(m.ipv6.iter().map(|a| IpAddr::V6(*a)));
            addrs.extend(m.ignored.iter().copied());
        }
        addrs.sort();
        addrs.dedup();
        // 10.<i>.0.x and fd00:<i>::x are on bridge i.
        let bridge_of = |a: &IpAddr| -> usize {
            match a {
                IpAddr::V4(a) => usize::from(a.octets()[1]),
                IpAddr::V6(a) => usize::from(a.segments()[1]),
            }
        };
        let l4s = [
            L4::Icmp,
            L4::Nd,
            L4::Tcp(10),
            L4::Tcp(11),
            L4::Udp(10),
            L4::Udp(53),
            L4::Tcp(95),
            L4::Udp(205),
            L4::Tcp(400),
        ];
        // From outside: the uplink, from outside addresses and from
        // addresses that look like a domain's, new and DNAT'ed.
        let outside: Vec<IpAddr> = [
            "192.0.2.7",
            "192.0.2.8",
            "198.51.100.2",
            "2001:db8::7",
            "2001:db8:1::7",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .chain(addrs.iter().copied())
        .collect();
        for src in &outside {
            for dst in &addrs {
                if src.is_ipv4() != dst.is_ipv4() {
                    continue;
                }
                for oif in names.iter().map(String::as_str).chain(["net-new"]) {
                    for l4 in l4s {
                        for ct in [CtState::New, CtState::NewDnat] {
                            let packet = Forwarded {
                                ct,
                                ..fwd("uplink0", oif, *src, *dst, l4)
                            };
                            let want = oracle_forward(
                                &truth, &resolved, admin, &name_refs, &settings, &nets, &isolated,
                                &packet,
                            );
                            assert_eq!(
                                eval.forward(&packet),
                                want,
                                "seed {seed}: {packet:?}\npolicies {policies:#?}"
                            );
                        }
                    }
                }
            }
        }
        // Egress: from each domain's own addresses to outside addresses.
        for src in &addrs {
            let iif = &names[bridge_of(src)];
            for dst in outside.iter().filter(|d| d.is_ipv4() == src.is_ipv4()) {
                for l4 in l4s {
                    let packet = fwd(iif, "uplink0", *src, *dst, l4);
                    let want = oracle_forward(
                        &truth, &resolved, admin, &name_refs, &settings, &nets, &isolated, &packet,
                    );
                    assert_eq!(
                        eval.forward(&packet),
                        want,
                        "seed {seed}: {packet:?}\npolicies {policies:#?}\nsettings {settings:?}"
                    );
                }
            }
        }
        for src in &addrs {
            let own = bridge_of(src);
            for iif in [&names[own], &names[(own + 1) % n_domains]] {
                for dst in &addrs {
                    if src.is_ipv4() != dst.is_ipv4() {
                        continue;
                    }
                    for oif in &names {
                        for l4 in l4s {
                            let packet = fwd(iif, oif, *src, *dst, l4);
                            let want = oracle_forward(
                                &truth, &resolved, admin, &name_refs, &settings, &nets, &isolated,
                                &packet,
                            );
                            assert_eq!(
                                eval.forward(&packet),
                                want,
                                "seed {seed}: {packet:?}\npolicies {policies:#?}"
                            );
                        }
                    }
                }
                for l4 in l4s {
                    for dst in [
                        HostDst::Gateway,
                        HostDst::Elsewhere,
                        HostDst::Broadcast,
                        HostDst::Multicast,
                    ] {
                        let packet = ToHost {
                            iif,
                            src: *src,
                            dst,
                            l4,
                            ct: CtState::New,
                        };
                        assert_eq!(
                            eval.input(&packet),
                            oracle_host(&truth, &resolved, &packet),
                            "seed {seed}: {packet:?}\npolicies {policies:#?}"
                        );
                    }
                }
            }
        }
    }

    /// The bridge table read directly: is this frame between two ports of
    /// `bridge` allowed? Only isolated domains drop; ARP and ND pass; a
    /// policy between two machines of the domain opens its packets, and
    /// their replies statelessly (not a bare TCP SYN; ICMP only echo
    /// replies); a whole domain end is its known machines.
    #[allow(clippy::too_many_arguments)]
    fn oracle_frame(
        truth: &Truth,
        policies: &[ResolvedPolicy],
        isolated: bool,
        bridge: &str,
        known_macs: &BTreeSet<MacAddr>,
        f: &Frame,
    ) -> Verdict {
        if !isolated {
            return Verdict::Accept;
        }
        let (src, dst, l4) = match f.payload {
            Payload::Arp => return Verdict::Accept,
            Payload::Other => (None, None, FrameL4::Other),
            Payload::Ip { src, dst, l4 } => (Some(src), Some(dst), l4),
        };
        if l4 == FrameL4::Nd && src.is_some_and(|s| s.is_ipv6()) {
            return Verdict::Accept;
        }
        let on = |e: &Endpoint, a: IpAddr| match e {
            Endpoint::Machine { name, .. } => {
                let (b, addrs) = &truth[name.as_str()];
                b == bridge && addrs.contains(&a)
            }
            Endpoint::Domain { bridge: b, .. } => {
                b.as_str() == bridge
                    && truth
                        .values()
                        .any(|(mb, addrs)| mb == bridge && addrs.contains(&a))
            }
            _ => false,
        };
        if let (Some(s), Some(d)) = (src, dst) {
            let forward = some_policy(policies, |from, to, t| {
                on(from, s)
                    && on(to, d)
                    && match (t, l4) {
                        (Traffic::All, _) => true,
                        (Traffic::Ports(Protocol::Tcp, spans), FrameL4::Tcp { dport, .. })
                        | (Traffic::Ports(Protocol::Udp, spans), FrameL4::Udp { dport, .. }) => {
                            spans.iter().any(|x| x.contains(dport))
                        }
                        _ => false,
                    }
            });
            let reply = some_policy(policies, |from, to, t| {
                on(from, d)
                    && on(to, s)
                    && match (t, l4) {
                        (Traffic::All, FrameL4::Tcp { bare_syn, .. }) => !bare_syn,
                        (Traffic::All, FrameL4::Udp { .. } | FrameL4::EchoReply) => true,
                        (
                            Traffic::Ports(Protocol::Tcp, spans),
                            FrameL4::Tcp {
                                sport,
                                bare_syn: false,
                                ..
                            },
                        )
                        | (Traffic::Ports(Protocol::Udp, spans), FrameL4::Udp { sport, .. }) => {
                            spans.iter().any(|x| x.contains(sport))
                        }
                        _ => false,
                    }
            });
            if forward || reply {
                return Verdict::Accept;
            }
        }
        let macs = known_macs.contains(&f.src_mac)
            && (known_macs.contains(&f.dst_mac) || f.dst_mac.is_group());
        // Every generated address of a bridge is in its subnet
        // (10.<i>.0.0/24, fd00:<i>::/64); link-local ones are not.
        let in_subnet = |a: Option<IpAddr>| match a {
            Some(IpAddr::V4(a)) => a.octets()[0] == 10,
            Some(IpAddr::V6(a)) => a.segments()[0] == 0xfd00,
            None => false,
        };
        verdict(!(macs || (in_subnet(src) && in_subnet(dst))))
    }

    /// Frames between machines (and anonymous neighbours) of each bridge,
    /// with their own MACs, and link-local frames with every MAC pairing.
    #[allow(clippy::too_many_arguments)]
    fn check_frames(
        seed: u64,
        plan: &HostPlan,
        eval: &super::super::eval::Evaluator<'_>,
        truth: &Truth,
        resolved: &[ResolvedPolicy],
        machines: &[Machine],
        isolated: &BTreeSet<String>,
        names: &[String],
    ) {
        let anonymous = MacAddr([2, 0, 0, 0, 0, 0x99]);
        let known_macs: BTreeSet<MacAddr> = machines
            .iter()
            .filter(|m| isolated.contains(m.bridge.as_str()))
            .filter_map(|m| m.hwaddr)
            .collect();
        let l4s = [
            FrameL4::Tcp {
                sport: 40000,
                dport: 10,
                bare_syn: true,
            },
            FrameL4::Tcp {
                sport: 40000,
                dport: 95,
                bare_syn: true,
            },
            FrameL4::Tcp {
                sport: 40000,
                dport: 400,
                bare_syn: true,
            },
            FrameL4::Tcp {
                sport: 10,
                dport: 40000,
                bare_syn: false,
            },
            FrameL4::Tcp {
                sport: 95,
                dport: 40000,
                bare_syn: false,
            },
            FrameL4::Tcp {
                sport: 10,
                dport: 40000,
                bare_syn: true,
            },
            FrameL4::Udp {
                sport: 40000,
                dport: 10,
            },
            FrameL4::Udp {
                sport: 10,
                dport: 40000,
            },
            FrameL4::Udp {
                sport: 53,
                dport: 40000,
            },
            FrameL4::EchoRequest,
            FrameL4::EchoReply,
            FrameL4::Nd,
            FrameL4::Other,
        ];
        for (i, bridge) in names.iter().enumerate() {
            // (address, MAC) of every machine address on this bridge, and
            // an anonymous neighbour.
            let mut ends: Vec<(IpAddr, MacAddr)> = vec![
                (v4(&format!("10.{i}.0.99")), anonymous),
                (v6(&format!("fd00:{i}::99")), anonymous),
            ];
            for m in machines.iter().filter(|m| m.bridge.as_str() == bridge) {
                let mac = m.hwaddr.unwrap_or(anonymous);
                let (_, own) = &truth[m.name.as_str()];
                ends.extend(own.iter().map(|a| (*a, mac)));
            }
            let iso = isolated.contains(bridge);
            let mut frames = Vec::new();
            for (s, smac) in &ends {
                for (d, dmac) in &ends {
                    if s == d || s.is_ipv4() != d.is_ipv4() {
                        continue;
                    }
                    for l4 in l4s {
                        frames.push(Frame {
                            src_mac: *smac,
                            dst_mac: *dmac,
                            payload: Payload::Ip {
                                src: *s,
                                dst: *d,
                                l4,
                            },
                        });
                    }
                }
            }
            let macs: Vec<MacAddr> = ends
                .iter()
                .map(|(_, m)| *m)
                .chain([MacAddr([0xff; 6]), MacAddr([0x33, 0x33, 0, 0, 0, 1])])
                .collect();
            for smac in &macs {
                for dmac in &macs {
                    for payload in [
                        Payload::Arp,
                        Payload::Other,
                        Payload::Ip {
                            src: v6("fe80::1"),
                            dst: v6("fe80::2"),
                            l4: FrameL4::EchoRequest,
                        },
                        Payload::Ip {
                            src: v6("fe80::1"),
                            dst: v6("fe80::2"),
                            l4: FrameL4::Nd,
                        },
                    ] {
                        frames.push(Frame {
                            src_mac: *smac,
                            dst_mac: *dmac,
                            payload,
                        });
                    }
                }
            }
            for f in frames {
                assert_eq!(
                    eval.bridge(&f),
                    oracle_frame(truth, resolved, iso, bridge, &known_macs, &f),
                    "seed {seed}: {bridge} {f:?}\npolicies {resolved:#?}\nisolation {:?}",
                    plan.isolation
                );
            }
        }
    }

    const CASES: u32 = 200;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(CASES))]
        #[test]
        fn plan_allows_exactly_what_the_policies_say(seed in any::<u64>()) {
            check_world(seed);
        }
    }

    /// Most generated worlds must be compared, not refused: a generator
    /// that only made refused worlds would test nothing.
    #[test]
    fn most_generated_worlds_are_compared() {
        for seed in 0..u64::from(CASES) {
            check_world(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        }
        let compared = TALLY.compared.load(Ordering::Relaxed);
        let refused = TALLY.refused.load(Ordering::Relaxed);
        assert!(
            compared >= 4 * refused && compared > 0,
            "{compared} worlds compared, {refused} refused"
        );
    }
}
