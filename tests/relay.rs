//! The outbound signing relay against a real loopback receiver.

mod support;

use support::seed::seed_verifies;
use support::*;

const SECRET: &str = "whsec_cust42_0123456789";

struct Setup {
    receiver: Upstream,
    kg: Keygate,
    _upstream: Upstream,
}

/// keygate (and the API it fronts) with a relay whose subscribers deliver
/// to `receiver_port`.
fn start_with_receiver_port(receiver_port: u16) -> (Upstream, Keygate) {
    let upstream = Upstream::start();
    let cfg = format!(
        "{}\n[webhook_relay]\nlisten = \"{{relay}}\"\ntimeout = \"3s\"\nmax_body = 65536\n\n\
         [[webhook_relay.subscribers]]\nid = \"cust-42\"\nurl_prefix = \"http://127.0.0.1:{receiver_port}/hooks/\"\nsecret_env = \"KEYGATE_TEST_CUST42\"\n\n\
         [[webhook_relay.subscribers]]\nid = \"cust-ts\"\nurl_prefix = \"http://127.0.0.1:{receiver_port}/ts/\"\nsecret_env = \"KEYGATE_TEST_CUST42\"\ntimestamp_header = \"X-Webhook-Timestamp\"\n",
        config()
    );
    let kg = Keygate::start_with_env(&cfg, upstream.port, &[("KEYGATE_TEST_CUST42", SECRET)]);
    (upstream, kg)
}

fn start() -> Setup {
    let receiver = Upstream::start();
    let (upstream, kg) = start_with_receiver_port(receiver.port);
    Setup {
        receiver,
        kg,
        _upstream: upstream,
    }
}

fn relay(
    s: &Keygate,
    subscriber: Option<&str>,
    destination: Option<&str>,
    body: &[u8],
) -> reqwest::blocking::Response {
    let mut r = client()
        .post(format!("http://127.0.0.1:{}/", s.relay_port))
        .header("Content-Type", "application/json")
        .header("X-Event-Type", "vm.created")
        .body(body.to_vec());
    if let Some(id) = subscriber {
        r = r.header("X-Webhook-Subscriber", id);
    }
    if let Some(d) = destination {
        r = r.header("X-Webhook-Destination", d);
    }
    r.send().unwrap()
}

const EVENT: &[u8] = br#"{"event":"vm.created","id":"vm-9"}"#;

#[test]
fn relayed_webhook_carries_a_signature_the_seeds_verifier_accepts() {
    let s = start();
    let dest = format!("http://127.0.0.1:{}/hooks/events?v=2", s.receiver.port);
    let resp = relay(&s.kg, Some("cust-42"), Some(&dest), EVENT);
    assert_eq!(resp.status(), 200, "{:?}", resp.text());
    let seen = s.receiver.last();
    assert_eq!(seen.target, "/hooks/events?v=2");
    assert_eq!(seen.body, EVENT);
    let signature = seen
        .header("x-webhook-signature")
        .expect("signed")
        .to_string();
    assert!(seed_verifies(EVENT, &signature, SECRET), "{signature}");
    assert_eq!(seen.header("content-type"), Some("application/json"));
    assert_eq!(seen.header("x-event-type"), Some("vm.created"));
    assert_eq!(seen.header("x-webhook-subscriber"), None);
    assert_eq!(seen.header("x-webhook-destination"), None);
    assert_eq!(kg_metric(&s.kg, "2xx"), 1.0);
}

#[test]
fn timestamped_subscribers_sign_timestamp_dot_body() {
    let s = start();
    let dest = format!("http://127.0.0.1:{}/ts/x", s.receiver.port);
    assert_eq!(
        relay(&s.kg, Some("cust-ts"), Some(&dest), EVENT).status(),
        200
    );
    let seen = s.receiver.last();
    let ts = seen.header("x-webhook-timestamp").unwrap();
    let signed = [ts.as_bytes(), b".", EVENT].concat();
    assert!(seed_verifies(
        &signed,
        seen.header("x-webhook-signature").unwrap(),
        SECRET
    ));
    assert!(now().abs_diff(ts.parse().unwrap()) < 5);
}

#[test]
fn unknown_subscribers_and_foreign_destinations_are_refused() {
    let s = start();
    let p = s.receiver.port;
    let other = free_port();
    let cases = [
        (
            Some("cust-7"),
            Some(format!("http://127.0.0.1:{p}/hooks/x")),
            403,
        ),
        (None, Some(format!("http://127.0.0.1:{p}/hooks/x")), 400),
        (Some("cust-42"), None, 400),
        (
            Some("cust-42"),
            Some(format!("http://127.0.0.1:{p}/admin")),
            403,
        ),
        (
            Some("cust-42"),
            Some(format!("http://127.0.0.1:{p}/hooksx")),
            403,
        ),
        (
            Some("cust-42"),
            Some(format!("http://127.0.0.1:{p}/hooks/../admin")),
            403,
        ),
        (
            Some("cust-42"),
            Some(format!("http://127.0.0.1:{p}/hooks/%2e%2e/admin")),
            403,
        ),
        (
            Some("cust-42"),
            Some(format!("http://127.0.0.1:{other}/hooks/x")),
            403,
        ),
        (
            Some("cust-42"),
            Some(format!("http://localhost:{p}/hooks/x")),
            403,
        ),
        (
            Some("cust-42"),
            Some(format!("https://127.0.0.1:{p}/hooks/x")),
            403,
        ),
        (
            Some("cust-42"),
            Some(format!("http://evil@127.0.0.1:{p}/hooks/x")),
            400,
        ),
        (Some("cust-42"), Some("file:///etc/passwd".to_string()), 400),
    ];
    for (subscriber, dest, status) in cases {
        let resp = relay(&s.kg, subscriber, dest.as_deref(), EVENT);
        assert_eq!(resp.status().as_u16(), status, "{subscriber:?} {dest:?}");
        let body: serde_json::Value = resp.json().unwrap();
        assert!(body["error"]["code"].is_string());
    }
    assert_eq!(s.receiver.count(), 0, "nothing may reach the receiver");
    // The body is bounded too.
    let dest = format!("http://127.0.0.1:{p}/hooks/x");
    assert_eq!(
        relay(&s.kg, Some("cust-42"), Some(&dest), &vec![b'x'; 70_000]).status(),
        413
    );
}

#[test]
fn receiver_down_gives_a_json_502() {
    let dead = free_port();
    let (_upstream, kg) = start_with_receiver_port(dead);
    let resp = relay(
        &kg,
        Some("cust-42"),
        Some(&format!("http://127.0.0.1:{dead}/hooks/x")),
        EVENT,
    );
    assert_eq!(resp.status(), 502);
    let body: serde_json::Value = resp.json().unwrap();
    assert_eq!(body["error"]["code"], "upstream_unavailable");
    assert_eq!(kg_metric(&kg, "unreachable"), 1.0);
}

fn kg_metric(kg: &Keygate, result: &str) -> f64 {
    kg.metric(&format!(
        "keygate_webhook_relay_deliveries_total{{result=\"{result}\"}}"
    ))
}

#[test]
fn fields_the_sender_names_in_connection_stay_on_its_hop() {
    use std::io::{Read, Write};
    let s = start();
    let dest = format!("http://127.0.0.1:{}/hooks/events", s.receiver.port);
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", s.kg.relay_port)).unwrap();
    conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let head = format!(
        "POST / HTTP/1.1\r\nhost: relay\r\nconnection: close, x-hop-secret\r\n\
         x-hop-secret: for-the-relay-only\r\nx-event-type: vm.created\r\n\
         x-webhook-subscriber: cust-42\r\nx-webhook-destination: {dest}\r\n\
         content-length: {}\r\n\r\n",
        EVENT.len()
    );
    conn.write_all(head.as_bytes()).unwrap();
    conn.write_all(EVENT).unwrap();
    let mut answer = String::new();
    let _ = conn.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = s.receiver.last();
    assert_eq!(seen.header("x-event-type"), Some("vm.created"));
    assert_eq!(seen.header("x-hop-secret"), None, "{:?}", seen.headers);
}
