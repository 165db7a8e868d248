//! Fleet mode: several keygate processes sharing their rate limits through
//! one real `redis-server` (started by the test on a free loopback port).

mod support;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::redis::{RedisCluster, RedisSentinel, RedisServer, RedisTls};
use support::*;
use support::{login_alice as login, post_json as post, refresh_with as refresh};

/// `[state] record_key` of the test fleets (inline: `check` warns, fine here).
pub const RECORD_KEY: &str = "fleet-test-record-key-of-32-bytes-or-more";

/// The usual test policy, its limits kept in Redis.
fn fleet_config(redis: &RedisServer, state: &str) -> String {
    with_state(&config(), &redis.url(), state)
}

fn with_state(policy: &str, url: &str, state: &str) -> String {
    format!(
        "{policy}\n[state]\nbackend = \"redis\"\nurl = \"{url}\"\nkey_prefix = \"kg-test\"\nrecord_key = \"{RECORD_KEY}\"\n{state}\n"
    )
}

#[test]
fn refresh_tokens_rotate_on_any_sidecar_and_reuse_revokes_everywhere() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    let cfg = with_state(&config_with_passwords(), &redis.url(), "timeout = \"1s\"");
    let (a, b, c) = (
        Keygate::start(&cfg, upstream.port),
        Keygate::start(&cfg, upstream.port),
        Keygate::start(&cfg, upstream.port),
    );

    // Issued on A, rotated on B.
    let r1 = login(&a);
    let (status, r2) = refresh(&b, &r1);
    assert_eq!(status, 200, "{r2}");
    // The spent token on C: reuse, and the family is revoked on all three.
    assert_eq!(refresh(&c, &r1), (401, "invalid_refresh_token".into()));
    for kg in [&a, &b, &c] {
        assert_eq!(refresh(kg, &r2), (401, "invalid_refresh_token".into()));
    }
    assert!(c.metric("keygate_refresh_reuse_detected_total") >= 1.0);

    // Revoked on A, seen by B.
    let r3 = login(&a);
    let (status, _) = post(&a, "/api/v1/auth/revoke", &json!({"refresh_token": r3}));
    assert_eq!(status, 200);
    assert_eq!(refresh(&b, &r3), (401, "invalid_refresh_token".into()));

    // Two sidecars racing on one token: exactly one wins, and the loser's
    // replay revokes the family, the winner's new token included.
    for _ in 0..5 {
        let r = login(&a);
        let (ta, tb) = (r.clone(), r.clone());
        let (pa, pb) = (a.port, b.port);
        let race = |port: u16, token: String| {
            std::thread::spawn(move || {
                let kg = format!("http://127.0.0.1:{port}/api/v1/auth/refresh");
                let resp = client()
                    .post(kg)
                    .json(&json!({"refresh_token": token}))
                    .send()
                    .unwrap();
                let status = resp.status().as_u16();
                let body: Value = resp.json().unwrap();
                (
                    status,
                    body["refresh_token"].as_str().unwrap_or("").to_string(),
                )
            })
        };
        let (x, y) = (race(pa, ta), race(pb, tb));
        let results = [x.join().unwrap(), y.join().unwrap()];
        let winners: Vec<_> = results.iter().filter(|(s, _)| *s == 200).collect();
        assert_eq!(winners.len(), 1, "{results:?}");
        assert!(results.iter().any(|(s, _)| *s == 401), "{results:?}");
        assert_eq!(refresh(&c, &winners[0].1).0, 401, "the family is revoked");
    }
}

/// GET /v1/vms with dana's key (free tier: 100 an hour) at each port in turn.
fn flood(ports: &[u16], total: usize, threads: usize) -> Vec<u16> {
    let statuses = Arc::new(Mutex::new(Vec::new()));
    let next = Arc::new(Mutex::new(0usize));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (statuses, next, ports) = (statuses.clone(), next.clone(), ports.to_vec());
            std::thread::spawn(move || {
                let client = client();
                loop {
                    let i = {
                        let mut n = next.lock().unwrap();
                        *n += 1;
                        *n - 1
                    };
                    if i >= total {
                        return;
                    }
                    let port = ports[i % ports.len()];
                    let status = client
                        .get(format!("http://127.0.0.1:{port}/v1/vms"))
                        .header("X-API-Key", KEY_DANA)
                        .send()
                        .map_or(0, |r| r.status().as_u16());
                    statuses.lock().unwrap().push(status);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    Arc::try_unwrap(statuses).unwrap().into_inner().unwrap()
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|&&s| s == status).count()
}

#[test]
fn four_sidecars_on_one_redis_pass_exactly_the_tier_limit() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    // "closed": a Redis failure would show as 503, never as a local pass.
    let cfg = fleet_config(&redis, "timeout = \"1s\"\non_error_limits = \"closed\"");
    let fleet: Vec<Keygate> = (0..4)
        .map(|_| Keygate::start(&cfg, upstream.port))
        .collect();
    let ports: Vec<u16> = fleet.iter().map(|k| k.port).collect();

    let statuses = flood(&ports, 2000, 32);
    assert_eq!(count(&statuses, 200), 100, "the free tier is 100 an hour");
    assert_eq!(count(&statuses, 429), 1900, "{statuses:?}");

    // Every sidecar has seen a refusal: further requests inside the retry
    // window are refused from its deny cache, without a Redis call.
    let calls = redis.script_calls();
    let again = flood(&ports, 200, 8);
    assert_eq!(count(&again, 429), 200);
    assert_eq!(redis.script_calls(), calls, "the deny cache asked Redis");
    let metric = fleet[0].metric("keygate_limit_decisions_total{source=\"deny_cache\"}");
    assert!(metric >= 50.0, "deny-cache decisions: {metric}");
}

fn get(kg: &Keygate) -> (u16, String, Duration) {
    let started = Instant::now();
    let r = client()
        .get(kg.url("/v1/vms"))
        .header("X-API-Key", KEY_DANA)
        .send()
        .expect("keygate answers");
    let status = r.status().as_u16();
    (status, r.text().unwrap_or_default(), started.elapsed())
}

#[test]
fn when_redis_stops_answering_each_on_error_choice_holds_and_keygate_recovers() {
    let mut redis = RedisServer::start();
    let upstream = Upstream::start();
    let policy = config_with_passwords();
    let with = |choice: &str| {
        let mut state = format!(
            "timeout = \"100ms\"\ntoken_timeout = \"300ms\"\non_error_limits = \"{choice}\""
        );
        if choice == "local" {
            // The fallback grants each of 4 sidecars a quarter of the quota.
            state.push_str("\nfleet_size = 4");
        }
        Keygate::start(&with_state(&policy, &redis.url(), &state), upstream.port)
    };
    let (closed, open, local) = (with("closed"), with("open"), with("local"));
    for kg in [&closed, &open, &local] {
        assert_eq!(get(kg).0, 200);
        assert_eq!(
            client().get(kg.admin("/readyz")).send().unwrap().status(),
            200
        );
    }
    let refresh_token = login(&closed);

    // Frozen: no answer at all. Nothing waits much longer than the timeout.
    redis.freeze();
    for _ in 0..3 {
        let (status, body, took) = get(&closed);
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("\"state_unavailable\""), "{body}");
        assert!(took < Duration::from_secs(1), "waited {took:?}");
        let (status, _, took) = get(&open);
        assert_eq!(status, 200);
        assert!(took < Duration::from_secs(1), "waited {took:?}");
        let (status, _, took) = get(&local);
        assert_eq!(status, 200);
        assert!(took < Duration::from_secs(1), "waited {took:?}");
    }
    let r = client()
        .get(local.url("/v1/vms"))
        .header("X-API-Key", KEY_DANA)
        .send()
        .unwrap();
    assert_eq!(
        r.headers()["x-ratelimit-limit"],
        "25",
        "100 an hour / fleet_size 4"
    );
    assert_eq!(closed.metric("keygate_redis_breaker_open"), 1.0);
    // Refresh, revoke and login fail closed, within token_timeout.
    let started = Instant::now();
    let (status, code) = refresh(&open, &refresh_token);
    assert_eq!((status, code.as_str()), (503, "state_unavailable"));
    let (status, body) = post(
        &local,
        "/api/v1/auth/revoke",
        &json!({"refresh_token": refresh_token}),
    );
    assert_eq!(status, 503, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "waited {:?}",
        started.elapsed()
    );
    // /readyz: degraded but serving, unless on_error_limits = closed.
    let ready = |kg: &Keygate| client().get(kg.admin("/readyz")).send().unwrap();
    assert_eq!(ready(&local).status(), 200);
    let degraded: Value = ready(&open).json().unwrap();
    assert_eq!(degraded["status"], "degraded", "{degraded}");
    assert_eq!(degraded["state"]["up"], false, "{degraded}");
    assert_eq!(ready(&closed).status(), 503);
    assert!(closed.metric("keygate_limit_decisions_total{source=\"fallback_closed\"}") >= 3.0);
    assert!(local.metric("keygate_limit_decisions_total{source=\"fallback_local\"}") >= 3.0);
    assert_eq!(closed.metric("keygate_state_up"), 0.0);

    // Back: decisions go to Redis again within about a second.
    redis.thaw();
    let thawed = Instant::now();
    while get(&closed).0 != 200 {
        assert!(
            thawed.elapsed() < Duration::from_secs(1),
            "keygate did not recover within 1 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("recovered {:?} after Redis came back", thawed.elapsed());
    assert_eq!(closed.metric("keygate_state_up"), 1.0);
    assert_eq!(refresh(&local, &refresh_token).0, 200, "the token survived");

    // Killed: refused connections, the same choices, answered at once.
    redis.kill();
    let (status, _, took) = get(&closed);
    assert_eq!(status, 503);
    assert!(took < Duration::from_secs(1), "waited {took:?}");
    assert_eq!(get(&open).0, 200);
}

#[test]
fn check_rejects_bad_state_settings_at_their_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    for (state, needle, words) in [
        (
            "backend = \"redis\"\nurl = \"http://127.0.0.1:6379\"",
            "\"http://127.0.0.1:6379\"",
            "invalid Redis url",
        ),
        (
            "backend = \"redis\"\nurl = \"redis+sentinel://a:26379,b:26379\"",
            "\"redis+sentinel://a:26379,b:26379\"",
            "names the master",
        ),
        (
            "backend = \"redis\"\nurl = \"redis://127.0.0.1\"\ntls_ca_file = \"ca.pem\"",
            "\"ca.pem\"",
            "tls_ca_file is for a TLS url",
        ),
        (
            "backend = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\non_error_limits = \"maybe\"",
            "\"maybe\"",
            "unknown on_error_limits",
        ),
        (
            "backend = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\npassword_env = \"KEYGATE_NO_SUCH_VAR\"",
            "\"KEYGATE_NO_SUCH_VAR\"",
            "KEYGATE_NO_SUCH_VAR",
        ),
        ("backend = \"etcd\"", "\"etcd\"", "unknown state backend"),
    ] {
        let text = format!("{}\n[state]\n{state}\n", config());
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, &text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args(["check", "-c"])
            .arg(&path)
            .env("KEYGATE_TEST_HS", HS_SECRET)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{state}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let line = text[..text.rfind(needle).unwrap()].matches('\n').count() + 1;
        let prefix = format!("{}:{line}:", path.display());
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with(&prefix) && l.contains(words)),
            "no {words:?} at {prefix} in:\n{stderr}"
        );
    }
}

#[test]
fn a_password_in_the_state_url_never_reaches_the_logs() {
    // This Redis has no password, so every call fails with an AUTH error
    // that keygate logs: the password must be in none of its lines.
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    let url = format!("redis://:pw-must-not-leak@127.0.0.1:{}", redis.port);
    let cfg = format!(
        "{}\n[state]\nbackend = \"redis\"\nurl = \"{url}\"\non_error_limits = \"open\"\nrecord_key = \"{RECORD_KEY}\"\n",
        config()
    );
    let kg = Keygate::start(&cfg, upstream.port);
    // Three failed calls in a row open the breaker, which is logged.
    for _ in 0..3 {
        assert_eq!(get(&kg).0, 200, "on_error_limits = open");
    }
    std::thread::sleep(Duration::from_millis(200));
    let logs = kg.stderr() + &kg.stdout();
    assert!(logs.contains("shared through Redis"), "{logs}");
    assert!(logs.contains("Redis call failed"), "{logs}");
    assert!(!logs.contains("pw-must-not-leak"), "{logs}");
}

#[test]
fn a_three_master_cluster_passes_exactly_the_tier_limit_and_shares_refresh_tokens() {
    let cluster = RedisCluster::start(3);
    let upstream = Upstream::start();
    let state = "timeout = \"1s\"\non_error_limits = \"closed\"";
    let cfg = with_state(&config_with_passwords(), &cluster.url(), state);
    let fleet: Vec<Keygate> = (0..4)
        .map(|_| Keygate::start(&cfg, upstream.port))
        .collect();
    let ports: Vec<u16> = fleet.iter().map(|k| k.port).collect();

    let statuses = flood(&ports, 2000, 32);
    assert_eq!(count(&statuses, 200), 100, "the free tier is 100 an hour");
    assert_eq!(count(&statuses, 429), 1900, "{statuses:?}");
    let calls = cluster.script_calls();
    let again = flood(&ports, 200, 8);
    assert_eq!(count(&again, 429), 200);
    assert_eq!(cluster.script_calls(), calls, "the deny cache asked Redis");

    // A family's index and records sit on different slots; a token issued
    // on one sidecar still rotates on another, and reuse revokes it.
    let r1 = login(&fleet[0]);
    let (status, r2) = refresh(&fleet[1], &r1);
    assert_eq!(status, 200, "{r2}");
    assert_eq!(
        refresh(&fleet[2], &r1),
        (401, "invalid_refresh_token".into())
    );
    assert_eq!(
        refresh(&fleet[3], &r2),
        (401, "invalid_refresh_token".into())
    );
}

#[test]
fn through_sentinel_keygate_follows_a_failover() {
    let root = || -> Vec<std::ffi::OsString> {
        let dir = std::fs::read_dir(env!("CARGO_MANIFEST_DIR")).unwrap();
        dir.map(|e| e.unwrap().file_name()).collect()
    };
    let before = root();
    let redis = RedisSentinel::start();
    let upstream = Upstream::start();
    let state = "timeout = \"200ms\"\non_error_limits = \"closed\"";
    let kg = Keygate::start(
        &with_state(&config_with_passwords(), &redis.url(), state),
        upstream.port,
    );
    assert_eq!(get(&kg).0, 200);
    let r1 = login(&kg);
    assert_ne!(redis.master.command(&["DBSIZE"]).as_deref(), Some(":0"));

    // The replica becomes the master; the old master, a replica, answers
    // writes with READONLY: keygate asks the Sentinel again and goes on.
    redis.fail_over();
    let deadline = Instant::now() + Duration::from_secs(10);
    let r2 = loop {
        let (status, said) = refresh(&kg, &r1);
        if status == 200 {
            break said;
        }
        assert_eq!((status, said.as_str()), (503, "state_unavailable"));
        assert!(
            Instant::now() < deadline,
            "keygate did not follow the failover"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // The rotation was written on the new master.
    assert_eq!(refresh(&kg, &r2).0, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&kg).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "limits did not follow the failover"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The replica's full sync wrote an RDB file: in its own directory, not
    // in the checkout.
    drop(redis);
    let new: Vec<_> = root().into_iter().filter(|f| !before.contains(f)).collect();
    assert!(new.is_empty(), "files left in the checkout: {new:?}");
}

#[test]
fn over_tls_the_servers_certificate_is_checked_against_tls_ca_file() {
    let redis = RedisTls::start();
    let upstream = Upstream::start();
    let trusting = format!(
        "timeout = \"1s\"\non_error_limits = \"closed\"\ntls_ca_file = \"{}\"",
        redis.ca.display()
    );
    let kg = Keygate::start(
        &with_state(&config_with_passwords(), &redis.url(), &trusting),
        upstream.port,
    );
    let statuses = flood(&[kg.port], 150, 8);
    assert_eq!(count(&statuses, 200), 100, "{statuses:?}");
    let r1 = login(&kg);
    assert_eq!(refresh(&kg, &r1).0, 200);

    // Without the CA, the self-made certificate is refused: no call succeeds.
    let distrusting = "timeout = \"1s\"\non_error_limits = \"closed\"";
    let kg = Keygate::start(
        &with_state(&config(), &redis.url(), distrusting),
        upstream.port,
    );
    let (status, body, _) = get(&kg);
    assert_eq!(status, 503, "{body}");
}

#[test]
fn state_export_and_import_carry_tokens_and_spent_quotas_into_redis() {
    let upstream = Upstream::start();
    let policy = config_with_passwords();
    // One sidecar on the embedded store spends dana's hour and logs in.
    let single = Keygate::start(&policy, upstream.port);
    assert_eq!(count(&flood(&[single.port], 101, 4), 200), 100);
    let r1 = login(&single);
    // Limiter state is written behind (every 500 ms); then stop it: the
    // embedded store can be open in one process only.
    std::thread::sleep(Duration::from_millis(1200));
    single.signal("TERM");
    let old_config = single.config_path().display().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    let export = loop {
        let out = keygate_command(&["state", "export", "-c", &old_config]);
        if out.status.success() {
            break out.stdout;
        }
        // Still shutting down, holding the store.
        assert!(
            Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = String::from_utf8(export).unwrap();
    assert!(text.starts_with("{\"keygate_state\":1}\n"), "{text}");
    assert!(text.contains("{\"refresh\":"), "{text}");
    assert!(text.contains("{\"limit\":"), "{text}");
    assert!(!text.contains(&r1), "the export holds hashes, not tokens");

    // Into Redis, then a fleet of two serves on as if nothing happened.
    let redis = RedisServer::start();
    let cfg = with_state(
        &policy,
        &redis.url(),
        "timeout = \"1s\"\non_error_limits = \"closed\"",
    );
    let (a, b) = (
        Keygate::start(&cfg, upstream.port),
        Keygate::start(&cfg, upstream.port),
    );
    let file = a.dir.path().join("state.jsonl");
    std::fs::write(&file, &text).unwrap();
    let new_config = a.config_path().display().to_string();
    let out = state_import(&new_config, &file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(get(&a).0, 429, "dana's spent hour came along");
    assert_eq!(get(&b).0, 429);
    let (status, _) = refresh(&b, &r1);
    assert_eq!(status, 200, "the refresh token came along");

    // A broken export is refused with its line number, and nothing changes.
    std::fs::write(&file, "{\"keygate_state\":1}\n{\"limit\":{}}\n").unwrap();
    let out = state_import(&new_config, &file);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2"));
}
