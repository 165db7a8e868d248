//! One HTTP/2 stream as the application's `Downstream`: its head laid out
//! and checked like an HTTP/1.1 head, its body read from DATA frames, its
//! answer sent as HEADERS and DATA within flow control. A client's reset
//! ends the stream's work (gate, upstream request) at once.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response};

use super::{Resets, SEND_TIMEOUT};
use crate::http1::conn::CLIENT_TIMEOUT;
use crate::http1::parse::{Assembled, RequestHead, WireError};
use crate::http1::{spare, upstream, AnswerBody, BodyFailure, Downstream, Fields};
use crate::metrics::METRICS;
use crate::proxy::exchange::{self, Origin, Worker};

/// Serve one stream: its request through the application, its answer back.
pub(super) async fn serve(
    worker: Rc<Worker>,
    origin: Rc<Origin>,
    resets: Rc<Resets>,
    req: Request<RecvStream>,
    respond: SendResponse<Bytes>,
) {
    let (parts, body) = req.into_parts();
    let (buf, head) = assemble(&parts, !body.is_end_stream());
    let head_method = parts.method == Method::HEAD;
    let sender = Rc::new(RefCell::new(Sender::Head(respond)));
    let mut stream = Stream {
        buf,
        body_done: body.is_end_stream(),
        body,
        sender: sender.clone(),
        fields: Answer::default(),
        pending: None,
    };
    let work = async {
        match head {
            Ok(head) => exchange::handle(&worker, &origin, &mut stream, &head).await,
            Err(e) => exchange::refuse_head(&worker, &origin, &mut stream, e, head_method).await,
        }
    };
    // Counted as in flight until the answer is out or the client reset.
    let _in_flight = exchange::InFlight::new(worker.clone());
    let reset = poll_fn(|cx| sender.borrow_mut().poll_reset(cx));
    let served = tokio::select! {
        served = work => Some(served),
        () = reset => None,
    };
    let mut sender = sender.borrow_mut();
    match served {
        // The request's work (gate, upstream) stopped with the stream.
        None => resets.note(),
        Some(_)
            if sender
                .poll_reset(&mut Context::from_waker(std::task::Waker::noop()))
                .is_ready() =>
        {
            resets.note()
        }
        // Cut off, or never answered: the client must not take it as whole.
        Some(_) if !matches!(*sender, Sender::Done) => sender.reset(Reason::INTERNAL_ERROR),
        Some(_) => {}
    }
}

/// The stream's head as an HTTP/1.1 head would be: `host` from
/// `:authority`, cookies joined (RFC 9113 §8.2.3), [`CONNECTION_SPECIFIC`]
/// fields dropped, and a body without a
/// `content-length` marked chunked, so that the one validation of
/// `http1::parse` reads it exactly as it reads HTTP/1.1.
pub fn assemble(
    parts: &http::request::Parts,
    has_body: bool,
) -> (Vec<u8>, Result<RequestHead, WireError>) {
    let target = match parts.uri.path_and_query() {
        Some(pq) => pq.as_str(),
        None if parts.method == Method::CONNECT => "",
        None => "/",
    };
    let mut head = Assembled::new(spare::take(1024), target.as_bytes());
    let authority = parts.uri.authority().map(|a| a.as_str());
    if let Some(a) = authority {
        head.field(b"host", a.as_bytes());
    }
    let mut cookies: Vec<&[u8]> = Vec::new();
    for (name, value) in &parts.headers {
        match name.as_str() {
            // One Host: a second that differs from :authority makes the
            // check refuse the request as it would over HTTP/1.1.
            "host" if authority.is_some_and(|a| a.as_bytes() == value.as_bytes()) => {}
            "cookie" => cookies.push(value.as_bytes()),
            n if connection_specific(n.as_bytes()) => {}
            n => head.field(n.as_bytes(), value.as_bytes()),
        }
    }
    if !cookies.is_empty() {
        head.field(b"cookie", &cookies.join(&b"; "[..]));
    }
    if has_body && !parts.headers.contains_key(http::header::CONTENT_LENGTH) {
        head.field(b"transfer-encoding", b"chunked");
    }
    head.finish(parts.method.as_str().as_bytes())
}

/// Fields that belong to an HTTP/1.1 connection, not to a stream (RFC 9113
/// §8.2.2), and `expect` (flow control replaces 100-continue): dropped from
/// a stream's head and from its answer alike.
pub const CONNECTION_SPECIFIC: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "http2-settings",
    "expect",
];

fn connection_specific(name: &[u8]) -> bool {
    CONNECTION_SPECIFIC
        .iter()
        .any(|n| name.eq_ignore_ascii_case(n.as_bytes()))
}

/// The sending side of a stream, as far as it has come.
enum Sender {
    Head(SendResponse<Bytes>),
    Body(SendStream<Bytes>),
    Done,
}

impl Sender {
    /// Ready once the client reset the stream; never after the answer ended.
    fn poll_reset(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self {
            Sender::Head(r) => r.poll_reset(cx).map(drop),
            Sender::Body(s) => s.poll_reset(cx).map(drop),
            Sender::Done => Poll::Pending,
        }
    }

    fn reset(&mut self, reason: Reason) {
        match self {
            Sender::Head(r) => r.send_reset(reason),
            Sender::Body(s) => s.send_reset(reason),
            Sender::Done => {}
        }
        *self = Sender::Done;
    }
}

/// An answer's header list, without [`CONNECTION_SPECIFIC`] fields.
///
/// Values are gathered in one buffer and handed to `http` as slices of it
/// (one allocation for all of them, not one each), and the names keygate
/// itself writes are `http`'s static ones.
#[derive(Default)]
struct Answer {
    status: u16,
    names: Vec<(HeaderName, std::ops::Range<usize>)>,
    values: bytes::BytesMut,
}

/// Names keygate writes on most answers, without an allocation each.
const OWN_NAMES: [&str; 7] = [
    "x-request-id",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "ratelimit-policy",
    "ratelimit",
    "www-authenticate",
];

impl Fields for Answer {
    fn field(&mut self, name: &[u8], value: &[u8]) {
        if connection_specific(name) {
            return;
        }
        let own = OWN_NAMES.iter().find(|n| n.as_bytes() == name);
        let name = match own {
            Some(n) => HeaderName::from_static(n),
            None => match HeaderName::from_bytes(name) {
                Ok(n) => n,
                Err(_) => return,
            },
        };
        let start = self.values.len();
        self.values.extend_from_slice(value);
        self.names.push((name, start..self.values.len()));
    }
}

impl Answer {
    fn clear(&mut self, status: u16) {
        self.status = status;
        self.names.clear();
        self.values.clear();
    }

    /// The header map, the values as slices of one buffer.
    fn headers(&mut self) -> HeaderMap {
        let values = self.values.split().freeze();
        let mut map = HeaderMap::with_capacity(self.names.len() + 1);
        for (name, range) in self.names.drain(..) {
            if let Ok(value) = HeaderValue::from_maybe_shared(values.slice(range)) {
                map.append(name, value);
            }
        }
        map
    }
}

/// One stream, for the application.
pub struct Stream {
    buf: Vec<u8>,
    body: RecvStream,
    body_done: bool,
    sender: Rc<RefCell<Sender>>,
    fields: Answer,
    /// The answer's head, sent with its first DATA (or alone).
    pending: Option<Response<()>>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        spare::give(std::mem::take(&mut self.buf));
    }
}

impl Stream {
    /// Take one DATA frame's bytes into `out`.
    fn take(&mut self, data: Bytes, out: &mut Vec<u8>) -> usize {
        let _ = self.body.flow_control().release_capacity(data.len());
        out.extend_from_slice(&data);
        self.body_done = self.body.is_end_stream();
        data.len()
    }

    /// Send `data` as flow control allows, giving up after [`SEND_TIMEOUT`]
    /// without progress or when the client resets the stream.
    async fn send_data(&self, mut data: Bytes, end: bool) -> io::Result<()> {
        let gone = || io::Error::from(io::ErrorKind::ConnectionReset);
        while !data.is_empty() {
            let granted = tokio::time::timeout(
                SEND_TIMEOUT,
                poll_fn(|cx| {
                    let mut sender = self.sender.borrow_mut();
                    let Sender::Body(send) = &mut *sender else {
                        return Poll::Ready(None);
                    };
                    send.reserve_capacity(data.len());
                    if send.poll_reset(cx).is_ready() {
                        return Poll::Ready(None);
                    }
                    send.poll_capacity(cx)
                }),
            )
            .await;
            let n = match granted {
                Ok(Some(Ok(n))) if n > 0 => n.min(data.len()),
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_)) | None) => return Err(gone()),
                Err(_) => {
                    METRICS
                        .http2_goaways
                        .with_label_values(&["send_timeout"])
                        .inc();
                    self.sender.borrow_mut().reset(Reason::CANCEL);
                    return Err(gone());
                }
            };
            let chunk = data.split_to(n);
            let mut sender = self.sender.borrow_mut();
            let Sender::Body(send) = &mut *sender else {
                return Err(gone());
            };
            send.send_data(chunk, end && data.is_empty())
                .map_err(|_| gone())?;
        }
        if end {
            *self.sender.borrow_mut() = Sender::Done;
        }
        Ok(())
    }
}

impl Downstream for Stream {
    fn head_buf(&self) -> &[u8] {
        &self.buf
    }

    fn body_done(&self) -> bool {
        self.body_done
    }

    fn body_in_hand(&mut self, out: &mut Vec<u8>) -> Result<usize, BodyFailure> {
        let mut used = 0;
        let mut cx = Context::from_waker(std::task::Waker::noop());
        while !self.body_done {
            match self.body.poll_data(&mut cx) {
                Poll::Ready(Some(Ok(data))) => used += self.take(data, out),
                Poll::Ready(Some(Err(_))) => return Err(BodyFailure::Gone),
                Poll::Ready(None) => self.body_done = true,
                Poll::Pending => break,
            }
        }
        Ok(used)
    }

    async fn pull_body(&mut self, out: &mut Vec<u8>) -> Result<usize, BodyFailure> {
        if self.body_done {
            return Ok(0);
        }
        match tokio::time::timeout(CLIENT_TIMEOUT, self.body.data()).await {
            Ok(Some(Ok(data))) => Ok(self.take(data, out)),
            Ok(None) => {
                self.body_done = true;
                Ok(0)
            }
            // Reset, broken, or stalled: trailers are not forwarded, and a
            // body that stops is a client gone.
            Ok(Some(Err(_))) | Err(_) => Err(BodyFailure::Gone),
        }
    }

    async fn continue_100(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn answer(&mut self, status: u16, _reason: &[u8]) -> &mut dyn Fields {
        self.fields.clear(status);
        self.pending = None;
        &mut self.fields
    }

    fn end_head(&mut self, body: AnswerBody, _close: bool, _switched_to: Option<&str>) {
        let length = match body {
            AnswerBody::Length(n) => Some(n),
            AnswerBody::Declared { length, .. } => length,
            AnswerBody::Streamed | AnswerBody::Empty => None,
        };
        let mut headers = self.fields.headers();
        if let Some(n) = length {
            headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        let mut response = Response::new(());
        *response.status_mut() =
            http::StatusCode::from_u16(self.fields.status).unwrap_or(http::StatusCode::BAD_GATEWAY);
        *response.headers_mut() = headers;
        self.pending = Some(response);
    }

    async fn send(&mut self, data: &[u8], last: bool) -> io::Result<u64> {
        let gone = || io::Error::from(io::ErrorKind::ConnectionReset);
        let mut sent = 0;
        if let Some(response) = self.pending.take() {
            let end = last && data.is_empty();
            let mut sender = self.sender.borrow_mut();
            let Sender::Head(respond) = &mut *sender else {
                return Err(gone());
            };
            let stream = respond.send_response(response, end).map_err(|_| gone())?;
            *sender = if end {
                Sender::Done
            } else {
                Sender::Body(stream)
            };
            // A HEADERS frame's own header, for the byte count.
            sent += 9;
            if end {
                return Ok(sent);
            }
        }
        if data.is_empty() {
            if last {
                let mut sender = self.sender.borrow_mut();
                if let Sender::Body(send) = &mut *sender {
                    send.send_data(Bytes::new(), true).map_err(|_| gone())?;
                }
                *sender = Sender::Done;
            }
            return Ok(sent);
        }
        self.send_data(Bytes::copy_from_slice(data), last).await?;
        Ok(sent + data.len() as u64)
    }

    async fn tunnel(
        &mut self,
        _upstream: &mut upstream::Conn,
        _early: &[u8],
        _idle: Duration,
    ) -> io::Result<()> {
        // No `Upgrade` crosses HTTP/2 (it is dropped from the head), so no
        // `101` is ever agreed for a stream.
        Err(io::ErrorKind::Unsupported.into())
    }
}

#[cfg(test)]
mod tests {
    use super::assemble;

    fn head(req: http::Request<()>, has_body: bool) -> String {
        let (parts, ()) = req.into_parts();
        let (buf, head) = assemble(&parts, has_body);
        let head = head.expect("a valid head");
        let mut text = format!("{} ", head.method);
        text.push_str(std::str::from_utf8(head.target.get(&buf)).unwrap());
        for h in &head.headers {
            text.push_str(&format!(
                "|{}: {}",
                String::from_utf8_lossy(h.name.get(&buf)),
                String::from_utf8_lossy(h.value.get(&buf))
            ));
        }
        text
    }

    #[test]
    fn a_stream_becomes_one_checked_head() {
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
            "POST /v1/vms?x=1|host: api.example.com|x-api-key: k|cookie: a=1; b=2|transfer-encoding: chunked"
        );
    }

    #[test]
    fn a_host_that_differs_from_the_authority_is_refused_as_over_http1() {
        let req = http::Request::builder()
            .uri("https://a.example/")
            .header("host", "b.example")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let (_, head) = assemble(&parts, false);
        assert!(head.is_err());
        let same = http::Request::builder()
            .uri("https://a.example/")
            .header("host", "a.example")
            .body(())
            .unwrap();
        assert_eq!(head_count(same), 1);
    }

    fn head_count(req: http::Request<()>) -> usize {
        head(req, false).matches("host:").count()
    }

    #[test]
    fn a_value_padded_with_whitespace_is_refused_not_trimmed() {
        let req = http::Request::builder()
            .uri("https://a.example/")
            .header("x-api-key", "key ")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        assert!(assemble(&parts, false).1.is_err());
    }

    #[test]
    fn the_strict_rules_of_http1_apply_to_a_stream() {
        for (method, uri) in [("get", "https://a.example/"), ("GET", "https://a.example/")] {
            let req = http::Request::builder()
                .method(method)
                .uri(uri)
                .header("content-length", if method == "GET" { "1,1" } else { "1" })
                .body(())
                .unwrap();
            let (parts, ()) = req.into_parts();
            assert!(assemble(&parts, false).1.is_err(), "{method} {uri}");
        }
    }
}
