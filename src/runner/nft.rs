//! The thin layer that talks to `nft`. Rulesets go in on stdin, so nothing
//! half-written ever sits on disk; nft's own stderr is part of every error.

use crate::model::TableName;
use crate::plan::Capabilities;
use anyhow::{bail, Context};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where nft reads a ruleset given on stdin; rewritten in messages.
const STDIN_PATH: &str = "/dev/stdin";

/// An `nft` to run, optionally inside a named network namespace (tests use
/// one so they never touch the host's tables).
#[derive(Debug, Clone)]
pub struct Nft {
    program: PathBuf,
    netns: Option<String>,
}

/// Finds an executable by name on PATH, then in the sbin directories that
/// a non-login shell (Ansible's) may leave out of PATH.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
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

/// Runs a command, writing `stdin` to it; returns stdout or an error with
/// the exit status and stderr.
pub fn run_with_stdin(mut cmd: Command, stdin: Option<&str>) -> anyhow::Result<String> {
    let shown = format!("{:?}", cmd.get_program());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("cannot run {shown}"))?;
    // Write stdin from a thread so a large ruleset cannot deadlock against
    // a child that fills its stdout pipe first.
    let writer = match (stdin, child.stdin.take()) {
        (Some(text), Some(mut pipe)) => {
            let text = text.to_string();
            Some(std::thread::spawn(move || pipe.write_all(text.as_bytes())))
        }
        _ => None,
    };
    let output = child
        .wait_with_output()
        .with_context(|| format!("waiting for {shown}"))?;
    if let Some(writer) = writer {
        // A child that exits early closes the pipe; its stderr says why.
        let _ = writer.join();
    }
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stderr = stderr.trim();
        let stderr = if stderr.is_empty() {
            stdout.trim()
        } else {
            stderr
        };
        bail!("failed ({}): {stderr}", output.status);
    }
    Ok(stdout)
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
