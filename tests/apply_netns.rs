//! `firewall_router_apply` against the real `nft`, each test inside its own
//! named network namespace, so the host's tables are never touched. Needs
//! root (`ip netns add`), as `make test` is run.
//!
//! Hostile rulesets must be refused with the offending line quoted and leave
//! the live ruleset and the installed file exactly as they were.

use anklume_isolation::apply::replace_table_with;
use anklume_isolation::model::TableName;
use anklume_isolation::runner::nft::Nft;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

const MODULE: &str = env!("CARGO_BIN_EXE_firewall_router_apply");

/// A named network namespace, deleted when dropped.
struct NetNs(String);

impl NetNs {
    fn new(tag: &str) -> NetNs {
        let name = format!("ank-it-{tag}-{}", std::process::id());
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

    fn nft_stdin(&self, text: &str) {
        let path = std::env::temp_dir().join(format!("{}-in.nft", self.0));
        std::fs::write(&path, text).unwrap();
        self.nft(&["-f", path.to_str().unwrap()]);
        std::fs::remove_file(path).unwrap();
    }

    /// Runs the module with `args` inside this namespace.
    fn module(&self, args: Value) -> Value {
        let dir = tempfile::tempdir().unwrap();
        let args_path = dir.path().join("args");
        std::fs::write(&args_path, args.to_string()).unwrap();
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, MODULE])
            .arg(&args_path)
            .output()
            .unwrap();
        assert!(
            out.stderr.is_empty(),
            "a module prints nothing on stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("the module prints one JSON object")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ruleset(table: &str, bridges: &[&str]) -> String {
    let elements: Vec<String> = bridges.iter().map(|b| format!("\"{b}\"")).collect();
    let pairs: Vec<String> = bridges
        .iter()
        .map(|b| format!("\"{b}\" . \"{b}\""))
        .collect();
    format!(
        "table inet {table} {{}}\ndelete table inet {table}\ntable inet {table} {{\n\
         \tset domain_bridges {{ type ifname; elements = {{ {} }} }}\n\
         \tset allowed_pairs {{ type ifname . ifname; elements = {{ {} }} }}\n\
         \tchain isolation {{\n\t\ttype filter hook forward priority -1; policy accept;\n\
         \t\tct state established,related accept\n\
         \t\tiifname . oifname @allowed_pairs accept\n\
         \t\tiifname @domain_bridges oifname @domain_bridges drop\n\t}}\n}}\n",
        elements.join(", "),
        pairs.join(", ")
    )
}

/// Incus's own table, as a stand-in in the namespace: it must survive
/// everything the module does.
const INCUS_TABLE: &str = "table inet incus {\n\tchain fwd.net-pro {\n\t\ttype filter hook forward priority filter; policy accept;\n\t\toifname \"net-pro\" accept\n\t}\n}\n";

fn args(src: &Path, dest: &Path, table: &str) -> Value {
    json!({"src": src, "dest": dest, "table": table, "persist": false})
}

#[test]
fn applies_idempotently_keeps_the_previous_file_and_repairs_drift() {
    let ns = NetNs::new("apply");
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("r.nft"), dir.path().join("etc/iso.nft"));
    std::fs::write(&src, ruleset("anklume_t", &["net-a", "net-b"])).unwrap();

    let first = ns.module(args(&src, &dest, "anklume_t"));
    assert_eq!(first["failed"], false, "{first}");
    assert_eq!(first["changed"], true);
    assert!(ns
        .nft(&["list", "table", "inet", "anklume_t"])
        .contains("\"net-b\" . \"net-b\""));

    let second = ns.module(args(&src, &dest, "anklume_t"));
    assert_eq!(second["changed"], false, "{second}");

    let v1 = std::fs::read_to_string(&src).unwrap();
    std::fs::write(&src, ruleset("anklume_t", &["net-a", "net-b", "net-c"])).unwrap();
    let third = ns.module(args(&src, &dest, "anklume_t"));
    assert_eq!(third["changed"], true);
    assert_eq!(
        std::fs::read_to_string(format!("{}.previous", dest.display())).unwrap(),
        v1
    );
    assert!(ns
        .nft(&["list", "table", "inet", "anklume_t"])
        .contains("net-c"));

    // Someone removes an element by hand: the next run notices and repairs.
    ns.nft(&[
        "delete",
        "element",
        "inet",
        "anklume_t",
        "domain_bridges",
        "{ \"net-c\" }",
    ]);
    let repaired = ns.module(args(&src, &dest, "anklume_t"));
    assert_eq!(repaired["live_changed"], true, "{repaired}");
    assert_eq!(repaired["file_changed"], false);
    let live = ns.nft(&["list", "set", "inet", "anklume_t", "domain_bridges"]);
    assert!(live.contains("net-c"), "{live}");
}

#[test]
fn check_mode_validates_and_changes_nothing() {
    let ns = NetNs::new("check");
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("iso.nft");
    let mut a = json!({"content": ruleset("anklume_t", &["net-a"]), "dest": dest,
                       "table": "anklume_t", "persist": false,
                       "_ansible_check_mode": true, "_ansible_diff": true});
    let out = ns.module(a.clone());
    assert_eq!(out["changed"], true, "{out}");
    assert!(out["diff"]["after"].as_str().unwrap().contains("net-a"));
    assert!(!dest.exists());
    assert_eq!(ns.nft(&["list", "tables"]), "");
    // A ruleset nft refuses fails check mode too.
    a["content"] = json!("table inet anklume_t { chain c { bogus } }\n");
    let out = ns.module(a);
    assert_eq!(out["failed"], true);
    assert!(out["msg"].as_str().unwrap().contains("nft -c"), "{out}");
}

#[test]
fn hostile_rulesets_are_refused_and_nothing_changes() {
    let ns = NetNs::new("hostile");
    ns.nft_stdin(INCUS_TABLE);
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("r.nft"), dir.path().join("iso.nft"));
    let good = ruleset("anklume_t", &["net-a", "net-b"]);
    std::fs::write(&src, &good).unwrap();
    assert_eq!(ns.module(args(&src, &dest, "anklume_t"))["changed"], true);
    let live_before = ns.nft(&["list", "ruleset"]);

    let hostile = [
        ("flush ruleset", "flush ruleset"),
        ("add rule inet incus fwd.net-pro drop", "inet incus"),
        ("flush table inet incus", "inet incus"),
        ("include \"/etc/nftables.conf\"", "include"),
        ("delete table ip filter", "ip filter"),
        ("delete table inet incus", "inet incus"),
        ("table inet anklume_other { }", "inet anklume_other"),
        // Passes the guard (our table), refused by nft -c itself.
        (
            "add rule inet anklume_t isolation bogus statement",
            "nft -c",
        ),
    ];
    for (line, expected) in hostile {
        std::fs::write(&src, format!("{good}{line}\n")).unwrap();
        let out = ns.module(args(&src, &dest, "anklume_t"));
        let msg = out["msg"].as_str().unwrap_or_default();
        assert_eq!(out["failed"], true, "{line}: {out}");
        assert!(msg.contains(expected), "{line}: {msg}");
        if expected != "nft -c" {
            assert!(msg.contains(line), "the offending line is quoted: {msg}");
        }
        assert_eq!(
            ns.nft(&["list", "ruleset"]),
            live_before,
            "{line} changed the live ruleset"
        );
        assert_eq!(
            std::fs::read_to_string(&dest).unwrap(),
            good,
            "{line} changed the file"
        );
    }
    // Unknown options and a missing source are refused too.
    let out = ns.module(json!({"src": src, "tabel": "x"}));
    assert!(
        out["msg"].as_str().unwrap().contains("valid options are"),
        "{out}"
    );
    let out = ns
        .module(json!({"src": dir.path().join("missing.nft"), "dest": dest, "table": "anklume_t"}));
    assert!(
        out["msg"].as_str().unwrap().contains("does not exist"),
        "{out}"
    );
    assert_eq!(ns.nft(&["list", "ruleset"]), live_before);
}

#[test]
fn a_failed_confirmation_rolls_back_to_the_previous_table() {
    let ns = NetNs::new("rollback");
    let nft = Nft::find().expect("nft is installed").in_netns(&ns.0);
    let table = TableName::new("anklume_t").unwrap();
    ns.nft_stdin(&ruleset("anklume_t", &["net-a"]));
    let before = ns.nft(&["list", "table", "inet", "anklume_t"]);

    let err = replace_table_with(
        &nft,
        &table,
        &ruleset("anklume_t", &["net-a", "net-z"]),
        |_| anyhow::bail!("confirmation failed on purpose"),
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("on purpose") && msg.contains("was restored"),
        "{msg}"
    );
    assert_eq!(ns.nft(&["list", "table", "inet", "anklume_t"]), before);

    // With no previous table, rolling back removes the new one.
    ns.nft(&["delete", "table", "inet", "anklume_t"]);
    let err = replace_table_with(&nft, &table, &ruleset("anklume_t", &["net-a"]), |_| {
        anyhow::bail!("again")
    })
    .unwrap_err();
    assert!(format!("{err:#}").contains("it was removed"));
    assert_eq!(ns.nft(&["list", "tables"]), "");
}

#[test]
fn the_boot_unit_loads_the_table_in_a_fresh_kernel_namespace() {
    let ns = NetNs::new("persist");
    let table = format!("anklume_it{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("iso.nft");
    let out =
        ns.module(json!({"content": ruleset(&table, &["net-a"]), "dest": dest, "table": table}));
    assert_eq!(out["failed"], false, "{out}");
    let unit = PathBuf::from(out["unit"].as_str().unwrap());
    let link = PathBuf::from(format!(
        "/etc/systemd/system/sysinit.target.wants/{}",
        unit.file_name().unwrap().to_string_lossy()
    ));
    let text = std::fs::read_to_string(&unit).unwrap();
    let cleanup = || {
        let _ = std::fs::remove_file(&link);
        let _ = std::fs::remove_file(&unit);
    };
    let exec = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .map(str::to_string);
    let linked = std::fs::read_link(&link).ok();
    // "Boot": a fresh network namespace has no tables; run what systemd
    // would run, and look.
    let booted = exec.as_ref().map(|exec| {
        Command::new("unshare")
            .args(["--net", "--", "/bin/sh", "-c"])
            .arg(format!("{exec} && nft list tables"))
            .output()
            .unwrap()
    });
    cleanup();
    assert_eq!(
        linked.as_deref(),
        Some(unit.as_path()),
        "the unit is enabled"
    );
    let booted = booted.expect("the unit has an ExecStart");
    assert!(
        booted.status.success(),
        "{}",
        String::from_utf8_lossy(&booted.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&booted.stdout).trim(),
        format!("table inet {table}")
    );
    assert!(!text.contains("flush") && !text.contains("ExecStop"));
}
