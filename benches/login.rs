//! Failed logins must take the same time whether the email exists or not:
//! both verify exactly one argon2id hash with the same parameters.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use keygate::clock::unix_now_us;
use keygate::issue::{IssueError, Issuer};
use keygate::limit::Limiter;
use keygate::policy::{compile, testing};
use keygate::state::RedbStore;

fn bench_login(c: &mut Criterion) {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    let phc = argon2::Argon2::default()
        .hash_password(b"the right password", &salt)
        .unwrap()
        .to_string();
    // The test policy (`tests/fixtures/policy.toml`), alice with a
    // password, and throttles that never stop the bench.
    let src = testing::base_toml()
        .replace(
            "audience = \"api\"",
            "audience = \"api\"\nlogin_attempts_per_ip = 4000000000\nlogin_attempts_per_email = 4000000000",
        )
        .replace(
            "id = \"u_alice\"\n",
            &format!("id = \"u_alice\"\npassword_hash = \"{phc}\"\n"),
        );
    let secrets = testing::secrets();
    let policy = compile("bench.toml", &src, &secrets).unwrap().policy;
    let dir = tempfile::tempdir().unwrap();
    let issuer = Arc::new(Issuer::new(
        Arc::new(RedbStore::open(dir.path()).unwrap()),
        Arc::new(Limiter::new()),
    ));
    let policy = Arc::new(policy);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ip = "192.0.2.1".parse().unwrap();
    let attempt = |email: &str| {
        let body = format!(r#"{{"email":"{email}","password":"wrong password"}}"#);
        let login = issuer
            .clone()
            .login(policy.clone(), ip, body.into_bytes(), unix_now_us());
        let r = rt.block_on(login);
        assert_eq!(r.unwrap_err(), IssueError::InvalidCredentials);
    };
    let mut group = c.benchmark_group("failed_login");
    group.sample_size(20);
    group.bench_function("unknown_email", |b| {
        b.iter(|| attempt("nobody@example.com"))
    });
    group.bench_function("wrong_password", |b| {
        b.iter(|| attempt("alice@example.com"))
    });
    group.finish();
}

criterion_group!(benches, bench_login);
criterion_main!(benches);
