//! A policy for unit tests: every kind of key, user and route the gate
//! distinguishes, with secrets and PEM files from `tests/fixtures/keys`.

use std::path::PathBuf;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use super::{compile, Compiled, Policy};
use crate::config::Fixed;

pub const HS_SECRET: &str = "unit-test-secret-that-is-32-bytes-or-more";
pub const HS384_SECRET: &str = "unit-test-secret-for-hs384-must-be-at-least-48-bytes-long!!";

pub const ED_PRIVATE: &str = include_str!("../../tests/fixtures/keys/ed25519.pem");
pub const ED_PUBLIC: &str = include_str!("../../tests/fixtures/keys/ed25519.pub.pem");
pub const ES_PRIVATE: &str = include_str!("../../tests/fixtures/keys/es256.pem");
pub const ES_PUBLIC: &str = include_str!("../../tests/fixtures/keys/es256.pub.pem");
pub const RS_PRIVATE: &str = include_str!("../../tests/fixtures/keys/rs256.pem");
pub const RS_PUBLIC: &str = include_str!("../../tests/fixtures/keys/rs256.pub.pem");
pub const ATTACKER_ED_PRIVATE: &str =
    include_str!("../../tests/fixtures/keys/attacker_ed25519.pem");

/// Plain-text API keys whose hashes `base_toml()` lists.
pub const KEY_DEPLOY: &str = "vmc_test_deploy";
pub const KEY_CI: &str = "vmc_test_ci";
pub const KEY_EXPIRED: &str = "vmc_test_expired";
pub const KEY_DISABLED: &str = "vmc_test_disabled";
pub const KEY_OFFICE: &str = "vmc_test_office";
pub const KEY_OF_DISABLED_USER: &str = "vmc_test_of_carol";

/// 2026-01-01T00:00:00Z, dave's `tokens_valid_after`.
pub const DAVE_CUTOFF: u64 = 1_767_225_600;

pub fn base_toml() -> String {
    let h = crate::cli::sha256_hex;
    format!(
        r#"
[server]
listen = "127.0.0.1:18080"
admin_listen = "127.0.0.1:19090"
threads = 1
trusted_proxies = ["10.0.0.0/8"]

[upstream]
url = "http://127.0.0.1:9000"

[auth]
issuer = "keygate-test"
audience = "vm-api"
leeway = "60s"

[[auth.keys]]
kid = "hs"
algorithm = "HS256"
secret_env = "TEST_HS"
sign = true

[[auth.keys]]
kid = "hs384"
algorithm = "HS384"
secret_env = "TEST_HS384"

[[auth.keys]]
kid = "ed"
algorithm = "EdDSA"
public_key_file = "keys/ed.pub.pem"

[[auth.keys]]
kid = "es"
algorithm = "ES256"
public_key_file = "keys/es.pub.pem"

[[auth.keys]]
kid = "rs"
algorithm = "RS256"
public_key_file = "keys/rs.pub.pem"

[tiers.free]
limit = 100
[tiers.pro]
limit = 1000
[tiers.enterprise]
unlimited = true

[[users]]
email = "alice@example.com"
id = "u_alice"
tier = "pro"
permissions = ["vms:read", "vms:write"]

[[users]]
email = "bob@example.com"
id = "u_bob"
tier = "free"
permissions = ["vms:read"]
ip_allow = ["198.51.100.0/24"]

[[users]]
email = "carol@example.com"
id = "u_carol"
tier = "free"
permissions = ["vms:read"]
disabled = true

[[users]]
email = "dave@example.com"
id = "u_dave"
tier = "free"
permissions = ["vms:read"]
tokens_valid_after = "2026-01-01T00:00:00Z"

[[api_keys]]
id = "deploy-bot"
sha256 = "{deploy}"
user = "alice@example.com"
permissions = ["vms:read"]

[[api_keys]]
id = "ci"
sha256 = "{ci}"
tier = "enterprise"
permissions = ["vms:read", "vms:write"]

[[api_keys]]
id = "old"
sha256 = "{expired}"
tier = "free"
expires_at = "2020-01-01T00:00:00Z"

[[api_keys]]
id = "off"
sha256 = "{disabled}"
tier = "free"
disabled = true

[[api_keys]]
id = "office"
sha256 = "{office}"
user = "u_alice"
ip_allow = ["203.0.113.7"]

[[api_keys]]
id = "carols"
sha256 = "{carol}"
user = "u_carol"

[[routes]]
path = "/v1/status"
access = "public"

[[routes]]
path = "/v1/vms"
methods = ["GET"]
permissions = ["vms:read"]

[[routes]]
path = "/v1/vms/{{id}}"
methods = ["DELETE"]
permissions = ["vms:write"]

[[routes]]
path = "/admin/{{*rest}}"
access = "deny"
"#,
        deploy = h(KEY_DEPLOY),
        ci = h(KEY_CI),
        expired = h(KEY_EXPIRED),
        disabled = h(KEY_DISABLED),
        office = h(KEY_OFFICE),
        carol = h(KEY_OF_DISABLED_USER),
    )
}

pub fn secrets() -> Fixed {
    let mut s = Fixed::default();
    s.env.insert("TEST_HS".into(), HS_SECRET.into());
    s.env.insert("TEST_HS384".into(), HS384_SECRET.into());
    for (path, pem) in [
        ("keys/ed.pub.pem", ED_PUBLIC),
        ("keys/es.pub.pem", ES_PUBLIC),
        ("keys/rs.pub.pem", RS_PUBLIC),
    ] {
        s.files.insert(PathBuf::from(path), pem.as_bytes().to_vec());
    }
    s
}

pub fn compile_str(src: &str) -> Result<Compiled, Vec<crate::config::ConfigError>> {
    compile("test.toml", src, &secrets())
}

pub fn policy() -> Policy {
    policy_from("")
}

/// A `[[webhooks]]` entry to append with [`policy_from`].
pub const BILLING_WEBHOOK: &str = r#"
[[webhooks]]
path = "/hooks/billing"
secret = "0123456789abcdef0123456789abcdef"
"#;

/// The test policy with `extra` TOML appended.
pub fn policy_from(extra: &str) -> Policy {
    match compile_str(&(base_toml() + extra)) {
        Ok(c) => c.policy,
        Err(errors) => panic!("test policy does not compile: {errors:#?}"),
    }
}

/// Claims valid at `now` for `sub`.
pub fn claims(sub: &str, now: u64) -> Value {
    json!({
        "sub": sub,
        "iss": "keygate-test",
        "aud": "vm-api",
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
    })
}

/// Sign `claims` with the private key matching `kid`'s algorithm.
pub fn sign(kid: &str, claims: &Value) -> String {
    let (alg, key) = match kid {
        "hs" => (
            Algorithm::HS256,
            EncodingKey::from_secret(HS_SECRET.as_bytes()),
        ),
        "hs384" => (
            Algorithm::HS384,
            EncodingKey::from_secret(HS384_SECRET.as_bytes()),
        ),
        "ed" => (
            Algorithm::EdDSA,
            EncodingKey::from_ed_pem(ED_PRIVATE.as_bytes()),
        ),
        "es" => (
            Algorithm::ES256,
            EncodingKey::from_ec_pem(ES_PRIVATE.as_bytes()),
        ),
        "rs" => (
            Algorithm::RS256,
            EncodingKey::from_rsa_pem(RS_PRIVATE.as_bytes()),
        ),
        other => panic!("no test key {other}"),
    };
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(&header, claims, &key.expect("test key")).expect("sign")
}

/// A token with an arbitrary header, signed with HMAC-SHA256 over `secret`
/// (or with no signature at all when `secret` is `None`).
pub fn forge(header: &Value, claims: &Value, secret: Option<&[u8]>) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use hmac::{Hmac, Mac};
    let h = URL_SAFE_NO_PAD.encode(header.to_string());
    let c = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing_input = format!("{h}.{c}");
    let sig = match secret {
        Some(secret) => {
            let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).expect("hmac key");
            mac.update(signing_input.as_bytes());
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        }
        None => String::new(),
    };
    format!("{signing_input}.{sig}")
}
