//! Isolation inside a domain (`isolate_machines`) against the real kernel:
//! a "host" namespace with two bridges, three "machine" namespaces on the
//! isolated domain's bridge and two on a domain that does not isolate its
//! machines (veth ports, MACs set explicitly, IPv4 and IPv6 ULA addresses),
//! the rendered ruleset loaded with plain `nft -f` in the host namespace,
//! and real traffic. Run with br_netfilter off and on (its sysctls are per
//! network namespace: checked). Every probe has its positive control: the
//! same probe connects without our tables. Needs root (`ip netns add`), as
//! `make test` is run; every namespace and process is this test's own.

mod common;
use common::{must, nft_load, sh};

use anklume_isolation::model::{
    confine_to_bridges, BridgePattern, DomainBridge, DomainSettings, GatewayServices, IfName,
    Machine, Name, PolicySpec, TableName, World,
};
use anklume_isolation::plan::eval::{CtState, Forwarded, Frame, FrameL4, Payload, Verdict, L4};
use anklume_isolation::plan::{Capabilities, HostPlan, HostPlanInput};
use anklume_isolation::render;
use serde_json::{json, Value};
use std::net::IpAddr;
use std::process::{Child, Command, Stdio};

const TABLE: &str = "anklume_i9";
const PRO: &str = "net-pro";
const PERSO: &str = "net-perso";
/// Policy port and its neighbour; both have a listener everywhere.
const PORT: u16 = 8080;
const NEIGHBOUR: u16 = 8081;

/// (name, bridge, subnet number, host number, MAC).
const MACHINES: [(&str, &str, u8, u8, &str); 5] = [
    ("pro-a", PRO, 1, 10, "00:16:3e:09:01:0a"),
    ("pro-b", PRO, 1, 11, "00:16:3e:09:01:0b"),
    ("pro-c", PRO, 1, 12, "00:16:3e:09:01:0c"),
    ("perso-x", PERSO, 2, 10, "00:16:3e:09:02:0a"),
    ("perso-y", PERSO, 2, 11, "00:16:3e:09:02:0b"),
];

fn v4(m: usize) -> String {
    let (_, _, n, h, _) = MACHINES[m];
    format!("10.209.{n}.{h}")
}

fn v6(m: usize) -> String {
    let (_, _, n, h, _) = MACHINES[m];
    format!("fd09:{n}::{h}")
}

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
const X: usize = 3;
const Y: usize = 4;

struct Lab {
    host: String,
    machines: Vec<String>,
    listeners: Vec<Child>,
}

impl Lab {
    fn new(tag: &str) -> Lab {
        let pid = std::process::id();
        let host = format!("ank-i9-{tag}-h-{pid}");
        let mut lab = Lab {
            host: host.clone(),
            machines: vec![],
            listeners: vec![],
        };
        let add = |name: &str| {
            let ok = Command::new("ip").args(["netns", "add", name]).status();
            assert!(
                ok.is_ok_and(|s| s.success()),
                "`ip netns add` failed: these tests need root and iproute2"
            );
            // No duplicate address detection: addresses (link-local too)
            // are usable at once.
            must(
                name,
                "ip link set lo up && sysctl -qw net.ipv6.conf.all.accept_dad=0 \
                 net.ipv6.conf.default.accept_dad=0 net.ipv4.conf.all.accept_redirects=0 \
                 net.ipv4.conf.default.accept_redirects=0 \
                 net.ipv6.conf.all.accept_redirects=0 net.ipv6.conf.default.accept_redirects=0",
            );
        };
        add(&host);
        // The host routes, as an Incus host does.
        must(
            &host,
            "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1",
        );
        for (bridge, n, mac) in [
            (PRO, 1, "02:00:00:09:01:01"),
            (PERSO, 2, "02:00:00:09:02:01"),
        ] {
            must(
                &host,
                &format!(
                    "ip link add {bridge} address {mac} type bridge && \
                     ip addr add 10.209.{n}.1/24 dev {bridge} && \
                     ip -6 addr add fd09:{n}::1/64 dev {bridge} nodad && ip link set {bridge} up"
                ),
            );
        }
        for (i, (name, bridge, n, h, mac)) in MACHINES.iter().enumerate() {
            let ns = format!("ank-i9-{tag}-{name}-{pid}");
            add(&ns);
            lab.machines.push(ns.clone());
            must(
                &host,
                &format!(
                    "ip link add p{i} type veth peer name eth0 netns {ns} && \
                     ip link set p{i} master {bridge} && ip link set p{i} up"
                ),
            );
            must(
                &ns,
                &format!(
                    "ip link set eth0 address {mac} && ip addr add 10.209.{n}.{h}/24 dev eth0 && \
                     ip -6 addr add fd09:{n}::{h}/64 dev eth0 nodad && ip link set eth0 up"
                ),
            );
            for port in [PORT, NEIGHBOUR] {
                lab.listen(&ns, port);
            }
        }
        lab
    }

    fn listen(&mut self, ns: &str, port: u16) {
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "socat"])
            .arg(format!(
                "TCP6-LISTEN:{port},fork,reuseaddr,reuseport,ipv6only=0"
            ))
            .arg("/dev/null")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat is needed for the TCP probes");
        self.listeners.push(child);
    }

    /// br_netfilter's per-namespace switches in the host namespace.
    fn br_netfilter(&self, on: bool) {
        let v = u8::from(on);
        must(
            &self.host,
            &format!(
                "sysctl -qw net.bridge.bridge-nf-call-iptables={v} \
                 net.bridge.bridge-nf-call-ip6tables={v}"
            ),
        );
    }

    /// A TCP connection (1 s budget) from machine `from` to `addr:port`,
    /// from `sport` when given.
    fn tcp(&self, from: usize, addr: &str, port: u16, sport: Option<u16>) -> bool {
        let target = if addr.contains(':') {
            format!("TCP6:[{addr}]:{port}")
        } else {
            format!("TCP4:{addr}:{port}")
        };
        let sport = sport.map_or(String::new(), |p| {
            format!(",sourceport={p},reuseaddr,reuseport")
        });
        sh(
            &self.machines[from],
            &format!("timeout 3 socat -T 1 /dev/null {target},connect-timeout=1{sport}"),
        )
        .status
        .success()
    }

    /// One ICMP echo (1 s).
    fn ping(&self, from: usize, addr: &str) -> bool {
        let fam = if addr.contains(':') { "-6" } else { "-4" };
        sh(
            &self.machines[from],
            &format!("busybox ping {fam} -c 1 -W 1 {addr} >/dev/null"),
        )
        .status
        .success()
    }

    /// A machine's IPv6 link-local address, with its zone.
    fn link_local(&self, m: usize) -> String {
        let out = must(
            &self.machines[m],
            "ip -6 -o addr show dev eth0 scope link | awk '{print $4}'",
        );
        let addr = out.trim().split('/').next().unwrap().to_string();
        assert!(addr.starts_with("fe80:"), "{out}");
        format!("{addr}%eth0")
    }

    fn arping(&self, from: usize, to: usize) -> bool {
        sh(
            &self.machines[from],
            &format!("busybox arping -c 1 -w 1 -I eth0 {} >/dev/null", v4(to)),
        )
        .status
        .success()
    }

    /// Routes between machines `a` and `b` through the gateway (both ways),
    /// as a machine's root can set: the host routes their packets back onto
    /// the bridge. `add` false removes them.
    fn via_gateway(&self, a: usize, b: usize, add: bool) {
        let verb = if add { "add" } else { "del" };
        for (from, to) in [(a, b), (b, a)] {
            let (_, _, n, _, _) = MACHINES[from];
            must(
                &self.machines[from],
                &format!(
                    "ip route {verb} {}/32 via 10.209.{n}.1 && \
                     ip -6 route {verb} {}/128 via fd09:{n}::1",
                    v4(to),
                    v6(to)
                ),
            );
        }
    }

    fn load(&self, text: &str) {
        nft_load(&self.host, text);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.listeners {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.machines.iter().chain([&self.host]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// The plan of this lab: pro isolates its machines, perso does not.
fn plan(isolate: bool, policies: Value) -> HostPlan {
    let pattern = BridgePattern::new("net-").unwrap();
    let bridges: Vec<DomainBridge> = [(PRO, 1), (PERSO, 2)]
        .iter()
        .map(|(b, n)| {
            let mut b = DomainBridge::new(IfName::new(b).unwrap(), &pattern).unwrap();
            b.ipv4 = Some(format!("10.209.{n}.1/24").parse().unwrap());
            b.ipv6 = Some(format!("fd09:{n}::1/64").parse().unwrap());
            b.subnets_known = true;
            b
        })
        .collect();
    let mut machines: Vec<Machine> = MACHINES
        .iter()
        .enumerate()
        .map(|(i, (name, bridge, _, _, mac))| {
            let mut m = Machine::new(
                Name::new("machine", name).unwrap(),
                "default",
                IfName::new(bridge).unwrap(),
            );
            m.ipv4.insert(v4(i).parse().unwrap());
            m.ipv6.insert(v6(i).parse().unwrap());
            m.hwaddr = Some(mac.parse().unwrap());
            m.mac_filtering = true;
            m
        })
        .collect();
    confine_to_bridges(&mut machines, &bridges);
    let world = World::new(&bridges, &machines);
    let specs = PolicySpec::parse_all(policies.as_array().unwrap()).unwrap();
    let policies = specs.iter().map(|s| world.resolve(s).unwrap()).collect();
    let domains = if isolate {
        json!({"pro": {"isolate_machines": true}})
    } else {
        json!({})
    };
    let (mut plan, _) = HostPlan::build(HostPlanInput {
        protected_networks: vec![],
        domain_settings: DomainSettings::parse(&serde_json::from_value(domains).unwrap()).unwrap(),
        table: TableName::new(TABLE).unwrap(),
        pattern,
        bridges: &bridges,
        admin: None,
        policies,
        gateway: GatewayServices::defaults(),
        logging: None,
        capabilities: Capabilities::ALL,
    })
    .unwrap();
    plan.add_machines(&machines);
    plan
}

/// What the evaluator says of a first TCP packet (a bare SYN) from machine
/// `from` to `to`: the kernel's answer must be the same.
fn eval_tcp(plan: &HostPlan, from: usize, to: usize, v6_: bool, sport: u16, dport: u16) -> bool {
    let (src, dst): (IpAddr, IpAddr) = if v6_ {
        (v6(from).parse().unwrap(), v6(to).parse().unwrap())
    } else {
        (v4(from).parse().unwrap(), v4(to).parse().unwrap())
    };
    let frame = Frame {
        src_mac: MACHINES[from].4.parse().unwrap(),
        dst_mac: MACHINES[to].4.parse().unwrap(),
        payload: Payload::Ip {
            src,
            dst,
            l4: FrameL4::Tcp {
                sport,
                dport,
                bare_syn: true,
            },
        },
    };
    plan.evaluator().bridge(&frame) == Verdict::Accept
}

/// Every probe of the test, with what it must give when the isolation is
/// in place; without our tables, all of them connect.
fn probes(lab: &Lab, isolated: bool, plan: Option<&HostPlan>) {
    let ok = !isolated;
    let ll_b = lab.link_local(B);
    for fam6 in [false, true] {
        let addr = |m: usize| if fam6 { v6(m) } else { v4(m) };
        let tag = if fam6 { "IPv6" } else { "IPv4" };
        // The policy port between two machines of the isolated domain
        // passes (replies included), its neighbour does not.
        assert!(lab.tcp(A, &addr(B), PORT, None), "{tag}: a -> b:{PORT}");
        assert_eq!(
            lab.tcp(A, &addr(B), NEIGHBOUR, None),
            ok,
            "{tag}: a -> b:{NEIGHBOUR}"
        );
        // Nothing between machines a policy does not name, nor echo.
        assert_eq!(lab.tcp(A, &addr(C), PORT, None), ok, "{tag}: a -> c");
        assert_eq!(lab.tcp(C, &addr(A), PORT, None), ok, "{tag}: c -> a");
        assert_eq!(lab.ping(A, &addr(B)), ok, "{tag}: ping a -> b");
        assert_eq!(lab.ping(C, &addr(B)), ok, "{tag}: ping c -> b");
        // The target cannot open a connection back, not even from the
        // service port (its bare SYN is not a reply).
        assert_eq!(lab.tcp(B, &addr(A), PORT, None), ok, "{tag}: b -> a");
        assert_eq!(
            lab.tcp(B, &addr(A), NEIGHBOUR, Some(PORT)),
            ok,
            "{tag}: b -> a from port {PORT}"
        );
        // The gateway (the host's own bridge address) keeps working.
        let gw = if fam6 { "fd09:1::1" } else { "10.209.1.1" };
        assert!(lab.ping(A, gw), "{tag}: ping a -> gateway");
        // A domain that does not isolate its machines keeps its
        // same-bridge traffic.
        assert!(lab.tcp(X, &addr(Y), NEIGHBOUR, None), "{tag}: x -> y");
        assert!(lab.ping(Y, &addr(X)), "{tag}: ping y -> x");
        if let Some(plan) = plan {
            // The evaluator agrees with the kernel on the TCP probes.
            for (from, to, sport, dport, kernel) in [
                (A, B, 40000, PORT, true),
                (A, B, 40000, NEIGHBOUR, ok),
                (A, C, 40000, PORT, ok),
                (B, A, 40000, PORT, ok),
                (B, A, PORT, NEIGHBOUR, ok),
                (X, Y, 40000, NEIGHBOUR, true),
            ] {
                assert_eq!(
                    eval_tcp(plan, from, to, fam6, sport, dport),
                    kernel,
                    "{tag}: evaluator {from} -> {to} {sport}->{dport}"
                );
            }
        }
    }
    // IPv6 link-local between two machines of the isolated domain: matched
    // by their MACs (no subnet covers it).
    assert_eq!(lab.ping(A, &ll_b), ok, "ping a -> b link-local");
    assert_eq!(lab.ping(C, &ll_b), ok, "ping c -> b link-local");
    // ARP between them keeps working (a policy flow needs it).
    assert!(lab.arping(A, B), "arping a -> b");
    assert!(lab.arping(C, B), "arping c -> b");
    // Through the gateway's MAC: the host routes it back onto the bridge,
    // where the bridge table does not see it; the inet table drops it.
    lab.via_gateway(C, B, true);
    for addr in [v4(B), v6(B)] {
        assert_eq!(lab.ping(C, &addr), ok, "ping c -> b via the gateway {addr}");
    }
    lab.via_gateway(C, B, false);
    if let Some(plan) = plan {
        let routed = Forwarded {
            iif: PRO,
            oif: PRO,
            src: v4(C).parse().unwrap(),
            dst: v4(B).parse().unwrap(),
            l4: L4::Icmp,
            ct: CtState::New,
        };
        assert_eq!(plan.forward_verdict(&routed) == Verdict::Accept, ok);
    }
}

fn run(br_netfilter: bool) {
    let tag = if br_netfilter { "on" } else { "off" };
    let lab = Lab::new(tag);
    let before = std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables").ok();
    lab.br_netfilter(br_netfilter);
    // The switch is the namespace's own: the real host's is untouched.
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables").ok(),
        before
    );
    assert_eq!(
        must(
            &lab.host,
            "cat /proc/sys/net/bridge/bridge-nf-call-iptables /proc/sys/net/bridge/bridge-nf-call-ip6tables"
        ),
        format!("{0}\n{0}\n", u8::from(br_netfilter))
    );
    let policies = json!([{"from": "pro-a", "to": "pro-b", "ports": [PORT]}]);

    // Positive control: no table of ours, every probe connects.
    probes(&lab, false, None);

    let isolated = plan(true, policies.clone());
    let text = render::host(&isolated).unwrap();
    lab.load(&text);
    let listed = must(&lab.host, &format!("nft list table bridge {TABLE}"));
    assert!(
        listed.contains("hook forward priority -1; policy accept;"),
        "{listed}"
    );
    probes(&lab, true, Some(&isolated));

    // A render without isolation replaces both tables in one load: the
    // bridge table is left with its comment only, and traffic is back.
    let open = plan(false, policies);
    lab.load(&render::host(&open).unwrap());
    let listed = must(&lab.host, &format!("nft list table bridge {TABLE}"));
    assert!(!listed.contains("chain"), "{listed}");
    assert!(listed.contains("managed by anklume-isolation"), "{listed}");
    probes(&lab, false, Some(&open));
}

#[test]
fn isolated_machines_reach_each_other_only_through_policies_br_netfilter_off() {
    run(false);
}

#[test]
fn isolated_machines_reach_each_other_only_through_policies_br_netfilter_on() {
    run(true);
}
