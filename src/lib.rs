//! keygate: an authentication sidecar and edge gateway that guards HTTP services with bearer
//! API keys.

pub mod admin;
pub mod auth;
pub mod cli;
pub mod config;
pub mod identity;
pub mod key;
pub mod manage;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod rejection;
pub mod route;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod verify;
