//! Replacing our live table: one `nft -f`, a confirmation read back from the
//! kernel, and a rollback to the previous live table when either fails.

use crate::model::TableName;
use crate::runner::nft::Nft;
use anyhow::bail;
use serde_json::Value;

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
    replace_table_with(nft, table, desired, |nft| confirm(nft, table, want))
}

/// `replace_table` with the confirmation step given by the caller, so tests
/// can make it fail and watch the rollback.
pub fn replace_table_with(
    nft: &Nft,
    table: &TableName,
    desired: &str,
    confirm: impl FnOnce(&Nft) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let snapshot = nft.table_text(table)?;
    let result = nft.load(desired).and_then(|()| confirm(nft));
    let Err(err) = result else {
        return Ok(());
    };
    match restore(nft, table, snapshot.as_deref()) {
        Ok(()) => bail!(
            "{err:#}; the previous table inet {table} was restored{}",
            if snapshot.is_none() {
                " (there was none: it was removed)"
            } else {
                ""
            }
        ),
        Err(restore_err) => {
            bail!("{err:#}; restoring the previous table inet {table} ALSO failed: {restore_err:#}")
        }
    }
}

fn confirm(nft: &Nft, table: &TableName, want: &Value) -> anyhow::Result<()> {
    match nft.table_canonical(table)? {
        Some(live) if &live == want => Ok(()),
        Some(_) => bail!("after loading, the live table inet {table} differs from the ruleset"),
        None => bail!("after loading, table inet {table} is not in the kernel"),
    }
}

/// Puts back the table as `nft list table` printed it before the load, in
/// one transaction that replaces whatever is live now.
fn restore(nft: &Nft, table: &TableName, snapshot: Option<&str>) -> anyhow::Result<()> {
    match snapshot {
        Some(text) => nft.load(&format!(
            "table inet {table} {{}}\ndelete table inet {table}\n{text}"
        )),
        None if nft.table_exists(table)? => nft.load(&format!("delete table inet {table}\n")),
        None => Ok(()),
    }
}
