//! An `https://` upstream: keygate verifies its certificate against the CA
//! roots (here `SSL_CERT_FILE`, as curl and OpenSSL read it) and proxies over
//! TLS; a certificate it does not trust is a 502, never a silent downgrade.
//! The upstream is Python's `http.server` behind `ssl`, with a certificate
//! made by `openssl` for 127.0.0.1 and signed by a test CA.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use support::*;

const SERVER_PY: &str = r#"
import http.server, json, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = json.dumps({"tls": True, "subject": self.headers.get("X-Auth-Subject")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A CA, and a server certificate it signed for IP 127.0.0.1, written into
/// `dir`: (CA certificate, server certificate, server key).
fn certificates(dir: &Path) -> (String, String, String) {
    let path = |name: &str| dir.join(name).display().to_string();
    let openssl = |args: &[&str]| {
        let status = Command::new("openssl")
            .args(args)
            .stderr(Stdio::null())
            .status()
            .expect("openssl (the tests make their own certificates)");
        assert!(status.success(), "openssl {args:?}");
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "1",
    ];
    let (ca, ca_key, cert, key) = (
        path("ca.pem"),
        path("ca.key"),
        path("cert.pem"),
        path("key.pem"),
    );
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-subj",
                "/CN=keygate test CA",
                "-keyout",
                &ca_key,
                "-out",
                &ca,
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-subj",
                "/CN=keygate test upstream",
                "-CA",
                &ca,
                "-CAkey",
                &ca_key,
            ],
            &[
                "-addext",
                "subjectAltName=IP:127.0.0.1",
                "-addext",
                "basicConstraints=critical,CA:FALSE",
            ],
            &["-keyout", &key, "-out", &cert],
        ]
        .concat(),
    );
    (ca, cert, key)
}

fn https_upstream(cert: &str, key: &str) -> (Server, u16) {
    let mut child = Command::new("python3")
        .args(["-c", SERVER_PY, cert, key])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line.trim().parse().expect("the server's port");
    (Server(child), port)
}

fn keygate_for(port: u16, env: &[(&str, &str)]) -> Keygate {
    let config = config().replace("{upstream}", &format!("https://127.0.0.1:{port}"));
    Keygate::start_with_env(&config, port, env)
}

#[test]
fn a_trusted_https_upstream_is_proxied_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(dir.path());
    let (_server, port) = https_upstream(&cert, &key);
    let kg = keygate_for(port, &[("SSL_CERT_FILE", &ca)]);
    let c = client();
    for _ in 0..3 {
        let resp = c
            .get(kg.url("/v1/vms"))
            .header("X-API-Key", KEY_DEPLOY)
            .send()
            .unwrap();
        assert_eq!(resp.status(), 200, "{}", kg.stderr());
        let body: serde_json::Value = resp.json().unwrap();
        assert_eq!(body["tls"], true);
        assert_eq!(body["subject"], "u_alice", "{body}");
    }
}

#[test]
fn an_untrusted_certificate_is_a_502() {
    let dir = tempfile::tempdir().unwrap();
    let (_ca, cert, key) = certificates(dir.path());
    let (_server, port) = https_upstream(&cert, &key);
    let kg = keygate_for(port, &[]);
    let resp = client()
        .get(kg.url("/v1/vms"))
        .header("X-API-Key", KEY_DEPLOY)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 502);
    let body: serde_json::Value = resp.json().unwrap();
    assert_eq!(body["error"]["code"], "upstream_unavailable");
}
