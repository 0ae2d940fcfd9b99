//! What the integration tests share: named network namespaces (root, real
//! `nft`), shell steps inside them, and the golden-ruleset check (`nft -c`
//! in a throwaway user and network namespace). Each test crate uses part of
//! it.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// A named network namespace (`ank-it-<tag>-<pid>`, so parallel runs never
/// meet), deleted when dropped.
pub struct NetNs(pub String);

impl NetNs {
    pub fn new(tag: &str) -> NetNs {
        let name = format!("ank-it-{tag}-{}", std::process::id());
        let status = Command::new("ip").args(["netns", "add", &name]).status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "`ip netns add` failed: these tests need root and iproute2"
        );
        NetNs(name)
    }

    /// `nft <args>` in this namespace; its stdout.
    pub fn nft(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "nft"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nft {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Loads a ruleset text in this namespace.
    pub fn nft_stdin(&self, text: &str) {
        nft_load(&self.0, text);
    }

    /// Loads a ruleset file in this namespace.
    pub fn nft_file(&self, path: &Path) {
        self.nft(&["-f", path.to_str().unwrap()]);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// `sh -c <script>` in namespace `ns`.
pub fn sh(ns: &str, script: &str) -> Output {
    Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", script])
        .output()
        .unwrap()
}

/// [`sh`] that must succeed; its stdout.
pub fn must(ns: &str, script: &str) -> String {
    let out = sh(ns, script);
    assert!(
        out.status.success(),
        "{ns}: {script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `nft -f -` of `text` in namespace `ns`, which must succeed.
pub fn nft_load(ns: &str, text: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{ns}: nft -f: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `nft -c` of `text` in a throwaway user and network namespace
/// (`unshare -rn`): the kernel's own verdict on the ruleset, without root
/// and without touching any real ruleset.
pub fn nft_check(text: &str) -> Result<(), String> {
    let mut child = Command::new("unshare")
        .args(["-rn", "nft", "-c", "-f", "/dev/stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!("cannot run `unshare -rn nft` (util-linux and nftables are needed): {e}")
        })?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Compares each rendered `(name, text)` with `tests/golden/<name>.nft` and
/// checks it with [`nft_check`]. `UPDATE_GOLDEN=1` writes the files and
/// still fails: a changed golden file is reviewed in the diff, never
/// accepted by a green run.
pub fn check_goldens(rendered: impl IntoIterator<Item = (String, String)>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut failures = Vec::new();
    for (name, text) in rendered {
        let path = dir.join(format!("{name}.nft"));
        match std::fs::read_to_string(&path) {
            Ok(golden) if golden == text => {}
            Ok(_) | Err(_) if update => {
                std::fs::write(&path, &text).unwrap();
                failures.push(format!(
                    "{name}: wrote {} (UPDATE_GOLDEN): review `git diff tests/golden`, then run \
                     the tests again without UPDATE_GOLDEN",
                    path.display()
                ));
            }
            Ok(_) => failures.push(format!(
                "{name}: rendered text differs from {} (UPDATE_GOLDEN=1 to write it, then review \
                 the diff)",
                path.display()
            )),
            Err(e) => failures.push(format!("{}: {e}", path.display())),
        }
        if let Err(err) = nft_check(&text) {
            failures.push(format!("{name}: nft -c refused it:\n{err}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
