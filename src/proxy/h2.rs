//! HTTP/2 downstream (TLS with ALPN `h2`), on the `h2` crate.
//!
//! Each stream becomes the HTTP/1.1 request it stands for, written by
//! [`request_head`] from the stream's decoded (and by `h2` validated)
//! header list, and is served by the very same `exchange::serve` as an
//! HTTP/1.1 connection, through an in-memory pipe: dispatch, gate, forward
//! plan, upstream pool, access log and metrics are one copy. Nothing of
//! the client's framing crosses: the head is rewritten, the body is
//! re-chunked from DATA frames, and the engine then parses that head with
//! its strict HTTP/1.1 rules like any other (so, e.g., a `Host` that
//! disagrees with `:authority` is refused as a duplicate `Host`). The
//! answer comes back the same way and is re-framed as HEADERS and DATA.
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
use std::future::poll_fn;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::{Method, Request, Response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use super::exchange::{self, TlsInfo, Worker};
use crate::http1::body::{chunk_head, Decoder, LAST_CHUNK};
use crate::http1::parse::{parse_response, HeadView};
use crate::metrics::METRICS;
use crate::tls::Http2Limits;

/// The window [`Http2Limits::max_client_resets`] counts resets in (a
/// browser cancels a few streams; an attack, thousands).
pub const RESET_WINDOW: Duration = Duration::from_secs(10);
/// An answer that can send nothing for this long is given up.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(60);
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After GOAWAY, the connection is dropped this much later at the latest
/// (h2 waits for the client's PING answer and the open streams).
pub const GOAWAY_GRACE: Duration = Duration::from_secs(10);
/// The pipe between a stream and the engine.
const PIPE: usize = 64 * 1024;
const READ_CHUNK: usize = 16 * 1024;

/// Per connection: how many streams the client reset lately.
struct Resets {
    count: Cell<u32>,
    since: Cell<Instant>,
    /// Past this many within [`RESET_WINDOW`], the connection ends.
    max: u32,
    /// Set when the count passed `max`.
    calm: Notify,
    exceeded: Cell<bool>,
}

impl Resets {
    fn note(&self) {
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
    let info = Rc::new(info);
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
                    tokio::task::spawn_local(stream(
                        worker.clone(),
                        peer,
                        info.clone(),
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
                let stale = info
                    .client_cert
                    .as_ref()
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

/// What went wrong between a stream and its answer.
enum Gone {
    /// The client reset the stream.
    Reset,
    /// The engine's side of the pipe broke or answered nonsense.
    Broken,
}

/// One stream: its HTTP/1.1 form to the engine, the engine's answer back.
async fn stream(
    worker: Rc<Worker>,
    peer: IpAddr,
    info: Rc<TlsInfo>,
    resets: Rc<Resets>,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let (parts, body) = req.into_parts();
    let has_body = !body.is_end_stream();
    let mut head = Vec::with_capacity(1024);
    request_head(&parts, has_body, &mut head);
    let (ours, theirs) = tokio::io::duplex(PIPE);
    let tls = TlsInfo {
        hsts: info.hsts.clone(),
        client_cert: info.client_cert.clone(),
    };
    let engine = tokio::task::spawn_local(exchange::serve(worker, theirs, peer, Some(tls)));
    let (from_engine, to_engine) = tokio::io::split(ours);
    let chunked = has_body && !parts.headers.contains_key(http::header::CONTENT_LENGTH);
    // The answer decides: once it is done (or failed) the request body is
    // no longer read, whatever the client still means to send (dropping
    // it resets the stream's receiving side), so a client that never ends
    // its body cannot hold the stream.
    let answered = {
        let send = send_request(to_engine, head, body, chunked);
        let relay = relay_answer(from_engine, &parts.method, &mut respond);
        tokio::pin!(send, relay);
        let mut sent = false;
        loop {
            tokio::select! {
                answered = &mut relay => break answered,
                () = &mut send, if !sent => sent = true,
            }
        }
    };
    match answered {
        Ok(()) => {}
        Err(Gone::Reset) => {
            // The request's work (gate, upstream) stops with the stream.
            engine.abort();
            resets.note();
        }
        Err(Gone::Broken) => {
            engine.abort();
            respond.send_reset(Reason::INTERNAL_ERROR);
        }
    }
}

/// The HTTP/1.1 head for a stream: request line from the pseudo-headers,
/// `host` from `:authority`, cookies joined (RFC 9113 §8.2.3), `te` and
/// `expect` dropped (flow control replaces 100-continue), the body framed
/// chunked unless a `content-length` (which `h2` holds the DATA to) says
/// otherwise, and `connection: close`: one request per pipe.
pub fn request_head(parts: &http::request::Parts, has_body: bool, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = match parts.uri.path_and_query() {
        Some(pq) => pq.as_str(),
        None if parts.method == Method::CONNECT => "",
        None => "/",
    };
    if parts.method == Method::CONNECT {
        out.extend_from_slice(parts.uri.authority().map_or("", |a| a.as_str()).as_bytes());
    } else {
        out.extend_from_slice(target.as_bytes());
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let authority = parts.uri.authority().map(|a| a.as_str());
    if let Some(a) = authority {
        line(out, b"host", a.as_bytes());
    }
    let mut cookies: Vec<&[u8]> = Vec::new();
    for (name, value) in &parts.headers {
        match name.as_str() {
            // One Host: a second that differs from :authority makes the
            // engine refuse the request as it would over HTTP/1.1.
            "host" if authority.is_some_and(|a| a.as_bytes() == value.as_bytes()) => {}
            "cookie" => cookies.push(value.as_bytes()),
            "te" | "expect" | "connection" | "keep-alive" | "proxy-connection"
            | "transfer-encoding" | "upgrade" | "http2-settings" => {}
            n => line(out, n.as_bytes(), value.as_bytes()),
        }
    }
    if !cookies.is_empty() {
        out.extend_from_slice(b"cookie: ");
        for (i, c) in cookies.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(b"; ");
            }
            out.extend_from_slice(c);
        }
        out.extend_from_slice(b"\r\n");
    }
    if has_body && !parts.headers.contains_key(http::header::CONTENT_LENGTH) {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"connection: close\r\n\r\n");
}

fn line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Write the head and the stream's DATA into the pipe; trailers are not
/// forwarded (as over HTTP/1.1).
async fn send_request<W: AsyncWrite + Unpin>(
    mut to: W,
    head: Vec<u8>,
    mut body: RecvStream,
    chunked: bool,
) {
    if to.write_all(&head).await.is_err() {
        return;
    }
    let mut framed = Vec::new();
    while let Some(data) = body.data().await {
        let Ok(data) = data else {
            // Reset or broken: the engine sees a truncated body.
            return;
        };
        if data.is_empty() {
            // An empty chunk would read as the body's end.
            continue;
        }
        let _ = body.flow_control().release_capacity(data.len());
        let written = if chunked {
            framed.clear();
            chunk_head(&mut framed, data.len());
            framed.extend_from_slice(&data);
            framed.extend_from_slice(b"\r\n");
            to.write_all(&framed).await
        } else {
            to.write_all(&data).await
        };
        if written.is_err() {
            return;
        }
    }
    if chunked {
        let _ = to.write_all(LAST_CHUNK).await;
    }
}

/// Read the engine's answer and send it as HEADERS and DATA, watching for
/// the client's reset all along.
async fn relay_answer<R: AsyncRead + Unpin>(
    mut from: R,
    method: &Method,
    respond: &mut SendResponse<Bytes>,
) -> Result<(), Gone> {
    let mut buf = Vec::with_capacity(4096);
    let head = loop {
        match parse_response(&buf, method, Vec::new()) {
            Ok(Some(head)) if head.status < 200 => {
                // An interim answer: HTTP/2 clients do without. What
                // follows it may be here already.
                buf.drain(..head.len);
                continue;
            }
            Ok(Some(head)) => break head,
            Ok(None) => {}
            Err(_) => return Err(Gone::Broken),
        }
        let read = tokio::select! {
            r = from.read_buf(&mut buf) => r,
            _ = poll_fn(|cx| respond.poll_reset(cx)) => return Err(Gone::Reset),
        };
        match read {
            Ok(0) | Err(_) => return Err(Gone::Broken),
            Ok(_) => {}
        }
    };
    let mut response = Response::builder().status(head.status);
    let view = HeadView {
        buf: &buf,
        headers: &head.headers,
    };
    for h in view.headers {
        let name = h.name.get(&buf);
        if [
            &b"connection"[..],
            b"keep-alive",
            b"transfer-encoding",
            b"proxy-connection",
            b"upgrade",
            b"te",
            b"trailer",
        ]
        .iter()
        .any(|n| name.eq_ignore_ascii_case(n))
        {
            continue;
        }
        response = response.header(name, h.value.get(&buf));
    }
    let Ok(response) = response.body(()) else {
        return Err(Gone::Broken);
    };
    let mut decoder = Decoder::new(head.body);
    let done = decoder.is_done();
    let mut send = respond
        .send_response(response, done)
        .map_err(|_| Gone::Reset)?;
    if done {
        return Ok(());
    }
    let mut rest = buf.split_off(head.len);
    let mut payload = Vec::new();
    loop {
        payload.clear();
        let used = decoder
            .decode(&rest, |p| payload.extend_from_slice(p))
            .map_err(|_| Gone::Broken)?;
        rest.drain(..used);
        if !payload.is_empty() {
            send_data(&mut send, Bytes::copy_from_slice(&payload)).await?;
        }
        if decoder.is_done() {
            return send.send_data(Bytes::new(), true).map_err(|_| Gone::Reset);
        }
        rest.reserve(READ_CHUNK);
        let read = tokio::select! {
            r = from.read_buf(&mut rest) => r,
            _ = poll_fn(|cx| send.poll_reset(cx)) => return Err(Gone::Reset),
        };
        match read {
            Ok(0) => {
                decoder.eof().map_err(|_| Gone::Broken)?;
                return send.send_data(Bytes::new(), true).map_err(|_| Gone::Reset);
            }
            Ok(_) => {}
            Err(_) => return Err(Gone::Broken),
        }
    }
}

/// Send `data` as flow control allows, giving up after [`SEND_TIMEOUT`]
/// without progress or when the client resets the stream.
async fn send_data(send: &mut SendStream<Bytes>, mut data: Bytes) -> Result<(), Gone> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let granted = tokio::time::timeout(
            SEND_TIMEOUT,
            poll_fn(|cx| {
                if send.poll_reset(cx).is_ready() {
                    return std::task::Poll::Ready(None);
                }
                send.poll_capacity(cx)
            }),
        )
        .await;
        let n = match granted {
            Ok(Some(Ok(n))) if n > 0 => n.min(data.len()),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_)) | None) => return Err(Gone::Reset),
            Err(_) => {
                METRICS
                    .http2_goaways
                    .with_label_values(&["send_timeout"])
                    .inc();
                send.send_reset(Reason::CANCEL);
                return Err(Gone::Reset);
            }
        };
        send.send_data(data.split_to(n), false)
            .map_err(|_| Gone::Reset)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::request_head;

    fn head(req: http::Request<()>, has_body: bool) -> String {
        let (parts, ()) = req.into_parts();
        let mut out = Vec::new();
        request_head(&parts, has_body, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_stream_becomes_one_http1_request() {
        let req = http::Request::builder()
            .method("POST")
            .uri("https://api.example.com/v1/vms?x=1")
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .header("te", "trailers")
            .header("x-api-key", "k")
            .body(())
            .unwrap();
        assert_eq!(
            head(req, true),
            "POST /v1/vms?x=1 HTTP/1.1\r\nhost: api.example.com\r\nx-api-key: k\r\ncookie: a=1; b=2\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        );
    }

    #[test]
    fn a_host_that_differs_from_the_authority_is_kept_for_the_engine_to_refuse() {
        let req = http::Request::builder()
            .uri("https://a.example/")
            .header("host", "b.example")
            .header("content-length", "0")
            .body(())
            .unwrap();
        let h = head(req, false);
        assert!(h.contains("host: a.example\r\n"));
        assert!(h.contains("host: b.example\r\n"));
        let same = http::Request::builder()
            .uri("https://a.example/")
            .header("host", "a.example")
            .body(())
            .unwrap();
        assert_eq!(head(same, false).matches("host:").count(), 1);
    }
}
