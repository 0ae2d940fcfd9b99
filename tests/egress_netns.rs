//! Internet egress per domain against the real kernel: the host ruleset
//! (every kind of egress target: a port list two domains share, a list of
//! its own in `egress_ports` and `egress_port_ranges`, a domain whose policy
//! opens a network, a
//! closed domain as a plain `drop` in the map, an unrestricted one) loaded
//! in a router namespace, real TCP connections over IPv4 and IPv6 from one
//! namespace per domain to an uplink namespace, each compared with the
//! evaluator's verdict and with the revocation reader's verdict on the live
//! listing (what the enforcer reads to cut flows). Needs root (`ip netns add`), as `make test` is run.
//! Every namespace and process is this test's own and is removed.

mod common;
use anklume_isolation::model::{
    parse_protected_networks, BridgePattern, DomainBridge, DomainSettings, GatewayServices, IfName,
    PolicySpec, TableName, World,
};
use anklume_isolation::plan::eval::{CtState, Forwarded, Verdict, L4};
use anklume_isolation::plan::{Capabilities, HostPlan, HostPlanInput};
use anklume_isolation::render;
use anklume_isolation::revoke::{Admission, Flow, Interfaces, TableVerdict};
use common::{must, nft_load, sh};
use serde_json::json;
use std::net::IpAddr;
use std::process::{Child, Command, Stdio};

/// Domains: (name, third octet / IPv6 group of its subnet).
const DOMAINS: [(&str, u8); 6] = [("a", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 5), ("f", 6)];
const UPLINK: &str = "upl";
const PORTS: [u16; 4] = [22, 443, 444, 8080];

struct Lab {
    router: String,
    uplink: String,
    clients: Vec<String>,
    listeners: Vec<Child>,
}

impl Lab {
    fn new() -> Lab {
        let pid = std::process::id();
        let name = |tag: &str| format!("ank-i9-eg-{tag}-{pid}");
        let mut lab = Lab {
            router: name("r"),
            uplink: name("u"),
            clients: DOMAINS.iter().map(|(d, _)| name(d)).collect(),
            listeners: vec![],
        };
        for ns in lab.clients.iter().chain([&lab.router, &lab.uplink]) {
            let ok = Command::new("ip").args(["netns", "add", ns]).status();
            assert!(
                ok.is_ok_and(|s| s.success()),
                "`ip netns add` failed: these tests need root and iproute2"
            );
            must(ns, "ip link set lo up");
        }
        must(
            &lab.router,
            "echo 1 >/proc/sys/net/ipv4/ip_forward && \
             echo 1 >/proc/sys/net/ipv6/conf/all/forwarding",
        );
        for ((d, n), ns) in DOMAINS.iter().zip(&lab.clients) {
            must(
                &lab.router,
                &format!(
                    "ip link add net-{d} type veth peer name eth0 netns {ns} && \
                     ip addr add 10.97.{n}.1/24 dev net-{d} && \
                     ip -6 addr add fd97:{n}::1/64 dev net-{d} nodad && ip link set net-{d} up"
                ),
            );
            must(
                ns,
                &format!(
                    "ip addr add 10.97.{n}.2/24 dev eth0 && \
                     ip -6 addr add fd97:{n}::2/64 dev eth0 nodad && ip link set eth0 up && \
                     ip route add default via 10.97.{n}.1 && \
                     ip -6 route add default via fd97:{n}::1"
                ),
            );
        }
        must(
            &lab.router,
            &format!(
                "ip link add {UPLINK} type veth peer name eth0 netns {} && \
                 ip addr add 10.98.0.1/24 dev {UPLINK} && \
                 ip -6 addr add fd98::1/64 dev {UPLINK} nodad && ip link set {UPLINK} up",
                lab.uplink
            ),
        );
        must(
            &lab.uplink,
            "ip addr add 10.98.0.2/24 dev eth0 && ip -6 addr add fd98::2/64 dev eth0 nodad && \
             ip link set eth0 up && ip route add default via 10.98.0.1 && \
             ip -6 route add default via fd98::1",
        );
        for port in PORTS {
            let child = Command::new("ip")
                .args(["netns", "exec", &lab.uplink, "socat"])
                .arg(format!("TCP6-LISTEN:{port},fork,reuseaddr,ipv6only=0"))
                .arg("/dev/null")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("socat is needed for the TCP probes");
            lab.listeners.push(child);
        }
        lab
    }

    /// Every probe (domain, family, port) at once, each a TCP connection
    /// with a 1 s budget: whether it was accepted.
    fn probe_all(&self) -> Vec<((usize, bool, u16), bool)> {
        let probes: Vec<(usize, bool, u16)> = (0..DOMAINS.len())
            .flat_map(|i| [false, true].map(|v6| (i, v6)))
            .flat_map(|(i, v6)| PORTS.map(|p| (i, v6, p)))
            .collect();
        std::thread::scope(|s| {
            let handles: Vec<_> = probes
                .iter()
                .map(|&(i, v6, port)| {
                    let ns = &self.clients[i];
                    s.spawn(move || {
                        let target = if v6 {
                            format!("TCP6:[fd98::2]:{port}")
                        } else {
                            format!("TCP4:10.98.0.2:{port}")
                        };
                        sh(
                            ns,
                            &format!("timeout 3 socat -T 1 /dev/null {target},connect-timeout=1"),
                        )
                        .status
                        .success()
                    })
                })
                .collect();
            probes
                .iter()
                .copied()
                .zip(handles.into_iter().map(|h| h.join().unwrap()))
                .collect()
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.listeners {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.clients.iter().chain([&self.router, &self.uplink]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn plan() -> HostPlan {
    let pattern = BridgePattern::new("net-").unwrap();
    let bridges: Vec<DomainBridge> = DOMAINS
        .iter()
        .map(|(d, _)| {
            DomainBridge::new(IfName::new(&format!("net-{d}")).unwrap(), &pattern).unwrap()
        })
        .collect();
    let list = json!([{"protocol": "tcp", "port": "443-444"}, {"protocol": "udp", "port": 53}]);
    let domains = json!({
        "a": {"egress": list}, "b": {"egress": list}, "d": {"egress": list},
        "c": {"egress": [{"protocol": "tcp", "port": 22}, {"protocol": "tcp", "port": "8080-8081"}]},
        "e": {"internet": false}
    });
    let specs = PolicySpec::parse_all(&[
        json!({"from": "d", "to": "10.98.0.0/25", "ports": [22]}),
        json!({"from": "d", "to": "fd98::/120", "ports": [22]}),
    ])
    .unwrap();
    let world = World::new(&bridges, &[]);
    let policies = specs.iter().map(|s| world.resolve(s).unwrap()).collect();
    let (plan, _) = HostPlan::build(HostPlanInput {
        protected_networks: parse_protected_networks::<&str>(&[]).unwrap(),
        domain_settings: DomainSettings::parse(&serde_json::from_value(domains).unwrap()).unwrap(),
        table: TableName::new("anklume_i9eg").unwrap(),
        pattern,
        bridges: &bridges,
        admin: None,
        policies,
        gateway: GatewayServices::defaults(),
        logging: None,
        capabilities: Capabilities::ALL,
    })
    .unwrap();
    plan
}

#[test]
fn every_egress_target_gives_the_kernel_the_evaluators_verdict_over_ipv4_and_ipv6() {
    let plan = plan();
    let text = render::host(&plan).unwrap();
    // The layout under test: no chain per domain but d's (its policy).
    for needle in [
        "\"net-e\" : drop",
        "\"net-a\" : jump egress-list/0",
        "\"net-c\" : jump egress_restricted",
        "\"net-d\" : jump egress/net-d",
        "iifname . meta l4proto . th dport @egress_ports accept",
        "iifname . meta l4proto . th dport @egress_port_ranges accept",
    ] {
        assert!(text.contains(needle), "{needle} not in\n{text}");
    }
    let lab = Lab::new();

    // Positive control: with no ruleset every probe connects, so a refused
    // probe below is the ruleset's doing.
    // (Retried a few times: the listeners and IPv6 neighbours take a
    // moment to come up.)
    let mut failed = Vec::new();
    for _ in 0..10 {
        failed = lab.probe_all().into_iter().filter(|(_, ok)| !ok).collect();
        if failed.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    assert!(failed.is_empty(), "without a ruleset: {failed:?}");

    nft_load(&lab.router, &text);
    let eval = plan.evaluator();
    let listing: serde_json::Value =
        serde_json::from_str(&must(&lab.router, "nft -j list table inet anklume_i9eg")).unwrap();
    let admission = Admission::of(&listing, "anklume_i9eg").unwrap();
    let mut interfaces = Interfaces::default();
    for (d, n) in DOMAINS {
        for net in [format!("10.97.{n}.1/24"), format!("fd97:{n}::1/64")] {
            interfaces
                .addresses
                .push((format!("net-{d}"), net.parse().unwrap()));
        }
    }
    for net in ["10.98.0.1/24", "fd98::1/64"] {
        interfaces
            .addresses
            .push((UPLINK.to_string(), net.parse().unwrap()));
    }
    let mut wrong = Vec::new();
    let (mut accepted, mut dropped) = (0, 0);
    for ((i, v6, port), connected) in lab.probe_all() {
        let (d, n) = DOMAINS[i];
        let (src, dst): (IpAddr, IpAddr) = if v6 {
            (
                format!("fd97:{n}::2").parse().unwrap(),
                "fd98::2".parse().unwrap(),
            )
        } else {
            (
                format!("10.97.{n}.2").parse().unwrap(),
                "10.98.0.2".parse().unwrap(),
            )
        };
        let iif = format!("net-{d}");
        let want = eval.forward(&Forwarded {
            iif: &iif,
            oif: UPLINK,
            src,
            dst,
            l4: L4::Tcp(port),
            ct: CtState::New,
        }) == Verdict::Accept;
        if want {
            accepted += 1;
        } else {
            dropped += 1;
        }
        let read = admission.verdict(
            &Flow {
                proto: 6,
                src,
                dst,
                sport: Some(40000),
                dport: Some(port),
                nat: false,
            },
            &interfaces,
        );
        let read_want = if connected {
            TableVerdict::Accept
        } else {
            TableVerdict::Drop
        };
        if want != connected || read != read_want {
            wrong.push(format!(
                "{iif} v6={v6} tcp {port}: kernel {connected}, evaluator {want}, reader {read:?}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "kernel, evaluator and revocation reader disagree: {wrong:#?}"
    );
    // Both verdicts were exercised: (a, b, d) 443-444 and d's 22 pass, c's
    // 22 and 8080 and f's everything; the rest is dropped.
    assert_eq!((accepted, dropped), (2 * 13, 2 * 11));
}
