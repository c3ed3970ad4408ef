//! keygate: an authentication sidecar and edge gateway that guards HTTP services with bearer
//! API keys.
//!
//! # Layout
//!
//! One module per concern, from the entry points down. Imports point one way, downwards: a
//! module uses only the ones listed after it, never one above (no import cycles; runtime
//! settings types live with the module that uses them, and `config` compiles into them).
//!
//! - [`cli`]: the command line (`serve`, `demo`, the key-management commands): arguments,
//!   runners, printers. Above everything.
//! - [`config`]: the configuration file format, its loading (file, environment, flags, with
//!   where each value came from) and its compiling into the runtime's settings, every error
//!   reported at once.
//! - [`server`]: listeners, proxy workers, connection caps and deadlines, TLS termination
//!   (certificates by SNI, client certificates, reloads), drain on shutdown.
//! - `admin`: the admin listener: `/healthz`, `/readyz`, `/metrics`, and the management API
//!   under `/v1/` (an operation table, one file per resource, the OpenAPI document).
//! - [`proxy`]: **the request path**, as named phases (route → credential → verify →
//!   authorize → rewrite → forward → log) in [`proxy::handle`]; beside it header hygiene,
//!   forwarding headers, the upstream connection pools.
//! - [`manage`]: key and service-account operations shared by the CLI and the API, with the
//!   audit trail.
//! - [`auth`]: the bearer credential and the verdict's mapping to refusals.
//! - [`policy`]: roles, defined once, and the decision whether a key may make a request.
//! - [`verify`]: the verdict cache (moka) in front of the store, revocation-safe.
//! - [`identity`]: who a verified key acts for, as the request path needs it.
//! - [`route`]: path normalisation and the route table (pure).
//! - [`store`]: the `Store` trait and its Redis and file backends, the invalidation feed.
//! - [`metrics`], [`telemetry`], [`rejection`] (every refusal and the one JSON error body
//!   helper), [`tls`] (the crypto provider and PEM loading), [`key`] (the key format, pure):
//!   the ground floor.

/// The process's allocator: mimalloc. The cached request path allocates little, but what it
/// does (hyper's buffers, header maps) is small, short-lived and spread over the proxy workers'
/// threads, which mimalloc serves from per-thread pages; its size classes also hold the cache's
/// small entries with less slack than the system allocator. Set here, in the library, so the
/// binary, the tests and the benchmarks all measure the same allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub(crate) mod admin;
pub mod auth;
pub mod cli;
pub mod config;
pub mod identity;
pub mod key;
pub mod limit;
pub mod manage;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod rejection;
pub mod route;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod verify;
