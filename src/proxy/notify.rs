//! systemd's notification protocol (`sd_notify(3)`), for `Type=notify`:
//! `READY=1` once the proxy threads are serving, `WATCHDOG=1` while every
//! proxy thread's event loop still turns, and `STOPPING=1` at shutdown.
//! Nothing at all without `$NOTIFY_SOCKET` (not under systemd).
//!
//! The watchdog is not a timer that pings regardless: each proxy thread
//! bumps its own counter every [`BEAT`]; the pinger sends `WATCHDOG=1` only
//! when every counter moved since its last look. A thread stuck in a busy
//! loop or a blocking call stops the pings, and systemd restarts keygate
//! after `WatchdogSec`.

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often a proxy thread shows it is alive.
pub const BEAT: Duration = Duration::from_millis(500);

static BEATS: Mutex<Vec<Arc<AtomicU64>>> = Mutex::new(Vec::new());

/// Send one message; `false` when not under systemd or it failed.
pub fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let Ok(socket) = UnixDatagram::unbound() else {
        return false;
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let sent = match bytes.split_first() {
        // An abstract socket: "@name".
        Some((b'@', name)) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
        }
        _ => socket.send_to(state.as_bytes(), &path),
    };
    sent.is_ok()
}

/// A proxy thread's heartbeat counter, watched by the pinger.
pub fn register_beat() -> Arc<AtomicU64> {
    let beat = Arc::new(AtomicU64::new(0));
    BEATS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(beat.clone());
    beat
}

/// `READY=1`, and the watchdog pinger when systemd asked for one
/// (`$WATCHDOG_USEC`, for this process if `$WATCHDOG_PID` is set).
pub fn ready() {
    if !notify("READY=1") {
        return;
    }
    let usec = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    let for_us = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .is_none_or(|pid| pid == std::process::id());
    let Some(usec) = usec.filter(|&u| u > 0 && for_us) else {
        return;
    };
    // Ping at half the interval, but never faster than the beats.
    let every = Duration::from_micros(usec / 2).max(BEAT * 2);
    let spawned = std::thread::Builder::new()
        .name("keygate watchdog".into())
        .spawn(move || {
            let mut seen: Vec<u64> = Vec::new();
            loop {
                std::thread::sleep(every);
                let now: Vec<u64> = BEATS
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .map(|b| b.load(Ordering::Relaxed))
                    .collect();
                let alive = seen.len() != now.len() || now.iter().zip(&seen).all(|(n, s)| n != s);
                if alive {
                    notify("WATCHDOG=1");
                } else {
                    tracing::error!(
                        "a proxy thread has stopped turning; withholding the systemd watchdog ping"
                    );
                }
                seen = now;
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the watchdog thread");
    }
}
