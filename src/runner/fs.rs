//! Files that are either fully written or not written at all.

use anyhow::Context;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The file's text, or `None` when it does not exist.
pub fn read_optional(path: &Path) -> anyhow::Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(err) if err.kind() == ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Writes `content` to `path` atomically: a temporary file in the same
/// directory, flushed to disk, given its final mode, then renamed over the
/// target. A crash leaves either the old file or the new one, never half of
/// one. Missing parent directories are created (mode 0755).
pub fn write_atomic(path: &Path, content: &str, mode: u32) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("cannot create directory {}", dir.display()))?;
    }
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> anyhow::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        file.write_all(content.as_bytes())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        // The umask may have narrowed the mode given at creation.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot set the mode of {}", tmp.display()))?;
        file.sync_all()
            .with_context(|| format!("cannot flush {}", tmp.display()))?;
        fs::rename(&tmp, path)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
        // Make the rename itself durable.
        File::open(dir).and_then(|d| d.sync_all()).ok();
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_atomically_with_the_mode_and_creates_parents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/rules.nft");
        assert_eq!(read_optional(&path).unwrap(), None);
        write_atomic(&path, "one\n", 0o644).unwrap();
        write_atomic(&path, "two\n", 0o644).unwrap();
        assert_eq!(read_optional(&path).unwrap().as_deref(), Some("two\n"));
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        let leftovers: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
    }

    #[test]
    fn a_failed_write_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rules.nft");
        write_atomic(&path, "old\n", 0o644).unwrap();
        // A directory where the file's parent should be makes the rename fail.
        let blocked = dir.path().join("rules.nft/child");
        assert!(write_atomic(&blocked, "new\n", 0o644).is_err());
        assert_eq!(read_optional(&path).unwrap().as_deref(), Some("old\n"));
    }
}
