//! The gate's decision on a realistic policy: the test fixture grown to
//! 10 000 users, 100 000 API keys, 54 routes. Each case is one call of `gate::decide`, as the proxy
//! makes it. Also: compiling that policy (and the memory it takes), and the
//! webhook HMAC of 1 KiB and 1 MiB bodies.
//!
//! Budgets (reported, not asserted): HS256 decision ≤ 2 µs, API-key decision
//! ≤ 0.5 µs, compile ≤ 1 s, resident memory with the policy loaded ≤ 150 MB.

use std::fmt::Write;
use std::hint::black_box;

mod common;

use common::resident_bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Method};
use keygate::clock::unix_now;
use keygate::gate::{decide, RequestFacts};
use keygate::limit::Limiter;
use keygate::policy::{compile, testing, Policy};

const USERS: usize = 10_000;
const KEYS: usize = 100_000;

fn key_for(i: usize) -> String {
    format!("vmc_bench_key_{i:08}")
}

/// The test policy (`tests/fixtures/policy.toml`, shared with the tests)
/// grown to scale: 48 more routes, 10 000 users, 100 000 keys.
fn policy_source() -> String {
    let mut s = testing::base_toml();
    for r in 0..48 {
        let _ = write!(
            s,
            "[[routes]]\npath = \"/v1/res{r}/{{id}}\"\npermissions = [\"res{r}:read\"]\n"
        );
    }
    for u in 0..USERS {
        let _ = write!(
            s,
            "[[users]]\nemail = \"user{u}@example.com\"\nid = \"u{u}\"\ntier = \"enterprise\"\npermissions = [\"vms:read\", \"vms:write\"]\n"
        );
    }
    for k in 0..KEYS {
        let hash = keygate::cli::sha256_hex(&key_for(k));
        let _ = write!(
            s,
            "[[api_keys]]\nid = \"key{k}\"\nsha256 = \"{hash}\"\nuser = \"u{}\"\n",
            k % USERS
        );
    }
    s
}

fn policy() -> Policy {
    compile("bench.toml", &policy_source(), &testing::secrets())
        .expect("bench policy compiles")
        .policy
}

fn eddsa_token(sub: &str, now: u64) -> String {
    testing::sign("ed", &testing::claims(sub, now))
}

fn headers(name: &'static str, value: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(name, HeaderValue::from_str(value).unwrap());
    h.insert("user-agent", HeaderValue::from_static("bench/1.0"));
    h.insert("accept", HeaderValue::from_static("application/json"));
    h
}

fn bench_decisions(c: &mut Criterion) {
    let before = resident_bytes();
    let policy = policy();
    println!(
        "policy of {USERS} users, {KEYS} keys, 54 routes: {:.1} MiB resident growth; process resident {:.1} MiB",
        (resident_bytes() - before) as f64 / (1024.0 * 1024.0),
        resident_bytes() as f64 / (1024.0 * 1024.0)
    );
    let now = unix_now();
    let (user, _) = policy.user_by_id("u42").unwrap();
    let (token, _) = keygate::issue::sign_access_token(&policy, user, now, now, 3600).unwrap();
    let peer = "192.0.2.1".parse().unwrap();
    let get = Method::GET;

    let cases = [
        (
            "hs256_jwt_allow",
            headers("authorization", &format!("Bearer {token}")),
            "/v1/vms/vm-1",
        ),
        (
            "eddsa_jwt_allow",
            headers(
                "authorization",
                &format!("Bearer {}", eddsa_token("u4242", now)),
            ),
            "/v1/vms/vm-1",
        ),
        (
            "api_key_allow",
            headers("x-api-key", &key_for(42_424)),
            "/v1/vms/vm-1",
        ),
        ("public_route", HeaderMap::new(), "/v1/status"),
        ("missing_credentials_deny", HeaderMap::new(), "/v1/vms/vm-1"),
        (
            "unknown_api_key_deny",
            headers("x-api-key", "vmc_bench_nope"),
            "/v1/vms/vm-1",
        ),
    ];
    let mut group = c.benchmark_group("decide");
    for (name, headers, path) in &cases {
        let facts = RequestFacts {
            peer,
            client_ip: None,
            method: &get,
            path,
            headers,
            client_cert: None,
            stored: None,
        };
        // The bench policy's tier is unlimited: the limiter has benches of its own.
        let limiter = Limiter::new();
        let expected = decide(&policy, &limiter, &facts, now * 1_000_000).allowed();
        assert_eq!(
            expected,
            name.ends_with("allow") || *name == "public_route",
            "{name}"
        );
        group.bench_function(*name, |b| {
            b.iter(|| {
                decide(
                    black_box(&policy),
                    &limiter,
                    black_box(&facts),
                    now * 1_000_000,
                )
            })
        });
    }
    group.finish();

    // The same decisions for tokens seen for the first time: a pool of
    // distinct valid tokens (each issued a second apart), cycled through,
    // with the verified-token cache emptied once per pass over the pool.
    const POOL: u64 = 2048;
    let mut cold = c.benchmark_group("decide_first_sight");
    let pools: [(&str, Vec<HeaderMap>); 2] = [
        (
            "hs256_jwt_allow",
            (0..POOL)
                .map(|i| {
                    let (t, _) =
                        keygate::issue::sign_access_token(&policy, user, now - i, now - i, 3600)
                            .unwrap();
                    headers("authorization", &format!("Bearer {t}"))
                })
                .collect(),
        ),
        (
            "eddsa_jwt_allow",
            (0..POOL)
                .map(|i| {
                    headers(
                        "authorization",
                        &format!("Bearer {}", eddsa_token("u42", now - i)),
                    )
                })
                .collect(),
        ),
    ];
    for (name, pool) in &pools {
        let limiter = Limiter::new();
        let mut next = 0usize;
        cold.bench_function(*name, |b| {
            b.iter_custom(|iters| {
                let started = std::time::Instant::now();
                for _ in 0..iters {
                    if next == 0 {
                        policy.verified_tokens.clear();
                    }
                    let facts = RequestFacts {
                        peer,
                        client_ip: None,
                        method: &get,
                        path: "/v1/vms/vm-1",
                        headers: &pool[next],
                        client_cert: None,
                        stored: None,
                    };
                    let d = decide(
                        black_box(&policy),
                        &limiter,
                        black_box(&facts),
                        now * 1_000_000,
                    );
                    debug_assert!(d.allowed());
                    black_box(d);
                    next = (next + 1) % pool.len();
                }
                started.elapsed()
            })
        });
    }
    cold.finish();

    c.bench_function("path_normalize_plain", |b| {
        b.iter(|| keygate::gate::path::normalize(black_box("/v1/vms/vm-1")))
    });
}

fn bench_compile(c: &mut Criterion) {
    let source = policy_source();
    let secrets = testing::secrets();
    let mut group = c.benchmark_group("compile");
    group.sample_size(10);
    group.bench_function("10k_users_100k_keys_50_routes", |b| {
        b.iter(|| compile("bench.toml", black_box(&source), &secrets).map(|c| c.policy.counts()))
    });
    group.finish();
}

fn bench_webhook(c: &mut Criterion) {
    let secrets = [b"whsec_bench".to_vec()];
    let mut group = c.benchmark_group("webhook_verify");
    for (name, size) in [("1KiB", 1024), ("1MiB", 1024 * 1024)] {
        let body = vec![b'x'; size];
        let signature = keygate::webhook::sign(&secrets[0], None, &body);
        group.bench_function(name, |b| {
            b.iter(|| keygate::webhook::verify(&secrets, Some(&signature), None, black_box(&body)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_decisions, bench_compile, bench_webhook);
criterion_main!(benches);
