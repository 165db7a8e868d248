//! `gate::verify_jwt` (`gate::jwt::verify`) never panics on any string, with
//! a policy holding one HS256 key: malformed tokens, unknown keys, `none`,
//! huge or odd claims are all a `Denial`, never a crash.
#![no_main]

use std::collections::HashMap;
use std::sync::OnceLock;

use keygate::config::Fixed;
use keygate::policy::Policy;
use libfuzzer_sys::fuzz_target;

/// 2027-01-15: after every seed's `iat`/`nbf`, before the valid seed's `exp`.
const NOW: u64 = 1_800_000_000;

const TOML: &str = r#"
[server]
listen = "127.0.0.1:18080"
admin_listen = "127.0.0.1:19090"
threads = 1

[upstream]
url = "http://127.0.0.1:9"

[auth]
issuer = "keygate-fuzz"
audience = "fuzz-api"
leeway = "60s"

[[auth.keys]]
kid = "hs"
algorithm = "HS256"
secret_env = "KEYGATE_TEST_HS"
sign = true

[tiers.free]
limit = 100

[[users]]
email = "a@example.com"
id = "u_a"
tier = "free"
permissions = ["read"]
"#;

fn policy() -> &'static Policy {
    static POLICY: OnceLock<Policy> = OnceLock::new();
    POLICY.get_or_init(|| {
        let secrets = Fixed {
            env: HashMap::from([(
                "KEYGATE_TEST_HS".into(),
                "fuzz-secret-of-at-least-32-bytes-long!!".into(),
            )]),
            files: Default::default(),
        };
        match keygate::policy::compile("fuzz.toml", TOML, &secrets) {
            Ok(compiled) => compiled.policy,
            Err(errors) => panic!("the fuzz policy does not compile: {errors:#?}"),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let _ = keygate::gate::verify_jwt(policy(), token, NOW);
});
