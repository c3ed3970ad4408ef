//! The `keygate` binary as a newcomer meets it: the real binary, run as a child process with a
//! deadline, against the embedded file store in a temporary directory (no Redis needed) or a
//! real `redis-server`. Each test checks what a person reads on the terminal: errors that name
//! the setting and where its value came from, once; no key ever repeated back.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Longest any single command may run before the test fails instead of hanging.
const COMMAND_DEADLINE: Duration = Duration::from_secs(30);

/// Runs `keygate` with `args` and `env`, killing it (and failing) past [`COMMAND_DEADLINE`].
fn run(args: &[&str], env: &[(&str, &str)], dir: &Path) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keygate"));
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // The tests own the environment the binary sees: nothing of the caller's KEYGATE__ leaks in.
    for (k, _) in std::env::vars() {
        if k.starts_with("KEYGATE__") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("the keygate binary starts");
    let deadline = Instant::now() + COMMAND_DEADLINE;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("keygate {args:?} did not finish within {COMMAND_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A temporary directory with a keys file path in it (the file itself is made by the first
/// management command).
struct Files {
    dir: PathBuf,
    keys: String,
}

impl Files {
    fn new(tag: &str) -> Self {
        let dir = temp_dir(tag);
        let keys = dir.join("keys.toml").to_str().unwrap().to_owned();
        Files { dir, keys }
    }

    /// Runs a management command on the keys file.
    fn cli(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--keys-file", &self.keys]);
        run(&all, &[], &self.dir)
    }

    /// Runs a management command that must succeed, with `--output json`; parses its output.
    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--output", "json"]);
        let out = self.cli(&all);
        assert!(out.status.success(), "keygate {args:?}: {}", stderr(&out));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("keygate {args:?} printed no JSON ({e}): {}", stdout(&out)))
    }

    fn audit_text(&self) -> String {
        std::fs::read_to_string(format!("{}.audit.jsonl", self.keys)).unwrap_or_default()
    }

    fn write(&self, name: &str, text: &str) -> String {
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    }
}

#[test]
fn a_key_pasted_where_an_id_belongs_is_refused_without_repeating_it() {
    let f = Files::new("cli-pasted-key");
    let user = f.json(&[
        "keys", "create", "--tenant", "acme", "--role", "member", "--name", "laptop",
    ]);
    let account = f.json(&[
        "service-accounts",
        "create",
        "--tenant",
        "acme",
        "--name",
        "ci",
        "--role",
        "member",
    ]);
    let keys = [
        user["key"].as_str().unwrap().to_owned(),
        account["key"].as_str().unwrap().to_owned(),
    ];
    let audit_before = f.audit_text();
    for key in &keys {
        // The key as pasted, and with the stray whitespace a terminal copy brings along.
        for pasted in [key.clone(), format!(" {key}\n")] {
            for args in [
                &["keys", "show", &pasted][..],
                &["keys", "revoke", &pasted],
                &["service-accounts", "show", &pasted],
                &["service-accounts", "rotate", &pasted],
                &["service-accounts", "remove", &pasted],
            ] {
                for output in ["table", "json"] {
                    let mut all = args.to_vec();
                    all.extend(["--output", output]);
                    let out = f.cli(&all);
                    let (o, e) = (stdout(&out), stderr(&out));
                    assert!(!out.status.success(), "{args:?} succeeded: {o}");
                    assert!(
                        e.contains("that is an API key, not a"),
                        "{:?}: {e}",
                        &args[..2]
                    );
                    for text in [&o, &e] {
                        assert!(
                            !text.contains(&key[4..]),
                            "{:?} repeated the key",
                            &args[..2]
                        );
                    }
                }
            }
        }
    }
    // The refusals are in the audit trail, without the key.
    let audit = f.audit_text();
    assert!(audit.len() > audit_before.len(), "refusals are audited");
    for key in &keys {
        assert!(!audit.contains(&key[4..]), "the audit trail holds a key");
    }
    // The keys still work: nothing was revoked or removed.
    let shown = f.json(&["keys", "show", user["id"].as_str().unwrap()]);
    assert_eq!(shown["revoked_at"], serde_json::Value::Null);
}

#[test]
fn a_role_the_configuration_does_not_define_is_refused_with_the_known_ones() {
    let f = Files::new("cli-roles");
    for args in [
        &[
            "keys", "create", "--tenant", "acme", "--role", "adimn", "--name", "n",
        ][..],
        &[
            "service-accounts",
            "create",
            "--tenant",
            "acme",
            "--name",
            "n",
            "--role",
            "adimn",
        ],
    ] {
        let out = f.cli(args);
        let e = stderr(&out);
        assert!(!out.status.success(), "{args:?} accepted a typo'd role");
        assert!(e.contains("\"adimn\""), "{e}");
        for known in ["member", "readonly", "admin-readonly"] {
            assert!(e.contains(known), "{args:?}: {known} not listed: {e}");
        }
        assert!(
            e.contains("admin API"),
            "the admin API's roles are named as such: {e}"
        );
    }
    assert!(f.json(&["keys", "list"]).as_array().unwrap().is_empty());

    // Roles of the configuration file count, and the list names them.
    let config = f.write(
        "roles.toml",
        &format!(
            "[store]\nkeys_file = {:?}\n[roles.deployer]\nmethods = [\"GET\", \"POST\"]\n",
            f.keys
        ),
    );
    let with_config = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--config", &config]);
        run(&all, &[], &f.dir)
    };
    let ok = with_config(&[
        "keys", "create", "--tenant", "acme", "--role", "deployer", "--name", "d",
    ]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let sa = with_config(&[
        "service-accounts",
        "create",
        "--tenant",
        "acme",
        "--name",
        "deploy",
        "--role",
        "deployer",
    ]);
    assert!(sa.status.success(), "{}", stderr(&sa));
    let typo = with_config(&[
        "keys", "create", "--tenant", "acme", "--role", "deployr", "--name", "d",
    ]);
    assert!(!typo.status.success());
    assert!(stderr(&typo).contains("deployer"), "{}", stderr(&typo));
    // Without the file, `deployer` is not a role.
    let out = f.cli(&[
        "keys", "create", "--tenant", "acme", "--role", "deployer", "--name", "d",
    ]);
    assert!(!out.status.success());
}

#[test]
fn revoking_a_revoked_key_says_when_it_was_revoked_and_succeeds() {
    let f = Files::new("cli-revoke-twice");
    let k = f.json(&[
        "keys", "create", "--tenant", "acme", "--role", "member", "--name", "old",
    ]);
    let id = k["id"].as_str().unwrap();
    let first = f.cli(&["keys", "revoke", id]);
    assert!(first.status.success());
    assert!(stdout(&first).contains("Revoked key"), "{}", stdout(&first));
    let revoked_at = f.json(&["keys", "show", id])["revoked_at"]
        .as_str()
        .unwrap()
        .to_owned();
    let again = f.cli(&["keys", "revoke", id]);
    assert!(again.status.success(), "{}", stderr(&again));
    let said = stdout(&again);
    assert!(!said.contains("Revoked key"), "{said}");
    assert!(said.contains("already revoked"), "{said}");
    assert!(said.contains(&revoked_at), "says when: {said}");
    let json = f.json(&["keys", "revoke", id]);
    assert_eq!(
        json["revoked_at"],
        revoked_at.as_str(),
        "the record is unchanged"
    );
}

#[test]
fn serve_help_lists_only_flags_that_serve_uses() {
    let dir = temp_dir("cli-help");
    let serve = run(&["serve", "--help"], &[], &dir);
    assert!(serve.status.success());
    let help = stdout(&serve);
    assert!(help.contains("--admin-listen"), "{help}");
    assert!(
        !help.contains("--output"),
        "serve --help lists --output:\n{help}"
    );
    let refused = run(&["serve", "--output", "json"], &[], &dir);
    assert!(!refused.status.success());
    for args in [
        &["keys", "create", "--help"][..],
        &["keys", "list", "--help"],
        &["service-accounts", "rotate", "--help"],
        &["audit", "--help"],
    ] {
        let out = run(args, &[], &dir);
        assert!(
            stdout(&out).contains("--output"),
            "{args:?} has no --output"
        );
    }
}

/// Holds a port, so that keygate cannot listen on it.
fn taken_port() -> (std::net::TcpListener, String) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    (l, addr)
}

#[test]
fn an_address_in_use_is_reported_once_with_its_setting_and_flag() {
    let f = Files::new("cli-bind");
    f.json(&[
        "keys", "create", "--tenant", "acme", "--role", "admin", "--name", "k",
    ]);
    let (_held, busy) = taken_port();
    for (flag, setting, other) in [
        ("--admin-listen", "server.admin_listen", "--listen"),
        ("--listen", "server.listen", "--admin-listen"),
    ] {
        let out = f.cli(&[
            "serve",
            "--upstream",
            "http://127.0.0.1:9",
            flag,
            &busy,
            other,
            "127.0.0.1:0",
        ]);
        let e = stderr(&out);
        assert!(!out.status.success(), "{e}");
        assert!(e.contains(setting) && e.contains(flag), "{flag}: {e}");
        assert!(e.contains(&busy), "{e}");
        assert_eq!(e.matches("os error").count(), 1, "the cause once: {e}");
        assert_eq!(e.matches("in use").count(), 1, "the cause once: {e}");
    }
}

/// Holds a port with a listener in an `SO_REUSEPORT` group, as a keygate with several workers
/// does.
fn port_taken_by_a_reuse_port_group() -> (std::net::TcpListener, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let l = rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.set_reuseport(true).unwrap();
        s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        s.listen(16).unwrap().into_std().unwrap()
    });
    let addr = l.local_addr().unwrap().to_string();
    (l, addr)
}

#[test]
fn a_port_another_process_listens_on_with_reuse_port_is_refused_not_shared() {
    let f = Files::new("cli-reuseport");
    f.json(&[
        "keys", "create", "--tenant", "acme", "--role", "admin", "--name", "k",
    ]);
    let (_held, busy) = port_taken_by_a_reuse_port_group();
    let args = [
        "serve",
        "--upstream",
        "http://127.0.0.1:9",
        "--listen",
        &busy,
        "--admin-listen",
        "127.0.0.1:0",
        "--keys-file",
        &f.keys,
    ];
    let out = run(&args, &[("KEYGATE__SERVER__WORKERS", "2")], &f.dir);
    let e = stderr(&out);
    assert!(!out.status.success(), "{e}");
    assert!(e.contains("server.listen") && e.contains(&busy), "{e}");
    assert_eq!(e.matches("in use").count(), 1, "the cause once: {e}");
}

#[test]
fn config_errors_name_the_field_and_where_its_value_came_from() {
    let f = Files::new("cli-config");
    let serve = |extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec![
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--keys-file",
            &f.keys,
        ];
        if !extra.contains(&"--upstream") {
            args.extend(["--upstream", "http://127.0.0.1:9"]);
        }
        args.extend(extra);
        let out = run(&args, env, &f.dir);
        assert!(!out.status.success(), "keygate started: {}", stderr(&out));
        stderr(&out)
    };

    // An unknown field from the environment names the variable.
    let e = serve(&[], &[("KEYGATE__CACHE__TTLL", "5s")]);
    assert!(e.contains("KEYGATE__CACHE__TTLL"), "{e}");
    assert!(e.contains("environment"), "{e}");
    assert!(e.contains("unknown field"), "{e}");

    // A wrong type in the file: the field, the file, and what a value looks like.
    let file = f.write("typed.toml", "[cache]\nttl = 60\n");
    let e = serve(&["--config", &file], &[]);
    assert!(e.contains("cache.ttl"), "{e}");
    assert!(e.contains(&file), "names the file: {e}");
    assert!(e.contains("a duration such as"), "{e}");
    assert!(!e.contains("expected a string"), "{e}");

    // A bad value from the environment names the variable; from a flag, the flag.
    let e = serve(&[], &[("KEYGATE__CACHE__NEGATIVE_TTL", "soon")]);
    assert!(e.contains("cache.negative_ttl"), "{e}");
    assert!(e.contains("KEYGATE__CACHE__NEGATIVE_TTL"), "{e}");
    let e = serve(&["--upstream", "ftp://x"], &[]);
    assert!(
        e.contains("upstream.url") && e.contains("--upstream"),
        "{e}"
    );

    // Three mistakes in one file: three errors in one run, each with its field and the file.
    let file = f.write(
        "three.toml",
        "[server]\nshutdown_grace = \"later\"\n[cache]\nnegative_ttl = \"soon\"\n[log]\nformat = \"xml\"\n",
    );
    let e = serve(&["--config", &file], &[]);
    for field in ["server.shutdown_grace", "cache.negative_ttl", "log.format"] {
        let line = e.lines().find(|l| l.contains(field));
        let line = line.unwrap_or_else(|| panic!("{field} not reported: {e}"));
        assert!(
            line.contains(&file),
            "{field} does not name the file: {line}"
        );
    }
}

#[test]
fn mistakes_in_the_file_the_environment_and_a_flag_are_reported_in_one_run() {
    let f = Files::new("cli-config-mix");
    // An unknown field and a wrong type in the file, an unknown field in the environment, a bad
    // value from a flag.
    let file = f.write(
        "mix.toml",
        "[server]\nlistn = \"127.0.0.1:1\"\n[cache]\nttl = 60\n",
    );
    let env = [("KEYGATE__CACHE__TTLL", "5s")];
    let out = run(
        &[
            "serve",
            "--config",
            &file,
            "--keys-file",
            &f.keys,
            "--upstream",
            "http://127.0.0.1:9",
            "--admin-listen",
            "127.0.0.1:0",
            "--listen",
            "nope",
        ],
        &env,
        &f.dir,
    );
    assert!(!out.status.success(), "keygate started: {}", stderr(&out));
    let e = stderr(&out);
    assert!(e.contains("4 problems in the configuration"), "{e}");
    for (field, from) in [
        (
            "server.listn",
            format!("(config file {file}): unknown field"),
        ),
        (
            "cache.ttl",
            format!("(config file {file}): expected a duration"),
        ),
        (
            "cache.ttll",
            "(environment variable KEYGATE__CACHE__TTLL): unknown field".into(),
        ),
        ("server.listen", "(flag --listen): \"nope\"".into()),
    ] {
        let want = format!("{field} {from}");
        assert!(
            e.lines().any(|l| l.trim_start().starts_with(&want)),
            "{want:?} not reported: {e}"
        );
    }

    // A management command refuses the same mistakes, all of them, before touching the store.
    let out = run(
        &["keys", "list", "--config", &file, "--keys-file", &f.keys],
        &env,
        &f.dir,
    );
    assert!(!out.status.success(), "keys list ran: {}", stdout(&out));
    let e = stderr(&out);
    assert!(e.contains("3 problems in the configuration"), "{e}");
    assert!(!Path::new(&f.keys).exists(), "the keys file was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_management_commands_refuse_pasted_keys_too() {
    let redis = RedisServer::start();
    let ns = namespace("cli-redis-paste");
    let created = keygate_json(
        &redis.url(),
        &ns,
        &[
            "keys", "create", "--tenant", "acme", "--role", "member", "--name", "k",
        ],
    );
    let key = created["key"].as_str().unwrap();
    for args in [
        &["keys", "revoke", key][..],
        &["service-accounts", "remove", key],
    ] {
        let out = keygate_cli(&redis.url(), &ns, args);
        let e = stderr(&out);
        assert!(!out.status.success());
        assert!(e.contains("that is an API key"), "{e}");
        assert!(!e.contains(&key[4..]) && !stdout(&out).contains(&key[4..]));
    }
    let dump = dump_redis(&redis, &ns);
    assert!(
        dump.contains("keys.revoke"),
        "the refusal is audited: {dump}"
    );
    assert!(!dump.contains(&key[4..]), "Redis holds the key");
}
