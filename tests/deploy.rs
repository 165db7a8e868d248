//! The deployment files under `deploy/`, held to the real thing: the
//! Kubernetes ConfigMap's policy passes the real binary's `check`, every
//! Grafana panel's query returns data from a real Prometheus scraping a real
//! keygate, and the alert rules pass `promtool` (syntax and unit tests).
//!
//! Needs `python3` with PyYAML, and `prometheus` / `promtool` (Debian:
//! `apt-get install python3-yaml prometheus`). Without them these tests are
//! skipped with a note on stderr, except under CI (`CI` set), where they fail.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Whether the test's outside tool is there. When it is not: outside CI the
/// test is skipped (false, with a note on stderr); under CI it fails.
fn available(what: &str, works: bool, install: &str) -> bool {
    if works {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{what} is not available, and CI must run this test: {install}");
    }
    eprintln!("SKIPPED: {what} is not available ({install} to run this test)");
    false
}

fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

// ------------------------------------------------------------- Kubernetes

/// Loads every YAML file under the directory given as argv[1] (a parse error
/// exits non-zero with the file in the traceback), and prints as JSON each
/// file's document kinds, the `keygate-config` ConfigMap's `keygate.toml`,
/// and the keygate container's environment (name → Secret it comes from).
const K8S_EXTRACT: &str = r#"
import json, os, sys, yaml

files, policy, env = {}, None, {}
for dirpath, _, names in os.walk(sys.argv[1]):
    for name in sorted(names):
        if not name.endswith((".yaml", ".yml")):
            continue
        path = os.path.join(dirpath, name)
        try:
            with open(path) as f:
                docs = [d for d in yaml.safe_load_all(f) if d is not None]
        except yaml.YAMLError as e:
            sys.exit(f"{path}: {e}")
        files[path] = [d.get("kind") for d in docs]
        for d in docs:
            if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == "keygate-config":
                policy = d["data"]["keygate.toml"]
            if d.get("kind") == "Deployment":
                for c in d["spec"]["template"]["spec"]["containers"]:
                    if c["name"] != "keygate":
                        continue
                    for e in c.get("env", []):
                        ref = (e.get("valueFrom") or {}).get("secretKeyRef") or {}
                        env[e["name"]] = ref.get("name")
print(json.dumps({"files": files, "policy": policy, "keygate_env": env}))
"#;

/// Every `*_env` value in the policy (`secret_env`, `secrets_env`,
/// `password_env`; a string or a list), and every inline secret key.
fn env_names_and_inline_secrets(v: &toml::Value, env: &mut Vec<String>, inline: &mut Vec<String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                if k.ends_with("_env") {
                    match v {
                        toml::Value::String(s) => env.push(s.clone()),
                        toml::Value::Array(a) => {
                            env.extend(a.iter().filter_map(|x| x.as_str().map(String::from)))
                        }
                        _ => {}
                    }
                } else if k == "secret" || k == "password" {
                    inline.push(k.clone());
                } else {
                    env_names_and_inline_secrets(v, env, inline);
                }
            }
        }
        toml::Value::Array(a) => {
            for x in a {
                env_names_and_inline_secrets(x, env, inline);
            }
        }
        _ => {}
    }
}

#[test]
fn the_kubernetes_configmap_policy_passes_check() {
    let has_yaml = runs("python3", &["-c", "import yaml"]);
    if !available(
        "python3 with PyYAML",
        has_yaml,
        "apt-get install python3-yaml, or pip install pyyaml",
    ) {
        return;
    }
    let out = Command::new("python3")
        .arg("-c")
        .arg(K8S_EXTRACT)
        .arg(repo("deploy/kubernetes"))
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "a YAML file under deploy/kubernetes does not parse:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let found: Value = serde_json::from_slice(&out.stdout).expect("the extractor prints JSON");

    // Every file parses (above) and holds Kubernetes objects.
    let files = found["files"].as_object().expect("files");
    for name in ["keygate-sidecar.yaml", "servicemonitor.yaml"] {
        assert!(
            files.keys().any(|p| p.ends_with(name)),
            "deploy/kubernetes/{name} missing: {files:?}"
        );
    }
    for (path, kinds) in files {
        let kinds = kinds.as_array().expect("kinds");
        assert!(!kinds.is_empty(), "{path} holds no document");
        assert!(
            kinds
                .iter()
                .all(|k| k.as_str().is_some_and(|k| !k.is_empty())),
            "{path}: a document without kind: {kinds:?}"
        );
    }

    let policy = found["policy"]
        .as_str()
        .expect("a ConfigMap keygate-config with a keygate.toml key");
    let table: toml::Table = policy
        .parse()
        .expect("the ConfigMap's keygate.toml is TOML");
    let (mut env, mut inline) = (Vec::new(), Vec::new());
    env_names_and_inline_secrets(&toml::Value::Table(table), &mut env, &mut inline);
    assert!(
        inline.is_empty(),
        "inline secrets in the ConfigMap: {inline:?}"
    );
    assert!(!env.is_empty(), "the policy names no secret by *_env");
    // Each variable the policy names comes from the Secret, in the keygate
    // container's env.
    for name in &env {
        assert_eq!(
            found["keygate_env"][name.as_str()],
            json!("keygate-secrets"),
            "the keygate container does not take {name} from the Secret keygate-secrets: {}",
            found["keygate_env"]
        );
    }
    // None of config.example.toml's public demo keys.
    let example = std::fs::read_to_string(repo("config.example.toml")).expect("example");
    for line in example.lines() {
        if let Some(hash) = line.trim().strip_prefix("sha256 = ") {
            assert!(
                !policy.contains(hash.trim_matches('"')),
                "the ConfigMap carries a demo API key from config.example.toml: {hash}"
            );
        }
    }

    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("keygate.toml");
    std::fs::write(&file, policy).expect("write the policy");
    let mut check = Command::new(env!("CARGO_BIN_EXE_keygate"));
    check.arg("check").arg("-c").arg(&file);
    for name in &env {
        // 48 bytes: enough for any HMAC key size check.
        check.env(name, "k8s-test-dummy-value-0123456789-0123456789-abcdef");
    }
    let out = check.output().expect("run keygate check");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "keygate check refuses the ConfigMap's policy:\n{stdout}{stderr}"
    );
    assert!(
        !stderr.contains("warning"),
        "keygate check warns about the ConfigMap's policy:\n{stderr}"
    );
}

// ------------------------------------------------------------- Prometheus

/// A real Prometheus on a loopback port, scraping one keygate's admin
/// listener every second. Killed on drop.
struct Prometheus {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(admin_port: u16) -> Prometheus {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: keygate\n    static_configs:\n      \
                 - targets: [\"127.0.0.1:{admin_port}\"]\n"
            ),
        )
        .expect("write prometheus.yml");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let mut prometheus = Prometheus { child, port, dir };
        prometheus.wait_ready();
        prometheus
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let url = format!("http://127.0.0.1:{}/-/ready", self.port);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("prometheus exited with {status}:\n{}", self.log());
            }
            if client().get(&url).send().is_ok_and(|r| r.status() == 200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus did not become ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `data.result` of an instant query; panics on an error answer (bad
    /// PromQL), naming the query.
    fn query(&self, query: &str) -> Vec<Value> {
        let resp = client()
            .get(format!("http://127.0.0.1:{}/api/v1/query", self.port))
            .query(&[("query", query)])
            .send()
            .expect("query prometheus");
        let status = resp.status();
        let body: Value = resp.json().expect("prometheus answers JSON");
        assert!(
            status.is_success() && body["status"] == "success",
            "{query}\n→ {status}: {body}"
        );
        body["data"]["result"]
            .as_array()
            .cloned()
            .expect("an instant query of a vector")
    }

    /// Wait until Prometheus has scraped keygate successfully.
    fn wait_scraped(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let up = self.query(r#"up{job="keygate"}"#);
            if up.first().is_some_and(|s| s["value"][1] == "1") {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("prometheus never scraped keygate:\n{}", self.log());
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every (panel title, expr) of a dashboard, rows' nested panels included.
fn dashboard_queries(panels: &Value, out: &mut Vec<(String, String)>) {
    for panel in panels.as_array().into_iter().flatten() {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push((title.to_string(), expr.to_string()));
            }
        }
        dashboard_queries(&panel["panels"], out);
    }
}

/// The labels of every `by (…)` in `expr` but `le` (consumed by
/// histogram_quantile): each series the query returns must carry them.
fn grouping_labels(expr: &str) -> Vec<String> {
    let mut labels = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("by (") {
        let after = &rest[at + "by (".len()..];
        let Some(end) = after.find(')') else { break };
        for label in after[..end].split(',').map(str::trim) {
            if !label.is_empty() && label != "le" && !labels.iter().any(|l| l == label) {
                labels.push(label.to_string());
            }
        }
        rest = &after[end..];
    }
    labels
}

fn is_finite_sample(sample: &Value) -> bool {
    sample["value"][1]
        .as_str()
        .and_then(|v| v.parse::<f64>().ok())
        .is_some_and(f64::is_finite)
}

#[test]
fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    if !available(
        "prometheus",
        runs("prometheus", &["--version"]),
        "apt-get install prometheus",
    ) {
        return;
    }
    let upstream = Upstream::start();
    let kg = Keygate::start(&config_with_passwords(), upstream.port);
    let prometheus = Prometheus::start(kg.admin_port);
    prometheus.wait_scraped();

    let c = client();
    let url = |path: &str| kg.url(path);
    // An upstream timeout (the upstream holds /slow/ for 2.5 s, read_timeout
    // is 2 s): keygate_upstream_errors_total{kind="timeout"}.
    let slow = {
        let url = url("/slow/x");
        std::thread::spawn(move || {
            client()
                .get(url)
                .header("X-API-Key", KEY_CI)
                .send()
                .map(|r| r.status().as_u16())
        })
    };
    // The token endpoints: a login, a refresh, a failed login.
    let login = c
        .post(url("/api/v1/auth/token"))
        .json(&json!({"email": "alice@example.com", "password": PASSWORD}))
        .send()
        .expect("login");
    assert_eq!(login.status(), 200);
    let login: Value = login.json().expect("login JSON");
    let refresh_token = login["refresh_token"]
        .as_str()
        .expect("a refresh token")
        .to_string();
    let refresh = c
        .post(url("/api/v1/auth/refresh"))
        .json(&json!({"refresh_token": refresh_token}))
        .send()
        .expect("refresh");
    assert_eq!(refresh.status(), 200);
    let failed = c
        .post(url("/api/v1/auth/token"))
        .json(&json!({"email": "dana@example.com", "password": "wrong"}))
        .send()
        .expect("failed login");
    assert_eq!(failed.status(), 401);
    // A reload.
    let reload = c.post(kg.admin("/reload")).send().expect("reload");
    assert_eq!(reload.status(), 200);
    // dana (free, 100 an hour) exhausted: 429 rate_limited{tier="free"}.
    let mut limited = 0;
    for _ in 0..101 {
        let r = c
            .get(url("/v1/vms"))
            .header("X-API-Key", KEY_DANA)
            .send()
            .expect("dana");
        limited += usize::from(r.status() == 429);
    }
    assert!(limited >= 1, "dana's free tier never answered 429");

    // Steady traffic for 6 s, so that every rate has samples to work on:
    // 200s (API key, JWT, public), 401s, 429s.
    let alice = token("u_alice");
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let sent: [(reqwest::blocking::RequestBuilder, u16); 5] = [
            (c.get(url("/v1/vms")).header("X-API-Key", KEY_DEPLOY), 200),
            (c.get(url("/v1/vms/vm-1")).bearer_auth(&alice), 200),
            (c.get(url("/v1/status")), 200),
            (c.get(url("/v1/vms")), 401),
            (c.get(url("/v1/vms")).header("X-API-Key", KEY_DANA), 429),
        ];
        for (request, expected) in sent {
            let status = request.send().expect("request").status();
            assert_eq!(status, expected, "{}", kg.stderr());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        slow.join()
            .expect("slow request thread")
            .expect("slow request"),
        504
    );
    // Two more scrapes after the last request.
    std::thread::sleep(Duration::from_millis(2500));

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo("deploy/grafana/keygate.json")).expect("read the dashboard"),
    )
    .expect("the dashboard is JSON");
    // Template variables take their "All" value.
    let variables: Vec<(String, String)> = dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| {
            Some((
                v["name"].as_str()?.to_string(),
                v["allValue"].as_str()?.to_string(),
            ))
        })
        .collect();
    let mut queries = Vec::new();
    dashboard_queries(&dashboard["panels"], &mut queries);
    assert!(queries.len() >= 15, "only {} queries", queries.len());

    let mut wrong = Vec::new();
    for (title, expr) in &queries {
        let mut query = expr
            .replace("$__rate_interval", "15s")
            .replace("$__interval", "15s");
        for (name, all) in &variables {
            query = query
                .replace(&format!("${{{name}}}"), all)
                .replace(&format!("${name}"), all);
        }
        assert!(
            !query.contains('$'),
            "{title}: unresolved variable in {query}"
        );
        let result = prometheus.query(&query);
        if result.is_empty() {
            wrong.push(format!("{title}: no data for {query}"));
            continue;
        }
        if !result.iter().any(is_finite_sample) {
            wrong.push(format!("{title}: only NaN/Inf for {query}: {result:?}"));
        }
        // A series without any label is the `or on() vector(0)` fallback
        // of a panel whose metric has no events here (Redis-only series,
        // nothing dropped, no state errors); every other one carries the
        // labels its legend names.
        let fallback = query.contains("vector(0)");
        for label in grouping_labels(&query) {
            for sample in &result {
                let metric = &sample["metric"];
                let is_fallback = fallback && metric.as_object().is_some_and(|m| m.is_empty());
                if !is_fallback && metric[label.as_str()].as_str().unwrap_or("").is_empty() {
                    wrong.push(format!(
                        "{title}: a series without label {label:?}: {metric}"
                    ));
                }
            }
        }
    }

    // A healthy embedded-store instance must not trip the alerts on these.
    for (query, alert) in [
        ("min(keygate_state_up)", "KeygateStateDown"),
        (
            "min(keygate_config_last_reload_success)",
            "KeygateReloadFailing",
        ),
    ] {
        let result = prometheus.query(query);
        if result.first().and_then(|s| s["value"][1].as_str()) != Some("1") {
            wrong.push(format!(
                "{query} is {result:?}, not 1, on a healthy keygate: {alert} would fire"
            ));
        }
    }

    assert!(
        wrong.is_empty(),
        "{} problem(s):\n{}\n\nkeygate's /metrics:\n{}",
        wrong.len(),
        wrong.join("\n"),
        c.get(kg.admin("/metrics"))
            .send()
            .and_then(|r| r.text())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("keygate_") && !l.contains("_bucket{"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

// ------------------------------------------------------------- alert rules

#[test]
fn the_alert_rules_pass_promtool() {
    if !available(
        "promtool",
        runs("promtool", &["--version"]),
        "apt-get install prometheus",
    ) {
        return;
    }
    for args in [
        ["check", "rules", "deploy/prometheus/alerts.yml"],
        ["test", "rules", "deploy/prometheus/alerts_test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
