use super::*;

fn req(text: &str) -> Result<Option<RequestHead>, WireError> {
    parse_request(text.as_bytes(), Vec::new())
}

fn refused(text: &str) -> u16 {
    match req(text) {
        Err(e) => e.status(),
        Ok(Some(_)) => panic!("accepted: {text:?}"),
        Ok(None) => panic!("waits for more: {text:?}"),
    }
}

#[test]
fn a_simple_request_keeps_alive() {
    let text = "GET /v1/vms?x=1 HTTP/1.1\r\nHost: a\r\nX-API-Key: k\r\n\r\nrest";
    let head = req(text).unwrap().unwrap();
    assert_eq!(head.method, Method::GET);
    assert_eq!(head.target.get(text.as_bytes()), b"/v1/vms?x=1");
    assert_eq!(head.path_len, 7);
    assert_eq!(head.len, text.len() - 4);
    assert_eq!(head.body, BodyKind::None);
    assert!(head.keep_alive);
    let view = HeadView {
        buf: text.as_bytes(),
        headers: &head.headers,
    };
    assert_eq!(view.values(b"x-api-key").collect::<Vec<_>>(), [b"k"]);
}

#[test]
fn a_partial_head_waits_and_a_huge_one_is_refused() {
    assert!(req("GET / HTTP/1.1\r\nHost: a\r\n").unwrap().is_none());
    assert!(req("GET / HTTP/1.1\r\nHost: a\r").unwrap().is_none());
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
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1e3\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: ,chunked\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked,\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \"chunked\"\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\nContent-Length: 3\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: ,\r\nContent-Length: 3\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:  , ,\r\nContent-Length: 3\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \r\n\r\n",
        "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        "GET / HTTP/2.0\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\n Transfer-Encoding: chunked\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n folded\r\n\r\n",
        "GET / HTTP/1.1\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        "GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: \r\n\r\n",
        "GET / HTTP/1.1\nHost: a\n\n",
        "GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nX: b\rc\r\n\r\n",
        "GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET / HTTP/1.1 \r\nHost: a\r\n\r\n",
        "CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
        "delete /vms/1 HTTP/1.1\r\nHost: a\r\n\r\n",
        "Delete /vms/1 HTTP/1.1\r\nHost: a\r\n\r\n",
    ] {
        assert_eq!(refused(bad), 400, "{bad:?}");
    }
    for unsupported in ["gzip", "chunked, gzip", "identity"] {
        let text =
            format!("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: {unsupported}\r\n\r\n");
        assert_eq!(refused(&text), 501, "{text:?}");
    }
    let chunked = req("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n");
    assert_eq!(chunked.unwrap().unwrap().body, BodyKind::Chunked);
    let chunked = req("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:  chunked \r\n\r\n");
    assert_eq!(chunked.unwrap().unwrap().body, BodyKind::Chunked);
}

#[test]
fn a_bare_lf_is_refused_before_the_head_is_complete() {
    assert_eq!(refused("GET / HTTP/1.1\nHost: a\n"), 400);
}

#[test]
fn targets_are_visible_ascii_without_fragment_or_backslash() {
    for bad in [
        "GET /admin# HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET /caf\u{e9} HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET /a\\..\\admin HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET * HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET admin HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET http://a HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET http://u@a/x HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET ftp://a/x HTTP/1.1\r\nHost: a\r\n\r\n",
    ] {
        assert_eq!(refused(bad), 400, "{bad:?}");
    }
    let text = "GET /a?b=\\ HTTP/1.1\r\nHost: a\r\n\r\n";
    assert!(
        req(text).unwrap().is_some(),
        "a backslash in the query is data"
    );
}

#[test]
fn absolute_form_is_reduced_to_origin_form_with_its_authority() {
    let text = "GET HTTP://api.example:8080/v1/vms?x=1 HTTP/1.1\r\nHost: other\r\n\r\n";
    let head = req(text).unwrap().unwrap();
    let buf = text.as_bytes();
    assert_eq!(head.target.get(buf), b"/v1/vms?x=1");
    assert_eq!(head.path_len, 7);
    assert_eq!(head.authority.unwrap().get(buf), b"api.example:8080");
    assert_eq!(head.host.unwrap().get(buf), b"other");
}

#[test]
fn underscores_in_names_are_flagged() {
    let head = req("GET / HTTP/1.1\r\nHost: a\r\nX_Auth_Subject: x\r\n\r\n")
        .unwrap()
        .unwrap();
    assert!(head.underscore);
}

#[test]
fn keep_alive_follows_version_and_connection() {
    let ka = |t: &str| req(t).unwrap().unwrap().keep_alive;
    assert!(!ka(
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    ));
    assert!(!ka("GET / HTTP/1.0\r\n\r\n"));
    assert!(ka("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
    let up = req(
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n",
    );
    assert!(up.unwrap().unwrap().upgrade);
}

fn resp(method: Method, text: &str) -> Result<Option<ResponseHead>, WireError> {
    parse_response(text.as_bytes(), &method, Vec::new())
}

#[test]
fn response_bodies_follow_method_and_status() {
    let body = |method: Method, text: &str| resp(method, text).unwrap().unwrap().body;
    let cl = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";
    assert_eq!(body(Method::GET, cl), BodyKind::Length(5));
    assert_eq!(body(Method::HEAD, cl), BodyKind::None);
    assert_eq!(
        resp(Method::HEAD, cl).unwrap().unwrap().declared_length,
        Some(5)
    );
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
    let head = resp(Method::GET, "HTTP/1.1 200 OK\r\n\r\n");
    assert!(
        !head.unwrap().unwrap().keep_alive,
        "a close-delimited body ends the connection"
    );
}

#[test]
fn an_answer_with_both_framings_is_chunked_and_its_length_dropped() {
    let text = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
    let head = resp(Method::GET, text).unwrap().unwrap();
    assert_eq!(head.body, BodyKind::Chunked);
    assert_eq!(head.declared_length, None);
}

#[test]
fn status_lines_without_or_with_odd_reasons_are_read_safely() {
    for (text, reason) in [
        ("HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n", &b""[..]),
        ("HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n", b""),
        (
            "HTTP/1.1 200 Caf\u{e9}\r\nContent-Length: 0\r\n\r\n",
            "Caf\u{e9}".as_bytes(),
        ),
        ("HTTP/1.1 404 Not Found\r\n\r\n", b"Not Found"),
    ] {
        let head = resp(Method::GET, text).unwrap().unwrap();
        assert_eq!(head.reason.get(text.as_bytes()), reason, "{text:?}");
    }
    assert!(resp(Method::GET, "HTTP/1.1 099 X\r\n\r\n").is_err());
    assert!(resp(Method::GET, "HTTP/1.1 600 X\r\n\r\n").is_err());
}

#[test]
fn broken_answers_are_errors() {
    for bad in [
        "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding:\r\n\r\n",
        "HTTP/1.1 200 OK\nContent-Length: 0\n\n",
        "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
    ] {
        assert!(resp(Method::GET, bad).is_err(), "{bad:?}");
    }
}

/// The SIMD check says what the byte-by-byte rule says, on every short mix
/// of CR, LF and other bytes.
#[test]
fn the_crlf_check_agrees_with_the_byte_rule() {
    fn by_bytes(head: &[u8]) -> bool {
        let mut prev = 0u8;
        for &b in head {
            if (b == b'\n') != (prev == b'\r') {
                return false;
            }
            prev = b;
        }
        true
    }
    let alphabet = [b'\r', b'\n', b'a'];
    for len in 0..=7u32 {
        for n in 0..3usize.pow(len) {
            let mut head = Vec::new();
            let mut k = n;
            for _ in 0..len {
                head.push(alphabet[k % 3]);
                k /= 3;
            }
            assert_eq!(
                super::line_ends_are_crlf(&head),
                by_bytes(&head),
                "{:?}",
                String::from_utf8_lossy(&head)
            );
        }
    }
}
