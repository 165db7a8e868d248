//! Self-service API keys and the account allowlist through the real
//! binary: every row of the contract, isolation between users, roll with
//! a grace period, the cap under parallel creates, durability across
//! `kill -9`, and a fleet of three sidecars on one real `redis-server`.

mod support;

use std::time::{Duration, Instant};

use reqwest::blocking::{RequestBuilder, Response};
use serde_json::{json, Value};
use support::redis::RedisServer;
use support::*;

/// The test policy with self-service keys on (three keys per user), and
/// `keys:manage` for alice.
fn self_service_config(extra: &str) -> String {
    let policy = config().replacen(
        "permissions = [\"vms:read\", \"vms:write\"]",
        "permissions = [\"vms:read\", \"vms:write\", \"keys:manage\"]",
        1,
    );
    format!(
        "{policy}\n[auth.self_service]\nenabled = true\nmax_keys_per_user = 3\ndefault_grace = \"1h\"\n{extra}\n"
    )
}

fn start() -> (Upstream, Keygate) {
    let upstream = Upstream::start();
    let kg = Keygate::start(&self_service_config(""), upstream.port);
    (upstream, kg)
}

fn as_user(req: RequestBuilder, user: &str) -> RequestBuilder {
    req.bearer_auth(token(user))
}

fn answer(resp: Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

fn create(kg: &Keygate, user: &str, body: Value) -> (u16, Value) {
    answer(
        as_user(client().post(kg.url("/api/v1/keys")), user)
            .json(&body)
            .send()
            .unwrap(),
    )
}

/// `GET /v1/vms` with `key` as a Bearer credential: the status.
fn use_key(kg: &Keygate, key: &str) -> u16 {
    client()
        .get(kg.url("/v1/vms"))
        .bearer_auth(key)
        .send()
        .unwrap()
        .status()
        .as_u16()
}

#[test]
fn create_list_get_update_revoke_as_the_contract_says() {
    let (upstream, kg) = start();
    let resp = as_user(client().post(kg.url("/api/v1/keys")), "u_alice")
        .json(&json!({"name": "ci", "permissions": ["vms:read", "vms:write"], "expires_in": "90d"}))
        .send()
        .unwrap();
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let (status, made) = answer(resp);
    assert_eq!(status, 201, "{made}");
    let fields: Vec<&str> = made
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for f in [
        "id",
        "key",
        "start",
        "name",
        "permissions",
        "ip_allow",
        "created_at",
        "expires_at",
    ] {
        assert!(fields.contains(&f), "{f} missing from {made}");
    }
    let key = made["key"].as_str().unwrap().to_string();
    let id = made["id"].as_str().unwrap().to_string();
    assert!(key.starts_with("kg_") && key.len() == 3 + 43 + 6, "{key}");
    assert!(id.starts_with("key_"));
    assert_eq!(made["start"], &key[..9]);
    assert!(made["expires_at"].as_str().unwrap().ends_with('Z'));

    // The key is a principal like a TOML key, acting for its owner.
    assert_eq!(use_key(&kg, &key), 200);
    let seen = upstream.last();
    assert_eq!(seen.header("x-auth-subject"), Some("u_alice"));
    assert_eq!(seen.header("x-auth-method"), Some("api_key"));
    assert_eq!(seen.header("x-auth-key-id"), Some(id.as_str()));
    assert_eq!(seen.header("x-auth-tier"), Some("pro"));
    assert_eq!(
        seen.header("x-auth-permissions"),
        Some("vms:read,vms:write")
    );
    assert!(seen.header("authorization").is_none());
    // And through the API-key header too.
    let via_header = client()
        .get(kg.url("/v1/vms"))
        .header("x-api-key", &key)
        .send()
        .unwrap();
    assert_eq!(via_header.status(), 200);

    // List and get: never the key.
    let (status, list) = answer(
        as_user(client().get(kg.url("/api/v1/keys")), "u_alice")
            .send()
            .unwrap(),
    );
    assert_eq!(status, 200);
    let keys = list["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert!(keys[0].get("key").is_none());
    assert_eq!(keys[0]["id"], id.as_str());
    assert!(keys[0].get("last_used_at").is_some());
    let path = format!("/api/v1/keys/{id}");
    let (status, one) = answer(
        as_user(client().get(kg.url(&path)), "u_alice")
            .send()
            .unwrap(),
    );
    assert_eq!((status, one["name"].as_str()), (200, Some("ci")));

    // Another user's id is 404 and changes nothing.
    for req in [
        client().get(kg.url(&path)),
        client().delete(kg.url(&path)),
        client().patch(kg.url(&path)).json(&json!({"name": "x"})),
        client()
            .post(kg.url(&format!("{path}/roll")))
            .json(&json!({})),
    ] {
        let (status, body) = answer(as_user(req, "u_dana").send().unwrap());
        assert_eq!((status, code(&body)), (404, "key_not_found"), "{body}");
    }
    let (_, list) = answer(
        as_user(client().get(kg.url("/api/v1/keys")), "u_dana")
            .send()
            .unwrap(),
    );
    assert_eq!(list["keys"], json!([]));
    assert_eq!(use_key(&kg, &key), 200);

    // Narrow-only: permissions and expiry may shrink, never grow.
    let (status, body) = answer(
        as_user(client().patch(kg.url(&path)), "u_alice")
            .json(&json!({"permissions": ["vms:read"], "name": "ci-ro"}))
            .send()
            .unwrap(),
    );
    assert_eq!(
        (status, body["permissions"].clone()),
        (200, json!(["vms:read"])),
        "{body}"
    );
    let del = client()
        .delete(kg.url("/v1/vms/1"))
        .bearer_auth(&key)
        .send()
        .unwrap();
    assert_eq!(del.status(), 403, "the narrowed key lost vms:write at once");
    let (status, body) = answer(
        as_user(client().patch(kg.url(&path)), "u_alice")
            .json(&json!({"permissions": ["vms:read", "vms:write"]}))
            .send()
            .unwrap(),
    );
    assert_eq!((status, code(&body)), (403, "insufficient_permissions"));
    let later = humantime::format_rfc3339_seconds(
        std::time::SystemTime::now() + Duration::from_secs(200 * 86400),
    )
    .to_string();
    let (status, body) = answer(
        as_user(client().patch(kg.url(&path)), "u_alice")
            .json(&json!({"expires_at": later}))
            .send()
            .unwrap(),
    );
    assert_eq!((status, code(&body)), (400, "invalid_request"), "{body}");

    // Revoke: 204, then the key fails and is gone from lists and gets.
    let resp = as_user(client().delete(kg.url(&path)), "u_alice")
        .send()
        .unwrap();
    assert_eq!(resp.status(), 204);
    let denied = client()
        .get(kg.url("/v1/vms"))
        .bearer_auth(&key)
        .send()
        .unwrap();
    assert_eq!(denied.status(), 401);
    let (_, body) = answer(denied);
    assert_eq!(code(&body), "invalid_api_key");
    let (status, _) = answer(
        as_user(client().get(kg.url(&path)), "u_alice")
            .send()
            .unwrap(),
    );
    assert_eq!(status, 404);
    let (_, list) = answer(
        as_user(client().get(kg.url("/api/v1/keys")), "u_alice")
            .send()
            .unwrap(),
    );
    assert_eq!(list["keys"], json!([]));
    let (status, body) = answer(
        as_user(client().post(kg.url(&format!("{path}/roll"))), "u_alice")
            .json(&json!({}))
            .send()
            .unwrap(),
    );
    assert_eq!((status, code(&body)), (409, "key_revoked"));

    // No key string anywhere in what keygate wrote.
    std::thread::sleep(Duration::from_millis(300));
    let logs = format!("{}{}", kg.stdout(), kg.stderr());
    assert!(!logs.contains(&key), "a key reached the logs");
    assert!(
        logs.contains("self-service key change"),
        "audit lines are written"
    );
    let metrics = client()
        .get(kg.admin("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(!metrics.contains(&key));
}

#[test]
fn refusals_carry_the_contracts_codes() {
    let (_upstream, kg) = start();
    let cases: Vec<(RequestBuilder, u16, &str)> = vec![
        // No credential at all.
        (
            client().get(kg.url("/api/v1/keys")),
            401,
            "missing_credentials",
        ),
        // Unknown fields, bad JSON, a bad CIDR.
        (
            as_user(client().post(kg.url("/api/v1/keys")), "u_alice")
                .json(&json!({"name": "a", "admin": true})),
            400,
            "invalid_request",
        ),
        (
            as_user(client().post(kg.url("/api/v1/keys")), "u_alice")
                .header("content-type", "application/json")
                .body("{\"name\":"),
            400,
            "invalid_request",
        ),
        (
            as_user(client().post(kg.url("/api/v1/keys")), "u_alice")
                .json(&json!({"name": "a", "ip_allow": ["10.0.0.300/8"]})),
            400,
            "invalid_request",
        ),
        (
            as_user(client().post(kg.url("/api/v1/keys")), "u_alice").json(
                &json!({"name": "a", "expires_in": "1d", "expires_at": "2030-01-01T00:00:00Z"}),
            ),
            400,
            "invalid_request",
        ),
        // Beyond the owner's permissions.
        (
            as_user(client().post(kg.url("/api/v1/keys")), "u_dana")
                .json(&json!({"name": "a", "permissions": ["vms:write"]})),
            403,
            "insufficient_permissions",
        ),
        // An owner-less TOML key cannot manage keys.
        (
            client()
                .get(kg.url("/api/v1/keys"))
                .header("x-api-key", "vmc_test_ci"),
            403,
            "insufficient_permissions",
        ),
        // A disabled user's token.
        (
            as_user(client().get(kg.url("/api/v1/keys")), "u_carol"),
            401,
            "",
        ),
        // Methods the path does not answer.
        (
            as_user(client().put(kg.url("/api/v1/keys")), "u_alice"),
            405,
            "method_not_allowed",
        ),
        (
            as_user(client().get(kg.url("/api/v1/keys/key_x/roll")), "u_alice"),
            405,
            "method_not_allowed",
        ),
        (
            as_user(client().get(kg.url("/api/v1/keys/nope")), "u_alice"),
            404,
            "key_not_found",
        ),
    ];
    for (i, (req, status, want)) in cases.into_iter().enumerate() {
        let (got, body) = answer(req.send().unwrap());
        assert_eq!(got, status, "case {i}: {body}");
        if !want.is_empty() {
            assert_eq!(code(&body), want, "case {i}: {body}");
        }
    }
    // Rolling with more grace than max_grace.
    let (_, made) = create(&kg, "u_alice", json!({"name": "g"}));
    let id = made["id"].as_str().unwrap();
    let (status, body) = answer(
        as_user(
            client().post(kg.url(&format!("/api/v1/keys/{id}/roll"))),
            "u_alice",
        )
        .json(&json!({"grace": "30d"}))
        .send()
        .unwrap(),
    );
    assert_eq!((status, code(&body)), (400, "invalid_request"));
}

#[test]
fn a_key_with_keys_manage_acts_for_its_owner_and_a_default_key_cannot() {
    let (_upstream, kg) = start();
    // Without asking, a new key gets the owner's permissions but not keys:manage.
    let (status, plain) = create(&kg, "u_alice", json!({"name": "plain"}));
    assert_eq!(status, 201);
    assert_eq!(plain["permissions"], json!(["vms:read", "vms:write"]));
    let plain = plain["key"].as_str().unwrap();
    let resp = client()
        .get(kg.url("/api/v1/keys"))
        .bearer_auth(plain)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 403);
    let (_, admin) = create(
        &kg,
        "u_alice",
        json!({"name": "manager", "permissions": ["keys:manage", "vms:read"]}),
    );
    let manager = admin["key"].as_str().unwrap();
    // The manager key makes keys for alice, never beyond its own permissions.
    let (status, made) = answer(
        client()
            .post(kg.url("/api/v1/keys"))
            .bearer_auth(manager)
            .json(&json!({"name": "child", "permissions": ["vms:read"]}))
            .send()
            .unwrap(),
    );
    assert_eq!(status, 201, "{made}");
    let (status, body) = answer(
        client()
            .post(kg.url("/api/v1/keys"))
            .bearer_auth(manager)
            .json(&json!({"name": "child2", "permissions": ["vms:write"]}))
            .send()
            .unwrap(),
    );
    assert_eq!((status, code(&body)), (403, "insufficient_permissions"));
    // The cap (three live keys) is reached: 409.
    let (status, body) = create(&kg, "u_alice", json!({"name": "fourth"}));
    assert_eq!((status, code(&body)), (409, "too_many_keys"));
}

#[test]
fn a_checksum_typo_is_refused_without_a_store_lookup() {
    let (_upstream, kg) = start();
    let (_, made) = create(&kg, "u_alice", json!({"name": "t"}));
    let key = made["key"].as_str().unwrap().to_string();
    let lookups = |kg: &Keygate| -> f64 {
        ["found", "unknown", "error", "refused"]
            .iter()
            .map(|o| {
                kg.metric(&format!(
                    "keygate_self_service_key_store_lookups_total{{outcome=\"{o}\"}}"
                ))
            })
            .sum()
    };
    let before = lookups(&kg);
    let mut typo = key.clone().into_bytes();
    typo[12] = if typo[12] == b'a' { b'b' } else { b'a' };
    let typo = String::from_utf8(typo).unwrap();
    for _ in 0..20 {
        assert_eq!(use_key(&kg, &typo), 401);
    }
    assert_eq!(use_key(&kg, "kg_short"), 401);
    assert_eq!(
        lookups(&kg),
        before,
        "no lookup for a key whose checksum fails"
    );
    // Random well-formed keys: looked up, then refused from this address
    // without a store read once it has presented too many.
    let mut refused_before =
        kg.metric("keygate_self_service_key_store_lookups_total{outcome=\"refused\"}");
    let mut throttled = 0;
    for _ in 0..150 {
        let (random, _, _) = keygate::keys::manage::new_key("kg_");
        match use_key(&kg, &random) {
            401 => {}
            429 => throttled += 1,
            other => panic!("a random key got {other}"),
        }
    }
    assert!(throttled >= 50, "{throttled}");
    let unknown = kg.metric("keygate_self_service_key_store_lookups_total{outcome=\"unknown\"}");
    assert!(
        unknown <= 100.0,
        "at most a minute's allowance reached the store: {unknown}"
    );
    refused_before = kg.metric("keygate_self_service_key_store_lookups_total{outcome=\"refused\"}")
        - refused_before;
    assert!(refused_before >= 50.0, "{refused_before}");
    // A key not cached yet from this address: not checked, so 429 with
    // Retry-After rather than a 401 that would make a client drop it; from
    // another address it works.
    let resp = client()
        .get(kg.url("/v1/vms"))
        .bearer_auth(&key)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    let other = client_at("127.0.0.3")
        .get(kg.url("/v1/vms"))
        .bearer_auth(&key)
        .send()
        .unwrap();
    assert_eq!(other.status(), 200);
    assert_eq!(use_key(&kg, &key), 200, "and once cached, from here too");
}

#[test]
fn roll_keeps_the_old_key_for_its_grace_then_ends_it() {
    let (_upstream, kg) = start();
    let (_, made) = create(
        &kg,
        "u_alice",
        json!({"name": "deploy", "permissions": ["vms:read"], "ip_allow": ["127.0.0.0/8"]}),
    );
    let old = made["key"].as_str().unwrap().to_string();
    let id = made["id"].as_str().unwrap();
    assert_eq!(use_key(&kg, &old), 200);
    let resp = as_user(
        client().post(kg.url(&format!("/api/v1/keys/{id}/roll"))),
        "u_alice",
    )
    .json(&json!({"grace": "2s"}))
    .send()
    .unwrap();
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let (status, rolled) = answer(resp);
    assert_eq!(status, 201, "{rolled}");
    let new = rolled["key"].as_str().unwrap().to_string();
    assert_ne!(rolled["id"], made["id"]);
    assert_eq!(rolled["name"], "deploy");
    assert_eq!(rolled["permissions"], json!(["vms:read"]));
    assert_eq!(rolled["ip_allow"], json!(["127.0.0.0/8"]));
    assert_eq!((use_key(&kg, &old), use_key(&kg, &new)), (200, 200));
    let rolled_at = Instant::now();
    while rolled_at.elapsed() < Duration::from_millis(1500) {
        assert_eq!(
            use_key(&kg, &old),
            200,
            "the old key works during its grace"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1600));
    assert_eq!(use_key(&kg, &old), 401, "the old key ends with its grace");
    assert_eq!(use_key(&kg, &new), 200);
}

#[test]
fn parallel_creates_never_pass_the_cap() {
    let (_upstream, kg) = start();
    let results: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..12)
            .map(|i| {
                let kg = &kg;
                s.spawn(move || create(kg, "u_dana", json!({"name": format!("k{i}")})).0)
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        results.iter().filter(|s| **s == 201).count(),
        3,
        "{results:?}"
    );
    assert_eq!(
        results.iter().filter(|s| **s == 409).count(),
        9,
        "{results:?}"
    );
}

#[test]
fn the_account_allowlist_guards_against_lock_out_and_applies_to_every_credential() {
    let (_upstream, kg) = start();
    let path = "/api/v1/account/ip-allow";
    let (status, body) = answer(
        as_user(client().get(kg.url(path)), "u_alice")
            .send()
            .unwrap(),
    );
    assert_eq!((status, body), (200, json!({"ip_allow": []})));
    let (status, body) = answer(
        as_user(client().put(kg.url(path)), "u_alice")
            .json(&json!({"ip_allow": ["203.0.113.0/24"]}))
            .send()
            .unwrap(),
    );
    assert_eq!((status, code(&body)), (409, "would_lock_out"));
    let (status, body) = answer(
        as_user(client().put(kg.url(path)), "u_alice")
            .json(&json!({"ip_allow": ["127.0.0.1", "bad"]}))
            .send()
            .unwrap(),
    );
    assert_eq!((status, code(&body)), (400, "invalid_request"));
    let (_, made) = create(&kg, "u_alice", json!({"name": "k"}));
    let key = made["key"].as_str().unwrap().to_string();
    let (status, body) = answer(
        as_user(client().put(kg.url(path)), "u_alice")
            .json(&json!({"ip_allow": ["127.0.0.1", "10.9.0.0/16"]}))
            .send()
            .unwrap(),
    );
    assert_eq!(
        (status, body),
        (200, json!({"ip_allow": ["127.0.0.1/32", "10.9.0.0/16"]}))
    );
    // From 127.0.0.1: token and key pass.
    assert_eq!(
        as_user(client().get(kg.url("/v1/vms")), "u_alice")
            .send()
            .unwrap()
            .status(),
        200
    );
    assert_eq!(use_key(&kg, &key), 200);
    // Through the trusted proxy 127.0.0.2 for a client outside the list: both refused.
    let via_proxy = client_at("127.0.0.2");
    for req in [
        via_proxy
            .get(kg.url("/v1/vms"))
            .bearer_auth(token("u_alice")),
        via_proxy.get(kg.url("/v1/vms")).bearer_auth(&key),
        via_proxy
            .get(kg.url("/api/v1/keys"))
            .bearer_auth(token("u_alice")),
    ] {
        let (status, body) = answer(req.header("x-forwarded-for", "203.0.113.5").send().unwrap());
        assert_eq!((status, code(&body)), (403, "ip_not_allowed"));
    }
    // Other users are not affected.
    let ok = via_proxy
        .get(kg.url("/v1/vms"))
        .bearer_auth(token("u_dana"))
        .header("x-forwarded-for", "203.0.113.5")
        .send()
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[test]
fn keys_and_revocations_survive_kill_9() {
    let (_upstream, mut kg) = start();
    let (_, a) = create(&kg, "u_alice", json!({"name": "a"}));
    let (_, b) = create(&kg, "u_alice", json!({"name": "b"}));
    let (a_key, b_key) = (
        a["key"].as_str().unwrap().to_string(),
        b["key"].as_str().unwrap().to_string(),
    );
    let resp = as_user(
        client().delete(kg.url(&format!("/api/v1/keys/{}", b["id"].as_str().unwrap()))),
        "u_alice",
    )
    .send()
    .unwrap();
    assert_eq!(resp.status(), 204);
    kg.kill9_and_restart();
    assert_eq!(use_key(&kg, &a_key), 200);
    assert_eq!(use_key(&kg, &b_key), 401);
}

#[test]
fn a_fleet_sees_a_revoke_within_a_second() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    let cfg = self_service_config(&format!(
        "[state]\nbackend = \"redis\"\nurl = \"{}\"\nkey_prefix = \"kg-ss\"\nrecord_key = \"self-service-test-record-key-32-bytes-long\"\n",
        redis.url()
    ));
    let fleet = [
        Keygate::start(&cfg, upstream.port),
        Keygate::start(&cfg, upstream.port),
        Keygate::start(&cfg, upstream.port),
    ];
    let (status, made) = create(&fleet[0], "u_alice", json!({"name": "fleet"}));
    assert_eq!(status, 201, "{made}");
    let key = made["key"].as_str().unwrap().to_string();
    let id = made["id"].as_str().unwrap().to_string();
    // Every sidecar finds it (and caches it).
    for kg in &fleet {
        assert_eq!(use_key(kg, &key), 200);
    }
    // Revoked on the second: the first and third refuse it within 1 s.
    let resp = as_user(
        client().delete(fleet[1].url(&format!("/api/v1/keys/{id}"))),
        "u_alice",
    )
    .send()
    .unwrap();
    assert_eq!(resp.status(), 204);
    let revoked = Instant::now();
    for kg in [&fleet[0], &fleet[2]] {
        while use_key(kg, &key) != 401 {
            assert!(
                revoked.elapsed() < Duration::from_secs(1),
                "a sidecar still took the revoked key after 1 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // The cap holds across the fleet.
    let statuses: Vec<u16> = (0..5)
        .map(|i| create(&fleet[i % 3], "u_dana", json!({"name": format!("d{i}")})).0)
        .collect();
    assert_eq!(statuses, vec![201, 201, 201, 409, 409]);
    // Redis down: a cached key keeps working, an unknown one is 503, not 401.
    let (_, made) = create(&fleet[0], "u_alice", json!({"name": "cached"}));
    let cached = made["key"].as_str().unwrap().to_string();
    assert_eq!(use_key(&fleet[2], &cached), 200);
    drop(redis);
    assert_eq!(
        use_key(&fleet[2], &cached),
        200,
        "a cached key outlives a Redis outage"
    );
    let (unknown, _, _) = keygate::keys::manage::new_key("kg_");
    let resp = client()
        .get(fleet[2].url("/v1/vms"))
        .bearer_auth(&unknown)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let (_, body) = answer(resp);
    assert_eq!(code(&body), "state_unavailable");
}

#[test]
fn the_operator_manages_any_users_keys_on_the_admin_listener_and_with_the_cli() {
    let upstream = Upstream::start();
    let cfg = self_service_config("").replacen(
        "grace_period = \"1s\"",
        "grace_period = \"1s\"\nadmin_token_env = \"KG_TEST_ADMIN\"",
        1,
    );
    let admin_token = "operator-token-for-the-key-api";
    let kg = Keygate::start_with_env(&cfg, upstream.port, &[("KG_TEST_ADMIN", admin_token)]);
    // Without the token: 401.
    let resp = client()
        .get(kg.admin("/keys?user=alice%40example.com"))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 401);
    let admin = |req: RequestBuilder| answer(req.bearer_auth(admin_token).send().unwrap());
    // Create for a user by email; no lock-out guard, no throttle.
    let (status, made) = admin(
        client()
            .post(kg.admin("/keys"))
            .json(&json!({"user": "dana@example.com", "name": "ops", "ip_allow": ["127.0.0.1"]})),
    );
    assert_eq!(status, 201, "{made}");
    let key = made["key"].as_str().unwrap().to_string();
    let id = made["id"].as_str().unwrap().to_string();
    assert_eq!(use_key(&kg, &key), 200);
    assert_eq!(upstream.last().header("x-auth-subject"), Some("u_dana"));
    let (status, list) = admin(client().get(kg.admin("/keys?user=dana%40example.com")));
    assert_eq!(
        (status, list["keys"].as_array().map(Vec::len)),
        (200, Some(1))
    );
    let (status, one) = admin(client().get(kg.admin(&format!("/keys/{id}"))));
    assert_eq!((status, one["name"].as_str()), (200, Some("ops")));
    let (status, body) = admin(
        client()
            .put(kg.admin("/accounts/u_dana/ip-allow"))
            .json(&json!({"ip_allow": ["203.0.113.0/24"]})),
    );
    assert_eq!(
        (status, body),
        (200, json!({"ip_allow": ["203.0.113.0/24"]})),
        "the operator has no lock-out guard"
    );
    assert_eq!(
        use_key(&kg, &key),
        403,
        "dana's account allowlist applies to her key"
    );
    let (status, _) = admin(
        client()
            .put(kg.admin("/accounts/u_dana/ip-allow"))
            .json(&json!({"ip_allow": []})),
    );
    assert_eq!(status, 200);
    assert_eq!(use_key(&kg, &key), 200);
    let (status, body) = admin(
        client()
            .post(kg.admin("/keys"))
            .json(&json!({"user": "nobody@example.com", "name": "x"})),
    );
    assert_eq!((status, code(&body)), (400, "invalid_request"));

    // The CLI calls the same API on the running instance.
    let config = kg.config_path().display().to_string();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args(args)
            .env("KEYGATE_TEST_HS", keygate::policy::testing::HS_SECRET)
            .env("KG_TEST_ADMIN", admin_token)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = cli(&[
        "keys",
        "create",
        "-c",
        &config,
        "--user",
        "alice@example.com",
        "--name",
        "from-cli",
        "--permissions",
        "vms:read",
    ]);
    assert!(ok, "{err}");
    let made: Value = serde_json::from_str(&out).unwrap();
    let cli_key = made["key"].as_str().unwrap().to_string();
    let cli_id = made["id"].as_str().unwrap().to_string();
    assert_eq!(use_key(&kg, &cli_key), 200);
    let (ok, out, _) = cli(&["keys", "list", "-c", &config, "--user", "alice@example.com"]);
    assert!(ok && out.contains(&cli_id) && !out.contains(&cli_key));
    let (ok, _, err) = cli(&[
        "keys",
        "revoke",
        "-c",
        &config,
        &cli_id,
        "--user",
        "dana@example.com",
    ]);
    assert!(!ok && err.contains("no live key"), "{err}");
    let (ok, out, err) = cli(&["keys", "roll", "-c", &config, &cli_id, "--grace", "0s"]);
    assert!(ok, "{err}");
    let rolled: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        use_key(&kg, &cli_key),
        401,
        "a roll with no grace ends the old key at once"
    );
    assert_eq!(use_key(&kg, rolled["key"].as_str().unwrap()), 200);
    let (ok, _, err) = cli(&[
        "keys",
        "revoke",
        "-c",
        &config,
        rolled["id"].as_str().unwrap(),
        "--user",
        "alice@example.com",
    ]);
    assert!(ok, "{err}");
    assert_eq!(use_key(&kg, rolled["key"].as_str().unwrap()), 401);
    let (ok, _, err) = cli(&["keys", "revoke", "-c", &config, "key_doesnotexist"]);
    assert!(!ok && err.contains("404 key_not_found"), "{err}");
}

#[test]
fn a_managing_key_cannot_roll_a_stronger_key_into_its_hands() {
    let (_upstream, kg) = start();
    let (_, strong) = create(
        &kg,
        "u_alice",
        json!({"name": "strong", "permissions": ["vms:read", "vms:write"]}),
    );
    let (_, manager) = create(
        &kg,
        "u_alice",
        json!({"name": "m", "permissions": ["keys:manage", "vms:read"]}),
    );
    let manager = manager["key"].as_str().unwrap();
    let roll = format!("/api/v1/keys/{}/roll", strong["id"].as_str().unwrap());
    let (status, body) = answer(
        client()
            .post(kg.url(&roll))
            .bearer_auth(manager)
            .json(&json!({}))
            .send()
            .unwrap(),
    );
    assert_eq!(
        (status, code(&body)),
        (403, "insufficient_permissions"),
        "{body}"
    );
    // The owner's own token may roll it.
    let (status, _) = answer(
        as_user(client().post(kg.url(&roll)), "u_alice")
            .json(&json!({}))
            .send()
            .unwrap(),
    );
    assert_eq!(status, 201);
}

#[test]
fn last_used_at_is_written_behind_to_the_minute() {
    let (_upstream, kg) = start();
    let (_, made) = create(&kg, "u_alice", json!({"name": "used"}));
    let key = made["key"].as_str().unwrap();
    let path = format!("/api/v1/keys/{}", made["id"].as_str().unwrap());
    let last_used = |kg: &Keygate| {
        let (_, one) = answer(
            as_user(client().get(kg.url(&path)), "u_alice")
                .send()
                .unwrap(),
        );
        one["last_used_at"].clone()
    };
    assert_eq!(last_used(&kg), Value::Null);
    assert_eq!(use_key(&kg, key), 200);
    let used = Instant::now();
    let at = loop {
        let v = last_used(&kg);
        if !v.is_null() {
            break v;
        }
        assert!(
            used.elapsed() < Duration::from_secs(15),
            "last_used_at not written in 15 s"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let at = humantime::parse_rfc3339(at.as_str().unwrap()).unwrap();
    let at = at.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert_eq!(at % 60, 0, "to the minute");
    assert!(now() - at < 120);
}
