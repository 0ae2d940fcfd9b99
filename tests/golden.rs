//! Golden rulesets: representative inputs rendered and compared byte for
//! byte with `tests/golden/*.nft`, and every one of them checked by the real
//! `nft -c` inside a throwaway user and network namespace (`unshare -rn`),
//! so a quoting or syntax slip cannot hide behind a substring test.
//!
//! After an intended change to the output: `UPDATE_GOLDEN=1 cargo test
//! --test golden` writes the files and fails (so a changed golden file is
//! never accepted by a green run); review the diff of `tests/golden/`, then
//! run the test again without it.

mod common;
use common::nft_check;

use anklume_isolation::model::logging::RawLogging;
use anklume_isolation::model::{
    parse_protected_networks, BridgePattern, DomainBridge, DomainSettings, GatewayServices, IfName,
    LogSettings, Machine, Name, PolicySpec, TableName, World,
};
use anklume_isolation::plan::{Capabilities, HostPlan, HostPlanInput};
use anklume_isolation::render;
use serde_json::{json, Value};

struct Case {
    name: &'static str,
    bridges: &'static [&'static str],
    admin: Option<&'static str>,
    machines: Vec<Machine>,
    policies: Value,
    logging: bool,
    capabilities: Capabilities,
    /// The `domains` option.
    domains: Value,
    protected: &'static [&'static str],
    /// Bridges with subnets (10.<i>.0.1/24, fd00:<i>::1/64), as Incus
    /// reports them.
    subnets: bool,
}

impl Case {
    fn new(name: &'static str) -> Self {
        Case {
            name,
            bridges: &["net-anklume", "net-pro", "net-perso"],
            admin: None,
            machines: vec![],
            policies: json!([]),
            logging: false,
            capabilities: Capabilities::ALL,
            domains: json!({}),
            protected: &[],
            subnets: false,
        }
    }
}

fn machine(name: &str, bridge: &str, v4: &[&str], v6: &[&str]) -> Machine {
    let mut m = Machine::new(
        Name::new("machine", name).unwrap(),
        "default",
        IfName::new(bridge).unwrap(),
    );
    m.ipv4 = v4.iter().map(|a| a.parse().unwrap()).collect();
    m.ipv6 = v6.iter().map(|a| a.parse().unwrap()).collect();
    m
}

/// A machine with its NIC's MAC, MAC filtering on.
fn machine_mac(name: &str, bridge: &str, mac: &str, v4: &[&str], v6: &[&str]) -> Machine {
    let mut m = machine(name, bridge, v4, v6);
    m.hwaddr = Some(mac.parse().unwrap());
    m.mac_filtering = true;
    m
}

fn render_case(case: &Case) -> String {
    let pattern = BridgePattern::new("net-").unwrap();
    let bridges: Vec<DomainBridge> = case
        .bridges
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let mut b = DomainBridge::new(IfName::new(b).unwrap(), &pattern).unwrap();
            if case.subnets {
                b.ipv4 = Some(format!("10.{i}.0.1/24").parse().unwrap());
                b.ipv6 = Some(format!("fd00:{i}::1/64").parse().unwrap());
                b.subnets_known = true;
            }
            b
        })
        .collect();
    let specs = PolicySpec::parse_all(case.policies.as_array().unwrap()).unwrap();
    let world = World::new(&bridges, &case.machines);
    let policies = specs.iter().map(|s| world.resolve(s).unwrap()).collect();
    let logging = LogSettings::from_raw(&RawLogging {
        enabled: Some(case.logging),
        ..RawLogging::default()
    })
    .unwrap();
    let (mut plan, _) = HostPlan::build(HostPlanInput {
        protected_networks: parse_protected_networks(case.protected).unwrap(),
        domain_settings: DomainSettings::parse(
            &serde_json::from_value(case.domains.clone()).unwrap(),
        )
        .unwrap(),
        table: TableName::new("anklume").unwrap(),
        pattern,
        bridges: &bridges,
        admin: case.admin.map(|a| IfName::new(a).unwrap()),
        policies,
        gateway: GatewayServices::defaults(),
        logging,
        capabilities: case.capabilities,
    })
    .unwrap();
    plan.add_machines(&case.machines);
    render::host(&plan).unwrap()
}

fn cases() -> Vec<Case> {
    vec![
        Case::new("strict"),
        Case {
            admin: Some("net-anklume"),
            ..Case::new("admin")
        },
        Case {
            machines: vec![
                machine("nas", "net-perso", &["10.20.0.10"], &[]),
                machine("backup", "net-pro", &["10.10.0.20"], &["fd00:10::20"]),
                machine("desk", "net-perso", &["10.20.0.11"], &["fd00:20::11"]),
            ],
            policies: json!([
                {"description": "Pro reaches the perso web API", "from": "pro", "to": "perso",
                 "ports": [8080, "9000-9010"], "protocol": "tcp"},
                {"description": "Backup to the NAS over SSH", "from": "backup", "to": "nas", "ports": [22]},
                {"from": "desk", "to": "pro", "ports": "all", "bidirectional": true},
                {"from": "perso", "to": "host", "ports": [53, "5353-5354"], "protocol": "udp"},
                {"from": "backup", "to": "host", "ports": "all"},
                {"from": "anklume", "to": "pro", "ports": "all"},
                {"description": "Both machines have IPv6: the widest concatenations", "from": "backup",
                 "to": "desk", "ports": [443], "bidirectional": true},
                {"from": "desk", "to": "pro", "ports": ["8443-8444"], "protocol": "udp"}
            ]),
            ..Case::new("policies")
        },
        Case {
            admin: Some("net-anklume"),
            logging: true,
            policies: json!([
                {"from": "pro", "to": "perso", "ports": [443]},
                {"from": "perso", "to": "host", "ports": [2223]}
            ]),
            ..Case::new("logging")
        },
        // Found by fuzzing: overlapping and adjacent ports, in one policy and
        // across policies between the same ends, and a domain and a machine
        // of it on the same pair (nft refuses overlapping set elements).
        Case {
            machines: vec![
                machine("nas", "net-perso", &["10.20.0.10"], &["fd00:20::10"]),
                machine("backup", "net-pro", &["10.10.0.20"], &["fd00:10::20"]),
            ],
            policies: json!([
                {"from": "pro", "to": "perso", "ports": [22, "1-1024"]},
                {"from": "pro", "to": "perso", "ports": [443]},
                {"from": "pro", "to": "perso", "ports": [1025, "2000-2010", "2005-2020"]},
                {"from": "pro", "to": "perso", "ports": [53], "protocol": "udp"},
                {"from": "backup", "to": "nas", "ports": [22, "20-30"]},
                {"from": "backup", "to": "nas", "ports": [31]},
                {"from": "pro", "to": "nas", "ports": [8080]},
                {"from": "pro", "to": "nas", "ports": ["8000-8100"]},
                {"from": "backup", "to": "perso", "ports": "all"},
                {"from": "backup", "to": "nas", "ports": "all"},
                {"from": "perso", "to": "host", "ports": [53, "50-60"], "protocol": "udp"},
                {"from": "nas", "to": "host", "ports": [22]},
                {"from": "nas", "to": "host", "ports": ["1-100"]}
            ]),
            ..Case::new("overlaps")
        },
        // Inbound from networks outside the domains: overlapping networks
        // into one domain (plain rules, not a set, so they may overlap), both
        // families, a network covering every domain subnet, logged drops.
        Case {
            logging: true,
            policies: json!([
                {"from": "192.168.1.10/32", "to": "pro", "ports": [22]},
                {"from": "192.168.1.0/24", "to": "pro", "ports": [22, 443]},
                {"from": "2001:db8:251::/64", "to": "pro", "ports": "all"},
                {"from": "10.0.0.0/8", "to": "perso", "ports": [53], "protocol": "udp"},
                {"from": "perso", "to": "198.51.100.0/24", "ports": [443]}
            ]),
            ..Case::new("inbound")
        },
        // Internet per domain: one closed, one on two ports with a policy to
        // a network; the third unrestricted (its policy to a network is a
        // no-op).
        Case {
            logging: true,
            domains: json!({
                "pro": {"internet": false},
                "perso": {"egress": [{"protocol": "udp", "port": 53}, {"protocol": "tcp", "port": "443-444"}]},
                "anklume": {"internet": true}
            }),
            policies: json!([
                {"from": "pro", "to": "198.51.100.0/24", "ports": [80]},
                {"from": "perso", "to": "2001:db8:251::/64", "ports": "all"},
                {"from": "anklume", "to": "192.0.2.0/24", "ports": [22]}
            ]),
            ..Case::new("egress")
        },
        // Internet per domain without logging: a closed domain is a plain
        // `drop` in the egress map (no chain); two domains sharing a port
        // list jump to that list's chain, one with a list of its own is an
        // element of `egress_ports` (its chain shared too), and one with a
        // policy to a network has its chain, which goes on to its list's.
        Case {
            bridges: &["net-anklume", "net-pro", "net-perso", "net-lab", "net-dmz"],
            domains: json!({
                "pro": {"internet": false},
                "perso": {"egress": [{"protocol": "udp", "port": 53}, {"protocol": "tcp", "port": "443-444"}]},
                "lab": {"egress": [{"protocol": "tcp", "port": "443-444"}, {"protocol": "udp", "port": 53}]},
                "dmz": {"egress": [{"protocol": "udp", "port": 53}, {"protocol": "tcp", "port": "443-444"}]},
                "anklume": {"egress": [{"protocol": "tcp", "port": 443}]}
            }),
            policies: json!([
                {"from": "dmz", "to": "192.0.2.0/24", "ports": [22]}
            ]),
            ..Case::new("egress-unlogged")
        },
        // Protected networks: overlapping entries aggregated (nft refuses
        // overlapping interval elements), both families, one opened by a
        // policy, with a restricted domain beside them.
        Case {
            logging: true,
            protected: &[
                "198.18.0.0/24",
                "198.18.0.0/25",
                "198.18.1.0/24",
                "2001:db8:252::/64",
            ],
            domains: json!({"perso": {"internet": false}}),
            policies: json!([
                {"from": "pro", "to": "198.18.0.10/32", "ports": [22]},
                {"from": "perso", "to": "2001:db8:252::/64", "ports": "all"}
            ]),
            ..Case::new("protected")
        },
        // Isolation inside a domain: pro isolates its machines (one without
        // IPv6), with a policy on a port, a port-less one, a domain-wide one
        // and one to another domain (the inet table's business); logged.
        Case {
            logging: true,
            subnets: true,
            machines: vec![
                machine_mac(
                    "pro-a",
                    "net-pro",
                    "00:16:3e:01:00:0a",
                    &["10.1.0.10"],
                    &["fd00:1::10"],
                ),
                machine_mac(
                    "pro-b",
                    "net-pro",
                    "00:16:3e:01:00:0b",
                    &["10.1.0.11"],
                    &["fd00:1::11"],
                ),
                machine_mac("pro-c", "net-pro", "00:16:3e:01:00:0c", &["10.1.0.12"], &[]),
                machine_mac("nas", "net-perso", "00:16:3e:02:00:0a", &["10.2.0.10"], &[]),
            ],
            domains: json!({"pro": {"isolate_machines": true}}),
            policies: json!([
                {"from": "pro-a", "to": "pro-b", "ports": [22, "8000-8010"]},
                {"from": "pro-b", "to": "pro-c", "ports": "all"},
                {"from": "pro", "to": "pro", "ports": [5353], "protocol": "udp"},
                {"from": "pro-c", "to": "nas", "ports": [443]}
            ]),
            ..Case::new("isolate")
        },
        // Two isolated domains, no policy, no logging: the drops alone.
        Case {
            subnets: true,
            machines: vec![
                machine_mac("pro-a", "net-pro", "00:16:3e:01:00:0a", &["10.1.0.10"], &[]),
                machine_mac(
                    "nas",
                    "net-perso",
                    "00:16:3e:02:00:0a",
                    &["10.2.0.10"],
                    &["fd00:2::10"],
                ),
            ],
            domains: json!({"pro": {"isolate_machines": true}, "perso": {"isolate_machines": true}}),
            ..Case::new("isolate-strict")
        },
        Case {
            logging: true,
            capabilities: Capabilities {
                log: false,
                limit: true,
                conntrack: false,
            },
            ..Case::new("degraded")
        },
    ]
}

#[test]
fn golden_rulesets_match_and_pass_nft_check() {
    common::check_goldens(
        cases()
            .iter()
            .map(|case| (case.name.to_string(), render_case(case))),
    );
}

#[test]
fn nft_check_is_not_a_rubber_stamp() {
    // The same check must refuse a broken ruleset, or the test above proves
    // nothing: an unquoted log prefix with a space, as a past bug shipped.
    let mut text = render_case(&Case {
        logging: true,
        ..Case::new("broken")
    });
    text = text.replacen(
        "log prefix \"ANKLUME-DENY-ANKLUME: \"",
        "log prefix ANKLUME DENY",
        1,
    );
    assert!(nft_check(&text).is_err());
}

/// The fuzz cases of issue 6, kept: random domains, machines and policies
/// with overlapping and adjacent ports, in one policy and across policies
/// between the same ends, domains and their machines on the same pairs. Every
/// plan that builds must render a ruleset `nft -c` accepts; every refusal
/// must name the entry. All rulesets go through one `nft -c`, one table each.
#[test]
fn fuzzed_policies_render_what_nft_accepts_or_are_refused_naming_the_entry() {
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }
    let mut rng = Rng(0x5eed_0f15_5e06);
    // nft -c in batches: one netlink message holds only so much.
    let mut batches = vec![String::new()];
    let (mut rendered, mut refused) = (0, 0);
    for case in 0..300 {
        let n = 2 + rng.below(4) as usize;
        let pattern = BridgePattern::new("net-").unwrap();
        let bridges: Vec<DomainBridge> = (0..n)
            .map(|i| {
                let mut b = DomainBridge::new(IfName::new(&format!("net-d{i}")).unwrap(), &pattern)
                    .unwrap();
                b.ipv4 = Some(format!("10.{i}.0.1/24").parse().unwrap());
                b.ipv6 = Some(format!("fd00:{i}::1/64").parse().unwrap());
                b.subnets_known = true;
                b
            })
            .collect();
        let mut machines = Vec::new();
        for i in 0..n {
            for m in 0..rng.below(3) {
                let v4 = format!("10.{i}.0.{}", 10 + m);
                let v6 = format!("fd00:{i}::{}", 10 + m);
                let six: &[&str] = if rng.below(2) == 0 { &[&v6] } else { &[] };
                machines.push(machine(
                    &format!("m{i}x{m}"),
                    &format!("net-d{i}"),
                    &[&v4],
                    six,
                ));
            }
        }
        let mut names: Vec<String> = (0..n).map(|i| format!("d{i}")).collect();
        names.extend(machines.iter().map(|m| m.name.to_string()));
        names.push("host".into());
        let mut policies = Vec::new();
        for _ in 0..1 + rng.below(8) {
            let from = names[rng.below(names.len() as u64) as usize].clone();
            let to = names[rng.below(names.len() as u64) as usize].clone();
            if from == "host" && to == "host" {
                continue;
            }
            let ports: Value = if rng.below(6) == 0 {
                json!("all")
            } else {
                (0..1 + rng.below(3))
                    .map(|_| {
                        let first = 1 + rng.below(30);
                        match rng.below(3) {
                            0 => json!(first),
                            1 => json!(format!("{first}-{}", first + rng.below(20))),
                            _ => json!(format!("1-{}", first + 10)),
                        }
                    })
                    .collect()
            };
            let mut entry = json!({"from": from, "to": to, "ports": ports,
                                   "bidirectional": rng.below(3) == 0});
            if rng.below(2) == 0 {
                entry["protocol"] = json!(["tcp", "udp"][rng.below(2) as usize]);
            }
            policies.push(entry);
        }
        let built = (|| -> anyhow::Result<String> {
            let specs = PolicySpec::parse_all(&policies)?;
            let mut machines = machines.clone();
            anklume_isolation::model::confine_to_bridges(&mut machines, &bridges);
            let world = World::new(&bridges, &machines);
            let resolved = specs
                .iter()
                .map(|s| world.resolve(s))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let (plan, _) = HostPlan::build(HostPlanInput {
                protected_networks: Vec::new(),
                domain_settings: Default::default(),
                table: TableName::new(&format!("fuzz{case}")).unwrap(),
                pattern: pattern.clone(),
                bridges: &bridges,
                admin: None,
                policies: resolved,
                gateway: GatewayServices::defaults(),
                logging: None,
                capabilities: Capabilities::ALL,
            })?;
            render::host(&plan)
        })();
        match built {
            Ok(ruleset) => {
                rendered += 1;
                if rendered % 8 == 0 {
                    batches.push(String::new());
                }
                batches.last_mut().unwrap().push_str(&ruleset);
            }
            Err(err) => {
                refused += 1;
                let msg = format!("{err:#}");
                assert!(msg.contains("network policy #"), "case {case}: {msg}");
            }
        }
    }
    assert!(rendered > 250, "{rendered} rendered, {refused} refused");
    for batch in &batches {
        if let Err(err) = nft_check(batch) {
            panic!("nft -c refused a fuzzed ruleset:\n{err}");
        }
    }
}
