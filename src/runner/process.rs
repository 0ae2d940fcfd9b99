//! Spawning the programs we drive (`nft`, `incus`, `unshare`, `systemctl`):
//! found on PATH or in the sbin directories, fed on stdin, their stderr kept
//! for the error message, and killed when they overrun their time.

use anyhow::{bail, Context};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long any child may run unless its caller says otherwise. Loading
/// 1000 domains takes ~35 ms and the worst measured load (500 bridges as
/// per-pair rules) 7.4 s: a child still running after a minute is stuck
/// (a hung netlink socket, an `incus` waiting on a dead daemon), and an
/// Ansible run must fail rather than hang with the apply lock held.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// How often a running child is checked for exit.
const POLL: Duration = Duration::from_millis(5);

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

/// Runs a command with [`DEFAULT_TIMEOUT`], writing `stdin` to it; returns
/// stdout or an error with the exit status and stderr.
pub fn run_with_stdin(cmd: Command, stdin: Option<&str>) -> anyhow::Result<String> {
    run_with_timeout(cmd, stdin, DEFAULT_TIMEOUT)
}

/// Runs a command, writing `stdin` to it, and kills it (with every process
/// it started: it runs in its own process group) when it is still running
/// after `timeout`. Returns stdout, or an error with the exit status and
/// stderr, or saying that it was killed.
pub fn run_with_timeout(
    mut cmd: Command,
    stdin: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<String> {
    let shown = format!("{:?}", cmd.get_program());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    // Its own process group: `ip netns exec`, `unshare ... sh -c` start
    // grandchildren, and a timeout must take them all down.
    .process_group(0);
    let mut child = cmd.spawn().with_context(|| format!("cannot run {shown}"))?;
    // Write stdin and read both outputs from threads, so a large ruleset
    // cannot deadlock against a child that fills its stdout pipe first, and
    // the wait below can watch the clock.
    let writer = match (stdin, child.stdin.take()) {
        (Some(text), Some(mut pipe)) => {
            let text = text.to_string();
            Some(std::thread::spawn(move || pipe.write_all(text.as_bytes())))
        }
        _ => None,
    };
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for {shown}"))?
        {
            break Some(status);
        }
        if started.elapsed() >= timeout {
            kill_group(child.id());
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(POLL);
    };
    if let Some(writer) = writer {
        // A child that exits early closes the pipe; its stderr says why.
        let _ = writer.join();
    }
    let stdout = String::from_utf8_lossy(&stdout.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
    let Some(status) = status else {
        bail!(
            "timed out after {} s and was killed (it did not finish; a stuck kernel or \
             daemon?){}",
            timeout.as_secs_f64(),
            if stderr.trim().is_empty() {
                String::new()
            } else {
                format!(": {}", stderr.trim())
            }
        );
    };
    if !status.success() {
        let stderr = stderr.trim();
        let stderr = if stderr.is_empty() {
            stdout.trim()
        } else {
            stderr
        };
        bail!("failed ({status}): {stderr}");
    }
    Ok(stdout)
}

/// SIGKILL to the child's whole process group (its id, see `process_group`).
fn kill_group(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) with a negative pid signals that process group;
        // it touches no memory of ours.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_that_overruns_is_killed_with_its_children() {
        let mut cmd = Command::new("/bin/sh");
        // The grandchild `sleep` holds stdout open: the group kill must take
        // it down too, or reading stdout would wait for it.
        cmd.args(["-c", "sleep 30 & sleep 30"]);
        let started = Instant::now();
        let err = run_with_timeout(cmd, None, Duration::from_millis(300)).unwrap_err();
        assert!(err.to_string().contains("timed out after 0.3 s"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_quick_child_returns_its_output_and_failures_their_stderr() {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "cat; echo done"]);
        let out = run_with_timeout(cmd, Some("in\n"), Duration::from_secs(10)).unwrap();
        assert_eq!(out, "in\ndone\n");
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "echo bad >&2; exit 3"]);
        let err = run_with_timeout(cmd, None, Duration::from_secs(10)).unwrap_err();
        assert!(err.to_string().contains("bad"), "{err}");
    }
}
