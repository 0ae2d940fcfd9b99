//! Validated types: everything the plan is built from. Nothing here spawns a
//! process or touches a file.

pub mod bridge;
pub mod endpoint;
pub mod firewall;
pub mod gateway;
pub mod logging;
pub mod names;
pub mod policy;

pub use bridge::{domain_of, DomainBridge};
pub use endpoint::{confine_to_bridges, Endpoint, Machine, ResolvedPolicy, World};
pub use gateway::GatewayServices;
pub use logging::LogSettings;
pub use names::{BridgePattern, IfName, Name, TableName};
pub use policy::{merge_spans, EndpointRef, PolicySpec, PortSpan, Protocol, Traffic};
