//! The revocation evaluator on the golden rulesets as the kernel holds
//! them: each golden is loaded with the real `nft` into its own named
//! network namespace and listed with `nft -j`, and the evaluator must give
//! the recorded verdicts. Whatever shape the renderers give the goldens
//! (sets before issue 6, pair chains after), the same policies give the
//! same verdicts. Needs root (`ip netns add`), as `make test` is run.

use anklume_isolation::revoke::{Admission, Flow, Interfaces, TableVerdict};
use serde_json::Value;
use std::path::Path;
use std::process::Command;

include!("fixtures/revoke/cases.rs");

/// A named network namespace, deleted when dropped.
struct NetNs(String);

impl NetNs {
    fn new(tag: &str) -> NetNs {
        let name = format!("ank-it-rv{tag}-{}", std::process::id());
        let status = Command::new("ip").args(["netns", "add", &name]).status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "`ip netns add` failed: these tests need root and iproute2"
        );
        NetNs(name)
    }

    fn nft(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "nft"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nft {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The golden loaded into real nft, as `nft -j` lists it.
fn loaded(tag: &str, golden: &str) -> Admission {
    let ns = NetNs::new(tag);
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
