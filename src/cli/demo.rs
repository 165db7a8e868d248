//! `keygate demo`: the example configuration, a sample VM API behind it on
//! loopback, and curl lines to paste: one that passes and one per denial.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;

use anyhow::{bail, Context};
use pingora::services::listening::Service;

use crate::clock::unix_now;
use crate::issue::sign_access_token;
use crate::policy::Policy;
use crate::proxy::sample_upstream::SampleVmApi;

/// The example file, built in so `keygate demo` works from any directory.
pub const EXAMPLE_CONFIG: &str = include_str!("../../config.example.toml");

/// The API keys whose hashes config.example.toml lists: (id, key, sha256).
/// They are public, so `check` and `run` warn wherever they appear.
pub const DEMO_KEYS: &[(&str, &str, &str)] = &[
    (
        "deploy-bot",
        "vmc_demo_deploybot_00000000000000000000000000000",
        "83a5670671ec9eede5d72960a3915e0aed33003c307c3a4b12630c369b225cb4",
    ),
    (
        "ci-runner",
        "vmc_demo_cirunner_00000000000000000000000000000",
        "f45f742f889dfe37f69fc801d1e39cad933da5f317c762a34b1b2d028643c78d",
    ),
    (
        "office-only",
        "vmc_demo_officeonly_0000000000000000000000000000",
        "269824a1252725a94bae9743d73233fe756ddb8e16ce2f286f0379ede0a43cca",
    ),
];

/// Ids of the policy's API keys that are demo keys.
pub fn demo_keys_in(policy: &Policy) -> Vec<&str> {
    policy
        .api_keys
        .iter()
        .filter(|k| {
            DEMO_KEYS
                .iter()
                .any(|(_, _, h)| hex::encode(k.sha256) == *h)
        })
        .map(|k| &*k.id)
        .collect()
}

pub fn run(config: Option<PathBuf>) -> anyhow::Result<()> {
    let path = match config {
        Some(p) => p,
        None if PathBuf::from("config.example.toml").exists() => {
            PathBuf::from("config.example.toml")
        }
        None => {
            let dir = std::env::temp_dir().join("keygate-demo");
            std::fs::create_dir_all(&dir).context("creating the demo directory")?;
            let file = dir.join("keygate.toml");
            std::fs::write(&file, EXAMPLE_CONFIG).context("writing the demo configuration")?;
            file
        }
    };
    let own_secret = std::env::var_os("KEYGATE_JWT_SECRET").is_some();
    if !own_secret {
        // A fresh secret per demo run; set before any thread exists.
        std::env::set_var("KEYGATE_JWT_SECRET", super::generate_api_key("demo_"));
    }
    let compiled = super::load(&path)?;
    let policy = compiled.policy;
    super::init_tracing(&policy);

    let upstream = policy.upstream.endpoint.addr;
    if !upstream.ip().is_loopback() || policy.upstream.endpoint.tls {
        bail!(
            "the demo serves its sample API at upstream.url, which must be http://127.0.0.1:PORT (it is {})",
            policy.upstream.endpoint.url
        );
    }
    for (what, addr) in [
        ("listen", policy.server.listen),
        ("admin_listen", policy.server.admin_listen),
        ("upstream", upstream),
    ] {
        TcpListener::bind(addr).with_context(|| {
            format!(
                "{what} address {addr} is in use; stop what holds it or edit {}",
                path.display()
            )
        })?;
    }

    print_walkthrough(&policy, own_secret)?;
    let extra: crate::proxy::Extra = Box::new(move |server| {
        let mut api = Service::new("sample VM API".to_string(), SampleVmApi);
        api.add_tcp(&upstream.to_string());
        api.threads = Some(1);
        server.add_service(api);
    });
    crate::proxy::serve(&path, policy, Some(extra))
}

fn print_walkthrough(policy: &Policy, own_secret: bool) -> anyhow::Result<()> {
    let base = public_base(policy.server.listen);
    let now = unix_now();
    let user = |email: &str| {
        policy
            .user_by_email(email)
            .map(|(idx, _)| idx)
            .with_context(|| format!("the demo expects user {email} in the example configuration"))
    };
    let alice = user("alice@example.com")?;
    let bob = user("bob@example.com")?;
    let (alice_token, _) = sign_access_token(policy, alice, now, now, 24 * 3600)?;
    let (bob_token, _) = sign_access_token(policy, bob, now, now, 24 * 3600)?;
    let (expired, _) = sign_access_token(policy, alice, now - 2 * 86400, now - 2 * 86400, 3600)?;
    let key = |id: &str| {
        DEMO_KEYS
            .iter()
            .find(|(k, _, _)| *k == id)
            .map_or("", |(_, key, _)| *key)
    };

    println!(
        r#"
keygate demo: proxying {base} -> sample VM API at http://{upstream}
admin: http://{admin}/metrics  /healthz  /readyz

{secret_note}
Tokens minted for this run (HS256, kid from the example, valid 24 h):
  export ALICE='{alice_token}'
  export BOB='{bob_token}'

Passes (200):
  curl -s -X POST -H 'Content-Type: application/json' -d '{{"email":"alice@example.com","password":"alice-demo-password"}}' {base}/api/v1/auth/token
  curl -s {base}/v1/status                                   # public route
  curl -s -H "Authorization: Bearer $ALICE" {base}/v1/vms     # JWT, alice holds vms:read
  curl -s -H "X-API-Key: {deploy}" {base}/v1/vms
  curl -s -X DELETE -H "Authorization: Bearer $ALICE" {base}/v1/vms/vm-1

Refused:
  curl -s {base}/v1/vms                                                   # 401 missing_credentials
  curl -s -H "Authorization: Bearer not.a.jwt" {base}/v1/vms              # 401 invalid_token
  curl -s -H "Authorization: Bearer {expired}" {base}/v1/vms   # 401 token_expired
  curl -s -H "X-API-Key: vmc_not_a_real_key" {base}/v1/vms                # 401 invalid_api_key
  curl -s -X DELETE -H "Authorization: Bearer $BOB" {base}/v1/vms/vm-1    # 403 insufficient_permissions
  curl -s -H "X-API-Key: {office}" {base}/v1/vms  # 403 ip_not_allowed
  curl -s -H "Authorization: Bearer $ALICE" {base}/admin/users            # 403 forbidden

Ctrl-C stops the demo.
"#,
        upstream = policy.upstream.endpoint.addr,
        admin = policy.server.admin_listen,
        secret_note = if own_secret {
            "JWT secret: KEYGATE_JWT_SECRET from your environment (tokens survive restarts, and\n`KEYGATE_JWT_SECRET=… keygate explain -c config.example.toml --token …` checks them)."
        } else {
            "JWT secret: a fresh random one for this run (set KEYGATE_JWT_SECRET to keep tokens\nacross runs and to check them with `keygate explain --token`)."
        },
        deploy = key("deploy-bot"),
        office = key("office-only"),
    );
    Ok(())
}

fn public_base(listen: SocketAddr) -> String {
    if listen.ip().is_unspecified() {
        format!("http://127.0.0.1:{}", listen.port())
    } else {
        format!("http://{listen}")
    }
}
