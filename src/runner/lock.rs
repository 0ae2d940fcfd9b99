//! One apply at a time on a machine: an exclusive `flock(2)` on a lock file,
//! held from the first look at the live table to the last file written.
//!
//! Without it, two applies started together interleaved their snapshot,
//! load, confirmation and rollback: one run's failed confirmation
//! "restored" its snapshot over the other's load, and the live table ended
//! on the state before both while the file held one of the new rulesets.

use anyhow::{bail, Context};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The machine-wide lock: every apply and removal of any of our tables.
/// `/run` is a tmpfs, so a lock never outlives a reboot.
pub const DEFAULT_LOCK_PATH: &str = "/run/anklume-isolation.lock";

/// How often a waiting apply retries the lock.
const RETRY: Duration = Duration::from_millis(20);

/// The lock, released when dropped (or when the process dies: the kernel
/// releases a `flock` with its last file descriptor).
#[derive(Debug)]
pub struct ApplyLock {
    _file: File,
    pub path: PathBuf,
}

impl ApplyLock {
    /// Waits up to `wait` for the lock. The lock file is never followed
    /// through a link nor truncated: its content is irrelevant.
    pub fn acquire(path: &Path, wait: Duration) -> anyhow::Result<ApplyLock> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .with_context(|| format!("cannot open the apply lock {}", path.display()))?;
        let started = Instant::now();
        loop {
            // SAFETY: flock(2) on a descriptor we own; no memory involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                return Ok(ApplyLock {
                    _file: file,
                    path: path.to_path_buf(),
                });
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(err).with_context(|| format!("cannot lock {}", path.display()));
            }
            if started.elapsed() >= wait {
                bail!(
                    "another apply has held {} for {} s: wait for it to finish (or find the \
                     stuck process with `fuser {}`), then run again",
                    path.display(),
                    wait.as_secs(),
                    path.display()
                );
            }
            std::thread::sleep(RETRY);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_waits_then_gets_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let first = ApplyLock::acquire(&path, Duration::from_secs(1)).unwrap();
        let err = ApplyLock::acquire(&path, Duration::from_millis(100)).unwrap_err();
        assert!(err.to_string().contains("another apply"), "{err}");
        drop(first);
        ApplyLock::acquire(&path, Duration::from_millis(100)).unwrap();
    }

    #[test]
    fn a_link_at_the_lock_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, "x").unwrap();
        let path = dir.path().join("lock");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(ApplyLock::acquire(&path, Duration::from_millis(10)).is_err());
    }
}
