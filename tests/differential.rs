//! The differential smuggling test: the whole research corpus
//! (`tests/corpus/smuggling.jsonl`, built by `tests/corpus/build_corpus.py`
//! from defparam/smuggler, PortSwigger's families, http-garden and the
//! "funky chunks" research) sent through the real keygate binary to a
//! strict h11 upstream. `tests/differential/run.py` checks, per payload,
//! that every request the upstream framed was forwarded and answered by
//! keygate, none targets a `deny` route, none carries a client-made
//! `X-Auth-*` in any spelling or a `_` header name, each carries exactly one
//! request id, and h11 found nothing to refuse in what keygate sent.

use std::path::Path;
use std::process::Command;

#[test]
fn no_corpus_payload_gets_past_the_gate_or_desyncs_the_upstream() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .arg(root.join("tests/differential/run.py"))
        .arg("--keygate")
        .arg(env!("CARGO_BIN_EXE_keygate"))
        .arg("--corpus")
        .arg(root.join("tests/corpus/smuggling.jsonl"))
        .arg("--jobs")
        .arg("4")
        .output()
        .expect("run python3 tests/differential/run.py (needs python3 and h11)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let summary = stdout.lines().last().unwrap_or("");
    eprintln!("differential corpus: {summary}");
    assert!(
        out.status.success() && summary.ends_with(" 0 failed"),
        "{stdout}\n{stderr}"
    );
    let passed: usize = summary
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(passed > 1000, "the corpus ran only {passed} payloads");
}
