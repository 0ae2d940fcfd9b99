//! anklume-isolation: network isolation between the security domains of an
//! Incus host.
//!
//! Three layers, one direction (see `shared/STYLE.md`):
//!
//! - [`model`]: validated types parsed from the Ansible options (names,
//!   bridges, policies, logging);
//! - [`plan`] and [`render`]: pure functions from those types to the sets
//!   of the ruleset, and from the plan to nft text; [`guard`] checks a
//!   ruleset only touches our table;
//! - [`runner`] and [`apply`]: the only code that runs `nft` and `incus` or
//!   touches files.
//!
//! [`module`] is the Ansible binary-module runtime shared by the binaries in
//! `src/bin/`, each of which reads as a recipe: parse, plan, check mode,
//! act, report.

pub mod apply;
pub mod effects;
pub mod guard;
pub mod model;
pub mod module;
pub mod plan;
pub mod render;
pub mod revoke;
pub mod runner;

/// Hex SHA-256 of a ruleset, returned by both modules so a rendered file and
/// an applied one can be matched.
pub fn sha256_hex(text: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
