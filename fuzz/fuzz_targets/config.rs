//! `policy::compile` never panics on any configuration text: every problem
//! is a `ConfigError`, with secrets from a fixed map (no environment, no
//! files).
#![no_main]

use std::collections::HashMap;
use std::net::IpAddr;

use keygate::config::Fixed;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    if resolves_a_name(src) {
        return;
    }
    let secrets = Fixed {
        env: HashMap::from([
            (
                "KEYGATE_JWT_SECRET".into(),
                "fuzz-secret-of-at-least-32-bytes-long!!".into(),
            ),
            (
                "KEYGATE_TEST_HS".into(),
                "fuzz-secret-of-at-least-32-bytes-long!!".into(),
            ),
        ]),
        files: Default::default(),
    };
    let _ = keygate::policy::compile("fuzz.toml", src, &secrets);
});

/// `compile` resolves an upstream host name with the system resolver (a DNS
/// query, slow and off the machine); such inputs are skipped. Mirrors the
/// host extraction in `policy::compile` (`compile/upstream.rs`).
fn resolves_a_name(src: &str) -> bool {
    let Ok(table) = src.parse::<toml::Table>() else {
        return false; // compile stops at the parse error too
    };
    let Some(url) = table
        .get("upstream")
        .and_then(|u| u.get("url"))
        .and_then(|u| u.as_str())
    else {
        return false;
    };
    let Ok(uri) = url.parse::<http::Uri>() else {
        return false;
    };
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return false;
    }
    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
    host.parse::<IpAddr>().is_err()
}
