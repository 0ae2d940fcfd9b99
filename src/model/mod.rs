//! Validated types: everything the plan is built from. Nothing here spawns a
//! process or touches a file.

pub mod bridge;
pub mod domain;
pub mod endpoint;
pub mod firewall;
pub mod gateway;
pub mod logging;
pub mod mac;
pub mod names;
pub mod policy;

pub use bridge::{domain_of, DomainBridge};
pub use domain::{parse_protected_networks, DomainSettings, Internet};
pub use endpoint::{confine_to_bridges, Endpoint, Machine, ResolvedPolicy, World};
pub use gateway::GatewayServices;
pub use logging::LogSettings;
pub use mac::MacAddr;
pub use names::{BridgePattern, IfName, Name, TableName};
pub use policy::{merge_spans, EndpointRef, PolicySpec, PortSpan, Protocol, Traffic};
