//! The parse of a file with many `[[api_keys]]`: runs of plain key tables
//! are cut out and parsed in batches on every core, the rest of the file
//! once, with every span as in the whole file. A million keys parse in a
//! few seconds and a fraction of the memory one `toml::from_str` of the
//! whole text takes (its token list and tree of every value are the peak).
//!
//! A cut is made only where it cannot change the meaning: at lines that
//! are exactly `[[api_keys]]`, ending where the next line starts with `[`
//! (a table header: the batch parses alone, so no array or string is open
//! there), in a text without multi-line strings. Anything else (or a batch
//! that does not parse alone) falls back to the plain parse.

use std::ops::Range;

use serde::Deserialize;

use super::{diagnostics, ApiKey, File, Spanned, Str};

/// Fewer keys than this: the plain parse.
pub const MIN_KEYS: usize = 2_000;
/// Key tables per batch.
const BATCH: usize = 5_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Batch {
    #[serde(default)]
    api_keys: Vec<Spanned<ApiKey>>,
}

/// Parse `src` as [`super::parse`] does, in batches when that pays.
pub fn parse(src: &str) -> Result<File, diagnostics::Located> {
    let Some(batches) = batches(src) else {
        return super::parse_whole(src);
    };
    // The rest: each batch's bytes become one comment of the same length,
    // so every offset (and so every line and column) stays as it was.
    let mut rest = String::with_capacity(src.len());
    let mut at = 0;
    for b in &batches {
        rest.push_str(&src[at..b.start]);
        rest.push('#');
        rest.extend(std::iter::repeat_n(' ', b.len() - 2));
        rest.push('\n');
        at = b.end;
    }
    rest.push_str(&src[at..]);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let next = std::sync::atomic::AtomicUsize::new(0);
    type Parsed = Result<Vec<Spanned<ApiKey>>, diagnostics::Located>;
    let (whole, mut results) = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut out: Vec<(usize, Parsed)> = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(range) = batches.get(i) else { break };
                        out.push((i, parse_batch(src, range.clone())));
                    }
                    out
                })
            })
            .collect();
        // The rest on this thread, beside the batches.
        let whole = super::parse_whole(&rest);
        let results: Vec<(usize, Parsed)> = workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_default())
            .collect();
        (whole, results)
    });
    drop(rest);
    // The first error in the file's order: the rest's, then the batches'.
    let mut file = whole?;
    results.sort_by_key(|(i, _)| *i);
    if results.len() != batches.len() {
        return super::parse_whole(src);
    }
    let mut keys = Vec::with_capacity(results.len());
    for (_, r) in results {
        keys.push(r?);
    }
    let batched: usize = keys.iter().map(Vec::len).sum();
    let mut all = Vec::with_capacity(file.api_keys.len() + batched);
    all.append(&mut file.api_keys);
    for (i, mut batch) in keys.into_iter().enumerate() {
        all.append(&mut batch);
        drop(batch);
        if i % 64 == 63 {
            give_back_freed_memory();
        }
    }
    // In the file's order, as one parse would have them.
    all.sort_by_key(|k| k.span().start);
    file.api_keys = all;
    give_back_freed_memory();
    Ok(file)
}

/// The parsers' tokens and trees are freed by now, but glibc keeps freed
/// pages in its arenas (one per thread that parsed): return them, or the
/// compiled policy is built on top of them and the peak doubles.
fn give_back_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator's own
    // arenas; it touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// One batch, its spans moved to where it sits in `src`.
fn parse_batch(
    src: &str,
    range: Range<usize>,
) -> Result<Vec<Spanned<ApiKey>>, diagnostics::Located> {
    let by = range.start;
    let text = &src[range];
    let batch: Batch = toml::from_str(text).map_err(|e| diagnostics::Located {
        span: e.span().map(|s| s.start + by..s.end + by),
        message: e.message().to_string(),
    })?;
    Ok(batch
        .api_keys
        .into_iter()
        .map(|k| shift_key(k, by))
        .collect())
}

fn shift(s: Str, by: usize) -> Str {
    let span = s.span();
    Spanned::new(span.start + by..span.end + by, s.into_inner())
}

fn shift_key(k: Spanned<ApiKey>, by: usize) -> Spanned<ApiKey> {
    let span = k.span();
    let k = k.into_inner();
    let key = ApiKey {
        id: shift(k.id, by),
        sha256: shift(k.sha256, by),
        user: k.user.map(|s| shift(s, by)),
        tier: k.tier.map(|s| shift(s, by)),
        permissions: k
            .permissions
            .map(|p| p.into_iter().map(|s| shift(s, by)).collect()),
        ip_allow: k.ip_allow.into_iter().map(|s| shift(s, by)).collect(),
        expires_at: k.expires_at.map(|s| shift(s, by)),
        disabled: k.disabled,
    };
    Spanned::new(span.start + by..span.end + by, key)
}

/// The byte ranges to parse on their own: runs of `[[api_keys]]` tables,
/// cut into batches; `None` when the plain parse should run.
fn batches(src: &str) -> Option<Vec<Range<usize>>> {
    if src.contains("\"\"\"") || src.contains("'''") {
        return None;
    }
    // Every line: its start, and what it is.
    let mut headers = Vec::new();
    let mut ends = Vec::new();
    let mut at = 0;
    for line in src.split_inclusive('\n') {
        let text = line
            .trim_end_matches(['\n', '\r'])
            .trim_end_matches([' ', '\t']);
        if text == "[[api_keys]]" {
            headers.push(at);
        } else if text.trim_start().starts_with('[') {
            ends.push(at);
        }
        at += line.len();
    }
    if headers.len() < MIN_KEYS {
        return None;
    }
    // Each table: from its header to the next line starting with `[`.
    let mut tables: Vec<Range<usize>> = Vec::with_capacity(headers.len());
    let mut e = 0;
    for (i, &h) in headers.iter().enumerate() {
        while e < ends.len() && ends[e] <= h {
            e += 1;
        }
        let next_header = headers.get(i + 1).copied().unwrap_or(src.len());
        let next_other = ends.get(e).copied().unwrap_or(src.len());
        tables.push(h..next_header.min(next_other));
    }
    // Runs of adjacent tables, in batches.
    let mut out = Vec::new();
    let mut run: Option<Range<usize>> = None;
    let mut n = 0;
    for t in tables {
        match &mut run {
            Some(r) if r.end == t.start && n < BATCH => {
                r.end = t.end;
                n += 1;
            }
            _ => {
                out.extend(run.take());
                run = Some(t);
                n = 1;
            }
        }
    }
    out.extend(run);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file with `n` keys, the key `bad` (if any) with an unknown field,
    /// and a table after the keys.
    fn file(n: usize, bad: Option<usize>) -> String {
        let mut s = String::from(
            "[upstream]\nurl = \"http://127.0.0.1:9\"\n[[users]]\nemail = \"a@example.com\"\nid = \"u_a\"\ntier = \"free\"\n",
        );
        for i in 0..n {
            s.push_str(&format!(
                "[[api_keys]]\nid = \"k{i}\"\nsha256 = \"{:064x}\"\nuser = \"u_a\"\npermissions = [\"vms:read\"]\n",
                i
            ));
            if bad == Some(i) {
                s.push_str("colour = \"blue\"\n");
            }
            if i == n / 2 {
                // A table in the middle of the keys ends a run.
                s.push_str("[[routes]]\npath = \"/v1\"\n");
            }
        }
        s.push_str("[tiers.free]\nlimit = 1\nperiod = \"1h\"\n");
        s
    }

    #[test]
    fn a_batched_parse_is_the_whole_parse() {
        let src = file(MIN_KEYS + 3 * BATCH, None);
        assert!(batches(&src).is_some_and(|b| b.len() >= 3));
        let bulk = parse(&src).unwrap();
        let whole = crate::config::parse_whole(&src).unwrap();
        assert_eq!(bulk.api_keys.len(), whole.api_keys.len());
        for (a, b) in bulk.api_keys.iter().zip(&whole.api_keys) {
            assert_eq!(a.span(), b.span());
            assert_eq!(a.get_ref().id, b.get_ref().id);
            assert_eq!(a.get_ref().id.span(), b.get_ref().id.span());
            assert_eq!(a.get_ref().sha256.span(), b.get_ref().sha256.span());
            assert_eq!(
                a.get_ref().permissions.as_ref().map(|p| p[0].span()),
                b.get_ref().permissions.as_ref().map(|p| p[0].span())
            );
        }
        assert_eq!(bulk.routes.len(), 1);
        assert_eq!(bulk.routes[0].span(), whole.routes[0].span());
    }

    #[test]
    fn an_error_in_a_batch_is_where_the_whole_parse_puts_it() {
        let src = file(MIN_KEYS + 100, Some(MIN_KEYS - 7));
        let bulk = parse(&src).unwrap_err();
        let whole = crate::config::parse_whole(&src).unwrap_err();
        assert_eq!(bulk.span, whole.span);
        assert!(bulk.message.contains("colour"), "{}", bulk.message);
    }

    #[test]
    fn multi_line_strings_and_small_files_take_the_plain_parse() {
        assert!(batches(&file(10, None)).is_none());
        let mut src = file(MIN_KEYS + 1, None);
        src.push_str("[log]\nlevel = \"\"\"info\"\"\"\n");
        assert!(batches(&src).is_none());
    }
}
