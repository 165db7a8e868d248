//! One line per request on stdout (journald picks it up), as JSON or as
//! `key=value` text. It names the principal and the route, never a token,
//! key, password or query string.

use std::io::Write;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::policy::AccessLog;

#[derive(Serialize)]
pub struct Entry<'a> {
    pub time: String,
    pub request_id: &'a str,
    pub client_ip: Option<IpAddr>,
    pub method: &'a str,
    pub path: &'a str,
    pub route: &'a str,
    pub status: u16,
    pub principal: Option<&'a str>,
    pub auth_method: Option<&'static str>,
    pub key_id: Option<&'a str>,
    pub tier: Option<&'a str>,
    pub code: Option<&'static str>,
    pub upstream_ms: Option<f64>,
    pub total_ms: f64,
}

pub fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
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
    // One write per line keeps lines whole when threads interleave.
    let _ = std::io::stdout().lock().write_all(&line);
}

fn text(e: &Entry<'_>) -> String {
    let opt = |v: Option<&str>| v.unwrap_or("-").to_string();
    format!(
        "{} {} {} {} {:?} route={:?} status={} principal={} method={} key={} tier={} code={} upstream_ms={} total_ms={}",
        e.time,
        e.request_id,
        e.client_ip.map_or("-".to_string(), |ip| ip.to_string()),
        e.method,
        e.path,
        e.route,
        e.status,
        opt(e.principal),
        opt(e.auth_method),
        opt(e.key_id),
        opt(e.tier),
        opt(e.code),
        e.upstream_ms.map_or("-".to_string(), |m| m.to_string()),
        e.total_ms,
    )
}
