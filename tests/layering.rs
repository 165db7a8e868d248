//! The crate's layering, held: every `crate::<module>` a module of `src/`
//! names (in `use` lines or paths, comments and test code aside) must be
//! an edge the matrix below allows. A new edge is a design decision: add
//! it here, with the reason, or move the code that needs it.
//!
//! The ground: `clock`, `config`, `limit`, `metrics` and `webhook` import
//! nothing of the crate. The policy (what the file says, compiled) sits on
//! them and imports nothing of the decision (`gate`), the stores
//! (`state`), the token issuer (`issue`) or the proxy. The HTTP/1.1
//! engine (`http1`) knows nothing of the policy or the application.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each top-level module, and the modules of the crate it may use.
const ALLOWED: &[(&str, &[&str])] = &[
    ("clock", &[]),
    ("config", &[]),
    ("limit", &[]),
    ("metrics", &[]),
    ("webhook", &[]),
    ("http1", &[]),
    // Server TLS settings and certificates; its HTTP/2 limits are the
    // engine's.
    ("tls", &["http1"]),
    // The compiled policy: an upstream is an engine `Endpoint`, header
    // names are checked with the engine's token rule.
    ("policy", &["clock", "config", "http1", "limit", "tls"]),
    ("gate", &["limit", "policy"]),
    ("state", &["clock", "limit", "metrics", "policy"]),
    ("issue", &["clock", "limit", "metrics", "policy", "state"]),
    // Self-service keys: the gate's view of a stored key, kept in `state`.
    (
        "keys",
        &["clock", "gate", "limit", "metrics", "policy", "state"],
    ),
    (
        "proxy",
        &[
            "clock", "config", "gate", "http1", "issue", "keys", "limit", "metrics", "policy",
            "state", "tls", "webhook",
        ],
    ),
    (
        "cli",
        &[
            "clock", "config", "gate", "issue", "keys", "limit", "policy", "proxy", "state", "tls",
            "webhook",
        ],
    ),
];

/// Edges the issue that introduced this test named as forbidden: they stay
/// out of `ALLOWED` whatever else changes.
const FORBIDDEN: &[(&str, &str)] = &[
    ("policy", "gate"),
    ("policy", "state"),
    ("policy", "issue"),
    ("policy", "proxy"),
    ("http1", "policy"),
    ("http1", "proxy"),
];

/// The code of a file without its comments and its `#[cfg(test)] mod`.
fn code_of(text: &str) -> String {
    let end = text
        .find("#[cfg(test)]\nmod ")
        .or_else(|| text.find("#[cfg(test)]\npub mod "))
        .unwrap_or(text.len());
    text[..end]
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `crate::x` names in `code`.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().last();
        rest = &rest[at + "crate::".len()..];
        // `keygate_crate::` or `$crate::` are not ours.
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            found.insert(name);
        }
    }
    found
}

fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            walk(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every edge in `src/`: (module, used module) → the files that use it.
fn edges() -> BTreeMap<(String, String), Vec<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut edges: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for path in files {
        let rel = path
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .to_string();
        let name = path.file_name().unwrap().to_string_lossy();
        // Test code may reach anywhere; the binary and the crate root
        // wire everything together.
        if matches!(&*name, "tests.rs" | "testing.rs") || rel == "main.rs" || rel == "lib.rs" {
            continue;
        }
        let top = rel.split('/').next().unwrap().trim_end_matches(".rs");
        let text = std::fs::read_to_string(&path).unwrap();
        for used in crate_paths(&code_of(&text)) {
            if used != top {
                edges
                    .entry((top.to_string(), used))
                    .or_default()
                    .push(rel.clone());
            }
        }
    }
    edges
}

#[test]
fn every_module_uses_only_what_the_matrix_allows() {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut wrong = Vec::new();
    for ((from, to), files) in edges() {
        match allowed.get(from.as_str()) {
            None => wrong.push(format!("{from}: a module the matrix does not list")),
            Some(may) if !may.contains(&to.as_str()) => {
                wrong.push(format!("{from} uses {to} in {}", files.join(", ")))
            }
            Some(_) => {}
        }
    }
    assert!(
        wrong.is_empty(),
        "edges the layering does not allow:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_matrix_allows_no_forbidden_edge() {
    for (from, to) in FORBIDDEN {
        let may = ALLOWED.iter().find(|(m, _)| m == from).unwrap().1;
        assert!(!may.contains(to), "{from} may not use {to}");
    }
}

#[test]
fn the_reader_finds_edges_and_skips_comments_and_tests() {
    let text = "use crate::policy::Policy;\n// crate::proxy in a comment\nfn f() { crate::clock::unix_now(); }\n#[cfg(test)]\nmod tests {\n    use crate::gate;\n}\n";
    let found = crate_paths(&code_of(text));
    assert_eq!(
        found,
        ["clock", "policy"].iter().map(|s| s.to_string()).collect()
    );
    // And it sees the real crate: the proxy uses the gate.
    assert!(edges().contains_key(&("proxy".to_string(), "gate".to_string())));
}

#[test]
fn no_source_file_is_over_700_lines() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let lines = std::fs::read_to_string(f).unwrap().lines().count();
            (lines > 700).then(|| format!("{} ({lines} lines)", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "split these by what they do: {long:?}");
}
