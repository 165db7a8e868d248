//! The upstream exchange, as the engine does it: the request written with
//! the retry rule and its body streamed from the downstream re-framed,
//! interim answers skipped, and the answer's body relayed to the
//! downstream re-framed. What the head says and what an answer's fields
//! are is the application's; the engine answers with its own reasons
//! ([`Failure`], [`Stop`]) for the application to map to its refusals.

use std::time::{Duration, Instant};

use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::body::{encode_chunk, Decoder, LAST_CHUNK};
use super::downstream::{BodyFailure, Downstream};
use super::encode::{header, header_u64};
use super::parse::{self, Header, ResponseHead};
use super::spare;
use super::upstream::{self, Conn, ConnectError, Endpoint, Pool};

thread_local! {
    /// The header list of the last answer finished on this thread, for the
    /// next one's.
    static HEADERS: std::cell::Cell<Vec<Header>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Interim (1xx) answers skipped before an upstream is deemed broken.
const MAX_INTERIM: usize = 16;
const READ_CHUNK: usize = 16 * 1024;

/// What went wrong on the way to the upstream's answer.
#[derive(Debug)]
pub enum Failure {
    Connect(ConnectError),
    /// Closed or reset before a whole answer head arrived.
    Broken,
    Timeout,
    /// The answer was not strict HTTP/1.1 (or switched protocols unasked).
    Protocol,
}

/// Why an exchange stopped before the answer's head.
#[derive(Debug)]
pub enum Stop {
    /// The client's body failed; the upstream connection, holding half a
    /// request, is dropped.
    Client(BodyFailure),
    Upstream(Failure),
}

/// Why relaying an answer's body stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayStop {
    /// The client is gone.
    Gone,
    /// The answer broke after its head went out: the client is cut off.
    CutOff,
    /// The answer's body broke before any of it was sent: the client can
    /// still be told.
    BrokenBeforeHead,
}

/// How the request's body goes upstream.
pub enum OutBody<'a> {
    /// None; `content-length: 0` for methods that expect a body.
    None,
    /// Read by the application already (a verified webhook).
    Buffered(&'a [u8]),
    /// Streamed from the downstream, re-framed; `length` when declared.
    Client { length: Option<u64> },
}

/// What one exchange did, for the request's record (kept up to date as
/// it goes, so an exchange dropped midway still logs it).
#[derive(Debug, Default, Clone, Copy)]
pub struct Progress {
    /// The request head went to the upstream.
    pub forwarded: bool,
    /// Request body bytes taken from the client.
    pub bytes_in: u64,
    /// Answer bytes written to the client.
    pub bytes_out: u64,
}

/// The upstream's answer head, with the connection it came on.
pub struct Answer {
    pub head: ResponseHead,
    /// The bytes `head`'s spans point into, and what followed it.
    pub buf: Vec<u8>,
    pub conn: Conn,
    /// From the first write to the whole answer head.
    pub elapsed: Duration,
}

impl Answer {
    /// The connection, for the pool; the buffer goes back to the spares.
    pub fn finish(self) -> Conn {
        spare::give(self.buf);
        let mut headers = self.head.headers;
        headers.clear();
        HEADERS.with(|h| h.set(headers));
        self.conn
    }
}

/// The buffers of one upstream exchange, from the thread's spares.
struct Scratch<'a> {
    /// The request head, then re-encoded body runs: the caller's buffer.
    out: &'a mut Vec<u8>,
    /// Decoded body bytes from the client.
    body: Vec<u8>,
}

impl Drop for Scratch<'_> {
    fn drop(&mut self) {
        spare::give(std::mem::take(&mut self.body));
    }
}

/// Whether a request that failed on a reused connection, before any byte
/// of an answer came, may be sent again on a fresh one: only when the
/// upstream cannot have acted on it twice (RFC 9110 §9.2.2, idempotent
/// methods). A POST or PATCH the upstream read and then dropped is a 502.
pub fn may_retry(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    )
}

/// Send a request upstream and read its answer's head. `head` holds the
/// request line and fields (no framing, no blank line); the framing is
/// added to it in place. A body wholly in hand goes out with the head under
/// a `content-length`, and the request may then be sent again on a fresh
/// connection (see [`may_retry`]).
#[allow(clippy::too_many_arguments)]
pub async fn send<D: Downstream>(
    down: &mut D,
    pool: &Pool,
    endpoint: &Endpoint,
    timeout: Duration,
    method: &Method,
    head: &mut Vec<u8>,
    body: OutBody<'_>,
    progress: &mut Progress,
) -> Result<Answer, Stop> {
    let s = &mut Scratch {
        out: head,
        body: Vec::new(),
    };
    let chunked = match body {
        OutBody::Buffered(bytes) => {
            header_u64(s.out, b"content-length", bytes.len() as u64);
            s.out.extend_from_slice(b"\r\n");
            s.out.extend_from_slice(bytes);
            false
        }
        OutBody::None => {
            if matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
                header_u64(s.out, b"content-length", 0);
            }
            s.out.extend_from_slice(b"\r\n");
            false
        }
        OutBody::Client { length } => {
            // The body as far as it is here; wholly here, it goes out with
            // the head and can be sent again.
            s.body = spare::take(READ_CHUNK);
            let used = down.body_in_hand(&mut s.body).map_err(Stop::Client)?;
            progress.bytes_in += used as u64;
            let chunked = match length {
                _ if down.body_done() => {
                    header_u64(s.out, b"content-length", s.body.len() as u64);
                    false
                }
                Some(n) => {
                    header_u64(s.out, b"content-length", n);
                    false
                }
                None => {
                    header(s.out, b"transfer-encoding", b"chunked");
                    true
                }
            };
            s.out.extend_from_slice(b"\r\n");
            if chunked {
                encode_chunk(s.out, &s.body);
            } else {
                s.out.extend_from_slice(&s.body);
            }
            chunked
        }
    };
    let in_hand = down.body_done();
    if !in_hand && down.continue_100().await.is_err() {
        return Err(Stop::Client(BodyFailure::Gone));
    }
    let sent = Instant::now();
    let mut retried = false;
    loop {
        // A retry never goes back to the pool: a fresh connection.
        let pooled = if retried { None } else { pool.take(endpoint) };
        let (mut conn, reused) = match pooled {
            Some(conn) => (conn, true),
            None => match upstream::connect(endpoint).await {
                Ok(conn) => (conn, false),
                Err(e) => return Err(Stop::Upstream(Failure::Connect(e))),
            },
        };
        // Sent again only if the upstream cannot have acted on it twice.
        let may_retry = reused && in_hand && !retried && may_retry(method);
        match tokio::time::timeout(timeout, conn.write_all(s.out)).await {
            Ok(Ok(())) => progress.forwarded = true,
            Ok(Err(_)) if may_retry => {
                retried = true;
                continue;
            }
            Ok(Err(_)) => return Err(Stop::Upstream(Failure::Broken)),
            Err(_) => return Err(Stop::Upstream(Failure::Timeout)),
        }
        if !in_hand {
            stream_body(down, &mut conn, chunked, timeout, s, progress).await?;
        }
        let mut buf = spare::take(READ_CHUNK);
        match read_answer_head(method, &mut conn, &mut buf, timeout).await {
            Ok(head) => {
                return Ok(Answer {
                    head,
                    buf,
                    conn,
                    elapsed: sent.elapsed(),
                })
            }
            Err(Failure::Broken) if may_retry && buf.is_empty() => {
                spare::give(buf);
                retried = true;
            }
            Err(f) => {
                spare::give(buf);
                return Err(Stop::Upstream(f));
            }
        }
    }
}

/// Decode the rest of the request body and send it on, re-encoded.
async fn stream_body<D: Downstream>(
    down: &mut D,
    conn: &mut Conn,
    chunked: bool,
    timeout: Duration,
    s: &mut Scratch<'_>,
    progress: &mut Progress,
) -> Result<(), Stop> {
    while !down.body_done() {
        s.body.clear();
        let used = down.pull_body(&mut s.body).await.map_err(Stop::Client)?;
        progress.bytes_in += used as u64;
        s.out.clear();
        if chunked {
            encode_chunk(s.out, &s.body);
            if down.body_done() {
                s.out.extend_from_slice(LAST_CHUNK);
            }
        }
        let bytes: &[u8] = if chunked { s.out } else { &s.body };
        if bytes.is_empty() {
            continue;
        }
        match tokio::time::timeout(timeout, conn.write_all(bytes)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(Stop::Upstream(Failure::Broken)),
            Err(_) => return Err(Stop::Upstream(Failure::Timeout)),
        }
    }
    Ok(())
}

/// The answer's head, interim answers (100, 103) skipped: they are not
/// relayed, and a stream of them is a broken upstream.
async fn read_answer_head(
    method: &Method,
    conn: &mut Conn,
    buf: &mut Vec<u8>,
    timeout: Duration,
) -> Result<ResponseHead, Failure> {
    let mut interim = 0;
    let mut headers: Vec<Header> = HEADERS.with(|h| h.take());
    loop {
        if !buf.is_empty() {
            match parse::parse_response(buf, method, std::mem::take(&mut headers)) {
                Ok(Some(resp)) if resp.status < 200 && resp.status != 101 => {
                    interim += 1;
                    if interim > MAX_INTERIM {
                        return Err(Failure::Protocol);
                    }
                    buf.drain(..resp.len);
                    headers = resp.headers;
                    continue;
                }
                Ok(Some(resp)) => return Ok(resp),
                Ok(None) => {}
                Err(_) => return Err(Failure::Protocol),
            }
        }
        buf.reserve(READ_CHUNK);
        match tokio::time::timeout(timeout, conn.read_buf(buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Err(Failure::Broken),
            Ok(Ok(_)) => {}
            Err(_) => return Err(Failure::Timeout),
        }
    }
}

/// Relay the answer's body to the downstream, whose head the application
/// has ended. `Ok(true)` when the upstream connection ended exactly at the
/// body's end (it may be pooled again).
pub async fn relay<D: Downstream>(
    down: &mut D,
    answer: &mut Answer,
    timeout: Duration,
    progress: &mut Progress,
) -> Result<bool, RelayStop> {
    let mut decoder = Decoder::new(answer.head.body);
    let mut pos = answer.head.len;
    let mut head_sent = false;
    // Only a body split by chunk framing is gathered: empty (no allocation)
    // for the usual answer with a length.
    let mut payload = Vec::new();
    let result = loop {
        payload.clear();
        let avail = &answer.buf[pos..];
        // A body in one run (a length, or one chunk) is sent from where it
        // lies; only runs split by chunk framing are gathered.
        let mut run: Option<std::ops::Range<usize>> = None;
        let decoded = decoder.decode(avail, |p| {
            let at = p.as_ptr() as usize - avail.as_ptr() as usize;
            match run.take() {
                None if payload.is_empty() => run = Some(at..at + p.len()),
                first => {
                    if let Some(first) = first {
                        payload.extend_from_slice(&avail[first]);
                    }
                    payload.extend_from_slice(p);
                }
            }
        });
        let used = match decoded {
            Ok(n) => n,
            Err(_) if !head_sent => break Err(RelayStop::BrokenBeforeHead),
            // Broken framing: the client sees the answer cut off.
            Err(_) => break Err(RelayStop::CutOff),
        };
        let data = match &run {
            Some(r) => &avail[r.clone()],
            None => &payload[..],
        };
        let extra = avail.len() > used;
        let done = decoder.is_done();
        if done || !data.is_empty() || !head_sent {
            match down.send(data, done).await {
                Ok(n) => progress.bytes_out += n,
                Err(_) => break Err(RelayStop::Gone),
            }
            head_sent = true;
        }
        if done {
            break Ok(!extra);
        }
        pos = 0;
        answer.buf.clear();
        answer.buf.reserve(READ_CHUNK);
        match tokio::time::timeout(timeout, answer.conn.read_buf(&mut answer.buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(Ok(_)) if decoder.eof().is_ok() => {
                // A close-delimited answer ended.
                match down.send(&[], true).await {
                    Ok(n) => progress.bytes_out += n,
                    Err(_) => break Err(RelayStop::Gone),
                }
                break Ok(false);
            }
            // Cut off mid-body, reset, or too slow: never a complete answer.
            _ => break Err(RelayStop::CutOff),
        }
    };
    spare::give(payload);
    result
}
