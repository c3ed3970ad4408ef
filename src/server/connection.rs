//! One client connection's life: the listener's cap on open connections, the deadlines that
//! close a connection that is not being used, and the drain at shutdown.
//!
//! The deadlines, all kept by one timer per connection ([`serve`]), so a busy connection costs
//! no timer per request:
//! - **first head**: from accept, the first complete request head must arrive within
//!   `header_read_timeout`, on either protocol. hyper-util's protocol detection and HTTP/2's
//!   preface count, so a connection that sends nothing, or `PRI * HTT` and no more, is closed;
//! - **idle**: a connection with no request in flight is closed after `idle_timeout` (HTTP/2
//!   gets a GOAWAY first);
//! - **later heads** (HTTP/1.1): once the first byte of the next request arrives, its head must
//!   be complete within `header_read_timeout` of that byte.
//!
//! Invariant: a request is in flight from its complete head until its response body has been
//! sent or dropped ([`InFlight`] lives in the response body), so neither deadline ever cuts a
//! slow upstream or a long download. An upgraded connection (a WebSocket) keeps one more in
//! flight for the tunnel's whole life, which its HTTP/1.1 connection outlives: the
//! connection's place under the cap and in the drain is kept until [`Activity::settled`].
//!
//! The request budget (`server.max_requests_per_connection`) retires a connection without
//! losing a request: on HTTP/1.1 the last request's response carries `Connection: close`
//! (so the client sends nothing more on it, and hyper closes it once that response is sent);
//! on HTTP/2 the connection is shut down gracefully (GOAWAY), so every stream the client
//! opened before it saw the GOAWAY is still served, and it opens no more.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst,
};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// The limits of a connection: its time limits (`server.header_read_timeout`,
/// `server.idle_timeout`) and its request budget (`server.max_requests_per_connection`).
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// To a complete request head: the first from accept, later ones from their first byte.
    pub head: Duration,
    /// With no request in flight.
    pub idle: Duration,
    /// Requests served before the connection is closed gracefully; 0: no limit.
    pub max_requests: u32,
}

/// The HTTP/2 server limits of every connection (`server.http2_*`, and
/// `server.max_header_bytes` as the header list size).
#[derive(Debug, Clone, Copy)]
pub struct Http2Limits {
    /// Streams a client may have open at once.
    pub max_concurrent_streams: u32,
    /// Keep-alive PING period; `None`: no PINGs.
    pub keep_alive_interval: Option<Duration>,
    /// A PING unanswered this long closes the connection.
    pub keep_alive_timeout: Duration,
    /// Streams the client may reset before they are accepted (rapid reset), then GOAWAY.
    pub max_pending_accept_reset_streams: usize,
    /// Streams keygate may reset for the client's protocol errors, then GOAWAY.
    pub max_local_error_reset_streams: usize,
}

/// How long an idle connection told to close (HTTP/2: sent a GOAWAY) may take to go, unless a
/// request is in flight on it.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------
// The cap

/// The cap on a listener's open connections, shared by every worker accepting on it.
pub struct Cap {
    open: AtomicUsize,
    max: usize,
}

impl Cap {
    /// A cap of `max` open connections.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Cap {
            open: AtomicUsize::new(0),
            max,
        })
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Relaxed)
    }

    /// A place for one more connection, or `None` at the cap. Never admits more than `max`,
    /// even with every worker accepting at once: each takes its place before looking.
    pub fn admit(self: &Arc<Self>) -> Option<Admitted> {
        if self.open.fetch_add(1, Relaxed) >= self.max {
            self.open.fetch_sub(1, Relaxed);
            return None;
        }
        Some(Admitted(self.clone()))
    }
}

/// A connection's place under its listener's cap, given back on drop.
pub struct Admitted(Arc<Cap>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// Activity: what the deadlines are computed from

/// `head_started` when no head is being read.
const NONE: u64 = u64::MAX;

/// What a connection is doing, shared by its timer, its requests and its socket.
pub struct Activity {
    born: Instant,
    /// Requests whose response has not been sent yet.
    in_flight: AtomicU32,
    /// Whether a first request arrived.
    served: AtomicBool,
    /// Whether the first request was HTTP/2 (whose idle connections still receive frames).
    h2: AtomicBool,
    /// Milliseconds after `born` at which the last request in flight ended.
    idle_since: AtomicU64,
    /// Milliseconds after `born` of the first byte read with no request in flight (HTTP/1.1:
    /// the start of the next head), or `NONE`.
    head_started: AtomicU64,
    /// Requests begun.
    requests: AtomicU32,
    /// The request budget (0: none), set by [`serve`] before any request can begin.
    max_requests: AtomicU32,
    /// Whether the budget is spent: the connection is to be closed gracefully.
    retiring: AtomicBool,
    /// Tunnels open ([`Activity::tunnel`]), a part of `in_flight`.
    tunnels: AtomicU32,
    /// Woken when a tunnel ends.
    settled: Notify,
}

/// Why a connection's timer closed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// No complete request head in time.
    Head,
    /// Idle for `idle_timeout`.
    Idle,
}

enum Verdict {
    Wait(Instant),
    Close(Expired),
}

impl Activity {
    /// A connection accepted now.
    pub fn new() -> Arc<Self> {
        Arc::new(Activity {
            born: Instant::now(),
            in_flight: AtomicU32::new(0),
            served: AtomicBool::new(false),
            h2: AtomicBool::new(false),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(NONE),
            requests: AtomicU32::new(0),
            max_requests: AtomicU32::new(0),
            retiring: AtomicBool::new(false),
            tunnels: AtomicU32::new(0),
            settled: Notify::new(),
        })
    }

    /// When the first request head is due (its handshake included, on a TLS listener).
    pub fn first_head_due(&self, d: Deadlines) -> Instant {
        self.born + d.head
    }

    /// A request in flight that may outlive its response and its hyper connection (an
    /// upgrade's tunnel), until the guard drops.
    pub fn tunnel(self: &Arc<Self>, version: http::Version) -> Tunnel {
        self.tunnels.fetch_add(1, Relaxed);
        Tunnel(Some(self.begin(version)))
    }

    /// Resolves once no tunnel is open. An upgraded HTTP/1.1 connection outlives its hyper
    /// connection, so waiting for this after it keeps the connection under the listener's
    /// cap and in the drain until its tunnel ends.
    pub async fn settled(&self) {
        loop {
            let mut woken = pin!(self.settled.notified());
            woken.as_mut().enable();
            if self.tunnels.load(SeqCst) == 0 {
                return;
            }
            woken.await;
        }
    }

    fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.born).as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.born + Duration::from_millis(ms)
    }

    /// A request head arrived: the request is in flight until the guard drops.
    pub fn begin(self: &Arc<Self>, version: http::Version) -> InFlight {
        if !self.served.load(Relaxed) {
            self.h2.store(version == http::Version::HTTP_2, Relaxed);
            self.served.store(true, Relaxed);
        }
        self.in_flight.fetch_add(1, Relaxed);
        let max = self.max_requests.load(Relaxed);
        let last = max != 0 && self.requests.fetch_add(1, Relaxed) + 1 >= max;
        if last {
            self.retiring.store(true, Relaxed);
        }
        InFlight {
            activity: self.clone(),
            last,
        }
    }

    /// Bytes arrived from the client.
    fn read(&self) {
        if self.head_started.load(Relaxed) == NONE
            && self.in_flight.load(Relaxed) == 0
            && !self.h2.load(Relaxed)
        {
            self.head_started.store(self.ms(Instant::now()), Relaxed);
        }
    }

    /// What the timer should do at `now`.
    fn verdict(&self, now: Instant, d: Deadlines) -> Verdict {
        let close_at = |deadline: Instant, why| {
            if now >= deadline {
                Verdict::Close(why)
            } else {
                Verdict::Wait(deadline)
            }
        };
        if !self.served.load(Relaxed) {
            return close_at(self.born + d.head, Expired::Head);
        }
        if self.in_flight.load(Relaxed) > 0 {
            // No deadline runs; none can fall before this once the request ends.
            return Verdict::Wait(now + d.head.min(d.idle));
        }
        let idle = self.at(self.idle_since.load(Relaxed)) + d.idle;
        match self.head_started.load(Relaxed) {
            NONE => close_at(idle, Expired::Idle),
            started => {
                let head = self.at(started) + d.head;
                if head <= idle {
                    close_at(head, Expired::Head)
                } else {
                    close_at(idle, Expired::Idle)
                }
            }
        }
    }
}

/// A request in flight on its connection: ends (and may start the idle deadline) on drop.
pub struct InFlight {
    activity: Arc<Activity>,
    /// Whether it spends the connection's request budget.
    last: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.activity;
        if a.in_flight.fetch_sub(1, Relaxed) == 1 {
            // The next byte read starts the next head.
            a.head_started.store(NONE, Relaxed);
            a.idle_since.store(a.ms(Instant::now()), Relaxed);
        }
    }
}

/// The response to a request in flight, its body keeping the request in flight until sent.
/// The response that spends an HTTP/1 connection's request budget says `Connection: close`,
/// so the client sends no further request on it.
pub fn respond<B>(mut resp: http::Response<B>, in_flight: InFlight) -> http::Response<Tracked<B>> {
    if in_flight.last && !in_flight.activity.h2.load(Relaxed) {
        resp.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    resp.map(|body| Tracked::new(body, in_flight))
}

/// A tunnel's request in flight ([`Activity::tunnel`]); its end wakes [`Activity::settled`].
/// (Only tunnels wake it, so an ordinary request's end costs no wake-up.)
pub struct Tunnel(Option<InFlight>);

impl Drop for Tunnel {
    fn drop(&mut self) {
        if let Some(in_flight) = self.0.take() {
            let activity = in_flight.activity.clone();
            drop(in_flight);
            activity.tunnels.fetch_sub(1, SeqCst);
            activity.settled.notify_waiters();
        }
    }
}

/// A response body that keeps its request in flight until it has been sent or dropped.
pub struct Tracked<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B> Tracked<B> {
    /// `body`, holding `in_flight` until it is done.
    pub fn new(body: B, in_flight: InFlight) -> Self {
        Tracked {
            body,
            _in_flight: in_flight,
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A client socket that tells its connection's [`Activity`] when bytes arrive.
pub struct Watched<S> {
    stream: S,
    activity: Arc<Activity>,
}

impl<S> Watched<S> {
    /// `stream`, reporting to `activity`.
    pub fn new(stream: S, activity: Arc<Activity>) -> Self {
        Watched { stream, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.read();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------------------------------------
// Serving one connection

/// Counters for connections a listener's timers closed.
#[derive(Clone)]
pub struct Expirations {
    /// No complete request head in time.
    pub head: IntCounter,
    /// Idle too long.
    pub idle: IntCounter,
}

/// Runs `conn` until it ends, its timer closes it, or (after `stop`) it has drained.
///
/// `graceful` asks the connection to finish what is in flight and close (hyper's graceful
/// shutdown). A connection whose first head is late, or whose later head is, is dropped at
/// once; an idle one is asked to close and dropped after [`CLOSE_GRACE`] unless a request
/// arrived meanwhile.
pub async fn serve<C, E>(
    conn: C,
    graceful: impl Fn(Pin<&mut C>),
    activity: Arc<Activity>,
    deadlines: Deadlines,
    stop: &mut watch::Receiver<()>,
    expired: &Expirations,
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    // Before the connection is first polled, so before any request can begin.
    activity.max_requests.store(deadlines.max_requests, Relaxed);
    let mut retired = false;
    let mut conn = pin!(conn);
    let mut stopped = pin!(stop.changed());
    let mut armed = activity.born + deadlines.head;
    let mut timer = pin!(tokio::time::sleep_until(armed));
    let mut draining = false;
    let mut closing = false;
    let mut seen_head = NONE;
    poll_fn(|cx| {
        if !draining && stopped.as_mut().poll(cx).is_ready() {
            draining = true;
            graceful(conn.as_mut());
        }
        if let Poll::Ready(ended) = conn.as_mut().poll(cx) {
            return Poll::Ready(ended);
        }
        // The budget is spent by a request begun while the connection was polled: shut it
        // down gracefully (HTTP/2: GOAWAY; what is in flight finishes).
        if !retired && activity.retiring.load(Relaxed) {
            retired = true;
            if !draining && !closing {
                graceful(conn.as_mut());
                if let Poll::Ready(ended) = conn.as_mut().poll(cx) {
                    return Poll::Ready(ended);
                }
            }
        }
        // A head that just started may need an earlier deadline than the one armed (the idle
        // one). Later deadlines are left to the timer: when it fires, it looks again.
        let started = activity.head_started.load(Relaxed);
        if started != seen_head && !closing {
            seen_head = started;
            if started != NONE {
                let due = activity.at(started) + deadlines.head;
                if due < armed {
                    armed = due;
                    timer.as_mut().reset(due);
                }
            }
        }
        while timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            if closing {
                if activity.in_flight.load(Relaxed) == 0 {
                    return Poll::Ready(Ok(()));
                }
                armed = now + CLOSE_GRACE;
            } else {
                match activity.verdict(now, deadlines) {
                    Verdict::Wait(at) => armed = at,
                    Verdict::Close(Expired::Head) => {
                        expired.head.inc();
                        return Poll::Ready(Ok(()));
                    }
                    Verdict::Close(Expired::Idle) => {
                        expired.idle.inc();
                        closing = true;
                        graceful(conn.as_mut());
                        if let Poll::Ready(ended) = conn.as_mut().poll(cx) {
                            return Poll::Ready(ended);
                        }
                        armed = now + CLOSE_GRACE;
                    }
                }
            }
            timer.as_mut().reset(armed);
        }
        Poll::Pending
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Drain

/// Lets a listener's connections finish at shutdown: each holds a watcher; [`Drain::shutdown`]
/// tells them all to close gracefully and resolves when the last one is gone.
pub struct Drain {
    tx: watch::Sender<()>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            tx: watch::channel(()).0,
        }
    }
}

impl Drain {
    /// The signal one connection waits on.
    pub fn watcher(&self) -> watch::Receiver<()> {
        self.tx.subscribe()
    }

    /// Connections still open.
    pub fn count(&self) -> usize {
        self.tx.receiver_count()
    }

    /// Tells every connection to finish and close; resolves when all have.
    pub async fn shutdown(self) {
        let _ = self.tx.send(());
        self.tx.closed().await;
    }
}
