//! HTTP/1.1 on the wire, through the real keygate binary to a real upstream:
//! pipelining, every body framing in both directions, HTTP/1.0 clients,
//! `Expect: 100-continue`, upgrades, upstreams that close idle connections,
//! and heads that must be refused. Raw sockets, so nothing is smoothed over
//! by an HTTP client library.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::*;

struct Wire {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Wire {
    fn open(kg: &Keygate) -> Wire {
        let w = TcpStream::connect(("127.0.0.1", kg.port)).expect("connect to keygate");
        w.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Wire {
            r: BufReader::new(w.try_clone().unwrap()),
            w,
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).expect("send");
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.r.read_line(&mut line).expect("read a line");
        line.trim_end_matches(['\r', '\n']).to_string()
    }

    /// One answer; `head_only` for answers to HEAD.
    fn answer(&mut self, head_only: bool) -> Answer {
        let status_line = self.line();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not a status line: {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let line = self.line();
            if line.is_empty() {
                break;
            }
            let (n, v) = line.split_once(':').expect("header line");
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        let mut a = Answer {
            status,
            headers,
            body: Vec::new(),
        };
        if head_only || status < 200 || status == 101 {
            return a;
        }
        if let Some(len) = a.header("content-length") {
            let mut body = vec![0; len.parse().unwrap()];
            self.r.read_exact(&mut body).expect("body");
            a.body = body;
        } else if a.header("transfer-encoding") == Some("chunked") {
            loop {
                let size = self.line();
                let size = usize::from_str_radix(size.split(';').next().unwrap(), 16).unwrap();
                if size == 0 {
                    while !self.line().is_empty() {}
                    break;
                }
                let mut chunk = vec![0; size + 2];
                self.r.read_exact(&mut chunk).unwrap();
                a.body.extend_from_slice(&chunk[..size]);
            }
        } else {
            self.r.read_to_end(&mut a.body).expect("body to the end");
        }
        a
    }

    /// The connection has been closed by keygate.
    fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        matches!(self.r.read_to_end(&mut rest), Ok(0))
    }
}

fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: api\r\nX-API-Key: {KEY_DEPLOY}\r\n{extra}\r\n")
}

fn start() -> (Upstream, Keygate) {
    let upstream = Upstream::start();
    let kg = Keygate::start(&config(), upstream.port);
    (upstream, kg)
}

#[test]
fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let (upstream, kg) = start();
    let mut c = Wire::open(&kg);
    let both =
        get("/v1/vms/a", "X-Request-Id: first\r\n") + &get("/v1/vms/b", "X-Request-Id: second\r\n");
    c.send(both.as_bytes());
    for id in ["first", "second"] {
        let a = c.answer(false);
        assert_eq!(a.status, 200);
        assert_eq!(a.header("x-request-id"), Some(id));
    }
    let targets: Vec<String> = upstream.requests().into_iter().map(|s| s.target).collect();
    assert_eq!(targets, ["/v1/vms/a", "/v1/vms/b"]);
}

#[test]
fn chunked_answers_pass_through_and_the_connection_stays_usable() {
    let (_upstream, kg) = start();
    let mut c = Wire::open(&kg);
    c.send(get("/v1/vms/chunked", "").as_bytes());
    let a = c.answer(false);
    assert_eq!(a.status, 200);
    assert_eq!(a.header("transfer-encoding"), Some("chunked"));
    assert_eq!(a.body, b"hello, world");
    c.send(get("/v1/vms/next", "").as_bytes());
    assert_eq!(c.answer(false).status, 200);
}

#[test]
fn http_1_0_clients_get_a_decoded_body_and_a_closed_connection() {
    let (_upstream, kg) = start();
    let mut c = Wire::open(&kg);
    c.send(format!("GET /v1/vms/chunked HTTP/1.0\r\nX-API-Key: {KEY_DEPLOY}\r\n\r\n").as_bytes());
    let a = c.answer(false);
    assert_eq!(a.status, 200);
    assert_eq!(
        a.header("transfer-encoding"),
        None,
        "HTTP/1.0 has no chunks"
    );
    assert_eq!(a.body, b"hello, world");
}

#[test]
fn a_body_ended_by_closing_reaches_the_client_whole_and_re_framed() {
    let (_upstream, kg) = start();
    let mut c = Wire::open(&kg);
    c.send(get("/v1/vms/close", "").as_bytes());
    let a = c.answer(false);
    assert_eq!(a.status, 200);
    // Re-framed as chunks, so a cut-off answer would show as one, and the
    // client's connection outlives the upstream's.
    assert_eq!(a.header("transfer-encoding"), Some("chunked"));
    assert_eq!(a.header("connection"), None);
    assert_eq!(a.body, b"until the end");
    c.send(get("/v1/vms/after", "").as_bytes());
    assert_eq!(c.answer(false).status, 200);
}

#[test]
fn head_answers_have_no_body_and_keep_the_connection() {
    let (_upstream, kg) = start();
    let mut c = Wire::open(&kg);
    c.send(
        format!("HEAD /v1/vms/x HTTP/1.1\r\nHost: api\r\nX-API-Key: {KEY_DEPLOY}\r\n\r\n")
            .as_bytes(),
    );
    let a = c.answer(true);
    assert_eq!(a.status, 200);
    assert!(a.header("content-length").is_some());
    c.send(get("/v1/vms/y", "").as_bytes());
    let b = c.answer(false);
    assert_eq!(b.status, 200);
    assert!(b
        .body
        .starts_with(b"{\"upstream\":\"ok\",\"method\":\"GET\""));
}

#[test]
fn an_upstream_closing_idle_connections_costs_no_request() {
    let (upstream, kg) = start();
    let c = client();
    // The upstream closes each connection 50 ms after answering; ask again
    // before, around and after that moment so pooled connections go stale.
    for i in 0..24u64 {
        let resp = c
            .get(kg.url("/v1/vms/drop"))
            .header("X-API-Key", KEY_DEPLOY)
            .send()
            .expect("answer");
        assert_eq!(resp.status(), 200, "request {i}");
        std::thread::sleep(Duration::from_millis(i % 4 * 30));
    }
    assert_eq!(upstream.count(), 24);
}

#[test]
fn expect_100_continue_gets_an_interim_answer_before_the_body() {
    let (upstream, kg) = start();
    let mut c = Wire::open(&kg);
    c.send(
        format!(
            "POST /v1/vms/x HTTP/1.1\r\nHost: api\r\nX-API-Key: {KEY_DEPLOY}\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(c.answer(false).status, 100);
    c.send(b"hello");
    assert_eq!(c.answer(false).status, 200);
    let seen = upstream.last();
    assert_eq!(seen.body, b"hello");
    assert_eq!(seen.header("expect"), None);
}

#[test]
fn a_refused_request_with_expect_never_sends_its_body_anywhere() {
    let (upstream, kg) = start();
    let mut c = Wire::open(&kg);
    c.send(
        b"POST /v1/vms/x HTTP/1.1\r\nHost: api\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    );
    let a = c.answer(false);
    assert_eq!(a.status, 401, "no interim 100 before a refusal");
    assert_eq!(upstream.count(), 0);
}

#[test]
fn websocket_upgrades_are_relayed_both_ways() {
    let (_upstream, kg) = start();
    let mut c = Wire::open(&kg);
    c.send(
        get(
            "/v1/vms/ws",
            "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
        )
        .as_bytes(),
    );
    let a = c.answer(false);
    assert_eq!(a.status, 101);
    assert_eq!(a.header("upgrade"), Some("websocket"));
    c.send(b"ping over the upgraded connection");
    let mut echo = [0u8; 33];
    c.r.read_exact(&mut echo).expect("echo");
    assert_eq!(&echo, b"ping over the upgraded connection");
}

#[test]
fn malformed_hostless_smuggling_and_oversized_heads_get_json_errors() {
    let (upstream, kg) = start();
    let cases: [(Vec<u8>, u16); 5] = [
        (b"GARBAGE\r\n\r\n".to_vec(), 400),
        (
            format!("GET /v1/vms HTTP/1.1\r\nX-API-Key: {KEY_DEPLOY}\r\n\r\n").into_bytes(),
            400,
        ),
        (
            format!(
                "POST /v1/vms/x HTTP/1.1\r\nHost: api\r\nX-API-Key: {KEY_DEPLOY}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            )
            .into_bytes(),
            400,
        ),
        (
            format!("GET /v1/vms/x HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(70_000)).into_bytes(),
            431,
        ),
        (b"GET /v1/vms HTTP/3.0\r\n\r\n".to_vec(), 400),
    ];
    for (request, status) in cases {
        let mut c = Wire::open(&kg);
        c.send(&request);
        let a = c.answer(false);
        assert_eq!(
            a.status,
            status,
            "{}",
            String::from_utf8_lossy(&request[..30])
        );
        let body: serde_json::Value = serde_json::from_slice(&a.body).expect("JSON");
        assert_eq!(body["error"]["code"], "invalid_request");
        assert!(c.closed(), "a broken stream is not read further");
    }
    assert_eq!(upstream.count(), 0);
}

/// A head refused before its body was read: the connection is drained for
/// a moment before it closes, so the client that is still sending gets its
/// answer instead of a reset (nginx's lingering close).
#[test]
fn a_refused_head_is_answered_while_its_body_is_still_arriving() {
    let (upstream, kg) = start();
    let c = Wire::open(&kg);
    let mut w = c.w.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        // Two Content-Length headers: refused at the head.
        w.write_all(
            b"POST /v1/vms HTTP/1.1\r\nHost: api\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        )?;
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..128 {
            w.write_all(&chunk)?;
        }
        Ok::<(), std::io::Error>(())
    });
    let mut c = c;
    let a = c.answer(false);
    assert_eq!(a.status, 400);
    assert_eq!(a.header("connection"), Some("close"));
    let sent = writer.join().unwrap();
    assert!(
        sent.is_ok(),
        "the client's body was cut off by a reset: {sent:?}"
    );
    assert!(c.closed());
    assert_eq!(upstream.count(), 0);
}

#[test]
fn chunked_request_bodies_are_forwarded_as_sent() {
    let (upstream, kg) = start();
    let mut c = Wire::open(&kg);
    c.send(
        format!(
            "POST /v1/vms/x HTTP/1.1\r\nHost: api\r\nX-API-Key: {KEY_DEPLOY}\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        .as_bytes(),
    );
    c.send(b"3\r\nabc\r\n");
    std::thread::sleep(Duration::from_millis(50));
    c.send(b"4\r\ndefg\r\n0\r\n\r\n");
    c.send(get("/v1/vms/after", "").as_bytes());
    assert_eq!(c.answer(false).status, 200);
    assert_eq!(c.answer(false).status, 200);
    let seen = upstream.requests();
    assert_eq!(seen[0].body, b"abcdefg");
    assert_eq!(seen[1].target, "/v1/vms/after");
}
