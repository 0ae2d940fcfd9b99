//! `firewall_router_apply` against the real `nft`, each test inside its own
//! named network namespace, so the host's tables are never touched. Needs
//! root (`ip netns add`), as `make test` is run.
//!
//! Hostile rulesets must be refused with the offending line quoted and leave
//! the live ruleset and the installed file exactly as they were.

use anklume_isolation::apply::replace_table_with;
use anklume_isolation::model::TableName;
use anklume_isolation::render::TABLE_COMMENT;
use anklume_isolation::runner::nft::Nft;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

const MODULE: &str = env!("CARGO_BIN_EXE_firewall_router_apply");

mod common;
use common::{must, NetNs};

impl NetNs {
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

fn ruleset(table: &str, bridges: &[&str]) -> String {
    let elements: Vec<String> = bridges.iter().map(|b| format!("\"{b}\"")).collect();
    let pairs: Vec<String> = bridges
        .iter()
        .map(|b| format!("\"{b}\" . \"{b}\""))
        .collect();
    format!(
        "table inet {table} {{}}\ndelete table inet {table}\ntable inet {table} {{\n\
         \tcomment \"{TABLE_COMMENT}\"\n\
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
        msg.contains("on purpose") && msg.contains("previous live table was restored"),
        "{msg}"
    );
    assert_eq!(ns.nft(&["list", "table", "inet", "anklume_t"]), before);

    // With no previous table, rolling back removes the new one.
    ns.nft(&["delete", "table", "inet", "anklume_t"]);
    let err = replace_table_with(&nft, &table, &ruleset("anklume_t", &["net-a"]), |_| {
        anyhow::bail!("again")
    })
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("new table was removed"),
        "{err:#}"
    );
    assert_eq!(ns.nft(&["list", "tables"]), "");
}

/// Runs `f` on the module's result for `args` with `extra` merged in.
fn with(mut base: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        base[k] = v.clone();
    }
    base
}

/// A table carrying `needle` is live (the rulesets below differ by one
/// bridge).
fn live_has(ns: &NetNs, table: &str, needle: &str) -> bool {
    ns.nft(&["list", "table", "inet", table]).contains(needle)
}

#[test]
fn concurrent_applies_are_serialized_and_live_equals_the_file() {
    let ns = NetNs::new("lock");
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("iso.nft");
    let rulesets: Vec<(PathBuf, String)> = ["net-x", "net-y", "net-z"]
        .iter()
        .map(|b| {
            let path = dir.path().join(format!("{b}.nft"));
            let text = ruleset("anklume_t", &["net-a", b]);
            std::fs::write(&path, &text).unwrap();
            (path, text)
        })
        .collect();
    let lock = dir.path().join("lock");
    let run = |i: usize| {
        with(
            args(&rulesets[i].0, &dest, "anklume_t"),
            json!({"lock_path": lock}),
        )
    };
    let mut mismatches = 0;
    for _ in 0..8 {
        assert_eq!(ns.module(run(2))["failed"], false);
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| ns.module(run(0)));
            let b = s.spawn(|| ns.module(run(1)));
            (a.join().unwrap(), b.join().unwrap())
        });
        assert_eq!(a["failed"], false, "{a}");
        assert_eq!(b["failed"], false, "{b}");
        let file = std::fs::read_to_string(&dest).unwrap();
        let live_x = live_has(&ns, "anklume_t", "net-x");
        let live_y = live_has(&ns, "anklume_t", "net-y");
        let consistent = (live_x && !live_y && file == rulesets[0].1)
            || (live_y && !live_x && file == rulesets[1].1);
        mismatches += usize::from(!consistent);
    }
    assert_eq!(mismatches, 0, "live table and file disagreed");

    // Positive control: while another process holds the lock, an apply
    // waits and then fails saying so (command_timeout 1 s -> 10 s wait).
    let _held = anklume_isolation::runner::lock::ApplyLock::acquire(
        &lock,
        std::time::Duration::from_secs(1),
    )
    .unwrap();
    let out = ns.module(with(run(0), json!({"command_timeout": 1})));
    assert_eq!(out["failed"], true, "{out}");
    assert!(
        out["msg"].as_str().unwrap().contains("another apply"),
        "{out}"
    );
}

#[test]
fn other_managers_tables_are_never_replaced_or_removed() {
    let ns = NetNs::new("owner");
    ns.nft_stdin(INCUS_TABLE);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("iso.nft");
    // By name: `incus` (and other managers' names) are refused outright.
    let out = ns.module(
        json!({"content": ruleset("incus", &["net-a"]), "dest": dest,
                               "table": "incus", "persist": false}),
    );
    assert_eq!(out["failed"], true, "{out}");
    assert!(
        out["msg"].as_str().unwrap().contains("used by Incus"),
        "{out}"
    );
    // By mark: an unmarked table of our name is someone else's.
    ns.nft_stdin("table inet anklume_t {\n\tchain theirs {\n\t\ttype filter hook forward priority 0; policy accept;\n\t}\n}\n");
    let before = ns.nft(&["list", "ruleset"]);
    let src = dir.path().join("r.nft");
    std::fs::write(&src, ruleset("anklume_t", &["net-a"])).unwrap();
    let out = ns.module(args(&src, &dest, "anklume_t"));
    assert_eq!(out["failed"], true, "{out}");
    assert!(
        out["msg"]
            .as_str()
            .unwrap()
            .contains("not created by anklume-isolation"),
        "{out}"
    );
    let out = ns.module(with(
        args(&src, &dest, "anklume_t"),
        json!({"state": "absent"}),
    ));
    assert_eq!(out["failed"], true, "{out}");
    assert_eq!(ns.nft(&["list", "ruleset"]), before);
    assert!(!dest.exists());
    // Positive control: once the foreign table is gone, ours is applied.
    ns.nft(&["delete", "table", "inet", "anklume_t"]);
    let out = ns.module(args(&src, &dest, "anklume_t"));
    assert_eq!(out["changed"], true, "{out}");
    // A table applied by a version that did not mark it (live, and exactly
    // what dest loads) is adopted and marked.
    let unmarked =
        ruleset("anklume_t", &["net-a"]).replace(&format!("\tcomment \"{TABLE_COMMENT}\"\n"), "");
    ns.nft_stdin(&unmarked);
    std::fs::write(&dest, &unmarked).unwrap();
    let out = ns.module(args(&src, &dest, "anklume_t"));
    assert_eq!(out["changed"], true, "{out}");
    assert!(
        out["warnings"][0].as_str().unwrap().contains("adopted"),
        "{out}"
    );
    assert!(live_has(&ns, "anklume_t", TABLE_COMMENT));
}

#[test]
fn rulesets_whose_effects_leave_the_renderers_shapes_are_refused() {
    let ns = NetNs::new("effects");
    ns.nft_stdin(INCUS_TABLE);
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("r.nft"), dir.path().join("iso.nft"));
    let good = ruleset("anklume_t", &["net-a", "net-b"]);
    std::fs::write(&src, &good).unwrap();
    assert_eq!(ns.module(args(&src, &dest, "anklume_t"))["changed"], true);
    let before = ns.nft(&["list", "ruleset"]);
    let header = format!(
        "table inet anklume_t {{}}\ndelete table inet anklume_t\ntable inet anklume_t {{\n\tcomment \"{TABLE_COMMENT}\"\n"
    );
    let hostile = [
        (
            "\tchain n {\n\t\ttype nat hook prerouting priority -100; policy accept;\n\t\ttcp dport 22 dnat ip to 10.9.9.9\n\t}\n",
            "`nat` chain",
        ),
        (
            "\tchain r {\n\t\ttype filter hook prerouting priority -300; policy accept;\n\t\tnotrack\n\t}\n",
            "hook `prerouting`",
        ),
        (
            "\tchain i {\n\t\ttype filter hook ingress device \"lo\" priority 0; policy accept;\n\t\tdrop\n\t}\n",
            "ingress",
        ),
        ("", "no forward chain that drops"),
        (
            "\tchain isolation {\n\t\ttype filter hook forward priority -1; policy accept;\n\t\tdrop\n\t}\n\tchain n {\n\t\ttype filter hook output priority 0; policy accept;\n\t}\n",
            "hook `output`",
        ),
        (
            "\tchain isolation {\n\t\ttype filter hook forward priority -1; policy accept;\n\t\tmeta mark set 1 drop\n\t}\n",
            "`mangle` statement",
        ),
        // A table without our mark: it could never be replaced again.
        ("", "does not mark"),
    ];
    for (i, (body, expected)) in hostile.iter().enumerate() {
        let text = if *expected == "does not mark" {
            good.replace(&format!("\tcomment \"{TABLE_COMMENT}\"\n"), "")
        } else {
            format!("{header}{body}}}\n")
        };
        std::fs::write(&src, text).unwrap();
        let out = ns.module(args(&src, &dest, "anklume_t"));
        assert_eq!(out["failed"], true, "case {i}: {out}");
        let msg = out["msg"].as_str().unwrap();
        assert!(msg.contains(expected), "case {i}: {msg}");
        assert_eq!(ns.nft(&["list", "ruleset"]), before, "case {i}");
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), good, "case {i}");
    }
}

#[test]
fn a_failed_file_write_leaves_live_and_file_on_the_last_good_ruleset() {
    let ns = NetNs::new("write");
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("etc/iso.nft");
    let (s1, s2) = (dir.path().join("s1.nft"), dir.path().join("s2.nft"));
    std::fs::write(&s1, ruleset("anklume_t", &["net-a", "net-one"])).unwrap();
    std::fs::write(&s2, ruleset("anklume_t", &["net-a", "net-two"])).unwrap();
    assert_eq!(ns.module(args(&s2, &dest, "anklume_t"))["failed"], false);
    // `<dest>.previous` a directory: the rename of the old file fails
    // after the load.
    std::fs::create_dir_all(dir.path().join("etc/iso.nft.previous/sub")).unwrap();
    let out = ns.module(args(&s1, &dest, "anklume_t"));
    assert_eq!(out["failed"], true, "{out}");
    let msg = out["msg"].as_str().unwrap();
    assert!(msg.contains("are the last good ruleset"), "{msg}");
    assert!(
        live_has(&ns, "anklume_t", "net-two"),
        "live is the last good"
    );
    assert!(!live_has(&ns, "anklume_t", "net-one"));
    assert_eq!(
        std::fs::read_to_string(&dest).unwrap(),
        std::fs::read_to_string(&s2).unwrap()
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("etc"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Positive control: with the directory gone the same apply succeeds.
    std::fs::remove_dir_all(dir.path().join("etc/iso.nft.previous")).unwrap();
    assert_eq!(ns.module(args(&s1, &dest, "anklume_t"))["changed"], true);
    assert!(live_has(&ns, "anklume_t", "net-one"));
}

#[test]
fn corrupted_linked_or_oversized_files_are_handled() {
    use std::os::unix::fs::PermissionsExt;
    let ns = NetNs::new("files");
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("r.nft"), dir.path().join("iso.nft"));
    let good = ruleset("anklume_t", &["net-a"]);
    std::fs::write(&src, &good).unwrap();
    // A non-UTF-8 dest is an unreadable previous version: replaced, kept.
    std::fs::write(&dest, b"table\xff\xfe").unwrap();
    let out = ns.module(args(&src, &dest, "anklume_t"));
    assert_eq!(out["changed"], true, "{out}");
    assert!(
        out["warnings"][0].as_str().unwrap().contains("not UTF-8"),
        "{out}"
    );
    assert_eq!(std::fs::read_to_string(&dest).unwrap(), good);
    assert_eq!(
        std::fs::read(format!("{}.previous", dest.display())).unwrap(),
        b"table\xff\xfe"
    );
    // A symlinked dest is refused; its target is not copied anywhere.
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "SECRET").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let linked = dir.path().join("linked.nft");
    std::os::unix::fs::symlink(&secret, &linked).unwrap();
    let out = ns.module(args(&src, &linked, "anklume_t"));
    assert_eq!(out["failed"], true, "{out}");
    assert!(
        out["msg"].as_str().unwrap().contains("symbolic link"),
        "{out}"
    );
    assert!(!dir.path().join("linked.nft.previous").exists());
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "SECRET");
    // An oversized src is refused before nft sees it.
    let big = dir.path().join("big.nft");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(anklume_isolation::apply::MAX_RULESET_BYTES + 1)
        .unwrap();
    let out = ns.module(args(&big, &dest, "anklume_t"));
    assert!(
        out["msg"].as_str().unwrap().contains("larger than"),
        "{out}"
    );
    assert_eq!(std::fs::read_to_string(&dest).unwrap(), good);
}

/// A directory holding an `nft` that wraps the real one; `script` runs
/// first with the real nft in `$NFT`.
fn fake_nft(dir: &Path, script: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let real = anklume_isolation::runner::process::find_program("nft").unwrap();
    let bin = dir.join("fakebin");
    std::fs::create_dir_all(&bin).unwrap();
    let path = bin.join("nft");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nNFT={}\n{script}\nexec \"$NFT\" \"$@\"\n",
            real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

impl NetNs {
    /// Runs the module with a different PATH (a fake nft first).
    fn module_with_path(&self, args: Value, path: &str) -> Value {
        let dir = tempfile::tempdir().unwrap();
        let args_path = dir.path().join("args");
        std::fs::write(&args_path, args.to_string()).unwrap();
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.0,
                "env",
                &format!("PATH={path}"),
                MODULE,
            ])
            .arg(&args_path)
            .output()
            .unwrap();
        assert!(
            out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("one JSON object")
    }

    fn inode(&self) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "readlink", "/proc/self/ns/net"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }
}

#[test]
fn a_hanging_nft_is_killed_and_the_live_table_is_unchanged() {
    let ns = NetNs::new("hang");
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("r.nft"), dir.path().join("iso.nft"));
    std::fs::write(&src, ruleset("anklume_t", &["net-a"])).unwrap();
    assert_eq!(ns.module(args(&src, &dest, "anklume_t"))["failed"], false);
    let before = ns.nft(&["list", "ruleset"]);
    std::fs::write(&src, ruleset("anklume_t", &["net-a", "net-b"])).unwrap();
    // A load (`nft -f`, `nft -j -f`; not the `-c` checks) hangs in the
    // test namespace only (the scratch namespace
    // used for verification has another inode, so verification passes).
    let path = fake_nft(
        dir.path(),
        &format!(
            "case \" $* \" in *\" -c \"*) ;; *\" -f \"*) [ \"$(readlink /proc/self/ns/net)\" = \"{}\" ] && exec sleep 300;; esac",
            ns.inode()
        ),
    );
    let started = std::time::Instant::now();
    let out = ns.module_with_path(
        with(
            args(&src, &dest, "anklume_t"),
            json!({"command_timeout": 2}),
        ),
        &path,
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    assert_eq!(out["failed"], true, "{out}");
    let msg = out["msg"].as_str().unwrap();
    assert!(msg.contains("timed out after 2 s"), "{msg}");
    assert!(msg.contains("the live table was not changed"), "{msg}");
    assert_eq!(ns.nft(&["list", "ruleset"]), before);
    assert!(!std::fs::read_to_string(&dest).unwrap().contains("net-b"));
    // Positive control: the real nft applies the same ruleset.
    assert_eq!(ns.module(args(&src, &dest, "anklume_t"))["changed"], true);
}

#[test]
fn without_kernel_log_support_log_statements_are_left_out_with_a_warning() {
    let ns = NetNs::new("nolog");
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("iso.nft");
    // A kernel without nft_log refuses any ruleset with `log` in it.
    let path = fake_nft(
        dir.path(),
        r#"case " $* " in *" -f /dev/stdin "*)
  t=$(mktemp); cat > "$t"
  if grep -q 'log prefix' "$t"; then rm -f "$t"; echo 'Error: Could not process rule: No such file or directory' >&2; exit 1; fi
  set -- $(echo "$*" | sed "s#/dev/stdin#$t#"); "$NFT" "$@"; rc=$?; rm -f "$t"; exit $rc;;
esac"#,
    );
    let logged = ruleset("anklume_t", &["net-a", "net-b"]).replace(
        "\t\tiifname @domain_bridges oifname @domain_bridges drop\n",
        "\t\tiifname @domain_bridges oifname @domain_bridges limit rate 5/second log prefix \"X-DENY \" level info\n\t\tiifname @domain_bridges oifname @domain_bridges drop\n",
    );
    let a = json!({"content": logged, "dest": dest, "table": "anklume_t", "persist": false});
    let out = ns.module_with_path(a.clone(), &path);
    assert_eq!(out["failed"], false, "{out}");
    assert!(
        out["warnings"][0].as_str().unwrap().contains("left out"),
        "{out}"
    );
    let live = ns.nft(&["list", "table", "inet", "anklume_t"]);
    assert!(
        !live.contains("log") && live.contains("limit rate 5/second"),
        "{live}"
    );
    assert!(!std::fs::read_to_string(&dest).unwrap().contains(" log "));
    // Positive control: where log works it is kept.
    let out = ns.module(a);
    assert_eq!(out["changed"], true, "{out}");
    assert!(ns
        .nft(&["list", "table", "inet", "anklume_t"])
        .contains("log prefix"));
}

#[test]
fn state_absent_removes_our_table_files_and_unit_and_nothing_else() {
    let ns = NetNs::new("absent");
    ns.nft_stdin(INCUS_TABLE);
    let dir = tempfile::tempdir().unwrap();
    let units = dir.path().join("units");
    let (src, dest) = (dir.path().join("r.nft"), dir.path().join("iso.nft"));
    let a = |s: &str| json!({"src": src, "dest": dest, "table": "anklume_t", "unit_dir": units, "state": s});
    std::fs::write(&src, ruleset("anklume_t", &["net-a"])).unwrap();
    assert_eq!(ns.module(a("present"))["failed"], false);
    std::fs::write(&src, ruleset("anklume_t", &["net-a", "net-b"])).unwrap();
    let out = ns.module(a("present"));
    assert_eq!(out["changed"], true, "{out}");
    let unit = units.join("anklume-isolation-anklume_t.service");
    assert!(unit.exists() && PathBuf::from(format!("{}.previous", dest.display())).exists());
    let foreign = ns.nft(&["list", "table", "inet", "incus"]);
    let check = ns.module(with(a("absent"), json!({"_ansible_check_mode": true})));
    assert_eq!(check["changed"], true, "{check}");
    assert!(dest.exists() && unit.exists());
    let out = ns.module(a("absent"));
    assert_eq!(out["changed"], true, "{out}");
    assert_eq!(out["table_removed"], true);
    assert_eq!(ns.nft(&["list", "tables"]), "table inet incus\n");
    assert_eq!(ns.nft(&["list", "table", "inet", "incus"]), foreign);
    let left: Vec<_> = walk(dir.path());
    assert_eq!(
        left,
        vec![src.clone(), units.join("sysinit.target.wants")],
        "only the source and the empty wants directory remain"
    );
    assert_eq!(ns.module(a("absent"))["changed"], false);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() && std::fs::read_dir(&path).unwrap().next().is_some() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// `ip netns exec <ns> <args>`, returning success.
fn in_ns(ns: &str, args: &[&str]) -> bool {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A "host" namespace with two domain bridges and one client namespace on
/// each, so forwarding between domains is seen with real packets.
struct Domains {
    host: NetNs,
    a: NetNs,
    b: NetNs,
}

impl Domains {
    fn new(tag: &str) -> Domains {
        let d = Domains {
            host: NetNs::new(&format!("{tag}h")),
            a: NetNs::new(&format!("{tag}a")),
            b: NetNs::new(&format!("{tag}b")),
        };
        let h = d.host.0.as_str();
        for (client, bridge, net) in [(&d.a, "net-a", "1"), (&d.b, "net-b", "2")] {
            let c = client.0.as_str();
            ip(&["-n", h, "link", "add", bridge, "type", "bridge"]);
            ip(&[
                "-n", h, "link", "add", "p", "type", "veth", "peer", "name", "eth0", "netns", c,
            ]);
            ip(&[
                "-n",
                h,
                "link",
                "set",
                "p",
                "name",
                &format!("p{net}"),
                "master",
                bridge,
                "up",
            ]);
            ip(&[
                "-n",
                h,
                "addr",
                "add",
                &format!("10.231.{net}.1/24"),
                "dev",
                bridge,
            ]);
            ip(&["-n", h, "link", "set", bridge, "up"]);
            ip(&[
                "-n",
                c,
                "addr",
                "add",
                &format!("10.231.{net}.2/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", c, "link", "set", "eth0", "up"]);
            ip(&[
                "-n",
                c,
                "route",
                "add",
                "default",
                "via",
                &format!("10.231.{net}.1"),
            ]);
        }
        assert!(in_ns(h, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]));
        d
    }

    /// One bounded TCP connection attempt from domain a's client to domain
    /// b's client (nothing listens: a reset, "refused", proves the path;
    /// a dropped SYN times out).
    fn a_reaches_b(&self) -> bool {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.a.0, "timeout", "2", "bash", "-c"])
            .arg("exec 3<>/dev/tcp/10.231.2.2/9")
            .output()
            .unwrap();
        out.status.success() || String::from_utf8_lossy(&out.stderr).contains("refused")
    }
}

/// The unit's `Exec<key>=` line as a program and its arguments: the
/// fallback is one single-quoted argument, the file path a plain word.
fn exec_line(unit: &str, key: &str) -> Vec<String> {
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in the unit"));
    match line.split_once(" '") {
        Some((program, quoted)) => vec![
            program.to_string(),
            quoted.strip_suffix('\'').unwrap().to_string(),
        ],
        None => line.split(' ').map(str::to_string).collect(),
    }
}

#[test]
fn the_boot_unit_verifies_and_boot_fails_closed_without_its_file() {
    let ns = NetNs::new("persist");
    let dir = tempfile::tempdir().unwrap();
    let units = dir.path().join("units");
    let dest = dir.path().join("iso.nft");
    let text = ruleset("anklume_t", &["net-a", "net-b"]);
    let out = ns.module(json!({"content": text, "dest": dest, "table": "anklume_t",
                               "unit_dir": units}));
    assert_eq!(out["failed"], false, "{out}");
    let unit_path = units.join("anklume-isolation-anklume_t.service");
    assert_eq!(PathBuf::from(out["unit"].as_str().unwrap()), unit_path);
    assert_eq!(
        std::fs::read_link(units.join("sysinit.target.wants/anklume-isolation-anklume_t.service"))
            .unwrap(),
        unit_path
    );
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    assert!(!unit.contains("flush") && !unit.contains("ExecStop"));

    // systemd's own check of the unit, with a positive control.
    match anklume_isolation::runner::process::find_program("systemd-analyze") {
        None => eprintln!("systemd-analyze is not installed: the unit is not verified by systemd"),
        Some(analyze) => {
            let verify = |path: &Path| {
                Command::new(&analyze)
                    .args(["verify", "--man=no"])
                    .arg(path)
                    .output()
                    .unwrap()
            };
            let ok = verify(&unit_path);
            assert!(
                ok.status.success(),
                "{}",
                String::from_utf8_lossy(&ok.stderr)
            );
            let broken = dir.path().join("anklume-isolation-broken.service");
            // What a split path did: ExecStart named a program that is not there.
            std::fs::write(
                &broken,
                unit.replace("ExecStart=/", "ExecStart=/nonexistent/"),
            )
            .unwrap();
            assert!(
                !verify(&broken).status.success(),
                "systemd-analyze verify can fail"
            );
        }
    }
    // A dest that systemd would split is refused before anything changes.
    let out = ns.module(
        json!({"content": text, "dest": dir.path().join("with space/x.nft"),
                               "table": "anklume_t", "unit_dir": units}),
    );
    assert_eq!(out["failed"], true, "{out}");
    assert!(out["msg"].as_str().unwrap().contains("boot unit"), "{out}");

    // Boot simulation: a fresh host namespace with two domain bridges.
    let d = Domains::new("boot");
    assert!(
        d.a_reaches_b(),
        "positive control: without rules, domains reach each other"
    );
    let pre = exec_line(&unit, "ExecStartPre");
    let start = exec_line(&unit, "ExecStart");
    let run = |argv: &[String]| {
        let args: Vec<&str> = argv.iter().map(String::as_str).collect();
        in_ns(&d.host.0, &args)
    };
    // The file is missing: the unit fails (visible), the fallback holds.
    std::fs::rename(&dest, dir.path().join("moved.nft")).unwrap();
    assert!(run(&pre), "the fallback loads");
    assert!(!run(&start), "a missing file fails the unit");
    assert!(
        !d.a_reaches_b(),
        "boot failed closed: domains do not reach each other"
    );
    let live = d.host.nft(&["list", "table", "inet", "anklume_t"]);
    assert!(live.contains(TABLE_COMMENT), "{live}");
    // An unloadable file: the same.
    std::fs::write(&dest, "table inet anklume_t { bogus }\n").unwrap();
    d.host.nft(&["delete", "table", "inet", "anklume_t"]);
    assert!(d.a_reaches_b());
    assert!(run(&pre) && !run(&start));
    assert!(!d.a_reaches_b(), "a refused file fails closed too");
    // The good file: loaded over the fallback, isolation as rendered.
    std::fs::rename(dir.path().join("moved.nft"), &dest).unwrap();
    d.host.nft(&["delete", "table", "inet", "anklume_t"]);
    assert!(run(&pre) && run(&start));
    assert_eq!(
        d.host.nft(&["list", "table", "inet", "anklume_t"]),
        ns.nft(&["list", "table", "inet", "anklume_t"]),
        "boot loads what the module applied"
    );
    assert!(!d.a_reaches_b());
}

#[test]
fn set_only_changes_update_the_sets_in_place_and_structure_changes_swap_the_table() {
    let ns = NetNs::new("sets");
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("r.nft"), dir.path().join("iso.nft"));
    std::fs::write(&src, ruleset("anklume_t", &["net-a", "net-b"])).unwrap();
    assert_eq!(ns.module(args(&src, &dest, "anklume_t"))["update"], "table");
    let handles = || ns.nft(&["-a", "list", "chain", "inet", "anklume_t", "isolation"]);
    let before = handles();
    std::fs::write(&src, ruleset("anklume_t", &["net-a", "net-c"])).unwrap();
    let out = ns.module(args(&src, &dest, "anklume_t"));
    assert_eq!(out["update"], "sets", "{out}");
    assert_eq!(
        handles(),
        before,
        "the chain and its rules were not recreated"
    );
    let live = ns.nft(&["list", "table", "inet", "anklume_t"]);
    assert!(live.contains("net-c") && !live.contains("net-b"), "{live}");
    assert_eq!(ns.module(args(&src, &dest, "anklume_t"))["changed"], false);
    // A structural change (a rule more) replaces the whole table.
    let structural = ruleset("anklume_t", &["net-a", "net-c"]).replace(
        "\t\tct state established,related accept\n",
        "\t\tct state established,related accept\n\t\tct state invalid drop\n",
    );
    std::fs::write(&src, structural).unwrap();
    let out = ns.module(args(&src, &dest, "anklume_t"));
    assert_eq!(out["update"], "table", "{out}");
    assert_ne!(handles(), before);
}

#[test]
fn policy_edits_change_pair_chains_in_place_and_keep_the_base_chains() {
    let ns = NetNs::new("chains");
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("iso.nft");
    let allow = json!({"from": "a", "to": "b", "ports": [5001], "protocol": "udp"});
    let r1 = render(dir.path(), "r1", json!([allow]));
    // A new pair (c -> a) with its own chain.
    let r2 = render(
        dir.path(),
        "r2",
        json!([allow, {"from": "c", "to": "a", "ports": [7000], "protocol": "tcp"}]),
    );
    // The same pair (a -> b), a rule of its chain changed.
    let r3 = render(
        dir.path(),
        "r3",
        json!([{"from": "a", "to": "b", "ports": ["5001-5002"], "protocol": "udp"}]),
    );
    assert_eq!(ns.module(args(&r1, &dest, "anklume_t"))["update"], "table");
    let base = || ns.nft(&["-a", "list", "chain", "inet", "anklume_t", "isolation"]);
    let before = base();
    let live = || ns.nft(&["list", "table", "inet", "anklume_t"]);
    for (src, present, absent) in [
        (&r2, "dport 7000", "5001-5002"),
        (&r1, "dport 5001", "dport 7000"),
        (&r3, "5001-5002", "dport 7000"),
    ] {
        let out = ns.module(args(src, &dest, "anklume_t"));
        assert_eq!(out["failed"], false, "{out}");
        assert_eq!(out["update"], "chains", "{out}");
        let text = live();
        assert!(text.contains(present) && !text.contains(absent), "{text}");
        assert_eq!(
            ns.module(args(src, &dest, "anklume_t"))["changed"],
            false,
            "the in-place update left exactly the rendered table"
        );
    }
    assert_eq!(
        base(),
        before,
        "the base chain and its rules were not recreated"
    );
}

/// Runs `f` on a thread that has entered the named network namespace.
fn in_netns_thread<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    use std::os::unix::io::AsRawFd;
    let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    std::thread::spawn(move || {
        // SAFETY: setns(2) on this thread only, with a namespace fd we own.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
}

const RENDER: &str = env!("CARGO_BIN_EXE_incus_nftables_render");

/// Renders a host ruleset for net-a, net-b, net-c with `policies`.
fn render(dir: &Path, name: &str, policies: Value) -> PathBuf {
    let out = dir.join(format!("{name}.nft"));
    let args = dir.join(format!("{name}.json"));
    std::fs::write(
        &args,
        json!({"bridges": ["net-a", "net-b", "net-c"], "table": "anklume_t",
               "output_path": out, "policies": policies, "validate": "never"})
        .to_string(),
    )
    .unwrap();
    let res = Command::new(RENDER).arg(&args).output().unwrap();
    let res: Value = serde_json::from_slice(&res.stdout).unwrap();
    assert_eq!(res["failed"], false, "{res}");
    out
}

/// Counts of one traffic run.
struct Traffic {
    sent: u64,
    allowed_received: u64,
    leaked: u64,
    socket_overflows: u64,
}

/// Sends numbered UDP datagrams from domain a's client to domain b's on an
/// allowed port (5001) and a denied one (5002), 2000/s each, while `work`
/// runs, and counts what arrives.
fn under_traffic(d: &Domains, work: impl FnOnce()) -> Traffic {
    udp_under_traffic((&d.a.0, "10.231.1.2"), (&d.b.0, "10.231.2.2"), work)
}

/// [`under_traffic`] from `(namespace, address)` to another.
fn udp_under_traffic(
    (from_ns, from_addr): (&str, &'static str),
    (to_ns, to_addr): (&str, &'static str),
    work: impl FnOnce(),
) -> Traffic {
    use std::net::UdpSocket;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let receivers: Vec<_> = [5001u16, 5002]
        .into_iter()
        .map(|port| {
            in_netns_thread(to_ns, move || {
                let sock = UdpSocket::bind((to_addr, port)).unwrap();
                sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                force_receive_buffer(&sock);
                let mut seen = std::collections::BTreeSet::new();
                let mut buf = [0u8; 64];
                while let Ok(n) = sock.recv(&mut buf) {
                    if n == 8 {
                        seen.insert(u64::from_be_bytes(buf[..8].try_into().unwrap()));
                    }
                }
                seen.len() as u64
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let sender = in_netns_thread(from_ns, move || {
        let sock = UdpSocket::bind((from_addr, 0)).unwrap();
        let mut sent = 0u64;
        let started = Instant::now();
        while !flag.load(Ordering::Relaxed) {
            for port in [5001u16, 5002] {
                sock.send_to(&sent.to_be_bytes(), (to_addr, port)).unwrap();
            }
            sent += 1;
            let due = started + Duration::from_micros(500 * sent);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        sent
    });
    let overflows_before = udp_receive_buffer_errors(to_ns);
    work();
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().unwrap();
    let received: Vec<u64> = receivers.into_iter().map(|r| r.join().unwrap()).collect();
    Traffic {
        sent,
        allowed_received: received[0],
        leaked: received[1],
        socket_overflows: udp_receive_buffer_errors(to_ns) - overflows_before,
    }
}

/// A 32 MiB receive buffer (SO_RCVBUFFORCE, root): a receiver starved of
/// CPU by the re-applies must not drop datagrams itself.
fn force_receive_buffer(sock: &std::net::UdpSocket) {
    use std::os::unix::io::AsRawFd;
    let size: libc::c_int = 32 << 20;
    // SAFETY: setsockopt(2) on a socket we own, with a c_int option.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
}

/// The namespace's UDP RcvbufErrors counter (datagrams a full socket
/// buffer dropped: the receiver's fault, not the firewall's).
fn udp_receive_buffer_errors(ns: &str) -> u64 {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "cat", "/proc/net/snmp"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next().unwrap(), udp.next().unwrap());
    let at = names
        .split_whitespace()
        .position(|n| n == "RcvbufErrors")
        .unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// `make test-stress`: >= 1000 re-applies under traffic. While a client in
/// domain a sends to domain b on an allowed and a denied port, the module
/// re-applies STRESS_APPLIES times (default 1000), alternating two rulesets
/// that differ only in another policy (its pair chain and map element,
/// updated in place): every allowed datagram
/// must arrive and no denied one. Then STRESS_SWAPS (default 200) re-applies
/// alternate with a structurally different ruleset (logging on), which
/// replaces the whole table: nothing denied may leak; the allowed datagrams
/// dropped by whole-table swaps are reported.
#[test]
#[ignore = "long: run with make test-stress"]
fn stress_reapplies_under_traffic_drop_nothing_allowed_and_leak_nothing() {
    let count = |var: &str, default: usize| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (applies, swaps) = (count("STRESS_APPLIES", 1000), count("STRESS_SWAPS", 200));
    let d = Domains::new("stress");
    let dir = tempfile::tempdir().unwrap();
    let allow = json!({"from": "a", "to": "b", "ports": [5001], "protocol": "udp"});
    let r1 = render(dir.path(), "r1", json!([allow]));
    let r2 = render(
        dir.path(),
        "r2",
        json!([allow, {"from": "c", "to": "a", "ports": [7000], "protocol": "tcp"}]),
    );
    let dest = dir.path().join("iso.nft");
    let apply = |src: &Path| d.host.module(args(src, &dest, "anklume_t"));
    assert!(
        d.a_reaches_b(),
        "positive control: without rules a reaches b"
    );
    let first = apply(&r1);
    assert_eq!(first["failed"], false, "{first}");
    assert!(!d.a_reaches_b(), "the ruleset isolates a from b");

    let run = |label: &str, n: usize, other: &Path, expect: &str| {
        let started = std::time::Instant::now();
        let mut kinds = std::collections::BTreeMap::new();
        let t = under_traffic(&d, || {
            for i in 0..n {
                let out = apply(if i % 2 == 0 { other } else { &r1 });
                assert_eq!(out["failed"], false, "apply {i}: {out}");
                *kinds.entry(out["update"].to_string()).or_insert(0) += 1;
            }
        });
        println!(
            "stress {label}: {n} re-applies ({kinds:?}) in {:.1} s under traffic; sent {} \
             allowed + {} denied datagrams; allowed received {}, allowed dropped {}, \
             denied leaked {}, receiver socket overflows {}",
            started.elapsed().as_secs_f64(),
            t.sent,
            t.sent,
            t.allowed_received,
            t.sent - t.allowed_received,
            t.leaked,
            t.socket_overflows
        );
        assert_eq!(kinds.get(&format!("\"{expect}\"")), Some(&n), "{kinds:?}");
        assert!(t.sent > 0 && t.allowed_received > 0, "traffic flowed");
        assert_eq!(t.leaked, 0, "denied datagrams leaked");
        t
    };
    // A policy more or less: a pair chain added or removed, the pairs map
    // refilled, in one transaction that keeps the base chains.
    let sets = run("in-place updates", applies, &r2, "chains");
    assert_eq!(
        sets.sent - sets.allowed_received,
        0,
        "allowed datagrams dropped"
    );
    if swaps > 0 {
        let r3 = render(dir.path(), "r3", json!([allow]));
        // Logging on: more chains and rules, a structural change.
        let logged = render_logged(dir.path(), &r3);
        run("table swaps", swaps, &logged, "table");
    }
}

/// The same ruleset as `plain`'s render with logging enabled.
fn render_logged(dir: &Path, plain: &Path) -> PathBuf {
    let args = plain.with_extension("json");
    let mut a: Value = serde_json::from_str(&std::fs::read_to_string(&args).unwrap()).unwrap();
    let out = dir.join("logged.nft");
    a["output_path"] = json!(out);
    a["logging"] = json!({"enabled": true});
    let args = dir.join("logged.json");
    std::fs::write(&args, a.to_string()).unwrap();
    let res = Command::new(RENDER).arg(&args).output().unwrap();
    let res: Value = serde_json::from_slice(&res.stdout).unwrap();
    assert_eq!(res["failed"], false, "{res}");
    out
}

/// A UDP conversation from domain a to domain b on `port`: b echoes every
/// datagram, so conntrack holds it as established (the case `ct state
/// established accept` keeps alive). Returns the instant of the last echo
/// a received and how many it received, once `stop` is set.
fn udp_conversation(
    d: &Domains,
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(Option<std::time::Instant>, u64)> {
    use std::net::UdpSocket;
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};
    let server = UdpSocketIn::bind(&d.b.0, ("10.231.2.2", port));
    in_netns_thread(&d.b.0, move || {
        let sock = server;
        sock.set_read_timeout(Some(Duration::from_secs(4))).unwrap();
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], from);
        }
    });
    in_netns_thread(&d.a.0, move || {
        let sock = UdpSocket::bind("10.231.1.2:0").unwrap();
        sock.connect(("10.231.2.2", port)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        let (mut last, mut echoes, mut seq) = (None, 0u64, 0u64);
        let mut buf = [0u8; 64];
        while !stop.load(Ordering::Relaxed) {
            seq += 1;
            let _ = sock.send(&seq.to_be_bytes());
            if sock.recv(&mut buf).is_ok() {
                last = Some(Instant::now());
                echoes += 1;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (last, echoes)
    })
}

/// A UDP socket bound inside a namespace (bound on a thread that entered
/// it; a socket keeps its namespace).
struct UdpSocketIn;

impl UdpSocketIn {
    fn bind(ns: &str, addr: (&'static str, u16)) -> std::net::UdpSocket {
        in_netns_thread(ns, move || std::net::UdpSocket::bind(addr).unwrap())
            .join()
            .unwrap()
    }
}

#[test]
fn revoking_a_policy_cuts_its_established_flows_and_keeps_the_allowed_ones() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    assert!(
        anklume_isolation::runner::process::find_program("conntrack").is_some(),
        "conntrack (conntrack-tools) is needed: lab/lab.sh install installs it"
    );
    let d = Domains::new("revoke");
    let dir = tempfile::tempdir().unwrap();
    let keep = json!({"from": "a", "to": "b", "ports": [5001], "protocol": "udp"});
    let cut = json!({"from": "a", "to": "b", "ports": [6001], "protocol": "udp"});
    let r1 = render(dir.path(), "r1", json!([keep, cut]));
    let r2 = render(dir.path(), "r2", json!([keep]));
    let dest = dir.path().join("iso.nft");
    let apply = |src: &Path| d.host.module(args(src, &dest, "anklume_t"));
    assert_eq!(apply(&r1)["failed"], false);

    let stop = Arc::new(AtomicBool::new(false));
    let kept = udp_conversation(&d, 5001, Arc::clone(&stop));
    let revoked = udp_conversation(&d, 6001, Arc::clone(&stop));
    std::thread::sleep(Duration::from_millis(800));

    // Positive control: loading the narrower ruleset with plain `nft -f`
    // leaves the established 6001 conversation running.
    let r2_text = std::fs::read_to_string(&r2).unwrap();
    let r1_text = std::fs::read_to_string(&r1).unwrap();
    d.host.nft_stdin(&r2_text);
    let control_at = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    d.host.nft_stdin(&r1_text);

    // The module applies the same narrower ruleset and cuts it.
    let out = apply(&r2);
    let applied_at = Instant::now();
    assert_eq!(out["failed"], false, "{out}");
    assert!(out["revoked_connections"].as_u64().unwrap() >= 1, "{out}");
    std::thread::sleep(Duration::from_millis(2000));
    stop.store(true, Ordering::Relaxed);
    let (kept_last, kept_n) = kept.join().unwrap();
    let (revoked_last, revoked_n) = revoked.join().unwrap();
    let (kept_last, revoked_last) = (kept_last.unwrap(), revoked_last.unwrap());
    println!(
        "revocation: kept flow {kept_n} echoes, revoked flow {revoked_n} echoes; revoked flow's \
         last echo {:?} after the apply",
        revoked_last.saturating_duration_since(applied_at)
    );
    assert!(
        revoked_last > control_at + Duration::from_millis(1000),
        "positive control: without the cut, the established flow outlived plain nft -f"
    );
    assert!(
        revoked_last < applied_at + Duration::from_millis(1000),
        "the revoked flow was cut within a second"
    );
    assert!(
        kept_last > applied_at + Duration::from_millis(1500),
        "the allowed flow continued"
    );
}

/// The host ruleset's shape since issue 6: `ct state vmap`, egress accept,
/// `iifname . oifname vmap @pairs` with a pair chain of plain rules, then
/// the drops. `open_6001` adds the port policy the second ruleset removes.
fn pair_chain_ruleset(open_6001: bool) -> String {
    let table = "anklume_t";
    let port_rule = if open_6001 {
        "\t\tmeta l4proto udp th dport 6001-6002 accept\n"
    } else {
        ""
    };
    format!(
        "table inet {table} {{}}\ndelete table inet {table}\ntable inet {table} {{\n\
         \tcomment \"{TABLE_COMMENT}\"\n\
         \tset domain_bridges {{ type ifname; elements = {{ \"net-a\", \"net-b\" }} }}\n\
         \tmap pairs {{ type ifname . ifname : verdict; elements = {{ \
         \"net-a\" . \"net-a\" : accept, \"net-b\" . \"net-b\" : accept, \
         \"net-a\" . \"net-b\" : jump pair/net-a/net-b }} }}\n\
         \tchain isolation {{\n\t\ttype filter hook forward priority -1; policy accept;\n\
         \t\tct state vmap {{ established : accept, related : accept, invalid : jump invalid }}\n\
         \t\toifname != @domain_bridges oifname != \"net-*\" accept\n\
         \t\tiifname . oifname vmap @pairs\n\
         \t\tiifname != @domain_bridges iifname != \"net-*\" accept\n\
         \t\tiifname @domain_bridges oifname @domain_bridges drop\n\t}}\n\
         \tchain invalid {{\n\t\tiifname @domain_bridges drop\n\t\toifname @domain_bridges drop\n\t}}\n\
         \tchain pair/net-a/net-b {{\n\
         \t\tip saddr 10.231.1.2 ip daddr 10.231.2.2 udp dport 5001 accept\n\
         {port_rule}\t}}\n}}\n"
    )
}

#[test]
fn revoking_a_port_of_a_pair_chain_cuts_its_flow_and_keeps_the_allowed_one() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    assert!(
        anklume_isolation::runner::process::find_program("conntrack").is_some(),
        "conntrack (conntrack-tools) is needed: lab/lab.sh install installs it"
    );
    let d = Domains::new("revpair");
    let dir = tempfile::tempdir().unwrap();
    let (r1_text, r2_text) = (pair_chain_ruleset(true), pair_chain_ruleset(false));
    let (r1, r2) = (dir.path().join("r1.nft"), dir.path().join("r2.nft"));
    std::fs::write(&r1, &r1_text).unwrap();
    std::fs::write(&r2, &r2_text).unwrap();
    let dest = dir.path().join("iso.nft");
    let apply = |src: &Path| d.host.module(args(src, &dest, "anklume_t"));
    let first = apply(&r1);
    assert_eq!(first["failed"], false, "{first}");

    let stop = Arc::new(AtomicBool::new(false));
    let kept = udp_conversation(&d, 5001, Arc::clone(&stop));
    let revoked = udp_conversation(&d, 6001, Arc::clone(&stop));
    std::thread::sleep(Duration::from_millis(800));

    // Positive control: plain `nft -f` of the narrower ruleset leaves the
    // established 6001 conversation running.
    d.host.nft_stdin(&r2_text);
    let control_at = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    d.host.nft_stdin(&r1_text);

    let apply_started = Instant::now();
    let out = apply(&r2);
    let applied_at = Instant::now();
    assert_eq!(out["failed"], false, "{out}");
    assert_eq!(
        out["revoked_connections"].as_u64(),
        Some(1),
        "exactly the 6001 conversation: {out}"
    );
    std::thread::sleep(Duration::from_millis(2000));
    stop.store(true, Ordering::Relaxed);
    let (kept_last, kept_n) = kept.join().unwrap();
    let (revoked_last, revoked_n) = revoked.join().unwrap();
    let (kept_last, revoked_last) = (kept_last.unwrap(), revoked_last.unwrap());
    println!(
        "pair-chain revocation: kept flow {kept_n} echoes, revoked flow {revoked_n} echoes; \
         the apply took {:?}, the revoked flow's last echo came {:?} after it started, the \
         kept flow's {:?} after it returned",
        applied_at - apply_started,
        revoked_last.saturating_duration_since(apply_started),
        kept_last.saturating_duration_since(applied_at)
    );
    assert!(
        revoked_last > control_at + Duration::from_millis(1000),
        "positive control: without the cut, the established flow outlived plain nft -f"
    );
    assert!(
        revoked_last < applied_at + Duration::from_millis(1000),
        "the revoked flow was cut within a second"
    );
    assert!(
        kept_last > applied_at + Duration::from_millis(1500),
        "the allowed flow continued"
    );
}

// Isolation inside a domain: host mode manages `bridge <table>` next to
// `inet <table>`, in the same file and the same transaction.

/// `ruleset(table, bridges)` followed by the bridge table of the rendered
/// file, holding `body` after its mark.
fn with_bridge(table: &str, bridges: &[&str], body: &str) -> String {
    format!(
        "{}table bridge {table} {{}}\ndelete table bridge {table}\ntable bridge {table} {{\n\
         \tcomment \"{TABLE_COMMENT}\"\n{body}}}\n",
        ruleset(table, bridges)
    )
}

/// A bridge table body that drops IPv4 between the `(source, destination)`
/// pairs (both ways given explicitly), on a base chain of `hook` and
/// `policy`.
fn isolating(pairs: &[(&str, &str)], hook: &str, policy: &str) -> String {
    let elements: Vec<String> = pairs.iter().map(|(s, d)| format!("{s} . {d}")).collect();
    format!(
        "\tset isolated_pairs {{\n\t\ttype ipv4_addr . ipv4_addr\n\t\telements = {{ {} }}\n\t}}\n\
         \tchain isolation {{\n\t\ttype filter hook {hook} priority -1; policy {policy};\n\
         \t\tether type arp accept\n\
         \t\tip saddr . ip daddr @isolated_pairs counter drop\n\t}}\n",
        elements.join(", ")
    )
}

#[test]
fn the_bridge_table_is_applied_with_the_inet_table_and_follows_the_file() {
    let ns = NetNs::new("br-apply");
    ns.nft_stdin(INCUS_TABLE);
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("r.nft"), dir.path().join("iso.nft"));
    let pair = isolating(&[("10.0.0.2", "10.0.0.3")], "forward", "accept");
    std::fs::write(&src, with_bridge("anklume_t", &["net-a"], &pair)).unwrap();

    let out = ns.module(args(&src, &dest, "anklume_t"));
    assert_eq!(out["changed"], true, "{out}");
    assert_eq!(out["tables"], json!(["bridge anklume_t", "inet anklume_t"]));
    let bridge = ns.nft(&["list", "table", "bridge", "anklume_t"]);
    assert!(
        bridge.contains(TABLE_COMMENT) && bridge.contains("10.0.0.2 . 10.0.0.3"),
        "{bridge}"
    );
    assert!(live_has(&ns, "anklume_t", "net-a"));
    // Idempotent, both tables compared (the counter's figures aside).
    let again = ns.module(args(&src, &dest, "anklume_t"));
    assert_eq!(again["changed"], false, "{again}");

    // Only the bridge table's elements change: updated in place.
    let two = isolating(
        &[("10.0.0.2", "10.0.0.3"), ("10.0.0.3", "10.0.0.2")],
        "forward",
        "accept",
    );
    std::fs::write(&src, with_bridge("anklume_t", &["net-a"], &two)).unwrap();
    let out = ns.module(args(&src, &dest, "anklume_t"));
    assert_eq!(out["changed"], true, "{out}");
    assert_eq!(out["update"], "sets", "{out}");
    assert!(ns
        .nft(&["list", "table", "bridge", "anklume_t"])
        .contains("10.0.0.3 . 10.0.0.2"));
    // A bridge chain changes: the whole file is swapped, both tables in one
    // transaction.
    let two = two.replace(
        "ether type arp accept",
        "ether type arp accept\n\t\tether type vlan drop",
    );
    std::fs::write(&src, with_bridge("anklume_t", &["net-a"], &two)).unwrap();
    let out = ns.module(args(&src, &dest, "anklume_t"));
    assert_eq!(out["update"], "table", "{out}");
    assert!(ns
        .nft(&["list", "table", "bridge", "anklume_t"])
        .contains("ether type 8021q drop"));
    // Only the inet sets change: still in place, the bridge table kept.
    std::fs::write(&src, with_bridge("anklume_t", &["net-a", "net-b"], &two)).unwrap();
    let out = ns.module(args(&src, &dest, "anklume_t"));
    assert_eq!(out["update"], "sets", "{out}");
    assert!(live_has(&ns, "anklume_t", "net-b"));
    assert!(ns
        .nft(&["list", "table", "bridge", "anklume_t"])
        .contains("10.0.0.3 . 10.0.0.2"));
    // A drifted bridge table is noticed and repaired.
    ns.nft(&["flush", "set", "bridge", "anklume_t", "isolated_pairs"]);
    let out = ns.module(args(&src, &dest, "anklume_t"));
    assert_eq!(out["live_changed"], true, "{out}");
    assert!(ns
        .nft(&["list", "table", "bridge", "anklume_t"])
        .contains("10.0.0.3 . 10.0.0.2"));

    // A file without a bridge table (older render): the live one of ours
    // goes in the same apply, and live equals the file.
    std::fs::write(&src, ruleset("anklume_t", &["net-a"])).unwrap();
    let out = ns.module(args(&src, &dest, "anklume_t"));
    assert_eq!(out["changed"], true, "{out}");
    assert_eq!(out["tables"], json!(["inet anklume_t"]));
    assert_eq!(
        ns.nft(&["list", "tables"]),
        "table inet incus\ntable inet anklume_t\n"
    );
    assert_eq!(ns.module(args(&src, &dest, "anklume_t"))["changed"], false);

    // state: absent removes both tables of ours, nothing else.
    std::fs::write(&src, with_bridge("anklume_t", &["net-a"], &pair)).unwrap();
    assert_eq!(ns.module(args(&src, &dest, "anklume_t"))["changed"], true);
    let absent = |check: bool| {
        ns.module(with(
            args(&src, &dest, "anklume_t"),
            json!({"state": "absent", "_ansible_check_mode": check}),
        ))
    };
    let out = absent(true);
    assert_eq!(out["changed"], true, "{out}");
    assert!(ns.nft(&["list", "tables"]).contains("bridge anklume_t"));
    let out = absent(false);
    assert_eq!(
        out["tables_removed"],
        json!(["bridge anklume_t", "inet anklume_t"]),
        "{out}"
    );
    assert_eq!(ns.nft(&["list", "tables"]), "table inet incus\n");
    assert!(!dest.exists());
    assert_eq!(absent(false)["changed"], false);
}

/// One valid interface of the router mode (which refuses a bridge table).
fn router_interface() -> Value {
    use anklume_isolation::model::firewall::FirewallInterface;
    use anklume_isolation::model::{BridgePattern, DomainBridge, IfName};
    let pattern = BridgePattern::new("net-").unwrap();
    let mut bridge = DomainBridge::new(IfName::new("net-a").unwrap(), &pattern).unwrap();
    bridge.ipv4 = Some("10.99.1.1/24".parse().unwrap());
    serde_json::to_value(FirewallInterface::derive("fw", &bridge, 253).unwrap()).unwrap()
}

#[test]
fn bridge_tables_that_would_cut_every_bridge_or_are_not_ours_are_refused() {
    let ns = NetNs::new("br-refuse");
    ns.nft_stdin(INCUS_TABLE);
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("r.nft"), dir.path().join("iso.nft"));
    let pair = [("10.0.0.2", "10.0.0.3")];
    let good = with_bridge(
        "anklume_t",
        &["net-a"],
        &isolating(&pair, "forward", "accept"),
    );
    std::fs::write(&src, &good).unwrap();
    assert_eq!(ns.module(args(&src, &dest, "anklume_t"))["changed"], true);
    let before = ns.nft(&["list", "ruleset"]);
    let chain = |rules: &str| {
        format!(
            "\tchain isolation {{\n\t\ttype filter hook forward priority -1; policy accept;\n\
             \t\t{rules}\n\t}}\n"
        )
    };
    let hostile = [
        (isolating(&pair, "forward", "drop"), "policy drop"),
        (isolating(&pair, "input", "accept"), "hook `input`"),
        (
            isolating(&pair, "prerouting", "accept"),
            "hook `prerouting`",
        ),
        (isolating(&pair, "output", "accept"), "hook `output`"),
        (chain("meta ibrname \"net-a\" drop"), "ibrname"),
        (chain("meta mark set 1"), "`mangle` statement"),
        (chain("quota over 10 mbytes drop"), "`quota` statement"),
        (String::new(), "does not mark table bridge"),
    ];
    for (i, (body, expected)) in hostile.iter().enumerate() {
        let text = with_bridge("anklume_t", &["net-a"], body);
        let text = match *expected {
            "does not mark table bridge" => {
                text.replace(&format!("{{\n\tcomment \"{TABLE_COMMENT}\"\n}}"), "{\n}")
            }
            _ => text,
        };
        std::fs::write(&src, text).unwrap();
        let out = ns.module(args(&src, &dest, "anklume_t"));
        assert_eq!(out["failed"], true, "case {i}: {out}");
        let msg = out["msg"].as_str().unwrap();
        assert!(msg.contains(expected), "case {i}: {msg}");
        assert_eq!(ns.nft(&["list", "ruleset"]), before, "case {i}");
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), good, "case {i}");
    }
    // A bridge table only passes in host mode: the router manages one table.
    std::fs::write(&src, &good).unwrap();
    let out = ns.module(with(
        args(&src, &dest, "anklume_t"),
        json!({"mode": "router", "_ansible_check_mode": true, "interfaces": [router_interface()]}),
    ));
    assert_eq!(out["failed"], true, "{out}");
    assert!(
        out["msg"].as_str().unwrap().contains("bridge anklume_t"),
        "{out}"
    );
    assert_eq!(ns.nft(&["list", "ruleset"]), before);

    // Someone else's unmarked `bridge anklume_t`: refused, for present and
    // absent, whether or not the file has a bridge table.
    let out = ns.module(with(
        args(&src, &dest, "anklume_t"),
        json!({"state": "absent"}),
    ));
    assert_eq!(out["changed"], true, "{out}");
    ns.nft_stdin("table bridge anklume_t {\n\tchain theirs {\n\t\ttype filter hook forward priority 0; policy accept;\n\t}\n}\n");
    let foreign = ns.nft(&["list", "ruleset"]);
    for text in [good.clone(), ruleset("anklume_t", &["net-a"])] {
        std::fs::write(&src, text).unwrap();
        for state in ["present", "absent"] {
            let out = ns.module(with(
                args(&src, &dest, "anklume_t"),
                json!({"state": state}),
            ));
            assert_eq!(out["failed"], true, "{state}: {out}");
            let msg = out["msg"].as_str().unwrap();
            assert!(
                msg.contains("table bridge anklume_t already exists"),
                "{state}: {msg}"
            );
            assert_eq!(ns.nft(&["list", "ruleset"]), foreign, "{state}");
        }
    }
    assert!(!dest.exists());
    // Positive control: with the foreign table gone, ours is applied.
    ns.nft(&["delete", "table", "bridge", "anklume_t"]);
    std::fs::write(&src, &good).unwrap();
    assert_eq!(ns.module(args(&src, &dest, "anklume_t"))["changed"], true);
}

/// Every table of the namespace and its listing: a restore may reload
/// tables in another order than `list ruleset` had them.
fn by_table(ns: &NetNs) -> std::collections::BTreeMap<String, String> {
    ns.nft(&["list", "tables"])
        .lines()
        .map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            (
                line.to_string(),
                ns.nft(&["list", "table", words[1], words[2]]),
            )
        })
        .collect()
}

#[test]
fn a_failed_confirmation_or_file_write_rolls_back_both_tables() {
    use anklume_isolation::apply::replace_tables_with;
    use anklume_isolation::guard::HOST_FAMILIES;
    let ns = NetNs::new("br-rollback");
    let nft = Nft::find().expect("nft is installed").in_netns(&ns.0);
    let table = TableName::new("anklume_t").unwrap();
    let old = isolating(&[("10.0.0.2", "10.0.0.3")], "forward", "accept");
    let new = isolating(&[("10.0.0.9", "10.0.0.8")], "forward", "accept");
    ns.nft_stdin(&with_bridge("anklume_t", &["net-a"], &old));
    let before = by_table(&ns);
    let err = replace_tables_with(
        &nft,
        &table,
        HOST_FAMILIES,
        &with_bridge("anklume_t", &["net-z"], &new),
        |nft| {
            // Both tables are the new ones here: the rollback must undo both.
            let live = nft.family_table_text("bridge", &table).unwrap().unwrap();
            assert!(live.contains("10.0.0.9"), "{live}");
            anyhow::bail!("confirmation failed on purpose")
        },
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("previous live table was restored: bridge anklume_t, inet anklume_t"),
        "{msg}"
    );
    assert_eq!(by_table(&ns), before);
    // A bridge table the load created is removed, the inet one restored.
    ns.nft(&["delete", "table", "bridge", "anklume_t"]);
    let before = by_table(&ns);
    let err = replace_tables_with(
        &nft,
        &table,
        HOST_FAMILIES,
        &with_bridge("anklume_t", &["net-z"], &new),
        |_| anyhow::bail!("again"),
    )
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("new table was removed (there was none before: bridge"),
        "{err:#}"
    );
    assert_eq!(by_table(&ns), before);

    // Through the module: the new file cannot be renamed into place after
    // the load, so both live tables go back to the last good ruleset.
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("etc/iso.nft");
    let (s1, s2) = (dir.path().join("s1.nft"), dir.path().join("s2.nft"));
    std::fs::write(&s1, with_bridge("anklume_t", &["net-a"], &old)).unwrap();
    std::fs::write(&s2, with_bridge("anklume_t", &["net-a"], &new)).unwrap();
    assert_eq!(ns.module(args(&s1, &dest, "anklume_t"))["failed"], false);
    let good = by_table(&ns);
    std::fs::create_dir_all(dir.path().join("etc/iso.nft.previous/sub")).unwrap();
    let out = ns.module(args(&s2, &dest, "anklume_t"));
    assert_eq!(out["failed"], true, "{out}");
    assert!(
        out["msg"].as_str().unwrap().contains("last good ruleset"),
        "{out}"
    );
    assert_eq!(by_table(&ns), good);
    // Positive control: the same apply goes through once the path is free.
    std::fs::remove_dir_all(dir.path().join("etc/iso.nft.previous")).unwrap();
    assert_eq!(ns.module(args(&s2, &dest, "anklume_t"))["changed"], true);
    assert!(ns
        .nft(&["list", "table", "bridge", "anklume_t"])
        .contains("10.0.0.9"));
}

/// One bounded TCP connection attempt from namespace `from` to `addr`
/// (nothing listens: a reset, "refused", proves the path; a dropped SYN
/// times out).
fn pings(from: &NetNs, addr: &str) -> bool {
    let out = Command::new("ip")
        .args(["netns", "exec", &from.0, "timeout", "2", "bash", "-c"])
        .arg(format!("exec 3<>/dev/tcp/{addr}/9"))
        .output()
        .unwrap();
    out.status.success() || String::from_utf8_lossy(&out.stderr).contains("refused")
}

/// A host with one domain bridge (`net-a`, 10.232.1.1/24) and two machines
/// on it (10.232.1.2 and .3).
struct Machines {
    host: NetNs,
    m1: NetNs,
    m2: NetNs,
}

impl Machines {
    fn new(tag: &str) -> Machines {
        let host = NetNs::new(&format!("{tag}-host"));
        let (m1, m2) = (
            NetNs::new(&format!("{tag}-m1")),
            NetNs::new(&format!("{tag}-m2")),
        );
        let h = host.0.as_str();
        ip(&["-n", h, "link", "add", "net-a", "type", "bridge"]);
        ip(&["-n", h, "addr", "add", "10.232.1.1/24", "dev", "net-a"]);
        ip(&["-n", h, "link", "set", "net-a", "up"]);
        for (machine, port, addr) in [(&m1, "p1", "10.232.1.2/24"), (&m2, "p2", "10.232.1.3/24")] {
            let m = machine.0.as_str();
            ip(&[
                "-n", h, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", m,
            ]);
            ip(&["-n", h, "link", "set", port, "master", "net-a", "up"]);
            ip(&["-n", m, "addr", "add", addr, "dev", "eth0"]);
            ip(&["-n", m, "link", "set", "eth0", "up"]);
        }
        Machines { host, m1, m2 }
    }
}

#[test]
fn the_applied_bridge_table_drops_frames_between_two_ports_with_br_netfilter_on_and_off() {
    let Machines { host, m1, m2 } = Machines::new("br");
    let h = host.0.as_str();
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("r.nft"), dir.path().join("iso.nft"));
    let units = dir.path().join("units");
    let body = isolating(
        &[("10.232.1.2", "10.232.1.3"), ("10.232.1.3", "10.232.1.2")],
        "forward",
        "accept",
    );
    std::fs::write(&src, with_bridge("anklume_t", &["net-a"], &body)).unwrap();
    let a = |state: &str| {
        json!({"src": src, "dest": dest, "table": "anklume_t", "unit_dir": units,
               "state": state})
    };
    // br_netfilter is per namespace here: same-bridge IPv4 goes through the
    // inet forward hook with 1, not with 0; the bridge table drops either way.
    let knob = "/proc/sys/net/bridge/bridge-nf-call-iptables";
    let has_knob = in_ns(h, &["test", "-w", knob]);
    for setting in ["1", "0"] {
        if has_knob {
            must(h, &format!("echo {setting} > {knob}"));
        } else if setting == "1" {
            eprintln!("br_netfilter is not loaded: only the \"off\" case is run");
            continue;
        }
        assert!(
            pings(&m1, "10.232.1.3"),
            "positive control (br_netfilter {setting}): the machines reach each other"
        );
        let out = host.module(a("present"));
        assert_eq!(out["changed"], true, "{out}");
        assert!(
            !pings(&m1, "10.232.1.3") && !pings(&m2, "10.232.1.2"),
            "br_netfilter {setting}: the bridge table drops between the ports"
        );
        assert!(
            pings(&m1, "10.232.1.1"),
            "br_netfilter {setting}: the gateway stays reachable (ARP, local delivery)"
        );
        let counted = host.nft(&["list", "chain", "bridge", "anklume_t", "isolation"]);
        assert!(!counted.contains("packets 0 "), "{counted}");
        // Counters moved: still unchanged for the next apply.
        assert_eq!(host.module(a("present"))["changed"], false);
        assert_eq!(host.module(a("absent"))["changed"], true);
        assert!(
            pings(&m1, "10.232.1.3"),
            "removed: the machines reach again"
        );
    }

    // The boot unit: its fallback, then the file, over a stale bridge table
    // of ours (a unit restart): both tables are the file's, the file is not
    // refused because of the old table.
    let out = host.module(a("present"));
    assert_eq!(out["failed"], false, "{out}");
    let applied_bridge = host.nft(&["list", "table", "bridge", "anklume_t"]);
    let applied_inet = host.nft(&["list", "table", "inet", "anklume_t"]);
    host.nft_stdin(&with_bridge(
        "anklume_t",
        &["net-a"],
        &isolating(&[("10.9.9.9", "10.9.9.8")], "forward", "accept"),
    ));
    let unit = std::fs::read_to_string(units.join("anklume-isolation-anklume_t.service")).unwrap();
    for key in ["ExecStartPre", "ExecStart"] {
        let argv = exec_line(&unit, key);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        assert!(in_ns(h, &argv), "{key}");
    }
    assert_eq!(
        host.nft(&["list", "table", "bridge", "anklume_t"]),
        applied_bridge
    );
    assert_eq!(
        host.nft(&["list", "table", "inet", "anklume_t"]),
        applied_inet
    );
    assert!(!pings(&m1, "10.232.1.3"));
    assert_eq!(host.module(a("absent"))["changed"], true);
}

/// The bridge table of the bridge stress: machine 1 may send UDP to machine
/// 2's port 5001 (a policy), nothing else between them; `mac` fills an
/// unrelated set (changed in place), `swap` adds a rule (a whole-file swap).
fn bridge_stress_ruleset(mac: u8, swap: bool) -> String {
    let extra = if swap {
        "\t\tether type vlan drop\n"
    } else {
        ""
    };
    with_bridge(
        "anklume_t",
        &["net-a"],
        &format!(
            "\tset machine_services_v4 {{\n\t\ttype ipv4_addr . ipv4_addr . inet_proto . inet_service\n\
             \t\telements = {{ 10.232.1.2 . 10.232.1.3 . udp . 5001 }}\n\t}}\n\
             \tset other_macs {{\n\t\ttype ether_addr\n\t\telements = {{ 02:00:00:00:00:{mac:02x} }}\n\t}}\n\
             \tset isolated_v4 {{\n\t\ttype ipv4_addr . ipv4_addr\n\t\tflags interval\n\
             \t\telements = {{ 10.232.1.0/24 . 10.232.1.0/24 }}\n\t}}\n\
             \tchain machines {{\n\t\ttype filter hook forward priority -1; policy accept;\n\
             \t\tether type arp accept\n{extra}\
             \t\tip saddr . ip daddr . meta l4proto . th dport @machine_services_v4 accept\n\
             \t\tether saddr @other_macs drop\n\
             \t\tip saddr . ip daddr @isolated_v4 drop\n\t}}\n"
        ),
    )
}

/// `make test-stress`, for the bridge table: while machine 1 sends to
/// machine 2 on the same bridge on a port a policy opens (5001) and one it
/// does not (5002), the module re-applies STRESS_BRIDGE_APPLIES times
/// (default 200) alternating two files whose bridge tables differ in set
/// elements only (updated in place): every allowed datagram must arrive and
/// no denied one. Then STRESS_BRIDGE_SWAPS (default 50) re-applies alternate
/// with a structurally different bridge table (whole-file swaps): nothing
/// denied may leak; allowed datagrams dropped are reported.
#[test]
#[ignore = "long: run with make test-stress"]
fn stress_bridge_table_reapplies_under_traffic_drop_nothing_allowed_and_leak_nothing() {
    let count = |var: &str, default: usize| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (applies, swaps) = (
        count("STRESS_BRIDGE_APPLIES", 200),
        count("STRESS_BRIDGE_SWAPS", 50),
    );
    let Machines { host, m1, m2 } = Machines::new("brs");
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("iso.nft");
    let files: Vec<PathBuf> = [(1, false), (2, false), (1, true)]
        .iter()
        .enumerate()
        .map(|(i, (mac, swap))| {
            let path = dir.path().join(format!("{i}.nft"));
            std::fs::write(&path, bridge_stress_ruleset(*mac, *swap)).unwrap();
            path
        })
        .collect();
    let a = |i: usize| args(&files[i], &dest, "anklume_t");
    // Positive control: without our tables the denied port is reached.
    let control = udp_under_traffic((&m1.0, "10.232.1.2"), (&m2.0, "10.232.1.3"), || {
        std::thread::sleep(std::time::Duration::from_millis(300))
    });
    assert!(control.leaked > 0, "the leak counter can count");
    assert_eq!(host.module(a(0))["failed"], false);
    // Neighbours resolved before the traffic (ARP passes the bridge table;
    // the probe itself is dropped: positive control of the isolation).
    assert!(!pings(&m1, "10.232.1.3"));
    for (label, n, pair) in [("in-place", applies, [0, 1]), ("swap", swaps, [0, 2])] {
        let mut updates = std::collections::BTreeMap::<String, usize>::new();
        let started = std::time::Instant::now();
        let traffic = udp_under_traffic((&m1.0, "10.232.1.2"), (&m2.0, "10.232.1.3"), || {
            for i in 0..n {
                let out = host.module(a(pair[(i + 1) % 2]));
                assert_eq!(out["failed"], false, "{out}");
                *updates.entry(out["update"].to_string()).or_default() += 1;
            }
        });
        eprintln!(
            "stress bridge {label}: {n} re-applies ({updates:?}) in {:.1} s under traffic; \
             sent {} allowed + {} denied datagrams; allowed received {}, allowed dropped {}, \
             denied leaked {}, receiver socket overflows {}",
            started.elapsed().as_secs_f64(),
            traffic.sent,
            traffic.sent,
            traffic.allowed_received,
            traffic.sent - traffic.allowed_received,
            traffic.leaked,
            traffic.socket_overflows
        );
        assert!(traffic.sent > 0 && traffic.allowed_received > 0);
        assert_eq!(traffic.leaked, 0, "{label}: a denied datagram passed");
        if label == "in-place" {
            assert_eq!(updates.get("\"sets\""), Some(&n), "{updates:?}");
            assert_eq!(
                traffic.allowed_received, traffic.sent,
                "in-place updates drop nothing allowed"
            );
        } else {
            assert_eq!(updates.get("\"table\""), Some(&n), "{updates:?}");
        }
    }
}
