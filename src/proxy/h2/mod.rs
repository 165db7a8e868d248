//! HTTP/2 downstream (TLS with ALPN `h2`), on the `h2` crate.
//!
//! Each stream is a `stream::Stream`, the application's `Downstream`:
//! its header list is laid out as a head and held to the very rules of an
//! HTTP/1.1 head (`http1::parse::Assembled`; so, e.g., a `Host` that
//! disagrees with `:authority` is refused as a duplicate `Host`), then
//! `exchange::handle` serves it as it serves an HTTP/1.1 request: one
//! dispatch, gate, forward plan, upstream pool, access log and metrics.
//! Its body comes from DATA frames, and its answer goes straight back as
//! HEADERS and DATA. Nothing of the client's framing crosses.
//!
//! Protections, besides the engine's own limits:
//! - at most [`Http2Limits::max_concurrent_streams`] concurrent streams, a
//!   bounded header list ([`Http2Limits::max_header_list_size`], which also
//!   bounds CONTINUATION frames in `h2`) and a 4 KiB HPACK table, so a
//!   compressed header bomb cannot decode to more than the list size;
//! - rapid reset (CVE-2023-44487): `h2` caps streams reset before they are
//!   accepted, and a connection whose client resets more than
//!   [`Http2Limits::max_client_resets`] streams within [`RESET_WINDOW`] is
//!   ended with GOAWAY `ENHANCE_YOUR_CALM`; a reset stream's work (gate,
//!   upstream request) is aborted at once;
//! - slow reading and flow-control starvation: an answer that cannot send
//!   for [`SEND_TIMEOUT`] is reset, and a connection's send buffer is
//!   bounded;
//! - idle connections close after [`Http2Limits::idle_timeout`], a stalled
//!   handshake after [`HANDSHAKE_TIMEOUT`], and any connection at most
//!   [`GOAWAY_GRACE`] after its GOAWAY; a stream ends with its answer (a
//!   request body still unsent is not waited for);
//! - shutdown sends GOAWAY and lets the streams in flight finish.

use std::cell::Cell;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::Reason;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;

use super::exchange::{self, Origin, TlsInfo, Worker};
use crate::metrics::METRICS;
use crate::tls::Http2Limits;

mod stream;

pub use stream::{assemble, CONNECTION_SPECIFIC};

/// The window [`Http2Limits::max_client_resets`] counts resets in (a
/// browser cancels a few streams; an attack, thousands).
pub const RESET_WINDOW: Duration = Duration::from_secs(10);
/// An answer that can send nothing for this long is given up.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(60);
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After GOAWAY, the connection is dropped this much later at the latest
/// (h2 waits for the client's PING answer and the open streams).
pub const GOAWAY_GRACE: Duration = Duration::from_secs(10);

/// Per connection: how many streams the client reset lately.
pub(super) struct Resets {
    count: Cell<u32>,
    since: Cell<Instant>,
    /// Past this many within [`RESET_WINDOW`], the connection ends.
    max: u32,
    /// Set when the count passed `max`.
    calm: Notify,
    exceeded: Cell<bool>,
}

impl Resets {
    pub(super) fn note(&self) {
        METRICS.http2_resets.inc();
        if self.since.get().elapsed() > RESET_WINDOW {
            self.since.set(Instant::now());
            self.count.set(0);
        }
        self.count.set(self.count.get() + 1);
        if self.count.get() > self.max && !self.exceeded.get() {
            self.exceeded.set(true);
            self.calm.notify_one();
        }
    }
}

/// Serve one HTTP/2 connection (after TLS and ALPN) until it ends.
pub async fn serve<S>(worker: Rc<Worker>, io: S, peer: IpAddr, info: TlsInfo, limits: Http2Limits)
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_list_size)
        .header_table_size(4096)
        .initial_window_size(256 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .max_send_buffer_size(256 * 1024)
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(Some(256));
    let mut conn =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, builder.handshake::<_, Bytes>(io)).await {
            Ok(Ok(c)) => c,
            _ => return,
        };
    METRICS.http2_connections.inc();
    // Counted as in flight, so shutdown waits for its GOAWAY to go out.
    let _in_flight = exchange::InFlight::new(worker.clone());
    let origin = Rc::new(Origin::new(peer, Some(info)));
    let resets = Rc::new(Resets {
        count: Cell::new(0),
        since: Cell::new(Instant::now()),
        max: limits.max_client_resets,
        calm: Notify::new(),
        exceeded: Cell::new(false),
    });
    let mut idle_since = Some(Instant::now());
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut going_away = false;
    let mut gone_at: Option<tokio::time::Instant> = None;
    loop {
        if !going_away && worker.draining.get() {
            conn.graceful_shutdown();
            going_away = true;
        }
        if going_away && gone_at.is_none() {
            gone_at = Some(tokio::time::Instant::now() + GOAWAY_GRACE);
        }
        tokio::select! {
            accepted = conn.accept() => match accepted {
                Some(Ok((req, respond))) => {
                    idle_since = None;
                    METRICS.http2_streams.inc();
                    tokio::task::spawn_local(stream::serve(
                        worker.clone(),
                        origin.clone(),
                        resets.clone(),
                        req,
                        respond,
                    ));
                }
                Some(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "HTTP/2 connection error");
                    break;
                }
                None => break,
            },
            _ = resets.calm.notified() => {
                tracing::warn!(%peer, "HTTP/2 client reset too many streams (rapid reset); closing with ENHANCE_YOUR_CALM");
                METRICS.http2_goaways.with_label_values(&["enhance_your_calm"]).inc();
                conn.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
                going_away = true;
            }
            _ = worker.drain.notified(), if !going_away => {}
            // One timer per connection, not one per stream: idleness and
            // the GOAWAY deadline are looked at once a second.
            _ = every.tick() => {
                // Its client certificate was verified under CAs the policy
                // no longer trusts: new connections get a new handshake.
                let stale = origin
                    .tls
                    .as_ref()
                    .and_then(|t| t.client_cert.as_ref())
                    .is_some_and(|c| c.is_stale(&worker.shared.store.load()));
                if stale && !going_away {
                    METRICS.http2_goaways.with_label_values(&["client_ca_changed"]).inc();
                    conn.graceful_shutdown();
                    going_away = true;
                }
                if let Some(at) = gone_at {
                    // A client that neither answers the GOAWAY's PING nor
                    // ends its streams does not keep the connection.
                    if tokio::time::Instant::now() >= at {
                        break;
                    }
                } else if conn.has_streams() {
                    idle_since = None;
                } else if idle_since.get_or_insert_with(Instant::now).elapsed() >= limits.idle_timeout {
                    METRICS.http2_goaways.with_label_values(&["idle"]).inc();
                    conn.graceful_shutdown();
                    going_away = true;
                }
            }
        }
    }
}
