//! One line per request on stdout (journald picks it up), as JSON or as
//! `key=value` text. It names the principal and the route, never a token,
//! key, password or query string.
//!
//! Lines are written off the event loop: a proxy thread formats its line
//! into a buffer of its own (in JSON: no allocation, lock or channel per line) and
//! hands the buffer to a writer thread through a bounded queue when it
//! holds [`HANDOFF_BYTES`] or, at the latest, every [`WRITE_EVERY`] (the
//! worker's [`tick`]); the writer wakes every 20 ms and sends whatever has
//! queued up in one `write`. When the queue is full (the disk or the
//! journal is slower than the traffic) the lines are dropped and counted
//! in `keygate_access_log_dropped_total`: a request never waits for the
//! log.

use std::io::Write;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::metrics::METRICS;
use crate::policy::AccessLog;

/// Lines waiting for the writer; past this they are dropped.
const QUEUE_LINES: usize = 64 * 1024;
/// And bytes waiting: a slow log pipe costs at most this much memory.
const QUEUE_BYTES: usize = 16 * 1024 * 1024;
/// Client-chosen fields (path, user agent) are cut to this many bytes.
pub const MAX_FIELD: usize = 1024;

static QUEUED: AtomicUsize = AtomicUsize::new(0);

/// `text` cut to [`MAX_FIELD`] bytes at a character boundary.
pub fn clip(text: &str) -> &str {
    if text.len() <= MAX_FIELD {
        return text;
    }
    let mut end = MAX_FIELD;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}
/// The writer sends at most this much in one `write`.
const BATCH_BYTES: usize = 256 * 1024;
/// A thread hands its lines over when they fill this much.
const HANDOFF_BYTES: usize = 32 * 1024;

/// One thread's lines not yet handed to the writer.
struct Pending {
    buf: Vec<u8>,
    lines: u64,
}

impl Pending {
    fn hand_off(&mut self) {
        if self.lines == 0 {
            return;
        }
        let lines = std::mem::take(&mut self.lines);
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(HANDOFF_BYTES + 2048));
        let Some(tx) = writer() else {
            METRICS.access_log_dropped.inc_by(lines);
            return;
        };
        let len = chunk.len();
        if QUEUED.fetch_add(len, Ordering::Relaxed) + len > QUEUE_BYTES {
            QUEUED.fetch_sub(len, Ordering::Relaxed);
            METRICS.access_log_dropped.inc_by(lines);
            return;
        }
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            tx.try_send(Msg::Line(chunk))
        {
            QUEUED.fetch_sub(len, Ordering::Relaxed);
            METRICS.access_log_dropped.inc_by(lines);
        }
    }
}

impl Drop for Pending {
    /// A thread that ends hands over what it still holds.
    fn drop(&mut self) {
        self.hand_off();
    }
}

thread_local! {
    static PENDING: std::cell::RefCell<Pending> = const {
        std::cell::RefCell::new(Pending { buf: Vec::new(), lines: 0 })
    };
}

/// Hand this thread's lines to the writer now; proxy threads call it every
/// [`WRITE_EVERY`], so a quiet thread's lines wait no longer than that.
pub fn tick() {
    let _ = PENDING.try_with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            p.hand_off();
        }
    });
}

#[derive(Serialize)]
pub struct Entry<'a> {
    pub time: &'a str,
    pub request_id: &'a str,
    pub client_ip: Option<IpAddr>,
    pub method: &'a str,
    pub path: &'a str,
    pub route: &'a str,
    pub status: u16,
    /// The upstream's status, when the request was forwarded.
    pub upstream_status: Option<u16>,
    /// The request reached the upstream (its head was written there),
    /// answered or not: an abandoned request (status 499) that was
    /// forwarded may have acted upstream.
    pub forwarded: bool,
    pub principal: Option<&'a str>,
    pub auth_method: Option<&'static str>,
    pub key_id: Option<&'a str>,
    pub tier: Option<&'a str>,
    pub code: Option<&'static str>,
    /// Request body bytes read from the client (as framed on the wire).
    pub bytes_in: u64,
    /// Response bytes written to the client, head included.
    pub bytes_out: u64,
    pub user_agent: Option<&'a str>,
    pub upstream_ms: Option<f64>,
    pub total_ms: f64,
}

/// Calls `f` with the time, RFC 3339 with milliseconds. Formatted once per
/// millisecond per thread: at tens of thousands of requests a second most
/// lines share it.
pub fn with_now<R>(f: impl FnOnce(&str) -> R) -> R {
    thread_local! {
        static LAST: std::cell::RefCell<(u128, String)> = const { std::cell::RefCell::new((0, String::new())) };
    }
    let t = SystemTime::now();
    let ms = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if last.0 != ms || last.1.is_empty() {
            last.0 = ms;
            last.1.clear();
            let _ = std::fmt::Write::write_fmt(
                &mut last.1,
                format_args!("{}", humantime::format_rfc3339_millis(t)),
            );
        }
        f(&last.1)
    })
}

/// The bytes a JSON string cannot hold as they are: control characters,
/// `"` and `\\`.
const NEEDS_ESCAPE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

/// Where the first byte that needs an escape is. Eight bytes at a time
/// (each test below is exact for "some byte of the word is ..."), then
/// byte by byte from the word that holds one.
fn first_escape(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let mut i = 0;
    while let Some(word) = bytes.get(i..i + 8) {
        let w = u64::from_le_bytes(word.try_into().unwrap_or_default());
        let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
        let quote = has_zero(w ^ (ONES * u64::from(b'"')));
        let backslash = has_zero(w ^ (ONES * u64::from(b'\\')));
        if below_space | quote | backslash != 0 {
            break;
        }
        i += 8;
    }
    bytes[i..]
        .iter()
        .position(|&b| NEEDS_ESCAPE[b as usize])
        .map(|at| i + at)
}

/// `s` as a JSON string: quotes, backslashes and control characters
/// escaped, everything else (UTF-8 included) as it is. Most values need no
/// escape at all: one table lookup per byte finds that, and the string is
/// copied whole.
fn json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    while let Some(at) = first_escape(&bytes[start..]) {
        let i = start + at;
        out.extend_from_slice(&bytes[start..i]);
        match bytes[i] {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            b => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

fn json_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => json_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

fn json_num(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// A duration from [`ms`] (whole microseconds, in milliseconds) as
/// serde_json writes that `f64`: `12.0`, `0.25`, `1.234`. Written from the
/// integer: the shortest decimal that reads back as `k / 1000.0` is `k`'s
/// digits with the point moved, trailing zeros dropped.
fn json_ms(out: &mut Vec<u8>, n: f64) {
    let micros = (n * 1e3).round();
    if !(0.0..1e15).contains(&micros) {
        let _ = write!(out, "{n}");
        return;
    }
    let micros = micros as u64;
    json_num(out, micros / 1000);
    let frac = micros % 1000;
    out.push(b'.');
    if frac == 0 {
        out.push(b'0');
        return;
    }
    let digits = [frac / 100, frac / 10 % 10, frac % 10];
    let len = if frac.is_multiple_of(100) {
        1
    } else if frac.is_multiple_of(10) {
        2
    } else {
        3
    };
    out.extend(digits[..len].iter().map(|d| b'0' + *d as u8));
}

/// The JSON line, written by hand: the same object `serde_json` would
/// write for [`Entry`] (a test holds them equal), without its generic
/// machinery on the proxy thread.
fn json_line(e: &Entry<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"time\":");
    json_str(out, e.time);
    out.extend_from_slice(b",\"request_id\":");
    json_str(out, e.request_id);
    out.extend_from_slice(b",\"client_ip\":");
    match e.client_ip {
        // IPv4 by hand: `Display` for an address is padding-aware and
        // costs as much as the rest of the line.
        Some(IpAddr::V4(ip)) => {
            let [a, b, c, d] = ip.octets();
            out.push(b'"');
            json_num(out, a);
            for octet in [b, c, d] {
                out.push(b'.');
                json_num(out, octet);
            }
            out.push(b'"');
        }
        Some(ip) => {
            let _ = write!(out, "\"{ip}\"");
        }
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"method\":");
    json_str(out, e.method);
    out.extend_from_slice(b",\"path\":");
    json_str(out, e.path);
    out.extend_from_slice(b",\"route\":");
    json_str(out, e.route);
    out.extend_from_slice(b",\"status\":");
    json_num(out, e.status);
    out.extend_from_slice(b",\"upstream_status\":");
    match e.upstream_status {
        Some(s) => json_num(out, s),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(if e.forwarded {
        b",\"forwarded\":true"
    } else {
        b",\"forwarded\":false"
    });
    out.extend_from_slice(b",\"principal\":");
    json_opt_str(out, e.principal);
    out.extend_from_slice(b",\"auth_method\":");
    json_opt_str(out, e.auth_method);
    out.extend_from_slice(b",\"key_id\":");
    json_opt_str(out, e.key_id);
    out.extend_from_slice(b",\"tier\":");
    json_opt_str(out, e.tier);
    out.extend_from_slice(b",\"code\":");
    json_opt_str(out, e.code);
    out.extend_from_slice(b",\"bytes_in\":");
    json_num(out, e.bytes_in);
    out.extend_from_slice(b",\"bytes_out\":");
    json_num(out, e.bytes_out);
    out.extend_from_slice(b",\"user_agent\":");
    json_opt_str(out, e.user_agent);
    out.extend_from_slice(b",\"upstream_ms\":");
    match e.upstream_ms {
        Some(m) => json_ms(out, m),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"total_ms\":");
    json_ms(out, e.total_ms);
    out.push(b'}');
}

pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

enum Msg {
    Line(Vec<u8>),
    /// Write what is queued, then answer.
    Flush(mpsc::Sender<()>),
}

fn writer() -> Option<&'static SyncSender<Msg>> {
    static WRITER: OnceLock<Option<SyncSender<Msg>>> = OnceLock::new();
    WRITER
        .get_or_init(|| {
            let (tx, rx) = mpsc::sync_channel(QUEUE_LINES);
            let spawned = std::thread::Builder::new()
                .name("keygate access log".into())
                .spawn(move || run_writer(rx));
            match spawned {
                Ok(_) => Some(tx),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the access log writer; access lines are dropped");
                    None
                }
            }
        })
        .as_ref()
}

/// How often the writer wakes to write what has queued up. It sleeps
/// instead of waiting on the queue, so a proxy thread handing over a line
/// never has to wake it (no futex call, no context switch per request).
pub const WRITE_EVERY: Duration = Duration::from_millis(20);

fn run_writer(rx: Receiver<Msg>) {
    let mut batch = Vec::with_capacity(BATCH_BYTES);
    let mut waiting = Vec::new();
    loop {
        std::thread::sleep(WRITE_EVERY);
        loop {
            match rx.try_recv() {
                Ok(Msg::Line(line)) => {
                    QUEUED.fetch_sub(line.len(), Ordering::Relaxed);
                    batch.extend_from_slice(&line);
                    if batch.len() >= BATCH_BYTES {
                        write_out(&mut batch);
                    }
                }
                Ok(Msg::Flush(done)) => waiting.push(done),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    write_out(&mut batch);
                    return;
                }
            }
        }
        write_out(&mut batch);
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
    }
}

fn write_out(batch: &mut Vec<u8>) {
    if batch.is_empty() {
        return;
    }
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(batch);
    let _ = out.flush();
    batch.clear();
}

pub fn write(format: AccessLog, entry: &Entry<'_>) {
    if format == AccessLog::Off {
        return;
    }
    let written = PENDING.try_with(|p| {
        let Ok(mut p) = p.try_borrow_mut() else {
            return false;
        };
        match format {
            AccessLog::Json => json_line(entry, &mut p.buf),
            AccessLog::Text => p.buf.extend_from_slice(text(entry).as_bytes()),
            AccessLog::Off => {}
        }
        p.buf.push(b'\n');
        p.lines += 1;
        if p.buf.len() >= HANDOFF_BYTES {
            p.hand_off();
        }
        true
    });
    if written != Ok(true) {
        METRICS.access_log_dropped.inc();
    }
}

/// Write every queued line (at shutdown, after the proxy threads ended);
/// waits at most a second.
pub fn flush() {
    tick();
    let Some(tx) = writer() else {
        return;
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    let (done, wait) = mpsc::channel();
    let mut msg = Msg::Flush(done);
    // Never block: a full queue behind a stalled stdout must not hold up
    // the exit for longer than the deadline.
    loop {
        match tx.try_send(msg) {
            Ok(()) => break,
            Err(TrySendError::Full(m)) if std::time::Instant::now() < deadline => {
                msg = m;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return,
        }
    }
    let _ = wait.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
}

fn text(e: &Entry<'_>) -> String {
    let opt = |v: Option<&str>| v.unwrap_or("-").to_string();
    let num = |v: Option<u16>| v.map_or("-".to_string(), |n| n.to_string());
    format!(
        "{} {} {} {} {:?} route={:?} status={} upstream_status={} forwarded={} principal={} method={} key={} tier={} code={} bytes_in={} bytes_out={} ua={:?} upstream_ms={} total_ms={}",
        e.time,
        e.request_id,
        e.client_ip.map_or("-".to_string(), |ip| ip.to_string()),
        e.method,
        e.path,
        e.route,
        e.status,
        num(e.upstream_status),
        e.forwarded,
        opt(e.principal),
        opt(e.auth_method),
        opt(e.key_id),
        opt(e.tier),
        opt(e.code),
        e.bytes_in,
        e.bytes_out,
        e.user_agent.unwrap_or("-"),
        e.upstream_ms.map_or("-".to_string(), |m| m.to_string()),
        e.total_ms,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let mut samples: Vec<String> = (0u32..0x80)
            .filter_map(char::from_u32)
            .map(|c| format!("a{c}b{c}{c}"))
            .collect();
        // Every position in and across the eight-byte words.
        for c in (0u32..0x80).filter_map(char::from_u32) {
            for at in 0..=24 {
                samples.push(format!("{}{c}{}", "x".repeat(at), "\u{e9}y".repeat(9)));
            }
        }
        samples.extend(["", "plain", "\u{e9}\u{2028}\u{1f600}", "\\\"\n\r\t"].map(String::from));
        for s in samples {
            let mut ours = Vec::new();
            json_str(&mut ours, &s);
            assert_eq!(
                String::from_utf8(ours).unwrap(),
                serde_json::to_string(&s).unwrap(),
                "{s:?}"
            );
        }
    }

    #[test]
    fn durations_are_written_as_serde_json_writes_them() {
        let mut seen = 0;
        let mut check = |micros: u64| {
            let n = ms(Duration::from_micros(micros));
            let mut ours = Vec::new();
            json_ms(&mut ours, n);
            assert_eq!(
                String::from_utf8(ours).unwrap(),
                serde_json::to_string(&n).unwrap(),
                "{micros} µs"
            );
            seen += 1;
        };
        (0..200_000).for_each(&mut check);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            check(x % 1_000_000_000_000);
        }
        assert_eq!(seen, 400_000);
    }

    #[test]
    fn the_hand_written_line_is_what_serde_json_writes() {
        let time = with_now(str::to_owned);
        let mut e = Entry {
            time: &time,
            request_id: "r-1",
            client_ip: Some("2001:db8::1".parse().unwrap()),
            method: "GET",
            path: "/v1/vms/\"x\\y\u{1}\u{8}\u{c}\n\u{e9}",
            route: "/v1/vms/{id}",
            status: 200,
            upstream_status: Some(201),
            forwarded: true,
            principal: Some("u_alice"),
            auth_method: Some("jwt"),
            key_id: None,
            tier: Some("pro"),
            code: None,
            bytes_in: 10,
            bytes_out: 1234,
            user_agent: Some("curl/8 \t tab"),
            upstream_ms: Some(0.25),
            total_ms: 1.5,
        };
        for round in 0..3 {
            let mut ours = Vec::new();
            json_line(&e, &mut ours);
            let theirs = serde_json::to_vec(&e).unwrap();
            let a: serde_json::Value = serde_json::from_slice(&ours).unwrap();
            let b: serde_json::Value = serde_json::from_slice(&theirs).unwrap();
            assert_eq!(a, b, "{}", String::from_utf8_lossy(&ours));
            assert_eq!(ours, theirs);
            if round == 0 {
                e.client_ip = Some("10.0.255.1".parse().unwrap());
                e.path = "/v1/\u{7f}\u{1f}\u{0}\\\"plain";
                continue;
            }
            e.client_ip = None;
            e.upstream_status = None;
            e.forwarded = false;
            e.upstream_ms = None;
            e.total_ms = 12.0;
        }
    }
}
