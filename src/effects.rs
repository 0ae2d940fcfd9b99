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
use serde_json::{json, Value};
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
    /// The companion `bridge <table>` this mode also manages (host mode:
    /// isolation inside a domain), with what it may hold; `None`: the mode
    /// manages its `inet` table alone.
    pub bridge: Option<&'static BridgeRules>,
}

/// What our `bridge` family table may hold. Its base chain sees every
/// frame every bridge of the host forwards (incusbr0, Docker's, the
/// uplink's), and this kernel has no conntrack there: so a base chain is a
/// filter chain on `forward` with policy accept only (a drop policy, or a
/// chain on prerouting/input/output/postrouting, would cut every bridge and
/// the host's own bridged traffic), and rules only match what the renderer
/// matches (addresses, protocols, ports, flags, set lookups), never `ct` or
/// `meta ibrname` state that the family does not have here.
#[derive(Debug, Clone, Copy)]
pub struct BridgeRules {
    /// (chain type, hook) of every base chain.
    pub base_chains: &'static [(&'static str, &'static str)],
    /// The policies a base chain may have.
    pub policies: &'static [&'static str],
    /// Object kinds the table may hold.
    pub object_kinds: &'static [&'static str],
    /// The `nft -j` statement kinds of its rules.
    pub statements: &'static [&'static str],
    /// Protocols of the packet fields a match may read (`payload`).
    pub payload_protocols: &'static [&'static str],
    /// `meta` keys a match may read.
    pub meta_keys: &'static [&'static str],
}

/// The bridge table of host mode.
pub const HOST_BRIDGE: BridgeRules = BridgeRules {
    base_chains: &[("filter", "forward")],
    policies: &["accept"],
    object_kinds: &["table", "chain", "rule", "set", "limit", "counter"],
    statements: &[
        "match", "accept", "drop", "jump", "goto", "return", "counter", "limit", "log",
    ],
    payload_protocols: &[
        "ether", "arp", "ip", "ip6", "th", "tcp", "udp", "icmp", "icmpv6",
    ],
    meta_keys: &["l4proto"],
};

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
    bridge: Some(&HOST_BRIDGE),
};

/// The firewall instance's router table (vm mode): the same chain shapes as
/// the host, with policy drop; its forward chain must drop.
pub const ROUTER_MODE: ModeRules = ModeRules {
    name: "router",
    base_chains: HOST_MODE.base_chains,
    statements: HOST_MODE.statements,
    required_drop_hook: Some("forward"),
    bridge: None,
};

/// The host's steering table of vm mode (`firewall_vm_routing`): it marks
/// and untracks domain-to-domain packets before conntrack (prerouting at
/// raw priority) and drops the host's redirects on output. Nothing else.
pub const ROUTING_MODE: ModeRules = ModeRules {
    name: "vm routing",
    base_chains: &[("filter", "prerouting"), ("filter", "output")],
    statements: &["match", "accept", "drop", "mangle", "notrack"],
    required_drop_hook: None,
    bridge: None,
};

impl ModeRules {
    /// The families of the tables named `table` this mode manages: `inet`,
    /// and `bridge` when the mode has one.
    pub fn families(&self) -> &'static [&'static str] {
        match self.bridge {
            Some(_) => crate::guard::HOST_FAMILIES,
            None => crate::guard::INET_ONLY,
        }
    }
}

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
        self.of_family_table("inet", table)
    }

    /// The objects of `<family> <table>`.
    fn of_family_table<'a>(
        &'a self,
        family: &'a str,
        table: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a Object)> {
        self.objects()
            .filter(move |(kind, o)| is_in(kind, o, family, table))
    }

    /// Whether `<family> <table>` is in the listing.
    pub fn has_table(&self, family: &str, table: &str) -> bool {
        self.of_family_table(family, table)
            .any(|(kind, _)| kind == "table")
    }

    /// Everything that is not one of our tables (`families`), handles
    /// removed, in listing order.
    fn foreign(&self, table: &str, families: &[&str]) -> Vec<(String, Object)> {
        self.objects()
            .filter(|(kind, o)| !families.iter().any(|f| is_in(kind, o, f, table)))
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
        self.family_table_canonical("inet", table)
    }

    /// [`Listing::table_canonical`] of `<family> <table>`.
    pub fn family_table_canonical(&self, family: &str, table: &str) -> Value {
        let entries: Vec<Value> = self
            .nftables
            .iter()
            .flat_map(|entry| entry.0.iter())
            .filter(|(kind, o)| kind.as_str() != "metainfo" && is_in(kind, o, family, table))
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

fn is_in(kind: &str, o: &Object, family: &str, table: &str) -> bool {
    let name = if kind == "table" {
        o.name.as_deref()
    } else {
        o.table.as_deref()
    };
    o.family.as_deref() == Some(family) && name == Some(table)
}

/// Checks the scratch namespace's listing `after` loading our ruleset
/// against `before` (the sentinel tables alone).
pub fn check_effects(
    before: &Listing,
    after: &Listing,
    table: &str,
    mode: &ModeRules,
) -> anyhow::Result<()> {
    let families = mode.families();
    if before.foreign(table, families) != after.foreign(table, families) {
        bail!(
            "loading the ruleset changed tables other than {} in a scratch namespace: refused",
            families
                .iter()
                .map(|family| format!("{family} {table}"))
                .collect::<Vec<_>>()
                .join(" and ")
        );
    }
    if let Some(rules) = mode.bridge {
        check_bridge_table(after, table, rules)?;
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

/// Checks `bridge <table>` in the scratch listing, if the ruleset has one
/// (older files do not): only the shapes of [`BridgeRules`].
fn check_bridge_table(after: &Listing, table: &str, rules: &BridgeRules) -> anyhow::Result<()> {
    for (kind, o) in after.of_family_table("bridge", table) {
        let name = o.name.as_deref().unwrap_or("?");
        if !rules.object_kinds.contains(&kind) {
            bail!(
                "table bridge {table} would hold a `{kind}` object ({name}), which this module \
                 never loads there; refused"
            );
        }
        if kind == "chain" {
            if let Some(hook) = &o.hook {
                let chain_type = o.kind.as_ref().and_then(Value::as_str).unwrap_or("?");
                let policy = o
                    .rest
                    .get("policy")
                    .and_then(Value::as_str)
                    .unwrap_or("accept");
                if o.dev.is_some()
                    || !rules.base_chains.contains(&(chain_type, hook.as_str()))
                    || !rules.policies.contains(&policy)
                {
                    bail!(
                        "chain {name} of table bridge {table} is a `{chain_type}` chain on hook \
                         `{hook}` with policy {policy}: a bridge-family base chain sees every \
                         frame of every bridge on the host (incusbr0 too), so it may only be a \
                         {} with policy {}; refused",
                        rules
                            .base_chains
                            .iter()
                            .map(|(t, h)| format!("`{t}` chain on hook `{h}`"))
                            .collect::<Vec<_>>()
                            .join(" or "),
                        rules.policies.join(" or ")
                    );
                }
            }
        }
        if kind == "rule" {
            let chain = o.chain.as_deref().unwrap_or("?");
            for stmt in &o.expr {
                for (statement, value) in stmt {
                    if !rules.statements.contains(&statement.as_str()) {
                        bail!(
                            "a rule of chain {chain} of table bridge {table} uses the \
                             `{statement}` statement, which the bridge table never uses; refused"
                        );
                    }
                    if statement == "match" {
                        if let Some(left) = value.get("left") {
                            check_bridge_operand(left, rules).map_err(|what| {
                                anyhow::anyhow!(
                                    "a rule of chain {chain} of table bridge {table} matches \
                                     {what}, which the bridge table never reads (no conntrack \
                                     or bridge metadata there); refused"
                                )
                            })?;
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// Whether the left side of a match reads only packet fields and `meta`
/// keys of `rules` (through concatenations and bit masks, as `tcp flags`
/// lists); the refused operand, printed, otherwise.
fn check_bridge_operand(operand: &Value, rules: &BridgeRules) -> Result<(), String> {
    let Some((key, inner)) = operand.as_object().and_then(|o| o.iter().next()) else {
        return Err(operand.to_string());
    };
    let ok = match key.as_str() {
        "payload" => inner
            .get("protocol")
            .and_then(Value::as_str)
            .is_some_and(|p| rules.payload_protocols.contains(&p)),
        "meta" => inner
            .get("key")
            .and_then(Value::as_str)
            .is_some_and(|k| rules.meta_keys.contains(&k)),
        "concat" => {
            for part in inner.as_array().into_iter().flatten() {
                check_bridge_operand(part, rules)?;
            }
            inner.is_array()
        }
        // `tcp flags & (syn | ack)`: [field, mask]; the mask is a constant.
        "&" | "|" => match inner.as_array().map(Vec::as_slice) {
            Some([field, _mask]) => return check_bridge_operand(field, rules),
            _ => false,
        },
        _ => false,
    };
    ok.then_some(()).ok_or_else(|| operand.to_string())
}

/// How a live table becomes the wanted one without replacing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InPlace {
    /// The `nft -j -f` batch, applied in one transaction.
    pub batch: String,
    /// Whether non-base chains are added, refilled or removed (a policy
    /// edit in the pair-chain layout), or only set and map elements change.
    pub chains: bool,
}

/// When the live table and the wanted one have the same table, base chains
/// (with their rules), sets and maps (definitions), and differ only in set
/// and map elements and in the non-base chains the maps jump to, the
/// `nft -j -f` batch that changes just those, in one transaction: new
/// chains and their rules first, then changed chains flushed and refilled,
/// then each changed set or map flushed and refilled (so a verdict map only
/// ever points at chains that exist), then the chains nothing points at any
/// more deleted. No base chain is recreated, so no packet meets a
/// half-built table (a whole-table swap dropped 6 of 40,051 packets of an
/// allowed flow over 400 swaps; element updates dropped none). `None` when
/// anything else differs (or nothing does): then the whole table is
/// replaced.
pub fn in_place_update(live: &Value, want: &Value) -> Option<InPlace> {
    let (live, want) = (Parts::of(live)?, Parts::of(want)?);
    if live.fixed != want.fixed || live.base_chains != want.base_chains {
        return None;
    }
    let (live_sets, want_sets) = (&live.sets, &want.sets);
    if live_sets.keys().ne(want_sets.keys()) {
        return None;
    }
    let mut added_chains = Vec::new();
    let mut refilled = Vec::new();
    let mut sets = Vec::new();
    let mut deleted = Vec::new();
    for (name, (chain, rules)) in &want.chains {
        match live.chains.get(name) {
            None => {
                added_chains.push(json!({ "add": { "chain": chain } }));
                added_chains.extend(rules.iter().map(|r| json!({ "add": { "rule": r } })));
            }
            Some((live_chain, _)) if live_chain != chain => return None,
            Some((_, live_rules)) if live_rules != rules => {
                refilled.push(json!({ "flush": { "chain": chain } }));
                refilled.extend(rules.iter().map(|r| json!({ "add": { "rule": r } })));
            }
            Some(_) => {}
        }
    }
    for (name, (chain, _)) in &live.chains {
        if !want.chains.contains_key(name) {
            deleted.push(json!({ "delete": { "chain": chain } }));
        }
    }
    for ((kind, _), set) in want_sets {
        let live_set = &live_sets[&(kind.clone(), set["name"].to_string())];
        let without_elements = |o: &Value| {
            let mut o = o.clone();
            if let Some(o) = o.as_object_mut() {
                o.remove("elem");
            }
            o
        };
        if without_elements(live_set) != without_elements(set) {
            return None;
        }
        if live_set.get("elem") == set.get("elem") {
            continue;
        }
        let id = json!({ "family": set["family"], "table": set["table"], "name": set["name"] });
        sets.push(json!({ "flush": { kind.as_str(): id } }));
        if let Some(elem) = set.get("elem") {
            let mut element = id.clone();
            element["elem"] = elem.clone();
            sets.push(json!({ "add": { "element": element } }));
        }
    }
    let chains = !(added_chains.is_empty() && refilled.is_empty() && deleted.is_empty());
    let batch: Vec<Value> = [added_chains, refilled, sets, deleted].concat();
    (!batch.is_empty()).then(|| InPlace {
        batch: json!({ "nftables": batch }).to_string(),
        chains,
    })
}

/// [`in_place_update`] of every table one apply manages (by family: the
/// inet table and, in host mode, the bridge table), in one batch and so one
/// transaction. `None` when a table appears or disappears, when any table
/// that differs cannot be updated in place, or when nothing differs: then
/// the whole file is loaded (both tables, one transaction).
pub fn in_place_tables(
    live: &BTreeMap<String, Value>,
    want: &BTreeMap<String, Value>,
) -> Option<InPlace> {
    if live.keys().ne(want.keys()) {
        return None;
    }
    let mut ops = Vec::new();
    let mut chains = false;
    for (family, want) in want {
        if &live[family] == want {
            continue;
        }
        let update = in_place_update(&live[family], want)?;
        chains |= update.chains;
        let batch: Value = serde_json::from_str(&update.batch).ok()?;
        ops.extend(batch.get("nftables")?.as_array()?.iter().cloned());
    }
    (!ops.is_empty()).then(|| InPlace {
        batch: json!({ "nftables": ops }).to_string(),
        chains,
    })
}

/// A canonical table listing split the way [`in_place_update`] compares it.
struct Parts {
    /// The table itself and every object that is not a set, map, chain or
    /// rule (limits, counters), in listing order.
    fixed: Vec<Value>,
    /// Base chains and their rules, in order.
    base_chains: BTreeMap<String, (Value, Vec<Value>)>,
    /// Regular chains and their rules, in order.
    chains: BTreeMap<String, (Value, Vec<Value>)>,
    /// (kind, name) -> set or map.
    sets: BTreeMap<(String, String), Value>,
}

impl Parts {
    fn of(listing: &Value) -> Option<Parts> {
        let mut parts = Parts {
            fixed: Vec::new(),
            base_chains: BTreeMap::new(),
            chains: BTreeMap::new(),
            sets: BTreeMap::new(),
        };
        let mut rules: Vec<Value> = Vec::new();
        for entry in listing.get("nftables")?.as_array()? {
            let (kind, object) = entry.as_object()?.iter().next()?;
            match kind.as_str() {
                "metainfo" => {}
                "set" | "map" => {
                    parts.sets.insert(
                        (kind.clone(), object.get("name")?.to_string()),
                        object.clone(),
                    );
                }
                "chain" => {
                    let name = object.get("name")?.as_str()?.to_string();
                    let into = match object.get("hook") {
                        Some(_) => &mut parts.base_chains,
                        None => &mut parts.chains,
                    };
                    into.insert(name, (object.clone(), Vec::new()));
                }
                "rule" => rules.push(object.clone()),
                _ => parts.fixed.push(entry.clone()),
            }
        }
        for rule in rules {
            let chain = rule.get("chain")?.as_str()?.to_string();
            let (_, list) = match parts.base_chains.get_mut(&chain) {
                Some(found) => found,
                None => parts.chains.get_mut(&chain)?,
            };
            list.push(rule);
        }
        Some(parts)
    }
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
        let update = in_place_update(&a, &b).unwrap();
        assert!(!update.chains);
        let batch: Value = serde_json::from_str(&update.batch).unwrap();
        assert_eq!(
            batch,
            serde_json::json!({"nftables": [
                {"flush": {"set": {"family": "inet", "table": "t", "name": "b"}}},
                {"add": {"element": {"family": "inet", "table": "t", "name": "b", "elem": ["net-c"]}}}
            ]})
        );
        assert_eq!(in_place_update(&a, &a), None, "nothing to do");
        let c = listing(&OURS.replace("\"net-*\"", "\"br-*\"")).table_canonical("t");
        assert_eq!(
            in_place_update(&a, &c),
            None,
            "a base chain's rule changed: whole table"
        );
        let d = listing(&OURS.replace("\"prio\": -1", "\"prio\": 0")).table_canonical("t");
        assert_eq!(
            in_place_update(&a, &d),
            None,
            "a chain changed: whole table"
        );
    }

    /// A regular chain (a pair chain) and its rule, as in the pair-chain
    /// layout: `{port}` is the port its one rule accepts.
    fn pair_chain(name: &str, port: u16) -> String {
        format!(
            r#", {{"chain": {{"family": "inet", "table": "t", "name": "{name}", "handle": 7}}}},
            {{"rule": {{"family": "inet", "table": "t", "chain": "{name}", "handle": 8, "expr": [{{"match": {{"op": "==", "left": {{"payload": {{"protocol": "th", "field": "dport"}}}}, "right": {port}}}}}, {{"accept": null}}]}}}}"#
        )
    }

    #[test]
    fn regular_chain_changes_stay_in_place_and_keep_the_base_chains() {
        let a = listing(&format!("{OURS}{}", pair_chain("p1", 22))).table_canonical("t");
        // A rule of a regular chain changed: flushed and refilled.
        let b = listing(&format!("{OURS}{}", pair_chain("p1", 443))).table_canonical("t");
        let update = in_place_update(&a, &b).unwrap();
        assert!(update.chains);
        let batch: Value = serde_json::from_str(&update.batch).unwrap();
        let ops: Vec<String> = batch["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .map(|op| {
                let (verb, obj) = op.as_object().unwrap().iter().next().unwrap();
                let (kind, _) = obj.as_object().unwrap().iter().next().unwrap();
                format!("{verb} {kind}")
            })
            .collect();
        assert_eq!(ops, ["flush chain", "add rule"]);
        // One chain replaced by another: added (with its rule) first, the
        // old one deleted last.
        let c = listing(&format!("{OURS}{}", pair_chain("p2", 22))).table_canonical("t");
        let batch: Value = serde_json::from_str(&in_place_update(&a, &c).unwrap().batch).unwrap();
        let ops = batch["nftables"].as_array().unwrap();
        assert_eq!(ops.first().unwrap()["add"]["chain"]["name"], "p2");
        assert_eq!(ops.last().unwrap()["delete"]["chain"]["name"], "p1");
    }

    const BRIDGE: &str = r#", {"table": {"family": "bridge", "name": "t", "handle": 3}},
        {"set": {"family": "bridge", "table": "t", "name": "macs", "handle": 1, "type": "ether_addr", "elem": ["00:11:22:33:44:55"]}},
        {"chain": {"family": "bridge", "table": "t", "name": "isolation", "handle": 2, "type": "filter", "hook": "forward", "prio": -1, "policy": "accept"}},
        {"chain": {"family": "bridge", "table": "t", "name": "sub", "handle": 3}},
        {"rule": {"family": "bridge", "table": "t", "chain": "isolation", "handle": 4, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ether", "field": "type"}}, "right": "arp"}}, {"accept": null}]}},
        {"rule": {"family": "bridge", "table": "t", "chain": "isolation", "handle": 5, "expr": [{"match": {"op": "==", "left": {"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, ["syn", "ack"]]}, "right": "syn"}}, {"match": {"op": "==", "left": {"concat": [{"payload": {"protocol": "ip", "field": "saddr"}}, {"meta": {"key": "l4proto"}}]}, "right": "@pairs"}}, {"counter": {"packets": 3, "bytes": 9}}, {"jump": {"target": "sub"}}]}},
        {"rule": {"family": "bridge", "table": "t", "chain": "isolation", "handle": 6, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ether", "field": "saddr"}}, "right": "@macs"}}, {"drop": null}]}}"#;

    #[test]
    fn a_bridge_table_of_the_renderers_shapes_passes_in_host_mode_only() {
        let before = listing(SENTINEL);
        let after = listing(&format!("{SENTINEL}{OURS}{BRIDGE}"));
        check_effects(&before, &after, "t", &HOST_MODE).unwrap();
        assert!(after.has_table("bridge", "t") && !after.has_table("bridge", "incus"));
        // The router mode manages its inet table alone: a bridge table of
        // the same name is a foreign change there.
        let err = check_effects(&before, &after, "t", &ROUTER_MODE).unwrap_err();
        assert!(err.to_string().contains("other than inet t"), "{err}");
        // The bridge table has its own canonical form, next to the inet one.
        assert_ne!(
            after.family_table_canonical("bridge", "t"),
            after.table_canonical("t")
        );
    }

    #[test]
    fn bridge_chains_that_would_cut_every_bridge_or_read_state_are_refused() {
        let before = listing(SENTINEL);
        let refused = [
            (
                r#""policy": "accept""#,
                r#""policy": "drop""#,
                "policy drop",
            ),
            (r#""hook": "forward""#, r#""hook": "input""#, "hook `input`"),
            (
                r#""hook": "forward""#,
                r#""hook": "prerouting""#,
                "hook `prerouting`",
            ),
            (
                r#""hook": "forward""#,
                r#""hook": "postrouting""#,
                "hook `postrouting`",
            ),
            (
                r#""type": "filter", "hook""#,
                r#""type": "nat", "hook""#,
                "`nat` chain",
            ),
            (
                r#"{"payload": {"protocol": "ether", "field": "type"}}"#,
                r#"{"ct": {"key": "state"}}"#,
                "matches {\"ct\"",
            ),
            (
                r#"{"meta": {"key": "l4proto"}}"#,
                r#"{"meta": {"key": "ibrname"}}"#,
                "ibrname",
            ),
            (
                r#"{"payload": {"protocol": "tcp", "field": "flags"}}"#,
                r#"{"payload": {"protocol": "vlan", "field": "id"}}"#,
                "vlan",
            ),
            (r#"{"drop": null}"#, r#"{"reject": null}"#, "`reject`"),
            (r#"{"drop": null}"#, r#"{"vmap": {}}"#, "`vmap`"),
            (
                r#""set": {"family": "bridge""#,
                r#""map": {"family": "bridge""#,
                "`map`",
            ),
        ];
        for (from, to, expected) in refused {
            assert!(BRIDGE.contains(from), "{from}");
            let bridge = BRIDGE.replacen(from, to, 1);
            let after = listing(&format!("{SENTINEL}{OURS}{bridge}"));
            let err = check_effects(&before, &after, "t", &HOST_MODE)
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{to}: {err}");
            assert!(err.contains("refused"), "{to}: {err}");
        }
    }

    #[test]
    fn both_tables_update_in_place_in_one_batch_or_neither_does() {
        let tables = |ours: &str, bridge: &str| {
            let l = listing(&format!("{ours}{bridge}"));
            BTreeMap::from([
                (
                    "bridge".to_string(),
                    l.family_table_canonical("bridge", "t"),
                ),
                ("inet".to_string(), l.table_canonical("t")),
            ])
        };
        let a = tables(OURS, BRIDGE);
        assert_eq!(in_place_tables(&a, &a), None);
        // Elements of both tables: one batch touching both families.
        let more_macs = BRIDGE.replace(
            r#""elem": ["00:11:22:33:44:55"]"#,
            r#""elem": ["00:11:22:33:44:66"]"#,
        );
        let b = tables(
            &OURS.replace(r#""net-b", "net-a""#, r#""net-c""#),
            &more_macs,
        );
        let update = in_place_tables(&a, &b).unwrap();
        assert!(!update.chains);
        assert!(
            update.batch.contains(r#""family":"bridge""#),
            "{}",
            update.batch
        );
        assert!(
            update.batch.contains(r#""family":"inet""#),
            "{}",
            update.batch
        );
        // Only the bridge table's elements: a batch for it alone.
        let c = tables(OURS, &more_macs);
        let update = in_place_tables(&a, &c).unwrap();
        assert!(
            !update.batch.contains(r#""family":"inet""#),
            "{}",
            update.batch
        );
        // A bridge base chain changed: the whole file, even with inet
        // elements that could go in place.
        let d = tables(
            &OURS.replace(r#""net-b", "net-a""#, r#""net-c""#),
            &BRIDGE.replace(r#""right": "arp""#, r#""right": "ip""#),
        );
        assert_eq!(in_place_tables(&a, &d), None);
        // A table that appears or goes: the whole file.
        let mut e = a.clone();
        e.remove("bridge");
        assert_eq!(in_place_tables(&a, &e), None);
        assert_eq!(in_place_tables(&e, &a), None);
    }

    #[test]
    fn counters_figures_do_not_count_in_the_canonical_form() {
        let a = listing(&format!("{OURS}{BRIDGE}")).family_table_canonical("bridge", "t");
        let b = listing(&format!(
            "{OURS}{}",
            BRIDGE.replace("\"packets\": 3", "\"packets\": 7")
        ))
        .family_table_canonical("bridge", "t");
        assert_eq!(a, b);
        let c = listing(&format!(
            "{OURS}{}",
            BRIDGE.replace("\"drop\": null", "\"accept\": null")
        ))
        .family_table_canonical("bridge", "t");
        assert_ne!(a, c);
    }

    #[test]
    fn the_table_comment_is_read_from_the_listing() {
        let text = "table inet t {\n\tcomment \"managed by x\"\n\tchain c {\n";
        assert_eq!(table_comment(text).as_deref(), Some("managed by x"));
        assert_eq!(table_comment("table inet t {\n\tchain c {\n"), None);
    }
}
