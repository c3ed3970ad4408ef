//! The messages of Envoy's `envoy.service.auth.v3.Authorization/Check`, declared by hand for
//! the fields keygate reads and writes, with the field numbers of the v3 protos:
//! `envoy/service/auth/v3/external_auth.proto` and `attribute_context.proto`,
//! `envoy/config/core/v3/base.proto` (`HeaderValueOption`, `HeaderValue`, `HeaderMap`),
//! `envoy/type/v3/http_status.proto` and `google/rpc/status.proto`. Fields not declared here
//! are skipped when decoding (as protobuf requires) and never written.

use std::collections::HashMap;

/// `envoy.service.auth.v3.CheckRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckRequest {
    /// `attributes = 1`.
    #[prost(message, optional, tag = "1")]
    pub attributes: Option<AttributeContext>,
}

/// `envoy.service.auth.v3.AttributeContext`: of its fields only `request = 4`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AttributeContext {
    /// `request = 4`.
    #[prost(message, optional, tag = "4")]
    pub request: Option<AttributeRequest>,
}

/// `envoy.service.auth.v3.AttributeContext.Request`: of its fields only `http = 2`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AttributeRequest {
    /// `http = 2`.
    #[prost(message, optional, tag = "2")]
    pub http: Option<HttpRequest>,
}

/// `envoy.service.auth.v3.AttributeContext.HttpRequest`: the original request's head.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpRequest {
    /// `id = 1`: the request id Envoy gave the request (also its `x-request-id` header).
    #[prost(string, tag = "1")]
    pub id: String,
    /// `method = 2`.
    #[prost(string, tag = "2")]
    pub method: String,
    /// `headers = 3`: lowercase names, repeated headers merged with `,`.
    #[prost(map = "string, string", tag = "3")]
    pub headers: HashMap<String, String>,
    /// `path = 4`: the request target, path and query, undecoded.
    #[prost(string, tag = "4")]
    pub path: String,
    /// `host = 5`: `Host` or `:authority`.
    #[prost(string, tag = "5")]
    pub host: String,
    /// `header_map = 13`: instead of `headers` under Envoy's `encode_raw_headers`, one entry
    /// per header line, the value in `raw_value`.
    #[prost(message, optional, tag = "13")]
    pub header_map: Option<HeaderMap>,
}

/// `envoy.config.core.v3.HeaderMap`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderMap {
    /// `headers = 1`.
    #[prost(message, repeated, tag = "1")]
    pub headers: Vec<HeaderValue>,
}

/// `envoy.config.core.v3.HeaderValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderValue {
    /// `key = 1`.
    #[prost(string, tag = "1")]
    pub key: String,
    /// `value = 2`.
    #[prost(string, tag = "2")]
    pub value: String,
    /// `raw_value = 3`.
    #[prost(bytes = "vec", tag = "3")]
    pub raw_value: Vec<u8>,
}

/// `envoy.config.core.v3.HeaderValueOption`: of its fields `header = 1` and
/// `append_action = 3` (the deprecated `append = 2` is left unset).
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderValueOption {
    /// `header = 1`.
    #[prost(message, optional, tag = "1")]
    pub header: Option<HeaderValue>,
    /// `append_action = 3`, a `HeaderAppendAction`.
    #[prost(int32, tag = "3")]
    pub append_action: i32,
}

/// `HeaderValueOption.HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD`: the header replaces any
/// of its name.
pub const OVERWRITE_IF_EXISTS_OR_ADD: i32 = 2;

/// `envoy.service.auth.v3.CheckResponse`: of its fields `status = 1` and the `http_response`
/// oneof.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckResponse {
    /// `status = 1`: `OK` allows the request, any other code refuses it.
    #[prost(message, optional, tag = "1")]
    pub status: Option<Status>,
    /// `denied_response = 2` or `ok_response = 3`.
    #[prost(oneof = "HttpResponse", tags = "2, 3")]
    pub http_response: Option<HttpResponse>,
}

/// `CheckResponse.http_response`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum HttpResponse {
    /// `denied_response = 2`.
    #[prost(message, tag = "2")]
    DeniedResponse(DeniedHttpResponse),
    /// `ok_response = 3`.
    #[prost(message, tag = "3")]
    OkResponse(OkHttpResponse),
}

/// `envoy.service.auth.v3.DeniedHttpResponse`: what Envoy answers its client.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeniedHttpResponse {
    /// `status = 1`.
    #[prost(message, optional, tag = "1")]
    pub status: Option<HttpStatus>,
    /// `headers = 2`.
    #[prost(message, repeated, tag = "2")]
    pub headers: Vec<HeaderValueOption>,
    /// `body = 3`.
    #[prost(string, tag = "3")]
    pub body: String,
}

/// `envoy.service.auth.v3.OkHttpResponse`: of its fields `headers = 2` and
/// `headers_to_remove = 5`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OkHttpResponse {
    /// `headers = 2`: set on the request Envoy forwards.
    #[prost(message, repeated, tag = "2")]
    pub headers: Vec<HeaderValueOption>,
    /// `headers_to_remove = 5`: removed from it.
    #[prost(string, repeated, tag = "5")]
    pub headers_to_remove: Vec<String>,
}

/// `envoy.type.v3.HttpStatus`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpStatus {
    /// `code = 1`, a `StatusCode` (whose values are the HTTP codes).
    #[prost(int32, tag = "1")]
    pub code: i32,
}

/// `google.rpc.Status`: of its fields `code = 1` and `message = 2`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Status {
    /// `code = 1`, a `google.rpc.Code`.
    #[prost(int32, tag = "1")]
    pub code: i32,
    /// `message = 2`.
    #[prost(string, tag = "2")]
    pub message: String,
}
