//! The access log: one line per request on stderr, written off the request's thread.
//!
//! A request fills a small [`Line`] (copies and reference counts, no formatting) and pushes it
//! into a bounded queue without waiting; one writer thread formats the lines in the format
//! `tracing` gives every other log line (text or JSON, field for field) and writes them in
//! batches, one `write` per batch under the stderr lock, so they never interleave with other
//! log lines. A full queue drops the line, counts it in `keygate_access_log_dropped_total` and
//! is reported in the regular log at most once a minute: a slow stderr never holds up a request.
//!
//! The writer writes what it has, then naps [`FLUSH_INTERVAL`] while requests queue without
//! waking it, and blocks only when nothing is queued. So a line is written within
//! `FLUSH_INTERVAL` of its request's end (plus the time to write the batch), and under load
//! the request threads make no system call to log.
//! [`AccessLog::flush`] writes every line queued before it (the server calls it once its
//! connections have drained).

use std::io::Write;
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderValue, Method};
use prometheus::IntCounter;

use crate::identity::Identity;
use crate::telemetry::{self, LogSettings};

/// The writer's nap between batches while requests come.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(2);

/// Bytes formatted before they are written even though more lines are queued.
const BATCH_BYTES: usize = 64 * 1024;

/// How often, at most, dropped lines are reported in the regular log.
const DROP_REPORT_EVERY: Duration = Duration::from_secs(60);

/// Default queue length, in lines (`log.access_buffer`).
pub const DEFAULT_BUFFER: usize = 8192;

/// The route a line names: an index into the writer's table of route names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteName(u32);

impl RouteName {
    /// Requests that matched no route (logged as `-`).
    pub const UNROUTED: RouteName = RouteName(0);
}

/// One request's access log line, as the request leaves it: nothing is formatted yet.
pub struct Line {
    /// When the request ended.
    pub at: SystemTime,
    /// The request id (the client's if sane, else keygate's).
    pub request_id: HeaderValue,
    /// The route that took the request.
    pub route: RouteName,
    /// The verified key's identity (key id and tenant), once `verify` found the key live.
    pub identity: Option<Identity>,
    /// `allowed` or the refusal's code.
    pub outcome: &'static str,
    /// The request's method.
    pub method: Method,
    /// The response's status.
    pub status: u16,
    /// keygate's whole time on the request, in µs.
    pub latency_us: u64,
    /// The upstream's time to response head, in µs, when the request was forwarded.
    pub upstream_us: Option<u64>,
}

/// What the writer is sent.
enum Msg {
    Line(Line),
    /// Write every line queued before this, then answer.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// The request side of the access log: a bounded queue to the writer thread.
pub struct AccessLog {
    queue: SyncSender<Msg>,
    dropped: IntCounter,
    routes: Arc<[Box<str>]>,
}

/// Text or JSON lines, as `log.format` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `tracing`'s default text format.
    Text,
    /// The same, coloured as `tracing` colours it for a terminal.
    Coloured,
    /// `tracing`'s JSON lines.
    Json,
}

impl AccessLog {
    /// The access log `settings` ask for, its writer started: `None` when `log.access` is off
    /// or the log filter leaves out its lines (see [`enabled`]).
    pub fn configured<'r>(
        settings: &LogSettings,
        routes: impl IntoIterator<Item = &'r str>,
        dropped: IntCounter,
    ) -> std::io::Result<Option<AccessLog>> {
        if !settings.access || !enabled() {
            return Ok(None);
        }
        let format = match (settings.json, telemetry::coloured()) {
            (true, _) => Format::Json,
            (false, true) => Format::Coloured,
            (false, false) => Format::Text,
        };
        Self::start(format, settings.access_buffer, routes, dropped).map(Some)
    }

    /// Starts the writer thread with a queue of `buffer` lines; `routes` are the names lines
    /// may carry (see [`AccessLog::route`]). Lines dropped on a full queue count in `dropped`.
    pub fn start<'r>(
        format: Format,
        buffer: usize,
        routes: impl IntoIterator<Item = &'r str>,
        dropped: IntCounter,
    ) -> std::io::Result<AccessLog> {
        Self::start_to(std::io::stderr(), format, buffer, routes, dropped)
    }

    fn start_to<'r>(
        out: impl Sink,
        format: Format,
        buffer: usize,
        routes: impl IntoIterator<Item = &'r str>,
        dropped: IntCounter,
    ) -> std::io::Result<AccessLog> {
        let mut names: Vec<Box<str>> = vec![super::UNROUTED.into()];
        for name in routes {
            if !names[1..].iter().any(|n| **n == *name) {
                names.push(name.into());
            }
        }
        let routes: Arc<[Box<str>]> = names.into();
        let (queue, rx) = mpsc::sync_channel(buffer.max(1));
        let writer = Writer {
            rx,
            format,
            routes: routes.clone(),
            dropped: dropped.clone(),
            out,
            scratch: Vec::new(),
        };
        std::thread::Builder::new()
            .name("keygate-access-log".into())
            .spawn(move || writer.run())?;
        Ok(AccessLog {
            queue,
            dropped,
            routes,
        })
    }

    /// The name lines of the route called `name` carry (resolved once, at startup).
    pub fn route(&self, name: &str) -> RouteName {
        let at = self.routes[1..].iter().position(|n| **n == *name);
        at.map_or(RouteName::UNROUTED, |i| RouteName(i as u32 + 1))
    }

    /// Queues `line` for the writer, or drops and counts it if the queue is full. Never waits.
    pub fn push(&self, line: Line) {
        if let Err(TrySendError::Full(_)) = self.queue.try_send(Msg::Line(line)) {
            self.dropped.inc();
        }
    }

    /// Resolves once every line pushed before the call is written, or after `within`.
    pub async fn flush(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut msg = Msg::Flush(tx);
        loop {
            match self.queue.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if tokio::time::Instant::now() < deadline => {
                    msg = back;
                    tokio::time::sleep(FLUSH_INTERVAL).await;
                }
                Err(_) => return,
            }
        }
        let _ = tokio::time::timeout_at(deadline, rx).await;
    }
}

/// Whether the installed `tracing` subscriber takes the access log's lines (target
/// `keygate::access`, level INFO): `log.level`, `RUST_LOG` and a filter such as
/// `keygate::access=off` decide for the access log as they do for every other line.
pub fn enabled() -> bool {
    tracing::enabled!(target: "keygate::access", tracing::Level::INFO)
}

/// The writer thread's state.
struct Writer<W> {
    rx: Receiver<Msg>,
    format: Format,
    routes: Arc<[Box<str>]>,
    dropped: IntCounter,
    out: W,
    /// Room to format a field in before it is escaped.
    scratch: Vec<u8>,
}

/// Where batches go: stderr, locked for each batch so that a batch never interleaves with
/// another thread's log line.
trait Sink: Send + 'static {
    fn write_batch(&mut self, batch: &[u8]);
}

impl Sink for std::io::Stderr {
    fn write_batch(&mut self, batch: &[u8]) {
        // Nowhere to report a failed write to stderr: the lines are lost, as `tracing`'s are.
        let _ = self.lock().write_all(batch);
    }
}

impl<W: Sink> Writer<W> {
    /// Until every sender is gone: take what is queued, write it as one batch, nap.
    ///
    /// The writer blocks on the queue only when it is empty, so only a line that finds it
    /// blocked wakes it (a system call on that request's thread); while it naps, or under
    /// load, requests only queue. A line waits at most one nap, plus the time to format and
    /// write the lines before it.
    fn run(mut self) {
        let mut batch = Vec::with_capacity(BATCH_BYTES + 1024);
        let mut reported = 0;
        let mut last_report: Option<Instant> = None;
        while let Ok(msg) = self.rx.recv() {
            self.take(msg, &mut batch);
            let open = self.drain(&mut batch);
            self.write(&mut batch);
            self.report_drops(&mut reported, &mut last_report);
            if !open {
                break;
            }
            std::thread::sleep(FLUSH_INTERVAL);
        }
        self.write(&mut batch);
    }

    /// Formats every queued message; false once every sender is gone.
    fn drain(&mut self, batch: &mut Vec<u8>) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(msg) => self.take(msg, batch),
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
    }

    /// Formats one line, or (a flush request) writes the batch and answers.
    fn take(&mut self, msg: Msg, batch: &mut Vec<u8>) {
        match msg {
            Msg::Line(line) => {
                format_line(batch, &mut self.scratch, self.format, &line, &self.routes);
                if batch.len() >= BATCH_BYTES {
                    self.write(batch);
                }
            }
            Msg::Flush(done) => {
                self.write(batch);
                let _ = done.send(());
            }
        }
    }

    fn write(&mut self, batch: &mut Vec<u8>) {
        if !batch.is_empty() {
            self.out.write_batch(batch);
            batch.clear();
        }
    }

    /// Says in the regular log that lines were dropped: at the first drop, then at most once
    /// every [`DROP_REPORT_EVERY`].
    fn report_drops(&self, reported: &mut u64, last: &mut Option<Instant>) {
        let dropped = self.dropped.get();
        if dropped == *reported || last.is_some_and(|t| t.elapsed() < DROP_REPORT_EVERY) {
            return;
        }
        tracing::warn!(
            dropped = dropped - *reported,
            "access log lines dropped: the log.access_buffer queue was full (stderr too slow); \
             counted in keygate_access_log_dropped_total"
        );
        *reported = dropped;
        *last = Some(Instant::now());
    }
}

/// Appends `line` to `out` in `format`, ending with a newline: the line `tracing` wrote for
/// the access event (target `keygate::access`, in the `request` span), byte for byte.
fn format_line(
    out: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
    format: Format,
    line: &Line,
    routes: &[Box<str>],
) {
    let route = routes.get(line.route.0 as usize).map_or("-", |r| &**r);
    out.reserve(512);
    match format {
        Format::Text => text(out, line, route, &PLAIN),
        Format::Coloured => text(out, line, route, &COLOURED),
        Format::Json => json(out, scratch, line, route),
    }
    out.push(b'\n');
}

/// The constant parts of a text line, between its values.
struct TextParts {
    start: &'static str,
    request_id: &'static str,
    route: &'static str,
    key_id: &'static str,
    tenant: &'static str,
    outcome: &'static str,
    method: &'static str,
    status: &'static str,
    latency_us: &'static str,
    upstream_us: &'static str,
}

/// The parts of a text line, with the escape sequences `tracing` colours it with (or none).
macro_rules! text_parts {
    ($dim:literal, $bold:literal, $italic:literal, $green:literal, $reset:literal) => {
        TextParts {
            start: $dim,
            request_id: concat!(
                $reset,
                " ",
                $green,
                " INFO",
                $reset,
                " ",
                $bold,
                "request",
                $reset,
                $bold,
                "{",
                $reset,
                $italic,
                "request_id",
                $reset,
                $dim,
                "=",
                $reset
            ),
            route: concat!(" ", $italic, "route", $reset, $dim, "=", $reset),
            key_id: concat!(" ", $italic, "key_id", $reset, $dim, "=", $reset),
            tenant: concat!(" ", $italic, "tenant", $reset, $dim, "=", $reset),
            outcome: concat!(" ", $italic, "outcome", $reset, $dim, "=", $reset),
            method: concat!(
                $bold,
                "}",
                $reset,
                $dim,
                ":",
                $reset,
                " ",
                $dim,
                "keygate::access",
                $reset,
                $dim,
                ":",
                $reset,
                " ",
                $italic,
                "method",
                $reset,
                $dim,
                "=",
                $reset
            ),
            status: concat!(" ", $italic, "status", $reset, $dim, "=", $reset),
            latency_us: concat!(" ", $italic, "latency_us", $reset, $dim, "=", $reset),
            upstream_us: concat!(" ", $italic, "upstream_us", $reset, $dim, "=", $reset),
        }
    };
}

const PLAIN: TextParts = text_parts!("", "", "", "", "");
const COLOURED: TextParts = text_parts!("\x1b[2m", "\x1b[1m", "\x1b[3m", "\x1b[32m", "\x1b[0m");

fn text(out: &mut Vec<u8>, line: &Line, route: &str, parts: &TextParts) {
    let put = |out: &mut Vec<u8>, part: &str| out.extend_from_slice(part.as_bytes());
    put(out, parts.start);
    timestamp(out, line.at);
    // The request span's fields in the order they are recorded, then the event's.
    put(out, parts.request_id);
    debug_header(out, &line.request_id);
    put(out, parts.route);
    debug_str(out, route);
    if let Some(id) = &line.identity {
        put(out, parts.key_id);
        debug_str(out, id.key_id());
        put(out, parts.tenant);
        debug_str(out, id.tenant());
    }
    put(out, parts.outcome);
    debug_str(out, line.outcome);
    put(out, parts.method);
    put(out, line.method.as_str());
    put(out, parts.status);
    decimal(out, u64::from(line.status));
    put(out, parts.latency_us);
    decimal(out, line.latency_us);
    if let Some(us) = line.upstream_us {
        put(out, parts.upstream_us);
        decimal(out, us);
    }
}

fn json(out: &mut Vec<u8>, scratch: &mut Vec<u8>, line: &Line, route: &str) {
    out.extend_from_slice(b"{\"timestamp\":\"");
    timestamp(out, line.at);
    out.extend_from_slice(b"\",\"level\":\"INFO\",\"fields\":{\"method\":");
    json_str(out, line.method.as_str());
    out.extend_from_slice(b",\"status\":");
    decimal(out, u64::from(line.status));
    out.extend_from_slice(b",\"latency_us\":");
    decimal(out, line.latency_us);
    if let Some(us) = line.upstream_us {
        out.extend_from_slice(b",\"upstream_us\":");
        decimal(out, us);
    }
    out.extend_from_slice(b"},\"target\":\"keygate::access\",\"span\":");
    let span_start = out.len();
    // The span's fields sorted by name, as `tracing`'s JSON output keeps them, then its name.
    out.push(b'{');
    if let Some(id) = &line.identity {
        out.extend_from_slice(b"\"key_id\":");
        json_str(out, id.key_id());
        out.push(b',');
    }
    out.extend_from_slice(b"\"outcome\":");
    json_str(out, line.outcome);
    // The request id as `tracing` recorded it: its `Debug` form, quotes included.
    out.extend_from_slice(b",\"request_id\":");
    scratch.clear();
    debug_header(scratch, &line.request_id);
    json_str(out, std::str::from_utf8(scratch).unwrap_or_default());
    out.extend_from_slice(b",\"route\":");
    json_str(out, route);
    if let Some(id) = &line.identity {
        out.extend_from_slice(b",\"tenant\":");
        json_str(out, id.tenant());
    }
    out.extend_from_slice(b",\"name\":\"request\"}");
    let span_end = out.len();
    out.extend_from_slice(b",\"spans\":[");
    out.extend_from_within(span_start..span_end);
    out.extend_from_slice(b"]}");
}

/// Bytes that no format escapes: printable ASCII but `"` and `\`.
fn plain(s: &[u8]) -> bool {
    s.iter()
        .all(|&b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
}

/// `s` quoted, as its `Debug` form writes it (which escapes only what `plain` excludes).
fn debug_str(out: &mut Vec<u8>, s: &str) {
    if plain(s.as_bytes()) {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = write!(out, "{s:?}");
    }
}

/// `v` as its `Debug` form writes it.
fn debug_header(out: &mut Vec<u8>, v: &HeaderValue) {
    if !v.is_sensitive() && plain(v.as_bytes()) {
        out.push(b'"');
        out.extend_from_slice(v.as_bytes());
        out.push(b'"');
    } else {
        let _ = write!(out, "{v:?}");
    }
}

/// `s` as a JSON string, escaped as `serde_json` (and so `tracing`) escapes it.
fn json_str(out: &mut Vec<u8>, s: &str) {
    if plain(s.as_bytes()) {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// `n` in decimal.
fn decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// `n` in decimal, zero-padded to `width` digits.
fn padded(out: &mut Vec<u8>, n: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut rest = n;
    for d in digits[..width].iter_mut().rev() {
        *d = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    if rest == 0 {
        out.extend_from_slice(&digits[..width]);
    } else {
        decimal(out, n);
    }
}

/// `at` as `tracing` writes it: RFC 3339 in UTC with microseconds, `2026-01-31T23:59:59.000001Z`.
fn timestamp(out: &mut Vec<u8>, at: SystemTime) {
    let (secs, nanos) = match at.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            let (s, n) = (d.as_secs() as i64, d.subsec_nanos());
            if n == 0 {
                (-s, 0)
            } else {
                (-s - 1, 1_000_000_000 - n)
            }
        }
    };
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400) as u64);
    let (year, month, day) = civil_from_days(days);
    if (0..=9999).contains(&year) {
        padded(out, year as u64, 4);
    } else if year > 9999 {
        let _ = write!(out, "+{year}");
    } else {
        let _ = write!(out, "{year:05}");
    }
    out.push(b'-');
    padded(out, u64::from(month), 2);
    out.push(b'-');
    padded(out, u64::from(day), 2);
    out.push(b'T');
    padded(out, rem / 3600, 2);
    out.push(b':');
    padded(out, rem / 60 % 60, 2);
    out.push(b':');
    padded(out, rem % 60, 2);
    out.push(b'.');
    padded(out, u64::from(nanos / 1_000), 6);
    out.push(b'Z');
}

/// The proleptic Gregorian date of a day counted from 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests;
