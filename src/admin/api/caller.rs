//! Who is calling the management API, whether its role allows the operation, and which
//! tenants' records it may see and change.
//!
//! The key is verified by the proxy's own verifier, so a key the proxy refuses (expired,
//! revoked, unknown) is refused here with the same answer. What a role may do is the policy
//! module's alone ([`policy::admin_api_allows`]). A caller sees its own tenant's records, or
//! every tenant's if its tenant is the operator tenant; the handlers report others' records
//! absent (`404`), and refuse (`403`) a list of or a write into a tenant it may not see.

use http::HeaderMap;

use super::error::Failure;
use super::{Access, Admin};
use crate::identity::Identity;
use crate::manage;
use crate::policy;
use crate::rejection::Rejection;
use crate::store::Store;

/// An authenticated caller.
pub(super) struct Caller {
    identity: Identity,
    /// Its keys belong to the operator tenant: it manages every tenant.
    operator: bool,
}

impl Caller {
    /// Verifies the call's bearer key, as the proxy would.
    pub(super) async fn authenticate(
        admin: &Admin,
        headers: &HeaderMap,
        now: u64,
    ) -> Result<Caller, Failure> {
        let identity = crate::auth::check(&admin.app.verifier, headers, now).await?;
        Ok(Caller::new(identity, &admin.operator_tenant))
    }

    fn new(identity: Identity, operator_tenant: &str) -> Caller {
        Caller {
            operator: identity.tenant() == operator_tenant,
            identity,
        }
    }

    /// Refuses the call unless the caller's role allows `access`. A refused change is
    /// recorded in the audit trail (the path's `id` as its target) under the caller's tenant.
    pub(super) async fn authorize(
        &self,
        store: &dyn Store,
        access: Access,
        id: Option<&str>,
        now: u64,
    ) -> Result<(), Failure> {
        if policy::admin_api_allows(self.identity.role(), access.needs()) {
            return Ok(());
        }
        if let Access::Mutate(action) = access {
            let (actor, tenant) = (self.actor(), self.identity.tenant());
            manage::audit_denied(store, actor, action, id.unwrap_or("-"), tenant, now).await;
        }
        Err(Rejection::InsufficientScope.into())
    }

    /// The caller's audit name: its key id.
    pub(super) fn actor(&self) -> &str {
        self.identity.key_id()
    }

    /// The caller's own tenant, where a new record goes unless the call names one.
    pub(super) fn tenant(&self) -> &str {
        self.identity.tenant()
    }

    /// Whether the caller is an operator, which sees and manages every tenant.
    pub(super) fn sees_every_tenant(&self) -> bool {
        self.operator
    }

    /// Whether the caller may see and manage `tenant`'s records.
    pub(super) fn sees(&self, tenant: &str) -> bool {
        self.operator || self.identity.tenant() == tenant
    }

    /// The tenant a list is restricted to: the one asked for, if the caller may see it;
    /// otherwise the caller's own, or none (every tenant) for an operator.
    pub(super) fn list_tenant(&self, asked: Option<String>) -> Result<Option<String>, Failure> {
        match asked {
            Some(t) if !self.sees(&t) => Err(Rejection::InsufficientScope.into()),
            Some(t) => Ok(Some(t)),
            None if self.operator => Ok(None),
            None => Ok(Some(self.identity.tenant().to_string())),
        }
    }

    /// Refuses a write into a tenant the caller may not manage.
    pub(super) fn may_write(&self, tenant: &str) -> Result<(), Failure> {
        if self.sees(tenant) {
            Ok(())
        } else {
            Err(Rejection::InsufficientScope.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyDigest;
    use crate::store::KeyRecord;

    fn caller(tenant: &str) -> Caller {
        let identity = Identity::from_record(&KeyRecord {
            tenant: tenant.into(),
            ..KeyRecord::example(KeyDigest([0; 32]))
        })
        .unwrap();
        Caller::new(identity, "keygate")
    }

    fn refused<T>(r: Result<T, Failure>) -> bool {
        matches!(r, Err(Failure::Rejected(Rejection::InsufficientScope)))
    }

    #[test]
    fn a_tenant_admin_sees_and_writes_its_own_tenant_only() {
        let acme = caller("acme");
        assert!(acme.sees("acme") && !acme.sees("other") && !acme.sees("ACME"));
        assert!(!acme.sees_every_tenant());
        assert!(acme.may_write("acme").is_ok());
        assert!(refused(acme.may_write("other")));
        assert_eq!(acme.list_tenant(None).ok(), Some(Some("acme".into())));
        assert_eq!(
            acme.list_tenant(Some("acme".into())).ok(),
            Some(Some("acme".into()))
        );
        assert!(refused(acme.list_tenant(Some("other".into()))));
    }

    #[test]
    fn an_operator_sees_every_tenant() {
        let op = caller("keygate");
        assert!(op.sees("acme") && op.sees("keygate") && op.sees_every_tenant());
        assert!(op.may_write("acme").is_ok());
        assert_eq!(op.list_tenant(None).ok(), Some(None), "every tenant");
        assert_eq!(
            op.list_tenant(Some("acme".into())).ok(),
            Some(Some("acme".into()))
        );
    }
}
