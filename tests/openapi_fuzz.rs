//! The admin API against its own OpenAPI document, fuzzed: schemathesis (an OpenAPI fuzzer)
//! reads `/v1/openapi.json` from a live keygate (real Redis, keygate in-process on port 0) and
//! sends what the document admits and what it refuses, with every check on: no 5xx, only
//! documented statuses, headers and bodies, schema-valid requests accepted, schema-violating
//! ones refused, deleted records gone, authentication never ignored.
//!
//! `scripts/test.sh` installs the pinned schemathesis. Without it the test is skipped with a
//! message, except under `CI=true`, where it fails: CI must run it.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The schemathesis release the suite is pinned to (`scripts/test.sh` installs it).
const SCHEMATHESIS: &str = "4.32.5";
/// Test cases per operation and phase: enough to cover every field's edges, few enough to keep
/// the suite fast (about 20 s on a 2-core machine).
const MAX_EXAMPLES: &str = "20";
/// The longest the fuzzer may run before the test fails instead of hanging.
const DEADLINE: Duration = Duration::from_secs(240);

/// The schemathesis command, if installed.
fn schemathesis() -> Option<(String, String)> {
    for name in ["schemathesis", "st"] {
        let Ok(out) = Command::new(name).arg("--version").output() else {
            continue;
        };
        if out.status.success() {
            let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            return Some((name.to_owned(), version));
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_keeps_every_promise_of_its_openapi_document() {
    let Some((st, version)) = schemathesis() else {
        let msg = format!(
            "schemathesis is not installed: `pip install schemathesis=={SCHEMATHESIS}` (scripts/test.sh does)"
        );
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{msg}");
        }
        eprintln!("skipping the OpenAPI fuzz test: {msg}");
        return;
    };
    assert!(
        version.contains(SCHEMATHESIS),
        "the suite is pinned to schemathesis {SCHEMATHESIS}, found {version:?}"
    );

    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace("fuzz");
    let store = redis_store(&redis, &ns);
    let kg = Keygate::start(test_config(&redis.url(), &ns, &upstream.url())).await;
    kg.wait_ready().await;
    // An operator admin key: it may do everything in every tenant.
    let admin = create_key(&*store, "keygate", "admin").await;

    let dir = temp_dir("fuzz");
    let hooks = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz");
    let (stdout, stderr) = (dir.join("stdout"), dir.join("stderr"));
    let auth = format!("Authorization: Bearer {}", admin.secret.expose());
    let mut child = Command::new(&st)
        .args(["run", &kg.admin_url("/v1/openapi.json")])
        .args(["--checks", "all", "--max-examples", MAX_EXAMPLES])
        .args(["--workers", "1", "--request-timeout", "10"])
        .args(["--header", &auth])
        .env("PYTHONPATH", hooks)
        .env("SCHEMATHESIS_HOOKS", "keygate_hooks")
        .env("KEYGATE_FUZZ_ADMIN_ID", &admin.record.id)
        .env("NO_COLOR", "1")
        // Its example database and any report stay in the temporary directory.
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "schemathesis did not finish within {DEADLINE:?}:\n{}",
                std::fs::read_to_string(&stdout).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let out = std::fs::read_to_string(&stdout).unwrap_or_default();
    let err = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert!(
        status.success(),
        "schemathesis found the API and its document disagreeing ({status}):\n{out}\n{err}"
    );
    // The run was real: every operation was tested, and every phase ran.
    assert!(out.contains("10 selected / 10 total"), "{out}");
    for phase in ["Examples", "Coverage", "Fuzzing", "Stateful"] {
        assert!(
            out.contains(&format!("✅  {phase}")),
            "{phase} did not pass:\n{out}"
        );
    }
    // Its output never holds the key (schemathesis masks Authorization; the API never repeats
    // a key, and shows a new one only in the answer that created it).
    assert!(
        !out.contains(admin.secret.expose()),
        "the admin key was printed"
    );
    eprintln!(
        "{}",
        out.lines().rev().take(3).collect::<Vec<_>>().join("\n")
    );
    let _ = std::fs::remove_dir_all(&dir);
}
