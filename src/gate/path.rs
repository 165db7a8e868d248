//! Request paths as the router sees them. Matching on the raw path would let
//! `/%61dmin`, `//admin` or `/x/../admin` slip past a rule for `/admin` while
//! the upstream still serves `/admin`, so the path is normalised first (RFC
//! 3986 §6.2.2: unreserved percent-escapes decoded, hex upper-cased, dot
//! segments removed, repeated slashes merged) and that normalised path is
//! both what is matched and what is forwarded. It works on bytes and takes
//! only visible ASCII without `#` or `\\` (what the HTTP parser lets
//! through), so its output never holds a dot segment, `#` or a non-ASCII
//! byte.

use std::borrow::Cow;

/// The normalised path, or `Err` with a reason for a 400.
pub fn normalize(raw: &str) -> Result<Cow<'_, str>, &'static str> {
    if !raw.starts_with('/') {
        return Err("the request target must be an absolute path");
    }
    if !raw
        .bytes()
        .all(|b| (0x21..0x7f).contains(&b) && b != b'#' && b != b'\\')
    {
        return Err("the path may only hold visible ASCII characters, without # or \\");
    }
    if raw.contains(';') {
        // Tomcat and Spring read `/admin;x/y` as `/admin/y`.
        return Err("the path must not contain ';' (path parameters)");
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
    let mut path = Vec::with_capacity(decoded.len());
    for seg in &out {
        path.push(b'/');
        path.extend_from_slice(seg.as_bytes());
    }
    if trailing_slash || out.is_empty() {
        path.push(b'/');
    }
    // Only ASCII went in, and only ASCII is written.
    Ok(Cow::Owned(String::from_utf8(path).unwrap_or_default()))
}

/// Decode the escapes of unreserved characters (RFC 3986 §2.3); every other
/// escape stays, its hex in upper case.
fn decode_unreserved(raw: &str) -> Result<String, &'static str> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let digit = |j: usize| bytes.get(j).and_then(|&b| (b as char).to_digit(16));
        let (Some(hi), Some(lo)) = (digit(i + 1), digit(i + 2)) else {
            return Err("a percent sign in the path is not followed by two hex digits");
        };
        let byte = (hi * 16 + lo) as u8;
        if matches!(byte, b'/' | b'\\' | b';' | b'%') || byte.is_ascii_control() {
            // Decoded by some upstreams before they resolve dot segments
            // (`/public/..%2Fadmin`): refused, as Spring's StrictHttpFirewall does.
            return Err(
                "the path must not contain an encoded '/', '\\', ';', '%' or control character",
            );
        }
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte);
        } else {
            out.extend_from_slice(&[
                b'%',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 15)],
            ]);
        }
        i += 3;
    }
    String::from_utf8(out).map_err(|_| "the path is not ASCII")
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
    fn other_escapes_stay_encoded_with_upper_hex() {
        assert_eq!(normalize("/a%3fb%c3%a9").unwrap(), "/a%3Fb%C3%A9");
    }

    #[test]
    fn separators_peers_decode_differently_are_refused() {
        for bad in [
            "/a%2fb",
            "/public/..%2Fadmin",
            "/public/..%5Cadmin/x",
            "/admin;/x",
            "/public/..;/admin/x",
            "/admin%3bx",
            "/%252e%252e/admin",
            "/a%00b",
            "/a%0d%0aX:%20y",
        ] {
            assert!(normalize(bad).is_err(), "{bad:?}");
        }
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

    #[test]
    fn fragments_backslashes_and_raw_non_ascii_are_refused() {
        for bad in [
            "/admin#",
            "/a\\..\\admin",
            "/caf\u{e9}/%41",
            "/a b",
            "/a\u{0}",
        ] {
            assert!(normalize(bad).is_err(), "{bad:?}");
        }
        assert_eq!(normalize("/caf%C3%A9/%41").unwrap(), "/caf%C3%A9/A");
        assert_eq!(normalize("/a%23b/..").unwrap(), "/");
        assert_eq!(
            normalize("/a?b").unwrap(),
            "/a?b",
            "the query is not the normaliser's"
        );
    }
}
