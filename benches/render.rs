//! Benchmarks for the performance bars of DESIGN.md section 6, measured side
//! by side in one run (medians; the machines are small and noisy):
//!
//! - plan + render of 1000 domains and 1000 policies (bar: < 10 ms);
//! - `nft -c` and `nft -f` of that ruleset inside a throwaway network
//!   namespace (bar for `nft -f`: < 100 ms), next to the same domains written
//!   as one rule per bridge pair, the design the sets replace;
//! - the render module end to end (args, plan, render, `nft -c`, write) with
//!   an explicit 1000-bridge list (bar: < 250 ms);
//! - the same three with issue 9's domain edges: every domain with egress
//!   settings and 100 (then 200) protected networks;
//! - plan + render and `nft -f` with every domain isolating its machines
//!   (two machines each, a policy between them): the bridge table at its
//!   largest.
//!
//! Run with `make bench` (root: namespaces). Nothing outside the throwaway
//! namespaces and a temporary directory is touched.

use anklume_isolation::model::{
    parse_protected_networks, BridgePattern, DomainBridge, DomainSettings, GatewayServices, IfName,
    Machine, Name, PolicySpec, TableName, World,
};
use anklume_isolation::plan::{Capabilities, HostPlan, HostPlanInput};
use anklume_isolation::render;
use serde_json::json;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DOMAINS: usize = 1000;
const POLICIES: usize = 1000;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> Duration {
    median(
        (0..runs)
            .map(|_| {
                let start = Instant::now();
                std::hint::black_box(f());
                start.elapsed()
            })
            .collect(),
    )
}

fn names() -> Vec<String> {
    (0..DOMAINS).map(|i| format!("net-d{i}")).collect()
}

fn policies() -> Vec<serde_json::Value> {
    (0..POLICIES)
        .map(|i| {
            let (a, b) = (i % DOMAINS, (i * 7 + 1) % DOMAINS);
            json!({"from": format!("d{a}"), "to": format!("d{b}"),
                   "ports": [1000 + (i % 500) as u16, format!("{}-{}", 20000 + i, 20010 + i)]})
        })
        .collect()
}

fn render_ruleset(bridges: &[DomainBridge], specs: &[PolicySpec]) -> String {
    render_with_edges(bridges, specs, &DomainSettings::default(), &[])
}

/// Issue 9's bench inputs: every domain with egress settings (one in ten
/// `internet: false`, the others DNS, HTTPS and one of ten ports, and every
/// fifth of them one port of its own, so lists differ; with `unique`, every
/// list differs) and `protected` protected networks, half IPv4 and half
/// IPv6.
struct Edges {
    raw_domains: serde_json::Value,
    raw_protected: Vec<String>,
    settings: DomainSettings,
    protected: Vec<ipnet::IpNet>,
}

fn edges(protected: usize, unique: bool) -> Edges {
    let raw: std::collections::BTreeMap<String, serde_json::Value> = (0..DOMAINS)
        .map(|i| {
            let v = if i % 10 == 0 {
                json!({"internet": false})
            } else {
                let mut ports = vec![
                    json!({"protocol": "udp", "port": 53}),
                    json!({"protocol": "tcp", "port": 443}),
                    json!({"protocol": "tcp", "port": 8000 + i % 10}),
                ];
                if unique || i % 5 == 0 {
                    ports.push(json!({"protocol": "udp", "port": 10000 + i}));
                }
                json!({ "egress": ports })
            };
            (format!("d{i}"), v)
        })
        .collect();
    let raw_protected: Vec<String> = (0..protected)
        .map(|k| {
            let i = k / 2;
            if k % 2 == 0 {
                format!("172.{}.{}.0/24", 16 + i / 200, i % 200)
            } else {
                format!("fd99:{i:x}::/64")
            }
        })
        .collect();
    Edges {
        raw_domains: json!(raw),
        settings: DomainSettings::parse(&raw).unwrap(),
        protected: parse_protected_networks(&raw_protected).unwrap(),
        raw_protected,
    }
}

fn render_with_edges(
    bridges: &[DomainBridge],
    specs: &[PolicySpec],
    settings: &DomainSettings,
    protected: &[ipnet::IpNet],
) -> String {
    render_world(bridges, &[], specs, settings, protected)
}

/// Plans and renders like the module does: policies resolved against the
/// bridges and machines, then the machines handed to the plan (their MACs
/// and addresses, for isolation inside a domain).
fn render_world(
    bridges: &[DomainBridge],
    machines: &[Machine],
    specs: &[PolicySpec],
    settings: &DomainSettings,
    protected: &[ipnet::IpNet],
) -> String {
    let world = World::new(bridges, machines);
    let resolved = specs.iter().map(|s| world.resolve(s).unwrap()).collect();
    let (mut plan, _) = HostPlan::build(HostPlanInput {
        protected_networks: protected.to_vec(),
        domain_settings: settings.clone(),
        table: TableName::new("anklume_bench").unwrap(),
        pattern: BridgePattern::new("net-").unwrap(),
        bridges,
        admin: None,
        policies: resolved,
        gateway: GatewayServices::defaults(),
        logging: None,
        capabilities: Capabilities::ALL,
    })
    .unwrap();
    let _warnings = plan.add_machines(machines);
    render::host(&plan).unwrap()
}

/// Every domain isolates its machines: each bridge gets a subnet in both
/// families and two machines (`m<i>a`, `m<i>b`, known MACs and addresses),
/// and one policy per domain opens tcp/22 from the first to the second, on
/// top of the 1000 domain policies.
fn isolated_world(bridges: &[DomainBridge]) -> (Vec<DomainBridge>, Vec<Machine>, DomainSettings) {
    let mut with_subnets = bridges.to_vec();
    let mut machines = Vec::new();
    let mut raw = std::collections::BTreeMap::new();
    for (i, b) in with_subnets.iter_mut().enumerate() {
        let (x, y) = (100 + i / 250, i % 250);
        b.ipv4 = Some(format!("10.{x}.{y}.0/24").parse().unwrap());
        b.ipv6 = Some(format!("fd42:{i:x}::/64").parse().unwrap());
        b.subnets_known = true;
        for (suffix, host) in [("a", 10u8), ("b", 11u8)] {
            let name = Name::new("machine", &format!("m{i}{suffix}")).unwrap();
            let mut m = Machine::new(name, "default", b.bridge.clone());
            m.ipv4.insert(format!("10.{x}.{y}.{host}").parse().unwrap());
            m.ipv6
                .insert(format!("fd42:{i:x}::{host}").parse().unwrap());
            m.hwaddr = Some(
                format!("10:66:6a:{:02x}:{:02x}:{host:02x}", i / 256, i % 256)
                    .parse()
                    .unwrap(),
            );
            m.mac_filtering = true;
            m.ipv4_filtering = true;
            m.ipv6_filtering = true;
            machines.push(m);
        }
        raw.insert(format!("d{i}"), json!({"isolate_machines": true}));
    }
    (with_subnets, machines, DomainSettings::parse(&raw).unwrap())
}

/// The design the sets replace: one drop rule per ordered pair of bridges.
fn rule_per_pair(names: &[String]) -> String {
    let mut text = String::from(
        "table inet anklume_bench {}\ndelete table inet anklume_bench\ntable inet anklume_bench {\n\tchain isolation {\n\t\ttype filter hook forward priority -1; policy accept;\n\t\tct state established,related accept\n",
    );
    for a in names {
        for b in names {
            if a != b {
                text.push_str(&format!("\t\tiifname \"{a}\" oifname \"{b}\" drop\n"));
            }
        }
    }
    text.push_str("\t}\n}\n");
    text
}

/// `nft <flag> -f <file>` in a fresh network namespace, timed from outside
/// (includes unshare's own start, measured alone below).
fn nft_in_netns(flag: Option<&str>, path: &std::path::Path) -> Duration {
    let start = Instant::now();
    let mut cmd = Command::new("unshare");
    cmd.args(["--net", "--", "nft"]);
    if let Some(flag) = flag {
        cmd.arg(flag);
    }
    let status = cmd
        .arg("-f")
        .arg(path)
        .stdout(Stdio::null())
        .status()
        .expect("unshare and nft are installed");
    assert!(status.success(), "nft failed on {}", path.display());
    start.elapsed()
}

fn main() {
    let names = names();
    let pattern = BridgePattern::new("net-").unwrap();
    let bridges: Vec<DomainBridge> = names
        .iter()
        .map(|n| DomainBridge::new(IfName::new(n).unwrap(), &pattern).unwrap())
        .collect();
    let specs = PolicySpec::parse_all(&policies()).unwrap();

    let render_time = time(30, || render_ruleset(&bridges, &specs));
    let text = render_ruleset(&bridges, &specs);
    println!(
        "plan+render {DOMAINS} domains, {POLICIES} policies: median {:.2} ms ({} bytes, {} lines)",
        render_time.as_secs_f64() * 1e3,
        text.len(),
        text.lines().count()
    );

    let dir = tempfile::tempdir().unwrap();
    // Issue 9's row first (no policies), then with the 1000 policies.
    for (protected, unique, specs) in [
        (100, false, &specs[..0]),
        (100, false, &specs[..]),
        (200, false, &specs[..]),
        (100, true, &specs[..]),
    ] {
        let n_policies = specs.len();
        let e = edges(protected, unique);
        let lists = if unique {
            "a port list of its own"
        } else {
            "egress settings"
        };
        let edges_time = time(30, || {
            render_with_edges(&bridges, specs, &e.settings, &e.protected)
        });
        let edges_text = render_with_edges(&bridges, specs, &e.settings, &e.protected);
        println!(
            "plan+render {DOMAINS} domains each with {lists}, {protected} protected networks, \
             {n_policies} policies: median {:.2} ms ({} bytes, {} lines)",
            edges_time.as_secs_f64() * 1e3,
            edges_text.len(),
            edges_text.lines().count()
        );
        let edges_path = dir
            .path()
            .join(format!("edges{protected}-{unique}-{n_policies}.nft"));
        std::fs::write(&edges_path, &edges_text).unwrap();
        let edges_load = time(9, || nft_in_netns(None, &edges_path));
        println!(
            "nft -f of that ruleset (fresh netns, with unshare): median {:.1} ms",
            edges_load.as_secs_f64() * 1e3
        );
    }
    // Isolation inside every domain: the bridge table at its largest.
    let (iso_bridges, machines, iso_settings) = isolated_world(&bridges);
    let mut raw_policies = policies();
    raw_policies.extend(
        (0..DOMAINS)
            .map(|i| json!({"from": format!("m{i}a"), "to": format!("m{i}b"), "ports": [22]})),
    );
    let iso_specs = PolicySpec::parse_all(&raw_policies).unwrap();
    let iso_time = time(30, || {
        render_world(&iso_bridges, &machines, &iso_specs, &iso_settings, &[])
    });
    let iso_text = render_world(&iso_bridges, &machines, &iso_specs, &iso_settings, &[]);
    println!(
        "plan+render {DOMAINS} domains each isolating its machines ({} machines, {} policies): \
         median {:.2} ms ({} bytes, {} lines)",
        machines.len(),
        iso_specs.len(),
        iso_time.as_secs_f64() * 1e3,
        iso_text.len(),
        iso_text.lines().count()
    );
    let iso_path = dir.path().join("isolated.nft");
    std::fs::write(&iso_path, &iso_text).unwrap();
    let iso_load = time(9, || nft_in_netns(None, &iso_path));
    println!(
        "nft -f of that ruleset (fresh netns, with unshare): median {:.1} ms",
        iso_load.as_secs_f64() * 1e3
    );

    let sets = dir.path().join("sets.nft");
    std::fs::write(&sets, &text).unwrap();
    let unshare_alone = time(9, || {
        let ok = Command::new("unshare")
            .args(["--net", "--", "true"])
            .status()
            .unwrap()
            .success();
        assert!(ok, "unshare --net needs root");
    });
    println!(
        "unshare --net alone: median {:.1} ms (included in the nft figures below)",
        unshare_alone.as_secs_f64() * 1e3
    );
    let check = time(9, || nft_in_netns(Some("-c"), &sets));
    let load = time(9, || nft_in_netns(None, &sets));
    println!(
        "set design, {DOMAINS} bridges: nft -c median {:.1} ms, nft -f median {:.1} ms",
        check.as_secs_f64() * 1e3,
        load.as_secs_f64() * 1e3
    );

    // One rule per pair grows as N^2: measure it at 100 and 200 bridges
    // (1000 would take minutes and gigabytes), next to the sets at the same N.
    for n in [100usize, 200] {
        let pairs = dir.path().join(format!("pairs{n}.nft"));
        std::fs::write(&pairs, rule_per_pair(&names[..n])).unwrap();
        let small_sets = dir.path().join(format!("sets{n}.nft"));
        std::fs::write(&small_sets, render_ruleset(&bridges[..n], &[])).unwrap();
        let pair_load = time(3, || nft_in_netns(None, &pairs));
        let set_load = time(3, || nft_in_netns(None, &small_sets));
        println!(
            "{n} bridges: rule per pair ({} rules) nft -f median {:.1} ms; sets nft -f median {:.1} ms; ratio {:.1}x",
            n * (n - 1),
            pair_load.as_secs_f64() * 1e3,
            set_load.as_secs_f64() * 1e3,
            pair_load.as_secs_f64() / set_load.as_secs_f64()
        );
    }

    // The module end to end, release build, explicit bridges (no Incus).
    let module = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/release/incus_nftables_render");
    if module.exists() {
        let out = dir.path().join("out.nft");
        let plain = json!({"bridges": names, "policies": policies(), "table": "anklume_bench",
                           "output_path": out, "validate": "always"});
        let e = edges(100, false);
        let mut with_edges = plain.clone();
        with_edges["domains"] = e.raw_domains;
        with_edges["protected_networks"] = json!(e.raw_protected);
        for (label, args_json) in [
            ("", plain),
            (
                ", every domain with egress settings, 100 protected networks",
                with_edges,
            ),
        ] {
            let args = dir.path().join("args.json");
            std::fs::write(&args, args_json.to_string()).unwrap();
            let e2e = time(9, || {
                let _ = std::fs::remove_file(&out);
                let output = Command::new("unshare")
                    .args(["--net", "--"])
                    .arg(&module)
                    .arg(&args)
                    .output()
                    .unwrap();
                let stdout = String::from_utf8_lossy(&output.stdout);
                assert!(stdout.contains("\"failed\":false"), "{stdout}");
            });
            println!(
                "incus_nftables_render end to end ({DOMAINS} bridges, {POLICIES} policies{label}, \
                 nft -c, write): median {:.1} ms",
                e2e.as_secs_f64() * 1e3
            );
        }
    } else {
        println!("(build target/release/incus_nftables_render for the end-to-end figure: cargo build --release)");
    }
}
