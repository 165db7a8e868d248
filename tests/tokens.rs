//! Token issuance through the real binary: the seed's shapes, rotation,
//! reuse detection, revocation, throttling, durability and JWKS.

mod support;

use reqwest::blocking::Response;
use serde_json::{json, Value};
use support::*;

fn start() -> (Upstream, Keygate) {
    let upstream = Upstream::start();
    let kg = Keygate::start(&config_with_passwords(), upstream.port);
    (upstream, kg)
}

fn post(kg: &Keygate, path: &str, body: &Value) -> Response {
    client().post(kg.url(path)).json(body).send().unwrap()
}

fn login(kg: &Keygate, email: &str, password: &str) -> Response {
    post(
        kg,
        "/api/v1/auth/token",
        &json!({"email": email, "password": password}),
    )
}

fn refresh(kg: &Keygate, token: &str) -> Response {
    post(kg, "/api/v1/auth/refresh", &json!({"refresh_token": token}))
}

fn tokens(resp: Response) -> Value {
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    resp.json().unwrap()
}

fn error_code(resp: Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().expect("JSON error");
    (status, body["error"]["code"].as_str().unwrap().to_string())
}

fn claims_of(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[test]
fn login_answers_the_seeds_shape_and_the_token_works() {
    let (upstream, kg) = start();
    let t = tokens(login(&kg, "Alice@Example.com", PASSWORD));
    let keys: Vec<&str> = t.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys.len(), 5, "{t}");
    assert_eq!(t["token_type"], "Bearer");
    assert_eq!(t["expires_in"], 86400);
    let expires_at = t["expires_at"].as_str().unwrap();
    assert!(
        expires_at.ends_with('Z') && expires_at.len() == 20,
        "{expires_at}"
    );
    let exp = humantime::parse_rfc3339(expires_at).unwrap();
    let in_a_day = std::time::SystemTime::now() + std::time::Duration::from_secs(86400);
    assert!(in_a_day.duration_since(exp).unwrap_or_default().as_secs() < 5);
    let refresh_token = t["refresh_token"].as_str().unwrap();
    assert!(refresh_token.starts_with("rft_") && refresh_token.len() == 47);

    let token = t["token"].as_str().unwrap();
    let c = claims_of(token);
    assert_eq!(c["sub"], "u_alice");
    assert_eq!(c["email"], "alice@example.com");
    assert_eq!(c["tier"], "pro");
    assert_eq!(c["permissions"], json!(["vms:read", "vms:write"]));
    assert_eq!(
        (c["iss"].as_str(), c["aud"].as_str()),
        (Some("keygate"), Some("api"))
    );
    for claim in ["iat", "nbf", "exp", "jti"] {
        assert!(!c[claim].is_null(), "{claim}");
    }
    let header = jsonwebtoken::decode_header(token).unwrap();
    assert_eq!(header.kid.as_deref(), Some("hs"));

    let resp = client()
        .get(kg.url("/v1/vms"))
        .bearer_auth(token)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(upstream.last().header("x-auth-subject"), Some("u_alice"));
    assert_eq!(
        kg.metric("keygate_tokens_issued_total{grant=\"password\"}"),
        1.0
    );
}

#[test]
fn unknown_email_wrong_password_and_disabled_user_look_the_same() {
    let (_upstream, kg) = start();
    let mut seen = Vec::new();
    for (email, password) in [
        ("nobody@example.com", PASSWORD),
        ("alice@example.com", "wrong password"),
        ("carol@example.com", PASSWORD),
    ] {
        let resp = login(&kg, email, password);
        assert_eq!(
            resp.headers()["www-authenticate"].to_str().unwrap(),
            "Bearer realm=\"keygate\""
        );
        let mut body: Value = resp.json().unwrap();
        assert_eq!(body["error"]["status"], 401);
        body["request_id"] = Value::Null;
        seen.push(body);
    }
    assert_eq!(seen[0], seen[1]);
    assert_eq!(seen[1], seen[2]);
    assert_eq!(seen[0]["error"]["code"], "invalid_credentials");
}

#[test]
fn malformed_login_requests_are_refused() {
    let (_upstream, kg) = start();
    let url = kg.url("/api/v1/auth/token");
    let c = client();
    let ct = "content-type";
    let cases = [
        (
            c.post(&url)
                .header(ct, "application/json")
                .body("{not json"),
            400,
            "invalid_request",
        ),
        (
            c.post(&url).json(&json!({"email": "alice@example.com"})),
            400,
            "invalid_request",
        ),
        (
            c.post(&url).json(&json!({"email": 1, "password": 2})),
            400,
            "invalid_request",
        ),
        (
            c.post(&url)
                .header(ct, "text/plain")
                .body(r#"{"email":"a","password":"b"}"#),
            400,
            "invalid_request",
        ),
        (
            c.post(&url)
                .header(ct, "application/json")
                .body(vec![b' '; 17 * 1024]),
            413,
            "payload_too_large",
        ),
        (c.get(&url), 405, "method_not_allowed"),
    ];
    for (i, (request, status, code)) in cases.into_iter().enumerate() {
        assert_eq!(
            error_code(request.send().unwrap()),
            (status, code.to_string()),
            "case {i}"
        );
    }
    // A chunked body over the limit is refused too (raw socket: keygate
    // answers before the client has finished sending).
    use std::io::{Read, Write};
    let mut sock = std::net::TcpStream::connect(("127.0.0.1", kg.port)).unwrap();
    let head = "POST /api/v1/auth/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    sock.write_all(head.as_bytes()).unwrap();
    for _ in 0..8 {
        let _ = sock.write_all(format!("1000\r\n{}\r\n", " ".repeat(4096)).as_bytes());
    }
    let _ = sock.write_all(b"0\r\n\r\n");
    let mut answer = String::new();
    let _ = sock.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("payload_too_large"));
}

#[test]
fn refresh_rotates_and_reuse_revokes_the_whole_family() {
    let (_upstream, kg) = start();
    let first = tokens(login(&kg, "alice@example.com", PASSWORD));
    let r1 = first["refresh_token"].as_str().unwrap().to_string();
    let second = tokens(refresh(&kg, &r1));
    let r2 = second["refresh_token"].as_str().unwrap().to_string();
    assert_ne!(r1, r2);
    assert_eq!(second["token_type"], "Bearer");
    let token = second["token"].as_str().unwrap();
    assert_eq!(
        client()
            .get(kg.url("/v1/vms"))
            .bearer_auth(token)
            .send()
            .unwrap()
            .status(),
        200
    );
    let third = tokens(refresh(&kg, &r2));
    let r3 = third["refresh_token"].as_str().unwrap().to_string();

    // r1 is spent: presenting it again revokes the family, r3 included.
    assert_eq!(
        error_code(refresh(&kg, &r1)),
        (401, "invalid_refresh_token".into())
    );
    assert_eq!(
        error_code(refresh(&kg, &r3)),
        (401, "invalid_refresh_token".into())
    );
    assert_eq!(kg.metric("keygate_refresh_reuse_detected_total"), 1.0);
    // Another login starts a new family that works.
    let other = tokens(login(&kg, "alice@example.com", PASSWORD));
    assert_eq!(
        refresh(&kg, other["refresh_token"].as_str().unwrap()).status(),
        200
    );
}

#[test]
fn revoke_ends_the_family_and_answers_200_for_anything() {
    let (_upstream, kg) = start();
    let t = tokens(login(&kg, "alice@example.com", PASSWORD));
    let r1 = t["refresh_token"].as_str().unwrap();
    let r2 = tokens(refresh(&kg, r1))["refresh_token"]
        .as_str()
        .unwrap()
        .to_string();
    let resp = post(&kg, "/api/v1/auth/revoke", &json!({"refresh_token": r2}));
    assert_eq!(resp.status(), 200);
    assert_eq!(
        error_code(refresh(&kg, &r2)),
        (401, "invalid_refresh_token".into())
    );
    for unknown in [
        "rft_nope",
        "not-a-token",
        "rft_0000000000000000000000000000000000000000000",
    ] {
        assert_eq!(
            post(
                &kg,
                "/api/v1/auth/revoke",
                &json!({"refresh_token": unknown})
            )
            .status(),
            200
        );
    }
    let missing = post(&kg, "/api/v1/auth/revoke", &json!({}));
    assert_eq!(error_code(missing), (400, "invalid_request".into()));
}

#[test]
fn access_and_refresh_tokens_are_not_interchangeable() {
    let (_upstream, kg) = start();
    let t = tokens(login(&kg, "alice@example.com", PASSWORD));
    let access = t["token"].as_str().unwrap();
    let refresh_token = t["refresh_token"].as_str().unwrap();
    assert_eq!(
        error_code(refresh(&kg, access)),
        (401, "invalid_refresh_token".into())
    );
    let resp = client()
        .get(kg.url("/v1/vms"))
        .bearer_auth(refresh_token)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 401);
}

#[test]
fn failed_logins_are_throttled_per_email_and_per_address() {
    let upstream = Upstream::start();
    let cfg = config_with_passwords().replace(
        "audience = \"api\"",
        "audience = \"api\"\nlogin_attempts_per_email = 3\nlogin_attempts_per_ip = 5\nlogin_throttle_period = \"10m\"",
    );
    let kg = Keygate::start(&cfg, upstream.port);
    // Successful logins never count.
    for _ in 0..8 {
        assert_eq!(login(&kg, "alice@example.com", PASSWORD).status(), 200);
    }
    for _ in 0..3 {
        assert_eq!(login(&kg, "alice@example.com", "nope").status(), 401);
    }
    let resp = login(&kg, "alice@example.com", PASSWORD);
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=200).contains(&retry), "{retry}");
    assert_eq!(error_code(resp), (429, "login_throttled".into()));
    // Two more failures on other emails exhaust the address's 5.
    assert_eq!(login(&kg, "x@example.com", "nope").status(), 401);
    assert_eq!(login(&kg, "y@example.com", "nope").status(), 401);
    assert_eq!(login(&kg, "dana@example.com", PASSWORD).status(), 429);
    assert!(kg.metric("keygate_login_throttled_total") >= 2.0);
}

#[test]
fn users_allowlist_applies_to_login() {
    let (_upstream, kg) = start();
    // bob may only call from 127.0.0.9. From elsewhere his right password
    // gets the answer a wrong one gets (a 403 would tell the two apart).
    assert_eq!(
        error_code(login(&kg, "bob@example.com", PASSWORD)),
        (401, "invalid_credentials".into())
    );
    let from_his_address = client_at("127.0.0.9")
        .post(kg.url("/api/v1/auth/token"))
        .json(&json!({"email": "bob@example.com", "password": PASSWORD}))
        .send()
        .unwrap();
    assert_eq!(from_his_address.status(), 200);
}

#[test]
fn refresh_fails_once_the_user_is_disabled_or_cut_off() {
    let (_upstream, kg) = start();
    let dana = tokens(login(&kg, "dana@example.com", PASSWORD));
    let alice = tokens(login(&kg, "alice@example.com", PASSWORD));
    let path = kg.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    let future = humantime::format_rfc3339_seconds(
        std::time::SystemTime::now() + std::time::Duration::from_secs(2),
    );
    let edited = text
        .replace("id = \"u_dana\"\n", "id = \"u_dana\"\ndisabled = true\n")
        .replace(
            "id = \"u_alice\"\n",
            &format!("id = \"u_alice\"\ntokens_valid_after = \"{future}\"\n"),
        );
    std::fs::write(&path, edited).unwrap();
    assert_eq!(
        client().post(kg.admin("/reload")).send().unwrap().status(),
        200
    );
    for t in [&dana, &alice] {
        let r = t["refresh_token"].as_str().unwrap();
        assert_eq!(
            error_code(refresh(&kg, r)),
            (401, "invalid_refresh_token".into())
        );
        let access = t["token"].as_str().unwrap();
        assert_eq!(
            client()
                .get(kg.url("/v1/vms"))
                .bearer_auth(access)
                .send()
                .unwrap()
                .status(),
            401
        );
    }
}

#[test]
fn refresh_token_survives_kill_9_right_after_login() {
    let (_upstream, mut kg) = start();
    let t = tokens(login(&kg, "alice@example.com", PASSWORD));
    kg.kill9_and_restart();
    let again = tokens(refresh(&kg, t["refresh_token"].as_str().unwrap()));
    // And the spent state survives too.
    kg.kill9_and_restart();
    assert_eq!(
        refresh(&kg, t["refresh_token"].as_str().unwrap()).status(),
        401
    );
    assert_eq!(
        refresh(&kg, again["refresh_token"].as_str().unwrap()).status(),
        401,
        "family revoked"
    );
}

#[test]
fn jwks_publishes_the_eddsa_key_and_its_tokens_verify_with_it() {
    let upstream = Upstream::start();
    // Rotation: the EdDSA key signs now; the old HMAC key still verifies.
    let cfg = config_with_passwords()
        .replace("secret_env = \"KEYGATE_TEST_HS\"\nsign = true", "secret_env = \"KEYGATE_TEST_HS\"")
        .replace(
            "public_key_file = \"{keys}/ed25519.pub.pem\"",
            "public_key_file = \"{keys}/ed25519.pub.pem\"\nprivate_key_file = \"{keys}/ed25519.pem\"\nsign = true",
        );
    let kg = Keygate::start(&cfg, upstream.port);
    let jwks: jsonwebtoken::jwk::JwkSet = client()
        .get(kg.url("/.well-known/jwks.json"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let kids: Vec<_> = jwks
        .keys
        .iter()
        .filter_map(|k| k.common.key_id.clone())
        .collect();
    assert_eq!(
        kids,
        vec!["ed", "es", "rs"],
        "HMAC keys are never published"
    );

    let t = tokens(login(&kg, "alice@example.com", PASSWORD));
    let token = t["token"].as_str().unwrap();
    let header = jsonwebtoken::decode_header(token).unwrap();
    assert_eq!(header.kid.as_deref(), Some("ed"));
    assert_eq!(header.alg, jsonwebtoken::Algorithm::EdDSA);
    let jwk = jwks.find("ed").unwrap();
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    validation.set_audience(&["api"]);
    validation.set_issuer(&["keygate"]);
    let data = jsonwebtoken::decode::<Value>(token, &key, &validation).unwrap();
    assert_eq!(data.claims["sub"], "u_alice");
    // Tokens signed by the old key keep working until they expire.
    let old = client()
        .get(kg.url("/v1/vms"))
        .bearer_auth(token_for_hs("u_alice"))
        .send()
        .unwrap();
    assert_eq!(old.status(), 200);
}

fn token_for_hs(sub: &str) -> String {
    sign("hs", &claims(sub))
}
