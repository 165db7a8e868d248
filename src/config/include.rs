//! `include = ["users.d/*.toml", "keys.toml"]`: users, API keys, client
//! certificate bindings and routes
//! in files of their own (written by other tools, owned by other teams).
//!
//! An included file holds only `[[users]]`, `[[api_keys]]`,
//! `[[client_certs]]` and `[[routes]]` entries; they are added to the main file's. The files are read as one
//! document (the main file, then each included file in order, a pattern's
//! matches sorted by name), and every diagnostic names the file and the
//! line it came from. Patterns are relative to the main file; `*` matches
//! within the last path component only. A pattern without `*` must name an
//! existing file; a pattern with one may match nothing (an empty `users.d/`).

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::diagnostics::LineIndex;
use super::{ConfigError, Severity};

/// The tables an included file may hold.
const ALLOWED: [&str; 4] = [
    "[[users]]",
    "[[api_keys]]",
    "[[client_certs]]",
    "[[routes]]",
];

/// The main file and its includes, as one text.
#[derive(Debug)]
pub struct Sources {
    pub text: String,
    segments: Vec<Segment>,
}

#[derive(Debug)]
struct Segment {
    /// Where this file starts in `text`.
    start: usize,
    file: String,
}

impl Sources {
    pub fn single(file: &str, src: &str) -> Sources {
        Sources {
            text: src.to_string(),
            segments: vec![Segment {
                start: 0,
                file: file.to_string(),
            }],
        }
    }

    /// The main file's name.
    pub fn main(&self) -> &str {
        &self.segments[0].file
    }

    /// Which file `offset` (into `text`) is in, and its 1-based line and
    /// column there.
    pub fn locate(&self, offset: usize) -> (&str, usize, usize) {
        let i = self
            .segments
            .partition_point(|s| s.start <= offset)
            .saturating_sub(1);
        let seg = &self.segments[i];
        let end = self
            .segments
            .get(i + 1)
            .map_or(self.text.len(), |n| n.start);
        let own = &self.text[seg.start..end];
        let (line, column) = LineIndex::new(own).position(own, offset - seg.start);
        (&seg.file, line, column)
    }
}

#[derive(Deserialize)]
struct IncludeOnly {
    include: Option<toml::Spanned<Vec<String>>>,
}

/// The main file's `include` patterns and their span; none when the file
/// does not parse (the compiler then reports why).
fn patterns(src: &str) -> (Vec<String>, Range<usize>) {
    // `include` is a top-level key, so it stands before the first table
    // header: parse only that much (a policy of a million keys is not read
    // twice), and the whole text when the head alone does not parse.
    let mut head_end = src.len();
    let mut at = 0;
    for line in src.split_inclusive('\n') {
        if line.trim_start().starts_with('[') {
            head_end = at;
            break;
        }
        at += line.len();
    }
    let parsed = toml::from_str::<IncludeOnly>(&src[..head_end])
        .or_else(|_| toml::from_str::<IncludeOnly>(src));
    match parsed {
        Ok(IncludeOnly {
            include: Some(list),
        }) => {
            let span = list.span();
            (list.into_inner(), span)
        }
        _ => (Vec::new(), 0..0),
    }
}

/// The files `pattern` names, relative to `base`.
fn expand(base: &Path, pattern: &str) -> Result<Vec<PathBuf>, String> {
    let full = base.join(pattern);
    let name = full
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("include {pattern:?} names no file"))?;
    if !name.contains('*') {
        if pattern.contains('*') {
            return Err(format!(
                "include {pattern:?}: * is allowed in the file name only"
            ));
        }
        return if full.is_file() {
            Ok(vec![full])
        } else {
            Err(format!(
                "include {pattern:?}: {} does not exist",
                full.display()
            ))
        };
    }
    let dir = full.parent().unwrap_or(base);
    if dir.to_str().is_some_and(|d| d.contains('*')) {
        return Err(format!(
            "include {pattern:?}: * is allowed in the file name only"
        ));
    }
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("include {pattern:?}: cannot list {}: {e}", dir.display()))?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !n.starts_with('.') && wildcard(name, n))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// `*` matches any run of characters; everything else itself.
fn wildcard(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    true
}

/// Every file the configuration at `main` is made of, main first: what the
/// reloader watches. Unreadable or malformed parts are left out.
pub fn files(main: &Path) -> Vec<PathBuf> {
    let mut out = vec![main.to_path_buf()];
    let Ok(src) = std::fs::read_to_string(main) else {
        return out;
    };
    let base = main.parent().unwrap_or(Path::new(""));
    for pattern in patterns(&src).0 {
        out.extend(expand(base, &pattern).unwrap_or_default());
    }
    out
}

/// An included file holds array tables of the allowed kinds only, and
/// nothing before its first one (which would land in the main file's last
/// table).
fn check_included(file: &str, src: &str) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    let mut seen_table = false;
    for (i, line) in src.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let column = line.len() - line.trim_start().len() + 1;
        let err = |message: String| ConfigError {
            file: file.to_string(),
            line: i + 1,
            column,
            severity: Severity::Error,
            message,
        };
        if t.starts_with('[') {
            let header = t.split('#').next().unwrap_or("").trim().replace(' ', "");
            if !ALLOWED.contains(&header.as_str()) {
                errors.push(err(format!(
                    "an included file holds only {} entries, not {header}",
                    ALLOWED.join(", ")
                )));
            }
            seen_table = true;
        } else if !seen_table {
            errors.push(err(format!(
                "an included file starts with one of {}",
                ALLOWED.join(", ")
            )));
            break;
        }
    }
    errors
}

/// Read the includes `main_src` names and join everything into one text.
pub fn assemble(main: &Path, main_src: String) -> Result<Sources, Vec<ConfigError>> {
    let main_name = main.display().to_string();
    let (list, span) = patterns(&main_src);
    let (line, column) = if list.is_empty() {
        (0, 0)
    } else {
        LineIndex::new(&main_src).position(&main_src, span.start)
    };
    // Taken, not copied: the text may be a policy of a million keys.
    let mut sources = Sources {
        text: main_src,
        segments: vec![Segment {
            start: 0,
            file: main_name.clone(),
        }],
    };
    if list.is_empty() {
        return Ok(sources);
    }
    let at_include = |message: String| ConfigError {
        file: main_name.clone(),
        line,
        column,
        severity: Severity::Error,
        message,
    };
    let base = main.parent().unwrap_or(Path::new(""));
    let mut errors = Vec::new();
    for pattern in &list {
        let paths = match expand(base, pattern) {
            Ok(paths) => paths,
            Err(e) => {
                errors.push(at_include(e));
                continue;
            }
        };
        for path in paths {
            let name = path.display().to_string();
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    errors.extend(check_included(&name, &text));
                    sources.text.push('\n');
                    sources.segments.push(Segment {
                        start: sources.text.len(),
                        file: name,
                    });
                    sources.text.push_str(&text);
                }
                Err(e) => errors.push(at_include(format!("cannot read {name}: {e}"))),
            }
        }
    }
    if errors.is_empty() {
        Ok(sources)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_within_a_name() {
        assert!(wildcard("*.toml", "alice.toml"));
        assert!(wildcard("users-*.toml", "users-eu.toml"));
        assert!(!wildcard("*.toml", "alice.toml.bak"));
        assert!(wildcard("a*b*c", "a-b-c"));
        assert!(!wildcard("a*b*c", "a-c"));
    }

    #[test]
    fn an_included_file_holds_only_entries() {
        assert!(check_included("u.toml", "# users\n[[users]]\nid = \"x\"\n").is_empty());
        let e = check_included("u.toml", "\n[server]\nlisten = \"x\"\n");
        assert_eq!((e[0].line, e[0].column), (2, 1));
        let e = check_included("u.toml", "foo = 1\n[[users]]\n");
        assert_eq!(e[0].line, 1);
    }

    #[test]
    fn offsets_map_back_to_their_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("users.d")).unwrap();
        std::fs::write(dir.path().join("users.d/b.toml"), "[[users]]\nid = \"b\"\n").unwrap();
        std::fs::write(dir.path().join("users.d/a.toml"), "[[users]]\nid = \"a\"\n").unwrap();
        let main = dir.path().join("keygate.toml");
        let src = "include = [\"users.d/*.toml\"]\n[server]\n";
        let s = assemble(&main, src.to_string()).unwrap();
        let at = s.text.find("id = \"b\"").unwrap();
        let (file, line, column) = s.locate(at);
        assert!(file.ends_with("users.d/b.toml"), "{file}");
        assert_eq!((line, column), (2, 1));
        assert!(s.text.find("id = \"a\"").unwrap() < at, "sorted by name");
        assert_eq!(s.locate(3), (s.main(), 1, 4));
        assert_eq!(files(&main).len(), 1, "the main file is not on disk");
        let missing = assemble(&main, "include = [\"nope.toml\"]\n".to_string()).unwrap_err();
        assert!(missing[0].message.contains("does not exist"));
    }
}
