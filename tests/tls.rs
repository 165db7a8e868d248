//! TLS on the public listener, against real peers: keygate's own rustls
//! client, curl, `openssl s_client` and Python's `ssl`, all trusting a CA
//! made in the test. SNI selection, live certificate rotation under load,
//! bad files at reload, the redirect listener, HSTS, metrics and `check`.

mod support;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::tls::{client_config, Ca, Conn};
use support::*;

/// The usual configuration with `[server.tls]` (`tls` is its body).
fn tls_config(tls: &str) -> String {
    format!("{}\n[server.tls]\n{tls}\n", config())
}

fn pki(dir: &Path) -> Ca {
    let ca = Ca::new("keygate test CA");
    std::fs::write(dir.join("ca.pem"), &ca.pem).unwrap();
    ca.server("default.test", &["localhost", "default.test"])
        .install(dir, "default");
    ca.server("api.test", &["api.test"]).install(dir, "api");
    ca
}

fn base_tls(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"cert_file = "{d}/default.crt"
key_file = "{d}/default.key"
hsts_max_age = "365d"
handshake_timeout = "1s"
[[server.tls.certs]]
sni = "api.test"
cert_file = "{d}/api.crt"
key_file = "{d}/api.key"
"#
    )
}

/// [`base_tls`] without the SNI certificate, so more keys can follow.
fn default_only(dir: &Path) -> String {
    let full = base_tls(dir);
    full.split("[[server.tls.certs]]")
        .next()
        .unwrap()
        .to_string()
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn https_is_served_by_sni_with_hsts_and_x_forwarded_proto() {
    let certs = tempfile::tempdir().unwrap();
    let ca = pki(certs.path());
    let upstream = Upstream::start();
    let kg = Keygate::start(&tls_config(&base_tls(certs.path())), upstream.port);
    let config = client_config(&ca.pem, None);

    let mut api = Conn::open(kg.port, "api.test", config.clone()).unwrap();
    assert_eq!(api.peer_cn(), "api.test");
    assert_eq!(api.version(), Some(rustls::ProtocolVersion::TLSv1_3));
    let r = api
        .get(
            "/v1/vms",
            &[("x-api-key", KEY_DEPLOY), ("x-forwarded-proto", "http")],
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(
        r.header("strict-transport-security").as_deref(),
        Some("max-age=31536000")
    );
    let seen = upstream.last();
    assert_eq!(seen.all("x-forwarded-proto"), ["https"]);
    // Keep-alive over TLS: a second request on the same connection, and a
    // refusal written by keygate itself carries HSTS too.
    let r = api.get("/v1/vms", &[]).unwrap();
    assert_eq!(r.status, 401);
    assert!(r.header("strict-transport-security").is_some());
    assert!(r.body.contains("missing_credentials"), "{}", r.body);

    let mut default = Conn::open(kg.port, "localhost", config.clone()).unwrap();
    assert_eq!(default.peer_cn(), "default.test");
    // (The session tickets arrive after the handshake, read with an answer.)
    assert_eq!(default.get("/v1/status", &[]).unwrap().status, 200);
    // The same client again: the session is resumed (TLS 1.3 tickets).
    drop(default);
    let again = Conn::open(kg.port, "localhost", config.clone()).unwrap();
    assert!(matches!(
        again.tls.conn.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    ));

    // curl, verifying the chain and the name it asked for.
    let out = Command::new("curl")
        .args(["-sS", "-i", "--http1.1", "--cacert"])
        .arg(certs.path().join("ca.pem"))
        .arg("--resolve")
        .arg(format!("api.test:{}:127.0.0.1", kg.port))
        .args(["-H", &format!("X-API-Key: {KEY_DEPLOY}")])
        .arg(format!("https://api.test:{}/v1/vms", kg.port))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");

    // openssl s_client: an unknown name gets the default certificate, a
    // known one its own.
    for (name, cn) in [("nobody.test", "default.test"), ("api.test", "api.test")] {
        let out = Command::new("openssl")
            .args(["s_client", "-connect"])
            .arg(format!("127.0.0.1:{}", kg.port))
            .args(["-servername", name, "-CAfile"])
            .arg(certs.path().join("ca.pem"))
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!("subject=CN = {cn}")),
            "{name}: {text}"
        );
    }

    assert!(kg.metric(r#"keygate_tls_handshakes_total{result="ok",version="TLSv1.3"}"#) >= 4.0);
    assert!(
        kg.metric(r#"keygate_tls_handshakes_total{result="resumed",version="TLSv1.3"}"#) >= 1.0
    );
    let expiry = kg.metric(
        r#"keygate_tls_certificate_expiry_timestamp_seconds{cert="api.test",subject="CN=api.test"}"#,
    );
    let in_days = (expiry - now() as f64) / 86_400.0;
    assert!((88.0..=90.0).contains(&in_days), "{in_days}");
}

#[test]
fn min_version_and_plain_http_on_the_tls_port_are_refused() {
    let certs = tempfile::tempdir().unwrap();
    pki(certs.path());
    let upstream = Upstream::start();
    let tls = format!("{}min_version = \"1.3\"\n", default_only(certs.path()));
    let kg = Keygate::start(&tls_config(&tls), upstream.port);
    let ca = certs.path().join("ca.pem");
    let python = |max: &str| {
        Command::new("python3")
            .arg("-c")
            .arg(format!(
                r#"
import socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[2])
ctx.maximum_version = ssl.TLSVersion.{max}
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[1]))), server_hostname="localhost")
print(s.version())
"#
            ))
            .arg(kg.port.to_string())
            .arg(&ca)
            .output()
            .unwrap()
    };
    let ok = python("TLSv1_3");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "TLSv1.3");
    let old = python("TLSv1_2");
    assert!(
        !old.status.success(),
        "TLS 1.2 was accepted with min_version 1.3"
    );

    // Plain HTTP on the TLS port: the handshake fails, nothing goes upstream.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", kg.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(
        format!("GET /v1/vms HTTP/1.1\r\nhost: x\r\nx-api-key: {KEY_DEPLOY}\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(!answer.starts_with(b"HTTP/1.1 200"));
    assert_eq!(upstream.count(), 0);
    // A client that never speaks is dropped after handshake_timeout.
    let mut idle = std::net::TcpStream::connect(("127.0.0.1", kg.port)).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let n = idle.read(&mut [0u8; 16]).unwrap_or(0);
    assert_eq!(n, 0);
    assert!(started.elapsed() < Duration::from_secs(4));
    wait_for("the handshake metrics", || {
        kg.metric(r#"keygate_tls_handshakes_total{result="failed",version="none"}"#) >= 2.0
            && kg.metric(r#"keygate_tls_handshakes_total{result="timeout",version="none"}"#) >= 1.0
    });
}

/// A certificate rewritten on disk (key then certificate, each by rename,
/// as certbot and cert-manager do) serves the next handshakes; connections
/// already open keep working; handshakes in a loop meanwhile never fail; a
/// mismatched key or an expired certificate is refused and the last good
/// one keeps serving.
#[test]
fn certificates_rotate_live_and_a_bad_file_keeps_the_old_one() {
    let certs = tempfile::tempdir().unwrap();
    let ca = pki(certs.path());
    let upstream = Upstream::start();
    let kg = Keygate::start(&tls_config(&base_tls(certs.path())), upstream.port);
    let config = client_config(&ca.pem, None);
    let mut open = Conn::open(kg.port, "localhost", config.clone()).unwrap();
    assert_eq!(open.peer_cn(), "default.test");

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let load: Vec<_> = (0..2)
        .map(|_| {
            let (stop, done, failures, config) =
                (stop.clone(), done.clone(), failures.clone(), config.clone());
            let port = kg.port;
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let r = Conn::open(port, "localhost", config.clone())
                        .and_then(|mut c| c.get("/v1/vms", &[("x-api-key", KEY_CI)]));
                    match r {
                        Ok(r) if r.status == 200 => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => failures.lock().unwrap().push(r.head),
                        Err(e) => failures.lock().unwrap().push(e.to_string()),
                    }
                }
            })
        })
        .collect();

    // A fresh client each time: a resumed session would report the
    // certificate of the handshake it resumes.
    let cn_now = || {
        Conn::open(kg.port, "localhost", client_config(&ca.pem, None))
            .unwrap()
            .peer_cn()
    };
    for round in 1..=3 {
        let cn = format!("rotated-{round}.test");
        ca.server(&cn, &["localhost"])
            .install(certs.path(), "default");
        wait_for("the rotated certificate", || cn_now() == cn);
    }
    // The connection opened before the rotations still works.
    let r = open.get("/v1/vms", &[("x-api-key", KEY_CI)]).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(open.peer_cn(), "default.test");

    // A key that is not the certificate's: refused, the last good pair serves.
    let failed = |kg: &Keygate| kg.metric(r#"keygate_config_reloads_total{result="failure"}"#);
    let before = failed(&kg);
    let other = ca.server("other.test", &["localhost"]);
    std::fs::write(certs.path().join("default.key"), &other.key).unwrap();
    wait_for("the mismatched key to be refused", || failed(&kg) > before);
    assert!(kg.stderr().contains("does not belong to the certificate"));
    assert_eq!(cn_now(), "rotated-3.test");

    // An expired pair: refused too.
    let before = failed(&kg);
    let expired = ca.leaf(
        "expired.test",
        &["localhost"],
        -60,
        30,
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    );
    expired.install(certs.path(), "default");
    wait_for("the expired certificate to be refused", || {
        failed(&kg) > before
    });
    assert!(kg.stderr().contains("expired at"));
    assert_eq!(cn_now(), "rotated-3.test");

    // Good again: served again.
    ca.server("good-again.test", &["localhost"])
        .install(certs.path(), "default");
    wait_for("the good certificate", || cn_now() == "good-again.test");

    // A configuration naming new files that are broken when it is saved:
    // refused. Fixing the files, the configuration untouched, is enough.
    let before = failed(&kg);
    let next = ca.server("next.test", &["localhost"]);
    std::fs::write(certs.path().join("next.crt"), &next.cert).unwrap();
    std::fs::write(certs.path().join("next.key"), &other.key).unwrap();
    let renamed = base_tls(certs.path()).replace("/default.", "/next.");
    kg.write_config(&tls_config(&renamed), upstream.port);
    wait_for(
        "the configuration naming a mismatched pair to be refused",
        || failed(&kg) > before,
    );
    assert_eq!(cn_now(), "good-again.test");
    next.install(certs.path(), "next");
    wait_for("the fixed files", || cn_now() == "next.test");

    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    assert!(
        done.load(Ordering::Relaxed) >= 20,
        "too few requests under load"
    );
    // No secret or key material in the logs.
    assert!(!kg.stderr().contains("PRIVATE KEY"));
}

#[test]
fn the_redirect_listener_answers_308_to_https() {
    let certs = tempfile::tempdir().unwrap();
    pki(certs.path());
    let upstream = Upstream::start();
    let plain = free_port();
    let tls = format!(
        "redirect_listen = \"127.0.0.1:{plain}\"\n{}",
        base_tls(certs.path())
    );
    let kg = Keygate::start(&tls_config(&tls), upstream.port);
    let ask = |req: &str| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", plain)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let out = ask("GET /v1/vms?page=2 HTTP/1.1\r\nHost: api.test:80\r\n\r\n");
    assert!(out.starts_with("HTTP/1.1 308"), "{out}");
    assert!(
        out.contains(&format!(
            "location: https://api.test:{}/v1/vms?page=2\r\n",
            kg.port
        )),
        "{out}"
    );
    let out = ask("GET / HTTP/1.1\r\nHost: evil.test/x\r\n\r\n");
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    let out = ask("GET /\r\n\r\n");
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert_eq!(upstream.count(), 0);
}

fn check(config: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["check", "-c"])
        .arg(&path)
        .env("KEYGATE_TEST_HS", HS_SECRET)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn filled(tls: &str) -> String {
    tls_config(tls)
        .replace("{listen}", "127.0.0.1:18443")
        .replace("{admin}", "127.0.0.1:19090")
        .replace("{upstream}", "http://127.0.0.1:18080")
        .replace("{keys}", &fixture("keys").display().to_string())
        .replace("{state}", "/tmp/keygate-tls-check-state")
}

#[test]
fn check_verifies_keys_and_expiry() {
    let certs = tempfile::tempdir().unwrap();
    let ca = pki(certs.path());
    let d = certs.path();
    let (ok, out) = check(&filled(&base_tls(d)));
    assert!(ok, "{out}");

    let other = ca.server("other.test", &["localhost"]);
    std::fs::write(d.join("other.key"), &other.key).unwrap();
    let (ok, out) = check(&filled(&base_tls(d).replacen(
        "default.key",
        "other.key",
        1,
    )));
    assert!(!ok);
    assert!(out.contains("does not belong to the certificate"), "{out}");
    assert!(out.contains("keygate.toml:"), "{out}");

    let usage = rcgen::ExtendedKeyUsagePurpose::ServerAuth;
    ca.leaf("old.test", &["localhost"], -60, 30, usage.clone())
        .install(d, "old");
    let (ok, out) = check(&filled(&base_tls(d).replace("default.", "old.")));
    assert!(!ok);
    assert!(out.contains("expired at"), "{out}");

    ca.leaf("soon.test", &["localhost"], -60, 65, usage)
        .install(d, "soon");
    let (ok, out) = check(&filled(&base_tls(d).replace("default.", "soon.")));
    assert!(ok, "{out}");
    assert!(
        out.contains("expires in 4 days") || out.contains("expires in 5 days"),
        "{out}"
    );

    let (ok, out) = check(&filled(&format!(
        "{}alpn = [\"spdy/3\"]\n",
        default_only(d)
    )));
    assert!(!ok);
    assert!(out.contains("unknown ALPN protocol"), "{out}");

    // [server.tls.http2]: limits out of range are blamed at their line.
    let (ok, out) = check(&filled(&format!(
        "{}[server.tls.http2]\nmax_concurrent_streams = 0\nmax_header_list_size = 1000000\nidle_timeout = \"soon\"\nmax_client_resets = 20000\n",
        default_only(d)
    )));
    assert!(!ok);
    for words in [
        "max_concurrent_streams must be between 1 and 1000",
        "max_header_list_size (bytes) must be between 1024 and 65536",
        "\"soon\" is not a duration",
        "max_client_resets must be between 1 and 10000",
    ] {
        assert!(out.contains(words), "{words}: {out}");
    }
    let (ok, out) = check(&filled(&format!(
        "{}alpn = [\"http/1.1\"]\n[server.tls.http2]\nmax_concurrent_streams = 8\n",
        default_only(d)
    )));
    assert!(ok, "{out}");
    assert!(out.contains("has no effect"), "{out}");
}

/// Client certificates as credentials: bound by subject, fingerprint or
/// subjectAltName to the same tier, permissions and `ip_allow` an API key
/// has; a header credential wins over the certificate; revoking is
/// removing the entry (live, even on an open connection); `required`
/// refuses a handshake without one.
#[test]
fn client_certificates_are_credentials() {
    let certs = tempfile::tempdir().unwrap();
    let d = certs.path();
    let ca = pki(d);
    let clients = Ca::new("keygate test client CA");
    std::fs::write(d.join("clients.pem"), &clients.pem).unwrap();
    let billing = clients.client("billing", "billing.internal");
    let reports = clients.client("reports", "reports.internal");
    let metrics = clients.client("metrics", "metrics.internal");
    let stranger = clients.client("stranger", "stranger.internal");
    let foreign = Ca::new("someone else's CA").client("billing", "billing.internal");
    // A common name that prints like two attributes of a bound subject.
    let lookalike = clients.client("ops,O=Example", "lookalike.internal");
    billing.install(d, "billing");
    let bindings = |with_billing: bool| {
        format!(
            r#"{billing}
[[client_certs]]
id = "reports"
sha256 = "{reports}"
tier = "free"
permissions = ["vms:read"]
ip_allow = ["198.51.100.0/24"]

[[client_certs]]
id = "ops"
subject = "CN=ops,O=Example"
tier = "enterprise"
permissions = ["vms:read"]

[[client_certs]]
id = "metrics"
san = "METRICS.internal"
tier = "enterprise"
permissions = ["vms:read"]
"#,
            billing = if with_billing {
                "[[client_certs]]\nid = \"billing\"\nsubject = \"CN = billing\"\ntier = \"enterprise\"\npermissions = [\"vms:read\"]\n"
            } else {
                ""
            },
            reports = support::tls::fingerprint(&reports.cert).to_uppercase(),
        )
    };
    let tls = |auth: &str, with_billing: bool| {
        let config = tls_config(&format!(
            "{}client_ca_file = \"{}/clients.pem\"\nclient_auth = \"{auth}\"\n",
            default_only(d),
            d.display()
        ));
        // [[client_certs]] after [server.tls] would be read as part of it.
        config.replacen(
            "\n[server.tls]",
            &format!("\n{}\n[server.tls]", bindings(with_billing)),
            1,
        )
    };
    let upstream = Upstream::start();
    let kg = Keygate::start(&tls("optional", true), upstream.port);
    let get = |who: Option<&support::tls::Leaf>, headers: &[(&str, &str)]| {
        let mut c = Conn::open(kg.port, "localhost", client_config(&ca.pem, who))?;
        c.get("/v1/vms", headers)
    };

    let mut held =
        Conn::open(kg.port, "localhost", client_config(&ca.pem, Some(&billing))).unwrap();
    let r = held.get("/v1/vms", &[]).unwrap();
    assert_eq!(r.status, 200, "{}{}", r.head, r.body);
    let seen = upstream.last();
    assert_eq!(seen.header("x-auth-method"), Some("mtls"));
    assert_eq!(seen.header("x-auth-key-id"), Some("billing"));
    assert_eq!(seen.header("x-auth-tier"), Some("enterprise"));

    // A credential in the request wins over the certificate.
    let r = get(Some(&billing), &[("x-api-key", KEY_DEPLOY)]).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(upstream.last().header("x-auth-method"), Some("api_key"));

    let r = get(Some(&metrics), &[]).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(upstream.last().header("x-auth-key-id"), Some("metrics"));

    let r = get(Some(&reports), &[]).unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("ip_not_allowed"));

    let r = get(Some(&stranger), &[]).unwrap();
    assert_eq!(r.status, 401);
    assert!(r.body.contains("invalid_client_certificate"), "{}", r.body);

    let r = get(Some(&lookalike), &[]).unwrap();
    assert_eq!(r.status, 401, "a look-alike subject passed: {}", r.body);
    assert!(r.body.contains("invalid_client_certificate"));

    let r = get(None, &[]).unwrap();
    assert_eq!(r.status, 401);
    assert!(r.body.contains("missing_credentials"));

    // Signed by a CA keygate does not trust: no handshake at all.
    assert!(get(Some(&foreign), &[]).is_err());

    // `keygate explain --client-cert` reaches the proxy's verdicts above.
    let explain = |leaf: &support::tls::Leaf, ip: &str| {
        let file = d.join("explain.crt");
        std::fs::write(&file, &leaf.cert).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args(["explain", "-c"])
            .arg(kg.config_path())
            .args(["--path", "/v1/vms", "--ip", ip, "--client-cert"])
            .arg(&file)
            .env("KEYGATE_TEST_HS", HS_SECRET)
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    for (leaf, ip, want) in [
        (&billing, "127.0.0.1", "ALLOW"),
        (&metrics, "127.0.0.1", "ALLOW"),
        (&reports, "127.0.0.1", "DENY 403 ip_not_allowed"),
        (&reports, "198.51.100.7", "ALLOW"),
        (
            &stranger,
            "127.0.0.1",
            "DENY 401 invalid_client_certificate",
        ),
        (
            &lookalike,
            "127.0.0.1",
            "DENY 401 invalid_client_certificate",
        ),
    ] {
        let out = explain(leaf, ip);
        let last = out.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("decision") && last.contains(want),
            "{want}: {out}"
        );
    }
    assert!(explain(&billing, "127.0.0.1").contains("client certificate \"billing\""));

    // curl with a client certificate.
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(d.join("ca.pem"))
        .arg("--cert")
        .arg(d.join("billing.crt"))
        .arg("--key")
        .arg(d.join("billing.key"))
        .arg(format!("https://localhost:{}/v1/vms", kg.port))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Revoked: removed from the policy; the open connection's next request
    // is refused.
    let before = kg.metric(r#"keygate_config_reloads_total{result="success"}"#);
    kg.write_config(&tls("optional", false), upstream.port);
    wait_for("the reload", || {
        kg.metric(r#"keygate_config_reloads_total{result="success"}"#) > before
    });
    let r = held.get("/v1/vms", &[]).unwrap();
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.body.contains("invalid_client_certificate"));

    // required: no certificate, no handshake.
    let before = kg.metric(r#"keygate_config_reloads_total{result="success"}"#);
    kg.write_config(&tls("required", true), upstream.port);
    wait_for("the reload", || {
        kg.metric(r#"keygate_config_reloads_total{result="success"}"#) > before
    });
    assert!(get(None, &[("x-api-key", KEY_DEPLOY)]).is_err());
    assert_eq!(get(Some(&billing), &[]).unwrap().status, 200);
}
