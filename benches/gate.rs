//! The gate's decision on a realistic policy: 1 000 users, 10 000 API keys,
//! 20 routes. Each case is one call of `gate::decide`, as the proxy makes it.

use std::fmt::Write;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Method};
use keygate::config::Fixed;
use keygate::gate::{decide, RequestFacts};
use keygate::limit::Limiter;
use keygate::policy::{compile, unix_now, Policy};

const SECRET: &str = "bench-secret-bench-secret-bench-secret!";
const USERS: usize = 1_000;
const KEYS: usize = 10_000;

fn key_for(i: usize) -> String {
    format!("vmc_bench_key_{i:08}")
}

fn policy_source() -> String {
    let mut s = String::from(
        r#"
[upstream]
url = "http://127.0.0.1:9000"
[[auth.keys]]
kid = "k1"
algorithm = "HS256"
secret_env = "BENCH_SECRET"
sign = true
[tiers.free]
limit = 100
[tiers.pro]
unlimited = true
[[routes]]
path = "/v1/status"
access = "public"
"#,
    );
    for r in 0..18 {
        let _ = write!(
            s,
            "[[routes]]\npath = \"/v1/res{r}/{{id}}\"\npermissions = [\"res{r}:read\"]\n"
        );
    }
    s.push_str(
        "[[routes]]\npath = \"/v1/vms/{id}\"\nmethods = [\"GET\"]\npermissions = [\"vms:read\"]\n",
    );
    for u in 0..USERS {
        let _ = write!(
            s,
            "[[users]]\nemail = \"user{u}@example.com\"\nid = \"u{u}\"\ntier = \"pro\"\npermissions = [\"vms:read\", \"vms:write\"]\n"
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
    let mut secrets = Fixed::default();
    secrets.env.insert("BENCH_SECRET".into(), SECRET.into());
    compile("bench.toml", &policy_source(), &secrets)
        .expect("bench policy compiles")
        .policy
}

fn headers(name: &'static str, value: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(name, HeaderValue::from_str(value).unwrap());
    h.insert("user-agent", HeaderValue::from_static("bench/1.0"));
    h.insert("accept", HeaderValue::from_static("application/json"));
    h
}

fn bench_decisions(c: &mut Criterion) {
    let policy = policy();
    let now = unix_now();
    let (user, _) = policy.user_by_id("u42").unwrap();
    let (token, _) = keygate::issue::sign_access_token(&policy, user, now, 3600).unwrap();
    let peer = "192.0.2.1".parse().unwrap();
    let get = Method::GET;

    let cases = [
        (
            "hs256_jwt_allow",
            headers("authorization", &format!("Bearer {token}")),
            "/v1/vms/vm-1",
        ),
        (
            "api_key_allow",
            headers("x-api-key", &key_for(4242)),
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
            method: &get,
            path,
            headers,
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

    c.bench_function("path_normalize_plain", |b| {
        b.iter(|| keygate::gate::path::normalize(black_box("/v1/vms/vm-1")))
    });
}

fn bench_compile(c: &mut Criterion) {
    let source = policy_source();
    let mut secrets = Fixed::default();
    secrets.env.insert("BENCH_SECRET".into(), SECRET.into());
    let mut group = c.benchmark_group("compile");
    group.sample_size(10);
    group.bench_function("1k_users_10k_keys", |b| {
        b.iter(|| compile("bench.toml", black_box(&source), &secrets).map(|c| c.policy.counts()))
    });
    group.finish();
}

criterion_group!(benches, bench_decisions, bench_compile);
criterion_main!(benches);
