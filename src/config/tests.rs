//! The configuration's loading and compiling, by the errors an operator would read.

use super::*;
use crate::proxy::{IpNet, UnderscoreHeaders};
use crate::route::MethodSet;
use crate::server::Settings;
use std::path::PathBuf;

#[test]
fn workers_default_to_one_per_cpu_and_are_bounded() {
    let mut c = Config::default();
    c.upstream.url = Some("http://127.0.0.1:3000".into());
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(c.serve_settings().unwrap().workers, cpus);
    c.server.workers = 3;
    assert_eq!(c.serve_settings().unwrap().workers, 3);
    c.server.workers = 5000;
    let err = c.serve_settings().unwrap_err().to_string();
    assert!(err.starts_with("server.workers"), "{err}");
}

#[test]
fn header_policies_are_validated_with_their_field() {
    let mut c = Config::default();
    c.upstream.url = Some("http://127.0.0.1:3000".into());
    let s = c.serve_settings().unwrap();
    assert_eq!(s.headers_with_underscores, UnderscoreHeaders::Drop);
    c.server.headers_with_underscores = "reject".into();
    let s = c.serve_settings().unwrap();
    assert_eq!(s.headers_with_underscores, UnderscoreHeaders::Reject);
    c.server.headers_with_underscores = "ignore".into();
    let err = c.serve_settings().unwrap_err().to_string();
    assert!(err.starts_with("server.headers_with_underscores"), "{err}");
    c.server.headers_with_underscores = "allow".into();
    c.identity.header_prefix = "x_auth_".into();
    let err = c.serve_settings().unwrap_err().to_string();
    assert!(err.starts_with("identity.header_prefix"), "{err}");
}

#[test]
fn trusted_proxies_are_ip_networks() {
    let net = |v: &str| IpNet::parse(v).unwrap_or_else(|| panic!("{v}"));
    let ip = |v: &str| v.parse::<std::net::IpAddr>().unwrap();
    assert!(net("10.0.0.0/8").contains(ip("10.255.1.2")));
    assert!(!net("10.0.0.0/8").contains(ip("11.0.0.1")));
    assert!(net("10.0.0.0/8").contains(ip("::ffff:10.0.0.1")));
    assert!(net("192.0.2.7").contains(ip("192.0.2.7")));
    assert!(!net("192.0.2.7").contains(ip("192.0.2.8")));
    assert!(net("0.0.0.0/0").contains(ip("203.0.113.1")));
    assert!(!net("0.0.0.0/0").contains(ip("2001:db8::1")));
    assert!(net("fd00::/8").contains(ip("fd12::1")));
    assert!(!net("fd00::/8").contains(ip("fe80::1")));
    assert!(net("::/0").contains(ip("2001:db8::1")));
    assert!(net("2001:db8::1").contains(ip("2001:db8::1")));
    assert!(net("172.16.0.0/12").contains(ip("172.31.255.255")));
    assert!(!net("172.16.0.0/12").contains(ip("172.32.0.0")));
    for bad in [
        "",
        "10.0.0.0/33",
        "10.1.0.0/8",
        "10.0.0.0/",
        "10.0.0.0/+8",
        "host",
        "fd00::/129",
    ] {
        assert!(IpNet::parse(bad).is_none(), "{bad}");
    }
    let mut c = Config::default();
    c.upstream.url = Some("http://127.0.0.1:3000".into());
    c.server.trusted_proxies = vec!["10.0.0.0/8".into(), "10.1.0.0/8".into()];
    let err = c.serve_settings().unwrap_err().to_string();
    assert!(err.starts_with("server.trusted_proxies[1]"), "{err}");

    // From the environment: a comma-separated list.
    let env = env(&[("KEYGATE__SERVER__TRUSTED_PROXIES", "10.0.0.0/8, fd00::/8")]);
    let c = Config::load(None, env, &[]).unwrap();
    assert_eq!(c.server.trusted_proxies, ["10.0.0.0/8", "fd00::/8"]);
}

#[test]
fn the_startup_dump_masks_the_redis_password() {
    let mut c = Config::default();
    c.store.redis_url = "redis://app:s3cret@redis.internal:6379/2".into();
    let dump = c.redacted_json();
    assert!(!dump.contains("s3cret"), "{dump}");
    assert!(
        dump.contains("redis://app:[redacted]@redis.internal:6379/2"),
        "{dump}"
    );
    assert_eq!(redact_url("redis://:pw@h:1"), "redis://:[redacted]@h:1");
    assert_eq!(redact_url("redis://h:1/0"), "redis://h:1/0");
    assert_eq!(redact_url("not a url"), "not a url");
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn flags_beat_env_beat_file() {
    let dir = std::env::temp_dir().join(format!("keygate-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("k.toml");
    std::fs::write(
        &file,
        "[server]\nlisten = \"127.0.0.1:1\"\nadmin_listen = \"127.0.0.1:2\"\n[store]\nnamespace = \"file\"\n",
    )
    .unwrap();
    let c = Config::load(
        Some(&file),
        env(&[
            ("KEYGATE__SERVER__LISTEN", "127.0.0.1:3"),
            ("KEYGATE__STORE__NAMESPACE", "123"),
            ("KEYGATE__CACHE__CAPACITY", "77"),
            ("OTHER", "x"),
        ]),
        &[("server", "listen", "127.0.0.1:4".into())],
    )
    .unwrap();
    assert_eq!(c.server.listen, "127.0.0.1:4");
    assert_eq!(c.server.admin_listen, "127.0.0.1:2");
    assert_eq!(c.store.namespace, "123");
    assert_eq!(c.cache.capacity, 77);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn origins_are_found_for_a_setting_its_parts_and_its_table() {
    let mut o = Origins::default();
    let file = || Origin::File("k.toml".into());
    o.set("routes[0].roles", file());
    o.set("roles.x-y.methods", Origin::Env("E".into()));
    o.set("roles.x.methods", file());
    o.set("server.listen", Origin::Flag("--listen".into()));
    assert_eq!(o.of("routes[0].roles[1]"), Some(&file()));
    assert_eq!(o.of("roles.x"), Some(&file()), "the table of a setting");
    assert_eq!(
        o.of("server.listen"),
        Some(&Origin::Flag("--listen".into()))
    );
    assert_eq!(o.of("server.admin_listen"), None, "a default has no origin");
    assert_eq!(o.of("routes[1].upstream"), None);
}

/// What a command that compiles the store settings alone (a management command) says about
/// the configuration these sources make: the errors found while loading.
fn load_error(file: Option<&std::path::Path>, vars: &[(&str, &str)]) -> String {
    Config::load(file, env(vars), &[])
        .and_then(|c| c.store_settings())
        .unwrap_err()
        .to_string()
}

#[test]
fn unknown_field_is_named() {
    let err = load_error(None, &[("KEYGATE__SERVER__LISTN", "x")]);
    assert!(err.contains("listn"), "{err}");
    let err = load_error(None, &[("KEYGATE__NOPE__X", "x")]);
    assert!(err.contains("KEYGATE__NOPE__X"), "{err}");
}

#[test]
fn bad_values_name_their_field() {
    let err = load_error(None, &[("KEYGATE__CACHE__CAPACITY", "lots")]);
    assert!(err.contains("KEYGATE__CACHE__CAPACITY"), "{err}");

    let mut c = Config::default();
    assert!(c
        .serve_settings()
        .unwrap_err()
        .to_string()
        .starts_with("upstream.url"));
    c.upstream.url = Some("http://127.0.0.1:3000".into());
    c.cache.negative_ttl = "soon".into();
    let err = c.serve_settings().unwrap_err().to_string();
    assert!(err.starts_with("cache.negative_ttl"), "{err}");
    c.cache.negative_ttl = "1s".into();
    c.store.redis_url = "http://x".into();
    let err = c.serve_settings().unwrap_err().to_string();
    assert!(err.starts_with("store.redis_url"), "{err}");
    c.store.redis_url = "redis://127.0.0.1:1".into();
    c.upstream.url = Some("ftp://x".into());
    let err = c.serve_settings().unwrap_err().to_string();
    assert!(err.starts_with("upstream.url"), "{err}");
}

#[test]
fn file_syntax_errors_name_the_file_and_line() {
    let dir = std::env::temp_dir().join(format!("keygate-cfg2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "[server]\nlisten = \n").unwrap();
    let err = load_error(Some(&file), &[]);
    assert!(err.contains("bad.toml") && err.contains("line 2"), "{err}");
    std::fs::write(&file, "[server]\nlisten = 5\n").unwrap();
    let err = load_error(Some(&file), &[]);
    assert!(err.starts_with("server.listen"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn upstream_base_path_is_kept_without_trailing_slash() {
    let c = Config {
        upstream: UpstreamConfig {
            url: Some("http://127.0.0.1:3000/api/".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let up = c.serve_settings().unwrap().upstream.unwrap();
    assert_eq!(up.base_path, "/api");
    assert_eq!(up.authority.as_str(), "127.0.0.1:3000");
}

fn routes_config(toml_text: &str) -> Result<Settings, ConfigError> {
    let dir = std::env::temp_dir().join(format!(
        "keygate-cfg-routes-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("routes.toml");
    std::fs::write(&file, toml_text).unwrap();
    let loaded = Config::load(Some(&file), Vec::new(), &[]);
    std::fs::remove_dir_all(dir).unwrap();
    loaded?.serve_settings()
}

#[test]
fn routes_and_roles_are_read_from_the_file() {
    let s = routes_config(
        r#"
        [roles.auditor]
        methods = ["GET", "HEAD"]
        [roles.readonly]
        permissions = "all"

        [[routes]]
        path_prefix = "/healthz"
        upstream = "http://127.0.0.1:3001"
        auth = false

        [[routes]]
        name = "admin"
        host = "API.example.com"
        path_prefix = "/admin/"
        upstream = "http://127.0.0.1:3002/base"
        roles = ["admin", "auditor"]
        tenant_from = "header:x-tenant"
        "#,
    )
    .unwrap();
    assert!(s.upstream.is_none());
    let routes: Vec<_> = s.routes.iter().collect();
    assert_eq!(routes.len(), 2);
    // Host-specific first.
    assert_eq!(&*routes[0].name, "admin");
    assert_eq!(routes[0].host.as_deref(), Some("api.example.com"));
    assert_eq!(&*routes[0].prefix, "/admin");
    assert_eq!(routes[0].upstream.base_path, "/base");
    let roles: Vec<_> = routes[0].grants.iter().map(|g| &*g.role).collect();
    assert_eq!(roles, ["admin", "auditor"]);
    assert!(routes[0].binds_tenant());
    assert!(!routes[1].auth);
    // Every role, with `readonly` redefined by the file.
    let readonly = routes[1].grants.iter().find(|g| &*g.role == "readonly");
    assert_eq!(readonly.unwrap().methods, MethodSet::ALL);
}

#[test]
fn the_upstream_url_is_the_last_catch_all_route() {
    let mut c = Config::default();
    c.upstream.url = Some("http://127.0.0.1:3000".into());
    c.routes.push(RouteConfig {
        path_prefix: "/public".into(),
        auth: false,
        ..Default::default()
    });
    let s = c.serve_settings().unwrap();
    let names: Vec<_> = s.routes.iter().map(|r| &*r.name).collect();
    assert_eq!(names, ["routes[0]", "default"]);
    // The route without its own upstream uses upstream.url.
    assert_eq!(
        s.routes.iter().next().unwrap().upstream.authority,
        "127.0.0.1:3000"
    );
}

#[test]
fn route_and_role_errors_name_their_field() {
    let cases = [
        ("[[routes]]\npath_prefix = \"/a\"", "routes[0].upstream"),
        (
            "[[routes]]\nupstream = \"http://x\"\n[[routes]]\nupstream = \"ftp://x\"",
            "routes[1].upstream",
        ),
        (
            "[[routes]]\nupstream = \"http://x\"\ntenant_from = \"/t/{tenant\"",
            "routes[0].tenant_from",
        ),
        (
            "[[routes]]\nupstream = \"http://x\"\npath_prefix = \"/api\"\ntenant_from = \"/t/{tenant}\"",
            "routes[0].tenant_from",
        ),
        (
            "[[routes]]\nupstream = \"http://x\"\nroles = [\"admin\", \"boss\"]",
            "routes[0].roles[1]",
        ),
        (
            "[[routes]]\nupstream = \"http://x\"\nmethods = [\"GET\", \"get\"]",
            "routes[0].methods[1]",
        ),
        (
            "[[routes]]\nupstream = \"http://x\"\npath_prefix = \"/a/../b\"",
            "routes[0].path_prefix",
        ),
        (
            "[[routes]]\nupstream = \"http://x\"\nhost = \"a:80\"",
            "routes[0].host",
        ),
        (
            "[[routes]]\nupstream = \"http://x\"\nauth = false\nroles = [\"admin\"]",
            "routes[0].auth",
        ),
        (
            "[[routes]]\nupstream = \"http://x\"\npath_prefix = \"/a\"\n[[routes]]\nupstream = \"http://y\"\npath_prefix = \"/a/\"",
            "routes[1]",
        ),
        ("[[routes]]\nupstream = \"http://x\"\nprefix = \"/a\"", "routes[0]"),
        ("[roles.x]\nmethods = [\"GET\"]\npermissions = \"read\"", "roles.x"),
        ("[roles.x]\npermissions = \"write\"", "roles.x.permissions"),
        ("[roles.\"a b\"]\npermissions = \"read\"", "roles.a b"),
    ];
    for (text, field) in cases {
        let err = routes_config(text).unwrap_err().to_string();
        assert!(err.starts_with(field), "{text}\n=> {err}");
    }
    let err = load_error(None, &[("KEYGATE__ROUTES__X", "1")]);
    assert!(err.contains("config file"), "{err}");
}

#[test]
fn routes_that_differ_in_methods_or_host_do_not_overlap() {
    routes_config(
        r#"
        [[routes]]
        upstream = "http://x"
        path_prefix = "/a"
        [[routes]]
        upstream = "http://x"
        path_prefix = "/a"
        methods = ["POST"]
        [[routes]]
        upstream = "http://x"
        path_prefix = "/a"
        methods = ["GET"]
        [[routes]]
        upstream = "http://x"
        host = "b.example"
        path_prefix = "/a"
        "#,
    )
    .unwrap();
    let err = routes_config(
        "[[routes]]\nupstream = \"http://x\"\nmethods = [\"GET\", \"PUT\"]\n[[routes]]\nupstream = \"http://x\"\nmethods = [\"PUT\"]",
    )
    .unwrap_err();
    let err = err.to_string();
    assert!(err.starts_with("routes[1] (config file "), "{err}");
    assert!(err.contains("): overlaps routes[0]"), "{err}");
}

/// The example config, with its commented routes and roles switched on when `uncomment`.
fn example_config(uncomment: bool) -> String {
    let text = include_str!("../../config/keygate.toml");
    let Some(at) = text.find("# Roles and routes") else {
        panic!("config/keygate.toml documents routes");
    };
    let (head, tail) = text.split_at(at);
    if !uncomment {
        return text.to_owned();
    }
    let setting = |l: &str| {
        l.starts_with('[')
            || l.split_once(" = ")
                .is_some_and(|(k, _)| k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
    };
    let tail: Vec<&str> = tail
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest) if setting(rest) => rest,
            _ => l,
        })
        .collect();
    format!("{head}{}\n", tail.join("\n"))
}

#[test]
fn the_example_config_is_valid_with_and_without_its_routes() {
    let plain = routes_config(&example_config(false)).unwrap();
    assert_eq!(plain.routes.iter().count(), 1, "only the catch-all");
    let routed = routes_config(&example_config(true)).unwrap();
    let names: Vec<_> = routed.routes.iter().map(|r| r.name.to_string()).collect();
    assert_eq!(names.len(), 5, "{names:?}");
    assert!(names.contains(&"admin".to_owned()));
}

#[test]
fn the_readme_routes_example_is_valid() {
    let readme = include_str!("../../README.md");
    let section = &readme[readme.find("## Routes and roles").unwrap()..];
    let block = section.split("```toml\n").nth(1).unwrap();
    let block = &block[..block.find("```").unwrap()];
    let text = format!("[upstream]\nurl = \"http://127.0.0.1:3000\"\n{block}");
    let s = routes_config(&text).unwrap();
    assert_eq!(s.routes.iter().count(), 5);
}

/// The file, the environment and the flags each with mistakes of every kind (an unknown
/// field, a wrong type, a bad value, a variable that names no setting): one run reports
/// them all, each with its field and where its value came from.
#[test]
fn every_mistake_of_every_source_is_reported_in_one_run() {
    let dir = std::env::temp_dir().join(format!("keygate-cfg-many-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("many.toml");
    std::fs::write(
        &file,
        "[server]\nlistn = \"127.0.0.1:1\"\ntrusted_proxies = [\"10.0.0.0/8\", 5]\n\
         [cache]\nttl = 60\n[log]\nformat = \"xml\"\n[roles.x]\nmethods = \"GET\"\n\
         [upstream]\nurl = \"http://127.0.0.1:3000\"\n[[routes]]\nprefix = \"/a\"\n",
    )
    .unwrap();
    let in_file = format!("config file {}", file.display());
    let loaded = Config::load(
        Some(&file),
        env(&[
            ("KEYGATE__CACHE__TTLL", "5s"),
            ("KEYGATE__CACHE__CAPACITY", "lots"),
            ("KEYGATE__CACHE__NEGATIVE_TTL", "soon"),
            ("KEYGATE__NOPE", "x"),
        ]),
        &[("server", "listen", "nope".into())],
    );
    std::fs::remove_dir_all(dir).unwrap();
    let expected = [
        format!("server.listn ({in_file}): unknown field"),
        format!("cache.ttl ({in_file}): expected a duration"),
        format!("log.format ({in_file}): \"xml\""),
        format!("routes[0].prefix ({in_file}): unknown field"),
        // A list with a wrong item is left out whole; a table without its faulty field is not
        // reported again for what it then lacks (`roles.x` has neither methods nor permissions).
        format!("server.trusted_proxies[1] ({in_file}): invalid type"),
        format!("roles.x.methods ({in_file}): invalid type"),
        "cache.ttll (environment variable KEYGATE__CACHE__TTLL): unknown field".into(),
        "cache.capacity (environment variable KEYGATE__CACHE__CAPACITY): \"lots\"".into(),
        "cache.negative_ttl (environment variable KEYGATE__CACHE__NEGATIVE_TTL): \"soon\"".into(),
        "KEYGATE__NOPE (environment): expected KEYGATE__<SECTION>__<FIELD>".into(),
        "server.listen (flag --listen): \"nope\"".into(),
    ];
    let err = loaded.and_then(|c| c.serve_settings()).unwrap_err();
    let lines: Vec<String> = err.errors().iter().map(|e| e.to_string()).collect();
    for want in &expected {
        assert!(
            lines.iter().any(|l| l.starts_with(want.as_str())),
            "{want:?} not reported:\n{err}"
        );
    }
    assert_eq!(lines.len(), expected.len(), "each mistake once:\n{err}");
}

/// A setting set aside while loading fails every command, not only `serve`: the
/// management commands compile the store settings alone, and still refuse the config.
#[test]
fn a_mistake_set_aside_while_loading_fails_every_compile_step() {
    let load = || Config::load(None, env(&[("KEYGATE__CACHE__TTLL", "5s")]), &[]);
    for err in [
        load().and_then(|c| c.store_settings()).unwrap_err(),
        load().and_then(|c| c.known_roles()).unwrap_err(),
        load().and_then(|c| c.identity_settings()).unwrap_err(),
    ] {
        assert!(
            err.to_string().starts_with("cache.ttll (environment"),
            "{err}"
        );
    }
}

#[test]
fn redis_tls_files_need_rediss_and_each_other_and_name_their_file() {
    let store_err = |vars: &[(&str, &str)]| {
        Config::load(None, env(vars), &[])
            .and_then(|c| c.store_settings())
            .unwrap_err()
            .to_string()
    };
    let err = store_err(&[("KEYGATE__STORE__TLS_CA", "/etc/ssl/ca.pem")]);
    assert!(
        err.starts_with("store.tls_ca (environment") && err.contains("rediss://"),
        "{err}"
    );
    let err = store_err(&[
        ("KEYGATE__STORE__REDIS_URL", "rediss://127.0.0.1:6380"),
        ("KEYGATE__STORE__TLS_CERT", "/x/client.pem"),
    ]);
    assert!(
        err.starts_with("store.tls_key") && err.contains("tls_cert"),
        "{err}"
    );
    let err = store_err(&[
        ("KEYGATE__STORE__REDIS_URL", "rediss://127.0.0.1:6380"),
        ("KEYGATE__STORE__TLS_CA", "/nonexistent/keygate/ca.pem"),
    ]);
    assert!(
        err.contains("store.tls_ca") && err.contains("/nonexistent/keygate/ca.pem: cannot open"),
        "{err}"
    );
    // rediss:// alone: the system roots.
    let settings = Config::load(
        None,
        env(&[("KEYGATE__STORE__REDIS_URL", "rediss://u:pw@127.0.0.1:6380")]),
        &[],
    )
    .and_then(|c| c.store_settings())
    .unwrap();
    let crate::store::StoreSettings::Redis(r) = settings else {
        panic!("not redis")
    };
    assert!(!r.tls.is_set());
}

#[test]
fn upstream_protocol_and_tls_settings_name_their_field() {
    use crate::proxy::upstream::Protocol;
    let mut c = Config::default();
    c.upstream.url = Some("http://127.0.0.1:3000".into());
    let s = c.serve_settings().unwrap();
    let up = s.upstream.unwrap();
    assert_eq!(up.protocol, Protocol::Http1);
    assert!(up.tls.is_none());

    c.upstream.protocol = "h3".into();
    let err = c.serve_settings().unwrap_err().to_string();
    assert!(err.starts_with("upstream.protocol"), "{err}");
    c.upstream.protocol = "h2".into();
    assert_eq!(
        c.serve_settings().unwrap().upstream.unwrap().protocol,
        Protocol::H2
    );

    c.upstream.url = Some("ftp://127.0.0.1:3000".into());
    let err = c.serve_settings().unwrap_err().to_string();
    assert!(err.contains("only http:// and https://"), "{err}");

    c.upstream.url = Some("https://127.0.0.1:3000".into());
    c.upstream.tls_ca = Some("/nonexistent/keygate/ca.pem".into());
    let err = c.serve_settings().unwrap_err().to_string();
    assert!(err.starts_with("upstream.tls_ca"), "{err}");
    assert!(
        err.contains("/nonexistent/keygate/ca.pem: cannot open"),
        "{err}"
    );
    c.upstream.tls_ca = None;
    c.upstream.tls_client_cert = Some("/nonexistent/keygate/client.pem".into());
    let err = c.serve_settings().unwrap_err().to_string();
    assert!(err.contains("upstream.tls_client_key"), "{err}");
    assert!(err.contains("required with tls_client_cert"), "{err}");
    c.upstream.tls_client_cert = None;

    // A route's own TLS file for an http:// upstream is a mistake; the same under
    // [upstream] only applies to https:// routes.
    c.upstream.url = Some("http://127.0.0.1:3000".into());
    c.upstream.tls_ca = Some("/nonexistent/keygate/ca.pem".into());
    assert!(c.serve_settings().is_ok());
    c.upstream.tls_ca = None;
    c.routes.push(RouteConfig {
        path_prefix: "/api".into(),
        upstream_tls_ca: Some("/nonexistent/keygate/ca.pem".into()),
        ..Default::default()
    });
    let err = c.serve_settings().unwrap_err().to_string();
    assert!(err.starts_with("routes[0].upstream_tls_ca"), "{err}");
    c.routes[0].upstream_tls_ca = None;
    c.routes[0].upstream_protocol = Some("http2".into());
    let err = c.serve_settings().unwrap_err().to_string();
    assert!(err.starts_with("routes[0].upstream_protocol"), "{err}");

    c.routes.clear();
    c.upstream.protocol = "http1".into();
    c.upstream.h2_max_streams = 0;
    let err = c.serve_settings().unwrap_err().to_string();
    assert!(err.starts_with("upstream.h2_max_streams"), "{err}");
}

#[test]
fn tls_settings_are_validated_with_their_field() {
    let mut c = Config::default();
    c.upstream.url = Some("http://127.0.0.1:3000".into());
    let s = c.serve_settings().unwrap();
    assert!(
        s.tls.is_none() && s.admin_tls.is_none(),
        "cleartext by default"
    );

    c.server.tls_cert = Some("/etc/keygate/tls.crt".into());
    let err = c.serve_settings().unwrap_err().to_string();
    assert!(err.starts_with("server.tls_key"), "{err}");
    c.server.tls_key = Some("/etc/keygate/tls.key".into());
    c.server.tls_certificates.push(TlsCertificateConfig {
        cert: "api.crt".into(),
        key: "api.key".into(),
        hosts: vec!["*.apps.example.com".into()],
    });
    let s = c.serve_settings().unwrap();
    let tls = s.tls.unwrap();
    assert_eq!(tls.certificates.len(), 2);
    assert_eq!(
        tls.certificates[0].setting, "server.tls_cert",
        "the default first"
    );
    assert!(tls.client_ca.is_none());

    c.server.tls_certificates[0].hosts = vec!["api.example.com:443".into()];
    let err = c.serve_settings().unwrap_err().to_string();
    assert!(
        err.starts_with("server.tls_certificates[0].hosts[0]"),
        "{err}"
    );
    c.server.tls_certificates.clear();
    c.server.tls_client_auth = "sometimes".into();
    let err = c.serve_settings().unwrap_err().to_string();
    assert!(err.starts_with("server.tls_client_auth"), "{err}");
    c.server.tls_client_auth = "optional".into();
    c.server.tls_client_ca = Some("ca.crt".into());
    let tls = c.serve_settings().unwrap().tls.unwrap();
    assert_eq!(tls.client_auth, crate::server::tls::ClientAuth::Optional);

    // Client certificates need TLS on their listener; the admin listener's TLS is its own.
    c.server.admin_tls_client_ca = Some("ca.crt".into());
    let err = c.serve_settings().unwrap_err().to_string();
    assert!(err.starts_with("server.admin_tls_client_ca"), "{err}");
    c.server.admin_tls_key = Some("admin.key".into());
    let err = c.serve_settings().unwrap_err().to_string();
    assert!(err.starts_with("server.admin_tls_cert"), "{err}");
    c.server.admin_tls_cert = Some(String::new());
    let err = c.serve_settings().unwrap_err().to_string();
    assert!(err.starts_with("server.admin_tls_cert"), "{err}");
    assert!(err.contains("must not be empty"), "{err}");
    c.server.admin_tls_cert = Some("admin.crt".into());
    let s = c.serve_settings().unwrap();
    assert_eq!(
        s.admin_tls.unwrap().certificates[0].key,
        PathBuf::from("admin.key")
    );
}

#[test]
fn the_tls_flags_and_environment_set_the_proxy_certificate() {
    let config = Config::load(
        None,
        env(&[("KEYGATE__SERVER__TLS_KEY", "/env/tls.key")]),
        &[
            ("server", "tls_cert", "/flag/tls.crt".into()),
            ("upstream", "url", "http://127.0.0.1:3000".into()),
        ],
    )
    .unwrap();
    assert_eq!(config.server.tls_cert.as_deref(), Some("/flag/tls.crt"));
    assert_eq!(config.server.tls_key.as_deref(), Some("/env/tls.key"));
    let tls = config.serve_settings().unwrap().tls.unwrap();
    assert_eq!(tls.certificates[0].cert, PathBuf::from("/flag/tls.crt"));
}

#[test]
fn sentinel_mode_is_read_from_the_environment_and_its_password_masked() {
    let vars = env(&[
        (
            "KEYGATE__STORE__SENTINELS",
            "10.0.0.1:26379, 10.0.0.2:26379",
        ),
        ("KEYGATE__STORE__SENTINEL_MASTER", "mymaster"),
        ("KEYGATE__STORE__SENTINEL_PASSWORD", "sentinel-secret"),
    ]);
    let c = Config::load(None, vars, &[]).unwrap();
    let Ok(crate::store::StoreSettings::Sentinel(s)) = c.store_settings() else {
        panic!("not sentinel mode");
    };
    assert_eq!(s.sentinels.len(), 2);
    assert_eq!(s.master, "mymaster");
    assert_eq!(s.password.as_deref(), Some("sentinel-secret"));
    assert!(!c.redacted_json().contains("sentinel-secret"));
    assert!(!format!("{s:?}").contains("sentinel-secret"));
}

#[test]
fn sentinel_settings_name_their_field() {
    let check = |vars: &[(&str, &str)], field: &str| {
        let c = Config::load(None, env(vars), &[]).unwrap();
        let err = c.store_settings().unwrap_err().to_string();
        assert!(err.starts_with(field), "{vars:?}: {err}");
    };
    check(
        &[("KEYGATE__STORE__SENTINEL_MASTER", "m")],
        "store.sentinel_master",
    );
    check(
        &[("KEYGATE__STORE__SENTINEL_PASSWORD", "p")],
        "store.sentinel_password",
    );
    check(
        &[("KEYGATE__STORE__SENTINELS", "h:1")],
        "store.sentinel_master",
    );
    check(
        &[
            ("KEYGATE__STORE__SENTINELS", "h:1,nohost"),
            ("KEYGATE__STORE__SENTINEL_MASTER", "m"),
        ],
        "store.sentinels",
    );
    check(
        &[
            ("KEYGATE__STORE__SENTINELS", "h:1"),
            ("KEYGATE__STORE__SENTINEL_MASTER", "two words"),
        ],
        "store.sentinel_master",
    );
}

#[test]
fn the_readme_sentinel_example_is_valid() {
    let readme = include_str!("../../README.md");
    let section = &readme[readme.find("### Redis Sentinel").unwrap()..];
    let block = section.split("```toml\n").nth(1).unwrap();
    let block = &block[..block.find("```").unwrap()];
    let dir = std::env::temp_dir().join(format!("keygate-cfg-sentinel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("keygate.toml");
    std::fs::write(&path, block).unwrap();
    let c = Config::load(Some(&path), Vec::new(), &[]).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let Ok(crate::store::StoreSettings::Sentinel(s)) = c.store_settings() else {
        panic!("the README's example is not Sentinel mode");
    };
    assert_eq!((s.sentinels.len(), s.master.as_str()), (3, "mymaster"));
}

#[test]
fn cluster_mode_is_read_from_the_environment_and_refuses_what_it_cannot_keep() {
    let vars = env(&[(
        "KEYGATE__STORE__CLUSTER_NODES",
        "10.0.0.1:6379, 10.0.0.2:6379",
    )]);
    let c = Config::load(None, vars, &[]).unwrap();
    let Ok(crate::store::StoreSettings::Cluster(s)) = c.store_settings() else {
        panic!("not cluster mode");
    };
    assert_eq!(s.nodes.len(), 2);
    let check = |vars: &[(&str, &str)], field: &str, says: &str| {
        let c = Config::load(None, env(vars), &[]).unwrap();
        let err = c.store_settings().unwrap_err().to_string();
        assert!(err.starts_with(field), "{vars:?}: {err}");
        assert!(err.contains(says), "{vars:?}: {err}");
    };
    check(
        &[("KEYGATE__STORE__CLUSTER_NODES", "h:1,nohost")],
        "store.cluster_nodes",
        "host:port",
    );
    check(
        &[
            ("KEYGATE__STORE__CLUSTER_NODES", "h:1"),
            ("KEYGATE__STORE__SENTINELS", "h:2"),
            ("KEYGATE__STORE__SENTINEL_MASTER", "m"),
        ],
        "store.cluster_nodes",
        "choose Redis Cluster or Redis Sentinel",
    );
    // keygate places its own hash tags; one in the namespace would pile every key on one slot.
    check(
        &[
            ("KEYGATE__STORE__CLUSTER_NODES", "h:1"),
            ("KEYGATE__STORE__NAMESPACE", "{kg}"),
        ],
        "store.namespace",
        "must not contain {",
    );
}
