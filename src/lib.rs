//! keygate: an authentication sidecar and edge gateway that guards HTTP services with bearer
//! API keys.
//!
//! The request path, top to bottom: [`server::handle`] normalises the path and picks the route
//! ([`route::normalize`], [`route::RouteTable::find`]), takes the credential
//! ([`auth::bearer_token`]), verifies it through the cache and store ([`verify::Verifier`]),
//! applies the route's policy ([`policy::authorize`]), rewrites the headers
//! ([`proxy::rewrite_request_headers`]), forwards to the route's upstream
//! ([`proxy::Upstream::send`]) and maps every refusal in one place ([`rejection::Rejection`]).

pub mod admin;
pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod demo;
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
