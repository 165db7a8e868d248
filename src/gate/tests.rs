//! The gate against the unit-test policy: each step, and every hostile token
//! we know of. Tokens are made at the test's own `NOW`, so nothing sleeps.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde_json::json;

use super::*;
use crate::policy::testing::{self, claims, forge, sign};

/// 2026-06-01T00:00:00Z: after dave's cutoff.
const NOW: u64 = 1_780_272_000;

struct Req {
    peer: IpAddr,
    method: Method,
    path: &'static str,
    headers: HeaderMap,
}

fn req(method: Method, path: &'static str) -> Req {
    Req {
        peer: "192.0.2.10".parse().unwrap(),
        method,
        path,
        headers: HeaderMap::new(),
    }
}

impl Req {
    fn header(mut self, name: &str, value: &str) -> Req {
        self.headers.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
        self
    }

    fn bearer(self, token: &str) -> Req {
        self.header("authorization", &format!("Bearer {token}"))
    }

    fn from(mut self, peer: &str) -> Req {
        self.peer = peer.parse().unwrap();
        self
    }

    fn decide_with(&self, policy: &Policy) -> Decision {
        decide(
            policy,
            &Limiter::new(),
            &RequestFacts {
                peer: self.peer,
                client_ip: None,
                method: &self.method,
                path: self.path,
                headers: &self.headers,
                client_cert: None,
                stored: None,
            },
            NOW * 1_000_000,
        )
    }

    fn decide(&self) -> Decision {
        self.decide_with(&testing::policy())
    }

    fn code(&self) -> &'static str {
        match self.decide().verdict {
            Ok(()) => "allow",
            Err(d) => d.code(),
        }
    }
}

fn get_vms() -> Req {
    req(Method::GET, "/v1/vms")
}

fn token(kid: &str, sub: &str) -> String {
    sign(kid, &claims(sub, NOW))
}

// ----- routes and access --------------------------------------------------

#[test]
fn public_route_passes_without_credentials() {
    let d = req(Method::GET, "/v1/status").decide();
    assert!(d.allowed());
    assert_eq!(d.access, Access::Public);
    assert_eq!(d.principal, None);
}

#[test]
fn deny_route_is_forbidden_even_with_valid_credentials() {
    let r = req(Method::GET, "/admin/users").bearer(&token("hs", "u_alice"));
    assert_eq!(r.code(), "forbidden");
}

#[test]
fn unmatched_path_takes_default_access() {
    assert_eq!(req(Method::GET, "/v2/other").code(), "missing_credentials");
    let r = req(Method::GET, "/v2/other")
        .bearer(&token("hs", "u_bob"))
        .from("198.51.100.9");
    assert_eq!(r.code(), "allow");

    let public = testing::base_toml().replace(
        "leeway = \"60s\"",
        "leeway = \"60s\"\ndefault_access = \"public\"",
    );
    let policy = testing::compile_str(&public).unwrap().policy;
    assert!(req(Method::GET, "/v2/other").decide_with(&policy).allowed());
    let deny = testing::base_toml().replace(
        "leeway = \"60s\"",
        "leeway = \"60s\"\ndefault_access = \"deny\"",
    );
    let policy = testing::compile_str(&deny).unwrap().policy;
    assert_eq!(
        req(Method::GET, "/v2/other").decide_with(&policy).verdict,
        Err(Denial::Forbidden)
    );
}

#[test]
fn method_specific_route_applies_only_to_its_method() {
    let bob = token("hs", "u_bob");
    let delete = req(Method::DELETE, "/v1/vms/1")
        .bearer(&bob)
        .from("198.51.100.9");
    assert_eq!(delete.code(), "insufficient_permissions");
    // GET on the same path matches no route: default access, authenticated only.
    let get = req(Method::GET, "/v1/vms/1")
        .bearer(&bob)
        .from("198.51.100.9");
    assert_eq!(get.code(), "allow");
}

// ----- client IP ----------------------------------------------------------

#[test]
fn global_allowlist_applies_before_anything() {
    let src = testing::base_toml().replace(
        "grace_period = \"1s\"",
        "grace_period = \"1s\"\nip_allow = [\"192.0.2.0/24\"]",
    );
    let policy = testing::compile_str(&src).unwrap().policy;
    assert!(req(Method::GET, "/v1/status")
        .decide_with(&policy)
        .allowed());
    let outside = req(Method::GET, "/v1/status").from("203.0.113.1");
    assert_eq!(
        outside.decide_with(&policy).verdict,
        Err(Denial::IpNotAllowed)
    );
}

#[test]
fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let bob = token("hs", "u_bob");
    // bob may call from 198.51.100.0/24 only.
    let via_proxy = get_vms()
        .bearer(&bob)
        .from("10.1.1.1")
        .header("x-forwarded-for", "198.51.100.4");
    assert_eq!(
        via_proxy.decide().client_ip,
        "198.51.100.4".parse::<IpAddr>().unwrap()
    );
    assert_eq!(via_proxy.code(), "allow");
    let spoofed = get_vms()
        .bearer(&bob)
        .from("192.0.2.50")
        .header("x-forwarded-for", "198.51.100.4");
    assert_eq!(spoofed.code(), "ip_not_allowed");
}

// ----- principals ---------------------------------------------------------

#[test]
fn api_key_in_either_header_authenticates() {
    let a = get_vms().header("x-api-key", testing::KEY_CI).decide();
    let b = get_vms().bearer(testing::KEY_CI).decide();
    assert!(a.allowed() && b.allowed());
    let p = a.principal.clone().unwrap();
    assert_eq!(p.method, AuthMethod::ApiKey);
    assert_eq!(p.user(), None);
    assert_eq!(a.principal, b.principal);
}

#[test]
fn owned_key_never_exceeds_its_owner() {
    let policy = testing::policy();
    let d = req(Method::DELETE, "/v1/vms/1")
        .header("x-api-key", testing::KEY_DEPLOY)
        .decide_with(&policy);
    // deploy-bot lists only vms:read.
    assert_eq!(
        d.verdict,
        Err(Denial::InsufficientPermissions("vms:write".into()))
    );
    let p = d.principal.unwrap();
    assert_eq!(policy.tier(p.tier(&policy)).name.as_ref(), "pro");
    assert_eq!(p.subject_str(&policy), "u_alice");
}

#[test]
fn owner_permission_removed_removes_it_from_the_key() {
    let src = testing::base_toml().replace(
        "permissions = [\"vms:read\", \"vms:write\"]\n\n[[users]]\nemail = \"bob",
        "permissions = [\"vms:write\"]\n\n[[users]]\nemail = \"bob",
    );
    let compiled = testing::compile_str(&src).unwrap();
    assert!(compiled
        .warnings
        .iter()
        .any(|w| w.message.contains("does not hold")));
    let d = get_vms()
        .header("x-api-key", testing::KEY_DEPLOY)
        .decide_with(&compiled.policy);
    assert_eq!(
        d.verdict,
        Err(Denial::InsufficientPermissions("vms:read".into()))
    );
}

#[test]
fn api_key_states_are_refused() {
    assert_eq!(
        get_vms().header("x-api-key", "vmc_nope").code(),
        "invalid_api_key"
    );
    assert_eq!(
        get_vms().header("x-api-key", testing::KEY_EXPIRED).code(),
        "invalid_api_key"
    );
    assert_eq!(
        get_vms().header("x-api-key", testing::KEY_DISABLED).code(),
        "invalid_api_key"
    );
    assert_eq!(
        get_vms()
            .header("x-api-key", testing::KEY_OF_DISABLED_USER)
            .code(),
        "invalid_api_key"
    );
}

#[test]
fn key_allowlist_applies() {
    let office = get_vms().header("x-api-key", testing::KEY_OFFICE);
    assert_eq!(office.code(), "ip_not_allowed");
    let office = get_vms()
        .header("x-api-key", testing::KEY_OFFICE)
        .from("203.0.113.7");
    assert_eq!(office.code(), "allow");
}

#[test]
fn jwt_principal_carries_current_permissions_not_the_tokens() {
    let mut c = claims("u_bob", NOW);
    c["permissions"] = json!(["vms:read", "vms:write"]);
    let r = req(Method::DELETE, "/v1/vms/1")
        .bearer(&sign("hs", &c))
        .from("198.51.100.1");
    assert_eq!(r.code(), "insufficient_permissions");
}

#[test]
fn missing_and_doubled_credentials() {
    assert_eq!(get_vms().code(), "missing_credentials");
    let both = get_vms()
        .bearer(&token("hs", "u_alice"))
        .header("x-api-key", testing::KEY_CI);
    assert_eq!(both.code(), "invalid_request");
}

// ----- JWT: every algorithm -----------------------------------------------

#[test]
fn every_supported_algorithm_verifies() {
    for kid in ["hs", "hs384", "ed", "es", "rs"] {
        let d = get_vms().bearer(&token(kid, "u_alice")).decide();
        assert!(d.allowed(), "{kid}: {:?}", d.verdict);
        assert_eq!(d.principal.unwrap().method, AuthMethod::Jwt);
    }
}

// ----- JWT: hostile tokens ------------------------------------------------

fn jwt_code(token: &str) -> &'static str {
    get_vms().bearer(token).code()
}

#[test]
fn alg_none_is_refused_in_any_spelling() {
    for alg in ["none", "None", "NONE", "nOnE"] {
        let t = forge(
            &json!({"alg": alg, "kid": "hs"}),
            &claims("u_alice", NOW),
            None,
        );
        assert_eq!(jwt_code(&t), "invalid_token", "{alg}");
        let t = forge(&json!({"alg": alg}), &claims("u_alice", NOW), None);
        assert_eq!(jwt_code(&t), "invalid_token", "{alg} without kid");
    }
}

#[test]
fn another_hmac_algorithm_than_the_keys_is_refused() {
    let c = claims("u_alice", NOW);
    // Correctly signed with the HS256 key's secret, but as HS512.
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512);
    header.kid = Some("hs".into());
    let key = jsonwebtoken::EncodingKey::from_secret(testing::HS_SECRET.as_bytes()).unwrap();
    let t = jsonwebtoken::encode(&header, &c, &key).unwrap();
    assert_eq!(jwt_code(&t), "invalid_token");
}

#[test]
fn public_key_used_as_hmac_secret_is_refused() {
    // The classic algorithm-confusion attack on RS256/EdDSA keys.
    for (kid, public) in [("rs", testing::RS_PUBLIC), ("ed", testing::ED_PUBLIC)] {
        let t = forge(
            &json!({"alg": "HS256", "kid": kid, "typ": "JWT"}),
            &claims("u_alice", NOW),
            Some(public.as_bytes()),
        );
        assert_eq!(jwt_code(&t), "invalid_token", "{kid}");
    }
}

#[test]
fn wrong_signature_is_refused() {
    let t = token("hs", "u_alice");
    let (head, sig) = t.rsplit_once('.').unwrap();
    let mut sig: Vec<u8> = sig.bytes().collect();
    sig[3] = if sig[3] == b'A' { b'B' } else { b'A' };
    let tampered = format!("{head}.{}", String::from_utf8(sig).unwrap());
    assert_eq!(jwt_code(&tampered), "invalid_token");
    // A different subject under the original signature.
    let other = token("hs", "u_bob");
    let (_, other_sig) = other.rsplit_once('.').unwrap();
    assert_eq!(jwt_code(&format!("{head}.{other_sig}")), "invalid_token");
}

#[test]
fn truncated_and_garbage_tokens_are_refused() {
    let t = token("ed", "u_alice");
    let (head, _) = t.rsplit_once('.').unwrap();
    for bad in [
        format!("{head}."),
        t[..t.len() - 5].to_string(),
        "a.b.c".to_string(),
        "..".to_string(),
        "eyJhbGciOiJIUzI1NiJ9.%%%.***".to_string(),
        "eyJ.eyJ.eyJ".to_string(),
    ] {
        assert_eq!(jwt_code(&bad), "invalid_token", "{bad}");
    }
}

#[test]
fn unknown_kid_is_refused() {
    let t = forge(
        &json!({"alg": "HS256", "kid": "nope"}),
        &claims("u_alice", NOW),
        Some(testing::HS_SECRET.as_bytes()),
    );
    assert_eq!(jwt_code(&t), "invalid_token");
    // Without kid and with several keys, there is no key to pick.
    let t = forge(
        &json!({"alg": "HS256"}),
        &claims("u_alice", NOW),
        Some(testing::HS_SECRET.as_bytes()),
    );
    assert_eq!(jwt_code(&t), "invalid_token");
}

#[test]
fn jku_and_x5u_headers_are_ignored() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let c = claims("u_alice", NOW);
    let attacker = EncodingKey::from_ed_pem(testing::ATTACKER_ED_PRIVATE.as_bytes()).unwrap();
    for field in ["jku", "x5u"] {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some("ed".into());
        match field {
            "jku" => header.jku = Some("https://attacker.example/jwks.json".into()),
            _ => header.x5u = Some("https://attacker.example/cert.pem".into()),
        }
        // Signed by the attacker's key: refused, whatever the header points at.
        let forged = jsonwebtoken::encode(&header, &c, &attacker).unwrap();
        assert_eq!(jwt_code(&forged), "invalid_token", "{field}");
        // Signed by our key: the header is irrelevant and the token is fine.
        let ours = EncodingKey::from_ed_pem(testing::ED_PRIVATE.as_bytes()).unwrap();
        let genuine = jsonwebtoken::encode(&header, &c, &ours).unwrap();
        assert_eq!(jwt_code(&genuine), "allow", "{field}");
    }
}

#[test]
fn oversized_token_is_refused() {
    let mut c = claims("u_alice", NOW);
    c["padding"] = json!("x".repeat(20_000));
    let t = sign("hs", &c);
    assert!(t.len() > 20_000);
    assert_eq!(jwt_code(&t), "invalid_token");
}

#[test]
fn expired_token_is_refused_after_the_leeway() {
    let mut c = claims("u_alice", NOW - 7200);
    c["exp"] = json!(NOW - 61);
    assert_eq!(jwt_code(&sign("hs", &c)), "token_expired");
    c["exp"] = json!(NOW - 30);
    assert_eq!(jwt_code(&sign("hs", &c)), "allow");
}

#[test]
fn not_yet_valid_token_is_refused() {
    let mut c = claims("u_alice", NOW);
    c["nbf"] = json!(NOW + 600);
    assert_eq!(jwt_code(&sign("hs", &c)), "invalid_token");
    c["nbf"] = json!(NOW + 30);
    assert_eq!(jwt_code(&sign("hs", &c)), "allow");
}

#[test]
fn token_without_exp_is_refused() {
    let mut c = claims("u_alice", NOW);
    c.as_object_mut().unwrap().remove("exp");
    assert_eq!(jwt_code(&sign("hs", &c)), "invalid_token");
}

#[test]
fn wrong_or_missing_issuer_and_audience_are_refused() {
    for (field, value) in [
        ("iss", json!("someone-else")),
        ("aud", json!("other-api")),
        ("aud", json!(["x", "y"])),
    ] {
        let mut c = claims("u_alice", NOW);
        c[field] = value;
        assert_eq!(jwt_code(&sign("hs", &c)), "invalid_token", "{field}");
    }
    for field in ["iss", "aud"] {
        let mut c = claims("u_alice", NOW);
        c.as_object_mut().unwrap().remove(field);
        assert_eq!(
            jwt_code(&sign("hs", &c)),
            "invalid_token",
            "missing {field}"
        );
    }
    let mut c = claims("u_alice", NOW);
    c["aud"] = json!(["other", "api"]);
    assert_eq!(jwt_code(&sign("hs", &c)), "allow");
}

#[test]
fn token_of_a_removed_or_disabled_user_is_refused() {
    assert_eq!(jwt_code(&token("hs", "u_gone")), "invalid_token");
    assert_eq!(jwt_code(&token("hs", "u_carol")), "invalid_token");
    let mut c = claims("u_alice", NOW);
    c.as_object_mut().unwrap().remove("sub");
    assert_eq!(jwt_code(&sign("hs", &c)), "invalid_token");
}

#[test]
fn tokens_issued_before_the_users_cutoff_are_refused() {
    let before = claims("u_dave", testing::DAVE_CUTOFF - 10);
    let mut before = before;
    before["exp"] = json!(NOW + 3600);
    assert_eq!(jwt_code(&sign("hs", &before)), "invalid_token");
    let mut no_iat = claims("u_dave", NOW);
    no_iat.as_object_mut().unwrap().remove("iat");
    assert_eq!(jwt_code(&sign("hs", &no_iat)), "invalid_token");
    assert_eq!(jwt_code(&token("hs", "u_dave")), "allow");
}

#[test]
fn token_claims_of_the_wrong_type_are_refused() {
    let mut c = claims("u_alice", NOW);
    c["exp"] = json!("tomorrow");
    assert_eq!(jwt_code(&sign("hs", &c)), "invalid_token");
    let mut c = claims("u_alice", NOW);
    c["sub"] = json!(42);
    assert_eq!(jwt_code(&sign("hs", &c)), "invalid_token");
}

// ----- tier limits --------------------------------------------------------

fn decide_shared(r: &Req, policy: &Policy, limiter: &Limiter) -> Decision {
    decide(
        policy,
        limiter,
        &RequestFacts {
            peer: r.peer,
            client_ip: None,
            method: &r.method,
            path: r.path,
            headers: &r.headers,
            client_cert: None,
            stored: None,
        },
        NOW * 1_000_000,
    )
}

#[test]
fn tier_limit_is_the_last_step_and_shared_by_a_user_and_its_keys() {
    let policy = testing::policy();
    let limiter = Limiter::new();
    // alice is pro (1000/h); deploy-bot is hers.
    let jwt = get_vms().bearer(&token("hs", "u_alice"));
    let key = get_vms().header("x-api-key", testing::KEY_DEPLOY);
    let mut passed = 0;
    for i in 0..1100 {
        let r = if i % 2 == 0 { &jwt } else { &key };
        let d = decide_shared(r, &policy, &limiter);
        let rate = d.rate.expect("a limited tier reports its rate");
        assert_eq!(policy.tier(rate.tier).name.as_ref(), "pro");
        if d.allowed() {
            passed += 1;
        } else {
            assert_eq!(d.verdict, Err(Denial::RateLimited));
            assert_eq!(d.verdict.as_ref().unwrap_err().status(), 429);
        }
    }
    assert_eq!(passed, 1000);
}

#[test]
fn refused_requests_do_not_spend_quota() {
    let policy = testing::policy();
    let limiter = Limiter::new();
    let wrong = req(Method::DELETE, "/v1/vms/1").header("x-api-key", testing::KEY_DEPLOY);
    for _ in 0..2000 {
        let d = decide_shared(&wrong, &policy, &limiter);
        assert_eq!(
            d.verdict,
            Err(Denial::InsufficientPermissions("vms:write".into()))
        );
        assert_eq!(d.rate, None);
    }
    assert!(limiter.is_empty());
}

#[test]
fn unlimited_tier_never_touches_the_limiter() {
    let policy = testing::policy();
    let limiter = Limiter::new();
    for _ in 0..50 {
        let d = decide_shared(
            &get_vms().header("x-api-key", testing::KEY_CI),
            &policy,
            &limiter,
        );
        assert!(d.allowed());
        assert_eq!(d.rate, None);
    }
    assert!(limiter.is_empty());
}

#[test]
fn public_rate_tier_limits_each_address_separately() {
    let src = testing::base_toml().replace(
        "path = \"/v1/status\"\naccess = \"public\"",
        "path = \"/v1/status\"\naccess = \"public\"\nrate_tier = \"free\"",
    );
    let policy = testing::compile_str(&src).unwrap().policy;
    let limiter = Limiter::new();
    let passes = |ip: &str| {
        (0..150)
            .filter(|_| {
                decide_shared(&req(Method::GET, "/v1/status").from(ip), &policy, &limiter).allowed()
            })
            .count()
    };
    assert_eq!(passes("192.0.2.1"), 100);
    assert_eq!(passes("192.0.2.2"), 100);
}

#[test]
fn rate_tier_on_an_authenticated_route_is_a_config_error() {
    let src = testing::base_toml().replace(
        "methods = [\"GET\"]\npermissions = [\"vms:read\"]",
        "methods = [\"GET\"]\npermissions = [\"vms:read\"]\nrate_tier = \"free\"",
    );
    let errors = testing::compile_str(&src).unwrap_err();
    assert!(errors
        .iter()
        .any(|e| e.message.contains("rate_tier is for public routes")));
}

// ----- verified-token cache ----------------------------------------------

#[test]
fn a_cached_token_still_expires() {
    let policy = testing::policy();
    let t = token("hs", "u_alice");
    assert_eq!(verify_jwt(&policy, &t, NOW).map(|_| ()), Ok(()));
    assert_eq!(policy.verified_tokens.len(), 1);
    assert_eq!(
        verify_jwt(&policy, &t, NOW + 3600 + 61),
        Err(Denial::TokenExpired)
    );
}

#[test]
fn only_the_identical_token_hits_the_cache() {
    let policy = testing::policy();
    let t = token("hs", "u_alice");
    assert!(verify_jwt(&policy, &t, NOW).is_ok());
    let (head, sig) = t.rsplit_once('.').unwrap();
    let mut sig = sig.to_string();
    let last = sig.pop().unwrap();
    sig.push(if last == 'A' { 'B' } else { 'A' });
    assert_eq!(
        verify_jwt(&policy, &format!("{head}.{sig}"), NOW),
        Err(Denial::InvalidToken("signature does not match"))
    );
    assert_eq!(
        policy.verified_tokens.len(),
        1,
        "refused tokens are never cached"
    );
}

#[test]
fn a_reload_starts_with_an_empty_cache() {
    let t = token("hs", "u_alice");
    let before = testing::policy();
    assert!(verify_jwt(&before, &t, NOW).is_ok());
    let src =
        testing::base_toml().replace("id = \"u_alice\"\n", "id = \"u_alice\"\ndisabled = true\n");
    let after = testing::compile_str(&src).unwrap().policy;
    assert!(after.verified_tokens.is_empty());
    assert_eq!(
        verify_jwt(&after, &t, NOW),
        Err(Denial::InvalidToken("the account is disabled"))
    );
}

#[test]
fn a_path_whose_letter_case_changes_its_route_is_refused() {
    assert_eq!(req(Method::GET, "/ADMIN/x").code(), "invalid_request");
    assert_eq!(req(Method::GET, "/Admin/users").code(), "invalid_request");
    // Upper case that keeps the route (an id) is fine.
    let vm = req(Method::GET, "/v1/vms/VM-ABC").bearer(&token("hs", "u_alice"));
    assert_eq!(vm.code(), "allow");
}

#[test]
fn assess_is_pure_and_leaves_the_quota_to_the_limiter() {
    let policy = testing::policy();
    let r = req(Method::GET, "/v1/vms")
        .bearer(&token("hs", "u_bob"))
        .from("198.51.100.9");
    let facts = RequestFacts {
        peer: r.peer,
        client_ip: None,
        method: &r.method,
        path: r.path,
        headers: &r.headers,
        client_cert: None,
        stored: None,
    };
    let mut d = assess(&policy, &facts, NOW * 1_000_000);
    let need = d.pending.expect("bob's free tier is limited");
    assert_eq!(
        need.account,
        policy
            .user(d.principal.as_ref().unwrap().user().unwrap())
            .account
    );
    assert!(d.verdict.is_ok() && !d.allowed(), "undecided until settled");
    let limiter = Limiter::new();
    d.settle(limiter.check(need.account, &need.quota, NOW * 1_000_000));
    assert!(d.allowed() && d.pending.is_none());
    assert_eq!(d.rate.unwrap().outcome.remaining, 99);
    // A refusal from the limiter becomes the verdict.
    let mut refused = assess(&policy, &facts, NOW * 1_000_000);
    let outcome = crate::limit::Outcome {
        allowed: false,
        limit: 100,
        remaining: 0,
        reset_secs: 3600,
        retry_after_secs: 36,
    };
    refused.settle(outcome);
    assert_eq!(refused.verdict, Err(Denial::RateLimited));
}
