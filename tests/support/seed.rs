//! The public API document's webhook code, verbatim, run by python3: the
//! reference every keygate signature must satisfy.

use std::io::Write;
use std::process::{Command, Stdio};

const SEED_PY: &str = r#"
import hmac
import hashlib
import sys

def verify_webhook(payload, signature, secret):
    expected = hmac.new(
        secret.encode(),
        payload.encode(),
        hashlib.sha256
    ).hexdigest()
    
    return hmac.compare_digest(
        f"sha256={expected}",
        signature
    )

mode, secret = sys.argv[1], sys.argv[2]
payload = sys.stdin.buffer.read().decode()
if mode == "sign":
    print("sha256=" + hmac.new(secret.encode(), payload.encode(), hashlib.sha256).hexdigest())
else:
    sys.exit(0 if verify_webhook(payload, sys.argv[3], secret) else 1)
"#;

fn python(args: &[&str], payload: &[u8]) -> (bool, String) {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(SEED_PY)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 (the seed's verifier is Python)");
    child.stdin.take().unwrap().write_all(payload).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap().trim().to_string(),
    )
}

/// `verify_webhook(payload, signature, secret)` from the seed document.
pub fn seed_verifies(payload: &[u8], signature: &str, secret: &str) -> bool {
    python(&["verify", secret, signature], payload).0
}

/// The seed's formula used to sign: `sha256=` + hex HMAC-SHA256.
pub fn seed_sign(payload: &[u8], secret: &str) -> String {
    let (ok, signature) = python(&["sign", secret], payload);
    assert!(ok, "python3 could not sign");
    signature
}
