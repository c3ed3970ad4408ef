//! How a management API call fails, and the one place a failure becomes a response. The body
//! is always [`crate::rejection::error_body`]'s, as on the proxy; a refusal of the request
//! path's own kind (no key, a bad one, a role that may not) answers exactly as the proxy would.

use http::StatusCode;

use super::Resp;
use crate::manage::ManageError;
use crate::rejection::{self, Rejection};
use crate::store::StoreError;

/// A refused or failed API call, with its status, stable code and human text.
#[derive(Debug)]
pub(super) struct ApiError {
    pub(super) status: StatusCode,
    code: &'static str,
    pub(super) message: String,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// `400 invalid_request`.
    pub(super) fn bad(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// `404`: no record the caller may see of that kind with that id.
    pub(super) fn not_found(kind: &str, id: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no {kind} with id {id}"),
        )
    }
}

impl From<ManageError> for ApiError {
    fn from(e: ManageError) -> Self {
        let status = match &e {
            ManageError::Invalid { .. } => StatusCode::BAD_REQUEST,
            ManageError::NotFound { .. } => StatusCode::NOT_FOUND,
            ManageError::Store(StoreError::Conflict(_)) => StatusCode::CONFLICT,
            ManageError::Store(err) => {
                tracing::warn!(error = %err, "management API: store failed");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        let message = match &e {
            ManageError::Store(StoreError::Unavailable(_) | StoreError::Corrupt(_)) => {
                "the key store is unavailable; retry later".to_owned()
            }
            ManageError::Store(StoreError::Conflict(m)) => m.clone(),
            other => other.to_string(),
        };
        ApiError::new(status, e.code(), message)
    }
}

/// Every way a call can end without its handler's answer.
pub(super) enum Failure {
    /// An error of the API's own.
    Api(ApiError),
    /// A refusal of the request path's kind (401, 403, 503).
    Rejected(Rejection),
    /// The path exists, with these methods only.
    MethodNotAllowed(Vec<&'static str>),
}

impl Failure {
    /// The response: the one mapping of every failure of the API.
    pub(super) fn into_response(self) -> Resp {
        match self {
            Failure::Api(e) => rejection::error_response(e.status, e.code, &e.message),
            Failure::Rejected(r) => r.into_response(),
            Failure::MethodNotAllowed(allowed) => rejection::method_not_allowed(&allowed),
        }
    }
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Failure::Api(e)
    }
}

impl From<ManageError> for Failure {
    fn from(e: ManageError) -> Self {
        Failure::Api(e.into())
    }
}

impl From<Rejection> for Failure {
    fn from(r: Rejection) -> Self {
        Failure::Rejected(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{ALLOW, RETRY_AFTER, WWW_AUTHENTICATE};

    #[test]
    fn store_failures_are_503_with_retry_after_and_no_detail() {
        let e = ManageError::Store(StoreError::Unavailable("redis at 10.0.0.1 down".into()));
        let resp = Failure::from(e).into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[RETRY_AFTER], "1");
        let conflict = ManageError::Store(StoreError::Conflict("name taken".into()));
        assert_eq!(
            Failure::from(conflict).into_response().status(),
            StatusCode::CONFLICT
        );
    }

    #[test]
    fn refusals_answer_as_the_proxy_does() {
        let resp = Failure::from(Rejection::MissingCredentials).into_response();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert!(resp.headers().contains_key(WWW_AUTHENTICATE));
        let resp = Failure::MethodNotAllowed(vec!["GET", "POST"]).into_response();
        assert_eq!(resp.headers()[ALLOW], "GET, POST");
    }
}
