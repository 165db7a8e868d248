//! The strict reference upstream (`strict_upstream.py`, Python's h11) as a
//! test fixture: every byte keygate sends it is framed by an independent
//! strict parser, and each request (or framing error) is one JSON record.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct StrictUpstream {
    child: Child,
    pub port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl StrictUpstream {
    pub fn start() -> StrictUpstream {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("upstream.jsonl");
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/support/strict_upstream.py");
        let mut child = Command::new("python3")
            .arg(&script)
            .arg("--log")
            .arg(&log)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start python3 strict_upstream.py (needs python3 and h11)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the upstream's port");
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("strict upstream did not start: {line:?}"));
        StrictUpstream {
            child,
            port,
            log,
            _dir: dir,
        }
    }

    pub fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The requests h11 framed, in arrival order.
    pub fn requests(&self) -> Vec<Value> {
        self.records()
            .into_iter()
            .filter(|r| r.get("seq").is_some())
            .collect()
    }

    /// Framing errors h11 reported: keygate sent bytes no strict parser takes.
    pub fn errors(&self) -> Vec<Value> {
        self.records()
            .into_iter()
            .filter(|r| r.get("error").is_some())
            .collect()
    }

    /// Wait until the log has been quiet for a moment.
    pub fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut last = usize::MAX;
        while Instant::now() < deadline {
            let n = self.records().len();
            if n == last {
                return;
            }
            last = n;
            std::thread::sleep(Duration::from_millis(150));
        }
    }
}

impl Drop for StrictUpstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The values of header `name` (case-insensitive) in a request record.
pub fn header_values(record: &Value, name: &str) -> Vec<String> {
    record["headers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| h[0].as_str().is_some_and(|n| n.eq_ignore_ascii_case(name)))
        .filter_map(|h| h[1].as_str().map(str::to_string))
        .collect()
}

/// Every header name in a request record.
pub fn header_names(record: &Value) -> Vec<String> {
    record["headers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h[0].as_str().map(str::to_ascii_lowercase))
        .collect()
}
