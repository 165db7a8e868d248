//! The real keygate binary in front of a real upstream: what passes, what is
//! refused and how, and what the upstream is told.

mod support;

use std::net::IpAddr;

use reqwest::blocking::{Client, Response};
use serde_json::Value;
use support::*;

fn start() -> (Upstream, Keygate) {
    let upstream = Upstream::start();
    let keygate = Keygate::start(&config(), upstream.port);
    (upstream, keygate)
}

fn client_from(addr: &str) -> Client {
    reqwest::blocking::Client::builder()
        .no_proxy()
        .local_address(addr.parse::<IpAddr>().expect("address"))
        .timeout(std::time::Duration::from_secs(15))
        .build()
        .expect("client")
}

/// Status, parsed JSON body and the response itself, for a refusal.
fn refusal(resp: Response) -> (u16, String, Value, Option<String>) {
    let status = resp.status().as_u16();
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().expect("ascii").to_string());
    assert_eq!(
        resp.headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap()),
        Some("application/json")
    );
    let request_id = resp
        .headers()
        .get("x-request-id")
        .expect("x-request-id on every answer")
        .to_str()
        .unwrap()
        .to_string();
    let body: Value = resp.json().expect("JSON error body");
    assert_eq!(body["error"]["status"], status, "{body}");
    assert_eq!(body["request_id"], request_id.as_str(), "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    let code = body["error"]["code"].as_str().expect("code").to_string();
    (status, code, body, challenge)
}

#[test]
fn every_401_and_403_code_comes_with_the_documented_shape() {
    let (upstream, kg) = start();
    let c = client();
    let url = kg.url("/v1/vms");
    let mut expired = claims("u_alice");
    expired["exp"] = serde_json::json!(now() - 3600);

    let cases: Vec<(&str, reqwest::blocking::RequestBuilder, u16, &str)> = vec![
        ("no credential", c.get(&url), 401, "missing_credentials"),
        (
            "garbage token",
            c.get(&url).bearer_auth("not.a.jwt"),
            401,
            "invalid_token",
        ),
        (
            "expired token",
            c.get(&url).bearer_auth(sign("hs", &expired)),
            401,
            "token_expired",
        ),
        (
            "unknown key",
            c.get(&url).header("X-API-Key", "vmc_nope"),
            401,
            "invalid_api_key",
        ),
        (
            "key outside its allowlist",
            c.get(&url).header("X-API-Key", KEY_OFFICE),
            403,
            "ip_not_allowed",
        ),
        (
            "missing permission",
            c.delete(kg.url("/v1/vms/vm-1"))
                .header("X-API-Key", KEY_DEPLOY),
            403,
            "insufficient_permissions",
        ),
        (
            "deny route",
            c.get(kg.url("/admin/users")).bearer_auth(token("u_alice")),
            403,
            "forbidden",
        ),
        (
            "two credentials",
            c.get(&url)
                .bearer_auth(token("u_alice"))
                .header("X-API-Key", KEY_CI),
            400,
            "invalid_request",
        ),
    ];
    for (what, request, status, code) in cases {
        let (got_status, got_code, body, challenge) = refusal(request.send().expect(what));
        assert_eq!(
            (got_status, got_code.as_str()),
            (status, code),
            "{what}: {body}"
        );
        match status {
            401 => {
                let challenge = challenge.unwrap_or_else(|| panic!("{what}: no WWW-Authenticate"));
                assert!(
                    challenge.starts_with("Bearer realm=\"keygate\""),
                    "{what}: {challenge}"
                );
                if code != "missing_credentials" {
                    assert!(
                        challenge.contains("error=\"invalid_token\""),
                        "{what}: {challenge}"
                    );
                }
            }
            403 if code == "insufficient_permissions" => {
                let challenge = challenge.expect("insufficient_scope challenge");
                assert!(challenge.contains("error=\"insufficient_scope\""));
                assert!(challenge.contains("scope=\"vms:write\""));
            }
            _ => {}
        }
    }
    assert_eq!(
        upstream.count(),
        0,
        "no refused request may reach the upstream"
    );
    assert_eq!(
        kg.metric("keygate_auth_denials_total{code=\"invalid_token\"}"),
        1.0
    );
    assert_eq!(
        kg.metric("keygate_auth_denials_total{code=\"missing_credentials\"}"),
        1.0
    );
}

#[test]
fn allowed_request_reaches_upstream_with_identity_headers_and_without_credentials() {
    let (upstream, kg) = start();
    let resp = client()
        .get(kg.url("/v1/vms?page=2"))
        .bearer_auth(token("u_alice"))
        .header("X-Auth-Subject", "u_admin")
        .header("X-Auth-Permissions", "everything")
        .header("x-auth-tier", "enterprise")
        .header("X-Auth-Whatever", "spoof")
        .header("X-Request-Id", "client-chosen-id-1")
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "client-chosen-id-1");
    assert_eq!(resp.headers()["x-upstream"], "test");
    let seen = upstream.last();
    assert_eq!(seen.target, "/v1/vms?page=2");
    assert_eq!(seen.all("x-auth-subject"), vec!["u_alice"]);
    assert_eq!(seen.header("x-auth-email"), Some("alice@example.com"));
    assert_eq!(seen.all("x-auth-tier"), vec!["pro"]);
    assert_eq!(seen.all("x-auth-permissions"), vec!["vms:read,vms:write"]);
    assert_eq!(seen.header("x-auth-method"), Some("jwt"));
    assert_eq!(seen.header("x-auth-key-id"), None);
    assert_eq!(
        seen.header("x-auth-whatever"),
        None,
        "spoofed X-Auth-* must be stripped"
    );
    assert_eq!(
        seen.header("authorization"),
        None,
        "credentials are stripped by default"
    );
    assert_eq!(seen.header("x-request-id"), Some("client-chosen-id-1"));
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
}

#[test]
fn api_key_in_either_header_identifies_the_key_and_its_owner() {
    let (upstream, kg) = start();
    for request in [
        client()
            .get(kg.url("/v1/vms"))
            .header("X-API-Key", KEY_DEPLOY),
        client()
            .get(kg.url("/v1/vms"))
            .header("x-api-key", KEY_DEPLOY),
        client().get(kg.url("/v1/vms")).bearer_auth(KEY_DEPLOY),
    ] {
        assert_eq!(request.send().unwrap().status(), 200);
        let seen = upstream.last();
        assert_eq!(seen.header("x-auth-subject"), Some("u_alice"));
        assert_eq!(seen.header("x-auth-method"), Some("api_key"));
        assert_eq!(seen.header("x-auth-key-id"), Some("deploy-bot"));
        assert_eq!(seen.header("x-auth-tier"), Some("pro"));
        assert_eq!(seen.header("x-auth-permissions"), Some("vms:read"));
        assert_eq!(seen.header("x-api-key"), None);
        assert_eq!(seen.header("authorization"), None);
    }
    // A key without an owner is its own subject, with no email.
    assert_eq!(
        client()
            .get(kg.url("/v1/vms"))
            .header("X-API-Key", KEY_CI)
            .send()
            .unwrap()
            .status(),
        200
    );
    let seen = upstream.last();
    assert_eq!(seen.header("x-auth-subject"), Some("ci"));
    assert_eq!(seen.header("x-auth-email"), None);
    assert_eq!(seen.header("x-auth-tier"), Some("enterprise"));
}

#[test]
fn bearer_scheme_is_case_insensitive() {
    let (_upstream, kg) = start();
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let resp = client()
            .get(kg.url("/v1/vms"))
            .header("Authorization", format!("{scheme} {}", token("u_alice")))
            .send()
            .unwrap();
        assert_eq!(resp.status(), 200, "{scheme}");
    }
}

#[test]
fn jwt_of_every_algorithm_family_passes() {
    let (upstream, kg) = start();
    for kid in ["hs", "ed", "es", "rs"] {
        let resp = client()
            .get(kg.url("/v1/vms"))
            .bearer_auth(sign(kid, &claims("u_alice")))
            .send()
            .unwrap();
        assert_eq!(resp.status(), 200, "{kid}");
        assert_eq!(upstream.last().header("x-auth-subject"), Some("u_alice"));
    }
}

#[test]
fn hostile_tokens_get_401_and_the_proxy_keeps_serving() {
    let (upstream, kg) = start();
    let none = {
        use base64::Engine;
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.",
            e.encode(r#"{"alg":"none","typ":"JWT"}"#),
            e.encode(claims("u_alice").to_string())
        )
    };
    let mut padded = claims("u_alice");
    padded["pad"] = serde_json::json!("x".repeat(20_000));
    let huge = sign("hs", &padded);
    let mut wrong_aud = claims("u_alice");
    wrong_aud["aud"] = serde_json::json!("someone-else");
    for (what, bad) in [
        ("alg none", none),
        ("20 KB token", huge),
        ("garbage", "%%%.&&&.***".to_string()),
        ("wrong audience", sign("hs", &wrong_aud)),
        ("user gone", token("u_nobody")),
        ("disabled user", token("u_carol")),
    ] {
        let resp = client()
            .get(kg.url("/v1/vms"))
            .bearer_auth(&bad)
            .send()
            .unwrap();
        let (status, code, body, _) = refusal(resp);
        assert_eq!(
            (status, code.as_str()),
            (401, "invalid_token"),
            "{what}: {body}"
        );
    }
    assert_eq!(upstream.count(), 0);
    let ok = client()
        .get(kg.url("/v1/vms"))
        .bearer_auth(token("u_alice"))
        .send()
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[test]
fn public_deny_and_default_routes() {
    let (upstream, kg) = start();
    let public = client().get(kg.url("/v1/status")).send().unwrap();
    assert_eq!(public.status(), 200);
    let seen = upstream.last();
    assert_eq!(seen.header("x-auth-subject"), None);
    // Unmatched paths take default_access = "authenticated".
    let (status, code, _, _) = refusal(client().get(kg.url("/v2/anything")).send().unwrap());
    assert_eq!((status, code.as_str()), (401, "missing_credentials"));
    let ok = client()
        .get(kg.url("/v2/anything"))
        .bearer_auth(token("u_alice"))
        .send()
        .unwrap();
    assert_eq!(ok.status(), 200);
    let (status, code, _, _) = refusal(client().get(kg.url("/admin/x")).send().unwrap());
    assert_eq!((status, code.as_str()), (403, "forbidden"));
}

#[test]
fn method_specific_route_beats_method_less_one() {
    let (_upstream, kg) = start();
    let alice = token("u_alice");
    let key = KEY_DEPLOY; // vms:read only
    let get = client()
        .get(kg.url("/v1/vms/vm-1"))
        .header("X-API-Key", key)
        .send()
        .unwrap();
    assert_eq!(get.status(), 200);
    let delete = client()
        .delete(kg.url("/v1/vms/vm-1"))
        .header("X-API-Key", key)
        .send()
        .unwrap();
    assert_eq!(delete.status(), 403);
    let delete = client()
        .delete(kg.url("/v1/vms/vm-1"))
        .bearer_auth(alice)
        .send()
        .unwrap();
    assert_eq!(delete.status(), 200);
}

#[test]
fn forwarded_for_is_believed_from_trusted_proxies_only() {
    let (upstream, kg) = start();
    let bob = token("u_bob"); // bob may only call from 127.0.0.9
                              // From a trusted proxy (127.0.0.2), the right-most untrusted entry is the client.
    let resp = client_from("127.0.0.2")
        .get(kg.url("/v1/vms"))
        .bearer_auth(&bob)
        .header("X-Forwarded-For", "203.0.113.50, 127.0.0.9")
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = upstream.last();
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("203.0.113.50, 127.0.0.9, 127.0.0.2")
    );
    // The same claim from an untrusted peer is ignored, and not passed on.
    let resp = client_from("127.0.0.3")
        .get(kg.url("/v1/vms"))
        .bearer_auth(&bob)
        .header("X-Forwarded-For", "127.0.0.9")
        .send()
        .unwrap();
    assert_eq!(refusal(resp).1, "ip_not_allowed");
    let resp = client_from("127.0.0.3")
        .get(kg.url("/v1/status"))
        .header("X-Forwarded-For", "127.0.0.9")
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(upstream.last().header("x-forwarded-for"), Some("127.0.0.3"));
}

#[test]
fn request_id_is_generated_when_absent_and_sent_both_ways() {
    let (upstream, kg) = start();
    let resp = client().get(kg.url("/v1/status")).send().unwrap();
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 32);
    assert_eq!(upstream.last().header("x-request-id"), Some(id.as_str()));
    let (_, _, body, _) = refusal(
        client()
            .get(kg.url("/v1/vms"))
            .header("X-Request-Id", "abc-123")
            .send()
            .unwrap(),
    );
    assert_eq!(body["request_id"], "abc-123");
}

#[test]
fn paths_are_matched_and_forwarded_normalised() {
    let (upstream, kg) = start();
    for sneaky in [
        "/%61dmin/users",
        "//admin/users",
        "/v1/../admin/users",
        "/v1/%2e%2e/admin/users",
    ] {
        let resp = client()
            .get(kg.url(sneaky))
            .bearer_auth(token("u_alice"))
            .send()
            .unwrap();
        assert_eq!(resp.status(), 403, "{sneaky}");
    }
    let resp = client()
        .get(kg.url("/v1/./vms/%76m-1?x=1"))
        .header("X-API-Key", KEY_DEPLOY)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(upstream.last().target, "/v1/vms/vm-1?x=1");
    assert_eq!(upstream.count(), 1);
}

#[test]
fn request_body_is_forwarded_intact() {
    let (upstream, kg) = start();
    let body = vec![b'x'; 200_000];
    let resp = client()
        .post(kg.url("/v1/vms/vm-1"))
        .bearer_auth(token("u_alice"))
        .body(body.clone())
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(upstream.last().body, body);
}

#[test]
fn credentials_are_forwarded_when_configured() {
    let upstream = Upstream::start();
    let cfg = config().replace(
        "read_timeout = \"2s\"",
        "read_timeout = \"2s\"\nforward_credentials = true",
    );
    let kg = Keygate::start(&cfg, upstream.port);
    let t = token("u_alice");
    client()
        .get(kg.url("/v1/vms"))
        .bearer_auth(&t)
        .send()
        .unwrap();
    assert_eq!(
        upstream.last().header("authorization"),
        Some(format!("Bearer {t}").as_str())
    );
}

#[test]
fn upstream_down_gives_json_502() {
    let dead_port = free_port();
    let kg = Keygate::start(&config(), dead_port);
    let resp = client().get(kg.url("/v1/status")).send().unwrap();
    let (status, code, _, _) = refusal(resp);
    assert_eq!((status, code.as_str()), (502, "upstream_unavailable"));
    assert_eq!(
        kg.metric("keygate_upstream_errors_total{kind=\"connect\"}"),
        1.0
    );
}

#[test]
fn slow_upstream_gives_json_504() {
    let (_upstream, kg) = start();
    let resp = client()
        .get(kg.url("/slow/x"))
        .bearer_auth(token("u_alice"))
        .send()
        .unwrap();
    let (status, code, _, _) = refusal(resp);
    assert_eq!((status, code.as_str()), (504, "upstream_timeout"));
}

#[test]
fn admin_listener_serves_health_readiness_and_metrics() {
    let (_upstream, kg) = start();
    client().get(kg.url("/v1/status")).send().unwrap();
    let c = client();
    assert_eq!(c.get(kg.admin("/healthz")).send().unwrap().status(), 200);
    let ready: Value = c.get(kg.admin("/readyz")).send().unwrap().json().unwrap();
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["policy"]["users"], 5);
    assert_eq!(
        kg.metric("keygate_requests_total{code=\"200\",method=\"GET\",route=\"/v1/status\",status=\"2xx\"}"),
        1.0
    );
    assert_eq!(
        kg.metric("keygate_request_duration_seconds_count{route=\"/v1/status\"}"),
        1.0
    );
    let text = c.get(kg.admin("/metrics")).send().unwrap().text().unwrap();
    let build = text
        .lines()
        .find(|l| l.starts_with("keygate_build_info{"))
        .expect("keygate_build_info");
    assert!(
        build.contains("version=\"0.1.0\"") && build.ends_with(" 1"),
        "{build}"
    );
    assert_eq!(c.get(kg.admin("/nope")).send().unwrap().status(), 404);
}

#[test]
fn sighup_reloads_and_a_broken_file_keeps_the_old_policy() {
    let (_upstream, kg) = start();
    let c = client();
    let path = kg.config_path();
    let original = std::fs::read_to_string(&path).unwrap();
    // Remove alice's write permission, then reload.
    let edited = original.replacen(
        "permissions = [\"vms:read\", \"vms:write\"]",
        "permissions = [\"vms:read\"]",
        1,
    );
    std::fs::write(&path, &edited).unwrap();
    kg.signal("HUP");
    let alice = token("u_alice");
    wait_until(|| {
        c.delete(kg.url("/v1/vms/vm-1"))
            .bearer_auth(&alice)
            .send()
            .unwrap()
            .status()
            == 403
    });
    // A broken file is rejected whole; the last good policy keeps serving.
    std::fs::write(&path, edited.replace("[tiers.free]", "[tiers.free")).unwrap();
    let reload = c.post(kg.admin("/reload")).send().unwrap();
    assert_eq!(reload.status(), 422);
    let body: Value = reload.json().unwrap();
    assert_eq!(body["result"], "failure");
    assert!(
        body["errors"][0]
            .as_str()
            .unwrap()
            .contains("keygate.toml:"),
        "{body}"
    );
    assert_eq!(
        c.get(kg.url("/v1/vms"))
            .bearer_auth(&alice)
            .send()
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        kg.metric("keygate_config_reloads_total{result=\"failure\"}"),
        1.0
    );
    assert_eq!(kg.metric("keygate_config_last_reload_success"), 0.0);
}

fn wait_until(mut ok: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "condition not met within 5 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn access_log_has_one_json_line_per_request_and_no_secrets() {
    let (_upstream, kg) = start();
    let t = token("u_alice");
    client()
        .get(kg.url("/v1/vms?secret=querytext"))
        .bearer_auth(&t)
        .send()
        .unwrap();
    client()
        .get(kg.url("/v1/vms"))
        .header("X-API-Key", KEY_DEPLOY)
        .send()
        .unwrap();
    client()
        .get(kg.url("/v1/vms"))
        .header("X-API-Key", "vmc_wrong_key")
        .send()
        .unwrap();
    wait_until(|| kg.stdout().lines().count() >= 3);
    let log = kg.stdout();
    for secret in [t.as_str(), KEY_DEPLOY, "vmc_wrong_key", "querytext"] {
        assert!(!log.contains(secret), "the access log leaks {secret:?}");
        assert!(
            !kg.stderr().contains(secret),
            "the diagnostic log leaks {secret:?}"
        );
    }
    let mut lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 3);
    // Lines of requests served by different proxy threads may come out of
    // order (each thread hands over its own): order them as sent.
    let rank = |l: &Value| match (l["auth_method"].as_str(), l["status"].as_u64()) {
        (Some("jwt"), _) => 0,
        (Some("api_key"), Some(200)) => 1,
        _ => 2,
    };
    lines.sort_by_key(rank);
    assert_eq!(lines[0]["status"], 200);
    assert_eq!(lines[0]["principal"], "u_alice");
    assert_eq!(lines[0]["auth_method"], "jwt");
    assert_eq!(lines[0]["route"], "/v1/vms");
    assert_eq!(lines[0]["path"], "/v1/vms");
    assert_eq!(lines[0]["tier"], "pro");
    assert_eq!(lines[0]["client_ip"], "127.0.0.1");
    assert!(lines[0]["upstream_ms"].as_f64().is_some());
    assert_eq!(lines[1]["key_id"], "deploy-bot");
    assert_eq!(lines[2]["status"], 401);
    assert_eq!(lines[2]["code"], "invalid_api_key");
    assert_eq!(lines[2]["principal"], Value::Null);
}
