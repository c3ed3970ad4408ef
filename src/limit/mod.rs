//! Rate limits: how fast a key, or all the keys of a tenant, may call.
pub mod gcra;
pub mod spec;

pub use spec::{RateLimit, Scope};
