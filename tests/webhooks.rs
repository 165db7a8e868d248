//! Inbound webhook signatures through the real binary, checked against the
//! public document's own Python `verify_webhook`.

mod support;

use std::io::{Read, Write};
use std::process::{Command, Stdio};

use support::*;

const OLD: &str = "whsec_old_0123456789";
const NEW: &str = "whsec_new_9876543210";

fn start() -> (Upstream, Keygate) {
    let upstream = Upstream::start();
    let cfg = format!(
        "{}\n{}",
        config(),
        r#"
[[webhooks]]
path = "/hooks/billing"
secrets_env = ["KEYGATE_TEST_WH_OLD", "KEYGATE_TEST_WH_NEW"]

[[webhooks]]
path = "/hooks/infra"
secret_env = "KEYGATE_TEST_WH_NEW"
timestamp_header = "X-Webhook-Timestamp"
tolerance = "5m"
max_body = 1024
"#
    );
    let kg = Keygate::start_with_env(
        &cfg,
        upstream.port,
        &[("KEYGATE_TEST_WH_OLD", OLD), ("KEYGATE_TEST_WH_NEW", NEW)],
    );
    (upstream, kg)
}

fn keygate_sign(secret_env: &str, secret: &str, payload: &[u8]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["webhook", "sign", "--secret-env", secret_env])
        .env(secret_env, secret)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(payload).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn deliver(
    kg: &Keygate,
    path: &str,
    body: &[u8],
    signature: Option<&str>,
) -> reqwest::blocking::Response {
    let mut r = client().post(kg.url(path)).body(body.to_vec());
    if let Some(s) = signature {
        r = r.header("X-Webhook-Signature", s);
    }
    r.send().unwrap()
}

fn code(resp: reqwest::blocking::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let v: serde_json::Value = resp.json().unwrap_or_default();
    (
        status,
        v["error"]["code"].as_str().unwrap_or("").to_string(),
    )
}

const PAYLOAD: &[u8] = "{\"event\":\"invoice.paid\",\"amount\":4200,\"note\":\"grüße\"}".as_bytes();

#[test]
fn a_signature_made_with_the_seeds_formula_is_accepted_and_keygates_passes_the_seeds_verifier() {
    let (upstream, kg) = start();
    let python_sig = seed::seed_sign(PAYLOAD, NEW);
    let resp = deliver(&kg, "/hooks/billing", PAYLOAD, Some(&python_sig));
    assert_eq!(resp.status(), 200);
    let seen = upstream.last();
    assert_eq!(
        seen.body, PAYLOAD,
        "the body reaches the upstream untouched"
    );
    assert_eq!(
        seen.header("x-webhook-signature"),
        Some(python_sig.as_str())
    );

    let ours = keygate_sign("WH_SECRET", NEW, PAYLOAD);
    assert_eq!(ours, python_sig);
    assert!(
        seed::seed_verifies(PAYLOAD, &ours, NEW),
        "the seed's verify_webhook rejects keygate's signature"
    );
    assert!(!seed::seed_verifies(b"{\"event\":\"other\"}", &ours, NEW));
    // openssl agrees too.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "printf '%s' '{}' | openssl dgst -sha256 -hmac '{NEW}' | sed 's/^.*= //'",
            String::from_utf8_lossy(PAYLOAD)
        ))
        .output()
        .unwrap();
    assert_eq!(
        format!("sha256={}", String::from_utf8_lossy(&out.stdout).trim()),
        ours
    );
    assert_eq!(
        kg.metric("keygate_webhook_verifications_total{path=\"/hooks/billing\",result=\"valid\"}"),
        1.0
    );
}

#[test]
fn bad_signatures_are_refused_and_never_reach_the_upstream() {
    let (upstream, kg) = start();
    let good = keygate_sign("S", NEW, PAYLOAD);
    let cases: Vec<(&str, Vec<u8>, Option<String>)> = vec![
        (
            "tampered body",
            b"{\"event\":\"invoice.paid\",\"amount\":9999}".to_vec(),
            Some(good.clone()),
        ),
        (
            "wrong secret",
            PAYLOAD.to_vec(),
            Some(keygate_sign("S", "not-the-secret", PAYLOAD)),
        ),
        ("missing header", PAYLOAD.to_vec(), None),
        (
            "non-hex",
            PAYLOAD.to_vec(),
            Some(format!("sha256={}", "z".repeat(64))),
        ),
        (
            "wrong length",
            PAYLOAD.to_vec(),
            Some(good[..40].to_string()),
        ),
        (
            "other scheme",
            PAYLOAD.to_vec(),
            Some(good.replace("sha256=", "sha1=")),
        ),
        (
            "bare hex",
            PAYLOAD.to_vec(),
            Some(good["sha256=".len()..].to_string()),
        ),
    ];
    for (what, body, sig) in cases {
        let resp = deliver(&kg, "/hooks/billing", &body, sig.as_deref());
        assert!(resp.headers().contains_key("www-authenticate"), "{what}");
        assert_eq!(code(resp), (401, "invalid_signature".into()), "{what}");
    }
    assert_eq!(upstream.count(), 0);
    assert_eq!(
        kg.metric(
            "keygate_webhook_verifications_total{path=\"/hooks/billing\",result=\"mismatch\"}"
        ),
        2.0
    );
    assert_eq!(
        kg.metric(
            "keygate_webhook_verifications_total{path=\"/hooks/billing\",result=\"malformed\"}"
        ),
        4.0
    );
}

#[test]
fn old_and_new_secrets_both_pass_during_rotation() {
    let (upstream, kg) = start();
    for secret in [OLD, NEW] {
        let resp = deliver(
            &kg,
            "/hooks/billing",
            PAYLOAD,
            Some(&keygate_sign("S", secret, PAYLOAD)),
        );
        assert_eq!(resp.status(), 200, "{secret}");
    }
    assert_eq!(upstream.count(), 2);
}

#[test]
fn a_one_mebibyte_body_passes_intact_and_one_byte_more_is_refused() {
    let (upstream, kg) = start();
    let body: Vec<u8> = (0..1024 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let resp = deliver(
        &kg,
        "/hooks/billing",
        &body,
        Some(&keygate_sign("S", NEW, &body)),
    );
    assert_eq!(resp.status(), 200);
    assert_eq!(upstream.last().body, body);
    let mut over = body.clone();
    over.push(b'x');
    let resp = deliver(
        &kg,
        "/hooks/billing",
        &over,
        Some(&keygate_sign("S", NEW, &over)),
    );
    assert_eq!(code(resp), (413, "payload_too_large".into()));
    assert_eq!(
        upstream.count(),
        1,
        "the over-limit body never reached the upstream"
    );
}

#[test]
fn a_chunked_body_is_verified_and_forwarded() {
    let (upstream, kg) = start();
    let sig = keygate_sign("S", NEW, PAYLOAD);
    let mut sock = std::net::TcpStream::connect(("127.0.0.1", kg.port)).unwrap();
    let (a, b) = PAYLOAD.split_at(20);
    let request = format!(
        "POST /hooks/billing HTTP/1.1\r\nHost: x\r\nX-Webhook-Signature: {sig}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n",
        a.len()
    );
    sock.write_all(request.as_bytes()).unwrap();
    sock.write_all(a).unwrap();
    sock.write_all(format!("\r\n{:x}\r\n", b.len()).as_bytes())
        .unwrap();
    sock.write_all(b).unwrap();
    sock.write_all(b"\r\n0\r\n\r\n").unwrap();
    let mut answer = String::new();
    sock.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(upstream.last().body, PAYLOAD);
}

#[test]
fn timestamps_outside_the_tolerance_are_refused() {
    let (upstream, kg) = start();
    let send = |ts: u64, sign_ts: u64| {
        let ts_text = ts.to_string();
        let sig = keygate_sign_ts(NEW, &sign_ts.to_string(), PAYLOAD);
        client()
            .post(kg.url("/hooks/infra"))
            .header("X-Webhook-Signature", sig)
            .header("X-Webhook-Timestamp", ts_text)
            .body(PAYLOAD.to_vec())
            .send()
            .unwrap()
    };
    let now = now();
    assert_eq!(send(now, now).status(), 200);
    assert_eq!(
        code(send(now - 600, now - 600)),
        (401, "invalid_signature".into())
    );
    assert_eq!(
        code(send(now + 600, now + 600)),
        (401, "invalid_signature".into())
    );
    // A fresh timestamp on an old signature: the signed content differs.
    assert_eq!(
        code(send(now, now - 600)),
        (401, "invalid_signature".into())
    );
    assert_eq!(upstream.count(), 1);
    // This path's max_body is 1 KiB.
    let big = vec![b'x'; 2048];
    let resp = client()
        .post(kg.url("/hooks/infra"))
        .body(big)
        .send()
        .unwrap();
    assert_eq!(code(resp), (413, "payload_too_large".into()));
}

fn keygate_sign_ts(secret: &str, ts: &str, payload: &[u8]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["webhook", "sign", "--secret-env", "S", "--timestamp", ts])
        .env("S", secret)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(payload).unwrap();
    String::from_utf8(child.wait_with_output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn webhook_verify_cli_exits_0_for_valid_and_1_for_invalid() {
    let sig = keygate_sign("S", NEW, PAYLOAD);
    for (signature, expected) in [(sig.as_str(), 0), ("sha256=00", 1)] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args([
                "webhook",
                "verify",
                "--secret-env",
                "S",
                "--signature",
                signature,
            ])
            .env("S", NEW)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(PAYLOAD).unwrap();
        assert_eq!(child.wait().unwrap().code(), Some(expected));
    }
}
