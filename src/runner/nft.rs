//! The thin layer that talks to `nft`. Rulesets go in on stdin, so nothing
//! half-written ever sits on disk; nft's own stderr is part of every error.

use super::process::{find_program, run_with_timeout, DEFAULT_TIMEOUT};
use crate::effects::{table_comment, Listing};
use crate::model::TableName;
use crate::plan::Capabilities;
use anyhow::Context;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Where nft reads a ruleset given on stdin; rewritten in messages.
const STDIN_PATH: &str = "/dev/stdin";

/// An `nft` to run, optionally inside a named network namespace (tests use
/// one so they never touch the host's tables).
#[derive(Debug, Clone)]
pub struct Nft {
    program: PathBuf,
    netns: Option<String>,
    timeout: Duration,
}

/// Tables standing in for the other managers' in the scratch namespace
/// (Incus's, iptables-nft's): loading our ruleset must leave them exactly
/// as they were. Filter chains only, so any kernel that runs nft loads them.
const SENTINEL_TABLES: &str = "table inet incus {
	chain fwd.sentinel {
		type filter hook forward priority filter; policy accept;
		oifname \"sentinel0\" accept
	}
}
table ip filter {
	chain FORWARD {
		type filter hook forward priority filter; policy accept;
	}
}
table ip6 filter {
	chain INPUT {
		type filter hook input priority filter; policy accept;
	}
}
";

/// A bridge-family sentinel (ebtables-nft's table), loaded when the kernel
/// has the bridge family: a kernel without it still checks inet-only
/// rulesets (router mode in a minimal instance).
const BRIDGE_SENTINEL: &str = "table bridge filter {
	chain FORWARD {
		type filter hook forward priority filter; policy accept;
	}
}
";

/// Separates the listings the scratch namespace prints.
const SCRATCH_SEPARATOR: &str = ":::anklume-isolation:::";

/// What a ruleset does, seen in a scratch network namespace.
#[derive(Debug)]
pub struct Scratch {
    /// The sentinel tables alone.
    pub before: Listing,
    /// After loading the ruleset next to them.
    pub after: Listing,
    /// Our table's comment (nft 1.0.6 prints it only in text listings).
    pub comment: Option<String>,
    /// The comment of `bridge <table>`, when the ruleset has one.
    pub bridge_comment: Option<String>,
}

impl Nft {
    pub fn find() -> Option<Nft> {
        find_program("nft").map(|program| Nft {
            program,
            netns: None,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// The same nft, whose every run is killed after `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Nft {
        self.timeout = timeout;
        self
    }

    /// The same nft, run inside the named network namespace
    /// (`ip netns exec`).
    pub fn in_netns(&self, netns: &str) -> Nft {
        Nft {
            program: self.program.clone(),
            netns: Some(netns.to_string()),
            timeout: self.timeout,
        }
    }

    /// How long each nft run may take; other tools of the same run use it.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn program(&self) -> &Path {
        &self.program
    }

    fn command(&self) -> Command {
        match &self.netns {
            None => Command::new(&self.program),
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(&self.program);
                cmd
            }
        }
    }

    /// Runs nft with `args`, feeding `stdin`; returns stdout, or an error
    /// carrying nft's stderr.
    fn run(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        let mut cmd = self.command();
        cmd.args(args);
        run_with_timeout(cmd, stdin, self.timeout).map_err(|err| {
            anyhow::anyhow!(
                "nft {}: {}",
                args.join(" "),
                err.to_string().replace(STDIN_PATH, "ruleset")
            )
        })
    }

    /// `nft -c`: the kernel checks the whole transaction and aborts it.
    pub fn check(&self, ruleset: &str) -> anyhow::Result<()> {
        self.run(&["-c", "-f", STDIN_PATH], Some(ruleset))
            .map(drop)
            .context("the ruleset does not pass `nft -c`")
    }

    /// `nft -j -f`: one atomic transaction given as nft's JSON commands.
    pub fn load_json(&self, batch: &str) -> anyhow::Result<()> {
        self.run(&["-j", "-f", STDIN_PATH], Some(batch)).map(drop)
    }

    /// `nft -f`: one atomic transaction.
    pub fn load(&self, ruleset: &str) -> anyhow::Result<()> {
        self.run(&["-f", STDIN_PATH], Some(ruleset)).map(drop)
    }

    pub fn table_exists(&self, table: &TableName) -> anyhow::Result<bool> {
        self.family_table_exists("inet", table)
    }

    /// Whether `<family> <table>` exists.
    pub fn family_table_exists(&self, family: &str, table: &TableName) -> anyhow::Result<bool> {
        let out = self.run(&["-j", "list", "tables", family], None)?;
        let json: Value = serde_json::from_str(&out).context("nft printed invalid JSON")?;
        let exists = objects(&json, "table").any(|t| t["name"] == table.as_str());
        Ok(exists)
    }

    /// The live table as nft prints it (reloadable text), if it exists.
    pub fn table_text(&self, table: &TableName) -> anyhow::Result<Option<String>> {
        self.family_table_text("inet", table)
    }

    /// [`Nft::table_text`] of `<family> <table>`.
    pub fn family_table_text(
        &self,
        family: &str,
        table: &TableName,
    ) -> anyhow::Result<Option<String>> {
        if !self.family_table_exists(family, table)? {
            return Ok(None);
        }
        self.run(&["list", "table", family, table.as_str()], None)
            .map(Some)
    }

    /// The live table in canonical JSON form, if it exists: read the same
    /// way as the scratch namespace's listing, so the two compare.
    pub fn table_canonical(&self, table: &TableName) -> anyhow::Result<Option<Value>> {
        self.family_table_canonical("inet", table)
    }

    /// [`Nft::table_canonical`] of `<family> <table>`.
    pub fn family_table_canonical(
        &self,
        family: &str,
        table: &TableName,
    ) -> anyhow::Result<Option<Value>> {
        if !self.family_table_exists(family, table)? {
            return Ok(None);
        }
        let out = self.run(&["-j", "list", "table", family, table.as_str()], None)?;
        Ok(Some(
            Listing::parse(&out)?.family_table_canonical(family, table.as_str()),
        ))
    }

    /// The live table's comment: `None` when the table does not exist,
    /// `Some(None)` when it has no comment.
    pub fn table_comment(&self, table: &TableName) -> anyhow::Result<Option<Option<String>>> {
        self.family_table_comment("inet", table)
    }

    /// [`Nft::table_comment`] of `<family> <table>`.
    pub fn family_table_comment(
        &self,
        family: &str,
        table: &TableName,
    ) -> anyhow::Result<Option<Option<String>>> {
        Ok(self
            .family_table_text(family, table)?
            .map(|text| table_comment(&text)))
    }

    /// Loads `ruleset` into a throwaway network namespace (`unshare --net`)
    /// next to [`SENTINEL_TABLES`] and lists the result, so what the ruleset
    /// does is read from the kernel and nft themselves, not by re-parsing
    /// text. The host's tables are never involved.
    pub fn scratch(&self, ruleset: &str, table: &TableName) -> anyhow::Result<Scratch> {
        let unshare = find_program("unshare").context(
            "`unshare` (util-linux) is needed to compare rulesets in a scratch namespace",
        )?;
        let mut cmd = match &self.netns {
            None => Command::new(&unshare),
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(&unshare);
                cmd
            }
        };
        cmd.args(["--net", "--", "/bin/sh", "-c"])
            .arg(
                r#"printf '%s' "$2" | "$0" -f /dev/stdin &&
                   { printf '%s' "$4" | "$0" -f /dev/stdin 2>/dev/null || true; } &&
                   "$0" -j list ruleset && echo "$3" &&
                   "$0" -f /dev/stdin && "$0" -j list ruleset && echo "$3" &&
                   "$0" list table inet "$1" && echo "$3" &&
                   if "$0" list tables bridge | grep -qxF "table bridge $1"; then
                       exec "$0" list table bridge "$1"; fi"#,
            )
            .arg(&self.program)
            .arg(table.as_str())
            .arg(SENTINEL_TABLES)
            .arg(SCRATCH_SEPARATOR)
            .arg(BRIDGE_SENTINEL);
        let out = run_with_timeout(cmd, Some(ruleset), self.timeout).map_err(|err| {
            anyhow::anyhow!(
                "loading the ruleset in a scratch network namespace: {}",
                err.to_string().replace(STDIN_PATH, "ruleset")
            )
        })?;
        let parts: Vec<&str> = out.split(SCRATCH_SEPARATOR).collect();
        let [before, after, text, bridge_text] = parts[..] else {
            anyhow::bail!("the scratch namespace printed an unexpected listing");
        };
        Ok(Scratch {
            before: Listing::parse(before)?,
            after: Listing::parse(after)?,
            comment: table_comment(text),
            bridge_comment: table_comment(bridge_text),
        })
    }

    /// Probes what the kernel accepts, with `nft -c` on a throwaway table
    /// (checked, never committed).
    pub fn probe(&self) -> Capabilities {
        let accepts = |statement: &str| {
            let table = format!("anklume_probe_{}", std::process::id());
            let ruleset = format!(
                "table inet {table} {{\n\tchain probe {{\n\t\ttype filter hook forward priority 0; policy accept;\n\t\t{statement}\n\t}}\n}}\n"
            );
            self.check(&ruleset).is_ok()
        };
        Capabilities {
            log: accepts(r#"log prefix "anklume-probe: " level info"#),
            limit: accepts("limit rate 1/second burst 1 packets"),
            conntrack: accepts("ct state established accept"),
        }
    }

    /// Other tables' forward chains whose policy is drop (firewalld,
    /// Docker, ufw): they may drop what our table accepts.
    pub fn foreign_forward_drop_chains(&self, ours: &TableName) -> anyhow::Result<Vec<String>> {
        let out = self.run(&["-j", "list", "chains"], None)?;
        let json: Value = serde_json::from_str(&out).context("nft printed invalid JSON")?;
        Ok(objects(&json, "chain")
            .filter(|c| c["hook"] == "forward" && c["policy"] == "drop")
            .filter(|c| !(c["family"] == "inet" && c["table"] == ours.as_str()))
            .map(|c| {
                format!(
                    "{} {} {}",
                    c["family"].as_str().unwrap_or("?"),
                    c["table"].as_str().unwrap_or("?"),
                    c["name"].as_str().unwrap_or("?")
                )
            })
            .collect())
    }
}

/// The objects of one kind (`table`, `chain`, ...) in nft's JSON output.
fn objects<'a>(json: &'a Value, kind: &'a str) -> impl Iterator<Item = &'a Value> {
    json["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(move |entry| entry.get(kind))
}

/// Removes what differs between two listings of the same ruleset: handles,
/// the metainfo header, the order of set elements (hash sets list in hash
/// order, which depends on a per-set random seed), and the order of a
/// table's objects (nft lists chains in creation order, so a chain added in
/// place lists after one loaded with the whole table; only the order of the
/// rules inside a chain has a meaning, and the stable sort keeps it).
pub fn canonical(mut json: Value) -> Value {
    fn walk(v: &mut Value) {
        match v {
            Value::Object(map) => {
                map.remove("handle");
                // A counter's figures move with traffic; only its presence
                // is part of the ruleset.
                if let Some(Value::Object(counter)) = map.get_mut("counter") {
                    counter.remove("packets");
                    counter.remove("bytes");
                }
                for value in map.values_mut() {
                    walk(value);
                }
                if let Some(Value::Array(elems)) = map.get_mut("elem") {
                    elems.sort_by_key(|e| e.to_string());
                }
            }
            Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    if let Some(items) = json.get_mut("nftables").and_then(Value::as_array_mut) {
        items.retain(|item| item.get("metainfo").is_none());
        items.sort_by_cached_key(object_order);
    }
    walk(&mut json);
    json
}

/// Where an object of a listing sorts in [`canonical`]: by kind (tables
/// first, rules last), then by the name of the object or, for a rule, of
/// its chain.
fn object_order(item: &Value) -> (u8, String, String) {
    let Some((kind, object)) = item.as_object().and_then(|o| o.iter().next()) else {
        return (u8::MAX, String::new(), String::new());
    };
    let rank = match kind.as_str() {
        "table" => 0,
        "set" | "map" => 1,
        "chain" => 3,
        "rule" => 4,
        _ => 2,
    };
    let field = |key: &str| object.get(key).and_then(Value::as_str).unwrap_or_default();
    (
        rank,
        // The family first: `inet t` and `bridge t` may hold chains of the
        // same name.
        format!(
            "{}/{}/{}",
            field("family"),
            field("table"),
            field(if rank == 4 { "chain" } else { "name" })
        ),
        kind.clone(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_form_ignores_handles_metainfo_and_element_order() {
        let a = json!({"nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "inet", "name": "t", "handle": 4}},
            {"set": {"name": "s", "handle": 2, "elem": ["b", "a"]}}
        ]});
        let b = json!({"nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "inet", "name": "t", "handle": 9}},
            {"set": {"name": "s", "handle": 7, "elem": ["a", "b"]}}
        ]});
        assert_eq!(canonical(a), canonical(b));
        let c = json!({"nftables": [{"set": {"name": "s", "elem": ["a", "c"]}}]});
        let d = json!({"nftables": [{"set": {"name": "s", "elem": ["a", "b"]}}]});
        assert_ne!(canonical(c), canonical(d));
    }

    #[test]
    fn canonical_form_ignores_chain_order_but_not_rule_order() {
        let chain = |name: &str| json!({"chain": {"table": "t", "name": name}});
        let rule = |chain: &str, n: u64| json!({"rule": {"table": "t", "chain": chain, "expr": n}});
        let a =
            json!({"nftables": [chain("x"), chain("y"), rule("x", 1), rule("x", 2), rule("y", 3)]});
        let b =
            json!({"nftables": [chain("y"), chain("x"), rule("y", 3), rule("x", 1), rule("x", 2)]});
        assert_eq!(canonical(a.clone()), canonical(b));
        let swapped =
            json!({"nftables": [chain("x"), chain("y"), rule("x", 2), rule("x", 1), rule("y", 3)]});
        assert_ne!(canonical(a), canonical(swapped));
    }
}
