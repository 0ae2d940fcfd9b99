//! Golden rulesets of the firewall router (vm mode), compared byte for byte
//! with `tests/golden/router-*.nft` and each checked by the real `nft -c` in
//! a throwaway user and network namespace (`unshare -rn`).
//!
//! After an intended change: `UPDATE_GOLDEN=1 cargo test --test
//! golden_router`, then review the diff of `tests/golden/`.

mod common;
use common::nft_check;

use anklume_isolation::model::firewall::FirewallInterface;
use anklume_isolation::model::logging::RawLogging;
use anklume_isolation::model::{
    BridgePattern, DomainBridge, IfName, Machine, Name, PolicySpec, TableName, World,
};
use anklume_isolation::plan::router::{router_logging, RouterPlan, RouterPlanInput};
use anklume_isolation::plan::Capabilities;
use anklume_isolation::render;
use serde_json::{json, Value};

struct Case {
    name: &'static str,
    admin: Option<&'static str>,
    policies: Value,
    logging: RawLogging,
    icmp: bool,
    capabilities: Capabilities,
}

impl Case {
    fn new(name: &'static str) -> Self {
        Case {
            name,
            admin: Some("net-anklume"),
            policies: json!([]),
            logging: RawLogging::default(),
            icmp: true,
            capabilities: Capabilities::ALL,
        }
    }
}

fn interfaces() -> Vec<FirewallInterface> {
    let pattern = BridgePattern::new("net-").unwrap();
    [("net-anklume", 10), ("net-pro", 11), ("net-perso", 12)]
        .iter()
        .map(|(b, n)| {
            let mut bridge = DomainBridge::new(IfName::new(b).unwrap(), &pattern).unwrap();
            bridge.ipv4 = Some(format!("10.251.{n}.1/24").parse().unwrap());
            bridge.ipv6 = Some(format!("fd42:251:{n}::1/64").parse().unwrap());
            FirewallInterface::derive("anklume-firewall", &bridge, 253).unwrap()
        })
        .collect()
}

fn render_case(case: &Case) -> String {
    let ifaces = interfaces();
    let bridges: Vec<DomainBridge> = ifaces.iter().map(|i| i.domain_bridge()).collect();
    let mut nas = Machine::new(
        Name::new("machine", "nas").unwrap(),
        "default",
        IfName::new("net-perso").unwrap(),
    );
    nas.ipv4 = ["10.251.12.10".parse().unwrap()].into();
    nas.ipv6 = ["fd42:251:12::10".parse().unwrap()].into();
    (nas.ipv4_filtering, nas.ipv6_filtering) = (true, true);
    let machines = vec![nas];
    let world = World::new(&bridges, &machines);
    let specs = PolicySpec::parse_all(case.policies.as_array().unwrap()).unwrap();
    let policies = specs.iter().map(|s| world.resolve(s).unwrap()).collect();
    let (plan, _) = RouterPlan::build(RouterPlanInput {
        table: TableName::new("anklume").unwrap(),
        pattern: BridgePattern::new("net-").unwrap(),
        interfaces: &ifaces,
        admin: case.admin.map(|a| IfName::new(a).unwrap()),
        policies,
        logging: router_logging(&case.logging).unwrap(),
        icmp: case.icmp,
        capabilities: case.capabilities,
    })
    .unwrap();
    render::router::router(&plan).unwrap()
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            policies: json!([
                {"description": "Pro reaches the perso web API", "from": "pro", "to": "perso",
                 "ports": [8080, "9000-9010"], "protocol": "tcp"},
                {"from": "pro", "to": "nas", "ports": [22]},
                {"from": "nas", "to": "pro", "ports": "all"},
                {"from": "perso", "to": "pro", "ports": "all", "bidirectional": true}
            ]),
            ..Case::new("router-policies")
        },
        // The same policies without the port-less pair that subsumes them:
        // each pair jumps to its own chain of exceptions.
        Case {
            policies: json!([
                {"from": "pro", "to": "perso", "ports": [8080, "9000-9010"], "protocol": "tcp"},
                {"from": "pro", "to": "nas", "ports": [22]},
                {"from": "nas", "to": "pro", "ports": "all"},
                {"from": "nas", "to": "anklume", "ports": [53], "protocol": "udp",
                 "bidirectional": true}
            ]),
            ..Case::new("router-pairs")
        },
        Case {
            admin: None,
            icmp: false,
            logging: RawLogging {
                enabled: Some(false),
                ..RawLogging::default()
            },
            ..Case::new("router-strict")
        },
        Case {
            capabilities: Capabilities {
                log: false,
                limit: true,
                conntrack: false,
            },
            ..Case::new("router-degraded")
        },
    ]
}

#[test]
fn router_golden_rulesets_match_and_pass_nft_check() {
    common::check_goldens(
        cases()
            .iter()
            .map(|case| (case.name.to_string(), render_case(case))),
    );
}

#[test]
fn router_defaults_follow_anklume() {
    let text = render_case(&Case::new("defaults"));
    // Policy drop on forward and input, logging on with prefix FW and one
    // rate limit for every log line.
    assert!(text.contains("type filter hook forward priority filter; policy drop;"));
    assert!(text.contains("type filter hook input priority filter; policy drop;"));
    for prefix in [
        "FW-ADMIN-FWD: ",
        "FW-DENY-PRO: ",
        "FW-DENY-PERSO: ",
        "FW-DENY-ANKLUME: ",
        "FW-INVALID: ",
        "FW-DROP: ",
        "FW-INPUT-DROP: ",
    ] {
        assert!(
            text.contains(&format!("log prefix \"{prefix}\"")),
            "{prefix}"
        );
    }
    let logs = text.matches(" log prefix ").count();
    let limited = text.matches("limit name \"log_budget\" log prefix").count();
    assert_eq!(logs, limited, "every log line is behind the shared limit");
    assert!(text.contains("meta l4proto { 1, 58 } accept"));
    // Protocol names other than nft's keywords resolve through
    // /etc/protocols, which minimal systems (Debian minbase) lack.
    assert!(!text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .any(|l| l.contains("ipv6-icmp")));
    let strict = render_case(&Case {
        icmp: false,
        ..Case::new("no-icmp")
    });
    let cross_domain = |text: &str| {
        let from = text.find("chain cross_domain").unwrap();
        let to = text.find("chain input").unwrap();
        text[from..to].to_string()
    };
    assert!(cross_domain(&text).contains("l4proto { 1, 58 }"));
    assert!(
        !cross_domain(&strict).contains("l4proto"),
        "icmp: false removes ICMP from the cross-domain accepts"
    );
}

#[test]
fn router_nft_check_is_not_a_rubber_stamp() {
    let text = render_case(&Case::new("broken")).replacen(
        "log prefix \"FW-DENY-PRO: \"",
        "log prefix FW DENY PRO",
        1,
    );
    assert!(nft_check(&text).is_err());
}
