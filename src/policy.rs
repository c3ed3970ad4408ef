//! Authorization: roles and the decision whether an authenticated key may make this request
//! on this route.
//!
//! A role is a set of methods. Which roles a route admits, and each role's methods, are
//! resolved at startup into the route's grants, so [`authorize`] is a short scan and a bit
//! test. Promises: a key whose role the route does not admit is refused, and so is a key
//! whose role is unknown (never defaulted to anything); on a tenant-bound route the request
//! must name the key's own tenant, and a request that names none is refused too.

use http::Method;

use crate::rejection::Rejection;
use crate::route::{MethodSet, Route};
use crate::verify::Identity;

/// The built-in roles, available without configuration. `admin` and `member` may use every
/// method; they differ on the routes that admit only `admin`. `readonly` may only read.
pub const DEFAULT_ROLES: [(&str, MethodSet); 3] = [
    ("admin", MethodSet::ALL),
    ("member", MethodSet::ALL),
    ("readonly", MethodSet::READ),
];

/// The named permission sets a configured role may use instead of listing methods.
pub fn permission_set(name: &str) -> Option<MethodSet> {
    match name {
        "all" => Some(MethodSet::ALL),
        "read" => Some(MethodSet::READ),
        _ => None,
    }
}

/// Decides whether `identity` may use `method` on `route`. `tenant` is the tenant the request
/// names ([`Route::tenant`]), if any.
pub fn authorize<U>(
    route: &Route<U>,
    identity: &Identity,
    method: &Method,
    tenant: Option<&[u8]>,
) -> Result<(), Rejection> {
    // Routes admit a handful of roles: a scan of short strings beats hashing.
    let grant = route
        .grants
        .iter()
        .find(|g| *g.role == *identity.role())
        .ok_or(Rejection::InsufficientScope)?;
    if !grant.methods.contains(method) {
        return Err(Rejection::InsufficientScope);
    }
    if route.binds_tenant() && tenant != Some(identity.tenant().as_bytes()) {
        return Err(Rejection::InsufficientScope);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyDigest;
    use crate::route::{Grant, TenantFrom};
    use crate::store::KeyRecord;

    fn identity(role: &str, tenant: &str) -> Identity {
        Identity::from_record(&KeyRecord {
            tenant: tenant.into(),
            role: role.into(),
            ..KeyRecord::example(KeyDigest([0; 32]))
        })
        .unwrap()
    }

    fn route(roles: &[&str]) -> Route<()> {
        Route {
            name: "r".into(),
            host: None,
            prefix: "/".into(),
            ignore_case: false,
            methods: None,
            auth: true,
            grants: DEFAULT_ROLES
                .iter()
                .filter(|(name, _)| roles.contains(name))
                .map(|(name, methods)| Grant {
                    role: (*name).into(),
                    methods: *methods,
                })
                .collect(),
            tenant: TenantFrom::Unbound,
            upstream: (),
        }
    }

    const METHODS: [&str; 10] = [
        "GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE", "TRACE", "CONNECT", "PURGE",
    ];

    fn allowed(role: &str, route: &Route<()>, method: &str) -> bool {
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        authorize(route, &identity(role, "acme"), &m, None).is_ok()
    }

    #[test]
    fn each_default_role_on_each_method() {
        let open_to_all = route(&["admin", "member", "readonly"]);
        for m in METHODS {
            assert!(allowed("admin", &open_to_all, m), "admin {m}");
            assert!(allowed("member", &open_to_all, m), "member {m}");
            let read = matches!(m, "GET" | "HEAD" | "OPTIONS");
            assert_eq!(allowed("readonly", &open_to_all, m), read, "readonly {m}");
        }
    }

    #[test]
    fn admin_only_routes_refuse_members_and_readonly_keys() {
        let admin_only = route(&["admin"]);
        for m in METHODS {
            assert!(allowed("admin", &admin_only, m), "admin {m}");
            assert!(!allowed("member", &admin_only, m), "member {m}");
            assert!(!allowed("readonly", &admin_only, m), "readonly {m}");
        }
    }

    #[test]
    fn unknown_roles_are_refused_not_defaulted() {
        let all = route(&["admin", "member", "readonly"]);
        for role in ["reader", "Admin", "", "owner"] {
            for m in METHODS {
                assert!(!allowed(role, &all, m), "{role:?} {m}");
            }
        }
    }

    #[test]
    fn a_tenant_bound_route_needs_the_keys_own_tenant() {
        let mut r = route(&["admin"]);
        r.tenant = TenantFrom::parse("header:x-tenant").unwrap();
        let id = identity("admin", "acme");
        let get = Method::GET;
        assert_eq!(authorize(&r, &id, &get, Some(b"acme")), Ok(()));
        for other in [&b"other"[..], b"ACME", b"acme ", b""] {
            assert_eq!(
                authorize(&r, &id, &get, Some(other)),
                Err(Rejection::InsufficientScope)
            );
        }
        assert_eq!(
            authorize(&r, &id, &get, None),
            Err(Rejection::InsufficientScope),
            "a bound route refuses requests that name no tenant"
        );
        assert_eq!(authorize(&route(&["admin"]), &id, &get, None), Ok(()));
    }

    #[test]
    fn permission_sets_are_named() {
        assert_eq!(permission_set("all"), Some(MethodSet::ALL));
        assert_eq!(permission_set("read"), Some(MethodSet::READ));
        assert_eq!(permission_set("write"), None);
    }
}
