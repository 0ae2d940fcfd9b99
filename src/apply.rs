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

use crate::effects::check_effects;
pub use crate::effects::{ModeRules, HOST_MODE, ROUTER_MODE, ROUTING_MODE};
use crate::guard::check_ruleset;
use crate::model::TableName;
use crate::render::TABLE_COMMENT;
use crate::runner::fs::{read_owned_file, remove_owned_file, Existing, Staged};
use crate::runner::nft::Nft;
use anyhow::bail;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The biggest ruleset accepted (`src` or `content`). A render of 1000
/// domains and 10,000 policies is a few MB; anything far beyond is not a
/// rendered ruleset and is refused before nft parses it.
pub const MAX_RULESET_BYTES: u64 = 32 * 1024 * 1024;

/// Mode of the files this module writes: the ruleset holds no secret, and
/// operators read it.
const FILE_MODE: u32 = 0o644;

/// A ruleset whose effects were verified.
#[derive(Debug)]
pub struct Verified {
    /// What the live table must read back as once loaded.
    pub want: Value,
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
    if scratch.comment.as_deref() != Some(TABLE_COMMENT) {
        bail!(
            "the ruleset does not mark table inet {table} with `comment \"{TABLE_COMMENT}\"`: \
             it was not rendered by this version of incus_nftables_render; re-render it"
        );
    }
    Ok(Verified {
        want: scratch.after.table_canonical(table.as_str()),
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
    match nft.table_comment(table)? {
        None => Ok(Ownership::Absent),
        Some(Some(comment)) if comment == TABLE_COMMENT => Ok(Ownership::Ours),
        Some(_) if applied.is_some_and(|text| loads_live_table(nft, table, text)) => {
            Ok(Ownership::Adopted)
        }
        Some(comment) => bail!(
            "a table inet {table} already exists and was not created by anklume-isolation \
             (its comment is {}, not \"{TABLE_COMMENT}\", and it is not what the file this \
             module last applied loads): it belongs to someone else and is never replaced or \
             deleted; choose another table name",
            comment.map_or("missing".to_string(), |c| format!("{c:?}"))
        ),
    }
}

/// Whether `text` (touching only our table) loads exactly the live table.
fn loads_live_table(nft: &Nft, table: &TableName, text: &str) -> bool {
    if check_ruleset(text, table).is_err() {
        return false;
    }
    let Ok(scratch) = nft.scratch(text, table) else {
        return false;
    };
    nft.table_canonical(table).ok().flatten() == Some(scratch.after.table_canonical(table.as_str()))
}

/// The live table as it was before a load: its text (reloadable) and its
/// canonical form (to tell whether a failed load changed anything).
#[derive(Debug)]
pub struct Snapshot {
    text: Option<String>,
    canonical: Option<Value>,
}

pub fn snapshot(nft: &Nft, table: &TableName) -> anyhow::Result<Snapshot> {
    Ok(Snapshot {
        text: nft.table_text(table)?,
        canonical: nft.table_canonical(table)?,
    })
}

/// Puts the live table back as the snapshot had it, unless it still is
/// (a load that timed out or failed changed nothing: nft is then not
/// trusted to run again). Returns what it did, for the message.
pub fn restore(nft: &Nft, table: &TableName, snapshot: &Snapshot) -> anyhow::Result<&'static str> {
    if nft.table_canonical(table).ok().as_ref() == Some(&snapshot.canonical) {
        return Ok("the live table was not changed");
    }
    match &snapshot.text {
        Some(text) => nft.load(&format!(
            "table inet {table} {{}}\ndelete table inet {table}\n{text}"
        ))?,
        None => nft.load(&format!("delete table inet {table}\n"))?,
    }
    Ok(if snapshot.text.is_some() {
        "the previous live table was restored"
    } else {
        "the new table was removed (there was none before)"
    })
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
    replace_table_with(nft, table, desired, |nft| confirm(nft, table, want)).map(drop)
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
    load_confirmed(nft, table, Load::Table(desired), confirm)
}

/// Loads (the whole table or only its sets), confirms, and on failure puts
/// the snapshot back.
pub fn load_confirmed(
    nft: &Nft,
    table: &TableName,
    load: Load,
    confirm: impl FnOnce(&Nft) -> anyhow::Result<()>,
) -> anyhow::Result<Snapshot> {
    let before = snapshot(nft, table)?;
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

fn confirm(nft: &Nft, table: &TableName, want: &Value) -> anyhow::Result<()> {
    if nft.table_comment(table)?.flatten().as_deref() != Some(TABLE_COMMENT) {
        bail!("after loading, table inet {table} does not carry the mark \"{TABLE_COMMENT}\"");
    }
    match nft.table_canonical(table)? {
        Some(live) if &live == want => Ok(()),
        Some(_) => bail!("after loading, the live table inet {table} differs from the ruleset"),
        None => bail!("after loading, table inet {table} is not in the kernel"),
    }
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

/// Step 3: makes `desired` live (by `load`, when the live table differs) and the content of
/// `files.dest` (keeping the old one as `.previous`), or neither. Files
/// are staged first (a full or read-only directory fails before anything
/// changes), the table is loaded and confirmed, then the files are renamed
/// into place; a failed rename rolls the live table back.
pub fn commit(
    nft: &Nft,
    table: &TableName,
    desired: &str,
    want: &Value,
    load: Option<Load>,
    files: &Files,
) -> anyhow::Result<()> {
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
            load_confirmed(nft, table, load, |nft| confirm(nft, table, want))
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
        Some(snapshot) => restore(nft, table, snapshot).map(|done| done.to_string()),
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
    pub table: bool,
    pub files: Vec<PathBuf>,
}

/// The way out: deletes our table (only when it carries our mark) and
/// `dest` and `<dest>.previous`. Nothing else is touched. In check mode,
/// reports what would go.
pub fn remove(
    nft: &Nft,
    table: &TableName,
    dest: &Path,
    check_mode: bool,
) -> anyhow::Result<Removed> {
    let applied = match read_owned_file(dest)? {
        Existing::Text(text) => Some(text),
        _ => None,
    };
    let mut removed = Removed {
        table: ownership(nft, table, applied.as_deref())? != Ownership::Absent,
        files: Vec::new(),
    };
    if removed.table && !check_mode {
        nft.load(&format!("delete table inet {table}\n"))?;
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
/// [`crate::revoke`]). Returns how many were cut.
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
