//! Authorization: roles and the decision whether an authenticated key may make this request
//! on this route.
//!
//! A role is a set of methods. Which roles a route admits, and each role's methods, are
//! resolved at startup into the route's grants, so [`authorize`] is a short scan and a bit
//! test. Promises: a key whose role the route does not admit is refused, and so is a key
//! whose role is unknown (never defaulted to anything); on a tenant-bound route the request
//! must name the key's own tenant, and a request that names none is refused too.
//!
//! The role names and what each means are declared here only: the built-in route roles
//! ([`DEFAULT_ROLES`]), the admin API's ([`API_ROLES`], checked by [`admin_api_allows`]), and
//! the organization admin role no service account may have ([`is_organization_admin`]).

use http::Method;

use crate::identity::Identity;
use crate::rejection::Rejection;
use crate::route::{Grant, MethodSet, Route};

/// The organization admin role: every method on the routes, and every operation of the admin
/// API. A service account can never have it.
pub const ADMIN: &str = "admin";
/// The built-in role that may use every method on the routes that admit it.
pub const MEMBER: &str = "member";
/// The built-in role that may only read (GET, HEAD, OPTIONS).
pub const READONLY: &str = "readonly";
/// The admin API's read-only role: it may list and show records there, and change nothing.
pub const ADMIN_READONLY: &str = "admin-readonly";

/// The built-in roles, available without configuration. `admin` and `member` may use every
/// method; they differ on the routes that admit only `admin`. `readonly` may only read.
pub const DEFAULT_ROLES: [(&str, MethodSet); 3] = [
    (ADMIN, MethodSet::ALL),
    (MEMBER, MethodSet::ALL),
    (READONLY, MethodSet::READ),
];

/// What a role may do through the admin API. Ordered: each grants what the one before does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ApiAccess {
    /// List and show records.
    Read,
    /// Anything: create, revoke, rotate and remove too.
    Manage,
}

/// The roles of the admin API: what each may do there, and how error messages describe it.
/// Any other role may do nothing there.
pub const API_ROLES: [(&str, ApiAccess, &str); 2] = [
    (ADMIN, ApiAccess::Manage, "manages records"),
    (ADMIN_READONLY, ApiAccess::Read, "lists and shows records"),
];

/// Whether a key of `role` may call an admin API operation that needs `needed`: `admin` may
/// do anything, `admin-readonly` may list and show, any other role nothing. Role names are
/// compared exactly, as on the routes.
pub fn admin_api_allows(role: &str, needed: ApiAccess) -> bool {
    API_ROLES
        .iter()
        .any(|(name, access, _)| *name == role && *access >= needed)
}

/// Whether `role` names the organization admin role, in any case: a service account can never
/// have it.
pub fn is_organization_admin(role: &str) -> bool {
    role.eq_ignore_ascii_case(ADMIN)
}

/// The roles a key may be given: those the configuration defines for the routes (the built-in
/// ones and `[roles.*]`) and the admin API's own. Creating a key with any other role is refused,
/// so a typo cannot make a key that every route refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roles {
    /// The roles of the routes, in configuration order (built-in ones first).
    routes: Vec<String>,
}

impl Default for Roles {
    /// The built-in roles only.
    fn default() -> Self {
        Roles::new(DEFAULT_ROLES.iter().map(|(name, _)| (*name).to_owned()))
    }
}

impl Roles {
    /// The route roles of a configuration (built-in ones included, as configured).
    pub fn new(routes: impl IntoIterator<Item = String>) -> Self {
        Roles {
            routes: routes.into_iter().collect(),
        }
    }

    /// Whether a key may be given `role`.
    pub fn contains(&self, role: &str) -> bool {
        self.routes.iter().any(|r| r == role) || API_ROLES.iter().any(|(r, ..)| *r == role)
    }

    /// Every known role, route roles first, each once.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.routes.iter().map(String::as_str).collect();
        for (api, ..) in API_ROLES {
            if !names.contains(&api) {
                names.push(api);
            }
        }
        names
    }

    /// The known roles for an error message: each with where it applies, e.g. `admin (routes
    /// and the admin API: manages records), member, readonly, admin-readonly (admin API only:
    /// lists and shows records)`.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .names()
            .into_iter()
            .map(|name| {
                let on_routes = self.routes.iter().any(|r| r == name);
                match API_ROLES.iter().find(|(r, ..)| *r == name) {
                    Some((_, _, does)) if on_routes => {
                        format!("{name} (routes and the admin API: {does})")
                    }
                    Some((_, _, does)) => format!("{name} (admin API only: {does})"),
                    None => name.to_owned(),
                }
            })
            .collect();
        parts.join(", ")
    }

    /// Checks a role given for a new key; the message lists the known roles.
    pub fn check(&self, role: &str) -> Result<(), String> {
        if self.contains(role) {
            Ok(())
        } else {
            Err(format!(
                "{role:?} is not a role of this configuration; known roles: {}",
                self.describe()
            ))
        }
    }
}

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
pub fn authorize<'r, U>(
    route: &'r Route<U>,
    identity: &Identity,
    method: &Method,
    tenant: Option<&[u8]>,
) -> Result<&'r Grant, Rejection> {
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
    Ok(grant)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The decision alone, without the grant that made it.
    fn authorize<U>(
        route: &Route<U>,
        identity: &Identity,
        method: &Method,
        tenant: Option<&[u8]>,
    ) -> Result<(), Rejection> {
        super::authorize(route, identity, method, tenant).map(drop)
    }
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
                    rate_limit: None,
                })
                .collect(),
            tenant: TenantFrom::Unbound,
            rate_limit: None,
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
    fn known_roles_are_the_configured_ones_and_the_admin_apis() {
        let roles = Roles::default();
        for r in ["admin", "member", "readonly", "admin-readonly"] {
            assert!(roles.check(r).is_ok(), "{r}");
        }
        let err = roles.check("adimn").unwrap_err();
        assert!(err.starts_with("\"adimn\" is not a role"), "{err}");
        assert!(err.contains("admin-readonly (admin API only"), "{err}");
        assert!(err.contains("admin (routes and the admin API"), "{err}");
        let custom = Roles::new(["admin", "member", "readonly", "deployer"].map(String::from));
        assert!(custom.check("deployer").is_ok());
        assert!(Roles::default().check("deployer").is_err());
        assert_eq!(
            custom.names(),
            ["admin", "member", "readonly", "deployer", "admin-readonly"]
        );
    }

    #[test]
    fn the_admin_api_admits_admin_for_everything_and_admin_readonly_for_reads() {
        use ApiAccess::{Manage, Read};
        assert!(admin_api_allows("admin", Read));
        assert!(admin_api_allows("admin", Manage));
        assert!(admin_api_allows("admin-readonly", Read));
        assert!(!admin_api_allows("admin-readonly", Manage));
        for role in [
            "member",
            "readonly",
            "deployer",
            "Admin",
            "ADMIN-READONLY",
            " admin",
            "",
        ] {
            assert!(!admin_api_allows(role, Read), "{role:?}");
            assert!(!admin_api_allows(role, Manage), "{role:?}");
        }
    }

    #[test]
    fn the_organization_admin_role_is_recognised_in_any_case() {
        for role in ["admin", "Admin", "ADMIN"] {
            assert!(is_organization_admin(role), "{role}");
        }
        for role in ["admin-readonly", "member", "admins", ""] {
            assert!(!is_organization_admin(role), "{role}");
        }
    }

    #[test]
    fn permission_sets_are_named() {
        assert_eq!(permission_set("all"), Some(MethodSet::ALL));
        assert_eq!(permission_set("read"), Some(MethodSet::READ));
        assert_eq!(permission_set("write"), None);
    }
}
