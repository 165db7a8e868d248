use http::Method;

use super::*;
use crate::http1::parse::{parse_request, parse_response};
use crate::policy::testing::policy;

fn forwarded(policy: &Policy, text: &str) -> String {
    let buf = text.as_bytes();
    let head = parse_request(buf, Vec::new()).unwrap().unwrap();
    let plan = Plan {
        policy,
        peer: "192.0.2.1".parse().unwrap(),
        peer_text: "192.0.2.1",
        principal: None,
        request_id: "rid-1",
        upgrade: allowed_upgrade(policy, &head, buf),
        https: false,
    };
    let mut out = Vec::new();
    request_head(&mut out, &plan, &head, buf, head.target.get(buf));
    String::from_utf8(out).unwrap()
}

fn names(head: &str) -> Vec<String> {
    head.lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, _)| n.to_ascii_lowercase())
        .collect()
}

#[test]
fn client_framing_hop_by_hop_and_identity_headers_never_reach_the_upstream() {
    let p = policy();
    let out = forwarded(
        &p,
        "POST /v1/vms HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n\
         Connection: keep-alive, X-Secret\r\nX-Secret: s\r\nTE: trailers\r\nTrailer: X-Auth-Subject\r\n\
         X-Auth-Subject: admin\r\nx-auth-tier: enterprise\r\nX_Auth_Subject: admin\r\nX-Auth_Tier: x\r\n\
         X_Forwarded_For: 1.2.3.4\r\nX-Request-Id: client\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\
         Upgrade: h2c\r\nProxy-Authorization: Basic eA==\r\nX-HTTP-Method-Override: DELETE\r\n\
         Forwarded: for=10.0.0.1\r\nX-Real-IP: 10.0.0.1\r\nX-Original-URL: /admin\r\nX-Kept: yes\r\n\r\n",
    );
    assert_eq!(
        names(&out),
        [
            "host",
            "x-kept",
            "x-request-id",
            "x-forwarded-for",
            "x-forwarded-proto"
        ],
        "{out}"
    );
    assert!(out.starts_with("POST /v1/vms HTTP/1.1\r\nhost: api\r\n"));
    assert!(out.contains("x-request-id: rid-1\r\n"));
    assert!(out.contains("x-forwarded-for: 192.0.2.1\r\n"));
}

#[test]
fn an_http_1_0_request_without_host_gets_the_upstreams() {
    let p = policy();
    let out = forwarded(&p, "GET /v1/vms HTTP/1.0\r\n\r\n");
    let host = format!("host: {}\r\n", p.upstream.authority);
    assert!(out.contains(&host), "{out}");
    assert!(out.starts_with("GET /v1/vms HTTP/1.1\r\n"));
}

#[test]
fn an_absolute_target_s_authority_replaces_host() {
    let p = policy();
    let text = "GET http://real.example/v1/vms HTTP/1.1\r\nHost: other\r\n\r\n";
    let buf = text.as_bytes();
    let head = parse_request(buf, Vec::new()).unwrap().unwrap();
    let out = forwarded(&p, text);
    assert_eq!(head.target.get(buf), b"/v1/vms");
    assert!(out.contains("host: real.example\r\n"), "{out}");
    assert_eq!(out.matches("host:").count(), 1);
}

#[test]
fn only_listed_upgrades_without_a_body_are_forwarded() {
    let p = policy();
    let ws = forwarded(
        &p,
        "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\n\r\n",
    );
    assert!(
        ws.contains("connection: upgrade\r\nupgrade: websocket\r\n"),
        "{ws}"
    );
    for text in [
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABk\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket, h2c\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 3\r\n\r\n",
    ] {
        let out = forwarded(&p, text);
        assert!(!out.to_ascii_lowercase().contains("upgrade"), "{out}");
        assert!(!out.to_ascii_lowercase().contains("http2-settings"), "{out}");
    }
}

#[test]
fn answers_lose_their_framing_and_connection_named_headers() {
    let text = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\
                Connection: X-Internal\r\nX-Internal: 1\r\nKeep-Alive: timeout=5\r\nX-Request-Id: up\r\n\
                Set-Cookie: a=b\r\n\r\n";
    let buf = text.as_bytes();
    let resp = parse_response(buf, &Method::GET, Vec::new())
        .unwrap()
        .unwrap();
    let mut out = Vec::new();
    response_head(&mut out, &resp, buf, "rid-2", None, None);
    let out = String::from_utf8(out).unwrap();
    assert_eq!(
        out,
        // The status line is the downstream's to write.
        "Set-Cookie: a=b\r\nx-request-id: rid-2\r\n"
    );
}
