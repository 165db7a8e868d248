//! One line per request on stdout (journald picks it up), as JSON or as
//! `key=value` text. It names the principal and the route, never a token,
//! key, password or query string.
//!
//! Lines are written off the event loop: a proxy thread formats its line
//! and hands it to a writer thread through a bounded queue, and the writer
//! wakes every 20 ms and sends whatever has queued up in one `write`. When the queue is full (the
//! disk or the journal is slower than the traffic) the line is dropped and
//! counted in `keygate_access_log_dropped_total`: a request never waits for
//! the log.

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

#[derive(Serialize)]
pub struct Entry<'a> {
    pub time: String,
    pub request_id: &'a str,
    pub client_ip: Option<IpAddr>,
    pub method: &'a str,
    pub path: &'a str,
    pub route: &'a str,
    pub status: u16,
    /// The upstream's status, when the request was forwarded.
    pub upstream_status: Option<u16>,
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

pub fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
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
const WRITE_EVERY: Duration = Duration::from_millis(20);

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
    let mut line = match format {
        AccessLog::Off => return,
        AccessLog::Json => match serde_json::to_vec(entry) {
            Ok(line) => line,
            Err(_) => return,
        },
        AccessLog::Text => text(entry).into_bytes(),
    };
    line.push(b'\n');
    let Some(tx) = writer() else {
        METRICS.access_log_dropped.inc();
        return;
    };
    let len = line.len();
    if QUEUED.fetch_add(len, Ordering::Relaxed) + len > QUEUE_BYTES {
        QUEUED.fetch_sub(len, Ordering::Relaxed);
        METRICS.access_log_dropped.inc();
        return;
    }
    if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = tx.try_send(Msg::Line(line))
    {
        QUEUED.fetch_sub(len, Ordering::Relaxed);
        METRICS.access_log_dropped.inc();
    }
}

/// Write every queued line (at shutdown); waits at most a second.
pub fn flush() {
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
        "{} {} {} {} {:?} route={:?} status={} upstream_status={} principal={} method={} key={} tier={} code={} bytes_in={} bytes_out={} ua={:?} upstream_ms={} total_ms={}",
        e.time,
        e.request_id,
        e.client_ip.map_or("-".to_string(), |ip| ip.to_string()),
        e.method,
        e.path,
        e.route,
        e.status,
        num(e.upstream_status),
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
