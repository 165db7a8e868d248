//! Request paths as the router sees them. Matching on the raw path would let
//! `/%61dmin`, `//admin` or `/x/../admin` slip past a rule for `/admin` while
//! the upstream still serves `/admin`, so the path is normalised first (RFC
//! 3986 §6.2.2: unreserved percent-escapes decoded, hex upper-cased, dot
//! segments removed, repeated slashes merged) and that normalised path is
//! both what is matched and what is forwarded.

use std::borrow::Cow;

/// The normalised path, or `Err` with a reason for a 400.
pub fn normalize(raw: &str) -> Result<Cow<'_, str>, &'static str> {
    if !raw.starts_with('/') {
        return Err("the request target must be an absolute path");
    }
    if !raw.contains('%') && !raw.contains("//") && !raw.contains("/.") {
        return Ok(Cow::Borrowed(raw));
    }
    let decoded = decode_unreserved(raw)?;
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "" | "." => trailing_slash = i == last,
            ".." => {
                out.pop();
                trailing_slash = i == last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for seg in &out {
        path.push('/');
        path.push_str(seg);
    }
    if trailing_slash || out.is_empty() {
        path.push('/');
    }
    Ok(Cow::Owned(path))
}

fn decode_unreserved(raw: &str) -> Result<String, &'static str> {
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            out.push(bytes[i] as char);
            i += 1;
            continue;
        }
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .ok_or("a percent sign in the path is not followed by two hex digits")?;
        if hex.is_ascii_alphanumeric() || matches!(hex, b'-' | b'.' | b'_' | b'~') {
            out.push(hex as char);
        } else {
            out.push('%');
            out.push_str(&format!("{hex:02X}"));
        }
        i += 3;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_paths_are_borrowed_unchanged() {
        assert!(matches!(
            normalize("/v1/vms/42"),
            Ok(Cow::Borrowed("/v1/vms/42"))
        ));
        assert_eq!(normalize("/v1/vms/").unwrap(), "/v1/vms/");
    }

    #[test]
    fn encoded_unreserved_characters_are_decoded() {
        assert_eq!(normalize("/%61dmin").unwrap(), "/admin");
        assert_eq!(normalize("/v1/vms/%7e").unwrap(), "/v1/vms/~");
    }

    #[test]
    fn encoded_slash_stays_encoded_with_upper_hex() {
        assert_eq!(normalize("/a%2fb").unwrap(), "/a%2Fb");
    }

    #[test]
    fn dot_segments_and_double_slashes_are_removed() {
        assert_eq!(normalize("/v1/x/../admin").unwrap(), "/v1/admin");
        assert_eq!(normalize("//admin").unwrap(), "/admin");
        assert_eq!(normalize("/a/./b/").unwrap(), "/a/b/");
        assert_eq!(normalize("/../../etc").unwrap(), "/etc");
        assert_eq!(normalize("/a/..").unwrap(), "/");
        assert_eq!(normalize("/%2e%2e/admin").unwrap(), "/admin");
    }

    #[test]
    fn broken_escapes_and_relative_targets_are_refused() {
        assert!(normalize("/a%2").is_err());
        assert!(normalize("/a%zz").is_err());
        assert!(normalize("*").is_err());
    }
}
