//! The command line as an operator uses it.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{client, config, free_port, sha256_hex, Keygate, Upstream, HS_SECRET};

fn keygate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keygate"))
}

fn example() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml")).unwrap()
}

#[test]
fn check_reports_several_errors_of_one_file_with_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let bad = example()
        .replace(
            "trusted_proxies = []",
            "trusted_proxies = [\"10.0.0.300/8\"]",
        )
        .replace(
            "tier = \"free\"\npermissions = [\"vms:read\"]\n\n# API keys",
            "tier = \"silver\"\npermissions = [\"vms:read\"]\n\n# API keys",
        )
        .replace(
            "user = \"alice@example.com\"",
            "user = \"mallory@example.com\"",
        );
    std::fs::write(&path, &bad).unwrap();
    let out = keygate()
        .args(["check", "-c"])
        .arg(&path)
        .env("KEYGATE_JWT_SECRET", "x".repeat(40))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let file = path.display().to_string();
    let line_of = |needle: &str| bad[..bad.find(needle).unwrap()].matches('\n').count() + 1;
    for (needle, words) in [
        ("\"10.0.0.300/8\"", "not an address or CIDR"),
        ("\"silver\"", "unknown tier \"silver\""),
        ("\"mallory@example.com\"", "unknown user"),
    ] {
        let prefix = format!("{file}:{}:", line_of(needle));
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with(&prefix) && l.contains(words)),
            "no {words:?} at {prefix} in:\n{stderr}"
        );
    }
}

#[test]
fn check_accepts_the_example_and_prints_a_summary() {
    let out = keygate()
        .arg("check")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"))
        .env("KEYGATE_JWT_SECRET", "x".repeat(40))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("OK: 2 users, 3 api keys, 6 routes, 4 tiers, 1 jwt keys"),
        "{stdout}"
    );
    // The demo keys are public: check says so.
    assert!(String::from_utf8_lossy(&out.stderr).contains("public demo key"));
}

#[test]
fn check_without_the_secret_says_which_variable_is_missing() {
    let out = keygate()
        .args([
            "check",
            "-c",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"),
        ])
        .env_remove("KEYGATE_JWT_SECRET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("KEYGATE_JWT_SECRET is not set"));
}

#[test]
fn new_api_key_appended_with_shell_redirection_gives_a_policy_that_accepts_the_key() {
    let upstream = Upstream::start();
    let kg = Keygate::start(&config(), upstream.port);
    let path = kg.config_path();
    let before = std::fs::read_to_string(&path).unwrap();
    let key_file = kg.dir.path().join("build-bot.key");
    // `keygate new-api-key … >> keygate.toml`: stdout is the block alone.
    let out = keygate()
        .args(["new-api-key", "--prefix", "acme_", "--id", "build-bot"])
        .args(["--tier", "pro", "--permissions", "vms:read,vms:write"])
        .args(["--ip-allow", "127.0.0.1/32", "--key-file"])
        .arg(&key_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let block = String::from_utf8(out.stdout).unwrap();
    let key = std::fs::read_to_string(&key_file)
        .unwrap()
        .trim()
        .to_string();
    assert!(key.starts_with("acme_") && key.len() >= 5 + 43, "{key}");
    assert!(!block.contains(&key), "the key itself never goes to stdout");
    assert!(
        block.contains(&format!("sha256 = \"{}\"", sha256_hex(&key))),
        "{block}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    std::fs::write(&path, before + &block).unwrap();
    let check = keygate()
        .args(["check", "-c"])
        .arg(&path)
        .env("KEYGATE_TEST_HS", HS_SECRET)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    // The running keygate picks the file up and accepts the key.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let status = client()
            .get(kg.url("/v1/vms"))
            .header("X-API-Key", &key)
            .send()
            .unwrap()
            .status();
        if status == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still {status}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    // Without --key-file the key goes to stderr; two keys never repeat.
    let a = keygate()
        .args(["new-api-key", "--user", "alice@example.com"])
        .output()
        .unwrap();
    let b = keygate()
        .args(["new-api-key", "--user", "alice@example.com"])
        .output()
        .unwrap();
    assert!(a.status.success());
    let key_of = |o: &std::process::Output| {
        String::from_utf8_lossy(&o.stderr)
            .lines()
            .find(|l| l.starts_with("vmc_"))
            .unwrap()
            .to_string()
    };
    assert_ne!(key_of(&a), key_of(&b));
    assert!(String::from_utf8_lossy(&a.stdout).contains("user = \"alice@example.com\""));
    // A key with neither owner nor tier would fail `check`: refused here.
    let none = keygate().arg("new-api-key").output().unwrap();
    assert_eq!(none.status.code(), Some(2), "clap refuses it");
    assert!(none.stdout.is_empty());
}

#[test]
fn hash_password_prints_an_argon2id_phc_string() {
    let mut child = keygate()
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"correct horse\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let phc = String::from_utf8(out.stdout).unwrap();
    assert!(phc.starts_with("$argon2id$v=19$"), "{phc}");
    use argon2::PasswordVerifier;
    let parsed = argon2::PasswordHash::new(phc.trim()).unwrap();
    assert!(argon2::Argon2::default()
        .verify_password(b"correct horse", &parsed)
        .is_ok());
}

/// Start the demo on free ports, then run every curl line it prints exactly
/// as printed and check the status its comment promises.
#[test]
fn demo_curl_lines_behave_as_printed() {
    if Command::new("curl").arg("--version").output().is_err() {
        panic!("this test runs the demo's curl lines and needs curl (.ci/run installs it)");
    }
    let (listen, admin, upstream) = (free_port(), free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("demo.toml");
    std::fs::write(
        &config,
        example()
            .replace("127.0.0.1:8080", &format!("127.0.0.1:{listen}"))
            .replace("127.0.0.1:9090", &format!("127.0.0.1:{admin}"))
            .replace("127.0.0.1:9000", &format!("127.0.0.1:{upstream}"))
            .replace(
                "state_dir = \"./keygate-state\"",
                &format!("state_dir = {:?}", dir.path().join("state")),
            ),
    )
    .unwrap();
    let mut demo = keygate()
        .args(["demo", "-c"])
        .arg(&config)
        .env_remove("KEYGATE_JWT_SECRET")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = demo.stdout.take().unwrap();
    let mut printed = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        let done = line.contains("Ctrl-C");
        printed.push(line);
        if done {
            break;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while client()
        .get(format!("http://127.0.0.1:{admin}/healthz"))
        .send()
        .is_err()
    {
        assert!(Instant::now() < deadline, "demo did not start");
        std::thread::sleep(Duration::from_millis(50));
    }

    let exports: Vec<&str> = printed
        .iter()
        .filter_map(|l| l.trim().strip_prefix("export "))
        .collect();
    assert_eq!(exports.len(), 2, "{printed:#?}");
    let mut section_status = 0;
    let mut ran = 0;
    for line in &printed {
        if line.starts_with("Passes (200)") {
            section_status = 200;
        }
        let Some(cmd) = line.trim().strip_prefix("curl ") else {
            continue;
        };
        let (cmd, comment) = cmd.split_once('#').unwrap_or((cmd, ""));
        let expected: u16 = comment
            .split_whitespace()
            .next()
            .and_then(|w| w.parse().ok())
            .unwrap_or(section_status);
        let script = format!(
            "export {}; export {}; curl -o /dev/null -w '%{{http_code}}' {cmd}",
            exports[0], exports[1]
        );
        let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
        let status: u16 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        assert_eq!(status, expected, "{line}");
        ran += 1;
    }
    assert_eq!(ran, 12, "{printed:#?}");
    let _ = demo.kill();
    let _ = demo.wait();
}

/// The example documents [[webhooks]], [webhook_relay] and [state] as
/// comments (they need secrets a fresh checkout does not have); uncommented,
/// they are valid.
#[test]
fn the_commented_sections_of_the_example_are_valid() {
    let text = example();
    let start = text.find("# [[webhooks]]").expect("webhooks documented");
    let uncommented: Vec<String> = text[start..]
        .lines()
        .map(|l| {
            let setting = l.strip_prefix("# ").filter(|rest| {
                rest.starts_with('[')
                    || (rest.contains(" = ")
                        && rest.chars().next().is_some_and(|c| c.is_ascii_lowercase()))
            });
            setting.map_or_else(|| l.to_string(), str::to_string)
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full.toml");
    std::fs::write(
        &path,
        format!("{}{}", &text[..start], uncommented.join("\n")),
    )
    .unwrap();
    let out = keygate()
        .args(["check", "-c"])
        .arg(&path)
        .env("KEYGATE_JWT_SECRET", "x".repeat(40))
        .env("BILLING_WEBHOOK_SECRET", "a")
        .env("BILLING_WEBHOOK_SECRET_NEXT", "b")
        .env("CUST42_WEBHOOK_SECRET", "c")
        .env("KEYGATE_REDIS_PASSWORD", "d")
        .env("KEYGATE_RECORD_KEY", "e".repeat(32))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
