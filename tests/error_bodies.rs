//! Every error keygate answers, on either listener, has one shape: `Content-Type:
//! application/json` and exactly `{"error":"<code>","message":"<human text>"}`, byte for byte
//! the compact form of those two fields; and every `405` names the allowed methods in `Allow`,
//! the same ones its message names. Real Redis, keygate in-process, a real HTTP client.

mod common;

use common::*;
use serde_json::Value;

/// Checks one error answer's shape; returns its code.
fn assert_error_shape(what: &str, reply: &Reply) -> String {
    assert!(
        reply.status.is_client_error() || reply.status.is_server_error(),
        "{what}: {}",
        reply.status
    );
    assert_eq!(
        reply.headers.get("content-type").map(|v| v.as_bytes()),
        Some(&b"application/json"[..]),
        "{what}"
    );
    let v = reply.json();
    let fields = v.as_object().unwrap_or_else(|| panic!("{what}: {v}"));
    let keys: Vec<&str> = fields.keys().map(String::as_str).collect();
    assert_eq!(keys, ["error", "message"], "{what}: {}", reply.text());
    let code = v["error"].as_str().unwrap_or_default();
    let message = v["message"].as_str().unwrap_or_default();
    assert!(!code.is_empty() && !message.is_empty(), "{what}: {v}");
    // One format: the compact serialisation of the two fields, in this order.
    let compact = format!(
        "{{\"error\":{},\"message\":{}}}",
        Value::from(code),
        Value::from(message)
    );
    assert_eq!(reply.text(), compact, "{what}");
    if reply.status == 405 {
        let allow = reply
            .headers
            .get("allow")
            .unwrap_or_else(|| panic!("{what}: a 405 without Allow"))
            .to_str()
            .unwrap()
            .to_owned();
        let methods: Vec<&str> = allow.split(", ").collect();
        assert!(!methods.is_empty(), "{what}");
        for m in &methods {
            assert!(message.contains(m), "{what}: {message:?} does not name {m}");
        }
    }
    code.to_owned()
}

/// One request that must be refused.
struct Case<'a> {
    what: &'a str,
    method: &'a str,
    url: String,
    /// The `Authorization` header, if any.
    auth: Option<&'a str>,
    body: &'a str,
    status: u16,
    /// The `Allow` header expected (a 405's).
    allow: Option<&'a str>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_of_either_listener_is_one_json_shape_and_every_405_says_allow() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace("errors");
    let store = redis_store(&redis, &ns);
    let kg = Keygate::start(test_config(&redis.url(), &ns, &upstream.url())).await;
    kg.wait_ready().await;
    let admin = create_key(&*store, "keygate", "admin").await;
    let reader = create_key(&*store, "keygate", "admin-readonly").await;
    let (admin, reader) = (
        format!("Bearer {}", admin.secret.expose()),
        format!("Bearer {}", reader.secret.expose()),
    );
    let http = Http::new();
    let json = ("content-type", "application/json");

    let cases = [
        Case {
            what: "proxy: no key",
            method: "GET",
            url: kg.url("/"),
            auth: None,
            body: "",
            status: 401,
            allow: None,
        },
        Case {
            what: "proxy: malformed key",
            method: "GET",
            url: kg.url("/"),
            auth: Some("Bearer nope"),
            body: "",
            status: 401,
            allow: None,
        },
        Case {
            what: "admin: unknown path",
            method: "GET",
            url: kg.admin_url("/nope"),
            auth: None,
            body: "",
            status: 404,
            allow: None,
        },
        Case {
            what: "admin: POST a probe",
            method: "POST",
            url: kg.admin_url("/healthz"),
            auth: None,
            body: "",
            status: 405,
            allow: Some("GET, HEAD"),
        },
        Case {
            what: "api: no key",
            method: "GET",
            url: kg.admin_url("/v1/keys"),
            auth: None,
            body: "",
            status: 401,
            allow: None,
        },
        Case {
            what: "api: unknown endpoint",
            method: "GET",
            url: kg.admin_url("/v1/nothing"),
            auth: Some(&admin),
            body: "",
            status: 404,
            allow: None,
        },
        Case {
            what: "api: PUT a collection",
            method: "PUT",
            url: kg.admin_url("/v1/keys"),
            auth: Some(&admin),
            body: "",
            status: 405,
            allow: Some("GET, POST"),
        },
        Case {
            what: "api: GET an action",
            method: "GET",
            url: kg.admin_url("/v1/keys/key_x/revoke"),
            auth: Some(&admin),
            body: "",
            status: 405,
            allow: Some("POST"),
        },
        Case {
            what: "api: POST a record",
            method: "POST",
            url: kg.admin_url("/v1/service-accounts/sa_x"),
            auth: Some(&admin),
            body: "",
            status: 405,
            allow: Some("GET, DELETE"),
        },
        Case {
            what: "api: bad body",
            method: "POST",
            url: kg.admin_url("/v1/keys"),
            auth: Some(&admin),
            body: "{\"role\": 5, \"message\": \"\\\"quoted\\\"\"}",
            status: 400,
            allow: None,
        },
        Case {
            what: "api: unknown record",
            method: "GET",
            url: kg.admin_url("/v1/keys/key_missing"),
            auth: Some(&admin),
            body: "",
            status: 404,
            allow: None,
        },
        Case {
            what: "api: a read-only key mutates",
            method: "POST",
            url: kg.admin_url("/v1/keys"),
            auth: Some(&reader),
            body: "{}",
            status: 403,
            allow: None,
        },
    ];
    for Case {
        what,
        method,
        url,
        auth,
        body,
        status,
        allow,
    } in cases
    {
        let mut headers = vec![json];
        if let Some(a) = auth {
            headers.push(("authorization", a));
        }
        let reply = http
            .request_body(method, &url, &headers, body.as_bytes().to_vec())
            .await;
        assert_eq!(reply.status, status, "{what}: {}", reply.text());
        assert_error_shape(what, &reply);
        assert_eq!(
            reply.headers.get("allow").map(|v| v.to_str().unwrap()),
            allow,
            "{what}"
        );
    }
}
