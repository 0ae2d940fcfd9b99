//! The apply pipeline, one step per function, in the order the module runs
//! them (a mode such as the firewall VM's router adds its [`ModeRules`]
//! and its own steps around the same sequence):
//!
//! 1. [`verify`]: what the ruleset does, seen in a scratch namespace next to
//!    sentinel tables: only our table, only the renderer's chain shapes for
//!    the mode, and our ownership mark on the table;
//! 2. [`ownership`]: a live table of that name is ours (marked) or absent;
//!    anything else is someone else's table and is never replaced;
//! 3. [`commit`]: under the apply lock, stage the files, replace the live
//!    table in one `nft -f`, confirm it, then rename the files into place;
//!    on any failure the live table and the files are put back to the last
//!    good ruleset, and the error says what is live and on disk.
//!
//! [`remove`] is the way out: our table, its files and nothing else.
//!
//! Host mode manages two tables of the same name: `inet <table>` (between
//! domains) and `bridge <table>` (inside a domain: same-bridge traffic never
//! reaches the inet forward hook without br_netfilter). Every step handles
//! the [`Tables`] of the mode's families together: one guard, one scratch
//! check, one `nft -f` transaction holding both, one confirmation, one
//! rollback; the inet table is never new while the bridge table is old.

use crate::effects::check_effects;
pub use crate::effects::{ModeRules, HOST_MODE, ROUTER_MODE, ROUTING_MODE};
use crate::guard::{check_ruleset_in, INET_ONLY};
use crate::model::TableName;
use crate::render::TABLE_COMMENT;
use crate::runner::fs::{read_owned_file, remove_owned_file, Existing, Staged};
use crate::runner::nft::Nft;
use anyhow::bail;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The biggest ruleset accepted (`src` or `content`). A render of 1000
/// domains and 10,000 policies is a few MB; anything far beyond is not a
/// rendered ruleset and is refused before nft parses it.
pub const MAX_RULESET_BYTES: u64 = 32 * 1024 * 1024;

/// Mode of the files this module writes: the ruleset holds no secret, and
/// operators read it.
const FILE_MODE: u32 = 0o644;

/// Canonical listings of the tables named `table` that one apply manages,
/// by family (`inet`, and `bridge` in host mode); an absent table has no
/// entry, and [`ADOPTED`] stands for a live table to reload with our mark.
pub type Tables = BTreeMap<String, Value>;

/// The stand-in for an adopted (unmarked) live table in [`Tables`]: equal to
/// no listing, so the table is reloaded and marked.
pub const ADOPTED: Value = Value::Null;

/// A ruleset whose effects were verified.
#[derive(Debug)]
pub struct Verified {
    /// What the live `inet` table must read back as once loaded.
    pub want: Value,
    /// What every table the mode manages must read back as (`want` is the
    /// `inet` entry; `bridge` is there when the ruleset has one).
    pub tables: Tables,
    /// The families the mode manages ([`ModeRules::families`]).
    pub families: &'static [&'static str],
    /// The domain bridges and interface wildcards it names, for the boot
    /// fallback.
    pub bridges: BTreeSet<String>,
    pub wildcards: BTreeSet<String>,
}

/// Step 1: loads `desired` in a scratch namespace and checks its effects.
pub fn verify(
    nft: &Nft,
    table: &TableName,
    desired: &str,
    mode: &ModeRules,
) -> anyhow::Result<Verified> {
    let scratch = nft.scratch(desired, table)?;
    check_effects(&scratch.before, &scratch.after, table.as_str(), mode)?;
    let families = mode.families();
    let mut tables = Tables::new();
    for &family in families {
        let comment = match family {
            "inet" => &scratch.comment,
            _ if !scratch.after.has_table(family, table.as_str()) => continue,
            _ => &scratch.bridge_comment,
        };
        if comment.as_deref() != Some(TABLE_COMMENT) {
            bail!(
                "the ruleset does not mark table {family} {table} with `comment \
                 \"{TABLE_COMMENT}\"`: it was not rendered by this version of \
                 incus_nftables_render; re-render it"
            );
        }
        tables.insert(
            family.to_string(),
            scratch.after.family_table_canonical(family, table.as_str()),
        );
    }
    Ok(Verified {
        want: scratch.after.table_canonical(table.as_str()),
        tables,
        families,
        bridges: scratch.after.ifname_elements(table.as_str()),
        wildcards: scratch.after.ifname_wildcards(table.as_str()),
    })
}

/// Whether our table is live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    Absent,
    Ours,
    /// Unmarked, but exactly what `dest` (which only this module writes)
    /// loads: a table applied by a version that did not mark its tables.
    Adopted,
}

/// Step 2: refuses a live table of our name that we did not create. `applied`
/// is the text of `dest`, the file this module last applied, if any.
pub fn ownership(nft: &Nft, table: &TableName, applied: Option<&str>) -> anyhow::Result<Ownership> {
    family_ownership(nft, "inet", table, applied, INET_ONLY)
}

/// [`ownership`] of every table of `families` (refusing on the first that is
/// someone else's), by family.
pub fn ownerships(
    nft: &Nft,
    table: &TableName,
    families: &[&str],
    applied: Option<&str>,
) -> anyhow::Result<BTreeMap<String, Ownership>> {
    families
        .iter()
        .map(|family| {
            family_ownership(nft, family, table, applied, families)
                .map(|owned| (family.to_string(), owned))
        })
        .collect()
}

/// [`ownership`] of `<family> <table>`; `applied` is read as a file of
/// `families`.
pub fn family_ownership(
    nft: &Nft,
    family: &str,
    table: &TableName,
    applied: Option<&str>,
    families: &[&str],
) -> anyhow::Result<Ownership> {
    match nft.family_table_comment(family, table)? {
        None => Ok(Ownership::Absent),
        Some(Some(comment)) if comment == TABLE_COMMENT => Ok(Ownership::Ours),
        Some(_)
            if applied.is_some_and(|text| loads_live_table(nft, family, table, text, families)) =>
        {
            Ok(Ownership::Adopted)
        }
        Some(comment) => bail!(
            "a table {family} {table} already exists and was not created by anklume-isolation \
             (its comment is {}, not \"{TABLE_COMMENT}\", and it is not what the file this \
             module last applied loads): it belongs to someone else and is never replaced or \
             deleted; choose another table name",
            comment.map_or("missing".to_string(), |c| format!("{c:?}"))
        ),
    }
}

/// Whether `text` (touching only our tables) loads exactly the live
/// `<family> <table>`.
fn loads_live_table(
    nft: &Nft,
    family: &str,
    table: &TableName,
    text: &str,
    families: &[&str],
) -> bool {
    if check_ruleset_in(text, table, families).is_err() {
        return false;
    }
    let Ok(scratch) = nft.scratch(text, table) else {
        return false;
    };
    scratch.after.has_table(family, table.as_str())
        && nft.family_table_canonical(family, table).ok().flatten()
            == Some(scratch.after.family_table_canonical(family, table.as_str()))
}

/// The live tables of `families` that the ownership step found ours
/// (adopted ones as [`ADOPTED`]).
pub fn live_tables(
    nft: &Nft,
    table: &TableName,
    owned: &BTreeMap<String, Ownership>,
) -> anyhow::Result<Tables> {
    let mut tables = Tables::new();
    for (family, owned) in owned {
        let live = match owned {
            Ownership::Absent => continue,
            Ownership::Adopted => ADOPTED,
            Ownership::Ours => match nft.family_table_canonical(family, table)? {
                Some(live) => live,
                None => continue,
            },
        };
        tables.insert(family.clone(), live);
    }
    Ok(tables)
}

/// The live tables as they were before a load, by family: each one's text
/// (reloadable, `None` when absent) and canonical form (to tell whether a
/// failed load changed anything).
#[derive(Debug)]
pub struct Snapshot {
    tables: BTreeMap<String, (Option<String>, Option<Value>)>,
}

/// A [`Snapshot`] of `inet <table>`.
pub fn snapshot(nft: &Nft, table: &TableName) -> anyhow::Result<Snapshot> {
    snapshot_in(nft, table, INET_ONLY)
}

/// A [`Snapshot`] of the tables of `families`.
pub fn snapshot_in(nft: &Nft, table: &TableName, families: &[&str]) -> anyhow::Result<Snapshot> {
    let mut tables = BTreeMap::new();
    for family in families {
        tables.insert(
            family.to_string(),
            (
                nft.family_table_text(family, table)?,
                nft.family_table_canonical(family, table)?,
            ),
        );
    }
    Ok(Snapshot { tables })
}

/// Puts the live tables back as the snapshot had them, unless they still
/// are (a load that timed out or failed changed nothing: nft is then not
/// trusted to run again), in one transaction. Returns what it did, for the
/// message.
pub fn restore(nft: &Nft, table: &TableName, snapshot: &Snapshot) -> anyhow::Result<String> {
    let mut batch = String::new();
    let (mut restored, mut removed) = (Vec::new(), Vec::new());
    for (family, (text, canonical)) in &snapshot.tables {
        if nft.family_table_canonical(family, table).ok().as_ref() == Some(canonical) {
            continue;
        }
        // Create-then-delete: the table is gone whatever the load left.
        batch.push_str(&format!(
            "table {family} {table} {{}}\ndelete table {family} {table}\n"
        ));
        match text {
            Some(text) => {
                batch.push_str(text);
                batch.push('\n');
                restored.push(format!("{family} {table}"));
            }
            None => removed.push(format!("{family} {table}")),
        }
    }
    if batch.is_empty() {
        return Ok("the live table was not changed".to_string());
    }
    nft.load(&batch)?;
    // One family (router and routing modes, or a host apply that changed
    // one table): the short messages of a single-table apply.
    let single = snapshot.tables.len() == 1;
    let list = |tables: &[String]| match single {
        true => String::new(),
        false => format!(": {}", tables.join(", ")),
    };
    let mut done = Vec::new();
    if !restored.is_empty() {
        done.push(format!(
            "the previous live table was restored{}",
            list(&restored)
        ));
    }
    if !removed.is_empty() {
        done.push(format!(
            "the new table was removed (there was none before{})",
            list(&removed)
        ));
    }
    Ok(done.join("; "))
}

/// Loads `desired` (which replaces our table atomically, by construction of
/// the rendered header), then checks that the live table is exactly what
/// `desired` produces in a scratch namespace (`want`). On any failure the
/// table is put back as it was before, and the error says so.
pub fn replace_table(
    nft: &Nft,
    table: &TableName,
    desired: &str,
    want: &Value,
) -> anyhow::Result<()> {
    let want = Tables::from([("inet".to_string(), want.clone())]);
    replace_table_with(nft, table, desired, |nft| {
        confirm(nft, table, INET_ONLY, &want)
    })
    .map(drop)
}

/// How the live table becomes the ruleset.
#[derive(Debug, Clone, Copy)]
pub enum Load<'a> {
    /// The whole rendered ruleset (its header replaces our table).
    Table(&'a str),
    /// Only set and map elements changed: an `nft -j` batch that flushes
    /// and refills them in one transaction ([`crate::effects::in_place_update`]).
    Sets(&'a str),
    /// Elements and the non-base chains that maps jump to changed (a policy
    /// edit): one `nft -j` transaction that leaves the base chains in place.
    Chains(&'a str),
}

impl Load<'_> {
    pub fn kind(&self) -> &'static str {
        match self {
            Load::Table(_) => "table",
            Load::Sets(_) => "sets",
            Load::Chains(_) => "chains",
        }
    }
}

/// `replace_table` with the confirmation step given by the caller, so tests
/// can make it fail and watch the rollback. Returns the snapshot taken
/// before the load, for a later step's rollback.
pub fn replace_table_with(
    nft: &Nft,
    table: &TableName,
    desired: &str,
    confirm: impl FnOnce(&Nft) -> anyhow::Result<()>,
) -> anyhow::Result<Snapshot> {
    load_confirmed(nft, table, INET_ONLY, Load::Table(desired), confirm)
}

/// [`replace_table_with`] for the tables of `families` (host mode: inet and
/// bridge), all snapshotted and restored together.
pub fn replace_tables_with(
    nft: &Nft,
    table: &TableName,
    families: &[&str],
    desired: &str,
    confirm: impl FnOnce(&Nft) -> anyhow::Result<()>,
) -> anyhow::Result<Snapshot> {
    load_confirmed(nft, table, families, Load::Table(desired), confirm)
}

/// Loads (the whole table or only its sets), confirms, and on failure puts
/// the snapshot of the tables of `families` back.
pub fn load_confirmed(
    nft: &Nft,
    table: &TableName,
    families: &[&str],
    load: Load,
    confirm: impl FnOnce(&Nft) -> anyhow::Result<()>,
) -> anyhow::Result<Snapshot> {
    let before = snapshot_in(nft, table, families)?;
    let loaded = match load {
        Load::Table(text) => nft.load(text),
        Load::Sets(batch) | Load::Chains(batch) => nft.load_json(batch),
    };
    let result = loaded.and_then(|()| confirm(nft));
    let Err(err) = result else {
        return Ok(before);
    };
    match restore(nft, table, &before) {
        Ok(done) => bail!("{err:#}; {done} (table inet {table} is the last good ruleset)"),
        Err(restore_err) => {
            bail!(
                "{err:#}; restoring the previous table inet {table} ALSO failed: \
                 {restore_err:#}; the live table may be the new ruleset: run the apply again"
            )
        }
    }
}

/// Checks that every table of `families` is live exactly as `want` has it,
/// marked, and absent when `want` has no entry for it.
fn confirm(nft: &Nft, table: &TableName, families: &[&str], want: &Tables) -> anyhow::Result<()> {
    for family in families {
        let live = nft.family_table_canonical(family, table)?;
        let Some(want) = want.get(*family) else {
            if live.is_some() {
                bail!(
                    "after loading, table {family} {table} is still live, but the ruleset has \
                     none"
                );
            }
            continue;
        };
        if nft
            .family_table_comment(family, table)?
            .flatten()
            .as_deref()
            != Some(TABLE_COMMENT)
        {
            bail!(
                "after loading, table {family} {table} does not carry the mark \
                 \"{TABLE_COMMENT}\""
            );
        }
        match live {
            Some(live) if &live == want => {}
            Some(_) => {
                bail!("after loading, the live table {family} {table} differs from the ruleset")
            }
            None => bail!("after loading, table {family} {table} is not in the kernel"),
        }
    }
    Ok(())
}

/// The ruleset file and the one it replaces.
#[derive(Debug)]
pub struct Files {
    pub dest: PathBuf,
    /// What `dest` holds now.
    pub current: Existing,
}

impl Files {
    pub fn read(dest: &Path) -> anyhow::Result<Files> {
        Ok(Files {
            dest: dest.to_path_buf(),
            current: read_owned_file(dest)?,
        })
    }

    pub fn previous_path(&self) -> PathBuf {
        previous_path(&self.dest)
    }

    pub fn holds(&self, desired: &str) -> bool {
        self.current == Existing::Text(desired.to_string())
    }
}

/// Where the file being replaced is kept: `<dest>.previous`.
pub fn previous_path(dest: &Path) -> PathBuf {
    let mut name = dest.as_os_str().to_owned();
    name.push(".previous");
    PathBuf::from(name)
}

/// Step 3: makes `desired` live (by `load`, when the live tables differ) and
/// the content of `files.dest` (keeping the old one as `.previous`), or
/// neither. Files are staged first (a full or read-only directory fails
/// before anything changes), the tables are loaded and confirmed (all of
/// `verified.families`: a table the ruleset lacks must be gone), then the
/// files are renamed into place; a failed rename rolls the live tables back.
pub fn commit(
    nft: &Nft,
    table: &TableName,
    desired: &str,
    verified: &Verified,
    load: Option<Load>,
    files: &Files,
) -> anyhow::Result<()> {
    let families = verified.families;
    let dest = files.dest.display();
    let file_changed = !files.holds(desired);
    let nothing = format!(
        "nothing was changed: the live table inet {table} and {dest} are the last good ruleset"
    );
    let stage = || -> anyhow::Result<_> {
        if !file_changed {
            return Ok(None);
        }
        let old = match &files.current {
            Existing::Missing => None,
            Existing::Text(text) => Some(text.as_bytes()),
            Existing::Unreadable(bytes) => Some(bytes.as_slice()),
        };
        let previous = old
            .map(|old| Staged::new(&files.previous_path(), old, FILE_MODE))
            .transpose()?;
        let new = Staged::new(&files.dest, desired.as_bytes(), FILE_MODE)?;
        Ok(Some((previous, new)))
    };
    let staged = stage().map_err(|err| anyhow::anyhow!("{err:#}; {nothing}"))?;
    let before = match load {
        Some(load) => Some(
            load_confirmed(nft, table, families, load, |nft| {
                confirm(nft, table, families, &verified.tables)
            })
            .map_err(|err| anyhow::anyhow!("{err:#}; {dest} was not changed"))?,
        ),
        None => None,
    };
    let Some((previous, new)) = staged else {
        return Ok(());
    };
    // The old `.previous`, to put back if the new file cannot be renamed.
    let old_previous = read_owned_file(&files.previous_path()).ok();
    let renamed = previous
        .map(Staged::commit)
        .transpose()
        .and_then(|_| new.commit());
    let Err(err) = renamed else {
        return Ok(());
    };
    let files_back = match old_previous {
        Some(Existing::Text(text)) => {
            Staged::new(&files.previous_path(), text.as_bytes(), FILE_MODE).and_then(Staged::commit)
        }
        Some(Existing::Unreadable(bytes)) => {
            Staged::new(&files.previous_path(), &bytes, FILE_MODE).and_then(Staged::commit)
        }
        Some(Existing::Missing) => remove_owned_file(&files.previous_path()).map(drop),
        None => Ok(()),
    };
    let live_back = match &before {
        Some(snapshot) => restore(nft, table, snapshot),
        None => Ok("the live table was not changed".to_string()),
    };
    match (live_back, files_back) {
        (Ok(done), Ok(())) => bail!(
            "{err:#}; {done}: the live table inet {table} and {dest} are the last good ruleset \
             (the new one is not applied)"
        ),
        (live, files) => bail!(
            "{err:#}; rolling back ALSO failed ({}{}): the live table inet {table} may be the \
             new ruleset while {dest} holds the old one; fix the file system and run again",
            live.err()
                .map(|e| format!("live table: {e:#}"))
                .unwrap_or_default(),
            files
                .err()
                .map(|e| format!(" .previous: {e:#}"))
                .unwrap_or_default(),
        ),
    }
}

/// What `state: absent` removes.
#[derive(Debug, Default)]
pub struct Removed {
    /// Whether `inet <table>` was (or, in check mode, would be) deleted.
    pub table: bool,
    /// The families whose table was deleted (`inet`, `bridge`).
    pub families: Vec<String>,
    pub files: Vec<PathBuf>,
}

/// The way out: deletes our tables of `families` (only those that carry
/// our mark, or are adopted) in one transaction, and `dest` and
/// `<dest>.previous`. Nothing else is touched; someone else's table of our
/// name fails before anything is removed. In check mode, reports what
/// would go.
pub fn remove(
    nft: &Nft,
    table: &TableName,
    families: &[&str],
    dest: &Path,
    check_mode: bool,
) -> anyhow::Result<Removed> {
    let applied = match read_owned_file(dest)? {
        Existing::Text(text) => Some(text),
        _ => None,
    };
    let owned = ownerships(nft, table, families, applied.as_deref())?;
    let gone: Vec<String> = owned
        .into_iter()
        .filter(|(_, owned)| *owned != Ownership::Absent)
        .map(|(family, _)| family)
        .collect();
    let mut removed = Removed {
        table: gone.iter().any(|family| family == "inet"),
        families: gone,
        files: Vec::new(),
    };
    if !removed.families.is_empty() && !check_mode {
        let batch: String = removed
            .families
            .iter()
            .map(|family| format!("delete table {family} {table}\n"))
            .collect();
        nft.load(&batch)?;
    }
    for path in [dest.to_path_buf(), previous_path(dest)] {
        let exists = path.symlink_metadata().is_ok();
        if exists && (check_mode || remove_owned_file(&path)?) {
            removed.files.push(path);
        }
    }
    Ok(removed)
}

/// Step 4, after a live change: deletes the conntrack entries of connections
/// that the old table admitted and the new one does not (see
/// [`crate::revoke`]). Returns how many were cut. Only the `inet` table is
/// read: the `bridge` table is stateless (no conntrack in that family
/// here), so a frame it now drops is dropped at once, established flow or
/// not, and there is nothing to cut.
pub fn cut_revoked(
    table: &TableName,
    old: &Value,
    new: &Value,
    conntrack: &crate::runner::conntrack::Conntrack,
    interfaces: &crate::revoke::Interfaces,
) -> anyhow::Result<usize> {
    use crate::revoke::{revoked, Admission};
    let (old, new) = (
        Admission::of(old, table.as_str())?,
        Admission::of(new, table.as_str())?,
    );
    let flows = conntrack.flows()?;
    let cut = revoked(&old, &new, &flows, interfaces);
    for flow in &cut {
        conntrack.delete(flow)?;
    }
    Ok(cut.len())
}
