//! The head keygate lays out for an HTTP/2 stream (`proxy::h2::assemble`,
//! checked by the one validation HTTP/1.1 heads get) says exactly what the
//! stream said: same method and target,
//! every header (but the dropped connection-specific ones, and cookies
//! joined) once with the same value, in the same order among the values of
//! one name, `Host` from `:authority` first, no header injected, body
//! framing as declared. Inputs are header lists the `http`
//! crate accepts, as `h2` hands them over after its own validation.
//! Also: the redirect listener's `Host` filter only ever returns a prefix
//! of its input made of host characters.
#![no_main]

use keygate::http1::parse::{BodyKind, HeadView};
use keygate::proxy::h2::{assemble, CONNECTION_SPECIFIC as DROPPED};
use keygate::proxy::tls::host_only;
use libfuzzer_sys::fuzz_target;


fuzz_target!(|data: &[u8]| {
    if let Some(host) = host_only(data) {
        assert!(data.starts_with(host));
        assert!(host
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b".-[]:".contains(b)));
    }

    // Fields separated by 0xff: method, path, authority, then name, value
    // pairs; a flag byte first says whether DATA follows.
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mut fields = rest.split(|&b| b == 0xff);
    let (Some(method), Some(path), Some(authority)) = (fields.next(), fields.next(), fields.next())
    else {
        return;
    };
    let Ok(method) = http::Method::from_bytes(method) else {
        return;
    };
    if method == http::Method::CONNECT {
        return;
    }
    let (Ok(path), Ok(authority)) = (std::str::from_utf8(path), std::str::from_utf8(authority)) else {
        return;
    };
    let Ok(uri) = format!("https://{authority}{path}").parse::<http::Uri>() else {
        return;
    };
    if uri.authority().map(|a| a.as_str()) != Some(authority) || !path.starts_with('/') {
        return;
    }
    let mut builder = http::Request::builder().method(method.clone()).uri(uri.clone());
    let mut sent: Vec<(String, Vec<u8>)> = Vec::new();
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(name),
            http::HeaderValue::from_bytes(value),
        ) else {
            return;
        };
        sent.push((n.as_str().to_string(), v.as_bytes().to_vec()));
        builder = builder.header(n, v);
    }
    let Ok(req) = builder.body(()) else {
        return;
    };
    let has_body = flags & 1 == 1;
    let (parts, ()) = req.into_parts();
    let (out, head) = assemble(&parts, has_body);

    // Refusing is always allowed (the application answers 400); accepting
    // must read back exactly what was sent.
    let Ok(head) = head else {
        return;
    };
    assert_eq!(head.len, out.len(), "bytes after the head");
    assert_eq!(head.method, method);
    let want_target = uri.path_and_query().map_or("/", |p| p.as_str());
    assert_eq!(head.target.get(&out), want_target.as_bytes());
    let view = HeadView {
        buf: &out,
        headers: &head.headers,
    };
    let got: Vec<(String, Vec<u8>)> = view
        .headers
        .iter()
        .map(|h| {
            (
                String::from_utf8_lossy(h.name.get(&out)).to_ascii_lowercase(),
                h.value.get(&out).to_vec(),
            )
        })
        .collect();
    // Host: :authority, once (a different Host is kept, for the engine to
    // refuse as a duplicate).
    assert_eq!(got[0], ("host".to_string(), authority.as_bytes().to_vec()));
    let mut expected: Vec<(String, Vec<u8>)> = vec![got[0].clone()];
    let mut cookies: Vec<Vec<u8>> = Vec::new();
    for (n, v) in &sent {
        if n == "host" && v.as_slice() == authority.as_bytes() {
            continue;
        }
        if n == "cookie" {
            cookies.push(v.clone());
            continue;
        }
        if DROPPED.contains(&n.as_str()) {
            continue;
        }
        expected.push((n.clone(), v.clone()));
    }
    if !cookies.is_empty() {
        expected.push(("cookie".to_string(), cookies.join(&b"; "[..])));
    }
    let declares_length = sent.iter().any(|(n, _)| n == "content-length");
    if has_body && !declares_length {
        expected.push(("transfer-encoding".to_string(), b"chunked".to_vec()));
    }
    // Values are taken verbatim: a value padded with whitespace (which
    // HTTP/1.1's parser would trim) is refused, never trimmed.
    // Field order across names is not kept (the `http` map groups values by
    // name, as HTTP allows); the order of one name's values is.
    let by_name = |list: Vec<(String, Vec<u8>)>| {
        let mut m: std::collections::BTreeMap<String, Vec<Vec<u8>>> = Default::default();
        for (n, v) in list {
            m.entry(n).or_default().push(v);
        }
        m
    };
    assert_eq!(
        by_name(got),
        by_name(expected),
        "the HTTP/1.1 head does not say what the stream said"
    );
    if !has_body && !declares_length {
        assert_eq!(head.body, BodyKind::None);
    }
    if has_body && !declares_length {
        assert_eq!(head.body, BodyKind::Chunked);
    }
});
