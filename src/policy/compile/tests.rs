use super::*;
use crate::clock::unix_now;
use crate::policy::testing::{base_toml, compile_str, secrets};

fn errors_of(src: &str) -> Vec<ConfigError> {
    match compile_str(src) {
        Ok(_) => panic!("expected errors"),
        Err(e) => e
            .into_iter()
            .filter(|e| e.severity == Severity::Error)
            .collect(),
    }
}

/// The (line, column) where `needle` starts in `src`.
fn position_of(src: &str, needle: &str) -> (usize, usize) {
    let offset = src
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in source"));
    let line = src[..offset].matches('\n').count() + 1;
    let column = offset - src[..offset].rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

fn assert_error_at(errors: &[ConfigError], src: &str, needle: &str, words: &str) {
    let (line, column) = position_of(src, needle);
    assert!(
        errors
            .iter()
            .any(|e| e.line == line && e.column == column && e.message.contains(words)),
        "no error containing {words:?} at {line}:{column} ({needle:?}); got:\n{}",
        errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn the_test_policy_and_the_example_compile() {
    let compiled = compile_str(&base_toml()).unwrap();
    assert_eq!(compiled.policy.users.len(), 5);
    let mut s = secrets();
    s.env.insert("KEYGATE_JWT_SECRET".into(), "x".repeat(32));
    let example = compile("config.example.toml", crate::cli::demo::EXAMPLE_CONFIG, &s).unwrap();
    assert_eq!(example.policy.routes.len(), 6);
}

#[test]
fn every_error_of_a_file_is_reported_in_one_run_with_its_position() {
    let src = r#"
[server]
trusted_proxies = ["10.0.0.0/33"]

[upstream]
url = "http://127.0.0.1:9000"

[[auth.keys]]
kid = "short"
algorithm = "HS256"
secret_env = "SHORT"

[tiers.free]
limit = 10

[[users]]
email = "a@example.com"
tier = "gold"

[[api_keys]]
id = "k1"
sha256 = "0000000000000000000000000000000000000000000000000000000000000001"
user = "nobody@example.com"

[[api_keys]]
id = "k1"
sha256 = "0000000000000000000000000000000000000000000000000000000000000001"
tier = "free"

[[routes]]
path = "/v1/{*rest}/tail"
"#;
    let mut s = secrets();
    s.env.insert("SHORT".into(), "too-short".into());
    let errors: Vec<ConfigError> = compile("bad.toml", src, &s)
        .unwrap_err()
        .into_iter()
        .filter(|e| e.severity == Severity::Error)
        .collect();
    assert_error_at(&errors, src, "\"10.0.0.0/33\"", "not an address or CIDR");
    assert_error_at(&errors, src, "\"short\"\nalgorithm", "needs at least 32");
    assert_error_at(
        &errors,
        src,
        "\"gold\"",
        "unknown tier \"gold\" (defined: free)",
    );
    assert_error_at(&errors, src, "\"nobody@example.com\"", "unknown user");
    assert_error_at(&errors, src, "\"k1\"\nsha256 = \"0000000000000000000000000000000000000000000000000000000000000001\"\ntier", "duplicate API key id");
    assert_error_at(&errors, src, "\"/v1/{*rest}/tail\"", "catch-all");
    assert!(errors.iter().any(|e| e.message.contains("same sha256")));
    assert!(errors.iter().any(|e| e.message.contains("no signing key")));
    assert!(errors.iter().all(|e| e.file == "bad.toml"));
    // Sorted by position, so they read top to bottom.
    let positions: Vec<_> = errors.iter().map(|e| (e.line, e.column)).collect();
    let mut sorted = positions.clone();
    sorted.sort();
    assert_eq!(positions, sorted);
}

#[test]
fn unknown_keys_are_errors_with_a_position() {
    let src = base_toml().replace("threads = 2", "threads = 2\nlisten_port = 80");
    let errors = errors_of(&src);
    assert_eq!(errors.len(), 1);
    assert_error_at(&errors, &src, "listen_port", "unknown field `listen_port`");
}

#[test]
fn syntax_errors_have_a_position() {
    let src = base_toml().replace("threads = 2", "threads = = 2");
    let errors = errors_of(&src);
    assert_eq!(errors[0].line, position_of(&src, "threads = = 2").0);
}

#[test]
fn inline_secret_is_accepted_with_a_warning() {
    let src = base_toml().replace(
        "secret_env = \"KEYGATE_TEST_HS\"",
        &format!("secret = \"{}\"", crate::policy::testing::HS_SECRET),
    );
    let compiled = compile_str(&src).unwrap();
    assert!(compiled
        .warnings
        .iter()
        .any(|w| w.severity == Severity::Warning && w.message.contains("inline secret")));
}

#[test]
fn secret_from_file_drops_its_trailing_newline() {
    let src = base_toml().replace(
        "secret_env = \"KEYGATE_TEST_HS\"",
        "secret_file = \"hs.secret\"",
    );
    let mut s = secrets();
    let mut secret = crate::policy::testing::HS_SECRET.as_bytes().to_vec();
    secret.push(b'\n');
    s.files.insert("hs.secret".into(), secret);
    let policy = compile("t.toml", &src, &s).unwrap().policy;
    let token =
        crate::policy::testing::sign("hs", &crate::policy::testing::claims("u_alice", unix_now()));
    assert!(crate::gate::verify_jwt(&policy, &token, unix_now()).is_ok());
}

#[test]
fn missing_secret_variable_is_an_error_at_its_name() {
    let src = base_toml().replace(
        "secret_env = \"KEYGATE_TEST_HS\"",
        "secret_env = \"NOT_SET_ANYWHERE\"",
    );
    let errors = errors_of(&src);
    assert_error_at(&errors, &src, "\"NOT_SET_ANYWHERE\"", "is not set");
}

#[test]
fn hs384_needs_48_bytes() {
    let src = base_toml().replace(
        "secret_file = \"keys/hs384.secret\"",
        "secret_env = \"KEYGATE_TEST_HS\"",
    );
    let errors = errors_of(&src);
    assert!(errors
        .iter()
        .any(|e| e.message.contains("needs at least 48")));
}

#[test]
fn two_signing_keys_are_an_error() {
    let src = base_toml().replace(
        "algorithm = \"HS384\"",
        "algorithm = \"HS384\"\nsign = true",
    );
    assert!(errors_of(&src)
        .iter()
        .any(|e| e.message.contains("only one")));
}

#[test]
fn asymmetric_signing_key_needs_its_private_key() {
    let src = base_toml().replace("sign = true", "").replace(
        "public_key_file = \"keys/ed25519.pub.pem\"",
        "public_key_file = \"keys/ed25519.pub.pem\"\nsign = true",
    );
    assert!(errors_of(&src)
        .iter()
        .any(|e| e.message.contains("private_key_file")));
}

#[test]
fn bad_values_are_each_reported() {
    let src = base_toml()
        .replace("threads = 2", "threads = 0")
        .replace("grace_period = \"1s\"", "grace_period = \"soon\"")
        .replace(
            "url = \"http://127.0.0.1:9000\"",
            "url = \"ftp://127.0.0.1:9000/x\"",
        )
        .replace("limit = 1000", "limit = 0")
        .replace(
            "tokens_valid_after = \"2026-01-01T00:00:00Z\"",
            "tokens_valid_after = \"yesterday\"",
        )
        .replace(
            "path = \"/admin/{*rest}\"\naccess = \"deny\"",
            "path = \"/admin/{*rest}\"\naccess = \"nobody\"",
        );
    let errors = errors_of(&src);
    for words in [
        "threads must be between",
        "not a duration",
        "http:// or https://",
        "limit must be between",
        "not an RFC 3339 time",
        "unknown access \"nobody\"",
    ] {
        assert!(
            errors.iter().any(|e| e.message.contains(words)),
            "missing {words:?} in {errors:#?}"
        );
    }
}

#[test]
fn owned_key_with_a_tier_of_its_own_is_an_error() {
    let src = base_toml().replace(
        "user = \"alice@example.com\"\npermissions = [\"vms:read\"]",
        "user = \"alice@example.com\"\ntier = \"free\"\npermissions = [\"vms:read\"]",
    );
    assert_error_at(
        &errors_of(&src),
        &src,
        "\"free\"\npermissions = [\"vms:read\"]\n\n[[api_keys]]\nid = \"dana-key\"",
        "shares the user's tier",
    );
}

#[test]
fn ownerless_key_without_tier_is_an_error() {
    let src = base_toml().replace(
        "tier = \"enterprise\"\npermissions = [\"vms:read\", \"vms:write\"]",
        "permissions = [\"vms:read\", \"vms:write\"]",
    );
    assert!(errors_of(&src)
        .iter()
        .any(|e| e.message.contains("needs a tier")));
}

#[test]
fn permissions_on_a_public_route_are_an_error() {
    let src = base_toml().replace(
        "path = \"/v1/status\"\naccess = \"public\"",
        "path = \"/v1/status\"\naccess = \"public\"\npermissions = [\"x\"]",
    );
    assert!(errors_of(&src)
        .iter()
        .any(|e| e.message.contains("only apply to authenticated")));
}

#[test]
fn duplicate_route_for_the_same_method_is_an_error() {
    let src = format!(
        "{}\n[[routes]]\npath = \"/v1/vms\"\nmethods = [\"get\"]\n",
        base_toml()
    );
    let errors = errors_of(&src);
    assert!(
        errors.iter().any(|e| e.message.contains("conflicts")),
        "{errors:#?}"
    );
}

#[test]
fn duplicate_users_are_errors() {
    let src = format!(
        "{}\n[[users]]\nemail = \"ALICE@example.com\"\nid = \"u_bob\"\ntier = \"free\"\n",
        base_toml()
    );
    let errors = errors_of(&src);
    assert!(errors
        .iter()
        .any(|e| e.message.contains("duplicate user email")));
    assert!(errors
        .iter()
        .any(|e| e.message.contains("duplicate user id")));
}

#[test]
fn password_hash_must_be_argon2id() {
    let src = base_toml().replace(
        "id = \"u_bob\"",
        "id = \"u_bob\"\npassword_hash = \"$2b$12$abcdefghijklmnopqrstuv\"",
    );
    assert!(errors_of(&src)
        .iter()
        .any(|e| e.message.contains("password_hash")));
}

#[test]
fn emails_are_found_without_regard_to_case() {
    let policy = compile_str(&base_toml()).unwrap().policy;
    assert_eq!(
        policy
            .user_by_email("Alice@Example.COM")
            .unwrap()
            .1
            .id
            .as_ref(),
        "u_alice"
    );
}
