//! What a ruleset *does*, read back from the kernel, not what its text
//! names.
//!
//! The text guard ([`crate::guard`]) proves a ruleset only names our table;
//! it cannot see that a `nat` chain rewrites destinations, that a `notrack`
//! chain at prerouting blinds conntrack, that an `ingress` chain drops on
//! `lo`, or that an empty `table inet anklume {}` silently removes the
//! isolation. So the ruleset is loaded into a scratch network namespace
//! next to sentinel tables, listed with `nft -j`, and the listing is read
//! into the typed structures below and checked: only our table changed,
//! its base chains are the (type, hook) pairs our renderer emits for this
//! mode, its rules use only the statements that renderer emits, and a
//! host-mode table still drops in its forward chain.
//!
//! Pure: the runner hands in nft's JSON text.

use anyhow::{bail, Context};
use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// What one enforcement mode may load. Router mode (the firewall VM) adds
/// its own constant next to [`HOST_MODE`].
#[derive(Debug, Clone, Copy)]
pub struct ModeRules {
    pub name: &'static str,
    /// (chain type, hook) of every base chain the renderer emits.
    pub base_chains: &'static [(&'static str, &'static str)],
    /// The `nft -j` statement kinds the renderer emits in rules.
    pub statements: &'static [&'static str],
    /// The hook of the chain that must end in a `drop` (the isolation
    /// itself), if any.
    pub required_drop_hook: Option<&'static str>,
}

/// Host isolation: `isolation` on forward, `host_input` on input, both
/// filter chains; matches, verdicts, verdict maps, rate-limited logging.
pub const HOST_MODE: ModeRules = ModeRules {
    name: "host",
    base_chains: &[("filter", "forward"), ("filter", "input")],
    statements: &[
        "match", "accept", "drop", "reject", "jump", "goto", "return", "vmap", "counter", "limit",
        "log",
    ],
    required_drop_hook: Some("forward"),
};

/// The firewall instance's router table (vm mode): the same chain shapes as
/// the host, with policy drop; its forward chain must drop.
pub const ROUTER_MODE: ModeRules = ModeRules {
    name: "router",
    base_chains: HOST_MODE.base_chains,
    statements: HOST_MODE.statements,
    required_drop_hook: Some("forward"),
};

/// The host's steering table of vm mode (`firewall_vm_routing`): it marks
/// and untracks domain-to-domain packets before conntrack (prerouting at
/// raw priority) and drops the host's redirects on output. Nothing else.
pub const ROUTING_MODE: ModeRules = ModeRules {
    name: "vm routing",
    base_chains: &[("filter", "prerouting"), ("filter", "output")],
    statements: &["match", "accept", "drop", "mangle", "notrack"],
    required_drop_hook: None,
};

/// Object kinds a table of ours may hold. Flowtables, conntrack helpers,
/// timeouts, secmarks and synproxies change what the kernel does to
/// traffic outside any of our verdicts: never rendered, never loaded.
const OBJECT_KINDS: &[&str] = &[
    "table", "chain", "rule", "set", "map", "limit", "counter", "quota",
];

/// `nft -j list ...` output.
#[derive(Debug, Deserialize)]
pub struct Listing {
    nftables: Vec<Entry>,
}

/// One entry: exactly one key (its kind) holding the object.
#[derive(Debug, Deserialize)]
struct Entry(BTreeMap<String, Object>);

/// The fields of an nft object that the checks read; the rest is kept as
/// raw JSON only to compare objects with each other.
#[derive(Debug, Deserialize, Clone, PartialEq)]
struct Object {
    family: Option<String>,
    /// A table's own name is `name`; every other object names its `table`.
    table: Option<String>,
    name: Option<String>,
    chain: Option<String>,
    #[serde(rename = "type")]
    kind: Option<Value>,
    hook: Option<String>,
    dev: Option<Value>,
    #[serde(default)]
    expr: Vec<BTreeMap<String, Value>>,
    #[serde(flatten)]
    rest: BTreeMap<String, Value>,
}

impl Listing {
    pub fn parse(json: &str) -> anyhow::Result<Listing> {
        serde_json::from_str(json).context("nft printed JSON this module does not understand")
    }

    /// (kind, object), without nft's metainfo header.
    fn objects(&self) -> impl Iterator<Item = (&str, &Object)> {
        self.nftables
            .iter()
            .flat_map(|entry| entry.0.iter())
            .filter(|(kind, _)| kind.as_str() != "metainfo")
            .map(|(kind, object)| (kind.as_str(), object))
    }

    /// The objects of `inet <table>`.
    fn of_table<'a>(&'a self, table: &'a str) -> impl Iterator<Item = (&'a str, &'a Object)> {
        self.objects()
            .filter(move |(kind, o)| is_in(kind, o, table))
    }

    /// Everything that is not ours, handles removed, in listing order.
    fn foreign(&self, table: &str) -> Vec<(String, Object)> {
        self.objects()
            .filter(|(kind, o)| !is_in(kind, o, table))
            .map(|(kind, o)| {
                let mut o = o.clone();
                o.rest.remove("handle");
                (kind.to_string(), o)
            })
            .collect()
    }

    /// The interface names in our table's sets of type `ifname` (the domain
    /// bridges), for the boot fallback.
    pub fn ifname_elements(&self, table: &str) -> BTreeSet<String> {
        self.of_table(table)
            .filter(|(kind, o)| *kind == "set" && o.kind == Some(Value::from("ifname")))
            .filter_map(|(_, o)| o.rest.get("elem"))
            .filter_map(|elems| serde_json::from_value::<Vec<String>>(elems.clone()).ok())
            .flatten()
            .collect()
    }

    /// Interface wildcards our rules match (`iifname "net-*"`), for the
    /// boot fallback: bridges created after the render.
    pub fn ifname_wildcards(&self, table: &str) -> BTreeSet<String> {
        #[derive(Deserialize)]
        struct Match {
            left: Operand,
            right: Value,
        }
        #[derive(Deserialize)]
        struct Operand {
            meta: Option<Meta>,
        }
        #[derive(Deserialize)]
        struct Meta {
            key: String,
        }
        self.of_table(table)
            .filter(|(kind, _)| *kind == "rule")
            .flat_map(|(_, rule)| rule.expr.iter())
            .filter_map(|stmt| stmt.get("match"))
            .filter_map(|m| serde_json::from_value::<Match>(m.clone()).ok())
            .filter(|m| {
                m.left
                    .meta
                    .as_ref()
                    .is_some_and(|meta| meta.key == "iifname" || meta.key == "oifname")
            })
            .filter_map(|m| m.right.as_str().map(str::to_string))
            .filter(|pattern| pattern.ends_with('*'))
            .collect()
    }

    /// Our table's objects as canonical JSON (handles removed, set elements
    /// sorted): what the live table is compared with.
    pub fn table_canonical(&self, table: &str) -> Value {
        let entries: Vec<Value> = self
            .nftables
            .iter()
            .flat_map(|entry| entry.0.iter())
            .filter(|(kind, o)| kind.as_str() != "metainfo" && is_in(kind, o, table))
            .map(|(kind, o)| serde_json::json!({ kind.as_str(): object_value(o) }))
            .collect();
        crate::runner::nft::canonical(serde_json::json!({ "nftables": entries }))
    }
}

fn object_value(o: &Object) -> Value {
    let mut map: serde_json::Map<String, Value> =
        o.rest.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let mut put = |key: &str, value: Option<Value>| {
        if let Some(value) = value {
            map.insert(key.to_string(), value);
        }
    };
    put("family", o.family.clone().map(Value::from));
    put("table", o.table.clone().map(Value::from));
    put("name", o.name.clone().map(Value::from));
    put("chain", o.chain.clone().map(Value::from));
    put("type", o.kind.clone());
    put("hook", o.hook.clone().map(Value::from));
    put("dev", o.dev.clone());
    if !o.expr.is_empty() {
        put("expr", serde_json::to_value(&o.expr).ok());
    }
    Value::Object(map)
}

fn is_in(kind: &str, o: &Object, table: &str) -> bool {
    let name = if kind == "table" {
        o.name.as_deref()
    } else {
        o.table.as_deref()
    };
    o.family.as_deref() == Some("inet") && name == Some(table)
}

/// Checks the scratch namespace's listing `after` loading our ruleset
/// against `before` (the sentinel tables alone).
pub fn check_effects(
    before: &Listing,
    after: &Listing,
    table: &str,
    mode: &ModeRules,
) -> anyhow::Result<()> {
    if before.foreign(table) != after.foreign(table) {
        bail!(
            "loading the ruleset changed tables other than inet {table} in a scratch \
             namespace: refused"
        );
    }
    let ours: Vec<(&str, &Object)> = after.of_table(table).collect();
    if !ours.iter().any(|(kind, _)| *kind == "table") {
        bail!("the ruleset does not leave table inet {table} in place: refused");
    }
    let mut drop_chains = BTreeSet::new();
    let mut hooked: BTreeMap<&str, &str> = BTreeMap::new();
    for (kind, o) in &ours {
        if !OBJECT_KINDS.contains(kind) {
            bail!(
                "table inet {table} would hold a `{kind}` object ({}), which this module never \
                 loads",
                o.name.as_deref().unwrap_or("?")
            );
        }
        let name = o.name.as_deref().unwrap_or("?");
        if *kind == "chain" {
            if let Some(hook) = &o.hook {
                let chain_type = o.kind.as_ref().and_then(Value::as_str).unwrap_or("?");
                if o.dev.is_some() || !mode.base_chains.contains(&(chain_type, hook.as_str())) {
                    bail!(
                        "chain {name} is a `{chain_type}` chain on hook `{hook}`{}: {} mode \
                         rulesets only have {}; refused",
                        if o.dev.is_some() { " of a device" } else { "" },
                        mode.name,
                        mode.base_chains
                            .iter()
                            .map(|(t, h)| format!("{t} on {h}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                hooked.insert(name, hook.as_str());
            }
        }
        if *kind == "rule" {
            for stmt in &o.expr {
                for statement in stmt.keys() {
                    if !mode.statements.contains(&statement.as_str()) {
                        bail!(
                            "a rule of chain {} uses the `{statement}` statement, which {} \
                             mode rulesets never use; refused",
                            o.chain.as_deref().unwrap_or("?"),
                            mode.name
                        );
                    }
                }
                if stmt.contains_key("drop") {
                    drop_chains.insert(o.chain.as_deref().unwrap_or("?"));
                }
            }
        }
    }
    if let Some(required) = mode.required_drop_hook {
        let isolates = hooked
            .iter()
            .any(|(chain, hook)| *hook == required && drop_chains.contains(chain));
        if !isolates {
            bail!(
                "table inet {table} has no {required} chain that drops: loading it would remove \
                 the isolation; refused"
            );
        }
    }
    Ok(())
}

/// When the live table and the wanted one differ only in the elements of
/// their sets and maps, the `nft -j -f` batch that updates just those (for
/// each: `flush set` then `add element`), applied in one transaction: no
/// chain, rule or set is recreated, so no packet meets a half-built table
/// (a whole-table swap dropped 6 of 40,051 packets of an allowed flow over
/// 400 swaps; element updates dropped none). `None` when anything else
/// differs (or nothing does): then the whole table is replaced.
pub fn set_only_update(live: &Value, want: &Value) -> Option<String> {
    let parse = |v: &Value| serde_json::from_value::<Listing>(v.clone()).ok();
    let (live, want) = (parse(live)?, parse(want)?);
    let (live, want): (Vec<_>, Vec<_>) = (live.objects().collect(), want.objects().collect());
    if live.len() != want.len() {
        return None;
    }
    let mut batch = Vec::new();
    for ((live_kind, live_obj), (kind, obj)) in live.iter().zip(&want) {
        let without_elements = |o: &Object| {
            let mut o = o.clone();
            o.rest.remove("elem");
            o
        };
        if live_kind != kind || without_elements(live_obj) != without_elements(obj) {
            return None;
        }
        if live_obj.rest.get("elem") == obj.rest.get("elem") {
            continue;
        }
        if !matches!(*kind, "set" | "map") {
            return None;
        }
        let id = serde_json::json!({
            "family": obj.family, "table": obj.table, "name": obj.name,
        });
        batch.push(serde_json::json!({ "flush": { *kind: id } }));
        if let Some(elem) = obj.rest.get("elem") {
            let mut element = id.clone();
            element["elem"] = elem.clone();
            batch.push(serde_json::json!({ "add": { "element": element } }));
        }
    }
    (!batch.is_empty()).then(|| serde_json::json!({ "nftables": batch }).to_string())
}

/// The table comment in `nft list table` text (nft 1.0.6 prints it, but
/// not in its JSON): the line right after the table's opening line.
pub fn table_comment(listing: &str) -> Option<String> {
    let mut lines = listing.lines().skip_while(|l| !l.starts_with("table "));
    lines.next()?;
    let rest = lines.next()?.trim().strip_prefix("comment \"")?;
    rest.strip_suffix('"').map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(entries: &str) -> Listing {
        Listing::parse(&format!(
            r#"{{"nftables": [{{"metainfo": {{"version": "1.0.6"}}}}{entries}]}}"#
        ))
        .unwrap()
    }

    const SENTINEL: &str = r#", {"table": {"family": "inet", "name": "incus", "handle": 1}},
        {"chain": {"family": "inet", "table": "incus", "name": "fwd", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}}"#;

    const OURS: &str = r#", {"table": {"family": "inet", "name": "t", "handle": 2}},
        {"set": {"family": "inet", "table": "t", "name": "b", "handle": 3, "type": "ifname", "elem": ["net-b", "net-a"]}},
        {"chain": {"family": "inet", "table": "t", "name": "isolation", "handle": 1, "type": "filter", "hook": "forward", "prio": -1, "policy": "accept"}},
        {"rule": {"family": "inet", "table": "t", "chain": "isolation", "handle": 4, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "net-*"}}, {"drop": null}]}}"#;

    #[test]
    fn a_rendered_shape_passes_and_yields_its_bridges_and_wildcards() {
        let before = listing(SENTINEL);
        let after = listing(&format!("{SENTINEL}{OURS}"));
        check_effects(&before, &after, "t", &HOST_MODE).unwrap();
        assert_eq!(
            after.ifname_elements("t").into_iter().collect::<Vec<_>>(),
            ["net-a", "net-b"]
        );
        assert_eq!(
            after.ifname_wildcards("t").into_iter().collect::<Vec<_>>(),
            ["net-*"]
        );
    }

    #[test]
    fn effects_outside_the_renderers_shapes_are_refused() {
        let before = listing(SENTINEL);
        let cases = [
            (
                r#", {"table": {"family": "inet", "name": "t"}}"#,
                "no forward chain that drops",
            ),
            (
                r#", {"table": {"family": "inet", "name": "t"}},
                {"chain": {"family": "inet", "table": "t", "name": "n", "type": "nat", "hook": "prerouting", "prio": -100}}"#,
                "`nat` chain on hook `prerouting`",
            ),
            (
                r#", {"table": {"family": "inet", "name": "t"}},
                {"chain": {"family": "inet", "table": "t", "name": "i", "type": "filter", "hook": "ingress", "dev": "lo", "prio": 0}}"#,
                "hook `ingress` of a device",
            ),
            (
                r#", {"table": {"family": "inet", "name": "t"}},
                {"rule": {"family": "inet", "table": "t", "chain": "c", "expr": [{"notrack": null}]}}"#,
                "`notrack` statement",
            ),
            (
                r#", {"table": {"family": "inet", "name": "t"}},
                {"flowtable": {"family": "inet", "table": "t", "name": "f"}}"#,
                "`flowtable` object",
            ),
            ("", "does not leave table inet t"),
        ];
        for (entries, expected) in cases {
            let after = listing(&format!("{SENTINEL}{entries}"));
            let err = check_effects(&before, &after, "t", &HOST_MODE)
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{expected}: {err}");
        }
        // A sentinel that changed (or vanished) is refused.
        let after = listing(OURS);
        let err = check_effects(&before, &after, "t", &HOST_MODE).unwrap_err();
        assert!(err.to_string().contains("other than inet t"), "{err}");
    }

    #[test]
    fn canonical_form_of_our_table_ignores_handles_and_element_order() {
        let a = listing(&format!("{SENTINEL}{OURS}"));
        let b = listing(
            &OURS
                .replace("\"handle\": 3", "\"handle\": 9")
                .replace(r#"["net-b", "net-a"]"#, r#"["net-a", "net-b"]"#),
        );
        assert_eq!(a.table_canonical("t"), b.table_canonical("t"));
        assert_ne!(a.table_canonical("t"), a.table_canonical("incus"));
    }

    #[test]
    fn only_element_changes_become_a_set_update() {
        let a = listing(OURS).table_canonical("t");
        let b = listing(&OURS.replace(r#""net-b", "net-a""#, r#""net-c""#)).table_canonical("t");
        let batch: Value = serde_json::from_str(&set_only_update(&a, &b).unwrap()).unwrap();
        assert_eq!(
            batch,
            serde_json::json!({"nftables": [
                {"flush": {"set": {"family": "inet", "table": "t", "name": "b"}}},
                {"add": {"element": {"family": "inet", "table": "t", "name": "b", "elem": ["net-c"]}}}
            ]})
        );
        assert_eq!(set_only_update(&a, &a), None, "nothing to do");
        let c = listing(&OURS.replace("\"net-*\"", "\"br-*\"")).table_canonical("t");
        assert_eq!(set_only_update(&a, &c), None, "a rule changed: whole table");
        let d = listing(&OURS.replace("\"prio\": -1", "\"prio\": 0")).table_canonical("t");
        assert_eq!(
            set_only_update(&a, &d),
            None,
            "a chain changed: whole table"
        );
    }

    #[test]
    fn the_table_comment_is_read_from_the_listing() {
        let text = "table inet t {\n\tcomment \"managed by x\"\n\tchain c {\n";
        assert_eq!(table_comment(text).as_deref(), Some("managed by x"));
        assert_eq!(table_comment("table inet t {\n\tchain c {\n"), None);
    }
}
