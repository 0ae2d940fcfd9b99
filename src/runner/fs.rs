//! Files that are either fully written or not written at all, and the
//! checks that keep root from writing through a planted link.

use anyhow::{bail, Context};
use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The file's text, or `None` when it does not exist.
pub fn read_optional(path: &Path) -> anyhow::Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(err) if err.kind() == ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// What is at a path we are about to replace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Existing {
    Missing,
    /// A regular file and its text.
    Text(String),
    /// A regular file that is not UTF-8 (corrupted, or not ours): its bytes,
    /// kept so that it can be saved aside before it is replaced.
    Unreadable(Vec<u8>),
}

/// Reads a file that we own and are about to replace, refusing a symbolic
/// link or anything but a regular file: following a link would copy (or
/// overwrite) whatever it points to, with our mode.
pub fn read_owned_file(path: &Path) -> anyhow::Result<Existing> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(Existing::Missing),
        Err(err) => return Err(err).with_context(|| format!("cannot stat {}", path.display())),
    };
    if meta.file_type().is_symlink() {
        bail!(
            "{} is a symbolic link: refusing to follow it (a link would have root copy or \
             overwrite its target); give the real path as dest, or remove the link",
            path.display()
        );
    }
    if !meta.is_file() {
        bail!(
            "{} is not a regular file: move it away, then run again",
            path.display()
        );
    }
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(match String::from_utf8(bytes) {
        Ok(text) => Existing::Text(text),
        Err(err) => Existing::Unreadable(err.into_bytes()),
    })
}

/// Reads at most `cap` bytes of UTF-8 text: a bigger input is refused
/// before it is held in memory or handed to nft.
pub fn read_capped(path: &Path, cap: u64) -> anyhow::Result<Option<String>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut bytes = Vec::new();
    file.take(cap + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() as u64 > cap {
        bail!("{} is larger than {cap} bytes: refused", path.display());
    }
    String::from_utf8(bytes)
        .map(Some)
        .with_context(|| format!("{} is not UTF-8 text", path.display()))
}

/// A fully written, flushed temporary file next to its final path, created
/// with `O_EXCL` under a random name (the `tempfile` crate), so a link
/// planted at a predictable name is never followed. Dropped without
/// [`Staged::commit`], it is removed.
pub struct Staged {
    file: tempfile::NamedTempFile,
    target: PathBuf,
}

impl Staged {
    /// Writes `content` with `mode` into a new temporary file in `target`'s
    /// directory (created, mode 0755, when missing).
    pub fn new(target: &Path, content: &[u8], mode: u32) -> anyhow::Result<Staged> {
        let dir = parent_dir(target);
        let file_name = target
            .file_name()
            .with_context(|| format!("{} is not a file path", target.display()))?;
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .with_context(|| format!("cannot create directory {}", dir.display()))?;
        }
        let mut prefix = std::ffi::OsString::from(".");
        prefix.push(file_name);
        prefix.push(".");
        let mut file = tempfile::Builder::new()
            .prefix(&prefix)
            .suffix(".tmp")
            .tempfile_in(dir)
            .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
        let shown = file.path().display().to_string();
        file.write_all(content)
            .with_context(|| format!("cannot write {shown}"))?;
        file.as_file()
            .set_permissions(fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot set the mode of {shown}"))?;
        file.as_file()
            .sync_all()
            .with_context(|| format!("cannot flush {shown}"))?;
        Ok(Staged {
            file,
            target: target.to_path_buf(),
        })
    }

    /// Renames the temporary file over the target (atomic in one
    /// directory); on failure the temporary file is removed.
    pub fn commit(self) -> anyhow::Result<()> {
        let Staged { file, target } = self;
        let shown = file.path().display().to_string();
        file.persist(&target)
            .map_err(|err| err.error)
            .with_context(|| format!("cannot move {shown} to {}", target.display()))?;
        // Make the rename itself durable.
        File::open(parent_dir(&target))
            .and_then(|d| d.sync_all())
            .ok();
        Ok(())
    }
}

fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Writes `content` to `path` atomically: a temporary file in the same
/// directory, flushed to disk, given its final mode, then renamed over the
/// target. A crash leaves either the old file or the new one, never half of
/// one. Missing parent directories are created (mode 0755).
pub fn write_atomic(path: &Path, content: &str, mode: u32) -> anyhow::Result<()> {
    Staged::new(path, content.as_bytes(), mode)?.commit()
}

/// Removes a file we own; a missing one is fine. Returns whether it existed.
/// A symbolic link is removed itself, never its target.
pub fn remove_owned_file(path: &Path) -> anyhow::Result<bool> {
    match fs::symlink_metadata(path) {
        Err(err) if err.kind() == ErrorKind::NotFound => Ok(false),
        Err(err) => Err(err).with_context(|| format!("cannot stat {}", path.display())),
        Ok(meta) if meta.is_dir() => bail!(
            "{} is a directory, not the file this module wrote: remove it yourself",
            path.display()
        ),
        Ok(_) => fs::remove_file(path)
            .map(|()| true)
            .with_context(|| format!("cannot remove {}", path.display())),
    }
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

    #[test]
    fn a_planted_link_at_the_old_temporary_name_is_never_followed() {
        // The old implementation wrote `.<name>.tmp<pid>` with O_TRUNC and
        // no O_EXCL: a link planted there made root overwrite its target.
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "FOREIGN").unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
        let path = dir.path().join("x.nft");
        let planted = dir.path().join(format!(".x.nft.tmp{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        write_atomic(&path, "ruleset\n", 0o644).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "FOREIGN");
        let mode = fs::metadata(&victim).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::read_to_string(&path).unwrap(), "ruleset\n");
    }

    #[test]
    fn owned_files_refuse_links_and_keep_unreadable_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        fs::write(&secret, "SECRET").unwrap();
        let link = dir.path().join("x.nft");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        let err = read_owned_file(&link).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        let bad = dir.path().join("bad.nft");
        fs::write(&bad, b"table\xff\xfe").unwrap();
        assert_eq!(
            read_owned_file(&bad).unwrap(),
            Existing::Unreadable(b"table\xff\xfe".to_vec())
        );
        assert_eq!(
            read_owned_file(&dir.path().join("none")).unwrap(),
            Existing::Missing
        );
        fs::create_dir(dir.path().join("d")).unwrap();
        assert!(read_owned_file(&dir.path().join("d")).is_err());
    }

    #[test]
    fn capped_reads_refuse_oversized_input() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        fs::write(&path, "x".repeat(11)).unwrap();
        assert!(read_capped(&path, 10)
            .unwrap_err()
            .to_string()
            .contains("larger"));
        assert_eq!(read_capped(&path, 11).unwrap().unwrap().len(), 11);
        assert_eq!(read_capped(&dir.path().join("none"), 10).unwrap(), None);
    }
}
