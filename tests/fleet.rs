//! Fleet mode: several keygate processes sharing their rate limits through
//! one real `redis-server` (started by the test on a free loopback port).

mod support;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::redis::RedisServer;
use support::*;

/// The usual test policy, its limits kept in Redis.
fn fleet_config(redis: &RedisServer, state: &str) -> String {
    format!(
        "{}\n[state]\nbackend = \"redis\"\nurl = \"{}\"\nkey_prefix = \"kg-test\"\n{state}\n",
        config(),
        redis.url()
    )
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
    let with = |choice: &str| {
        let state = format!("timeout = \"100ms\"\non_error_limits = \"{choice}\"");
        Keygate::start(&fleet_config(&redis, &state), upstream.port)
    };
    let (closed, open, local) = (with("closed"), with("open"), with("local"));
    for kg in [&closed, &open, &local] {
        assert_eq!(get(kg).0, 200);
    }

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
    assert!(closed.metric("keygate_limit_decisions_total{source=\"fallback_closed\"}") >= 3.0);
    assert!(local.metric("keygate_limit_decisions_total{source=\"fallback_local\"}") >= 3.0);
    assert_eq!(closed.metric("keygate_state_up"), 0.0);

    // Back: decisions go to Redis again within about a second.
    redis.thaw();
    let deadline = Instant::now() + Duration::from_secs(3);
    while get(&closed).0 != 200 {
        assert!(Instant::now() < deadline, "keygate did not recover");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(closed.metric("keygate_state_up"), 1.0);

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
            "must start with redis://",
        ),
        (
            "backend = \"redis\"\nurl = \"redis+sentinel://a,b/mymaster\"",
            "\"redis+sentinel://a,b/mymaster\"",
            "not supported yet",
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
        "{}\n[state]\nbackend = \"redis\"\nurl = \"{url}\"\non_error_limits = \"open\"\n",
        config()
    );
    let kg = Keygate::start(&cfg, upstream.port);
    assert_eq!(get(&kg).0, 200, "on_error_limits = open");
    std::thread::sleep(Duration::from_millis(200));
    let logs = kg.stderr() + &kg.stdout();
    assert!(
        logs.contains("rate limits are shared through Redis"),
        "{logs}"
    );
    assert!(logs.contains("Redis call failed"), "{logs}");
    assert!(!logs.contains("pw-must-not-leak"), "{logs}");
}
