//! The only layer that spawns processes or touches files: `nft`, `incus`,
//! atomic files and the boot-time unit.

pub mod conntrack;
pub mod fs;
pub mod host_routes;
pub mod incus;
pub mod incus_api;
pub mod lock;
pub mod nft;
pub mod persist;
pub mod process;
pub mod router;
