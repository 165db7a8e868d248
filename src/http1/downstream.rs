//! The seam between a client's protocol and the application: what the
//! application may ask of the side a request came from, whether that is an
//! HTTP/1.1 connection ([`super::conn::Conn`]) or an HTTP/2 stream. The
//! application reads a parsed head and decoded body bytes, and writes a
//! status, fields and body bytes; how they are framed (`content-length` or
//! chunks, `connection: close`, HEADERS and DATA frames) is the
//! downstream's business alone.

use std::io;
use std::time::Duration;

use super::body::BodyError;
use super::upstream;

/// Why a request body could not be read to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFailure {
    /// The client went away (or stopped sending for the body timeout).
    Gone,
    /// The body's framing broke; the reason, for the 400.
    Malformed(&'static str),
}

impl From<BodyError> for BodyFailure {
    fn from(e: BodyError) -> BodyFailure {
        BodyFailure::Malformed(match e {
            BodyError::Malformed(why) => why,
            BodyError::Truncated => "the request body ended early",
        })
    }
}

/// How long the body of an answer is, as far as its head can say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerBody {
    /// Exactly this many bytes (a HEAD answer declares them and sends none).
    Length(u64),
    /// Not known in advance: streamed as it comes.
    Streamed,
    /// No body, as a HEAD, 304 or 204 answer has none: the length or the
    /// chunked coding the upstream declared is passed on as declared.
    Declared { length: Option<u64>, chunked: bool },
    /// No body and nothing declared (1xx, 204).
    Empty,
}

/// Where the fields of an answer head are written: HTTP/1.1 lines or an
/// HTTP/2 header list. The writer of an answer never frames it.
pub trait Fields {
    fn field(&mut self, name: &[u8], value: &[u8]);

    /// `name: n` with `n` in decimal.
    fn field_u64(&mut self, name: &[u8], n: u64) {
        let mut digits = [0u8; 20];
        let text = super::encode::u64_digits(n, &mut digits);
        self.field(name, text);
    }
}

/// HTTP/1.1 header lines.
impl Fields for Vec<u8> {
    fn field(&mut self, name: &[u8], value: &[u8]) {
        super::encode::header(self, name, value);
    }
}

/// A header map (an answer built for `http`'s types: the admin listener's).
impl Fields for http::HeaderMap {
    fn field(&mut self, name: &[u8], value: &[u8]) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name),
            http::HeaderValue::from_bytes(value),
        ) {
            self.append(name, value);
        }
    }
}

/// The side a request came from, as the application sees it.
///
/// Every method that sends may fail with the client gone; an answer's head
/// goes out with its first body bytes, so it can still be replaced (by a
/// 502) until then.
#[allow(async_fn_in_trait)]
pub trait Downstream {
    /// The buffer the current request head's spans point into.
    fn head_buf(&self) -> &[u8];

    /// All of the request body has been read (or there is none).
    fn body_done(&self) -> bool;

    /// Decode what of the body is here already into `out`, without waiting;
    /// how many bytes that took from the client.
    fn body_in_hand(&mut self, out: &mut Vec<u8>) -> Result<usize, BodyFailure>;

    /// Decode the next piece of the body into `out`, waiting for it within
    /// the client body timeout; how many bytes that took from the client.
    async fn pull_body(&mut self, out: &mut Vec<u8>) -> Result<usize, BodyFailure>;

    /// Tell a client that sent `Expect: 100-continue` to go on (HTTP/2 has
    /// flow control instead: nothing to send).
    async fn continue_100(&mut self) -> io::Result<()>;

    /// Begin an answer; its fields are written into what this returns.
    fn answer(&mut self, status: u16, reason: &[u8]) -> &mut dyn Fields;

    /// End the answer's head: `body` says how its body is framed, `close`
    /// that the connection ends after it, `switched_to` the protocol of a
    /// `101`. Nothing is sent before the first [`Downstream::send`].
    fn end_head(&mut self, body: AnswerBody, close: bool, switched_to: Option<&str>);

    /// Send `data` of the answer's body (the head first, if it has not gone
    /// out); `last` ends the answer. The bytes this put on the wire.
    async fn send(&mut self, data: &[u8], last: bool) -> io::Result<u64>;

    /// After a `101`: the upstream's early bytes to the client, the
    /// client's early bytes to the upstream, then both ways until either
    /// side ends or neither sends for `idle`.
    async fn tunnel(
        &mut self,
        upstream: &mut upstream::Conn,
        early: &[u8],
        idle: Duration,
    ) -> io::Result<()>;
}
