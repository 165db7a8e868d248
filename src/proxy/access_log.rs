//! One line per request on stdout (journald picks it up), as JSON or as
//! `key=value` text. It names the principal and the route, never a token,
//! key, password or query string.
//!
//! Lines are written off the event loop: a proxy thread formats its line
//! and hands it to a writer thread through a bounded queue, and the writer
//! sends whatever has queued up in one `write`. When the queue is full (the
//! disk or the journal is slower than the traffic) the line is dropped and
//! counted in `keygate_access_log_dropped_total`: a request never waits for
//! the log.

use std::io::Write;
use std::net::IpAddr;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::metrics::METRICS;
use crate::policy::AccessLog;

/// Lines waiting for the writer; past this they are dropped.
const QUEUE_LINES: usize = 64 * 1024;
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

fn run_writer(rx: Receiver<Msg>) {
    let mut batch = Vec::with_capacity(BATCH_BYTES);
    let mut waiting = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Line(line) => batch.extend_from_slice(&line),
                Msg::Flush(done) => waiting.push(done),
            }
            if batch.len() < BATCH_BYTES {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&batch);
            let _ = out.flush();
            batch.clear();
        }
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
    }
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
    if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = tx.try_send(Msg::Line(line))
    {
        METRICS.access_log_dropped.inc();
    }
}

/// Write every queued line (at shutdown); waits at most a second.
pub fn flush() {
    let Some(tx) = writer() else {
        return;
    };
    let (done, wait) = mpsc::channel();
    if tx.send(Msg::Flush(done)).is_ok() {
        let _ = wait.recv_timeout(Duration::from_secs(1));
    }
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
