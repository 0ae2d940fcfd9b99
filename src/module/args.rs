//! Parsing the args file Ansible hands a binary module.

use anyhow::{bail, Context};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// A module's options struct. `NAMES` lists every accepted option so that an
/// unknown one is refused with the list of valid ones (Ansible does no
/// checking of its own for binary modules).
pub trait ModuleOptions: DeserializeOwned {
    const NAMES: &'static [&'static str];
}

/// One run of a module: its typed options and the Ansible flags it honours.
#[derive(Debug)]
pub struct Invocation<O> {
    pub options: O,
    pub check_mode: bool,
    pub diff_mode: bool,
    pub verbosity: u64,
}

/// Parses the JSON text of an args file.
pub fn parse_invocation<O: ModuleOptions>(text: &str) -> anyhow::Result<Invocation<O>> {
    let value: Value = serde_json::from_str(text).context("arguments file is not valid JSON")?;
    let Value::Object(all) = value else {
        bail!("arguments file must hold a JSON object of options");
    };
    let mut options = Map::new();
    let mut flags = Map::new();
    for (key, value) in all {
        if key.starts_with("_ansible_") {
            flags.insert(key, value);
        } else if !value.is_null() {
            // A null option means "not given": Ansible passes omitted
            // options that way when a role forwards an undefined variable.
            options.insert(key, value);
        }
    }
    let unknown: Vec<&str> = options
        .keys()
        .map(String::as_str)
        .filter(|key| !O::NAMES.contains(key))
        .collect();
    if !unknown.is_empty() {
        bail!(
            "unsupported option(s): {}; valid options are: {}",
            unknown.join(", "),
            O::NAMES.join(", ")
        );
    }
    let options: O = serde_path_to_error::deserialize(Value::Object(options)).map_err(|err| {
        let path = err.path().to_string();
        anyhow::anyhow!("option `{path}`: {}", err.into_inner())
    })?;
    Ok(Invocation {
        options,
        check_mode: flag_bool(&flags, "_ansible_check_mode"),
        diff_mode: flag_bool(&flags, "_ansible_diff"),
        verbosity: flags
            .get("_ansible_verbosity")
            .and_then(Value::as_u64)
            .unwrap_or(0),
    })
}

fn flag_bool(flags: &Map<String, Value>, key: &str) -> bool {
    flags.get(key).and_then(Value::as_bool).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Opts {
        name: Option<String>,
        count: Option<u16>,
    }
    impl ModuleOptions for Opts {
        const NAMES: &'static [&'static str] = &["name", "count"];
    }

    #[test]
    fn splits_ansible_flags_and_drops_nulls() {
        let inv: Invocation<Opts> = parse_invocation(
            r#"{"name": "x", "count": null, "_ansible_check_mode": true,
                "_ansible_diff": true, "_ansible_verbosity": 3, "_ansible_no_log": false}"#,
        )
        .unwrap();
        assert_eq!(inv.options.name.as_deref(), Some("x"));
        assert_eq!(inv.options.count, None);
        assert!(inv.check_mode && inv.diff_mode);
        assert_eq!(inv.verbosity, 3);
    }

    #[test]
    fn unknown_options_are_refused_with_the_valid_list() {
        let err = parse_invocation::<Opts>(r#"{"nmae": "x"}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unsupported option(s): nmae; valid options are: name, count"
        );
    }

    #[test]
    fn type_errors_name_the_option() {
        let err = parse_invocation::<Opts>(r#"{"count": "many"}"#).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("option `count`:"), "{msg}");
    }

    #[test]
    fn non_objects_are_refused() {
        assert!(parse_invocation::<Opts>("[1]").is_err());
        assert!(parse_invocation::<Opts>("not json").is_err());
    }
}
