//! What an operator sees: the access log, metrics, reload reports, CLI
//! edges, log formatting and shutdown. Each test here failed on the main of
//! 2026-11-29 (issue 13's list of bugs).

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn access_lines(kg: &Keygate) -> Vec<Value> {
    kg.stdout()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON access line"))
        .collect()
}

/// Bug 1: login, refresh, revoke and JWKS lines carried no client IP and
/// no principal, so failed logins could not be traced to an address.
#[test]
fn every_access_line_has_the_client_ip_and_the_same_fields() {
    let upstream = Upstream::start();
    let kg = Keygate::start(&config_with_passwords(), upstream.port);
    let post = |path: &str, body: Value| {
        client()
            .post(kg.url(path))
            .header("User-Agent", "ops-test/1.0")
            .json(&body)
            .send()
            .unwrap()
    };
    let bad = post(
        "/api/v1/auth/token",
        json!({"email": "alice@example.com", "password": "wrong"}),
    );
    assert_eq!(bad.status(), 401);
    let good: Value = post(
        "/api/v1/auth/token",
        json!({"email": "alice@example.com", "password": PASSWORD}),
    )
    .json()
    .unwrap();
    let r1 = good["refresh_token"].as_str().unwrap();
    let r2: Value = post("/api/v1/auth/refresh", json!({"refresh_token": r1}))
        .json()
        .unwrap();
    post(
        "/api/v1/auth/revoke",
        json!({"refresh_token": r2["refresh_token"]}),
    );
    client()
        .get(kg.url("/.well-known/jwks.json"))
        .send()
        .unwrap();
    let forwarded = client()
        .put(kg.url("/v1/vms/vm-1"))
        .header("X-API-Key", KEY_DEPLOY)
        .body("0123456789")
        .send()
        .unwrap();
    assert_eq!(forwarded.status(), 200);
    wait_until("six access lines", || access_lines(&kg).len() >= 6);

    // Each proxy thread hands over its own lines, so lines of requests
    // served by different threads may come out of order (as with nginx's
    // buffered access_log): find them by what they are, not by position.
    let all = access_lines(&kg);
    let find = |route: &str, status: u64| {
        all.iter()
            .find(|l| l["route"] == route && l["status"] == status)
            .unwrap_or_else(|| panic!("no {route} {status} line in {all:?}"))
            .clone()
    };
    let lines = [
        find("auth:token", 401),
        find("auth:token", 200),
        find("auth:refresh", 200),
        find("auth:revoke", 200),
        find("auth:jwks", 200),
        find("/v1/vms/{id}", 200),
    ];
    let fields: Vec<&str> = lines[0]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for line in &lines {
        let keys: Vec<&str> = line
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, fields, "every line has the same fields: {line}");
        assert_eq!(line["client_ip"], "127.0.0.1", "{line}");
        assert!(line["bytes_out"].as_u64().unwrap() > 0, "{line}");
    }
    for f in [
        "client_ip",
        "principal",
        "method",
        "route",
        "status",
        "upstream_status",
        "bytes_in",
        "bytes_out",
        "user_agent",
        "request_id",
        "total_ms",
        "upstream_ms",
    ] {
        assert!(fields.contains(&f), "no {f} in {fields:?}");
    }
    assert_eq!(lines[0]["code"], "invalid_credentials");
    assert_eq!(lines[0]["user_agent"], "ops-test/1.0");
    assert!(lines[0]["bytes_in"].as_u64().unwrap() > 20, "{}", lines[0]);
    assert_eq!(lines[1]["principal"], "u_alice", "the login's user");
    assert_eq!(lines[2]["principal"], "u_alice", "the refresh's user");
    assert_eq!(lines[4]["route"], "auth:jwks");
    let last = &lines[5];
    assert_eq!(last["bytes_in"], 10, "{last}");
    assert_eq!(last["upstream_status"], 200, "{last}");
    assert_eq!(last["principal"], "u_alice", "{last}");
}

/// Bug 1, second half: the reuse warning named nobody.
#[test]
fn the_refresh_reuse_warning_names_the_user_the_address_and_the_request() {
    let upstream = Upstream::start();
    let kg = Keygate::start(&config_with_passwords(), upstream.port);
    let post = |path: &str, body: Value, id: &str| {
        client()
            .post(kg.url(path))
            .header("X-Request-Id", id)
            .json(&body)
            .send()
            .unwrap()
    };
    let t: Value = post(
        "/api/v1/auth/token",
        json!({"email": "alice@example.com", "password": PASSWORD}),
        "login-1",
    )
    .json()
    .unwrap();
    let r1 = t["refresh_token"].as_str().unwrap();
    post(
        "/api/v1/auth/refresh",
        json!({"refresh_token": r1}),
        "rot-1",
    );
    let again = post(
        "/api/v1/auth/refresh",
        json!({"refresh_token": r1}),
        "replay-1",
    );
    assert_eq!(again.status(), 401);
    wait_until("the reuse warning", || {
        kg.stderr().contains("presented again")
    });
    let line = kg
        .stderr()
        .lines()
        .find(|l| l.contains("presented again"))
        .unwrap()
        .to_string();
    for needle in ["u_alice", "127.0.0.1", "replay-1"] {
        assert!(line.contains(needle), "no {needle} in {line}");
    }
    assert!(!line.contains(r1), "the token itself is never logged");
}

/// Bug 2: the README's "added latency" subtracted quantiles of two
/// populations. Now one histogram holds it, with buckets fine enough.
#[test]
fn the_added_latency_is_one_histogram_with_microsecond_buckets() {
    let upstream = Upstream::start();
    let kg = Keygate::start(&config(), upstream.port);
    for _ in 0..20 {
        let r = client()
            .get(kg.url("/v1/vms"))
            .header("X-API-Key", KEY_DEPLOY)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(kg.metric("keygate_added_latency_seconds_count"), 20.0);
    assert!(kg.metric("keygate_added_latency_seconds_bucket{le=\"0.00005\"}") >= 0.0);
    assert_eq!(
        kg.metric(
            r#"keygate_requests_total{code="200",method="GET",route="/v1/vms",status="2xx"}"#
        ),
        20.0
    );
    // Known series exist at 0 before their first event.
    assert_eq!(
        kg.metric(r#"keygate_upstream_errors_total{kind="timeout"}"#),
        0.0
    );
    assert_eq!(
        kg.metric(r#"keygate_auth_denials_total{code="token_expired"}"#),
        0.0
    );
    assert_eq!(kg.metric(r#"keygate_rate_limited_total{tier="free"}"#), 0.0);
    assert_eq!(
        kg.metric(r#"keygate_config_reloads_total{result="failure"}"#),
        0.0
    );
    let text = client()
        .get(kg.admin("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        text.contains("process_resident_memory_bytes"),
        "process metrics"
    );
    assert!(text.contains("process_start_time_seconds"));
    let build = text
        .lines()
        .find(|l| l.starts_with("keygate_build_info{"))
        .unwrap();
    assert!(
        build.contains("commit=") && build.contains("rustc=\"rustc "),
        "{build}"
    );
}

/// Bug 3: "restart needed" was reported once, then forgotten although the
/// process still ran the old value.
#[test]
fn restart_needed_settings_stay_reported_until_a_restart() {
    let upstream = Upstream::start();
    let kg = Keygate::start(&config(), upstream.port);
    kg.write_config(
        &config().replace("threads = 2", "threads = 3"),
        upstream.port,
    );
    let reload = || -> Value {
        client()
            .post(kg.admin("/reload"))
            .send()
            .unwrap()
            .json()
            .unwrap()
    };
    assert_eq!(reload()["restart_needed_for"], json!(["server.threads"]));
    // Again, and after an unrelated edit: still pending.
    assert_eq!(reload()["restart_needed_for"], json!(["server.threads"]));
    let ready: Value = client()
        .get(kg.admin("/readyz"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        ready["restart_needed_for"],
        json!(["server.threads"]),
        "{ready}"
    );
    // Back to the running value: nothing pending.
    kg.write_config(&config(), upstream.port);
    assert_eq!(reload()["restart_needed_for"], json!([]));
}

fn verify(timestamp: &str) -> Option<i32> {
    let payload = b"{\"event\":\"x\"}";
    let sign = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args([
            "webhook",
            "sign",
            "--secret-env",
            "S",
            "--timestamp",
            "1000",
        ])
        .env("S", "whsec")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut sign = sign;
    sign.stdin.take().unwrap().write_all(payload).unwrap();
    let sig = String::from_utf8(sign.wait_with_output().unwrap().stdout).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["webhook", "verify", "--secret-env", "S", "--signature"])
        .arg(sig.trim())
        .args(["--timestamp", timestamp])
        .env("S", "whsec")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // A refusal that needs no body (a stale timestamp) may exit before
    // reading it: a closed pipe here is not the test's failure.
    let _ = child.stdin.take().unwrap().write_all(payload);
    child.wait().unwrap().code()
}

/// Bug 4: `webhook verify` ignored the timestamp's age and took any text.
#[test]
fn webhook_verify_refuses_stale_and_non_numeric_timestamps() {
    assert_eq!(verify("1000"), Some(1), "signed in 1970: stale");
    assert_eq!(verify("abc"), Some(2), "not a timestamp: bad arguments");
}

/// Bug 6: journald stored ANSI colour codes.
#[test]
fn logs_to_a_file_carry_no_colour_codes() {
    let upstream = Upstream::start();
    let kg = Keygate::start(&config(), upstream.port);
    client().post(kg.admin("/reload")).send().unwrap();
    wait_until("a log line", || kg.stderr().contains("keygate serving"));
    let log = kg.stderr();
    assert!(!log.contains('\u{1b}'), "escape codes in:\n{log}");
}

/// Bug 7: a wrong method on an auth endpoint was 400; admin 405s had no
/// `Allow`.
#[test]
fn wrong_methods_are_405_with_allow() {
    let upstream = Upstream::start();
    let kg = Keygate::start(&config(), upstream.port);
    let r = client().get(kg.url("/api/v1/auth/token")).send().unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    let body: Value = r.json().unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");
    let r = client()
        .post(kg.url("/.well-known/jwks.json"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET, HEAD");
    let r = client().get(kg.admin("/reload")).send().unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    let r = client().post(kg.admin("/metrics")).send().unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET, HEAD");
}

/// Bug 8: SIGTERM on an idle instance waited out the whole grace period.
#[test]
fn sigterm_on_an_idle_instance_exits_at_once() {
    let upstream = Upstream::start();
    let mut kg = Keygate::start(
        &config().replace(r#"grace_period = "1s""#, r#"grace_period = "10s""#),
        upstream.port,
    );
    let signalled = Instant::now();
    kg.signal("TERM");
    let status = loop {
        if let Some(status) = kg.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(3),
            "still running 3 s after SIGTERM with nothing in flight"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}

/// systemd `Type=notify`: READY=1 once serving, watchdog pings while the
/// proxy threads turn, STOPPING=1 on SIGTERM.
#[test]
fn systemd_hears_ready_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let upstream = Upstream::start();
    let sock = path.display().to_string();
    let kg = Keygate::start_with_env(
        &config(),
        upstream.port,
        &[
            ("NOTIFY_SOCKET", sock.as_str()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    let mut heard = Vec::new();
    let mut buf = [0u8; 256];
    while !heard.iter().any(|m: &String| m == "WATCHDOG=1") {
        let n = socket.recv(&mut buf).expect("a notification within 5 s");
        heard.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert_eq!(heard[0], "READY=1", "{heard:?}");
    kg.signal("TERM");
    loop {
        let n = socket.recv(&mut buf).expect("STOPPING=1 within 5 s");
        if &buf[..n] == b"STOPPING=1" {
            break;
        }
    }
}

/// `POST /reload` needs the admin token once one is configured.
#[test]
fn reload_needs_the_admin_token_when_one_is_set() {
    let upstream = Upstream::start();
    let cfg = config().replace("[log]", "admin_token_env = \"KG_ADMIN_TOKEN\"\n\n[log]");
    let kg = Keygate::start_with_env(&cfg, upstream.port, &[("KG_ADMIN_TOKEN", "s3cret-admin")]);
    let reload = |auth: Option<&str>| {
        let mut req = client().post(kg.admin("/reload"));
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        req.send().unwrap().status().as_u16()
    };
    assert_eq!(reload(None), 401);
    assert_eq!(reload(Some("Bearer wrong")), 401);
    assert_eq!(reload(Some("Bearer s3cret-admin")), 200);
    // Scrapes and probes stay open.
    let metrics = client().get(kg.admin("/metrics")).send().unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(!kg.stderr().contains("s3cret-admin"));
}

fn keygate_cmd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keygate"));
    c.env("KEYGATE_TEST_HS", HS_SECRET);
    c
}

#[test]
fn check_reports_as_json_and_strict_fails_on_warnings() {
    let upstream = Upstream::start();
    let kg = Keygate::start(&config(), upstream.port);
    let path = kg.config_path();
    // A warning: the admin listener on every address without a token.
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "admin_listen = \"127.0.0.1:",
        "admin_listen = \"0.0.0.0:",
        1,
    );
    std::fs::write(&path, &text).unwrap();
    let out = keygate_cmd()
        .args(["check", "--format", "json", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], true);
    assert_eq!(report["warnings"], 1, "{report}");
    let d = &report["diagnostics"][0];
    assert_eq!(d["severity"], "warning");
    assert!(d["line"].as_u64().unwrap() > 0 && d["column"].as_u64().unwrap() > 0);
    assert!(d["message"].as_str().unwrap().contains("admin_listen"));
    assert!(report["policy"]["routes"].as_u64().is_some());

    let strict = keygate_cmd()
        .args(["check", "--strict", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(strict.status.code(), Some(1));

    std::fs::write(&path, text.replace("[log]", "[log]\nbogus = 1")).unwrap();
    let bad = keygate_cmd()
        .args(["check", "--format", "json", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&bad.stdout).unwrap();
    assert_eq!(report["ok"], false);
    assert!(report["errors"].as_u64().unwrap() >= 1);
}

#[test]
fn version_completions_and_man_page() {
    let v = keygate_cmd().arg("--version").output().unwrap();
    let v = String::from_utf8(v.stdout).unwrap();
    assert!(
        v.starts_with("keygate ") && v.contains("commit ") && v.contains("rustc "),
        "{v}"
    );
    for shell in ["bash", "zsh", "fish"] {
        let out = keygate_cmd().args(["completions", shell]).output().unwrap();
        assert!(out.status.success());
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(script.contains("new-api-key"), "{shell}");
    }
    let man = keygate_cmd().arg("man").output().unwrap();
    let man = String::from_utf8(man.stdout).unwrap();
    assert!(
        man.starts_with(".ie") || man.contains(".TH keygate"),
        "{}",
        &man[..200.min(man.len())]
    );
}

#[test]
fn check_without_secrets_names_the_unset_variables() {
    let upstream = Upstream::start();
    let kg = Keygate::start(&config(), upstream.port);
    let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["check", "--no-secrets", "-c"])
        .arg(kg.config_path())
        .env_remove("KEYGATE_TEST_HS")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("KEYGATE_TEST_HS"), "{stderr}");
    // Without the flag, the same file fails.
    let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["check", "-c"])
        .arg(kg.config_path())
        .env_remove("KEYGATE_TEST_HS")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

/// `include`: API keys in files of their own, picked up live (a new file
/// in the directory counts), errors naming the included file and line.
#[test]
fn included_files_load_live_and_errors_name_them() {
    let upstream = Upstream::start();
    let kg = Keygate::start(&config(), upstream.port);
    let dir = kg.dir.path().join("keys.d");
    std::fs::create_dir(&dir).unwrap();
    let key_block = |id: &str, key: &str| {
        format!(
            "# written by a provisioning tool\n[[api_keys]]\nid = \"{id}\"\nsha256 = \"{}\"\ntier = \"pro\"\npermissions = [\"vms:read\"]\n",
            sha256_hex(key)
        )
    };
    std::fs::write(
        dir.join("a.toml"),
        key_block("tool-a", "vmc_included_a_0123456789"),
    )
    .unwrap();
    kg.write_config(
        &format!("include = [\"keys.d/*.toml\"]\n{}", config()),
        upstream.port,
    );
    let status = |key: &str| {
        client()
            .get(kg.url("/v1/vms"))
            .header("X-API-Key", key)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    wait_until("the included key", || {
        status("vmc_included_a_0123456789") == 200
    });
    assert_eq!(status(KEY_DEPLOY), 200, "the main file's keys stay");
    // A new file in the directory is a change too.
    std::fs::write(
        dir.join("b.toml"),
        key_block("tool-b", "vmc_included_b_0123456789"),
    )
    .unwrap();
    wait_until("the second file", || {
        status("vmc_included_b_0123456789") == 200
    });

    // A broken included file: the running policy stays, and the error
    // names that file, line and column.
    std::fs::write(
        dir.join("c.toml"),
        "[[api_keys]]\nid = \"bad\"\nsha256 = \"xyz\"\ntier = \"pro\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["check", "-c"])
        .arg(kg.config_path())
        .env("KEYGATE_TEST_HS", HS_SECRET)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let expected = format!("{}:3:10:", dir.join("c.toml").display());
    assert!(stderr.contains(&expected), "no {expected} in {stderr}");
    wait_until("the rejected reload", || {
        let ready: Value = client()
            .get(kg.admin("/readyz"))
            .send()
            .unwrap()
            .json()
            .unwrap();
        ready["last_reload"]["result"] == "failure"
    });
    assert_eq!(
        status("vmc_included_b_0123456789"),
        200,
        "the old policy serves on"
    );
    // Only entries belong in an included file.
    std::fs::write(dir.join("c.toml"), "[server]\nthreads = 9\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["check", "-c"])
        .arg(kg.config_path())
        .env("KEYGATE_TEST_HS", HS_SECRET)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("c.toml:1:1: an included file holds only"),
        "{stderr}"
    );
}

/// `keygate config dump`: the files as read, secrets redacted, then the
/// effective settings with defaults filled in.
#[test]
fn config_dump_shows_files_and_defaults_but_no_secret() {
    let upstream = Upstream::start();
    let kg = Keygate::start(&config(), upstream.port);
    let path = kg.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    // An inline secret (check warns about it) must not be printed.
    let inline = text.replacen(
        "secret_env = \"KEYGATE_TEST_HS\"",
        &format!("secret = \"{HS_SECRET}\""),
        1,
    );
    assert_ne!(inline, text, "the test config names KEYGATE_TEST_HS");
    std::fs::write(&path, inline).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["config", "dump", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let dump = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dump.contains(HS_SECRET), "the secret leaked:\n{dump}");
    assert!(dump.contains("secret = \"<redacted>\""), "{dump}");
    assert!(dump.contains("# server.threads = 2"), "{dump}");
    assert!(
        dump.contains("# auth.api_key_header = x-api-key"),
        "defaults filled in:\n{dump}"
    );
    assert!(
        dump.contains("# tiers.free = 100 per 1h, burst 100"),
        "{dump}"
    );
}
