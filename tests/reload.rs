//! Live reload: every trigger, broken files, the effect on credentials in
//! flight, and reloads under constant load.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

fn start() -> (Upstream, Keygate) {
    let upstream = Upstream::start();
    let kg = Keygate::start(&config(), upstream.port);
    (upstream, kg)
}

fn status_of(_kg: &Keygate, request: reqwest::blocking::RequestBuilder) -> u16 {
    request.send().unwrap().status().as_u16()
}

/// Poll until `ok`, failing after `limit`. Returns how long it took.
fn within(limit: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "not within {limit:?}");
        std::thread::sleep(Duration::from_millis(25));
    }
    start.elapsed()
}

/// The running file with `from` replaced by `to` (which must change it).
fn edited(kg: &Keygate, from: &str, to: &str) -> String {
    let text = std::fs::read_to_string(kg.config_path()).unwrap();
    let out = text.replacen(from, to, 1);
    assert_ne!(out, text, "{from:?} not in the config");
    out
}

/// Write by rename, as editors do.
fn write_atomically(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

const TWO_SECONDS: Duration = Duration::from_secs(2);

#[test]
fn file_replaced_by_rename_reloads_and_a_disabled_key_fails_at_once() {
    let (_upstream, kg) = start();
    let key = || {
        client()
            .get(kg.url("/v1/vms"))
            .header("X-API-Key", KEY_DEPLOY)
    };
    assert_eq!(status_of(&kg, key()), 200);
    let text = edited(
        &kg,
        "id = \"deploy-bot\"\n",
        "id = \"deploy-bot\"\ndisabled = true\n",
    );
    write_atomically(&kg.config_path(), &text);
    within(TWO_SECONDS, || status_of(&kg, key()) == 401);
    assert_eq!(
        kg.metric("keygate_config_reloads_total{result=\"success\"}"),
        1.0
    );
}

#[test]
fn file_copied_over_reloads_and_a_removed_key_fails() {
    let (_upstream, kg) = start();
    let key = || client().get(kg.url("/v1/vms")).header("X-API-Key", KEY_CI);
    assert_eq!(status_of(&kg, key()), 200);
    let text = edited(
        &kg,
        &format!("sha256 = \"{}\"", sha256_hex(KEY_CI)),
        &format!("sha256 = \"{}\"", sha256_hex("another-key")),
    );
    // `cp` rewrites the same file in place.
    std::fs::write(kg.config_path(), text).unwrap();
    within(TWO_SECONDS, || status_of(&kg, key()) == 401);
}

#[test]
fn symlink_swap_reloads_like_a_kubernetes_configmap() {
    let (_upstream, kg) = start();
    let dir = kg.dir.path();
    let path = kg.config_path();
    let v1 = std::fs::read_to_string(&path).unwrap();
    let v2 = edited(
        &kg,
        "permissions = [\"vms:read\", \"vms:write\"]",
        "permissions = [\"vms:read\"]",
    );
    // ConfigMap layout: keygate.toml -> ..data/keygate.toml, ..data -> ..v1
    for (name, text) in [("..v1", &v1), ("..v2", &v2)] {
        std::fs::create_dir(dir.join(name)).unwrap();
        std::fs::write(dir.join(name).join("keygate.toml"), text).unwrap();
    }
    let swap = |target: &str| {
        let tmp = dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp).unwrap();
        std::fs::rename(&tmp, dir.join("..data")).unwrap();
    };
    swap("..v1");
    let link = dir.join("keygate.toml.link");
    std::os::unix::fs::symlink("..data/keygate.toml", &link).unwrap();
    std::fs::rename(&link, &path).unwrap();
    let alice = token("u_alice");
    let delete = || client().delete(kg.url("/v1/vms/vm-1")).bearer_auth(&alice);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(status_of(&kg, delete()), 200);
    swap("..v2");
    // A permission taken from the user fails their still-valid JWT with 403.
    within(TWO_SECONDS, || status_of(&kg, delete()) == 403);
}

#[test]
fn later_tokens_valid_after_kills_older_tokens() {
    let (_upstream, kg) = start();
    let mut old = claims("u_alice");
    old["iat"] = serde_json::json!(now() - 600);
    let old = sign("hs", &old);
    let get = || client().get(kg.url("/v1/vms")).bearer_auth(&old);
    assert_eq!(status_of(&kg, get()), 200);
    let cutoff =
        humantime::format_rfc3339_seconds(std::time::SystemTime::now() - Duration::from_secs(60));
    let text = edited(
        &kg,
        "id = \"u_alice\"\n",
        &format!("id = \"u_alice\"\ntokens_valid_after = \"{cutoff}\"\n"),
    );
    write_atomically(&kg.config_path(), &text);
    within(TWO_SECONDS, || status_of(&kg, get()) == 401);
    // A token issued after the cutoff still works.
    assert_eq!(
        status_of(
            &kg,
            client()
                .get(kg.url("/v1/vms"))
                .bearer_auth(token("u_alice"))
        ),
        200
    );
}

#[test]
fn tier_change_in_the_file_applies_its_rate() {
    let (_upstream, kg) = start();
    let dana = token("u_dana");
    let get = || client().get(kg.url("/v1/vms")).bearer_auth(&dana);
    for _ in 0..100 {
        assert_eq!(status_of(&kg, get()), 200);
    }
    assert_eq!(status_of(&kg, get()), 429);
    let text = edited(
        &kg,
        "id = \"u_dana\"\ntier = \"free\"",
        "id = \"u_dana\"\ntier = \"enterprise\"",
    );
    write_atomically(&kg.config_path(), &text);
    within(TWO_SECONDS, || status_of(&kg, get()) == 200);
}

#[test]
fn broken_file_keeps_the_old_policy_and_says_why_everywhere() {
    let (_upstream, kg) = start();
    let text = edited(&kg, "tier = \"pro\"", "tier = \"platinum\"");
    write_atomically(&kg.config_path(), &text);
    within(TWO_SECONDS, || {
        kg.metric("keygate_config_reloads_total{result=\"failure\"}") == 1.0
    });
    assert_eq!(kg.metric("keygate_config_last_reload_success"), 0.0);
    let ready: Value = client()
        .get(kg.admin("/readyz"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(ready["last_reload"]["result"], "failure");
    let error = ready["last_reload"]["errors"][0]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        error.contains("keygate.toml:") && error.contains("unknown tier \"platinum\""),
        "{error}"
    );
    assert!(kg.stderr().contains("unknown tier \"platinum\""));
    // Still serving under the old policy.
    let alice = client()
        .get(kg.url("/v1/vms"))
        .bearer_auth(token("u_alice"))
        .send()
        .unwrap();
    assert_eq!(alice.status(), 200);
    // The same file again via POST /reload: 422 with the errors.
    let resp = client().post(kg.admin("/reload")).send().unwrap();
    assert_eq!(resp.status(), 422);
    // Fixing the file recovers.
    let fixed = std::fs::read_to_string(kg.config_path())
        .unwrap()
        .replace("platinum", "pro");
    write_atomically(&kg.config_path(), &fixed);
    within(TWO_SECONDS, || {
        kg.metric("keygate_config_last_reload_success") == 1.0
    });
}

#[test]
fn fifty_reloads_under_constant_load_fail_no_request() {
    let (_upstream, kg) = start();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let url = kg.url("/v1/vms");
    let workers: Vec<_> = (0..4)
        .map(|i| {
            let (url, stop) = (url.clone(), stop.clone());
            let alice = token("u_alice");
            std::thread::spawn(move || {
                let c = client();
                let mut statuses = std::collections::BTreeMap::new();
                // Bounded in count as well as by the reloads' end.
                for n in 0..20_000 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let r = if (n + i) % 2 == 0 {
                        c.get(&url).bearer_auth(&alice)
                    } else {
                        c.get(&url).header("X-API-Key", KEY_CI)
                    };
                    let status = r.send().map(|r| r.status().as_u16()).unwrap_or(0);
                    *statuses.entry(status).or_insert(0u32) += 1;
                }
                statuses
            })
        })
        .collect();
    let original = std::fs::read_to_string(kg.config_path()).unwrap();
    let path = kg.config_path();
    for i in 0..50 {
        let text = if i % 2 == 0 {
            // Valid, and different each time: carol flips between two emails.
            original.replace("carol@example.com", &format!("carol{i}@example.com"))
        } else {
            original.replace("[tiers.free]", "[tiers.free")
        };
        std::fs::write(&path, text).unwrap();
        let expected = if i % 2 == 0 { 200 } else { 422 };
        assert_eq!(
            client().post(kg.admin("/reload")).send().unwrap().status(),
            expected,
            "reload {i}"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = std::collections::BTreeMap::new();
    for w in workers {
        for (status, n) in w.join().unwrap() {
            *total.entry(status).or_insert(0) += n;
        }
    }
    let served: u32 = total.values().sum();
    assert!(served > 100, "too little load to mean anything: {total:?}");
    assert_eq!(
        total.keys().copied().collect::<Vec<_>>(),
        vec![200],
        "{total:?}"
    );
    // The file watcher may add reloads of its own between ours.
    assert!(kg.metric("keygate_config_reloads_total{result=\"success\"}") >= 25.0);
    assert!(kg.metric("keygate_config_reloads_total{result=\"failure\"}") >= 25.0);
}

/// A reload rejected because a file it reads is gone (SIGHUP here; the
/// configuration itself unchanged) is not repeated by the file watcher, and
/// putting the file back is acted on without touching the configuration.
#[test]
fn a_rejected_reload_is_not_repeated_and_fixing_its_file_is_acted_on() {
    let upstream = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin-token");
    let secret = "an-admin-token-long-enough-0123456789abcdef";
    std::fs::write(&token, secret).unwrap();
    let config = config().replacen(
        "[server]\n",
        &format!("[server]\nadmin_token_file = \"{}\"\n", token.display()),
        1,
    );
    let kg = Keygate::start(&config, upstream.port);
    let failed = || kg.metric(r#"keygate_config_reloads_total{result="failure"}"#);
    let applied = || kg.metric(r#"keygate_config_reloads_total{result="success"}"#);

    std::fs::remove_file(&token).unwrap();
    kg.signal("HUP");
    within(Duration::from_secs(10), || failed() >= 1.0);
    // Three watcher passes: none of them tries it again.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(failed(), 1.0, "the rejected reload was repeated");
    assert!(kg.stderr().contains("admin-token"), "{}", kg.stderr());

    let before = applied();
    std::fs::write(&token, secret).unwrap();
    within(Duration::from_secs(10), || applied() > before);
    assert_eq!(failed(), 1.0);
    assert!(!kg.stderr().contains(secret), "the token was logged");
}
