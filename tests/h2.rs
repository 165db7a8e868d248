//! HTTP/2 downstream (TLS, ALPN h2) against real peers — curl --http2,
//! nghttp, h2load — and against a raw frame writer for the protections:
//! concurrent streams, header-list size, rapid reset, CONTINUATION flood,
//! HPACK bomb, flow-control abuse, slow reading, GOAWAY on shutdown, and
//! reloads under HTTP/2 load.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::h2raw::*;
use support::tls::{client_config, Ca};
use support::*;

struct Setup {
    certs: tempfile::TempDir,
    ca: Ca,
    ca_file: std::path::PathBuf,
    upstream: Upstream,
    kg: Keygate,
}

fn tls_section(dir: &Path) -> String {
    format!(
        "\n[server.tls]\ncert_file = \"{d}/default.crt\"\nkey_file = \"{d}/default.key\"\n",
        d = dir.display()
    )
}

fn start() -> Setup {
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("keygate h2 test CA");
    let ca_file = certs.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    ca.server("localhost", &["localhost"])
        .install(certs.path(), "default");
    let upstream = Upstream::start();
    let config = format!("{}{}", config(), tls_section(certs.path()));
    let kg = Keygate::start(&config, upstream.port);
    Setup {
        certs,
        ca,
        ca_file,
        upstream,
        kg,
    }
}

fn curl(s: &Setup, args: &[&str], path: &str) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--http2", "-i", "--cacert"])
        .arg(&s.ca_file)
        .args(args)
        .arg(format!("https://localhost:{}{path}", s.kg.port))
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn curl_and_nghttp_speak_http2_through_the_same_gate() {
    let s = start();
    let key = format!("X-API-Key: {KEY_DEPLOY}");
    let (out, err) = curl(
        &s,
        &["-H", &key, "-H", "Cookie: a=1", "-H", "Cookie: b=2"],
        "/v1/vms?x=1",
    );
    assert!(out.starts_with("HTTP/2 200"), "{out}{err}");
    let seen = s.upstream.last();
    assert_eq!(seen.target, "/v1/vms?x=1");
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.header("x-auth-method"), Some("api_key"));
    assert_eq!(
        seen.header("host"),
        Some(&*format!("localhost:{}", s.kg.port))
    );
    assert_eq!(seen.all("cookie"), ["a=1; b=2"]);
    assert!(
        seen.header("x-api-key").is_none(),
        "the credential was forwarded"
    );

    // The gate refuses over HTTP/2 exactly as over HTTP/1.1.
    let (out, _) = curl(&s, &[], "/v1/vms");
    assert!(out.starts_with("HTTP/2 401"), "{out}");
    assert!(out.contains("missing_credentials"));

    // A body without content-length (curl streams stdin chunked) arrives whole.
    let mut child = Command::new("curl")
        .args([
            "-sS",
            "--http2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--cacert",
        ])
        .arg(&s.ca_file)
        .args(["-H", &format!("Authorization: Bearer {}", token("u_alice"))])
        .args([
            "-H",
            "Content-Type: application/json",
            "-T",
            "-",
            "-X",
            "POST",
        ])
        .arg(format!("https://localhost:{}/v1/vms", s.kg.port))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&vec![b'x'; 100_000]).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    let seen = s.upstream.last();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.body.len(), 100_000);

    // nghttp: ten concurrent streams on one connection; the server's
    // SETTINGS announce the stream limit.
    let out = Command::new("nghttp")
        .args(["-nv", "-m", "10", "-H", &format!("x-api-key: {KEY_CI}")])
        .arg(format!("https://localhost:{}/v1/vms", s.kg.port))
        .env("SSL_CERT_FILE", &s.ca_file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("SETTINGS_MAX_CONCURRENT_STREAMS(0x03):128"),
        "{text}"
    );
    assert_eq!(text.matches(":status: 200").count(), 10, "{text}");
}

#[test]
fn h2load_and_reloads_lose_no_request() {
    let s = start();
    let reloads = {
        let admin = s.kg.admin("/reload");
        std::thread::spawn(move || {
            for _ in 0..5 {
                std::thread::sleep(Duration::from_millis(300));
                let _ = client().post(&admin).send();
            }
        })
    };
    let out = Command::new("h2load")
        .args([
            "-n",
            "3000",
            "-c",
            "4",
            "-m",
            "10",
            "-H",
            &format!("x-api-key: {KEY_CI}"),
        ])
        .arg(format!("https://localhost:{}/v1/vms", s.kg.port))
        .output()
        .unwrap();
    reloads.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("3000 succeeded, 0 failed, 0 errored"),
        "{text}"
    );
    assert!(text.contains("3000 2xx"), "{text}");
    assert!(s.kg.metric(r#"keygate_config_reloads_total{result="success"}"#) >= 5.0);
    assert!(s.kg.metric("keygate_http2_streams_total") >= 3000.0);
}

fn raw(s: &Setup, settings: &[(u16, u32)]) -> Raw {
    Raw::open(s.kg.port, client_config(&s.ca.pem, None), settings)
}

fn still_serves(s: &Setup) {
    let (out, err) = curl(s, &["-H", &format!("X-API-Key: {KEY_CI}")], "/v1/vms");
    assert!(out.starts_with("HTTP/2 200"), "{out}{err}");
}

#[test]
fn limits_are_announced_and_an_oversized_header_list_is_refused() {
    let s = start();
    let mut c = raw(&s, &[]);
    let (frames, _) = c.read_frames(Duration::from_millis(500));
    let settings = frames
        .iter()
        .find(|f| f.kind == SETTINGS && f.flags & ACK == 0)
        .expect("server SETTINGS");
    assert_eq!(setting(settings, 0x3), Some(128), "MAX_CONCURRENT_STREAMS");
    assert_eq!(
        setting(settings, 0x6),
        Some(64 * 1024),
        "MAX_HEADER_LIST_SIZE"
    );

    // 80 KB of header values, in HEADERS + CONTINUATION: never forwarded.
    let big = "v".repeat(8000);
    let mut block = request("/v1/vms", &[("x-api-key", KEY_CI)]);
    for i in 0..10 {
        literal(&mut block, &format!("x-big-{i}"), big.as_bytes());
    }
    let (first, rest) = block.split_at(16_000);
    c.frame(HEADERS, END_STREAM, 1, first).unwrap();
    let mut chunks = rest.chunks(16_000).peekable();
    while let Some(chunk) = chunks.next() {
        let flags = if chunks.peek().is_none() {
            END_HEADERS
        } else {
            0
        };
        let _ = c.frame(CONTINUATION, flags, 1, chunk);
    }
    let (frames, _) = c.read_frames(Duration::from_secs(2));
    assert!(
        frames
            .iter()
            .any(|f| (f.kind == RST_STREAM && f.stream == 1)
                || f.kind == GOAWAY
                || (f.kind == HEADERS && f.stream == 1)),
        "{frames:?}"
    );
    assert_eq!(
        s.upstream.count(),
        0,
        "an oversized header list reached the upstream"
    );
    still_serves(&s);
}

#[test]
fn rapid_reset_ends_the_connection() {
    let s = start();
    let mut c = raw(&s, &[]);
    let block = request("/slow/x", &[("x-api-key", KEY_CI)]);
    let started = Instant::now();
    let mut sent = 0;
    for i in 0..2000u32 {
        let id = 1 + 2 * i;
        if c.frame(HEADERS, END_HEADERS | END_STREAM, id, &block)
            .is_err()
            || c.frame(RST_STREAM, 0, id, &8u32.to_be_bytes()).is_err()
        {
            break;
        }
        sent += 1;
    }
    let (frames, closed) = c.read_frames(Duration::from_secs(3));
    let goaway = frames.iter().find(|f| f.kind == GOAWAY);
    assert!(
        goaway.is_some() || closed,
        "after {sent} reset streams in {:?} the connection is still open",
        started.elapsed()
    );
    if let Some(g) = goaway {
        // ENHANCE_YOUR_CALM (0xb) from keygate, or PROTOCOL_ERROR from
        // h2's own pending-reset limit.
        assert!(matches!(g.error_code(), Some(0xb) | Some(0x1)), "{g:?}");
    }
    // Far fewer requests than streams ever reach the upstream.
    std::thread::sleep(Duration::from_secs(3));
    let forwarded = s.upstream.count();
    assert!(
        forwarded < 400,
        "{forwarded} of {sent} reset streams were forwarded"
    );
    still_serves(&s);

    // The slower variant: each stream accepted (and forwarded) before its
    // reset, so h2's pending-accept cap never sees it; keygate's own count
    // of client resets ends the connection.
    let mut c = raw(&s, &[]);
    let mut goaway = None;
    let mut closed = false;
    for i in 0..1000u32 {
        let id = 1 + 2 * i;
        let before = s.upstream.count();
        if c.frame(HEADERS, END_HEADERS | END_STREAM, id, &block)
            .is_err()
        {
            closed = true;
            break;
        }
        // Reset only once the request is upstream (accepted for certain).
        let deadline = Instant::now() + Duration::from_secs(1);
        while s.upstream.count() == before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(200));
        }
        if c.frame(RST_STREAM, 0, id, &8u32.to_be_bytes()).is_err() {
            closed = true;
            break;
        }
        if i % 20 == 19 {
            let (frames, gone) = c.read_frames(Duration::from_millis(5));
            goaway = frames.into_iter().find(|f| f.kind == GOAWAY);
            if goaway.is_some() || gone {
                closed = gone;
                break;
            }
        }
    }
    // (A GOAWAY may be lost to the TCP reset when the client keeps writing.)
    assert!(
        goaway.is_some() || closed,
        "the connection outlived 1000 resets: {} forwarded, {} resets counted, {} calm",
        s.upstream.count(),
        s.kg.metric("keygate_http2_client_resets_total"),
        s.kg.metric(r#"keygate_http2_protections_total{reason="enhance_your_calm"}"#)
    );
    if let Some(g) = goaway {
        assert_eq!(g.error_code(), Some(0xb), "ENHANCE_YOUR_CALM");
    }
    assert_eq!(
        s.kg.metric(r#"keygate_http2_protections_total{reason="enhance_your_calm"}"#),
        1.0,
        "{} forwarded, {} resets counted",
        s.upstream.count(),
        s.kg.metric("keygate_http2_client_resets_total")
    );
    still_serves(&s);
}

#[test]
fn continuation_flood_is_cut_off() {
    let s = start();
    let mut c = raw(&s, &[]);
    let block = request("/v1/vms", &[("x-api-key", KEY_CI)]);
    c.frame(HEADERS, END_STREAM, 1, &block).unwrap();
    // Endless CONTINUATION frames, never END_HEADERS: 16 MB offered.
    let junk = {
        let mut b = Vec::new();
        literal(&mut b, "x-flood", &[b'a'; 16_000]);
        b
    };
    let mut accepted = 0usize;
    for _ in 0..1000 {
        if c.frame(CONTINUATION, 0, 1, &junk).is_err() {
            break;
        }
        accepted += junk.len();
    }
    let (frames, closed) = c.read_frames(Duration::from_secs(3));
    assert!(
        closed || frames.iter().any(|f| f.kind == GOAWAY),
        "the connection survived {accepted} bytes of CONTINUATION"
    );
    assert_eq!(s.upstream.count(), 0);
    still_serves(&s);
}

#[test]
fn an_hpack_bomb_decodes_to_no_more_than_the_list_limit() {
    let s = start();
    let mut c = raw(&s, &[]);
    // 4 KB in the dynamic table once, then referenced 100 times by one
    // byte each: 400 KB decoded from ~4.2 KB on the wire.
    let mut block = request("/v1/vms", &[("x-api-key", KEY_CI)]);
    literal_indexed(&mut block, "x-bomb", &[b'b'; 4000]);
    for _ in 0..100 {
        indexed(&mut block, 62);
    }
    c.get(1, &block).unwrap();
    let (frames, _) = c.read_frames(Duration::from_secs(2));
    assert!(
        frames
            .iter()
            .any(|f| (f.kind == RST_STREAM && f.stream == 1)
                || f.kind == GOAWAY
                || (f.kind == HEADERS && f.stream == 1)),
        "{frames:?}"
    );
    assert_eq!(s.upstream.count(), 0);
    still_serves(&s);
}

#[test]
fn flow_control_abuse_and_slow_readers() {
    let s = start();
    // A window pushed past 2^31-1: FLOW_CONTROL_ERROR.
    let mut c = raw(&s, &[]);
    c.frame(WINDOW_UPDATE, 0, 0, &0x7fff_ffffu32.to_be_bytes())
        .unwrap();
    c.frame(WINDOW_UPDATE, 0, 0, &0x7fff_ffffu32.to_be_bytes())
        .unwrap();
    let (frames, _) = c.read_frames(Duration::from_secs(2));
    let goaway = frames.iter().find(|f| f.kind == GOAWAY).expect("GOAWAY");
    assert_eq!(goaway.error_code(), Some(0x3), "FLOW_CONTROL_ERROR");

    // A client that opens no window (initial window 0) gets its answer's
    // HEADERS but no DATA, and holds nothing else up.
    let mut slow = raw(&s, &[(0x4, 0)]);
    slow.get(1, &request("/v1/vms", &[("x-api-key", KEY_CI)]))
        .unwrap();
    let (frames, _) = slow.read_frames(Duration::from_secs(1));
    assert!(
        frames.iter().any(|f| f.kind == HEADERS && f.stream == 1),
        "{frames:?}"
    );
    assert!(
        !frames
            .iter()
            .any(|f| f.kind == DATA && f.stream == 1 && !f.payload.is_empty()),
        "DATA beyond a zero window"
    );
    still_serves(&s);
    // Opened, the window lets the answer through.
    slow.frame(WINDOW_UPDATE, 0, 1, &65_535u32.to_be_bytes())
        .unwrap();
    let (frames, _) = slow.read_frames(Duration::from_secs(1));
    assert!(
        frames
            .iter()
            .any(|f| f.kind == DATA && f.stream == 1 && f.flags & END_STREAM != 0),
        "{frames:?}"
    );
}

#[test]
fn shutdown_sends_goaway() {
    let s = start();
    let mut c = raw(&s, &[]);
    c.get(1, &request("/v1/vms", &[("x-api-key", KEY_CI)]))
        .unwrap();
    let (frames, _) = c.read_frames(Duration::from_millis(500));
    assert!(frames.iter().any(|f| f.kind == DATA && f.stream == 1));
    s.kg.signal("TERM");
    let (frames, _) = c.read_frames(Duration::from_secs(3));
    let goaway = frames
        .iter()
        .find(|f| f.kind == GOAWAY)
        .expect("GOAWAY at shutdown");
    assert_eq!(goaway.error_code(), Some(0), "NO_ERROR");
}

/// A stream whose body never ends does not outlive its answer: keygate
/// answers (401 here, before reading any body), then resets the stream's
/// receiving side instead of waiting for the rest.
#[test]
fn a_stream_ends_with_its_answer_even_if_its_body_never_does() {
    let s = start();
    let mut c = raw(&s, &[]);
    let mut block = Vec::new();
    literal(&mut block, ":method", b"POST");
    literal(&mut block, ":scheme", b"https");
    literal(&mut block, ":path", b"/v1/vms");
    literal(&mut block, ":authority", b"localhost");
    // HEADERS without END_STREAM, then nothing.
    c.frame(HEADERS, END_HEADERS, 1, &block).unwrap();
    let (frames, _) = c.read_frames(Duration::from_secs(2));
    assert!(
        frames
            .iter()
            .any(|f| f.kind == DATA && f.stream == 1 && f.flags & END_STREAM != 0),
        "no complete answer: {frames:?}"
    );
    assert!(
        frames.iter().any(|f| f.kind == RST_STREAM && f.stream == 1),
        "the stream was left waiting for its body: {frames:?}"
    );
    assert_eq!(s.upstream.count(), 0);
}

/// `[server.tls.http2]` sets the limits, and a reload changes them for the
/// connections after it: announced, and enforced (a stream past the
/// concurrent limit is refused and never forwarded; an idle connection gets
/// GOAWAY after `idle_timeout`).
#[test]
fn http2_limits_come_from_the_config_and_change_on_reload() {
    let s = start();
    let announced = |s: &Setup| {
        let mut c = raw(s, &[]);
        let (frames, _) = c.read_frames(Duration::from_millis(300));
        let settings = frames
            .iter()
            .find(|f| f.kind == SETTINGS && f.flags & ACK == 0)
            .expect("server SETTINGS")
            .clone();
        (setting(&settings, 0x3), setting(&settings, 0x6))
    };
    assert_eq!(announced(&s), (Some(128), Some(64 * 1024)));

    let limited = format!(
        "{}{}[server.tls.http2]\nmax_concurrent_streams = 4\nmax_header_list_size = 8192\nidle_timeout = \"2s\"\nmax_client_resets = 50\n",
        config(),
        tls_section(s.certs.path())
    );
    s.kg.write_config(&limited, s.upstream.port);
    let deadline = Instant::now() + Duration::from_secs(15);
    while announced(&s) != (Some(4), Some(8192)) {
        assert!(
            Instant::now() < deadline,
            "the new limits were never announced: {}",
            s.kg.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Five slow requests at once on one connection: the fifth is refused.
    let mut c = raw(&s, &[]);
    let _ = c.read_frames(Duration::from_millis(200));
    let block = request("/slow/x", &[("x-api-key", KEY_CI)]);
    for id in [1, 3, 5, 7, 9] {
        c.get(id, &block).unwrap();
    }
    let (frames, _) = c.read_frames(Duration::from_secs(1));
    let refused = frames
        .iter()
        .find(|f| f.kind == RST_STREAM && f.stream == 9)
        .unwrap_or_else(|| panic!("stream 9 was not refused: {frames:?}"));
    // REFUSED_STREAM, or PROTOCOL_ERROR.
    assert!(
        matches!(refused.error_code(), Some(0x7) | Some(0x1)),
        "{refused:?}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(s.upstream.count(), 4, "more streams than the limit went up");

    // A connection without a stream: GOAWAY after about 2 s, not 60 s.
    let mut idle = raw(&s, &[]);
    let started = Instant::now();
    let (frames, closed) = idle.read_frames(Duration::from_secs(6));
    assert!(
        frames.iter().any(|f| f.kind == GOAWAY) || closed,
        "no GOAWAY within 6 s of idleness: {frames:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(1500));
}
