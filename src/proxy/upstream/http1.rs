//! HTTP/1.1 to an upstream: a pool of connections per worker, one exchange per connection at
//! a time, and the rule for sending a request again when a pooled connection closes under it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::{Request, Response};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use super::{Replay, SendError, Upstream, UpstreamBody};

/// An HTTP/1.1 connection to the upstream, with when it last answered.
struct Pooled {
    sender: SendRequest<UpstreamBody>,
    since: Instant,
}

/// One worker's HTTP/1.1 connections to one upstream.
///
/// A connection is checked back in as soon as its response head arrives, while the body may
/// still be streaming; checkout takes the most recently used connection that is ready for a
/// new request (hyper's `is_ready`: the previous exchange is over) and leaves busy ones where
/// they are. Closed connections, and ones idle past the idle timeout, are dropped at checkout
/// and by a sweeper task, so an idle pool lets its connections go without any traffic.
#[derive(Default)]
pub(super) struct Pool {
    // Invariant: only the owning worker's thread (and its sweeper, on the same thread) takes
    // this lock, never across an await, so it is never contended. The extra pool for threads
    // off the workers is the exception (see `Upstream::pools`); it serves no proxy traffic.
    conns: Mutex<Vec<Pooled>>,
    /// Whether the sweeper runs (it starts with the pool's first connection).
    sweeping: AtomicBool,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Pooled>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops closed connections and ready ones idle past `idle_timeout` (dropping the sender
    /// closes an idle connection).
    fn drop_stale(conns: &mut Vec<Pooled>, idle_timeout: Duration) {
        let now = Instant::now();
        let stale = |c: &Pooled| c.sender.is_ready() && now - c.since > idle_timeout;
        conns.retain(|c| !(c.sender.is_closed() || stale(c)));
    }

    /// The most recently used ready connection. Closed and stale ones met on the way are
    /// dropped; the rest wait for the sweeper, so a checkout does not scan the whole pool.
    fn checkout(&self, idle_timeout: Duration) -> Option<SendRequest<UpstreamBody>> {
        let mut conns = self.lock();
        let now = Instant::now();
        while let Some(i) = conns
            .iter()
            .rposition(|c| c.sender.is_ready() || c.sender.is_closed())
        {
            let c = conns.swap_remove(i);
            if c.sender.is_ready() && now - c.since <= idle_timeout {
                return Some(c.sender);
            }
        }
        None
    }

    /// Takes a connection back as its response head arrives. `max_idle` bounds the idle
    /// connections kept, not the busy ones: a connection still streaming a response (a
    /// download, server-sent events) stays, so long responses never crowd out the idle
    /// connections that short requests reuse. With `max_idle` 0 nothing is kept.
    fn checkin(&self, sender: SendRequest<UpstreamBody>, max_idle: usize) {
        if max_idle == 0 {
            // Dropped: the connection closes once its exchange is over.
            return;
        }
        let mut conns = self.lock();
        conns.push(Pooled {
            sender,
            since: Instant::now(),
        });
        // Over the bound (rare, so the scan is too): close idle connections, oldest first.
        if conns.len() > max_idle {
            let idle = conns.iter().filter(|c| c.sender.is_ready()).count();
            let mut excess = idle.saturating_sub(max_idle);
            conns.retain(|c| {
                let close = excess > 0 && c.sender.is_ready();
                excess -= usize::from(close);
                !close
            });
        }
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

impl Upstream {
    /// Opens a new HTTP/1.1 connection for `pool`; its task runs on the calling worker's
    /// event loop.
    async fn connect_http1(
        &self,
        pool: &Arc<Pool>,
    ) -> Result<SendRequest<UpstreamBody>, SendError> {
        let io = self.connector.connect(super::Protocol::Http1).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(error = %err, "upstream connection ended with an error");
            }
        });
        pool.start_sweeper(self.settings.pool_idle_timeout);
        self.metrics.opened.inc();
        Ok(sender)
    }

    /// One HTTP/1.1 exchange: on a pooled connection if one is ready, else on a new one.
    ///
    /// A pooled connection can fail under a request because the upstream closed it (ending an
    /// idle keep-alive connection) as the request went out. Such a request is sent again on
    /// another connection when that is safe: always if it was never written, and after it was
    /// written only if it is [replayable](Replay). Each retry consumes a pooled connection and
    /// a new connection is never retried, so this ends.
    pub(super) async fn exchange_http1(
        &self,
        req: Request<Incoming>,
    ) -> Result<Response<Incoming>, SendError> {
        let pool = &self.pools().http1;
        let mut req = req.map(Either::Left);
        loop {
            let (mut sender, reused) = match pool.checkout(self.settings.pool_idle_timeout) {
                Some(sender) => (sender, true),
                None => (self.connect_http1(pool).await?, false),
            };
            // Copied only where it may be needed: a fresh connection is not retried.
            let replay = if reused { Replay::of(&req) } else { None };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    pool.checkin(sender, self.settings.pool_max_idle);
                    return Ok(resp);
                }
                Err(mut err) => {
                    req = match (err.take_message(), replay) {
                        (Some(unsent), _) if reused => unsent,
                        (None, Some(replay)) => replay.request(),
                        _ => return Err(err.into_error().into()),
                    };
                    self.metrics.retried.inc();
                }
            }
        }
    }
}
