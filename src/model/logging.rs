//! Drop logging settings. Every `log` the renderer writes is preceded by a
//! shared rate limit, so a port scan cannot flood the journal.

use anyhow::{bail, ensure, Context};
use serde::{Deserialize, Serialize};

pub const DEFAULT_PREFIX: &str = "ANKLUME";
pub const DEFAULT_RATE: &str = "10/minute";
/// Kernel log prefixes are at most 127 bytes; ours get `-HOST-DENY-<DOMAIN>: `
/// appended, and domain names are at most 63 bytes.
const PREFIX_MAX_BYTES: usize = 32;

/// The `logging` option as written in the task.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLogging {
    pub enabled: Option<bool>,
    pub prefix: Option<String>,
    pub rate: Option<String>,
}

/// Validated logging settings; `None` in the plan means "do not log".
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogSettings {
    pub prefix: String,
    /// `<count>/<unit>`, as nft writes it after `limit rate`.
    pub rate: String,
}

impl LogSettings {
    pub fn from_raw(raw: &RawLogging) -> anyhow::Result<Option<LogSettings>> {
        if !raw.enabled.unwrap_or(false) {
            return Ok(None);
        }
        let prefix = raw.prefix.as_deref().unwrap_or(DEFAULT_PREFIX);
        ensure!(
            !prefix.is_empty() && prefix.len() <= PREFIX_MAX_BYTES,
            "logging.prefix {prefix:?} must hold 1 to {PREFIX_MAX_BYTES} characters"
        );
        if let Some(bad) = prefix
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_')))
        {
            bail!(
                "logging.prefix {prefix:?} contains {bad:?}; use letters, digits, '-' and '_' \
                 (log prefixes are quoted in nft and grepped in the journal)"
            );
        }
        let rate = raw.rate.as_deref().unwrap_or(DEFAULT_RATE);
        Ok(Some(LogSettings {
            prefix: prefix.to_string(),
            rate: parse_rate(rate)?,
        }))
    }

    /// The prefix of a log line, e.g. `ANKLUME-DENY-PRO: `.
    pub fn line_prefix(&self, event: &str, domain: Option<&str>) -> String {
        match domain {
            Some(domain) => format!(
                "{}-{}-{}: ",
                self.prefix,
                event,
                domain.to_ascii_uppercase()
            ),
            None => format!("{}-{}: ", self.prefix, event),
        }
    }
}

fn parse_rate(rate: &str) -> anyhow::Result<String> {
    let (count, unit) = rate
        .split_once('/')
        .with_context(|| format!("logging.rate {rate:?} must look like \"10/minute\""))?;
    let count: u32 = count
        .trim()
        .parse()
        .with_context(|| format!("logging.rate {rate:?}: {count:?} is not a whole number"))?;
    ensure!(
        (1..=100_000).contains(&count),
        "logging.rate {rate:?}: the count must be between 1 and 100000"
    );
    let unit = unit.trim();
    ensure!(
        matches!(unit, "second" | "minute" | "hour" | "day"),
        "logging.rate {rate:?}: the unit must be second, minute, hour or day"
    );
    Ok(format!("{count}/{unit}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(enabled: bool, prefix: Option<&str>, rate: Option<&str>) -> RawLogging {
        RawLogging {
            enabled: Some(enabled),
            prefix: prefix.map(str::to_string),
            rate: rate.map(str::to_string),
        }
    }

    #[test]
    fn disabled_by_default() {
        assert_eq!(LogSettings::from_raw(&RawLogging::default()).unwrap(), None);
    }

    #[test]
    fn prefixes_are_per_domain_and_upper_case() {
        let s = LogSettings::from_raw(&raw(true, None, None))
            .unwrap()
            .unwrap();
        assert_eq!(s.line_prefix("DENY", Some("pro")), "ANKLUME-DENY-PRO: ");
        assert_eq!(s.line_prefix("INVALID", None), "ANKLUME-INVALID: ");
        assert_eq!(s.rate, "10/minute");
    }

    #[test]
    fn bad_settings_are_refused() {
        for (prefix, rate) in [
            (Some("a b"), None),
            (Some("x\""), None),
            (Some(""), None),
            (None, Some("fast")),
            (None, Some("0/second")),
            (None, Some("5/week")),
        ] {
            assert!(LogSettings::from_raw(&raw(true, prefix, rate)).is_err());
        }
    }
}
