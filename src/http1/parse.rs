//! Request and response heads (RFC 9112), parsed in place with `httparse`
//! and then held to the strict grammar: where HTTP implementations are known
//! to disagree on a message (request-smuggling research: defparam/smuggler,
//! http-garden, PortSwigger's CL/TE families), the message is refused rather
//! than read one of the possible ways. Pure functions over byte slices.

use std::mem::MaybeUninit;

use http::Method;

/// A head longer than this is refused (431), as nginx's
/// `large_client_header_buffers` default of 4 × 8 KiB roughly does.
pub const MAX_HEAD: usize = 64 * 1024;
/// More header lines than this are refused (431).
pub const MAX_HEADERS: usize = 128;

/// Why a message could not be read; each maps to one status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireError {
    /// 400: not HTTP/1.x, or framing other implementations could read differently.
    Malformed(&'static str),
    /// 501: a transfer coding other than `chunked`.
    UnsupportedCoding,
    /// 431: too many or too long header lines.
    TooLarge,
    /// 408: the head did not arrive in time.
    Timeout,
}

impl WireError {
    pub fn status(self) -> u16 {
        match self {
            WireError::Malformed(_) => 400,
            WireError::UnsupportedCoding => 501,
            WireError::TooLarge => 431,
            WireError::Timeout => 408,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            WireError::Malformed(why) => why,
            WireError::UnsupportedCoding => "only the chunked transfer coding is supported",
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
    /// Where `part` lies in `buf`; empty when it does not lie there (httparse
    /// hands out a static `""` for some empty fields).
    fn of(buf: &[u8], part: &[u8]) -> Span {
        let base = buf.as_ptr() as usize;
        let at = part.as_ptr() as usize;
        match at.checked_sub(base) {
            Some(start) if start + part.len() <= buf.len() => Span::new(start, start + part.len()),
            _ => Span::default(),
        }
    }

    fn new(start: usize, end: usize) -> Span {
        Span {
            start: start as u32,
            end: end as u32,
        }
    }

    pub fn get<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        &buf[self.start as usize..self.end as usize]
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
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
    /// The origin-form target (path and query); an absolute-form target has
    /// been reduced to it and its authority is in `authority`.
    pub target: Span,
    /// Where the path ends within `target` (the `?` or the end).
    pub path_len: usize,
    /// The authority of an absolute-form target (RFC 9112 §3.2.2: it
    /// replaces `Host`).
    pub authority: Option<Span>,
    /// The one `Host` header's value, if sent.
    pub host: Option<Span>,
    /// HTTP/1.`minor`.
    pub minor: u8,
    pub headers: Vec<Header>,
    /// Bytes the head took, blank line included.
    pub len: usize,
    pub body: BodyKind,
    /// The client will send another request on this connection.
    pub keep_alive: bool,
    pub expect_continue: bool,
    /// `Connection: upgrade` with an `Upgrade` header; whether it is honoured
    /// is the application's choice.
    pub upgrade: bool,
    /// A header name contains `_` (CGI-style stacks read `X_Auth` as `X-Auth`).
    pub underscore: bool,
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
    /// `Content-Length` as sent, for answers without a body (HEAD, 304).
    pub declared_length: Option<u64>,
    /// `Transfer-Encoding: chunked` was sent (also on answers without a body).
    pub declared_chunked: bool,
}

/// The headers of a parsed head, read in place.
pub struct HeadView<'a> {
    pub buf: &'a [u8],
    pub headers: &'a [Header],
}

impl<'a> HeadView<'a> {
    /// Every value of `name` (case-insensitive), first received first.
    pub fn values(&self, name: &'a [u8]) -> impl DoubleEndedIterator<Item = &'a [u8]> + 'a {
        let buf = self.buf;
        self.headers
            .iter()
            .filter(move |h| h.name.get(buf).eq_ignore_ascii_case(name))
            .map(move |h| h.value.get(buf))
    }
}

/// What the framing headers of one message said.
#[derive(Default)]
struct Framing {
    length: Option<u64>,
    lengths: usize,
    /// `Transfer-Encoding` headers seen, however empty.
    codings: usize,
    /// The codings, all headers together, were exactly one `chunked`.
    chunked: bool,
    /// The codings formed a valid list, but not just `chunked`.
    other_coding: bool,
    close: bool,
    keep_alive: bool,
    upgrade_token: bool,
    upgrade_header: bool,
    expect_continue: bool,
    hosts: usize,
    host: Option<Span>,
    underscore: bool,
}

/// Read the framing headers. Content-Length values are checked here; what
/// combinations are allowed differs for requests and responses.
fn framing(buf: &[u8], headers: &[Header]) -> Result<Framing, WireError> {
    let mut f = Framing::default();
    let mut coding_tokens = 0usize;
    let mut coding_list_ok = true;
    let mut last_chunked = false;
    for h in headers {
        let name = h.name.get(buf);
        let value = h.value.get(buf);
        if name.contains(&b'_') {
            f.underscore = true;
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_length(value)?;
            if f.length.is_some_and(|m| m != n) {
                return Err(WireError::Malformed("conflicting Content-Length headers"));
            }
            f.length = Some(n);
            f.lengths += 1;
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Every Transfer-Encoding header counts, even an empty one: a
            // peer that skips it would frame the body by Content-Length.
            f.codings += 1;
            for item in value.split(|&b| b == b',') {
                let item = item.trim_ascii();
                if !is_token(item) {
                    coding_list_ok = false;
                    continue;
                }
                coding_tokens += 1;
                last_chunked = item.eq_ignore_ascii_case(b"chunked");
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
            f.host = Some(h.value);
        } else if name.eq_ignore_ascii_case(b"expect") {
            f.expect_continue = value.eq_ignore_ascii_case(b"100-continue");
        }
    }
    if f.codings > 0 {
        if !coding_list_ok || coding_tokens == 0 {
            return Err(WireError::Malformed("invalid Transfer-Encoding"));
        }
        f.chunked = coding_tokens == 1 && last_chunked && f.codings == 1;
        f.other_coding = !f.chunked;
        if f.other_coding && last_chunked {
            // `chunked, chunked`, two headers, or a coding before `chunked`:
            // valid lists that peers frame differently.
            return Err(WireError::Malformed(
                "Transfer-Encoding must be one chunked",
            ));
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

/// RFC 9110 §5.6.2 `token`.
pub fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| is_tchar(b))
}

pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The comma-separated, trimmed, non-empty tokens of a header value.
pub fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Every line of a head ends in CRLF, and CR appears nowhere else: a bare
/// LF is a line end to some parsers and header text to others.
///
/// Every LF has a CR before it, and there are as many CRs as LFs (a CR at
/// the very end may still wait for its LF): then every CR has its LF. Found
/// with `memchr` (SIMD), not byte by byte: this ran over every byte of
/// every head twice per request and was a tenth of the proxy's own
/// instructions.
fn line_ends_are_crlf(head: &[u8]) -> bool {
    let mut lfs = 0usize;
    for at in memchr::memchr_iter(b'\n', head) {
        if at == 0 || head[at - 1] != b'\r' {
            return false;
        }
        lfs += 1;
    }
    let crs = memchr::memchr_iter(b'\r', head).count();
    crs == lfs + usize::from(head.last() == Some(&b'\r'))
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

/// `Host` and absolute-form authorities: reg-name, IP literal, port.
fn is_authority(v: &[u8]) -> bool {
    !v.is_empty()
        && v.iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:[]%".contains(&b))
}

/// The request target, reduced to origin form: `(path and query, path
/// length, authority)`. Only visible ASCII: `#` (a fragment is never sent),
/// spaces, controls, and raw non-ASCII bytes are read differently by peers.
fn split_target(buf: &[u8], target: &[u8]) -> Result<(Span, usize, Option<Span>), WireError> {
    let bad = |why| Err(WireError::Malformed(why));
    if !target.iter().all(|&b| (0x21..0x7f).contains(&b)) {
        return bad("the request target may only hold visible ASCII characters");
    }
    if target.contains(&b'#') {
        return bad("the request target must not contain a fragment (#)");
    }
    let start = Span::of(buf, target).start as usize;
    let (origin, authority) = if target.first() == Some(&b'/') {
        (start, None)
    } else {
        let scheme = [&b"http://"[..], b"https://"]
            .into_iter()
            .find(|s| target.len() > s.len() && target[..s.len()].eq_ignore_ascii_case(s));
        let Some(scheme) = scheme else {
            return bad("the request target must be a path");
        };
        let rest = &target[scheme.len()..];
        let end = rest
            .iter()
            .position(|&b| b == b'/' || b == b'?')
            .unwrap_or(rest.len());
        let authority = &rest[..end];
        if !is_authority(authority) || authority.contains(&b'@') {
            return bad("invalid authority in the request target");
        }
        if rest.get(end) != Some(&b'/') {
            return bad("an absolute request target must have a path");
        }
        let a = start + scheme.len();
        (a + end, Some(Span::new(a, a + end)))
    };
    let end = start + target.len();
    let path_len = buf[origin..end]
        .iter()
        .position(|&b| b == b'?')
        .unwrap_or(end - origin);
    if buf[origin..origin + path_len].contains(&b'\\') {
        return bad("the request path must not contain a backslash");
    }
    Ok((Span::new(origin, end), path_len, authority))
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
        Ok(httparse::Status::Partial) => {
            // A bare CR or LF already received is refused without waiting.
            let end = buf.len() - usize::from(buf.last() == Some(&b'\r'));
            if !line_ends_are_crlf(&buf[..end]) {
                return Err(WireError::Malformed("bare CR or LF in the request head"));
            }
            return Ok(None);
        }
        Err(e) => return Err(parse_error(e)),
    };
    if len > MAX_HEAD {
        return Err(WireError::TooLarge);
    }
    if !line_ends_are_crlf(&buf[..len]) {
        return Err(WireError::Malformed("bare CR or LF in the request head"));
    }
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(WireError::Malformed("incomplete request line"));
    };
    spans(buf, req.headers, &mut headers);
    check_request(
        buf,
        method.as_bytes(),
        target.as_bytes(),
        minor,
        headers,
        len,
    )
    .map(Some)
}

/// The one validation of a request head, whichever protocol brought it:
/// the method, the target, `Host`, the framing fields. `target` and the
/// header spans lie in `buf`; `len` is the head's length in it.
fn check_request(
    buf: &[u8],
    method: &[u8],
    target: &[u8],
    minor: u8,
    headers: Vec<Header>,
    len: usize,
) -> Result<RequestHead, WireError> {
    if method.iter().any(u8::is_ascii_lowercase) {
        // Methods are case-sensitive, but Django, Werkzeug and older gunicorn
        // upper-case them: `delete` would pass a rule for DELETE.
        return Err(WireError::Malformed("the method must be upper case"));
    }
    let method = Method::from_bytes(method).map_err(|_| WireError::Malformed("invalid method"))?;
    if method == Method::CONNECT {
        return Err(WireError::Malformed("CONNECT is not served"));
    }
    let (target, path_len, authority) = split_target(buf, target)?;
    let f = framing(buf, &headers)?;
    if (minor == 1 && f.hosts != 1) || f.hosts > 1 {
        // RFC 9112 §3.2: a server must refuse a request without exactly one.
        return Err(WireError::Malformed(
            "an HTTP/1.1 request needs exactly one Host header",
        ));
    }
    if let Some(host) = f.host {
        if !is_authority(host.get(buf)) {
            return Err(WireError::Malformed("invalid Host header"));
        }
    }
    if f.lengths > 1 {
        // Even equal values: some peers take the first, some refuse.
        return Err(WireError::Malformed("more than one Content-Length header"));
    }
    let body = match (f.codings > 0, f.length) {
        (true, Some(_)) => {
            // RFC 9112 §6.3: a smuggling vector; refuse rather than pick one.
            return Err(WireError::Malformed(
                "both Transfer-Encoding and Content-Length",
            ));
        }
        (true, None) if minor == 0 => {
            return Err(WireError::Malformed(
                "Transfer-Encoding in an HTTP/1.0 request",
            ));
        }
        (true, None) if f.other_coding => return Err(WireError::UnsupportedCoding),
        (true, None) => BodyKind::Chunked,
        (false, Some(0) | None) => BodyKind::None,
        (false, Some(n)) => BodyKind::Length(n),
    };
    let keep_alive = if minor == 0 {
        f.keep_alive && !f.close
    } else {
        !f.close
    };
    Ok(RequestHead {
        method,
        target,
        path_len,
        authority,
        host: f.host,
        minor,
        headers,
        len,
        body,
        keep_alive,
        expect_continue: f.expect_continue && minor == 1 && body != BodyKind::None,
        upgrade: f.upgrade_token && f.upgrade_header,
        underscore: f.underscore,
    })
}

/// A request head that arrived as a list of fields (an HTTP/2 stream's),
/// laid out in one buffer so that `check_request` reads and checks it
/// exactly as it does an HTTP/1.1 head.
pub struct Assembled {
    buf: Vec<u8>,
    headers: Vec<Header>,
    target: Span,
    /// A value began or ended with whitespace (RFC 9113 §8.2.1: malformed;
    /// HTTP/1.1's parser would have trimmed it, the gate must not see a
    /// value the upstream reads otherwise).
    padded: bool,
}

impl Assembled {
    /// Start with the request target (origin form) in `buf` (cleared).
    pub fn new(mut buf: Vec<u8>, target: &[u8]) -> Assembled {
        buf.clear();
        buf.extend_from_slice(target);
        Assembled {
            target: Span::new(0, buf.len()),
            buf,
            headers: Vec::new(),
            padded: false,
        }
    }

    pub fn field(&mut self, name: &[u8], value: &[u8]) {
        let pad = |b: Option<&u8>| matches!(b, Some(b' ' | b'\t'));
        if pad(value.first()) || pad(value.last()) {
            self.padded = true;
        }
        let start = self.buf.len();
        self.buf.extend_from_slice(name);
        let mid = self.buf.len();
        self.buf.extend_from_slice(value);
        self.headers.push(Header {
            name: Span::new(start, mid),
            value: Span::new(mid, self.buf.len()),
        });
    }

    /// The head as HTTP/1.1 would have it, held to the same rules, and the
    /// buffer its spans point into (given back on refusal too).
    pub fn finish(self, method: &[u8]) -> (Vec<u8>, Result<RequestHead, WireError>) {
        if self.headers.len() > MAX_HEADERS {
            return (self.buf, Err(WireError::TooLarge));
        }
        if self.padded {
            let why = "a header value begins or ends with whitespace";
            return (self.buf, Err(WireError::Malformed(why)));
        }
        let target = self.target.get(&self.buf);
        let head = check_request(&self.buf, method, target, 1, self.headers, self.buf.len());
        (self.buf, head)
    }
}

/// The reason phrase of the status line at the start of `buf`, taken from
/// the bytes themselves (`HTTP/1.1 200 OK`: after the second space).
fn reason_span(buf: &[u8]) -> Span {
    let line = buf.iter().position(|&b| b == b'\r').unwrap_or(0);
    match buf[..line].iter().position(|&b| b == b' ') {
        Some(first) if line > first + 5 => Span::new(first + 5, line),
        _ => Span::default(),
    }
}

/// Parse a response head to a request of `method`; `Ok(None)` until whole.
/// The same strictness as for requests: a broken answer is never relayed.
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
    if !line_ends_are_crlf(&buf[..len]) {
        return Err(WireError::Malformed("bare CR or LF in the answer's head"));
    }
    let (Some(status), Some(minor)) = (resp.code, resp.version) else {
        return Err(WireError::Malformed("incomplete status line"));
    };
    if !(100..=599).contains(&status) {
        return Err(WireError::Malformed("status code out of range"));
    }
    let reason = reason_span(buf);
    spans(buf, resp.headers, &mut headers);
    let f = framing(buf, &headers)?;
    if f.other_coding {
        return Err(WireError::UnsupportedCoding);
    }
    let body = if *method == Method::HEAD || status < 200 || status == 204 || status == 304 {
        BodyKind::None
    } else if f.chunked {
        // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length, which
        // is then dropped.
        BodyKind::Chunked
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
        // An answer that framed itself two ways may mean the upstream sees
        // its connection differently: not reused.
        keep_alive: keep_alive && body != BodyKind::Close && !(f.chunked && f.lengths > 0),
        declared_length: if f.chunked { None } else { f.length },
        declared_chunked: f.chunked,
    }))
}

#[cfg(test)]
mod tests;
