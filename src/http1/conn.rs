//! One HTTP/1.1 client connection, as the engine keeps it: the buffers,
//! head reading with its deadlines, the request body's decoder (limits and
//! deadlines on every read), `100 Continue`, the answer's framing, and the
//! one place that decides what becomes of the connection after an exchange
//! ([`Conn::finish`]): kept alive, closed, or closed after a linger.
//!
//! The application sees it only as a [`Downstream`]; it never reads or
//! writes the stream itself. Generic over the stream, so plain TCP and TLS
//! share it.

use std::cell::Cell;
use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use super::body::{encode_chunk, Decoder, LAST_CHUNK};
use super::downstream::{AnswerBody, BodyFailure, Downstream, Fields};
use super::encode::{header, header_u64, status_line};
use super::parse::{self, BodyKind, Header, RequestHead, WireError};
use super::{spare, tunnel, upstream};

/// How long a started request head, or the next piece of a request body,
/// may take to arrive (nginx's `client_header_timeout` / `client_body_timeout`).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an idle keep-alive connection waits for its next request
/// (nginx's `keepalive_timeout` is 75 s).
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an unread request body is drained after an early answer.
pub const LINGER_TIME: Duration = Duration::from_secs(2);
/// How long a write to the client may make no progress (nginx's
/// `send_timeout` is 60 s): a client that stops reading does not hold its
/// connection, and an upstream connection, forever.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(60);
const READ_CHUNK: usize = 16 * 1024;

/// The connection's state after an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The request was read to its end and both sides keep the connection.
    KeepAlive,
    /// Close now.
    Close,
    /// Close after draining what the client still sends: an answer went
    /// out before its request body was read, and closing at once would
    /// make the kernel reset the connection, losing the answer (nginx's
    /// lingering close).
    Linger,
}

/// The process's shutdown, as a connection waiting between requests sees it.
pub struct Shutdown<'a> {
    /// Set when shutdown began: no new request is read.
    pub draining: &'a Cell<bool>,
    /// Wakes the connections waiting for their next request.
    pub notify: &'a Notify,
}

/// An HTTP/1.1 client connection.
pub struct Conn<S> {
    stream: S,
    /// The current request head, from offset 0; between requests, what has
    /// arrived of the next head.
    buf: Vec<u8>,
    /// Bytes received after the current head: its body, then whatever the
    /// client pipelined behind it.
    rest: Vec<u8>,
    /// How much of `rest` the current request has used.
    rest_pos: usize,
    /// The answer on its way out: a head not yet sent, then body bytes.
    out: Vec<u8>,
    /// Storage for the next head's header list.
    headers: Vec<Header>,
    /// The current request's body.
    body: Decoder,
    /// The current request's HTTP/1.`minor`.
    minor: u8,
    /// The client keeps the connection after this request.
    keep_alive: bool,
    /// The client waits for `100 Continue`, not sent yet.
    expects_continue: bool,
    /// The answer's head said `connection: close`.
    closing: bool,
    /// The answer's body is re-encoded as chunks.
    chunks: bool,
}

impl<S> Drop for Conn<S> {
    fn drop(&mut self) {
        spare::give(std::mem::take(&mut self.buf));
        spare::give(std::mem::take(&mut self.out));
        spare::give(std::mem::take(&mut self.rest));
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub fn new(stream: S) -> Conn<S> {
        Conn {
            stream,
            buf: spare::take(READ_CHUNK),
            rest: Vec::new(),
            rest_pos: 0,
            out: spare::take(4096),
            headers: Vec::new(),
            body: Decoder::new(BodyKind::None),
            minor: 1,
            keep_alive: false,
            expects_continue: false,
            closing: true,
            chunks: false,
        }
    }

    /// The next request head, or `None` when the connection should end
    /// quietly (closed, idle too long, shutting down). A head that cannot
    /// be read is the error to answer before closing.
    pub async fn next_head(
        &mut self,
        shutdown: &Shutdown<'_>,
    ) -> Option<Result<RequestHead, WireError>> {
        // Once a head has started, all of it must arrive by this time (not
        // 30 s per read, which a client sending a byte at a time would stretch).
        let mut deadline = None;
        loop {
            if !self.buf.is_empty() {
                match parse::parse_request(&self.buf, std::mem::take(&mut self.headers)) {
                    Ok(Some(head)) => {
                        self.begin(&head);
                        return Some(Ok(head));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.begin_unreadable();
                        return Some(Err(e));
                    }
                }
            }
            if self.buf.capacity() - self.buf.len() < READ_CHUNK / 2 {
                self.buf.reserve(READ_CHUNK);
            }
            let read = if self.buf.is_empty() {
                // Between requests: wait, but give way to shutdown.
                let drain = shutdown.notify.notified();
                if shutdown.draining.get() {
                    return None;
                }
                tokio::select! {
                    biased;
                    () = drain => return None,
                    r = tokio::time::timeout(KEEPALIVE_TIMEOUT, self.stream.read_buf(&mut self.buf)) => r,
                }
            } else {
                let by =
                    *deadline.get_or_insert_with(|| tokio::time::Instant::now() + CLIENT_TIMEOUT);
                tokio::time::timeout_at(by, self.stream.read_buf(&mut self.buf)).await
            };
            match read {
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(_)) => {}
                Err(_) if self.buf.is_empty() => return None,
                Err(_) => {
                    self.begin_unreadable();
                    return Some(Err(WireError::Timeout));
                }
            }
        }
    }

    /// The exchange of `head` starts: the head stays in `buf`; what came
    /// after it is its body and perhaps the next request.
    fn begin(&mut self, head: &RequestHead) {
        self.rest.clear();
        self.rest.extend_from_slice(&self.buf[head.len..]);
        self.rest_pos = 0;
        self.buf.truncate(head.len);
        self.body = Decoder::new(head.body);
        self.minor = head.minor;
        self.keep_alive = head.keep_alive;
        self.expects_continue = head.expect_continue;
        self.closing = false;
        self.chunks = false;
    }

    /// A head that could not be read gets its answer, then the end.
    fn begin_unreadable(&mut self) {
        self.body = Decoder::new(BodyKind::None);
        self.minor = 1;
        self.keep_alive = false;
        self.expects_continue = false;
        self.closing = true;
        self.chunks = false;
    }

    /// The exchange ended (`gone`: the client went away or was cut off):
    /// what the connection does next, decided here and only here. `head`
    /// returns its storage for the next one.
    pub fn finish(&mut self, head: Option<RequestHead>, gone: bool) -> Next {
        let unreadable = head.is_none();
        if let Some(head) = head {
            self.headers = head.headers;
        }
        let next = if gone {
            Next::Close
        } else if unreadable || !self.body.is_done() {
            // An unread request body cannot be skipped safely, and what a
            // client still sends after a head that could not be read is
            // drained too: closing at once would reset the connection
            // under the answer.
            Next::Linger
        } else if self.closing || !self.keep_alive {
            Next::Close
        } else {
            Next::KeepAlive
        };
        if next == Next::KeepAlive {
            // What the client sent early is the start of the next head.
            std::mem::swap(&mut self.buf, &mut self.rest);
            self.buf.drain(..self.rest_pos);
            self.rest.clear();
            self.rest_pos = 0;
        }
        next
    }

    /// End the connection as `next` says.
    pub async fn close(mut self, next: Next) {
        // Bounded: a TLS close_notify to a client that reads nothing would
        // otherwise wait forever.
        let _ = tokio::time::timeout(LINGER_TIME, self.stream.shutdown()).await;
        if next == Next::Linger {
            self.linger().await;
        }
    }

    /// Read and drop what the client still sends, for a bounded time.
    async fn linger(&mut self) {
        let deadline = tokio::time::Instant::now() + LINGER_TIME;
        // On the heap: an array here would make every connection's future
        // (moved at each spawn) 16 KiB larger.
        let mut sink = vec![0u8; 16 * 1024];
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, self.stream.read(&mut sink)).await {
            if n == 0 {
                break;
            }
        }
    }

    /// Decode from what is in `rest` into `out`.
    fn decode_rest(&mut self, out: &mut Vec<u8>) -> Result<usize, BodyFailure> {
        let used = self
            .body
            .decode(&self.rest[self.rest_pos..], |p| out.extend_from_slice(p))?;
        self.rest_pos += used;
        Ok(used)
    }
}

/// Write all of `bytes` to the client within [`SEND_TIMEOUT`].
async fn send_all<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> io::Result<()> {
    match tokio::time::timeout(SEND_TIMEOUT, stream.write_all(bytes)).await {
        Ok(result) => result,
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Downstream for Conn<S> {
    fn head_buf(&self) -> &[u8] {
        &self.buf
    }

    fn body_done(&self) -> bool {
        self.body.is_done()
    }

    fn body_in_hand(&mut self, out: &mut Vec<u8>) -> Result<usize, BodyFailure> {
        self.decode_rest(out)
    }

    async fn pull_body(&mut self, out: &mut Vec<u8>) -> Result<usize, BodyFailure> {
        if self.rest_pos == self.rest.len() {
            self.rest.clear();
            self.rest_pos = 0;
            self.rest.reserve(READ_CHUNK);
            let read =
                tokio::time::timeout(CLIENT_TIMEOUT, self.stream.read_buf(&mut self.rest)).await;
            match read {
                Ok(Ok(n)) if n > 0 => {}
                Ok(Ok(_)) => {
                    return match self.body.eof() {
                        Ok(()) => Ok(0),
                        Err(_) => Err(BodyFailure::Gone),
                    }
                }
                _ => return Err(BodyFailure::Gone),
            }
        }
        self.decode_rest(out)
    }

    async fn continue_100(&mut self) -> io::Result<()> {
        if !std::mem::take(&mut self.expects_continue) || self.body.is_done() {
            return Ok(());
        }
        send_all(&mut self.stream, b"HTTP/1.1 100 Continue\r\n\r\n").await
    }

    fn answer(&mut self, status: u16, reason: &[u8]) -> &mut dyn Fields {
        self.out.clear();
        status_line(&mut self.out, status, reason);
        &mut self.out
    }

    fn end_head(&mut self, body: AnswerBody, close: bool, switched_to: Option<&str>) {
        let http10 = self.minor == 0;
        let out = &mut self.out;
        self.chunks = body == AnswerBody::Streamed && !http10;
        match body {
            AnswerBody::Length(n) => header_u64(out, b"content-length", n),
            AnswerBody::Streamed if self.chunks => header(out, b"transfer-encoding", b"chunked"),
            // HTTP/1.0: delimited by the close.
            AnswerBody::Streamed => {}
            AnswerBody::Declared { length, chunked } => {
                if let Some(n) = length {
                    header_u64(out, b"content-length", n);
                } else if chunked && !http10 {
                    header(out, b"transfer-encoding", b"chunked");
                }
            }
            AnswerBody::Empty => {}
        }
        self.closing = close
            || !self.keep_alive
            || !self.body.is_done()
            || (http10 && body == AnswerBody::Streamed);
        if let Some(protocol) = switched_to {
            header(out, b"connection", b"upgrade");
            header(out, b"upgrade", protocol.as_bytes());
            self.closing = true;
        } else if self.closing {
            header(out, b"connection", b"close");
        }
        out.extend_from_slice(b"\r\n");
    }

    async fn send(&mut self, data: &[u8], last: bool) -> io::Result<u64> {
        if self.out.is_empty() && !self.chunks {
            // Body bytes after the head: straight from the caller's buffer.
            send_all(&mut self.stream, data).await?;
            return Ok(data.len() as u64);
        }
        if self.chunks {
            encode_chunk(&mut self.out, data);
            if last {
                self.out.extend_from_slice(LAST_CHUNK);
            }
        } else {
            self.out.extend_from_slice(data);
        }
        let sent = send_all(&mut self.stream, &self.out).await;
        let n = self.out.len() as u64;
        self.out.clear();
        sent.map(|()| n)
    }

    async fn tunnel(
        &mut self,
        upstream: &mut upstream::Conn,
        early: &[u8],
        idle: Duration,
    ) -> io::Result<()> {
        self.out.extend_from_slice(early);
        send_all(&mut self.stream, &self.out).await?;
        self.out.clear();
        let theirs = &self.rest[self.rest_pos..];
        if !theirs.is_empty() {
            upstream.write_all(theirs).await?;
        }
        if tunnel::run(&mut self.stream, upstream, idle).await == tunnel::Ended::Idle {
            tracing::debug!("upgraded connection idle for {idle:?}; closed");
        }
        Ok(())
    }
}
