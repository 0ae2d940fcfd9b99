//! `firewall_router_apply` in mode router, against the real kernel: a
//! firewall namespace with one veth per domain (created under a wrong name,
//! found by MAC), three domain namespaces whose default route is the
//! firewall, the router ruleset rendered by the library, and real traffic
//! (IPv4 and IPv6) through it. Needs root (`ip netns add`), as `make test`
//! is run. Every namespace and process is this test's own and is removed.

use anklume_isolation::model::firewall::FirewallInterface;
use anklume_isolation::model::logging::RawLogging;
use anklume_isolation::model::{BridgePattern, DomainBridge, IfName, PolicySpec, TableName, World};
use anklume_isolation::plan::router::{router_logging, RouterPlan, RouterPlanInput};
use anklume_isolation::plan::Capabilities;
use anklume_isolation::render;
use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};

const MODULE: &str = env!("CARGO_BIN_EXE_firewall_router_apply");
const TABLE: &str = "anklume_i8";
/// Domains of the test: (bridge, third octet / IPv6 group).
mod common;
use common::{must, sh};

const DOMAINS: [(&str, u8); 3] = [("net-anklume", 10), ("net-pro", 11), ("net-perso", 12)];

struct Lab {
    fw: String,
    domains: Vec<String>,
    listeners: Vec<Child>,
    interfaces: Vec<FirewallInterface>,
}

fn interfaces() -> Vec<FirewallInterface> {
    let pattern = BridgePattern::new("net-").unwrap();
    DOMAINS
        .iter()
        .map(|(b, n)| {
            let mut bridge = DomainBridge::new(IfName::new(b).unwrap(), &pattern).unwrap();
            bridge.ipv4 = Some(format!("10.99.{n}.1/24").parse().unwrap());
            bridge.ipv6 = Some(format!("fd99:{n}::1/64").parse().unwrap());
            FirewallInterface::derive("fw", &bridge, 253).unwrap()
        })
        .collect()
}

impl Lab {
    fn new(tag: &str) -> Lab {
        let pid = std::process::id();
        let fw = format!("ank-i8-{tag}-fw-{pid}");
        let interfaces = interfaces();
        let mut lab = Lab {
            fw: fw.clone(),
            domains: vec![],
            listeners: vec![],
            interfaces,
        };
        let add = |name: &str| {
            let ok = Command::new("ip").args(["netns", "add", name]).status();
            assert!(
                ok.is_ok_and(|s| s.success()),
                "`ip netns add` failed: these tests need root and iproute2"
            );
        };
        add(&fw);
        // A new namespace inherits IPv4 forwarding from the host's: start
        // from a kernel that does not forward, as a fresh instance does.
        must(
            &fw,
            "ip link set lo up && echo 0 >/proc/sys/net/ipv4/ip_forward && \
             echo 0 >/proc/sys/net/ipv6/conf/all/forwarding",
        );
        for (i, (_, n)) in DOMAINS.iter().enumerate() {
            let ns = format!("ank-i8-{tag}-d{n}-{pid}");
            add(&ns);
            lab.domains.push(ns.clone());
            let mac = lab.interfaces[i].hwaddr;
            // A wrong name on the firewall side: the module must find the
            // link by its MAC and rename it, as in a VM.
            must(
                &fw,
                &format!("ip link add tmp{i} address {mac} type veth peer name eth0 netns {ns}"),
            );
            must(
                &ns,
                &format!(
                    "ip link set lo up && ip addr add 10.99.{n}.10/24 dev eth0 && \
                     ip -6 addr add fd99:{n}::10/64 dev eth0 nodad && ip link set eth0 up && \
                     ip route add default via 10.99.{n}.253 && \
                     ip -6 route add default via fd99:{n}::fd"
                ),
            );
            for port in [8080, 8081] {
                lab.listen(&ns, port);
            }
        }
        lab.listen(&fw.clone(), 8080);
        lab
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

    fn ruleset(&self, policies: Value) -> String {
        let bridges: Vec<DomainBridge> =
            self.interfaces.iter().map(|i| i.domain_bridge()).collect();
        let world = World::new(&bridges, &[]);
        let specs = PolicySpec::parse_all(policies.as_array().unwrap()).unwrap();
        let policies = specs.iter().map(|s| world.resolve(s).unwrap()).collect();
        let (plan, _) = RouterPlan::build(RouterPlanInput {
            table: TableName::new(TABLE).unwrap(),
            pattern: BridgePattern::new("net-").unwrap(),
            interfaces: &self.interfaces,
            admin: Some(IfName::new("net-anklume").unwrap()),
            policies,
            logging: router_logging(&RawLogging::default()).unwrap(),
            icmp: false,
            capabilities: Capabilities::ALL,
        })
        .unwrap();
        render::router::router(&plan).unwrap()
    }

    fn module(&self, args: Value) -> Value {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("args");
        std::fs::write(&path, args.to_string()).unwrap();
        let out = Command::new("ip")
            .args(["netns", "exec", &self.fw, MODULE])
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

    fn ns_of(&self, domain: usize) -> &str {
        &self.domains[domain]
    }

    /// ICMP echo from one domain to another's instance (one packet, 1 s).
    fn ping(&self, from: usize, to: usize, v6: bool) -> bool {
        let n = DOMAINS[to].1;
        let addr = if v6 {
            format!("fd99:{n}::10")
        } else {
            format!("10.99.{n}.10")
        };
        let fam = if v6 { "-6" } else { "-4" };
        sh(
            self.ns_of(from),
            &format!("busybox ping {fam} -c 1 -W 1 {addr} >/dev/null"),
        )
        .status
        .success()
    }

    /// A TCP connection (1 s budget) to `addr:port` from a domain.
    fn tcp(&self, from: usize, addr: &str, port: u16) -> bool {
        let target = if addr.contains(':') {
            format!("TCP6:[{addr}]:{port}")
        } else {
            format!("TCP4:{addr}:{port}")
        };
        sh(
            self.ns_of(from),
            &format!("timeout 3 socat -T 1 /dev/null {target},connect-timeout=1"),
        )
        .status
        .success()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.listeners {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.domains.iter().chain([&self.fw]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

const ADMIN: usize = 0;
const PRO: usize = 1;
const PERSO: usize = 2;

fn args(lab: &Lab, content: &str, dest: &std::path::Path, check: bool) -> Value {
    json!({
        "mode": "router", "content": content, "table": TABLE, "dest": dest,
        "persist": false, "interfaces": serde_json::to_value(&lab.interfaces).unwrap(),
        "_ansible_check_mode": check,
    })
}

#[test]
fn the_router_forwards_only_what_the_ruleset_allows_over_ipv4_and_ipv6() {
    let lab = Lab::new("fwd");
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("router.nft");
    let content = lab.ruleset(json!([
        {"from": "pro", "to": "perso", "ports": [8080]}
    ]));

    // Before: no addresses on the firewall, no forwarding: nothing passes
    // (and check mode changes nothing).
    assert!(!lab.ping(ADMIN, PRO, false));
    let dry = lab.module(args(&lab, &content, &dest, true));
    assert_eq!(dry["failed"], false, "{dry}");
    assert_eq!(dry["changed"], true);
    assert!(!dest.exists());
    assert!(must(&lab.fw, "ip -br link").contains("tmp0"));
    must(
        &lab.fw,
        "for l in tmp0 tmp1 tmp2; do echo 2 >/proc/sys/net/ipv6/conf/$l/accept_ra; done",
    );

    let first = lab.module(args(&lab, &content, &dest, false));
    assert_eq!(first["failed"], false, "{first}");
    assert_eq!(first["changed"], true);
    let links = must(&lab.fw, "ip -br addr");
    for (bridge, n) in DOMAINS {
        assert!(links.contains(bridge), "{links}");
        assert!(links.contains(&format!("10.99.{n}.253/24")), "{links}");
        assert!(links.contains(&format!("fd99:{n}::fd/64")), "{links}");
    }
    assert_eq!(
        must(&lab.fw, "cat /proc/sys/net/ipv4/ip_forward").trim(),
        "1"
    );
    assert_eq!(
        must(&lab.fw, "cat /proc/sys/net/ipv6/conf/all/forwarding").trim(),
        "1"
    );

    for v6 in [false, true] {
        // Admin reaches every domain; replies come back.
        assert!(lab.ping(ADMIN, PRO, v6), "admin -> pro, v6={v6}");
        assert!(lab.ping(ADMIN, PERSO, v6), "admin -> perso, v6={v6}");
        // Nothing new enters the admin domain; non-admin domains are apart
        // (icmp: false here).
        assert!(!lab.ping(PRO, ADMIN, v6), "pro -> admin, v6={v6}");
        assert!(!lab.ping(PRO, PERSO, v6), "pro -> perso, v6={v6}");
        assert!(!lab.ping(PERSO, PRO, v6), "perso -> pro, v6={v6}");
    }
    for (perso, fw) in [
        ("10.99.12.10", "10.99.11.253"),
        ("fd99:12::10", "fd99:11::fd"),
    ] {
        // The policy port crosses, its neighbour does not, nor the reverse.
        assert!(lab.tcp(PRO, perso, 8080), "pro -> perso:8080 {perso}");
        assert!(!lab.tcp(PRO, perso, 8081), "pro -> perso:8081 {perso}");
        assert!(lab.tcp(ADMIN, perso, 8081), "admin -> perso:8081 {perso}");
        // The firewall itself refuses connections (a listener is there).
        assert!(!lab.tcp(PRO, fw, 8080), "pro -> firewall {fw}");
    }
    let pro = "10.99.11.10";
    assert!(!lab.tcp(PERSO, pro, 8080), "perso -> pro:8080");

    // Idempotent.
    let second = lab.module(args(&lab, &content, &dest, false));
    assert_eq!(second["changed"], false, "{second}");
}

#[test]
fn a_missing_nic_fails_before_anything_is_forwarded() {
    let lab = Lab::new("miss");
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("router.nft");
    let content = lab.ruleset(json!([]));
    must(&lab.fw, "ip link del tmp2");
    let out = lab.module(args(&lab, &content, &dest, false));
    assert_eq!(out["failed"], true, "{out}");
    let msg = out["msg"].as_str().unwrap();
    assert!(msg.contains("no interface with MAC"), "{msg}");
    assert_eq!(
        must(&lab.fw, "cat /proc/sys/net/ipv4/ip_forward").trim(),
        "0"
    );
}

#[test]
fn the_boot_hook_is_valid_sh() {
    let script = anklume_isolation::plan::router::links::boot_script(
        &interfaces(),
        std::path::Path::new("/etc/nftables.d/r.nft"),
        std::path::Path::new("/usr/sbin/nft"),
    );
    let out = Command::new("sh")
        .args(["-n", "-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
