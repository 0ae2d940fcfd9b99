//! The Ansible binary-module runtime, written once for every module.
//!
//! Ansible runs a binary module as `<tmp>/AnsiballZ_<name> <tmp>/args`, where
//! `args` is a JSON object holding the task's options plus `_ansible_*` keys.
//! It does no type checking for binary modules and ignores the exit code when
//! stdout parses as JSON, so this runtime owns all of that contract:
//!
//! - read the args file and split off the `_ansible_*` keys,
//! - reject unknown options, naming the valid ones,
//! - deserialize the options into the module's typed struct (a `null` option
//!   means "not given"),
//! - run the module body with check and diff mode known,
//! - print exactly one JSON object on stdout and nothing on stderr, turning
//!   every error and every panic into `{"failed": true, "msg": ...}`.

mod args;

pub use args::{parse_invocation, Invocation, ModuleOptions};

use serde::Serialize;
use serde_json::{Map, Value};
use std::io::Write;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

/// What a module body returns on success.
#[derive(Debug, Default)]
pub struct Outcome {
    pub changed: bool,
    /// Module-specific return values (`path`, `sha256`, ...).
    pub values: Map<String, Value>,
    /// Shown by Ansible in diff mode; only emitted when diff mode is on.
    pub diff: Option<Diff>,
    pub warnings: Vec<String>,
}

impl Outcome {
    pub fn new(changed: bool) -> Self {
        Outcome {
            changed,
            ..Outcome::default()
        }
    }

    /// Adds a return value. Serialization of our own plain types cannot
    /// fail; if it ever did, the value is reported as null rather than lost
    /// silently inside a panic.
    pub fn set(&mut self, key: &str, value: impl Serialize) -> &mut Self {
        let value = serde_json::to_value(value).unwrap_or(Value::Null);
        self.values.insert(key.to_string(), value);
        self
    }
}

/// Ansible's diff format: it renders the unified diff itself from these.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Diff {
    pub before: String,
    pub after: String,
    pub before_header: String,
    pub after_header: String,
}

/// Runs a module body and exits the process. This is the whole `main` of a
/// binary module: parse, run the body, print one JSON object.
pub fn run<O, F>(body: F) -> !
where
    O: ModuleOptions,
    F: FnOnce(&Invocation<O>) -> anyhow::Result<Outcome>,
{
    let args_path = std::env::args_os().nth(1);
    let result = run_captured(|| {
        let path = args_path.ok_or_else(|| {
            anyhow::anyhow!(
                "no arguments file: run this module from Ansible, or by hand as \
                 `<module> args.json` with a JSON object of options"
            )
        })?;
        let text = std::fs::read_to_string(&path).map_err(|err| {
            anyhow::anyhow!(
                "cannot read arguments file {}: {err}",
                path.to_string_lossy()
            )
        })?;
        let invocation = parse_invocation::<O>(&text)?;
        let outcome = body(&invocation)?;
        Ok(outcome_to_json(outcome, invocation.diff_mode))
    });
    let (json, code) = match result {
        Ok(json) => (json, 0),
        Err(msg) => (failure_json(&msg), 1),
    };
    let mut stdout = std::io::stdout().lock();
    // If stdout is gone there is nobody left to tell; exit with the code.
    let _ = writeln!(stdout, "{json}");
    let _ = stdout.flush();
    std::process::exit(code)
}

/// Runs `body`, converting both errors and panics into a message. The panic
/// hook is replaced for the duration so nothing is printed on stderr: Ansible
/// would show it as noise, and the message belongs in the JSON result.
pub fn run_captured<F>(body: F) -> Result<Value, String>
where
    F: FnOnce() -> anyhow::Result<Value>,
{
    // The panic hook is process-wide: hold this lock while ours is set, so
    // two callers (tests run in parallel) never swap each other's hook.
    static HOOK_LOCK: Mutex<()> = Mutex::new(());
    let _hook_guard = HOOK_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let panic_message = Arc::new(Mutex::new(None::<String>));
    let slot = Arc::clone(&panic_message);
    let previous_hook = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_string());
        if let Ok(mut guard) = slot.lock() {
            *guard = Some(format!("{payload}{location}"));
        }
    }));
    let outcome = panic::catch_unwind(AssertUnwindSafe(body));
    panic::set_hook(previous_hook);
    match outcome {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(format!("{err:#}")),
        Err(payload) => {
            let detail = panic_message
                .lock()
                .ok()
                .and_then(|guard| guard.clone())
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(format!(
                "internal error (a bug, please report it): {detail}; nothing was changed \
                 after the failing step"
            ))
        }
    }
}

fn outcome_to_json(outcome: Outcome, diff_mode: bool) -> Value {
    let mut map = Map::new();
    map.insert("changed".into(), Value::Bool(outcome.changed));
    map.insert("failed".into(), Value::Bool(false));
    for (key, value) in outcome.values {
        map.insert(key, value);
    }
    if diff_mode {
        if let Some(diff) = outcome.diff {
            map.insert(
                "diff".into(),
                serde_json::to_value(diff).unwrap_or(Value::Null),
            );
        }
    }
    if !outcome.warnings.is_empty() {
        map.insert(
            "warnings".into(),
            Value::Array(outcome.warnings.into_iter().map(Value::String).collect()),
        );
    }
    Value::Object(map)
}

fn failure_json(msg: &str) -> Value {
    serde_json::json!({ "failed": true, "changed": false, "msg": msg })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_become_messages_with_their_context() {
        let result =
            run_captured(|| Err(anyhow::anyhow!("root cause")).map_err(|e| e.context("reading x")));
        assert_eq!(result.unwrap_err(), "reading x: root cause");
    }

    #[test]
    fn panics_become_messages_not_stderr() {
        let result = run_captured(|| panic!("boom {}", 42));
        let msg = result.unwrap_err();
        assert!(msg.starts_with("internal error"), "{msg}");
        assert!(msg.contains("boom 42"), "{msg}");
    }

    #[test]
    fn diff_is_emitted_only_in_diff_mode() {
        let mut outcome = Outcome::new(true);
        outcome.diff = Some(Diff {
            before: "a".into(),
            after: "b".into(),
            before_header: "x".into(),
            after_header: "x".into(),
        });
        outcome.set("path", "/tmp/x");
        let json = outcome_to_json(outcome, false);
        assert_eq!(json["changed"], true);
        assert_eq!(json["path"], "/tmp/x");
        assert!(json.get("diff").is_none());
    }
}
