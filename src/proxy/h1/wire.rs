//! HTTP/1.1 message framing (RFC 9112): request and response heads parsed in
//! place with `httparse`, their body framing, and a chunked-coding scanner
//! that finds where a message ends without copying it. Pure functions over
//! byte slices; no I/O.

use std::mem::MaybeUninit;

use http::Method;

use crate::gate::HeaderSource;

/// A head longer than this is refused (431), as nginx's
/// `large_client_header_buffers` default of 4 × 8 KiB roughly does.
pub const MAX_HEAD: usize = 64 * 1024;
/// More header lines than this are refused (431).
pub const MAX_HEADERS: usize = 128;
/// Trailer section of a chunked body, in bytes.
const MAX_TRAILERS: usize = 16 * 1024;

/// Why a message could not be read; each maps to one status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireError {
    /// 400: not HTTP/1.x, or ambiguous framing.
    Malformed(&'static str),
    /// 431: too many or too long header lines.
    TooLarge,
    /// 408: the head did not arrive in time.
    Timeout,
}

impl WireError {
    pub fn status(self) -> u16 {
        match self {
            WireError::Malformed(_) => 400,
            WireError::TooLarge => 431,
            WireError::Timeout => 408,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            WireError::Malformed(why) => why,
            WireError::TooLarge => "the request head is too large",
            WireError::Timeout => "the request was not received in time",
        }
    }
}

/// A byte range of the buffer a head was parsed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    start: u32,
    end: u32,
}

impl Span {
    fn of(buf: &[u8], part: &[u8]) -> Span {
        let start = part.as_ptr() as usize - buf.as_ptr() as usize;
        Span {
            start: start as u32,
            end: (start + part.len()) as u32,
        }
    }

    pub fn get<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        &buf[self.start as usize..self.end as usize]
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Header {
    pub name: Span,
    pub value: Span,
}

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    None,
    Length(u64),
    Chunked,
    /// Until the sender closes (responses only).
    Close,
}

#[derive(Debug)]
pub struct RequestHead {
    pub method: Method,
    pub target: Span,
    /// HTTP/1.`minor`.
    pub minor: u8,
    pub headers: Vec<Header>,
    /// Bytes the head took, blank line included.
    pub len: usize,
    pub body: BodyKind,
    /// The client will send another request on this connection.
    pub keep_alive: bool,
    pub expect_continue: bool,
    /// `Connection: upgrade` with an `Upgrade` header (WebSocket).
    pub upgrade: bool,
}

#[derive(Debug)]
pub struct ResponseHead {
    pub status: u16,
    pub reason: Span,
    pub headers: Vec<Header>,
    pub len: usize,
    pub body: BodyKind,
    /// The upstream keeps the connection open after this response.
    pub keep_alive: bool,
}

/// Headers of a parsed head, read in place.
pub struct HeadView<'a> {
    pub buf: &'a [u8],
    pub headers: &'a [Header],
}

impl HeaderSource for HeadView<'_> {
    fn values<'s>(&'s self, name: &'s str) -> impl DoubleEndedIterator<Item = &'s [u8]> + 's {
        self.headers
            .iter()
            .filter(move |h| h.name.get(self.buf).eq_ignore_ascii_case(name.as_bytes()))
            .map(move |h| h.value.get(self.buf))
    }
}

/// What the framing headers of one message said.
#[derive(Default)]
struct Framing {
    length: Option<u64>,
    chunked: bool,
    /// A transfer coding other than a final `chunked`.
    other_coding: bool,
    close: bool,
    keep_alive: bool,
    upgrade_token: bool,
    upgrade_header: bool,
    expect_continue: bool,
    hosts: usize,
}

fn framing(buf: &[u8], headers: &[Header]) -> Result<Framing, WireError> {
    let mut f = Framing::default();
    for h in headers {
        let name = h.name.get(buf);
        let value = h.value.get(buf);
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_length(value)?;
            if f.length.is_some_and(|m| m != n) {
                return Err(WireError::Malformed("conflicting Content-Length headers"));
            }
            f.length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Only the last coding decides; `chunked` anywhere but last is not HTTP/1.1.
            for coding in tokens(value) {
                if f.chunked {
                    f.other_coding = true;
                }
                if coding.eq_ignore_ascii_case(b"chunked") {
                    f.chunked = true;
                    f.other_coding = false;
                } else {
                    f.chunked = false;
                    f.other_coding = true;
                }
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            for t in tokens(value) {
                if t.eq_ignore_ascii_case(b"close") {
                    f.close = true;
                } else if t.eq_ignore_ascii_case(b"keep-alive") {
                    f.keep_alive = true;
                } else if t.eq_ignore_ascii_case(b"upgrade") {
                    f.upgrade_token = true;
                }
            }
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            f.upgrade_header = true;
        } else if name.eq_ignore_ascii_case(b"host") {
            f.hosts += 1;
        } else if name.eq_ignore_ascii_case(b"expect") {
            f.expect_continue = value.eq_ignore_ascii_case(b"100-continue");
        }
    }
    Ok(f)
}

fn parse_length(value: &[u8]) -> Result<u64, WireError> {
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return Err(WireError::Malformed("invalid Content-Length"));
    }
    Ok(value.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

/// The comma-separated, trimmed, non-empty tokens of a header value.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

fn spans(buf: &[u8], parsed: &[httparse::Header<'_>], out: &mut Vec<Header>) {
    out.clear();
    out.extend(parsed.iter().map(|h| Header {
        name: Span::of(buf, h.name.as_bytes()),
        value: Span::of(buf, h.value),
    }));
}

fn parse_error(e: httparse::Error) -> WireError {
    match e {
        httparse::Error::TooManyHeaders => WireError::TooLarge,
        httparse::Error::Version => WireError::Malformed("only HTTP/1.0 and HTTP/1.1 are served"),
        _ => WireError::Malformed("the request could not be parsed as HTTP/1.1"),
    }
}

/// Parse a request head at the start of `buf`; `Ok(None)` until it is whole.
/// `headers` is reused storage.
pub fn parse_request(
    buf: &[u8],
    mut headers: Vec<Header>,
) -> Result<Option<RequestHead>, WireError> {
    let mut raw = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut raw) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Err(WireError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(parse_error(e)),
    };
    if len > MAX_HEAD {
        return Err(WireError::TooLarge);
    }
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(WireError::Malformed("incomplete request line"));
    };
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| WireError::Malformed("invalid method"))?;
    spans(buf, req.headers, &mut headers);
    let f = framing(buf, &headers)?;
    if minor == 1 && f.hosts != 1 {
        // RFC 9112 §3.2: a server must refuse a request without exactly one.
        return Err(WireError::Malformed(
            "an HTTP/1.1 request needs exactly one Host header",
        ));
    }
    let body = match (f.chunked || f.other_coding, f.length) {
        (true, Some(_)) => {
            // RFC 9112 §6.3: a smuggling vector; refuse rather than pick one.
            return Err(WireError::Malformed(
                "both Transfer-Encoding and Content-Length",
            ));
        }
        (true, None) if f.other_coding || minor == 0 => {
            return Err(WireError::Malformed("unsupported Transfer-Encoding"));
        }
        (true, None) => BodyKind::Chunked,
        (false, Some(0) | None) => BodyKind::None,
        (false, Some(n)) => BodyKind::Length(n),
    };
    let keep_alive = if minor == 0 {
        f.keep_alive && !f.close
    } else {
        !f.close
    };
    Ok(Some(RequestHead {
        method,
        target: Span::of(buf, target.as_bytes()),
        minor,
        headers,
        len,
        body,
        keep_alive,
        expect_continue: f.expect_continue && minor == 1 && body != BodyKind::None,
        upgrade: f.upgrade_token && f.upgrade_header,
    }))
}

/// Parse a response head to a request of `method`; `Ok(None)` until whole.
pub fn parse_response(
    buf: &[u8],
    method: &Method,
    mut headers: Vec<Header>,
) -> Result<Option<ResponseHead>, WireError> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut raw);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Err(WireError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => {
            return Err(WireError::Malformed(
                "the upstream's answer is not HTTP/1.x",
            ))
        }
    };
    let (Some(status), Some(minor)) = (resp.code, resp.version) else {
        return Err(WireError::Malformed("incomplete status line"));
    };
    let reason = Span::of(buf, resp.reason.unwrap_or("").as_bytes());
    spans(buf, resp.headers, &mut headers);
    let f = framing(buf, &headers)?;
    let body = if *method == Method::HEAD || status < 200 || status == 204 || status == 304 {
        BodyKind::None
    } else if f.chunked && !f.other_coding {
        BodyKind::Chunked
    } else if f.chunked || f.other_coding {
        BodyKind::Close
    } else {
        match f.length {
            Some(0) => BodyKind::None,
            Some(n) => BodyKind::Length(n),
            None => BodyKind::Close,
        }
    };
    let keep_alive = if minor == 0 {
        f.keep_alive && !f.close
    } else {
        !f.close
    };
    Ok(Some(ResponseHead {
        status,
        reason,
        headers,
        len,
        body,
        keep_alive: keep_alive && body != BodyKind::Close,
    }))
}

/// Finds the end of a chunked body as its bytes go by, and reports the
/// payload ranges (for decoding when the receiver cannot take chunks).
#[derive(Debug, Default)]
pub struct Chunked {
    state: State,
    remaining: u64,
    digits: u8,
    trailer_bytes: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    #[default]
    Size,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    EndLf,
    Done,
}

impl Chunked {
    pub fn done(&self) -> bool {
        self.state == State::Done
    }

    /// Consume bytes of the body up to its end; returns how many belonged to
    /// it. `payload` receives each run of chunk data.
    pub fn feed(
        &mut self,
        input: &[u8],
        mut payload: impl FnMut(&[u8]),
    ) -> Result<usize, WireError> {
        let bad = |why| Err(WireError::Malformed(why));
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if self.digits >= 15 {
                            return bad("chunk size too large");
                        }
                        let d = (b as char).to_digit(16).unwrap_or(0);
                        self.remaining = self.remaining * 16 + u64::from(d);
                        self.digits += 1;
                    }
                    b';' | b' ' | b'\t' if self.digits > 0 => self.state = State::Extension,
                    b'\r' if self.digits > 0 => self.state = State::SizeLf,
                    _ => return bad("invalid chunk size"),
                },
                State::Extension => match b {
                    b'\r' => self.state = State::SizeLf,
                    b'\n' => return bad("bare LF in chunked body"),
                    _ => {}
                },
                State::SizeLf => {
                    if b != b'\n' {
                        return bad("invalid chunk size line");
                    }
                    self.digits = 0;
                    self.state = if self.remaining == 0 {
                        State::TrailerStart
                    } else {
                        State::Data
                    };
                }
                State::Data => {
                    let n = (self.remaining.min((input.len() - i) as u64)) as usize;
                    payload(&input[i..i + n]);
                    self.remaining -= n as u64;
                    i += n;
                    if self.remaining == 0 {
                        self.state = State::DataCr;
                    }
                    continue;
                }
                State::DataCr if b == b'\r' => self.state = State::DataLf,
                State::DataLf if b == b'\n' => self.state = State::Size,
                State::DataCr | State::DataLf => return bad("chunk data not followed by CRLF"),
                State::TrailerStart => match b {
                    b'\r' => self.state = State::EndLf,
                    _ => self.state = State::TrailerLine,
                },
                State::TrailerLine => {
                    self.trailer_bytes += 1;
                    if self.trailer_bytes > MAX_TRAILERS {
                        return bad("trailers too large");
                    }
                    if b == b'\n' {
                        self.state = State::TrailerStart;
                    }
                }
                State::EndLf => {
                    if b != b'\n' {
                        return bad("invalid end of chunked body");
                    }
                    self.state = State::Done;
                    return Ok(i + 1);
                }
                State::Done => return Ok(i),
            }
            i += 1;
        }
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(text: &str) -> Result<Option<RequestHead>, WireError> {
        parse_request(text.as_bytes(), Vec::new())
    }

    #[test]
    fn a_simple_request_keeps_alive() {
        let text = "GET /v1/vms?x=1 HTTP/1.1\r\nHost: a\r\nX-API-Key: k\r\n\r\nrest";
        let head = req(text).unwrap().unwrap();
        assert_eq!(head.method, Method::GET);
        assert_eq!(head.target.get(text.as_bytes()), b"/v1/vms?x=1");
        assert_eq!(head.len, text.len() - 4);
        assert_eq!(head.body, BodyKind::None);
        assert!(head.keep_alive);
        let view = HeadView {
            buf: text.as_bytes(),
            headers: &head.headers,
        };
        assert_eq!(view.values("x-api-key").collect::<Vec<_>>(), [b"k"]);
    }

    #[test]
    fn a_partial_head_waits_and_a_huge_one_is_refused() {
        assert!(req("GET / HTTP/1.1\r\nHost: a\r\n").unwrap().is_none());
        let huge = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD));
        assert_eq!(req(&huge).unwrap_err(), WireError::TooLarge);
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("H{i}: v\r\n"))
            .collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(req(&many).unwrap_err(), WireError::TooLarge);
    }

    #[test]
    fn framing_that_could_smuggle_is_refused() {
        for bad in [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1e3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/2.0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        ] {
            assert_eq!(req(bad).unwrap_err().status(), 400, "{bad:?}");
        }
        let same =
            req("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(same.unwrap().unwrap().body, BodyKind::Length(3));
        // A final `chunked` frames the body whatever was applied before it.
        let chunked = req("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n");
        assert_eq!(chunked.unwrap().unwrap().body, BodyKind::Chunked);
        let chunked = req("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(chunked.unwrap().unwrap().body, BodyKind::Chunked);
    }

    #[test]
    fn keep_alive_follows_version_and_connection() {
        let ka = |t: &str| req(t).unwrap().unwrap().keep_alive;
        assert!(!ka(
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        ));
        assert!(!ka("GET / HTTP/1.0\r\n\r\n"));
        assert!(ka("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
        let up =
            req("GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n");
        assert!(up.unwrap().unwrap().upgrade);
    }

    #[test]
    fn response_bodies_follow_method_and_status() {
        let body = |method: Method, text: &str| {
            parse_response(text.as_bytes(), &method, Vec::new())
                .unwrap()
                .unwrap()
                .body
        };
        let cl = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(body(Method::GET, cl), BodyKind::Length(5));
        assert_eq!(body(Method::HEAD, cl), BodyKind::None);
        assert_eq!(
            body(Method::GET, "HTTP/1.1 204 No Content\r\n\r\n"),
            BodyKind::None
        );
        assert_eq!(
            body(Method::GET, "HTTP/1.1 200 OK\r\n\r\n"),
            BodyKind::Close
        );
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(body(Method::GET, chunked), BodyKind::Chunked);
        let head = parse_response(b"HTTP/1.1 200 OK\r\n\r\n", &Method::GET, Vec::new());
        assert!(
            !head.unwrap().unwrap().keep_alive,
            "a close-delimited body ends the connection"
        );
    }

    #[test]
    fn chunked_bodies_end_where_they_end_in_any_split() {
        let body = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        for split in 0..body.len() {
            let mut c = Chunked::default();
            let mut data = Vec::new();
            let a = c
                .feed(&body[..split], |d| data.extend_from_slice(d))
                .unwrap();
            assert_eq!(a, split.min(body.len() - 4));
            let b = c.feed(&body[a..], |d| data.extend_from_slice(d)).unwrap();
            assert!(c.done());
            assert_eq!(a + b, body.len() - 4);
            assert_eq!(data, b"Wikipedia");
        }
    }

    #[test]
    fn broken_chunked_bodies_are_errors() {
        for bad in [
            &b"x\r\n"[..],
            b"4\r\nWikiX",
            b"\r\n",
            b"ffffffffffffffff\r\n",
            b"4\nWiki",
        ] {
            assert!(Chunked::default().feed(bad, |_| {}).is_err(), "{bad:?}");
        }
    }
}
