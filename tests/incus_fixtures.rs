//! The widening case on JSON recorded from the lab's real daemon
//! (`make record-fixtures`): an instance that also reports another domain's
//! address. The fixture `instances-pro-web-also-reports-10.251.10.77.edited.json`
//! is `instances.json` edited by `lab/record-fixtures.sh` only to add that
//! address to pro-web (on lab-net-pro; 10.251.10.77 is in lab-net-anklume).

use anklume_isolation::model::{
    confine_to_bridges, BridgePattern, GatewayServices, PolicySpec, TableName, World,
};
use anklume_isolation::plan::eval::{CtState, Forwarded, Verdict, L4};
use anklume_isolation::plan::{Capabilities, HostPlan, HostPlanInput};
use anklume_isolation::render;
use anklume_isolation::runner::incus::{parse_instances, parse_networks};
use serde_json::{json, Value};
use std::net::IpAddr;

const NETWORKS: &str = include_str!("fixtures/incus/networks.json");
const WIDENING: &str =
    include_str!("fixtures/incus/instances-pro-web-also-reports-10.251.10.77.edited.json");
const FOREIGN: &str = "10.251.10.77";

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

#[test]
fn an_instance_reporting_another_domains_address_does_not_widen_a_policy() {
    let pattern = BridgePattern::new("lab-net-").unwrap();
    let bridges = parse_networks(&parse(NETWORKS), &pattern).unwrap();
    let names = bridges.iter().map(|b| b.bridge.clone()).collect();
    let mut machines = parse_instances(&parse(WIDENING), &names).unwrap();
    let foreign: IpAddr = FOREIGN.parse().unwrap();
    let web = |ms: &[anklume_isolation::model::Machine]| {
        ms.iter()
            .find(|m| m.name.as_str() == "pro-web")
            .unwrap()
            .clone()
    };
    // Positive control: the fixture does carry the foreign address, and the
    // parser reads it (so the assertions below are not vacuous).
    assert!(web(&machines).ipv4.contains(&FOREIGN.parse().unwrap()));

    confine_to_bridges(&mut machines, &bridges);
    assert!(web(&machines).ignored.contains(&foreign));
    assert!(!web(&machines).ipv4.contains(&FOREIGN.parse().unwrap()));

    let specs = PolicySpec::parse_all(&[json!({
        "description": "The perso desk reaches pro-web only",
        "from": "perso-desk", "to": "pro-web", "ports": [9010]
    })])
    .unwrap();
    let world = World::new(&bridges, &machines);
    let policies: Vec<_> = specs.iter().map(|s| world.resolve(s).unwrap()).collect();
    let warnings = policies[0].warnings.join("\n");
    assert!(
        warnings.contains(&format!(
            "reports {FOREIGN} outside the subnets of its bridge lab-net-pro"
        )),
        "{warnings}"
    );
    let (plan, _) = HostPlan::build(HostPlanInput {
        table: TableName::new("anklume_lab").unwrap(),
        pattern,
        bridges: &bridges,
        admin: None,
        policies,
        gateway: GatewayServices::defaults(),
        logging: None,
        capabilities: Capabilities::ALL,
    })
    .unwrap();
    let text = render::host(&plan).unwrap();
    assert!(!text.contains(FOREIGN), "{text}");
    assert!(
        text.contains("ip saddr 10.251.12.10 ip daddr 10.251.11.11 tcp dport 9010 accept"),
        "{text}"
    );

    let packet = |oif, dst: &str| Forwarded {
        iif: "lab-net-perso",
        oif,
        src: "10.251.12.10".parse().unwrap(),
        dst: dst.parse().unwrap(),
        l4: L4::Tcp(9010),
        ct: CtState::New,
    };
    let eval = plan.evaluator();
    assert_eq!(
        eval.forward(&packet("lab-net-pro", "10.251.11.11")),
        Verdict::Accept
    );
    assert_eq!(
        eval.forward(&packet("lab-net-anklume", FOREIGN)),
        Verdict::Drop
    );
    assert_eq!(eval.forward(&packet("lab-net-pro", FOREIGN)), Verdict::Drop);
}
