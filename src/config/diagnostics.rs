//! Problems found in a configuration file, each tied to a byte span and turned
//! into `file:line:col: message` only when reported.

use std::fmt;
use std::ops::Range;

/// A message tied to a place in the source text, before it has a file name.
#[derive(Debug, Clone)]
pub struct Located {
    pub span: Option<Range<usize>>,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// One reported problem, with its position already resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub severity: Severity,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.severity {
            Severity::Error => "",
            Severity::Warning => "warning: ",
        };
        if self.line == 0 {
            // About the file as a whole.
            return write!(f, "{}: {}{}", self.file, kind, self.message);
        }
        write!(
            f,
            "{}:{}:{}: {}{}",
            self.file, self.line, self.column, kind, self.message
        )
    }
}

impl std::error::Error for ConfigError {}

/// Collects errors and warnings while a file is compiled.
#[derive(Debug, Default)]
pub struct Diagnostics {
    items: Vec<(Severity, Located)>,
}

impl Diagnostics {
    pub fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.push(Severity::Error, Some(span), message.into());
    }

    pub fn warn(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.push(Severity::Warning, Some(span), message.into());
    }

    /// An error about the file as a whole (a required section is missing, say).
    pub fn error_at_start(&mut self, message: impl Into<String>) {
        self.push(Severity::Error, None, message.into());
    }

    pub fn push_located(&mut self, severity: Severity, located: Located) {
        self.items.push((severity, located));
    }

    fn push(&mut self, severity: Severity, span: Option<Range<usize>>, message: String) {
        self.items.push((severity, Located { span, message }));
    }

    pub fn has_errors(&self) -> bool {
        self.items.iter().any(|(s, _)| *s == Severity::Error)
    }

    /// Resolve every span against the files of `sources` (each
    /// diagnostic names the file it is in) and order them: the main file
    /// first, then the includes, by position.
    pub fn resolve_sources(self, sources: &super::include::Sources) -> Vec<ConfigError> {
        let mut out: Vec<(usize, ConfigError)> = self
            .items
            .into_iter()
            .map(|(severity, located)| {
                let order = located.span.as_ref().map_or(0, |s| s.start);
                let (file, line, column) = located
                    .span
                    .map_or((sources.main(), 1, 1), |span| sources.locate(span.start));
                let e = ConfigError {
                    file: file.to_string(),
                    line,
                    column,
                    severity,
                    message: located.message,
                };
                (order, e)
            })
            .collect();
        out.sort_by_key(|(order, _)| *order);
        out.into_iter().map(|(_, e)| e).collect()
    }

    /// Resolve every span against `src` and order the result by position.
    pub fn resolve(self, file: &str, src: &str) -> Vec<ConfigError> {
        let lines = LineIndex::new(src);
        let mut out: Vec<ConfigError> = self
            .items
            .into_iter()
            .map(|(severity, located)| {
                let (line, column) = located
                    .span
                    .map_or((1, 1), |span| lines.position(src, span.start));
                ConfigError {
                    file: file.to_string(),
                    line,
                    column,
                    severity,
                    message: located.message,
                }
            })
            .collect();
        out.sort_by_key(|e| (e.line, e.column));
        out
    }
}

/// Byte offset → 1-based line and column (columns count characters).
pub(crate) struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    pub(crate) fn new(src: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(src.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { starts }
    }

    pub(crate) fn position(&self, src: &str, offset: usize) -> (usize, usize) {
        let offset = offset.min(src.len());
        let line = self.starts.partition_point(|&s| s <= offset) - 1;
        let start = self.starts[line];
        let column = src
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count())
            + 1;
        (line + 1, column)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_and_count_characters() {
        let src = "a = 1\nbé = \"x\"\n";
        let mut d = Diagnostics::default();
        d.error(0..1, "first");
        d.error(11..14, "second");
        let errors = d.resolve("f.toml", src);
        assert_eq!(errors[0].to_string(), "f.toml:1:1: first");
        assert_eq!((errors[1].line, errors[1].column), (2, 5));
    }
}
