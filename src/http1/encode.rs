//! Writing heads: status lines, header lines, numbers without `fmt`, and the
//! one hop-by-hop filter both directions use (RFC 9110 §7.6.1): the fixed
//! connection-specific fields, the framing fields keygate regenerates, and
//! every field the message's own `Connection` header names.

use super::parse::{tokens, HeadView};

/// Fields that describe one connection or one message's framing; never
/// forwarded. Framing (`Content-Length`, `Transfer-Encoding`) and `Host` are
/// written anew by keygate for the next hop.
const HOP_BY_HOP: [&[u8]; 12] = [
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"proxy-authorization",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"content-length",
    b"upgrade",
    b"http2-settings",
    b"host",
    b"expect",
];

/// Which headers of one message stay on this hop.
pub struct HopByHop<'a> {
    /// Fields the message's `Connection` header named.
    named: Vec<&'a [u8]>,
}

impl<'a> HopByHop<'a> {
    pub fn of(view: &HeadView<'a>) -> HopByHop<'a> {
        let mut named = Vec::new();
        for value in view.values(b"connection") {
            named.extend(tokens(value));
        }
        HopByHop { named }
    }

    /// The same for a message held as an `http::HeaderMap` (the webhook
    /// relay's, read by pingora).
    pub fn of_map(headers: &'a http::HeaderMap) -> HopByHop<'a> {
        let mut named = Vec::new();
        for value in headers.get_all(http::header::CONNECTION) {
            named.extend(tokens(value.as_bytes()));
        }
        HopByHop { named }
    }

    /// `name` belongs to this hop only.
    pub fn drops(&self, name: &[u8]) -> bool {
        HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
            || self.named.iter().any(|n| name.eq_ignore_ascii_case(n))
    }
}

pub fn header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// `name: n` with `n` in decimal.
pub fn header_u64(out: &mut Vec<u8>, name: &[u8], n: u64) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    push_u64(out, n);
    out.extend_from_slice(b"\r\n");
}

/// `HTTP/1.1 <status> <reason>` and its line end.
pub fn status_line(out: &mut Vec<u8>, status: u16, reason: &[u8]) {
    out.extend_from_slice(b"HTTP/1.1 ");
    push_u64(out, status.into());
    out.push(b' ');
    out.extend_from_slice(reason);
    out.extend_from_slice(b"\r\n");
}

/// The standard reason phrase of `status`.
pub fn reason(status: u16) -> &'static str {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("")
}

/// Decimal digits of `n`, without `fmt` (a few header values per request).
pub fn push_u64(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    out.extend_from_slice(u64_digits(n, &mut digits));
}

/// `n` in decimal, written at the end of `digits`.
pub fn u64_digits(mut n: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &digits[i..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http1::parse::parse_request;

    #[test]
    fn connection_named_fields_are_hop_by_hop() {
        let text = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Secret\r\n\r\n";
        let head = parse_request(text, Vec::new()).unwrap().unwrap();
        let view = HeadView {
            buf: text,
            headers: &head.headers,
        };
        let hop = HopByHop::of(&view);
        assert!(hop.drops(b"x-secret"));
        assert!(hop.drops(b"Transfer-Encoding"));
        assert!(hop.drops(b"HTTP2-Settings"));
        assert!(!hop.drops(b"x-other"));
    }

    #[test]
    fn numbers_and_status_lines() {
        let mut out = Vec::new();
        status_line(&mut out, 404, reason(404).as_bytes());
        header_u64(&mut out, b"content-length", 1234567890);
        assert_eq!(
            out,
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 1234567890\r\n"
        );
    }
}
