//! Spawning the programs we drive (`nft`, `incus`, `systemctl`): found on
//! PATH or in the sbin directories, fed on stdin, their stderr kept for the
//! error message.

use anyhow::{bail, Context};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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
