//! The management API on the admin listener, end to end: real Redis, keygate in-process, a
//! real HTTP client, and the proxy serving the keys the API manages.

mod common;

use std::time::Duration;

use common::*;
use keygate::config::RoleConfig;
use serde_json::{json, Value};

struct Rig {
    redis: RedisServer,
    upstream: Upstream,
    ns: String,
    kg: Keygate,
    http: Http,
    /// Every plaintext key this test saw, to prove none is ever shown again.
    secrets: Vec<String>,
    /// Every response body, to search for the secrets.
    seen: String,
}

impl Rig {
    async fn start(tag: &str) -> Self {
        let redis = RedisServer::start();
        let upstream = Upstream::start().await;
        let ns = namespace(tag);
        let mut config = test_config(&redis.url(), &ns, &upstream.url());
        config.cache.ttl = "1h".into();
        // No last-used write during a test: "wrote nothing" compares every stored value.
        config.store.last_used_interval = "1h".into();
        // A role of the configuration beside the built-in ones.
        config.roles.insert(
            "deployer".into(),
            RoleConfig {
                methods: Some(vec!["GET".into(), "POST".into()]),
                permissions: None,
                rate_limit: None,
            },
        );
        let kg = Keygate::start(config).await;
        kg.wait_ready().await;
        Rig {
            redis,
            upstream,
            ns,
            kg,
            http: Http::new(),
            secrets: Vec::new(),
            seen: String::new(),
        }
    }

    /// A user key made by the CLI (as an operator bootstraps the API).
    fn cli_key(&mut self, tenant: &str, role: &str) -> String {
        let v = keygate_json(
            &self.redis.url(),
            &self.ns,
            &[
                "keys",
                "create",
                "--tenant",
                tenant,
                "--role",
                role,
                "--name",
                "bootstrap",
            ],
        );
        let key = v["key"].as_str().unwrap().to_owned();
        self.secrets.push(key.clone());
        key
    }

    async fn call(&mut self, method: &str, path: &str, key: Option<&str>, body: &str) -> Reply {
        let auth = key.map(|k| format!("Bearer {k}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(a) = &auth {
            headers.push(("authorization", a));
        }
        let reply = self
            .http
            .request_body(
                method,
                &self.kg.admin_url(path),
                &headers,
                body.as_bytes().to_vec(),
            )
            .await;
        // The one place a key may appear is the `key` field of the answer that created it;
        // everything else of every answer is searched for keys later.
        let mut v = reply.json();
        if let Some(k) = v.get("key").and_then(Value::as_str) {
            self.secrets.push(k.to_owned());
        }
        if let Some(o) = v.as_object_mut() {
            o.remove("key");
        }
        self.seen.push_str(&v.to_string());
        self.seen.push('\n');
        reply
    }

    async fn ok(&mut self, method: &str, path: &str, key: &str, body: Value) -> Value {
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        let reply = self.call(method, path, Some(key), &body).await;
        assert!(
            reply.status.is_success(),
            "{method} {path}: {} {}",
            reply.status,
            reply.text()
        );
        reply.json()
    }

    async fn proxy_status(&self, key: &str) -> u16 {
        self.http
            .get_with_key(&self.kg.url("/"), key)
            .await
            .status
            .as_u16()
    }

    async fn proxy_becomes(&self, key: &str, want: u16, what: &str) {
        let (http, url, key) = (self.http.clone(), self.kg.url("/"), key.to_owned());
        eventually(Duration::from_secs(3), what, || {
            let (http, url, key) = (http.clone(), url.clone(), key.clone());
            async move { http.get_with_key(&url, &key).await.status == want }
        })
        .await;
    }

    /// No key this test saw appears in any response or any Redis value.
    fn assert_no_key_leaked(&self) {
        let dump = dump_redis(&self.redis, &self.ns);
        assert!(dump.contains(":audit"), "the dump is read");
        for s in &self.secrets {
            assert!(!self.seen.contains(s.as_str()), "a key was shown again");
            assert!(!dump.contains(&s[4..]), "a key is stored in Redis");
        }
    }

    /// Every stored value but the audit stream, to prove a refused request wrote nothing.
    fn records(&self) -> Vec<String> {
        let audit = format!("{}:audit ", self.ns);
        let mut lines: Vec<String> = dump_redis(&self.redis, &self.ns)
            .lines()
            .filter(|l| !l.starts_with(&audit))
            .map(str::to_owned)
            .collect();
        lines.sort();
        assert!(!lines.is_empty(), "the dump is read");
        lines
    }

    /// The audit entries an operator key sees.
    async fn audit(&mut self, key: &str) -> Vec<Value> {
        let v = self
            .ok("GET", "/v1/audit?limit=1000", key, json!(null))
            .await;
        v["items"].as_array().unwrap().clone()
    }
}

fn str_of(v: &Value, f: &str) -> String {
    v[f].as_str()
        .unwrap_or_else(|| panic!("{f} missing in {v}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutations_need_an_admin_key() {
    let mut rig = Rig::start("api-auth").await;
    let admin = rig.cli_key("acme", "admin");
    let viewer = rig.cli_key("acme", "readonly");
    let readonly = rig.cli_key("acme", "admin-readonly");
    let target = rig
        .ok(
            "POST",
            "/v1/service-accounts",
            &admin,
            json!({"name": "w", "role": "member"}),
        )
        .await;
    let sa = str_of(&target, "id");
    let key_id = str_of(&target, "key_id");

    let mutations = [
        (
            "POST",
            "/v1/keys".to_owned(),
            json!({"role": "x", "name": "n"}),
        ),
        ("POST", format!("/v1/keys/{key_id}/revoke"), json!({})),
        (
            "POST",
            "/v1/service-accounts".into(),
            json!({"name": "n", "role": "r"}),
        ),
        (
            "POST",
            format!("/v1/service-accounts/{sa}/rotate"),
            json!({}),
        ),
        ("DELETE", format!("/v1/service-accounts/{sa}"), json!({})),
    ];
    let before = rig.records();
    for (method, path, body) in &mutations {
        let body = body.to_string();
        let r = rig.call(method, path, None, &body).await;
        assert_eq!(
            (r.status.as_u16(), r.error_code()),
            (401, "missing_credentials".into()),
            "{path}"
        );
        assert!(r.headers.contains_key("www-authenticate"));
        let r = rig.call(method, path, Some("kgu_nonsense"), &body).await;
        assert_eq!(r.status, 401, "{path}");
        for key in [&viewer, &readonly] {
            let r = rig.call(method, path, Some(key), &body).await;
            assert_eq!(
                (r.status.as_u16(), r.error_code()),
                (403, "insufficient_scope".into()),
                "{method} {path}"
            );
        }
    }
    assert_eq!(rig.records(), before, "a refused mutation wrote something");

    // Read-only admins may list and show; other roles may not even read.
    for path in [
        "/v1/keys".to_owned(),
        format!("/v1/keys/{key_id}"),
        "/v1/service-accounts".into(),
        format!("/v1/service-accounts/{sa}"),
        "/v1/audit".into(),
    ] {
        let r = rig.call("GET", &path, Some(&readonly), "").await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        let r = rig.call("GET", &path, Some(&viewer), "").await;
        assert_eq!(r.status, 403, "{path}");
    }
    let audit = rig.ok("GET", "/v1/audit", &admin, json!(null)).await;
    assert!(audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["outcome"] == "insufficient_scope"));
    rig.assert_no_key_leaked();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_accounts_are_managed_through_the_api_within_their_tenant() {
    let mut rig = Rig::start("api-flow").await;
    let operator = rig.cli_key("keygate", "admin");
    let acme = rig.cli_key("acme", "admin");

    // The operator works in any tenant; a tenant admin only in its own.
    let g = rig
        .ok(
            "POST",
            "/v1/service-accounts",
            &operator,
            json!({"tenant": "globex", "name": "Builder", "role": "member", "expires_in": "30d"}),
        )
        .await;
    let r = rig
        .call(
            "POST",
            "/v1/service-accounts",
            Some(&acme),
            &json!({"tenant": "globex", "name": "sneaky", "role": "member"}).to_string(),
        )
        .await;
    assert_eq!(r.status, 403);
    let gid = str_of(&g, "id");
    let r = rig
        .call(
            "GET",
            &format!("/v1/service-accounts/{gid}"),
            Some(&acme),
            "",
        )
        .await;
    assert_eq!(r.status, 404, "another tenant's account is invisible");
    let r = rig
        .call(
            "DELETE",
            &format!("/v1/service-accounts/{gid}"),
            Some(&acme),
            "",
        )
        .await;
    assert_eq!(r.status, 404);
    let r = rig
        .call("GET", "/v1/service-accounts?tenant=globex", Some(&acme), "")
        .await;
    assert_eq!(r.status, 403);

    let a = rig
        .ok(
            "POST",
            "/v1/service-accounts",
            &acme,
            json!({"name": "Deployer", "role": "member", "never_expire": true}),
        )
        .await;
    assert_eq!(a["tenant"], "acme");
    assert_eq!(a["expires_at"], Value::Null);
    let (aid, first) = (str_of(&a, "id"), str_of(&a, "key"));
    assert!(first.starts_with("kgs_"));
    assert_eq!(rig.proxy_status(&first).await, 200);
    let dup = rig
        .call(
            "POST",
            "/v1/service-accounts",
            Some(&acme),
            &json!({"name": "DEPLOYER", "role": "member"}).to_string(),
        )
        .await;
    assert_eq!(
        (dup.status.as_u16(), dup.error_code()),
        (409, "conflict".into())
    );
    let adm = rig
        .call(
            "POST",
            "/v1/service-accounts",
            Some(&acme),
            &json!({"name": "root", "role": "admin"}).to_string(),
        )
        .await;
    assert_eq!(adm.status, 400);
    assert!(adm.text().contains("organization admin role"));

    let listed = rig
        .ok("GET", "/v1/service-accounts", &acme, json!(null))
        .await;
    let items = listed["items"].as_array().unwrap();
    assert_eq!(
        items.len(),
        1,
        "a tenant admin lists its own tenant: {listed}"
    );
    let all = rig
        .ok(
            "GET",
            "/v1/service-accounts?limit=1",
            &operator,
            json!(null),
        )
        .await;
    assert_eq!(all["items"].as_array().unwrap().len(), 1);
    let cursor = str_of(&all, "next_cursor");
    let rest = rig
        .ok(
            "GET",
            &format!("/v1/service-accounts?limit=1&cursor={cursor}"),
            &operator,
            json!(null),
        )
        .await;
    assert_eq!(rest["items"].as_array().unwrap().len(), 1);
    assert_eq!(rest["next_cursor"], Value::Null);

    let rotated = rig
        .ok(
            "POST",
            &format!("/v1/service-accounts/{aid}/rotate"),
            &acme,
            json!({"grace": "1s"}),
        )
        .await;
    let second = str_of(&rotated, "key");
    assert_eq!(rig.proxy_status(&second).await, 200);
    rig.proxy_becomes(&first, 401, "the old key stops after the grace")
        .await;
    let rotated = rig
        .ok(
            "POST",
            &format!("/v1/service-accounts/{aid}/rotate"),
            &acme,
            json!({}),
        )
        .await;
    let third = str_of(&rotated, "key");
    rig.proxy_becomes(&second, 401, "the old key stops at once")
        .await;
    assert_eq!(rig.proxy_status(&third).await, 200);
    let shown = rig
        .ok(
            "GET",
            &format!("/v1/service-accounts/{aid}"),
            &acme,
            json!(null),
        )
        .await;
    assert_eq!(shown["keys"].as_array().unwrap().len(), 3);

    let u = rig
        .ok(
            "POST",
            "/v1/keys",
            &acme,
            json!({"role": "readonly", "name": "alice's"}),
        )
        .await;
    let ukey = str_of(&u, "key");
    assert_eq!(rig.proxy_status(&ukey).await, 200);
    rig.ok(
        "POST",
        &format!("/v1/keys/{}/revoke", str_of(&u, "id")),
        &acme,
        json!({}),
    )
    .await;
    rig.proxy_becomes(&ukey, 401, "a revoked key is rejected")
        .await;

    rig.ok(
        "DELETE",
        &format!("/v1/service-accounts/{aid}"),
        &acme,
        json!(null),
    )
    .await;
    rig.proxy_becomes(&third, 401, "a removed account's key is rejected")
        .await;

    let keys = rig.ok("GET", "/v1/keys", &acme, json!(null)).await;
    assert!(keys["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["tenant"] == "acme"));
    let audit = rig.ok("GET", "/v1/audit", &operator, json!(null)).await;
    let acme_key_id = keys["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "bootstrap")
        .unwrap()["id"]
        .clone();
    assert!(audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["action"] == "service_accounts.remove"
            && e["actor"] == acme_key_id
            && e["outcome"] == "success"));
    rig.assert_no_key_leaked();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_every_endpoint_is_a_4xx_json_error_and_writes_nothing() {
    let mut rig = Rig::start("api-bad").await;
    let admin = rig.cli_key("keygate", "admin");
    let sa = rig
        .ok(
            "POST",
            "/v1/service-accounts",
            &admin,
            json!({"tenant": "acme", "name": "x", "role": "member"}),
        )
        .await;
    let (sa, kid) = (str_of(&sa, "id"), str_of(&sa, "key_id"));
    let huge = "n".repeat(10_000);
    let bodies_create_key = [
        json!({"role": 5, "name": "n"}).to_string(),
        json!({"role": "r", "name": huge}).to_string(),
        json!({"role": "r", "name": "n", "extra": 1}).to_string(),
        json!({"role": "r", "name": "n", "expires_at": "tomorrow"}).to_string(),
        json!({"role": "r", "name": "n", "expires_in": "-5"}).to_string(),
        json!({"role": "r", "name": "n", "expires_at": "2001-01-01T00:00:00Z"}).to_string(),
        json!({"role": "r", "name": "n", "tenant": "a b"}).to_string(),
        json!({"role": "r b", "name": "n"}).to_string(),
        json!({"role": "r", "name": "n", "subject": "x\ny"}).to_string(),
        json!([1, 2]).to_string(),
        "{".into(),
        "".into(),
        format!("{{\"role\": \"r\", \"name\": \"{}\"}}", "x".repeat(70_000)),
    ];
    let bodies_create_sa = [
        json!({"role": "r", "name": 1}).to_string(),
        json!({"role": "r", "name": huge}).to_string(),
        json!({"role": "r", "name": "n", "never_expire": "yes"}).to_string(),
        json!({"role": "r", "name": "n", "never_expire": true, "expires_in": "1d"}).to_string(),
        json!({"role": "r", "name": "n", "expires_at": "2030-13-01T00:00:00Z"}).to_string(),
        json!({"role": "admin", "name": "n"}).to_string(),
        json!({"role": "r", "name": "n", "unknown": null}).to_string(),
        "null".into(),
    ];
    let bodies_rotate = [
        json!({"grace": "forever"}).to_string(),
        json!({"grace": 5}).to_string(),
        json!({"grace": "400d"}).to_string(),
        json!({"expires_at": "yesterday"}).to_string(),
        json!({"expires_in": "1d", "expires_at": "2030-01-01T00:00:00Z"}).to_string(),
        json!({"key": "x"}).to_string(),
    ];
    let mut cases: Vec<(&str, String, String)> = Vec::new();
    for b in bodies_create_key {
        cases.push(("POST", "/v1/keys".into(), b));
    }
    for b in bodies_create_sa {
        cases.push(("POST", "/v1/service-accounts".into(), b));
    }
    for b in bodies_rotate {
        cases.push(("POST", format!("/v1/service-accounts/{sa}/rotate"), b));
    }
    let bad_ids = ["a%20b", "%00", &"k".repeat(100), "nope"];
    for id in bad_ids {
        cases.push(("GET", format!("/v1/keys/{id}"), String::new()));
        cases.push(("POST", format!("/v1/keys/{id}/revoke"), String::new()));
        cases.push(("GET", format!("/v1/service-accounts/{id}"), String::new()));
        cases.push((
            "POST",
            format!("/v1/service-accounts/{id}/rotate"),
            String::new(),
        ));
        cases.push((
            "DELETE",
            format!("/v1/service-accounts/{id}"),
            String::new(),
        ));
    }
    cases.push((
        "POST",
        format!("/v1/keys/{kid}/revoke"),
        json!({"now": true}).to_string(),
    ));
    cases.push(("DELETE", format!("/v1/service-accounts/{sa}"), "[]".into()));
    for q in [
        "limit=0",
        "limit=abc",
        "limit=100000",
        "cursor=x",
        "cursor=",
        "cursor=-1",
        "limit=+5",
        "tenant=a%20b",
        "foo=1",
    ] {
        cases.push(("GET", format!("/v1/keys?{q}"), String::new()));
        cases.push(("GET", format!("/v1/service-accounts?{q}"), String::new()));
    }
    cases.push(("GET", "/v1/audit?limit=-1".into(), String::new()));
    cases.push(("PUT", "/v1/keys".into(), String::new()));
    cases.push(("GET", "/v1/nothing".into(), String::new()));

    let before = rig.records();
    for (method, path, body) in &cases {
        let r = rig.call(method, path, Some(&admin), body).await;
        assert!(
            r.status.is_client_error(),
            "{method} {path} {:.60}: {} {}",
            body,
            r.status,
            r.text()
        );
        assert!(!r.error_code().is_empty(), "{method} {path}: {}", r.text());
    }
    assert_eq!(rig.records(), before, "a refused request wrote something");
    // The account and its key are untouched.
    let shown = rig
        .ok(
            "GET",
            &format!("/v1/service-accounts/{sa}"),
            &admin,
            json!(null),
        )
        .await;
    assert_eq!(shown["keys"].as_array().unwrap().len(), 1);
    assert_eq!(shown["keys"][0]["revoked_at"], Value::Null);
    rig.assert_no_key_leaked();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_answers_with_a_documented_status() {
    let mut rig = Rig::start("api-doc").await;
    let admin = rig.cli_key("keygate", "admin");
    let doc = rig.call("GET", "/v1/openapi.json", None, "").await;
    assert_eq!(doc.status, 200);
    let doc = doc.json();
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 7);
    let mut checked = 0;
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            if method == "parameters" {
                continue;
            }
            let documented: Vec<u16> = op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .map(|c| c.parse().unwrap())
                .collect();
            let concrete = path.replace("{id}", "sa_missing");
            let method = method.to_uppercase();
            for key in [Some(admin.as_str()), None] {
                if key.is_none() && op["security"] == json!([]) {
                    continue;
                }
                for body in ["", "{}"] {
                    let r = rig.call(&method, &concrete, key, body).await;
                    assert!(
                        documented.contains(&r.status.as_u16()),
                        "{method} {path} answered {} (documented: {documented:?}): {}",
                        r.status,
                        r.text()
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 40, "{checked}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_pasted_where_an_id_belongs_is_refused_without_repeating_it() {
    let mut rig = Rig::start("api-pasted").await;
    let admin = rig.cli_key("keygate", "admin");
    let member = rig.cli_key("acme", "member");
    let created = rig
        .ok(
            "POST",
            "/v1/service-accounts",
            &admin,
            json!({"tenant": "acme", "name": "ci", "role": "member"}),
        )
        .await;
    let account_key = str_of(&created, "key");
    let before = rig.records();
    let audit_before = rig.audit(&admin).await.len();
    for pasted in [&member, &account_key, &admin] {
        for (method, path) in [
            ("GET", format!("/v1/keys/{pasted}")),
            ("POST", format!("/v1/keys/{pasted}/revoke")),
            ("GET", format!("/v1/service-accounts/{pasted}")),
            ("POST", format!("/v1/service-accounts/{pasted}/rotate")),
            ("DELETE", format!("/v1/service-accounts/{pasted}")),
            ("GET", format!("/v1/keys?tenant={pasted}")),
            ("GET", format!("/v1/keys?{pasted}=1")),
        ] {
            let r = rig.call(method, &path, Some(&admin), "").await;
            assert_eq!(r.status, 400, "{method} {}: {}", &path[..12], r.text());
            let message = r.json()["message"].as_str().unwrap().to_owned();
            assert!(message.contains("that is an API key, not a"), "{message}");
        }
        // In a body, too.
        for body in [
            json!({"tenant": pasted, "role": "member", "name": "n"}),
            json!({"role": pasted, "name": "n"}),
            json!({"role": "member", "name": pasted}),
            json!({"role": "member", "name": "n", "subject": pasted}),
            json!({"role": "member", "name": "n", pasted.as_str(): 1}),
        ] {
            let r = rig
                .call("POST", "/v1/keys", Some(&admin), &body.to_string())
                .await;
            assert_eq!(r.status, 400, "{}", r.text());
        }
    }
    assert_eq!(rig.records(), before, "a refused request wrote something");
    let audit = rig.audit(&admin).await;
    assert!(audit.len() > audit_before, "the refusals are audited");
    for e in &audit[audit_before..] {
        assert_eq!(e["target"], "-", "the audit holds what was pasted: {e}");
    }
    // `assert_no_key_leaked` searches every answer, the audit and every stored value.
    rig.assert_no_key_leaked();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_the_configuration_does_not_define_is_refused_with_the_known_ones() {
    let mut rig = Rig::start("api-roles").await;
    let admin = rig.cli_key("keygate", "admin");
    let before = rig.records();
    for (path, body) in [
        ("/v1/keys", json!({"role": "adimn", "name": "n"})),
        ("/v1/keys", json!({"role": "", "name": "n"})),
        (
            "/v1/service-accounts",
            json!({"role": "adimn", "name": "n"}),
        ),
    ] {
        let r = rig
            .call("POST", path, Some(&admin), &body.to_string())
            .await;
        assert_eq!(r.status, 400, "{path} {body}: {}", r.text());
        let message = r.json()["message"].as_str().unwrap().to_owned();
        for known in ["member", "readonly", "deployer", "admin-readonly"] {
            assert!(message.contains(known), "{known} not listed: {message}");
        }
        assert!(message.contains("admin API"), "{message}");
    }
    assert_eq!(rig.records(), before, "a refused request wrote something");
    // A role of the configuration is a role.
    for (path, body) in [
        ("/v1/keys", json!({"role": "deployer", "name": "d"})),
        (
            "/v1/service-accounts",
            json!({"role": "deployer", "name": "d"}),
        ),
        ("/v1/keys", json!({"role": "admin-readonly", "name": "r"})),
    ] {
        rig.ok("POST", path, &admin, body).await;
    }
    rig.assert_no_key_leaked();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_name_body_fields_not_command_line_flags() {
    let mut rig = Rig::start("api-messages").await;
    let admin = rig.cli_key("keygate", "admin");
    for (path, body) in [
        (
            "/v1/keys",
            json!({"role": "member", "name": "n", "expires_in": "1d", "expires_at": "2030-01-01T00:00:00Z"}),
        ),
        (
            "/v1/keys",
            json!({"role": "member", "name": "n", "expires_in": "soon"}),
        ),
        (
            "/v1/service-accounts",
            json!({"role": "member", "name": "n", "never_expire": true, "expires_in": "1d"}),
        ),
    ] {
        let r = rig
            .call("POST", path, Some(&admin), &body.to_string())
            .await;
        assert_eq!(r.status, 400);
        let message = r.json()["message"].as_str().unwrap().to_owned();
        assert!(!message.contains("--"), "{message}");
        assert!(message.contains("expires_in"), "{message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_revoked_key_answers_the_unchanged_record() {
    let mut rig = Rig::start("api-revoke-twice").await;
    let admin = rig.cli_key("keygate", "admin");
    let k = rig
        .ok(
            "POST",
            "/v1/keys",
            &admin,
            json!({"role": "member", "name": "n"}),
        )
        .await;
    let path = format!("/v1/keys/{}/revoke", str_of(&k, "id"));
    let first = rig.ok("POST", &path, &admin, json!({})).await;
    let stored = rig.records();
    let again = rig.ok("POST", &path, &admin, json!({})).await;
    assert_eq!(again, first, "the record is unchanged");
    assert_eq!(rig.records(), stored);
    let audit = rig.audit(&admin).await;
    assert_eq!(audit.last().unwrap()["outcome"], "already_revoked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_admin_can_neither_see_nor_touch_another_tenants_records() {
    let mut rig = Rig::start("api-isolation").await;
    let operator = rig.cli_key("keygate", "admin");
    let acme = rig.cli_key("acme", "admin");
    let acme_reader = rig.cli_key("acme", "admin-readonly");
    // Globex's records, made by the operator.
    let gkey = rig
        .ok(
            "POST",
            "/v1/keys",
            &operator,
            json!({"tenant": "globex", "role": "member", "name": "g"}),
        )
        .await;
    let (gkey_id, gkey_secret) = (str_of(&gkey, "id"), str_of(&gkey, "key"));
    let gsa = rig
        .ok(
            "POST",
            "/v1/service-accounts",
            &operator,
            json!({"tenant": "globex", "name": "builder", "role": "member"}),
        )
        .await;
    let (gsa_id, gsa_secret) = (str_of(&gsa, "id"), str_of(&gsa, "key"));
    // And one of acme's own, so that its views are not empty.
    let own = rig
        .ok(
            "POST",
            "/v1/keys",
            &acme,
            json!({"role": "member", "name": "own"}),
        )
        .await;
    let audit_before = rig.audit(&operator).await.len();
    let before = rig.records();

    for key in [&acme, &acme_reader] {
        for (method, path, want) in [
            ("GET", format!("/v1/keys/{gkey_id}"), 404),
            ("POST", format!("/v1/keys/{gkey_id}/revoke"), 404),
            ("GET", format!("/v1/service-accounts/{gsa_id}"), 404),
            ("POST", format!("/v1/service-accounts/{gsa_id}/rotate"), 404),
            ("DELETE", format!("/v1/service-accounts/{gsa_id}"), 404),
            ("GET", "/v1/keys?tenant=globex".into(), 403),
            ("GET", "/v1/service-accounts?tenant=globex".into(), 403),
        ] {
            let r = rig.call(method, &path, Some(key), "").await;
            // A read-only admin is refused every write before anything is looked up.
            let want = if key == &acme_reader && method != "GET" {
                403
            } else {
                want
            };
            assert_eq!(r.status, want, "{method} {path}: {}", r.text());
            let text = r.text();
            for foreign in [&gkey_id, &gsa_id] {
                if want == 403 {
                    assert!(!text.contains(foreign.as_str()), "{path} names {foreign}");
                }
            }
        }
        // Lists and the audit trail show acme's records only.
        for path in ["/v1/keys", "/v1/service-accounts", "/v1/audit?limit=1000"] {
            let v = rig.ok("GET", path, key, json!(null)).await;
            let items = v["items"].as_array().unwrap();
            assert!(
                items.iter().all(|i| i["tenant"] == "acme"),
                "{path} shows another tenant: {v}"
            );
            // (The audit may name an id acme itself sent in a refused request.)
            if !path.starts_with("/v1/audit") {
                let text = v.to_string();
                assert!(
                    !text.contains(&gkey_id) && !text.contains(&gsa_id),
                    "{path}: {v}"
                );
            }
        }
    }
    let acme_audit = rig.ok("GET", "/v1/audit", &acme, json!(null)).await;
    assert!(
        acme_audit.to_string().contains(&str_of(&own, "id")),
        "acme sees its own entries: {acme_audit}"
    );

    // Not one stored value changed, and globex's keys still work.
    assert_eq!(rig.records(), before, "a refused request wrote something");
    for secret in [&gkey_secret, &gsa_secret] {
        assert_eq!(rig.proxy_status(secret).await, 200);
    }
    // The operator's audit shows the refused writes, each under acme's tenant, none as a
    // change to globex.
    let audit = rig.audit(&operator).await;
    assert!(
        audit[audit_before..]
            .iter()
            .all(|e| e["outcome"] != "success"),
        "{audit:?}"
    );

    // The management API is not on the proxy listener: `/v1/…` there is an ordinary proxied
    // path, authenticated by the proxy and answered by the upstream, and changes nothing.
    let via_proxy = rig
        .http
        .request_body(
            "POST",
            &rig.kg.url("/v1/keys"),
            &[
                ("authorization", &format!("Bearer {operator}")),
                ("content-type", "application/json"),
            ],
            json!({"tenant": "globex", "role": "admin", "name": "x"}).to_string(),
        )
        .await;
    assert_eq!(via_proxy.status, 200);
    assert_eq!(via_proxy.text(), "ok", "the upstream answered, not the API");
    let anonymous = rig.http.get(&rig.kg.url("/v1/openapi.json"), &[]).await;
    assert_eq!(
        anonymous.status, 401,
        "the proxy wants a key for every path"
    );
    let seen = rig.upstream.requests();
    assert!(
        seen.iter().any(|s| s.path == "/v1/keys"),
        "the upstream got it"
    );
    assert_eq!(rig.records(), before, "the proxy's /v1/ wrote something");
    rig.assert_no_key_leaked();
}
