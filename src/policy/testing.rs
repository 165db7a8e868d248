//! The one test policy (`tests/fixtures/policy.toml`) and what goes with
//! it: every kind of key, user and route the gate distinguishes, the
//! secrets, plain-text API keys, and helpers to sign and forge tokens.
//! Unit tests, the integration tests (`tests/support`) and the benches
//! share it.

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

/// Plain-text key owned by dana (a free-tier user).
pub const KEY_DANA: &str = "vmc_test_dana";

/// The one test policy, `tests/fixtures/policy.toml`, with the hashes of
/// the keys above filled in; its placeholders for addresses and paths
/// (`{listen}`, `{admin}`, `{state}`, `{upstream}`, `{keys}`) are the
/// caller's to fill.
pub fn fixture_toml() -> String {
    let h = crate::cli::sha256_hex;
    include_str!("../../tests/fixtures/policy.toml")
        .replace("{deploy}", &h(KEY_DEPLOY))
        .replace("{dana}", &h(KEY_DANA))
        .replace("{ci}", &h(KEY_CI))
        .replace("{office}", &h(KEY_OFFICE))
        .replace("{expired}", &h(KEY_EXPIRED))
        .replace("{disabled}", &h(KEY_DISABLED))
        .replace("{carol}", &h(KEY_OF_DISABLED_USER))
}

/// The test policy for unit tests: [`fixture_toml`] with fixed addresses
/// (nothing listens on them) and key files read from [`secrets`].
pub fn base_toml() -> String {
    fixture_toml()
        .replace("{listen}", "127.0.0.1:18080")
        .replace("{admin}", "127.0.0.1:19090")
        .replace("{state}", "/nonexistent/keygate-unit-state")
        .replace("{upstream}", "http://127.0.0.1:9000")
        .replace("{keys}", "keys")
}

pub fn secrets() -> Fixed {
    let mut s = Fixed::default();
    s.env.insert("KEYGATE_TEST_HS".into(), HS_SECRET.into());
    s.files.insert(
        PathBuf::from("keys/hs384.secret"),
        HS384_SECRET.as_bytes().to_vec(),
    );
    for (path, pem) in [
        ("keys/ed25519.pub.pem", ED_PUBLIC),
        ("keys/es256.pub.pem", ES_PUBLIC),
        ("keys/rs256.pub.pem", RS_PUBLIC),
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
        "iss": "keygate",
        "aud": "api",
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
