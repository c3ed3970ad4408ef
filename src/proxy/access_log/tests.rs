use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderValue, Method};
use prometheus::IntCounter;
use proptest::prelude::*;
use tracing_subscriber::fmt::format::Writer as FmtWriter;
use tracing_subscriber::fmt::time::FormatTime;

use super::*;
use crate::identity::Identity;
use crate::key::KeyDigest;
use crate::store::KeyRecord;

/// Bytes written by a `tracing` subscriber or by the access log's writer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Sink for Captured {
    fn write_batch(&mut self, batch: &[u8]) {
        self.0.lock().unwrap().extend_from_slice(batch);
    }
}

/// A clock stopped at `at`, written as the access log writes it.
struct Stopped(SystemTime);

impl FormatTime for Stopped {
    fn format_time(&self, w: &mut FmtWriter<'_>) -> std::fmt::Result {
        let mut out = Vec::new();
        timestamp(&mut out, self.0);
        w.write_str(std::str::from_utf8(&out).unwrap())
    }
}

fn identity(key_id: &str, tenant: &str) -> Identity {
    let mut record = KeyRecord::example(KeyDigest([7; 32]));
    record.id = key_id.into();
    record.tenant = tenant.into();
    Identity::from_record(&record).unwrap()
}

/// What `tracing`'s fmt subscriber writes for the access event as the request path emitted it
/// (the `request` span, its fields recorded in the phases' order, the event inside it).
fn as_tracing_wrote(format: Format, line: &Line, route: &str) -> String {
    let out = Captured::default();
    let writer = out.clone();
    let builder = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(format == Format::Coloured)
        .with_timer(Stopped(line.at));
    let emit = || {
        let span = tracing::info_span!(
            "request",
            request_id = ?line.request_id,
            route = tracing::field::Empty,
            key_id = tracing::field::Empty,
            tenant = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        span.record("route", route);
        if let Some(id) = &line.identity {
            span.record("key_id", id.key_id());
            span.record("tenant", id.tenant());
        }
        span.record("outcome", line.outcome);
        let _entered = span.enter();
        tracing::info!(
            target: "keygate::access",
            method = %line.method,
            status = line.status,
            latency_us = line.latency_us,
            upstream_us = line.upstream_us,
        );
    };
    if format == Format::Json {
        tracing::subscriber::with_default(builder.json().finish(), emit);
    } else {
        tracing::subscriber::with_default(builder.finish(), emit);
    }
    out.text()
}

const FORMATS: [Format; 3] = [Format::Text, Format::Coloured, Format::Json];

fn formatted(format: Format, line: &Line, routes: &[Box<str>]) -> String {
    let mut out = Vec::new();
    format_line(&mut out, &mut Vec::new(), format, line, routes);
    String::from_utf8(out).unwrap()
}

fn line(request_id: &str, route: u32, identity: Option<Identity>) -> Line {
    Line {
        at: UNIX_EPOCH + Duration::new(1_764_648_000, 123_456_789),
        request_id: HeaderValue::from_str(request_id).unwrap(),
        route: RouteName(route),
        identity,
        outcome: "allowed",
        method: Method::GET,
        status: 200,
        latency_us: 812,
        upstream_us: Some(640),
    }
}

fn routes(names: &[&str]) -> Vec<Box<str>> {
    std::iter::once("-")
        .chain(names.iter().copied())
        .map(Into::into)
        .collect()
}

#[test]
fn lines_are_the_ones_tracing_wrote() {
    let routes = routes(&["default", "api"]);
    let mut refused = line("ab\"c\\d{e}", 0, None);
    refused.outcome = "invalid_path";
    refused.status = 400;
    refused.upstream_us = None;
    let mut scoped = line("f00d", 2, Some(identity("key_FN7VS8V2P0dFwDcL", "acme")));
    scoped.outcome = "insufficient_scope";
    scoped.method = Method::from_bytes(b"PURGE").unwrap();
    scoped.status = 403;
    let cases = [
        (
            line("faf3aa1cfd747b3e", 1, Some(identity("key_1", "acme"))),
            "default",
        ),
        (refused, "-"),
        (scoped, "api"),
    ];
    for (line, route) in &cases {
        for format in FORMATS {
            let ours = formatted(format, line, &routes);
            assert_eq!(ours, as_tracing_wrote(format, line, route), "{format:?}");
            if format == Format::Json {
                let v: serde_json::Value = serde_json::from_str(&ours).unwrap();
                assert_eq!(v["span"]["route"], *route);
            }
        }
    }
    assert_eq!(
        formatted(Format::Text, &cases[0].0, &routes),
        "2025-12-02T04:00:00.123456Z  INFO request{request_id=\"faf3aa1cfd747b3e\" \
         route=\"default\" key_id=\"key_1\" tenant=\"acme\" outcome=\"allowed\"}: \
         keygate::access: method=GET status=200 latency_us=812 upstream_us=640\n"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Whatever a client can put in a request id, a method or (through the API) a tenant (any visible ASCII), and
    /// whatever a route is called, both formats write what `tracing` wrote, and JSON stays one
    /// valid JSON document per line.
    #[test]
    fn odd_values_are_escaped_as_tracing_escapes_them(
        request_id in "[!-~]{1,128}",
        method in "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,20}",
        tenant in "[!-~]{0,40}",
        route in "\\PC{1,20}",
        status in 100u16..600,
        latency_us: u64,
        upstream_us: Option<u64>,
        secs in 0u64..253_402_300_799,
    ) {
        let routes = routes(&[&route]);
        let line = Line {
            at: UNIX_EPOCH + Duration::new(secs, 999_999_999),
            request_id: HeaderValue::from_str(&request_id).unwrap(),
            route: RouteName(1),
            identity: Some(identity("key_x", &tenant)),
            outcome: "allowed",
            method: Method::from_bytes(method.as_bytes()).unwrap(),
            status,
            latency_us,
            upstream_us,
        };
        for format in FORMATS {
            let ours = formatted(format, &line, &routes);
            prop_assert_eq!(&ours, &as_tracing_wrote(format, &line, &route));
            prop_assert_eq!(ours.matches('\n').count(), 1);
            if format == Format::Json {
                let v: serde_json::Value = serde_json::from_str(&ours).unwrap();
                prop_assert_eq!(v["span"]["tenant"].as_str(), Some(&*tenant));
                prop_assert_eq!(v["fields"]["method"].as_str(), Some(&*method));
            }
        }
    }

    /// Timestamps read as RFC 3339 with microseconds, like every other log line's.
    #[test]
    fn timestamps_are_rfc3339_in_microseconds(secs in 0u64..253_402_300_799, nanos in 0u32..1_000_000_000) {
        let at = UNIX_EPOCH + Duration::new(secs, nanos);
        let mut out = Vec::new();
        timestamp(&mut out, at);
        prop_assert_eq!(
            String::from_utf8(out).unwrap(),
            humantime::format_rfc3339_micros(at).to_string()
        );
    }
}

fn counter() -> IntCounter {
    IntCounter::new("dropped", "dropped").unwrap()
}

/// Waits (up to 5 s) until `cond` holds of what was written.
fn written_until(out: &Captured, cond: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = out.text();
        if cond(&text) {
            return text;
        }
        assert!(std::time::Instant::now() < deadline, "written: {text:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_line_is_written_without_more_traffic() {
    let out = Captured::default();
    let log = AccessLog::start_to(out.clone(), Format::Text, 16, ["default"], counter()).unwrap();
    log.push(line("one", 1, None));
    let text = written_until(&out, |t| t.ends_with('\n'));
    assert!(
        text.contains("request_id=\"one\" route=\"default\""),
        "{text}"
    );
    log.push(line("two", 0, None));
    written_until(&out, |t| t.contains("request_id=\"two\" route=\"-\""));
}

#[test]
fn a_full_queue_drops_and_counts_and_flush_writes_the_rest() {
    // The writer is held up by a sink that blocks until released: the queue fills.
    #[derive(Clone)]
    // (open, entered): the writer waits in its first write until the test opens the gate,
    // and says when it got there.
    struct Gate(Captured, Arc<(Mutex<(bool, bool)>, std::sync::Condvar)>);
    impl Sink for Gate {
        fn write_batch(&mut self, batch: &[u8]) {
            let (state, cv) = &*self.1;
            let mut state = state.lock().unwrap();
            state.1 = true;
            cv.notify_all();
            while !state.0 {
                state = cv.wait(state).unwrap();
            }
            self.0.write_batch(batch);
        }
    }
    let out = Captured::default();
    let gate = Arc::new((Mutex::new((false, false)), std::sync::Condvar::new()));
    let dropped = counter();
    let log = AccessLog::start_to(
        Gate(out.clone(), gate.clone()),
        Format::Json,
        4,
        ["default"],
        dropped.clone(),
    )
    .unwrap();
    // The first line reaches the writer, which is then stuck in its write.
    log.push(line("r0", 1, None));
    {
        let (state, cv) = &*gate;
        let state = state.lock().unwrap();
        let (_state, waited) = cv
            .wait_timeout_while(state, Duration::from_secs(5), |s| !s.1)
            .unwrap();
        assert!(!waited.timed_out(), "the writer never took the first line");
    }
    // Each push returns at once, whether the line was queued or dropped: the queue holds 4,
    // the other 95 are dropped and counted.
    for n in 1..100 {
        let started = std::time::Instant::now();
        log.push(line(&format!("r{n}"), 1, None));
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    let lost = dropped.get();
    assert_eq!(lost, 100 - 1 - 4, "dropped {lost}");
    gate.0.lock().unwrap().0 = true;
    gate.1.notify_all();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(log.flush(Duration::from_secs(5)));
    let text = out.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len() as u64, 100 - lost, "{text}");
    for l in &lines {
        serde_json::from_str::<serde_json::Value>(l).unwrap();
    }
    assert!(lines[0].contains("r0"));
}

#[test]
fn routes_are_named_once_and_unknown_ones_are_unrouted() {
    let log = AccessLog::start_to(
        Captured::default(),
        Format::Text,
        1,
        ["a", "b", "a"],
        counter(),
    )
    .unwrap();
    assert_eq!(log.route("a"), RouteName(1));
    assert_eq!(log.route("b"), RouteName(2));
    assert_eq!(log.route("zzz"), RouteName::UNROUTED);
    assert_eq!(log.route("-"), RouteName::UNROUTED);
}

#[test]
fn a_queued_line_is_small() {
    // What a request copies into the queue, and what each queue slot costs at startup.
    let size = std::mem::size_of::<Msg>();
    assert!(size <= 160, "{size} bytes");
}
