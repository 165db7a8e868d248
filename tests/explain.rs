//! `keygate explain` prints the proxy's own decision: for an allow and for
//! every denial kind, its verdict equals what the running proxy answers.

mod support;

use std::process::Command;

use support::*;

struct Case {
    what: &'static str,
    method: &'static str,
    path: &'static str,
    token: Option<String>,
    api_key: Option<&'static str>,
    /// The status the proxy answers and the line explain ends with.
    status: u16,
    decision: &'static str,
}

fn cases() -> Vec<Case> {
    let mut expired = claims("u_alice");
    expired["exp"] = serde_json::json!(now() - 3600);
    let case = |what, method, path, token: Option<String>, api_key, status, decision| Case {
        what,
        method,
        path,
        token,
        api_key,
        status,
        decision,
    };
    vec![
        case(
            "allow",
            "GET",
            "/v1/vms",
            Some(token("u_alice")),
            None,
            200,
            "ALLOW",
        ),
        case("public", "GET", "/v1/status", None, None, 200, "ALLOW"),
        case(
            "no credential",
            "GET",
            "/v1/vms",
            None,
            None,
            401,
            "DENY 401 missing_credentials",
        ),
        case(
            "bad token",
            "GET",
            "/v1/vms",
            Some("a.b.c".into()),
            None,
            401,
            "DENY 401 invalid_token",
        ),
        case(
            "expired",
            "GET",
            "/v1/vms",
            Some(sign("hs", &expired)),
            None,
            401,
            "DENY 401 token_expired",
        ),
        case(
            "bad key",
            "GET",
            "/v1/vms",
            None,
            Some("vmc_nope"),
            401,
            "DENY 401 invalid_api_key",
        ),
        case(
            "key allowlist",
            "GET",
            "/v1/vms",
            None,
            Some(KEY_OFFICE),
            403,
            "DENY 403 ip_not_allowed",
        ),
        case(
            "permission",
            "DELETE",
            "/v1/vms/vm-1",
            None,
            Some(KEY_DEPLOY),
            403,
            "DENY 403 insufficient_permissions",
        ),
        case(
            "deny route",
            "GET",
            "/admin/x",
            None,
            Some(KEY_CI),
            403,
            "DENY 403 forbidden",
        ),
        case(
            "bad escape",
            "GET",
            "/v1/%zz",
            None,
            Some(KEY_CI),
            400,
            "DENY 400 invalid_request",
        ),
    ]
}

#[test]
fn explain_matches_the_running_proxy_for_every_kind_of_decision() {
    let upstream = Upstream::start();
    let kg = Keygate::start(&config(), upstream.port);
    for c in cases() {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keygate"));
        cmd.args(["explain", "-c"])
            .arg(kg.config_path())
            .args(["--method", c.method, "--path", c.path, "--ip", "127.0.0.1"])
            .env("KEYGATE_TEST_HS", HS_SECRET);
        if let Some(t) = &c.token {
            cmd.args(["--token", t]);
        }
        if let Some(k) = c.api_key {
            cmd.args(["--api-key", k]);
        }
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout.lines().last().unwrap_or_default();
        assert!(
            last.starts_with(&format!("decision      {}", c.decision)),
            "{}: {stdout}{}",
            c.what,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            out.status.code(),
            Some(if c.status == 200 { 0 } else { 1 }),
            "{}",
            c.what
        );

        // The proxy, asked the same thing, answers the same.
        let method = reqwest::Method::from_bytes(c.method.as_bytes()).unwrap();
        let mut req = client().request(method, kg.url(c.path));
        if let Some(t) = &c.token {
            req = req.bearer_auth(t);
        }
        if let Some(k) = c.api_key {
            req = req.header("X-API-Key", k);
        }
        assert_eq!(
            req.send().unwrap().status().as_u16(),
            c.status,
            "{}",
            c.what
        );
    }
}

#[test]
fn explain_shows_each_step() {
    let upstream = Upstream::start();
    let kg = Keygate::start(&config(), upstream.port);
    let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["explain", "-c"])
        .arg(kg.config_path())
        .args([
            "--method",
            "DELETE",
            "--path",
            "/v1/vms/vm-1",
            "--ip",
            "127.0.0.2",
        ])
        .args(["--header", "X-Forwarded-For: 203.0.113.9"])
        .args(["--api-key", KEY_DEPLOY])
        .env("KEYGATE_TEST_HS", HS_SECRET)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "client ip     203.0.113.9 (from X-Forwarded-For, via trusted proxy 127.0.0.2)",
        "route         \"/v1/vms/{id}\" [DELETE]: authenticated, needs vms:write",
        "credential    pass (api_key)",
        "principal     key \"deploy-bot\" owned by user \"u_alice\" <alice@example.com>",
        "ip rule       pass",
        "permissions   FAIL: needs [vms:write], holds [vms:read]",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    // A config error is exit 2, distinct from a denial.
    let bad = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["explain", "-c", "/nonexistent.toml", "--path", "/"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}
