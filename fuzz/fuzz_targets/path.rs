//! `gate::path::normalize` never panics, and a path it returns is one the
//! router and the upstream read alike: it starts with `/`, is ASCII without
//! `#` or `\`, has no `.` or `..` segment and no `//`, and normalising it
//! again changes nothing.
#![no_main]

use keygate::gate::path::normalize;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(p) = normalize(s) else {
        return;
    };
    assert!(p.starts_with('/'), "{s:?} -> {p:?}");
    assert!(p.is_ascii(), "{s:?} -> {p:?}");
    assert!(!p.contains('#') && !p.contains('\\'), "{s:?} -> {p:?}");
    assert!(!p.contains("//"), "{s:?} -> {p:?}");
    assert!(
        p.split('/').all(|seg| seg != "." && seg != ".."),
        "dot segment: {s:?} -> {p:?}"
    );
    match normalize(&p) {
        Ok(again) => assert_eq!(again, p, "not idempotent: {s:?}"),
        Err(why) => panic!("{s:?} -> {p:?}, which is refused: {why}"),
    }
});
