//! The thin layer that talks to `nft`. Rulesets go in on stdin, so nothing
//! half-written ever sits on disk; nft's own stderr is part of every error.

use super::process::{find_program, run_with_stdin};
use crate::model::TableName;
use crate::plan::Capabilities;
use anyhow::Context;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where nft reads a ruleset given on stdin; rewritten in messages.
const STDIN_PATH: &str = "/dev/stdin";

/// An `nft` to run, optionally inside a named network namespace (tests use
/// one so they never touch the host's tables).
#[derive(Debug, Clone)]
pub struct Nft {
    program: PathBuf,
    netns: Option<String>,
}

impl Nft {
    pub fn find() -> Option<Nft> {
        find_program("nft").map(|program| Nft {
            program,
            netns: None,
        })
    }

    /// The same nft, run inside the named network namespace
    /// (`ip netns exec`).
    pub fn in_netns(&self, netns: &str) -> Nft {
        Nft {
            program: self.program.clone(),
            netns: Some(netns.to_string()),
        }
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
        run_with_stdin(cmd, stdin).map_err(|err| {
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

    /// `nft -f`: one atomic transaction.
    pub fn load(&self, ruleset: &str) -> anyhow::Result<()> {
        self.run(&["-f", STDIN_PATH], Some(ruleset)).map(drop)
    }

    pub fn table_exists(&self, table: &TableName) -> anyhow::Result<bool> {
        let out = self.run(&["-j", "list", "tables", "inet"], None)?;
        let json: Value = serde_json::from_str(&out).context("nft printed invalid JSON")?;
        let exists = objects(&json, "table").any(|t| t["name"] == table.as_str());
        Ok(exists)
    }

    /// The live table as nft prints it (reloadable text), if it exists.
    pub fn table_text(&self, table: &TableName) -> anyhow::Result<Option<String>> {
        if !self.table_exists(table)? {
            return Ok(None);
        }
        self.run(&["list", "table", "inet", table.as_str()], None)
            .map(Some)
    }

    /// The live table in canonical JSON form, if it exists.
    pub fn table_canonical(&self, table: &TableName) -> anyhow::Result<Option<Value>> {
        if !self.table_exists(table)? {
            return Ok(None);
        }
        let out = self.run(&["-j", "list", "table", "inet", table.as_str()], None)?;
        let json: Value = serde_json::from_str(&out).context("nft printed invalid JSON")?;
        Ok(Some(canonical(json)))
    }

    /// What `ruleset` becomes once loaded, in canonical JSON form: it is
    /// loaded into a throwaway network namespace (`unshare --net`) and
    /// listed from there, so the comparison with the live table is done by
    /// the kernel and nft themselves, not by re-parsing text.
    pub fn canonical_of(&self, ruleset: &str, table: &TableName) -> anyhow::Result<Value> {
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
            .arg(r#""$0" -f /dev/stdin && exec "$0" -j list table inet "$1""#)
            .arg(&self.program)
            .arg(table.as_str());
        let out = run_with_stdin(cmd, Some(ruleset)).map_err(|err| {
            anyhow::anyhow!(
                "loading the ruleset in a scratch network namespace: {}",
                err.to_string().replace(STDIN_PATH, "ruleset")
            )
        })?;
        let json: Value = serde_json::from_str(&out).context("nft printed invalid JSON")?;
        Ok(canonical(json))
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
/// the metainfo header, and the order of set elements (hash sets list in
/// hash order, which depends on a per-set random seed).
pub fn canonical(mut json: Value) -> Value {
    fn walk(v: &mut Value) {
        match v {
            Value::Object(map) => {
                map.remove("handle");
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
    }
    walk(&mut json);
    json
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
}
