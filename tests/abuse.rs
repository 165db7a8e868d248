//! keygate read as an attacker reads it: one client must not be able to
//! exhaust it, switch its limits off, act without a trace, learn a password
//! from an allowlist, outlive a revocation or a CA change, multiply its
//! buckets over IPv6, read a secret out of `config dump`, or revive a spent
//! token through an import. Each test drives the real binary with real
//! peers (a real `redis-server`, real HTTP/2 and TLS clients).

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::delay::DelayProxy;
use support::redis::{GuardedSentinel, RedisServer};
use support::tls::{client_config, Ca, Conn};
use support::*;

const RECORD_KEY: &str = "abuse-test-record-key-of-32-bytes-or-more";

/// [`config_with_passwords`] with these login throttles.
fn login_config(per_email: u32, per_ip: u32) -> String {
    config_with_passwords().replacen(
        "audience = \"api\"",
        &format!(
            "audience = \"api\"\nlogin_attempts_per_email = {per_email}\nlogin_attempts_per_ip = {per_ip}"
        ),
        1,
    )
}

fn with_redis(policy: &str, url: &str, extra: &str) -> String {
    format!(
        "{policy}\n[state]\nbackend = \"redis\"\nurl = \"{url}\"\nkey_prefix = \"kg-abuse\"\nrecord_key = \"{RECORD_KEY}\"\n{extra}\n"
    )
}

/// A login from `client` (an address of 127.0.0.0/8, or via the trusted
/// proxy 127.0.0.2 the address `xff` names): status, error code, the
/// body, and `Retry-After`.
fn login_as(
    kg: &Keygate,
    local: &str,
    xff: Option<&str>,
    email: &str,
    password: &str,
) -> (u16, String, Value, Option<String>) {
    let mut req = client_at(local)
        .post(kg.url("/api/v1/auth/token"))
        .json(&json!({"email": email, "password": password}));
    if let Some(xff) = xff {
        req = req.header("X-Forwarded-For", xff);
    }
    let r = req.send().expect("login");
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body: Value = r.json().unwrap_or(Value::Null);
    let code = body["error"]["code"].as_str().unwrap_or("").to_string();
    (status, code, body, retry)
}

/// `n` calls of `f` at once, one thread each; their results in order.
fn parallel<T: Send + 'static>(n: usize, f: impl Fn(usize) -> T + Send + Sync + 'static) -> Vec<T> {
    let f = Arc::new(f);
    let start = Arc::new(std::sync::Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (f, start) = (f.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                f(i)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn count<T>(items: &[(u16, T)], status: u16) -> usize {
    items.iter().filter(|(s, _)| *s == status).count()
}

/// The peak resident memory of a process, in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM")
        / 1024
}

/// Access-log lines (JSON) that `pick` accepts, waiting up to 5 s for one.
fn log_lines(kg: &Keygate, pick: impl Fn(&Value) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let found: Vec<Value> = kg
            .stdout()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| pick(v))
            .collect();
        if !found.is_empty() || Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Rewrite keygate's config and wait until it has been loaded.
fn reload(kg: &Keygate, config: &str, upstream: u16) {
    let before = kg.metric(r#"keygate_config_reloads_total{result="success"}"#);
    kg.write_config(config, upstream);
    wait_for("the reload", || {
        kg.metric(r#"keygate_config_reloads_total{result="success"}"#) > before
    });
}

// ---- 1. login work is bounded ----------------------------------------

#[test]
fn parallel_wrong_logins_evaluate_at_most_the_configured_number() {
    let upstream = Upstream::start();
    let kg = Keygate::start(&login_config(2, 1000), upstream.port);
    let kg = Arc::new(kg);
    // Three waves of twelve parallel guesses at alice's password, each
    // guess from an address of its own (through the trusted proxy).
    let mut evaluated = 0;
    for wave in 0..3 {
        let k = kg.clone();
        let answers = parallel(12, move |i| {
            let (s, code, _, retry) = login_as(
                &k,
                "127.0.0.2",
                Some(&format!("203.0.{wave}.{}", i + 1)),
                "alice@example.com",
                "not the password",
            );
            (s, (code, retry))
        });
        evaluated += count(&answers, 401);
        for (status, (code, retry)) in &answers {
            match status {
                401 => assert_eq!(code, "invalid_credentials"),
                429 => {
                    assert_eq!(code, "login_throttled");
                    assert!(retry.is_some(), "429 without Retry-After");
                }
                other => panic!("wave {wave}: {other} {code}"),
            }
        }
    }
    assert!(
        evaluated <= 2,
        "{evaluated} wrong passwords were checked; the limit is 2"
    );
    assert!(kg.metric("keygate_login_verifications_total") <= 2.0);
    // One address, many emails at once: one attempt in flight at a time.
    let k = kg.clone();
    let answers = parallel(8, move |i| {
        let (s, code, _, _) = login_as(
            &k,
            "127.0.0.2",
            Some("198.51.100.77"),
            &format!("nobody{i}@example.com"),
            "guess",
        );
        (s, code)
    });
    assert!(count(&answers, 429) >= 1, "{answers:?}");
    // The flood took nothing from anyone else.
    let (status, _, body, _) = login_as(&kg, "127.0.0.1", None, "dana@example.com", PASSWORD);
    assert_eq!(status, 200, "{body}");
    // And a right password costs its user nothing: dana logs in again and
    // again past her limit of two.
    for _ in 0..3 {
        let (status, _, _, _) = login_as(&kg, "127.0.0.1", None, "dana@example.com", PASSWORD);
        assert_eq!(status, 200);
    }
}

#[test]
fn two_sidecars_check_at_most_the_limit_between_them() {
    // One attempt in flight per email is per sidecar: with two, only
    // spending before the check keeps parallel guesses within the limit.
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    let cfg = with_redis(&login_config(1, 1000), &redis.url(), "timeout = \"1s\"");
    let (a, b) = (
        Arc::new(Keygate::start(&cfg, upstream.port)),
        Arc::new(Keygate::start(&cfg, upstream.port)),
    );
    let mut evaluated = 0;
    for wave in 0..4 {
        let (a, b) = (a.clone(), b.clone());
        let answers = parallel(8, move |i| {
            let kg = if i % 2 == 0 { &a } else { &b };
            let (s, code, _, _) = login_as(
                kg,
                "127.0.0.2",
                Some(&format!("203.0.{wave}.{}", i + 1)),
                "alice@example.com",
                "not the password",
            );
            (s, code)
        });
        evaluated += count(&answers, 401);
        assert_eq!(
            count(&answers, 401) + count(&answers, 429),
            8,
            "{answers:?}"
        );
    }
    assert!(evaluated <= 1, "{evaluated} checks; the limit is 1");
}

#[test]
fn a_throttled_address_cannot_hold_a_victims_email_busy() {
    let upstream = Upstream::start();
    let kg = Arc::new(Keygate::start(&login_config(10, 1), upstream.port));
    // The attacker's one attempt, then a stream of refused ones for dana.
    let (status, _, _, _) = login_as(&kg, "127.0.0.2", Some("203.0.113.66"), "x@example.com", "x");
    assert_eq!(status, 401);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood: Vec<_> = (0..4)
        .map(|_| {
            let (kg, stop) = (kg.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (status, ..) = login_as(
                        &kg,
                        "127.0.0.2",
                        Some("203.0.113.66"),
                        "dana@example.com",
                        "guess",
                    );
                    assert_eq!(status, 429);
                }
            })
        })
        .collect();
    // dana, from her own address, is never told to wait.
    for _ in 0..20 {
        let (status, code, _, _) = login_as(
            &kg,
            "127.0.0.2",
            Some("198.51.100.5"),
            "dana@example.com",
            PASSWORD,
        );
        assert_eq!(status, 200, "{code}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for f in flood {
        f.join().unwrap();
    }
    assert_eq!(kg.metric("keygate_login_failures_total"), 1.0);
}

#[test]
fn a_login_flood_keeps_memory_bounded_and_answers_503_when_the_queue_is_full() {
    let upstream = Upstream::start();
    let kg = Arc::new(Keygate::start(&login_config(10, 1000), upstream.port));
    let pid = kg.child.id();
    let before = peak_rss_mib(pid);
    // 64 logins at once, each for an email and from an address of its own:
    // no throttle stops them, only the bound on verifications does.
    let k = kg.clone();
    let answers = parallel(64, move |i| {
        let (s, code, _, retry) = login_as(
            &k,
            "127.0.0.2",
            Some(&format!("192.0.2.{}", i + 1)),
            &format!("user{i}@example.com"),
            "guess",
        );
        (s, (code, retry))
    });
    let peak = peak_rss_mib(pid);
    eprintln!("peak RSS {peak} MiB, {before} MiB before the flood");
    let overloaded = count(&answers, 503);
    assert!(overloaded > 0, "{answers:?}");
    for (status, (code, retry)) in &answers {
        match status {
            401 => assert_eq!(code, "invalid_credentials"),
            503 => {
                assert_eq!(code, "overloaded");
                assert_eq!(retry.as_deref(), Some("1"));
            }
            other => panic!("{other} {code}"),
        }
    }
    // 19 MiB per verification (argon2's defaults): 64 at once would be
    // 1.2 GiB; the permits (one per core) hold it to a few tens.
    assert!(
        peak < before + 100,
        "peak RSS {peak} MiB (before the flood: {before} MiB)"
    );
    assert!(kg.metric("keygate_login_overloaded_total") >= overloaded as f64);
    // Another user, honouring Retry-After, gets in.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, _, retry) = login_as(&kg, "127.0.0.1", None, "dana@example.com", PASSWORD);
        if status == 200 {
            break;
        }
        assert_eq!(status, 503);
        assert!(Instant::now() < deadline, "dana never got in");
        let wait: u64 = retry.and_then(|r| r.parse().ok()).unwrap_or(1);
        std::thread::sleep(Duration::from_secs(wait));
    }
}

#[test]
fn fleet_login_throttles_take_a_fixed_number_of_redis_connections() {
    let redis = RedisServer::start();
    // Each answer 50 ms late, so that the throttle calls of parallel
    // logins overlap.
    let slow = DelayProxy::start(redis.port, Duration::from_millis(50));
    let upstream = Upstream::start();
    let cfg = with_redis(
        &login_config(10, 1000),
        &slow.url(),
        "token_timeout = \"5s\"\nconnect_timeout = \"5s\"",
    );
    let kg = Arc::new(Keygate::start(&cfg, upstream.port));
    let connections = || -> u64 {
        redis
            .info("stats")
            .lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    };
    let before = connections();
    let k = kg.clone();
    let answers = parallel(48, move |i| {
        let (s, code, _, _) = login_as(
            &k,
            "127.0.0.2",
            Some(&format!("192.0.2.{}", i + 1)),
            &format!("user{i}@example.com"),
            "guess",
        );
        (s, code)
    });
    assert_eq!(count(&answers, 0), 0);
    // The token endpoints' pool (8), the proxy threads' own connections (2)
    // and this test's INFO calls; not one per attempt.
    let opened = connections() - before;
    assert!(opened <= 14, "{opened} Redis connections for 48 logins");
    assert!(count(&answers, 401) >= 1, "{answers:?}");
}

// ---- 2. an HTTP/2 reset must not switch fleet limits off ------------------

/// TLS (ALPN h2) in front of the test policy, and a tier of 3 a minute
/// with an owner-less key in it.
fn h2_fleet_config(certs: &std::path::Path, redis_url: &str, state: &str) -> String {
    let tiny = sha256_hex("vmc_it_tiny_0123456789");
    format!(
        "{}\n[server.tls]\ncert_file = \"{d}/default.crt\"\nkey_file = \"{d}/default.key\"\n\
         [tiers.tiny]\nlimit = 3\nperiod = \"1m\"\n[[api_keys]]\nid = \"tiny-key\"\nsha256 = \"{tiny}\"\n\
         tier = \"tiny\"\npermissions = [\"vms:read\", \"vms:write\"]\n\
         [[routes]]\npath = \"/slow/{{*rest}}\"\nmethods = [\"DELETE\"]\npermissions = [\"vms:write\"]\n\
         [state]\nbackend = \"redis\"\nurl = \"{redis_url}\"\nkey_prefix = \"kg-h2\"\nrecord_key = \"{RECORD_KEY}\"\n{state}\n",
        config(),
        d = certs.display()
    )
}

/// An HTTP/2 client over TLS (the `h2` crate, as curl's nghttp2 would be).
async fn h2_connect(
    port: u16,
    tls: Arc<rustls::ClientConfig>,
) -> h2::client::SendRequest<bytes::Bytes> {
    h2_connect_watched(port, tls).await.0
}

/// [`h2_connect`], with the task that drives the connection: it ends when
/// keygate ends the connection.
async fn h2_connect_watched(
    port: u16,
    tls: Arc<rustls::ClientConfig>,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<()>,
) {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut tls = (*tls).clone();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(stream).await.unwrap();
    let ended = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, ended)
}

fn h2_request(method: &str, port: u16, path: &str, key: &str) -> http::Request<()> {
    http::Request::builder()
        .method(method)
        .uri(format!("https://localhost:{port}{path}"))
        .header("x-api-key", key)
        .body(())
        .unwrap()
}

#[test]
fn resetting_an_http2_stream_does_not_switch_fleet_limits_off() {
    let redis = RedisServer::start();
    // Redis answers 300 ms late: every limit decision is in flight a while.
    let slow = DelayProxy::start(redis.port, Duration::from_millis(300));
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("keygate abuse test CA");
    ca.server("localhost", &["localhost"])
        .install(certs.path(), "default");
    let upstream = Upstream::start();
    let state = "timeout = \"2s\"\nconnect_timeout = \"5s\"\non_error_limits = \"open\"";
    let kg = Keygate::start(
        &h2_fleet_config(certs.path(), &slow.url(), state),
        upstream.port,
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let passed = rt.block_on(async {
        let mut send = h2_connect(kg.port, client_config(&ca.pem, None)).await;
        let mut passed = 0;
        for _ in 0..3 {
            // Five decisions for one account at once: the first goes to
            // Redis; the other four wait as one batch, led by the second,
            // which the client then resets.
            let mut answers = Vec::new();
            let mut leader = None;
            for i in 0..5 {
                send = send.ready().await.unwrap();
                let req = h2_request("GET", kg.port, "/v1/vms", "vmc_it_tiny_0123456789");
                let (answer, stream) = send.send_request(req, true).unwrap();
                if i == 1 {
                    leader = Some((answer, stream));
                } else {
                    answers.push(answer);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (_, mut stream) = leader.unwrap();
            stream.send_reset(h2::Reason::CANCEL);
            for answer in answers {
                let status = answer.await.map(|r| r.status().as_u16()).unwrap_or(0);
                assert!(matches!(status, 200 | 429), "{status}");
                passed += usize::from(status == 200);
            }
        }
        passed
    });
    assert!(
        passed <= 3,
        "{passed} requests passed a limit of 3 a minute by resetting one stream per burst"
    );
    assert_eq!(
        kg.metric(r#"keygate_limit_decisions_total{source="fallback_open"}"#),
        0.0,
        "a reset stream sent its batch to on_error_limits"
    );
}

// ---- 3. every request leaves a trace -----------------------------------

#[test]
fn a_request_abandoned_by_its_client_is_logged_as_499() {
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("keygate abuse test CA");
    ca.server("localhost", &["localhost"])
        .install(certs.path(), "default");
    let upstream = Upstream::start();
    let cfg = format!(
        "{}\n[server.tls]\ncert_file = \"{d}/default.crt\"\nkey_file = \"{d}/default.key\"\n\
         [[routes]]\npath = \"/slow/{{*rest}}\"\nmethods = [\"DELETE\"]\npermissions = [\"vms:write\"]\n",
        config(),
        d = certs.path().display()
    );
    let kg = Keygate::start(&cfg, upstream.port);

    // HTTP/2: a DELETE the upstream received (and takes 2.5 s to answer),
    // then the client resets the stream.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let send = h2_connect(kg.port, client_config(&ca.pem, None)).await;
        let mut send = send.ready().await.unwrap();
        let req = h2_request("DELETE", kg.port, "/slow/vm-42", KEY_CI);
        let (_answer, mut stream) = send.send_request(req, true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while upstream.count() == 0 {
            assert!(Instant::now() < deadline, "the upstream never got it");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stream.send_reset(h2::Reason::CANCEL);
        tokio::time::sleep(Duration::from_millis(200)).await;
    });
    let lines = log_lines(&kg, |v| v["path"] == "/slow/vm-42");
    assert_eq!(lines.len(), 1, "{lines:?}\n{}", kg.stdout());
    let line = &lines[0];
    assert_eq!(line["status"], 499, "{line}");
    assert_eq!(line["method"], "DELETE");
    assert_eq!(line["route"], "/slow/{*rest}");
    assert_eq!(line["principal"], "ci");
    assert_eq!(line["key_id"], "ci");
    assert_eq!(line["forwarded"], true, "the upstream got the request");
    assert_eq!(line["code"], "client_closed_request");
    assert_eq!(
        kg.metric(r#"keygate_requests_total{code="499",method="DELETE",route="/slow/{*rest}",status="4xx"}"#),
        1.0
    );

    // HTTP/1.1: a client that closes halfway through its request body.
    let mut c = Conn::open(kg.port, "localhost", client_config(&ca.pem, None)).unwrap();
    let head = format!(
        "POST /v1/vms/7 HTTP/1.1\r\nhost: localhost\r\nx-api-key: {KEY_CI}\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"partial\""
    );
    c.tls.write_all(head.as_bytes()).unwrap();
    c.tls.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let _ = c.tls.sock.shutdown(std::net::Shutdown::Both);
    drop(c);
    let lines = log_lines(&kg, |v| v["path"] == "/v1/vms/7");
    assert_eq!(lines.len(), 1, "{}", kg.stdout());
    assert_eq!(lines[0]["status"], 499, "{}", lines[0]);
    assert_eq!(lines[0]["principal"], "ci");
    assert_eq!(lines[0]["route"], "/v1/vms/{id}");
    assert_eq!(lines[0]["forwarded"], true, "{}", lines[0]);
}

// ---- 4. ip_allow is not a password oracle ------------------------------

#[test]
fn the_right_password_from_outside_the_allowlist_answers_as_a_wrong_one() {
    let upstream = Upstream::start();
    let kg = Keygate::start(&login_config(2, 1000), upstream.port);
    // bob may log in from 127.0.0.9 only.
    let right = login_as(&kg, "127.0.0.1", None, "bob@example.com", PASSWORD);
    let wrong = login_as(&kg, "127.0.0.1", None, "bob@example.com", "not it");
    assert_eq!((right.0, right.1.as_str()), (401, "invalid_credentials"));
    assert_eq!(right.2["error"]["message"], wrong.2["error"]["message"]);
    assert_eq!((wrong.0, wrong.1.as_str()), (401, "invalid_credentials"));
    // Both were counted: bob's two attempts are spent, even from his own
    // address.
    let (status, code, _, _) = login_as(&kg, "127.0.0.9", None, "bob@example.com", PASSWORD);
    assert_eq!((status, code.as_str()), (429, "login_throttled"));
    assert_eq!(kg.metric("keygate_login_failures_total"), 2.0);
}

// ---- 5. tokens_valid_after holds against rotated families ----------------

fn rfc3339(t: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(t)).to_string()
}

/// Log in, rotate two seconds later, then cut off at a time between the
/// two: the rotated refresh token and the access token it brought are
/// both from before the cutoff.
fn family_started_before_the_cutoff_is_refused(policy: &str) {
    let upstream = Upstream::start();
    let kg = Keygate::start(policy, upstream.port);
    let post = |path: &str, body: Value| {
        let r = client().post(kg.url(path)).json(&body).send().unwrap();
        (
            r.status().as_u16(),
            r.json::<Value>().unwrap_or(Value::Null),
        )
    };
    let started = now();
    let (status, first) = post(
        "/api/v1/auth/token",
        json!({"email": "alice@example.com", "password": PASSWORD}),
    );
    assert_eq!(status, 200, "{first}");
    std::thread::sleep(Duration::from_millis(2100));
    let (status, rotated) = post(
        "/api/v1/auth/refresh",
        json!({"refresh_token": first["refresh_token"]}),
    );
    assert_eq!(status, 200, "{rotated}");
    let access = rotated["token"].as_str().unwrap().to_string();
    let vms = |token: &str| {
        client()
            .get(kg.url("/v1/vms"))
            .bearer_auth(token)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(vms(&access), 200);
    // The cutoff: after the login, before the rotation.
    let cutoff = rfc3339(started + 1);
    let cut = policy.replacen(
        "id = \"u_alice\"\n",
        &format!("id = \"u_alice\"\ntokens_valid_after = \"{cutoff}\"\n"),
        1,
    );
    reload(&kg, &cut, upstream.port);
    assert_eq!(vms(&access), 401, "an access token of a pre-cutoff login");
    let (status, body) = post(
        "/api/v1/auth/refresh",
        json!({"refresh_token": rotated["refresh_token"]}),
    );
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "invalid_refresh_token");
    // A login after the cutoff is not affected.
    let (status, fresh) = post(
        "/api/v1/auth/token",
        json!({"email": "alice@example.com", "password": PASSWORD}),
    );
    assert_eq!(status, 200);
    assert_eq!(vms(fresh["token"].as_str().unwrap()), 200);
    let (status, _) = post(
        "/api/v1/auth/refresh",
        json!({"refresh_token": fresh["refresh_token"]}),
    );
    assert_eq!(status, 200);
}

#[test]
fn tokens_valid_after_cuts_off_families_rotated_after_it() {
    family_started_before_the_cutoff_is_refused(&config_with_passwords());
    let redis = RedisServer::start();
    family_started_before_the_cutoff_is_refused(&with_redis(
        &config_with_passwords(),
        &redis.url(),
        "timeout = \"1s\"",
    ));
}

// ---- 6. a CA change ends certificate auth on open connections ------------

#[test]
fn a_client_ca_change_ends_certificate_auth_on_open_connections() {
    let certs = tempfile::tempdir().unwrap();
    let d = certs.path();
    let ca = Ca::new("keygate abuse server CA");
    ca.server("localhost", &["localhost"]).install(d, "default");
    let old_clients = Ca::new("old client CA");
    let new_clients = Ca::new("new client CA");
    std::fs::write(d.join("clients.pem"), &old_clients.pem).unwrap();
    let billing = old_clients.client("billing", "billing.internal");
    let cfg = format!(
        "{}\n[[client_certs]]\nid = \"billing\"\nsubject = \"CN=billing\"\ntier = \"enterprise\"\n\
         permissions = [\"vms:read\"]\n\
         [server.tls]\ncert_file = \"{d}/default.crt\"\nkey_file = \"{d}/default.key\"\n\
         client_ca_file = \"{d}/clients.pem\"\nclient_auth = \"optional\"\n",
        config(),
        d = d.display()
    );
    let upstream = Upstream::start();
    let kg = Keygate::start(&cfg, upstream.port);
    let identity = client_config(&ca.pem, Some(&billing));
    let mut held = Conn::open(kg.port, "localhost", identity.clone()).unwrap();
    assert_eq!(held.get("/v1/vms", &[]).unwrap().status, 200);

    // HTTP/2 too: a connection that presented the same certificate.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let h2_conn = rt.block_on(async {
        let (send, ended) = h2_connect_watched(kg.port, identity.clone()).await;
        let mut send = send.ready().await.unwrap();
        let req = http::Request::get(format!("https://localhost:{}/v1/vms", kg.port))
            .body(())
            .unwrap();
        let (answer, _) = send.send_request(req, true).unwrap();
        assert_eq!(answer.await.unwrap().status(), 200);
        (send, ended)
    });

    // The operator replaces the client CA (the file watcher reloads).
    let before = kg.metric(r#"keygate_config_reloads_total{result="success"}"#);
    std::fs::write(d.join("clients.pem"), &new_clients.pem).unwrap();
    wait_for("the CA reload", || {
        kg.metric(r#"keygate_config_reloads_total{result="success"}"#) > before
    });
    let r = held.get("/v1/vms", &[]).unwrap();
    assert_eq!(r.status, 401, "{}{}", r.head, r.body);
    assert!(r.body.contains("invalid_client_certificate"), "{}", r.body);
    assert_eq!(r.header("connection").as_deref(), Some("close"));
    assert!(
        held.get("/v1/vms", &[]).is_err(),
        "the connection stayed open"
    );
    // The HTTP/2 connection: refused, then ended with GOAWAY.
    rt.block_on(async {
        let (send, ended) = h2_conn;
        if let Ok(mut send) = send.ready().await {
            let req = http::Request::get(format!("https://localhost:{}/v1/vms", kg.port))
                .body(())
                .unwrap();
            if let Ok((answer, _)) = send.send_request(req, true) {
                if let Ok(r) = answer.await {
                    assert_eq!(r.status(), 401);
                }
            }
        }
        tokio::time::timeout(Duration::from_secs(5), ended)
            .await
            .expect("the HTTP/2 connection was not ended")
            .unwrap();
    });
    // Upstream saw nothing after the change.
    assert_eq!(upstream.count(), 2);
}

// ---- 7. IPv6 clients are keyed by prefix --------------------------------

#[test]
fn an_ipv6_client_has_one_bucket_per_prefix() {
    let upstream = Upstream::start();
    let kg = Keygate::start(&login_config(1000, 3), upstream.port);
    let from = |xff: &str| {
        client_at("127.0.0.2")
            .post(kg.url("/v1/signup"))
            .header("X-Forwarded-For", xff)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    // The anonymous tier: 5 a minute per client; eight addresses of one /64.
    let statuses: Vec<u16> = (1..=8)
        .map(|i| from(&format!("2001:db8:1:2::{i:x}")))
        .collect();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429]);
    assert_eq!(from("2001:db8:1:3::1"), 200, "another /64");
    assert_eq!(from("192.0.2.1"), 200);
    // Login attempts per address: 3 per /64.
    let statuses: Vec<u16> = (1..=5)
        .map(|i| {
            login_as(
                &kg,
                "127.0.0.2",
                Some(&format!("2001:db8:5:6:{i:x}::1")),
                &format!("x{i}@example.com"),
                "guess",
            )
            .0
        })
        .collect();
    assert_eq!(statuses, [401, 401, 401, 429, 429]);
    // ipv6_prefix = 128: each address its own again.
    let per_address = login_config(1000, 3).replacen(
        "grace_period = \"1s\"",
        "grace_period = \"1s\"\nipv6_prefix = 128",
        1,
    );
    reload(&kg, &per_address, upstream.port);
    assert_eq!(from("2001:db8:9:9::1"), 200);
    let statuses: Vec<u16> = (1..=6)
        .map(|i| from(&format!("2001:db8:7:7::{i:x}")))
        .collect();
    assert_eq!(statuses, [200; 6]);
}

// ---- 8. secrets are never printed ---------------------------------------

#[test]
fn config_dump_and_the_startup_log_print_no_secret_however_it_is_written() {
    let upstream = Upstream::start();
    // An inline table in an array, a multi-line string, a password in a
    // unix-socket url's query, an inline record key.
    let policy = format!(
        "webhooks = [{{ path = \"/hooks/inline\", secret = \"inline-table-secret-value\" }}]\n{}\n\
         [webhook_relay]\nlisten = \"{{relay}}\"\n[[webhook_relay.subscribers]]\nid = \"s\"\n\
         url_prefix = \"http://127.0.0.1:9/\"\nsecret = '''\nmulti-line-secret-value'''\n",
        config()
    );
    let cfg = format!(
        "{policy}\n[state]\nbackend = \"redis\"\n\
         url = \"redis+unix:///nonexistent/kg.sock?db=0&pass=unix-url-secret-value\"\n\
         record_key = \"record-key-secret-value-of-32-bytes\"\non_error_limits = \"open\"\n"
    );
    let kg = Keygate::start(&cfg, upstream.port);
    let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["config", "dump", "-c"])
        .arg(kg.config_path())
        .env("KEYGATE_TEST_HS", HS_SECRET)
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dump.contains("/hooks/inline"), "{dump}");
    assert!(dump.contains("pass=***"), "{dump}");
    let logs = kg.stderr() + &kg.stdout() + &dump;
    for secret in [
        "inline-table-secret-value",
        "multi-line-secret-value",
        "unix-url-secret-value",
        "record-key-secret-value",
        HS_SECRET,
    ] {
        assert!(!logs.contains(secret), "{secret} printed:\n{logs}");
    }
}

// ---- 9. an import never revives a spent token -----------------------------

#[test]
fn state_import_never_revives_a_spent_refresh_token() {
    let upstream = Upstream::start();
    let mut kg = Keygate::start(&config_with_passwords(), upstream.port);
    let post = |kg: &Keygate, path: &str, body: Value| {
        let r = client().post(kg.url(path)).json(&body).send().unwrap();
        (
            r.status().as_u16(),
            r.json::<Value>().unwrap_or(Value::Null),
        )
    };
    let (_, t) = post(
        &kg,
        "/api/v1/auth/token",
        json!({"email": "alice@example.com", "password": PASSWORD}),
    );
    let r1 = t["refresh_token"].as_str().unwrap().to_string();
    let config = kg.config_path().display().to_string();
    // An export while r1 is live.
    kg.stop();
    let export = keygate_command(&["state", "export", "-c", &config]);
    assert!(export.status.success());
    let file = kg.dir.path().join("old.jsonl");
    std::fs::write(&file, &export.stdout).unwrap();
    // r1 is spent; then the old export is imported over the store.
    kg.start_again();
    let (status, t) = post(&kg, "/api/v1/auth/refresh", json!({"refresh_token": r1}));
    assert_eq!(status, 200);
    let r2 = t["refresh_token"].as_str().unwrap().to_string();
    kg.stop();
    let out = state_import(&config, &file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    kg.start_again();
    let (status, body) = post(&kg, "/api/v1/auth/refresh", json!({"refresh_token": r1}));
    assert_eq!(status, 401, "the import revived a spent token: {body}");
    // Presenting it was reuse: the family is revoked, r2 with it.
    let (status, _) = post(&kg, "/api/v1/auth/refresh", json!({"refresh_token": r2}));
    assert_eq!(status, 401);
}

// ---- 10. the rest of the review -------------------------------------------

#[test]
fn one_slow_redis_answer_does_not_open_the_breaker_for_everyone() {
    let redis = RedisServer::start();
    let slow = DelayProxy::start(redis.port, Duration::ZERO);
    let upstream = Upstream::start();
    let cfg = with_redis(
        &config(),
        &slow.url(),
        "timeout = \"150ms\"\non_error_limits = \"closed\"",
    );
    let kg = Keygate::start(&cfg, upstream.port);
    let get = || {
        client()
            .get(kg.url("/v1/vms"))
            .header("X-API-Key", KEY_DANA)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    // Warm both proxy threads' connections.
    for _ in 0..4 {
        assert_eq!(get(), 200);
    }
    slow.set_delay(Duration::from_millis(250));
    assert_eq!(
        get(),
        503,
        "a call past its deadline, on_error_limits = closed"
    );
    slow.set_delay(Duration::ZERO);
    // Within the 250 ms the breaker would be open after one failure.
    assert_eq!(get(), 200, "one slow answer opened the breaker");
    assert_eq!(
        kg.metric(r#"keygate_redis_calls_total{op="gcra",outcome="skipped"}"#),
        0.0
    );
}

#[test]
fn a_refresh_family_forged_in_redis_is_refused() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    let cfg = with_redis(&config_with_passwords(), &redis.url(), "timeout = \"1s\"");
    let kg = Keygate::start(&cfg, upstream.port);
    let refresh = |token: &str| {
        let r = client()
            .post(kg.url("/api/v1/auth/refresh"))
            .json(&json!({"refresh_token": token}))
            .send()
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    // Someone who can write to Redis, but has no record key, makes alice a
    // family whose live token is theirs.
    let token = format!("rft_{}", "F".repeat(43));
    let hash = sha256_hex(&token);
    let family = format!("{:032x}", 0xfeed_u128);
    let now = now();
    assert_eq!(
        redis
            .command(&["SET", &format!("kg-abuse:rt:{{{hash}}}"), &family])
            .as_deref(),
        Some("+OK")
    );
    let forged = [
        "HSET",
        &format!("kg-abuse:fam:{{{family}}}"),
        "u",
        "u_alice",
        "c",
        &hash,
        "ci",
        &now.to_string(),
        "ce",
        &(now + 3600).to_string(),
        "a",
        &now.to_string(),
        "m",
        &"0".repeat(64),
    ];
    assert!(redis.command(&forged).is_some_and(|r| r.starts_with(':')));
    let (status, body) = refresh(&token);
    assert_eq!(status, 401, "a forged family minted tokens: {body}");
    assert!(kg.metric(r#"keygate_state_errors_total{op="unauthenticated_record"}"#) >= 1.0);
    // A real family of dana's, signed by keygate, handed to alice (its MAC
    // kept), or given the MAC of another family: refused either way.
    let login = |email: &str| -> String {
        let r = client()
            .post(kg.url("/api/v1/auth/token"))
            .json(&json!({"email": email, "password": PASSWORD}))
            .send()
            .unwrap();
        r.json::<Value>().unwrap()["refresh_token"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let family_of = |token: &str| {
        let family = redis.bulk(&format!("GET kg-abuse:rt:{{{}}}", sha256_hex(token)));
        format!("kg-abuse:fam:{{{family}}}")
    };
    let dana = login("dana@example.com");
    let key = family_of(&dana);
    let _ = redis.command(&["HSET", &key, "u", "u_alice"]);
    assert_eq!(refresh(&dana).0, 401, "a family moved to another user");
    let dana2 = login("dana@example.com");
    let other = login("dana@example.com");
    let their_mac = redis.bulk(&format!("HGET {} m", family_of(&other)));
    let _ = redis.command(&["HSET", &family_of(&dana2), "m", &their_mac]);
    assert_eq!(refresh(&dana2).0, 401, "another family's MAC");
    // Real families still rotate.
    let r = client()
        .post(kg.url("/api/v1/auth/token"))
        .json(&json!({"email": "alice@example.com", "password": PASSWORD}))
        .send()
        .unwrap();
    let t: Value = r.json().unwrap();
    assert_eq!(refresh(t["refresh_token"].as_str().unwrap()).0, 200);
}

#[test]
fn record_keys_rotate_and_unsigned_families_pass_only_when_allowed() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    let base = with_redis(&config_with_passwords(), &redis.url(), "timeout = \"1s\"");
    let mut kg = Keygate::start(&base, upstream.port);
    let login = login_alice;
    let refresh = refresh_with;
    let signed_by_old = login(&kg);
    let also_old = login(&kg);
    // A new key, the old one kept as previous: old families still rotate
    // (and are signed with the new key as they do).
    let rotated = base.replace(
        &format!("record_key = \"{RECORD_KEY}\""),
        &format!(
            "record_key = \"new-record-key-of-32-bytes-or-more-xx\"\nprevious_record_key_file = \"{}\"",
            kg.dir.path().join("old.key").display()
        ),
    );
    std::fs::write(kg.dir.path().join("old.key"), RECORD_KEY).unwrap();
    kg.stop();
    kg.write_config(&rotated, upstream.port);
    kg.start_again();
    let (status, next) = refresh(&kg, &signed_by_old);
    assert_eq!(status, 200);
    // The previous key dropped: what the new one signed rotates, what only
    // the old one signed does not.
    let new_only = rotated.replace(
        &format!(
            "\nprevious_record_key_file = \"{}\"",
            kg.dir.path().join("old.key").display()
        ),
        "",
    );
    kg.stop();
    kg.write_config(&new_only, upstream.port);
    kg.start_again();
    assert_eq!(refresh(&kg, &next).0, 200);
    assert_eq!(refresh(&kg, &also_old).0, 401);
    // A family written before keygate signed them (no MAC at all): refused,
    // unless accept_unsigned_records; then signed as it rotates.
    let token = login(&kg);
    let family = redis.bulk(&format!("GET kg-abuse:rt:{{{}}}", sha256_hex(&token)));
    let _ = redis.command(&["HDEL", &format!("kg-abuse:fam:{{{family}}}"), "m"]);
    let token2 = login(&kg);
    let family2 = redis.bulk(&format!("GET kg-abuse:rt:{{{}}}", sha256_hex(&token2)));
    let _ = redis.command(&["HDEL", &format!("kg-abuse:fam:{{{family2}}}"), "m"]);
    assert_eq!(refresh(&kg, &token).0, 401);
    kg.stop();
    kg.write_config(
        // [state] is the last section.
        &format!("{new_only}accept_unsigned_records = true\n"),
        upstream.port,
    );
    kg.start_again();
    let (status, signed) = refresh(&kg, &token2);
    assert_eq!(status, 200);
    kg.stop();
    kg.write_config(&new_only, upstream.port);
    kg.start_again();
    assert_eq!(refresh(&kg, &signed).0, 200, "signed at its rotation");
}

#[test]
fn sentinels_are_reached_with_their_own_password_over_tls() {
    let sentinel = GuardedSentinel::start();
    let upstream = Upstream::start();
    let extra = format!(
        "timeout = \"1s\"\ntoken_timeout = \"2s\"\non_error_limits = \"closed\"\n\
         sentinel_password_env = \"KG_SENTINEL_PW\"\nsentinel_tls = true\ntls_ca_file = \"{}\"",
        sentinel.ca.display()
    );
    let cfg = with_redis(&config_with_passwords(), &sentinel.url(), &extra);
    let kg = Keygate::start_with_env(
        &cfg,
        upstream.port,
        &[("KG_SENTINEL_PW", sentinel.password)],
    );
    let r = client()
        .post(kg.url("/api/v1/auth/token"))
        .json(&json!({"email": "alice@example.com", "password": PASSWORD}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let get = client()
        .get(kg.url("/v1/vms"))
        .header("X-API-Key", KEY_DANA)
        .send()
        .unwrap();
    assert_eq!(get.status(), 200);
    // The master holds what keygate wrote through the Sentinel.
    assert!(sentinel.master.bulk("INFO keyspace").contains("keys="));
    // Without the Sentinels' password nothing works.
    let kg = Keygate::start_with_env(&cfg, upstream.port, &[("KG_SENTINEL_PW", "wrong")]);
    let get = client()
        .get(kg.url("/v1/vms"))
        .header("X-API-Key", KEY_DANA)
        .send()
        .unwrap();
    assert_eq!(get.status(), 503);
}

#[test]
fn check_refuses_a_redis_url_that_turns_certificate_checks_off() {
    let dir = tempfile::tempdir().unwrap();
    // Every other line of it valid: only the url can fail the check.
    let text = with_redis(&config(), "rediss://127.0.0.1:6380/0#insecure", "")
        .replace("{listen}", "127.0.0.1:18080")
        .replace("{admin}", "127.0.0.1:19090")
        .replace("{upstream}", "http://127.0.0.1:19000")
        .replace("{keys}", &fixture("keys").display().to_string())
        .replace("{state}", &dir.path().join("state").display().to_string());
    let path = dir.path().join("insecure.toml");
    std::fs::write(&path, &text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["check", "-c"])
        .arg(&path)
        .env("KEYGATE_TEST_HS", HS_SECRET)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let line = text[..text.find("#insecure").unwrap()]
        .matches('\n')
        .count()
        + 1;
    assert!(
        stderr.contains(&format!("{}:{line}:", path.display())) && stderr.contains("#insecure"),
        "{stderr}"
    );
}

#[test]
fn connections_are_capped_in_all_and_per_client_address() {
    let upstream = Upstream::start();
    let cfg = config().replacen(
        "grace_period = \"1s\"",
        "grace_period = \"1s\"\nmax_connections = 4\nmax_connections_per_client = 2",
        1,
    );
    let kg = Keygate::start(&cfg, upstream.port);
    let connect = |local: &str| {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let local: std::net::SocketAddr = format!("{local}:0").parse().unwrap();
        sock.bind(&local.into()).unwrap();
        let remote: std::net::SocketAddr = format!("127.0.0.1:{}", kg.port).parse().unwrap();
        sock.connect(&remote.into()).unwrap();
        let s: TcpStream = sock.into();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    };
    let works = |s: &mut TcpStream| {
        if s.write_all(b"GET /v1/status HTTP/1.1\r\nhost: x\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut buf = [0u8; 512];
        matches!(s.read(&mut buf), Ok(n) if n > 12 && buf.starts_with(b"HTTP/1.1 200"))
    };
    // The start-up check's own connection to the public port must be gone
    // first: it counts until keygate has seen it close.
    wait_for("the start-up probe to close", || {
        kg.metric("keygate_connections_open") == 0.0
    });
    let mut a1 = connect("127.0.0.1");
    let mut a2 = connect("127.0.0.1");
    assert!(works(&mut a1) && works(&mut a2));
    // A third from the same address: closed at once.
    let mut a3 = connect("127.0.0.1");
    assert!(!works(&mut a3), "a third connection from one address");
    assert_eq!(
        kg.metric(r#"keygate_connections_refused_total{reason="max_connections_per_client"}"#),
        1.0
    );
    // Two more from other addresses reach the total of four; a fifth not.
    let mut b1 = connect("127.0.0.3");
    let mut c1 = connect("127.0.0.4");
    assert!(works(&mut b1) && works(&mut c1));
    let mut d1 = connect("127.0.0.5");
    assert!(!works(&mut d1), "a fifth connection in all");
    assert_eq!(
        kg.metric(r#"keygate_connections_refused_total{reason="max_connections"}"#),
        1.0
    );
    assert_eq!(kg.metric("keygate_connections_open"), 4.0);
    // One closes: its place is free again.
    drop(a1);
    wait_for("the freed place", || {
        kg.metric("keygate_connections_open") == 3.0
    });
    let mut a4 = connect("127.0.0.1");
    assert!(works(&mut a4));
}

#[test]
fn an_idle_websocket_tunnel_is_closed_after_the_read_timeout() {
    let upstream = Upstream::start();
    // config() has read_timeout = "2s".
    let kg = Keygate::start(&config(), upstream.port);
    let mut s = TcpStream::connect(("127.0.0.1", kg.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!(
        "GET /v1/ws HTTP/1.1\r\nhost: x\r\nx-api-key: {KEY_CI}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    // Traffic keeps it open past the timeout…
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1000));
        s.write_all(b"ping").unwrap();
        let n = s.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"ping");
    }
    // …silence ends it.
    let quiet = Instant::now();
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the idle tunnel was not closed");
    let waited = quiet.elapsed();
    assert!(
        waited >= Duration::from_millis(1800) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
}
