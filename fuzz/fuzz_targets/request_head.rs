//! `http1::parse::parse_request` never panics, and every head it accepts is
//! one a strict RFC 9112 reference parser (below) accepts too, with the same
//! body framing: CRLF-only line ends, a visible-ASCII target without `#`,
//! one Content-Length or one `Transfer-Encoding: chunked`, never both.
//! `parse_response` never panics and its spans stay inside the buffer.
#![no_main]

use keygate::http1::parse::{parse_request, parse_response, BodyKind, Header, RequestHead};
use libfuzzer_sys::fuzz_target;

#[path = "common/mod.rs"]
mod common;
use common::show;

fuzz_target!(|data: &[u8]| {
    check_request(data);
    check_response(data);
});

fn check_request(data: &[u8]) {
    let Ok(Some(head)) = parse_request(data, Vec::new()) else {
        return;
    };
    assert!(
        head.len <= data.len(),
        "head.len {} > input {}",
        head.len,
        data.len()
    );
    let bytes = &data[..head.len];

    // Every span lies inside the head (`Span::get` panics otherwise), and
    // no header name lost its span (`Span::of` falls back to an empty one).
    let target = head.target.get(bytes);
    assert!(head.path_len <= target.len());
    for span in [head.authority, head.host].into_iter().flatten() {
        span.get(bytes);
    }
    for h in &head.headers {
        assert!(!h.name.get(bytes).is_empty(), "an empty header name span");
        h.value.get(bytes);
    }

    assert!(
        target
            .iter()
            .all(|&b| (0x21..=0x7e).contains(&b) && b != b'#'),
        "target {}",
        show(target)
    );
    assert!(crlf_only(bytes), "bare CR or LF in an accepted head");

    let count = |name: &str| count_headers(bytes, &head.headers, name);
    match head.body {
        BodyKind::Chunked => {
            assert_eq!(count("content-length"), 0, "chunked with a Content-Length");
            assert_eq!(
                count("transfer-encoding"),
                1,
                "chunked without exactly one TE"
            );
        }
        BodyKind::Length(n) => {
            assert!(n > 0, "Length(0) instead of None");
            assert_eq!(count("content-length"), 1, "Length without exactly one CL");
            assert_eq!(
                count("transfer-encoding"),
                0,
                "Length with a Transfer-Encoding"
            );
        }
        BodyKind::None => {}
        BodyKind::Close => panic!("a request body delimited by close"),
    }

    match reference::parse(bytes) {
        Ok(framing) => assert_eq!(
            framing,
            reference::Framing::of(&head),
            "keygate and the reference frame the body differently: {}",
            show(bytes)
        ),
        Err(why) => panic!(
            "keygate accepted a head the strict reference refuses ({why}): {}",
            show(bytes)
        ),
    }
}

fn check_response(data: &[u8]) {
    let Ok(Some(head)) = parse_response(data, &http::Method::GET, Vec::new()) else {
        return;
    };
    assert!(head.len <= data.len());
    let bytes = &data[..head.len];
    // `proxy::forward` writes `reason.get(buf)` into the status line.
    head.reason.get(bytes);
    for h in &head.headers {
        assert!(!h.name.get(bytes).is_empty(), "an empty header name span");
        h.value.get(bytes);
    }
    assert!(
        crlf_only(bytes),
        "bare CR or LF in an accepted response head"
    );
}


/// No `\n` without a `\r` before it, no `\r` without a `\n` after it.
fn crlf_only(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().all(|(i, &b)| match b {
        b'\n' => i > 0 && bytes[i - 1] == b'\r',
        b'\r' => bytes.get(i + 1) == Some(&b'\n'),
        _ => true,
    })
}

fn count_headers(bytes: &[u8], headers: &[Header], name: &str) -> usize {
    headers
        .iter()
        .filter(|h| h.name.get(bytes).eq_ignore_ascii_case(name.as_bytes()))
        .count()
}

/// A deliberately small request-head parser written from RFC 9112 / 9110,
/// sharing no code with keygate or httparse. It is only ever asked about
/// heads keygate accepted, so it may be stricter than needed, never looser.
mod reference {
    use super::*;

    #[derive(Debug, PartialEq, Eq)]
    pub enum Framing {
        None,
        Length(u64),
        Chunked,
    }

    impl Framing {
        pub fn of(head: &RequestHead) -> Framing {
            match head.body {
                BodyKind::None => Framing::None,
                BodyKind::Length(n) => Framing::Length(n),
                BodyKind::Chunked => Framing::Chunked,
                BodyKind::Close => unreachable!(),
            }
        }
    }

    fn tchar(b: u8) -> bool {
        b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
    }

    fn token(s: &[u8]) -> bool {
        !s.is_empty() && s.iter().all(|&b| tchar(b))
    }

    fn ows(b: &u8) -> bool {
        *b == b' ' || *b == b'\t'
    }

    fn trim_ows(mut s: &[u8]) -> &[u8] {
        while let [first, rest @ ..] = s {
            if !ows(first) {
                break;
            }
            s = rest;
        }
        while let [rest @ .., last] = s {
            if !ows(last) {
                break;
            }
            s = rest;
        }
        s
    }

    /// RFC 9110 §5.5: field-vchar / obs-text, SP and HTAB inside.
    fn field_value(v: &[u8]) -> bool {
        v.iter()
            .all(|&b| b == b' ' || b == b'\t' || (0x21..=0x7e).contains(&b) || b >= 0x80)
    }

    fn lines(head: &[u8]) -> Vec<&[u8]> {
        let mut out = Vec::new();
        let mut rest = head;
        while let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
            out.push(&rest[..i]);
            rest = &rest[i + 2..];
        }
        out.push(rest);
        out
    }

    /// The framing of the request head `head` (exactly the head: request
    /// line, header lines, blank line), or why it is not a valid one.
    pub fn parse(head: &[u8]) -> Result<Framing, &'static str> {
        let Some(body) = head.strip_suffix(b"\r\n\r\n") else {
            return Err("the head does not end in CRLF CRLF");
        };
        let mut lines = lines(body).into_iter();
        // RFC 9112 §2.2: a server SHOULD ignore empty lines before the request line.
        let request_line = loop {
            match lines.next() {
                Some(b"") => continue,
                Some(line) => break line,
                None => return Err("no request line"),
            }
        };
        let parts: Vec<&[u8]> = request_line.split(|&b| b == b' ').collect();
        let [method, target, version] = parts[..] else {
            return Err("the request line is not three parts separated by single spaces");
        };
        if !token(method) {
            return Err("invalid method");
        }
        if method == b"CONNECT" {
            return Err("CONNECT");
        }
        if target.is_empty()
            || !target
                .iter()
                .all(|&b| (0x21..=0x7e).contains(&b) && b != b'#')
        {
            return Err("invalid request target");
        }
        let minor = match version {
            b"HTTP/1.1" => 1,
            b"HTTP/1.0" => 0,
            _ => return Err("invalid HTTP version"),
        };

        let (mut lengths, mut length, mut codings, mut chunked, mut hosts) = (0, 0u64, 0, false, 0);
        for line in lines {
            if line.iter().any(|&b| b == b'\r' || b == b'\n') {
                return Err("bare CR or LF");
            }
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                return Err("a header line without a colon");
            };
            let (name, value) = (&line[..colon], &line[colon + 1..]);
            if !token(name) {
                return Err("invalid header name (or whitespace before the colon)");
            }
            let value = trim_ows(value);
            if !field_value(value) {
                return Err("invalid byte in a header value");
            }
            if name.eq_ignore_ascii_case(b"content-length") {
                lengths += 1;
                if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
                    return Err("Content-Length is not digits");
                }
                length = value
                    .iter()
                    .try_fold(0u64, |n, d| {
                        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
                    })
                    .ok_or("Content-Length overflows")?;
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                codings += 1;
                // Coding names are case-insensitive (RFC 9112 §7).
                chunked = value.eq_ignore_ascii_case(b"chunked");
            } else if name.eq_ignore_ascii_case(b"host") {
                hosts += 1;
            }
        }
        if hosts > 1 || (minor == 1 && hosts != 1) {
            return Err("not exactly one Host");
        }
        match (lengths, codings) {
            (0, 0) => Ok(Framing::None),
            (1, 0) if length == 0 => Ok(Framing::None),
            (1, 0) => Ok(Framing::Length(length)),
            (0, 1) if chunked && minor == 1 => Ok(Framing::Chunked),
            (0, 1) if chunked => Err("Transfer-Encoding in HTTP/1.0"),
            (0, 1) => Err("a Transfer-Encoding other than chunked"),
            _ => Err("several or conflicting framing headers"),
        }
    }
}
