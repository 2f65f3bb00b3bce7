//! What this service calls itself and which version it is, for the diagnostics and for gossip.

/// The service name reported by the diagnostics.
pub const SERVICE_NAME: &str = "order-process";
/// This build's version, as published in gossip and the diagnostics.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
