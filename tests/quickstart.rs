//! The README's quick start, run as written: `keygate demo` (on port 0 here), then the `curl`
//! lines it prints, whose responses must match the ones the README shows.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;

/// The README's expected transcript: (curl command, expected output lines) pairs.
fn readme_transcript() -> Vec<(String, Vec<String>)> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let quick = readme
        .split("## Quick start")
        .nth(1)
        .expect("README has a quick start");
    assert!(quick.contains("cargo run --release -- demo"));
    let console = quick
        .split("```console\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("the quick start shows a console transcript");
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for line in console.lines() {
        if let Some(cmd) = line.strip_prefix("$ ") {
            out.push((cmd.to_owned(), Vec::new()));
        } else if let Some((_, lines)) = out.last_mut() {
            lines.push(line.to_owned());
        }
    }
    out
}

/// Does `actual` match `expected`, where `…` in `expected` stands for any text?
fn matches(expected: &str, actual: &str) -> bool {
    let parts: Vec<&str> = expected.split('…').collect();
    let mut rest = actual;
    for (i, part) in parts.iter().enumerate() {
        match rest.find(part) {
            Some(0) => rest = &rest[part.len()..],
            Some(pos) if i > 0 => rest = &rest[pos + part.len()..],
            _ => return false,
        }
    }
    rest.is_empty() || expected.ends_with('…')
}

/// Runs a printed `curl -i [-H 'Name: value'] URL` line: with the real `curl` when it is
/// installed (literally, through `sh -c`), else with the test's HTTP client; returns what curl
/// prints.
async fn run_curl(line: &str) -> String {
    if let Ok(out) = Command::new("sh").args(["-c", line]).output() {
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n");
        }
        // curl missing (127) or failing: the client below gives the same transcript.
    }
    let header = line
        .split('\'')
        .nth(1)
        .filter(|_| line.contains(" -H "))
        .map(str::to_owned);
    let url = line.split_whitespace().last().unwrap();
    let headers: Vec<(String, String)> = header
        .iter()
        .map(|h| {
            let (k, v) = h.split_once(": ").unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect();
    let refs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let reply = Http::new().get(url, &refs).await;
    let mut out = format!(
        "HTTP/1.1 {} {}\n",
        reply.status.as_u16(),
        reply.status.canonical_reason().unwrap()
    );
    for (k, v) in &reply.headers {
        out.push_str(&format!("{k}: {}\n", v.to_str().unwrap()));
    }
    out.push('\n');
    out.push_str(&reply.text());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_quick_start_gives_the_responses_it_shows() {
    let transcript = readme_transcript();
    assert_eq!(transcript.len(), 2, "the README shows two curl calls");

    let dir = temp_dir("quickstart");
    let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .current_dir(&dir)
        .env_remove("KEYGATE__STORE__KEYS_FILE")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut printed = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        let done = line.starts_with("Press Ctrl-C");
        printed.push(line);
        if done {
            break;
        }
    }
    let curls: Vec<String> = printed
        .iter()
        .filter_map(|l| l.trim().strip_prefix("curl ").map(|c| format!("curl {c}")))
        .collect();
    assert_eq!(curls.len(), 2, "demo output: {printed:#?}");
    assert!(dir.join("demo-keys.toml").exists());

    for ((readme_cmd, expected), printed_cmd) in transcript.iter().zip(&curls) {
        // The printed command is the README's with the real key and address filled in.
        let readme_shape = readme_cmd.replace("127.0.0.1:8080", "…");
        assert!(
            matches(&readme_shape, printed_cmd),
            "demo printed {printed_cmd:?}, README shows {readme_cmd:?}"
        );
        let actual = run_curl(printed_cmd).await;
        let actual_lines: Vec<&str> = actual.lines().collect();
        assert!(matches(&expected[0], actual_lines[0]), "status: {actual}");
        for want in expected.iter().skip(1).filter(|l| !l.is_empty()) {
            assert!(
                actual_lines.iter().any(|got| matches(want, got)),
                "README line {want:?} not in the response:\n{actual}"
            );
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}
