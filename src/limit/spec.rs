//! How a rate limit is written and what it means: `100/s`, `6000/min`, `tenant:20/s`.
//!
//! A limit of `N/period` admits `N` requests at once (a full burst) and then one every
//! `period / N`: the generic cell rate algorithm's emission interval, with a burst tolerance of
//! `period` less one interval (`gcra.rs`). Its scope says whose requests share it: one key's
//! (`key:`, the default) or every key of the key's tenant (`tenant:`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Whose requests share one limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// One key's requests.
    Key,
    /// The requests of every key of the key's tenant.
    Tenant,
}

impl Scope {
    /// Its name in the written form, metric labels and headers.
    pub const fn name(self) -> &'static str {
        match self {
            Scope::Key => "key",
            Scope::Tenant => "tenant",
        }
    }
}

/// A rate limit: `count` requests per `period_secs`, shared within `scope`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RateLimit {
    /// Requests admitted per period, and the burst admitted at once (1 to 1,000,000,000).
    pub count: u32,
    /// The period in seconds: 1 (`s`), 60 (`min`) or 3600 (`h`).
    pub period_secs: u32,
    /// Whose requests share it.
    pub scope: Scope,
}

/// Why a rate limit could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}: write a rate limit as <count>/<s|min|h>, optionally after key: or tenant: (e.g. 100/s, tenant:6000/min)")]
pub struct BadLimit(String);

/// The largest count a limit may name.
const MAX_COUNT: u32 = 1_000_000_000;

impl FromStr for RateLimit {
    type Err = BadLimit;

    fn from_str(s: &str) -> Result<Self, BadLimit> {
        let bad = |why: &str| BadLimit(why.to_owned());
        let (scope, rest) = match s.split_once(':') {
            Some(("key", rest)) => (Scope::Key, rest),
            Some(("tenant", rest)) => (Scope::Tenant, rest),
            Some(_) => return Err(bad("the scope must be key or tenant")),
            None => (Scope::Key, s),
        };
        let (count, unit) = rest
            .split_once('/')
            .ok_or_else(|| bad("no period after the count"))?;
        // Digits only: `u32::from_str` would take a sign.
        if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("the count must be a whole number"));
        }
        let count: u32 = count
            .parse()
            .ok()
            .filter(|c| (1..=MAX_COUNT).contains(c))
            .ok_or_else(|| bad("the count must be 1 to 1000000000"))?;
        let period_secs = match unit {
            "s" => 1,
            "min" => 60,
            "h" => 3600,
            _ => return Err(bad("the period must be s, min or h")),
        };
        Ok(RateLimit {
            count,
            period_secs,
            scope,
        })
    }
}

impl fmt::Display for RateLimit {
    /// The written form, which [`FromStr`] reads back: the scope only when it is `tenant`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.scope == Scope::Tenant {
            f.write_str("tenant:")?;
        }
        let unit = match self.period_secs {
            1 => "s",
            60 => "min",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

impl Serialize for RateLimit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RateLimit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_forms_read_back() {
        for s in ["100/s", "tenant:6000/min", "1/h", "1000000000/s"] {
            let limit: RateLimit = s.parse().unwrap();
            assert_eq!(limit.to_string(), s);
        }
        let limit: RateLimit = "key:5/s".parse().unwrap();
        assert_eq!(
            limit,
            RateLimit {
                count: 5,
                period_secs: 1,
                scope: Scope::Key
            }
        );
        assert_eq!(limit.to_string(), "5/s");
    }

    #[test]
    fn bad_forms_are_refused_with_the_reason() {
        for (s, why) in [
            ("100", "no period"),
            ("0/s", "1 to"),
            ("+5/s", "whole number"),
            ("5/day", "s, min or h"),
            ("user:5/s", "key or tenant"),
            ("1000000001/s", "1 to"),
            ("", "no period"),
        ] {
            let err = s.parse::<RateLimit>().unwrap_err().to_string();
            assert!(err.contains(why), "{s:?}: {err}");
            assert!(err.contains("100/s"), "{err}");
        }
    }
}
