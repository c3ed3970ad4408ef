//! HTTP/2 to an upstream: per worker, a few connections each carrying many exchanges at once.
//!
//! A request takes the oldest open connection with fewer than `h2_max_streams` streams in
//! flight; only when every connection is saturated or closing (the upstream sent GOAWAY) is
//! another opened, and a burst that finds none waits for the one being opened instead of
//! opening its own. A stream counts from checkout until its response body ends or is dropped
//! ([`Stream`]), so connections streaming long responses count as busy.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::{Request, Response};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::Notify;

use super::{Protocol, Replay, SendError, Upstream, UpstreamBody};

/// How often an HTTP/2 upstream connection is pinged, so that a dead peer is noticed even
/// while no request is in flight; a ping unanswered within the timeout closes it.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most times one request is sent again on another stream.
const MAX_RETRIES: u32 = 2;

/// One stream's place in its connection's count, given back on drop.
pub(super) struct Stream(Arc<AtomicUsize>);

impl Drop for Stream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

/// An HTTP/2 connection to the upstream.
struct Conn {
    sender: SendRequest<UpstreamBody>,
    /// Streams in flight.
    streams: Arc<AtomicUsize>,
    /// When a stream was last started on it.
    since: Instant,
}

/// One worker's HTTP/2 connections to one upstream.
#[derive(Default)]
pub(super) struct Pool {
    // Invariant: only the owning worker's thread (and its sweeper, on the same thread) takes
    // this lock, never across an await, so it is never contended (as for HTTP/1.1).
    conns: Mutex<Vec<Conn>>,
    /// Whether a connection is being opened (at most one at a time per worker).
    connecting: AtomicBool,
    /// Wakes the requests waiting for the connection being opened.
    connected: Notify,
    /// Whether the sweeper runs (it starts with the pool's first connection).
    sweeping: AtomicBool,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Conn>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A stream on the oldest open connection with room for one, counted at once (so
    /// concurrent checkouts never overfill a connection). Closed connections are dropped.
    fn checkout(&self, max_streams: usize) -> Option<(SendRequest<UpstreamBody>, Stream)> {
        let mut conns = self.lock();
        conns.retain(|c| !c.sender.is_closed());
        let c = conns
            .iter_mut()
            .find(|c| c.sender.is_ready() && c.streams.load(Ordering::Acquire) < max_streams)?;
        c.streams.fetch_add(1, Ordering::AcqRel);
        c.since = Instant::now();
        Some((c.sender.clone(), Stream(c.streams.clone())))
    }

    /// Adds a new connection with one stream (the caller's) already counted.
    fn insert(&self, sender: SendRequest<UpstreamBody>) -> Stream {
        let streams = Arc::new(AtomicUsize::new(1));
        self.lock().push(Conn {
            sender,
            streams: streams.clone(),
            since: Instant::now(),
        });
        Stream(streams)
    }

    /// Drops closed connections and ones with no stream in flight and none started within
    /// `idle_timeout` (dropping the last sender closes the connection).
    fn drop_stale(conns: &mut Vec<Conn>, idle_timeout: Duration) {
        let now = Instant::now();
        conns.retain(|c| {
            let idle = c.streams.load(Ordering::Acquire) == 0 && now - c.since > idle_timeout;
            !(c.sender.is_closed() || idle)
        });
    }

    /// Starts the sweeper on the calling worker's event loop, once. It ends when the pool
    /// is dropped.
    fn start_sweeper(self: &Arc<Self>, idle_timeout: Duration) {
        if self.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool = Arc::downgrade(self);
        let every = (idle_timeout / 2).max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                Self::drop_stale(&mut pool.lock(), idle_timeout);
            }
        });
    }
}

/// The right to open the pool's next connection; given up on drop (also when the request
/// opening it is cancelled), waking the requests that waited for it.
struct Opening<'a>(&'a Pool);

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        self.0.connecting.store(false, Ordering::Release);
        self.0.connected.notify_waiters();
    }
}

impl Upstream {
    /// Opens a new HTTP/2 connection; its task (and its streams' tasks) run on the calling
    /// worker's event loop.
    async fn connect_http2(
        &self,
        pool: &Arc<Pool>,
    ) -> Result<SendRequest<UpstreamBody>, SendError> {
        let io = self.connector.connect(Protocol::H2).await?;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
            .handshake(TokioIo::new(io))
            .await?;
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(error = %err, "upstream connection ended with an error");
            }
        });
        pool.start_sweeper(self.settings.pool_idle_timeout);
        self.metrics.opened.inc();
        Ok(sender)
    }

    /// A stream to send on: on an open connection with room, else on the connection this
    /// request opens, or the one another request is opening. Whether the connection was
    /// there before (then a failure to send on it may be retried).
    async fn stream(
        &self,
        pool: &Arc<Pool>,
    ) -> Result<(SendRequest<UpstreamBody>, Stream, bool), SendError> {
        let max = self.settings.h2_max_streams;
        loop {
            if let Some((sender, stream)) = pool.checkout(max) {
                return Ok((sender, stream, true));
            }
            // Invariant: at most one connection is being opened per worker and upstream, so a
            // burst that finds every connection saturated opens one more, not one per request.
            // A waiter registers for the wake-up before it checks the flag, so it cannot miss
            // the end of an opening that finishes in between.
            let connected = pool.connected.notified();
            tokio::pin!(connected);
            connected.as_mut().enable();
            if pool.connecting.swap(true, Ordering::AcqRel) {
                connected.await;
                continue;
            }
            let opening = Opening(pool);
            let sender = self.connect_http2(pool).await?;
            let stream = pool.insert(sender.clone());
            drop(opening);
            return Ok((sender, stream, false));
        }
    }

    /// One HTTP/2 exchange. A request that a pooled connection could not take (it closed, or
    /// the upstream refused the stream before reading it) is sent again when it was never
    /// written or is [replayable](Replay), at most [`MAX_RETRIES`] times; a new connection's
    /// failure is final.
    pub(super) async fn exchange_http2(
        &self,
        req: Request<Incoming>,
    ) -> Result<(Response<Incoming>, Stream), SendError> {
        let pool = &self.pools().http2;
        let mut req = req.map(Either::Left);
        let mut retries = 0;
        loop {
            let (mut sender, stream, reused) = self.stream(pool).await?;
            // A connection stays pooled while it is open, so unlike HTTP/1.1 a retry need not
            // consume one: the count bounds them instead.
            let reused = reused && retries < MAX_RETRIES;
            let replay = if reused { Replay::of(&req) } else { None };
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, stream)),
                Err(mut err) => {
                    req = match (err.take_message(), replay) {
                        (Some(unsent), _) if reused => unsent,
                        (None, Some(replay)) => replay.request(),
                        _ => return Err(err.into_error().into()),
                    };
                    retries += 1;
                    self.metrics.retried.inc();
                }
            }
        }
    }
}
