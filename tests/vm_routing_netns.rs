//! vm mode end to end in network namespaces, with the real kernel and the
//! real modules: a "host" namespace with three domain bridges, an
//! Incus-like masquerade table and the host isolation table (strict, as vm
//! mode renders it); one namespace per domain whose default gateway is the
//! host (as DHCP gives it: no route to configure in the instances); a
//! "firewall" namespace with one NIC per bridge (found by MAC). The host runs
//! `firewall_vm_routing`, the firewall `firewall_router_apply` (mode router).
//! Real traffic, IPv4 and IPv6: admin reaches every domain through the
//! firewall, others are denied, the policy port crosses; with the firewall
//! down nothing crosses (fail closed), and it comes back; without the host's
//! steering the host isolation drops it; removal is clean. Needs root.

use anklume_isolation::model::firewall::FirewallInterface;
use anklume_isolation::model::logging::RawLogging;
use anklume_isolation::model::{
    BridgePattern, DomainBridge, GatewayServices, IfName, PolicySpec, TableName, World,
};
use anklume_isolation::plan::router::{router_logging, RouterPlan, RouterPlanInput};
use anklume_isolation::plan::{Capabilities, HostPlan, HostPlanInput};
use anklume_isolation::render;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};

mod common;
use common::{must, nft_load, sh};

const APPLY: &str = env!("CARGO_BIN_EXE_firewall_router_apply");
const ROUTING: &str = env!("CARGO_BIN_EXE_firewall_vm_routing");
const DOMAINS: [(&str, u8); 3] = [("net-anklume", 10), ("net-pro", 11), ("net-perso", 12)];
const ADMIN: usize = 0;
const PRO: usize = 1;
const PERSO: usize = 2;

fn interfaces() -> Vec<FirewallInterface> {
    let pattern = BridgePattern::new("net-").unwrap();
    DOMAINS
        .iter()
        .map(|(b, n)| FirewallInterface::derive("fw", &bridge(b, *n, &pattern), 253).unwrap())
        .collect()
}

fn bridge(name: &str, n: u8, pattern: &BridgePattern) -> DomainBridge {
    let mut bridge = DomainBridge::new(IfName::new(name).unwrap(), pattern).unwrap();
    bridge.ipv4 = Some(format!("10.98.{n}.1/24").parse().unwrap());
    bridge.ipv6 = Some(format!("fd98:{n}::1/64").parse().unwrap());
    bridge
}

struct World3 {
    host: String,
    fw: String,
    domains: Vec<String>,
    listeners: Vec<Child>,
    interfaces: Vec<FirewallInterface>,
    dir: tempfile::TempDir,
}

impl World3 {
    fn new(tag: &str) -> World3 {
        let pid = std::process::id();
        let name = |role: &str| format!("ank-i8-{tag}-{role}-{pid}");
        let mut w = World3 {
            host: name("h"),
            fw: name("fw"),
            domains: DOMAINS
                .iter()
                .map(|(_, n)| name(&format!("d{n}")))
                .collect(),
            listeners: vec![],
            interfaces: interfaces(),
            dir: tempfile::tempdir().unwrap(),
        };
        for ns in w.domains.iter().chain([&w.host, &w.fw]) {
            let ok = Command::new("ip").args(["netns", "add", ns]).status();
            assert!(ok.is_ok_and(|s| s.success()), "`ip netns add` needs root");
            must(ns, "ip link set lo up");
        }
        let (host, fw) = (w.host.clone(), w.fw.clone());
        must(
            &host,
            "echo 1 >/proc/sys/net/ipv4/ip_forward && \
             echo 1 >/proc/sys/net/ipv6/conf/all/forwarding",
        );
        for (k, (b, n)) in DOMAINS.iter().enumerate() {
            let d = w.domains[k].clone();
            let mac = w.interfaces[k].hwaddr;
            must(
                &host,
                &format!(
                    "ip link add {b} type bridge && ip addr add 10.98.{n}.1/24 dev {b} && \
                     ip -6 addr add fd98:{n}::1/64 dev {b} nodad && ip link set {b} up && \
                     ip link add d{k} type veth peer name eth0 netns {d} && \
                     ip link set d{k} master {b} up && \
                     ip link add f{k} type veth peer name tmp{k} netns {fw} && \
                     ip link set f{k} master {b} up"
                ),
            );
            must(&fw, &format!("ip link set tmp{k} address {mac}"));
            // The instance: the host is its default gateway, as Incus's
            // DHCP and router advertisements make it.
            must(
                &d,
                &format!(
                    "ip addr add 10.98.{n}.10/24 dev eth0 && \
                     ip -6 addr add fd98:{n}::10/64 dev eth0 nodad && ip link set eth0 up && \
                     ip route add default via 10.98.{n}.1 && \
                     ip -6 route add default via fd98:{n}::1"
                ),
            );
            for port in [8080, 8081] {
                w.listen(&d, port);
            }
        }
        // Incus's NAT: masquerade everything leaving a subnet (no output
        // interface in the match), which the steering must not let rewrite
        // steered packets.
        let mut nat = String::from(
            "table inet i8_incus_sim {\n chain pstrt {\n  type nat hook postrouting priority srcnat; policy accept;\n",
        );
        for (_, n) in DOMAINS {
            nat.push_str(&format!(
                "  ip saddr 10.98.{n}.0/24 ip daddr != 10.98.{n}.0/24 masquerade\n  ip6 saddr fd98:{n}::/64 ip6 daddr != fd98:{n}::/64 masquerade\n"
            ));
        }
        nat.push_str(" }\n}\n");
        nft_load(&host, &nat);
        // The host isolation of vm mode: strict, no policy, no admin.
        let pattern = BridgePattern::new("net-").unwrap();
        let bridges: Vec<DomainBridge> = DOMAINS
            .iter()
            .map(|(b, n)| bridge(b, *n, &pattern))
            .collect();
        let (plan, _) = HostPlan::build(HostPlanInput {
            table: TableName::new("anklume_i8h").unwrap(),
            pattern,
            bridges: &bridges,
            admin: None,
            policies: vec![],
            gateway: GatewayServices::defaults(),
            logging: None,
            capabilities: Capabilities::ALL,
            domain_settings: Default::default(),
            protected_networks: vec![],
        })
        .unwrap();
        nft_load(&host, &render::host(&plan).unwrap());
        w
    }

    fn listen(&mut self, ns: &str, port: u16) {
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "socat"])
            .arg(format!("TCP6-LISTEN:{port},fork,reuseaddr,ipv6only=0"))
            .arg("/dev/null")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat is needed for the TCP probes");
        self.listeners.push(child);
    }

    fn module(&self, ns: &str, program: &str, args: Value) -> Value {
        let path = self.dir.path().join("args");
        std::fs::write(&path, args.to_string()).unwrap();
        let out = Command::new("ip")
            .args(["netns", "exec", ns, program])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn router(&self) -> Value {
        let bridges: Vec<DomainBridge> =
            self.interfaces.iter().map(|i| i.domain_bridge()).collect();
        let world = World::new(&bridges, &[]);
        let specs =
            PolicySpec::parse_all(&[json!({"from": "pro", "to": "perso", "ports": [8080]})])
                .unwrap();
        let policies = specs.iter().map(|s| world.resolve(s).unwrap()).collect();
        let (plan, _) = RouterPlan::build(RouterPlanInput {
            table: TableName::new("anklume_i8r").unwrap(),
            pattern: BridgePattern::new("net-").unwrap(),
            interfaces: &self.interfaces,
            admin: Some(IfName::new("net-anklume").unwrap()),
            policies,
            logging: router_logging(&RawLogging::default()).unwrap(),
            icmp: false,
            capabilities: Capabilities::ALL,
        })
        .unwrap();
        let content = render::router::router(&plan).unwrap();
        self.module(
            &self.fw,
            APPLY,
            json!({"mode": "router", "content": content, "table": "anklume_i8r",
                   "dest": self.dir.path().join("router.nft"), "persist": false,
                   "interfaces": serde_json::to_value(&self.interfaces).unwrap()}),
        )
    }

    fn routing(&self, state: &str, check: bool) -> Value {
        self.module(
            &self.host,
            ROUTING,
            json!({"state": state, "table": "anklume_i8route", "persist": false,
                   "dest": self.dir.path().join("route.nft"),
                   "interfaces": serde_json::to_value(&self.interfaces).unwrap(),
                   "_ansible_check_mode": check}),
        )
    }

    fn addr(to: usize, v6: bool) -> String {
        let n = DOMAINS[to].1;
        if v6 {
            format!("fd98:{n}::10")
        } else {
            format!("10.98.{n}.10")
        }
    }

    fn ping(&self, from: usize, to: usize, v6: bool) -> bool {
        let fam = if v6 { "-6" } else { "-4" };
        sh(
            &self.domains[from],
            &format!(
                "busybox ping {fam} -c 1 -W 1 {} >/dev/null",
                Self::addr(to, v6)
            ),
        )
        .status
        .success()
    }

    fn tcp(&self, from: usize, to: usize, port: u16, v6: bool) -> bool {
        let target = if v6 {
            format!("TCP6:[{}]:{port}", Self::addr(to, true))
        } else {
            format!("TCP4:{}:{port}", Self::addr(to, false))
        };
        sh(
            &self.domains[from],
            &format!("timeout 3 socat -T 1 /dev/null {target},connect-timeout=1"),
        )
        .status
        .success()
    }
}

impl Drop for World3 {
    fn drop(&mut self) {
        for child in &mut self.listeners {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.domains.iter().chain([&self.host, &self.fw]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn vm_mode_routes_through_the_firewall_fails_closed_and_is_removable() {
    let w = World3::new("vm");
    // Before anything: the host isolation drops cross-domain forwards.
    assert!(!w.ping(ADMIN, PRO, false));

    let router = w.router();
    assert_eq!(router["failed"], false, "{router}");
    let dry = w.routing("present", true);
    assert_eq!(dry["changed"], true, "{dry}");
    assert!(!w.ping(ADMIN, PRO, false), "check mode changed nothing");
    let steer = w.routing("present", false);
    assert_eq!(steer["failed"], false, "{steer}");
    assert_eq!(steer["changed"], true);
    assert_eq!(w.routing("present", false)["changed"], false, "idempotent");

    for v6 in [false, true] {
        assert!(
            w.ping(ADMIN, PRO, v6),
            "admin -> pro through the firewall, v6={v6}"
        );
        assert!(w.ping(ADMIN, PERSO, v6), "admin -> perso, v6={v6}");
        assert!(
            w.tcp(ADMIN, PERSO, 8081, v6),
            "admin -> perso:8081, v6={v6}"
        );
        assert!(!w.ping(PRO, ADMIN, v6), "pro -> admin, v6={v6}");
        assert!(!w.ping(PRO, PERSO, v6), "pro -> perso (icmp off), v6={v6}");
        assert!(w.tcp(PRO, PERSO, 8080, v6), "policy port, v6={v6}");
        assert!(!w.tcp(PRO, PERSO, 8081, v6), "its neighbour, v6={v6}");
        assert!(!w.tcp(PERSO, PRO, 8080, v6), "the reverse, v6={v6}");
    }
    // Same-domain and the host's own gateway are untouched.
    assert!(sh(
        &w.domains[PRO],
        "busybox ping -c 1 -W 1 10.98.11.1 >/dev/null"
    )
    .status
    .success());

    // The firewall goes away: nothing crosses, either family.
    must(
        &w.fw,
        "for l in net-anklume net-pro net-perso; do ip link set $l down; done",
    );
    for v6 in [false, true] {
        assert!(!w.ping(ADMIN, PRO, v6), "firewall down, v6={v6}");
        assert!(
            !w.tcp(PRO, PERSO, 8080, v6),
            "firewall down, policy port, v6={v6}"
        );
    }
    // It comes back (the boot hook's job in an instance; here, a re-run).
    let again = w.router();
    assert_eq!(again["changed"], true, "{again}");
    for v6 in [false, true] {
        let attempts = (1..=10).find(|_| w.ping(ADMIN, PRO, v6));
        eprintln!("firewall back, v6={v6}: answered at attempt {attempts:?}");
        assert!(attempts.is_some(), "firewall back, v6={v6}");
    }

    // Without the host's steering, the host isolation drops what an
    // instance sends through its gateway: the firewall cannot be bypassed.
    let removed = w.routing("absent", false);
    assert_eq!(removed["changed"], true, "{removed}");
    assert!(
        !must(&w.host, "ip rule show").contains("lookup 16"),
        "our rules are gone"
    );
    assert!(must(&w.host, "nft list tables").contains("anklume_i8h"));
    assert!(!must(&w.host, "nft list tables").contains("anklume_i8route"));
    for v6 in [false, true] {
        assert!(
            !w.ping(ADMIN, PRO, v6),
            "no steering: host isolation drops, v6={v6}"
        );
    }
    assert_eq!(w.routing("absent", false)["changed"], false);
    assert!(!Path::new(&w.dir.path().join("route.nft")).exists());
}
