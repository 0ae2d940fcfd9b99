//! The revocation evaluator on the golden rulesets as the kernel holds
//! them: each golden is loaded with the real `nft` into its own named
//! network namespace and listed with `nft -j`, and the evaluator must give
//! the recorded verdicts. Whatever shape the renderers give the goldens
//! (sets before issue 6, pair chains after), the same policies give the
//! same verdicts. Needs root (`ip netns add`), as `make test` is run.

use anklume_isolation::revoke::{Admission, Flow, Interfaces, TableVerdict};
use serde_json::Value;
use std::path::Path;

include!("fixtures/revoke/cases.rs");

mod common;
use common::NetNs;

/// The golden loaded into real nft, as `nft -j` lists it.
fn loaded(tag: &str, golden: &str) -> Admission {
    let ns = NetNs::new(&format!("rv{tag}"));
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(golden);
    ns.nft(&["-f", path.to_str().unwrap()]);
    let listing: Value =
        serde_json::from_str(&ns.nft(&["-j", "list", "table", "inet", "anklume"])).unwrap();
    Admission::of(&listing, "anklume").unwrap()
}

fn check(
    table: &Admission,
    subnets: &[(&str, &str)],
    cases: &[(&str, &str, &str, Option<u16>, TableVerdict)],
) {
    let ifs = Interfaces {
        addresses: subnets
            .iter()
            .map(|(name, net)| (name.to_string(), net.parse().unwrap()))
            .collect(),
    };
    for (proto, src, dst, dport, want) in cases {
        let proto = match *proto {
            "icmp" => 1,
            "tcp" => 6,
            "udp" => 17,
            other => panic!("{other}"),
        };
        let flow = Flow {
            proto,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            sport: dport.map(|_| 40000),
            dport: *dport,
            nat: false,
        };
        assert_eq!(
            table.verdict(&flow, &ifs),
            *want,
            "{proto} {src} -> {dst}:{dport:?}"
        );
    }
}

#[test]
fn the_host_golden_as_loaded_gives_the_recorded_verdicts() {
    let table = loaded("h", "policies.nft");
    check(&table, HOST_SUBNETS, HOST_CASES);
    check(&table, HOST_SUBNETS, HOST_INBOUND_CASES);
    // Positive control: the same flows on a table that drops nothing are
    // not judged the same.
    let empty = Admission::of(&serde_json::json!({"nftables": []}), "anklume").unwrap();
    let differ = HOST_CASES.iter().any(|(_, src, dst, _, want)| {
        let flow = Flow {
            proto: 6,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            sport: None,
            dport: None,
            nat: false,
        };
        let ifs = Interfaces {
            addresses: HOST_SUBNETS
                .iter()
                .map(|(name, net)| (name.to_string(), net.parse().unwrap()))
                .collect(),
        };
        empty.verdict(&flow, &ifs) != *want
    });
    assert!(differ, "the cases can fail");
}

#[test]
fn the_router_golden_as_loaded_gives_the_recorded_verdicts() {
    let table = loaded("r", "router-policies.nft");
    check(&table, ROUTER_SUBNETS, ROUTER_CASES);
    let table = loaded("p", "router-pairs.nft");
    check(&table, ROUTER_SUBNETS, ROUTER_PAIRS_CASES);
}
